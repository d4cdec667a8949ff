"""DICOM Segmentation (SEG) output: ``spinecontextseg segment DICOM_FOLDER -o seg.dcm``.

The mask (on exactly the CT's grid) becomes one DICOM Segmentation object, written with
highdicom (the optional extra ``pip install "spinecontextseg[dicom]"``):

- **References the source series**: every frame points to the CT slice it lies on (its
  SOP class and instance UID); patient, study and frame of reference are the CT's, so a
  PACS or viewer files it under the same study and overlays it on the same series.
- **Segments**: one per label present in the mask (``--task spine``: "Spine"; ``--task
  vertebrae``: "C1" ... "L5", "Sacrum"), numbered 1, 2, ... in the label table's order, each
  with its SNOMED CT category ("Anatomical Structure") and type (e.g. "L4 vertebra"; T13 and
  L6: "Vertebra" with the thoracic or lumbar spine as anatomic region), its display colour
  and its name as tracking id. The segment's label-map value (1, or the VerSe id) is not
  stored: the segment number and its coded type identify it.
- **Algorithm**: AUTOMATIC, name "SpineContextSeg", family "Artificial Intelligence"
  (DCM 123110), version the library's (the model's name and version as a parameter).
- **BINARY** segmentation type (1 bit per voxel and segment); empty frames are omitted.

The file is written under a temporary name beside the target and renamed at the end,
like every output (:func:`SpineContextSegLib.io.files.atomic_output`).

Whether a DICOM SEG can be written is decided before any computing
(:func:`check_dicom_seg_output`): the input must be a DICOM series folder (a NIfTI/NRRD
input has no SOP instances to reference: ``dicom_seg_needs_dicom_input``), highdicom must
be installed (``dicom_support_missing``) and the first slice must carry what the SEG
references (``dicom_seg_source_invalid``).
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from SpineContextSegLib.errors import SegmentationError

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

    from SpineContextSegLib.labels import LabelInfo

#: Algorithm identification written into every segment.
ALGORITHM_NAME = "SpineContextSeg"
#: Series number of the SEG series (a fixed, recognisable value; the series UID is new per file).
SEG_SERIES_NUMBER = 9100
#: Attributes every source slice must have for the SEG to reference it.
REQUIRED_SOURCE_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
)
#: Patient and study attributes the SEG copies from its source, where an empty value is allowed
#: (DICOM type 2): anonymised exports often drop them, so missing ones are copied as empty.
EMPTY_ALLOWED_SOURCE_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
#: Largest distance (in voxels) between a slice's ImagePositionPatient and the volume's slice.
POSITION_TOLERANCE_VOXELS = 0.05
#: Largest difference between a slice's ImageOrientationPatient and the volume's direction.
ORIENTATION_TOLERANCE = 1e-3

_INSTALL_HINT = 'pip install "spinecontextseg[dicom]"'


def is_dicom_seg_path(path: str) -> bool:
    """Whether ``path`` asks for a DICOM SEG (it ends in ``.dcm``, any case)."""
    return str(path).lower().endswith(".dcm")


def require_highdicom():
    """The ``highdicom`` module, or ``dicom_support_missing`` saying how to install it."""
    try:
        import highdicom
        import pydicom  # noqa: F401  (highdicom's dependency; imported here so its absence reads the same)
    except ImportError as error:
        python = "" if sys.version_info >= (3, 10) else " (highdicom needs Python 3.10 or newer)"
        raise SegmentationError(
            "dicom_support_missing",
            f"Writing a DICOM SEG (.dcm) needs the optional package highdicom ({error}). "
            f"Install it with: {_INSTALL_HINT}{python}, or write the mask as .nii.gz, .nrrd or .seg.nrrd.",
        ) from None
    return highdicom


def check_dicom_seg_output(path: str, source: Optional[str], series_uid: Optional[str] = None) -> None:
    """Raise now, before any computing, when a DICOM SEG cannot be written to ``path`` for ``source``.

    A missing ``source`` is left to the reader (``input_not_found``). A source that is not a
    DICOM series folder raises ``dicom_seg_needs_dicom_input``; a folder without a series or
    with several (and no ``series_uid``) the reader's ``dicom_*`` errors; a missing highdicom
    ``dicom_support_missing``; a first slice without the attributes the SEG must reference
    ``dicom_seg_source_invalid``.
    """
    if source is not None and not os.path.exists(source):
        return  # read_image reports input_not_found, the clearer error
    if source is None or not os.path.isdir(source):
        what = "no input was given" if source is None else f"the input {os.path.basename(os.path.normpath(source))} is a file, not a DICOM series folder"
        raise SegmentationError(
            "dicom_seg_needs_dicom_input",
            f"Cannot write the DICOM SEG {os.path.basename(path)}: {what}, and a DICOM SEG must reference the CT's DICOM slices. "
            f"Pass the folder holding the CT's .dcm files, or write the mask as .nii.gz, .nrrd or .seg.nrrd.",
        )
    from SpineContextSegLib.io.dicom import dicom_series_files

    files = dicom_series_files(source, series_uid)  # dicom_no_series / dicom_multiple_series
    if os.path.exists(path) and any(os.path.samefile(path, name) for name in files):
        raise SegmentationError(
            "output_is_input", f"Output {path} is one of the CT's DICOM slices; the input is never overwritten. Choose another name."
        )
    require_highdicom()
    import pydicom

    _check_source_dataset(_read_header(pydicom, files[0]), files[0])


def _read_header(pydicom, path: str):
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as error:  # pydicom raises many kinds for damaged files
        raise SegmentationError(
            "input_unreadable", f"DICOM file {os.path.basename(path)} is corrupt or truncated ({type(error).__name__}). Re-export the series."
        ) from None


def _check_source_dataset(dataset, path: str) -> None:
    missing = [name for name in REQUIRED_SOURCE_ATTRIBUTES if not str(getattr(dataset, name, "") or "").strip()]
    if missing:
        raise SegmentationError(
            "dicom_seg_source_invalid",
            f"DICOM file {os.path.basename(path)} lacks {', '.join(missing)}, which a DICOM SEG must reference. "
            f"Re-export the series from the scanner or PACS, or write the mask as .nii.gz, .nrrd or .seg.nrrd.",
        )
    if int(getattr(dataset, "NumberOfFrames", 1) or 1) != 1:
        raise SegmentationError(
            "dicom_seg_source_invalid",
            f"DICOM file {os.path.basename(path)} is a multi-frame image; DICOM SEG output supports series of single-frame slices. "
            f"Write the mask as .nii.gz, .nrrd or .seg.nrrd.",
        )


def _coded(highdicom, scheme: str, code: str, meaning: str):
    return highdicom.sr.CodedConcept(value=code, scheme_designator=scheme, meaning=meaning)


def _cielab_value(highdicom, color_rgb: Sequence[float]) -> Tuple[int, int, int]:
    """DICOM's scaled CIELab (three uint16) of an sRGB colour in [0, 1]."""
    rgb = [int(round(255 * min(1.0, max(0.0, float(c))))) for c in color_rgb[:3]]
    from_rgb = getattr(getattr(highdicom, "color", None), "CIELabColor", None)
    if from_rgb is not None and hasattr(from_rgb, "from_rgb"):
        return tuple(int(v) for v in from_rgb.from_rgb(*rgb).value)  # type: ignore[return-value]
    # sRGB (D65) -> XYZ -> CIELab, then DICOM's scaling (PS3.3 C.10.7.1.1)
    linear = np.array([c / 255.0 for c in rgb])
    linear = np.where(linear <= 0.04045, linear / 12.92, ((linear + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ linear
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return (
        int(round(np.clip(lab[0], 0, 100) * 65535 / 100)),
        int(round((np.clip(lab[1], -128, 127) + 128) * 65535 / 255)),
        int(round((np.clip(lab[2], -128, 127) + 128) * 65535 / 255)),
    )


def _labels_for_values(values: Sequence[int], labels: Sequence["LabelInfo"]) -> List["LabelInfo"]:
    """The label of every value present (in the order of ``labels``); defaults for a bare mask."""
    from SpineContextSegLib.labels import SPINE, vertebra_by_verse_id

    by_value = {int(label.value): label for label in labels}
    if not by_value:
        by_value = {1: SPINE} if set(values) <= {1} else {}
    missing = [v for v in values if v not in by_value]
    for value in missing:
        try:
            by_value[value] = vertebra_by_verse_id(value)
        except ValueError:
            raise SegmentationError(
                "dicom_seg_source_invalid", f"The mask holds the value {value}, which is no segment of this task; cannot describe it in a DICOM SEG."
            ) from None
    ordered = [label for label in labels if int(label.value) in values]
    ordered += [by_value[v] for v in sorted(values) if all(int(label.value) != v for label in ordered)]
    return ordered


def _slice_indices(mask: "sitk.Image", datasets: Sequence[object], files: Sequence[str], folder: str) -> List[int]:
    """For each source slice, the index k of the mask slice it is (checked: same grid, one slice each)."""
    size = mask.GetSize()
    direction = np.array(mask.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.array(mask.GetSpacing(), dtype=float)
    indices: List[int] = []
    for dataset, path in zip(datasets, files):
        name = os.path.basename(path)
        orientation = np.array([float(v) for v in dataset.ImageOrientationPatient], dtype=float)
        pixel_spacing = np.array([float(v) for v in dataset.PixelSpacing], dtype=float)  # row spacing (y), column spacing (x)
        grid_ok = (
            int(dataset.Rows) == size[1]
            and int(dataset.Columns) == size[0]
            and np.allclose(orientation[:3], direction[:, 0], atol=ORIENTATION_TOLERANCE)
            and np.allclose(orientation[3:], direction[:, 1], atol=ORIENTATION_TOLERANCE)
            and np.allclose(pixel_spacing[::-1], spacing[:2], rtol=1e-3, atol=1e-4)
        )
        position = mask.TransformPhysicalPointToContinuousIndex([float(v) for v in dataset.ImagePositionPatient])
        k = int(round(position[2]))
        if not grid_ok or max(abs(position[0]), abs(position[1]), abs(position[2] - k)) > POSITION_TOLERANCE_VOXELS or not 0 <= k < size[2]:
            raise SegmentationError(
                "dicom_seg_source_invalid",
                f"DICOM file {name} does not lie on the volume read from {folder} (its size, orientation or position differs). "
                f"Re-export the series, or write the mask as .nii.gz, .nrrd or .seg.nrrd.",
            )
        indices.append(k)
    if sorted(indices) != list(range(size[2])):
        raise SegmentationError(
            "dicom_seg_source_invalid",
            f"The DICOM files in {folder} do not match the volume's {size[2]} slices one to one. Re-export the series.",
        )
    return indices


def write_dicom_seg(
    mask: "sitk.Image",
    path: str,
    labels: Sequence["LabelInfo"],
    source: Optional[str],
    *,
    series_uid: Optional[str] = None,
    model: Optional[str] = None,
) -> str:
    """Write ``mask`` (uint8 labels on exactly the grid of the DICOM series ``source``) as a DICOM SEG.

    Parameters
    ----------
    mask : SimpleITK.Image
        Label map read from / computed on the series in ``source`` (same size, spacing,
        origin and direction as :func:`SpineContextSegLib.io.images.read_image` gives).
    path : str
        Output ``.dcm`` path; written atomically.
    labels : sequence of LabelInfo
        The label table; only labels with voxels become segments. Empty: "Spine" for a 0/1
        mask, else the vertebra of each VerSe id.
    source : str
        The CT's DICOM series folder.
    series_uid : str, optional
        SeriesInstanceUID when ``source`` holds several series.
    model : str, optional
        Model name and version, recorded as an algorithm parameter.

    Returns
    -------
    str
        The absolute path written.

    Raises
    ------
    SegmentationError
        ``dicom_seg_needs_dicom_input``, ``dicom_support_missing``, ``dicom_seg_source_invalid``,
        ``no_spine_found`` (an empty mask), ``disk_full``, ``output_not_writable``.
    """
    import SimpleITK as sitk

    from SpineContextSegLib import __version__
    from SpineContextSegLib.io.files import atomic_output
    from SpineContextSegLib.io.dicom import dicom_series_files

    check_dicom_seg_output(path, source, series_uid)
    if source is None or not os.path.isdir(source):  # a missing source: check_dicom_seg_output left it to the reader
        raise SegmentationError("input_not_found", f"DICOM series folder not found: {source}. Check the path.")
    highdicom = require_highdicom()
    import pydicom
    from pydicom.sr.codedict import codes

    files = dicom_series_files(source, series_uid)
    datasets = [_read_header(pydicom, name) for name in files]
    for dataset, name in zip(datasets, files):
        _check_source_dataset(dataset, name)
        for key in EMPTY_ALLOWED_SOURCE_ATTRIBUTES:  # only in memory: the source files are never written
            if key not in dataset:
                setattr(dataset, key, "")
    for key in ("FrameOfReferenceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if len({str(getattr(d, key)) for d in datasets}) != 1:
            raise SegmentationError("dicom_seg_source_invalid", f"The DICOM files in {source} do not share one {key}. Re-export the series.")
    indices = _slice_indices(mask, datasets, files, source)

    array = sitk.GetArrayViewFromImage(mask)  # (k, j, i) = (slice, row, column)
    values = [int(v) for v in np.unique(array) if v != 0]
    if not values:
        raise SegmentationError("no_spine_found", f"The mask is empty: no segment to write into {os.path.basename(path)}.")
    segment_labels = _labels_for_values(values, labels)
    lookup = np.zeros(max(256, int(array.max()) + 1), dtype=np.uint8 if len(segment_labels) < 256 else np.uint16)
    for number, label in enumerate(segment_labels, start=1):
        lookup[int(label.value)] = number
    frames = lookup[np.asarray(array)[indices]]  # frame f lies on source slice datasets[f]
    if len(segment_labels) == 1:
        frames = frames.astype(bool)

    parameters: Dict[str, str] = {"task": "vertebrae" if any(label.value != 1 for label in segment_labels) else "spine"}
    if model:
        parameters["model"] = str(model)[:64]
    algorithm = highdicom.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=str(__version__), parameters=parameters
    )
    from SpineContextSegLib.labels import CATEGORY_CODE

    descriptions = []
    for number, label in enumerate(segment_labels, start=1):
        description = highdicom.seg.SegmentDescription(
            segment_number=number,
            segment_label=label.name,
            segmented_property_category=_coded(highdicom, *CATEGORY_CODE),
            segmented_property_type=_coded(highdicom, "SCT", label.snomed_code, label.snomed_meaning),
            algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=label.name,
            tracking_uid=highdicom.UID(),
            anatomic_regions=[_coded(highdicom, *label.region)] if label.region else None,
        )
        description.RecommendedDisplayCIELabValue = list(_cielab_value(highdicom, label.color_rgb))
        descriptions.append(description)

    task = parameters["task"]
    try:
        segmentation = highdicom.seg.Segmentation(
            source_images=datasets,
            pixel_array=frames,
            segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=highdicom.UID(),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=highdicom.UID(),
            instance_number=1,
            manufacturer=ALGORITHM_NAME,
            manufacturer_model_name=ALGORITHM_NAME,
            software_versions=str(__version__),
            device_serial_number="none",
            series_description=f"{ALGORITHM_NAME} {task}"[:64],
            content_label=task.upper()[:16],
            content_description=f"{ALGORITHM_NAME} {__version__} automatic {task} segmentation"[:64],
        )
    except (ValueError, KeyError, AttributeError) as error:
        if isinstance(error, AttributeError) and "Dataset' object has no attribute" not in str(error):
            raise  # a bug, not the series
        raise SegmentationError(
            "dicom_seg_source_invalid",
            f"Cannot build a DICOM SEG on the series in {source}: {str(error)[:300]}. "
            f"Write the mask as .nii.gz, .nrrd or .seg.nrrd instead.",
        ) from None
    with atomic_output(path) as temp_path:
        segmentation.save_as(temp_path)
    return os.path.abspath(path)
