"""The sequence model behind :func:`~SpineContextSegLib.anatomy.naming.name_vertebrae`.

The chains (C1-L5, with L6, with T13: :data:`CHAIN_PRIORS`) and their states
(:class:`_ChainModel`), the expected geometry of each level (body radius
:data:`EXPECTED_BODY_RADIUS_MM`, body heights and discs :data:`_HEIGHT_ANCHORS`, at the
patient's scale :data:`HEIGHT_SCALES`), the likelihood of the evidence per state (ribs:
``_rib_probability``, ``_rib_count_log``; a vertebrae network's votes:
:func:`network_name_shares`), the log-likelihood tables of one chain
(``_log_likelihood_tables``) and the forward-backward and Viterbi passes over the segments
(``_forward_backward``, ``_path_log_scores``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from SpineContextSegLib.anatomy.evidence import VertebraGeometry

#: Typical in-plane radius (mm) of the largest disc inscribed in a vertebral body, by VerSe id:
#: about 45 % of the smaller of the body's depth and width (adult averages; patients vary by
#: +-20 %, hence only a weak cue that tells regions apart, not neighbours).
EXPECTED_BODY_RADIUS_MM: Dict[int, float] = {
    2: 8.0, 3: 7.5, 4: 7.5, 5: 7.5, 6: 8.0, 7: 8.5,
    8: 9.0, 9: 9.0, 10: 9.5, 11: 10.0, 12: 10.5, 13: 11.0, 14: 11.5, 15: 12.0, 16: 12.5, 17: 13.0, 18: 13.5, 19: 14.0, 28: 14.0,
    20: 14.5, 21: 15.0, 22: 15.5, 23: 15.5, 24: 15.5, 25: 15.5,
}  # fmt: skip
#: Spread of the body radius around :data:`EXPECTED_BODY_RADIUS_MM` times the patient's scale
#: (:data:`HEIGHT_SCALES`), within one spine (natural-log units).
BODY_RADIUS_LOG_SIGMA = 0.15
#: Prior of the three chains: standard, with a 6th lumbar vertebra, with a 13th thoracic one.
CHAIN_PRIORS = {"standard": 0.92, "L6": 0.05, "T13": 0.03}
#: Pseudo-id of a first segment holding C1 and C2 together (C1 has no body, so no disc separates them).
ATLAS_AXIS = -1
#: Prior of a top segment that is C1 alone, relative to C1 and C2 arriving together: a mask
#: with a gap between the atlas and the dens leaves the atlas a segment of its own.
ATLAS_ALONE_PRIOR = 0.2

#: Body height and the disc below it (mm, adult averages) at anchor levels along the chain
#: (position 0 = C1 ... 23 = L5; T13 sits at 18.5, L6 at 23.5); between anchors they are
#: interpolated. Body height grows from about 13 mm (C3) to 27 mm (L3-L5), discs from 4 to 11 mm.
_HEIGHT_ANCHORS = (np.array([2.0, 6.0, 7.0, 12.0, 18.0, 21.0, 23.0]), np.array([13.0, 14.0, 16.0, 20.0, 24.0, 27.0, 27.0]), np.array([5.0, 5.0, 4.0, 5.0, 7.0, 10.0, 11.0]))
#: Arc length (mm) of the C2 segment (its body and the dens; C1 and C2 arrive as one segment) and of C1 alone.
C2_SEGMENT_MM, C1_SEGMENT_MM = 30.0, 10.0
#: Patient scale of the vertebra heights: candidates and the spread of their prior (natural-log units).
HEIGHT_SCALES = np.exp(np.linspace(math.log(0.7), math.log(1.45), 16))
HEIGHT_SCALE_LOG_SIGMA = 0.15
#: Spread of the distance between two vertebra centres around its expected value: a share of
#: that distance plus a constant (mm), once the patient's scale is known.
PITCH_SIGMA_SHARE, PITCH_SIGMA_MM = 0.06, 1.5
#: Spread of a whole vertebra's length along the centreline around its expected body height
#: (natural-log units, at the patient's scale).
BODY_HEIGHT_LOG_SIGMA = 0.15
#: Share of segment distances that fit no naming (segments of a mask in pieces), spread evenly
#: over twice the expected distance.
PITCH_OUTLIER_SHARE = 0.05
#: Prior of one vertebra missing from the mask between two segments (per missing level), and of
#: a segment being a further piece of the vertebra above it (a mask in fragments).
MISSING_LEVEL_PRIOR = 0.05
FRAGMENT_PRIOR = 0.1
#: A segment longer than this many body heights of its name (plus 2 mm) holds one more vertebra:
#: a level skipped beside it is not missing, it lies inside it (no :data:`MISSING_LEVEL_PRIOR`).
#: The chest CTA in 3 mm slices: T2+T3 and T4+T5 one segment each, named T4 and T5 while a
#: skip cost as much as a vertebra lost from the mask (8 of 12 named right, now 10).
MERGED_SEGMENT_HEIGHTS = 1.6
#: Expected number of rib pieces per side that :func:`find_ribs` finds where no rib-bearing level is.
RIB_FALSE_DETECTIONS = 0.05


#: P(:func:`~SpineContextSegLib.anatomy.evidence.lungs_beside` finds lung | level): the lungs
#: reach from about T1 (the apices) to the posterior recesses beside T12-L1. Never 0 or 1: a
#: flexed neck, emphysema, or gas in the bowel beside L2-L5. Only lung found is evidence: none
#: beside a lower thoracic vertebra is common (a diaphragm high in expiration, dense dependent
#: lung bases), and weighing it would tip the names of a lower thoracic run by a level.
LUNG_PROBABILITY: Dict[int, float] = {7: 0.3, 8: 0.8, 16: 0.95, 17: 0.9, 18: 0.75, 19: 0.5, 28: 0.45, 20: 0.25, 21: 0.1}
LUNG_PROBABILITY_CERVICAL, LUNG_PROBABILITY_THORACIC, LUNG_PROBABILITY_LUMBAR = 0.02, 0.97, 0.05
#: Levels with at least this :data:`LUNG_PROBABILITY` are ones the lung reaches (C7-L1): a
#: segment between the highest and the lowest with lung found counts as lung found at
#: :data:`LUNG_PROBABILITY_THORACIC` beside any of them. Lung beside one segment makes lung
#: beside its neighbours likely, so only the column's lung ends read the level: counted level
#: by level, the probabilities falling from T10 to L1 added up, on a chest CT in inspiration
#: (lung down to L1), to more than the last rib and named the first rib-less vertebra T12
#: (synthetic columns with lung beside every segment: 4 of 6 named right, 6 of 6 now).
LUNG_REACH_PROBABILITY = 0.25


def _lung_probability(verse_id: int) -> float:
    """P(lung found beside the body | level), from :data:`LUNG_PROBABILITY` and the per-region defaults."""
    if verse_id in LUNG_PROBABILITY:
        return LUNG_PROBABILITY[verse_id]
    if verse_id <= 6:
        return LUNG_PROBABILITY_CERVICAL
    if verse_id <= 19:
        return LUNG_PROBABILITY_THORACIC  # T2-T8
    return LUNG_PROBABILITY_LUMBAR  # L3-L6


def _chains() -> Dict[str, Tuple[int, ...]]:
    from SpineContextSegLib.labels import L6_ID, SACRUM_ID, STANDARD_CHAIN, T13_ID

    standard = tuple(v for v in STANDARD_CHAIN if v != SACRUM_ID)
    t12 = standard.index(19)
    return {"standard": standard, "L6": standard + (L6_ID,), "T13": standard[: t12 + 1] + (T13_ID,) + standard[t12 + 1 :]}


#: P(:func:`find_ribs` reports a rib on one side | a level without ribs): its false positives,
#: mostly iliac crests and sacral alae cut by a narrow field of view beside L4-L5.
RIB_FALSE_POSITIVE_RATE = 0.08
#: P(:func:`find_ribs` finds the rib on one side | a thoracic level), and for the last rib-bearing
#: level (T12, T13): the last rib is the shortest and most variable (a floating rib, a few cm,
#: sometimes rudimentary). On the shared real CTs it was found on 5 of 8 sides of T12 (chest CTA
#: 2, abdomen CT 2, PET/CT stack 1, verse014 0); at 0.9 a T12 seen without ribs turned the
#: column below into an L6 chain, with confidence (verse014; phantoms with T12's ribs erased);
#: at 0.6 the last rib found no longer held a chest CT's names in place (the chest CTA in 2.5 mm
#: slices named T1-T12 for T2-L1, lung beside L1 outweighing it).
RIB_FOUND_PROBABILITY, LAST_RIB_FOUND_PROBABILITY = 0.9, 0.7


def _rib_probability(verse_id: int) -> float:
    """P(a rib is found on one side | level): thoracic levels carry ribs (the last one's is often too short to find); C7 and L1 rarely do.

    Elsewhere a "rib" is a false detection: beside C1-C6 nothing looks like one (the
    transverse processes belong to the mask), beside L2-L5 an iliac crest or sacral ala cut by a
    narrow field of view may (:data:`RIB_FALSE_POSITIVE_RATE`).
    """
    if verse_id in (19, 28):
        return LAST_RIB_FOUND_PROBABILITY
    if 8 <= verse_id <= 18:
        return RIB_FOUND_PROBABILITY
    if verse_id in (7, 20):  # cervical ribs, lumbar ribs; the first and the last rib pass close by
        return RIB_FALSE_POSITIVE_RATE + 0.04
    if verse_id <= 6:
        return 0.02
    return RIB_FALSE_POSITIVE_RATE


#: Share of a vertebrae network's vote that is spread evenly over all names: a segment whose
#: voxels all say "L3" still leaves L2 a probability of ~0.4 % (log -5.6), so two or three
#: agreeing anatomical anchors (log 2-3 each) can overrule one mislabelled segment, not a column.
NETWORK_VOTE_FLOOR = 0.1
#: Largest VerSe id (T13 = 28): the vote tables have this many + 1 columns.
_MAX_VERSE_ID = 28


def network_name_shares(instances: np.ndarray, name_votes: np.ndarray, count: int) -> np.ndarray:
    """Per segment, the share of its voxels a vertebrae network gave each VerSe id.

    Parameters
    ----------
    instances : (D, H, W) int
        Segments 1..``count`` (0 = none).
    name_votes : (D, H, W) uint8
        The network's most probable vertebra per voxel, as a VerSe id (0 = no vote).
    count : int
        Number of segments.

    Returns
    -------
    (count, 29) float
        Row ``i`` is segment ``i + 1``; columns are VerSe ids 0-28 (column 0 unused); rows sum
        to 1, or to 0 for a segment without any vote.
    """
    inside = (instances > 0) & (name_votes > 0)
    index = instances[inside].astype(np.int64) * (_MAX_VERSE_ID + 1) + np.minimum(name_votes[inside], _MAX_VERSE_ID).astype(np.int64)
    table = np.bincount(index, minlength=(count + 1) * (_MAX_VERSE_ID + 1)).reshape(count + 1, _MAX_VERSE_ID + 1)[1:].astype(np.float64)
    totals = table.sum(axis=1, keepdims=True)
    return np.divide(table, totals, out=np.zeros_like(table), where=totals > 0)


def _verse_ids_of(name: int) -> Tuple[int, ...]:
    """The VerSe ids a run's name stands for: C1 and C2 for :data:`ATLAS_AXIS`, else the name itself."""
    return (1, 2) if name == ATLAS_AXIS else (name,)


def _network_log_probability(name: int, shares: np.ndarray) -> float:
    """log P(name | a segment's vote shares), with :data:`NETWORK_VOTE_FLOOR` spread over all names."""
    share = float(shares[list(_verse_ids_of(name))].sum())
    return math.log((1.0 - NETWORK_VOTE_FLOOR) * share + NETWORK_VOTE_FLOOR / _MAX_VERSE_ID)


@dataclass
class _ChainModel:
    """The states of one chain for the sequence step: names, positions and expected geometry."""

    name: str
    names: List[int]  # state -> name (ATLAS_AXIS first, then the chain's VerSe ids)
    position: np.ndarray  # index along the chain (ATLAS_AXIS counts as C2)
    centre_mm: np.ndarray  # expected body centre, mm caudal of C2's at scale 1
    height_mm: np.ndarray  # expected body (segment) height at scale 1
    rib: np.ndarray  # P(rib found on one side | state)
    lung: np.ndarray  # P(lung found beside the body | state)


def _chain_model(name: str, chain: Sequence[int]) -> _ChainModel:
    from SpineContextSegLib.labels import L6_ID, T13_ID

    anchor_position, anchor_height, anchor_disc = _HEIGHT_ANCHORS
    positions = []
    for index, verse_id in enumerate(chain):
        if verse_id == T13_ID:
            positions.append(18.5)
        elif verse_id == L6_ID:
            positions.append(23.5)
        else:
            positions.append(float(index - (1 if name == "T13" and index > chain.index(T13_ID) else 0)))
    heights = np.interp(positions, anchor_position, anchor_height)
    discs = np.interp(positions, anchor_position, anchor_disc)
    heights[0], heights[1] = C1_SEGMENT_MM, C2_SEGMENT_MM
    centre = np.zeros(len(chain))
    centre[0] = -C1_SEGMENT_MM
    for index in range(2, len(chain)):
        centre[index] = centre[index - 1] + 0.5 * heights[index - 1] + discs[index - 1] + 0.5 * heights[index]
    names = [ATLAS_AXIS] + list(chain)
    return _ChainModel(
        name,
        names,
        np.array([1] + list(range(len(chain))), dtype=np.float64),
        np.concatenate([[centre[1]], centre]),
        np.concatenate([[heights[1]], heights]),
        np.array([_rib_probability(2)] + [_rib_probability(v) for v in chain]),
        np.array([_lung_probability(2)] + [_lung_probability(v) for v in chain]),
    )


def _logsumexp(values: np.ndarray, axis) -> np.ndarray:
    peak = np.max(values, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(peak, axis=axis) + np.log(np.sum(np.exp(values - peak), axis=axis))


def _rib_count_log(rib: np.ndarray, found: int) -> np.ndarray:
    """log P(``found`` ribs on one side | the levels ``u .. v-1`` of a chain), for every ``u <= v``.

    Each level ``m`` carries a rib that :func:`find_ribs` finds with probability ``rib[m]``;
    on top, false detections are Poisson with mean :data:`RIB_FALSE_DETECTIONS`. Returns an
    (M + 1, M + 1) table for M levels (entries with ``u > v`` are -inf).
    """
    levels = rib.size
    table = np.full((levels + 1, levels + 1), -np.inf)
    counts = np.arange(found + 1)
    false = np.exp(counts * math.log(RIB_FALSE_DETECTIONS) - RIB_FALSE_DETECTIONS - np.array([math.lgamma(c + 1) for c in counts]))
    for u in range(levels + 1):
        dist = false.copy()  # P(k ribs so far), k = 0 .. found (more than found cannot come back down)
        with np.errstate(divide="ignore"):
            table[u, u] = math.log(dist[found]) if dist[found] > 0 else -np.inf
            for v in range(u, levels):
                dist = dist * (1.0 - rib[v]) + np.concatenate([[0.0], dist[:-1]]) * rib[v]
                table[u, v + 1] = math.log(dist[found]) if dist[found] > 0 else -np.inf
    return table


def segment_kinds(geometry: Sequence[VertebraGeometry], visible_arc: Tuple[float, float]) -> Tuple[np.ndarray, ...]:
    """``(piece, small, truncated, cut_above, cut_below)``, each (N,) bool over the segments (top first).

    A piece is much shorter than its neighbours (under 0.55 of the 80th percentile of the
    lengths of the nine around it: a stretch of fragments must not set the norm): a piece of a
    vertebra, beside which a missing rib says little. Small ones hold under half their volume;
    truncated ones touch the field of view's edge, cut above (below) within 5 mm of the top
    (bottom) of the centreline's visible stretch, ``visible_arc`` (top, bottom) mm.
    """
    count = len(geometry)
    length = np.array([max(g.arc_high_mm - g.arc_low_mm, 0.0) for g in geometry])
    typical = np.array([np.percentile(length[max(0, i - 4) : i + 5], 80) for i in range(count)])
    volume = np.array([g.volume_ml for g in geometry])
    small = volume < 0.5 * np.array([np.percentile(volume[max(0, i - 4) : i + 5], 80) for i in range(count)])
    truncated = np.array([g.truncated for g in geometry], dtype=bool)
    cut_above = truncated & (np.array([g.arc_high_mm for g in geometry]) >= visible_arc[0] - 5.0)
    cut_below = truncated & (np.array([g.arc_low_mm for g in geometry]) <= visible_arc[1] + 5.0)
    return length < 0.55 * typical, small, truncated, cut_above, cut_below


def _log_likelihood_tables(
    model: _ChainModel, geometry: Sequence[VertebraGeometry], ribs: Sequence[Dict[str, object]], gaps: Sequence[Dict[str, object]], below: Dict[str, object], above: Dict[str, object],
    votes: Optional[np.ndarray], visible_arc: Tuple[float, float], lungs: Optional[Sequence[Optional[bool]]] = None,
):
    """Log-likelihood tables of the sequence step for one chain, per scale of :data:`HEIGHT_SCALES`.

    Returns ``(start, emission, transition, end)``: (S, J), (S, N, J), list of N-1 (S, J, J),
    (S, J) for S scales, N segments (top first) and J states of ``model``.
    """
    names = model.names
    states = len(names)
    count = len(geometry)
    scales = HEIGHT_SCALES[:, None]
    centre = np.array([0.5 * (g.arc_low_mm + g.arc_high_mm) for g in geometry])
    length = np.array([max(g.arc_high_mm - g.arc_low_mm, 0.0) for g in geometry])
    piece, small, truncated, cut_above, _ = segment_kinds(geometry, visible_arc)
    whole = ~piece & ~small & ~truncated  # a whole vertebra: its length is its body height
    emission = np.zeros((count, states))
    lung_found = [i for i, lung in enumerate(lungs or []) if lung]
    lung_ends = (lung_found[0], lung_found[-1]) if lung_found else ()
    lung_between = np.where(model.lung >= LUNG_REACH_PROBABILITY, LUNG_PROBABILITY_THORACIC, model.lung)
    for i, evidence in enumerate(ribs):
        for side in ("right", "left"):
            if evidence.get(side) is True:
                emission[i] += np.log(model.rib)
            elif evidence.get(side) is False and (truncated[i] or not piece[i]) and not cut_above[i]:
                # (a vertebra the scan cuts above has lost the upper part where its ribs articulate)
                emission[i] += np.log(1.0 - model.rib)
        if votes is not None and votes[i].sum() > 0:
            emission[i] += [_network_log_probability(name, votes[i]) for name in names]
        if lungs is not None and lungs[i]:
            emission[i] += np.log(model.lung if i in lung_ends else lung_between)
    # body size: the patient's scale times the typical radius of the level; the spread is the
    # variation within one spine (people differ in size as a whole: that is the scale's prior)
    expected_radius = np.array([EXPECTED_BODY_RADIUS_MM.get(2 if name == ATLAS_AXIS else name, np.nan) for name in names])
    radius = np.array([g.body_radius_mm if g.body_radius_mm > 0 else np.nan for g in geometry])
    radius_sigma = BODY_RADIUS_LOG_SIGMA * np.where(truncated | piece | small, 1.6, 1.0)  # cut by the field of view, or a piece: less reliable
    with np.errstate(invalid="ignore"):
        size_z = (np.log(radius)[None, :, None] - np.log(scales[:, :, None] * expected_radius[None, None, :])) / radius_sigma[None, :, None]
    size_term = np.nan_to_num(-0.5 * size_z ** 2, nan=0.0)  # (S, N, J)
    height = scales * model.height_mm[None, :]  # (S, J)
    # a whole vertebra is as long as the body it is named after (at the patient's scale); any
    # segment much longer than that is more than one vertebra
    excess = np.maximum(0.0, length[None, :, None] - (1.3 * height[:, None, :] + 2.0))
    emission = emission[None] + size_term - 0.5 * (excess / (0.1 * height[:, None, :] + 1.0)) ** 2
    with np.errstate(divide="ignore"):
        ratio = np.log(np.maximum(length, 1.0))[None, :, None] - np.log(height)[:, None, :]
    # (C1 and C2 excepted: the dens goes with C2 or with C1, or the mask misses it)
    regular = np.array([name not in (ATLAS_AXIS, 1, 2) for name in names])
    measured = whole[None, :, None] & regular[None, None, :]
    emission = emission - np.where(measured, 0.5 * (ratio / BODY_HEIGHT_LOG_SIGMA) ** 2, 0.0)
    # a piece of a vertebra (or one cut by the field of view) may lie anywhere inside it
    loose = np.where(measured, 0.0, 0.5 * np.maximum(0.0, height[:, None, :] - length[None, :, None]))  # (S, N, J)
    # ribs found in a gap: the levels strictly between two states carry them
    chain_rib = model.rib[1:]  # per chain level (ATLAS excluded)
    chain_index = model.position.astype(np.int64)  # ATLAS stands for C2 (chain index 1)
    between_low = np.minimum(chain_index[:, None] + 1, chain_index[None, :])  # (J, J): levels [low, high)
    between_high = np.maximum(chain_index[None, :], between_low)
    count_tables: Dict[int, np.ndarray] = {}

    def rib_count_log(found: int) -> np.ndarray:
        if found not in count_tables:
            count_tables[found] = _rib_count_log(chain_rib, found)
        return count_tables[found]
    levels_apart = model.position[None, :] - model.position[:, None]
    first_only = np.array([name in (ATLAS_AXIS, 1) for name in names])
    valid = ((levels_apart >= 1) & ~first_only[None, :]) | (np.eye(states, dtype=bool))
    expected = scales[:, :, None] * (model.centre_mm[None, None, :] - model.centre_mm[None, :, None])  # (S, J, J)
    sigma = PITCH_SIGMA_SHARE * np.abs(expected) + PITCH_SIGMA_MM
    # a mask in pieces places some segments anywhere: a broad floor keeps one such distance
    # from outweighing the anatomical anchors
    floor = math.log(PITCH_OUTLIER_SHARE) - np.log(2.0 * np.abs(expected) + 20.0)
    # levels skipped between two segments are missing from the mask, unless a segment beside
    # them is long enough to hold one more vertebra (thick slices merge two across a disc)
    skipped = np.maximum(levels_apart - 1, 0)[None]
    holds_two = (length[None, :, None] > MERGED_SEGMENT_HEIGHTS * height[:, None, :] + 2.0).astype(np.float64)  # (S, N, J)
    transitions = []
    for i in range(count - 1):
        distance = centre[i] - centre[i + 1]
        slack = loose[:, i, :, None] + loose[:, i + 1, None, :]
        residual = np.maximum(0.0, np.abs(distance - expected) - slack)
        fits = -0.5 * (residual / sigma) ** 2 - np.log(2.0 * slack + 2.5066 * sigma)
        merged = holds_two[:, i, :, None] + holds_two[:, i + 1, None, :]
        table = np.logaddexp(math.log(1.0 - PITCH_OUTLIER_SHARE) + fits, floor) + (skipped - np.minimum(merged, skipped)) * math.log(MISSING_LEVEL_PRIOR)
        # a further piece of the vertebra above: both fit inside one vertebra
        union = geometry[i].arc_high_mm - geometry[i + 1].arc_low_mm
        own = height  # (S, J)
        fragment = math.log(FRAGMENT_PRIOR) - np.log(own) - 0.5 * (np.maximum(0.0, union - 1.1 * own) / (0.08 * own + 1.5)) ** 2
        for side in ("right", "left"):
            if ribs[i].get(side) is True and ribs[i + 1].get(side) is True:
                fragment = fragment + math.log(RIB_FALSE_DETECTIONS)  # two ribs on one side of one vertebra
        diagonal = np.arange(states)
        table[:, diagonal, diagonal] = fragment
        for side in ("right", "left"):
            found = gaps[i + 1].get(side)
            if found is not None:
                table = table + rib_count_log(int(found))[between_low, between_high][None]
        table[:, ~valid] = -np.inf
        transitions.append(table)
    # the top segment: C1 (with C2, or alone), the skull base above it, ribs above it
    start = np.zeros((len(HEIGHT_SCALES), states))
    start[:, names.index(1)] += math.log(ATLAS_ALONE_PRIOR)
    if above.get("skull_found"):
        start += np.array([math.log(0.8) if 1 in _verse_ids_of(name) else math.log(0.05) for name in names])[None]
    end = np.zeros((len(HEIGHT_SCALES), states))
    last = names[-1]
    if below.get("bone_found"):
        # the sacrum lies below the last lumbar vertebra; below any other one the next vertebra
        # would have to be missing from the mask
        end += np.array([math.log(0.9) if name == last else math.log(0.15) for name in names])[None]
        if below.get("alae_found"):
            end += np.array([math.log(0.7) if name == last else math.log(0.2) for name in names])[None]
    # ribs beyond the ends of the column: levels above the top segment (below the lowest one)
    # that would lie wholly inside the scanned stretch of the centreline carry them
    top, bottom = visible_arc
    order = np.arange(1, states)
    levels = order.size
    for table, gap, anchor, sign in ((start, gaps[0], 0, 1.0), (end, gaps[-1], count - 1, -1.0)):
        if not np.isfinite(centre[anchor]) or (gap.get("right") is None and gap.get("left") is None):
            continue
        # (S, J, M): the arc of chain level m when the end segment is state j
        position = centre[anchor] + scales[:, :, None] * (model.centre_mm[None, :, None] - model.centre_mm[None, None, order])
        beyond = (model.position[None, :, None] - model.position[None, None, order]) * sign > 0
        beyond[0, 0, names.index(1) - 1] = False  # C1 is part of a C1+C2 segment
        half = 0.5 * scales[:, :, None] * model.height_mm[None, None, order] + 5.0  # the whole level inside the scan
        seen = (position + half <= top) & (position - half >= bottom) & beyond
        # the seen levels are one run along the chain: [low, high)
        any_seen = seen.any(axis=2)
        low = np.where(any_seen, np.argmax(seen, axis=2), 0)
        high = np.where(any_seen, levels - np.argmax(seen[:, :, ::-1], axis=2), 0)
        for side in ("right", "left"):
            found = gap.get(side)
            if found is not None:
                table += rib_count_log(int(found))[low, high]
    return start, emission, transitions, end


def _forward_backward(start, emission, transitions, end):
    """Sum-product and max-product passes over the segments for every scale at once.

    Returns ``(log_z, marginals, best_paths, best_scores)``: (S,), (S, N, J) posterior state
    probabilities per scale, (S, N) Viterbi state paths, (S,) their log scores.
    """
    scales, count, states = emission.shape
    alpha = np.empty((scales, count, states))
    alpha[:, 0] = start + emission[:, 0]
    delta = alpha[:, 0].copy()
    pointers = np.zeros((count, scales, states), dtype=np.int64)
    for i, table in enumerate(transitions):
        alpha[:, i + 1] = _logsumexp(alpha[:, i][:, :, None] + table, axis=1) + emission[:, i + 1]
        candidates = delta[:, :, None] + table
        pointers[i + 1] = np.argmax(candidates, axis=1)
        delta = np.max(candidates, axis=1) + emission[:, i + 1]
    beta = np.zeros((scales, count, states))
    beta[:, -1] = end
    for i in range(count - 2, -1, -1):
        beta[:, i] = _logsumexp(transitions[i] + (emission[:, i + 1] + beta[:, i + 1])[:, None, :], axis=2)
    log_z = _logsumexp(alpha[:, -1] + end, axis=1)
    with np.errstate(invalid="ignore"):
        marginals = np.exp(alpha + beta - log_z[:, None, None])
    marginals = np.nan_to_num(marginals)
    final = delta + end
    paths = np.zeros((scales, count), dtype=np.int64)
    paths[:, -1] = np.argmax(final, axis=1)
    for i in range(count - 1, 0, -1):
        paths[:, i - 1] = pointers[i][np.arange(scales), paths[:, i]]
    return log_z, marginals, paths, np.max(final, axis=1)


def _path_log_scores(path: np.ndarray, start, emission, transitions, end) -> np.ndarray:
    """Log score (S,) of one state path under every scale."""
    steps = np.arange(len(path))
    score = start[:, path[0]] + emission[:, steps, path].sum(axis=1) + end[:, path[-1]]
    for i, table in enumerate(transitions):
        score = score + table[:, path[i], path[i + 1]]
    return score
