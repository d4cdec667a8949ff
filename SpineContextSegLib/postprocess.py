"""Probability map -> clean spine mask: threshold, keep the spine's components, fill holes.

Post-processing edits the **probability map** on the canonical grid (cheap: few voxels)
instead of a binary mask, so that the one resampling back to the input grid can stay
linear and the final threshold gives smooth, input-resolution boundaries.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from .errors import SegmentationError


def clean_probability(
    probability: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    threshold: float = 0.5,
    min_island_ml: float = 1.0,
    min_spine_ml: float = 5.0,
    fill_holes: bool = True,
) -> Tuple[np.ndarray, dict]:
    """Remove small islands and fill enclosed holes in a foreground probability map.

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
    kept = keep[labels]
    cleaned = np.where(kept | ~foreground, probability, np.float32(0.0)).astype(np.float32, copy=False)
    # Below-threshold voxels next to a removed island would re-form a thin shell after linear
    # resampling; zero the island's immediate neighbourhood too.
    removed = foreground & ~kept
    if removed.any():
        cleaned[ndimage.binary_dilation(removed, iterations=1) & ~kept] = 0.0
    if fill_holes:
        filled = ndimage.binary_fill_holes(kept)
        cleaned[filled & ~kept] = 1.0
    info = {"components": int(count), "kept_components": int(keep.sum()), "spine_ml": round(float(sizes_ml[keep[1:]].sum()), 2)}
    return cleaned, info
