"""Distill a long-tailed data set into IPC synthetic images per class by distribution matching.

$ python distill.py --method csdm --dataset cifar10 --imbalance-factor 200 --ipc 10 --out runs/csdm
$ python distill.py --method dm --dataset cifar10 --data-dir data/cifar10 --iterations 200 --batch-real 64 \
      --device cpu --out runs/dm
$ python distill.py ... --out runs/csdm --resume               # continue a stopped run
$ torchrun --nproc_per_node=4 distill.py --method csdm ...      # classes sharded across 4 processes
$ python distill.py --method dm --factor 1 --optimizer sgd --lr-img 1 --dsa-pairing class \
      --batch-real 256 --iterations 20000 --out runs/dm-paper   # DM exactly as its paper ran it

The DM loop (Zhao & Bilen, "Dataset Condensation with Distribution Matching", WACV 2023), in the
project's words in docs/method.md: the synthetic images start from real images of their class; every
iteration draws a fresh randomly initialised ConvNet, a batch of up to --batch-real real images of every
class, siamese DSA transformations shared by the real and the synthetic images of a class
(--dsa-pairing), and --num-freqs frequencies from the kernel's spectrum; it embeds both batches,
computes the matching loss of every class in one call (methods.per_class_loss), sums it over classes and
takes one optimiser step on the synthetic pixels. distill() reads as those steps.

With --extractor pool the extractor is one of a pool of briefly trained ConvNets blended with its
initialisation (NCFM), and --calibration lambda adds NCFM's cross-entropy calibration term: the same
pool network, fully trained, classifies the augmented synthetic images, and the loss gains
lambda * sum_c mean_{i in c} CE(f_trained(x_i), c).

Methods: csdm (class-aware SDD), sdm (SDD, alpha = 1/2), ncfm (NCFM's square-root CF loss), mmd (exact
Gaussian MMD^2), dm (mean matching).

The output folder holds synthetic.pt (images, labels, mean, std, class_names, class_counts, config),
synthetic.png (one row per class), init.png (the real initialisation), init_vs_final.png, loss.csv and
loss.png, config.json, run.json (command line, commit, versions, device, wall time, and the stretches:
which iterations each sitting of a resumed run distilled, where and at which commit) and a README.md of
the run. Read synthetic.pt with torch.load(path, weights_only=True).

A checkpoint (checkpoint.pt: images, optimiser state, iteration, loss history, config, stretches) is written
atomically every --ckpt-every iterations and when the run is stopped by SIGINT or SIGTERM; --resume
continues from it and, on the same kind of device, ends with the same synthetic set as an uninterrupted run
(every random draw is a function of the seed and the iteration: there is no generator state to save). The
draws come from torch.Generator on the device, which gives other numbers on CUDA than on a CPU: a run
resumed on another kind says so and continues with other draws (run.json records each sitting's device).

When a class has fewer real images than --ipc (IPC 50 at IF 200), its first n_c synthetic images are
its n_c real images and each further one repeats one of them under a seeded geometric DSA
transformation, so that no two start identical. When it has fewer than --batch-real, every iteration
uses all of them.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from data_lt import (DSA_PAIRINGS, LongTailedData, RealBatchSampler, UsageError, add_data_arguments, cache_dir,
                     check_factor, counter_seed, counter_uniform, decode, dsa_augment, dsa_uniforms_siamese,
                     finite_float, initial_synthetic, load_from_args)
from networks import (NORMS, POOLINGS, PRECISIONS, autocast, build_network, depth_for_size, in_micro_batches,
                      micro_batch_size, reset_parameters_, resolve_precision)
from runs import (atomic_save, atomic_write_text, check_out_is_folder, check_positive, compile_or_eager, environment,
                  FORMAT_VERSION, keep_freed_memory, OneLineParser, PARTIAL_EVALUATION, plot_loss, plot_side_by_side,
                  Processes, processor_name, Progress, resolve_device, run_script, save_grid, start_processes,
                  step_or_fall_back, write_run_readme)
from methods import DISTILLED, METHODS, SPECTRAL, default_lr_img, per_class_loss
from sdd import (ALPHA_HEAD, ALPHA_TAIL, KERNELS, class_median_distances, class_weights, kernel_metric_p,
                 sample_frequencies)
from training import POOL_SCHEDULES, train_network

STREAM_NETWORK, STREAM_FREQS, STREAM_POOL = 11, 12, 13
# --preset: option values that together are a published pipeline; options given on the command line win.
# ncfm-paper: NCFM's CIFAR-10 IPC-10 condensation (gszfwsb/NCFM config/ipc10/cifar10.yaml, condenser/
# Condenser.py, condenser/compute_loss.py): a pool of 20 ConvNets pre-trained 60 epochs (POOL_SCHEDULES["ncfm"]),
# each iteration one pool network interpolated with its initialisation, the calibration term at weight 1 with the
# trained network, batch_real 1024, 4096 frequencies, factor 2, AdamW on the pixels at lr 0.01, and one
# optimiser step per class, each class's real and synthetic images augmented by one draw (pairing "class").
PRESETS = {
    "ncfm-paper": {"extractor": "pool", "pool_size": 20, "pool_schedule": "ncfm", "calibration": 1.0,
                   "batch_real": 1024, "num_freqs": 4096, "factor": 2, "optimizer": "adamw", "lr_img": 0.01,
                   "dsa_pairing": "class", "class_steps": True},
}
# options that may change between a checkpoint and its --resume: where and how a run is executed,
# not what it computes (--iterations may grow: nothing depends on the total)
RUN_OPTIONS = {"iterations", "device", "out", "log_every", "ckpt_every", "resume", "overwrite", "data_dir",
               "class_chunk", "compile", "pool_cache", "pool_only", "kernel_names"}
# Until 2026-12-07 the kernels named laplacian and cauchy were product kernels; configs written since carry
# kernel_names 2, and an older record's kernel is read under its present name.
KERNEL_NAMES = 2
RENAMED_KERNELS = {"laplacian": "laplacian-l1", "cauchy": "cauchy-product"}
# options added after checkpoints were first written, with the value that older checkpoints ran with
ADDED_OPTIONS = {"calibration": 0.0, "dsa_pairing": "position", "calibration_tau": 0.0, "pool_rebalance": "none",
                 "class_aware": False, "extractor": "random", "factor": 1, "pool_size": 4, "pool_epochs": 3,
                 "pool_schedule": "brief", "class_steps": False, "preset": None, "pool_cache": None,
                 "imq_beta": 0.5}
RUN_FILES = ("synthetic.pt", "checkpoint.pt", "config.json", "results.json")
# everything a run folder holds, removed by --overwrite once every input is checked
OUTPUT_FILES = RUN_FILES + ("run.json", "README.md", "loss.csv", "loss.png", "synthetic.png", "init.png",
                            "init_vs_final.png", "per_class.png")


# ----------------------------------------------------------------------------------------
# Options

class DistillParser(OneLineParser):
    """Options: the command line over the --preset's values over the defaults, and the pool's epochs filled in
    from its schedule, so that the parsed namespace is the one record of what the run does."""

    def parse_known_args(self, args=None, namespace=None):
        found, extra = super().parse_known_args(args, namespace)
        if found.preset is not None:
            self.set_defaults(**PRESETS[found.preset])
            found, extra = super().parse_known_args(args, namespace)
        if found.pool_epochs is None:
            found.pool_epochs = POOL_SCHEDULES[found.pool_schedule].epochs
        return found, extra


def build_parser() -> argparse.ArgumentParser:
    p = DistillParser(prog="distill.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="csdm", choices=DISTILLED, help="matching loss (methods.METHODS)")
    p.add_argument("--preset", default=None, choices=tuple(PRESETS),
                   help="a published pipeline's option values (PRESETS in distill.py); options given on the "
                        "command line win. ncfm-paper: NCFM's CIFAR-10 IPC-10 condensation")
    add_data_arguments(p)
    g = p.add_argument_group("distillation")
    g.add_argument("--ipc", type=int, default=10, help="synthetic images per class")
    g.add_argument("--iterations", type=int, default=20000, help="optimiser steps on the synthetic images")
    g.add_argument("--batch-real", type=int, default=256, help="real images per class per iteration")
    g.add_argument("--optimizer", default=None, choices=("sgd", "adam", "adamw"),
                   help=f"optimiser on pixels: SGD with momentum 0.5 (DM), Adam (free of the loss's scale) or "
                        f"AdamW (PyTorch's defaults, as NCFM) "
                        f"(default: per method, methods.METHODS)")
    g.add_argument("--lr-img", type=finite_float, default=None,
                   help="learning rate on pixels (default: per method and optimiser, methods.default_lr_img)")
    g.add_argument("--factor", type=int, default=2,
                   help="multi-formation (NCFM, IDC): each synthetic image holds factor x factor tiles, each "
                        "decoded to a full-size training image, so the set has IPC x factor^2 images per class "
                        "(default 2, chosen on the validation split; 1: one image per stored image, as DM)")
    g.add_argument("--extractor", default="random", choices=("random", "pool"),
                   help="feature extractor per iteration: a fresh random ConvNet (DM), or one of a pool of "
                        "ConvNets trained briefly on the long-tailed set, blended with its initialisation (NCFM)")
    g.add_argument("--pool-size", type=int, default=4, help="--extractor pool: networks in the pool")
    g.add_argument("--pool-schedule", default="brief", choices=tuple(POOL_SCHEDULES),
                   help="--extractor pool: how each pool network is trained (training.POOL_SCHEDULES): brief, the "
                        "project's first pool (3 epochs of DM's evaluation schedule), or ncfm, NCFM's pre-training "
                        "(60 epochs of SGD, lr x0.2 at epochs 40 and 50)")
    g.add_argument("--pool-epochs", type=int, default=None,
                   help="--extractor pool: training epochs of each network (default: the schedule's)")
    g.add_argument("--pool-cache", default=None,
                   help="--extractor pool: folder of trained pools, one file per network so that a stopped "
                        "pool continues (default: $CSDM_CACHE_DIR/pools)")
    g.add_argument("--pool-only", action="store_true",
                   help="--extractor pool: train (or complete) the pool in --pool-cache and stop, writing nothing "
                        "to --out (NCFM's pre-training as a step of its own)")
    g.add_argument("--class-steps", action="store_true",
                   help="one optimiser step per class per iteration, on that class's loss (NCFM), instead of one "
                        "step on the sum over classes (DM)")
    g.add_argument("--calibration", type=finite_float, default=0.0,
                   help="--extractor pool: weight of NCFM's cross-entropy calibration term (the iteration's pool "
                        "network, trained, classifies the synthetic images); 0: off")
    g.add_argument("--dsa-pairing", default="position", choices=DSA_PAIRINGS,
                   help="siamese DSA: position: the real and synthetic images at the same position of a class share "
                        "a transformation (one operation per class, parameters per position); class: one "
                        "transformation per class and iteration for all its real and synthetic images, as DM's code")
    g.add_argument("--calibration-tau", type=finite_float, default=0.0,
                   help="--calibration: balance it by the post-hoc logit adjustment of Menon et al. (ICLR 2021): "
                        "the pool classifier's logits minus tau x log prior of the long-tailed set, so that a "
                        "classifier trained on the long-tailed set scores classes as if they were balanced; 0: "
                        "NCFM's term unchanged")
    g.add_argument("--pool-rebalance", default="none", choices=("none", "crt", "la"),
                   help="--extractor pool: make the pool's classifiers (the calibrators) lean less to the head. crt "
                        "re-trains each pool network's last layer on class-balanced batches after its training on "
                        "the long-tailed set (classifier re-training, Kang et al., ICLR 2020); la trains each pool "
                        "network with the logit-adjusted cross-entropy, CE(f(x) + log prior) (Menon et al., ICLR "
                        "2021; the balanced softmax), whose raw logits f(x) are balanced; as that loss also shapes the "
                        "pool's features, la acts on the extractor without --calibration too")
    g.add_argument("--class-chunk", type=int, default=0,
                   help="classes embedded and matched together (0: as many as keep about 4096 images, at most "
                        "1024 of them synthetic, in a chunk; with --norm batch always one); bounds memory for many "
                        "classes, the result is the same")
    g = p.add_argument_group("loss")
    g.add_argument("--kernel", default="gaussian", choices=KERNELS, help="universal kernel of the spectral methods")
    g.add_argument("--imq-beta", type=finite_float, default=0.5,
                   help="--kernel imq: the exponent beta of (1 + ||delta||^2 / sigma^2)^-beta")
    g.add_argument("--num-freqs", type=int, default=1024, help="frequencies M drawn per iteration")
    g.add_argument("--bandwidth", type=finite_float, default=1.0,
                   help="kernel bandwidth sigma (with --bandwidth-rule median: a multiple of the median distance)")
    g.add_argument("--bandwidth-rule", default="fixed", choices=("fixed", "median"),
                   help="fixed sigma, or per class sigma_c = bandwidth x median pairwise distance of the "
                        "iteration's real features of class c, in the kernel's metric (L1 for laplacian-l1, else L2)")
    g.add_argument("--feature-norm", default="l2", choices=("l2", "none"),
                   help="L2-normalise features before the spectral and mmd losses (dm always uses raw features)")
    g.add_argument("--alpha-head", type=finite_float, default=ALPHA_HEAD,
                   help="csdm: amplitude weight of the head class")
    g.add_argument("--alpha-tail", type=finite_float, default=ALPHA_TAIL,
                   help="csdm: amplitude weight of the tail class")
    g.add_argument("--class-aware", action="store_true",
                   help="give ncfm or sdm csdm's class-aware amplitude weights (csdm always has them)")
    g = p.add_argument_group("network")
    g.add_argument("--width", type=int, default=128, help="ConvNet channels")
    g.add_argument("--depth", type=int, default=None, help="ConvNet blocks (default: 3 to 32 px, 4 at 64, 5 at 128)")
    g.add_argument("--norm", default="instance", choices=NORMS, help="ConvNet normalisation")
    g.add_argument("--pooling", default="avg", choices=POOLINGS, help="ConvNet pooling")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="the one seed of the run: subset, init, networks, batches, DSA")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: the local GPU)")
    g.add_argument("--out", default="runs/distill", help="output folder")
    g.add_argument("--precision", default="auto", choices=("auto",) + PRECISIONS,
                   help="bf16: the extractor under bfloat16 autocast and the spectral projection w.x in "
                        "bfloat16 (float32 accumulation), the rest of the losses in float32; fp32: float32; "
                        "auto: bf16 where it is fast (GPUs; CPUs with AMX or AVX512-BF16 when --compile)")
    g.add_argument("--compile", action="store_true", help="torch.compile the extractor (pays off past ~100 iterations)")
    g.add_argument("--ckpt-every", type=int, default=100, help="write checkpoint.pt every N iterations")
    g.add_argument("--resume", action="store_true", help="continue from checkpoint.pt in --out")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    g.add_argument("--log-every", type=int, default=50, help="print the loss every N iterations (when not a terminal)")
    return p


def check_options(args) -> None:
    """Reject impossible values with the option's name and the fix."""
    check_positive({"--ipc": args.ipc, "--iterations": args.iterations, "--batch-real": args.batch_real,
                    "--num-freqs": args.num_freqs, "--width": args.width, "--log-every": args.log_every,
                    "--ckpt-every": args.ckpt_every, "--factor": args.factor, "--pool-size": args.pool_size,
                    "--pool-epochs": args.pool_epochs})
    if args.class_chunk < 0:
        raise UsageError(f"--class-chunk must be >= 0 (got {args.class_chunk}); 0 picks it from the batch size")
    if args.depth is not None and args.depth < 1:
        raise UsageError(f"--depth must be >= 1 (got {args.depth})")
    if args.lr_img is not None and not args.lr_img > 0:
        raise UsageError(f"--lr-img must be > 0 (got {args.lr_img})")
    if not args.bandwidth > 0:
        raise UsageError(f"--bandwidth must be > 0 (got {args.bandwidth})")
    if not args.imq_beta > 0:
        raise UsageError(f"--imq-beta must be > 0 (got {args.imq_beta})")
    if args.bandwidth_rule == "median" and args.batch_real < 2:
        raise UsageError("--bandwidth-rule median needs two real images of a class to measure a distance: "
                         "raise --batch-real to 2 or more, or use --bandwidth-rule fixed")
    if args.class_aware and args.method not in SPECTRAL:
        raise UsageError(f"--class-aware applies to the spectral losses sdm and ncfm, not {args.method}; drop it")
    if class_aware(args) and not (0 < args.alpha_tail <= args.alpha_head < 1):
        raise UsageError(f"--alpha-head/--alpha-tail need 0 < tail <= head < 1 "
                         f"(got head {args.alpha_head}, tail {args.alpha_tail})")
    if args.method == "mmd" and args.kernel != "gaussian":
        raise UsageError("--kernel: the exact mmd baseline uses the gaussian kernel; drop --kernel or pick a "
                         "spectral method (csdm, sdm, ncfm)")
    if not args.calibration >= 0:
        raise UsageError(f"--calibration must be >= 0 (got {args.calibration})")
    if args.calibration > 0 and args.extractor != "pool":
        raise UsageError("--calibration needs trained classifiers: add --extractor pool, or drop --calibration")
    if args.calibration_tau != 0 and args.calibration == 0:
        raise UsageError("--calibration-tau adjusts the calibration term: add --calibration LAMBDA, or drop it")
    if args.pool_rebalance == "crt" and args.calibration == 0:
        raise UsageError("--pool-rebalance crt re-trains the pool's classifiers, which only the calibration term uses: "
                         "add --extractor pool --calibration LAMBDA, or drop it")
    if args.pool_rebalance == "la" and args.extractor != "pool":
        raise UsageError("--pool-rebalance la trains the extractor pool: add --extractor pool, or drop it")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one of them")


def class_aware(args) -> bool:
    """csdm, or sdm / ncfm with --class-aware: alpha_c from the class counts instead of 1/2."""
    return METHODS[args.method].class_aware or args.class_aware


def check_out_folder(args) -> None:
    """Refuse to write into another run's folder unless told to resume it or replace it."""
    out = Path(args.out)
    check_out_is_folder(out)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not (args.resume or args.overwrite):
        raise UsageError(f"--out {out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                         f"--overwrite to replace it, or another --out")


def resolved_config(args, data: LongTailedData) -> dict:
    """The options with every default that depends on the method or the data filled in."""
    optimizer_name = args.optimizer or METHODS[args.method].optimizer
    device = resolve_device(args.device)
    return dict(vars(args), depth=args.depth or depth_for_size(data.image_size), optimizer=optimizer_name,
                lr_img=args.lr_img or default_lr_img(optimizer_name, args.method),
                precision=resolve_precision(args.precision, device, args.compile), format_version=FORMAT_VERSION,
                kernel_names=KERNEL_NAMES)


# ----------------------------------------------------------------------------------------
# Checkpoints

def comparable_config(config: dict) -> dict:
    return {key: value for key, value in config.items() if key not in RUN_OPTIONS}


def load_checkpoint(out: Path, config: dict) -> dict | None:
    """The checkpoint in `out` if it belongs to this run; None if there is none."""
    path = out / "checkpoint.pt"
    if not path.exists():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        version = checkpoint["format_version"]
    except Exception as error:
        raise UsageError(f"--resume: {path} cannot be read ({type(error).__name__}: {str(error)[:80]}); "
                         f"delete it, or start again with --overwrite")
    if version != FORMAT_VERSION:
        raise UsageError(f"--resume: {path} has checkpoint format {version}, this code writes {FORMAT_VERSION}; "
                         f"finish it with the version that wrote it, or start again with --overwrite")
    differences = option_differences(checkpoint["config"], config, "checkpoint")
    if differences:
        raise UsageError(f"--resume: {path} was made with other options: {'; '.join(differences)}; "
                         f"rerun with the checkpoint's options, or start again with --overwrite")
    return checkpoint


def option_differences(recorded: dict, config: dict, what: str) -> list[str]:
    """The options (not the run options such as --iterations) in which a recorded config differs from this
    run's, as '--option theirs (what) vs ours (now)'."""
    theirs, ours = ADDED_OPTIONS | comparable_config(with_present_kernel_name(recorded)), comparable_config(config)
    return [f"--{key.replace('_', '-')} {theirs.get(key)} ({what}) vs {ours.get(key)} (now)"
            for key in sorted(set(theirs) | set(ours)) if theirs.get(key) != ours.get(key)]


def with_present_kernel_name(config: dict) -> dict:
    """A recorded config with its kernel under the present name (records before kernel_names 2 called the
    product kernels laplacian and cauchy)."""
    if config.get("kernel_names", 1) >= KERNEL_NAMES or "kernel" not in config:
        return config
    return dict(config, kernel=RENAMED_KERNELS.get(config["kernel"], config["kernel"]))


def finished_set(out: Path, config: dict, checkpoint: dict | None) -> bool:
    """True if out/synthetic.pt is this run's set, finished: made with these options and --iterations, and
    no checkpoint beyond it (a run stopped after extending a finished one keeps the older set). A set made
    with other options is refused (resuming would replace it); an unreadable one is written again."""
    path = out / "synthetic.pt"
    try:
        recorded = torch.load(path, map_location="cpu", weights_only=True)["config"]
    except Exception:  # missing or unreadable
        return False
    differences = option_differences(recorded, config, "synthetic.pt")
    if differences:
        raise UsageError(f"--resume: {path} was made with other options: {'; '.join(differences)}; "
                         f"give another --out, or start again with --overwrite")
    if checkpoint is None and recorded.get("iterations", 0) > config["iterations"]:
        raise UsageError(f"--iterations {config['iterations']}: {path} holds a set of {recorded['iterations']} "
                         f"iterations, which resuming from the start would replace; give another --out")
    done = checkpoint["iteration"] if checkpoint is not None else recorded.get("iterations")
    return recorded.get("iterations") == done == config["iterations"]


def optimizer_rows(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's per-pixel state of its one parameter (momentum, Adam moments), plus scalars."""
    state = optimizer.state_dict()["state"].get(0, {})
    return {key: value for key, value in state.items() if torch.is_tensor(value)}


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor], rows: torch.Tensor) -> None:
    """Load a checkpoint's optimiser state, keeping this process's rows of the per-pixel tensors."""
    if not state:
        return
    local = {key: (value[rows] if value.dim() > 0 else value) for key, value in state.items()}
    full = optimizer.state_dict()
    full["state"] = {0: local}
    optimizer.load_state_dict(full)


# ----------------------------------------------------------------------------------------
# Stopping, diverging, the extractor pool

class StopRequest:
    """Set by SIGINT / SIGTERM; the loop checks it after every iteration."""

    def __init__(self):
        self.signal_number = 0

    def install(self) -> None:
        def handler(signum, frame):
            if self.signal_number:  # a second signal: stop now
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            self.signal_number = signum
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, handler)


class Diverged(RuntimeError):
    pass


def pool_file(args, data: LongTailedData, depth: int, precision: str) -> Path:
    """Where the trained extractor pool for this data and network is cached. A data set is known by its class
    names and the SHA-1 of its long-tailed training images and labels, whatever its name: two image-folder
    trees of the same counts and size are two data sets, and so are CIFAR-10 from torchvision and its JPEG
    copy (other pixels, so another subset and other pictures under the same seed)."""
    return pool_folder(args) / f"pool-{pool_digest(args, data, depth, precision, with_size=True)}.pt"


def pool_networks_folder(args, data: LongTailedData, depth: int, precision: str) -> Path:
    """Where the pool's networks are cached one file each, as they finish. Network k depends on (seed, k) and
    not on --pool-size: a pool of 2 shares its networks with a pool of 20."""
    return pool_folder(args) / f"networks-{pool_digest(args, data, depth, precision, with_size=False)}"


def pool_folder(args) -> Path:
    return Path(args.pool_cache) if args.pool_cache else cache_dir() / "pools"


def pool_digest(args, data: LongTailedData, depth: int, precision: str, with_size: bool) -> str:
    key = (data.name, tuple(data.class_counts), data.channels, data.image_size, args.val_per_class, args.seed,
           args.width, depth, args.norm, args.pooling) + ((args.pool_size,) if with_size else ()) + (
           args.pool_epochs, precision) + ((args.pool_rebalance,) if args.pool_rebalance != "none" else ()) + (
           (args.pool_schedule,) if args.pool_schedule != "brief" else ())  # the first pools' paths unchanged
    content = hashlib.sha1(memoryview(data.train_images.contiguous().numpy()))  # no copy of the images
    content.update(memoryview(data.train_labels.contiguous().numpy()))
    key += (tuple(data.class_names), content.hexdigest())
    return hashlib.sha1(repr(key).encode()).hexdigest()[:16]


def retrain_classifier_balanced(net, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                                generator: torch.Generator, epochs: int = 10, per_class: int = 16,
                                lr: float = 0.01) -> torch.Tensor:
    """Classifier re-training (cRT; Kang et al., "Decoupling Representation and Classifier", ICLR 2020): the
    features stay fixed and the last layer is re-initialised and trained on class-balanced batches (per_class
    images of every class, drawn with replacement), SGD with momentum 0.9, as many batches per epoch as the
    set holds images / (per_class x C). Returns the number of images of each class the classifier saw, (C,)."""
    device = images.device
    net.eval()
    with torch.no_grad():  # the features once, without DSA: only the classifier learns
        features = torch.cat([net.embed(part.contiguous(memory_format=torch.channels_last))
                              for part in images.split(256)]).float()
    reset_parameters_(net.classifier, generator)
    optimizer = torch.optim.SGD(net.classifier.parameters(), lr=lr, momentum=0.9)
    by_class = [torch.nonzero(labels == c).squeeze(1) for c in range(num_classes)]
    seen = torch.zeros(num_classes, dtype=torch.long)
    for _ in range(epochs * max(1, len(labels) // (per_class * num_classes))):
        picks = torch.cat([members[torch.randint(len(members), (per_class,), generator=generator, device=device)]
                           for members in by_class])
        loss = F.cross_entropy(net.classifier(features[picks]), labels[picks])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += torch.bincount(labels[picks].cpu(), minlength=num_classes)
    return seen


def log_prior(data: LongTailedData, device) -> torch.Tensor:
    """log pi_c = log(n_c / sum n) of the long-tailed training set, (C,)."""
    counts = torch.tensor(data.class_counts, dtype=torch.float32, device=device)
    return torch.log(counts / counts.sum())


def pool_logit_shift(args, data: LongTailedData, device) -> torch.Tensor | None:
    """The pool's training-loss logit shift: log prior for --pool-rebalance la (the logit-adjusted loss), else none."""
    return log_prior(data, device) if args.pool_rebalance == "la" else None


def extractor_pool(args, data: LongTailedData, depth: int, device: torch.device, processes: Processes,
                   log=print) -> list[dict]:
    """NCFM's pool: --pool-size ConvNets, each trained --pool-epochs epochs on the long-tailed set under
    --pool-schedule, kept with its initialisation. Each network is cached as it finishes (a stopped pool
    continues with the next one), the whole pool once all are; split across processes under torchrun."""
    precision = resolve_precision(args.precision, device, args.compile)
    path = pool_file(args, data, depth, precision)
    if path.exists():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)["networks"]
        except Exception:
            log(f"extractor pool {path} unreadable; training it again")
    log(f"training the extractor pool: {args.pool_size} networks x {args.pool_epochs} epochs ({args.pool_schedule} "
        f"schedule) on {len(data.train_labels)} images -> {path}")
    folder = pool_networks_folder(args, data, depth, precision)
    images, labels = data.normalise(data.train_images).to(device), data.train_labels.to(device)  # once, for all
    mine = [(k, pool_network(args, data, images, labels, depth, precision, k, folder, log))
            for k in range(processes.rank, args.pool_size, processes.world)]
    mine = processes.gather_objects(mine)
    networks = [network for _, network in sorted(mine, key=lambda entry: entry[0])]
    if processes.main:
        atomic_save({"networks": networks}, path)
    return networks


def cpu_state(net) -> dict[str, torch.Tensor]:
    """A copy of the network's state dict on the CPU."""
    return {name: value.detach().cpu().clone() for name, value in net.state_dict().items()}


def pool_network(args, data: LongTailedData, images: torch.Tensor, labels: torch.Tensor, depth: int,
                 precision: str, k: int, folder: Path, log) -> dict:
    """Pool network k ({"init", "trained"} state dicts), from folder/network-k.pt or trained on the normalised
    long-tailed `images` and written there. Its draws (initialisation, batches, augmentation) come from
    (seed, k) alone."""
    path = folder / f"network-{k}.pt"
    if path.exists():
        log(f"  pool network {k + 1}/{args.pool_size}: {path}")
        return torch.load(path, map_location="cpu", weights_only=True)
    start, device = time.perf_counter(), images.device
    generator = torch.Generator(device=device).manual_seed(counter_seed(args.seed, STREAM_POOL, k))
    net = reset_parameters_(convnet(args, data, depth, device), generator)
    init = cpu_state(net)
    train_network(net, images, labels, generator, POOL_SCHEDULES[args.pool_schedule], args.pool_epochs,
                  precision=precision, compile=args.compile, logit_shift=pool_logit_shift(args, data, device))
    if args.pool_rebalance == "crt":
        retrain_classifier_balanced(net, images, labels, data.num_classes, generator)
    network = {"init": init, "trained": cpu_state(net),
               "seconds": torch.tensor(time.perf_counter() - start, dtype=torch.float64)}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save(network, path)
    log(f"  pool network {k + 1}/{args.pool_size} trained in {network['seconds'].item():.0f} s")
    return network


# ----------------------------------------------------------------------------------------
# The loop's parts: this process's share of the set, the extractor, the matching loss

def convnet(args, data: LongTailedData, depth: int, device: torch.device):
    return build_network("convnet", data.channels, data.num_classes, data.image_size, args.width, depth, args.norm,
                         args.pooling, device)


@dataclass
class Shard:
    """This process's classes and its rows of the synthetic set (all of them for one process).
    Stored rows hold factor^2 decoded images each; `local` numbers this process's classes 0..K-1."""
    classes: torch.Tensor         # (K,) global classes
    rows: torch.Tensor            # (R,) rows of the stored set
    row_local: torch.Tensor       # (R,) local class of each row
    syn_local: torch.Tensor       # (R * tiles,) local class of each decoded image
    syn_class: torch.Tensor       # (R * tiles,) global class of each decoded image
    syn_position: torch.Tensor    # (R * tiles,) position of each decoded image within its class
    local_of_class: torch.Tensor  # (C,) local class of each global class, -1 for other processes' classes

    @classmethod
    def of(cls, processes: Processes, labels: torch.Tensor, num_classes: int, ipc: int, tiles: int, device):
        classes = processes.classes(num_classes)
        rows = torch.nonzero(torch.isin(labels, classes)).squeeze(1)
        local_of_class = torch.full((num_classes,), -1, dtype=torch.long)
        local_of_class[classes] = torch.arange(len(classes))
        row_local = local_of_class[labels[rows]]
        position = ((rows % ipc)[:, None] * tiles + torch.arange(tiles)).flatten()
        return cls(classes, rows, row_local.to(device), row_local.repeat_interleave(tiles).to(device),
                   labels[rows].repeat_interleave(tiles).to(device), position.to(device), local_of_class.to(device))


class Extractor:
    """The iteration's feature extractor, as float32 features f(x) (the network under bf16 autocast if
    asked): a fresh random ConvNet (DM), or a pool network blended with its initialisation,
    theta = l theta_init + (1 - l) theta_trained, l ~ U(0, 1) (NCFM). With --calibration the pool
    network, trained, is also the iteration's classifier."""

    def __init__(self, args, data: LongTailedData, config: dict, device, processes: Processes, log):
        self.args, self.device, self.precision = args, device, config["precision"]
        self.net = convnet(args, data, config["depth"], device).requires_grad_(False)
        self.embed = compile_or_eager(self._embed, args.compile)
        self.compiled = [self.embed]  # the compiled functions a step runs through
        self.pool = None
        if args.extractor == "pool":
            self.pool = [{part: {name: value.to(device) for name, value in network[part].items()}
                          for part in ("init", "trained")}
                         for network in extractor_pool(args, data, config["depth"], device, processes, log)]
        self.calibrator = None
        if args.calibration > 0:
            self.calibrator = convnet(args, data, config["depth"], device).requires_grad_(False)
            self.logit_shift = -args.calibration_tau * log_prior(data, device)  # (C,)
            self.classify = compile_or_eager(self._classify, args.compile)
            self.compiled.append(self.classify)

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim

    def _embed(self, x):
        with autocast(self.device, self.precision):
            return self.net.embed(x).float()

    def _classify(self, x):
        """The calibrator's float32 logits (autocast as embed), logit-adjusted: f(x) - tau log prior."""
        with autocast(self.device, self.precision):
            return adjusted_logits(self.calibrator(x).float(), self.logit_shift)

    @torch.no_grad()
    def draw(self, iteration: int) -> None:
        """Set the networks for `iteration`, from (seed, iteration) alone."""
        seed = self.args.seed
        if self.pool is None:
            generator = torch.Generator(device=self.device).manual_seed(counter_seed(seed, STREAM_NETWORK, iteration))
            reset_parameters_(self.net, generator)
            return
        pick, blend = counter_uniform(seed, STREAM_POOL, iteration, torch.arange(2)).tolist()
        network = self.pool[min(int(pick * len(self.pool)), len(self.pool) - 1)]
        for name, value in self.net.state_dict().items():
            value.copy_(blend * network["init"][name] + (1 - blend) * network["trained"][name])
        if self.calibrator is not None:
            self.calibrator.load_state_dict(network["trained"])


def adjusted_logits(logits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al., ICLR 2021): logits + shift with shift = -tau log pi (pi the
    long-tailed class prior). A classifier trained on the long-tailed set scores log p(x|y) + log pi_y; minus
    tau log pi removes the prior (tau = 1: the balanced posterior), so its cross-entropy no longer pulls the
    synthetic images towards the head. shift = 0 (tau = 0) returns the logits unchanged."""
    return logits + shift


def draw_frequencies(args, iteration: int, dim: int, device) -> torch.Tensor | None:
    """The iteration's M standard spectral draws (M, dim) of the kernel; the bandwidth scales them inside
    the loss. None for the losses without frequencies (dm, mmd)."""
    if args.method not in SPECTRAL:
        return None
    generator = torch.Generator(device=device).manual_seed(counter_seed(args.seed, STREAM_FREQS, iteration))
    return sample_frequencies(args.num_freqs, dim, args.kernel, 1.0, generator=generator, device=device,
                              beta=args.imq_beta)


def chunk_classes(batch_real: int, decoded_per_class: int, images: int = 4096, with_grad: int = 1024) -> int:
    """Classes per chunk when --class-chunk is 0: at most `images` images through the extractor and at most
    `with_grad` decoded synthetic images (whose activations stay alive for the backward pass; the real
    ones run without a graph) in one chunk, and at least one class."""
    return max(1, min(images // (batch_real + decoded_per_class), with_grad // decoded_per_class))


def embed_in_chunks(embed, images: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """embed(images) over row chunks (None: in one call), without building a graph (real images need no
    gradient)."""
    with torch.no_grad():
        return in_micro_batches(embed, images.contiguous(memory_format=torch.channels_last), chunk)


class Matcher:
    """The matching loss of an iteration, sum_c L_c(real features of c, synthetic features of c), with its
    gradient accumulated into the synthetic pixels chunk of classes by chunk of classes: per-class losses
    are independent, so the chunked backward passes add up to the gradient of the whole sum while only
    one chunk's activations are alive at a time."""

    def __init__(self, args, data: LongTailedData, shard: Shard, alpha: torch.Tensor, config: dict, device):
        self.args, self.data, self.shard, self.device = args, data, shard, device
        self.tiles = args.factor ** 2
        self.local_alpha = alpha[shard.classes].to(device)
        self.train_images, self.train_labels = data.train_images.to(device), data.train_labels.to(device)
        self.sampler = RealBatchSampler(self.train_labels, data.num_classes, args.batch_real, args.seed,
                                        shard.classes.to(device))
        self.normalise_features = args.method != "dm" and args.feature_norm == "l2"
        # the spectral loss's projection w . x follows the network's precision (sdd.class_characteristic_functions)
        self.projection_dtype = torch.bfloat16 if config["precision"] == "bf16" else None
        # batch norm: each class's real and synthetic images go through the network alone and whole (as in
        # DM's code), so its batch statistics are the class's, whatever the chunks, micro-batches or processes
        per_class = args.norm == "batch"
        self.micro = None if per_class else micro_batch_size(device, data.image_size)
        self.real_chunk = None if per_class else self.micro or 1024
        per_chunk = 1 if per_class or args.class_steps else (
            args.class_chunk or chunk_classes(args.batch_real, args.ipc * self.tiles))
        self.chunks = [(a, min(a + per_chunk, len(shard.classes))) for a in range(0, len(shard.classes), per_chunk)]

    def steps(self) -> list[list[tuple[int, int]]]:
        """The chunks of each optimiser step of an iteration: all of them in one step, or with --class-steps
        one step per class (NCFM)."""
        return [[chunk] for chunk in self.chunks] if self.args.class_steps else [self.chunks]

    def backward(self, syn: torch.Tensor, iteration: int, extractor: Extractor, freqs,
                 chunks: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Accumulate d loss / d syn of `chunks` (default: all) into syn.grad; returns their loss (detached)."""
        index, position = self.sampler.sample(iteration)
        real_local = self.shard.local_of_class[self.train_labels[index]]
        total = torch.zeros((), device=self.device)
        for first, last in chunks or self.chunks:
            in_real = (real_local >= first) & (real_local < last)
            loss = self.chunk_loss(syn, iteration, extractor, freqs, first, last, index[in_real], position[in_real])
            loss.backward()
            total = total + loss.detach()
        return total

    def chunk_loss(self, syn, iteration, extractor, freqs, first, last, index, position) -> torch.Tensor:
        """The summed loss of local classes first..last-1 on their real images `index` (at `position` in
        their class batch) and their synthetic images."""
        args, shard = self.args, self.shard
        in_rows = (shard.row_local >= first) & (shard.row_local < last)
        in_syn = in_rows.repeat_interleave(self.tiles)
        real_class, syn_class = self.train_labels[index], shard.syn_class[in_syn]
        real = dsa_augment(self.data.normalise(self.train_images[index]),
                           dsa_uniforms_siamese(args.seed, iteration, real_class, position, args.dsa_pairing))
        decoded = decode(syn if len(self.chunks) == 1 else syn[in_rows], args.factor)
        syn_aug = dsa_augment(decoded, dsa_uniforms_siamese(args.seed, iteration, syn_class,
                                                            shard.syn_position[in_syn], args.dsa_pairing))
        syn_aug = syn_aug.contiguous(memory_format=torch.channels_last)
        real_features = embed_in_chunks(extractor.embed, real, self.real_chunk)
        syn_features = in_micro_batches(extractor.embed, syn_aug, self.micro)
        if self.normalise_features:
            real_features, syn_features = F.normalize(real_features, dim=1), F.normalize(syn_features, dim=1)
        real_labels, syn_labels = shard.local_of_class[real_class] - first, shard.syn_local[in_syn] - first
        bandwidth = args.bandwidth
        if args.bandwidth_rule == "median":
            bandwidth = args.bandwidth * class_median_distances(real_features, real_labels, last - first,
                                                                p=kernel_metric_p(args.kernel))
        loss = per_class_loss(args.method, real_features, real_labels, syn_features, syn_labels, last - first,
                              freqs=freqs, alpha=self.local_alpha[first:last], bandwidth=bandwidth,
                              projection_dtype=self.projection_dtype).sum()
        if extractor.calibrator is not None:  # sum over classes of each class's mean cross-entropy
            logits = in_micro_batches(extractor.classify, syn_aug, self.micro)
            loss = loss + args.calibration * F.cross_entropy(logits, syn_class, reduction="sum") / (
                args.ipc * self.tiles)
        return loss


# ----------------------------------------------------------------------------------------
# The loop

@dataclass
class LoopState:
    """Where the loop stands: the stored synthetic images of this process, their optimiser, the history, and
    the stretches the run was distilled in (one per sitting: iterations [from, to], seconds, commit, CPU)."""
    syn: torch.Tensor
    optimizer: torch.optim.Optimizer
    start_iteration: int
    history: list
    elapsed_before: float
    stretches: list = field(default_factory=list)


def stretches_so_far(checkpoint: dict | None, start_iteration: int, device, processes: Processes) -> list[dict]:
    """The checkpoint's stretches (for a checkpoint written before they were kept: one stretch of unrecorded
    origin up to its iteration), then this sitting's start (stretches_done closes it)."""
    earlier = list(checkpoint.get("stretches", [])) if checkpoint is not None else []
    if start_iteration and not earlier:
        earlier = [{"iterations": [0, start_iteration], "commit": None, "processor": None}]
    here = dict(environment(), device=str(device))
    return earlier + [{"iterations": [start_iteration, start_iteration], "commit": here["commit"],
                       "processor": processor_name(here), "device": here["device"],
                       "processes": processes.world, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}]


def stretches_done(state: LoopState) -> list[dict]:
    """state.stretches with this sitting's closed at the history's last iteration (its seconds: the elapsed
    time since the sitting began); a sitting that has not distilled an iteration is left out."""
    *earlier, here = state.stretches
    last, _, elapsed = state.history[-1] if state.history else (state.start_iteration - 1, None, 0.0)
    if last + 1 <= state.start_iteration:
        return earlier
    return earlier + [dict(here, iterations=[state.start_iteration, last + 1],
                           seconds=round(elapsed - state.elapsed_before, 3))]


def starting_state(args, config: dict, init_images, shard: Shard, checkpoint: dict | None, device) -> LoopState:
    """The real initialisation, or the checkpoint's images and optimiser state; this process's rows."""
    images = checkpoint["images"] if checkpoint is not None else init_images
    syn = images[shard.rows].clone().to(device).requires_grad_(True)
    optimizer = {"sgd": lambda: torch.optim.SGD([syn], lr=config["lr_img"], momentum=0.5),
                 "adam": lambda: torch.optim.Adam([syn], lr=config["lr_img"]),
                 "adamw": lambda: torch.optim.AdamW([syn], lr=config["lr_img"])}[config["optimizer"]]()
    if checkpoint is None:
        return LoopState(syn, optimizer, 0, [], 0.0)
    restore_optimizer(optimizer, checkpoint["optimizer"], shard.rows)
    return LoopState(syn, optimizer, checkpoint["iteration"], [tuple(h) for h in checkpoint["history"]],
                     checkpoint["elapsed"])


def save_checkpoint(state: LoopState, shard: Shard, total_rows: int, iteration: int, elapsed: float, config: dict,
                    processes: Processes, out: Path) -> None:
    """checkpoint.pt after `iteration` iterations: the whole set and optimiser state (gathered), the history."""
    images = processes.gather_rows(shard.rows, state.syn.detach().cpu(), total_rows)
    optimizer = {key: (processes.gather_rows(shard.rows, value.cpu(), total_rows) if value.dim() > 0 else value.cpu())
                 for key, value in optimizer_rows(state.optimizer).items()}
    if processes.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_save({"format_version": FORMAT_VERSION, "iteration": iteration, "images": images,
                     "optimizer": optimizer, "history": state.history, "elapsed": elapsed, "config": config,
                     "stretches": stretches_done(state)},
                    out / "checkpoint.pt")


def check_finite(loss: torch.Tensor, syn: torch.Tensor, stop, processes: Processes, iteration: int) -> tuple:
    """(loss summed over processes, signal number or 0), raising Diverged if any process saw a non-finite
    loss or image. One collective per iteration carries all three."""
    finite = torch.isfinite(loss) & torch.isfinite(syn.detach()).all()
    total = processes.sum(torch.stack([loss.float(), (~finite).float(),
                                       torch.tensor(float(stop.signal_number if stop else 0), device=loss.device)]))
    value, bad, signalled = total.tolist()
    if bad:
        raise Diverged(f"the loss or the images became non-finite at iteration {iteration} (loss {value}); "
                       f"lower --lr-img")
    return value, int(signalled)


def distill(args, data: LongTailedData, device: torch.device, log=print, processes: Processes | None = None,
            stop: StopRequest | None = None, checkpoint: dict | None = None) -> dict:
    """Run (or continue) the distillation; returns the synthetic set and the loss history.

    Writes checkpoint.pt into args.out every args.ckpt_every iterations. If `stop` is set by a
    signal, writes a checkpoint and returns early with result["stopped"] = signal number."""
    processes = processes or Processes()
    config = resolved_config(args, data)
    init_images, all_labels = initial_synthetic(data, args.ipc, args.seed, args.factor)
    shard = Shard.of(processes, all_labels, data.num_classes, args.ipc, args.factor ** 2, device)
    state = starting_state(args, config, init_images, shard, checkpoint, device)
    state.stretches = stretches_so_far(checkpoint, state.start_iteration, device, processes)
    extractor = Extractor(args, data, config, device, processes, log)
    alpha = (class_weights(data.class_counts, args.alpha_head, args.alpha_tail) if class_aware(args)
             else torch.full((data.num_classes,), 0.5))
    if class_aware(args):
        log("alpha (amplitude weight) per class: " + " ".join(f"{a:.2f}" for a in alpha.tolist()))
    matcher = Matcher(args, data, shard, alpha, config, device)
    checkpoint_at = lambda done, elapsed: save_checkpoint(state, shard, len(all_labels), done, elapsed, config,
                                                          processes, Path(args.out))
    progress = Progress(args.iterations, state.start_iteration, args.log_every, log, enabled=processes.main,
                        elapsed_before=state.elapsed_before)
    start, stopped = time.perf_counter(), 0
    for iteration in range(state.start_iteration, args.iterations):
        extractor.draw(iteration)
        freqs = draw_frequencies(args, iteration, extractor.feature_dim, device)
        loss = sum(step_or_fall_back(lambda: update(state, matcher, iteration, extractor, freqs, chunks),
                                     extractor.compiled) for chunks in matcher.steps())
        value, signalled = check_finite(loss, state.syn, stop, processes, iteration)
        elapsed = state.elapsed_before + time.perf_counter() - start
        state.history.append((iteration, value, elapsed))
        progress.update(iteration + 1, value, elapsed)
        if signalled or (iteration + 1) % args.ckpt_every == 0 or iteration + 1 == args.iterations:
            checkpoint_at(iteration + 1, elapsed)  # the last one lets --resume extend --iterations
        if signalled:
            stopped = (stop.signal_number if stop else 0) or signal.SIGTERM  # the sum names no one signal
            break
    progress.close()
    packed = processes.gather_rows(shard.rows, state.syn.detach().cpu().float(), len(all_labels))
    return {
        "images": decode(packed, args.factor) if packed is not None else None,
        "labels": all_labels.repeat_interleave(args.factor ** 2), "packed_images": packed,
        "init_images": init_images, "mean": list(data.mean), "std": list(data.std),
        "class_names": list(data.class_names), "class_counts": list(data.class_counts),
        "alpha": alpha.tolist(), "config": config, "history": state.history, "stopped": stopped,
        "stretches": stretches_done(state),
        "iterations_done": state.history[-1][0] + 1 if state.history else state.start_iteration,
    }


def update(state: LoopState, matcher: Matcher, iteration: int, extractor: Extractor, freqs, chunks) -> torch.Tensor:
    """One step on the synthetic pixels, on the loss of `chunks`; every draw is a function of the seed and the
    iteration, so it can be repeated (runs.step_or_fall_back). Returns the loss."""
    state.optimizer.zero_grad(set_to_none=True)
    loss = matcher.backward(state.syn, iteration, extractor, freqs, chunks)
    state.optimizer.step()
    return loss


# ----------------------------------------------------------------------------------------
# Outputs: the synthetic set, pictures, and a folder that explains itself

def write_outputs(result: dict, out: Path, run_info: dict | None = None) -> None:
    """The run folder's files, synthetic.pt last: --resume takes a run whose set is written for finished, so
    a run stopped while writing the others resumes (from its last checkpoint, with nothing left to distil)
    and writes them all again."""
    out.mkdir(parents=True, exist_ok=True)
    ipc = result["config"]["ipc"]
    save_grid(result["packed_images"], result["mean"], result["std"], ipc, out / "synthetic.png")
    save_grid(result["init_images"], result["mean"], result["std"], ipc, out / "init.png")
    atomic_write_text(json.dumps(result["config"], indent=2) + "\n", out / "config.json")
    atomic_write_text(loss_csv(result["history"]), out / "loss.csv")
    if run_info is not None:
        atomic_write_text(json.dumps(run_info, indent=2) + "\n", out / "run.json")
    try:
        plot_side_by_side(out / "init.png", out / "synthetic.png", out / "init_vs_final.png")
        if result["history"]:
            plot_loss(result["history"], out / "loss.png", f"{result['config']['method']}")
    except ImportError:  # matplotlib missing: the pictures are a convenience
        pass
    write_run_readme(out)
    atomic_save({key: result[key] for key in ("images", "labels", "mean", "std", "class_names", "class_counts",
                                              "config")}, out / "synthetic.pt")


def loss_csv(history: list) -> str:
    """loss.csv: iteration, loss, seconds of distillation so far."""
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["iteration", "loss", "seconds"])
    writer.writerows((i, f"{loss:.6g}", f"{seconds:.3f}") for i, loss, seconds in history)
    return rows.getvalue()


# ----------------------------------------------------------------------------------------
# The job: every input checked before anything is written or deleted

def prepare_out_folder(args, data: LongTailedData, processes: Processes, log) -> dict | None:
    """Check --out against --resume / --overwrite and read the checkpoint to continue; only then, with
    everything checked, clear the old run's files for --overwrite. Returns the checkpoint (or None);
    raises Finished when --resume finds nothing left to do."""
    out = Path(args.out)
    checkpoint = None
    if args.resume:
        config = resolved_config(args, data)
        checkpoint = load_checkpoint(out, config)
        if checkpoint is not None and checkpoint["iteration"] > args.iterations:
            raise UsageError(f"--iterations {args.iterations}: the checkpoint in {out} is already at iteration "
                             f"{checkpoint['iteration']}; resume with --iterations {checkpoint['iteration']} or more")
        if finished_set(out, config, checkpoint):
            raise Finished(f"--resume: {out} holds a finished run of {args.iterations} iterations; nothing to do")
        log(f"resuming from iteration {checkpoint['iteration']}" if checkpoint else
            f"--resume: no checkpoint in {out}; starting from the beginning")
        other = checkpoint and other_device_kinds(checkpoint, resolve_device(args.device))
        if other:
            log(f"note: {out} was distilled on {', '.join(other)} until now and continues on "
                f"{resolve_device(args.device).type}: the networks, frequencies and batches are drawn by "
                f"torch.Generator on the device, which draws other numbers on another kind, so the set will "
                f"differ from an uninterrupted run's (run.json's stretches record each sitting's device)")
    check_no_evaluation_replaced(args, out)
    if args.overwrite and processes.main:
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / PARTIAL_EVALUATION, ignore_errors=True)  # networks trained on the set replaced
    processes.barrier()
    out.mkdir(parents=True, exist_ok=True)
    return checkpoint


def other_device_kinds(checkpoint: dict, device: torch.device) -> list[str]:
    """The device kinds (cpu, cuda) of the checkpoint's sittings that are not this run's."""
    kinds = {str(stretch.get("device") or "").split(":")[0] for stretch in checkpoint.get("stretches", [])}
    return sorted(kind for kind in kinds - {device.type} if kind)


def evaluations_inside(out: Path) -> list[str]:
    """Folders inside `out` whose results.json scores the set in `out` (as `evaluate.py --syn out/synthetic.pt
    --out out/ncfm` writes): its syn_sha256 is the set's, or its --syn names the set's file; and folders
    holding an interrupted evaluation (evaluation.partial/), which may be of it. A folder holding a run of its
    own (synthetic.pt or checkpoint.pt) is that run's. Evaluations kept elsewhere are not seen."""
    def own_run(folder: Path) -> bool:
        return (folder / "synthetic.pt").exists() or (folder / "checkpoint.pt").exists()
    interrupted = [str(path.parent) for path in sorted(out.glob(f"*/{PARTIAL_EVALUATION}"))
                   if not own_run(path.parent)]
    candidates = [path for path in sorted(out.glob("*/results.json"))
                  if not own_run(path.parent) and str(path.parent) not in interrupted]
    target = out / "synthetic.pt"
    # the set is hashed only when some folder inside may score it (a plain --resume reads nothing more)
    digest = hashlib.sha256(target.read_bytes()).hexdigest() if candidates and target.exists() else None
    found = []
    for path in candidates:
        try:
            result = json.loads(path.read_text())
            syn = (result.get("config") or {}).get("syn")
            scores_it = (digest is not None and result.get("syn_sha256") == digest) or (
                syn is not None and Path(syn).resolve() == target.resolve())
        except (OSError, ValueError, AttributeError):  # unreadable: assume it may be
            scores_it = True
        if scores_it:
            found.append(str(path.parent))
    return sorted(found + interrupted)


def check_no_evaluation_replaced(args, out: Path) -> None:
    """Refuse a run that would replace a set already evaluated, leaving the evaluation to describe a set that
    is gone: --resume continuing (or restarting) a set evaluated in --out or in a folder inside it, and
    --overwrite of a set evaluated in a folder inside --out (its own results.json it removes with the run).
    Called only once a run is sure to write a set (a finished --resume has stopped before)."""
    nested = evaluations_inside(out) if args.resume or args.overwrite else []
    if args.resume:
        own = (out / "results.json").exists() or (out / PARTIAL_EVALUATION).exists()
        evaluations = ([str(out)] if own else []) + nested
        if evaluations:
            raise UsageError(f"--resume --iterations {args.iterations}: the set in {out} was evaluated "
                             f"({', '.join(evaluations)}) and this run would replace it; copy checkpoint.pt into "
                             f"a new --out and resume there")
    if args.overwrite and nested:
        raise UsageError(f"--overwrite: {', '.join(nested)} holds an evaluation of the set in {out}, which this run "
                         f"would replace; move it out of {out} first, or give another --out")


def check_network(args, data: LongTailedData) -> None:
    """The ConvNet must fit the images (a depth that pools them below one pixel does not)."""
    try:
        convnet(args, data, args.depth or depth_for_size(data.image_size), torch.device("cpu"))
    except ValueError as error:
        raise UsageError(f"--depth: {error}")
    check_factor(args.factor, data.image_size)


class Finished(Exception):
    """--resume on a run that is already complete."""


def report_stop(prog: str, result: dict, out: Path, world: int) -> None:
    """The one line after a signal: where the run stands and the command that continues it."""
    command = " ".join(shlex.quote(a) for a in sys.argv[1:] if a not in ("--resume", "--overwrite"))
    launcher = "torchrun ... distill.py" if world > 1 else "python distill.py"
    print(f"{prog}: stopped by signal {result['stopped']} after {result['iterations_done']} of "
          f"{result['config']['iterations']} iterations; checkpoint written to {out / 'checkpoint.pt'}; "
          f"continue with: {launcher} {command} --resume", file=sys.stderr, flush=True)


def job(args, holder) -> None:
    check_options(args)
    processes, device = start_processes(args.device)
    holder[0] = processes
    if args.pool_only and args.extractor != "pool":
        raise UsageError("--pool-only trains the extractor pool: add --extractor pool (or --preset ncfm-paper)")
    if not args.pool_only:
        check_out_folder(args)
    log = (lambda message: print(message, flush=True)) if processes.main else (lambda message: None)
    torch.manual_seed(args.seed)  # nothing should draw from the global generator; pin it anyway
    out = Path(args.out)
    log(f"distill.py: {args.method} on {args.dataset}, IF {args.imbalance_factor:g}, IPC {args.ipc}, "
        f"{args.iterations} iterations, device {device} ({resolve_precision(args.precision, device, args.compile)})"
        + (f", {processes.world} processes" if processes.world > 1 else ""))
    data = processes.main_first(lambda: load_from_args(args, log=log))  # one download, one cache file
    check_network(args, data)
    if args.pool_only:
        extractor_pool(args, data, resolved_config(args, data)["depth"], device, processes, log)
        log(f"the pool of {args.pool_size} networks is in {pool_folder(args)}")
        return
    try:
        checkpoint = prepare_out_folder(args, data, processes, log)
    except Finished as done:
        log(str(done))
        return
    stop = StopRequest()
    stop.install()
    start = time.time()
    try:
        result = distill(args, data, device, log=log, processes=processes, stop=stop, checkpoint=checkpoint)
    except Diverged as error:
        print(f"distill.py: error: {error}; {last_checkpoint(out)}", file=sys.stderr, flush=True)
        sys.exit(1)
    if result["stopped"]:
        if processes.main:
            report_stop("distill.py", result, out, processes.world)
        sys.exit(128 + result["stopped"])
    if processes.main:
        run_info = dict(environment(), device=str(device), processes=processes.world, data_source=data.source,
                        wall_seconds=round(result["history"][-1][2] if result["history"] else 0.0, 1),
                        iterations_done=result["iterations_done"],
                        finished=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()),
                        session_seconds=round(time.time() - start, 1), stretches=result["stretches"])
        write_outputs(result, out, run_info)
        log(f"wrote {out / 'synthetic.pt'} ({len(result['labels'])} images)")


def last_checkpoint(out: Path) -> str:
    """Which good checkpoint a diverged run leaves, and after how many iterations."""
    path = out / "checkpoint.pt"
    if not path.exists():
        return "no checkpoint was written yet"
    try:
        done = torch.load(path, map_location="cpu", weights_only=True)["iteration"]
        return f"the last good checkpoint is {path}, after {done} iterations"
    except Exception:
        return f"the last checkpoint is {path}"


def main(argv=None) -> None:
    run_script(build_parser(), job, argv)


if __name__ == "__main__":
    keep_freed_memory()  # this process is the script's own: glibc keeps freed memory for the next pass (runs.py)
    main()
