"""Training: the loop, checkpoints, resume, seeding, loss masking, augmentation and DDP (gloo, 2 CPU processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

torch = pytest.importorskip("torch")

from conftest import ROOT  # noqa: E402

from SpineContextSegLib.training.augment import AugmentationConfig, augment_batch  # noqa: E402
from SpineContextSegLib.training.losses import masked_bce_dice_loss, masked_dice_ce_loss  # noqa: E402
from SpineContextSegLib.training.patches import extract_region  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
TINY = ["--widths", "4", "8", "8", "--patch", "16", "16", "16", "--batch-size", "2", "--iterations-per-epoch", "2",
        "--spacing", "3", "--bf16", "off", "--threads", "1", "--validation-fraction", "0.5", "--validation-phantoms", "0", "--phantoms", "0"]


def write_case(folder, seed):
    """A case folder in the `shared` layout: ct.nii.gz (HU) + seg_vert.nii.gz (VerSe ids)."""
    rng = np.random.default_rng(seed)
    hu = np.full((40, 30, 30), -1000, np.int16)
    hu[:, 5:25, 5:25] = 40
    labels = np.zeros(hu.shape, np.uint8)
    for level, z in zip((20, 21, 22), (5, 18, 31)):
        labels[z : z + 8, 12:20, 10:20] = level
    hu[labels > 0] = 400 + rng.integers(0, 100)
    os.makedirs(folder, exist_ok=True)
    for array, name in ((hu, "ct.nii.gz"), (labels, "seg_vert.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((2.0, 2.0, 2.0))
        sitk.WriteImage(image, os.path.join(folder, name))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    for i in range(3):
        write_case(str(root / f"patient{i}"), i)
    return str(root)


def train(data_root, out, *extra, launcher=None):
    command = (launcher or [sys.executable, "-m"]) + ["SpineContextSegLib.cli", "train", "--data", data_root, "-o", str(out), *TINY, *extra]
    completed = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def history(out):
    return torch.load(os.path.join(out, "last.pt"), weights_only=False)["history"]


def test_training_writes_checkpoints_curve_and_an_exportable_model(data_root, tmp_path):
    from SpineContextSegLib.inference.model_files import load_model

    out = tmp_path / "run"
    train(data_root, out, "--epochs", "2", "--export", str(tmp_path / "model"))
    records = history(out)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0.0 <= r["val_dice"] <= 1.0 and np.isfinite(r["train_loss"]) for r in records)
    assert (out / "best.pt").exists() and (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    bundle = load_model(str(tmp_path / "model"))
    assert bundle.card.trained is True and bundle.card.spacing_mm == [3.0, 3.0, 3.0] and bundle.card.patch_size == [16, 16, 16]
    best = torch.load(out / "best.pt", weights_only=False)
    assert "patient" in bundle.card.training_data and bundle.card.training["iterations"] == best["iterations"] in (2, 4)


def test_vertebrae_training_writes_a_model_with_one_channel_per_vertebra(data_root, tmp_path):
    from SpineContextSegLib.labels import VERTEBRAE
    from SpineContextSegLib.inference.model_files import build_network_from_card, load_model

    out = tmp_path / "run"
    train(data_root, out, "--task", "vertebrae", "--epochs", "1", "--export", str(tmp_path / "model"))
    records = history(out)
    assert 0.0 <= records[0]["val_dice"] <= 1.0 and np.isfinite(records[0]["train_loss"])
    bundle = load_model(str(tmp_path / "model"))
    assert bundle.card.task == "vertebrae" and [label["name"] for label in bundle.card.labels] == [v.name for v in VERTEBRAE]
    network = build_network_from_card(bundle.card)
    assert network.head.out_channels == len(VERTEBRAE) + 1 == 28


def test_vertebrae_targets_are_network_channels_and_an_unlabelled_sacrum_is_unsupervised(data_root):
    from SpineContextSegLib.labels import vertebra_class_ids
    from SpineContextSegLib.training.config import TrainConfig
    from SpineContextSegLib.training.data import load_case_volumes

    config = TrainConfig(data=[data_root], task="vertebrae", spacing_mm=2.0)
    volumes = [v for _, v in load_case_volumes(config)]
    assert len(volumes) == 3
    channels = [vertebra_class_ids().index(v) + 1 for v in (20, 21, 22)]
    assert set(np.unique(volumes[0].label).tolist()) == {0, *channels}
    assert volumes[0].weight.all()  # L1-L3 only: nothing below them is a sacrum left unlabelled


def test_below_an_unlabelled_sacrum_nothing_is_taught():
    from SpineContextSegLib.training.data import unsupervise_below_unlabelled_sacrum

    labels = np.zeros((30, 4, 4), np.uint8)
    labels[10:18] = 24  # L5 (axis 0 runs inferior -> superior)
    labels[20:28] = 23
    weight = np.ones(labels.shape, bool)
    assert unsupervise_below_unlabelled_sacrum(labels, weight)
    assert not weight[:10].any() and weight[10:].all()
    labels[2:8] = 26  # a labelled sacrum is taught as such
    weight[:] = True
    assert not unsupervise_below_unlabelled_sacrum(labels, weight) and weight.all()


def test_dice_ce_loss_ignores_zero_weight_and_rewards_the_right_vertebra():
    target = torch.zeros(1, 1, 4, 4, 4)
    target[..., :2, :] = 3
    right = torch.full((1, 5, 4, 4, 4), -5.0)
    right[:, 0][target[:, 0] == 0] = 5.0
    right[:, 3][target[:, 0] == 3] = 5.0
    neighbour = right.clone()
    neighbour[:, [3, 4]] = neighbour[:, [4, 3]]  # the right place, the name of the vertebra below
    weight = torch.ones_like(target)
    assert float(masked_dice_ce_loss(right, target, weight)) < 0.1 < float(masked_dice_ce_loss(neighbour, target, weight))
    weight[..., :2, :] = 0  # where the vertebra is, nothing is supervised
    assert float(masked_dice_ce_loss(neighbour, target, weight)) == pytest.approx(float(masked_dice_ce_loss(right, target, weight)))


def test_init_weights_from_a_spine_network_keep_all_but_the_head():
    from SpineContextSegLib.errors import SegmentationError
    from SpineContextSegLib.inference.network import build_network
    from SpineContextSegLib.training.trainer import load_matching_weights

    spine = build_network("SpineContextResUNet", widths=[4, 8, 8], bottleneck_channels=8)
    vertebrae = build_network("SpineContextResUNet", widths=[4, 8, 8], bottleneck_channels=8, out_channels=28)
    assert load_matching_weights(vertebrae, spine.state_dict()) == ["head.weight", "head.bias"]
    own = vertebrae.state_dict()
    assert all(torch.equal(own[k], v) for k, v in spine.state_dict().items() if not k.startswith("head."))
    wider = build_network("SpineContextResUNet", widths=[8, 8, 8], bottleneck_channels=8, out_channels=28)
    with pytest.raises(SegmentationError) as error:
        load_matching_weights(wider, spine.state_dict())
    assert error.value.code == "model_incompatible" and "--widths" in str(error.value)


def test_resume_continues_where_it_stopped(data_root, tmp_path):
    out = tmp_path / "run"
    train(data_root, out, "--epochs", "1")
    train(data_root, out, "--epochs", "2", "--resume", str(out / "last.pt"))
    records = history(out)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["iterations"] == 4


def test_same_seed_gives_the_same_weights(data_root, tmp_path):
    for name in ("a", "b"):
        train(data_root, tmp_path / name, "--epochs", "1", "--seed", "5")
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_on_gloo(data_root, tmp_path):
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561", "-m"]
    train(data_root, out, "--epochs", "1", launcher=launcher)
    checkpoint = torch.load(out / "last.pt", weights_only=False)
    assert "2 processes" in checkpoint["card"]["training"]["hardware"]
    assert checkpoint["iterations"] == 2


def test_loss_ignores_voxels_with_zero_weight():
    logits = torch.full((1, 1, 4, 4, 4), -5.0)  # confidently background
    target = torch.zeros(1, 1, 4, 4, 4)
    weight = torch.ones(1, 1, 4, 4, 4)
    weight[..., 2:] = 0
    wrong_where_ignored = target.clone()
    wrong_where_ignored[..., 2:] = 1
    assert float(masked_bce_dice_loss(logits, target, weight)) == pytest.approx(float(masked_bce_dice_loss(logits, wrong_where_ignored, weight)))
    assert float(masked_bce_dice_loss(logits, wrong_where_ignored, torch.ones_like(weight))) > float(masked_bce_dice_loss(logits, target, torch.ones_like(weight)))


def test_augmentation_keeps_labels_binary_and_images_in_range():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, 22, 22, 22)
    label = (torch.rand(2, 1, 22, 22, 22) > 0.7).float()
    weight = torch.ones_like(label)
    out_image, out_label, out_weight = augment_batch(image, label, weight, (16, 16, 16), generator, 2.0)
    assert out_image.shape == (2, 1, 16, 16, 16)
    assert set(torch.unique(out_label).tolist()) <= {0.0, 1.0}
    assert float(out_image.min()) >= 0 and float(out_image.max()) <= 1


def test_identity_augmentation_returns_the_central_region():
    config = AugmentationConfig(rotation_deg=0, scale_range=(1, 1), elastic_mm=0, flip_left_right=False, intensity_scale=0,
                                intensity_shift=0, gamma_range=(1, 1), noise_std=0, blur_probability=0)
    image = torch.rand(1, 1, 20, 20, 20)
    label = (image > 0.5).float()
    out_image, out_label, _ = augment_batch(image, label, torch.ones_like(label), (10, 10, 10), torch.Generator().manual_seed(0), 2.0, config)
    torch.testing.assert_close(out_image, image[..., 5:15, 5:15, 5:15], atol=1e-5, rtol=0)
    assert torch.equal(out_label, label[..., 5:15, 5:15, 5:15])


def test_patches_outside_the_volume_are_air_and_unsupervised():
    from SpineContextSegLib.training.data import TrainingVolume

    volume = TrainingVolume("v", "p", np.ones((10, 10, 10), np.float32), np.ones((10, 10, 10), np.uint8), np.ones((10, 10, 10), np.uint8), np.zeros((0, 3), np.int32))
    image, label, weight = extract_region(volume, (0, 0, 0), (8, 8, 8))
    assert image[:4].max() == 0 and weight[:4].max() == 0 and weight[4:, 4:, 4:].min() == 1


def test_slab_cut_keeps_a_thin_supervised_slab_and_makes_the_rest_air():
    from SpineContextSegLib.training.patches import cut_to_slab

    rng = np.random.default_rng(3)
    for _ in range(20):
        image = np.full((32, 32, 32), 0.5, np.float32)
        weight = np.ones((32, 32, 32), np.uint8)
        cut_to_slab(image, weight, rng, spacing_mm=2.0)
        kept_axis0 = weight.any(axis=(1, 2)).sum()
        kept_axis2 = weight.any(axis=(0, 1)).sum()
        # one axis is cut to 20-60 mm (10-30 voxels at 2 mm), the others untouched
        assert (10 <= kept_axis0 <= 30 and kept_axis2 == 32) or (10 <= kept_axis2 <= 30 and kept_axis0 == 32)
        assert np.all(image[weight == 0] == 0.0) and np.all(image[weight == 1] == 0.5)


def test_case_weights_set_how_often_real_cases_are_drawn(data_root, monkeypatch):
    from SpineContextSegLib.training import trainer as training
    from SpineContextSegLib.errors import UsageError
    from SpineContextSegLib.training.command import _parse_case_weights
    from SpineContextSegLib.training.config import TrainConfig
    from SpineContextSegLib.training.trainer import Trainer

    config = TrainConfig(data=[data_root], validation_fraction=0.0, validation_phantoms=0, phantoms=0, spacing_mm=3.0,
                         patch_size=(8, 8, 8), batch_size=1, architecture="UNet3D", architecture_kwargs={"widths": [4, 8, 8]},
                         augment=False, case_weights=_parse_case_weights(["patient1=8"]))
    trainer = Trainer(config)
    trainer.load_data()
    drawn = []
    original = training.extract_region
    monkeypatch.setattr(training, "extract_region", lambda volume, *a: drawn.append(volume.name) or original(volume, *a))
    for _ in range(300):
        trainer.next_batch()
    assert sorted(set(drawn)) == ["patient0", "patient1", "patient2"]
    assert drawn.count("patient1") / len(drawn) == pytest.approx(0.8, abs=0.08)  # 8 / (8 + 1 + 1)
    with pytest.raises(UsageError):
        _parse_case_weights(["patient1=-2"])
    with pytest.raises(UsageError):
        _parse_case_weights(["=2"])


def test_phantom_volume_on_the_canonical_grid_equals_the_resampled_phantom():
    """The SimpleITK-free phantom path gives the volume the resampling path would give."""
    from SpineContextSegLib.phantoms.generator import generate_phantom
    from SpineContextSegLib.training.config import TrainConfig
    from SpineContextSegLib.training.data import make_training_volume, phantom_volume

    config = TrainConfig(spacing_mm=4.0)
    direct = phantom_volume(3, config)
    phantom = generate_phantom(3, spacing_mm=(4.0,) * 3)
    resampled = make_training_volume("phantom-3", "phantom-3", phantom.ct, phantom.spine_mask, config, source="phantom")
    assert direct.image.shape == resampled.image.shape
    assert np.allclose(direct.image, resampled.image, atol=1e-5)
    assert np.array_equal(direct.label, resampled.label) and np.array_equal(direct.weight, resampled.weight)
    assert direct.label.sum() > 100


def test_phantom_cortical_hu_draws_each_training_phantom_s_rim_from_the_range():
    from SpineContextSegLib.training.config import TrainConfig
    from SpineContextSegLib.training.data import phantom_volume

    default = phantom_volume(3, TrainConfig(spacing_mm=4.0))
    dim = phantom_volume(3, TrainConfig(spacing_mm=4.0, phantom_cortical_hu=(380.0, 420.0)))
    again = phantom_volume(3, TrainConfig(spacing_mm=4.0, phantom_cortical_hu=(380.0, 420.0)))
    assert np.array_equal(dim.label, default.label) and np.array_equal(dim.image, again.image)  # same anatomy; same phantom every run
    bone = dim.label > 0
    assert dim.image[bone].max() < default.image[bone].max()  # the cortex, the brightest spine voxels, is dimmer


def test_saved_volumes_train_without_simpleitk(data_root, tmp_path):
    """--save-volumes here, then training from that folder in a Python where SimpleITK cannot be imported (a GPU image)."""
    volumes = tmp_path / "volumes"
    completed = subprocess.run([sys.executable, "-m", "SpineContextSegLib.cli", "train", "--data", data_root, "--save-volumes", str(volumes), *TINY],
                               capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    saved = sorted(os.listdir(volumes))
    assert saved == [f"patient{i}.volume.npz" for i in range(3)]
    blocker = tmp_path / "no_sitk"
    blocker.mkdir()
    (blocker / "SimpleITK.py").write_text("raise ImportError('SimpleITK is not installed on this machine')\n")
    env = dict(ENV, PYTHONPATH=str(blocker) + os.pathsep + ENV["PYTHONPATH"])
    out = tmp_path / "run"
    command = [sys.executable, "-m", "SpineContextSegLib.cli", "train", "--data", str(volumes), "-o", str(out), *TINY,
               "--phantoms", "1", "--phantom-fraction", "0.5", "--epochs", "1"]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "SimpleITK" not in completed.stderr
    records = history(out)
    assert records[-1]["iterations"] == 2 and np.isfinite(records[-1]["train_loss"])
    # the same volumes under another grid are refused, not silently mixed
    completed = subprocess.run([sys.executable, "-m", "SpineContextSegLib.cli", "train", "--data", str(volumes), "-o", str(tmp_path / "r2"),
                                *TINY[:12], "--spacing", "2", "--bf16", "off", "--validation-fraction", "0", "--phantoms", "0", "--epochs", "1"],
                               capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=240)
    assert completed.returncode != 0 and "save the volumes again" in completed.stderr


def test_a_time_budget_stop_resumes_with_a_larger_budget(data_root, tmp_path):
    """Long CPU runs stop at --max-minutes and go on in the next session from last.pt."""
    out = tmp_path / "run"
    train(data_root, out, "--epochs", "50", "--max-minutes", "0.0001")
    assert [r["epoch"] for r in history(out)] == [1]  # stopped after the first epoch
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["elapsed_s"] > 0 and "optimizer" in state
    train(data_root, out, "--epochs", "3", "--max-minutes", "100", "--resume", str(out / "last.pt"))
    records = history(out)
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[-1]["iterations"] == 6


def test_train_command_line_reaches_the_config():
    """Every recipe knob on the command line lands in TrainConfig (a flag parsed but dropped trains something else)."""
    import argparse

    from SpineContextSegLib.training import command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--data", "x", "-o", "out", "--lr", "3e-4", "--plateau-patience", "12", "--spacing", "1.8", "--batch-size", "3", "--phantom-cortical-hu", "650", "350"])
    config = command.config_from_args(args)
    assert (config.learning_rate, config.plateau_patience, config.spacing_mm, config.batch_size) == (3e-4, 12, 1.8, 3)
    assert config.phantom_cortical_hu == (350.0, 650.0)
    assert command.config_from_args(parser.parse_args(["--data", "x", "-o", "out"])).phantom_cortical_hu is None
