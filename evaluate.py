"""Train fresh networks on a synthetic set (or a baseline) and report their final-epoch test accuracy.

$ python evaluate.py --syn runs/csdm/synthetic.pt                        # 5 networks x 1000 epochs, DM protocol
$ python evaluate.py --syn runs/csdm/synthetic.pt --num-eval 2 --epochs 300 --device cpu
$ python evaluate.py --syn runs/csdm/synthetic.pt --protocol ncfm        # NCFM's evaluation (2000 epochs, AdamW)
$ python evaluate.py --syn runs/csdm/synthetic.pt --model resnet18       # cross-architecture
$ python evaluate.py --baseline random --dataset cifar10 --imbalance-factor 200 --ipc 10 --factor 2 --out runs/random
$ python evaluate.py --baseline full --dataset cifar10 --imbalance-factor 200 --epochs 200 --out runs/full
$ torchrun --nproc_per_node=5 evaluate.py --syn runs/csdm/synthetic.pt    # one network per process
$ python evaluate.py --syn runs/csdm/synthetic.pt --export runs/csdm/images  # DIR/<class>/<n>.png, no training
$ python evaluate.py --syn runs/csdm/synthetic.pt --resume               # continue a stopped evaluation
$ python evaluate.py --syn runs/csdm/synthetic.pt --labels soft          # a teacher's soft labels (teacher.py)
$ python evaluate.py --syn mine.pt --dataset cifar10 --imbalance-factor 200  # tensor file {"images", "labels"}
$ python evaluate.py --syn runs/csdm/images --dataset cifar10 --imbalance-factor 200  # image folder DIR/<class>/*.png

Each network is trained from scratch under a protocol of training.py (--protocol dm: SGD, batch 256,
1000 epochs, DSA, as DC / DSA / DM; --protocol ncfm: NCFM's AdamW, CutMix and random-resized-crop
evaluation) and tested once after its last epoch on the balanced test split (or, with --split val,
on the validation split used to choose hyperparameters). That final-epoch accuracy is the result;
nothing is chosen on the test set. Where a protocol also tests during training (ncfm, every twentieth
of it: every 100 of 2000 epochs), the best of those tests is recorded beside it as `best_*`, labelled, because the
published figures report it. The mean and std are over --num-eval networks, each seeded from --eval-seed
(else --seed) and its index.
On a GPU the ConvNets of a process train together as one grouped network (stacked.py; each network its
own draws, the same results up to floating-point rounding); on a CPU one after another, which measured
faster there (BENCHMARKS.md). --stacked and --one-at-a-time choose either.

A set from elsewhere (a tensor file or an image folder, synsets.py; see --syn's help) is evaluated on the data
set the data options name, by the field's ConvNet.

--baseline random trains on real images drawn exactly as distill.py's starting set at the same
--ipc and --factor (IPC x factor^2 real images per class, each stored image holding factor x factor
tiles, decoded): the fair baseline of a distilled set is the random set at its factor.

An evaluation survives stops network by network (evaluation_records.py): each finished network is kept in
--out/evaluation.partial/ and --resume trains only the missing ones, refusing any kept with other options.

--labels soft trains each network on a teacher's soft labels of every augmented batch (teacher.py): the
teacher is trained once on the whole long-tailed training split and cached; results.json records it.

results.json: acc_mean, acc_std (percent), accs (one per network), per_class (mean over networks,
class order), head / medium / tail (mean accuracy of the first, middle and last third of the classes
in long-tail order: for 10 classes 3 / 4 / 3), best_acc_mean / best_accs (best over the protocol's
evaluations), the protocol's settings, the model, the configuration, sittings (which networks each
sitting trained, in how many seconds, at which commit, where; an earlier sitting's seconds are its
networks' own), fingerprint (what --resume compares), labels (and for soft ones temperature and teacher:
its options, test accuracy per class and by third, seconds, machine) and, for --syn, syn_sha256 (the evaluated file's
SHA-256, to check a copy against); per_class.png shows the per-class accuracy beside the class counts, and
the run folder's README.md is updated with the numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from data_lt import (DATA_DEFAULTS, UsageError, add_data_arguments, cache_dir, check_factor, counter_seed,
                     data_seed, decode, initial_synthetic, load_long_tailed)
from networks import MODELS, NORMS, PRECISIONS, build_network, depth_for_size, reset_parameters_, resolve_precision
from evaluation_records import (Trained, check_out, continued_networks, fingerprint, keep_network, plot_per_class,
                                sittings, this_sitting)
from runs import (atomic_write_text, check_positive, environment, keep_freed_memory,
                  OneLineParser, PARTIAL_EVALUATION, Processes, run_script, start_processes, write_run_readme)
from stacked import train_networks_stacked
from synsets import check_matches, export_set, fit_own_set, read_set
from teacher import TEACHER_LOSSES, TEACHER_SCHEDULE, load_or_train_teacher, soft_targets
from training import POOL_SCHEDULES, PROTOCOLS, long_tail_groups, per_class_accuracy, train_network

STREAM_EVAL = 21
# --labels soft's defaults, chosen on the validation split (results/ablations/soft_labels.md)
SOFT_DEFAULTS = {"temperature": 4.0, "teacher_loss": "balanced"}
SOFT_OPTIONS = ("temperature", "teacher_loss", "teacher_epochs")


# the options a --syn evaluation takes from the set's config, with their defaults for the baselines
SET_OPTIONS = {name: DATA_DEFAULTS[name] for name in ("dataset", "imbalance_factor", "val_per_class", "n_max",
                                                      "image_size")} | {"ipc": 10, "factor": 2, "data_seed": None}


class EvaluateParser(OneLineParser):
    """evaluate.py's parser: the set options are left out of argparse's namespace unless typed, recorded as
    `set_options_given` (so --syn can refuse one that disagrees with the set, even at its default value), then
    filled with their defaults."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.set_options_given = [name for name in SET_OPTIONS if hasattr(namespace, name)]
        for name, value in SET_OPTIONS.items():
            if not hasattr(namespace, name):
                setattr(namespace, name, value)
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    p = EvaluateParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--syn", default=None,
                      help="the set to evaluate: a synthetic.pt written by distill.py (its data set, IF, validation "
                           "split, IPC and factor are the set's own; typing another value is refused); or a set from "
                           "elsewhere, evaluated on the data set the data options name (synsets.py): a tensor file "
                           "(torch.load weights_only) holding {'images': (N, C, H, W), 'labels': (N,)} (optionally "
                           "'class_names', 'mean', 'std') or (images, labels), or an image folder DIR/<class>/*.png "
                           "as --export writes it. uint8 images, and float ones without a 'mean' and 'std', are "
                           "pixels (0..255, [0, 1]) and are normalised with the data set's mean and std; float "
                           "images with a 'mean' and 'std' are taken as normalised with those. Classes are matched "
                           "by name (folder names, class_names), every class needs an image")
    what.add_argument("--baseline", default=None, choices=("random", "full"),
                      help="random: real images drawn as distill.py's starting set (--ipc, --factor); "
                           "full: the whole long-tailed set")
    what.add_argument("--report", default=None, metavar="DIR", help="the same as `python report.py DIR`")
    p.add_argument("--summary", default=None, metavar="JSON", help="--report: see report.py --help")
    add_data_arguments(p, defaults=False)
    p.add_argument("--ipc", type=int, default=argparse.SUPPRESS,
                   help=f"--baseline random: stored images per class (default: {SET_OPTIONS['ipc']})")
    p.add_argument("--factor", type=int, default=argparse.SUPPRESS,
                   help=f"--baseline random: multi-formation factor of the set it is compared with, IPC x "
                        f"factor^2 real images per class (default: {SET_OPTIONS['factor']}, distill.py's)")
    g = p.add_argument_group("training")
    g.add_argument("--protocol", default="dm", choices=tuple(PROTOCOLS),
                   help="evaluation protocol (training.py's PROTOCOLS): dm (SGD, 1000 epochs) or ncfm (AdamW, "
                        "CutMix, random-resized crop, 2000 epochs)")
    g.add_argument("--model", default="convnet", choices=MODELS, help="network trained on the set")
    g.add_argument("--num-eval", type=int, default=5, help="networks trained from scratch")
    g.add_argument("--epochs", type=int, default=None,
                   help="epochs per network (default: the protocol's; the schedule scales with it)")
    g.add_argument("--norm", default=None, choices=NORMS,
                   help="normalisation (default: the distilled ConvNet's, or the model's own)")
    g.add_argument("--precision", default="auto", choices=("auto",) + PRECISIONS,
                   help="bf16: bfloat16 autocast; fp32: float32; auto: bf16 where it is fast (GPUs; CPUs with AMX or "
                        "AVX512-BF16 when --compile)")
    g.add_argument("--compile", action="store_true", help="torch.compile the network's training step")
    stacking = g.add_mutually_exclusive_group()
    stacking.add_argument("--stacked", dest="stacking", action="store_const", const="stacked",
                          help="train the ConvNets a process trains (without batch norm) together as one stacked "
                               "network (stacked.py: each network's own draws, the same results up to floating-point "
                               "rounding); the default on GPUs, where it makes fewer, larger kernel calls")
    stacking.add_argument("--one-at-a-time", dest="stacking", action="store_const", const="one",
                          help="train the networks one after another; the default on CPUs, where it measured 1.3x "
                               "faster an epoch than stacked (the 2-core EPYC, bf16, compiled)")
    g.add_argument("--split", default="test", choices=("test", "val"),
                   help="where to measure: the test split, or the validation split (for choosing hyperparameters)")
    g = p.add_argument_group("labels (teacher.py)")
    g.add_argument("--labels", default="hard", choices=("hard", "soft"),
                   help="hard: the set's labels (cross-entropy); soft: a teacher trained on the long-tailed training "
                        "split labels every augmented batch and the network minimises T^2 KL(teacher || network) at "
                        "temperature T (the evaluation of SRe2L, RDED and the soft-label long-tailed methods)")
    g.add_argument("--temperature", type=float, default=None,
                   help=f"--labels soft: the temperature T of the teacher's and the network's softmax (default: "
                        f"{SOFT_DEFAULTS['temperature']:g})")
    g.add_argument("--teacher-loss", default=None, choices=TEACHER_LOSSES,
                   help=f"--labels soft: balanced: the teacher minimises the logit-adjusted loss CE(f + log pi, y) "
                        f"and labels with its raw logits f (balanced); ce: plain cross-entropy (head-biased) "
                        f"(default: {SOFT_DEFAULTS['teacher_loss']})")
    g.add_argument("--teacher-epochs", type=int, default=None,
                   help=f"--labels soft: the teacher's epochs (default: the {TEACHER_SCHEDULE} schedule's "
                        f"{POOL_SCHEDULES[TEACHER_SCHEDULE].epochs}; the schedule scales with it)")
    g.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="--labels soft: where teachers are kept, one file each, trained once per data set, subset "
                        "and teacher option (default: $CSDM_CACHE_DIR/teachers, else ~/.cache/csdm/teachers)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of the networks and batches (and of the baselines' "
                                                       "starting images, and their data subset unless --data-seed)")
    g.add_argument("--eval-seed", type=int, default=None,
                   help="seed of the networks and batches alone (default: --seed); a baseline of --seed N judged by "
                        "the networks that judge the sets, for paired differences")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--out", default=None,
                   help="folder for results.json (default: next to --syn; for baselines runs/baseline-<kind>-<dataset>-"
                        "if<IF>[-ipc<IPC>-f<factor>])")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a results.json (or an interrupted evaluation) already in --out")
    g.add_argument("--resume", action="store_true",
                   help=f"continue an interrupted evaluation in --out: the networks it finished "
                        f"({PARTIAL_EVALUATION}/) are taken, the others trained")
    g.add_argument("--export", default=None, metavar="DIR",
                   help="with --syn (a synthetic.pt): write the set as DIR/<class>/<n>.png (an image folder other "
                        "tools read, and --syn DIR reads back) and stop; DIR must not exist yet")
    return p


# ----------------------------------------------------------------------------------------
# Training networks and testing them

def test_split(data, split: str):
    """(images, labels) of the split the networks are measured on."""
    if split == "test":
        return data.test_images, data.test_labels
    if len(data.val_labels) == 0:
        raise UsageError("--split val: this run has no validation split; distill with --val-per-class N "
                         "(or pass --val-per-class N with a baseline)")
    return data.val_images, data.val_labels


def evaluate(images, labels, data, args, network: dict, device, processes: Processes | None = None,
             done: tuple = (), keep=None, soft=None) -> dict | None:
    """Train args.num_eval networks (build_network(**network)) on (images, labels) under args.protocol and
    test each after its last epoch (and at the protocol's evaluation epochs, for best_*). Networks already in
    `done` (Trained, from an interrupted evaluation) are not trained again; keep(trained) is called as each
    network finishes. Under torchrun, the networks left are shared round-robin among the processes; the main
    process returns the summary. A process's ConvNets (without batch norm) train together as one stacked
    network (stacked.train_networks_stacked: each its own generator and draws, results per network as one at
    a time up to rounding) where stacks() says so; with soft labels (soft: training.SoftTargets, the teacher's)
    one at a time."""
    processes = processes or Processes()
    protocol = PROTOCOLS[args.protocol]
    epochs = args.epochs or protocol.epochs
    images, labels = images.to(device), labels.to(device)
    test_images, test_labels = (t.to(device) for t in test_split(data, args.split))
    test_counts = torch.bincount(test_labels.cpu(), minlength=data.num_classes).double()
    # one network object, redrawn for each evaluation: torch.compile then compiles once per process
    net = build_network(device=device, **network)

    def accuracy():
        per_class = per_class_accuracy(net, test_images, test_labels, data.num_classes, data.normalise,
                                       precision=args.precision, compile=args.compile)
        return float((per_class * test_counts).sum() / test_counts.sum()), per_class

    finished = {trained.index for trained in done}
    indices = [k for k in range(args.num_eval) if k not in finished][processes.rank::processes.world]
    together = (len(indices) > 1 and network["model"] == "convnet" and network.get("norm") != "batch"
                and soft is None and stacks(args.stacking, device))
    train = train_together if together else partial(train_one_at_a_time, soft=soft)
    mine = train(indices, net, accuracy, images, labels, args, network, protocol, epochs, device, processes,
                 keep or (lambda trained: None))
    mine = processes.gather_objects(mine)
    return summarise(sorted([*done, *mine], key=lambda trained: trained.index), data, args, epochs) \
        if processes.main else None


def progress_bar(processes: Processes, epochs: int, description: str):
    """A tqdm bar of epochs on the main process's terminal, else None."""
    if not (processes.main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(total=epochs, desc=description, unit="epoch", leave=False)


def eval_generator(args, k: int, device) -> torch.Generator:
    """Network k's generator: its initialisation, batch order and augmentation draws, from --eval-seed (else
    --seed)."""
    seed = args.seed if args.eval_seed is None else args.eval_seed
    return torch.Generator(device=device).manual_seed(counter_seed(seed, STREAM_EVAL, k))


class Tests:
    """A network's tests during training: the curve [(epoch, accuracy)], and the whole result (accuracy, per
    class) of the test after the last epoch, which every protocol makes (so the final test is not run twice)."""

    def __init__(self, epochs: int):
        self.epochs, self.curve, self.final = epochs, [], None

    def record(self, epoch: int, result: tuple) -> None:
        self.curve.append((epoch, result[0]))
        if epoch == self.epochs:
            self.final = result


def stacks(stacking: str | None, device: torch.device) -> bool:
    """--stacked / --one-at-a-time, or by default stacked on GPUs and one at a time on CPUs (measured on the
    2-core EPYC: 0.98 s an epoch of 5 ConvNets one at a time against 1.26 s stacked, bench.py)."""
    return stacking == "stacked" if stacking else device.type == "cuda"


def train_one_at_a_time(indices, net, accuracy, images, labels, args, network, protocol, epochs, device,
                        processes, keep, soft=None) -> list[Trained]:
    """Networks `indices` trained in turn through the one `net`, each kept as it finishes; with soft (the
    teacher's SoftTargets) on its soft labels."""
    mine = []
    for k in indices:
        start, tests = time.perf_counter(), Tests(epochs)
        generator = eval_generator(args, k, device)
        reset_parameters_(net, generator)
        progress = progress_bar(processes, epochs, f"network {k + 1}/{args.num_eval}")
        train_network(net, images, labels, generator, protocol, epochs, progress, args.precision, args.compile,
                      on_evaluation=lambda epoch: tests.record(epoch, accuracy()), soft_targets=soft)
        if progress is not None:
            progress.close()
        overall, per_class = tests.final or accuracy()
        mine.append(Trained(k, overall, per_class, tests.curve, time.perf_counter() - start))
        keep(mine[-1])
        print(f"network {k + 1}/{args.num_eval}: {args.split} accuracy {overall:.2f}%  "
              f"({mine[-1].seconds:.0f}s)", flush=True)
    return mine


def train_together(indices, net, accuracy, images, labels, args, network, protocol, epochs, device,
                   processes, keep) -> list[Trained]:
    """Networks `indices` trained as one stacked network, each with its own generator, then tested through
    the one `net` (so that a compiled test compiles once) and kept; each is credited an equal share of the
    time."""
    start = time.perf_counter()
    generators = [eval_generator(args, k, device) for k in indices]
    nets = [reset_parameters_(build_network(device=device, **network), g) for g in generators]
    tests = [Tests(epochs) for _ in indices]

    def test_each(epoch):
        for trained, network_tests in zip(nets, tests):
            net.load_state_dict(trained.state_dict())
            network_tests.record(epoch, accuracy())

    progress = progress_bar(processes, epochs, f"{len(indices)} networks together")
    train_networks_stacked(nets, images, labels, generators, protocol, epochs, args.precision, args.compile,
                           on_evaluation=test_each, progress=progress)
    if progress is not None:
        progress.close()
    seconds, mine = time.perf_counter() - start, []
    for k, trained, network_tests in zip(indices, nets, tests):
        net.load_state_dict(trained.state_dict())
        overall, per_class = network_tests.final or accuracy()
        mine.append(Trained(k, overall, per_class, network_tests.curve, seconds / len(indices)))
        keep(mine[-1])
        print(f"network {k + 1}/{args.num_eval}: {args.split} accuracy {overall:.2f}%  "
              f"({seconds:.0f}s for {len(indices)} networks trained together)", flush=True)
    return mine


def summarise(entries: list[Trained], data, args, epochs: int) -> dict:
    """results.json's numbers from the trained networks, in index order."""
    accs = [trained.accuracy for trained in entries]
    best = [max([accuracy for _, accuracy in trained.curve] or [trained.accuracy]) for trained in entries]
    per_class_mean = torch.stack([trained.per_class for trained in entries]).mean(0).tolist()
    groups = long_tail_groups(data.class_counts)
    result = {
        "acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)), "accs": accs,
        "best_acc_mean": float(np.mean(best)), "best_acc_std": float(np.std(best)), "best_accs": best,
        "best_note": "best over the protocol's evaluation epochs, as the published figures report it; "
                     "never used to choose anything",
        "evaluation_epochs": [epoch for epoch, _ in entries[0].curve],
        "per_class": per_class_mean, "split": args.split, "num_eval": args.num_eval, "epochs": epochs,
        "protocol": args.protocol, "protocol_settings": dataclasses.asdict(PROTOCOLS[args.protocol]),
        "model": args.model, "class_names": data.class_names, "class_counts": data.class_counts, "groups": groups,
    }
    for name, classes in groups.items():
        result[name] = float(np.mean([per_class_mean[c] for c in classes])) if classes else float("nan")
    return result


# ----------------------------------------------------------------------------------------
# The job

def check_options(args) -> None:
    check_positive({"--num-eval": args.num_eval, "--ipc": args.ipc, "--factor": args.factor}
                   | ({"--epochs": args.epochs} if args.epochs is not None else {}))
    if args.summary is not None and args.report is None:
        raise UsageError("--summary goes with --report DIR; add it, or drop --summary")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one of them")
    check_label_options(args)


def check_label_options(args) -> None:
    """The teacher's options go with --labels soft (and are then resolved to their defaults); T > 0."""
    given = [name for name in SOFT_OPTIONS + ("teacher_cache",) if getattr(args, name) is not None]
    if args.labels == "hard":
        if given:
            option = "--" + given[0].replace("_", "-")
            raise UsageError(f"{option} goes with --labels soft; add --labels soft, or drop {option}")
        return
    for name, value in SOFT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.teacher_epochs is None:
        args.teacher_epochs = POOL_SCHEDULES[TEACHER_SCHEDULE].epochs
    check_positive({"--temperature": args.temperature, "--teacher-epochs": args.teacher_epochs})


@dataclasses.dataclass
class Job:
    """One evaluation: the images the networks train on (normalised, decoded) and their labels, the data set
    they are tested on, build_network's arguments, a one-line description, the output folder, and what
    results.json records about the set (its factor, which sets the random ruler's number of images, and for
    --syn the SHA-256 of the bytes evaluated)."""
    images: torch.Tensor
    labels: torch.Tensor
    data: object
    network: dict
    what: str
    out: Path
    record: dict
    data_seed: int


def check_set_options(args, config: dict) -> None:
    """--syn evaluates a set on the data it was distilled from: a set option typed with another value than the
    set's would be ignored, so it is refused."""
    for name in args.set_options_given:
        value = getattr(args, name)
        if value != config.get(name):
            option = "--" + name.replace("_", "-")
            raise UsageError(f"{option} {value}: {args.syn} was distilled with {option} {config.get(name)}, and "
                             f"--syn evaluates it on the data it was distilled from; drop {option}")


def synthetic_job(args, log) -> Job:
    """The Job of --syn: the distilled set, tested on the data set it was distilled from (a set from elsewhere:
    own_set_job)."""
    synthetic = read_set(args.syn)
    if "config" not in synthetic:
        return own_set_job(args, synthetic, log)
    config = dict(synthetic["config"])
    config.setdefault("data_seed", config["seed"])  # sets from before --data-seed drew their subset from --seed
    check_set_options(args, config)
    for name in SET_OPTIONS:  # results.json records the set's values, not the baselines' defaults
        setattr(args, name, config.get(name, 1 if name == "factor" else getattr(args, name)))
    # the data the set was distilled from; only its location may be given anew
    data = load_long_tailed(config["dataset"], args.data_dir or config["data_dir"], config["imbalance_factor"],
                            config["data_seed"], config["val_per_class"], config["n_max"], config["image_size"],
                            log=log)
    check_matches(synthetic, data, args.syn)
    network = network_options(args, data, config)
    record = {"factor": config.get("factor", 1), "syn_sha256": synthetic["sha256"]}
    what = f"{config['method']}, IPC {config['ipc']} ({args.syn})"
    out = Path(args.out) if args.out else Path(args.syn).parent
    return Job(synthetic["images"].float(), synthetic["labels"].long(), data, network, what, out, record,
               config["data_seed"])


def own_set_job(args, own: dict, log) -> Job:
    """The Job of --syn with a tensor file or an image folder (synsets.py): tested on the data set the command
    line names, trained on by the field's ConvNet as the baselines are; its --ipc and --factor are only recorded
    (the images are trained on as they are), the factor as unknown unless typed."""
    data = load_long_tailed(args.dataset, args.data_dir, args.imbalance_factor, data_seed(args), args.val_per_class,
                            args.n_max, args.image_size, log=log)
    synthetic = fit_own_set(own, data, args.syn)
    record = {"factor": args.factor if "factor" in args.set_options_given else None,
              "syn_sha256": synthetic["sha256"]}
    what = f"{synthetic['format']} of {len(synthetic['labels'])} images ({args.syn})"
    out = Path(args.out) if args.out else Path(args.syn).parent
    return Job(synthetic["images"], synthetic["labels"], data, network_options(args, data, None), what, out, record,
               data_seed(args))


def baseline_job(args, log) -> Job:
    """The Job of --baseline random|full."""
    data = load_long_tailed(args.dataset, args.data_dir, args.imbalance_factor, data_seed(args), args.val_per_class,
                            args.n_max, args.image_size, log=log)
    if args.baseline == "random":
        check_factor(args.factor, data.image_size)
        packed, labels = initial_synthetic(data, args.ipc, args.seed, args.factor)
        images, labels = decode(packed, args.factor), labels.repeat_interleave(args.factor ** 2)
        what = (f"random, IPC {args.ipc}, factor {args.factor} ({args.ipc * args.factor ** 2} real images per "
                f"class as distill.py's starting set, {len(labels) // data.num_classes} decoded)")
    else:
        images, labels = data.normalise(data.train_images), data.train_labels
        what = f"full long-tailed set ({len(labels)} images)"
    out = Path(args.out) if args.out else Path("runs") / (
        f"baseline-{args.baseline}-{args.dataset}-if{args.imbalance_factor:g}"
        + (f"-ipc{args.ipc}-f{args.factor}" if args.baseline == "random" else ""))
    record = {"factor": args.factor if args.baseline == "random" else None}
    return Job(images, labels, data, network_options(args, data, None), what, out, record, data_seed(args))


def network_options(args, data, config: dict | None) -> dict:
    """build_network's arguments: the distilled ConvNet's shape for --model convnet (the field's ConvNet-3
    for baselines), the model's own defaults otherwise; --norm overrides the normalisation."""
    network = dict(model=args.model, channels=data.channels, num_classes=data.num_classes, image_size=data.image_size)
    if args.model == "convnet":
        config = config or {"width": 128, "depth": depth_for_size(data.image_size), "pooling": "avg",
                            "norm": "instance"}
        network.update(width=config["width"], depth=config["depth"], pooling=config["pooling"], norm=config["norm"])
    if args.norm:
        network["norm"] = args.norm
    return network


def job(args, holder) -> None:
    check_options(args)
    if args.export is not None:
        export_set(args.syn, args.export)
        return
    if args.report is not None:
        from report import main as report_main
        report_main([args.report] + (["--summary", args.summary] if args.summary else []))
        return
    processes, device = start_processes(args.device)
    holder[0] = processes
    args.precision = resolve_precision(args.precision, device, args.compile)
    log = (lambda message: print(message, flush=True)) if processes.main else (lambda message: None)
    run = processes.main_first(lambda: (synthetic_job if args.syn else baseline_job)(args, log))  # one download
    check_out(run.out, args)
    try:
        build_network(**run.network)
    except ValueError as error:
        raise UsageError(f"--model {args.model}: {error}")
    teacher = processes.main_first(lambda: job_teacher(args, run, device, log)) if args.labels == "soft" else None
    options = job_fingerprint(args, run, device, teacher[1] if teacher else None)
    kept = continued_networks(args, run.out, options, processes)
    if kept is None:
        log(f"--resume: {run.out} holds this evaluation, finished (results.json); nothing to do")
        return
    log(f"evaluate.py: {run.what}, {args.model}, {args.protocol} protocol, {args.labels} labels, {args.num_eval} "
        f"networks x {options['epochs']} epochs on {device} ({args.precision})"
        + (f", {processes.world} processes" if processes.world > 1 else "")
        + (f"; networks {', '.join(str(t.index + 1) for t, _ in kept)} taken from --resume" if kept else ""))
    train_and_write(args, run, device, processes, options, kept, teacher)


def job_fingerprint(args, run: Job, device, teacher: dict | None = None) -> dict:
    """The evaluation's fingerprint (evaluation_records.fingerprint) over the training images and labels and
    the tested split. A hard-label one is what it was before soft labels existed (so earlier evaluations
    resume); a soft-label one names the teacher (`teacher`: its record) by its cache file's digest (its data,
    loss, epochs, seed and precision) and by the SHA-256 of its weights, so that networks kept under one
    teacher are never continued under a teacher trained again elsewhere."""
    tensors = (run.images, run.labels, *test_split(run.data, args.split))
    epochs = args.epochs or PROTOCOLS[args.protocol].epochs
    if args.labels == "hard":
        return fingerprint(args, run.network, tensors, epochs, device, dropped=("labels",) + SOFT_OPTIONS)
    return fingerprint(args, run.network, tensors, epochs, device,
                       added={"teacher": Path(teacher["file"]).stem, "teacher_sha256": teacher["sha256"]})


def job_teacher(args, run: Job, device, log) -> tuple:
    """--labels soft: (the teacher's SoftTargets, its record for results.json), trained once and cached."""
    cache = Path(args.teacher_cache) if args.teacher_cache else cache_dir() / "teachers"
    net, record = load_or_train_teacher(cache, run.data, args.teacher_loss, args.teacher_epochs, run.data_seed,
                                        device, args.precision, args.compile, log)
    return soft_targets(net, args.temperature, args.precision, args.compile), record


def train_and_write(args, run: Job, device, processes: Processes, options: dict, kept: list,
                    teacher: tuple | None = None) -> None:
    """Train the networks not kept (on the teacher's soft labels where teacher = (SoftTargets, record)), each
    kept as it finishes, then write results.json (with every sitting) and remove the kept networks' folder."""
    folder = run.out / PARTIAL_EVALUATION
    sitting, start = this_sitting(device, processes), time.perf_counter()
    result = evaluate(run.images, run.labels, run.data, args, run.network, device, processes=processes,
                      done=tuple(trained for trained, _ in kept),
                      keep=lambda trained: keep_network(folder, trained, options, sitting),
                      soft=teacher[0] if teacher else None)
    if processes.main:
        seconds = time.perf_counter() - start
        trained_now = sorted(set(range(args.num_eval)) - {trained.index for trained, _ in kept})
        result.update(sittings=sittings(kept, trained_now, sitting, seconds), fingerprint=options,
                      labels=args.labels, data_seed=run.data_seed)
        if teacher:
            result.update(temperature=args.temperature, teacher=teacher[1])
        write_result(result | run.record, run.out, run.what, run.data, args, device, processes,
                     seconds + sum(trained.seconds for trained, _ in kept))
        shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> None:
    run_script(build_parser(), job, argv)


def write_result(result: dict, out: Path, what: str, data, args, device, processes, seconds: float) -> None:
    """Write results.json (seconds: of every sitting's networks), the per-class chart and the run README, and
    print the one-line summary."""
    result.update(evaluated=what, dataset=data.name, data_source=data.source, seconds=round(seconds, 1),
                  config={key: value for key, value in vars(args).items()},
                  environment=dict(environment(), device=str(device), processes=processes.world))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(result, indent=2) + "\n", out / "results.json")
    try:
        plot_per_class(result, out / "per_class.png")
    except ImportError:  # matplotlib missing: the picture is a convenience
        pass
    write_run_readme(out)
    best = (f"  (best of {len(result['evaluation_epochs'])} tests: {result['best_acc_mean']:.2f})"
            if len(result["evaluation_epochs"]) > 1 else "")
    labels = (f", soft labels T={args.temperature:g}, teacher {result['teacher']['test_acc']:.2f}"
              if args.labels == "soft" else "")
    print(f"{what}: {args.split} acc {result['acc_mean']:.2f} +- {result['acc_std']:.2f}{best}  "
          f"head {result['head']:.2f} medium {result['medium']:.2f} tail {result['tail']:.2f}  "
          f"({args.num_eval} x {result['epochs']} epochs, {args.protocol} protocol, {args.model}{labels}) "
          f"-> {out / 'results.json'}", flush=True)


if __name__ == "__main__":
    keep_freed_memory()  # this process is the script's own: glibc keeps freed memory for the next pass (runs.py)
    main()
