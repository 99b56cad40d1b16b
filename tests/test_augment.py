"""Tests for Differentiable Siamese Augmentation (ld3m.data.augment)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ld3m.data.augment import (
    FAMILIES,
    DiffAugment,
    Draw,
    DSAParams,
    affine,
    apply_family,
    cutout,
    flip,
    parse_strategy,
    rotate_theta,
    scale_theta,
    translate,
)
from ld3m.errors import ConfigError, DataError


def _images(b: int = 6, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def _per_sample_draw(batch: int, seed: int = 0) -> Draw:
    return Draw(batch, torch.Generator().manual_seed(seed), siamese=False)


@pytest.mark.parametrize("name", FAMILIES)
def test_siamese_prefix_matches_for_each_family(name: str) -> None:
    x = _images(8)
    changed = False
    for seed in range(8):
        full = apply_family(name, x, Draw.from_seed(seed, 8))
        prefix = apply_family(name, x[:3], Draw.from_seed(seed, 3))
        assert torch.equal(full[:3], prefix)
        changed |= not torch.equal(full, x)
    assert changed, f"{name} never changed the images"


@pytest.mark.parametrize("name", FAMILIES)
def test_siamese_applies_one_transform_to_identical_samples(name: str) -> None:
    x = _images(1).expand(5, -1, -1, -1)
    for seed in range(4):
        out = apply_family(name, x, Draw.from_seed(seed, 5))
        assert all(torch.equal(out[i], out[0]) for i in range(1, 5))


def test_full_strategy_siamese_same_transform_for_real_and_synthetic() -> None:
    aug = DiffAugment()
    real, syn = _images(10, seed=1), _images(4, seed=2)
    both = torch.cat([syn, real])
    for seed in range(24):
        assert torch.equal(aug(both, seed=seed)[:4], aug(syn, seed=seed))
        assert torch.equal(aug(real, seed=seed)[:4], aug(real[:4], seed=seed))


def test_same_seed_reproducible_and_different_seeds_differ() -> None:
    aug, x = DiffAugment(), _images(4)
    assert torch.equal(aug(x, seed=7), aug(x, seed=7))
    outs = [aug(x, seed=s) for s in range(10)]
    distinct = [o for i, o in enumerate(outs) if not any(torch.equal(o, p) for p in outs[:i])]
    assert len(distinct) >= 5


@pytest.mark.parametrize("name", FAMILIES)
def test_per_sample_mode_varies_across_identical_samples(name: str) -> None:
    x = _images(1).expand(16, -1, -1, -1)
    out = apply_family(name, x, _per_sample_draw(16))
    assert not all(torch.equal(out[i], out[0]) for i in range(1, 16))


def test_diffaugment_per_sample_uses_generator_or_global_rng() -> None:
    aug, x = DiffAugment("flip_scale_rotate"), _images(1).expand(16, -1, -1, -1)
    a = aug(x, generator=torch.Generator().manual_seed(3))
    b = aug(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not all(torch.equal(a[i], a[0]) for i in range(1, 16))
    torch.manual_seed(11)
    c = aug(x)
    torch.manual_seed(11)
    assert torch.equal(c, aug(x))


def test_seeded_call_leaves_global_rng_untouched() -> None:
    aug, x = DiffAugment(), _images(4)
    state = torch.get_rng_state()
    for seed in range(6):
        aug(x, seed=seed)
    aug(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    aug(x)  # unseeded, no generator: draws from the global RNG
    assert not torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("siamese", [True, False])
def test_gradient_flows_to_input(name: str, siamese: bool) -> None:
    x = _images(4).requires_grad_(True)
    draw = Draw.from_seed(1, 4) if siamese else _per_sample_draw(4, 1)
    out = apply_family(name, x, draw)
    weight = torch.rand(out.shape, generator=torch.Generator().manual_seed(5)) + 0.1
    (out * weight).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if name == "cutout":  # gradient is the weight outside the square, zero inside
        assert torch.equal(x.grad, torch.where(out == 0, torch.zeros_like(weight), weight))
    if name == "flip":  # gradient is the weight, flipped back for flipped samples
        for b in range(4):
            flipped = torch.equal(out[b], x[b].flip(2))
            assert torch.equal(x.grad[b], weight[b].flip(2) if flipped else weight[b])


def test_flip_probability_one_and_zero_are_exact() -> None:
    x = _images(5)
    always = apply_family("flip", x, _per_sample_draw(5), DSAParams(prob_flip=1.0))
    never = apply_family("flip", x, _per_sample_draw(5), DSAParams(prob_flip=0.0))
    assert torch.equal(always, x.flip(3))
    assert torch.equal(never, x)
    mixed = flip(x, torch.tensor([True, False, True, False, False]))
    assert torch.equal(mixed[0], x[0].flip(2)) and torch.equal(mixed[1], x[1])


def test_flip_only_strategy_gives_identity_or_exact_flip() -> None:
    aug, x = DiffAugment("flip"), _images(3)
    outs = [aug(x, seed=s) for s in range(12)]
    assert all(torch.equal(o, x) or torch.equal(o, x.flip(3)) for o in outs)
    assert any(torch.equal(o, x) for o in outs) and any(torch.equal(o, x.flip(3)) for o in outs)


def test_rotate_zero_and_scale_one_are_identity() -> None:
    x = _images(3)
    torch.testing.assert_close(affine(x, rotate_theta(torch.zeros(3))), x, atol=1e-5, rtol=0)
    unit = torch.ones(3)
    torch.testing.assert_close(affine(x, scale_theta(unit, unit)), x, atol=1e-5, rtol=0)


def test_rotate_ninety_degrees_is_anticlockwise_rot90() -> None:
    x = _images(2)
    out = affine(x, rotate_theta(torch.full((2,), math.pi / 2)))
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_scale_and_rotate_stay_within_configured_ranges() -> None:
    x = _images(1, h=33, w=33).expand(64, -1, -1, -1)
    # The centre pixel is fixed by both transforms; a zero ratio gives the identity.
    for name in ("scale", "rotate"):
        out = apply_family(name, x, _per_sample_draw(64, 2))
        assert torch.allclose(out[:, :, 16, 16], x[:, :, 16, 16], atol=1e-5)
    none = apply_family("rotate", x, _per_sample_draw(64, 2), DSAParams(ratio_rotate=0.0))
    torch.testing.assert_close(none, x, atol=1e-5, rtol=0)
    one = apply_family("scale", x, _per_sample_draw(64, 2), DSAParams(ratio_scale=1.0))
    torch.testing.assert_close(one, x, atol=1e-5, rtol=0)


def test_translate_reads_zero_padding_outside() -> None:
    x = _images(2, h=6, w=5)
    out = translate(x, torch.tensor([1, 0]), torch.tensor([0, -2]))
    assert torch.equal(out[0, :, :-1], x[0, :, 1:]) and torch.all(out[0, :, -1] == 0)
    assert torch.equal(out[1, :, :, 2:], x[1, :, :, :-2]) and torch.all(out[1, :, :, :2] == 0)
    assert torch.equal(translate(x, torch.zeros(2), torch.zeros(2)), x)


def test_crop_shift_is_within_ratio_of_size() -> None:
    x = _images(1, h=16, w=16).expand(12, -1, -1, -1)
    out = apply_family("crop", x, _per_sample_draw(12, 4))
    shift = int(16 * 0.125 + 0.5)  # 2 pixels
    shifts = range(-shift, shift + 1)
    for b in range(12):
        one = x[:1]
        assert any(
            torch.equal(out[b : b + 1], translate(one, torch.tensor([tx]), torch.tensor([ty])))
            for tx, ty in itertools.product(shifts, shifts)
        )


def test_cutout_zeroes_clamped_square() -> None:
    ones = torch.ones(3, 2, 16, 16)
    out = cutout(ones, torch.tensor([8, 0, 15]), torch.tensor([8, 0, 3]), 0.5)
    assert torch.equal(out[0, 0] == 0, _square(4, 12, 4, 12))
    assert torch.equal(out[1, 0] == 0, _square(0, 4, 0, 4))
    assert torch.equal(out[2, 0] == 0, _square(11, 16, 0, 7))
    assert torch.equal(out[:, 0], out[:, 1])
    random = apply_family("cutout", ones, _per_sample_draw(3))
    zeros = (random[:, 0] == 0).sum(dim=(1, 2))
    assert torch.all((zeros > 0) & (zeros <= 64))


def _square(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[r0:r1, c0:c1] = True
    return mask


def test_color_matches_formulas() -> None:
    x, p = _images(3), DSAParams()
    draw, twin = Draw.from_seed(9, 3), torch.Generator().manual_seed(9)
    rb, rs, rc = (torch.rand(1, generator=twin).item() for _ in range(3))
    y = x + (rb - 0.5) * p.brightness
    m = y.mean(dim=1, keepdim=True)
    y = (y - m) * (rs * p.saturation) + m
    m = y.mean(dim=[1, 2, 3], keepdim=True)
    y = (y - m) * (rc + p.contrast) + m
    torch.testing.assert_close(apply_family("color", x, draw, p), y)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_preserved(name: str, dtype: torch.dtype) -> None:
    x = _images(3, c=1, h=12, w=10).to(dtype)
    out = apply_family(name, x, _per_sample_draw(3))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    full = DiffAugment()(x, seed=3)
    assert full.shape == x.shape and full.dtype == dtype and full.is_contiguous()


def test_strategy_validation() -> None:
    assert parse_strategy("color_crop_cutout_flip_scale_rotate") == FAMILIES
    assert parse_strategy("none") == () and parse_strategy("") == ()
    x = _images(2)
    assert DiffAugment("none")(x, seed=1) is x and DiffAugment("")(x) is x
    for bad in ("color_blur", "color__crop", "Flip"):
        with pytest.raises(ConfigError, match="color, crop, cutout, flip, scale, rotate"):
            DiffAugment(bad)
    with pytest.raises(ConfigError):
        apply_family("noise", x, _per_sample_draw(2))


def test_call_argument_errors() -> None:
    aug = DiffAugment()
    with pytest.raises(ConfigError, match="both a seed and a generator"):
        aug(_images(2), seed=1, generator=torch.Generator())
    with pytest.raises(DataError, match=r"\[B,C,H,W\]"):
        aug(torch.zeros(3, 8, 8), seed=1)
