"""Gaussian-weighted sliding-window inference over a 3D volume.

The volume is covered by tiles of ``patch_size`` placed so that none hangs past the
volume (the last tile of each axis ends exactly at the far edge; volumes smaller than a
patch are padded once, up front). Predictions are blended with a Gaussian importance map
(sigma = patch/8, as in nnU-Net) into float32 accumulators; tiles are processed in
batches and never kept after they are accumulated.

The tiles can also be run in rounds that follow what the network finds (``start_region`` and
``grow_region``): a voxel whose every covering tile ran gets exactly the value the whole tiling
gives it, so following the spine through the tiling reproduces the spine while skipping the
tiles that only hold arms, lungs or table.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

#: ``predict(batch)``: ``(B, C_in, D, H, W)`` float32 -> ``(B, C_out, D, H, W)`` float32.
PredictFn = Callable[[np.ndarray], np.ndarray]


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """Separable Gaussian weights for one tile, peak 1 at the centre.

    Parameters
    ----------
    patch_size : (D, H, W) int
    sigma_scale : float
        Sigma as a fraction of the patch size along each axis.

    Returns
    -------
    np.ndarray, float32, shape ``patch_size``
        Strictly positive (the smallest weight is clamped to 1e-6 of the peak so a voxel
        at a tile corner covered by only one tile still gets that tile's prediction).
    """
    weights = np.ones((), dtype=np.float64)
    for size in patch_size:
        centre = (size - 1) / 2.0
        sigma = max(size * sigma_scale, 1e-6)
        profile = np.exp(-0.5 * ((np.arange(size) - centre) / sigma) ** 2)
        weights = np.multiply.outer(weights, profile)
    weights /= weights.max()
    return np.maximum(weights, 1e-6).astype(np.float32)


def tile_starts(size: int, patch: int, overlap: float) -> List[int]:
    """Start indices along one axis: the fewest tiles whose step is at most ``patch * (1 - overlap)``.

    The first tile starts at 0, the last ends at ``size``; starts are evenly spread. Requires
    ``size >= patch`` (pad first otherwise).
    """
    if size < patch:
        raise ValueError(f"axis of size {size} is smaller than the patch {patch}; pad first")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    max_step = max(1, int(np.floor(patch * (1.0 - overlap))))
    count = int(np.ceil((size - patch) / max_step)) + 1
    if count == 1:
        return [0]
    return [int(round(i * (size - patch) / (count - 1))) for i in range(count)]


def tile_grid(shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> List[Tuple[slice, ...]]:
    """All tiles (as slice tuples) covering ``shape``; ``shape >= patch_size`` on every axis."""
    starts = [tile_starts(s, p, overlap) for s, p in zip(shape, patch_size)]
    return [tuple(slice(a, a + p) for a, p in zip(corner, patch_size)) for corner in itertools.product(*starts)]


def padded_shape_for(shape: Sequence[int], patch_size: Sequence[int]) -> Tuple[int, ...]:
    """The shape a volume is padded to so that every axis holds at least one patch."""
    return tuple(max(s, p) for s, p in zip(shape, patch_size))


def following_rim_voxels(patch_size: Sequence[int], overlap: float) -> int:
    """The rim of a tile that following may leave to its neighbours: a third of the tiles' overlap, voxels.

    There a tile's Gaussian weight (:func:`gaussian_importance_map`, sigma = patch / 8) is at
    most 0.3 % of its centre's at overlap 0.25 (2 % at 0.5), while the neighbour that holds
    those voxels has them well inside: a region found only in the rim barely depends on the
    tile (``rim_voxels`` of :func:`sliding_window_inference`).
    """
    return int(min(patch_size) * overlap) // 3


def _batches(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def tiles_touching(tiles: Sequence[Tuple[slice, ...]], region: np.ndarray, margin_voxels: int = 0) -> List[int]:
    """Indices of the tiles that hold a voxel of ``region`` (a bool array) within ``margin_voxels`` of their faces.

    A negative ``margin_voxels`` asks for a voxel of the tile's core: at least that many voxels
    in from every face inside the volume (a face on the volume's edge has no neighbour beyond it).
    """
    touching = []
    for index, tile in enumerate(tiles):
        # faces on the volume's edge stay where they are
        grown = tuple(
            slice(max(0, part.start - margin_voxels) if part.start > 0 else 0, part.stop + margin_voxels if part.stop < size else size)
            for part, size in zip(tile, region.shape)
        )
        if region[grown].any():
            touching.append(index)
    return touching


def sliding_window_inference(
    volume: np.ndarray,
    predict: PredictFn,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    out_channels: int = 1,
    batch_size: int = 1,
    pad_value: float = 0.0,
    sigma_scale: float = 1.0 / 8,
    on_tile: Optional[Callable[[int, int], None]] = None,
    start_region: Optional[np.ndarray] = None,
    grow_region: Optional[Callable[[np.ndarray], Optional[np.ndarray]]] = None,
    tiles: Optional[Sequence[Tuple[slice, ...]]] = None,
    rim_voxels: int = 0,
) -> np.ndarray:
    """Predict a whole volume tile by tile and blend the tiles with Gaussian weights.

    Parameters
    ----------
    volume : np.ndarray, shape (C_in, D, H, W), float32
    predict : callable
        ``(B, C_in, d, h, w) -> (B, out_channels, d, h, w)``.
    patch_size : (d, h, w)
        Tile size; clipped to nothing - an axis shorter than its patch is padded with ``pad_value``.
    overlap : float in [0, 1)
        Wanted fraction of overlap between neighbouring tiles (the actual overlap is at least this).
    on_tile : callable, optional
        ``on_tile(done, planned)`` after each batch: tiles run, and tiles run or due in this
        round (every tile of the tiling in one round; a plan that grows by rounds when
        following, ``len(tile_grid(...))`` at most). May raise to cancel (e.g. :class:`Cancelled`).
    start_region : np.ndarray, shape (D, H, W) bool, optional
        Run only the tiles holding a voxel of it in the first round. ``None`` (or a region
        that no tile holds): every tile, in one round.
    grow_region : callable, optional
        After each round, ``grow_region(blended)`` with ``blended`` (out_channels, d, h, w) the
        blend of the tiles run so far over their bounding box (0 where none ran) returns the
        voxels of that box (d, h, w) bool whose every covering tile must run (tiles within one
        voxel of it run too, so that a voxel on its edge keeps all its neighbours' tiles), or
        ``None`` for every tile.
        Rounds repeat until it asks for no tile that has not run. Meant for sigmoid outputs,
        where 0 means "nothing here" (a softmax's background channel would need 1).
    rim_voxels : int
        With ``grow_region``: a tile whose only voxels of the grown region lie within this many
        voxels of its faces does not run (the neighbours that hold them nearer their centres
        carry the blend there; :func:`following_rim_voxels`). Keep it under the tiles' overlap,
        or a region that runs on into the next tile is not followed. 0: the blend over the
        region and its edge is that of every tile.
    tiles : sequence of slice tuples, optional
        The tiles to run instead of the regular tiling: each ``patch_size`` long and inside the
        padded volume (e.g. tiles that follow a curved column). Voxels no tile covers are 0.

    Returns
    -------
    np.ndarray, shape (out_channels, D, H, W), float32
        ``sum_i(w_i * p_i) / sum_i(w_i)`` over the tiles that ran, at every voxel; 0 where
        none ran.
    """
    if volume.ndim != 4:
        raise ValueError(f"volume must be (C, D, H, W), got shape {volume.shape}")
    spatial = volume.shape[1:]
    padded_shape = padded_shape_for(spatial, patch_size)
    if padded_shape != spatial:
        padding = [(0, 0)] + [(0, p - s) for s, p in zip(spatial, padded_shape)]
        volume = np.pad(volume, padding, mode="constant", constant_values=pad_value)
    if tiles is None:
        tiles = tile_grid(padded_shape, patch_size, overlap)
    else:
        tiles = [tuple(tile) for tile in tiles]
        for tile in tiles:
            if [part.stop - part.start for part in tile] != list(patch_size) or any(part.start < 0 or part.stop > n for part, n in zip(tile, padded_shape)):
                raise ValueError(f"tile {tile} is not a {tuple(patch_size)} tile inside the padded volume {padded_shape}")
    importance = gaussian_importance_map(patch_size, sigma_scale)
    accumulated = np.zeros((out_channels,) + padded_shape, dtype=np.float32)
    weight_sum = np.zeros(padded_shape, dtype=np.float32)
    unpadded = (slice(None),) + tuple(slice(0, s) for s in spatial)

    def padded_region(region: np.ndarray) -> np.ndarray:
        if region.shape != spatial:
            raise ValueError(f"a tile region must have the volume's shape {spatial}, got {region.shape}")
        return np.pad(region, [(0, p - s) for s, p in zip(spatial, padded_shape)]) if padded_shape != spatial else region

    def blend(accumulated: np.ndarray, weight_sum: np.ndarray) -> np.ndarray:
        """``accumulated / weight_sum`` in place (where no tile ran both are 0, and stay 0)."""
        return np.divide(accumulated, weight_sum, out=accumulated, where=weight_sum > 0)

    ran = np.zeros(len(tiles), dtype=bool)
    pending = list(range(len(tiles))) if start_region is None else tiles_touching(tiles, padded_region(start_region)) or list(range(len(tiles)))
    while pending:
        planned = int(ran.sum()) + len(pending)
        for batch_indices in _batches(pending, batch_size):
            batch_tiles = [tiles[i] for i in batch_indices]
            batch = np.stack([volume[(slice(None),) + tile] for tile in batch_tiles]).astype(np.float32, copy=False)
            prediction = predict(batch)
            if prediction.shape[1] != out_channels or prediction.shape[2:] != tuple(patch_size):
                raise ValueError(f"predict returned shape {prediction.shape}, expected (B, {out_channels}, *{tuple(patch_size)})")
            for tile, tile_prediction in zip(batch_tiles, prediction):
                accumulated[(slice(None),) + tile] += tile_prediction * importance
                weight_sum[tile] += importance
            ran[batch_indices] = True
            if on_tile is not None:
                on_tile(int(ran.sum()), planned)
        if grow_region is None or ran.all():
            break
        # only the box of the tiles run so far can hold anything they found
        ran_tiles = [tiles[i] for i in np.flatnonzero(ran)]
        ran_box = tuple(
            slice(min(tile[axis].start for tile in ran_tiles), min(size, max(tile[axis].stop for tile in ran_tiles))) for axis, size in enumerate(spatial)
        )
        found = grow_region(blend(accumulated[(slice(None),) + ran_box].copy(), weight_sum[ran_box]))
        if found is None:
            wanted = range(len(tiles))
        else:
            region = np.zeros(padded_shape, dtype=bool)
            region[ran_box] = found
            wanted = tiles_touching(tiles, region, margin_voxels=-rim_voxels if rim_voxels > 0 else 1)
        pending = [i for i in wanted if not ran[i]]
    blend(accumulated, weight_sum)
    if padded_shape != spatial:
        accumulated = np.ascontiguousarray(accumulated[unpadded])
    return accumulated
