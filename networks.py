"""The ConvNet of the dataset-distillation field (DC / DSA / DM), as a feature extractor and a classifier.

$ python networks.py            # prints the layer shapes for 1 and 3 channels at 28/32/64/128 px

ConvNet(channels, num_classes, width=128, depth=3, norm="instance", pooling="avg", image_size=32):
`depth` blocks of Conv3x3 (pad 1) -> norm -> ReLU -> pool 2x2, then a linear
classifier on the flattened last block. `embed(x)` returns those flattened
features: 128 * 4 * 4 = 2048 at 32 px and depth 3. As in the DC code, 28-px
inputs get a first-layer padding of 3 so that they enter the next blocks at 32 px.

Instance norm is GroupNorm with one group per channel (affine), as in the DC code;
PyTorch's native kernel for it is fast on channels_last tensors (about 3x on CPU).
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn as nn

NORMS = ("instance", "batch", "none")
POOLINGS = ("avg", "max", "none")
PRECISIONS = ("fp32", "bf16")


def resolve_precision(precision: str, device: torch.device, compiled: bool = False) -> str:
    """'auto' -> bf16 where bfloat16 is fast, else fp32. Fast: CUDA GPUs that support it; CPUs with
    AMX-BF16 when the network is compiled (eager bfloat16 group norm is several times slower than
    float32 on CPU, torch.compile fuses it away)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if not compiled:
        return "fp32"
    try:
        with open("/proc/cpuinfo") as f:
            return "bf16" if "amx_bf16" in f.read() else "fp32"
    except OSError:
        return "fp32"


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


class ConvNet(nn.Module):
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

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features of the last block, (N, feature_dim)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


@torch.no_grad()
def reset_parameters_(net: nn.Module, generator: torch.Generator) -> nn.Module:
    """Redraw every parameter from `generator` with PyTorch's default distributions:
    conv and linear weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    (kaiming_uniform with a = sqrt(5)); norm scales 1, shifts 0. Buffers reset."""
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
    return net


if __name__ == "__main__":
    for channels in (1, 3):
        for size in (28, 32, 64, 128):
            net = ConvNet(channels, 10, depth=depth_for_size(size), image_size=size)
            x = torch.zeros(2, channels, size, size)
            print(f"{channels} x {size:3d} px, depth {depth_for_size(size)}: features {tuple(net.embed(x).shape)}, "
                  f"logits {tuple(net(x).shape)}")
