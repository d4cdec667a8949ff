"""Slicer-side helpers of the SpineContextSeg module that are testable without Qt.

``worker_process``  start, watch, cancel and kill the segmentation worker (pure Python).
``mrml_io``         volume export, label-map import, surfaces and STL export (``slicer`` + VTK,
                    every function takes its nodes or an explicit scene; no ``qt``, no ``slicer.app``).

Importing this package makes :mod:`SpineContextSegLib` importable: in an installed extension
it sits next to the module folder's contents; in a source checkout it is one folder up.
"""
from __future__ import annotations

import os
import sys

#: The scripted module folder (the one holding ``SpineContextSeg.py``).
MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def library_parent_dir(module_dir: str = MODULE_DIR) -> str:
    """The folder that contains the ``SpineContextSegLib`` package.

    Installed extension: the module folder itself (CMake installs the library next to the
    module). Source tree: the repository root, one level above the module folder.
    """
    for candidate in (module_dir, os.path.dirname(module_dir)):
        if os.path.isfile(os.path.join(candidate, "SpineContextSegLib", "__init__.py")):
            return candidate
    raise ImportError(
        f"SpineContextSegLib was not found next to {module_dir} or one folder above it; "
        "the extension is incompletely installed. Reinstall SpineContextSeg."
    )


def ensure_library_importable(module_dir: str = MODULE_DIR) -> str:
    """Put :func:`library_parent_dir` on ``sys.path`` (once) and return it."""
    parent = library_parent_dir(module_dir)
    if parent not in sys.path:
        sys.path.insert(0, parent)
    return parent


ensure_library_importable()
