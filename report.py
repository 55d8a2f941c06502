"""Tables and plots of many runs: `python report.py DIR` (or `evaluate.py --report DIR`).

DIR/<dataset>/if<IF>/ipc<IPC>/<method>/results.json files become a grid, one table per data set,
cells IPC by IPC, with the published figures of the long-tailed distillation paper beside CIFAR-10-LT
and each method's improvement over the random baseline of the same cell (the field's "over random":
accuracy minus the random real images' accuracy, same protocol, same architecture, same number of
training images). Any other DIR/<run>/results.json files become one row per run (ablations).

`python report.py --sets results/sets` writes the released sets' catalogue (release.py), with or without DIRs:
results/sets/README.md, a row per set with its accuracy under each protocol (from the results.json files that
evaluated it), size and SHA-256, how to load one, and a picture of each (results/sets/<name>.png).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from data_lt import UsageError, data_source
from methods import METHODS
from provenance import distilled_where, evaluated_where, provenance
from release import catalogue
from runs import OneLineParser, pyplot

# CIFAR-10-LT, ConvNet-3, test accuracy % at IPC 10 / 20 / 50, as published in the long-tailed dataset
# distillation paper (Zhao et al., "Distilling Long-tailed Datasets", CVPR 2025, LAD; its Table 1): best-epoch
# accuracy, each method's own evaluation pipeline (see docs/method.md, "Published figures")
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
METHOD_ORDER = tuple(METHODS)  # methods.py's order


def label(method: str) -> str:
    """A row's name in tables and legends: the registered label where the method's name could mislead (the
    ncfm loss in DM's pipeline is not NCFM), else the run folder's name."""
    registered = METHODS.get(method)
    return (registered.label if registered is not None else None) or method


def collect_grid(root: Path) -> list[dict]:
    """results.json files at root/<dataset>/if<IF>/ipc<IPC>/<method>/, as flat records (protocol and model
    default to dm and convnet for files written before those options existed)."""
    records = []
    for path in sorted(root.glob("*/if*/ipc*/*/results.json")):
        method, ipc, imbalance, dataset = path.parts[-2], path.parts[-3], path.parts[-4], path.parts[-5]
        result = json.loads(path.read_text())
        records.append(dict(dataset=dataset, imbalance=float(imbalance[2:]), ipc=int(ipc[3:]), method=method,
                            protocol=result.get("protocol", "dm"), model=result.get("model", "convnet"),
                            labels=labels_of(result), teacher=result.get("teacher"),
                            teacher_file=Path((result.get("teacher") or {}).get("file", "")).name,
                            factor=recorded_factor(result), path=str(path), data=recorded_data(result, path),
                            **{k: result[k] for k in ("acc_mean", "acc_std", "num_eval", "epochs", "head", "tail",
                                                      "split")}))
    return records


def labels_of(result: dict) -> str:
    """What a run trained on: "hard" (the set's labels; every record before soft labels), or "soft (T=<T>,
    <loss> teacher)" for evaluate.py --labels soft."""
    if result.get("labels", "hard") == "hard":
        return "hard"
    return f"soft (T={result['temperature']:g}, {result['teacher']['loss']} teacher)"


def recorded_factor(result: dict) -> int | None:
    """The multi-formation factor of the images a results.json trained on: its `factor`, or for a random
    baseline written before that key existed, the --factor of its command; None where unknown."""
    if "factor" in result:
        return result["factor"]
    config = result.get("config") or {}
    return config.get("factor") if config.get("baseline") == "random" else None


def recorded_data(result: dict, path: Path) -> str:
    """Where a run's images came from: its `data_source`, or for a results.json written before that key
    existed, what data_lt.data_source says of the --data-dir of its command or of the set it evaluated
    (config.json beside the set), where that folder is on this machine."""
    if "data_source" in result:
        return result["data_source"]
    config = result.get("config") or {}
    data_dir = config.get("data_dir")
    sets = [path.parent / "config.json"] + ([Path(config["syn"]).parent / "config.json"] if config.get("syn") else [])
    for set_config in sets if data_dir is None else []:
        try:
            data_dir = json.loads(set_config.read_text()).get("data_dir")
            break
        except (OSError, ValueError, AttributeError):  # missing or unreadable: try the next
            continue
    if data_dir is None:
        return "not recorded (torchvision's download, or an older record)"
    if not Path(data_dir).exists():
        return f"--data-dir {data_dir} (not on this machine, so of unknown kind)"
    return data_source(str(result.get("dataset", "")).split("-LT")[0], data_dir)


def is_baseline(method: str) -> bool:
    return method.startswith(("random", "full"))  # random-f1 and the like are rulers too


def over_random(record: dict, records: list[dict]) -> float | None:
    """The field's improvement over random: accuracy minus that of the random baseline of the same cell
    (data set, IF, IPC), protocol, model, split, epochs and labels (soft: the same teacher and temperature), at
    the same factor (the same number of training images). Any random* run is a ruler (random-f1: factor 1); a baseline that does not record its factor
    counts only as the plain `random` one. None for a baseline itself and where that ruler is missing."""
    if is_baseline(record["method"]):
        return None
    same = ("dataset", "imbalance", "ipc", "protocol", "model", "split", "epochs", "labels", "teacher_file")
    rulers = [other for other in records if other["method"].startswith("random")
              and all(other[key] == record[key] for key in same)]
    exact = [other for other in rulers if record["factor"] is not None and other["factor"] == record["factor"]]
    loose = [other for other in rulers if other["method"] == "random" and None in (record["factor"], other["factor"])]
    ruler = (exact or loose or [None])[0]
    return None if ruler is None else record["acc_mean"] - ruler["acc_mean"]


def usual_budget(records: list[dict]) -> tuple[int, int]:
    """The (networks, epochs) a table's distilled sets were evaluated with most often (all its cells where it
    holds only baselines, whose copies per IPC would otherwise outvote them); on a tie the most epochs, then
    the most networks."""
    budgets = [(r["num_eval"], r["epochs"]) for r in records if not is_baseline(r["method"])] or \
              [(r["num_eval"], r["epochs"]) for r in records]
    return max(set(budgets), key=lambda budget: (budgets.count(budget), budget[1], budget[0]))


def budget_note(record: dict, records: list[dict]) -> str:
    """" [<networks> x <epochs> epochs]" where a cell was evaluated otherwise than its table's usual budget."""
    budget = (record["num_eval"], record["epochs"])
    return "" if budget == usual_budget(records) else f" [{budget[0]} x {budget[1]} epochs]"


def _cell(record, records) -> str:
    """mean ± std, the gain over random in brackets, the evaluation budget in square brackets where it is
    not the table's."""
    if not record:
        return "-"
    gain = over_random(record, records)
    return (f"{record['acc_mean']:.1f} ± {record['acc_std']:.1f}" + (f" ({gain:+.1f})" if gain is not None else "")
            + budget_note(record, records))


def _ordered_methods(rows: list[dict]) -> list[str]:
    known = {name: k for k, name in enumerate(METHOD_ORDER)}  # then variants by name: dm-f1, random-f1, ...
    return sorted({r["method"] for r in rows}, key=lambda m: (known.get(m, len(known)), m))


def grid_table(rows: list[dict]) -> list[str]:
    """One data set's runs as a markdown table: a row per method, a column per IF, IPCs within a cell."""
    ifs, ipcs = sorted({r["imbalance"] for r in rows}), sorted({r["ipc"] for r in rows})
    lines = ["| method | " + " | ".join(f"IF {i:g}" for i in ifs) + " |", "|---|" + "---|" * len(ifs)]
    for method in _ordered_methods(rows):
        cells = []
        for imbalance in ifs:
            found = {r["ipc"]: r for r in rows if r["method"] == method and r["imbalance"] == imbalance}
            cells.append(" / ".join(_cell(found.get(ipc), rows) for ipc in ipcs))
        lines.append(f"| {label(method)} | " + " | ".join(cells) + " |")
    return lines + teacher_row(rows, ifs)


def teacher_row(rows: list[dict], ifs: list[float]) -> list[str]:
    """Soft labels' ceiling: the teacher's test accuracy (tail third in brackets) per IF, where runs used one."""
    teachers = {r["imbalance"]: r["teacher"] for r in rows if r.get("teacher")}
    if not teachers:
        return []
    cells = [f"{teachers[i]['test_acc']:.1f} (tail {teachers[i]['tail']:.1f})" if i in teachers else "-" for i in ifs]
    return ["| teacher (the soft labels' source, trained on the whole long-tailed split; test) | "
            + " | ".join(cells) + " |"]


def published_table(ifs: list[float], ipcs: list[int]) -> list[str]:
    """The published CIFAR-10-LT figures at the IFs and IPCs of the grid."""
    lines = ["Published, for reference (LAD, CVPR 2025, Table 1; best epoch over training, not final epoch; "
             "other pipelines):", "",
             "| method | " + " | ".join(f"IF {i:g}" for i in ifs) + " |", "|---|" + "---|" * len(ifs)]
    for name, table in PUBLISHED_CIFAR10_LT.items():
        cells = []
        for imbalance in ifs:
            values = table.get(int(imbalance))
            cells.append(" / ".join("-" if values is None or values[PUBLISHED_IPCS.index(ipc)] is None
                                    else f"{values[PUBLISHED_IPCS.index(ipc)]:.1f}"
                                    for ipc in ipcs if ipc in PUBLISHED_IPCS) or "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def grid_report(records: list[dict], table: Path) -> list[str]:
    """Markdown for a grid of runs: per data set and protocol, the table, the published figures, the tails;
    the plot goes beside the table, named after it."""
    lines = []
    tables = sorted({(r["dataset"], r["protocol"], r["model"], r["labels"]) for r in records})
    for dataset, protocol, model, labels in tables:
        rows = [r for r in records if (r["dataset"], r["protocol"], r["model"], r["labels"]) ==
                (dataset, protocol, model, labels)]
        ipcs = sorted({r["ipc"] for r in rows})
        brackets = ("in brackets: minus the random baseline of the same cell; "
                    if any(over_random(r, rows) is not None for r in rows) else "")
        networks, epochs = usual_budget(rows)
        soft = "" if labels == "hard" else f", {labels} labels"
        lines += [f"## {dataset}-LT, {protocol} protocol, {model}{soft}: {rows[0]['split']} accuracy (%), final epoch, "
                  f"mean ± std over {networks} networks x {epochs} epochs, or those in square brackets; "
                  f"{brackets}cells: IPC {' / '.join(map(str, ipcs))}", ""]
        lines += grid_table(rows) + [""]
        if dataset == "cifar10" and model == "convnet":  # the published figures are ConvNet-3's
            lines += published_table(sorted({r["imbalance"] for r in rows}), ipcs) + [""]
        lines += ["Data: " + "; ".join(sorted({r["data"] for r in rows})) + ".", ""]
        lines += ["Tail third of the classes (%): " + "; ".join(
            f"{r['method']} IF {r['imbalance']:g} IPC {r['ipc']} {r['tail']:.1f}" for r in rows), ""]
    lines.append(f"Networks per cell: {sorted({r['num_eval'] for r in records})}, "
                 f"epochs: {sorted({r['epochs'] for r in records})}.")
    lines += ["", "How each cell came about:", ""] + [
        f"- {r['dataset']} {r['method']}, IF {r['imbalance']:g}, IPC {r['ipc']}, {r['protocol']} protocol, "
        f"{r['model']}, {r['split']} split: "
        f"{provenance(Path(r['path']))}" for r in records]
    try:
        picture = "accuracy_vs_if.png" if table.name == "table.md" else f"{table.stem}_accuracy_vs_if.png"
        plot_accuracy_vs_if(records, table.parent / picture)
        lines += ["", f"![accuracy against imbalance factor]({picture})"]
    except ImportError:
        pass
    return lines


def runs_report(root: Path) -> list[str]:
    """Markdown for an ablation folder: one row per root/<run>/results.json."""
    lines = ["| run | evaluated | accuracy | head | medium | tail | networks x epochs |",
             "|---|---|---|---|---|---|---|"]
    split, data = "?", set()
    for path in sorted(root.glob("*/results.json")):
        r = json.loads(path.read_text())
        split = r["split"]
        data.add(recorded_data(r, path))
        labels = labels_of(r)
        evaluated = r.get("evaluated", "") + ("" if labels == "hard" else
                                              f"; {labels}, teacher test acc {r['teacher']['test_acc']:.1f}")
        lines.append(f"| {path.parent.name} | {evaluated} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} "
                     f"| {r['head']:.1f} | {r['medium']:.1f} | {r['tail']:.1f} | {r['num_eval']} x {r['epochs']} |")
    return lines + ["", f"Accuracy on the {split} split, final epoch. Data: {'; '.join(sorted(data))}.", "",
                    "How each run came about:", ""] + [
        f"- {path.parent.name}: {provenance(path)}" for path in sorted(root.glob("*/results.json"))]


def write_summary(records: list[dict], root: Path, summary: Path) -> None:
    """{'<method>/if<IF>': {acc_mean, acc_std, num_eval, tail, over_random}} for one data set and IPC."""
    if len({(r["dataset"], r["ipc"]) for r in records}) != 1:
        raise UsageError(f"--summary needs runs of one data set and one IPC under {root}")
    summary.write_text(json.dumps({f"{r['method']}/if{r['imbalance']:g}": {
        "acc_mean": r["acc_mean"], "acc_std": r["acc_std"], "num_eval": r["num_eval"], "tail": r["tail"],
        "over_random": over_random(r, records)} for r in records}, indent=2) + "\n")


def write_report(root: Path, summary: Path | None = None, more_roots: tuple = (), table: Path | None = None) -> Path:
    """table (default root/table.md, and accuracy_vs_if.png beside it) from the runs under root and more_roots:
    their grids pooled (one table per data set, protocol and model), else root's runs one row each."""
    records = [record for folder in (root, *more_roots) for record in collect_grid(Path(folder))]
    check_one_run_per_cell(records)
    table = table or root / "table.md"
    body = grid_report(records, table) if records else runs_report(root)
    roots = ", ".join(str(folder) for folder in (root, *more_roots))
    table.write_text("\n".join([f"# Results under {roots}", ""] + body) + "\n")
    if summary is not None:
        write_summary(records, root, summary)
    return table


def check_one_run_per_cell(records: list[dict]) -> None:
    """Pooled folders must not hold the same cell twice (two seeds of one method, say): a table has one
    place for it."""
    seen = {}
    for record in records:
        key = tuple(record[k] for k in ("dataset", "imbalance", "ipc", "method", "protocol", "model", "split",
                                        "labels"))
        if key in seen:
            raise UsageError(f"{seen[key]} and {record['path']} are the same cell of one table; report the folders "
                             f"apart, or rename one method folder")
        seen[key] = record["path"]


def plot_accuracy_vs_if(records: list[dict], path: Path) -> None:
    plt = pyplot()
    panels = sorted({(r["dataset"], r["ipc"], r["protocol"], r["model"], r["labels"]) for r in records})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        rows = [r for r in records if (r["dataset"], r["ipc"], r["protocol"], r["model"], r["labels"]) == panel]
        for method in _ordered_methods(rows):
            runs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["imbalance"])
            notes = sorted({budget_note(r, rows) for r in runs})
            axis.errorbar([r["imbalance"] for r in runs], [r["acc_mean"] for r in runs],
                          yerr=[r["acc_std"] for r in runs], marker="o", capsize=3,
                          label=label(method) + "".join(notes))
        axis.set_xscale("log")
        axis.set_xlabel("imbalance factor")
        axis.set_ylabel("accuracy (%)")
        soft = "" if panel[4] == "hard" else f",\n{panel[4]} labels"
        axis.set_title(f"{panel[0]}-LT, IPC {panel[1]}, {panel[2]} protocol, {panel[3]}{soft}", fontsize=9)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = OneLineParser(prog="report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="*", help="folders of runs; several grids are pooled into one report")
    parser.add_argument("--table", default=None, help="where the markdown goes (default: the first folder's table.md)")
    parser.add_argument("--summary", default=None, metavar="JSON",
                        help="also write {'<method>/if<IF>': {acc_mean, acc_std, num_eval, tail, over_random}} "
                             "here (one data set and IPC)")
    parser.add_argument("--sets", default=None, metavar="DIR",
                        help="write DIR/README.md, the catalogue of the released sets DIR/*.pt (and of the run "
                             "folders' sets under DIR/.. not among them), and a picture of each, DIR/<name>.png; "
                             "accuracies from the results.json files under DIR/.. that evaluated them")
    args = parser.parse_args(argv)
    if not args.roots and args.sets is None:
        parser.error("give folders of runs, or --sets DIR")
    try:
        if args.sets is not None:
            if not Path(args.sets).is_dir():
                raise UsageError(f"--sets {args.sets} is not a folder; give the folder of the released sets")
            print(f"wrote {catalogue(Path(args.sets))}")
        for root in args.roots:
            if not Path(root).is_dir():
                raise UsageError(f"{root} is not a folder of runs; give folders that hold runs")
        roots = [Path(root) for root in args.roots]
        if not roots:
            return
        table = write_report(roots[0], Path(args.summary) if args.summary else None, tuple(roots[1:]),
                             Path(args.table) if args.table else None)
        print(f"wrote {table}")
    except UsageError as error:
        print(f"report.py: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
