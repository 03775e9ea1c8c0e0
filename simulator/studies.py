"""The synthetic scanner: anatomy (simulator/phantom.py) seen through a named scanner condition (simulator/scanner.py),
written as DICOM.

A condition is a manufacturer, model, reconstruction kernel and dose (CT: kVp, mAs, CTDIvol) or field strength
and sequence (TOF-MRA). Its effects, in order: kVp and vendor calibration bend the high range (contrast, bone);
the kernel acts as an in-plane MTF (soft blurs, sharp boosts edges and rings at its cut-off); CT noise has a
ramp-shaped (non-white) spectrum shaped by the same kernel and a std ∝ 1/sqrt(mAs); MRA gets an intensity
scale, a smooth bias field and Rician noise. Everything is deterministic in the seed, down to the file bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from simulator import phantom
from simulator.scanner import (  # noqa: F401 - re-exported: the contracts name them in simulator.studies
    CONDITIONS,
    ScannerCondition,
    SimulationError,
    calibrate,
    ct_values,
    load_conditions,
    mtf,
    scan_ct,
    scan_mr,
)

log = logging.getLogger(__name__)

Kind = Literal["head-cta", "head-mra", "chest-ct"]
KINDS: tuple[str, ...] = ("head-cta", "head-mra", "chest-ct")
Size = Literal["test", "eval", "full"]
HU_OFFSET = 1024  # stored = HU + 1024 (RescaleIntercept -1024)
MAX_LESION_MM = {"aneurysm": 40.0, "nodule": 60.0}

# (slices, matrix, in-plane spacing mm, slice spacing = thickness mm, grid centre (x, y, z) mm)
GEOMETRY: dict[tuple[str, str], tuple[int, int, float, float, tuple[float, float, float]]] = {
    ("head-cta", "full"): (300, 512, 0.5, 0.5, (0.0, 5.0, 0.0)),
    ("head-cta", "test"): (64, 128, 1.75, 2.5, (0.0, 5.0, 10.0)),
    ("head-mra", "full"): (200, 512, 0.5, 0.6, (0.0, 5.0, 5.0)),
    ("head-mra", "test"): (48, 128, 1.75, 2.5, (0.0, 5.0, 5.0)),
    ("chest-ct", "full"): (300, 512, 0.7, 1.0, (0.0, 0.0, -20.0)),
    ("chest-ct", "test"): (64, 128, 2.8, 5.0, (0.0, 0.0, -20.0)),
    # "eval": fine enough that a 2–3 mm aneurysm spans several voxels (clinical CTA/TOF is 0.4–0.8 mm), small
    # enough to simulate in about a second; the head slab covers the circle of Willis and the skull base
    ("head-cta", "eval"): (112, 256, 0.85, 1.0, (0.0, 5.0, 8.0)),
    ("head-mra", "eval"): (112, 256, 0.85, 1.0, (0.0, 5.0, 8.0)),
    ("chest-ct", "eval"): (128, 256, 1.4, 2.5, (0.0, 0.0, -20.0)),
}


# --- studies ----------------------------------------------------------------------------------------------------


@dataclass
class SimulatedStudy:
    """One simulated series: its DICOM datasets (sorted by slice position), the truth, and optionally the arrays."""

    datasets: list[Dataset]
    truth: dict[str, Any]
    values: np.ndarray | None = None
    anatomy: phantom.Anatomy | None = None


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _check_geometry(slices: int, matrix: int, spacing: float, thickness: float) -> None:
    if not (np.isfinite(spacing) and spacing > 0) or not (np.isfinite(thickness) and thickness > 0):
        raise SimulationError(f"pixel spacing and slice thickness must be positive, got {spacing} and {thickness} mm")
    if not (1 <= slices <= 2000) or not (16 <= matrix <= 1024):
        raise SimulationError(f"need 1–2000 slices and a 16–1024 matrix, got {slices} and {matrix}")


def resolve_condition(name: str, kind: str, extra: dict[str, ScannerCondition] | None = None) -> ScannerCondition:
    """The condition named ``name`` (user-defined ones win), checked against the study kind.

    Raises
    ------
    SimulationError
        Unknown kind or condition, or a CT condition for an MRA study (and the reverse).
    """
    if kind not in KINDS:
        raise SimulationError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    pool = {**CONDITIONS, **(extra or {})}
    if name not in pool:
        raise SimulationError(f"unknown condition {name!r}; known: {', '.join(sorted(pool))} (see --list)")
    cond = pool[name]
    want = "MR" if kind == "head-mra" else "CT"
    if cond.modality != want:
        raise SimulationError(f"condition {name!r} is {cond.modality} but a {kind} study needs a {want} condition")
    return cond


def simulate_study(
    kind: Kind,
    condition: str | ScannerCondition,
    seed: int,
    size: Size = "test",
    *,
    lesion_diameters_mm: Sequence[float] | None = None,
    n_lesions: int | None = None,
    spacing_mm: float | None = None,
    slice_thickness_mm: float | None = None,
    slices: int | None = None,
    matrix: int | None = None,
    extra_conditions: dict[str, ScannerCondition] | None = None,
    keep_arrays: bool = False,
) -> SimulatedStudy:
    """Simulate one study (a single series) of ``kind`` under ``condition`` for subject ``seed``.

    Long because most of it is the documented parameters and their checks; the work is in ``_datasets``
    and ``simulator.scanner``.

    Parameters
    ----------
    kind
        ``head-cta``, ``head-mra`` or ``chest-ct``.
    condition
        A condition name (built-in or in ``extra_conditions``) or a ``ScannerCondition``.
    seed
        Subject and noise seed; the same seed gives the same anatomy under every condition, and the same bytes.
    size
        ``test`` (≤128×128×64, 1.75–2.8 mm), ``eval`` (256×256, head 0.85 × 1 mm over the circle of Willis,
        chest 1.4 × 2.5 mm) or ``full`` (512×512, 200–300 slices).
    lesion_diameters_mm, n_lesions
        Fixed lesion diameters, or how many lesions to draw (default: 1–3 aneurysms, 1–4 nodules).
    spacing_mm, slice_thickness_mm, slices, matrix
        Override the geometry of ``size``.
    extra_conditions
        User-defined conditions (``load_conditions``).
    keep_arrays
        Keep the reconstructed values and the anatomy (with labels) on the result, for tests.

    Returns
    -------
    SimulatedStudy

    Raises
    ------
    SimulationError
        Unknown kind, size or condition; impossible geometry; a lesion that does not fit.
    """
    cond = (
        condition if isinstance(condition, ScannerCondition) else resolve_condition(condition, kind, extra_conditions)
    )
    if isinstance(condition, ScannerCondition):
        resolve_condition(cond.name, kind, {cond.name: cond})
    if size not in ("test", "eval", "full"):
        raise SimulationError(f"unknown size {size!r}; choose test, eval or full")
    n_z, n_xy, dxy, dz, centre = GEOMETRY[(kind, size)]
    n_z, n_xy = slices or n_z, matrix or n_xy
    dxy = dxy if spacing_mm is None else float(spacing_mm)
    dz = dz if slice_thickness_mm is None else float(slice_thickness_mm)
    _check_geometry(n_z, n_xy, dxy, dz)
    lesion_kind = "nodule" if kind == "chest-ct" else "aneurysm"
    for d in lesion_diameters_mm or ():
        if not (0 < d <= MAX_LESION_MM[lesion_kind]):
            body = "chest" if kind == "chest-ct" else "head"
            raise SimulationError(
                f"a {d} mm {lesion_kind} does not fit in the {body}: "
                f"diameters must be in (0, {MAX_LESION_MM[lesion_kind]:g}] mm"
            )
    grid = phantom.Grid.centred(centre, (n_z, n_xy, n_xy), (dz, dxy, dxy))
    anatomy_rng = np.random.default_rng([seed, KINDS.index(kind)])
    noise_rng = np.random.default_rng([seed, KINDS.index(kind), zlib.crc32(cond.name.encode())])
    values = ct_values(cond) if cond.modality == "CT" else {k: v[1] for k, v in phantom.MATERIALS.items()}
    diameters = list(lesion_diameters_mm) if lesion_diameters_mm else None
    if kind == "chest-ct":
        anat = phantom.chest(grid, anatomy_rng, values, keep_arrays, n_nodules=n_lesions, nodule_diameters=diameters)
    else:
        anat = phantom.head(grid, anatomy_rng, values, keep_arrays, n_aneurysms=n_lesions, aneurysm_diameters=diameters)
    truth_image = anat.image.copy() if keep_arrays else None
    if cond.modality == "CT":
        recon = scan_ct(anat.image, cond, grid.spacing, noise_rng)
        stored = np.clip(np.rint(recon) + HU_OFFSET, 0, 32767).astype(np.int16)
    else:
        recon = scan_mr(anat.image, cond, grid.spacing, noise_rng)
        stored = np.clip(np.rint(recon), 0, 32767).astype(np.int16)
    anat.image = truth_image if keep_arrays else anat.image
    datasets, uids = _datasets(kind, cond, seed, grid, stored)
    truth = {
        "kind": kind,
        "condition": cond.name,
        "condition_fields": dataclasses.asdict(cond),
        "seed": seed,
        **uids,
        "geometry": {
            "shape": list(grid.shape),
            "spacing": list(grid.spacing),
            "origin": [float(grid.x[0]), float(grid.y[0]), float(grid.z[0])],
        },
        "lesions": anat.lesions,
        "landmarks": anat.landmarks,
    }
    log.info("simulated %s under %s: %d slices, %d lesions", kind, cond.name, n_z, len(anat.lesions))
    return SimulatedStudy(datasets, truth, recon if keep_arrays else None, anat if keep_arrays else None)


def _datasets(
    kind: str, cond: ScannerCondition, seed: int, grid: phantom.Grid, stored: np.ndarray
) -> tuple[list[Dataset], dict[str, str]]:
    """The DICOM instances of one simulated series, and the study's truth UIDs.

    Long because it writes a DICOM header attribute by attribute, module by module, as a scanner does.
    """
    rng = np.random.default_rng([seed, 7])
    study_uid = _uid("study", seed, kind)
    series_uid = _uid("series", seed, kind, cond.name)
    frame_uid = _uid("frame", seed, kind, cond.name)
    day = date(2023, 1, 1) + timedelta(days=int(rng.integers(0, 700)))
    when = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    birth = date(int(rng.integers(1935, 2000)), int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    ct = cond.modality == "CT"
    body = "CHEST" if kind == "chest-ct" else "HEAD"
    common: dict[str, Any] = {
        "SpecificCharacterSet": "ISO_IR 100",
        "SOPClassUID": CTImageStorage if ct else MRImageStorage,
        "InstanceCreationDate": day.strftime("%Y%m%d"),
        "InstanceCreationTime": when,
        "StudyDate": day.strftime("%Y%m%d"),
        "SeriesDate": day.strftime("%Y%m%d"),
        "AcquisitionDate": day.strftime("%Y%m%d"),
        "ContentDate": day.strftime("%Y%m%d"),
        "StudyTime": when,
        "SeriesTime": when,
        "AcquisitionTime": when,
        "ContentTime": when,
        "AccessionNumber": f"SIM{seed:08d}"[-16:],
        "Modality": cond.modality,
        "Manufacturer": cond.manufacturer,
        "InstitutionName": "Harmonode Synthetic Hospital",
        "ReferringPhysicianName": "",
        "StationName": "SIMSCANNER",
        "StudyDescription": {"head-cta": "CTA HEAD", "head-mra": "MRA HEAD TOF", "chest-ct": "CT CHEST"}[kind],
        "SeriesDescription": f"{kind} {cond.kernel or cond.sequence}".strip(),
        "ManufacturerModelName": cond.model,
        "DeviceSerialNumber": f"{zlib.crc32(cond.model.encode()) % 100000:05d}",
        "SoftwareVersions": "harmonode-sim 1",
        "PatientName": f"SIM^{seed}",
        "PatientID": f"SIM{seed:06d}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": "MF"[int(rng.integers(0, 2))],
        "BodyPartExamined": body,
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "StudyID": f"{seed % 100000}",
        "SeriesNumber": 2 if ct else 3,
        "AcquisitionNumber": 1,
        "PatientPosition": "HFS",
        "FrameOfReferenceUID": frame_uid,
        "PositionReferenceIndicator": "",
        "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
        "PixelSpacing": [round(grid.spacing[1], 6), round(grid.spacing[2], 6)],
        "SliceThickness": round(grid.spacing[0], 6),
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": grid.shape[1],
        "Columns": grid.shape[2],
        "BitsAllocated": 16,
        "BitsStored": 16,
        "HighBit": 15,
        "PixelRepresentation": 1,
    }
    if ct:
        common.update(
            {
                "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
                "RescaleIntercept": -HU_OFFSET,
                "RescaleSlope": 1,
                "RescaleType": "HU",
                "KVP": cond.kvp,
                "Exposure": int(round(cond.mas)),
                "ExposureTime": int(round(cond.exposure_time_ms)),
                "XRayTubeCurrent": int(round(cond.mas * 1000.0 / cond.exposure_time_ms)),
                "CTDIvol": cond.ctdi,
                "ConvolutionKernel": cond.kernel,
                "DataCollectionDiameter": 500,
                "ReconstructionDiameter": round(grid.spacing[2] * grid.shape[2], 3),
                "GantryDetectorTilt": 0,
                "RotationDirection": "CW",
                "FilterType": "BODY" if body == "CHEST" else "HEAD",
                "SpiralPitchFactor": 0.98,
                "WindowCenter": 40 if body == "CHEST" else 200,
                "WindowWidth": 400 if body == "CHEST" else 700,
            }
        )
        if kind == "head-cta":
            common.update({"ContrastBolusAgent": "Iohexol 350 mgI/ml", "ContrastBolusRoute": "IV"})
    else:
        common.update(
            {
                "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
                "ScanningSequence": ["GR"],
                "SequenceVariant": ["SP", "OSP"],
                "ScanOptions": "",
                "MRAcquisitionType": "3D",
                "SequenceName": cond.sequence,
                "AngioFlag": "Y",
                "RepetitionTime": cond.repetition_time,
                "EchoTime": cond.echo_time,
                "EchoTrainLength": 1,
                "FlipAngle": cond.flip_angle,
                "MagneticFieldStrength": cond.field_strength,
                "ImagingFrequency": round(42.577478 * cond.field_strength, 6),
                "ImagedNucleus": "1H",
                "NumberOfAverages": 1,
                "SpacingBetweenSlices": round(grid.spacing[0], 6),
                "WindowCenter": int(cond.mr_scale * 0.5),
                "WindowWidth": int(cond.mr_scale),
            }
        )
    datasets = []
    for k in range(grid.shape[0]):
        ds = Dataset()
        for keyword, value in common.items():
            setattr(ds, keyword, value)
        ds.SOPInstanceUID = _uid("instance", seed, kind, cond.name, k)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(grid.x[0]), 4), round(float(grid.y[0]), 4), round(float(grid.z[k]), 4)]
        ds.SliceLocation = round(float(grid.z[k]), 4)
        ds.PixelData = stored[k].astype("<i2").tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "HARMONODE_SIM"
        ds.file_meta = meta
        datasets.append(ds)
    return datasets, {
        "study_instance_uid": study_uid,
        "series_instance_uid": series_uid,
        "frame_of_reference_uid": frame_uid,
    }


def write_study(study: SimulatedStudy, out_dir: str | Path) -> list[Path]:
    """Write the study's DICOM files (``CT000001.dcm`` …) and its ``truth.json`` sidecar into ``out_dir``.

    Parameters
    ----------
    study
        From ``simulate_study``.
    out_dir
        Directory, created if missing.

    Returns
    -------
    list[Path]
        The DICOM files, then ``truth.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in study.datasets:
        path = out / f"{ds.Modality}{int(ds.InstanceNumber):06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    truth = out / "truth.json"
    truth.write_text(json.dumps(study.truth, indent=1, sort_keys=True) + "\n")
    paths.append(truth)
    return paths


def send_files(
    paths: Iterable[str | Path], host: str, port: int, called_aet: str, calling_aet: str = "SIMSCANNER"
) -> int:
    """Push DICOM files over C-STORE as a scanner does: one association, only the SOP classes sent, Nagle off.

    Parameters
    ----------
    paths
        Files to send; non-DICOM files (``truth.json``) are skipped.
    host, port, called_aet, calling_aet
        The peer and our AE title.

    Returns
    -------
    int
        Instances the peer accepted (status 0x0000 or a warning).

    Raises
    ------
    ConnectionError
        The association was refused or aborted.
    """
    import socket

    from pydicom import dcmread
    from pynetdicom import AE, evt

    files = [Path(p) for p in paths if Path(p).suffix.lower() == ".dcm"]
    datasets = [dcmread(p) for p in files]
    if not datasets:
        return 0

    def nodelay(event: evt.Event) -> None:
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    ae = AE(ae_title=calling_aet)
    for sop_class, syntax in sorted({(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(host, port, ae_title=called_aet, evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
    if not assoc.is_established:
        raise ConnectionError(f"association with {called_aet}@{host}:{port} was not established")
    stored = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if status and int(getattr(status, "Status", 0xFFFF)) in (0x0000, 0xB000, 0xB007, 0xB006):
                stored += 1
            else:
                log.warning("peer refused instance %d: status %s", ds.InstanceNumber, getattr(status, "Status", None))
            if not assoc.is_established:
                raise ConnectionError(f"association with {called_aet}@{host}:{port} aborted")
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("sent %d/%d instances to %s@%s:%d", stored, len(datasets), called_aet, host, port)
    return stored
