"""The command-line tool and the worker, run as real subprocesses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import SimpleITK as sitk

from conftest import ROOT, SAMPLE_CT, make_ct_image

ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")


def run_cli(*args, timeout=120, module="SpineContextSegLib.cli"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def json_lines(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_sample_run_writes_mask_on_the_input_grid_a_watertight_stl_and_a_qc_picture(tmp_path, tiny_model_dir):
    from SpineContextSegLib.io.stl import is_watertight, read_stl

    out = tmp_path / "out"
    completed = run_cli("segment", "--sample", "-o", str(out), "--model", tiny_model_dir, "--progress", "none")
    assert completed.returncode == 0, completed.stderr
    mask = sitk.ReadImage(str(out / "sample_spine.nii.gz"))
    ct = sitk.ReadImage(SAMPLE_CT)
    assert mask.GetSize() == ct.GetSize()
    assert mask.GetSpacing() == pytest.approx(ct.GetSpacing())
    assert mask.GetOrigin() == pytest.approx(ct.GetOrigin(), abs=1e-4)
    assert mask.GetDirection() == pytest.approx(ct.GetDirection(), abs=1e-6)
    assert is_watertight(read_stl(str(out / "sample_spine.stl")))
    assert (out / "sample_qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "random weights" in completed.stderr.lower()  # the untrained placeholder says so


def test_json_progress_protocol(tmp_path, tiny_model_dir):
    completed = run_cli(SAMPLE_CT, "-o", str(tmp_path / "m.nrrd"), "--model", tiny_model_dir, module="SpineContextSegLib.worker")
    assert completed.returncode == 0, completed.stderr
    messages = json_lines(completed.stdout)  # every stdout line is JSON
    assert messages[0]["type"] == "started" and isinstance(messages[0]["pid"], int)
    progress = [m for m in messages if m["type"] == "progress"]
    assert {"read", "preprocess", "network", "postprocess", "write"} <= {m["stage"] for m in progress}
    assert all(set(m) >= {"stage", "done", "total", "eta_s"} for m in progress)
    assert all(0 <= m["done"] <= m["total"] for m in progress)
    assert any(m["type"] == "warning" and m["code"] == "model_untrained" for m in messages)
    result = messages[-1]
    assert result["type"] == "result"
    assert os.path.isfile(result["outputs"]["mask"])
    assert result["labels"][0]["name"] == "Spine"


@pytest.mark.parametrize(
    "args,code,status",
    [
        (["/no/such/ct.nii.gz", "-o", "{tmp}/m.nii.gz"], "input_not_found", 10),
        ([SAMPLE_CT, "-o", "{tmp}/missing-folder/m.nii.gz"], "output_dir_missing", 11),
        ([SAMPLE_CT, "-o", "{tmp}/m.png"], "output_format", 11),
        ([SAMPLE_CT, "-o", "{tmp}/m.nii.gz", "--model", "{tmp}/no-model"], "model_not_found", 12),
    ],
)
def test_errors_are_one_json_line_with_a_stable_code_and_no_traceback(tmp_path, tiny_model_dir, args, code, status):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--model" not in args:
        args += ["--model", tiny_model_dir]
    completed = run_cli(*args, module="SpineContextSegLib.worker")
    assert completed.returncode == status
    last = json_lines(completed.stdout)[-1]
    assert last == {"type": "error", "code": code, "message": last["message"], "exit_status": status}
    assert "Traceback" not in completed.stderr + completed.stdout
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".nii.gz", ".png"))]


def test_human_errors_go_to_stderr(tmp_path, tiny_model_dir):
    completed = run_cli("segment", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "m.nii.gz"), "--model", tiny_model_dir)
    assert completed.returncode == 10
    assert completed.stderr.strip().splitlines()[-1].startswith("error [input_not_found]:")
    assert "Traceback" not in completed.stderr


def test_cancel_file_stops_the_run_and_removes_outputs(tmp_path, tiny_model_dir):
    cancel = tmp_path / "cancel"
    cancel.write_text("")
    completed = run_cli(SAMPLE_CT, "-o", str(tmp_path / "m.nii.gz"), "--model", tiny_model_dir, "--cancel-file", str(cancel), module="SpineContextSegLib.worker")
    assert completed.returncode == 20
    assert json_lines(completed.stdout)[-1]["code"] == "cancelled"
    assert sorted(os.listdir(tmp_path)) == ["cancel"]


def test_sigterm_mid_run_stops_cleanly(tmp_path, tiny_model_dir):
    # many tiles (overlap 0.9) so the run is still in the network stage when the signal arrives
    process = subprocess.Popen(
        [sys.executable, "-m", "SpineContextSegLib.worker", SAMPLE_CT, "-o", str(tmp_path / "m.nii.gz"), "--stl", str(tmp_path / "m.stl"),
         "--model", tiny_model_dir, "--overlap", "0.9", "--no-crop"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
    )
    lines = []
    deadline = time.time() + 60
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(json.loads(line))
        if lines[-1].get("stage") == "network" and lines[-1].get("done", 0) >= 1:
            process.send_signal(signal.SIGTERM)
            break
    out, err = process.communicate(timeout=60)
    lines += json_lines(out)
    assert process.returncode == 21, err
    assert lines[-1]["code"] == "terminated"
    assert os.listdir(tmp_path) == []


def test_sigterm_after_the_result_line_keeps_the_finished_run(tmp_path, tiny_model_dir):
    # the outcome is reported and the outputs are final: a signal during interpreter shutdown
    # must not turn the run into a death by SIGTERM (exit -15)
    process = subprocess.Popen(
        [sys.executable, "-m", "SpineContextSegLib.worker", SAMPLE_CT, "-o", str(tmp_path / "m.nii.gz"), "--model", tiny_model_dir],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
    )
    lines = []
    for line in process.stdout:
        lines.append(json.loads(line))
        if lines[-1]["type"] == "result":
            break
    while process.poll() is None:  # keep signalling until it has exited: one lands in the shutdown
        process.send_signal(signal.SIGTERM)
        time.sleep(0.005)
    out, err = process.communicate(timeout=60)
    assert lines[-1]["type"] == "result" and process.returncode == 0, err
    assert os.listdir(tmp_path) == ["m.nii.gz"]


def test_segment_called_in_process_restores_the_callers_signal_handlers(tmp_path, tiny_model_dir):
    from SpineContextSegLib import cli

    def callers_handler(signum, frame):  # pragma: no cover - never called
        pass

    previous = signal.signal(signal.SIGTERM, callers_handler)
    callers_interrupt = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest itself runs in the background
    try:
        assert cli.main(["segment", SAMPLE_CT, "-o", str(tmp_path / "m.nii.gz"), "--model", tiny_model_dir, "--progress", "none"]) == 0
        assert signal.getsignal(signal.SIGTERM) is callers_handler
        assert signal.getsignal(signal.SIGINT) is callers_interrupt
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_batch_folder_is_resumable_and_shardable(tmp_path, tiny_model_dir):
    cases = tmp_path / "cases"
    cases.mkdir()
    for i in range(3):
        sitk.WriteImage(make_ct_image(seed=i), str(cases / f"case{i}.nii.gz"))
    out = tmp_path / "out"
    out.mkdir()
    first = run_cli("segment", str(cases), "-o", str(out), "--model", tiny_model_dir, "--shard", "0/2", "--progress", "json")
    assert first.returncode == 0, first.stderr
    assert sorted(os.listdir(out)) == ["case0_spine.nii.gz", "case2_spine.nii.gz"]
    second = run_cli("segment", str(cases), "-o", str(out), "--model", tiny_model_dir, "--progress", "json")
    assert second.returncode == 0
    kinds = [m["type"] for m in json_lines(second.stdout)]
    assert kinds.count("skipped") == 2 and kinds.count("result") == 1
    assert sorted(os.listdir(out)) == ["case0_spine.nii.gz", "case1_spine.nii.gz", "case2_spine.nii.gz"]


def test_info_labels_random_weights(tiny_model_dir):
    completed = run_cli("info", "--model", tiny_model_dir)
    assert completed.returncode == 0
    assert "RANDOM" in completed.stdout
    assert "onnxruntime" in completed.stdout or "openvino" in completed.stdout


def test_mesh_command(tmp_path):
    from SpineContextSegLib.io.stl import is_watertight, read_stl

    label = sitk.GetImageFromArray((sitk.GetArrayFromImage(make_ct_image()) > 300).astype("uint8"))
    sitk.WriteImage(label, str(tmp_path / "label.nii.gz"))
    completed = run_cli("mesh", str(tmp_path / "label.nii.gz"), "-o", str(tmp_path / "s.stl"))
    assert completed.returncode == 0, completed.stderr
    assert is_watertight(read_stl(str(tmp_path / "s.stl")))


def test_bad_usage_exits_2():
    completed = run_cli("segment", "-o", "x.nii.gz")
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr


def test_a_grid_spacing_outside_what_a_network_can_run_on_is_a_usage_error(tmp_path, tiny_model_dir):
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct_image(), str(ct))
    for option, value in (("--spacing-mm", "0.1"), ("--spacing-mm", "nan"), ("--spacing-mm", "-2"), ("--fine-spacing-mm", "-1"), ("--fine-spacing-mm", "0.1")):
        completed = run_cli("segment", str(ct), "-o", str(tmp_path / "m.nii.gz"), "--model", tiny_model_dir, option, value)
        assert completed.returncode == 2 and option in completed.stderr and "Traceback" not in completed.stderr
    assert sorted(os.listdir(tmp_path)) == ["ct.nii.gz"]
    completed = run_cli("segment", str(ct), "-o", str(tmp_path / "m.nii.gz"), "--model", tiny_model_dir, "--spacing-mm", "4", "--progress", "json")
    assert completed.returncode == 0
    result = [line for line in json_lines(completed.stdout) if line.get("type") == "result"][0]
    assert result["info"]["spacing_mm"] == [4.0, 4.0, 4.0]
