"""bench.py still drives the project's code: its measuring functions run end to end at tiny sizes (no timing
is checked here; speed targets live in bench.py itself)."""
import json
import math

import pytest
import torch

import bench


def test_the_distillation_and_evaluation_measurements_run():
    cpu = torch.device("cpu")
    data = bench.random_cifar10_lt(imbalance_factor=4, num_classes=4, n_max=8)
    seconds = bench.iteration_seconds(data, cpu, "csdm", num_freqs=16, compile=False, repeats=1, warmup=1, ipc=1,
                                      batch_real=4)
    assert math.isfinite(seconds) and seconds > 0
    images = torch.randn(12, 3, 32, 32)
    labels = torch.arange(12) % 10
    for stacked in (False, True):
        epoch = bench.networks_epoch_seconds(images, labels, 2, stacked, cpu, "fp32", False, repeats=1, warmup=1)
        assert math.isfinite(epoch) and epoch > 0
    assert bench.conv_flops() > 0 and bench.build_parser().parse_args([]).repeats >= 1


def test_out_records_what_measured_the_figures(tmp_path, capsys):
    """--out writes the figures beside the command, commit and processor; a path that cannot be written is
    refused before anything is measured (exit 2, one line naming --out)."""
    bench.write_record(str(tmp_path / "bench.json"), [{"classes": 10, "sec_per_iter": 0.3}])
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["results"] == [{"classes": 10, "sec_per_iter": 0.3}]
    assert record["environment"]["commit"] and record["environment"]["cpu"] and record["date"]
    for bad in (tmp_path / "missing" / "bench.json", tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--scaling", "10", "--out", str(bad)])
        assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:--precision bf16")  # emulated bf16 on this CPU warns; tests/test_networks.py checks it
def test_the_precision_comparison_distils_in_both_precisions(monkeypatch, capsys):
    """--precisions times real distillation iterations, one run in fp32 and one in bf16 (what reaches
    distill()), and records the CPU's bfloat16 flags beside the two timings."""
    seen = []
    real_distill = bench.distill
    monkeypatch.setattr(bench, "distill", lambda args, *rest, **kw: seen.append(args.precision) or real_distill(args, *rest, **kw))
    data = bench.random_cifar10_lt(imbalance_factor=4, num_classes=4, n_max=8)
    figures = bench.precision_costs(data, torch.device("cpu"), compile=False, repeats=1)
    assert sorted(seen) == ["bf16", "fp32"]
    assert figures["sec_per_iter_fp32"] > 0 and figures["sec_per_iter_bf16"] > 0
    assert set(figures["cpu_bf16_flags"]) <= {"amx_bf16", "avx512_bf16"} and "bf16 / fp32" in capsys.readouterr().out


def test_one_instead_mode_at_a_time(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--precisions", "--scaling", "10"])
    assert exit_info.value.code == 2 and "--scaling" in capsys.readouterr().err
