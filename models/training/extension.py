"""Data extension (seed 000, paragraph 0143): studies of the plentiful reference condition shown as a scarce
condition would show them, by that condition's fitted rule inverted, and added to training for it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from models.training.data import REFERENCE, Study

log = logging.getLogger(__name__)


def inverse_converted(study: Study, rules: dict[str, dict[str, Any]], condition: str) -> Study:
    """Data extension (seed 000, 0143): the study as ``condition`` would show it, by that condition's rule inverted
    (``rules.apply.invert_rule``: reference look → its look), labelled with ``condition``; truth and geometry stay.

    ``rules``: ``fit_rules`` output for the study's size.

    Raises
    ------
    KeyError
        No rule for ``condition``.
    rules.apply.NotInvertible
        The rule folds values and has no inverse.
    """
    from rules.apply import invert_rule

    values = invert_rule(rules[study.kind][condition], study.values)
    return Study(study.kind, condition, study.seed, values, study.geometry, study.modality, study.truth)


def extension_studies(
    study: Study, extend: dict[str, Sequence[str]] | None, rules: dict[str, dict[str, Any]] | None
) -> list[Study]:
    """The inverse-converted copies of a reference-condition study for each scarce condition of its kind in
    ``extend`` (none for another condition, or without ``extend`` or ``rules``)."""
    from rules.apply import NotInvertible

    if not extend or not rules or study.condition != REFERENCE[study.kind]:
        return []
    out = []
    for cond in extend.get(study.kind, ()):
        try:
            out.append(inverse_converted(study, rules, cond))
        except NotInvertible as exc:  # a fitted seed rule with a·c + b < c folds values: no inverse exists
            log.warning("data extension: %s/%s skipped, its rule has no inverse (%s)", study.kind, cond, exc)
    return out
