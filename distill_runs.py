"""distill.py's run records: the output folder, checkpoints and --resume, the stretches, stopping, the outputs.

The output folder holds synthetic.pt (images, labels, mean, std, class_names, class_counts, config),
synthetic.png (one row per class), init.png (the real initialisation), init_vs_final.png, loss.csv and
loss.png, config.json, run.json (command line, commit, versions, device, wall time, and the stretches:
which iterations each sitting of a resumed run distilled, where and at which commit) and a README.md of
the run. Read synthetic.pt with torch.load(path, weights_only=True).

A checkpoint (checkpoint.pt: images, optimiser state, iteration, loss history, config, stretches) is written
atomically every --ckpt-every iterations and when the run is stopped by SIGINT or SIGTERM; --resume
continues from it once its options are those of the run (option_differences: every option but the run
options, such as --iterations, which may grow). A folder holding a run is written into only when told to
resume it or to replace it, and never so that an evaluation of its set would describe a set that is gone.
"""
from __future__ import annotations

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

from data_lt import UsageError
from runs import (atomic_save, atomic_write_text, check_out_is_folder, environment, FORMAT_VERSION,
                  PARTIAL_EVALUATION, plot_loss, plot_side_by_side, Processes, processor_name, resolve_device,
                  save_grid, write_run_readme)
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
# The output folder and the options of the run in it

def check_out_folder(args) -> None:
    """Refuse to write into another run's folder unless told to resume it or replace it."""
    out = Path(args.out)
    check_out_is_folder(out)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not (args.resume or args.overwrite):
        raise UsageError(f"--out {out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                         f"--overwrite to replace it, or another --out")


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
    run's, as '--option theirs (what) vs ours (now)'. A record from before --data-seed drew its subset from
    its --seed."""
    recorded = dict(with_present_kernel_name(recorded), data_seed=recorded.get("data_seed", recorded.get("seed")))
    theirs, ours = ADDED_OPTIONS | comparable_config(recorded), comparable_config(config)
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


# ----------------------------------------------------------------------------------------
# Checkpoints and stretches

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


def save_checkpoint(state: LoopState, rows: torch.Tensor, total_rows: int, iteration: int, elapsed: float,
                    config: dict, processes: Processes, out: Path) -> None:
    """checkpoint.pt after `iteration` iterations: the whole set and optimiser state (gathered from each process's
    `rows` of the stored set), the history."""
    images = processes.gather_rows(rows, state.syn.detach().cpu(), total_rows)
    optimizer = {key: (processes.gather_rows(rows, value.cpu(), total_rows) if value.dim() > 0 else value.cpu())
                 for key, value in optimizer_rows(state.optimizer).items()}
    if processes.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_save({"format_version": FORMAT_VERSION, "iteration": iteration, "images": images,
                     "optimizer": optimizer, "history": state.history, "elapsed": elapsed, "config": config,
                     "stretches": stretches_done(state)},
                    out / "checkpoint.pt")


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
# Stopping and diverging

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
    """The loss or the synthetic images became non-finite."""


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


# ----------------------------------------------------------------------------------------
# Before the run: every input checked before anything is written or deleted

def prepare_out_folder(run, processes: Processes, log) -> dict | None:
    """Check --out against --resume / --overwrite and read the checkpoint to continue (made with the resolved
    options `run`, distill.resolve); only then, with everything checked, clear the old run's files for --overwrite.
    Returns the checkpoint (or None); raises Finished when --resume finds nothing left to do."""
    out, config = Path(run.out), vars(run)
    checkpoint = None
    if run.resume:
        checkpoint = load_checkpoint(out, config)
        if checkpoint is not None and checkpoint["iteration"] > run.iterations:
            raise UsageError(f"--iterations {run.iterations}: the checkpoint in {out} is already at iteration "
                             f"{checkpoint['iteration']}; resume with --iterations {checkpoint['iteration']} or more")
        if finished_set(out, config, checkpoint):
            raise Finished(f"--resume: {out} holds a finished run of {run.iterations} iterations; nothing to do")
        log(f"resuming from iteration {checkpoint['iteration']}" if checkpoint else
            f"--resume: no checkpoint in {out}; starting from the beginning")
        other = checkpoint and other_device_kinds(checkpoint, resolve_device(run.device))
        if other:
            log(f"note: {out} was distilled on {', '.join(other)} until now and continues on "
                f"{resolve_device(run.device).type}: the networks, frequencies and batches are drawn by "
                f"torch.Generator on the device, which draws other numbers on another kind, so the set will "
                f"differ from an uninterrupted run's (run.json's stretches record each sitting's device)")
    check_no_evaluation_replaced(run, out)
    if run.overwrite and processes.main:
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


class Finished(Exception):
    """--resume on a run that is already complete."""


# ----------------------------------------------------------------------------------------
# After the run: the outputs, or where a stopped run stands

def run_record(device: torch.device, processes: Processes, data_source: str, result: dict,
               session_start: float) -> dict:
    """run.json: the environment (command line, commit, versions), the device and processes, the data's source,
    the distillation's seconds (all sittings) and this session's, and the stretches."""
    return dict(environment(), device=str(device), processes=processes.world, data_source=data_source,
                wall_seconds=round(result["history"][-1][2] if result["history"] else 0.0, 1),
                iterations_done=result["iterations_done"],
                finished=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()),
                session_seconds=round(time.time() - session_start, 1), stretches=result["stretches"])


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


def report_stop(prog: str, result: dict, out: Path, world: int) -> None:
    """The one line after a signal: where the run stands and the command that continues it."""
    command = " ".join(shlex.quote(a) for a in sys.argv[1:] if a not in ("--resume", "--overwrite"))
    launcher = "torchrun ... distill.py" if world > 1 else "python distill.py"
    print(f"{prog}: stopped by signal {result['stopped']} after {result['iterations_done']} of "
          f"{result['config']['iterations']} iterations; checkpoint written to {out / 'checkpoint.pt'}; "
          f"continue with: {launcher} {command} --resume", file=sys.stderr, flush=True)


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
