"""The network: the paper's exact parameter count, baselines from the same blocks, any input size."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from SpineContextSegLib.inference.network import (  # noqa: E402
    ContextBlock,
    ResidualBlock,
    ResUNet,
    SpineContextResUNet,
    UNet3D,
    build_network,
    count_parameters,
    with_output_activation,
)


def test_spine_context_resunet_has_the_papers_parameter_count():
    assert count_parameters(SpineContextResUNet()) == 1_703_841


def test_resunet_baseline_matches_the_papers_count_and_shares_blocks():
    model = ResUNet()
    assert count_parameters(model) == 1_424_545
    assert isinstance(model.bottleneck, ResidualBlock)
    assert isinstance(model.enc1, ResidualBlock)


def test_unet3d_uses_plain_blocks_without_shortcuts():
    model = UNet3D()
    assert not any(isinstance(m, ResidualBlock) for m in model.modules())
    assert count_parameters(model) == 1_401_969


def test_context_block_dilations_are_configurable_and_do_not_change_size():
    model = SpineContextResUNet(dilations=(1, 1, 1, 1))
    assert isinstance(model.bottleneck, ContextBlock)
    assert [b.dilation[0] for b in model.bottleneck.branches] == [1, 1, 1, 1]
    assert count_parameters(model) == 1_703_841


def test_residual_block_shortcut_only_when_widths_differ():
    assert isinstance(ResidualBlock(16, 16).shortcut, torch.nn.Identity)
    assert isinstance(ResidualBlock(1, 16).shortcut, torch.nn.Sequential)


@pytest.mark.parametrize("shape", [(8, 8, 8), (13, 21, 30), (1, 9, 17)])
def test_any_input_size_gives_an_output_of_the_same_size(shape):
    model = SpineContextResUNet(widths=(4, 8, 8), bottleneck_channels=8).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, *shape))
    assert out.shape == (2, 1) + shape


def test_padding_does_not_leak_into_the_cropped_output_region():
    """The crop-back must return the voxels aligned with the input, not a shifted window."""
    torch.manual_seed(0)
    model = SpineContextResUNet(widths=(4, 8, 8), bottleneck_channels=8).eval()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        full = model(x)
        # an input that already is a multiple of 8 is not padded: same numbers
        same = model(x.clone())
    assert torch.equal(full, same)


def test_output_activation_sigmoid_for_binary_softmax_for_multiclass():
    binary = with_output_activation(build_network("SpineContextResUNet", widths=(4, 8, 8), bottleneck_channels=8)).eval()
    multi = with_output_activation(build_network("SpineContextResUNet", out_channels=3, widths=(4, 8, 8), bottleneck_channels=8)).eval()
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        p = binary(x)
        q = multi(x)
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    assert torch.allclose(q.sum(dim=1), torch.ones(1, 8, 8, 8), atol=1e-5)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_network("Transformer")
