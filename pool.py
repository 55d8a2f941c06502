"""NCFM's extractor pool: ConvNets trained on the long-tailed set, each kept with its initialisation.

Network k of the pool is a ConvNet of the run's options (--width, --depth, --norm, --pooling), initialised and
trained from the draws of (seed, k) alone: POOL_SCHEDULES[--pool-schedule] for --pool-epochs epochs on the
normalised long-tailed training images, under the logit-adjusted loss CE(f(x) + log pi) with --pool-rebalance la,
its last layer re-trained on class-balanced batches with --pool-rebalance crt. Each network is cached as it
finishes (--pool-cache/networks-<digest>/network-k.pt) and the whole pool once all are (pool-<digest>.pt); the
digest names the data (class names, counts, a SHA-1 of the images and labels), the seed, the network, the
schedule, the epochs, the precision and the rebalancing (pool_digest). distill.py's Extractor blends a pool
network with its initialisation each iteration.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data_lt import LongTailedData, cache_dir, counter_seed
from networks import build_network, cpu_state, reset_parameters_
from runs import atomic_save, Processes
from training import POOL_SCHEDULES, class_log_prior, train_network

STREAM_POOL = 13  # the counter stream of the pool's draws (distill.py's streams 11 and 12: networks, frequencies)


def convnet(run, data: LongTailedData, device: torch.device):
    """The run's ConvNet (--width, --depth, --norm, --pooling of the resolved options `run`, distill.resolve) for
    the data's channels, classes and size."""
    return build_network("convnet", data.channels, data.num_classes, data.image_size, run.width, run.depth, run.norm,
                         run.pooling, device)


def pool_file(run, data: LongTailedData) -> Path:
    """Where the trained extractor pool for this data and network is cached. A data set is known by its class
    names and the SHA-1 of its long-tailed training images and labels, whatever its name: two image-folder
    trees of the same counts and size are two data sets, and so are CIFAR-10 from torchvision and its JPEG
    copy (other pixels, so another subset and other pictures under the same seed)."""
    return pool_folder(run) / f"pool-{pool_digest(run, data, with_size=True)}.pt"


def pool_networks_folder(run, data: LongTailedData) -> Path:
    """Where the pool's networks are cached one file each, as they finish. Network k depends on (seed, k) and
    not on --pool-size: a pool of 2 shares its networks with a pool of 20."""
    return pool_folder(run) / f"networks-{pool_digest(run, data, with_size=False)}"


def pool_folder(run) -> Path:
    return Path(run.pool_cache) if run.pool_cache else cache_dir() / "pools"


def pool_digest(run, data: LongTailedData, with_size: bool) -> str:
    key = (data.name, tuple(data.class_counts), data.channels, data.image_size, run.val_per_class, run.seed,
           run.width, run.depth, run.norm, run.pooling) + ((run.pool_size,) if with_size else ()) + (
           run.pool_epochs, run.precision) + ((run.pool_rebalance,) if run.pool_rebalance != "none" else ()) + (
           (run.pool_schedule,) if run.pool_schedule != "brief" else ())  # the first pools' paths unchanged
    content = hashlib.sha1(memoryview(data.train_images.contiguous().numpy()))  # no copy of the images
    content.update(memoryview(data.train_labels.contiguous().numpy()))
    key += (tuple(data.class_names), content.hexdigest())
    return hashlib.sha1(repr(key).encode()).hexdigest()[:16]


def retrain_classifier_balanced(net, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                                generator: torch.Generator, epochs: int = 10, per_class: int = 16,
                                lr: float = 0.01) -> torch.Tensor:
    """Classifier re-training (cRT; Kang et al., "Decoupling Representation and Classifier", ICLR 2020): the
    features stay fixed and the last layer is re-initialised and trained on class-balanced batches (per_class
    images of every class, drawn with replacement), SGD with momentum 0.9, as many batches per epoch as the
    set holds images / (per_class x C). Returns the number of images of each class the classifier saw, (C,)."""
    device = images.device
    net.eval()
    with torch.no_grad():  # the features once, without DSA: only the classifier learns
        features = torch.cat([net.embed(part.contiguous(memory_format=torch.channels_last))
                              for part in images.split(256)]).float()
    reset_parameters_(net.classifier, generator)
    optimizer = torch.optim.SGD(net.classifier.parameters(), lr=lr, momentum=0.9)
    by_class = [torch.nonzero(labels == c).squeeze(1) for c in range(num_classes)]
    seen = torch.zeros(num_classes, dtype=torch.long)
    for _ in range(epochs * max(1, len(labels) // (per_class * num_classes))):
        picks = torch.cat([members[torch.randint(len(members), (per_class,), generator=generator, device=device)]
                           for members in by_class])
        loss = F.cross_entropy(net.classifier(features[picks]), labels[picks])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += torch.bincount(labels[picks].cpu(), minlength=num_classes)
    return seen


def pool_logit_shift(run, data: LongTailedData, device) -> torch.Tensor | None:
    """The pool's training-loss logit shift: log prior for --pool-rebalance la (the logit-adjusted loss), else none."""
    return class_log_prior(data.class_counts, device) if run.pool_rebalance == "la" else None


def extractor_pool(run, data: LongTailedData, device: torch.device, processes: Processes, log=print) -> list[dict]:
    """NCFM's pool: --pool-size ConvNets, each trained --pool-epochs epochs on the long-tailed set under
    --pool-schedule, kept with its initialisation. Each network is cached as it finishes (a stopped pool
    continues with the next one), the whole pool once all are; split across processes under torchrun. `run`: the
    resolved options (distill.resolve), whose precision the pool trains in."""
    path = pool_file(run, data)
    if path.exists():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)["networks"]
        except Exception:
            log(f"extractor pool {path} unreadable; training it again")
    log(f"training the extractor pool: {run.pool_size} networks x {run.pool_epochs} epochs ({run.pool_schedule} "
        f"schedule) on {len(data.train_labels)} images -> {path}")
    folder = pool_networks_folder(run, data)
    images, labels = data.normalise(data.train_images).to(device), data.train_labels.to(device)  # once, for all
    mine = [(k, pool_network(run, data, images, labels, k, folder, log))
            for k in range(processes.rank, run.pool_size, processes.world)]
    mine = processes.gather_objects(mine)
    networks = [network for _, network in sorted(mine, key=lambda entry: entry[0])]
    if processes.main:
        atomic_save({"networks": networks}, path)
    return networks


def pool_network(run, data: LongTailedData, images: torch.Tensor, labels: torch.Tensor, k: int, folder: Path,
                 log) -> dict:
    """Pool network k ({"init", "trained"} state dicts), from folder/network-k.pt or trained on the normalised
    long-tailed `images` and written there. Its draws (initialisation, batches, augmentation) come from
    (seed, k) alone."""
    path = folder / f"network-{k}.pt"
    if path.exists():
        log(f"  pool network {k + 1}/{run.pool_size}: {path}")
        return torch.load(path, map_location="cpu", weights_only=True)
    start, device = time.perf_counter(), images.device
    generator = torch.Generator(device=device).manual_seed(counter_seed(run.seed, STREAM_POOL, k))
    net = reset_parameters_(convnet(run, data, device), generator)
    init = cpu_state(net)
    train_network(net, images, labels, generator, POOL_SCHEDULES[run.pool_schedule], run.pool_epochs,
                  precision=run.precision, compile=run.compile, logit_shift=pool_logit_shift(run, data, device))
    if run.pool_rebalance == "crt":
        retrain_classifier_balanced(net, images, labels, data.num_classes, generator)
    network = {"init": init, "trained": cpu_state(net),
               "seconds": torch.tensor(time.perf_counter() - start, dtype=torch.float64)}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save(network, path)
    log(f"  pool network {k + 1}/{run.pool_size} trained in {network['seconds'].item():.0f} s")
    return network
