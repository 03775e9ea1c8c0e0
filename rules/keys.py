"""The imaging condition of a series, from its header tags: a small value object with a stable string form.

CT: ``CT|manufacturer|model|kernel|dose|kvp|region`` (for example ``CT|ge|optima-ct660|bone|ctdi5-15|100kv|head``).
MR: ``MR|manufacturer|model|field|sequence|region`` (for example ``MR|siemens|skyra|3t|tof|head``).
Any other modality uses the CT layout. A part that cannot be read from the tags is ``unknown``; a part
dropped by a lookup fallback is ``*``. Building a key from tags never raises.

The region is the body region the series shows (:func:`body_region`: BodyPartExamined, else keywords of
ProtocolName, SeriesDescription, StudyDescription), so head and chest CT of one scanner get rules fitted on
their own anatomy. Keys written before keys had a region (5 CT / 4 MR parts after the modality) parse with
region ``*``: a rule stored under such a key serves every region.
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
_MR_LAYOUT = ("manufacturer", "model", "field", "sequence", "region")
_CT_LAYOUT = ("manufacturer", "model", "kernel", "dose", "kvp", "region")

#: The body regions, in the order a combined region names them (``head-neck``, ``chest-abdomen-pelvis``), each
#: with the words (upper case, whole words of the header text) that say it. Stems end in ``\w*``.
REGIONS: tuple[tuple[str, str], ...] = (
    ("head", r"HEADS?|BRAIN|SKULL|CRANI\w*|INTRACRANI\w*|CEREBR\w*|WILLIS|ORBITS?|SCHAEDEL|KOPF"),
    ("neck", r"NECK|CAROTIDS?|THYROID|LARYN\w*|HALS"),
    ("chest", r"CHEST|THORAX|LUNGS?|PULMO\w*"),
    ("abdomen", r"ABDOMEN|ABDO?|ABDOMINAL|LIVER|PANCREA\w*|KIDNEYS?|RENAL"),
    ("pelvis", r"PELVIS|PELVIC|PROSTATE|BLADDER"),
    ("spine", r"SPINE|SPINAL|[CTLS]SPINE|VERTEBR\w*|LUMBAR|SACRUM|COCCYX|WIRBELSAEULE"),
    (
        "extremity",
        r"EXTREMIT\w*|ARMS?|LEGS?|KNEES?|ANKLES?|FOOT|FEET|HANDS?|WRISTS?|ELBOWS?|SHOULDERS?|HIPS?|FEMUR"
        r"|TIBIA|HUMERUS|FOREARM|RUNOFF",
    ),
)
_REGION_RES = tuple((name, re.compile(rf"\b(?:{words})\b")) for name, words in REGIONS)
#: BodyPartExamined defined terms that run words together (DICOM PS3.16 Annex L).
_BODY_PART_CODES = {
    "CIRCLEOFWILLIS": "head",
    "HEADNECK": "head-neck",
    "CHESTABDOMEN": "chest-abdomen",
    "ABDOMENPELVIS": "abdomen-pelvis",
    "CHESTABDPELVIS": "chest-abdomen-pelvis",
    "WHOLEBODY": "whole-body",
}
#: Free-text words that imply the head when no region word is found: the node's angiography is intracranial.
_HEAD_ANGIO_RE = re.compile(r"\b(?:TOF|MRA|COW)\b")
#: Where the region is read from, in order; the free-text ones count only through :data:`REGIONS` words.
REGION_SOURCES = ("BodyPartExamined", "ProtocolName", "SeriesDescription", "StudyDescription")


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


def _words(text: str) -> str:
    """Header text as upper-case words: anything but letters and digits separates (``tof_fl3d`` → ``TOF FL3D``)."""
    return re.sub(r"[^A-Z0-9]+", " ", text.upper())


def _regions_in(text: str) -> list[str]:
    """The regions whose words occur in ``text``, in :data:`REGIONS` order."""
    words = _words(text)
    return [name for name, pattern in _REGION_RES if pattern.search(words)]


def body_region(tags: Mapping[str, object]) -> str:
    """The body region of a series, normalised: ``head``, ``neck``, ``chest``, ``abdomen``, ``pelvis``, ``spine``,
    ``extremity``, a combination of them (``head-neck``), another BodyPartExamined as its slug, or ``unknown``.

    BodyPartExamined decides when present; otherwise the first of ProtocolName, SeriesDescription and
    StudyDescription that names a region (``CTA HEAD``, ``Thorax low dose``); a TOF or MRA protocol naming no
    region is the head.

    Parameters
    ----------
    tags
        Header values by keyword (``storage.meta.CONDITION_KEYWORDS`` holds the four read here).

    Returns
    -------
    str
        A valid key part; never ``*``. Never raises.
    """
    body = " ".join(_values(tags.get("BodyPartExamined")))
    if body:
        code = re.sub(r"[^A-Z]", "", body.upper())
        found = _regions_in(body)
        return _BODY_PART_CODES.get(code) or ("-".join(found) if found else slug(body))
    texts = [" ".join(_values(tags.get(keyword))) for keyword in REGION_SOURCES[1:]]
    for text in texts:
        found = _regions_in(text)
        if found:
            return "-".join(found)
    if any(_HEAD_ANGIO_RE.search(_words(text)) for text in texts):
        return "head"
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
    region: str = UNKNOWN

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
        """The condition of a series from its header values (``storage.meta.CONDITION_KEYWORDS``).

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
                "region": body_region(tags),
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
        """The key whose ``str()`` is ``text``; a key written before keys had a region reads as region ``*``.

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
        if len(rest) == len(layout) - 1:  # stored before the region part: every region
            rest = [*rest, ANY]
        if len(rest) != len(layout) or (modality not in ("CT", "MR") and not _PART_RE.match(modality)):
            raise KeyParseError(
                f"not a condition key: {text!r} (expected CT|manufacturer|model|kernel|dose|kvp[|region] "
                "or MR|manufacturer|model|field|sequence[|region])"
            )
        return cls(modality, **dict(zip(layout, rest, strict=True)))

    def stored_forms(self) -> tuple[str, ...]:
        """Every string this key may be stored under: ``str(self)``, and for region ``*`` the form without it."""
        text = str(self)
        return (text, text.rsplit(SEPARATOR, 1)[0]) if self.region == ANY else (text,)

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
#: Every level after ``exact`` drops the region; among a level's hits the series' own region wins.
FALLBACKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("exact", ()),
    ("drop-region", ("region",)),
    ("drop-dose", ("dose", "region")),
    ("drop-model", ("dose", "model", "region")),
    ("manufacturer", ("model", "kernel", "dose", "kvp", "field", "sequence", "region")),
)


class BodyPart(StrEnum):
    """The body region a series shows, as the detector's tasks know them."""

    HEAD = "head"
    CHEST = "chest"


def body_part_for(region: str, modality: str) -> BodyPart:
    """The detector's task for a key's region: ``chest`` for a CT whose region includes the chest, else ``head``.

    MR series are head (TOF MRA) here: the node reads no body MR.
    """
    return BodyPart.CHEST if modality.upper() == "CT" and "chest" in region.split("-") else BodyPart.HEAD


def body_part_of(tags: Mapping[str, object], series_description: str, modality: str) -> BodyPart:
    """The detector's task for a series, from the same region its condition key carries (:func:`body_region`).

    Parameters
    ----------
    tags
        The condition tags kept at ingest.
    series_description
        The series' description, used when ``tags`` hold none.
    modality
        The series' Modality.

    Returns
    -------
    BodyPart
        ``chest`` for a CT whose region includes the chest, else ``head``.
    """
    if series_description and not _values(tags.get("SeriesDescription")):
        tags = {**tags, "SeriesDescription": series_description}
    return body_part_for(body_region(tags), modality)
