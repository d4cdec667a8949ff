"""Same input, same model, same engine and thread count: bit-identical masks, run after run.

The model here has random weights with outputs near 0.5, and the threshold is set to the
median probability, so about half the voxels sit right at the decision boundary: the
last bit of any probability that changed between runs would flip voxels of the mask.

What is needed: a fixed engine, device and ``--threads`` (each engine is built with an
explicit thread count; ONNX Runtime also gets one inter-op thread). Checked here on the
CPU for ONNX Runtime, OpenVINO (fp32 and bf16, the default on CPUs with native bf16) and
torch, with fresh engines and in fresh processes. Not
guaranteed, and not tested: a different thread count (the reduction order may change the
last bits), and CUDA (onnxruntime-gpu and torch pick cuDNN algorithms at run time), see
docs/troubleshooting.md (Notes).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT, make_ct_image, make_tiny_model

from SpineContextSegLib.inference.engine import InferenceEngine, create_engine
from SpineContextSegLib.inference.pipeline import SegmentOptions, segment_image

ENGINES = [("onnxruntime", 1, "fp32"), ("onnxruntime", 2, "fp32"), ("openvino", 1, "fp32"), ("openvino", 2, "fp32"), ("openvino", 2, "bf16"), ("torch", 2, "fp32")]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("random_model"))
    return make_tiny_model(directory, seed=5, bias=0.0)


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    image = make_ct_image(size=(48, 40, 36), spacing=(2.0, 2.0, 2.5), seed=4)
    path = str(tmp_path_factory.mktemp("determinism") / "ct.nii.gz")
    sitk.WriteImage(image, path)
    return image, path


class RecordingEngine(InferenceEngine):
    """Passes ``predict`` through to ``engine`` and keeps every output."""

    def __init__(self, engine: InferenceEngine):
        self.engine, self.outputs = engine, []
        self.name, self.device, self.precision = engine.name, engine.device, engine.precision

    def predict(self, batch):
        out = self.engine.predict(batch)
        self.outputs.append(np.array(out, copy=True))
        return out


@pytest.fixture(scope="module")
def median_threshold(random_model, ct):
    """The median tile probability: puts about half of the voxels at the decision boundary."""
    recorder = RecordingEngine(create_engine(random_model, engine="onnxruntime", device="cpu", threads=1))
    segment_image(ct[0], SegmentOptions(min_spine_ml=0.0, min_island_ml=0.0, threshold=0.5), bundle=random_model, engine=recorder)
    probabilities = np.concatenate([o.ravel() for o in recorder.outputs])
    assert probabilities.std() > 1e-4  # not a constant network: the comparison below can fail
    return float(np.median(probabilities))


def _mask(ct_image, model, engine_name, threads, precision, threshold):
    engine = create_engine(model, engine=engine_name, device="cpu", threads=threads, precision=precision)
    options = SegmentOptions(min_spine_ml=0.0, min_island_ml=0.0, threshold=threshold, overlap=0.5)
    return sitk.GetArrayFromImage(segment_image(ct_image, options, bundle=model, engine=engine).mask)


@pytest.mark.parametrize("engine_name,threads,precision", ENGINES)
def test_repeated_runs_with_fresh_engines_give_bit_identical_masks(random_model, ct, median_threshold, engine_name, threads, precision):
    if engine_name == "openvino":
        pytest.importorskip("openvino")
    if engine_name == "torch":
        pytest.importorskip("torch")
    first = _mask(ct[0], random_model, engine_name, threads, precision, median_threshold)
    assert 0.2 < first.mean() < 0.8  # many voxels at the boundary
    for _ in range(2):
        np.testing.assert_array_equal(_mask(ct[0], random_model, engine_name, threads, precision, median_threshold), first)


@pytest.mark.parametrize("engine_name,threads,precision", ENGINES)
def test_the_network_output_is_bit_identical_call_after_call(random_model, engine_name, threads, precision):
    if engine_name == "openvino":
        pytest.importorskip("openvino")
    if engine_name == "torch":
        pytest.importorskip("torch")
    batch = np.random.default_rng(1).random((2, 1, 16, 32, 32), dtype=np.float32)
    engine = create_engine(random_model, engine=engine_name, device="cpu", threads=threads, precision=precision)
    first = engine.predict(batch)
    assert first.dtype == np.float32 and first.shape == (2, 1, 16, 32, 32)
    assert np.array_equal(engine.predict(batch), first)
    assert np.array_equal(create_engine(random_model, engine=engine_name, device="cpu", threads=threads, precision=precision).predict(batch), first)


def test_two_worker_processes_write_the_same_mask(tmp_path, random_model, ct, median_threshold):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    masks = []
    for run in range(2):
        output = tmp_path / f"mask{run}.nrrd"
        completed = subprocess.run(
            [sys.executable, "-m", "SpineContextSegLib.worker", ct[1], "-o", str(output), "--model", random_model.directory,
             "--engine", "onnxruntime", "--device", "cpu", "--threads", "1", "--threshold", repr(median_threshold)],
            capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
        )
        assert completed.returncode == 0, completed.stdout[-500:] + completed.stderr[-500:]
        masks.append(output.read_bytes())
    assert masks[0] == masks[1]  # byte for byte, header included
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mask0.nrrd")))
    assert 0.2 < array.mean() < 0.8
