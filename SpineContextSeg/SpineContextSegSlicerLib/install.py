"""The worker's Python packages: which are missing, installing them into Slicer's Python, and
the first-run dialogs that offer it (:func:`ensureDependencies`, for the panel).

ONNX Runtime (``onnxruntime``, or ``onnxruntime-gpu`` for the GPU) and tqdm are required;
OpenVINO, the fast CPU engine, is optional: offered once where PyPI has its wheels
(:data:`OPENVINO_PLATFORMS`), and ONNX Runtime does the work when it is declined or fails.
pip never replaces Slicer's own packages (:data:`PROTECTED_DISTRIBUTIONS`).

``slicer`` and ``qt`` are imported inside the functions that use them: importing this module
needs neither (nor ``SpineContextSegLib``), and every call uses the ``slicer`` loaded then.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

#: Packages the worker needs that Slicer does not bundle (numpy, SciPy, SimpleITK, VTK are bundled).
CPU_REQUIREMENTS = ["onnxruntime>=1.16", "tqdm>=4.60"]
GPU_RUNTIME = "onnxruntime-gpu>=1.16"
#: The fast CPU engine (about 3x ONNX Runtime on a CPU; reads the same model.onnx, picked by the
#: worker when importable). Optional: ONNX Runtime stays installed as the fallback.
OPENVINO_REQUIREMENT = "openvino>=2024.0"
#: (sys.platform, platform.machine()) where PyPI has OpenVINO wheels: the same set as the
#: markers of openvino in pyproject.toml (no wheels for Windows on ARM, ppc64le, s390x, 32-bit).
OPENVINO_PLATFORMS = {("linux", "x86_64"), ("linux", "aarch64"), ("win32", "AMD64"), ("darwin", "x86_64"), ("darwin", "arm64")}
#: Settings key: the OpenVINO install was offered (declined or failed: never asked again).
OPENVINO_OFFERED_SETTING = "SpineContextSeg/OpenVINOOffered"
#: Slicer's own packages: pip must never replace them while installing ours.
PROTECTED_DISTRIBUTIONS = ("numpy", "SimpleITK", "vtk", "scipy", "requests")


class DependencyInstallError(RuntimeError):
    """pip could not install the worker's packages.

    ``shownToUser``: Slicer has already shown this failure with pip's log in its own error dialog
    (``slicer.packaging.pip_install`` in Slicer 5.12+ does, outside testing mode), so the panel
    must not show a second one.
    """

    def __init__(self, message: str, *, shownToUser: bool = False) -> None:
        super().__init__(message)
        self.shownToUser = shownToUser


def _slicerPackaging():
    """``slicer.packaging`` (Slicer 5.12+), or None on 5.8-5.10."""
    import importlib

    try:
        return importlib.import_module("slicer.packaging")
    except ImportError:
        return None


def _pipInstall(packaging, requirements: List[str], constraints: str, *, showProgress: bool = True) -> None:
    """pip-install through ``slicer.packaging`` (5.12+) or ``slicer.util`` (5.8-5.10); raises ``CalledProcessError``."""
    if packaging is not None:
        quiet = {} if showProgress else {"show_progress": False}  # busy cursor only, and no error dialog
        packaging.pip_install(list(requirements), constraints=constraints, requester="SpineContextSeg", **quiet)
    else:
        import slicer

        slicer.util.pip_install(list(requirements) + ["--constraint", constraints])


def openVinoSupported() -> bool:
    """Whether PyPI has OpenVINO wheels for this computer (else ONNX Runtime is the only CPU engine)."""
    import platform

    return (sys.platform, platform.machine()) in OPENVINO_PLATFORMS


def openVinoOffered() -> bool:
    """Whether the OpenVINO install was offered before (it is offered once, never forced)."""
    import qt

    return str(qt.QSettings().value(OPENVINO_OFFERED_SETTING, "false")).lower() == "true"


def rememberOpenVinoOffered() -> None:
    import qt

    qt.QSettings().setValue(OPENVINO_OFFERED_SETTING, "true")


def _slicerShowsPipErrors(packaging) -> bool:
    """Whether ``packaging.pip_install`` shows its own error dialog when pip fails.

    Slicer 5.12+ does (blocking install with a progress dialog, the default), except in testing
    mode, where it installs without any UI. Slicer 5.8-5.10 (no ``slicer.packaging``) never does.
    """
    if packaging is None:
        return False
    import slicer

    testingEnabled = getattr(slicer.app, "testingEnabled", None)
    try:
        return not (testingEnabled() if callable(testingEnabled) else False)
    except Exception:
        return True


def missingDependencies(device: str = "auto"):
    """``(requirements to install, distributions to uninstall first)`` for the worker on ``device``.

    ``OPENVINO_REQUIREMENT`` among them is optional (see ``installDependencies``). Looks at
    installed package metadata only; imports nothing.
    """
    import importlib.util

    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python < 3.8
        metadata = None

    def installed(distribution: str) -> bool:
        if metadata is None:
            return False
        try:
            metadata.version(distribution)
            return True
        except metadata.PackageNotFoundError:
            return False

    requirements, uninstall = [], []
    wantGpu = device == "cuda" and sys.platform != "darwin"  # no CUDA builds for macOS
    hasRuntime = importlib.util.find_spec("onnxruntime") is not None
    if wantGpu and not installed("onnxruntime-gpu"):
        requirements.append(GPU_RUNTIME)
        if installed("onnxruntime"):
            uninstall.append("onnxruntime")
    elif not hasRuntime:
        requirements.append(CPU_REQUIREMENTS[0])
    # The fast CPU engine, where it has wheels; not for CUDA runs (and onnxruntime-gpu's auto is the GPU).
    if device != "cuda" and not installed("onnxruntime-gpu") and openVinoSupported() and importlib.util.find_spec("openvino") is None:
        requirements.append(OPENVINO_REQUIREMENT)
    if importlib.util.find_spec("tqdm") is None:
        requirements.append(CPU_REQUIREMENTS[1])
    return requirements, uninstall


def installDependencies(requirements: List[str], uninstall: Optional[List[str]] = None) -> List[str]:
    """pip-install ``requirements`` into Slicer's Python, pinning Slicer's own packages.

    A constraints file fixes the installed versions of numpy, SimpleITK, VTK, SciPy and
    requests, so a dependency can never replace them.

    OpenVINO (``OPENVINO_REQUIREMENT``) is installed last, on its own: if that fails (no wheel
    for this Python or numpy, no network), a warning is logged and ONNX Runtime does the work.
    Returns the optional requirements that could not be installed.

    Raises ``DependencyInstallError`` when pip fails for a required package; its ``shownToUser``
    says whether Slicer (5.12+) already showed the failure in its own dialog.
    """
    import subprocess
    import tempfile

    from importlib import metadata

    import slicer

    optional = [r for r in requirements if r == OPENVINO_REQUIREMENT]
    required = [r for r in requirements if r not in optional]
    pins = []
    for distribution in PROTECTED_DISTRIBUTIONS:
        try:
            pins.append(f"{distribution}=={metadata.version(distribution)}")
        except metadata.PackageNotFoundError:
            pass
    folder = tempfile.mkdtemp(prefix="scs-pip-")
    constraints = os.path.join(folder, "constraints.txt")
    with open(constraints, "w", encoding="utf-8") as handle:
        handle.write("\n".join(pins) + "\n")
    packaging = _slicerPackaging()  # Slicer 5.12+
    failed = []
    try:
        if uninstall:
            try:
                slicer.util.pip_uninstall(" ".join(uninstall))
            except subprocess.CalledProcessError as error:  # no dialog from Slicer for an uninstall
                raise DependencyInstallError(
                    f"pip could not uninstall {', '.join(uninstall)} (exit status {error.returncode}). See the Python console for pip's output."
                ) from error
        try:
            if required:
                _pipInstall(packaging, required, constraints)
        except subprocess.CalledProcessError as error:
            raise DependencyInstallError(
                f"pip could not install {', '.join(required)} (exit status {error.returncode}). "
                "See pip's log (Python console) for the reason: often no network or a proxy.",
                shownToUser=_slicerShowsPipErrors(packaging),
            ) from error
        for requirement in optional:
            try:
                # without Slicer 5.12's progress dialog, which would end a failure with an error dialog
                _pipInstall(packaging, [requirement], constraints, showProgress=False)
            except subprocess.CalledProcessError as error:
                logging.warning(
                    f"SpineContextSeg: pip could not install {requirement} (exit status {error.returncode}; pip's output is in the Python console). "
                    "Segmentation uses ONNX Runtime instead, which is slower on the CPU."
                )
                failed.append(requirement)
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    import importlib

    importlib.invalidate_caches()
    still, _uninstall = missingDependencies("cuda" if any(r.startswith("onnxruntime-gpu") for r in requirements) else "auto")
    failed += [r for r in still if r in optional and r not in failed]  # pip "succeeded" but it is not importable
    still = [r for r in still if r != OPENVINO_REQUIREMENT]
    if still:
        raise DependencyInstallError(f"pip finished but these are still missing: {', '.join(still)}. See the Python console for pip's output.")
    return failed


def ensureDependencies(panel, device: str) -> bool:
    """Check the worker's Python packages; offer to install the missing ones (never silently).

    OpenVINO, the fast CPU engine, is offered once and never required: declined or failed,
    ONNX Runtime segments. ``panel``: the module's widget (its ``logic``, ``setStatus``,
    ``appendLog`` and ``showError``). Returns whether the run may go ahead.
    """
    import slicer
    from slicer.i18n import tr as _

    requirements, uninstall = panel.logic.missingDependencies(device)
    if OPENVINO_REQUIREMENT in requirements and openVinoOffered():
        requirements = [r for r in requirements if r != OPENVINO_REQUIREMENT]
    if not requirements:
        return True
    withOpenVino = OPENVINO_REQUIREMENT in requirements
    if requirements == [OPENVINO_REQUIREMENT]:  # ONNX Runtime is there: the run goes ahead either way
        text = _(
            "OpenVINO makes segmentation on the CPU about 3 times faster than ONNX Runtime, which is installed.\n\n"
            "Install OpenVINO now? This downloads about 50 MB. Slicer's own packages (numpy, SimpleITK, VTK) are not changed.\n\n"
            "If you choose Cancel, SpineContextSeg uses ONNX Runtime and does not ask again."
        )
        rememberOpenVinoOffered()
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Install OpenVINO")):
            panel.appendLog(_("OpenVINO not installed: segmenting with ONNX Runtime."))
            return True
    else:
        text = _(
            "SpineContextSeg needs these Python packages, which are not installed yet:\n\n    {packages}\n\n"
            "Install them now? This downloads about 20-300 MB and can take a few minutes. "
            "Slicer's own packages (numpy, SimpleITK, VTK) are not changed."
        ).format(packages="\n    ".join(requirements))
        if withOpenVino:
            text += "\n\n" + _("OpenVINO is the fast engine on the CPU; if it cannot be installed, ONNX Runtime does the work.")
        if uninstall:
            text += "\n\n" + _("{old} will be replaced by {new} (they cannot be installed together).").format(old=", ".join(uninstall), new=GPU_RUNTIME.split(">")[0])
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Install Python packages")):
            required = [r for r in requirements if r != OPENVINO_REQUIREMENT]
            panel.setStatus(_("Not started: {packages} is required. Install it, or choose Device: CPU.").format(packages=", ".join(required)), error=True)
            return False
        if withOpenVino:
            rememberOpenVinoOffered()  # asked once: a failed install is not retried on every run
    panel.setStatus(_("Installing {packages}\u2026").format(packages=", ".join(requirements)))
    try:
        with slicer.util.WaitCursor():
            failed = panel.logic.installDependencies(requirements, uninstall=uninstall) or []
    except Exception as error:
        # Slicer 5.12+ already showed pip's failure (with its log) in its own dialog: one dialog, not two.
        panel.showError(_("Installing the Python packages failed"), error, dialog=not getattr(error, "shownToUser", False))
        return False
    installed = [r for r in requirements if r not in failed]
    if installed:
        panel.setStatus(_("Installed {packages}.").format(packages=", ".join(installed)))
    if failed:  # not an error: the run goes ahead on ONNX Runtime
        panel.setStatus(_("{packages} could not be installed (see the Python console): segmenting with ONNX Runtime, which is slower on the CPU.").format(
            packages=", ".join(failed)))
    return True
