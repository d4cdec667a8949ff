"""``spinecontextseg train``: the paper's recipe, on real cases and synthetic phantoms.

Defaults follow the paper: BCE + Dice loss, Adam lr 1e-3, batch 4, ReduceLROnPlateau x0.1
after 5 epochs without validation-loss improvement, foreground oversampling (70 % of
patches centred on spine). Added: augmentation (:mod:`augment`), a loss mask for partly
labelled scans, bf16 autocast and channels_last_3d on CPUs that benefit, CUDA, and
PyTorch DDP under ``torchrun`` (gloo on CPU, NCCL on GPUs) for large cohorts.

Two tasks (``--task``):

``spine``
    One output channel (sigmoid), the binary spine mask; loss BCE + Dice.
``vertebrae``
    The second paper's multi-class network: softmax over background + one channel per
    vertebra (:func:`SpineContextSegLib.labels.vertebra_class_ids`: C1-L6, sacrum, T13),
    loss DiceCE (:func:`masked_dice_ce_loss`). Targets are VerSe ids (TotalSegmentator ids
    mapped by :mod:`SpineContextSegLib.io.datasets`); cases without vertebra ids are skipped.
    VerSe and CTSpine1K never label the sacrum, so on a case whose lowest labelled vertebra
    is L5/L6 and that has no sacrum label, everything below that vertebra is left
    unsupervised (:func:`unsupervise_below_unlabelled_sacrum`) instead of taught as background.

Training data are resampled once onto the canonical grid at ``--spacing`` (default 2 mm:
1 mm costs ~8x more per epoch; see the README's model card) and kept in memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from SpineContextSegLib.errors import SegmentationError

AIR_UNIT = 0.0  # HU -1000 after windowing: the padding value


@dataclasses.dataclass
class TrainConfig:
    data: List[str] = dataclasses.field(default_factory=list)
    task: str = "spine"  # "spine" (binary) or "vertebrae" (one channel per vertebra)
    layout: str = "auto"
    exclude: List[str] = dataclasses.field(default_factory=list)
    # relative sampling weight of real cases whose id contains the key (default 1): a case with
    # coarse labels can stay in the mix without dominating it
    case_weights: Dict[str, float] = dataclasses.field(default_factory=dict)
    phantoms: int = 0  # phantom volumes kept in the pool
    phantom_fraction: float = 0.5  # share of patches drawn from phantoms when both kinds exist
    phantom_refresh: int = 25  # replace one pool phantom every N iterations (0: never)
    validation_fraction: float = 0.2
    validation_phantoms: int = 1
    validation_patches: int = 16
    spacing_mm: float = 2.0
    patch_size: Tuple[int, int, int] = (64, 64, 64)
    batch_size: int = 4
    learning_rate: float = 1e-3
    epochs: int = 50
    iterations_per_epoch: int = 100
    plateau_patience: int = 5
    foreground_fraction: float = 0.7
    slab_probability: float = 0.2  # patches cut to a thin slab (few axial slices, or a narrow sagittal reformat)
    scale_range: Tuple[float, float] = (0.7, 1.4)  # = augment.AugmentationConfig's (that module needs torch)
    architecture: str = "SpineContextResUNet"
    architecture_kwargs: Dict[str, object] = dataclasses.field(default_factory=dict)
    hu_window: Tuple[float, float] = (-1000.0, 2000.0)
    seed: int = 0
    device: str = "auto"
    bf16: str = "auto"  # auto | on | off (CPU autocast)
    channels_last: bool = True
    threads: Optional[int] = None
    max_minutes: Optional[float] = None
    output_dir: str = "runs/train"
    resume: Optional[str] = None
    init_weights: Optional[str] = None
    export_dir: Optional[str] = None
    augment: bool = True


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


TASKS = ("spine", "vertebrae")


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
    from SpineContextSegLib.phantoms.phantom import generate_phantom_arrays

    phantom = generate_phantom_arrays(seed, spacing_mm=(config.spacing_mm,) * 3)
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


def extract_region(volume: TrainingVolume, centre: Sequence[int], size: Sequence[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop ``size`` voxels centred on ``centre``; outside the volume: air, label 0, weight 0."""
    out_image = np.full(size, AIR_UNIT, np.float32)
    out_label = np.zeros(size, np.uint8)
    out_weight = np.zeros(size, np.uint8)
    source, target = [], []
    for c, s, n in zip(centre, size, volume.image.shape):
        start = int(c) - s // 2
        lo, hi = max(0, start), min(n, start + s)
        if hi <= lo:
            return out_image, out_label, out_weight
        source.append(slice(lo, hi))
        target.append(slice(lo - start, hi - start))
    source_t, target_t = tuple(source), tuple(target)
    out_image[target_t] = volume.image[source_t]
    out_label[target_t] = volume.label[source_t]
    out_weight[target_t] = volume.weight[source_t]
    return out_image, out_label, out_weight


def sample_centre(volume: TrainingVolume, rng: np.random.Generator, foreground_fraction: float) -> np.ndarray:
    if len(volume.foreground) and rng.random() < foreground_fraction:
        return volume.foreground[rng.integers(len(volume.foreground))]
    return np.array([rng.integers(n) for n in volume.image.shape])


def cut_to_slab(image: np.ndarray, weight: np.ndarray, rng: np.random.Generator, spacing_mm: float) -> None:
    """Keep only a 20-60 mm slab of the patch (in place); the rest becomes air and unsupervised.

    Real scans are often thin: a 20-slice PET/CT stack, an 80 mm-wide sagittal VerSe reformat.
    Without this the network only ever sees full-depth context and fails on them.
    """
    axis = int(rng.choice([0, 2]))  # numpy axis 0 = superior-inferior, 2 = left-right
    size = image.shape[axis]
    width = int(rng.integers(int(20 / spacing_mm), int(60 / spacing_mm) + 1))
    centre = size // 2 + int(rng.integers(-size // 6, size // 6 + 1))
    low, high = max(0, centre - width // 2), min(size, centre + (width + 1) // 2)
    outside = np.ones(size, dtype=bool)
    outside[low:high] = False
    index = [slice(None)] * 3
    index[axis] = outside
    image[tuple(index)] = AIR_UNIT
    weight[tuple(index)] = 0


def masked_bce_dice_loss(logits, target, weight):
    """BCE + soft Dice (the paper's loss), both restricted to voxels with ``weight`` 1."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / weight.sum().clamp_min(1.0)
    probability = torch.sigmoid(logits) * weight
    target = target * weight
    smooth = 1.0
    dice = (2 * (probability * target).sum() + smooth) / (probability.sum() + target.sum() + smooth)
    return bce + (1 - dice)


def masked_dice_ce_loss(logits, target, weight):
    """DiceCE for a multi-class network, restricted to voxels with ``weight`` 1.

    Softmax cross-entropy plus soft Dice averaged over the foreground classes present in the
    batch's target (classes absent from it are kept down by the cross-entropy alone, so a
    patch showing three vertebrae is not scored on the other 24).

    Parameters
    ----------
    logits : (B, C, D, H, W) tensor
    target : (B, 1, D, H, W) tensor of class indices 0..C-1 (any dtype)
    weight : (B, 1, D, H, W) tensor, 0/1
    """
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    channels = logits.shape[1]
    classes = target[:, 0].long()
    voxel_weight = weight[:, 0].float()
    cross_entropy = (F.cross_entropy(logits, classes, reduction="none") * voxel_weight).sum() / voxel_weight.sum().clamp_min(1.0)
    probability = torch.softmax(logits, dim=1) * weight
    one_hot = F.one_hot(classes, channels).permute(0, 4, 1, 2, 3).float() * weight
    axes = (0, 2, 3, 4)
    target_volume = one_hot.sum(axes)[1:]
    smooth = 1.0
    dice = (2 * (probability * one_hot).sum(axes)[1:] + smooth) / (probability.sum(axes)[1:] + target_volume + smooth)
    present = target_volume > 0
    dice_loss = (1 - dice[present]).mean() if bool(present.any()) else cross_entropy.new_zeros(())
    return cross_entropy + dice_loss


def loss_for_task(task: str):
    """The training loss of ``task``: BCE + Dice (spine) or DiceCE (vertebrae)."""
    return masked_dice_ce_loss if task == "vertebrae" else masked_bce_dice_loss


def predicted_classes(logits):
    """(B, C, D, H, W) logits -> (B, D, H, W) class indices: > 0 for one channel, argmax otherwise."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)


def load_matching_weights(network, state_dict) -> List[str]:
    """Load ``state_dict`` into ``network``, leaving out an output head of another shape.

    Fine-tuning a vertebrae network from spine weights keeps everything but the last 1x1x1
    convolution. Returns the names left out.

    Raises
    ------
    SegmentationError
        ``model_incompatible`` when anything other than the head does not fit.
    """
    own = network.state_dict()
    other_shape = [k for k, v in state_dict.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    skipped = [k for k in other_shape if k.startswith("head.")]
    missing = [k for k in own if k not in state_dict and k not in skipped]
    misfits = [k for k in other_shape if k not in skipped] + missing + [k for k in state_dict if k not in own]
    if misfits:
        raise SegmentationError(
            "model_incompatible",
            f"--init-weights does not fit the network ({len(misfits)} tensors missing, extra or of another shape, e.g. "
            f"{misfits[0]}): pass weights of the same --architecture and --widths.",
        )
    network.load_state_dict({k: v for k, v in state_dict.items() if k not in skipped}, strict=False)
    return skipped


class Trainer:
    def __init__(self, config: TrainConfig):
        import torch

        from SpineContextSegLib.inference.model_files import ModelCard
        from SpineContextSegLib.inference.network import build_network

        self.config = config
        self.torch = torch
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        use_cuda = config.device in ("auto", "cuda") and torch.cuda.is_available()
        if config.device == "cuda" and not use_cuda:
            raise SegmentationError("cuda_unavailable", "--device cuda but PyTorch sees no GPU.")
        if self.distributed:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
            if use_cuda:
                torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        else:
            self.device = torch.device("cuda" if use_cuda else "cpu")
        if self.device.type == "cpu" and config.threads:
            torch.set_num_threads(config.threads)
        from SpineContextSegLib.inference.engine import cpu_supports_bf16

        self.bf16 = self.device.type == "cpu" and (config.bf16 == "on" or (config.bf16 == "auto" and cpu_supports_bf16()))
        torch.manual_seed(config.seed + self.rank)
        self.rng = np.random.default_rng(config.seed + 1000 * self.rank)
        self.generator = torch.Generator().manual_seed(config.seed + 7 + self.rank)

        from SpineContextSegLib.labels import labels_for_task

        self.card = ModelCard(
            name=f"spinecontextseg-{config.task}",
            version="1.0.0",
            task=config.task,
            architecture=config.architecture,
            architecture_kwargs=dict(config.architecture_kwargs),
            labels=[label.to_json() for label in labels_for_task(config.task)],  # ValueError for an unknown task
            spacing_mm=[config.spacing_mm] * 3,
            hu_window=list(config.hu_window),
            patch_size=list(config.patch_size),
            overlap=0.25,
            trained=True,
        )
        self.loss = loss_for_task(config.task)
        self.network = build_network(config.architecture, out_channels=self.card.out_channels, **config.architecture_kwargs).to(self.device)
        if config.init_weights:
            state = torch.load(config.init_weights, map_location="cpu", weights_only=False)
            skipped = load_matching_weights(self.network, state.get("state_dict", state))
            if skipped and self.rank == 0:
                print(f"--init-weights: output head left at random ({self.card.out_channels} channels here)", flush=True)
        self.memory_format = torch.channels_last_3d if config.channels_last else torch.contiguous_format
        self.network = self.network.to(memory_format=self.memory_format)
        self.model = self.network
        if self.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="min", factor=0.1, patience=config.plateau_patience)
        self.scaler = torch.amp.GradScaler("cuda") if self.device.type == "cuda" else None
        self.history: List[Dict[str, float]] = []
        self.epoch = 0
        self.iterations = 0
        self.best_dice = -1.0
        self.elapsed_s = 0.0

    # ------------------------------------------------------------------ data
    def load_data(self) -> None:
        from SpineContextSegLib.io.datasets import patient_level_split

        config = self.config
        cases = load_case_volumes(config) if config.data else []
        if cases:
            train_cases, val_cases = patient_level_split([c for c, _ in cases], config.validation_fraction, config.seed)
            train_ids = {c.case_id for c in train_cases}
            self.real = [v for c, v in cases if c.case_id in train_ids]
            self.validation = [v for c, v in cases if c.case_id not in train_ids]
        else:
            self.real, self.validation = [], []
        weights = np.array([next((w for key, w in config.case_weights.items() if key in v.name), 1.0) for v in self.real], dtype=np.float64)
        # None: uniform draws (the sequence of a run without --case-weight stays as it was)
        self.real_probabilities = weights / weights.sum() if len(set(weights.tolist())) > 1 else None
        self.phantoms = [phantom_volume(config.seed * 100003 + i + 1000 * self.rank, config) for i in range(config.phantoms)]
        self._next_phantom_seed = config.seed * 100003 + config.phantoms + 1000 * self.rank + 10**6
        if config.validation_phantoms and (config.phantoms or not self.validation):
            self.validation += [phantom_volume(10**8 + config.seed + i, config) for i in range(config.validation_phantoms)]
        if not self.real and not self.phantoms:
            raise SegmentationError("input_not_found", "No training data: pass --data ROOT (VerSe, CTSpine1K, images/labels) and/or --phantoms N.")
        self.validation_batches = self._fixed_validation_patches()

    def _fixed_validation_patches(self):
        rng = np.random.default_rng(12345)
        patches = []
        for i in range(self.config.validation_patches if self.validation else 0):
            volume = self.validation[i % len(self.validation)]
            centre = sample_centre(volume, rng, 0.7)
            patches.append(extract_region(volume, centre, self.config.patch_size))
        return patches

    def next_batch(self):
        torch = self.torch
        config = self.config
        # the region the augmented patch samples from: rotation (x1.15) and zoom-out (1 / smallest scale)
        source_factor = 1.15 / min(1.0, config.scale_range[0])
        source = tuple(int(np.ceil(p * source_factor)) if config.augment else p for p in config.patch_size)
        images, labels, weights = [], [], []
        for _ in range(config.batch_size):
            use_phantom = bool(self.phantoms) and (not self.real or self.rng.random() < config.phantom_fraction)
            pool = self.phantoms if use_phantom else self.real
            if use_phantom or self.real_probabilities is None:
                volume = pool[self.rng.integers(len(pool))]
            else:
                volume = pool[self.rng.choice(len(pool), p=self.real_probabilities)]
            image, label, weight = extract_region(volume, sample_centre(volume, self.rng, config.foreground_fraction), source)
            if self.rng.random() < config.slab_probability:
                cut_to_slab(image, weight, self.rng, config.spacing_mm)
            images.append(image)
            labels.append(label)
            weights.append(weight)
        image = torch.from_numpy(np.stack(images)[:, None])
        label = torch.from_numpy(np.stack(labels)[:, None].astype(np.float32))
        weight = torch.from_numpy(np.stack(weights)[:, None].astype(np.float32))
        if config.augment:
            from SpineContextSegLib.training.augment import AugmentationConfig, augment_batch

            augmentation = AugmentationConfig(scale_range=tuple(config.scale_range))
            image, label, weight = augment_batch(image, label, weight, tuple(config.patch_size), self.generator, config.spacing_mm, augmentation)
        return image, label, weight

    def _refresh_phantom(self) -> None:
        if self.phantoms and self.config.phantom_refresh and self.iterations % self.config.phantom_refresh == 0:
            index = int(self.rng.integers(len(self.phantoms)))
            self.phantoms[index] = phantom_volume(self._next_phantom_seed, self.config)
            self._next_phantom_seed += 1

    # ------------------------------------------------------------------ steps
    def _forward(self, image):
        torch = self.torch
        image = image.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        if self.bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.model(image)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                return self.model(image)
        return self.model(image)

    def train_step(self) -> float:
        image, label, weight = self.next_batch()
        self.model.train()
        logits = self._forward(image)
        loss = self.loss(logits, label.to(self.device), weight.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.iterations += 1
        self._refresh_phantom()
        return float(loss.detach())

    def validate(self) -> Tuple[float, float]:
        """Mean loss and Dice over the fixed validation patches (vertebrae: mean over the classes present)."""
        torch = self.torch
        if not self.validation_batches:
            return float("nan"), float("nan")
        self.model.eval()
        channels = self.card.out_channels
        classes = max(channels, 2)  # the spine task's one channel is class 1 against background
        losses = []
        intersection, total = np.zeros(classes), np.zeros(classes)
        with torch.no_grad():
            for image, label, weight in self.validation_batches:
                x = torch.from_numpy(image[None, None])
                y = torch.from_numpy(label[None, None].astype(np.float32)).to(self.device)
                w = torch.from_numpy(weight[None, None].astype(np.float32)).to(self.device)
                logits = self._forward(x).float()
                losses.append(float(self.loss(logits, y, w)))
                inside = w[:, 0] > 0
                predicted, target = predicted_classes(logits)[inside], y[:, 0].long()[inside]
                for c in range(1, classes):
                    p, t = predicted == c, target == c
                    intersection[c] += float((p & t).sum())
                    total[c] += float(p.sum() + t.sum())
        scored = total[1:] > 0
        dice = float(np.mean(2 * intersection[1:][scored] / total[1:][scored])) if scored.any() else 1.0
        return float(np.mean(losses)), dice

    # ------------------------------------------------------------------ loop
    def fit(self) -> Optional[str]:
        config = self.config
        os.makedirs(config.output_dir, exist_ok=True)
        if config.resume:
            self.load_checkpoint(config.resume)
        start = time.monotonic() - self.elapsed_s
        best_path = os.path.join(config.output_dir, "best.pt")
        while self.epoch < config.epochs:
            losses = [self.train_step() for _ in range(config.iterations_per_epoch)]
            val_loss, val_dice = self.validate()
            self.epoch += 1
            self.elapsed_s = time.monotonic() - start
            if not np.isnan(val_loss):
                self.scheduler.step(val_loss)
            record = {
                "epoch": self.epoch,
                "iterations": self.iterations,
                "train_loss": float(np.mean(losses)),
                "val_loss": val_loss,
                "val_dice": val_dice,
                "lr": self.optimizer.param_groups[0]["lr"],
                "minutes": round(self.elapsed_s / 60, 2),
            }
            self.history.append(record)
            if self.rank == 0:
                print(json.dumps(record), flush=True)
                improved = np.isnan(val_dice) or val_dice > self.best_dice  # no validation set: keep the latest
                if improved and not np.isnan(val_dice):
                    self.best_dice = val_dice
                self.save_checkpoint(os.path.join(config.output_dir, "last.pt"))
                if improved or not os.path.exists(best_path):
                    self.save_checkpoint(best_path)
                self.write_curve()
            if config.max_minutes is not None and self.elapsed_s / 60 >= config.max_minutes:
                break
        if self.distributed:
            self.torch.distributed.barrier()
            self.torch.distributed.destroy_process_group()
        if self.rank == 0 and config.export_dir:
            from SpineContextSegLib.inference.model_files import export_checkpoint

            export_checkpoint(best_path, config.export_dir)
        return best_path if self.rank == 0 else None

    def _card_json(self) -> dict:
        config = self.config
        card = dataclasses.replace(self.card)
        card.training_data = describe_training_data(self)
        card.training = {
            "iterations": self.iterations,
            "epochs": self.epoch,
            "minutes": round(self.elapsed_s / 60, 1),
            "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores" + (f", {self.world_size} processes" if self.distributed else ""),
            "device": self.device.type,
            "bf16": self.bf16,
            "best_val_dice": round(self.best_dice, 4),
            "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("resume", "output_dir", "export_dir")},
        }
        return card.to_json()

    def save_checkpoint(self, path: str) -> None:
        from SpineContextSegLib.io.files import atomic_output

        torch = self.torch
        state = {
            "state_dict": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "iterations": self.iterations,
            "history": self.history,
            "best_dice": self.best_dice,
            "elapsed_s": self.elapsed_s,
            "card": self._card_json(),
            "rng": self.rng.bit_generator.state,
            "generator": self.generator.get_state(),
        }
        with atomic_output(path) as temp_path:
            torch.save(state, temp_path)

    def load_checkpoint(self, path: str) -> None:
        state = self.torch.load(path, map_location="cpu", weights_only=False)
        self.network.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.iterations = state["epoch"], state["iterations"]
        self.history, self.best_dice, self.elapsed_s = state["history"], state["best_dice"], state.get("elapsed_s", 0.0)
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])

    def write_curve(self) -> Optional[str]:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        epochs = [h["epoch"] for h in self.history]
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot(epochs, [h["train_loss"] for h in self.history], label="train loss")
        left.plot(epochs, [h["val_loss"] for h in self.history], label="validation loss")
        left.set_xlabel("epoch")
        left.set_ylabel("DiceCE loss" if self.config.task == "vertebrae" else "BCE + Dice loss")
        left.legend()
        right.plot(epochs, [h["val_dice"] for h in self.history], color="tab:green")
        right.set_xlabel("epoch")
        right.set_ylabel("validation Dice (patches" + (", mean over vertebrae)" if self.config.task == "vertebrae" else ")"))
        right.set_ylim(0, 1)
        figure.suptitle(f"{self.config.architecture}, {self.config.spacing_mm} mm, patch {tuple(self.config.patch_size)}")
        figure.tight_layout()
        path = os.path.join(self.config.output_dir, "training_curve.png")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path


def describe_training_data(trainer: Trainer) -> str:
    real = sorted({v.name for v in trainer.real})
    parts = []
    if real:
        parts.append(f"{len(real)} real CTs ({', '.join(real)})")
    if trainer.config.phantoms:
        parts.append(f"synthetic phantoms (pool of {trainer.config.phantoms}, refreshed every {trainer.config.phantom_refresh} iterations; {trainer.config.phantom_fraction:.0%} of patches)")
    return "; ".join(parts)


# ---------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--data", nargs="*", default=[], help="dataset roots: VerSe (rawdata/derivatives), CTSpine1K, images/+labels/, or case folders")
    parser.add_argument("--task", default=d.task, choices=TASKS, help="spine: binary mask (BCE + Dice); vertebrae: one channel per vertebra (DiceCE)")
    parser.add_argument("--layout", default="auto", help="auto | verse | ctspine1k | images-labels | totalsegmentator | shared")
    parser.add_argument("--exclude", action="append", default=[], help="skip cases whose id or path contains this (repeatable)")
    parser.add_argument("--case-weight", action="append", default=[], metavar="ID=W", help="sample real cases whose id contains ID W times as often as the others (default 1; repeatable)")
    parser.add_argument("--phantoms", type=int, default=d.phantoms, help="synthetic phantom volumes in the training pool")
    parser.add_argument("--phantom-fraction", type=float, default=d.phantom_fraction)
    parser.add_argument("--phantom-refresh", type=int, default=d.phantom_refresh)
    parser.add_argument("--slab-probability", type=float, default=d.slab_probability, help="share of patches cut to a thin slab")
    parser.add_argument("--scale-range", type=float, nargs=2, default=list(d.scale_range), metavar=("LOW", "HIGH"), help="random isotropic zoom of the patches (< 1 shrinks anatomy)")
    parser.add_argument("--validation-fraction", type=float, default=d.validation_fraction)
    parser.add_argument("--validation-phantoms", type=int, default=d.validation_phantoms)
    parser.add_argument("--spacing", type=float, default=d.spacing_mm, help="training grid spacing, mm (isotropic)")
    parser.add_argument("--patch", type=int, nargs=3, default=list(d.patch_size), metavar=("D", "H", "W"))
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.learning_rate)
    parser.add_argument(
        "--plateau-patience", type=int, default=d.plateau_patience,
        help=f"epochs without a better validation loss before the learning rate drops tenfold (default {d.plateau_patience})",
    )
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--iterations-per-epoch", type=int, default=d.iterations_per_epoch)
    parser.add_argument("--architecture", default=d.architecture, choices=("SpineContextResUNet", "ResUNet", "UNet3D"))
    parser.add_argument("--widths", type=int, nargs=3, help="encoder widths (default 16 32 64)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--bf16", default="auto", choices=("auto", "on", "off"), help="CPU bf16 autocast (auto: when the CPU has AVX512-BF16/AMX)")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--max-minutes", type=float, help="stop after the epoch that passes this wall-clock budget")
    parser.add_argument("-o", "--output-dir", default=d.output_dir)
    parser.add_argument("--resume", help="checkpoint (last.pt) to continue from")
    parser.add_argument("--init-weights", help="start from these weights (fine-tuning)")
    parser.add_argument("--export", dest="export_dir", help="export the best checkpoint to this model folder at the end")
    parser.add_argument("--save-volumes", metavar="DIR", help="only resample the --data cases onto the training grid and save them to DIR "
                        "(*.volume.npz; --data DIR reads them back without SimpleITK, e.g. on a GPU machine)")


def _parse_case_weights(items: Sequence[str]) -> Dict[str, float]:
    from SpineContextSegLib.errors import UsageError

    weights = {}
    for item in items:
        key, _, value = item.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not key or not weight > 0:
            raise UsageError(f"--case-weight wants ID=W with a positive W, got {item!r}")
        weights[key] = weight
    return weights


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    kwargs = {}
    if args.widths:
        kwargs["widths"] = list(args.widths)
    return TrainConfig(
        data=list(args.data),
        task=args.task,
        layout=args.layout,
        exclude=list(args.exclude),
        case_weights=_parse_case_weights(args.case_weight),
        phantoms=args.phantoms,
        phantom_fraction=args.phantom_fraction,
        phantom_refresh=args.phantom_refresh,
        slab_probability=args.slab_probability,
        scale_range=(min(args.scale_range), max(args.scale_range)),
        validation_fraction=args.validation_fraction,
        validation_phantoms=args.validation_phantoms,
        spacing_mm=args.spacing,
        patch_size=tuple(args.patch),
        batch_size=args.batch_size,
        learning_rate=args.lr,
        plateau_patience=args.plateau_patience,
        epochs=args.epochs,
        iterations_per_epoch=args.iterations_per_epoch,
        architecture=args.architecture,
        architecture_kwargs=kwargs,
        seed=args.seed,
        device=args.device,
        bf16=args.bf16,
        channels_last=not args.no_channels_last,
        threads=args.threads,
        max_minutes=args.max_minutes,
        output_dir=args.output_dir,
        resume=args.resume,
        init_weights=args.init_weights,
        export_dir=args.export_dir,
        augment=not args.no_augment,
    )


def run(args: argparse.Namespace) -> int:
    if getattr(args, "save_volumes", None):
        config = config_from_args(args)
        cases = load_case_volumes(config)
        if not cases:
            raise SegmentationError("input_not_found", "--save-volumes: no labelled case found under --data.")
        for _, volume in cases:
            print(f"saved {save_training_volume(volume, args.save_volumes, config)}", flush=True)
        return 0
    trainer = Trainer(config_from_args(args))
    trainer.load_data()
    best = trainer.fit()
    if best:
        print(f"best checkpoint: {best}")
    return 0
