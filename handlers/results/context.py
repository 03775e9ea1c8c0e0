"""What every result builder shares: the algorithm that produced the results and the source series' context.

Kept apart from ``handlers.results`` (which imports every builder) so that a builder imports its context
without an import circle.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from models.findings import Finding, VolumeGeometry
from models.multiframe import FrameView, frame_number

MANUFACTURER = "harmonode"
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS"

# One new series per kind of object, numbered apart from the scanner's series.
SERIES_NUMBERS = {"sr": 9901, "sc": 9902, "gsps": 9903, "seg": 9904, "kos": 9905}
SERIES_DESCRIPTIONS = {
    "sr": "harmonode findings (SR)",
    "sc": "harmonode key images (NOT FOR DIAGNOSIS)",
    "gsps": "harmonode annotations (GSPS)",
    "seg": "harmonode lesions (SEG)",
    "kos": "harmonode key objects (KOS)",
}

# Patient module attributes highdicom does not copy itself (it copies name, ID, birth date and sex).
_EXTRA_PATIENT_KEYWORDS = (
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientBirthTime",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "EthnicGroup",
)


# The study-level attributes of the source (General Study and Patient Study modules) a result repeats as the
# source has them, so that a PACS, a viewer and dcentvfy see one study. The builders set some of them
# (highdicom copies the date, time, ID, accession and referring physician), none sets the description.
STUDY_KEYWORDS = (
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingServiceCodeSequence",
    "ProcedureCodeSequence",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "AdditionalPatientHistory",
)


@dataclass(frozen=True)
class AlgorithmInfo:
    """What produced the results: detector name and version, and the conversion rule applied."""

    name: str
    version: str
    rule_id: str = ""
    rule_match: str = ""
    condition_key: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    harmonization: str = ""  # both stages and their strengths, one sentence (the SR's comment)

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ValueError("algorithm name and version must not be empty")

    @property
    def rule_text(self) -> str:
        """The conversion rule as one short phrase, e.g. ``rule ct-siemens-b30f-v2 (exact)``."""
        if not self.rule_id:
            return f"no conversion rule ({self.rule_match or 'identity'})"
        return f"rule {self.rule_id} ({self.rule_match or 'exact'})"

    def parameter_strings(self) -> list[str]:
        """Algorithm parameters as ``key=value`` strings, rule id, match and condition key first."""
        items = {
            "rule_id": self.rule_id or "none",
            "rule_match": self.rule_match or "identity",
            "condition_key": self.condition_key or "unknown",
            **{str(k): str(v) for k, v in self.parameters.items()},
        }
        # TEXT items in the SR (UT) and the SEG's LT hold far more than 64 characters; a condition key with its
        # region is often longer than 50, and a cut key names another condition
        return [f"{k}={v}"[:1024] for k, v in items.items()]


@dataclass(frozen=True)
class ResultContext:
    """What every builder needs: the sorted sources, their geometry, the algorithm and the UID seed."""

    sources: list[Dataset]  # sorted along the slice normal, index k of the volume
    geometry: VolumeGeometry | None  # None when the series could not be analysed
    algorithm: AlgorithmInfo
    seed: str

    def uid(self, kind: str, number: int = 0) -> str:
        """A UID derived from the sources, algorithm, rule, object kind and number (stable across reruns)."""
        return generate_uid(entropy_srcs=[self.seed, kind, str(number)])

    def series_uid(self, kind: str) -> str:
        """The Series Instance UID of the results of ``kind`` for this source series."""
        return self.uid(f"series-{kind}")

    @property
    def volume(self) -> VolumeGeometry:
        """The geometry of an analysed series (builders other than the SR run only on those)."""
        if self.geometry is None:
            raise ValueError("no volume geometry: the series was not analysed")
        return self.geometry

    def tracking_uid(self, finding: Finding, number: int) -> str:
        """The finding's Tracking UID: the detector's, or one derived from the series and its number."""
        return finding.tracking_uid or self.uid("finding", number)

    def tracking_id(self, finding: Finding, number: int) -> str:
        """The finding's Tracking Identifier (at most 64 characters), e.g. ``aneurysm 1``."""
        return (finding.tracking_id or f"{finding.kind} {number}")[:64]

    def slice_of(self, finding: Finding) -> int:
        """Index of the source slice through the finding's centre (clipped to the volume)."""
        k = float(self.volume.patient_to_index(finding.center_mm)[0])
        return int(np.clip(round(k), 0, len(self.sources) - 1))

    def finding_slices(self, findings: Sequence[Finding]) -> list[Dataset]:
        """The source slices through the findings' centres, in volume order, each once."""
        return [self.sources[k] for k in sorted({self.slice_of(f) for f in findings})]

    @property
    def instances(self) -> list[Dataset]:
        """The source slices, one per stored instance (the frames of a multi-frame one count once)."""
        seen: dict[str, Dataset] = {}
        for ds in self.sources:
            seen.setdefault(str(ds.SOPInstanceUID), ds)
        return list(seen.values())

    @property
    def multiframe(self) -> bool:
        """Whether the sources are the frames of a multi-frame instance (results reference frames)."""
        return frame_number(self.sources[0]) is not None

    def pixel_of(self, finding: Finding) -> tuple[float, float]:
        """(column, row) of the finding's centre in its slice."""
        _, j, i = self.volume.patient_to_index(finding.center_mm)
        return float(i), float(j)

    def radius_px(self, finding: Finding) -> float:
        """In-plane radius of the finding in pixels (at least 3, so a circle stays visible)."""
        _, dy, dx = self.volume.spacing
        return max(3.0, finding.diameter_mm / 2.0 / min(dy, dx))

    def common(self, kind: str) -> dict[str, object]:
        """Keyword arguments every highdicom constructor of ``kind`` takes: series, equipment, algorithm."""
        return {
            "series_instance_uid": self.series_uid(kind),
            "series_number": SERIES_NUMBERS[kind],
            "series_description": SERIES_DESCRIPTIONS[kind],
            "manufacturer": MANUFACTURER,
            "manufacturer_model_name": self.algorithm.name[:64],
            "software_versions": self.algorithm.version[:64],
        }


# Type 2 attributes of the Patient and General Study modules the builders read from a source (a source may
# lack them: an old or a de-identified one); the results send them empty, as PS3.3 allows.
_TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def source_view(ds: Dataset) -> Dataset:
    """A view of a source instance the builders can read: its elements (shared, pixel data included, not
    copied) and the Type 2 Patient and Study attributes it lacks, empty.

    The source itself is never changed (it is the stored instance's dataset). A frame of a multi-frame
    instance stays a ``FrameView`` of the same instance and frame.
    """
    view = FrameView() if isinstance(ds, FrameView) else Dataset()
    if isinstance(ds, FrameView):
        view.instance, view.frame_number = ds.instance, ds.frame_number
    for element in ds:
        view.add(element)
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in view:
            setattr(view, keyword, None)
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta
    return view


def sort_sources(sources: Sequence[Dataset], geometry: VolumeGeometry) -> list[Dataset]:
    """Source slices in volume order (by position along the slice normal, as ``VolumeGeometry`` assumes)."""
    normal = geometry.slice_direction
    return sorted(sources, key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)))


def copy_patient_module(source: Dataset, result: Dataset) -> None:
    """Copy the Patient module attributes highdicom leaves out (no builder sets them)."""
    for keyword in _EXTRA_PATIENT_KEYWORDS:
        if keyword in source and keyword not in result:
            result[keyword] = source[keyword]
    # A source that says its identity was removed but not how (dciodvfy: error) gets a method that says so.
    removed = str(result.get("PatientIdentityRemoved", "")).upper() == "YES"
    if removed and not result.get("DeidentificationMethod") and not result.get("DeidentificationMethodCodeSequence"):
        result.DeidentificationMethod = "not stated by the source"


def copy_study_module(source: Dataset, result: Dataset) -> None:
    """Give ``result`` the study-level attributes of ``source`` as the source has them.

    An attribute the source has (even empty) replaces the builder's; one the source lacks is left as the
    builder set it (Type 2 attributes stay, empty). The character set follows the text when the result
    names none.
    """
    if "SpecificCharacterSet" in source and "SpecificCharacterSet" not in result:
        result.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in STUDY_KEYWORDS:
        if keyword in source:
            result[keyword] = copy.deepcopy(source[keyword])


def copy_series_anatomy(source: Dataset, result: Dataset) -> None:
    """Copy Body Part Examined and Laterality of the General Series module (no builder sets them).

    dciodvfy requires Laterality unless the body part is known to be unpaired; when the source names
    neither, Laterality is sent empty ("unknown"), as PS3.3 allows for this Type 2C attribute.
    """
    for keyword in ("BodyPartExamined", "Laterality"):
        if source.get(keyword) and keyword not in result:
            result[keyword] = source[keyword]
    if "BodyPartExamined" not in result and "Laterality" not in result:
        result.Laterality = ""
