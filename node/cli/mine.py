"""``harmonode mine``: hard-example mining (seed 001) into a training set for ``harmonode train lesions``.

Thin: opens the index's parameter store, loads the detector and the labelled simulated studies, and calls
``models.mining.mine`` (or ``random_converted`` for the control), then ``write_mined``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from node.cli import ConfigOption, fail, load_or_fail


def _index_path(index: Path | None, config: Path | None) -> Path | str:
    if index is not None:
        return index
    cfg = load_or_fail(config)
    if cfg.cluster.enabled:
        return cfg.cluster.database
    path = cfg.data_path / "index.sqlite"
    if not path.exists():
        raise fail(f"no node data in {cfg.data_path.resolve()}: pass --config of the node, or --index")
    return path


def mine_cmd(
    out: Annotated[Path, typer.Option(help="Folder of the mined set (patches.npz, provenance.jsonl, manifest.json).")],
    kind: Annotated[str, typer.Option(help="Study kind: head-cta, head-mra, chest-ct.")] = "chest-ct",
    condition: Annotated[
        str | None,
        typer.Option(
            help="Convert towards this cell's stored sets (a condition key, or a prefix ending in *)."
            " Default: every cell of --kind (kind/*)."
        ),
    ] = None,  # fmt: skip
    studies: Annotated[int, typer.Option(help="Labelled source studies (training conditions of --kind).")] = 4,
    subjects_from: Annotated[int, typer.Option(help="First source subject (the lesion-training range).")] = 20_000,
    size: Annotated[str, typer.Option(help="Simulated size of the source studies (test, eval, full).")] = "test",
    threshold: Annotated[float, typer.Option(help="Keep patches whose true-class confidence is below this.")] = 0.7,
    radius: Annotated[float, typer.Option(help="R of Expression 3: the neighbourhood of a hard set.")] = 25.0,
    mean_tolerance: Annotated[
        float | None, typer.Option(help="Expression 4 instead of R: |Δmean| bound (with --std-tolerance).")
    ] = None,
    std_tolerance: Annotated[float | None, typer.Option(help="Expression 4: |Δstd| bound.")] = None,
    budget: Annotated[int, typer.Option(help="Patches to keep at most.")] = 200,
    max_conversions: Annotated[int, typer.Option(help="Conversions to try at most (one study, one set each).")] = 24,
    update_every: Annotated[
        int, typer.Option(help="Second embodiment: update the model's last layers every N kept patches (0: never).")
    ] = 0,
    update_steps: Annotated[int, typer.Option(help="Steps of each online update.")] = 20,
    random: Annotated[
        bool, typer.Option("--random", help="The control: the same budget of randomly converted patches, unscored.")
    ] = False,
    harmonize: Annotated[
        bool, typer.Option(help="Harmonize each converted study with its condition's seed-000 rule (fitted here).")
    ] = True,
    simulate_store: Annotated[
        int, typer.Option(help="First store N simulated studies per held-out condition of --kind (tests, demos).")
    ] = 0,
    index: Annotated[Path | None, typer.Option(help="The index (default: the node's, from --config).")] = None,
    weights_dir: Annotated[Path | None, typer.Option(help="The detector's folder (default: shipped).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 2,
    config: ConfigOption = None,
) -> None:
    """Mine hard examples: convert labelled patches with stored parameters, keep what the detector gets wrong.

    Each conversion takes one labelled simulated study (of the training conditions of --kind), converts it per
    region towards a stored (mean, std) set of the parameter store (rules/transfer.py), harmonizes it as its
    condition would be, scores its candidate and lesion patches with the current detector and keeps those whose
    confidence on the true class is below --threshold. After a conversion with hard patches the stored sets
    within --radius of it are tried next, or new ones are generated there when none is near. The output folder
    is read by `harmonode train lesions --extra-patches DIR`.
    """
    import torch

    from models.detector import Detector, WeightsRefused
    from models.mining import (
        MiningOptions,
    )  # fmt: skip
    from models.training.data import KINDS

    if kind not in KINDS:
        raise typer.BadParameter(f"one of {', '.join(KINDS)}", param_hint="--kind")
    try:
        options = MiningOptions(
            threshold=threshold, radius=None if mean_tolerance is not None else radius, mean_tolerance=mean_tolerance,
            std_tolerance=std_tolerance, budget=budget, max_conversions=max_conversions, update_every=update_every,
            update_steps=update_steps, seed=seed,
        )  # fmt: skip
    except ValueError as exc:
        raise fail(str(exc)) from exc
    if threads > 0:
        torch.set_num_threads(threads)
    stored = _stored_sets(_index_path(index, config), kind, condition, simulate_store)
    try:
        detector = Detector.load("cpu", weights_dir)
    except (FileNotFoundError, WeightsRefused) as exc:
        raise fail(str(exc)) from exc
    said = _run(detector, options, stored, out, kind, studies, subjects_from, size, harmonize, random)
    typer.echo(json.dumps(said))


def _run(
    detector: Any, options: Any, stored: list, out: Path, kind: str, studies: int, subjects_from: int, size: str,
    harmonize: bool, random: bool,
) -> dict[str, Any]:  # fmt: skip
    """Mine (or, ``random``, convert at random) the training studies of ``kind``; write the set; what to print."""
    from models.mining import (
        candidates_of,
        detector_scorer,
        manifest_of,
        mine,
        online_updater,
        random_converted,
        rules_harmonizer,
        write_mined,
    )  # fmt: skip
    from models.training.data import TRAIN_CONDITIONS, fit_rules, simulated, study_plan

    sources = [
        simulated(k, c, s, sz) for k, c, s, sz in study_plan((kind,), TRAIN_CONDITIONS, studies, subjects_from, size)
    ]
    harmonizer = rules_harmonizer(fit_rules((kind,), size=size)) if harmonize else None
    cands = candidates_of(stored)
    if random:
        mined = random_converted(sources, cands, detector.views, options, harmonizer)
    else:
        update = online_updater(detector, options) if options.update_every else None
        mined = mine(sources, cands, detector_scorer(detector), detector.views, options, harmonizer, update)
    names = [f"{s.kind}/{s.condition}/{s.seed}" for s in sources]
    manifest = manifest_of(options, detector.views, detector.version, kind=kind, random=random, sources=names,
                           harmonized=harmonize)  # fmt: skip
    write_mined(out, mined, manifest)
    x, y = mined.arrays()
    return {"out": str(out), "patches": int(len(y)), "lesion_patches": int(y.sum()),
            "conversions": len(mined.conversions), "online_updates": mined.updates}  # fmt: skip


def _stored_sets(index_path: Path, kind: str, condition: str | None, simulate: int) -> list:
    """The parameter store's sets for ``condition`` (or every condition of ``kind``), after simulating
    ``simulate`` studies into it; a CLI error when there are none."""
    from models.mining import store_simulated
    from models.training.data import HELD_OUT_CONDITIONS
    from storage.index import Index
    from storage.parameters import stored_parameters

    db = Index(index_path)
    try:
        if simulate:
            store_simulated(db, kind, HELD_OUT_CONDITIONS[kind], simulate)
        stored = stored_parameters(db, condition if condition is not None else f"{kind}/*")
    finally:
        db.close()
    if not stored:
        raise fail(f"no stored parameter set for {condition or kind + '/*'}: let the node read studies first"
                   " (or --simulate-store N)")  # fmt: skip
    return stored


def register(app: typer.Typer) -> None:
    """Add ``mine`` to the CLI."""
    app.command("mine")(mine_cmd)
