"""Training data on the canonical training grid: :class:`TrainingVolume` and the targets of each task.

Real cases are resampled once at ``--spacing`` (:func:`make_training_volume`, :func:`load_case_volumes`),
phantoms are drawn directly on that grid (:func:`phantom_volume`), and ``train --save-volumes``
writes the resampled volumes to ``*.volume.npz`` files that ``--data FOLDER`` reads back without
SimpleITK (:func:`save_training_volume`, :func:`load_saved_volumes`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Tuple

import numpy as np

from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.training.config import TrainConfig


@dataclasses.dataclass
class TrainingVolume:
    """One scan on the canonical training grid (numpy order z, y, x)."""

    name: str
    patient_id: str
    image: np.ndarray  # float32 in [0, 1] (HU window applied)
    label: np.ndarray  # uint8 class indices: 0/1 (spine task) or network channels (vertebrae task)
    weight: np.ndarray  # uint8 1 where the label is trustworthy
    foreground: np.ndarray  # (N, 3) int32 indices of label voxels, for oversampling
    source: str = "real"


def make_training_volume(name: str, patient_id: str, ct, labels, config: TrainConfig, *, weight=None, source: str = "real") -> TrainingVolume:
    """Resample a CT (HU) and its labels (SimpleITK images) onto the canonical training grid.

    ``labels``: the binary spine mask (spine task) or VerSe ids (vertebrae task; mapped to
    network channels here).
    """
    import SimpleITK as sitk

    from SpineContextSegLib.inference.preprocessing import canonical_reference, resample_to_reference

    reference = canonical_reference(ct, [config.spacing_mm] * 3)
    hu = sitk.GetArrayFromImage(resample_to_reference(ct, reference, method="linear", default_value=-1024, pixel_type=sitk.sitkFloat32))
    values = sitk.GetArrayFromImage(resample_to_reference(labels, reference, method="nearest", pixel_type=sitk.sitkUInt8))
    if weight is None:  # every voxel of the scan is supervised; padding outside it is not
        weight = sitk.Image(ct.GetSize(), sitk.sitkUInt8) + 1
        weight.CopyInformation(ct)
    inside = sitk.GetArrayFromImage(resample_to_reference(weight, reference, method="nearest", pixel_type=sitk.sitkUInt8)) > 0
    return training_volume_from_arrays(name, patient_id, hu, values, inside, config, source=source)


def training_volume_from_arrays(name: str, patient_id: str, hu: np.ndarray, values: np.ndarray, inside: np.ndarray, config: TrainConfig, *, source: str = "real") -> TrainingVolume:
    """A :class:`TrainingVolume` from arrays already on the canonical grid (z, y, x).

    ``hu``: float HU; ``values``: spine mask (spine task) or VerSe ids (vertebrae task);
    ``inside``: bool, the voxels the scan covers (only those are supervised).
    """
    from SpineContextSegLib.labels import verse_ids_to_classes, vertebra_class_ids
    from SpineContextSegLib.inference.preprocessing import hu_to_unit_interval

    inside = np.array(inside, dtype=bool)
    if config.task == "vertebrae":
        label = verse_ids_to_classes(values, vertebra_class_ids())
        unsupervise_below_unlabelled_sacrum(values, inside)
    else:
        label = (values > 0).astype(np.uint8)
    foreground = np.argwhere((label > 0) & inside).astype(np.int32)
    return TrainingVolume(name, patient_id, hu_to_unit_interval(hu, config.hu_window), label, inside.astype(np.uint8), foreground, source)


def unsupervise_below_unlabelled_sacrum(verse_labels: np.ndarray, weight: np.ndarray) -> bool:
    """Clear ``weight`` (in place) caudal to the last lumbar vertebra when the sacrum has no label.

    VerSe and CTSpine1K label C1-L6 only; their visible sacrum would otherwise be taught as
    background while TotalSegmentator cases and phantoms teach it as the sacrum.

    Parameters
    ----------
    verse_labels : (D, H, W) uint8
        VerSe ids on the canonical grid (axis 0 inferior -> superior).
    weight : (D, H, W) bool
        Supervised voxels; modified in place.

    Returns
    -------
    bool
        True when slices were cleared (L5 or L6 is labelled and the sacrum is not).
    """
    from SpineContextSegLib.labels import L6_ID, SACRUM_ID, vertebra_by_name

    present = np.unique(verse_labels)
    if SACRUM_ID in present:
        return False
    l5_id = vertebra_by_name("L5").value
    last_lumbar = L6_ID if L6_ID in present else l5_id if l5_id in present else None
    if last_lumbar is None:
        return False
    lowest_slice = int(np.nonzero((verse_labels == last_lumbar).any(axis=(1, 2)))[0].min())
    weight[:lowest_slice] = False
    return lowest_slice > 0


def load_case_volumes(config: TrainConfig) -> List[Tuple[object, TrainingVolume]]:
    from SpineContextSegLib.io.datasets import find_cases

    loaded = []
    for root in config.data:
        if os.path.isdir(root) and any(f.endswith(SAVED_VOLUME_SUFFIX) for f in os.listdir(root)):
            loaded += [(case, volume) for case, volume in load_saved_volumes(root, config)
                       if not any(pattern in case.case_id for pattern in config.exclude)]
            continue
        for case in find_cases(root, layout=config.layout):
            if any(pattern in case.case_id or pattern in case.image_path for pattern in config.exclude):
                continue
            if getattr(case, "partial_labels", False):
                # visible but unlabelled vertebrae would be taught as background
                print(f"skipping {case.case_id}: only some vertebrae are labelled", flush=True)
                continue
            ct, _ = case.load()
            labels = case.load_vertebra_labels() if config.task == "vertebrae" else case.load_spine_mask()
            if labels is None:
                if config.task == "vertebrae" and case.label_path is not None:
                    print(f"skipping {case.case_id}: its label is a spine mask without vertebra ids", flush=True)
                continue
            loaded.append((case, make_training_volume(case.case_id, case.patient_id, ct, labels, config)))
    return loaded


def phantom_volume(seed: int, config: TrainConfig) -> TrainingVolume:
    """A phantom drawn directly on the canonical training grid (identity direction, ``spacing_mm``).

    No resampling and no SimpleITK: that grid is the one :func:`make_training_volume` would
    resample onto, and a GPU machine without SimpleITK can still train on phantoms.
    """
    from SpineContextSegLib.phantoms.generator import generate_phantom_arrays

    overrides = {}
    if config.phantom_cortical_hu is not None:  # drawn from the phantom's own seed: the same phantom every run
        overrides["cortical_hu"] = float(np.random.default_rng([seed, 1]).uniform(*config.phantom_cortical_hu))
    phantom = generate_phantom_arrays(seed, spacing_mm=(config.spacing_mm,) * 3, **overrides)
    values = phantom.vertebra_labels if config.task == "vertebrae" else phantom.spine_mask
    hu = phantom.ct.astype(np.float32)
    return training_volume_from_arrays(f"phantom-{seed}", f"phantom-{seed}", hu, values, np.ones(hu.shape, dtype=bool), config, source="phantom")


# ---------------------------------------------------------------------------- saved volumes
#: Suffix of a training volume saved by ``train --save-volumes`` (read back by ``--data FOLDER``).
SAVED_VOLUME_SUFFIX = ".volume.npz"


@dataclasses.dataclass
class SavedCase:
    """Stands for the case a saved volume came from (what the train/validation split needs)."""

    case_id: str
    patient_id: str
    image_path: str


def save_training_volume(volume: TrainingVolume, folder: str, config: TrainConfig) -> str:
    """Write ``volume`` to ``folder/<name>.volume.npz`` atomically (image as float16, grid and task recorded)."""
    from SpineContextSegLib.io.files import atomic_output

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, volume.name.replace(os.sep, "_") + SAVED_VOLUME_SUFFIX)
    with atomic_output(path) as temp_path:
        with open(temp_path, "wb") as f:
            np.savez_compressed(
                f, image=volume.image.astype(np.float16), label=volume.label, weight=volume.weight,
                name=volume.name, patient_id=volume.patient_id, source=volume.source,
                task=config.task, spacing_mm=config.spacing_mm, hu_window=np.array(config.hu_window),
            )
    return path


def load_saved_volumes(folder: str, config: TrainConfig) -> List[Tuple[SavedCase, TrainingVolume]]:
    """The ``*.volume.npz`` of ``folder`` (written by :func:`save_training_volume`), checked against ``config``."""
    loaded = []
    for file in sorted(f for f in os.listdir(folder) if f.endswith(SAVED_VOLUME_SUFFIX)):
        path = os.path.join(folder, file)
        with np.load(path) as data:
            grid = (str(data["task"]), float(data["spacing_mm"]), tuple(float(x) for x in data["hu_window"]))
            if grid != (config.task, config.spacing_mm, tuple(config.hu_window)):
                raise SegmentationError(
                    "model_incompatible",
                    f"{path} was saved for task/spacing/HU window {grid}, this run uses {(config.task, config.spacing_mm, tuple(config.hu_window))}: "
                    f"save the volumes again with the same --task and --spacing.",
                )
            label = data["label"]
            weight = data["weight"]
            volume = TrainingVolume(str(data["name"]), str(data["patient_id"]), data["image"].astype(np.float32), label, weight,
                                    np.argwhere((label > 0) & (weight > 0)).astype(np.int32), str(data["source"]))
        loaded.append((SavedCase(volume.name, volume.patient_id, path), volume))
    return loaded
