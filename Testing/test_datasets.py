"""Dataset discovery and label mapping of SpineContextSegLib.io.datasets, and label grids (io.grids), on tiny fake trees."""
from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from SpineContextSegLib.io.datasets import Case, find_cases, guess_label_format, patient_level_split
from SpineContextSegLib.io.grids import on_grid_of
from SpineContextSegLib.errors import SegmentationError

SHAPE = (6, 8, 10)  # numpy (z, y, x)
SPACING = (1.5, 1.25, 2.0)
ORIGIN = (10.0, -20.0, 30.0)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # rotated, so a lost direction would show


def write(path, array, *, origin=ORIGIN, spacing=SPACING, direction=DIRECTION, dtype=np.uint8) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = sitk.GetImageFromArray(np.asarray(array, dtype=dtype))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    sitk.WriteImage(image, path)
    return path


def write_ct(path, **geometry) -> str:
    hu = np.linspace(-1000, 1500, int(np.prod(SHAPE))).reshape(SHAPE)
    return write(path, hu, dtype=np.int16, **geometry)


def labels_with(values) -> np.ndarray:
    """A label array with one slab of voxels per value (value i in z-slice i)."""
    array = np.zeros(SHAPE, dtype=np.int32)
    for z, value in enumerate(values):
        array[z, 2:5, 3:7] = value
    return array


def array(image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def by_id(cases):
    return {case.case_id: case for case in cases}


# ------------------------------------------------------------------ shared layout
@pytest.fixture
def shared_root(tmp_path):
    root = tmp_path / "real"
    write_ct(str(root / "verse_case" / "ct.nii.gz"))
    write(str(root / "verse_case" / "seg_vert.nii.gz"), labels_with([20, 21]))
    write(str(root / "verse_case" / "seg_subreg.nii.gz"), labels_with([41, 50]))
    write_ct(str(root / "ts_case" / "ct.nii.gz"))
    # TotalSegmentator v2: 27 = L5, 25 = sacrum, 5 = liver, 79 = spinal cord, 50 = C1, 26 = S1
    write(str(root / "ts_case" / "seg_vertebrae_spine_report.nii.gz"), labels_with([27, 25, 5, 79, 50, 26]))
    write(str(root / "ts_case" / "seg_total_fast_3mm.nii.gz"), labels_with([1, 1, 1, 1, 1, 1]))  # must lose to the report
    write(str(root / "ts_case" / "seg_total_highres_slices82-111.nii.gz"), labels_with([31]))
    write_ct(str(root / "t12_case" / "ct.nii.gz"))
    write(str(root / "t12_case" / "seg_vertebrae_T12.nii.gz"), labels_with([0, 1, 1]))
    write_ct(str(root / "unlabelled" / "ct.nii.gz"))
    write(str(root / "unlabelled" / "seg_subreg.nii.gz"), labels_with([41]))
    return str(root)


def test_shared_layout_discovery_and_formats(shared_root):
    cases = find_cases(shared_root)
    assert [c.case_id for c in cases] == ["t12_case", "ts_case", "verse_case"]  # sorted; unlabelled folder skipped
    found = by_id(cases)
    assert found["verse_case"].label_format == "verse" and found["verse_case"].label_path.endswith("seg_vert.nii.gz")
    assert found["ts_case"].label_format == "totalsegmentator"
    assert found["ts_case"].label_path.endswith("seg_vertebrae_spine_report.nii.gz")
    assert found["t12_case"].label_format == "binary" and found["t12_case"].partial_labels
    assert not found["verse_case"].partial_labels and not found["ts_case"].partial_labels
    assert all(c.patient_id == c.case_id for c in cases)
    assert find_cases(shared_root, layout="shared") == cases


def test_shared_single_case_folder(shared_root):
    cases = find_cases(os.path.join(shared_root, "verse_case"))
    assert [c.case_id for c in cases] == ["verse_case"]


def test_totalsegmentator_ids_map_to_verse_and_mask_excludes_sacrum(shared_root):
    case = by_id(find_cases(shared_root))["ts_case"]
    ct, raw = case.load()
    # load() keeps the stored TotalSegmentator ids (organs included), on the CT grid
    assert set(np.unique(array(raw))) == {0, 27, 25, 5, 79, 50, 26}
    vertebrae = array(case.load_vertebra_labels())
    assert vertebrae.dtype == np.uint8
    assert [vertebrae[z, 3, 4] for z in range(6)] == [24, 26, 0, 0, 1, 26]  # L5, sacrum, liver, cord, C1, S1
    mask = array(case.load_spine_mask())
    assert [mask[z, 3, 4] for z in range(6)] == [1, 0, 0, 0, 1, 0]  # sacrum and S1 are not spine
    assert set(np.unique(mask)) == {0, 1}


def test_verse_labels_and_t12_binary(shared_root):
    found = by_id(find_cases(shared_root))
    verse = found["verse_case"]
    assert set(np.unique(array(verse.load_vertebra_labels()))) == {0, 20, 21}
    assert int(array(verse.load_spine_mask()).sum()) == 2 * 12
    t12 = found["t12_case"]
    labels = array(t12.load_vertebra_labels())
    assert set(np.unique(labels)) == {0, 19}
    assert int((labels == 19).sum()) == 2 * 12
    np.testing.assert_array_equal(array(t12.load_spine_mask()), (labels == 19).astype(np.uint8))


def test_returned_images_are_on_the_ct_grid(shared_root):
    for case in find_cases(shared_root):
        ct, raw = case.load()
        for image in (raw, case.load_vertebra_labels(), case.load_spine_mask()):
            assert image.GetSize() == ct.GetSize()
            assert image.GetOrigin() == ct.GetOrigin()
            assert image.GetSpacing() == ct.GetSpacing()
            assert image.GetDirection() == ct.GetDirection()


# ------------------------------------------------------------------ geometry
def test_label_with_float_noise_gets_ct_geometry_without_resampling(tmp_path):
    # NRRD keeps double-precision origins (NIfTI would round 1e-7 away in float32)
    root = tmp_path / "nrrd"
    write_ct(str(root / "images" / "c.nrrd"))
    noisy_origin = tuple(o + 1e-7 for o in ORIGIN)
    values = labels_with([20, 21, 22, 23, 24, 26])
    label_path = write(str(root / "labels" / "c.nrrd"), values, origin=noisy_origin)
    label_origin = sitk.ReadImage(label_path).GetOrigin()
    assert label_origin != ORIGIN and np.allclose(label_origin, ORIGIN, atol=1e-6)  # the file really differs, slightly
    ct, raw = find_cases(str(root))[0].load()
    assert raw.GetOrigin() == ct.GetOrigin() == ORIGIN
    np.testing.assert_array_equal(array(raw), values)  # copied header, no resampling
    assert case_grid_matches(find_cases(str(root))[0], ct)


def case_grid_matches(case, ct) -> bool:
    images = (case.load_vertebra_labels(), case.load_spine_mask())
    return all(
        (i.GetSize(), i.GetOrigin(), i.GetSpacing(), i.GetDirection()) == (ct.GetSize(), ct.GetOrigin(), ct.GetSpacing(), ct.GetDirection())
        for i in images
    )


def test_on_grid_of_copies_geometry_and_leaves_input_alone():
    ct = sitk.GetImageFromArray(np.zeros(SHAPE, np.int16))
    ct.SetOrigin(ORIGIN)
    ct.SetDirection(DIRECTION)
    label = sitk.GetImageFromArray(labels_with([3, 4]).astype(np.uint8))
    label.SetOrigin(tuple(o + 1e-7 for o in ORIGIN))
    label.SetDirection(tuple(d + 1e-7 for d in DIRECTION))
    aligned = on_grid_of(label, ct)
    assert aligned.GetOrigin() == ORIGIN and aligned.GetDirection() == DIRECTION
    np.testing.assert_array_equal(array(aligned), array(label))
    assert label.GetOrigin() != ORIGIN  # the caller's image keeps its header


def test_label_on_another_grid_is_resampled_nearest_neighbour():
    ct = sitk.GetImageFromArray(np.zeros(SHAPE, np.int16))
    ct.SetSpacing((1.0, 1.0, 1.0))
    values = np.zeros(SHAPE, np.uint8)
    values[2, 3, 4] = 7
    label = sitk.GetImageFromArray(values)
    label.SetOrigin((1.0, 0.0, 0.0))  # one voxel along x
    moved = array(on_grid_of(label, ct))
    assert moved.dtype == np.uint8
    assert moved[2, 3, 5] == 7 and moved[2, 3, 4] == 0
    assert set(np.unique(moved)) == {0, 7}  # nearest neighbour: no blended values


# ------------------------------------------------------------------ VerSe
@pytest.fixture
def verse_bids_root(tmp_path):
    root = tmp_path / "verse20"
    scans = {
        "sub-verse500": ["ses-1", "ses-2"],  # one patient, two sessions
        "sub-verse501": [None],
        "sub-verse502": [None],
        "sub-verse503": [None],
    }
    for subject, sessions in scans.items():
        for session in sessions:
            folder = os.path.join(subject, session) if session else subject
            scan = f"{subject}_{session}" if session else subject
            write_ct(str(root / "rawdata" / folder / f"{scan}_ct.nii.gz"))
            write(str(root / "derivatives" / folder / f"{scan}_seg-vert_msk.nii.gz"), labels_with([19, 20, 28]))
            (root / "derivatives" / folder / f"{scan}_seg-subreg_ctd.json").parent.mkdir(parents=True, exist_ok=True)
            (root / "derivatives" / folder / f"{scan}_seg-subreg_ctd.json").write_text("[]")
    write_ct(str(root / "rawdata" / "sub-verse599" / "sub-verse599_ct.nii.gz"))  # no label: not a case
    return str(root)


def test_verse_bids_pairs_scans_and_keeps_patient_id(verse_bids_root):
    cases = find_cases(verse_bids_root)
    assert [c.case_id for c in cases] == [
        "sub-verse500_ses-1",
        "sub-verse500_ses-2",
        "sub-verse501",
        "sub-verse502",
        "sub-verse503",
    ]
    assert {c.patient_id for c in cases} == {"sub-verse500", "sub-verse501", "sub-verse502", "sub-verse503"}
    session = cases[1]
    assert session.patient_id == "sub-verse500" and session.label_format == "verse"
    assert session.label_path.endswith(os.path.join("ses-2", "sub-verse500_ses-2_seg-vert_msk.nii.gz"))
    labels = array(session.load_vertebra_labels())
    assert set(np.unique(labels)) == {0, 19, 20, 28}  # T13 kept
    assert int(array(session.load_spine_mask()).sum()) == 3 * 12
    # a split root (e.g. 01_training/rawdata) is found one level down
    assert len(find_cases(os.path.dirname(verse_bids_root), layout="verse")) == 5


def test_verse2019_flat_and_verse2020_miccai_pairs(tmp_path):
    root = tmp_path / "verse19"
    write_ct(str(root / "verse004.nii.gz"))
    write(str(root / "verse004_seg.nii.gz"), labels_with([8, 9]))
    write_ct(str(root / "verse005.nii.gz"))  # unlabelled test scan
    write_ct(str(root / "gl003" / "gl003_CT-iso.nii.gz"))
    write(str(root / "gl003" / "gl003_CT-iso_seg.nii.gz"), labels_with([22]))
    cases = find_cases(str(root))
    assert [(c.case_id, c.patient_id, c.label_format) for c in cases] == [
        ("gl003_CT-iso", "gl003", "verse"),
        ("verse004", "verse004", "verse"),
    ]
    assert set(np.unique(array(cases[1].load_vertebra_labels()))) == {0, 8, 9}


# ------------------------------------------------------------------ CTSpine1K
def test_ctspine1k_parallel_trees_and_l6(tmp_path):
    root = tmp_path / "CTSpine1K"
    write_ct(str(root / "data" / "colon" / "1.3.6.1.4.1.9328.50.4.0001.nii.gz"))
    write(str(root / "label" / "colon" / "1.3.6.1.4.1.9328.50.4.0001_seg.nii.gz"), labels_with([24, 25]))
    write_ct(str(root / "data" / "liver" / "liver_7.nii.gz"))
    write(str(root / "label" / "liver" / "liver_7_seg.nii.gz"), labels_with([19]))
    write_ct(str(root / "data" / "liver" / "liver_8.nii.gz"))  # no label
    cases = find_cases(str(root))
    assert [(c.case_id, c.label_format) for c in cases] == [
        ("1.3.6.1.4.1.9328.50.4.0001", "ctspine1k"),
        ("liver_7", "ctspine1k"),
    ]
    assert cases[0].label_path.endswith(os.path.join("label", "colon", "1.3.6.1.4.1.9328.50.4.0001_seg.nii.gz"))
    labels = array(cases[0].load_vertebra_labels())
    assert set(np.unique(labels)) == {0, 24, 25}  # 25 = L6 in CTSpine1K, as in VerSe
    assert int(array(cases[0].load_spine_mask()).sum()) == 2 * 12  # L6 is spine


# ------------------------------------------------------------------ images/ + labels/
def test_images_labels_binary_and_verse_like(tmp_path):
    root = tmp_path / "mine"
    write_ct(str(root / "images" / "a.nii.gz"))
    write(str(root / "labels" / "a.nii.gz"), labels_with([255, 255]))
    write_ct(str(root / "images" / "b.nii.gz"))
    write(str(root / "labels" / "b.nii.gz"), labels_with([20, 21, 22]))
    write_ct(str(root / "images" / "c.nii.gz"))  # no label
    cases = by_id(find_cases(str(root)))
    assert sorted(cases) == ["a", "b"]
    assert cases["a"].label_format == "binary" and cases["a"].load_vertebra_labels() is None
    np.testing.assert_array_equal(array(cases["a"].load_spine_mask()), (labels_with([255, 255]) > 0).astype(np.uint8))
    assert cases["b"].label_format == "verse"
    assert set(np.unique(array(cases["b"].load_vertebra_labels()))) == {0, 20, 21, 22}


def test_images_labels_nnunet_channel_suffix(tmp_path):
    root = tmp_path / "nnunet"
    write_ct(str(root / "imagesTr" / "spine_001_0000.nii.gz"))
    write(str(root / "labelsTr" / "spine_001.nii.gz"), labels_with([1, 1]))
    cases = find_cases(str(root), layout="images-labels")
    assert [(c.case_id, c.label_format) for c in cases] == [("spine_001", "binary")]


@pytest.mark.parametrize(
    "values, expected",
    [([0, 1], "binary"), ([0, 255], "binary"), ([0, 20, 21], "verse"), ([0, 19], "verse"), ([0, 1, 40], "binary"), ([0], "binary")],
)
def test_guess_label_format(values, expected):
    assert guess_label_format(np.array(values)) == expected


# ------------------------------------------------------------------ TotalSegmentator dataset
def test_totalsegmentator_dataset_mask_folder(tmp_path):
    root = tmp_path / "Totalsegmentator_dataset"
    case_dir = root / "s0001"
    write_ct(str(case_dir / "ct.nii.gz"))
    write(str(case_dir / "segmentations" / "vertebrae_L5.nii.gz"), labels_with([1, 0, 0]))
    write(str(case_dir / "segmentations" / "sacrum.nii.gz"), labels_with([0, 1, 0]))
    write(str(case_dir / "segmentations" / "vertebrae_C1.nii.gz"), labels_with([0, 0, 0, 1]))
    write(str(case_dir / "segmentations" / "liver.nii.gz"), labels_with([0, 0, 1]))
    (root / "meta.csv").write_text("image_id\ns0001\n")
    cases = find_cases(str(root))
    assert [(c.case_id, c.patient_id, c.label_format) for c in cases] == [("s0001", "s0001", "totalsegmentator")]
    labels = array(cases[0].load_vertebra_labels())
    assert [labels[z, 3, 4] for z in range(4)] == [24, 26, 0, 1]  # liver ignored
    mask = array(cases[0].load_spine_mask())
    assert [mask[z, 3, 4] for z in range(4)] == [1, 0, 0, 1]


# ------------------------------------------------------------------ errors
def test_find_cases_errors(tmp_path):
    with pytest.raises(SegmentationError) as missing:
        find_cases(str(tmp_path / "nowhere"))
    assert missing.value.code == "input_not_found"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegmentationError) as empty:
        find_cases(str(tmp_path / "empty"))
    assert empty.value.code == "input_not_found"
    with pytest.raises(ValueError):
        find_cases(str(tmp_path / "empty"), layout="kaggle")
    assert find_cases(str(tmp_path / "empty"), layout="verse") == []


def test_case_without_label():
    case = Case("x", "x", "/nonexistent/ct.nii.gz", None, "verse")
    assert case.load_spine_mask() is None and case.load_vertebra_labels() is None


# ------------------------------------------------------------------ patient split
def fake_cases():
    cases = []
    for patient in range(10):
        for session in range(1 + patient % 3):  # 1-3 scans per patient
            cases.append(Case(f"p{patient}_s{session}", f"p{patient}", f"/x/p{patient}_{session}.nii.gz", None, "verse"))
    return cases


def test_patient_split_keeps_sessions_together_and_is_deterministic():
    cases = fake_cases()
    train, validation = patient_level_split(cases, 0.3, seed=7)
    train_patients = {c.patient_id for c in train}
    validation_patients = {c.patient_id for c in validation}
    assert not train_patients & validation_patients
    assert len(validation_patients) == 3  # 30 % of 10 patients
    assert len(train) + len(validation) == len(cases)
    for patient in validation_patients:  # every scan of a held-out patient is held out
        assert {c.case_id for c in cases if c.patient_id == patient} <= {c.case_id for c in validation}
    again = patient_level_split(list(reversed(cases)), 0.3, seed=7)
    assert {c.case_id for c in again[1]} == {c.case_id for c in validation}  # order of input does not matter
    splits = {frozenset(c.patient_id for c in patient_level_split(cases, 0.3, seed=s)[1]) for s in range(5)}
    assert len(splits) > 1  # the seed matters


def test_patient_split_edge_cases():
    cases = fake_cases()
    assert patient_level_split(cases, 0.0, seed=0) == (cases, [])
    train, validation = patient_level_split(cases[:2], 0.01, seed=0)  # two patients: one held out
    assert len({c.patient_id for c in validation}) == 1 and train
    single = [c for c in cases if c.patient_id == "p2"]
    assert patient_level_split(single, 0.5, seed=0) == (single, [])  # never hold out every patient
    with pytest.raises(ValueError):
        patient_level_split(cases, 1.0, seed=0)


def test_prepare_ctchest4_writes_a_binary_training_case_of_the_tubes_bone(tmp_path):
    import subprocess
    import sys

    slicerio = pytest.importorskip("slicerio")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    completed = subprocess.run([sys.executable, os.path.join(root, "scripts", "prepare_ctchest4.py"), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    (case,) = find_cases(str(tmp_path))
    assert case.case_id == "CTChest4" and case.label_format == "binary"
    ct, label = case.load()
    hu, spine = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(label) > 0
    segmentation = slicerio.read_segmentation(os.path.join(os.path.dirname(slicerio.__file__), "data", "Segmentation.seg.nrrd"))
    ribs = np.transpose(segmentation["voxels"], (2, 1, 0)) == next(s["labelValue"] for s in segmentation["segments"] if s["name"] == "ribs")
    assert spine.sum() * np.prod(ct.GetSpacing()) / 1000 > 400  # C7-L1 at least
    assert np.median(hu[spine]) > 200 and not (spine & ribs).any()
