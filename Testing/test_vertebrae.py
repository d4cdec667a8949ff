"""Vertebra splitting and naming (SpineContextSegLib.anatomy, SpineContextSegLib.inference.vertebra_labelling) on small synthetic spines.

The synthetic spine lives on the canonical grid (numpy axis 0 inferior->superior, axis 1
anterior->posterior, axis 2 right->left): elliptic vertebral bodies separated by discs
(not in the mask), pedicles, a lamina, a spinous process pointing down and articular
processes that touch those of the next vertebra (so the binary mask is one piece), and,
as context in the CT only, ribs, a sacrum with alae or a skull base.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from SpineContextSegLib.anatomy import centreline, discs, evidence, missing_levels, naming, naming_model, split
from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.inference import vertebra_labelling
from SpineContextSegLib.inference.vertebra_labelling import names_uncertainty
from SpineContextSegLib.labels import CRANIO_CAUDAL_ORDER

BONE_HU, DISC_HU, SOFT_HU, CANAL_HU, AIR_HU = 300.0, 90.0, 40.0, 10.0, -1000.0


def make_spine(levels, *, spacing=2.0, disc_mm=8.0, ribs=(), sacrum=False, skull=False, atlas=False, curve_mm=0.0, margin_below_mm=40.0, margin_above_mm=30.0, half_width_mm=None):
    """A synthetic spine on the canonical grid.

    Parameters
    ----------
    levels : list of (body_radius_mm, body_height_mm), top vertebra first
        The body is an elliptic cylinder, ``radius`` deep (antero-posterior semi-axis)
        and 1.25 ``radius`` wide.
    ribs : indices (0 = top) of vertebrae with a rib on both sides
    sacrum : a sacrum with alae below the lowest vertebra (CT only)
    skull : a skull base above the top vertebra (CT only)
    atlas : the top vertebra is C2 with a dens and the C1 ring around it
    curve_mm : antero-posterior offset of the column, a half sine over its length (lordosis)

    Returns
    -------
    ct : (D, H, W) float32 HU
    mask : (D, H, W) bool, the vertebrae
    truth : (D, H, W) int, 1 = top vertebra ... (with ``atlas``: 1 = C1 ring, 2 = C2, ...)
    """
    heights = [h for _, h in levels]
    radii = [r for r, _ in levels]
    column_mm = sum(heights) + disc_mm * (len(levels) - 1)
    extra_above = 28.0 if atlas else 0.0  # dens and atlas ring above the C2 body
    below = margin_below_mm + (45.0 if sacrum else 0.0)
    above = margin_above_mm + extra_above + (50.0 if skull else 0.0)
    depth_mm = below + column_mm + above
    r_max = max(radii)
    half_width = half_width_mm or (1.25 * r_max + 75.0)
    shape = (int(round(depth_mm / spacing)), int(round((5.0 * r_max + 60.0) / spacing)), int(round(2 * half_width / spacing)))
    z, y, x = np.meshgrid(*(np.arange(n) * spacing for n in shape), indexing="ij")
    cx = half_width
    ct = np.full(shape, AIR_HU, dtype=np.float32)
    body_outline = ((y - (20.0 + 2.5 * r_max)) / (2.5 * r_max + 25.0)) ** 2 + ((x - cx) / (half_width - 5.0)) ** 2 <= 1.0
    ct[body_outline] = SOFT_HU
    truth = np.zeros(shape, dtype=np.int32)

    def box(z0, z1, y0, y1, x0, x1):
        return (z >= min(z0, z1)) & (z <= max(z0, z1)) & (y >= min(y0, y1)) & (y <= max(y0, y1)) & (x >= min(x0, x1)) & (x <= max(x0, x1))

    top = below + column_mm
    z_top = top
    label_offset = 1 if atlas else 0
    for index, (radius, height) in enumerate(levels):
        z_hi = z_top
        z_lo = z_hi - height
        z_mid = 0.5 * (z_lo + z_hi)
        cy = 20.0 + radius + curve_mm * np.sin(np.pi * (z_mid - below) / max(column_mm, 1.0))
        value = index + 1 + label_offset
        body = (((y - cy) / radius) ** 2 + ((x - cx) / (1.25 * radius)) ** 2 <= 1.0) & (z >= z_lo) & (z <= z_hi)
        pedicle_half = max(2.5, 0.2 * radius)
        posterior = np.zeros(shape, dtype=bool)
        for side in (-1.0, 1.0):
            px = cx + side * 0.6 * radius
            posterior |= box(z_mid, z_hi - 2.0, cy + 0.7 * radius, cy + 1.9 * radius, px - pedicle_half, px + pedicle_half)  # pedicle
            # articular processes: the inferior one reaches down to the middle of the disc below
            posterior |= box(z_lo - 0.5 * disc_mm, z_mid, cy + 1.6 * radius, cy + 2.0 * radius, px - pedicle_half, px + pedicle_half)
            # the superior one reaches up to the middle of the disc above
            if index > 0 or atlas:
                posterior |= box(z_mid, z_hi + 0.5 * disc_mm, cy + 1.6 * radius, cy + 2.0 * radius, px - pedicle_half, px + pedicle_half)
        posterior |= box(z_lo + 0.25 * height, z_hi - 2.0, cy + 1.9 * radius, cy + 2.3 * radius, cx - 0.7 * radius, cx + 0.7 * radius)  # lamina
        posterior |= box(z_lo - 0.3 * height, z_mid, cy + 2.3 * radius, cy + 3.3 * radius, cx - 2.5, cx + 2.5)  # spinous process
        canal = (((y - (cy + 1.35 * radius)) / (0.55 * radius)) ** 2 + ((x - cx) / (0.55 * radius)) ** 2 <= 1.0) & (z >= z_lo - disc_mm) & (z <= z_hi)
        vertebra = (body | posterior) & ~canal & (truth == 0)
        truth[vertebra] = value
        ct[vertebra] = BONE_HU
        ct[canal & (truth == 0)] = CANAL_HU
        if index in ribs:
            for side in (-1.0, 1.0):
                start = cx + side * (1.25 * radius + 2.0)
                rib = box(z_mid - 3.0, z_mid + 3.0, cy + 0.1 * radius, cy + 0.1 * radius + 6.0, start, start + side * 60.0)
                ct[rib & (truth == 0)] = BONE_HU
        if index + 1 < len(levels):
            disc = (((y - cy) / radius) ** 2 + ((x - cx) / (1.25 * radius)) ** 2 <= 1.0) & (z < z_lo) & (z > z_lo - disc_mm) & (truth == 0)
            ct[disc] = DISC_HU
        if index == 0 and atlas:
            # C2's dens above its body, the C1 ring around it, lateral masses on C2's shoulders
            dens = ((y - cy) ** 2 + (x - cx) ** 2 <= 5.0 ** 2) & (z > z_hi) & (z <= z_hi + 16.0)
            distance = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
            ring = (distance >= 7.0) & (distance <= 16.0) & (z >= z_hi + 5.0) & (z <= z_hi + 15.0)
            masses = (np.abs(x - cx) >= 9.0) & (np.abs(x - cx) <= 15.0) & (np.abs(y - cy) <= 5.0) & (z > z_hi) & (z < z_hi + 5.0)
            truth[dens & (truth == 0)] = value
            truth[(ring | masses) & (truth == 0)] = 1
            ct[dens | ring | masses] = BONE_HU
        z_top = z_lo - disc_mm
    lowest_cy = 20.0 + radii[-1]
    if sacrum:
        s_hi = below - disc_mm - 2.0
        radius = radii[-1]
        s1 = (((y - lowest_cy) / radius) ** 2 + ((x - cx) / (1.25 * radius)) ** 2 <= 1.0) & (z <= s_hi) & (z >= s_hi - 40.0)
        alae = box(s_hi - 30.0, s_hi - 2.0, lowest_cy - 0.3 * radius, lowest_cy + radius, cx - 55.0, cx + 55.0)
        ct[(s1 | alae) & (truth == 0)] = BONE_HU
    if skull:
        s_lo = top + extra_above + 6.0
        ct[box(s_lo, s_lo + 40.0, 10.0, 10.0 + 5.0 * r_max + 30.0, cx - 60.0, cx + 60.0) & (truth == 0)] = 600.0
    return ct, truth > 0, truth


LUMBAR = [(15.0, 26.0)] * 5


def _purity(labels, truth):
    """For each true vertebra, the share of its voxels in its majority label; and that label."""
    result = {}
    for value in np.unique(truth[truth > 0]):
        found = labels[truth == value]
        found = found[found > 0]
        counts = np.bincount(found) if found.size else np.zeros(1, dtype=int)
        result[int(value)] = (int(np.argmax(counts)), float(counts.max()) / float((truth == value).sum()))
    return result


def _assert_anatomical(labels):
    """Labels ordered cranio-caudally in space, consecutive in the chain, each one piece."""
    present = sorted((v for v in np.unique(labels) if v > 0), key=CRANIO_CAUDAL_ORDER.index)
    centroids = ndimage.center_of_mass(np.ones(labels.shape), labels, present)
    heights = [c[0] for c in centroids]
    assert heights == sorted(heights, reverse=True), f"labels {present} are not ordered top to bottom: {heights}"
    chain = [v for v in CRANIO_CAUDAL_ORDER if v not in (25, 28) or v in present]  # L6, T13 only when used
    positions = [chain.index(v) for v in present]
    assert positions == list(range(positions[0], positions[0] + len(positions))), f"gap in {present}"
    for value in present:
        assert ndimage.label(labels == value, structure=np.ones((3, 3, 3)))[1] == 1, f"label {value} is in several pieces"


# ------------------------------------------------------------------------------------ pieces
def test_grow_labels_cuts_a_dumbbell_at_its_neck():
    region = np.zeros((1, 9, 31), dtype=bool)
    region[0, :, :12] = True
    region[0, 3:6, 12:19] = True  # the neck, off-centre of the two seeds' midpoint
    region[0, :, 19:] = True
    seeds = np.zeros(region.shape, dtype=np.int32)
    seeds[0, 4, 2] = 1
    seeds[0, 4, 30] = 2
    depth = ndimage.distance_transform_edt(np.pad(region, ((1, 1), (0, 0), (0, 0))))[1:-1]
    grown = split.grow_labels(seeds, region, -depth, levels=8)
    assert set(np.unique(grown[region])) == {1, 2}
    assert (grown[0, :, :12] == 1).all() and (grown[0, :, 19:] == 2).all()
    assert (grown[~region] == 0).all()


def _flood_every_labelled_voxel(seeds, region, cost, levels):
    """grow_labels as first written: every labelled voxel looks at its neighbours at each level (the reference)."""
    voxels, neighbours = split._neighbour_table(region | (seeds > 0))
    labels = seeds.reshape(-1)[voxels].astype(np.int32)
    voxel_cost = cost.reshape(-1)[voxels].astype(np.float64)
    thresholds = list(np.quantile(voxel_cost, np.linspace(1.0 / levels, 1.0, levels)))
    thresholds[-1] = np.inf
    for threshold in thresholds:
        allowed = voxel_cost <= threshold
        frontier = np.flatnonzero(labels > 0)
        while frontier.size:
            targets = neighbours[frontier].ravel()
            sources = np.repeat(labels[frontier], neighbours.shape[1])
            ok = (targets >= 0)
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


@pytest.mark.parametrize("labelled_share", [0.001, 0.9])
def test_grow_labels_takes_the_same_steps_as_flooding_from_every_labelled_voxel(labelled_share):
    # grow_labels looks only at labelled voxels next to open ones where those are fewer (the
    # labels mapped back onto the CT's grid: nearly all labelled); the result must not change,
    # ties included (the first source in voxel order wins)
    rng = np.random.default_rng(11)
    region = ndimage.gaussian_filter(rng.random((18, 26, 22)), 1.5) > 0.45
    seeds = np.where(region & (rng.random(region.shape) < labelled_share), rng.integers(1, 6, region.shape), 0).astype(np.int32)
    cost = -ndimage.distance_transform_edt(region)
    for levels in (1, 6):
        expected = _flood_every_labelled_voxel(seeds, region, cost, levels)
        assert np.array_equal(split.grow_labels(seeds, region, cost, levels), expected)
    assert (expected[region] > 0).mean() > 0.9


@pytest.mark.parametrize("shape", [(30, 36, 28), (40, 50), (1, 6, 7)])
def test_fill_holes_and_dilate_cube_are_scipys(shape):
    rng = np.random.default_rng(sum(shape))
    mask = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.48  # blobs with enclosed holes, touching the edges
    assert np.array_equal(centreline.fill_holes(mask), ndimage.binary_fill_holes(mask))
    assert np.array_equal(centreline.dilate_cube(mask), ndimage.binary_dilation(mask, structure=np.ones((3,) * mask.ndim, dtype=bool)))
    if len(shape) == 3 and shape[0] > 1:
        assert (ndimage.binary_fill_holes(mask) & ~mask).any()  # the case has holes to fill
    assert not centreline.fill_holes(np.zeros(shape, dtype=bool)).any() and centreline.fill_holes(np.ones(shape, dtype=bool)).all()


def test_keep_largest_pieces_moves_a_stray_piece_to_its_neighbour():
    labels = np.zeros((1, 5, 14), dtype=np.int32)
    labels[0, :, :5] = 1
    labels[0, :, 5:10] = 2
    labels[0, 2, 10] = 1  # a stray piece of 1 that touches only label 2
    labels[0, 2, 13] = 1  # a stray piece of 1 that touches nothing
    fixed, removed = split.keep_largest_pieces(labels)
    assert fixed[0, 2, 10] == 2
    assert fixed[0, 2, 13] == 0 and removed == 1
    assert (fixed[0, :, :5] == 1).all() and (fixed[0, :, 5:10] == 2).all()
    for value in (1, 2):
        assert ndimage.label(fixed == value, structure=np.ones((3, 3, 3)))[1] == 1


def test_keep_largest_pieces_keeps_the_piece_with_the_anchors_not_the_largest():
    # label 1: its body (a small piece holding its seeds) and a long arch cut off from it
    labels = np.zeros((1, 5, 20), dtype=np.int32)
    labels[0, :, :3] = 1
    labels[0, :, 3:6] = 2
    labels[0, :, 6:20] = 1
    anchors = np.zeros(labels.shape, dtype=bool)
    anchors[0, 2, 1] = True
    fixed, removed = split.keep_largest_pieces(labels, anchors=anchors)
    assert (fixed[0, :, :3] == 1).all() and (fixed[0, :, 6:] == 2).all() and removed == 0
    assert (split.keep_largest_pieces(labels)[0][0, :, :6] == 2).all()  # without anchors the largest piece stays


def test_find_disc_levels_keeps_the_deeper_of_two_close_minima():
    arc = np.arange(0.0, 120.0, 1.0)
    occupancy = np.ones_like(arc)
    for centre, floor in ((30.0, 0.0), (36.0, 0.4), (70.0, 0.05)):  # 36: a dip inside a vertebra
        occupancy[np.abs(arc - centre) <= 2] = floor
    occupancy[:5] = 0.0
    occupancy[-5:] = 0.0
    profile = discs.BodyProfile(arc + 0.5, occupancy, np.full_like(arc, 15.0))
    found, start, end = discs.find_disc_levels(profile)
    assert np.allclose(found, [30.5, 70.5], atol=1.0)
    assert start == pytest.approx(5.5, abs=1.0) and end == pytest.approx(114.5, abs=1.0)


def test_find_disc_levels_cuts_an_overlong_segment_where_the_probability_dips():
    # thick slices blur a disc into its bodies: the mask stays full over two vertebrae (60 mm, 4
    # body radii), the network's probability only dips (0.8 of the bodies')
    arc = np.arange(0.0, 120.0, 1.0)
    occupancy = np.ones_like(arc)
    occupancy[np.abs(arc - 30.0) <= 2] = 0.0
    occupancy[:5] = 0.0
    occupancy[-5:] = 0.0
    soft = occupancy * 0.98
    soft[np.abs(arc - 62.0) <= 2] = 0.8
    radius = np.full_like(arc, 15.0)
    profile = discs.BodyProfile(arc + 0.5, occupancy, radius)
    assert np.allclose(discs.find_disc_levels(profile)[0], [30.5], atol=1.0)
    found, _, _ = discs.find_disc_levels(discs.BodyProfile(arc + 0.5, occupancy, radius, probability=soft))
    assert np.allclose(found, [30.5, 62.5], atol=1.0)


def test_find_disc_levels_cuts_a_segment_three_vertebrae_long_at_its_faint_dips_only():
    # 3 mm slices of a lower thoracic column (chest CTA): three vertebrae (body radius 12 mm,
    # 27 mm apart) in one 81 mm segment, the probability dipping only to 0.92 at the two discs.
    # Two vertebrae long (C2 with its dens), the same faint dip is no disc.
    arc = np.arange(0.0, 140.0, 1.0)
    radius = np.full_like(arc, 12.0)

    def column(segment_mm, dips_mm):
        occupancy = np.ones_like(arc)
        occupancy[:5] = 0.0
        occupancy[5 + segment_mm :] = 0.0
        soft = occupancy * 0.99
        for centre in dips_mm:
            soft[np.abs(arc - centre) <= 2] = 0.92
        soft[np.abs(arc - 40.0) <= 2] = np.minimum(soft[np.abs(arc - 40.0) <= 2], 0.96)  # marrow, not a disc
        return discs.BodyProfile(arc + 0.5, occupancy, radius, probability=soft)

    found, _, _ = discs.find_disc_levels(column(81, [32.0, 59.0]))
    assert np.allclose(found, [32.5, 59.5], atol=1.0)
    found, _, _ = discs.find_disc_levels(column(50, [30.0]))
    assert found == []
    # a mask's own occupancy dipping as faintly is no disc (partial volume, marrow): only the probability's counts
    faint_mask = column(81, [32.0, 59.0])
    found, _, _ = discs.find_disc_levels(discs.BodyProfile(faint_mask.arc_mm, np.minimum(faint_mask.occupancy, faint_mask.probability / 0.99), radius))
    assert found == []


def test_in_plane_thickness_is_each_voxels_distance_to_the_background_of_its_slice():
    rng = np.random.default_rng(3)
    mask = ndimage.gaussian_filter(rng.random((20, 40, 35)), 2.0) > 0.5  # blobs, some thick
    mask[:, [0, -1], :] = mask[:, :, [0, -1]] = False
    spacing = (3.0, 0.7, 0.9)
    found = centreline.in_plane_thickness_mm(mask, spacing)
    expected = np.stack([ndimage.distance_transform_edt(plane, sampling=spacing[1:]) for plane in mask])
    assert found.dtype == np.float32 and np.allclose(found, expected, atol=1e-5)
    assert not np.allclose(found, ndimage.distance_transform_edt(mask, sampling=spacing), atol=1e-3)  # in-plane, not 3D
    mask[7] = True  # a slice without background: as thick as the grid is wide
    assert np.allclose(centreline.in_plane_thickness_mm(mask, spacing)[7], np.hypot(40 * 0.7, 35 * 0.9))


def test_depth_is_each_voxels_3d_distance_to_the_background():
    rng = np.random.default_rng(5)
    mask = ndimage.gaussian_filter(rng.random((24, 30, 28)), 2.0) > 0.5  # blobs, some touching the grid's edge
    for spacing in (1.3, (1.2, 0.7, 0.9)):  # the working grid; any grid
        found = centreline.depth_mm(mask, spacing)
        expected = ndimage.distance_transform_edt(mask, sampling=np.broadcast_to(spacing, 3)).astype(np.float32)
        assert found.dtype == np.float32 and found.shape == mask.shape
        # the same values, so equal distances stay equal (the seeded growth's thickness levels compare them)
        assert np.allclose(found, expected, rtol=1e-6, atol=0) and len(np.unique(found)) == len(np.unique(expected))
    full = np.ones((4, 5, 6), dtype=bool)  # no background at all: scipy's convention
    assert np.allclose(centreline.depth_mm(full, 1.0), ndimage.distance_transform_edt(full))


def test_centreline_runs_through_hollow_bodies_not_the_canal_behind_them():
    # a mask that outlines three bodies in a row as thin open rings (the chest CTA's T3-T7 at
    # some tilings): in those slices the arch is the thickest part (1 mm voxels: pedicles 5 mm
    # wide, the rings 3 mm), and before the fix the line ran 16 mm back, through the canal
    ct, mask, truth = make_spine([(10.0, 20.0)] * 8, disc_mm=5.0, spacing=1.0)
    z, y, x = np.indices(mask.shape).astype(np.float32)
    body_y_mm, body_x_mm = 30.0, 1.25 * 10.0 + 75.0  # make_spine: 20 mm + radius; the half width
    core = ((y - body_y_mm) / 7.0) ** 2 + ((x - body_x_mm) / 9.5) ** 2 <= 1.0
    hollow = np.isin(truth, [3, 4, 5])
    mask = ndimage.binary_fill_holes(mask & ~(hollow & core))
    line = centreline.body_centreline(mask, 1.0, ct_hu=ct)
    hollow_slices = np.unique(np.nonzero(hollow)[0])
    solid_slices = np.unique(np.nonzero(np.isin(truth, [1, 2, 6, 7, 8]))[0])
    assert np.abs(line.y_mm[solid_slices] - body_y_mm).max() < 2.0
    assert np.abs(line.y_mm[hollow_slices] - body_y_mm).max() < 0.3 * 10.0


# ------------------------------------------------------------------------------------ split
@pytest.mark.parametrize("curve_mm", [0.0, 14.0])
def test_split_separates_every_vertebra_in_order(curve_mm):
    ct, mask, truth = make_spine(LUMBAR, curve_mm=curve_mm)
    if curve_mm == 0.0:
        assert ndimage.label(mask, structure=np.ones((3, 3, 3)))[1] == 1  # articular processes touch
    instances = split.split_vertebrae(mask, ct, 2.0)
    assert instances.max() == 5
    assert ((instances > 0) == mask).all()
    purity = _purity(instances, truth)
    # instance k is true vertebra k (top first), each holds >= 90 % of it, no two merged
    assert [purity[v][0] for v in range(1, 6)] == [1, 2, 3, 4, 5]
    assert min(share for _, share in purity.values()) >= 0.9
    for value in range(1, 6):
        assert ndimage.label(instances == value, structure=np.ones((3, 3, 3)))[1] == 1


def test_split_gives_the_spinous_process_to_its_own_vertebra():
    ct, mask, truth = make_spine(LUMBAR)
    instances = split.split_vertebrae(mask, ct, 2.0)
    # the spinous process points down, level with the next vertebra's body
    _, y, _ = np.nonzero(truth)
    far_back = np.zeros_like(mask)
    far_back[:, int(np.percentile(y, 97)) :, :] = True
    for value in range(1, 6):
        process = (truth == value) & far_back
        assert process.any()
        assert np.mean(instances[process] == value) >= 0.95


def test_split_keeps_each_arch_near_its_vertebra_where_bodies_are_missing():
    # the bodies of vertebrae 3-6 are missing from the mask (the chest CTA's hollow T3-T7 at
    # some tilings): their arches join into one bar, along which the arches of vertebrae 2 and
    # 7 would grow through the gap; each vertebra's bone stays within about one vertebra of it
    height_mm, disc_mm, radius_mm = 18.0, 5.0, 10.0
    ct, mask, truth = make_spine([(radius_mm, height_mm)] * 8, disc_mm=disc_mm, spacing=1.5)
    y = np.indices(mask.shape)[1] * 1.5
    mask &= ~(np.isin(truth, [3, 4, 5, 6]) & (y < 20.0 + 1.7 * radius_mm))
    assert ndimage.label(mask, structure=np.ones((3, 3, 3)))[1] == 1
    instances, details = split.split_vertebrae(mask, ct, 1.5, return_details=True)
    reach_mm = split.REACH_VERTEBRAE * max(height_mm + disc_mm, discs.VERTEBRA_PITCH_RADII * radius_mm)
    purity = _purity(instances, truth)
    assert len({purity[vertebra][0] for vertebra in (1, 2, 7, 8)}) == 4  # the whole vertebrae keep their own instances
    for value in range(1, int(instances.max()) + 1):
        vertebra = int(np.argmax(np.bincount(truth[instances == value])[1:])) + 1
        z_mm = np.nonzero(instances == value)[0] * 1.5
        own_mm = np.nonzero(truth == vertebra)[0] * 1.5
        assert z_mm.min() >= own_mm.min() - reach_mm, (value, vertebra)
        assert value == 1 or z_mm.max() <= own_mm.max() + reach_mm, (value, vertebra)
    geometry = evidence.vertebra_geometry(instances, details["centreline"], 1.5)
    lows = [g.arc_low_mm for g in geometry]
    assert lows == sorted(lows, reverse=True)  # every instance is placed by its own body


def test_a_level_missing_from_the_split_outline_gets_its_body_and_its_arch_in_the_larger_one():
    # the split outline lost the body of vertebra 3 and the arch of vertebra 2 grew over its arch
    # (the chest CTA in 2.5 mm slices: T6 and T7); the naming counts one level missing between
    # 2 and 4, and the larger outline (the fine pass) holds the whole vertebra
    spacing = 1.5
    ct, mask, truth = make_spine([(10.0, 18.0)] * 5, disc_mm=5.0, spacing=spacing)
    line = centreline.body_centreline(mask, spacing)
    y = np.indices(mask.shape)[1] * spacing
    centre_y = np.interp(np.indices(mask.shape)[0] * spacing, line.z_mm, line.y_mm)
    lost_body = (truth == 3) & (y - centre_y < 10.0)
    instances = np.select([truth == 1, truth == 2, (truth == 3) & ~lost_body, truth == 4, truth == 5], [1, 2, 2, 3, 4], 0).astype(np.int32)
    geometry = evidence.vertebra_geometry(instances, line, spacing)
    verse_ids = np.array([0, 16, 17, 19, 20])  # T9, T10, (T11 missing), T12, L1
    verse_labels = verse_ids[instances]
    stretches = missing_levels.missing_stretches(geometry, line, [{"below_instance": 2, "verse_ids": [18], "above_verse_id": 17, "below_verse_id": 19}])
    seeded = missing_levels.seed_missing_levels(verse_labels, mask, line, spacing, stretches)
    assert seeded == [18]
    assert np.mean(verse_labels[truth == 3] == 18) > 0.9  # body and arch
    for value, verse_id in ((1, 16), (2, 17), (4, 19), (5, 20)):
        assert np.mean(verse_labels[truth == value] == verse_id) > 0.95, verse_id
    # a larger outline that lost the body too leaves the level missing
    unchanged = verse_ids[instances]
    assert missing_levels.seed_missing_levels(unchanged, mask & ~lost_body, line, spacing, stretches) == []
    assert np.array_equal(unchanged, verse_ids[instances])


def test_a_level_missing_beside_a_segment_two_vertebrae_long_is_cut_out_of_it():
    # thick slices blurred the disc between vertebrae 3 and 4 into the split outline: one segment,
    # named after vertebra 4, with vertebra 3 counted missing above it (the chest CTA in 3 mm
    # slices: T10 and T11); the larger outline shows the disc
    spacing = 1.5
    ct, mask, truth = make_spine([(10.0, 18.0)] * 5, disc_mm=5.0, spacing=spacing)
    line = centreline.body_centreline(mask, spacing)
    z, y, x = np.indices(mask.shape) * spacing
    core = (y - np.interp(z, line.z_mm, line.y_mm)) ** 2 + (x - np.interp(z, line.z_mm, line.x_mm)) ** 2 <= 8.0**2
    disc = core & (z > z[(truth == 4) & core].max()) & (z < z[(truth == 3) & core].min())
    instances = np.select([truth == 1, truth == 2, np.isin(truth, [3, 4]) | disc, truth == 5], [1, 2, 3, 4], 0).astype(np.int32)
    geometry = evidence.vertebra_geometry(instances, line, spacing)
    assert geometry[2].arc_high_mm - geometry[2].arc_low_mm > 35.0  # one segment over both bodies
    verse_labels = np.array([0, 16, 17, 19, 20])[instances]  # T9, T10, T12 (with T11 in it), L1
    gap = {"below_instance": 2, "verse_ids": [18], "above_verse_id": 17, "below_verse_id": 19}
    (stretch,) = missing_levels.missing_stretches(geometry, line, [gap])
    assert stretch.levels == [18, 19] and stretch.missing == [18]  # the segment below holds the missing level
    assert missing_levels.seed_missing_levels(verse_labels, mask, line, spacing, [stretch]) == [18]
    for value, verse_id in ((1, 16), (2, 17), (3, 18), (4, 19), (5, 20)):
        assert np.mean(verse_labels[truth == value] == verse_id) > 0.9, verse_id


def test_a_level_skipped_beside_a_segment_two_vertebrae_long_is_not_charged_as_missing():
    # the chest CTA in 3 mm slices: T2+T3 and T4+T5 one segment each were named T4 and T5 (a
    # skip cost as much as a vertebra lost from the mask); a segment long enough for two bodies
    # holds the level skipped beside it. Same centres, the upper segment 20 or 45 mm long
    chain = naming_model._chains()["standard"]
    model = naming_model._chain_model("standard", chain)
    t2, t3, t4 = (model.names.index(v) for v in (9, 10, 11))

    def transition(upper_length_mm):
        geometry = [evidence.VertebraGeometry(150.0 - 0.5 * upper_length_mm, 150.0 + 0.5 * upper_length_mm, np.zeros(3), 9.0, 10.0, False)]
        geometry += [evidence.VertebraGeometry(100.0 - 22.0 * k, 118.0 - 22.0 * k, np.zeros(3), 9.0, 8.0, False) for k in range(4)]
        ribs = [{"right": None, "left": None}] * len(geometry)
        gaps = [{"right": None, "left": None}] * (len(geometry) + 1)
        _, _, transitions, _ = naming_model._log_likelihood_tables(model, geometry, ribs, gaps, {"bone_found": False}, {"skull_found": False}, None, (200.0, 0.0))
        return transitions[0]

    short, long = transition(18.0), transition(45.0)
    assert np.allclose(long[:, t2, t4] - short[:, t2, t4], -np.log(naming_model.MISSING_LEVEL_PRIOR))  # T2(+T3) -> T4: no level missing
    assert np.allclose(long[:, t2, t3], short[:, t2, t3])  # consecutive names: unchanged


def test_vertebra_geometry_places_an_arch_without_body_at_its_pedicles():
    # an instance that is an arch alone (its body hollow in the mask): pedicles at one level and
    # a posterior bar that runs along three vertebrae; its body range is the pedicles' level
    ct, mask, truth = make_spine([(10.0, 18.0)] * 3, disc_mm=5.0, spacing=1.5)
    line = centreline.body_centreline(mask, 1.5)
    z, y, x = np.indices(mask.shape) * 1.5
    centre_y = np.interp(z, line.z_mm, line.y_mm)
    centre_x = np.interp(z, line.z_mm, line.x_mm)
    middle = truth == 2
    pedicle_z = z[middle].mean()
    instances = np.zeros(mask.shape, dtype=np.int32)
    pedicles = (np.abs(z - pedicle_z) <= 6.0) & (y - centre_y > 8.0) & (y - centre_y < 14.0) & (np.abs(x - centre_x) < 6.0)
    bar = (y - centre_y > 14.0) & (y - centre_y < 18.0) & (np.abs(x - centre_x) < 3.0) & (z > z[mask].min()) & (z < z[mask].max())
    instances[pedicles | bar] = 1
    (geometry,) = evidence.vertebra_geometry(instances, line, 1.5)
    pedicle_arc = float(np.interp(pedicle_z, line.z_mm, line.arc_mm))
    assert pedicle_arc - 8.0 <= geometry.arc_low_mm and geometry.arc_high_mm <= pedicle_arc + 8.0


def test_split_finds_a_disc_that_osteophytes_partly_bridge():
    ct, mask, truth = make_spine(LUMBAR)
    # make_spine's geometry (2 mm voxels): bodies 26 mm, discs 8 mm, 40 mm below the column,
    # so the disc between vertebrae 2 and 3 spans z = 134-142 mm; body centre y = 35 mm,
    # x = 93.75 mm. Bone fills that disc except a central core and a slot to its back.
    z, y, x = (np.indices(mask.shape) * 2.0).astype(np.float32)
    in_disc = (z > 134.0) & (z < 142.0) & (((y - 35.0) / 15.0) ** 2 + ((x - 93.75) / 18.75) ** 2 <= 1.0)
    still_disc = ((y - 35.0) ** 2 + (x - 93.75) ** 2 <= 3.5**2) | ((y > 35.0) & (np.abs(x - 93.75) <= 2.0))
    mask = mask | (in_disc & ~still_disc)
    line = centreline.body_centreline(mask, 2.0)
    profile = discs.body_profile(mask, line, 2.0)
    dip = profile.occupancy[(profile.arc_mm > 125.0) & (profile.arc_mm < 150.0)]
    assert 0.7 <= np.nanmin(dip) <= 0.8  # a shallow dip, not a clear disc
    instances = split.split_vertebrae(mask, ct, 2.0)
    assert instances.max() == 5
    purity = _purity(instances, truth)
    assert [purity[v][0] for v in range(1, 6)] == [1, 2, 3, 4, 5]
    assert min(share for _, share in purity.values()) >= 0.9


def test_split_cuts_a_disc_the_mask_fills_where_the_probability_dips():
    # a disc that thick slices blur into the mask (make_spine: the disc between vertebrae 2 and 3
    # spans z = 134-142 mm): the mask merges the two vertebrae; the probability it came from is
    # 0.75 there and the split cuts it
    ct, mask, truth = make_spine(LUMBAR)
    z = np.indices(mask.shape)[0] * 2.0
    body_or_disc = ndimage.binary_closing(mask, structure=np.ones((7, 1, 1)))
    in_disc = (z > 134.0) & (z < 142.0) & body_or_disc
    mask = mask | in_disc
    assert split.split_vertebrae(mask, ct, 2.0).max() == 4
    probability = np.where(in_disc, 0.75, mask.astype(np.float32))
    instances = split.split_vertebrae(mask, ct, 2.0, probability=probability)
    assert instances.max() == 5
    purity = _purity(instances, truth)
    assert [purity[v][0] for v in range(1, 6)] == [1, 2, 3, 4, 5]


def test_split_raises_on_an_empty_mask():
    with pytest.raises(SegmentationError) as error:
        split.split_vertebrae(np.zeros((10, 10, 10), dtype=bool), None, 1.0)
    assert error.value.code == "no_spine_found"


# ------------------------------------------------------------------------------------ naming
def test_naming_from_the_sacrum():
    ct, mask, truth = make_spine(LUMBAR, sacrum=True, curve_mm=10.0)
    instances = split.split_vertebrae(mask, ct, 2.0)
    labels, info = naming.name_vertebrae(instances, ct, 2.0)
    assert info["names"] == ["L1", "L2", "L3", "L4", "L5"]
    assert info["anchors"]["bone_below"] and info["anchors"]["sacral_alae"]
    assert "sacrum" in info["method"]
    assert info["confidence"] > 0.5
    assert [_purity(labels, truth)[v][0] for v in range(1, 6)] == [20, 21, 22, 23, 24]
    _assert_anatomical(labels)


def test_naming_from_the_ribs():
    levels = [(13.5, 22.0), (14.0, 23.0), (15.0, 26.0), (15.0, 26.0)]
    ct, mask, truth = make_spine(levels, ribs=(0, 1))
    instances = split.split_vertebrae(mask, ct, 2.0)
    labels, info = naming.name_vertebrae(instances, ct, 2.0)
    assert [_purity(labels, truth)[v][0] for v in range(1, 5)] == [18, 19, 20, 21]
    assert [e["ribs"] for e in info["evidence"]] == [[True, True], [True, True], [False, False], [False, False]]
    assert info["anchors"]["lowest_rib_vertebra"] == 2
    assert info["names"] == ["T11", "T12", "L1", "L2"]
    assert info["method"] == "ribs"
    _assert_anatomical(labels)


def test_six_vertebrae_without_ribs_above_the_sacrum_are_t12_to_l5_unless_more_says_l6():
    # one rib-bearing vertebra, six without ribs, the sacrum: the last rib (T12's) is short and
    # goes unfound on about 30 % of sides (5 of 8 on the shared real CTs), so a T12 without ribs
    # (0.3 ** 2 x 0.92) is likelier than a sixth lumbar vertebra (0.05): the standard names, with
    # the L6 naming as the runner-up at about a third
    levels = [(14.0, 23.0)] + [(15.0, 26.0)] * 6
    ct, mask, _ = make_spine(levels, ribs=(0,), sacrum=True)
    instances = split.split_vertebrae(mask, ct, 2.0)
    labels, info = naming.name_vertebrae(instances, ct, 2.0)
    assert info["names"] == ["T11", "T12", "L1", "L2", "L3", "L4", "L5"] and info["chain"] == "standard"
    assert 0.5 < info["confidence"] < 0.85 and info["alternatives"][0]["names"] == "T12-L6" and info["alternatives"][0]["probability"] > 0.2
    _assert_anatomical(labels)
    assert "T12-L6" in names_uncertainty(info)  # the user is told to check the count
    # a vertebrae network that calls the segments T12, L1-L6 tips it
    votes = np.zeros(instances.shape, np.uint8)
    for instance, verse_id in enumerate((19, 20, 21, 22, 23, 24, 25), start=1):
        votes[instances == instance] = verse_id
    labels, info = naming.name_vertebrae(instances, ct, 2.0, name_votes=votes)
    assert info["names"] == ["T12", "L1", "L2", "L3", "L4", "L5", "L6"] and info["chain"] == "L6"
    _assert_anatomical(labels)


def test_names_are_uncertain_without_an_anchor_below_even_odds_or_with_a_likely_runner_up():
    anchored = {"anchored": True, "method": "sacrum", "confidence": 0.9, "alternatives": [{"names": "T11-L4", "probability": 0.08}]}
    assert names_uncertainty(anchored) is None
    assert names_uncertainty(dict(anchored, alternatives=[])) is None
    assert "No anatomical anchor" in names_uncertainty(dict(anchored, anchored=False))
    assert "confidence 0.45; the next most likely naming, T11-L4, 0.08;" in names_uncertainty(dict(anchored, confidence=0.45))
    assert "confidence 0.45; anchored by sacrum" in names_uncertainty(dict(anchored, confidence=0.45, alternatives=[]))
    close_call = names_uncertainty(dict(anchored, confidence=0.56, alternatives=[{"names": "T1-T12", "probability": 0.36}]))
    assert "T1-T12, 0.36" in close_call and "anchored by sacrum" in close_call


def test_sacrum_outweighs_a_missing_rib_view_and_lumbar_ribs_are_not_invented():
    # no ribs anywhere, sacrum below: the rib evidence must say "no rib" for every vertebra
    ct, mask, _ = make_spine(LUMBAR, sacrum=True)
    instances = split.split_vertebrae(mask, ct, 2.0)
    _, info = naming.name_vertebrae(instances, ct, 2.0)
    assert all(e["ribs"] == [False, False] for e in info["evidence"])
    assert info["names"][-1] == "L5"


def test_ribs_outside_the_field_of_view_are_unknown():
    ct, mask, _ = make_spine(LUMBAR, half_width_mm=30.0)  # the scan ends just beside the bodies
    instances = split.split_vertebrae(mask, ct, 2.0)
    _, info = naming.name_vertebrae(instances, ct, 2.0)
    assert all(e["ribs"] == [None, None] for e in info["evidence"])


def test_naming_from_the_skull_splits_atlas_from_axis():
    cervical = [(8.0, 14.0), (7.5, 13.0), (7.5, 13.0), (7.5, 13.0)]
    ct, mask, truth = make_spine(cervical, spacing=1.0, disc_mm=5.0, atlas=True, skull=True)
    instances, details = split.split_vertebrae(mask, ct, 1.0, return_details=True)
    assert instances.max() == 4  # C1 has no body: it arrives together with C2
    labels, info = naming.name_vertebrae(instances, ct, 1.0, centreline=details["centreline"])
    assert info["anchors"]["skull"]
    assert info["names"] == ["C1", "C2", "C3", "C4", "C5"]
    purity = _purity(labels, truth)
    assert [purity[v][0] for v in range(1, 6)] == [1, 2, 3, 4, 5]
    assert purity[1][1] >= 0.8 and purity[2][1] >= 0.9
    _assert_anatomical(labels)


def test_an_atlas_split_off_on_its_own_is_named_c1_alone():
    # a network's mask often leaves a gap between the atlas and C2 (the dens is thin): the top
    # segment is then C1 alone, and the first rib-bearing vertebra (T1) is the 8th segment
    cervical = [(6.0, 8.0)] + [(8.0, 14.0)] + [(7.5, 13.0)] * 5
    thoracic = [(9.0, 16.0)] * 3
    ct, mask, truth = make_spine(cervical + thoracic, spacing=1.5, disc_mm=5.0, ribs=(7, 8, 9))
    instances, details = split.split_vertebrae(mask, ct, 1.5, return_details=True)
    assert instances.max() == 10
    labels, info = naming.name_vertebrae(instances, ct, 1.5, centreline=details["centreline"])
    assert [e["ribs"] for e in info["evidence"]] == [[False, False]] * 7 + [[True, True]] * 3
    assert info["names"] == ["C1", "C2", "C3", "C4", "C5", "C6", "C7", "T1", "T2", "T3"]
    assert [_purity(labels, truth)[v][0] for v in range(1, 11)] == list(range(1, 11))
    _assert_anatomical(labels)


def test_without_any_anchor_the_confidence_stays_low():
    ct, mask, _ = make_spine([(15.0, 26.0)] * 3, margin_below_mm=0.0, margin_above_mm=0.0)  # cut at both ends
    instances = split.split_vertebrae(mask, ct, 2.0)
    labels, info = naming.name_vertebrae(instances, ct, 2.0)
    assert info["method"] == "body size only"
    assert info["confidence"] < 0.5
    assert len(info["names"]) == 3
    _assert_anatomical(labels)


def test_upper_sacrum_is_found_below_l5_and_is_the_same_as_over_the_whole_grid(monkeypatch):
    from SpineContextSegLib.anatomy import sacrum as sacrum_module
    from SpineContextSegLib.labels import vertebra_by_name

    ct, mask, truth = make_spine(LUMBAR, sacrum=True)
    verse = np.zeros(truth.shape, dtype=np.uint8)
    for index, name in enumerate(["L1", "L2", "L3", "L4", "L5"], start=1):
        verse[truth == index] = vertebra_by_name(name).value
    line = centreline.body_centreline(mask, 2.0)
    found = sacrum_module.segment_upper_sacrum(verse, ct, line, 2.0)
    assert found.sum() * 8e-3 > 5.0 and np.nonzero(found)[0].max() < np.nonzero(truth == 5)[0].min() and not (found & mask).any()
    # the closing and filling work in the bone's box plus two voxels: the same as over the whole grid
    monkeypatch.setattr(sacrum_module, "_padded_box", lambda array, pad: (slice(None),) * array.ndim)
    assert np.array_equal(sacrum_module.segment_upper_sacrum(verse, ct, line, 2.0), found)


# ------------------------------------------------------------------------------------ images
def test_label_vertebrae_returns_verse_ids_on_the_input_grid():
    sitk = pytest.importorskip("SimpleITK")
    ct, mask, truth = make_spine(LUMBAR, sacrum=True)
    # store it as sagittal slabs (PIR), the way VerSe files come, with 2 x 1.5 x 1.5 mm voxels
    def image(array, pixel):
        img = sitk.GetImageFromArray(array.astype(pixel))
        img.SetSpacing((2.0, 2.0, 2.0))
        return img

    ct_img = image(ct, np.float32)
    pir = sitk.Image([int(ct.shape[1] * 2 / 1.5), int(ct.shape[0] * 2 / 1.5), int(ct.shape[2])], sitk.sitkFloat32)
    pir.SetSpacing((1.5, 1.5, 2.0))
    pir.SetDirection((0, 0, 1, 1, 0, 0, 0, -1, 0))  # i -> P, j -> I, k -> L
    pir.SetOrigin((0.0, 0.0, (ct.shape[0] - 1) * 2.0))
    ct_pir = sitk.Resample(ct_img, pir, sitk.Transform(), sitk.sitkLinear, -1000.0)
    mask_pir = sitk.Resample(image(mask, np.uint8), pir, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    truth_pir = sitk.GetArrayFromImage(sitk.Resample(image(truth, np.uint8), pir, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))

    labels_img, info = vertebra_labelling.label_vertebrae(mask_pir, ct_pir)
    assert labels_img.GetSize() == mask_pir.GetSize()
    assert labels_img.GetDirection() == mask_pir.GetDirection()
    assert labels_img.GetPixelID() == sitk.sitkUInt8
    labels = sitk.GetArrayFromImage(labels_img)
    assert ((labels > 0) == (sitk.GetArrayFromImage(mask_pir) > 0)).all()
    assert info["names"] == ["L1", "L2", "L3", "L4", "L5"]
    purity = _purity(labels, truth_pir)
    assert [purity[v][0] for v in range(1, 6)] == [20, 21, 22, 23, 24]
    assert min(share for _, share in purity.values()) >= 0.9
    for value in range(20, 25):
        assert ndimage.label(labels == value, structure=np.ones((3, 3, 3)))[1] == 1


def _lumbar_spine_images():
    """A lumbar spine with the sacrum (:func:`make_spine`) as SimpleITK images: ``ct, mask, ct_img, mask_img`` (2 mm voxels)."""
    sitk = pytest.importorskip("SimpleITK")
    ct, mask, _ = make_spine(LUMBAR, sacrum=True)
    ct_img = sitk.GetImageFromArray(ct)
    ct_img.SetSpacing((2.0, 2.0, 2.0))
    mask_img = sitk.GetImageFromArray(mask.astype(np.uint8))
    mask_img.CopyInformation(ct_img)
    return ct, mask, ct_img, mask_img


def test_label_vertebrae_can_add_the_sacrum_outside_the_mask():
    sitk = pytest.importorskip("SimpleITK")
    _, mask, ct_img, mask_img = _lumbar_spine_images()
    labels_img, info = vertebra_labelling.label_vertebrae(mask_img, ct_img, spacing_mm=2.0, include_sacrum=True)
    labels = sitk.GetArrayFromImage(labels_img)
    sacrum = labels == 26
    assert info["sacrum_ml"] > 10.0 and sacrum.any()
    assert not (sacrum & mask).any()
    assert ndimage.center_of_mass(sacrum)[0] < ndimage.center_of_mass(labels == 24)[0]
    _assert_anatomical(labels)


def test_label_vertebrae_fills_a_wider_fit_mask_with_the_labels_made_on_the_mask():
    # the pipeline splits and names the network's outline, then the labels fill the outline moved
    # to the bone (one voxel wider here): what the mask holds keeps its label, every added voxel
    # takes a label of the vertebra it touches
    sitk = pytest.importorskip("SimpleITK")
    _, mask, ct_img, mask_img = _lumbar_spine_images()
    wider = ndimage.binary_dilation(mask, structure=ndimage.generate_binary_structure(3, 1))
    wider_img = sitk.GetImageFromArray(wider.astype(np.uint8))
    wider_img.CopyInformation(ct_img)
    plain, _ = vertebra_labelling.label_vertebrae(mask_img, ct_img, spacing_mm=2.0, include_sacrum=True)
    filled, info = vertebra_labelling.label_vertebrae(mask_img, ct_img, spacing_mm=2.0, include_sacrum=True, fit_mask=wider_img)
    plain, filled = sitk.GetArrayFromImage(plain), sitk.GetArrayFromImage(filled)
    np.testing.assert_array_equal(filled[mask], plain[mask])
    added = wider & ~mask
    assert (filled[added] > 0).all() and info["unlabelled_ml"] == 0.0
    assert not ((filled > 0) & (filled != 26) & ~wider).any()  # vertebra labels stay inside the masks
    for z, y, x in np.argwhere(added & (filled != 26))[::7]:
        around = plain[max(0, z - 1) : z + 2, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
        assert filled[z, y, x] in set(around[around > 0].tolist())
    _assert_anatomical(filled)
    elsewhere = sitk.Image(wider_img)
    elsewhere.SetOrigin((5.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="fit_mask"):
        vertebra_labelling.label_vertebrae(mask_img, ct_img, spacing_mm=2.0, fit_mask=elsewhere)


def test_label_vertebrae_rejects_an_empty_mask():
    sitk = pytest.importorskip("SimpleITK")
    ct = sitk.Image([20, 20, 20], sitk.sitkFloat32)
    with pytest.raises(SegmentationError) as error:
        vertebra_labelling.label_vertebrae(sitk.Image([20, 20, 20], sitk.sitkUInt8), ct)
    assert error.value.code == "no_spine_found"


def _with_sacral_fragment(ct, mask, truth, depth_mm=10.0, spacing=2.0):
    """Add the top ``depth_mm`` of the S1 body's middle (bone in the CT below the lowest vertebra) to the mask."""
    lowest = truth == truth.max()
    z_lowest = np.nonzero(lowest.any(axis=(1, 2)))[0].min()
    below = np.zeros_like(mask)
    below[max(0, z_lowest - int(round((8.0 + depth_mm) / spacing))) : z_lowest - int(round(8.0 / spacing))] = True
    fragment = below & (ct >= 200.0) & (np.abs(np.arange(ct.shape[2]) * spacing - ct.shape[2] * spacing / 2)[None, None, :] <= 8.0)
    return mask | fragment, fragment


def test_a_piece_of_the_sacrum_in_the_mask_is_not_named_as_a_vertebra():
    sitk = pytest.importorskip("SimpleITK")
    ct, mask, truth = make_spine(LUMBAR, sacrum=True)
    mask_with_fragment, fragment = _with_sacral_fragment(ct, mask, truth)
    assert fragment.sum() * 8 / 1000 > 1.0  # more than min_vertebra_ml: split_vertebrae keeps it as a segment
    instances, details = split.split_vertebrae(mask_with_fragment, ct, 2.0, return_details=True)
    assert instances.max() == 6
    assert evidence.caudal_fragment(instances, details["centreline"], 2.0) == 6

    ct_img = sitk.GetImageFromArray(ct)
    ct_img.SetSpacing((2.0, 2.0, 2.0))
    mask_img = sitk.GetImageFromArray(mask_with_fragment.astype(np.uint8))
    mask_img.CopyInformation(ct_img)
    for include_sacrum in (False, True):
        labels_img, info = vertebra_labelling.label_vertebrae(mask_img, ct_img, spacing_mm=2.0, include_sacrum=include_sacrum)
        labels = sitk.GetArrayFromImage(labels_img)
        assert info["names"] == ["L1", "L2", "L3", "L4", "L5"] and info["sacral_fragment_in_mask"]
        assert "sacrum" in info["method"]
        assert not np.isin(labels[fragment], np.arange(1, 26)).any()  # no vertebra took the fragment
        assert (labels[fragment] == 26).mean() >= (0.9 if include_sacrum else 0.0)
        assert [_purity(labels, truth)[v][0] for v in range(1, 6)] == [20, 21, 22, 23, 24]
        _assert_anatomical(labels)


def test_an_under_segmented_lowest_vertebra_stays_a_vertebra():
    # L5 with only its upper third in the mask: small, but its body is as wide as L4's
    ct, mask, truth = make_spine(LUMBAR, sacrum=True)
    l5 = truth == 5
    z = np.nonzero(l5.any(axis=(1, 2)))[0]
    mask = mask & ~(l5 & (np.arange(ct.shape[0]) < z.min() + 0.66 * (z.max() - z.min()))[:, None, None])
    instances, details = split.split_vertebrae(mask, ct, 2.0, return_details=True)
    assert instances.max() == 5
    assert evidence.caudal_fragment(instances, details["centreline"], 2.0) == 0



def test_bone_below_the_column_is_judged_on_the_part_the_scan_shows():
    # 1.5 ml of bone below the lowest vertebra: too little for a fully visible region, but it
    # fills the quarter of the region that a scan ending just inside S1 (or a narrow slab) shows
    found = {"fov_share": 0.25, "central_ml": 1.4, "lateral_ml": 0.1, "lateral_sides": 0, "piece_ml": 30.0}
    assert naming._end_evidence(found, caudal=True)["bone_found"]
    assert not naming._end_evidence(dict(found, fov_share=1.0), caudal=True)["bone_found"]
    assert not naming._end_evidence(dict(found, fov_share=0.05, central_ml=0.3), caudal=True)["bone_found"]  # a quarter at least


def test_a_sacral_piece_below_a_thinned_l5_is_still_the_sacrum():
    # verse014 with this model: the mask lost the outer part of the L5 body and took in the top
    # of S1. Compared only with the thin L5 above it, the S1 piece would pass for a vertebra
    # (an "L6" that shifts every name up by one); the column's typical vertebra tells.
    ct, mask, truth = make_spine(LUMBAR, sacrum=True)
    mask, fragment = _with_sacral_fragment(ct, mask, truth)
    centre_x = ct.shape[2] * 2.0 / 2
    far_from_midline = np.abs(np.arange(ct.shape[2]) * 2.0 - centre_x)[None, None, :] > 7.0
    l5_body_rim = (truth == 5) & far_from_midline & (np.arange(ct.shape[1]) * 2.0 < 20.0 + 2.0 * 15.0)[None, :, None]
    mask = mask & ~l5_body_rim
    instances, details = split.split_vertebrae(mask, ct, 2.0, return_details=True)
    assert instances.max() == 6
    assert (instances[(truth == 5) & mask] == 5).mean() > 0.5 and not (truth[instances == 5] == 4).any()  # the thinned L5 is still a vertebra of its own
    thickest = [centreline.in_plane_thickness_mm(np.pad(instances == v, 1), 2.0).max() for v in (4, 5, 6)]
    assert thickest[2] >= 0.8 * thickest[1]  # as thick as the thinned L5: the old test kept it
    assert evidence.caudal_fragment(instances, details["centreline"], 2.0) == 6


def test_a_spinous_process_stays_with_its_vertebra_when_the_mask_bridges_to_the_one_below():
    # a network's mask often fills the facet joints and the gap between a spinous process and
    # the lamina below; the spinous process must still be exported with its own vertebra
    spacing, radius = 2.0, 15.0
    ct, mask, truth = make_spine(LUMBAR, spacing=spacing)
    z, y, x = (np.arange(n) * spacing for n in ct.shape)
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    centre_x, centre_y = ct.shape[2] * spacing / 2, 20.0 + radius
    bridged = mask.copy()
    for value in range(1, 5):
        body_bottom = np.nonzero(((truth == value) & (y < centre_y + radius)).any(axis=(1, 2)))[0].min() * spacing
        bridged |= (z >= body_bottom - 13) & (z <= body_bottom - 5) & (y >= centre_y + 1.9 * radius) & (y <= centre_y + 3.3 * radius) & (np.abs(x - centre_x) <= 3.0)
        for side in (-1.0, 1.0):  # facet joints
            bridged |= (z >= body_bottom - 9) & (z <= body_bottom + 1) & (y >= centre_y + 1.5 * radius) & (y <= centre_y + 2.1 * radius) & (np.abs(x - centre_x - side * 0.6 * radius) <= 4.0)
    assert ndimage.label(bridged, structure=np.ones((3, 3, 3)))[1] == 1  # one piece: the arches touch
    instances = split.split_vertebrae(bridged, ct, spacing)
    assert instances.max() == 5
    spinous = y >= centre_y + 2.3 * radius
    for value in range(1, 6):
        own = instances[(truth == value) & spinous]
        assert (own == value).mean() >= 0.95, f"vertebra {value}: its spinous process went to {np.bincount(own)}"


# ------------------------------------------------------------------------------------ network votes
THORACIC = [(12.0, 20.0)] * 4


def votes_from(truth, verse_ids):
    """A stand-in vertebrae network: every voxel of true vertebra k votes ``verse_ids[k - 1]``."""
    lookup = np.zeros(int(truth.max()) + 1, dtype=np.uint8)
    lookup[1:] = verse_ids
    return lookup[truth]


def test_network_name_shares_are_per_segment_vote_fractions():
    instances = np.array([[[1, 1, 1, 2, 2, 0, 3]]])
    votes = np.array([[[20, 20, 21, 22, 0, 24, 0]]], dtype=np.uint8)
    shares = naming_model.network_name_shares(instances, votes, 3)
    assert shares.shape == (3, 29)
    assert shares[0, 20] == pytest.approx(2 / 3) and shares[0, 21] == pytest.approx(1 / 3)
    assert shares[1, 22] == 1.0  # the unvoted voxel does not dilute it; the vote outside any segment is ignored
    assert shares[2].sum() == 0.0


def test_network_votes_name_a_thoracic_run_that_ribs_alone_cannot_place():
    ct, mask, truth = make_spine(THORACIC, ribs=(0, 1, 2, 3), margin_below_mm=0.0, margin_above_mm=0.0)
    instances = split.split_vertebrae(mask, ct, 2.0)
    _, alone = naming.name_vertebrae(instances, ct, 2.0)
    assert alone["confidence"] < 0.5  # four rib-bearing vertebrae could be any four of T1-T12
    labels, info = naming.name_vertebrae(instances, ct, 2.0, name_votes=votes_from(truth, [13, 14, 15, 16]))
    assert info["names"] == ["T6", "T7", "T8", "T9"]
    assert "network" in info["method"] and info["confidence"] > 0.9
    assert [e["network"] for e in info["evidence"]] == ["T6", "T7", "T8", "T9"]
    _assert_anatomical(labels)


def test_votes_out_of_anatomical_order_still_give_a_chain_the_anchors_agree_with():
    ct, mask, truth = make_spine(LUMBAR, sacrum=True)
    instances = split.split_vertebrae(mask, ct, 2.0)
    # the network swaps the top two and calls the lowest one L4 again: no duplicates, no gaps come out
    labels, info = naming.name_vertebrae(instances, ct, 2.0, name_votes=votes_from(truth, [21, 20, 22, 23, 23]))
    assert info["names"] == ["L1", "L2", "L3", "L4", "L5"]
    _assert_anatomical(labels)
