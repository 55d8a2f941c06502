"""End to end on the real CIFAR-10-LT (JPEG copy): distill.py and evaluate.py as a user runs them."""
import hashlib
import json
import statistics
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import ROOT, run_distill


def run(script, *argv):
    done = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def distilled(cifar10_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("csdm")
    stdout = run("distill.py", "--method", "csdm", "--dataset", "cifar10", "--data-dir", cifar10_dir,
                 "--imbalance-factor", 200, "--ipc", 2, "--iterations", 4, "--batch-real", 8, "--num-freqs", 32,
                 "--width", 16, "--val-per-class", 20, "--log-every", 2, "--device", "cpu", "--out", out)
    return out, stdout


def test_distill_writes_every_output(distilled):
    out, stdout = distilled
    assert "airplane:4980" in stdout and "truck:25" in stdout  # per-class counts printed at the start
    synthetic = torch.load(out / "synthetic.pt", weights_only=True)
    # factor 2 (the default): 2 stored images per class, 8 decoded training images
    assert synthetic["images"].shape == (80, 3, 32, 32) and synthetic["images"].dtype == torch.float32
    assert torch.isfinite(synthetic["images"]).all()
    assert synthetic["labels"].tolist() == [c for c in range(10) for _ in range(8)]
    assert synthetic["class_names"][9] == "truck" and synthetic["class_counts"][-1] == 25
    assert synthetic["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert synthetic["config"]["method"] == "csdm" and synthetic["config"]["iterations"] == 4
    assert Image.open(out / "synthetic.png").size == (1 + 2 * 33, 1 + 10 * 33)  # one row per class
    assert json.loads((out / "config.json").read_text())["imbalance_factor"] == 200
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "iteration,loss,seconds" and len(rows) == 5


def test_evaluate_writes_results(distilled):
    out, _ = distilled
    stdout = run("evaluate.py", "--syn", out / "synthetic.pt", "--num-eval", 2, "--epochs", 2, "--device", "cpu")
    result = json.loads((out / "results.json").read_text())
    assert len(result["accs"]) == 2 and len(result["per_class"]) == 10
    assert result["acc_mean"] == pytest.approx(sum(result["accs"]) / 2)
    assert result["acc_std"] == pytest.approx(statistics.pstdev(result["accs"])) and result["split"] == "test"
    assert result["groups"] == {"head": [0, 1, 2], "medium": [3, 4, 5, 6], "tail": [7, 8, 9]}
    assert result["tail"] == pytest.approx(sum(result["per_class"][7:]) / 3)
    # the test split is balanced, so the overall accuracy is the mean of the per-class ones
    assert sum(result["per_class"]) / 10 == pytest.approx(result["acc_mean"], abs=1e-6)
    assert f"test acc {result['acc_mean']:.2f} +- {result['acc_std']:.2f}" in stdout  # the summary line
    # the evaluated file is named by its hash, so that a released copy can be checked against the result
    assert result["syn_sha256"] == hashlib.sha256((out / "synthetic.pt").read_bytes()).hexdigest()


def test_evaluate_on_the_validation_split(distilled, tmp_path):
    out, _ = distilled
    run("evaluate.py", "--syn", out / "synthetic.pt", "--num-eval", 1, "--epochs", 1, "--split", "val",
        "--device", "cpu", "--out", tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["split"] == "val"


def test_random_baseline_is_the_distillation_starting_point(cifar10_dir, tmp_path):
    data_options = ["--dataset", "cifar10", "--data-dir", cifar10_dir, "--imbalance-factor", 200, "--ipc", 2]
    run("evaluate.py", "--baseline", "random", *data_options, "--num-eval", 1, "--epochs", 1, "--device", "cpu",
        "--out", tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["class_counts"][-1] == 25 and result["num_eval"] == 1
    # the default --factor 2 is recorded, in the configuration and in what was evaluated
    assert result["config"]["factor"] == 2 and "factor 2" in result["evaluated"]
    assert "syn_sha256" not in result  # no file was evaluated


@pytest.mark.parametrize("factor", [None, 1, 3])
def test_random_baseline_holds_ipc_times_factor_squared_images_per_class(cifar10_dir, tmp_path, factor):
    """--baseline random trains on IPC x factor^2 real images per class (default factor 2), and they are
    distill.py's starting set decoded: what distill() starts from, at the same --ipc, --factor and --seed."""
    import distill
    import evaluate
    data_options = ["--dataset", "cifar10", "--data-dir", cifar10_dir, "--imbalance-factor", 200, "--ipc", 2]
    data_options += ["--factor", factor] if factor else []
    args = evaluate.build_parser().parse_args(list(map(str, ["--baseline", "random", *data_options])))
    run = evaluate.baseline_job(args, log=lambda m: None)
    f = factor or 2
    assert run.images.shape == (10 * 2 * f * f, 3, 32, 32) and torch.isfinite(run.images).all()
    assert torch.bincount(run.labels, minlength=10).tolist() == [2 * f * f] * 10
    assert run.record == {"factor": f}  # results.json's ruler: the same factor as the sets it is compared with
    start = run_distill(distill.build_parser().parse_args(list(map(str, [
        *data_options, "--iterations", 1, "--batch-real", 4, "--width", 8, "--device", "cpu", "--out", tmp_path]))),
        run.data, torch.device("cpu"), log=lambda m: None)
    assert torch.equal(run.images, distill.decode(start["init_images"], f))
    assert torch.equal(run.labels, start["labels"])


def test_evaluate_refuses_a_set_of_another_shape(distilled, tmp_path):
    out, _ = distilled
    synthetic = torch.load(out / "synthetic.pt", weights_only=True)
    synthetic["images"] = synthetic["images"][:, :1]  # one channel, CIFAR has three
    torch.save(synthetic, tmp_path / "gray.pt")
    done = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--syn", str(tmp_path / "gray.pt")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("evaluate.py: error: --syn:") and "1 x 32 x 32" in done.stderr
    assert "Traceback" not in done.stderr
