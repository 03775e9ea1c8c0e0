"""``harmonode simulate``: write synthetic studies (and optionally push them over C-STORE, or preview them).

The scanner is ``simulator.studies``; this module checks the options, writes the studies into ``--out``
all or none (through a staging folder beside it), previews and pushes them.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from node.cli import fail
from simulator import studies as simulate
from simulator.studies import CONDITIONS, KINDS, ScannerCondition, SimulationError

log = logging.getLogger(__name__)

ConditionOption = Annotated[
    list[str] | None, typer.Option("--condition", help="Condition name (repeatable; default: all, cycled).")
]
ConditionsFileOption = Annotated[
    Path | None, typer.Option("--conditions-file", help="TOML with one \\[conditions.NAME] table per condition.")
]
SizeOption = Annotated[
    str,
    typer.Option(
        "--size",
        help="test (small, fast), eval (head 256² at 0.85 mm: what the detector is measured on) "
        "or full (512², 200–300 slices).",
    ),
]
LesionOption = Annotated[
    list[float] | None, typer.Option("--lesion-mm", help="Fixed lesion diameter in mm (repeatable).")
]
PreviewOption = Annotated[bool, typer.Option("--preview", help="Also write preview PNGs with lesions circled.")]


def _plan(
    kind: str, names: list[str], studies: int, extra: dict[str, ScannerCondition]
) -> list[tuple[int, ScannerCondition]]:
    """Which condition each study gets; every name is checked before anything is written."""
    want = "MR" if kind == "head-mra" else "CT"
    if not names:
        names = [n for n, c in {**CONDITIONS, **extra}.items() if c.modality == want]
    conds = [simulate.resolve_condition(n, kind, extra) for n in names]
    return [(i, conds[i % len(conds)]) for i in range(studies)]


def _parse_peer(send: str) -> tuple[str, int]:
    host, _, port = send.rpartition(":")
    if not host or not port.isdigit() or not (0 < int(port) < 65536):
        raise SimulationError(f"--send wants HOST:PORT, got {send!r}")
    return host, int(port)


def write_preview(study: simulate.SimulatedStudy, path: Path, n_slices: int = 3) -> Path:
    """A PNG of a few axial slices (through the lesions when there are any), lesions circled in red.

    Parameters
    ----------
    study
        A study simulated with ``keep_arrays=True``.
    path
        PNG to write.
    n_slices
        Panels in the row.

    Returns
    -------
    Path
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = study.values
    assert values is not None, "simulate with keep_arrays=True for a preview"
    geo = study.truth["geometry"]
    (dz, dy, dx), (z0, y0, x0) = geo["spacing"], geo["origin"][::-1]
    lesions = study.truth["lesions"]
    ks = [int(round((les["center_mm"][2] - z0) / dz)) for les in lesions][:n_slices]
    ks += [int(values.shape[0] * f) for f in (0.35, 0.5, 0.65)][: max(0, n_slices - len(ks))]
    ct = study.truth["condition_fields"]["modality"] == "CT"
    lo, hi = (
        (-200, 600)
        if ct and study.truth["kind"] == "head-cta"
        else (-1200, 400)
        if ct
        else (0, np.percentile(values, 99.8))
    )
    fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 4.3), dpi=110)
    for ax, k in zip(np.atleast_1d(axes), ks, strict=False):
        k = min(max(k, 0), values.shape[0] - 1)
        ax.imshow(
            values[k],
            cmap="gray",
            vmin=lo,
            vmax=hi,
            extent=(x0, x0 + dx * values.shape[2], y0 + dy * values.shape[1], y0),
        )
        for les in lesions:
            if abs(les["center_mm"][2] - (z0 + k * dz)) < les["diameter_mm"] / 2 + dz:
                r = les["diameter_mm"] / 2 + 4
                ax.add_patch(plt.Circle(les["center_mm"][:2], r, fill=False, color="red", lw=1.2))
        ax.set_title(f"z = {z0 + k * dz:.1f} mm", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{study.truth['kind']} · {study.truth['condition']} · seed {study.truth['seed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _conditions_table(extra: dict[str, ScannerCondition]) -> str:
    lines = []
    for name, c in {**CONDITIONS, **extra}.items():
        detail = (
            f"{c.kernel} {c.kvp:g} kVp {c.mas:g} mAs" if c.modality == "CT" else f"{c.field_strength:g} T {c.sequence}"
        )
        lines.append(f"{name:28s} {c.modality}  {c.manufacturer} {c.model}  {detail}")
    return "\n".join(lines)


def _write_studies(
    plan: list[tuple[int, ScannerCondition]],
    out: Path,
    kind: str,
    seed: int,
    size: str,
    options: dict[str, Any],
    preview: bool,
) -> list[Path]:
    """Simulate and write every study of ``plan`` into ``out`` (one folder each), all or none.

    The studies are written into a staging folder beside ``out`` and moved in once all are written;
    a folder of the same name already in ``out`` is replaced.

    Raises
    ------
    SimulationError
        A study cannot be simulated (nothing is left in ``out``).
    """
    from tqdm import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        written: list[Path] = []
        for i, cond in tqdm(plan, desc="studies", unit="study", disable=len(plan) < 2):
            study = simulate.simulate_study(kind, cond, seed + i, size, **options, keep_arrays=preview)
            folder = staging / f"{kind}-{seed + i:06d}-{cond.name}"
            simulate.write_study(study, folder)
            if preview:
                write_preview(study, folder / "preview.png")
            written.append(folder)
        out.mkdir(parents=True, exist_ok=True)
        for folder in written:
            target = out / folder.name
            if target.exists():
                shutil.rmtree(target)
            folder.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / folder.name for folder in written]


def register(app: typer.Typer) -> None:
    """Add the ``simulate`` command to the harmonode CLI."""

    @app.command("simulate")
    def simulate_command(
        out: Annotated[Path | None, typer.Option("--out", help="Directory for the studies (one folder each).")] = None,
        studies: Annotated[int, typer.Option("--studies", min=1, help="How many studies.")] = 1,
        kind: Annotated[str, typer.Option("--kind", help=f"One of {', '.join(KINDS)}.")] = "head-cta",
        condition: ConditionOption = None,
        conditions_file: ConditionsFileOption = None,
        seed: Annotated[int, typer.Option("--seed", help="First subject seed; study i uses seed + i.")] = 0,
        size: SizeOption = "full",
        lesion_mm: LesionOption = None,
        spacing: Annotated[float | None, typer.Option("--spacing", help="In-plane pixel spacing, mm.")] = None,
        thickness: Annotated[float | None, typer.Option("--slice-thickness", help="Slice thickness, mm.")] = None,
        send: Annotated[str | None, typer.Option("--send", help="Push each study over C-STORE to HOST:PORT.")] = None,
        aet: Annotated[str, typer.Option("--aet", help="Called AE title for --send.")] = "HARMONODE",
        preview: PreviewOption = False,
        list_: Annotated[bool, typer.Option("--list", help="List the conditions and exit.")] = False,
    ) -> None:
        """Write synthetic CT/MRA studies with known lesions under named scanner conditions."""
        logging.basicConfig(level=logging.WARNING)
        options: dict[str, Any] = {"lesion_diameters_mm": lesion_mm, "spacing_mm": spacing}
        options |= {"slice_thickness_mm": thickness}
        try:
            extra = simulate.load_conditions(conditions_file) if conditions_file else {}
            if list_:
                typer.echo(_conditions_table(extra))
                return
            if out is None:
                raise SimulationError("--out DIR is required")
            plan = _plan(kind, list(condition or []), studies, extra)
            peer = _parse_peer(send) if send else None
            # check geometry and lesions before writing anything: a one-slice dry run of the first study
            simulate.simulate_study(
                kind, plan[0][1], seed, size, **options, slices=1, matrix=16, extra_conditions=extra
            )
            written = _write_studies(plan, out, kind, seed, size, {**options, "extra_conditions": extra}, preview)
        except SimulationError as exc:
            raise fail(str(exc)) from exc
        if peer:
            try:
                total = sum(simulate.send_files(sorted(f.glob("*.dcm")), peer[0], peer[1], aet) for f in written)
            except ConnectionError as exc:
                raise fail(f"{exc} (is the node listening, is the AE title {aet!r} right?)") from exc
            typer.echo(f"sent {total} instances to {aet}@{send}")
        typer.echo(f"wrote {len(written)} studies to {out}")
