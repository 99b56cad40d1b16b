"""The synthetic-set file: safetensors with images, labels, an optional learned step size and
latents, plus JSON metadata; a PNG grid (one row per class) is written beside it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ld3m.errors import CheckpointError

FORMAT_VERSION = 1
META_KEY = "ld3m"


@dataclass(frozen=True)
class SetMeta:
    """What a synthetic set is and how to display it."""

    dataset: str
    num_classes: int
    channels: int
    res: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    ipc: int
    method: str
    """e.g. `random_real`, `ld3m_dm`, `pixel_mtt`."""
    class_names: tuple[str, ...] = ()
    distill_arch: str = "ConvNet"
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SyntheticSet:
    """A distilled (or baseline) set: normalised images [N,C,H,W], labels [N], metadata."""

    images: torch.Tensor
    labels: torch.Tensor
    meta: SetMeta
    lr: float | None = None
    latents: dict[str, torch.Tensor] = field(default_factory=dict)


def save_set(path: Path, synset: SyntheticSet) -> Path:
    """Write `synset` atomically to `path` (.safetensors), and its PNG grid beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "images": synset.images.detach().float().cpu().contiguous(),
        "labels": synset.labels.detach().long().cpu().contiguous(),
    }
    if synset.lr is not None:
        tensors["lr"] = torch.tensor([float(synset.lr)])
    for name, value in synset.latents.items():
        tensors[f"latents.{name}"] = value.detach().float().cpu().contiguous()
    meta = {"format_version": FORMAT_VERSION, **_meta_to_json(synset.meta)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    save_grid(path.with_suffix(".png"), synset)
    return path


def load_set(path: Path) -> SyntheticSet:
    """Read a synthetic-set file written by `save_set`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"synthetic set {path} does not exist; pass a .safetensors file written by ld3m"
        )
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        raw = json.loads(header["__metadata__"][META_KEY])
    except (SafetensorError, KeyError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"synthetic set {path} is corrupt or not an ld3m set ({exc}); regenerate it"
        ) from None
    raw.pop("format_version", None)
    meta = SetMeta(
        **{
            **raw,
            "mean": tuple(raw["mean"]),
            "std": tuple(raw["std"]),
            "class_names": tuple(raw.get("class_names", ())),
        }
    )
    lr = float(tensors["lr"].item()) if "lr" in tensors else None
    latents = {
        k.removeprefix("latents."): v for k, v in tensors.items() if k.startswith("latents.")
    }
    return SyntheticSet(tensors["images"], tensors["labels"], meta, lr, latents)


def _meta_to_json(meta: SetMeta) -> dict[str, Any]:
    out = dict(meta.__dict__)
    out["mean"], out["std"] = list(meta.mean), list(meta.std)
    out["class_names"] = list(meta.class_names)
    return out


def to_unit_range(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Undo the dataset normalisation: [N,C,H,W] normalised -> [0,1]."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


def save_grid(path: Path, synset: SyntheticSet, pad: int = 2) -> None:
    """PNG grid with one row per class and one column per image of that class."""
    meta = synset.meta
    images = to_unit_range(synset.images.detach().float().cpu(), meta.mean, meta.std)
    labels = synset.labels.cpu()
    cols = max(int((labels == c).sum()) for c in range(meta.num_classes)) or 1
    c, h, w = images.shape[1:]
    canvas = torch.ones(c, meta.num_classes * (h + pad) + pad, cols * (w + pad) + pad)
    for cls in range(meta.num_classes):
        for j, img in enumerate(images[labels == cls]):
            top, left = pad + cls * (h + pad), pad + j * (w + pad)
            canvas[:, top : top + h, left : left + w] = img
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    mode_image = Image.fromarray(array[..., 0] if c == 1 else array)
    tmp = path.with_name(path.name + ".tmp")
    mode_image.save(tmp, format="PNG")
    os.replace(tmp, path)
