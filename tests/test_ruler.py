"""The fair ruler: the random baseline is distillation's starting set, DSA pairing, the evaluation protocols."""
import dataclasses

import pytest
import torch

import distill
import evaluate
import training
from conftest import make_tiny_data, run_distill
from data_lt import DSA_OPS, DSA_SLOTS, U_BRIGHTNESS, U_FLIP, U_OP, decode, dsa_augment, dsa_uniforms_siamese
from networks import build_network
from training import PROTOCOLS, cutmix, evaluation_epochs, make_optimizer, train_network


def tiny_distill_args(out, *extra):
    return distill.build_parser().parse_args(["--ipc", "2", "--iterations", "1", "--batch-real", "4", "--num-freqs",
                                              "16", "--width", "8", "--device", "cpu", "--out", str(out), *extra])


@pytest.mark.parametrize("factor", [1, 2])
def test_random_baseline_is_the_starting_set_of_distillation(factor, tmp_path, monkeypatch):
    """evaluate.py --baseline random --factor F trains on exactly the images distill.py starts from at
    factor F, decoded: IPC x F^2 real images per class."""
    data = make_tiny_data(size=16)
    monkeypatch.setattr(evaluate, "load_long_tailed", lambda *a, **k: data)
    args = evaluate.build_parser().parse_args(["--baseline", "random", "--ipc", "2", "--factor", str(factor)])
    run = evaluate.baseline_job(args, log=lambda m: None)
    start = run_distill(tiny_distill_args(tmp_path, "--factor", str(factor)), data, torch.device("cpu"),
                        log=lambda m: None)
    assert torch.equal(run.images, decode(start["init_images"], factor))
    assert torch.equal(run.labels, start["labels"])
    assert torch.equal(torch.bincount(run.labels), torch.full((data.num_classes,), 2 * factor ** 2))
    assert f"factor {factor}" in run.what


def test_eval_seed_sets_the_networks_and_leaves_the_data_to_seed():
    """--seed 1 --eval-seed 0: the networks (and their batches) of seed 0, the data subset of seed 1, so that a
    baseline of another seed is judged by the networks that judge the sets."""
    parse = lambda *extra: evaluate.build_parser().parse_args(["--baseline", "random", *extra])
    cpu = torch.device("cpu")
    state = lambda *extra: evaluate.eval_generator(parse(*extra), 3, cpu).get_state()
    assert torch.equal(state("--seed", "1", "--eval-seed", "0"), state("--seed", "0"))
    assert not torch.equal(state("--seed", "1"), state("--seed", "0"))
    assert parse("--seed", "1", "--eval-seed", "0").seed == 1  # the subset's seed stays


def test_class_pairing_gives_a_class_one_transformation():
    """class: every real and synthetic image of a class shares one row of draws in an iteration, as DM's
    code; position: the operation is shared, the parameters differ by position."""
    classes = torch.tensor([0, 0, 0, 1, 1, 2])
    positions = torch.tensor([0, 1, 2, 0, 1, 0])
    u = dsa_uniforms_siamese(7, 3, classes, positions, "class")
    assert u.shape == (6, DSA_SLOTS)
    assert torch.equal(u[0], u[1]) and torch.equal(u[1], u[2]) and torch.equal(u[3], u[4])
    assert not torch.equal(u[0], u[3]) and not torch.equal(u[3], u[5])
    v = dsa_uniforms_siamese(7, 3, classes, positions, "position")
    assert (v[:3, U_OP] == v[0, U_OP]).all() and not torch.equal(v[0, 1:], v[1, 1:])
    assert not torch.equal(dsa_uniforms_siamese(7, 4, classes, positions, "class"), u)  # redrawn every iteration
    with pytest.raises(ValueError, match="pairing"):
        dsa_uniforms_siamese(7, 3, classes, positions, "batch")


@pytest.mark.parametrize("pairing", ["class", "position"])
def test_distillation_pairs_real_and_synthetic_draws(pairing, tmp_path, monkeypatch):
    """Inside the loop: with class pairing all real and synthetic images of a class get one row of draws;
    with position pairing the real and synthetic image at the same position share theirs."""
    calls = []
    real_augment = distill.dsa_augment
    monkeypatch.setattr(distill, "dsa_augment", lambda x, u: (calls.append(u.clone()), real_augment(x, u))[1])
    data = make_tiny_data(size=16)
    run_distill(tiny_distill_args(tmp_path, "--dsa-pairing", pairing, "--factor", "1"), data, torch.device("cpu"),
                log=lambda m: None)
    real_u, syn_u = calls[0], calls[1]  # one chunk: the real batch, then the synthetic images
    batch = distill.RealBatchSampler(data.train_labels, data.num_classes, 4, 0)
    index, position = batch.sample(0)
    real_class = data.train_labels[index]
    syn_class = torch.arange(data.num_classes).repeat_interleave(2)
    for c in range(data.num_classes):
        rows = torch.cat([real_u[real_class == c], syn_u[syn_class == c]])
        if pairing == "class":
            assert (rows == rows[0]).all()
        else:
            assert torch.equal(real_u[(real_class == c) & (position == 1)][0], syn_u[syn_class == c][1])
            assert not (rows == rows[0]).all()


def test_protocols_are_read_from_their_table():
    """The optimiser, its schedule and the evaluation epochs come from the protocol's row."""
    net = torch.nn.Linear(2, 2)
    optimizer, scheduler = make_optimizer(net.parameters(), PROTOCOLS["ncfm"], 2000)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 0.01
    assert sorted(scheduler.milestones) == [400, 800, 1200, 1600] and scheduler.gamma == 0.5
    optimizer, scheduler = make_optimizer(net.parameters(), PROTOCOLS["dm"], 1000)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert optimizer.defaults["weight_decay"] == 5e-4 and sorted(scheduler.milestones) == [500]
    # floor, as NCFM's k * epochs // 5 (and half for dm): the pool's 3 epochs drop the rate after the first
    assert sorted(make_optimizer(net.parameters(), PROTOCOLS["dm"], 3)[1].milestones) == [1]
    assert sorted(make_optimizer(net.parameters(), PROTOCOLS["ncfm"], 7)[1].milestones) == [1, 2, 4, 5]
    assert evaluation_epochs(PROTOCOLS["ncfm"], 2000) == list(range(100, 2001, 100))
    assert evaluation_epochs(PROTOCOLS["ncfm"], 200) == list(range(10, 201, 10))  # --epochs scales the schedule
    assert evaluation_epochs(PROTOCOLS["dm"], 300) == [300]


def test_train_network_follows_the_protocol_row(monkeypatch):
    """A changed row changes the training: lr 0 freezes the network; CutMix runs only where the row asks for it,
    and each row augments as its protocol does (dm: one DSA operation a batch; ncfm: flip, colour, then one
    geometric operation)."""
    images = torch.randn(12, 3, 16, 16)
    labels = torch.arange(12) % 3
    used = {"cutmix": 0, "dsa": 0}
    monkeypatch.setattr(training, "cutmix", lambda *a: (used.__setitem__("cutmix", used["cutmix"] + 1), cutmix(*a))[1])
    monkeypatch.setattr(training, "dsa_augment",
                        lambda *a: (used.__setitem__("dsa", used["dsa"] + 1), dsa_augment(*a))[1])
    for name in ("dm", "ncfm"):
        net = build_network("convnet", 3, 3, 16, width=8, depth=2)
        before = [p.detach().clone() for p in net.parameters()]
        frozen = dataclasses.replace(PROTOCOLS[name], lr=0.0, batch_size=4,
                                     cutmix_prob=min(PROTOCOLS[name].cutmix_prob * 2, 1))
        train_network(net, images, labels, torch.Generator().manual_seed(0), frozen, epochs=2)
        assert all(torch.equal(a, b) for a, b in zip(before, net.parameters())), name
        if name == "dm":
            assert used == {"cutmix": 0, "dsa": 6}  # 3 batches x 2 epochs, one DSA operation each
    assert used == {"cutmix": 6, "dsa": 6 + 18}  # ncfm: CutMix on each batch (p = 1), three operations each
    seen = []
    train_network(build_network("convnet", 3, 3, 16, width=8, depth=2), images, labels, torch.Generator(),
                  PROTOCOLS["ncfm"], epochs=40, on_evaluation=seen.append)
    assert seen == list(range(2, 41, 2))


def test_ncfm_augments_as_its_diffaug_on_cifar(monkeypatch):
    """NCFM's evaluation augmentation (its DiffAug, batch=False, CIFAR strategy with cutout dropped for CutMix):
    every image gets the flip operation (flipped with probability 1/2) and the colour operation, then every image
    of the batch one of crop, scale and rotate, the same one; never cutout; parameters per image."""
    seen = []
    monkeypatch.setattr(training, "dsa_augment", lambda x, u: (seen.append(u.clone()), dsa_augment(x, u))[1])
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        training.augment_batch(torch.randn(16, 3, 8, 8), PROTOCOLS["ncfm"], generator)
    ops = [[DSA_OPS[int(k)] for k in (u[:, U_OP] * len(DSA_OPS)).long()] for u in seen]
    assert all(set(batch) == {"flip"} for batch in ops[0::3]) and all(set(batch) == {"color"} for batch in ops[1::3])
    geometric = [set(batch) for batch in ops[2::3]]
    assert all(len(batch) == 1 for batch in geometric)  # one operation for the batch
    assert set().union(*geometric) == {"crop", "scale", "rotate"}  # each of the three, over 30 batches
    flips = torch.cat([u[:, U_FLIP] < 0.5 for u in seen[0::3]]).float().mean()
    assert 0.35 < flips < 0.65 and all(u[:, U_BRIGHTNESS].std() > 0.1 for u in seen[1::3])  # per image
    x = torch.randn(4, 3, 8, 8)
    assert not torch.equal(training.augment_batch(x, PROTOCOLS["ncfm"], torch.Generator().manual_seed(1)), x)


def test_cutmix_geometry():
    """CutMix pastes one box from each image's partner: the changed share of every image whose partner differs
    is the box's share, 1 - own."""
    x = torch.arange(8 * 3 * 8 * 8, dtype=torch.float32).view(8, 3, 8, 8)
    y = torch.arange(8)
    mixed, own_labels, partner_labels, own = cutmix(x, y, torch.Generator().manual_seed(1))
    changed = (mixed != x).any(1).float().mean(dim=(1, 2))
    partner_differs = own_labels != partner_labels
    assert partner_differs.any() and own < 1.0  # the draw pastes a box from other images
    assert torch.allclose(changed[partner_differs], torch.tensor(1 - own).expand(int(partner_differs.sum())),
                          atol=1e-6)
    assert (changed[~partner_differs] == 0).all() and 0.0 <= own <= 1.0 and torch.equal(own_labels, y)