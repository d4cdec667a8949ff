"""Checks that an image is a CT we can segment, and the one fix of its values we make.

Checks happen in the cheapest order. :func:`check_header` refuses what a header alone shows
(dimension, components, size, spacing, direction and the memory the run will need), before a
voxel is read; :func:`validate_ct` then looks at the voxels (NaN/Inf, constant, CT-like
intensities). Every problem becomes a :class:`SegmentationError` with a specific code.
:func:`undo_unsigned_offset` shifts unsigned CT stored without a rescale intercept to
Hounsfield units, with a warning. :func:`itk_warnings_off` keeps ITK's C++ warnings off stderr
while an image is read.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import numpy as np

from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.io.memory import check_memory

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

    from SpineContextSegLib.progress import ProgressReporter

#: Largest deviation of the direction matrix from orthonormal that we accept (rounded DICOM cosines).
DIRECTION_ORTHONORMAL_TOLERANCE = 1e-3

#: Unsigned CT without RescaleIntercept: HU = stored value - 1024 (the intercept scanners almost always use).
UNSIGNED_CT_OFFSET = 1024

#: Peak bytes a run needs per voxel of the input grid, beyond the stored voxels: the linear
#: resampling of the probability back onto it (float32) and the uint8 mask (two copies).
INPUT_GRID_BYTES_PER_VOXEL = 6


@contextlib.contextmanager
def itk_warnings_off() -> Iterator[None]:
    """Silence ITK's C++ warnings (printed straight to stderr) for the duration; errors still raise."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def bytes_per_component(pixel_id: int) -> int:
    import SimpleITK as sitk

    name = sitk.GetPixelIDValueAsString(pixel_id)  # e.g. "16-bit signed integer", "vector of 32-bit float"
    for bits in (8, 16, 32, 64):
        if f"{bits}-bit" in name:
            return bits // 8 * (2 if "complex" in name else 1)
    return 8


def check_header(
    name: str,
    *,
    dimension: int,
    size: Sequence[int],
    spacing: Sequence[float],
    direction: Sequence[float],
    components: int = 1,
    bytes_per_component: int = 2,
) -> None:
    """Everything that can be refused from a header alone, before a voxel is read.

    Parameters
    ----------
    size, spacing, direction
        As ITK reports them: (x, y, z) voxels, (x, y, z) mm, row-major direction cosines.
    components, bytes_per_component
        Per voxel, as stored; they size the memory the input itself takes.
    """
    if components != 1:
        raise SegmentationError("input_not_scalar", f"{name} has {components} components per voxel (RGB/vector). Pass a greyscale CT.")
    if dimension != 3:
        hint = " (a time series or several volumes in one file)" if dimension > 3 else ""
        raise SegmentationError("input_not_3d", f"{name} is {dimension}D{hint}; a 3D CT volume is needed.")
    size = tuple(int(s) for s in size)
    if min(size) <= 0:
        raise SegmentationError("input_empty", f"{name} has no voxels (size {size}).")
    if min(size) < 2:
        raise SegmentationError("input_not_3d", f"{name} is a single slice (size {size}); a 3D CT with several slices is needed.")
    check_geometry(name, np.abs(np.asarray(spacing, dtype=float)), direction)  # ITK folds a negative spacing into the direction
    needed = int(np.prod(size, dtype=np.float64) * (components * bytes_per_component + INPUT_GRID_BYTES_PER_VOXEL))
    check_memory(needed, f"{name} ({size[0]} x {size[1]} x {size[2]} voxels)")


def check_geometry(name: str, spacing: Sequence[float], direction: Sequence[float]) -> None:
    """Spacing must be finite and positive; direction cosines finite and orthonormal (rotation or reflection)."""
    spacing = np.asarray(spacing, dtype=float)
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise SegmentationError("input_geometry", f"{name} has invalid voxel spacing {tuple(spacing.tolist())} mm; fix the header.")
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-6:
        raise SegmentationError("input_geometry", f"{name} has a singular or invalid direction matrix; fix the header.")
    if np.max(np.abs(matrix.T @ matrix - np.eye(3))) > DIRECTION_ORTHONORMAL_TOLERANCE:
        raise SegmentationError(
            "input_geometry",
            f"{name} has sheared (non-orthogonal) axes, e.g. from a CT gantry tilt; resample it onto an orthogonal grid first.",
        )


# ----------------------------------------------------------------------------- slices
def cranio_caudal_axis(image: "sitk.Image") -> int:
    """Index (x, y, z order) of the image axis closest to the patient's head-foot axis (LPS z)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return int(np.argmax(np.abs(direction[2, :])))  # column j of the direction matrix is image axis j in LPS


def cranio_caudal_spacing_mm(image: "sitk.Image") -> float:
    """Voxel spacing of ``image`` along the image axis closest to the patient's head-foot axis (LPS z), mm."""
    return float(image.GetSpacing()[cranio_caudal_axis(image)])


#: Soft tissue (HU): where a CT's voxel-to-voxel variation is its noise, not anatomy.
SOFT_TISSUE_HU = (-150.0, 150.0)


def resolved_slice_spacing_mm(image: "sitk.Image", *, samples_per_row: int = 64) -> float:
    """The slice spacing along the head-foot axis that the CT's voxels resolve, mm.

    A CT resampled onto thinner slices by linear (or nearest-neighbour) interpolation keeps
    the resolution of its original slices: between two of them every voxel lies on a straight
    line (or copies one), so the second difference along the axis vanishes, and only the
    slices next to the original ones carry the scanner's noise. Per slice, the mean absolute
    second difference over soft tissue (:data:`SOFT_TISSUE_HU`, about ``samples_per_row``
    samples per row) is measured; slices below a quarter of the loud level (the 98th
    percentile) are quiet. When most slices are quiet, the result is the file's spacing times
    one plus the median length of the runs of quiet slices (a 10 mm CT resampled to 1 mm:
    about 10 mm); otherwise, and for a CT without noise or with too few slices to tell, it is
    the file's spacing (:func:`cranio_caudal_spacing_mm`). Smooth interpolators (B-spline,
    windowed sinc) are not detected.
    """
    import SimpleITK as sitk

    spacing_mm = cranio_caudal_spacing_mm(image)
    axis = 2 - cranio_caudal_axis(image)  # numpy order
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.ndim != 3 or voxels.shape[axis] < 10:
        return spacing_mm
    sampled = [slice(None, None, max(1, n // samples_per_row)) for n in voxels.shape]
    sampled[axis] = slice(None)
    values = np.moveaxis(np.asarray(voxels[tuple(sampled)], dtype=np.float32), axis, 0)
    soft = (values > SOFT_TISSUE_HU[0]) & (values < SOFT_TISSUE_HU[1])
    counted = (soft[:-2] & soft[1:-1] & soft[2:]).reshape(values.shape[0] - 2, -1)
    second = np.abs(values[2:] - 2.0 * values[1:-1] + values[:-2]).reshape(counted.shape)
    samples = counted.sum(axis=1)
    valid = samples >= 50
    if valid.sum() < 8:
        return spacing_mm
    per_slice = (second * counted).sum(axis=1)[valid] / samples[valid]
    loud = float(np.percentile(per_slice, 98))
    if loud < 3.0:  # no noise to go by (a synthetic or heavily denoised image): cannot tell
        return spacing_mm
    quiet = per_slice < 0.25 * loud
    if quiet.mean() < 0.5:
        return spacing_mm
    edges = np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]]))
    runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    return spacing_mm * (1.0 + float(np.median(runs)))


# ----------------------------------------------------------------------------- values
def undo_unsigned_offset(
    image: "sitk.Image", *, name: str, modality: Optional[str] = None, reporter: Optional["ProgressReporter"] = None
) -> "sitk.Image":
    """Shift unsigned CT stored without a rescale intercept to HU (value - 1024), with a warning; else return ``image``.

    Recognised when the pixel type is uint16/uint32, the DICOM modality (if any) is CT, and the
    histogram has both air (stored 0..224, i.e. <= -800 HU) and soft tissue (stored 824..1324,
    -200..+300 HU), each in at least 2 % of the voxels. Unsigned images without that pattern
    are left alone (and get ``input_not_ct`` from :func:`validate_ct`).
    """
    import SimpleITK as sitk

    if image.GetPixelID() not in (sitk.sitkUInt16, sitk.sitkUInt32) or modality not in (None, "CT"):
        return image
    values = sitk.GetArrayViewFromImage(image)
    sample = values.reshape(-1)[:: max(1, values.size // 2_000_000)]
    air = np.count_nonzero(sample <= UNSIGNED_CT_OFFSET - 800)
    soft_tissue = np.count_nonzero((sample >= UNSIGNED_CT_OFFSET - 200) & (sample <= UNSIGNED_CT_OFFSET + 300))
    if air < 0.02 * sample.size or soft_tissue < 0.02 * sample.size:
        return image
    high = int(values.max())
    shifted = sitk.Cast(image, sitk.sitkInt16 if high - UNSIGNED_CT_OFFSET <= np.iinfo(np.int16).max else sitk.sitkInt32) - UNSIGNED_CT_OFFSET
    if reporter is not None:
        reporter.warning(
            "input_unsigned_ct",
            f"{name}: unsigned values {int(values.min())}..{high} with no rescale intercept look like CT stored with an offset of "
            f"{UNSIGNED_CT_OFFSET}; using HU = value - {UNSIGNED_CT_OFFSET}. If this is not a CT the result is meaningless; "
            f"re-export the CT in Hounsfield units to silence this warning.",
        )
    return shifted


def validate_ct(
    image: "sitk.Image", *, name: str = "input", reporter: Optional["ProgressReporter"] = None, modality: Optional[str] = None
) -> None:
    """Check dimension, components, geometry and values; warn when the image does not look like CT.

    ``modality`` is the DICOM modality tag when known; anything but ``"CT"`` gets the warning.
    """
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
    check_geometry(name, image.GetSpacing(), image.GetDirection())
    # numpy's min/max: 20x faster than StatisticsImageFilter on a full CT; a NaN anywhere makes both NaN
    values = sitk.GetArrayViewFromImage(image)
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise SegmentationError("input_nonfinite", f"{name} contains NaN or infinite values; the file is damaged. Re-export the CT.")
    if low == high:
        raise SegmentationError("input_empty", f"{name} is constant (every voxel is {low:g}); it holds no CT data.")
    if reporter is None:
        return
    if modality not in (None, "CT"):
        reporter.warning("input_not_ct", f"{name}: the DICOM modality is {modality}, not CT. Results on non-CT images are not meaningful.")
    elif low > -200 or high < 100:
        reporter.warning(
            "input_not_ct",
            f"{name}: intensities {low:g}..{high:g} do not look like CT Hounsfield units (air is about -1000). "
            f"Results on non-CT images are not meaningful.",
        )
