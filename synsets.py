"""Reading the synthetic sets a user hands to evaluate.py --syn PATH, in any of three formats, into the form
evaluate.py trains on: normalised float32 images (N, C, H, W), int64 labels (N,), the data set's class names, its
mean and std, and the SHA-256 of what was read (results.json's syn_sha256).

1. This project's synthetic.pt (distill.py): a dict of images, labels, class_names, mean, std and config, with
   config["format_version"] == runs.FORMAT_VERSION; its config names the data set it was distilled from.
   load_synthetic reads it and check_matches checks it against that data set.
2. A tensor file, read with torch.load(path, weights_only=True): a dict {"images": (N, C, H, W), "labels": (N,)},
   optionally with "class_names", "mean" and "std", or a tuple / list (images, labels). A dict with a "config" is
   taken for a synthetic.pt (1.) and checked as one.
3. An image folder DIR/<class>/<file> (.png, .jpg, ...: data_lt.IMAGE_SUFFIXES), as evaluate.py --export writes it
   and torchvision's ImageFolder reads it. Only the files directly in a class folder are read; other files and
   deeper folders are not.

Sets 2 and 3 do not say which data set they are of: evaluate.py takes it from its command line (--dataset,
--imbalance-factor, --data-dir, ...) and fit_own_set checks the set against it. read_set reads any of the three,
checking what needs no data set; nothing is written.

Pixel scale. uint8 images (an image folder's always) are pixels 0..255, and float images in a tensor file that
gives no "mean" and "std" are pixels in [0, 1] (checked: a value outside [0, 1] is refused, for it would be
normalised images taken for pixels); both are normalised with the data set's mean and std as its own images are
(data_lt.LongTailedData.normalise). Float images in a dict that gives "mean" and "std" (one number per channel)
are taken as normalised with those: kept as they are where those are the data set's (to 1e-6), else brought to the
data set's normalisation, (x * std + mean - data mean) / data std, the same pixels. A tuple has no place for a
mean and std: hand in normalised images as a dict.

Classes. The class folders of an image folder, and a dict's "class_names", are matched to the data set's class
names by name, not by position: label l is the class named names[l] (a folder named as --export writes the name,
"/" and "\\" as "_": Fashion-MNIST's "T-shirt/top" is T-shirt_top/). Every class of the data set must be named
and no other class. Without "class_names", label l is the data set's class l. Every class of the data set must
have at least one image (a class without any would score 0: a folder or labels gone wrong).

Order. A tensor file's images stay in its order. A folder's come class by class in the data set's order, each
class's files by name, numerically where the names are numbers (0.png, 1.png, ..., 10.png, as --export numbers
them), so that an exported set reads back in the order it was exported in when its images were grouped by class
in class order (as distill.py writes them).

Round trip. --export writes each image's pixels (x * std + mean) clamped to [0, 1], rounded to 8 bits
(round(255 p)): a set that is 8-bit pixels normalised (data.normalise(u)) reads back from its folder as the same
tensor; any other to within half an 8-bit level of its clamped pixels.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch

from data_lt import IMAGE_SUFFIXES, UsageError
from runs import FORMAT_VERSION, export_image_folder

PROJECT_SET, TENSOR_FILE, IMAGE_FOLDER = "synthetic.pt", "tensor file", "image folder"
GIVE_PROJECT = "give the synthetic.pt written by distill.py"
GIVE_ANY = ("give the synthetic.pt written by distill.py, a tensor file holding {'images': (N, C, H, W), "
            "'labels': (N,)} or (images, labels), or an image folder DIR/<class>/*.png")
SAME_MEAN_STD = 1e-6  # a given mean / std this close to the data set's is its own: the images are kept as they are


# ----------------------------------------------------------------------------------------
# Any format: what read_set returns, before a data set is known

def read_set(path: str) -> dict:
    """--syn PATH in whichever format it is: distill.py's synthetic.pt as load_synthetic gives it (with its
    "config"); a tensor file or an image folder as {"format", "images" (a tensor; a folder's: a list of uint8
    (C, H, W), one a file), "labels" (int64), "names" (the class names the labels index, or None), "mean",
    "std" (or None), "files" (a folder's), "sha256"}, for fit_own_set. One line where PATH is none of them."""
    if Path(path).is_dir():
        return read_image_folder(Path(path))
    content, loaded = load_file(path, GIVE_ANY)
    if isinstance(loaded, dict) and "config" in loaded:
        return check_project_set(loaded, content, path)
    return read_tensor_file(loaded, content, path)


def load_file(path: str, give: str) -> tuple[bytes, object]:
    """The bytes of the file at path and what torch.load(weights_only=True) reads from them (no code runs)."""
    file = Path(path)
    if file.is_dir():
        raise UsageError(f"--syn: {path} is a folder; {give}")
    if not file.is_file():
        raise UsageError(f"--syn: {path} does not exist; {give}")
    try:
        content = file.read_bytes()
        return content, torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused, a truncated zip, not a torch file: all one answer
        raise UsageError(f"--syn: {path} is not a readable synthetic set ({type(error).__name__}); {give}")


# ----------------------------------------------------------------------------------------
# 1. distill.py's synthetic.pt

def load_synthetic(path: str) -> dict:
    """Read distill.py's synthetic.pt safely (weights_only) and check its keys and format version; its "sha256"
    is that of the bytes read, the very ones evaluated. The format --export writes out."""
    content, synthetic = load_file(path, GIVE_PROJECT)
    return check_project_set(synthetic, content, path)


def check_project_set(synthetic, content: bytes, path: str) -> dict:
    """A synthetic.pt read from `content`: its keys and format version checked, its "sha256" added."""
    missing = {"images", "labels", "class_names", "config"} - set(synthetic if isinstance(synthetic, dict) else {})
    if missing:
        raise UsageError(f"--syn: {path} lacks {sorted(missing)}; {GIVE_PROJECT}")
    version = synthetic["config"].get("format_version")
    if version != FORMAT_VERSION:
        raise UsageError(f"--syn: {path} has format version {version}, this code reads {FORMAT_VERSION}; "
                         f"distill it again with this version")
    return synthetic | {"format": PROJECT_SET, "sha256": hashlib.sha256(content).hexdigest()}


def check_matches(synthetic: dict, data, path: str) -> None:
    """A synthetic.pt's images must fit the data set the networks are tested on."""
    images, labels = synthetic["images"], synthetic["labels"]
    if images.dim() != 4:
        raise UsageError(f"--syn: {path} holds images of shape {tuple(images.shape)}, not (N, channels, height, "
                         f"width); give a synthetic.pt that distill.py wrote")
    have = (images.shape[1], images.shape[2], images.shape[3], len(synthetic["class_names"]))
    want = (data.channels, data.image_size, data.image_size, data.num_classes)
    if have != want:
        raise UsageError(f"--syn: {path} holds {have[0]} x {have[1]} x {have[2]} images of {have[3]} classes, but "
                         f"{data.name} has {want[0]} x {want[1]} x {want[2]} images of {want[3]} classes; "
                         f"evaluate it with the data set it was distilled from")
    if list(synthetic["class_names"]) != list(data.class_names):
        raise UsageError(f"--syn: {path} names its classes {list(synthetic['class_names'])[:3]}..., but {data.name} "
                         f"{list(data.class_names)[:3]}...; evaluate it with the data set it was distilled from")
    if len(labels) != len(images) or labels.min() < 0 or labels.max() >= data.num_classes:
        raise UsageError(f"--syn: {path} has labels outside 0..{data.num_classes - 1} or a label count that "
                         f"differs from its image count; distill it again")


# ----------------------------------------------------------------------------------------
# 2. A tensor file

def read_tensor_file(loaded, content: bytes, path: str) -> dict:
    """A tensor file's set (see the module's docstring), checked as far as it can be without a data set: the
    tensors' kinds and shapes, one label per image, the class names, the pixel scale."""
    if isinstance(loaded, dict):
        missing = {"images", "labels"} - loaded.keys()
        if missing:
            raise UsageError(f"--syn: {path} holds a dict without {sorted(missing)} (its keys: "
                             f"{sorted(map(str, loaded))[:6]}); {GIVE_ANY}")
        images, labels, names = loaded["images"], loaded["labels"], loaded.get("class_names")
        mean, std = loaded.get("mean"), loaded.get("std")
    elif isinstance(loaded, (tuple, list)) and len(loaded) == 2:
        (images, labels), names, mean, std = loaded, None, None, None
    else:
        raise UsageError(f"--syn: {path} holds {describe(loaded)}; {GIVE_ANY}")
    images, labels = check_tensors(images, labels, path)
    mean, std = check_scale(images, mean, std, path)
    return {"format": TENSOR_FILE, "images": images, "labels": labels, "names": check_names(names, path),
            "mean": mean, "std": std, "sha256": hashlib.sha256(content).hexdigest()}


def describe(value) -> str:
    """A value in words, for refusals: 'a float32 tensor of shape (2, 3)', 'a str'."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def check_tensors(images, labels, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """images: a non-empty (N, C, H, W) tensor of uint8 or finite floats; labels: (N,) integers. Labels as int64."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) == 0:
        raise UsageError(f"--syn: {path}'s images are {describe(images)}, not a (N, channels, height, width) tensor "
                         f"of N >= 1 images; save them as one")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise UsageError(f"--syn: {path}'s images are {describe(images)}; give uint8 pixels (0..255) or floats")
    if images.is_floating_point() and not torch.isfinite(images).all():
        raise UsageError(f"--syn: {path}'s images hold NaN or infinite values; give finite ones")
    integer = isinstance(labels, torch.Tensor) and not (labels.is_floating_point() or labels.is_complex()
                                                        or labels.dtype == torch.bool)
    if not integer or labels.dim() != 1:
        raise UsageError(f"--syn: {path}'s labels are {describe(labels)}, not a (N,) tensor of class indices; "
                         f"save them as one (torch.long)")
    if len(labels) != len(images):
        raise UsageError(f"--syn: {path} has {len(labels)} labels for {len(images)} images; give one label per image")
    return images, labels.long()


def check_scale(images: torch.Tensor, mean, std, path: str) -> tuple[list | None, list | None]:
    """The pixel scale rule (module docstring): a mean and std come together, one positive finite number per
    channel, and float images without them lie in [0, 1]. The mean and std as lists, or (None, None)."""
    if (mean is None) != (std is None):
        raise UsageError(f"--syn: {path} gives {'std' if mean is None else 'mean'} without "
                         f"{'mean' if mean is None else 'std'}; give both (the normalisation of float images), "
                         f"or neither for pixels")
    if mean is None:
        if images.is_floating_point() and (images.min() < 0 or images.max() > 1):
            raise UsageError(f"--syn: {path}'s float images span {float(images.min()):.3g}..{float(images.max()):.3g}"
                             f", but without a 'mean' and 'std' they are taken as pixels in [0, 1]; if they are "
                             f"normalised, save them in a dict with the 'mean' and 'std' they are normalised with")
        return None, None
    return [channel_values(values, key, images.shape[1], path) for key, values in (("mean", mean), ("std", std))]


def channel_values(values, key: str, channels: int, path: str) -> list[float]:
    """A dict's "mean" or "std": one finite number per image channel (a std's positive)."""
    try:
        numbers = torch.as_tensor(values, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        numbers = None
    if numbers is None or len(numbers) != channels or not torch.isfinite(numbers).all() or (
            key == "std" and (numbers <= 0).any()):
        raise UsageError(f"--syn: {path}'s '{key}' is {values!r}; give {channels} finite numbers, one per channel"
                         + (", each > 0" if key == "std" else ""))
    return numbers.tolist()


def check_names(names, path: str) -> list[str] | None:
    """A dict's "class_names": None, or distinct strings."""
    if names is None:
        return None
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names) \
            or len(set(names)) < len(names):
        raise UsageError(f"--syn: {path}'s 'class_names' are not a list of distinct strings; give the data set's "
                         f"class names (label l names class_names[l]), or leave them out")
    return list(names)


# ----------------------------------------------------------------------------------------
# 3. An image folder

def read_image_folder(folder: Path) -> dict:
    """Every image file directly in each class folder of `folder` (folders sorted by name, each's files by
    file_order), decoded as uint8 (C, H, W): 1 channel for a grey file, 3 for an RGB one. Labels index the
    sorted folder names; the SHA-256 is over each file's name under folder and its bytes, in reading order."""
    names = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if not names:
        raise UsageError(f"--syn: {folder} holds no class folders; give an image folder DIR/<class>/*.png, as "
                         f"--export writes it")
    digest, images, labels, files = hashlib.sha256(), [], [], []
    for label, name in enumerate(names):
        found = sorted((p for p in (folder / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                       key=file_order)
        if not found:
            raise UsageError(f"--syn: {folder / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); put "
                             f"the class's images there, or remove the folder")
        for file in found:
            content = read_bytes(file)
            digest.update(f"{name}/{file.name}\0{len(content)}\0".encode())
            digest.update(content)
            images.append(decode_image(file, content))
        labels += [label] * len(found)
        files += found
    return {"format": IMAGE_FOLDER, "images": images, "labels": torch.tensor(labels, dtype=torch.int64),
            "names": names, "mean": None, "std": None, "files": files, "sha256": digest.hexdigest()}


def file_order(file: Path) -> tuple:
    """Files named by numbers first, by their value (0.png, 1.png, ..., 10.png), then the others by name."""
    number = file.stem.isascii() and file.stem.isdigit()
    return (0, int(file.stem), file.name) if number else (1, 0, file.name)


def read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as error:
        raise UsageError(f"--syn: {file} cannot be read ({type(error).__name__}); check its permissions, or remove it")


def decode_image(file: Path, content: bytes) -> torch.Tensor:
    """One image file's pixels as uint8 (C, H, W): an 8-bit grey (L) or RGB file, else one line."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(content)) as image:
            mode, array = image.mode, np.asarray(image) if image.mode in ("L", "RGB") else None
    except Exception as error:  # PIL raises many kinds (OSError, SyntaxError, ValueError...) for a broken file
        raise UsageError(f"--syn: {file} cannot be read as an image ({type(error).__name__}); remove or replace it")
    if array is None:
        raise UsageError(f"--syn: {file} is a {mode} image; give 8-bit grey (L) or RGB images, as --export writes")
    return torch.from_numpy(np.atleast_3d(array).copy()).permute(2, 0, 1)


def folder_name(class_name) -> str:
    """The folder --export writes a class to (runs.export_image_folder): its name, '/' and '\\' as '_'."""
    return str(class_name).replace("/", "_").replace("\\", "_")


# ----------------------------------------------------------------------------------------
# A tensor file's or a folder's set, on the data set the command line names

def fit_own_set(own: dict, data, path: str) -> dict:
    """read_set's tensor file or image folder checked against `data` (the image size and channels, the labels'
    range, the class names, an image of every class) and brought into the form evaluate.py trains on:
    {"format", "images" (normalised float32), "labels" (the data set's class indices), "class_names", "mean",
    "std" (the data set's), "sha256"}. A folder's images come in the data set's class order."""
    labels = data_labels(own, data, path)
    images = folder_tensor(own, data) if own["format"] == IMAGE_FOLDER else own["images"]
    check_shape(images, data, path)
    check_every_class(labels, data, path)
    images = normalised(images, own["mean"], own["std"], data)
    if own["format"] == IMAGE_FOLDER:
        order = torch.argsort(labels, stable=True)
        images, labels = images[order], labels[order]
    return {"format": own["format"], "images": images, "labels": labels, "class_names": list(data.class_names),
            "mean": list(data.mean), "std": list(data.std), "sha256": own["sha256"]}


def data_labels(own: dict, data, path: str) -> torch.Tensor:
    """Each image's class index in the data set: label l is the class named own["names"][l] (matched by name,
    a folder's as --export spells it), or without names the data set's class l."""
    names, labels = own["names"], own["labels"]
    count = data.num_classes if names is None else len(names)
    if labels.min() < 0 or labels.max() >= count:
        raise UsageError(f"--syn: {path} has labels {int(labels.min())}..{int(labels.max())}, outside 0..{count - 1} "
                         f"({'the classes of ' + data.name if names is None else 'its class_names'}); give labels "
                         f"that index them, or the data set the set is of (--dataset)")
    if names is None:
        return labels
    folder = own["format"] == IMAGE_FOLDER
    wanted = [folder_name(name) if folder else str(name) for name in data.class_names]
    check_names_match(names, wanted, data, path, "class folders" if folder else "class_names")
    return torch.tensor([wanted.index(name) for name in names], dtype=torch.int64)[labels]


def check_names_match(names: list[str], wanted: list[str], data, path: str, what: str) -> None:
    """The set names exactly the data set's classes: names it does not know first, then the ones it lacks."""
    unknown = [name for name in names if name not in wanted]
    if unknown:
        raise UsageError(f"--syn: {path} has {what} {unknown[:3]} that {data.name} does not name (its classes: "
                         f"{', '.join(wanted[:4])}, ...); name them as the data set does, or give the data set the "
                         f"set is of (--dataset)")
    missing = [name for name in wanted if name not in names]
    if missing:
        layout = "give each a folder DIR/<class>/ as --export writes them" if what == "class folders" else \
            "name every class"
        raise UsageError(f"--syn: {path} lacks {len(missing)} of the {len(wanted)} classes of {data.name} "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}) in its {what}; {layout}, "
                         f"or give the data set the set is of (--dataset)")


def folder_tensor(own: dict, data) -> torch.Tensor:
    """A folder's images as one uint8 (N, C, H, W) tensor, each file checked against the data set's size and
    channels. For a grey data set an RGB file whose three channels are equal is grey: --export writes grey
    images so (torchvision's save_image repeats the channel)."""
    want = (data.channels, data.image_size, data.image_size)
    images = []
    for file, image in zip(own["files"], own["images"]):
        if data.channels == 1 and image.shape[0] == 3 and (image == image[:1]).all():
            image = image[:1]
        if tuple(image.shape) != want:
            raise UsageError(f"--syn: {file} is a {kind_of(*image.shape)} image, but {data.name}'s are "
                             f"{kind_of(*want)}; give images of that size and kind, or the data set they are of "
                             f"(--dataset, --image-size)")
        images.append(image)
    return torch.stack(images)


def kind_of(channels: int, height: int, width: int) -> str:
    colour = {1: "grey", 3: "RGB"}.get(channels, f"{channels}-channel")
    return f"{width} x {height} {colour}"


def check_shape(images: torch.Tensor, data, path: str) -> None:
    """A tensor file's images have the data set's channels, height and width."""
    want = (data.channels, data.image_size, data.image_size)
    if tuple(images.shape[1:]) != want:
        raise UsageError(f"--syn: {path} holds {images.shape[1]} x {images.shape[2]} x {images.shape[3]} images "
                         f"(channels x height x width), but {data.name} has {want[0]} x {want[1]} x {want[2]}; give "
                         f"images of that shape, or the data set they are of (--dataset, --image-size)")


def check_every_class(labels: torch.Tensor, data, path: str) -> None:
    """Every class of the data set has at least one image."""
    empty = (torch.bincount(labels, minlength=data.num_classes) == 0).nonzero().flatten().tolist()
    if empty:
        names = ", ".join(str(data.class_names[c]) for c in empty[:3]) + (", ..." if len(empty) > 3 else "")
        raise UsageError(f"--syn: {path} has no image of {len(empty)} of the {data.num_classes} classes of "
                         f"{data.name} ({names}); give every class at least one, or check the labels and --dataset")


def normalised(images: torch.Tensor, mean: list | None, std: list | None, data) -> torch.Tensor:
    """float32 images in the data set's normalisation (the pixel scale rule of the module's docstring)."""
    if images.dtype == torch.uint8:
        return data.normalise(images)
    data_mean, data_std = channel_column(data.mean), channel_column(data.std)
    if mean is None:
        return (images.float() - data_mean) / data_std
    mean, std = channel_column(mean), channel_column(std)
    if torch.allclose(mean, data_mean, rtol=0, atol=SAME_MEAN_STD) and \
            torch.allclose(std, data_std, rtol=0, atol=SAME_MEAN_STD):
        return images.float()
    return (images.float() * std + mean - data_mean) / data_std


def channel_column(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def export_set(syn: str | None, export: str) -> None:
    """evaluate.py --syn SET --export DIR: the distilled set as an image folder DIR/<class>/<n>.png (which --syn
    DIR reads back), nothing trained; DIR must not exist yet."""
    if syn is None:
        raise UsageError("--export writes a synthetic set: give it with --syn")
    folder = Path(export)
    if folder.exists():
        raise UsageError(f"--export: {folder} already exists; give a new folder")
    synthetic = load_synthetic(syn)
    count = export_image_folder(synthetic["images"], synthetic["labels"], synthetic["mean"], synthetic["std"],
                                synthetic["class_names"], folder)
    print(f"wrote {count} images to {folder}/<class>/<n>.png")
