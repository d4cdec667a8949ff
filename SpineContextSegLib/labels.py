"""Segment names, VerSe ids, colours and SNOMED CT terminology: the one table for all of them.

Two tasks share this table:

``"spine"``
    One binary segment, :data:`SPINE` (value 1): the vertebrae C1-L6 (and T13 where present).
``"vertebrae"``
    One segment per vertebra, valued by its VerSe id (:data:`VERTEBRAE`).

VerSe ids (VerSe 2019/2020 data description, osf.io/4skx2): 1-7 C1-C7, 8-19 T1-T12,
20-25 L1-L6, 26 sacrum, 27 coccyx (never labelled, not listed here), 28 T13.

Sacrum and the binary spine mask
--------------------------------
The binary spine mask does **not** include the sacrum (VerSe 26), see
:data:`SPINE_MASK_INCLUDES_SACRUM`. The two manually labelled public sources,
VerSe and CTSpine1K, leave the sacrum unlabelled (VerSe: "26, 27: sacrum, coccyx - not
labeled"; CTSpine1K: ids 1-25), so a sacrum in the binary target would contradict most
real training data. TotalSegmentator's ``sacrum`` (25) and ``vertebrae_S1`` (26) both map
to VerSe 26 and therefore stay out of the binary mask too; the per-vertebra map keeps them.
:func:`spine_mask_from_vertebra_labels` is the single place this rule lives.

Terminology
-----------
SNOMED CT codes are those of SlicerTotalSegmentator's
``TotalSegmentator/Resources/totalsegmentator_snomed_mapping.csv`` (github.com/lassoan/
SlicerTotalSegmentator): C1 14806007 ... L5 49668003, sacrum 54735007, generic "Vertebra"
51282000 with anatomic regions "Thoracic spine" 122495006 / "Lumbar spine" 122496007.
SNOMED CT has no concept for a 13th thoracic or 6th lumbar vertebra, so T13 and L6 use
the generic "Vertebra" (51282000) with the thoracic/lumbar spine as anatomic region, the
way that mapping file codes ``vertebrae_thoracic``/``vertebrae_lumbar``. The binary
segment is "Vertebral column" (421060004, the SNOMED CT body structure used as the DICOM
"Spine" anatomic region).

3D Slicer's own "General Anatomy" and DICOM lists do not contain all of these codes, so the
segments name their own terminology context, :data:`TERMINOLOGY_CONTEXT`. The Slicer extension
ships it as a terminology file (:data:`TERMINOLOGY_FILE_NAME`, built by
:func:`slicer_terminology`) and loads it at start-up, so Slicer can look every code up and
offer it in the segment's terminology selector.
"""
from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

#: Slicer terminology context of the segmentation category and type: our own list, shipped with the
#: Slicer extension as :data:`TERMINOLOGY_FILE_NAME` (see :func:`slicer_terminology`).
TERMINOLOGY_CONTEXT = "Segmentation category and type - SpineContextSeg"
#: File name of the Slicer terminology (``SegmentationCategoryTypeModifier-*.term.json``) that
#: defines :data:`TERMINOLOGY_CONTEXT`; the extension keeps it in ``SpineContextSeg/Resources``.
TERMINOLOGY_FILE_NAME = "SegmentationCategoryTypeModifier-SpineContextSeg.term.json"
#: Slicer terminology context of the anatomic region.
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
#: Category of every segment here: SNOMED CT "Anatomical Structure".
CATEGORY_CODE = ("SCT", "123037004", "Anatomical Structure")

#: Regions used by the generic "Vertebra" concept for T13 and L6.
THORACIC_SPINE_REGION = ("SCT", "122495006", "Thoracic spine")
LUMBAR_SPINE_REGION = ("SCT", "122496007", "Lumbar spine")

#: See the module docstring: the binary spine mask leaves the sacrum (VerSe 26) out.
SPINE_MASK_INCLUDES_SACRUM = False

SACRUM_ID = 26
COCCYX_ID = 27
T13_ID = 28
L6_ID = 25


@dataclass(frozen=True)
class LabelInfo:
    """One segment: its value in the label map, name, display colour and SNOMED CT coding.

    Attributes
    ----------
    value : int
        Value in the label map (binary task: 1; vertebrae task: the VerSe id).
    name : str
        Short name: ``"Spine"``, ``"C1"`` ... ``"L6"``, ``"T13"``, ``"Sacrum"``.
    color_rgb : tuple of 3 floats
        Display colour, each component in [0, 1]; neighbouring vertebrae differ clearly.
    snomed_code : str
        SNOMED CT concept id, digits only.
    snomed_meaning : str
        The concept's display text, e.g. ``"C1 vertebra"``.
    region : tuple of 3 str, optional
        (scheme, code, meaning) of the anatomic region, used only where the type alone is
        ambiguous (T13, L6); ``None`` otherwise.
    """

    value: int
    name: str
    color_rgb: Tuple[float, float, float]
    snomed_code: str
    snomed_meaning: str
    region: Optional[Tuple[str, str, str]] = None

    def terminology_entry(self) -> str:
        """The 3D Slicer segment terminology tag.

        Format ``context~CS^code^meaning~type~typeModifier~regionContext~region~regionModifier``,
        e.g. ``"Segmentation category and type - SpineContextSeg~SCT^123037004^Anatomical
        Structure~SCT^14806007^C1 vertebra~^^~Anatomic codes - DICOM master list~^^~^^"``.
        """
        category = "^".join(CATEGORY_CODE)
        segment_type = f"SCT^{self.snomed_code}^{self.snomed_meaning}"
        region = "^".join(self.region) if self.region else "^^"
        return f"{TERMINOLOGY_CONTEXT}~{category}~{segment_type}~^^~{ANATOMIC_CONTEXT}~{region}~^^"

    def to_json(self) -> dict:
        """``{"value", "name", "color", "snomed_code", "snomed_meaning", "terminology"}`` (JSON-ready)."""
        return {
            "value": int(self.value),
            "name": self.name,
            "color": [float(c) for c in self.color_rgb],
            "snomed_code": self.snomed_code,
            "snomed_meaning": self.snomed_meaning,
            "terminology": self.terminology_entry(),
        }


# (name, VerSe id, SNOMED CT code, meaning, region); codes from SlicerTotalSegmentator's mapping CSV.
_VERTEBRA_TABLE: Tuple[Tuple[str, int, str, str, Optional[Tuple[str, str, str]]], ...] = (
    ("C1", 1, "14806007", "C1 vertebra", None),
    ("C2", 2, "39976000", "C2 vertebra", None),
    ("C3", 3, "113205007", "C3 vertebra", None),
    ("C4", 4, "5329002", "C4 vertebra", None),
    ("C5", 5, "36978003", "C5 vertebra", None),
    ("C6", 6, "36054005", "C6 vertebra", None),
    ("C7", 7, "87391001", "C7 vertebra", None),
    ("T1", 8, "64864005", "T1 vertebra", None),
    ("T2", 9, "53733008", "T2 vertebra", None),
    ("T3", 10, "1626008", "T3 vertebra", None),
    ("T4", 11, "73071006", "T4 vertebra", None),
    ("T5", 12, "56401006", "T5 vertebra", None),
    ("T6", 13, "45296009", "T6 vertebra", None),
    ("T7", 14, "62487009", "T7 vertebra", None),
    ("T8", 15, "11068009", "T8 vertebra", None),
    ("T9", 16, "82687006", "T9 vertebra", None),
    ("T10", 17, "7610001", "T10 vertebra", None),
    ("T11", 18, "12989004", "T11 vertebra", None),
    ("T12", 19, "23215003", "T12 vertebra", None),
    ("T13", T13_ID, "51282000", "Vertebra", THORACIC_SPINE_REGION),
    ("L1", 20, "66794005", "L1 vertebra", None),
    ("L2", 21, "14293000", "L2 vertebra", None),
    ("L3", 22, "36470004", "L3 vertebra", None),
    ("L4", 23, "11994002", "L4 vertebra", None),
    ("L5", 24, "49668003", "L5 vertebra", None),
    ("L6", L6_ID, "51282000", "Vertebra", LUMBAR_SPINE_REGION),
    ("Sacrum", SACRUM_ID, "54735007", "Sacrum", None),
)

#: VerSe ids from head to pelvis (T13 between T12 and L1, L6 between L5 and the sacrum).
CRANIO_CAUDAL_ORDER: Tuple[int, ...] = tuple(row[1] for row in _VERTEBRA_TABLE)
#: The usual chain without the variants T13 and L6.
STANDARD_CHAIN: Tuple[int, ...] = tuple(v for v in CRANIO_CAUDAL_ORDER if v not in (T13_ID, L6_ID))


def _distinct_color(position: int) -> Tuple[float, float, float]:
    """Golden-ratio hue steps along the chain: neighbours are ~0.38 of the hue circle apart."""
    hue = (0.08 + position * 0.6180339887) % 1.0
    value = 0.95 if position % 2 == 0 else 0.78
    r, g, b = colorsys.hsv_to_rgb(hue, 0.6, value)
    return (round(r, 4), round(g, 4), round(b, 4))


_BY_ID: Dict[int, LabelInfo] = {
    verse_id: LabelInfo(verse_id, name, _distinct_color(position), code, meaning, region)
    for position, (name, verse_id, code, meaning, region) in enumerate(_VERTEBRA_TABLE)
}

#: Binary whole-spine segment (value 1). Colour: Slicer's "bone" (241, 214, 145).
SPINE = LabelInfo(1, "Spine", (241 / 255, 214 / 255, 145 / 255), "421060004", "Vertebral column")
#: Per-vertebra segments ordered by VerSe id (1-26, then 28 = T13).
VERTEBRAE: Tuple[LabelInfo, ...] = tuple(_BY_ID[v] for v in sorted(_BY_ID))
#: VerSe ids that belong to the binary spine mask (:data:`SPINE_MASK_INCLUDES_SACRUM`).
SPINE_MASK_IDS: Tuple[int, ...] = tuple(v for v in sorted(_BY_ID) if v != SACRUM_ID or SPINE_MASK_INCLUDES_SACRUM)

# TotalSegmentator v2 "total" task ids (totalsegmentator/map_to_binary.py): 25 sacrum,
# 26 vertebrae_S1, 27 vertebrae_L5 ... 31 L1, 32 T12 ... 43 T1, 44 C7 ... 50 C1.
#: TotalSegmentator v2 ``total`` label id -> VerSe id (other structures are not listed: they map to 0).
TOTALSEGMENTATOR_TO_VERSE: Dict[int, int] = {25: SACRUM_ID, 26: SACRUM_ID}
TOTALSEGMENTATOR_TO_VERSE.update({ts_id: 51 - ts_id for ts_id in range(27, 51)})

#: TotalSegmentator mask file stems (``segmentations/<name>.nii.gz``) -> VerSe id.
TOTALSEGMENTATOR_NAME_TO_VERSE: Dict[str, int] = {"sacrum": SACRUM_ID, "vertebrae_S1": SACRUM_ID}
TOTALSEGMENTATOR_NAME_TO_VERSE.update({f"vertebrae_{_BY_ID[v].name}": v for v in range(1, 25)})

_NAME_ALIASES = {"S": SACRUM_ID, "S1": SACRUM_ID, "SACRUM": SACRUM_ID, "SACRAL": SACRUM_ID}


def vertebra_by_verse_id(verse_id: int) -> LabelInfo:
    """The :class:`LabelInfo` of a VerSe id (1-26, 28).

    Raises
    ------
    ValueError
        For ids outside the table (0, 27 = coccyx, > 28).
    """
    try:
        return _BY_ID[int(verse_id)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{verse_id!r} is not a VerSe vertebra id (1-26 or 28)") from None


def vertebra_by_name(name: str) -> LabelInfo:
    """The :class:`LabelInfo` of a vertebra name, case-insensitive.

    Accepts ``"L1"``, ``"l1"``, ``"T13"``, ``"S"``, ``"S1"``, ``"sacrum"``, ``"L1 vertebra"``
    and TotalSegmentator stems such as ``"vertebrae_L1"``.

    Raises
    ------
    ValueError
        If the name is not a vertebra.
    """
    key = str(name).strip().upper().replace(" ", "").replace("_", "")
    for prefix in ("VERTEBRAE", "VERTEBRA"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.endswith("VERTEBRA"):
        key = key[: -len("VERTEBRA")]
    if key in _NAME_ALIASES:
        return _BY_ID[_NAME_ALIASES[key]]
    for info in VERTEBRAE:
        if info.name.upper() == key:
            return info
    raise ValueError(f"{name!r} is not a vertebra name (C1-C7, T1-T13, L1-L6, S/Sacrum)")


def labels_for_task(task: str) -> List[LabelInfo]:
    """``"spine"`` -> ``[SPINE]``; ``"vertebrae"`` -> all of :data:`VERTEBRAE`.

    Raises
    ------
    ValueError
        For any other task name.
    """
    if task == "spine":
        return [SPINE]
    if task == "vertebrae":
        return list(VERTEBRAE)
    raise ValueError(f"unknown task {task!r}; expected 'spine' or 'vertebrae'")


def vertebra_class_ids(labels: Optional[Sequence[LabelInfo]] = None) -> Tuple[int, ...]:
    """VerSe ids of a vertebrae-task network's output channels 1, 2, ... (channel 0 is background).

    ``labels``: a model card's labels (``LabelInfo`` or their JSON dicts), in channel order;
    default :data:`VERTEBRAE` (what ``spinecontextseg train --task vertebrae`` writes).
    """
    labels = VERTEBRAE if labels is None else labels
    return tuple(int(label["value"] if isinstance(label, dict) else label.value) for label in labels)


def verse_ids_to_classes(verse_labels: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """VerSe ids -> channel indices of a vertebrae-task network (uint8, same shape).

    Channel ``k`` (1-based) is ``class_ids[k - 1]``; ids not in ``class_ids`` become 0 (background).
    """
    return _map_values(verse_labels, {int(v): k for k, v in enumerate(class_ids, start=1)})


def classes_to_verse_ids(classes: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`verse_ids_to_classes`: channel indices -> VerSe ids (uint8, same shape)."""
    return _map_values(classes, {k: int(v) for k, v in enumerate(class_ids, start=1)})


def _lookup_table(mapping: Dict[int, int], max_value: int) -> np.ndarray:
    table = np.zeros(max(max_value, max(mapping)) + 1, dtype=np.uint8)
    for source, target in mapping.items():
        table[source] = target
    return table


def _map_values(label_array: np.ndarray, mapping: Dict[int, int]) -> np.ndarray:
    values = np.asarray(label_array)
    if values.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    if not np.issubdtype(values.dtype, np.integer):
        values = np.rint(values)
    values = values.astype(np.int64, copy=False)
    low, high = int(values.min()), int(values.max())
    table = _lookup_table(mapping, max(high, 0))
    if low < 0:  # negative values are never a structure
        values = np.where(values < 0, 0, values)
    return table[values]


def totalsegmentator_to_verse(label_array: np.ndarray) -> np.ndarray:
    """Map a TotalSegmentator v2 ``total`` label array to VerSe ids.

    Parameters
    ----------
    label_array : numpy.ndarray, any shape, integer (or integral float) values
        TotalSegmentator v2 ids (25 sacrum, 26 S1, 27 L5 ... 50 C1, other ids: organs etc.).

    Returns
    -------
    numpy.ndarray, same shape, uint8
        VerSe ids (:data:`TOTALSEGMENTATOR_TO_VERSE`); every other structure becomes 0.
    """
    return _map_values(label_array, TOTALSEGMENTATOR_TO_VERSE)


def verse_to_verse(label_array: np.ndarray) -> np.ndarray:
    """Keep the vertebra ids of a VerSe-style map (1-26, 28), as uint8; anything else (27 coccyx,
    out-of-range values) becomes 0. Used for VerSe and CTSpine1K label maps."""
    return _map_values(label_array, {v: v for v in _BY_ID})


def spine_mask_from_vertebra_labels(vertebra_labels: np.ndarray, include_sacrum: bool = SPINE_MASK_INCLUDES_SACRUM) -> np.ndarray:
    """Binary spine mask (uint8 0/1, same shape) from a VerSe-id label array.

    The sacrum (26) is left out unless ``include_sacrum``; see the module docstring.
    """
    ids = [v for v in _BY_ID if v != SACRUM_ID or include_sacrum]
    return np.isin(np.asarray(vertebra_labels), ids).astype(np.uint8)


def _parse_level(token: str) -> int:
    token = token.strip()
    if re.fullmatch(r"\d+", token):
        return vertebra_by_verse_id(int(token)).value
    return vertebra_by_name(token).value


def parse_vertebra_range(spec: str) -> List[int]:
    """VerSe ids named by a range specification, in cranio-caudal order, without repeats.

    ``"L1-L5"`` -> ``[20, 21, 22, 23, 24]``; ``"T12,L1"`` -> ``[19, 20]``; ``"C1-S"`` -> the whole
    standard chain and the sacrum; ``"all"`` -> every vertebra. Items are separated by commas
    (or spaces), ranges use ``-``, ``–`` or ``..``; VerSe ids may stand for names (``"20-24"``).
    A range spans the standard chain: T13 and L6 appear only when named as an end point.

    Raises
    ------
    ValueError
        For an empty or unknown item, or a range whose start lies below its end.
    """
    if spec is None or not str(spec).strip():
        raise ValueError("empty vertebra specification; use e.g. 'L1-L5' or 'T12,L1'")
    text = str(spec).strip()
    if text.lower() == "all":
        return list(CRANIO_CAUDAL_ORDER)
    selected: List[int] = []
    for item in re.split(r"[,;\s]+", text.replace("–", "-").replace("..", "-")):
        if not item:
            continue
        if "-" in item:
            start_text, _, stop_text = item.partition("-")
            start, stop = _parse_level(start_text), _parse_level(stop_text)
            chain = list(STANDARD_CHAIN)
            for variant in (T13_ID, L6_ID):
                if variant in (start, stop):
                    chain = [v for v in CRANIO_CAUDAL_ORDER if v in chain or v == variant]
            i, j = chain.index(start), chain.index(stop)
            if i > j:
                raise ValueError(f"range {item!r} runs upwards; write it head-to-pelvis, e.g. 'L1-L5'")
            levels: Sequence[int] = chain[i : j + 1]
        else:
            levels = [_parse_level(item)]
        selected.extend(v for v in levels if v not in selected)
    return sorted(selected, key=CRANIO_CAUDAL_ORDER.index)


#: 3D Slicer's terminology file schema (dcmqi segment context schema).
_TERMINOLOGY_SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#"
#: Recommended colour of the generic "Vertebra" type (T13, L6): Slicer's "bone".
_VERTEBRA_TYPE_RGB = (241, 214, 145)


def _rgb255(color_rgb: Sequence[float]) -> List[int]:
    return [int(round(255 * float(c))) for c in color_rgb[:3]]


def slicer_terminology() -> dict:
    """The 3D Slicer terminology (category/type context) that defines every code used here.

    One category, SNOMED CT "Anatomical Structure", whose types are "Vertebral column" (the
    binary spine segment), C1-T12, "Vertebra" (T13 and L6, which carry the thoracic or lumbar
    spine as anatomic region), L1-L5 and the sacrum, in cranio-caudal order, each with its
    recommended display colour (0-255, the segment colour) and its segment name as
    ``3dSlicerLabel``. Slicer reads it with
    ``slicer.modules.terminologies.logic().LoadTerminologyFromFile(path)``.
    """
    types: List[dict] = []
    seen = set()
    for info in [SPINE] + [_BY_ID[v] for v in CRANIO_CAUDAL_ORDER]:
        if info.snomed_code in seen:
            continue
        seen.add(info.snomed_code)
        generic = info.region is not None  # "Vertebra": shared by T13 and L6
        types.append({
            "CodingSchemeDesignator": "SCT",
            "CodeValue": info.snomed_code,
            "CodeMeaning": info.snomed_meaning,
            "SNOMEDCTConceptID": info.snomed_code,
            "3dSlicerLabel": "vertebra" if generic else info.name,
            "recommendedDisplayRGBValue": list(_VERTEBRA_TYPE_RGB) if generic else _rgb255(info.color_rgb),
        })
    category = {
        "CodingSchemeDesignator": CATEGORY_CODE[0],
        "CodeValue": CATEGORY_CODE[1],
        "CodeMeaning": CATEGORY_CODE[2],
        "showAnatomy": True,  # T13 and L6 name their spine region
        "Type": types,
    }
    return {
        "SegmentationCategoryTypeContextName": TERMINOLOGY_CONTEXT,
        "@schema": _TERMINOLOGY_SCHEMA,
        "SegmentationCodes": {"Category": [category]},
    }


def slicer_terminology_json() -> str:
    """:func:`slicer_terminology` as the exact text of the shipped ``.term.json`` file."""
    import json

    return json.dumps(slicer_terminology(), indent=2) + "\n"
