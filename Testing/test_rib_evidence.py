"""Ribs as naming evidence: a rib whose vertebra the scan cannot show counts nowhere.

A straight synthetic column (a cylinder of bone, 1 mm voxels) with one bar of bone beside it
for a rib: found where its whole neck is in the scan; not found where the scan's top edge cuts
it (ribs run down and out from their heads, so a piece cut above may be the shaft of a rib of a
vertebra above the scan). And :func:`rib_evidence` gives a rib to the segment it touches only if
it also lies level with that segment (lying in a gap between segments, it counts in the gap), and
in a gap, pieces of one rib count once.
"""
import numpy as np
import pytest

from SpineContextSegLib.anatomy.centreline import body_centreline
from SpineContextSegLib.anatomy.evidence import Rib, RibScan, VertebraGeometry, find_ribs
from SpineContextSegLib.anatomy.naming import rib_evidence

SPACING_MM = (1.0, 1.0, 1.0)
SHAPE = (80, 100, 120)  # z inferior->superior, y anterior->posterior, x right->left
CENTRE_YX = (40, 60)
RADIUS_VOXELS = 12


def straight_column():
    z, y, x = np.indices(SHAPE)
    mask = (y - CENTRE_YX[0]) ** 2 + (x - CENTRE_YX[1]) ** 2 <= RADIUS_VOXELS ** 2
    ct = np.where(mask, 400.0, 0.0).astype(np.float32)
    return mask, ct


def add_rib(ct, z_range):
    """A bar of bone on the left from just outside the column's edge outward 30 mm, behind the body's centre."""
    low, high = z_range
    x0 = CENTRE_YX[1] + RADIUS_VOXELS + 9  # beyond the band's inner edge (1.6 body radii)
    ct[low:high, CENTRE_YX[0] + 4: CENTRE_YX[0] + 9, x0: x0 + 30] = 400.0


@pytest.fixture(scope="module")
def column():
    mask, ct = straight_column()
    return mask, ct, body_centreline(mask, SPACING_MM)


def test_a_rib_inside_the_scan_is_found_at_its_level(column):
    mask, ct, line = column
    ct = ct.copy()
    add_rib(ct, (40, 46))
    ribs = find_ribs(ct, mask, line, SPACING_MM).ribs
    assert [rib.side for rib in ribs] == ["left"]
    assert abs(ribs[0].arc_mm - float(np.interp(42.5, line.z_mm, line.arc_mm))) < 3.0


@pytest.mark.parametrize("cut_by", ["top slice", "field of view"])
def test_a_rib_cut_by_the_top_of_the_scan_is_not_evidence(column, cut_by):
    mask, ct, line = column
    ct = ct.copy()
    if cut_by == "top slice":
        add_rib(ct, (SHAPE[0] - 6, SHAPE[0]))
        field_of_view = None
    else:
        add_rib(ct, (60, 66))
        field_of_view = np.ones(SHAPE, dtype=bool)
        field_of_view[66:] = False  # the scan ends just above the rib
    assert find_ribs(ct, mask, line, SPACING_MM, field_of_view).ribs == []
    # the same bar one slice lower, with one slice of scan above it, is a rib
    lowered = np.roll(ct, -1, axis=0) if cut_by == "top slice" else np.roll(ct, -2, axis=0)
    lowered[:, :, : CENTRE_YX[1] + RADIUS_VOXELS + 1] = ct[:, :, : CENTRE_YX[1] + RADIUS_VOXELS + 1]
    assert len(find_ribs(lowered, mask, line, SPACING_MM, field_of_view).ribs) == 1


@pytest.mark.parametrize("run_mm, found", [(12, True), (7, False)])
def test_a_thin_rib_cut_by_a_narrow_sagittal_slab_is_found(column, run_mm, found):
    """A sagittal slab 80 mm wide in 3 mm slices shows a rib's neck over 10-15 mm, blurred to
    0.3-0.45 ml of bone (the chest CTA cut so: T9-L1 named T11-L3 while such ribs were dropped).
    A piece that runs only 7 mm before the slab's edge (a transverse process tip) stays out."""
    mask, ct, line = column
    ct = ct.copy()
    add_rib(ct, (40, 46))  # 6 x 5 mm in section: 0.36 ml over 12 mm
    x_edge = CENTRE_YX[1] + RADIUS_VOXELS + 9 + run_mm
    field_of_view = np.ones(SHAPE, dtype=bool)
    field_of_view[:, :, x_edge:] = False  # the slab's left edge
    ct[~field_of_view] = -1000.0
    ribs = find_ribs(ct, mask, line, SPACING_MM, field_of_view).ribs
    assert [(rib.side, rib.cut_by_fov) for rib in ribs] == ([("left", True)] if found else [])


def _segments(line, arcs):
    return [VertebraGeometry(low, high, np.zeros(3), RADIUS_VOXELS, 30.0, False) for low, high in arcs]


def test_a_rib_touching_one_segment_but_level_with_another_counts_nowhere(column):
    _, _, line = column
    geometry = _segments(line, [(60.0, 78.0), (38.0, 58.0), (15.0, 36.0)])  # top first
    view = {"right": np.ones(SHAPE[0]), "left": np.ones(SHAPE[0])}
    level_with_third = Rib("left", 25.0, 40.0, 1.0, False, 30.0, 0.0, segment=1)
    per_segment, gaps = rib_evidence(geometry, RibScan([level_with_third], view, touch_known=True), line)
    assert [segment["left"] for segment in per_segment] == [False, False, False]
    assert all(gap["left"] == 0 for gap in gaps)
    # the same rib level with the segment it touches (its neck at the disc above: within a body radius) is that segment's
    for arc in (70.0, 78.0 + RADIUS_VOXELS - 1.0):
        own = Rib("left", arc, 40.0, 1.0, False, 30.0, 0.0, segment=1)
        per_segment, _ = rib_evidence(geometry, RibScan([own], view, touch_known=True), line)
        assert [segment["left"] for segment in per_segment] == [True, False, False]


def test_a_rib_touching_a_segment_but_lying_in_a_gap_counts_in_that_gap(column):
    """A ragged chest mask: the arches of the vertebra below a gap reach up to the ribs of the levels the gap hides."""
    _, _, line = column
    geometry = _segments(line, [(62.0, 78.0), (10.0, 30.0)])  # top first; 32 mm without mask between them
    view = {"right": np.ones(SHAPE[0]), "left": np.ones(SHAPE[0])}
    in_the_gap = Rib("left", 46.0, 40.0, 1.0, False, 30.0, 0.0, segment=2)  # touches the lower segment
    per_segment, gaps = rib_evidence(geometry, RibScan([in_the_gap], view, touch_known=True), line)
    assert [segment["left"] for segment in per_segment] == [False, False]
    assert [gap["left"] for gap in gaps] == [0, 1, 0]
    # level with the segment it touches, it is that segment's rib and no gap's
    level = Rib("left", 20.0, 40.0, 1.0, False, 30.0, 0.0, segment=2)
    per_segment, gaps = rib_evidence(geometry, RibScan([level], view, touch_known=True), line)
    assert [segment["left"] for segment in per_segment] == [False, True]
    assert [gap["left"] for gap in gaps] == [0, 0, 0]


def test_two_pieces_of_one_rib_in_a_gap_count_as_one_level(column):
    """Head and shaft found apart are one rib: a gap holding them hides one rib-bearing level, not two."""
    _, _, line = column
    geometry = _segments(line, [(62.0, 78.0), (10.0, 30.0)])
    view = {"right": np.ones(SHAPE[0]), "left": np.ones(SHAPE[0])}
    pieces = [Rib("left", arc, 40.0, 1.0, False, 30.0, 0.0, segment=0) for arc in (42.0, 48.0)]
    _, gaps = rib_evidence(geometry, RibScan(pieces, view, touch_known=True), line)
    assert gaps[1]["left"] == 1
    # two ribs a level apart (20 mm) are two levels
    two_levels = [Rib("left", arc, 40.0, 1.0, False, 30.0, 0.0, segment=0) for arc in (37.0, 57.0)]
    _, gaps = rib_evidence(geometry, RibScan(two_levels, view, touch_known=True), line)
    assert gaps[1]["left"] == 2
