"""Pictures of a rule: its group histogram before and after conversion, over the reference histogram.

Used by ``harmonode rules show --plot`` and the console's rules page. matplotlib is imported when a picture
is drawn (the ``plot`` extra); a node without it serves its rules without pictures.
"""

from __future__ import annotations

import io

import numpy as np

from rules.registry import Rule


class NoHistograms(ValueError):
    """The rule was stored without its fitting histograms (nothing to draw)."""


def rule_histograms_png(rule: Rule) -> bytes:
    """PNG of a rule's group histogram before and after conversion, over the reference histogram.

    Raises
    ------
    NoHistograms
        The rule carries no histograms.
    ImportError
        matplotlib is not installed (``pip install 'harmonode[plot]'``).
    """
    hists = rule.provenance.get("histograms")
    if not hists:
        raise NoHistograms(f"rule {rule.label} was stored without its histograms")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rules.fit import transform_histogram
    from rules.histogram import HistogramSpec, normalize

    spec = HistogramSpec.from_dict(rule.provenance.get("spec", {}))
    group, ref = np.asarray(hists["group"], float), np.asarray(hists["reference"], float)
    after = transform_histogram(group, spec, rule.mapping)
    x = spec.centers
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    ax.plot(x, normalize(ref), color="black", lw=1.2, label="reference")
    ax.plot(x, normalize(group), color="tab:red", lw=1.0, alpha=0.8, label="before")
    ax.plot(x, after, color="tab:blue", lw=1.0, label="after")
    if rule.method == "seed":
        ax.axvline(rule.parameters["c"], color="grey", ls=":", label=f"c = {rule.parameters['c']:.0f}")
    ax.set_yscale("log")
    ax.set_ylim(1e-6, None)
    ax.set_xlabel("value (HU for CT)")
    ax.set_ylabel("fraction of pixels")
    p = rule.provenance
    ax.set_title(
        f"{rule.label} {rule.method}: {rule.key}\nsimilarity {p.get('similarity_before', 0):.4f} → "
        f"{p.get('similarity_after', 0):.4f} to {p.get('reference_key', '?')}",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
