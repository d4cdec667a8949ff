"""Reading CT volumes (NIfTI, NRRD, MHA, DICOM series) with checks, and writing label maps.

Every problem with an input becomes a :class:`SegmentationError` with a specific code;
SimpleITK's own messages (long ITK exception dumps) never reach the user.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, List, Optional, Sequence

import numpy as np

from .errors import SegmentationError
from .fileio import atomic_output, output_suffix

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

    from .labels import LabelInfo
    from .progress import ProgressReporter

READABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha")

#: Relative tolerance on slice-to-slice distance in a DICOM series before we call it uneven.
DICOM_SPACING_TOLERANCE = 0.01


def read_image(path: str, *, series_uid: Optional[str] = None, reporter: Optional["ProgressReporter"] = None) -> "sitk.Image":
    """Read a 3D scalar CT from a file or a DICOM series folder and validate it.

    Returns the image with its pixel type unchanged (HU values as stored). Raises
    :class:`SegmentationError` (``input_*``/``dicom_*`` codes) for anything we cannot use.
    """
    import SimpleITK as sitk

    if not os.path.exists(path):
        raise SegmentationError("input_not_found", f"Input not found: {path}. Check the path.")
    if os.path.isdir(path):
        image = _read_dicom_series(path, series_uid)
    else:
        if os.path.getsize(path) == 0:
            raise SegmentationError("input_unreadable", f"{path} is an empty file (0 bytes). Re-export the CT.")
        try:
            image = sitk.ReadImage(path)
        except RuntimeError:
            if not path.lower().endswith(READABLE_SUFFIXES):
                raise SegmentationError(
                    "input_format",
                    f"Cannot read {os.path.basename(path)}: '{output_suffix(path) or 'no extension'}' is not an image format we read. "
                    f"Use NIfTI (.nii.gz), NRRD, MHA or a DICOM folder.",
                ) from None
            raise SegmentationError(
                "input_unreadable", f"Cannot read {os.path.basename(path)}: the file is corrupt or truncated. Re-export the CT."
            ) from None
    validate_ct(image, name=os.path.basename(os.path.normpath(path)), reporter=reporter)
    return image


def _read_dicom_series(folder: str, series_uid: Optional[str]) -> "sitk.Image":
    import SimpleITK as sitk

    series_ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ())
    if not series_ids:
        raise SegmentationError("dicom_no_series", f"No DICOM image series in folder {folder}. Point to the folder holding the CT's .dcm files.")
    if series_uid is None:
        if len(series_ids) > 1:
            raise SegmentationError(
                "dicom_multiple_series",
                f"Folder {folder} holds {len(series_ids)} DICOM series ({', '.join(series_ids)}). Choose one with --series UID.",
                details={"series": series_ids},
            )
        series_uid = series_ids[0]
    elif series_uid not in series_ids:
        raise SegmentationError("dicom_multiple_series", f"Series {series_uid} is not in {folder}; found: {', '.join(series_ids)}.")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid))
    _check_dicom_slice_positions(files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError:
        raise SegmentationError("input_unreadable", f"Cannot read the DICOM series in {folder}: a file is corrupt.") from None


def _check_dicom_slice_positions(files: Sequence[str]) -> None:
    """Refuse duplicated, missing or unevenly spaced slices (ITK would silently stretch the volume)."""
    import SimpleITK as sitk

    if len(files) < 2:
        raise SegmentationError("input_not_3d", "The DICOM series has a single slice; a 3D CT needs many.")
    positions, normal = [], None
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise SegmentationError("input_unreadable", f"DICOM file {os.path.basename(name)} is corrupt or truncated.") from None
        if normal is None:
            d = np.array(reader.GetDirection()).reshape(3, 3)
            normal = d[:, 2]
        positions.append(float(np.dot(normal, reader.GetOrigin())))
    steps = np.diff(np.sort(positions))
    if np.any(steps < 1e-3):
        raise SegmentationError("dicom_inconsistent", "The DICOM series has duplicated slices (two slices at the same position). Re-export the series.")
    median = float(np.median(steps))
    if np.any(np.abs(steps - median) > DICOM_SPACING_TOLERANCE * median + 1e-3):
        raise SegmentationError(
            "dicom_inconsistent",
            f"The DICOM slices are unevenly spaced (from {steps.min():.2f} to {steps.max():.2f} mm): slices are missing "
            f"or the series mixes acquisitions. Re-export the complete series.",
        )


def validate_ct(image: "sitk.Image", *, name: str = "input", reporter: Optional["ProgressReporter"] = None) -> None:
    """Check dimension, components, geometry and values; warn when intensities do not look like CT."""
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SegmentationError(
            "input_not_scalar", f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB/vector). Pass a greyscale CT."
        )
    if image.GetDimension() != 3:
        raise SegmentationError("input_not_3d", f"{name} is {image.GetDimension()}D; a 3D CT volume is needed.")
    size = image.GetSize()
    if min(size) == 0:
        raise SegmentationError("input_empty", f"{name} has no voxels (size {size}).")
    if min(size) < 2:
        raise SegmentationError("input_not_3d", f"{name} is a single slice (size {size}); a 3D CT with several slices is needed.")
    spacing = np.array(image.GetSpacing(), dtype=float)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise SegmentationError("input_geometry", f"{name} has invalid voxel spacing {tuple(spacing)}; fix the header.")
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise SegmentationError("input_geometry", f"{name} has a singular or invalid direction matrix; fix the header.")
    stats = sitk.StatisticsImageFilter()
    stats.Execute(image)
    low, high = stats.GetMinimum(), stats.GetMaximum()
    if not (np.isfinite(low) and np.isfinite(high) and np.isfinite(stats.GetSum())):
        raise SegmentationError("input_nonfinite", f"{name} contains NaN or infinite values; the file is damaged. Re-export the CT.")
    if low == high:
        raise SegmentationError("input_empty", f"{name} is constant (every voxel is {low:g}); it holds no CT data.")
    if reporter is not None and (low > -200 or high < 100):
        reporter.warning(
            "input_not_ct",
            f"{name}: intensities {low:g}..{high:g} do not look like CT Hounsfield units (air is about -1000). "
            f"Results on non-CT images are not meaningful.",
        )


def write_labelmap(mask: "sitk.Image", path: str, labels: Optional[List["LabelInfo"]] = None) -> str:
    """Write a uint8 label map atomically as NIfTI, NRRD, MHA or Slicer ``.seg.nrrd``.

    ``.seg.nrrd`` carries segment names, colours and terminology (read by Slicer and ``slicerio``).
    """
    import SimpleITK as sitk

    suffix = output_suffix(path).lower()
    if suffix not in LABELMAP_SUFFIXES:
        raise SegmentationError("output_format", f"Cannot write '{suffix or path}': use one of {', '.join(LABELMAP_SUFFIXES)}.")
    image = sitk.Cast(mask, sitk.sitkUInt8)
    if suffix == ".seg.nrrd":
        image = _with_segmentation_metadata(image, labels or [])
    with atomic_output(path) as temp_path:
        try:
            sitk.WriteImage(image, temp_path, useCompression=True)
        except RuntimeError as error:
            raise _write_error(path, error) from None
    return os.path.abspath(path)


def _write_error(path: str, error: RuntimeError) -> SegmentationError:
    text = str(error).lower()
    if "no space" in text or "disk" in text:
        return SegmentationError("disk_full", f"Disk full while writing {path}. Free space and run again; no partial file was kept.")
    return SegmentationError("output_not_writable", f"Could not write {path}. Check the folder is writable and has free space.")


def _with_segmentation_metadata(image: "sitk.Image", labels: List["LabelInfo"]) -> "sitk.Image":
    """Add the key/value fields of Slicer's .seg.nrrd format (one shared layer, one segment per label)."""
    import SimpleITK as sitk

    image = sitk.Image(image)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    size = image.GetSize()
    array = sitk.GetArrayViewFromImage(image)
    present = set(np.unique(array).tolist())
    for index, label in enumerate(info for info in labels if info.value in present):
        prefix = f"Segment{index}_"
        r, g, b = label.color_rgb
        image.SetMetaData(prefix + "ID", f"Segment_{label.value}")
        image.SetMetaData(prefix + "Name", label.name)
        image.SetMetaData(prefix + "NameAutoGenerated", "0")
        image.SetMetaData(prefix + "Color", f"{r:.6f} {g:.6f} {b:.6f}")
        image.SetMetaData(prefix + "ColorAutoGenerated", "0")
        image.SetMetaData(prefix + "LabelValue", str(label.value))
        image.SetMetaData(prefix + "Layer", "0")
        image.SetMetaData(prefix + "Extent", f"0 {size[0] - 1} 0 {size[1] - 1} 0 {size[2] - 1}")
        image.SetMetaData(prefix + "Tags", f"TerminologyEntry:{label.terminology_entry()}|")
    return image
