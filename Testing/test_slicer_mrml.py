"""``SpineContextSegSlicerLib.mrml_io`` against Slicer's real MRML and segmentation logic.

Needs the PyPI package ``slicer-core`` (Slicer's Qt-free libraries; Python >= 3.10, pins
vtk 9.6.2, so CI installs it in its own virtual environment). Outside that environment the
whole file is skipped with that reason.
"""
from __future__ import annotations

import json
import os
import struct
import sys

import numpy as np
import pytest

if os.environ.get("SPINECONTEXTSEG_REQUIRE_SLICER_CORE") == "1":
    import slicer  # CI's slicer-core environment: a missing package is a failure, not a skip
else:
    slicer = pytest.importorskip(
        "slicer",
        reason="needs slicer-core (pip install slicer-core in a separate venv; it provides Slicer's MRML without Qt)",
    )
if not hasattr(slicer, "vtkMRMLScene"):  # an unrelated PyPI package named 'slicer'
    if os.environ.get("SPINECONTEXTSEG_REQUIRE_SLICER_CORE") == "1":
        raise ImportError("the installed 'slicer' package is not slicer-core")
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

import nrrd  # noqa: E402
import vtk  # noqa: E402
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(ROOT, "SpineContextSeg")
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)

from SpineContextSegSlicerLib import mrml_io  # noqa: E402

from SpineContextSegLib import labels as label_table  # noqa: E402
from SpineContextSegLib.errors import SegmentationError  # noqa: E402
from SpineContextSegLib.labels import SPINE, vertebra_by_name  # noqa: E402

TERMINOLOGY_FILE = os.path.join(MODULE_DIR, "Resources", "SegmentationCategoryTypeModifier-SpineContextSeg.term.json")

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module", autouse=True)
def converter_rules():
    """Slicer registers these at startup; slicer-core does not."""
    mrml_io.register_segmentation_converters()


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def matrix(rows) -> vtk.vtkMatrix4x4:
    return mrml_io.list_to_matrix(rows)


def as_array(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array(mrml_io.matrix_to_list(m))


def oblique_ijk_to_ras(spacing=(1.5, 1.2, 2.0), angle_deg=25.0, origin=(10.0, -20.0, 35.0)) -> np.ndarray:
    """Rotated about z and x, anisotropic spacing: nothing axis-aligned."""
    a = np.deg2rad(angle_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def add_volume(scene, array_kji: np.ndarray, ijk_to_ras: np.ndarray, name="CT"):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(array_kji.shape[2], array_kji.shape[1], array_kji.shape[0])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    volume.SetAndObserveImageData(image)
    slicer.util.arrayFromVolume(volume)[:] = array_kji
    slicer.util.arrayFromVolumeModified(volume)
    volume.SetIJKToRASMatrix(matrix(ijk_to_ras))
    return volume


def add_linear_transform(scene, rotate_z=30.0, translate=(5.0, 6.0, -7.0), parent=None):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform = vtk.vtkTransform()
    transform.Translate(*translate)
    transform.RotateZ(rotate_z)
    node.SetMatrixTransformToParent(transform.GetMatrix())
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def ellipsoid_labels(shape_kji, centers_and_values, radius=(4, 5, 6)) -> np.ndarray:
    k, j, i = np.indices(shape_kji)
    labels = np.zeros(shape_kji, dtype=np.uint8)
    for (ck, cj, ci), value in centers_and_values:
        inside = ((k - ck) / radius[0]) ** 2 + ((j - cj) / radius[1]) ** 2 + ((i - ci) / radius[2]) ** 2 <= 1.0
        labels[inside] = value
    return labels


def write_like(path: str, labels_kji: np.ndarray, header_source: str) -> None:
    """Write a label map on exactly the grid of ``header_source`` (what the worker does)."""
    header = nrrd.read_header(header_source)
    header = {key: header[key] for key in ("space", "space directions", "space origin", "kinds")}
    header["type"] = "unsigned char"
    nrrd.write(path, np.ascontiguousarray(labels_kji.transpose(2, 1, 0)), header)


def segment_voxels(segmentation_node, segment_id) -> int:
    labelmap = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    value = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    return int(np.count_nonzero(vtk_to_numpy(labelmap.GetPointData().GetScalars()) == value))


def terminology_tag(segment) -> str:
    value = vtk.reference("")
    segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), value)
    return str(value)


def read_binary_stl(path):
    with open(path, "rb") as handle:
        header = handle.read(80)
        (count,) = struct.unpack("<I", handle.read(4))
        data = np.frombuffer(handle.read(50 * count), dtype=np.dtype([("n", "<f4", 3), ("v", "<f4", (3, 3)), ("a", "<u2")]))
    return header.rstrip(b"\0").decode("ascii"), data["v"].reshape(-1, 3).astype(float)


# ----------------------------------------------------------------------------- export
def test_export_hardens_linear_parent_transforms_into_the_nrrd(scene, tmp_path):
    ct = np.arange(12 * 10 * 8, dtype=np.int16).reshape(12, 10, 8)
    ijk_to_ras = oblique_ijk_to_ras()
    volume = add_volume(scene, ct, ijk_to_ras)
    outer = add_linear_transform(scene, rotate_z=-15.0, translate=(100.0, 0.0, 3.0))
    inner = add_linear_transform(scene, parent=outer)
    volume.SetAndObserveTransformNodeID(inner.GetID())

    path = str(tmp_path / "input.nrrd")
    written = mrml_io.export_volume(volume, path)

    world_from_volume = vtk.vtkMatrix4x4()
    inner.GetMatrixTransformToWorld(world_from_volume)
    expected_ras = as_array(world_from_volume) @ ijk_to_ras
    np.testing.assert_allclose(as_array(written), expected_ras, atol=1e-9)

    data, header = nrrd.read(path)
    assert header["space"] == "left-posterior-superior"
    assert header["encoding"] == "raw"  # uncompressed: the worker reads it once
    expected_lps = LPS_FROM_RAS @ expected_ras[:3]
    np.testing.assert_allclose(header["space directions"].T, expected_lps[:, :3], atol=1e-6)  # nrrd rows = axes
    np.testing.assert_allclose(header["space origin"], expected_lps[:, 3], atol=1e-6)
    np.testing.assert_array_equal(data.transpose(2, 1, 0), ct)  # voxels untouched, not resampled

    # the node itself is left alone
    np.testing.assert_allclose(as_array(_ijk_to_ras(volume)), ijk_to_ras)
    assert volume.GetTransformNodeID() == inner.GetID()
    assert volume.GetStorageNode() is None


def _ijk_to_ras(volume) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return m


def test_export_refuses_a_non_linear_transform(scene, tmp_path):
    volume = add_volume(scene, np.zeros((4, 5, 6), np.int16), np.eye(4))
    warp = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    spline = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for point, shift in (((0, 0, 0), (1, 0, 0)), ((10, 0, 0), (10, 2, 0)), ((0, 10, 0), (0, 10, 3)), ((0, 0, 10), (2, 0, 10))):
        source.InsertNextPoint(point)
        target.InsertNextPoint(shift)
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    spline.SetBasisToR()
    warp.SetAndObserveTransformToParent(spline)
    volume.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(SegmentationError) as raised:
        mrml_io.export_volume(volume, str(tmp_path / "x.nrrd"))
    assert raised.value.code == "input_geometry"
    assert "non-linear" in raised.value.message and "Harden" in raised.value.message
    assert not (tmp_path / "x.nrrd").exists()


@pytest.mark.parametrize(
    "make, code",
    [
        (lambda scene: scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"), "input_empty"),
        (lambda scene: add_volume(scene, np.zeros((1, 20, 20), np.int16), np.eye(4)), "input_not_3d"),
        (lambda scene: _vector_volume(scene), "input_not_scalar"),
    ],
)
def test_inputs_the_worker_would_reject_are_refused_before_starting(scene, make, code):
    with pytest.raises(SegmentationError) as raised:
        mrml_io.check_input_volume(make(scene))
    assert raised.value.code == code


def _vector_volume(scene):
    volume = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 4, 4)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    volume.SetAndObserveImageData(image)
    return volume


# ----------------------------------------------------------------------------- import
def vertebra_labels(*names):
    return [vertebra_by_name(name).to_json() for name in names]


def test_multilabel_import_names_colours_terminology_geometry(scene, tmp_path):
    shape = (24, 30, 28)
    ijk_to_ras = oblique_ijk_to_ras()
    volume = add_volume(scene, np.zeros(shape, np.int16), ijk_to_ras, name="patient CT")
    volume.SetAndObserveTransformNodeID(add_linear_transform(scene).GetID())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    sh.CreateItem(study, volume)  # Slicer's GUI does this for every new node; slicer-core does not

    exported = mrml_io.export_volume(volume, str(tmp_path / "input.nrrd"))
    labels = vertebra_labels("L1", "L2", "L4")  # VerSe ids 20, 21, 23; 22 (L3) absent
    values = [label["value"] for label in labels]
    label_array = ellipsoid_labels(shape, [((6, 8, 8), values[0]), ((12, 20, 10), values[1]), ((18, 12, 18), values[2])], radius=(3, 4, 4))
    write_like(str(tmp_path / "result.nrrd"), label_array, str(tmp_path / "input.nrrd"))

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    segmentation.GetSegmentation().AddEmptySegment("stale", "left over from an earlier run")
    ids = mrml_io.import_label_map(str(tmp_path / "result.nrrd"), segmentation, labels, volume, exported_ijk_to_ras=exported, task="vertebrae")

    assert ids == ["L1", "L2", "L4"]
    seg = segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() == 3  # stale segment replaced, absent L3 not created
    for segment_id, label in zip(ids, labels):
        segment = seg.GetSegment(segment_id)
        assert segment.GetName() == label["name"]
        np.testing.assert_allclose(segment.GetColor(), label["color"], atol=1e-6)
        assert terminology_tag(segment) == label["terminology"]
        assert f"SCT^{label['snomed_code']}^" in terminology_tag(segment)
        assert segment_voxels(segmentation, segment_id) == int(np.count_nonzero(label_array == label["value"]))
    # reference geometry, transform and subject hierarchy follow the input
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume
    assert segmentation.GetTransformNodeID() == volume.GetTransformNodeID()
    assert sh.GetItemParent(sh.GetItemByDataNode(segmentation)) == study
    assert segmentation.GetAttribute(mrml_io.RESULT_ATTRIBUTE) == "vertebrae"
    # segments sit on the input's local grid: the internal label map uses the input's IJK->RAS
    internal = vtk.vtkMatrix4x4()
    segmentation.GetBinaryLabelmapInternalRepresentation("L1").GetImageToWorldMatrix(internal)
    np.testing.assert_allclose(as_array(internal), ijk_to_ras, atol=1e-6)
    # the temporary label-map node is gone
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0


def test_import_of_a_result_on_another_grid_keeps_its_world_position(scene, tmp_path):
    # input: 20^3 voxels of 2 mm, voxel centres at RAS 0..38 mm
    volume = add_volume(scene, np.zeros((20, 20, 20), np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
    exported = mrml_io.export_volume(volume, str(tmp_path / "input.nrrd"))
    # result on a 1 mm grid over the same box (centres at RAS -0.5..38.5), a cube spanning 9.5..28.5 mm
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[10:30, 10:30, 10:30] = 1
    header = {"space": "left-posterior-superior", "space directions": np.diag([-1.0, -1.0, 1.0]), "space origin": np.array([0.5, 0.5, -0.5]), "kinds": ["domain"] * 3}
    nrrd.write(str(tmp_path / "fine.nrrd"), labels, header)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ids = mrml_io.import_label_map(str(tmp_path / "fine.nrrd"), segmentation, [SPINE.to_json()], volume, exported_ijk_to_ras=exported)
    assert ids == ["Spine"]
    center = [0.0, 0.0, 0.0]
    segmentation.GetSegmentCenterRAS("Spine", center)
    np.testing.assert_allclose(center, [19.0, 19.0, 19.0], atol=1.0)
    assert segment_voxels(segmentation, "Spine") == 20 ** 3


def test_empty_result_is_no_spine_found(scene, tmp_path):
    volume = add_volume(scene, np.zeros((8, 8, 8), np.int16), np.eye(4))
    exported = mrml_io.export_volume(volume, str(tmp_path / "input.nrrd"))
    write_like(str(tmp_path / "result.nrrd"), np.zeros((8, 8, 8), np.uint8), str(tmp_path / "input.nrrd"))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(SegmentationError) as raised:
        mrml_io.import_label_map(str(tmp_path / "result.nrrd"), segmentation, [SPINE.to_json()], volume, exported_ijk_to_ras=exported)
    assert raised.value.code == "no_spine_found"
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0


def test_missing_result_file_is_reported(scene, tmp_path):
    volume = add_volume(scene, np.zeros((8, 8, 8), np.int16), np.eye(4))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(SegmentationError) as raised:
        mrml_io.import_label_map(str(tmp_path / "nothing.nrrd"), segmentation, [SPINE.to_json()], volume)
    assert raised.value.code == "input_unreadable"


# ----------------------------------------------------------------------------- segment metadata
def import_every_label(scene, tmp_path, labels):
    """One small block per label, imported the way the module imports the worker's result."""
    shape = (6, 8, 4 * len(labels))
    volume = add_volume(scene, np.zeros(shape, np.int16), np.eye(4))
    exported = mrml_io.export_volume(volume, str(tmp_path / "input.nrrd"))
    label_array = np.zeros(shape, np.uint8)
    for index, label in enumerate(labels):
        label_array[1:5, 2:6, 4 * index + 1 : 4 * index + 3] = label["value"]
    write_like(str(tmp_path / "result.nrrd"), label_array, str(tmp_path / "input.nrrd"))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    ids = mrml_io.import_label_map(str(tmp_path / "result.nrrd"), segmentation, labels, volume, exported_ijk_to_ras=exported)
    assert len(ids) == len(labels)
    return segmentation, ids


def terminology_codes(logic, context):
    """{(scheme, category code): {(scheme, type code), ...}} as Slicer's terminology logic read them."""
    codes = {}
    category = slicer.vtkSlicerTerminologyCategory()
    term_type = slicer.vtkSlicerTerminologyType()
    for i in range(logic.GetNumberOfCategoriesInTerminology(context)):
        assert logic.GetNthCategoryInTerminology(context, i, category)
        types = codes.setdefault((category.GetCodingSchemeDesignator(), category.GetCodeValue()), set())
        for j in range(logic.GetNumberOfTypesInTerminologyCategory(context, category)):
            assert logic.GetNthTypeInTerminologyCategory(context, category, j, term_type)
            types.add((term_type.GetCodingSchemeDesignator(), term_type.GetCodeValue()))
    return codes


@pytest.mark.parametrize("task", ["spine", "vertebrae"])
def test_every_segment_names_our_terminology_context_and_its_codes(scene, tmp_path, task):
    """Slicer's own terminology logic loads the shipped file; every segment's tag resolves in it."""
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    context = mrml_io.load_terminology(logic, TERMINOLOGY_FILE)
    with open(TERMINOLOGY_FILE, encoding="utf-8") as handle:
        assert context == json.load(handle)["SegmentationCategoryTypeContextName"]
    codes = terminology_codes(logic, context)
    labels = [label.to_json() for label in label_table.labels_for_task(task)]
    segmentation, ids = import_every_label(scene, tmp_path, labels)
    entry = slicer.vtkSlicerTerminologyEntry()
    for segment_id in ids:
        tag = terminology_tag(segmentation.GetSegmentation().GetSegment(segment_id))
        assert logic.DeserializeTerminologyEntry(tag, entry), tag
        assert entry.GetTerminologyContextName() == context, f"{segment_id}: {tag}"
        category = (entry.GetCategoryObject().GetCodingSchemeDesignator(), entry.GetCategoryObject().GetCodeValue())
        assert category in codes, f"{segment_id}: category {category} is not in {TERMINOLOGY_FILE}"
        segment_type = (entry.GetTypeObject().GetCodingSchemeDesignator(), entry.GetTypeObject().GetCodeValue())
        assert segment_type in codes[category], f"{segment_id}: type {segment_type} is not in {TERMINOLOGY_FILE}"
        assert not entry.GetTypeModifierObject().GetCodeValue()


def test_terminology_loading_refuses_a_missing_file():
    with pytest.raises(SegmentationError) as raised:
        mrml_io.load_terminology(slicer.vtkSlicerTerminologiesModuleLogic(), "/nonexistent/x.term.json")
    assert "incompletely installed" in raised.value.message


def test_imported_segments_keep_their_name_and_colour(scene, tmp_path):
    """Name and colour are ours, not auto-generated: Slicer must not replace them."""
    labels = [label.to_json() for label in label_table.labels_for_task("vertebrae")[:3]]
    segmentation, ids = import_every_label(scene, tmp_path, labels)
    for segment_id, label in zip(ids, labels):
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        assert segment.GetName() == label["name"]
        assert not segment.GetNameAutoGenerated(), f"{segment_id}: NameAutoGenerated left true"
        assert not segment.GetColorAutoGenerated(), f"{segment_id}: ColorAutoGenerated left true"
    storage = slicer.vtkMRMLSegmentationStorageNode()  # and so they are saved
    storage.SetFileName(str(tmp_path / "out.seg.nrrd"))
    assert storage.WriteData(segmentation)
    header = nrrd.read_header(str(tmp_path / "out.seg.nrrd"))
    assert header["Segment0_NameAutoGenerated"] == "0" and header["Segment0_ColorAutoGenerated"] == "0"


# ----------------------------------------------------------------------------- surfaces and STL
@pytest.fixture
def imported(scene, tmp_path):
    """Two ellipsoids imported under a linear transform; one has a name that is unsafe in file names."""
    shape = (30, 32, 34)
    ijk_to_ras = oblique_ijk_to_ras(spacing=(1.0, 1.25, 1.5))
    volume = add_volume(scene, np.zeros(shape, np.int16), ijk_to_ras)
    volume.SetAndObserveTransformNodeID(add_linear_transform(scene).GetID())
    exported = mrml_io.export_volume(volume, str(tmp_path / "input.nrrd"))
    write_like(str(tmp_path / "result.nrrd"), ellipsoid_labels(shape, [((10, 10, 10), 1), ((20, 22, 22), 2)]), str(tmp_path / "input.nrrd"))
    labels = [SPINE.to_json(), dict(vertebra_by_name("C2").to_json(), value=2, name="C1/C2: odd name")]
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "spine: seg")
    ids = mrml_io.import_label_map(str(tmp_path / "result.nrrd"), segmentation, labels, volume, exported_ijk_to_ras=exported)
    mrml_io.create_closed_surface(segmentation)
    return segmentation, ids, ijk_to_ras


def test_closed_surface_exists_and_is_shown_in_3d(imported):
    segmentation, ids, _ = imported
    for segment_id in ids:
        surface = segmentation.GetClosedSurfaceInternalRepresentation(segment_id)
        assert surface is not None and surface.GetNumberOfPoints() > 100
    display = segmentation.GetDisplayNode()
    assert display.GetPreferredDisplayRepresentationName3D() == "Closed surface"
    assert display.GetVisibility3D()


def test_stl_export_sanitised_names_lps_header_and_centroid(imported, tmp_path):
    segmentation, ids, ijk_to_ras = imported
    paths = mrml_io.export_stl(segmentation, str(tmp_path / "stl"))
    assert [os.path.basename(p) for p in paths] == ["spine seg_Spine.stl", "spine seg_C1C2 odd name.stl"]
    assert sorted(os.listdir(tmp_path / "stl")) == sorted(os.path.basename(p) for p in paths)  # nothing escaped
    assert segmentation.GetSegmentation().GetSegment(ids[1]).GetName() == "C1/C2: odd name"  # restored
    assert segmentation.GetName() == "spine: seg"
    voxel = max(np.linalg.norm(ijk_to_ras[:3, :3], axis=0))
    for path, segment_id in zip(paths, ids):
        header, points = read_binary_stl(path)
        assert header == "3D Slicer output. SPACE=LPS"
        ras = points * np.array([-1.0, -1.0, 1.0])
        center_ras = [0.0, 0.0, 0.0]
        segmentation.GetSegmentCenterRAS(segment_id, center_ras)
        stl_center = (ras.min(axis=0) + ras.max(axis=0)) / 2
        assert np.linalg.norm(stl_center - np.array(center_ras)) < voxel


def test_stl_export_merged_scaled_and_ras(imported, tmp_path):
    segmentation, ids, _ = imported
    per_segment = mrml_io.export_stl(segmentation, str(tmp_path / "mm"), segment_ids=[ids[0]])
    merged = mrml_io.export_stl(segmentation, str(tmp_path / "m"), merge=True, size_scale=0.001)
    ras = mrml_io.export_stl(segmentation, str(tmp_path / "ras"), segment_ids=[ids[0]], lps=False)
    assert [os.path.basename(p) for p in merged] == ["spine seg.stl"]
    header, merged_points = read_binary_stl(merged[0])
    assert header == "3D Slicer output. SPACE=LPS;SCALE=0.001"
    _, mm_points = read_binary_stl(per_segment[0])
    _, all_points = read_binary_stl(mrml_io.export_stl(segmentation, str(tmp_path / "all"), merge=True)[0])
    np.testing.assert_allclose(merged_points, all_points * 0.001, atol=1e-6)
    assert len(merged_points) > len(mm_points)  # both segments
    ras_header, ras_points = read_binary_stl(ras[0])
    assert ras_header == "3D Slicer output. SPACE=RAS"
    np.testing.assert_allclose(ras_points, mm_points * np.array([-1.0, -1.0, 1.0]), atol=1e-4)


def test_stl_export_to_an_unusable_folder_fails_clearly(imported, tmp_path):
    segmentation, _, _ = imported
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SegmentationError) as raised:
        mrml_io.export_stl(segmentation, str(blocker / "stl"))
    assert raised.value.code == "output_not_writable"
    with pytest.raises(SegmentationError) as raised:
        mrml_io.export_stl(segmentation, str(tmp_path / "x"), segment_ids=["no such segment"])
    assert raised.value.code == "no_spine_found"


def test_segment_selection_by_vertebra_name(imported):
    segmentation, ids, _ = imported
    assert mrml_io.segment_ids_by_name(segmentation, ["spine"]) == [ids[0]]
    assert mrml_io.segment_ids_by_name(segmentation, ["L1"]) == []
    assert mrml_io.segment_ids_by_name(segmentation) == ids


@pytest.mark.parametrize("name, safe", [("C1/C2: odd", "C1C2 odd"), ("  L1  ", "L1"), ("Spine (v2)", "Spine (v2)"), ("a\\b*c?", "abc")])
def test_safe_file_name_matches_slicer_rules(name, safe):
    assert mrml_io.safe_file_name(name) == safe


# ----------------------------------------------------------------------------- real data round trip
def test_round_trip_with_slicerio_ctchest_spine_segments(scene, tmp_path):
    """slicerio's CTChest4 spine segments -> worker-style label map -> import -> .seg.nrrd -> slicerio."""
    slicerio = pytest.importorskip("slicerio")
    ct_path = slicerio.get_testdata_file("CTChest4.nrrd")
    reference = slicerio.read_segmentation(slicerio.get_testdata_file("Segmentation.seg.nrrd"))
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CTChest4")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(ct_path)
    assert storage.ReadData(volume)
    exported = mrml_io.export_volume(volume, str(tmp_path / "input.nrrd"))

    names = ["cervical vertebral column", "thoracic vertebral column", "lumbar vertebral column"]
    labels_ijk = np.zeros(reference["voxels"].shape, np.uint8)
    table = []
    for value, name in enumerate(names, start=1):
        labels_ijk[slicerio.segment_mask(reference, name)] = value
        table.append({"value": value, "name": name, "color": [0.2 * value, 0.5, 0.7], "terminology": SPINE.terminology_entry()})
    write_like(str(tmp_path / "result.nrrd"), labels_ijk.transpose(2, 1, 0), str(tmp_path / "input.nrrd"))

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chest spine")
    ids = mrml_io.import_label_map(str(tmp_path / "result.nrrd"), segmentation, table, volume, exported_ijk_to_ras=exported)
    assert len(ids) == 3
    for segment_id, (value, name) in zip(ids, enumerate(names, start=1)):
        assert segment_voxels(segmentation, segment_id) == int(np.count_nonzero(labels_ijk == value)) > 0

    seg_storage = slicer.vtkMRMLSegmentationStorageNode()
    seg_storage.SetFileName(str(tmp_path / "out.seg.nrrd"))
    assert seg_storage.WriteData(segmentation)
    back = slicerio.read_segmentation(str(tmp_path / "out.seg.nrrd"))
    assert [segment["name"] for segment in back["segments"]] == names
    for segment in back["segments"]:
        assert segment["terminology"]["type"] == ["SCT", SPINE.snomed_code, SPINE.snomed_meaning]
    np.testing.assert_allclose(back["ijkToLPS"], reference["ijkToLPS"], atol=1e-4)



def _world_ras_of_voxel(volume, ijk) -> np.ndarray:
    world = as_array(mrml_io.world_ijk_to_ras(volume))
    return (world @ np.array([*ijk, 1.0]))[:3]


def test_spine_roi_and_centreline_become_markups_in_place_under_the_input_transform(scene, tmp_path):
    """The worker's --roi/--centreline JSON (world LPS) become a ROI and a curve at the same world place, moving with the CT."""
    import SimpleITK as sitk

    from SpineContextSegLib.labels import labels_for_task
    from SpineContextSegLib.inference.spine_geometry import spine_centreline, spine_roi, write_json

    shape = (60, 40, 36)  # k j i
    ijk_to_ras = oblique_ijk_to_ras(spacing=(1.5, 1.5, 2.0), angle_deg=20.0)
    volume = add_volume(scene, np.full(shape, -1000, dtype=np.int16), ijk_to_ras)
    volume.SetAndObserveTransformNodeID(add_linear_transform(scene).GetID())
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT spine")
    exported = str(tmp_path / "input.nrrd")
    mrml_io.export_volume(volume, exported)
    # a column of five "vertebrae" along k, on the grid the worker saw
    labels = np.zeros(shape, dtype=np.uint8)
    for n in range(5):
        labels[6 + 10 * n: 14 + 10 * n, 15:25, 13:23] = 20 + n  # L1..L5
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(sitk.ReadImage(exported))
    roi_json, line_json = str(tmp_path / "roi.json"), str(tmp_path / "centreline.json")
    write_json(spine_roi(mask, margin_mm=5.0, labels=labels_for_task("vertebrae")), roi_json)
    write_json(spine_centreline(mask, labels=labels_for_task("vertebrae")), line_json)

    roi = mrml_io.import_spine_roi(roi_json, segmentation, volume)
    assert roi.GetTransformNodeID() == volume.GetTransformNodeID() and roi.GetLocked()
    assert not roi.GetDisplayNode().GetVisibility()  # handles would cover the slice views
    centre_world = np.zeros(3)
    roi.GetCenterWorld(centre_world)
    expected_centre = _world_ras_of_voxel(volume, ((13 + 22) / 2, (15 + 24) / 2, (6 + 53) / 2))
    np.testing.assert_allclose(centre_world, expected_centre, atol=1e-3)
    np.testing.assert_allclose(list(roi.GetSize()), [10 * 1.5 + 10, 10 * 1.5 + 10, 48 * 2.0 + 10], atol=1e-3)
    assert mrml_io.import_spine_roi(roi_json, segmentation, volume).GetID() == roi.GetID()  # a second run reuses it

    curve = mrml_io.import_centreline(line_json, segmentation, volume)
    assert curve.GetTransformNodeID() == volume.GetTransformNodeID() and curve.GetLocked()
    assert curve.GetNumberOfControlPoints() == 5
    assert [curve.GetNthControlPointLabel(i) for i in range(5)] == ["L1", "L2", "L3", "L4", "L5"]
    for n in range(5):
        world = np.zeros(3)
        curve.GetNthControlPointPositionWorld(n, world)
        np.testing.assert_allclose(world, _world_ras_of_voxel(volume, (17.5, 19.5, 9.5 + 10 * n)), atol=0.6)
    assert {"end_angle_deg", "max_curvature_deg_per_cm"} <= set(json.loads(curve.GetAttribute("SpineContextSeg.Sagittal")))
    assert {"end_angle_deg", "max_curvature_deg_per_cm"} <= set(json.loads(curve.GetAttribute("SpineContextSeg.Coronal")))
    again = mrml_io.import_centreline(line_json, segmentation, volume)
    assert again.GetID() == curve.GetID() and again.GetNumberOfControlPoints() == 5
