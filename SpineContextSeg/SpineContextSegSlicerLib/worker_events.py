"""What the worker reports, as the module sees it: events, the outcome of a run, progress text.

Pure Python (no ``qt``, no ``slicer``). :class:`~SpineContextSegSlicerLib.worker_process.WorkerProcess`
turns the worker's JSON lines into :class:`WorkerEvent` objects and every ending into one
:class:`WorkerOutcome`; the panel shows :meth:`WorkerEvent.describe` and :func:`overall_fraction`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional

from . import ensure_library_importable

ensure_library_importable()

from SpineContextSegLib.errors import ERROR_CODES, SegmentationError  # noqa: E402
from SpineContextSegLib.progress import STAGES  # noqa: E402

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

    The network stage dominates; naming the vertebrae (``label``, per-vertebra runs only) takes
    seconds too, so the bar moves through it. A stage this table does not know reports its own fraction.
    """
    weights = {"read": 3, "preprocess": 5, "network": 55, "stitch": 4, "refine": 15, "postprocess": 8, "label": 10, "write": 4, "mesh": 4, "qc": 2}
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
