"""ConvNet shapes, the field's layer layout, initialisation and memory-format invariance."""
import math

import pytest
import torch
import torch.nn as nn

from networks import ConvNet, depth_for_size, reset_parameters_


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 64])
def test_output_shapes(channels, size):
    depth = depth_for_size(size)
    net = ConvNet(channels, num_classes=7, width=16, depth=depth, image_size=size)
    x = torch.randn(2, channels, size, size)
    assert net(x).shape == (2, 7)
    spatial = (32 if size == 28 else size) // 2 ** depth
    assert net.embed(x).shape == (2, 16 * spatial * spatial) and net.feature_dim == 16 * spatial * spatial


def test_field_layout_at_32px():
    net = ConvNet(3, 10)  # width 128, depth 3, instance norm, average pooling
    assert net.feature_dim == 2048
    kinds = [type(m) for m in net.features]
    assert kinds == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.AvgPool2d] * 3
    norm = net.features[1]
    assert norm.num_groups == norm.num_channels == 128 and norm.affine  # instance norm
    assert [depth_for_size(s) for s in (28, 32, 64, 128)] == [3, 3, 4, 5]
    assert ConvNet(3, 10, depth=5, image_size=128).feature_dim == 2048


def test_norm_and_pooling_options():
    x = torch.randn(3, 3, 32, 32)
    for norm in ("instance", "batch", "none"):
        for pooling in ("avg", "max"):
            assert ConvNet(3, 10, width=8, norm=norm, pooling=pooling)(x).shape == (3, 10)
    assert ConvNet(3, 10, width=8, depth=2, pooling="none").feature_dim == 8 * 32 * 32
    with pytest.raises(ValueError, match="norm"):
        ConvNet(norm="layer")
    with pytest.raises(ValueError, match="depth"):
        ConvNet(depth=6)  # 32 px pooled six times


def test_reset_parameters_follows_pytorch_defaults_and_the_generator():
    net = ConvNet(3, 10, width=32)
    reset_parameters_(net, torch.Generator().manual_seed(0))
    a = [p.clone() for p in net.parameters()]
    reset_parameters_(net, torch.Generator().manual_seed(0))
    assert all(torch.equal(p, q) for p, q in zip(a, net.parameters()))
    reset_parameters_(net, torch.Generator().manual_seed(1))
    assert not torch.equal(a[0], next(net.parameters()))
    conv = net.features[0]
    bound = 1 / math.sqrt(3 * 3 * 3)
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert abs(conv.weight.std() - bound / math.sqrt(3)) < 0.1 * bound  # U(-b, b) has std b / sqrt(3)
    assert torch.equal(net.features[1].weight, torch.ones(32))


def test_channels_last_gives_the_same_features():
    net = reset_parameters_(ConvNet(3, 10, width=32), torch.Generator().manual_seed(0))
    x = torch.randn(4, 3, 32, 32)
    plain = net.embed(x)
    fast = net.to(memory_format=torch.channels_last).embed(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(plain, fast, atol=1e-4, rtol=1e-4)


def test_instance_norm_makes_features_independent_of_the_batch():
    net = ConvNet(3, 10, width=16)
    x = torch.randn(6, 3, 32, 32)
    assert torch.allclose(net.embed(x)[:2], net.embed(x[:2]), atol=1e-5)


def test_fast_paths_agree_with_the_plain_forward():
    """channels_last + torch.compile (float32) matches the eager NCHW forward to float tolerance;
    bfloat16 autocast matches it to bfloat16's ~3 significant digits."""
    from networks import autocast
    net = reset_parameters_(ConvNet(3, 10, width=16), torch.Generator().manual_seed(0)).requires_grad_(False)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = net.embed(x)
    fast = net.to(memory_format=torch.channels_last)
    compiled = torch.compile(fast.embed)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(compiled(x_cl), plain, atol=1e-4, rtol=1e-4)
    with autocast(torch.device("cpu"), "bf16"):
        half = compiled(x_cl).float()
    assert (half - plain).norm() / plain.norm() < 2e-2


def test_precision_resolution():
    from networks import resolve_precision
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu, True) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu, compiled=False) == "fp32"  # eager bfloat16 group norm is slow on CPU
    with open("/proc/cpuinfo") as f:
        amx = "amx_bf16" in f.read()
    assert resolve_precision("auto", cpu, compiled=True) == ("bf16" if amx else "fp32")
