"""Gaussian sliding-window stitching: exact identity, no seams, full coverage, no overhanging tiles."""
from __future__ import annotations

import numpy as np
import pytest

from SpineContextSegLib.inference.stitcher import following_rim_voxels, gaussian_importance_map, sliding_window_inference, tile_grid, tile_starts, tiles_touching


def test_importance_map_peaks_at_the_centre_and_is_positive():
    w = gaussian_importance_map((16, 32, 24))
    assert w.shape == (16, 32, 24) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0)
    assert w.min() > 0
    centre = np.unravel_index(np.argmax(w), w.shape)
    assert all(abs(c - (s - 1) / 2) <= 0.5 for c, s in zip(centre, w.shape))
    # sigma = patch / 8; normalised so the two central samples (0.5 from the centre) have weight 1
    profile = gaussian_importance_map((64,))
    assert profile[39] == pytest.approx(np.exp(-0.5 * (7.5 / 8) ** 2) / np.exp(-0.5 * (0.5 / 8) ** 2), rel=1e-5)


@pytest.mark.parametrize("size,patch,overlap", [(100, 32, 0.5), (64, 64, 0.5), (65, 64, 0.25), (129, 32, 0.0), (40, 16, 0.9)])
def test_tiles_never_hang_past_the_volume_and_respect_the_overlap(size, patch, overlap):
    starts = tile_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] + patch == size
    assert all(s >= 0 and s + patch <= size for s in starts)
    steps = np.diff(starts)
    assert np.all(steps <= max(1, int(np.floor(patch * (1 - overlap)))))
    assert len(set(starts)) == len(starts)


def test_tile_start_rule_is_minimal_for_the_papers_grid():
    # 400 voxels, patch 128, overlap 0.5 -> step <= 64 -> 6 tiles (the repository's rule places 7)
    assert len(tile_starts(400, 128, 0.5)) == 6
    assert len(tile_starts(400, 64, 0.5)) == 12


def test_every_voxel_is_covered():
    shape, patch = (37, 50, 45), (16, 32, 24)
    coverage = np.zeros(shape, dtype=int)
    for tile in tile_grid(shape, patch, 0.3):
        coverage[tile] += 1
    assert coverage.min() >= 1


def test_identity_network_reproduces_its_input():
    rng = np.random.default_rng(0)
    volume = rng.random((2, 37, 50, 45), dtype=np.float32)
    out = sliding_window_inference(volume, lambda b: b, (16, 32, 24), overlap=0.5, out_channels=2, batch_size=3)
    assert out.shape == volume.shape
    np.testing.assert_allclose(out, volume, rtol=2e-6, atol=0)


def test_constant_network_gives_a_constant_output_without_seams():
    volume = np.zeros((1, 40, 70, 33), dtype=np.float32)
    out = sliding_window_inference(volume, lambda b: np.full(b.shape, 0.7, np.float32), (16, 32, 16), overlap=0.25)
    np.testing.assert_allclose(out, 0.7, rtol=1e-6)


def test_volume_smaller_than_a_patch_is_padded_once_and_cropped_back():
    volume = np.arange(5 * 6 * 7, dtype=np.float32).reshape(1, 5, 6, 7)
    seen_shapes = []

    def predict(batch):
        seen_shapes.append(batch.shape)
        return batch

    out = sliding_window_inference(volume, predict, (8, 8, 8), overlap=0.5, pad_value=-1.0)
    assert seen_shapes == [(1, 1, 8, 8, 8)]
    np.testing.assert_allclose(out, volume, rtol=1e-6)


def test_tiles_are_batched_and_progress_is_reported():
    calls, progress = [], []
    volume = np.zeros((1, 32, 32, 32), dtype=np.float32)
    sliding_window_inference(volume, lambda b: calls.append(len(b)) or b, (16, 16, 16), overlap=0.0, batch_size=3, on_tile=lambda d, t: progress.append((d, t)))
    assert calls == [3, 3, 2]
    assert progress == [(3, 8), (6, 8), (8, 8)]


def test_on_tile_may_raise_to_cancel():
    class Stop(Exception):
        pass

    def on_tile(done, total):
        raise Stop

    with pytest.raises(Stop):
        sliding_window_inference(np.zeros((1, 32, 32, 32), np.float32), lambda b: b, (16, 16, 16), on_tile=on_tile)


def test_wrong_prediction_shape_is_reported():
    with pytest.raises(ValueError, match="predict returned shape"):
        sliding_window_inference(np.zeros((1, 16, 16, 16), np.float32), lambda b: b[:, :, :8], (16, 16, 16))


def _position_dependent_predict(batch: np.ndarray) -> np.ndarray:
    """A stand-in network whose answer depends on where in the tile a voxel lies (as a real
    one's does), so that the blend at a voxel depends on exactly which tiles covered it."""
    ramp = np.linspace(0.8, 1.2, batch.shape[-1], dtype=np.float32)
    return batch * ramp


def _bent_bar_and_a_blob(shape=(40, 60, 90)):
    """``(volume (1, D, H, W), bar (D, H, W) bool)``: a bar that starts on the middle plane (x = 45)
    and leaves it, and a separate blob that the bar never comes near."""
    bar = np.zeros(shape, bool)
    for z in range(shape[0]):
        bar[z, 20:30, 40 + z : 50 + z] = True
    volume = bar[np.newaxis].astype(np.float32)
    volume[0, 0:10, 5:10, 80:88] = 1.0
    return volume, bar


def test_following_what_is_found_reproduces_it_exactly_and_skips_the_rest():
    from scipy import ndimage

    volume, bar = _bent_bar_and_a_blob()
    patch = (16, 16, 16)
    full = sliding_window_inference(volume, _position_dependent_predict, patch, overlap=0.25)
    start = np.zeros(volume.shape[1:], bool)
    start[:, :, 45] = True
    progress = []
    rounds = []

    def found(blended):
        rounds.append(blended.shape)
        return blended[0] > 0.5

    followed = sliding_window_inference(
        volume, _position_dependent_predict, patch, overlap=0.25, start_region=start, grow_region=found, on_tile=lambda d, t: progress.append((d, t))
    )
    bar = ndimage.binary_dilation(bar, iterations=1)  # and its edge
    # where the bar is, the same tiles in another order: equal to float rounding
    assert np.allclose(followed[0][bar], full[0][bar], rtol=0, atol=1e-6)
    assert np.all(followed[0, 0:10, 5:10, 80:88] == 0.0)  # the blob's tiles never ran
    done, planned = progress[-1]
    assert done == planned < len(tile_grid(volume.shape[1:], patch, 0.25))  # the bar ends full, with fewer tiles
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert len(rounds) >= 2  # the bar leaves the starting tiles: it had to be followed
    assert all(shape[1:] != volume.shape[1:] for shape in rounds[:1])  # the first round sees only its tiles' box


def test_following_runs_every_tile_when_told_to_and_leaves_zeros_where_none_ran():
    volume, _ = _bent_bar_and_a_blob()
    patch = (16, 16, 16)
    full = sliding_window_inference(volume, _position_dependent_predict, patch, overlap=0.25)
    start = np.zeros(volume.shape[1:], bool)
    start[:, :, 45] = True
    everything = sliding_window_inference(volume, _position_dependent_predict, patch, overlap=0.25, start_region=start, grow_region=lambda blended: None)
    assert np.allclose(everything, full, rtol=0, atol=1e-6)  # None: every tile, the same blend

    nothing_grows = sliding_window_inference(volume, _position_dependent_predict, patch, overlap=0.25, start_region=start, grow_region=lambda blended: np.zeros(blended.shape[1:], bool))
    assert np.all(nothing_grows[:, :, :, 75:] == 0.0) and nothing_grows[0, 0:5, 20:30, 45].min() > 0.5  # never ran: 0; the start ran
    with pytest.raises(ValueError, match="shape"):
        sliding_window_inference(volume, _position_dependent_predict, patch, start_region=start[:, :, :10])


def test_a_tile_that_holds_the_found_region_only_in_its_rim_is_left_to_its_neighbour():
    # tiles 16 wide at overlap 0.5 start at x = 0, 8, 16, 24; a slab x < 10 enters the second
    # tile by two voxels, inside its rim (a third of the overlap: 2 voxels)
    volume = np.zeros((1, 16, 16, 40), np.float32)
    volume[0, :, :, :10] = 1.0
    start = np.zeros(volume.shape[1:], bool)
    start[:, :, 4] = True
    rim = following_rim_voxels((16, 16, 16), 0.5)
    assert rim == 2 and following_rim_voxels((64, 64, 64), 0.25) == 5 and following_rim_voxels((64, 64, 64), 0.0) == 0
    runs = {}
    for rim_voxels in (0, rim):
        calls = []

        def predict(batch, calls=calls):
            calls.append(len(batch))
            return _position_dependent_predict(batch)

        runs[rim_voxels] = (sliding_window_inference(volume, predict, (16, 16, 16), overlap=0.5, start_region=start, grow_region=lambda b: b[0] > 0.5, rim_voxels=rim_voxels), sum(calls))
    (exact, exact_tiles), (rimmed, rimmed_tiles) = runs[0], runs[rim]
    assert (exact_tiles, rimmed_tiles) == (2, 1)
    # the skipped tile weighed under 1 % there: the slab's values barely move, its mask not at all
    # (away from the volume's faces in y and z, where every tile's weight is at its floor)
    slab = (slice(4, 12), slice(4, 12), slice(0, 10))
    assert np.abs(rimmed[0][slab] - exact[0][slab]).max() < 0.01
    assert np.array_equal(rimmed[0] > 0.5, exact[0] > 0.5)


def test_a_tile_core_leaves_out_the_rim_towards_its_neighbours_not_the_volume_edge():
    tiles = tile_grid((16, 16, 40), (16, 16, 16), 0.5)  # x starts 0, 8, 16, 24
    region = np.zeros((16, 16, 40), bool)
    region[8, 8, 38:] = True  # the last two voxels: the rim of tile x=24 on the volume's edge
    assert tiles_touching(tiles, region, margin_voxels=-2) == tiles_touching(tiles, region) == [3]
    region[:] = False
    region[0, 8, 17] = True  # tile x=16's rim towards tile x=8 (and its corner on the volume's edge)
    assert tiles_touching(tiles, region) == [1, 2] and tiles_touching(tiles, region, margin_voxels=-2) == [1]
    assert tiles_touching(tiles, region, margin_voxels=1) == [1, 2]


def test_following_with_a_rim_still_follows_a_region_from_tile_to_tile():
    volume, bar = _bent_bar_and_a_blob()
    patch = (16, 16, 16)
    start = np.zeros(volume.shape[1:], bool)
    start[:, :, 45] = True
    for overlap in (0.1, 0.25, 0.5):
        full = sliding_window_inference(volume, _position_dependent_predict, patch, overlap=overlap)
        followed = sliding_window_inference(
            volume, _position_dependent_predict, patch, overlap=overlap, start_region=start, grow_region=lambda b: b[0] > 0.5, rim_voxels=following_rim_voxels(patch, overlap)
        )
        assert (full[0][bar] > 0.5).all() and (followed[0][bar] > 0.5).all()  # the whole bar, to its far end
        assert np.abs(followed[0][bar] - full[0][bar]).max() < 0.02


def test_explicit_tiles_blend_like_the_tiling_where_they_run_and_leave_zeros_elsewhere():
    rng = np.random.default_rng(3)
    volume = rng.random((1, 40, 30, 30)).astype(np.float32)

    def position_network(batch):  # an output that depends on where a tile sits: its own input
        return batch * 2.0

    patch = (16, 16, 16)
    grid = tile_grid((40, 30, 30), patch, 0.25)
    regular = sliding_window_inference(volume, position_network, patch, overlap=0.25)
    np.testing.assert_allclose(sliding_window_inference(volume, position_network, patch, tiles=grid), regular, rtol=1e-6)
    # one column of tiles along z, shifted in-plane by a few voxels per step
    column = [(slice(z, z + 16), slice(2 + z // 8, 18 + z // 8), slice(5, 21)) for z in (0, 12, 24)]
    calls = []
    out = sliding_window_inference(volume, lambda b: calls.append(1) or position_network(b), patch, tiles=column)
    assert len(calls) == 3
    covered = np.zeros((40, 30, 30), bool)
    for tile in column:
        covered[tile] = True
    assert (out[0][~covered] == 0).all()
    np.testing.assert_allclose(out[0][covered], 2.0 * volume[0][covered], rtol=1e-5)  # every covering tile says 2x the input
    with pytest.raises(ValueError, match="not a"):
        sliding_window_inference(volume, position_network, patch, tiles=[(slice(0, 16), slice(0, 16), slice(20, 36))])  # hangs out
    with pytest.raises(ValueError, match="not a"):
        sliding_window_inference(volume, position_network, patch, tiles=[(slice(0, 8), slice(0, 16), slice(0, 16))])  # too short
