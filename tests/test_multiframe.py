"""Enhanced CT multi-frame series through the whole pipeline: the volume from the per-frame functional groups,
the refusals of what is not one stack, and results that reference (SOP Instance UID, frame number).

The Enhanced CT is the simulator's head CTA assembled into one instance (highdicom's legacy conversion, then
the Enhanced CT class and the CT macros filled from the slices), beside its single-frame twin.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import generate_uid

from models.multiframe import frame_number
from models.volume import VolumeRefused, build_volume
from node.config import PipelineConfig
from node.pipeline import DetectorSlot, Worker, run_series
from peers import dcentvfy_report, dciodvfy_errors
from simulator.studies import simulate_study
from storage.store import Store, open_store

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _item(**attributes: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def enhanced_ct(slices: list[Dataset]) -> Dataset:
    """One Enhanced CT instance of single-frame CT slices (a new series of their study, same frame of reference).

    highdicom's legacy conversion lays out the functional groups; the CT macros the Enhanced CT IOD requires
    (acquisition, reconstruction, exposure …) are filled from the first slice.
    """
    first = slices[0]
    ds = hd.legacy.LegacyConvertedEnhancedCTImage(
        slices, generate_uid(entropy_srcs=[str(first.SeriesInstanceUID), "enhanced"]), 2, generate_uid(), 1
    )
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    shared = ds.SharedFunctionalGroupsSequence[0]
    shared.IrradiationEventIdentificationSequence = [_item(IrradiationEventUID=generate_uid())]
    shared.CTAcquisitionTypeSequence = [_item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO",
                                              FluoroscopyFlag="NO")]  # fmt: skip
    shared.CTAcquisitionDetailsSequence = [
        _item(
            DataCollectionDiameter=first.get("DataCollectionDiameter", 500),
            GantryDetectorTilt=0,
            TableHeight=first.get("TableHeight", 150),
            RotationDirection="CW",
            RevolutionTime=0.5,
            SingleCollimationWidth=0.625,
            TotalCollimationWidth=40,
        )  # fmt: skip
    ]
    shared.CTTableDynamicsSequence = [_item(TableSpeed=40, TableFeedPerRotation=20, SpiralPitchFactor=0.5)]
    shared.CTGeometrySequence = [_item(DistanceSourceToDetector=1000, DistanceSourceToDataCollectionCenter=540)]
    shared.CTReconstructionSequence = [
        _item(
            ReconstructionAlgorithm="FILTER_BACK_PROJ",
            ReconstructionAngle=360,
            ConvolutionKernel=first.get("ConvolutionKernel", "STD"),
            ConvolutionKernelGroup="BRAIN",
            ReconstructionDiameter=first.get("ReconstructionDiameter", 224),
            ReconstructionPixelSpacing=first.PixelSpacing,
            ImageFilter="NONE",
        )  # fmt: skip
    ]
    shared.CTExposureSequence = [
        _item(
            ExposureTimeInms=500,
            XRayTubeCurrentInmA=200,
            ExposureInmAs=100,
            ExposureModulationType="NONE",
            CTDIvol=first.get("CTDIvol", 40),
        )  # fmt: skip
    ]
    shared.CTXRayDetailsSequence = [_item(KVP=first.get("KVP", 120), FocalSpots=[0.7], FilterType="BODY",
                                          FilterMaterial=["ALUMINUM"])]  # fmt: skip
    for n, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        content = frame.FrameContentSequence[0]
        content.FrameReferenceDateTime = f"{first.get('StudyDate', '20240101')}120000.{n:06d}"
        content.FrameAcquisitionDuration = 500
        frame.CTPositionSequence = [_item(TablePosition=float(frame.PlanePositionSequence[0].ImagePositionPatient[2]),
                                          ReconstructionTargetCenterPatient=[0, 0, 0],
                                          DataCollectionCenterPatient=[0, 0, 0])]  # fmt: skip
    ds.AcquisitionDuration = 0.5 * len(slices)
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if "ReferencedSeriesSequence" in ds:  # the conversion's names no instance: dciodvfy refuses that
        del ds.ReferencedSeriesSequence
    return ds


def _encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def twin() -> tuple[list[Dataset], Dataset]:
    study = simulate_study("head-cta", "ge-revolution-standard", seed=5, size="test", lesion_diameters_mm=[9.0])
    # written and read back, as the node stores and reads it
    return study.datasets, pydicom.dcmread(BytesIO(_encode(enhanced_ct(study.datasets))))


def test_the_frames_make_the_volume_of_the_single_frame_twin(twin: tuple[list[Dataset], Dataset]) -> None:
    slices, enhanced = twin
    single, multi = build_volume(slices), build_volume([enhanced])
    assert multi.geometry == single.geometry
    assert np.array_equal(multi.values, single.values) and multi.stored is not None
    numbers = [frame_number(ds) for ds in multi.datasets]
    assert sorted(numbers) == list(range(1, len(slices) + 1))  # type: ignore[type-var]
    for k, ds in enumerate(multi.datasets):  # each slice knows its frame, whose position is the volume's k
        item = enhanced.PerFrameFunctionalGroupsSequence[numbers[k] - 1]  # type: ignore[operator]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, multi.geometry.index_to_patient((k, 0, 0)))
        assert ds.SOPInstanceUID == enhanced.SOPInstanceUID


def _frames(ds: Dataset) -> list[Dataset]:
    return list(ds.PerFrameFunctionalGroupsSequence)


def _frame_type(ds: Dataset, value: list[str], technique: str = "NONE") -> None:
    item = _frames(ds)[3]
    item.CTImageFrameTypeSequence = [_item(FrameType=value, PixelPresentation="MONOCHROME",
                                           VolumetricProperties="VOLUME",
                                           VolumeBasedCalculationTechnique=technique)]  # fmt: skip


@pytest.mark.parametrize(
    "mutation, reason",
    [
        (lambda ds: _frame_type(ds, ["ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"]), "frame 4 is a localizer"),
        (lambda ds: _frame_type(ds, ["DERIVED", "PRIMARY", "AXIAL", "MAXIMUM"], "MAX_IP"), "computed from a volume"),
        (lambda ds: _frames(ds)[5].__delattr__("PlanePositionSequence"), "frame 6 has no Plane Position"),
        (
            lambda ds: _frames(ds)[2].__setattr__(
                "PlaneOrientationSequence", [_item(ImageOrientationPatient=[0, 1, 0, 0, 0, -1])]
            ),
            "mixed orientations",
        ),
        (lambda ds: ds.__setattr__("PerFrameFunctionalGroupsSequence", _frames(ds)[:-1]), "63 per-frame"),
        (lambda ds: ds.__delattr__("PerFrameFunctionalGroupsSequence"), "no per-frame functional groups"),
    ],
    ids=["localizer-frame", "mip-frame", "no-position", "mixed-orientation", "frames-miscounted", "no-groups"],
)
def test_what_is_not_one_stack_is_refused_with_its_reason(twin, mutation, reason) -> None:  # noqa: ANN001
    enhanced = copy.deepcopy(twin[1])
    mutation(enhanced)
    with pytest.raises(VolumeRefused, match=reason):
        build_volume([enhanced])


def test_a_gap_between_frames_is_refused(twin) -> None:  # noqa: ANN001
    enhanced = copy.deepcopy(twin[1])
    position = _frames(enhanced)[10].PlanePositionSequence[0]
    position.ImagePositionPatient = [*position.ImagePositionPatient[:2], float(position.ImagePositionPatient[2]) + 1.0]
    with pytest.raises(VolumeRefused, match="uneven|share a position"):
        build_volume([enhanced])


def test_several_multiframe_instances_and_a_short_one_are_refused(twin) -> None:  # noqa: ANN001
    with pytest.raises(VolumeRefused, match="one multi-frame instance"):
        build_volume([twin[1], copy.deepcopy(twin[1])])
    with pytest.raises(VolumeRefused, match="2 slice"):  # pydicom's Enhanced CT has two frames
        build_volume([pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "node") as s:
        yield s


def _receive(store: Store, datasets: list[Dataset]) -> str:
    from handlers.store import store_encoded

    for ds in datasets:
        store_encoded(_encode(ds), str(ds.file_meta.TransferSyntaxUID), "", "", store.files, store.index)
    return str(datasets[0].SeriesInstanceUID)


def _planar_references(sr: Dataset) -> list[tuple[str, int | None]]:
    """(SOP Instance UID, frame number) of each image region's source in the SR's measurement groups."""
    found: list[tuple[str, int | None]] = []

    def walk(items: list[Dataset]) -> None:
        for item in items:
            if item.ValueType == "SCOORD":
                for child in item.get("ContentSequence", []):
                    ref = child.ReferencedSOPSequence[0]
                    frame = ref.get("ReferencedFrameNumber")
                    found.append((str(ref.ReferencedSOPInstanceUID), None if frame is None else int(frame)))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


@pytest.mark.peers
def test_enhanced_ct_through_the_pipeline_like_its_twin(twin, store: Store) -> None:  # noqa: ANN001
    slices, enhanced = twin
    settings = PipelineConfig(write_harmonized_series=True)
    outcomes = []
    for series in (slices, [enhanced]):
        uid = _receive(store, series)
        outcomes.append(run_series(Worker(store.files, store.index, store.queue, settings, (), DetectorSlot()), uid))
    single, multi = outcomes
    assert multi.detection.findings and len(multi.detection.findings) == len(single.detection.findings)
    voxel = np.linalg.norm(build_volume(slices).geometry.spacing)
    for a, b in zip(single.detection.findings, multi.detection.findings, strict=True):
        assert np.linalg.norm(np.subtract(a.center_mm, b.center_mm)) <= voxel
    created = [store.files.abspath(r.path) for r in multi.results]
    kinds = [pydicom.dcmread(p, stop_before_pixels=True).Modality for p in created]
    assert set(kinds) == {"SR", "OT", "PR", "SEG", "KO"}  # no harmonized copy of a multi-frame series (yet)
    source = [store.files.abspath(r["path"]) for r in store.index.instances_of_series(str(enhanced.SeriesInstanceUID))]
    for path in [*source, *created]:  # the Enhanced CT built here is valid too
        assert dciodvfy_errors(path) == [], path.name
    errors, _ = dcentvfy_report([*source, *created])
    assert errors == []
    sr = pydicom.dcmread(created[kinds.index("SR")])
    references = _planar_references(sr)
    assert len(references) == len(multi.detection.findings)
    frames = int(enhanced.NumberOfFrames)
    assert all(
        uid == enhanced.SOPInstanceUID and frame is not None and 1 <= frame <= frames for uid, frame in references
    )
    seg = pydicom.dcmread(created[kinds.index("SEG")])
    seg_sources = {
        (str(s.ReferencedSOPInstanceUID), int(s.ReferencedFrameNumber))
        for f in seg.PerFrameFunctionalGroupsSequence
        for s in f.DerivationImageSequence[0].SourceImageSequence
    }
    assert set(references) <= seg_sources  # each finding's centre frame is segmented, named by its frame
