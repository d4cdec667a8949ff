"""The panel's parameter node, and what its choices mean for the worker.

:class:`SpineContextSegParameterNode` is everything the panel remembers (saved with the scene;
the .ui binds its widgets to these fields). The tables map the choices shown in the panel to
the logic's arguments, and :func:`processOptions` / :func:`exportOptions` build those arguments.
Defaults the panel fills in: :func:`defaultExportDirectory`, :func:`defaultSegmentationName`.
"""
from __future__ import annotations

import os
import pathlib
from typing import Annotated, Any, Dict

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

#: Choices shown in the panel -> worker arguments.
TASKS = {"Spine": "spine", "Vertebrae": "vertebrae"}
DEVICES = {"Auto": "auto", "CPU": "cpu", "GPU": "cuda"}
#: Quality preset -> tile overlap (None: the model card's tuned default).
QUALITY_OVERLAP = {"Fast": 0.0, "Standard": None, "Best": 0.5}
EXPORT_MODES = {"One file per segment": False, "One merged file": True}


@parameterNodeWrapper
class SpineContextSegParameterNode:
    """Everything the panel remembers, saved with the scene.

    inputVolume - CT to segment.
    outputSegmentation - target segmentation; none: create a new one.
    task, device, quality - see TASKS, DEVICES, QUALITY_OVERLAP.
    autoShow3D - create the surface and centre the 3D view after a run.
    exportDirectory, exportMode, exportVertebrae, exportSizeScale, exportCoordinateSystem - STL export.
    modelPath - model folder or model.onnx; empty: the bundled model.
    overrideOverlap, overlap - tile overlap instead of the quality preset's.
    threads - CPU threads (0: automatic).
    keepTemporaryFiles - keep the worker's files (debugging).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    task: Annotated[str, Choice(list(TASKS))] = "Spine"
    device: Annotated[str, Choice(list(DEVICES))] = "Auto"
    quality: Annotated[str, Choice(list(QUALITY_OVERLAP))] = "Standard"
    autoShow3D: bool = True
    exportDirectory: pathlib.Path
    exportMode: Annotated[str, Choice(list(EXPORT_MODES))] = "One file per segment"
    exportVertebrae: str = ""
    exportSizeScale: Annotated[float, WithinRange(0.001, 1000.0)] = 1.0
    exportCoordinateSystem: Annotated[str, Choice(["LPS", "RAS"])] = "LPS"
    modelPath: str = ""
    overrideOverlap: bool = False
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.5
    threads: Annotated[int, WithinRange(0, 256)] = 0
    keepTemporaryFiles: bool = False


def processOptions(p: SpineContextSegParameterNode) -> Dict[str, Any]:
    """``SpineContextSegLogic.process`` keyword arguments chosen in the panel (parameter node ``p``)."""
    return dict(
        device=DEVICES[p.device],
        task=TASKS[p.task],
        model=p.modelPath.strip() or None,
        overlap=p.overlap if p.overrideOverlap else QUALITY_OVERLAP[p.quality],
        threads=p.threads or None,
        showResult=p.autoShow3D,
    )


def exportOptions(p: SpineContextSegParameterNode) -> Dict[str, Any]:
    """``SpineContextSegLogic.exportStl`` keyword arguments chosen in the panel (parameter node ``p``)."""
    return dict(
        vertebrae=p.exportVertebrae,
        merge=EXPORT_MODES[p.exportMode],
        sizeScale=p.exportSizeScale,
        lps=p.exportCoordinateSystem == "LPS",
    )


def defaultExportDirectory() -> str:
    try:
        base = slicer.app.defaultScenePath
    except AttributeError:
        base = ""
    return os.path.join(base or os.path.expanduser("~"), "SpineContextSeg")


def defaultSegmentationName(volumeNode, task: str) -> str:
    suffix = "vertebrae" if task == "vertebrae" else "spine"
    return slicer.mrmlScene.GenerateUniqueName(f"{volumeNode.GetName()} {suffix}")
