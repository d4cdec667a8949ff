"""Everything of the SpineContextSeg module that is not its panel; ``SpineContextSeg.py`` imports these on first use.

Pure Python, tested without Slicer:

``worker_command``    the worker's command line, environment and run folder.
``worker_events``     what the worker reports: events, the outcome of a run, progress text.
``worker_process``    start, watch, cancel and kill the segmentation worker.

Against MRML (``slicer`` + VTK; in CI the PyPI ``slicer-core``), without Qt:

``mrml_io``           volume export, label-map import, surfaces and STL export (every function
                      takes its nodes or an explicit scene; no ``qt``, no ``slicer.app``).
``segmentation_run``  one run inside Slicer: export, worker, polling on the GUI thread, stop on
                      scene close or quit, result import (``qt`` only for the polling timer).
``model_import``      the user's models folder; importing a model into it.
``stl_export``        STL export of all segments or a vertebra subset.

Slicer's application and GUI:

``install``           the worker's Python packages: what is missing, pip installs, OpenVINO
                      platforms, the first-run dialogs.
``parameters``        the panel's parameter node, its choices and defaults, the logic's options.
``selftest``          the steps of the module's self-test (``SpineContextSegTest``).

Importing this package makes :mod:`SpineContextSegLib` importable: in an installed extension
it sits next to the module folder's contents; in a source checkout it is one folder up. When
it is missing (an incomplete install) the modules that use it raise that ``ImportError`` when
they are imported; ``install`` and ``parameters`` do not need it.
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


try:
    ensure_library_importable()
except ImportError:  # an incomplete install: raised again where the library is needed (mrml_io, worker_events, worker_process)
    pass
