"""Synthetic spine phantoms: determinism, label correctness, grid handling and options."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.labels import CRANIO_CAUDAL_ORDER, SACRUM_ID
from SpineContextSegLib.phantoms.canvas import TISSUE_CODES
from SpineContextSegLib.phantoms.generator import generate_phantom

CLEAN = dict(noise_hu=0.0, blur_mm=0.0)


def arrays(phantom):
    return (sitk.GetArrayFromImage(phantom.ct), sitk.GetArrayFromImage(phantom.vertebra_labels),
            sitk.GetArrayFromImage(phantom.spine_mask), sitk.GetArrayFromImage(phantom.tissue))


def centroids_mm(label_image):
    """{VerSe id: physical centroid (x, y, z) in mm} of a label image (any direction)."""
    labels = sitk.GetArrayFromImage(label_image)
    spacing = np.array(label_image.GetSpacing())
    direction = np.array(label_image.GetDirection()).reshape(3, 3)
    origin = np.array(label_image.GetOrigin())
    out = {}
    for value in np.unique(labels):
        if value == 0:
            continue
        k, j, i = np.nonzero(labels == value)
        index = np.stack([i, j, k], axis=1).mean(axis=0)
        out[int(value)] = origin + direction @ (spacing * index)
    return out


def world_to_index(image, point):
    return image.TransformPhysicalPointToIndex([float(c) for c in point])


@pytest.fixture(scope="module")
def lumbar():
    return generate_phantom(11, first_level="T12", last_level="S", spacing_mm=(3.0, 3.0, 3.0),
                            field_of_view="torso", screws=False, fracture_level="none", **CLEAN)


def test_same_seed_is_identical_and_other_seed_differs():
    kwargs = dict(first_level="L2", last_level="L5", spacing_mm=(4.0, 4.0, 4.0))
    a, b, c = (generate_phantom(seed, **kwargs) for seed in (3, 3, 4))
    for x, y in zip(arrays(a), arrays(b)):
        assert np.array_equal(x, y)
    assert a.params == b.params
    assert a.ct.GetOrigin() == b.ct.GetOrigin()
    ct_a, ct_c = arrays(a)[0], arrays(c)[0]
    assert ct_a.shape != ct_c.shape or not np.array_equal(ct_a, ct_c)
    assert a.params != c.params
    json.dumps(a.params)  # JSON-serialisable


@pytest.mark.parametrize("seed, first, last", [(1, "C1", "C7"), (2, "T3", "T10"), (5, "L1", "S"), (6, None, None)])
def test_levels_present_in_cranio_caudal_order(seed, first, last):
    phantom = generate_phantom(seed, first_level=first, last_level=last, spacing_mm=(3.5, 3.5, 3.5), **CLEAN)
    ct, labels, mask, tissue = arrays(phantom)
    present = sorted(set(np.unique(labels).tolist()) - {0})
    assert sorted(phantom.levels) == present
    assert 4 <= len(phantom.levels) <= 26
    chain = phantom.params["chain"]  # C1 ... sacrum, with T13/L6 where drawn
    assert [v for v in CRANIO_CAUDAL_ORDER if v in chain] == chain
    order = [chain.index(v) for v in phantom.levels]
    assert np.all(np.diff(order) == 1)  # consecutive, cranio-caudal
    z = [centroids_mm(phantom.vertebra_labels)[v][2] for v in phantom.levels]
    assert np.all(np.diff(z) < 0), z  # superior first
    # Most labelled voxels are bone.
    assert np.mean(ct[labels > 0] > 100) > 0.7
    # Each vertebra is a single 26-connected component.
    for value in present:
        _, count = ndimage.label(labels == value, structure=np.ones((3, 3, 3)))
        assert count == 1, (value, count)
    # The binary mask is exactly the vertebrae without the sacrum.
    expected = np.isin(labels, list(range(1, 26)) + [28])
    assert np.array_equal(mask.astype(bool), expected)
    assert mask.dtype == np.uint8 and labels.dtype == np.uint8 and ct.dtype == np.int16


def test_discs_are_unlabelled_soft_tissue(lumbar):
    ct, labels, _, tissue = arrays(lumbar)
    centres = lumbar.params["vertebra_centres_mm"]
    checked = 0
    for upper, lower in zip(lumbar.levels[:-1], lumbar.levels[1:]):
        if SACRUM_ID in (upper, lower):
            continue
        midpoint = 0.5 * (np.array(centres[str(upper)]) + np.array(centres[str(lower)]))
        i, j, k = world_to_index(lumbar.ct, midpoint)
        assert labels[k, j, i] == 0
        assert ct[k, j, i] < 200
        assert tissue[k, j, i] == TISSUE_CODES["disc"]
        checked += 1
    assert checked >= 4
    disc = tissue == TISSUE_CODES["disc"]
    assert disc.sum() > 50 and not np.any(labels[disc]) and np.all(ct[disc] < 200)


def test_ribs_and_pelvis_are_unlabelled_bone():
    phantom = generate_phantom(8, first_level="T9", last_level="S", spacing_mm=(3.0, 3.0, 3.0), field_of_view="torso")
    ct, labels, mask, tissue = arrays(phantom)
    for name in ("rib", "pelvis"):
        voxels = (tissue == TISSUE_CODES[name]) & (mask == 0)
        assert voxels.sum() > 100, name
        assert not np.any(labels[voxels]), name
        assert np.median(ct[voxels]) > 300, name
    sacrum = labels == SACRUM_ID
    assert sacrum.sum() > 100 and not np.any(mask[sacrum])


def test_grid_changes_keep_the_anatomy_in_place():
    kwargs = dict(first_level="T11", last_level="L3", field_of_view="spine", **CLEAN)
    reference = generate_phantom(21, spacing_mm=(3.0, 3.0, 3.0), **kwargs)
    permuted_flipped = [0, 0, -1, 1, 0, 0, 0, -1, 0]  # i -> +y, j -> -z, k -> -x
    angle = np.radians(25.0)
    oblique = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    oblique = oblique @ np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
    reference_centroids = centroids_mm(reference.vertebra_labels)
    for spacing, direction in (((2.5, 3.5, 4.0), None), ((3.0, 2.0, 3.5), permuted_flipped), ((3.0, 3.0, 3.0), oblique.reshape(-1))):
        other = generate_phantom(21, spacing_mm=spacing, direction=direction, **kwargs)
        assert np.allclose(other.ct.GetSpacing(), spacing)
        expected_direction = np.eye(3).reshape(-1) if direction is None else np.asarray(direction, dtype=float)
        assert np.allclose(other.ct.GetDirection(), expected_direction)
        assert other.vertebra_labels.GetDirection() == other.ct.GetDirection()
        assert other.spine_mask.GetSize() == other.ct.GetSize()
        moved = centroids_mm(other.vertebra_labels)
        assert sorted(moved) == sorted(reference_centroids)
        tolerance = 1.5 * max(max(spacing), 3.0)
        for value, centre in reference_centroids.items():
            assert np.linalg.norm(moved[value] - centre) < tolerance, (value, moved[value], centre)


def test_osteoporosis_lowers_vertebral_body_density():
    kwargs = dict(first_level="L1", last_level="L4", spacing_mm=(3.0, 3.0, 3.0), field_of_view="slab", **CLEAN)
    healthy = generate_phantom(9, osteoporosis=0.0, **kwargs)
    porotic = generate_phantom(9, osteoporosis=1.0, **kwargs)
    ct_h, labels_h = arrays(healthy)[:2]
    ct_p, labels_p = arrays(porotic)[:2]
    assert np.array_equal(labels_h, labels_p)
    assert ct_p[labels_p > 0].mean() < ct_h[labels_h > 0].mean() - 40


def test_cortical_hu_dims_the_bone_rim_and_leaves_soft_tissue():
    kwargs = dict(first_level="L1", last_level="L4", spacing_mm=(2.0, 2.0, 2.0), field_of_view="slab", **CLEAN)
    default = generate_phantom(9, **kwargs)
    dim = generate_phantom(9, cortical_hu=400.0, **kwargs)
    ct_d, labels_d = arrays(default)[:2]
    ct_m, labels_m = arrays(dim)[:2]
    assert np.array_equal(labels_d, labels_m)
    assert dim.params["hu"]["cortical"] == 400.0 and default.params["hu"]["cortical"] >= 700.0
    spine = labels_m > 0
    rim = spine & ~ndimage.binary_erosion(spine)
    # the outer voxel layer of the labels is cortex: about 400 HU now (a real vertebra's rim on a
    # 2 mm grid: 277-403), well below the default's
    assert 300.0 < np.median(ct_m[rim]) < 500.0 < np.median(ct_d[rim])
    # away from the labels only other bones' cortex changes (sacrum, pelvis, ribs); soft tissue not
    changed = (ct_m != ct_d) & ~ndimage.binary_dilation(spine, iterations=3)
    assert changed.any() and (ct_d[changed] >= 500).all()


def test_screws_are_metal_dense():
    kwargs = dict(first_level="L1", last_level="L4", spacing_mm=(3.0, 3.0, 3.0), field_of_view="spine")
    with_screws = generate_phantom(12, screws=["L2", "L3"], **kwargs)
    without = generate_phantom(12, screws=False, **kwargs)
    assert (arrays(with_screws)[0] > 2000).sum() > 10
    assert with_screws.params["screws"] == [21, 22]
    assert (arrays(without)[0] > 2000).sum() == 0


def test_fracture_lowers_the_body():
    kwargs = dict(first_level="L1", last_level="L3", spacing_mm=(3.0, 3.0, 3.0), field_of_view="slab", **CLEAN)
    intact = generate_phantom(14, fracture_level="none", **kwargs)
    broken = generate_phantom(14, fracture_level="L2", fracture_severity=0.5, **kwargs)
    count = lambda phantom: int((arrays(phantom)[1] == 21).sum())  # noqa: E731
    assert count(broken) < 0.9 * count(intact)
    assert broken.params["fracture_level"] == 21


def test_slab_is_narrow_and_torso_is_wide():
    kwargs = dict(first_level="T12", last_level="L3", spacing_mm=(4.0, 4.0, 4.0))
    slab = generate_phantom(16, field_of_view="slab", **kwargs)
    torso = generate_phantom(16, field_of_view="torso", **kwargs)
    width = lambda phantom: phantom.ct.GetSize()[0] * phantom.ct.GetSpacing()[0]  # noqa: E731
    assert width(slab) <= 100 + 2 * 4.0
    assert width(torso) > 250
    assert arrays(slab)[1].any()


def test_contrast_makes_the_aorta_bright_and_unlabelled():
    kwargs = dict(first_level="T12", last_level="L3", spacing_mm=(3.0, 3.0, 3.0), field_of_view="spine", **CLEAN)
    ct, labels, _, tissue = arrays(generate_phantom(17, contrast=True, **kwargs))
    blood = tissue == TISSUE_CODES["blood"]
    aorta = blood & (ct > 240)  # the aorta; the vena cava enhances less
    assert aorta.sum() > 50 and not labels[blood].any()
    ct_plain, _, _, tissue_plain = arrays(generate_phantom(17, contrast=False, **kwargs))
    assert np.all(ct_plain[tissue_plain == TISSUE_CODES["blood"]] < 100)


def test_invalid_grid_raises_geometry_error():
    with pytest.raises(SegmentationError) as error:
        generate_phantom(0, spacing_mm=(0.1, 2.0, 2.0))
    assert error.value.code == "input_geometry"
    with pytest.raises(SegmentationError):
        generate_phantom(0, direction=[1, 0, 0, 0, 2, 0, 0, 0, 1])
    with pytest.raises(ValueError):
        generate_phantom(0, first_level="L3", last_level="L1")


# --------------------------------------------------------------------------------------
# Real bone shapes, costovertebral joints, scapulae, streaks (anatomy="real")


def voxel_points_mm(image, mask):
    """Physical (x, y, z) mm of the voxels where ``mask`` (numpy order) is true."""
    k, j, i = np.nonzero(mask)
    index = np.stack([i, j, k], axis=1).astype(float)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + (index * np.array(image.GetSpacing())) @ direction.T


@pytest.fixture(scope="module")
def thorax_real():
    return generate_phantom(5, first_level="T2", last_level="T10", spacing_mm=(1.5, 1.5, 1.5), field_of_view="spine",
                            anatomy="real", screws=False, fracture_level="none", streaks_hu=0.0, **CLEAN)


def test_bone_shapes_sit_in_the_vertebra_frame():
    from SpineContextSegLib.phantoms.bone_shapes import load_bone_shapes

    shapes = load_bone_shapes()
    assert set(map(str, range(8, 25))) <= set(shapes) and "scapula" in shapes
    for key in map(str, range(8, 25)):
        template = shapes[key]
        width, depth, height = template.body_mm
        one = np.ones(3)
        distance = lambda u, v, w: float(template.distance_mm(np.array([u]), np.array([v]), np.array([w]), one)[0])  # noqa: E731
        assert 25 < width < 50 and 15 < depth < 40 and 12 < height < 35, key
        assert distance(0, 0, 0) < -3, key  # the body's centre is deep in bone
        assert distance(0, -0.5 * depth - 3, 0) > 0, key  # air in front of the body
        assert distance(0, 0.5 * depth + 6, 0) > 0, key  # the spinal canal behind it
        posterior = [distance(0, v, w) for v in np.arange(0.5 * depth + 20, 0.5 * depth + 45, 1.0) for w in np.arange(-40, 10, 1.0)]
        assert min(posterior) < 0, key  # the spinous process
        assert distance(0.5 * width + 25, 0.5 * depth + 15, 0) > -20, key  # clipped map: sane far away


def test_real_shapes_label_each_level_once_and_exactly(thorax_real):
    ct, labels, mask, tissue = arrays(thorax_real)
    assert thorax_real.params["anatomy"] == "real"
    assert thorax_real.params["levels_present"] == list(range(9, 18))
    for level in range(9, 18):
        vertebra = labels == level
        _, pieces = ndimage.label(vertebra, structure=np.ones((3, 3, 3)))
        assert pieces == 1, level
        assert np.all(tissue[vertebra] == TISSUE_CODES["vertebra"]), level
        assert 5 < vertebra.sum() * 1.5 ** 3 / 1000 < 60, level  # ml: a thoracic vertebra
    assert np.array_equal(mask > 0, labels > 0)  # no sacrum drawn: the mask is every label


def test_rib_heads_meet_their_vertebra_at_the_disc_above(thorax_real):
    """Rib n's head touches the top of vertebra Tn (the costovertebral joint), not its middle."""
    ct, labels, mask, tissue = arrays(thorax_real)
    rib = tissue == TISSUE_CODES["rib"]
    centres = thorax_real.params["vertebra_centres_mm"]
    axes = thorax_real.params["vertebra_axes"]
    heights = []
    for level in range(10, 18):  # T3-T10 (the top drawn level's neighbour above is not drawn)
        touching = rib & ndimage.binary_dilation(labels == level, iterations=1)
        assert touching.sum() >= 4, f"no rib meets level {level}"
        points = voxel_points_mm(thorax_real.ct, touching)
        local = (points - np.array(centres[str(level)])) @ np.array(axes[str(level)]).T  # (u, v, w) mm
        assert np.all(np.abs(local[:, 0]) > 5), level  # on both sides, not in the midline
        assert set(np.sign(np.round(local[:, 0]))) == {-1.0, 1.0}, level
        heights.append(np.median(local[:, 2]))
    # the heads sit at the upper end of the body (centre + 30-50 % of its height, ~6-10 mm)
    assert np.median(heights) > 4.0, heights


def test_geometric_ribs_start_at_mid_body_height():
    """The contrast to the test above: the same seed in the geometric style has no joint at the disc."""
    phantom = generate_phantom(5, first_level="T2", last_level="T10", spacing_mm=(1.5, 1.5, 1.5), field_of_view="spine",
                               anatomy="geometric", screws=False, fracture_level="none", streaks_hu=0.0, **CLEAN)
    ct, labels, mask, tissue = arrays(phantom)
    assert "scapula" not in set(np.unique(tissue).tolist()) and not np.any(tissue == TISSUE_CODES["scapula"])
    rib = tissue == TISSUE_CODES["rib"]
    heights = []
    for level in range(10, 18):
        touching = rib & ndimage.binary_dilation(labels == level, iterations=1)
        if touching.sum() >= 4:
            points = voxel_points_mm(phantom.ct, touching)
            local = (points - np.array(phantom.params["vertebra_centres_mm"][str(level)])) @ np.array(phantom.params["vertebra_axes"][str(level)]).T
            heights.append(np.median(local[:, 2]))
    assert not heights or np.median(heights) < 4.0


def test_scapulae_are_unlabelled_bone_on_the_back_of_the_chest():
    phantom = generate_phantom(6, first_level="T1", last_level="T8", spacing_mm=(3.0, 3.0, 3.0), field_of_view="torso",
                               anatomy="real", streaks_hu=0.0, **CLEAN)
    ct, labels, mask, tissue = arrays(phantom)
    scapula = tissue == TISSUE_CODES["scapula"]
    assert scapula.sum() * 27 / 1000 > 40  # ml, both sides
    assert not np.any(labels[scapula]) and np.median(ct[scapula]) > 300
    points = voxel_points_mm(phantom.ct, scapula)
    spine = voxel_points_mm(phantom.ct, labels > 0)
    left, right = points[points[:, 0] > spine[:, 0].mean()], points[points[:, 0] < spine[:, 0].mean()]
    assert len(left) > 0.3 * len(points) and len(right) > 0.3 * len(points)
    assert np.median(np.abs(points[:, 0] - spine[:, 0].mean())) > 60  # lateral to the column
    assert np.median(points[:, 1]) > np.median(spine[:, 1])  # behind the vertebral bodies (LPS: +y posterior)


def test_streaks_touch_only_the_body_and_never_the_labels():
    kwargs = dict(first_level="C7", last_level="T6", spacing_mm=(3.0, 3.0, 3.0), field_of_view="torso", anatomy="geometric", **CLEAN)
    plain, streaked = generate_phantom(9, streaks_hu=0.0, **kwargs), generate_phantom(9, streaks_hu=80.0, **kwargs)
    ct0, labels0, _, tissue0 = arrays(plain)
    ct1, labels1, _, _ = arrays(streaked)
    assert np.array_equal(labels0, labels1)
    changed = np.abs(ct1.astype(float) - ct0) > 5
    air = tissue0 == TISSUE_CODES["air"]
    assert changed.sum() > 1000 and not np.any(changed & air)
    assert np.abs(ct1.astype(float) - ct0).max() > 40


def test_unknown_anatomy_style_is_refused():
    with pytest.raises(ValueError, match="anatomy"):
        generate_phantom(1, first_level="L1", last_level="L3", spacing_mm=4.0, anatomy="cartoon")
