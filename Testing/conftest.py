"""Shared fixtures: a tiny randomly initialised model (exported once per session) and small CTs."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from SpineContextSegLib.inference.engine import InferenceEngine  # noqa: E402  (after the path is set)

SAMPLE_CT = os.path.join(ROOT, "SpineContextSegLib", "resources", "sample", "ct.nii.gz")


def make_tiny_model(directory: str, *, spacing_mm=(4.0, 4.0, 4.0), patch_size=(16, 32, 32), seed: int = 0, bias: float = 0.0):
    """Export a small SpineContextResUNet with random weights (trained=False) into ``directory``.

    ``bias`` is added to the head's bias: a large positive value makes the network call
    (almost) everything foreground, which lets pipeline tests get a non-empty mask.
    """
    import torch

    from SpineContextSegLib.labels import SPINE
    from SpineContextSegLib.inference.model_files import ModelCard, export_model
    from SpineContextSegLib.inference.network import SpineContextResUNet

    torch.manual_seed(seed)
    kwargs = {"widths": [4, 8, 8], "bottleneck_channels": 8, "dilations": [1, 2, 4, 8]}
    network = SpineContextResUNet(**kwargs)
    with torch.no_grad():
        network.head.bias.add_(bias)
    card = ModelCard(
        name="tiny-random-test-model",
        version="0.0.0",
        task="spine",
        architecture="SpineContextResUNet",
        architecture_kwargs=kwargs,
        labels=[SPINE.to_json()],
        spacing_mm=list(spacing_mm),
        hu_window=[-1000.0, 2000.0],
        patch_size=list(patch_size),
        overlap=0.25,
        trained=False,
        training_data="none: random weights for tests",
    )
    return export_model(network, card, directory)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random-weights model whose sigmoid output is near 1 everywhere (non-empty masks)."""
    directory = str(tmp_path_factory.mktemp("tiny_model"))
    make_tiny_model(directory, bias=8.0)
    return directory


@pytest.fixture(scope="session")
def sample_ct_path() -> str:
    return SAMPLE_CT


def make_ct_image(size=(40, 36, 30), spacing=(2.0, 2.0, 2.5), direction=None, origin=(0.0, 0.0, 0.0), seed=0):
    """A small synthetic CT (HU): air, a soft-tissue body ellipse and a bone cylinder along z."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    hu = np.full((nz, ny, nx), -1000.0, dtype=np.float32)
    body = ((x - nx / 2) / (nx * 0.4)) ** 2 + ((y - ny / 2) / (ny * 0.35)) ** 2 <= 1
    hu[body] = 40.0
    bone = ((x - nx / 2) ** 2 + (y - ny * 0.6) ** 2) <= (min(nx, ny) * 0.12) ** 2
    hu[bone] = 700.0
    hu += rng.normal(0, 10, hu.shape).astype(np.float32)
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


class BoneThresholdEngine(InferenceEngine):
    """A stand-in network: probability = sigmoid of (HU - 250) on the [0, 1] window (bone)."""

    name = "bone-threshold"

    def __init__(self, hu_window=(-1000.0, 2000.0)):
        self.unit_threshold = (250.0 - hu_window[0]) / (hu_window[1] - hu_window[0])
        self.calls = 0

    def predict(self, batch):
        self.calls += 1
        return 1.0 / (1.0 + np.exp(np.clip(-400.0 * (batch - self.unit_threshold), -50, 50)))


@pytest.fixture
def bundle(tiny_model_dir):
    """The tiny random model, loaded (pairs with :class:`BoneThresholdEngine` in pipeline tests)."""
    from SpineContextSegLib.inference.model_files import load_model

    return load_model(tiny_model_dir)


def scripted_module_stubs(test_base=object) -> dict:
    """Stand-ins for the Slicer modules a scripted module imports besides MRML: ``{module name: module}``.

    ``slicer.i18n`` (translation returns the text), ``slicer.parameterNodeWrapper`` (the
    decorator returns the class), ``slicer.ScriptedLoadableModule`` (plain bases; the test
    base class is ``test_base``). Install them with ``monkeypatch.setitem(sys.modules, ...)``.
    """
    import types

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = lambda choices: ("Choice", choices)
    wrapper.WithinRange = lambda low, high: ("WithinRange", low, high)
    bases = types.ModuleType("slicer.ScriptedLoadableModule")

    class _Base:
        def __init__(self, parent=None):
            self.parent = parent

    bases.ScriptedLoadableModule = bases.ScriptedLoadableModuleWidget = bases.ScriptedLoadableModuleLogic = _Base
    bases.ScriptedLoadableModuleTest = test_base
    return {"slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper, "slicer.ScriptedLoadableModule": bases}


class PlainTextLog:
    """Stands in for the panel's log (a ``QPlainTextEdit``): the lines appended, in order."""

    def __init__(self):
        self.lines = []

    def appendPlainText(self, text):
        self.lines.append(text)

    def toPlainText(self):
        return "\n".join(self.lines)

    def clear(self):
        self.lines = []


def warning_recorder():
    """``(reporter, codes)``: a :class:`~SpineContextSegLib.progress.ProgressReporter` that appends each warning's code to ``codes``."""
    from SpineContextSegLib.progress import ProgressReporter

    codes = []

    class WarningRecorder(ProgressReporter):
        def emit(self, message):
            if message["type"] == "warning":
                codes.append(message["code"])

    return WarningRecorder(), codes

