"""Canonical geometry, intensity normalisation, body crop, the exact way back, and the memory a run needs.

The network always sees the **canonical grid**: axis-aligned with the LPS world axes
(identity direction), at the model's isotropic or anisotropic ``spacing_mm``, covering the
input's whole physical extent. Its numpy array (``sitk.GetArrayFromImage``) is indexed
``[k, j, i]`` = ``[S, P, L]``: axis 0 runs inferior->superior, axis 1 anterior->posterior,
axis 2 right->left. Any input orientation - flipped, permuted (sagittal slabs such as PIR),
oblique, anisotropic - is resampled onto it in one step, and results are resampled back
onto the input image itself, so the output has exactly the input's size, spacing, origin
and direction.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import numpy as np

from SpineContextSegLib.io.memory import check_memory
from SpineContextSegLib.io.validation import INPUT_GRID_BYTES_PER_VOXEL

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

AIR_HU = -1024.0

#: Peak bytes per voxel of the canonical grid: float32 HU, network input, stitcher accumulator
#: and weights, probability, component labels (int32) and the cleaned probability.
CANONICAL_GRID_BYTES_PER_VOXEL = 32

_INTERPOLATORS = {"nearest": "sitkNearestNeighbor", "linear": "sitkLinear", "bspline": "sitkBSpline"}


def interpolator(name: str) -> int:
    import SimpleITK as sitk

    try:
        return getattr(sitk, _INTERPOLATORS[name])
    except KeyError:
        raise ValueError(f"unknown interpolator {name!r}; choose one of {sorted(_INTERPOLATORS)}") from None


def physical_corners(image: "sitk.Image") -> np.ndarray:
    """(8, 3) LPS mm coordinates of the outer voxel *edges* (index -0.5 and size-0.5) of ``image``."""
    size = np.array(image.GetSize(), dtype=float)
    spacing = np.array(image.GetSpacing(), dtype=float)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.array(image.GetOrigin(), dtype=float)
    lows, highs = -0.5 * np.ones(3), size - 0.5
    corners = np.array(list(itertools.product(*zip(lows, highs))))
    return origin + (corners * spacing) @ direction.T


def canonical_reference(image: "sitk.Image", spacing_mm: Sequence[float]) -> "sitk.Image":
    """An empty image defining the canonical grid that covers ``image``.

    Parameters
    ----------
    image : sitk.Image
        Any 3D image.
    spacing_mm : (3,) float
        Target spacing along L, P, S (x, y, z), mm.

    Returns
    -------
    sitk.Image
        uint8 image of identity direction whose voxel edges enclose the input's extent.
    """
    import SimpleITK as sitk

    spacing = np.asarray(spacing_mm, dtype=float)
    corners = physical_corners(image)
    low, high = corners.min(axis=0), corners.max(axis=0)
    # round before ceil: a 200 mm extent at 2 mm must give 100 voxels, not 101
    size = np.maximum(1, np.ceil(np.round((high - low) / spacing, 6))).astype(int)
    origin = low + 0.5 * spacing + 0.5 * ((high - low) - size * spacing)  # centre the grid on the extent
    reference = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    reference.SetSpacing([float(s) for s in spacing])
    reference.SetOrigin([float(o) for o in origin])
    reference.SetDirection(np.eye(3).ravel().tolist())
    return reference


def resample_to_reference(
    image: "sitk.Image", reference: "sitk.Image", *, method: str = "linear", default_value: float = 0.0, pixel_type: int = -1
) -> "sitk.Image":
    """Resample ``image`` onto the grid of ``reference`` (identity transform, physical space)."""
    import SimpleITK as sitk

    if pixel_type == -1:
        pixel_type = image.GetPixelID()
    return sitk.Resample(image, reference, sitk.Transform(), interpolator(method), float(default_value), pixel_type)


def to_canonical(image: "sitk.Image", spacing_mm: Sequence[float], *, method: str = "linear", default_value: float = AIR_HU) -> "sitk.Image":
    """Resample a CT (float32 output) or a label map (``method="nearest"``, type kept) onto its canonical grid."""
    import SimpleITK as sitk

    pixel_type = image.GetPixelID() if method == "nearest" else sitk.sitkFloat32
    if method == "nearest" and default_value == AIR_HU:
        default_value = 0
    return resample_to_reference(image, canonical_reference(image, spacing_mm), method=method, default_value=default_value, pixel_type=pixel_type)


def hu_to_unit_interval(hu: np.ndarray, hu_window: Tuple[float, float] = (-1000.0, 2000.0)) -> np.ndarray:
    """Clip HU to ``hu_window`` and map it linearly to [0, 1] (float32); the paper's normalisation."""
    low, high = float(hu_window[0]), float(hu_window[1])
    out = np.clip(hu, low, high).astype(np.float32, copy=False)
    out -= low
    out *= 1.0 / (high - low)
    return out


def body_bounding_box(hu: np.ndarray, *, threshold_hu: float = -500.0, margin_voxels: int = 4) -> Tuple[slice, ...]:
    """Bounding box of voxels denser than ``threshold_hu`` (the body, plus the table), with a margin.

    Returns a tuple of slices into ``hu``; the whole array when nothing is dense
    (the model then decides whether there is a spine).
    """
    dense = hu > threshold_hu
    slices = []
    for axis in range(hu.ndim):
        other = tuple(a for a in range(hu.ndim) if a != axis)
        profile = np.flatnonzero(dense.any(axis=other))
        if profile.size == 0:
            return tuple(slice(0, n) for n in hu.shape)
        slices.append(slice(max(0, int(profile[0]) - margin_voxels), min(hu.shape[axis], int(profile[-1]) + 1 + margin_voxels)))
    return tuple(slices)


def probability_on_input_grid(
    probability: "sitk.Image", reference: "sitk.Image", floor: float, *, within: Optional[Tuple[slice, ...]] = None
) -> Tuple[Tuple[slice, ...], np.ndarray]:
    """Resample a canonical-grid probability map linearly onto the part of ``reference``'s grid where it can reach ``floor``.

    A linear interpolation is a weighted mean of its 8 neighbours, so it reaches ``floor``
    only within one voxel of a voxel that does. That bounding box (mapped through the input's
    direction cosines, plus one voxel) is the spine's, a small part of a 512x512x400 CT.
    ``within`` (a box of ``probability``'s array, numpy order) limits the voxels considered;
    outside it the result may be below ``floor`` where the probability is not.

    Returns
    -------
    region : tuple of 3 slices
        The box on ``reference``'s array (numpy order k, j, i); empty slices if nothing reaches ``floor``.
    block : (K, J, I) float32
        The probability there; everywhere outside the box it is below ``floor``.
    """
    import SimpleITK as sitk
    from scipy import ndimage

    within = within or tuple(slice(0, n) for n in reversed(probability.GetSize()))
    considered = sitk.GetArrayViewFromImage(probability)[within]
    extent = ndimage.find_objects((considered >= floor).view(np.uint8)) if considered.size else []
    if extent:
        low_kji = np.array([part.start + box.start for part, box in zip(extent[0], within)]) - 1
        high_kji = np.array([part.stop + box.start for part, box in zip(extent[0], within)])  # last index + 1
        corners_mm = np.array([probability.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner[::-1]]) for corner in itertools.product(*zip(low_kji, high_kji))])
        # physical -> reference index in numpy: ITK's inverse (an SVD) fails on direction cosines
        # with denormal entries (1e-310) and returns NaN, which would lose the whole mask
        index_to_mm = np.array(reference.GetDirection()).reshape(3, 3) * np.array(reference.GetSpacing())
        corners_ijk = np.linalg.solve(index_to_mm, (corners_mm - np.array(reference.GetOrigin())).T).T
        size_ijk = np.array(reference.GetSize())
        low = np.clip(np.floor(corners_ijk.min(axis=0)).astype(int) - 1, 0, size_ijk)
        high = np.clip(np.ceil(corners_ijk.max(axis=0)).astype(int) + 2, 0, size_ijk)
        if np.all(high > low):
            region = sitk.Image([int(v) for v in high - low], sitk.sitkUInt8)
            region.SetSpacing(reference.GetSpacing())
            region.SetDirection(reference.GetDirection())
            region.SetOrigin(reference.TransformIndexToPhysicalPoint([int(v) for v in low]))
            on_region = resample_to_reference(probability, region, method="linear", default_value=0.0, pixel_type=sitk.sitkFloat32)
            return tuple(slice(int(a), int(b)) for a, b in zip(low[::-1], high[::-1])), sitk.GetArrayFromImage(on_region)
    return (slice(0, 0),) * 3, np.zeros((0, 0, 0), np.float32)


def estimate_segmentation_memory_bytes(image: "sitk.Image", canonical_spacing_mm: Sequence[float], output_channels: int = 1) -> int:
    """Peak bytes of one run on ``image``: the input grid plus the canonical grid at ``canonical_spacing_mm`` (x, y, z mm).

    The canonical grid's size follows :func:`canonical_reference`
    (it covers the input's physical extent), computed here without allocating it. A network with
    ``output_channels`` > 1 (vertebrae) adds one float32 stitching accumulator per extra channel.
    """
    corners = physical_corners(image)
    extent = corners.max(axis=0) - corners.min(axis=0)
    canonical_voxels = float(np.prod(np.maximum(1, np.ceil(np.round(extent / np.asarray(canonical_spacing_mm, dtype=float), 6)))))
    input_voxels = float(np.prod(image.GetSize()))
    stored = image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    canonical_bytes = CANONICAL_GRID_BYTES_PER_VOXEL + 4 * (max(1, int(output_channels)) - 1)
    return int(input_voxels * (stored + INPUT_GRID_BYTES_PER_VOXEL) + canonical_voxels * canonical_bytes)


def check_segmentation_memory(image: "sitk.Image", canonical_spacing_mm: Sequence[float], *, name: str = "The CT", output_channels: int = 1) -> None:
    """Refuse (``input_too_large``) before resampling when a run on ``image`` would not fit in free memory."""
    needed = estimate_segmentation_memory_bytes(image, canonical_spacing_mm, output_channels)
    check_memory(needed, f"{name} at {tuple(float(s) for s in canonical_spacing_mm)} mm")
