"""Differentiable Siamese Augmentation (DSA), as in the dataset-distillation code (DC/DSA, MTT).

One family of the strategy is chosen per call (DSA mode 'S'), then applied. Random numbers are
drawn on the CPU and moved to the images' device, so a seeded call gives the same transform on
any device. With a seed, one draw (from a private `torch.Generator`, the global RNG untouched) is
broadcast to the whole batch: a real and a synthetic batch given the same seed are augmented
identically (Siamese). Without a seed, each sample gets its own draw, from the `generator`
argument or the global RNG. Every op is differentiable with respect to the images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor

from ld3m.errors import ConfigError, DataError

FAMILIES: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class DSAParams:
    """Strengths of the DSA families (the defaults of `ParamDiffAug` in the MTT code)."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


class Draw:
    """CPU random numbers for one call: one draw broadcast to the batch (Siamese) or per sample."""

    def __init__(
        self, batch: int, generator: torch.Generator | None = None, siamese: bool = False
    ) -> None:
        """Draw for `batch` samples from `generator` (a CPU generator; None: the global RNG)."""
        self.batch = batch
        self.generator = generator
        self.siamese = siamese

    @classmethod
    def from_seed(cls, seed: int, batch: int) -> Draw:
        """Siamese draw from a fresh CPU generator seeded with `seed` (global RNG untouched)."""
        return cls(batch, torch.Generator().manual_seed(seed), siamese=True)

    def _count(self) -> int:
        return 1 if self.siamese else self.batch

    def uniform(self) -> Tensor:
        """Float32 CPU tensor [batch] of U(0, 1) values (all equal when Siamese)."""
        return torch.rand(self._count(), generator=self.generator).expand(self.batch)

    def randint(self, low: int, high: int) -> Tensor:
        """Int64 CPU tensor [batch] of integers in [low, high) (all equal when Siamese)."""
        r = torch.randint(low, high, (self._count(),), generator=self.generator)
        return r.expand(self.batch)

    def index(self, n: int) -> int:
        """One integer in [0, n) for the whole call (used for the family choice)."""
        return int(torch.randint(0, n, (1,), generator=self.generator).item())


# ---------------------------------------------------------------- deterministic transforms


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """A [B] parameter on x's device/dtype, shaped [B,1,1,1] to broadcast over x."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, 1, 1, 1)


def brightness(x: Tensor, r: Tensor, ratio: float) -> Tensor:
    """x [B,C,H,W] + (r - 0.5) * ratio, with r [B] in [0, 1)."""
    return x + (_per_sample(r, x) - 0.5) * ratio


def saturation(x: Tensor, r: Tensor, ratio: float) -> Tensor:
    """Scale x [B,C,H,W] about its per-pixel channel mean by r * ratio, with r [B] in [0, 1)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_per_sample(r, x) * ratio) + mean


def contrast(x: Tensor, r: Tensor, ratio: float) -> Tensor:
    """Scale x [B,C,H,W] about its per-sample mean by r + ratio, with r [B] in [0, 1)."""
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_per_sample(r, x) + ratio) + mean


def translate(x: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """out[b,:,i,j] = x[b,:,i+tx[b],j+ty[b]] for x [B,C,H,W], int tx/ty [B]; zeros outside."""
    b, _, h, w = x.shape
    dev = x.device
    grid_b, grid_x, grid_y = torch.meshgrid(
        torch.arange(b, device=dev),
        torch.arange(h, device=dev),
        torch.arange(w, device=dev),
        indexing="ij",
    )
    grid_x = torch.clamp(grid_x + tx.to(dev, torch.long).reshape(-1, 1, 1) + 1, 0, h + 1)
    grid_y = torch.clamp(grid_y + ty.to(dev, torch.long).reshape(-1, 1, 1) + 1, 0, w + 1)
    x_pad = F.pad(x, [1, 1, 1, 1])
    return x_pad.permute(0, 2, 3, 1)[grid_b, grid_x, grid_y].permute(0, 3, 1, 2)


def cutout_size(h: int, w: int, ratio: float) -> tuple[int, int]:
    """Side lengths (rows, columns) of the DSA cutout square for an h x w image."""
    return int(h * ratio + 0.5), int(w * ratio + 0.5)


def _band(offset: Tensor, size: int, length: int) -> Tensor:
    """Bool [B,length]: the clamped range offset - size//2 .. offset - size//2 + size - 1."""
    start = offset.reshape(-1, 1) - size // 2
    lo = start.clamp(0, length - 1)
    hi = (start + size - 1).clamp(0, length - 1)
    pos = torch.arange(length, device=offset.device)
    return (pos >= lo) & (pos <= hi)


def cutout(x: Tensor, ox: Tensor, oy: Tensor, ratio: float) -> Tensor:
    """Zero a cutout_size square of x [B,C,H,W] centred at int rows ox [B], columns oy [B]."""
    _, _, h, w = x.shape
    size_h, size_w = cutout_size(h, w, ratio)
    if size_h == 0 or size_w == 0:
        return x
    rows = _band(ox.to(x.device, torch.long), size_h, h)
    cols = _band(oy.to(x.device, torch.long), size_w, w)
    keep = ~(rows[:, :, None] & cols[:, None, :])
    return x * keep.unsqueeze(1).to(x.dtype)


def flip(x: Tensor, apply: Tensor) -> Tensor:
    """Flip x [B,C,H,W] horizontally (dim 3) where the bool apply [B] is True."""
    return torch.where(apply.to(x.device).reshape(-1, 1, 1, 1), x.flip(3), x)


def scale_theta(sx: Tensor, sy: Tensor) -> Tensor:
    """Affine matrices [B,2,3] [[sx,0,0],[0,sy,0]] from sx, sy [B]."""
    zero = torch.zeros_like(sx)
    return torch.stack([sx, zero, zero, zero, sy, zero], dim=1).reshape(-1, 2, 3)


def rotate_theta(angle: Tensor) -> Tensor:
    """Affine matrices [B,2,3] [[cos,-sin,0],[sin,cos,0]] from angles [B] in radians."""
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    return torch.stack([cos, -sin, zero, sin, cos, zero], dim=1).reshape(-1, 2, 3)


def affine(x: Tensor, theta: Tensor) -> Tensor:
    """Resample x [B,C,H,W] through affine matrices theta [B,2,3] (bilinear, zero padding)."""
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


# ---------------------------------------------------------------- random families


def _color(x: Tensor, draw: Draw, p: DSAParams) -> Tensor:
    x = brightness(x, draw.uniform(), p.brightness)
    x = saturation(x, draw.uniform(), p.saturation)
    return contrast(x, draw.uniform(), p.contrast)


def _crop(x: Tensor, draw: Draw, p: DSAParams) -> Tensor:
    shift_x = int(x.shape[2] * p.ratio_crop_pad + 0.5)
    shift_y = int(x.shape[3] * p.ratio_crop_pad + 0.5)
    tx = draw.randint(-shift_x, shift_x + 1)
    ty = draw.randint(-shift_y, shift_y + 1)
    return translate(x, tx, ty)


def _cutout(x: Tensor, draw: Draw, p: DSAParams) -> Tensor:
    h, w = x.shape[2], x.shape[3]
    size_h, size_w = cutout_size(h, w, p.ratio_cutout)
    ox = draw.randint(0, h + (1 - size_h % 2))
    oy = draw.randint(0, w + (1 - size_w % 2))
    return cutout(x, ox, oy, p.ratio_cutout)


def _flip(x: Tensor, draw: Draw, p: DSAParams) -> Tensor:
    return flip(x, draw.uniform() < p.prob_flip)


def _scale(x: Tensor, draw: Draw, p: DSAParams) -> Tensor:
    ratio = p.ratio_scale
    sx = draw.uniform() * (ratio - 1.0 / ratio) + 1.0 / ratio
    sy = draw.uniform() * (ratio - 1.0 / ratio) + 1.0 / ratio
    return affine(x, scale_theta(sx, sy))


def _rotate(x: Tensor, draw: Draw, p: DSAParams) -> Tensor:
    angle = (draw.uniform() - 0.5) * 2 * p.ratio_rotate / 180 * math.pi
    return affine(x, rotate_theta(angle))


_FAMILY_FNS: MappingProxyType[str, Callable[[Tensor, Draw, DSAParams], Tensor]] = MappingProxyType(
    {
        "color": _color,
        "crop": _crop,
        "cutout": _cutout,
        "flip": _flip,
        "scale": _scale,
        "rotate": _rotate,
    }
)


def _unknown_family(name: str, where: str) -> ConfigError:
    valid = ", ".join(FAMILIES)
    return ConfigError(
        f"unknown DSA augmentation family {name!r} in {where}; "
        f"use families from: {valid}, joined by '_' (or 'none' for no augmentation)"
    )


def apply_family(name: str, x: Tensor, draw: Draw, params: DSAParams = DSAParams()) -> Tensor:
    """Apply DSA family `name` to normalised images x [B,C,H,W], parameters taken from `draw`."""
    fn = _FAMILY_FNS.get(name)
    if fn is None:
        raise _unknown_family(name, "apply_family")
    return fn(x, draw, params)


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """Families of a DSA strategy such as 'color_crop_flip'; () for 'none' or ''."""
    text = strategy.strip()
    if text.lower() in ("", "none"):
        return ()
    names = tuple(text.split("_"))
    for name in names:
        if name not in _FAMILY_FNS:
            raise _unknown_family(name, f"DSA strategy {strategy!r}")
    return names


class DiffAugment:
    """DSA in mode 'S': one family of the strategy per call, Siamese when given a seed."""

    def __init__(self, strategy: str = DEFAULT_STRATEGY, params: DSAParams = DSAParams()) -> None:
        """Validate `strategy` (families joined by '_', or 'none') and keep `params`."""
        self.strategy = strategy
        self.params = params
        self.families = parse_strategy(strategy)

    def __repr__(self) -> str:
        return f"DiffAugment(strategy={self.strategy!r}, params={self.params!r})"

    def __call__(
        self, x: Tensor, seed: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Augment normalised images x [B,C,H,W]; a seed gives one transform for the whole batch."""
        if x.dim() != 4:
            raise DataError(
                f"DSA expects images shaped [B,C,H,W], got shape {tuple(x.shape)}; "
                "add the missing batch or channel dimension"
            )
        if not self.families:
            return x
        draw = _make_draw(x.shape[0], seed, generator)
        name = self.families[draw.index(len(self.families))]
        return apply_family(name, x, draw, self.params).contiguous()


def _make_draw(batch: int, seed: int | None, generator: torch.Generator | None) -> Draw:
    """Siamese draw from `seed`, else per-sample draws from `generator` or the global RNG."""
    if seed is not None and generator is not None:
        raise ConfigError("DiffAugment got both a seed and a generator; pass one or the other")
    if seed is not None:
        return Draw.from_seed(seed, batch)
    if generator is not None and generator.device.type != "cpu":
        raise ConfigError(
            f"DiffAugment draws on the CPU but got a {generator.device.type} generator; "
            "pass a CPU torch.Generator"
        )
    return Draw(batch, generator, siamese=False)
