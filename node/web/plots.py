"""The console's pictures: a rule's histograms (``rules.plots``) and a model card's held-out evaluation.

matplotlib is the ``plot`` extra: without it the routes answer 404 with what to install, the pages still list.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any


def _curves(evaluation: Mapping[str, Any], prefix: str = "") -> list[tuple[str, list[float], list[float]]]:
    """(label, FP-per-case rates, sensitivities) of every ``sensitivity_at_fp*`` table in an evaluation."""
    out = []
    for key, table in evaluation.items():
        if not key.startswith("sensitivity_at_fp") or not isinstance(table, Mapping):
            continue
        try:
            points = sorted((float(rate), float(value)) for rate, value in table.items())
        except (TypeError, ValueError):
            continue
        if points:
            label = prefix + (key.removeprefix("sensitivity_at_fp").strip("_").replace("_", " ") or "sensitivity")
            out.append((label, [p[0] for p in points], [p[1] for p in points]))
    return out


def card_evaluation_png(card: Mapping[str, Any]) -> bytes:
    """FROC points of a model card's held-out evaluation (with and, where measured, without harmonization).

    Raises
    ------
    LookupError
        The card has no evaluation with sensitivity tables.
    ImportError
        matplotlib is not installed.
    """
    evaluation = card.get("evaluation")
    if not isinstance(evaluation, Mapping):
        raise LookupError(f"card {card.get('version', '?')} has no held-out evaluation")
    curves = _curves(evaluation)
    raw = evaluation.get("without_harmonization")
    if isinstance(raw, Mapping):
        curves += _curves(raw, "without harmonization: ")
    if not curves:
        raise LookupError(f"card {card.get('version', '?')} has no sensitivity tables")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for label, rates, values in curves:
        ax.plot(rates, values, marker="o", lw=1.2, ls="--" if label.startswith("without") else "-", label=label)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per case")
    ax.set_ylabel("sensitivity")
    rule = evaluation.get("hit_rule")
    ax.set_title(
        f"{card.get('name', 'model')} {card.get('version', '')}: held-out FROC"
        + (f"\n{str(rule)[:110]}" if rule else ""),
        fontsize=8,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
