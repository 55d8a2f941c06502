"""NCFM's pipeline as distill.py's --preset ncfm-paper: the preset's values, the pool's schedule, per-class steps."""
import pytest
import torch

import distill
import training
from conftest import run_distill
from distill import PRESETS, build_parser
from distill_runs import with_present_kernel_name
from training import POOL_SCHEDULES


def tiny_args(out, *extra):
    return build_parser().parse_args(["--ipc", "2", "--iterations", "2", "--batch-real", "4", "--num-freqs", "16",
                                      "--width", "8", "--log-every", "100", "--device", "cpu", "--out", str(out),
                                      *extra])


def test_the_preset_is_ncfms_cifar10_ipc10_config(tmp_path):
    """Values transcribed from gszfwsb/NCFM config/ipc10/cifar10.yaml, read back through the parser."""
    args = build_parser().parse_args(["--preset", "ncfm-paper"])
    assert (args.extractor, args.pool_size, args.pool_schedule, args.pool_epochs) == ("pool", 20, "ncfm", 60)
    assert (args.calibration, args.batch_real, args.num_freqs, args.factor) == (1.0, 1024, 4096, 2)
    assert (args.optimizer, args.lr_img, args.dsa_pairing, args.class_steps) == ("adamw", 0.01, "class", True)
    # the command line wins over the preset, and the preset touches only its own table's options
    args = build_parser().parse_args(["--preset", "ncfm-paper", "--batch-real", "64", "--pool-size", "2"])
    assert (args.batch_real, args.pool_size, args.num_freqs) == (64, 2, 4096)
    assert build_parser().parse_args(["--preset", "ncfm-paper"]).kernel == build_parser().parse_args([]).kernel
    assert set(PRESETS["ncfm-paper"]) <= set(vars(build_parser().parse_args([])))


def test_the_pool_schedule_is_ncfms_pretraining():
    ncfm = POOL_SCHEDULES["ncfm"]
    assert (ncfm.epochs, ncfm.optimizer, ncfm.lr, ncfm.momentum, ncfm.weight_decay) == (60, "sgd", 0.01, 0.9, 5e-4)
    assert ncfm.batch_size == 128 and ncfm.gamma == 0.2 and ncfm.cutmix_prob == 0.5
    optimizer, scheduler = training.make_optimizer([torch.zeros(1, requires_grad=True)], ncfm, ncfm.epochs)
    rates = []
    for _ in range(ncfm.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # NCFM: milestones 2E//3 and 5E//6, lr x0.2 at each
    assert rates[39] == 0.01 and rates[40] == pytest.approx(0.002) and rates[49] == pytest.approx(0.002)
    assert rates[50] == pytest.approx(0.0004) and rates[59] == pytest.approx(0.0004)
    # the project's first pool: 3 epochs of DM's evaluation schedule, 1 at lr 0.01 and 2 at 0.001
    brief = POOL_SCHEDULES["brief"]
    assert brief.epochs == 3 and brief.milestones == (0.5,) and brief.gamma == 0.1


def test_the_pool_trains_with_its_schedule_and_caches_each_network(tiny_data, tmp_path, monkeypatch):
    seen = []
    real_train = training.train_network

    def spy(net, images, labels, generator, protocol, epochs, **kwargs):
        seen.append((protocol.name, epochs))
        return real_train(net, images, labels, generator, protocol, epochs, **kwargs)

    monkeypatch.setattr("pool.train_network", spy)  # pool.py trains the pool
    pool = ("--extractor", "pool", "--pool-schedule", "ncfm", "--pool-epochs", "1", "--pool-cache", str(tmp_path / "p"))
    run_distill(tiny_args(tmp_path, *pool, "--pool-size", "2"), tiny_data, torch.device("cpu"), log=lambda m: None)
    assert seen == [("ncfm-pool", 1), ("ncfm-pool", 1)]
    # a larger pool trains only the networks it lacks: network k depends on (seed, k), not on the pool's size
    run_distill(tiny_args(tmp_path, *pool, "--pool-size", "3"), tiny_data, torch.device("cpu"), log=lambda m: None)
    assert len(seen) == 3
    assert len(list((tmp_path / "p").glob("networks-*/network-*.pt"))) == 3


def test_a_class_step_moves_only_that_class(tiny_data, tmp_path, monkeypatch):
    """--class-steps: one optimiser step per class, each on a gradient that is zero outside the class's rows
    (AdamW's decay and momentum still move every row at every step, as in NCFM's single optimiser)."""
    grads = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        grads.append(self.param_groups[0]["params"][0].grad.clone())
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    args = tiny_args(tmp_path, "--class-steps", "--optimizer", "adamw", "--dsa-pairing", "class", "--iterations", "1")
    result = run_distill(args, tiny_data, torch.device("cpu"), log=lambda m: None)
    rows = torch.arange(tiny_data.num_classes).repeat_interleave(args.ipc)  # the stored rows' classes
    assert len(grads) == tiny_data.num_classes
    for c, grad in enumerate(grads):
        per_row = grad.flatten(1).abs().sum(1)
        assert (per_row[rows != c] == 0).all() and (per_row[rows == c] > 0).all()
    assert result["history"][0][0] == 0


def test_one_step_and_class_steps_differ_only_in_the_steps(tiny_data, tmp_path):
    """Without --class-steps the same draws give one step on the summed loss: the sets differ, both moved."""
    base = ("--optimizer", "adamw", "--iterations", "2")
    joint = run_distill(tiny_args(tmp_path, *base), tiny_data, torch.device("cpu"), log=lambda m: None)
    steps = run_distill(tiny_args(tmp_path, *base, "--class-steps"), tiny_data, torch.device("cpu"), log=lambda m: None)
    assert not torch.equal(joint["images"], steps["images"])
    assert not torch.equal(steps["images"], steps["init_images"])


def test_old_records_name_the_product_kernels_by_their_present_names():
    assert with_present_kernel_name({"kernel": "laplacian"})["kernel"] == "laplacian-l1"
    assert with_present_kernel_name({"kernel": "cauchy"})["kernel"] == "cauchy-product"
    assert with_present_kernel_name({"kernel": "gaussian"})["kernel"] == "gaussian"
    assert with_present_kernel_name({"kernel": "laplacian", "kernel_names": 2})["kernel"] == "laplacian"


def test_pool_only_needs_a_pool(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        distill.main(["--pool-only", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "--pool-only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_resume_on_another_device_kind_is_noticed():
    from distill_runs import other_device_kinds
    checkpoint = {"stretches": [{"device": "cuda:0"}, {"device": "cpu"}, {"device": None}]}
    assert other_device_kinds(checkpoint, torch.device("cpu")) == ["cuda"]
    assert other_device_kinds(checkpoint, torch.device("cuda", 1)) == ["cpu"]
    assert other_device_kinds({"stretches": [{"device": "cpu"}]}, torch.device("cpu")) == []
