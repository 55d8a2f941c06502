"""Distill a long-tailed data set into IPC synthetic images per class by distribution matching.

$ python distill.py --method csdm --dataset cifar10 --imbalance-factor 200 --ipc 10 --out runs/csdm
$ python distill.py --method dm --dataset cifar10 --data-dir /data/cifar10 --iterations 200 --batch-real 64 \
      --device cpu --out runs/dm

The DM loop (Zhao & Bilen, WACV 2023), method.md section 6: the synthetic images
start from real images of their class; every iteration draws a fresh randomly
initialised ConvNet, a batch of up to --batch-real real images of every class,
one siamese DSA transformation per class and sample position shared by the
real and the synthetic batch, and --num-freqs frequencies from the kernel's
spectrum; it embeds both batches, computes the matching loss of every class in
one call (sdd.per_class_loss), sums it over classes and takes one optimiser
step on the synthetic pixels.

Methods: csdm (class-aware SDD), sdm (SDD, alpha = 1/2), ncfm (NCFM's square-root
CF loss), mmd (exact Gaussian MMD^2), dm (mean matching).

The output folder holds synthetic.pt (images, labels, mean, std, class_names,
class_counts, config), synthetic.png (one row per class), init.png (the real
initialisation), config.json and loss.csv. Read synthetic.pt with
torch.load(path, weights_only=True).

When a class has fewer real images than --ipc (IPC 50 at IF 200), its first n_c
synthetic images are its n_c real images and each further one repeats one of
them under a seeded geometric DSA transformation (shift, flip, scale or rotation),
so that no two start identical. When it has fewer than --batch-real, every
iteration uses all of them.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data_lt import (DSA_OPS, DSA_SLOTS, STREAM_INIT, STREAM_REAL_BATCH, LongTailedData, UsageError,
                     add_data_arguments, counter_seed, counter_uniform, draw_per_class, dsa_augment,
                     dsa_uniforms_siamese, load_from_args)
from networks import NORMS, POOLINGS, ConvNet, depth_for_size, reset_parameters_
from sdd import (ALPHA_HEAD, ALPHA_TAIL, KERNELS, METHODS, SPECTRAL_METHODS, class_weights, median_distance,
                 per_class_loss, sample_frequencies)

FORMAT_VERSION = 1
STREAM_NETWORK, STREAM_FREQS = 11, 12
# Learning rates of SGD on pixels per method (momentum 0.5), picked on the validation split
# (README, "How the defaults were chosen"); dm's is the DM paper's.
DEFAULT_OPTIMIZER = {"dm": "sgd", "mmd": "sgd", "sdm": "sgd", "csdm": "sgd", "ncfm": "sgd"}
DEFAULT_LR_IMG = {("sgd", "dm"): 1.0, ("sgd", "mmd"): 1.0, ("sgd", "sdm"): 1.0, ("sgd", "csdm"): 1.0,
                  ("sgd", "ncfm"): 1.0, ("adam", "dm"): 0.01, ("adam", "mmd"): 0.01, ("adam", "sdm"): 0.01,
                  ("adam", "csdm"): 0.01, ("adam", "ncfm"): 0.01}


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
                   help=f"learning rate on pixels (default: per method and optimiser, {DEFAULT_LR_IMG})")
    g = p.add_argument_group("loss")
    g.add_argument("--kernel", default="gaussian", choices=KERNELS, help="universal kernel of the spectral methods")
    g.add_argument("--num-freqs", type=int, default=1024, help="frequencies M drawn per iteration")
    g.add_argument("--bandwidth", type=float, default=1.0,
                   help="kernel bandwidth sigma (with --bandwidth-rule median: a multiple of the median distance)")
    g.add_argument("--bandwidth-rule", default="fixed", choices=("fixed", "median"),
                   help="fixed sigma, or sigma = bandwidth x median pairwise distance of the iteration's real features")
    g.add_argument("--feature-norm", default="l2", choices=("l2", "none"),
                   help="L2-normalise features before the spectral and mmd losses (dm always uses raw features)")
    g.add_argument("--alpha-head", type=float, default=ALPHA_HEAD, help="csdm: amplitude weight of the head class")
    g.add_argument("--alpha-tail", type=float, default=ALPHA_TAIL, help="csdm: amplitude weight of the tail class")
    g = p.add_argument_group("network")
    g.add_argument("--width", type=int, default=128, help="ConvNet channels")
    g.add_argument("--depth", type=int, default=None, help="ConvNet blocks (default: 3 to 32 px, 4 at 64, 5 at 128)")
    g.add_argument("--norm", default="instance", choices=NORMS, help="ConvNet normalisation")
    g.add_argument("--pooling", default="avg", choices=POOLINGS, help="ConvNet pooling")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="the one seed of the run: subset, init, networks, batches, DSA")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--out", default="runs/distill", help="output folder")
    g.add_argument("--log-every", type=int, default=50, help="print the loss every N iterations")
    return p


def check_options(args) -> None:
    """Reject impossible values with the option's name and the fix."""
    positive = {"--ipc": args.ipc, "--iterations": args.iterations, "--batch-real": args.batch_real,
                "--num-freqs": args.num_freqs, "--width": args.width, "--log-every": args.log_every}
    for option, value in positive.items():
        if value < 1:
            raise UsageError(f"{option} must be >= 1 (got {value})")
    if args.depth is not None and args.depth < 1:
        raise UsageError(f"--depth must be >= 1 (got {args.depth})")
    if args.lr_img is not None and not args.lr_img > 0:
        raise UsageError(f"--lr-img must be > 0 (got {args.lr_img})")
    if not args.bandwidth > 0:
        raise UsageError(f"--bandwidth must be > 0 (got {args.bandwidth})")
    if args.method == "csdm" and not (0 < args.alpha_tail <= args.alpha_head < 1):
        raise UsageError(f"--alpha-head/--alpha-tail need 0 < tail <= head < 1 "
                         f"(got head {args.alpha_head}, tail {args.alpha_tail})")
    if args.method == "mmd" and args.kernel != "gaussian":
        raise UsageError("--kernel: the exact mmd baseline uses the gaussian kernel; drop --kernel or pick a "
                         "spectral method (csdm, sdm, ncfm)")


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


# ----------------------------------------------------------------------------------------
# Synthetic set and real batches

def initial_synthetic(data: LongTailedData, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real initialisation: ipc normalised real images per class, (C * ipc, ch, H, W), and labels.

    Slots beyond a class's n_c real images repeat them under a seeded geometric DSA
    transformation (crop shift, forced flip, scale or rotation)."""
    index, repeat = draw_per_class(data.train_labels, ipc, data.num_classes, seed)
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
    return images, labels


class RealBatchSampler:
    """Every iteration, up to batch_real images of every class, drawn without replacement.

    The draw for (seed, iteration) is a function of those two numbers only: image j's
    random key is counter_uniform(seed, stream, iteration, j), and each class takes its
    batch_real smallest keys."""

    def __init__(self, labels: torch.Tensor, num_classes: int, batch_real: int, seed: int):
        self.labels, self.batch_real, self.seed = labels, batch_real, seed
        counts = torch.bincount(labels, minlength=num_classes)
        self.starts = torch.cumsum(counts, 0) - counts
        self.index = torch.arange(len(labels), device=labels.device)

    def sample(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices into the training set, position of each within its class batch)."""
        keys = counter_uniform(self.seed, STREAM_REAL_BATCH, iteration, self.index, device=self.labels.device)
        order = torch.argsort(self.labels.double() + keys.double(), stable=True)
        position = self.index - self.starts[self.labels[order]]
        keep = position < self.batch_real
        return order[keep], position[keep]


def embed_in_chunks(net: ConvNet, images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """net.embed over row chunks, without building a graph (real images need no gradient)."""
    with torch.no_grad():
        return torch.cat([net.embed(part.contiguous(memory_format=torch.channels_last))
                          for part in images.split(chunk)])


# ----------------------------------------------------------------------------------------
# The loop

def distill(args, data: LongTailedData, device: torch.device, log=print) -> dict:
    """Run the distillation; returns the synthetic set and the loss history."""
    num_classes = data.num_classes
    depth = args.depth or depth_for_size(data.image_size)
    optimizer_name = args.optimizer or DEFAULT_OPTIMIZER[args.method]
    lr_img = args.lr_img or DEFAULT_LR_IMG[optimizer_name, args.method]
    images, syn_labels = initial_synthetic(data, args.ipc, args.seed)
    init_images = images.clone()
    syn = images.to(device).requires_grad_(True)
    syn_labels = syn_labels.to(device)
    syn_position = (torch.arange(len(syn_labels)) % args.ipc).to(device)
    optimizer = (torch.optim.SGD([syn], lr=lr_img, momentum=0.5) if optimizer_name == "sgd"
                 else torch.optim.Adam([syn], lr=lr_img))

    net = ConvNet(data.channels, num_classes, args.width, depth, args.norm, args.pooling, data.image_size)
    net = net.to(device).to(memory_format=torch.channels_last).requires_grad_(False)
    alpha = (class_weights(data.class_counts, args.alpha_head, args.alpha_tail) if args.method == "csdm"
             else torch.full((num_classes,), 0.5)).to(device)
    train_images, train_labels = data.train_images.to(device), data.train_labels.to(device)
    sampler = RealBatchSampler(train_labels, num_classes, args.batch_real, args.seed)
    normalise_features = args.method != "dm" and args.feature_norm == "l2"
    if args.method == "csdm":
        log("alpha (amplitude weight) per class: " + " ".join(f"{a:.2f}" for a in alpha.tolist()))

    history = []
    start = time.perf_counter()
    for iteration in range(args.iterations):
        generator = torch.Generator(device=device).manual_seed(counter_seed(args.seed, STREAM_NETWORK, iteration))
        reset_parameters_(net, generator)

        index, position = sampler.sample(iteration)
        real_labels = train_labels[index]
        real = dsa_augment(data.normalise(train_images[index]),
                           dsa_uniforms_siamese(args.seed, iteration, real_labels, position))
        real_features = embed_in_chunks(net, real)
        syn_aug = dsa_augment(syn, dsa_uniforms_siamese(args.seed, iteration, syn_labels, syn_position))
        syn_features = net.embed(syn_aug.contiguous(memory_format=torch.channels_last))
        if normalise_features:
            real_features, syn_features = F.normalize(real_features, dim=1), F.normalize(syn_features, dim=1)

        bandwidth = args.bandwidth
        if args.bandwidth_rule == "median":
            bandwidth = args.bandwidth * float(median_distance(real_features))
        freqs = None
        if args.method in SPECTRAL_METHODS:
            freq_generator = torch.Generator(device=device).manual_seed(counter_seed(args.seed, STREAM_FREQS, iteration))
            freqs = sample_frequencies(args.num_freqs, real_features.shape[1], args.kernel, bandwidth,
                                       generator=freq_generator, device=device)
        loss = per_class_loss(args.method, real_features, real_labels, syn_features, syn_labels, num_classes,
                              freqs=freqs, alpha=alpha, bandwidth=bandwidth).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss is {value} at iteration {iteration}; lower --lr-img")
        elapsed = time.perf_counter() - start
        history.append((iteration, value, elapsed))
        if (iteration + 1) % args.log_every == 0 or iteration + 1 == args.iterations:
            log(f"iter {iteration + 1:6d}/{args.iterations}  loss {value:.5f}  "
                f"{(iteration + 1) / elapsed:.2f} it/s  {elapsed:.0f}s")

    config = {key: value for key, value in vars(args).items()}
    config.update(depth=depth, optimizer=optimizer_name, lr_img=lr_img, format_version=FORMAT_VERSION)
    return {
        "images": syn.detach().cpu().float(),
        "labels": syn_labels.cpu(),
        "init_images": init_images,
        "mean": list(data.mean), "std": list(data.std),
        "class_names": list(data.class_names), "class_counts": list(data.class_counts),
        "alpha": alpha.cpu().tolist(),
        "config": config,
        "history": history,
    }


def save_grid(images: torch.Tensor, data: LongTailedData, ipc: int, path: Path) -> None:
    """One row per class, ipc images per row, in [0, 1] pixel space."""
    from torchvision.utils import save_image
    save_image(data.denormalise(images), str(path), nrow=ipc, padding=1)


def write_outputs(result: dict, data: LongTailedData, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    synthetic = {key: result[key] for key in
                 ("images", "labels", "mean", "std", "class_names", "class_counts", "config")}
    tmp = out / "synthetic.pt.tmp"
    torch.save(synthetic, tmp)
    tmp.replace(out / "synthetic.pt")
    ipc = result["config"]["ipc"]
    save_grid(result["images"], data, ipc, out / "synthetic.png")
    save_grid(result["init_images"], data, ipc, out / "init.png")
    (out / "config.json").write_text(json.dumps(result["config"], indent=2) + "\n")
    with open(out / "loss.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "loss", "seconds"])
        writer.writerows((i, f"{loss:.6g}", f"{seconds:.3f}") for i, loss, seconds in result["history"])


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_options(args)
        device = resolve_device(args.device)
        torch.manual_seed(args.seed)  # nothing should draw from the global generator; pin it anyway
        log = lambda message: print(message, flush=True)
        log(f"distill.py: {args.method} on {args.dataset}, IF {args.imbalance_factor:g}, IPC {args.ipc}, "
            f"{args.iterations} iterations, device {device}")
        data = load_from_args(args, log=log)
        result = distill(args, data, device, log=log)
        write_outputs(result, data, Path(args.out))
        log(f"wrote {Path(args.out) / 'synthetic.pt'} ({len(result['labels'])} images)")
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
