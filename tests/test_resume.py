"""Runs that survive stops: checkpoints, --resume, signals, refusals, non-finite losses."""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from conftest import ROOT


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    """A tiny image-folder data set: 4 classes, 12 train and 3 test images each, 16 px."""
    root = tmp_path_factory.mktemp("folder")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("test", 3)):
        for c in range(4):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(16, 16, 3, generator=g) * 60 + 50 * c).byte().numpy()
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.png")
    return root


def command(data_dir, out, *extra, iterations=60):
    return [sys.executable, str(ROOT / "distill.py"), "--dataset", "folder", "--data-dir", str(data_dir),
            "--imbalance-factor", "4", "--ipc", "2", "--iterations", str(iterations), "--batch-real", "4",
            "--num-freqs", "16", "--width", "8", "--ckpt-every", "2", "--log-every", "1000", "--device", "cpu",
            "--out", str(out), *map(str, extra)]


def run(argv, code=0):
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == code, done.stderr[-2000:]
    return done


def test_sigterm_then_resume_equals_an_uninterrupted_run(folder_data, tmp_path):
    run(command(folder_data, tmp_path / "straight"))
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(command(folder_data, interrupted), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 120
    while not (interrupted / "checkpoint.pt").exists():
        assert process.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stopped_at = time.time()
    _, stderr = process.communicate(timeout=60)
    assert time.time() - stopped_at < 10  # stops within seconds
    assert process.returncode == 128 + signal.SIGTERM
    assert "--resume" in stderr and "checkpoint" in stderr
    assert not (interrupted / "synthetic.pt").exists()
    checkpoint = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    assert 2 <= checkpoint["iteration"] < 60
    run(command(folder_data, interrupted, "--resume"))
    a = torch.load(tmp_path / "straight" / "synthetic.pt", weights_only=True)
    b = torch.load(interrupted / "synthetic.pt", weights_only=True)
    assert torch.equal(a["images"], b["images"])  # bit for bit on CPU
    assert (interrupted / "loss.csv").read_text().count("\n") == 61  # the history continued
    stretches = json.loads((interrupted / "run.json").read_text())["stretches"]
    stopped = checkpoint["iteration"]
    assert [part["iterations"] for part in stretches] == [[0, stopped], [stopped, 60]]


def test_a_finished_run_extended_with_more_iterations_equals_a_longer_run(folder_data, tmp_path):
    """run_all.sh --ablation budget continues a shorter run's last checkpoint to a longer budget."""
    run(command(folder_data, tmp_path / "straight", iterations=12))
    run(command(folder_data, tmp_path / "extended", iterations=6))
    done = run(command(folder_data, tmp_path / "extended", "--resume", iterations=12))
    assert "resuming from iteration 6" in done.stdout
    a = torch.load(tmp_path / "straight" / "synthetic.pt", weights_only=True)
    b = torch.load(tmp_path / "extended" / "synthetic.pt", weights_only=True)
    assert torch.equal(a["images"], b["images"])
    assert (tmp_path / "extended" / "loss.csv").read_text().count("\n") == 13
    # run.json says which sitting distilled which iterations, where and at which commit
    run_record = json.loads((tmp_path / "extended" / "run.json").read_text())
    stretches = run_record["stretches"]
    assert [part["iterations"] for part in stretches] == [[0, 6], [6, 12]]
    assert all(part["processor"] and part["device"] == "cpu" and part["commit"] for part in stretches)
    # the sittings' seconds add up to the distillation's (rounded to 0.1 s in run.json)
    assert abs(sum(part["seconds"] for part in stretches) - run_record["wall_seconds"]) < 0.1


def test_a_checkpoint_from_before_stretches_were_kept_resumes_with_its_origin_unrecorded(folder_data, tmp_path):
    out = tmp_path / "old"
    run(command(folder_data, out, iterations=4))
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    del checkpoint["stretches"]
    torch.save(checkpoint, out / "checkpoint.pt")
    (out / "synthetic.pt").unlink()
    run(command(folder_data, out, "--resume", iterations=4))  # nothing left to distil: no empty stretch
    assert [part["iterations"] for part in json.loads((out / "run.json").read_text())["stretches"]] == [[0, 4]]
    run(command(folder_data, out, "--resume", iterations=6))
    stretches = json.loads((out / "run.json").read_text())["stretches"]
    assert [part["iterations"] for part in stretches] == [[0, 4], [4, 6]]
    assert stretches[0]["commit"] is None and stretches[1]["commit"] is not None
    # the checkpoint's stretches, None included, load as a user's file is read
    assert torch.load(out / "checkpoint.pt", weights_only=True)["stretches"][0]["processor"] is None


def test_resume_refuses_other_options_and_broken_checkpoints(folder_data, tmp_path):
    out = tmp_path / "run"
    run(command(folder_data, out, iterations=4))
    done = run(command(folder_data, out, "--resume", "--lr-img", "3", iterations=6), code=2)
    assert "--lr-img 0.01 (checkpoint) vs 3.0 (now)" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    # more iterations with the same options continue the run, also from a checkpoint written before an
    # option was added (it ran with the option's off value)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    del checkpoint["config"]["calibration"]
    torch.save(checkpoint, out / "checkpoint.pt")
    run(command(folder_data, out, "--resume", iterations=6))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 6
    # a checkpoint cut short (a copy interrupted, a full disk), then one that is not a checkpoint at all: one
    # line that names the file and the fix, and the fix works
    path = out / "checkpoint.pt"
    whole = path.read_bytes()
    for corrupt in (whole[:len(whole) // 2], b"\x80\x02garbage" * 10):
        path.write_bytes(corrupt)
        done = run(command(folder_data, out, "--resume", iterations=8), code=2)
        assert done.stderr.startswith(f"distill.py: error: --resume: {path} cannot be read")
        assert done.stderr.rstrip().endswith("delete it, or start again with --overwrite")
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    run(command(folder_data, out, "--overwrite", iterations=8))
    assert torch.load(path, weights_only=True)["iteration"] == 8
    checkpoint = {"format_version": 999, "config": {}}
    torch.save(checkpoint, out / "checkpoint.pt")
    done = run(command(folder_data, out, "--resume", iterations=8), code=2)
    assert "format 999" in done.stderr


def test_an_occupied_output_folder_needs_resume_or_overwrite(folder_data, tmp_path):
    out = tmp_path / "run"
    run(command(folder_data, out, iterations=2))
    before = (out / "synthetic.pt").read_bytes()
    done = run(command(folder_data, out, iterations=2), code=2)
    assert "--out" in done.stderr and "--resume" in done.stderr and "--overwrite" in done.stderr
    assert (out / "synthetic.pt").read_bytes() == before  # nothing lost
    run(command(folder_data, out, "--seed", "3", "--overwrite", iterations=2))
    assert torch.load(out / "synthetic.pt", weights_only=True)["config"]["seed"] == 3
    done = run(command(folder_data, out, "--seed", "3", "--resume", iterations=2))
    assert "nothing to do" in done.stdout
    (tmp_path / "file").write_text("kept")
    done = run(command(folder_data, tmp_path / "file", "--overwrite", iterations=2), code=2)
    assert done.stderr.strip().endswith(f"--out {tmp_path / 'file'} is a file; give a folder")
    assert (tmp_path / "file").read_text() == "kept"


def test_resume_judges_a_run_finished_by_its_set_not_by_the_checkpoint_alone(folder_data, tmp_path):
    """A finished 2-iteration set beside a checkpoint at 4 (an extension stopped there): --resume --iterations 3
    is refused (the checkpoint is past it), --iterations 4 writes the set of the checkpoint (not "nothing to
    do" over the 2-iteration set); without a checkpoint, a set of other options or of more iterations is
    refused, not replaced."""
    run(command(folder_data, tmp_path / "longer", iterations=4))
    out = tmp_path / "run"
    run(command(folder_data, out, iterations=2))
    (out / "checkpoint.pt").write_bytes((tmp_path / "longer" / "checkpoint.pt").read_bytes())
    done = run(command(folder_data, out, "--resume", iterations=3), code=2)
    assert "already at iteration 4; resume with --iterations 4 or more" in done.stderr
    done = run(command(folder_data, out, "--resume", iterations=4))
    assert "nothing to do" not in done.stdout
    written, longer = (torch.load(folder / "synthetic.pt", weights_only=True) for folder in (out, tmp_path / "longer"))
    assert written["config"]["iterations"] == 4 and torch.equal(written["images"], longer["images"])
    assert "nothing to do" in run(command(folder_data, out, "--resume", iterations=4)).stdout
    (out / "checkpoint.pt").unlink()
    before = (out / "synthetic.pt").read_bytes()
    done = run(command(folder_data, out, "--resume", iterations=2), code=2)  # would restart and shorten the set
    assert "holds a set of 4 iterations, which resuming from the start would replace" in done.stderr
    done = run(command(folder_data, out, "--resume", "--seed", 3, iterations=4), code=2)
    assert "synthetic.pt was made with other options: --data-seed 0 (synthetic.pt) vs 3 (now)" in done.stderr
    assert "--seed 0 (synthetic.pt) vs 3 (now)" in done.stderr  # --seed draws the subset too, without --data-seed
    assert (out / "synthetic.pt").read_bytes() == before


def test_an_interrupted_evaluation_of_a_set_counts_as_an_evaluation(folder_data, tmp_path):
    """Networks evaluate.py kept of a set (evaluation.partial/, in the run's folder or in one inside it) would
    describe a set that is gone: continuing the set is refused as for a finished evaluation, one inside blocks
    --overwrite, and the run's own goes with the set it evaluated under --overwrite."""
    out = tmp_path / "run"
    run(command(folder_data, out, iterations=2))
    (out / "evaluation.partial").mkdir()
    done = run(command(folder_data, out, "--resume", iterations=4), code=2)
    assert done.stderr.startswith(f"distill.py: error: --resume --iterations 4: the set in {out} was evaluated")
    (out / "ncfm" / "evaluation.partial").mkdir(parents=True)
    done = run(command(folder_data, out, "--overwrite", iterations=2), code=2)
    assert str(out / "ncfm") in done.stderr and len(done.stderr.strip().splitlines()) == 1
    shutil.rmtree(out / "ncfm")
    run(command(folder_data, out, "--overwrite", iterations=2))
    assert not (out / "evaluation.partial").exists()


def test_a_run_that_would_replace_an_evaluated_set_is_refused(folder_data, tmp_path):
    """Continuing (--resume with more iterations) or replacing (--overwrite) a set that evaluate.py has scored
    would leave results.json describing a set that is gone: refused, nothing touched; continuing in a new
    folder works."""
    out = tmp_path / "run"
    run(command(folder_data, out, iterations=2))
    (out / "results.json").write_text("{}")
    before = (out / "synthetic.pt").read_bytes()
    done = run(command(folder_data, out, "--resume", iterations=4), code=2)
    assert done.stderr.startswith(f"distill.py: error: --resume --iterations 4: the set in {out} was evaluated")
    assert "new --out" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "nothing to do" in run(command(folder_data, out, "--resume", iterations=2)).stdout  # finished: untouched
    (out / "results.json").unlink()
    (out / "ncfm").mkdir()  # evaluate.py --syn run/synthetic.pt --out run/ncfm
    (out / "ncfm" / "results.json").write_text(json.dumps({"config": {"syn": str(out / "synthetic.pt")}}))
    (out / "other").mkdir()  # an evaluation of another set, kept inside: not this set's
    (out / "other" / "results.json").write_text(json.dumps({"config": {"syn": "elsewhere/synthetic.pt"}}))
    for option, iterations in (("--resume", 4), ("--overwrite", 2)):
        done = run(command(folder_data, out, option, iterations=iterations), code=2)
        assert done.stderr.startswith(f"distill.py: error: {option}") and str(out / "ncfm") in done.stderr
        assert str(out / "other") not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert (out / "synthetic.pt").read_bytes() == before and (out / "checkpoint.pt").exists()
    (tmp_path / "longer").mkdir()
    (tmp_path / "longer" / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    done = run(command(folder_data, tmp_path / "longer", "--resume", iterations=4))
    assert "resuming from iteration 2" in done.stdout


def test_a_diverging_run_stops_and_keeps_its_last_checkpoint(folder_data, tmp_path):
    # lr 1e30 on dm: the first step leaves finite images, the second overflows; a checkpoint after every
    # iteration, so the first one is on disk when the run diverges
    out = tmp_path / "run"
    done = run(command(folder_data, out, "--method", "dm", "--lr-img", "1e30", "--ckpt-every", 1, iterations=50),
               code=1)
    assert "non-finite at iteration 1" in done.stderr and "lower --lr-img" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    path = out / "checkpoint.pt"
    assert done.stderr.rstrip().endswith(f"the last good checkpoint is {path}, after 1 iterations")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["iteration"] == 1 and len(checkpoint["history"]) == 1
    assert torch.isfinite(checkpoint["images"]).all() and checkpoint["images"].abs().max() > 1e3  # the first step
    assert not (out / "synthetic.pt").exists()


def test_the_run_folder_explains_itself(folder_data, tmp_path):
    import json
    out = tmp_path / "run"
    run(command(folder_data, out, iterations=3))
    info = json.loads((out / "run.json").read_text())
    assert info["command"].startswith("distill.py --dataset folder") and info["torch"] == torch.__version__
    assert info["iterations_done"] == 3 and "commit" in info and info["device"] == "cpu"
    readme = (out / "README.md").read_text()
    assert "csdm on folder-LT" in readme and "init_vs_final.png" in readme and "loss.png" in readme
    assert "; device cpu; distillation 3 iterations in " in readme  # one line: where and how long
    for picture in ("init_vs_final.png", "loss.png", "synthetic.png", "init.png"):
        assert (out / picture).stat().st_size > 0


def test_progress_after_resume_counts_this_sitting_only():
    """A run resumed at iteration 50 after 500 s: 10 iterations in the next 10 s are 1 it/s, 40 s left
    (not 10 / 510 s and a day left)."""
    from runs import Progress
    lines = []
    progress = Progress(100, 50, 10, lines.append, elapsed_before=500.0)
    progress.update(60, 0.1, 510.0)
    assert "1.00 it/s" in lines[0] and "~40s left" in lines[0], lines


# ------------------------------------------------------------------------------------------
# evaluate.py: an evaluation across sittings, network by network

class Stopped(Exception):
    """Stands for a stop (a signal, the end of a sitting) in the middle of an evaluation."""


def evaluate_argv(out, *extra):
    return ["--baseline", "random", "--ipc", "2", "--factor", "1", "--num-eval", "3", "--epochs", "3",
            "--device", "cpu", "--precision", "fp32", "--out", str(out), *map(str, extra)]


def tiny(seed=0):
    """The in-memory tiny set with 3 test images a class: per-class accuracies are thirds, which float32 rounds."""
    from conftest import make_tiny_data
    return make_tiny_data(size=16, seed=seed, test_per_class=3)


@pytest.fixture
def tiny_evaluate(monkeypatch):
    """evaluate.py on the in-memory tiny set, counting the networks it trains."""
    import evaluate
    monkeypatch.setattr(evaluate, "load_long_tailed", lambda *a, **k: tiny())
    trained, real = [], evaluate.train_network

    def counting(*args, **kwargs):
        trained.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluate, "train_network", counting)
    return evaluate, trained


def stop_after(monkeypatch, evaluate, networks):
    """Make evaluate.py stop when it starts network `networks` + 1."""
    started, real = [], evaluate.train_network

    def stopping(*args, **kwargs):
        started.append(1)
        if len(started) > networks:
            raise Stopped
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluate, "train_network", stopping)


def stopped_evaluation(evaluate, monkeypatch, out, networks):
    """An evaluation of evaluate_argv(out) stopped after `networks` networks."""
    with monkeypatch.context() as patch:
        stop_after(patch, evaluate, networks)
        with pytest.raises(Stopped):
            evaluate.main(evaluate_argv(out))


def exit_of(evaluate, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_an_interrupted_evaluation_resumes_to_the_uninterrupted_result(tiny_evaluate, monkeypatch, tmp_path):
    """Networks finished before a stop are kept (evaluation.partial/network-<k>.json) and taken by --resume,
    which trains only the rest: the same accuracies, per class too, as one uninterrupted evaluation, each
    sitting recorded."""
    evaluate, trained = tiny_evaluate
    evaluate.main(evaluate_argv(tmp_path / "straight"))
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert [s["networks"] for s in straight["sittings"]] == [[0, 1, 2]]

    out = tmp_path / "stopped"
    stopped_evaluation(evaluate, monkeypatch, out, 2)
    assert sorted(p.name for p in (out / "evaluation.partial").iterdir()) == ["network-0.json", "network-1.json"]
    assert not (out / "results.json").exists()

    trained.clear()
    evaluate.main(evaluate_argv(out, "--resume"))
    resumed = json.loads((out / "results.json").read_text())
    assert len(trained) == 1  # network 3 alone
    assert resumed["accs"] == straight["accs"] and resumed["per_class"] == straight["per_class"]
    assert resumed["head"] == straight["head"] and resumed["tail"] == straight["tail"]
    assert [s["networks"] for s in resumed["sittings"]] == [[0, 1], [2]]
    assert resumed["seconds"] == pytest.approx(sum(s["seconds"] for s in resumed["sittings"]), abs=0.2)
    assert not (out / "evaluation.partial").exists()


def test_kept_networks_are_refused_without_resume_and_replaced_only_with_overwrite(tiny_evaluate, monkeypatch,
                                                                                   tmp_path, capsys):
    """Without --resume the kept networks are refused in one line, and kept; --resume with --overwrite
    contradicts itself; --overwrite starts again."""
    evaluate, trained = tiny_evaluate
    out = tmp_path / "stopped"
    stopped_evaluation(evaluate, monkeypatch, out, 1)
    kept = (out / "evaluation.partial" / "network-0.json").read_text()
    trained.clear()
    code, err = exit_of(evaluate, evaluate_argv(out), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "1 finished networks of an interrupted evaluation" in err
    assert "--resume" in err and "--overwrite" in err
    code, err = exit_of(evaluate, evaluate_argv(out, "--resume", "--overwrite"), capsys)
    assert code == 2 and "contradict" in err
    assert (out / "evaluation.partial" / "network-0.json").read_text() == kept and not trained
    evaluate.main(evaluate_argv(out, "--overwrite"))
    assert len(trained) == 3 and not (out / "evaluation.partial").exists()


def test_resume_refuses_networks_made_otherwise(tiny_evaluate, monkeypatch, tmp_path, capsys):
    """--resume takes a kept network only if it was trained with the same options on the same pixels and is
    one of those asked for; each refusal is one line naming what differs, and nothing is trained or lost."""
    evaluate, trained = tiny_evaluate
    out = tmp_path / "stopped"
    stopped_evaluation(evaluate, monkeypatch, out, 2)
    kept = {p.name: p.read_text() for p in (out / "evaluation.partial").iterdir()}
    trained.clear()
    refusals = [(evaluate_argv(out, "--resume", "--epochs", "4"), "--epochs 3 (now 4)"),
                (evaluate_argv(out, "--resume", "--eval-seed", "1"), "--eval-seed 0 (now 1)"),
                (evaluate_argv(out, "--resume", "--num-eval", "1"), "--num-eval 1: "),
                (evaluate_argv(out, "--resume", "--norm", "batch"), "the network's shape")]
    for argv, words in refusals:
        code, err = exit_of(evaluate, argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    with monkeypatch.context() as patch:  # other pixels, every option the same
        patch.setattr(evaluate, "load_long_tailed", lambda *a, **k: tiny(seed=1))
        code, err = exit_of(evaluate, evaluate_argv(out, "--resume"), capsys)
    assert code == 2 and "the training images, labels or tested split" in err, err
    assert {p.name: p.read_text() for p in (out / "evaluation.partial").iterdir()} == kept and not trained
    (out / "evaluation.partial" / "network-1.json").write_text('{"index": 1}')
    code, err = exit_of(evaluate, evaluate_argv(out, "--resume"), capsys)
    assert code == 2 and "network-1.json cannot be read (KeyError); delete it" in err, err


def test_resume_of_a_finished_evaluation(tiny_evaluate, monkeypatch, tmp_path, capsys):
    """--resume on a finished evaluation made with these options has nothing to do (and removes a kept network
    a stop between writing results.json and removing the folder left); made with other options or networks,
    it is refused; an evaluation begun over it with --overwrite and stopped is continued, not lost."""
    evaluate, trained = tiny_evaluate
    out = tmp_path / "done"
    evaluate.main(evaluate_argv(out))
    finished, trained[:] = (out / "results.json").read_text(), []
    (out / "evaluation.partial").mkdir()
    leftover = {"sitting": {"start": json.loads(finished)["sittings"][0]["start"]}}
    (out / "evaluation.partial" / "network-0.json").write_text(json.dumps(leftover))
    evaluate.main(evaluate_argv(out, "--resume"))
    assert "finished (results.json); nothing to do" in capsys.readouterr().out
    assert not (out / "evaluation.partial").exists()
    for argv, words in ((evaluate_argv(out, "--resume", "--epochs", "4"), "--epochs 3 (now 4)"),
                        (evaluate_argv(out, "--resume", "--num-eval", "4"), "--num-eval 3 (now 4)")):
        code, err = exit_of(evaluate, argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and "holds a finished evaluation made with other" in err
        assert words in err, err
    assert (out / "results.json").read_text() == finished and not trained

    with monkeypatch.context() as patch:  # a new evaluation over it, stopped after one network
        stop_after(patch, evaluate, 1)
        with pytest.raises(Stopped):
            evaluate.main(evaluate_argv(out, "--overwrite"))
    trained.clear()
    evaluate.main(evaluate_argv(out, "--resume"))
    assert len(trained) == 2
    assert [s["networks"] for s in json.loads((out / "results.json").read_text())["sittings"]] == [[0], [1, 2]]
