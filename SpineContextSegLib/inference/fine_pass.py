"""A second, finer network pass along the column: the vertebrae the coarse grid shows too small.

The network learned vertebrae at the size lumbar ones have on its grid. Thoracic vertebrae are
smaller: on a contrast chest CT the coarse pass (1.8 mm) finds T3-T7 as hollow rings or pieces,
while on a 1.4 mm grid they look as large as the lumbar ones it knows and come out whole. A fine
grid alone is not the answer: thick-slice scans (CTChest4, 10 mm slices) lose most of their
column on it. So the fine pass runs only along the column the coarse pass found, and its
probability joins the coarse one voxel by voxel (the larger of the two), before the
post-processing: what either grid sees whole is kept.

Only the bodies need it (the arches come out on the coarse grid), so the fine pass runs one tile
per step along the column, centred on its bodies (:func:`tiles_along_the_bodies`): a chest CT's
column takes 5 tiles instead of the 20 of its whole box, for the same Dice on the shared cases.

Data flow: input CT -> fine grid over the column's box -> network on the tiles along the bodies
-> back onto the coarse grid (linear) -> ``max`` with the coarse probability.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from SpineContextSegLib.inference.preprocessing import AIR_HU, hu_to_unit_interval, resample_to_reference
from SpineContextSegLib.inference.stitcher import PredictFn, padded_shape_for, sliding_window_inference, tile_starts

if TYPE_CHECKING:
    import SimpleITK as sitk

#: Margin (mm) around the coarse column's box that the fine pass covers too: the rim of a
#: vertebra the coarse pass missed at the box's edge (a transverse process, a body's front).
FINE_PASS_MARGIN_MM = 10.0


def column_box(kept: np.ndarray, spacing_mm: Sequence[float], margin_mm: float = FINE_PASS_MARGIN_MM) -> Optional[Tuple[slice, slice, slice]]:
    """Box of the kept column on the coarse grid, widened by ``margin_mm`` and clipped to the grid.

    Parameters
    ----------
    kept : np.ndarray, (D, H, W) bool
        The column the coarse pass keeps (canonical grid).
    spacing_mm : (3,) float
        Its spacing in numpy order (z, y, x), mm.

    Returns
    -------
    tuple of 3 slices, or ``None`` when ``kept`` is empty.
    """
    from SpineContextSegLib.io.meshing import foreground_bounding_box

    box = foreground_bounding_box(kept)
    if box is None:
        return None
    margins = [int(np.ceil(margin_mm / s)) for s in spacing_mm]
    return tuple(slice(max(0, part.start - m), min(n, part.stop + m)) for part, m, n in zip(box, margins, kept.shape))  # type: ignore[return-value]


#: Depth (mm) behind the column's front face that its vertebral bodies fill (lumbar bodies are
#: 30-40 mm deep, thoracic 20-30): the fine tiles centre on this band.
BODY_DEPTH_MM = 40.0


def body_centres_mm(kept: np.ndarray, coarse: "sitk.Image", body_depth_mm: float = BODY_DEPTH_MM) -> np.ndarray:
    """Centre of the vertebral bodies in each axial slice of the column, in physical mm.

    In every slice of ``kept`` (the column on the canonical grid of ``coarse``, (D, H, W) bool,
    numpy axis 1 = posterior) the bodies are the column's front ``body_depth_mm``: the centre is
    half that depth behind the front face, left-right at the mean of the column's voxels there.

    Returns
    -------
    np.ndarray, (N, 3) float
        (x, y, z) LPS mm, one row per slice that holds the column, inferior first.
    """
    spacing = np.asarray(coarse.GetSpacing(), dtype=float)
    origin = np.asarray(coarse.GetOrigin(), dtype=float)
    depth_voxels = max(1, int(round(body_depth_mm / spacing[1])))
    centres = []
    for z in np.flatnonzero(kept.any(axis=(1, 2))):
        front = int(np.argmax(kept[z].any(axis=1)))
        columns = np.nonzero(kept[z, front : front + depth_voxels])[1]
        index = np.array([columns.mean(), front + 0.5 * (depth_voxels - 1), z])
        centres.append(origin + index * spacing)
    return np.array(centres).reshape(-1, 3)


def tiles_along_the_bodies(centres_mm: np.ndarray, fine: "sitk.Image", patch_size: Sequence[int], overlap: float) -> List[Tuple[slice, slice, slice]]:
    """One tile per step along the fine grid's z axis, centred in-plane on the bodies of the slices it holds.

    Parameters
    ----------
    centres_mm : (N, 3) float
        :func:`body_centres_mm`.
    fine : sitk.Image
        The fine grid (canonical: identity direction).
    patch_size : (3,) int
        Tile size, numpy order (D, H, W).
    overlap : float
        Overlap of consecutive tiles along z (the regular tiling's steps).

    Returns
    -------
    list of tiles (slice tuples, numpy order) inside the volume padded to at least one tile
    (:func:`~SpineContextSegLib.inference.stitcher.padded_shape_for`).
    """
    shape = padded_shape_for(fine.GetSize()[::-1], patch_size)
    spacing = np.asarray(fine.GetSpacing(), dtype=float)
    index = (centres_mm - np.asarray(fine.GetOrigin(), dtype=float)) / spacing  # (x, y, z) voxel index
    tiles = []
    for start in tile_starts(shape[0], patch_size[0], overlap):
        inside = (index[:, 2] >= start) & (index[:, 2] < start + patch_size[0])
        if not inside.any():  # a step beyond the column's ends: the nearest slice's bodies
            inside = np.abs(index[:, 2] - (start + 0.5 * patch_size[0])) == np.abs(index[:, 2] - (start + 0.5 * patch_size[0])).min()
        centre_y, centre_x = np.median(index[inside, 1]), np.median(index[inside, 0])
        y0 = int(np.clip(round(centre_y - 0.5 * patch_size[1]), 0, shape[1] - patch_size[1]))
        x0 = int(np.clip(round(centre_x - 0.5 * patch_size[2]), 0, shape[2] - patch_size[2]))
        tiles.append((slice(start, start + patch_size[0]), slice(y0, y0 + patch_size[1]), slice(x0, x0 + patch_size[2])))
    return tiles


def fine_grid_over(coarse: "sitk.Image", box: Sequence[slice], fine_spacing_mm: float) -> "sitk.Image":
    """An empty image on an isotropic ``fine_spacing_mm`` grid covering the voxels ``box`` of ``coarse``.

    ``coarse`` is a canonical image (identity direction); ``box`` is in numpy order (z, y, x).
    The fine grid's voxel edges enclose the box's voxel edges and it is centred on them.
    """
    import SimpleITK as sitk

    spacing = np.asarray(coarse.GetSpacing(), dtype=float)  # x, y, z
    origin = np.asarray(coarse.GetOrigin(), dtype=float)
    start = np.array([part.start for part in reversed(box)], dtype=float)
    stop = np.array([part.stop for part in reversed(box)], dtype=float)
    low, high = origin + (start - 0.5) * spacing, origin + (stop - 0.5) * spacing
    size = np.maximum(1, np.ceil(np.round((high - low) / fine_spacing_mm, 6))).astype(int)
    fine_origin = low + 0.5 * fine_spacing_mm + 0.5 * ((high - low) - size * fine_spacing_mm)
    reference = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    reference.SetSpacing([float(fine_spacing_mm)] * 3)
    reference.SetOrigin([float(o) for o in fine_origin])
    reference.SetDirection(np.eye(3).ravel().tolist())
    return reference


def add_fine_pass(
    probability: np.ndarray,
    coarse: "sitk.Image",
    image: "sitk.Image",
    kept: np.ndarray,
    predict: PredictFn,
    *,
    fine_spacing_mm: float,
    patch_size: Sequence[int],
    overlap: float,
    hu_window: Tuple[float, float],
    threshold: float = 0.5,
    on_tile: Optional[Callable[[int, int], None]] = None,
) -> Dict[str, object]:
    """Run the network on a ``fine_spacing_mm`` grid along the column's bodies and keep the larger probability.

    Parameters
    ----------
    probability : np.ndarray, (D, H, W) float32
        The coarse pass's spine probability on ``coarse``'s grid; updated in place inside the
        column's box (:func:`column_box`).
    coarse : sitk.Image
        The canonical image ``probability`` lives on (its geometry only).
    image : sitk.Image
        The input CT (HU), resampled afresh onto the fine grid (not the coarse copy: no second blur).
    kept : np.ndarray, (D, H, W) bool
        The column the coarse pass keeps (``postprocess.spine_components``); must not be empty.
    predict, patch_size, overlap, on_tile
        As for :func:`~SpineContextSegLib.inference.stitcher.sliding_window_inference`.
    hu_window : (2,) float
        HU mapped to [0, 1], the model's.
    threshold : float
        The mask's threshold (only for ``added_ml``).

    Returns
    -------
    dict
        ``spacing_mm``, ``shape_zyx`` (the fine grid), ``tiles`` (tiles run), ``added_ml``
        (coarse-grid voxels the fine pass lifts to ``threshold`` that the coarse pass left below).
    """
    import SimpleITK as sitk

    spacing_zyx = coarse.GetSpacing()[::-1]
    box = column_box(kept, spacing_zyx)
    if box is None:
        raise ValueError("the fine pass needs the coarse pass's column: kept is empty")
    fine = fine_grid_over(coarse, box, fine_spacing_mm)
    tiles_planned = tiles_along_the_bodies(body_centres_mm(kept, coarse), fine, patch_size, overlap)
    fine_hu = sitk.GetArrayFromImage(resample_to_reference(image, fine, method="linear", default_value=AIR_HU, pixel_type=sitk.sitkFloat32))
    tiles = [0]

    def counted(done: int, planned: int) -> None:
        tiles[0] = done
        if on_tile is not None:
            on_tile(done, planned)

    fine_probability = sliding_window_inference(
        hu_to_unit_interval(fine_hu, hu_window)[np.newaxis], predict, patch_size, out_channels=1, on_tile=counted, tiles=tiles_planned
    )[0]
    fine_image = sitk.GetImageFromArray(np.ascontiguousarray(fine_probability, dtype=np.float32))
    fine_image.CopyInformation(fine)
    region = sitk.RegionOfInterest(coarse, [part.stop - part.start for part in reversed(box)], [part.start for part in reversed(box)])
    on_coarse = sitk.GetArrayFromImage(resample_to_reference(fine_image, region, method="linear", default_value=0.0, pixel_type=sitk.sitkFloat32))  # a copy: a view would outlive its image
    box = tuple(box)
    before = probability[box] >= threshold
    np.maximum(probability[box], on_coarse, out=probability[box])
    added = np.count_nonzero((probability[box] >= threshold) & ~before)
    voxel_ml = float(np.prod(coarse.GetSpacing())) / 1000.0
    return {"spacing_mm": float(fine_spacing_mm), "shape_zyx": list(fine_hu.shape), "tiles": tiles[0], "added_ml": round(added * voxel_ml, 2)}
