"""K ConvNets trained as one: every kernel call does the work of K networks.

Evaluation trains several ConvNets from scratch on the same small set. Stacking K networks along the
channel axis makes one call do K networks' work, with results that equal K separate trainings up to
floating-point rounding. On a CPU it does not pay: on the 2-core AMD EPYC (bf16, compiled, 5 networks,
400 images of 32 px) an epoch of the five takes 1.26 s stacked against 0.98 s one at a time, both close to
the CPU's matmul rate (BENCHMARKS.md), so evaluate.py stacks only on GPUs, where a ConvNet's kernels on 256
small images are launch-bound and fewer, larger calls should pay (not measured on a GPU yet; --stacked
forces it on a CPU).

- StackedConvNet: the K networks' layers side by side. Convolutions are grouped (groups=K) over
  channel-concatenated inputs (B, K*C, H, W): output channels k*width..(k+1)*width-1 see only network
  k's input channels. Instance norm (GroupNorm with one group per channel) over K*width channels is
  each network's instance norm; ReLU and pooling act per channel; the K linear classifiers are one
  batched product. forward(x) returns (K, B, classes). Batch norm would stack the same way (its
  statistics are per channel) but its running statistics would have to travel too: left to the
  one-at-a-time path (ValueError here).
- stack_networks(nets) builds the stack from K ConvNets of one architecture and copies their parameters
  in; load_networks_(stack, nets) copies them in again; extract_network_(stack, k, net) writes network
  k back into a plain ConvNet (networks.ConvNet), bit for bit, so that testing is unchanged.
- train_networks_stacked(nets, images, labels, generators, ...) trains the K networks in lockstep with
  exactly the draws of K calls of training.train_network (each network's generator in the same order:
  the epoch's permutation, then per batch the protocol's crop, DSA and CutMix draws). The loss is the sum
  over networks of each network's mean batch loss; the parameters are disjoint, so each network gets its
  own gradient, and since SGD (momentum, weight decay) and AdamW are elementwise, one optimiser over the
  stacked parameters is K optimisers (tests/test_stacked.py checks the trained parameters against K
  separate trainings under both protocols).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from networks import ConvNet, autocast, micro_batch_size
from runs import compile_or_eager
from training import PROTOCOLS, Protocol, drawn_batch, evaluation_epochs, finish_epoch, make_optimizer, take_step

_ELEMENTWISE = (nn.ReLU, nn.AvgPool2d, nn.MaxPool2d, nn.Identity)


def can_stack(net: nn.Module) -> bool:
    """Whether net is a ConvNet whose layers all have a stacked form (no batch norm)."""
    return isinstance(net, ConvNet) and all(
        isinstance(m, (nn.Conv2d, _ELEMENTWISE)) or (isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels)
        for m in net.features)


class StackedConvNet(nn.Module):
    """count ConvNets of the same architecture as one module; see the module docstring.
    Input (B, count * channels, H, W), network k's images in channels k*channels..(k+1)*channels-1;
    output (count, B, classes)."""

    def __init__(self, template: ConvNet, count: int):
        super().__init__()
        if not can_stack(template):
            raise ValueError("only ConvNets with instance norm or no norm stack; train batch-norm networks one "
                             "at a time")
        self.count = count
        layers: list[nn.Module] = []
        for m in template.features:
            if isinstance(m, nn.Conv2d):
                layers.append(nn.Conv2d(count * m.in_channels, count * m.out_channels, m.kernel_size, m.stride,
                                        m.padding, m.dilation, groups=count * m.groups, bias=m.bias is not None,
                                        padding_mode=m.padding_mode))
            elif isinstance(m, nn.GroupNorm):
                layers.append(nn.GroupNorm(count * m.num_groups, count * m.num_channels, m.eps, m.affine))
            else:
                layers.append(copy.deepcopy(m))
        self.features = nn.Sequential(*layers)
        self.feature_dim = template.feature_dim
        classifier = template.classifier
        self.classifier_weight = nn.Parameter(torch.empty(count, classifier.out_features, classifier.in_features))
        self.classifier_bias = nn.Parameter(torch.empty(count, classifier.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x).reshape(len(x), self.count, self.feature_dim)
        return torch.einsum("bkf,kof->kbo", features, self.classifier_weight) + self.classifier_bias.unsqueeze(1)


def _pairs(stack: StackedConvNet, net: ConvNet):
    """(stacked parameter, network's parameter, stacking dimension) for every parameter."""
    for big, small in zip(stack.features, net.features):
        if type(big) is not type(small):
            raise ValueError(f"the stack's {type(big).__name__} faces the network's {type(small).__name__}: "
                             f"not the same architecture")
        for name, param in small.named_parameters(recurse=False):
            yield getattr(big, name), param, 0
    yield stack.classifier_weight, net.classifier.weight, None
    yield stack.classifier_bias, net.classifier.bias, None


def _slice(big: torch.Tensor, small: torch.Tensor, dim, k: int) -> torch.Tensor:
    if dim is None:  # stacked along a new leading axis
        return big[k]
    return big.narrow(dim, k * small.shape[dim], small.shape[dim])


@torch.no_grad()
def load_networks_(stack: StackedConvNet, nets: list[ConvNet]) -> StackedConvNet:
    """Copy the parameters of nets (len = stack.count) into the stack."""
    if len(nets) != stack.count:
        raise ValueError(f"the stack holds {stack.count} networks, got {len(nets)}")
    for k, net in enumerate(nets):
        for big, small, dim in _pairs(stack, net):
            _slice(big, small, dim, k).copy_(small)
    return stack


@torch.no_grad()
def extract_network_(stack: StackedConvNet, k: int, net: ConvNet) -> ConvNet:
    """Write network k of the stack into net (a ConvNet of the stacked architecture); returns net."""
    for big, small, dim in _pairs(stack, net):
        small.copy_(_slice(big, small, dim, k))
    return net


def stack_networks(nets: list[ConvNet]) -> StackedConvNet:
    """A StackedConvNet holding nets' parameters, on their device, in channels_last memory format."""
    param = next(nets[0].parameters())
    stack = StackedConvNet(nets[0], len(nets)).to(device=param.device, dtype=param.dtype,
                                                   memory_format=torch.channels_last)
    return load_networks_(stack, nets)


def stacked_micro_batch_size(device: torch.device, image_size: int, count: int) -> int | None:
    """Images per forward call of a stack of `count` networks on CPU: networks.micro_batch_size's budget
    over 2 * count, at least 4 (5 networks at 32 px: 6 images, 30 network-images a call; on the 2-core AMD
    EPYC, 4 to 8 images ran 1.2x (compiled) to 1.6x (eager) faster an epoch than 64); whole batches on
    GPUs (None)."""
    micro = micro_batch_size(device, image_size)
    return None if micro is None else max(4, micro // (2 * count))


def train_networks_stacked(nets: list[ConvNet], images: torch.Tensor, labels: torch.Tensor,
                           generators: list[torch.Generator], protocol: Protocol = PROTOCOLS["dm"],
                           epochs: int | None = None, precision: str = "fp32", compile: bool = False,
                           on_evaluation=None, progress=None, micro: int | None = 0) -> list[ConvNet]:
    """Train nets[k] with generators[k] as training.train_network(nets[k], images, labels, generators[k],
    protocol, epochs, ...) would, all K together (see the module docstring). The trained parameters are
    written back into nets, which are returned. on_evaluation(epoch) is called after each of the protocol's
    evaluation epochs with nets holding that epoch's parameters (the callee tests them as it likes).
    micro: images per forward call (0: stacked_micro_batch_size; None: whole batches)."""
    if len(nets) != len(generators):
        raise ValueError(f"{len(nets)} networks but {len(generators)} generators")
    epochs = epochs or protocol.epochs
    count, device = len(nets), images.device
    stack = stack_networks(nets)
    optimizer, scheduler = make_optimizer(stack.parameters(), protocol, epochs)
    micro = stacked_micro_batch_size(device, images.shape[-1], count) if micro == 0 else micro
    # static graphs, one per batch size (the full batch and the epoch's last one): the dynamic-shape graph
    # that torch.compile makes at the second size failed in its backward pass on an NVIDIA H200 under torch
    # 2.11 (an Inductor stride assertion on the stacked logits)
    summed_loss = compile_or_eager(lambda x, y, partner, own: _summed_losses(stack, x, y, partner, own, precision),
                                   compile, dynamic=False)
    tests = set(evaluation_epochs(protocol, epochs)) if on_evaluation else set()
    stack.train()
    for epoch in range(1, epochs + 1):
        batches = [torch.randperm(len(labels), generator=g, device=device).split(protocol.batch_size)
                   for g in generators]
        for step in range(len(batches[0])):
            drawn = [drawn_batch(images[network_batches[step]], labels[network_batches[step]], protocol, g)
                     for g, network_batches in zip(generators, batches)]
            x = torch.cat([x for x, _, _, _ in drawn], 1).contiguous(memory_format=torch.channels_last)
            y = torch.stack([y for _, y, _, _ in drawn])
            partner = torch.stack([y if partner is None else partner for _, y, partner, _ in drawn])
            own = torch.tensor([own for _, _, _, own in drawn], device=device, dtype=torch.float32)
            loss = take_step(optimizer, lambda: _mean_loss(summed_loss, x, y, partner, own, micro), [summed_loss])
        finish_epoch(scheduler, progress, loss.item() / count)
        if epoch in tests:
            for k, net in enumerate(nets):
                extract_network_(stack, k, net)
            on_evaluation(epoch)
    for k, net in enumerate(nets):
        extract_network_(stack, k, net)
    return nets


def _mean_loss(summed_loss, x, y, partner, own, micro: int | None) -> torch.Tensor:
    """The stack's loss, the sum over networks of each one's mean batch loss, its forward in micro-batches."""
    size = micro or len(x)
    return sum(summed_loss(xp, yp, pp, own) for xp, yp, pp in
               zip(x.split(size), y.split(size, 1), partner.split(size, 1))) / len(x)


def _summed_losses(stack, x, y, partner, own, precision):
    """sum over networks k of own_k * CE_sum(logits_k, y_k) + (1 - own_k) * CE_sum(logits_k, partner_k)."""
    with autocast(x.device, precision):
        logits = stack(x)
    count, batch, classes = logits.shape
    logits = logits.float().reshape(count * batch, classes)
    own_loss = F.cross_entropy(logits, y.reshape(-1), reduction="none").view(count, batch).sum(1)
    partner_loss = F.cross_entropy(logits, partner.reshape(-1), reduction="none").view(count, batch).sum(1)
    return (own * own_loss + (1 - own) * partner_loss).sum()
