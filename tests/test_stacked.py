"""stacked.py: K ConvNets trained as one equal K separate trainings (parameters, draws, evaluations)."""
import dataclasses
import json

import pytest
import torch

import evaluate
from conftest import conv_biases_before_a_norm, make_tiny_data
from networks import build_network, reset_parameters_
from stacked import can_stack, extract_network_, load_networks_, stack_networks, train_networks_stacked
from training import PROTOCOLS, train_network

K = 3


def fresh_networks(seed=100, norm="instance", **shape):
    shape = dict(width=8, depth=2) | shape
    generators = [torch.Generator().manual_seed(seed + k) for k in range(K)]
    nets = [reset_parameters_(build_network("convnet", 3, 4, 16, norm=norm, **shape), g) for g in generators]
    return nets, generators


def tiny_set(n=24, size=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 4


def test_load_and_extract_round_trip_exactly():
    nets, _ = fresh_networks()
    stack = stack_networks(nets)
    assert sum(p.numel() for p in stack.parameters()) == K * sum(p.numel() for p in nets[0].parameters())
    for k, net in enumerate(nets):
        back = extract_network_(stack, k, build_network("convnet", 3, 4, 16, width=8, depth=2))
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), back.state_dict().values()))
    other, _ = fresh_networks(seed=7)
    load_networks_(stack, other)  # loading again replaces every parameter
    assert torch.equal(extract_network_(stack, 1, nets[0]).classifier.weight, other[1].classifier.weight)


@pytest.mark.parametrize("shape", [dict(), dict(pooling="max", norm="none"), dict(image_size=28)])
def test_stacked_forward_is_each_networks_forward(shape):
    size = shape.pop("image_size", 16)
    nets = [reset_parameters_(build_network("convnet", 3, 4, size, width=8, depth=2, **shape),
                              torch.Generator().manual_seed(k)) for k in range(K)]
    xs = [torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(10 + k)) for k in range(K)]
    logits = stack_networks(nets)(torch.cat(xs, 1).contiguous(memory_format=torch.channels_last))
    assert logits.shape == (K, 5, 4)
    for k in range(K):
        assert torch.allclose(logits[k], nets[k](xs[k]), rtol=1e-5, atol=1e-6)


def test_batch_norm_does_not_stack():
    nets, _ = fresh_networks(norm="batch")
    assert not can_stack(nets[0]) and can_stack(fresh_networks()[0][0])
    with pytest.raises(ValueError, match="batch-norm"):
        stack_networks(nets)


@pytest.mark.parametrize("name", list(PROTOCOLS))
@pytest.mark.parametrize("micro", [0, 5])
def test_stacked_training_equals_separate_trainings(name, micro):
    """3 networks x 6 epochs (3 batches an epoch, so that CutMix and the lr steps happen under ncfm) end with
    the parameters of 3 separate train_network calls, the generators in the same state, and the protocol's
    evaluations called at the same epochs."""
    images, labels = tiny_set()
    protocol = dataclasses.replace(PROTOCOLS[name], batch_size=10)
    separate, separate_generators = fresh_networks()
    stacked, stacked_generators = fresh_networks()
    seen_separate, seen_stacked = [[] for _ in range(K)], []
    for net, g, seen in zip(separate, separate_generators, seen_separate):
        train_network(net, images, labels, g, protocol, epochs=6,
                      on_evaluation=lambda epoch, net=net, seen=seen: seen.append((epoch, net.classifier.bias.clone())))
    train_networks_stacked(stacked, images, labels, stacked_generators, protocol, epochs=6, micro=micro,
                           on_evaluation=lambda epoch: seen_stacked.append(
                               (epoch, [net.classifier.bias.clone() for net in stacked])))
    # the callback sees every network as it is at that epoch
    assert [epoch for epoch, _ in seen_stacked] == [epoch for epoch, _ in seen_separate[0]]
    assert len(seen_stacked) == (6 if name == "ncfm" else 1)
    for i, (_, biases) in enumerate(seen_stacked):
        assert all(torch.allclose(biases[k], seen_separate[k][i][1], rtol=1e-4, atol=1e-6) for k in range(K))
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(separate_generators, stacked_generators))
    # AdamW divides each step by the gradient's own scale, so where a gradient element is near zero the
    # stack's other summation order shows as a fraction of lr in that element (measured: 1.6e-3 lr after 18
    # steps, on an Intel Xeon); a wrong or missed step moves elements by whole multiples of lr
    # conv biases before a norm change no output, so AdamW may walk them anywhere within +-lr: they are
    # compared through the logits below
    atol = 1e-2 * protocol.lr if protocol.optimizer == "adamw" else 1e-6
    worst = 0.0
    for a, b in zip(separate, stacked):
        walked = conv_biases_before_a_norm(a) if protocol.optimizer == "adamw" else set()
        for p, q in zip(a.parameters(), b.parameters()):
            if id(p) not in walked:
                assert torch.allclose(p, q, rtol=1e-4, atol=atol)
                worst = max(worst, float((p - q).detach().abs().max()))
        x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert torch.allclose(a(x), b(x), rtol=1e-4, atol=1e-5)
    print(f"{name}, micro {micro}: max |parameter difference| {worst:.2e}")


def test_one_optimiser_over_the_stack_is_one_per_network():
    """SGD (momentum, weight decay) and AdamW act elementwise: a step of one optimiser over stacked parameters
    is the step of each network's own optimiser."""
    for optimizer_class, options in ((torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
                                     (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01))):
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(4, 5, generator=g) for _ in range(K)]
        grads = [[torch.randn(4, 5, generator=g) for _ in range(K)] for _ in range(3)]
        alone = [p.clone().requires_grad_(True) for p in params]
        together = torch.stack(params).requires_grad_(True)
        optimisers = [optimizer_class([p], **options) for p in alone]
        joint = optimizer_class([together], **options)
        for step in grads:
            for p, grad, opt in zip(alone, step, optimisers):
                p.grad = grad.clone()
                opt.step()
            together.grad = torch.stack(step)
            joint.step()
        assert torch.allclose(torch.stack(alone), together, rtol=1e-6, atol=1e-7), optimizer_class.__name__


def test_evaluate_trains_together_with_the_results_of_one_at_a_time(tmp_path, monkeypatch):
    """evaluate.py --stacked and --one-at-a-time (the CPU default) give per-network results that agree, and
    the ncfm protocol's best-of-evaluations stays per network."""
    data = make_tiny_data(size=16)
    monkeypatch.setattr(evaluate, "load_long_tailed", lambda *a, **k: data)
    calls = []
    real = evaluate.train_networks_stacked
    monkeypatch.setattr(evaluate, "train_networks_stacked", lambda nets, *a, **k: (calls.append(len(nets)),
                                                                                      real(nets, *a, **k))[1])
    results = {}
    for mode in ("together", "one"):
        for protocol in ("dm", "ncfm"):
            out = tmp_path / f"{mode}-{protocol}"
            argv = ["--baseline", "random", "--ipc", "2", "--factor", "1", "--num-eval", str(K), "--epochs", "4",
                    "--protocol", protocol, "--device", "cpu", "--out", str(out)]
            evaluate.main(argv + (["--stacked"] if mode == "together" else []))
            results[mode, protocol] = json.loads((out / "results.json").read_text())
    assert calls == [K, K]  # together: once per protocol, all networks of the process; never one at a time
    for protocol in ("dm", "ncfm"):
        together, one = results["together", protocol], results["one", protocol]
        assert len(together["accs"]) == K and len(together["best_accs"]) == K
        assert together["accs"] == pytest.approx(one["accs"], abs=1e-9)
        assert together["best_accs"] == pytest.approx(one["best_accs"], abs=1e-9)
        assert together["per_class"] == pytest.approx(one["per_class"], abs=1e-9)
        assert together["evaluation_epochs"] == one["evaluation_epochs"]
    assert results["together", "ncfm"]["evaluation_epochs"] == [1, 2, 3, 4]


def test_stacking_defaults_to_the_device_that_gains():
    assert evaluate.stacks(None, torch.device("cuda")) and not evaluate.stacks(None, torch.device("cpu"))
    assert evaluate.stacks("stacked", torch.device("cpu")) and not evaluate.stacks("one", torch.device("cuda"))
    with pytest.raises(SystemExit):
        evaluate.build_parser().parse_args(["--stacked", "--one-at-a-time"])


def test_compiled_stacked_training_asks_for_static_graphs(monkeypatch):
    """The stacked loss is compiled with dynamic=False: one static graph per batch size (the dynamic-shape
    graph made at an epoch's second batch size failed in its backward on a GPU). torch.compile is replaced
    by a recorder, so the test checks what is asked for and trains eagerly."""
    asked = []
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=None: asked.append(dynamic) or fn)
    nets, generators = fresh_networks()
    images, labels = tiny_set()
    protocol = dataclasses.replace(PROTOCOLS["dm"], batch_size=10)  # batches of 10, 10 and 4
    train_networks_stacked(nets, images, labels, generators, protocol, epochs=1, compile=True)
    assert asked == [False]
