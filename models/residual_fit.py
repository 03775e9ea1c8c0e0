"""Proposing a rule's residual strengths from the series it was fitted on (``harmonode rules fit``).

For each fitted rule: the condition's series go through the rule's histogram stage and the residual network
(the central slices of a few series), the reference condition's series are measured as they are, and
``rules.strengths.propose_strengths`` picks α_blur, then α_noise, so the condition's edge width (10–90 %)
and noise level (std in uniform tissue) match the reference's. The network runs once per series; the
strength search is arithmetic on its maps. The reference condition itself gets no residual stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.residual import CENTRAL_SLICES, ResidualRefused, central_slices, check_takes
from models.volume import Volume
from rules.apply import apply_rule
from rules.quality import QualityError, edge_width_mm, noise_std
from rules.registry import Rule
from rules.strengths import Proposal, ResidualStage, Sample, propose_strengths

log = logging.getLogger(__name__)

#: Central slices per series the proposal reads, and series per condition (enough for stable figures).
SLICES = CENTRAL_SLICES
SERIES_PER_CONDITION = 3


@dataclass(frozen=True)
class StageProposal:
    """A proposed residual stage for one rule, with the figures it reaches, or why none was proposed."""

    rule: Rule
    stage: ResidualStage | None
    proposal: Proposal | None = None
    reason: str = ""


def central(volume: Volume, slices: int = SLICES) -> tuple[np.ndarray, tuple[float, float]]:
    """The central ``slices`` slices of a volume's values and its in-plane spacing."""
    return central_slices(volume.values, slices), tuple(volume.geometry.spacing[1:])  # type: ignore[return-value]


def reference_figures(volumes: Iterable[Volume]) -> tuple[float, float]:
    """The reference condition's mean noise std and edge width over its series (central slices; the edge
    width is NaN when no series shows the body outline).

    Raises
    ------
    QualityError
        No series could be measured.
    """
    noise, edge = [], []
    for volume in volumes:
        values, spacing = central(volume)
        try:
            noise.append(noise_std(values, volume.modality, spacing))
        except QualityError as exc:
            log.warning("a reference series' noise could not be measured: %s", exc)
            continue
        try:
            edge.append(edge_width_mm(values, spacing, volume.modality))
        except QualityError as exc:  # no outline in the field of view: strengths for the noise only
            log.info("a reference series' edge width could not be measured: %s", exc)
    if not noise:
        raise QualityError("no series of the reference condition could be measured")
    return float(np.mean(noise)), float(np.mean(edge)) if edge else float("nan")


def sample_of(volume: Volume, rule: Rule, model: Any) -> Sample:
    """One series for the search: central slices through the histogram stage, and their residual maps."""
    values, spacing = central(volume)
    values = apply_rule(rule, values)
    check_takes(values, volume.geometry, volume.modality)
    maps = model.maps(values, volume.geometry, volume.modality)
    return Sample(values, maps.blur, maps.noise, spacing, volume.modality)


def propose_stage(rule: Rule, condition: Sequence[Volume], reference: Sequence[Volume], model: Any) -> StageProposal:
    """The residual stage that brings ``rule``'s condition to the reference's noise level and sharpness."""
    if rule.provenance.get("reference"):
        return StageProposal(rule, None, reason="the reference condition: nothing to bring to it")
    try:
        samples = [sample_of(v, rule, model) for v in condition[:SERIES_PER_CONDITION]]
        noise_ref, edge_ref = reference_figures(reference[:SERIES_PER_CONDITION])
        proposal = propose_strengths(samples, noise_ref, edge_ref, noise_std, edge_width_mm)
    except (ResidualRefused, QualityError, ValueError) as exc:
        return StageProposal(rule, None, reason=str(exc))
    stage = ResidualStage(round(proposal.alpha_blur, 3), round(proposal.alpha_noise, 3), model.version)
    return StageProposal(rule, stage, proposal)


def propose_stages(
    rules: Sequence[Rule],
    series_keys: Mapping[str, Sequence[str]],
    load_volume: Callable[[str], Volume | None],
    model: Any,
    progress: Callable[[Iterable[Rule], str, str], Iterable[Rule]] = lambda items, desc, unit: items,
) -> list[StageProposal]:
    """Proposals for freshly fitted rules.

    Parameters
    ----------
    rules
        The rules just stored (each names its ``reference_key`` in its provenance).
    series_keys
        Condition key → the series UIDs of that condition the rules were fitted on.
    load_volume
        Series UID → its volume (None when it cannot be built).
    model
        The residual model (``models.residual_net.ResidualModel``).
    progress
        Wraps the iteration over rules.

    Returns
    -------
    list[StageProposal]
        One per rule, with the stage or the reason there is none.
    """
    volumes: dict[str, list[Volume]] = {}

    def of(key: str) -> list[Volume]:
        if key not in volumes:
            loaded = (load_volume(uid) for uid in list(series_keys.get(key, ()))[:SERIES_PER_CONDITION])
            volumes[key] = [v for v in loaded if v is not None]
        return volumes[key]

    out = []
    for rule in progress(rules, "residual strengths", "rule"):
        reference = str(rule.provenance.get("reference_key", ""))
        if not of(str(rule.key)) or (not rule.provenance.get("reference") and not of(reference)):
            out.append(StageProposal(rule, None, reason="no series with a volume for the condition or its reference"))
            continue
        out.append(propose_stage(rule, of(str(rule.key)), of(reference), model))
    return out
