"""Patches cut from training volumes: a crop padded with air, foreground-oversampled centres, thin slabs."""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from SpineContextSegLib.training.data import TrainingVolume

AIR_UNIT = 0.0  # HU -1000 after windowing: the padding value


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
