"""Condition keys: normalization, dose buckets, MR families, odd tags, stable string form."""

from __future__ import annotations

import pytest

from rules.keys import ConditionKey, KeyParseError, dose_bucket, normalize_kernel, normalize_manufacturer


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("GE MEDICAL SYSTEMS", "ge"),
        ("GE Healthcare", "ge"),
        ("SIEMENS", "siemens"),
        ("Siemens Healthineers", "siemens"),
        ("Philips Medical Systems", "philips"),
        ("CANON_MEC", "canon"),
        ("TOSHIBA", "canon"),
        ("Acme Imaging, Inc.", "acme-imaging-inc"),
        ("", "unknown"),
        (None, "unknown"),
    ],
)
def test_manufacturer(raw: object, expected: str) -> None:
    assert normalize_manufacturer(raw) == expected


def test_kernel_multi_valued() -> None:
    assert normalize_kernel("FC43\\AIDR 3D") == "fc43+aidr-3d"
    assert normalize_kernel(["Br40d", "3"]) == "br40d+3"
    assert normalize_kernel("") == "unknown"


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"CTDIvol": "14.5", "Exposure": "900"}, "ctdi5-15"),
        ({"CTDIvol": "61"}, "ctdi>60"),
        ({"CTDIvol": "", "Exposure": "90"}, "mas50-100"),
        ({"XRayTubeCurrent": "300", "ExposureTime": "1000"}, "mas200-400"),
        ({"XRayTubeCurrent": "300"}, "unknown"),
        ({"CTDIvol": "abc"}, "unknown"),
        ({"CTDIvol": "nan"}, "unknown"),
    ],
)
def test_dose_bucket(tags: dict, expected: str) -> None:
    assert dose_bucket(tags) == expected


def test_dose_edges_configurable() -> None:
    assert dose_bucket({"CTDIvol": "14.5"}, ctdi_edges=(10, 20)) == "ctdi10-20"


def test_ct_key_and_round_trip() -> None:
    tags = {
        "Manufacturer": "GE MEDICAL SYSTEMS",
        "ManufacturerModelName": "Optima CT660",
        "ConvolutionKernel": "BONE",
        "KVP": "100",
        "CTDIvol": "14.5",
    }
    key = ConditionKey.from_tags(tags, "CT")
    assert str(key) == "CT|ge|optima-ct660|bone|ctdi5-15|100kv|unknown"
    assert str(ConditionKey.from_tags({**tags, "BodyPartExamined": "HEAD"}, "CT")).endswith("|100kv|head")
    assert ConditionKey.parse(str(key)) == key
    assert str(ConditionKey.parse(str(key))) == str(key)


def test_mr_key() -> None:
    tags = {
        "Manufacturer": "SIEMENS",
        "ManufacturerModelName": "Skyra",
        "MagneticFieldStrength": "3",
        "ScanningSequence": "GR",
        "SequenceVariant": "SP\\OSP",
        "SequenceName": "fl3d1r_t70",
        "MRAcquisitionType": "3D",
    }
    key = ConditionKey.from_tags(tags, "MR")
    assert str(key) == "MR|siemens|skyra|3t|tof|unknown"
    assert ConditionKey.from_tags({**tags, "ProtocolName": "tof_fl3d_tra_p3"}, "MR").region == "head"
    assert ConditionKey.from_tags({**tags, "MagneticFieldStrength": "15000"}, "MR").field == "1.5t"
    assert ConditionKey.from_tags({"SequenceName": "T1FFE TOF"}, "MR").sequence == "tof"
    assert ConditionKey.from_tags({"ScanningSequence": "SE"}, "MR").sequence == "se"


@pytest.mark.parametrize(
    "tags",
    [{}, {"KVP": "x", "CTDIvol": "-3", "Manufacturer": "\\"}, {"Manufacturer": "|||"}, None, {"KVP": ["1", "2"]}],
)
def test_odd_tags_give_unknown_never_raise(tags: object) -> None:
    key = ConditionKey.from_tags(tags, "CT")  # type: ignore[arg-type]
    assert key.modality == "CT"
    assert ConditionKey.parse(str(key)) == key
    assert "|" not in key.manufacturer


def test_unknown_modality() -> None:
    assert str(ConditionKey.from_tags({}, "")) == "unknown|unknown|unknown|unknown|unknown|unknown|unknown"
    assert ConditionKey.from_tags({}, "PT").modality == "pt"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "CT|ge",
        "CT|ge|a|b",
        "CT|ge|a|b|c|d|e|f",
        "MR|ge|a|b",
        "MR|ge|a|b|c|d|e",
        "CT|GE|a|b|c|d",
        "ct|a b|c|d|e|f",
        "CT|ge|a|b|c|d|HEAD",
        3,
    ],
)
def test_parse_rejects(text: object) -> None:
    with pytest.raises(KeyParseError):
        ConditionKey.parse(text)  # type: ignore[arg-type]


def test_generalize() -> None:
    key = ConditionKey.parse("CT|ge|optima-ct660|bone|ctdi5-15|100kv|head")
    assert str(key.generalize(("dose",))) == "CT|ge|optima-ct660|bone|*|100kv|head"
    assert str(key.generalize(("dose", "region"))) == "CT|ge|optima-ct660|bone|*|100kv|*"
    assert str(ConditionKey.parse("MR|ge|x|3t|tof|head").generalize(("dose",))) == "MR|ge|x|3t|tof|head"
