"""Every user error ends in one line on stderr that names the option, exit code 2, no traceback."""
import subprocess
import sys

import pytest
import torch

import distill
import evaluate
from conftest import ROOT


def run_main(module, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


@pytest.fixture
def empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")


DISTILL_ERRORS = [
    (["--dataset", "imagenet"], "--dataset"),
    (["--method", "gan"], "--method"),
    (["--kernel", "polynomial"], "--kernel"),
    (["--ipc", "0"], "--ipc"),
    (["--iterations", "0"], "--iterations"),
    (["--batch-real", "0"], "--batch-real"),
    (["--lr-img", "-1"], "--lr-img"),
    (["--bandwidth", "0"], "--bandwidth"),
    (["--alpha-head", "0.2", "--alpha-tail", "0.4"], "--alpha-head"),
    (["--method", "mmd", "--kernel", "laplacian"], "--kernel"),
    (["--imbalance-factor", "0.5", "--data-dir", "DATA"], "--imbalance-factor"),
    (["--data-dir", "MISSING"], "--data-dir"),
    (["--data-dir", "EMPTY"], "--data-dir"),
    (["--dataset", "folder", "--data-dir", "EMPTY"], "--data-dir"),
    (["--ipc", "ten"], "--ipc"),
    (["--device", "tpu"], "--device"),
    (["--calibration", "1"], "--extractor pool"),
    (["--calibration", "-1", "--extractor", "pool"], "--calibration"),
    (["--bandwidth-rule", "median", "--batch-real", "1"], "--batch-real"),
    (["--bandwidth", "inf"], "--bandwidth"),  # would pass > 0 and zero every projection
    (["--lr-img", "nan"], "--lr-img"),
    (["--calibration", "inf", "--extractor", "pool"], "--calibration"),
    (["--imbalance-factor", "nan"], "--imbalance-factor"),
]


@pytest.mark.parametrize("argv,option", DISTILL_ERRORS)
def test_distill_bad_input(argv, option, capsys, empty_dir, tmp_path):
    argv = [{"MISSING": str(tmp_path / "missing"), "EMPTY": empty_dir, "DATA": empty_dir}.get(a, a) for a in argv]
    code, err = run_main(distill, argv + ["--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and option in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cuda_device_without_cuda(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = run_main(distill, ["--device", "cuda", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--device" in err and "--device cpu" in err


def test_a_cuda_index_beyond_the_machine_is_refused(monkeypatch):
    from data_lt import UsageError
    from runs import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UsageError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_evaluate_bad_input(capsys, tmp_path):
    cases = [
        (["--syn", str(tmp_path / "none.pt")], "--syn"),
        (["--baseline", "random", "--ipc", "0"], "--ipc"),
        (["--baseline", "random", "--epochs", "0"], "--epochs"),
        (["--baseline", "random", "--num-eval", "0"], "--num-eval"),
        (["--baseline", "best"], "--baseline"),
        ([], "--syn"),  # nothing to evaluate
    ]
    (tmp_path / "text.pt").write_text("not a tensor file")
    cases.append((["--syn", str(tmp_path / "text.pt")], "--syn"))
    torch.save({"images": torch.zeros(1, 3, 32, 32)}, tmp_path / "partial.pt")
    cases.append((["--syn", str(tmp_path / "partial.pt")], "--syn"))
    for argv, option in cases:
        code, err = run_main(evaluate, argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and option in err, (argv, err)


def test_a_set_is_refused_by_a_data_set_whose_classes_it_does_not_name():
    """A set of the right shape from another data set's classes would be scored against the wrong labels."""
    from conftest import make_tiny_data
    from data_lt import UsageError
    data = make_tiny_data(size=16)
    synthetic = {"images": torch.zeros(4, 3, 16, 16), "labels": torch.arange(4),
                 "class_names": list(data.class_names)}
    evaluate.check_matches(synthetic, data, "set.pt")
    synthetic["class_names"] = list(reversed(data.class_names))
    with pytest.raises(UsageError, match="--syn: set.pt names its classes .* evaluate it with the data set"):
        evaluate.check_matches(synthetic, data, "set.pt")


def test_syn_refuses_options_it_would_ignore():
    """--syn takes the data set, IF, IPC, factor, ... from the set: a value typed on the command line that differs
    from the set's is refused in one line naming the option, even the default value typed on purpose; the set's
    own value is fine, and a baseline gets the defaults of what is not typed."""
    from data_lt import UsageError
    config = {"dataset": "cifar10", "imbalance_factor": 200.0, "val_per_class": 0, "n_max": None,
              "image_size": None, "ipc": 50, "factor": 2}
    parse = lambda *extra: evaluate.build_parser().parse_args(["--syn", "set.pt", *extra])
    evaluate.check_set_options(parse(), config)
    evaluate.check_set_options(parse("--imbalance-factor", "200", "--ipc", "50"), config)
    for option, value in (("--imbalance-factor", "10"), ("--imbalance-factor", "100"), ("--ipc", "10"),
                          ("--factor", "1"), ("--dataset", "cifar100"), ("--val-per-class", "100")):
        with pytest.raises(UsageError, match=f"^{option} .*: set.pt was distilled with {option} .*; drop {option}$"):
            evaluate.check_set_options(parse(option, value), config)
    baseline = evaluate.build_parser().parse_args(["--baseline", "random", "--ipc", "5"])
    assert (baseline.ipc, baseline.factor, baseline.imbalance_factor, baseline.dataset) == (5, 2, 100.0, "cifar10")
    assert baseline.set_options_given == ["ipc"]


def test_evaluate_checks_its_output_folder_before_training(capsys, tmp_path, monkeypatch):
    """An evaluation already in --out is replaced only with --overwrite, and --out must not be a file: both
    refused in one line before any network trains."""
    from conftest import make_tiny_data
    monkeypatch.setattr(evaluate, "load_long_tailed", lambda *a, **k: make_tiny_data(size=16))
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("trained before checking --out"))
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text('{"acc_mean": 50.0}')
    (tmp_path / "file").write_text("")
    for out, words in ((tmp_path / "done", "already holds an evaluation"), (tmp_path / "file", "is a file")):
        code, err = run_main(evaluate, ["--baseline", "random", "--ipc", "1", "--out", str(out)], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and f"--out {out}" in err and words in err, err
    assert (tmp_path / "done" / "results.json").read_text() == '{"acc_mean": 50.0}'
    code, err = run_main(evaluate, ["--baseline", "random", "--ipc", "1", "--factor", "17"], capsys)
    assert code == 2 and err.endswith("--factor 17: a 16-pixel image holds at most 16 x 16 tiles; lower --factor")


class _RunsCode:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['CSDM_PWNED'], 'w').write('ran')",))


def test_synthetic_files_cannot_run_code(capsys, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CSDM_PWNED", str(marker))
    torch.save({"images": torch.zeros(1), "payload": _RunsCode()}, tmp_path / "evil.pt")
    code, err = run_main(evaluate, ["--syn", str(tmp_path / "evil.pt")], capsys)
    assert code == 2 and "--syn" in err
    assert not marker.exists()


def test_real_command_line_prints_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "distill.py"), "--ipc", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "distill.py: error: --ipc must be >= 1 (got 0)"


def test_export_writes_an_image_folder_and_refuses_to_overwrite(tmp_path, capsys):
    """evaluate.py --syn S --export DIR writes DIR/<class>/<n>.png, one file per image, pixels denormalised,
    a slash in a class name as "_" (Fashion-MNIST's "T-shirt/top"); an existing DIR is refused before anything
    is written."""
    from PIL import Image
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    synthetic = {"images": images, "labels": torch.tensor([0, 0, 0, 1, 1, 1]), "class_names": ["cat", "T-shirt/top"],
                 "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "class_counts": [3, 3],
                 "config": {"format_version": 1}}
    torch.save(synthetic, tmp_path / "synthetic.pt")
    evaluate.main(["--syn", str(tmp_path / "synthetic.pt"), "--export", str(tmp_path / "images")])
    files = sorted(p.relative_to(tmp_path / "images").as_posix() for p in (tmp_path / "images").rglob("*.png"))
    assert files == ["T-shirt_top/0.png", "T-shirt_top/1.png", "T-shirt_top/2.png", "cat/0.png", "cat/1.png",
                     "cat/2.png"]
    pixels = torch.from_numpy(__import__("numpy").array(Image.open(tmp_path / "images" / "T-shirt_top" / "1.png")))
    pixels = pixels.float()
    expected = ((images[4] * 0.25 + 0.5).clamp(0, 1) * 255).permute(1, 2, 0)
    assert (pixels - expected).abs().max() <= 1.0  # 8-bit rounding
    code, err = run_main(evaluate, ["--syn", str(tmp_path / "synthetic.pt"), "--export", str(tmp_path / "images")],
                         capsys)
    assert code == 2 and "--export" in err and len(err.splitlines()) == 1
    synthetic["class_names"] = ["T-shirt/top", "T-shirt_top"]  # one folder for two classes: refused, none written
    torch.save(synthetic, tmp_path / "clash.pt")
    code, err = run_main(evaluate, ["--syn", str(tmp_path / "clash.pt"), "--export", str(tmp_path / "clash")], capsys)
    assert code == 2 and "--export" in err and "rename a class" in err and not (tmp_path / "clash").exists()
