"""``harmonode learn fit``: the detector's heads fine-tuned on the records a learning server kept, written as a new
model version whose card is checksummed (the detector loads it) and says what it learned from (counts per
condition and node, nothing else). Records are made by the node's own ``build_record`` and kept through the
server's own store; their features are the shipped networks' real embeddings of patches."""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner

from models.detector import Detector
from models.features import compress_features
from models.training.head import label_of
from node.cli import app as cli
from storage.exports import ExportTrigger, build_record
from storage.learning import RecordStore

CONDITIONS = ("CT|siemens|hr64|chest", "CT|ge|bone|chest")


def _vectors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the shipped ensemble for ``n`` random patches, and a label that a head can learn from
    them (a direction in the embedding the base heads do not use)."""
    detector = Detector.load(device="cpu")
    g = torch.Generator().manual_seed(seed)
    patches = torch.rand((n, detector.models[0].config.in_channels, 32, 32), generator=g) * 2.0 - 0.5
    from models.features import embed

    vectors, _ = embed(detector.models, patches.numpy())
    score = vectors[:, :128].sum(axis=1)
    labels = (score > np.median(score)).astype(int)
    return vectors, labels


def _record(vector: np.ndarray, label: int, condition: str, assessment: str | None) -> dict:
    changed = None
    if assessment == "verdict":
        changed = {"assessment": "accepted" if label else "rejected", "kind": "nodule", "diameter_mm": 6.0}
    return build_record(
        ExportTrigger.FEEDBACK if changed else ExportTrigger.LOW_RELIABILITY,
        compress_features(vector),
        len(vector),
        "float16+zlib",
        {"kind": "nodule", "probability": 0.5, "diameter_mm": 6.0},
        changed,
        0.1,
        "1.4.0",
        condition,
    )


def test_labels_follow_the_radiologist():
    base = {"result": {"kind": "nodule"}}
    assert label_of({**base, "changed": None}) is None
    assert label_of({**base, "changed": {"assessment": "accepted"}}) == 1
    assert label_of({**base, "changed": {"assessment": "rejected"}}) == 0
    assert label_of({**base, "changed": {"assessment": "modified", "kind": "aneurysm"}}) == 1


def test_fit_writes_a_new_checksummed_version_that_learned_from_the_records(tmp_path):
    vectors, labels = _vectors(48, seed=3)
    with RecordStore(tmp_path / "learn") as store:
        for node in ("site-a", "site-b"):
            store.add_node(node)
        for n, (v, y) in enumerate(zip(vectors, labels, strict=True)):
            node = "site-a" if n % 3 else "site-b"
            store.add(node, f"{n:032x}", _record(v, int(y), CONDITIONS[n % 2], "verdict"))
        store.add("site-a", "f" * 32, _record(vectors[0], 1, CONDITIONS[0], None))  # unassessed: left out
    out = tmp_path / "fitted"
    result = CliRunner().invoke(
        cli, ["learn", "fit", "--data", str(tmp_path / "learn"), "--out", str(out), "--epochs", "300", "--json"]
    )
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.output)
    assert outcome["version"] == "1.4.1" and outcome["base_version"] == "1.4.0"
    card = json.loads((out / "lesion.json").read_text())
    learned = card["learning"]
    assert learned["records"] == 49 and learned["examples"] == 48
    assert set(learned["per_condition"]) == set(CONDITIONS)
    assert sum(learned["per_node"]["site-a"].values()) == 32 and sum(learned["per_node"]["site-b"].values()) == 16
    assert "evaluation" not in card and card["feature_versions"] == ["1.4.0", "1.4.1"]
    text = json.dumps(card)
    assert "f" * 32 not in text and "0" * 31 + "1" not in text  # no record key (nothing that links a record)
    base, fitted = Detector.load(device="cpu"), Detector.load(device="cpu", weights_dir=out)  # checksums hold
    assert fitted.version == "1.4.1"
    x = torch.from_numpy(vectors)
    for n, (old, new) in enumerate(zip(base.models, fitted.models, strict=True)):
        for name, value in old.state_dict().items():
            same = torch.equal(value, new.state_dict()[name])
            assert same == (not name.startswith("head.")), name  # the trunk kept, every head fitted
        part = x[:, 128 * n : 128 * (n + 1)]
        before = torch.softmax(old.head(part), 1)[:, 1].detach().numpy()
        after = torch.softmax(new.head(part), 1)[:, 1].detach().numpy()
        gap = lambda p: p[labels == 1].mean() - p[labels == 0].mean()  # noqa: E731
        assert gap(after) > gap(before) + 0.05, (gap(before), gap(after))


def test_fit_refuses_records_that_teach_nothing(tmp_path):
    vectors, _ = _vectors(4, seed=1)
    with RecordStore(tmp_path / "learn") as store:
        store.add_node("site-a")
        for n, v in enumerate(vectors):
            store.add("site-a", f"{n:032x}", _record(v, 0, CONDITIONS[0], None))
    result = CliRunner().invoke(cli, ["learn", "fit", "--data", str(tmp_path / "learn"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "nothing to learn" in result.output
    assert not (tmp_path / "o" / "lesion.json").exists()
