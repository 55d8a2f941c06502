"""Train fresh ConvNets on a synthetic set (or a baseline) and report their final-epoch test accuracy.

$ python evaluate.py --syn runs/csdm/synthetic.pt                        # 5 networks x 1000 epochs
$ python evaluate.py --syn runs/csdm/synthetic.pt --num-eval 2 --epochs 300 --device cpu
$ python evaluate.py --baseline random --dataset cifar10 --imbalance-factor 200 --ipc 10 --out runs/random
$ python evaluate.py --baseline full --dataset cifar10 --imbalance-factor 200 --epochs 200 --out runs/full
$ torchrun --nproc_per_node=5 evaluate.py --syn runs/csdm/synthetic.pt    # one network per process

The field's protocol (method.md section 6): a ConvNet trained from scratch with
SGD (lr 0.01, momentum 0.9, weight decay 5e-4), batch 256, lr x0.1 at half the
epochs, DSA on every batch; tested once, after the last epoch, on the balanced
test split (or, with --split val, on the validation split used to choose
hyperparameters). Nothing is chosen on the test set. The mean and std are over
--num-eval networks, each seeded from --seed and its index.

results.json: acc_mean, acc_std (percent), accs (one per network), per_class
(mean over networks, class order), head / medium / tail (mean accuracy of the
first, middle and last third of the classes in long-tail order: for 10 classes
3 / 4 / 3), and the configuration; per_class.png shows the per-class accuracy beside
the class counts, and the run folder's README.md is updated with the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_lt import UsageError, add_data_arguments, counter_seed, dsa_augment, dsa_uniforms_per_sample, load_long_tailed
from distill import (FORMAT_VERSION, Processes, environment, initial_synthetic, start_processes,
                     write_run_readme)
from networks import (NORMS, PRECISIONS, ConvNet, autocast, depth_for_size, in_micro_batches, micro_batch_size,
                      reset_parameters_, resolve_precision)

STREAM_EVAL = 21


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--syn", default=None, help="synthetic.pt written by distill.py")
    what.add_argument("--baseline", default=None, choices=("random", "full"),
                      help="random: --ipc real images per class of the long-tailed set; full: the whole set")
    what.add_argument("--report", default=None, metavar="DIR",
                      help="write DIR/table.md (and a plot) from the results.json files under DIR: "
                           "DIR/<dataset>/if<IF>/ipc<IPC>/<method>/ as a grid, else one row per subfolder")
    p.add_argument("--summary", default=None, metavar="JSON",
                   help="--report: also write {'<method>/if<IF>': {acc_mean, acc_std, num_eval, tail}} here "
                        "(one data set and IPC)")
    add_data_arguments(p)
    p.add_argument("--ipc", type=int, default=10, help="--baseline random: images per class")
    g = p.add_argument_group("training")
    g.add_argument("--num-eval", type=int, default=5, help="networks trained from scratch")
    g.add_argument("--epochs", type=int, default=1000, help="epochs per network (lr x0.1 at half)")
    g.add_argument("--batch-size", type=int, default=256, help="minibatch size")
    g.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    g.add_argument("--norm", default=None, choices=NORMS, help="ConvNet normalisation (default: the distilled one)")
    g.add_argument("--precision", default="auto", choices=("auto",) + PRECISIONS,
                   help="bf16: bfloat16 autocast; fp32: float32; auto: bf16 where it is fast (GPUs; CPUs with AMX "
                        "when --compile)")
    g.add_argument("--compile", action="store_true", help="torch.compile the network's training step")
    g.add_argument("--split", default="test", choices=("test", "val"),
                   help="where to measure: the test split, or the validation split (for choosing hyperparameters)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of the networks and batches (and of the data subset "
                                                       "for baselines)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--out", default=None, help="folder for results.json (default: next to --syn)")
    return p


# ----------------------------------------------------------------------------------------
# Training one network and testing it

def train_network(net: ConvNet, images: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int,
                  lr: float, generator: torch.Generator, progress=None, precision: str = "fp32",
                  compile: bool = False) -> ConvNet:
    """SGD with momentum 0.9 and weight decay 5e-4, lr x0.1 after half the epochs, DSA on every batch.
    The whole set stays on the device; batches are index slices of a seeded permutation.
    precision bf16 runs the network under bfloat16 autocast; compile=True compiles the forward and
    loss with torch.compile (DSA stays eager)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[epochs // 2], gamma=0.1)
    device = images.device
    has_batch_norm = any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())

    def summed_loss(x, y):
        with autocast(device, precision):
            logits = net(x)
        return F.cross_entropy(logits.float(), y, reduction="sum")

    summed_loss = torch.compile(summed_loss) if compile else summed_loss
    micro = micro_batch_size(device, images.shape[-1]) or batch_size
    net.train()
    n = len(labels)
    for _ in range(epochs):
        permutation = torch.randperm(n, generator=generator, device=device)
        for batch in permutation.split(batch_size):
            x = dsa_augment(images[batch], dsa_uniforms_per_sample(len(batch), generator, device))
            x = x.contiguous(memory_format=torch.channels_last)
            # the batch's mean loss, its forward in cache-sized micro-batches (same gradient: no batch norm
            # statistics cross them unless --norm batch, where micro-batching is skipped)
            parts = zip(x.split(micro), labels[batch].split(micro)) if not has_batch_norm else [(x, labels[batch])]
            loss = sum(summed_loss(xp, yp) for xp, yp in parts) / len(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
    return net


@torch.no_grad()
def per_class_accuracy(net: ConvNet, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       normalise, chunk: int = 1000, precision: str = "fp32", compile: bool = False) -> torch.Tensor:
    """Accuracy of each class in percent, (C,). images are uint8; normalise maps them to float."""
    net.eval()

    def predict(x):
        with autocast(x.device, precision):
            return net(x).argmax(1)

    predict = torch.compile(predict) if compile else predict
    micro = micro_batch_size(images.device, images.shape[-1])
    correct = torch.zeros(num_classes, dtype=torch.float64)
    for start in range(0, len(labels), chunk):
        x = normalise(images[start:start + chunk]).contiguous(memory_format=torch.channels_last)
        hit = (in_micro_batches(predict, x, micro) == labels[start:start + chunk]).double().cpu()
        correct += torch.bincount(labels[start:start + chunk].cpu(), weights=hit, minlength=num_classes)
    return 100 * correct / torch.bincount(labels.cpu(), minlength=num_classes).clamp_min(1)


def long_tail_groups(class_counts: list[int]) -> dict[str, list[int]]:
    """Classes in long-tail order (most images first) cut into head, medium and tail thirds:
    round(C/3) classes each for head and tail, the rest medium."""
    order = sorted(range(len(class_counts)), key=lambda c: (-class_counts[c], c))
    third = max(1, round(len(order) / 3))
    return {"head": order[:third], "medium": order[third:len(order) - third], "tail": order[len(order) - third:]}


def evaluate(images, labels, data, args, width, depth, norm, pooling, device, log=print,
             processes: Processes | None = None) -> dict | None:
    """Train args.num_eval networks on (images, labels) and test each after its last epoch.
    Under torchrun, network k is trained by process k % world; the main process returns the summary."""
    processes = processes or Processes()
    images, labels = images.to(device), labels.to(device)
    if args.split == "val":
        if len(data.val_labels) == 0:
            raise UsageError("--split val: this run has no validation split; distill with --val-per-class N "
                             "(or pass --val-per-class N with a baseline)")
        test_images, test_labels = data.val_images, data.val_labels
    else:
        test_images, test_labels = data.test_images, data.test_labels
    test_images, test_labels = test_images.to(device), test_labels.to(device)
    test_counts = torch.bincount(test_labels.cpu(), minlength=data.num_classes).double()
    mine = []
    # one network object, redrawn for each evaluation: torch.compile then compiles once per process
    net = ConvNet(data.channels, data.num_classes, width, depth, norm, pooling, data.image_size)
    net = net.to(device).to(memory_format=torch.channels_last)
    for k in range(processes.rank, args.num_eval, processes.world):
        start = time.perf_counter()
        generator = torch.Generator(device=device).manual_seed(counter_seed(args.seed, STREAM_EVAL, k))
        reset_parameters_(net, generator)
        progress = None
        if processes.main and sys.stderr.isatty():
            from tqdm import tqdm
            progress = tqdm(total=args.epochs, desc=f"network {k + 1}/{args.num_eval}", unit="epoch", leave=False)
        train_network(net, images, labels, args.epochs, args.batch_size, args.lr, generator, progress,
                      args.precision, args.compile)
        if progress is not None:
            progress.close()
        accuracy = per_class_accuracy(net, test_images, test_labels, data.num_classes, data.normalise,
                                      precision=args.precision, compile=args.compile)
        overall = float((accuracy * test_counts).sum() / test_counts.sum())
        mine.append((k, overall, accuracy))
        print(f"network {k + 1}/{args.num_eval}: {args.split} accuracy {overall:.2f}%  "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
    if processes.world > 1:
        parts = [None] * processes.world
        dist.all_gather_object(parts, mine)
        mine = [entry for part in parts for entry in part]
    if not processes.main:
        return None
    mine.sort(key=lambda entry: entry[0])
    accs = [overall for _, overall, _ in mine]
    per_class_mean = torch.stack([accuracy for _, _, accuracy in mine]).mean(0).tolist()
    groups = long_tail_groups(data.class_counts)
    result = {
        "acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)), "accs": accs,
        "per_class": per_class_mean, "split": args.split, "num_eval": args.num_eval, "epochs": args.epochs,
        "class_names": data.class_names, "class_counts": data.class_counts,
        "groups": groups,
    }
    for name, classes in groups.items():
        result[name] = float(np.mean([per_class_mean[c] for c in classes])) if classes else float("nan")
    return result


def plot_per_class(result: dict, path: Path) -> None:
    """Per-class accuracy as bars, the class's training count as a line on a log axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


# ----------------------------------------------------------------------------------------
# Reports: tables of many runs

# method.md section 7: CIFAR-10-LT, ConvNet-3, test accuracy % at IPC 10 / 20 / 50 (the long-tailed
# distillation paper, CVPR 2025; best-epoch accuracy, as those codebases report it)
PUBLISHED_CIFAR10_LT = {
    "random (published)": {10: (32.5, 39.6, 51.9), 50: (33.2, 42.0, 51.6), 100: (34.4, 41.4, 52.6),
                           200: (32.5, 42.2, 49.9)},
    "IDM (published)": {10: (54.8, 57.1, 60.1), 50: (51.9, 53.3, 56.1), 100: (49.8, 50.9, 53.1),
                        200: (47.0, 48.1, 49.9)},
    "DATM (published)": {10: (57.2, 60.4, 66.7), 50: (41.6, 43.4, 50.3), 100: (37.3, 38.9, 44.3),
                         200: (None, 34.8, 40.1)},
    "LAD (published)": {10: (58.1, 63.0, 70.5), 50: (54.2, 59.4, 65.8), 100: (53.4, 58.2, 64.0),
                        200: (52.2, 56.6, 62.3)},
    "full LT set (published)": {10: (76.7,) * 3, 50: (69.8,) * 3, 100: (66.2,) * 3, 200: (62.1,) * 3},
}
PUBLISHED_IPCS = (10, 20, 50)
METHOD_ORDER = ("random", "dm", "mmd", "ncfm", "sdm", "csdm", "full")


def collect_grid(root: Path) -> list[dict]:
    """results.json files at root/<dataset>/if<IF>/ipc<IPC>/<method>/, as flat records."""
    records = []
    for path in sorted(root.glob("*/if*/ipc*/*/results.json")):
        method, ipc, imbalance, dataset = path.parts[-2], path.parts[-3], path.parts[-4], path.parts[-5]
        result = json.loads(path.read_text())
        records.append(dict(dataset=dataset, imbalance=float(imbalance[2:]), ipc=int(ipc[3:]), method=method,
                            **{k: result[k] for k in ("acc_mean", "acc_std", "num_eval", "epochs", "head", "tail",
                                                      "split")}))
    return records


def _cell(record) -> str:
    return f"{record['acc_mean']:.1f} ± {record['acc_std']:.1f}" if record else "-"


def write_report(root: Path, summary: Path | None = None) -> Path:
    """root/table.md (and root/accuracy_vs_if.png) from the runs under root."""
    records = collect_grid(root)
    lines = [f"# Results under {root}", ""]
    if records:
        for dataset in sorted({r["dataset"] for r in records}):
            rows = [r for r in records if r["dataset"] == dataset]
            ifs = sorted({r["imbalance"] for r in rows})
            ipcs = sorted({r["ipc"] for r in rows})
            methods = sorted({r["method"] for r in rows}, key=lambda m: (METHOD_ORDER + (m,)).index(m))
            first = rows[0]
            lines += [f"## {dataset}-LT, {first['split']} accuracy (%), final epoch, mean ± std over networks; "
                      f"cells: IPC {' / '.join(map(str, ipcs))}", "",
                      "| method | " + " | ".join(f"IF {i:g}" for i in ifs) + " |",
                      "|---|" + "---|" * len(ifs)]
            for method in methods:
                cells = []
                for imbalance in ifs:
                    found = {r["ipc"]: r for r in rows if r["method"] == method and r["imbalance"] == imbalance}
                    cells.append(" / ".join(_cell(found.get(ipc)) for ipc in ipcs))
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            if dataset == "cifar10":
                lines += ["", "Published, for reference (method.md section 7; best epoch over training, not "
                          "final epoch; other pipelines):", "",
                          "| method | " + " | ".join(f"IF {i:g}" for i in ifs) + " |", "|---|" + "---|" * len(ifs)]
                for name, table in PUBLISHED_CIFAR10_LT.items():
                    cells = []
                    for imbalance in ifs:
                        values = table.get(int(imbalance))
                        cells.append(" / ".join("-" if values is None or values[PUBLISHED_IPCS.index(ipc)] is None
                                                else f"{values[PUBLISHED_IPCS.index(ipc)]:.1f}"
                                                for ipc in ipcs if ipc in PUBLISHED_IPCS) or "-")
                    lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
            lines += ["Tail third of the classes (%): " + "; ".join(
                f"{r['method']} IF {r['imbalance']:g} IPC {r['ipc']} {r['tail']:.1f}" for r in rows), ""]
        lines.append(f"Networks per cell: {sorted({r['num_eval'] for r in records})}, "
                     f"epochs: {sorted({r['epochs'] for r in records})}.")
        try:
            plot_accuracy_vs_if(records, root / "accuracy_vs_if.png")
            lines += ["", "![accuracy against imbalance factor](accuracy_vs_if.png)"]
        except ImportError:
            pass
    else:  # one row per subfolder: ablations
        lines += ["| run | evaluated | accuracy | head | medium | tail | networks x epochs |",
                  "|---|---|---|---|---|---|---|"]
        for path in sorted(root.glob("*/results.json")):
            r = json.loads(path.read_text())
            lines.append(f"| {path.parent.name} | {r.get('evaluated', '')} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} "
                         f"| {r['head']:.1f} | {r['medium']:.1f} | {r['tail']:.1f} | {r['num_eval']} x {r['epochs']} |")
            records.append(r)
        lines += ["", f"Accuracy on the {records[0]['split'] if records else '?'} split, final epoch."]
    table = root / "table.md"
    table.write_text("\n".join(lines) + "\n")
    if summary is not None:
        grid = collect_grid(root)
        if len({(r["dataset"], r["ipc"]) for r in grid}) != 1:
            raise UsageError(f"--summary needs runs of one data set and one IPC under {root}")
        summary.write_text(json.dumps({f"{r['method']}/if{r['imbalance']:g}": {
            "acc_mean": r["acc_mean"], "acc_std": r["acc_std"], "num_eval": r["num_eval"], "tail": r["tail"]}
            for r in grid}, indent=2) + "\n")
    return table


def plot_accuracy_vs_if(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(r["dataset"], r["ipc"]) for r in records})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for axis, (dataset, ipc) in zip(axes[0], panels):
        rows = [r for r in records if r["dataset"] == dataset and r["ipc"] == ipc]
        for method in sorted({r["method"] for r in rows}, key=lambda m: (METHOD_ORDER + (m,)).index(m)):
            points = sorted((r["imbalance"], r["acc_mean"], r["acc_std"]) for r in rows if r["method"] == method)
            axis.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                          marker="o", capsize=3, label=method)
        axis.set_xscale("log")
        axis.set_xlabel("imbalance factor")
        axis.set_ylabel("accuracy (%)")
        axis.set_title(f"{dataset}-LT, IPC {ipc}")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# What is evaluated: a synthetic file, or a baseline built from the data

def load_synthetic(path: str) -> dict:
    """Read a synthetic set safely (weights_only) and check its keys and format version."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--syn: {path} does not exist; give the synthetic.pt written by distill.py")
    try:
        synthetic = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"--syn: {path} is not a readable synthetic set ({type(error).__name__}); "
                         f"give the synthetic.pt written by distill.py")
    missing = {"images", "labels", "class_names", "config"} - set(synthetic if isinstance(synthetic, dict) else {})
    if missing:
        raise UsageError(f"--syn: {path} lacks {sorted(missing)}; give the synthetic.pt written by distill.py")
    version = synthetic["config"].get("format_version")
    if version != FORMAT_VERSION:
        raise UsageError(f"--syn: {path} has format version {version}, this code reads {FORMAT_VERSION}; "
                         f"distill it again with this version")
    return synthetic


def check_matches(synthetic: dict, data, path: str) -> None:
    """The synthetic images must fit the data set the networks are tested on."""
    images, labels = synthetic["images"], synthetic["labels"]
    have = (images.shape[1], images.shape[2], images.shape[3], len(synthetic["class_names"]))
    want = (data.channels, data.image_size, data.image_size, data.num_classes)
    if images.dim() != 4 or have != want:
        raise UsageError(f"--syn: {path} holds {have[0]} x {have[1]} x {have[2]} images of {have[3]} classes, but "
                         f"{data.name} has {want[0]} x {want[1]} x {want[2]} images of {want[3]} classes; "
                         f"evaluate it with the data set it was distilled from")
    if len(labels) != len(images) or labels.min() < 0 or labels.max() >= data.num_classes:
        raise UsageError(f"--syn: {path} has labels outside 0..{data.num_classes - 1} or a label count that "
                         f"differs from its image count; distill it again")


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    processes, clean = Processes(), False
    try:
        for option, value in {"--num-eval": args.num_eval, "--epochs": args.epochs,
                              "--batch-size": args.batch_size, "--ipc": args.ipc}.items():
            if value < 1:
                raise UsageError(f"{option} must be >= 1 (got {value})")
        if not args.lr > 0:
            raise UsageError(f"--lr must be > 0 (got {args.lr})")
        if args.report is not None:
            root = Path(args.report)
            if not root.is_dir():
                raise UsageError(f"--report: {root} is not a folder of runs")
            print(f"wrote {write_report(root, Path(args.summary) if args.summary else None)}")
            return
        processes, device = start_processes(args.device)
        args.precision = resolve_precision(args.precision, device, args.compile)
        log = (lambda message: print(message, flush=True)) if processes.main else (lambda message: None)
        if args.syn is not None:
            synthetic = load_synthetic(args.syn)
            config = synthetic["config"]
            # the data the set was distilled from; only its location may be given anew
            data = load_long_tailed(config["dataset"], args.data_dir or config["data_dir"],
                                    config["imbalance_factor"], config["seed"], config["val_per_class"],
                                    config["n_max"], config["image_size"], log=log)
            check_matches(synthetic, data, args.syn)
            images, labels = synthetic["images"].float(), synthetic["labels"].long()
            width, depth, pooling = config["width"], config["depth"], config["pooling"]
            norm = args.norm or config["norm"]
            what = f"{config['method']}, IPC {config['ipc']} ({args.syn})"
            out = Path(args.out) if args.out else Path(args.syn).parent
        else:
            data = load_long_tailed(args.dataset, args.data_dir, args.imbalance_factor, args.seed,
                                    args.val_per_class, args.n_max, args.image_size, log=log)
            if args.baseline == "random":
                images, labels = initial_synthetic(data, args.ipc, args.seed)
                what = f"random, IPC {args.ipc}"
            else:
                images, labels = data.normalise(data.train_images), data.train_labels
                what = f"full long-tailed set ({len(labels)} images)"
            width, depth, pooling = 128, depth_for_size(data.image_size), "avg"
            norm = args.norm or "instance"
            out = Path(args.out) if args.out else Path("runs") / f"baseline-{args.baseline}"
        log(f"evaluate.py: {what}, {args.num_eval} networks x {args.epochs} epochs on {device} ({args.precision})"
            + (f", {processes.world} processes" if processes.world > 1 else ""))
        start = time.perf_counter()
        result = evaluate(images, labels, data, args, width, depth, norm, pooling, device, log=log,
                          processes=processes)
        if processes.main:
            write_result(result, out, what, data, args, device, processes, start)
        clean = True
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        processes.finish(clean)


def write_result(result: dict, out: Path, what: str, data, args, device, processes, start: float) -> None:
    """Write results.json, the per-class chart and the run README, and print the one-line summary."""
    result.update(evaluated=what, dataset=data.name, seconds=round(time.perf_counter() - start, 1),
                  config={key: value for key, value in vars(args).items()},
                  environment=dict(environment(), device=str(device), processes=processes.world))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot_per_class(result, out / "per_class.png")
    except ImportError:  # matplotlib missing: the picture is a convenience
        pass
    write_run_readme(out)
    print(f"{what}: {args.split} acc {result['acc_mean']:.2f} +- {result['acc_std']:.2f}  "
          f"head {result['head']:.2f} medium {result['medium']:.2f} tail {result['tail']:.2f}  "
          f"({args.num_eval} x {args.epochs} epochs) -> {out / 'results.json'}", flush=True)


if __name__ == "__main__":
    main()
