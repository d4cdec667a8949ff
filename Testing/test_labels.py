"""The label table of SpineContextSegLib.labels: ids, names, colours, terminology, id maps."""
from __future__ import annotations

import re

import numpy as np
import pytest

from SpineContextSegLib import labels
from SpineContextSegLib.labels import (
    CRANIO_CAUDAL_ORDER,
    SPINE,
    TOTALSEGMENTATOR_NAME_TO_VERSE,
    VERTEBRAE,
    labels_for_task,
    parse_vertebra_range,
    spine_mask_from_vertebra_labels,
    totalsegmentator_to_verse,
    vertebra_by_name,
    vertebra_by_verse_id,
)

# TotalSegmentator v2 "total" ids of the spine, written out from totalsegmentator/map_to_binary.py
# (independent of the table under test).
TOTALSEGMENTATOR_V2_SPINE = {
    25: "sacrum", 26: "vertebrae_S1", 27: "vertebrae_L5", 28: "vertebrae_L4", 29: "vertebrae_L3", 30: "vertebrae_L2",
    31: "vertebrae_L1", 32: "vertebrae_T12", 33: "vertebrae_T11", 34: "vertebrae_T10", 35: "vertebrae_T9",
    36: "vertebrae_T8", 37: "vertebrae_T7", 38: "vertebrae_T6", 39: "vertebrae_T5", 40: "vertebrae_T4",
    41: "vertebrae_T3", 42: "vertebrae_T2", 43: "vertebrae_T1", 44: "vertebrae_C7", 45: "vertebrae_C6",
    46: "vertebrae_C5", 47: "vertebrae_C4", 48: "vertebrae_C3", 49: "vertebrae_C2", 50: "vertebrae_C1",
}  # fmt: skip

TERMINOLOGY = re.compile(
    r"^(?P<context>[^~^]+)~SCT\^123037004\^Anatomical Structure~SCT\^(?P<code>\d+)\^(?P<meaning>[^~^]+)~\^\^~"
    r"(?P<anatomic>[^~^]+)~(?P<region>\^\^|SCT\^\d+\^[^~^]+)~\^\^$"
)


@pytest.mark.parametrize("info", [SPINE] + list(VERTEBRAE), ids=lambda info: info.name)
def test_terminology_entries_are_well_formed(info):
    entry = info.terminology_entry()
    match = TERMINOLOGY.match(entry)
    assert match, entry
    assert match["context"] == labels.TERMINOLOGY_CONTEXT and match["anatomic"] == labels.ANATOMIC_CONTEXT
    assert match["code"] == info.snomed_code and match["meaning"] == info.snomed_meaning
    assert (match["region"] == "^^") == (info.region is None)
    as_json = info.to_json()
    assert as_json["terminology"] == entry and as_json["value"] == info.value
    assert all(0.0 <= c <= 1.0 for c in as_json["color"]) and len(as_json["color"]) == 3


def test_snomed_codes_distinct_except_generic_vertebra():
    codes = [info.snomed_code for info in VERTEBRAE if info.snomed_code != "51282000"]
    assert len(codes) == len(set(codes))
    generic = {info.name for info in VERTEBRAE if info.snomed_code == "51282000"}
    assert generic == {"T13", "L6"}
    # the two generic entries still differ by their anatomic region
    assert vertebra_by_name("T13").terminology_entry() != vertebra_by_name("L6").terminology_entry()


def test_verse_ids_unique_and_complete():
    ids = [info.value for info in VERTEBRAE]
    assert len(ids) == len(set(ids))
    assert set(ids) == set(range(1, 27)) | {28}
    names = [info.name for info in VERTEBRAE]
    assert len(names) == len(set(names))
    assert vertebra_by_verse_id(1).name == "C1" and vertebra_by_verse_id(19).name == "T12"
    assert vertebra_by_verse_id(20).name == "L1" and vertebra_by_verse_id(25).name == "L6"
    assert vertebra_by_verse_id(26).name == "Sacrum" and vertebra_by_verse_id(28).name == "T13"
    for bad in (0, 27, 29):
        with pytest.raises(ValueError):
            vertebra_by_verse_id(bad)


def test_neighbouring_vertebrae_have_clearly_different_colours():
    by_id = {info.value: np.array(info.color_rgb) for info in VERTEBRAE}
    order = list(CRANIO_CAUDAL_ORDER)
    pairs = list(zip(order, order[1:])) + [(19, 20), (24, 26)]  # neighbours also when T13/L6 are absent
    for upper, lower in pairs:
        assert np.linalg.norm(by_id[upper] - by_id[lower]) > 0.15, (upper, lower)
    assert all(np.linalg.norm(by_id[v] - np.array(SPINE.color_rgb)) > 0 for v in by_id)


def test_totalsegmentator_round_trip_for_all_26_vertebrae():
    assert len(TOTALSEGMENTATOR_V2_SPINE) == 26
    ts_ids = np.array(sorted(TOTALSEGMENTATOR_V2_SPINE))
    mapped = totalsegmentator_to_verse(ts_ids)
    assert mapped.dtype == np.uint8
    for ts_id, verse_id in zip(ts_ids, mapped):
        name = TOTALSEGMENTATOR_V2_SPINE[int(ts_id)]
        assert verse_id == vertebra_by_name(name).value  # id map and name map agree
        assert TOTALSEGMENTATOR_NAME_TO_VERSE[name] == verse_id
    # every standard vertebra C1-L5 is reached exactly once; sacrum and S1 both give the sacrum
    vertebra_ids = sorted(int(v) for v in mapped if v != 26)
    assert vertebra_ids == list(range(1, 25))
    assert totalsegmentator_to_verse(np.array([27, 25, 26, 31, 50])).tolist() == [24, 26, 26, 20, 1]


def test_totalsegmentator_other_structures_become_background():
    everything = np.arange(0, 118).reshape(2, 59)  # v2 "total" ids 0-117
    mapped = totalsegmentator_to_verse(everything)
    assert mapped.shape == everything.shape
    spine = np.isin(everything, list(TOTALSEGMENTATOR_V2_SPINE))
    assert np.all(mapped[~spine] == 0) and np.all(mapped[spine] > 0)
    assert totalsegmentator_to_verse(np.array([5.0, 27.0, -3.0])).tolist() == [0, 24, 0]  # float and negative input


def test_spine_mask_excludes_sacrum_only():
    ids = np.array([0, 1, 19, 20, 24, 25, 26, 27, 28])
    assert spine_mask_from_vertebra_labels(ids).tolist() == [0, 1, 1, 1, 1, 1, 0, 0, 1]
    assert spine_mask_from_vertebra_labels(ids, include_sacrum=True).tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 1]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("L1-L5", [20, 21, 22, 23, 24]),
        ("l1..l3", [20, 21, 22]),
        ("T12,L1", [19, 20]),
        ("L1 T12", [19, 20]),  # cranio-caudal order regardless of input order
        ("20-24", [20, 21, 22, 23, 24]),
        ("T11-L1", [18, 19, 20]),  # T13 only when named
        ("T12-T13", [19, 28]),
        ("L5-L6", [24, 25]),
        ("L5-S", [24, 26]),
        ("L4-L5,L5", [23, 24]),  # no repeats
    ],
)
def test_parse_vertebra_range(spec, expected):
    assert parse_vertebra_range(spec) == expected


def test_parse_vertebra_range_all_and_errors():
    assert parse_vertebra_range("all") == list(CRANIO_CAUDAL_ORDER)
    assert parse_vertebra_range("C1-S") == [v for v in CRANIO_CAUDAL_ORDER if v not in (25, 28)]
    for bad in ("", "   ", "L5-L1", "X9", "L1-Q"):
        with pytest.raises(ValueError):
            parse_vertebra_range(bad)


def test_labels_for_task():
    assert labels_for_task("spine") == [SPINE]
    assert SPINE.value == 1
    vertebrae = labels_for_task("vertebrae")
    assert [info.value for info in vertebrae] == sorted(info.value for info in VERTEBRAE)
    assert len(vertebrae) == 27
    with pytest.raises(ValueError):
        labels_for_task("organs")


@pytest.mark.parametrize("name, verse_id", [("L1", 20), ("l1", 20), ("vertebrae_L1", 20), ("L1 vertebra", 20), ("S", 26), ("sacrum", 26), ("T13", 28)])
def test_vertebra_by_name_accepts_common_spellings(name, verse_id):
    assert vertebra_by_name(name).value == verse_id


def test_vertebra_classes_round_trip_and_unknown_ids_become_background():
    from SpineContextSegLib.labels import VERTEBRAE, classes_to_verse_ids, verse_ids_to_classes, vertebra_class_ids

    class_ids = vertebra_class_ids()
    assert class_ids == tuple(v.value for v in VERTEBRAE) and vertebra_class_ids([v.to_json() for v in VERTEBRAE]) == class_ids
    verse = np.array([0, 1, 20, 24, 26, 28, 27, 40], dtype=np.uint8)  # 27 (coccyx) and 40 are no classes
    classes = verse_ids_to_classes(verse, class_ids)
    assert classes.tolist() == [0, 1, 20, 24, 26, 27, 0, 0]  # T13 (28) is the 27th channel
    assert classes_to_verse_ids(classes, class_ids).tolist() == [0, 1, 20, 24, 26, 28, 0, 0]
