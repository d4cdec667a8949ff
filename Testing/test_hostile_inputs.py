"""Hostile inputs and faults: every bad or odd input gives its specific error or a correct result.

The corpus (:mod:`hostile_corpus`, generated here, tiny volumes) runs through the worker as
subprocesses: most cases grouped in one process calling the worker's ``main`` once per case,
the process-level ones (blocked imports, a file-size limit, gigantic headers, the C locale)
in processes of their own. Pipeline behaviour (no spine, GPU out of memory, memory checks,
disk full, unwritable outputs) is checked in-process with stand-in engines. Interruptions
(SIGTERM, the cancel file, SIGKILL) hit the worker at random moments (seed printed; set
``SCS_HOSTILE_SEED`` to replay one).

Invariants for every case: no traceback reaches the user, the input's bytes are unchanged,
no output, partial output or temporary file is left after a failure, no child process is
left, and the run ends in bounded time. The last test prints the summary line.

Read-only outputs: the suite runs as root, where chmod does not stop writes, so "read-only"
is exercised as ``/proc`` (refuses new files even for root), an output "folder" that is a
regular file, and ``os.access`` monkeypatched to say no.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import pytest
import SimpleITK as sitk

import hostile_corpus
from conftest import ROOT, make_ct_image
from hostile_corpus import build_corpus, evaluate, listing, run_grouped, run_own_process, snapshot

from SpineContextSegLib.io import files as fileio, images as imageio, memory as memoryio
from SpineContextSegLib.inference.engine import InferenceEngine, is_out_of_memory
from SpineContextSegLib.errors import ERROR_CODES, SegmentationError, troubleshooting_markdown
from SpineContextSegLib.inference.model_files import load_model
from SpineContextSegLib.inference.pipeline import SegmentOptions, segment_file, segment_image
from SpineContextSegLib.progress import JsonLineReporter, decode_message
from test_pipeline import BoneThresholdEngine  # the stand-in network: bone (HU > 250) is spine

#: Every case's verdict, by name; the last test of this file summarises them.
RECORDS: Dict[str, hostile_corpus.Verdict] = {}
#: How many cases this file defines when run completely (the corpus plus in-process cases).
EXPECTED_MINIMUM_CASES = 30

SEED = int(os.environ.get("SCS_HOSTILE_SEED", str(random.SystemRandom().randrange(1 << 30))))


def record(name: str, kind: str, code: Optional[str] = None, *, traceback: bool = False, input_modified: bool = False,
           leftovers: Optional[List[str]] = None, problems: Optional[List[str]] = None) -> None:
    RECORDS[name] = hostile_corpus.Verdict(kind, code, traceback, input_modified, leftovers or [], problems or [])


# ----------------------------------------------------------------------------- the corpus through the worker
@pytest.fixture(scope="module")
def no_spine_model_dir(tmp_path_factory) -> str:
    """A tiny model whose output is ~0 everywhere: a network that sees no spine."""
    from conftest import make_tiny_model

    directory = str(tmp_path_factory.mktemp("no_spine_model"))
    make_tiny_model(directory, bias=-8.0)
    return directory


def _cuda_provider_present() -> bool:
    try:
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        return False


@pytest.fixture(scope="module")
def corpus_outcomes(tmp_path_factory, tiny_model_dir, no_spine_model_dir):
    root = tmp_path_factory.mktemp("hostile")
    cases = build_corpus(str(root / "cases"), tiny_model_dir, no_spine_model_dir)
    if _cuda_provider_present():  # a real GPU here: "CUDA requested but absent" cannot be staged
        cases = [case for case in cases if case.name != "cuda_requested_absent"]
    before = {case.name: (snapshot(case.inputs), listing(case.watch_dirs)) for case in cases}
    scratch = str(root / "runs")
    os.makedirs(scratch)
    outcomes = run_grouped([case for case in cases if not case.own_process], scratch)
    for case in cases:
        if case.own_process:
            outcomes[case.name] = run_own_process(case, scratch)
    return [(case, outcomes[case.name], *before[case.name]) for case in cases]


def test_corpus_has_at_least_30_kinds_each_with_an_expected_outcome(corpus_outcomes):
    cases = [case for case, *_ in corpus_outcomes]
    assert len({case.name for case in cases}) == len(cases) >= 30
    assert all(case.expect_code is None or case.expect_code in ERROR_CODES for case in cases)
    expected_codes = {case.expect_code for case in cases}
    # every input, output, model and environment family is exercised
    assert {"input_not_found", "dicom_inconsistent", "input_unreadable", "input_too_large", "output_dir_missing", "output_is_input",
            "model_checksum", "engine_missing", "cuda_unavailable", "no_spine_found"} - ({"cuda_unavailable"} if _cuda_provider_present() else set()) <= expected_codes
    assert None in expected_codes


def test_every_case_gives_its_expected_outcome_and_keeps_the_invariants(corpus_outcomes):
    failures = []
    for case, outcome, inputs_before, listing_before in corpus_outcomes:
        verdict = evaluate(case, outcome, inputs_before, listing_before)
        RECORDS[case.name] = verdict
        if verdict.problems:
            failures.append(f"{case.name} ({case.description}): " + "; ".join(verdict.problems)
                            + f"\n    stderr tail: {outcome.stderr[-400:]!r}")
    assert not failures, "\n".join(failures)


def test_error_messages_say_what_is_wrong(corpus_outcomes):
    """Spot checks that the one-line messages name the problem, not ITK's internals."""
    by_name = {case.name: outcome for case, outcome, *_ in corpus_outcomes}

    def last_message(name: str) -> str:
        lines = [json.loads(line) for line in by_name[name].stdout.splitlines() if line.startswith("{")]
        return lines[-1]["message"]

    assert "truncated" in last_message("truncated_nii_gz")  # ITK alone would have padded it with zeros
    assert "NRRD" in last_message("misnamed_nrrd") and ".nrrd" in last_message("misnamed_nrrd")
    assert "--series" in last_message("dicom_mixed_series")
    assert "duplicated" in last_message("dicom_duplicated_slice")
    assert "gantry tilt" in last_message("dicom_gantry_tilt")
    assert "folder" in last_message("dicom_one_file_of_a_series")
    assert "is a file, not a folder" in last_message("output_under_a_file")
    assert "PB" in last_message("huge_header_mha")  # the estimate, before a byte of voxels was read
    for name in ("truncated_mha", "zero_spacing", "volume_4d"):
        assert "itk::" not in last_message(name).lower() and "exception" not in last_message(name).lower()


# ----------------------------------------------------------------------------- pipeline behaviour, in-process
class FakeGpuEngine(InferenceEngine):
    """A 'CUDA' engine whose first predict raises ``error``; its CPU fallback is ``fallback``."""

    name = "fake-gpu"
    device = "cuda"

    def __init__(self, error: BaseException, fallback: Optional[InferenceEngine]):
        self.error, self.fallback, self.calls = error, fallback, 0

    def predict(self, batch):
        self.calls += 1
        raise self.error

    def cpu_fallback(self):
        return self.fallback


class CpuEngineOutOfMemory(FakeGpuEngine):
    name = "fake-cpu"
    device = "cpu"


@pytest.fixture(scope="module")
def bundle(tiny_model_dir):
    return load_model(tiny_model_dir)


def _run_file_case(name: str, tmp_path, image, expect_code: Optional[str], *, output_name="mask.nii.gz", fault=None, **kwargs):
    """segment_file on ``image`` written to disk, after ``fault()`` (if any); record the verdict with the file invariants."""
    source = tmp_path / "in" / "ct.nii.gz"
    source.parent.mkdir(exist_ok=True)
    (tmp_path / "out").mkdir(exist_ok=True)
    sitk.WriteImage(image, str(source))
    before = snapshot([str(source)])
    if fault is not None:
        fault()
    error: Optional[BaseException] = None
    try:
        segment_file(str(source), str(tmp_path / "out" / output_name), **kwargs)
    except SegmentationError as caught:
        error = caught
    except Exception as caught:  # noqa: BLE001 - a non-SegmentationError would reach the user as a traceback
        error = caught
    modified = snapshot([str(source)]) != before
    leftovers = sorted(os.listdir(tmp_path / "out")) if expect_code is not None else [
        n for n in os.listdir(tmp_path / "out") if n.startswith(fileio.TEMP_PREFIX)]
    leftovers += sorted(set(os.listdir(tmp_path / "in")) - {"ct.nii.gz"})
    code = getattr(error, "code", None)
    traceback = error is not None and not isinstance(error, SegmentationError)
    problems = [] if code == expect_code else [f"expected {expect_code}, got {error!r}"]
    record(name, "error" if expect_code else "result", code, traceback=traceback, input_modified=modified, leftovers=leftovers, problems=problems)
    assert not traceback, error
    assert code == expect_code, error
    assert not modified
    assert leftovers == []
    return error


def _phantom(fill) -> sitk.Image:
    image = make_ct_image(size=(40, 40, 30), spacing=(2.0, 2.0, 2.0))
    hu = np.full(sitk.GetArrayViewFromImage(image).shape, -1000.0, np.float32)
    fill(hu)
    hu += np.random.default_rng(0).normal(0, 8, hu.shape).astype(np.float32)
    phantom = sitk.GetImageFromArray(hu.astype(np.int16))
    phantom.CopyInformation(image)
    return phantom


@pytest.mark.parametrize("name,fill", [
    ("no_spine_water_phantom", lambda hu: hu.__setitem__((slice(5, 25), slice(8, 32), slice(8, 32)), 0.0)),
    ("no_spine_soft_tissue_only", lambda hu: [hu.__setitem__((slice(0, 30), slice(6, 34), slice(4, 36)), -100.0),
                                              hu.__setitem__((slice(0, 30), slice(10, 30), slice(8, 32)), 50.0)]),
    ("no_spine_air_only", lambda hu: None),
])
def test_no_spine_in_the_field_of_view_is_no_spine_found_not_a_blob(tmp_path, bundle, name, fill):
    engine = BoneThresholdEngine()
    _run_file_case(name, tmp_path, _phantom(fill), "no_spine_found", options=SegmentOptions(), bundle=bundle, engine=engine)
    assert engine.calls > 0  # the network ran and found nothing: not refused up front


def test_gpu_out_of_memory_retries_on_the_cpu_with_a_warning(tmp_path, bundle):
    image = make_ct_image()
    stream = io.StringIO()
    gpu = FakeGpuEngine(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)"), BoneThresholdEngine())
    result = segment_image(image, SegmentOptions(min_spine_ml=0.5), reporter=JsonLineReporter(stream), bundle=bundle, engine=gpu)
    warnings = [json.loads(line) for line in stream.getvalue().splitlines() if '"warning"' in line]
    assert [w["code"] for w in warnings] == ["gpu_out_of_memory"]
    assert gpu.calls == 1 and gpu.fallback.calls > 0
    assert result.info["engine"].startswith("bone-threshold (cpu")
    reference = segment_image(image, SegmentOptions(min_spine_ml=0.5), bundle=bundle, engine=BoneThresholdEngine())
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result.mask), sitk.GetArrayViewFromImage(reference.mask))
    record("gpu_out_of_memory_cpu_retry", "result")


@pytest.mark.parametrize("name,engine", [
    ("cpu_out_of_memory", CpuEngineOutOfMemory(MemoryError(), None)),
    ("gpu_out_of_memory_without_fallback", FakeGpuEngine(RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer"), None)),
])
def test_out_of_memory_without_a_fallback_is_a_clear_error(tmp_path, bundle, name, engine):
    _run_file_case(name, tmp_path, make_ct_image(), "out_of_memory", options=SegmentOptions(min_spine_ml=0.5), bundle=bundle, engine=engine)


def test_other_engine_failures_are_not_mistaken_for_memory(bundle):
    assert is_out_of_memory(MemoryError()) and is_out_of_memory(RuntimeError("CUDA failure 2: out of memory"))
    assert not is_out_of_memory(RuntimeError("Invalid input shape")) and not is_out_of_memory(ValueError("bad_value"))
    with pytest.raises(RuntimeError, match="Invalid input shape"):
        segment_image(make_ct_image(), SegmentOptions(), bundle=bundle, engine=FakeGpuEngine(RuntimeError("Invalid input shape"), BoneThresholdEngine()))


def test_memory_is_checked_before_resampling(tmp_path, bundle, monkeypatch):
    from SpineContextSegLib.inference import preprocessing

    monkeypatch.setattr(memoryio, "available_memory_bytes", lambda: 100_000)
    monkeypatch.setattr(preprocessing, "to_canonical", lambda *a, **k: pytest.fail("resampled before the memory check"))
    engine = BoneThresholdEngine()
    with pytest.raises(SegmentationError) as error:
        segment_image(make_ct_image(), SegmentOptions(), bundle=bundle, engine=engine)
    assert error.value.code == "input_too_large" and engine.calls == 0
    assert error.value.details["needed_bytes"] > error.value.details["available_bytes"] == 100_000
    record("too_little_memory_for_the_canonical_grid", "error", "input_too_large")


def test_memory_is_checked_from_the_header_before_reading_voxels(tmp_path, monkeypatch):
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(make_ct_image(), str(path))
    monkeypatch.setattr(memoryio, "available_memory_bytes", lambda: 10_000)
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", lambda self: pytest.fail("voxels read before the memory check"))
    with pytest.raises(SegmentationError) as error:
        imageio.read_image(str(path))
    assert error.value.code == "input_too_large"
    record("too_little_memory_for_the_input", "error", "input_too_large")


def test_available_memory_is_known_and_positive_on_linux():
    available = memoryio.available_memory_bytes()
    if sys.platform.startswith("linux"):
        assert available is not None and 2 ** 26 < available < 2 ** 50


def _write_then_fail(fail_with, keep_fraction=0.5):
    real_write = sitk.WriteImage

    def write(image, path, *args, **kwargs):
        real_write(image, path, *args, **kwargs)
        with open(path, "rb") as handle:
            data = handle.read()
        with open(path, "wb") as handle:
            handle.write(data[: int(len(data) * keep_fraction)])
        if fail_with is not None:
            raise fail_with

    return write


@pytest.mark.parametrize("name,failure", [
    ("disk_full_oserror", OSError(errno.ENOSPC, "No space left on device")),
    ("disk_full_itk_error", RuntimeError("ITK ERROR: NiftiImageIO: Could not write file: No space left on device")),
    ("disk_full_silent_short_write", None),  # ITK's NIfTI writer reports a short write only on stderr
])
def test_disk_full_while_writing_leaves_no_file(tmp_path, bundle, monkeypatch, name, failure):
    _run_file_case(name, tmp_path, make_ct_image(), "disk_full", options=SegmentOptions(min_spine_ml=0.5), bundle=bundle, engine=BoneThresholdEngine(),
                   fault=lambda: monkeypatch.setattr(sitk, "WriteImage", _write_then_fail(failure)))


def test_disk_full_on_the_surface_removes_the_mask_already_written(tmp_path, bundle, monkeypatch):
    real_replace = os.replace

    def replace(source, target):
        if str(target).endswith(".stl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(source, target)

    _run_file_case("disk_full_on_the_stl", tmp_path, make_ct_image(), "disk_full", options=SegmentOptions(min_spine_ml=0.5), bundle=bundle,
                   engine=BoneThresholdEngine(), stl_path=str(tmp_path / "out" / "spine.stl"), fault=lambda: monkeypatch.setattr(fileio.os, "replace", replace))


def test_read_only_output_is_refused_before_any_computing(tmp_path, bundle, monkeypatch):
    engine = BoneThresholdEngine()
    _run_file_case("output_not_writable_access", tmp_path, make_ct_image(), "output_not_writable", bundle=bundle, engine=engine,
                   fault=lambda: monkeypatch.setattr(fileio.os, "access", lambda *args, **kwargs: False))
    assert engine.calls == 0


def test_unsigned_ct_without_rescale_is_shifted_to_hounsfield_units(tmp_path):
    ct = make_ct_image()
    hu = sitk.GetArrayFromImage(ct)
    stored = sitk.GetImageFromArray((hu.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16))
    stored.CopyInformation(ct)
    sitk.WriteImage(stored, str(tmp_path / "ct.nrrd"))
    stream = io.StringIO()
    image = imageio.read_image(str(tmp_path / "ct.nrrd"), reporter=JsonLineReporter(stream))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu.clip(-1024, 4095 - 1024))
    assert [json.loads(line)["code"] for line in stream.getvalue().splitlines()] == ["input_unsigned_ct"]
    record("uint16_read_back_as_hu", "result")


def test_unsigned_images_without_the_ct_pattern_are_not_shifted_but_flagged(tmp_path):
    rng = np.random.default_rng(0)
    mr = sitk.GetImageFromArray(rng.integers(1500, 3000, (20, 24, 28)).astype(np.uint16))  # no air, no soft tissue band
    sitk.WriteImage(mr, str(tmp_path / "mr.nii.gz"))
    stream = io.StringIO()
    image = imageio.read_image(str(tmp_path / "mr.nii.gz"), reporter=JsonLineReporter(stream))
    assert image.GetPixelID() == sitk.sitkUInt16
    assert [json.loads(line)["code"] for line in stream.getvalue().splitlines()] == ["input_not_ct"]
    record("uint16_not_ct", "result")


def test_stale_temporary_files_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    host = fileio._HOST_TAG
    names = {
        "dead": f"{fileio.TEMP_PREFIX}{dead_pid}.{host}.abc123.nii.gz",
        "alive": f"{fileio.TEMP_PREFIX}{os.getpid()}.{host}.def456.nii.gz",
        "other_host": f"{fileio.TEMP_PREFIX}{dead_pid}.{host}x.ghi789.nii.gz",
        "legacy": f"{fileio.TEMP_PREFIX}jkl012.nii.gz",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    imageio.write_labelmap(sitk.Image([4, 4, 4], sitk.sitkUInt8), str(tmp_path / "mask.nii.gz"))
    assert sorted(os.listdir(tmp_path)) == sorted(["mask.nii.gz", names["alive"], names["other_host"], names["legacy"]])


def test_cuda_requested_without_cuda_is_a_clear_error(bundle):
    from SpineContextSegLib.inference.engine import create_engine

    if _cuda_provider_present():
        pytest.skip("onnxruntime has a CUDA provider here")
    with pytest.raises(SegmentationError) as error:
        create_engine(bundle, engine="onnxruntime", device="cuda")
    assert error.value.code == "cuda_unavailable"
    assert create_engine(bundle, engine="onnxruntime", device="auto").device == "cpu"  # auto falls back


# ----------------------------------------------------------------------------- interruptions at random moments
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def interruption_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("interrupt_input") / "ct.nii.gz"
    sitk.WriteImage(make_ct_image(size=(96, 80, 60), spacing=(2.0, 2.0, 2.0)), str(path))
    return str(path)


def _interrupt(kind: str, index: int, tmp_path, input_path: str, model_dir: str):
    """Start the worker, stop it after a random protocol line plus a random delay; return what happened."""
    rng = random.Random(f"{SEED}-{kind}-{index}")
    out = tmp_path / "out"
    out.mkdir()
    cancel = tmp_path / "cancel"
    command = [sys.executable, "-m", "SpineContextSegLib.worker", input_path, "-o", str(out / "mask.nii.gz"), "--stl", str(out / "spine.stl"),
               "--model", model_dir, "--overlap", "0.75", "--cancel-file", str(cancel)]
    before = snapshot([input_path])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT, start_new_session=True)
    after_line, delay = rng.randint(1, 14), rng.uniform(0.0, 0.4)
    lines = []
    while len(lines) < after_line:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(decode_message(line) or {})
    time.sleep(delay)
    if kind == "cancel":
        cancel.write_text("")
    else:
        with contextlib.suppress(OSError):  # it may have finished already
            os.kill(process.pid, signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=hostile_corpus.CASE_TIMEOUT_S)
    lines += [message for message in map(decode_message, stdout.splitlines()) if message is not None]
    left = hostile_corpus.processes_in_group(process.pid)
    moment = f"seed {SEED}: after line {after_line} + {delay:.2f} s"
    return process.returncode, lines, stderr, before, left, moment


def _mask_is_complete(path: str, input_path: str) -> bool:
    try:
        return sitk.ReadImage(path).GetSize() == sitk.ReadImage(input_path).GetSize() and imageio.nifti_file_is_complete(path)
    except RuntimeError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("kind,index", [("sigterm", 0), ("sigterm", 1), ("cancel", 0), ("cancel", 1)])
def test_sigterm_and_cancel_at_a_random_moment_stop_cleanly(tmp_path, tiny_model_dir, interruption_input, kind, index):
    status, lines, stderr, before, left, moment = _interrupt(kind, index, tmp_path, interruption_input, tiny_model_dir)
    code = "terminated" if kind == "sigterm" else "cancelled"
    outputs = sorted(os.listdir(tmp_path / "out"))
    traceback = hostile_corpus.TRACEBACK_MARK in stderr
    modified = snapshot([interruption_input]) != before
    if status == 0:  # the signal came after the last check: the run had finished, outputs complete
        finished_cleanly = lines[-1]["type"] == "result" and outputs == ["mask.nii.gz", "spine.stl"]
        finished_cleanly = finished_cleanly and _mask_is_complete(str(tmp_path / "out" / "mask.nii.gz"), interruption_input)
        record(f"{kind}_{index}", "result", traceback=traceback, input_modified=modified, problems=[] if finished_cleanly else ["incomplete"])
        assert finished_cleanly, moment
    else:
        record(f"{kind}_{index}", "error", lines[-1].get("code"), traceback=traceback, input_modified=modified, leftovers=outputs)
        assert status == ERROR_CODES[code].exit_status, f"{moment}: exit {status}, {stderr[-500:]}"
        assert lines[-1]["type"] == "error" and lines[-1]["code"] == code, moment
        assert outputs == [], f"{moment}: left {outputs}"
    assert not traceback and not modified and not left, moment


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_sigkill_at_a_random_moment_leaves_nothing_partial(tmp_path, tiny_model_dir, interruption_input, index):
    status, lines, stderr, before, left, moment = _interrupt("sigkill", index, tmp_path, interruption_input, tiny_model_dir)
    out = tmp_path / "out"
    finals = [name for name in os.listdir(out) if not name.startswith(fileio.TEMP_PREFIX)]
    temps = [name for name in os.listdir(out) if name.startswith(fileio.TEMP_PREFIX)]
    if "mask.nii.gz" in finals:  # renamed into place only once complete
        assert _mask_is_complete(str(out / "mask.nii.gz"), interruption_input), moment
    assert set(finals) <= {"mask.nii.gz", "spine.stl"}, moment
    # a temporary file may survive SIGKILL; it carries the dead PID, and the next write in the folder removes it
    fileio.remove_stale_temp_files(str(out))
    assert [name for name in os.listdir(out) if name.startswith(fileio.TEMP_PREFIX)] == [], f"{moment}: {temps}"
    assert snapshot([interruption_input]) == before and not left, moment


# ----------------------------------------------------------------------------- documentation
def test_troubleshooting_page_is_generated_from_the_error_codes():
    from SpineContextSegLib.errors import README_BEGIN, README_END

    with open(os.path.join(ROOT, "docs", "troubleshooting.md"), encoding="utf-8") as handle:
        page = handle.read()
    block = page.split(README_BEGIN + "\n", 1)[1].split(README_END, 1)[0]
    assert block == troubleshooting_markdown(), "regenerate: python -m SpineContextSegLib.errors docs/troubleshooting.md"
    text = troubleshooting_markdown()
    for code, kind in ERROR_CODES.items():
        assert f"| `{code}` | {kind.exit_status} |" in text


# ----------------------------------------------------------------------------- summary (keep last)
def test_zz_corpus_summary(capsys):
    verdicts = list(RECORDS.values())
    errors = sum(v.kind == "error" for v in verdicts)
    results = sum(v.kind == "result" for v in verdicts)
    tracebacks = sum(v.traceback for v in verdicts)
    modified = sum(v.input_modified for v in verdicts)
    leftovers = sum(bool(v.leftovers) for v in verdicts)
    wrong = sorted(name for name, v in RECORDS.items() if v.kind not in ("error", "result") or v.problems)
    line = (f"{len(verdicts)} cases: {errors} clear errors, {results} correct results, {tracebacks} tracebacks, "
            f"{modified} inputs modified, {leftovers} leftovers" + (f", {len(wrong)} wrong: {', '.join(wrong)}" if wrong else ""))
    print("\n" + line)  # kept in the report when the test fails
    with capsys.disabled():  # and shown in every run, -q or not, whatever the capture mode
        sys.stdout.write("\nhostile corpus: " + line + "\n")
        sys.__stderr__.write("hostile corpus: " + line + "\n")
        sys.__stderr__.flush()
    assert tracebacks == modified == leftovers == 0 and not wrong, line
    if "missing_file" in RECORDS:  # the corpus ran (not a -k selection of single tests)
        assert len(verdicts) >= EXPECTED_MINIMUM_CASES, line
