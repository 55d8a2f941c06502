"""Shared fixtures: the repository on sys.path, a tiny in-memory long-tailed set, and the real
CIFAR-10: the JPEG copy extracted once per session from its archive, or else torchvision's download."""
from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_lt import LongTailedData, long_tailed_counts  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Decoded splits go to a session folder, never to the user's ~/.cache."""
    os.environ["CSDM_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield


def make_tiny_data(num_classes=4, n_max=12, imbalance_factor=4.0, size=16, channels=3, seed=0,
                   val_per_class=2, test_per_class=5) -> LongTailedData:
    """A small long-tailed set of random-but-class-dependent uint8 images, built in memory."""
    g = torch.Generator().manual_seed(seed)
    counts = long_tailed_counts(n_max, num_classes, imbalance_factor)

    def images_of(per_class):
        labels = torch.arange(num_classes).repeat_interleave(torch.as_tensor(per_class))
        base = (labels.float() / num_classes * 200).view(-1, 1, 1, 1)
        noise = torch.randint(0, 56, (len(labels), channels, size, size), generator=g).float()
        return (base + noise).clamp(0, 255).to(torch.uint8), labels

    train_images, train_labels = images_of(counts)
    val_images, val_labels = images_of([val_per_class] * num_classes)
    test_images, test_labels = images_of([test_per_class] * num_classes)
    return LongTailedData(
        name="tiny-LT", class_names=[f"c{c}" for c in range(num_classes)], class_counts=counts,
        mean=(0.5,) * channels, std=(0.25,) * channels,
        train_images=train_images, train_labels=train_labels, val_images=val_images, val_labels=val_labels,
        test_images=test_images, test_labels=test_labels)


@pytest.fixture
def tiny_data():
    return make_tiny_data()


def run_distill(args, data: LongTailedData, *rest, **kwargs) -> dict:
    """distill.distill as distill.py's job calls it: on the parsed options `args` resolved against the data."""
    import distill
    return distill.distill(distill.resolve(args, data), data, *rest, **kwargs)


# ------------------------------------------------------------------------------------------
# The real CIFAR-10 (tests/test_fixture.py tests the choice below)

class Cifar10Unavailable(Exception):
    """Neither an archive nor a download; the message is the one line to show."""


def conv_biases_before_a_norm(net: torch.nn.Module) -> set[int]:
    """ids of the biases of convolutions followed directly by instance norm (GroupNorm with a group per
    channel, the models' default), which subtracts each channel's mean: such a bias changes no output and its
    gradient is zero up to rounding, so an SGD step of it may not change its float32 value, and AdamW (which
    divides by the gradient's own scale) walks it by +-lr on the rounding noise."""
    return {id(conv.bias) for sequence in net.modules() if isinstance(sequence, torch.nn.Sequential)
            for conv, norm in zip(sequence, list(sequence)[1:])
            if isinstance(conv, torch.nn.Conv2d) and conv.bias is not None
            and isinstance(norm, torch.nn.GroupNorm) and norm.num_groups == norm.num_channels}


def archive_candidates(environ=os.environ, root=ROOT) -> list[Path]:
    """Where the CIFAR-10 JPEG archive may be: $CSDM_CIFAR10_ARCHIVE, then ../shared/data/ beside the repository."""
    paths = [environ.get("CSDM_CIFAR10_ARCHIVE", ""), str(root.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")]
    return [Path(p) for p in paths if p]


def cifar10_cache_dir(environ=os.environ) -> Path:
    """Where torchvision's download is kept between sessions: $CSDM_TEST_DATA, else ~/.cache/csdm/test-data."""
    return Path(environ.get("CSDM_TEST_DATA") or Path.home() / ".cache" / "csdm" / "test-data")


def download_cifar10(root: Path) -> Path:
    """CIFAR-10 through torchvision into root (nothing is fetched when root holds a verified copy). root is
    what --data-dir takes with --dataset cifar10: data_lt.read_split reads torchvision's files there."""
    import torchvision

    root.mkdir(parents=True, exist_ok=True)
    torchvision.datasets.CIFAR10(root=str(root), train=True, download=True)  # one archive holds both splits
    (root / "cifar-10-python.tar.gz").unlink(missing_ok=True)  # extracted: 170 MB less in the cache
    return root


def locate_cifar10(candidates, download_fn, cache) -> tuple[str, Path]:
    """("archive", the first candidate that is a file), else ("download", download_fn(cache / "cifar10")),
    else Cifar10Unavailable with a one-line message saying what to set."""
    for candidate in candidates:
        if Path(candidate).is_file():
            return "archive", Path(candidate)
    target = Path(cache) / "cifar10"
    try:
        return "download", Path(download_fn(target))
    except Exception as error:  # no network, a proxy, a full disk: all end in the same advice
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        tried = ", ".join(str(c) for c in candidates) or "nowhere"
        raise Cifar10Unavailable(
            f"CIFAR-10 for the tests: no archive (looked at {tried}) and torchvision could not download it into "
            f"{target} ({reason}); set CSDM_CIFAR10_ARCHIVE to a cifar10-jpeg.tar.gz, or give this machine "
            f"internet access (CSDM_TEST_DATA chooses the download folder)") from None


def extract_cifar10(archive: Path, target: Path) -> Path:
    """Extract the JPEG archive into target; the folder holding its train/ and test/ trees."""
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    for folder in [target, *sorted(p for p in target.iterdir() if p.is_dir())]:
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return folder
    raise Cifar10Unavailable(f"{archive} holds no train/ and test/ folders (expected cifar10/train/<class>/*.jpg); "
                             f"point CSDM_CIFAR10_ARCHIVE at the CIFAR-10 JPEG archive")


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """The real CIFAR-10 as a folder that --dataset cifar10 --data-dir reads: the JPEG copy's image-folder
    tree (train/<class>/*.jpg) when its archive is found, else torchvision's files, downloaded once into
    cifar10_cache_dir()."""
    try:
        kind, path = locate_cifar10(archive_candidates(), download_cifar10, cifar10_cache_dir())
        return extract_cifar10(path, tmp_path_factory.mktemp("cifar10")) if kind == "archive" else path
    except Cifar10Unavailable as error:
        message = str(error)
    pytest.fail(message, pytrace=False)  # outside the except: one line, no chained traceback
