"""Listing and decoding of image folder trees: a directory or an uncompressed tar of one.

Images are decoded with Pillow (RGB, or L for 1-channel data), resized so the short side is
`res` (bilinear, antialiased) and centre-cropped to `res x res`.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tarfile
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ld3m.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_POOL_MIN_FILES = 2000  # below this a plain loop beats starting worker processes
_CHUNK = 256
ONE_CHANNEL_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "F"})


class Entry(NamedTuple):
    """One image file: a path (directory root) or a member name plus data offset (tar root)."""

    path: str
    offset: int = -1
    size: int = -1


@dataclass(frozen=True)
class ImageTree:
    """A listed `train/<class>/` + `val|test/<class>/` tree; nothing decoded."""

    source: str
    """Resolved path of the directory or tar."""
    is_tar: bool
    test_split: str
    """`val` or `test`."""
    train: Mapping[str, tuple[Entry, ...]]
    """Class folder -> image files, both sorted."""
    test: Mapping[str, tuple[Entry, ...]]
    wnids_text: str | None
    """Contents of a `wnids.txt` beside train/, if any."""


def list_tree(root: str | os.PathLike[str]) -> ImageTree:
    """List the image tree at `root` (a directory or an uncompressed .tar) without decoding."""
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(
            f"data.root '{root}' does not exist; set data.root to a dataset folder or .tar, "
            "or use the offline default data.name=mnist5k"
        )
    path = path.resolve()
    return _list_tar(path) if path.is_file() else _list_dir(path)


def _find_top(has_dir: Callable[[str], bool], kids: list[str], where: Path) -> tuple[str, str]:
    """Return (top prefix, test split name): train/ at the root or inside one wrapping folder."""
    kids = [k for k in kids if not k.startswith(".")]
    if has_dir("train"):
        top = ""
    elif len(kids) == 1 and has_dir(f"{kids[0]}/train"):
        top = f"{kids[0]}/"
    else:
        raise DataError(
            f"data.root {where} has no train/ folder (nor one folder wrapping it); the layout "
            "must be train/<class>/ plus val/<class>/ or test/<class>/"
        )
    for split in ("val", "test"):
        if has_dir(top + split):
            return top, split
    raise DataError(f"data.root {where} has {top}train/ but no val/ or test/; add the test split")


def _group(items: Iterable[tuple[str, Entry | None]], split: str) -> Mapping[str, tuple]:
    """Group (path below the top, entry or None for a folder) into class -> sorted entries."""
    classes: dict[str, list[Entry]] = {}
    for rel, entry in items:
        parts = rel.split("/")
        if parts[0] != split or len(parts) < 2 or parts[1].startswith("."):
            continue
        files = classes.setdefault(parts[1], [])
        is_image = os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS
        if entry is not None and len(parts) > 2 and is_image:
            files.append(entry)
    return MappingProxyType({c: tuple(sorted(classes[c])) for c in sorted(classes)})


def _list_dir(path: Path) -> ImageTree:
    """List a directory tree."""
    kids = [p.name for p in path.iterdir() if p.is_dir()]
    top, test_split = _find_top(lambda rel: (path / rel).is_dir(), kids, path)
    base = path / top
    items: list[tuple[str, Entry | None]] = []
    for split in ("train", test_split):
        for dirpath, _, names in os.walk(base / split):
            rel_dir = Path(dirpath).relative_to(base).as_posix()
            items.append((rel_dir, None))
            items.extend((f"{rel_dir}/{n}", Entry(os.path.join(dirpath, n))) for n in names)
    text = (base / "wnids.txt").read_text() if (base / "wnids.txt").is_file() else None
    return _make_tree(path, False, test_split, items, text)


def _make_tree(path: Path, is_tar: bool, split: str, items: list, text: str | None) -> ImageTree:
    """Group listed (path below the top, entry) items into an ImageTree."""
    return ImageTree(str(path), is_tar, split, _group(items, "train"), _group(items, split), text)


def _list_tar(path: Path) -> ImageTree:
    """List an uncompressed tar's members (headers only)."""
    try:
        with tarfile.open(path, "r:") as tf:
            members = [m for m in tf if m.isfile() or m.isdir()]
            names = [m.name.removeprefix("./").rstrip("/") for m in members]
            dirs = {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}
            dirs |= {n for n, m in zip(names, members, strict=True) if m.isdir()}
            kids = sorted({d for d in dirs if "/" not in d})
            top, test_split = _find_top(dirs.__contains__, kids, path)
            wnids = f"{top}wnids.txt"
            fh = tf.extractfile(members[names.index(wnids)]) if wnids in names else None
            text = fh.read().decode() if fh is not None else None
    except tarfile.ReadError as exc:
        raise DataError(f"data.root {path} is not an uncompressed .tar ({exc}); untar it") from None
    items = [
        (n.removeprefix(top), Entry(n, m.offset_data, m.size) if m.isfile() else None)
        for n, m in zip(names, members, strict=True)
        if n.startswith(top)
    ]
    return _make_tree(path, True, test_split, items, text)


@dataclass(frozen=True)
class DecodeSpec:
    """How every image of one dataset is read and decoded (picklable for worker processes)."""

    source: str
    is_tar: bool
    res: int
    mode: str  # "RGB" or "L"
    require_square: bool  # res was taken from the data, so every image must be square


def open_image(source: str, is_tar: bool, entry: Entry, fh: BinaryIO | None) -> Image.Image:
    """Open one image (lazily) from a directory or from an open tar file handle."""
    where = f"{source}:{entry.path}" if is_tar else entry.path
    try:
        if fh is not None:
            fh.seek(entry.offset)
            return Image.open(BytesIO(fh.read(entry.size)))
        return Image.open(entry.path)
    except Exception as exc:
        raise DataError(f"cannot read image {where} ({exc}); remove or replace the file") from None


def _resize_crop(img: Image.Image, res: int) -> Image.Image:
    """Resize so the short side is `res` (bilinear, antialiased), then centre-crop res x res."""
    w, h = img.size
    if min(w, h) != res:
        scale = res / min(w, h)
        size = (max(res, round(w * scale)), max(res, round(h * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR)
        w, h = img.size
    left, top = round((w - res) / 2), round((h - res) / 2)
    return img.crop((left, top, left + res, top + res))


def _decode_one(spec: DecodeSpec, entry: Entry, fh: BinaryIO | None) -> np.ndarray:
    """Decode one image to uint8 [res,res,C]."""
    where = f"{spec.source}:{entry.path}" if spec.is_tar else entry.path
    with open_image(spec.source, spec.is_tar, entry, fh) as img:
        if spec.mode == "L" and img.mode not in ONE_CHANNEL_MODES:
            raise DataError(
                f"mismatched channel count: {where} is {img.mode} but this dataset is 1-channel "
                "(from its first image); convert every image to grayscale, or all to RGB"
            )
        if spec.require_square and img.width != img.height:
            raise DataError(f"{where} is {img.width}x{img.height}, not square; set data.res")
        try:
            out = _resize_crop(img.convert(spec.mode), spec.res)
        except Exception as exc:
            raise DataError(f"cannot decode image {where} ({exc}); replace the file") from None
    return np.asarray(out).reshape(spec.res, spec.res, -1)


def decode_chunk(spec: DecodeSpec, entries: list[Entry]) -> np.ndarray:
    """Decode a chunk of images to uint8 [n,res,res,C] (runs in a worker process)."""
    out = np.empty((len(entries), spec.res, spec.res, 1 if spec.mode == "L" else 3), np.uint8)
    with open(spec.source, "rb") if spec.is_tar else nullcontext() as fh:
        for i, entry in enumerate(entries):
            out[i] = _decode_one(spec, entry, fh)
    return out


def decode_all(spec: DecodeSpec, entries: list[Entry], desc: str) -> torch.Tensor:
    """Decode images to uint8 [N,C,res,res], with 2 worker processes for many files."""
    chunks = [entries[i : i + _CHUNK] for i in range(0, len(entries), _CHUNK)]
    out = torch.empty(
        (len(entries), spec.res, spec.res, 1 if spec.mode == "L" else 3), dtype=torch.uint8
    )
    workers = min(2, os.cpu_count() or 1)
    use_pool = len(entries) >= _POOL_MIN_FILES and workers > 1
    with (
        multiprocessing.get_context("fork").Pool(workers) if use_pool else nullcontext() as pool,
        tqdm(total=len(entries), desc=desc, unit="img", disable=not sys.stderr.isatty()) as bar,
    ):
        mapper = pool.imap if pool is not None else map
        for i, arr in enumerate(mapper(partial(decode_chunk, spec), chunks)):
            out[i * _CHUNK : i * _CHUNK + len(arr)] = torch.from_numpy(arr)
            bar.update(len(arr))
    return out.permute(0, 3, 1, 2).contiguous()
