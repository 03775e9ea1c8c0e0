"""Caches of the held-out evaluation: the detector's candidates per study, and the simulated studies.

``harmonode evaluate --save-candidates DIR`` writes what the detector made of every study of every reading
(``evaluate.StudyCandidates``: candidate positions, blob sizes, probabilities, patch labels, the lesions, the
geometry) as one ``.npz`` per study beside a ``manifest.json``; ``--from-candidates DIR`` reads them back and
counts the figures again (another hit rule, NMS radius or position refinement) in seconds, without the simulator
or the network. The patches themselves are not kept (a few hundred MB per study); their probabilities are.

``cached_simulation`` keeps each simulated study (``(kind, condition, seed, size)``) in a folder so repeated
evaluations simulate it once; ``cached_rules`` does the same for the fitted rules. Both are pickles the tool
wrote itself: point them only at folders of your own.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.training.data import Study, fit_rules_by_size, simulated
from models.training.evaluate import StudyCandidates

log = logging.getLogger(__name__)

#: The cache's format; ``load_candidates`` refuses others
FORMAT = 1
MANIFEST = "manifest.json"
_ARRAYS = ("centres_index", "centres_mm", "blob_mm", "probs", "labels")


class CacheError(ValueError):
    """A candidate cache that cannot be read (missing, another format, a study file missing)."""


def _study_file(record: StudyCandidates) -> str:
    return f"{record.kind}~{record.condition}~{record.seed}~{record.size}.npz"


def save_candidates(
    folder: Path, readings: Mapping[str, Sequence[StudyCandidates]], manifest: Mapping[str, Any]
) -> Path:
    """Write every reading's studies under ``folder`` (one folder per reading) with a manifest.

    Parameters
    ----------
    folder
        Where the cache goes (made; a previous cache there is replaced study by study).
    readings
        ``{reading label: [StudyCandidates]}`` as ``evaluate.collect_candidates`` returns it.
    manifest
        What else the cache should say (model version, size, studies per condition, first subject); ``format``,
        ``readings`` and each reading's study files (``files``) are added.

    Returns
    -------
    Path
        The manifest written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = {}
    for label, records in readings.items():
        sub = folder / label
        sub.mkdir(exist_ok=True)
        files[label] = []
        for rec in records:
            meta = {
                "kind": rec.kind, "condition": rec.condition, "seed": rec.seed, "size": rec.size, "body": rec.body,
                "lesions": list(rec.lesions), "geometry": rec.geometry,
            }  # fmt: skip
            name = _study_file(rec)
            arrays = {k: np.asarray(getattr(rec, k)) for k in _ARRAYS}
            np.savez(sub / name, meta=np.array(json.dumps(meta)), **arrays)  # type: ignore[arg-type]
            files[label].append(name)
    path = folder / MANIFEST
    body = {**manifest, "format": FORMAT, "readings": list(readings), "files": files}
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def _record(path: Path) -> StudyCandidates:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        arrays = {k: z[k] for k in _ARRAYS}
    lesions = tuple(meta["lesions"])
    return StudyCandidates(
        meta["kind"], meta["condition"], int(meta["seed"]), meta["size"], meta["body"], arrays["centres_index"],
        arrays["centres_mm"], arrays["blob_mm"], arrays["probs"], arrays["labels"], lesions, meta["geometry"],
    )  # fmt: skip


def load_candidates(folder: Path) -> tuple[dict[str, Any], dict[str, list[StudyCandidates]]]:
    """Read a cache ``save_candidates`` wrote.

    Returns
    -------
    tuple
        (the manifest, ``{reading label: [StudyCandidates]}`` in the order they were saved).

    Raises
    ------
    CacheError
        No manifest, another format, or a study file missing.
    """
    path = folder / MANIFEST
    if not path.is_file():
        raise CacheError(f"{folder} holds no candidate cache ({MANIFEST} missing); write one with --save-candidates")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{folder}: cache format {manifest.get('format')!r}, this tool reads format {FORMAT}")
    readings: dict[str, list[StudyCandidates]] = {}
    for label in manifest["readings"]:
        readings[label] = []
        for name in manifest["files"][label]:
            study = folder / label / name
            if not study.is_file():
                raise CacheError(f"{folder}: {label}/{name} is missing")
            readings[label].append(_record(study))
    return manifest, readings


def cached_simulation(kind: str, condition: str, seed: int, size: str, folder: Path) -> Study:
    """``data.simulated(kind, condition, seed, size)``, simulated once into ``folder`` and read back after.

    Parameters
    ----------
    kind, condition, seed, size
        As ``models.training.data.simulated``.
    folder
        The simulation cache (your own folder: its files are pickles).

    Returns
    -------
    Study
    """
    path = folder / kind / condition / f"{seed}-{size}.pkl"
    if path.is_file():
        with open(path, "rb") as f:
            return pickle.load(f)
    study = simulated(kind, condition, seed, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{id(study)}.part")  # another process may write the same study at once
    with open(partial, "wb") as f:
        pickle.dump(study, f, protocol=pickle.HIGHEST_PROTOCOL)
    partial.replace(path)
    return study


def cached_rules(kinds: Iterable[str], sizes: Iterable[str], folder: Path | None, progress: bool = True) -> dict:
    """``fit_rules_by_size(kinds, sizes)``, fitted once into ``folder`` (None: fitted every time).

    Returns
    -------
    dict
        ``{size: rules}``.
    """
    kinds, sizes = tuple(kinds), tuple(dict.fromkeys(sizes))
    if folder is None:
        return fit_rules_by_size(kinds, sizes, progress=progress)
    path = folder / f"rules-{'-'.join(kinds)}-{'-'.join(sizes)}.pkl"
    if path.is_file():
        with open(path, "rb") as f:
            return pickle.load(f)
    rules = fit_rules_by_size(kinds, sizes, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".part"), "wb") as f:
        pickle.dump(rules, f, protocol=pickle.HIGHEST_PROTOCOL)
    path.with_suffix(".part").replace(path)
    return rules
