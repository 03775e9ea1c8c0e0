"""The console's pictures over the real server: a rule's histograms and a model card's held-out FROC."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rules.histogram import CT_SPEC
from rules.keys import ConditionKey
from rules.registry import RuleRegistry
from webnode import logged_in, web_node

PNG = b"\x89PNG\r\n\x1a\n"
KEY = ConditionKey.parse("CT|ge|optima-ct660|bone|ctdi5-15|100kv|head")


def test_rules_and_model_cards_show_their_pictures(tmp_path: Path) -> None:
    with web_node(tmp_path / "node", roles=("listen",)) as node:
        n = len(CT_SPEC.centers)
        group = np.exp(-(((np.arange(n) - n * 0.4) / (n * 0.05)) ** 2)) + 1e-4
        reference = np.exp(-(((np.arange(n) - n * 0.45) / (n * 0.05)) ** 2)) + 1e-4
        hists = {"group": group.tolist(), "reference": reference.tolist()}
        provenance = {"spec": CT_SPEC.as_dict(), "histograms": hists}
        registry = RuleRegistry(node.index.db, node.index.lock)
        drawn = registry.add(KEY, "seed", {"a": 1.0, "b": 10.0, "c": 300.0}, provenance, activate=True)
        bare = registry.add(KEY, "identity", {}, {"n_images": 3})
        admin = logged_in(node, "ada")
        page = admin.get("/rules").text
        assert f"/rules/{drawn.id}/v{drawn.version}/histograms.png" in page
        assert f"/rules/{bare.id}/v{bare.version}/histograms.png" not in page  # not active, no histograms: no picture
        png = admin.get(f"/rules/{drawn.id}/v{drawn.version}/histograms.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content.startswith(PNG)
        assert len(png.content) > 5000
        assert admin.get(f"/rules/{bare.id}/v{bare.version}/histograms.png").status_code == 404
        assert admin.get(f"/rules/{drawn.id}/v{drawn.version + 5}/histograms.png").status_code == 404
        models = admin.get("/models").text
        assert "/models/lesion/evaluation.png" in models
        froc = admin.get("/models/lesion/evaluation.png")
        assert froc.status_code == 200 and froc.content.startswith(PNG)
        assert admin.get("/models/residual/evaluation.png").status_code == 404  # its card has no FROC
        assert admin.get("/models/..%2Flesion/evaluation.png").status_code == 404
