"""The one segmentation path, shared by the CLI, the worker (Slicer) and the benchmark.

read -> canonical grid -> body crop -> network (Gaussian sliding window) -> post-process
(on the canonical grid) -> back onto the input's exact grid -> write / mesh / QC.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import math
import os
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import numpy as np

from SpineContextSegLib.errors import Cancelled, SegmentationError
from SpineContextSegLib.inference.network_constants import DOWNSAMPLING_FACTOR
from SpineContextSegLib.inference.postprocess import MAX_COLUMN_OFFSET_MM
from SpineContextSegLib.io.validation import cranio_caudal_spacing_mm, resolved_slice_spacing_mm
from SpineContextSegLib.progress import ProgressReporter

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

    from SpineContextSegLib.inference.engine import InferenceEngine
    from SpineContextSegLib.labels import LabelInfo
    from SpineContextSegLib.inference.model_files import ModelBundle


@dataclasses.dataclass
class SegmentOptions:
    """Everything a run can be told; ``None`` means "the model card's default"."""

    model_dir: Optional[str] = None
    engine: str = "auto"
    device: str = "auto"
    threads: Optional[int] = None
    precision: str = "auto"  # bf16 where the CPU computes it natively (OpenVINO), else fp32
    overlap: Optional[float] = None
    patch_size: Optional[List[int]] = None
    # isotropic grid the network runs on instead of the card's (comparisons: 1.1.0 ran 1.1.1's weights at 2 mm)
    spacing_mm: Optional[float] = None
    # grid of the second network pass, along the column's bodies (inference.fine_pass); 0 = none
    fine_spacing_mm: Optional[float] = None
    batch_size: int = 1
    threshold: Optional[float] = None
    crop_to_body: bool = True
    # run every tile of the body box instead of only those that follow the spine (same mask, slower)
    all_tiles: bool = False
    min_island_ml: float = 1.0
    min_spine_ml: float = 5.0
    max_column_offset_mm: float = MAX_COLUMN_OFFSET_MM
    fill_holes: bool = True
    # move the outline to the bone the CT shows, on its own grid: unsure voxels (p >= 0.25) that
    # are bone (postprocess.threshold_with_bone_evidence), then the cortex one voxel beyond
    cortical_edge: bool = True
    cancel_file: Optional[str] = None
    task: str = "spine"  # "vertebrae": split the spine mask into named vertebrae (VerSe ids)
    series_uid: Optional[str] = None  # DICOM SeriesInstanceUID when a folder holds several series


def grid_spacing_problem(spacing_mm: Optional[float]) -> Optional[str]:
    """Why ``spacing_mm`` cannot be :attr:`SegmentOptions.spacing_mm` (``None`` when it can)."""
    if spacing_mm is None or (math.isfinite(spacing_mm) and 0.3 <= spacing_mm <= 6.0):
        return None
    return f"the network's grid spacing must be between 0.3 and 6 mm, got {spacing_mm}"


def tile_overlap_problem(overlap: Optional[float]) -> Optional[str]:
    """Why ``overlap`` cannot be :attr:`SegmentOptions.overlap` (``None`` when it can)."""
    if overlap is None or 0.0 <= overlap < 1.0:
        return None
    return f"the tile overlap must be in [0, 1), got {overlap}"


@dataclasses.dataclass
class SegmentationResult:
    mask: "sitk.Image"  # uint8 label map on exactly the input's grid
    labels: List["LabelInfo"]
    timings_s: Dict[str, float]
    info: Dict[str, object]


class StopCheck:
    """Raises :class:`Cancelled` when the cancel file exists or a stop signal was received."""

    def __init__(self, cancel_file: Optional[str] = None):
        self.cancel_file = cancel_file
        self.signal_received = False

    def __call__(self) -> None:
        if self.signal_received:
            raise Cancelled("terminated", "Stopped by a signal; no partial output was kept.")
        if self.cancel_file and os.path.exists(self.cancel_file):
            raise Cancelled("cancelled", "Cancelled (cancel file found); no partial output was kept.")


#: The network starts on the mid-sagittal plane's tiles behind this share of the body's depth (front to back).
SPINE_START_FROM_FRONT = 0.45

#: What the stages after reading import first: scipy.ndimage (about 0.3 s) and, for an STL, VTK's
#: filters and scipy's graph search (about 0.2 s more).
_MODULES_AFTER_READ = ("scipy.ndimage",)
_MODULES_FOR_MESH = ("scipy.sparse.csgraph", "vtkmodules.util.numpy_support", "vtkmodules.vtkCommonDataModel", "vtkmodules.vtkFiltersCore", "vtkmodules.vtkFiltersGeneral")


def _import_ahead(modules: Tuple[str, ...]) -> None:
    """Import ``modules`` now (in a thread while SimpleITK reads the CT outside the GIL).

    Best effort: a module that fails here (missing, or an import lock contended by another
    thread) is imported again by the stage that uses it, which reports what is wrong.
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - retried, and reported, where the module is used
            pass


class _StageTimer:
    def __init__(self, reporter: ProgressReporter):
        self.reporter = reporter
        self.timings: Dict[str, float] = {}

    def run(self, stage: str, function: Callable, *args, **kwargs):
        self.reporter.stage(stage, 0, 1)
        start = time.perf_counter()
        result = function(*args, **kwargs)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
        self.reporter.stage(stage, 1, 1)
        return result


def load_model_and_engine(
    options: SegmentOptions, bundle: Optional["ModelBundle"] = None, engine: Optional["InferenceEngine"] = None
) -> "tuple[ModelBundle, InferenceEngine]":
    """The model and its engine: those passed in, else ``bundle`` (or ``options.model_dir``) with an engine as ``options`` ask.

    A bundle passed alone is the model that runs; an engine without the bundle it was built
    from is refused (``ValueError``).
    """
    from SpineContextSegLib.inference.engine import create_engine
    from SpineContextSegLib.inference.model_files import load_model

    if engine is not None:
        if bundle is None:
            raise ValueError("an engine was passed without the model bundle it was built from: pass both")
        return bundle, engine
    if bundle is None:
        bundle = load_model(options.model_dir)
    engine = create_engine(bundle, engine=options.engine, device=options.device, threads=options.threads, precision=options.precision)
    return bundle, engine


def segment_image(
    image: "sitk.Image",
    options: Optional[SegmentOptions] = None,
    *,
    reporter: Optional[ProgressReporter] = None,
    stop: Optional[Callable[[], None]] = None,
    bundle: Optional["ModelBundle"] = None,
    engine: Optional["InferenceEngine"] = None,
) -> SegmentationResult:
    """Segment the spine in a CT image (HU) and return a mask on exactly the image's grid.

    ``bundle``/``engine`` may be passed in to reuse a loaded model across many images.
    ``stop`` is called between tiles and stages; it raises to cancel.
    """
    import SimpleITK as sitk

    from SpineContextSegLib.labels import labels_for_task
    from SpineContextSegLib.inference.postprocess import UNCERTAIN_PROBABILITY, clean_probability, spine_components
    from SpineContextSegLib.inference.preprocessing import body_bounding_box, check_segmentation_memory, hu_to_unit_interval, probability_on_input_grid, to_canonical
    from SpineContextSegLib.inference.stitcher import following_rim_voxels, padded_shape_for, sliding_window_inference, tile_grid
    from SpineContextSegLib.io.meshing import foreground_bounding_box

    options = options or SegmentOptions()
    reporter = reporter or ProgressReporter()
    stop = stop or StopCheck(options.cancel_file)
    timer = _StageTimer(reporter)
    bundle, engine = load_model_and_engine(options, bundle, engine)
    card = bundle.card
    if options.task not in ("spine", "vertebrae"):
        raise SegmentationError("model_incompatible", f"Unknown task {options.task!r}; choose spine or vertebrae.")

    stop()
    grid_spacing_mm = [float(options.spacing_mm)] * 3 if options.spacing_mm else list(card.spacing_mm)
    check_segmentation_memory(image, grid_spacing_mm, output_channels=card.out_channels)  # refuse before resampling, never be killed by the OS
    canonical = timer.run("preprocess", to_canonical, image, grid_spacing_mm, method="linear")
    hu = sitk.GetArrayViewFromImage(canonical)
    box = body_bounding_box(hu) if options.crop_to_body else tuple(slice(0, n) for n in hu.shape)
    network_input = hu_to_unit_interval(hu[box], tuple(card.hu_window))[np.newaxis]
    stop()

    # exported graphs need tile sizes divisible by the network's total downsampling (8)
    patch_size = [int(-(-p // DOWNSAMPLING_FACTOR) * DOWNSAMPLING_FACTOR) for p in (options.patch_size or card.patch_size)]
    overlap = card.overlap if options.overlap is None else float(options.overlap)
    network_seconds = [0.0]

    def timed_predict(batch: np.ndarray) -> np.ndarray:
        nonlocal engine
        start = time.perf_counter()
        try:
            out = engine.predict(batch)
        except Exception as error:
            from SpineContextSegLib.inference.engine import cpu_engine_after_failure

            fallback = cpu_engine_after_failure(engine, error)  # GPU out of memory -> the CPU; else re-raise
            if fallback is None:
                raise
            reporter.warning("gpu_out_of_memory", f"The GPU ran out of memory; continuing on the CPU ({fallback.describe()}), which is slower.")
            engine = fallback
            out = engine.predict(batch)
        network_seconds[0] += time.perf_counter() - start
        return out

    tiles_run = [0, len(tile_grid(padded_shape_for(network_input.shape[1:], patch_size), patch_size, overlap))]  # [run, in the tiling]

    def on_tile(done: int, planned: int) -> None:
        tiles_run[0] = done
        reporter.stage("network", done, planned)
        stop()

    threshold = card.threshold if options.threshold is None else options.threshold
    spacing_zyx = list(reversed(canonical.GetSpacing()))

    def spine_found_so_far(blended: np.ndarray) -> Optional[np.ndarray]:
        """Every column the post-processing could keep from the tiles run so far; ``None`` (run every tile) if none yet.

        Not only the largest: a column cut short by the tiles not yet run may outgrow it.
        """
        try:
            _, kept, _ = spine_components(
                blended[0], spacing_zyx, threshold=threshold, min_island_ml=options.min_island_ml, min_spine_ml=options.min_spine_ml,
                max_column_offset_mm=options.max_column_offset_mm, every_candidate_column=True,
            )
        except SegmentationError:
            return None
        return kept

    following = {}
    # A vertebrae network's softmax runs every tile: following it would copy all its channels
    # each round, and "nothing here" is 1 in its background channel, not 0.
    if not options.all_tiles and card.task == "spine":
        # Start from the tiles that cut the body's mid-sagittal plane (x: the patient's left-right on the canonical grid; the spine
        # crosses it, a column that strays off it is followed) behind the body's front 45 % (y: front to back; tiles in front run
        # if the column reaches them; if none there find a spine, every tile runs); a tile the column enters by its rim only is left out.
        mid_sagittal = np.zeros(network_input.shape[1:], dtype=bool)
        mid_sagittal[:, int(SPINE_START_FROM_FRONT * mid_sagittal.shape[1]) :, mid_sagittal.shape[2] // 2] = True
        following = dict(start_region=mid_sagittal, grow_region=spine_found_so_far, rim_voxels=following_rim_voxels(patch_size, overlap))
    reporter.stage("network", 0, 1)
    start = time.perf_counter()
    network_output = sliding_window_inference(
        network_input, timed_predict, patch_size, overlap=overlap, out_channels=card.out_channels, batch_size=options.batch_size, on_tile=on_tile, **following
    )
    del network_input
    name_votes_crop = None
    if card.task == "vertebrae":
        probability_crop, name_votes_crop = _spine_probability_and_votes(network_output, card.labels)
    else:
        probability_crop = network_output[0]
    del network_output
    timer.timings["network"] = network_seconds[0]
    timer.timings["stitch"] = time.perf_counter() - start - network_seconds[0]
    probability = np.zeros(hu.shape, dtype=np.float32)
    probability[box] = probability_crop
    del probability_crop
    postprocess_info: Dict[str, object] = {}

    fine_spacing_mm = card.fine_spacing_mm if options.fine_spacing_mm is None else options.fine_spacing_mm
    run_fine_pass = card.task == "spine" and bool(fine_spacing_mm) and fine_spacing_mm < min(grid_spacing_mm)
    # the vertebrae are split and named on the coarse pass's outline: on the chest CTA the fine
    # pass's whole bodies bridge upper thoracic discs (names right 11/11 -> 7/10)
    names_probability = probability.copy() if run_fine_pass and options.task == "vertebrae" else None
    if run_fine_pass:

        def fine_pass() -> None:
            from SpineContextSegLib.inference.fine_pass import add_fine_pass

            try:
                _, kept, _ = spine_components(
                    probability, spacing_zyx, threshold=threshold, min_island_ml=options.min_island_ml, min_spine_ml=options.min_spine_ml,
                    max_column_offset_mm=options.max_column_offset_mm,
                )
            except SegmentationError:
                return  # no column to refine: the post-processing says so

            def on_fine_tile(done: int, planned: int) -> None:
                reporter.stage("refine", done, planned)
                stop()

            postprocess_info["fine_pass"] = add_fine_pass(
                probability, canonical, image, kept, timed_predict, fine_spacing_mm=fine_spacing_mm, patch_size=patch_size, overlap=overlap,
                hu_window=tuple(card.hu_window), threshold=threshold, on_tile=on_fine_tile,
            )

        timer.run("refine", fine_pass)

    def cleaned_image(spine_probability: np.ndarray) -> Tuple[np.ndarray, "sitk.Image", Dict[str, object]]:
        cleaned, info = clean_probability(
            spine_probability, spacing_zyx, threshold=threshold, min_island_ml=options.min_island_ml, min_spine_ml=options.min_spine_ml,
            max_column_offset_mm=options.max_column_offset_mm, fill_holes=options.fill_holes,
        )
        probability_image = sitk.GetImageFromArray(cleaned)
        probability_image.CopyInformation(canonical)
        return cleaned, probability_image, info

    def postprocess() -> Tuple["sitk.Image", Optional["sitk.Image"], Tuple[Optional["sitk.Image"], "sitk.Image"]]:
        """The network's mask on the CT's grid, (``cortical_edge``) its outline moved to the bone the CT shows there, and what the names are made on (mask, probability)."""
        cleaned, probability_image, info = cleaned_image(probability)
        postprocess_info.update(info)
        if options.cortical_edge:
            # the unsure voxels next to the spine (two network voxels): not the faint answers
            # over ribs, sternum and heart, which would widen the box to the whole chest
            spine_box = foreground_bounding_box(cleaned >= threshold)
            near_spine = tuple(slice(max(0, part.start - 2), part.stop + 2) for part in spine_box) if spine_box else (slice(0, 0),) * 3
            region, block = probability_on_input_grid(probability_image, image, min(threshold, UNCERTAIN_PROBABILITY), within=near_spine)
        else:
            region, block = probability_on_input_grid(probability_image, image, threshold)
        # the network's own outline as an image: the result when it is kept, or what the
        # vertebrae are split and named on
        network_mask = _mask_image(block >= threshold, region, image) if not options.cortical_edge or options.task == "vertebrae" else None
        names_on = (network_mask, probability_image)
        if names_probability is not None:
            _, coarse_image, _ = cleaned_image(names_probability)
            coarse_region, coarse_block = probability_on_input_grid(coarse_image, image, threshold)
            names_on = (_mask_image(coarse_block >= threshold, coarse_region, image), coarse_image)
        if not options.cortical_edge:
            return network_mask, None, names_on
        grown, grown_box, added_ml = _outline_moved_to_bone(block, region, image, threshold=threshold, distance_mm=max(grid_spacing_mm))
        postprocess_info.update(added_ml)
        return network_mask, _mask_image(grown, grown_box, image), names_on

    network_mask, moved_mask, (names_mask, names_probability_image) = timer.run("postprocess", postprocess)
    mask = network_mask if moved_mask is None else moved_mask
    stop()
    info = {
        "engine": engine.describe(),
        "model": f"{card.name} {card.version}",
        "trained": card.trained,
        "spacing_mm": grid_spacing_mm,
        "canonical_shape_zyx": list(hu.shape),
        "network_box_zyx": [[s.start, s.stop] for s in box],
        "patch_size": patch_size,
        "overlap": overlap,
        "tiles_run": tiles_run,
        **postprocess_info,
    }
    labels = labels_for_task("spine")
    if options.task == "vertebrae":
        name_votes = None
        if name_votes_crop is not None:
            votes = np.zeros(hu.shape, dtype=np.uint8)
            votes[box] = name_votes_crop
            name_votes = sitk.GetImageFromArray(votes)
            name_votes.CopyInformation(canonical)
        # split and named on the network's own outline, the coarse pass's (the names were measured
        # on it; the moved outline and the fine pass can bridge discs); the labels fill the mask
        mask, labels = timer.run("label", _name_vertebrae, names_mask, image, reporter, info, name_votes, None if mask is names_mask else mask, names_probability_image)
    return SegmentationResult(mask=mask, labels=labels, timings_s=timer.timings, info=info)


def _spine_probability_and_votes(network_output: np.ndarray, card_labels: List[Dict[str, object]]):
    """A vertebrae network's softmax ``(C, D, H, W)`` -> spine probability and per-voxel name votes.

    The spine probability is the summed probability of every vertebra channel but the sacrum's
    (the binary mask leaves the sacrum out, :mod:`SpineContextSegLib.labels`), so the rest of the
    pipeline treats it like a spine model's output. The votes are the most probable vertebra
    (VerSe id, uint8) wherever the background has less than half the probability (0 elsewhere);
    they name the segments of the split mask (:func:`SpineContextSegLib.anatomy.naming.name_vertebrae`).
    """
    from SpineContextSegLib.labels import SACRUM_ID, classes_to_verse_ids, vertebra_class_ids

    class_ids = vertebra_class_ids(card_labels)
    # the stitched softmax still sums to 1 per voxel: subtracting avoids copying 26 channels
    spine_probability = 1.0 - network_output[0]
    if SACRUM_ID in class_ids:
        spine_probability -= network_output[class_ids.index(SACRUM_ID) + 1]
    np.clip(spine_probability, 0.0, 1.0, out=spine_probability)
    classes = network_output[1:].argmax(axis=0).astype(np.uint8) + 1
    votes = classes_to_verse_ids(classes, class_ids)
    votes[network_output[0] >= 0.5] = 0
    return spine_probability, votes


def _outline_moved_to_bone(
    probability: np.ndarray, region: Tuple[slice, ...], image: "sitk.Image", *, threshold: float, distance_mm: float
) -> Tuple[np.ndarray, Tuple[slice, ...], Dict[str, float]]:
    """The network's outline (``probability >= threshold`` in ``region`` of ``image``'s array) moved to the bone the CT shows.

    First the voxels the network is unsure of where the CT shows bone
    (:func:`~SpineContextSegLib.inference.postprocess.threshold_with_bone_evidence`), then the
    cortical edge, one CT voxel beyond (:func:`~SpineContextSegLib.inference.postprocess.grow_to_cortical_edge`).

    Returns
    -------
    grown : bool array
        The moved mask on ``box``.
    box : tuple of 3 slices
        ``region`` plus the one voxel the cortical edge may add (clipped to the image).
    added_ml : dict
        ``uncertain_bone_ml`` and ``cortical_edge_ml``: what each step added, ml.
    """
    import SimpleITK as sitk

    from SpineContextSegLib.inference.postprocess import grow_to_cortical_edge, threshold_with_bone_evidence

    box = tuple(slice(max(0, part.start - 1), min(n, part.stop + 1)) for part, n in zip(region, image.GetSize()[::-1]))
    inner = tuple(slice(part.start - outer.start, part.stop - outer.start) for part, outer in zip(region, box))
    ct_hu = sitk.GetArrayViewFromImage(image)[box]
    with_bone = np.zeros(ct_hu.shape, dtype=bool)
    with_bone[inner] = threshold_with_bone_evidence(probability, ct_hu[inner], threshold=threshold)
    grown = grow_to_cortical_edge(with_bone, ct_hu, image.GetSpacing()[::-1], distance_mm=distance_mm)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    network_count, bone_count = np.count_nonzero(probability >= threshold), np.count_nonzero(with_bone)
    added_ml = {
        "uncertain_bone_ml": round((bone_count - network_count) * voxel_ml, 2),
        "cortical_edge_ml": round((np.count_nonzero(grown) - bone_count) * voxel_ml, 2),
    }
    return grown, box, added_ml


def _mask_image(mask: np.ndarray, box: Tuple[slice, ...], reference: "sitk.Image") -> "sitk.Image":
    """A uint8 0/1 image on ``reference``'s grid that is ``mask`` (bool) inside ``box`` (numpy order) and 0 elsewhere."""
    import SimpleITK as sitk

    array = np.zeros(reference.GetSize()[::-1], dtype=np.uint8)
    array[box] = mask
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


#: Slice spacing along the spine above which ``--task vertebrae`` warns that discs are not resolved, mm.
#: The chest CTA reformatted to thicker slices (``scripts/chest_cta_levels.py --slice-mm 3 4 5``),
#: names right at overlap 0.25 / 0.5: 3 mm 10/11, 9/11; 4 mm 7/9, 4/8; 5 mm 0/6, 0/10 (C5 on T2).
MAX_SLICE_MM_FOR_NAMES = 3.5


def _name_vertebrae(
    mask: "sitk.Image", image: "sitk.Image", reporter: ProgressReporter, info: Dict[str, object], name_votes: Optional["sitk.Image"] = None, fit_mask: Optional["sitk.Image"] = None,
    probability: Optional["sitk.Image"] = None,
):
    """Spine mask -> one label per vertebra (VerSe ids), named in anatomical order, filling ``fit_mask`` too (see vertebra_labelling.py)."""
    from SpineContextSegLib.labels import vertebra_by_verse_id
    from SpineContextSegLib.inference.vertebra_labelling import label_vertebrae, names_uncertainty

    labels_image, vertebra_info = label_vertebrae(mask, image, include_sacrum=True, name_votes=name_votes, fit_mask=fit_mask, probability=probability)
    info["vertebrae"] = vertebra_info
    slice_mm = cranio_caudal_spacing_mm(image)
    # thoracic discs are 4-6 mm high: thicker slices average them into the bodies, so the
    # split misses discs and every name after a missed disc is off (CTChest4, 10 mm: L2-L5 for
    # a chest; resampled to 1 mm, C1-C3)
    resolved_mm = slice_mm if slice_mm > MAX_SLICE_MM_FOR_NAMES else resolved_slice_spacing_mm(image)  # never below slice_mm
    if resolved_mm > MAX_SLICE_MM_FOR_NAMES:
        spacing_text = (
            f"The CT's slices are {slice_mm:.1f} mm apart along the spine"
            if resolved_mm == slice_mm
            else f"The CT's slices are {slice_mm:.1f} mm apart but were interpolated from slices about {resolved_mm:.0f} mm apart along the spine"
        )
        reporter.warning(
            "vertebra_slices_too_thick",
            f"{spacing_text} (more than {MAX_SLICE_MM_FOR_NAMES:g} mm): the discs between vertebrae are not resolved, "
            "so vertebrae can be merged or split wrongly and their names are unreliable.",
        )
    uncertainty = names_uncertainty(vertebra_info)
    if uncertainty:
        reporter.warning("vertebra_names_uncertain", uncertainty)
    return labels_image, [vertebra_by_verse_id(v) for v in vertebra_info["labels_present"]]


def segment_file(
    input_path: str,
    output_path: str,
    options: Optional[SegmentOptions] = None,
    *,
    stl_path: Optional[str] = None,
    stl_per_label: bool = False,
    qc_path: Optional[str] = None,
    reporter: Optional[ProgressReporter] = None,
    stop: Optional[Callable[[], None]] = None,
    bundle: Optional["ModelBundle"] = None,
    engine: Optional["InferenceEngine"] = None,
    roi_path: Optional[str] = None,
    roi_margin_mm: float = 10.0,
    centreline_path: Optional[str] = None,
) -> Dict[str, object]:
    """Read ``input_path``, segment, write the mask (and STL, QC picture, ROI and centreline JSON) atomically.

    Returns the ``result`` message of the JSON protocol (outputs, labels, timings, info).
    Outputs are checked for writability before any computing; the input is only read.
    ``output_path`` ending in ``.dcm`` writes a DICOM SEG referencing the DICOM series
    ``input_path`` (:mod:`.dicom_seg`); ``roi_path``/``centreline_path`` (``.json``): see
    :mod:`.spine_geometry`.
    """
    from SpineContextSegLib.io.files import check_output_location
    from SpineContextSegLib.io.images import check_labelmap_path, read_image, write_labelmap

    options = options or SegmentOptions()
    reporter = reporter or ProgressReporter()
    stop = stop or StopCheck(options.cancel_file)
    outputs = [p for p in (output_path, stl_path, qc_path, roi_path, centreline_path) if p]
    for path in outputs:
        if os.path.exists(input_path) and os.path.exists(path) and os.path.samefile(path, input_path):
            raise SegmentationError("output_is_input", f"Output {path} is the input file; the input is never overwritten. Choose another name.")
        check_output_location(path)
    check_labelmap_path(output_path, source=input_path, series_uid=options.series_uid)  # a wrong extension (or .dcm for a non-DICOM input) fails now
    if roi_path or centreline_path:
        from SpineContextSegLib.inference.spine_geometry import check_json_path

        for path, option in ((roi_path, "--roi"), (centreline_path, "--centreline")):
            if path:
                check_json_path(path, option)
    if stl_path:
        from SpineContextSegLib.io.meshing import check_stl_path

        check_stl_path(stl_path)
    start_total = time.perf_counter()
    timer = _StageTimer(reporter)
    # The engine compiles the model, then the later stages' modules are imported, while the
    # image is read (SimpleITK reads and inflates outside the GIL). One after the other: on two
    # cores a third busy thread slowed the read more than it gained (1 mm chest CT 3.61 -> 3.41 s).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        loading = pool.submit(load_model_and_engine, options, bundle, engine)
        importing = pool.submit(_import_ahead, _MODULES_AFTER_READ + (_MODULES_FOR_MESH if stl_path else ()))
        try:
            image = timer.run("read", read_image, input_path, series_uid=options.series_uid, reporter=reporter)
            bundle, engine = loading.result()
        except BaseException:
            importing.cancel()  # a bad input or model is reported without waiting for the imports
            raise
        importing.result()
    if not bundle.card.trained:
        reporter.warning("model_untrained", "The model has random weights (not trained): the result is NOT a segmentation of the spine.")
    result = segment_image(image, options, reporter=reporter, stop=stop, bundle=bundle, engine=engine)
    timings = dict(timer.timings, **result.timings_s)
    written: Dict[str, object] = {}
    written_paths: List[str] = []
    try:
        stop()
        written["mask"] = timer.run(
            "write", write_labelmap, result.mask, output_path, result.labels, source=input_path, series_uid=options.series_uid, model=str(result.info.get("model", ""))
        )
        written_paths.append(str(written["mask"]))
        if stl_path:
            from SpineContextSegLib.io.meshing import mesh_labelmap_to_stl

            stop()
            names = {label.value: label.name for label in result.labels}
            written["stl"] = timer.run("mesh", mesh_labelmap_to_stl, result.mask, stl_path, labels=names, per_label=stl_per_label)
            written_paths.extend(written["stl"])  # type: ignore[arg-type]
        if qc_path:
            from SpineContextSegLib.io.qc import write_qc_png

            stop()
            title = f"{os.path.basename(input_path)} - {bundle.card.name}" + ("" if bundle.card.trained else " (RANDOM WEIGHTS)")
            written["qc"] = timer.run("qc", write_qc_png, image, result.mask, qc_path, title=title)
            written_paths.append(str(written["qc"]))
        if roi_path:
            from SpineContextSegLib.inference.spine_geometry import write_roi_json

            stop()
            written["roi"] = timer.run("geometry", write_roi_json, result.mask, roi_path, margin_mm=roi_margin_mm, labels=result.labels)
            written_paths.append(str(written["roi"]))
        if centreline_path:
            from SpineContextSegLib.inference.spine_geometry import write_centreline_json

            stop()
            written["centreline"] = timer.run("geometry", write_centreline_json, result.mask, centreline_path, labels=result.labels)
            written_paths.append(str(written["centreline"]))
    except BaseException:
        # a run that fails or is cancelled after the first write leaves no outputs
        for path in written_paths:
            if os.path.exists(path):
                os.remove(path)
        raise
    timings.update(timer.timings)
    timings["total"] = time.perf_counter() - start_total
    return {
        "type": "result",
        "input": os.path.abspath(input_path),
        "outputs": written,
        "labels": [label.to_json() for label in result.labels],
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "info": result.info,
    }
