"""SpineContextResUNet and its baselines, built from small named blocks.

All networks take ``x`` of shape ``(N, C_in, D, H, W)`` (D along the patient's
superior-inferior axis on the canonical grid) and return **logits** of shape
``(N, C_out, D, H, W)``; :func:`with_output_activation` adds the sigmoid/softmax
for export. Any ``D, H, W`` works: inputs are padded to a multiple of 8 (three
2x poolings) and the output is cropped back.

Parameter counts with the defaults (``in_channels=1, out_channels=1``):

============================  ==========
``SpineContextResUNet()``      1,703,841  (the paper's model)
``ResUNet()``                  1,424,545  (bottleneck = residual block)
``UNet3D()``                   1,401,969  (plain double-conv blocks)
============================  ==========
"""
from __future__ import annotations

from typing import Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from SpineContextSegLib.inference.network_constants import DOWNSAMPLING_FACTOR


class ConvBNReLU(nn.Sequential):
    """3x3x3 convolution (with bias, as the authors wrote it) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=dilation, dilation=dilation),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (1x1x1 conv + BN when widths differ), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels, out_channels)
        self.conv2 = nn.Sequential(
            nn.Conv3d(out_channels, out_channels, 3, padding=1), nn.BatchNorm3d(out_channels)
        )
        if in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1), nn.BatchNorm3d(out_channels)
            )
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv2(self.conv1(x)) + self.shortcut(x))


class DoubleConvBlock(nn.Sequential):
    """The plain U-Net stage: two conv-BN-ReLU, no shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(ConvBNReLU(in_channels, out_channels), ConvBNReLU(out_channels, out_channels))


class ContextBlock(nn.Module):
    """3D ASPP bottleneck: parallel dilated 3x3x3 convs, concatenated, BN-ReLU, 1x1x1 fuse, BN-ReLU.

    The branches have no BN/ReLU of their own (the authors' code); the
    concatenation is normalised once.
    """

    def __init__(self, in_channels: int, out_channels: int, dilations: Sequence[int] = (1, 2, 4, 8)):
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        self.branches = nn.ModuleList(
            nn.Conv3d(in_channels, out_channels, 3, padding=d, dilation=d) for d in self.dilations
        )
        concat_channels = out_channels * len(self.dilations)
        self.concat_norm = nn.Sequential(nn.BatchNorm3d(concat_channels), nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(
            nn.Conv3d(concat_channels, out_channels, 1), nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.concat_norm(torch.cat([branch(x) for branch in self.branches], dim=1)))


class UpBlock(nn.Module):
    """ConvTranspose3d(k=2, s=2) upsampling, concatenation with the skip, then a stage block."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, block: Type[nn.Module]):
        super().__init__()
        self.upsample = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.block = block(out_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.upsample(x), skip], dim=1))


def pad_to_multiple(x: torch.Tensor, multiple: int = DOWNSAMPLING_FACTOR) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """Zero-pad the three spatial axes at their far end up to a multiple; return the original size."""
    size = tuple(int(s) for s in x.shape[2:])
    pads = [(-s) % multiple for s in size]
    if any(pads):
        # F.pad lists pairs from the last axis backwards
        x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
    return x, size  # type: ignore[return-value]


class EncoderDecoder3D(nn.Module):
    """Three-level U-shaped network; stage and bottleneck blocks are injected.

    Parameters
    ----------
    widths : (int, int, int)
        Channels of the three encoder stages (the decoder mirrors them).
    bottleneck : nn.Module
        Maps ``widths[-1]`` channels to ``bottleneck_channels`` at 1/8 resolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int],
        bottleneck: nn.Module,
        bottleneck_channels: int,
        block: Type[nn.Module],
    ):
        super().__init__()
        w1, w2, w3 = widths
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.enc1 = block(in_channels, w1)
        self.enc2 = block(w1, w2)
        self.enc3 = block(w2, w3)
        self.pool = nn.MaxPool3d(2)
        self.bottleneck = bottleneck
        self.dec3 = UpBlock(bottleneck_channels, w3, w3, block)
        self.dec2 = UpBlock(w3, w2, w2, block)
        self.dec1 = UpBlock(w2, w1, w1, block)
        self.head = nn.Conv3d(w1, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # An exported graph takes sizes that are multiples of 8 (the stitcher's tiles are);
        # padding there would bake the example's size into the graph.
        exporting = torch.onnx.is_in_onnx_export()
        if not exporting:
            x, size = pad_to_multiple(x)
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool(s1))
        s3 = self.enc3(self.pool(s2))
        y = self.bottleneck(self.pool(s3))
        y = self.dec1(self.dec2(self.dec3(y, s3), s2), s1)
        y = self.head(y)
        if exporting:
            return y
        return y[:, :, : size[0], : size[1], : size[2]]


class SpineContextResUNet(EncoderDecoder3D):
    """The paper's network: residual stages 16/32/64 and a 128-channel Context Block bottleneck."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        bottleneck_channels: int = 128,
        dilations: Sequence[int] = (1, 2, 4, 8),
    ):
        super().__init__(
            in_channels,
            out_channels,
            widths,
            ContextBlock(widths[-1], bottleneck_channels, dilations),
            bottleneck_channels,
            ResidualBlock,
        )


class ResUNet(EncoderDecoder3D):
    """Baseline without the Context Block: the bottleneck is one more residual block."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, widths: Sequence[int] = (16, 32, 64), bottleneck_channels: int = 128):
        super().__init__(
            in_channels, out_channels, widths, ResidualBlock(widths[-1], bottleneck_channels), bottleneck_channels, ResidualBlock
        )


class UNet3D(EncoderDecoder3D):
    """Baseline plain 3D U-Net: double-conv stages, no shortcuts, no Context Block."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, widths: Sequence[int] = (16, 32, 64), bottleneck_channels: int = 128):
        super().__init__(
            in_channels, out_channels, widths, DoubleConvBlock(widths[-1], bottleneck_channels), bottleneck_channels, DoubleConvBlock
        )


ARCHITECTURES = {
    "SpineContextResUNet": SpineContextResUNet,
    "ResUNet": ResUNet,
    "UNet3D": UNet3D,
}


def build_network(architecture: str = "SpineContextResUNet", **kwargs) -> EncoderDecoder3D:
    """Instantiate a network by name; ``kwargs`` go to its constructor."""
    try:
        cls = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}") from None
    return cls(**kwargs)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class WithOutputActivation(nn.Module):
    """Logits -> probabilities: sigmoid for one output channel, softmax over channels otherwise."""

    def __init__(self, network: EncoderDecoder3D):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x)
        if self.network.out_channels == 1:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)


def with_output_activation(network: nn.Module) -> nn.Module:
    return WithOutputActivation(network)
