"""MRML in and out of the worker: volume export, label-map import, surfaces, STL files.

Uses only ``slicer`` (MRML, segmentation logic) and VTK: no ``qt``, no ``slicer.app``, no
``slicer.mrmlScene``. Every function takes its nodes (and finds the scene with
``node.GetScene()``), so the same code runs inside Slicer and, in CI, against the PyPI
``slicer-core`` package.

Geometry, deliberately:

* The worker sees the volume in **world** coordinates. A linear parent transform (or a chain
  of them) is hardened into the exported IJK->RAS matrix; the voxels are not resampled. A
  non-linear transform is refused with a clear message (harden or remove it first).
* The worker writes its label map on exactly the exported grid. On import the label map gets
  the input's own (local) IJK->RAS matrix and parent transform, and the segmentation node is
  placed under that same transform, so the segments sit on the input's voxels, stay attached
  to the input when the transform changes, and nothing is resampled.
* NRRD files are written by Slicer's storage node (``space: left-posterior-superior``); STL
  files are LPS by default, as Slicer writes them (header ``3D Slicer output. SPACE=LPS``).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import vtk

import slicer

from . import ensure_library_importable

ensure_library_importable()

from SpineContextSegLib.errors import SegmentationError  # noqa: E402

#: Characters Slicer keeps in file names (``vtkSlicerSegmentationsModuleLogic::GetSafeFileName``).
_UNSAFE_FILE_CHARACTERS = re.compile(r"[^-A-Za-z0-9 _.()$!~#'%^{}]")

#: Attribute on segmentation nodes this module wrote (value: the worker's task).
RESULT_ATTRIBUTE = "SpineContextSeg.Task"

#: Absolute tolerance (mm) when comparing the worker's output grid with the exported one.
GEOMETRY_TOLERANCE_MM = 1e-3


# ----------------------------------------------------------------------------- helpers
def register_segmentation_converters() -> None:
    """Register the label map <-> closed surface conversion rules (Slicer does this at startup).

    Needed only outside Slicer (``slicer-core``); harmless to call twice.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    registered = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for rule_class in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        if rule_class.__name__ not in registered:
            factory.RegisterConverterRule(rule_class())


def matrix_to_list(matrix: vtk.vtkMatrix4x4) -> List[List[float]]:
    return [[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]


def list_to_matrix(rows: Sequence[Sequence[float]]) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(rows[r][c]))
    return matrix


def matrices_close(a: vtk.vtkMatrix4x4, b: vtk.vtkMatrix4x4, tolerance: float = GEOMETRY_TOLERANCE_MM) -> bool:
    return all(abs(a.GetElement(r, c) - b.GetElement(r, c)) <= tolerance for r in range(4) for c in range(4))


def safe_file_name(name: str) -> str:
    """``name`` with every character Slicer would drop from a file name removed, then trimmed."""
    return _UNSAFE_FILE_CHARACTERS.sub("", name).strip()


# ----------------------------------------------------------------------------- input
def check_input_volume(volume_node) -> None:
    """Refuse, before starting a worker, inputs it would reject anyway.

    Raises
    ------
    SegmentationError
        ``input_empty`` (no voxels), ``input_not_scalar`` (RGB/vector), ``input_not_3d``
        (a single slice), ``input_geometry`` (a non-linear parent transform).
    """
    if volume_node is None:
        raise ValueError("no input volume")
    name = volume_node.GetName()
    image = volume_node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise SegmentationError("input_empty", f"Volume '{name}' has no voxel data. Load a CT volume first.")
    if image.GetNumberOfScalarComponents() != 1 or volume_node.IsA("vtkMRMLVectorVolumeNode"):
        raise SegmentationError("input_not_scalar", f"Volume '{name}' has {image.GetNumberOfScalarComponents()} components per voxel; choose a greyscale CT.")
    dimensions = image.GetDimensions()
    if min(dimensions) < 2:
        raise SegmentationError("input_not_3d", f"Volume '{name}' is not 3D (size {dimensions[0]}x{dimensions[1]}x{dimensions[2]}); choose a CT volume.")
    world_ijk_to_ras(volume_node)  # raises for a non-linear transform


def world_ijk_to_ras(volume_node) -> vtk.vtkMatrix4x4:
    """IJK -> world RAS of ``volume_node``: its own matrix with every linear parent transform applied.

    Raises
    ------
    SegmentationError
        ``input_geometry`` if a parent transform is not linear (a warp or grid transform
        cannot be written into a volume header without resampling).
    """
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    transform_node = volume_node.GetParentTransformNode()
    if transform_node is None:
        return ijk_to_ras
    if not transform_node.IsTransformToWorldLinear():
        raise SegmentationError(
            "input_geometry",
            f"Volume '{volume_node.GetName()}' is under the non-linear transform '{transform_node.GetName()}'. "
            "Harden the transform on the volume (Data module: right-click > Harden transform) or remove it, then segment again.",
        )
    parent_to_world = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(parent_to_world)
    world = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(parent_to_world, ijk_to_ras, world)
    return world


def export_volume(volume_node, path: str) -> vtk.vtkMatrix4x4:
    """Write ``volume_node`` as an uncompressed NRRD in world geometry; return the written IJK->RAS.

    The node, its storage node and its transform are left untouched: a temporary node that
    shares the voxel array carries the hardened matrix.

    Raises
    ------
    SegmentationError
        See :func:`check_input_volume`; ``output_not_writable`` if the file cannot be written.
    """
    check_input_volume(volume_node)
    world = world_ijk_to_ras(volume_node)
    proxy = slicer.vtkMRMLScalarVolumeNode()
    proxy.SetName(volume_node.GetName())
    proxy.SetAndObserveImageData(volume_node.GetImageData())  # shared, not copied
    proxy.SetIJKToRASMatrix(world)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(os.fspath(path))
    storage.UseCompressionOff()  # the worker reads it once; compression only costs time
    if not storage.WriteData(proxy) or not os.path.isfile(path):
        raise SegmentationError("output_not_writable", f"Could not write the temporary input {path}. Check free disk space in the temporary folder.")
    return world


# ----------------------------------------------------------------------------- result
def _label_color(label: Dict[str, Any]) -> Tuple[float, float, float]:
    color = label.get("color") or label.get("color_rgb") or (0.9, 0.85, 0.6)
    values = [float(c) for c in list(color)[:3]]
    if max(values) > 1.0:  # 0-255 colours
        values = [c / 255.0 for c in values]
    return values[0], values[1], values[2]


def segment_id_for(label: Dict[str, Any]) -> str:
    """A stable segment ID for a label: its name with unsafe characters replaced."""
    name = str(label.get("name") or f"Label {label.get('value')}")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or f"label_{label.get('value')}"


def read_label_map(path: str, scene, name: str = "SpineContextSeg result"):
    """Load a label map file into a new (temporary) ``vtkMRMLLabelMapVolumeNode`` in ``scene``."""
    label_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(os.fspath(path))
    if not os.path.isfile(path) or not storage.ReadData(label_node) or label_node.GetImageData() is None:
        scene.RemoveNode(label_node)
        raise SegmentationError("input_unreadable", f"Could not read the worker's result {path}.")
    return label_node


def present_label_values(label_node) -> List[int]:
    """Sorted non-zero values in the label map."""
    import numpy as np

    array = slicer.util.arrayFromVolume(label_node)
    if array.dtype in (np.uint8, np.uint16):  # a histogram is much faster than sorting a whole CT
        counts = np.bincount(array.ravel(), minlength=1)
        return [int(v) for v in np.flatnonzero(counts) if v != 0]
    return [int(v) for v in np.unique(array) if v != 0]


def import_label_map(
    label_path: str,
    segmentation_node,
    labels: Sequence[Dict[str, Any]],
    reference_volume,
    *,
    exported_ijk_to_ras: Optional[vtk.vtkMatrix4x4] = None,
    task: str = "spine",
    replace_segments: bool = True,
) -> List[str]:
    """Import the worker's multi-label map into ``segmentation_node`` with one logic call.

    Parameters
    ----------
    label_path : str
        The worker's mask (``result.outputs.mask``): uint8 labels on the exported grid.
    segmentation_node : vtkMRMLSegmentationNode
        Target; must be in the same scene as ``reference_volume``. With ``replace_segments``
        its existing segments are removed first (re-running replaces the previous result).
    labels : list of dict
        The ``result`` line's label table: ``value``, ``name``, ``color`` (RGB in 0..1),
        ``terminology`` (Slicer terminology entry string), ``snomed_code``.
    reference_volume : vtkMRMLScalarVolumeNode
        The input; gives the reference geometry, the parent transform and the subject-hierarchy place.
    exported_ijk_to_ras : vtkMatrix4x4, optional
        What :func:`export_volume` returned. When the result's grid matches it (the worker
        writes on exactly the input grid), the label map is attached to the input's local
        geometry with no resampling; otherwise it is imported in world coordinates and Slicer
        resamples it into the segmentation.

    Returns
    -------
    list of str
        Segment IDs created, in label-value order (labels absent from the mask are skipped).

    Raises
    ------
    SegmentationError
        ``input_unreadable`` (result missing/corrupt), ``no_spine_found`` (empty result),
        ``internal`` (the import itself failed).
    """
    scene = segmentation_node.GetScene()
    if scene is None or reference_volume.GetScene() is not scene:
        raise ValueError("the segmentation node and the reference volume must be in the same scene")
    label_node = read_label_map(label_path, scene, name=f"{segmentation_node.GetName()} labels")
    try:
        present = present_label_values(label_node)
        by_value = {int(label["value"]): label for label in labels}
        wanted = [value for value in present if value in by_value]
        if not wanted:
            raise SegmentationError(
                "no_spine_found",
                "The segmentation is empty: no spine was found. Check that the CT covers the spine.",
            )
        unknown = sorted(set(present) - set(by_value))
        _attach_to_input_geometry(label_node, reference_volume, exported_ijk_to_ras)
        segmentation_node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        segmentation_node.SetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole(), reference_volume.GetID())
        if segmentation_node.GetDisplayNode() is None:
            segmentation_node.CreateDefaultDisplayNodes()
        segmentation = segmentation_node.GetSegmentation()
        if replace_segments:
            segmentation.RemoveAllSegments()
        segment_ids = vtk.vtkStringArray()
        max_value = max(wanted)
        ids_in_order = []
        for value in range(1, max_value + 1):
            segment_id = segment_id_for(by_value[value]) if value in wanted else ""
            segment_ids.InsertNextValue(segment_id)
            if segment_id:
                ids_in_order.append(segment_id)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label_node, segmentation_node, segment_ids)
        if not ok:
            raise SegmentationError("internal", "Slicer could not import the segmentation result (ImportLabelmapToSegmentationNode failed).")
        for value, segment_id in zip(wanted, ids_in_order):
            set_segment_metadata(segmentation.GetSegment(segment_id), by_value[value])
        segmentation_node.SetAttribute(RESULT_ATTRIBUTE, task)
        if unknown:
            segmentation_node.SetAttribute("SpineContextSeg.IgnoredLabelValues", " ".join(str(v) for v in unknown))
        place_next_to_volume(segmentation_node, reference_volume)
        return ids_in_order
    finally:
        scene.RemoveNode(label_node)


def _attach_to_input_geometry(label_node, reference_volume, exported_ijk_to_ras: Optional[vtk.vtkMatrix4x4]) -> None:
    """Give the label map the input's local grid and transform when it is on the exported grid."""
    same_dimensions = label_node.GetImageData().GetDimensions() == reference_volume.GetImageData().GetDimensions()
    file_ijk_to_ras = vtk.vtkMatrix4x4()
    label_node.GetIJKToRASMatrix(file_ijk_to_ras)
    expected = exported_ijk_to_ras if exported_ijk_to_ras is not None else world_ijk_to_ras(reference_volume)
    if same_dimensions and matrices_close(file_ijk_to_ras, expected):
        local = vtk.vtkMatrix4x4()
        reference_volume.GetIJKToRASMatrix(local)
        label_node.SetIJKToRASMatrix(local)
        label_node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
    else:
        # Not on the input grid: keep the file's world geometry; the import resamples into the
        # segmentation's frame (a slower but correct path).
        label_node.SetAndObserveTransformNodeID(None)


def set_segment_metadata(segment, label: Dict[str, Any]) -> None:
    """Name, colour and SNOMED terminology tag of one segment from its label-table entry.

    Name and colour are marked as chosen, not auto-generated, so Slicer keeps them (an
    auto-generated name or colour is replaced when the terminology is edited or the segment
    is copied).
    """
    segment.SetName(str(label.get("name") or segment.GetName()))
    segment.SetColor(*_label_color(label))
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    terminology = label.get("terminology")
    if terminology:
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), str(terminology))
    if label.get("snomed_code"):
        segment.SetTag("SpineContextSeg.SnomedCode", str(label["snomed_code"]))
    segment.SetTag("SpineContextSeg.LabelValue", str(label.get("value", "")))


def place_next_to_volume(node, volume_node) -> None:
    """Put ``node`` in the same subject-hierarchy folder or study as ``volume_node``."""
    scene = node.GetScene()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    volume_item = sh.GetItemByDataNode(volume_node)
    if not volume_item:
        return
    parent_item = sh.GetItemParent(volume_item)
    node_item = sh.GetItemByDataNode(node)
    if node_item:
        sh.SetItemParent(node_item, parent_item)
    else:  # Slicer's GUI plugins create items for new nodes; without them (slicer-core) create it here
        sh.CreateItem(parent_item, node)


def load_terminology(terminology_logic, path: str) -> str:
    """Load the extension's terminology file into Slicer's Terminologies logic; return its context name.

    ``terminology_logic``: ``slicer.modules.terminologies.logic()`` in Slicer (a
    ``vtkSlicerTerminologiesModuleLogic``). Loading twice is harmless (Slicer replaces it).

    Raises
    ------
    SegmentationError
        ``internal`` if the file is missing, cannot be parsed, or defines another context
        than the one the segments name.
    """
    from SpineContextSegLib.labels import TERMINOLOGY_CONTEXT

    if not os.path.isfile(path):
        raise SegmentationError("internal", f"The terminology file {path} is missing; the extension is incompletely installed.")
    name = terminology_logic.LoadTerminologyFromFile(os.fspath(path))
    if not name:
        raise SegmentationError("internal", f"Slicer could not read the terminology file {path}.")
    if name != TERMINOLOGY_CONTEXT:
        raise SegmentationError("internal", f"{path} defines the context '{name}', but segments name '{TERMINOLOGY_CONTEXT}'.")
    return name


# ----------------------------------------------------------------------------- spine ROI and centreline
#: Attributes on the segmentation node naming the ROI and centreline nodes made for it (reused by the next run).
ROI_NODE_ATTRIBUTE = "SpineContextSeg.RoiNodeID"
CENTRELINE_NODE_ATTRIBUTE = "SpineContextSeg.CentrelineNodeID"


def lps_world_to_local_ras(reference_volume) -> vtk.vtkMatrix4x4:
    """World LPS (the worker's JSON files) -> RAS in the frame of ``reference_volume``'s parent transform.

    The worker saw the volume in world coordinates (:func:`export_volume`); nodes placed under
    the volume's transform need the inverse of that transform applied.
    """
    lps_to_ras = vtk.vtkMatrix4x4()
    lps_to_ras.SetElement(0, 0, -1.0)
    lps_to_ras.SetElement(1, 1, -1.0)
    transform_node = reference_volume.GetParentTransformNode()
    if transform_node is None:
        return lps_to_ras
    world_to_local = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformFromWorld(world_to_local)
    result = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(world_to_local, lps_to_ras, result)
    return result


def _apply(matrix: vtk.vtkMatrix4x4, point: Sequence[float], *, direction: bool = False) -> List[float]:
    homogeneous = [float(point[0]), float(point[1]), float(point[2]), 0.0 if direction else 1.0]
    return list(matrix.MultiplyPoint(homogeneous))[:3]


def _reusable_node(segmentation_node, attribute: str, class_name: str, name: str):
    """The node this segmentation's previous run made (same class), emptied; else a new one."""
    scene = segmentation_node.GetScene()
    node_id = segmentation_node.GetAttribute(attribute)
    node = scene.GetNodeByID(node_id) if node_id else None
    if node is None or not node.IsA(class_name):
        node = scene.AddNewNodeByClass(class_name, name)
        segmentation_node.SetAttribute(attribute, node.GetID())
    node.SetName(name)
    if hasattr(node, "RemoveAllControlPoints"):
        node.RemoveAllControlPoints()
    return node


def import_spine_roi(path: str, segmentation_node, reference_volume, *, visible: bool = False):
    """The worker's ``--roi`` JSON as a box-shaped Markups ROI node next to the segmentation.

    The box keeps its orientation (the image's axes), centre and size; it lies under the
    input volume's parent transform, like the segmentation. Hidden by default (its handles
    would cover the slice views); locked, so it is not dragged by accident. A later run for
    the same segmentation updates the same node. Returns the node.
    """
    with open(path, encoding="utf-8") as handle:
        box = json.load(handle)
    to_local = lps_world_to_local_ras(reference_volume)
    node = _reusable_node(segmentation_node, ROI_NODE_ATTRIBUTE, "vtkMRMLMarkupsROINode", f"{segmentation_node.GetName()} ROI")
    node.SetROIType(slicer.vtkMRMLMarkupsROINode.ROITypeBox)
    object_to_node = vtk.vtkMatrix4x4()
    for column, axis in enumerate(box["axes"]):
        local_axis = _apply(to_local, axis, direction=True)
        length = sum(c * c for c in local_axis) ** 0.5 or 1.0
        for row in range(3):
            object_to_node.SetElement(row, column, local_axis[row] / length)
    centre = _apply(to_local, box["centre_lps_mm"])
    for row in range(3):
        object_to_node.SetElement(row, 3, centre[row])
    node.SetAndObserveObjectToNodeMatrix(object_to_node)
    node.SetSize(*[float(v) for v in box["size_mm"]])
    node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
    node.SetLocked(True)
    node.SetAttribute("SpineContextSeg.RoiMarginMm", str(box.get("margin_mm", "")))
    node.CreateDefaultDisplayNodes()
    if node.GetDisplayNode() is not None:
        node.GetDisplayNode().SetVisibility(bool(visible))
    place_next_to_volume(node, reference_volume)
    return node


def import_centreline(path: str, segmentation_node, reference_volume):
    """The worker's ``--centreline`` JSON as a Markups curve through the vertebral bodies' centres.

    Control points: one per vertebral body (labelled with its name after a Vertebrae run),
    from the lowest to the highest; with fewer than two bodies, the centreline's own points
    every 10 mm. The sagittal and coronal summaries (end angle, most tilted pair, maximum
    curvature) are stored as JSON in the node attributes ``SpineContextSeg.Sagittal`` and
    ``SpineContextSeg.Coronal``. Locked; under the input's parent transform. Returns the node.
    """
    with open(path, encoding="utf-8") as handle:
        line = json.load(handle)
    to_local = lps_world_to_local_ras(reference_volume)
    bodies = line.get("vertebrae") or []
    if len(bodies) >= 2:
        points = [(body["centre_lps_mm"], str(body.get("label", ""))) for body in bodies]
    else:
        every = max(1, int(round(10.0 / float(line.get("step_mm") or 2.0))))
        points = [(point, "") for point in line.get("points_lps_mm", [])[::every]]
    node = _reusable_node(segmentation_node, CENTRELINE_NODE_ATTRIBUTE, "vtkMRMLMarkupsCurveNode", f"{segmentation_node.GetName()} centreline")
    for point, label in points:
        index = node.AddControlPoint(vtk.vtkVector3d(*_apply(to_local, point)))
        node.SetNthControlPointLabel(index, label)
    node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
    node.SetLocked(True)
    for plane in ("sagittal", "coronal"):
        if plane in line:
            node.SetAttribute(f"SpineContextSeg.{plane.capitalize()}", json.dumps(line[plane]))
    node.CreateDefaultDisplayNodes()
    place_next_to_volume(node, reference_volume)
    return node


# ----------------------------------------------------------------------------- surfaces
def create_closed_surface(segmentation_node, *, show_in_3d: bool = True, smoothing_factor: Optional[float] = None) -> None:
    """Create the closed-surface representation (after an import it is missing) and show it in 3D."""
    if smoothing_factor is not None:
        segmentation_node.GetSegmentation().SetConversionParameter("Smoothing factor", str(float(smoothing_factor)))
    segmentation_node.CreateClosedSurfaceRepresentation()
    display = segmentation_node.GetDisplayNode()
    if display is None:
        segmentation_node.CreateDefaultDisplayNodes()
        display = segmentation_node.GetDisplayNode()
    if display is not None and show_in_3d:
        display.SetPreferredDisplayRepresentationName3D("Closed surface")
        display.SetVisibility3D(True)
        display.SetVisibility(True)


def segment_ids_by_name(segmentation_node, names: Optional[Iterable[str]] = None) -> List[str]:
    """IDs of the segments whose names are in ``names`` (case-insensitive), in segmentation order; all when ``None``."""
    segmentation = segmentation_node.GetSegmentation()
    all_ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if names is None:
        return all_ids
    wanted = {str(n).strip().lower() for n in names}
    return [sid for sid in all_ids if segmentation.GetSegment(sid).GetName().strip().lower() in wanted]


def export_stl(
    segmentation_node,
    folder: str,
    *,
    segment_ids: Optional[Sequence[str]] = None,
    merge: bool = False,
    size_scale: float = 1.0,
    lps: bool = True,
) -> List[str]:
    """Write closed surfaces as binary STL through Slicer's segmentation logic.

    One file per segment, ``<node name>_<segment name>.stl``, or one merged ``<node name>.stl``.
    Slicer sanitises only the node name; segment names are made safe here (temporarily
    renamed for the export, then restored), so a name like ``C1/C2`` cannot escape the folder.

    Parameters
    ----------
    size_scale : float
        Multiplies coordinates (1.0 = mm; 0.001 = metres for some printers' software).
    lps : bool
        LPS coordinates (DICOM, Slicer's default for files) or RAS.

    Returns
    -------
    list of str
        The files written (each verified to exist and be non-empty).

    Raises
    ------
    SegmentationError
        ``output_dir_missing`` / ``output_not_writable`` if the folder cannot be created or
        written; ``no_spine_found`` if there is nothing to export.
    """
    folder = os.path.abspath(os.fspath(folder))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise SegmentationError("output_not_writable", f"Cannot create the export folder {folder}: {error.strerror or error}.") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SegmentationError("output_not_writable", f"Cannot write to {folder}: the folder is read-only. Choose another export folder.")
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segment_ids) if segment_ids is not None else segment_ids_by_name(segmentation_node)
    ids = [sid for sid in ids if segmentation.GetSegment(sid) is not None]
    if not ids:
        raise SegmentationError("no_spine_found", "There are no segments to export.")
    original_node_name = segmentation_node.GetName()
    node_name = safe_file_name(original_node_name or "")
    rename_node = not node_name  # Slicer would write "_<segment>.stl"
    node_name = node_name or "Segmentation"
    originals = {sid: segmentation.GetSegment(sid).GetName() for sid in ids}
    used = set()
    expected = []
    for sid in ids:
        base = safe_file_name(originals[sid]) or sid
        name, counter = base, 2
        while name.lower() in used:
            name, counter = f"{base} ({counter})", counter + 1
        used.add(name.lower())
        expected.append((sid, name))
    if merge:
        paths = [os.path.join(folder, f"{node_name}.stl")]
    else:
        paths = [os.path.join(folder, f"{node_name}_{name}.stl") for _, name in expected]
    array = vtk.vtkStringArray()
    for sid in ids:
        array.InsertNextValue(sid)
    for path in paths:  # a stale file must not pass the check below
        if os.path.isfile(path):
            os.remove(path)
    try:
        if rename_node:
            segmentation_node.SetName(node_name)
        for sid, name in expected:
            segmentation.GetSegment(sid).SetName(name)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsClosedSurfaceRepresentationToFiles(
            folder, segmentation_node, array, "STL", bool(lps), float(size_scale), bool(merge)
        )
    finally:
        for sid, name in originals.items():
            segmentation.GetSegment(sid).SetName(name)
        if rename_node:
            segmentation_node.SetName(original_node_name)
    missing = [p for p in paths if not os.path.isfile(p) or os.path.getsize(p) <= 84]  # 80-byte header + count
    if not ok or missing:
        raise SegmentationError(
            "output_not_writable",
            f"STL export to {folder} failed for {', '.join(os.path.basename(p) for p in missing) or 'some segments'}. "
            "Check the folder is writable and has free space.",
        )
    return paths
