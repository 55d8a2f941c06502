"""ConvNet shapes, the field's layer layout, initialisation and memory-format invariance; the
cross-architecture models (AlexNet, VGG-11, ResNet-18): a training step at every image size, layouts,
norm options and deterministic initialisation."""
import math
import os
import platform
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import conv_biases_before_a_norm
from networks import MODELS, ConvNet, build_network, depth_for_size, reset_parameters_


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
    # every convolution and the classifier: weight and bias ~ U(-b, b), b = 1 / sqrt(fan_in); norms 1 and 0
    for layer in [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]:
        bound = 1 / math.sqrt(layer.weight[0].numel())
        for values in (layer.weight, layer.bias):
            assert values.abs().max() <= bound and values.abs().max() > 0.5 * bound, layer
        assert abs(layer.weight.std() - bound / math.sqrt(3)) < 0.1 * bound  # U(-b, b) has std b / sqrt(3)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 3 and all(torch.equal(m.weight, torch.ones(32)) and torch.equal(m.bias, torch.zeros(32))
                                   for m in norms)


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


@pytest.mark.parametrize("flags, expected", [({"avx2", "amx_bf16", "amx_tile"}, "bf16"),
                                              ({"avx512f", "avx512_bf16"}, "bf16"),
                                              ({"avx2", "avx512f", "avx512_vnni"}, "fp32"), (set(), "fp32")])
def test_precision_resolution(monkeypatch, flags, expected):
    """auto: bf16 on a CPU with bfloat16 instructions (AMX-BF16, AVX512-BF16) when compiled, else fp32;
    an explicit precision is kept."""
    import networks
    monkeypatch.setattr(networks, "cpu_flags", lambda: flags)
    monkeypatch.setattr(networks.warn_emulated_bf16, "warned", False)
    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto and fp32 never warn
        assert networks.resolve_precision("fp32", cpu, True) == "fp32"
        assert networks.resolve_precision("auto", cpu, compiled=False) == "fp32"  # eager bfloat16 group norm is slow
        assert networks.resolve_precision("auto", cpu, compiled=True) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 may warn (test_bf16_asked_for_on_a_cpu_that_emulates_it_warns_once)
        assert networks.resolve_precision("bf16", cpu) == "bf16"


@pytest.mark.parametrize("flags, warns", [({"fpu", "avx2", "fma"}, True), ({"fpu", "avx512f", "avx512_bf16"}, False),
                                          ({"fpu", "amx_bf16"}, False), (set(), False)])
def test_bf16_asked_for_on_a_cpu_that_emulates_it_warns_once(monkeypatch, flags, warns):
    """--precision bf16 on an x86 CPU without AMX-BF16 or AVX512-BF16 (emulated bfloat16, many times
    slower) keeps bf16 and warns once per process however often it is resolved, naming the option and the
    fix; where the flags cannot be read (empty set: not Linux) or bf16 is native, it is silent; a GPU never
    consults the CPU's flags."""
    import networks
    monkeypatch.setattr(networks, "cpu_flags", lambda: flags)
    monkeypatch.setattr(networks.warn_emulated_bf16, "warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # distill.py resolves the precision in several places
            assert networks.resolve_precision("bf16", torch.device("cpu"), compiled=True) == "bf16"
        assert networks.resolve_precision("bf16", torch.device("cuda")) == "bf16"
    messages = [str(w.message) for w in caught]
    assert len(messages) == int(warns)
    if warns:
        assert "--precision bf16" in messages[0] and "use --precision auto or fp32" in messages[0]


def test_cpu_flags_reads_this_machine():
    import networks
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo")
    assert {"fpu"} <= networks.cpu_flags() or platform.machine() != "x86_64"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("channels, size", [(3, 32), (3, 64), (1, 28)])
def test_every_model_takes_a_training_step(model, channels, size):
    net = reset_parameters_(build_network(model, channels, 5, size, width=16), torch.Generator().manual_seed(0))
    x = torch.randn(4, channels, size, size, generator=torch.Generator().manual_seed(1))
    x, y = x.contiguous(memory_format=torch.channels_last), torch.tensor([0, 1, 2, 4])
    assert net(x).shape == (4, 5) and net.embed(x).shape == (4, net.feature_dim)
    before = [p.detach().clone() for p in net.parameters()]
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    torch.optim.SGD(net.parameters(), lr=0.01).step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in net.parameters())  # every tensor takes part in the loss
    # and every tensor moved, but for the biases of convolutions right before a normalisation: it subtracts
    # them, so their gradient is zero up to rounding (and an lr-sized step of it may not change a float32)
    exempt = conv_biases_before_a_norm(net)
    assert all(not torch.equal(b, p) for b, p in zip(before, net.parameters()) if id(p) not in exempt)
    largest = max(float(p.grad.abs().max()) for p in net.parameters())
    assert all(float(p.grad.abs().max()) < 1e-5 * largest for p in net.parameters() if id(p) in exempt)
    with torch.no_grad():
        assert F.cross_entropy(net(x), y) < loss  # a small step down the gradient lowers the loss


def test_field_layouts_at_32px():
    counts = {model: sum(p.numel() for p in build_network(model, 3, 10, 32).parameters()) for model in MODELS}
    # the DC code's models; VGG-11 and ResNet-18 have the well-known CIFAR counts (instance norm's
    # affine GroupNorm has as many parameters as batch norm)
    assert counts == {"convnet": 320_010, "alexnet": 1_872_202, "vgg11": 9_231_114, "resnet18": 11_173_962}
    alexnet = build_network("alexnet", 3, 10, 32)
    assert [m.out_channels for m in alexnet.modules() if isinstance(m, nn.Conv2d)] == [128, 192, 256, 192, 192]
    assert alexnet.feature_dim == 192 * 4 * 4
    vgg = build_network("vgg11", 3, 10, 32)
    conv_widths = [m.out_channels for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert conv_widths == [64, 128, 256, 256, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.modules()) == 5
    resnet = build_network("resnet18", 3, 10, 32)
    stem = resnet.features[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in resnet.modules())
    assert sum(type(m).__name__ == "BasicBlock" for m in resnet.modules()) == 8
    assert build_network("convnet", 3, 10, 64).feature_dim == 2048  # depth 4 by default at 64 px
    assert build_network("convnet", 3, 10, 32, width=16, depth=2).feature_dim == 16 * 8 * 8


def _norm_kinds(net):
    return {type(m) for m in net.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))}


def test_norm_defaults_and_options():
    assert _norm_kinds(build_network("alexnet", 3, 10, 32)) == set()  # the DC code's AlexNet has none
    for model in ("convnet", "vgg11", "resnet18"):
        norms = [m for m in build_network(model, 3, 10, 32).modules() if isinstance(m, nn.GroupNorm)]
        assert norms and all(m.num_groups == m.num_channels and m.affine for m in norms)  # instance norm
    x = torch.randn(2, 3, 32, 32)
    for model in ("alexnet", "vgg11", "resnet18"):
        for norm, kinds in (("instance", {nn.GroupNorm}), ("batch", {nn.BatchNorm2d}), ("none", set())):
            net = build_network(model, 3, 10, 32, norm=norm)
            assert _norm_kinds(net) == kinds and net(x).shape == (2, 10)
        with pytest.raises(ValueError, match="norm"):
            build_network(model, 3, 10, 32, norm="layer")
    convs = [m for m in build_network("resnet18", 3, 10, 32, norm="none").modules() if isinstance(m, nn.Conv2d)]
    assert all(m.bias is not None for m in convs)  # without a norm the convolutions get their bias back


def test_default_models_treat_every_image_on_its_own():
    """No batch statistics in the default norms, so in_micro_batches gives the same features."""
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for model in MODELS:
        net = build_network(model, 3, 10, 32)
        assert torch.allclose(net.embed(x)[:2], net.embed(x[:2]), atol=1e-5)


def test_build_network_places_and_formats():
    for model in MODELS:
        net = build_network(model, 3, 10, 32, device="cpu")
        weights = [p for p in net.parameters() if p.dim() == 4]
        assert all(p.device.type == "cpu" and p.is_contiguous(memory_format=torch.channels_last) for p in weights)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("norm", [None, "batch"])
def test_reset_parameters_is_deterministic_for_every_model(model, norm):
    torch.manual_seed(0)
    a = build_network(model, 3, 10, 32, norm=norm)
    torch.manual_seed(1)
    b = build_network(model, 3, 10, 32, norm=norm)
    b(torch.randn(2, 3, 32, 32))  # moves batch-norm running statistics
    reset_parameters_(a, torch.Generator().manual_seed(7))
    reset_parameters_(b, torch.Generator().manual_seed(7))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    reset_parameters_(b, torch.Generator().manual_seed(8))
    changed = [not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())]
    assert sum(changed) == sum(p.dim() > 1 for p in a.parameters()) + sum(
        m.bias is not None for m in a.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))  # all but norms


def test_reset_parameters_refuses_unknown_parametrised_layers():
    with pytest.raises(TypeError, match="LayerNorm"):
        reset_parameters_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4)), torch.Generator())


def test_unknown_model_and_too_small_images_raise():
    with pytest.raises(ValueError, match="convnet.*alexnet.*vgg11.*resnet18") as error:
        build_network("resnet50", 3, 10, 32)
    assert "resnet50" in str(error.value)
    with pytest.raises(ValueError, match="VGG-11"):
        build_network("vgg11", 3, 10, 16)
