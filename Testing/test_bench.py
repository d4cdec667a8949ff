"""The benchmark runs each variant in a child process and compares masks and times."""
from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from SpineContextSegLib.evaluation.bench import repository_tile_starts

from conftest import make_ct_image


def test_repository_tile_rule_matches_the_authors_counts():
    # n = 400, patch 128, overlap 0.5: 7 positions (the last overhangs); 64-deep axis: 13
    assert len(repository_tile_starts(400, 128, 0.5)) == 7
    assert len(repository_tile_starts(400, 64, 0.5)) == 13
    assert max(repository_tile_starts(400, 128, 0.5)) + 128 > 400  # overhanging tile


def test_bench_prints_one_row_per_variant_with_speedup_and_dice(tmp_path, tiny_model_dir, capsys):
    from SpineContextSegLib.cli import main

    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct_image(size=(40, 36, 30)), str(ct))
    status = main(["bench", "--cases", str(ct), "--variants", "reference,reference-model-tile,default,default-2mm,default-all-tiles,onnxruntime-fp32", "--model", tiny_model_dir,
                   "--work-dir", str(tmp_path / "work"), "--markdown", str(tmp_path / "bench.md")])
    assert status == 0
    table = (tmp_path / "bench.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ct.nii.gz")]
    assert [row.split("|")[2].strip() for row in rows] == ["reference", "reference-model-tile", "default", "default-2mm", "default-all-tiles", "onnxruntime-fp32"]
    # the baselines: 1.1.0's default and every tile run
    assert table.splitlines()[0].rstrip(" |").endswith("Dice vs default-2mm | Dice vs default-all-tiles")
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[10]) > 0  # total seconds
        assert cells[12].endswith("x")  # speed-up vs reference
        # the tiny model calls everything foreground, so every variant agrees with the reference
        assert float(cells[14]) > 0.95 and float(cells[16]) > 0.95  # vs the reference, and vs it at the model's tile
        assert float(cells[17]) > 0.95 and float(cells[18]) > 0.95  # vs the baselines
    assert float([c.strip() for c in rows[3].strip("|").split("|")][17]) == 1.0  # a baseline against itself
    assert float([c.strip() for c in rows[4].strip("|").split("|")][18]) == 1.0
    assert [c.strip() for c in rows[0].strip("|").split("|")][13] == "-"  # no 1 mm reference in this run


def test_ground_truth_dice_scores_against_a_label_map_file(tmp_path):
    from SpineContextSegLib.evaluation.bench import ground_truth_dice

    truth = np.zeros((20, 20, 20), np.uint8)
    truth[5:15, 5:15, 5:15] = 1
    predicted = np.zeros_like(truth)
    predicted[5:15, 5:15, 10:20] = 1  # half of it overlaps
    for name, array in (("truth.nii.gz", truth), ("predicted.nii.gz", predicted)):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / name))
    assert ground_truth_dice(str(tmp_path / "predicted.nii.gz"), str(tmp_path / "truth.nii.gz")) == pytest.approx(0.5)
    assert ground_truth_dice(str(tmp_path / "truth.nii.gz"), str(tmp_path / "truth.nii.gz")) == pytest.approx(1.0)
    assert ground_truth_dice(str(tmp_path / "truth.nii.gz"), None) is None


def test_peak_rss_of_a_variant_child_is_its_own_not_the_parents():
    # bench runs each variant in a child; the child must not inherit the parent's memory as its peak
    import subprocess
    import sys

    ballast = np.ones(400 * 2**20, dtype=np.uint8)  # 400 MB held by this (parent) process
    code = "from SpineContextSegLib.evaluation.bench import peak_rss_mb; print(peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert ballast.sum() == ballast.size
    if sys.platform.startswith("linux"):
        assert 1.0 < float(child.stdout.strip()) < 300.0


def test_bench_refuses_a_vertebrae_model_instead_of_reading_its_background_channel(tmp_path, tiny_model_dir, capsys):
    import json
    import shutil

    from SpineContextSegLib.cli import main
    from SpineContextSegLib.labels import VERTEBRAE

    model = tmp_path / "vertebrae_model"
    shutil.copytree(tiny_model_dir, model)
    card = json.loads((model / "model.json").read_text())
    card.update(task="vertebrae", labels=[v.to_json() for v in VERTEBRAE])
    (model / "model.json").write_text(json.dumps(card))
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct_image(), str(ct))
    status = main(["bench", "--cases", str(ct), "--variants", "reference", "--model", str(model), "--work-dir", str(tmp_path / "work")])
    assert status != 0
    assert "[model_incompatible]" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # refused before anything ran


def test_bench_refuses_an_unknown_baseline_with_the_variants_it_knows(tmp_path, tiny_model_dir, capsys):
    from SpineContextSegLib.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--variants", "default", "--baseline", "default-3mm", "--model", tiny_model_dir, "--work-dir", str(tmp_path)])
    assert exit_info.value.code == 2  # a usage error, before any variant runs
    assert not os.listdir(tmp_path)
    error = capsys.readouterr().err
    assert "default-3mm" in error and "default-2mm" in error


def test_avx2_variants_cap_the_child_kernels_and_the_others_do_not(tmp_path, monkeypatch):
    # the emulated laptop CPU: only the child's environment changes, never this process's
    import subprocess

    from SpineContextSegLib.evaluation import bench

    seen = {}

    def fake_run(command, capture_output, text, env):
        seen[command[4]] = env.get("ONEDNN_MAX_CPU_ISA")
        return subprocess.CompletedProcess(command, 0, stdout='{"variant": "x"}\n', stderr="")

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    for variant in ("openvino-int8-avx2", "openvino-int8", "default"):
        bench._child(variant, "in.nii.gz", str(tmp_path / "out.nii.gz"), None, None)
    assert seen == {"openvino-int8-avx2": "AVX2", "openvino-int8": None, "default": None}
    assert "ONEDNN_MAX_CPU_ISA" not in os.environ


def test_repeat_runs_every_variant_but_the_references_n_times_and_keeps_the_fastest(tmp_path, tiny_model_dir, monkeypatch):
    import argparse

    from SpineContextSegLib.cli import main
    from SpineContextSegLib.errors import UsageError
    from SpineContextSegLib.evaluation import bench

    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct_image(size=(40, 36, 30)), str(ct))
    calls = []
    first_run_s = {"reference": 50.0, "default": 9.0}  # a first run slowed by loading libraries from disk

    def fake_child(variant, input_path, output_path, model_dir, threads):
        calls.append(variant)
        sitk.WriteImage(sitk.Cast(sitk.ReadImage(input_path) > 300, sitk.sitkUInt8), output_path)
        total = first_run_s[variant] if calls.count(variant) == 1 else 4.0
        return {"variant": variant, "timings_s": {"total": total}, "peak_rss_mb": 100.0, "info": {}}

    monkeypatch.setattr(bench, "_child", fake_child)
    assert main(["bench", "--cases", str(ct), "--variants", "reference,default", "--repeat", "3", "--model", tiny_model_dir,
                 "--work-dir", str(tmp_path / "work"), "--markdown", str(tmp_path / "bench.md")]) == 0
    assert calls == ["reference", "default", "default", "default"]
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.strip("|").split("|")] for line in (tmp_path / "bench.md").read_text().splitlines() if line.startswith("| ct")}
    assert float(rows["default"][10]) == 4.0 and float(rows["reference"][10]) == 50.0  # the fastest default run, the one reference run
    assert rows["default"][12] == "12.5x"  # speed-up from the fastest run
    with pytest.raises(UsageError, match="--repeat"):
        bench.run(argparse.Namespace(repeat=0, variants="default", baseline="default-2mm"))
