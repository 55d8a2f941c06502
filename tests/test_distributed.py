"""torchrun (gloo on CPU): the result does not depend on the number of processes; 64-px image folders."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import ROOT
from data_lt import decode, initial_synthetic, load_long_tailed

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run(prefix, script, *argv, threads=None):
    # C++ stack traces on: a crash inside a collective or at teardown then says where it happened
    env = dict(os.environ, TORCH_SHOW_CPP_STACKTRACES="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([*prefix, str(ROOT / script), *map(str, argv)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def cifar_args(cifar10_dir):
    return ["--dataset", "cifar10", "--data-dir", cifar10_dir, "--imbalance-factor", 100, "--ipc", 2,
            "--batch-real", 8, "--num-freqs", 32, "--width", 16, "--device", "cpu", "--log-every", 100]


def test_two_processes_distill_the_same_set_as_one(cifar10_dir, tmp_path):
    """At distill.py's defaults (width 128, M 1024, factor 2): 2 processes give 1 process's set up to
    rounding, ||two - one|| <= 5e-2 ||one - start||. Measured: bit-identical on the 2-core AMD EPYC (fp32
    eager and bf16 compiled, also over 20 iterations at IPC 10, batch-real 256); on an Intel Xeon with AMX
    oneDNN rounded other batch shapes differently, up to 5.8e-4 max abs after 3 iterations, which is at most
    0.033 of the set's change here even if every pixel differed that much. A wrong class dealing or a missing
    gather moves whole classes (relative difference of order 1)."""
    args = ["--dataset", "cifar10", "--data-dir", cifar10_dir, "--imbalance-factor", 100, "--ipc", 2,
            "--batch-real", 8, "--device", "cpu", "--log-every", 100, "--iterations", 3, "--bandwidth-rule", "median"]
    run([sys.executable], "distill.py", *args, "--out", tmp_path / "one")
    stdout = run(TORCHRUN, "distill.py", *args, "--out", tmp_path / "two")
    assert "2 processes" in stdout
    one = torch.load(tmp_path / "one" / "synthetic.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "synthetic.pt", weights_only=True)
    assert torch.equal(one["labels"], two["labels"])
    data = load_long_tailed("cifar10", cifar10_dir, 100, 0, log=lambda m: None)
    start = decode(initial_synthetic(data, 2, 0, 2)[0], 2)
    moved = (one["images"] - start).norm()
    assert moved > 1.0  # three Adam steps moved the set
    assert (two["images"] - one["images"]).norm() <= 5e-2 * moved
    loss_one = (tmp_path / "one" / "loss.csv").read_text().splitlines()[-1].split(",")[1]
    loss_two = (tmp_path / "two" / "loss.csv").read_text().splitlines()[-1].split(",")[1]
    assert float(loss_one) == pytest.approx(float(loss_two), rel=1e-4)


def test_two_processes_evaluate_like_one(cifar_args, tmp_path):
    run([sys.executable], "distill.py", *cifar_args, "--iterations", 1, "--out", tmp_path / "set")
    syn = tmp_path / "set" / "synthetic.pt"
    # one at a time: one process would stack networks 0-2, two would stack 0 and 2 and train 1 alone, which
    # agree only up to rounding (tests/test_stacked.py); the process split itself must change nothing.
    # one thread for the single process and for each worker (torchrun's own choice only where the variable is
    # unset): a weight gradient reduced over 2 threads rounds differently from 1 and can flip a prediction
    common = ["--syn", syn, "--num-eval", 3, "--epochs", 2, "--device", "cpu", "--one-at-a-time"]
    run([sys.executable], "evaluate.py", *common, "--out", tmp_path / "one", threads=1)
    run(TORCHRUN, "evaluate.py", *common, "--out", tmp_path / "two", threads=1)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["accs"] == pytest.approx(two["accs"], abs=1e-9)
    assert one["per_class"] == pytest.approx(two["per_class"], abs=1e-9)
    # one sitting, however many processes: the main process's record, which networks, how many processes
    assert [(s["networks"], s["processes"]) for s in two["sittings"]] == [([0, 1, 2], 2)]


def test_a_64px_image_folder_end_to_end_with_depth_4(tmp_path):
    root = tmp_path / "tiny64"
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 10), ("test", 4)):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                size = 64 if i % 2 else 72  # mixed sizes: --image-size resizes them once
                pixels = (torch.rand(size, size, 3, generator=g) * 80 + 60 * c).byte().numpy()
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.jpg")
    out = tmp_path / "run"
    run([sys.executable], "distill.py", "--dataset", "folder", "--data-dir", root, "--image-size", 64,
        "--imbalance-factor", 5, "--n-max", 8, "--ipc", 2, "--iterations", 2, "--batch-real", 4, "--width", 8,
        "--num-freqs", 16, "--device", "cpu", "--out", out)
    synthetic = torch.load(out / "synthetic.pt", weights_only=True)
    assert synthetic["images"].shape == (24, 3, 64, 64)  # IPC 2 x 3 classes x 4 tiles (factor 2)
    assert synthetic["config"]["depth"] == 4 and synthetic["class_counts"] == [8, 3, 1]
    run([sys.executable], "evaluate.py", "--syn", out / "synthetic.pt", "--num-eval", 1, "--epochs", 1,
        "--device", "cpu")
    assert json.loads((out / "results.json").read_text())["per_class"].__len__() == 3


MACHINE_OF = [0, 1, 1]  # three processes, as torchrun places them on two machines: rank -> machine
LOAD_SECONDS = [4, 1, 0]


def load_in_turn(rank, ready, init_file, log_file):
    """One process of the test below: a job whose own collective timeout is 2 s, where the main process's
    load takes 4 s and the second machine's first process's 1 s."""
    import time
    from datetime import timedelta

    import torch.distributed as dist
    from runs import Processes
    ready.wait()  # all three have imported torch: the 2 s bound below is not spent on start-up
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3,
                            timeout=timedelta(seconds=2))

    def load():
        time.sleep(LOAD_SECONDS[rank])
        with open(log_file, "a") as log:
            log.write(f"loaded {rank}\n")
        return rank

    local_rank = MACHINE_OF[:rank].count(MACHINE_OF[rank])
    assert Processes(rank=rank, world=3, local_rank=local_rank).main_first(load) == rank
    dist.destroy_process_group()


def test_the_main_process_loads_first_however_long_it_takes(tmp_path):
    """Under torchrun the main process downloads (and writes the cache) first, then the first process of
    each other machine (shared storage: it finds the cache; its own disk: it downloads once), then the rest,
    who wait even past the job's own collective timeout (a download can outlast NCCL's 10 minutes)."""
    import torch.multiprocessing as mp
    log = tmp_path / "log"
    ready = mp.get_context("spawn").Barrier(3)
    mp.spawn(load_in_turn, args=(ready, str(tmp_path / "init"), str(log)), nprocs=3)
    assert log.read_text().splitlines() == ["loaded 0", "loaded 1", "loaded 2"]
