"""Binary spine mask -> one segment per vertebra, named with its VerSe id, without a network.

Three steps, all on the **canonical grid** of :mod:`SpineContextSegLib.preprocessing` (numpy
axis 0 inferior->superior, axis 1 anterior->posterior, axis 2 right->left), isotropic:

1. **Centreline** (:func:`body_centreline`): per axial slice, the centre of the thickest
   in-plane part of the mask (the vertebral body; posterior elements are thin), smoothed
   along z; slices through a disc (no body in the mask) are bridged, and beyond the first
   and last body the line runs straight on along the column's end direction.
2. **Split** (:func:`split_vertebrae`): along the centreline's arc length, the share of a
   cylinder around the body centreline that lies in the mask (:func:`body_profile`) drops
   at every intervertebral disc (discs are not bone). Discs are the deep minima of that
   profile, no closer together than about half a vertebra; a segment as long as two
   vertebrae is searched again for a shallow minimum (a disc bridged by osteophytes)
   (:func:`find_disc_levels`). Each vertebra gets three seeds, the core of its body, the
   bone just behind its body at pedicle level and the midline behind the canal where its
   laminae meet (so its spinous process is its own even where the mask bridges the joints to
   the vertebra below); the seeds grow through the mask, thick
   bone first (adjacent vertebrae touch at thin necks: facet joints, osteophytes),
   geodesically within a thickness level (:func:`grow_labels`). Every label ends up one
   26-connected piece (:func:`keep_largest_pieces`). A mask whose bodies are hollow
   shells (a HU threshold) is first closed and filled slice by slice (:func:`fill_slices`).
3. **Naming** (:func:`name_vertebrae`): every gap-free run of VerSe ids along the chain
   C1-L5 (or the chains with T13 or L6) as long as the number of vertebrae is scored
   against the evidence: ribs beside a vertebra (:func:`rib_evidence`: thoracic), bone
   outside the mask right below the lowest vertebra, with alae (:func:`bone_beyond_column`:
   the sacrum, so the lowest vertebra is the last lumbar one), a skull base above the
   highest (it is C1; C1 and C2 usually arrive as one segment and are split afterwards,
   :func:`split_atlas_from_axis`; a mask with a gap under the atlas gives C1 alone), and
   the body size (:data:`EXPECTED_BODY_RADIUS_MM`); with a vertebrae network
   (``train --task vertebrae``), also the names it gives each segment's voxels.
   The best run wins; its share of the total likelihood is the reported ``confidence``.

:func:`label_vertebrae` runs all three on SimpleITK images and returns the VerSe label map
on the input grid. The sacrum is not part of the binary mask (see
:data:`SpineContextSegLib.labels.SPINE_MASK_INCLUDES_SACRUM`); it serves as the anchor and,
with ``include_sacrum=True``, its upper part is segmented from the CT alone (VerSe 26,
:func:`segment_upper_sacrum`). A mask that took in the top of the sacrum leaves a small
segment below L5; :func:`caudal_fragment` tells it from a vertebra before naming.

Limits: a vertebra whose body the mask misses entirely is not counted (names above it
shift by one); vertebrae fused without any trace of a disc stay one segment; a scan with
neither ribs, sacrum nor skull base in view is named from body size alone, which tells
regions apart but not neighbours (``confidence`` then stays low); T13 and L6 can only be
told from the number of vertebrae between the lowest rib and the sacrum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import SegmentationError

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

#: Working grid spacing (mm) of :func:`label_vertebrae` (isotropic); coarser for very large crops.
WORKING_SPACING_MM = 1.0
#: Largest working grid (voxels) before the spacing is coarsened.
MAX_WORKING_VOXELS = 20_000_000
#: Bone threshold (HU) for ribs, sacrum and skull outside the mask.
BONE_HU = 200.0
#: Number of thickness levels of the seeded growth (see :func:`grow_labels`).
THICKNESS_LEVELS = 16
#: Working-grid marker of mask voxels that belong to no vertebra (a sacral fragment, see
#: :func:`caudal_fragment`) while the sacrum is not segmented; never written out.
NOT_A_VERTEBRA = 255

_CUBE = np.ones((3, 3, 3), dtype=bool)


def _spacing3(spacing_mm) -> np.ndarray:
    spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    if spacing.size == 1:
        spacing = np.repeat(spacing, 3)
    if spacing.size != 3 or not np.all(spacing > 0):
        raise ValueError(f"spacing_mm must be one positive number or three (z, y, x), got {spacing_mm!r}")
    return spacing


# --------------------------------------------------------------------------- centreline
@dataclass
class Centreline:
    """Vertebral-body centreline, one point per axial slice of the canonical grid.

    Every array has shape (D,), one entry per numpy axis-0 slice (inferior -> superior).
    Positions are millimetres from the centre of voxel (0, 0, 0) along numpy axes (z, y, x).

    Attributes
    ----------
    z_mm, y_mm, x_mm : (D,) float
        Centre of the body column in slice ``k`` (``z_mm[k] = k * spacing_z``).
    dy_dz, dx_dz : (D,) float
        Slope of the centreline (mm per mm of z).
    arc_mm : (D,) float
        Arc length from slice 0 (increases superiorly).
    body_radius_mm : (D,) float
        Smoothed in-plane radius of the largest disc inscribed in the body (about half the
        body's antero-posterior depth).
    body_slice : (D,) bool
        Slices that cut through a vertebral body (not a disc or posterior elements only).
    """

    z_mm: np.ndarray
    y_mm: np.ndarray
    x_mm: np.ndarray
    dy_dz: np.ndarray
    dx_dz: np.ndarray
    arc_mm: np.ndarray
    body_radius_mm: np.ndarray
    body_slice: np.ndarray

    def at_arc(self, arc_mm) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(z, y, x) mm of the centreline at the given arc lengths (clamped to its ends)."""
        arc_mm = np.asarray(arc_mm, dtype=np.float64)
        return (np.interp(arc_mm, self.arc_mm, self.z_mm), np.interp(arc_mm, self.arc_mm, self.y_mm), np.interp(arc_mm, self.arc_mm, self.x_mm))

    def radius_at_arc(self, arc_mm) -> np.ndarray:
        return np.interp(np.asarray(arc_mm, dtype=np.float64), self.arc_mm, self.body_radius_mm)


def _weighted_smooth(values: np.ndarray, weights: np.ndarray, sigma_samples: float) -> Tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage

    numerator = ndimage.gaussian_filter1d(values * weights, sigma_samples, mode="nearest")
    denominator = ndimage.gaussian_filter1d(weights, sigma_samples, mode="nearest")
    with np.errstate(invalid="ignore", divide="ignore"):
        return numerator / denominator, denominator


def in_plane_thickness_mm(mask: np.ndarray, spacing_mm) -> np.ndarray:
    """2D distance (mm) from every mask voxel to the background of its own axial slice.

    Parameters
    ----------
    mask : (D, H, W) bool
        Canonical grid (z, y, x).
    spacing_mm : float or (3,) float
        Voxel size (z, y, x) in mm.

    Returns
    -------
    (D, H, W) float32; 0 outside the mask.
    """
    from scipy import ndimage

    spacing = _spacing3(spacing_mm)
    out = np.zeros(mask.shape, dtype=np.float32)
    if not np.any(mask):
        return out
    _, rows, columns = _padded_box(mask)
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        out[z, rows, columns] = ndimage.distance_transform_edt(mask[z, rows, columns], sampling=spacing[1:])
    return out


def _padded_box(mask: np.ndarray, pad: int = 1) -> Tuple[slice, ...]:
    """Bounding box of the True voxels, grown by ``pad`` voxels (so that distances to the background stay exact)."""
    box = []
    for axis in range(mask.ndim):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, int(occupied[0]) - pad), min(mask.shape[axis], int(occupied[-1]) + 1 + pad)))
    return tuple(box)


def body_centreline(mask: np.ndarray, spacing_mm, *, smoothing_mm: float = 6.0, thickness: Optional[np.ndarray] = None) -> Centreline:
    """Centreline of the vertebral bodies of a spine mask.

    Per axial slice, the centre of the voxels at least 60 % as thick (in-plane distance to
    the background) as the slice's thickest voxel: in a slice through a vertebra that is
    the body. Slices much thinner than their neighbours (discs, posterior elements only)
    get no weight; the centres are smoothed along z with a Gaussian of ``smoothing_mm``.

    Parameters
    ----------
    mask : (D, H, W) bool
        Spine mask on the canonical grid (z inferior->superior, y anterior->posterior,
        x right->left), holes filled.
    spacing_mm : float or (3,) float
        Voxel size (z, y, x), mm.
    smoothing_mm : float
        Gaussian sigma along z for the centre, mm (3x that for the body radius).
    thickness : (D, H, W) float, optional
        :func:`in_plane_thickness_mm` of ``mask`` when already computed.

    Returns
    -------
    Centreline
    """
    spacing = _spacing3(spacing_mm)
    depth = mask.shape[0]
    if thickness is None:
        thickness = in_plane_thickness_mm(mask, spacing)
    r_max = thickness.reshape(depth, -1).max(axis=1).astype(np.float64)
    cy = np.zeros(depth)
    cx = np.zeros(depth)
    for z in np.flatnonzero(r_max > 0):
        t = thickness[z]
        ys, xs = np.nonzero(t >= 0.6 * r_max[z])
        w = t[ys, xs].astype(np.float64) ** 2
        cy[z] = np.sum(ys * w) / np.sum(w) * spacing[1]
        cx[z] = np.sum(xs * w) / np.sum(w) * spacing[2]
    from scipy import ndimage

    window = max(3, int(round(40.0 / spacing[0])) | 1)
    local_peak = ndimage.maximum_filter1d(r_max, size=window, mode="nearest")
    body_slice = (r_max >= 0.6 * local_peak) & (r_max > 2.0 * float(spacing[1:].max()))
    weights = np.where(body_slice, r_max ** 2, 0.0)
    sigma = smoothing_mm / spacing[0]
    y_s, support = _weighted_smooth(cy, weights, sigma)
    x_s, _ = _weighted_smooth(cx, weights, sigma)
    radius, _ = _weighted_smooth(r_max, weights, 3 * sigma)
    index = np.arange(depth)
    defined = support > 1e-6 * max(float(support.max()), 1e-12)
    if defined.any():
        y_s = np.interp(index, index[defined], y_s[defined])
        x_s = np.interp(index, index[defined], x_s[defined])
        radius = np.interp(index, index[defined], radius[defined])
        # beyond the first and last body, go on straight along the column's end direction
        # (the sacrum continues the lumbar curve; a vertical continuation would miss S1)
        bodies = np.flatnonzero(body_slice)
        reach = max(2, int(round(12.0 / spacing[0])))
        for end, outside in ((bodies[0], index < bodies[0]), (bodies[-1], index > bodies[-1])):
            inner = np.clip(end + (reach if end == bodies[0] else -reach), 0, depth - 1)
            if outside.any() and inner != end:
                for values in (y_s, x_s):
                    slope = np.clip((values[end] - values[inner]) / ((end - inner) * spacing[0]), -1.0, 1.0)
                    values[outside] = values[end] + slope * (index[outside] - end) * spacing[0]
    else:  # no body anywhere: a vertical line through the mask's centre
        _, ys, xs = np.nonzero(mask)
        y_s = np.full(depth, ys.mean() * spacing[1] if ys.size else 0.0)
        x_s = np.full(depth, xs.mean() * spacing[2] if xs.size else 0.0)
        radius = np.full(depth, max(float(r_max.max()), 5.0))
    radius = np.maximum(radius, 3.0)
    z_mm = index * spacing[0]
    dy = np.gradient(y_s, spacing[0]) if depth > 1 else np.zeros(depth)
    dx = np.gradient(x_s, spacing[0]) if depth > 1 else np.zeros(depth)
    arc = np.concatenate([[0.0], np.cumsum(np.sqrt(spacing[0] ** 2 + np.diff(y_s) ** 2 + np.diff(x_s) ** 2))])
    return Centreline(z_mm, y_s, x_s, dy, dx, arc, radius, body_slice)


def centreline_frame(points_mm: np.ndarray, line: Centreline, iterations: int = 3) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates of points relative to the centreline.

    Parameters
    ----------
    points_mm : (N, 3) float
        Positions (z, y, x) in mm on the canonical grid.
    line : Centreline

    Returns
    -------
    arc_mm : (N,) float
        Arc length of the point's foot on the centreline (the plane through the foot
        perpendicular to the centreline holds the point); continues straight beyond the ends.
    distance_mm : (N,) float
        Distance from the foot.
    posterior_mm, left_mm : (N,) float
        Offset from the foot along +y (posterior) and +x (left).
    """
    points_mm = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    z = points_mm[:, 0]
    foot = z.copy()
    z_lo, z_hi = line.z_mm[0], line.z_mm[-1]
    for _ in range(iterations):
        fz = np.clip(foot, z_lo, z_hi)
        cy = np.interp(fz, line.z_mm, line.y_mm)
        cx = np.interp(fz, line.z_mm, line.x_mm)
        ty = np.interp(fz, line.z_mm, line.dy_dz)
        tx = np.interp(fz, line.z_mm, line.dx_dz)
        along = (z - foot) + (points_mm[:, 1] - cy) * ty + (points_mm[:, 2] - cx) * tx
        foot = foot + along / (1.0 + ty ** 2 + tx ** 2)
    fz = np.clip(foot, z_lo, z_hi)
    cy = np.interp(fz, line.z_mm, line.y_mm)
    cx = np.interp(fz, line.z_mm, line.x_mm)
    arc = np.interp(fz, line.z_mm, line.arc_mm) + (foot - fz)
    posterior = points_mm[:, 1] - cy
    left = points_mm[:, 2] - cx
    distance = np.sqrt((z - foot) ** 2 + posterior ** 2 + left ** 2)
    return arc, distance, posterior, left


def _tube_voxels(shape: Tuple[int, int, int], line: Centreline, spacing: np.ndarray, radius_mm: float) -> np.ndarray:
    """Flat indices of the voxels within ``radius_mm`` (in-plane) of the centreline point of their slice."""
    depth, height, width = shape
    ys = np.arange(height) * spacing[1]
    xs = np.arange(width) * spacing[2]
    chunks = []
    for z in range(depth):
        d2 = (ys[:, None] - line.y_mm[z]) ** 2 + (xs[None, :] - line.x_mm[z]) ** 2
        flat = np.flatnonzero(d2 <= radius_mm ** 2)
        if flat.size:
            chunks.append(flat + z * height * width)
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.intp)


def _points_mm(flat_indices: np.ndarray, shape: Tuple[int, ...], spacing: np.ndarray) -> np.ndarray:
    return np.stack(np.unravel_index(flat_indices, shape), axis=1) * spacing


# --------------------------------------------------------------------------- discs
@dataclass
class BodyProfile:
    """Share of a cylinder around the body centreline that lies in the mask, along the arc.

    Attributes
    ----------
    arc_mm : (B,) float
        Bin centres, mm of arc length (one bin per z voxel).
    occupancy : (B,) float
        Mask voxels / all voxels of the cylinder in the bin; NaN where the bin is empty.
    radius_mm : (B,) float
        Body radius (:attr:`Centreline.body_radius_mm`) at the bin.
    """

    arc_mm: np.ndarray
    occupancy: np.ndarray
    radius_mm: np.ndarray


def body_profile(mask: np.ndarray, line: Centreline, spacing_mm, *, radius_factor: float = 0.6) -> BodyProfile:
    """Occupancy of the cylinder of radius ``radius_factor`` x body radius around the centreline.

    ``mask`` is (D, H, W) bool on the canonical grid; ``spacing_mm`` (z, y, x) mm.
    """
    spacing = _spacing3(spacing_mm)
    cylinder = radius_factor * line.body_radius_mm
    tube = _tube_voxels(mask.shape, line, spacing, float(cylinder.max()) + 2.0 * float(spacing.max()))
    step = float(spacing[0])
    if tube.size == 0:
        return BodyProfile(np.zeros(0), np.zeros(0), np.zeros(0))
    arc, distance, _, _ = centreline_frame(_points_mm(tube, mask.shape, spacing), line)
    inside = distance <= np.interp(arc, line.arc_mm, cylinder)
    bins = np.floor(arc / step).astype(np.int64)
    first = int(bins.min())
    bins -= first
    count = int(bins.max()) + 1
    total = np.bincount(bins[inside], minlength=count).astype(np.float64)
    occupied = np.bincount(bins[inside], weights=mask.reshape(-1)[tube][inside].astype(np.float64), minlength=count)
    centres = (np.arange(count) + first + 0.5) * step
    with np.errstate(invalid="ignore", divide="ignore"):
        occupancy = occupied / total
    return BodyProfile(centres, occupancy, line.radius_at_arc(centres))


def find_disc_levels(profile: BodyProfile, *, min_height_factor: float = 0.55) -> Tuple[List[float], float, float]:
    """Arc positions (mm) of the intervertebral discs: the deep minima of the body profile.

    A minimum counts when it lies below 75 % of the typical body occupancy and is at least
    25 % of it deeper than its surroundings; the disc sits at the middle of the minimum's
    floor (a ground-truth mask leaves a flat run of zeros). Of two minima closer than
    ``min_height_factor`` x the expected vertebra height (twice the body radius, ~ the
    body's depth) only the deeper one stays. A segment between discs longer than
    :data:`OVERLONG_SEGMENT_RADII` body radii is then searched again for a shallow minimum
    (down to 90 % of the body occupancy, 8 % prominence): a disc the mask partly bridges.

    Returns
    -------
    discs : list of float
        Arc positions, ascending (inferior first).
    column_start_mm, column_end_mm : float
        Arc range of the body column (first and last bin with the body occupancy at least
        half its typical value).
    """
    from scipy import ndimage, signal

    if profile.arc_mm.size == 0:
        return [], 0.0, 0.0
    step = float(profile.arc_mm[1] - profile.arc_mm[0]) if profile.arc_mm.size > 1 else 1.0
    occupancy = np.nan_to_num(profile.occupancy, nan=0.0)
    smooth = ndimage.gaussian_filter1d(occupancy, max(0.5, 1.0 / step), mode="nearest")
    solid = smooth > 0.2
    if not solid.any():
        return [], float(profile.arc_mm[0]), float(profile.arc_mm[-1])
    body_level = float(np.percentile(smooth[solid], 90))
    present = np.flatnonzero(smooth >= 0.5 * body_level)
    lo, hi = int(present[0]), int(present[-1]) + 1
    start, end = float(profile.arc_mm[lo]), float(profile.arc_mm[hi - 1])
    minima, properties = signal.find_peaks(-smooth[lo:hi], prominence=0.25 * body_level, distance=max(1, int(round(6.0 / step))))
    minima = minima + lo
    depth = properties["prominences"]
    keep = smooth[minima] <= 0.75 * body_level
    minima, depth = minima[keep], depth[keep]
    positions = [_plateau_centre(profile.arc_mm, smooth, index, lo, hi, 0.1 * body_level) for index in minima]
    accepted: List[float] = []
    for order in np.argsort(-depth, kind="stable"):
        position = positions[order]
        expected_height = 2.0 * float(np.interp(position, profile.arc_mm, profile.radius_mm))
        if all(abs(position - other) >= min_height_factor * expected_height for other in accepted):
            accepted.append(position)
    # a segment as long as two vertebrae hides a disc the mask partly bridges (osteophytes,
    # a filled disc): look inside it for the deepest shallower minimum
    for _ in range(len(profile.arc_mm)):
        bounds = [start] + sorted(accepted) + [end]
        added = False
        for low, high in zip(bounds[:-1], bounds[1:]):
            radius = float(np.interp(0.5 * (low + high), profile.arc_mm, profile.radius_mm))
            if high - low <= OVERLONG_SEGMENT_RADII * radius:
                continue
            inner = (profile.arc_mm > low + min_height_factor * 2.0 * radius) & (profile.arc_mm < high - min_height_factor * 2.0 * radius)
            if not inner.any():
                continue
            first = int(np.flatnonzero(inner)[0])
            found, properties = signal.find_peaks(-smooth[inner], prominence=0.08 * body_level)
            found = found[smooth[found + first] <= 0.9 * body_level]
            if found.size == 0:
                continue
            best = int(found[np.argmin(smooth[found + first])]) + first
            accepted.append(_plateau_centre(profile.arc_mm, smooth, best, lo, hi, 0.03 * body_level))
            added = True
        if not added:
            break
    return sorted(accepted), start, end


#: A segment between two discs longer than this many body radii holds two vertebrae (one
#: vertebra plus its disc measures 2-2.5 radii from C3 to L5; C2 with its dens about 4).
OVERLONG_SEGMENT_RADII = 3.6


def _plateau_centre(arc_mm: np.ndarray, smooth: np.ndarray, index: int, lo: int, hi: int, tolerance: float) -> float:
    """Arc at the middle of the run of bins around ``index`` within ``tolerance`` of its value."""
    floor = smooth[index] + tolerance
    left = index
    while left > lo and smooth[left - 1] <= floor:
        left -= 1
    right = index
    while right < hi - 1 and smooth[right + 1] <= floor:
        right += 1
    return float(0.5 * (arc_mm[left] + arc_mm[right]))


# --------------------------------------------------------------------------- growing
def _neighbour_table(region: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Flat indices of the True voxels of ``region`` and, per voxel, its 6 face neighbours' rows (-1: none)."""
    padded = np.pad(region, 1)
    shape = padded.shape
    flat = np.flatnonzero(padded)
    lookup = np.full(padded.size, -1, dtype=np.int32 if padded.size < 2**31 - 1 else np.int64)
    lookup[flat] = np.arange(flat.size)
    neighbours = np.stack([lookup[flat + sign * step] for step in (1, shape[2], shape[1] * shape[2]) for sign in (1, -1)], axis=1)
    z, y, x = np.unravel_index(flat, shape)
    return np.ravel_multi_index((z - 1, y - 1, x - 1), region.shape), neighbours


def grow_labels(seeds: np.ndarray, region: np.ndarray, cost: Optional[np.ndarray] = None, levels: int = 1) -> np.ndarray:
    """Seeded region growing inside ``region``: flooding by ``cost`` level, geodesic within a level.

    All labels grow together, one face-neighbour step at a time, into unlabelled ``region``
    voxels whose ``cost`` is at most the current level; then the level rises to the next
    of ``levels`` quantiles of ``cost``. With ``levels=1`` (or no ``cost``) the result is
    the geodesic Voronoi partition of ``region`` around the seeds.

    Parameters
    ----------
    seeds : (D, H, W) int
        0 = unlabelled, > 0 = label.
    region : (D, H, W) bool
        Where labels may grow.
    cost : (D, H, W) float, optional
        Lower is flooded first.
    levels : int

    Returns
    -------
    (D, H, W) int32
        Labels; voxels of ``region`` that no seed reaches stay 0, as does everything outside.
    """
    voxels, neighbours = _neighbour_table(np.asarray(region, dtype=bool) | (seeds > 0))
    labels = seeds.reshape(-1)[voxels].astype(np.int32)
    if cost is None or levels <= 1:
        thresholds = [np.inf]
        voxel_cost = np.zeros(voxels.size)
    else:
        voxel_cost = np.asarray(cost).reshape(-1)[voxels].astype(np.float64)
        thresholds = list(np.quantile(voxel_cost, np.linspace(1.0 / levels, 1.0, levels)))
        thresholds[-1] = np.inf
    k = neighbours.shape[1]
    for threshold in thresholds:
        allowed = voxel_cost <= threshold
        frontier = np.flatnonzero(labels > 0)
        while frontier.size:
            targets = neighbours[frontier].ravel()
            sources = np.repeat(labels[frontier], k)
            ok = targets >= 0
            targets, sources = targets[ok], sources[ok]
            ok = (labels[targets] == 0) & allowed[targets]
            targets, sources = targets[ok], sources[ok]
            if targets.size == 0:
                break
            targets, first = np.unique(targets, return_index=True)
            labels[targets] = sources[first]
            frontier = targets
    out = np.zeros(seeds.shape, dtype=np.int32)
    out.reshape(-1)[voxels] = labels
    return out


def keep_largest_pieces(labels: np.ndarray) -> Tuple[np.ndarray, int]:
    """Make every label one 26-connected piece.

    Smaller pieces of a label go to the neighbouring label they touch most; pieces that
    touch no other label become 0.

    Parameters
    ----------
    labels : (D, H, W) int
        0 = background.

    Returns
    -------
    labels : (D, H, W) int32, a copy
    removed_voxels : int
        Voxels set to 0.
    """
    from scipy import ndimage

    labels = np.asarray(labels).astype(np.int32, copy=True)
    removed = 0
    for _ in range(4):
        changed = False
        for value, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in box)
            crop = labels[box]  # a view: edits go into ``labels``
            pieces, count = ndimage.label(crop == value, structure=_CUBE)
            if count <= 1:
                continue
            sizes = np.bincount(pieces.ravel())
            sizes[0] = 0
            largest = int(np.argmax(sizes))
            for piece in range(1, count + 1):
                if piece == largest:
                    continue
                where = pieces == piece
                ring = ndimage.binary_dilation(where, structure=_CUBE) & ~where
                touching = crop[ring]
                touching = touching[(touching > 0) & (touching != value)]
                if touching.size:
                    crop[where] = np.bincount(touching).argmax()
                else:
                    crop[where] = 0
                    removed += int(sizes[piece])
                changed = True
        if not changed:
            break
    return labels, removed


# --------------------------------------------------------------------------- split
#: Below this mean occupancy of the body cylinder (over its occupied bins) the mask is taken as hollow.
HOLLOW_OCCUPANCY = 0.8


def _looks_hollow(profile: BodyProfile) -> bool:
    occupancy = np.nan_to_num(profile.occupancy, nan=0.0)
    occupied = occupancy[occupancy > 0.2]
    return bool(occupied.size >= 5 and occupied.mean() < HOLLOW_OCCUPANCY)


def fill_slices(mask: np.ndarray, spacing_mm, *, closing_mm: float = 3.0) -> np.ndarray:
    """``mask`` plus, per axial slice, the holes of the slice closed with a disc of ``closing_mm``.

    Turns cortical shells into solid bodies (and fills the spinal canal where the arch is
    closed, which moves the body centreline back by a few mm at most). Slices never merge,
    so discs stay open. ``mask`` is (D, H, W) bool on the canonical grid, ``spacing_mm``
    (z, y, x) mm; returns (D, H, W) bool.
    """
    from scipy import ndimage

    spacing = _spacing3(spacing_mm)
    ry, rx = (max(1, int(round(closing_mm / s))) for s in spacing[1:])
    yy, xx = np.ogrid[-ry : ry + 1, -rx : rx + 1]
    disc = (yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0
    pad = max(ry, rx) + 1
    out = np.asarray(mask, dtype=bool).copy()
    for z in np.flatnonzero(out.any(axis=(1, 2))):
        closed = ndimage.binary_closing(np.pad(out[z], pad), structure=disc)[pad:-pad, pad:-pad]
        out[z] |= ndimage.binary_fill_holes(closed)
    return out


def split_vertebrae(mask: np.ndarray, ct_hu: Optional[np.ndarray], spacing_mm, *, min_vertebra_ml: float = 0.5, return_details: bool = False):
    """Split a binary spine mask into vertebrae, numbered from the top.

    See the module docstring (step 2) for the method.

    Parameters
    ----------
    mask : (D, H, W) bool or int
        Spine mask (non-zero = bone of C1-L6) on the canonical grid: numpy axis 0 inferior->
        superior, axis 1 anterior->posterior, axis 2 right->left.
    ct_hu : (D, H, W) float or None
        CT in HU on the same grid (not needed by the split; accepted for a uniform API).
    spacing_mm : float or (3,) float
        Voxel size (z, y, x), mm; isotropic voxels work best.
    min_vertebra_ml : float
        A piece of the column between two discs (or a disc and the end of the column) with
        less bone than this is not a vertebra of its own; its voxels join their neighbour.
    return_details : bool
        Also return a dict with the centreline, profile, disc positions and seeds.

    Returns
    -------
    instances : (D, H, W) int32
        0 = background, 1 = most cranial vertebra, 2 the next one down, ... (consecutive).
        Each label is one 26-connected piece inside ``mask``; mask voxels that belong to no
        vertebra (islands off the column) are 0.
    details : dict, only with ``return_details``
        ``centreline`` (:class:`Centreline`), ``profile`` (:class:`BodyProfile`), ``discs``
        (arc mm, ascending), ``segments`` [(low, high) arc mm, instance order], ``seeds``,
        ``removed_voxels`` (mask voxels left at 0), ``hollow_mask`` (bool).

    Raises
    ------
    SegmentationError
        ``no_spine_found`` when ``mask`` is empty.
    """
    from scipy import ndimage

    spacing = _spacing3(spacing_mm)
    mask = np.asarray(mask) != 0
    if not mask.any():
        raise SegmentationError("no_spine_found", "The spine mask is empty: there are no vertebrae to label.")
    filled = ndimage.binary_fill_holes(mask)
    line = body_centreline(filled, spacing)
    profile = body_profile(filled, line, spacing)
    hollow = _looks_hollow(profile)
    if hollow:
        # a mask of dense bone only (a threshold; osteoporotic marrow) leaves hollow bodies whose
        # shells are thinner than the posterior elements: close and fill them slice by slice
        filled = fill_slices(filled, spacing)
        line = body_centreline(filled, spacing)
        profile = body_profile(filled, line, spacing)
    discs, start, end = find_disc_levels(profile)
    bounds = [start] + discs + [end]
    voxel_ml = float(np.prod(spacing)) / 1000.0

    # seeds: the body core (central half of the segment, inside the cylinder); the bone just
    # behind the body at pedicle level (pedicles, lamina roots), which carries the posterior
    # arch; and the midline just behind the canal down to the disc below, where the laminae
    # meet and the spinous process leaves the arch: a mask that bridges the joints to the
    # vertebra below would otherwise let that vertebra reach the spinous process first
    radius_max = float(line.body_radius_mm.max())
    tube = _tube_voxels(mask.shape, line, spacing, 3.0 * radius_max)
    tube = tube[filled.reshape(-1)[tube]]
    points = _points_mm(tube, mask.shape, spacing)
    arc, distance, _, _ = centreline_frame(points, line)
    radius = line.radius_at_arc(arc)
    in_body = distance <= 0.6 * radius
    # behind the body in the point's own axial slice
    slice_radius = np.interp(points[:, 0], line.z_mm, line.body_radius_mm)
    posterior = points[:, 1] - np.interp(points[:, 0], line.z_mm, line.y_mm)
    left = points[:, 2] - np.interp(points[:, 0], line.z_mm, line.x_mm)
    in_arch = (posterior > 0.8 * slice_radius) & (posterior < 2.0 * slice_radius) & (np.abs(left) < 1.2 * slice_radius)
    in_lamina_junction = (posterior > 1.4 * slice_radius) & (posterior < 2.8 * slice_radius) & (np.abs(left) < 0.3 * slice_radius)
    segments = [(low, high) for low, high in zip(bounds[:-1], bounds[1:]) if high - low > 2.0 * spacing[0]]
    seeds = np.zeros(mask.shape, dtype=np.int32)
    count = len(segments)
    for order, (low, high) in enumerate(segments):
        length = high - low
        value = count - order  # segments run inferior -> superior; label 1 is the most cranial
        body = in_body & (arc >= low + 0.25 * length) & (arc <= high - 0.25 * length)
        arch = ((in_arch & (arc >= low + 0.25 * length)) | (in_lamina_junction & (arc >= low))) & (arc <= low + 0.6 * length)
        seeds.reshape(-1)[tube[body | arch]] = value
    if count == 0:  # no body column at all: one label for the largest piece
        pieces, _ = ndimage.label(mask, structure=_CUBE)
        seeds[pieces == (np.argmax(np.bincount(pieces.ravel())[1:]) + 1)] = 1
        segments = [(start, end)]
    # thick bone first: adjacent vertebrae meet at thin necks (facet joints, osteophytes)
    box = _padded_box(filled)
    depth_mm = np.zeros(mask.shape, dtype=np.float32)
    depth_mm[box] = ndimage.distance_transform_edt(filled[box], sampling=spacing)
    instances = grow_labels(seeds, filled, -depth_mm, THICKNESS_LEVELS)
    del depth_mm
    instances[~mask] = 0
    instances, removed = keep_largest_pieces(instances)

    # a segment too small to be a vertebra (a sliver at the field-of-view edge) joins its neighbour
    sizes = np.bincount(instances.ravel(), minlength=len(segments) + 1)[1:] * voxel_ml
    small = [value for value in range(1, len(sizes) + 1) if sizes[value - 1] < min_vertebra_ml]
    if small and len(small) < len(sizes):
        for value in small:
            where = instances == value
            ring = ndimage.binary_dilation(where, structure=_CUBE) & ~where
            touching = instances[ring]
            touching = touching[(touching > 0) & (touching != value)]
            instances[where] = np.bincount(touching).argmax() if touching.size else 0
        kept = [v for v in range(1, len(sizes) + 1) if v not in small]
        renumber = np.zeros(len(sizes) + 1, dtype=np.int32)
        renumber[kept] = np.arange(1, len(kept) + 1)
        instances = renumber[instances]
        segments = [segments[count - v] for v in kept]  # instance order
    else:
        segments = segments[::-1]
    if return_details:
        return instances, {"centreline": line, "profile": profile, "discs": discs, "segments": segments, "seeds": seeds, "removed_voxels": removed, "hollow_mask": hollow}
    return instances


# --------------------------------------------------------------------------- evidence for naming
@dataclass
class VertebraGeometry:
    """Where one vertebra (instance) lies along the centreline.

    Attributes
    ----------
    arc_low_mm, arc_high_mm : float
        Arc range of its body (voxels within 0.6 body radii of the centreline).
    centroid_mm : (3,) float
        Centroid (z, y, x) mm on the canonical grid.
    body_radius_mm : float
        Centreline body radius at the middle of its body.
    volume_ml : float
    truncated : bool
        The vertebra's body core touches the cranial or caudal edge of the CT's field of
        view, so part of it may lie outside the scan.
    """

    arc_low_mm: float
    arc_high_mm: float
    centroid_mm: np.ndarray
    body_radius_mm: float
    volume_ml: float
    truncated: bool


def vertebra_geometry(instances: np.ndarray, line: Centreline, spacing_mm, field_of_view: Optional[np.ndarray] = None) -> List[VertebraGeometry]:
    """:class:`VertebraGeometry` of instances 1..N (index 0 of the list = instance 1)."""
    from scipy import ndimage

    spacing = _spacing3(spacing_mm)
    count = int(instances.max()) if instances.size else 0
    inside_fov = np.ones(instances.shape, dtype=bool) if field_of_view is None else np.asarray(field_of_view, dtype=bool)
    # voxels whose upper or lower neighbour lies outside the scan (or outside the array)
    outside = np.pad(~inside_fov, ((1, 1), (0, 0), (0, 0)), constant_values=True)
    edge = inside_fov & (outside[:-2] | outside[2:])
    out = []
    for value, box in enumerate(ndimage.find_objects(instances, max_label=count), start=1):
        if box is None:
            out.append(VertebraGeometry(math.nan, math.nan, np.full(3, np.nan), math.nan, 0.0, True))
            continue
        where = instances[box] == value
        flat = np.flatnonzero(where)
        offset = np.array([s.start for s in box])
        points = (np.stack(np.unravel_index(flat, where.shape), axis=1) + offset) * spacing
        arc, distance, _, _ = centreline_frame(points, line)
        core = distance <= 0.6 * line.radius_at_arc(arc)
        arcs = arc[core] if core.sum() >= 10 else arc
        low, high = (float(v) for v in np.percentile(arcs, [1, 99]))
        # judged on the body core: an oblique field of view also has z-edges at its side walls
        edge_here = edge[box].reshape(-1)[flat]
        truncated = bool(np.any(edge_here[core]) if core.sum() >= 10 else np.any(edge_here))
        out.append(VertebraGeometry(low, high, points.mean(axis=0), float(line.radius_at_arc(0.5 * (low + high))), flat.size * float(np.prod(spacing)) / 1000.0, truncated))
    return out


def rib_evidence(instances: np.ndarray, ct_hu: np.ndarray, line: Centreline, spacing_mm, field_of_view: Optional[np.ndarray] = None, *, contact_mm: float = 6.0, min_reach_mm: float = 15.0, max_rib_ml: float = 60.0) -> List[Dict[str, object]]:
    """Ribs articulating with each vertebra, per side.

    A rib is a piece of bone (CT >= :data:`BONE_HU`, outside the spine mask) that comes
    within ``contact_mm`` of the vertebra beside or behind its body (where rib heads and
    tubercles articulate, never in front of it), runs on at least ``min_reach_mm`` further
    sideways than the vertebra's own widest point (its transverse processes are in the
    mask), and is no larger than ``max_rib_ml`` inside the working crop (the pelvis and a
    contrast-filled aorta are larger).

    Parameters
    ----------
    instances : (D, H, W) int
        Vertebra instances (0 = background) on the canonical grid (z, y, x).
    ct_hu : (D, H, W) float
        CT in HU, same grid.
    line : Centreline
    spacing_mm : float or (3,) float, (z, y, x) mm
    field_of_view : (D, H, W) bool, optional
        Voxels inside the scanned volume (default: all).

    Returns
    -------
    list of dict, one per instance (index 0 = instance 1)
        ``"right"``, ``"left"``: ``True`` (a rib), ``False`` (none, and the field of view
        shows the region beside the vertebra), ``None`` (that region is mostly outside the
        field of view); ``"pieces"``: [(side, volume_ml, reach_mm)] of the touching bone.
    """
    from scipy import ndimage

    spacing = _spacing3(spacing_mm)
    spine = instances > 0
    inside_fov = np.ones(instances.shape, dtype=bool) if field_of_view is None else np.asarray(field_of_view, dtype=bool)
    bone = (ct_hu >= BONE_HU) & inside_fov & ~ndimage.binary_dilation(spine, structure=_CUBE)
    pieces, count = ndimage.label(bone, structure=_CUBE)
    volume_ml = np.bincount(pieces.ravel(), minlength=count + 1) * float(np.prod(spacing)) / 1000.0
    # sideways reach of each piece: largest |x - centreline x| of its voxels
    zs, _, xs_index = np.nonzero(bone)
    lateral = np.abs(xs_index * spacing[2] - line.x_mm[zs])
    reach = np.zeros(count + 1)
    np.maximum.at(reach, pieces[bone], lateral)
    del zs, xs_index, lateral
    ys = np.arange(instances.shape[1]) * spacing[1]
    xs = np.arange(instances.shape[2]) * spacing[2]
    margin = [int(math.ceil((contact_mm + min_reach_mm + 10.0) / s)) + 1 for s in spacing]
    out: List[Dict[str, object]] = []
    for value, box in enumerate(ndimage.find_objects(instances), start=1):
        result: Dict[str, object] = {"right": None, "left": None, "pieces": []}
        out.append(result)
        if box is None:
            continue
        box = tuple(slice(max(0, s.start - m), min(n, s.stop + m)) for s, m, n in zip(box, margin, instances.shape))
        own = instances[box] == value
        near = ndimage.distance_transform_edt(~own, sampling=spacing) <= contact_mm
        rows = slice(box[0].start, box[0].stop)
        cy = line.y_mm[rows][:, None, None]
        cx = line.x_mm[rows][:, None, None]
        radius = line.body_radius_mm[rows][:, None, None]
        posterior = np.broadcast_to(ys[box[1]][None, :, None] - cy, own.shape)
        left = np.broadcast_to(xs[box[2]][None, None, :] - cx, own.shape)
        zone = near & (posterior > -0.3 * radius) & (np.abs(left) > 0.5 * radius)
        local_pieces = pieces[box]
        fov = inside_fov[box]
        levels = own.any(axis=(1, 2))
        for side, sign in (("right", -1.0), ("left", 1.0)):
            side_left = sign * left
            own_reach = float(side_left[own].max()) if np.any(own & (side_left > 0)) else 0.0
            # is the strip beside the vertebra, where a rib would run on, inside the field of view?
            strip = (side_left > own_reach) & (side_left <= own_reach + min_reach_mm + 5.0) & (np.abs(posterior) <= 2.0 * radius) & levels[:, None, None]
            # the array's own edge is the edge of the field of view too
            centre_x = float(np.median(line.x_mm[rows][levels])) if levels.any() else float(line.x_mm[rows].mean())
            room = (instances.shape[2] - 1) * spacing[2] - centre_x if sign > 0 else centre_x
            if room < own_reach + min_reach_mm or (strip.any() and fov[strip].mean() < 0.5):
                continue
            found = False
            for piece in np.unique(local_pieces[zone & (side_left > 0)]):
                if piece == 0:
                    continue
                result["pieces"].append((side, round(float(volume_ml[piece]), 2), round(float(reach[piece] - own_reach), 1)))
                if volume_ml[piece] <= max_rib_ml and reach[piece] >= own_reach + min_reach_mm:
                    found = True
            result[side] = found
    return out


def bone_beyond_column(instances: np.ndarray, ct_hu: np.ndarray, line: Centreline, geometry: Sequence[VertebraGeometry], spacing_mm, field_of_view: Optional[np.ndarray] = None, *, caudal: bool = True, length_mm: float = 25.0, gap_mm: float = 3.0, also_bone: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Bone outside the mask just beyond the caudal (or cranial) end of the vertebral column.

    The region continues the centreline over ``length_mm``, starting ``gap_mm`` past the
    last (first) vertebral body: the next body, the S1 body or the skull base would lie
    there. Its bone (CT >= :data:`BONE_HU`, not within one voxel of the mask) is measured
    in a central part (within one body radius of the centreline) and in lateral parts
    (1.6-3.5 radii to the side, from half a radius in front of the centre to one radius
    behind it: the sacral alae; a lumbar vertebra has only its transverse processes there,
    further back).

    Parameters
    ----------
    instances : (D, H, W) int, canonical grid (z, y, x)
    ct_hu : (D, H, W) float, HU
    line : Centreline
    geometry : list of VertebraGeometry, instance order (top first)
    spacing_mm : float or (3,) float, (z, y, x) mm
    field_of_view : (D, H, W) bool, optional
    also_bone : (D, H, W) bool, optional
        Voxels that count as bone whatever their HU: a piece of the sacrum that the spine
        mask took in (:func:`caudal_fragment`), whose marrow may lie under :data:`BONE_HU`.

    Returns
    -------
    dict
        ``fov_share`` (share of the region that the CT covers, 0-1), ``central_ml``,
        ``lateral_ml`` (ml), ``lateral_sides`` (0-2: sides with >= 1 ml of lateral bone),
        ``piece_ml`` (largest connected bone piece, within the working crop, that the region's
        bone belongs to).
    """
    from scipy import ndimage

    spacing = _spacing3(spacing_mm)
    inside_fov = np.ones(instances.shape, dtype=bool) if field_of_view is None else np.asarray(field_of_view, dtype=bool)
    end = geometry[-1] if caudal else geometry[0]
    radius = float(end.body_radius_mm)
    if caudal:
        window = (end.arc_low_mm - gap_mm - length_mm, end.arc_low_mm - gap_mm)
    else:
        window = (end.arc_high_mm + gap_mm, end.arc_high_mm + gap_mm + length_mm)
    result = {"fov_share": 0.0, "central_ml": 0.0, "lateral_ml": 0.0, "lateral_sides": 0, "piece_ml": 0.0}
    voxel_ml = float(np.prod(spacing)) / 1000.0
    # the region's volume had the CT covered it: length x (7 x 4.5 radii)
    expected_voxels = length_mm * (7.0 * radius) * (4.5 * radius) / 1000.0 / voxel_ml
    z_ends = line.at_arc(np.array(window))[0]
    z_lo = max(0, int(math.floor((float(np.min(z_ends)) - 4.0 * radius) / spacing[0])))
    z_hi = min(instances.shape[0], int(math.ceil((float(np.max(z_ends)) + 4.0 * radius) / spacing[0])) + 1)
    if caudal and window[0] < line.arc_mm[0]:
        z_lo = 0
    if not caudal and window[1] > line.arc_mm[-1]:
        z_hi = instances.shape[0]
    if z_hi <= z_lo:
        return result
    sub_shape = (z_hi - z_lo,) + instances.shape[1:]
    tube = _tube_voxels(sub_shape, _sub_centreline(line, z_lo, z_hi), spacing, 3.6 * radius)
    if tube.size == 0:
        return result
    points = _points_mm(tube, sub_shape, spacing)
    points[:, 0] += z_lo * spacing[0]
    arc, _, posterior, left = centreline_frame(points, line)
    region = (arc >= window[0]) & (arc <= window[1]) & (posterior >= -1.5 * radius) & (posterior <= 3.0 * radius) & (np.abs(left) <= 3.5 * radius)
    if not region.any():
        return result
    flat = tube[region] + z_lo * instances.shape[1] * instances.shape[2]
    posterior, left = posterior[region], left[region]
    fov = inside_fov.reshape(-1)[flat]
    spine_near = ndimage.binary_dilation(instances[z_lo:z_hi] > 0, structure=_CUBE).reshape(-1)[tube[region]]
    is_bone = ct_hu >= BONE_HU if also_bone is None else (ct_hu >= BONE_HU) | also_bone
    bone = is_bone.reshape(-1)[flat] & fov & ~spine_near
    central = bone & (np.abs(left) <= radius) & (np.abs(posterior) <= radius)
    lateral = bone & (np.abs(left) >= 1.6 * radius) & (posterior <= 1.0 * radius) & (posterior >= -0.5 * radius)
    result["fov_share"] = float(min(1.0, fov.sum() / max(expected_voxels, 1.0)))
    result["central_ml"] = float(central.sum() * voxel_ml)
    result["lateral_ml"] = float(lateral.sum() * voxel_ml)
    result["lateral_sides"] = int(np.sum(lateral & (left > 0)) * voxel_ml >= 1.0) + int(np.sum(lateral & (left < 0)) * voxel_ml >= 1.0)
    if bone.any():
        all_bone = is_bone & inside_fov & ~ndimage.binary_dilation(instances > 0, structure=_CUBE)
        pieces, _ = ndimage.label(all_bone, structure=_CUBE)
        sizes = np.bincount(pieces.ravel())
        touched = np.unique(pieces.reshape(-1)[flat[bone]])
        touched = touched[touched > 0]
        if touched.size:
            result["piece_ml"] = float(sizes[touched].max() * voxel_ml)
    return result


#: A lowest segment with less than this share of the column's typical vertebra volume ...
CAUDAL_FRAGMENT_VOLUME_SHARE = 0.4
#: ... and a body narrower than this share of the body above it is a piece of the sacrum.
CAUDAL_FRAGMENT_RADIUS_SHARE = 0.8


def caudal_fragment(instances: np.ndarray, line: Centreline, spacing_mm, field_of_view: Optional[np.ndarray] = None) -> int:
    """The lowest instance when it is a piece of the sacrum rather than a vertebra; else 0.

    A network's spine mask often takes in the top of the first sacral body. Split off below
    L5, that piece would be named as one more vertebra (an "L6") and push the sacrum anchor
    one level down. It is told from a vertebra by size: it is not cut by the field of view,
    yet holds less than :data:`CAUDAL_FRAGMENT_VOLUME_SHARE` of the median volume of the
    other whole vertebrae, and its thickest part (largest in-plane distance to its edge) is
    thinner than :data:`CAUDAL_FRAGMENT_RADIUS_SHARE` of the column's typical vertebra (the
    median over the whole ones above: an under-segmented L5 keeps slices through its whole
    body; a real L6 is a whole vertebra). The median, not the vertebra right above: the mask
    that took in the top of S1 has often lost part of the L5 body, which then is thin too.

    Parameters
    ----------
    instances : (D, H, W) int
        :func:`split_vertebrae` output (1 = most cranial), canonical grid (z, y, x).
    line : Centreline
    spacing_mm : float or (3,) float, (z, y, x) mm
    field_of_view : (D, H, W) bool, optional

    Returns
    -------
    int
        The instance number of the fragment (the highest number), or 0.
    """
    from scipy import ndimage

    geometry = vertebra_geometry(instances, line, _spacing3(spacing_mm), field_of_view)
    if len(geometry) < 3 or geometry[-1].truncated:
        return 0
    whole = [g.volume_ml for g in geometry[:-1] if not g.truncated]
    if not whole:
        return 0
    if geometry[-1].volume_ml >= CAUDAL_FRAGMENT_VOLUME_SHARE * float(np.median(whole)):
        return 0
    lowest = len(geometry)
    # measured on the pieces themselves: the centreline's radius is smoothed over ~2 vertebrae
    thickest = {}
    for value, box in enumerate(ndimage.find_objects(instances, max_label=lowest), start=1):
        if box is not None and (value == lowest or not geometry[value - 1].truncated):
            piece = np.pad(instances[box] == value, 1)  # a background rim for the distances
            thickest[value] = float(in_plane_thickness_mm(piece, spacing_mm).max())
    typical = float(np.median([t for value, t in thickest.items() if value != lowest]))
    return lowest if thickest.get(lowest, 0.0) < CAUDAL_FRAGMENT_RADIUS_SHARE * typical else 0


def _sub_centreline(line: Centreline, z_lo: int, z_hi: int) -> Centreline:
    """The centreline restricted to slices ``z_lo:z_hi`` (positions stay in the full grid's mm)."""
    part = slice(z_lo, z_hi)
    return Centreline(line.z_mm[part] - line.z_mm[z_lo], line.y_mm[part], line.x_mm[part], line.dy_dz[part], line.dx_dz[part], line.arc_mm[part], line.body_radius_mm[part], line.body_slice[part])


# --------------------------------------------------------------------------- naming
#: Typical in-plane radius (mm) of the largest disc inscribed in a vertebral body, by VerSe id:
#: about 45 % of the smaller of the body's depth and width (adult averages; patients vary by
#: +-20 %, hence only a weak cue that tells regions apart, not neighbours).
EXPECTED_BODY_RADIUS_MM: Dict[int, float] = {
    2: 8.0, 3: 7.5, 4: 7.5, 5: 7.5, 6: 8.0, 7: 8.5,
    8: 9.0, 9: 9.0, 10: 9.5, 11: 10.0, 12: 10.5, 13: 11.0, 14: 11.5, 15: 12.0, 16: 12.5, 17: 13.0, 18: 13.5, 19: 14.0, 28: 14.0,
    20: 14.5, 21: 15.0, 22: 15.5, 23: 15.5, 24: 15.5, 25: 15.5,
}  # fmt: skip
#: Spread of the body radius around :data:`EXPECTED_BODY_RADIUS_MM` (natural-log units).
BODY_RADIUS_LOG_SIGMA = 0.25
#: Prior of the three chains: standard, with a 6th lumbar vertebra, with a 13th thoracic one.
CHAIN_PRIORS = {"standard": 0.92, "L6": 0.05, "T13": 0.03}
#: Pseudo-id of a first segment holding C1 and C2 together (C1 has no body, so no disc separates them).
ATLAS_AXIS = -1
#: Prior of a top segment that is C1 alone, relative to C1 and C2 arriving together: a mask
#: with a gap between the atlas and the dens leaves the atlas a segment of its own.
ATLAS_ALONE_PRIOR = 0.2


def _chains() -> Dict[str, Tuple[int, ...]]:
    from .labels import L6_ID, SACRUM_ID, STANDARD_CHAIN, T13_ID

    standard = tuple(v for v in STANDARD_CHAIN if v != SACRUM_ID)
    t12 = standard.index(19)
    return {"standard": standard, "L6": standard + (L6_ID,), "T13": standard[: t12 + 1] + (T13_ID,) + standard[t12 + 1 :]}


#: P(:func:`rib_evidence` reports a rib | a level without ribs): its false positives, mostly
#: iliac crests and sacral alae cut by a narrow field of view beside L4-L5.
RIB_FALSE_POSITIVE_RATE = 0.08


def _rib_probability(verse_id: int) -> float:
    """P(a rib is found on one side | level): thoracic levels carry ribs; C7 and L1 rarely do."""
    if 8 <= verse_id <= 19 or verse_id == 28:
        return 0.9
    if verse_id in (7, 20):  # cervical ribs, lumbar ribs
        return RIB_FALSE_POSITIVE_RATE + 0.04
    return RIB_FALSE_POSITIVE_RATE


#: Share of a vertebrae network's vote that is spread evenly over all names: a segment whose
#: voxels all say "L3" still leaves L2 a probability of ~0.4 % (log -5.6), so two or three
#: agreeing anatomical anchors (log 2-3 each) can overrule one mislabelled segment, not a column.
NETWORK_VOTE_FLOOR = 0.1
#: Largest VerSe id (T13 = 28): the vote tables have this many + 1 columns.
_MAX_VERSE_ID = 28


def network_name_shares(instances: np.ndarray, name_votes: np.ndarray, count: int) -> np.ndarray:
    """Per segment, the share of its voxels a vertebrae network gave each VerSe id.

    Parameters
    ----------
    instances : (D, H, W) int
        Segments 1..``count`` (0 = none).
    name_votes : (D, H, W) uint8
        The network's most probable vertebra per voxel, as a VerSe id (0 = no vote).
    count : int
        Number of segments.

    Returns
    -------
    (count, 29) float
        Row ``i`` is segment ``i + 1``; columns are VerSe ids 0-28 (column 0 unused); rows sum
        to 1, or to 0 for a segment without any vote.
    """
    inside = (instances > 0) & (name_votes > 0)
    index = instances[inside].astype(np.int64) * (_MAX_VERSE_ID + 1) + np.minimum(name_votes[inside], _MAX_VERSE_ID).astype(np.int64)
    table = np.bincount(index, minlength=(count + 1) * (_MAX_VERSE_ID + 1)).reshape(count + 1, _MAX_VERSE_ID + 1)[1:].astype(np.float64)
    totals = table.sum(axis=1, keepdims=True)
    return np.divide(table, totals, out=np.zeros_like(table), where=totals > 0)


def _verse_ids_of(name: int) -> Tuple[int, ...]:
    """The VerSe ids a run's name stands for: C1 and C2 for :data:`ATLAS_AXIS`, else the name itself."""
    return (1, 2) if name == ATLAS_AXIS else (name,)


def _network_log_probability(name: int, shares: np.ndarray) -> float:
    """log P(name | a segment's vote shares), with :data:`NETWORK_VOTE_FLOOR` spread over all names."""
    share = float(shares[list(_verse_ids_of(name))].sum())
    return math.log((1.0 - NETWORK_VOTE_FLOOR) * share + NETWORK_VOTE_FLOOR / _MAX_VERSE_ID)


def _placements(count: int) -> List[Tuple[str, List[int], float]]:
    """Every gap-free run of ``count`` names along each chain, with its prior probability.

    A run from C1 starts with C1+C2 together (:data:`ATLAS_AXIS`) or, less likely
    (:data:`ATLAS_ALONE_PRIOR`), with C1 alone.
    """
    runs = []
    for chain_name, chain in _chains().items():
        prior = CHAIN_PRIORS[chain_name]
        for start in range(0, len(chain)):
            if start == 0:
                candidates = [([ATLAS_AXIS] + list(chain[2 : count + 1]), prior), (list(chain[:count]), prior * ATLAS_ALONE_PRIOR)]
            else:
                candidates = [(list(chain[start : start + count]), prior)]
            runs.extend((chain_name, names, p) for names, p in candidates if len(names) == count)
    return runs


def _log_likelihood(
    names: Sequence[int], chain: Tuple[int, ...], geometry: Sequence[VertebraGeometry], ribs: Sequence[Dict[str, object]], below: Dict[str, float], above: Dict[str, float],
    votes: Optional[np.ndarray] = None,
) -> Tuple[float, Dict[str, float]]:
    parts = {"ribs": 0.0, "sacrum": 0.0, "skull": 0.0, "size": 0.0, "network": 0.0}
    if votes is not None:
        for name, shares in zip(names, votes):
            if shares.sum() > 0:
                parts["network"] += _network_log_probability(name, shares)
    for name, evidence, shape in zip(names, ribs, geometry):
        p_rib = _rib_probability(name)
        for side in ("right", "left"):
            if evidence.get(side) is True:
                parts["ribs"] += math.log(p_rib)
            elif evidence.get(side) is False:
                parts["ribs"] += math.log(1.0 - p_rib)
        expected = EXPECTED_BODY_RADIUS_MM.get(2 if name == ATLAS_AXIS else name)
        if expected and shape.body_radius_mm > 0:
            # a vertebra cut by the field of view is measured less reliably
            sigma = BODY_RADIUS_LOG_SIGMA * (1.6 if shape.truncated else 1.0)
            z = (math.log(shape.body_radius_mm) - math.log(expected)) / sigma
            parts["size"] += -0.5 * z * z
    last_lumbar = names[-1] == chain[-1]
    if below.get("bone_found"):
        # the sacrum lies below the last lumbar vertebra; below any other one the next vertebra
        # would have to be missing from the mask
        parts["sacrum"] += math.log(0.9 if last_lumbar else 0.15)
        if below.get("alae_found"):
            parts["sacrum"] += math.log(0.7 if last_lumbar else 0.2)
    if above.get("skull_found"):
        parts["skull"] += math.log(0.8 if 1 in _verse_ids_of(names[0]) else 0.05)
    return sum(parts.values()), parts


#: Bone (ml) beyond an end of the column that counts as the sacrum or skull base when the
#: scan shows the whole region of :func:`bone_beyond_column`.
END_BONE_ML = 2.0


def _end_evidence(found: Dict[str, float], *, caudal: bool) -> Dict[str, object]:
    """Summarise :func:`bone_beyond_column` as the yes/no evidence the naming uses."""
    bone_ml = found["central_ml"] + found["lateral_ml"]
    evidence: Dict[str, object] = {key: round(float(value), 3) for key, value in found.items()}
    if caudal:
        # judged on the part of the region the scan shows: a scan that ends inside S1 or a narrow
        # sagittal slab shows only a share of it (never less than a quarter counts)
        needed_ml = END_BONE_ML * min(1.0, max(float(found["fov_share"]), 0.25))
        evidence["bone_found"] = bool(bone_ml >= needed_ml)
        evidence["alae_found"] = bool(bone_ml >= needed_ml and found["lateral_sides"] == 2)
    else:
        # the skull base is one large bone, unlike a vertebra left out of the mask
        evidence["skull_found"] = bool(bone_ml >= END_BONE_ML and found["piece_ml"] >= 150.0)
    return evidence


def name_vertebrae(
    instances: np.ndarray, ct_hu: np.ndarray, spacing_mm, *, field_of_view: Optional[np.ndarray] = None, centreline: Optional[Centreline] = None,
    sacral_fragment: Optional[np.ndarray] = None, name_votes: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, Dict[str, object]]:
    """Give every vertebra its VerSe id, in anatomical order.

    Every gap-free run of VerSe ids along the standard chain (C1-L5), the chain with L6 and
    the chain with T13, as long as the number of vertebrae, is scored (log-likelihood plus
    the chain's prior, :data:`CHAIN_PRIORS`):

    * ribs (:func:`rib_evidence`): each side with a rib favours a thoracic level (T1-T12,
      T13), each side seen without one favours the others;
    * sacrum (:func:`bone_beyond_column` below the column): bone right below the lowest
      vertebra, outside the mask, favours "the lowest vertebra is the last lumbar one"
      (L5, or L6 on the L6 chain), more so with alae on both sides;
    * skull base (bone above the column belonging to one piece larger than 150 ml) favours
      "the top segment is C1" (C1 has no body, so C1 and C2 usually arrive as one segment,
      split into C1 and C2 after naming; a run may also start with C1 alone, at a lower
      prior, :data:`ATLAS_ALONE_PRIOR`, for a mask that left a gap under the atlas);
    * body size (:data:`EXPECTED_BODY_RADIUS_MM`) of every vertebra not cut by the field
      of view: a weak cue that separates cervical, thoracic and lumbar levels;
    * with ``name_votes`` (a vertebrae network, ``train --task vertebrae``): the share of each
      segment's voxels the network calls by the run's name (:func:`network_name_shares`,
      floored by :data:`NETWORK_VOTE_FLOOR`). The network proposes names; the run keeps them
      in anatomical order, without duplicates or gaps.

    Parameters
    ----------
    instances : (D, H, W) int
        :func:`split_vertebrae` output on the canonical grid (z inferior->superior, y
        anterior->posterior, x right->left): 1 = most cranial vertebra, consecutive.
    ct_hu : (D, H, W) float
        CT in HU on the same grid, with context around the spine (ribs, pelvis).
    spacing_mm : float or (3,) float
        Voxel size (z, y, x), mm.
    field_of_view : (D, H, W) bool, optional
        Voxels inside the scanned volume; default: every voxel.
    centreline : Centreline, optional
        From :func:`split_vertebrae`'s details; recomputed from ``instances`` when omitted.
    sacral_fragment : (D, H, W) bool, optional
        Mask voxels below the column that are a piece of the sacrum (:func:`caudal_fragment`,
        already removed from ``instances``): bone below the column, whatever their HU.
    name_votes : (D, H, W) uint8, optional
        A vertebrae network's most probable vertebra per voxel (VerSe ids, 0 = none).

    Returns
    -------
    verse_labels : (D, H, W) uint8
        VerSe ids (1-7 C1-C7, 8-19 T1-T12, 28 T13, 20-25 L1-L6); 0 elsewhere.
    info : dict
        ``names`` and ``verse_ids`` (top to bottom), ``chain`` (``standard``, ``L6``,
        ``T13``), ``confidence`` (posterior probability of the chosen run among all runs,
        0-1), ``anchors`` (cues found: ``bone_below``, ``sacral_alae``, ``skull``,
        ``lowest_rib_vertebra`` as an instance number), ``method`` (the anchors that agree
        with the chosen run, or ``"body size only"``),
        ``alternatives`` (the next best runs with their probabilities), ``evidence`` (per
        vertebra: ribs, body radius, truncated, and with ``name_votes`` the network's name and
        its share), ``below``/``above`` (bone beyond the column).
    """
    from scipy import ndimage

    from .labels import vertebra_by_verse_id

    spacing = _spacing3(spacing_mm)
    instances = np.asarray(instances).astype(np.int32, copy=False)
    count = int(instances.max()) if instances.size else 0
    if count == 0:
        raise SegmentationError("no_spine_found", "No vertebra to name: the instance map is empty.")
    line = centreline if centreline is not None else body_centreline(ndimage.binary_fill_holes(instances > 0), spacing)
    geometry = vertebra_geometry(instances, line, spacing, field_of_view)
    ribs = rib_evidence(instances, ct_hu, line, spacing, field_of_view)
    below = _end_evidence(bone_beyond_column(instances, ct_hu, line, geometry, spacing, field_of_view, caudal=True, also_bone=sacral_fragment), caudal=True)
    above = _end_evidence(bone_beyond_column(instances, ct_hu, line, geometry, spacing, field_of_view, caudal=False), caudal=False)

    votes = network_name_shares(instances, name_votes, count) if name_votes is not None else None

    chains = _chains()
    usable = min(count, len(chains["L6"]) - 1)  # more segments than vertebrae: name the lowest ones
    offset = count - usable
    scored = []
    for chain_name, names, prior in _placements(usable):
        log_l, parts = _log_likelihood(names, chains[chain_name], geometry[offset:], ribs[offset:], below, above, None if votes is None else votes[offset:])
        scored.append((log_l + math.log(prior), chain_name, names, parts))
    logs = np.array([entry[0] for entry in scored])
    posterior = np.exp(logs - logs.max())
    posterior /= posterior.sum()
    order = np.argsort(-posterior, kind="stable")
    _, best_chain, best_names, _ = scored[int(order[0])]

    def readable(names: Sequence[int]) -> List[str]:
        return ["C1-C2" if v == ATLAS_AXIS else vertebra_by_verse_id(v).name for v in names]

    lookup = np.zeros(count + 1, dtype=np.uint8)
    final_names = [0] * offset + list(best_names)
    for value, verse_id in enumerate(final_names, start=1):
        lookup[value] = 2 if verse_id == ATLAS_AXIS else verse_id
    verse_labels = lookup[instances]
    if best_names[0] == ATLAS_AXIS:
        verse_labels = split_atlas_from_axis(verse_labels, line, spacing)
        final_names = [0] * offset + [1, 2] + list(best_names[1:])
    lowest_rib = None
    for index, evidence in enumerate(ribs):
        if evidence.get("right") or evidence.get("left"):
            lowest_rib = index + 1
    # the anchors that agree with the chosen run
    deciding = []
    if below["bone_found"] and best_names[-1] == chains[best_chain][-1]:
        deciding.append("sacrum")
    if lowest_rib is not None and lowest_rib > offset and best_names[lowest_rib - 1 - offset] in (19, 28) and lowest_rib < count:
        deciding.append("ribs")
    elif lowest_rib is not None and lowest_rib > offset and 8 <= best_names[lowest_rib - 1 - offset] <= 19:
        deciding.append("ribs (thoracic)")
    if above["skull_found"] and 1 in _verse_ids_of(best_names[0]):
        deciding.append("skull")
    if votes is not None:
        agreeing = sum(1 for name, shares in zip(best_names, votes[offset:]) if shares.sum() > 0 and int(np.argmax(shares)) in _verse_ids_of(name))
        if agreeing * 2 > len(best_names):  # the network named most segments as the run does
            deciding.append("network")
    present = [v for v in final_names if v]
    info: Dict[str, object] = {
        "names": [vertebra_by_verse_id(v).name for v in present],
        "verse_ids": [int(v) for v in present],
        "chain": best_chain,
        "confidence": round(float(posterior[order[0]]), 3),
        "method": "+".join(deciding) if deciding else "body size only",
        "anchors": {"bone_below": bool(below["bone_found"]), "sacral_alae": bool(below["alae_found"]), "skull": bool(above["skull_found"]), "lowest_rib_vertebra": lowest_rib},
        "alternatives": [{"names": "-".join(readable(scored[int(i)][2])[:: max(1, len(scored[int(i)][2]) - 1)]), "probability": round(float(posterior[i]), 3)} for i in order[1:4]],
        "evidence": [
            {"instance": i + 1, "ribs": [ribs[i]["right"], ribs[i]["left"]], "body_radius_mm": round(float(g.body_radius_mm), 1), "truncated": bool(g.truncated), "volume_ml": round(float(g.volume_ml), 1)}
            | ({} if votes is None or votes[i].sum() == 0 else {"network": vertebra_by_verse_id(int(np.argmax(votes[i]))).name, "network_share": round(float(votes[i].max()), 2)})
            for i, g in enumerate(geometry)
        ],
        "below": below,
        "above": above,
        "unnamed_segments": offset,
    }
    return verse_labels, info


def split_atlas_from_axis(verse_labels: np.ndarray, line: Centreline, spacing_mm) -> np.ndarray:
    """Split the C1+C2 segment (VerSe 2 on entry) into C1 (1) and C2 (2).

    C1 is a ring around the dens: the part of the segment in its upper 40 % (along the
    centreline) and more than 8 mm from the centreline seeds C1, the dens core (within 4 mm
    of the centreline) and the lower 60 % seed C2; the seeds grow through the segment,
    thick bone first, as in :func:`split_vertebrae`.
    """
    from scipy import ndimage

    spacing = _spacing3(spacing_mm)
    segment = verse_labels == 2
    if not segment.any():
        return verse_labels
    flat = np.flatnonzero(segment)
    arc, distance, _, _ = centreline_frame(_points_mm(flat, segment.shape, spacing), line)
    low, high = np.percentile(arc, [1, 99])
    cut = low + 0.6 * (high - low)
    seeds = np.zeros(segment.shape, dtype=np.int32)
    seeds.reshape(-1)[flat[(arc >= cut) & (distance > 8.0)]] = 1
    seeds.reshape(-1)[flat[(arc < cut - 2.0) | (distance <= 4.0)]] = 2
    if not (seeds == 1).any():
        return verse_labels
    depth_mm = ndimage.distance_transform_edt(segment, sampling=spacing)
    grown = grow_labels(seeds, segment, -depth_mm, THICKNESS_LEVELS)
    parts, _ = keep_largest_pieces(grown)
    out = verse_labels.copy()
    out[segment] = np.where(parts[segment] == 1, 1, 2).astype(out.dtype)
    return out


# --------------------------------------------------------------------------- sacrum
#: Bone threshold (HU) for the sacrum segment: lower than :data:`BONE_HU` so that its cancellous
#: core counts, still above muscle and the L5/S1 disc.
SACRUM_HU = 130.0


def segment_upper_sacrum(verse_labels: np.ndarray, ct_hu: np.ndarray, line: Centreline, spacing_mm, field_of_view: Optional[np.ndarray] = None, *, depth_factor: float = 1.0) -> np.ndarray:
    """The sacrum's first segment (S1 level) below the lowest lumbar vertebra, from the CT alone.

    Bone (CT >= :data:`SACRUM_HU`) outside the spine labels, from 2 mm below the lowest
    labelled vertebral body down to ``depth_factor`` times that body's height, within 3 body
    radii to either side (the alae; the sacroiliac joints lie further out) and 1.5 radii in
    front of to 2.5 radii behind the centreline; cavities filled; the largest 26-connected
    piece. A threshold segment, not a network's: edges follow the 150 HU contour.

    Parameters
    ----------
    verse_labels : (D, H, W) int, canonical grid (z, y, x); the lowest label is L5 (or L6)
    ct_hu : (D, H, W) float, HU
    line : Centreline
    spacing_mm : float or (3,) float, (z, y, x) mm
    field_of_view : (D, H, W) bool, optional

    Returns
    -------
    (D, H, W) bool; empty when no bone is found there.
    """
    from scipy import ndimage

    spacing = _spacing3(spacing_mm)
    labelled = verse_labels > 0
    inside_fov = np.ones(labelled.shape, dtype=bool) if field_of_view is None else np.asarray(field_of_view, dtype=bool)
    values = [v for v in np.unique(verse_labels) if v > 0]
    from .labels import CRANIO_CAUDAL_ORDER

    lowest = max(values, key=CRANIO_CAUDAL_ORDER.index)
    flat = np.flatnonzero(verse_labels == lowest)
    arc, distance, _, _ = centreline_frame(_points_mm(flat, labelled.shape, spacing), line)
    core = distance <= 0.6 * line.radius_at_arc(arc)
    body_arc = arc[core] if core.sum() >= 10 else arc
    low, high = (float(v) for v in np.percentile(body_arc, [1, 99]))
    radius = float(line.radius_at_arc(0.5 * (low + high)))
    window = (low - 2.0 - depth_factor * (high - low), low - 2.0)
    z_ends = line.at_arc(np.array(window))[0]
    z_lo = 0 if window[0] < line.arc_mm[0] else max(0, int(math.floor((float(np.min(z_ends)) - 3.0 * radius) / spacing[0])))
    z_hi = min(labelled.shape[0], int(math.ceil((float(np.max(z_ends)) + 3.0 * radius) / spacing[0])) + 1)
    out = np.zeros(labelled.shape, dtype=bool)
    if z_hi <= z_lo:
        return out
    sub_shape = (z_hi - z_lo,) + labelled.shape[1:]
    tube = _tube_voxels(sub_shape, _sub_centreline(line, z_lo, z_hi), spacing, 3.6 * radius)
    points = _points_mm(tube, sub_shape, spacing)
    points[:, 0] += z_lo * spacing[0]
    arc, _, posterior, left = centreline_frame(points, line)
    region = (arc >= window[0]) & (arc <= window[1]) & (posterior >= -1.5 * radius) & (posterior <= 2.5 * radius) & (np.abs(left) <= 3.0 * radius)
    flat = tube[region] + z_lo * labelled.shape[1] * labelled.shape[2]
    keep = (ct_hu.reshape(-1)[flat] >= SACRUM_HU) & inside_fov.reshape(-1)[flat] & ~labelled.reshape(-1)[flat]
    out.reshape(-1)[flat[keep]] = True
    if not out.any():
        return out
    inside = np.zeros(labelled.shape, dtype=bool)
    inside.reshape(-1)[flat] = True
    out = ndimage.binary_fill_holes(ndimage.binary_closing(out, structure=_CUBE)) & inside & ~labelled
    pieces, count = ndimage.label(out, structure=_CUBE)
    if count > 1:
        out = pieces == (np.argmax(np.bincount(pieces.ravel())[1:]) + 1)
    return out


# --------------------------------------------------------------------------- images
#: Context kept around the mask on the working grid, mm along (x, y, z) = (L, P, S):
#: ribs run sideways, the sacrum and skull base lie beyond the column's ends.
CONTEXT_MARGIN_MM = (60.0, 40.0, 60.0)


def _working_region(mask_image: "sitk.Image", mask: np.ndarray) -> Tuple[List[int], List[int]]:
    """Index and size (x, y, z order) of the mask's bounding box grown by :data:`CONTEXT_MARGIN_MM`."""
    direction = np.abs(np.array(mask_image.GetDirection(), dtype=float).reshape(3, 3))
    spacing = np.array(mask_image.GetSpacing(), dtype=float)
    # margin along each index axis: the physical margins weighted by that axis' direction cosines
    margin_mm = direction.T @ np.array(CONTEXT_MARGIN_MM)
    margin = np.ceil(margin_mm / spacing).astype(int)
    nonzero = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]  # numpy (z, y, x)
    low = np.array([nonzero[2][0], nonzero[1][0], nonzero[0][0]]) - margin
    high = np.array([nonzero[2][-1], nonzero[1][-1], nonzero[0][-1]]) + margin + 1
    size = np.array(mask_image.GetSize())
    low = np.maximum(low, 0)
    high = np.minimum(high, size)
    return [int(v) for v in low], [int(v) for v in high - low]


def _field_of_view(ct_image: "sitk.Image", reference: "sitk.Image") -> np.ndarray:
    """(D, H, W) bool on ``reference``'s grid: True inside the CT's extent.

    Built from a ones-image of only the part of the CT that ``reference`` overlaps.
    """
    import SimpleITK as sitk

    from .preprocessing import physical_corners, resample_to_reference

    corners = [ct_image.TransformPhysicalPointToContinuousIndex([float(c) for c in corner]) for corner in physical_corners(reference)]
    size = np.array(ct_image.GetSize())
    low = np.clip(np.floor(np.min(corners, axis=0)).astype(int) - 1, 0, size - 1)
    high = np.clip(np.ceil(np.max(corners, axis=0)).astype(int) + 2, 1, size)
    ones = sitk.Image([int(v) for v in high - low], sitk.sitkUInt8) + 1
    ones.SetSpacing(ct_image.GetSpacing())
    ones.SetDirection(ct_image.GetDirection())
    ones.SetOrigin(ct_image.TransformIndexToPhysicalPoint([int(v) for v in low]))
    return sitk.GetArrayFromImage(resample_to_reference(ones, reference, method="nearest", default_value=0)) > 0


def label_vertebrae(
    mask_image: "sitk.Image", ct_image: "sitk.Image", *, spacing_mm: Optional[float] = None, include_sacrum: bool = False, name_votes: Optional["sitk.Image"] = None,
) -> Tuple["sitk.Image", Dict[str, object]]:
    """Label every vertebra of a binary spine mask with its VerSe id.

    The mask's bounding box plus :data:`CONTEXT_MARGIN_MM` of CT around it is resampled onto
    a canonical grid (:func:`SpineContextSegLib.preprocessing.canonical_reference`,
    isotropic ``spacing_mm``); there :func:`split_vertebrae` and :func:`name_vertebrae` run
    (optionally :func:`segment_upper_sacrum`), and the labels come back onto the mask's own
    grid with nearest neighbour. On that grid the labels are then fitted to the mask: mask
    voxels the resampling left unlabelled take the label of the vertebra they connect to
    (geodesically, inside the mask), voxels outside the mask are cleared (except the sacrum,
    which is not part of the mask) and every label is made one 26-connected piece. A piece
    of the sacrum that the mask took in below L5 (:func:`caudal_fragment`) is no vertebra:
    it joins the sacrum, or stays unlabelled without ``include_sacrum``.

    Parameters
    ----------
    mask_image : SimpleITK.Image, 3D
        Binary spine mask (non-zero = spine, C1-L6, sacrum excluded), any orientation.
    ct_image : SimpleITK.Image, 3D
        The CT in HU, in the same physical space (any grid; usually the mask's).
    spacing_mm : float, optional
        Working grid spacing; default :data:`WORKING_SPACING_MM`, coarser if the crop would
        exceed :data:`MAX_WORKING_VOXELS` voxels.
    include_sacrum : bool
        Also segment the upper sacrum (VerSe 26) below the last lumbar vertebra when the
        naming found it there (a CT-threshold segment, coarse).
    name_votes : SimpleITK.Image, optional
        A vertebrae network's most probable vertebra per voxel (uint8 VerSe ids, any grid in
        the same physical space), used as naming evidence (see :func:`name_vertebrae`).

    Returns
    -------
    labels : SimpleITK.Image
        uint8 VerSe ids (see :mod:`SpineContextSegLib.labels`) on exactly ``mask_image``'s grid.
    info : dict
        :func:`name_vertebrae`'s info plus ``working_spacing_mm``, ``discs`` (count),
        ``unlabelled_ml`` (mask voxels left without a label: islands away from the column),
        ``sacrum_ml``, ``sacral_fragment_in_mask``.

    Raises
    ------
    SegmentationError
        ``no_spine_found`` when the mask is empty.
    """
    import SimpleITK as sitk
    from scipy import ndimage

    from .preprocessing import AIR_HU, canonical_reference, physical_corners, resample_to_reference

    mask_full = sitk.GetArrayViewFromImage(mask_image) != 0
    if not mask_full.any():
        raise SegmentationError("no_spine_found", "The spine mask is empty: there are no vertebrae to label.")
    index, size = _working_region(mask_image, mask_full)
    mask_roi = sitk.RegionOfInterest(sitk.Cast(mask_image != 0, sitk.sitkUInt8), size, index)
    extent_mm = np.ptp(physical_corners(mask_roi), axis=0)
    spacing = float(spacing_mm or WORKING_SPACING_MM)
    if spacing_mm is None and float(np.prod(extent_mm / spacing)) > MAX_WORKING_VOXELS:
        spacing = float((np.prod(extent_mm) / MAX_WORKING_VOXELS) ** (1.0 / 3.0))
    reference = canonical_reference(mask_roi, [spacing] * 3)
    ct_work = sitk.GetArrayFromImage(resample_to_reference(ct_image, reference, method="linear", default_value=AIR_HU, pixel_type=sitk.sitkFloat32))
    mask_work = sitk.GetArrayFromImage(resample_to_reference(mask_roi, reference, method="nearest", default_value=0)) > 0
    field_of_view = _field_of_view(ct_image, reference)
    if not mask_work.any():  # a mask thinner than the working grid: take its nearest voxels anyway
        raise SegmentationError("no_spine_found", "The spine mask vanishes on the working grid: it is too thin to be a spine.")

    from .labels import SACRUM_ID

    instances, details = split_vertebrae(mask_work, ct_work, spacing, return_details=True)
    fragment = caudal_fragment(instances, details["centreline"], spacing, field_of_view)
    not_vertebra = instances == fragment if fragment else np.zeros(mask_work.shape, dtype=bool)
    instances[not_vertebra] = 0
    votes_work = None
    if name_votes is not None:
        votes_work = sitk.GetArrayFromImage(resample_to_reference(name_votes, reference, method="nearest", default_value=0, pixel_type=sitk.sitkUInt8))
    verse_work, info = name_vertebrae(
        instances, ct_work, spacing, field_of_view=field_of_view, centreline=details["centreline"], sacral_fragment=not_vertebra, name_votes=votes_work
    )
    if include_sacrum and "sacrum" in str(info["method"]):
        # the fragment of the mask below L5 is the top of the sacrum (its marrow may lie under SACRUM_HU)
        verse_work[segment_upper_sacrum(verse_work, ct_work, details["centreline"], spacing, field_of_view) | not_vertebra] = SACRUM_ID
    else:
        verse_work[not_vertebra] = NOT_A_VERTEBRA
    del ct_work, field_of_view

    work_image = sitk.GetImageFromArray(verse_work)
    work_image.CopyInformation(reference)
    on_roi = sitk.GetArrayFromImage(resample_to_reference(work_image, mask_roi, method="nearest", default_value=0, pixel_type=sitk.sitkUInt8))
    roi_mask = sitk.GetArrayViewFromImage(mask_roi) > 0
    sacrum_roi = on_roi == SACRUM_ID
    claimed = sacrum_roi | (on_roi == NOT_A_VERTEBRA)  # no vertebra grows into these
    vertebrae_roi = np.where(roi_mask & ~claimed, on_roi, 0).astype(np.int32)
    # mask voxels the nearest-neighbour resampling missed join the vertebra they connect to
    vertebrae_roi = grow_labels(vertebrae_roi, roi_mask & ~claimed)
    vertebrae_roi, _ = keep_largest_pieces(vertebrae_roi)
    if sacrum_roi.any():
        vertebrae_roi[sacrum_roi] = SACRUM_ID
        vertebrae_roi, _ = keep_largest_pieces(vertebrae_roi)
    out = np.zeros(mask_full.shape, dtype=np.uint8)
    box = tuple(slice(i, i + n) for i, n in zip(index[::-1], size[::-1]))
    out[box] = vertebrae_roi.astype(np.uint8)
    labels = sitk.GetImageFromArray(out)
    labels.CopyInformation(mask_image)
    voxel_ml = float(np.prod(mask_image.GetSpacing())) / 1000.0
    present = [int(v) for v in np.unique(out) if v > 0]
    info = dict(info)
    info.update(
        {
            "working_spacing_mm": round(spacing, 3),
            "discs": len(details["discs"]),
            "unlabelled_ml": round(float(np.count_nonzero(mask_full & (out == 0))) * voxel_ml, 2),
            "sacrum_ml": round(float(np.count_nonzero(out == SACRUM_ID)) * voxel_ml, 2),
            "sacral_fragment_in_mask": bool(fragment),
            "labels_present": present,
        }
    )
    return labels, info
