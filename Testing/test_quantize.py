"""INT8 models: ``spinecontextseg quantize``, ``--precision int8``, and when ``--precision auto`` may use one."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from SpineContextSegLib.inference import engine as engine_module  # noqa: E402
from SpineContextSegLib.cli import main  # noqa: E402
from SpineContextSegLib.inference.engine import create_engine, resolve_precision  # noqa: E402
from SpineContextSegLib.errors import EXIT_MODEL, SegmentationError  # noqa: E402
from SpineContextSegLib.inference.model_files import (  # noqa: E402
    BUNDLED_MODEL_DIR, INT8_FILE, INT8_MIN_AGREEMENT_DICE, load_model, sha256_of_file, write_card,
)

try:
    import openvino  # noqa: F401

    HAVE_OPENVINO = True
except ImportError:
    HAVE_OPENVINO = False


@pytest.fixture(scope="module")
def quantized_tiny_dir(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny random model quantised through the CLI: one phantom for calibration, one for agreement."""
    directory = str(tmp_path_factory.mktemp("tiny_int8"))
    status = main(["quantize", tiny_model_dir, "-o", directory, "--phantoms", "1", "--tiles-per-case", "3", "--engines", "onnxruntime"])
    assert status == 0
    return directory


def test_quantize_writes_a_loadable_int8_model_listed_with_its_checksum(quantized_tiny_dir, tiny_model_dir):
    bundle = load_model(quantized_tiny_dir)
    int8 = bundle.card.int8
    assert int8["file"] == INT8_FILE
    path = os.path.join(quantized_tiny_dir, INT8_FILE)
    assert int8["sha256"] == sha256_of_file(path)
    assert bundle.card.onnx_sha256 == load_model(tiny_model_dir).card.onnx_sha256  # the fp32 model is copied unchanged
    assert int8["calibration"]["tiles"] == 3 and int8["calibration"]["phantom_seeds"]
    assert int8["agreement_engines"] == ["onnxruntime"]
    (case, dice), = int8["agreement"].items()  # no CT given: a phantom calibration did not see
    assert case.startswith("phantom_") and 0.0 <= dice <= 1.0
    assert int8["min_dice"] == INT8_MIN_AGREEMENT_DICE
    # the source folder is untouched
    assert not os.path.exists(os.path.join(tiny_model_dir, INT8_FILE)) and not load_model(tiny_model_dir).card.int8

    import onnx

    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    batch = np.random.default_rng(0).random((1, 1, *bundle.card.patch_size), dtype=np.float32)
    engines = ["onnxruntime"] + (["openvino"] if HAVE_OPENVINO else [])
    for name in engines:
        engine = create_engine(bundle, engine=name, device="cpu", precision="int8")
        assert engine.precision == "int8"
        out = engine.predict(batch)
        assert out.shape == (1, 1, *bundle.card.patch_size) and np.all((out >= 0) & (out <= 1))


def test_calibration_takes_tiles_from_every_grid_the_network_runs_on(tiny_model_dir):
    from SpineContextSegLib.phantoms.generator import generate_phantom
    from SpineContextSegLib.training.quantize import PHANTOM_SEED_BASE, calibration_tiles, network_input_volume, tiles_of_volume

    card = load_model(tiny_model_dir).card
    one_grid, one_info = calibration_tiles(card, [], phantoms=1, tiles_per_volume=3)
    card.fine_spacing_mm = 3.0  # a fine pass's grid (the tiny model runs at 4 mm)
    two_grids, two_info = calibration_tiles(card, [], phantoms=1, tiles_per_volume=3)
    assert one_info["grids_mm"] == [4.0] and two_info["grids_mm"] == [4.0, 3.0]
    assert len(one_grid) == 3 and len(two_grids) == 6 == two_info["tiles"]
    for a, b in zip(one_grid, two_grids[:3]):  # the card's grid first, unchanged
        np.testing.assert_array_equal(a, b)
    phantom = generate_phantom(PHANTOM_SEED_BASE, spacing_mm=[float(s) for s in card.spacing_mm])
    fine = tiles_of_volume(network_input_volume(phantom.ct, card, 3.0), card.patch_size, card.overlap, 3, card.hu_window)
    for a, b in zip(fine, two_grids[3:]):  # then the same phantom on the fine grid
        np.testing.assert_array_equal(a, b)


def test_int8_without_an_int8_model_is_a_clear_error(tmp_path, tiny_model_dir, sample_ct_path, capsys):
    status = main([
        "segment", sample_ct_path, "-o", str(tmp_path / "mask.nii.gz"), "--model", tiny_model_dir, "--precision", "int8", "--engine", "onnxruntime", "--progress", "none",
    ])
    assert status == EXIT_MODEL
    assert "error [int8_model_missing]" in capsys.readouterr().err
    assert not (tmp_path / "mask.nii.gz").exists()


def test_a_listed_but_missing_or_replaced_int8_file_is_refused(tmp_path, quantized_tiny_dir):
    folder = str(tmp_path / "model")
    shutil.copytree(quantized_tiny_dir, folder)
    int8_path = os.path.join(folder, INT8_FILE)
    with open(int8_path, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(SegmentationError) as error:
        create_engine(load_model(folder), engine="onnxruntime", device="cpu", precision="int8")
    assert error.value.code == "model_checksum"
    os.remove(int8_path)
    with pytest.raises(SegmentationError) as error:
        create_engine(load_model(folder), engine="onnxruntime", device="cpu", precision="int8")
    assert error.value.code == "int8_model_missing"
    with pytest.raises(SegmentationError) as error:
        create_engine(load_model(quantized_tiny_dir), engine="torch", device="cpu", precision="int8")
    assert error.value.code == "int8_model_missing"


@pytest.fixture()
def card_with_agreement(tmp_path, quantized_tiny_dir):
    """A copy of the quantised tiny model whose card's agreement the test sets: ``set(agreement) -> bundle``."""
    folder = str(tmp_path / "model")
    shutil.copytree(quantized_tiny_dir, folder)

    def with_agreement(agreement):
        bundle = load_model(folder)
        bundle.card.int8["agreement"] = agreement
        write_card(bundle.card, folder)
        return load_model(folder)

    return with_agreement


@pytest.mark.parametrize(
    "bf16_cpu,agreement,device,expected",
    [
        (False, {"a": 0.995, "b": 0.990}, "cpu", "int8"),
        (False, {"a": 0.995, "b": 0.9899}, "cpu", "fp32"),  # one case below 0.99: never
        (False, {}, "cpu", "fp32"),  # agreement never measured
        (False, {"a": "n/a"}, "cpu", "fp32"),
        (True, {"a": 0.999}, "cpu", "bf16"),  # native bf16 wins
        (False, {"a": 0.999}, "cuda", "fp32"),
    ],
)
def test_auto_picks_int8_only_without_bf16_and_with_agreement_on_every_case(monkeypatch, card_with_agreement, bf16_cpu, agreement, device, expected):
    monkeypatch.setattr(engine_module, "cpu_supports_bf16", lambda: bf16_cpu)
    bundle = card_with_agreement(agreement)
    assert resolve_precision("auto", device, bundle) == expected
    assert resolve_precision("fp32", device, bundle) == "fp32"  # an explicit precision is kept
    assert resolve_precision("int8", device, None) == "int8"


def test_auto_ignores_an_int8_model_whose_file_was_not_copied(monkeypatch, card_with_agreement):
    monkeypatch.setattr(engine_module, "cpu_supports_bf16", lambda: False)
    bundle = card_with_agreement({"a": 1.0})
    os.remove(bundle.int8_path)
    assert resolve_precision("auto", "cpu", bundle) == "fp32"
    assert create_engine(bundle, engine="onnxruntime", device="cpu", precision="auto").precision == "fp32"


@pytest.mark.skipif(not HAVE_OPENVINO, reason="OpenVINO is not installed")
def test_auto_engine_runs_the_int8_model_on_openvino_but_onnxruntime_stays_fp32(monkeypatch, card_with_agreement):
    monkeypatch.setattr(engine_module, "cpu_supports_bf16", lambda: False)
    bundle = card_with_agreement({"a": 0.999})
    engine = create_engine(bundle, engine="openvino", device="cpu", precision="auto")
    assert (engine.name, engine.precision) == ("openvino", "int8")
    assert create_engine(bundle, engine="onnxruntime", device="cpu", precision="auto").precision == "fp32"


def test_int8_mask_of_the_bundled_model_agrees_with_fp32_on_a_phantom(tmp_path):
    """Quantise the trained model (calibration: one phantom) and compare masks on another phantom."""
    import SimpleITK as sitk

    from SpineContextSegLib.evaluation.metrics import dice
    from SpineContextSegLib.phantoms.generator import generate_phantom
    from SpineContextSegLib.inference.pipeline import SegmentOptions, segment_image
    from SpineContextSegLib.training.quantize import quantize_model

    phantom_path = str(tmp_path / "phantom.nii.gz")
    sitk.WriteImage(generate_phantom(5, spacing_mm=2.0, first_level="T12", last_level="L3", field_of_view="spine").ct, phantom_path)
    engine_name = "openvino" if HAVE_OPENVINO else "onnxruntime"
    bundle = quantize_model(
        BUNDLED_MODEL_DIR, str(tmp_path / "model"), phantoms=1, tiles_per_volume=6, agreement=[phantom_path], engines=(engine_name,),
    )
    assert os.path.getsize(bundle.int8_path) < 0.4 * os.path.getsize(bundle.onnx_path)  # int8 weights: about a quarter
    image = sitk.ReadImage(phantom_path)
    masks = {}
    for precision in ("fp32", "int8"):
        engine = create_engine(bundle, engine=engine_name, device="cpu", precision=precision)
        options = SegmentOptions(engine=engine_name, device="cpu", precision=precision)
        masks[precision] = sitk.GetArrayFromImage(segment_image(image, options, bundle=bundle, engine=engine).mask) > 0
    assert masks["fp32"].sum() > 1000  # the trained model finds the phantom's spine
    agreement = dice(masks["int8"], masks["fp32"])
    assert agreement >= 0.98
    assert bundle.card.int8["agreement"]["phantom"] == pytest.approx(agreement, abs=1e-4)  # the card records what a run gives
    assert json.loads(json.dumps(bundle.card.to_json()))["int8"]["agreement"] == bundle.card.int8["agreement"]


def test_the_first_convolutions_and_the_full_resolution_tail_stay_fp32(quantized_tiny_dir):
    """Where the CT enters and where the mask's edges are decided, no Q/DQ pair: the int8 masks' edges were one voxel off."""
    import onnx

    graph = onnx.load(os.path.join(quantized_tiny_dir, INT8_FILE)).graph
    producers = {output: node for node in graph.node for output in node.output}

    def weight_is_quantised(node) -> bool:
        producer = producers.get(node.input[1])
        return producer is not None and producer.op_type == "DequantizeLinear"

    convs = [node for node in graph.node if node.op_type == "Conv"]
    image = graph.input[0].name
    first = [node for node in convs if image in node.input]
    last_upsampling = max(index for index, node in enumerate(graph.node) if node.op_type == "ConvTranspose")
    tail = [node for node in list(graph.node)[last_upsampling + 1:] if node.op_type == "Conv"]
    middle = [node for node in convs if node not in first and node not in tail]
    assert first and tail and middle
    assert not any(weight_is_quantised(node) for node in first + tail)
    assert all(weight_is_quantised(node) for node in middle)


@pytest.mark.skipif(not HAVE_OPENVINO, reason="OpenVINO is not installed")
def test_info_shows_the_precision_segment_would_run(monkeypatch, card_with_agreement, capsys):
    """`info` used to build its engine with fp32 whatever `segment --precision auto` would pick."""
    monkeypatch.setattr(engine_module, "cpu_supports_bf16", lambda: False)
    bundle = card_with_agreement({"a": 0.995})
    assert main(["info", "--model", bundle.directory]) == 0
    out = capsys.readouterr().out
    assert "engine:      openvino (cpu, int8)" in out and "--precision auto may use it" in out
    bundle = card_with_agreement({"a": 0.95})
    assert main(["info", "--model", bundle.directory]) == 0
    out = capsys.readouterr().out
    assert "engine:      openvino (cpu, fp32)" in out and "only with --precision int8" in out
