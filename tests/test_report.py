"""report.py (evaluate.py --report): the grid table, the published numbers beside ours, the CPU-benchmark summary."""
import json

import pytest

import report
from data_lt import UsageError


def fake_result(acc, tail=30.0, split="test"):
    return {"acc_mean": acc, "acc_std": 0.5, "num_eval": 3, "epochs": 300, "head": acc + 5, "medium": acc,
            "tail": tail, "split": split, "accs": [acc] * 3}


def test_grid_report_and_summary(tmp_path):
    accs = {("dm", 10): 50.0, ("dm", 200): 40.0, ("csdm", 10): 51.0, ("csdm", 200): 43.5, ("random", 10): 30.0,
            ("random", 200): 28.0}
    for (method, imbalance), acc in accs.items():
        folder = tmp_path / "cifar10" / f"if{imbalance}" / "ipc10" / method
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(fake_result(acc, tail=acc - 3)))
    table = report.write_report(tmp_path, tmp_path / "summary.json").read_text()
    assert "| method | IF 10 | IF 200 |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    ours = [row.split(" | ")[0].strip("| ") for row in rows[1:4]]
    assert ours == ["random", "dm", "csdm"]  # the field's order, whatever the folders' order
    # each cell beside its improvement over the random baseline of the same cell: 51 - 30, 43.5 - 28
    assert "| csdm | 51.0 ± 0.5 (+21.0) | 43.5 ± 0.5 (+15.5) |" in table
    assert "| random | 30.0 ± 0.5 | 28.0 ± 0.5 |" in table
    assert "in brackets: minus the random baseline of the same cell" in table
    assert "| LAD (published) | 58.1 | 52.2 |" in table  # published numbers beside ours, labelled
    assert (tmp_path / "accuracy_vs_if.png").stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"dm/if10", "dm/if200", "csdm/if10", "csdm/if200", "random/if10", "random/if200"}
    assert summary["csdm/if200"] == {"acc_mean": 43.5, "acc_std": 0.5, "num_eval": 3, "tail": 40.5,
                                     "over_random": 15.5}
    assert summary["random/if200"]["over_random"] is None


def test_no_brackets_announced_before_a_ruler_exists(tmp_path):
    """A grid whose random baseline has not run yet shows no differences and says of none."""
    folder = tmp_path / "cifar10" / "if200" / "ipc10" / "csdm"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(fake_result(52.9)))
    table = report.write_report(tmp_path).read_text()
    assert "| csdm | 52.9 ± 0.5 |" in table and "in brackets" not in table


def test_improvement_over_random_needs_the_same_protocol_and_model(tmp_path):
    """A random baseline measured under another protocol or architecture is not the ruler of a cell."""
    runs = {"dm": dict(fake_result(45.0), protocol="ncfm"), "random": dict(fake_result(30.0), protocol="dm"),
            "csdm": dict(fake_result(47.0), protocol="dm", model="resnet18")}
    for method, result in runs.items():
        folder = tmp_path / "cifar10" / "if200" / "ipc10" / method
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(result))
    records = report.collect_grid(tmp_path)
    assert [report.over_random(r, records) for r in records if r["method"] != "random"] == [None, None]
    assert report.over_random([r for r in records if r["method"] == "random"][0], records) is None  # a ruler
    random_dm = [r for r in records if r["method"] == "random"][0]
    assert report.over_random(dict(random_dm, method="x", acc_mean=31.5), records) == 1.5


def test_improvement_over_random_needs_the_same_epochs(tmp_path):
    """A random baseline trained for another number of epochs (a quick run's, say) is not the ruler."""
    for method, result in {"random": dict(fake_result(30.0), epochs=300),
                           "csdm": dict(fake_result(47.0), epochs=1000)}.items():
        folder = tmp_path / "cifar10" / "if200" / "ipc10" / method
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(result))
    records = report.collect_grid(tmp_path)
    csdm = [r for r in records if r["method"] == "csdm"][0]
    assert report.over_random(csdm, records) is None
    assert report.over_random(dict(csdm, epochs=300), records) == 17.0


def test_a_cell_evaluated_with_another_budget_says_so(tmp_path):
    """The full long-tailed set trains 5 x 200 epochs beside distilled sets' 5 x 1000: its cell names its budget,
    the others do not, and the heading names the usual one."""
    budgets = {"random": (5, 1000), "csdm": (5, 1000), "dm": (5, 1000), "full": (5, 200)}
    for method, (networks, epochs) in budgets.items():
        folder = tmp_path / "cifar10" / "if200" / "ipc10" / method
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(dict(fake_result(50.0), num_eval=networks, epochs=epochs)))
    table = report.write_report(tmp_path, None).read_text()
    assert "| full | 50.0 ± 0.5 [5 x 200 epochs] |" in table
    assert "| csdm | 50.0 ± 0.5 (+0.0) |" in table
    assert "mean ± std over 5 networks x 1000 epochs, or those in square brackets" in table


def test_the_usual_budget_is_the_distilled_sets_and_a_tie_goes_to_more_epochs():
    """Baselines copied into every IPC's folder do not outvote the distilled sets; fewer networks alone is
    a budget of its own too (the ruler still applies: it compares epochs)."""
    def record(method, networks, epochs):
        return dict(method=method, num_eval=networks, epochs=epochs)
    copies = [record("full", 5, 200)] * 3 + [record("csdm", 5, 1000), record("dm", 5, 1000)]
    assert report.usual_budget(copies) == (5, 1000)
    assert report.usual_budget([record("dm", 10, 200), record("csdm", 5, 1000)]) == (5, 1000)
    assert report.budget_note(record("dm", 3, 1000), copies) == " [3 x 1000 epochs]"
    assert report.usual_budget([record("random", 3, 300)]) == (3, 300)


def test_each_table_names_its_data(tmp_path):
    """A table says where its images came from: results.json's data_source, or for an older file what
    data_lt.data_source says of the --data-dir of its command or of the set it evaluated, where that folder
    exists here."""
    copy = tmp_path / "cifar-copy"
    (copy / "train").mkdir(parents=True), (copy / "test").mkdir()
    runs = {"random": dict(fake_result(30.0), dataset="cifar10-LT(IF=200)", config={"data_dir": str(copy)}),
            "csdm": dict(fake_result(47.0), config={"syn": str(tmp_path / "sets" / "csdm" / "synthetic.pt")}),
            "dm": dict(fake_result(46.0), data_source="torchvision's cifar10 files in data")}
    (tmp_path / "sets" / "csdm").mkdir(parents=True)
    (tmp_path / "sets" / "csdm" / "config.json").write_text(json.dumps({"data_dir": str(tmp_path / "gone")}))
    for method, result in runs.items():
        folder = tmp_path / "grid" / "cifar10" / "if200" / "ipc10" / method
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(result))
    data_line = [line for line in report.write_report(tmp_path / "grid").read_text().splitlines()
                 if line.startswith("Data: ")]
    assert data_line == [f"Data: --data-dir {tmp_path / 'gone'} (not on this machine, so of unknown kind); "
                         f"image-folder copy of cifar10 in {copy} (not torchvision's files); "
                         f"torchvision's cifar10 files in data."]


def test_pooled_folders_may_not_hold_one_cell_twice(tmp_path):
    for seed in (0, 1):
        folder = tmp_path / f"seed{seed}" / "cifar10" / "if200" / "ipc10" / "csdm"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(fake_result(50.0 + seed)))
    with pytest.raises(UsageError, match=r"seed0/.* and .*seed1/.* are the same cell of one table"):
        report.write_report(tmp_path / "seed0", more_roots=(tmp_path / "seed1",))
    assert "| csdm | 51.0 ± 0.5 |" in report.write_report(tmp_path / "seed1").read_text()


def test_improvement_over_random_needs_the_same_number_of_images(tmp_path):
    """A random baseline at another factor (another number of training images) is not the ruler."""
    for method, factor, acc in (("csdm", 2, 48.0), ("random", 1, 31.0)):
        folder = tmp_path / "cifar10" / "if200" / "ipc10" / method
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(dict(fake_result(acc), factor=factor)))
    records = report.collect_grid(tmp_path)
    assert report.over_random([r for r in records if r["method"] == "csdm"][0], records) is None
    (tmp_path / "cifar10" / "if200" / "ipc10" / "random" / "results.json").write_text(
        json.dumps(dict(fake_result(40.0), config={"baseline": "random", "factor": 2})))  # recorded by its command
    records = report.collect_grid(tmp_path)
    assert report.over_random([r for r in records if r["method"] == "csdm"][0], records) == 8.0


def test_published_convnet_figures_only_beside_convnet_tables(tmp_path):
    """The published CIFAR-10-LT figures are ConvNet-3's: a cross-architecture table gets none."""
    for model in ("convnet", "alexnet"):
        folder = tmp_path / model / "cifar10" / "if200" / "ipc10" / "dm"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(dict(fake_result(40.0), model=model)))
    table = report.write_report(tmp_path / "convnet", more_roots=(tmp_path / "alexnet",),
                                table=tmp_path / "t.md").read_text()
    after_alexnet = table.split("## cifar10-LT, dm protocol, alexnet")[1]
    alexnet, convnet = after_alexnet.split("## cifar10-LT, dm protocol, convnet")
    assert "LAD (published)" in convnet and "LAD (published)" not in alexnet


def test_a_factor_1_set_is_ruled_by_the_factor_1_random_run(tmp_path):
    """DM as published (factor 1) beside the default (factor 2): each against random at its own factor."""
    for method, factor, acc in (("dm", 2, 48.0), ("dm-f1", 1, 36.0), ("random", 2, 40.0), ("random-f1", 1, 30.0)):
        folder = tmp_path / "cifar10" / "if200" / "ipc10" / method
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(dict(fake_result(acc), factor=factor)))
    records = {r["method"]: r for r in report.collect_grid(tmp_path)}
    assert report.over_random(records["dm"], list(records.values())) == 8.0
    assert report.over_random(records["dm-f1"], list(records.values())) == 6.0
    assert report.over_random(records["random-f1"], list(records.values())) is None



def test_list_report_for_ablations(tmp_path):
    for name, acc in (("csdm-gaussian", 41.0), ("csdm-cauchy", 39.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(dict(fake_result(acc, split="val"),
                                                                      evaluated=f"{name}, IPC 10")))
    table = report.write_report(tmp_path).read_text()
    assert "| csdm-cauchy | csdm-cauchy, IPC 10 | 39.00 ± 0.50 |" in table and "val split" in table
    # each run's line says how it came about, whatever its files record
    assert ("- csdm-gaussian: evaluated 3 x 300 epochs, precision unrecorded, at an unrecorded commit on an "
            "unrecorded processor") in table


def test_summary_needs_one_dataset_and_ipc(tmp_path):
    for ipc in (10, 20):
        folder = tmp_path / "cifar10" / "if10" / f"ipc{ipc}" / "dm"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(fake_result(40.0)))
    with pytest.raises(UsageError, match="--summary"):
        report.write_report(tmp_path, tmp_path / "s.json")


def test_each_cell_says_how_it_came_about(tmp_path):
    """The table names, per cell, the distillation's budget and each sitting's commit and CPU (run.json's
    stretches), and the evaluation's networks x epochs, precision, commit and CPU; a baseline has no
    distillation, and an evaluation into another folder finds the set's files through --syn."""
    cell = tmp_path / "dm" / "cifar10" / "if200" / "ipc10"
    for method in ("csdm", "random"):
        (cell / method).mkdir(parents=True)
    evaluation = {"config": {"precision": "bf16", "syn": str(cell / "csdm" / "synthetic.pt")},
                  "environment": {"commit": "b" * 40, "cpu": "AMD EPYC"}}
    (cell / "csdm" / "results.json").write_text(json.dumps(dict(fake_result(50.0), **evaluation)))
    (cell / "csdm" / "config.json").write_text(json.dumps({"iterations": 20000, "batch_real": 256,
                                                            "precision": "bf16"}))
    stretches = [{"iterations": [0, 7552], "commit": None, "processor": None},
                 {"iterations": [7552, 20000], "commit": "a" * 40 + "+dirty", "processor": "Intel Xeon"}]
    (cell / "csdm" / "run.json").write_text(json.dumps({"iterations_done": 20000, "stretches": stretches}))
    (cell / "random" / "results.json").write_text(json.dumps(dict(
        fake_result(40.0), config={"precision": "fp32"}, environment={"commit": "c" * 40, "cpu": "Intel Xeon"})))
    table = report.write_report(tmp_path / "dm").read_text()
    assert ("- cifar10 csdm, IF 200, IPC 10, dm protocol, convnet, test split: distilled 20000 iterations at "
            "batch-real 256, precision bf16 at an unrecorded commit on an unrecorded processor (iterations 0-7552), "
            "at aaaaaaa+dirty on Intel Xeon (iterations 7552-20000); evaluated 3 x 300 epochs, precision bf16, at "
            "bbbbbbb on AMD EPYC") in table
    assert ("- cifar10 random, IF 200, IPC 10, dm protocol, convnet, test split: evaluated 3 x 300 epochs, "
            "precision fp32, at ccccccc on Intel Xeon") in table
    # the same set evaluated into another tree (another protocol) still finds its distillation
    moved = tmp_path / "ncfm" / "cifar10" / "if200" / "ipc10" / "csdm"
    moved.mkdir(parents=True)
    (moved / "results.json").write_text((cell / "csdm" / "results.json").read_text())
    assert "distilled 20000 iterations" in report.write_report(tmp_path / "ncfm").read_text()


def test_a_set_distilled_before_stretches_were_kept_names_its_last_sitting():
    """run.json without stretches records the last sitting only: said so, unless that sitting's seconds cover
    the whole distillation; a GPU run names its GPU; a set whose run.json is gone says so."""
    last = {"commit": "d" * 40, "cpu": "AMD EPYC", "device": "cpu", "wall_seconds": 9579.4,
            "session_seconds": 3527.4}
    assert report.distilled_where(last) == "at ddddddd on AMD EPYC (the last sitting's record)"
    assert report.distilled_where(dict(last, session_seconds=9600.0)) == "at ddddddd on AMD EPYC"
    on_gpu = dict(last, device="cuda", gpu="NVIDIA H200", session_seconds=9600.0)
    assert report.distilled_where(on_gpu) == "at ddddddd on NVIDIA H200"
    assert report.distilled_where({}) == "(its run.json is gone)"


def test_an_evaluation_resumed_across_sittings_names_each(tmp_path):
    """An evaluation continued with --resume says which networks each sitting trained, at which commit and where."""
    cell = tmp_path / "dm" / "cifar10" / "if200" / "ipc10" / "full"
    cell.mkdir(parents=True)
    sittings = [{"networks": [0, 1], "commit": "d" * 40, "processor": "AMD EPYC"},
                {"networks": [2], "commit": "e" * 40, "processor": "Intel Xeon"}]
    (cell / "results.json").write_text(json.dumps(dict(
        fake_result(60.0), config={"precision": "bf16"}, environment={"commit": "e" * 40, "cpu": "Intel Xeon"},
        sittings=sittings)))
    assert ("evaluated 3 x 300 epochs, precision bf16, at ddddddd on AMD EPYC (networks 1, 2), at eeeeeee on "
            "Intel Xeon (networks 3)") in report.write_report(tmp_path / "dm").read_text()


# ---- the released sets' catalogue (report.py --sets, release.py) ----

def fake_set(path, factor=2, ipc=1, classes=3, seed=0, method="csdm", size=8):
    """A tiny set as distill.py writes it: ipc x factor^2 decoded images per class, sorted by class."""
    import torch
    path.parent.mkdir(parents=True, exist_ok=True)
    per_class = ipc * factor ** 2
    images = torch.randn(classes * per_class, 3, size, size, generator=torch.Generator().manual_seed(seed + factor))
    torch.save({"images": images, "labels": torch.arange(classes).repeat_interleave(per_class),
                "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "class_names": [f"c{k}" for k in range(classes)],
                "class_counts": [100 // (k + 1) for k in range(classes)],
                "config": {"method": method, "ipc": ipc, "factor": factor, "imbalance_factor": 200.0,
                           "dataset": "cifar10", "seed": seed, "iterations": 50}}, path)
    return images


def fake_evaluation(folder, acc, std, protocol, commit, **keys):
    folder.mkdir(parents=True, exist_ok=True)
    result = dict(fake_result(acc), acc_std=std, protocol=protocol, num_eval=5, epochs=1000, accs=[acc] * 5,
                  environment={"commit": commit, "cpu": "AMD EPYC", "machine": "x86_64, 2 CPUs, 2 threads"}, **keys)
    (folder / "results.json").write_text(json.dumps(result))


def catalogue_layout(tmp_path):
    """results/sets/ with two released sets, their run folders, evaluations under both protocols (one linked by
    syn_sha256, one only by its --syn path), a baseline that evaluated no set, and a second seed's run folder."""
    import hashlib
    import shutil
    results = tmp_path / "results"
    cell = results / "full_cell" / "dm" / "cifar10" / "if200" / "ipc10"
    fake_set(cell / "csdm" / "synthetic.pt")
    fake_set(cell / "dm-f1" / "synthetic.pt", factor=1, method="dm")
    (results / "sets").mkdir(parents=True)
    shutil.copy(cell / "csdm" / "synthetic.pt", results / "sets" / "cifar10-if200-ipc10-csdm.pt")
    shutil.copy(cell / "dm-f1" / "synthetic.pt", results / "sets" / "cifar10-if200-ipc10-dm-f1.pt")
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()
    fake_evaluation(cell / "csdm", 52.928, 0.331, "dm", "a" * 40,
                    config={"syn": "results/full_cell/dm/cifar10/if200/ipc10/csdm/synthetic.pt"})  # no syn_sha256
    fake_evaluation(results / "full_cell" / "ncfm" / "cifar10" / "if200" / "ipc10" / "csdm", 54.262, 0.29, "ncfm",
                    "b" * 40, syn_sha256=digest(cell / "csdm" / "synthetic.pt"))
    fake_evaluation(cell / "dm-f1", 45.03, 0.283, "dm", "c" * 40, syn_sha256=digest(cell / "dm-f1" / "synthetic.pt"))
    fake_evaluation(cell / "random", 40.9, 0.42, "dm", "d" * 40)  # evaluated no set
    seed1 = results / "full_cell_seed1" / "dm" / "cifar10" / "if200" / "ipc10" / "csdm"
    fake_set(seed1 / "synthetic.pt", seed=1)
    fake_evaluation(seed1, 53.842, 0.476, "dm", "e" * 40, syn_sha256=digest(seed1 / "synthetic.pt"))
    return results


def catalogue_rows(readme: str) -> dict[str, dict]:
    """The catalogue's table as {set's link text: {column: cell}}."""
    table = [line for line in readme.splitlines() if line.startswith("| ")]
    header = table[0].strip("| ").split(" | ")
    return {row["set"].split("](")[0].strip("["): row
            for row in (dict(zip(header, line.strip("| ").split(" | "))) for line in table[1:])}


def test_the_catalogue_lists_every_set_with_its_hash_count_and_accuracy(tmp_path, monkeypatch):
    import hashlib

    import torch

    import release
    results = catalogue_layout(tmp_path)
    monkeypatch.chdir(tmp_path.parent)  # not the fake repository: a --syn path is read from the folder above results/
    readme = release.catalogue(results / "sets").read_text()
    rows = catalogue_rows(readme)
    seed1 = "../full_cell_seed1/dm/cifar10/if200/ipc10/csdm/synthetic.pt"
    assert set(rows) == {"cifar10-if200-ipc10-csdm.pt", "cifar10-if200-ipc10-dm-f1.pt", seed1}  # copies not twice
    for name, row in rows.items():
        path = results / "sets" / name
        assert row["SHA-256"] == f"`{hashlib.sha256(path.read_bytes()).hexdigest()}`"
        assert row["size"].endswith(f"({path.stat().st_size:,} bytes)")
        count = len(torch.load(path, weights_only=True)["images"])
        assert row["images in the file"].startswith(f"{count} ")
    assert rows["cifar10-if200-ipc10-csdm.pt"]["images in the file"].startswith("12 decoded = 3 distilled x 4 tiles")
    assert rows["cifar10-if200-ipc10-dm-f1.pt"]["images in the file"] == "3 images, 8x8, as distilled"
    csdm, f1 = rows["cifar10-if200-ipc10-csdm.pt"], rows["cifar10-if200-ipc10-dm-f1.pt"]
    assert csdm["accuracy, dm protocol"] == "52.9 ± 0.3 (5 networks x 1000 epochs, final epoch, test split)"
    assert csdm["accuracy, ncfm protocol"].startswith("54.3 ± 0.3 (")
    assert f1["accuracy, dm protocol"].startswith("45.0 ± 0.3 (")
    assert f1["accuracy, ncfm protocol"] == "not evaluated"  # missing, not invented
    assert (rows[seed1]["distillation seed"], rows[seed1]["accuracy, dm protocol"][:10]) == ("1", "53.8 ± 0.5")
    assert (csdm["IF"], csdm["IPC"], csdm["factor"], csdm["method"]) == ("200", "1", "2", "csdm")
    assert "40.9" not in readme  # the random baseline scored no released set
    # where each figure came from: the results.json, how it was linked to the file, its commit and machine
    assert ("results/full_cell/dm/cifar10/if200/ipc10/csdm/results.json (it records no SHA-256; its --syn "
            "results/full_cell/dm/cifar10/if200/ipc10/csdm/synthetic.pt is this file now)") in readme
    assert "at bbbbbbb on AMD EPYC; machine x86_64, 2 CPUs, 2 threads" in readme
    assert "at eeeeeee on AMD EPYC" in readme


def test_the_catalogue_draws_each_set_and_its_snippet_runs(tmp_path, monkeypatch):
    from PIL import Image

    import release
    results = catalogue_layout(tmp_path)
    readme = release.catalogue(results / "sets").read_text()
    names = ["cifar10-if200-ipc10-csdm.png", "cifar10-if200-ipc10-dm-f1.png", "cifar10-if200-ipc1-csdm-seed1.png"]
    for name in names:
        picture = Image.open(results / "sets" / name)
        per_class = 1 if "f1" in name else 4
        assert picture.size == (per_class * 9 + 1, 3 * 9 + 1)  # a row a class, 8x8 images, 1 pixel apart
        assert f"]({name})" in readme
    assert "its first 4 of 4 images in the file's order (the tiles of its first 1 distilled images" in readme
    snippet = readme.split("```python\n")[1].split("```")[0]
    assert len(snippet.strip().splitlines()) == 5 and "weights_only=True" in snippet
    monkeypatch.chdir(results / "sets")
    exec(snippet, {})
    assert Image.open("grid.png").size == (4 * 10 + 2, 3 * 10 + 2)  # save_image's padding 2: 4 a row, 3 rows


def test_report_sets_option(tmp_path, capsys):
    results = catalogue_layout(tmp_path)
    report.main(["--sets", str(results / "sets")])
    assert (results / "sets" / "README.md").is_file() and "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        report.main([])
    assert stopped.value.code == 2
    with pytest.raises(SystemExit):
        report.main(["--sets", str(tmp_path / "none")])
    assert "is not a folder" in capsys.readouterr().err


def test_a_file_that_is_no_set_is_listed_as_unreadable(tmp_path):
    import hashlib

    import release
    results = catalogue_layout(tmp_path)
    (results / "sets" / "notes.pt").write_bytes(b"not a set")
    row = catalogue_rows(release.catalogue(results / "sets").read_text())["notes.pt"]
    assert row["data set"].startswith("unreadable as a set: ") and row["accuracy, dm protocol"] == "-"
    assert row["SHA-256"] == f"`{hashlib.sha256(b'not a set').hexdigest()}`"


def test_soft_and_hard_labels_make_two_tables_each_with_its_own_ruler_and_the_teacher(tmp_path):
    """A set and its random ruler under soft labels are a table of their own beside the hard-label one (pooled
    roots may hold the same cell once per labels), improvement over random within the same labels, and the soft
    table carries the teacher's accuracy as its ceiling row."""
    teacher = {"loss": "balanced", "test_acc": 55.25, "tail": 31.0}
    soft = {"labels": "soft", "temperature": 4.0, "teacher": teacher}
    runs = {("hard", "csdm"): fake_result(52.9), ("hard", "random"): fake_result(40.9),
            ("soft", "csdm"): dict(fake_result(54.0), **soft), ("soft", "random"): dict(fake_result(50.0), **soft)}
    for (labels, method), result in runs.items():
        folder = tmp_path / labels / "cifar10" / "if200" / "ipc10" / method
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(result))
    table = report.write_report(tmp_path / "hard", more_roots=(tmp_path / "soft",), table=tmp_path / "t.md").read_text()
    hard_part, soft_part = table.split("soft (T=4, balanced teacher) labels")
    assert "| csdm | 52.9 ± 0.5 (+12.0) |" in hard_part and "teacher" not in hard_part.split("How each")[0]
    assert "| csdm | 54.0 ± 0.5 (+4.0) |" in soft_part
    assert "| teacher (the soft labels' source, trained on the whole long-tailed split; test) | 55.2 (tail 31.0) |" \
        in soft_part
