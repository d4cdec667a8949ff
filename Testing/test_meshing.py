"""Label map -> closed surface -> STL: geometry in physical LPS mm, whatever the image orientation."""
from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from SpineContextSegLib.io import meshing, stl
from SpineContextSegLib.errors import Cancelled, SegmentationError

SPACING = (0.8, 1.1, 1.6)  # anisotropic, mm
ORIGIN = (-31.0, 12.5, 140.0)


def rotation_matrix(axis, degrees):
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


# Oblique (20 degrees about a tilted axis) with the image's second axis flipped: det = -1.
OBLIQUE_FLIPPED = rotation_matrix([1.0, 0.3, 0.5], 20.0) @ np.diag([1.0, -1.0, 1.0])
GEOMETRIES = {
    "axis_aligned": np.eye(3),
    "oblique_flipped": OBLIQUE_FLIPPED,
    "pir": np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float),  # i->P, j->I, k->R
}


def make_image(labels_zyx, direction, spacing=SPACING, origin=ORIGIN):
    image = sitk.GetImageFromArray(labels_zyx.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    return image


def voxel_centres_mm(shape_zyx, direction, spacing=SPACING, origin=ORIGIN):
    """(nz, ny, nx, 3) physical LPS position of every voxel centre."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_zyx], indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(float)
    return index @ (np.asarray(direction) * np.asarray(spacing)).T + np.asarray(origin)


def sphere_labels(shape_zyx, direction, centre_mm, radius_mm, value=1, spacing=SPACING, origin=ORIGIN):
    centres = voxel_centres_mm(shape_zyx, direction, spacing, origin)
    return np.where(np.linalg.norm(centres - np.asarray(centre_mm), axis=-1) < radius_mm, value, 0).astype(np.uint8)


def volume_centre_mm(shape_zyx, direction, spacing=SPACING, origin=ORIGIN):
    index_centre = (np.asarray(shape_zyx[::-1], dtype=float) - 1) / 2
    return (np.asarray(direction) * np.asarray(spacing)) @ index_centre + np.asarray(origin)


def mask_physical_extent(mask_zyx, direction, spacing=SPACING, origin=ORIGIN):
    """Axis-aligned LPS box around every corner of every foreground voxel: (min xyz, max xyz)."""
    centres = voxel_centres_mm(mask_zyx.shape, direction, spacing, origin)[mask_zyx != 0]
    step = np.asarray(direction) * np.asarray(spacing)
    offsets = np.array([[a, b, c] for a in (-0.5, 0.5) for b in (-0.5, 0.5) for c in (-0.5, 0.5)]) @ step.T
    corners = (centres[:, None, :] + offsets[None]).reshape(-1, 3)
    return corners.min(axis=0), corners.max(axis=0)


def surface_arrays(polydata):
    from vtkmodules.util.numpy_support import vtk_to_numpy

    points = vtk_to_numpy(polydata.GetPoints().GetData()).astype(float)
    triangles = vtk_to_numpy(polydata.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    return points, triangles


def signed_volume_and_centroid(polydata):
    """Enclosed volume (positive when triangles wind outwards) and volume centroid, from tetrahedra."""
    points, triangles = surface_arrays(polydata)
    a, b, c = points[triangles[:, 0]], points[triangles[:, 1]], points[triangles[:, 2]]
    tetra_volumes = np.einsum("ij,ij->i", a, np.cross(b, c)) / 6.0
    volume = tetra_volumes.sum()
    centroid = (tetra_volumes[:, None] * (a + b + c) / 4.0).sum(axis=0) / volume
    return volume, centroid


def mass_properties_volume(polydata):
    from vtkmodules.vtkFiltersCore import vtkMassProperties

    properties = vtkMassProperties()
    properties.SetInputData(polydata)
    properties.Update()
    return properties.GetVolume()


def raw_stl_vertices(path):
    records = np.fromfile(path, dtype=stl._STL_RECORD, offset=84)
    return records["vertices"].astype(float), records["normal"].astype(float)


SHAPE = (26, 30, 34)  # (nz, ny, nx)


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def sphere_case(request):
    direction = GEOMETRIES[request.param]
    centre = volume_centre_mm(SHAPE, direction) + np.array([1.3, -0.7, 0.9])  # off the voxel grid
    labels = sphere_labels(SHAPE, direction, centre, radius_mm=9.0)
    return request.param, direction, labels, make_image(labels, direction)


@pytest.mark.parametrize("method", meshing.MESH_METHODS)
def test_surface_is_closed_outward_and_at_the_mask_position(sphere_case, method):
    name, direction, labels, image = sphere_case
    surface = meshing.labelmap_to_surface(image, 1, method=method)
    assert stl.is_watertight(surface)

    mask_volume = labels.sum() * np.prod(SPACING)
    volume, centroid = signed_volume_and_centroid(surface)
    assert volume > 0, "triangles must wind outwards (normals pointing out), also for a reflected direction"
    assert mass_properties_volume(surface) == pytest.approx(mask_volume, rel=0.10)

    mask_centroid = voxel_centres_mm(SHAPE, direction)[labels != 0].mean(axis=0)
    assert np.linalg.norm(centroid - mask_centroid) < 0.5 * min(SPACING)

    low, high = mask_physical_extent(labels, direction)
    bounds = np.asarray(surface.GetBounds()).reshape(3, 2)
    assert np.all(np.abs(bounds[:, 0] - low) < max(SPACING))
    assert np.all(np.abs(bounds[:, 1] - high) < max(SPACING))

    # Point normals agree with the winding: on a sphere they point away from the centre.
    from vtkmodules.util.numpy_support import vtk_to_numpy

    normals = vtk_to_numpy(surface.GetPointData().GetArray("Normals"))
    points, _ = surface_arrays(surface)
    assert np.mean(np.einsum("ij,ij->i", normals, points - centroid) > 0) > 0.99


def test_unsmoothed_surface_nets_encloses_exactly_the_voxels(sphere_case):
    _, _, labels, image = sphere_case
    surface = meshing.labelmap_to_surface(image, method="surface_nets", smoothing=0.0)
    assert mass_properties_volume(surface) == pytest.approx(labels.sum() * np.prod(SPACING), rel=1e-4)


def test_decimation_keeps_a_closed_surface_with_fewer_triangles():
    direction = GEOMETRIES["oblique_flipped"]
    labels = sphere_labels(SHAPE, direction, volume_centre_mm(SHAPE, direction), radius_mm=10.0)
    image = make_image(labels, direction)
    full = meshing.labelmap_to_surface(image)
    reduced = meshing.labelmap_to_surface(image, decimation=0.5)
    assert reduced.GetNumberOfPolys() < 0.7 * full.GetNumberOfPolys()
    assert stl.is_watertight(reduced)
    assert mass_properties_volume(reduced) == pytest.approx(labels.sum() * np.prod(SPACING), rel=0.10)


def test_the_threaded_vtk_backend_gives_the_sequential_surface_point_for_point(monkeypatch):
    from vtkmodules.vtkCommonCore import vtkSMPTools

    direction = GEOMETRIES["oblique_flipped"]
    labels = sphere_labels(SHAPE, direction, volume_centre_mm(SHAPE, direction), radius_mm=10.0)
    labels |= sphere_labels(SHAPE, direction, volume_centre_mm(SHAPE, direction) + 14.0, radius_mm=5.0)  # two parts
    image = make_image(labels, direction)
    tools = vtkSMPTools()

    def surface():
        return surface_arrays(meshing.labelmap_to_surface(image))

    try:
        monkeypatch.setenv("VTK_SMP_BACKEND_IN_USE", "Sequential")  # the user's choice stays
        tools.SetBackend("Sequential")
        sequential = surface()
        assert tools.GetBackend() == "Sequential"
        monkeypatch.delenv("VTK_SMP_BACKEND_IN_USE")
        threaded = surface()
        assert tools.GetBackend() == "STDThread"
    finally:
        tools.SetBackend("STDThread")
    assert len(sequential[1]) > 1000
    np.testing.assert_array_equal(sequential[1], threaded[1])
    np.testing.assert_array_equal(sequential[0], threaded[0])


def test_cube_touching_the_volume_border_gives_a_closed_surface():
    labels = np.zeros((12, 14, 16), dtype=np.uint8)
    labels[:7, 3:14, 0:9] = 1  # touches three faces of the volume
    direction = GEOMETRIES["oblique_flipped"]
    image = make_image(labels, direction)
    surface = meshing.labelmap_to_surface(image, smoothing=0.0)
    assert stl.is_watertight(surface)
    volume, _ = signed_volume_and_centroid(surface)
    # Unsmoothed flying edges cuts the cube's edges and corners: a few per cent under.
    assert volume == pytest.approx(labels.sum() * np.prod(SPACING), rel=0.10)
    low, high = mask_physical_extent(labels, direction)
    bounds = np.asarray(surface.GetBounds()).reshape(3, 2)
    assert np.all(np.abs(bounds[:, 0] - low) < max(SPACING)) and np.all(np.abs(bounds[:, 1] - high) < max(SPACING))


def test_label_selects_one_structure_and_none_means_all_nonzero():
    labels = np.zeros((20, 20, 40), dtype=np.uint8)
    labels[5:15, 5:15, 4:14] = 3
    labels[5:15, 5:15, 24:34] = 7
    image = make_image(labels, np.eye(3))
    only_7 = meshing.labelmap_to_surface(image, 7, smoothing=0.0)
    everything = meshing.labelmap_to_surface(image, smoothing=0.0)
    voxel_volume = np.prod(SPACING)
    assert signed_volume_and_centroid(only_7)[0] == pytest.approx(1000 * voxel_volume, rel=0.1)
    assert signed_volume_and_centroid(everything)[0] == pytest.approx(2000 * voxel_volume, rel=0.1)
    assert only_7.GetBounds()[0] > ORIGIN[0] + 23 * SPACING[0]
    assert meshing.labelmap_to_surface(image, 5).GetNumberOfPoints() == 0


def test_stl_header_and_ras_is_lps_with_x_and_y_negated(tmp_path):
    direction = GEOMETRIES["oblique_flipped"]
    labels = sphere_labels(SHAPE, direction, volume_centre_mm(SHAPE, direction), radius_mm=8.0)
    surface = meshing.labelmap_to_surface(make_image(labels, direction))
    lps_path = stl.write_stl(surface, str(tmp_path / "lps.stl"))
    ras_path = stl.write_stl(surface, str(tmp_path / "ras.stl"), space="RAS")

    with open(lps_path, "rb") as stream:
        header = stream.read(80)
    assert header.startswith(b"SpineContextSeg SPACE=LPS UNITS=mm")
    assert not header.startswith(b"solid")
    assert stl.read_stl_header(ras_path) == "SpineContextSeg SPACE=RAS UNITS=mm"
    assert os.path.getsize(lps_path) == 84 + 50 * surface.GetNumberOfPolys()

    lps_vertices, lps_normals = raw_stl_vertices(lps_path)
    ras_vertices, ras_normals = raw_stl_vertices(ras_path)
    np.testing.assert_allclose(ras_vertices, lps_vertices * [-1, -1, 1], atol=1e-4)
    np.testing.assert_allclose(ras_normals, lps_normals * [-1, -1, 1], atol=1e-5)

    for path in (lps_path, ras_path):
        reread = stl.read_stl(path)
        assert stl.is_watertight(reread)
        assert signed_volume_and_centroid(reread)[0] > 0  # RAS is a rotation: still outward
    # Facet normals follow the right-hand rule of the stored winding, i.e. point outwards.
    centre = lps_vertices.mean(axis=(0, 1))
    assert np.all(np.einsum("ij,ij->i", lps_normals, lps_vertices.mean(axis=1) - centre) > 0)


def test_ascii_stl_round_trip(tmp_path):
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[3:7, 3:7, 3:7] = 1
    surface = meshing.labelmap_to_surface(make_image(labels, np.eye(3)))
    path = stl.write_stl(surface, str(tmp_path / "ascii.stl"), binary=False)
    assert stl.read_stl_header(path) == "solid SpineContextSeg SPACE=LPS UNITS=mm"
    reread = stl.read_stl(path)
    assert reread.GetNumberOfPolys() == surface.GetNumberOfPolys()
    assert stl.is_watertight(reread)


def test_is_watertight_rejects_an_open_surface():
    from vtkmodules.vtkFiltersSources import vtkPlaneSource, vtkSphereSource

    sphere = vtkSphereSource()
    sphere.Update()
    assert stl.is_watertight(sphere.GetOutput())
    plane = vtkPlaneSource()
    plane.SetResolution(3, 3)
    plane.Update()
    assert not stl.is_watertight(plane.GetOutput())  # quads, triangulated; border edges are single


def two_vertebrae():
    direction = GEOMETRIES["oblique_flipped"]
    shape = (24, 24, 44)
    centre = volume_centre_mm(shape, direction)
    axis_x = direction[:, 0]
    centres = {1: centre - 12 * axis_x, 2: centre + 12 * axis_x}  # 12 mm each side along the image x axis
    labels = np.zeros(shape, dtype=np.uint8)
    for value, at in centres.items():
        labels = np.maximum(labels, sphere_labels(shape, direction, at, 7.0, value=value))
    return labels, centres, make_image(labels, direction), direction


def test_per_label_files_are_named_and_placed(tmp_path):
    labels, centres, image, direction = two_vertebrae()
    written = meshing.mesh_labelmap_to_stl(
        image, str(tmp_path / "spine.stl"), labels={1: "L1", 2: "T12 / odd:name", 9: "absent"}, per_label=True
    )
    assert [os.path.basename(p) for p in written] == ["spine_L1.stl", "spine_T12_odd_name.stl"]
    assert not (tmp_path / "spine.stl").exists()
    assert sorted(os.listdir(tmp_path)) == ["spine_L1.stl", "spine_T12_odd_name.stl"]  # no temporary leftovers
    for path, value in zip(written, (1, 2)):
        surface = stl.read_stl(path)
        assert stl.is_watertight(surface)
        mask_centroid = voxel_centres_mm(labels.shape, direction)[labels == value].mean(axis=0)
        assert np.linalg.norm(signed_volume_and_centroid(surface)[1] - mask_centroid) < 0.5 * min(SPACING)


def test_per_label_default_names_and_merged_file(tmp_path):
    labels, _, image, _ = two_vertebrae()
    written = meshing.mesh_labelmap_to_stl(image, str(tmp_path / "case 7.stl"), per_label=True, space="RAS")
    assert [os.path.basename(p) for p in written] == ["case 7_label1.stl", "case 7_label2.stl"]
    assert stl.read_stl_header(written[0]) == "SpineContextSeg SPACE=RAS UNITS=mm"

    (merged,) = meshing.mesh_labelmap_to_stl(image, str(tmp_path / "merged.stl"))
    surface = stl.read_stl(merged)
    assert stl.is_watertight(surface)
    volume, _ = signed_volume_and_centroid(surface)
    assert volume == pytest.approx((labels != 0).sum() * np.prod(SPACING), rel=0.10)


def test_empty_map_raises_no_spine_found(tmp_path):
    image = make_image(np.zeros((8, 8, 8), dtype=np.uint8), np.eye(3))
    with pytest.raises(SegmentationError) as raised:
        meshing.mesh_labelmap_to_stl(image, str(tmp_path / "spine.stl"))
    assert raised.value.code == "no_spine_found"
    labels, _, image, _ = two_vertebrae()
    with pytest.raises(SegmentationError) as raised:
        meshing.mesh_labelmap_to_stl(image, str(tmp_path / "spine.stl"), labels={5: "L5"})
    assert raised.value.code == "no_spine_found"
    assert os.listdir(tmp_path) == []


def test_output_errors_and_cancellation_leave_nothing(tmp_path):
    _, _, image, _ = two_vertebrae()
    with pytest.raises(SegmentationError) as raised:
        meshing.mesh_labelmap_to_stl(image, str(tmp_path / "spine.obj"))
    assert raised.value.code == "output_format"
    with pytest.raises(SegmentationError) as raised:
        meshing.mesh_labelmap_to_stl(image, str(tmp_path / "missing" / "spine.stl"))
    assert raised.value.code == "output_dir_missing"

    calls = []

    def cancel_after_first(done, total):
        calls.append((done, total))
        raise Cancelled()

    with pytest.raises(Cancelled):
        meshing.mesh_labelmap_to_stl(image, str(tmp_path / "spine.stl"), per_label=True, on_progress=cancel_after_first)
    assert calls == [(1, 2)]
    assert os.listdir(tmp_path) == []  # the first file, already written, was removed again


def test_float_label_map_and_2d_input():
    labels = np.zeros((10, 10, 10), dtype=np.float32)
    labels[2:8, 2:8, 2:8] = 2.0
    image = make_image(labels, np.eye(3))
    image = sitk.Cast(image, sitk.sitkFloat32)
    assert stl.is_watertight(meshing.labelmap_to_surface(image, 2))
    with pytest.raises(SegmentationError) as raised:
        meshing.labelmap_to_surface(sitk.Image([5, 5], sitk.sitkUInt8))
    assert raised.value.code == "input_not_3d"


def test_foreground_bounding_box():
    mask = np.zeros((5, 6, 7), dtype=bool)
    assert meshing.foreground_bounding_box(mask) is None
    mask[1, 2, 3] = mask[3, 4, 6] = True
    assert meshing.foreground_bounding_box(mask) == (slice(1, 4), slice(2, 5), slice(3, 7))


def count_parts(polydata):
    from vtkmodules.vtkFiltersCore import vtkPolyDataConnectivityFilter

    connectivity = vtkPolyDataConnectivityFilter()
    connectivity.SetInputData(polydata)
    connectivity.SetExtractionModeToAllRegions()
    connectivity.Update()
    return connectivity.GetNumberOfExtractedRegions()


def test_smoothing_collapsed_islands_and_cavities_are_dropped(tmp_path):
    # A ball with one-voxel cavities inside and one-voxel islands outside: smoothing
    # shrinks those to (nearly) a point, which would turn into non-manifold edges once
    # the STL's coincident vertices are merged.
    direction = GEOMETRIES["oblique_flipped"]
    ball = sphere_labels(SHAPE, direction, volume_centre_mm(SHAPE, direction), radius_mm=10.0)
    labels = ball.copy()
    labels[13, 15, 17] = labels[11, 13, 14] = 0  # cavities
    labels[1, 1, 1] = labels[24, 2, 30] = 1  # islands
    assert ball[13, 15, 17] and ball[11, 13, 14] and not ball[1, 1, 1] and not ball[24, 2, 30]
    image = make_image(labels, direction)

    raw = meshing.labelmap_to_surface(image, smoothing=0.0)  # unsmoothed they are real closed parts: kept
    assert count_parts(raw) == 5
    assert stl.is_watertight(raw)

    smoothed = meshing.labelmap_to_surface(image)
    assert count_parts(smoothed) == 1
    assert stl.is_watertight(stl.read_stl(stl.write_stl(smoothed, str(tmp_path / "s.stl"))))
    low, high = mask_physical_extent(ball, direction)  # the islands no longer widen the bounds
    bounds = np.asarray(smoothed.GetBounds()).reshape(3, 2)
    assert np.all(np.abs(bounds[:, 0] - low) < max(SPACING)) and np.all(np.abs(bounds[:, 1] - high) < max(SPACING))


def test_random_masks_give_closed_surfaces():
    # Noise masks touch the border everywhere and hold every voxel configuration
    # (edge- and corner-only contacts, cavities, islands).
    rng = np.random.default_rng(7)
    for trial in range(30):
        shape = tuple(int(n) for n in rng.integers(3, 12, size=3))
        labels = (rng.random(shape) < rng.uniform(0.2, 0.8)).astype(np.uint8)
        labels.flat[0] = 1
        direction = GEOMETRIES[sorted(GEOMETRIES)[trial % len(GEOMETRIES)]]
        surface = meshing.labelmap_to_surface(make_image(labels, direction), smoothing=0.0)
        assert stl.is_watertight(surface), f"trial {trial}"
        assert signed_volume_and_centroid(surface)[0] > 0
