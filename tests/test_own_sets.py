"""Sets from anywhere (synsets.py): evaluate.py --syn reads a tensor file or an image folder as well as its own
synthetic.pt, on the data set its command line names. An exported set reads back as itself, a tensor file
evaluates as the synthetic.pt that holds the same set, and every problem is one line naming --syn, exit code 2,
before anything is written. All on the in-memory tiny set (conftest.make_tiny_data)."""
import json

import pytest
import torch
from PIL import Image

import evaluate
import synsets
from conftest import make_tiny_data
from networks import depth_for_size
from runs import export_image_folder

# not in sorted order, one with a slash: a reader that numbered the folders by their sorted position, or that did
# not spell a name as --export does, would label the images wrongly
CLASS_NAMES = ["zebra", "T-shirt/top", "cat", "ant"]
PER_CLASS = 12  # files 0.png .. 11.png: sorted as text, 10.png would come before 2.png


def tiny(channels=3):
    data = make_tiny_data(size=16, channels=channels)
    data.class_names = list(CLASS_NAMES)
    return data


@pytest.fixture
def data(monkeypatch):
    """evaluate.py's data set is the tiny one, whatever --dataset and the set's config say."""
    data = tiny()
    monkeypatch.setattr(evaluate, "load_long_tailed", lambda *a, **k: data)
    return data


def project_set(data, eight_bit: bool) -> dict:
    """A synthetic.pt of PER_CLASS normalised float images a class, grouped by class as distill.py writes them.
    eight_bit: its pixels are 8-bit levels (data.normalise(u)), the ones --export's PNGs hold exactly. Its
    config asks for the field's ConvNet, the network a set from elsewhere is evaluated with."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(data.num_classes).repeat_interleave(PER_CLASS)
    images = torch.randn((len(labels), data.channels, data.image_size, data.image_size), generator=g)
    if eight_bit:
        pixels = data.denormalise(images).mul(255).round().to(torch.uint8)
        images = data.normalise(pixels)
    config = {"format_version": 1, "method": "dm", "dataset": "cifar10", "data_dir": None, "imbalance_factor": 4.0,
              "seed": 0, "val_per_class": 2, "n_max": 12, "image_size": None, "ipc": PER_CLASS // 4, "factor": 2,
              "width": 128, "depth": depth_for_size(data.image_size), "pooling": "avg", "norm": "instance"}
    return {"images": images, "labels": labels, "class_names": list(data.class_names), "mean": list(data.mean),
            "std": list(data.std), "class_counts": data.class_counts, "config": config}


def evaluated(syn, out) -> dict:
    evaluate.main(["--syn", str(syn), "--num-eval", "1", "--epochs", "2", "--device", "cpu", "--precision", "fp32",
                   "--out", str(out)])
    return json.loads((out / "results.json").read_text())


def read(path, data) -> dict:
    return synsets.fit_own_set(synsets.read_set(str(path)), data, str(path))


def test_an_exported_set_reads_back_and_evaluates_as_the_set(data, tmp_path):
    """--export a synthetic.pt whose pixels are 8-bit levels, then --syn the folder: the same images in the same
    order with the data set's labels (folders matched by name, files in number order), so the same network
    trained on it scores the same, class for class."""
    synthetic = project_set(data, eight_bit=True)
    torch.save(synthetic, tmp_path / "synthetic.pt")
    evaluate.main(["--syn", str(tmp_path / "synthetic.pt"), "--export", str(tmp_path / "images")])
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["T-shirt_top", "ant", "cat", "zebra"]
    own = read(tmp_path / "images", data)
    assert torch.equal(own["images"], synthetic["images"]) and torch.equal(own["labels"], synthetic["labels"])
    of_set = evaluated(tmp_path / "synthetic.pt", tmp_path / "set")
    of_folder = evaluated(tmp_path / "images", tmp_path / "folder")
    assert of_folder["accs"] == of_set["accs"] and of_folder["per_class"] == of_set["per_class"]
    assert of_folder["fingerprint"]["data_sha256"] == of_set["fingerprint"]["data_sha256"]  # the very tensors
    assert of_folder["fingerprint"]["network"] == of_set["fingerprint"]["network"]
    assert of_folder["evaluated"] == f"image folder of {4 * PER_CLASS} images ({tmp_path / 'images'})"
    assert of_folder["factor"] is None and len(of_folder["syn_sha256"]) == 64  # no factor known, unless typed


def test_a_grey_set_reads_back_from_its_export(tmp_path):
    """--export writes a grey image as RGB with three equal channels (torchvision's save_image): read for a grey
    data set, it is grey again, the same tensor."""
    data = tiny(channels=1)
    synthetic = project_set(data, eight_bit=True)
    export_image_folder(synthetic["images"], synthetic["labels"], data.mean, data.std, data.class_names,
                        tmp_path / "images")
    own = read(tmp_path / "images", data)
    assert torch.equal(own["images"], synthetic["images"]) and torch.equal(own["labels"], synthetic["labels"])


def test_a_tensor_file_evaluates_as_the_same_synthetic_pt(data, tmp_path):
    """{"images", "labels", "mean", "std"} with float images normalised with the data set's mean and std: taken
    as they are, so it scores as the synthetic.pt of the same images (not 8-bit: nothing is quantised)."""
    synthetic = project_set(data, eight_bit=False)
    torch.save(synthetic, tmp_path / "synthetic.pt")
    torch.save({key: synthetic[key] for key in ("images", "labels", "mean", "std")}, tmp_path / "plain.pt")
    assert torch.equal(read(tmp_path / "plain.pt", data)["images"], synthetic["images"])
    of_set = evaluated(tmp_path / "synthetic.pt", tmp_path / "set")
    of_plain = evaluated(tmp_path / "plain.pt", tmp_path / "plain")
    assert of_plain["accs"] == of_set["accs"] and of_plain["per_class"] == of_set["per_class"]
    assert of_plain["evaluated"] == f"tensor file of {4 * PER_CLASS} images ({tmp_path / 'plain.pt'})"


def test_every_spelling_of_a_tensor_file_reads_as_the_same_set(tmp_path):
    """uint8 pixels in a tuple or list, [0, 1] float pixels, images normalised with another mean and std, labels
    that index another order of the class names: all the same normalised images and data-set labels."""
    data = tiny()
    synthetic = project_set(data, eight_bit=True)
    images, labels = synthetic["images"], synthetic["labels"]
    pixels = data.denormalise(images).mul(255).round().to(torch.uint8)
    mean, std = [0.4, 0.45, 0.5], [0.2, 0.3, 0.4]
    renamed = list(reversed(CLASS_NAMES))  # label l names renamed[l]: the data set's class 3 - l
    exact = {"tuple": (pixels, labels), "list": [pixels, labels.int()],
             "names": {"images": images, "labels": 3 - labels, "class_names": renamed, "mean": data.mean,
                       "std": data.std}}
    close = {"unit": {"images": pixels / 255, "labels": labels},
             "other-normalisation": {"images": (pixels / 255 - torch.tensor(mean).view(1, 3, 1, 1))
                                     / torch.tensor(std).view(1, 3, 1, 1), "labels": labels, "mean": mean,
                                     "std": std}}
    for name, content in (exact | close).items():
        torch.save(content, tmp_path / f"{name}.pt")
        own = read(tmp_path / f"{name}.pt", data)
        assert torch.equal(own["labels"], labels), name
        assert (torch.equal(own["images"], images) if name in exact
                else torch.allclose(own["images"], images, atol=1e-5)), name


# ----------------------------------------------------------------------------------------
# Refusals: one line naming --syn and the problem, exit code 2, --out never made

def exported(tmp_path) -> str:
    data = tiny()
    synthetic = project_set(data, eight_bit=True)
    export_image_folder(synthetic["images"], synthetic["labels"], data.mean, data.std, data.class_names,
                        tmp_path / "images")
    return str(tmp_path / "images")


def folder_without_a_class(tmp_path):
    folder = exported(tmp_path)
    for file in (tmp_path / "images" / "ant").iterdir():
        file.unlink()
    (tmp_path / "images" / "ant").rmdir()
    return folder


def folder_with(tmp_path, name: str, image) -> str:
    folder = exported(tmp_path)
    if isinstance(image, bytes):
        (tmp_path / "images" / "cat" / name).write_bytes(image)
    else:
        image.save(tmp_path / "images" / "cat" / name)
    return folder


def renamed_folder(tmp_path) -> str:
    folder = exported(tmp_path)
    (tmp_path / "images" / "cat").rename(tmp_path / "images" / "2")
    return folder


def empty_class_folder(tmp_path) -> str:
    folder = exported(tmp_path)
    (tmp_path / "images" / "horse").mkdir()
    return folder


def tensor_file(tmp_path, **changes) -> str:
    synthetic = project_set(tiny(), eight_bit=True)
    content = {"images": synthetic["images"], "labels": synthetic["labels"], "mean": synthetic["mean"],
               "std": synthetic["std"]} | changes
    torch.save({key: value for key, value in content.items() if value is not None}, tmp_path / "set.pt")
    return str(tmp_path / "set.pt")


def text_file(tmp_path) -> str:
    (tmp_path / "set.pt").write_text("not a tensor file")
    return str(tmp_path / "set.pt")


REFUSALS = {
    "missing path": (lambda tmp: str(tmp / "nowhere"), "does not exist"),
    "folder without a class": (folder_without_a_class, "lacks 1 of the 4 classes of tiny-LT (ant)"),
    "image of the wrong size": (lambda tmp: folder_with(tmp, "12.png", Image.new("RGB", (12, 12))),
                                "cat/12.png is a 12 x 12 RGB image, but tiny-LT's are 16 x 16 RGB"),
    "grey image for an RGB data set": (lambda tmp: folder_with(tmp, "12.png", Image.new("L", (16, 16))),
                                       "cat/12.png is a 16 x 16 grey image"),
    "image with alpha": (lambda tmp: folder_with(tmp, "12.png", Image.new("RGBA", (16, 16))), "is a RGBA image"),
    "unreadable image": (lambda tmp: folder_with(tmp, "12.png", b"not a png"), "cat/12.png cannot be read"),
    "folder the data set does not name": (renamed_folder, "has class folders ['2'] that tiny-LT does not name"),
    "class folder without images": (empty_class_folder, "horse holds no images"),
    "labels out of range": (lambda tmp: tensor_file(tmp, labels=torch.arange(48) % 5), "outside 0..3"),
    "a label too few": (lambda tmp: tensor_file(tmp, labels=torch.arange(47) % 4), "has 47 labels for 48 images"),
    "float labels": (lambda tmp: tensor_file(tmp, labels=torch.zeros(48)), "not a (N,) tensor of class indices"),
    "images of the wrong size": (lambda tmp: tensor_file(tmp, images=torch.zeros(48, 3, 8, 8)),
                                 "3 x 8 x 8 images (channels x height x width), but tiny-LT has 3 x 16 x 16"),
    "images of the wrong channel count": (lambda tmp: tensor_file(tmp, images=torch.zeros(48, 1, 16, 16), mean=[0.5],
                                                                  std=[0.25]), "1 x 16 x 16 images"),
    "normalised floats taken for pixels": (lambda tmp: tensor_file(tmp, mean=None, std=None),
                                           "taken as pixels in [0, 1]"),
    "a mean without a std": (lambda tmp: tensor_file(tmp, std=None), "gives mean without std"),
    "a class without images": (lambda tmp: tensor_file(tmp, labels=torch.arange(48) % 3), "no image of 1 of the 4"),
    "unreadable file": (text_file, "is not a readable synthetic set"),
    "no images key": (lambda tmp: tensor_file(tmp, images=None), "holds a dict without ['images']"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_set_that_does_not_fit_is_refused_in_one_line(case, data, tmp_path, capsys):
    make, words = REFUSALS[case]
    syn = make(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--syn", syn, "--num-eval", "1", "--epochs", "1", "--device", "cpu", "--out",
                       str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("evaluate.py: error: --syn: ") and words in err, err
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_export_reads_only_a_synthetic_pt(tmp_path, capsys):
    """--export writes distill.py's synthetic.pt out; a folder is one already: refused in one line."""
    folder = exported(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--syn", folder, "--export", str(tmp_path / "again")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "is a folder" in err and not (tmp_path / "again").exists(), err
