"""Reading a DICOM series: the image series in a folder, their files in slice order, the checks ITK skips.

ITK reads a series whatever its slices look like; here a folder with several series must name
one (``dicom_multiple_series``), non-image objects beside the CT (a DICOM SEG this tool wrote)
are not counted as series, and duplicated, missing, unevenly spaced or sheared slices are
refused (``dicom_inconsistent``, ``input_geometry``). The series' header is checked
(:func:`~SpineContextSegLib.io.validation.check_header`) before a voxel is read.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np

from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.io.validation import bytes_per_component, check_header, itk_warnings_off

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

#: Relative tolerance on slice-to-slice distance in a DICOM series before we call it uneven.
DICOM_SPACING_TOLERANCE = 0.01
#: In-plane shift per mm of slice step above which a DICOM series is sheared (gantry tilt > ~0.6 degrees).
DICOM_SHEAR_TOLERANCE = 0.01

#: SOP classes that are not images but that GDCM lists as series: segmentations (a DICOM SEG
#: written beside the CT), registrations, RT structure sets, structured reports, presentation states.
NON_IMAGE_SOP_CLASS_PREFIXES = ("1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.")


def dicom_series_ids(folder: str) -> List[str]:
    """SeriesInstanceUIDs of the DICOM image series directly in ``folder`` (empty when none).

    Series of non-image objects (:data:`NON_IMAGE_SOP_CLASS_PREFIXES`, e.g. a DICOM SEG this
    tool wrote into the CT's folder) are left out, so they never make a folder "several series".
    """
    import SimpleITK as sitk

    with itk_warnings_off():
        series_ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ())
        return [uid for uid in series_ids if not _is_non_image_series(folder, uid)]


def _is_non_image_series(folder: str, series_uid: str) -> bool:
    """Whether the first file of a series has a non-image SOP class (unreadable headers: no, the reader decides)."""
    import SimpleITK as sitk

    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid)
    if not files:
        return False
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False
    sop_class = reader.GetMetaData("0008|0016").strip().rstrip("\x00") if reader.HasMetaDataKey("0008|0016") else ""
    return sop_class.startswith(NON_IMAGE_SOP_CLASS_PREFIXES)


def read_dicom_series(folder: str, series_uid: Optional[str]) -> Tuple["sitk.Image", Optional[str]]:
    """The series' image and its modality (``0008|0060``, e.g. ``"CT"``; None when absent)."""
    import SimpleITK as sitk

    files = dicom_series_files(folder, series_uid)
    first, slice_step_mm = _check_dicom_slice_positions(files)
    check_header(
        f"The DICOM series in {os.path.basename(os.path.normpath(folder))}",
        dimension=3,
        size=(first.GetSize()[0], first.GetSize()[1], len(files)),
        spacing=(first.GetSpacing()[0], first.GetSpacing()[1], slice_step_mm),
        direction=first.GetDirection(),
        components=first.GetNumberOfComponents(),
        bytes_per_component=bytes_per_component(first.GetPixelID()),
    )
    modality = first.GetMetaData("0008|0060").strip().upper() if first.HasMetaDataKey("0008|0060") else None
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute(), modality or None
    except RuntimeError:
        raise SegmentationError("input_unreadable", f"Cannot read the DICOM series in {folder}: a file is corrupt.") from None


def dicom_series_files(folder: str, series_uid: Optional[str] = None) -> List[str]:
    """The files of the one DICOM series in ``folder`` (or of ``series_uid``), in ITK's slice order.

    Raises ``dicom_no_series`` when the folder holds none, ``dicom_multiple_series`` when it
    holds several and ``series_uid`` does not choose one of them.
    """
    import SimpleITK as sitk

    series_ids = dicom_series_ids(folder)
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
    with itk_warnings_off():
        return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid))


def _check_dicom_slice_positions(files: Sequence[str]) -> Tuple["sitk.ImageFileReader", float]:
    """Refuse duplicated, missing, unevenly spaced or sheared slices (ITK would silently stretch or skew the volume).

    Returns the reader of the first file (its header: size, direction, pixel type, tags)
    and the slice step in mm.
    """
    import SimpleITK as sitk

    if len(files) < 2:
        raise SegmentationError("input_not_3d", "The DICOM series has a single slice; a 3D CT needs many. Pass the folder of the whole series.")
    origins, normal, first = [], None, None
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise SegmentationError("input_unreadable", f"DICOM file {os.path.basename(name)} is corrupt or truncated.") from None
        if normal is None:
            first = reader
            normal = np.array(reader.GetDirection()).reshape(3, 3)[:, 2]
        origins.append(reader.GetOrigin())
    origins_mm = np.array(origins, dtype=float)
    positions = origins_mm @ normal
    order = np.argsort(positions)
    steps = np.diff(positions[order])
    if np.any(steps < 1e-3):
        raise SegmentationError("dicom_inconsistent", "The DICOM series has duplicated slices (two slices at the same position). Re-export the series.")
    median = float(np.median(steps))
    if np.any(np.abs(steps - median) > DICOM_SPACING_TOLERANCE * median + 1e-3):
        raise SegmentationError(
            "dicom_inconsistent",
            f"The DICOM slices are unevenly spaced (from {steps.min():.2f} to {steps.max():.2f} mm): slices are missing "
            f"or the series mixes acquisitions. Re-export the complete series.",
        )
    in_plane = origins_mm[order] - np.outer(positions[order], normal)
    shear = np.linalg.norm(np.diff(in_plane, axis=0), axis=1) / steps
    if np.max(shear) > DICOM_SHEAR_TOLERANCE:
        raise SegmentationError(
            "input_geometry",
            f"The DICOM slices are sheared (gantry tilt of about {np.degrees(np.arctan(np.max(shear))):.1f} degrees). "
            f"Re-export the series with tilt correction (scanner console or dcm2niix) first.",
        )
    assert first is not None
    return first, median
