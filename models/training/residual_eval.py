"""The residual stage in the detector's evaluation: strengths per condition, and a study through the stage.

``harmonode evaluate --residual`` reads every held-out study after histogram rules *and* the residual stage,
beside histogram rules alone, to show what the second stage does to detection. The strengths of each
condition are proposed as ``harmonode rules fit`` proposes them (``rules.strengths.propose_strengths``), on
studies of the rules' subjects (``SEEDS["rules"]``), never on the evaluated ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from models.residual import central_slices, residual_stage
from models.training.data import REFERENCE, SEEDS, Study, harmonized, rules_for, simulated
from rules.quality import edge_width_mm, noise_std
from rules.strengths import Proposal, ResidualStage, Sample, propose_strengths

log = logging.getLogger(__name__)

STUDIES = 2


@dataclass(frozen=True)
class ResidualPlan:
    """The residual model and each (kind, condition)'s proposed stage (picklable: sent to worker processes)."""

    model: Any
    stages: Mapping[str, Mapping[str, ResidualStage]]
    proposals: Mapping[str, Mapping[str, dict[str, float]]]

    def stage_for(self, kind: str, condition: str) -> ResidualStage | None:
        """The stage of a condition (None: the reference, or none proposed)."""
        return self.stages.get(kind, {}).get(condition)


def _central(study: Study) -> Study:
    return Study(**{**study.__dict__, "values": central_slices(study.values)})


def propose_for(
    kind: str, condition: str, size: str, rules: dict | None, model: Any
) -> tuple[ResidualStage, Proposal]:
    """The stage of one condition from ``STUDIES`` studies of it and of its kind's reference."""
    subjects = [SEEDS["rules"] + 700 + i for i in range(STUDIES)]
    spacing = None
    samples = []
    for seed in subjects:
        study = _central(harmonized(simulated(kind, condition, seed, size), rules_for(rules, size)))
        maps = model.maps(study.values, study.geometry, study.modality)
        spacing = tuple(study.geometry.spacing[1:])
        samples.append(Sample(study.values, maps.blur, maps.noise, spacing, study.modality))
    refs = [_central(simulated(kind, REFERENCE[kind], seed, size)) for seed in subjects]
    noise_ref = sum(noise_std(r.values, r.modality, spacing) for r in refs) / len(refs)
    edge_ref = sum(edge_width_mm(r.values, spacing, r.modality) for r in refs) / len(refs)
    proposal = propose_strengths(samples, noise_ref, edge_ref, noise_std, edge_width_mm)
    return ResidualStage(round(proposal.alpha_blur, 3), round(proposal.alpha_noise, 3), model.version), proposal


def residual_plan(
    model: Any, conditions: Iterable[tuple[str, str]], size: str, rules: dict | None
) -> ResidualPlan:
    """Proposed stages for every (kind, condition) except each kind's reference."""
    stages: dict[str, dict[str, ResidualStage]] = {}
    proposals: dict[str, dict[str, dict[str, float]]] = {}
    for kind, condition in sorted(set(conditions)):
        if condition == REFERENCE[kind]:
            continue
        stage, proposal = propose_for(kind, condition, size, rules, model)
        stages.setdefault(kind, {})[condition] = stage
        proposals.setdefault(kind, {})[condition] = proposal.as_dict()
        log.info("%s %s: %s", kind, condition, stage.text)
    return ResidualPlan(model, stages, proposals)


def with_residual(study: Study, plan: ResidualPlan | None) -> Study:
    """The (histogram-harmonized) study through its condition's residual stage; unchanged without one."""
    stage = plan.stage_for(study.kind, study.condition) if plan is not None else None
    if stage is None:
        return study
    outcome = residual_stage(study.values, study.geometry, study.modality, stage, plan.model, None, ("", ""))
    if not outcome.applied:
        log.warning("%s %s: residual stage not applied: %s", study.kind, study.condition, outcome.reason)
    return Study(**{**study.__dict__, "values": outcome.values})
