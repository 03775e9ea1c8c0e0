"""The body region of a condition key: where it is read from, its vocabulary, old keys without it, the detector."""

from __future__ import annotations

import pytest

from rules.keys import ANY, REGION_SOURCES, BodyPart, ConditionKey, body_part_of, body_region
from storage.meta import CONDITION_KEYWORDS, series_condition_tags

GE = {"Manufacturer": "GE MEDICAL SYSTEMS", "ManufacturerModelName": "Revolution CT", "ConvolutionKernel": "STANDARD"}


@pytest.mark.parametrize(
    ("tags", "region"),
    [
        ({"BodyPartExamined": "HEAD"}, "head"),
        ({"BodyPartExamined": "BRAIN"}, "head"),
        ({"BodyPartExamined": "SKULL"}, "head"),
        ({"BodyPartExamined": "CIRCLEOFWILLIS"}, "head"),
        ({"BodyPartExamined": "NECK"}, "neck"),
        ({"BodyPartExamined": "CHEST"}, "chest"),
        ({"BodyPartExamined": "THORAX"}, "chest"),
        ({"BodyPartExamined": "LUNG"}, "chest"),
        ({"BodyPartExamined": "ABDOMEN"}, "abdomen"),
        ({"BodyPartExamined": "PELVIS"}, "pelvis"),
        ({"BodyPartExamined": "LSPINE"}, "spine"),
        ({"BodyPartExamined": "KNEE"}, "extremity"),
        ({"BodyPartExamined": "CHESTABDOMEN"}, "chest-abdomen"),
        ({"BodyPartExamined": "HEART"}, "heart"),  # outside the vocabulary: its slug
        ({"BodyPartExamined": "Breast (L)"}, "breast-l"),
        ({"ProtocolName": "CTA HEAD"}, "head"),
        ({"ProtocolName": "CTA Head/Neck 0.6"}, "head-neck"),
        ({"ProtocolName": "tof_fl3d_tra_p2"}, "head"),  # a TOF protocol naming no region: intracranial
        ({"ProtocolName": "MRA runoff"}, "extremity"),
        ({"SeriesDescription": "Thorax 1.0 B70f"}, "chest"),
        ({"SeriesDescription": "Lung 1.25mm"}, "chest"),
        ({"StudyDescription": "CT CHEST ABD PELVIS W CONTRAST"}, "chest-abdomen-pelvis"),
        ({"ProtocolName": "routine 5mm", "SeriesDescription": "axial"}, "unknown"),
        ({"BodyPartExamined": "  "}, "unknown"),
        ({}, "unknown"),
    ],
)
def test_region_vocabulary(tags: dict, region: str) -> None:
    assert body_region(tags) == region
    assert ConditionKey.from_tags({**GE, **tags}, "CT").region == region


def test_region_sources_in_order() -> None:
    tags = {
        "BodyPartExamined": "CHEST",
        "ProtocolName": "CTA HEAD",
        "SeriesDescription": "ABDOMEN",
        "StudyDescription": "PELVIS",
    }
    for source, expected in zip(REGION_SOURCES, ("chest", "head", "abdomen", "pelvis"), strict=True):
        assert body_region(tags) == expected, source
        tags.pop(source)
    assert body_region({"ProtocolName": "routine", "StudyDescription": "CT THORAX"}) == "chest"  # next one naming it


def test_region_sources_are_kept_at_ingest() -> None:
    assert set(REGION_SOURCES) <= set(CONDITION_KEYWORDS)


def test_series_indexed_before_descriptions_were_kept_reads_them_from_the_row() -> None:
    row = {"condition_tags": '{"Manufacturer": "GE"}', "series_description": "CT Thorax", "body_part_examined": ""}
    assert series_condition_tags(row) == {"Manufacturer": "GE", "SeriesDescription": "CT Thorax"}
    kept = {"condition_tags": '{"SeriesDescription": "CTA HEAD"}', "series_description": "CT Thorax"}
    assert series_condition_tags(kept)["SeriesDescription"] == "CTA HEAD"
    assert series_condition_tags({"condition_tags": "not json", "body_part_examined": "HEAD"}) == {
        "BodyPartExamined": "HEAD"
    }


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("CT|ge|optima-ct660|bone|ctdi5-15|100kv", "CT|ge|optima-ct660|bone|ctdi5-15|100kv|*"),
        ("CT|ge|*|*|*|*", "CT|ge|*|*|*|*|*"),
        ("MR|siemens|skyra|3t|tof", "MR|siemens|skyra|3t|tof|*"),
        ("pt|a|b|c|d|e", "pt|a|b|c|d|e|*"),
    ],
)
def test_keys_stored_before_regions_parse_as_every_region_and_round_trip(old: str, new: str) -> None:
    key = ConditionKey.parse(old)
    assert key.region == ANY and str(key) == new
    assert ConditionKey.parse(str(key)) == key
    assert key.stored_forms() == (new, old)


def test_key_with_region_round_trips_and_has_one_stored_form() -> None:
    key = ConditionKey.from_tags({**GE, "KVP": "120", "CTDIvol": "40", "BodyPartExamined": "CHEST"}, "CT")
    assert str(key) == "CT|ge|revolution-ct|standard|ctdi30-60|120kv|chest"
    assert ConditionKey.parse(str(key)) == key and key.stored_forms() == (str(key),)


def test_a_region_part_is_validated() -> None:
    with pytest.raises(ValueError, match="region="):
        ConditionKey("CT", region="Head Neck")


@pytest.mark.parametrize(
    ("tags", "description", "modality", "part"),
    [
        ({"BodyPartExamined": "CHEST"}, "", "CT", BodyPart.CHEST),
        ({"BodyPartExamined": "CHESTABDOMEN"}, "", "CT", BodyPart.CHEST),
        ({}, "CT THORAX low dose", "CT", BodyPart.CHEST),
        ({"ProtocolName": "Lung screening"}, "", "CT", BodyPart.CHEST),
        ({"BodyPartExamined": "HEAD"}, "lung window", "CT", BodyPart.HEAD),  # BodyPartExamined decides
        ({"BodyPartExamined": "CHEST"}, "", "MR", BodyPart.HEAD),
        ({}, "", "CT", BodyPart.HEAD),
    ],
)
def test_the_detector_task_follows_the_key_region(tags: dict, description: str, modality: str, part: BodyPart) -> None:
    assert body_part_of(tags, description, modality) is part
    key = ConditionKey.from_tags({**tags, "SeriesDescription": description} if description else tags, modality)
    assert (part is BodyPart.CHEST) == (modality == "CT" and "chest" in key.region.split("-"))


@pytest.mark.parametrize(
    ("kind", "condition", "region"),
    [
        ("head-cta", "ge-revolution-standard", "head"),
        ("chest-ct", "ge-revolution-standard", "chest"),
        ("head-mra", "siemens-skyra-3t-tof", "head"),
    ],
)
def test_simulated_studies_carry_their_region(kind: str, condition: str, region: str) -> None:
    simulate = pytest.importorskip("simulator.studies")
    from rules.collect import _tags_of

    ds = simulate.simulate_study(kind, condition, 3, "test", slices=4, matrix=32).datasets[0]
    key = ConditionKey.from_tags(_tags_of(ds), str(ds.Modality))
    assert key.region == region
    del ds.BodyPartExamined  # the descriptions the simulator writes say it too
    assert ConditionKey.from_tags(_tags_of(ds), str(ds.Modality)).region == region
