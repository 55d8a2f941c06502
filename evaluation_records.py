"""An evaluation across sittings (evaluate.py --resume): each finished network kept in --out/evaluation.partial/.

- fingerprint: what a network's result depends on besides its index; a kept network is taken only under the
  same fingerprint, and `differences` says in one line which option differs.
- keep_network / read_kept / networks_kept: network-<k>.json, written atomically as each network finishes.
- finished_already / later_networks_kept: whether --resume finds the evaluation done, or one begun after it.
- sittings: results.json's record of which networks each sitting trained, in how many seconds, where.
- check_out / continued_networks: the output folder's rules (an evaluation is replaced only with --overwrite).
- plot_per_class: results.json's picture.

An evaluation survives stops network by network: each finished network is written at once to
--out/evaluation.partial/network-<k>.json (its accuracies, tests, seconds, and the sitting's commit and
machine; networks trained together once the group finishes), and --resume trains only the networks missing
there, refusing any kept with other options (every option but where and how many may change: --device
within one kind, --data-dir, --num-eval upwards, --stacked; the precision and --compile may not; the
training images, labels and tested split are compared by their SHA-256). Each network's draws come from its
own seed, so the result is that of an uninterrupted evaluation. The folder is removed once results.json is
written; --resume on a finished evaluation has nothing to do if it was made with the same options and
networks, and refuses it otherwise. --out must be on storage every process sees under torchrun.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch

from data_lt import UsageError
from runs import (atomic_write_text, check_out_is_folder, environment, PARTIAL_EVALUATION, Processes,
                  processor_name, pyplot)


# options that change where, how fast or how many networks are run, not what network k's result is (the
# stacked and one-at-a-time trainings agree up to rounding; the code's commit is recorded, not compared)
RUN_OPTIONS = {"out", "overwrite", "resume", "device", "data_dir", "num_eval", "stacking", "syn", "report", "summary",
               "export", "set_options_given", "teacher_cache"}
# what a fingerprint entry that is not an option stands for, in refusals
FINGERPRINT_WORDS = {"network": "the network's shape (--model, --norm, the set's width and depth)",
                     "data_sha256": "the training images, labels or tested split (another set, or the set "
                                    "distilled again)",
                     "device_type": "the kind of device (a GPU draws other random numbers than a CPU: --device)"}


# what a results.json from before fingerprints were recorded says of the options, compared in their stead
RECORDED_BEFORE_FINGERPRINTS = ("epochs", "protocol", "model", "split")


@dataclasses.dataclass
class Trained:
    """One trained network's outcome: its index k (its seed's counter), final accuracy (%) and per-class
    accuracy, the tests during training [(epoch, accuracy)], and the seconds its training and tests took."""
    index: int
    accuracy: float
    per_class: torch.Tensor
    curve: list
    seconds: float


def check_out(out: Path, args) -> None:
    """Before any training: --out must be a folder (or not exist yet); an evaluation already in it is
    replaced only with --overwrite (or found finished by --resume), and an interrupted one (PARTIAL_EVALUATION)
    continued with --resume or restarted with --overwrite."""
    check_out_is_folder(out)
    if (out / "results.json").exists() and not (args.overwrite or args.resume):
        raise UsageError(f"--out {out} already holds an evaluation (results.json); give another --out, or "
                         f"--overwrite to replace it")
    kept = sorted((out / PARTIAL_EVALUATION).glob("network-*.json"))
    if kept and not (args.resume or args.overwrite):
        raise UsageError(f"--out {out} holds {len(kept)} finished networks of an interrupted evaluation "
                         f"({PARTIAL_EVALUATION}/); pass --resume to continue it, or --overwrite to start again")


def fingerprint(args, network: dict, tensors, epochs: int, device, dropped=(), added=None) -> dict:
    """What network k's result depends on besides k: every option but RUN_OPTIONS and `dropped` with --epochs
    (`epochs`) and the networks' seed resolved (--seed and --data-seed otherwise draw the data, which the hash
    covers), the
    network's shape, the kind of device (CUDA's generators draw other numbers than the CPU's for a seed), the
    SHA-256 of `tensors` (the training images and labels and the split tested on: the very pixels, wherever
    they were read from) and the entries of `added`. As JSON reads it back."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.contiguous().numpy().tobytes())
    options = {name: value for name, value in vars(args).items()
               if name not in RUN_OPTIONS | {"seed", "data_seed"} | set(dropped)}
    options.update(epochs=epochs, network=network,
                   eval_seed=args.seed if args.eval_seed is None else args.eval_seed,  # the networks' seed
                   device_type=device.type, data_sha256=digest.hexdigest(), **(added or {}))
    return json.loads(json.dumps(options))


def differences(recorded: dict, options: dict) -> str:
    """The fingerprint entries that differ, as options where they are ones: "--epochs 300 (now 200); ..."."""
    parts = []
    for name in sorted(recorded.keys() | options.keys()):
        if recorded.get(name) != options.get(name):
            option = f"--{name.replace('_', '-')} {recorded.get(name)!r} (now {options.get(name)!r})"
            parts.append(FINGERPRINT_WORDS.get(name, option))
    return "; ".join(parts)


def this_sitting(device, processes: Processes) -> dict:
    """Where and at which commit the job's networks are trained, and when it started (to the microsecond: the
    start tells sittings apart, and two evaluations of one folder may start within a second): the main
    process's record, the same on every process."""
    record = environment()
    mine = {"start": datetime.now(timezone.utc).isoformat(timespec="microseconds"), "commit": record["commit"],
            "processor": processor_name(record | {"device": str(device)}), "device": str(device),
            "processes": processes.world}
    return processes.gather_objects([mine])[0]


def keep_network(folder: Path, trained: Trained, options: dict, sitting: dict) -> None:
    """Write one finished network to folder/network-<k>.json (atomically: a stop while writing loses only it)."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"index": trained.index, "accuracy": trained.accuracy, "per_class": trained.per_class.tolist(),
              "curve": [list(test) for test in trained.curve], "seconds": round(trained.seconds, 1),
              "sitting": sitting, "options": options}
    atomic_write_text(json.dumps(record, indent=1) + "\n", folder / f"network-{trained.index}.json")


def read_kept(path: Path) -> tuple[Trained, dict, dict]:
    """One kept network: (Trained, its sitting, its fingerprint); one line where the file is not one."""
    try:
        record = json.loads(path.read_text())
        trained = Trained(int(record["index"]), float(record["accuracy"]),
                          torch.tensor(record["per_class"], dtype=torch.float64),
                          [tuple(test) for test in record["curve"]], float(record["seconds"]))
        sitting, options = dict(record["sitting"]), dict(record["options"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"--resume: {path} cannot be read ({type(error).__name__}); delete it to train that "
                         f"network again")
    return trained, sitting, options


def networks_kept(folder: Path, options: dict, num_eval: int) -> list[tuple[Trained, dict]]:
    """The networks an interrupted evaluation finished, [(Trained, its sitting)]: each must have been trained
    with `options` and be one of the num_eval asked for, else one line saying what differs."""
    kept = []
    for path in sorted(folder.glob("network-*.json")):
        trained, sitting, recorded = read_kept(path)
        if recorded != options:
            raise UsageError(f"--resume: {path} was trained with other options: {differences(recorded, options)}; "
                             f"give the same again, or --overwrite to start again")
        kept.append((trained, sitting))
    beyond = sorted(trained.index + 1 for trained, _ in kept if trained.index >= num_eval)
    if beyond:
        raise UsageError(f"--num-eval {num_eval}: {folder} holds network {', '.join(map(str, beyond))} of this "
                         f"evaluation; pass --num-eval {max(beyond)} or more, or --overwrite to start again")
    return kept


def finished_already(out: Path, options: dict, num_eval: int) -> bool:
    """--resume where results.json is: True (nothing to do) when it is this evaluation, made with these options
    and networks, and no later one was interrupted after it (kept networks of sittings it does not list);
    False where there is none, or a later one to continue; one line where it was made otherwise. Reads only."""
    path = out / "results.json"
    if not path.exists() or later_networks_kept(out / PARTIAL_EVALUATION, path):
        return False
    try:
        result = json.loads(path.read_text())
        recorded = dict(result.get("fingerprint") or {name: result[name] for name in RECORDED_BEFORE_FINGERPRINTS})
        made = int(result["num_eval"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(f"--resume: {path} cannot be read ({type(error).__name__}); --overwrite to replace it")
    compared = {name: options.get(name) for name in recorded} if "fingerprint" not in result else options
    if made != num_eval or recorded != compared:
        what = f"--num-eval {made} (now {num_eval})" if made != num_eval else differences(recorded, compared)
        raise UsageError(f"--resume: {out} holds a finished evaluation made with other options: {what}; give "
                         f"another --out, or --overwrite to replace it")
    return True


def later_networks_kept(folder: Path, results: Path) -> bool:
    """Whether folder keeps a network of a sitting that results.json does not list: an evaluation begun after
    it (with --overwrite) and interrupted. Networks of its own sittings are a leftover of a stop between
    writing results.json and removing the folder; a network file that cannot be read counts as later."""
    files = sorted(folder.glob("network-*.json"))
    if not files:
        return False
    try:
        listed = {sitting["start"] for sitting in json.loads(results.read_text()).get("sittings", [])}
        return any(json.loads(file.read_text())["sitting"]["start"] not in listed for file in files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True


def sittings(kept: list[tuple[Trained, dict]], trained_now: list[int], sitting: dict, seconds: float) -> list[dict]:
    """results.json's sittings: for each job that trained networks, which ones, in how many seconds, at which
    commit and where (the earlier ones' seconds are their networks' own; this one's is its wall time)."""
    earlier = {}
    for trained, where in kept:
        entry = earlier.setdefault(where["start"], dict(where, networks=[], seconds=0.0))
        entry["networks"] = sorted(entry["networks"] + [trained.index])
        entry["seconds"] = round(entry["seconds"] + trained.seconds, 1)
    now = [dict(sitting, networks=sorted(trained_now), seconds=round(seconds, 1))] if trained_now else []
    return sorted(earlier.values(), key=lambda entry: entry["start"]) + now


def continued_networks(args, out: Path, options: dict, processes: Processes) -> list[tuple[Trained, dict]] | None:
    """The networks this evaluation takes from an interrupted one ([] without --resume); None where --resume
    finds it finished. Every process reads the folder before the main one removes a leftover, or the networks
    --overwrite replaces."""
    folder = out / PARTIAL_EVALUATION
    finished = args.resume and finished_already(out, options, args.num_eval)
    kept = networks_kept(folder, options, args.num_eval) if args.resume and not finished else []
    processes.barrier()
    if (finished or args.overwrite) and processes.main:
        shutil.rmtree(folder, ignore_errors=True)
    return None if finished else kept


def plot_per_class(result: dict, path: Path) -> None:
    """Per-class accuracy as bars, the class's training count as a line on a log axis."""
    plt = pyplot()
    names, counts = result["class_names"], result["class_counts"]
    fig, axis = plt.subplots(figsize=(max(6, 0.45 * len(names)), 3.8))
    axis.bar(range(len(names)), result["per_class"], color="tab:blue")
    axis.set_ylabel(f"{result['split']} accuracy (%)")
    axis.set_xticks(range(len(names)))
    axis.set_xticklabels(names, rotation=60, ha="right", fontsize=7 if len(names) > 20 else 9)
    twin = axis.twinx()
    twin.plot(range(len(names)), counts, color="tab:orange", marker="o", ms=3)
    twin.set_yscale("log")
    twin.set_ylabel("training images (log)", color="tab:orange")
    axis.set_title(f"{result.get('evaluated', '')}: {result['acc_mean']:.2f} +- {result['acc_std']:.2f} %", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
