"""Long-tail profile, seeded splits, readers of every supported layout, counter randomness, DSA."""
import gzip
import math
import struct

import pytest
import torch
from PIL import Image

from data_lt import (DSA_OPS, DSA_ROTATE_DEG, DSA_SCALE, DSA_SLOTS, U_CROP_X, U_CROP_Y, U_ROTATE, U_SCALE_X,
                     U_SCALE_Y, UsageError, counter_uniform, draw_per_class, dsa_augment, dsa_uniforms_per_sample,
                     dsa_uniforms_siamese, load_long_tailed, long_tailed_counts, read_split, split_long_tailed)

# CIFAR-10-LT as in Cao et al. (LDAM) and the long-tailed distillation code
CIFAR10_LT = {
    10: [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500],
    100: [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50],
    200: [5000, 2775, 1540, 854, 474, 263, 146, 81, 45, 25],
}


@pytest.mark.parametrize("imbalance_factor", [10, 100, 200])
def test_cifar10_lt_counts(imbalance_factor):
    counts = long_tailed_counts(5000, 10, imbalance_factor)
    assert counts == CIFAR10_LT[imbalance_factor]
    assert counts[0] / counts[-1] == imbalance_factor


def test_counts_edge_cases():
    assert long_tailed_counts(500, 100, 1) == [500] * 100
    assert long_tailed_counts(7, 1, 50) == [7]
    assert sum(long_tailed_counts(500, 100, 100)) == 10847  # CIFAR-100-LT, IF 100
    with pytest.raises(UsageError, match="--imbalance-factor"):
        long_tailed_counts(5000, 10, 0.5)


def balanced_labels(classes=5, per_class=40):
    return torch.arange(classes).repeat(per_class)  # interleaved, as a real split would be


def test_split_is_seeded_disjoint_and_follows_the_counts():
    labels = balanced_labels()
    counts = long_tailed_counts(38, 5, 10)
    train, val = split_long_tailed(labels, counts, val_per_class=2, seed=3)
    assert torch.bincount(labels[train], minlength=5).tolist() == counts
    assert torch.bincount(labels[val], minlength=5).tolist() == [2] * 5
    assert not set(train.tolist()) & set(val.tolist())
    again = split_long_tailed(labels, counts, 2, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    other = split_long_tailed(labels, counts, 2, seed=4)
    assert not torch.equal(train, other[0])
    # the validation images do not depend on the imbalance factor: the same seed gives the same ones
    assert torch.equal(val, split_long_tailed(labels, long_tailed_counts(38, 5, 2), 2, seed=3)[1])


def test_draw_per_class_without_and_with_repeats():
    labels = torch.tensor([0] * 9 + [1] * 3 + [2] * 6)
    index, repeat = draw_per_class(labels, 5, 3, seed=0)
    assert torch.equal(labels[index], torch.arange(3).repeat_interleave(5))
    # class 1 has 3 images: all 3 appear, slots 3 and 4 repeat them
    class1 = index[5:10]
    assert set(class1[:3].tolist()) == {9, 10, 11} and torch.equal(class1[3:], class1[:2])
    assert repeat.tolist() == [False] * 8 + [True] * 2 + [False] * 5
    assert len(set(index[:5].tolist())) == 5  # no repeats where there are enough images
    with pytest.raises(UsageError, match="no training images"):
        draw_per_class(torch.tensor([0, 0, 2]), 1, 3, seed=0)


def test_counter_uniform_is_a_function_of_its_keys():
    keys = torch.arange(200_000)
    u = counter_uniform(5, 1, keys)
    assert torch.equal(u, counter_uniform(5, 1, keys))
    assert torch.equal(u[1234], counter_uniform(5, 1, 1234))  # same value alone or in a batch
    assert (u >= 0).all() and (u < 1).all() and u.dtype == torch.float32
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    histogram = torch.histc(u, bins=20, min=0, max=1)
    assert (histogram - 10_000).abs().max() < 500  # ~5 sigma of a binomial(200k, 1/20)
    assert not torch.equal(u, counter_uniform(6, 1, keys)) and not torch.equal(u, counter_uniform(5, 2, keys))
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 0.01  # neighbours uncorrelated


# ------------------------------------------------------------------------------------------
# readers

def write_folder(root, sizes, per_class=(4, 3, 2)):
    for split, factor in (("train", 1), ("test", 2)):
        for c, name in enumerate(["ant", "bee", "cat"]):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class[c] * factor):
                size = sizes[(c + i) % len(sizes)]
                Image.new("RGB", (size, size), (40 * c + i,) * 3).save(root / split / name / f"{i:03d}.png")


def test_image_folder_reader(tmp_path):
    write_folder(tmp_path, sizes=[20])
    images, labels, names = read_split("folder", str(tmp_path), train=True)
    assert names == ["ant", "bee", "cat"] and images.dtype == torch.uint8
    assert images.shape == (9, 3, 20, 20) and torch.bincount(labels).tolist() == [4, 3, 2]
    assert images[labels == 1][0, 0, 0, 0] == 40  # first bee image, value 40 * 1 + 0
    resized, _, _ = read_split("folder", str(tmp_path), train=False, image_size=8)
    assert resized.shape == (18, 3, 8, 8)


def test_image_folder_with_mixed_sizes_needs_image_size(tmp_path):
    write_folder(tmp_path, sizes=[20, 24])
    with pytest.raises(UsageError, match="--image-size"):
        read_split("folder", str(tmp_path), train=True)
    assert read_split("folder", str(tmp_path), train=True, image_size=16)[0].shape[-1] == 16


def test_load_long_tailed_from_a_folder(tmp_path):
    write_folder(tmp_path, sizes=[12], per_class=(8, 8, 8))
    data = load_long_tailed("folder", str(tmp_path), imbalance_factor=4, seed=0, val_per_class=1, log=lambda m: None)
    assert data.class_counts == [7, 4, 2]  # profile 8, 4, 2; the head gives one image to validation
    assert torch.bincount(data.val_labels).tolist() == [1, 1, 1]
    assert torch.bincount(data.test_labels).tolist() == [16, 16, 16]  # the test split stays whole and balanced
    assert len(data.mean) == 3 and all(s > 0 for s in data.std)


def test_a_profile_without_tail_images_names_the_option_that_empties_it(tmp_path):
    """Each way of leaving a class without training images is reported against the option that does it."""
    write_folder(tmp_path, sizes=[12], per_class=(8, 8, 8))
    with pytest.raises(UsageError, match=r"--imbalance-factor 9: the tail class would get 8 / 9 < 1 images"):
        load_long_tailed("folder", str(tmp_path), imbalance_factor=9, seed=0, val_per_class=0, log=lambda m: None)
    with pytest.raises(UsageError, match=r"--imbalance-factor 10: .*--n-max"):
        load_long_tailed("folder", str(tmp_path), imbalance_factor=10, seed=0, val_per_class=0, n_max=6,
                         log=lambda m: None)
    with pytest.raises(UsageError, match=r"--val-per-class 8 leaves class 'ant' without training images"):
        load_long_tailed("folder", str(tmp_path), imbalance_factor=4, seed=0, val_per_class=8, log=lambda m: None)
    empty = tmp_path / "empty-class"
    write_folder(empty, sizes=[12], per_class=(8, 8, 0))  # cat/ holds no image: no --val-per-class helps
    with pytest.raises(UsageError, match=r"--data-dir: class 'cat' has no training images"):
        load_long_tailed("folder", str(empty), imbalance_factor=4, seed=0, val_per_class=1, log=lambda m: None)


def test_a_test_split_must_number_its_classes_as_training_does(tmp_path):
    """Labels are class-folder positions: a class missing from test/ would shift every later label, and a class
    without test images would score 0 in every third."""
    write_folder(tmp_path, sizes=[12], per_class=(8, 8, 8))
    (tmp_path / "test" / "ant").rename(tmp_path / "ant-elsewhere")
    with pytest.raises(UsageError, match=r"--data-dir: the test split's classes differ .*\['ant'\]"):
        load_long_tailed("folder", str(tmp_path), imbalance_factor=4, log=lambda m: None)
    (tmp_path / "test" / "ant").mkdir()
    with pytest.raises(UsageError, match=r"--data-dir: class 'ant' has no test images; put its test images in"):
        load_long_tailed("folder", str(tmp_path), imbalance_factor=4, log=lambda m: None)


def test_the_records_say_whether_cifar_came_from_torchvision_or_a_copy(tmp_path):
    """results.json names the data's source: a CIFAR image-folder copy (the JPEG one, say) is not CIFAR's files."""
    from data_lt import data_source
    write_folder(tmp_path, sizes=[8])
    copy = f"image-folder copy of cifar10 in {tmp_path} (not torchvision's files)"
    assert data_source("cifar10", str(tmp_path)) == copy
    assert data_source("cifar10", None) == "torchvision's cifar10 files in data"
    assert data_source("cifar100", str(tmp_path / "train")) == f"torchvision's cifar100 files in {tmp_path / 'train'}"
    data = load_long_tailed("folder", str(tmp_path), imbalance_factor=2, log=lambda m: None)
    assert data.source == f"image folder {tmp_path}"


def test_the_decoded_folder_cache_sees_an_image_moved_to_another_class(tmp_path):
    """A file moved between class folders keeps its size and change time; the cache must not serve the old
    labels."""
    write_folder(tmp_path, sizes=[8])
    _, before, _ = read_split("folder", str(tmp_path), train=True)
    (tmp_path / "train" / "ant" / "000.png").rename(tmp_path / "train" / "bee" / "moved.png")
    _, after, _ = read_split("folder", str(tmp_path), train=True)
    assert torch.bincount(before).tolist() == [4, 3, 2] and torch.bincount(after).tolist() == [3, 4, 2]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_an_imbalance_factor_must_be_a_finite_number(value):
    import argparse
    from data_lt import add_data_arguments, finite_float
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--imbalance-factor", value])
    with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number"):
        finite_float(value)
    with pytest.raises(UsageError, match="--imbalance-factor must be a number >= 1"):
        load_long_tailed("folder", None, imbalance_factor=float(value))


def write_idx(path, array: torch.Tensor):
    header = b"\x00\x00\x08" + bytes([array.dim()]) + b"".join(struct.pack(">I", s) for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def test_fashion_mnist_idx_reader(tmp_path):
    images = torch.randint(0, 256, (30, 28, 28), dtype=torch.uint8)
    labels = torch.arange(10).repeat(3).to(torch.uint8)
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    got, got_labels, names = read_split("fashion-mnist", str(tmp_path), train=True)
    assert got.shape == (30, 1, 28, 28) and torch.equal(got[:, 0], images)
    assert torch.equal(got_labels, labels.long()) and len(names) == 10


def test_reader_errors_name_the_option(tmp_path):
    with pytest.raises(UsageError, match="--dataset"):
        read_split("imagenet", None, True)
    with pytest.raises(UsageError, match="--data-dir.*does not exist"):
        read_split("cifar10", str(tmp_path / "nowhere"), True)
    with pytest.raises(UsageError, match="--data-dir"):
        read_split("folder", str(tmp_path), True)
    with pytest.raises(UsageError, match="--data-dir"):
        read_split("cifar10", str(tmp_path), True)  # an empty folder is no CIFAR copy (and nothing is downloaded)
    write_folder(tmp_path, sizes=[8])
    with pytest.raises(UsageError, match="--dataset folder"):
        read_split("cifar10", str(tmp_path), True)  # an image folder whose classes are not CIFAR-10's


def test_real_cifar10_lt(cifar10_dir):
    data = load_long_tailed("cifar10", str(cifar10_dir), imbalance_factor=200, seed=0, log=lambda m: None)
    assert data.class_counts == CIFAR10_LT[200]
    assert data.class_names[0] == "airplane" and data.class_names[-1] == "truck"
    assert torch.bincount(data.train_labels).tolist() == CIFAR10_LT[200]
    assert torch.bincount(data.test_labels).tolist() == [1000] * 10
    assert data.train_images.shape[1:] == (3, 32, 32) and data.train_images.dtype == torch.uint8
    x = data.normalise(data.test_images[::10])
    # the field's CIFAR-10 std constants are per-image averages, smaller than the pixel std (0.247 / 0.2023)
    assert abs(x.mean()) < 0.05 and abs(x.std() - 1.22) < 0.05
    assert torch.allclose(data.denormalise(x) * 255, data.test_images[::10].float(), atol=1e-3)


# ------------------------------------------------------------------------------------------
# DSA

def op_row(op, **params):
    """A row of uniforms selecting `op`, with the given slots set."""
    u = torch.full((1, DSA_SLOTS), 0.5)
    u[0, 0] = (DSA_OPS.index(op) + 0.5) / len(DSA_OPS)
    for slot, value in params.items():
        u[0, int(slot[1:])] = value
    return u


def images(n=3, size=16, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_dsa_flip_and_crop_are_exact():
    x = images()
    flipped = dsa_augment(x, op_row("flip", s8=0.1).expand(3, -1))
    assert torch.allclose(flipped, x.flip(3), atol=1e-5)
    kept = dsa_augment(x, op_row("flip", s8=0.9).expand(3, -1))
    assert torch.equal(kept, x)
    # crop: u = 0 gives the largest shift, -2 pixels at 16 px (pad 0.125): out[i, j] = x[i - 2, j - 2]
    shifted = dsa_augment(x, op_row("crop", s4=0.0, s5=0.0).expand(3, -1))
    expected = torch.zeros_like(x)
    expected[:, :, 2:, 2:] = x[:, :, :-2, :-2]
    assert torch.allclose(shifted, expected, atol=1e-5)


def test_dsa_cutout_and_color():
    x = images() + 10  # no pixel is zero by chance
    cut = dsa_augment(x, op_row("cutout", s6=0.5, s7=0.5).expand(3, -1))
    zeroed = (cut == 0).all(1)  # (N, H, W)
    assert (zeroed.sum((1, 2)) == 8 * 8).all()  # half the side of a 16-px image
    assert torch.equal(cut[~zeroed.unsqueeze(1).expand_as(cut)], x[~zeroed.unsqueeze(1).expand_as(x)])
    # colour with neutral draws (brightness 1/2, saturation 1/2 -> x1, contrast 1/2 -> x1) changes nothing
    neutral = dsa_augment(x, op_row("color", s1=0.5, s2=0.5, s3=0.5).expand(3, -1))
    assert torch.allclose(neutral, x, atol=1e-5)
    brighter = dsa_augment(x, op_row("color", s1=0.9, s2=0.5, s3=0.5).expand(3, -1))
    assert torch.allclose(brighter, x + 0.4, atol=1e-5)


def test_dsa_is_siamese_between_real_and_synthetic_batches():
    """The real and the synthetic image at the same class and position get the same transformation."""
    real, syn = images(6, seed=1), images(4, seed=2)
    real_labels, real_pos = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 1, 2, 0, 1, 2])
    syn_labels, syn_pos = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    syn[:2], syn[2:] = real[:2], real[3:5]  # synthetic = the real images at the same slots
    for step in range(20):
        out_real = dsa_augment(real, dsa_uniforms_siamese(7, step, real_labels, real_pos))
        out_syn = dsa_augment(syn, dsa_uniforms_siamese(7, step, syn_labels, syn_pos))
        assert torch.equal(out_real[[0, 1, 3, 4]], out_syn)
    u = dsa_uniforms_siamese(7, 0, real_labels, real_pos)
    assert torch.equal(u[:3, 0], u[0, 0].expand(3)) and not torch.equal(u[0, 1:], u[1, 1:])


def test_dsa_draws_every_op_and_passes_gradients():
    x = images(64).requires_grad_(True)
    u = dsa_uniforms_per_sample(64, torch.Generator().manual_seed(0))
    assert (u[:, 0] == u[0, 0]).all()  # one operation per minibatch, as the DSA code
    ops = set()
    for step in range(200):
        u = dsa_uniforms_siamese(0, step, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        ops.add(int(u[0, 0] * len(DSA_OPS)))
    assert ops == set(range(len(DSA_OPS)))
    out = dsa_augment(x, dsa_uniforms_siamese(0, 3, torch.arange(64) % 4, torch.arange(64) // 4))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_dsa_batch_equals_each_sample_alone():
    """Each operation runs on its own samples only: a mixed batch gives every sample what it gets alone,
    and its gradient."""
    x = images(48, seed=3).requires_grad_(True)
    u = torch.rand(48, DSA_SLOTS, generator=torch.Generator().manual_seed(4))
    u[:, 0] = (torch.arange(48) % len(DSA_OPS) + 0.5) / len(DSA_OPS)  # every operation, interleaved
    batched = dsa_augment(x, u)
    alone = torch.cat([dsa_augment(x[i:i + 1], u[i:i + 1]) for i in range(48)])
    assert torch.allclose(batched, alone, atol=1e-6)
    weights = torch.randn(batched.shape, generator=torch.Generator().manual_seed(5))
    grad_batched, = torch.autograd.grad((batched * weights).sum(), x)
    grad_alone, = torch.autograd.grad((alone * weights).sum(), x)
    assert torch.allclose(grad_batched, grad_alone, atol=1e-6)


# geometry of scale and rotate: an image is a function on the plane, centred on the image centre
# ((W - 1) / 2 in pixel indices), y pointing down

def slots_row(op, slots):
    """op_row with slots given by their U_* index: {U_ROTATE: 1.0}."""
    return op_row(op, **{f"s{slot}": value for slot, value in slots.items()})


def blob(x0, y0, size=32, sigma=1.5):
    """A Gaussian spot centred at pixel coordinates (x0, y0), in every channel."""
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    return torch.exp(-((xs - x0) ** 2 + (ys - y0) ** 2) / (2 * sigma ** 2)).expand(1, 3, size, size).clone()


def centroid(x):
    """(x, y) centre of mass of the first channel, in pixel coordinates."""
    w = x[0, 0]
    ys, xs = torch.meshgrid(torch.arange(w.shape[0]).float(), torch.arange(w.shape[1]).float(), indexing="ij")
    return ((w * xs).sum() / w.sum()).item(), ((w * ys).sum() / w.sum()).item()


def smooth_image(size=32, seed=0):
    coarse = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


CENTRE, DX, DY = 15.5, 7.0, -4.0  # the centre of a 32-px image, and the spot's offset from it


@pytest.mark.parametrize("u, degrees", [(1.0, DSA_ROTATE_DEG), (0.0, -DSA_ROTATE_DEG)])
def test_dsa_rotate_turns_by_the_largest_angle_at_the_ends(u, degrees):
    """U_ROTATE = 1 turns the picture by +15 degrees, counter-clockwise on screen (torchvision's sense),
    U_ROTATE = 0 by -15: a spot at offset (dx, dy) from the centre lands at R(-angle) (dx, dy), y down."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode
    x = smooth_image()
    rotated = dsa_augment(x, slots_row("rotate", {U_ROTATE: u}))
    assert torch.allclose(rotated, TF.rotate(x, degrees, interpolation=InterpolationMode.BILINEAR), atol=1e-5)
    moved = centroid(dsa_augment(blob(CENTRE + DX, CENTRE + DY), slots_row("rotate", {U_ROTATE: u})))
    a = math.radians(degrees)
    expected = (CENTRE + math.cos(a) * DX + math.sin(a) * DY, CENTRE - math.sin(a) * DX + math.cos(a) * DY)
    assert moved == pytest.approx(expected, abs=0.05)  # the other sense lands ~2 px away


def test_dsa_scale_divides_offsets_by_the_drawn_factor():
    """The scale factor s multiplies the sampling grid: the picture shrinks by s along its axis.
    U_SCALE = 1 gives s = DSA_SCALE (shrink by 1.2), U_SCALE = 0 gives s = 1 / DSA_SCALE (grow by 1.2)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode
    scaled = dsa_augment(blob(CENTRE + DX, CENTRE + DY), slots_row("scale", {U_SCALE_X: 1.0, U_SCALE_Y: 0.0}))
    assert centroid(scaled) == pytest.approx((CENTRE + DX / DSA_SCALE, CENTRE + DY * DSA_SCALE), abs=0.05)
    # both axes at 1: torchvision's affine zoom by 1 / 1.2 about the centre
    x = smooth_image(seed=1)
    both = dsa_augment(x, slots_row("scale", {U_SCALE_X: 1.0, U_SCALE_Y: 1.0}))
    zoomed = TF.affine(x, angle=0.0, translate=[0, 0], scale=1 / DSA_SCALE, shear=[0.0, 0.0],
                       interpolation=InterpolationMode.BILINEAR)
    assert torch.allclose(both, zoomed, atol=1e-5)


def test_dsa_identity_draws():
    """Where a draw of 1/2 is the neutral value (rotate: angle 0, crop: shift 0) the operation is the
    identity. Scale is linear in u from 1/1.2 to 1.2, as in DSA's code, so u = 1/2 gives 1.0167 and the
    identity is at u = (1 - 1/1.2) / (1.2 - 1/1.2) = 5/11."""
    x = smooth_image(seed=2)
    assert torch.allclose(dsa_augment(x, slots_row("rotate", {U_ROTATE: 0.5})), x, atol=1e-5)
    assert torch.allclose(dsa_augment(x, slots_row("crop", {U_CROP_Y: 0.5, U_CROP_X: 0.5})), x, atol=1e-5)
    neutral = (1 - 1 / DSA_SCALE) / (DSA_SCALE - 1 / DSA_SCALE)
    assert torch.allclose(dsa_augment(x, slots_row("scale", {U_SCALE_X: neutral, U_SCALE_Y: neutral})), x, atol=1e-5)
    factor = 0.5 * (DSA_SCALE - 1 / DSA_SCALE) + 1 / DSA_SCALE
    assert factor == pytest.approx(1.0167, abs=1e-4)
    half = dsa_augment(blob(CENTRE + 9.0, CENTRE), slots_row("scale", {U_SCALE_X: 0.5, U_SCALE_Y: 0.5}))
    assert centroid(half)[0] == pytest.approx(CENTRE + 9.0 / factor, abs=0.05)  # 0.15 px short of 9


def test_the_data_seed_draws_the_subset_apart_from_the_run_seed(tmp_path):
    """--data-seed N draws the subset and validation split that --seed N draws; without it --seed does; a record
    from before --data-seed compares equal to one that names its --seed as data seed, and a differing one is
    reported under the option's name."""
    import argparse
    from data_lt import data_seed, load_from_args
    from distill_runs import ADDED_OPTIONS, option_differences
    write_folder(tmp_path, sizes=[12], per_class=(8, 8, 8))
    common = dict(dataset="folder", data_dir=str(tmp_path), imbalance_factor=4, val_per_class=1, n_max=None,
                  image_size=None)
    apart = load_from_args(argparse.Namespace(seed=0, data_seed=3, **common), log=lambda m: None)
    same = load_long_tailed("folder", str(tmp_path), 4, seed=3, val_per_class=1, log=lambda m: None)
    other = load_long_tailed("folder", str(tmp_path), 4, seed=0, val_per_class=1, log=lambda m: None)
    assert torch.equal(apart.train_images, same.train_images) and torch.equal(apart.val_images, same.val_images)
    assert not torch.equal(apart.train_images, other.train_images)
    assert data_seed(argparse.Namespace(seed=5, data_seed=None)) == 5
    assert option_differences({"seed": 2}, ADDED_OPTIONS | {"seed": 2, "data_seed": 2}, "checkpoint") == []
    assert option_differences({"seed": 2}, ADDED_OPTIONS | {"seed": 2, "data_seed": 4}, "checkpoint") == [
        "--data-seed 2 (checkpoint) vs 4 (now)"]
