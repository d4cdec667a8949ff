"""Tests of SpineContextSegLib.evaluation.evaluate: scoring cases, CSV/Markdown, the ``evaluate`` command."""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import types

import numpy as np
import pytest
import SimpleITK as sitk

from SpineContextSegLib.evaluation import evaluate, metrics
from SpineContextSegLib.io.grids import GridMismatchError
from SpineContextSegLib.errors import SegmentationError

SPACING_XYZ = (0.8, 0.8, 1.5)
SPACING_ZYX = SPACING_XYZ[::-1]
SLAB = (slice(6, 13), slice(None), slice(None))  # centroids of the two labels at slices 6 and 12


def _arrays():
    """Labels, ground truth, CT and a prediction (numpy, LPS: axis 0 is S-I).

    Two labelled vertebrae (slices 4-8 and 10-14, 4x4 voxels each) -> slab = slices 6..12,
    which holds 96 ground-truth voxels (slice 9 is the disc gap).
    """
    labels = np.zeros((24, 10, 10), dtype=np.uint8)
    labels[4:9, 3:7, 3:7] = 20
    labels[10:15, 3:7, 3:7] = 21
    gt = labels > 0
    ct = np.full(labels.shape, -1000, dtype=np.int16)
    ct[gt] = 400
    ct[7, 0:2, :] = 300  # a rib inside the slab: 20 threshold false positives
    ct[18:22, 3:7, 3:7] = 500  # an unlabelled vertebra below the slab: ignored
    pred = gt.copy()
    pred[9, 0, :] = True  # 10 false positives inside the slab
    pred[18:22, 3:7, 3:7] = True  # correct bone on the unlabelled level: ignored
    return labels, gt, ct, pred


TP = 96
MODEL_DICE = 2 * TP / (2 * TP + 10)
THRESHOLD_DICE = 2 * TP / (2 * TP + 20)


def _image(array, orientation=None):
    image = sitk.GetImageFromArray(array.astype(np.int16) if array.dtype == np.int16 else array.astype(np.uint8))
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin((10.0, -20.0, 30.0))
    return sitk.DICOMOrient(image, orientation) if orientation else image


class StandInCase:
    """The duck type of datasets.Case, in memory."""

    def __init__(self, case_id, ct_img, label_img):
        self.case_id = case_id
        self._ct, self._labels = ct_img, label_img

    def load(self):
        return self._ct, self._labels

    def load_spine_mask(self):
        return sitk.Cast(self._labels > 0, sitk.sitkUInt8)


def _expected_distances(pred, gt):
    return metrics.surface_distances_mm(pred, gt, SPACING_ZYX, region=SLAB)


# --------------------------------------------------------------------------- evaluate_cases

def test_evaluate_cases_rows():
    labels, gt, ct, pred = _arrays()
    cases = [
        StandInCase("lps", _image(ct), _image(labels)),
        StandInCase("pir", _image(ct, "PIR"), _image(labels, "PIR")),  # sagittal slabs, as VerSe
    ]
    predictions = {"lps": _image(pred), "pir": _image(pred, "PIR")}
    seen = []

    def predict(ct_img):
        case_id = "pir" if ct_img.GetDirection() != (1, 0, 0, 0, 1, 0, 0, 0, 1) else "lps"
        seen.append(case_id)
        return predictions[case_id]

    rows = evaluate.evaluate_cases(cases, predict)
    assert seen == ["lps", "pir"]
    assert [row["case"] for row in rows] == ["lps", "pir"]
    hd95, assd = _expected_distances(pred, gt)
    assert hd95 > 0
    for row in rows:
        assert row["dice"] == pytest.approx(MODEL_DICE)
        assert row["precision"] == pytest.approx(TP / (TP + 10)) and row["recall"] == 1.0
        assert row["threshold_dice"] == pytest.approx(THRESHOLD_DICE)
        assert (row["hd95_mm"], row["assd_mm"]) == pytest.approx((hd95, assd))
        assert (row["tp"], row["fp"], row["fn"]) == (TP, 10, 0)
        assert row["seconds"] >= 0.0
    assert (rows[0]["si_axis"], rows[0]["slab_start"], rows[0]["slab_stop"]) == (0, 6, 13)
    assert (rows[1]["si_axis"], rows[1]["slab_start"], rows[1]["slab_stop"]) == (1, 24 - 13, 24 - 6)


def test_evaluate_cases_options():
    labels, gt, ct, pred = _arrays()
    case = StandInCase("a", _image(ct), _image(labels))
    row = evaluate.evaluate_cases([case], lambda ct_img: _image(pred), use_slab=False, include_threshold_baseline=False)[0]
    assert "threshold_dice" not in row
    # whole volume: 10 + 64 false positives, all 160 ground-truth voxels
    assert row["dice"] == pytest.approx(2 * 160 / (2 * 160 + 74))
    assert (row["slab_start"], row["slab_stop"]) == (0, 24)


def test_evaluate_cases_rejects_prediction_off_grid():
    labels, gt, ct, pred = _arrays()
    case = StandInCase("a", _image(ct), _image(labels))
    with pytest.raises(GridMismatchError, match="CT's voxel grid"):
        evaluate.evaluate_cases([case], lambda ct_img: _image(pred, "PIR"))


# --------------------------------------------------------------------------- CSV / Markdown
ROWS = [
    {"case": "a", "dice": 0.91234, "iou": 0.8, "precision": 0.95, "recall": 0.875, "f1": 0.91234,
     "hd95_mm": 3.26, "assd_mm": 0.74, "threshold_dice": 0.7049, "seconds": 12.34},
    {"case": "b", "dice": 0.5, "iou": 1 / 3, "precision": 0.25, "recall": 1.0, "f1": 0.5,
     "hd95_mm": math.inf, "assd_mm": 2.0, "threshold_dice": 0.7, "seconds": math.nan},
]


def test_markdown_table_format_and_mean_row(tmp_path):
    path = tmp_path / "scores.md"
    text = evaluate.write_markdown(ROWS, str(path))
    assert path.read_text() == text
    lines = text.strip().splitlines()
    assert lines[0] == "| Case | Dice | IoU | Precision | Recall | HD95 (mm) | ASSD (mm) | HU>200 Dice | Seconds |"
    assert lines[2] == "| a | 0.912 | 0.800 | 0.950 | 0.875 | 3.3 | 0.7 | 0.705 | 12.3 |"
    assert lines[3] == "| b | 0.500 | 0.333 | 0.250 | 1.000 | inf | 2.0 | 0.700 | n/a |"
    assert lines[4] == "| **mean (2)** | 0.706 | 0.567 | 0.600 | 0.938 | inf | 1.4 | 0.702 | n/a |"
    assert len(lines) == 5


def test_csv_round_trip(tmp_path):
    path = tmp_path / "scores.csv"
    evaluate.write_csv(ROWS, str(path))
    with open(path, newline="") as handle:
        read = list(csv.DictReader(handle))
    assert list(read[0])[:3] == ["case", "dice", "iou"]
    assert float(read[0]["dice"]) == 0.91234
    assert read[1]["hd95_mm"] == "inf" and read[1]["seconds"] == "nan"


# --------------------------------------------------------------------------- the command

def _write_dataset(root):
    """Two cases on disk (LPS and PIR) and their predictions; returns the prediction folder."""
    labels, gt, ct, pred = _arrays()
    pred_dir = root / "predictions"
    pred_dir.mkdir(parents=True)
    for case_id, orientation in (("case_lps", None), ("case_pir", "PIR")):
        folder = root / "data" / case_id
        folder.mkdir(parents=True)
        sitk.WriteImage(_image(ct, orientation), str(folder / "ct.nii.gz"))
        sitk.WriteImage(_image(labels, orientation), str(folder / "labels.nii.gz"))
    sitk.WriteImage(_image(pred), str(pred_dir / "case_lps.nii.gz"))
    sitk.WriteImage(_image(gt, "PIR"), str(pred_dir / "case_pir.nii.gz"))  # a perfect prediction
    return pred_dir


@pytest.fixture
def stand_in_datasets(monkeypatch):
    """A stand-in for SpineContextSegLib.io.datasets: a case is a folder with ct.nii.gz and labels.nii.gz."""

    class FolderCase(StandInCase):
        def __init__(self, folder):
            self.case_id = os.path.basename(folder)
            self._folder = folder

        def load(self):
            return (sitk.ReadImage(os.path.join(self._folder, "ct.nii.gz")), sitk.ReadImage(os.path.join(self._folder, "labels.nii.gz")))

        def load_spine_mask(self):
            return sitk.Cast(self.load()[1] > 0, sitk.sitkUInt8)

    def find_cases(root):
        if os.path.isfile(os.path.join(root, "ct.nii.gz")):
            return [FolderCase(root)]
        return [FolderCase(os.path.join(root, name)) for name in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, name, "ct.nii.gz"))]

    module = types.ModuleType("SpineContextSegLib.io.datasets")
    module.find_cases = find_cases
    monkeypatch.setitem(sys.modules, "SpineContextSegLib.io.datasets", module)
    return module


def _parse(argv):
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return parser.parse_args(argv)


def test_run_with_pred_dir_writes_csv_and_markdown(tmp_path, stand_in_datasets, capsys):
    pred_dir = _write_dataset(tmp_path)
    csv_path, md_path = tmp_path / "out.csv", tmp_path / "out.md"
    args = _parse([str(tmp_path / "data"), "--pred-dir", str(pred_dir), "--csv", str(csv_path), "--markdown", str(md_path)])
    assert evaluate.run(args) == 0

    with open(csv_path, newline="") as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == ["case_lps", "case_pir"]
    labels, gt, ct, pred = _arrays()
    hd95, assd = _expected_distances(pred, gt)
    assert float(rows["case_lps"]["dice"]) == pytest.approx(MODEL_DICE)
    assert float(rows["case_lps"]["hd95_mm"]) == pytest.approx(hd95)
    assert float(rows["case_lps"]["assd_mm"]) == pytest.approx(assd)
    assert float(rows["case_pir"]["dice"]) == 1.0 and float(rows["case_pir"]["hd95_mm"]) == 0.0
    for row in rows.values():
        assert float(row["threshold_dice"]) == pytest.approx(THRESHOLD_DICE)
        assert row["seconds"] == "nan"  # read from disk: no model time to report

    text = md_path.read_text()
    assert capsys.readouterr().out == text
    lines = text.strip().splitlines()
    assert lines[2].startswith(f"| case_lps | {MODEL_DICE:.3f} | ")
    assert lines[2].endswith(f" | {hd95:.1f} | {assd:.1f} | {THRESHOLD_DICE:.3f} | n/a |")
    assert lines[3].startswith("| case_pir | 1.000 | 1.000 | 1.000 | 1.000 | 0.0 | 0.0 | ")
    assert lines[4].startswith(f"| **mean (2)** | {(MODEL_DICE + 1) / 2:.3f} | ")


def test_run_no_slab_and_case_list_file(tmp_path, stand_in_datasets, capsys):
    pred_dir = _write_dataset(tmp_path)
    case_list = tmp_path / "cases.txt"
    case_list.write_text("# evaluation cases\ndata/case_lps\n\n")
    assert evaluate.run(_parse([str(case_list), "--pred-dir", str(pred_dir), "--no-slab"])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4  # header, rule, one case, mean
    assert lines[2].startswith(f"| case_lps | {2 * 160 / (2 * 160 + 74):.3f} | ")


def test_run_reports_user_errors(tmp_path, stand_in_datasets):
    pred_dir = _write_dataset(tmp_path)
    os.remove(pred_dir / "case_pir.nii.gz")
    with pytest.raises(SegmentationError) as error:
        evaluate.run(_parse([str(tmp_path / "data"), "--pred-dir", str(pred_dir)]))
    assert error.value.code == "input_not_found" and "case_pir" in error.value.message
    with pytest.raises(SegmentationError) as error:
        evaluate.run(_parse([str(tmp_path / "nowhere"), "--pred-dir", str(pred_dir)]))
    assert error.value.code == "input_not_found"
    # a prediction on another grid
    labels, gt, ct, pred = _arrays()
    sitk.WriteImage(_image(gt), str(pred_dir / "case_pir.nii.gz"))
    with pytest.raises(SegmentationError) as error:
        evaluate.run(_parse([str(tmp_path / "data" / "case_pir"), "--pred-dir", str(pred_dir)]))
    assert error.value.code == "input_geometry"


def test_pred_dir_and_model_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        _parse(["x", "--pred-dir", "p", "--model", "m"])
    assert "not allowed with" in capsys.readouterr().err


def test_cli_evaluate_command(tmp_path, stand_in_datasets, capsys):
    from SpineContextSegLib import cli

    pred_dir = _write_dataset(tmp_path)
    assert cli.main(["evaluate", str(tmp_path / "data"), "--pred-dir", str(pred_dir)]) == 0
    assert "| case_pir | 1.000 |" in capsys.readouterr().out
    os.remove(pred_dir / "case_lps.nii.gz")
    assert cli.main(["evaluate", str(tmp_path / "data"), "--pred-dir", str(pred_dir)]) == 10
    assert "input_not_found" in capsys.readouterr().err


def test_vertebra_evaluation_scores_identification_and_per_vertebra_dice():
    import numpy as np
    import SimpleITK as sitk

    from SpineContextSegLib.evaluation.evaluate import evaluate_vertebra_cases

    labels = np.zeros((60, 20, 20), np.uint8)
    for index, verse_id in enumerate((20, 21, 22)):  # L1-L3 stacked along z (LPS: z superior)
        labels[45 - 15 * index : 55 - 15 * index, 5:15, 5:15] = verse_id
    ct = sitk.GetImageFromArray(np.where(labels > 0, 400, -1000).astype(np.int16))
    truth = sitk.GetImageFromArray(labels)

    class Case:
        case_id = "column"

        def load(self):
            return ct, truth

        def load_vertebra_labels(self):
            return truth

    swapped = labels.copy()
    swapped[labels == 20], swapped[labels == 21] = 21, 20  # L1 and L2 named the wrong way round

    def predict(image):
        out = sitk.GetImageFromArray(swapped)
        out.CopyInformation(image)
        return out

    (row,) = evaluate_vertebra_cases([Case()], predict)
    assert row["identification_rate"] == pytest.approx(1 / 3)
    assert row["mean_vertebra_dice"] == pytest.approx(1 / 3)
    names = [item.split()[0] for item in row["vertebrae"].split(", ")]
    dices = [float(item.split()[1]) for item in row["vertebrae"].split(", ")]
    distances_mm = [float(item.split("(")[1].split()[0]) for item in row["vertebrae"].split(", ")]
    assert names == ["L1", "L2", "L3"] and dices == [0.0, 0.0, 1.0]
    assert distances_mm[2] == 0.0 and min(distances_mm[:2]) >= 10.0  # L1/L2 named 15 mm away
    assert row["median_vertebra_hd95_mm"] == pytest.approx(max(distances_mm[:2]), abs=0.05)


def test_threshold_grid_and_overlap_reach_the_model_run_and_bad_values_are_usage_errors(tmp_path, stand_in_datasets, monkeypatch):
    from SpineContextSegLib.errors import UsageError
    from SpineContextSegLib.inference import pipeline

    pred_dir = _write_dataset(tmp_path)
    seen = []

    def fake_segment_image(ct_img, options, bundle=None, engine=None):
        seen.append((options.threshold, options.spacing_mm, options.overlap, options.fine_spacing_mm))
        mask = sitk.Cast(ct_img > 300, sitk.sitkUInt8)
        return pipeline.SegmentationResult(mask=mask, labels=[], timings_s={}, info={})

    monkeypatch.setattr(pipeline, "load_model_and_engine", lambda options: (None, None))
    monkeypatch.setattr(pipeline, "segment_image", fake_segment_image)
    assert evaluate.run(_parse([str(tmp_path / "data"), "--threshold", "0.4", "--spacing-mm", "2", "--overlap", "0.5", "--fine-spacing-mm", "0"])) == 0
    assert seen == [(0.4, 2.0, 0.5, 0.0), (0.4, 2.0, 0.5, 0.0)]
    bad = (
        ["--threshold", "1.5"], ["--threshold", "0"], ["--spacing-mm", "0.1"], ["--spacing-mm", "nan"], ["--overlap", "1"], ["--overlap", "-0.1"],
        ["--fine-spacing-mm", "-1"], ["--fine-spacing-mm", "0.1"],
    )
    for argv in bad + (["--pred-dir", str(pred_dir), "--threshold", "0.4"], ["--pred-dir", str(pred_dir), "--overlap", "0.5"], ["--pred-dir", str(pred_dir), "--fine-spacing-mm", "0"]):
        with pytest.raises(UsageError):
            evaluate.run(_parse([str(tmp_path / "data")] + argv))
    assert len(seen) == 2  # refused before any case ran
