"""Binary spine mask -> one segment per vertebra: step 2 of the vertebra labelling.

**Split** (:func:`split_vertebrae`, in the mask's box): along the centreline's arc length, the
share of a cylinder around the body centreline that lies in the mask
(:func:`~SpineContextSegLib.anatomy.discs.body_profile`) drops at every intervertebral disc
(discs are not bone). Discs are the deep minima of that profile, no closer together than about
half a vertebra; a segment as long as two vertebrae is searched again for a shallow minimum (a
disc bridged by osteophytes) (:func:`~SpineContextSegLib.anatomy.discs.find_disc_levels`); a
segment spanning a gap in the mask is cut to its solid stretches (:func:`_solid_segments`). Each
vertebra gets three seeds, the core of its body, the bone just behind its body at pedicle level
and the midline behind the canal where its laminae meet (so its spinous process is its own even
where the mask bridges the joints to the vertebra below); the seeds grow through the mask, thick
bone first (adjacent vertebrae touch at thin necks: facet joints, osteophytes), geodesically
within a thickness level (:func:`grow_labels`). No vertebra keeps bone more than about one
vertebra beyond its segment (:func:`_beyond_reach`: an arch that grew along the posterior
elements of vertebrae missing from the mask); every label ends up one 26-connected piece, the one
holding its body (:func:`keep_largest_pieces`); a piece of body that no seed reached (a mask in
fragments) becomes a segment of its own (:func:`_orphan_pieces`). A mask whose bodies are hollow shells (a
HU threshold) is first closed and filled slice by slice (:func:`fill_slices`). After the naming,
the levels it found missing between two segments are labelled in a larger outline of the same
spine, where that outline holds their bodies
(:func:`~SpineContextSegLib.anatomy.missing_levels.seed_missing_levels`, with this module's seeds).

``_CUBE`` (26-connectivity) and :data:`THICKNESS_LEVELS` are shared with the later steps.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from SpineContextSegLib.anatomy.centreline import EMPTY_STRETCH_RADII, Centreline, _padded_box, _points_mm, _spacing3, _tube_voxels, body_centreline, centreline_frame, depth_mm, dilate_cube, fill_holes
from SpineContextSegLib.anatomy.discs import VERTEBRA_PITCH_RADII, BodyProfile, body_profile, find_disc_levels
from SpineContextSegLib.errors import SegmentationError

#: Number of thickness levels of the seeded growth (see :func:`grow_labels`).
THICKNESS_LEVELS = 16
#: 26-connectivity: the pieces of a label and the ring around a piece (shared by the later steps).
_CUBE = np.ones((3, 3, 3), dtype=bool)


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
        labelled = labels > 0
        open_voxels = np.flatnonzero(~labelled & allowed)
        if open_voxels.size < np.count_nonzero(labelled):
            # only labelled voxels next to an open one can grow (the same steps, far fewer
            # neighbours to look up where most of the region is labelled already)
            near = neighbours[open_voxels].ravel()
            next_to_open = np.zeros(labels.size, dtype=bool)
            next_to_open[near[near >= 0]] = True
            frontier = np.flatnonzero(next_to_open & labelled)
        else:
            frontier = np.flatnonzero(labelled)
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


def keep_largest_pieces(labels: np.ndarray, several_pieces: Sequence[int] = (), anchors: Optional[np.ndarray] = None) -> Tuple[np.ndarray, int]:
    """Make every label one 26-connected piece.

    The piece that stays is the largest, or with ``anchors`` the one holding the most anchor
    voxels (the largest among equals). The other pieces of a label go to the neighbouring
    label they touch most; pieces that touch no other label become 0.

    Parameters
    ----------
    labels : (D, H, W) int
        0 = background.
    several_pieces : labels left as they are (a vertebra the mask holds in pieces).
    anchors : (D, H, W) bool, optional
        Where a label's own piece lies (the seeds of its body): an arch that grew along the
        posterior elements of vertebrae missing from the mask can outweigh its body.

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
            score = sizes.astype(np.float64)
            if anchors is not None:
                score += (sizes.max() + 1.0) * np.bincount(pieces[anchors[box]], minlength=count + 1)
                score[0] = 0
            largest = int(np.argmax(score))
            for piece in range(1, count + 1):
                if piece == largest:
                    continue
                where = pieces == piece
                ring = dilate_cube(where) & ~where
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
        out[z] |= fill_holes(closed)
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


class _SeedFrame:
    """Where a vertebra's seeds may lie: the voxels of a filled mask around the centreline, in its frame.

    ``tube`` (flat indices of the mask's voxels within 3 body radii of the centreline, in-plane),
    their ``arc`` (mm), and which lie in the body core (within 0.6 body radii of the
    centreline), just behind the body at pedicle level (the arch: 0.8-2 radii behind the body
    centre in the voxel's own axial slice, within 1.2 radii of the midline), or on the midline
    behind the canal where the laminae meet (1.4-2.8 radii behind, within 0.3 radii).
    """

    def __init__(self, tube: np.ndarray, arc: np.ndarray, in_body: np.ndarray, in_arch: np.ndarray, in_lamina_junction: np.ndarray):
        self.tube, self.arc = tube, arc
        self.in_body, self.in_arch, self.in_lamina_junction = in_body, in_arch, in_lamina_junction

    def seeds(self, low: float, high: float) -> Tuple[np.ndarray, np.ndarray]:
        """Body and arch seeds (bool over :attr:`tube`) of the vertebra between arc ``low`` and ``high`` (mm).

        The body seed is the central half of the stretch; the arch seed runs from a quarter of
        it (the lamina junction from its lower end, down to the disc below) to 0.6 of it.
        """
        length = high - low
        arc = self.arc
        body = self.in_body & (arc >= low + 0.25 * length) & (arc <= high - 0.25 * length)
        arch = ((self.in_arch & (arc >= low + 0.25 * length)) | (self.in_lamina_junction & (arc >= low))) & (arc <= low + 0.6 * length)
        return body, arch


def _seed_frame(filled: np.ndarray, line: Centreline, spacing: np.ndarray) -> _SeedFrame:
    """The :class:`_SeedFrame` of ``filled`` ((D, H, W) bool) around ``line``."""
    radius_max = float(line.body_radius_mm.max())
    tube = _tube_voxels(filled.shape, line, spacing, 3.0 * radius_max)
    tube = tube[filled.reshape(-1)[tube]]
    points = _points_mm(tube, filled.shape, spacing)
    arc, distance, _, _ = centreline_frame(points, line)
    in_body = distance <= 0.6 * line.radius_at_arc(arc)
    # behind the body in the point's own axial slice
    slice_radius = np.interp(points[:, 0], line.z_mm, line.body_radius_mm)
    posterior = points[:, 1] - np.interp(points[:, 0], line.z_mm, line.y_mm)
    left = points[:, 2] - np.interp(points[:, 0], line.z_mm, line.x_mm)
    in_arch = (posterior > 0.8 * slice_radius) & (posterior < 2.0 * slice_radius) & (np.abs(left) < 1.2 * slice_radius)
    in_lamina_junction = (posterior > 1.4 * slice_radius) & (posterior < 2.8 * slice_radius) & (np.abs(left) < 0.3 * slice_radius)
    return _SeedFrame(tube, arc, in_body, in_arch, in_lamina_junction)


def split_vertebrae(mask: np.ndarray, ct_hu: Optional[np.ndarray], spacing_mm, *, min_vertebra_ml: float = 0.5, probability: Optional[np.ndarray] = None, return_details: bool = False):
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
    probability : (D, H, W) float in [0, 1], optional
        The network's spine probability the mask was thresholded from: a segment as long as
        two vertebrae is cut at the probability's shallow minimum, one three or more long at
        its faintest minima (discs that thick slices blur into the mask; :func:`find_disc_levels`).
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
        instances, details = split_vertebrae(
            mask[:, rows, columns], None if ct_hu is None else ct_hu[:, rows, columns], spacing, min_vertebra_ml=min_vertebra_ml,
            probability=None if probability is None else probability[:, rows, columns], return_details=True,
        )
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
    filled = fill_holes(mask)
    line = body_centreline(filled, spacing, ct_hu=ct_hu)
    profile = body_profile(filled, line, spacing, probability=probability)
    hollow = _looks_hollow(profile)
    if hollow:
        # a mask of dense bone only (a threshold; osteoporotic marrow) leaves hollow bodies whose
        # shells are thinner than the posterior elements: close and fill them slice by slice
        filled = fill_slices(filled, spacing)
        line = body_centreline(filled, spacing, ct_hu=ct_hu)
        profile = body_profile(filled, line, spacing, probability=probability)
    discs, start, end = find_disc_levels(profile)
    bounds = [start] + discs + [end]
    voxel_ml = float(np.prod(spacing)) / 1000.0

    # seeds: the body core (central half of the segment, inside the cylinder); the bone just
    # behind the body at pedicle level (pedicles, lamina roots), which carries the posterior
    # arch; and the midline just behind the canal down to the disc below, where the laminae
    # meet and the spinous process leaves the arch: a mask that bridges the joints to the
    # vertebra below would otherwise let that vertebra reach the spinous process first
    frame = _seed_frame(filled, line, spacing)
    segments = _solid_segments(profile, [(low, high) for low, high in zip(bounds[:-1], bounds[1:]) if high - low > 2.0 * spacing[0]])
    seeds = np.zeros(mask.shape, dtype=np.int32)
    body_seeds = np.zeros(mask.shape, dtype=bool)
    count = len(segments)
    for order, (low, high) in enumerate(segments):
        body, arch = frame.seeds(low, high)
        seeds.reshape(-1)[frame.tube[body | arch]] = count - order  # segments run inferior -> superior; label 1 is the most cranial
        body_seeds.reshape(-1)[frame.tube[body]] = True
    if count == 0:  # no body column at all: one label for the largest piece
        pieces, _ = ndimage.label(mask, structure=_CUBE)
        seeds[pieces == (np.argmax(np.bincount(pieces.ravel())[1:]) + 1)] = 1
        segments = [(start, end)]
    # thick bone first: adjacent vertebrae meet at thin necks (facet joints, osteophytes)
    box = _padded_box(filled)
    depth = np.zeros(mask.shape, dtype=np.float32)
    depth[box] = depth_mm(filled[box], spacing)
    instances = grow_labels(seeds, filled, -depth, THICKNESS_LEVELS)
    del depth
    instances[~mask] = 0
    overreach = _beyond_reach(instances, [(count - order, low, high) for order, (low, high) in enumerate(segments)], line, spacing)
    instances[overreach] = 0
    instances, removed = keep_largest_pieces(instances, anchors=body_seeds)
    removed += int(np.count_nonzero(overreach))

    # a segment too small to be a vertebra (a sliver at the field-of-view edge) joins its neighbour
    sizes = np.bincount(instances.ravel(), minlength=len(segments) + 1)[1:] * voxel_ml
    small = [value for value in range(1, len(sizes) + 1) if sizes[value - 1] < min_vertebra_ml]
    if small and len(small) < len(sizes):
        for value in small:
            where = instances == value
            ring = dilate_cube(where) & ~where
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
    instances, segments, orphans = _orphan_pieces(instances, mask & ~overreach, segments, line, spacing, min_vertebra_ml)
    removed -= orphans
    if return_details:
        return instances, {"centreline": line, "profile": profile, "discs": discs, "segments": segments, "seeds": seeds, "removed_voxels": removed, "hollow_mask": hollow}
    return instances


#: A vertebra reaches at most this many vertebrae beyond its segment along the centreline (its
#: spinous process hangs down to the level below, its articular processes reach up to it).
REACH_VERTEBRAE = 1.25
#: An instance with fewer voxels than this within 0.6 body radii of the centreline has no body in
#: the mask: an arch alone (its body hollow or missing).
MIN_BODY_VOXELS = 10


def _beyond_reach(instances: np.ndarray, ranges: Sequence[Tuple[int, float, float]], line: Centreline, spacing: np.ndarray) -> np.ndarray:
    """Voxels of each instance more than :data:`REACH_VERTEBRAE` vertebrae beyond its segment.

    ``ranges`` holds (label, arc_low_mm, arc_high_mm) per segment; one vertebra is the longer
    of the segment and :data:`~SpineContextSegLib.anatomy.discs.VERTEBRA_PITCH_RADII` body
    radii. Where the bodies of a run of vertebrae are missing from the mask (hollow, or thin
    rings), those vertebrae have no segment and the arch of a neighbour grows along all their
    posterior elements; that piece can outweigh the neighbour's body, which
    :func:`keep_largest_pieces` would then give away (the chest CTA at an odd tiling: an
    instance of arch alone, 94 mm tall, read as a neck). The most cranial instance may reach
    up without limit: C2's segment takes in the ring of C1 above it. Returns (D, H, W) bool.
    """
    out = np.zeros(instances.shape, dtype=bool)
    flat = np.flatnonzero(instances)
    if flat.size == 0:
        return out
    arc, _, _, _ = centreline_frame(_points_mm(flat, instances.shape, spacing), line)
    values = instances.reshape(-1)[flat]
    lowest = np.full(int(values.max()) + 1, -np.inf)
    highest = np.full(int(values.max()) + 1, np.inf)
    for value, low, high in ranges:
        if value <= 0 or value >= lowest.size:
            continue
        vertebra = max(high - low, VERTEBRA_PITCH_RADII * float(line.radius_at_arc(0.5 * (low + high))))
        lowest[value] = low - REACH_VERTEBRAE * vertebra
        if value > 1:  # the most cranial may be C2 with the ring of C1 (no body of its own) far above
            highest[value] = high + REACH_VERTEBRAE * vertebra
    out.reshape(-1)[flat[(arc < lowest[values]) | (arc > highest[values])]] = True
    return out


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
