"""Training a network on a (small) image set and testing it: the evaluation protocols of the field.

Used by evaluate.py (networks trained from scratch on a synthetic set) and by distill.py
(the extractor pool: networks trained briefly on the long-tailed set).

Each protocol is a named row of PROTOCOLS, read by train_network:
- dm: the DC / DSA / DM evaluation (Zhao & Bilen; VICO-UoE/DatasetCondensation): SGD (lr 0.01,
  momentum 0.9, weight decay 5e-4), batch 256, lr x0.1 at half the epochs, DSA on every batch,
  1000 epochs; accuracy after the last epoch.
- ncfm: the NCFM evaluation (Wang et al., CVPR 2025; gszfwsb/NCFM, its CIFAR IPC-10 config and
  evaluation loop): AdamW (lr 1e-3, PyTorch's default weight decay 0.01: the config's 5e-4 never
  reaches the optimiser), batch 128, lr x0.5 at 1/5, 2/5, 3/5 and 4/5 of training, random-resized
  crop (scale 0.5-1, ratio 3/4-4/3, as IDC's data code) then DSA, CutMix with probability 0.5 and
  Beta(1, 1) areas, 2000 epochs, evaluated every 100 epochs; NCFM reports the best of those
  evaluations. We report the final one, and the best beside it, labelled, never to choose anything.
Passing `epochs` scales the schedule (milestones and evaluation interval are fractions of training).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_lt import dsa_augment, dsa_uniforms_per_sample
from networks import autocast, in_micro_batches, micro_batch_size
from runs import compile_or_eager, step_or_fall_back


@dataclass(frozen=True)
class Protocol:
    """How a network is trained and when it is tested; milestones and evaluations as fractions of training."""
    name: str
    epochs: int
    batch_size: int
    optimizer: str                 # "sgd" (with momentum) or "adamw"
    lr: float
    momentum: float
    weight_decay: float
    milestones: tuple[float, ...]  # lr x gamma after each of these fractions of the epochs
    gamma: float
    random_resized_crop: bool
    cutmix_prob: float             # CutMix with Beta(1, 1) box areas, on this share of the batches
    evaluations: int               # tests spread evenly over training (the last at the last epoch)


PROTOCOLS = {
    "dm": Protocol("dm", epochs=1000, batch_size=256, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4,
                   milestones=(0.5,), gamma=0.1, random_resized_crop=False, cutmix_prob=0.0, evaluations=1),
    "ncfm": Protocol("ncfm", epochs=2000, batch_size=128, optimizer="adamw", lr=1e-3, momentum=0.0,
                     weight_decay=0.01, milestones=(0.2, 0.4, 0.6, 0.8), gamma=0.5, random_resized_crop=True,
                     cutmix_prob=0.5, evaluations=20),
}


def make_optimizer(params, protocol: Protocol, epochs: int):
    """The protocol's optimiser and its step schedule (milestones in epochs, at least 1 apart from 0)."""
    if protocol.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=protocol.lr, momentum=protocol.momentum,
                                    weight_decay=protocol.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=protocol.lr, weight_decay=protocol.weight_decay)
    # floor, as DM's epochs // 2 and NCFM's k * epochs // 5 (the 1e-9 guards 0.6 * 5 = 2.9999...)
    milestones = [int(fraction * epochs + 1e-9) for fraction in protocol.milestones]
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=protocol.gamma)


def evaluation_epochs(protocol: Protocol, epochs: int) -> list[int]:
    """The epochs (1-based) after which the network is tested: `evaluations` evenly spaced, the last one last."""
    count = min(protocol.evaluations, epochs)
    return sorted({round(epochs * (k + 1) / count) for k in range(count)})


def random_resized_crop(x: torch.Tensor, generator: torch.Generator, scale=(0.5, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Per sample, a box of area s * H * W (s ~ U(scale)) and aspect r (log r ~ U(log ratio)), clipped to the
    image, at a uniform position, resized back to H x W (bilinear): torchvision's RandomResizedCrop as one
    batched affine warp."""
    n, _, h, w = x.shape
    u = torch.rand(n, 4, generator=generator, device=x.device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    box_w = (area * torch.exp(log_ratio)).sqrt().clamp(max=1.0)  # fractions of the side
    box_h = (area / torch.exp(log_ratio)).sqrt().clamp(max=1.0)
    centre_x = (1 - box_w) * (2 * u[:, 2] - 1)  # in [-1, 1] coordinates, the box inside the image
    centre_y = (1 - box_h) * (2 * u[:, 3] - 1)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = box_w, centre_x, box_h, centre_y
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def cutmix(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
    """CutMix (Yun et al. 2019) with lambda ~ Beta(1, 1) = U(0, 1): a box of area (1 - lambda) H W from a
    shuffled copy of the batch. Returns (images, labels, partner labels, weight of the own labels = the
    box-free share of the area after clipping)."""
    n, _, h, w = x.shape
    u = torch.rand(3, generator=generator, device=x.device).tolist()
    partner = torch.randperm(n, generator=generator, device=x.device)
    cut = math.sqrt(1.0 - u[0])
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy, cx = int(u[1] * h), int(u[2] * w)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[partner, :, top:bottom, left:right]
    own = 1.0 - (bottom - top) * (right - left) / (h * w)
    return mixed, y, y[partner], own


def augment_batch(x: torch.Tensor, protocol: Protocol, generator: torch.Generator) -> torch.Tensor:
    """The protocol's per-batch augmentation before CutMix: random-resized crop (ncfm), then DSA (all)."""
    if protocol.random_resized_crop:
        x = random_resized_crop(x, generator)
    return dsa_augment(x, dsa_uniforms_per_sample(len(x), generator, x.device))


def train_network(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                  protocol: Protocol = PROTOCOLS["dm"], epochs: int | None = None, progress=None,
                  precision: str = "fp32", compile: bool = False, on_evaluation=None,
                  logit_shift: torch.Tensor | None = None) -> nn.Module:
    """Train net on (images, labels) under `protocol` for `epochs` (default: the protocol's).

    The whole set stays on the device; batches are index slices of a seeded permutation; every draw
    (order, augmentation, CutMix) comes from `generator`. The loss of a batch is the mean cross-entropy
    (with CutMix: own * CE(y) + (1 - own) * CE(y_partner)). on_evaluation(epoch) is called after each of
    the protocol's evaluation epochs (the network in train mode; the callee switches as it needs).
    logit_shift (C,), if given, is added to the logits inside the loss only: with shift = tau log pi (pi the
    training set's class prior) this is the logit-adjusted loss of Menon et al. (ICLR 2021), whose minimiser's
    raw logits f(x) score the classes as if the set were balanced (tau = 1: the balanced softmax)."""
    epochs = epochs or protocol.epochs
    optimizer, scheduler = make_optimizer(net.parameters(), protocol, epochs)
    has_batch_norm = any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    summed_loss = compile_or_eager(lambda x, y: _summed_cross_entropy(net, x, y, precision, logit_shift), compile)
    mixed_loss = compile_or_eager(
        lambda x, y, partner, own: _mixed_cross_entropy(net, x, y, partner, own, precision, logit_shift), compile)
    micro = None if has_batch_norm else micro_batch_size(images.device, images.shape[-1])
    tests = set(evaluation_epochs(protocol, epochs)) if on_evaluation else set()
    net.train()
    for epoch in range(1, epochs + 1):
        permutation = torch.randperm(len(labels), generator=generator, device=images.device)
        for batch in permutation.split(protocol.batch_size):
            drawn = drawn_batch(images[batch], labels[batch], protocol, generator)
            loss = take_step(optimizer, lambda: _batch_loss(summed_loss, mixed_loss, *drawn, micro),
                             [summed_loss, mixed_loss])
        finish_epoch(scheduler, progress, loss.item())
        if epoch in tests:
            on_evaluation(epoch)
            net.train()
    return net


def take_step(optimizer: torch.optim.Optimizer, batch_loss, compiled: list[compile_or_eager]) -> torch.Tensor:
    """One update on the loss batch_loss() (a function without random draws, through the `compiled`
    functions); returns the loss. If the compiled backward pass fails, the step is taken again in eager mode
    (runs.step_or_fall_back)."""
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = batch_loss()
        loss.backward()
        optimizer.step()
        return loss
    return step_or_fall_back(step, compiled)


def finish_epoch(scheduler, progress, loss: float) -> None:
    """The schedule's step and the progress bar's update at the end of an epoch."""
    scheduler.step()
    if progress is not None:
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.3f}")


def _logits(net, x, precision, shift):
    """net(x) in float32, plus the loss's logit shift if any."""
    with autocast(x.device, precision):
        logits = net(x).float()
    return logits if shift is None else logits + shift


def _summed_cross_entropy(net, x, y, precision, shift=None):
    return F.cross_entropy(_logits(net, x, precision, shift), y, reduction="sum")


def _mixed_cross_entropy(net, x, y, partner, own, precision, shift=None):
    """CutMix's loss from one forward: own * CE_sum(logits, y) + (1 - own) * CE_sum(logits, partner)."""
    logits = _logits(net, x, precision, shift)
    return own * F.cross_entropy(logits, y, reduction="sum") + (1 - own) * F.cross_entropy(logits, partner,
                                                                                             reduction="sum")


def drawn_batch(x, y, protocol: Protocol, generator) -> tuple:
    """The batch's random draws done: (augmented images, labels, CutMix partner labels or None, own weight)."""
    x = augment_batch(x, protocol, generator)
    partner, own = None, 1.0
    if protocol.cutmix_prob > 0 and float(torch.rand(1, generator=generator, device=x.device)) < protocol.cutmix_prob:
        x, y, partner, own = cutmix(x, y, generator)
    return x.contiguous(memory_format=torch.channels_last), y, partner, own


def _batch_loss(summed_loss, mixed_loss, x, y, partner, own: float, micro: int | None) -> torch.Tensor:
    """The batch's mean loss, its forward in cache-sized micro-batches (the same gradient: no batch norm
    statistics cross them; micro is None with batch norm)."""
    size = micro or len(x)
    if partner is None:
        return sum(summed_loss(xp, yp) for xp, yp in zip(x.split(size), y.split(size))) / len(x)
    own = torch.tensor(own, device=x.device)
    return sum(mixed_loss(xp, yp, pp, own) for xp, yp, pp in zip(x.split(size), y.split(size), partner.split(size))
               ) / len(x)


@torch.no_grad()
def per_class_accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       normalise, chunk: int = 1000, precision: str = "fp32", compile: bool = False) -> torch.Tensor:
    """Accuracy of each class in percent, (C,). images are uint8; normalise maps them to float."""
    net.eval()

    def predict(x):
        with autocast(x.device, precision):
            return net(x).argmax(1)

    predict = compile_or_eager(predict, compile)
    micro = micro_batch_size(images.device, images.shape[-1])
    correct = torch.zeros(num_classes, dtype=torch.float64)
    for start in range(0, len(labels), chunk):
        x = normalise(images[start:start + chunk]).contiguous(memory_format=torch.channels_last)
        hit = (in_micro_batches(predict, x, micro) == labels[start:start + chunk]).double().cpu()
        correct += torch.bincount(labels[start:start + chunk].cpu(), weights=hit, minlength=num_classes)
    return 100 * correct / torch.bincount(labels.cpu(), minlength=num_classes).clamp_min(1)


def long_tail_groups(class_counts: list[int]) -> dict[str, list[int]]:
    """Classes in long-tail order (most images first) cut into head, medium and tail thirds:
    round(C/3) classes each for head and tail, the rest medium."""
    order = sorted(range(len(class_counts)), key=lambda c: (-class_counts[c], c))
    third = max(1, round(len(order) / 3))
    return {"head": order[:third], "medium": order[third:len(order) - third], "tail": order[len(order) - third:]}
