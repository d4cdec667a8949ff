"""Run the segmentation worker in a child process; turn its JSON lines into events.

Pure Python (no ``qt``, no ``slicer``), so the whole life cycle is tested by pytest:

1. :func:`build_worker_command` makes the command line of
   ``python -m SpineContextSegLib.worker`` (inside Slicer ``python`` is ``PythonSlicer``).
2. :class:`WorkerProcess` starts it, either with :mod:`subprocess` (the default), with a
   *launcher* that returns a ``Popen`` whose stdout this class reads on a daemon thread, or
   with a *streaming launcher* that delivers the lines itself (Slicer 5.12+
   ``launchConsoleProcess(blocking=False, logCallback=..., completedCallback=...)``).
   Lines and the exit status go into one :class:`queue.Queue`.
3. The owner calls :meth:`WorkerProcess.poll` on its own thread (Slicer: a ``QTimer`` on the
   GUI thread; scripts: :meth:`WorkerProcess.wait`). ``poll`` parses the queued lines into
   :class:`WorkerEvent` objects and hands them to ``on_event`` on that thread, so a handler
   may touch MRML. It also enforces the cancel grace period.
4. Cancel: write the cancel file (the worker stops between tiles and exits with status 20);
   if it is still running after ``grace_s``, kill the PID it reported in its ``started`` line
   (the real Python: ``PythonSlicer`` is a launcher that starts it as a child) and then the
   launcher process.
5. Every ending (success, error line, non-zero exit, death by a signal, cancel, a failed
   start) produces exactly one ``finished`` event carrying a :class:`WorkerOutcome`; the
   temporary folder is removed right after that event's handlers ran.
"""
from __future__ import annotations

import dataclasses
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any, Callable, Dict, List, Optional, Sequence

from . import ensure_library_importable

ensure_library_importable()

from SpineContextSegLib.errors import ERROR_CODES, SegmentationError  # noqa: E402
from SpineContextSegLib.progress import STAGES, decode_message  # noqa: E402

WORKER_MODULE = "SpineContextSegLib.worker"
DEVICES = ("auto", "cpu", "cuda")
TASKS = ("spine", "vertebrae")

#: Outcome statuses.
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

#: Codes for endings the worker could not report itself (not in ``ERROR_CODES``).
WORKER_DIED = "worker_died"  # killed by a signal (out-of-memory killer, user, crash)
WORKER_EXITED = "worker_exited"  # non-zero exit status without an ``error`` line
WORKER_NO_RESULT = "worker_no_result"  # exit status 0 but no ``result`` line
WORKER_START_FAILED = "worker_start_failed"  # the executable could not be started
RESULT_IMPORT_FAILED = "result_import_failed"  # the owner's handler failed on a good result

#: Lines kept for messages and for the log of a failed run.
LOG_TAIL_LINES = 40

Launcher = Callable[[List[str], Optional[Dict[str, str]], Optional[str]], Any]
StreamingLauncher = Callable[
    [List[str], Optional[Dict[str, str]], Optional[str], Callable[[str], None], Callable[[int], None]], Any
]


def build_worker_command(
    python_executable: str,
    input_path: str,
    output_path: str,
    *,
    model: Optional[str] = None,
    device: str = "auto",
    threads: Optional[int] = None,
    overlap: Optional[float] = None,
    task: str = "spine",
    cancel_file: Optional[str] = None,
    stl_path: Optional[str] = None,
    qc_path: Optional[str] = None,
    roi_path: Optional[str] = None,
    centreline_path: Optional[str] = None,
) -> List[str]:
    """The worker's command line (the same options as ``spinecontextseg segment --progress json``).

    Parameters
    ----------
    python_executable : str
        Interpreter that has the library's dependencies; inside Slicer ``sys.executable``
        (the ``PythonSlicer`` launcher).
    input_path, output_path : str
        Input CT (any format the library reads) and the label map to write (``.nrrd``).
    model : str, optional
        Model folder (``model.onnx`` + ``model.json``) or its ``model.onnx``; default the bundled model.
    device : {"auto", "cpu", "cuda"}
    threads : int, optional
        CPU threads for inference; ``None`` or ``0`` lets the worker choose.
    overlap : float, optional
        Tile overlap in [0, 1); ``None`` uses the model card's default.
    task : {"spine", "vertebrae"}
    cancel_file, stl_path, qc_path, roi_path, centreline_path : str, optional
        Passed through as ``--cancel-file``, ``--stl``, ``--qc``, ``--roi`` and ``--centreline``.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    command = [python_executable, "-m", WORKER_MODULE, os.fspath(input_path), "-o", os.fspath(output_path)]
    command += ["--device", device]
    if task != "spine":  # the default; workers without --task (before the vertebrae model) still run
        command += ["--task", task]
    if model:
        command += ["--model", os.fspath(model)]
    if threads:
        command += ["--threads", str(int(threads))]
    if overlap is not None:
        if not 0.0 <= float(overlap) < 1.0:
            raise ValueError(f"overlap must be in [0, 1), not {overlap!r}")
        command += ["--overlap", repr(float(overlap))]
    if cancel_file:
        command += ["--cancel-file", os.fspath(cancel_file)]
    if stl_path:
        command += ["--stl", os.fspath(stl_path)]
    if qc_path:
        command += ["--qc", os.fspath(qc_path)]
    if roi_path:
        command += ["--roi", os.fspath(roi_path)]
    if centreline_path:
        command += ["--centreline", os.fspath(centreline_path)]
    return command


def worker_environment(library_parent: str, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Variables to add for the worker: the library on ``PYTHONPATH``, unbuffered UTF-8 output.

    Returns only the variables to set or override (what ``launchConsoleProcess``'s
    ``updateEnvironment`` expects); ``base`` (default ``os.environ``) only supplies an
    existing ``PYTHONPATH`` to extend.
    """
    base = os.environ if base is None else base
    python_path = [library_parent] + [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p and p != library_parent]
    return {
        "PYTHONPATH": os.pathsep.join(python_path),
        "PYTHONUNBUFFERED": "1",
        "PYTHONIOENCODING": "utf-8",
    }


def create_temp_dir(parent: Optional[str] = None) -> str:
    """A fresh private folder for one run (short name: Windows path-length limits)."""
    if parent:
        os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix="scs-", dir=parent)


@dataclasses.dataclass
class WorkerEvent:
    """One thing that happened, in the order it happened.

    ``kind`` is a protocol type (``started``, ``progress``, ``warning``, ``result``, ``error``),
    ``log`` for any other output line (tracebacks, library warnings), or ``finished`` (last
    event; ``outcome`` is set).
    """

    kind: str
    message: Dict[str, Any] = dataclasses.field(default_factory=dict)
    line: str = ""
    outcome: Optional["WorkerOutcome"] = None

    def describe(self) -> str:
        """A short human-readable line (status bar, log)."""
        if self.kind == "progress":
            return describe_progress(self.message)
        if self.kind in ("warning", "error"):
            return f"{self.kind.capitalize()} [{self.message.get('code', '?')}]: {self.message.get('message', '')}"
        if self.kind == "started":
            return f"Worker started (PID {self.message.get('pid')}, version {self.message.get('version', '?')})."
        if self.kind == "result":
            return "Worker finished; importing the result."
        if self.kind == "finished" and self.outcome is not None:
            return self.outcome.message
        return self.line


def describe_progress(message: Dict[str, Any]) -> str:
    """``"network 3/12, about 4 s left"`` from a progress message."""
    stage = str(message.get("stage", "?"))
    text = f"{stage} {message.get('done', 0)}/{message.get('total', 0)}"
    eta = message.get("eta_s")
    if isinstance(eta, (int, float)) and eta > 0:
        text += f", about {format_duration(eta)} left"
    return text


def format_duration(seconds: float) -> str:
    """``"4 s"``, ``"1 min 05 s"``; rounded up, so a short wait never reads as 0 s."""
    seconds = max(0, int(math.ceil(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds:02d} s"


def overall_fraction(message: Dict[str, Any]) -> float:
    """Progress of the whole run in [0, 1], from a stage's progress (stages weighted by typical cost).

    The network stage dominates; the others are short. Unknown stages count as the network stage.
    """
    weights = {"read": 3, "preprocess": 5, "network": 70, "stitch": 4, "postprocess": 8, "write": 4, "mesh": 4, "qc": 2}
    stage = message.get("stage")
    total = max(int(message.get("total") or 0), 1)
    done = min(max(int(message.get("done") or 0), 0), total)
    before = 0
    for name in STAGES:
        if name == stage:
            break
        before += weights.get(name, 0)
    else:
        return done / total
    return (before + weights.get(str(stage), 0) * done / total) / sum(weights.values())


@dataclasses.dataclass
class WorkerOutcome:
    """How a run ended.

    status : ``succeeded``, ``failed`` or ``cancelled``
    code : an :data:`~SpineContextSegLib.errors.ERROR_CODES` key from the worker's ``error``
        line, or one of this module's ``WORKER_*`` codes for endings the worker could not report.
    """

    status: str
    code: str = ""
    message: str = ""
    exit_status: Optional[int] = None
    result: Optional[Dict[str, Any]] = None
    log_tail: List[str] = dataclasses.field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED

    def remedy(self) -> str:
        """What the user should do (from ``ERROR_CODES``), or a generic hint."""
        if self.code in ERROR_CODES:
            return ERROR_CODES[self.code].remedy
        return {
            WORKER_DIED: "Close other programs (the system may have run out of memory), choose CPU or fewer threads, and try again.",
            WORKER_EXITED: "Open the log for the worker's last lines; a missing Python package is the usual cause.",
            WORKER_NO_RESULT: "Open the log and report the problem.",
            WORKER_START_FAILED: "Reinstall the SpineContextSeg extension.",
            RESULT_IMPORT_FAILED: "Open the log and report the problem.",
        }.get(self.code, "")

    def to_exception(self) -> SegmentationError:
        """A :class:`SegmentationError` for scripting callers (codes outside ``ERROR_CODES`` become ``internal``)."""
        if self.code in ERROR_CODES:
            return SegmentationError(self.code, self.message, details={"exit_status": self.exit_status})
        return SegmentationError("internal", self.message, details={"reason": self.code, "exit_status": self.exit_status})


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except (ValueError, AttributeError):
        return f"signal {number}"


def kill_pid(pid: int) -> bool:
    """Hard-kill one process by PID; ``False`` if it no longer exists or may not be killed."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        if sys.platform == "win32":
            # TerminateProcess; /T also ends any children the worker started.
            completed = subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False)
            return completed.returncode == 0
        os.kill(pid, signal.SIGKILL)
        return True
    except (OSError, ValueError):
        return False


def pid_exists(pid: int) -> bool:
    """Whether a process with this PID exists (POSIX; a zombie counts as existing)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":  # pragma: no cover - not exercised in CI
        completed = subprocess.run(["tasklist", "/FI", f"PID eq {pid}", "/NH"], capture_output=True, text=True, check=False)
        return str(pid) in completed.stdout
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _popen_launcher(command: List[str], env: Optional[Dict[str, str]], cwd: Optional[str]) -> subprocess.Popen:
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update(env)
    kwargs: Dict[str, Any] = {}
    if sys.platform == "win32":  # pragma: no cover
        kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=full_env,
        cwd=cwd,
        universal_newlines=True,
        encoding="utf-8",
        errors="replace",
        **kwargs,
    )


class WorkerProcess:
    """One worker run: start, stream events, cancel, kill, clean up.

    Parameters
    ----------
    command : list of str
        From :func:`build_worker_command` (or any program speaking the protocol).
    temp_dir : str, optional
        The run's private folder (input export, output mask, cancel file); removed after the
        ``finished`` event, whatever the ending. ``None``: nothing to remove.
    cancel_file : str, optional
        Path the worker watches (``--cancel-file``); :meth:`cancel` creates it.
    env : dict, optional
        Variables to add to the environment (see :func:`worker_environment`).
    cwd : str, optional
    on_event : callable, optional
        ``on_event(WorkerEvent)``, called from :meth:`poll` on the polling thread. An exception
        raised while handling the ``result`` event or the successful ``finished`` event turns
        the outcome into a failure (``result_import_failed``); other exceptions are logged into
        the outcome's log tail and ignored.
    grace_s : float
        Seconds between writing the cancel file and the hard kill; also how long a worker may
        linger after its ``result`` line before it is killed (a hung exit must not block).
    keep_temp_dir : bool
        Keep the folder for debugging.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        temp_dir: Optional[str] = None,
        cancel_file: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        on_event: Optional[Callable[[WorkerEvent], None]] = None,
        grace_s: float = 5.0,
        keep_temp_dir: bool = False,
    ):
        self.command = [os.fspath(part) for part in command]
        self.temp_dir = temp_dir
        self.cancel_file = cancel_file
        self.env = env
        self.cwd = cwd
        self.on_event = on_event
        self.grace_s = float(grace_s)
        self.keep_temp_dir = keep_temp_dir

        self.process: Any = None  # Popen-like: pid, poll(), kill(), wait()
        self.worker_pid: Optional[int] = None  # from the ``started`` line
        self.outcome: Optional[WorkerOutcome] = None
        self.cancel_requested = False
        self.killed = False
        self.events: List[WorkerEvent] = []  # everything dispatched, for tests and logs

        self._queue: "queue.Queue[tuple]" = queue.Queue()
        self._reader: Optional[threading.Thread] = None
        self._result: Optional[Dict[str, Any]] = None
        self._error: Optional[Dict[str, Any]] = None
        self._log_tail: List[str] = []
        self._handler_error: Optional[str] = None
        self._kill_at: Optional[float] = None  # monotonic time of the pending hard kill
        self._abandon_at: Optional[float] = None  # give up waiting for EOF after a kill
        self._exit_status: Optional[int] = None
        self._started_at: Optional[float] = None
        self._streaming = False  # the launcher reads the output (no reader thread here)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ start
    @property
    def running(self) -> bool:
        return self._started_at is not None and self.outcome is None

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def start(self, launcher: Optional[Launcher] = None) -> "WorkerProcess":
        """Start the worker and a daemon thread that reads its stdout into the queue.

        ``launcher(command, env, cwd)`` must return a ``Popen``-like object whose ``stdout`` is
        a text stream with stderr merged in (``slicer.util.launchConsoleProcess`` with its
        default ``blocking=True`` does exactly this). Default: :mod:`subprocess`.
        """
        self._begin()
        try:
            self.process = (launcher or _popen_launcher)(self.command, self.env, self.cwd)
        except (OSError, ValueError, subprocess.SubprocessError) as error:
            self._fail_to_start(error)
            return self
        stream = getattr(self.process, "stdout", None)
        if stream is None:
            self._queue.put(("line", "The launcher returned a process without captured output; progress cannot be shown."))
        self._reader = threading.Thread(target=self._read_output, args=(stream,), name="SpineContextSeg worker reader", daemon=True)
        self._reader.start()
        return self

    def start_streaming(self, streaming_launcher: StreamingLauncher) -> "WorkerProcess":
        """Start with a launcher that reads the output itself and calls back per line.

        ``streaming_launcher(command, env, cwd, line_callback, exit_callback)`` returns the
        ``Popen``-like process. The callbacks may run on any thread; they only enqueue.
        Slicer 5.12+: ``launchConsoleProcess(command, updateEnvironment=env, cwd=cwd,
        blocking=False, logCallback=line_callback, completedCallback=exit_callback)``.
        """
        self._begin()
        self._streaming = True
        try:
            self.process = streaming_launcher(self.command, self.env, self.cwd, self._enqueue_line, self._enqueue_exit)
        except (OSError, ValueError, subprocess.SubprocessError) as error:
            self._fail_to_start(error)
        return self

    def _begin(self) -> None:
        if self._started_at is not None:
            raise RuntimeError("a WorkerProcess runs once; create a new one")
        self._started_at = time.monotonic()
        if self.cancel_file and os.path.exists(self.cancel_file):
            os.remove(self.cancel_file)  # a stale file would cancel the new run at once

    def _fail_to_start(self, error: BaseException) -> None:
        self._finish(
            WorkerOutcome(
                FAILED,
                WORKER_START_FAILED,
                f"Could not start the segmentation worker ({self.command[0]}): {error}",
                log_tail=list(self._log_tail),
            )
        )

    def _read_output(self, stream: Optional[IO[str]]) -> None:
        try:
            if stream is not None:
                while True:
                    try:
                        line = stream.readline()
                    except UnicodeDecodeError:
                        continue
                    except (OSError, ValueError):
                        break  # pipe closed under us (killed)
                    if not line:
                        break
                    self._queue.put(("line", line.rstrip("\r\n")))
            status = self.process.wait()
        except Exception as error:  # never let the thread die silently
            self._queue.put(("line", f"(reading the worker output failed: {error})"))
            status = self.process.poll() if self.process is not None else None
        self._queue.put(("exit", status))

    def _enqueue_line(self, line: str) -> None:
        self._queue.put(("line", str(line).rstrip("\r\n")))

    def _enqueue_exit(self, status: Optional[int]) -> None:
        self._queue.put(("exit", status))

    # ------------------------------------------------------------------ control
    def cancel(self) -> None:
        """Ask the worker to stop (cancel file); schedule a hard kill after ``grace_s``."""
        if self.finished or self.cancel_requested:
            return
        self.cancel_requested = True
        if self.cancel_file:
            try:
                with open(self.cancel_file, "w", encoding="utf-8") as handle:
                    handle.write("cancel\n")
            except OSError:
                self._kill_at = time.monotonic()  # cannot ask politely: kill now
                return
        self._kill_at = time.monotonic() + self.grace_s

    def kill(self) -> None:
        """Kill the real worker (reported PID) and then the launcher process, now."""
        if self.finished:
            return
        self.killed = True
        self._kill_at = None
        launcher_alive = self.process is not None and self.process.poll() is None
        # The reported PID is only trusted while our launcher is alive, so a recycled PID of an
        # unrelated program is never signalled.
        if self.worker_pid and (launcher_alive or self.worker_pid == getattr(self.process, "pid", None)):
            kill_pid(self.worker_pid)
        if launcher_alive:
            try:
                self.process.kill()
            except OSError:
                pass
        # A grandchild may keep the pipe open; do not wait for EOF forever.
        self._abandon_at = time.monotonic() + max(2.0, self.grace_s)

    # ------------------------------------------------------------------ events
    def poll(self) -> List[WorkerEvent]:
        """Dispatch queued output as events; enforce deadlines. Call from one thread only."""
        dispatched: List[WorkerEvent] = []
        if self.finished:
            return dispatched
        while True:
            try:
                kind, value = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "line":
                event = self._parse(value)
                if event is not None:
                    self._dispatch(event)
                    dispatched.append(event)
            else:
                self._exit_status = value
                dispatched.append(self._finish(self._decide_outcome(value)))
                return dispatched
        now = time.monotonic()
        if self._kill_at is not None and now >= self._kill_at:
            self.kill()
        elif self.killed and self._streaming and self.process is not None and self.process.poll() is not None:
            # The launcher's own reader delivers the exit through the GUI event loop, which may
            # not run now (scene close, quit): the process is gone, so finish without it.
            dispatched.append(self._finish(self._decide_outcome(self.process.poll())))
        elif self._abandon_at is not None and now >= self._abandon_at:
            status = self.process.poll() if self.process is not None else None
            dispatched.append(self._finish(self._decide_outcome(status)))
        return dispatched

    def wait(
        self,
        timeout_s: Optional[float] = None,
        *,
        idle: Optional[Callable[[], None]] = None,
        interval_s: float = 0.05,
    ) -> WorkerOutcome:
        """Poll until the run finishes; ``idle()`` runs between polls (e.g. ``slicer.app.processEvents``).

        On ``timeout_s`` the run is cancelled (cancel file, then kill) and waited for.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.finished:
            self.poll()
            if self.finished:
                break
            if deadline is not None and time.monotonic() > deadline and not self.cancel_requested:
                self.cancel()
            if idle is not None:
                idle()
            time.sleep(interval_s)
        assert self.outcome is not None
        return self.outcome

    def _parse(self, line: str) -> Optional[WorkerEvent]:
        message = decode_message(line)
        if message is None:
            if not line.strip():
                return None
            self._remember(line)
            return WorkerEvent("log", line=line)
        kind = str(message.get("type"))
        if kind == "started":
            pid = message.get("pid")
            if isinstance(pid, int):
                self.worker_pid = pid
        elif kind == "result":
            self._result = message
            # The result is in; a worker that hangs on exit must not block the GUI.
            if self._kill_at is None:
                self._kill_at = time.monotonic() + self.grace_s
        elif kind == "error":
            self._error = message
        elif kind not in ("progress", "warning"):
            self._remember(line)
            return WorkerEvent("log", message=message, line=line)
        if kind in ("warning", "error"):
            self._remember(line)
        return WorkerEvent(kind, message=message, line=line)

    def _remember(self, line: str) -> None:
        self._log_tail.append(line)
        del self._log_tail[:-LOG_TAIL_LINES]

    def _dispatch(self, event: WorkerEvent) -> None:
        self.events.append(event)
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception as error:  # a GUI bug must not leave the worker running untracked
            text = f"{type(error).__name__}: {error}"
            self._remember(f"(event handler failed on {event.kind}: {text})")
            if event.kind in ("result", "finished") and self._handler_error is None:
                self._handler_error = text

    def _decide_outcome(self, status: Optional[int]) -> WorkerOutcome:
        tail = list(self._log_tail)
        if self._error is not None and self._result is None:
            code = str(self._error.get("code", "internal"))
            message = str(self._error.get("message", "")) or "The worker reported an error."
            exit_status = self._error.get("exit_status", status)
            if code in ("cancelled", "terminated") and (self.cancel_requested or code == "cancelled"):
                return WorkerOutcome(CANCELLED, code, "Cancelled; no result was imported.", exit_status, log_tail=tail)
            return WorkerOutcome(FAILED, code, message, exit_status, log_tail=tail)
        if self._result is not None:
            return WorkerOutcome(SUCCEEDED, "", "Segmentation finished.", status, result=self._result, log_tail=tail)
        if self.cancel_requested:
            how = " (the worker did not stop in time and was killed)" if self.killed else ""
            return WorkerOutcome(CANCELLED, "cancelled", f"Cancelled{how}; no result was imported.", status, log_tail=tail)
        last = next((line for line in reversed(tail) if line.strip()), "")
        hint = f" Last output: {last}" if last else ""
        if status is None or (isinstance(status, int) and status < 0) or self.killed:
            how = f"killed by {signal_name(-status)}" if isinstance(status, int) and status < 0 else "killed"
            return WorkerOutcome(
                FAILED,
                WORKER_DIED,
                f"The segmentation worker died ({how}) before it finished; often the computer ran out of memory.{hint}",
                status,
                log_tail=tail,
            )
        if status != 0:
            return WorkerOutcome(
                FAILED,
                WORKER_EXITED,
                f"The segmentation worker stopped with exit status {status} without reporting an error.{hint}",
                status,
                log_tail=tail,
            )
        return WorkerOutcome(FAILED, WORKER_NO_RESULT, f"The segmentation worker exited without a result.{hint}", status, log_tail=tail)

    def _finish(self, outcome: WorkerOutcome) -> WorkerEvent:
        with self._lock:
            if self.outcome is not None:  # pragma: no cover - single-threaded by contract
                return WorkerEvent("finished", outcome=self.outcome)
            if outcome.succeeded and self._handler_error is not None:
                outcome = dataclasses.replace(
                    outcome,
                    status=FAILED,
                    code=RESULT_IMPORT_FAILED,
                    message=f"The worker succeeded but importing its result failed: {self._handler_error}",
                )
            self.outcome = outcome
        if self.process is not None and self.process.poll() is None:
            # Finished by an abandon timeout or an early exit event: make sure nothing lingers.
            try:
                self.process.kill()
            except OSError:
                pass
        event = WorkerEvent("finished", outcome=outcome)
        try:
            self._dispatch(event)
            if outcome.succeeded and self._handler_error is not None:
                # the result could not be imported: report that instead of success
                self.outcome = dataclasses.replace(
                    outcome,
                    status=FAILED,
                    code=RESULT_IMPORT_FAILED,
                    message=f"The worker succeeded but importing its result failed: {self._handler_error}",
                )
                event.outcome = self.outcome
        finally:
            self.remove_temp_dir()
        return event

    def remove_temp_dir(self) -> None:
        if self.temp_dir and not self.keep_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
