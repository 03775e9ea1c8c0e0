"""``harmonode train landmarks|lesions`` and ``harmonode evaluate``: the detector's training and FROC evaluation."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

log = logging.getLogger(__name__)

WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights"
FP_RATES = ("0.5", "1", "2", "4")
#: First held-out subject of ``harmonode evaluate`` (``SEEDS["eval"]`` + 2000): the model card's studies.
EVAL_SUBJECTS_FROM = 52_000


def _threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def write_card(weights: Path, card: dict[str, Any]) -> Path:
    """Write the model card next to ``weights`` with the file's sha256 and size."""
    from models.detector import sha256_of

    card = {**card, "file": weights.name, "sha256": sha256_of(weights), "size_bytes": weights.stat().st_size}
    path = weights.with_suffix(".json")
    path.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return path


def _table(result: dict[str, Any], title: str) -> str:
    head = f"{'':44s} {'cases':>5s} {'les':>4s} " + " ".join(f"FP{r:>4s}" for r in FP_RATES)
    lines = [title, head + "    AUC  cand.rec  in-sac FP1"]

    def row(name: str, r: dict[str, Any]) -> str:
        sens = " ".join(f"{r['sensitivity_at_fp'][k]:6.2f}" for k in FP_RATES)
        tight = r["sensitivity_at_fp_within_lesion"]["1"]
        return (
            f"{name:44s} {r['cases']:5d} {r['lesions']:4d} {sens} {r['auc']:6.3f} {r['candidate_recall']:8.3f}"
            f" {tight:11.2f}"
        )

    lines.append(row("overall", result))
    for name, r in result.get("per_kind", {}).items():
        lines.append(row(name, r))
    for name, r in result["per_condition"].items():
        lines.append(row("  " + name, r))
    lines.append("in-sac: sensitivity at 1 FP per case counting a finding only inside the lesion's own sphere (d/2)")
    lines.append("found at 1 FP per case, by lesion diameter:")
    for name, r in result.get("per_kind", {}).items():
        bins = r.get("sensitivity_at_1fp_by_size", {})
        lines.append(f"  {name:42s} " + "  ".join(f"{b} {v['found']}/{v['lesions']}" for b, v in bins.items()))
    return "\n".join(lines)


def _plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rates = [float(r) for r in FP_RATES]
    colours = {}  # one colour per task, solid with the rules, dashed without: each pair reads as one
    for label, res in results.items():
        for kind, r in res["per_kind"].items():
            colour = colours.setdefault(kind, f"C{len(colours)}")
            style, marker = ("-", "o") if label == "harmonized" else ("--", "x")
            sens = [r["sensitivity_at_fp"][k] for k in FP_RATES]
            ax.plot(rates, sens, style, color=colour, marker=marker, label=f"{kind} ({label})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(rates, FP_RATES)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per case")
    ax.set_ylabel("sensitivity")
    ax.set_title("FROC on held-out scanner conditions (simulated)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def register(app: typer.Typer) -> None:
    """Add ``train`` (landmarks, lesions) and ``evaluate`` to the CLI."""
    train_app = typer.Typer(help="Train the detector on simulated studies (deterministic; CPU minutes).")
    app.add_typer(train_app, name="train")

    @train_app.command("landmarks")
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
        from models.train import train_landmarks

        _threads(threads)
        metrics = train_landmarks(out, studies=studies, epochs=epochs, seed=seed, width=width, harmonize=harmonize)
        typer.echo(json.dumps({"checkpoint": str(out), **metrics}, indent=2))

    @train_app.command("lesions")
    def train_lesions_cmd(
        pretrained: Annotated[Path | None, typer.Option(help="Landmark checkpoint (none: from scratch).")] = WEIGHTS
        / "landmarks.pt",
        out: Annotated[Path, typer.Option(help="Checkpoint to write (its card goes next to it).")] = WEIGHTS
        / "lesion.pt",
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
            typer.Option(
                help="Patch views the network reads, comma-separated, 3 channels each: planes, zoom, mip, wide."
            ),
        ] = "planes",
        fine_candidates: Annotated[
            int, typer.Option(help="Head: extra finest-scale candidates per series for small sacs (0: none).")
        ] = 0,
        device: Annotated[str, typer.Option(help="Where the network trains: cpu, cuda, auto.")] = "auto",
        threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch default).")] = 2,
        version: Annotated[str, typer.Option(help="Version written to the model card.")] = "1.4.0",
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
        from models import train as T
        from models.detector import TTA, pick_device
        from models.patches import PATCH_MM, check_views
        from simulator.studies import GEOMETRY

        _threads(threads)
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
                T.check_subjects_from(subjects_from)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--subjects-from") from exc
        metrics = T.train_lesions(
            out, pretrained, studies=studies, epochs=epochs, seed=seed, harmonize=harmonize,
            compare_scratch=compare_scratch, size=size, test_size_studies=test_size_studies, mine=mine, width=width,
            lesions_per_study=lesions_per_study, rescan=rescan, subjects_from=subjects_from, views=view_list,
            fine_candidates=fine_candidates, device=str(pick_device(device)), head_studies=head_studies,
        )  # fmt: skip
        landmark = {}
        if pretrained is not None:
            _, ckpt = T.load_checkpoint(pretrained)
            landmark = ckpt.get("metrics", {})
        card = {
            "name": "harmonode lesion detector (2.5D mini-VGG, seed 002)",
            "version": version,
            "created": dt.date.today().isoformat(),
            "task": {"head": "aneurysm (CTA, TOF-MRA)", "chest": "nodule (CT)"},
            "threshold": metrics["threshold_at_1fp_validation"],
            "threshold_note": (
                "probability at one false positive per case on validation studies of the training conditions "
                f"(size {size}; models.train.calibrate_thresholds; head: the lower of CTA and MRA)"
            ),
            "patch_mm": PATCH_MM,
            "tta": TTA,
            "views": list(view_list),
            "fine_candidates": {"head": fine_candidates} if fine_candidates else {},
            "training": {
                "command": (
                    f"harmonode train landmarks --studies 8 --epochs 12 --seed {seed} && harmonode train lesions "
                    f"--studies {studies}"
                    + (f" --head-studies {head_studies}" if head_studies else "")
                    + f" --test-size-studies {test_size_studies} --size {size} --epochs {epochs} "
                    f"--mine {mine} --seed {seed}"
                    + (f" --lesions-per-study {lesions_per_study}" if lesions_per_study else "")
                    + (" --rescan" if rescan else "")
                    + (f" --subjects-from {subjects_from}" if subjects_from is not None else "")
                    + (f" --views {','.join(view_list)}" if view_list != ("planes",) else "")
                    + (f" --fine-candidates {fine_candidates}" if fine_candidates else "")
                ),
                "data": (
                    f"harmonode simulate: {metrics['studies_per_kind']} studies at size={size} "
                    f"(simulator.studies.GEOMETRY) + {test_size_studies} per kind at size=test; landmarks at size=test"
                ),
                "size": size,
                "geometry": {
                    kind: dict(
                        zip(("slices", "matrix", "pixel_mm", "slice_mm"), GEOMETRY[(kind, size)][:4], strict=True)
                    )
                    for kind in T.KINDS
                },
                "studies_per_kind": metrics["studies_per_kind"],
                "test_size_studies_per_kind": test_size_studies,
                "hard_negatives": f"{mine} negatives per positive each epoch, half the highest-scored by the model",
                "rescan_augmentation": T.RESCAN_NOTE if rescan else None,
                "seeds_from": T.SEEDS,
                "train_conditions": T.TRAIN_CONDITIONS,
                "held_out_conditions": T.HELD_OUT_CONDITIONS,
                "harmonization": (
                    f"seed-000 rules (a, b, c) per condition fitted from unlabeled studies against {T.REFERENCE}"
                    if harmonize
                    else "none (raw values)"
                ),
                "init": "landmark pretraining" if pretrained is not None else "scratch",
                "landmark_pretraining": landmark,
            },
            "metrics": metrics,
        }
        path = write_card(out, card)
        typer.echo(json.dumps({"checkpoint": str(out), "card": str(path), **metrics}, indent=2))

    @app.command("evaluate")
    def evaluate_cmd(
        studies: Annotated[int, typer.Option(help="Held-out studies per condition.")] = 8,
        size: Annotated[str, typer.Option(help="Simulated size of the held-out studies (test, eval, full).")] = "eval",
        weights_dir: Annotated[Path, typer.Option(help="Folder with lesion.pt and lesion.json.")] = WEIGHTS,
        raw: Annotated[bool, typer.Option(help="Also evaluate without harmonization.")] = True,
        plot: Annotated[Path | None, typer.Option(help="FROC plot (PNG).")] = Path("docs/froc.png"),
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
        update_card: Annotated[bool, typer.Option(help="Store the results in the model card.")] = False,
        threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch default).")] = 2,
        jobs: Annotated[int, typer.Option(help="Studies scored in parallel processes.")] = 1,
        subjects_from: Annotated[
            int,
            typer.Option(
                help="First held-out subject (kind k from here + 1000 k). Another base in the evaluation range"
                " (50000-59999) draws other studies of the same held-out conditions."
            ),
        ] = EVAL_SUBJECTS_FROM,
    ) -> None:
        """FROC (sensitivity at 0.5/1/2/4 FP per case) and patch AUC on held-out conditions, with/without rules."""
        from models import train as T
        from models.detector import CARD_NAME, Detector, WeightsRefused

        kinds = T.KINDS
        per_kind = {kind: studies * len(T.HELD_OUT_CONDITIONS[kind]) for kind in kinds}
        first, last = T.SEEDS["eval"], T.SEEDS["eval"] + 9_999
        top = max(subjects_from + 1000 * ki + per_kind[kind] - 1 for ki, kind in enumerate(kinds))
        if subjects_from < first or top > last:
            typer.echo(
                f"error: --subjects-from {subjects_from} with --studies {studies} uses subjects {subjects_from}-{top};"
                f" held-out subjects must lie in {first}-{last} (no network trains there). Try --subjects-from"
                f" {EVAL_SUBJECTS_FROM} (the card's studies) or 52500.",
                err=True,
            )
            raise typer.Exit(2)
        _threads(threads)
        try:
            detector = Detector.load(device="auto", weights_dir=weights_dir)
        except (FileNotFoundError, WeightsRefused) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        plan = [
            item
            for ki, kind in enumerate(kinds)
            for item in T.study_plan((kind,), T.HELD_OUT_CONDITIONS, per_kind[kind], subjects_from + 1000 * ki, size)
        ]
        rules = T.fit_rules_by_size(kinds, (size,), progress=not as_json)
        results = {"harmonized": T.evaluate_detector(detector, plan, rules, progress=not as_json, jobs=jobs)}
        if raw:
            results["raw"] = T.evaluate_detector(detector, plan, None, progress=not as_json, jobs=jobs)
        out = {**results["harmonized"], "without_harmonization": results.get("raw"), "model": detector.version}
        if plot is not None:
            _plot(results, plot)
        if update_card:
            card_path = weights_dir / CARD_NAME
            card = json.loads(card_path.read_text())
            card["evaluation"] = {
                "command": f"harmonode evaluate --studies {studies} --size {size}"
                + (f" --subjects-from {subjects_from}" if subjects_from != EVAL_SUBJECTS_FROM else "")
                + " --update-card",
                "held_out_studies_per_condition": studies,
                "subjects_from": subjects_from,
                "size": size,
                "hit_rule": T.HIT_RULE,
                **out,
            }
            card_path.write_text(json.dumps(card, indent=2) + "\n")
        if as_json:
            typer.echo(json.dumps(out, indent=2))
            return
        for label, res in results.items():
            typer.echo(_table(res, f"\n{label} (held-out conditions, {studies} studies per condition, size {size})"))
        if plot is not None:
            typer.echo(f"\nFROC plot: {plot}")
