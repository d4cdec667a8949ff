"""Probability map -> clean spine mask: threshold, keep the spine's components, fill holes.

Post-processing edits the **probability map** on the canonical grid (cheap: few voxels)
instead of a binary mask, so that the one resampling back to the input grid can stay
linear and the final threshold gives smooth, input-resolution boundaries.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from .errors import SegmentationError


#: Largest in-plane distance (mm) of a component's centroid from the column's axis; about two
#: lumbar body radii. Pieces of the spine cut off by a gap (a missed vertebra, a disc) lie on
#: the axis; hip, humerus, sternum and calcified aorta lie 40-150 mm off it.
MAX_COLUMN_OFFSET_MM = 35.0


def column_axis_mm(component: np.ndarray, spacing_mm: Sequence[float], smoothing_mm: float = 25.0) -> Tuple[np.ndarray, np.ndarray]:
    """In-plane centre of a spine component in every axial slice, in mm.

    Parameters
    ----------
    component : (D, H, W) bool
        One connected component on the canonical grid (numpy axis 0 = inferior->superior).
    spacing_mm : (3,) float
        Voxel spacing (z, y, x), mm.
    smoothing_mm : float
        Length of the running median along z (slices through a disc hold only the posterior
        arch, whose centre lies behind the body's).

    Returns
    -------
    centre_mm : (D, 2) float
        (y, x) mm of the centre; slices beyond the component's ends take its end slice's value.
    covered : (D,) bool
        Slices the component occupies.
    """
    from scipy import ndimage

    z, y, x = np.nonzero(component)
    depth = component.shape[0]
    counts = np.bincount(z, minlength=depth).astype(np.float64)
    covered = counts > 0
    centre = np.zeros((depth, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        centre[:, 0] = np.bincount(z, weights=y, minlength=depth) / counts * spacing_mm[1]
        centre[:, 1] = np.bincount(z, weights=x, minlength=depth) / counts * spacing_mm[2]
    index = np.flatnonzero(covered)
    size = max(1, int(round(smoothing_mm / spacing_mm[0])) | 1)
    for axis in range(2):
        centre[index, axis] = ndimage.median_filter(centre[index, axis], size=size, mode="nearest")
        centre[:, axis] = np.interp(np.arange(depth), index, centre[index, axis])  # constant beyond the ends
    return centre, covered


def clean_probability(
    probability: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    threshold: float = 0.5,
    min_island_ml: float = 1.0,
    min_spine_ml: float = 5.0,
    max_column_offset_mm: float = MAX_COLUMN_OFFSET_MM,
    fill_holes: bool = True,
) -> Tuple[np.ndarray, dict]:
    """Remove small islands and pieces off the column; fill enclosed holes in a foreground probability map.

    Parameters
    ----------
    probability : np.ndarray, (D, H, W) float32 in [0, 1]
        Spine probability on the canonical grid (numpy order z, y, x).
    spacing_mm : (3,) float
        Voxel spacing in numpy order (z, y, x), mm.
    threshold : float
        Foreground is ``probability >= threshold``.
    min_island_ml : float
        Connected components (26-connectivity) smaller than this are removed.
    min_spine_ml : float
        If the largest component is smaller than this, there is no spine: raises
        ``SegmentationError("no_spine_found")``.
    max_column_offset_mm : float
        Components whose centroid lies further than this in-plane from the largest
        component's axis (:func:`column_axis_mm`, at the centroid's slice or the nearest end)
        are removed: false positives beside the spine, not parts of it. ``inf`` keeps them.
    fill_holes : bool
        Set enclosed background (e.g. an under-segmented trabecular core) to foreground.

    Returns
    -------
    probability : np.ndarray (D, H, W) float32
        A copy with removed islands set to 0 and filled holes set to 1.
    info : dict
        ``components``, ``kept_components``, ``spine_ml``.
    """
    from scipy import ndimage

    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    foreground = probability >= threshold
    labels, count = ndimage.label(foreground, structure=np.ones((3, 3, 3), dtype=bool))
    sizes_ml = np.bincount(labels.ravel(), minlength=count + 1)[1:] * voxel_ml
    largest_ml = float(sizes_ml.max()) if count else 0.0
    if largest_ml < min_spine_ml:
        raise SegmentationError(
            "no_spine_found",
            f"No spine found in the field of view (largest candidate {largest_ml:.1f} ml < {min_spine_ml:g} ml). "
            f"Check that the CT covers the spine.",
        )
    keep = np.zeros(count + 1, dtype=bool)
    keep[1:] = sizes_ml >= min_island_ml
    if np.isfinite(max_column_offset_mm) and keep.sum() > 1:
        largest = int(np.argmax(sizes_ml)) + 1
        boxes = ndimage.find_objects(labels)  # one pass; centroids and the axis are then computed inside small boxes
        box = boxes[largest - 1]
        axis_mm, _ = column_axis_mm(labels[box] == largest, spacing_mm)
        axis_mm += np.array([box[1].start * spacing_mm[1], box[2].start * spacing_mm[2]])
        for value in np.flatnonzero(keep):
            if value == largest:
                continue
            piece = boxes[value - 1]
            centroid = np.mean(np.nonzero(labels[piece] == value), axis=1) + [s.start for s in piece]
            z = int(np.clip(round(centroid[0]) - box[0].start, 0, len(axis_mm) - 1))  # beyond the ends: the end slice
            offset = np.hypot(centroid[1] * spacing_mm[1] - axis_mm[z, 0], centroid[2] * spacing_mm[2] - axis_mm[z, 1])
            keep[value] = offset <= max_column_offset_mm
    kept = keep[labels]
    cleaned = np.where(kept | ~foreground, probability, np.float32(0.0)).astype(np.float32, copy=False)
    # Below-threshold voxels next to a removed island would re-form a thin shell after linear
    # resampling; zero the island's immediate neighbourhood too.
    removed = foreground & ~kept
    if removed.any():
        cleaned[ndimage.binary_dilation(removed, iterations=1) & ~kept] = 0.0
    if fill_holes and kept.any():
        # Enclosed holes lie inside the kept mask's bounding box: fill there (1 voxel of margin
        # keeps background that touches the box's faces connected to the outside).
        extent = ndimage.find_objects(kept.view(np.uint8))[0]
        region = tuple(slice(max(0, part.start - 1), part.stop + 1) for part in extent)
        holes = ndimage.binary_fill_holes(kept[region]) & ~kept[region]
        cleaned[region][holes] = 1.0
    info = {"components": int(count), "kept_components": int(keep.sum()), "spine_ml": round(float(sizes_ml[keep[1:]].sum()), 2)}
    return cleaned, info
