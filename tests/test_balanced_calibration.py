"""Balanced calibration: the logit-adjusted calibration term, the class-balanced re-training of the pool and the
pool trained with the logit-adjusted loss."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import distill
import pool
from conftest import make_tiny_data
from distill import adjusted_logits
from pool import retrain_classifier_balanced
from networks import build_network
from training import PROTOCOLS, train_network


def pool_args(out, *extra):
    return distill.build_parser().parse_args(
        ["--ipc", "2", "--iterations", "2", "--batch-real", "4", "--num-freqs", "16", "--width", "8", "--device",
         "cpu", "--extractor", "pool", "--pool-size", "2", "--pool-epochs", "1", "--calibration", "0.5",
         "--out", str(out), *extra])


def test_tau_zero_is_the_unadjusted_term(tmp_path, monkeypatch):
    """With tau 0 the calibrator's logits are its raw logits, bit for bit, so NCFM's term is unchanged;
    with tau 1 they move by -log prior, the most for the rarest class."""
    monkeypatch.setenv("CSDM_CACHE_DIR", str(tmp_path / "cache"))  # its own pool: other tests count trainings
    data = make_tiny_data()
    for tau, check in ((0.0, "same"), (1.0, "shifted")):
        args = pool_args(tmp_path / str(tau), "--calibration-tau", str(tau))
        extractor = distill.Extractor(distill.resolve(args, data), data, torch.device("cpu"), distill.Processes(),
                                      log=lambda m: None)
        extractor.draw(0)
        x = torch.randn(6, 3, 16, 16).contiguous(memory_format=torch.channels_last)
        raw = extractor.calibrator(x).float()
        adjusted = extractor.classify(x)
        if check == "same":
            assert torch.equal(adjusted, raw)
        else:
            prior = torch.tensor(data.class_counts, dtype=torch.float32) / sum(data.class_counts)
            assert torch.allclose(adjusted - raw, -torch.log(prior).expand_as(raw), atol=1e-5)
            assert int((adjusted - raw)[0].argmax()) == len(data.class_counts) - 1  # the tail gains most


def test_adjustment_moves_the_decision_boundary_to_the_balanced_one():
    """Two classes on a line, a classifier trained on a long-tailed set: logits (w x + log pi_0, -w x + log pi_1)
    (the Bayes classifier of two unit-variance Gaussians at +-1 with w = 1, up to a constant). Its decision
    boundary sits at x* = (log pi_1 - log pi_0) / (2w), inside the tail's side; tau = 1 moves it to 0, where
    the two class-conditional densities are equal, and tau scales the shift linearly, as the formula says."""
    pi = torch.tensor([0.95, 0.05])
    w = 1.0
    x = torch.linspace(-3, 3, 60001)
    logits = torch.stack([w * x + pi[0].log(), -w * x + pi[1].log()], 1)
    for tau in (0.0, 0.5, 1.0):
        adjusted = adjusted_logits(logits, -tau * pi.log())
        boundary = float(x[(adjusted[:, 0] - adjusted[:, 1]).abs().argmin()])
        expected = (1 - tau) * float(pi[1].log() - pi[0].log()) / (2 * w)
        assert boundary == pytest.approx(expected, abs=1e-3)
    # the calibration term's pull: at the balanced boundary the adjusted cross-entropy of both classes is equal
    at_zero = adjusted_logits(torch.stack([pi[0].log(), pi[1].log()])[None], -pi.log())
    loss_of_class = [float(F.cross_entropy(at_zero, torch.tensor([c]))) for c in (0, 1)]
    assert loss_of_class[0] == pytest.approx(loss_of_class[1])
    assert math.log(2) == pytest.approx(float(F.cross_entropy(at_zero, torch.tensor([0]))), abs=1e-6)


def test_classifier_retraining_sees_every_class_equally_and_keeps_the_features():
    data = make_tiny_data(num_classes=4, n_max=40, imbalance_factor=10)
    counts = torch.bincount(data.train_labels)
    assert counts.max() >= 10 * counts.min() - 1  # a long-tailed set
    net = build_network("convnet", 3, 4, 16, width=8, depth=2)
    features_before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("classifier")}
    classifier_before = net.classifier.weight.detach().clone()
    images = data.normalise(data.train_images)
    seen = retrain_classifier_balanced(net, images, data.train_labels, 4, torch.Generator().manual_seed(0))
    assert (seen == seen[0]).all() and seen[0] > 0  # equal class counts, whatever the set's imbalance
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in features_before.items())
    assert not torch.equal(classifier_before, net.classifier.weight)


def test_rebalanced_pool_is_cached_apart_and_options_are_checked(tmp_path, capsys):
    data = make_tiny_data()
    plain, rebalanced = pool_args(tmp_path), pool_args(tmp_path, "--pool-rebalance", "crt")
    assert pool.pool_file(distill.resolve(plain, data), data) != pool.pool_file(distill.resolve(rebalanced, data), data)
    for argv, option in ((["--calibration-tau", "1"], "--calibration-tau"),
                         (["--pool-rebalance", "crt"], "--pool-rebalance"),
                         (["--pool-rebalance", "la"], "--pool-rebalance la")):
        with pytest.raises(SystemExit) as exit_info:
            distill.main(argv + ["--out", str(tmp_path / "x"), "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and option in err and len(err.splitlines()) == 1


class BiasOnly(torch.nn.Module):
    """Logits that do not depend on the image: the loss's minimiser is then a closed form of the labels."""

    def __init__(self, num_classes):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        return self.bias.expand(len(x), -1)


def test_logit_adjusted_training_balances_the_raw_logits():
    """Cross-entropy of image-independent logits b on labels with prior pi is minimised at softmax(b) = pi;
    the logit-adjusted loss CE(b + log pi) at softmax(b + log pi) = pi, i.e. softmax(b) uniform: the network
    trained with --pool-rebalance la scores the classes as if they were balanced."""
    counts = torch.tensor([60, 25, 10, 5])
    labels = torch.repeat_interleave(torch.arange(4), counts)
    images = torch.zeros(len(labels), 3, 8, 8)
    prior = counts.float() / counts.sum()
    protocol = replace(PROTOCOLS["dm"], batch_size=len(labels), lr=0.5, weight_decay=0.0, milestones=())  # full batch
    plain = train_network(BiasOnly(4), images, labels, torch.Generator().manual_seed(0), protocol, epochs=200)
    adjusted = train_network(BiasOnly(4), images, labels, torch.Generator().manual_seed(0), protocol, epochs=200,
                             logit_shift=prior.log())
    assert torch.allclose(plain.bias.detach().softmax(0), prior, atol=0.002)
    assert torch.allclose(adjusted.bias.detach().softmax(0), torch.full((4,), 0.25), atol=0.002)


def test_la_pool_trains_with_the_log_prior_and_is_cached_apart(tmp_path):
    data = make_tiny_data()
    plain, crt, la = (pool_args(tmp_path, *extra) for extra in ((), ("--pool-rebalance", "crt"),
                                                                  ("--pool-rebalance", "la")))
    assert len({pool.pool_file(distill.resolve(args, data), data) for args in (plain, crt, la)}) == 3
    prior = torch.tensor(data.class_counts, dtype=torch.float32) / sum(data.class_counts)
    assert torch.allclose(pool.pool_logit_shift(la, data, "cpu"), prior.log())
    assert pool.pool_logit_shift(plain, data, "cpu") is None and pool.pool_logit_shift(crt, data, "cpu") is None
