"""One command for a lent GPU's sitting: what breaks, what it costs, then the full-budget cells, in one JSON file.

$ python gpu_check.py --data-dir data/cifar10 --out results/gpu_check_h100.json --grid-out results --budget-s 480
$ python gpu_check.py --data-dir data/cifar10 --device cpu --tiny-only      # the same tiny path on a CPU

Within --budget-s seconds of wall clock (default 480, 8 minutes):
  1. tiny      the grid at a tiny budget, end to end, as run_all.sh's run_one calls the scripts: distill.py (dm
               and csdm, a few compiled iterations at batch-real 256), evaluate.py --stacked --compile (several
               networks; a set of 10 x IPC 7 x 4 = 280 images, so that the last batch of 256 is partial) and
               report.py; into --work (default: a new temporary folder). Every step is a subprocess; a failed
               one stops none of the others (each is recorded with its seconds, exit status and, if it failed,
               the tail of its output). TinySizes.methods may add "random" (--baseline random; step 3 runs it).
  2. timings   seconds per distillation iteration at batch-real 256 for dm and csdm (bench.iteration_seconds)
               and per epoch of 5 ConvNets on a factor-2 IPC-10 set, stacked and one at a time
               (bench.networks_epoch_seconds), each with its peak GPU memory (torch.cuda.max_memory_allocated,
               reset between measurements; on a CPU the process's peak RSS so far, and null for the GPU); in a
               process of its own, stopped at its limit or the budget, each figure recorded as it comes.
  3. grid      with the time left (unless --tiny-only): CIFAR-10-LT IF 50 and IF 100 at IPC 10, csdm, dm and
               random, at the full budget: `./run_all.sh --datasets cifar10 --ifs "50 100" --ipcs 10 --methods
               "csdm dm random" --out GRID_OUT --jobs-per-gpu N`, stopped by SIGTERM (distill.py then writes
               its checkpoint; rerunning continues it) GRACE_S seconds before the budget ends; how far each
               cell got (iterations in its checkpoint, finished networks, accuracy) is recorded.
The JSON (--out) holds the machine (GPU, torch, CUDA, commit: runs.environment()), the budget and every step's
result and timing; it is rewritten after every step, so a sitting cut off still leaves what it measured.
Exit status 0 when every step ran, 1 when one failed or was skipped for want of time (the file's "failed"
lists them), 2 on bad options (one line naming the option).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
GRACE_S = 25.0  # step 3 is stopped this long before the budget ends: the checkpoints, then the JSON
MIN_GRID_S = 60.0  # step 3 is not started with less than this left
TAIL_CHARS = 3000  # of a failed step's output, in the JSON
PROGRESS_EVERY_S = 30.0  # step 3's cells are looked at and the JSON rewritten this often while it runs
GB = 1e9


@dataclass
class TinySizes:
    """Step 1: the smallest grid that still takes the GPU paths (compiled distillation and stacked, compiled
    evaluation with a partial last batch). Tests shrink it further (tests/test_gpu_check.py)."""
    imbalance_factor: float = 100.0
    ipc: int = 7              # x 10 classes x factor 2^2 = 280 training images: batches of 256 and 24
    iterations: int = 10
    batch_real: int = 256
    num_freqs: int = 1024
    width: int | None = None  # ConvNet width of distillation and so of evaluation (None: distill.py's 128)
    num_eval: int = 3
    epochs: int = 4
    compile: bool = True
    methods: tuple = ("dm", "csdm")
    step_timeout_s: float = 300.0


@dataclass
class TimingSizes:
    """Step 2: the field's shapes (bench.py's): CIFAR-10-LT IF 200, IPC 10, batch-real 256, M = 1024."""
    imbalance_factor: float = 200.0
    ipc: int = 10
    batch_real: int = 256
    num_freqs: int = 1024
    repeats: int = 5
    warmup: int = 3
    networks: int = 5
    compile: bool = True
    step_timeout_s: float = 300.0


TINY = TinySizes()
TIMING = TimingSizes()
EXTRA_ARGS: dict[str, list[str]] = {}  # step name -> options appended to its command (tests inject failures)
GRID = {"ifs": (50, 100), "ipc": 10, "methods": ("csdm", "dm", "random")}


class Clock:
    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.monotonic(), budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


class Record:
    """The JSON file, rewritten (atomically) after every step."""

    def __init__(self, path: Path, head: dict):
        self.path, self.data = path, dict(head, steps={})

    def step(self, name: str, result: dict) -> dict:
        self.data["steps"][name] = result
        self.write()
        return result

    def write(self) -> None:
        from runs import atomic_write_text
        atomic_write_text(json.dumps(self.data, indent=1, default=str) + "\n", self.path)


# ----------------------------------------------------------------------------------------
# Subprocesses

def stop_group(process: subprocess.Popen, grace_s: float) -> bool:
    """SIGTERM to the process's whole group (run_all.sh, its cells, their distill.py), then wait until every
    member has left (distill.py finishes its iteration and writes its checkpoint), SIGKILL after grace_s.
    True if all left on the SIGTERM."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        process.poll()
        try:
            os.killpg(process.pid, 0)  # anyone of the group still there (an orphaned child included)?
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    return False


def run_command(argv: list[str], log_path: Path, timeout_s: float, env: dict | None = None, every=None) -> dict:
    """argv in its own process group, its output (stdout and stderr) into log_path; stopped at timeout_s;
    every() called each second while it runs. {returncode, seconds, stopped (by the time limit), clean_stop
    (every process left on SIGTERM)}."""
    start = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        stopped = clean = False
        while process.poll() is None:
            if time.monotonic() - start >= timeout_s:
                stopped, clean = True, stop_group(process, GRACE_S)
                break
            try:
                process.wait(timeout=min(1.0, max(timeout_s - (time.monotonic() - start), 0.01)))
            except subprocess.TimeoutExpired:
                pass
            if every is not None:
                every()
    return {"returncode": process.returncode, "seconds": round(time.monotonic() - start, 1), "stopped": stopped,
            "clean_stop": clean if stopped else None}


def tail(path: Path, chars: int = TAIL_CHARS) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def script_step(record: Record, clock: Clock, name: str, argv: list[str], work: Path, timeout_s: float) -> dict:
    """One script of the tiny grid: ok, seconds, the command, and the error tail when it failed. Skipped
    when the budget is spent; stopped at the step's own limit or at the budget, whichever comes first."""
    argv = argv + EXTRA_ARGS.get(name, [])
    entry = {"command": " ".join(argv[1:] if argv[0] == sys.executable else argv)}
    left = clock.left() - GRACE_S
    if left <= 1:
        return record.step(name, dict(entry, ok=False, skipped="budget spent"))
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    result = run_command(argv, log, min(timeout_s, left))
    entry.update(ok=result["returncode"] == 0 and not result["stopped"], seconds=result["seconds"],
                 returncode=result["returncode"], log=str(log))
    if result["stopped"]:
        entry["error"] = f"stopped after {result['seconds']:.0f} s (step limit {timeout_s:.0f} s or the budget)"
    if not entry["ok"]:
        entry["error_tail"] = tail(log)
    return record.step(name, entry)


# ----------------------------------------------------------------------------------------
# Step 1: the grid at a tiny budget

def tiny_grid(record: Record, clock: Clock, args, work: Path, sizes: TinySizes) -> list[dict]:
    """distill.py / evaluate.py / report.py with run_all.sh's run_one options, one folder per run:
    WORK/tiny/<dataset>/if<IF>/ipc<IPC>/<method>/, replaced by a later check (--overwrite)."""
    py, tiny = sys.executable, work / "tiny"
    cell = tiny / args.dataset / f"if{sizes.imbalance_factor:g}" / f"ipc{sizes.ipc}"
    data = ["--dataset", args.dataset, "--imbalance-factor", f"{sizes.imbalance_factor:g}", "--seed", "0"]
    data += ["--data-dir", args.data_dir] if args.data_dir else []
    run = ["--device", args.device, "--precision", "auto"]
    compiled = ["--compile"] if sizes.compile else []
    evaluation = ["--num-eval", str(sizes.num_eval), "--epochs", str(sizes.epochs), *compiled]
    results = []
    for method in sizes.methods:
        out = cell / method
        if method == "random":
            results.append(script_step(record, clock, "tiny-evaluate-random", [
                py, "evaluate.py", "--baseline", "random", "--ipc", str(sizes.ipc), "--factor", "2", *data,
                "--eval-seed", "0", *run, *evaluation, "--stacked", "--overwrite", "--out", str(out)],
                work, sizes.step_timeout_s))
            continue
        width = ["--width", str(sizes.width)] if sizes.width else []
        step = script_step(record, clock, f"tiny-distill-{method}", [
            py, "distill.py", "--method", method, "--ipc", str(sizes.ipc), *data, *run, "--iterations",
            str(sizes.iterations), "--batch-real", str(sizes.batch_real), "--num-freqs", str(sizes.num_freqs),
            *width, *compiled, "--overwrite", "--out", str(out)], work, sizes.step_timeout_s)
        if step["ok"]:
            step.update(set_size(out / "synthetic.pt"))
            record.write()
        results.append(step)
        results.append(script_step(record, clock, f"tiny-evaluate-{method}", [
            py, "evaluate.py", "--syn", str(out / "synthetic.pt"), *evaluation, *run, "--stacked", "--overwrite"],
            work, sizes.step_timeout_s))
    results.append(script_step(record, clock, "tiny-report", [py, "report.py", str(tiny)], work,
                               sizes.step_timeout_s))
    return results


def set_size(path: Path) -> dict:
    """The decoded training images of a distilled set and the last batch of the dm protocol's evaluation."""
    import torch
    from training import PROTOCOLS
    try:
        images = len(torch.load(path, weights_only=True)["labels"])
    except Exception as error:  # recorded, never fatal: the evaluation step says what is wrong with the file
        return {"set_error": f"{type(error).__name__}: {error}"}
    batch = PROTOCOLS["dm"].batch_size
    return {"set_images": images, "eval_batch": batch, "eval_last_batch": images % batch or batch}


# ----------------------------------------------------------------------------------------
# Step 2: timings at the field's shapes

def memory_reset(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory_peak(device) -> dict:
    import torch
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # KiB on Linux; never reset
    gpu = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None
    return {"peak_gpu_gb": None if gpu is None else round(gpu, 3), "peak_rss_gb_process_so_far": round(rss, 3)}


def measure(name: str, device, fn, report) -> bool:
    """fn() -> dict of figures, timed, with its peak memory, handed to report(name, entry); an exception is
    recorded, not raised. True if it succeeded."""
    import traceback
    start = time.monotonic()
    try:
        memory_reset(device)
        figures = fn()
        entry = {"ok": True, **figures, **memory_peak(device)}
    except Exception as error:  # a GPU-only failure is what this check is for: note it, go on
        entry = {"ok": False, "error": f"{type(error).__name__}: {error}"[:500],
                 "error_tail": traceback.format_exc()[-TAIL_CHARS:]}
    entry["seconds"] = round(time.monotonic() - start, 1)
    report(name, entry)
    return entry["ok"]


TIMING_STEPS = ("timing-data", "timing-iteration-dm", "timing-iteration-csdm", "timing-eval-epoch-stacked",
                "timing-eval-epoch-one-at-a-time")


def timings_child(spec_json: str, results_path: str) -> None:
    """Step 2 in a process of its own (a time limit, and a GPU fault cannot take the check down): each
    measurement one JSON line [name, entry] appended to results_path as soon as it is done."""
    import bench
    from data_lt import decode, initial_synthetic, load_long_tailed
    from networks import resolve_precision
    from runs import keep_freed_memory, resolve_device
    keep_freed_memory()  # as distill.py and evaluate.py run, and bench.py measures
    spec = json.loads(spec_json)
    sizes, device, holder = TimingSizes(**spec["sizes"]), resolve_device(spec["device"]), {}

    def report(name, entry):
        with open(results_path, "a") as f:
            f.write(json.dumps([name, entry], default=str) + "\n")

    def load():
        holder["data"] = load_long_tailed(spec["dataset"], spec["data_dir"], sizes.imbalance_factor, 0,
                                          log=lambda m: None)
        return {"data": holder["data"].name, "class_counts": holder["data"].class_counts}
    if not measure("timing-data", device, load, report):
        return
    data = holder["data"]
    precision = resolve_precision("auto", device, sizes.compile)
    for method in ("dm", "csdm"):
        measure(f"timing-iteration-{method}", device, lambda method=method: {
            "sec_per_iter": bench.iteration_seconds(data, device, method, sizes.num_freqs, sizes.compile,
                                                    sizes.repeats, sizes.warmup, sizes.ipc, sizes.batch_real),
            "method": method, "batch_real": sizes.batch_real, "ipc": sizes.ipc, "num_freqs": sizes.num_freqs,
            "compile": sizes.compile, "precision": precision, "repeats": sizes.repeats, "warmup": sizes.warmup},
            report)
    packed, packed_labels = initial_synthetic(data, sizes.ipc, 0, 2)
    images, labels = decode(packed, 2), packed_labels.repeat_interleave(4)
    for stacked in (True, False):
        def epoch(stacked=stacked):
            seconds = bench.networks_epoch_seconds(images, labels, sizes.networks, stacked, device, precision,
                                                   sizes.compile, sizes.repeats, warmup=2)
            return {"sec_per_epoch": seconds, "networks": sizes.networks, "images": len(labels),
                    "stacked": stacked, "compile": sizes.compile, "precision": precision,
                    "full_protocol_minutes": seconds * 1000 / 60}  # the dm protocol's 1000 epochs, no tests
        measure(f"timing-eval-epoch-{'stacked' if stacked else 'one-at-a-time'}", device, epoch, report)


def timings(record: Record, clock: Clock, args, work: Path, sizes: TimingSizes) -> None:
    """timings_child, stopped at sizes.step_timeout_s or the budget; its measurements are recorded as they come,
    and those it did not reach are marked so, with the child's exit status and the tail of its output."""
    left = clock.left() - GRACE_S
    if left <= 1:
        for name in TIMING_STEPS:
            record.step(name, {"ok": False, "skipped": "budget spent"})
        return
    lines, log = work / "timings.jsonl", work / "logs" / "timings.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    lines.unlink(missing_ok=True)
    spec = json.dumps({"dataset": args.dataset, "data_dir": args.data_dir, "device": args.device,
                       "sizes": asdict(sizes)})

    def collect():
        if lines.exists():
            for line in lines.read_text().splitlines():
                name, entry = json.loads(line)
                if name not in record.data["steps"]:
                    record.step(name, entry)
    result = run_command([sys.executable, "-c", "import sys, gpu_check; gpu_check.timings_child(*sys.argv[1:])",
                          spec, str(lines)], log, min(sizes.step_timeout_s, left), every=collect)
    collect()
    missing = [name for name in TIMING_STEPS if name not in record.data["steps"]]
    if record.data["steps"].get("timing-data", {}).get("ok") is False:
        for name in missing:
            record.step(name, {"ok": False, "skipped": "the data did not load (timing-data)"})
    elif missing:  # the child stopped or died in the first of these; it never started the others
        why = ("stopped at the step's limit or the budget" if result["stopped"] else
               f"the measuring process ended with exit status {result['returncode']}")
        record.step(missing[0], {"ok": False, "error": f"did not finish: {why}", "process_seconds": result["seconds"],
                                 "error_tail": tail(log)})
        for name in missing[1:]:
            record.step(name, {"ok": False, "skipped": f"not started ({missing[0]} did not finish)"})


# ----------------------------------------------------------------------------------------
# Step 3: the full-budget cells, stopped at the budget

def grid_command(args) -> list[str]:
    data = ["--data-dir", str(Path(args.data_dir).resolve())] if args.data_dir else []
    return ["bash", str(ROOT / "run_all.sh"), "--datasets", "cifar10", "--ifs", " ".join(map(str, GRID["ifs"])),
            "--ipcs", str(GRID["ipc"]), "--methods", " ".join(GRID["methods"]), "--out",
            str(Path(args.grid_out).resolve()), "--device", args.device, "--jobs-per-gpu", str(args.jobs_per_gpu),
            *data]


def cell_progress(folder: Path) -> dict:
    """How far one run folder got: its accuracy when finished, else the iterations in its checkpoint and the
    networks its interrupted evaluation kept."""
    found = {"folder": str(folder)}
    results = folder / "results.json"
    if results.exists():
        try:
            result = json.loads(results.read_text())
            return dict(found, state="finished", acc_mean=result.get("acc_mean"), acc_std=result.get("acc_std"))
        except (OSError, ValueError) as error:
            return dict(found, state=f"unreadable results.json ({error})")
    if (folder / "synthetic.pt").exists():
        found["state"] = "distilled"
    elif (folder / "checkpoint.pt").exists():
        found["state"] = "distilling"
        try:
            import torch
            checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True, map_location="cpu")
            found.update(iterations_done=int(checkpoint["iteration"]),
                         iterations=checkpoint.get("config", {}).get("iterations"),
                         distill_seconds=round(float(checkpoint.get("elapsed", 0.0)), 1))
        except Exception as error:
            found["checkpoint_error"] = f"{type(error).__name__}: {error}"[:300]
    else:
        found["state"] = "started" if folder.exists() else "not started"
    partial = folder / "evaluation.partial"
    if partial.is_dir():
        found["networks_done"] = len(list(partial.glob("network-*.json")))
    return found


def full_grid(record: Record, clock: Clock, args, work: Path, command: list[str] | None = None,
              cells: list[Path] | None = None) -> dict:
    """command (default: run_all.sh on the full-budget cells) until it ends or the budget is GRACE_S from its
    end, then SIGTERM to its process group; each cell's progress afterwards."""
    command = command or grid_command(args)
    if cells is None:
        root = Path(args.grid_out) / "cifar10"
        cells = [root / f"if{i}" / f"ipc{GRID['ipc']}" / m for i in GRID["ifs"] for m in GRID["methods"]]
    entry = {"command": " ".join(command), "grid_out": str(args.grid_out), "jobs_per_gpu": args.jobs_per_gpu}
    left = clock.left() - 2 * GRACE_S  # the stop itself may take GRACE_S, and the JSON is written after it
    if left < MIN_GRID_S:
        return record.step("grid", dict(entry, ok=False, skipped=f"{max(left, 0):.0f} s left of the budget"))
    log = work / "logs" / "grid.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    entry.update(started_at_s=round(clock.elapsed(), 1), log=str(log))

    def progress() -> list[dict]:
        cells_now = [cell_progress(c) for c in cells]
        for cell, found in zip(cells, cells_now):  # the queue's log of each cell (run_all.sh: OUT/logs/<cell>.log)
            cell_log = Path(args.grid_out) / "logs" / ("_".join(cell.parts[-4:]) + ".log")
            if cell_log.exists():
                found.update(log=str(cell_log), log_tail=tail(cell_log, 800))
        return cells_now
    last = [time.monotonic()]

    def now_and_then():  # a sitting cut off before the stop still leaves how far the cells got
        if time.monotonic() - last[0] >= PROGRESS_EVERY_S:
            last[0] = time.monotonic()
            record.step("grid", dict(entry, ok=None, state="running", seconds=round(clock.elapsed(), 1) -
                                     entry["started_at_s"], cells=progress(), log_tail=tail(log, 2000)))
    record.step("grid", dict(entry, ok=None, state="running"))
    result = run_command(command, log, left, env={"PYTHON": sys.executable}, every=now_and_then)
    entry.update(seconds=result["seconds"], returncode=result["returncode"], stopped_by_budget=result["stopped"],
                 clean_stop=result["clean_stop"], cells=progress(), log_tail=tail(log, 2000))
    entry["ok"] = result["stopped"] or result["returncode"] == 0  # stopped by the budget is the plan, not a failure
    return record.step("grid", entry)


# ----------------------------------------------------------------------------------------

def machine(device) -> dict:
    import torch
    from runs import environment
    info = dict(environment(), host=platform.node(), device=str(device), torch_cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                cuda_devices=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gb=round(properties.total_memory / GB, 1),
                    bf16=torch.cuda.is_bf16_supported())
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got '{text}'") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds (got {text})")
    return value


def build_parser() -> argparse.ArgumentParser:
    from runs import OneLineParser
    p = OneLineParser(prog="gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--budget-s", type=positive_seconds, default=480.0,
                   help="wall-clock seconds for all three steps (default: 480)")
    p.add_argument("--tiny-only", action="store_true", help="steps 1 and 2 only: no full-budget cells")
    p.add_argument("--data-dir", default=None, help="the CIFAR-10 folder (default: download, as distill.py does)")
    p.add_argument("--dataset", default="cifar10",
                   help="data set of steps 1 and 2 (default: cifar10; step 3 runs only on cifar10)")
    p.add_argument("--out", default="runs/gpu_check.json",
                   help="the JSON file, rewritten after every step (default: runs/gpu_check.json)")
    p.add_argument("--work", default=None,
                   help="folder of the tiny grid and of every step's log (default: a new temporary folder, kept)")
    p.add_argument("--grid-out", default="runs",
                   help="run_all.sh --out of step 3 (default: runs; results: the committed reference results, "
                        "where interrupted cells of earlier sittings continue)")
    p.add_argument("--jobs-per-gpu", type=int, default=3,
                   help="run_all.sh --jobs-per-gpu of step 3: cells at once on each GPU (default: 3)")
    return p


def check_options(args) -> None:
    from data_lt import DATASETS, UsageError
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give the JSON file to write")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir} does not exist; give the data folder or omit it to download")
    if args.dataset not in DATASETS:
        raise UsageError(f"--dataset {args.dataset}: use one of {', '.join(DATASETS)}")
    if args.jobs_per_gpu < 1:
        raise UsageError(f"--jobs-per-gpu must be >= 1 (got {args.jobs_per_gpu})")
    for option, folder in (("--work", args.work), ("--grid-out", args.grid_out)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise UsageError(f"{option} {folder} is a file; give a folder")


def job(args, holder, status: list) -> None:
    from runs import resolve_device
    clock = Clock(args.budget_s)
    check_options(args)
    device = resolve_device(args.device)  # a UsageError naming --device where it does not exist
    for name in ("data_dir", "work", "grid_out", "out"):  # the steps run in the repository's folder
        if getattr(args, name) is not None:
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    record = Record(out, {"kind": "gpu_check", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "budget_s": args.budget_s, "tiny_only": args.tiny_only, "work": str(work),
                          "options": vars(args), "tiny_sizes": asdict(TINY), "timing_sizes": asdict(TIMING),
                          "machine": machine(device)})
    record.write()
    print(f"gpu_check.py: {record.data['machine'].get('gpu', 'cpu')}; budget {args.budget_s:.0f} s; "
          f"writing {out}", flush=True)
    for name, step in (("tiny", lambda: tiny_grid(record, clock, args, work, TINY)),
                       ("timings", lambda: timings(record, clock, args, work, TIMING)),
                       ("grid", lambda: None if args.tiny_only or args.dataset != "cifar10"
                        else full_grid(record, clock, args, work))):
        print(f"== {name} ({clock.elapsed():.0f} s of {args.budget_s:.0f} s)", flush=True)
        step()
    if not args.tiny_only and args.dataset != "cifar10":
        record.step("grid", {"ok": None, "skipped": f"--dataset {args.dataset}: the full-budget cells are CIFAR-10's"})
    record.data["seconds"] = round(clock.elapsed(), 1)
    failed = [name for name, step in record.data["steps"].items() if step.get("ok") is False]
    record.data["failed"] = failed
    record.write()
    for name, step in record.data["steps"].items():
        verdict = "ok" if step.get("ok") else ("skipped" if step.get("skipped") else "FAILED")
        print(f"{name:<36}{verdict:<8}{step.get('seconds', '')}", flush=True)
    skipped = [name for name in failed if record.data["steps"][name].get("skipped")]
    print(f"gpu_check.py: {len(failed) - len(skipped)} step(s) failed, {len(skipped)} skipped; wrote {out} "
          f"({clock.elapsed():.0f} s)", flush=True)
    status.append(1 if failed else 0)


def main(argv=None) -> int:
    from runs import run_script
    status: list[int] = []
    run_script(build_parser(), lambda args, holder: job(args, holder, status), argv)
    return status[-1] if status else 0


if __name__ == "__main__":
    sys.exit(main())
