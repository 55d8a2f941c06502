"""Speed and memory of distillation and evaluation, every ratio measured side by side in this process.

$ python bench.py                       # fixed-column table (a few minutes on 2 CPU cores)
$ python bench.py --json                # the same, plus one JSON line at the end
$ python bench.py --data-dir data/cifar10 --device cuda
$ python bench.py --scaling 10 100 200    # seconds per iteration and peak memory against the class count
$ python bench.py --precisions          # a csdm iteration in fp32 and in bf16 (emulated, slow, without AMX/AVX512-BF16)
$ python bench.py --out results/bench_X.json   # also write the figures with their command, commit and machine

Shapes are CIFAR-10-LT's (IF 200, 10 classes, 3 x 32 x 32); without --data-dir the pixels are
random, which changes no timing. Every timing is the median of --repeats runs after warm-up.

  iter_ratio_csdm_dm   seconds per distillation iteration, csdm / dm (IPC 10, batch-real 256, M = 1024;
                       M = 4096 beside it)
  sdd_share            the spectral loss (forward and backward) over one whole csdm iteration
  sdd_scaling          loss time at 4N samples over N (N = 1024, d = 2048): SDD, linear, ~4
  mmd_scaling          the same for the exact Gaussian MMD^2, quadratic, ~16
  extractor_efficiency images through the extractor per second in distillation over the bare ConvNet
                       (no-grad forward of the real batch, forward + backward of the synthetic one decoded to
                       factor^2 images per stored image)
  eval_speedup         a plain evaluation loop (DataLoader, DSA with per-sample parameters built as the
                       DC/DSA code builds them, NCHW, float32) over the project's train_network, 100 epochs
                       of a ConvNet on an IPC-10 set; eval_speedup_fp32 without bf16
  eval_networks_per_call_speedup
                       seconds per epoch of 5 ConvNets trained one at a time (train_network) over the same 5
                       trained together as one stacked network (stacked.py, evaluate.py's default on GPUs), on a
                       factor-2 IPC-10 set (400 images); eval_full_protocol_minutes: 5 networks x 1000 epochs
                       at the faster of the two (training only, the tests not counted)
  iter_seconds_batch_real_256
                       seconds per csdm iteration at the field's budget (the same as sec_per_iter_csdm);
                       cell_hours: 20,000 such iterations plus eval_full_protocol_minutes, one method's cell
  peak_rss_gb          peak resident memory of a child process distilling CIFAR-10-LT at IPC 50 for
                       20 iterations with distill.py's defaults (and peak GPU memory on a GPU), in GB of 1e9
                       bytes (until 2026-11-30 in GiB of 2^30 bytes under the same name: the committed
                       results/bench_*.json files hold GiB)
  extractor_gflops     the extractor's achieved GFLOP/s (analytic convolution FLOPs) and its share
                       of the matmul peak measured here in the same precision (forward + backward mix of an
                       iteration; extractor_forward_gflops: no-grad forward alone)

--precisions measures instead, for a compiled csdm iteration at batch-real 256:
  sec_per_iter_fp32, sec_per_iter_bf16, bf16_over_fp32
                       seconds per iteration in each precision and their ratio (0.63 on the EPYC with
                       AVX512-BF16 of BENCHMARKS.md; 12.9 on an AVX2-only one, where bfloat16 is emulated)
  cpu_bf16_flags       the CPU's bfloat16 flags in /proc/cpuinfo (amx_bf16, avx512_bf16; empty: emulated)
                       and cpu_vector_flags, its AVX and AMX flags
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_lt import LongTailedData, decode, initial_synthetic, load_long_tailed, long_tailed_counts
from distill import build_parser as distill_parser
from distill import distill, resolve
from networks import (BF16_FLAGS, PRECISIONS, ConvNet, autocast, build_network, cpu_flags, in_micro_batches,
                      micro_batch_size, reset_parameters_, resolve_precision)
from runs import OneLineParser, atomic_write_text, environment, keep_freed_memory, resolve_device
from stacked import train_networks_stacked
from training import PROTOCOLS, train_network
from methods import per_class_loss
from sdd import exact_mmd2, sample_frequencies

TARGETS = {  # (direction, bound) on this project's 2-core CPU
    "iter_ratio_csdm_dm": ("<=", 1.10), "sdd_share": ("<=", 0.10), "sdd_scaling": ("<=", 4.5),
    "mmd_scaling": (">=", 12.0), "extractor_efficiency": (">=", 0.8), "eval_speedup": (">=", 3.0),
    "peak_rss_gb": ("<=", 3.0), "extractor_peak_share": (">=", 0.4),
    "eval_networks_per_call_speedup": (">=", 2.5), "eval_full_protocol_minutes": ("<=", 15.0),
    "cell_hours": ("<=", 2.0),
}
CELL_ITERATIONS = 20_000  # the field's distillation budget for one cell
GB = 1e9  # bytes in the GB of the memory figures


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_cifar10_lt(imbalance_factor: float = 200, seed: int = 0, num_classes: int = 10,
                      n_max: int = 5000) -> LongTailedData:
    """CIFAR-LT shapes with random pixels (timing only): num_classes classes, n_max images in the head."""
    g = torch.Generator().manual_seed(seed)
    counts = long_tailed_counts(n_max, num_classes, imbalance_factor)
    labels = torch.arange(num_classes).repeat_interleave(torch.tensor(counts))
    test_labels = torch.arange(num_classes).repeat_interleave(10000 // num_classes)
    return LongTailedData(
        name=f"random-LT(C={num_classes}, IF={imbalance_factor:g})", class_names=[str(c) for c in range(num_classes)],
        class_counts=counts, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),
        train_images=torch.randint(0, 256, (len(labels), 3, 32, 32), generator=g, dtype=torch.uint8),
        train_labels=labels, val_images=torch.zeros(0, 3, 32, 32, dtype=torch.uint8),
        val_labels=torch.zeros(0, dtype=torch.long),
        test_images=torch.randint(0, 256, (len(test_labels), 3, 32, 32), generator=g, dtype=torch.uint8),
        test_labels=test_labels)


def get_data(data_dir: str | None) -> LongTailedData:
    if data_dir is None:
        return random_cifar10_lt()
    return load_long_tailed("cifar10", data_dir, 200, 0, log=lambda m: None)


# ----------------------------------------------------------------------------------------
# Distillation iterations

def iteration_seconds(data, device, method: str, num_freqs: int, compile: bool, repeats: int,
                      warmup: int = 3, ipc: int = 10, batch_real: int = 256, precision: str = "auto") -> float:
    """Median seconds of one distillation iteration after `warmup` iterations (compilation included there)."""
    argv = ["--method", method, "--ipc", str(ipc), "--batch-real", str(batch_real), "--num-freqs", str(num_freqs),
            "--iterations", str(warmup + repeats), "--device", str(device), "--ckpt-every", "1000000",
            "--precision", precision, "--out", "/tmp/csdm-bench-unused"] + (["--compile"] if compile else [])
    args = distill_parser().parse_args(argv)
    history = distill(resolve(args, data), data, device, log=lambda m: None)["history"]
    seconds = np.diff([0.0] + [h[2] for h in history])
    return float(np.median(seconds[warmup:]))


def feature_shapes(data, batch_real=256, ipc=10):
    """(real, synthetic) images through the extractor in one iteration at distill.py's default factor f:
    each stored synthetic image decodes to f^2 training images."""
    factor = distill_parser().get_default("factor")
    n_real = sum(min(batch_real, n) for n in data.class_counts)
    return n_real, ipc * data.num_classes * factor ** 2


def loss_seconds(device, method: str, n_real: int, n_syn: int, num_classes: int, num_freqs: int, repeats: int,
                 precision: str, dim: int = 2048) -> float:
    """Forward + backward of the matching loss alone on features of an iteration's shapes, its
    projection in the precision distill.py uses."""
    g = torch.Generator(device=device).manual_seed(0)
    real = F.normalize(torch.randn(n_real, dim, generator=g, device=device), dim=1)
    syn = F.normalize(torch.randn(n_syn, dim, generator=g, device=device), dim=1).requires_grad_(True)
    real_labels = torch.arange(num_classes, device=device).repeat_interleave(math.ceil(n_real / num_classes))[:n_real]
    syn_labels = torch.arange(num_classes, device=device).repeat_interleave(n_syn // num_classes)
    alpha = torch.linspace(0.7, 0.3, num_classes, device=device)

    def run():
        freqs = sample_frequencies(num_freqs, dim, generator=g, device=device)
        loss = per_class_loss(method, real, real_labels, syn, syn_labels, num_classes, freqs=freqs, alpha=alpha,
                              projection_dtype=torch.bfloat16 if precision == "bf16" else None)
        loss.sum().backward()
    return median_time(run, repeats)


def scaling(device, repeats: int, n: int = 1024, dim: int = 2048, num_freqs: int = 1024) -> tuple[float, float]:
    """(SDD time at 4n / at n, exact MMD^2 time at 4n / at n), one class, forward + backward."""
    g = torch.Generator(device=device).manual_seed(1)

    def timed(kind, size):
        x = torch.randn(size, dim, generator=g, device=device)
        y = torch.randn(size, dim, generator=g, device=device).requires_grad_(True)
        labels = torch.zeros(size, dtype=torch.long, device=device)
        freqs = sample_frequencies(num_freqs, dim, generator=g, device=device, bandwidth=math.sqrt(dim))

        def run():
            if kind == "sdd":
                loss = per_class_loss("sdm", x, labels, y, labels, 1, freqs=freqs)
            else:
                loss = exact_mmd2(x, labels, y, labels, 1, math.sqrt(dim))
            loss.sum().backward()
        return median_time(run, repeats)
    return timed("sdd", 4 * n) / timed("sdd", n), timed("mmd", 4 * n) / timed("mmd", n)


def bare_extractor_seconds(device, precision: str, compile: bool, n_real: int, n_syn: int, repeats: int,
                           forward_only: bool = False) -> float:
    """The ConvNet alone on one iteration's images: no-grad forward of the real batch, forward + backward
    to the synthetic pixels, in distill.py's micro-batches (forward_only: no-grad forward of both)."""
    net = build_network("convnet", 3, 10, 32, device=device).requires_grad_(False)

    def embed(x):
        with autocast(device, precision):
            return net.embed(x).float()
    embed = torch.compile(embed) if compile else embed
    g = torch.Generator(device=device).manual_seed(2)
    real = torch.randn(n_real, 3, 32, 32, generator=g, device=device).contiguous(memory_format=torch.channels_last)
    syn = torch.randn(n_syn, 3, 32, 32, generator=g, device=device).contiguous(memory_format=torch.channels_last)

    micro = micro_batch_size(device)

    def run():
        with torch.no_grad():
            in_micro_batches(embed, real, micro or 1024)
            if forward_only:
                in_micro_batches(embed, syn, micro or 1024)
                return
        s = syn.clone().requires_grad_(True)
        in_micro_batches(embed, s, micro).sum().backward()
    return median_time(run, repeats, warmup=2)


def conv_flops(image_size: int = 32, channels: int = 3, width: int = 128, depth: int = 3) -> float:
    """Multiply-adds x 2 of the ConvNet's convolutions for one image's forward pass."""
    flops, size, c_in = 0.0, image_size, channels
    for _ in range(depth):
        flops += 2 * size * size * width * c_in * 9
        c_in, size = width, size // 2
    return flops


def matmul_peak_gflops(device, precision: str, repeats: int, size: int = 2048) -> float:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size ** 3 / median_time(lambda: a @ b, repeats, warmup=2) / 1e9


# ----------------------------------------------------------------------------------------
# Evaluation: the project's loop against a plain one written the usual way

def reference_dsa(x: torch.Tensor) -> torch.Tensor:
    """DSA as the DC/DSA code applies it without a seed: one operation per batch, parameters drawn
    per sample, affine matrices built sample by sample in Python."""
    op = ["color", "crop", "cutout", "flip", "scale", "rotate"][int(torch.randint(0, 6, (1,)))]
    n = x.shape[0]
    if op == "color":
        x = x + (torch.rand(n, 1, 1, 1) - 0.5)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (torch.rand(n, 1, 1, 1) * 2.0) + mean
        mean = x.mean(dim=[1, 2, 3], keepdim=True)
        return (x - mean) * (torch.rand(n, 1, 1, 1) + 0.5) + mean
    if op == "crop":
        shift = int(x.size(2) * 0.125 + 0.5)
        tx = torch.randint(-shift, shift + 1, size=[n, 1, 1])
        ty = torch.randint(-shift, shift + 1, size=[n, 1, 1])
        gb, gx, gy = torch.meshgrid(torch.arange(n), torch.arange(x.size(2)), torch.arange(x.size(3)), indexing="ij")
        gx = torch.clamp(gx + tx + 1, 0, x.size(2) + 1)
        gy = torch.clamp(gy + ty + 1, 0, x.size(3) + 1)
        padded = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
        return padded.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)
    if op == "cutout":
        size = int(x.size(2) * 0.5 + 0.5)
        ox = torch.randint(0, x.size(2) + (1 - size % 2), size=[n, 1, 1])
        oy = torch.randint(0, x.size(3) + (1 - size % 2), size=[n, 1, 1])
        gb, gx, gy = torch.meshgrid(torch.arange(n), torch.arange(size), torch.arange(size), indexing="ij")
        gx = torch.clamp(gx + ox - size // 2, min=0, max=x.size(2) - 1)
        gy = torch.clamp(gy + oy - size // 2, min=0, max=x.size(3) - 1)
        mask = torch.ones(n, x.size(2), x.size(3))
        mask[gb, gx, gy] = 0
        return x * mask.unsqueeze(1)
    if op == "flip":
        return torch.where(torch.rand(n, 1, 1, 1) < 0.5, x.flip(3), x)
    if op == "scale":
        sx = torch.rand(n) * (1.2 - 1 / 1.2) + 1 / 1.2
        sy = torch.rand(n) * (1.2 - 1 / 1.2) + 1 / 1.2
        theta = torch.tensor([[[float(sx[i]), 0, 0], [0, float(sy[i]), 0]] for i in range(n)])
    else:
        angle = (torch.rand(n) - 0.5) * 2 * 15 / 180 * math.pi
        theta = torch.tensor([[[math.cos(angle[i]), math.sin(-angle[i]), 0],
                               [math.sin(angle[i]), math.cos(angle[i]), 0]] for i in range(n)])
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def reference_training(images: torch.Tensor, labels: torch.Tensor, epochs: int) -> None:
    """The usual loop: TensorDataset + DataLoader, NCHW float32, DSA per batch, SGD with a step schedule."""
    net = ConvNet(3, 10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=256, shuffle=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[epochs // 2], gamma=0.1)
    net.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(net(reference_dsa(x)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()


def project_training(images, labels, epochs, device, precision, compile) -> None:
    g = torch.Generator(device=device).manual_seed(3)
    net = reset_parameters_(build_network("convnet", 3, 10, 32, device=device), g)
    train_network(net, images.to(device), labels.to(device), g, PROTOCOLS["dm"], epochs, precision=precision,
                  compile=compile)


class _EpochClock:
    """Stands in for a progress bar: the time at the end of every epoch."""

    def __init__(self):
        self.stamps = [time.perf_counter()]

    def update(self, n):
        synchronize()
        self.stamps.append(time.perf_counter())

    def set_postfix(self, **values):
        pass

    def median_epoch(self, warmup: int) -> float:
        return statistics.median(np.diff(self.stamps)[warmup:])


def networks_epoch_seconds(images, labels, count, stacked, device, precision, compile, repeats, warmup=2) -> float:
    """Median seconds of one epoch of `count` ConvNets under the dm protocol (after `warmup` epochs:
    compilation), trained together as one stacked network or one after another (the sum of their epochs)."""
    generators = [torch.Generator(device=device).manual_seed(k) for k in range(count)]
    nets = [reset_parameters_(build_network("convnet", 3, 10, 32, device=device), g) for g in generators]
    images, labels, epochs = images.to(device), labels.to(device), warmup + repeats
    if stacked:
        clock = _EpochClock()
        train_networks_stacked(nets, images, labels, generators, PROTOCOLS["dm"], epochs, precision, compile,
                               progress=clock)
        return clock.median_epoch(warmup)
    total = 0.0
    for net, g in zip(nets, generators):
        clock = _EpochClock()
        train_network(net, images, labels, g, PROTOCOLS["dm"], epochs, clock, precision, compile)
        total += clock.median_epoch(warmup)
    return total


# ----------------------------------------------------------------------------------------
# Peak memory, in a child process

def _rss_child(data_dir, device_name, malloc_tuned, queue):
    if malloc_tuned:  # a spawned child starts with glibc's defaults
        keep_freed_memory()
    device = torch.device(device_name)
    data = get_data(data_dir)
    args = distill_parser().parse_args(["--method", "csdm", "--ipc", "50", "--iterations", "20", "--device",
                                        device_name, "--ckpt-every", "1000000", "--out", "/tmp/csdm-bench-rss"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    distill(resolve(args, data), data, device, log=lambda m: None)
    gpu = torch.cuda.max_memory_allocated() / GB if device.type == "cuda" else None
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, gpu))  # ru_maxrss is in KiB


def _scaling_child(num_classes, batch_real, device_name, compile, iterations, malloc_tuned, queue):
    """Seconds per csdm iteration (median after 2 warm-up iterations) and peak memory for num_classes
    classes at IPC 10 (CIFAR-100-like: n_max 500, IF 10)."""
    if malloc_tuned:
        keep_freed_memory()
    device = torch.device(device_name)
    data = random_cifar10_lt(10, 0, num_classes, 500)
    argv = ["--method", "csdm", "--ipc", "10", "--batch-real", str(batch_real), "--iterations", str(iterations),
            "--device", device_name, "--ckpt-every", "1000000", "--out", "/tmp/csdm-bench-scaling"]
    args = distill_parser().parse_args(argv + (["--compile"] if compile else []))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    history = distill(resolve(args, data), data, device, log=lambda m: None)["history"]
    seconds = float(np.median(np.diff([0.0] + [h[2] for h in history])[2:]))
    gpu = torch.cuda.max_memory_allocated() / GB if device.type == "cuda" else None
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, gpu))


def scaling_table(classes: list[int], batch_real: int, device, compile: bool, malloc_tuned: bool,
                  iterations: int = 6) -> list[dict]:
    """One child process per class count, so that each peak is its own."""
    rows = []
    for num_classes in classes:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=_scaling_child,
                                args=(num_classes, batch_real, str(device), compile, iterations, malloc_tuned, queue))
        child.start()
        seconds, rss, gpu = queue.get()
        child.join()
        rows.append({"classes": num_classes, "sec_per_iter": seconds, "peak_rss_gb": rss, "peak_gpu_gb": gpu})
        print(f"{num_classes:>8} classes  {seconds:8.3f} s/iter  peak RSS {rss:6.2f} GB"
              + (f"  peak GPU {gpu:6.2f} GB" if gpu is not None else ""), flush=True)
    return rows


def precision_costs(data, device, compile: bool, repeats: int, method: str = "csdm") -> dict:
    """Seconds per `method` iteration at batch-real 256 in float32 and in bfloat16 (after 2 warm-up
    iterations each), their ratio, and the CPU's flags that decide it: without amx_bf16 or avx512_bf16
    PyTorch emulates bfloat16 and --precision bf16 costs many times fp32's time."""
    seconds = {precision: iteration_seconds(data, device, method, num_freqs=1024, compile=compile, repeats=repeats,
                                            warmup=2, precision=precision)
               for precision in PRECISIONS}
    print(f"{method}, IPC 10, batch-real 256, {device}, compile {compile}: "
          + ", ".join(f"{p} {t:.2f} s/iter" for p, t in seconds.items())
          + f"; bf16 / fp32 {seconds['bf16'] / seconds['fp32']:.1f}", flush=True)
    flags = cpu_flags()
    return {"method": method, "compile": compile, "device": str(device),
            "cpu_bf16_flags": sorted(flags & BF16_FLAGS),
            "cpu_vector_flags": sorted(f for f in flags if f.startswith(("avx", "amx"))),
            **{f"sec_per_iter_{p}": t for p, t in seconds.items()}, "bf16_over_fp32": seconds["bf16"] / seconds["fp32"]}


def peak_memory(data_dir, device, malloc_tuned: bool) -> tuple[float, float | None]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_rss_child, args=(data_dir, str(device), malloc_tuned, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


# ----------------------------------------------------------------------------------------

def distillation_metrics(data, device, precision: str, compile: bool, repeats: int) -> dict:
    """Seconds per iteration (csdm, dm, csdm at M = 4096), the loss's share and scaling, the extractor's
    efficiency and its share of the matmul peak."""
    log("distillation iterations (csdm M=1024, dm, csdm M=4096) ...")
    t_csdm = iteration_seconds(data, device, "csdm", 1024, compile, repeats)
    t_dm = iteration_seconds(data, device, "dm", 1024, compile, repeats)
    t_csdm_4096 = iteration_seconds(data, device, "csdm", 4096, compile, repeats)
    r = dict(sec_per_iter_csdm=t_csdm, sec_per_iter_dm=t_dm, sec_per_iter_csdm_m4096=t_csdm_4096,
             iter_seconds_batch_real_256=t_csdm, iter_ratio_csdm_dm=t_csdm / t_dm,
             iter_ratio_csdm_dm_m4096=t_csdm_4096 / t_dm)

    log("loss share and scaling ...")
    n_real, n_syn = feature_shapes(data)
    t_loss = loss_seconds(device, "csdm", n_real, n_syn, data.num_classes, 1024, repeats, precision)
    r.update(sdd_seconds=t_loss, sdd_share=t_loss / t_csdm)
    r["sdd_scaling"], r["mmd_scaling"] = scaling(device, repeats)

    log("bare extractor and matmul peak ...")
    t_bare = bare_extractor_seconds(device, precision, compile, n_real, n_syn, repeats)
    images_per_iteration = n_real + n_syn
    r.update(distill_images_per_sec=images_per_iteration / t_csdm, bare_images_per_sec=images_per_iteration / t_bare,
             extractor_efficiency=t_bare / t_csdm)
    flops = conv_flops() * (n_real + 2 * n_syn)  # backward to the input costs about one more forward
    r["extractor_gflops"] = flops / t_bare / 1e9
    t_forward = bare_extractor_seconds(device, precision, compile, n_real, n_syn, repeats, forward_only=True)
    r["extractor_forward_gflops"] = conv_flops() * (n_real + n_syn) / t_forward / 1e9
    r["matmul_peak_gflops"] = matmul_peak_gflops(device, precision, repeats)
    r["extractor_peak_share"] = r["extractor_gflops"] / r["matmul_peak_gflops"]
    r["extractor_forward_peak_share"] = r["extractor_forward_gflops"] / r["matmul_peak_gflops"]
    return r


def evaluation_metrics(data, device, precision: str, compile: bool, repeats: int, epochs: int) -> dict:
    """The project's training loop against the plain reference loop (IPC-10 set, `epochs` epochs), and 5
    networks one at a time against stacked on a factor-2 IPC-10 set, extrapolated to the full protocol."""
    log(f"evaluation loops ({epochs} epochs each) ...")
    syn_images, syn_labels = initial_synthetic(data, 10, 0)
    torch.manual_seed(0)
    project_training(syn_images, syn_labels, 3, device, precision, compile)  # warm-up and compilation
    t_project = wall_seconds(project_training, syn_images, syn_labels, epochs, device, precision, compile)
    t_project_fp32 = wall_seconds(project_training, syn_images, syn_labels, epochs, device, "fp32", False)
    r = dict(eval_project_sec=t_project, eval_project_fp32_eager_sec=t_project_fp32)
    if device.type == "cpu":
        t_reference = wall_seconds(reference_training, syn_images, syn_labels, epochs)
        r.update(eval_reference_sec=t_reference, eval_speedup=t_reference / t_project,
                 eval_speedup_fp32=t_reference / t_project_fp32)

    log("evaluation: 5 networks one at a time and stacked (factor-2 IPC-10 set) ...")
    packed, packed_labels = initial_synthetic(data, 10, 0, 2)
    images, labels = decode(packed, 2), packed_labels.repeat_interleave(4)
    t_alone = networks_epoch_seconds(images, labels, 5, False, device, precision, compile, repeats)
    t_stacked = networks_epoch_seconds(images, labels, 5, True, device, precision, compile, repeats)
    r.update(eval_5nets_epoch_sec_one_at_a_time=t_alone, eval_5nets_epoch_sec_stacked=t_stacked,
             eval_networks_per_call_speedup=t_alone / t_stacked,
             eval_full_protocol_minutes=min(t_alone, t_stacked) * 1000 / 60)
    return r


def wall_seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_table(r: dict) -> None:
    print(f"{'metric':<28}{'value':>12}  {'target':<10}ok")
    for key, value in r.items():
        target = TARGETS.get(key)
        shown = f"{value:12.4g}" if isinstance(value, float) else f"{str(value):>12}"
        verdict = ""
        if target and isinstance(value, float):
            verdict = "yes" if (value <= target[1] if target[0] == "<=" else value >= target[1]) else "NO"
        print(f"{key:<28}{shown}  {(target[0] + ' ' + str(target[1])) if target else '':<10}{verdict}")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line after the table")
    parser.add_argument("--data-dir", default=None, help="a CIFAR-10 folder (default: random pixels, same shapes)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--eval-epochs", type=int, default=100, help="epochs of the evaluation timing")
    parser.add_argument("--no-compile", action="store_true", help="time the eager code paths")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc at its defaults (distill.py and evaluate.py tune it: "
                             "runs.keep_freed_memory), to measure what that setting buys")
    instead = parser.add_mutually_exclusive_group()
    instead.add_argument("--scaling", type=int, nargs="+", default=None, metavar="C",
                         help="instead: seconds per csdm iteration and peak memory for C classes (IPC 10)")
    parser.add_argument("--batch-real", type=int, default=64, help="--scaling: real images per class")
    instead.add_argument("--precisions", action="store_true",
                         help="instead: seconds per csdm iteration (batch-real 256) in fp32 and in bf16, and their "
                              "ratio (bf16 is emulated, and slow, on CPUs without AMX-BF16 or AVX512-BF16)")
    parser.add_argument("--out", default=None, metavar="JSON",
                        help="also write the figures here, with the command, commit, CPU and libraries")
    return parser


def write_record(path: str | None, figures) -> None:
    """--out: the figures under "results", beside runs.environment() (command, commit, CPU, GPU, libraries)
    and the date, so that a committed bench file says what measured it."""
    if path is not None:
        record = {"environment": environment(), "date": time.strftime("%Y-%m-%d"), "results": figures}
        atomic_write_text(json.dumps(record, indent=1) + "\n", Path(path))


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is not None and (Path(args.out).is_dir() or not Path(args.out).parent.is_dir()):
        parser.error(f"--out {args.out}: give a file in an existing folder")
    malloc_tuned = False if args.default_malloc else keep_freed_memory()
    device = resolve_device(args.device)
    compile = not args.no_compile
    if args.scaling:
        print(f"csdm, IPC 10, batch-real {args.batch_real}, 32 px, {device}, compile {compile}")
        rows = scaling_table(args.scaling, args.batch_real, device, compile, malloc_tuned)
        if args.json:
            print(json.dumps(rows))
        write_record(args.out, rows)
        return
    data = get_data(args.data_dir)
    if args.precisions:
        figures = precision_costs(data, device, compile, args.repeats)
        if args.json:
            print(json.dumps(figures))
        write_record(args.out, figures)
        return
    precision = resolve_precision("auto", device, compile)
    r = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else
         f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
         "precision": precision, "compile": compile, "malloc_tuned": malloc_tuned, "torch": torch.__version__}
    r.update(distillation_metrics(data, device, precision, compile, args.repeats))
    r.update(evaluation_metrics(data, device, precision, compile, args.repeats, args.eval_epochs))
    r["cell_hours"] = (CELL_ITERATIONS * r["iter_seconds_batch_real_256"] + 60 * r["eval_full_protocol_minutes"]) / 3600
    log("peak memory of an IPC-50 distillation (child process) ...")
    r["peak_rss_gb"], r["peak_gpu_gb"] = peak_memory(args.data_dir, device, malloc_tuned)
    print_table(r)
    if args.json:
        print(json.dumps(r))
    write_record(args.out, r)


if __name__ == "__main__":
    main()
