"""Vertebrae the names found missing, labelled in a larger outline of the spine (after step 3).

The vertebrae are split and named on one outline; the labels then fill a larger one. Where the
missing levels lie follows from the segments' geometry alone (:func:`missing_stretches`); a
level that the first outline lost whole but the larger one holds gets seeds of its own there,
and the bone of its stretch is grown afresh (:func:`seed_missing_levels`).
"""
from __future__ import annotations

from typing import List, NamedTuple, Sequence, Tuple

import numpy as np

from SpineContextSegLib.anatomy.centreline import Centreline, _padded_box, _points_mm, _spacing3, centreline_frame, depth_mm, fill_holes
from SpineContextSegLib.anatomy.discs import VERTEBRA_PITCH_RADII, body_profile, find_disc_levels
from SpineContextSegLib.anatomy.split import THICKNESS_LEVELS, _seed_frame, grow_labels


#: A level the names found missing gets seeds (:func:`seed_missing_levels`) only where the larger
#: outline fills at least this share of its body core (a whole body fills 0.9-1).
MISSING_BODY_OCCUPANCY = 0.5


class MissingStretch(NamedTuple):
    """Where levels missing from the split outline lie: arc ``low``-``high`` (mm) holds ``levels`` (VerSe ids, top first), of which ``missing`` are the missing ones."""

    low: float
    high: float
    levels: List[int]
    missing: List[int]


def missing_stretches(geometry: Sequence, line: Centreline, missing_between: Sequence[dict]) -> List[MissingStretch]:
    """The stretches of centreline that hold the levels the names found missing (geometry only, cheap).

    Between the bodies of the two segments around the missing levels, if that is at least half
    a vertebra (:data:`~SpineContextSegLib.anatomy.discs.VERTEBRA_PITCH_RADII`) per level;
    else in a neighbour long enough to hold them too (:func:`_into_a_long_neighbour`); else
    none. ``geometry``: the segments' VertebraGeometry, instance order (top first);
    ``missing_between``: :func:`~SpineContextSegLib.anatomy.naming.name_vertebrae`'s
    ``{"below_instance": i, "verse_ids": [...], "above_verse_id": a, "below_verse_id": b}``,
    the levels missing between instance ``i`` (named ``a``) and ``i + 1`` (named ``b``).
    """
    out: List[MissingStretch] = []
    for gap in missing_between:
        upper, lower = geometry[int(gap["below_instance"]) - 1], geometry[int(gap["below_instance"])]
        high, low = float(upper.arc_low_mm), float(lower.arc_high_mm)
        missing = [int(v) for v in gap["verse_ids"]]
        if not (np.isfinite(high) and np.isfinite(low)) or not missing:
            continue
        levels = missing
        if (high - low) / len(levels) < 0.5 * VERTEBRA_PITCH_RADII * float(line.radius_at_arc(0.5 * (high + low))):
            # too short a stretch for the levels: they lie inside a neighbour as long as that
            # many vertebrae more (thick slices blur a disc into the mask), or nowhere
            low, high, levels = _into_a_long_neighbour(gap, upper, lower, low, high, missing, line)
            if not levels:
                continue
        out.append(MissingStretch(low, high, levels, missing))
    return out


def seed_missing_levels(verse_labels: np.ndarray, outline: np.ndarray, line: Centreline, spacing_mm, stretches: Sequence[MissingStretch]) -> List[int]:
    """The vertebrae the names found missing, labelled in a larger outline of the spine.

    The vertebrae are split and named on one outline (the network's coarse pass); the labels
    then fill a larger one (the fine pass's bodies, the outline moved to the bone), growing from
    the named vertebrae. Where the split outline lost whole bodies (a run of hollow thoracic
    bodies), the naming counts those levels as missing between two segments, and their bone
    went to the neighbours: their arches had grown over the lost levels, and in the larger
    outline the bodies joined them. Here each stretch of centreline that holds them
    (:func:`missing_stretches`) is divided among its levels, at the larger outline's discs
    where it shows one more than the levels, else evenly; each level gets the seeds the split
    gives a vertebra (body core and arch), and the bone of the stretch in ``outline`` is grown
    afresh from them and from the labels around it, thick bone first
    (:func:`~SpineContextSegLib.anatomy.split.grow_labels`, as in the split; a neighbour the
    stretch was taken into is divided and grown afresh too). A level whose body core is not
    at least :data:`MISSING_BODY_OCCUPANCY` full in ``outline`` stays missing (the larger
    outline lost it too).

    Parameters
    ----------
    verse_labels : (D, H, W) int
        VerSe ids of the named segments on the working grid; changed in place.
    outline : (D, H, W) bool
        The larger outline on the same grid.
    line : Centreline
        The centreline the segments were measured along.
    spacing_mm : float or (3,) float
        Voxel size (z, y, x), mm.
    stretches : sequence of MissingStretch
        :func:`missing_stretches`: where the missing levels lie.

    Returns
    -------
    list of int
        The VerSe ids now labelled.
    """
    spacing = _spacing3(spacing_mm)
    if not stretches or not outline.any():
        return []
    box = _padded_box(outline)  # holes and depths are the same in the padded box as in the whole grid
    filled = np.zeros(outline.shape, dtype=bool)
    filled[box] = fill_holes(outline[box])
    frame = _seed_frame(filled, line, spacing)
    profile = body_profile(filled, line, spacing)
    occupancy = np.nan_to_num(profile.occupancy, nan=0.0)
    discs, _, _ = find_disc_levels(profile)
    seeds = np.zeros(outline.shape, dtype=np.int32)
    grown_stretches: List[Tuple[float, float]] = []
    seeded: List[int] = []
    for low, high, levels, missing in stretches:
        # the outline's discs near the stretch: one more than the levels, or evenly
        reach = 0.5 * (high - low) / len(levels)
        near = [d for d in discs if low - reach < d < high + reach]
        bounds = sorted(near, reverse=True) if len(near) == len(levels) + 1 else list(np.linspace(high, low, len(levels) + 1))
        placements = []
        for verse_id, top, bottom in zip(levels, bounds[:-1], bounds[1:]):
            body, arch = frame.seeds(bottom, top)
            bins = (profile.arc_mm >= bottom + 0.25 * (top - bottom)) & (profile.arc_mm <= top - 0.25 * (top - bottom))
            if body.any() and bins.any() and float(occupancy[bins].mean()) >= MISSING_BODY_OCCUPANCY:
                placements.append((verse_id, body | arch))
        found = [verse_id for verse_id, _ in placements if verse_id in missing]
        if found:
            for verse_id, where in placements:
                seeds.reshape(-1)[frame.tube[where]] = verse_id
            seeded.extend(found)
            grown_stretches.append((low, high))
    if not seeded:
        return []
    # the stretches' bone afresh: unlabelled, then grown from the new seeds and the labels
    # around, in the slices of the stretches and a vertebra (30 mm) beyond
    ends_z = np.interp(np.array([value for stretch in grown_stretches for value in stretch]), line.arc_mm, line.z_mm)
    first = max(box[0].start, int(np.floor((ends_z.min() - 30.0) / spacing[0])))
    last = min(box[0].stop, int(np.ceil((ends_z.max() + 30.0) / spacing[0])) + 1)
    part = (slice(first, last), box[1], box[2])
    shape = filled[part].shape
    flat = np.flatnonzero(filled[part])
    points = _points_mm(flat, shape, spacing)
    points[:, 0] += first * spacing[0]
    arc, _, _, _ = centreline_frame(points, line)
    afresh = np.zeros(shape, dtype=bool)
    for low, high in grown_stretches:
        afresh.reshape(-1)[flat[(arc > low) & (arc < high)]] = True
    part_seeds = seeds[part]
    labels = np.where(afresh, 0, verse_labels[part]).astype(np.int32)
    labels[part_seeds > 0] = part_seeds[part_seeds > 0]
    grown = grow_labels(labels, filled[part], -depth_mm(filled[part], spacing), THICKNESS_LEVELS)
    changed = afresh | (part_seeds > 0)
    verse_labels[part][changed] = grown[changed]
    return seeded


#: A segment next to missing levels, whose stretch is too short for them, holds them when it is
#: this many vertebra pitches long per level it would then hold (its own included): longer, it
#: holds more levels than the names say (10 mm slices merge whole runs of vertebrae).
LONG_NEIGHBOUR_PITCHES = (0.8, 1.3)


def _into_a_long_neighbour(gap: dict, upper, lower, low: float, high: float, missing: List[int], line: Centreline) -> Tuple[float, float, List[int]]:
    """The stretch (low, high) and its levels (top first) taken into a neighbour long enough to hold them, or ``(low, high, [])``.

    A disc that thick slices blur into the mask leaves two vertebrae as one segment; the naming
    may then call the segment by one name and count the other level as missing beside it. The
    neighbour below is tried first, then the one above (never C1-C2, long by nature).
    """
    for neighbour, verse_id, below in ((lower, gap.get("below_verse_id"), True), (upper, gap.get("above_verse_id"), False)):
        if verse_id is None or int(verse_id) <= 2 or not (np.isfinite(neighbour.arc_low_mm) and np.isfinite(neighbour.arc_high_mm)):
            continue
        start, end = (float(neighbour.arc_low_mm), high) if below else (low, float(neighbour.arc_high_mm))
        levels = missing + [int(verse_id)] if below else [int(verse_id)] + missing
        pitches = (end - start) / (len(levels) * VERTEBRA_PITCH_RADII * float(line.radius_at_arc(0.5 * (start + end))))
        if LONG_NEIGHBOUR_PITCHES[0] <= pitches <= LONG_NEIGHBOUR_PITCHES[1]:
            return start, end, levels
    return low, high, []
