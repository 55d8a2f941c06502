"""The distilled sets released under results/sets/: each reads with weights_only=True, says in its own
options what its name says, holds IPC x factor^2 images per class, is the file its results.json evaluated
at the full budget, and exports to an image folder that reads back as the same pixels."""
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from synsets import load_synthetic
from runs import export_image_folder

SETS = sorted((ROOT / "results" / "sets").glob("*.pt"))
NAME = re.compile(r"(?P<dataset>[a-z0-9]+)-if(?P<imbalance>\d+)-ipc(?P<ipc>\d+)-(?P<label>[a-z0-9-]+)\.pt")
each_set = pytest.mark.parametrize("path", SETS or [pytest.param(None, marks=pytest.mark.skip("none released"))],
                                   ids=[p.name for p in SETS] or None)


def name_of(path: Path) -> dict:
    match = NAME.fullmatch(path.name)
    assert match, f"{path.name}: not <dataset>-if<IF>-ipc<IPC>-<method>.pt"
    return match.groupdict()


@each_set
def test_released_set_is_what_its_name_says(path):
    name, synthetic = name_of(path), torch.load(path, weights_only=True)
    config = synthetic["config"]
    assert (config["dataset"], config["imbalance_factor"], config["ipc"]) == (
        name["dataset"], float(name["imbalance"]), int(name["ipc"]))
    method, _, variant = name["label"].partition("-")
    assert method == config["method"] and config["factor"] == (1 if variant == "f1" else 2)
    assert (config["iterations"], config["batch_real"]) == (20000, 256)  # the field's full budget
    per_class = config["ipc"] * config["factor"] ** 2
    counts = torch.bincount(synthetic["labels"], minlength=len(synthetic["class_names"]))
    assert counts.tolist() == [per_class] * len(synthetic["class_names"])
    images = synthetic["images"]
    assert images.dtype == torch.float32 and images.dim() == 4 and len(images) == int(counts.sum())
    assert torch.isfinite(images).all()


@each_set
def test_released_set_is_the_evaluated_one(path):
    """The released copy is byte-identical to the full cell's synthetic.pt, the file the results.json beside
    it names as evaluated (by SHA-256 where the result records it) with 5 networks x 1000 epochs, DM's
    protocol, on the test split."""
    name = name_of(path)
    run = ROOT / "results" / "full_cell" / "dm" / name["dataset"] / f"if{name['imbalance']}" / f"ipc{name['ipc']}"
    run = run / name["label"]
    released = path.read_bytes()
    assert (run / "synthetic.pt").read_bytes() == released
    result = json.loads((run / "results.json").read_text())
    assert (result["num_eval"], result["epochs"], result["protocol"], result["split"]) == (5, 1000, "dm", "test")
    evaluated = Path(re.fullmatch(r".*\((.+)\)", result["evaluated"]).group(1))
    assert (ROOT / evaluated).resolve() == (run / "synthetic.pt").resolve()
    digest = hashlib.sha256(released).hexdigest()
    assert load_synthetic(str(path))["sha256"] == digest
    if "syn_sha256" in result:
        assert result["syn_sha256"] == digest


@each_set
def test_released_set_exports_to_the_same_pixels(path, tmp_path):
    """evaluate.py --export writes 8-bit PNGs: read back, every image is the set's de-normalised image to
    half a level of 255 (save_image rounds)."""
    synthetic = load_synthetic(str(path))
    count = export_image_folder(synthetic["images"], synthetic["labels"], synthetic["mean"], synthetic["std"],
                                synthetic["class_names"], tmp_path)
    assert count == len(synthetic["labels"])
    mean, std = (torch.tensor(synthetic[key]).view(-1, 1, 1) for key in ("mean", "std"))
    seen: dict[int, int] = {}
    for image, label in zip(synthetic["images"], synthetic["labels"].tolist()):
        with Image.open(tmp_path / synthetic["class_names"][label] / f"{seen.get(label, 0)}.png") as file:
            png = torch.from_numpy(np.atleast_3d(np.array(file))).permute(2, 0, 1) / 255  # C x H x W
        seen[label] = seen.get(label, 0) + 1
        assert (png - (image * std + mean).clamp(0, 1)).abs().max() <= 0.5 / 255 + 1e-6
