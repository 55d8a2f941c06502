"""gpu_check.py, the lent GPU's one command, on a CPU: its tiny path end to end at the smallest sizes that
still take a partial last batch and the stacked evaluation; a failing step recorded while the others run;
the budget stopping the full-budget step (a stand-in command); bad options in one line."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image

import gpu_check
from conftest import ROOT, make_tiny_data

# 4 classes x IPC 17 x factor 2^2 = 272 training images: an evaluation batch of 256 and a last one of 16
TINY = replace(gpu_check.TinySizes(), imbalance_factor=4, ipc=17, iterations=2, batch_real=4, num_freqs=16, width=8,
               num_eval=2, epochs=1, compile=False, methods=("dm", "csdm"), step_timeout_s=120)
TIMING = replace(gpu_check.TimingSizes(), imbalance_factor=4, ipc=1, batch_real=4, num_freqs=16, repeats=1,
                 warmup=1, networks=2, compile=False)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """The tiny long-tailed set as an image-folder tree (32 px: bench.py's timing networks are CIFAR's)."""
    data, root = make_tiny_data(size=32), tmp_path_factory.mktemp("tiny-folder")
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        for k, (image, label) in enumerate(zip(images, labels.tolist())):
            folder = root / split / data.class_names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{k}.png")
    return root


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(gpu_check, "TINY", TINY)
    monkeypatch.setattr(gpu_check, "TIMING", TIMING)


def check(image_folder, tmp_path, *extra):
    out = tmp_path / "check.json"
    code = gpu_check.main(["--device", "cpu", "--tiny-only", "--dataset", "folder", "--data-dir", str(image_folder),
                           "--out", str(out), "--work", str(tmp_path / "work"), "--budget-s", "300", *extra])
    return code, json.loads(out.read_text())


def test_the_tiny_path_runs_every_step_on_a_cpu(image_folder, tmp_path, small):
    code, record = check(image_folder, tmp_path)
    steps = record["steps"]
    assert code == 0 and record["failed"] == [], {k: v.get("error_tail") for k, v in steps.items()}
    assert list(steps) == ["tiny-distill-dm", "tiny-evaluate-dm", "tiny-distill-csdm", "tiny-evaluate-csdm",
                           "tiny-report", "timing-data", "timing-iteration-dm", "timing-iteration-csdm",
                           "timing-eval-epoch-stacked", "timing-eval-epoch-one-at-a-time"]
    assert all(step["ok"] is True and step["seconds"] >= 0 for step in steps.values())
    assert "--stacked" in steps["tiny-evaluate-csdm"]["command"]
    assert steps["tiny-distill-csdm"]["set_images"] == 272 and steps["tiny-distill-csdm"]["eval_last_batch"] == 16
    cell = tmp_path / "work" / "tiny" / "folder" / "if4" / "ipc17"
    assert [json.loads((cell / m / "results.json").read_text())["num_eval"] for m in ("dm", "csdm")] == [2, 2]
    assert (tmp_path / "work" / "tiny" / "table.md").exists()
    for name in ("timing-iteration-dm", "timing-iteration-csdm", "timing-eval-epoch-stacked"):
        figure = steps[name].get("sec_per_iter", steps[name].get("sec_per_epoch"))
        assert figure > 0 and steps[name]["peak_gpu_gb"] is None and steps[name]["peak_rss_gb_process_so_far"] > 0
    assert record["machine"]["commit"] and record["machine"]["torch"] == torch.__version__
    assert record["budget_s"] == 300 and "grid" not in steps and record["tiny_sizes"]["ipc"] == 17


def test_a_failing_step_is_recorded_and_the_others_still_run(image_folder, tmp_path, small, monkeypatch):
    monkeypatch.setattr(gpu_check, "TINY", replace(TINY, methods=("dm",)))
    monkeypatch.setattr(gpu_check, "EXTRA_ARGS", {"tiny-distill-dm": ["--no-such-option"]})
    code, record = check(image_folder, tmp_path)
    steps = record["steps"]
    assert code == 1 and "tiny-distill-dm" in record["failed"]
    failed = steps["tiny-distill-dm"]
    assert failed["ok"] is False and failed["returncode"] == 2 and "--no-such-option" in failed["error_tail"]
    # the steps after it ran: the evaluation of the missing set fails in its own words, the timings succeed
    assert steps["tiny-evaluate-dm"]["returncode"] not in (0, None) and "seconds" in steps["tiny-report"]
    assert steps["timing-iteration-csdm"]["ok"] is True and steps["timing-eval-epoch-stacked"]["ok"] is True


# stands in for run_all.sh: a cell that finished, one whose "distill.py" runs in the background until SIGTERM
# makes it write its checkpoint (after its parent, the script, is gone), and one never started
FAKE_GRID = """
import json, pathlib, subprocess, sys, time
root = pathlib.Path(sys.argv[1])
(root / "done").mkdir(parents=True)
(root / "done" / "results.json").write_text(json.dumps({"acc_mean": 50.0, "acc_std": 1.0}))
child = '''
import pathlib, signal, sys, time, torch
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True)
def stop(*_):
    time.sleep(0.3)  # the iteration in flight
    torch.save({"iteration": 7, "config": {"iterations": 20000}, "elapsed": 3.0}, out / "checkpoint.pt")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print("distilling", flush=True)
while True:
    time.sleep(0.05)
'''
distill = subprocess.Popen([sys.executable, "-c", child, str(root / "running")], stdout=subprocess.PIPE, text=True)
print(distill.stdout.readline(), end="", flush=True)  # its handler is in place
time.sleep(600)
"""


def test_the_budget_stops_the_full_budget_step(tmp_path, monkeypatch, capsys):
    root = tmp_path / "grid"
    monkeypatch.setattr(gpu_check, "GRACE_S", 3.0)
    monkeypatch.setattr(gpu_check, "MIN_GRID_S", 1.0)
    monkeypatch.setattr(gpu_check, "tiny_grid", lambda *a: [])  # steps 1 and 2 have tests of their own
    monkeypatch.setattr(gpu_check, "timings", lambda *a: None)
    monkeypatch.setattr(gpu_check, "grid_command", lambda args: [sys.executable, "-c", FAKE_GRID, str(root)])
    cells = [root / "done", root / "running", root / "never"]
    real_full_grid = gpu_check.full_grid
    monkeypatch.setattr(gpu_check, "full_grid", lambda *a, **k: real_full_grid(*a, cells=cells, **k))
    out = tmp_path / "check.json"
    # 2 x GRACE_S are kept back: the command gets what is left of the other 10 s
    code = gpu_check.main(["--device", "cpu", "--budget-s", "16", "--out", str(out), "--work", str(tmp_path / "w"),
                           "--grid-out", str(root)])
    record = json.loads(out.read_text())
    grid = record["steps"]["grid"]
    assert code == 0 and grid["ok"] is True and grid["stopped_by_budget"] is True and grid["clean_stop"] is True
    assert grid["seconds"] < 14 and record["seconds"] <= 16  # the fake's 600 s cut to what the budget left
    done, running, never = grid["cells"]
    assert done["state"] == "finished" and done["acc_mean"] == 50.0
    assert running["state"] == "distilling" and running["iterations_done"] == 7 and running["iterations"] == 20000
    assert never["state"] == "not started"
    assert "distilling" in grid["log_tail"]


@pytest.mark.parametrize("argv,option", [(["--budget-s", "0"], "--budget-s"), (["--budget-s", "nan"], "--budget-s"),
                                         (["--device", "tpu"], "--device"), (["--out", "DIR"], "--out"),
                                         (["--data-dir", "MISSING"], "--data-dir"),
                                         (["--jobs-per-gpu", "0"], "--jobs-per-gpu")])
def test_bad_options_end_in_one_line(argv, option, tmp_path, capsys):
    argv = [{"DIR": str(tmp_path), "MISSING": str(tmp_path / "missing")}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(argv + (["--out", str(tmp_path / "x.json")] if "--out" not in argv else []))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and option in err, err
    assert not (tmp_path / "x.json").exists()


def test_run_all_runs_the_check(tmp_path):
    """./run_all.sh --gpu-check passes its options on to gpu_check.py, with the JSON and the cells under --out."""
    fake, log = tmp_path / "python", tmp_path / "calls.log"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    fake.chmod(0o755)
    for jobs in ([], ["--jobs-per-gpu", "2"]):  # gpu_check.py's own default unless given
        log.unlink(missing_ok=True)
        done = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--gpu-check", "--data-dir", str(tmp_path), "--out",
                               str(tmp_path / "out"), "--device", "cpu", *jobs], capture_output=True, text=True,
                              env=dict(os.environ, PYTHON=str(fake)))
        assert done.returncode == 0, done.stderr
        assert log.read_text().split() == ["gpu_check.py", "--data-dir", str(tmp_path), "--device", "cpu", "--out",
                                           str(tmp_path / "out" / "gpu_check.json"), "--grid-out",
                                           str(tmp_path / "out"), *jobs]
    refused = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--gpu-check", "--ifs", "50"], capture_output=True,
                             text=True, env=dict(os.environ, PYTHON=str(fake)))
    assert refused.returncode == 2 and "--ifs" in refused.stderr
