"""``harmonode harmonize`` (a series folder in, its harmonized copy out) and ``harmonode train residual``.

``harmonize`` runs the node's own two harmonization stages (``node.pipeline.harmonize`` and ``residual``)
on one series read from a folder, writes the derived series (``handlers.results.derived``) and, on request,
a before / after / difference picture of its middle slice for a person to judge.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from node.cli import ConfigOption, fail, load_or_fail

log = logging.getLogger(__name__)


def _series_from(folder: Path) -> list[Any]:
    """The instances of the one image series in ``folder`` (recursively), or a CLI error."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    datasets = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            datasets.append(dcmread(path))
        except (InvalidDicomError, OSError):
            continue
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if not datasets:
        raise fail(f"no DICOM file in {folder}")
    if len(series) > 1:
        raise fail(f"{folder} holds {len(series)} series; give a folder of one series")
    return datasets


def _rule(config: Path | None, rule_ref: str | None, datasets: list[Any]) -> tuple[Any, str]:
    """The rule to apply: ``--rule`` from the node's registry, else the series' lookup, else none.

    The registry is the node's (``--config``); without a config and without a data directory at the
    default place, the series gets no histogram rule (the residual stage may still run).
    """
    from node.pipeline import condition_key, find_rule
    from rules.registry import RuleRegistry, UnknownRule
    from storage.meta import instance_meta_from_dataset
    from storage.store import open_store

    cfg = load_or_fail(config)
    if rule_ref is None and not cfg.data_path.exists():
        return None, f"no conversion rule (no node data at {cfg.data_path})"
    with open_store(cfg.data_path, cfg.store_settings) as store:
        registry = RuleRegistry(store.index.db, store.index.lock)
        if rule_ref:
            try:
                rule = registry.get(rule_ref)
            except UnknownRule as exc:
                raise fail(str(exc)) from exc
            return rule, f"{rule.label} (given)"
        key = condition_key(instance_meta_from_dataset(datasets[0]).extra, str(datasets[0].get("Modality", "")))
        match = find_rule(registry, key)
        return match.rule, f"{match.rule_id} ({match.match}) for {key}"


def _window(image: np.ndarray, modality: str) -> tuple[float, float]:
    if modality == "CT":
        return -160.0, 240.0  # a brain / soft-tissue window (W400 L40)
    lo, hi = np.percentile(image, (1, 99.5))
    return float(lo), float(hi)


def preview_png(before: np.ndarray, after: np.ndarray, modality: str, out: Path) -> None:
    """Before | after | difference (after − before, mid-grey is 0, ±10 % of the window) side by side."""
    from PIL import Image, ImageDraw

    lo, hi = _window(before, modality)

    def grey(a: np.ndarray) -> np.ndarray:
        return (np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)

    span = 0.1 * (hi - lo)
    diff = (np.clip((after - before) / span, -1, 1) * 127 + 128).astype(np.uint8)
    tiles = [grey(before), grey(after), diff]
    canvas = Image.new("L", (before.shape[1] * 3 + 20, before.shape[0] + 24), 0)
    draw = ImageDraw.Draw(canvas)
    for i, (tile, label) in enumerate(zip(tiles, ("before", "after", "difference"), strict=True)):
        x = i * (before.shape[1] + 10)
        canvas.paste(Image.fromarray(tile), (x, 24))
        draw.text((x + 4, 4), label, fill=255)
    canvas.save(out)


def harmonize_cmd(
    in_dir: Annotated[Path, typer.Option("--in", help="Folder holding one series (searched recursively).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the harmonized series (created).")],
    rule_ref: Annotated[
        str | None, typer.Option("--rule", help="Rule id or id@vN (default: the series' own lookup).")
    ] = None,
    blur: Annotated[float | None, typer.Option(help="α_blur (default: the rule's residual stage, else none).")] = None,
    noise: Annotated[float | None, typer.Option(help="α_noise (default: the rule's residual stage).")] = None,
    preview: Annotated[Path | None, typer.Option(help="PNG: before / after / difference, middle slice.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda …")] = "auto",
    weights: Annotated[Path | None, typer.Option(help="Residual weights folder (default: the shipped).")] = None,
    config: ConfigOption = None,
) -> None:
    """Harmonize one series from a folder: histogram rule, then the residual stage; write a derived series."""
    from handlers.results.derived import derived_series
    from models.volume import VolumeRefused, build_volume
    from node.pipeline import harmonize

    datasets = _series_from(in_dir)
    try:
        volume = build_volume(datasets)
    except VolumeRefused as exc:
        raise fail(f"cannot harmonize this series: {exc}") from exc
    rule, label = _rule(config, rule_ref, datasets)
    values = harmonize(volume, rule)
    current = rule.residual if rule is not None else None
    stage_text = "no residual stage"
    if blur is not None or noise is not None or current is not None:
        values, stage_text = _residual(values, volume, current, blur, noise, device, weights)
    derived = derived_series(volume.datasets, rule, f"{label}, {stage_text}", values=values)
    out_dir.mkdir(parents=True, exist_ok=True)
    for ds in derived:
        ds.save_as(out_dir / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    if preview is not None:
        k = len(values) // 2
        preview_png(volume.values[k], values[k], volume.modality, preview)
    typer.echo(f"{len(derived)} instance(s) written to {out_dir}: {label}; {stage_text}")


def _residual(
    values: np.ndarray,
    volume: Any,
    current: Any,
    blur: float | None,
    noise: float | None,
    device: str,
    weights: Path | None,
) -> tuple[np.ndarray, str]:
    """The residual stage with the given strengths (the rule's where one is not given)."""
    from models.detector import WeightsRefused
    from models.residual import residual_stage
    from models.residual_net import ResidualModel
    from rules.strengths import ResidualStage, StageError

    try:
        model = ResidualModel.load(device, weights)
    except (FileNotFoundError, WeightsRefused) as exc:
        raise fail(f"{exc} (train one with `harmonode train residual`)") from exc
    try:
        stage = ResidualStage(
            blur if blur is not None else (current.alpha_blur if current else 0.0),
            noise if noise is not None else (current.alpha_noise if current else 0.0),
            model.version,
        )
    except StageError as exc:
        raise fail(str(exc)) from exc
    outcome = residual_stage(values, volume.geometry, volume.modality, stage, model, None, ("", ""))
    if not outcome.applied:
        raise fail(f"the residual stage cannot take this series: {outcome.reason}")
    return outcome.values, stage.text


def train_residual_cmd(
    out: Annotated[Path, typer.Option(help="Folder for residual.pt and its card residual.json.")] = (
        Path(__file__).resolve().parents[2] / "models" / "weights"
    ),
    steps_ct: Annotated[int, typer.Option(help="Training steps of the CT network.")] = 3000,
    steps_mr: Annotated[int, typer.Option(help="Training steps of the MR network.")] = 1200,
    batch: Annotated[int, typer.Option()] = 16,
    patch: Annotated[int, typer.Option(help="Patch side in pixels (a multiple of 4).")] = 80,
    width: Annotated[int, typer.Option(help="Channels at full resolution (×2, ×4 below).")] = 12,
    lr: Annotated[float, typer.Option(help="Peak learning rate (one-cycle).")] = 2e-3,
    seed: Annotated[int, typer.Option()] = 0,
    mse_ct: Annotated[float, typer.Option(help="Weight of the squared-error term beside L1, CT network.")] = 10.0,
    mse_mr: Annotated[float, typer.Option(help="Weight of the squared-error term beside L1, MR network.")] = 0.0,
    ct_blur: Annotated[
        str, typer.Option(help="CT's blur map: joint (the joint network's) or denoised (on the denoised input).")
    ] = "joint",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda …")] = "auto",
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch default).")] = 2,
) -> None:
    """Train the residual networks (seed 003) on the synthetic scanner's pairs; write weights and card."""
    import torch
    from tqdm import tqdm

    from models.training.residual import ResidualRecipe, train_residual

    if ct_blur not in ("joint", "denoised"):
        raise fail(f"--ct-blur is joint or denoised, got {ct_blur!r}")
    if patch % 4:
        raise fail(f"--patch must be a multiple of 4, got {patch}")
    if threads > 0:
        torch.set_num_threads(threads)
    recipe = ResidualRecipe(steps_ct, steps_mr, batch, patch, 4, width, lr, seed, mse_ct, mse_mr, ct_blur)
    bars: dict[str, tqdm] = {}

    def progress(modality: str, step: int, steps: int, loss: float) -> None:
        if modality not in bars:
            bars[modality] = tqdm(total=steps, desc=f"residual {modality}", unit="step")
        bar = bars[modality]
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    card = train_residual(out, recipe, device, progress)
    for bar in bars.values():
        bar.close()
    typer.echo(f"residual model {card['version']} written to {out}")
    for name, fig in card["held_out"]["figures"].items():
        typer.echo(f"  {name:28s} RMSE {fig['rmse_before']:8.2f} → {fig['rmse_after']:8.2f}")


def register(app: typer.Typer) -> None:
    """Add ``harmonize`` to the CLI (``train residual`` is added by ``node.cli.models``)."""
    app.command("harmonize")(harmonize_cmd)
