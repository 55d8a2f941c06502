"""Every method, registered once: its per-class loss, its optimiser on the pixels, and what it needs.

distill.py reads a method's row for its loss, its frequencies and its defaults, run_all.sh for the names it
accepts (the `"name": Method(` lines below), report.py for the order of a table's rows. Adding a method is
one loss in sdd.py (signature of sdd.sdd_loss, returning one loss per class, (C,)) and one row here.

The baselines (random, full) are rows too, without a loss: evaluate.py trains on real images for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sdd import mean_matching_loss, mmd_loss, ncfm_loss, sdd_loss


@dataclass(frozen=True)
class Method:
    summary: str
    loss: Callable[..., torch.Tensor] | None  # (real, real_labels, syn, syn_labels, C, **options) -> (C,)
    optimizer: str | None = None              # default optimiser on the pixels: sgd, adam or adamw
    spectral: bool = False                    # draws --num-freqs frequencies from the kernel's spectrum
    class_aware: bool = False                 # a_c from the class counts (sdd.class_weights), else 1/2
    label: str | None = None                  # how tables name its row, where the name could mislead


# in the order of a table's rows; random and full are the rulers
METHODS = {
    "random": Method("real images drawn as distillation's starting set (no learning)", None),
    "dm": Method("mean matching (DM)", mean_matching_loss, "sgd"),
    "mmd": Method("exact Gaussian-kernel MMD^2", mmd_loss, "adam"),
    "ncfm": Method("NCFM's square-root characteristic-function loss", ncfm_loss, "adam", spectral=True,
                   label="ncfm loss (DM's pipeline)"),  # NCFM as published: --preset ncfm-paper
    "sdm": Method("spectral distribution distance, a_c = 1/2 (the MMD^2 estimate)", sdd_loss, "adam",
                  spectral=True),
    "csdm": Method("class-aware SDD (CSDM)", sdd_loss, "adam", spectral=True, class_aware=True),
    "full": Method("the whole long-tailed training set", None),
}
DISTILLED = tuple(name for name, method in METHODS.items() if method.loss is not None)
SPECTRAL = tuple(name for name, method in METHODS.items() if method.spectral)


def default_lr_img(optimizer: str, method: str) -> float:
    """The pixels' learning rate, chosen on the validation split (docs/results.md, "How the defaults were
    chosen"): SGD 1 for dm (DM's rate), 500 for the kernel losses (about 1e-2 per class, too small for lr 1);
    Adam and AdamW 0.01 (NCFM's lr_img) for all."""
    if optimizer == "sgd":
        return 1.0 if method == "dm" else 500.0
    return 0.01


def per_class_loss(method: str, real: torch.Tensor, real_labels: torch.Tensor, syn: torch.Tensor,
                   syn_labels: torch.Tensor, num_classes: int, **options) -> torch.Tensor:
    """The matching loss of every class at once, (C,); the total loss is its sum.

    real (N, d) and syn (S, d) are features with integer class labels; classes may hold different numbers
    of rows (a tail class with fewer real images than the batch). options: freqs (M, d) for the spectral
    methods; alpha (C,) the amplitude weight per class (default 1/2); bandwidth sigma, a number or one per
    class (C,); projection_dtype (sdd.class_characteristic_functions)."""
    if method not in DISTILLED:
        raise ValueError(f"method must be one of {DISTILLED}, got {method!r}")
    return METHODS[method].loss(real, real_labels, syn, syn_labels, num_classes, **options)
