"""Canonical geometry and the exact way back, for oblique, flipped and anisotropic inputs."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from hypothesis import example, given, settings
from hypothesis import strategies as st

from SpineContextSegLib.inference.preprocessing import (
    body_bounding_box,
    canonical_reference,
    hu_to_unit_interval,
    physical_corners,
    resample_to_reference,
    to_canonical,
)


def rotation(axis_angle_deg):
    """Rotation matrix from three Euler angles (degrees)."""
    ax, ay, az = np.radians(axis_angle_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def voxel_centres_mm(image):
    """(N, 3) physical LPS positions of every voxel centre, in numpy (k, j, i) raster order."""
    size = image.GetSize()
    k, j, i = np.meshgrid(*(np.arange(n) for n in reversed(size)), indexing="ij")
    index = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + (index * np.array(image.GetSpacing())) @ direction.T


def test_canonical_grid_is_axis_aligned_and_covers_the_input():
    image = sitk.Image([10, 20, 30], sitk.sitkInt16)
    image.SetSpacing([1.0, 2.0, 3.0])
    image.SetDirection([0, 0, 1, 1, 0, 0, 0, 1, 0])  # i -> P... a permuted (sagittal-slab-like) layout
    reference = canonical_reference(image, [2.0, 2.0, 2.0])
    assert reference.GetDirection() == tuple(np.eye(3).ravel())
    assert reference.GetSize() == (45, 5, 20)
    inner, outer = physical_corners(image), physical_corners(reference)
    assert np.all(outer.min(0) <= inner.min(0) + 1e-9) and np.all(outer.max(0) >= inner.max(0) - 1e-9)


def test_sagittal_slab_input_puts_superior_on_numpy_axis_0():
    # PIR: i runs posterior, j inferior, k right (VerSe's sagittal slabs)
    direction = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)  # columns = i, j, k in LPS
    hu = np.full((8, 40, 20), -1000, np.int16)  # (k, j, i)
    hu[:, :5, :] = 500  # j < 5: the most superior slices (j runs inferior)
    image = sitk.GetImageFromArray(hu)
    image.SetDirection(direction.ravel().tolist())
    canonical = sitk.GetArrayFromImage(to_canonical(image, [1.0, 1.0, 1.0]))
    top_rows = canonical[-5:].mean()  # numpy axis 0 = inferior -> superior
    assert top_rows > 400 and canonical[:-6].mean() < -900


@settings(max_examples=25, deadline=None)
@given(
    size=st.tuples(st.integers(6, 24), st.integers(6, 24), st.integers(3, 20)),
    spacing=st.tuples(st.floats(0.5, 3.0), st.floats(0.5, 3.0), st.floats(0.5, 6.0)),
    origin=st.tuples(st.floats(-300, 300), st.floats(-300, 300), st.floats(-300, 300)),
    angles=st.tuples(st.floats(-40, 40), st.floats(-40, 40), st.floats(-180, 180)),
    flips=st.tuples(st.sampled_from([1, -1]), st.sampled_from([1, -1]), st.sampled_from([1, -1])),
    target=st.sampled_from([1.0, 1.5, 2.0]),
)
def test_mask_made_on_the_canonical_grid_maps_back_exactly(size, spacing, origin, angles, flips, target):
    direction = rotation(angles) @ np.diag(flips)  # oblique, possibly left-handed
    image = sitk.Image(list(size), sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction.ravel().tolist())
    reference = canonical_reference(image, [target] * 3)

    # a physical cube around the input's centre, drawn on the canonical grid
    centre = physical_corners(image).mean(axis=0)
    half = 0.3 * min(np.array(size) * np.array(spacing))
    canonical_centres = voxel_centres_mm(reference)
    inside = np.all(np.abs(canonical_centres - centre) <= half, axis=1)
    probability = sitk.GetImageFromArray(inside.reshape(tuple(reversed(reference.GetSize()))).astype(np.float32))
    probability.CopyInformation(reference)

    back = resample_to_reference(probability, image, method="linear", pixel_type=sitk.sitkFloat32)
    mask = sitk.GetArrayFromImage(back) >= 0.5
    # exactly the input grid
    assert back.GetSize() == image.GetSize()
    assert back.GetSpacing() == image.GetSpacing()
    assert back.GetOrigin() == image.GetOrigin()
    assert back.GetDirection() == image.GetDirection()
    # the cube lands on the same physical voxels, up to half a canonical voxel (diagonal)
    tolerance = 0.5 * target * np.sqrt(3)
    distance_outside = np.max(np.abs(voxel_centres_mm(image) - centre), axis=1) - half
    surely_in = (distance_outside < -tolerance).reshape(mask.shape)
    surely_out = (distance_outside > tolerance).reshape(mask.shape)
    assert mask[surely_in].all()
    assert not mask[surely_out].any()


def test_labels_resample_with_nearest_neighbour_and_keep_their_type():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:8, 2:8, 2:8] = 22
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing([0.7, 0.7, 3.0])
    canonical = to_canonical(image, [1.0, 1.0, 1.0], method="nearest")
    values = set(np.unique(sitk.GetArrayFromImage(canonical)).tolist())
    assert values == {0, 22}
    assert canonical.GetPixelID() == sitk.sitkUInt8


def test_hu_window_maps_to_unit_interval():
    hu = np.array([-3000, -1000, 500, 2000, 5000], dtype=np.int16)
    np.testing.assert_allclose(hu_to_unit_interval(hu, (-1000, 2000)), [0, 0, 0.5, 1, 1], atol=1e-6)
    assert hu_to_unit_interval(hu).dtype == np.float32


def test_body_bounding_box_excludes_air_and_keeps_a_margin():
    hu = np.full((30, 40, 50), -1000.0)
    hu[10:20, 5:30, 20:30] = 40
    box = body_bounding_box(hu, margin_voxels=2)
    assert box == (slice(8, 22), slice(3, 32), slice(18, 32))
    assert body_bounding_box(np.full((5, 5, 5), -1000.0)) == (slice(0, 5),) * 3


@settings(max_examples=15, deadline=None)
@example(angles=(0.0, 11.0, 1.1125369292536007e-308), flips=(1, 1, 1), spacing=(1.0, 1.0, 1.0))  # denormal cosines: ITK's inverse gave NaN
@given(
    angles=st.tuples(st.floats(-40, 40), st.floats(-40, 40), st.floats(-180, 180)),
    flips=st.tuples(st.sampled_from([1, -1]), st.sampled_from([1, -1]), st.sampled_from([1, -1])),
    spacing=st.tuples(st.floats(0.6, 2.0), st.floats(0.6, 2.0), st.floats(0.6, 4.0)),
)
def test_probability_on_input_grid_equals_resampling_the_whole_grid(angles, flips, spacing):
    """The bounding-box shortcut must give exactly the mask a full resampling gives, at any floor below the threshold too."""
    from SpineContextSegLib.inference.preprocessing import probability_on_input_grid

    image = sitk.Image([30, 26, 22], sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetDirection((rotation(angles) @ np.diag(flips)).ravel().tolist())
    reference = canonical_reference(image, [2.0, 2.0, 2.0])
    rng = np.random.default_rng(0)
    # below the floor everywhere (as a network's output is), above it only in a block
    probability = rng.random(tuple(reversed(reference.GetSize())), dtype=np.float32) * 0.24
    k, j, i = (n // 2 for n in probability.shape)
    probability[k - 3 : k + 4, j - 2 : j + 3, i - 4 : i + 2] = rng.random((7, 5, 6), dtype=np.float32)
    probability_image = sitk.GetImageFromArray(probability)
    probability_image.CopyInformation(reference)
    full = sitk.GetArrayFromImage(resample_to_reference(probability_image, image, method="linear", pixel_type=sitk.sitkFloat32))
    spine_box = (slice(k - 3, k + 4), slice(j - 2, j + 3), slice(i - 4, i + 2))
    for floor, within in ((0.5, None), (0.25, None), (0.25, spine_box)):
        region, block = probability_on_input_grid(probability_image, image, floor, within=within)
        fast = np.zeros(full.shape, bool)
        fast[region] = block >= floor
        assert fast.any()
        np.testing.assert_array_equal(fast, full >= floor)
