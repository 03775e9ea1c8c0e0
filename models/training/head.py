"""``harmonode learn fit``: fine-tune the detector's classifier heads on the features nodes exported (seed 004).

An export record holds a finding's penultimate-layer features — the 128-unit embedding of each network of the
ensemble, side by side (``models.features.embed``) — and, when a radiologist assessed it, the changed result.
That is all a head (``MiniVGG.head``, a linear layer on the embedding) needs to be trained further: each
network's head is fitted on its own slice of the vector, the trunk is left as it is (so the features of the
base model stay the features of the new one).

Labels (``label_of``): accepted → the lesion class (what the detector said); rejected → background; modified →
the lesion class when the new kind is a lesion kind (a moved or resized lesion is still one), background
otherwise. A record nobody assessed (exported for its low reliability alone) has no known truth and is left
out. Only records whose model version shares the base's trunk (``feature_versions`` of its card) are used:
other features are another network's.

The fit is full-batch Adam on the cross-entropy, classes weighted to equal total weight, with an L2 pull
toward the base head (``anchor``): the records are the findings over the threshold, not the background the
head also separates, so the head must not wander far from what it was trained to.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from models.detector import CARD_NAME, WEIGHTS_DIR, WEIGHTS_NAME, Detector, read_card, sha256_of
from models.features import decompress_features
from models.findings import LESION_KINDS
from models.training.card import write_card


class HeadFitError(ValueError):
    """Records that cannot train a head (none labelled, one class only, features of another size)."""


class Received(Protocol):
    """A record as the learning server keeps it (``storage.learning.StoredRecord``)."""

    node: str
    record: Mapping[str, Any]


@dataclass(frozen=True)
class Example:
    """One labelled feature vector: its label (1 lesion, 0 background), condition key and source node."""

    vector: np.ndarray
    label: int
    condition_key: str
    node: str
    model_version: str


def label_of(record: Mapping[str, Any]) -> int | None:
    """The class a record teaches (1: lesion, 0: background), or None when nobody assessed it."""
    changed = record.get("changed")
    if not changed:
        return None
    assessment = changed.get("assessment")
    if assessment == "accepted":
        return 1
    if assessment == "rejected":
        return 0
    if assessment == "modified":
        return 1 if changed.get("kind", record["result"].get("kind")) in LESION_KINDS else 0
    return None


def labelled_examples(received: Iterable[Received]) -> tuple[list[Example], int]:
    """The labelled examples among received records, and how many records there were in all."""
    examples, total = [], 0
    for item in received:
        total += 1
        label = label_of(item.record)
        if label is None:
            continue
        vector = decompress_features(base64.b64decode(item.record["features"]))
        examples.append(
            Example(vector, label, str(item.record["condition_key"]), item.node, str(item.record["model_version"]))
        )
    return examples, total


def next_version(version: str) -> str:
    """The version after ``version``: its last number plus one (``1.4.0`` → ``1.4.1``; otherwise ``…-learned``)."""
    head, _, last = version.rpartition(".")
    return f"{head}.{int(last) + 1}" if head and last.isdigit() else f"{version}-learned"


def _fit_head(
    head: torch.nn.Linear, x: np.ndarray, y: np.ndarray, epochs: int, anchor: float, lr: float
) -> tuple[float, float]:
    """Fit one head in place; its weighted cross-entropy before and after."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    counts = np.bincount(y, minlength=2).astype(np.float32)
    weight = torch.from_numpy(counts.sum() / (2.0 * np.maximum(counts, 1.0)))
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    optimiser = torch.optim.Adam(head.parameters(), lr=lr)

    def loss_now() -> torch.Tensor:
        return F.cross_entropy(head(xt), yt, weight=weight)

    with torch.no_grad():
        before = float(loss_now())
    for _ in range(epochs):
        optimiser.zero_grad()
        pull = ((head.weight - w0) ** 2).sum() + ((head.bias - b0) ** 2).sum()
        loss = loss_now() + anchor * pull
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        after = float(loss_now())
    return before, after


def fit_heads(
    received: tuple[Sequence[Example], int],
    out: Path,
    base_dir: Path | None = None,
    version: str = "",
    epochs: int = 200,
    anchor: float = 1e-2,
    seed: int = 0,
    lr: float = 1e-2,
) -> dict[str, Any]:
    """Fit every network's head on the examples and write the new weights and model card to ``out``.

    Parameters
    ----------
    received
        ``labelled_examples`` output: the examples and how many records were read.
    out
        Folder for ``lesion.pt`` (and the ensemble's other files) and ``lesion.json``; made when missing.
    base_dir
        The weights fitted from (default ``models/weights``); checked as the detector checks them.
    version
        The new version (default ``next_version`` of the base's).
    epochs, anchor, seed, lr
        Full-batch Adam steps, the L2 pull toward the base head, the torch seed, the step size.

    Returns
    -------
    dict
        ``version``, ``base_version``, ``card`` (its path) and ``learned_from`` (what the card records).

    Raises
    ------
    HeadFitError
        No usable example, a single class, or features whose length is not the ensemble's.
    WeightsRefused, FileNotFoundError
        Base weights the detector would refuse, or none.
    """
    examples, total = received
    base = Path(base_dir) if base_dir is not None else WEIGHTS_DIR
    detector = Detector.load(device="cpu", weights_dir=base)  # every checksum and the normalisation checked
    _, card = read_card(base, WEIGHTS_NAME, CARD_NAME, "detector")
    base_version = str(card.get("version", "0"))
    compatible = set(card.get("feature_versions", [base_version]))
    used = [e for e in examples if e.model_version in compatible]
    sizes = [m.config.hidden for m in detector.models]
    if not used:
        raise HeadFitError(
            f"none of the {total} record(s) is labelled and made by a model with this trunk "
            f"({sorted(compatible)}): nothing to learn"
        )
    wrong = {len(e.vector) for e in used} - {sum(sizes)}
    if wrong:
        raise HeadFitError(f"records hold {sorted(wrong)} feature values, the ensemble's networks give {sum(sizes)}")
    y = np.array([e.label for e in used], np.int64)
    if len(set(y.tolist())) < 2:
        raise HeadFitError(f"all {len(y)} labelled record(s) teach one class: a head needs both")
    x = np.stack([e.vector for e in used]).astype(np.float32)
    torch.manual_seed(seed)
    files = [base / WEIGHTS_NAME] + [base / str(m["file"]) for m in card.get("members", [])]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    losses = _fit_networks(detector, files, x, y, out, epochs, anchor, lr)
    learned = {
        "records": total,
        "examples": len(used),
        "left_out_unassessed_or_other_trunk": total - len(used),
        "per_class": {"lesion": int(y.sum()), "background": int(len(y) - y.sum())},
        "per_condition": {k: dict(sorted(v.items())) for k, v in _per(used, "condition_key").items()},
        "per_node": {k: dict(sorted(v.items())) for k, v in _per(used, "node").items()},
        "fit": {"epochs": epochs, "anchor": anchor, "lr": lr, "seed": seed, "heads_only": True},
        "loss_before_after": [[round(b, 4), round(a, 4)] for b, a in losses],
    }
    new_version = version or next_version(base_version)
    new_card = _new_card(card, new_version, compatible, learned, [p.name for p in files[1:]], out)
    written = write_card(out / WEIGHTS_NAME, new_card)
    return {"version": new_version, "base_version": base_version, "card": str(written), "learned_from": learned}


def _fit_networks(
    detector: Detector,
    files: Sequence[Path],
    x: np.ndarray,
    y: np.ndarray,
    out: Path,
    epochs: int,
    anchor: float,
    lr: float,
) -> list[tuple[float, float]]:
    """Fit each network's head on its slice of the vectors and write its checkpoint (trunk unchanged) to ``out``;
    each head's loss before and after."""
    losses, start = [], 0
    for model, path in zip(detector.models, files, strict=True):
        hidden = model.config.hidden
        head = copy.deepcopy(model.head).float().cpu()
        losses.append(_fit_head(head, x[:, start : start + hidden], y, epochs, anchor, lr))
        start += hidden
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = dict(ckpt["state_dict"])
        state["head.weight"], state["head.bias"] = head.weight.detach().clone(), head.bias.detach().clone()
        torch.save({**ckpt, "state_dict": state}, out / path.name)
    return losses


def _new_card(
    card: Mapping[str, Any],
    version: str,
    compatible: set[str],
    learned: Mapping[str, Any],
    members: Sequence[str],
    out: Path,
) -> dict[str, Any]:
    """The fitted model's card: the base's without its evaluation (not measured yet), the new version, the
    versions whose features it reads, what it learned from, and the checksums of the members written to ``out``."""
    new_card = {k: v for k, v in card.items() if k not in ("evaluation", "file", "sha256", "size_bytes")}
    new_card.update(
        version=version,
        created=dt.date.today().isoformat(),
        feature_versions=sorted(compatible | {version}),
        learning={"base_version": str(card.get("version", "0")), **learned},
    )
    new_card["members"] = [
        {"file": name, "sha256": sha256_of(out / name), "size_bytes": (out / name).stat().st_size} for name in members
    ]
    return new_card


def _per(examples: Sequence[Example], attribute: str) -> dict[str, Counter[str]]:
    """Counts of lesion / background examples per value of ``attribute`` (a condition key, a node name)."""
    out: dict[str, Counter[str]] = {}
    for e in examples:
        out.setdefault(getattr(e, attribute), Counter())["lesion" if e.label else "background"] += 1
    return out
