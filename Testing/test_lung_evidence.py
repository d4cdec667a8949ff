"""Lungs as naming evidence: thoracic vertebrae lie between the lungs, the others do not.

A straight synthetic column (a cylinder of bone in soft tissue, 1 mm voxels) with lung beside
its upper part: :func:`lungs_beside` finds it level with the upper segments and not beside the
lower ones, tells lung from air outside the body and from bowel gas by their density, says
"not seen" where the field of view hides the region, and the sequence model then keeps a chest
column whose ribs were not found out of the cervical and lumbar levels.
"""
import math

import numpy as np
import pytest

from SpineContextSegLib.anatomy.centreline import body_centreline
from SpineContextSegLib.anatomy.evidence import VertebraGeometry, lungs_beside
from SpineContextSegLib.anatomy.naming_model import _chain_model, _chains, _log_likelihood_tables, _lung_probability

SPACING_MM = (1.0, 1.0, 1.0)
SHAPE = (120, 120, 200)  # z inferior->superior, y anterior->posterior, x right->left
CENTRE_YX = (60, 100)
RADIUS = 12


def column_in_soft_tissue():
    z, y, x = np.indices(SHAPE)
    mask = (y - CENTRE_YX[0]) ** 2 + (x - CENTRE_YX[1]) ** 2 <= RADIUS ** 2
    ct = np.where(mask, 400.0, 40.0).astype(np.float32)
    return mask, ct


def segments(line):
    """Three 30 mm segments (top first) on the straight column."""
    out = []
    for low in (85.0, 45.0, 5.0):
        out.append(VertebraGeometry(low, low + 30.0, np.array([low + 15.0, CENTRE_YX[0], CENTRE_YX[1]]), float(RADIUS), 10.0, False))
    return out


def paint_beside(ct, z_range, hu, sides=("right", "left")):
    """A block of ``hu`` 30-70 mm to the given sides of the column, from 30 mm in front to 10 mm behind its centre."""
    low, high = z_range
    rows = slice(CENTRE_YX[0] - 30, CENTRE_YX[0] + 10)
    for side in sides:
        columns = slice(CENTRE_YX[1] - 70, CENTRE_YX[1] - 30) if side == "right" else slice(CENTRE_YX[1] + 30, CENTRE_YX[1] + 70)
        ct[low:high, rows, columns] = hu


@pytest.fixture(scope="module")
def column():
    mask, ct = column_in_soft_tissue()
    return mask, ct, body_centreline(mask, SPACING_MM)


def test_lung_is_found_beside_the_segments_level_with_it_and_not_beside_the_others(column):
    mask, ct, line = column
    ct = ct.copy()
    paint_beside(ct, (60, 120), -850.0)  # lung beside the top two segments (centres at z 100 and 60)
    found = lungs_beside(ct, segments(line), line, SPACING_MM)
    assert found == [True, True, False]
    # one lung is enough (the other side collapsed, or out of the crop)
    one_sided = ct.copy()
    paint_beside(one_sided, (60, 120), 40.0, sides=("left",))
    assert lungs_beside(one_sided, segments(line), line, SPACING_MM) == [True, True, False]


def test_air_outside_the_body_and_bowel_gas_are_not_lung(column):
    mask, ct, line = column
    ct = ct.copy()
    paint_beside(ct, (0, 120), -1000.0)  # as dark as air: outside the body, or gas in the bowel
    assert lungs_beside(ct, segments(line), line, SPACING_MM) == [False, False, False]


def test_a_region_the_field_of_view_hides_is_not_seen_rather_than_without_lung(column):
    mask, ct, line = column
    field_of_view = np.zeros(SHAPE, dtype=bool)
    x = np.arange(SHAPE[2])
    field_of_view[..., np.abs(x - CENTRE_YX[1]) <= 25] = True  # a narrow sagittal slab: 50 mm wide
    assert lungs_beside(ct, segments(line), line, SPACING_MM, field_of_view) == [None, None, None]
    # lung filling most of the strip a narrow view shows still counts
    ct = ct.copy()
    ct[:, CENTRE_YX[0] - 40 : CENTRE_YX[0] + 20, CENTRE_YX[1] + 20 : CENTRE_YX[1] + 26] = -850.0
    assert lungs_beside(ct, segments(line), line, SPACING_MM, field_of_view) == [True, True, True]


def test_lung_probability_separates_the_thoracic_levels_from_the_neck_and_the_lower_back():
    assert all(_lung_probability(v) >= 0.95 for v in range(9, 17))  # T2-T9
    assert all(_lung_probability(v) <= 0.02 for v in range(1, 7))  # C1-C6
    assert all(_lung_probability(v) <= 0.1 for v in range(21, 26))  # L2-L6
    # it falls from T10 to L2, where the lung bases end
    lower = [_lung_probability(v) for v in (17, 18, 19, 20, 21)]
    assert lower == sorted(lower, reverse=True) and lower[0] > 0.5 > lower[-1]


def test_lungs_beside_a_column_without_ribs_rule_out_cervical_and_lumbar_names():
    # eight 22 mm segments whose evidence is only lung on every one: the emission of a naming
    # that calls them cervical or lumbar loses about 3 nats per segment against a thoracic one
    geometry = [VertebraGeometry(200.0 - 25 * i - 22, 200.0 - 25 * i, np.zeros(3), math.nan, 20.0, False) for i in range(8)]
    no_ribs = [{"right": None, "left": None} for _ in geometry]
    gaps = [{"right": 0, "left": 0, "arcs": []} for _ in range(len(geometry) + 1)]
    below = {"bone_found": False, "alae_found": False, "fov_share": 0.0}
    above = {"skull_found": False, "fov_share": 0.0}
    model = _chain_model("standard", _chains()["standard"])
    visible = (200.0, 0.0)
    with_lungs = _log_likelihood_tables(model, geometry, no_ribs, gaps, below, above, None, visible, [True] * len(geometry))[1]
    without = _log_likelihood_tables(model, geometry, no_ribs, gaps, below, above, None, visible)[1]
    lung_term = (with_lungs - without)[0]  # (segments, states) at the first scale
    state = {name: j for j, name in enumerate(model.names)}
    for i in range(len(geometry)):
        assert lung_term[i, state[12]] - lung_term[i, state[4]] > 3.0  # T5 against C4
        assert lung_term[i, state[12]] - lung_term[i, state[23]] > 2.5  # T5 against L4


@pytest.mark.parametrize("with_ribs, without_ribs", [(5, 1), (4, 2), (3, 1)])
def test_lung_down_to_the_first_lumbar_vertebra_does_not_move_the_names_up_a_level(monkeypatch, with_ribs, without_ribs):
    # a chest CT in inspiration: lung beside every segment, L1 included. Counted per segment, the
    # lung probabilities (each a little lower towards L1) outweighed the last rib and named the
    # first rib-less vertebra T12 (these columns: 0 of 3 right with the last rib found on 0.6 of
    # sides, 1 of 3 at 0.7); only the column's lung ends read the level now
    from SpineContextSegLib.anatomy import naming, split
    from SpineContextSegLib.labels import vertebra_by_name

    from test_vertebrae import make_spine

    levels = [(12.0, 20.0)] * with_ribs + [(14.0, 24.0)] * without_ribs
    ct, mask, _ = make_spine(levels, ribs=tuple(range(with_ribs)))
    instances = split.split_vertebrae(mask, ct, 2.0)
    assert instances.max() == len(levels)
    monkeypatch.setattr(naming, "lungs_beside", lambda *args, **kwargs: [True] * len(levels))
    _, info = naming.name_vertebrae(instances, ct, 2.0)
    last_rib = vertebra_by_name("T12").value
    expected = [vertebra_by_name(name).value for name in ("L1", "L2")[:without_ribs]]
    assert info["verse_ids"][with_ribs - 1] == last_rib and info["verse_ids"][with_ribs:] == expected
    assert info["confidence"] > 0.5
