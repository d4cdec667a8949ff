"""SpineContextSeg: one-click spine segmentation of CT in 3D Slicer.

This file holds what Slicer looks for: the module, its panel (widget), a thin logic and the
self-test. They are a thin layer around two pieces that are tested without Slicer:

* ``SpineContextSegLib`` (installed next to this file): the segmentation itself. It runs in a
  separate ``PythonSlicer`` process, ``python -m SpineContextSegLib.worker``, that speaks a
  JSON-line protocol, so Slicer never loads ONNX Runtime and the viewer stays responsive.
* ``SpineContextSegSlicerLib`` (a sub-package of this folder): everything else (worker process,
  MRML I/O, package install, parameter node, ...); its ``__init__`` lists the modules.

Nothing heavy is imported at module level: Slicer imports every module at startup.
"""
from __future__ import annotations

import importlib
import logging
import os
import pathlib
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import ctk
import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

if TYPE_CHECKING:  # the helper package is imported on first use, never at Slicer startup
    from SpineContextSegSlicerLib.parameters import SpineContextSegParameterNode

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))

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


def _libraries() -> None:
    """Make the helper package ``SpineContextSegSlicerLib`` importable (on first use, not at Slicer startup)."""
    if MODULE_DIR not in sys.path:
        sys.path.insert(0, MODULE_DIR)


def _helper(name: str):
    """The module ``SpineContextSegSlicerLib.<name>``, imported on first use."""
    _libraries()
    return importlib.import_module(f"SpineContextSegSlicerLib.{name}")


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
        _libraries()
        from SpineContextSegSlicerLib import mrml_io

        return mrml_io.load_terminology(terminologyLogic, TERMINOLOGY_FILE)
    except Exception as error:  # an incomplete install must not print a traceback at start-up
        logging.warning(f"SpineContextSeg: terminology not loaded: {error}")
        return None


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
            self._parameterNode.exportDirectory = pathlib.Path(_helper("parameters").defaultExportDirectory())

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
        parameters = _helper("parameters")
        if not self.ensureDependencies(parameters.DEVICES[p.device]):
            return
        inputVolume = p.inputVolume
        segmentation = p.outputSegmentation
        if segmentation is None:
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", parameters.defaultSegmentationName(inputVolume, parameters.TASKS[p.task]))
            segmentation.CreateDefaultDisplayNodes()
            p.outputSegmentation = segmentation
        self.ui.logTextEdit.clear()
        self.ui.progressBar.format = _("Starting\u2026")
        self.setProcessingState(RUNNING)
        self.setStatus(_("Segmenting '{name}'\u2026").format(name=inputVolume.GetName()))
        try:
            self.logic.keepTemporaryFiles = p.keepTemporaryFiles
            self.logic.process(inputVolume, segmentation, **parameters.processOptions(p), waitForCompletion=False, eventCallback=self.onLogicEvent)
        except Exception as error:
            self.setProcessingState(IDLE)
            self.showError(_("Could not start the segmentation"), error)

    def ensureDependencies(self, device: str) -> bool:
        """Check the worker's Python packages; offer to install the missing ones (never silently).

        OpenVINO, the fast CPU engine, is offered once and never required: declined or failed,
        ONNX Runtime segments. The dialogs: :func:`SpineContextSegSlicerLib.install.ensureDependencies`.
        """
        return _helper("install").ensureDependencies(self, device)

    def onLogicEvent(self, event) -> None:
        """Progress and results from the logic (always on the GUI thread)."""
        if event.kind == "progress":
            # never backwards: while the tiles follow the spine, the network stage's plan grows
            self.ui.progressBar.value = max(self.ui.progressBar.value, int(1000 * _helper("worker_events").overall_fraction(event.message)))
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
                paths = self.logic.exportStl(p.outputSegmentation, str(p.exportDirectory), **_helper("parameters").exportOptions(p))
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


#
# SpineContextSegLogic
#


class SpineContextSegLogic(ScriptedLoadableModuleLogic):
    """Segmentation without the GUI: ``process()`` is the one path for the panel, scripts and batch.

    Example (Python console)::

        logic = slicer.util.getModuleLogic("SpineContextSeg")
        volume = slicer.util.getNode("CTChest")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        run = logic.process(volume, segmentation, device="cpu")      # blocks; raises on failure
        logic.exportStl(segmentation, "/tmp/stl")

    Thin: the work is done in ``SpineContextSegSlicerLib`` (imported on first use), mainly by
    :class:`~SpineContextSegSlicerLib.segmentation_run.SegmentationRunner`.
    """

    #: Seconds between the cancel file and the hard kill.
    cancelGraceSeconds = 5.0
    #: Milliseconds between polls of the worker's output (GUI thread).
    pollIntervalMsec = 100

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.keepTemporaryFiles = False
        self._runner = None  # the SegmentationRunner, made on first use

    def getParameterNode(self):
        return _helper("parameters").SpineContextSegParameterNode(super().getParameterNode())

    @property
    def runner(self):
        """The :class:`~SpineContextSegSlicerLib.segmentation_run.SegmentationRunner` of this logic (made on first use)."""
        if self._runner is None:
            self._runner = _helper("segmentation_run").SegmentationRunner()
        return self._runner

    @property
    def activeRun(self):
        """The ``SegmentationRun`` in progress, or None."""
        return self._runner.activeRun if self._runner is not None else None

    @property
    def lastRun(self):
        """The last finished ``SegmentationRun``, or None."""
        return self._runner.lastRun if self._runner is not None else None

    @property
    def isRunning(self) -> bool:
        return self.activeRun is not None

    # ------------------------------------------------------------------ dependencies and models
    @staticmethod
    def missingDependencies(device: str = "auto"):
        """``(requirements to install, distributions to uninstall first)`` for the worker on ``device``: see ``install``."""
        return _helper("install").missingDependencies(device)

    def installDependencies(self, requirements: List[str], uninstall: Optional[List[str]] = None) -> List[str]:
        """pip-install into Slicer's Python; returns the optional requirements that failed: see ``install``."""
        return _helper("install").installDependencies(requirements, uninstall)

    def importModel(self, path: str) -> str:
        """Check a model folder (or its model.onnx / model.json), copy it to the user's models; return the copy."""
        return _helper("model_import").importModel(path)

    # ------------------------------------------------------------------ segmentation
    def process(self, inputVolume, outputSegmentation, *, device: str = "auto", task: str = "spine", model: Optional[str] = None,
                overlap: Optional[float] = None, threads: Optional[int] = None, showResult: bool = True, waitForCompletion: bool = True,
                eventCallback: Optional[Callable[[Any], None]] = None, timeoutSeconds: Optional[float] = None):
        """Segment ``inputVolume`` into ``outputSegmentation`` with the background worker; returns the ``SegmentationRun``.

        Blocks and raises ``SegmentationError`` on failure or cancel unless ``waitForCompletion`` is False.
        The arguments: :meth:`SpineContextSegSlicerLib.segmentation_run.SegmentationRunner.process`.
        """
        return self.runner.process(
            inputVolume, outputSegmentation, device=device, task=task, model=model, overlap=overlap, threads=threads,
            showResult=showResult, waitForCompletion=waitForCompletion, eventCallback=eventCallback, timeoutSeconds=timeoutSeconds,
            keepTemporaryFiles=self.keepTemporaryFiles, cancelGraceSeconds=self.cancelGraceSeconds, pollIntervalMsec=self.pollIntervalMsec,
        )

    def cancel(self) -> None:
        """Ask the running worker to stop (cancel file), killing it after ``cancelGraceSeconds``."""
        if self._runner is not None:
            self._runner.cancel()

    def stop(self, timeoutSeconds: float = 3.0) -> None:
        """Stop a running worker now and wait (briefly) for it: scene close, module unload, quit."""
        if self._runner is not None:
            self._runner.stop(timeoutSeconds)

    def cleanup(self) -> None:
        """Tear the logic down (the widget's ``cleanup``): stop the worker, drop the runner's connections and timer."""
        if self._runner is not None:
            self._runner.cleanup()

    def importResult(self, run, result: Dict[str, Any]) -> List[str]:
        """Import the worker's label map, ROI and centreline into ``run``'s segmentation, then surface and view."""
        return self.runner.importResult(run, result)

    # ------------------------------------------------------------------ export
    def exportStl(self, segmentationNode, folder: str, *, vertebrae: str = "", merge: bool = False, sizeScale: float = 1.0, lps: bool = True) -> List[str]:
        """Write closed surfaces as STL; ``vertebrae`` (e.g. ``"L1-L5"``) selects a subset by name. Returns the files."""
        return _helper("stl_export").exportStl(segmentationNode, folder, vertebrae=vertebrae, merge=merge, sizeScale=sizeScale, lps=lps)


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
        """The bundled sample CT, loaded through Sample Data; and the steps (``SpineContextSegSlicerLib.selftest``)."""
        self.assertTrue(registerSampleData(), "the bundled sample CT could not be registered")
        import SampleData

        volume = SampleData.downloadSample(SAMPLE_NAME)  # a file:// copy: no network
        self.assertIsNotNone(volume, "the sample CT did not load")
        return volume, _helper("selftest")

    def test_SegmentSurfaceExport(self):
        self.delayDisplay("Loading the sample CT")
        volume, steps = self._loadSample()
        logic = SpineContextSegLogic()
        if steps.workerReady(self, logic):
            steps.segmentSurfaceExport(self, logic, volume, loadTerminology)

    def test_CancelReturnsToIdle(self):
        volume, steps = self._loadSample()
        logic = SpineContextSegLogic()
        if steps.workerReady(self, logic):
            steps.cancelThroughTheLogic(self, logic, volume)
            widget = slicer.util.getModuleWidget("SpineContextSeg")  # entered or not: setUp closed the scene
            steps.cancelFromThePanel(self, widget, volume, running=RUNNING, idle=IDLE)
