"""The spine's region of interest (--roi) and centreline with curvature (--centreline)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.inference.model_files import load_model
from SpineContextSegLib.inference.pipeline import SegmentOptions, segment_file
from SpineContextSegLib.inference.spine_geometry import spine_centreline, spine_roi

from conftest import ROOT, BoneThresholdEngine, make_ct_image


def rotation(axis, degrees):
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    angle = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


OBLIQUE = rotation((1.0, 2.0, 0.5), 25.0)  # no axis along a world axis
PIR = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # sagittal slabs, as SimpleITK's columns


def voxel_corners_lps(image: sitk.Image, ijk: np.ndarray) -> np.ndarray:
    """(8 N, 3) LPS corners of the voxels ``ijk`` (N, 3)."""
    origin = np.array(image.GetOrigin())
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    offsets = np.array([[dx, dy, dz] for dx in (-0.5, 0.5) for dy in (-0.5, 0.5) for dz in (-0.5, 0.5)])
    corners = (ijk[:, None, :] + offsets[None]).reshape(-1, 3)
    return origin + (corners * spacing) @ direction.T


# ----------------------------------------------------------------------------- region of interest
@pytest.mark.parametrize("direction", [None, OBLIQUE, PIR], ids=["identity", "oblique", "PIR"])
def test_roi_holds_every_spine_voxel_plus_the_margin_in_physical_space(direction):
    from SpineContextSegLib.phantoms.generator import generate_phantom

    kwargs = {} if direction is None else {"direction": direction.ravel().tolist()}
    phantom = generate_phantom(5, first_level="T11", last_level="L3", spacing_mm=3.0, **kwargs)
    margin = 10.0
    roi = spine_roi(phantom.vertebra_labels, margin_mm=margin, labels=None)
    mask = sitk.GetArrayFromImage(phantom.vertebra_labels) > 0
    ijk = np.argwhere(mask)[:, ::-1].astype(float)
    corners = voxel_corners_lps(phantom.vertebra_labels, ijk)

    axes = np.array(roi["axes"])
    assert np.allclose(axes.T, np.array(phantom.ct.GetDirection()).reshape(3, 3), atol=1e-6)  # the image's own axes
    half = np.array(roi["size_mm"]) / 2
    projection = (corners - np.array(roi["centre_lps_mm"])) @ axes.T  # along each box axis, mm
    # every voxel grown by the margin lies inside, and the box is no larger: touching on all six sides
    assert np.all(np.abs(projection) <= half - margin + 2e-3)
    assert np.allclose(projection.max(axis=0), half - margin, atol=2e-3)
    assert np.allclose(projection.min(axis=0), -(half - margin), atol=2e-3)
    box_corners = np.array(roi["corners_lps_mm"])
    assert np.allclose(box_corners.min(axis=0), roi["lps_min_mm"]) and np.allclose(box_corners.max(axis=0), roi["lps_max_mm"])
    assert np.all(corners.min(axis=0) - margin >= np.array(roi["lps_min_mm"]) - 1e-2)

    # the voxel box: every spine voxel plus margin/spacing voxels, clipped to the image
    start, size = np.array(roi["index"]), np.array(roi["size"])
    spacing = np.array(phantom.ct.GetSpacing())
    image_size = np.array(phantom.ct.GetSize())
    grown_low = np.maximum(ijk.min(axis=0) - np.ceil(margin / spacing - 1e-6), 0)
    grown_high = np.minimum(ijk.max(axis=0) + np.ceil(margin / spacing - 1e-6), image_size - 1)
    assert np.array_equal(start, grown_low) and np.array_equal(start + size - 1, grown_high)
    assert np.array_equal(np.array(roi["index_max"]), start + size - 1)
    assert roi["clipped"] == bool(np.any(ijk.min(axis=0) * spacing < margin) or np.any((image_size - 1 - ijk.max(axis=0)) * spacing < margin))

    # one box per vertebra, each inside the whole one
    assert [segment["value"] for segment in roi["segments"]] == sorted(phantom.levels)
    for segment in roi["segments"]:
        assert np.all(np.array(segment["index"]) >= start) and np.all(np.array(segment["index_max"]) <= start + size - 1)


def test_roi_of_an_empty_mask_is_no_spine_found():
    empty = sitk.Image([8, 8, 8], sitk.sitkUInt8)
    with pytest.raises(SegmentationError) as error:
        spine_roi(empty)
    assert error.value.code == "no_spine_found"


def test_segment_file_writes_roi_and_centreline_json_atomically(tmp_path, tiny_model_dir):
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct_image(size=(40, 36, 30), spacing=(1.6, 1.6, 3.0), direction=tuple(OBLIQUE.ravel())), str(source))
    bundle = load_model(tiny_model_dir)
    result = segment_file(
        str(source), str(tmp_path / "mask.nii.gz"), SegmentOptions(min_spine_ml=0.5), bundle=bundle, engine=BoneThresholdEngine(),
        roi_path=str(tmp_path / "roi.json"), roi_margin_mm=5.0, centreline_path=str(tmp_path / "line.json"),
    )
    assert result["outputs"]["roi"] == str(tmp_path / "roi.json") and result["outputs"]["centreline"] == str(tmp_path / "line.json")
    assert sorted(os.listdir(tmp_path)) == ["ct.nii.gz", "line.json", "mask.nii.gz", "roi.json"]
    roi = json.loads((tmp_path / "roi.json").read_text())
    from SpineContextSegLib.labels import SPINE

    assert roi == json.loads(json.dumps(spine_roi(sitk.ReadImage(str(tmp_path / "mask.nii.gz")), margin_mm=5.0, labels=[SPINE])))
    assert roi["margin_mm"] == 5.0 and roi["space"] == "LPS" and roi["segments"][0]["name"] == "Spine"
    line = json.loads((tmp_path / "line.json").read_text())
    assert line["space"] == "LPS" and len(line["points_lps_mm"]) == len(line["arc_mm"]) >= 2


def test_json_outputs_with_another_extension_fail_before_computing(tmp_path, tiny_model_dir):
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct_image(), str(source))
    engine = BoneThresholdEngine()
    for keywords in ({"roi_path": str(tmp_path / "roi.txt")}, {"centreline_path": str(tmp_path / "line")}):
        with pytest.raises(SegmentationError) as error:
            segment_file(str(source), str(tmp_path / "m.nii.gz"), SegmentOptions(), bundle=load_model(tiny_model_dir), engine=engine, **keywords)
        assert error.value.code == "output_format" and ".json" in error.value.message
    assert engine.calls == 0 and sorted(os.listdir(tmp_path)) == ["ct.nii.gz"]


def test_a_negative_roi_margin_is_a_usage_error(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "SpineContextSegLib.cli", "segment", "x.nii.gz", "-o", str(tmp_path / "m.nii.gz"), "--roi", str(tmp_path / "r.json"), "--roi-margin-mm", "-1"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert completed.returncode == 2 and "--roi-margin-mm" in completed.stderr and "Traceback" not in completed.stderr


# ----------------------------------------------------------------------------- centreline
def end_vertebrae_coronal_angle(phantom) -> float:
    """The phantom's own coronal angle between its top and bottom vertebrae (top minus bottom tilt, degrees)."""
    axes = phantom.params["vertebra_axes"]
    levels = [str(v) for v in phantom.levels if v != 26]
    top, bottom = np.array(axes[levels[0]])[2], np.array(axes[levels[-1]])[2]  # row 2: the vertebra's superior axis
    return float(np.degrees(np.arctan2(top[0], top[2]) - np.arctan2(bottom[0], bottom[2])))


@pytest.mark.parametrize("seed", [30, 39])
def test_the_coronal_angle_follows_the_scoliosis_and_a_straight_spine_gives_about_zero(seed):
    from SpineContextSegLib.phantoms.generator import generate_phantom

    measured = {}
    for scoliosis in (20.0, -20.0, 0.0):
        phantom = generate_phantom(seed, first_level="T6", last_level="L5", spacing_mm=3.0, field_of_view="spine", scoliosis_deg=scoliosis, lumbar_lordosis_deg=40.0)
        bend = (phantom.params["scoliosis_start"], phantom.params["scoliosis_start"] + phantom.params["scoliosis_length"])
        assert 12 <= bend[0] and bend[1] <= 23  # the whole bend lies between T6 (chain index 12) and L5 (23)
        line = spine_centreline(phantom.spine_mask)
        coronal = line["coronal"]
        expected = end_vertebrae_coronal_angle(phantom)
        assert expected == pytest.approx(-scoliosis, abs=0.5)  # the phantom's convention: tilt going down
        assert coronal["end_angle_deg"] == pytest.approx(expected, abs=5.0), (scoliosis, coronal)
        assert coronal["cobb_like_angle_deg"] == pytest.approx(abs(scoliosis), abs=5.0)
        assert len(line["vertebrae"]) == len(phantom.levels)
        measured[scoliosis] = coronal["end_angle_deg"]
    assert measured[20.0] < -15 < measured[0.0] - 10 < measured[-20.0] - 20  # ordered, well apart
    assert abs(measured[0.0]) < 2.0


def test_centreline_points_run_through_the_bodies_in_lps_also_for_an_oblique_grid():
    from SpineContextSegLib.phantoms.generator import generate_phantom

    results = []
    for direction in (None, OBLIQUE):
        kwargs = {} if direction is None else {"direction": direction.ravel().tolist()}
        phantom = generate_phantom(39, first_level="T11", last_level="L3", spacing_mm=3.0, field_of_view="spine", scoliosis_deg=0.0, **kwargs)
        line = spine_centreline(phantom.vertebra_labels, labels=None)
        points = np.array(line["points_lps_mm"])
        assert np.all(np.diff(points[:, 2]) > 0)  # inferior to superior
        centres = phantom.params["vertebra_centres_mm"]  # world frame = LPS
        for level in phantom.levels:
            centre = np.array(centres[str(level)])
            assert np.min(np.linalg.norm(points - centre, axis=1)) < 3.0, level
        # a vertebrae label map names its bodies, inferior to superior
        assert [v["label"] for v in line["vertebrae"]] == [str(level) for level in reversed(phantom.levels)]
        results.append(line)
    for plane in ("sagittal", "coronal"):
        assert results[0][plane]["end_angle_deg"] == pytest.approx(results[1][plane]["end_angle_deg"], abs=3.0)
