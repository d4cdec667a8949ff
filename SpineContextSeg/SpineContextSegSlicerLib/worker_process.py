"""Run the segmentation worker in a child process; turn its JSON lines into events.

Pure Python (no ``qt``, no ``slicer``), so the whole life cycle is tested by pytest:

1. :func:`~SpineContextSegSlicerLib.worker_command.build_worker_command` makes the command
   line of ``python -m SpineContextSegLib.worker`` (inside Slicer ``python`` is ``PythonSlicer``).
2. :class:`WorkerProcess` starts it, either with :mod:`subprocess` (the default), with a
   *launcher* that returns a ``Popen`` whose stdout this class reads on a daemon thread, or
   with a *streaming launcher* that delivers the lines itself (Slicer 5.12+
   ``launchConsoleProcess(blocking=False, logCallback=..., completedCallback=...)``).
   Lines and the exit status go into one :class:`queue.Queue`.
3. The owner calls :meth:`WorkerProcess.poll` on its own thread (Slicer: a ``QTimer`` on the
   GUI thread; scripts: :meth:`WorkerProcess.wait`). ``poll`` parses the queued lines into
   :class:`~SpineContextSegSlicerLib.worker_events.WorkerEvent` objects and hands them to
   ``on_event`` on that thread, so a handler may touch MRML. It also enforces the cancel grace
   period.
4. Cancel: write the cancel file (the worker stops between tiles and exits with status 20);
   if it is still running after ``grace_s``, kill the PID it reported in its ``started`` line
   (the real Python: ``PythonSlicer`` is a launcher that starts it as a child) and then the
   launcher process.
5. Every ending (success, error line, non-zero exit, death by a signal, cancel, a failed
   start) produces exactly one ``finished`` event carrying a
   :class:`~SpineContextSegSlicerLib.worker_events.WorkerOutcome`; the temporary folder is
   removed right after that event's handlers ran.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Any, Callable, Dict, List, Optional, Sequence

from . import ensure_library_importable

ensure_library_importable()

from SpineContextSegLib.progress import decode_message  # noqa: E402

from .worker_events import (  # noqa: E402
    CANCELLED,
    FAILED,
    RESULT_IMPORT_FAILED,
    SUCCEEDED,
    WORKER_DIED,
    WORKER_EXITED,
    WORKER_NO_RESULT,
    WORKER_START_FAILED,
    WorkerEvent,
    WorkerOutcome,
)

#: Lines kept for messages and for the log of a failed run.
LOG_TAIL_LINES = 40

Launcher = Callable[[List[str], Optional[Dict[str, str]], Optional[str]], Any]
StreamingLauncher = Callable[
    [List[str], Optional[Dict[str, str]], Optional[str], Callable[[str], None], Callable[[int], None]], Any
]


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
        From :func:`~SpineContextSegSlicerLib.worker_command.build_worker_command` (or any
        program speaking the protocol).
    temp_dir : str, optional
        The run's private folder (input export, output mask, cancel file); removed after the
        ``finished`` event, whatever the ending. ``None``: nothing to remove.
    cancel_file : str, optional
        Path the worker watches (``--cancel-file``); :meth:`cancel` creates it.
    env : dict, optional
        Variables to add to the environment (see
        :func:`~SpineContextSegSlicerLib.worker_command.worker_environment`).
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
