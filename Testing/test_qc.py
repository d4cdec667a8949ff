"""QC picture: sagittal + coronal CT views with the mask outline, in radiological orientation."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import SimpleITK as sitk

from SpineContextSegLib.io import qc
from SpineContextSegLib.errors import SegmentationError

# A synthetic patient in physical LPS mm (x: patient's left, y: posterior, z: superior).
FIELD_OF_VIEW_MM = np.array([[-130.0, 130.0], [-100.0, 100.0], [-60.0, 60.0]])
SOFT_TISSUE_HU, BONE_HU, MARKER_HU, AIR_HU = 40.0, 700.0, 1500.0, -1000.0
VERTEBRA_1 = np.array([[-15.0, 15.0], [20.0, 45.0], [-20.0, 20.0]])  # label 1
VERTEBRA_2 = np.array([[-15.0, 15.0], [20.0, 45.0], [26.0, 44.0]])  # label 2, superior to label 1
STERNUM = np.array([[-10.0, 10.0], [-85.0, -65.0], [-30.0, 30.0]])  # anterior marker, not masked
RIGHT_MARKER = np.array([[-75.0, -45.0], [20.0, 45.0], [-12.0, 12.0]])  # on the patient's right (x < 0)


def inside(points, box):
    return np.all((points >= box[:, 0]) & (points <= box[:, 1]), axis=-1)


def scene(points):
    """HU and label at (..., 3) LPS points."""
    body = (points[..., 0] / 120.0) ** 2 + (points[..., 1] / 90.0) ** 2 < 1.0
    hu = np.where(body, SOFT_TISSUE_HU, AIR_HU)
    labels = np.zeros(points.shape[:-1], dtype=np.uint8)
    for box, value in ((VERTEBRA_1, 1), (VERTEBRA_2, 2)):
        hu = np.where(inside(points, box), BONE_HU, hu)
        labels[inside(points, box)] = value
    for box in (STERNUM, RIGHT_MARKER):
        hu = np.where(inside(points, box), MARKER_HU, hu)
    return hu, labels


def rotation_matrix(axis, degrees):
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


GEOMETRIES = {
    "lps": (np.eye(3), (2.5, 2.5, 3.0)),
    "pir": (np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float), (2.5, 3.0, 2.0)),  # i->P, j->I, k->R
    "oblique_flipped": (rotation_matrix([0.2, 1.0, 0.4], 20.0) @ np.diag([1.0, 1.0, -1.0]), (2.0, 2.7, 3.2)),
}


def make_case(direction, spacing, empty_mask=False):
    """CT and mask images sampling the same physical scene on a grid with this orientation."""
    direction = np.asarray(direction, dtype=float)
    spacing = np.asarray(spacing, dtype=float)
    fov_size = FIELD_OF_VIEW_MM[:, 1] - FIELD_OF_VIEW_MM[:, 0]
    size = np.ceil(np.abs(direction).T @ fov_size / spacing).astype(int) + 1  # covers the box in any orientation
    step = direction * spacing
    origin = FIELD_OF_VIEW_MM.mean(axis=1) - step @ ((size - 1) / 2.0)
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    points = np.stack([i, j, k], axis=-1) @ step.T + origin
    hu, labels = scene(points)
    if empty_mask:
        labels[:] = 0
    images = []
    for array in (hu.astype(np.int16), labels):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(spacing))
        image.SetOrigin(tuple(origin))
        image.SetDirection(tuple(direction.ravel()))
        images.append(image)
    return images[0], images[1]


def pixel_positions_mm(view, rows, columns):
    """(n, 2) physical (column-axis coordinate, S) of pixels, from the QCView's documented geometry."""
    return np.stack([view.first_column_mm + columns * view.pixel_mm, view.top_row_mm - rows * view.pixel_mm], axis=-1)


def pixel_at(view, column_mm, s_mm):
    return int(round((view.top_row_mm - s_mm) / view.pixel_mm)), int(round((column_mm - view.first_column_mm) / view.pixel_mm))


def coloured(rgb):
    return (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])


def decode_png(data: bytes):
    """Minimal PNG decoder for 8-bit RGB, filter type 0 (what qc.write_png writes): (rgb, text chunks)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat, text, header = 8, b"", {}, None
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"tEXt":
            keyword, value = body.split(b"\0", 1)
            text[keyword.decode("latin-1")] = value.decode("latin-1")
        position += 12 + length
        if kind == b"IEND":
            break
    width, height, bit_depth, colour_type = header[:4]
    assert (bit_depth, colour_type) == (8, 2)
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert np.all(rows[:, 0] == 0)
    return rows[:, 1:].reshape(height, width, 3), text


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def case(request):
    direction, spacing = GEOMETRIES[request.param]
    ct, mask = make_case(direction, spacing)
    return request.param, spacing, ct, mask, qc.render_qc_views(ct, mask)


def test_outline_is_drawn_at_the_mask_position_in_both_views(case):
    name, spacing, _, _, (sagittal, coronal) = case
    assert sagittal.rgb.shape[0] == coronal.rgb.shape[0] and sagittal.pixel_mm == coronal.pixel_mm
    assert (sagittal.column_axis, coronal.column_axis) == (1, 0)
    tolerance = max(spacing) + sagittal.pixel_mm
    for view in (sagittal, coronal):
        for value, box, colour in ((1, VERTEBRA_1, qc.OUTLINE_COLOURS[0]), (2, VERTEBRA_2, qc.OUTLINE_COLOURS[1])):
            rows, columns = np.nonzero(np.all(view.rgb == colour, axis=-1))
            assert len(rows) > 20, f"{name} {view.name}: no outline for label {value}"
            positions = pixel_positions_mm(view, rows, columns)
            expected = box[[view.column_axis, 2]]
            np.testing.assert_allclose(positions.min(axis=0), expected[:, 0], atol=tolerance)
            np.testing.assert_allclose(positions.max(axis=0), expected[:, 1], atol=tolerance)
        assert not np.any(coloured(view.rgb) & (view.labels == 0)), "outline stays on mask pixels"
    # Planes through the mask's centroid (x = 0, y = 32.5 mm).
    assert sagittal.plane_mm == pytest.approx(0.0, abs=0.5 * max(spacing))
    assert coronal.plane_mm == pytest.approx(32.5, abs=0.5 * max(spacing))


def test_views_are_in_radiological_orientation_with_superior_up(case):
    name, _, _, _, (sagittal, coronal) = case
    # Sagittal: the anterior marker (sternum, y = -75) is left of the spine (y = +32).
    sternum_row, sternum_column = pixel_at(sagittal, -75.0, 0.0)
    spine_row, spine_column = pixel_at(sagittal, 32.5, 0.0)
    assert sternum_column < spine_column < sagittal.rgb.shape[1]
    assert sagittal.rgb[sternum_row, sternum_column, 0] == 255  # 1500 HU saturates the window
    # Coronal: the marker on the patient's right (x = -60) is left of the spine (x = 0).
    right_row, right_column = pixel_at(coronal, -60.0, 0.0)
    assert right_column < pixel_at(coronal, 0.0, 0.0)[1]
    assert coronal.rgb[right_row, right_column, 0] == 255
    # Superior up: label 2 (z 26..44) is above label 1 (z -20..20) in both views.
    for view in (sagittal, coronal):
        rows_1 = np.nonzero(view.labels == 1)[0]
        rows_2 = np.nonzero(view.labels == 2)[0]
        assert rows_2.max() < rows_1.min()


def test_window_and_square_pixels(case):
    _, spacing, _, _, (sagittal, coronal) = case
    soft_row, soft_column = pixel_at(coronal, 80.0, -40.0)  # soft tissue, away from every edge
    expected_soft = (SOFT_TISSUE_HU - (qc.WINDOW_LEVEL_HU - qc.WINDOW_WIDTH_HU / 2)) / qc.WINDOW_WIDTH_HU * 255
    assert coronal.rgb[soft_row, soft_column, 0] == pytest.approx(expected_soft, abs=2)
    bone_row, bone_column = pixel_at(coronal, 0.0, 0.0)  # inside vertebra 1
    assert coronal.rgb[bone_row, bone_column, 0] == pytest.approx((BONE_HU + 500) / 1800 * 255, abs=2)
    # Square pixels: a 20 x 60 mm sternum spans 20/60 of the pixels along the two axes.
    bright = sagittal.rgb[..., 0] == 255
    rows, columns = np.nonzero(bright & (np.arange(sagittal.rgb.shape[1]) < pixel_at(sagittal, 0.0, 0.0)[1]))
    height_mm = (rows.max() - rows.min() + 1) * sagittal.pixel_mm
    width_mm = (columns.max() - columns.min() + 1) * sagittal.pixel_mm
    assert height_mm == pytest.approx(60.0, abs=2 * max(spacing))
    assert width_mm == pytest.approx(20.0, abs=2 * max(spacing))


def test_png_holds_exactly_the_two_views(case, tmp_path):
    _, _, ct, mask, (sagittal, coronal) = case
    path = qc.write_qc_png(ct, mask, str(tmp_path / "qc.png"), title="case 7 — L1-L2")
    rgb, text = decode_png(open(path, "rb").read())
    gap = rgb.shape[1] - sagittal.rgb.shape[1] - coronal.rgb.shape[1]
    assert rgb.shape[0] == sagittal.rgb.shape[0] and gap > 0
    np.testing.assert_array_equal(rgb[:, : sagittal.rgb.shape[1]], sagittal.rgb)
    np.testing.assert_array_equal(rgb[:, sagittal.rgb.shape[1] + gap :], coronal.rgb)
    assert not coloured(rgb[:, sagittal.rgb.shape[1] : sagittal.rgb.shape[1] + gap]).any()
    assert text["Title"] == "case 7 ? L1-L2"  # Latin-1 only in tEXt
    assert "sagittal" in text["Description"] and "outline" in text["Description"]
    assert [p.name for p in tmp_path.iterdir()] == ["qc.png"]


def test_png_decodes_with_pillow(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    rgb = np.random.default_rng(1).integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    path = qc.write_png(rgb, str(tmp_path / "random.png"), text={"Title": "x"})
    with image_module.open(path) as decoded:
        assert decoded.mode == "RGB" and decoded.size == (23, 17)
        np.testing.assert_array_equal(np.asarray(decoded), rgb)


def test_empty_mask_still_writes_the_ct_views(tmp_path):
    direction, spacing = GEOMETRIES["oblique_flipped"]
    ct, mask = make_case(direction, spacing, empty_mask=True)
    sagittal, coronal = qc.render_qc_views(ct, mask)
    assert not sagittal.centred_on_mask
    low, high = qc.physical_bounds_mm(ct)
    assert sagittal.plane_mm == pytest.approx((low[0] + high[0]) / 2)
    path = qc.write_qc_png(ct, mask, str(tmp_path / "empty.png"))
    rgb, text = decode_png(open(path, "rb").read())
    assert not coloured(rgb).any()
    assert rgb.max() == 255  # the CT is there (markers saturate)
    assert "mask is empty" in text["Description"]


def test_small_crops_are_enlarged_and_huge_volumes_shrunk():
    ct, mask = make_case(np.eye(3), (2.5, 2.5, 3.0))  # 260 mm wide: about 105 pixels at the CT's spacing
    longest_side = lambda views: max(max(view.rgb.shape[:2]) for view in views)  # noqa: E731
    assert longest_side(qc.render_qc_views(ct, mask, min_view_pixels=300, max_view_pixels=1000)) == pytest.approx(300, abs=2)
    assert longest_side(qc.render_qc_views(ct, mask, min_view_pixels=10, max_view_pixels=40)) == pytest.approx(40, abs=1)


def test_outline_marks_label_borders():
    labels = np.zeros((6, 8), dtype=np.int64)
    labels[1:5, 1:4] = 1
    labels[1:5, 4:7] = 2
    edge = qc.outline(labels)
    assert edge[1, 1] and edge[2, 3] and edge[2, 4]  # outer border and the 1|2 border
    assert not edge[2, 2] and not edge[2, 5] and not edge[0, 0]


def test_bad_inputs():
    with pytest.raises(ValueError):
        qc.write_png(np.zeros((4, 4), dtype=np.uint8), "unused.png")
    with pytest.raises(SegmentationError) as raised:
        qc.render_qc_views(sitk.Image([5, 5], sitk.sitkInt16), sitk.Image([5, 5], sitk.sitkUInt8))
    assert raised.value.code == "input_not_3d"
