"""The networks of the dataset-distillation field (DC / DSA / DM): the ConvNet that distils and is
evaluated, and the CIFAR-sized AlexNet, VGG-11 and ResNet-18 of its cross-architecture tables.

$ python networks.py            # prints features, logits and parameter counts of every model at 28/32/64 px

build_network(model, channels, num_classes, image_size, ...) builds any of MODELS, on `device` and in
channels_last memory format. Every network is `features` -> flatten -> linear `classifier`;
`embed(x)` returns the flattened features, (N, feature_dim), and `forward(x)` the logits.

convnet (default norm: instance): `depth` blocks of Conv3x3 (pad 1) -> norm -> ReLU -> pool 2x2,
  then the linear classifier: 128 * 4 * 4 = 2048 features at 32 px and depth 3.
alexnet (default norm: none, the DC code's AlexNet; "batch" gives its AlexNetBN): Conv5x5 128 ->
  pool -> Conv5x5 192 -> pool -> Conv3x3 256 -> Conv3x3 192 -> Conv3x3 192 -> pool, each conv followed
  by [norm] -> ReLU, max pooling 2x2, then adaptive average pooling to 4x4: 192 * 4 * 4 = 3072 features
  (the pooling is the identity at 32 px).
vgg11 (default norm: instance, the DC code's VGG11; "batch" gives its VGG11BN): Conv3x3 -> norm ->
  ReLU layers of 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M (M: max pool 2x2), then global
  average pooling: 512 features (1x1 already at 32 px).
resnet18 (default norm: instance, the DC code's ResNet18; "batch" gives its ResNet18BN): CIFAR stem
  (Conv3x3 64, stride 1, no max pool) -> norm -> ReLU, four stages of two basic blocks
  (64, 128, 256, 512 channels; stages 2-4 start with stride 2), global average pooling: 512 features.
  A basic block is relu(norm(conv(relu(norm(conv(x))))) + shortcut(x)), the shortcut a strided 1x1
  conv -> norm where the shape changes. Convolutions have a bias only when no norm follows.

As in the DC code, 28-px inputs get a larger first-layer padding (3 for 3x3 kernels, 4 for AlexNet's
5x5) so that they enter the next layers at 32 px; ResNet-18 takes them as they are (28 -> 4 px).
Instance norm is GroupNorm with one group per channel (affine), as in the DC code;
PyTorch's native kernel for it is fast on channels_last tensors (about 3x on CPU).
"""
from __future__ import annotations

import functools
import math
import warnings
from contextlib import nullcontext

import torch
import torch.nn as nn

MODELS = ("convnet", "alexnet", "vgg11", "resnet18")
DEFAULT_NORMS = {"convnet": "instance", "alexnet": "none", "vgg11": "instance", "resnet18": "instance"}
NORMS = ("instance", "batch", "none")
POOLINGS = ("avg", "max", "none")
PRECISIONS = ("fp32", "bf16")
BF16_FLAGS = {"amx_bf16", "avx512_bf16"}  # /proc/cpuinfo flags of CPUs that compute bfloat16 natively


def resolve_precision(precision: str, device: torch.device, compiled: bool = False) -> str:
    """'auto' -> bf16 where bfloat16 is fast, else fp32. Fast: CUDA GPUs that support it; CPUs with
    bfloat16 instructions (Intel AMX-BF16, or AVX512-BF16 as on AMD Zen 4/5) when the network is
    compiled (eager bfloat16 group norm is several times slower than float32 on CPU, torch.compile fuses
    it away). On the 2-core AMD EPYC with AVX512-BF16 a compiled csdm iteration at batch-real 256 takes
    0.50 s in bf16 against 0.80 s in float32. The flags are read on x86 Linux only (elsewhere: fp32).
    An explicit precision is kept; bf16 on a CPU whose flags show no bfloat16 instructions warns once
    per process (warn_emulated_bf16)."""
    if precision == "bf16" and device.type == "cpu" and cpu_flags() and not cpu_has_bf16():
        warn_emulated_bf16()
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if not compiled:
        return "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def cpu_has_bf16() -> bool:
    """Whether the CPU has bfloat16 instructions (Intel AMX-BF16, AVX512-BF16) in its flags."""
    return bool(cpu_flags() & BF16_FLAGS)


def warn_emulated_bf16() -> None:
    """The process's one warning that bf16 was asked for where PyTorch emulates it: on 2 cores of an AMD
    EPYC with AVX2 alone a compiled csdm iteration at batch-real 256 took 42.8 s in bf16 against 3.3 s in
    float32 (results/bench_precisions_epyc_avx2.json)."""
    if not warn_emulated_bf16.warned:
        warn_emulated_bf16.warned = True
        warnings.warn("--precision bf16 on a CPU without bfloat16 instructions (AMX-BF16 or AVX512-BF16): "
                      "bfloat16 is emulated here, many times slower than fp32 (13x for a csdm iteration on one "
                      "such CPU; bench.py --precisions measures yours); use --precision auto or fp32")


warn_emulated_bf16.warned = False


def cpuinfo(field: str) -> str:
    """The first value of `field` ("flags", "model name", ...) in Linux's /proc/cpuinfo; "" elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            values = [line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == field]
    except OSError:
        values = []
    return values[0] if values else ""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty elsewhere), read once a process."""
    return frozenset(cpuinfo("flags").split())


def micro_batch_size(device: torch.device, image_size: int = 32) -> int | None:
    """Images per forward call. On CPU, 64 images of 32 px keep a ConvNet's activations in cache
    (2-3x faster per image than a batch of 1024 on the 2-core machine of BENCHMARKS.md); scaled down
    for larger images. On GPU, whole batches (None)."""
    if device.type != "cpu":
        return None
    return max(4, 64 * 32 * 32 // (image_size * image_size))


def in_micro_batches(fn, x: torch.Tensor, size: int | None) -> torch.Tensor:
    """cat([fn(part) for part in x.split(size)]): the same numbers as fn(x) for per-sample networks
    (instance norm), computed piecewise; autograd then also runs the backward piecewise."""
    if size is None or len(x) <= size:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(size)])


def autocast(device: torch.device, precision: str):
    """bf16: convolutions and matrix products in bfloat16, reductions and the rest in float32
    (torch.autocast, on GPUs and on CPUs with AMX / AVX512-BF16); fp32: plain float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return nullcontext() if precision == "fp32" else torch.autocast(device.type, dtype=torch.bfloat16)


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _pool_layer(pooling: str) -> nn.Module:
    if pooling == "avg":
        return nn.AvgPool2d(2)
    if pooling == "max":
        return nn.MaxPool2d(2)
    if pooling == "none":
        return nn.Identity()
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def depth_for_size(image_size: int) -> int:
    """The field's depth for an image size: 3 up to 32 px, 4 at 64 px, 5 at 128 px."""
    return max(3, round(math.log2(max(image_size, 32))) - 2)


class _FeatureClassifier(nn.Module):
    """features -> flatten -> classifier. Subclasses set features, feature_dim and classifier."""
    features: nn.Module
    classifier: nn.Linear
    feature_dim: int

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened penultimate features, (N, feature_dim)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class ConvNet(_FeatureClassifier):
    def __init__(self, channels: int = 3, num_classes: int = 10, width: int = 128, depth: int = 3,
                 norm: str = "instance", pooling: str = "avg", image_size: int = 32):
        super().__init__()
        size = 32 if image_size == 28 else image_size
        layers: list[nn.Module] = []
        in_channels = channels
        for d in range(depth):
            padding = 3 if (d == 0 and image_size == 28) else 1
            layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=padding),
                       _norm_layer(norm, width), nn.ReLU(inplace=True), _pool_layer(pooling)]
            in_channels = width
            if pooling != "none":
                size //= 2
        if size < 1:
            raise ValueError(f"depth {depth} pools a {image_size}-px image below one pixel; lower the depth")
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)


def _conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int, padding: int, norm: str) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding),
            _norm_layer(norm, out_channels), nn.ReLU(inplace=True)]


class AlexNet(_FeatureClassifier):
    """The DC code's CIFAR-sized AlexNet (no norm by default); see the module docstring."""

    def __init__(self, channels: int = 3, num_classes: int = 10, norm: str = "none", image_size: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_norm_relu(channels, 128, 5, 4 if image_size == 28 else 2, norm), nn.MaxPool2d(2),
            *_conv_norm_relu(128, 192, 5, 2, norm), nn.MaxPool2d(2),
            *_conv_norm_relu(192, 256, 3, 1, norm),
            *_conv_norm_relu(256, 192, 3, 1, norm),
            *_conv_norm_relu(192, 192, 3, 1, norm), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4))
        self.feature_dim = 192 * 4 * 4
        self.classifier = nn.Linear(self.feature_dim, num_classes)


VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(_FeatureClassifier):
    """The DC code's CIFAR VGG-11 (instance norm by default); see the module docstring."""

    def __init__(self, channels: int = 3, num_classes: int = 10, norm: str = "instance", image_size: int = 32):
        super().__init__()
        if image_size < 32 and image_size != 28:
            raise ValueError(f"VGG-11 pools five times: it needs 28 px or at least 32 px, got {image_size}")
        layers: list[nn.Module] = []
        in_channels = channels
        for entry in VGG11_LAYERS:
            if entry == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            padding = 3 if (not layers and image_size == 28) else 1
            layers += _conv_norm_relu(in_channels, entry, 3, padding, norm)
            in_channels = entry
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        self.feature_dim = 512
        self.classifier = nn.Linear(self.feature_dim, num_classes)


class BasicBlock(nn.Module):
    """relu(norm(conv3x3(relu(norm(conv3x3_stride(x))))) + shortcut(x)); the shortcut is the identity,
    or a strided 1x1 conv -> norm where the stride or the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        bias = norm == "none"
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=bias),
            _norm_layer(norm, out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias), _norm_layer(norm, out_channels))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=bias),
                                          _norm_layer(norm, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.residual(x) + self.shortcut(x))


class ResNet18(_FeatureClassifier):
    """The DC code's CIFAR ResNet-18 (instance norm by default); see the module docstring. No layer
    depends on image_size (global pooling); it is taken for a signature like the other models'."""

    def __init__(self, channels: int = 3, num_classes: int = 10, norm: str = "instance", image_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, 64, 3, padding=1, bias=norm == "none"),
                                   _norm_layer(norm, 64), nn.ReLU(inplace=True)]
        in_channels = 64
        for stage, out_channels in enumerate((64, 128, 256, 512)):
            stride = 1 if stage == 0 else 2
            layers += [BasicBlock(in_channels, out_channels, stride, norm),
                       BasicBlock(out_channels, out_channels, 1, norm)]
            in_channels = out_channels
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        self.feature_dim = 512
        self.classifier = nn.Linear(self.feature_dim, num_classes)


def build_network(model: str, channels: int, num_classes: int, image_size: int, width: int = 128,
                  depth: int | None = None, norm: str | None = None, pooling: str = "avg",
                  device: torch.device | str | None = None) -> _FeatureClassifier:
    """One of MODELS, on `device` (if given) and in channels_last memory format. norm None: the model's
    field default (DEFAULT_NORMS: none for alexnet, instance for the others). width, depth (default
    depth_for_size(image_size)) and pooling shape the convnet only; the other models have fixed layouts."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    norm = DEFAULT_NORMS[model] if norm is None else norm
    if model == "convnet":
        depth = depth_for_size(image_size) if depth is None else depth
        net: _FeatureClassifier = ConvNet(channels, num_classes, width, depth, norm, pooling, image_size)
    else:
        net = {"alexnet": AlexNet, "vgg11": VGG11, "resnet18": ResNet18}[model](channels, num_classes, norm, image_size)
    return net.to(device=device, memory_format=torch.channels_last)


@torch.no_grad()
def reset_parameters_(net: nn.Module, generator: torch.Generator) -> nn.Module:
    """Redraw every parameter from `generator` with PyTorch's default distributions:
    conv and linear weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    (kaiming_uniform with a = sqrt(5)); norm scales 1, shifts 0. Buffers reset.
    A module with parameters of any other kind raises TypeError rather than keep its old values."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            module.weight.uniform_(-bound, bound, generator=generator)
            if module.bias is not None:
                module.bias.uniform_(-bound, bound, generator=generator)
        elif isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)):
            module.weight.fill_(1.0)
            module.bias.fill_(0.0)
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
        elif next(module.parameters(recurse=False), None) is not None:
            raise TypeError(f"reset_parameters_ does not know how to redraw {type(module).__name__}")
    return net


if __name__ == "__main__":
    for model in MODELS:
        for channels, size in ((1, 28), (3, 32), (3, 64)):
            net = build_network(model, channels, 10, size)
            x = torch.zeros(2, channels, size, size).contiguous(memory_format=torch.channels_last)
            print(f"{model:8s} {channels} x {size:2d} px: features {tuple(net.embed(x).shape)}, "
                  f"logits {tuple(net(x).shape)}, {sum(p.numel() for p in net.parameters()):,} parameters")


def cpu_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the network's state dict on the CPU."""
    return {name: value.detach().cpu().clone() for name, value in net.state_dict().items()}
