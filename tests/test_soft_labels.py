"""evaluate.py --labels soft: the loss, what the teacher sees and labels, and the evaluation's records."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_data
from test_resume import Stopped, stop_after
from data_lt import LongTailedData
from networks import build_network, reset_parameters_
from training import PROTOCOLS, SoftTargets, drawn_batch, soft_label_loss, train_network


def test_kl_to_a_one_hot_teacher_at_temperature_1_is_the_cross_entropy():
    """T^2 KL(p || softmax(s / T)) with p one-hot and T = 1: the summed cross-entropy, value and gradient."""
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    soft_logits, hard_logits = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    soft = soft_label_loss(soft_logits, F.one_hot(labels, 5).double(), 1.0)
    hard = F.cross_entropy(hard_logits, labels, reduction="sum")
    soft.backward()
    hard.backward()
    assert soft.item() == pytest.approx(hard.item(), rel=1e-12)
    torch.testing.assert_close(soft_logits.grad, hard_logits.grad, rtol=1e-12, atol=1e-12)


def test_the_soft_label_loss_is_zero_where_the_network_agrees_with_the_teacher_at_any_temperature():
    teacher_logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for temperature in (1.0, 4.0, 20.0):
        probs = F.softmax(teacher_logits / temperature, 1)
        assert soft_label_loss(teacher_logits, probs, temperature).item() == pytest.approx(0.0, abs=1e-12)
        assert soft_label_loss(teacher_logits.flip(1), probs, temperature).item() > 0


def test_the_teacher_labels_the_augmented_cutmixed_batch_not_the_clean_one(tiny_data):
    """Under NCFM's protocol (DiffAug and CutMix), what the teacher is asked about is the batch as drawn: the
    images a replay of the generator's draws produces, not the clean images of the batch."""
    images, labels = tiny_data.normalise(tiny_data.train_images), tiny_data.train_labels
    protocol = PROTOCOLS["ncfm"]
    seen = []

    def teacher_logits(x):
        seen.append(x.clone())
        return torch.zeros(len(x), tiny_data.num_classes)

    net = reset_parameters_(build_network("convnet", 3, tiny_data.num_classes, 16, 8, 2), torch.Generator().manual_seed(0))
    train_network(net, images, labels, torch.Generator().manual_seed(5), protocol, epochs=2,
                  soft_targets=SoftTargets(teacher_logits, 4.0))
    replay, asked = torch.Generator().manual_seed(5), []
    for _ in range(2):
        for batch in torch.randperm(len(labels), generator=replay).split(protocol.batch_size):
            drawn = drawn_batch(images[batch], labels[batch], protocol, replay)
            asked.append(drawn[0])
            assert not torch.allclose(drawn[0], images[batch])
    torch.testing.assert_close(torch.cat(seen), torch.cat(asked), rtol=0, atol=0)


def two_class_constant_data(counts=(90, 10)) -> LongTailedData:
    """Two classes whose images are all the same grey: nothing tells them apart but the prior."""
    n = sum(counts)
    grey = torch.full((n, 3, 8, 8), 128, dtype=torch.uint8)
    labels = torch.arange(2).repeat_interleave(torch.tensor(counts))
    return LongTailedData(name="grey", class_names=["head", "tail"], class_counts=list(counts), mean=(0.5,) * 3,
                          std=(0.25,) * 3, train_images=grey, train_labels=labels, val_images=grey[:0],
                          val_labels=labels[:0], test_images=grey[:4], test_labels=torch.tensor([0, 0, 1, 1]))


@pytest.mark.parametrize("loss, head_share", [("balanced", 0.5), ("ce", 0.9)])
def test_soft_labels_come_from_the_balanced_teachers_prior_free_logits(loss, head_share, tmp_path):
    """Where images say nothing, a teacher's soft label is its prior: the plain one learns the training prior
    (0.9 / 0.1), the logit-adjusted one (trained on f + log pi) balanced logits f, which are what it labels
    with (0.5 / 0.5), not f + log pi."""
    from teacher import load_or_train_teacher, soft_targets
    data = two_class_constant_data()
    net, record = load_or_train_teacher(tmp_path, data, loss, 60, 0, torch.device("cpu"), "fp32", False,
                                        log=lambda message: None)
    probs = soft_targets(net, 1.0, "fp32", False).probabilities(data.normalise(data.train_images[:3]))
    assert probs[:, 0].tolist() == pytest.approx([head_share] * 3, abs=0.05)
    assert record["loss"] == loss and record["epochs"] == 60


def test_the_teacher_trains_on_the_training_split_alone_and_is_cached(tiny_data, monkeypatch, tmp_path):
    """The teacher's training images are the long-tailed training split's, none of validation or test; a
    second call reads the cached file (weights_only) instead of training again; another loss is another file."""
    import teacher
    trained_on, real = [], teacher.train_network

    def recording(net, images, labels, *args, **kwargs):
        trained_on.append((images.clone(), labels.clone()))
        return real(net, images, labels, *args, **kwargs)
    monkeypatch.setattr(teacher, "train_network", recording)
    device = torch.device("cpu")
    first, record = teacher.load_or_train_teacher(tmp_path, tiny_data, "balanced", 2, 0, device, "fp32", False,
                                                  log=lambda message: None)
    (images, labels), = trained_on
    torch.testing.assert_close(images, tiny_data.normalise(tiny_data.train_images), rtol=0, atol=0)
    assert torch.equal(labels, tiny_data.train_labels)
    for split in (tiny_data.val_images, tiny_data.test_images):
        flat = tiny_data.normalise(split).flatten(1)
        assert not (torch.cdist(flat, images.flatten(1)) == 0).any()
    again, cached = teacher.load_or_train_teacher(tmp_path, tiny_data, "balanced", 2, 0, device, "fp32", False,
                                                  log=lambda message: None)
    assert len(trained_on) == 1 and cached == record
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    teacher.load_or_train_teacher(tmp_path, tiny_data, "ce", 2, 0, device, "fp32", False, log=lambda message: None)
    assert len(trained_on) == 2 and len(list(tmp_path.glob("teacher-*.pt"))) == 2
    assert set(record) >= {"test_acc", "per_class", "head", "medium", "tail", "seconds", "environment"}


# ------------------------------------------------------------------------------------------
# evaluate.py --labels soft

def soft_argv(out, teachers, *extra):
    return ["--baseline", "random", "--ipc", "2", "--factor", "1", "--num-eval", "3", "--epochs", "3",
            "--device", "cpu", "--precision", "fp32", "--out", str(out), "--labels", "soft",
            "--teacher-epochs", "2", "--teacher-cache", str(teachers), *map(str, extra)]


@pytest.fixture
def tiny_soft(monkeypatch):
    import evaluate
    monkeypatch.setattr(evaluate, "load_long_tailed", lambda *a, **k: make_tiny_data(size=16, test_per_class=3))
    return evaluate


def stopped(evaluate, monkeypatch, argv, networks: int) -> None:
    """evaluate.main(argv) stopped as it starts network `networks` + 1 (test_resume's stop between sittings)."""
    with monkeypatch.context() as patch:
        stop_after(patch, evaluate, networks)
        with pytest.raises(Stopped):
            evaluate.main(argv)


def test_a_soft_label_evaluation_resumes_network_by_network_to_the_uninterrupted_result(tiny_soft, monkeypatch,
                                                                                       tmp_path):
    evaluate, teachers = tiny_soft, tmp_path / "teachers"
    evaluate.main(soft_argv(tmp_path / "straight", teachers))
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert straight["labels"] == "soft" and straight["temperature"] == evaluate.SOFT_DEFAULTS["temperature"]
    assert straight["data_seed"] == 0 and straight["teacher"]["seed"] == 0
    assert straight["teacher"]["loss"] == "balanced" and "test_acc" in straight["teacher"]
    assert straight["fingerprint"]["teacher"].startswith("teacher-")

    out = tmp_path / "stopped"
    stopped(evaluate, monkeypatch, soft_argv(out, teachers), networks=2)
    evaluate.main(soft_argv(out, teachers, "--resume"))
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["accs"] == straight["accs"] and resumed["per_class"] == straight["per_class"]
    assert [s["networks"] for s in resumed["sittings"]] == [[0, 1], [2]]


def test_soft_labels_train_other_networks_than_hard_ones_and_resume_tells_them_apart(tiny_soft, tmp_path, capsys):
    """The soft-label networks differ from the hard-label ones of the same draws, and a hard-label --resume of
    a soft-label evaluation's kept networks is refused, naming the option."""
    evaluate, teachers = tiny_soft, tmp_path / "teachers"
    hard_argv = soft_argv(tmp_path / "hard", teachers)[:-6]
    evaluate.main(hard_argv)
    evaluate.main(soft_argv(tmp_path / "soft", teachers, "--temperature", "1"))
    hard = json.loads((tmp_path / "hard" / "results.json").read_text())
    soft = json.loads((tmp_path / "soft" / "results.json").read_text())
    assert "labels" not in hard["fingerprint"] and hard["labels"] == "hard"
    assert soft["per_class"] != hard["per_class"] or soft["accs"] != hard["accs"]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(hard_argv[:-2] + ["--out", str(tmp_path / "soft"), "--resume"])
    assert exit_info.value.code == 2 and "other options" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "2"], "--temperature goes with --labels soft"),
    (["--teacher-loss", "ce"], "--teacher-loss goes with --labels soft"),
    (["--labels", "soft", "--temperature", "0"], "--temperature"),
])
def test_teacher_options_without_soft_labels_are_refused_in_one_line(extra, message, tmp_path, capsys):
    import evaluate
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--baseline", "random", "--device", "cpu", "--out", str(tmp_path / "x"), *extra])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_networks_kept_under_one_teacher_are_not_continued_under_another(tiny_soft, monkeypatch, tmp_path, capsys):
    """The fingerprint holds the teacher's weights' SHA-256: a teacher file replaced between sittings (trained
    again elsewhere, say) makes --resume refuse the kept networks in one line, training nothing."""
    evaluate, teachers = tiny_soft, tmp_path / "teachers"
    out = tmp_path / "stopped"
    stopped(evaluate, monkeypatch, soft_argv(out, teachers), networks=1)
    path, = teachers.glob("teacher-*.pt")
    saved = torch.load(path, weights_only=True)
    first = next(iter(saved["state_dict"]))
    saved["state_dict"][first] = saved["state_dict"][first] + 1e-3
    torch.save(saved, path)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(soft_argv(out, teachers, "--resume"))
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "other options" in error and "teacher-sha256" in error
    assert len(error.splitlines()) == 1 and sorted(p.name for p in (out / "evaluation.partial").iterdir()) == [
        "network-0.json"]
    path.write_bytes(b"not a teacher")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(soft_argv(tmp_path / "other", teachers))
    assert exit_info.value.code == 2 and "delete it to train the teacher again" in capsys.readouterr().err
