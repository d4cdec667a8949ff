"""Progress reporting and the JSON-line protocol the Slicer module reads.

With ``--progress json`` every line on stdout is one JSON object with a ``type``:

``started``   ``{"type": "started", "pid": 1234, "version": "0.1.0"}`` (first line; the PID of
              the real Python process, which is what a GUI must kill on a hard cancel)
``progress``  ``{"type": "progress", "stage": "network", "done": 3, "total": 12, "eta_s": 4.1}``
``warning``   ``{"type": "warning", "code": "input_not_ct", "message": "..."}``
``result``    ``{"type": "result", "outputs": {...}, "labels": [...], "timings_s": {...}}`` (last line on success)
``error``     ``{"type": "error", "code": "input_unreadable", "message": "...", "exit_status": 10}``

Stages, in order: ``read``, ``preprocess``, ``network``, ``stitch``, ``postprocess``,
``label`` (``--task vertebrae`` only), ``write``, ``mesh``, ``qc``.  ``eta_s`` is the estimated seconds left in the current
stage, or ``null`` when unknown. A cancelled run ends with an ``error`` line whose code
is ``cancelled`` (cancel file) or ``terminated`` (signal).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any, Dict, Optional

STAGES = ("read", "preprocess", "network", "stitch", "refine", "postprocess", "label", "write", "mesh", "qc")


def encode_message(message: Dict[str, Any]) -> str:
    """One protocol line (no newline); NaN is not valid JSON, so it never appears."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def decode_message(line: str) -> Optional[Dict[str, Any]]:
    """Parse one stdout line; ``None`` for anything that is not a protocol object (stray prints)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if not isinstance(message, dict) or "type" not in message:
        return None
    return message


class ProgressReporter:
    """Receives stage progress; subclasses decide how it is shown. The base shows nothing."""

    def __init__(self) -> None:
        self._stage: Optional[str] = None
        self._stage_started = 0.0

    def stage(self, name: str, done: int, total: int) -> None:
        now = time.monotonic()
        if name != self._stage:
            self._stage, self._stage_started = name, now
        eta_s = None
        if 0 < done < total:
            eta_s = round((now - self._stage_started) / done * (total - done), 1)
        elif done >= total:
            eta_s = 0.0
        self.emit({"type": "progress", "stage": name, "done": int(done), "total": int(total), "eta_s": eta_s})

    def warning(self, code: str, message: str) -> None:
        self.emit({"type": "warning", "code": code, "message": message})

    def emit(self, message: Dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonLineReporter(ProgressReporter):
    """Writes protocol lines to ``stream`` (stdout), flushing each one; throttles progress to ~5/s."""

    def __init__(self, stream: Optional[IO[str]] = None, min_interval_s: float = 0.2):
        super().__init__()
        self.stream = stream or sys.stdout
        self.min_interval_s = min_interval_s
        self._last_progress = 0.0

    def started(self, **fields: Any) -> None:
        from SpineContextSegLib import __version__

        self.emit({"type": "started", "pid": os.getpid(), "version": __version__, **fields})

    def emit(self, message: Dict[str, Any]) -> None:
        if message["type"] == "progress":
            now = time.monotonic()
            final = message["done"] >= message["total"] or message["done"] == 0
            if not final and now - self._last_progress < self.min_interval_s:
                return
            self._last_progress = now
        self.stream.write(encode_message(message) + "\n")
        self.stream.flush()


class BarReporter(ProgressReporter):
    """A tqdm bar per stage on stderr; warnings as plain lines."""

    def __init__(self, stream: Optional[IO[str]] = None):
        super().__init__()
        self.stream = stream or sys.stderr
        self._bar = None
        self._bar_stage: Optional[str] = None

    def emit(self, message: Dict[str, Any]) -> None:
        if message["type"] == "warning":
            self.stream.write(f"warning [{message['code']}]: {message['message']}\n")
            return
        if message["type"] != "progress":
            return
        from tqdm import tqdm

        if message["stage"] != self._bar_stage:
            self.close()
            self._bar = tqdm(total=message["total"], desc=f"{message['stage']:>11}", file=self.stream, leave=True)
            self._bar_stage = message["stage"]
        assert self._bar is not None
        self._bar.total = message["total"]
        self._bar.n = message["done"]
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar, self._bar_stage = None, None


class WarningsOnlyReporter(ProgressReporter):
    """No progress, but warnings still reach the user (stderr): silence must not hide them."""

    def __init__(self, stream: Optional[IO[str]] = None):
        super().__init__()
        self.stream = stream or sys.stderr

    def emit(self, message: Dict[str, Any]) -> None:
        if message["type"] == "warning":
            self.stream.write(f"warning [{message['code']}]: {message['message']}\n")


def make_reporter(kind: str) -> ProgressReporter:
    """``bar`` (humans), ``json`` (programs, the Slicer module) or ``none`` (warnings only)."""
    if kind == "json":
        return JsonLineReporter()
    if kind == "bar":
        return BarReporter()
    if kind == "none":
        return WarningsOnlyReporter()
    raise ValueError(f"unknown progress kind {kind!r}")
