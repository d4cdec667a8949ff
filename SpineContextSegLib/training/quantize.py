"""``spinecontextseg quantize``: an INT8 copy of a model for CPUs without bf16, and the check that gates it.

Three steps, all on the CPU:

1. **Calibration tiles** (:func:`calibration_tiles`): tiles of the card's patch size cut
   exactly as ``segment`` cuts them (canonical grid at the card's spacing, body crop, HU
   window, the stitcher's tile grid), from the given CTs and from synthetic phantoms. Per
   volume, the tiles are spread over the range of bone content, so air-only, soft-tissue and
   spine tiles all set the activation ranges.
2. **Quantisation** (:func:`quantize_onnx`): ONNX Runtime's static post-training quantisation
   of ``model.onnx`` into ``model_int8.onnx`` as a QDQ graph (int8 weights per output channel,
   uint8 activations). The convolutions that read the CT, and everything after the last
   upsampling (the full-resolution decoder block, the 1x1x1 head, the sigmoid) stay fp32:
   there the mask's edges are decided. One file serves both CPU engines: OpenVINO turns the
   Q/DQ pairs into int8 convolutions (1.7x faster per tile than fp32 on a Xeon with VNNI);
   ONNX Runtime reads it too, but was not faster with it on an AVX2 CPU.
3. **Agreement** (:func:`mask_agreement`): the whole pipeline (:func:`~.pipeline.segment_image`)
   runs each agreement case with fp32 and with int8; the Dice of the int8 mask against the fp32
   mask is recorded per case in the card's ``int8.agreement``. ``--precision auto`` uses the
   INT8 model only when every recorded case reaches :data:`~.model_files.INT8_MIN_AGREEMENT_DICE`
   (and the CPU lacks native bf16); ``--precision int8`` uses it regardless.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from SpineContextSegLib.errors import SegmentationError

#: Calibration methods :func:`quantize_onnx` knows (ONNX Runtime's names in lower case).
CALIBRATION_METHODS = ("minmax",)
DEFAULT_TILES_PER_VOLUME = 16
DEFAULT_PHANTOMS = 2
#: Phantom seeds start here, far from the seeds training draws (0, 1, 2, ...).
PHANTOM_SEED_BASE = 910_000
#: Bone in CT, HU: ranks tiles by how much spine they hold.
BONE_HU = 200.0
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


# ----------------------------------------------------------------------------- cases
def resolve_cases(paths: Sequence[str]) -> List[Tuple[str, str]]:
    """``(case name, CT path)`` for each path: a CT file, a case folder, or a folder of case folders.

    A case folder holds ``ct.nii.gz`` (named after the folder) or a DICOM series; any other
    folder stands for its case sub-folders (e.g. ``../shared/data/real``). A file is named by
    its stem (``CTChest4.nii.gz`` -> ``CTChest4``), or by its folder when the stem is ``ct``.
    """
    from SpineContextSegLib.io.dicom import dicom_series_ids

    cases: List[Tuple[str, str]] = []

    def case_of_folder(folder: str) -> Optional[Tuple[str, str]]:
        name = os.path.basename(os.path.normpath(folder))
        if os.path.isfile(os.path.join(folder, "ct.nii.gz")):
            return name, os.path.join(folder, "ct.nii.gz")
        if dicom_series_ids(folder):
            return name, folder
        return None

    for path in paths:
        if os.path.isfile(path):
            stem = os.path.basename(path)
            for suffix in _IMAGE_SUFFIXES:
                if stem.lower().endswith(suffix):
                    stem = stem[: -len(suffix)]
                    break
            name = os.path.basename(os.path.dirname(os.path.abspath(path))) if stem == "ct" else stem
            cases.append((name, path))
        elif os.path.isdir(path):
            single = case_of_folder(path)
            if single is not None:
                cases.append(single)
                continue
            found = [case_of_folder(os.path.join(path, entry)) for entry in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, entry))]
            found = [case for case in found if case is not None]
            if not found:
                raise SegmentationError("input_not_found", f"No CT (ct.nii.gz or a DICOM series) in {path} or its sub-folders.")
            cases.extend(found)
        else:
            raise SegmentationError("input_not_found", f"Case not found: {path}. Check the path.")
    names = [name for name, _ in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SegmentationError("input_not_found", f"Several cases are named {', '.join(duplicates)}; the card keys agreement by case name. Pass them separately renamed.")
    return cases


# ----------------------------------------------------------------------------- calibration
def network_input_volume(image, card, spacing_mm: Optional[float] = None) -> np.ndarray:
    """What ``segment`` feeds the stitcher: ``(D, H, W)`` float32 in [0, 1] on the canonical grid, body-cropped.

    ``image``: a CT in HU (``sitk.Image``); ``card``: the :class:`~.model_files.ModelCard`
    (``spacing_mm``, ``hu_window``); ``spacing_mm``: another isotropic grid (the fine pass's).
    """
    import SimpleITK as sitk

    from SpineContextSegLib.inference.preprocessing import body_bounding_box, hu_to_unit_interval, to_canonical

    canonical = to_canonical(image, [spacing_mm] * 3 if spacing_mm else card.spacing_mm, method="linear")
    hu = sitk.GetArrayViewFromImage(canonical)  # a view: ``canonical`` must outlive it
    volume = hu_to_unit_interval(hu[body_bounding_box(hu)], tuple(card.hu_window))
    del hu, canonical
    return volume


def tiles_of_volume(volume: np.ndarray, patch_size: Sequence[int], overlap: float, count: int, hu_window: Sequence[float]) -> List[np.ndarray]:
    """Up to ``count`` of the stitcher's tiles of ``volume``, spread evenly over their bone content.

    ``volume``: ``(D, H, W)`` float32 in [0, 1] (:func:`network_input_volume`), padded with 0 to
    at least ``patch_size`` as the stitcher pads. Returns ``(1, 1, d, h, w)`` float32 arrays.
    """
    from SpineContextSegLib.inference.stitcher import tile_grid

    padded_shape = tuple(max(s, p) for s, p in zip(volume.shape, patch_size))
    if padded_shape != volume.shape:
        volume = np.pad(volume, [(0, p - s) for s, p in zip(volume.shape, padded_shape)])
    tiles = tile_grid(padded_shape, patch_size, overlap)
    bone_level = (BONE_HU - hu_window[0]) / (hu_window[1] - hu_window[0])
    bone_fraction = np.array([float(np.mean(volume[tile] > bone_level)) for tile in tiles])
    order = np.argsort(bone_fraction, kind="stable")
    # evenly spaced ranks: the emptiest and the boniest tile are always in
    picks = sorted(set(np.linspace(0, len(tiles) - 1, num=min(count, len(tiles))).round().astype(int)))
    return [np.ascontiguousarray(volume[tiles[order[rank]]], dtype=np.float32)[np.newaxis, np.newaxis] for rank in picks]


def calibration_tiles(
    card, cases: Sequence[Tuple[str, str]], *, phantoms: int = DEFAULT_PHANTOMS, tiles_per_volume: int = DEFAULT_TILES_PER_VOLUME,
    log: Callable[[str], None] = lambda message: None,
) -> Tuple[List[np.ndarray], Dict[str, object]]:
    """Calibration tiles from ``cases`` (``(name, CT path)``) and ``phantoms`` synthetic CTs.

    Returns the tiles (``(1, 1, *card.patch_size)`` float32 each) and a JSON description
    for the card (case names, phantom seeds, tile count and size).
    """
    from SpineContextSegLib.io.images import read_image
    from SpineContextSegLib.phantoms.generator import generate_phantom

    patch_size = [int(p) for p in card.patch_size]
    # the grids the network runs on: the card's, and the fine pass's (inference.fine_pass)
    grids: List[Optional[float]] = [None] + ([float(card.fine_spacing_mm)] if card.fine_spacing_mm else [])
    tiles: List[np.ndarray] = []

    def add_tiles(name: str, image) -> None:
        for spacing_mm in grids:
            volume = network_input_volume(image, card, spacing_mm)
            picked = tiles_of_volume(volume, patch_size, card.overlap, tiles_per_volume, card.hu_window)
            log(f"calibration: {name}: {len(picked)} tiles of {volume.shape}")
            tiles.extend(picked)

    for name, path in cases:
        add_tiles(name, read_image(path))
    seeds = [PHANTOM_SEED_BASE + i for i in range(phantoms)]
    for seed in seeds:
        # phantoms drawn near the model's spacing: cheap to draw, and resampled like any CT
        add_tiles(f"phantom {seed}", generate_phantom(seed, spacing_mm=[float(s) for s in card.spacing_mm]).ct)
    description = {
        "cases": [name for name, _ in cases],
        "phantom_seeds": seeds,
        "tiles": len(tiles),
        "tile_size_zyx": patch_size,
        "tiles_per_volume": tiles_per_volume,
        "grids_mm": [float(card.spacing_mm[0])] + grids[1:],
        "selection": "the stitcher's tiles (card overlap) of the body-cropped canonical volume on each grid the network runs on, evenly spread over bone content",
    }
    return tiles, description


# ----------------------------------------------------------------------------- quantisation
def _full_resolution_tail(model) -> List[str]:
    """Names of the nodes after the last upsampling (ConvTranspose): the full-resolution decoder block, head, sigmoid.

    Kept in fp32. With only the head in fp32, the int8 masks of model 1.1.0 agreed with fp32
    to Dice 0.985-0.987 on ``ts_aorta_crop_T12`` (edges about a voxel wider all round; shifting
    the head's bias did not help: the differences are not a bias); with this block in fp32
    too, 0.989-0.991, depending on the calibration cases. It costs speed: 113 instead of 46 ms
    per 64^3 tile on one core of a Xeon with VNNI (fp32: 190 ms).
    """
    nodes = list(model.graph.node)
    last_upsampling = max((index for index, node in enumerate(nodes) if node.op_type == "ConvTranspose"), default=-1)
    tail = nodes[last_upsampling + 1:]
    if last_upsampling < 0:  # no decoder: keep the last convolution and what follows it
        last_conv = max(index for index, node in enumerate(nodes) if node.op_type == "Conv")
        tail = nodes[last_conv:]
    return [node.name for node in tail]


def _input_nodes(model) -> List[str]:
    """Names of the nodes that read the graph input (the first convolutions): kept in fp32.

    Their input is the CT itself; 8 bits over the HU window would be ~12 HU steps, enough to
    move bone edges, and with one input channel they cost little.
    """
    image = model.graph.input[0].name
    return [node.name for node in model.graph.node if image in node.input]


def _named_copy(onnx_path: str, directory: str) -> str:
    """``onnx_path`` re-saved with a name on every node (the exporter leaves some empty; exclusion lists need names)."""
    import onnx

    model = onnx.load(onnx_path)
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
    path = os.path.join(directory, "named.onnx")
    onnx.save(model, path)
    return path


def quantize_onnx(onnx_path: str, output_path: str, tiles: Sequence[np.ndarray], *, calibrate_method: str = "minmax") -> Dict[str, object]:
    """Static INT8 quantisation of an fp32 ONNX model into a QDQ ONNX file at ``output_path``.

    ONNX Runtime's ``quantize_static``: QDQ format, int8 weights symmetric per output channel,
    uint8 activations with ranges from ``tiles``. Only Conv, ConvTranspose and MaxPool are
    quantised, and the first convolutions and the full-resolution tail stay fp32
    (:func:`_input_nodes`, :func:`_full_resolution_tail`): quantised Concat or BatchNormalization
    nodes crash OpenVINO 2026.4's CPU plugin while compiling, and quantised Add nodes make
    OpenVINO slower, not faster.

    Parameters
    ----------
    onnx_path : str
        fp32 model, input ``(N, 1, D, H, W)``, output probabilities.
    tiles : sequence of ``(1, 1, d, h, w)`` float32 arrays
        Calibration inputs (:func:`calibration_tiles`).
    calibrate_method : str
        ``"minmax"``, the only one: ONNX Runtime's percentile and entropy calibrators keep every
        activation of every tile in memory (over 23 GB for the tiles of the shared cases).

    Returns
    -------
    dict
        What was done, for the card's ``int8.method``.
    """
    import logging
    import tempfile

    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from SpineContextSegLib.io.files import atomic_output

    methods = {"minmax": CalibrationMethod.MinMax}
    if calibrate_method not in methods:
        raise ValueError(f"unknown calibration method {calibrate_method!r}; choose one of {', '.join(methods)}")

    class TileReader(CalibrationDataReader):
        def __init__(self, name: str):
            self.items: Iterator[np.ndarray] = iter(tiles)
            self.name = name

        def get_next(self):
            tile = next(self.items, None)
            return None if tile is None else {self.name: np.ascontiguousarray(tile, dtype=np.float32)}

    with tempfile.TemporaryDirectory(prefix="scs-quantize-") as work:
        named_path = _named_copy(onnx_path, work)
        model = onnx.load(named_path)
        keep_fp32 = _input_nodes(model) + _full_resolution_tail(model)
        op_types = ["Conv", "ConvTranspose", "MaxPool"]
        root_logger, level = logging.getLogger(), logging.getLogger().level
        root_logger.setLevel(logging.ERROR)  # quantize_static warns through the root logger about optional pre-processing
        try:
            with atomic_output(output_path) as temp_path:
                quantize_static(
                    named_path, temp_path, TileReader(model.graph.input[0].name),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=methods[calibrate_method], op_types_to_quantize=op_types, nodes_to_exclude=keep_fp32,
                    calibration_providers=["CPUExecutionProvider"],
                )
        finally:
            root_logger.setLevel(level)
    return {
        "tool": f"onnxruntime {onnxruntime.__version__} quantize_static",
        "format": "QDQ",
        "weights": "int8, symmetric, per output channel",
        "activations": f"uint8, asymmetric, {calibrate_method} calibration",
        "quantised_ops": op_types,
        "kept_fp32": keep_fp32,
    }



# ----------------------------------------------------------------------------- agreement
def mask_agreement(
    bundle, cases: Sequence[Tuple[str, str]], *, engines: Sequence[str] = ("openvino", "onnxruntime"), threads: Optional[int] = None,
    log: Callable[[str], None] = lambda message: None,
) -> Dict[str, Dict[str, float]]:
    """Dice of the int8 mask against the fp32 mask, per engine and case, through the whole pipeline.

    ``bundle`` must list its INT8 model in the card (``card.int8``). Returns
    ``{engine: {case name: dice}}``; masks are compared on the input's own grid.
    """
    import SimpleITK as sitk

    from SpineContextSegLib.inference.engine import create_engine
    from SpineContextSegLib.io.images import read_image
    from SpineContextSegLib.evaluation.metrics import dice
    from SpineContextSegLib.inference.pipeline import SegmentOptions, segment_image

    images = {name: read_image(path) for name, path in cases}
    result: Dict[str, Dict[str, float]] = {}
    for engine_name in engines:
        masks: Dict[str, Dict[str, np.ndarray]] = {}
        for precision in ("fp32", "int8"):
            engine = create_engine(bundle, engine=engine_name, device="cpu", threads=threads, precision=precision)
            options = SegmentOptions(engine=engine_name, device="cpu", threads=threads, precision=precision)
            for name, image in images.items():
                start = time.perf_counter()
                try:
                    mask = segment_image(image, options, bundle=bundle, engine=engine).mask
                    masks.setdefault(name, {})[precision] = sitk.GetArrayFromImage(mask) > 0
                except SegmentationError as error:
                    if error.code != "no_spine_found":
                        raise
                    masks.setdefault(name, {})[precision] = np.zeros(tuple(reversed(image.GetSize())), dtype=bool)
                log(f"agreement: {engine_name} {precision} {name}: {time.perf_counter() - start:.1f} s")
        result[engine_name] = {name: round(dice(pair["int8"], pair["fp32"]), 4) for name, pair in masks.items()}
        log(f"agreement: {engine_name}: {json.dumps(result[engine_name])}")
    return result


# ----------------------------------------------------------------------------- the command
def _copy_model_folder(source: str, target: str) -> None:
    """Copy the fp32 model files (model.onnx, model.json, model.pt) from ``source`` to ``target`` (created)."""
    from SpineContextSegLib.io.files import atomic_output
    from SpineContextSegLib.inference.model_files import CARD_FILE, ONNX_FILE, TORCH_FILE

    os.makedirs(target, exist_ok=True)
    for name in (ONNX_FILE, CARD_FILE, TORCH_FILE):
        if os.path.isfile(os.path.join(source, name)):
            with atomic_output(os.path.join(target, name)) as temp_path:
                shutil.copyfile(os.path.join(source, name), temp_path)


def quantize_model(
    model_dir: Optional[str], output_dir: str, *, calibration: Sequence[str] = (), agreement: Optional[Sequence[str]] = None,
    phantoms: int = DEFAULT_PHANTOMS, tiles_per_volume: int = DEFAULT_TILES_PER_VOLUME, calibrate_method: str = "minmax",
    engines: Optional[Sequence[str]] = None, threads: Optional[int] = None, log: Callable[[str], None] = lambda message: None,
):
    """Write ``model_int8.onnx`` next to a copy of the model in ``output_dir`` and record it in ``model.json``.

    Parameters
    ----------
    model_dir : str or None
        The fp32 model folder (None: the bundled model). ``output_dir`` may be the same folder.
    calibration : paths
        CTs for calibration tiles (:func:`resolve_cases`); phantoms are always added (``phantoms``).
    agreement : paths, optional
        CTs whose fp32 and int8 masks are compared (default: the calibration cases, or a
        phantom when there are none). Use cases the model was not calibrated on, too.
    engines : names, optional
        Engines to check agreement with (default: OpenVINO when installed, and ONNX Runtime);
        a case's recorded Dice is its lowest over them.

    Returns
    -------
    ModelBundle
        The output folder, with ``card.int8`` = ``{file, sha256, method, calibration,
        agreement: {case: dice}, agreement_engines, agreement_by_engine, min_dice}``.
    """
    from SpineContextSegLib.inference.model_files import INT8_FILE, INT8_MIN_AGREEMENT_DICE, load_model, sha256_of_file, write_card

    source = load_model(model_dir)
    output_dir = os.path.abspath(output_dir)
    if os.path.normcase(output_dir) != os.path.normcase(source.directory):
        _copy_model_folder(source.directory, output_dir)
    bundle = load_model(output_dir)
    card = bundle.card
    card.int8 = {}  # a stale entry must not describe the new file while it is written
    write_card(card, output_dir)

    calibration_cases = resolve_cases(calibration)
    agreement_cases = resolve_cases(agreement) if agreement else list(calibration_cases)
    if not agreement_cases:
        from SpineContextSegLib.phantoms.generator import generate_phantom
        import tempfile
        import SimpleITK as sitk

        # no CT given: check on a phantom that calibration did not see
        seed = PHANTOM_SEED_BASE + phantoms
        phantom_path = os.path.join(tempfile.mkdtemp(prefix="scs-quantize-"), f"phantom_{seed}.nii.gz")
        sitk.WriteImage(generate_phantom(seed, spacing_mm=[float(s) for s in card.spacing_mm]).ct, phantom_path)
        agreement_cases = [(f"phantom_{seed}", phantom_path)]
    if engines is None:
        try:
            import openvino  # noqa: F401

            engines = ("openvino", "onnxruntime")
        except ImportError:
            engines = ("onnxruntime",)

    start = time.perf_counter()
    tiles, calibration_info = calibration_tiles(card, calibration_cases, phantoms=phantoms, tiles_per_volume=tiles_per_volume, log=log)
    int8_path = os.path.join(output_dir, INT8_FILE)
    method_info = quantize_onnx(bundle.onnx_path, int8_path, tiles, calibrate_method=calibrate_method)
    log(f"quantised ({calibrate_method} calibration) in {time.perf_counter() - start:.1f} s: {int8_path} ({os.path.getsize(int8_path) / 1e6:.2f} MB)")
    card.int8 = {"file": INT8_FILE, "sha256": sha256_of_file(int8_path), "method": method_info, "calibration": calibration_info}
    write_card(card, output_dir)

    by_engine = mask_agreement(bundle, agreement_cases, engines=engines, threads=threads, log=log)
    lowest = {name: min(by_engine[engine][name] for engine in engines) for name, _ in agreement_cases}
    card.int8.update({
        "agreement": lowest,
        "agreement_metric": "Dice of the int8 mask vs the fp32 mask, whole `segment` pipeline, lowest over agreement_engines",
        "agreement_engines": list(engines),
        "agreement_by_engine": by_engine,
        "min_dice": INT8_MIN_AGREEMENT_DICE,
    })
    write_card(card, output_dir)
    return load_model(output_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="fp32 model folder (model.onnx + model.json); default: the bundled model")
    parser.add_argument("-o", "--output", required=True, help="model folder to write (may be MODEL itself): model_int8.onnx next to the fp32 files, card updated")
    parser.add_argument("--calibration", nargs="*", default=[], metavar="CASE", help="CTs for calibration tiles: CT files, case folders (ct.nii.gz or DICOM) or folders of them")
    parser.add_argument("--agreement", nargs="*", metavar="CASE", help="CTs whose int8 and fp32 masks are compared and recorded (default: the calibration cases)")
    parser.add_argument("--phantoms", type=int, default=DEFAULT_PHANTOMS, help=f"synthetic phantoms added to calibration (default {DEFAULT_PHANTOMS})")
    parser.add_argument("--tiles-per-case", type=int, default=DEFAULT_TILES_PER_VOLUME, help=f"calibration tiles per CT or phantom (default {DEFAULT_TILES_PER_VOLUME})")
    parser.add_argument("--calibrate-method", default="minmax", choices=CALIBRATION_METHODS, help="activation ranges: minmax (the only one that fits in memory)")
    parser.add_argument("--engines", nargs="+", choices=("openvino", "onnxruntime"), help="engines to check agreement with (default: both when OpenVINO is installed)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores but one)")


def run(args: argparse.Namespace) -> int:
    """The ``quantize`` command: prints progress lines, then the card's ``int8`` entry as JSON."""
    import sys

    from SpineContextSegLib.inference.model_files import INT8_MIN_AGREEMENT_DICE

    bundle = quantize_model(
        args.model, args.output, calibration=args.calibration, agreement=args.agreement, phantoms=max(0, args.phantoms),
        tiles_per_volume=max(1, args.tiles_per_case), calibrate_method=args.calibrate_method, engines=args.engines, threads=args.threads,
        log=lambda message: print(message, file=sys.stderr, flush=True),
    )
    int8 = bundle.card.int8
    print(json.dumps({key: int8[key] for key in ("file", "sha256", "agreement", "agreement_engines")}, indent=2))
    failing = {name: value for name, value in int8["agreement"].items() if value < INT8_MIN_AGREEMENT_DICE}
    if failing:
        print(f"int8 agrees with fp32 below Dice {INT8_MIN_AGREEMENT_DICE} on {', '.join(sorted(failing))}: "
              f"--precision auto will not use it (--precision int8 still does).", file=sys.stderr)
    return 0
