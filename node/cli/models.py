"""``harmonode train landmarks|lesions|sweep|card`` and ``harmonode evaluate``: the detector's training and FROC.

Each command parses its options, calls one function of ``models.training`` and prints what it returns.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from models.training.data import EVAL_SUBJECTS_FROM

log = logging.getLogger(__name__)

#: ``models.detector.WEIGHTS_DIR``, named without importing torch (``--help`` stays quick)
WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"


def _threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def _error(message: str) -> typer.Exit:
    """Print ``error: message`` and return the Exit (status 2) to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _table(result: dict[str, Any], title: str) -> str:
    """The evaluation as a table: the primary rule's FROC at LUNA16's rates and CPM, then the second rule's."""
    from models.training.hits import FP_RATES

    primary = result.get("hit_rule", {}).get("name", "primary")
    second = result.get("second_rule", {}).get("name", "second")
    head = f"{'':44s} {'cases':>5s} {'les':>4s} " + " ".join(f"{'FP' + r:>6s}" for r in FP_RATES)
    lines = [title, f"{head}    CPM    AUC cand.rec | {second}: FP0.25  FP1   CPM"]

    def row(name: str, r: dict[str, Any]) -> str:
        sens = " ".join(f"{r['sensitivity_at_fp'][k]:6.2f}" for k in FP_RATES)
        other = r["second"]
        return (
            f"{name:44s} {r['cases']:5d} {r['lesions']:4d} {sens} {r['cpm']:6.3f} {r['auc']:6.3f} "
            f"{r['candidate_recall']:8.3f} | {' ' * len(second)}  {other['sensitivity_at_fp']['0.25']:6.2f}"
            f" {other['sensitivity_at_fp']['1']:5.2f} {other['cpm']:5.3f}"
        )

    lines.append(row("overall", result))
    for name, r in result.get("per_kind", {}).items():
        lines.append(row(name, r))
    for name, r in result["per_condition"].items():
        lines.append(row("  " + name, r))
    lines.append(
        f"counted by the {primary} rule (a finding inside the lesion's own sphere, d/2); CPM: mean sensitivity at"
        f" the seven rates (LUNA16); right of the bar the {second} rule (within max(d/2, 3) + 1.5 mm)"
    )
    lines.append(f"found at 1 FP per case ({primary}), by lesion diameter:")
    for name, r in result.get("per_kind", {}).items():
        bins = r.get("sensitivity_at_1fp_by_size", {})
        lines.append(f"  {name:42s} " + "  ".join(f"{b} {v['found']}/{v['lesions']}" for b, v in bins.items()))
    return "\n".join(lines)


def train_landmarks_cmd(
    out: Annotated[Path, typer.Option(help="Checkpoint to write.")] = WEIGHTS / "landmarks.pt",
    studies: Annotated[int, typer.Option(help="Training studies per kind.")] = 8,
    epochs: Annotated[int, typer.Option()] = 12,
    seed: Annotated[int, typer.Option()] = 0,
    width: Annotated[int, typer.Option(help="Channels of the first block (16, 32, 64 through the trunk).")] = 16,
    harmonize: Annotated[bool, typer.Option(help="Apply seed-000 rules to every study.")] = True,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch default).")] = 2,
) -> None:
    """Pretrain the mini-VGG on anatomical-landmark classification (≥ 20 classes + background)."""
    from models.training.train import train_landmarks

    _threads(threads)
    metrics = train_landmarks(out, studies=studies, epochs=epochs, seed=seed, width=width, harmonize=harmonize)
    typer.echo(json.dumps({"checkpoint": str(out), **metrics}, indent=2))


def _lesion_views(
    views: str,
    fine_candidates: int,
    studies: int,
    head_studies: int | None,
    pretrained: Path | None,
    subjects_from: int | None,
) -> tuple[str, ...]:
    """The views ``train lesions`` asked for, once every option a training cannot use is refused (BadParameter)."""
    from models.patches import check_views
    from models.training.data import check_subjects_from

    view_list = tuple(v.strip() for v in views.split(",") if v.strip())
    try:
        check_views(view_list)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--views") from exc
    if fine_candidates < 0:
        raise typer.BadParameter("must be 0 or more", param_hint="--fine-candidates")
    for hint, count in (("--studies", studies), ("--head-studies", head_studies or 1)):
        if not 1 <= count <= 500:
            raise typer.BadParameter(
                "must be 1 to 500 (subjects from 500 on are the test-size studies)", param_hint=hint
            )
    if pretrained is not None and not pretrained.exists():
        raise typer.BadParameter(f"{pretrained} does not exist; run `harmonode train landmarks` first")
    if subjects_from is not None:
        try:
            check_subjects_from(subjects_from)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--subjects-from") from exc
    return view_list


def _scarce_cells(scarce: str | None) -> tuple[str, ...]:
    """The kind/condition cells ``--scarce`` names (default: every held-out condition), checked (BadParameter)."""
    from models.training.data import HELD_OUT_CONDITIONS, REFERENCE, TRAIN_CONDITIONS

    if scarce is None:
        return tuple(f"{k}/{c}" for k, conds in HELD_OUT_CONDITIONS.items() for c in conds)
    cells = tuple(c.strip() for c in scarce.split(",") if c.strip())
    for cell in cells:
        kind, _, cond = cell.partition("/")
        known = (*TRAIN_CONDITIONS.get(kind, ()), *HELD_OUT_CONDITIONS.get(kind, ()))
        if cond not in known or cond == REFERENCE.get(kind):
            raise typer.BadParameter(f"{cell}: not a kind/condition with a rule other than the reference",
                                     param_hint="--scarce")  # fmt: skip
    return cells


def train_lesions_cmd(
    pretrained: Annotated[Path | None, typer.Option(help="Landmark checkpoint (none: from scratch).")] = WEIGHTS
    / "landmarks.pt",
    out: Annotated[Path, typer.Option(help="Checkpoint to write (its card goes next to it).")] = WEIGHTS / "lesion.pt",
    studies: Annotated[int, typer.Option(help="Training studies per kind at --size (at most 500).")] = 40,
    head_studies: Annotated[
        int | None, typer.Option(help="Training studies per head kind (CTA, MRA) instead of --studies.")
    ] = None,
    test_size_studies: Annotated[int, typer.Option(help="Extra training studies per kind at size test.")] = 6,
    size: Annotated[str, typer.Option(help="Simulated size of the training studies (test, eval, full).")] = "eval",
    epochs: Annotated[int, typer.Option()] = 16,
    mine: Annotated[int, typer.Option(help="Negatives per positive each epoch (half mined), 0: all.")] = 5,
    lesions_per_study: Annotated[
        int, typer.Option(help="Lesions per training subject (0: the simulator's mix, 1–3 aneurysms, 1–4 nodules).")
    ] = 4,
    width: Annotated[int, typer.Option(help="Network width when training from scratch.")] = 16,
    seed: Annotated[int, typer.Option()] = 0,
    harmonize: Annotated[bool, typer.Option(help="Apply seed-000 rules to every study.")] = True,
    rescan: Annotated[
        bool, typer.Option(help="Also train on every CT study rescanned through a random kernel and dose.")
    ] = False,
    subjects_from: Annotated[
        int | None, typer.Option(help="First simulated subject (default 20000); another base: disjoint subjects.")
    ] = None,
    compare_scratch: Annotated[
        bool, typer.Option(help="Also train from scratch (all data and 20 %) and report both: 4 trainings.")
    ] = False,
    views: Annotated[
        str,
        typer.Option(help="Patch views the network reads, comma-separated, 3 channels each: planes, zoom, mip, wide."),
    ] = "planes",
    fine_candidates: Annotated[
        int, typer.Option(help="Head: extra finest-scale candidates per series for small sacs (0: none).")
    ] = 0,
    device: Annotated[str, typer.Option(help="Where the network trains: cpu, cuda, auto.")] = "auto",
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch default).")] = 2,
    version: Annotated[str, typer.Option(help="Version written to the model card.")] = "1.4.0",
    extra_patches: Annotated[
        Path | None, typer.Option(help="A mined set (`harmonode mine --out DIR`) added to the training patches.")
    ] = None,
    extend_with_inverse_rules: Annotated[
        bool,
        typer.Option(
            help="Data extension (seed 000): reference studies converted by a scarce condition's"
            " inverted rule are added as studies of that condition (see --scarce)."
        ),
    ] = False,
    scarce: Annotated[
        str | None,
        typer.Option(help="Scarce cells kind/condition, comma-separated (default: every held-out condition)."),
    ] = None,
) -> None:
    """Transfer the landmark trunk to lesion vs normal (aneurysm on head CTA/MRA, nodule on chest CT).

    The defaults train network a's recipe of card 1.2 (40 subjects per kind, 45 minutes on 2 CPU cores). The
    shipped card 1.4 averages three networks trained on a GPU with ``--head-studies 400 --studies 72
    --lesions-per-study 5 --epochs 8 --views planes,zoom,mip --rescan --device cuda`` and seeds 0, 1, 2
    (694,000 patches, 274,000 of them from the rescanned CT studies; about 4 minutes per network on an H200,
    hours on a CPU): training data size, then the rescans, moved held-out aneurysm sensitivity (README →
    Detection). Training writes a
    one-network card, so retraining replaces the ensemble until its card names the members again.
    ``--views`` and ``--fine-candidates`` are written into the card for the detector to read.
    """
    from models.detector import pick_device
    from models.training.card import LesionRecipe, train_lesion_card

    _threads(threads)
    view_list = _lesion_views(views, fine_candidates, studies, head_studies, pretrained, subjects_from)
    _check_mined(extra_patches)
    cells = _scarce_cells(scarce) if extend_with_inverse_rules else ()
    recipe = LesionRecipe(
        studies=studies, head_studies=head_studies, test_size_studies=test_size_studies, size=size, epochs=epochs,
        mine=mine, lesions_per_study=lesions_per_study, width=width, seed=seed, harmonize=harmonize,
        rescan=rescan, subjects_from=subjects_from, compare_scratch=compare_scratch, views=view_list,
        fine_candidates=fine_candidates, extra_patches=extra_patches, extend=cells,
    )  # fmt: skip
    trained = train_lesion_card(out, pretrained, recipe, str(pick_device(device)), version)
    said = {"checkpoint": str(trained.checkpoint), "card": str(trained.card), **trained.metrics}
    typer.echo(json.dumps(said, indent=2))


def _check_mined(folder: Path | None) -> None:
    """A BadParameter unless ``folder`` is None or a mined set (``harmonode mine --out``)."""
    if folder is not None and not (folder / "manifest.json").exists():
        raise typer.BadParameter(f"{folder} is not a mined set (harmonode mine --out)", param_hint="--extra-patches")


def train_sweep_cmd(
    studies: Annotated[int, typer.Option(help="Training subjects per kind.")] = 40,
    head_studies: Annotated[
        int | None, typer.Option(help="Training subjects per head kind (default: --studies).")
    ] = None,
    lesions: Annotated[int, typer.Option(help="Lesions per training subject.")] = 4,
    subjects_from: Annotated[int, typer.Option(help="First training subject (as train lesions).")] = 20000,
    pretrained: Annotated[Path, typer.Option(help="Landmark trunk to start from.")] = WEIGHTS / "landmarks.pt",
    landmark_negatives: Annotated[int, typer.Option(help="Jittered negatives per vessel landmark.")] = 3,
    rescan: Annotated[
        bool, typer.Option(help="Each training CT study also rescanned (recipes +rs train on both).")
    ] = False,
    phase_a_device: Annotated[str, typer.Option(help="Candidates and patches on this device (cuda: GPU).")] = "cpu",
    test_studies: Annotated[int, typer.Option(help="Training subjects per kind at size test.")] = 6,
    per_cond: Annotated[int, typer.Option(help="Selection and evaluation studies per held-out condition.")] = 8,
    fine: Annotated[int, typer.Option(help="Head: fine-scale extra candidates per series.")] = 100,
    epochs: Annotated[int, typer.Option()] = 16,
    seeds: Annotated[int, typer.Option(help="Networks per recipe (seeds 0, 1, ...).")] = 3,
    jobs: Annotated[int, typer.Option(help="CPU processes (phases A and C).")] = 16,
    gpu_jobs: Annotated[int, typer.Option(help="Networks trained at once (phase B).")] = 6,
    recipes: Annotated[
        str | None, typer.Option(help="Comma-separated recipes, e.g. all,all+rs (default: every recipe).")
    ] = None,
    device: Annotated[str, typer.Option(help="Where the networks train and score.")] = "cuda",
    work: Annotated[Path, typer.Option(help="Folder of the cached training patches.")] = Path("/tmp/sweep"),
    rules: Annotated[
        Path | None, typer.Option(help="Pickle of fit_rules_by_size(kinds, ('eval', 'test')) (default: fit them).")
    ] = None,
    out: Annotated[Path, typer.Option(envvar="OUT", help="Results: log.txt, summary.json, states.pt.")] = Path(
        "/tmp/sweep_out"
    ),
) -> None:
    """Train and score detector recipes (views x fine candidates x landmark negatives x rescans x seeds) on a GPU.

    8 minutes on a 16-core machine with one H100/H200, hours on 2 CPU cores. ``harmonode train card`` ships a
    recipe of its ``states.pt`` as the detector's weights.
    """
    from models.training.sweep import RECIPES, SweepOptions, run_sweep

    try:
        options = SweepOptions(
            studies=studies, head_studies=head_studies, lesions=lesions, subjects_from=subjects_from,
            pretrained=pretrained, landmark_negatives=landmark_negatives, rescan=rescan,
            phase_a_device=phase_a_device, test_studies=test_studies, per_cond=per_cond, fine=fine, epochs=epochs,
            seeds=seeds, jobs=jobs, gpu_jobs=gpu_jobs, recipes=tuple(recipes.split(",") if recipes else RECIPES),
            device=device, work=work, out=out, rules=rules,
        )  # fmt: skip
    except ValueError as exc:
        raise _error(str(exc)) from exc
    run_sweep(options, echo=typer.echo)


def train_card_cmd(
    states: Annotated[Path, typer.Argument(help="states.pt of a `harmonode train sweep` run.")],
    version: Annotated[str, typer.Option(help="The card's version.")],
    sweep_command: Annotated[str, typer.Option(help="The `harmonode train sweep` command that trained them.")],
    data: Annotated[str, typer.Option(help="What the networks were trained on, in words.")],
    recipe: Annotated[str, typer.Option(help="The recipe whose seeds become the card's networks.")] = "all",
    weights: Annotated[Path, typer.Option(help="Folder of the card.")] = WEIGHTS,
    rules: Annotated[
        Path | None, typer.Option(help="Pickle of fit_rules_by_size(kinds, ('eval', 'test')) (default: fit).")
    ] = None,
    trained_on: Annotated[str, typer.Option(help="The machine, in words.")] = "",
    studies_per_kind: Annotated[str, typer.Option(help='JSON, e.g. {"head-cta": 400, "chest-ct": 72}.')] = "{}",
    lesions_per_study: Annotated[int, typer.Option()] = 5,
    epochs: Annotated[int, typer.Option()] = 16,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch default).")] = 2,
) -> None:
    """Ship a recipe of a sweep as the detector's weights: checkpoints, calibrated thresholds, model card.

    Every seed of the recipe becomes one network of the card (lesion.pt, lesion-b.pt, ...); the thresholds are
    calibrated on validation studies of the training conditions with the networks averaged (minutes on 2 CPU
    cores). Then run ``harmonode evaluate --update-card`` to store the held-out FROC in it.
    """
    from models.training.card import CardError, SweepProvenance, card_from_sweep

    try:
        per_kind = json.loads(studies_per_kind)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--studies-per-kind") from exc
    _threads(threads)
    provenance = SweepProvenance(sweep_command, data, trained_on, per_kind, lesions_per_study, epochs)
    try:
        shipped = card_from_sweep(states, recipe, version, weights, provenance, rules)
    except CardError as exc:
        raise _error(str(exc)) from exc
    typer.echo(f"thresholds {shipped.thresholds}")
    typer.echo(str(shipped.card))


def evaluate_cmd(
    studies: Annotated[int, typer.Option(help="Held-out studies per condition.")] = 8,
    size: Annotated[str, typer.Option(help="Simulated size of the held-out studies (test, eval, full).")] = "eval",
    weights_dir: Annotated[Path, typer.Option(help="Folder with lesion.pt and lesion.json.")] = WEIGHTS,
    raw: Annotated[bool, typer.Option(help="Also evaluate without harmonization.")] = True,
    plot: Annotated[Path | None, typer.Option(help="FROC plot (PNG).")] = Path("docs/froc.png"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    update_card: Annotated[bool, typer.Option(help="Store the results in the model card.")] = False,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch default).")] = 2,
    jobs: Annotated[int, typer.Option(help="Studies scored in parallel processes (0: one per CPU core).")] = 0,
    subjects_from: Annotated[
        int,
        typer.Option(
            help="First held-out subject (kind k from here + 1000 k). Another base in the evaluation range"
            " (50000-59999) draws other studies of the same held-out conditions."
        ),
    ] = EVAL_SUBJECTS_FROM,
    residual: Annotated[
        bool, typer.Option(help="Also read every study after rules + the residual stage (seed 003).")
    ] = False,
    residual_dir: Annotated[Path, typer.Option(help="Folder with residual.pt and residual.json.")] = WEIGHTS,
    save_candidates: Annotated[
        Path | None, typer.Option(help="Write every study's candidates and probabilities to this folder.")
    ] = None,
    from_candidates: Annotated[
        Path | None,
        typer.Option(help="Count from a --save-candidates folder: no simulation, no network (seconds)."),
    ] = None,
    sim_cache: Annotated[
        Path | None, typer.Option(help="Folder of simulated studies and fitted rules, made once and reused.")
    ] = None,
    rule: Annotated[str, typer.Option(help="Primary hit rule: sac-tight or reach (the other is the second).")] = (
        "sac-tight"
    ),
    nms_head_mm: Annotated[float, typer.Option(help="NMS radius floor in the head (mm).")] = 6.0,
    nms_chest_mm: Annotated[float, typer.Option(help="NMS radius floor in the chest (mm).")] = 10.0,
) -> None:
    """FROC at LUNA16's rates (1/8 to 8 FP per case), CPM and patch AUC on held-out conditions, with/without rules.

    Counted by the sac-tight rule (a finding inside the lesion's sphere); the older reach rule is the second
    column. ``--save-candidates DIR`` keeps what the detector made of every study; ``--from-candidates DIR``
    counts again from it (another ``--rule`` or NMS radius) in seconds.
    """
    from models.detector import WeightsRefused
    from models.training.candidate_cache import CacheError
    from models.training.data import SubjectsOutOfRange
    from models.training.evaluate import Scoring
    from models.training.heldout import CandidateOptions, evaluate_card
    from models.training.hits import RULES, rule_named

    try:
        primary = rule_named(rule)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--rule") from exc
    second = next(r for r in RULES.values() if r != primary)
    scoring = Scoring(primary, second, {"head": nms_head_mm, "chest": nms_chest_mm})
    if update_card and (scoring != Scoring()):
        raise _error("--update-card stores the card's figures by the default rule and NMS; drop --rule / --nms-*")
    caches = CandidateOptions(save_candidates, from_candidates, sim_cache, scoring)
    _threads(threads)
    try:
        report = evaluate_card(
            weights_dir, studies=studies, size=size, raw=raw, plot=plot, update_card=update_card, jobs=jobs,
            subjects_from=subjects_from, progress=not as_json, residual_dir=residual_dir if residual else None,
            caches=caches,
        )  # fmt: skip
    except (SubjectsOutOfRange, FileNotFoundError, WeightsRefused, CacheError) as exc:
        raise _error(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(report.summary, indent=2))
        return
    for label, res in report.results.items():
        title = f"\n{label} (held-out conditions, {report.studies} studies per condition, size {report.size})"
        typer.echo(_table(res, title))
    if plot is not None:
        typer.echo(f"\nFROC plot: {plot}")


def register(app: typer.Typer) -> None:
    """Add ``train`` (landmarks, lesions, sweep, card) and ``evaluate`` to the CLI."""
    train_app = typer.Typer(help="Train the detector on simulated studies (deterministic; CPU minutes).")
    app.add_typer(train_app, name="train")
    train_app.command("landmarks")(train_landmarks_cmd)
    train_app.command("lesions")(train_lesions_cmd)
    train_app.command("sweep")(train_sweep_cmd)
    train_app.command("card")(train_card_cmd)
    from node.cli.harmonize import train_residual_cmd

    train_app.command("residual")(train_residual_cmd)
    app.command("evaluate")(evaluate_cmd)
