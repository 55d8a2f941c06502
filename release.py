"""The released distilled sets' catalogue: `python report.py --sets results/sets` writes results/sets/README.md.

One row per set: every .pt in the folder, and every run folder's synthetic.pt under the folder above it (results/)
that is not byte-identical to one of them (a set not released, such as a second seed's), each with what its
tensors and config say, its accuracy under each protocol as the results.json files that evaluated it record it
(found by content: a results.json's syn_sha256, else the SHA-256 of the file its --syn names), its size and
SHA-256; then how to load one, and a picture of each (<name>.png beside the README). Nothing is typed in.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch

from provenance import provenance

PROTOCOLS = ("dm", "ncfm")  # a column each, evaluated or not; any other protocol found gets one too
PER_CLASS = 10  # images per class in a picture
PICTURE_BYTES = 150_000  # above this, a picture's colours are reduced to a 256-colour palette


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_sets(sets_dir: Path, root: Path) -> list[dict]:
    """The released files (sets_dir/*.pt), then the run folders' synthetic.pt under root not among them; a
    released file names the run folder's synthetic.pt it is a copy of, where one is left."""
    released = [dict(path=path, sha256=sha256(path), released=True) for path in sorted(sets_dir.glob("*.pt"))]
    runs = {}  # SHA-256: the first run folder's synthetic.pt with it
    for path in sorted(root.rglob("synthetic.pt")):
        if sets_dir.resolve() not in path.resolve().parents:
            runs.setdefault(sha256(path), path)
    for entry in released:
        entry["copy_of"] = runs.pop(entry["sha256"], None)
    return released + [dict(path=path, sha256=digest, released=False) for digest, path in runs.items()]


def find_evaluations(root: Path) -> dict[str, list[dict]]:
    """{SHA-256 of a set: [{path, result, link}]} over root's results.json files: by the syn_sha256 it records,
    else (a results.json from before that key) by the file its --syn names now, read from root's parent (the
    repository, where evaluate.py ran, for root = results/), else from the working directory."""
    found, digests = {}, {}
    for path in sorted(root.rglob("results.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        digest, link = result.get("syn_sha256"), "its syn_sha256 is this file's"
        syn = (result.get("config") or {}).get("syn")
        if digest is None and syn:
            place = next((p for p in (root.parent / syn, Path(syn)) if p.is_file()), None)
            if place is not None:
                digest = digests.setdefault(place.resolve(), sha256(place))
                link = f"it records no SHA-256; its --syn {syn} is this file now"
        if digest is not None and "acc_mean" in result:
            found.setdefault(digest, []).append(dict(path=path, result=result, link=link))
    return found


def describe(entry: dict) -> dict:
    """What the file's tensors and config say, checked against each other."""
    data = torch.load(entry["path"], weights_only=True, map_location="cpu")
    config, images, labels = data.get("config") or {}, data["images"], data["labels"]
    factor, ipc, classes = config.get("factor", 1), config.get("ipc"), len(data.get("class_names") or [])
    counts = torch.bincount(labels, minlength=classes).tolist()
    packed = data.get("packed_images")
    distilled = len(packed) if packed is not None else len(images) // factor ** 2
    size = images.shape[-1]
    tile = f"{size // factor}x{size // factor}"
    count = (f"{len(images)} images, {size}x{size}, as distilled" if factor == 1 else
             f"{len(images)} decoded = {distilled} distilled x {factor ** 2} tiles ({tile}, upsampled to "
             f"{size}x{size})")
    if packed is not None:
        count += f"; also the {len(packed)} packed images"
    problems = []
    if len(labels) != len(images):
        problems.append(f"{len(labels)} labels")
    if ipc is not None and distilled != ipc * classes:
        problems.append(f"{distilled} distilled images, not IPC x classes = {ipc * classes}")
    if size % factor:
        problems.append(f"{size}x{size} images do not split into {factor}x{factor} tiles")
    if len(images) % factor ** 2:
        problems.append(f"{len(images)} is not a multiple of factor^2 = {factor ** 2}")
    if len(set(counts)) > 1:
        problems.append(f"per class {counts}")
    return dict(data=data, config=config, count=count + "".join(f"; {p}!" for p in problems),
                sorted=bool((labels[1:] >= labels[:-1]).all()) and len(set(counts)) == 1)


def accuracy_cell(evaluations: list[dict]) -> str:
    """mean ± std over the networks, the budget, the final epoch and the split; the largest budget where a set was
    evaluated several times under one protocol (all are listed below the table)."""
    if not evaluations:
        return "not evaluated"
    r = max(evaluations, key=lambda e: (e["result"]["num_eval"], e["result"]["epochs"]))["result"]
    more = f"; {len(evaluations) - 1} more below" if len(evaluations) > 1 else ""
    return (f"{r['acc_mean']:.1f} ± {r['acc_std']:.1f} ({r['num_eval']} networks x {r['epochs']} epochs, final epoch, "
            f"{r['split']} split{more})")


def column(evaluation: dict) -> str:
    r = evaluation["result"]
    model = r.get("model", "convnet")
    return r.get("protocol", "dm") + ("" if model == "convnet" else f", {model}")


def write_picture(data: dict, path: Path, per_class: int = PER_CLASS) -> str:
    """One row per class, its first per_class images, de-normalised; returns the caption's account of it."""
    from PIL import Image
    from torchvision.utils import make_grid
    images, labels = data["images"].float(), data["labels"]
    mean, std = (torch.tensor(data[key]).view(1, -1, 1, 1) for key in ("mean", "std"))
    pixels = (images * std + mean).clamp(0, 1)
    classes = max(len(data.get("class_names") or []), int(labels.max()) + 1)
    per_class = min(per_class, int(torch.bincount(labels, minlength=classes).max()))
    rows = []
    for c in range(classes):
        mine = pixels[labels == c][:per_class]
        rows.append(torch.cat([mine, torch.ones(per_class - len(mine), *pixels.shape[1:])]))  # blanks: white
    grid = make_grid(torch.cat(rows), nrow=per_class, padding=1, pad_value=1.0)
    picture = Image.fromarray(grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    encoded = io.BytesIO()
    picture.save(encoded, "PNG", optimize=True)
    palette = encoded.tell() > PICTURE_BYTES
    if palette:
        encoded = io.BytesIO()
        picture.quantize(256).save(encoded, "PNG", optimize=True)
    path.write_bytes(encoded.getvalue())
    per, tiles = len(images) // classes, data.get("config", {}).get("factor", 1) ** 2
    shown = min(per_class, per)
    whose = (f" (the tiles of its first {-(-shown // tiles)} distilled images, {tiles} tiles to an image)"
             if tiles > 1 else "")
    return (f"one row per class, its first {shown} of {per} images in the file's order{whose}, de-normalised"
            + ("; colours reduced to 256 to keep the picture small (the .pt holds the exact pixels)" * palette))


def picture_name(entry: dict, config: dict, taken: set) -> str:
    if entry["released"]:
        name = entry["path"].stem
    else:
        name = (f"{config.get('dataset', 'set')}-if{config.get('imbalance_factor', 0):g}-ipc{config.get('ipc')}-"
                f"{entry['path'].parent.name}-seed{config.get('seed')}")
        if name in taken:
            name = "-".join(entry["path"].parent.parts[-6:])
    taken.add(name)
    return name + ".png"


SNIPPET = """```python
import torch, torchvision.utils as vutils
s = torch.load("{name}", weights_only=True)  # images, labels, mean, std, class_names, config
mean, std = (torch.tensor(s[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
images = (s["images"] * std + mean).clamp(0, 1)  # de-normalised; s["labels"] are their classes
vutils.save_image(images, "grid.png", nrow=len(images) // len(s["class_names"]))  # a row per class
```"""


def set_row(link: str, info: dict, accuracies: list[str], picture: str, file_cells: list[str]) -> str:
    config = info["config"]
    cells = [f"[{link}]({link})", f"{config.get('dataset', '?')}-LT", f"{config.get('imbalance_factor', 0):g}",
             str(config.get("ipc", "?")), str(config.get("factor", 1)), info["count"], config.get("method", "?"),
             str(config.get("seed", "?"))] + accuracies + [f"[{picture}]({picture})"] + file_cells
    return "| " + " | ".join(cells) + " |"


def sources(link: str, entry: dict, evaluated: list[dict], root: Path) -> list[str]:
    """Where a row came from: the file's origin, then each results.json that evaluated it, how it was matched to
    the file, its networks' accuracies and its provenance (provenance.provenance: commits and processors)."""
    origin = ("released" + (f", a copy of {entry['copy_of'].as_posix()}" if entry.get("copy_of") else "")
              if entry["released"] else f"not released: the run folder {entry['path'].parent.as_posix()}")
    lines = [f"- {link} ({origin})" + ("" if evaluated else f": no results.json under {root.as_posix()}/ evaluated it")]
    for e in evaluated:
        r, machine = e["result"], (e["result"].get("environment") or {}).get("machine")
        networks = ", ".join(f"{a:.2f}" for a in r.get("accs", [])) or "unrecorded"
        lines.append(f"  - {column(e)} protocol, {r['acc_mean']:.2f} ± {r['acc_std']:.2f}: {e['path'].as_posix()} "
                     f"({e['link']}); networks {networks}; {provenance(e['path'])}"
                     + (f"; machine {machine}" if machine else ""))
    return lines


def preamble(sets_dir: Path, root: Path) -> list[str]:
    return [f"# Distilled sets in {sets_dir.as_posix()}", "",
            f"Written by `python report.py --sets {sets_dir.as_posix()}` from the files themselves (the sets, and the "
            f"results.json files under {root.as_posix()}/ that evaluated them, matched by SHA-256); do not edit by "
            f"hand.", "",
            "Accuracy: mean ± std over the networks trained on the set, at the final epoch of each (results.json's "
            "acc_mean, acc_std); \"not evaluated\" where no results.json scores the file. The protocol is the "
            "evaluation's (results.json's `protocol`: dm = DM's training recipe, ncfm = NCFM's), not the distillation "
            "method. Sets outside this folder are listed from their run folders (not released here).", ""]


def catalogue(sets_dir: Path, root: Path | None = None) -> Path:
    """sets_dir/README.md and a picture per set; evaluations and run folders are looked for under root
    (default: sets_dir's parent)."""
    root = root or sets_dir.parent
    entries, evaluations = find_sets(sets_dir, root), find_evaluations(root)
    columns = list(PROTOCOLS) + sorted({column(e) for entry in entries for e in evaluations.get(entry["sha256"], [])}
                                       - set(PROTOCOLS))
    header = ["set", "data set", "IF", "IPC", "factor", "images in the file", "method", "distillation seed"] + [
        f"accuracy, {name} protocol" for name in columns] + ["picture", "size", "SHA-256"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    where, gallery, taken, unsorted, packed = [], [], set(), [], False
    for entry in entries:
        link = Path(os.path.relpath(entry["path"], sets_dir)).as_posix()
        evaluated, size = evaluations.get(entry["sha256"], []), entry["path"].stat().st_size
        file_cells = [f"{size / 1e6:.1f} MB ({size:,} bytes)", f"`{entry['sha256']}`"]
        try:
            info = describe(entry)
        except Exception as error:  # not a set this catalogue can read: listed, with why
            why = " ".join(f"unreadable as a set: {type(error).__name__}: {error}".replace("|", "/").split())[:200]
            table.append("| " + " | ".join([f"[{link}]({link})", why] + ["-"] * (len(header) - 4) + file_cells) + " |")
            where.append(f"- {link}: not read ({why})")
            continue
        picture = picture_name(entry, info["config"], taken)
        unsorted += [link] if not info["sorted"] else []
        packed = packed or "packed_images" in info["data"]
        table.append(set_row(link, info, [accuracy_cell([e for e in evaluated if column(e) == name])
                                          for name in columns], picture, file_cells))
        caption = write_picture(info["data"], sets_dir / picture)
        gallery += [f"### {link}", "", f"![{link}]({picture})", "", f"{picture}: drawn from {link} (SHA-256 "
                    f"{entry['sha256'][:12]}…) by `report.py --sets`; {caption}.", ""]
        where += sources(link, entry, evaluated, root)
    first = next((e["path"].name for e in entries if e["released"]), "a-set.pt")
    order = ("Every set's labels are sorted by class, as many images per class" if not unsorted else
             f"Not sorted by class or not balanced (the grid's rows are then not classes): {', '.join(unsorted)}")
    kept = ("`packed_images`, the distilled images before decoding, where a row says so" if packed else
            "the packed images (the distilled ones, before decoding) are in none of them")
    lines = preamble(sets_dir, root) + table + [
        "", "## Loading a set", "", "Each file is a dict (`images`, normalised; `labels`; `mean`, `std`; "
        f"`class_names`, `class_counts` of the long-tailed training set; `config` of the distillation); {kept}. "
        f"{order}. A network trains on `images` and `labels` as they are.", "", SNIPPET.format(name=first), "",
        "## Where each figure came from", ""] + where + ["", "## Pictures", ""] + gallery
    readme = sets_dir / "README.md"
    readme.write_text("\n".join(lines).rstrip("\n") + "\n")
    return readme
