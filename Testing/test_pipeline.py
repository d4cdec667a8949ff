"""The segmentation path: exact input geometry out, post-processing, atomic outputs, cancellation."""
from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from SpineContextSegLib.inference.engine import InferenceEngine
from SpineContextSegLib.errors import Cancelled, SegmentationError
from SpineContextSegLib.inference.model_files import load_model
from SpineContextSegLib.inference.pipeline import SegmentOptions, StopCheck, segment_file, segment_image
from SpineContextSegLib.inference.postprocess import CORTICAL_BONE_HU, UNCERTAIN_BONE_HU, clean_probability, grow_to_cortical_edge, threshold_with_bone_evidence

from conftest import BoneThresholdEngine, make_ct_image, warning_recorder


@pytest.mark.parametrize(
    "direction",
    [
        None,
        (-1, 0, 0, 0, -1, 0, 0, 0, 1),  # RAS-stored
        (0, 0, -1, 1, 0, 0, 0, -1, 0),  # PIR sagittal slabs
        tuple(np.array([[0.94, -0.34, 0], [0.34, 0.94, 0], [0, 0, 1]]).T.ravel()),  # oblique 20 degrees
    ],
)
def test_mask_has_exactly_the_input_grid_and_lies_on_the_bone(bundle, direction):
    image = make_ct_image(size=(40, 36, 30), spacing=(1.6, 1.6, 3.0), direction=direction, origin=(-30.0, 12.5, 100.0))
    result = segment_image(image, SegmentOptions(min_spine_ml=0.5), bundle=bundle, engine=BoneThresholdEngine())
    mask = result.mask
    assert mask.GetSize() == image.GetSize()
    assert mask.GetSpacing() == image.GetSpacing()
    assert mask.GetOrigin() == image.GetOrigin()
    assert mask.GetDirection() == image.GetDirection()
    assert mask.GetPixelID() == sitk.sitkUInt8
    m = sitk.GetArrayFromImage(mask).astype(bool)
    bone = sitk.GetArrayFromImage(image) > 250
    dice = 2 * (m & bone).sum() / (m.sum() + bone.sum())
    assert dice > 0.85  # resampled at 4 mm and back: boundaries move by up to a voxel
    assert result.labels[0].name == "Spine"
    assert set(result.timings_s) >= {"preprocess", "network", "stitch", "postprocess"}


def test_input_image_is_not_modified(bundle):
    image = make_ct_image()
    before = sitk.GetArrayFromImage(image).copy()
    segment_image(image, SegmentOptions(min_spine_ml=0.5), bundle=bundle, engine=BoneThresholdEngine())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), before)


def test_spacing_override_runs_the_network_on_that_grid_and_the_mask_still_has_the_input_grid(bundle):
    image = make_ct_image(size=(40, 36, 30), spacing=(1.6, 1.6, 3.0))
    card_grid = segment_image(image, SegmentOptions(min_spine_ml=0.5), bundle=bundle, engine=BoneThresholdEngine())
    coarse = segment_image(image, SegmentOptions(min_spine_ml=0.5, spacing_mm=3.2), bundle=bundle, engine=BoneThresholdEngine())
    assert coarse.info["spacing_mm"] == [3.2] * 3 and card_grid.info["spacing_mm"] == list(bundle.card.spacing_mm)
    # 64 x 57.6 x 90 mm on a 3.2 mm grid covered whole: 20 x 18 x ceil(28.1) voxels (x, y, z -> z, y, x)
    assert coarse.info["canonical_shape_zyx"] == [29, 18, 20]
    assert coarse.mask.GetSize() == image.GetSize() and coarse.mask.GetSpacing() == image.GetSpacing()
    m = sitk.GetArrayFromImage(coarse.mask).astype(bool)
    bone = sitk.GetArrayFromImage(image) > 250
    assert 2 * (m & bone).sum() / (m.sum() + bone.sum()) > 0.8


def test_body_crop_runs_fewer_tiles_than_the_whole_field_of_view(bundle):
    image = make_ct_image(size=(96, 96, 40), spacing=(2.0, 2.0, 2.0))
    arr = sitk.GetArrayFromImage(image)
    arr[:] = -1000
    arr[:, 40:56, 40:56] = 700  # a small dense object in a large air field
    small = sitk.GetImageFromArray(arr)
    small.CopyInformation(image)
    cropped, full = BoneThresholdEngine(), BoneThresholdEngine()
    segment_image(small, SegmentOptions(min_spine_ml=0.5), bundle=bundle, engine=cropped)
    segment_image(small, SegmentOptions(min_spine_ml=0.5, crop_to_body=False), bundle=bundle, engine=full)
    assert cropped.calls < full.calls


def test_no_dense_structure_means_no_spine_found(bundle):
    water = sitk.Image([40, 40, 30], sitk.sitkInt16)
    water.SetSpacing([2.0, 2.0, 2.0])
    arr = sitk.GetArrayFromImage(water)
    arr[:] = -1000
    arr[5:25, 8:32, 8:32] = 0  # a water phantom
    phantom = sitk.GetImageFromArray(arr)
    phantom.CopyInformation(water)
    with pytest.raises(SegmentationError) as error:
        segment_image(phantom, SegmentOptions(), bundle=bundle, engine=BoneThresholdEngine())
    assert error.value.code == "no_spine_found"


def test_clean_probability_drops_small_islands_and_fills_holes():
    probability = np.zeros((30, 30, 30), np.float32)
    probability[5:25, 5:25, 5:25] = 0.9
    probability[12:16, 12:16, 12:16] = 0.1  # an enclosed hole
    probability[27:29, 27:29, 27:29] = 0.9  # an island of 8 voxels = 8 ml at 10 mm?  use spacing 1 mm -> 0.008 ml
    probability[26, 27, 27] = probability[4, 10, 10] = 0.4  # faint voxels next to the island and next to the block
    cleaned, info = clean_probability(probability, (1.0, 1.0, 1.0), min_island_ml=0.05, min_spine_ml=1.0)
    assert info["components"] == 2 and info["kept_components"] == 1
    assert cleaned[28, 28, 28] == 0.0
    # the island's faint rim goes with it (resampled linearly it would leave a shell); the block's stays
    assert cleaned[26, 27, 27] == 0.0 and cleaned[4, 10, 10] == pytest.approx(0.4)
    assert cleaned[13, 13, 13] == 1.0
    assert cleaned[10, 10, 10] == pytest.approx(0.9)


def test_clean_probability_fills_exactly_the_holes_a_whole_volume_fill_finds():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    # A porous block touching one face of the array: enclosed pores are filled; pores open to
    # the outside (through that face or the block's surface) are not.
    probability = np.zeros((40, 36, 32), np.float32)
    probability[10:30, 0:20, 4:24] = 0.95 * (rng.random((20, 20, 20)) > 0.15)
    spine = ndimage.label(probability >= 0.5, structure=np.ones((3, 3, 3), bool))[0] == 1
    cleaned, _ = clean_probability(probability * spine, (1.0, 1.0, 1.0), min_island_ml=0.0, min_spine_ml=0.001, max_column_offset_mm=np.inf)
    expected = ndimage.binary_fill_holes(spine)
    assert (expected & ~spine).sum() > 10  # the case has enclosed holes
    np.testing.assert_array_equal(cleaned >= 0.5, expected)


def test_stop_check_reports_cancel_file_and_signal(tmp_path):
    flag = tmp_path / "cancel"
    stop = StopCheck(str(flag))
    stop()  # nothing yet
    flag.write_text("")
    with pytest.raises(Cancelled) as error:
        stop()
    assert error.value.code == "cancelled" and error.value.exit_status == 20
    stop = StopCheck(None)
    stop.signal_received = True
    with pytest.raises(Cancelled) as error:
        stop()
    assert error.value.code == "terminated" and error.value.exit_status == 21


def test_cancel_between_tiles_leaves_no_output(tmp_path, bundle):
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct_image(size=(60, 60, 40)), str(source))
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        if calls["n"] > 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        segment_file(str(source), str(tmp_path / "mask.nii.gz"), SegmentOptions(overlap=0.5, min_spine_ml=0.5), stop=stop, bundle=bundle, engine=BoneThresholdEngine())
    assert sorted(os.listdir(tmp_path)) == ["ct.nii.gz"]


def test_segment_file_writes_mask_stl_and_qc_atomically(tmp_path, bundle):
    source = tmp_path / "ct.nrrd"
    sitk.WriteImage(make_ct_image(), str(source))
    before = source.read_bytes()
    result = segment_file(
        str(source), str(tmp_path / "mask.seg.nrrd"), SegmentOptions(min_spine_ml=0.5),
        stl_path=str(tmp_path / "spine.stl"), qc_path=str(tmp_path / "qc.png"), bundle=bundle, engine=BoneThresholdEngine(),
    )
    assert source.read_bytes() == before
    outputs = result["outputs"]
    assert os.path.isfile(outputs["mask"]) and os.path.isfile(outputs["qc"]) and all(os.path.isfile(p) for p in outputs["stl"])
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".scs-tmp-")]
    written = sitk.ReadImage(outputs["mask"])
    assert written.GetSize() == sitk.ReadImage(str(source)).GetSize()
    assert written.GetMetaData("Segment0_Name") == "Spine"


def test_seg_nrrd_output_reads_back_with_slicerio(tmp_path, bundle):
    slicerio = pytest.importorskip("slicerio")
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct_image(), str(source))
    segment_file(str(source), str(tmp_path / "m.seg.nrrd"), SegmentOptions(min_spine_ml=0.5), bundle=bundle, engine=BoneThresholdEngine())
    segmentation = slicerio.read_segmentation(str(tmp_path / "m.seg.nrrd"))
    names = slicerio.segment_names(segmentation)
    assert names == ["Spine"]
    segment = segmentation["segments"][0]
    assert segment["labelValue"] == 1
    assert "SCT" in str(segment.get("terminology", ""))


def test_output_equal_to_input_is_refused(tmp_path, bundle):
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct_image(), str(source))
    before = source.read_bytes()
    with pytest.raises(SegmentationError) as error:
        segment_file(str(source), str(source), SegmentOptions(), bundle=bundle, engine=BoneThresholdEngine())
    assert error.value.code == "output_is_input"
    assert source.read_bytes() == before


def test_vertebrae_task_names_the_phantoms_levels_and_returns_their_label_table():
    from SpineContextSegLib.phantoms.generator import generate_phantom
    from SpineContextSegLib.inference.pipeline import _name_vertebrae

    phantom = generate_phantom(21, first_level="L1", last_level="S", spacing_mm=(2.0, 2.0, 2.0), field_of_view="torso", noise_hu=10.0)
    recorder, warnings = warning_recorder()

    info = {}
    labels_image, labels = _name_vertebrae(phantom.spine_mask, phantom.ct, recorder, info)
    assert labels_image.GetSize() == phantom.ct.GetSize()
    assert [label.name for label in labels] == ["L1", "L2", "L3", "L4", "L5", "Sacrum"]
    predicted = sitk.GetArrayFromImage(labels_image)
    truth = sitk.GetArrayFromImage(phantom.vertebra_labels)
    for label in labels[:-1]:
        overlap = np.logical_and(predicted == label.value, truth == label.value).sum()
        assert overlap > 0.8 * (truth == label.value).sum()
    sacrum = predicted == 26  # its upper part, from the CT: it lies in the phantom's sacrum
    assert sacrum.sum() > 0 and np.logical_and(sacrum, truth == 26).sum() > 0.8 * sacrum.sum()
    assert "vertebrae" in info and warnings == []  # the sacrum anchors the names: no uncertainty warning


def test_outputs_get_ordinary_file_permissions(tmp_path):
    from SpineContextSegLib.io.files import atomic_output

    previous = os.umask(0o022)
    try:
        with atomic_output(str(tmp_path / "out.txt")) as temporary:
            with open(temporary, "w") as handle:
                handle.write("x")
    finally:
        os.umask(previous)
    assert (os.stat(tmp_path / "out.txt").st_mode & 0o777) == 0o644


def test_clean_probability_drops_pieces_beside_the_column_and_keeps_pieces_on_it():
    # a column along z at 2 mm: two parts with a 30 mm gap (a missed vertebra), a piece beside it
    # (hip-like, 60 mm lateral) and one in front (sternum-like, 80 mm anterior)
    probability = np.zeros((100, 80, 80), np.float32)
    probability[5:45, 30:45, 33:47] = 0.9  # lower column
    probability[60:95, 30:45, 33:47] = 0.9  # upper column, above the gap
    probability[10:20, 30:40, 68:76] = 0.9  # beside
    probability[50:60, 0:6, 36:44] = 0.9  # in front
    cleaned, info = clean_probability(probability, (2.0, 2.0, 2.0))
    assert info["components"] == 4 and info["kept_components"] == 2
    assert cleaned[20, 37, 40] == pytest.approx(0.9) and cleaned[80, 37, 40] == pytest.approx(0.9)
    assert cleaned[15, 35, 72] == 0.0 and cleaned[55, 3, 40] == 0.0
    kept_all, info = clean_probability(probability, (2.0, 2.0, 2.0), max_column_offset_mm=float("inf"))
    assert info["kept_components"] == 4 and kept_all[15, 35, 72] == pytest.approx(0.9)


def test_clean_probability_keeps_a_curved_column_cut_at_every_disc_and_drops_a_larger_bone_beside_it():
    # 2 mm grid. Eight separate "vertebrae" (a body and a spinous process that slopes down
    # behind the next disc), drifting 3 mm per level (kyphosis), and a hip-like block beside
    # the column that is larger than any single vertebra.
    probability = np.zeros((140, 100, 120), np.float32)
    for level in range(8):
        z0, shift = 10 + level * 15, level * 3 // 2  # 30 mm per level, 3 mm drift
        probability[z0 : z0 + 12, 30 + shift : 45 + shift, 40:55] = 0.9  # body
        probability[z0 + 2 : z0 + 10, 45 + shift : 48 + shift, 45:50] = 0.9  # pedicle
        probability[z0 - 4 : z0 + 6, 48 + shift : 62 + shift, 45:50] = 0.9  # spinous process, behind and below
    probability[20:40, 20:35, 90:105] = 0.9  # hip-like, ~100 mm lateral, 36 ml (a vertebra: 28 ml)
    cleaned, info = clean_probability(probability, (2.0, 2.0, 2.0))
    assert info["components"] == 9 and info["kept_components"] == 8
    for level in range(8):
        z0, shift = 10 + level * 15, level * 3 // 2
        assert cleaned[z0 + 6, 37 + shift, 47] == pytest.approx(0.9), level
        assert cleaned[z0 - 3, 58 + shift, 47] == pytest.approx(0.9), level
    assert cleaned[30, 27, 97] == 0.0


class VertebraCodeEngine(InferenceEngine):
    """A stand-in vertebrae network that reads each vertebra's name from its CT value.

    Bone voxels carry HU = 600 + 20 x (VerSe id); the engine answers softmax-like channels in the
    card's order: background where HU < 250, else the channel of the coded vertebra.
    """

    name = "vertebra-code"

    def __init__(self, class_ids, hu_window=(-1000.0, 2000.0)):
        from SpineContextSegLib.labels import verse_ids_to_classes

        self.channels = len(class_ids) + 1
        self.to_class = lambda ids: verse_ids_to_classes(ids, class_ids)
        self.hu_window = hu_window

    def predict(self, batch):
        hu = batch[:, 0] * (self.hu_window[1] - self.hu_window[0]) + self.hu_window[0]
        bone = hu > 250.0
        classes = np.where(bone, self.to_class(np.clip(np.rint((hu - 600.0) / 20.0), 0, 28).astype(np.uint8)), 0)
        out = np.zeros((batch.shape[0], self.channels) + batch.shape[2:], dtype=np.float32)
        np.put_along_axis(out, classes[:, None].astype(np.int64), 1.0, axis=1)
        return out


def vertebrae_bundle(spacing_mm=2.0):
    from SpineContextSegLib.labels import VERTEBRAE
    from SpineContextSegLib.inference.model_files import ModelBundle, ModelCard

    card = ModelCard(
        name="vertebra-code", version="0", task="vertebrae", architecture="SpineContextResUNet", labels=[v.to_json() for v in VERTEBRAE],
        spacing_mm=[spacing_mm] * 3, hu_window=[-1000.0, 2000.0], patch_size=[32, 32, 32], overlap=0.25, trained=True,
    )
    return ModelBundle(directory="", card=card)


def test_a_vertebrae_network_names_the_split_mask_and_its_sacrum_channel_stays_out_of_the_spine():
    from test_vertebrae import make_spine

    from SpineContextSegLib.labels import SACRUM_ID, vertebra_class_ids

    ct, mask, truth = make_spine([(12.0, 20.0)] * 4, ribs=(0, 1, 2, 3), margin_below_mm=0.0, margin_above_mm=20.0)
    codes = np.array([0, 13, 14, 15, 16])[truth]  # T6-T9, top first
    ct = np.where(truth > 0, 600.0 + 20.0 * codes, ct)
    sacrum_like = (ct < 0) & (np.arange(ct.shape[0])[:, None, None] > ct.shape[0] - 6)  # air the "network" calls sacrum
    ct[sacrum_like & (np.arange(ct.shape[2]) < 8)] = 600.0 + 20.0 * SACRUM_ID
    image = sitk.GetImageFromArray(ct.astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    bundle = vertebrae_bundle()
    engine = VertebraCodeEngine(vertebra_class_ids(bundle.card.labels))

    spine = segment_image(image, SegmentOptions(min_spine_ml=0.5, max_column_offset_mm=200.0), bundle=bundle, engine=engine)
    predicted_spine = sitk.GetArrayFromImage(spine.mask) > 0
    assert [label.name for label in spine.labels] == ["Spine"]
    assert 2 * (predicted_spine & mask).sum() / (predicted_spine.sum() + mask.sum()) > 0.95  # the sacrum channel is not spine

    named = segment_image(image, SegmentOptions(task="vertebrae", min_spine_ml=0.5, max_column_offset_mm=200.0), bundle=bundle, engine=engine)
    assert [label.name for label in named.labels] == ["T6", "T7", "T8", "T9"]
    assert "network" in named.info["vertebrae"]["method"]
    labels = sitk.GetArrayFromImage(named.mask)
    for k, verse_id in enumerate([13, 14, 15, 16], start=1):
        assert (labels[truth == k] == verse_id).mean() > 0.9
    assert (labels[predicted_spine] > 0).all()  # the labels fill the spine task's whole mask


def test_memory_estimate_counts_a_stitching_accumulator_per_extra_output_channel():
    from SpineContextSegLib.inference.preprocessing import estimate_segmentation_memory_bytes

    image = sitk.Image([100, 80, 60], sitk.sitkInt16)
    image.SetSpacing((1.0, 1.0, 2.0))
    canonical_voxels = 50 * 40 * 60  # 100 x 80 x 120 mm at 2 mm
    extra = estimate_segmentation_memory_bytes(image, (2.0, 2.0, 2.0), 28) - estimate_segmentation_memory_bytes(image, (2.0, 2.0, 2.0))
    assert extra == canonical_voxels * 4 * 27


def test_a_surface_path_without_stl_extension_is_refused_before_the_network_runs(tmp_path, bundle):
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct_image(), str(source))
    engine = BoneThresholdEngine()
    with pytest.raises(SegmentationError) as error:
        segment_file(str(source), str(tmp_path / "mask.nii.gz"), SegmentOptions(), stl_path=str(tmp_path / "x"), bundle=bundle, engine=engine)
    assert error.value.code == "output_format" and engine.calls == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_a_bundle_passed_alone_is_the_model_that_runs(tiny_model_dir, monkeypatch):
    """Passing a model bundle without an engine must run that model, not silently the one options name."""
    import SpineContextSegLib.inference.pipeline as pipeline_module

    bundle = load_model(tiny_model_dir)
    original, seen = pipeline_module.load_model_and_engine, []

    def spy(options, *passed):
        loaded, engine = original(options, *passed)
        seen.append(loaded.directory)
        return loaded, engine

    monkeypatch.setattr(pipeline_module, "load_model_and_engine", spy)
    try:
        segment_image(make_ct_image(), SegmentOptions(min_spine_ml=0.0, min_island_ml=0.0, engine="onnxruntime"), bundle=bundle)
    except SegmentationError as error:  # a random model may find no spine; which model ran is what counts
        assert error.code == "no_spine_found"
    assert seen == [bundle.directory]
    with pytest.raises(ValueError):
        segment_image(make_ct_image(), SegmentOptions(), engine=object())


def test_following_the_spine_through_the_tiles_gives_the_mask_of_every_tile_with_fewer_tiles(bundle):
    from SpineContextSegLib.phantoms.generator import generate_phantom

    # a lumbar CT with the pelvis and a wide body: the iliac wings fill tiles the spine never enters
    phantom = generate_phantom(21, first_level="L1", last_level="S", spacing_mm=(2.0, 2.0, 2.0), field_of_view="torso", noise_hu=10.0)
    every, followed = BoneThresholdEngine(), BoneThresholdEngine()
    options = dict(min_spine_ml=0.5, patch_size=[16, 16, 16])
    whole = segment_image(phantom.ct, SegmentOptions(all_tiles=True, **options), bundle=bundle, engine=every)
    following = segment_image(phantom.ct, SegmentOptions(**options), bundle=bundle, engine=followed)
    a, b = sitk.GetArrayFromImage(following.mask) > 0, sitk.GetArrayFromImage(whole.mask) > 0
    # the same spine; a few edge voxels may differ where a removed piece beside it (whose
    # neighbourhood the post-processing clears) lies in tiles the following run skipped
    assert b.sum() > 10000 and (a != b).sum() < 1e-3 * b.sum()
    assert following.info["spine_ml"] == whole.info["spine_ml"]
    done, total = following.info["tiles_run"]
    assert whole.info["tiles_run"] == [total, total] and done == followed.calls < every.calls == total


@pytest.mark.parametrize("lateral_mm_at_the_top,follows", [(90.0, True), (None, False)])
def test_a_column_that_leaves_the_middle_of_the_body_is_followed_and_one_that_never_crosses_it_runs_every_tile(bundle, lateral_mm_at_the_top, follows):
    # water body 320 mm wide; a bone column 30 mm across that starts on the midline and bends
    # 90 mm to the side, or that runs 110 mm to the side of the midline all the way
    size, spacing = (80, 50, 60), 4.0  # x, y, z voxels
    ct = np.full(size[::-1], -1000, np.int16)
    ct[:, 5:45, :] = 0
    for z in range(size[2]):
        offset_mm = 110.0 if lateral_mm_at_the_top is None else lateral_mm_at_the_top * z / (size[2] - 1)
        x = int(round((size[0] * spacing / 2 + offset_mm) / spacing))
        ct[z, 25:33, x - 4 : x + 4] = 700
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing([spacing] * 3)
    every, followed = BoneThresholdEngine(), BoneThresholdEngine()
    whole = segment_image(image, SegmentOptions(all_tiles=True, min_spine_ml=0.5, patch_size=[16, 16, 16]), bundle=bundle, engine=every)
    following = segment_image(image, SegmentOptions(min_spine_ml=0.5, patch_size=[16, 16, 16]), bundle=bundle, engine=followed)
    assert np.array_equal(sitk.GetArrayFromImage(following.mask), sitk.GetArrayFromImage(whole.mask))
    assert sitk.GetArrayFromImage(whole.mask).sum() > 0.9 * (ct == 700).sum()
    assert (followed.calls < every.calls) == follows


@pytest.mark.parametrize("rows,in_the_back", [((50, 58), True), ((6, 12), False)])
def test_the_network_starts_in_the_back_of_the_body_and_still_finds_a_column_in_front(bundle, monkeypatch, rows, in_the_back):
    import SpineContextSegLib.inference.pipeline as pipeline_module

    # water body 76 voxels deep (4 mm, front to back: y 2-78 in LPS), a straight bone column on
    # the midline in its back half, or (where no spine lies) in its front tenth
    size, spacing = (60, 80, 60), 4.0  # x, y, z voxels
    ct = np.full(size[::-1], -1000, np.int16)
    ct[:, 2:78, :] = 0
    ct[:, rows[0] : rows[1], 26:34] = 700
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing([spacing] * 3)
    options = SegmentOptions(min_spine_ml=0.5, patch_size=[16, 16, 16], batch_size=1)
    every, from_the_back, from_the_front = BoneThresholdEngine(), BoneThresholdEngine(), BoneThresholdEngine()
    whole = segment_image(image, SegmentOptions(all_tiles=True, min_spine_ml=0.5, patch_size=[16, 16, 16]), bundle=bundle, engine=every)
    following = segment_image(image, options, bundle=bundle, engine=from_the_back)
    monkeypatch.setattr(pipeline_module, "SPINE_START_FROM_FRONT", 0.0)  # the whole midline first
    segment_image(image, options, bundle=bundle, engine=from_the_front)
    assert np.array_equal(sitk.GetArrayFromImage(following.mask), sitk.GetArrayFromImage(whole.mask))
    assert sitk.GetArrayFromImage(whole.mask).sum() > 0.9 * (ct == 700).sum()
    total = whole.info["tiles_run"][1]
    if in_the_back:  # the tiles in front of it never run
        assert following.info["tiles_run"][0] == from_the_back.calls < from_the_front.calls < total
    else:  # the tiles in the back found nothing: every tile ran
        assert following.info["tiles_run"] == [total, total]


def _vertebra_with_a_cortex():
    """1 mm voxels: a 20 mm cube of trabecular bone (200 HU) in a 2 mm cortex (800 HU), in soft tissue;
    a rib-like bar of cortex 3 mm beside it and a contrast vessel (350 HU) touching its other side."""
    hu = np.full((40, 40, 40), 40.0, np.float32)
    hu[8:32, 8:32, 8:32] = 800.0
    hu[10:30, 10:30, 10:30] = 200.0
    hu[14:26, 14:26, 35:39] = 800.0  # 3 mm of soft tissue between the cube (x < 32) and the bar
    hu[14:26, 14:26, 2:8] = 350.0
    network_mask = np.zeros(hu.shape, bool)
    network_mask[9:31, 9:31, 9:31] = True  # stops one voxel short of the bone's edge all round
    return hu, network_mask


def test_unsure_voxels_join_the_mask_only_where_the_ct_shows_bone_connected_to_it():
    probability = np.zeros((30, 30, 30), np.float32)
    hu = np.full(probability.shape, 40.0, np.float32)
    probability[10:20, 10:20, 10:20] = 0.9  # the network's mask
    probability[10:20, 10:20, 20:23] = 0.35  # an unsure rim on the left: bone (300 HU) ...
    hu[10:20, 10:20, 20:23] = 300.0
    probability[10:20, 10:20, 7:10] = 0.35  # ... and on the right: soft tissue
    probability[10:20, 20:22, 10:20] = 0.2  # bone the network all but rules out
    hu[10:20, 20:22, 10:20] = 600.0
    probability[2:5, 2:5, 2:5] = 0.4  # unsure bone not connected to the mask
    hu[2:5, 2:5, 2:5] = 600.0
    before = probability.copy()
    mask = threshold_with_bone_evidence(probability, hu, threshold=0.5, low_probability=0.25, min_hu=UNCERTAIN_BONE_HU)
    np.testing.assert_array_equal(probability, before)
    expected = np.zeros(probability.shape, bool)
    expected[10:20, 10:20, 10:23] = True
    np.testing.assert_array_equal(mask, expected)
    # bone just below min_hu stays out; without any mask nothing joins
    hu[10:20, 10:20, 20:23] = UNCERTAIN_BONE_HU - 1
    np.testing.assert_array_equal(threshold_with_bone_evidence(probability, hu, threshold=0.5), probability >= 0.5)
    assert not threshold_with_bone_evidence(np.minimum(probability, 0.4), hu + 1000, threshold=0.5).any()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12)))
def test_bone_evidence_joins_exactly_the_weak_pieces_connected_to_the_mask(seed, shape):
    """The neighbour-graph shortcut gives what labelling mask | weak (26-connected) gives, borders included."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    probability = rng.choice(np.array([0.1, 0.3, 0.45, 0.7], np.float32), size=shape, p=[0.4, 0.3, 0.2, 0.1])
    hu = rng.choice(np.array([50.0, 300.0], np.float32), size=shape)
    mask = probability >= 0.5
    weak = (probability >= 0.25) & ~mask & (hu >= 250.0)
    labels, _ = ndimage.label(mask | weak, structure=np.ones((3, 3, 3), bool))
    expected = np.isin(labels, labels[mask]) & (labels > 0)
    np.testing.assert_array_equal(threshold_with_bone_evidence(probability, hu, threshold=0.5, low_probability=0.25, min_hu=250.0), expected)


def test_the_outline_moves_out_to_the_cortical_edge_and_no_further():
    hu, network_mask = _vertebra_with_a_cortex()
    before = network_mask.copy()
    grown = grow_to_cortical_edge(network_mask, hu, (1.0, 1.0, 1.0), distance_mm=1.8)
    np.testing.assert_array_equal(network_mask, before)  # the input is not modified
    bone = np.zeros(hu.shape, bool)
    bone[8:32, 8:32, 8:32] = True
    np.testing.assert_array_equal(grown, bone)  # not the bar 3 mm away, not the vessel below CORTICAL_BONE_HU
    assert hu[20, 20, 5] < CORTICAL_BONE_HU
    # a ball that does not fill its box: 1.5 mm reaches across faces and edges, not corners
    corners = bone.copy()
    corners[8:32:23, 8:32:23, 8:32:23] = False
    np.testing.assert_array_equal(grow_to_cortical_edge(network_mask, hu, (1.0, 1.0, 1.0), distance_mm=1.5), corners)
    # it moves by at most distance_mm: from two voxels short, one voxel of the cortex joins
    shrunk = np.zeros(hu.shape, bool)
    shrunk[10:30, 10:30, 10:30] = True
    expected = np.zeros(hu.shape, bool)
    expected[9:31, 9:31, 9:31] = True
    np.testing.assert_array_equal(grow_to_cortical_edge(shrunk, hu, (1.0, 1.0, 1.0), distance_mm=1.8), expected)
    # and by one voxel of the CT at most: on a 0.5 mm grid 1.8 mm would be three voxels
    np.testing.assert_array_equal(grow_to_cortical_edge(shrunk, hu, (0.5, 0.5, 0.5), distance_mm=1.8), expected)


def test_the_outline_grows_only_along_axes_whose_voxels_are_shorter_than_the_distance():
    hu, network_mask = _vertebra_with_a_cortex()
    grown = grow_to_cortical_edge(network_mask, hu, (3.0, 1.0, 1.0), distance_mm=1.8)  # 3 mm slices
    assert not grown[8].any() and not grown[31].any()  # the slices above and below stay out
    assert grown[20, 8, 20] and grown[20, 20, 31]  # in-plane the cortex joins
    np.testing.assert_array_equal(grow_to_cortical_edge(network_mask, hu, (3.0, 3.0, 3.0), distance_mm=1.8), network_mask)


def test_segment_moves_the_outline_to_the_cortex_unless_told_not_to(bundle):
    # the stand-in network thresholds the CT at 250 HU on the card's coarser grid: its mask,
    # brought back to 0.8 mm voxels, misses some edge voxels of the 700 HU bone cylinder
    image = make_ct_image(size=(60, 56, 40), spacing=(0.8, 0.8, 1.0))
    hu = sitk.GetArrayFromImage(image)
    plain = segment_image(image, SegmentOptions(min_spine_ml=0.5, cortical_edge=False), bundle=bundle, engine=BoneThresholdEngine())
    edged = segment_image(image, SegmentOptions(min_spine_ml=0.5), bundle=bundle, engine=BoneThresholdEngine())
    before, after = (sitk.GetArrayFromImage(r.mask).astype(bool) for r in (plain, edged))
    assert (after >= before).all()
    added = after & ~before
    assert added.any() and (hu[added] >= UNCERTAIN_BONE_HU).all()
    added_ml = edged.info["cortical_edge_ml"] + edged.info["uncertain_bone_ml"]
    assert added_ml == pytest.approx(added.sum() * 0.8 * 0.8 * 1.0 / 1000.0, abs=0.01)
    assert "cortical_edge_ml" not in plain.info and "uncertain_bone_ml" not in plain.info




def test_modules_imported_ahead_skip_what_fails_and_import_the_rest(monkeypatch):
    import sys

    from SpineContextSegLib.inference.pipeline import _import_ahead

    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    _import_ahead(("spinecontextseg_no_such_module", "colorsys"))  # a missing module is the later stage's to report
    assert "colorsys" in sys.modules
