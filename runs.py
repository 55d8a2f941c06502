"""What both jobs need to run: options that fail in one line, processes, run folders, progress, pictures.

distill.py and evaluate.py import this module; it imports neither of them. It holds
- the command-line shape: `OneLineParser` (an error is one line and exit code 2) and `run_script`
  (parse, run, turn a UsageError into one line and exit 2, leave the torchrun group cleanly);
- `Processes`: one process, or several under torchrun, each owning a share of the classes or networks;
- devices and compilation: `resolve_device`, `compile_or_eager` (eager mode with one warning where
  torch.compile cannot work, e.g. no C compiler), `step_or_fall_back` (the same for a failure in a compiled
  backward pass), `keep_freed_memory` (glibc's malloc settings for CPU runs);
- run folders: `atomic_save`, `atomic_write_text`, `environment` (command, commit, versions, machine),
  `write_run_readme`, `Progress`, and the pictures (`save_grid`, `plot_side_by_side`, `plot_loss`).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shlex
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from data_lt import UsageError
from networks import cpuinfo

# version of synthetic.pt and checkpoint.pt; a reader refuses another version with the fix
FORMAT_VERSION = 1
# the folder where evaluate.py keeps each finished network of an evaluation not yet summarised (its --resume)
PARTIAL_EVALUATION = "evaluation.partial"


# ----------------------------------------------------------------------------------------
# Command lines

class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_script(parser: argparse.ArgumentParser, body, argv=None) -> None:
    """Parse argv and call body(args, processes_holder). A UsageError becomes one line on stderr and exit
    code 2. body may replace holder[0] by the job's Processes, which are left cleanly afterwards (after a
    barrier when the body returned, at once after an error)."""
    args = parser.parse_args(argv)
    holder, clean = [Processes()], False
    try:
        body(args, holder)
        clean = True
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        holder[0].finish(clean)


# glibc mallopt parameters (malloc.h) and the values keep_freed_memory sets (the scripts' __main__ calls it)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: (1 << 31) - 1, M_TOP_PAD: 256 << 20}
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of handing it back.

    On CPU a ConvNet's activations for 64 images are tens of MB. By default glibc serves blocks that large
    with mmap and trims the heap top above ~2x that threshold, so every forward pass maps fresh pages and
    the kernel zeroes them on first touch: a third of a float32 distillation iteration went to system time
    on a 2-core EPYC. Heap blocks up to 32 MB (glibc's largest mmap threshold on 64-bit), no trimming below
    2 GB and 256 MB of padding per heap growth keep those pages mapped: the same numbers, 1.5x faster in
    float32 and 1.08x in bf16 (BENCHMARKS.md). Freed memory is not returned to the system until the process
    ends; it is reused by the next iteration. The price is peak memory: 0.3-0.4 GB more for an IPC-50
    distillation on the EPYC (2.98 / 3.11 GB against 2.56 / 2.82 GB in two measurements, BENCHMARKS.md). Called
    by distill.py's and evaluate.py's `if __name__ == "__main__"`, never by their main(), so that a caller
    that runs main() in-process keeps its own malloc settings. A
    no-op off glibc, and where the user chose malloc settings (any of MALLOC_ENV, or GLIBC_TUNABLES naming
    glibc.malloc). Returns whether all were applied."""
    if any(name in os.environ for name in MALLOC_ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = [mallopt(parameter, value) == 1 for parameter, value in MALLOC_SETTINGS.items()]
    return all(applied)


def check_out_is_folder(out: Path) -> None:
    """--out names a folder, or nothing yet."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")


def check_positive(options: dict[str, float], strict: bool = True) -> None:
    """Each option's value must be >= 1 (integers) or > 0 (strict=False: floats); the message names it."""
    for option, value in options.items():
        if (value < 1) if strict else not value > 0:
            raise UsageError(f"{option} must be {'>= 1' if strict else '> 0'} (got {value})")


# ----------------------------------------------------------------------------------------
# Processes: one, or several under torchrun

MAIN_FIRST_WAIT = timedelta(hours=3)  # how long Processes.main_first lets the others wait for the main one


@dataclass
class Processes:
    """This process's place in the job. Classes (or networks) are dealt round-robin (c % world == rank),
    which spreads head and tail classes evenly. world == 1 is the plain single-process run; local_rank is
    the process's place on its own machine."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

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

    def gather_objects(self, mine: list) -> list:
        """Every process's list, concatenated in rank order (identity for one process)."""
        if self.world == 1:
            return mine
        parts = [None] * self.world
        dist.all_gather_object(parts, mine)
        return [entry for part in parts for entry in part]

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

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def main_first(self, work, wait: timedelta = MAIN_FIRST_WAIT):
        """work() on the main process first, then on the first process of every other machine, then on the
        rest: a download or a cache file is written once per machine (once in all on shared storage, where
        the later ones find it), never by several processes at the same time. The others wait up to `wait`
        on a gloo group of their own, not on the job's group, whose timeout (10 minutes under NCCL, 30 under
        gloo) a slow download or a first decode of a large folder can outlast. If a process fails instead,
        its group closes and torchrun ends the others."""
        if self.world == 1:
            return work()
        waiting = dist.new_group(backend="gloo", timeout=wait)
        turn = 0 if self.main else 1 if self.local_rank == 0 else 2
        for step in range(3):
            if step == turn:
                result = work()
            dist.barrier(group=waiting)
        dist.destroy_process_group(waiting)
        return result

    def finish(self, clean: bool) -> None:
        """Leave the torchrun job. After a clean run every process first waits at a barrier, so that no
        process tears its connections down while another still works (writes the outputs, or is in a
        collective); after an error the group is destroyed at once, as a barrier could wait forever."""
        if self.world == 1 or not dist.is_initialized():
            return
        if clean:
            dist.barrier()
        dist.destroy_process_group()


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
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}; pick one of them")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return device


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
    return Processes(rank, world, local_rank), device


# ----------------------------------------------------------------------------------------
# Compilation with a fall-back

class compile_or_eager:
    """fn compiled with torch.compile on its first call; if compiling fails (no C compiler for Inductor
    or Triton's launcher, an unsupported platform, an error in the generated code), one warning line and fn
    in eager mode from then on. A failure in the compiled backward pass surfaces in loss.backward(), out of
    this wrapper's reach: `step_or_fall_back` catches that one.
    The eager and the compiled function compute the same thing, so the run's result does not depend on
    which one ran (up to floating-point rounding). dynamic: torch.compile's (None: its default, a
    dynamic-shape graph once a second shape appears; False: one static graph per shape)."""
    warned = False  # one warning per process, however many functions fall back

    def __init__(self, fn, enabled: bool = True, dynamic: bool | None = None):
        self.eager = fn
        self.call = torch.compile(fn, dynamic=dynamic) if enabled else fn
        self.enabled = enabled

    def __call__(self, *args, **kwargs):
        if not self.enabled:
            return self.eager(*args, **kwargs)
        try:
            return self.call(*args, **kwargs)
        except Exception as error:  # Inductor raises many types (BackendCompilerFailed, CalledProcessError..)
            if not _is_compile_failure(error):
                raise
            self.fall_back(error)
            return self.eager(*args, **kwargs)

    def fall_back(self, error: Exception) -> None:
        """Eager mode from now on; the process's one warning names the first failure."""
        if not compile_or_eager.warned:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            warnings.warn(f"--compile: torch.compile failed ({type(error).__name__}: {first_line}); "
                          f"running in eager mode (install a C/C++ compiler to compile, or drop --compile)",
                          stacklevel=3)
            compile_or_eager.warned = True
        self.enabled = False


def step_or_fall_back(step, compiled: list[compile_or_eager]):
    """step() (a training step: zero the gradients, a loss through `compiled`, its backward, the update);
    if it raises a compiler failure while any of `compiled` is compiled, they all fall back to eager mode
    and step() runs once more. This catches what compile_or_eager cannot: Inductor's generated backward runs
    inside loss.backward() (an NVIDIA H200 under torch 2.11 failed a stride assertion there). step must be
    repeatable: no random draws, gradients zeroed before its backward, and the update after it (an error
    in the backward leaves the parameters untouched), so the run goes on as an eager one would (batch-norm
    running statistics aside, which the failed forward has already updated once)."""
    try:
        return step()
    except Exception as error:
        active = [function for function in compiled if function.enabled]
        if not active or not _is_compile_failure(error):
            raise
        for function in active:
            function.fall_back(error)
    return step()  # outside the except block: the failed step's frames (and its activations) are freed


def _is_compile_failure(error: Exception) -> bool:
    """Errors raised by the compiler stack or its generated code rather than by the computation itself."""
    module = type(error).__module__ or ""
    text = f"{type(error).__name__} {error}"
    return (module.startswith(("torch._dynamo", "torch._inductor", "triton"))
            or "BackendCompilerFailed" in text or "InductorError" in text or "CppCompileError" in text
            or isinstance(error, (subprocess.CalledProcessError, OSError, AssertionError))
            and _raised_in_generated_code(error))  # a missing compiler, a failed build: not a disk error


def _raised_in_generated_code(error: Exception) -> bool:
    """The error passed through Inductor's runtime (torch/_inductor/: the generated code's caller) or a module
    Inductor wrote (its cache, torchinductor_<user>/ by default): the generated code's own checks
    (assert_size_stride) raise plain AssertionErrors."""
    inductor = f"{os.sep}_inductor{os.sep}"
    compiler = (inductor, f"{os.sep}_dynamo{os.sep}", f"{os.sep}triton{os.sep}", "torchinductor")
    return any(part in frame.filename for part in compiler for frame in traceback.extract_tb(error.__traceback__))


# ----------------------------------------------------------------------------------------
# Run folders

def atomic_save(obj, path: Path) -> None:
    """torch.save through a temporary file, flushed to disk, then renamed over `path`: a crash mid-write
    leaves the previous file (or none), never half of one."""
    _write_atomically(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: Path) -> None:
    """path.write_text(text), atomically as atomic_save."""
    _write_atomically(path, lambda f: f.write(text.encode()))


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def code_commit() -> str:
    """The git commit of this code (+dirty if tracked files differ), else $CSDM_GIT_COMMIT (set by the
    Docker image's build argument), else 'unknown'."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        commit = commit + ("+dirty" if commit and dirty else "")
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or os.environ.get("CSDM_GIT_COMMIT", "unknown")


def environment() -> dict:
    """Command line, code version, libraries and hardware, for run.json and results.json."""
    import numpy
    import torchvision
    info = {"command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name] + sys.argv[1:]),
            "commit": code_commit(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads",
            "cpu": cpu_model()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def processor_name(record: dict) -> str | None:
    """The processor a run computed on, from a record that names it ("processor": a stretch of run.json) or an
    environment record (run.json, results.json's environment): the GPU's name where its device was CUDA, else
    the CPU's model; None where the record has none of them."""
    if record.get("processor"):
        return record["processor"]
    if str(record.get("device", "")).startswith("cuda") and record.get("gpu"):
        return record["gpu"]
    return record.get("cpu")


def cpu_model() -> str:
    """The CPU's model name as Linux reports it (e.g. "AMD EPYC"), else platform.processor()."""
    return cpuinfo("model name") or platform.processor() or "unknown"


class Progress:
    """A tqdm bar on a terminal; plain lines every log_every steps otherwise (CI, log files). A resumed
    run starts at step `initial` with `elapsed_before` seconds already spent: the rate counts this
    sitting's steps over this sitting's time."""

    def __init__(self, total: int, initial: int, log_every: int, log, enabled: bool = True, unit: str = "iter",
                 elapsed_before: float = 0.0):
        self.total, self.log_every, self.log, self.enabled, self.unit = total, log_every, log, enabled, unit
        self.bar = None
        self.initial, self.elapsed_before = initial, elapsed_before
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
            rate = (done - self.initial) / max(elapsed - self.elapsed_before, 1e-9)
            left = (self.total - done) / max(rate, 1e-9)
            self.log(f"{self.unit} {done:6d}/{self.total}  loss {loss:.5f}  {rate:.2f} it/s  {elapsed:.0f}s  "
                     f"~{left:.0f}s left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def write_run_readme(out: Path) -> None:
    """README.md of a run folder, assembled from what the folder holds (config.json, run.json,
    results.json, pictures); both jobs call it after writing their files."""
    config, run, results = (read_json(out / name) for name in ("config.json", "run.json", "results.json"))
    what = (f"{config['method']} on {config['dataset']}-LT, IF {config['imbalance_factor']:g}, IPC {config['ipc']}"
            if config else (results or {}).get("evaluated", "run"))
    lines = [f"# {what}", ""]
    if run:
        lines += ["```", run.get("command", ""), "```", "",
                  f"commit {run.get('commit')}; torch {run.get('torch')}; {run.get('gpu', run.get('machine'))}; "
                  f"device {run.get('device', '?')}"]
        if "wall_seconds" in run:
            lines[-1] += f"; distillation {run['iterations_done']} iterations in {run['wall_seconds']:.0f} s"
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
                "iterations", "batch_real", "optimizer", "lr_img", "factor", "dsa_pairing", "seed")
        lines += ["| option | value |", "|---|---|"] + [f"| {k} | {config.get(k)} |" for k in keys] + [""]
        lines += ["All options: config.json. Versions and machine: run.json.", ""]
    (out / "README.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------------------
# Pictures (matplotlib is optional: callers catch ImportError)

def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_grid(images: torch.Tensor, mean, std, ipc: int, path: Path) -> None:
    """One row per class, ipc images per row, in [0, 1] pixel space."""
    from torchvision.utils import save_image
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    save_image((images * std + mean).clamp(0, 1), str(path), nrow=ipc, padding=1)


def plot_side_by_side(left: Path, right: Path, path: Path, titles=("initialisation", "distilled")) -> None:
    plt = pyplot()
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
    plt = pyplot()
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


def export_image_folder(images: torch.Tensor, labels: torch.Tensor, mean, std, class_names, folder: Path) -> int:
    """Write a set as folder/<class name>/<n>.png (8-bit RGB or grey, pixels (x std + mean) clamped to [0, 1]),
    the layout image-folder tools read, a slash in a class name written as "_" (Fashion-MNIST's
    "T-shirt/top": T-shirt_top/); returns the number of files written."""
    from torchvision.utils import save_image
    names = [str(name).replace("/", "_").replace("\\", "_") for name in class_names]
    if len(set(names)) < len(names):
        raise UsageError(f"--export: class names {class_names} give two classes one folder name; rename a class")
    pixels = (images.float() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)).clamp(0, 1)
    counts: dict[int, int] = {}
    for image, label in zip(pixels, labels.tolist()):
        target = folder / names[label]
        target.mkdir(parents=True, exist_ok=True)
        save_image(image, str(target / f"{counts.get(label, 0)}.png"))
        counts[label] = counts.get(label, 0) + 1
    return sum(counts.values())
