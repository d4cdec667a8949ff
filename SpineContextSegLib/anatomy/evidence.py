"""What the CT and the segments show, measured for the naming (step 3, first half).

Per segment, its place along the centreline, its size and whether the field of view cuts it
(:func:`vertebra_geometry`); ribs, found in the CT beside the column whether or not the mask
holds their vertebra (:func:`find_ribs`); bone outside the mask right beyond the ends of the
column, the sacrum with its alae below and the skull base above (:func:`bone_beyond_column`);
lung beside each segment (:func:`lungs_beside`: thoracic levels lie between the lungs); and a
small lowest segment that is a piece of the sacrum the mask took in, not a vertebra
(:func:`caudal_fragment`). :mod:`SpineContextSegLib.anatomy.naming` weighs this evidence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from SpineContextSegLib.anatomy.centreline import Centreline, _points_mm, _spacing3, _sub_centreline, _tube_voxels, centreline_frame, dilate_cube, in_plane_thickness_mm
from SpineContextSegLib.anatomy.split import _CUBE, MIN_BODY_VOXELS

#: Bone threshold (HU) for ribs, sacrum and skull outside the mask.
BONE_HU = 200.0
#: Bone threshold (HU) beyond the ends of the column (:func:`bone_beyond_column`): lower than
#: :data:`BONE_HU` so that the cancellous S1 body of a thick-slice CT counts.
END_BONE_HU = 150.0


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
        radii = distance / line.radius_at_arc(arc)
        core = radii <= 0.6
        if core.sum() < MIN_BODY_VOXELS:
            # no body in the mask (a hollow one, or an arch alone): its voxels nearest the
            # centreline, the pedicles at the body's level; never the whole arch, which may
            # reach along the posterior elements of the vertebrae next to it
            nearest = min(MIN_BODY_VOXELS, radii.size) - 1
            core = radii <= np.partition(radii, nearest)[nearest] + 0.6
        low, high = _body_range(arc[core], float(spacing[0]))
        # judged on the body core: an oblique field of view also has z-edges at its side walls
        truncated = bool(np.any(edge[box].reshape(-1)[flat][core]))
        out.append(VertebraGeometry(low, high, points.mean(axis=0), float(line.radius_at_arc(0.5 * (low + high))), flat.size * float(np.prod(spacing)) / 1000.0, truncated))
    return out


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
#: much bone (the tip of a transverse process the mask missed runs less far). An 80 mm slab in
#: 3 mm sagittal slices shows a rib neck over 10-15 mm with 0.3-0.45 ml of bone: at 0.5 ml the
#: chest CTA so cut kept one rib of eight, and T9-L1 was named T11-L3.
RIB_MIN_CUT_RUN_MM, RIB_MIN_CUT_ML = 10.0, 0.3
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
    bone &= ~dilate_cube(spine)
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
    # cut above: the next voxel up is outside the scan or the crop. Ribs run down and out from
    # their heads, so such a piece may be the shaft of a rib whose head (and vertebra) lies above
    # the scan, beside a lower vertebra: its level says nothing (a slab cut through L1 showed
    # T12's rib beside L1, and every name slipped by one)
    above = z + 1
    outside_above = above >= depth
    if field_of_view is not None:
        ok = ~outside_above
        outside_above[ok] = ~np.asarray(field_of_view, dtype=bool)[above[ok], y[ok] + y_lo, x[ok] + x_lo]
    cut_above = np.zeros(count + 1, dtype=bool)
    np.logical_or.at(cut_above, labels, outside_above)
    keep = (volume <= RIB_MAX_ML) & touching_column & long_enough & ~cut_above
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
    spine_near = dilate_cube(instances[z_lo:z_hi] > 0).reshape(-1)[tube[region]]

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
        all_bone = is_bone(part) & inside_fov[part] & ~dilate_cube(instances[part] > 0)
        pieces, _ = ndimage.label(all_bone, structure=_CUBE)
        sizes = np.bincount(pieces.ravel())
        touched = np.unique(pieces.reshape(-1)[flat[bone] - part.start * instances.shape[1] * instances.shape[2]])
        touched = touched[touched > 0]
        if touched.size:
            result["piece_ml"] = float(sizes[touched].max() * voxel_ml)
    return result


#: Lung beside a vertebra: air-like CT (below this HU) in the paravertebral region of
#: :func:`lungs_beside` ...
LUNG_AIR_HU = -500.0
#: ... whose mean lies above this: lung parenchyma averages -700 to -900 HU, air outside the
#: body and gas in the bowel about -1000.
LUNG_MEAN_MIN_HU = -960.0
#: Area (mm^2) of lung on one side of the slice through the body centre that counts as lung
#: beside the vertebra, and below which the side counts as without lung.
LUNG_FOUND_MM2, LUNG_ABSENT_MM2 = 400.0, 100.0
#: The paravertebral region, mm from the body centre: 20-95 mm to either side, from 55 mm in
#: front to 25 mm behind it (what the labelling's working crop keeps, see
#: :data:`~SpineContextSegLib.inference.vertebra_labelling.CONTEXT_MARGIN_MM`).
LUNG_LATERAL_MM, LUNG_ANTERIOR_MM, LUNG_POSTERIOR_MM = (20.0, 95.0), 55.0, 25.0


def lungs_beside(ct_hu: np.ndarray, geometry: Sequence[VertebraGeometry], line: Centreline, spacing_mm, field_of_view: Optional[np.ndarray] = None) -> List[Optional[bool]]:
    """Is there lung beside each segment? Thoracic vertebrae lie between the lungs, the others do not.

    Measured in the axial slice through the segment's body centre (on the centreline), in the
    paravertebral region (:data:`LUNG_LATERAL_MM` to either side, :data:`LUNG_ANTERIOR_MM` in
    front, :data:`LUNG_POSTERIOR_MM` behind): per side, the area of CT below
    :data:`LUNG_AIR_HU`, counted only if its mean HU is above :data:`LUNG_MEAN_MIN_HU` (air
    outside the body and bowel gas are darker than lung). The evidence does not depend on the
    mask's outline beyond the centreline, so it survives a mask in pieces.

    Parameters
    ----------
    ct_hu : (D, H, W) float, HU, canonical grid (z inferior->superior, y anterior->posterior, x right->left)
    geometry : list of VertebraGeometry, instance order (top first)
    line : Centreline
    spacing_mm : float or (3,) float, (z, y, x) mm
    field_of_view : (D, H, W) bool, optional

    Returns
    -------
    list of bool or None, one per segment
        True: at least :data:`LUNG_FOUND_MM2` of lung on one side or both (or half of the
        side's region that the field of view shows, if that is less); False: less than
        :data:`LUNG_ABSENT_MM2` on every side the scan shows (at least half of that side's region
        inside the field of view); None: in between, or no side seen.
    """
    spacing = _spacing3(spacing_mm)
    depth, height, width = ct_hu.shape
    rows = (np.arange(height) + 0.5) * spacing[1]
    columns = (np.arange(width) + 0.5) * spacing[2]
    pixel_mm2 = float(spacing[1] * spacing[2])
    # the whole region had the CT covered it, per side
    region_mm2 = (LUNG_LATERAL_MM[1] - LUNG_LATERAL_MM[0]) * (LUNG_ANTERIOR_MM + LUNG_POSTERIOR_MM)
    out: List[Optional[bool]] = []
    for g in geometry:
        if not math.isfinite(g.arc_low_mm):
            out.append(None)
            continue
        z, y, x = (float(v) for v in line.at_arc(0.5 * (g.arc_low_mm + g.arc_high_mm)))
        k = int(round(z / spacing[0]))
        if not 0 <= k < depth:
            out.append(None)
            continue
        row_in = (rows - y >= -LUNG_ANTERIOR_MM) & (rows - y <= LUNG_POSTERIOR_MM)
        offset = np.abs(columns - x)
        column_in = (offset >= LUNG_LATERAL_MM[0]) & (offset <= LUNG_LATERAL_MM[1])
        hu = ct_hu[k][np.ix_(row_in, column_in)]
        seen = np.ones(hu.shape, dtype=bool) if field_of_view is None else np.asarray(field_of_view[k], dtype=bool)[np.ix_(row_in, column_in)]
        sides = []
        for side in (columns[column_in] < x, columns[column_in] > x):
            seen_mm2 = float(seen[:, side].sum()) * pixel_mm2
            air = (hu[:, side] < LUNG_AIR_HU) & seen[:, side]
            lung_mm2 = float(air.sum()) * pixel_mm2 if air.any() and float(hu[:, side][air].mean()) > LUNG_MEAN_MIN_HU else 0.0
            # a narrow field of view shows only a strip of the region: most of that strip then
            if lung_mm2 >= max(min(LUNG_FOUND_MM2, 0.5 * seen_mm2), LUNG_ABSENT_MM2):
                sides.append(True)
            elif lung_mm2 < LUNG_ABSENT_MM2 and seen_mm2 >= 0.5 * region_mm2:
                sides.append(False)
        out.append(True if True in sides else (False if sides else None))
    return out


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
