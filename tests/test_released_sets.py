"""The distilled sets released under results/sets/: each reads with weights_only=True, says in its own
options what its name says, holds IPC x factor^2 images per class, is the very set its results.json
evaluated at the full budget, and exports to an image folder that reads back as the same pixels."""
import json
import re
from pathlib import Path

import pytest
import torch
from torchvision.io import read_image

from evaluate import load_synthetic
from runs import export_image_folder

ROOT = Path(__file__).resolve().parents[1]
SETS = sorted((ROOT / "results" / "sets").glob("*.pt"))
NAME = re.compile(r"(?P<dataset>[a-z0-9]+)-if(?P<imbalance>\d+)-ipc(?P<ipc>\d+)-(?P<label>[a-z0-9-]+)\.pt")


def released(path: Path) -> tuple[dict, dict]:
    match = NAME.fullmatch(path.name)
    assert match, f"{path.name}: not <dataset>-if<IF>-ipc<IPC>-<method>.pt"
    return match.groupdict(), torch.load(path, weights_only=True)


@pytest.mark.skipif(not SETS, reason="no set released yet")
@pytest.mark.parametrize("path", SETS, ids=[p.name for p in SETS])
def test_released_set_is_what_its_name_says(path):
    name, synthetic = released(path)
    config = synthetic["config"]
    assert (config["dataset"], config["imbalance_factor"], config["ipc"]) == (
        name["dataset"], float(name["imbalance"]), int(name["ipc"]))
    assert name["label"].split("-")[0] == config["method"]  # dm-f1: dm at factor 1
    assert (config["iterations"], config["batch_real"]) == (20000, 256)  # the field's full budget
    per_class = config["ipc"] * config["factor"] ** 2
    counts = torch.bincount(synthetic["labels"], minlength=len(synthetic["class_names"]))
    assert counts.tolist() == [per_class] * len(synthetic["class_names"])
    assert synthetic["images"].shape[0] == counts.sum() and torch.isfinite(synthetic["images"]).all()


@pytest.mark.skipif(not SETS, reason="no set released yet")
@pytest.mark.parametrize("path", SETS, ids=[p.name for p in SETS])
def test_released_set_is_the_evaluated_one(path):
    """The released copy is byte-identical to the full cell's synthetic.pt, and the results.json beside
    it evaluated that file with 5 networks x 1000 epochs."""
    name, _ = released(path)
    run = ROOT / "results" / "full_cell" / "dm" / name["dataset"] / f"if{name['imbalance']}" / f"ipc{name['ipc']}"
    run = run / name["label"]
    assert (run / "synthetic.pt").read_bytes() == path.read_bytes()
    result = json.loads((run / "results.json").read_text())
    assert (result["num_eval"], result["epochs"], result["split"]) == (5, 1000, "test")
    assert result["evaluated"].endswith(f"({run.relative_to(ROOT) / 'synthetic.pt'})")


@pytest.mark.skipif(not SETS, reason="no set released yet")
def test_released_set_exports_to_the_same_pixels(tmp_path):
    """evaluate.py --export writes 8-bit PNGs: read back, each is the set's de-normalised image to 1/255."""
    synthetic = load_synthetic(str(SETS[0]))
    count = export_image_folder(synthetic["images"], synthetic["labels"], synthetic["mean"], synthetic["std"],
                                synthetic["class_names"], tmp_path)
    assert count == len(synthetic["labels"])
    mean, std = (torch.tensor(synthetic[key]).view(-1, 1, 1) for key in ("mean", "std"))
    first_of_class = {}
    for index, label in enumerate(synthetic["labels"].tolist()):
        first_of_class.setdefault(label, index)
    for label, index in first_of_class.items():
        png = read_image(str(tmp_path / synthetic["class_names"][label] / "0.png")).float() / 255
        expected = (synthetic["images"][index].float() * std + mean).clamp(0, 1)
        assert (png - expected).abs().max() <= 0.5 / 255 + 1e-6
