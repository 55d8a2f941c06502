"""The soft-label teacher of evaluate.py --labels soft: one network trained on the long-tailed training split.

With soft labels the student is trained on what a teacher says of each augmented image instead of the
image's class (SRe2L, RDED, RLDD, ADSA; training.SoftTargets). The teacher here is the field's ConvNet-3
(width 128, instance norm, average pooling), trained once per data set, imbalance factor and data seed on
the whole long-tailed training split (never the validation split, never the test split) and cached:
- loss balanced (the default): the logit-adjusted cross-entropy of Menon et al. (ICLR 2021) with tau = 1,
  CE(f(x) + log pi, y), pi the split's class prior (the balanced softmax). Its minimiser's raw logits f
  score the classes as if the training set were balanced, and the soft labels are softmax(f(x) / T) from
  those raw logits: the prior is added inside the loss only, never to the labels.
- loss ce: the plain cross-entropy CE(f(x), y), whose logits carry the prior (head-biased), for the ablation.
- schedule: training.POOL_SCHEDULES["ncfm"], NCFM's pre-training of its extractor pool (SGD lr 0.01,
  momentum 0.9, weight decay 5e-4, batch 128, 60 epochs, lr x0.2 after epochs 40 and 50, DiffAug per image,
  CutMix with probability 0.5); --teacher-epochs scales it.
- cache: <cache>/teacher-<digest>.pt ({"state_dict", "record": JSON text}, read with weights_only=True), the digest
  over the SHA-256 of the training images and labels and every setting above, so another subset, seed or
  loss is another teacher. The record holds its test accuracy per class and by long-tail third (the
  ceiling row of the soft-label tables), its training seconds, and where and at which commit it was trained.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn as nn

from data_lt import UsageError, counter_seed
from networks import autocast, build_network, cpu_state, depth_for_size, reset_parameters_
from runs import atomic_save, compile_or_eager, environment
from training import (POOL_SCHEDULES, SoftTargets, class_log_prior, long_tail_groups, per_class_accuracy,
                      train_network)

TEACHER_LOSSES = ("balanced", "ce")
TEACHER_SCHEDULE = "ncfm"
STREAM_TEACHER = 22  # the teacher's draws: counter_seed(data seed, STREAM_TEACHER)


def teacher_network(data, device) -> nn.Module:
    """The field's ConvNet-3 for the data set (depth from the image size), on device, not yet initialised."""
    return build_network("convnet", data.channels, data.num_classes, data.image_size, 128,
                         depth_for_size(data.image_size), "instance", "avg", device)


def teacher_digest(data, loss: str, epochs: int, seed: int, precision: str) -> str:
    """16 hex digits naming the teacher: the training split's pixels and labels, class names, loss, schedule,
    epochs, seed and precision."""
    content = hashlib.sha256(memoryview(data.train_images.contiguous().numpy()))
    content.update(memoryview(data.train_labels.contiguous().numpy()))
    key = (tuple(data.class_names), content.hexdigest(), loss, TEACHER_SCHEDULE, epochs, seed, precision)
    return hashlib.sha256(repr(key).encode()).hexdigest()[:16]


def teacher_path(cache: Path, data, loss: str, epochs: int, seed: int, precision: str) -> Path:
    return Path(cache) / f"teacher-{teacher_digest(data, loss, epochs, seed, precision)}.pt"


def train_teacher(data, loss: str, epochs: int, seed: int, device, precision: str, compile: bool) -> nn.Module:
    """A ConvNet trained on data's long-tailed training split alone under the teacher schedule: the
    logit-adjusted loss (shift log pi) for loss "balanced", the cross-entropy for "ce"."""
    if loss not in TEACHER_LOSSES:
        raise ValueError(f"teacher loss must be one of {TEACHER_LOSSES}, got {loss!r}")
    generator = torch.Generator(device=device).manual_seed(counter_seed(seed, STREAM_TEACHER))
    net = reset_parameters_(teacher_network(data, device), generator)
    images, labels = data.normalise(data.train_images.to(device)), data.train_labels.to(device)
    shift = class_log_prior(data.class_counts, device) if loss == "balanced" else None
    return train_network(net, images, labels, generator, POOL_SCHEDULES[TEACHER_SCHEDULE], epochs,
                         precision=precision, compile=compile, logit_shift=shift)


def teacher_record(net: nn.Module, data, loss: str, epochs: int, seed: int, precision: str, seconds: float,
                   compile: bool = False) -> dict:
    """What results.json says of a teacher: its settings, its test accuracy (overall, per class, by long-tail
    third: the soft-label tables' ceiling row), its training seconds and where it was trained."""
    device = next(net.parameters()).device
    per_class = per_class_accuracy(net, data.test_images.to(device), data.test_labels.to(device),
                                   data.num_classes, data.normalise, precision=precision, compile=compile)
    counts = torch.bincount(data.test_labels, minlength=data.num_classes).double()
    record = {"loss": loss, "schedule": TEACHER_SCHEDULE, "epochs": epochs, "seed": seed, "precision": precision,
              "model": "convnet", "trained_on": f"the long-tailed training split ({len(data.train_labels)} images)",
              "test_acc": float((per_class * counts).sum() / counts.sum()), "per_class": per_class.tolist(),
              "seconds": round(seconds, 1), "environment": environment()}
    for name, classes in long_tail_groups(data.class_counts).items():
        record[name] = float(per_class[classes].mean()) if classes else float("nan")
    return record


def load_or_train_teacher(cache: Path, data, loss: str, epochs: int, seed: int, device, precision: str,
                          compile: bool, log=print) -> tuple[nn.Module, dict]:
    """(teacher network on device, its record): read from the cache, or trained and written there."""
    path = teacher_path(cache, data, loss, epochs, seed, precision)
    net = teacher_network(data, device)
    if path.exists():
        try:
            saved = torch.load(path, map_location=device, weights_only=True)
            net.load_state_dict(saved["state_dict"])
            record = json.loads(saved["record"])
        except Exception as error:  # a truncated copy, another format, another network's weights
            raise UsageError(f"--teacher-cache: {path} cannot be read as a teacher ({type(error).__name__}); "
                             f"delete it to train the teacher again")
        log(f"teacher: {path} ({loss} loss, test acc {record['test_acc']:.2f})")
        return net, record | {"file": str(path), "sha256": weights_sha256(net)}
    log(f"teacher: training a ConvNet on the {len(data.train_labels)} training images ({loss} loss, {epochs} "
        f"epochs of the {TEACHER_SCHEDULE} schedule) -> {path}")
    start = time.perf_counter()
    net = train_teacher(data, loss, epochs, seed, device, precision, compile)
    record = teacher_record(net, data, loss, epochs, seed, precision, time.perf_counter() - start, compile)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"state_dict": cpu_state(net), "record": json.dumps(record)}, path)
    log(f"teacher trained in {record['seconds']:.0f} s: test acc {record['test_acc']:.2f} (head {record['head']:.2f}"
        f", medium {record['medium']:.2f}, tail {record['tail']:.2f})")
    return net, record | {"file": str(path), "sha256": weights_sha256(net)}


def weights_sha256(net: nn.Module) -> str:
    """SHA-256 of the network's parameters and buffers, in state-dict order: which teacher labelled a network."""
    digest = hashlib.sha256()
    for value in net.state_dict().values():
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def soft_targets(net: nn.Module, temperature: float, precision: str, compile: bool) -> SoftTargets:
    """The teacher's soft labels: softmax(f(x) / T) of its raw logits f on each augmented batch, the features
    under `precision`, the classifier in float32 (as per_class_accuracy)."""
    net.eval()

    def logits(x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, precision):
            features = net.embed(x)
        return net.classifier(features.float())

    return SoftTargets(compile_or_eager(logits, compile), temperature)
