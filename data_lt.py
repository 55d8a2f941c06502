"""Long-tailed image data held in memory as tensors, plus the DSA augmentation.

$ python data_lt.py --dataset cifar10 --imbalance-factor 100            # download, print counts
$ python data_lt.py --dataset cifar10 --data-dir /data/cifar10 --imbalance-factor 200
$ python data_lt.py --dataset folder --data-dir /data/tiny-imagenet --image-size 64

Everything a job needs from the data lives here: the exponential long-tail
profile (Cao et al. 2019), a seeded per-class subset of the training split, a
balanced validation split carved from the images that subset leaves out, the
balanced test split, the normalisation constants, DSA augmentation (Zhao &
Bilen 2021) batched over samples, and what distillation and the `random`
baseline start from: the per-class draw of real images, the real
initialisation with multi-formation (`initial_synthetic`, `decode`) and the
real batch of each iteration (`RealBatchSampler`).

Images stay uint8 (N, C, H, W) in memory; `LongTailedData.normalise` turns a
gathered batch into float. Decoding a folder of JPEGs or reading IDX files is
done once and cached as a tensor file (see `cache_dir`).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

DATASETS = ("cifar10", "cifar100", "fashion-mnist", "folder")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# per-channel (mean, std) of the training split, as used by the DC/DSA/DM code
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
DEFAULT_DATA_DIR = "data"  # where torchvision downloads when --data-dir is not given
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# independent random streams of the counter-based generator (see counter_uniform)
STREAM_SUBSET, STREAM_INIT, STREAM_REAL_BATCH, STREAM_DSA = 1, 2, 3, 4


class UsageError(Exception):
    """A mistake in what the user asked for. The message names the option and the fix;
    the scripts print it as one line and exit with code 2."""


# ----------------------------------------------------------------------------------------
# Counter-based randomness: a value depends on its keys only, never on call order,
# so a class's draws are the same however classes are split across processes and
# whether a run was resumed or not.

_MASK32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (multiply-xorshift) on int64 tensors holding values < 2**32.
    The multiplier is below 2**27, so no product overflows int64."""
    h = ((h >> 16) ^ h) * 0x45D9F3B & _MASK32
    h = ((h >> 16) ^ h) * 0x45D9F3B & _MASK32
    return (h >> 16) ^ h


def counter_uniform(*keys, device=None) -> torch.Tensor:
    """Uniform [0, 1) float32 values indexed by integer keys (ints or int64 tensors,
    broadcast together): u = hash(k_1, ..., k_n) / 2**24. Same keys, same value."""
    h = torch.zeros((), dtype=torch.int64, device=device)
    for key in keys:
        key = torch.as_tensor(key, dtype=torch.int64, device=device) & _MASK32
        h = _mix32((h ^ (key + 0x9E3779B9 + ((h << 6) & _MASK32) + (h >> 2))) & _MASK32)
    return (h >> 8).to(torch.float32) / float(1 << 24)


def counter_seed(*keys) -> int:
    """A 48-bit integer seed for torch.Generator derived from integer keys (two 24-bit halves)."""
    high = int(counter_uniform(*keys, 0x5EED) * (1 << 24))
    low = int(counter_uniform(*keys, 0x5EEE) * (1 << 24))
    return (high << 24) | low


# ----------------------------------------------------------------------------------------
# The long-tail profile and the splits

def long_tailed_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """n_c = floor(n_max * IF^(-c / (C - 1))) for c = 0..C-1; class 0 is the head, IF = n_max / n_min.

    >>> long_tailed_counts(5000, 10, 200)
    [5000, 2775, 1540, 854, 474, 263, 146, 81, 45, 25]
    """
    if imbalance_factor < 1:
        raise UsageError(f"--imbalance-factor must be >= 1 (got {imbalance_factor}); 1 keeps the data balanced")
    if num_classes == 1:
        return [int(n_max)]
    exponents = [-c / (num_classes - 1) for c in range(num_classes)]
    # the 1e-9 guards against 24.999999... where the profile lands on an integer
    return [int(math.floor(n_max * imbalance_factor ** e + 1e-9)) for e in exponents]


def split_long_tailed(labels: torch.Tensor, counts: list[int], val_per_class: int, seed: int):
    """Seeded, disjoint per-class split of a balanced training split.

    Each class's images are put in a random order fixed by `seed`; the first
    `val_per_class` form the (balanced) validation split, the next counts[c]
    the long-tailed training subset. Returns (train_index, val_index), sorted.
    Only a class with fewer than val_per_class + counts[c] images (the head
    class when n_max is all its images) gives up training images; the caller
    reports it.
    """
    keys = counter_uniform(seed, STREAM_SUBSET, torch.arange(len(labels)))
    order = torch.argsort(labels.double() + keys.double(), stable=True)  # by class, then random
    sorted_labels = labels[order]
    class_sizes = torch.bincount(labels, minlength=len(counts))
    starts = torch.cumsum(class_sizes, 0) - class_sizes
    rank_in_class = torch.arange(len(labels)) - starts[sorted_labels]
    wanted = torch.as_tensor(counts)[sorted_labels]
    is_val = rank_in_class < val_per_class
    is_train = (~is_val) & (rank_in_class < val_per_class + wanted)
    return order[is_train].sort().values, order[is_val].sort().values


def draw_per_class(labels: torch.Tensor, per_class: int, num_classes: int, seed: int, stream: int = STREAM_INIT):
    """Indices of `per_class` images of every class, drawn without replacement by a seeded order.

    A class with n_c < per_class images gives all n_c of them, then cycles through
    them again in the same order (so slot j holds image j mod n_c); the caller
    decides how to make the repeats differ. Returns (index (C * per_class,), repeat
    (C * per_class,) bool: True where the slot repeats an image).
    """
    keys = counter_uniform(seed, stream, torch.arange(len(labels)))
    order = torch.argsort(labels.double() + keys.double(), stable=True)
    class_sizes = torch.bincount(labels, minlength=num_classes)
    if (class_sizes == 0).any():
        empty = int(torch.nonzero(class_sizes == 0)[0])
        raise UsageError(f"class {empty} has no training images; check --data-dir and --imbalance-factor")
    starts = torch.cumsum(class_sizes, 0) - class_sizes
    slot = torch.arange(per_class)
    rank = slot[None, :] % class_sizes[:, None]  # (C, per_class)
    index = order[starts[:, None] + rank]
    repeat = slot[None, :] >= class_sizes[:, None]
    return index.flatten(), repeat.flatten()


@dataclass
class LongTailedData:
    """A long-tailed training subset, a balanced validation and test split, in memory.

    Images are uint8 (N, C, H, W); labels int64 (N,). Class 0 is the head.
    """
    name: str
    class_names: list[str]
    class_counts: list[int]           # training images per class in the long-tailed subset
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str = "built in memory"  # where the images were read from, for the records (data_source)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    def normalise(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """x = (u / 255 - mean) / std = (u - 255 mean) / (255 std), per channel; float32 on the images' device."""
        mean = torch.tensor(self.mean, device=images_uint8.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images_uint8.device).view(1, -1, 1, 1)
        return images_uint8.float().sub_(255 * mean).div_(255 * std)

    def denormalise(self, images: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] pixel values (clamped), for saving pictures."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1)

    def counts_table(self) -> str:
        """One line: the per-class training counts, head first."""
        cells = " ".join(f"{n}:{c}" for n, c in zip(self.class_names, self.class_counts))
        return f"{self.name}: {sum(self.class_counts)} training images, per class {cells}"


# ----------------------------------------------------------------------------------------
# Reading the raw splits: torchvision's CIFAR, IDX files, or an image-folder tree

def cache_dir() -> Path:
    """Where decoded splits are cached: $CSDM_CACHE_DIR, else ~/.cache/csdm."""
    return Path(os.environ.get("CSDM_CACHE_DIR", Path.home() / ".cache" / "csdm"))


def _cached(key_parts: tuple, build):
    """Return build()'s (images, labels, class_names), cached on disk under a hash of key_parts."""
    key = hashlib.sha1(repr(key_parts).encode()).hexdigest()[:20]
    path = cache_dir() / f"split-{key}.pt"
    if path.exists():
        try:
            blob = torch.load(path, weights_only=True)
            return blob["images"], blob["labels"], list(blob["class_names"])
        except Exception:  # a stale or partial cache file: rebuild it
            pass
    images, labels, class_names = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"images": images, "labels": labels, "class_names": list(class_names)}, tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: work without the cache
    return images, labels, class_names


def _resize(images: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) once, with antialiasing, in chunks to bound memory."""
    if image_size is None or images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    chunks = [F.interpolate(chunk.float(), size=(image_size, image_size), mode="bilinear",
                            antialias=True, align_corners=False).round().clamp(0, 255).to(torch.uint8)
              for chunk in images.split(4096)]
    return torch.cat(chunks)


def is_image_folder(root: Path) -> bool:
    """True if root holds train/<class>/ and test/<class>/ subfolders."""
    return (root / "train").is_dir() and (root / "test").is_dir()


def _decode(path: Path) -> torch.Tensor:
    """One image file as uint8 RGB (3, H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as error:
        raise UsageError(f"--data-dir: cannot decode {path} ({error}); remove or replace the file")
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _read_image_folder_split(split_dir: Path, image_size: int | None):
    """Decode every image of split_dir/<class>/* to uint8 RGB (N, 3, H, W)."""
    class_names = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    files, labels = [], []
    for label, name in enumerate(class_names):
        found = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    if not files:
        raise UsageError(f"--data-dir: no images under {split_dir}/<class>/; expected files such as "
                         f"{split_dir}/<class>/0001.jpg")
    images, sizes = [], set()
    for path in files:
        image = _decode(path)
        if image_size is not None:
            image = _resize(image[None], image_size)[0]
        images.append(image)
        sizes.add(tuple(image.shape[-2:]))
    if len(sizes) > 1:
        raise UsageError(f"--image-size: images under {split_dir} have {len(sizes)} different sizes; "
                         f"pass --image-size N to resize them all to N x N")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), class_names


def _folder_key(split_dir: Path) -> tuple:
    """Identity of an image-folder split for the cache: its path and a digest of its class folders and of
    every file's name, size and change time in each (a file moved to another class, a class renamed or
    emptied, changes it)."""
    classes = sorted(d for d in split_dir.iterdir() if d.is_dir())
    listing = [(class_dir.name, sorted((entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
                                       for entry in os.scandir(class_dir))) for class_dir in classes]
    return (str(split_dir.resolve()), hashlib.sha1(repr(listing).encode()).hexdigest())


def read_image_folder(root: Path, train: bool, image_size: int | None):
    split_dir = root / ("train" if train else "test")
    return _cached(("folder", _folder_key(split_dir), image_size),
                   lambda: _read_image_folder_split(split_dir, image_size))


def _read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (optionally gzipped): big-endian header, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise UsageError(f"--data-dir: {path} is not an uint8 IDX file")
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8)
    return data.reshape(shape)


def _find_idx_dir(data_dir: Path | None) -> Path | None:
    candidates = [data_dir, data_dir / "FashionMNIST" / "raw"] if data_dir else []
    if data_dir is None:
        candidates.append(Path(FASHION_MNIST_SYSTEM_DIR))
    for d in candidates:
        if d is not None and any((d / f"train-images-idx3-ubyte{s}").exists() for s in ("", ".gz")):
            return d
    return None


def read_fashion_mnist(data_dir: Path | None, train: bool, image_size: int | None):
    idx_dir = _find_idx_dir(data_dir)
    prefix = "train" if train else "t10k"
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    if idx_dir is not None:
        def find(stem):
            for suffix in ("", ".gz"):
                if (idx_dir / f"{stem}{suffix}").exists():
                    return idx_dir / f"{stem}{suffix}"
            raise UsageError(f"--data-dir: {idx_dir} lacks {stem}[.gz]; it needs the four Fashion-MNIST IDX files")

        def build():
            images = _read_idx(find(f"{prefix}-images-idx3-ubyte"))[:, None]
            labels = _read_idx(find(f"{prefix}-labels-idx1-ubyte")).long()
            return _resize(images, image_size), labels, classes
        return _cached(("fashion-mnist", str(idx_dir.resolve()), train, image_size), build)
    if data_dir is not None:
        raise UsageError(f"--data-dir: {data_dir} holds no Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...); "
                         f"install the Debian package dataset-fashion-mnist or omit --data-dir to download")
    return _read_torchvision("fashion-mnist", Path(DEFAULT_DATA_DIR), train, image_size, download=True)


def _read_torchvision(dataset: str, root: Path, train: bool, image_size: int | None, download: bool):
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "fashion-mnist": torchvision.datasets.FashionMNIST}[dataset]
    try:
        ds = cls(root=str(root), train=train, download=download)
    except RuntimeError as error:
        raise UsageError(f"--data-dir: {root} holds no {dataset} copy torchvision can read ({error}); "
                         f"point --data-dir at one, or omit it to download into ./{DEFAULT_DATA_DIR}")
    data = torch.as_tensor(ds.data)
    images = data.permute(0, 3, 1, 2).contiguous() if data.ndim == 4 else data[:, None].contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return _resize(images, image_size), labels, list(ds.classes)


def read_split(dataset: str, data_dir: str | None, train: bool, image_size: int | None = None):
    """The raw, balanced split as (uint8 (N, C, H, W), int64 labels (N,), class names)."""
    if dataset not in DATASETS:
        raise UsageError(f"--dataset: unknown data set '{dataset}'; choose one of {', '.join(DATASETS)}")
    root = Path(data_dir) if data_dir is not None else None
    if root is not None and not root.exists():
        raise UsageError(f"--data-dir: {root} does not exist; give the folder that holds the data, "
                         f"or omit --data-dir to download")
    if dataset == "fashion-mnist":
        return read_fashion_mnist(root, train, image_size)
    if dataset == "folder":
        if root is None or not is_image_folder(root):
            raise UsageError(f"--data-dir: --dataset folder needs a folder with train/<class>/* and test/<class>/* "
                             f"(got {root})")
        return read_image_folder(root, train, image_size)
    # cifar10 / cifar100: an image-folder copy, or torchvision's own files
    if root is not None and is_image_folder(root):
        images, labels, names = read_image_folder(root, train, image_size)
        expected = len(CIFAR10_CLASSES) if dataset == "cifar10" else 100
        if dataset == "cifar10" and tuple(names) != CIFAR10_CLASSES or len(names) != expected:
            raise UsageError(f"--data-dir: {root}/train holds classes {names[:4]}... ({len(names)}), not {dataset}'s; "
                             f"use --dataset folder for another data set")
        return images, labels, names
    return _read_torchvision(dataset, root or Path(DEFAULT_DATA_DIR), train, image_size, download=root is None)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units, in chunks."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in images.split(4096):
        x = chunk.double() / 255
        total += x.sum((0, 2, 3))
        total_sq += (x * x).sum((0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (total_sq / n - mean ** 2).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def check_test_classes(class_names: list[str], test_names: list[str], test_labels: torch.Tensor) -> None:
    """The test split numbers its classes as the training split does, and holds images of every class:
    labels are class-folder positions, so a folder missing from test/ would shift every later label."""
    if list(test_names) != list(class_names):
        missing = sorted(set(class_names) - set(test_names)) or sorted(set(test_names) - set(class_names))
        raise UsageError(f"--data-dir: the test split's classes differ from the training split's ({missing[:3]} in "
                         f"one only); give test/ the same class folders as train/")
    empty = [name for name, n in zip(class_names, torch.bincount(test_labels, minlength=len(class_names)).tolist())
             if n == 0]
    if empty:
        raise UsageError(f"--data-dir: class '{empty[0]}' has no test images; put its test images in test/{empty[0]}/")


def load_long_tailed(dataset: str, data_dir: str | None = None, imbalance_factor: float = 100.0, seed: int = 0,
                     val_per_class: int = 0, n_max: int | None = None, image_size: int | None = None,
                     log=print) -> LongTailedData:
    """Read a data set and build its long-tailed training subset (Cao et al. 2019's exponential profile).

    n_max defaults to the size of the largest training class; the per-class
    counts follow long_tailed_counts(n_max, C, IF), capped by what each class
    has left after `val_per_class` images go to the validation split.
    """
    if val_per_class < 0:
        raise UsageError(f"--val-per-class must be >= 0 (got {val_per_class})")
    if n_max is not None and n_max < 1:
        raise UsageError(f"--n-max must be >= 1 (got {n_max})")
    if image_size is not None and image_size < 8:
        raise UsageError(f"--image-size must be >= 8 (got {image_size})")
    if not imbalance_factor >= 1 or math.isinf(imbalance_factor):
        raise UsageError(f"--imbalance-factor must be a number >= 1 (got {imbalance_factor}); 1 keeps the data "
                         f"balanced")
    train_images, train_labels, class_names = read_split(dataset, data_dir, True, image_size)
    test_images, test_labels, test_names = read_split(dataset, data_dir, False, image_size)
    num_classes = len(class_names)
    available = torch.bincount(train_labels, minlength=num_classes)
    head = int(available.max()) if n_max is None else n_max
    wanted = long_tailed_counts(head, num_classes, imbalance_factor)
    left = (available - val_per_class).clamp_min(0).tolist()
    counts = [min(w, a) for w, a in zip(wanted, left)]
    if min(wanted) < 1:
        raise UsageError(f"--imbalance-factor {imbalance_factor:g}: the tail class would get {head} / "
                         f"{imbalance_factor:g} < 1 images (head {head}); lower --imbalance-factor, or raise --n-max")
    if 0 in available.tolist():
        empty = class_names[available.tolist().index(0)]
        raise UsageError(f"--data-dir: class '{empty}' has no training images in {dataset}; give a data folder whose "
                         f"every class holds images")
    check_test_classes(class_names, test_names, test_labels)
    if min(counts) < 1:
        empty = class_names[counts.index(0)]
        raise UsageError(f"--val-per-class {val_per_class} leaves class '{empty}' without training images; lower it")
    short = [c for c in range(num_classes) if counts[c] < wanted[c]]
    if short:
        log(f"note: {len(short)} class(es) have fewer images than the profile asks "
            f"(class {short[0]}: {counts[short[0]]} < {wanted[short[0]]}) after {val_per_class} validation images each")
    train_index, val_index = split_long_tailed(train_labels, counts, val_per_class, seed)
    mean, std = NORMALISATION.get(dataset) or _channel_stats(train_images)
    data = LongTailedData(
        name=f"{dataset}-LT(IF={imbalance_factor:g})", class_names=list(class_names), class_counts=counts,
        mean=tuple(mean), std=tuple(std),
        train_images=train_images[train_index], train_labels=train_labels[train_index],
        val_images=train_images[val_index], val_labels=train_labels[val_index],
        test_images=test_images, test_labels=test_labels, source=data_source(dataset, data_dir))
    log(data.counts_table())
    return data


def data_source(dataset: str, data_dir: str | None) -> str:
    """Where read_split reads a data set's images from, in words for results.json: an image-folder copy of
    CIFAR (such as a JPEG one, whose pixels differ from torchvision's) is not CIFAR's own files."""
    root = Path(data_dir) if data_dir is not None else None
    if dataset == "folder":
        return f"image folder {data_dir}"
    if dataset == "fashion-mnist":
        return f"Fashion-MNIST IDX files ({data_dir or 'found or downloaded by torchvision'})"
    if root is not None and is_image_folder(root):
        return f"image-folder copy of {dataset} in {data_dir} (not torchvision's files)"
    return f"torchvision's {dataset} files in {data_dir or DEFAULT_DATA_DIR}"


def finite_float(text: str) -> float:
    """argparse type of the float options: a finite number (inf and nan would pass checks such as > 0 and
    then stall or break the run)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


# the data options' defaults (evaluate.py --syn takes them from the set instead)
DATA_DEFAULTS = {"dataset": "cifar10", "imbalance_factor": 100.0, "n_max": None, "val_per_class": 0,
                 "image_size": None}


def add_data_arguments(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The data options shared by distill.py and evaluate.py. defaults=False leaves an option out of the
    parsed namespace unless it is given (argparse.SUPPRESS), so that the caller sees which were typed."""
    default = (lambda name: DATA_DEFAULTS[name]) if defaults else (lambda name: argparse.SUPPRESS)
    shown = (lambda name: "%(default)s") if defaults else (lambda name: DATA_DEFAULTS[name])  # in the help
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=default("dataset"), choices=DATASETS,
                   help=f"data set (default: {shown('dataset')})")
    g.add_argument("--data-dir", default=None,
                   help="folder holding the data: torchvision's files, an image-folder tree train/<class>/*, "
                        "test/<class>/*, or Fashion-MNIST IDX files (default: download into ./data)")
    g.add_argument("--imbalance-factor", type=finite_float, default=default("imbalance_factor"),
                   help=f"IF = n_max / n_min of the exponential profile; 1 = balanced (default: "
                        f"{shown('imbalance_factor')})")
    g.add_argument("--n-max", type=int, default=default("n_max"),
                   help="images of the head class (default: all of its training images)")
    g.add_argument("--val-per-class", type=int, default=default("val_per_class"),
                   help=f"balanced validation images per class: the first v of each class's seeded order, the "
                        f"long-tailed subset then taking the next n_c, so a validation run trains on another subset "
                        f"than a test run of the same data seed (the same counts; the head class capped at its "
                        f"images minus v) (default: {shown('val_per_class')})")
    g.add_argument("--data-seed", type=int, default=None if defaults else argparse.SUPPRESS,
                   help="seed of the long-tailed subset and the validation split alone (default: --seed)")
    g.add_argument("--image-size", type=int, default=default("image_size"),
                   help="resize every image to N x N once when loading (default: keep)")


def data_seed(args) -> int:
    """The seed of the long-tailed subset and the validation split: --data-seed, else --seed."""
    return args.seed if getattr(args, "data_seed", None) is None else args.data_seed


def load_from_args(args, log=print) -> LongTailedData:
    return load_long_tailed(args.dataset, args.data_dir, args.imbalance_factor, data_seed(args),
                            args.val_per_class, args.n_max, args.image_size, log=log)


# ----------------------------------------------------------------------------------------
# DSA: differentiable siamese augmentation, batched. Every sample carries its own row of
# uniform draws; giving two samples the same row gives them the same transformation.

DSA_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
# the columns of a row of uniform draws u (N, DSA_SLOTS): which operation, then each operation's parameters
(U_OP, U_BRIGHTNESS, U_SATURATION, U_CONTRAST, U_CROP_Y, U_CROP_X, U_CUTOUT_Y, U_CUTOUT_X, U_FLIP, U_SCALE_X,
 U_SCALE_Y, U_ROTATE) = range(12)
DSA_SLOTS = 12
DSA_BRIGHTNESS, DSA_SATURATION, DSA_CONTRAST = 1.0, 2.0, 0.5
DSA_CROP_PAD, DSA_CUTOUT, DSA_FLIP, DSA_SCALE, DSA_ROTATE_DEG = 0.125, 0.5, 0.5, 1.2, 15.0


def dsa_augment(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Apply one DSA operation per sample, as the DSA code does with aug_mode 'S'.

    x: (N, C, H, W) float images; u: (N, DSA_SLOTS) uniforms in [0, 1). u[:, U_OP]
    picks the operation among DSA_OPS; the other columns (U_*) are its parameters:
    color = brightness x + (b - 1/2), saturation (x - mean_c)(2 s) + mean_c,
    contrast (x - mean)(c + 1/2) + mean; crop = integer shift in
    [-pad, pad] with zero fill; cutout = a zeroed square of half the side;
    flip = horizontal flip if u < 1/2; scale = per-axis factor in
    [1/1.2, 1.2]; rotate = angle in [-15, 15] degrees. The geometric
    operations are one affine warp (bilinear, zero padding) for the batch.
    """
    op = (u[:, U_OP] * len(DSA_OPS)).long().clamp_max(len(DSA_OPS) - 1)
    is_op = {name: (op == i) for i, name in enumerate(DSA_OPS)}
    # each sample undergoes one operation: compute each on its own samples only, then write them back at once
    parts = [part for part in (_dsa_color(x, u, is_op), _dsa_cutout(x, u, is_op), _dsa_geometric(x, u, is_op))
             if part is not None]
    if not parts:
        return x
    return x.index_copy(0, torch.cat([index for index, _ in parts]), torch.cat([out for _, out in parts]))


def _column(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


def _dsa_color(x, u, is_op):
    """(index, output) of the colour samples: brightness, saturation, contrast; None if there are none."""
    index = torch.nonzero(is_op["color"]).squeeze(1)
    if not len(index):
        return None
    v = u[index]
    colored = x[index] + (_column(v[:, U_BRIGHTNESS]) - 0.5) * DSA_BRIGHTNESS
    channel_mean = colored.mean(dim=1, keepdim=True)
    colored = (colored - channel_mean) * _column(v[:, U_SATURATION] * DSA_SATURATION) + channel_mean
    image_mean = colored.mean(dim=(1, 2, 3), keepdim=True)
    return index, (colored - image_mean) * _column(v[:, U_CONTRAST] + DSA_CONTRAST) + image_mean


def _dsa_cutout(x, u, is_op):
    """(index, output) of the cutout samples: a zeroed square centred at a random offset (clipped at the border)."""
    index = torch.nonzero(is_op["cutout"]).squeeze(1)
    if not len(index):
        return None
    _, _, h, w = x.shape
    v = u[index]
    size_h, size_w = int(h * DSA_CUTOUT + 0.5), int(w * DSA_CUTOUT + 0.5)
    centre_y = (v[:, U_CUTOUT_Y] * (h + 1 - size_h % 2)).long().clamp_max(h - size_h % 2)
    centre_x = (v[:, U_CUTOUT_X] * (w + 1 - size_w % 2)).long().clamp_max(w - size_w % 2)
    rows = torch.arange(h, device=x.device)[None, :] - (centre_y - size_h // 2)[:, None]  # (n, H)
    cols = torch.arange(w, device=x.device)[None, :] - (centre_x - size_w // 2)[:, None]  # (n, W)
    inside = ((rows >= 0) & (rows < size_h))[:, :, None] & ((cols >= 0) & (cols < size_w))[:, None, :]
    return index, x[index] * (~inside).unsqueeze(1).to(x.dtype)


def _dsa_geometric(x, u, is_op):
    """(index, output) of the crop (shift), flip, scale and rotate samples, as one affine map of output to
    input coordinates for all of them (bilinear, zero padding); None if there are none."""
    flip = is_op["flip"] & (u[:, U_FLIP] < DSA_FLIP)
    index = torch.nonzero(is_op["crop"] | flip | is_op["scale"] | is_op["rotate"]).squeeze(1)
    if not len(index):
        return None
    _, _, h, w = x.shape
    v, m = u[index], len(index)
    crop, flip, scale, rotate = is_op["crop"][index], flip[index], is_op["scale"][index], is_op["rotate"][index]
    theta = torch.zeros(m, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    pad_h, pad_w = int(h * DSA_CROP_PAD + 0.5), int(w * DSA_CROP_PAD + 0.5)
    shift_y = (v[:, U_CROP_Y] * (2 * pad_h + 1)).floor().clamp_max(2 * pad_h) - pad_h
    shift_x = (v[:, U_CROP_X] * (2 * pad_w + 1)).floor().clamp_max(2 * pad_w) - pad_w
    theta[:, 0, 2] = torch.where(crop, 2 * shift_x / w, 0.0)
    theta[:, 1, 2] = torch.where(crop, 2 * shift_y / h, 0.0)
    theta[:, 0, 0] = torch.where(flip, -1.0, theta[:, 0, 0])
    scale_lo = 1.0 / DSA_SCALE
    theta[:, 0, 0] = torch.where(scale, v[:, U_SCALE_X] * (DSA_SCALE - scale_lo) + scale_lo, theta[:, 0, 0])
    theta[:, 1, 1] = torch.where(scale, v[:, U_SCALE_Y] * (DSA_SCALE - scale_lo) + scale_lo, theta[:, 1, 1])
    angle = (v[:, U_ROTATE] - 0.5) * 2 * math.radians(DSA_ROTATE_DEG)
    rotation = torch.stack([torch.cos(angle), -torch.sin(angle), torch.sin(angle), torch.cos(angle)], 1)
    theta[:, :, :2] = torch.where(rotate.view(m, 1, 1), rotation.view(m, 2, 2), theta[:, :, :2])
    grid = F.affine_grid(theta, [m, x.shape[1], h, w], align_corners=False)
    return index, F.grid_sample(x[index], grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def dsa_uniforms_per_sample(n: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """Uniform draws for a training minibatch as the DSA code draws them without a
    seed: one operation for the whole batch, parameters per sample. (n, DSA_SLOTS)."""
    u = torch.rand(n, DSA_SLOTS, generator=generator, device=device)
    u[:, U_OP] = u[0, U_OP]
    return u


def dsa_uniforms_for(op: str, n: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """Uniform draws that apply the DSA operation `op` (one of DSA_OPS) to every sample, parameters per
    sample. (n, DSA_SLOTS)."""
    u = torch.rand(n, DSA_SLOTS, generator=generator, device=device)
    u[:, U_OP] = (DSA_OPS.index(op) + 0.5) / len(DSA_OPS)
    return u


DSA_PAIRINGS = ("position", "class")


def dsa_uniforms_siamese(seed: int, step: int, classes: torch.Tensor, positions: torch.Tensor,
                         pairing: str = "position") -> torch.Tensor:
    """Counter-based draws for siamese DSA in iteration `step`, (N, DSA_SLOTS) on the inputs' device.

    pairing "position": the sample at `position` of class `class` gets the same row in the real and
    the synthetic batch; the operation (U_OP) is shared by the whole class, its parameters differ by
    position. pairing "class": one row per class and iteration for all its real and synthetic samples,
    as DM's code draws it (one seeded transformation for a class's whole batch)."""
    if pairing not in DSA_PAIRINGS:
        raise ValueError(f"pairing must be one of {DSA_PAIRINGS}, got {pairing!r}")
    slots = torch.arange(DSA_SLOTS, device=classes.device)[None, :]
    position = torch.where(slots == U_OP, 0, positions[:, None]) if pairing == "position" else 0
    return counter_uniform(seed, STREAM_DSA, step, classes[:, None], position, slots, device=classes.device)


# ----------------------------------------------------------------------------------------
# The starting synthetic set (real initialisation, multi-formation) and the real batches of an iteration

def check_factor(factor: int, image_size: int) -> None:
    """Multi-formation shrinks each real image to a tile of image_size // factor pixels: at least one."""
    if factor > image_size:
        raise UsageError(f"--factor {factor}: a {image_size}-pixel image holds at most {image_size} x {image_size} "
                         f"tiles; lower --factor")


def initial_synthetic(data: LongTailedData, ipc: int, seed: int, factor: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Real initialisation: ipc normalised real images per class, (C * ipc, ch, H, W), and labels.

    With factor f, each synthetic image is f x f real images of its class, each shrunk to H/f
    and tiled (multi-formation); decode() turns it back into f^2 training images. Slots beyond a
    class's n_c real images repeat them under a seeded geometric DSA transformation (crop shift,
    forced flip, scale or rotation), so that no two start identical."""
    index, repeat = draw_per_class(data.train_labels, ipc * factor ** 2, data.num_classes, seed)
    images = data.normalise(data.train_images[index])
    labels = data.train_labels[index]
    if bool(repeat.any()):
        slots = torch.nonzero(repeat).squeeze(1)
        images[slots] = dsa_augment(images[slots], geometric_uniforms(seed, slots))
    if factor == 1:
        return images, labels
    size = data.image_size
    tiles = F.interpolate(images, size=(size // factor, size // factor), mode="bilinear", antialias=True,
                          align_corners=False)
    packed = rearrange(tiles, "(n fh fw) c h w -> n c (fh h) (fw w)", fh=factor, fw=factor)
    return F.pad(packed, (0, size - packed.shape[-1], 0, size - packed.shape[-2])), labels[::factor ** 2]


def geometric_uniforms(seed: int, slots: torch.Tensor) -> torch.Tensor:
    """DSA draws (len(slots), DSA_SLOTS) that pick a geometric operation (crop, flip, scale or rotate)
    for each slot, seeded by (seed, slot); the flip always flips."""
    u = counter_uniform(seed, STREAM_INIT, slots[:, None], torch.arange(DSA_SLOTS)[None, :])
    geometric = torch.tensor([DSA_OPS.index(op) for op in ("crop", "flip", "scale", "rotate")])
    op = geometric[(u[:, U_OP] * len(geometric)).long().clamp_max(len(geometric) - 1)]
    u[:, U_OP] = (op.float() + 0.5) / len(DSA_OPS)
    u[:, U_FLIP] = 0.0
    return u


def decode(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Multi-formation decoding: (N, c, H, W) -> (N * factor^2, c, H, W), each tile upsampled to H x W."""
    if factor == 1:
        return images
    size = images.shape[-1]
    tile = size // factor
    tiles = rearrange(images[..., :tile * factor, :tile * factor], "n c (fh h) (fw w) -> (n fh fw) c h w",
                      fh=factor, fw=factor)
    return F.interpolate(tiles, size=(size, size), mode="bilinear", align_corners=False)


class RealBatchSampler:
    """Every iteration, up to batch_real images of each of `classes`, drawn without replacement.

    The draw is a function of (seed, iteration, image) only: image j's random key is
    counter_uniform(seed, stream, iteration, j) for its index j in the whole training
    set, and each class takes its batch_real smallest keys. So a class's batch does not
    depend on which other classes this process handles."""

    def __init__(self, labels: torch.Tensor, num_classes: int, batch_real: int, seed: int,
                 classes: torch.Tensor | None = None):
        mine = torch.ones(num_classes, dtype=torch.bool, device=labels.device)
        if classes is not None:
            mine = torch.zeros_like(mine)
            mine[classes.to(labels.device)] = True
        self.index = torch.nonzero(mine[labels]).squeeze(1)  # global indices of this process's images
        self.labels = labels[self.index]
        self.batch_real, self.seed = batch_real, seed
        counts = torch.bincount(self.labels, minlength=num_classes)
        self.starts = torch.cumsum(counts, 0) - counts

    def sample(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices into the training set, position of each within its class batch)."""
        keys = counter_uniform(self.seed, STREAM_REAL_BATCH, iteration, self.index, device=self.index.device)
        order = torch.argsort(self.labels.double() + keys.double(), stable=True)
        position = torch.arange(len(order), device=order.device) - self.starts[self.labels[order]]
        keep = position < self.batch_real
        return self.index[order[keep]], position[keep]


# ----------------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Print the long-tailed counts of a data set.")
    add_data_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset draw (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        data = load_from_args(args)
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"validation {len(data.val_labels)}, test {len(data.test_labels)} images, "
          f"{data.channels} x {data.image_size} x {data.image_size}")


if __name__ == "__main__":
    main()
