"""Distill a long-tailed data set into IPC synthetic images per class by distribution matching.

$ python distill.py --method csdm --dataset cifar10 --imbalance-factor 200 --ipc 10 --out runs/csdm
$ python distill.py --method dm --dataset cifar10 --data-dir data/cifar10 --iterations 200 --batch-real 64 \
      --device cpu --out runs/dm
$ python distill.py ... --out runs/csdm --resume               # continue a stopped run
$ torchrun --nproc_per_node=4 distill.py --method csdm ...      # classes sharded across 4 processes

The DM loop (Zhao & Bilen, WACV 2023), method.md section 6: the synthetic images
start from real images of their class; every iteration draws a fresh randomly
initialised ConvNet, a batch of up to --batch-real real images of every class,
one siamese DSA transformation per class and sample position shared by the
real and the synthetic batch, and --num-freqs frequencies from the kernel's
spectrum; it embeds both batches, computes the matching loss of every class in
one call (sdd.per_class_loss), sums it over classes and takes one optimiser
step on the synthetic pixels.

With --extractor pool the extractor is one of a pool of briefly trained ConvNets
blended with its initialisation (NCFM), and --calibration lambda adds NCFM's
cross-entropy calibration term: the same pool network, fully trained, classifies
the augmented synthetic images, and the loss gains
lambda * sum_c mean_{i in c} CE(f_trained(x_i), c).

Methods: csdm (class-aware SDD), sdm (SDD, alpha = 1/2), ncfm (NCFM's square-root
CF loss), mmd (exact Gaussian MMD^2), dm (mean matching).

The output folder holds synthetic.pt (images, labels, mean, std, class_names,
class_counts, config), synthetic.png (one row per class), init.png (the real
initialisation), init_vs_final.png, loss.csv and loss.png, config.json, run.json
(command line, commit, versions, device, wall time) and a README.md of the run.
Read synthetic.pt with torch.load(path, weights_only=True).

A checkpoint (checkpoint.pt: images, optimiser state, iteration, the generators'
state, config) is written atomically every --ckpt-every iterations and when the
run is stopped by SIGINT or SIGTERM; --resume continues from it and ends with the
same synthetic set as an uninterrupted run.

When a class has fewer real images than --ipc (IPC 50 at IF 200), its first n_c
synthetic images are its n_c real images and each further one repeats one of
them under a seeded geometric DSA transformation (shift, flip, scale or rotation),
so that no two start identical. When it has fewer than --batch-real, every
iteration uses all of them.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange

from data_lt import (DSA_OPS, DSA_SLOTS, STREAM_INIT, STREAM_REAL_BATCH, LongTailedData, UsageError,
                     add_data_arguments, cache_dir, counter_seed, counter_uniform, draw_per_class, dsa_augment,
                     dsa_uniforms_siamese, load_from_args)
from networks import (NORMS, POOLINGS, PRECISIONS, ConvNet, autocast, depth_for_size, in_micro_batches,
                      micro_batch_size, reset_parameters_, resolve_precision)
from sdd import (ALPHA_HEAD, ALPHA_TAIL, KERNELS, METHODS, SPECTRAL_METHODS, class_median_distances, class_weights,
                 kernel_metric_p, per_class_loss, sample_frequencies)

FORMAT_VERSION = 1
STREAM_NETWORK, STREAM_FREQS, STREAM_POOL = 11, 12, 13
# Optimiser and learning rate on pixels per method, picked on the validation split (README, "How the
# defaults were chosen"). dm: the DM paper's SGD, lr 1, momentum 0.5. The kernel losses (sdm, csdm, ncfm,
# mmd) are ~1e-2 per class, so SGD at lr 1 hardly moves the pixels (csdm 27.4 % on validation, random
# images 27.6 %); Adam is free of the loss's scale. Their SGD rate, 500, was validated for csdm only.
DEFAULT_OPTIMIZER = {"dm": "sgd", "mmd": "adam", "sdm": "adam", "csdm": "adam", "ncfm": "adam"}
DEFAULT_LR_IMG = {("sgd", "dm"): 1.0, ("sgd", "mmd"): 500.0, ("sgd", "sdm"): 500.0, ("sgd", "csdm"): 500.0,
                  ("sgd", "ncfm"): 500.0, ("adam", "dm"): 0.01, ("adam", "mmd"): 0.01, ("adam", "sdm"): 0.01,
                  ("adam", "csdm"): 0.01, ("adam", "ncfm"): 0.01}
# options that may change between a checkpoint and its --resume: where and how a run is executed,
# not what it computes (--iterations may grow: nothing depends on the total)
RUN_OPTIONS = {"iterations", "device", "out", "log_every", "ckpt_every", "resume", "overwrite", "data_dir",
               "class_chunk", "compile"}
# options added after checkpoints were first written, with the value that older checkpoints ran with
ADDED_OPTIONS = {"calibration": 0.0}
RUN_FILES = ("synthetic.pt", "checkpoint.pt", "config.json", "results.json")


# ----------------------------------------------------------------------------------------
# Options

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="distill.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="csdm", choices=METHODS, help="matching loss")
    add_data_arguments(p)
    g = p.add_argument_group("distillation")
    g.add_argument("--ipc", type=int, default=10, help="synthetic images per class")
    g.add_argument("--iterations", type=int, default=20000, help="optimiser steps on the synthetic images")
    g.add_argument("--batch-real", type=int, default=256, help="real images per class per iteration")
    g.add_argument("--optimizer", default=None, choices=("sgd", "adam"),
                   help=f"optimiser on pixels: SGD with momentum 0.5 (DM) or Adam (free of the loss's scale) "
                        f"(default: per method, {DEFAULT_OPTIMIZER})")
    g.add_argument("--lr-img", type=float, default=None,
                   help="learning rate on pixels (default: per method and optimiser, DEFAULT_LR_IMG in distill.py)")
    g.add_argument("--factor", type=int, default=2,
                   help="multi-formation (NCFM, IDC): each synthetic image holds factor x factor tiles, each "
                        "decoded to a full-size training image, so the set has IPC x factor^2 images per class "
                        "(default 2, chosen on the validation split; 1: one image per stored image, as DM)")
    g.add_argument("--extractor", default="random", choices=("random", "pool"),
                   help="feature extractor per iteration: a fresh random ConvNet (DM), or one of a pool of "
                        "ConvNets trained briefly on the long-tailed set, blended with its initialisation (NCFM)")
    g.add_argument("--pool-size", type=int, default=4, help="--extractor pool: networks in the pool")
    g.add_argument("--pool-epochs", type=int, default=3, help="--extractor pool: training epochs of each network")
    g.add_argument("--calibration", type=float, default=0.0,
                   help="--extractor pool: weight of NCFM's cross-entropy calibration term (the iteration's pool "
                        "network, trained, classifies the synthetic images); 0: off")
    g.add_argument("--class-chunk", type=int, default=0,
                   help="classes embedded and matched together (0: as many as keep about 4096 images, at most "
                        "1024 of them synthetic, in a chunk); bounds memory for many classes, the result is the same")
    g = p.add_argument_group("loss")
    g.add_argument("--kernel", default="gaussian", choices=KERNELS, help="universal kernel of the spectral methods")
    g.add_argument("--num-freqs", type=int, default=1024, help="frequencies M drawn per iteration")
    g.add_argument("--bandwidth", type=float, default=1.0,
                   help="kernel bandwidth sigma (with --bandwidth-rule median: a multiple of the median distance)")
    g.add_argument("--bandwidth-rule", default="fixed", choices=("fixed", "median"),
                   help="fixed sigma, or per class sigma_c = bandwidth x median pairwise distance of the "
                        "iteration's real features of class c, in the kernel's metric (L1 for laplacian, else L2)")
    g.add_argument("--feature-norm", default="l2", choices=("l2", "none"),
                   help="L2-normalise features before the spectral and mmd losses (dm always uses raw features)")
    g.add_argument("--alpha-head", type=float, default=ALPHA_HEAD, help="csdm: amplitude weight of the head class")
    g.add_argument("--alpha-tail", type=float, default=ALPHA_TAIL, help="csdm: amplitude weight of the tail class")
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
                        "auto: bf16 where it is fast (GPUs; CPUs with AMX when --compile)")
    g.add_argument("--compile", action="store_true", help="torch.compile the extractor (pays off past ~100 iterations)")
    g.add_argument("--ckpt-every", type=int, default=100, help="write checkpoint.pt every N iterations")
    g.add_argument("--resume", action="store_true", help="continue from checkpoint.pt in --out")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    g.add_argument("--log-every", type=int, default=50, help="print the loss every N iterations (when not a terminal)")
    return p


def check_options(args) -> None:
    """Reject impossible values with the option's name and the fix."""
    positive = {"--ipc": args.ipc, "--iterations": args.iterations, "--batch-real": args.batch_real,
                "--num-freqs": args.num_freqs, "--width": args.width, "--log-every": args.log_every,
                "--ckpt-every": args.ckpt_every, "--factor": args.factor, "--pool-size": args.pool_size,
                "--pool-epochs": args.pool_epochs}
    for option, value in positive.items():
        if value < 1:
            raise UsageError(f"{option} must be >= 1 (got {value})")
    if args.class_chunk < 0:
        raise UsageError(f"--class-chunk must be >= 0 (got {args.class_chunk}); 0 picks it from the batch size")
    if args.depth is not None and args.depth < 1:
        raise UsageError(f"--depth must be >= 1 (got {args.depth})")
    if args.lr_img is not None and not args.lr_img > 0:
        raise UsageError(f"--lr-img must be > 0 (got {args.lr_img})")
    if not args.bandwidth > 0:
        raise UsageError(f"--bandwidth must be > 0 (got {args.bandwidth})")
    if args.class_aware and args.method not in ("sdm", "ncfm", "csdm"):
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
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one of them")


def class_aware(args) -> bool:
    """csdm, or sdm / ncfm with --class-aware: alpha_c from the class counts instead of 1/2."""
    return args.method == "csdm" or args.class_aware


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; anything else must exist on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: '{name}' is not a device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return device


def check_out_folder(args) -> None:
    """Refuse to write into another run's folder unless told to resume it or replace it."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not (args.resume or args.overwrite):
        raise UsageError(f"--out {out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                         f"--overwrite to replace it, or another --out")


# ----------------------------------------------------------------------------------------
# Processes: one, or several under torchrun, each owning a subset of the classes

@dataclass
class Processes:
    """This process's place in the job. Classes are dealt round-robin (c % world == rank), which
    spreads head and tail classes evenly. world == 1 is the plain single-process run."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def classes(self, num_classes: int) -> torch.Tensor:
        return torch.arange(self.rank, num_classes, self.world)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over processes (identity for one process)."""
        if self.world > 1:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def gather_rows(self, rows: torch.Tensor, values: torch.Tensor, total: int) -> torch.Tensor | None:
        """Assemble per-process row blocks into one (total, ...) tensor on the main process."""
        if self.world == 1:
            out = values.new_empty((total,) + values.shape[1:])
            out[rows] = values
            return out
        parts = [None] * self.world
        dist.all_gather_object(parts, (rows.cpu(), values.detach().cpu()))
        if not self.main:
            return None
        out = parts[0][1].new_empty((total,) + parts[0][1].shape[1:])
        for part_rows, part_values in parts:
            out[part_rows] = part_values
        return out

    def finish(self, clean: bool) -> None:
        """Leave the torchrun job. After a clean run every process first waits at a barrier, so that no
        process tears its connections down while another still works (writes the outputs, or is in a
        collective); after an error the group is destroyed at once, as a barrier could wait forever."""
        if self.world == 1 or not dist.is_initialized():
            return
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def start_processes(device_name: str) -> tuple[Processes, torch.device]:
    """Join the torchrun job if there is one (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(), resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world), device


# ----------------------------------------------------------------------------------------
# Synthetic set and real batches

def initial_synthetic(data: LongTailedData, ipc: int, seed: int, factor: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Real initialisation: ipc normalised real images per class, (C * ipc, ch, H, W), and labels.

    With factor f, each synthetic image is f x f real images of its class, each shrunk to H/f
    and tiled (multi-formation). Slots beyond a class's n_c real images repeat them under a
    seeded geometric DSA transformation (crop shift, forced flip, scale or rotation)."""
    index, repeat = draw_per_class(data.train_labels, ipc * factor ** 2, data.num_classes, seed)
    images = data.normalise(data.train_images[index])
    labels = data.train_labels[index]
    if bool(repeat.any()):
        slots = torch.nonzero(repeat).squeeze(1)
        u = counter_uniform(seed, STREAM_INIT, slots[:, None], torch.arange(DSA_SLOTS)[None, :])
        geometric = torch.tensor([DSA_OPS.index(op) for op in ("crop", "flip", "scale", "rotate")])
        op = geometric[(u[:, 0] * len(geometric)).long().clamp_max(len(geometric) - 1)]
        u[:, 0] = (op.float() + 0.5) / len(DSA_OPS)
        u[:, 8] = 0.0  # the flip operation always flips
        images[slots] = dsa_augment(images[slots], u)
    if factor == 1:
        return images, labels
    size = data.image_size
    tiles = F.interpolate(images, size=(size // factor, size // factor), mode="bilinear", antialias=True,
                          align_corners=False)
    packed = rearrange(tiles, "(n fh fw) c h w -> n c (fh h) (fw w)", fh=factor, fw=factor)
    return F.pad(packed, (0, size - packed.shape[-1], 0, size - packed.shape[-2])), labels[::factor ** 2]


def decode(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Multi-formation decoding: (N, c, H, W) -> (N * factor^2, c, H, W), each tile upsampled to H x W."""
    if factor == 1:
        return images
    size = images.shape[-1]
    tile = size // factor
    tiles = rearrange(images[..., :tile * factor, :tile * factor], "n c (fh h) (fw w) -> (n fh fw) c h w",
                      fh=factor, fw=factor)
    return F.interpolate(tiles, size=(size, size), mode="bilinear", align_corners=False)


class RealBatchSampler:
    """Every iteration, up to batch_real images of each of `classes`, drawn without replacement.

    The draw is a function of (seed, iteration, image) only: image j's random key is
    counter_uniform(seed, stream, iteration, j) for its index j in the whole training
    set, and each class takes its batch_real smallest keys. So a class's batch does not
    depend on which other classes this process handles."""

    def __init__(self, labels: torch.Tensor, num_classes: int, batch_real: int, seed: int,
                 classes: torch.Tensor | None = None):
        mine = torch.ones(num_classes, dtype=torch.bool, device=labels.device)
        if classes is not None:
            mine = torch.zeros_like(mine)
            mine[classes.to(labels.device)] = True
        self.index = torch.nonzero(mine[labels]).squeeze(1)  # global indices of this process's images
        self.labels = labels[self.index]
        self.batch_real, self.seed = batch_real, seed
        counts = torch.bincount(self.labels, minlength=num_classes)
        self.starts = torch.cumsum(counts, 0) - counts

    def sample(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices into the training set, position of each within its class batch)."""
        keys = counter_uniform(self.seed, STREAM_REAL_BATCH, iteration, self.index, device=self.index.device)
        order = torch.argsort(self.labels.double() + keys.double(), stable=True)
        position = torch.arange(len(order), device=order.device) - self.starts[self.labels[order]]
        keep = position < self.batch_real
        return self.index[order[keep]], position[keep]


def chunk_classes(batch_real: int, decoded_per_class: int, images: int = 4096, with_grad: int = 1024) -> int:
    """Classes per chunk when --class-chunk is 0: at most `images` images through the extractor and at most
    `with_grad` decoded synthetic images (whose activations stay alive for the backward pass; the real
    ones run without a graph) in one chunk, and at least one class."""
    return max(1, min(images // (batch_real + decoded_per_class), with_grad // decoded_per_class))


def embed_in_chunks(embed, images: torch.Tensor, chunk: int | None = 1024) -> torch.Tensor:
    """embed(images) over row chunks, without building a graph (real images need no gradient)."""
    with torch.no_grad():
        return in_micro_batches(embed, images.contiguous(memory_format=torch.channels_last), chunk or 1024)


# ----------------------------------------------------------------------------------------
# Checkpoints

def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, flushed to disk, then renamed over `path`: a crash
    mid-write leaves the previous file in place."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    theirs, ours = ADDED_OPTIONS | comparable_config(checkpoint["config"]), comparable_config(config)
    differences = [f"--{key.replace('_', '-')} {theirs.get(key)} (checkpoint) vs {ours.get(key)} (now)"
                   for key in sorted(set(theirs) | set(ours)) if theirs.get(key) != ours.get(key)]
    if differences:
        raise UsageError(f"--resume: {path} was made with other options: {'; '.join(differences)}; "
                         f"rerun with the checkpoint's options, or start again with --overwrite")
    return checkpoint


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
# The loop

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
    """Where the trained extractor pool for this data and network is cached."""
    key = (data.name, tuple(data.class_counts), data.channels, data.image_size, args.val_per_class, args.seed,
           args.width, depth, args.norm, args.pooling, args.pool_size, args.pool_epochs, precision)
    digest = hashlib.sha1(repr(key).encode()).hexdigest()[:16]
    return cache_dir() / "pools" / f"pool-{digest}.pt"


def extractor_pool(args, data: LongTailedData, depth: int, device: torch.device, processes: Processes,
                   log=print) -> list[dict]:
    """NCFM's pool: --pool-size ConvNets, each trained --pool-epochs epochs on the long-tailed set
    (the evaluation protocol's SGD and DSA), kept with its initialisation. Trained once, cached,
    and split across processes under torchrun."""
    from evaluate import train_network  # the training loop of the evaluation protocol (lazy: evaluate imports us)

    precision = resolve_precision(args.precision, device, args.compile)
    path = pool_file(args, data, depth, precision)
    if path.exists():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)["networks"]
        except Exception:
            log(f"extractor pool {path} unreadable; training it again")
    log(f"training the extractor pool: {args.pool_size} networks x {args.pool_epochs} epochs on "
        f"{len(data.train_labels)} images -> {path}")
    images, labels = data.normalise(data.train_images).to(device), data.train_labels.to(device)
    mine = []
    for k in range(processes.rank, args.pool_size, processes.world):
        generator = torch.Generator(device=device).manual_seed(counter_seed(args.seed, STREAM_POOL, k))
        net = ConvNet(data.channels, data.num_classes, args.width, depth, args.norm, args.pooling, data.image_size)
        net = reset_parameters_(net.to(device).to(memory_format=torch.channels_last), generator)
        init = {name: value.detach().cpu().clone() for name, value in net.state_dict().items()}
        train_network(net, images, labels, args.pool_epochs, 256, 0.01, generator, precision=precision,
                      compile=args.compile)
        trained = {name: value.detach().cpu().clone() for name, value in net.state_dict().items()}
        mine.append((k, {"init": init, "trained": trained}))
        log(f"  pool network {k + 1}/{args.pool_size} trained")
    if processes.world > 1:
        parts = [None] * processes.world
        dist.all_gather_object(parts, mine)
        mine = [entry for part in parts for entry in part]
    networks = [network for _, network in sorted(mine, key=lambda entry: entry[0])]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"networks": networks}, path)
    return networks


def distill(args, data: LongTailedData, device: torch.device, log=print, processes: Processes | None = None,
            stop: StopRequest | None = None, checkpoint: dict | None = None) -> dict:
    """Run (or continue) the distillation; returns the synthetic set and the loss history.

    Writes checkpoint.pt into args.out every args.ckpt_every iterations. If `stop` is set by a
    signal, writes a checkpoint and returns early with result["stopped"] = signal number."""
    processes = processes or Processes()
    num_classes = data.num_classes
    config = resolved_config(args, data)
    depth, lr_img, optimizer_name, factor = config["depth"], config["lr_img"], config["optimizer"], args.factor
    precision = config["precision"]

    init_images, all_labels = initial_synthetic(data, args.ipc, args.seed, factor)
    # this process's classes and their rows of the synthetic set (all of them for one process)
    classes = processes.classes(num_classes)
    rows = torch.nonzero(torch.isin(all_labels, classes)).squeeze(1)
    local_of_class = torch.full((num_classes,), -1, dtype=torch.long)
    local_of_class[classes] = torch.arange(len(classes))
    start_iteration, history, elapsed_before = 0, [], 0.0
    images = init_images
    if checkpoint is not None:
        images = checkpoint["images"]
        start_iteration, history = checkpoint["iteration"], [tuple(h) for h in checkpoint["history"]]
        elapsed_before = checkpoint["elapsed"]
    syn = images[rows].clone().to(device).requires_grad_(True)
    optimizer = (torch.optim.SGD([syn], lr=lr_img, momentum=0.5) if optimizer_name == "sgd"
                 else torch.optim.Adam([syn], lr=lr_img))
    if checkpoint is not None:
        restore_optimizer(optimizer, checkpoint["optimizer"], rows)
    # decoded synthetic images (factor^2 per stored image): local class, global class, position in class
    tiles = factor ** 2
    syn_row_local = local_of_class[all_labels[rows]].to(device)
    syn_local = syn_row_local.repeat_interleave(tiles)
    syn_class = all_labels[rows].repeat_interleave(tiles).to(device)
    syn_position = ((rows % args.ipc)[:, None] * tiles + torch.arange(tiles)).flatten().to(device)

    net = ConvNet(data.channels, num_classes, args.width, depth, args.norm, args.pooling, data.image_size)
    net = net.to(device).to(memory_format=torch.channels_last).requires_grad_(False)

    def embed(x):  # float32 features, the network under bf16 autocast if asked
        with autocast(device, precision):
            return net.embed(x).float()

    embed = torch.compile(embed) if args.compile else embed
    # the spectral loss's projection w . x follows the network's precision (sdd.class_characteristic_functions)
    projection_dtype = torch.bfloat16 if precision == "bf16" else None
    # batch norm statistics would change with the micro-batches: keep whole batches then
    micro = micro_batch_size(device, data.image_size) if args.norm != "batch" else None
    pool, calibrator = None, None
    if args.extractor == "pool":
        pool = [{part: {name: value.to(device) for name, value in network[part].items()} for part in network}
                for network in extractor_pool(args, data, depth, device, processes, log)]
    if args.calibration > 0:  # the pool network of the iteration, trained, as a classifier
        calibrator = ConvNet(data.channels, num_classes, args.width, depth, args.norm, args.pooling, data.image_size)
        calibrator = calibrator.to(device).to(memory_format=torch.channels_last).requires_grad_(False)

        def classify(x):  # float32 logits, the network under bf16 autocast if asked (as embed)
            with autocast(device, precision):
                return calibrator(x).float()
    alpha = (class_weights(data.class_counts, args.alpha_head, args.alpha_tail) if class_aware(args)
             else torch.full((num_classes,), 0.5))
    local_alpha = alpha[classes].to(device)
    train_images, train_labels = data.train_images.to(device), data.train_labels.to(device)
    sampler = RealBatchSampler(train_labels, num_classes, args.batch_real, args.seed, classes.to(device))
    local_of_class_device = local_of_class.to(device)
    normalise_features = args.method != "dm" and args.feature_norm == "l2"
    per_chunk = args.class_chunk or chunk_classes(args.batch_real, args.ipc * tiles)
    chunks = [(a, min(a + per_chunk, len(classes))) for a in range(0, len(classes), per_chunk)]
    if class_aware(args):
        log("alpha (amplitude weight) per class: " + " ".join(f"{a:.2f}" for a in alpha.tolist()))

    def save_checkpoint(iteration: int, elapsed: float) -> None:
        full_images = processes.gather_rows(rows, syn.detach().cpu(), len(all_labels))
        state = {key: (processes.gather_rows(rows, value.cpu(), len(all_labels)) if value.dim() > 0 else value.cpu())
                 for key, value in optimizer_rows(optimizer).items()}
        if processes.main:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            atomic_save({"format_version": FORMAT_VERSION, "iteration": iteration, "images": full_images,
                         "optimizer": state, "history": history, "elapsed": elapsed, "config": config,
                         # the counter-based generators have no state beyond the seed and the iteration
                         "rng": {"seed": args.seed, "next_iteration": iteration,
                                 "torch_cpu": torch.get_rng_state()}},
                        Path(args.out) / "checkpoint.pt")

    progress = Progress(args.iterations, start_iteration, args.log_every, log, enabled=processes.main)
    start = time.perf_counter()
    stopped = 0
    for iteration in range(start_iteration, args.iterations):
        generator = torch.Generator(device=device).manual_seed(counter_seed(args.seed, STREAM_NETWORK, iteration))
        if pool is None:
            reset_parameters_(net, generator)
        else:  # NCFM: a pool network blended with its initialisation, l ~ U(0, 1)
            pick, blend = counter_uniform(args.seed, STREAM_POOL, iteration, torch.arange(2)).tolist()
            network = pool[min(int(pick * len(pool)), len(pool) - 1)]
            with torch.no_grad():
                for name, value in net.state_dict().items():
                    value.copy_(blend * network["init"][name] + (1 - blend) * network["trained"][name])
                if calibrator is not None:
                    calibrator.load_state_dict(network["trained"])
        freqs = None
        if args.method in SPECTRAL_METHODS:  # standard draws; the bandwidth scales them inside the loss
            freq_seed = counter_seed(args.seed, STREAM_FREQS, iteration)
            freq_generator = torch.Generator(device=device).manual_seed(freq_seed)
            freqs = sample_frequencies(args.num_freqs, net.feature_dim, args.kernel, 1.0,
                                       generator=freq_generator, device=device)

        index, position = sampler.sample(iteration)
        real_local = local_of_class_device[train_labels[index]]
        optimizer.zero_grad(set_to_none=True)
        loss_value = torch.zeros((), device=device)
        # classes in chunks: per-class losses are independent, so chunked backward passes add up to the
        # gradient of the whole sum while only one chunk's activations are alive at a time
        for first, last in chunks:
            in_real = (real_local >= first) & (real_local < last)
            in_rows = (syn_row_local >= first) & (syn_row_local < last)
            in_syn = in_rows.repeat_interleave(tiles)
            decoded = decode(syn if len(chunks) == 1 else syn[in_rows], factor)
            chunk_index, chunk_position = index[in_real], position[in_real]
            real_class = train_labels[chunk_index]
            real = dsa_augment(data.normalise(train_images[chunk_index]),
                               dsa_uniforms_siamese(args.seed, iteration, real_class, chunk_position))
            real_features = embed_in_chunks(embed, real, micro)
            syn_aug = dsa_augment(decoded, dsa_uniforms_siamese(args.seed, iteration, syn_class[in_syn],
                                                                syn_position[in_syn]))
            syn_features = in_micro_batches(embed, syn_aug.contiguous(memory_format=torch.channels_last), micro)
            if normalise_features:
                real_features, syn_features = F.normalize(real_features, dim=1), F.normalize(syn_features, dim=1)
            real_labels, syn_labels = real_local[in_real] - first, syn_local[in_syn] - first
            bandwidth = args.bandwidth
            if args.bandwidth_rule == "median":
                bandwidth = args.bandwidth * class_median_distances(real_features, real_labels, last - first,
                                                                    p=kernel_metric_p(args.kernel))
            loss = per_class_loss(args.method, real_features, real_labels, syn_features, syn_labels, last - first,
                                  freqs=freqs, alpha=local_alpha[first:last], bandwidth=bandwidth,
                                  projection_dtype=projection_dtype).sum()
            if calibrator is not None:  # sum over classes of each class's mean cross-entropy
                logits = in_micro_batches(classify, syn_aug.contiguous(memory_format=torch.channels_last), micro)
                loss = loss + args.calibration * F.cross_entropy(logits, syn_class[in_syn], reduction="sum") / (
                    args.ipc * tiles)
            loss.backward()
            loss_value = loss_value + loss.detach()
        optimizer.step()

        finite = torch.isfinite(loss_value) & torch.isfinite(syn.detach()).all()
        total = processes.sum(torch.stack([loss_value.float(), (~finite).float(),
                                           torch.tensor(float(stop.signal_number if stop else 0), device=device)]))
        value, bad, signalled = total.tolist()
        if bad:
            raise Diverged(f"the loss or the images became non-finite at iteration {iteration} (loss {value}); "
                           f"lower --lr-img")
        elapsed = elapsed_before + time.perf_counter() - start
        history.append((iteration, value, elapsed))
        progress.update(iteration + 1, value, elapsed)
        if signalled:
            save_checkpoint(iteration + 1, elapsed)
            stopped = int(stop.signal_number) if stop and stop.signal_number else signal.SIGTERM
            break
        if (iteration + 1) % args.ckpt_every == 0 or iteration + 1 == args.iterations:
            save_checkpoint(iteration + 1, elapsed)  # the last one lets --resume extend --iterations
    progress.close()

    packed = processes.gather_rows(rows, syn.detach().cpu().float(), len(all_labels))
    return {
        "images": decode(packed, factor) if packed is not None else None,
        "labels": all_labels.repeat_interleave(tiles), "packed_images": packed, "init_images": init_images,
        "mean": list(data.mean), "std": list(data.std),
        "class_names": list(data.class_names), "class_counts": list(data.class_counts),
        "alpha": alpha.tolist(), "config": config, "history": history, "stopped": stopped,
        "iterations_done": history[-1][0] + 1 if history else start_iteration,
    }


def resolved_config(args, data: LongTailedData) -> dict:
    """The options with every default that depends on the method or the data filled in."""
    optimizer_name = args.optimizer or DEFAULT_OPTIMIZER[args.method]
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    return dict(vars(args), depth=args.depth or depth_for_size(data.image_size), optimizer=optimizer_name,
                lr_img=args.lr_img or DEFAULT_LR_IMG[optimizer_name, args.method],
                precision=resolve_precision(args.precision, device, args.compile), format_version=FORMAT_VERSION)


class Progress:
    """A tqdm bar on a terminal; plain lines every log_every iterations otherwise (CI, log files)."""

    def __init__(self, total: int, initial: int, log_every: int, log, enabled: bool = True):
        self.total, self.log_every, self.log, self.enabled = total, log_every, log, enabled
        self.bar = None
        self.initial = initial
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True)

    def update(self, done: int, loss: float, elapsed: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.5g}")
        elif done % self.log_every == 0 or done == self.total:
            rate = (done - self.initial) / max(elapsed, 1e-9)
            left = (self.total - done) / max(rate, 1e-9)
            self.log(f"iter {done:6d}/{self.total}  loss {loss:.5f}  {rate:.2f} it/s  {elapsed:.0f}s  "
                     f"~{left:.0f}s left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------
# Outputs: the synthetic set, pictures, and a folder that explains itself

def environment() -> dict:
    """Command line, code version, libraries and hardware, for run.json."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        commit = (commit + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    import numpy
    import torchvision
    info = {"command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name] + sys.argv[1:]),
            "commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def save_grid(images: torch.Tensor, mean, std, ipc: int, path: Path) -> None:
    """One row per class, ipc images per row, in [0, 1] pixel space."""
    from torchvision.utils import save_image
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    save_image((images * std + mean).clamp(0, 1), str(path), nrow=ipc, padding=1)


def plot_side_by_side(left: Path, right: Path, path: Path, titles=("initialisation", "distilled")) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.5))
    for axis, image, title in zip(axes, (left, right), titles):
        axis.imshow(Image.open(image), interpolation="nearest")
        axis.set_title(title)
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss(history, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axis = plt.subplots(figsize=(6, 3.5))
    iterations = [h[0] + 1 for h in history]
    axis.plot(iterations, [h[1] for h in history], lw=0.8)
    axis.set_xlabel("iteration")
    axis.set_ylabel("matching loss (sum over classes)")
    axis.set_yscale("log")
    axis.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_run_readme(out: Path) -> None:
    """README.md of a run folder, assembled from what the folder holds (called by distill.py and evaluate.py)."""
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    what = (f"{config['method']} on {config['dataset']}-LT, IF {config['imbalance_factor']:g}, IPC {config['ipc']}"
            if config else (results or {}).get("evaluated", "run"))
    lines = [f"# {what}", ""]
    if run:
        lines += ["```", run.get("command", ""), "```", "",
                  f"commit {run.get('commit')}; torch {run.get('torch')}; {run.get('gpu', run.get('machine'))}; "
                  f"device {run.get('device', '?')}"]
        if "wall_seconds" in run:
            lines.append(f"; distillation {run['iterations_done']} iterations in {run['wall_seconds']:.0f} s")
        lines.append("")
    if results:
        lines += [f"**{results['split']} accuracy {results['acc_mean']:.2f} +- {results['acc_std']:.2f} %** "
                  f"(final epoch, {results['num_eval']} networks x {results['epochs']} epochs); "
                  f"head {results['head']:.2f}, medium {results['medium']:.2f}, tail {results['tail']:.2f}", ""]
        if (out / "per_class.png").exists():
            lines += ["![per-class accuracy](per_class.png)", ""]
    for picture, caption in (("init_vs_final.png", "initialisation and distilled images, one row per class"),
                             ("loss.png", "matching loss")):
        if (out / picture).exists():
            lines += [f"![{caption}]({picture})", ""]
    if config:
        keys = ("method", "kernel", "num_freqs", "bandwidth", "bandwidth_rule", "alpha_head", "alpha_tail",
                "iterations", "batch_real", "optimizer", "lr_img", "seed")
        lines += ["| option | value |", "|---|---|"] + [f"| {k} | {config.get(k)} |" for k in keys] + [""]
        lines += ["All options: config.json. Versions and machine: run.json.", ""]
    (out / "README.md").write_text("\n".join(lines))


def write_outputs(result: dict, out: Path, run_info: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    synthetic = {key: result[key] for key in
                 ("images", "labels", "mean", "std", "class_names", "class_counts", "config")}
    atomic_save(synthetic, out / "synthetic.pt")
    ipc = result["config"]["ipc"]
    save_grid(result["packed_images"], result["mean"], result["std"], ipc, out / "synthetic.png")
    save_grid(result["init_images"], result["mean"], result["std"], ipc, out / "init.png")
    (out / "config.json").write_text(json.dumps(result["config"], indent=2) + "\n")
    with open(out / "loss.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "loss", "seconds"])
        writer.writerows((i, f"{loss:.6g}", f"{seconds:.3f}") for i, loss, seconds in result["history"])
    if run_info is not None:
        (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    try:
        plot_side_by_side(out / "init.png", out / "synthetic.png", out / "init_vs_final.png")
        if result["history"]:
            plot_loss(result["history"], out / "loss.png", f"{result['config']['method']}")
    except ImportError:  # matplotlib missing: the pictures are a convenience
        pass
    write_run_readme(out)


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    processes, clean = Processes(), False
    try:
        check_options(args)
        processes, device = start_processes(args.device)
        check_out_folder(args)
        log = (lambda message: print(message, flush=True)) if processes.main else (lambda message: None)
        torch.manual_seed(args.seed)  # nothing should draw from the global generator; pin it anyway
        out = Path(args.out)
        if args.overwrite and processes.main:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        if processes.world > 1:
            dist.barrier()
        log(f"distill.py: {args.method} on {args.dataset}, IF {args.imbalance_factor:g}, IPC {args.ipc}, "
            f"{args.iterations} iterations, device {device} ({resolve_precision(args.precision, device, args.compile)})"
            + (f", {processes.world} processes" if processes.world > 1 else ""))
        data = load_from_args(args, log=log)
        checkpoint = None
        if args.resume:
            checkpoint = load_checkpoint(out, resolved_config(args, data))
            finished = checkpoint is None or checkpoint["iteration"] >= args.iterations
            if finished and (out / "synthetic.pt").exists():
                log(f"--resume: {out} holds a finished run of {args.iterations} iterations; nothing to do")
                clean = True
                return
            log(f"resuming from iteration {checkpoint['iteration']}" if checkpoint else
                f"--resume: no checkpoint in {out}; starting from the beginning")
        out.mkdir(parents=True, exist_ok=True)
        stop = StopRequest()
        stop.install()
        start = time.time()
        try:
            result = distill(args, data, device, log=log, processes=processes, stop=stop, checkpoint=checkpoint)
        except Diverged as error:
            last = out / "checkpoint.pt"
            where = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            print(f"{parser.prog}: error: {error}; {where}", file=sys.stderr, flush=True)
            sys.exit(1)
        if result["stopped"]:
            if processes.main:
                print(f"{parser.prog}: stopped by signal {result['stopped']} after iteration "
                      f"{result['iterations_done']}; checkpoint written to {out / 'checkpoint.pt'}; continue with: "
                      f"python distill.py {' '.join(shlex.quote(a) for a in sys.argv[1:] if a != '--resume')} --resume",
                      file=sys.stderr, flush=True)
            sys.exit(128 + result["stopped"])
        if processes.main:
            run_info = dict(environment(), device=str(device), processes=processes.world,
                            wall_seconds=round(result["history"][-1][2] if result["history"] else 0.0, 1),
                            iterations_done=result["iterations_done"],
                            finished=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()),
                            session_seconds=round(time.time() - start, 1))
            write_outputs(result, out, run_info)
            log(f"wrote {out / 'synthetic.pt'} ({len(result['labels'])} images)")
        clean = True
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        processes.finish(clean)


if __name__ == "__main__":
    main()
