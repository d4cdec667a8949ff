"""Vertebrae the names found missing, labelled in a larger outline of the spine (after step 3).

The vertebrae are split and named on one outline; the labels then fill a larger one. A level
that the first outline lost whole but the larger one holds gets seeds of its own there, and the
bone between its two neighbours is grown afresh (:func:`seed_missing_levels`).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from SpineContextSegLib.anatomy.centreline import Centreline, _padded_box, _points_mm, _spacing3, centreline_frame, depth_mm, fill_holes
from SpineContextSegLib.anatomy.discs import VERTEBRA_PITCH_RADII, body_profile, find_disc_levels
from SpineContextSegLib.anatomy.split import THICKNESS_LEVELS, _seed_frame, grow_labels


#: A level the names found missing gets seeds (:func:`seed_missing_levels`) only where the larger
#: outline fills at least this share of its body core (a whole body fills 0.9-1).
MISSING_BODY_OCCUPANCY = 0.5


def seed_missing_levels(
    verse_labels: np.ndarray, outline: np.ndarray, line: Centreline, geometry: Sequence, spacing_mm, missing_between: Sequence[dict]
) -> List[int]:
    """The vertebrae the names found missing, labelled in a larger outline of the spine.

    The vertebrae are split and named on one outline (the network's coarse pass); the labels
    then fill a larger one (the fine pass's bodies, the outline moved to the bone), growing from
    the named vertebrae. Where the split outline lost whole bodies (a run of hollow thoracic
    bodies), the naming counts those levels as missing between two segments, and their bone
    went to the neighbours: their arches had grown over the lost levels, and in the larger
    outline the bodies joined them. Here the stretch of centreline between the two segments'
    bodies (at least half a vertebra per level,
    :data:`~SpineContextSegLib.anatomy.discs.VERTEBRA_PITCH_RADII`) is divided among the
    missing levels, at the larger outline's discs where it shows as many as the levels need
    (:func:`~SpineContextSegLib.anatomy.discs.find_disc_levels`), else evenly; each level gets
    the seeds :func:`~SpineContextSegLib.anatomy.split.split_vertebrae` would give it (body core and arch), and the bone of the
    stretch in ``outline`` is grown afresh from them and from the labels around it, thick
    bone first (:func:`~SpineContextSegLib.anatomy.split.grow_labels`, as in the split). A level whose body core is not at least
    :data:`MISSING_BODY_OCCUPANCY` full in ``outline`` stays missing (the larger outline lost
    it too), and so does its stretch.

    Parameters
    ----------
    verse_labels : (D, H, W) int
        VerSe ids of the named segments on the working grid; changed in place.
    outline : (D, H, W) bool
        The larger outline on the same grid.
    line : Centreline
        The centreline the segments were measured along.
    geometry : sequence of VertebraGeometry
        The segments' geometry, instance order (top first).
    spacing_mm : float or (3,) float
        Voxel size (z, y, x), mm.
    missing_between : sequence of dict
        ``{"below_instance": i, "verse_ids": [...]}`` (:func:`name_vertebrae`'s info): the
        levels missing between instance ``i`` and ``i + 1``, top first.

    Returns
    -------
    list of int
        The VerSe ids now labelled.
    """
    spacing = _spacing3(spacing_mm)
    if not missing_between or not outline.any():
        return []
    box = _padded_box(outline)  # holes and depths are the same in the padded box as in the whole grid
    filled = np.zeros(outline.shape, dtype=bool)
    filled[box] = fill_holes(outline[box])
    frame = _seed_frame(filled, line, spacing)
    profile = body_profile(filled, line, spacing)
    occupancy = np.nan_to_num(profile.occupancy, nan=0.0)
    discs, _, _ = find_disc_levels(profile)
    seeds = np.zeros(outline.shape, dtype=np.int32)
    stretches: List[Tuple[float, float]] = []
    seeded: List[int] = []
    for gap in missing_between:
        upper, lower = geometry[int(gap["below_instance"]) - 1], geometry[int(gap["below_instance"])]
        high, low = float(upper.arc_low_mm), float(lower.arc_high_mm)
        levels = [int(v) for v in gap["verse_ids"]]
        if not (np.isfinite(high) and np.isfinite(low)) or not levels:
            continue
        if (high - low) / len(levels) < 0.5 * VERTEBRA_PITCH_RADII * float(line.radius_at_arc(0.5 * (high + low))):
            continue  # too short a stretch for the levels: the segments around it hold them (long segments of thick slices)
        # the outline's discs near the stretch: one more than the levels, or evenly
        reach = 0.5 * (high - low) / len(levels)
        near = [d for d in discs if low - reach < d < high + reach]
        bounds = sorted(near, reverse=True) if len(near) == len(levels) + 1 else list(np.linspace(high, low, len(levels) + 1))
        placed = False
        for verse_id, top, bottom in zip(levels, bounds[:-1], bounds[1:]):
            body, arch = frame.seeds(bottom, top)
            bins = (profile.arc_mm >= bottom + 0.25 * (top - bottom)) & (profile.arc_mm <= top - 0.25 * (top - bottom))
            if not body.any() or not bins.any() or float(occupancy[bins].mean()) < MISSING_BODY_OCCUPANCY:
                continue
            seeds.reshape(-1)[frame.tube[body | arch]] = verse_id
            seeded.append(verse_id)
            placed = True
        if placed:
            stretches.append((low, high))
    if not seeded:
        return []
    # the stretches' bone afresh: unlabelled, then grown from the new seeds and the labels
    # around, in the slices of the stretches and a vertebra (30 mm) beyond
    ends_z = np.interp(np.array([value for stretch in stretches for value in stretch]), line.arc_mm, line.z_mm)
    first = max(box[0].start, int(np.floor((ends_z.min() - 30.0) / spacing[0])))
    last = min(box[0].stop, int(np.ceil((ends_z.max() + 30.0) / spacing[0])) + 1)
    part = (slice(first, last), box[1], box[2])
    shape = filled[part].shape
    flat = np.flatnonzero(filled[part])
    points = _points_mm(flat, shape, spacing)
    points[:, 0] += first * spacing[0]
    arc, _, _, _ = centreline_frame(points, line)
    afresh = np.zeros(shape, dtype=bool)
    for low, high in stretches:
        afresh.reshape(-1)[flat[(arc > low) & (arc < high)]] = True
    part_seeds = seeds[part]
    labels = np.where(afresh, 0, verse_labels[part]).astype(np.int32)
    labels[part_seeds > 0] = part_seeds[part_seeds > 0]
    grown = grow_labels(labels, filled[part], -depth_mm(filled[part], spacing), THICKNESS_LEVELS)
    changed = afresh | (part_seeds > 0)
    verse_labels[part][changed] = grown[changed]
    return seeded
