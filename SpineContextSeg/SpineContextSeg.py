"""SpineContextSeg: one-click spine segmentation of CT in 3D Slicer.

The module is a thin Slicer layer around two pieces that are tested without Slicer:

* ``SpineContextSegLib`` (installed next to this file): the segmentation itself. It runs in a
  separate ``PythonSlicer`` process, ``python -m SpineContextSegLib.worker``, that speaks a
  JSON-line protocol, so Slicer never loads ONNX Runtime and the viewer stays responsive.
* ``SpineContextSegSlicerLib`` (a sub-package of this folder): ``worker_process`` (start,
  events, cancel, kill, temp-folder cleanup; pure Python) and ``mrml_io`` (volume export,
  label-map import, surfaces, STL export; MRML + VTK, no Qt).

Nothing heavy is imported at module level: Slicer imports every module at startup.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import sys
from typing import Annotated, Any, Callable, Dict, List, Optional

import ctk
import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))

#: Choices shown in the panel -> worker arguments.
TASKS = {"Spine": "spine", "Vertebrae": "vertebrae"}
DEVICES = {"Auto": "auto", "CPU": "cpu", "GPU": "cuda"}
#: Quality preset -> tile overlap (None: the model card's tuned default).
QUALITY_OVERLAP = {"Fast": 0.0, "Standard": None, "Best": 0.5}
EXPORT_MODES = {"One file per segment": False, "One merged file": True}

#: Packages the worker needs that Slicer does not bundle (numpy, SciPy, SimpleITK, VTK are bundled).
CPU_REQUIREMENTS = ["onnxruntime>=1.16", "tqdm>=4.60"]
GPU_RUNTIME = "onnxruntime-gpu>=1.16"
#: The fast CPU engine (about 3x ONNX Runtime on a CPU; reads the same model.onnx, picked by the
#: worker when importable). Optional: ONNX Runtime stays installed as the fallback.
OPENVINO_REQUIREMENT = "openvino>=2024.0"
#: (sys.platform, platform.machine()) where PyPI has OpenVINO wheels: the same set as the
#: markers of openvino in pyproject.toml (no wheels for Windows on ARM, ppc64le, s390x, 32-bit).
OPENVINO_PLATFORMS = {("linux", "x86_64"), ("linux", "aarch64"), ("win32", "AMD64"), ("darwin", "x86_64"), ("darwin", "arm64")}
#: Settings key: the OpenVINO install was offered (declined or failed: never asked again).
OPENVINO_OFFERED_SETTING = "SpineContextSeg/OpenVINOOffered"
#: Slicer's own packages: pip must never replace them while installing ours.
PROTECTED_DISTRIBUTIONS = ("numpy", "SimpleITK", "vtk", "scipy", "requests")

SAMPLE_NAME = "SpineContextSeg sample CT"
SAMPLE_NODE_NAME = "SpineContextSegSampleCT"
SAMPLE_CATEGORY = "SpineContextSeg"
#: SHA-256 of the bundled sample CT (SpineContextSegLib/resources/sample/ct.nii.gz). Sample Data
#: checks the copy it makes against this value, so a damaged or replaced file is reported, not loaded.
SAMPLE_SHA256 = "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1"

#: Our terminology context (SNOMED CT codes and colours of the spine segments), loaded at start-up.
TERMINOLOGY_FILE = os.path.join(MODULE_DIR, "Resources", "SegmentationCategoryTypeModifier-SpineContextSeg.term.json")
#: Who wrote the module, as "Name (Organisation)" (the same list as EXTENSION_CONTRIBUTORS in CMakeLists.txt).
CONTRIBUTORS = ["SpineContextSeg maintainers (SpineContextSeg project)"]


def _libraries():
    """Import the module's helper packages (cheap; done on first use, not at Slicer startup)."""
    if MODULE_DIR not in sys.path:
        sys.path.insert(0, MODULE_DIR)
    from SpineContextSegSlicerLib import mrml_io, worker_process

    return mrml_io, worker_process


#
# SpineContextSeg
#


class SpineContextSeg(ScriptedLoadableModule):
    """Module description (title, category, help). See ``ScriptedLoadableModule``."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Spine Segmentation (SpineContextSeg)")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = list(CONTRIBUTORS)
        self.parent.helpText = _(
            """
Segments the spine in a CT volume with a 3D residual U-Net (SpineContextResUNet), on the CPU
or an NVIDIA GPU, in a background process: pick the CT and click <b>Segment spine</b>.
The result is a segmentation with SNOMED-coded segments, shown in 3D and exportable as STL.
See the <a href="https://github.com/SpineContextSeg/SlicerSpineContextSeg#readme">documentation</a>.
"""
        )
        self.parent.acknowledgementText = _(
            """
Built on 3D Slicer's segmentation infrastructure, ONNX Runtime and OpenVINO. The sample CT comes from
the TotalSegmentator test data (Apache-2.0). Research use only; not a medical device.
"""
        )
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", loadTerminology)


def samplePath() -> str:
    """The bundled sample CT (shipped inside SpineContextSegLib).

    Raises ``ImportError`` when the library is not installed next to the module.
    """
    _libraries()
    from SpineContextSegSlicerLib import library_parent_dir

    return os.path.join(library_parent_dir(), "SpineContextSegLib", "resources", "sample", "ct.nii.gz")


def registerSampleData() -> bool:
    """Register the bundled spine CT in the Sample Data module (a local file; nothing is downloaded).

    Runs at start-up: an incomplete install logs one warning line and returns False, never a
    traceback. Returns True when the sample was registered.
    """
    try:
        import SampleData
    except ImportError:  # Sample Data module disabled
        return False
    try:
        path = samplePath()
    except (ImportError, OSError) as error:
        logging.warning(f"SpineContextSeg: the sample CT is not available ({error}); not registering it.")
        return False
    if not os.path.isfile(path):
        logging.warning(f"SpineContextSeg: sample CT missing at {path}; not registering it.")
        return False
    logic = SampleData.SampleDataLogic
    if hasattr(logic, "registerCustomSampleDataCategory"):  # Slicer 5.12+
        logic.registerCustomSampleDataCategory(SAMPLE_CATEGORY, title=_("Spine segmentation"))
    logic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName=SAMPLE_NAME,
        thumbnailFileName=os.path.join(MODULE_DIR, "Resources", "Icons", "SpineContextSegSampleCT.png"),
        uris=pathlib.Path(path).as_uri(),  # copied into Slicer's cache like a download
        fileNames="SpineContextSegSampleCT.nii.gz",
        checksums=f"SHA256:{SAMPLE_SHA256}",  # Sample Data verifies its copy against this
        nodeNames=SAMPLE_NODE_NAME,
        loadFileTypes="VolumeFile",
    )
    return True


def loadTerminology() -> Optional[str]:
    """Load our terminology (TERMINOLOGY_FILE) into Slicer's Terminologies module; return its context name.

    Runs at start-up, after the Terminologies module exists. Never raises: without it (module
    disabled, file missing) the segments keep their codes and one warning line is logged.
    """
    try:
        terminologyLogic = slicer.modules.terminologies.logic()
    except AttributeError:
        logging.warning("SpineContextSeg: the Terminologies module is not loaded; segment codes cannot be looked up.")
        return None
    try:
        mrml_io, _worker_process = _libraries()
        return mrml_io.load_terminology(terminologyLogic, TERMINOLOGY_FILE)
    except Exception as error:  # an incomplete install must not print a traceback at start-up
        logging.warning(f"SpineContextSeg: terminology not loaded: {error}")
        return None


#
# SpineContextSegParameterNode
#


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


#
# SpineContextSegWidget
#

IDLE, RUNNING, CANCELLING = "idle", "running", "cancelling"


class SpineContextSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: parameter-node bound widgets, an Apply<->Cancel button, progress, log, export."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[SpineContextSegLogic] = None
        self._parameterNode: Optional[SpineContextSegParameterNode] = None
        self._parameterNodeGuiTag = None
        self._state = IDLE

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SpineContextSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SpineContextSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.openExportFolderButton.connect("clicked(bool)", self.onOpenExportFolder)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.bundledModelButton.connect("clicked(bool)", self.onUseBundledModel)
        self.ui.copyLogButton.connect("clicked(bool)", self.onCopyLog)
        self.ui.clearLogButton.connect("clicked(bool)", lambda: self.ui.logTextEdit.clear())
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)

        self.initializeParameterNode()
        self.setProcessingState(IDLE)

    def cleanup(self) -> None:
        """Module unloaded or application closing: stop a running worker, drop every observer."""
        if self.logic is not None:
            self.logic.cleanup()  # stops the worker; removes its quit and scene-close observers
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic is not None:
            self.logic.stop()  # the nodes it would import into are going away
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def ensureParameterNode(self) -> SpineContextSegParameterNode:
        """The parameter node, created when missing (after a scene close while the module was not entered)."""
        if self._parameterNode is None:
            self.initializeParameterNode()
        return self._parameterNode

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode
        if str(self._parameterNode.exportDirectory) in ("", "."):
            self._parameterNode.exportDirectory = pathlib.Path(defaultExportDirectory())

    def setParameterNode(self, inputParameterNode: Optional[SpineContextSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self.updateButtons()

    def updateButtons(self) -> None:
        p = self._parameterNode
        running = self._state != IDLE
        self.ui.overlapSpinBox.enabled = bool(p and p.overrideOverlap) and not running
        if running:
            self.ui.applyButton.enabled = self._state == RUNNING
        elif p and p.inputVolume:
            self.ui.applyButton.text = _("Segment vertebrae") if p.task == "Vertebrae" else _("Segment spine")
            self.ui.applyButton.enabled = True
            self.ui.applyButton.toolTip = _("Segment the {what} in '{name}'.").format(
                what=_("vertebrae") if p.task == "Vertebrae" else _("spine"), name=p.inputVolume.GetName())
        else:
            self.ui.applyButton.text = _("Segment vertebrae") if p and p.task == "Vertebrae" else _("Segment spine")
            self.ui.applyButton.enabled = False
            self.ui.applyButton.toolTip = _("Select an input CT volume first.")
        segmentation = p.outputSegmentation if p else None
        hasSegments = bool(segmentation and segmentation.GetSegmentation().GetNumberOfSegments() > 0)
        self.ui.exportButton.enabled = hasSegments and not running
        self.ui.exportButton.toolTip = (
            _("Write the surfaces of '{name}' as STL.").format(name=segmentation.GetName())
            if hasSegments
            else _("Segment the spine first (or select a segmentation with segments as output).")
        )

    def onOutputChanged(self, node) -> None:
        self.ui.show3DButton.setSegmentationNode(node)
        self.updateButtons()

    # ------------------------------------------------------------------ state machine
    def setProcessingState(self, state: str) -> None:
        """One place that maps the run state onto every widget."""
        self._state = state
        running = state != IDLE
        if state == RUNNING:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the segmentation; nothing is imported.")
        else:
            self.ui.applyButton.text = _("Cancelling\u2026")
        for widget in (
            self.ui.inputVolumeSelector,
            self.ui.outputSegmentationSelector,
            self.ui.taskComboBox,
            self.ui.deviceComboBox,
            self.ui.qualityComboBox,
            self.ui.advancedCollapsibleButton,
        ):
            widget.enabled = not running
        self.ui.progressBar.visible = running
        if not running:
            self.ui.progressBar.value = 0
        self.updateButtons()

    def setStatus(self, text: str, *, error: bool = False, log: bool = True) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.styleSheet = "color: #c0392b" if error else ""
        if log:
            self.appendLog(text)

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    # ------------------------------------------------------------------ actions
    def onApplyButton(self) -> None:
        if self._state == RUNNING:
            self.setProcessingState(CANCELLING)
            self.setStatus(_("Cancelling\u2026"))
            self.logic.cancel()
            return
        if self._state != IDLE:
            return
        p = self.ensureParameterNode()
        device = DEVICES[p.device]
        if not self.ensureDependencies(device):
            return
        inputVolume = p.inputVolume
        segmentation = p.outputSegmentation
        if segmentation is None:
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", defaultSegmentationName(inputVolume, TASKS[p.task]))
            segmentation.CreateDefaultDisplayNodes()
            p.outputSegmentation = segmentation
        self.ui.logTextEdit.clear()
        self.ui.progressBar.format = _("Starting\u2026")
        self.setProcessingState(RUNNING)
        self.setStatus(_("Segmenting '{name}'\u2026").format(name=inputVolume.GetName()))
        try:
            self.logic.keepTemporaryFiles = p.keepTemporaryFiles
            self.logic.process(
                inputVolume,
                segmentation,
                device=device,
                task=TASKS[p.task],
                model=p.modelPath.strip() or None,
                overlap=p.overlap if p.overrideOverlap else QUALITY_OVERLAP[p.quality],
                threads=p.threads or None,
                showResult=p.autoShow3D,
                waitForCompletion=False,
                eventCallback=self.onLogicEvent,
            )
        except Exception as error:
            self.setProcessingState(IDLE)
            self.showError(_("Could not start the segmentation"), error)

    def ensureDependencies(self, device: str) -> bool:
        """Check the worker's Python packages; offer to install the missing ones (never silently).

        OpenVINO, the fast CPU engine, is offered once and never required: declined or failed,
        ONNX Runtime segments.
        """
        requirements, uninstall = self.logic.missingDependencies(device)
        if OPENVINO_REQUIREMENT in requirements and openVinoOffered():
            requirements = [r for r in requirements if r != OPENVINO_REQUIREMENT]
        if not requirements:
            return True
        withOpenVino = OPENVINO_REQUIREMENT in requirements
        if requirements == [OPENVINO_REQUIREMENT]:  # ONNX Runtime is there: the run goes ahead either way
            text = _(
                "OpenVINO makes segmentation on the CPU about 3 times faster than ONNX Runtime, which is installed.\n\n"
                "Install OpenVINO now? This downloads about 50 MB. Slicer's own packages (numpy, SimpleITK, VTK) are not changed.\n\n"
                "If you choose Cancel, SpineContextSeg uses ONNX Runtime and does not ask again."
            )
            rememberOpenVinoOffered()
            if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Install OpenVINO")):
                self.appendLog(_("OpenVINO not installed: segmenting with ONNX Runtime."))
                return True
        else:
            text = _(
                "SpineContextSeg needs these Python packages, which are not installed yet:\n\n    {packages}\n\n"
                "Install them now? This downloads about 20-300 MB and can take a few minutes. "
                "Slicer's own packages (numpy, SimpleITK, VTK) are not changed."
            ).format(packages="\n    ".join(requirements))
            if withOpenVino:
                text += "\n\n" + _("OpenVINO is the fast engine on the CPU; if it cannot be installed, ONNX Runtime does the work.")
            if uninstall:
                text += "\n\n" + _("{old} will be replaced by {new} (they cannot be installed together).").format(old=", ".join(uninstall), new=GPU_RUNTIME.split(">")[0])
            if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Install Python packages")):
                required = [r for r in requirements if r != OPENVINO_REQUIREMENT]
                self.setStatus(_("Not started: {packages} is required. Install it, or choose Device: CPU.").format(packages=", ".join(required)), error=True)
                return False
            if withOpenVino:
                rememberOpenVinoOffered()  # asked once: a failed install is not retried on every run
        self.setStatus(_("Installing {packages}\u2026").format(packages=", ".join(requirements)))
        try:
            with slicer.util.WaitCursor():
                failed = self.logic.installDependencies(requirements, uninstall=uninstall) or []
        except Exception as error:
            # Slicer 5.12+ already showed pip's failure (with its log) in its own dialog: one dialog, not two.
            self.showError(_("Installing the Python packages failed"), error, dialog=not getattr(error, "shownToUser", False))
            return False
        installed = [r for r in requirements if r not in failed]
        if installed:
            self.setStatus(_("Installed {packages}.").format(packages=", ".join(installed)))
        if failed:  # not an error: the run goes ahead on ONNX Runtime
            self.setStatus(_("{packages} could not be installed (see the Python console): segmenting with ONNX Runtime, which is slower on the CPU.").format(
                packages=", ".join(failed)))
        return True

    def onLogicEvent(self, event) -> None:
        """Progress and results from the logic (always on the GUI thread)."""
        _mrml_io, worker_process = _libraries()
        if event.kind == "progress":
            self.ui.progressBar.value = int(1000 * worker_process.overall_fraction(event.message))
            self.ui.progressBar.format = event.describe()  # stage names and numbers: no % placeholders
            self.ui.statusLabel.text = _("Segmenting: {progress}").format(progress=event.describe())
        elif event.kind == "status":
            self.setStatus(event.message.get("text", ""))
        elif event.kind in ("log", "warning", "started", "error"):
            self.appendLog(event.describe())
            if event.kind == "warning":
                self.ui.statusLabel.text = event.describe()
        elif event.kind == "finished":
            self.onRunFinished(event.outcome)

    def onRunFinished(self, outcome) -> None:
        self.setProcessingState(IDLE)
        for line in outcome.log_tail if not outcome.succeeded else []:
            if line not in self.ui.logTextEdit.toPlainText():
                self.appendLog(line)
        if outcome.succeeded:
            seconds = (outcome.result or {}).get("timings_s", {}).get("total")
            timing = _(" in {seconds:.0f} s").format(seconds=seconds) if isinstance(seconds, (int, float)) else ""
            self.setStatus(_("Done{timing}: {count} segment(s) in '{name}'.").format(
                timing=timing, count=len(self.logic.lastRun.segmentIds), name=self.logic.lastRun.outputSegmentation.GetName()))
            self.ui.show3DButton.setSegmentationNode(self.logic.lastRun.outputSegmentation)
        elif outcome.status == "cancelled":
            self.setStatus(_("Cancelled. Nothing was imported."))
        else:
            message = _("Segmentation failed [{code}]: {message}").format(code=outcome.code, message=outcome.message)
            remedy = outcome.remedy()
            if remedy:
                message += "\n" + _("What to do: {remedy}").format(remedy=remedy)
            self.setStatus(message, error=True)
            self.ui.logCollapsibleButton.collapsed = False
            slicer.util.errorDisplay(message, detailedText="\n".join(outcome.log_tail), windowTitle=_("SpineContextSeg"))

    def showError(self, title: str, error: BaseException, *, dialog: bool = True) -> None:
        """Status line, log and (unless ``dialog`` is False: already shown elsewhere) an error dialog."""
        message = f"{title}: {error}"
        self.setStatus(message, error=True)
        self.ui.logCollapsibleButton.collapsed = False
        logging.error(message)
        if dialog:
            slicer.util.errorDisplay(message, windowTitle=_("SpineContextSeg"))

    def onExportButton(self) -> None:
        p = self.ensureParameterNode()
        try:
            with slicer.util.WaitCursor():
                paths = self.logic.exportStl(
                    p.outputSegmentation,
                    str(p.exportDirectory),
                    vertebrae=p.exportVertebrae,
                    merge=EXPORT_MODES[p.exportMode],
                    sizeScale=p.exportSizeScale,
                    lps=p.exportCoordinateSystem == "LPS",
                )
        except Exception as error:
            self.showError(_("STL export failed"), error)
            return
        self.setStatus(_("Wrote {count} STL file(s) to {folder}.").format(count=len(paths), folder=str(p.exportDirectory)))
        for path in paths:
            self.appendLog(path)

    def onOpenExportFolder(self) -> None:
        folder = str(self.ensureParameterNode().exportDirectory)
        os.makedirs(folder, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(folder))

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(),
            _("Import model: choose model.onnx or model.json in the model folder"),
            "",
            _("SpineContextSeg model (model.onnx model.json);;All files (*)"),
        )
        if not path:
            return
        try:
            with slicer.util.WaitCursor():
                destination = self.logic.importModel(path)
        except Exception as error:
            self.showError(_("Importing the model failed"), error)
            return
        self.ensureParameterNode().modelPath = destination
        self.setStatus(_("Model imported to {folder} and selected.").format(folder=destination))

    def onUseBundledModel(self) -> None:
        self.ensureParameterNode().modelPath = ""

    def onCopyLog(self) -> None:
        qt.QApplication.clipboard().setText(self.ui.logTextEdit.toPlainText())


def defaultExportDirectory() -> str:
    try:
        base = slicer.app.defaultScenePath
    except AttributeError:
        base = ""
    return os.path.join(base or os.path.expanduser("~"), "SpineContextSeg")


def defaultSegmentationName(volumeNode, task: str) -> str:
    suffix = "vertebrae" if task == "vertebrae" else "spine"
    return slicer.mrmlScene.GenerateUniqueName(f"{volumeNode.GetName()} {suffix}")


def userModelsDirectory() -> str:
    """Where imported models are kept: ``$SPINECONTEXTSEG_MODELS_DIR`` or ``~/.SpineContextSeg/models``."""
    return os.environ.get("SPINECONTEXTSEG_MODELS_DIR") or os.path.join(os.path.expanduser("~"), ".SpineContextSeg", "models")


#
# SpineContextSegLogic
#


@dataclasses.dataclass
class SegmentationRun:
    """One call of :meth:`SpineContextSegLogic.process`."""

    inputVolume: Any
    outputSegmentation: Any
    task: str
    showResult: bool
    tempDir: str
    worker: Any = None  # worker_process.WorkerProcess
    exportedIjkToRas: Any = None  # vtkMatrix4x4 the worker saw
    eventCallback: Optional[Callable[[Any], None]] = None
    segmentIds: List[str] = dataclasses.field(default_factory=list)
    outcome: Any = None  # worker_process.WorkerOutcome

    @property
    def finished(self) -> bool:
        return self.outcome is not None


class DependencyInstallError(RuntimeError):
    """pip could not install the worker's packages.

    ``shownToUser``: Slicer has already shown this failure with pip's log in its own error dialog
    (``slicer.packaging.pip_install`` in Slicer 5.12+ does, outside testing mode), so the panel
    must not show a second one.
    """

    def __init__(self, message: str, *, shownToUser: bool = False) -> None:
        super().__init__(message)
        self.shownToUser = shownToUser


def _slicerPackaging():
    """``slicer.packaging`` (Slicer 5.12+), or None on 5.8-5.10."""
    import importlib

    try:
        return importlib.import_module("slicer.packaging")
    except ImportError:
        return None


def _pipInstall(packaging, requirements: List[str], constraints: str, *, showProgress: bool = True) -> None:
    """pip-install through ``slicer.packaging`` (5.12+) or ``slicer.util`` (5.8-5.10); raises ``CalledProcessError``."""
    if packaging is not None:
        quiet = {} if showProgress else {"show_progress": False}  # busy cursor only, and no error dialog
        packaging.pip_install(list(requirements), constraints=constraints, requester="SpineContextSeg", **quiet)
    else:
        slicer.util.pip_install(list(requirements) + ["--constraint", constraints])


def openVinoSupported() -> bool:
    """Whether PyPI has OpenVINO wheels for this computer (else ONNX Runtime is the only CPU engine)."""
    import platform

    return (sys.platform, platform.machine()) in OPENVINO_PLATFORMS


def openVinoOffered() -> bool:
    """Whether the OpenVINO install was offered before (it is offered once, never forced)."""
    return str(qt.QSettings().value(OPENVINO_OFFERED_SETTING, "false")).lower() == "true"


def rememberOpenVinoOffered() -> None:
    qt.QSettings().setValue(OPENVINO_OFFERED_SETTING, "true")


def _slicerShowsPipErrors(packaging) -> bool:
    """Whether ``packaging.pip_install`` shows its own error dialog when pip fails.

    Slicer 5.12+ does (blocking install with a progress dialog, the default), except in testing
    mode, where it installs without any UI. Slicer 5.8-5.10 (no ``slicer.packaging``) never does.
    """
    if packaging is None:
        return False
    testingEnabled = getattr(slicer.app, "testingEnabled", None)
    try:
        return not (testingEnabled() if callable(testingEnabled) else False)
    except Exception:
        return True


class SpineContextSegLogic(ScriptedLoadableModuleLogic):
    """Segmentation without the GUI: ``process()`` is the one path for the panel, scripts and batch.

    Example (Python console)::

        logic = slicer.util.getModuleLogic("SpineContextSeg")
        volume = slicer.util.getNode("CTChest")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        run = logic.process(volume, segmentation, device="cpu")      # blocks; raises on failure
        logic.exportStl(segmentation, "/tmp/stl")
    """

    #: Seconds between the cancel file and the hard kill.
    cancelGraceSeconds = 5.0
    #: Milliseconds between polls of the worker's output (GUI thread).
    pollIntervalMsec = 100

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.activeRun: Optional[SegmentationRun] = None
        self.lastRun: Optional[SegmentationRun] = None
        self.keepTemporaryFiles = False
        self._timer = None
        self._pollSlot = None  # the one callable connected to the timer (disconnect needs the same object)
        self._quitSlot = None  # connected to aboutToQuit() while a run is active
        self._sceneObserver = None  # (scene, observer tag) while a run is active

    def getParameterNode(self):
        return SpineContextSegParameterNode(super().getParameterNode())

    @property
    def isRunning(self) -> bool:
        return self.activeRun is not None

    # ------------------------------------------------------------------ dependencies
    @staticmethod
    def missingDependencies(device: str = "auto"):
        """``(requirements to install, distributions to uninstall first)`` for the worker on ``device``.

        ``OPENVINO_REQUIREMENT`` among them is optional (see ``installDependencies``). Looks at
        installed package metadata only; imports nothing.
        """
        import importlib.util

        try:
            from importlib import metadata
        except ImportError:  # pragma: no cover - Python < 3.8
            metadata = None

        def installed(distribution: str) -> bool:
            if metadata is None:
                return False
            try:
                metadata.version(distribution)
                return True
            except metadata.PackageNotFoundError:
                return False

        requirements, uninstall = [], []
        wantGpu = device == "cuda" and sys.platform != "darwin"  # no CUDA builds for macOS
        hasRuntime = importlib.util.find_spec("onnxruntime") is not None
        if wantGpu and not installed("onnxruntime-gpu"):
            requirements.append(GPU_RUNTIME)
            if installed("onnxruntime"):
                uninstall.append("onnxruntime")
        elif not hasRuntime:
            requirements.append(CPU_REQUIREMENTS[0])
        # The fast CPU engine, where it has wheels; not for CUDA runs (and onnxruntime-gpu's auto is the GPU).
        if device != "cuda" and not installed("onnxruntime-gpu") and openVinoSupported() and importlib.util.find_spec("openvino") is None:
            requirements.append(OPENVINO_REQUIREMENT)
        if importlib.util.find_spec("tqdm") is None:
            requirements.append(CPU_REQUIREMENTS[1])
        return requirements, uninstall

    def installDependencies(self, requirements: List[str], uninstall: Optional[List[str]] = None) -> List[str]:
        """pip-install ``requirements`` into Slicer's Python, pinning Slicer's own packages.

        A constraints file fixes the installed versions of numpy, SimpleITK, VTK, SciPy and
        requests, so a dependency can never replace them.

        OpenVINO (``OPENVINO_REQUIREMENT``) is installed last, on its own: if that fails (no wheel
        for this Python or numpy, no network), a warning is logged and ONNX Runtime does the work.
        Returns the optional requirements that could not be installed.

        Raises ``DependencyInstallError`` when pip fails for a required package; its ``shownToUser``
        says whether Slicer (5.12+) already showed the failure in its own dialog.
        """
        import subprocess
        import tempfile

        from importlib import metadata

        optional = [r for r in requirements if r == OPENVINO_REQUIREMENT]
        required = [r for r in requirements if r not in optional]
        pins = []
        for distribution in PROTECTED_DISTRIBUTIONS:
            try:
                pins.append(f"{distribution}=={metadata.version(distribution)}")
            except metadata.PackageNotFoundError:
                pass
        folder = tempfile.mkdtemp(prefix="scs-pip-")
        constraints = os.path.join(folder, "constraints.txt")
        with open(constraints, "w", encoding="utf-8") as handle:
            handle.write("\n".join(pins) + "\n")
        packaging = _slicerPackaging()  # Slicer 5.12+
        failed = []
        try:
            if uninstall:
                try:
                    slicer.util.pip_uninstall(" ".join(uninstall))
                except subprocess.CalledProcessError as error:  # no dialog from Slicer for an uninstall
                    raise DependencyInstallError(
                        f"pip could not uninstall {', '.join(uninstall)} (exit status {error.returncode}). See the Python console for pip's output."
                    ) from error
            try:
                if required:
                    _pipInstall(packaging, required, constraints)
            except subprocess.CalledProcessError as error:
                raise DependencyInstallError(
                    f"pip could not install {', '.join(required)} (exit status {error.returncode}). "
                    "See pip's log (Python console) for the reason: often no network or a proxy.",
                    shownToUser=_slicerShowsPipErrors(packaging),
                ) from error
            for requirement in optional:
                try:
                    # without Slicer 5.12's progress dialog, which would end a failure with an error dialog
                    _pipInstall(packaging, [requirement], constraints, showProgress=False)
                except subprocess.CalledProcessError as error:
                    logging.warning(
                        f"SpineContextSeg: pip could not install {requirement} (exit status {error.returncode}; pip's output is in the Python console). "
                        "Segmentation uses ONNX Runtime instead, which is slower on the CPU."
                    )
                    failed.append(requirement)
        finally:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        import importlib

        importlib.invalidate_caches()
        still, _uninstall = self.missingDependencies("cuda" if any(r.startswith("onnxruntime-gpu") for r in requirements) else "auto")
        failed += [r for r in still if r in optional and r not in failed]  # pip "succeeded" but it is not importable
        still = [r for r in still if r != OPENVINO_REQUIREMENT]
        if still:
            raise DependencyInstallError(f"pip finished but these are still missing: {', '.join(still)}. See the Python console for pip's output.")
        return failed

    # ------------------------------------------------------------------ models
    def importModel(self, path: str) -> str:
        """Validate a model folder (or its model.onnx / model.json) and copy it into :func:`userModelsDirectory`.

        Returns the new folder. Raises ``SegmentationError`` (``model_*`` codes) for a bad model.
        """
        import shutil

        _libraries()
        from SpineContextSegLib.inference.model_files import CARD_FILE, ONNX_FILE, TORCH_FILE, load_model

        bundle = load_model(path)  # checks model.json and the sha256 of model.onnx
        mrml_io, _worker_process = _libraries()
        name = mrml_io.safe_file_name(f"{bundle.card.name}-v{bundle.card.version}") or "model"
        destination = os.path.join(userModelsDirectory(), name)
        if os.path.abspath(destination) == os.path.abspath(bundle.directory):
            return destination
        staging = destination + ".importing"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        for filename in (ONNX_FILE, CARD_FILE, TORCH_FILE):
            source = os.path.join(bundle.directory, filename)
            if os.path.isfile(source):
                shutil.copy2(source, os.path.join(staging, filename))
        load_model(staging)  # the copy is intact
        shutil.rmtree(destination, ignore_errors=True)
        os.replace(staging, destination)
        return destination

    # ------------------------------------------------------------------ segmentation
    def process(
        self,
        inputVolume,
        outputSegmentation,
        *,
        device: str = "auto",
        task: str = "spine",
        model: Optional[str] = None,
        overlap: Optional[float] = None,
        threads: Optional[int] = None,
        showResult: bool = True,
        waitForCompletion: bool = True,
        eventCallback: Optional[Callable[[Any], None]] = None,
        timeoutSeconds: Optional[float] = None,
    ) -> SegmentationRun:
        """Segment ``inputVolume`` into ``outputSegmentation`` with the background worker.

        Parameters
        ----------
        inputVolume : vtkMRMLScalarVolumeNode
            CT in Hounsfield units; may be under a linear transform (hardened into the
            exported geometry); a non-linear transform is refused.
        outputSegmentation : vtkMRMLSegmentationNode
            Receives one segment per label (its previous segments are replaced), the input's
            reference geometry and parent transform, and a place next to the input in the
            subject hierarchy.
        device : {"auto", "cpu", "cuda"}
        task : {"spine", "vertebrae"}
        model : str, optional
            Model folder or model.onnx; default the bundled model.
        overlap : float, optional
            Tile overlap in [0, 1); default the model's.
        threads : int, optional
            CPU threads; default all cores but one.
        showResult : bool
            Create the closed surface, show it in 3D and centre the 3D view.
        waitForCompletion : bool
            True (scripts, tests): block until done, raise ``SegmentationError`` on failure or
            cancel. False (GUI): return at once; events arrive on the GUI thread.
        eventCallback : callable, optional
            ``eventCallback(event)`` with ``worker_process.WorkerEvent`` objects: ``status``,
            ``started``, ``progress``, ``warning``, ``log``, ``error`` and finally ``finished``
            (``event.outcome``: status ``succeeded``/``failed``/``cancelled``, code, message).
        timeoutSeconds : float, optional
            With ``waitForCompletion``: cancel after this long.

        Returns
        -------
        SegmentationRun
            ``.outcome`` when finished, ``.segmentIds`` of the imported segments.
        """
        mrml_io, worker_process = _libraries()
        if self.activeRun is not None:
            raise RuntimeError("A segmentation is already running; cancel it or wait for it to finish.")
        if inputVolume is None or outputSegmentation is None:
            raise ValueError("inputVolume and outputSegmentation are required")
        mrml_io.check_input_volume(inputVolume)

        tempDir = worker_process.create_temp_dir(slicer.app.temporaryPath)
        run = SegmentationRun(inputVolume, outputSegmentation, task, showResult, tempDir, eventCallback=eventCallback)
        try:
            self._notify(run, "status", _("Writing the input volume for the worker\u2026"))
            inputPath = os.path.join(tempDir, "input.nrrd")
            run.exportedIjkToRas = mrml_io.export_volume(inputVolume, inputPath)
            cancelFile = os.path.join(tempDir, "cancel")
            command = worker_process.build_worker_command(
                pythonExecutable(),
                inputPath,
                os.path.join(tempDir, "result.nrrd"),
                model=model,
                device=device,
                threads=threads,
                overlap=overlap,
                task=task,
                cancel_file=cancelFile,
                roi_path=os.path.join(tempDir, "roi.json"),
                centreline_path=os.path.join(tempDir, "centreline.json"),
            )
        except Exception:
            import shutil

            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        if self.keepTemporaryFiles:
            self._notify(run, "status", _("Temporary files are kept in {folder}").format(folder=tempDir))
        from SpineContextSegSlicerLib import library_parent_dir

        run.worker = worker_process.WorkerProcess(
            command,
            temp_dir=tempDir,
            cancel_file=cancelFile,
            env=worker_process.worker_environment(library_parent_dir()),
            cwd=tempDir,
            on_event=lambda event: self._onWorkerEvent(run, event),
            grace_s=self.cancelGraceSeconds,
            keep_temp_dir=self.keepTemporaryFiles,
        )
        logging.info(f"SpineContextSeg: starting {' '.join(command)}")
        self.activeRun = run
        self._watchForShutdown()
        if waitForCompletion:
            # Own reader thread; the GUI keeps painting while we wait (no tight processEvents spin).
            try:
                run.worker.start(launcher=_launchConsoleProcess)
                run.worker.wait(timeout_s=timeoutSeconds, idle=_processEvents)
            finally:
                if self.activeRun is None:
                    self._unwatchForShutdown()
            if not run.outcome.succeeded:
                raise run.outcome.to_exception()
            return run
        if supportsNonBlockingLaunch():
            run.worker.start_streaming(_launchConsoleProcessNonBlocking)  # Slicer 5.12+
        else:
            run.worker.start(launcher=_launchConsoleProcess)  # 5.8-5.10: our reader thread + QTimer
        self._startTimer()
        if run.worker.finished:  # failed to start: the finished event was already delivered
            self._stopTimer()
        return run

    def cancel(self) -> None:
        """Ask the running worker to stop (cancel file), killing it after ``cancelGraceSeconds``."""
        if self.activeRun is not None and self.activeRun.worker is not None:
            self.activeRun.worker.cancel()

    def stop(self, timeoutSeconds: float = 3.0) -> None:
        """Stop a running worker now and wait (briefly) for it: scene close, module unload, quit."""
        run = self.activeRun
        if run is None or run.worker is None:
            return
        run.showResult = False
        run.worker.cancel()
        run.worker.kill()
        run.worker.wait(timeout_s=timeoutSeconds)
        self._stopTimer()

    def cleanup(self) -> None:
        """Tear the logic down (the widget's ``cleanup``: module unloaded, Slicer closing).

        Stops a running worker, then removes everything that refers back to this logic: the
        ``aboutToQuit`` connection, the scene-close observer and the polling timer. Afterwards
        nothing outside holds the logic, so it is freed.
        """
        self.stop()
        self._unwatchForShutdown()
        if self._timer is not None:
            self._timer.stop()
            if self._pollSlot is not None:
                self._timer.disconnect("timeout()", self._pollSlot)
            self._timer = None
            self._pollSlot = None

    def _poll(self) -> None:
        run = self.activeRun
        if run is None or run.worker is None:
            self._stopTimer()
            return
        run.worker.poll()
        if run.worker.finished:
            self._stopTimer()

    def _startTimer(self) -> None:
        if self._timer is None:
            self._timer = qt.QTimer()
            self._timer.setInterval(self.pollIntervalMsec)
            self._pollSlot = self._poll
            self._timer.connect("timeout()", self._pollSlot)
        self._timer.start()

    def _stopTimer(self) -> None:
        if self._timer is not None:
            self._timer.stop()

    def _watchForShutdown(self) -> None:
        """While a run is active: stop the worker when the scene closes or Slicer quits, even without the widget.

        Undone by :meth:`_unwatchForShutdown` when the run finishes and by :meth:`cleanup`, so
        neither the application nor the scene keeps the logic alive.
        """
        if self._quitSlot is None:
            self._quitSlot = self.stop  # keep this very object: disconnect() must get the same callable
            slicer.app.connect("aboutToQuit()", self._quitSlot)
        if self._sceneObserver is None:
            scene = slicer.mrmlScene
            self._sceneObserver = (scene, scene.AddObserver(scene.StartCloseEvent, self._onSceneStartClose))

    def _unwatchForShutdown(self) -> None:
        if self._quitSlot is not None:
            slicer.app.disconnect("aboutToQuit()", self._quitSlot)
            self._quitSlot = None
        if self._sceneObserver is not None:
            scene, tag = self._sceneObserver
            scene.RemoveObserver(tag)
            self._sceneObserver = None

    def _onSceneStartClose(self, caller, event) -> None:
        self.stop()  # the nodes the result would go into are going away

    def _notify(self, run: SegmentationRun, kind: str, text: str) -> None:
        _mrml_io, worker_process = _libraries()
        logging.info(f"SpineContextSeg: {text}")
        self._callback(run, worker_process.WorkerEvent(kind, message={"text": text}, line=text))

    @staticmethod
    def _callback(run: SegmentationRun, event) -> None:
        """Deliver an event to the caller; a failing callback (GUI bug) never changes the run's outcome."""
        if run.eventCallback is None:
            return
        try:
            run.eventCallback(event)
        except Exception:
            logging.exception(f"SpineContextSeg: the event callback failed on a '{event.kind}' event")

    def _onWorkerEvent(self, run: SegmentationRun, event) -> None:
        """Called on the polling thread (the GUI thread) for every worker event."""
        mrml_io, worker_process = _libraries()
        if event.kind == "finished":
            outcome = event.outcome
            if outcome.succeeded and run.outputSegmentation.GetScene() is None:
                outcome.status, outcome.code = worker_process.CANCELLED, "cancelled"
                outcome.message = "The output segmentation was removed; nothing was imported."
            if outcome.succeeded:
                self._notify(run, "status", _("Importing the result\u2026"))
                try:
                    self.importResult(run, outcome.result)
                except Exception as error:  # keep the failure in the outcome the caller sees
                    logging.exception("SpineContextSeg: importing the result failed")
                    outcome.status = worker_process.FAILED
                    outcome.code = getattr(error, "code", worker_process.RESULT_IMPORT_FAILED)
                    outcome.message = getattr(error, "message", None) or f"Importing the result failed: {error}"
            run.outcome = outcome
            self.lastRun = run
            if self.activeRun is run:
                self.activeRun = None
                self._unwatchForShutdown()
            logging.info(f"SpineContextSeg: {outcome.status}: {outcome.message}")
        self._callback(run, event)

    def importResult(self, run: SegmentationRun, result: Dict[str, Any]) -> List[str]:
        """Import the worker's label map (one ``ImportLabelmapToSegmentationNode`` call), ROI and centreline, then surface and view."""
        mrml_io, _worker_process = _libraries()
        labels = result.get("labels") or defaultLabels(run.task)
        maskPath = (result.get("outputs") or {}).get("mask")
        if not maskPath:
            raise RuntimeError("the worker's result line names no mask file")
        run.segmentIds = mrml_io.import_label_map(
            maskPath, run.outputSegmentation, labels, run.inputVolume, exported_ijk_to_ras=run.exportedIjkToRas, task=run.task
        )
        # the spine's box (hidden Markups ROI, for cropping or downstream modules) and the centreline
        # through the vertebral bodies (Markups curve with the sagittal/coronal curvature as attributes)
        outputs = result.get("outputs") or {}
        if outputs.get("roi"):
            mrml_io.import_spine_roi(outputs["roi"], run.outputSegmentation, run.inputVolume)
        if outputs.get("centreline"):
            mrml_io.import_centreline(outputs["centreline"], run.outputSegmentation, run.inputVolume)
        mrml_io.create_closed_surface(run.outputSegmentation, show_in_3d=run.showResult)
        if run.showResult:
            showResultInViews(run.inputVolume, run.outputSegmentation)
        return run.segmentIds

    # ------------------------------------------------------------------ export
    def exportStl(
        self,
        segmentationNode,
        folder: str,
        *,
        vertebrae: str = "",
        merge: bool = False,
        sizeScale: float = 1.0,
        lps: bool = True,
    ) -> List[str]:
        """Write closed surfaces as STL; ``vertebrae`` (e.g. ``"L1-L5"``) selects a subset by name.

        Returns the files written. Raises ``SegmentationError`` with a clear message when the
        subset matches no segment or the folder cannot be written.
        """
        mrml_io, _worker_process = _libraries()
        from SpineContextSegLib.errors import SegmentationError

        if segmentationNode is None:
            raise ValueError("no segmentation selected")
        segmentIds = None
        if vertebrae and vertebrae.strip() and vertebrae.strip().lower() != "all":
            from SpineContextSegLib.labels import parse_vertebra_range, vertebra_by_verse_id

            try:
                names = [vertebra_by_verse_id(v).name for v in parse_vertebra_range(vertebrae)]
            except ValueError as error:
                raise SegmentationError("input_format", f"Vertebra subset '{vertebrae}': {error}") from None
            segmentIds = mrml_io.segment_ids_by_name(segmentationNode, names)
            if not segmentIds:
                raise SegmentationError(
                    "no_spine_found",
                    f"'{segmentationNode.GetName()}' has no segment named {', '.join(names)}. "
                    "A vertebra subset needs a Vertebrae-task result; clear the field to export every segment.",
                )
        segmentationNode.CreateClosedSurfaceRepresentation()
        return mrml_io.export_stl(segmentationNode, folder, segment_ids=segmentIds, merge=merge, size_scale=sizeScale, lps=lps)


def defaultLabels(task: str) -> List[Dict[str, Any]]:
    """The label table when a result line carries none (older workers)."""
    _libraries()
    from SpineContextSegLib.labels import labels_for_task

    return [label.to_json() for label in labels_for_task(task)]


def showResultInViews(volumeNode, segmentationNode) -> None:
    """Show the CT behind the segmentation and centre the 3D view on the result."""
    slicer.util.setSliceViewerLayers(background=volumeNode, fit=False)
    layoutManager = slicer.app.layoutManager()
    if layoutManager is None or layoutManager.threeDViewCount == 0:  # no main window (tests)
        return
    threeDView = layoutManager.threeDWidget(0).threeDView()
    threeDView.resetFocalPoint()
    threeDView.resetCamera()


def pythonExecutable() -> str:
    """``PythonSlicer`` (inside Slicer ``sys.executable`` is that launcher)."""
    import shutil

    return shutil.which("PythonSlicer") or sys.executable


def supportsNonBlockingLaunch() -> bool:
    """Slicer 5.12+: ``launchConsoleProcess(blocking=False, logCallback, completedCallback)``."""
    import inspect

    try:
        return "blocking" in inspect.signature(slicer.util.launchConsoleProcess).parameters
    except (TypeError, ValueError):
        return False


def _launchConsoleProcess(command, env, cwd):
    return slicer.util.launchConsoleProcess(command, updateEnvironment=env, cwd=cwd)


def _launchConsoleProcessNonBlocking(command, env, cwd, onLine, onExit):
    return slicer.util.launchConsoleProcess(
        command, updateEnvironment=env, cwd=cwd, blocking=False, logCallback=onLine, completedCallback=onExit
    )


def _processEvents() -> None:
    slicer.app.processEvents()


#
# SpineContextSegTest
#


class SpineContextSegTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload & Test; ctest ``py_SpineContextSeg`` runs each ``test_*`` method).

    The whole flow on the bundled sample CT: segment -> segments on the input's grid with names
    and terminology -> closed surface -> STL files -> cancel returns the logic and the panel to idle.

    Offline and independent of the GUI state: the sample is a bundled file, nothing is
    installed (without onnxruntime the runs are skipped, with a message), and the panel is
    used whether or not the module was ever entered.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def _loadSample(self):
        self.assertTrue(registerSampleData(), "the bundled sample CT could not be registered")
        import SampleData

        volume = SampleData.downloadSample(SAMPLE_NAME)  # a file:// copy: no network
        self.assertIsNotNone(volume, "the sample CT did not load")
        return volume

    def _workerReady(self, logic) -> bool:
        """True when the worker's packages are installed; otherwise skip (installing needs the network)."""
        requirements, _uninstall = logic.missingDependencies("cpu")
        if not requirements:
            return True
        reason = f"not installed: {', '.join(requirements)} (the self-test never installs packages: that needs the network)"
        self.delayDisplay(f"Skipped: {reason}")
        logging.warning(f"SpineContextSegTest: skipped, {reason}")
        if getattr(self, "_outcome", None) is not None:  # run by unittest (ctest): report a skip, not a pass
            self.skipTest(reason)
        return False

    def _waitUntilIdle(self, logic, seconds):
        import time

        deadline = time.time() + seconds
        while logic.isRunning and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)

    def test_SegmentSurfaceExport(self):
        import tempfile

        import numpy as np

        self.delayDisplay("Loading the sample CT")
        volume = self._loadSample()
        logic = SpineContextSegLogic()
        if not self._workerReady(logic):
            return

        self.delayDisplay("Segmenting on the CPU")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "sample spine")
        events = []
        run = logic.process(volume, segmentation, device="cpu", eventCallback=events.append)
        self.assertTrue(run.outcome.succeeded, run.outcome.message)
        kinds = [event.kind for event in events]
        self.assertIn("started", kinds)
        self.assertIn("progress", kinds)
        self.assertEqual(kinds[-1], "finished")
        self.assertFalse(os.path.exists(run.tempDir), "temporary folder left behind")

        self.assertGreaterEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 1)
        segmentId = run.segmentIds[0]
        segment = segmentation.GetSegmentation().GetSegment(segmentId)
        self.assertEqual(segment.GetName(), "Spine")
        self.assertFalse(segment.GetNameAutoGenerated())
        self.assertFalse(segment.GetColorAutoGenerated())
        self.assertTrue(segment.HasTag(slicer.vtkSegment.GetTerminologyEntryTagName()))
        from SpineContextSegLib.labels import TERMINOLOGY_CONTEXT

        entry = slicer.vtkSlicerTerminologyEntry()
        terminologyLogic = slicer.modules.terminologies.logic()
        self.assertEqual(loadTerminology(), TERMINOLOGY_CONTEXT)  # our context, loaded at start-up (again here)
        tag = vtk.reference("")
        segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)
        self.assertTrue(terminologyLogic.DeserializeTerminologyEntry(str(tag), entry))
        self.assertEqual(entry.GetTerminologyContextName(), TERMINOLOGY_CONTEXT)
        self.assertEqual(segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()), volume)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        self.assertEqual(mask.shape, slicer.util.arrayFromVolume(volume).shape)  # the input's grid
        self.assertGreater(int(np.count_nonzero(mask)), 1000)
        surface = segmentation.GetClosedSurfaceInternalRepresentation(segmentId)
        self.assertIsNotNone(surface)
        self.assertGreater(surface.GetNumberOfPoints(), 0)
        roi = slicer.mrmlScene.GetNodeByID(segmentation.GetAttribute("SpineContextSeg.RoiNodeID"))
        curve = slicer.mrmlScene.GetNodeByID(segmentation.GetAttribute("SpineContextSeg.CentrelineNodeID"))
        self.assertTrue(roi is not None and roi.IsA("vtkMRMLMarkupsROINode"))
        self.assertTrue(curve is not None and curve.GetNumberOfControlPoints() >= 2)
        roiCentre = [0.0, 0.0, 0.0]
        roi.GetCenterWorld(roiCentre)
        bounds = [0.0] * 6
        segmentation.GetRASBounds(bounds)
        for axis in range(3):  # the box is around the segmentation
            self.assertTrue(bounds[2 * axis] - 1.0 <= roiCentre[axis] <= bounds[2 * axis + 1] + 1.0)

        self.delayDisplay("Exporting STL")
        folder = tempfile.mkdtemp(prefix="scs-test-stl-")
        paths = logic.exportStl(segmentation, folder)
        self.assertEqual([os.path.basename(p) for p in paths], ["sample spine_Spine.stl"])
        self.assertGreater(os.path.getsize(paths[0]), 84)
        merged = logic.exportStl(segmentation, folder, merge=True, sizeScale=0.001)
        self.assertEqual(os.path.basename(merged[0]), "sample spine.stl")
        self.delayDisplay("Segment, surface and export passed")

    def test_CancelReturnsToIdle(self):
        volume = self._loadSample()
        logic = SpineContextSegLogic()
        if not self._workerReady(logic):
            return

        self.delayDisplay("Cancelling a run through the logic")
        output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "cancelled")
        run = logic.process(volume, output, device="cpu", waitForCompletion=False)
        self.assertTrue(logic.isRunning)
        logic.cancel()
        self._waitUntilIdle(logic, logic.cancelGraceSeconds + 30)
        self.assertFalse(logic.isRunning, "the run did not return to idle after cancel")
        self.assertEqual(run.outcome.status, "cancelled")
        self.assertEqual(output.GetSegmentation().GetNumberOfSegments(), 0)
        self.assertFalse(os.path.exists(run.tempDir))

        self.delayDisplay("Cancelling a run from the panel")
        widget = slicer.util.getModuleWidget("SpineContextSeg")  # entered or not: setUp closed the scene
        parameters = widget.ensureParameterNode()
        parameters.inputVolume = volume
        parameters.device = "CPU"
        widget.onApplyButton()
        self.assertEqual(widget._state, RUNNING)
        self.assertEqual(widget.ui.applyButton.text, "Cancel")
        widget.onApplyButton()  # the same button cancels
        self._waitUntilIdle(widget.logic, widget.logic.cancelGraceSeconds + 30)
        self.assertEqual(widget._state, IDLE)
        self.assertEqual(widget.ui.applyButton.text, "Segment spine")
        self.assertFalse(widget.ui.progressBar.visible)
        self.delayDisplay("Cancel passed")
