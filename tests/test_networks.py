"""Tests for ld3m.models.networks: shapes at every size, gradients, parameter counts, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from ld3m.errors import ConfigError
from ld3m.models.networks import (
    NETWORKS,
    NORMS,
    POOLINGS,
    ConvNet,
    build_network,
    default_convnet_depth,
    vit_patch_size,
)

NUM_CLASSES = 5
# (channels, res): 28 px only with 1 channel (MNIST-like), as used in practice.
SIZES = [(3, 32), (3, 64), (3, 128), (1, 28)]
EMBED_DIMS = {"ResNet18": 512, "ViT": 512, "VGG11": 512 * 49}


def _num_params(net: nn.Module) -> int:
    """Number of trainable parameters of `net`."""
    return sum(p.numel() for p in net.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Make every test deterministic."""
    torch.manual_seed(0)


@pytest.mark.parametrize("channels,res", SIZES, ids=[f"{c}ch{r}" for c, r in SIZES])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_forward_and_embed_shapes(name: str, channels: int, res: int) -> None:
    net = build_network(name, channels, NUM_CLASSES, res).eval()
    x = torch.randn(2, channels, res, res)
    with torch.no_grad():
        logits = net(x)
        feats = net.embed(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert feats.ndim == 2 and feats.shape[0] == 2
    assert feats.shape[1] == net.classifier.in_features
    if name in EMBED_DIMS:
        assert feats.shape[1] == EMBED_DIMS[name]
    assert torch.isfinite(logits).all()
    # forward is exactly the final linear layer applied to embed
    torch.testing.assert_close(logits, net.classifier(feats))


@pytest.mark.parametrize("name", list(NETWORKS))
def test_backward_reaches_input(name: str) -> None:
    net = build_network(name, 3, NUM_CLASSES, 32)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    net(x).logsumexp(dim=1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("name", ["ConvNet", "VGG11", "ConvNetD6"])
def test_small_input_skips_pools_instead_of_crashing(name: str) -> None:
    net = build_network(name, 3, NUM_CLASSES, 28)
    assert net(torch.randn(2, 3, 28, 28)).shape == (2, NUM_CLASSES)


def test_convnet_parameter_counts_match_mtt() -> None:
    assert _num_params(build_network("ConvNet", 3, 10, 32)) == 320_010
    assert _num_params(build_network("ConvNetD3", 3, 10, 32)) == 320_010
    assert _num_params(build_network("ConvNet", 3, 10, 128)) == 615_690
    assert _num_params(build_network("ConvNetD5", 3, 10, 128)) == 615_690


def test_one_channel_28px_is_padded_to_32px() -> None:
    # MTT: the first conv pads 1-channel input by 3, so 28 px behaves like 32 px.
    net = build_network("ConvNet", 1, 10, 28)
    assert net.embed(torch.randn(2, 1, 28, 28)).shape == (2, 128 * 4 * 4)


@pytest.mark.parametrize(
    "res,depth", [(28, 3), (32, 3), (48, 4), (64, 4), (128, 5), (256, 6), (512, 7), (8, 3)]
)
def test_default_convnet_depth(res: int, depth: int) -> None:
    assert default_convnet_depth(res) == depth


def test_convnet_depth_follows_res() -> None:
    for res, depth in [(32, 3), (64, 4)]:
        net = build_network("ConvNet", 3, 2, res)
        assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == depth


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_convnet_norm_and_pooling_options(norm: str, pooling: str) -> None:
    net = build_network("ConvNet", 3, NUM_CLASSES, 32, width=16, norm=norm, pooling=pooling)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = net(x)
    assert out.shape == (2, NUM_CLASSES)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    side = 32 if pooling == "none" else 4
    assert net.embed(x).shape == (2, 16 * side * side)


@pytest.mark.parametrize("act", ["relu", "leakyrelu", "sigmoid", "gelu"])
def test_convnet_activations_are_out_of_place(act: str) -> None:
    net = build_network("ConvNet", 3, NUM_CLASSES, 32, width=8, act=act)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)
    assert not any(getattr(m, "inplace", False) for m in net.modules())


def test_no_network_uses_inplace_activations() -> None:
    for name in NETWORKS:
        net = build_network(name, 3, 2, 32)
        assert not any(getattr(m, "inplace", False) for m in net.modules()), name


def test_unknown_network_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        build_network("ConvNext", 3, 10, 32)
    msg = str(info.value)
    assert "\n" not in msg
    assert all(name in msg for name in NETWORKS)


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("ResNet18", {"width": 64}),
        ("ViT", {"depth": 3}),
        ("ConvNet", {"widht": 64}),
        ("ConvNet", {"norm": "weird"}),
        ("ConvNet", {"pooling": "stride"}),
        ("ConvNet", {"act": "tanh"}),
        ("ConvNet", {"width": 0}),
        ("ConvNetD4", {"depth": 5}),
    ],
)
def test_bad_overrides_raise_config_error(name: str, overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        build_network(name, 3, 10, 32, **overrides)


def test_overrides_apply_to_convnet_family() -> None:
    net = build_network("ConvNetD4", 3, 10, 32, width=32, depth=4)
    assert isinstance(net, ConvNet)
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 4
    assert net.classifier.in_features == 32 * 2 * 2


def test_bad_dimensions_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        build_network("ConvNet", 0, 10, 32)
    with pytest.raises(ConfigError):
        build_network("AlexNet", 3, 10, 4)


def test_registry_is_immutable() -> None:
    with pytest.raises(TypeError):
        NETWORKS["Mine"] = ConvNet  # type: ignore[index]


def test_vit_patch_size_divides_res() -> None:
    assert vit_patch_size(28, 4) == 4
    assert vit_patch_size(128, 16) == 16
    assert vit_patch_size(96, 16) == 16
    assert vit_patch_size(100, 16) == 10
    vit = build_network("ViT", 3, 2, 128)
    assert vit.patch_embed.kernel_size == (16, 16)
    assert len(vit.encoder.layers) == 10
    assert len(build_network("ViT", 3, 2, 32).encoder.layers) == 6


def test_convnet_double_backward() -> None:
    net = build_network("ConvNet", 3, NUM_CLASSES, 32, width=16)
    params = dict(net.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([0, 1])
    loss = nn.functional.cross_entropy(functional_call(net, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    grad_norm = sum(g.pow(2).sum() for g in grads)
    second = torch.autograd.grad(grad_norm, list(params.values()))
    assert all(torch.isfinite(g).all() for g in second)
    assert sum(g.abs().sum() for g in second) > 0


@pytest.mark.parametrize(("channels", "res"), [(1, 16), (3, 28), (3, 32), (1, 28)])
def test_vgg11_never_instance_normalises_a_single_pixel(channels: int, res: int) -> None:
    """A 1 px map through instance norm is a constant: VGG11 at 16 px used to stay at chance."""
    net = build_network("VGG11", channels, 10, res)
    sizes: list[int] = []
    for layer in net.modules():
        if isinstance(layer, torch.nn.GroupNorm):
            layer.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[-1]))
    x = torch.randn(2, channels, res, res, requires_grad=True)
    net(x).sum().backward()
    assert min(sizes) >= 2
    assert x.grad is not None and x.grad.abs().sum() > 0
