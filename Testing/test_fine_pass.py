"""The second, finer network pass over the column's box (inference.fine_pass) and its place in the pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from SpineContextSegLib.inference.fine_pass import add_fine_pass, body_centres_mm, column_box, fine_grid_over, tiles_along_the_bodies
from SpineContextSegLib.inference.model_files import ModelCard
from SpineContextSegLib.inference.pipeline import SegmentOptions, segment_image
from SpineContextSegLib.inference.preprocessing import physical_corners

from conftest import BoneThresholdEngine


def _coarse_grid(shape_zyx=(20, 30, 40), spacing_mm=1.8, origin=(-10.0, 5.0, 100.0)) -> sitk.Image:
    image = sitk.Image([int(n) for n in shape_zyx[::-1]], sitk.sitkFloat32)
    image.SetSpacing([spacing_mm] * 3)
    image.SetOrigin(origin)
    return image


class SizeAwareEngine(BoneThresholdEngine):
    """A stand-in network that, like the real one, misses bone that looks too small on its grid:
    bone (>= 250 HU) only where it is at least 3 voxels thick along every axis (a grey opening)."""

    def predict(self, batch):
        from scipy import ndimage

        bone = super().predict(batch)
        return np.stack([np.stack([ndimage.grey_opening(channel, size=(3, 3, 3), mode="nearest") for channel in item]) for item in bone])


def _plate_ct() -> sitk.Image:
    """1 mm voxels, 80 x 60 x 60 mm of soft tissue: a bone rod along z (20 mm square, what the coarse
    pass finds) and an axial bone plate through it, 8 mm thick: 2 voxels of a 4 mm grid (too thin
    for :class:`SizeAwareEngine`), 8 voxels of a 1 mm grid."""
    hu = np.full((80, 60, 60), 40.0, np.float32)
    hu[:, 20:40, 20:40] = 700.0
    hu[36:44, 8:52, 8:52] = 700.0
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetOrigin([3.0, -7.0, 40.0])
    return image


def _plate(ct: sitk.Image) -> np.ndarray:
    """The plate's voxels beside the rod, on ``ct``'s grid (z, y, x), one voxel in from its faces."""
    plate = np.zeros(sitk.GetArrayViewFromImage(ct).shape, bool)
    plate[37:43, 9:51, 9:51] = True
    plate[:, 19:41, 19:41] = False
    return plate


def test_the_column_box_widens_by_the_margin_and_stays_on_the_grid():
    kept = np.zeros((30, 40, 50), bool)
    kept[10:20, 2:8, 30:48] = True
    # 10 mm at 1.8 mm spacing is 6 voxels (rounded up); clipped where the grid ends
    assert column_box(kept, (1.8, 1.8, 1.8), margin_mm=10.0) == (slice(4, 26), slice(0, 14), slice(24, 50))
    assert column_box(kept, (1.0, 2.0, 5.0), margin_mm=4.0) == (slice(6, 24), slice(0, 10), slice(29, 49))
    assert column_box(np.zeros((4, 4, 4), bool), (1.0, 1.0, 1.0)) is None


@pytest.mark.parametrize("fine_spacing_mm", [1.4, 1.0, 0.7])
def test_the_fine_grid_encloses_the_box_it_is_made_for_and_is_centred_on_it(fine_spacing_mm):
    coarse = _coarse_grid()
    box = (slice(3, 17), slice(0, 12), slice(20, 40))
    fine = fine_grid_over(coarse, box, fine_spacing_mm)
    assert fine.GetSpacing() == (fine_spacing_mm,) * 3 and fine.GetDirection() == coarse.GetDirection()
    region = sitk.RegionOfInterest(coarse, [b.stop - b.start for b in box[::-1]], [b.start for b in box[::-1]])
    box_low, box_high = physical_corners(region).min(axis=0), physical_corners(region).max(axis=0)
    fine_low, fine_high = physical_corners(fine).min(axis=0), physical_corners(fine).max(axis=0)
    assert (fine_low <= box_low + 1e-6).all() and (fine_high >= box_high - 1e-6).all()
    assert (fine_high - fine_low - (box_high - box_low) < fine_spacing_mm + 1e-6).all()  # less than one fine voxel more
    np.testing.assert_allclose((fine_low + fine_high) / 2, (box_low + box_high) / 2, atol=1e-6)


def test_the_fine_pass_keeps_the_larger_probability_inside_the_box_only():
    from SpineContextSegLib.inference.preprocessing import to_canonical

    ct = _plate_ct()
    coarse = to_canonical(ct, [4.0] * 3)
    engine = SizeAwareEngine()
    probability = engine.predict(((sitk.GetArrayFromImage(coarse) + 1000.0) / 3000.0)[None, None])[0, 0].astype(np.float32)
    before = probability.copy()
    kept = probability >= 0.5  # the rod: x, y 20-40 mm = coarse voxels 5-9, every slice
    kept[:2] = kept[18:] = False  # the column ends 8 mm above and below the scan's ends
    box = column_box(kept, (4.0, 4.0, 4.0))
    assert box == (slice(0, 20), slice(2, 13), slice(2, 13))
    ct_before = sitk.GetArrayFromImage(ct).copy()
    info = add_fine_pass(probability, coarse, ct, kept, engine.predict, fine_spacing_mm=1.0, patch_size=(16, 64, 64), overlap=0.25, hu_window=(-1000.0, 2000.0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ct), ct_before)  # the CT is only read
    assert (probability >= before).all()  # the larger of the two passes
    outside = np.ones(probability.shape, bool)
    outside[box] = False
    np.testing.assert_array_equal(probability[outside], before[outside])
    # the plate (coarse slices 9 and 10: z 36-44 mm), lost on the 4 mm grid, found by the 1 mm
    # pass: its tiles, 64 mm square, centre on the rod's front 40 mm and hold the whole plate
    plate = (slice(9, 11), slice(3, 5), slice(3, 5))
    assert (before[plate] < 0.5).all() and (probability[plate] >= 0.5).all()
    assert info["spacing_mm"] == 1.0 and info["added_ml"] > 0
    assert info["shape_zyx"] == [80, 44, 44]  # 20 x 11 x 11 voxels of 4 mm on a 1 mm grid
    assert info["tiles"] == 7  # 80 slices in tiles of 16 at a step of at most 12, one tile per step


def test_the_bodies_are_the_columns_front_and_the_tiles_follow_them_along_a_curve():
    coarse = _coarse_grid(shape_zyx=(40, 50, 50), spacing_mm=2.0, origin=(0.0, 0.0, 0.0))
    kept = np.zeros((40, 50, 50), bool)
    for z in range(40):
        front = 5 + z // 2  # the column leans back by 1 mm per slice of 2 mm
        kept[z, front : front + 30, 20:30] = True  # 60 mm deep, 20 mm wide, x 40-58 mm
    centres = body_centres_mm(kept, coarse, body_depth_mm=40.0)
    assert centres.shape == (40, 3)
    np.testing.assert_allclose(centres[:, 0], 2.0 * 24.5)  # the mean of x voxels 20-29
    np.testing.assert_allclose(centres[:, 1], 2.0 * (5 + np.arange(40) // 2 + 9.5))  # 20 voxels behind the front: the middle of the first 20
    np.testing.assert_allclose(centres[:, 2], 2.0 * np.arange(40))
    fine = fine_grid_over(coarse, (slice(0, 40), slice(0, 50), slice(0, 50)), 1.0)  # 80 x 100 x 100 voxels of 1 mm
    tiles = tiles_along_the_bodies(centres, fine, (32, 32, 32), 0.25)
    assert [t[0].start for t in tiles] == [0, 24, 48]  # the regular steps along z
    for tile in tiles:
        assert all(part.stop - part.start == 32 for part in tile)
        inside = (centres[:, 2] - fine.GetOrigin()[2] >= tile[0].start) & (centres[:, 2] - fine.GetOrigin()[2] < tile[0].stop)
        y_centre = np.median(centres[inside, 1]) - fine.GetOrigin()[1]
        assert abs((tile[1].start + tile[1].stop) / 2 - y_centre) <= 1.0  # centred on its own slices' bodies
    assert tiles[2][1].start > tiles[0][1].start  # following the lean
    # a tile that would hang out of the grid is moved in
    assert tiles_along_the_bodies(np.array([[0.0, 0.0, 40.0]]), fine, (32, 32, 32), 0.25)[0][1:] == (slice(0, 32), slice(0, 32))


def _with_fine_pass(bundle, fine_spacing_mm):
    bundle.card.fine_spacing_mm = fine_spacing_mm
    return bundle


def test_segment_runs_the_fine_pass_the_card_asks_for_and_finds_what_the_coarse_grid_loses(bundle):
    ct = _plate_ct()
    plate = _plate(ct)
    options = dict(min_spine_ml=0.1, cortical_edge=False, patch_size=[16, 64, 64])  # in-plane, a fine tile holds the whole plate
    one_pass = segment_image(ct, SegmentOptions(**options), bundle=bundle, engine=SizeAwareEngine())
    _with_fine_pass(bundle, 1.0)
    two_passes = segment_image(ct, SegmentOptions(**options), bundle=bundle, engine=SizeAwareEngine())
    off = segment_image(ct, SegmentOptions(fine_spacing_mm=0, **options), bundle=bundle, engine=SizeAwareEngine())
    first, second, third = (sitk.GetArrayFromImage(r.mask).astype(bool) for r in (one_pass, two_passes, off))
    assert first[plate].mean() < 0.2 and second[plate].mean() > 0.8
    np.testing.assert_array_equal(third, first)  # 0 turns the pass off
    assert "fine_pass" in two_passes.info and "fine_pass" not in one_pass.info and "fine_pass" not in off.info
    assert two_passes.info["fine_pass"]["tiles"] > 0 and "refine" in two_passes.timings_s
    assert second.shape == first.shape and two_passes.mask.GetSpacing() == ct.GetSpacing()


def test_no_fine_pass_when_its_grid_is_not_finer_than_the_network_grid(bundle):
    ct = _plate_ct()
    _with_fine_pass(bundle, 2.0)
    result = segment_image(ct, SegmentOptions(min_spine_ml=0.1, spacing_mm=2.0), bundle=bundle, engine=SizeAwareEngine())
    assert "fine_pass" not in result.info and "refine" not in result.timings_s


def test_a_card_without_a_fine_grid_reads_as_one_pass_and_one_with_it_keeps_it():
    fields = dict(name="m", version="1", task="spine", architecture="SpineContextResUNet", labels=[], spacing_mm=[2, 2, 2], hu_window=[-1000, 2000], patch_size=[64, 64, 64], overlap=0.25)
    assert ModelCard.from_json(fields).fine_spacing_mm is None
    card = ModelCard.from_json(dict(fields, fine_spacing_mm=1.4))
    assert card.fine_spacing_mm == 1.4 and ModelCard.from_json(card.to_json()).fine_spacing_mm == 1.4
