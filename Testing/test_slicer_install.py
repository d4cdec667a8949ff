"""The Slicer module's first-run install and ``pip install .``: which engine each machine gets.

OpenVINO (the fast CPU engine) where PyPI has its wheels, ONNX Runtime everywhere as the
fallback, onnxruntime-gpu for the GPU. The module is loaded with small stand-ins for Qt and
Slicer (no slicer-core needed), and pip, the installed packages and the platform are faked:
nothing is installed.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import subprocess
import sys
import types

import pytest

from conftest import PlainTextLog, scripted_module_stubs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(ROOT, "SpineContextSeg")
MODULE_PY = os.path.join(MODULE_DIR, "SpineContextSeg.py")
PYPROJECT = os.path.join(ROOT, "pyproject.toml")
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)

from SpineContextSegSlicerLib import install  # noqa: E402  (imports no Slicer: it looks slicer and qt up when called)

#: The distributions the fake environment decides about; everything else is the real one.
FAKED = {"onnxruntime", "onnxruntime-gpu", "openvino", "tqdm"}
#: Module name -> distribution (onnxruntime-gpu installs the module ``onnxruntime``).
PROVIDES = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "openvino": ("openvino",), "tqdm": ("tqdm",)}


class _Settings:
    """Stands in for ``qt.QSettings`` (one store per test)."""

    store: dict = {}

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value):
        self.store[key] = value


class FakeSlicer:
    """What a test sees and steers: installed distributions, dialogs, pip calls."""

    def __init__(self):
        self.installed = set()
        self.failing = set()  # distributions whose pip install fails
        self.confirm = True  # the user's answer to the install dialog
        self.confirmations = []  # texts of the install dialogs shown
        self.dialogs = []  # error dialogs
        self.pip_calls = []  # (requirements, keyword arguments)


def distribution(requirement: str) -> str:
    return requirement.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip()


@pytest.fixture
def fake(monkeypatch):
    """The module, loaded with stand-ins, on a faked Linux x86_64 with nothing of ours installed."""
    state = FakeSlicer()
    _Settings.store = {}

    real_find_spec, real_version = importlib.util.find_spec, importlib.metadata.version

    def find_spec(name, *args, **kwargs):
        if name in PROVIDES:
            return object() if any(d in state.installed for d in PROVIDES[name]) else None
        return real_find_spec(name, *args, **kwargs)

    def version(name):
        if name in FAKED:
            if name not in state.installed:
                raise importlib.metadata.PackageNotFoundError(name)
            return "1.0"
        return real_version(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")

    def pip_install(requirements, constraints=None, requester=None, show_progress=True, **kwargs):
        """As Slicer 5.12 behaves: with its progress dialog, a failure ends in an error dialog."""
        state.pip_calls.append((list(requirements), dict(show_progress=show_progress)))
        assert constraints and os.path.isfile(constraints) and requester == "SpineContextSeg"
        names = {distribution(r) for r in requirements}
        if names & state.failing:
            if show_progress:
                state.dialogs.append("Package installation failed.")
            raise subprocess.CalledProcessError(1, "pip install")
        state.installed |= names

    def pip_install_58(arguments):
        """Slicer 5.8-5.10: ``slicer.util.pip_install``, no dialog of its own."""
        requirements = arguments[: arguments.index("--constraint")]
        state.pip_calls.append((requirements, {}))
        names = {distribution(r) for r in requirements}
        if names & state.failing:
            raise subprocess.CalledProcessError(1, "pip install")
        state.installed |= names

    def pip_uninstall(names):
        state.installed -= set(names.split())

    def confirm(text, **kwargs):
        state.confirmations.append(text)
        return state.confirm

    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = type("VTKObservationMixin", (), {"__init__": lambda self: None})
    util.pip_install, util.pip_uninstall = pip_install_58, pip_uninstall
    util.confirmOkCancelDisplay = confirm
    util.errorDisplay = lambda text, **kwargs: state.dialogs.append(text)
    util.WaitCursor = contextlib.nullcontext
    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_install = pip_install
    slicer = types.ModuleType("slicer")
    slicer.util, slicer.packaging = util, packaging
    slicer.vtkMRMLScalarVolumeNode = type("vtkMRMLScalarVolumeNode", (), {})
    slicer.vtkMRMLSegmentationNode = type("vtkMRMLSegmentationNode", (), {})
    slicer.app = types.SimpleNamespace(testingEnabled=lambda: False, connect=lambda *args: None)
    stubs = scripted_module_stubs()
    qt = types.ModuleType("qt")
    qt.QSettings = _Settings
    stubs.update({"qt": qt, "ctk": types.ModuleType("ctk"), "vtk": types.ModuleType("vtk"), "slicer": slicer, "slicer.util": util, "slicer.packaging": packaging})
    for name, stub in stubs.items():
        monkeypatch.setitem(sys.modules, name, stub)
    spec = importlib.util.spec_from_file_location("SpineContextSeg", MODULE_PY)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "SpineContextSeg", module)
    spec.loader.exec_module(module)
    state.module, state.slicer = module, slicer
    state.installed.add("tqdm")

    def use_slicer_58():
        monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # import fails, as on 5.8-5.10

    state.use_slicer_58 = use_slicer_58
    return state


def make_widget(fake):
    widget = fake.module.SpineContextSegWidget()
    widget.logic = fake.module.SpineContextSegLogic()
    widget.ui = types.SimpleNamespace(statusLabel=types.SimpleNamespace(text="", styleSheet=""), logTextEdit=PlainTextLog(),
                                      logCollapsibleButton=types.SimpleNamespace(collapsed=True))
    return widget


# ----------------------------------------------------------------------------- what is missing
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cpu_on_linux_x86_64_gets_openvino_and_onnxruntime(fake, device):
    requirements, uninstall = fake.module.SpineContextSegLogic.missingDependencies(device)
    assert requirements == ["onnxruntime>=1.16", "openvino>=2024.0"] and uninstall == []
    fake.installed.discard("tqdm")
    requirements, _uninstall = fake.module.SpineContextSegLogic.missingDependencies(device)
    assert requirements == ["onnxruntime>=1.16", "openvino>=2024.0", "tqdm>=4.60"]


@pytest.mark.parametrize("system, machine", [("linux", "aarch64"), ("win32", "AMD64"), ("darwin", "arm64"), ("darwin", "x86_64")])
def test_openvino_on_every_platform_with_wheels(fake, monkeypatch, system, machine):
    monkeypatch.setattr(sys, "platform", system)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert "openvino>=2024.0" in fake.module.SpineContextSegLogic.missingDependencies("cpu")[0]


@pytest.mark.parametrize("system, machine", [("linux", "ppc64le"), ("linux", "s390x"), ("win32", "ARM64"), ("win32", "x86"), ("linux", "i686")])
def test_unsupported_platform_gets_only_onnxruntime(fake, monkeypatch, system, machine):
    monkeypatch.setattr(sys, "platform", system)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert fake.module.SpineContextSegLogic.missingDependencies("cpu") == (["onnxruntime>=1.16"], [])


def test_gpu_gets_onnxruntime_gpu_and_no_openvino(fake):
    missing = fake.module.SpineContextSegLogic.missingDependencies
    assert missing("cuda") == (["onnxruntime-gpu>=1.16"], [])
    fake.installed.add("onnxruntime")
    assert missing("cuda") == (["onnxruntime-gpu>=1.16"], ["onnxruntime"])
    fake.installed = {"onnxruntime-gpu", "tqdm"}
    assert missing("cuda") == ([], [])
    assert missing("auto") == ([], [])  # onnxruntime-gpu's auto runs on the GPU: OpenVINO is not offered


def test_nothing_missing_with_both_engines(fake):
    fake.installed |= {"onnxruntime", "openvino"}
    assert fake.module.SpineContextSegLogic.missingDependencies("cpu") == ([], [])


# ----------------------------------------------------------------------------- the install
def test_first_run_installs_both_engines_openvino_on_its_own(fake):
    widget = make_widget(fake)
    assert widget.ensureDependencies("cpu") is True
    assert len(fake.confirmations) == 1 and "openvino>=2024.0" in fake.confirmations[0]
    # ONNX Runtime first (required), then OpenVINO alone and without Slicer's progress dialog
    assert fake.pip_calls == [(["onnxruntime>=1.16"], {"show_progress": True}), (["openvino>=2024.0"], {"show_progress": False})]
    assert {"onnxruntime", "openvino"} <= fake.installed and fake.dialogs == []


@pytest.mark.parametrize("slicer_version", ["5.12", "5.8"])
def test_failed_openvino_install_falls_back_to_onnxruntime_without_an_error_dialog(fake, caplog, slicer_version):
    if slicer_version == "5.8":
        fake.use_slicer_58()
    fake.failing.add("openvino")
    widget = make_widget(fake)
    with caplog.at_level(logging.WARNING):
        assert widget.ensureDependencies("cpu") is True  # the run goes ahead
    assert fake.dialogs == []
    assert "onnxruntime" in fake.installed and "openvino" not in fake.installed
    assert "ONNX Runtime" in widget.ui.statusLabel.text and widget.ui.statusLabel.styleSheet == ""  # a message, not an error
    assert "openvino" in widget.ui.logTextEdit.toPlainText()
    assert any("openvino" in r.getMessage() and "ONNX Runtime" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    # the next run neither asks again nor retries
    calls = len(fake.pip_calls)
    assert widget.ensureDependencies("cpu") is True
    assert len(fake.confirmations) == 1 and len(fake.pip_calls) == calls


def test_a_failed_onnxruntime_install_is_still_an_error(fake):
    fake.failing.add("onnxruntime")
    fake.use_slicer_58()  # 5.8 shows no dialog of its own: ours is the one
    widget = make_widget(fake)
    assert widget.ensureDependencies("cpu") is False
    assert len(fake.dialogs) == 1 and "Installing the Python packages failed" in widget.ui.statusLabel.text
    assert [call[0] for call in fake.pip_calls] == [["onnxruntime>=1.16"]]  # OpenVINO is not tried without its fallback


def test_openvino_is_offered_once_and_never_forced(fake):
    fake.installed.add("onnxruntime")
    fake.confirm = False
    widget = make_widget(fake)
    assert widget.ensureDependencies("cpu") is True  # declined: the run goes ahead on ONNX Runtime
    assert len(fake.confirmations) == 1 and "OpenVINO" in fake.confirmations[0] and fake.pip_calls == []
    assert widget.ensureDependencies("cpu") is True
    assert len(fake.confirmations) == 1  # asked once
    assert fake.module.SpineContextSegLogic.missingDependencies("cpu")[0] == ["openvino>=2024.0"]  # the logic still reports it


def test_openvino_offer_accepted_installs_it(fake):
    fake.installed.add("onnxruntime")
    widget = make_widget(fake)
    assert widget.ensureDependencies("auto") is True
    assert fake.pip_calls == [(["openvino>=2024.0"], {"show_progress": False})] and "openvino" in fake.installed


def test_declining_the_first_run_install_does_not_start_and_asks_again(fake):
    fake.confirm = False
    widget = make_widget(fake)
    assert widget.ensureDependencies("cpu") is False
    assert widget.ui.statusLabel.text.startswith("Not started: onnxruntime>=1.16 is required")
    assert widget.ensureDependencies("cpu") is False and len(fake.confirmations) == 2


# ----------------------------------------------------------------------------- pip install .
def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib (Python >= 3.11) or tomli")
    with open(PYPROJECT, "rb") as handle:
        return tomllib.load(handle)


def openvino_requirement():
    from packaging.requirements import Requirement

    found = [Requirement(r) for r in pyproject()["project"]["dependencies"] if Requirement(r).name == "openvino"]
    assert len(found) == 1, "openvino must be a default dependency"
    return found[0]


def marker_says(requirement, system: str, machine: str, python: str = "3.11") -> bool:
    return requirement.marker.evaluate({"sys_platform": system, "platform_machine": machine, "python_version": python, "python_full_version": python + ".0"})


def test_pyproject_installs_openvino_by_default_where_it_has_wheels():
    from packaging.markers import Marker

    requirement = openvino_requirement()
    assert str(requirement.specifier) == ">=2024.0" and requirement.marker is not None
    Marker(str(requirement.marker))  # parses on its own
    for python in ("3.9", "3.10", "3.11", "3.12"):
        assert marker_says(requirement, "linux", "x86_64", python)
    assert marker_says(requirement, "win32", "AMD64") and marker_says(requirement, "darwin", "arm64")
    for system, machine in (("linux", "ppc64le"), ("linux", "s390x"), ("win32", "ARM64"), ("linux", "armv7l")):
        assert not marker_says(requirement, system, machine)


def test_pyproject_keeps_the_openvino_extra():
    assert pyproject()["project"]["optional-dependencies"]["openvino"] == ["openvino>=2024.0"]


def test_pyproject_markers_and_the_module_name_the_same_platforms(fake):
    requirement = openvino_requirement()
    candidates = [(s, m) for s in ("linux", "win32", "darwin") for m in ("x86_64", "AMD64", "aarch64", "arm64", "ARM64", "ppc64le", "i686", "x86")]
    for system, machine in candidates:
        assert marker_says(requirement, system, machine) == ((system, machine) in install.OPENVINO_PLATFORMS), (system, machine)
    assert install.OPENVINO_REQUIREMENT == "openvino" + str(requirement.specifier)
