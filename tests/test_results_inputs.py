"""Every object the node creates is valid, from every kind of input: dciodvfy and dcentvfy over them.

Inputs: a simulated head CTA through the whole pipeline (detector included), and pseudo-series built
from each CT and MR file shipped offline with pydicom (its test files) and the ``pydicom-data`` package
(compressed, big endian, de-identified, odd vendors, enhanced multi-frame). Each file becomes a series of
``SLICES`` copies a slice apart (new UIDs, its own bytes and transfer syntax kept), is stored as a C-STORE
stores it and runs through the pipeline; then the results are built once more with one finding at the
volume's centre, so that the GSPS, SEG and KOS are built from every input the detector can be run on.
Nothing is downloaded: a file not installed is simply not in the list.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import generate_uid

from builders import shipped_dicom_files
from handlers.results import AlgorithmInfo, build_results
from handlers.store import StoreRefused, store_encoded
from models.findings import Finding
from node.config import PipelineConfig
from node.pipeline import DetectorSlot, Worker, load_series, run_series
from peers import dcentvfy_report, dciodvfy_errors
from simulator.studies import simulate_study
from storage.store import Store, open_store

SLICES = 8
CT_MR = {"CT", "MR"}


def shipped_files() -> list[Path]:
    """CT and MR files of pydicom's test files and of pydicom-data, one per series directory."""
    picked: dict[str, Path] = {}
    for path in shipped_dicom_files():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM, or not readable: not an input
            continue
        if ds.get("Modality") not in CT_MR:
            continue
        key = str(path.parent) if "dicomdirtests" in path.parts else str(path)
        picked.setdefault(key, path)
    return sorted(picked.values())


def pseudo_series(path: Path, slices: int = SLICES) -> list[bytes]:
    """``slices`` encoded copies of one file, a slice apart along its normal, in a new series of its study.

    A multi-frame (Enhanced) file is a series on its own: its frames are the slices, so it is stored once.
    """
    original = pydicom.dcmread(path)
    if int(original.get("NumberOfFrames", 1) or 1) > 1:
        slices = 1
    series_uid = generate_uid(entropy_srcs=[str(path), "series"])
    iop = np.asarray(original.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
    normal = np.cross(iop[:3], iop[3:])
    step = float(original.get("SpacingBetweenSlices") or original.get("SliceThickness") or 1.0) or 1.0
    origin = np.asarray(original.get("ImagePositionPatient", [0, 0, 0]), float)
    out = []
    for k in range(slices):
        ds = copy.deepcopy(original)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(path), str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        if "ImagePositionPatient" in original:
            ds.ImagePositionPatient = [round(float(v), 4) for v in origin + k * step * normal]
            if "SliceLocation" in original:
                ds.SliceLocation = round(float(original.SliceLocation) + k * step, 4)
        buf = BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "node") as s:
        yield s


def _receive(store: Store, encoded: list[bytes]) -> str:
    series = ""
    for data in encoded:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
        store_encoded(data, str(ds.file_meta.TransferSyntaxUID), "", "", store.files, store.index)
        series = str(ds.SeriesInstanceUID)
    return series


def _validate(sources: list[Path], created: list[Path]) -> None:
    """dciodvfy on each created object, dcentvfy over the sources and the created objects together.

    An error dciodvfy also finds in the source itself is the source's (a result repeats the source's UIDs and
    Patient module as they are): it is not counted against the result.
    """
    inherited = set(dciodvfy_errors(sources[0]))
    for path in created:
        assert [e for e in dciodvfy_errors(path) if e not in inherited] == [], path.name
    errors, _ = dcentvfy_report([*sources, *created])
    assert errors == []


def _paths(store: Store, series_uid: str) -> list[Path]:
    return [store.files.abspath(r["path"]) for r in store.index.instances_of_series(series_uid)]


def test_simulated_study_through_the_pipeline(store: Store) -> None:
    study = simulate_study("head-cta", "ge-revolution-standard", seed=5, size="test", lesion_diameters_mm=[9.0])
    for ds in study.datasets:
        ds.StudyDescription = "CTA HEAD"
        ds.ReferringPhysicianName = "Referrer^Rita"
    uid = _receive(store, [_encode(ds) for ds in study.datasets])
    settings = PipelineConfig(write_harmonized_series=True)  # SEG by default; the derived series asked for
    outcome = run_series(Worker(store.files, store.index, store.queue, settings, (), DetectorSlot()), uid)
    kinds = {pydicom.dcmread(store.files.abspath(r.path), stop_before_pixels=True).Modality for r in outcome.results}
    assert outcome.detection.findings and kinds == {"SR", "OT", "PR", "SEG", "KO", "CT"}
    _validate(_paths(store, uid), [store.files.abspath(r.path) for r in outcome.results])


def _encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


# What the shipped Enhanced CT/MR files are refused for: pydicom's Enhanced CT has two frames; its
# Enhanced MR files (every transfer syntax) carry no functional groups; one of them is cut short.
ENHANCED_REFUSALS = {
    "eCT_Supplemental.dcm": "2 slice(s)",
    "emri_small.dcm": "no per-frame functional groups",
    "emri_small_RLE.dcm": "no per-frame functional groups",
    "emri_small_big_endian.dcm": "no per-frame functional groups",
    "emri_small_jpeg_2k_lossless.dcm": "no per-frame functional groups",
    "emri_small_jpeg_ls_lossless.dcm": "no per-frame functional groups",
}


def _sr_text(created: list[Path]) -> str:
    """The text values of the SRs among ``created``, joined."""
    texts: list[str] = []

    def walk(items: list[Dataset]) -> None:
        for item in items:
            if item.get("ValueType") == "TEXT":
                texts.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    for path in created:
        ds = pydicom.dcmread(path)
        if ds.Modality == "SR":
            walk(ds.ContentSequence)
    return "\n".join(texts)


ALGORITHM = AlgorithmInfo(name="harmonode-detector", version="inputs-test", rule_match="identity")


@pytest.mark.parametrize("path", shipped_files(), ids=lambda p: p.name)
def test_pseudo_series_of_a_shipped_file(path: Path, store: Store, tmp_path: Path) -> None:
    try:
        encoded = pseudo_series(path)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"cannot be copied into a series: {type(exc).__name__}: {exc}")
    try:
        uid = _receive(store, encoded)
    except StoreRefused as exc:  # refused at the door, with a DICOM failure status: nothing to build
        assert str(exc)
        return
    worker = Worker(store.files, store.index, store.queue, PipelineConfig(), (), DetectorSlot())
    outcome = run_series(worker, uid)
    created = [store.files.abspath(r.path) for r in outcome.results]
    sources = _paths(store, uid)
    _validate(sources, created)
    loaded = load_series(store.files, store.index.instances_of_series(uid))
    if loaded.volume is None:
        print(f"{path.name}: not analysed: {loaded.refused}")
        assert loaded.refused and loaded.refused in _sr_text(created)  # the SR says why, specifically
        if path.name in ENHANCED_REFUSALS:
            assert ENHANCED_REFUSALS[path.name] in loaded.refused
        return
    geometry = loaded.volume.geometry
    centre = tuple(float(v) for v in geometry.index_to_patient(tuple((n - 1) / 2 for n in geometry.shape)))
    finding = Finding("aneurysm", centre, 6.0, 0.8, tracking_id="centre", tracking_uid=generate_uid())
    objects = build_results(loaded.volume.datasets, geometry, [finding], ALGORITHM, True, values=loaded.volume.values)
    with_frame = bool(loaded.volume.datasets[0].get("FrameOfReferenceUID"))  # a SEG needs one
    assert [ds.Modality for ds in objects][-3:] == (["PR", "SEG", "KO"] if with_frame else ["OT", "PR", "KO"])
    written = []
    for n, ds in enumerate(objects):
        written.append(tmp_path / f"{n}-{ds.Modality}.dcm")
        ds.save_as(written[-1], enforce_file_format=True)
    _validate(sources, written)
