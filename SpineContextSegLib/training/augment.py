"""Training-time augmentation of patch batches, in torch (runs where the network runs).

Every function takes ``(B, C, D, H, W)`` tensors and a ``torch.Generator`` so a seeded run
is reproducible. Spatial transforms resample image (linear), label (nearest) and loss
weight (nearest) together; intensity transforms touch only the image, which is already
normalised to [0, 1] (HU window).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


@dataclass
class AugmentationConfig:
    rotation_deg: float = 15.0  # per axis, uniform in [-r, r]
    # isotropic zoom (< 1 shrinks anatomy). Wide on purpose: trained on 0.85-1.15 with lumbar-heavy
    # real data, the network missed the smaller thoracic vertebrae of an unseen chest CT.
    scale_range: Tuple[float, float] = (0.7, 1.4)
    elastic_mm: float = 4.0  # peak displacement of the smooth random field
    elastic_probability: float = 0.3
    flip_left_right: bool = True  # the spine is roughly symmetric; ribs and organs are not, which is fine
    intensity_scale: float = 0.1  # x (1 +- s)
    intensity_shift: float = 0.05  # + U(-s, s), in [0, 1] units (0.05 = 150 HU)
    gamma_range: Tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.02  # up to, in [0, 1] units (0.02 = 60 HU)
    blur_probability: float = 0.2
    blur_sigma_voxels: Tuple[float, float] = (0.5, 1.2)


def _uniform(low: float, high: float, shape, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def random_affine_grid(
    batch: int, source_size: Tuple[int, int, int], out_size: Tuple[int, int, int], config: AugmentationConfig, generator: torch.Generator, spacing_mm: float
) -> torch.Tensor:
    """Sampling grid ``(B, D, H, W, 3)`` that rotates, scales and elastically deforms about the source centre.

    ``source_size`` is the extracted region (larger than ``out_size`` so rotated corners stay
    inside it); the output samples the central ``out_size`` voxels of it.
    """
    angles = _uniform(-config.rotation_deg, config.rotation_deg, (batch, 3), generator) * math.pi / 180
    scales = _uniform(config.scale_range[0], config.scale_range[1], (batch, 1), generator)
    cos, sin = torch.cos(angles), torch.sin(angles)
    zeros, ones = torch.zeros(batch), torch.ones(batch)
    rx = torch.stack([ones, zeros, zeros, zeros, cos[:, 0], -sin[:, 0], zeros, sin[:, 0], cos[:, 0]], 1).view(batch, 3, 3)
    ry = torch.stack([cos[:, 1], zeros, sin[:, 1], zeros, ones, zeros, -sin[:, 1], zeros, cos[:, 1]], 1).view(batch, 3, 3)
    rz = torch.stack([cos[:, 2], -sin[:, 2], zeros, sin[:, 2], cos[:, 2], zeros, zeros, zeros, ones], 1).view(batch, 3, 3)
    matrix = rz @ ry @ rx / scales.view(batch, 1, 1)
    # grid coordinates are (x, y, z) = (W, H, D) normalised to the SOURCE region; shrink to the output's share
    ratio = torch.tensor([o / s for o, s in zip(reversed(out_size), reversed(source_size))], dtype=torch.float32)
    theta = torch.cat([matrix * ratio.view(1, 1, 3), torch.zeros(batch, 3, 1)], dim=2)
    grid = F.affine_grid(theta, [batch, 1, *out_size], align_corners=False)
    if config.elastic_mm > 0:
        apply = torch.rand(batch, generator=generator) < config.elastic_probability
        if apply.any():
            coarse = torch.randn((batch, 3, 4, 4, 4), generator=generator)
            field = F.interpolate(coarse, size=out_size, mode="trilinear", align_corners=False).permute(0, 2, 3, 4, 1)
            field = field / field.abs().amax(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
            # mm -> normalised source coordinates (2 units span the source)
            scale = torch.tensor([2.0 * config.elastic_mm / (spacing_mm * s) for s in reversed(source_size)])
            grid = grid + field * scale * apply.view(batch, 1, 1, 1, 1)
    return grid


def augment_spatial(
    image: torch.Tensor, label: torch.Tensor, weight: torch.Tensor, out_size: Tuple[int, int, int], config: AugmentationConfig, generator: torch.Generator, spacing_mm: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resample source regions ``(B, C, *source)`` to augmented patches ``(B, C, *out_size)``."""
    grid = random_affine_grid(image.shape[0], tuple(image.shape[2:]), out_size, config, generator, spacing_mm)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    label = F.grid_sample(label, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    weight = F.grid_sample(weight, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if config.flip_left_right:
        flip = torch.rand(image.shape[0], generator=generator) < 0.5
        if flip.any():  # numpy axis W (last) is right->left on the canonical grid
            image[flip], label[flip], weight[flip] = image[flip].flip(-1), label[flip].flip(-1), weight[flip].flip(-1)
    return image, label, weight


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[1]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        padding = [0, 0, 0]
        padding[axis] = radius
        image = F.conv3d(image, kernel.view(shape).repeat(channels, 1, 1, 1, 1), padding=tuple(padding), groups=channels)
    return image


def augment_intensity(image: torch.Tensor, config: AugmentationConfig, generator: torch.Generator) -> torch.Tensor:
    """Scale/shift, gamma, blur and Gaussian noise; the result is clipped back to [0, 1]."""
    batch = image.shape[0]
    view = (batch, 1, 1, 1, 1)
    image = image * _uniform(1 - config.intensity_scale, 1 + config.intensity_scale, view, generator)
    image = image + _uniform(-config.intensity_shift, config.intensity_shift, view, generator)
    image = image.clamp(0, 1) ** _uniform(config.gamma_range[0], config.gamma_range[1], view, generator)
    if config.blur_probability > 0:
        for b in range(batch):
            if float(torch.rand(1, generator=generator)) < config.blur_probability:
                sigma = float(_uniform(*config.blur_sigma_voxels, (1,), generator))
                image[b : b + 1] = gaussian_blur(image[b : b + 1], sigma)
    noise_std = _uniform(0, config.noise_std, view, generator)
    image = image + noise_std * torch.randn(image.shape, generator=generator)
    return image.clamp(0, 1)


def augment_batch(
    image: torch.Tensor,
    label: torch.Tensor,
    weight: torch.Tensor,
    out_size: Tuple[int, int, int],
    generator: torch.Generator,
    spacing_mm: float,
    config: Optional[AugmentationConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    config = config or AugmentationConfig()
    image, label, weight = augment_spatial(image, label, weight, out_size, config, generator, spacing_mm)
    return augment_intensity(image, config, generator), label, weight
