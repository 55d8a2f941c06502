"""Training a network on a (small) image set and testing it: the evaluation protocols of the field.

Used by evaluate.py (networks trained from scratch on a synthetic set) and by distill.py
(the extractor pool: networks trained briefly on the long-tailed set).

Each protocol is a named row of PROTOCOLS, read by train_network:
- dm: the DC / DSA / DM evaluation (Zhao & Bilen; VICO-UoE/DatasetCondensation): SGD (lr 0.01,
  momentum 0.9, weight decay 5e-4), batch 256, lr x0.1 at half the epochs, DSA on every batch,
  1000 epochs; accuracy after the last epoch.
- ncfm: the NCFM evaluation (Wang et al., CVPR 2025; gszfwsb/NCFM, its CIFAR IPC-10 config and
  evaluation loop): AdamW (lr 1e-3, PyTorch's default weight decay 0.01: the config's 5e-4 never
  reaches the optimiser), batch 128, lr x0.5 at 1/5, 2/5, 3/5 and 4/5 of training, NCFM's DiffAug
  (a horizontal flip with probability 1/2 and the colour operations for every image, then one of
  crop, scale and rotate for the batch, parameters per image; its strategy drops cutout when CutMix is
  on, and the config's random-resized crop never reaches CIFAR's transforms, nor any crop when DSA is
  on), CutMix with probability 0.5 and Beta(1, 1) areas, 2000 epochs, evaluated every 100 epochs; NCFM
  reports the best of those evaluations. We report the final one, and the best beside it, labelled,
  never to choose anything. (Until 2026-11-30 the ncfm row applied a random-resized crop and then DC's
  DSA instead of DiffAug; the README says which results used it.)
The dm row follows DC's evaluate_synset (utils.py) up to two details: DC trains epochs + 1 epochs, the
first epochs // 2 + 2 at the full rate (for 1000: 502 at 0.01, then 499 at 0.001), with a new optimiser
(momentum reset) at the drop; here epochs epochs, half at each rate, one optimiser throughout.
Passing `epochs` scales the schedule (milestones and evaluation interval are fractions of training).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_lt import dsa_augment, dsa_uniforms_for, dsa_uniforms_per_sample
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
    augmentation: str              # "dsa" (DC's: one DSA operation a batch) or "ncfm" (NCFM's DiffAug)
    cutmix_prob: float             # CutMix with Beta(1, 1) box areas, on this share of the batches
    evaluations: int               # tests spread evenly over training (the last at the last epoch)


PROTOCOLS = {
    "dm": Protocol("dm", epochs=1000, batch_size=256, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4,
                   milestones=(0.5,), gamma=0.1, augmentation="dsa", cutmix_prob=0.0, evaluations=1),
    "ncfm": Protocol("ncfm", epochs=2000, batch_size=128, optimizer="adamw", lr=1e-3, momentum=0.0,
                     weight_decay=0.01, milestones=(0.2, 0.4, 0.6, 0.8), gamma=0.5, augmentation="ncfm",
                     cutmix_prob=0.5, evaluations=20),
}

# How distill.py's extractor pool (pool.py, --pool-schedule) and the soft-label teacher (teacher.py: ncfm) are
# trained, apart from the evaluation protocols above.
# - brief: the project's first pool, DM's evaluation row cut to 3 epochs (1 at lr 0.01, 2 at 0.001): weak
#   classifiers, kept so that runs made with it resume and reproduce.
# - ncfm: NCFM's pre-training (gszfwsb/NCFM pretrain/pretrain_script.py with config/ipc10/cifar10.yaml): SGD lr
#   0.01, momentum 0.9, weight decay 5e-4, batch 128, 60 epochs, lr x0.2 after epochs 2E//3 and 5E//6 (40 and
#   50), NCFM's DiffAug per image and CutMix with probability 0.5.
POOL_SCHEDULES = {
    "brief": replace(PROTOCOLS["dm"], name="brief", epochs=3),
    "ncfm": Protocol("ncfm-pool", epochs=60, batch_size=128, optimizer="sgd", lr=0.01, momentum=0.9,
                     weight_decay=5e-4, milestones=(2 / 3, 5 / 6), gamma=0.2, augmentation="ncfm", cutmix_prob=0.5,
                     evaluations=1),
}


def make_optimizer(params, protocol: Protocol, epochs: int):
    """The protocol's optimiser and its step schedule (milestones in epochs, at least 1 apart from 0)."""
    if protocol.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=protocol.lr, momentum=protocol.momentum,
                                    weight_decay=protocol.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=protocol.lr, weight_decay=protocol.weight_decay)
    # floor, as NCFM's k * epochs // 5 (the 1e-9 guards 0.6 * 5 = 2.9999...); dm: half the epochs (the module
    # docstring says how DC's schedule differs by an epoch or two)
    milestones = [int(fraction * epochs + 1e-9) for fraction in protocol.milestones]
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=protocol.gamma)


def evaluation_epochs(protocol: Protocol, epochs: int) -> list[int]:
    """The epochs (1-based) after which the network is tested: `evaluations` evenly spaced, the last one last."""
    count = min(protocol.evaluations, epochs)
    return sorted({round(epochs * (k + 1) / count) for k in range(count)})


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


NCFM_GEOMETRIC = ("crop", "scale", "rotate")  # DiffAug's per-batch choice on CIFAR (cutout dropped for CutMix)


def augment_batch(x: torch.Tensor, protocol: Protocol, generator: torch.Generator) -> torch.Tensor:
    """The protocol's augmentation of a batch before CutMix. dsa: one DSA operation for the batch, parameters
    per image (DC's DiffAugment). ncfm: NCFM's DiffAug (batch=False): every image flipped with probability 1/2
    and colour-jittered (brightness, saturation, contrast), then one of crop, scale and rotate for the batch,
    parameters per image."""
    if protocol.augmentation == "dsa":
        return dsa_augment(x, dsa_uniforms_per_sample(len(x), generator, x.device))
    pick = float(torch.rand(1, generator=generator, device=x.device))
    for op in ("flip", "color", NCFM_GEOMETRIC[min(int(pick * len(NCFM_GEOMETRIC)), len(NCFM_GEOMETRIC) - 1)]):
        x = dsa_augment(x, dsa_uniforms_for(op, len(x), generator, x.device))
    return x


@dataclass(frozen=True)
class SoftTargets:
    """A teacher's soft labels for train_network: probabilities(x) = softmax(logits(x) / temperature), with
    logits(x) the teacher's float32 logits of the augmented batch x (computed without gradient)."""
    logits: Callable[[torch.Tensor], torch.Tensor]
    temperature: float

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.softmax(self.logits(x) / self.temperature, dim=1)


def class_log_prior(class_counts, device=None) -> torch.Tensor:
    """log pi_c = log(n_c / sum n) of a training set's class counts, (C,): the logit-adjusted loss's shift."""
    counts = torch.as_tensor(class_counts, dtype=torch.float32, device=device)
    return torch.log(counts / counts.sum())


def soft_label_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 sum_i KL(p_i || softmax(s_i / T)) = T^2 sum_i sum_c [p_ic log p_ic - p_ic log softmax(s_i / T)_c],
    summed over the batch: the knowledge-distillation loss of Hinton et al. (the T^2 keeps the gradient's
    scale across temperatures) as SRe2L and RDED evaluate with it. The first term is constant in s, so for a
    one-hot p at T = 1 the value and the gradient are the cross-entropy's."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    return temperature ** 2 * (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_q).sum()


def train_network(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                  protocol: Protocol = PROTOCOLS["dm"], epochs: int | None = None, progress=None,
                  precision: str = "fp32", compile: bool = False, on_evaluation=None,
                  logit_shift: torch.Tensor | None = None, soft_targets: SoftTargets | None = None) -> nn.Module:
    """Train net on (images, labels) under `protocol` for `epochs` (default: the protocol's).

    The whole set stays on the device; batches are index slices of a seeded permutation; every draw
    (order, augmentation, CutMix) comes from `generator`. The loss of a batch is the mean cross-entropy
    (with CutMix: own * CE(y) + (1 - own) * CE(y_partner)). on_evaluation(epoch) is called after each of
    the protocol's evaluation epochs (the network in train mode; the callee switches as it needs).
    logit_shift (C,), if given, is added to the logits inside the loss only: with shift = tau log pi (pi the
    training set's class prior) this is the logit-adjusted loss of Menon et al. (ICLR 2021), whose minimiser's
    raw logits f(x) score the classes as if the set were balanced (tau = 1: the balanced softmax).
    soft_targets, if given, replaces the labels: the teacher labels each batch after its augmentation and
    CutMix (the very images the network sees; the draws are those of hard-label training) and the loss is
    soft_label_loss's mean over the batch."""
    epochs = epochs or protocol.epochs
    optimizer, scheduler = make_optimizer(net.parameters(), protocol, epochs)
    has_batch_norm = any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    micro = None if has_batch_norm else micro_batch_size(images.device, images.shape[-1])
    batch_loss = batch_loss_function(net, precision, compile, micro, logit_shift, soft_targets)
    tests = set(evaluation_epochs(protocol, epochs)) if on_evaluation else set()
    net.train()
    for epoch in range(1, epochs + 1):
        permutation = torch.randperm(len(labels), generator=generator, device=images.device)
        for batch in permutation.split(protocol.batch_size):
            drawn = drawn_batch(images[batch], labels[batch], protocol, generator)
            loss = take_step(optimizer, batch_loss.bind(drawn), batch_loss.compiled)
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


@dataclass
class BatchLoss:
    """A drawn batch's mean loss, its forward in cache-sized micro-batches (the same gradient: no batch norm
    statistics cross them; micro is None with batch norm): hard labels through the summed and CutMix-mixed
    cross-entropies, or, with soft_targets, the soft-label loss against the teacher's probabilities of the
    batch (taken once, before the step). bind(drawn) is the step's loss function; compiled, its compiled
    parts (for the eager fall-back)."""
    summed: Callable
    mixed: Callable
    soft: Callable
    micro: int | None
    soft_targets: SoftTargets | None

    @property
    def compiled(self) -> list:
        return [self.soft] if self.soft_targets is not None else [self.summed, self.mixed]

    def bind(self, drawn: tuple) -> Callable[[], torch.Tensor]:
        x, y, partner, own = drawn
        size = self.micro or len(x)
        if self.soft_targets is not None:
            probs = in_micro_batches(self.soft_targets.probabilities, x, self.micro)
            return lambda: sum(self.soft(xp, pp) for xp, pp in zip(x.split(size), probs.split(size))) / len(x)
        if partner is None:
            return lambda: sum(self.summed(xp, yp) for xp, yp in zip(x.split(size), y.split(size))) / len(x)
        own = torch.tensor(own, device=x.device)
        return lambda: sum(self.mixed(xp, yp, pp, own) for xp, yp, pp in
                           zip(x.split(size), y.split(size), partner.split(size))) / len(x)


def batch_loss_function(net, precision: str, compile: bool, micro: int | None, logit_shift=None,
                        soft_targets: SoftTargets | None = None) -> BatchLoss:
    """train_network's BatchLoss for net (see BatchLoss), its loss functions compiled if asked."""
    temperature = soft_targets.temperature if soft_targets is not None else 1.0
    return BatchLoss(
        summed=compile_or_eager(lambda x, y: _summed_cross_entropy(net, x, y, precision, logit_shift), compile),
        mixed=compile_or_eager(
            lambda x, y, partner, own: _mixed_cross_entropy(net, x, y, partner, own, precision, logit_shift), compile),
        soft=compile_or_eager(
            lambda x, probs: soft_label_loss(_logits(net, x, precision, None), probs, temperature), compile),
        micro=micro, soft_targets=soft_targets)


@torch.no_grad()
def per_class_accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       normalise, chunk: int = 1000, precision: str = "fp32", compile: bool = False) -> torch.Tensor:
    """Accuracy of each class in percent, (C,). images are uint8; normalise maps them to float. The features
    follow `precision`, the linear classifier runs in float32: bfloat16 logits (8 significant bits) would tie
    for close classes, and argmax gives a tie to the lower class index, in long-tail order the head's.
    (Evaluations until 2026-11-30 took the argmax of the network's logits under autocast.)"""
    net.eval()

    def predict(x):
        with autocast(x.device, precision):
            features = net.embed(x)
        return net.classifier(features.float()).argmax(1)

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
