"""The cifar10_dir fixture's choice (conftest.locate_cifar10): the archive when present, else torchvision's
download, else one line saying what to set; no network, milliseconds."""
import tarfile
from pathlib import Path
from urllib.error import URLError

import pytest

from conftest import (ROOT, Cifar10Unavailable, archive_candidates, cifar10_cache_dir, extract_cifar10,
                      locate_cifar10)
from data_lt import is_image_folder


def no_download(root):
    raise AssertionError("the archive was there: nothing should be downloaded")


def test_the_archive_comes_first(tmp_path):
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    archive.write_bytes(b"")
    assert locate_cifar10([tmp_path / "missing.tar.gz", archive], no_download, tmp_path / "cache") == (
        "archive", archive)
    # a folder is no archive
    assert locate_cifar10([tmp_path, archive], no_download, tmp_path / "cache") == ("archive", archive)


def test_without_an_archive_torchvision_downloads_into_the_cache(tmp_path):
    calls = []

    def download(root):
        calls.append(root)
        root.mkdir(parents=True)
        return root

    assert locate_cifar10([tmp_path / "missing.tar.gz"], download, tmp_path / "cache") == (
        "download", tmp_path / "cache" / "cifar10")
    assert calls == [tmp_path / "cache" / "cifar10"]


def test_neither_fails_with_one_line_naming_what_to_set(tmp_path):
    def offline(root):
        raise URLError("[Errno -3] Temporary failure\nin name resolution")

    with pytest.raises(Cifar10Unavailable) as caught:
        locate_cifar10([tmp_path / "missing.tar.gz"], offline, tmp_path / "cache")
    message = str(caught.value)
    assert "\n" not in message
    assert "CSDM_CIFAR10_ARCHIVE" in message and "internet" in message and "CSDM_TEST_DATA" in message
    assert str(tmp_path / "missing.tar.gz") in message and "name resolution" in message
    with pytest.raises(Cifar10Unavailable, match="looked at nowhere"):
        locate_cifar10([], offline, tmp_path / "cache")


def test_where_the_fixture_looks(tmp_path):
    shared = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    assert archive_candidates({}) == [shared]  # relative to the repository, no absolute path of one machine
    assert archive_candidates({"CSDM_CIFAR10_ARCHIVE": "/x/c.tar.gz"}) == [Path("/x/c.tar.gz"), shared]
    assert archive_candidates({"CSDM_CIFAR10_ARCHIVE": ""}) == [shared]
    assert cifar10_cache_dir({"CSDM_TEST_DATA": str(tmp_path)}) == tmp_path
    assert cifar10_cache_dir({}).parts[-3:] == (".cache", "csdm", "test-data")


def test_the_archive_is_extracted_to_an_image_folder(tmp_path):
    tree = tmp_path / "src" / "cifar10"
    for split in ("train", "test"):
        (tree / split / "airplane").mkdir(parents=True)
        (tree / split / "airplane" / "0001.jpg").write_bytes(b"not decoded here")
    archive = tmp_path / "c.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="cifar10")
    folder = extract_cifar10(archive, tmp_path / "out")
    assert folder == tmp_path / "out" / "cifar10" and is_image_folder(folder)
    with tarfile.open(tmp_path / "wrong.tar.gz", "w:gz") as tar:
        tar.add(tree / "train", arcname="other/train")
    with pytest.raises(Cifar10Unavailable, match="no train/ and test/"):
        extract_cifar10(tmp_path / "wrong.tar.gz", tmp_path / "out2")
