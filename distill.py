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

A checkpoint is written every --ckpt-every iterations and when the run is stopped by SIGINT or SIGTERM;
--resume continues from it and, on the same kind of device, ends with the same synthetic set as an
uninterrupted run (every random draw is a function of the seed and the iteration: there is no generator state
to save). The draws come from torch.Generator on the device, which gives other numbers on CUDA than on a CPU:
a run resumed on another kind says so and continues with other draws (run.json records each sitting's device).
The output folder's files, the checkpoint's contents and the guards on --out: distill_runs.py.

When a class has fewer real images than --ipc (IPC 50 at IF 200), its first n_c synthetic images are
its n_c real images and each further one repeats one of them under a seeded geometric DSA
transformation, so that no two start identical. When it has fewer than --batch-real, every iteration
uses all of them.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from data_lt import (DSA_PAIRINGS, LongTailedData, RealBatchSampler, UsageError, add_data_arguments, check_factor,
                     counter_seed, counter_uniform, decode, dsa_augment, dsa_uniforms_siamese, finite_float,
                     data_seed, initial_synthetic, load_from_args)
from distill_runs import (check_finite, check_out_folder, Diverged, Finished, KERNEL_NAMES, last_checkpoint,
                          LoopState, prepare_out_folder, report_stop, restore_optimizer, run_record, save_checkpoint,
                          stretches_done, stretches_so_far, StopRequest, write_outputs)
from networks import (NORMS, POOLINGS, PRECISIONS, autocast, depth_for_size, in_micro_batches, micro_batch_size,
                      reset_parameters_, resolve_precision)
from pool import convnet, extractor_pool, pool_folder, STREAM_POOL
from runs import (check_positive, compile_or_eager, FORMAT_VERSION, keep_freed_memory, OneLineParser, Processes,
                  Progress, resolve_device, run_script, start_processes, step_or_fall_back)
from methods import DISTILLED, METHODS, SPECTRAL, default_lr_img, per_class_loss
from sdd import (ALPHA_HEAD, ALPHA_TAIL, KERNELS, class_median_distances, class_weights, kernel_metric_p,
                 sample_frequencies)
from training import POOL_SCHEDULES, class_log_prior

STREAM_NETWORK, STREAM_FREQS = 11, 12  # the counter streams of the random networks and the frequencies (pool: 13)
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
                   help="optimiser on pixels: SGD with momentum 0.5 (DM), Adam (free of the loss's scale) or "
                        "AdamW (PyTorch's defaults, as NCFM) "
                        "(default: per method, methods.METHODS)")
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
    g.add_argument("--seed", type=int, default=0,
                   help="the one seed of the run: init, networks, frequencies, batches, DSA, and the long-tailed "
                        "subset unless --data-seed gives it apart")
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


def resolve(args, data: LongTailedData) -> argparse.Namespace:
    """The run's one record of its options: every default that depends on the method, the data or the device filled
    in. The pool, the out folder and the loop read it alone; its vars() are the config the outputs record."""
    optimizer_name = args.optimizer or METHODS[args.method].optimizer
    return argparse.Namespace(**dict(
        vars(args), data_seed=data_seed(args), depth=args.depth or depth_for_size(data.image_size),
        optimizer=optimizer_name, lr_img=args.lr_img or default_lr_img(optimizer_name, args.method),
        precision=resolve_precision(args.precision, resolve_device(args.device), args.compile),
        format_version=FORMAT_VERSION, kernel_names=KERNEL_NAMES))


def check_network(run, data: LongTailedData) -> None:
    """The ConvNet must fit the images (a depth that pools them below one pixel does not)."""
    try:
        convnet(run, data, torch.device("cpu"))
    except ValueError as error:
        raise UsageError(f"--depth: {error}")
    check_factor(run.factor, data.image_size)


# ----------------------------------------------------------------------------------------
# The loop's parts: this process's share of the set, the extractor, the matching loss

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

    def __init__(self, run, data: LongTailedData, device, processes: Processes, log):
        self.run, self.device = run, device
        self.net = convnet(run, data, device).requires_grad_(False)
        self.embed = compile_or_eager(self._embed, run.compile)
        self.compiled = [self.embed]  # the compiled functions a step runs through
        self.pool = None
        if run.extractor == "pool":
            self.pool = [{part: {name: value.to(device) for name, value in network[part].items()}
                          for part in ("init", "trained")}
                         for network in extractor_pool(run, data, device, processes, log)]
        self.calibrator = None
        if run.calibration > 0:
            self.calibrator = convnet(run, data, device).requires_grad_(False)
            self.logit_shift = -run.calibration_tau * class_log_prior(data.class_counts, device)  # (C,)
            self.classify = compile_or_eager(self._classify, run.compile)
            self.compiled.append(self.classify)

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim

    def _embed(self, x):
        with autocast(self.device, self.run.precision):
            return self.net.embed(x).float()

    def _classify(self, x):
        """The calibrator's float32 logits (autocast as embed), logit-adjusted: f(x) - tau log prior."""
        with autocast(self.device, self.run.precision):
            return adjusted_logits(self.calibrator(x).float(), self.logit_shift)

    @torch.no_grad()
    def draw(self, iteration: int) -> None:
        """Set the networks for `iteration`, from (seed, iteration) alone."""
        seed = self.run.seed
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


def draw_frequencies(run, iteration: int, dim: int, device) -> torch.Tensor | None:
    """The iteration's M standard spectral draws (M, dim) of the kernel; the bandwidth scales them inside
    the loss. None for the losses without frequencies (dm, mmd)."""
    if run.method not in SPECTRAL:
        return None
    generator = torch.Generator(device=device).manual_seed(counter_seed(run.seed, STREAM_FREQS, iteration))
    return sample_frequencies(run.num_freqs, dim, run.kernel, 1.0, generator=generator, device=device,
                              beta=run.imq_beta)


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

    def __init__(self, run, data: LongTailedData, shard: Shard, alpha: torch.Tensor, device):
        self.run, self.data, self.shard, self.device = run, data, shard, device
        self.tiles = run.factor ** 2
        self.local_alpha = alpha[shard.classes].to(device)
        self.train_images, self.train_labels = data.train_images.to(device), data.train_labels.to(device)
        self.sampler = RealBatchSampler(self.train_labels, data.num_classes, run.batch_real, run.seed,
                                        shard.classes.to(device))
        self.normalise_features = run.method != "dm" and run.feature_norm == "l2"
        # the spectral loss's projection w . x follows the network's precision (sdd.class_characteristic_functions)
        self.projection_dtype = torch.bfloat16 if run.precision == "bf16" else None
        # batch norm: each class's real and synthetic images go through the network alone and whole (as in
        # DM's code), so its batch statistics are the class's, whatever the chunks, micro-batches or processes
        per_class = run.norm == "batch"
        self.micro = None if per_class else micro_batch_size(device, data.image_size)
        self.real_chunk = None if per_class else self.micro or 1024
        per_chunk = 1 if per_class or run.class_steps else (
            run.class_chunk or chunk_classes(run.batch_real, run.ipc * self.tiles))
        self.chunks = [(a, min(a + per_chunk, len(shard.classes))) for a in range(0, len(shard.classes), per_chunk)]

    def steps(self) -> list[list[tuple[int, int]]]:
        """The chunks of each optimiser step of an iteration: all of them in one step, or with --class-steps
        one step per class (NCFM)."""
        return [[chunk] for chunk in self.chunks] if self.run.class_steps else [self.chunks]

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
        run, shard = self.run, self.shard
        in_rows = (shard.row_local >= first) & (shard.row_local < last)
        in_syn = in_rows.repeat_interleave(self.tiles)
        real_class, syn_class = self.train_labels[index], shard.syn_class[in_syn]
        real = dsa_augment(self.data.normalise(self.train_images[index]),
                           dsa_uniforms_siamese(run.seed, iteration, real_class, position, run.dsa_pairing))
        decoded = decode(syn if len(self.chunks) == 1 else syn[in_rows], run.factor)
        syn_aug = dsa_augment(decoded, dsa_uniforms_siamese(run.seed, iteration, syn_class,
                                                            shard.syn_position[in_syn], run.dsa_pairing))
        syn_aug = syn_aug.contiguous(memory_format=torch.channels_last)
        real_features = embed_in_chunks(extractor.embed, real, self.real_chunk)
        syn_features = in_micro_batches(extractor.embed, syn_aug, self.micro)
        if self.normalise_features:
            real_features, syn_features = F.normalize(real_features, dim=1), F.normalize(syn_features, dim=1)
        real_labels, syn_labels = shard.local_of_class[real_class] - first, shard.syn_local[in_syn] - first
        bandwidth = run.bandwidth
        if run.bandwidth_rule == "median":
            bandwidth = run.bandwidth * class_median_distances(real_features, real_labels, last - first,
                                                                p=kernel_metric_p(run.kernel))
        loss = per_class_loss(run.method, real_features, real_labels, syn_features, syn_labels, last - first,
                              freqs=freqs, alpha=self.local_alpha[first:last], bandwidth=bandwidth,
                              projection_dtype=self.projection_dtype).sum()
        if extractor.calibrator is not None:  # sum over classes of each class's mean cross-entropy
            logits = in_micro_batches(extractor.classify, syn_aug, self.micro)
            loss = loss + run.calibration * F.cross_entropy(logits, syn_class, reduction="sum") / (
                run.ipc * self.tiles)
        return loss


# ----------------------------------------------------------------------------------------
# The loop

def starting_state(run, init_images, shard: Shard, checkpoint: dict | None, device) -> LoopState:
    """The real initialisation, or the checkpoint's images and optimiser state; this process's rows."""
    images = checkpoint["images"] if checkpoint is not None else init_images
    syn = images[shard.rows].clone().to(device).requires_grad_(True)
    optimizer = {"sgd": lambda: torch.optim.SGD([syn], lr=run.lr_img, momentum=0.5),
                 "adam": lambda: torch.optim.Adam([syn], lr=run.lr_img),
                 "adamw": lambda: torch.optim.AdamW([syn], lr=run.lr_img)}[run.optimizer]()
    if checkpoint is None:
        return LoopState(syn, optimizer, 0, [], 0.0)
    restore_optimizer(optimizer, checkpoint["optimizer"], shard.rows)
    return LoopState(syn, optimizer, checkpoint["iteration"], [tuple(h) for h in checkpoint["history"]],
                     checkpoint["elapsed"])


def distill(run, data: LongTailedData, device: torch.device, log=print, processes: Processes | None = None,
            stop: StopRequest | None = None, checkpoint: dict | None = None) -> dict:
    """Run (or continue) the distillation of `run` (resolve); returns the synthetic set and the loss history.

    Writes checkpoint.pt into run.out every run.ckpt_every iterations. If `stop` is set by a
    signal, writes a checkpoint and returns early with result["stopped"] = signal number."""
    processes = processes or Processes()
    init_images, all_labels = initial_synthetic(data, run.ipc, run.seed, run.factor)
    shard = Shard.of(processes, all_labels, data.num_classes, run.ipc, run.factor ** 2, device)
    state = starting_state(run, init_images, shard, checkpoint, device)
    state.stretches = stretches_so_far(checkpoint, state.start_iteration, device, processes)
    extractor = Extractor(run, data, device, processes, log)
    alpha = (class_weights(data.class_counts, run.alpha_head, run.alpha_tail) if class_aware(run)
             else torch.full((data.num_classes,), 0.5))
    if class_aware(run):
        log("alpha (amplitude weight) per class: " + " ".join(f"{a:.2f}" for a in alpha.tolist()))
    matcher = Matcher(run, data, shard, alpha, device)
    checkpoint_at = lambda done, elapsed: save_checkpoint(state, shard.rows, len(all_labels), done, elapsed,
                                                          vars(run), processes, Path(run.out))
    progress = Progress(run.iterations, state.start_iteration, run.log_every, log, enabled=processes.main,
                        elapsed_before=state.elapsed_before)
    start, stopped = time.perf_counter(), 0
    for iteration in range(state.start_iteration, run.iterations):
        extractor.draw(iteration)
        freqs = draw_frequencies(run, iteration, extractor.feature_dim, device)
        loss = sum(step_or_fall_back(lambda: update(state, matcher, iteration, extractor, freqs, chunks),
                                     extractor.compiled) for chunks in matcher.steps())
        value, signalled = check_finite(loss, state.syn, stop, processes, iteration)
        elapsed = state.elapsed_before + time.perf_counter() - start
        state.history.append((iteration, value, elapsed))
        progress.update(iteration + 1, value, elapsed)
        if signalled or (iteration + 1) % run.ckpt_every == 0 or iteration + 1 == run.iterations:
            checkpoint_at(iteration + 1, elapsed)  # the last one lets --resume extend --iterations
        if signalled:
            stopped = (stop.signal_number if stop else 0) or signal.SIGTERM  # the sum names no one signal
            break
    progress.close()
    packed = processes.gather_rows(shard.rows, state.syn.detach().cpu().float(), len(all_labels))
    return {
        "images": decode(packed, run.factor) if packed is not None else None,
        "labels": all_labels.repeat_interleave(run.factor ** 2), "packed_images": packed,
        "init_images": init_images, "mean": list(data.mean), "std": list(data.std),
        "class_names": list(data.class_names), "class_counts": list(data.class_counts),
        "alpha": alpha.tolist(), "config": vars(run), "history": state.history, "stopped": stopped,
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
# The job: options, data, then the pool alone or the loop and its outputs

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
    data = processes.main_first(lambda: load_from_args(args, log=log))  # one download, one cache file
    run = resolve(args, data)  # from here on the one record of the options
    out = Path(run.out)
    log(f"distill.py: {run.method} on {run.dataset}, IF {run.imbalance_factor:g}, IPC {run.ipc}, {run.iterations} "
        f"iterations, device {device} ({run.precision})"
        + (f", {processes.world} processes" if processes.world > 1 else ""))
    check_network(run, data)
    if run.pool_only:
        extractor_pool(run, data, device, processes, log)
        log(f"the pool of {run.pool_size} networks is in {pool_folder(run)}")
        return
    try:
        checkpoint = prepare_out_folder(run, processes, log)
    except Finished as done:
        log(str(done))
        return
    stop = StopRequest()
    stop.install()
    start = time.time()
    try:
        result = distill(run, data, device, log=log, processes=processes, stop=stop, checkpoint=checkpoint)
    except Diverged as error:
        print(f"distill.py: error: {error}; {last_checkpoint(out)}", file=sys.stderr, flush=True)
        sys.exit(1)
    if result["stopped"]:
        if processes.main:
            report_stop("distill.py", result, out, processes.world)
        sys.exit(128 + result["stopped"])
    if processes.main:
        write_outputs(result, out, run_record(device, processes, data.source, result, start))
        log(f"wrote {out / 'synthetic.pt'} ({len(result['labels'])} images)")


def main(argv=None) -> None:
    run_script(build_parser(), job, argv)


if __name__ == "__main__":
    keep_freed_memory()  # this process is the script's own: glibc keeps freed memory for the next pass (runs.py)
    main()
