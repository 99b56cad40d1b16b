"""LD3M generator: formulas against a direct loop, and every backward scheme against autograd."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ld3m.config.schema import GeneratorConfig
from ld3m.errors import ConfigError
from ld3m.generator import (
    LD3MGenerator,
    choose_scheme,
    class_context,
    draw_noise,
    generate_and_backward,
    init_latents,
    resolve_scheme,
)
from ld3m.generator.backward import COST, predict_memory, probe_memory
from ld3m.prior.model import Prior
from tests.conftest import make_tiny_prior

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
N, STEPS, CHUNK = 3, 3, 2


@pytest.fixture(scope="module")
def prior64() -> Prior:
    return make_tiny_prior().to("cpu", torch.float64)


def make(prior: Prior, out_res: int = 16, **overrides: object) -> LD3MGenerator:
    cfg = dataclasses.replace(GeneratorConfig(steps=STEPS, chunk=CHUNK), **overrides)
    return LD3MGenerator(prior, cfg, out_res, MEAN, STD)


def inputs(prior: Prior, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    latents = draw_noise((N, 3, 4, 4), seed, torch.float64).requires_grad_()
    context = class_context(prior, torch.tensor([0, 1, 2])).requires_grad_()
    return latents, context, draw_noise((N, 3, 4, 4), seed + 100, torch.float64)


def loss_fn(images: torch.Tensor) -> torch.Tensor:
    """A nonlinear loss, so the image gradient depends on the images."""
    weights = draw_noise(images.shape, 7, images.dtype)
    return (weights * images).sum() + (images**2).mean() * 10


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype).view(1, -1, 1, 1)
    return (((x + 1) / 2).clamp(0, 1) - mean) / std


def reference_chain(
    prior: Prior, latents: torch.Tensor, context: torch.Tensor, noise: torch.Tensor,
    skip: str, guidance: float,
) -> torch.Tensor:  # fmt: skip
    """The notes' formulas, written out with direct UNet calls (paper mode: first call kept)."""
    scheduler = prior.make_scheduler()
    scheduler.set_timesteps(STEPS)
    abar = scheduler.alphas_cumprod.double()
    ts = scheduler.timesteps.tolist()
    big_k = STEPS - 1
    z = abar[ts[0]].sqrt() * latents + (1 - abar[ts[0]]).sqrt() * noise
    z_start, zq = z, prior.quantize(latents)
    for i, t in enumerate(ts):
        k = big_k - i
        a = abar[t]
        a_prev = abar[t - 1000 // STEPS] if t - 1000 // STEPS >= 0 else abar[0]
        e_c = prior.unet(z, t, encoder_hidden_states=context).sample
        e_u = prior.unet(z, t, encoder_hidden_states=prior.null_context(len(z))).sample
        e = e_c if guidance == 1 else e_u + guidance * (e_c - e_u)
        x0 = (z - (1 - a).sqrt() * e) / a.sqrt()
        if skip == "released":
            x0 = (1 - k / big_k) * x0 + (k / big_k) * zq
        z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
        if skip == "paper":
            z = (1 - (k + 1) / STEPS) * z + ((k + 1) / STEPS) * z_start
    return z


@pytest.mark.parametrize("skip", ["released", "paper", "none"])
def test_skip_modes_match_direct_formula(prior64: Prior, skip: str) -> None:
    latents, context, noise = inputs(prior64)
    generator = make(prior64, skip=skip)
    with torch.no_grad():
        want = reference_chain(prior64, latents, context, noise, skip, guidance=3.0)
        torch.testing.assert_close(generator.denoise(latents, context, noise), want)
        images = generator.generate(latents, context, noise)
        torch.testing.assert_close(images, normalise(prior64.decode(want)))
    assert images.shape == (N, 3, 16, 16)


def test_guidance_one_is_the_conditional_chain_with_one_batch(prior64: Prior) -> None:
    latents, context, noise = inputs(prior64)
    batches: list[int] = []
    hook = prior64.unet.register_forward_pre_hook(lambda _m, args: batches.append(len(args[0])))
    try:
        with torch.no_grad():
            got = make(prior64, guidance=1.0).denoise(latents, context, noise)
    finally:
        hook.remove()
    assert batches == [N] * STEPS  # no unconditional half
    with torch.no_grad():
        want = reference_chain(prior64, latents, context, noise, "released", guidance=1.0)
    torch.testing.assert_close(got, want)


def test_released_first_x0_is_quantized_latent_and_last_is_not(prior64: Prior) -> None:
    latents, context, noise = inputs(prior64)
    trace: list[torch.Tensor] = []
    with torch.no_grad():
        make(prior64).generate(latents, context, noise, trace=trace)
        quantized = prior64.quantize(latents)
    assert len(trace) == STEPS
    assert torch.equal(trace[0], quantized)
    assert not torch.allclose(trace[-1], quantized)


@pytest.mark.parametrize("out_res", [16, 8])
def test_autoencoder_mode_decodes_latents(prior64: Prior, out_res: int) -> None:
    latents, context, noise = inputs(prior64)
    with torch.no_grad():
        got = make(prior64, out_res, skip="autoencoder").generate(latents, context, noise)
        x = ((prior64.decode(latents) + 1) / 2).clamp(0, 1)
    if out_res != 16:
        x = F.interpolate(x, size=(out_res, out_res), mode="bilinear", antialias=True)
    mean = torch.tensor(MEAN, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype).view(1, -1, 1, 1)
    torch.testing.assert_close(got, (x - mean) / std, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def autograd_reference(prior64: Prior) -> tuple[torch.Tensor, ...]:
    """Direct generate + loss.backward: (loss, images, dZ, dc)."""
    latents, context, noise = inputs(prior64)
    images = make(prior64).generate(latents, context, noise)
    loss = loss_fn(images)
    loss.backward()
    return loss.detach(), images.detach(), latents.grad, context.grad


@pytest.mark.parametrize(("scheme", "ckpt"), list(COST))
def test_every_scheme_gives_autograd_gradients(
    prior64: Prior, autograd_reference: tuple[torch.Tensor, ...], scheme: str, ckpt: bool
) -> None:
    loss0, images0, grad_z, grad_c = autograd_reference
    latents, context, noise = inputs(prior64)
    generator = make(prior64)
    loss, images = generate_and_backward(
        generator, latents, context, noise, loss_fn, scheme, ckpt, CHUNK
    )
    assert not images.requires_grad
    torch.testing.assert_close(images, images0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, loss0, rtol=1e-10, atol=0)
    assert grad_z.abs().max() > 0 and grad_c.abs().max() > 0
    torch.testing.assert_close(latents.grad, grad_z, rtol=1e-4, atol=1e-4 * grad_z.abs().max())
    torch.testing.assert_close(context.grad, grad_c, rtol=1e-4, atol=1e-4 * grad_c.abs().max())


def test_two_phase_reuses_noise_and_redrawn_noise_would_be_wrong(
    prior64: Prior, autograd_reference: tuple[torch.Tensor, ...]
) -> None:
    grad_z = autograd_reference[2]
    latents, context, noise = inputs(prior64)
    generator = make(prior64)
    seen: list[torch.Tensor] = []
    original = generator.generate

    def recording(
        z: torch.Tensor, c: torch.Tensor, e: torch.Tensor, *args: bool, **kwargs: object
    ) -> torch.Tensor:
        seen.append(e.clone())
        return original(z, c, e, *args, **kwargs)

    generator.generate = recording
    generate_and_backward(generator, latents, context, noise, loss_fn, "two_phase", True, CHUNK)
    assert len(seen) == 4  # two chunks in each phase
    assert all(torch.equal(a, b) for a, b in zip(seen[:2], seen[2:], strict=True))

    # the released code's behaviour: phase 2 draws fresh noise -> a different gradient
    del generator.generate
    latents.grad = None
    redrawn = draw_noise(noise.shape, 999, noise.dtype)
    leaf = generator.render(latents, context, noise).requires_grad_()
    loss_fn(leaf).backward()
    generator.generate(latents, context, redrawn).backward(leaf.grad)
    assert (latents.grad - grad_z).abs().max() > 1e-3 * grad_z.abs().max()


@pytest.mark.parametrize(("ckpt", "calls"), [(False, 1), (True, 2)])  # N = 3, CHUNK = 2
def test_single_generates_in_one_call_unless_checkpointing_bounds_memory(
    prior64: Prior, autograd_reference: tuple[torch.Tensor, ...], ckpt: bool, calls: int
) -> None:
    grad_z = autograd_reference[2]
    latents, context, noise = inputs(prior64)
    generator = make(prior64)
    sizes: list[int] = []
    original = generator.generate

    def recording(z: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        sizes.append(len(z))
        return original(z, *args, **kwargs)

    generator.generate = recording
    generate_and_backward(generator, latents, context, noise, loss_fn, "single", ckpt, CHUNK)
    assert len(sizes) == calls and sum(sizes) == N
    torch.testing.assert_close(latents.grad, grad_z, rtol=1e-4, atol=1e-4 * grad_z.abs().max())


def test_two_phase_accepts_a_loss_that_backpropagates_itself(
    prior64: Prior, autograd_reference: tuple[torch.Tensor, ...]
) -> None:
    loss0, _, grad_z, grad_c = autograd_reference

    def class_by_class(images: torch.Tensor) -> torch.Tensor:
        weights, total = draw_noise(images.shape, 7, images.dtype), torch.zeros(())
        for part in (slice(0, 1), slice(1, N)):
            x = images[part]
            part_loss = (weights[part] * x).sum() + (x**2).sum() * 10 / images.numel()
            part_loss.backward()
            total = total + part_loss.detach()
        return total

    latents, context, noise = inputs(prior64)
    generator = make(prior64)
    loss, _ = generate_and_backward(
        generator, latents, context, noise, class_by_class, "two_phase", False, CHUNK
    )
    torch.testing.assert_close(loss, loss0.to(loss.dtype))
    torch.testing.assert_close(latents.grad, grad_z, rtol=1e-4, atol=1e-4 * grad_z.abs().max())
    torch.testing.assert_close(context.grad, grad_c, rtol=1e-4, atol=1e-4 * grad_c.abs().max())


def test_choose_scheme_follows_the_budget(prior64: Prior) -> None:
    generator = make(prior64)
    assert probe_memory(generator) is probe_memory(generator)  # probed once, cached
    assert choose_scheme(generator, 40, 10**15)[:2] == ("single", False)
    predicted = predict_memory(generator, 40)
    smallest = predicted[("two_phase", True)]
    assert smallest == min(predicted.values())
    scheme, ckpt, reason = choose_scheme(generator, 40, smallest)
    assert (scheme, ckpt) == ("two_phase", True) and "two_phase + checkpointing" in reason
    with pytest.raises(ConfigError, match="memory_budget_gb"):
        choose_scheme(generator, 40, smallest - 1)


def test_resolve_scheme_respects_fixed_settings(prior64: Prior) -> None:
    fixed = make(prior64, scheme="two_phase", checkpointing="on")
    assert resolve_scheme(fixed, 10)[:2] == ("two_phase", True)
    assert not fixed.probe_cache  # no probe needed
    only_single = make(prior64, scheme="single", memory_budget_gb=1e6)
    assert resolve_scheme(only_single, 10)[:2] == ("single", False)


def test_bad_settings_raise_config_error(prior64: Prior) -> None:
    latents, context, noise = inputs(prior64)
    with pytest.raises(ConfigError, match="bf16"):
        make(prior64, bf16=True).generate(latents, context, noise)
    with pytest.raises(ConfigError, match="steps"):
        make(prior64, steps=1)
    with pytest.raises(ConfigError, match="channel"):
        LD3MGenerator(prior64, GeneratorConfig(), 16, (0.5,), (0.5,))


def test_init_latents_real_and_gaussian(prior64: Prior) -> None:
    images = torch.rand(N, 3, 16, 16, dtype=torch.float64)
    classes = torch.tensor([2, 0, 1])
    latents, context = init_latents(prior64, classes, images)
    with torch.no_grad():
        torch.testing.assert_close(latents, prior64.encode(images * 2 - 1))
    torch.testing.assert_close(context, prior64.class_embeddings[classes].unsqueeze(1))
    gauss, _ = init_latents(prior64, classes, latent_size=4, seed=3)
    assert gauss.shape == (N, 3, 4, 4) and torch.equal(
        gauss, init_latents(prior64, classes, latent_size=4, seed=3)[0]
    )
    assert math.isclose(float(draw_noise((1000,), 0).std()), 1.0, abs_tol=0.1)
