"""Engines (ONNX Runtime, OpenVINO, torch) agree; model folders are verified before use."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from SpineContextSegLib.inference.engine import OnnxRuntimeEngine, create_engine
from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.inference.model_files import load_model, sha256_of_file

torch = pytest.importorskip("torch")


def test_torch_and_onnxruntime_agree_within_1e_4(tmp_path):
    from conftest import make_tiny_model

    bundle = make_tiny_model(str(tmp_path / "m"), seed=3)
    x = np.random.default_rng(0).random((2, 1, 16, 32, 24), dtype=np.float32)
    onnx_probability = create_engine(bundle, engine="onnxruntime", device="cpu").predict(x)
    torch_probability = create_engine(bundle, engine="torch", device="cpu").predict(x)
    assert onnx_probability.shape == (2, 1, 16, 32, 24)
    assert np.abs(onnx_probability - torch_probability).max() < 1e-4
    # random weights still give a non-trivial map: the comparison is not between two constants
    assert onnx_probability.std() > 1e-3


def test_openvino_reads_the_same_onnx_file(tmp_path):
    pytest.importorskip("openvino")
    from conftest import make_tiny_model

    bundle = make_tiny_model(str(tmp_path / "m"), seed=4)
    x = np.random.default_rng(1).random((1, 1, 16, 16, 16), dtype=np.float32)
    reference = create_engine(bundle, engine="onnxruntime", device="cpu").predict(x)
    assert np.abs(create_engine(bundle, engine="openvino", device="cpu").predict(x) - reference).max() < 1e-4


def test_auto_engine_falls_back_to_onnxruntime_where_openvino_cannot_compile(tiny_model_dir, monkeypatch, caplog):
    """OpenVINO is a default dependency, also where it may not run: auto costs speed there, not the run."""
    pytest.importorskip("openvino")
    from SpineContextSegLib.inference import engine as engine_module

    bundle = load_model(tiny_model_dir)
    assert create_engine(bundle, engine="auto", device="cpu").name == "openvino"

    def refuse(self, batch_shape):
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:112:\nunsupported CPU\n")

    monkeypatch.setattr(engine_module.OpenVinoEngine, "compiled_for", refuse)
    with caplog.at_level("WARNING"):
        engine = create_engine(bundle, engine="auto", device="cpu")
    assert engine.name == "onnxruntime"
    assert "OpenVINO cannot run the model here" in caplog.text and "unsupported CPU" in caplog.text
    x = np.random.default_rng(0).random((1, 1, *bundle.card.patch_size), dtype=np.float32)
    assert engine.predict(x).shape == (1, 1, *bundle.card.patch_size)
    with pytest.raises(RuntimeError):  # asked for by name: no silent switch
        create_engine(bundle, engine="openvino", device="cpu").predict(x)


def test_model_card_round_trips_and_records_the_checksum(tiny_model_dir):
    bundle = load_model(tiny_model_dir)
    assert bundle.card.onnx_sha256 == sha256_of_file(os.path.join(tiny_model_dir, "model.onnx"))
    assert bundle.card.trained is False
    assert bundle.card.labels[0]["name"] == "Spine"


def test_a_modified_onnx_file_is_refused(tmp_path, tiny_model_dir):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(SegmentationError) as error:
        load_model(str(copy))
    assert error.value.code == "model_checksum"
    assert "Re-copy" in error.value.message


@pytest.mark.parametrize(
    "damage,code",
    [
        (lambda d: os.remove(d / "model.json"), "model_metadata"),
        (lambda d: (d / "model.json").write_text("{not json"), "model_metadata"),
        (lambda d: (d / "model.json").write_text(json.dumps({"name": "x"})), "model_metadata"),
        (lambda d: os.remove(d / "model.onnx"), "model_not_found"),
    ],
)
def test_broken_model_folders_give_specific_errors(tmp_path, tiny_model_dir, damage, code):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    damage(copy)
    with pytest.raises(SegmentationError) as error:
        load_model(str(copy))
    assert error.value.code == code


def test_missing_model_folder(tmp_path):
    with pytest.raises(SegmentationError) as error:
        load_model(str(tmp_path / "nowhere"))
    assert error.value.code == "model_not_found"


def test_a_model_with_the_wrong_input_channels_is_refused(tmp_path):
    from SpineContextSegLib.labels import SPINE
    from SpineContextSegLib.inference.model_files import ModelCard, export_model
    from SpineContextSegLib.inference.network import SpineContextResUNet

    card = ModelCard(
        name="two-channel", version="0", task="spine", architecture="SpineContextResUNet",
        architecture_kwargs={"in_channels": 2, "widths": [4, 8, 8], "bottleneck_channels": 8},
        labels=[SPINE.to_json()], spacing_mm=[4, 4, 4], hu_window=[-1000, 2000], patch_size=[16, 16, 16], overlap=0.25,
    )
    bundle = export_model(SpineContextResUNet(in_channels=2, widths=(4, 8, 8), bottleneck_channels=8), card, str(tmp_path / "m"), example_shape=(1, 2, 16, 16, 16))
    with pytest.raises(SegmentationError) as error:
        OnnxRuntimeEngine(bundle.onnx_path, device="cpu")
    assert error.value.code == "model_incompatible"


def test_cuda_requested_without_a_gpu_is_a_clear_error(tiny_model_dir):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SegmentationError) as error:
        create_engine(load_model(tiny_model_dir), engine="onnxruntime", device="cuda")
    assert error.value.code == "cuda_unavailable"
    # auto falls back to the CPU instead
    assert create_engine(load_model(tiny_model_dir), engine="onnxruntime", device="auto").device == "cpu"


def test_export_onnx_command_writes_a_loadable_model_from_a_checkpoint(tmp_path, tiny_model_dir):
    from SpineContextSegLib.cli import main

    card = json.loads(open(os.path.join(tiny_model_dir, "model.json")).read())
    state = torch.load(os.path.join(tiny_model_dir, "model.pt"), weights_only=False)
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state["state_dict"], "card": card}, checkpoint)
    assert main(["export-onnx", str(checkpoint), "-o", str(tmp_path / "exported"), "--version", "9.8.7", "--overlap", "0.3", "--spacing", "3.2", "--fine-spacing-mm", "2.5"]) == 0
    exported = load_model(str(tmp_path / "exported"))
    assert exported.card.version == "9.8.7" and exported.card.overlap == 0.3
    assert exported.card.spacing_mm == [3.2, 3.2, 3.2] and card["spacing_mm"] != [3.2, 3.2, 3.2]
    assert exported.card.fine_spacing_mm == 2.5 and card.get("fine_spacing_mm") is None
    for bad in (["--spacing", "0"], ["--fine-spacing-mm", "-1"]):
        with pytest.raises(SystemExit) as refused:
            main(["export-onnx", str(checkpoint), "-o", str(tmp_path / "refused"), *bad])
        assert refused.value.code == 2 and not (tmp_path / "refused").exists()
    x = np.random.default_rng(2).random((1, 1, 16, 32, 32), dtype=np.float32)
    original = create_engine(load_model(tiny_model_dir), engine="onnxruntime", device="cpu").predict(x)
    again = create_engine(exported, engine="onnxruntime", device="cpu").predict(x)
    np.testing.assert_allclose(again, original, atol=1e-6)
