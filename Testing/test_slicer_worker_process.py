"""The Slicer module's worker handling (``SpineContextSegSlicerLib.worker_*``), without Slicer.

Two kinds of worker are started as real subprocesses:

* small scripted fakes, for endings the real worker cannot be made to produce on demand
  (a worker that ignores the cancel file and SIGTERM, a crash without an error line), started
  through a fake launcher that, like ``PythonSlicer``, runs the worker as its child;
* the real ``python -m SpineContextSegLib.worker`` with the tiny random model, for the
  protocol, results, error codes, cooperative cancel and death by SIGKILL.
"""
from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(ROOT, "SpineContextSeg")
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)

from SpineContextSegSlicerLib import worker_command as wc  # noqa: E402
from SpineContextSegSlicerLib import worker_events as we  # noqa: E402
from SpineContextSegSlicerLib import worker_process as wp  # noqa: E402

from SpineContextSegLib.errors import ERROR_CODES  # noqa: E402
from SpineContextSegLib.progress import STAGES  # noqa: E402

from conftest import PlainTextLog, scripted_module_stubs  # noqa: E402

SAMPLE_CT = os.path.join(ROOT, "SpineContextSegLib", "resources", "sample", "ct.nii.gz")
POSIX = sys.platform != "win32"

FAKE_WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time

    def emit(message):
        print(json.dumps(message), flush=True)

    mode = sys.argv[1]
    emit({"type": "started", "pid": os.getpid(), "version": "fake"})
    if mode == "ok":
        print("a stray library warning", flush=True)
        emit({"type": "progress", "stage": "network", "done": 1, "total": 2, "eta_s": 0.5})
        emit({"type": "warning", "code": "input_not_ct", "message": "odd intensities"})
        emit({"type": "progress", "stage": "network", "done": 2, "total": 2, "eta_s": 0.0})
        emit({"type": "result", "outputs": {"mask": sys.argv[2]}, "labels": [], "timings_s": {"total": 0.1}})
    elif mode == "error":
        emit({"type": "error", "code": "input_unreadable", "message": "cannot read x", "exit_status": 10})
        sys.exit(10)
    elif mode == "crash":
        print("Traceback (most recent call last):", flush=True)
        print("ModuleNotFoundError: No module named 'onnxruntime'", flush=True)
        sys.exit(3)
    elif mode == "silent":
        sys.exit(0)
    elif mode == "hang":
        # ignores the cancel file and SIGTERM: only a hard kill stops it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        emit({"type": "progress", "stage": "network", "done": 1, "total": 100, "eta_s": 99})
        while True:
            time.sleep(0.05)
    """
)

# Like PythonSlicer: a launcher process that runs the real interpreter as its child.
FAKE_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def import_slicer_core():
    """``slicer`` from slicer-core; skipped where it is not installed, required where CI sets
    ``SPINECONTEXTSEG_REQUIRE_SLICER_CORE=1`` (its slicer-core environment)."""
    if os.environ.get("SPINECONTEXTSEG_REQUIRE_SLICER_CORE") == "1":
        import slicer

        return slicer
    return pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core; Slicer's MRML without Qt, Python >= 3.10)")


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    status_path = f"/proc/{pid}/status"
    if os.path.exists("/proc/self/status"):
        try:
            with open(status_path) as handle:
                for line in handle:
                    if line.startswith("State:"):
                        return "Z" not in line.split()[1]
        except OSError:
            return False
        return False
    return wp.pid_exists(pid)


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.05)
    return not process_alive(pid)


@pytest.fixture
def fake_worker(tmp_path):
    path = tmp_path / "fake_worker.py"
    path.write_text(FAKE_WORKER)
    return str(path)


def make_run(tmp_path, command, **kwargs):
    temp_dir = wc.create_temp_dir(str(tmp_path))
    kwargs.setdefault("cancel_file", os.path.join(temp_dir, "cancel"))
    return wp.WorkerProcess(command, temp_dir=temp_dir, grace_s=kwargs.pop("grace_s", 1.0), **kwargs), temp_dir


# ----------------------------------------------------------------------------- command line
def test_build_worker_command_maps_every_option():
    command = wc.build_worker_command(
        "/opt/Slicer/bin/PythonSlicer", "/t/in.nrrd", "/t/out.nrrd", model="/m", device="cuda", threads=3,
        overlap=0.5, task="vertebrae", cancel_file="/t/cancel", roi_path="/t/roi.json", centreline_path="/t/line.json",
    )
    assert command[:3] == ["/opt/Slicer/bin/PythonSlicer", "-m", "SpineContextSegLib.worker"]
    assert command[3:6] == ["/t/in.nrrd", "-o", "/t/out.nrrd"]
    pairs = dict(zip(command[6::2], command[7::2]))
    assert pairs == {
        "--device": "cuda", "--task": "vertebrae", "--model": "/m", "--threads": "3", "--overlap": "0.5", "--cancel-file": "/t/cancel",
        "--roi": "/t/roi.json", "--centreline": "/t/line.json",
    }
    # defaults add nothing the worker does not need (a worker without --task support still runs)
    assert wc.build_worker_command("py", "i", "o") == ["py", "-m", "SpineContextSegLib.worker", "i", "-o", "o", "--device", "auto"]
    with pytest.raises(ValueError):
        wc.build_worker_command("py", "i", "o", device="gpu")
    with pytest.raises(ValueError):
        wc.build_worker_command("py", "i", "o", overlap=1.0)


def test_worker_accepts_every_option_the_module_passes(tmp_path, tiny_model_dir):
    """The command the module builds parses in the real worker (no usage error, exit status 2)."""
    command = wc.build_worker_command(
        sys.executable, str(tmp_path / "missing.nii.gz"), str(tmp_path / "out.nrrd"), model=tiny_model_dir, device="cpu",
        threads=1, overlap=0.25, cancel_file=str(tmp_path / "cancel"),
    )
    run, _ = make_run(tmp_path, command, env=wc.worker_environment(ROOT), cwd=str(tmp_path))
    outcome = run.start().wait(timeout_s=60)
    assert outcome.code == "input_not_found"  # got past argument parsing to the input check
    assert outcome.exit_status == ERROR_CODES["input_not_found"].exit_status


def test_worker_environment_puts_library_first():
    env = wc.worker_environment("/lib/parent", base={"PYTHONPATH": os.pathsep.join(["/a", "/lib/parent"])})
    assert env["PYTHONPATH"].split(os.pathsep) == ["/lib/parent", "/a"]
    assert env["PYTHONUNBUFFERED"] == "1"


def test_overall_fraction_grows_through_the_stages():
    fractions = [we.overall_fraction({"stage": stage, "done": done, "total": 4}) for stage in STAGES for done in range(5)]
    assert fractions == sorted(fractions)
    assert fractions[0] == 0.0 and fractions[-1] == pytest.approx(1.0)
    # naming the vertebrae takes seconds: the bar moves through it
    assert we.overall_fraction({"stage": "label", "done": 1, "total": 1}) - we.overall_fraction({"stage": "label", "done": 0, "total": 1}) >= 0.05
    assert "about 1 min 05 s left" in we.describe_progress({"stage": "network", "done": 3, "total": 12, "eta_s": 65})


# ----------------------------------------------------------------------------- scripted fakes
def test_protocol_lines_become_events_in_order(tmp_path, fake_worker):
    mask = tmp_path / "mask.nrrd"
    seen_during_finished = []

    def on_event(event):
        if event.kind == "finished":  # the owner imports here, before the folder is removed
            seen_during_finished.append(os.path.isdir(run.temp_dir))

    run, temp_dir = make_run(tmp_path, [sys.executable, fake_worker, "ok", str(mask)], on_event=on_event)
    outcome = run.start().wait(timeout_s=30)
    kinds = [event.kind for event in run.events]
    assert kinds == ["started", "log", "progress", "warning", "progress", "result", "finished"]
    assert run.worker_pid == run.process.pid
    assert run.events[1].line == "a stray library warning"
    assert run.events[2].message["done"] == 1 and run.events[2].describe() == "network 1/2, about 1 s left"
    assert outcome.succeeded and outcome.result["outputs"]["mask"] == str(mask)
    assert seen_during_finished == [True]
    assert not os.path.exists(temp_dir)


def test_error_line_maps_to_its_code(tmp_path, fake_worker):
    run, temp_dir = make_run(tmp_path, [sys.executable, fake_worker, "error"])
    outcome = run.start().wait(timeout_s=30)
    assert (outcome.status, outcome.code, outcome.exit_status) == (we.FAILED, "input_unreadable", 10)
    assert outcome.message == "cannot read x"
    assert outcome.remedy() == ERROR_CODES["input_unreadable"].remedy
    exception = outcome.to_exception()
    assert exception.code == "input_unreadable" and exception.exit_status == 10
    assert not os.path.exists(temp_dir)


def test_nonzero_exit_without_error_line_quotes_the_last_output(tmp_path, fake_worker):
    run, temp_dir = make_run(tmp_path, [sys.executable, fake_worker, "crash"])
    outcome = run.start().wait(timeout_s=30)
    assert (outcome.status, outcome.code, outcome.exit_status) == (we.FAILED, we.WORKER_EXITED, 3)
    assert "exit status 3" in outcome.message and "No module named 'onnxruntime'" in outcome.message
    assert outcome.to_exception().code == "internal"
    assert not os.path.exists(temp_dir)


def test_exit_zero_without_result_is_a_failure(tmp_path, fake_worker):
    outcome = make_run(tmp_path, [sys.executable, fake_worker, "silent"])[0].start().wait(timeout_s=30)
    assert (outcome.status, outcome.code) == (we.FAILED, we.WORKER_NO_RESULT)


def test_a_worker_that_cannot_start_still_finishes_once(tmp_path):
    finished = []
    run, temp_dir = make_run(tmp_path, [str(tmp_path / "no-such-python"), "-m", "x"], on_event=lambda e: finished.append(e))
    run.start()
    assert run.finished and run.outcome.code == we.WORKER_START_FAILED
    assert [e.kind for e in finished] == ["finished"]
    assert not os.path.exists(temp_dir)


def test_streaming_launcher_path_gives_the_same_events(tmp_path, fake_worker):
    """The Slicer 5.12+ path: the launcher reads the output and calls back (here from a thread)."""
    import subprocess

    def streaming_launcher(command, env, cwd, on_line, on_exit):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, cwd=cwd)

        def pump():
            for line in process.stdout:
                on_line(line.rstrip())
            on_exit(process.wait())

        threading.Thread(target=pump, daemon=True).start()
        return process

    run, temp_dir = make_run(tmp_path, [sys.executable, fake_worker, "ok", "m.nrrd"])
    outcome = run.start_streaming(streaming_launcher).wait(timeout_s=30)
    assert [e.kind for e in run.events] == ["started", "log", "progress", "warning", "progress", "result", "finished"]
    assert outcome.succeeded and not os.path.exists(temp_dir)


def test_handler_failure_on_a_good_result_is_reported(tmp_path, fake_worker):
    def on_event(event):
        if event.kind == "result":
            raise RuntimeError("import exploded")

    run, _ = make_run(tmp_path, [sys.executable, fake_worker, "ok", "m.nrrd"], on_event=on_event)
    outcome = run.start().wait(timeout_s=30)
    assert (outcome.status, outcome.code) == (we.FAILED, we.RESULT_IMPORT_FAILED)
    assert "import exploded" in outcome.message


@pytest.mark.skipif(not POSIX, reason="uses /proc and POSIX signals")
def test_cancel_kills_a_worker_that_ignores_it_and_its_launcher(tmp_path, fake_worker):
    """Cancel file first; after the grace period the reported PID and the launcher are killed."""
    command = [sys.executable, "-c", FAKE_LAUNCHER, sys.executable, fake_worker, "hang"]
    run, temp_dir = make_run(tmp_path, command, grace_s=0.5)
    run.start()
    deadline = time.monotonic() + 30
    while run.worker_pid is None and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.02)
    worker_pid, launcher_pid = run.worker_pid, run.process.pid
    assert worker_pid is not None and worker_pid != launcher_pid  # the real worker is the launcher's child
    started = time.monotonic()
    run.cancel()
    assert os.path.isfile(run.cancel_file)
    outcome = run.wait(timeout_s=30)
    assert time.monotonic() - started >= 0.5  # it was given the grace period
    assert run.killed
    assert (outcome.status, outcome.code) == (we.CANCELLED, "cancelled")
    assert "killed" in outcome.message
    assert wait_gone(worker_pid) and wait_gone(launcher_pid)
    assert not os.path.exists(temp_dir)


# ----------------------------------------------------------------------------- the real worker
def real_worker_command(tmp_path, model_dir, input_path=SAMPLE_CT, **options):
    options.setdefault("device", "cpu")
    options.setdefault("threads", 1)
    return wc.build_worker_command(
        sys.executable, input_path, str(tmp_path / "run" / "result.nrrd"), model=model_dir, cancel_file=str(tmp_path / "run" / "cancel"), **options
    )


def start_real(tmp_path, model_dir, input_path=SAMPLE_CT, options=None, **kwargs):
    os.makedirs(tmp_path / "run", exist_ok=True)
    command = real_worker_command(tmp_path, model_dir, input_path=input_path, **(options or {}))
    run = wp.WorkerProcess(
        command, temp_dir=str(tmp_path / "run"), cancel_file=str(tmp_path / "run" / "cancel"),
        env=wc.worker_environment(ROOT), cwd=str(tmp_path), grace_s=kwargs.pop("grace_s", 10.0), **kwargs,
    )
    return run.start()


def poll_until(run, predicate, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not run.finished and time.monotonic() < deadline:
        for event in run.poll():
            if predicate(event):
                return event
        time.sleep(0.01)
    return None


def test_real_worker_progress_result_and_cleanup(tmp_path, tiny_model_dir):
    mask_present = []

    def on_event(event):
        if event.kind == "finished" and event.outcome.succeeded:
            mask_present.append(os.path.getsize(event.outcome.result["outputs"]["mask"]))

    run = start_real(tmp_path, tiny_model_dir, on_event=on_event)
    outcome = run.wait(timeout_s=120)
    assert outcome.succeeded, outcome.message
    kinds = [event.kind for event in run.events]
    assert kinds[0] == "started" and kinds[-2:] == ["result", "finished"]
    assert isinstance(run.worker_pid, int) and run.worker_pid == run.process.pid
    stages = [event.message["stage"] for event in run.events if event.kind == "progress"]
    assert "network" in stages
    assert [STAGES.index(s) for s in stages] == sorted(STAGES.index(s) for s in stages)  # never goes back
    labels = outcome.result["labels"]
    assert labels[0]["name"] == "Spine" and labels[0]["value"] == 1 and "SCT^" in labels[0]["terminology"]
    assert mask_present and mask_present[0] > 0  # the mask existed while the owner handled it
    assert not os.path.exists(tmp_path / "run")


def test_real_worker_error_line_maps_to_the_documented_code(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken.nrrd"
    broken.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4\n\nnot an image")
    run = start_real(tmp_path, tiny_model_dir, input_path=str(broken))
    outcome = run.wait(timeout_s=60)
    assert outcome.status == we.FAILED
    assert outcome.code in ERROR_CODES and outcome.code.startswith("input_")
    assert outcome.exit_status == ERROR_CODES[outcome.code].exit_status == run.process.returncode
    assert [e.kind for e in run.events][-2:] == ["error", "finished"]


@pytest.mark.skipif(not POSIX, reason="uses /proc")
def test_real_worker_cancel_mid_run(tmp_path, tiny_model_dir):
    """Cooperative cancel during the network stage: exit status 20, no process, no folder."""
    run = start_real(tmp_path, tiny_model_dir, options={"overlap": 0.85})  # thousands of tiles: slow enough
    event = poll_until(run, lambda e: e.kind == "progress" and e.message["stage"] == "network" and e.message["done"] > 0)
    assert event is not None, "the worker finished before it could be cancelled"
    run.cancel()
    outcome = run.wait(timeout_s=60)
    assert (outcome.status, outcome.code) == (we.CANCELLED, "cancelled")
    assert outcome.exit_status == ERROR_CODES["cancelled"].exit_status == 20
    assert not run.killed  # it stopped by itself, within the grace period
    assert wait_gone(run.worker_pid)
    assert not os.path.exists(tmp_path / "run")
    assert not os.path.exists(tmp_path / "run" / "result.nrrd")


@pytest.mark.skipif(not POSIX, reason="POSIX signals")
def test_real_worker_killed_is_reported_as_worker_died(tmp_path, tiny_model_dir):
    run = start_real(tmp_path, tiny_model_dir, options={"overlap": 0.85})
    event = poll_until(run, lambda e: e.kind == "progress" and e.message["stage"] == "network")
    assert event is not None
    os.kill(run.worker_pid, signal.SIGKILL)  # what the out-of-memory killer does
    outcome = run.wait(timeout_s=60)
    assert (outcome.status, outcome.code) == (we.FAILED, we.WORKER_DIED)
    assert "worker died" in outcome.message and "SIGKILL" in outcome.message
    assert outcome.remedy()
    assert not os.path.exists(tmp_path / "run")


def test_real_worker_result_imports_into_mrml(tmp_path, tiny_model_dir):
    """Export a volume from a scene, run the worker on it, import the result (needs slicer-core)."""
    slicer = import_slicer_core()
    import numpy as np
    import vtk

    from SpineContextSegSlicerLib import mrml_io

    mrml_io.register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "sample")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(SAMPLE_CT)
    assert storage.ReadData(volume)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkTransform()
    shift.Translate(12.0, -7.0, 30.0)
    transform.SetMatrixTransformToParent(shift.GetMatrix())
    volume.SetAndObserveTransformNodeID(transform.GetID())

    os.makedirs(tmp_path / "run")
    exported = mrml_io.export_volume(volume, str(tmp_path / "run" / "input.nrrd"))
    command = real_worker_command(tmp_path, tiny_model_dir, input_path=str(tmp_path / "run" / "input.nrrd"))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "sample spine")
    imported = []

    def on_event(event):
        if event.kind == "finished" and event.outcome.succeeded:
            result = event.outcome.result
            imported.extend(mrml_io.import_label_map(result["outputs"]["mask"], segmentation, result["labels"], volume, exported_ijk_to_ras=exported))

    run = wp.WorkerProcess(command, temp_dir=str(tmp_path / "run"), env=wc.worker_environment(ROOT), on_event=on_event)
    outcome = run.start().wait(timeout_s=120)
    assert outcome.succeeded, outcome.message
    assert imported == ["Spine"]
    assert segmentation.GetTransformNodeID() == transform.GetID()
    # the imported segment lies on the input's own voxels (local grid, same transform): no resampling
    labelmap = segmentation.GetBinaryLabelmapInternalRepresentation("Spine")
    assert labelmap is not None
    local = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(local)
    segment_matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(segment_matrix)
    assert mrml_io.matrices_close(local, segment_matrix)
    from vtk.util.numpy_support import vtk_to_numpy

    assert np.count_nonzero(vtk_to_numpy(labelmap.GetPointData().GetScalars())) > 1000
    assert not os.path.exists(tmp_path / "run")


# ----------------------------------------------------------------------------- the module's logic
class _ManualTimer:
    """Stands in for ``qt.QTimer``: the test's event loop fires it."""

    pending: list = []  # singleShot callbacks (Slicer 5.12's launchConsoleProcess uses them)

    def __init__(self):
        self.callbacks, self.active = [], False

    def setInterval(self, msec):
        pass

    def connect(self, signal, callback):
        self.callbacks.append(callback)

    def disconnect(self, signal, callback):
        self.callbacks.remove(callback)

    def start(self):
        self.active = True
        _ManualTimer.running.append(self)

    def stop(self):
        self.active = False

    @staticmethod
    def singleShot(msec, callback):
        _ManualTimer.pending.append(callback)


_ManualTimer.running = []


def _pump(seconds=0.02):
    """One turn of the stand-in event loop: singleShot callbacks, then active timers."""
    pending, _ManualTimer.pending = _ManualTimer.pending, []
    for callback in pending:
        callback()
    for timer in list(_ManualTimer.running):
        if timer.active:
            for callback in timer.callbacks:
                callback()
    time.sleep(seconds)


@pytest.fixture
def module_with_stub_gui(monkeypatch, tmp_path):
    """Load SpineContextSeg.py with slicer-core for MRML and small stand-ins for Qt and the Slicer app.

    What is real: MRML, the segmentation logic, ``slicer.util`` (including Slicer 5.12+'s
    non-blocking ``launchConsoleProcess``), the worker. What is stubbed: ``qt.QTimer`` (a manual
    event loop), ``slicer.app``, the parameter-node decorator and the ScriptedLoadableModule bases.
    """
    import importlib.util
    import types
    import unittest

    slicer = import_slicer_core()
    from SpineContextSegSlicerLib import mrml_io

    mrml_io.register_segmentation_converters()
    scene = slicer.vtkMRMLScene()

    qt = types.ModuleType("qt")
    qt.QTimer = _ManualTimer
    _ManualTimer.pending, _ManualTimer.running = [], []
    stubs = scripted_module_stubs(unittest.TestCase)

    class _Environment:
        def keys(self):
            return list(os.environ)

        def value(self, key):
            return os.environ[key]

    connections = []  # (signal, slot) pairs connected to the application, as PythonQt keeps them

    def disconnect(signal, slot):
        connections.remove((signal, slot))  # PythonQt compares the callables: a bound method equals its twin

    app = types.SimpleNamespace(
        temporaryPath=str(tmp_path / "slicer-temp"), connect=lambda signal, slot: connections.append((signal, slot)),
        disconnect=disconnect, connections=connections, processEvents=_pump,
        layoutManager=lambda: None, startupEnvironment=_Environment,
    )
    stubs.update({"qt": qt, "ctk": types.ModuleType("ctk")})
    for name, stub in stubs.items():
        monkeypatch.setitem(sys.modules, name, stub)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    spec = importlib.util.spec_from_file_location("SpineContextSeg", os.path.join(MODULE_DIR, "SpineContextSeg.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "SpineContextSeg", module)
    spec.loader.exec_module(module)

    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "sample")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(SAMPLE_CT)
    assert storage.ReadData(volume)
    return module, scene, volume


def pump_until(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        _pump()
    return condition()


def test_logic_process_blocking_imports_surface_and_exports(module_with_stub_gui, tiny_model_dir, tmp_path):
    module, scene, volume = module_with_stub_gui
    logic = module.SpineContextSegLogic()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "sample spine")
    events = []
    run = logic.process(volume, segmentation, device="cpu", model=tiny_model_dir, threads=1, eventCallback=events.append)
    assert run.outcome.succeeded, run.outcome.message
    assert run.segmentIds == ["Spine"] and not logic.isRunning and logic.lastRun is run
    kinds = [e.kind for e in events]
    assert kinds[0] == "status" and "started" in kinds and "progress" in kinds and kinds[-1] == "finished"
    assert not os.path.exists(run.tempDir)
    assert segmentation.GetClosedSurfaceInternalRepresentation("Spine").GetNumberOfPoints() > 0
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume
    roi = scene.GetNodeByID(segmentation.GetAttribute("SpineContextSeg.RoiNodeID"))
    curve = scene.GetNodeByID(segmentation.GetAttribute("SpineContextSeg.CentrelineNodeID"))
    assert roi.IsA("vtkMRMLMarkupsROINode") and roi.GetName() == "sample spine ROI"
    assert curve.IsA("vtkMRMLMarkupsCurveNode") and curve.GetNumberOfControlPoints() >= 2

    paths = logic.exportStl(segmentation, str(tmp_path / "stl"))
    assert [os.path.basename(p) for p in paths] == ["sample spine_Spine.stl"]
    from SpineContextSegLib.errors import SegmentationError

    with pytest.raises(SegmentationError) as raised:
        logic.exportStl(segmentation, str(tmp_path / "stl"), vertebrae="L1-L5")
    assert raised.value.code == "no_spine_found" and "Vertebrae" in raised.value.message
    with pytest.raises(SegmentationError) as raised:
        logic.exportStl(segmentation, str(tmp_path / "stl"), vertebrae="L9")
    assert raised.value.code == "input_format"


def test_logic_process_blocking_raises_the_worker_error(module_with_stub_gui, tmp_path):
    module, scene, volume = module_with_stub_gui
    from SpineContextSegLib.errors import SegmentationError

    with pytest.raises(SegmentationError) as raised:
        module.SpineContextSegLogic().process(volume, scene.AddNewNodeByClass("vtkMRMLSegmentationNode"), device="cpu", model=str(tmp_path / "no-model"))
    assert raised.value.code == "model_not_found"
    assert os.listdir(tmp_path / "slicer-temp") == []  # temp folder removed


@pytest.mark.parametrize("non_blocking_launch", [True, False], ids=["slicer-5.12-launchConsoleProcess", "slicer-5.8-reader-thread"])
def test_logic_non_blocking_run_and_cancel(module_with_stub_gui, tiny_model_dir, monkeypatch, non_blocking_launch):
    module, scene, volume = module_with_stub_gui
    from SpineContextSegSlicerLib import segmentation_run  # where the logic's runner looks it up

    monkeypatch.setattr(segmentation_run, "supportsNonBlockingLaunch", lambda: non_blocking_launch)
    logic = module.SpineContextSegLogic()

    done = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    events = []
    run = logic.process(volume, done, device="cpu", model=tiny_model_dir, threads=1, waitForCompletion=False, eventCallback=events.append)
    assert logic.isRunning and not run.finished  # returned at once
    assert pump_until(lambda: not logic.isRunning)
    assert run.outcome.succeeded, run.outcome.message
    assert done.GetSegmentation().GetNumberOfSegments() == 1
    assert [e.kind for e in events].count("finished") == 1

    cancelled = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    run = logic.process(volume, cancelled, device="cpu", model=tiny_model_dir, threads=1, overlap=0.85, waitForCompletion=False)
    assert pump_until(lambda: run.worker.worker_pid is not None and any(e.kind == "progress" and e.message["stage"] == "network" for e in run.worker.events))
    logic.cancel()
    assert pump_until(lambda: not logic.isRunning)
    assert (run.outcome.status, run.outcome.code) == ("cancelled", "cancelled")
    assert cancelled.GetSegmentation().GetNumberOfSegments() == 0
    assert not os.path.exists(run.tempDir) and wait_gone(run.worker.worker_pid)


@pytest.mark.skipif(not POSIX, reason="uses /proc")
def test_closing_the_scene_stops_a_running_worker(module_with_stub_gui, tiny_model_dir):
    module, scene, volume = module_with_stub_gui
    logic = module.SpineContextSegLogic()
    run = logic.process(volume, scene.AddNewNodeByClass("vtkMRMLSegmentationNode"), device="cpu", model=tiny_model_dir, threads=1, overlap=0.85, waitForCompletion=False)
    assert pump_until(lambda: run.worker.worker_pid is not None)
    started = time.monotonic()
    scene.Clear()  # StartCloseEvent -> logic.stop(): cancel file + immediate kill, bounded wait
    assert time.monotonic() - started < 10
    assert not logic.isRunning and run.outcome.status == "cancelled"
    assert wait_gone(run.worker.worker_pid)
    assert not os.path.exists(run.tempDir)


# ----------------------------------------------------------------------------- lifecycle (issue 15)
def test_a_finished_run_leaves_no_observer_and_the_logic_is_freed(module_with_stub_gui, tmp_path):
    import gc
    import weakref

    module, scene, volume = module_with_stub_gui
    from SpineContextSegLib.errors import SegmentationError

    app = module.slicer.app
    logic = module.SpineContextSegLogic()
    with pytest.raises(SegmentationError):  # a quick failing run: no model
        logic.process(volume, scene.AddNewNodeByClass("vtkMRMLSegmentationNode"), device="cpu", model=str(tmp_path / "no-model"))
    assert app.connections == [], "aboutToQuit() still connected after the run"
    assert not scene.HasObserver(scene.StartCloseEvent), "scene-close observer left behind"
    reference = weakref.ref(logic)
    del logic
    gc.collect()
    assert reference() is None, "something still holds the logic (a leaked observer or connection)"


@pytest.mark.skipif(not POSIX, reason="uses /proc")
def test_widget_cleanup_stops_the_worker_and_removes_the_logic_observers(module_with_stub_gui, tiny_model_dir):
    module, scene, volume = module_with_stub_gui
    app = module.slicer.app
    widget = module.SpineContextSegWidget()
    widget.logic = logic = module.SpineContextSegLogic()
    run = logic.process(volume, scene.AddNewNodeByClass("vtkMRMLSegmentationNode"), device="cpu", model=tiny_model_dir, threads=1,
                        overlap=0.85, waitForCompletion=False)
    assert pump_until(lambda: run.worker.worker_pid is not None)
    assert [signal for signal, _slot in app.connections] == ["aboutToQuit()"]
    assert scene.HasObserver(scene.StartCloseEvent)
    widget.cleanup()  # module unloaded / Slicer closing
    assert not logic.isRunning and run.outcome.status == "cancelled"
    assert wait_gone(run.worker.worker_pid)
    assert app.connections == [] and not scene.HasObserver(scene.StartCloseEvent)
    assert logic.runner._timer is None and all(not t.callbacks for t in _ManualTimer.running)  # the poll timer let go too
    logic.cleanup()  # twice is harmless


@pytest.mark.parametrize("slicer_version", ["5.12-gui", "5.12-testing", "5.8"])
def test_a_failed_pip_install_shows_one_error_dialog(module_with_stub_gui, monkeypatch, slicer_version):
    """Slicer 5.12+'s pip_install shows its own error dialog (with pip's log) before raising: ours must not follow."""
    import contextlib
    import subprocess
    import types

    module, _scene, _volume = module_with_stub_gui
    slicer = module.slicer
    dialogs = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: dialogs.append(text), raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *args, **kwargs: True, raising=False)
    monkeypatch.setattr(slicer.util, "WaitCursor", contextlib.nullcontext, raising=False)
    testing = slicer_version == "5.12-testing"
    monkeypatch.setattr(slicer.app, "testingEnabled", lambda: testing, raising=False)
    if slicer_version.startswith("5.12"):
        packaging = types.ModuleType("slicer.packaging")

        def pip_install(requirements, constraints=None, requester=None, **kwargs):  # as Slicer 5.12.0 behaves
            assert constraints and requester == "SpineContextSeg"
            if not testing:  # _pip_install_with_dialog: errorDisplay(log), then raise
                slicer.util.errorDisplay("Package installation failed.", windowTitle=f"{requester} - Installation Failed", detailedText="pip log")
            raise subprocess.CalledProcessError(1, "pip install")

        packaging.pip_install = pip_install
        monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
        monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    else:
        monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # import fails, as on 5.8-5.10
        if hasattr(slicer, "packaging"):
            monkeypatch.delattr(slicer, "packaging")

        def pip_install(requirements):  # 5.8: runs pip, raises, shows nothing
            raise subprocess.CalledProcessError(1, "pip install")

        monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)

    widget = module.SpineContextSegWidget()
    widget.logic = module.SpineContextSegLogic()
    monkeypatch.setattr(widget.logic, "missingDependencies", lambda device: (["onnxruntime>=1.16"], []))
    widget.ui = types.SimpleNamespace(statusLabel=types.SimpleNamespace(text="", styleSheet=""), logTextEdit=PlainTextLog(),
                                      logCollapsibleButton=types.SimpleNamespace(collapsed=True))
    assert widget.ensureDependencies("cpu") is False
    assert len(dialogs) == 1, f"{len(dialogs)} error dialogs: {dialogs}"
    assert "Installing the Python packages failed" in widget.ui.statusLabel.text  # the panel still says what happened
    assert widget.ui.logCollapsibleButton.collapsed is False


# ----------------------------------------------------------------------------- start-up (issue 15)
def test_startup_with_an_incomplete_install_logs_one_line_and_no_traceback(module_with_stub_gui, monkeypatch, caplog):
    import types

    module, _scene, _volume = module_with_stub_gui
    registered = []
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(
        registerCustomSampleDataCategory=lambda *args, **kwargs: None,
        registerCustomSampleDataSource=lambda **kwargs: registered.append(kwargs),
    )
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)

    def missing_library():
        raise ImportError("SpineContextSegLib was not found next to /x; the extension is incompletely installed.")

    with monkeypatch.context() as patch, caplog.at_level("WARNING"):
        patch.setattr(module, "_libraries", missing_library)
        assert not module.registerSampleData()  # no exception escapes into Slicer's start-up
        assert module.loadTerminology() is None
    assert registered == []
    assert any("incompletely installed" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged at start-up"

    assert module.registerSampleData() is True  # complete install: registered with the constant checksum
    assert registered[0]["checksums"] == f"SHA256:{module.SAMPLE_SHA256}"
    assert registered[0]["uris"].startswith("file:")


def test_terminology_is_loaded_at_startup_and_guarded(module_with_stub_gui, monkeypatch, caplog):
    import types

    module, _scene, _volume = module_with_stub_gui
    slicer = module.slicer
    terminology_logic = slicer.vtkSlicerTerminologiesModuleLogic()
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(terminologies=types.SimpleNamespace(logic=lambda: terminology_logic)), raising=False)
    from SpineContextSegLib.labels import TERMINOLOGY_CONTEXT

    assert module.loadTerminology() == TERMINOLOGY_CONTEXT
    names = vtk_string_list(terminology_logic)
    assert TERMINOLOGY_CONTEXT in names

    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(), raising=False)  # Terminologies module disabled
    with caplog.at_level("WARNING"):
        assert module.loadTerminology() is None
    assert any("Terminologies module" in r.getMessage() for r in caplog.records)


def vtk_string_list(terminology_logic):
    import vtk

    names = vtk.vtkStringArray()
    terminology_logic.GetLoadedTerminologyNames(names)
    return [names.GetValue(i) for i in range(names.GetNumberOfValues())]
