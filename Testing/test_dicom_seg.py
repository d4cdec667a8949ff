"""DICOM in, DICOM SEG out: references, codes, voxels per segment, and the errors before computing."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from SpineContextSegLib.errors import ERROR_CODES, SegmentationError
from SpineContextSegLib.inference.pipeline import SegmentOptions, segment_file

from conftest import ROOT, BoneThresholdEngine, make_ct_image

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_ct_series(folder, hu_zyx, *, spacing=(1.5, 1.5, 3.0), origin=(-48.0, -40.0, 100.0), direction=None, reverse_names=False):
    """A complete CT Image Storage series (one file per slice, pydicom): ``hu_zyx`` (k, j, i) int16 HU.

    ``direction``: 3x3, column n = index axis n in LPS (as SimpleITK's); slice k lies at
    ``origin + k * spacing[2] * direction[:, 2]`` (a left-handed direction makes the slices step
    against the row x column normal). ``reverse_names`` numbers the files against the slice order.
    Returns {"study", "series", "frame_of_reference", "sop_uids" (slice order), "files"}.
    """
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder, exist_ok=True)
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    depth, rows, columns = hu_zyx.shape
    sop_uids, files = [], []
    for k in range(depth):
        sop = generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Synthetic^Spine", "SCS-0001", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "120000", "1", "A1", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "CT", 3, k + 1, "Synthetic"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin, dtype=float) + direction[:, 2] * spacing[2] * k]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in np.concatenate([direction[:, 0], direction[:, 1]])]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]  # row spacing (j), column spacing (i)
        ds.SliceThickness = f"{spacing[2]:g}"
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = np.ascontiguousarray(hu_zyx[k].astype(np.int16)).tobytes()
        path = os.path.join(folder, f"CT{(depth - 1 - k) if reverse_names else k:04d}.dcm")
        try:
            ds.save_as(path, enforce_file_format=True)  # pydicom 3
        except TypeError:  # pydicom 2
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(path, write_like_original=False)
        sop_uids.append(sop)
        files.append(path)
    return {"study": study, "series": series, "frame_of_reference": frame, "sop_uids": sop_uids, "files": files}


def synthetic_ct(size=(64, 64, 24)):
    """64x64x24 at 1.5 x 1.5 x 3 mm: a soft-tissue body and a bright bone column along z (conftest)."""
    return sitk.GetArrayFromImage(make_ct_image(size=size, spacing=(1.5, 1.5, 3.0)))


def source_slice_index(mask: sitk.Image, path: str) -> int:
    import pydicom

    position = pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient
    return int(round(mask.TransformPhysicalPointToContinuousIndex([float(v) for v in position])[2]))


def assert_seg_matches_labelmap(seg_path, labelmap: sitk.Image, series: dict, labels):
    """The SEG read back: BINARY, the source's references and codes, and per segment exactly the label map's voxels."""
    highdicom = pytest.importorskip("highdicom")
    seg = highdicom.seg.segread(seg_path)
    assert seg.SegmentationType == "BINARY"
    assert seg.Modality == "SEG"
    assert seg.FrameOfReferenceUID == series["frame_of_reference"]
    assert seg.StudyInstanceUID == series["study"] and seg.PatientID == "SCS-0001" and str(seg.PatientName) == "Synthetic^Spine"
    assert seg.SeriesInstanceUID != series["series"]
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series["series"]
    assert sorted(item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence) == sorted(series["sop_uids"])
    assert all(item.ReferencedSOPClassUID == CT_IMAGE_STORAGE for item in referenced.ReferencedInstanceSequence)

    array = sitk.GetArrayFromImage(labelmap)
    present = [label for label in labels if np.any(array == label.value)]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [label.name for label in present]
    for number, (item, label) in enumerate(zip(seg.SegmentSequence, present), start=1):
        assert item.SegmentNumber == number
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "123037004")
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodingSchemeDesignator, kind.CodeValue, kind.CodeMeaning) == ("SCT", label.snomed_code, label.snomed_meaning)
        if label.region:
            assert item.AnatomicRegionSequence[0].CodeValue == label.region[1]
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "SpineContextSeg" and algorithm.AlgorithmVersion
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        assert len(item.RecommendedDisplayCIELabValue) == 3

    numbers = list(range(1, len(present) + 1))
    for sop_uid, path in zip(series["sop_uids"], series["files"]):
        k = source_slice_index(labelmap, path)
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[sop_uid], segment_numbers=numbers, assert_missing_frames_are_empty=True
        )[0]
        for number, label in zip(numbers, present):
            assert np.array_equal(pixels[..., number - 1] > 0, array[k] == label.value), (label.name, k)
    return seg


# ----------------------------------------------------------------------------- round trips
def test_a_dicom_series_segments_into_a_dicom_seg_referencing_its_slices(tmp_path, bundle):
    pytest.importorskip("highdicom")
    series = write_ct_series(str(tmp_path / "ct"), synthetic_ct())
    before = {name: open(name, "rb").read() for name in series["files"]}
    out = tmp_path / "out"
    out.mkdir()
    result = segment_file(
        str(tmp_path / "ct"), str(out / "seg.dcm"), SegmentOptions(min_spine_ml=0.5), bundle=bundle, engine=BoneThresholdEngine(),
        stl_path=str(out / "spine.stl"),
    )
    assert result["outputs"]["mask"] == str(out / "seg.dcm")
    assert sorted(os.listdir(out)) == ["seg.dcm", "spine.stl"]  # no temporary file left
    assert {name: open(name, "rb").read() for name in series["files"]} == before  # the input is only read

    # the label map the SEG must hold: the same run written as NIfTI, on the source grid
    segment_file(str(tmp_path / "ct"), str(tmp_path / "mask.nii.gz"), SegmentOptions(min_spine_ml=0.5), bundle=bundle, engine=BoneThresholdEngine())
    labelmap = sitk.ReadImage(str(tmp_path / "mask.nii.gz"))
    assert sitk.GetArrayViewFromImage(labelmap).any()
    from SpineContextSegLib.labels import SPINE

    seg = assert_seg_matches_labelmap(str(out / "seg.dcm"), labelmap, series, [SPINE])
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters.count("tiny-random-test-model")


@pytest.mark.parametrize(
    "direction",
    [
        None,
        # oblique (20 degrees about z) and left-handed: the slices step against the row x column normal
        np.array([[0.9397, -0.3420, 0.0], [0.3420, 0.9397, 0.0], [0.0, 0.0, -1.0]]),
    ],
)
def test_a_vertebra_label_map_round_trips_per_segment_with_its_codes(tmp_path, direction):
    pytest.importorskip("highdicom")
    from SpineContextSegLib.io.images import read_image, write_labelmap
    from SpineContextSegLib.labels import vertebra_by_verse_id

    series = write_ct_series(str(tmp_path / "ct"), synthetic_ct((48, 40, 16)), direction=direction, reverse_names=True)
    ct = read_image(str(tmp_path / "ct"))
    bone = sitk.GetArrayFromImage(ct) > 250
    labels_array = np.zeros(bone.shape, np.uint8)
    k = np.arange(bone.shape[0])[:, None, None]
    labels_array[bone & (k < 6)] = 20  # L1
    labels_array[bone & (k >= 6) & (k < 11)] = 28  # T13: generic "Vertebra" with the thoracic spine as region
    labels_array[bone & (k >= 12)] = 19  # T12 (slice 11 stays empty: an omitted frame)
    labelmap = sitk.GetImageFromArray(labels_array)
    labelmap.CopyInformation(ct)
    labels = [vertebra_by_verse_id(v) for v in (19, 28, 20, 21)]  # L2 (21) has no voxel: no segment
    path = write_labelmap(labelmap, str(tmp_path / "vertebrae.dcm"), labels, source=str(tmp_path / "ct"), model="test 1.0")
    assert path == str(tmp_path / "vertebrae.dcm")
    assert_seg_matches_labelmap(path, labelmap, series, labels)


def test_the_vertebrae_task_writes_one_segment_per_named_vertebra(tmp_path, bundle):
    pytest.importorskip("highdicom")
    from SpineContextSegLib.phantoms.generator import generate_phantom

    phantom = generate_phantom(4, first_level="T12", last_level="L3", spacing_mm=3.0, field_of_view="spine", noise_hu=10.0, screws=False)
    series = write_ct_series(
        str(tmp_path / "ct"), sitk.GetArrayFromImage(phantom.ct), spacing=phantom.ct.GetSpacing(), origin=phantom.ct.GetOrigin(),
        direction=np.array(phantom.ct.GetDirection()).reshape(3, 3),
    )
    options = SegmentOptions(task="vertebrae", min_spine_ml=0.5)
    result = segment_file(str(tmp_path / "ct"), str(tmp_path / "v.dcm"), options, bundle=bundle, engine=BoneThresholdEngine())
    segment_file(str(tmp_path / "ct"), str(tmp_path / "v.nii.gz"), options, bundle=bundle, engine=BoneThresholdEngine())
    from SpineContextSegLib.labels import vertebra_by_verse_id

    labels = [vertebra_by_verse_id(label["value"]) for label in result["labels"]]
    assert len(labels) >= 3
    assert_seg_matches_labelmap(str(tmp_path / "v.dcm"), sitk.ReadImage(str(tmp_path / "v.nii.gz")), series, labels)


def test_the_command_line_writes_a_dicom_seg_roi_and_centreline_for_a_dicom_folder(tmp_path, tiny_model_dir):
    pytest.importorskip("highdicom")
    series = write_ct_series(str(tmp_path / "ct"), synthetic_ct((48, 48, 20)))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    completed = subprocess.run(
        [sys.executable, "-m", "SpineContextSegLib.worker", str(tmp_path / "ct"), "-o", str(tmp_path / "seg.dcm"), "--model", tiny_model_dir,
         "--roi", str(tmp_path / "roi.json"), "--roi-margin-mm", "5", "--centreline", str(tmp_path / "line.json")],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["type"] == "result"
    assert result["outputs"] == {"mask": str(tmp_path / "seg.dcm"), "roi": str(tmp_path / "roi.json"), "centreline": str(tmp_path / "line.json")}
    import highdicom

    seg = highdicom.seg.segread(str(tmp_path / "seg.dcm"))
    assert seg.FrameOfReferenceUID == series["frame_of_reference"] and seg.SegmentSequence[0].SegmentLabel == "Spine"
    assert json.loads((tmp_path / "roi.json").read_text())["margin_mm"] == 5.0
    assert json.loads((tmp_path / "line.json").read_text())["format"] == "spinecontextseg-centreline/1"


def test_a_seg_written_into_the_ct_folder_leaves_it_one_series(tmp_path):
    pytest.importorskip("highdicom")
    from SpineContextSegLib.io.dicom import dicom_series_ids
    from SpineContextSegLib.io.images import read_image, write_labelmap

    series = write_ct_series(str(tmp_path / "ct"), synthetic_ct((32, 32, 8)))
    ct = read_image(str(tmp_path / "ct"))
    write_labelmap(sitk.Cast(ct > 250, sitk.sitkUInt8), str(tmp_path / "ct" / "seg.dcm"), source=str(tmp_path / "ct"))
    assert dicom_series_ids(str(tmp_path / "ct")) == [series["series"]]
    assert read_image(str(tmp_path / "ct")).GetSize() == ct.GetSize()


# ----------------------------------------------------------------------------- errors, before any computing
def test_dicom_seg_output_for_a_non_dicom_input_fails_before_computing(tmp_path, bundle):
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct_image(), str(source))
    engine = BoneThresholdEngine()
    with pytest.raises(SegmentationError) as error:
        segment_file(str(source), str(tmp_path / "seg.dcm"), SegmentOptions(), bundle=bundle, engine=engine)
    assert error.value.code == "dicom_seg_needs_dicom_input" and engine.calls == 0
    assert "DICOM" in error.value.message and ".seg.nrrd" in error.value.message
    assert sorted(os.listdir(tmp_path)) == ["ct.nii.gz"]
    assert ERROR_CODES["dicom_seg_needs_dicom_input"].remedy


def test_the_command_line_says_what_to_do_for_a_dicom_seg_of_a_nifti(tmp_path, tiny_model_dir):
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct_image(), str(source))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    completed = subprocess.run(
        [sys.executable, "-m", "SpineContextSegLib.cli", "segment", str(source), "-o", str(tmp_path / "seg.dcm"), "--model", tiny_model_dir, "--progress", "json"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    last = json.loads(completed.stdout.strip().splitlines()[-1])
    assert last["type"] == "error" and last["code"] == "dicom_seg_needs_dicom_input"
    assert completed.returncode == ERROR_CODES["dicom_seg_needs_dicom_input"].exit_status == 11
    assert "Traceback" not in completed.stderr
    assert not [line for line in completed.stdout.splitlines() if '"progress"' in line and '"network"' in line]


def test_a_missing_highdicom_is_a_clear_environment_error(tmp_path, monkeypatch):
    pytest.importorskip("pydicom")
    from SpineContextSegLib.io.dicom_seg import check_dicom_seg_output

    write_ct_series(str(tmp_path / "ct"), synthetic_ct((32, 32, 4)))
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom -> ImportError
    with pytest.raises(SegmentationError) as error:
        check_dicom_seg_output(str(tmp_path / "seg.dcm"), str(tmp_path / "ct"))
    assert error.value.code == "dicom_support_missing" and error.value.exit_status == 13
    assert 'pip install "spinecontextseg[dicom]"' in error.value.message


def test_a_series_without_frame_of_reference_is_refused_before_computing(tmp_path, bundle):
    pytest.importorskip("highdicom")
    from hostile_corpus import _axial, write_dicom_series  # SimpleITK-written slices: no FrameOfReferenceUID

    write_dicom_series(str(tmp_path / "ct"), _axial([2.5 * i for i in range(12)]))
    engine = BoneThresholdEngine()
    with pytest.raises(SegmentationError) as error:
        segment_file(str(tmp_path / "ct"), str(tmp_path / "seg.dcm"), SegmentOptions(), bundle=bundle, engine=engine)
    assert error.value.code == "dicom_seg_source_invalid" and "FrameOfReferenceUID" in error.value.message
    assert engine.calls == 0


def test_a_dicom_seg_never_overwrites_a_slice_of_its_series(tmp_path, bundle):
    pytest.importorskip("highdicom")
    series = write_ct_series(str(tmp_path / "ct"), synthetic_ct((32, 32, 4)))
    before = open(series["files"][0], "rb").read()
    with pytest.raises(SegmentationError) as error:
        segment_file(str(tmp_path / "ct"), series["files"][0], SegmentOptions(), bundle=bundle, engine=BoneThresholdEngine())
    assert error.value.code == "output_is_input"
    assert open(series["files"][0], "rb").read() == before
    assert len(glob.glob(str(tmp_path / "ct" / "*"))) == 4
