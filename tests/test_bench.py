"""bench.py still drives the project's code: its measuring functions run end to end at tiny sizes (no timing
is checked here; speed targets live in bench.py itself)."""
import math

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
