"""One segmentation at a time inside Slicer: export the input, run the worker, import its result.

:class:`SegmentationRunner` does the work of ``SpineContextSegLogic.process``, ``cancel``,
``stop`` and ``cleanup``: it writes the input volume, starts the worker
(:mod:`~SpineContextSegSlicerLib.worker_process`), polls it on the GUI thread with a ``QTimer``
(or waits for it), stops it when the scene closes or Slicer quits, and imports the result
(:mod:`~SpineContextSegSlicerLib.mrml_io`). :class:`SegmentationRun` is one call.

``qt`` is imported only where the polling timer is made.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional

import slicer
from slicer.i18n import tr as _

from . import library_parent_dir, mrml_io, worker_command, worker_events, worker_process


@dataclasses.dataclass
class SegmentationRun:
    """One call of :meth:`SegmentationRunner.process` (``SpineContextSegLogic.process``)."""

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


class SegmentationRunner:
    """The runs of one ``SpineContextSegLogic``: at most one active, and the last finished one.

    The logic makes it on first use and passes its settings (``keepTemporaryFiles``,
    ``cancelGraceSeconds``, ``pollIntervalMsec``) to each :meth:`process`.
    """

    def __init__(self) -> None:
        self.activeRun: Optional[SegmentationRun] = None
        self.lastRun: Optional[SegmentationRun] = None
        self._timer = None
        self._pollSlot = None  # the one callable connected to the timer (disconnect needs the same object)
        self._quitSlot = None  # connected to aboutToQuit() while a run is active
        self._sceneObserver = None  # (scene, observer tag) while a run is active

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
        keepTemporaryFiles: bool,
        cancelGraceSeconds: float,
        pollIntervalMsec: int,
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
            ``eventCallback(event)`` with ``worker_events.WorkerEvent`` objects: ``status``,
            ``started``, ``progress``, ``warning``, ``log``, ``error`` and finally ``finished``
            (``event.outcome``: status ``succeeded``/``failed``/``cancelled``, code, message).
        timeoutSeconds : float, optional
            With ``waitForCompletion``: cancel after this long.
        keepTemporaryFiles, cancelGraceSeconds, pollIntervalMsec
            The logic's settings: keep the worker's folder (debugging), seconds between the
            cancel file and the hard kill, milliseconds between polls of the worker's output.

        Returns
        -------
        SegmentationRun
            ``.outcome`` when finished, ``.segmentIds`` of the imported segments.
        """
        if self.activeRun is not None:
            raise RuntimeError("A segmentation is already running; cancel it or wait for it to finish.")
        if inputVolume is None or outputSegmentation is None:
            raise ValueError("inputVolume and outputSegmentation are required")
        mrml_io.check_input_volume(inputVolume)

        tempDir = worker_command.create_temp_dir(slicer.app.temporaryPath)
        run = SegmentationRun(inputVolume, outputSegmentation, task, showResult, tempDir, eventCallback=eventCallback)
        try:
            self._notify(run, "status", _("Writing the input volume for the worker\u2026"))
            inputPath = os.path.join(tempDir, "input.nrrd")
            run.exportedIjkToRas = mrml_io.export_volume(inputVolume, inputPath)
            cancelFile = os.path.join(tempDir, "cancel")
            command = worker_command.build_worker_command(
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
        if keepTemporaryFiles:
            self._notify(run, "status", _("Temporary files are kept in {folder}").format(folder=tempDir))
        run.worker = worker_process.WorkerProcess(
            command,
            temp_dir=tempDir,
            cancel_file=cancelFile,
            env=worker_command.worker_environment(library_parent_dir()),
            cwd=tempDir,
            on_event=lambda event: self._onWorkerEvent(run, event),
            grace_s=cancelGraceSeconds,
            keep_temp_dir=keepTemporaryFiles,
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
        self._startTimer(pollIntervalMsec)
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
        """Tear the runner down (the logic's ``cleanup``: module unloaded, Slicer closing).

        Stops a running worker, then removes everything that refers back to this runner: the
        ``aboutToQuit`` connection, the scene-close observer and the polling timer. Afterwards
        nothing outside holds the runner (or its logic), so it is freed.
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

    def _startTimer(self, intervalMsec: int) -> None:
        if self._timer is None:
            import qt

            self._timer = qt.QTimer()
            self._timer.setInterval(intervalMsec)
            self._pollSlot = self._poll
            self._timer.connect("timeout()", self._pollSlot)
        self._timer.start()

    def _stopTimer(self) -> None:
        if self._timer is not None:
            self._timer.stop()

    def _watchForShutdown(self) -> None:
        """While a run is active: stop the worker when the scene closes or Slicer quits, even without the widget.

        Undone by :meth:`_unwatchForShutdown` when the run finishes and by :meth:`cleanup`, so
        neither the application nor the scene keeps the runner (and its logic) alive.
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
        logging.info(f"SpineContextSeg: {text}")
        self._callback(run, worker_events.WorkerEvent(kind, message={"text": text}, line=text))

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
        if event.kind == "finished":
            outcome = event.outcome
            if outcome.succeeded and run.outputSegmentation.GetScene() is None:
                outcome.status, outcome.code = worker_events.CANCELLED, "cancelled"
                outcome.message = "The output segmentation was removed; nothing was imported."
            if outcome.succeeded:
                self._notify(run, "status", _("Importing the result\u2026"))
                try:
                    self.importResult(run, outcome.result)
                except Exception as error:  # keep the failure in the outcome the caller sees
                    logging.exception("SpineContextSeg: importing the result failed")
                    outcome.status = worker_events.FAILED
                    outcome.code = getattr(error, "code", worker_events.RESULT_IMPORT_FAILED)
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


def defaultLabels(task: str) -> List[Dict[str, Any]]:
    """The label table when a result line carries none (older workers)."""
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

