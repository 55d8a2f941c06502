"""The distillation loop on a tiny in-memory set: determinism, initialisation, real batches, outputs."""
import json

import pytest
import torch

from conftest import make_tiny_data, run_distill
from data_lt import RealBatchSampler, decode, initial_synthetic
from distill import Extractor, Matcher, Shard, build_parser, chunk_classes, class_aware, draw_frequencies, resolve
from distill_runs import write_outputs
from pool import pool_file
from runs import Processes
from sdd import class_weights


def tiny_args(out, *extra):
    return build_parser().parse_args(["--ipc", "3", "--iterations", "3", "--batch-real", "4", "--num-freqs", "16",
                                      "--width", "8", "--log-every", "100", "--device", "cpu", "--out", str(out),
                                      *extra])


@pytest.mark.parametrize("method", ["csdm", "sdm", "ncfm", "mmd", "dm"])
def test_same_seed_same_synthetic_set(method, tiny_data, tmp_path):
    first = run_distill(tiny_args(tmp_path, "--method", method), tiny_data, torch.device("cpu"), log=lambda m: None)
    second = run_distill(tiny_args(tmp_path, "--method", method), tiny_data, torch.device("cpu"), log=lambda m: None)
    assert torch.equal(first["images"], second["images"])
    assert not torch.equal(first["images"], first["init_images"])  # the images moved (downhill: the test below)
    other = run_distill(tiny_args(tmp_path, "--method", method, "--seed", "1"), tiny_data, torch.device("cpu"),
                        log=lambda m: None)
    assert not torch.equal(first["images"], other["images"])
    assert [h[0] for h in first["history"]] == [0, 1, 2]


def iteration_loss(args, data, packed, iteration=0):
    """The matching loss of stored images `packed` in `iteration`: that iteration's extractor, frequencies,
    real batch and DSA draws, through distill.py's own Matcher."""
    device = torch.device("cpu")
    run = resolve(args, data)
    _, labels = initial_synthetic(data, args.ipc, args.seed, args.factor)
    shard = Shard.of(Processes(), labels, data.num_classes, args.ipc, args.factor ** 2, device)
    extractor = Extractor(run, data, device, Processes(), log=lambda m: None)
    alpha = (class_weights(data.class_counts, args.alpha_head, args.alpha_tail) if class_aware(args)
             else torch.full((data.num_classes,), 0.5))
    extractor.draw(iteration)
    freqs = draw_frequencies(run, iteration, extractor.feature_dim, device)
    syn = packed.clone().requires_grad_(True)
    return Matcher(run, data, shard, alpha, device).backward(syn, iteration, extractor, freqs).item()


@pytest.mark.parametrize("method", ["csdm", "sdm", "ncfm", "mmd", "dm"])
def test_a_step_moves_the_pixels_downhill(method, tiny_data, tmp_path):
    """One iteration with the method's default optimiser and learning rate lowers that iteration's loss
    (the same extractor, real batch, DSA draws and frequencies before and after the step)."""
    args = tiny_args(tmp_path, "--method", method, "--iterations", "1")
    result = run_distill(args, tiny_data, torch.device("cpu"), log=lambda m: None)
    before = iteration_loss(args, tiny_data, result["init_images"])
    after = iteration_loss(args, tiny_data, result["packed_images"])
    assert before == pytest.approx(result["history"][0][1], rel=1e-5)  # the loss the loop reported
    assert after < 0.9 * before  # 0.44 to 0.70 of it here; a step the wrong way doubles it


def test_initialisation_with_fewer_real_images_than_ipc():
    data = make_tiny_data(num_classes=3, n_max=8, imbalance_factor=4)  # counts 8, 4, 2
    images, labels = initial_synthetic(data, ipc=5, seed=0)
    assert torch.equal(labels, torch.arange(3).repeat_interleave(5))
    tail_real = data.normalise(data.train_images[data.train_labels == 2])
    tail = images[10:]
    # the tail class's two real images come first, as they are ...
    assert all(any(torch.equal(t, r) for r in tail_real) for t in tail[:2])
    # ... and the three further slots are transformed copies: no two synthetic images are equal
    flat = images.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(15) * 1e9).min() > 1e-3
    assert torch.equal(images, initial_synthetic(data, ipc=5, seed=0)[0])


def test_real_batches_cover_each_class_without_replacement():
    # labels in no particular order, as in a real training split
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)[torch.randperm(20, generator=torch.Generator().manual_seed(0))]
    sampler = RealBatchSampler(labels, 3, batch_real=5, seed=0)
    index, position = sampler.sample(0)
    assert torch.bincount(labels[index], minlength=3).tolist() == [5, 3, 5]  # class 1 gives all it has
    assert len(set(index.tolist())) == len(index)
    for c in range(3):
        assert sorted(position[labels[index] == c].tolist()) == list(range(min(5, int((labels == c).sum()))))
    assert torch.equal(index, sampler.sample(0)[0]) and not torch.equal(index, sampler.sample(1)[0])


def test_outputs_describe_the_run(tmp_path, tiny_data):
    result = run_distill(tiny_args(tmp_path, "--method", "csdm"), tiny_data, torch.device("cpu"), log=lambda m: None)
    write_outputs(result, tmp_path)
    synthetic = torch.load(tmp_path / "synthetic.pt", weights_only=True)
    # the default multi-formation factor 2: 3 stored images per class, each decoded to 4 training images
    assert synthetic["images"].dtype == torch.float32 and synthetic["images"].shape == (48, 3, 16, 16)
    assert synthetic["labels"].dtype == torch.int64
    assert synthetic["labels"].tolist() == [0] * 12 + [1] * 12 + [2] * 12 + [3] * 12
    assert synthetic["class_counts"] == tiny_data.class_counts and synthetic["class_names"] == tiny_data.class_names
    assert synthetic["mean"] == list(tiny_data.mean) and synthetic["config"]["method"] == "csdm"
    assert json.loads((tmp_path / "config.json").read_text())["ipc"] == 3
    assert len((tmp_path / "loss.csv").read_text().splitlines()) == 1 + 3
    from PIL import Image
    width, height = Image.open(tmp_path / "synthetic.png").size
    assert (width, height) == (1 + 3 * 17, 1 + 4 * 17)  # 3 stored images per row, one row per class, 1-px padding


def test_the_set_is_written_last(tmp_path, tiny_data, monkeypatch):
    """--resume takes a folder whose synthetic.pt is written for a finished run, so every other file must be
    in place before it; loss.csv keeps its CSV line ends."""
    import distill_runs
    present = []
    real_save = distill_runs.atomic_save
    monkeypatch.setattr(distill_runs, "atomic_save", lambda obj, path: (
        path.name == "synthetic.pt" and present.append(sorted(p.name for p in tmp_path.iterdir())),
        real_save(obj, path)))
    result = run_distill(tiny_args(tmp_path, "--method", "dm"), tiny_data, torch.device("cpu"), log=lambda m: None)
    write_outputs(result, tmp_path, run_info={"command": "distill.py"})
    assert len(present) == 1 and "synthetic.pt" not in present[0]
    assert {"config.json", "loss.csv", "run.json", "README.md", "synthetic.png", "init.png"} <= set(present[0])
    assert (tmp_path / "loss.csv").read_bytes().startswith(b"iteration,loss,seconds\r\n")


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_class_chunks_give_the_same_synthetic_set(norm, tiny_data, tmp_path):
    """Chunks of classes change nothing, with batch norm too (each class then goes through alone, as in DM's
    code, so its batch statistics are its own)."""
    whole = run_distill(tiny_args(tmp_path, "--bandwidth-rule", "median", "--norm", norm, "--class-chunk", "4"),
                        tiny_data, torch.device("cpu"), log=lambda m: None)
    chunked = run_distill(tiny_args(tmp_path, "--bandwidth-rule", "median", "--norm", norm, "--class-chunk", "1"),
                          tiny_data, torch.device("cpu"), log=lambda m: None)
    assert torch.allclose(whole["images"], chunked["images"], atol=1e-5)
    assert whole["history"][-1][1] == pytest.approx(chunked["history"][-1][1], rel=1e-5)


def test_default_class_chunk_bounds_the_images_alive_for_backward():
    # IPC 50 at factor 2 (200 decoded images per class), batch-real 256: 5 classes, 1000 synthetic images
    assert chunk_classes(256, 200) == 5
    assert chunk_classes(64, 40) == 25  # IPC 10, factor 2: the 1024-synthetic-image cap decides
    assert chunk_classes(1024, 10) == 3  # NCFM's batch-real 1024: the 4096-image cap decides
    assert chunk_classes(64, 5000) == 1  # never fewer than one class
    for batch_real in (16, 64, 256, 1024):
        for decoded in (1, 4, 40, 200, 800):
            classes = chunk_classes(batch_real, decoded)
            assert classes == 1 or (classes * decoded <= 1024 and classes * (batch_real + decoded) <= 4096)


def test_multi_formation(tiny_data, tmp_path):
    packed, labels = initial_synthetic(tiny_data, ipc=2, seed=0, factor=2)
    assert packed.shape == (8, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    tiles = decode(packed, 2)
    assert tiles.shape == (32, 3, 16, 16)
    # tile (0, 1) of the first image is the top-right 8 x 8 quarter, upsampled
    quarter = torch.nn.functional.interpolate(packed[:1, :, :8, 8:], size=(16, 16), mode="bilinear",
                                              align_corners=False)
    assert torch.allclose(tiles[1:2], quarter)
    result = run_distill(tiny_args(tmp_path, "--factor", "2", "--ipc", "2"), tiny_data, torch.device("cpu"),
                         log=lambda m: None)
    assert result["images"].shape == (32, 3, 16, 16)
    assert result["labels"].tolist() == [c for c in range(4) for _ in range(8)]
    assert result["packed_images"].shape == (8, 3, 16, 16)


def test_extractor_pool_is_trained_once_and_cached(tiny_data, tmp_path):
    lines = []
    args = tiny_args(tmp_path, "--extractor", "pool", "--pool-size", "2", "--pool-epochs", "1")
    first = run_distill(args, tiny_data, torch.device("cpu"), log=lines.append)
    assert any("training the extractor pool" in line for line in lines)
    lines.clear()
    second = run_distill(args, tiny_data, torch.device("cpu"), log=lines.append)
    assert not any("training" in line for line in lines)  # read from the cache
    assert torch.equal(first["images"], second["images"])
    plain = run_distill(tiny_args(tmp_path), tiny_data, torch.device("cpu"), log=lambda m: None)
    assert not torch.equal(first["images"], plain["images"])


@pytest.mark.parametrize("dataset", ["folder", "cifar10"])
def test_pool_cache_tells_data_sets_of_the_same_shape_apart(tmp_path, dataset):
    """Two data sets with the same name, classes, counts and image size but other pictures (two image-folder
    trees; CIFAR-10 from torchvision and its JPEG copy) get two cached pools; the same data the same one."""
    args = tiny_args(tmp_path, "--dataset", dataset, "--extractor", "pool")
    first, second = make_tiny_data(seed=0), make_tiny_data(seed=1)
    assert first.class_counts == second.class_counts and first.name == second.name
    same = make_tiny_data(seed=0)
    assert pool_file(resolve(args, first), first) != pool_file(resolve(args, second), second)
    assert pool_file(resolve(args, first), first) == pool_file(resolve(args, same), same)


def test_calibration_lowers_the_pool_classifiers_cross_entropy(tiny_data, tmp_path):
    """NCFM's calibration term: the trained pool networks classify the synthetic set better with it than without."""
    from networks import ConvNet
    pool_args = ("--extractor", "pool", "--pool-size", "2", "--pool-epochs", "1", "--method", "dm",
                 "--iterations", "8", "--factor", "1")
    plain = run_distill(tiny_args(tmp_path, *pool_args), tiny_data, torch.device("cpu"), log=lambda m: None)
    calibrated = run_distill(tiny_args(tmp_path, *pool_args, "--calibration", "10"), tiny_data, torch.device("cpu"),
                             log=lambda m: None)
    pool = torch.load(pool_file(resolve(tiny_args(tmp_path, *pool_args), tiny_data), tiny_data),
                      weights_only=True)["networks"]

    def cross_entropy(result):
        losses = []
        for network in pool:
            net = ConvNet(3, 4, width=8, image_size=16)
            net.load_state_dict(network["trained"])
            losses.append(torch.nn.functional.cross_entropy(net(result["images"]), result["labels"]))
        return torch.stack(losses).mean()

    assert cross_entropy(calibrated) < cross_entropy(plain) - 0.05
    # a class's term depends on its own images only: class chunks change nothing
    chunked = run_distill(tiny_args(tmp_path, *pool_args, "--calibration", "10", "--class-chunk", "1"), tiny_data,
                          torch.device("cpu"), log=lambda m: None)
    assert torch.allclose(calibrated["images"], chunked["images"], atol=1e-5)
