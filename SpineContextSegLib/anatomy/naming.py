"""Segments -> VerSe names: step 3 of the vertebra labelling.

**Naming** (:func:`name_vertebrae`): a sequence step over the segments, top to bottom, along the
chain C1-L5 (or the chains with T13 or L6) and over the patient's scale: each next segment is
the next level, a level further on (vertebrae missing from the mask) or a further piece of the
same vertebra (the model: :mod:`SpineContextSegLib.anatomy.naming_model`). The evidence
(measured in :mod:`SpineContextSegLib.anatomy.evidence`): the distance between segments against
the expected body heights and discs (it counts the vertebrae a gap hides); ribs, found in the CT
beside the column whether or not the mask holds their vertebra
(:func:`~SpineContextSegLib.anatomy.evidence.find_ribs`, :func:`rib_evidence`: thoracic levels,
and rib-bearing levels missing in a gap or beyond the ends), so the names count down from the
first rib (T1) and up from the last (T12); bone outside the mask right below the lowest
vertebra, with alae (:func:`~SpineContextSegLib.anatomy.evidence.bone_beyond_column`: the
sacrum, so the lowest vertebra is the last lumbar one); a skull base above the highest (it is
C1; C1 and C2 usually arrive as one segment and are split afterwards,
:func:`split_atlas_from_axis`; a mask with a gap under the atlas gives C1 alone); body size and
length at the patient's scale; with a vertebrae network (``train --task vertebrae``), also the
names it gives each segment's voxels. The most likely naming wins; its posterior probability is
the reported ``confidence`` (per segment too), capped at :data:`UNANCHORED_CONFIDENCE` when no
anchor (sacrum, last or first rib, skull, network) confirms it (``anchored``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from SpineContextSegLib.anatomy.centreline import Centreline, _points_mm, _spacing3, body_centreline, centreline_frame, depth_mm, fill_holes
from SpineContextSegLib.anatomy.evidence import Rib, RibScan, VertebraGeometry, bone_beyond_column, find_ribs, lungs_beside, vertebra_geometry
from SpineContextSegLib.anatomy.naming_model import (
    ATLAS_AXIS, CHAIN_PRIORS, HEIGHT_SCALE_LOG_SIGMA, HEIGHT_SCALES, _chain_model, _chains, _forward_backward, _log_likelihood_tables, _logsumexp, _path_log_scores, _verse_ids_of,
    network_name_shares, segment_kinds,
)
from SpineContextSegLib.anatomy.split import THICKNESS_LEVELS, grow_labels, keep_largest_pieces
from SpineContextSegLib.errors import SegmentationError

#: Highest confidence reported for names that no anchor confirms (sacrum, the last or first
#: rib-bearing level, skull base, a vertebrae network): body size and spacing alone are
#: confidently wrong when a patient is large or small as a whole (a T2-T8 slab of a large
#: phantom scores 0.87 for T6-T12).
UNANCHORED_CONFIDENCE = 0.5
#: Rib pieces on one side closer than this along the column (mm) are one rib: consecutive
#: rib-bearing levels lie 14 mm apart at the least (T1-T2 of a small adult), 20-30 mm usually.
RIB_SAME_LEVEL_MM = 10.0
#: Bone (ml) beyond an end of the column that counts as the sacrum or skull base when the
#: scan shows the whole region of :func:`bone_beyond_column`.
END_BONE_ML = 2.0


def rib_evidence(geometry: Sequence[VertebraGeometry], scan: RibScan, line: Centreline) -> Tuple[List[Dict[str, object]], List[Dict[str, object]]]:
    """Ribs of :func:`find_ribs` given to the segments they belong to, the rest to the gaps between them.

    A rib belongs to the segment its inner end touches (:attr:`Rib.segment`) if it also lies
    level with it (the same widened arc range as below); touching one segment and lying level
    with another, it counts nowhere; touching one and level with none, it is a rib of a level in
    a gap (a ragged chest mask's arches reach up to the ribs of the vertebrae it lost). One that touches
    none but lies level with a segment's body (arc range, widened by a quarter of its length,
    at least 3 mm) is a lower rib passing by that segment and counts nowhere (without segment
    contacts, with a bare mask, it belongs to the segment with the nearer centre); one beside
    no segment belongs to a vertebra missing from the mask. One rib per side
    and segment (a second one is a rib of a level the mask misses). Ribs that belong to no
    segment are counted in the gap they lie in: between two segments, above the top one or
    below the lowest one.

    Returns
    -------
    per_segment : list of dict, one per segment (top first)
        ``"right"``, ``"left"``: ``True`` (a rib), ``False`` (none, and the scan shows the
        region beside the segment), ``None`` (that region is mostly outside the field of view);
        ``"rib_arcs"``: [(side, arc)] of its ribs.
    gaps : list of dict, ``len(geometry) + 1`` (gap 0 above the top segment, gap i below segment i)
        ``"right"``, ``"left"``: number of ribs found there, or ``None`` where the scan shows
        less than half of that stretch beside the column; ``"arcs"``.
    """
    count = len(geometry)
    centres = np.array([0.5 * (g.arc_low_mm + g.arc_high_mm) for g in geometry])
    per_segment: List[Dict[str, object]] = [{"right": None, "left": None, "rib_arcs": []} for _ in range(count)]
    gaps: List[Dict[str, object]] = [{"right": 0, "left": 0, "arcs": []} for _ in range(count + 1)]
    slice_arc = line.arc_mm
    taken: Dict[Tuple[int, str], Rib] = {}
    spare: List[Rib] = []
    for rib in scan.ribs:
        best = None
        touched_elsewhere = False
        if 0 < rib.segment <= count and np.isfinite(centres[rib.segment - 1]):
            touched = geometry[rib.segment - 1]
            # level with it: within its arc range widened by a body radius (its neck may lie at
            # the disc above; a vertebra in pieces leaves short segments)
            reach = max(3.0, float(line.radius_at_arc(rib.arc_mm)))
            if touched.arc_low_mm - reach <= rib.arc_mm <= touched.arc_high_mm + reach:
                best = rib.segment - 1  # it touches that segment
            else:
                touched_elsewhere = True
        for index, g in enumerate(geometry if best is None else ()):
            if not np.isfinite(centres[index]):
                continue
            widen = max(3.0, 0.25 * (g.arc_high_mm - g.arc_low_mm))
            if g.arc_low_mm - widen <= rib.arc_mm <= g.arc_high_mm + widen:
                if best is None or abs(rib.arc_mm - centres[index]) < abs(rib.arc_mm - centres[best]):
                    best = index
        if best is None:
            spare.append(rib)
            continue
        if touched_elsewhere:
            # touches one segment but lies level with another: which vertebra it belongs to
            # is unknown (a transverse process tip beside L1 touched a fragment 30 mm above)
            continue
        if rib.segment == 0 and scan.touch_known:
            continue  # beside a segment without touching it: a lower rib passing by, not its own
        other = taken.get((best, rib.side))
        if other is None:
            taken[(best, rib.side)] = rib
        elif abs(rib.arc_mm - centres[best]) < abs(other.arc_mm - centres[best]):
            taken[(best, rib.side)] = rib
            spare.append(other)
        else:
            spare.append(rib)
    for index, g in enumerate(geometry):
        levels = (slice_arc >= g.arc_low_mm) & (slice_arc <= g.arc_high_mm)
        for side in ("right", "left"):
            if (index, side) in taken:
                per_segment[index][side] = True
                per_segment[index]["rib_arcs"].append((side, round(taken[(index, side)].arc_mm, 1)))
            elif levels.any() and float(np.mean(scan.view[side][levels])) >= 0.5:
                per_segment[index][side] = False
    valid = np.isfinite(centres)
    for rib in sorted(spare, key=lambda r: r.arc_mm):
        gap = int(np.count_nonzero(centres[valid] > rib.arc_mm))  # segments above it
        gap = int(np.flatnonzero(valid)[gap - 1]) + 1 if gap > 0 else 0
        if any(side == rib.side and abs(arc - rib.arc_mm) < RIB_SAME_LEVEL_MM for side, arc in gaps[gap]["arcs"]):
            continue  # a second piece of the same rib (head and shaft found apart), not another level's
        gaps[gap][rib.side] = int(gaps[gap][rib.side]) + 1
        gaps[gap]["arcs"].append((rib.side, round(rib.arc_mm, 1)))
    # where the scan does not show the stretch beside the column, a missing rib says nothing
    bounds = [np.inf] + [float(g.arc_low_mm) if np.isfinite(g.arc_low_mm) else np.nan for g in geometry]
    lows = [float(g.arc_high_mm) if np.isfinite(g.arc_high_mm) else np.nan for g in geometry] + [-np.inf]
    for index in range(count + 1):
        high, low = bounds[index], lows[index]
        stretch = (slice_arc < high) & (slice_arc > low) if np.isfinite(high) or np.isfinite(low) else np.zeros(slice_arc.shape, dtype=bool)
        for side in ("right", "left"):
            if gaps[index][side] == 0 and (not stretch.any() or float(np.mean(scan.view[side][stretch])) < 0.5):
                gaps[index][side] = None
    return per_segment, gaps


def _end_evidence(found: Dict[str, float], *, caudal: bool) -> Dict[str, object]:
    """Summarise :func:`bone_beyond_column` as the yes/no evidence the naming uses."""
    bone_ml = found["central_ml"] + found["lateral_ml"]
    evidence: Dict[str, object] = {key: round(float(value), 3) for key, value in found.items()}
    if caudal:
        # judged on the part of the region the scan shows: a scan that ends inside S1 or a narrow
        # sagittal slab shows only a share of it (never less than a quarter counts)
        needed_ml = END_BONE_ML * min(1.0, max(float(found["fov_share"]), 0.25))
        evidence["bone_found"] = bool(bone_ml >= needed_ml)
        evidence["alae_found"] = bool(bone_ml >= needed_ml and found["lateral_sides"] == 2)
    else:
        # the skull base is one large bone, unlike a vertebra left out of the mask
        evidence["skull_found"] = bool(bone_ml >= END_BONE_ML and found["piece_ml"] >= 150.0)
    return evidence


def _visible_arc(line: Centreline, spacing: np.ndarray, field_of_view: Optional[np.ndarray]) -> Tuple[float, float]:
    """(top, bottom) arc of the stretch of the centreline inside the field of view."""
    if field_of_view is None:
        return float(line.arc_mm[-1]), float(line.arc_mm[0])
    depth, height, width = field_of_view.shape
    rows = np.clip(np.round(line.y_mm / spacing[1]).astype(int), 0, height - 1)
    columns = np.clip(np.round(line.x_mm / spacing[2]).astype(int), 0, width - 1)
    inside = np.asarray(field_of_view, dtype=bool)[np.arange(depth), rows, columns]
    if not inside.any():
        return float(line.arc_mm[-1]), float(line.arc_mm[0])
    seen = np.flatnonzero(inside)
    return float(line.arc_mm[seen[-1]]), float(line.arc_mm[seen[0]])


def name_vertebrae(
    instances: np.ndarray, ct_hu: np.ndarray, spacing_mm, *, field_of_view: Optional[np.ndarray] = None, centreline: Optional[Centreline] = None,
    sacral_fragment: Optional[np.ndarray] = None, name_votes: Optional[np.ndarray] = None, geometry: Optional[Sequence[VertebraGeometry]] = None,
    timings: Optional[Dict[str, float]] = None,
) -> Tuple[np.ndarray, Dict[str, object]]:
    """Give every vertebra its VerSe id, in anatomical order.

    A sequence step (forward-backward and Viterbi over the segments, top to bottom) chooses
    the most likely names along the standard chain (C1-L5), the chain with L6 and the chain
    with T13 (:data:`CHAIN_PRIORS`), for each patient scale of the vertebra heights
    (:data:`HEIGHT_SCALES`, prior :data:`HEIGHT_SCALE_LOG_SIGMA`). Consecutive segments are
    the next level, or levels further on with the levels between them missing from the mask
    (prior :data:`MISSING_LEVEL_PRIOR` per level), or a further piece of the same vertebra
    (:data:`FRAGMENT_PRIOR`, when both fit inside one vertebra). The evidence:

    * the distance between consecutive segments' body centres along the centreline against the
      expected distance of their names (body heights and discs, :data:`_HEIGHT_ANCHORS`, times
      the scale; a segment shorter than its vertebra may lie anywhere inside it): this counts
      the vertebrae a gap in the mask hides;
    * ribs (:func:`find_ribs`, found in the CT whether or not the mask holds their vertebra):
      each side with a rib favours a thoracic level (T1-T12, T13), each side seen without one
      favours the others; ribs in a gap between segments, or beyond the top or lowest one,
      must be matched by rib-bearing levels missing there. So the names count down from the
      first rib (T1) and up from the last (T12);
    * sacrum (:func:`bone_beyond_column` below the column): bone right below the lowest
      vertebra, outside the mask, favours "the lowest vertebra is the last lumbar one"
      (L5, or L6 on the L6 chain), more so with alae on both sides;
    * skull base (bone above the column belonging to one piece larger than 150 ml) favours
      "the top segment is C1" (C1 has no body, so C1 and C2 usually arrive as one segment,
      split into C1 and C2 after naming; a run may also start with C1 alone, at a lower
      prior, :data:`ATLAS_ALONE_PRIOR`, for a mask that left a gap under the atlas);
    * lungs (:func:`lungs_beside`, in the CT beside each segment's body): lung found favours
      T1-T12, strongly T2-T9, against the cervical and lumbar levels
      (:data:`~SpineContextSegLib.anatomy.naming_model.LUNG_PROBABILITY`; no lung found is not
      used). It needs no rib to be found, so a chest CT's thoracic column cannot be named
      cervical or lumbar wholesale. The level (lung more likely beside T9 than beside L1) is
      read only from the highest and the lowest segment with lung found; the segments between
      them say "a level the lung reaches" (the lung is one organ: counted level by level, lung
      beside every segment down to L1 outweighed the last rib);
    * body size (:data:`EXPECTED_BODY_RADIUS_MM`) of every vertebra (less weight where the field
      of view cuts it) and segment length: weak cues that separate cervical, thoracic and lumbar levels;
    * with ``name_votes`` (a vertebrae network, ``train --task vertebrae``): the share of each
      segment's voxels the network calls by the run's name (:func:`network_name_shares`,
      floored by :data:`NETWORK_VOTE_FLOOR`). The network proposes names; the sequence keeps
      them in anatomical order, without duplicates.

    Parameters
    ----------
    instances : (D, H, W) int
        :func:`split_vertebrae` output on the canonical grid (z inferior->superior, y
        anterior->posterior, x right->left): 1 = most cranial vertebra, consecutive.
    ct_hu : (D, H, W) float
        CT in HU on the same grid, with context around the spine (ribs, pelvis).
    spacing_mm : float or (3,) float
        Voxel size (z, y, x), mm.
    field_of_view : (D, H, W) bool, optional
        Voxels inside the scanned volume; default: every voxel.
    centreline : Centreline, optional
        From :func:`split_vertebrae`'s details; recomputed from ``instances`` when omitted.
    sacral_fragment : (D, H, W) bool, optional
        Mask voxels below the column that are a piece of the sacrum (:func:`caudal_fragment`,
        already removed from ``instances``): bone below the column, whatever their HU.
    name_votes : (D, H, W) uint8, optional
        A vertebrae network's most probable vertebra per voxel (VerSe ids, 0 = none).
    geometry : list of VertebraGeometry, optional
        :func:`vertebra_geometry` of ``instances`` when already computed.
    timings : dict, optional
        Seconds per stage are added here (``evidence``, ``naming``).

    Returns
    -------
    verse_labels : (D, H, W) uint8
        VerSe ids (1-7 C1-C7, 8-19 T1-T12, 28 T13, 20-25 L1-L6); 0 elsewhere. Pieces of one
        vertebra (segments given the same name) share its id.
    info : dict
        ``names`` and ``verse_ids`` (top to bottom), ``chain`` (``standard``, ``L6``,
        ``T13``), ``confidence`` (posterior probability of the chosen names among all
        namings, 0-1; at most :data:`UNANCHORED_CONFIDENCE` without an anchor), ``anchored`` (an anchor agrees with the names: sacrum, the lowest or
        the first rib-bearing level with a rib-free one beyond it (below the lowest, not a piece
        the scan's bottom cuts), skull base, or the network),
        ``anchors`` (cues found: ``bone_below``, ``sacral_alae``, ``skull``,
        ``lowest_rib_vertebra``, ``first_rib_vertebra`` as instance numbers, ``ribs_found``,
        ``last_rib_unconfirmed``: the names put T12 at the last rib found, but the only rib-free
        vertebra below it is a piece the scan's bottom cuts),
        ``method`` (the anchors that agree with the chosen names, or ``"body size only"``),
        ``missing_levels`` (names inferred between segments, absent from the mask),
        ``missing_between`` ([{"below_instance": i, "verse_ids": [...], "above_verse_id",
        "below_verse_id"}]: the levels missing between instance i and i + 1, top first, and the
        names of those two),
        ``fragments`` (segments that are further pieces of the vertebra above),
        ``height_scale`` (most likely), ``alternatives`` (the next best namings with their
        probabilities), ``evidence`` (per segment: its ``name`` and ``confidence`` (posterior
        probability of that name), ribs, lung (True, False or None: not seen), body radius,
        truncated, and with ``name_votes`` the network's name and its share), ``ribs`` (every
        rib :func:`find_ribs` found: side, arc, the segment it touches), ``gap_ribs`` (ribs counted in the gaps between segments),
        ``below``/``above`` (bone beyond the column).
    """
    import time

    from SpineContextSegLib.labels import vertebra_by_verse_id

    clock = time.perf_counter()
    spacing = _spacing3(spacing_mm)
    instances = np.asarray(instances).astype(np.int32, copy=False)
    count = int(instances.max()) if instances.size else 0
    if count == 0:
        raise SegmentationError("no_spine_found", "No vertebra to name: the instance map is empty.")
    line = centreline if centreline is not None else body_centreline(fill_holes(instances > 0), spacing)
    if geometry is None:
        geometry = vertebra_geometry(instances, line, spacing, field_of_view)
    scan = find_ribs(ct_hu, instances, line, spacing, field_of_view)
    ribs, gaps = rib_evidence(geometry, scan, line)
    below = _end_evidence(bone_beyond_column(instances, ct_hu, line, geometry, spacing, field_of_view, caudal=True, also_bone=sacral_fragment), caudal=True)
    above = _end_evidence(bone_beyond_column(instances, ct_hu, line, geometry, spacing, field_of_view, caudal=False), caudal=False)
    lungs = lungs_beside(ct_hu, geometry, line, spacing, field_of_view)
    votes = network_name_shares(instances, name_votes, count) if name_votes is not None else None
    visible = _visible_arc(line, spacing, field_of_view)
    if timings is not None:
        timings["evidence"] = timings.get("evidence", 0.0) + time.perf_counter() - clock
        clock = time.perf_counter()

    # the sequence step, per chain and scale
    scale_prior = -0.5 * (np.log(HEIGHT_SCALES) / HEIGHT_SCALE_LOG_SIGMA) ** 2
    scale_prior -= _logsumexp(scale_prior, axis=0)
    runs = []
    for chain_name, chain in _chains().items():
        model = _chain_model(chain_name, chain)
        tables = _log_likelihood_tables(model, geometry, ribs, gaps, below, above, votes, visible, lungs)
        log_z, marginals, paths, _ = _forward_backward(*tables)
        runs.append((chain_name, model, tables, log_z + scale_prior + math.log(CHAIN_PRIORS[chain_name]), marginals, paths))
    total = float(_logsumexp(np.concatenate([run[3] for run in runs]), axis=0))
    # candidate namings: the best path of every chain and scale, scored over all scales
    candidates: Dict[Tuple[str, Tuple[int, ...]], float] = {}
    for chain_name, model, tables, weights, _, paths in runs:
        for path in paths:
            key = (chain_name, tuple(int(s) for s in path))
            if key not in candidates:
                scores = _path_log_scores(path, *tables) + scale_prior + math.log(CHAIN_PRIORS[chain_name])
                candidates[key] = float(np.exp(_logsumexp(scores, axis=0) - total))
    ranked = sorted(candidates.items(), key=lambda item: -item[1])
    (best_chain, best_path), confidence = ranked[0]
    model = next(run[1] for run in runs if run[0] == best_chain)
    best_names = [model.names[s] for s in best_path]
    # per segment, the posterior probability of its name (summed over chains and scales)
    name_probability = np.zeros(count)
    for chain_name, run_model, _, weights, marginals, _ in runs:
        share = np.exp(weights - total)  # (S,)
        for i, name in enumerate(best_names):
            columns = [j for j, other in enumerate(run_model.names) if other == name]
            if columns:
                name_probability[i] += float(np.sum(share[:, None] * marginals[:, i, columns]))
    best_scale = None
    for chain_name, _, tables, weights, _, _ in runs:
        if chain_name == best_chain:
            best_scale = float(HEIGHT_SCALES[int(np.argmax(_path_log_scores(np.array(best_path), *tables) + scale_prior))])

    def readable(names: Sequence[int]) -> List[str]:
        return ["C1-C2" if v == ATLAS_AXIS else vertebra_by_verse_id(v).name for v in names]

    models = {run[0]: run[1] for run in runs}

    def span(key: Tuple[str, Tuple[int, ...]]) -> str:
        names = readable([models[key[0]].names[s] for s in key[1]])
        return names[0] if len(names) == 1 else f"{names[0]}-{names[-1]}"

    lookup = np.zeros(count + 1, dtype=np.uint8)
    for value, verse_id in enumerate(best_names, start=1):
        lookup[value] = 2 if verse_id == ATLAS_AXIS else verse_id
    verse_labels = lookup[instances]
    final_names: List[int] = []
    for name in best_names:
        for verse_id in _verse_ids_of(name):
            if verse_id not in final_names:
                final_names.append(verse_id)
    if ATLAS_AXIS in best_names:
        verse_labels = split_atlas_from_axis(verse_labels, line, spacing)
    chain_states = model.names[1:]
    missing: List[int] = []
    missing_between: List[Dict[str, object]] = []
    for upper_instance, (upper, lower) in enumerate(zip(best_path[:-1], best_path[1:]), start=1):
        if model.position[lower] - model.position[upper] > 1:
            first = chain_states.index(model.names[upper] if model.names[upper] != ATLAS_AXIS else 2) + 1
            last = chain_states.index(model.names[lower])
            missing.extend(chain_states[first:last])
            missing_between.append(
                {
                    "below_instance": upper_instance, "verse_ids": [int(v) for v in chain_states[first:last]],
                    "above_verse_id": 2 if model.names[upper] == ATLAS_AXIS else int(model.names[upper]), "below_verse_id": int(model.names[lower]),
                }
            )
    fragments = [i + 2 for i in range(count - 1) if best_path[i] == best_path[i + 1]]
    rib_bearing = [i + 1 for i, evidence in enumerate(ribs) if evidence.get("right") or evidence.get("left")]
    lowest_rib = rib_bearing[-1] if rib_bearing else None
    first_rib = rib_bearing[0] if rib_bearing else None
    chain = _chains()[best_chain]
    # the anchors that agree with the chosen names
    deciding = []
    if below["bone_found"] and best_names[-1] == chain[-1]:
        deciding.append("sacrum")
    rib_anchor = False

    def seen_without_ribs(index: int) -> bool:
        return False in (ribs[index].get("right"), ribs[index].get("left")) and not (ribs[index].get("right") or ribs[index].get("left"))

    # the last rib-bearing level is T12 (T13) when a vertebra below it is seen without ribs, unless
    # that is a piece the scan's bottom cuts: ribs run down and out from their heads, so the rib
    # of a T12 cut so may lie below the scan (a sagittal slab ending inside T12 showed T11's rib
    # as the last and was named a level low, confidently); the first is T1 when one above it is
    piece, _, _, _, cut_below = segment_kinds(geometry, visible)
    rib_free_below = [i for i in range(lowest_rib or count, count) if best_names[i] in (20, 21) and seen_without_ribs(i)]
    last_rib_unconfirmed = False
    if lowest_rib is not None and best_names[lowest_rib - 1] in (19, 28) and rib_free_below:
        if all(cut_below[i] and piece[i] for i in rib_free_below):
            last_rib_unconfirmed = True
        else:
            deciding.append("ribs")
            rib_anchor = True
    if first_rib is not None and best_names[first_rib - 1] == 8 and any(best_names[i] in (6, 7) and seen_without_ribs(i) for i in range(first_rib - 1)):
        deciding.append("first rib")
        rib_anchor = True
    if not rib_anchor and rib_bearing and all(8 <= best_names[i - 1] <= 19 or best_names[i - 1] == 28 for i in rib_bearing):
        deciding.append("ribs (thoracic)")
    with_lung = [name for name, lung in zip(best_names, lungs) if lung]
    if with_lung and all(8 <= name <= 19 or name == 28 for name in with_lung):
        deciding.append("lungs (thoracic)")
    if above["skull_found"] and 1 in _verse_ids_of(best_names[0]):
        deciding.append("skull")
    if votes is not None:
        agreeing = sum(1 for name, shares in zip(best_names, votes) if shares.sum() > 0 and int(np.argmax(shares)) in _verse_ids_of(name))
        if agreeing * 2 > len(best_names):  # the network named most segments as the run does
            deciding.append("network")
    anchored = bool(set(deciding) & {"sacrum", "ribs", "first rib", "skull", "network"})
    if not anchored:
        # body size and spacing alone: people differ in size as a whole by more than neighbours differ
        confidence = min(confidence, UNANCHORED_CONFIDENCE)
        name_probability = np.minimum(name_probability, UNANCHORED_CONFIDENCE)
    if timings is not None:
        timings["naming"] = timings.get("naming", 0.0) + time.perf_counter() - clock
    info: Dict[str, object] = {
        "names": [vertebra_by_verse_id(v).name for v in final_names],
        "verse_ids": [int(v) for v in final_names],
        "chain": best_chain,
        "confidence": round(float(confidence), 3),
        "anchored": anchored,
        "method": "+".join(deciding) if deciding else "body size only",
        "anchors": {
            "bone_below": bool(below["bone_found"]), "sacral_alae": bool(below["alae_found"]), "skull": bool(above["skull_found"]),
            "lowest_rib_vertebra": lowest_rib, "first_rib_vertebra": first_rib, "ribs_found": len(scan.ribs),
            "last_rib_unconfirmed": last_rib_unconfirmed,
        },
        "missing_levels": [vertebra_by_verse_id(v).name for v in missing],
        "missing_between": missing_between,
        "fragments": fragments,
        "height_scale": round(best_scale, 2) if best_scale else None,
        "alternatives": [{"names": span(key), "probability": round(p, 3)} for key, p in ranked[1:4]],
        "evidence": [
            {
                "instance": i + 1, "name": readable([best_names[i]])[0], "confidence": round(float(name_probability[i]), 3), "ribs": [ribs[i]["right"], ribs[i]["left"]], "lung": lungs[i],
                "body_radius_mm": round(float(g.body_radius_mm), 1), "arc_mm": [round(float(g.arc_low_mm), 1), round(float(g.arc_high_mm), 1)], "truncated": bool(g.truncated), "volume_ml": round(float(g.volume_ml), 1),
            }
            | ({} if votes is None or votes[i].sum() == 0 else {"network": vertebra_by_verse_id(int(np.argmax(votes[i]))).name, "network_share": round(float(votes[i].max()), 2)})
            for i, g in enumerate(geometry)
        ],
        "gap_ribs": [{"below_instance": i, "right": gap["right"], "left": gap["left"]} for i, gap in enumerate(gaps) if gap["arcs"]],
        "ribs": [{"side": rib.side, "arc_mm": round(rib.arc_mm, 1), "segment": rib.segment, "volume_ml": round(rib.volume_ml, 2), "cut_by_fov": rib.cut_by_fov} for rib in scan.ribs],
        "below": below,
        "above": above,
        "unnamed_segments": 0,
    }
    return verse_labels, info


def split_atlas_from_axis(verse_labels: np.ndarray, line: Centreline, spacing_mm) -> np.ndarray:
    """Split the C1+C2 segment (VerSe 2 on entry) into C1 (1) and C2 (2).

    C1 is a ring around the dens: the part of the segment in its upper 40 % (along the
    centreline) and more than 8 mm from the centreline seeds C1, the dens core (within 4 mm
    of the centreline) and the lower 60 % seed C2; the seeds grow through the segment,
    thick bone first, as in :func:`split_vertebrae`.
    """
    spacing = _spacing3(spacing_mm)
    segment = verse_labels == 2
    if not segment.any():
        return verse_labels
    flat = np.flatnonzero(segment)
    arc, distance, _, _ = centreline_frame(_points_mm(flat, segment.shape, spacing), line)
    low, high = np.percentile(arc, [1, 99])
    cut = low + 0.6 * (high - low)
    seeds = np.zeros(segment.shape, dtype=np.int32)
    seeds.reshape(-1)[flat[(arc >= cut) & (distance > 8.0)]] = 1
    seeds.reshape(-1)[flat[(arc < cut - 2.0) | (distance <= 4.0)]] = 2
    if not (seeds == 1).any():
        return verse_labels
    grown = grow_labels(seeds, segment, -depth_mm(segment, spacing), THICKNESS_LEVELS)
    parts, _ = keep_largest_pieces(grown)
    out = verse_labels.copy()
    out[segment] = np.where(parts[segment] == 1, 1, 2).astype(out.dtype)
    return out
