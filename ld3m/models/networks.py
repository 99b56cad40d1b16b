"""Classification networks used to evaluate (and match on) distilled data sets.

Definitions follow MTT (`mtt-distillation/networks.py`) and GLaD (`glad/networks/`); see
section 8 of the method notes. Every network works at any input size (28, 32, 64, 128 px, ...)
and any channel count, and has `forward(x) -> logits [B, classes]` and
`embed(x) -> features [B, F]` (the flattened input of the final linear layer).
All activations are out-of-place so networks work with `torch.func.functional_call` and
double backward.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ld3m.errors import ConfigError

NORMS = ("instance", "batch", "layer", "group", "none")
POOLINGS = ("avg", "max", "none")
ACTS = ("relu", "leakyrelu", "sigmoid", "gelu")
CONVNET_OVERRIDES = ("width", "depth", "norm", "pooling", "act")
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ConfigError if `value` is not one of `choices`."""
    if value not in choices:
        raise ConfigError(f"unknown {kind} {value!r}; choose one of: {', '.join(choices)}")


def _check_positive(**values: Any) -> None:
    """Raise ConfigError unless every keyword value is an int >= 1."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"network {key} must be an integer >= 1, got {value!r}")


def _first_pad(channels: int, pad: int) -> int:
    """Padding of the first conv: MTT pads 1-channel input by 2 more (28 px -> 32 px)."""
    return pad + 2 if channels == 1 else pad


def _make_act(act: str) -> nn.Module:
    """An out-of-place activation module by name (one of ACTS)."""
    _check_choice("activation", act, ACTS)
    if act == "relu":
        return nn.ReLU(inplace=False)
    if act == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01, inplace=False)
    if act == "sigmoid":
        return nn.Sigmoid()
    return nn.GELU()


def _make_norm(norm: str, channels: int, size: int) -> nn.Module:
    """A normalisation layer for feature maps of shape [B, channels, size, size]."""
    _check_choice("norm", norm, NORMS)
    if norm == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(channels, affine=True)
    if norm == "layer":
        return nn.LayerNorm([channels, size, size], elementwise_affine=True)
    if norm == "group":
        if channels % 4:
            raise ConfigError(f"norm 'group' needs a width divisible by 4, got {channels}")
        return nn.GroupNorm(4, channels, affine=True)
    return nn.Identity()


class _Classifier(nn.Module):
    """Base: subclasses define `embed` and a final linear layer `classifier`."""

    classifier: nn.Linear

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, F] of images x [B, C, H, W]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] of images x [B, C, H, W]."""
        return self.classifier(self.embed(x))


class ConvNet(_Classifier):
    """MTT ConvNet: depth x [conv3x3 -> norm -> act -> pool2] -> linear.

    Pools that would shrink a 1 px feature map to 0 px (e.g. depth 6 at 32 px) are skipped.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        res: int,
        width: int = 128,
        depth: int = 3,
        norm: str = "instance",
        pooling: str = "avg",
        act: str = "relu",
    ) -> None:
        super().__init__()
        _check_positive(channels=channels, num_classes=num_classes, res=res, width=width)
        _check_positive(depth=depth)
        _check_choice("pooling", pooling, POOLINGS)
        layers: list[nn.Module] = []
        in_ch, size = channels, res
        for d in range(depth):
            pad = _first_pad(channels, 1) if d == 0 else 1
            layers.append(nn.Conv2d(in_ch, width, kernel_size=3, padding=pad))
            size = size + 2 * pad - 2
            layers += [_make_norm(norm, width, size), _make_act(act)]
            if pooling != "none" and size >= 2:
                layers.append(nn.AvgPool2d(2, 2) if pooling == "avg" else nn.MaxPool2d(2, 2))
                size //= 2
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened conv features [B, width * h * w] of images x [B, C, H, W]."""
        return self.features(x).flatten(1)


class AlexNet(_Classifier):
    """GLaD/MTT AlexNet: five convs (128, 192, 256, 192, 192) with three max-pools."""

    def __init__(self, channels: int, num_classes: int, res: int) -> None:
        super().__init__()
        _check_positive(channels=channels, num_classes=num_classes, res=res)
        pad = _first_pad(channels, 2)
        if (res + 2 * pad - 4) // 8 < 1:
            raise ConfigError(f"AlexNet needs images of at least 8 px, got {res} px")
        self.features = nn.Sequential(
            nn.Conv2d(channels, 128, kernel_size=5, padding=pad),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(192, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(256, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(192, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2, 2),
        )
        with torch.no_grad():
            feat = self.features(torch.zeros(1, channels, res, res)).numel()
        self.classifier = nn.Linear(feat, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened conv features [B, 192 * h * w] of images x [B, C, H, W]."""
        return self.features(x).flatten(1)


class VGG11(_Classifier):
    """GLaD VGG11 with instance norm, AdaptiveMaxPool2d(7) and Linear(512 * 49).

    Inputs too small for all five max-pools (e.g. 16 px, or 28 px with 3 channels) skip the
    pools that would leave a later conv a 1 px map, where instance norm outputs a constant and
    the network cannot learn; AdaptiveMaxPool2d(7) then resizes as usual.
    """

    def __init__(self, channels: int, num_classes: int, res: int) -> None:
        super().__init__()
        _check_positive(channels=channels, num_classes=num_classes, res=res)
        layers: list[nn.Module] = []
        in_ch, size = channels, res
        for i, v in enumerate(VGG11_CFG):
            if v == "M":
                conv_follows = any(w != "M" for w in VGG11_CFG[i + 1 :])
                if size // 2 >= (2 if conv_follows else 1):
                    layers.append(nn.MaxPool2d(2, 2))
                    size //= 2
                continue
            assert isinstance(v, int)
            pad = _first_pad(channels, 1) if not layers else 1
            layers.append(nn.Conv2d(in_ch, v, kernel_size=3, padding=pad))
            size = size + 2 * pad - 2
            layers += [nn.GroupNorm(v, v, affine=True), nn.ReLU(inplace=False)]
            in_ch = v
        layers.append(nn.AdaptiveMaxPool2d(7))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512 * 7 * 7, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features [B, 512 * 49] of images x [B, C, H, W]."""
        return self.features(x).flatten(1)


def _resnet_norm(norm: str, channels: int) -> nn.Module:
    """Instance norm (GroupNorm(C, C)) or BatchNorm for ResNet feature maps."""
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(channels, channels)


class _BasicBlock(nn.Module):
    """ResNet basic block with instance (or batch) norm and a projection shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str = "instance") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _resnet_norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.norm2 = _resnet_norm(norm, out_ch)
        self.act = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                _resnet_norm(norm, out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output [B, out_ch, H / stride, W / stride] of x [B, in_ch, H, W]."""
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet18(_Classifier):
    """CIFAR-style ResNet18 (3x3 stem, no max-pool) with instance norm (or BatchNorm:
    `ResNet18BN`, SRe2L/CDA's teacher on small images)."""

    def __init__(self, channels: int, num_classes: int, res: int, norm: str = "instance") -> None:
        super().__init__()
        _check_positive(channels=channels, num_classes=num_classes, res=res)
        layers: list[nn.Module] = [
            nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False),
            _resnet_norm(norm, 64),
            nn.ReLU(inplace=False),
        ]
        in_ch = 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_BasicBlock(in_ch, width, stride, norm), _BasicBlock(width, width, 1, norm)]
            in_ch = width
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, 512] of images x [B, C, H, W]."""
        return self.features(x).flatten(1)


def vit_patch_size(res: int, default: int) -> int:
    """Largest patch size <= `default` that divides `res` (e.g. 28 with default 4 -> 4)."""
    return max(p for p in range(1, min(default, res) + 1) if res % p == 0)


class ViT(_Classifier):
    """GLaD ViT (CLS pooling): patch 16, depth 10 above 64 px; CIFAR variant patch 4, depth 6."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        res: int,
        dim: int = 512,
        heads: int = 8,
        mlp_dim: int = 512,
        dropout: float = 0.1,
        emb_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        _check_positive(channels=channels, num_classes=num_classes, res=res)
        patch = vit_patch_size(res, 16 if res > 64 else 4)
        depth = 10 if res > 64 else 6
        num_patches = (res // patch) ** 2
        self.patch_embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.emb_dropout = nn.Dropout(emb_dropout)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim_feedforward=mlp_dim,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised CLS-token features [B, dim] of images x [B, C, H, W]."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embedding
        tokens = self.encoder(self.emb_dropout(tokens))
        return self.norm(tokens[:, 0])


def default_convnet_depth(res: int) -> int:
    """ConvNet depth for `res` px: 3 up to 32 px (28 counts as 32), 4 at 64, 5 at 128, 6 at 256."""
    _check_positive(res=res)
    return max(3, round(math.log2(res)) - 2)


NetworkBuilder = Callable[..., nn.Module]


def _convnet_builder(fixed_depth: int | None, norm: str = "instance") -> NetworkBuilder:
    """A builder of ConvNet with depth `fixed_depth` (None: chosen from res) and `norm`."""

    def build(channels: int, num_classes: int, res: int, **overrides: Any) -> nn.Module:
        depth = fixed_depth if fixed_depth is not None else default_convnet_depth(res)
        if fixed_depth is not None and overrides.get("depth", depth) != depth:
            raise ConfigError(
                f"ConvNetD{fixed_depth} has depth {fixed_depth}, not {overrides['depth']}; "
                "use network 'ConvNet' to set the depth"
            )
        return ConvNet(channels, num_classes, res, **{"depth": depth, "norm": norm, **overrides})

    return build


NETWORKS: MappingProxyType[str, NetworkBuilder] = MappingProxyType(
    {
        "ConvNet": _convnet_builder(None),
        "ConvNetD3": _convnet_builder(3),
        "ConvNetD4": _convnet_builder(4),
        "ConvNetD5": _convnet_builder(5),
        "ConvNetD6": _convnet_builder(6),
        "ConvNetBN": _convnet_builder(None, norm="batch"),
        "AlexNet": AlexNet,
        "VGG11": VGG11,
        "ResNet18": ResNet18,
        "ResNet18BN": functools.partial(ResNet18, norm="batch"),
        "ViT": ViT,
    }
)


def build_seeded_network(
    name: str, channels: int, num_classes: int, res: int, seed: int, **overrides: Any
) -> nn.Module:
    """`build_network` initialised from manual_seed(seed); the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_network(name, channels, num_classes, res, **overrides)


def build_network(
    name: str, channels: int, num_classes: int, res: int, **overrides: Any
) -> nn.Module:
    """Build network `name` for [B, channels, res, res] images; overrides only for ConvNet*."""
    if name not in NETWORKS:
        raise ConfigError(f"unknown network {name!r}; choose one of: {', '.join(NETWORKS)}")
    _check_positive(channels=channels, num_classes=num_classes, res=res)
    if overrides:
        if not name.startswith("ConvNet"):
            raise ConfigError(
                f"network {name!r} takes no options (got {', '.join(sorted(overrides))}); "
                "only ConvNet* take: " + ", ".join(CONVNET_OVERRIDES)
            )
        unknown = sorted(set(overrides) - set(CONVNET_OVERRIDES))
        if unknown:
            raise ConfigError(
                f"unknown {name} option(s) {', '.join(unknown)}; "
                f"valid: {', '.join(CONVNET_OVERRIDES)}"
            )
    return NETWORKS[name](channels, num_classes, res, **overrides)
