"""Shared fixtures: the repository on sys.path, a tiny in-memory long-tailed set, and the real
CIFAR-10 JPEG copy extracted once per session from the shared archive."""
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

ARCHIVE_CANDIDATES = [
    os.environ.get("CSDM_CIFAR10_ARCHIVE", ""),
    str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"),
    "/work/shared/data/cifar10-jpeg.tar.gz",
]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Decoded splits go to a session folder, never to the user's ~/.cache."""
    os.environ["CSDM_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield


def make_tiny_data(num_classes=4, n_max=12, imbalance_factor=4.0, size=16, channels=3, seed=0,
                   val_per_class=2) -> LongTailedData:
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
    test_images, test_labels = images_of([5] * num_classes)
    return LongTailedData(
        name="tiny-LT", class_names=[f"c{c}" for c in range(num_classes)], class_counts=counts,
        mean=(0.5,) * channels, std=(0.25,) * channels,
        train_images=train_images, train_labels=train_labels, val_images=val_images, val_labels=val_labels,
        test_images=test_images, test_labels=test_labels)


@pytest.fixture
def tiny_data():
    return make_tiny_data()


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """The real CIFAR-10 (JPEG copy) as an image-folder tree: <dir>/train/<class>/*.jpg."""
    archive = next((Path(p) for p in ARCHIVE_CANDIDATES if p and Path(p).is_file()), None)
    if archive is None:
        pytest.fail("the CIFAR-10 JPEG archive was not found; set CSDM_CIFAR10_ARCHIVE to cifar10-jpeg.tar.gz")
    target = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target / "cifar10"
