"""Model bundles (seed 000: the rules and the model distributed to many sites): one file moved between nodes.

A bundle is a tar file (gzip) of bare file names:

- ``bundle.json``: format, model version, and the sha256 of every other file;
- the detector's model card (``lesion.json``) and every weights file it names;
- ``rules.json`` (optional): the sending node's active rule set (``rules.registry.RuleRegistry.export``).

``import_bundle`` refuses a bundle whose files do not match its manifest, whose weights do not match their card,
or whose card's input normalisation is not this code's (``models.detector.Detector.load`` does those checks, on
the files as extracted, before anything is installed). An imported model lands in the node's installed-models
folder (``<data_dir>/models/<version>/``); ``activate`` points the node at one (``<data_dir>/models/active``,
written atomically), and the worker's detector slot loads from the active folder (``active_weights_dir``) —
none active: the shipped ``models/weights``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.detector import CARD_NAME, WEIGHTS_DIR, WEIGHTS_NAME, Detector, WeightsRefused, read_card

BUNDLE_FORMAT = "harmonode-model-bundle/1"
MANIFEST = "bundle.json"
RULES_FILE = "rules.json"
ACTIVE = "active"
MAX_FILE_BYTES = 256 * 1024 * 1024
_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")


class BundleRefused(WeightsRefused):
    """A bundle that is not installed (its message says which check failed)."""


@dataclass(frozen=True)
class InstalledModel:
    """A model installed from a bundle: its version, its folder, and the rule set it carried (or None)."""

    version: str
    folder: Path
    rules: dict[str, Any] | None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_version(version: str) -> str:
    """A model version that can name a folder (letters, digits, ``.+_-``; at most 64).

    Raises
    ------
    BundleRefused
        Any other version string.
    """
    if not _VERSION.match(version) or ".." in version:
        raise BundleRefused(f"model version {version!r} cannot name an installed model")
    return version


def model_files(weights_dir: Path) -> tuple[str, list[str]]:
    """The version of the model in ``weights_dir`` and its files (card first), after the detector's checks.

    Raises
    ------
    WeightsRefused, FileNotFoundError
        As ``Detector.load``.
    """
    Detector.load(device="cpu", weights_dir=weights_dir)
    _, card = read_card(weights_dir, WEIGHTS_NAME, CARD_NAME, "detector")
    members = [str(m["file"]) for m in card.get("members", [])]
    return str(card.get("version", "0")), [CARD_NAME, WEIGHTS_NAME, *members]


def export_bundle(out: Path, weights_dir: Path | None = None, rules: dict[str, Any] | None = None) -> Path:
    """Write the bundle of the model in ``weights_dir`` (default the shipped one) and a rule set to ``out``.

    Parameters
    ----------
    out
        The bundle file (a folder: ``harmonode-model-<version>.tar.gz`` in it).
    weights_dir
        The model's folder (card and weights).
    rules
        A ``RuleRegistry.export`` document, or None.

    Returns
    -------
    Path
        The bundle written (atomically: a temp file renamed).

    Raises
    ------
    WeightsRefused, FileNotFoundError
        A model the detector would refuse.
    """
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    version, names = model_files(folder)
    check_version(version)
    contents = {name: (folder / name).read_bytes() for name in names}
    if rules is not None:
        contents[RULES_FILE] = json.dumps(rules, indent=1, sort_keys=True).encode()
    manifest = {
        "format": BUNDLE_FORMAT,
        "version": version,
        "files": {name: _sha256(data) for name, data in contents.items()},
    }
    out = Path(out)
    if out.is_dir():
        out = out / f"harmonode-model-{version}.tar.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
            for name, data in [(MANIFEST, json.dumps(manifest, indent=1).encode()), *contents.items()]:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _read_bundle(bundle: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the files of a bundle, every file checked against the manifest."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(bundle, mode="r:*") as tar:
            for member in tar:
                name = member.name
                if not member.isfile() or "/" in name or "\\" in name or name.startswith(".") or not name:
                    raise BundleRefused(f"bundle holds {name!r}, not a plain file with a bare name: refused")
                if member.size > MAX_FILE_BYTES or name in files:
                    raise BundleRefused(f"bundle file {name!r} is too large or repeated: refused")
                extracted = tar.extractfile(member)
                files[name] = extracted.read() if extracted is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleRefused(f"{bundle} is not a readable model bundle: {exc}") from exc
    try:
        manifest = json.loads(files.pop(MANIFEST))
    except (KeyError, ValueError) as exc:
        raise BundleRefused(f"{bundle} has no readable {MANIFEST}: refused") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleRefused(f"{bundle} is not a {BUNDLE_FORMAT} bundle: refused")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or set(listed) != set(files):
        raise BundleRefused(f"{bundle}: its files do not match its manifest: refused")
    for name, data in files.items():
        if _sha256(data) != listed[name]:
            raise BundleRefused(f"bundle file {name} does not match its checksum in the manifest: refused (tampered)")
    return manifest, files


def import_bundle(bundle: Path, models_dir: Path) -> InstalledModel:
    """Check a bundle and install its model under ``models_dir/<version>`` (not activated).

    Installing the same bundle again is a no-op; another model under an installed version is refused.

    Raises
    ------
    BundleRefused
        Unreadable, files not matching the manifest, weights not matching their card, a normalisation other
        than the code's, or a version already installed with other files.
    """
    manifest, files = _read_bundle(Path(bundle))
    version = check_version(str(manifest.get("version", "")))
    rules_blob = files.pop(RULES_FILE, None)
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=models_dir))
    try:
        for name, data in files.items():
            (incoming / name).write_bytes(data)
        try:
            found, _ = model_files(incoming)  # the detector's own checks: checksums, normalisation
        except (WeightsRefused, FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
            raise BundleRefused(f"bundle {Path(bundle).name}: {exc}") from exc
        if found != version:
            raise BundleRefused(f"bundle says version {version}, its model card {found}: refused")
        target = models_dir / version
        if target.exists():
            same = all((target / n).is_file() and (target / n).read_bytes() == d for n, d in files.items())
            if not same:
                raise BundleRefused(f"model {version} is installed with other files: refused (give it a new version)")
        else:
            for path in incoming.iterdir():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(incoming, target)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    rules = json.loads(rules_blob) if rules_blob is not None else None
    return InstalledModel(version, target, rules)


def installed_versions(models_dir: Path) -> list[str]:
    """The versions installed under ``models_dir``."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / CARD_NAME).exists()
    )


def activate(models_dir: Path, version: str) -> Path:
    """Make an installed version the node's detector (checked again first); return its folder.

    Raises
    ------
    BundleRefused
        Not installed, or its files no longer pass the detector's checks.
    """
    folder = Path(models_dir) / check_version(version)
    if not (folder / CARD_NAME).exists():
        raise BundleRefused(f"model {version} is not installed (installed: {installed_versions(models_dir)})")
    try:
        model_files(folder)
    except (WeightsRefused, FileNotFoundError) as exc:
        raise BundleRefused(f"installed model {version}: {exc}") from exc
    fd, tmp = tempfile.mkstemp(prefix=".active.", dir=models_dir)
    with os.fdopen(fd, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(models_dir) / ACTIVE)
    return folder


def active_version(models_dir: Path | None) -> str:
    """The active installed version ('' when none: the shipped weights)."""
    if models_dir is None:
        return ""
    try:
        return (Path(models_dir) / ACTIVE).read_text().strip()
    except OSError:
        return ""


def active_weights_dir(models_dir: Path | None) -> Path | None:
    """The folder the node's detector loads from: the active installed model's, or None (the shipped weights)."""
    version = active_version(models_dir)
    if not version or models_dir is None:
        return None
    return Path(models_dir) / check_version(version)
