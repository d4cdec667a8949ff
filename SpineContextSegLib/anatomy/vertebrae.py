"""Binary spine mask -> one segment per vertebra, named with its VerSe id, without a network.

Three steps, all on the **canonical grid** of :mod:`SpineContextSegLib.inference.preprocessing` (numpy
axis 0 inferior->superior, axis 1 anterior->posterior, axis 2 right->left), isotropic:

1. **Centreline** (:func:`body_centreline`): per axial slice, the centre of the thickest
   in-plane part of the mask (the vertebral body; posterior elements are thin), smoothed
   along z; slices through a disc (no body in the mask) are bridged, a stretch of missing
   vertebrae follows the bodies in the CT, and beyond the first and last body the line runs
   straight on along the column's end direction.
2. **Split** (:func:`split_vertebrae`, in the mask's box): along the centreline's arc length,
   the share of a cylinder around the body centreline that lies in the mask
   (:func:`body_profile`) drops at every intervertebral disc (discs are not bone). Discs are
   the deep minima of that profile, no closer together than about half a vertebra; a segment
   as long as two vertebrae is searched again for a shallow minimum (a disc bridged by
   osteophytes) (:func:`find_disc_levels`); a segment spanning a gap in the mask is cut to its
   solid stretches (:func:`_solid_segments`). Each vertebra gets three seeds, the core of its
   body, the bone just behind its body at pedicle level and the midline behind the canal where
   its laminae meet (so its spinous process is its own even where the mask bridges the joints
   to the vertebra below); the seeds grow through the mask, thick bone first (adjacent
   vertebrae touch at thin necks: facet joints, osteophytes), geodesically within a thickness
   level (:func:`grow_labels`). Every label ends up one 26-connected piece
   (:func:`keep_largest_pieces`); a piece of body that no seed reached (a mask in fragments)
   becomes a segment of its own (:func:`_orphan_pieces`). A mask whose bodies are hollow
   shells (a HU threshold) is first closed and filled slice by slice (:func:`fill_slices`).
3. **Naming** (:func:`name_vertebrae`): a sequence step over the segments, top to bottom,
   along the chain C1-L5 (or the chains with T13 or L6) and over the patient's scale: each
   next segment is the next level, a level further on (vertebrae missing from the mask) or a
   further piece of the same vertebra. The evidence: the distance between segments against
   the expected body heights and discs (it counts the vertebrae a gap hides); ribs, found in
   the CT beside the column whether or not the mask holds their vertebra (:func:`find_ribs`,
   :func:`rib_evidence`: thoracic levels, and rib-bearing levels missing in a gap or beyond
   the ends), so the names count down from the first rib (T1) and up from the last (T12); bone
   outside the mask right below the lowest vertebra, with alae (:func:`bone_beyond_column`: the
   sacrum, so the lowest vertebra is the last lumbar one); a skull base above the highest (it
   is C1; C1 and C2 usually arrive as one segment and are split afterwards,
   :func:`split_atlas_from_axis`; a mask with a gap under the atlas gives C1 alone); body size
   and length at the patient's scale; with a vertebrae network (``train --task vertebrae``),
   also the names it gives each segment's voxels. The most likely naming wins; its posterior
   probability is the reported ``confidence`` (per segment too), capped at
   :data:`UNANCHORED_CONFIDENCE` when no anchor (sacrum, last or first rib, skull, network)
   confirms it (``anchored``).

:func:`label_vertebrae` runs all three on SimpleITK images and returns the VerSe label map
on the input grid (seconds per stage in ``info["timings_s"]``; the working grid is 1 mm, or
coarser so that it holds at most :data:`MAX_WORKING_VOXELS`). The sacrum is not part of the
binary mask (see :data:`SpineContextSegLib.labels.SPINE_MASK_INCLUDES_SACRUM`); it serves as
the anchor and, with ``include_sacrum=True``, its upper part is segmented from the CT alone
(VerSe 26, :func:`segment_upper_sacrum`). A mask that took in the top of the sacrum leaves a
small segment below L5; :func:`caudal_fragment` tells it from a vertebra before naming.

Limits: a vertebra missing from the mask is inferred from the spacing and from its ribs, but a
gap below the last rib (lumbar) rests on the spacing alone; vertebrae fused without any trace
of a disc stay one segment; a piece of arch cut off its body stays unlabelled; a scan with
neither ribs, sacrum nor skull base in view is named from body size and spacing alone, which
tells regions apart but not neighbours (``anchored`` is false, the confidence at most 0.5);
T13 and L6 can only be told from the number of vertebrae between the lowest rib and the sacrum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from SpineContextSegLib.errors import SegmentationError

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

#: Working grid spacing (mm) of :func:`label_vertebrae` (isotropic); coarser for very large crops.
WORKING_SPACING_MM = 1.0
#: Largest working grid (voxels) before the spacing is coarsened: a full-field chest CT
#: (mask box plus :data:`CONTEXT_MARGIN_MM`, ~19 M voxels at 1 mm) is labelled at ~1.45 mm in
#: about 1.5 s on two CPU cores (``scripts/labelling_speed.py``).
MAX_WORKING_VOXELS = 6_000_000
#: Bone threshold (HU) for ribs, sacrum and skull outside the mask.
BONE_HU = 200.0
#: Number of thickness levels of the seeded growth (see :func:`grow_labels`).
THICKNESS_LEVELS = 16
#: Along the column, a stretch this long (times the body radius) without body in the mask is a
#: gap in the mask (a vertebra, or part of one, missing), not a disc.
EMPTY_STRETCH_RADII = 0.8
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
    planes, rows, columns = _padded_box(mask)
    # one 3D transform whose z step is so long that the nearest background always lies in the slice
    # (the box keeps a background rim in every slice): the same as a 2D transform per slice
    far = 1e4 * float(spacing[1:].max()) * max(mask.shape)
    depth = ndimage.distance_transform_edt(mask[planes, rows, columns], sampling=(far, spacing[1], spacing[2]))
    out[planes, rows, columns] = np.minimum(depth, float(np.hypot(mask.shape[1] * spacing[1], mask.shape[2] * spacing[2])))
    return out


def _padded_box(mask: np.ndarray, pad: int = 1) -> Tuple[slice, ...]:
    """Bounding box of the True voxels, grown by ``pad`` voxels (so that distances to the background stay exact)."""
    box = []
    for axis in range(mask.ndim):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, int(occupied[0]) - pad), min(mask.shape[axis], int(occupied[-1]) + 1 + pad)))
    return tuple(box)


def body_centreline(mask: np.ndarray, spacing_mm, *, smoothing_mm: float = 6.0, thickness: Optional[np.ndarray] = None, ct_hu: Optional[np.ndarray] = None) -> Centreline:
    """Centreline of the vertebral bodies of a spine mask.

    Per axial slice, the centre of the voxels at least 60 % as thick (in-plane distance to
    the background) as the slice's thickest voxel: in a slice through a vertebra that is
    the body. Slices much thinner than their neighbours (discs, posterior elements only)
    get no weight; the centres are smoothed along z with a Gaussian of ``smoothing_mm``.
    With ``ct_hu``, a stretch of the column without body in the mask that is longer than a
    disc (:data:`EMPTY_STRETCH_RADII` body radii: vertebrae missing from the mask) takes its
    centres from the CT's bone instead (:func:`_bone_centres`), so the line follows the
    column's curve through the gap rather than a straight chord (the body radius stays the
    one interpolated from the mask).

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
    ct_hu : (D, H, W) float, optional
        CT in HU on the same grid.

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
    line = _smooth_centreline(cy, cx, r_max, mask, spacing, smoothing_mm)
    if ct_hu is not None:
        bodies = np.flatnonzero(line.body_slice)
        if bodies.size >= 2:
            empty = np.zeros(depth, dtype=bool)
            empty[bodies[0] : bodies[-1] + 1] = ~line.body_slice[bodies[0] : bodies[-1] + 1]
            gaps = []
            for run in np.split(np.flatnonzero(empty), np.flatnonzero(np.diff(np.flatnonzero(empty)) > 1) + 1):
                if run.size and run.size * spacing[0] > EMPTY_STRETCH_RADII * float(np.median(line.body_radius_mm[run])):
                    gaps.append(run)
            if gaps:
                slices = np.concatenate(gaps)
                found = _bone_centres(ct_hu, line, spacing, slices)
                if found.any():
                    slices = slices[found[:, 0] > 0]
                    cy[slices], cx[slices], r_max[slices] = found[found[:, 0] > 0, 1], found[found[:, 0] > 0, 2], found[found[:, 0] > 0, 0]
                    radius = line.body_radius_mm  # the CT's threshold bone is thinner than a mask's body
                    line = _smooth_centreline(cy, cx, r_max, mask, spacing, smoothing_mm)
                    line.body_radius_mm = radius
    return line


def _bone_centres(ct_hu: np.ndarray, line: Centreline, spacing: np.ndarray, slices: np.ndarray) -> np.ndarray:
    """Per slice, the vertebral body seen in the CT near the centreline: (radius, y, x) mm, or zeros.

    In a window of 1.5 body radii around the centreline point, bone (CT >= 150 HU, holes
    filled) is measured like the mask in :func:`body_centreline`: the centre of its thickest
    part, found only where that part is at least half a body radius thick (a body, not a rib
    or a vessel cut by the window).
    """
    from scipy import ndimage

    out = np.zeros((slices.size, 3))
    height, width = ct_hu.shape[1:]
    for row, z in enumerate(slices):
        radius = float(line.body_radius_mm[z])
        reach = 1.5 * radius
        y0, y1 = max(0, int((line.y_mm[z] - reach) / spacing[1])), min(height, int((line.y_mm[z] + reach) / spacing[1]) + 2)
        x0, x1 = max(0, int((line.x_mm[z] - reach) / spacing[2])), min(width, int((line.x_mm[z] + reach) / spacing[2]) + 2)
        if y1 - y0 < 3 or x1 - x0 < 3:
            continue
        ys = (np.arange(y0, y1) * spacing[1])[:, None] - line.y_mm[z]
        xs = (np.arange(x0, x1) * spacing[2])[None, :] - line.x_mm[z]
        bone = (ct_hu[z, y0:y1, x0:x1] >= 150.0) & (ys ** 2 + xs ** 2 <= reach ** 2)
        if not bone.any():
            continue
        bone = ndimage.binary_fill_holes(bone)
        depth = ndimage.distance_transform_edt(np.pad(bone, 1), sampling=spacing[1:])[1:-1, 1:-1]
        thickest = float(depth.max())
        if thickest < 0.5 * radius:
            continue
        yy, xx = np.nonzero(depth >= 0.6 * thickest)
        w = depth[yy, xx] ** 2
        out[row] = (thickest, float(np.sum((yy + y0) * w) / np.sum(w) * spacing[1]), float(np.sum((xx + x0) * w) / np.sum(w) * spacing[2]))
    return out


def _smooth_centreline(cy: np.ndarray, cx: np.ndarray, r_max: np.ndarray, mask: np.ndarray, spacing: np.ndarray, smoothing_mm: float) -> Centreline:
    """The :class:`Centreline` from per-slice body centres and radii (see :func:`body_centreline`)."""
    from scipy import ndimage

    depth = r_max.size
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
    from scipy import ndimage

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
    minima, properties = find_peaks(-smooth[lo:hi], prominence=0.25 * body_level, distance=max(1, int(round(6.0 / step))))
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
            found, properties = find_peaks(-smooth[inner], prominence=0.08 * body_level)
            found = found[smooth[found + first] <= 0.9 * body_level]
            if found.size == 0:
                continue
            best = int(found[np.argmin(smooth[found + first])]) + first
            accepted.append(_plateau_centre(profile.arc_mm, smooth, best, lo, hi, 0.03 * body_level))
            added = True
        if not added:
            break
    return sorted(accepted), start, end


def find_peaks(values: np.ndarray, *, prominence: float, distance: int = 1) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Peaks of a 1-D signal with at least ``prominence``, at least ``distance`` samples apart.

    The same peaks as ``scipy.signal.find_peaks(values, prominence=..., distance=...)`` (a
    flat peak counts at its middle; of two peaks closer than ``distance`` the higher one
    stays, then the prominence is measured), without importing :mod:`scipy.signal` (over a
    second on its own). Returns ``(indices, {"prominences": ...})``.
    """
    x = np.asarray(values, dtype=np.float64)
    size = x.size
    peaks = []
    i = 1
    while i < size - 1:
        if x[i - 1] < x[i]:
            ahead = i + 1
            while ahead < size - 1 and x[ahead] == x[i]:
                ahead += 1
            if x[ahead] < x[i]:
                peaks.append((i + ahead - 1) // 2)
                i = ahead
        i += 1
    peaks = np.array(peaks, dtype=np.intp)
    if peaks.size > 1 and distance > 1:
        keep = np.ones(peaks.size, dtype=bool)
        order = np.argsort(x[peaks])
        for j in order[::-1]:
            if not keep[j]:
                continue
            k = j - 1
            while k >= 0 and peaks[j] - peaks[k] < distance:
                keep[k] = False
                k -= 1
            k = j + 1
            while k < peaks.size and peaks[k] - peaks[j] < distance:
                keep[k] = False
                k += 1
        peaks = peaks[keep]
    prominences = np.zeros(peaks.size)
    for n, peak in enumerate(peaks):
        i, left_min = peak, x[peak]
        while i >= 0 and x[i] <= x[peak]:
            left_min = min(left_min, x[i])
            i -= 1
        i, right_min = peak, x[peak]
        while i < size and x[i] <= x[peak]:
            right_min = min(right_min, x[i])
            i += 1
        prominences[n] = x[peak] - max(left_min, right_min)
    kept = prominences >= prominence
    return peaks[kept], {"prominences": prominences[kept]}


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


def keep_largest_pieces(labels: np.ndarray, several_pieces: Sequence[int] = ()) -> Tuple[np.ndarray, int]:
    """Make every label one 26-connected piece.

    Smaller pieces of a label go to the neighbouring label they touch most; pieces that
    touch no other label become 0.

    Parameters
    ----------
    labels : (D, H, W) int
        0 = background.
    several_pieces : labels left as they are (a vertebra the mask holds in pieces).

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
            if box is None or value in several_pieces:
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


def _solid_segments(profile: BodyProfile, segments: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """Segments between discs, cut down to where the mask has body.

    A segment that spans a gap in the mask (no body over more than :data:`EMPTY_STRETCH_RADII`
    body radii: a vertebra or part of one missing from the mask) becomes one segment per solid
    stretch, each trimmed to its solid part, so the seeds of :func:`split_vertebrae` (placed
    in a segment's middle) land on bone. Solid stretches shorter than 3 mm are dropped.
    """
    from scipy import ndimage

    if profile.arc_mm.size < 2:
        return list(segments)
    step = float(profile.arc_mm[1] - profile.arc_mm[0])
    occupancy = np.nan_to_num(profile.occupancy, nan=0.0)
    smooth = ndimage.gaussian_filter1d(occupancy, max(0.5, 1.0 / step), mode="nearest")
    solid_bins = smooth > 0.2
    if not solid_bins.any():
        return list(segments)
    solid = smooth >= 0.3 * float(np.percentile(smooth[solid_bins], 90))
    out: List[Tuple[float, float]] = []
    for low, high in segments:
        inside = np.flatnonzero((profile.arc_mm >= low) & (profile.arc_mm <= high) & solid)
        if inside.size == 0:
            out.append((low, high))
            continue
        runs = np.split(inside, np.flatnonzero(np.diff(inside) > 1) + 1)
        pieces: List[List[int]] = [[int(runs[0][0]), int(runs[0][-1])]]
        for run in runs[1:]:
            gap = (run[0] - pieces[-1][1] - 1) * step
            if gap > EMPTY_STRETCH_RADII * float(profile.radius_mm[run[0]]):
                pieces.append([int(run[0]), int(run[-1])])
            else:
                pieces[-1][1] = int(run[-1])
        if len(pieces) == 1 and (pieces[0][1] - pieces[0][0] + 1) * step >= 0.6 * (high - low):
            out.append((low, high))  # solid over most of its length: keep the disc positions
            continue
        for first, last in pieces:
            if (last - first + 1) * step >= 3.0:
                out.append((float(profile.arc_mm[first]) - 0.5 * step, float(profile.arc_mm[last]) + 0.5 * step))
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
        CT in HU on the same grid: where the mask misses whole vertebrae, the centreline follows
        the bodies in the CT through the gap (:func:`body_centreline`); optional.
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
    # work in the mask's box (all slices kept, so the centreline covers the whole grid)
    _, rows, columns = _padded_box(mask, pad=3)
    if (rows.stop - rows.start) * (columns.stop - columns.start) < mask.shape[1] * mask.shape[2]:
        instances, details = split_vertebrae(mask[:, rows, columns], None if ct_hu is None else ct_hu[:, rows, columns], spacing, min_vertebra_ml=min_vertebra_ml, return_details=True)
        full = np.zeros(mask.shape, dtype=np.int32)
        full[:, rows, columns] = instances
        if not return_details:
            return full
        seeds = np.zeros(mask.shape, dtype=np.int32)
        seeds[:, rows, columns] = details["seeds"]
        line = details["centreline"]
        line.y_mm = line.y_mm + rows.start * spacing[1]
        line.x_mm = line.x_mm + columns.start * spacing[2]
        return full, dict(details, seeds=seeds)
    filled = ndimage.binary_fill_holes(mask)
    line = body_centreline(filled, spacing, ct_hu=ct_hu)
    profile = body_profile(filled, line, spacing)
    hollow = _looks_hollow(profile)
    if hollow:
        # a mask of dense bone only (a threshold; osteoporotic marrow) leaves hollow bodies whose
        # shells are thinner than the posterior elements: close and fill them slice by slice
        filled = fill_slices(filled, spacing)
        line = body_centreline(filled, spacing, ct_hu=ct_hu)
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
    segments = _solid_segments(profile, [(low, high) for low, high in zip(bounds[:-1], bounds[1:]) if high - low > 2.0 * spacing[0]])
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
    instances, segments, orphans = _orphan_pieces(instances, mask, segments, line, spacing, min_vertebra_ml)
    removed -= orphans
    if return_details:
        return instances, {"centreline": line, "profile": profile, "discs": discs, "segments": segments, "seeds": seeds, "removed_voxels": removed, "hollow_mask": hollow}
    return instances


#: A piece of the mask on the column that no seed reaches becomes a segment of its own from this
#: size on (times ``min_vertebra_ml``): a piece of a vertebra the mask holds in fragments.
ORPHAN_SHARE = 0.5


def _orphan_pieces(instances: np.ndarray, mask: np.ndarray, segments: List[Tuple[float, float]], line: Centreline, spacing: np.ndarray, min_vertebra_ml: float):
    """Mask pieces on the column that no segment reached become segments of their own, in order.

    A mask in fragments leaves pieces of a vertebra that no seed reaches (the seeds sit in the
    middle of each segment between two discs). A piece of at least :data:`ORPHAN_SHARE` x
    ``min_vertebra_ml`` that comes within one body radius of the centreline (it holds body) is
    kept as a segment; the naming decides whether it is a vertebra or a piece of its neighbour's.
    A piece without body stays unlabelled.
    Returns the renumbered instances (1 = most cranial), their arc ranges and the voxels added.
    """
    from scipy import ndimage

    orphans = mask & (instances == 0)
    if not orphans.any():
        return instances, segments, 0
    pieces, _ = ndimage.label(orphans, structure=_CUBE)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    sizes = np.bincount(pieces.ravel())
    added = 0
    new_ranges: List[Tuple[float, float]] = []
    out = instances.copy()
    value = int(instances.max())
    for piece, box in enumerate(ndimage.find_objects(pieces), start=1):
        if box is None or sizes[piece] * voxel_ml < ORPHAN_SHARE * min_vertebra_ml:
            continue
        flat = np.flatnonzero(pieces[box] == piece)
        points = (np.stack(np.unravel_index(flat, pieces[box].shape), axis=1) + np.array([b.start for b in box])) * spacing
        arc, distance, _, _ = centreline_frame(points, line)
        radius = float(line.radius_at_arc(np.median(arc)))
        if np.min(distance) > radius:
            # no body: a piece of an arch (whose vertebra the mask cannot tell: its facets touch the
            # vertebra above as closely as its own body), a rib or a calcification: left unlabelled
            continue
        value += 1
        out[box][pieces[box] == piece] = value
        new_ranges.append(tuple(float(v) for v in np.percentile(arc, [1, 99])))
        added += int(sizes[piece])
    ranges = list(segments[: int(instances.max())]) + new_ranges
    if not new_ranges:
        return instances, segments, 0
    order = np.argsort([-(low + high) for low, high in ranges], kind="stable")
    renumber = np.zeros(value + 1, dtype=np.int32)
    renumber[order + 1] = np.arange(1, value + 1)
    return renumber[out], [ranges[i] for i in order], added


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
        low, high = _body_range(arcs, float(spacing[0]))
        # judged on the body core: an oblique field of view also has z-edges at its side walls
        edge_here = edge[box].reshape(-1)[flat]
        truncated = bool(np.any(edge_here[core]) if core.sum() >= 10 else np.any(edge_here))
        out.append(VertebraGeometry(low, high, points.mean(axis=0), float(line.radius_at_arc(0.5 * (low + high))), flat.size * float(np.prod(spacing)) / 1000.0, truncated))
    return out


#: Ribs are looked for beside the column, from this many body radii off the centreline ...
RIB_INNER_RADII = 1.6
#: ... out to this many mm further, from half a radius in front of the centreline to
#: :data:`RIB_BACK_RADII` behind it: the rib necks and angles. Further out and further back the
#: ribs of the upper thorax curve forward and down across the next ones, and the scapula lies.
RIB_BAND_MM = 35.0
RIB_BACK_RADII = 4.0
#: A rib's innermost voxel lies within this (plus one voxel, the mask's rim) of the column's
#: edge: the mask's lateral extent in that slice. A rib passing by further out (the lower ribs
#: descend beside the next vertebrae) does not articulate there.
RIB_CONTACT_MM = 2.0
#: A rib runs at least this far sideways inside the band (less where the field of view cuts it).
RIB_MIN_RUN_MM = 15.0
#: A rib belongs to the segment whose voxels lie within this of its inner end (the mask often
#: takes in the rib head, so the rest of the rib starts beside the segment it articulates with).
RIB_TOUCH_MM = 6.0
#: Where the field of view cuts it (a sagittal slab), a rib runs at least this far and holds this
#: much bone (the tip of a transverse process the mask missed holds less).
RIB_MIN_CUT_RUN_MM, RIB_MIN_CUT_ML = 10.0, 0.5
#: A rib holds at most this much bone inside the band (an iliac wing, the liver with contrast, a scapula hold more).
RIB_MAX_ML = 6.0
#: A rib's level is the mean arc of its voxels within this of its innermost one (the rib neck).
RIB_LEVEL_MM = 10.0
#: Where ribs are joined into one piece by a bone lying on them, each is taken from this far of the column's edge.
RIB_NECK_MM = 10.0


@dataclass
class Rib:
    """One rib found in the CT beside the column (:func:`find_ribs`).

    Attributes
    ----------
    side : str
        ``"right"`` or ``"left"``.
    arc_mm : float
        Centreline arc of its neck (the level of the vertebra it articulates with).
    reach_mm : float
        Sideways distance of its outermost voxel inside the band from the centreline, mm.
    volume_ml : float
        Its bone inside the band.
    cut_by_fov : bool
        The field of view (or the working crop) cuts it laterally.
    run_mm, contact_mm : float
        How far it runs sideways inside the band; the gap between its innermost voxel and the column's edge.
    segment : int
        The vertebra segment (instance number) its inner end touches (within :data:`RIB_TOUCH_MM`), 0 for none.
    mean_hu : float
        Mean CT of its voxels (for inspection; not a criterion: thick slices blur a rib's cortex).
    """

    side: str
    arc_mm: float
    reach_mm: float
    volume_ml: float
    cut_by_fov: bool
    run_mm: float = 0.0
    contact_mm: float = 0.0
    segment: int = 0
    mean_hu: float = 0.0


@dataclass
class RibScan:
    """Ribs found beside the column and where the scan shows the region a rib would occupy.

    ``view`` maps ``"right"``/``"left"`` to a (D,) float per axial slice: the share of the
    window beside the column (from :data:`RIB_INNER_RADII` radii out 25 mm, half a radius in
    front to two behind the centreline) inside the field of view and the working crop.
    """

    ribs: List[Rib]
    view: Dict[str, np.ndarray]
    touch_known: bool = False  # :attr:`Rib.segment` was measured (segments given, not a bare mask)


def find_ribs(ct_hu: np.ndarray, instances: np.ndarray, line: Centreline, spacing_mm, field_of_view: Optional[np.ndarray] = None) -> RibScan:
    """Ribs beside the column, found in the CT independently of the vertebra segments.

    Bone (CT >= :data:`BONE_HU`, not within one voxel of the spine mask, inside the field of
    view) in a band beside and behind the column (from :data:`RIB_INNER_RADII` body radii
    off the centreline outward over :data:`RIB_BAND_MM`, half a radius in front of the
    centreline to :data:`RIB_BACK_RADII` behind it) falls into 26-connected pieces. The band leaves out
    the column itself, so ribs stay separate pieces even where the mask misses a vertebra
    (its bone would otherwise join the ribs of several levels into one piece). A piece is a
    rib when its innermost voxel lies within :data:`RIB_CONTACT_MM` (plus a voxel) of the
    column's edge (the mask's lateral extent in that slice, or the band's inner edge), it runs at least
    :data:`RIB_MIN_RUN_MM` sideways (where the field of view cuts it, a sagittal slab:
    :data:`RIB_MIN_CUT_RUN_MM`, with at least :data:`RIB_MIN_CUT_ML`), holds at most
    :data:`RIB_MAX_ML`. Its level is the mean centreline arc of its
    innermost :data:`RIB_LEVEL_MM` (the neck, at the level of its own vertebra). Pieces of
    one rib on one side closer than 0.8 body radii in arc count once.

    Parameters
    ----------
    ct_hu : (D, H, W) float, HU, canonical grid (z, y, x)
    instances : (D, H, W) int, the vertebra segments (1, 2, ...), or bool: the spine mask
    line : Centreline
    spacing_mm : float or (3,) float, (z, y, x) mm
    field_of_view : (D, H, W) bool, optional

    Returns
    -------
    RibScan
    """
    from scipy import ndimage

    spacing = _spacing3(spacing_mm)
    depth, height, width = ct_hu.shape
    radius = line.body_radius_mm
    inner = RIB_INNER_RADII * radius
    outer = inner + RIB_BAND_MM
    y_lo = max(0, int(math.floor(float(np.min(line.y_mm - 0.5 * radius)) / spacing[1])))
    y_hi = min(height, int(math.ceil(float(np.max(line.y_mm + RIB_BACK_RADII * radius)) / spacing[1])) + 1)
    x_lo = max(0, int(math.floor(float(np.min(line.x_mm - outer)) / spacing[2])))
    x_hi = min(width, int(math.ceil(float(np.max(line.x_mm + outer)) / spacing[2])) + 1)
    view = {"right": np.zeros(depth), "left": np.zeros(depth)}
    if y_hi <= y_lo or x_hi <= x_lo:
        return RibScan([], view)
    box = (slice(None), slice(y_lo, y_hi), slice(x_lo, x_hi))
    posterior = (np.arange(y_lo, y_hi) * spacing[1])[None, :, None] - line.y_mm[:, None, None]
    left = (np.arange(x_lo, x_hi) * spacing[2])[None, None, :] - line.x_mm[:, None, None]
    r3 = radius[:, None, None]
    beyond = np.abs(left) - inner[:, None, None]  # mm beyond the band's inner edge
    in_band = (posterior >= -0.5 * r3) & (posterior <= RIB_BACK_RADII * r3) & (beyond >= 0) & (beyond <= RIB_BAND_MM)
    fov = np.ones(in_band.shape, dtype=bool) if field_of_view is None else np.asarray(field_of_view, dtype=bool)[box]
    # the share of the window beside the column that the scan (and the crop) shows
    window = (posterior >= -0.5 * r3) & (posterior <= 2.0 * r3) & (beyond >= 0) & (beyond <= 25.0) & fov
    full = 2.5 * radius * 25.0 / (spacing[1] * spacing[2])
    view["right"] = np.count_nonzero(window & (left < 0), axis=(1, 2)) / full
    view["left"] = np.count_nonzero(window & (left > 0), axis=(1, 2)) / full
    del window
    spine = np.asarray(instances)[box] > 0
    bone = in_band & fov & (ct_hu[box] >= BONE_HU)
    bone &= ~ndimage.binary_dilation(spine, structure=_CUBE)
    pieces, count = ndimage.label(bone, structure=_CUBE)
    if count == 0:
        return RibScan([], view)
    # the column's lateral edge per slice and side: the mask's widest point behind the body's front
    sz, _, sx = np.nonzero(spine & (posterior >= -0.5 * r3))
    spine_left = left[sz, 0, sx]
    edge = {"right": inner.copy(), "left": inner.copy()}
    np.maximum.at(edge["right"], sz[spine_left < 0], -spine_left[spine_left < 0])
    np.maximum.at(edge["left"], sz[spine_left > 0], spine_left[spine_left > 0])
    del sz, sx, spine_left
    flat = np.flatnonzero(pieces)
    labels = pieces.reshape(-1)[flat]
    z, y, x = np.unravel_index(flat, pieces.shape)
    signed = left[z, 0, x]
    lateral = np.abs(signed)
    column_edge = np.where(signed < 0, edge["right"][z], edge["left"][z])
    voxel_ml = float(np.prod(spacing)) / 1000.0
    volume = np.bincount(labels, minlength=count + 1) * voxel_ml
    reach = np.zeros(count + 1)
    np.maximum.at(reach, labels, lateral)
    innermost = np.full(count + 1, np.inf)
    np.minimum.at(innermost, labels, lateral)
    contact = np.full(count + 1, np.inf)
    np.minimum.at(contact, labels, lateral - column_edge)
    side_of = np.zeros(count + 1)
    side_of[labels] = np.sign(signed)
    # cut by the field of view: the next voxel further out is outside the scan or the crop
    further = x + x_lo + np.sign(signed).astype(np.int64)
    outside = (further < 0) | (further >= width)
    if field_of_view is not None:
        ok = ~outside
        outside[ok] = ~np.asarray(field_of_view, dtype=bool)[z[ok], y[ok] + y_lo, further[ok]]
    cut = np.zeros(count + 1, dtype=bool)
    np.logical_or.at(cut, labels, outside)
    run = reach - innermost
    touching_column = contact <= RIB_CONTACT_MM + float(spacing.max())
    long_enough = (run >= RIB_MIN_RUN_MM) | (cut & (run >= RIB_MIN_CUT_RUN_MM) & (volume >= RIB_MIN_CUT_ML))
    keep = (volume <= RIB_MAX_ML) & touching_column & long_enough
    keep[0] = False
    # a piece too large for a rib that runs from the column outward: ribs joined by a bone lying
    # on them (a scapula close to the spine): its parts within RIB_NECK_MM of the column, each no
    # taller than a rib neck, are the ribs
    merged = (volume > RIB_MAX_ML) & touching_column & long_enough
    merged[0] = False
    if merged.any():
        zone = merged[labels] & (lateral - column_edge <= RIB_NECK_MM)
        # where such a piece lies beside the column, a rib not found there may be hidden in it
        for side, sign in (("right", -1.0), ("left", 1.0)):
            view[side][np.unique(z[zone & (np.sign(signed) == sign)])] = 0.0
        necks = np.zeros(pieces.shape, dtype=bool)
        necks[z[zone], y[zone], x[zone]] = True
        neck_pieces, neck_count = ndimage.label(necks, structure=_CUBE)
        if neck_count:
            parent = np.zeros(neck_count + 1, dtype=np.int64)
            parent[neck_pieces[z[zone], y[zone], x[zone]]] = labels[zone]
            labels = np.where(merged[labels], 0, labels)
            labels[zone] = count + neck_pieces[z[zone], y[zone], x[zone]]
            total = count + neck_count
            volume = np.bincount(labels, minlength=total + 1) * voxel_ml
            extend = lambda values, fill: np.concatenate([values, fill[parent[1:]] if fill is not None else np.zeros(neck_count, dtype=values.dtype)])  # noqa: E731
            reach, run, cut, side_of = extend(reach, reach), extend(run, run), extend(cut, cut), extend(side_of, side_of)
            innermost = np.full(total + 1, np.inf)
            np.minimum.at(innermost, labels, lateral)
            contact = np.full(total + 1, np.inf)
            np.minimum.at(contact, labels, lateral - column_edge)
            tall = np.zeros(total + 1)
            z_low = np.full(total + 1, np.inf)
            z_high = np.full(total + 1, -np.inf)
            np.minimum.at(z_low, labels, z * spacing[0])
            np.maximum.at(z_high, labels, z * spacing[0])
            tall[count + 1 :] = (z_high - z_low)[count + 1 :]
            neck_ok = (contact[count + 1 :] <= RIB_CONTACT_MM + float(spacing.max())) & (volume[count + 1 :] >= 0.1) & (tall[count + 1 :] <= 1.5 * float(np.median(radius)) + 2.0 * spacing[0])
            keep = np.concatenate([np.where(merged, False, keep), neck_ok])
            keep[0] = False
            count = total
    mean_hu = np.bincount(labels, weights=ct_hu[box].reshape(-1)[flat].astype(np.float64), minlength=count + 1) / np.maximum(np.bincount(labels, minlength=count + 1), 1)
    neck = keep[labels] & (lateral <= innermost[labels] + RIB_LEVEL_MM)
    if not neck.any():
        return RibScan([], view)
    points = np.stack([z[neck] * spacing[0], (y[neck] + y_lo) * spacing[1], (x[neck] + x_lo) * spacing[2]], axis=1)
    arc, _, _, _ = centreline_frame(points, line)
    counts = np.bincount(labels[neck], minlength=count + 1)
    level = np.bincount(labels[neck], weights=arc, minlength=count + 1) / np.maximum(counts, 1)
    # the segment a rib touches: the labels within RIB_TOUCH_MM of its innermost 4 mm
    segments_box = np.asarray(instances)[box] if np.asarray(instances).dtype != bool else None
    reach_voxels = np.ceil(RIB_TOUCH_MM / spacing).astype(int) + 1
    found: List[Rib] = []
    for piece in np.flatnonzero(keep):
        touched = 0
        if segments_box is not None:
            inner_end = (labels == piece) & (lateral <= innermost[piece] + 4.0)
            lo = np.maximum(np.array([z[inner_end].min(), y[inner_end].min(), x[inner_end].min()]) - reach_voxels, 0)
            hi = np.minimum(np.array([z[inner_end].max(), y[inner_end].max(), x[inner_end].max()]) + reach_voxels + 1, pieces.shape)
            window = tuple(slice(a, b) for a, b in zip(lo, hi))
            near = np.ones(hi - lo, dtype=bool)
            near[z[inner_end] - lo[0], y[inner_end] - lo[1], x[inner_end] - lo[2]] = False
            close_by = ndimage.distance_transform_edt(near, sampling=spacing) <= RIB_TOUCH_MM
            values = segments_box[window][close_by]
            values = values[values > 0]
            if values.size:
                touched = int(np.bincount(values).argmax())
        found.append(Rib("left" if side_of[piece] > 0 else "right", float(level[piece]), float(reach[piece]), float(volume[piece]), bool(cut[piece]), float(run[piece]), float(contact[piece]), touched, float(mean_hu[piece])))
    # pieces of one rib (a rib broken by the threshold) count once: keep the longer piece
    found.sort(key=lambda rib: -rib.reach_mm)
    ribs: List[Rib] = []
    for rib in found:
        close = 0.8 * float(line.radius_at_arc(rib.arc_mm))
        same = [other for other in ribs if other.side == rib.side and abs(other.arc_mm - rib.arc_mm) < close]
        if not same:
            ribs.append(rib)
        elif not same[0].segment:
            same[0].segment = rib.segment
    ribs.sort(key=lambda rib: -rib.arc_mm)
    return RibScan(ribs, view, segments_box is not None)


def bone_beyond_column(instances: np.ndarray, ct_hu: np.ndarray, line: Centreline, geometry: Sequence[VertebraGeometry], spacing_mm, field_of_view: Optional[np.ndarray] = None, *, caudal: bool = True, length_mm: float = 25.0, gap_mm: float = 3.0, also_bone: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Bone outside the mask just beyond the caudal (or cranial) end of the vertebral column.

    The region continues the centreline over ``length_mm``, starting ``gap_mm`` past the
    last (first) vertebral body: the next body, the S1 body or the skull base would lie
    there. Its bone (CT >= :data:`END_BONE_HU`, not within one voxel of the mask) is measured
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
        ``piece_ml`` (largest connected bone piece, within the working crop and 80 mm of the
        region along z, that the region's bone belongs to).
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

    def is_bone(part: slice) -> np.ndarray:
        found = ct_hu[part] >= END_BONE_HU
        return found if also_bone is None else found | np.asarray(also_bone[part], dtype=bool)

    bone = is_bone(slice(z_lo, z_hi)).reshape(-1)[tube[region]] & fov & ~spine_near
    central = bone & (np.abs(left) <= radius) & (np.abs(posterior) <= radius)
    lateral = bone & (np.abs(left) >= 1.6 * radius) & (posterior <= 1.0 * radius) & (posterior >= -0.5 * radius)
    result["fov_share"] = float(min(1.0, fov.sum() / max(expected_voxels, 1.0)))
    result["central_ml"] = float(central.sum() * voxel_ml)
    result["lateral_ml"] = float(lateral.sum() * voxel_ml)
    result["lateral_sides"] = int(np.sum(lateral & (left > 0)) * voxel_ml >= 1.0) + int(np.sum(lateral & (left < 0)) * voxel_ml >= 1.0)
    if bone.any():
        # the bone pieces the region's bone belongs to, within 80 mm of the region along z
        margin = int(math.ceil(80.0 / spacing[0]))
        part = slice(max(0, z_lo - margin), min(instances.shape[0], z_hi + margin))
        all_bone = is_bone(part) & inside_fov[part] & ~ndimage.binary_dilation(instances[part] > 0, structure=_CUBE)
        pieces, _ = ndimage.label(all_bone, structure=_CUBE)
        sizes = np.bincount(pieces.ravel())
        touched = np.unique(pieces.reshape(-1)[flat[bone] - part.start * instances.shape[1] * instances.shape[2]])
        touched = touched[touched > 0]
        if touched.size:
            result["piece_ml"] = float(sizes[touched].max() * voxel_ml)
    return result


#: A lowest segment with less than this share of the column's typical vertebra volume ...
CAUDAL_FRAGMENT_VOLUME_SHARE = 0.4
#: ... and a body narrower than this share of the body above it is a piece of the sacrum.
CAUDAL_FRAGMENT_RADIUS_SHARE = 0.8


def caudal_fragment(instances: np.ndarray, line: Centreline, spacing_mm, field_of_view: Optional[np.ndarray] = None, geometry: Optional[Sequence[VertebraGeometry]] = None) -> int:
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
    geometry : list of VertebraGeometry, optional
        :func:`vertebra_geometry` of ``instances`` when already computed.

    Returns
    -------
    int
        The instance number of the fragment (the highest number), or 0.
    """
    from scipy import ndimage

    if geometry is None:
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
#: Spread of the body radius around :data:`EXPECTED_BODY_RADIUS_MM` times the patient's scale
#: (:data:`HEIGHT_SCALES`), within one spine (natural-log units).
BODY_RADIUS_LOG_SIGMA = 0.15
#: Prior of the three chains: standard, with a 6th lumbar vertebra, with a 13th thoracic one.
CHAIN_PRIORS = {"standard": 0.92, "L6": 0.05, "T13": 0.03}
#: Pseudo-id of a first segment holding C1 and C2 together (C1 has no body, so no disc separates them).
ATLAS_AXIS = -1
#: Prior of a top segment that is C1 alone, relative to C1 and C2 arriving together: a mask
#: with a gap between the atlas and the dens leaves the atlas a segment of its own.
ATLAS_ALONE_PRIOR = 0.2

#: Body height and the disc below it (mm, adult averages) at anchor levels along the chain
#: (position 0 = C1 ... 23 = L5; T13 sits at 18.5, L6 at 23.5); between anchors they are
#: interpolated. Body height grows from about 13 mm (C3) to 27 mm (L3-L5), discs from 4 to 11 mm.
_HEIGHT_ANCHORS = (np.array([2.0, 6.0, 7.0, 12.0, 18.0, 21.0, 23.0]), np.array([13.0, 14.0, 16.0, 20.0, 24.0, 27.0, 27.0]), np.array([5.0, 5.0, 4.0, 5.0, 7.0, 10.0, 11.0]))
#: Arc length (mm) of the C2 segment (its body and the dens; C1 and C2 arrive as one segment) and of C1 alone.
C2_SEGMENT_MM, C1_SEGMENT_MM = 30.0, 10.0
#: Patient scale of the vertebra heights: candidates and the spread of their prior (natural-log units).
HEIGHT_SCALES = np.exp(np.linspace(math.log(0.7), math.log(1.45), 16))
HEIGHT_SCALE_LOG_SIGMA = 0.15
#: Spread of the distance between two vertebra centres around its expected value: a share of
#: that distance plus a constant (mm), once the patient's scale is known.
PITCH_SIGMA_SHARE, PITCH_SIGMA_MM = 0.06, 1.5
#: Spread of a whole vertebra's length along the centreline around its expected body height
#: (natural-log units, at the patient's scale).
BODY_HEIGHT_LOG_SIGMA = 0.15
#: Share of segment distances that fit no naming (segments of a mask in pieces), spread evenly
#: over twice the expected distance.
PITCH_OUTLIER_SHARE = 0.05
#: Prior of one vertebra missing from the mask between two segments (per missing level), and of
#: a segment being a further piece of the vertebra above it (a mask in fragments).
MISSING_LEVEL_PRIOR = 0.05
FRAGMENT_PRIOR = 0.1
#: Highest confidence reported for names that no anchor confirms (sacrum, the last or first
#: rib-bearing level, skull base, a vertebrae network): body size and spacing alone are
#: confidently wrong when a patient is large or small as a whole (a T2-T8 slab of a large
#: phantom scores 0.87 for T6-T12).
UNANCHORED_CONFIDENCE = 0.5
#: Expected number of rib pieces per side that :func:`find_ribs` finds where no rib-bearing level is.
RIB_FALSE_DETECTIONS = 0.05


def _chains() -> Dict[str, Tuple[int, ...]]:
    from SpineContextSegLib.labels import L6_ID, SACRUM_ID, STANDARD_CHAIN, T13_ID

    standard = tuple(v for v in STANDARD_CHAIN if v != SACRUM_ID)
    t12 = standard.index(19)
    return {"standard": standard, "L6": standard + (L6_ID,), "T13": standard[: t12 + 1] + (T13_ID,) + standard[t12 + 1 :]}


#: P(:func:`find_ribs` reports a rib on one side | a level without ribs): its false positives,
#: mostly iliac crests and sacral alae cut by a narrow field of view beside L4-L5.
RIB_FALSE_POSITIVE_RATE = 0.08


def _rib_probability(verse_id: int) -> float:
    """P(a rib is found on one side | level): thoracic levels carry ribs; C7 and L1 rarely do.

    Elsewhere a "rib" is a false detection: beside C1-C6 nothing looks like one (the
    transverse processes belong to the mask), beside L2-L5 an iliac crest or sacral ala cut by a
    narrow field of view may (:data:`RIB_FALSE_POSITIVE_RATE`).
    """
    if 8 <= verse_id <= 19 or verse_id == 28:
        return 0.9
    if verse_id in (7, 20):  # cervical ribs, lumbar ribs; the first and the last rib pass close by
        return RIB_FALSE_POSITIVE_RATE + 0.04
    if verse_id <= 6:
        return 0.02
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


@dataclass
class _ChainModel:
    """The states of one chain for the sequence step: names, positions and expected geometry."""

    name: str
    names: List[int]  # state -> name (ATLAS_AXIS first, then the chain's VerSe ids)
    position: np.ndarray  # index along the chain (ATLAS_AXIS counts as C2)
    centre_mm: np.ndarray  # expected body centre, mm caudal of C2's at scale 1
    height_mm: np.ndarray  # expected body (segment) height at scale 1
    rib: np.ndarray  # P(rib found on one side | state)


def _chain_model(name: str, chain: Sequence[int]) -> _ChainModel:
    from SpineContextSegLib.labels import L6_ID, T13_ID

    anchor_position, anchor_height, anchor_disc = _HEIGHT_ANCHORS
    positions = []
    for index, verse_id in enumerate(chain):
        if verse_id == T13_ID:
            positions.append(18.5)
        elif verse_id == L6_ID:
            positions.append(23.5)
        else:
            positions.append(float(index - (1 if name == "T13" and index > chain.index(T13_ID) else 0)))
    heights = np.interp(positions, anchor_position, anchor_height)
    discs = np.interp(positions, anchor_position, anchor_disc)
    heights[0], heights[1] = C1_SEGMENT_MM, C2_SEGMENT_MM
    centre = np.zeros(len(chain))
    centre[0] = -C1_SEGMENT_MM
    for index in range(2, len(chain)):
        centre[index] = centre[index - 1] + 0.5 * heights[index - 1] + discs[index - 1] + 0.5 * heights[index]
    names = [ATLAS_AXIS] + list(chain)
    return _ChainModel(
        name,
        names,
        np.array([1] + list(range(len(chain))), dtype=np.float64),
        np.concatenate([[centre[1]], centre]),
        np.concatenate([[heights[1]], heights]),
        np.array([_rib_probability(2)] + [_rib_probability(v) for v in chain]),
    )


def _logsumexp(values: np.ndarray, axis) -> np.ndarray:
    peak = np.max(values, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(peak, axis=axis) + np.log(np.sum(np.exp(values - peak), axis=axis))


def _rib_count_log(rib: np.ndarray, found: int) -> np.ndarray:
    """log P(``found`` ribs on one side | the levels ``u .. v-1`` of a chain), for every ``u <= v``.

    Each level ``m`` carries a rib that :func:`find_ribs` finds with probability ``rib[m]``;
    on top, false detections are Poisson with mean :data:`RIB_FALSE_DETECTIONS`. Returns an
    (M + 1, M + 1) table for M levels (entries with ``u > v`` are -inf).
    """
    levels = rib.size
    table = np.full((levels + 1, levels + 1), -np.inf)
    counts = np.arange(found + 1)
    false = np.exp(counts * math.log(RIB_FALSE_DETECTIONS) - RIB_FALSE_DETECTIONS - np.array([math.lgamma(c + 1) for c in counts]))
    for u in range(levels + 1):
        dist = false.copy()  # P(k ribs so far), k = 0 .. found (more than found cannot come back down)
        with np.errstate(divide="ignore"):
            table[u, u] = math.log(dist[found]) if dist[found] > 0 else -np.inf
            for v in range(u, levels):
                dist = dist * (1.0 - rib[v]) + np.concatenate([[0.0], dist[:-1]]) * rib[v]
                table[u, v + 1] = math.log(dist[found]) if dist[found] > 0 else -np.inf
    return table


def _body_range(arcs: np.ndarray, step: float) -> Tuple[float, float]:
    """Arc range (1st-99th percentile) of the stretch of a body's core voxels around their median.

    Core voxels far along the centreline from the rest (a spinous process hanging into the
    centreline's straight continuation below the last body) are left out: the stretch ends at
    the first gap of more than 3 mm without core voxels.
    """
    if arcs.size == 0:
        return math.nan, math.nan
    bins = np.floor((arcs - arcs.min()) / max(step, 0.5)).astype(np.int64)
    occupied = np.bincount(bins) > 0
    centre = int(np.floor((np.median(arcs) - arcs.min()) / max(step, 0.5)))
    gap = max(1, int(round(3.0 / max(step, 0.5))))
    low = high = centre
    while low > 0 and occupied[max(0, low - gap) : low].any():
        low -= 1
    while high < occupied.size - 1 and occupied[high + 1 : high + 1 + gap].any():
        high += 1
    inside = arcs[(bins >= low) & (bins <= high)]
    return tuple(float(v) for v in np.percentile(inside if inside.size else arcs, [1, 99]))


def rib_evidence(geometry: Sequence[VertebraGeometry], scan: RibScan, line: Centreline) -> Tuple[List[Dict[str, object]], List[Dict[str, object]]]:
    """Ribs of :func:`find_ribs` given to the segments they belong to, the rest to the gaps between them.

    A rib belongs to the segment its inner end touches (:attr:`Rib.segment`). One that touches
    none but lies level with a segment's body (arc range, widened by a quarter of its length,
    at least 3 mm) is a lower rib passing by that segment and counts nowhere (without segment
    contacts, with a bare mask, it belongs to the segment with the nearer centre); one beside
    no segment belongs to a vertebra missing from the mask. One rib per side
    and segment (a second one is a rib of a level the mask misses). Ribs that belong to no
    segment are counted in the gap they lie in: between two segments, above the top one or
    below the lowest one.

    Returns
    -------
    per_segment : list of dict, one per segment (top first)
        ``"right"``, ``"left"``: ``True`` (a rib), ``False`` (none, and the scan shows the
        region beside the segment), ``None`` (that region is mostly outside the field of view);
        ``"rib_arcs"``: [(side, arc)] of its ribs.
    gaps : list of dict, ``len(geometry) + 1`` (gap 0 above the top segment, gap i below segment i)
        ``"right"``, ``"left"``: number of ribs found there, or ``None`` where the scan shows
        less than half of that stretch beside the column; ``"arcs"``.
    """
    count = len(geometry)
    centres = np.array([0.5 * (g.arc_low_mm + g.arc_high_mm) for g in geometry])
    per_segment: List[Dict[str, object]] = [{"right": None, "left": None, "rib_arcs": []} for _ in range(count)]
    gaps: List[Dict[str, object]] = [{"right": 0, "left": 0, "arcs": []} for _ in range(count + 1)]
    slice_arc = line.arc_mm
    taken: Dict[Tuple[int, str], Rib] = {}
    spare: List[Rib] = []
    for rib in scan.ribs:
        best = None
        if 0 < rib.segment <= count and np.isfinite(centres[rib.segment - 1]):
            best = rib.segment - 1  # it touches that segment
        for index, g in enumerate(geometry if best is None else ()):
            if not np.isfinite(centres[index]):
                continue
            widen = max(3.0, 0.25 * (g.arc_high_mm - g.arc_low_mm))
            if g.arc_low_mm - widen <= rib.arc_mm <= g.arc_high_mm + widen:
                if best is None or abs(rib.arc_mm - centres[index]) < abs(rib.arc_mm - centres[best]):
                    best = index
        if best is None:
            spare.append(rib)
            continue
        if rib.segment == 0 and scan.touch_known:
            continue  # beside a segment without touching it: a lower rib passing by, not its own
        other = taken.get((best, rib.side))
        if other is None:
            taken[(best, rib.side)] = rib
        elif abs(rib.arc_mm - centres[best]) < abs(other.arc_mm - centres[best]):
            taken[(best, rib.side)] = rib
            spare.append(other)
        else:
            spare.append(rib)
    for index, g in enumerate(geometry):
        levels = (slice_arc >= g.arc_low_mm) & (slice_arc <= g.arc_high_mm)
        for side in ("right", "left"):
            if (index, side) in taken:
                per_segment[index][side] = True
                per_segment[index]["rib_arcs"].append((side, round(taken[(index, side)].arc_mm, 1)))
            elif levels.any() and float(np.mean(scan.view[side][levels])) >= 0.5:
                per_segment[index][side] = False
    valid = np.isfinite(centres)
    for rib in spare:
        gap = int(np.count_nonzero(centres[valid] > rib.arc_mm))  # segments above it
        gap = int(np.flatnonzero(valid)[gap - 1]) + 1 if gap > 0 else 0
        gaps[gap][rib.side] = int(gaps[gap][rib.side]) + 1
        gaps[gap]["arcs"].append((rib.side, round(rib.arc_mm, 1)))
    # where the scan does not show the stretch beside the column, a missing rib says nothing
    bounds = [np.inf] + [float(g.arc_low_mm) if np.isfinite(g.arc_low_mm) else np.nan for g in geometry]
    lows = [float(g.arc_high_mm) if np.isfinite(g.arc_high_mm) else np.nan for g in geometry] + [-np.inf]
    for index in range(count + 1):
        high, low = bounds[index], lows[index]
        stretch = (slice_arc < high) & (slice_arc > low) if np.isfinite(high) or np.isfinite(low) else np.zeros(slice_arc.shape, dtype=bool)
        for side in ("right", "left"):
            if gaps[index][side] == 0 and (not stretch.any() or float(np.mean(scan.view[side][stretch])) < 0.5):
                gaps[index][side] = None
    return per_segment, gaps


def _log_likelihood_tables(
    model: _ChainModel, geometry: Sequence[VertebraGeometry], ribs: Sequence[Dict[str, object]], gaps: Sequence[Dict[str, object]], below: Dict[str, object], above: Dict[str, object],
    votes: Optional[np.ndarray], visible_arc: Tuple[float, float],
):
    """Log-likelihood tables of the sequence step for one chain, per scale of :data:`HEIGHT_SCALES`.

    Returns ``(start, emission, transition, end)``: (S, J), (S, N, J), list of N-1 (S, J, J),
    (S, J) for S scales, N segments (top first) and J states of ``model``.
    """
    names = model.names
    states = len(names)
    count = len(geometry)
    scales = HEIGHT_SCALES[:, None]
    centre = np.array([0.5 * (g.arc_low_mm + g.arc_high_mm) for g in geometry])
    length = np.array([max(g.arc_high_mm - g.arc_low_mm, 0.0) for g in geometry])
    # a segment much shorter than its neighbours is a piece of a vertebra: a rib missing beside it says little
    # (the neighbours' upper lengths and volumes: a stretch of fragments must not set the norm)
    typical = np.array([np.percentile(length[max(0, i - 4) : i + 5], 80) for i in range(count)])
    piece = length < 0.55 * typical
    volume = np.array([g.volume_ml for g in geometry])
    small = volume < 0.5 * np.array([np.percentile(volume[max(0, i - 4) : i + 5], 80) for i in range(count)])
    truncated = np.array([g.truncated for g in geometry])
    whole = ~piece & ~small & ~truncated  # a whole vertebra: its length is its body height
    cut_above = truncated & (np.array([g.arc_high_mm for g in geometry]) >= visible_arc[0] - 5.0)
    emission = np.zeros((count, states))
    for i, evidence in enumerate(ribs):
        for side in ("right", "left"):
            if evidence.get(side) is True:
                emission[i] += np.log(model.rib)
            elif evidence.get(side) is False and (truncated[i] or not piece[i]) and not cut_above[i]:
                # (a vertebra the scan cuts above has lost the upper part where its ribs articulate)
                emission[i] += np.log(1.0 - model.rib)
        if votes is not None and votes[i].sum() > 0:
            emission[i] += [_network_log_probability(name, votes[i]) for name in names]
    # body size: the patient's scale times the typical radius of the level; the spread is the
    # variation within one spine (people differ in size as a whole: that is the scale's prior)
    expected_radius = np.array([EXPECTED_BODY_RADIUS_MM.get(2 if name == ATLAS_AXIS else name, np.nan) for name in names])
    radius = np.array([g.body_radius_mm if g.body_radius_mm > 0 else np.nan for g in geometry])
    radius_sigma = BODY_RADIUS_LOG_SIGMA * np.where(truncated | piece | small, 1.6, 1.0)  # cut by the field of view, or a piece: less reliable
    with np.errstate(invalid="ignore"):
        size_z = (np.log(radius)[None, :, None] - np.log(scales[:, :, None] * expected_radius[None, None, :])) / radius_sigma[None, :, None]
    size_term = np.nan_to_num(-0.5 * size_z ** 2, nan=0.0)  # (S, N, J)
    height = scales * model.height_mm[None, :]  # (S, J)
    # a whole vertebra is as long as the body it is named after (at the patient's scale); any
    # segment much longer than that is more than one vertebra
    excess = np.maximum(0.0, length[None, :, None] - (1.3 * height[:, None, :] + 2.0))
    emission = emission[None] + size_term - 0.5 * (excess / (0.1 * height[:, None, :] + 1.0)) ** 2
    with np.errstate(divide="ignore"):
        ratio = np.log(np.maximum(length, 1.0))[None, :, None] - np.log(height)[:, None, :]
    # (C1 and C2 excepted: the dens goes with C2 or with C1, or the mask misses it)
    regular = np.array([name not in (ATLAS_AXIS, 1, 2) for name in names])
    measured = whole[None, :, None] & regular[None, None, :]
    emission = emission - np.where(measured, 0.5 * (ratio / BODY_HEIGHT_LOG_SIGMA) ** 2, 0.0)
    # a piece of a vertebra (or one cut by the field of view) may lie anywhere inside it
    loose = np.where(measured, 0.0, 0.5 * np.maximum(0.0, height[:, None, :] - length[None, :, None]))  # (S, N, J)
    # ribs found in a gap: the levels strictly between two states carry them
    chain_rib = model.rib[1:]  # per chain level (ATLAS excluded)
    chain_index = model.position.astype(np.int64)  # ATLAS stands for C2 (chain index 1)
    between_low = np.minimum(chain_index[:, None] + 1, chain_index[None, :])  # (J, J): levels [low, high)
    between_high = np.maximum(chain_index[None, :], between_low)
    count_tables: Dict[int, np.ndarray] = {}

    def rib_count_log(found: int) -> np.ndarray:
        if found not in count_tables:
            count_tables[found] = _rib_count_log(chain_rib, found)
        return count_tables[found]
    levels_apart = model.position[None, :] - model.position[:, None]
    first_only = np.array([name in (ATLAS_AXIS, 1) for name in names])
    valid = ((levels_apart >= 1) & ~first_only[None, :]) | (np.eye(states, dtype=bool))
    expected = scales[:, :, None] * (model.centre_mm[None, None, :] - model.centre_mm[None, :, None])  # (S, J, J)
    transitions = []
    for i in range(count - 1):
        distance = centre[i] - centre[i + 1]
        slack = loose[:, i, :, None] + loose[:, i + 1, None, :]
        sigma = PITCH_SIGMA_SHARE * np.abs(expected) + PITCH_SIGMA_MM
        residual = np.maximum(0.0, np.abs(distance - expected) - slack)
        fits = -0.5 * (residual / sigma) ** 2 - np.log(2.0 * slack + 2.5066 * sigma)
        # a mask in pieces places some segments anywhere: a broad floor keeps one such distance
        # from outweighing the anatomical anchors
        floor = math.log(PITCH_OUTLIER_SHARE) - np.log(2.0 * np.abs(expected) + 20.0)
        table = np.logaddexp(math.log(1.0 - PITCH_OUTLIER_SHARE) + fits, floor) + np.maximum(levels_apart - 1, 0)[None] * math.log(MISSING_LEVEL_PRIOR)
        # a further piece of the vertebra above: both fit inside one vertebra
        union = geometry[i].arc_high_mm - geometry[i + 1].arc_low_mm
        own = height  # (S, J)
        fragment = math.log(FRAGMENT_PRIOR) - np.log(own) - 0.5 * (np.maximum(0.0, union - 1.1 * own) / (0.08 * own + 1.5)) ** 2
        for side in ("right", "left"):
            if ribs[i].get(side) is True and ribs[i + 1].get(side) is True:
                fragment = fragment + math.log(RIB_FALSE_DETECTIONS)  # two ribs on one side of one vertebra
        diagonal = np.arange(states)
        table[:, diagonal, diagonal] = fragment
        for side in ("right", "left"):
            found = gaps[i + 1].get(side)
            if found is not None:
                table = table + rib_count_log(int(found))[between_low, between_high][None]
        table[:, ~valid] = -np.inf
        transitions.append(table)
    # the top segment: C1 (with C2, or alone), the skull base above it, ribs above it
    start = np.zeros((len(HEIGHT_SCALES), states))
    start[:, names.index(1)] += math.log(ATLAS_ALONE_PRIOR)
    if above.get("skull_found"):
        start += np.array([math.log(0.8) if 1 in _verse_ids_of(name) else math.log(0.05) for name in names])[None]
    end = np.zeros((len(HEIGHT_SCALES), states))
    last = names[-1]
    if below.get("bone_found"):
        # the sacrum lies below the last lumbar vertebra; below any other one the next vertebra
        # would have to be missing from the mask
        end += np.array([math.log(0.9) if name == last else math.log(0.15) for name in names])[None]
        if below.get("alae_found"):
            end += np.array([math.log(0.7) if name == last else math.log(0.2) for name in names])[None]
    # ribs beyond the ends of the column: levels above the top segment (below the lowest one)
    # that would lie wholly inside the scanned stretch of the centreline carry them
    top, bottom = visible_arc
    order = np.arange(1, states)
    levels = order.size
    for table, gap, anchor, sign in ((start, gaps[0], 0, 1.0), (end, gaps[-1], count - 1, -1.0)):
        if not np.isfinite(centre[anchor]) or (gap.get("right") is None and gap.get("left") is None):
            continue
        # (S, J, M): the arc of chain level m when the end segment is state j
        position = centre[anchor] + scales[:, :, None] * (model.centre_mm[None, :, None] - model.centre_mm[None, None, order])
        beyond = (model.position[None, :, None] - model.position[None, None, order]) * sign > 0
        beyond[0, 0, names.index(1) - 1] = False  # C1 is part of a C1+C2 segment
        half = 0.5 * scales[:, :, None] * model.height_mm[None, None, order] + 5.0  # the whole level inside the scan
        seen = (position + half <= top) & (position - half >= bottom) & beyond
        # the seen levels are one run along the chain: [low, high)
        any_seen = seen.any(axis=2)
        low = np.where(any_seen, np.argmax(seen, axis=2), 0)
        high = np.where(any_seen, levels - np.argmax(seen[:, :, ::-1], axis=2), 0)
        for side in ("right", "left"):
            found = gap.get(side)
            if found is not None:
                table += rib_count_log(int(found))[low, high]
    return start, emission, transitions, end


def _forward_backward(start, emission, transitions, end):
    """Sum-product and max-product passes over the segments for every scale at once.

    Returns ``(log_z, marginals, best_paths, best_scores)``: (S,), (S, N, J) posterior state
    probabilities per scale, (S, N) Viterbi state paths, (S,) their log scores.
    """
    scales, count, states = emission.shape
    alpha = np.empty((scales, count, states))
    alpha[:, 0] = start + emission[:, 0]
    delta = alpha[:, 0].copy()
    pointers = np.zeros((count, scales, states), dtype=np.int64)
    for i, table in enumerate(transitions):
        alpha[:, i + 1] = _logsumexp(alpha[:, i][:, :, None] + table, axis=1) + emission[:, i + 1]
        candidates = delta[:, :, None] + table
        pointers[i + 1] = np.argmax(candidates, axis=1)
        delta = np.max(candidates, axis=1) + emission[:, i + 1]
    beta = np.zeros((scales, count, states))
    beta[:, -1] = end
    for i in range(count - 2, -1, -1):
        beta[:, i] = _logsumexp(transitions[i] + (emission[:, i + 1] + beta[:, i + 1])[:, None, :], axis=2)
    log_z = _logsumexp(alpha[:, -1] + end, axis=1)
    with np.errstate(invalid="ignore"):
        marginals = np.exp(alpha + beta - log_z[:, None, None])
    marginals = np.nan_to_num(marginals)
    final = delta + end
    paths = np.zeros((scales, count), dtype=np.int64)
    paths[:, -1] = np.argmax(final, axis=1)
    for i in range(count - 1, 0, -1):
        paths[:, i - 1] = pointers[i][np.arange(scales), paths[:, i]]
    return log_z, marginals, paths, np.max(final, axis=1)


def _path_log_scores(path: np.ndarray, start, emission, transitions, end) -> np.ndarray:
    """Log score (S,) of one state path under every scale."""
    steps = np.arange(len(path))
    score = start[:, path[0]] + emission[:, steps, path].sum(axis=1) + end[:, path[-1]]
    for i, table in enumerate(transitions):
        score = score + table[:, path[i], path[i + 1]]
    return score


#: Bone threshold (HU) beyond the ends of the column (:func:`bone_beyond_column`): lower than
#: :data:`BONE_HU` so that the cancellous S1 body of a thick-slice CT counts.
END_BONE_HU = 150.0
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


def _visible_arc(line: Centreline, spacing: np.ndarray, field_of_view: Optional[np.ndarray]) -> Tuple[float, float]:
    """(top, bottom) arc of the stretch of the centreline inside the field of view."""
    if field_of_view is None:
        return float(line.arc_mm[-1]), float(line.arc_mm[0])
    depth, height, width = field_of_view.shape
    rows = np.clip(np.round(line.y_mm / spacing[1]).astype(int), 0, height - 1)
    columns = np.clip(np.round(line.x_mm / spacing[2]).astype(int), 0, width - 1)
    inside = np.asarray(field_of_view, dtype=bool)[np.arange(depth), rows, columns]
    if not inside.any():
        return float(line.arc_mm[-1]), float(line.arc_mm[0])
    seen = np.flatnonzero(inside)
    return float(line.arc_mm[seen[-1]]), float(line.arc_mm[seen[0]])


def name_vertebrae(
    instances: np.ndarray, ct_hu: np.ndarray, spacing_mm, *, field_of_view: Optional[np.ndarray] = None, centreline: Optional[Centreline] = None,
    sacral_fragment: Optional[np.ndarray] = None, name_votes: Optional[np.ndarray] = None, geometry: Optional[Sequence[VertebraGeometry]] = None,
    timings: Optional[Dict[str, float]] = None,
) -> Tuple[np.ndarray, Dict[str, object]]:
    """Give every vertebra its VerSe id, in anatomical order.

    A sequence step (forward-backward and Viterbi over the segments, top to bottom) chooses
    the most likely names along the standard chain (C1-L5), the chain with L6 and the chain
    with T13 (:data:`CHAIN_PRIORS`), for each patient scale of the vertebra heights
    (:data:`HEIGHT_SCALES`, prior :data:`HEIGHT_SCALE_LOG_SIGMA`). Consecutive segments are
    the next level, or levels further on with the levels between them missing from the mask
    (prior :data:`MISSING_LEVEL_PRIOR` per level), or a further piece of the same vertebra
    (:data:`FRAGMENT_PRIOR`, when both fit inside one vertebra). The evidence:

    * the distance between consecutive segments' body centres along the centreline against the
      expected distance of their names (body heights and discs, :data:`_HEIGHT_ANCHORS`, times
      the scale; a segment shorter than its vertebra may lie anywhere inside it): this counts
      the vertebrae a gap in the mask hides;
    * ribs (:func:`find_ribs`, found in the CT whether or not the mask holds their vertebra):
      each side with a rib favours a thoracic level (T1-T12, T13), each side seen without one
      favours the others; ribs in a gap between segments, or beyond the top or lowest one,
      must be matched by rib-bearing levels missing there. So the names count down from the
      first rib (T1) and up from the last (T12);
    * sacrum (:func:`bone_beyond_column` below the column): bone right below the lowest
      vertebra, outside the mask, favours "the lowest vertebra is the last lumbar one"
      (L5, or L6 on the L6 chain), more so with alae on both sides;
    * skull base (bone above the column belonging to one piece larger than 150 ml) favours
      "the top segment is C1" (C1 has no body, so C1 and C2 usually arrive as one segment,
      split into C1 and C2 after naming; a run may also start with C1 alone, at a lower
      prior, :data:`ATLAS_ALONE_PRIOR`, for a mask that left a gap under the atlas);
    * body size (:data:`EXPECTED_BODY_RADIUS_MM`) of every vertebra (less weight where the field
      of view cuts it) and segment length: weak cues that separate cervical, thoracic and lumbar levels;
    * with ``name_votes`` (a vertebrae network, ``train --task vertebrae``): the share of each
      segment's voxels the network calls by the run's name (:func:`network_name_shares`,
      floored by :data:`NETWORK_VOTE_FLOOR`). The network proposes names; the sequence keeps
      them in anatomical order, without duplicates.

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
    geometry : list of VertebraGeometry, optional
        :func:`vertebra_geometry` of ``instances`` when already computed.
    timings : dict, optional
        Seconds per stage are added here (``evidence``, ``naming``).

    Returns
    -------
    verse_labels : (D, H, W) uint8
        VerSe ids (1-7 C1-C7, 8-19 T1-T12, 28 T13, 20-25 L1-L6); 0 elsewhere. Pieces of one
        vertebra (segments given the same name) share its id.
    info : dict
        ``names`` and ``verse_ids`` (top to bottom), ``chain`` (``standard``, ``L6``,
        ``T13``), ``confidence`` (posterior probability of the chosen names among all
        namings, 0-1; at most :data:`UNANCHORED_CONFIDENCE` without an anchor), ``anchored`` (an anchor agrees with the names: sacrum, the lowest or
        the first rib-bearing level with a rib-free one beyond it, skull base, or the network),
        ``anchors`` (cues found: ``bone_below``, ``sacral_alae``, ``skull``,
        ``lowest_rib_vertebra``, ``first_rib_vertebra`` as instance numbers, ``ribs_found``),
        ``method`` (the anchors that agree with the chosen names, or ``"body size only"``),
        ``missing_levels`` (names inferred between segments, absent from the mask),
        ``fragments`` (segments that are further pieces of the vertebra above),
        ``height_scale`` (most likely), ``alternatives`` (the next best namings with their
        probabilities), ``evidence`` (per segment: its ``name`` and ``confidence`` (posterior
        probability of that name), ribs, body radius, truncated, and with ``name_votes`` the
        network's name and its share), ``ribs`` (every rib :func:`find_ribs` found: side, arc,
        the segment it touches), ``gap_ribs`` (ribs counted in the gaps between segments),
        ``below``/``above`` (bone beyond the column).
    """
    import time

    from scipy import ndimage

    from SpineContextSegLib.labels import vertebra_by_verse_id

    clock = time.perf_counter()
    spacing = _spacing3(spacing_mm)
    instances = np.asarray(instances).astype(np.int32, copy=False)
    count = int(instances.max()) if instances.size else 0
    if count == 0:
        raise SegmentationError("no_spine_found", "No vertebra to name: the instance map is empty.")
    line = centreline if centreline is not None else body_centreline(ndimage.binary_fill_holes(instances > 0), spacing)
    if geometry is None:
        geometry = vertebra_geometry(instances, line, spacing, field_of_view)
    scan = find_ribs(ct_hu, instances, line, spacing, field_of_view)
    ribs, gaps = rib_evidence(geometry, scan, line)
    below = _end_evidence(bone_beyond_column(instances, ct_hu, line, geometry, spacing, field_of_view, caudal=True, also_bone=sacral_fragment), caudal=True)
    above = _end_evidence(bone_beyond_column(instances, ct_hu, line, geometry, spacing, field_of_view, caudal=False), caudal=False)
    votes = network_name_shares(instances, name_votes, count) if name_votes is not None else None
    visible = _visible_arc(line, spacing, field_of_view)
    if timings is not None:
        timings["evidence"] = timings.get("evidence", 0.0) + time.perf_counter() - clock
        clock = time.perf_counter()

    # the sequence step, per chain and scale
    scale_prior = -0.5 * (np.log(HEIGHT_SCALES) / HEIGHT_SCALE_LOG_SIGMA) ** 2
    scale_prior -= _logsumexp(scale_prior, axis=0)
    runs = []
    for chain_name, chain in _chains().items():
        model = _chain_model(chain_name, chain)
        tables = _log_likelihood_tables(model, geometry, ribs, gaps, below, above, votes, visible)
        log_z, marginals, paths, _ = _forward_backward(*tables)
        runs.append((chain_name, model, tables, log_z + scale_prior + math.log(CHAIN_PRIORS[chain_name]), marginals, paths))
    total = float(_logsumexp(np.concatenate([run[3] for run in runs]), axis=0))
    # candidate namings: the best path of every chain and scale, scored over all scales
    candidates: Dict[Tuple[str, Tuple[int, ...]], float] = {}
    for chain_name, model, tables, weights, _, paths in runs:
        for path in paths:
            key = (chain_name, tuple(int(s) for s in path))
            if key not in candidates:
                scores = _path_log_scores(path, *tables) + scale_prior + math.log(CHAIN_PRIORS[chain_name])
                candidates[key] = float(np.exp(_logsumexp(scores, axis=0) - total))
    ranked = sorted(candidates.items(), key=lambda item: -item[1])
    (best_chain, best_path), confidence = ranked[0]
    model = next(run[1] for run in runs if run[0] == best_chain)
    best_names = [model.names[s] for s in best_path]
    # per segment, the posterior probability of its name (summed over chains and scales)
    name_probability = np.zeros(count)
    for chain_name, run_model, _, weights, marginals, _ in runs:
        share = np.exp(weights - total)  # (S,)
        for i, name in enumerate(best_names):
            columns = [j for j, other in enumerate(run_model.names) if other == name]
            if columns:
                name_probability[i] += float(np.sum(share[:, None] * marginals[:, i, columns]))
    best_scale = None
    for chain_name, _, tables, weights, _, _ in runs:
        if chain_name == best_chain:
            best_scale = float(HEIGHT_SCALES[int(np.argmax(_path_log_scores(np.array(best_path), *tables) + scale_prior))])

    def readable(names: Sequence[int]) -> List[str]:
        return ["C1-C2" if v == ATLAS_AXIS else vertebra_by_verse_id(v).name for v in names]

    models = {run[0]: run[1] for run in runs}

    def span(key: Tuple[str, Tuple[int, ...]]) -> str:
        names = readable([models[key[0]].names[s] for s in key[1]])
        return names[0] if len(names) == 1 else f"{names[0]}-{names[-1]}"

    lookup = np.zeros(count + 1, dtype=np.uint8)
    for value, verse_id in enumerate(best_names, start=1):
        lookup[value] = 2 if verse_id == ATLAS_AXIS else verse_id
    verse_labels = lookup[instances]
    final_names: List[int] = []
    for name in best_names:
        for verse_id in _verse_ids_of(name):
            if verse_id not in final_names:
                final_names.append(verse_id)
    if ATLAS_AXIS in best_names:
        verse_labels = split_atlas_from_axis(verse_labels, line, spacing)
    chain_states = model.names[1:]
    missing: List[int] = []
    for upper, lower in zip(best_path[:-1], best_path[1:]):
        if model.position[lower] - model.position[upper] > 1:
            first = chain_states.index(model.names[upper] if model.names[upper] != ATLAS_AXIS else 2) + 1
            last = chain_states.index(model.names[lower])
            missing.extend(chain_states[first:last])
    fragments = [i + 2 for i in range(count - 1) if best_path[i] == best_path[i + 1]]
    rib_bearing = [i + 1 for i, evidence in enumerate(ribs) if evidence.get("right") or evidence.get("left")]
    lowest_rib = rib_bearing[-1] if rib_bearing else None
    first_rib = rib_bearing[0] if rib_bearing else None
    chain = _chains()[best_chain]
    # the anchors that agree with the chosen names
    deciding = []
    if below["bone_found"] and best_names[-1] == chain[-1]:
        deciding.append("sacrum")
    rib_anchor = False

    def seen_without_ribs(index: int) -> bool:
        return False in (ribs[index].get("right"), ribs[index].get("left")) and not (ribs[index].get("right") or ribs[index].get("left"))

    # the last rib-bearing level is T12 (T13) when a vertebra below it is seen without ribs; the
    # first is T1 when one above it is
    if lowest_rib is not None and best_names[lowest_rib - 1] in (19, 28) and any(best_names[i] in (20, 21) and seen_without_ribs(i) for i in range(lowest_rib, count)):
        deciding.append("ribs")
        rib_anchor = True
    if first_rib is not None and best_names[first_rib - 1] == 8 and any(best_names[i] in (6, 7) and seen_without_ribs(i) for i in range(first_rib - 1)):
        deciding.append("first rib")
        rib_anchor = True
    if not rib_anchor and rib_bearing and all(8 <= best_names[i - 1] <= 19 or best_names[i - 1] == 28 for i in rib_bearing):
        deciding.append("ribs (thoracic)")
    if above["skull_found"] and 1 in _verse_ids_of(best_names[0]):
        deciding.append("skull")
    if votes is not None:
        agreeing = sum(1 for name, shares in zip(best_names, votes) if shares.sum() > 0 and int(np.argmax(shares)) in _verse_ids_of(name))
        if agreeing * 2 > len(best_names):  # the network named most segments as the run does
            deciding.append("network")
    anchored = bool(set(deciding) & {"sacrum", "ribs", "first rib", "skull", "network"})
    if not anchored:
        # body size and spacing alone: people differ in size as a whole by more than neighbours differ
        confidence = min(confidence, UNANCHORED_CONFIDENCE)
        name_probability = np.minimum(name_probability, UNANCHORED_CONFIDENCE)
    if timings is not None:
        timings["naming"] = timings.get("naming", 0.0) + time.perf_counter() - clock
    info: Dict[str, object] = {
        "names": [vertebra_by_verse_id(v).name for v in final_names],
        "verse_ids": [int(v) for v in final_names],
        "chain": best_chain,
        "confidence": round(float(confidence), 3),
        "anchored": anchored,
        "method": "+".join(deciding) if deciding else "body size only",
        "anchors": {
            "bone_below": bool(below["bone_found"]), "sacral_alae": bool(below["alae_found"]), "skull": bool(above["skull_found"]),
            "lowest_rib_vertebra": lowest_rib, "first_rib_vertebra": first_rib, "ribs_found": len(scan.ribs),
        },
        "missing_levels": [vertebra_by_verse_id(v).name for v in missing],
        "fragments": fragments,
        "height_scale": round(best_scale, 2) if best_scale else None,
        "alternatives": [{"names": span(key), "probability": round(p, 3)} for key, p in ranked[1:4]],
        "evidence": [
            {
                "instance": i + 1, "name": readable([best_names[i]])[0], "confidence": round(float(name_probability[i]), 3), "ribs": [ribs[i]["right"], ribs[i]["left"]],
                "body_radius_mm": round(float(g.body_radius_mm), 1), "arc_mm": [round(float(g.arc_low_mm), 1), round(float(g.arc_high_mm), 1)], "truncated": bool(g.truncated), "volume_ml": round(float(g.volume_ml), 1),
            }
            | ({} if votes is None or votes[i].sum() == 0 else {"network": vertebra_by_verse_id(int(np.argmax(votes[i]))).name, "network_share": round(float(votes[i].max()), 2)})
            for i, g in enumerate(geometry)
        ],
        "gap_ribs": [{"below_instance": i, "right": gap["right"], "left": gap["left"]} for i, gap in enumerate(gaps) if gap["arcs"]],
        "ribs": [{"side": rib.side, "arc_mm": round(rib.arc_mm, 1), "segment": rib.segment, "volume_ml": round(rib.volume_ml, 2), "cut_by_fov": rib.cut_by_fov} for rib in scan.ribs],
        "below": below,
        "above": above,
        "unnamed_segments": 0,
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
    from SpineContextSegLib.labels import CRANIO_CAUDAL_ORDER

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

    from SpineContextSegLib.inference.preprocessing import physical_corners, resample_to_reference

    size = np.array(ct_image.GetSize())
    shape = tuple(reversed(reference.GetSize()))
    # the usual case: every voxel centre of the working grid lies inside the CT (a box inside a box)
    centres = [ct_image.TransformPhysicalPointToContinuousIndex(reference.TransformIndexToPhysicalPoint([int(i), int(j), int(k)]))
               for i in (0, shape[2] - 1) for j in (0, shape[1] - 1) for k in (0, shape[0] - 1)]
    if np.all(np.array(centres) >= -0.5 + 1e-6) and np.all(np.array(centres) <= size - 0.5 - 1e-6):
        return np.ones(shape, dtype=bool)
    corners = [ct_image.TransformPhysicalPointToContinuousIndex([float(c) for c in corner]) for corner in physical_corners(reference)]
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
    a canonical grid (:func:`SpineContextSegLib.inference.preprocessing.canonical_reference`,
    isotropic ``spacing_mm``); there :func:`split_vertebrae` and :func:`name_vertebrae` run
    (optionally :func:`segment_upper_sacrum`), and the labels come back onto the mask's own
    grid with nearest neighbour. On that grid the labels are then fitted to the mask: mask
    voxels the resampling left unlabelled take the label of the vertebra they connect to
    (geodesically, inside the mask), voxels outside the mask are cleared (except the sacrum,
    which is not part of the mask) and every label is made one 26-connected piece (except a
    vertebra that the mask itself holds in pieces). A piece
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
        :func:`name_vertebrae`'s info plus ``working_spacing_mm``, ``timings_s`` (seconds per
        stage: resample, split, evidence, naming, sacrum, map_back, total), ``discs`` (count),
        ``unlabelled_ml`` (mask voxels left without a label: islands away from the column),
        ``sacrum_ml``, ``sacral_fragment_in_mask``.

    Raises
    ------
    SegmentationError
        ``no_spine_found`` when the mask is empty.
    """
    import time

    import SimpleITK as sitk

    from SpineContextSegLib.labels import SACRUM_ID
    from SpineContextSegLib.inference.preprocessing import AIR_HU, canonical_reference, physical_corners, resample_to_reference

    timings: Dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = timings.get(stage, 0.0) + now - clock
        clock = now

    mask_full = sitk.GetArrayViewFromImage(mask_image) != 0
    if not mask_full.any():
        raise SegmentationError("no_spine_found", "The spine mask is empty: there are no vertebrae to label.")
    index, size = _working_region(mask_image, mask_full)
    mask_box = _mask_box(mask_full)  # (x, y, z) index and size of the mask's own bounding box
    mask_roi = sitk.Cast(sitk.RegionOfInterest(mask_image, size, index) != 0, sitk.sitkUInt8)
    extent_mm = np.ptp(physical_corners(mask_roi), axis=0)
    spacing = float(spacing_mm or WORKING_SPACING_MM)
    if spacing_mm is None and float(np.prod(extent_mm / spacing)) > MAX_WORKING_VOXELS:
        spacing = float((np.prod(extent_mm) / MAX_WORKING_VOXELS) ** (1.0 / 3.0))
    reference = canonical_reference(mask_roi, [spacing] * 3)
    ct_work = sitk.GetArrayFromImage(resample_to_reference(ct_image, reference, method="linear", default_value=AIR_HU, pixel_type=sitk.sitkFloat32))
    mask_tight = sitk.RegionOfInterest(mask_roi, mask_box[1], [int(i - j) for i, j in zip(mask_box[0], index)])
    mask_work = _resample_into(mask_tight, reference)
    field_of_view = _field_of_view(ct_image, reference)
    if not mask_work.any():  # a mask thinner than the working grid: take its nearest voxels anyway
        raise SegmentationError("no_spine_found", "The spine mask vanishes on the working grid: it is too thin to be a spine.")
    lap("resample")

    instances, details = split_vertebrae(mask_work, ct_work, spacing, return_details=True)
    line = details["centreline"]
    geometry = vertebra_geometry(instances, line, spacing, field_of_view)
    fragment = caudal_fragment(instances, line, spacing, field_of_view, geometry=geometry)
    not_vertebra = instances == fragment if fragment else np.zeros(mask_work.shape, dtype=bool)
    if fragment:
        instances[not_vertebra] = 0
        geometry = geometry[: fragment - 1]
    votes_work = None
    if name_votes is not None:
        votes_work = sitk.GetArrayFromImage(resample_to_reference(name_votes, reference, method="nearest", default_value=0, pixel_type=sitk.sitkUInt8))
    lap("split")
    verse_work, info = name_vertebrae(
        instances, ct_work, spacing, field_of_view=field_of_view, centreline=line, sacral_fragment=not_vertebra, name_votes=votes_work, geometry=geometry, timings=timings,
    )
    clock = time.perf_counter()
    if include_sacrum and "sacrum" in str(info["method"]):
        # the fragment of the mask below L5 is the top of the sacrum (its marrow may lie under SACRUM_HU)
        verse_work[segment_upper_sacrum(verse_work, ct_work, line, spacing, field_of_view) | not_vertebra] = SACRUM_ID
    else:
        verse_work[not_vertebra] = NOT_A_VERTEBRA
    del ct_work, field_of_view
    lap("sacrum")

    # back onto the mask's grid, in the box of the mask and the labels only
    work_image = sitk.GetImageFromArray(verse_work)
    work_image.CopyInformation(reference)
    box_index, box_size = _labels_box(verse_work, reference, mask_image, mask_box)
    mask_part = sitk.RegionOfInterest(mask_roi, box_size, [int(i - j) for i, j in zip(box_index, index)]) if _inside(box_index, box_size, index, size) else sitk.Cast(sitk.RegionOfInterest(mask_image, box_size, box_index) != 0, sitk.sitkUInt8)
    on_part = sitk.GetArrayFromImage(resample_to_reference(work_image, mask_part, method="nearest", default_value=0, pixel_type=sitk.sitkUInt8))
    part_mask = sitk.GetArrayViewFromImage(mask_part) > 0
    sacrum_part = on_part == SACRUM_ID
    claimed = sacrum_part | (on_part == NOT_A_VERTEBRA)  # no vertebra grows into these
    vertebrae_part = np.where(part_mask & ~claimed, on_part, 0).astype(np.int32)
    # mask voxels the nearest-neighbour resampling missed join the vertebra they connect to
    vertebrae_part = grow_labels(vertebrae_part, part_mask & ~claimed)
    # pieces of one vertebra that the mask holds apart (named alike in the sequence step, or an
    # arch that lost its body) stay apart
    pieced = _labels_in_pieces(verse_work)
    vertebrae_part, _ = keep_largest_pieces(vertebrae_part, several_pieces=pieced)
    if sacrum_part.any():
        vertebrae_part[sacrum_part] = SACRUM_ID
        vertebrae_part, _ = keep_largest_pieces(vertebrae_part, several_pieces=pieced)
    out = np.zeros(mask_full.shape, dtype=np.uint8)
    box = tuple(slice(i, i + n) for i, n in zip(box_index[::-1], box_size[::-1]))
    out[box] = vertebrae_part.astype(np.uint8)
    labels = sitk.GetImageFromArray(out)
    labels.CopyInformation(mask_image)
    voxel_ml = float(np.prod(mask_image.GetSpacing())) / 1000.0
    present = [int(v) for v in np.unique(out[box]) if v > 0]
    info = dict(info)
    info.update(
        {
            "working_spacing_mm": round(spacing, 3),
            "discs": len(details["discs"]),
            "unlabelled_ml": round(float(np.count_nonzero(mask_full[box] & (out[box] == 0))) * voxel_ml, 2),
            "sacrum_ml": round(float(np.count_nonzero(out[box] == SACRUM_ID)) * voxel_ml, 2),
            "sacral_fragment_in_mask": bool(fragment),
            "labels_present": present,
        }
    )
    lap("map_back")
    info["timings_s"] = {key: round(value, 3) for key, value in timings.items()}
    info["timings_s"]["total"] = round(sum(timings.values()), 3)
    return labels, info


def _resample_into(mask: "sitk.Image", reference: "sitk.Image") -> np.ndarray:
    """(D, H, W) bool: ``mask`` resampled (nearest) onto ``reference``, computed only in the part of the grid it covers."""
    import SimpleITK as sitk

    from SpineContextSegLib.inference.preprocessing import physical_corners, resample_to_reference

    corners = np.array([reference.TransformPhysicalPointToContinuousIndex([float(c) for c in corner]) for corner in physical_corners(mask)])
    size = np.array(reference.GetSize())
    low = np.clip(np.floor(corners.min(axis=0)).astype(int) - 1, 0, size)
    high = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 2, 0, size)
    out = np.zeros(tuple(reversed(reference.GetSize())), dtype=bool)
    if np.any(high <= low):
        return out
    part = sitk.RegionOfInterest(reference, [int(v) for v in high - low], [int(v) for v in low])
    values = sitk.GetArrayFromImage(resample_to_reference(mask, part, method="nearest", default_value=0)) > 0
    out[low[2] : high[2], low[1] : high[1], low[0] : high[0]] = values
    return out


def _mask_box(mask: np.ndarray) -> Tuple[List[int], List[int]]:
    """Index and size (x, y, z order) of the bounding box of the True voxels of a (z, y, x) array."""
    nonzero = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    low = [int(nonzero[2][0]), int(nonzero[1][0]), int(nonzero[0][0])]
    high = [int(nonzero[2][-1]) + 1, int(nonzero[1][-1]) + 1, int(nonzero[0][-1]) + 1]
    return low, [h - l for h, l in zip(high, low)]


def _inside(index: Sequence[int], size: Sequence[int], outer_index: Sequence[int], outer_size: Sequence[int]) -> bool:
    return all(i >= o and i + n <= o + m for i, n, o, m in zip(index, size, outer_index, outer_size))


def _labels_box(labels: np.ndarray, reference: "sitk.Image", image: "sitk.Image", mask_box: Tuple[List[int], List[int]]) -> Tuple[List[int], List[int]]:
    """Index and size (x, y, z) on ``image``'s grid of the box holding the mask and the working-grid labels."""
    low = np.array(mask_box[0])
    high = low + np.array(mask_box[1])
    if labels.any():
        zyx = _padded_box(labels > 0, pad=1)
        corners = []
        for i in (zyx[2].start, zyx[2].stop - 1):
            for j in (zyx[1].start, zyx[1].stop - 1):
                for k in (zyx[0].start, zyx[0].stop - 1):
                    point = reference.TransformIndexToPhysicalPoint([int(i), int(j), int(k)])
                    corners.append(image.TransformPhysicalPointToContinuousIndex(point))
        corners = np.array(corners)
        low = np.minimum(low, np.floor(corners.min(axis=0)).astype(int) - 1)
        high = np.maximum(high, np.ceil(corners.max(axis=0)).astype(int) + 2)
    low = np.maximum(low, 0)
    high = np.minimum(high, np.array(image.GetSize()))
    return [int(v) for v in low], [int(v) for v in high - low]


def _labels_in_pieces(labels: np.ndarray) -> List[int]:
    """Labels (VerSe ids, sacrum and markers excepted) that are more than one 26-connected piece."""
    from scipy import ndimage

    from SpineContextSegLib.labels import SACRUM_ID

    out = []
    for value, box in enumerate(ndimage.find_objects(np.where((labels == SACRUM_ID) | (labels == NOT_A_VERTEBRA), 0, labels)), start=1):
        if box is not None and ndimage.label(labels[box] == value, structure=_CUBE)[1] > 1:
            out.append(value)
    return out
