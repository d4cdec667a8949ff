"""What the module starts: the worker's command line, its environment and the run's folder.

Pure Python (no ``qt``, no ``slicer``). :class:`~SpineContextSegSlicerLib.worker_process.WorkerProcess`
runs the command; inside Slicer ``python`` is ``PythonSlicer``.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Optional

WORKER_MODULE = "SpineContextSegLib.worker"
DEVICES = ("auto", "cpu", "cuda")
TASKS = ("spine", "vertebrae")


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
