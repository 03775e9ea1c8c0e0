"""The imaging condition of a series, from its header tags: a small value object with a stable string form.

CT: ``CT|manufacturer|model|kernel|dose|kvp`` (for example ``CT|ge|optima-ct660|bone|ctdi5-15|100kv``).
MR: ``MR|manufacturer|model|field|sequence`` (for example ``MR|siemens|skyra|3t|tof``).
Any other modality uses the CT layout. A part that cannot be read from the tags is ``unknown``; a part
dropped by a lookup fallback is ``*``. Building a key from tags never raises.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
ANY = "*"
SEPARATOR = "|"

#: Default CTDIvol bucket edges (mGy) and exposure bucket edges (mAs); configurable per call.
CTDI_EDGES: tuple[float, ...] = (5.0, 15.0, 30.0, 60.0)
MAS_EDGES: tuple[float, ...] = (50.0, 100.0, 200.0, 400.0)

_MANUFACTURERS = (
    ("ge", ("ge ", "ge_", "general electric", "gehc")),
    ("siemens", ("siemens",)),
    ("philips", ("philips",)),
    ("canon", ("canon", "toshiba")),
    ("hitachi", ("hitachi",)),
    ("fujifilm", ("fujifilm", "fuji")),
    ("united-imaging", ("united imaging", "uih")),
    ("neusoft", ("neusoft",)),
)
_PART_RE = re.compile(r"^(\*|[a-z0-9][a-z0-9.+<>-]*)$")
_MR_LAYOUT = ("manufacturer", "model", "field", "sequence")
_CT_LAYOUT = ("manufacturer", "model", "kernel", "dose", "kvp")


class KeyParseError(ValueError):
    """A condition key string that does not have the documented form."""


def slug(text: object) -> str:
    """Lower-case, ASCII letters/digits/``.+-`` only, runs of anything else become one ``-``."""
    value = re.sub(r"[^a-z0-9.+]+", "-", str(text).strip().lower()).strip("-.+")
    return value or UNKNOWN


def _values(raw: object) -> list[str]:
    """A header value as its list of non-empty values (multi-valued as joined with ``\\`` on the wire)."""
    if raw is None:
        return []
    if isinstance(raw, list | tuple):
        items = [str(v) for v in raw]
    else:
        items = str(raw).split("\\")
    return [v.strip() for v in items if v and v.strip()]


def _float(raw: object) -> float | None:
    vals = _values(raw)
    if not vals:
        return None
    try:
        value = float(vals[0])
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def normalize_manufacturer(raw: object) -> str:
    """A vendor name as its short canonical slug (``GE MEDICAL SYSTEMS`` → ``ge``, ``CANON_MEC`` → ``canon``)."""
    vals = _values(raw)
    if not vals:
        return UNKNOWN
    text = " ".join(vals).lower() + " "
    for name, prefixes in _MANUFACTURERS:
        if any(text.startswith(p) or f" {p}" in f" {text}" for p in prefixes):
            return name
    return slug(text)


def normalize_kernel(raw: object) -> str:
    """A reconstruction kernel; multi-valued kept in order, joined with ``+`` (``FC43\\AIDR 3D`` → ``fc43+aidr-3d``)."""
    vals = [slug(v) for v in _values(raw)]
    vals = [v for v in vals if v != UNKNOWN]
    return "+".join(vals) if vals else UNKNOWN


def _bucket(value: float, edges: Sequence[float], unit: str) -> str:
    edges = sorted(edges)
    fmt = "{:g}".format
    if not edges:
        return f"{unit}-all"
    if value < edges[0]:
        return f"{unit}<{fmt(edges[0])}"
    for lo, hi in zip(edges, edges[1:], strict=False):
        if lo <= value < hi:
            return f"{unit}{fmt(lo)}-{fmt(hi)}"
    return f"{unit}>{fmt(edges[-1])}"


def dose_bucket(
    tags: Mapping[str, object],
    ctdi_edges: Sequence[float] = CTDI_EDGES,
    mas_edges: Sequence[float] = MAS_EDGES,
) -> str:
    """The dose bucket: CTDIvol if present, else Exposure (mAs), else XRayTubeCurrent × ExposureTime.

    Parameters
    ----------
    tags
        Header values by keyword.
    ctdi_edges, mas_edges
        Bucket edges in mGy and mAs.

    Returns
    -------
    str
        ``ctdi15-30``, ``mas<50``, ``mas>400`` … or ``unknown``.
    """
    ctdi = _float(tags.get("CTDIvol"))
    if ctdi:
        return _bucket(ctdi, ctdi_edges, "ctdi")
    mas = _float(tags.get("Exposure"))
    if not mas:
        current, time_ms = _float(tags.get("XRayTubeCurrent")), _float(tags.get("ExposureTime"))
        mas = current * time_ms / 1000.0 if current and time_ms else None
    return _bucket(mas, mas_edges, "mas") if mas else UNKNOWN


def sequence_family(tags: Mapping[str, object]) -> str:
    """The MR sequence family: ``tof``, ``pc``, ``ce``, ``gre``, ``se``, ``epi``, ``ir`` or ``unknown``."""
    name = " ".join(_values(tags.get("SequenceName"))).lower()
    image_type = " ".join(_values(tags.get("ImageType"))).lower()
    scanning = {v.upper() for v in _values(tags.get("ScanningSequence"))}
    variant = {v.upper() for v in _values(tags.get("SequenceVariant"))}
    if "tof" in name or re.search(r"fl[23]d\d*r", name) or "inflow" in name:
        return "tof"
    if re.search(r"(^|[^a-z])pc([^a-z]|$)", name) or "_v" in name or "velocity" in image_type or "phase" in name:
        return "pc"
    if "ce" in name.split() or "contrast" in name:
        return "ce"
    if "EP" in scanning:
        return "epi"
    if "IR" in scanning:
        return "ir"
    if "GR" in scanning:
        return (
            "tof" if "SP" in variant and "3D" in {v.upper() for v in _values(tags.get("MRAcquisitionType"))} else "gre"
        )
    if "SE" in scanning:
        return "se"
    return UNKNOWN


def _modality(raw: object) -> str:
    text = slug(raw) if isinstance(raw, str) and raw.strip() else UNKNOWN
    return text.upper() if text in ("ct", "mr") else text


@dataclass(frozen=True)
class ConditionKey:
    """One imaging condition. Build with :meth:`from_tags` or :meth:`parse`; ``str(key)`` is stable."""

    modality: str
    manufacturer: str = UNKNOWN
    model: str = UNKNOWN
    kernel: str = UNKNOWN
    dose: str = UNKNOWN
    kvp: str = UNKNOWN
    field: str = UNKNOWN
    sequence: str = UNKNOWN

    def __post_init__(self) -> None:
        if self.modality not in ("CT", "MR") and not _PART_RE.match(self.modality or ""):
            raise KeyParseError(f"condition key modality {self.modality!r} is not a normalized value")
        for name in self.layout:
            value = getattr(self, name)
            if not isinstance(value, str) or not _PART_RE.match(value):
                raise KeyParseError(f"condition key part {name}={value!r} is not a normalized value")

    @property
    def layout(self) -> tuple[str, ...]:
        """The part names after the modality, in string order."""
        return _MR_LAYOUT if self.modality == "MR" else _CT_LAYOUT

    @property
    def is_mr(self) -> bool:
        """True for an MR key."""
        return self.modality == "MR"

    @classmethod
    def from_tags(
        cls,
        tags: Mapping[str, object],
        modality: str,
        ctdi_edges: Sequence[float] = CTDI_EDGES,
        mas_edges: Sequence[float] = MAS_EDGES,
    ) -> ConditionKey:
        """The condition of a series from its header values (``storage.index.CONDITION_KEYWORDS``).

        Parameters
        ----------
        tags
            Header values by DICOM keyword, as text (multi-valued joined with ``\\``) or lists.
        modality
            The series' Modality (``CT``, ``MR`` …); empty gives ``unknown``.
        ctdi_edges, mas_edges
            Dose bucket edges (mGy, mAs).

        Returns
        -------
        ConditionKey
            Never raises: unreadable parts are ``unknown``.
        """
        mod = _modality(modality)
        try:
            tags = tags if isinstance(tags, Mapping) else {}
            common = {
                "manufacturer": normalize_manufacturer(tags.get("Manufacturer")),
                "model": slug(" ".join(_values(tags.get("ManufacturerModelName"))) or UNKNOWN),
            }
            if mod == "MR":
                tesla = _float(tags.get("MagneticFieldStrength"))
                if tesla is not None and tesla > 20:  # some scanners write gauss
                    tesla /= 10000.0
                field = f"{round(tesla, 1):g}t" if tesla else UNKNOWN
                return cls("MR", field=field, sequence=sequence_family(tags), **common)
            kvp = _float(tags.get("KVP"))
            return cls(
                mod,
                kernel=normalize_kernel(tags.get("ConvolutionKernel")),
                dose=dose_bucket(tags, ctdi_edges, mas_edges),
                kvp=f"{round(kvp):d}kv" if kvp else UNKNOWN,
                **common,
            )
        except Exception:  # odd tags must never stop a series; say so once
            log.warning("condition tags could not be read; key is unknown", exc_info=True)
            return cls(mod)

    @classmethod
    def parse(cls, text: str) -> ConditionKey:
        """The key whose ``str()`` is ``text``.

        Raises
        ------
        KeyParseError
            Not a string of the documented form.
        """
        if not isinstance(text, str) or not text.strip():
            raise KeyParseError(f"not a condition key: {text!r}")
        parts = text.strip().split(SEPARATOR)
        modality, rest = parts[0], parts[1:]
        layout = _MR_LAYOUT if modality == "MR" else _CT_LAYOUT
        if len(rest) != len(layout) or (modality not in ("CT", "MR") and not _PART_RE.match(modality)):
            raise KeyParseError(
                f"not a condition key: {text!r} (expected CT|manufacturer|model|kernel|dose|kvp "
                "or MR|manufacturer|model|field|sequence)"
            )
        return cls(modality, **dict(zip(layout, rest, strict=True)))

    def parts(self) -> dict[str, str]:
        """The parts after the modality, by name."""
        return {name: getattr(self, name) for name in self.layout}

    def __str__(self) -> str:
        return SEPARATOR.join((self.modality, *self.parts().values()))

    def generalize(self, drop: Sequence[str]) -> ConditionKey:
        """This key with the named parts replaced by ``*`` (parts not in this layout are ignored)."""
        return replace(self, **{name: ANY for name in drop if name in self.layout})

    def matches(self, other: ConditionKey) -> bool:
        """True when every part is equal or ``*`` on either side (same modality required)."""
        if self.modality != other.modality:
            return False
        return all(a == b or ANY in (a, b) for a, b in zip(self.parts().values(), other.parts().values(), strict=True))

    def specificity(self) -> int:
        """How many parts are not ``*`` (more specific rules win among equal matches)."""
        return sum(v != ANY for v in self.parts().values())


#: Lookup fallbacks, in order: (match name, parts dropped). ``drop-dose`` is skipped for MR keys (no dose part).
FALLBACKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("exact", ()),
    ("drop-dose", ("dose",)),
    ("drop-model", ("dose", "model")),
    ("manufacturer", ("model", "kernel", "dose", "kvp", "field", "sequence")),
)


class BodyPart(StrEnum):
    """The body region a series shows, as the detector's tasks know them."""

    HEAD = "head"
    CHEST = "chest"


def body_part_of(tags: Mapping[str, object], series_description: str, modality: str) -> BodyPart:
    """``chest`` for a CT whose BodyPartExamined or description says chest/thorax/lung, else ``head``.

    MR series are head (TOF MRA) here: the node reads no body MR.
    """
    text = f"{tags.get('BodyPartExamined', '') or ''} {series_description or ''}".upper()
    if modality.upper() == "CT" and any(word in text for word in ("CHEST", "THORAX", "LUNG")):
        return BodyPart.CHEST
    return BodyPart.HEAD
