"""Back-propagating a loss on generated images into the latents Z and contexts c.

Schemes (cost per image in UNet forward-equivalents, a backward counted as two forwards):

    two_phase + checkpointing  5   the released code: no-grad pass, then per chunk a
                                   checkpointed regeneration with grad and images.backward(gX)
    two_phase                  4   same, regeneration keeps its activations (one chunk's worth)
    single + checkpointing     4   one graph over all images, UNet calls checkpointed
    single                     3   one graph over all images with every activation, all
                                   images in one call (chunks would save no memory)

Every scheme reuses the caller's noise in both phases (the released code redrew it, so it
differentiated images the loss never saw). `choose_scheme` picks the cheapest that fits a
memory budget, from a probe of one UNet call and one decode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ld3m.errors import ConfigError
from ld3m.generator.ldm import LD3MGenerator

log = logging.getLogger(__name__)

Option = tuple[str, bool]
"""(scheme, checkpointing)."""
COST: dict[Option, int] = {
    ("single", False): 3,
    ("single", True): 4,
    ("two_phase", False): 4,
    ("two_phase", True): 5,
}
"""UNet forward-equivalents per image and step of each option."""
BUDGET_FRACTION = 0.7


def generate_and_backward(
    generator: LD3MGenerator,
    latents: torch.Tensor,
    context: torch.Tensor,
    noise: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    scheme: str,
    checkpointing: bool,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, detached images); d loss / d latents [N,c,h,w] and context [N,1,D] go to .grad.

    chunk 0 means cfg.chunk. loss_fn may instead back-propagate itself and return a detached
    loss: with two_phase its input is a leaf, so it may do so class by class; with single its
    input carries the generator graph, so only one backward (or retain_graph) works.
    """
    chunk = chunk or generator.cfg.chunk
    if scheme == "two_phase":
        return _two_phase(generator, latents, context, noise, loss_fn, checkpointing, chunk)
    if scheme == "single":
        return _single(generator, latents, context, noise, loss_fn, checkpointing, chunk)
    raise ConfigError(f"generator.scheme={scheme!r}: use two_phase or single")


def images_per_call(option: Option, n_images: int, chunk: int) -> int:
    """`single` without checkpointing keeps every activation anyway, so it renders all images
    in one call (faster, no more memory); the other options go `chunk` at a time."""
    return n_images if option == ("single", False) else min(chunk, n_images)


def _slices(n: int, chunk: int) -> Iterator[slice]:
    return (slice(i, min(i + chunk, n)) for i in range(0, n, max(chunk, 1)))


def _two_phase(
    generator: LD3MGenerator,
    latents: torch.Tensor,
    context: torch.Tensor,
    noise: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    checkpointing: bool,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    images = generator.render(latents, context, noise, chunk)
    leaf = images.detach().requires_grad_()
    loss = loss_fn(leaf)
    if loss.requires_grad:
        loss.backward()
    if leaf.grad is not None:
        for part in _slices(len(latents), chunk):
            again = generator.generate(latents[part], context[part], noise[part], checkpointing)
            again.backward(leaf.grad[part])
    return loss.detach(), images


def _single(
    generator: LD3MGenerator,
    latents: torch.Tensor,
    context: torch.Tensor,
    noise: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    checkpointing: bool,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    parts = _slices(len(latents), images_per_call(("single", checkpointing), len(latents), chunk))
    images = torch.cat(
        [generator.generate(latents[p], context[p], noise[p], checkpointing) for p in parts]
    )
    loss = loss_fn(images)
    if loss.requires_grad:
        loss.backward()
    return loss.detach(), images.detach()


@dataclass(frozen=True)
class MemoryProbe:
    """Bytes saved for backward per image, measured on one image."""

    unet_call: int
    """One (guided) UNet call."""
    decoder: int
    """Decode + clamp/resize/normalise."""
    checkpoint_inputs: int
    """What a checkpointed UNet call keeps: its (doubled) latent and context inputs."""
    image: int
    """One output image."""


def _saved_bytes(fn: Callable[[], torch.Tensor], exclude: set[int]) -> int:
    """Bytes of distinct storages autograd saves while running fn (storages in exclude skipped)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def probe_memory(
    generator: LD3MGenerator, latent_shape: tuple[int, int, int] | None = None
) -> MemoryProbe:
    """Measure (once per generator and latent shape, then cached) the activation bytes per image."""
    shape = tuple(latent_shape or generator.latent_shape)
    if shape in generator.probe_cache:
        return generator.probe_cache[shape]
    prior = generator.prior
    weight = next(prior.unet.parameters())
    modules = [*prior.unet.parameters(), *prior.vae.parameters(), prior.class_embeddings]
    exclude = {p.untyped_storage().data_ptr() for p in modules}
    z = torch.randn(1, *shape, device=weight.device, dtype=weight.dtype, requires_grad=True)
    c = prior.embed(torch.zeros(1, dtype=torch.long, device=weight.device)).detach()
    c.requires_grad_()
    t = generator.schedule[0].t
    copies = 1 if generator.cfg.guidance == 1 else 2
    probe = MemoryProbe(
        unet_call=_saved_bytes(lambda: generator.eps(z * 1, t, c * 1), exclude),
        decoder=_saved_bytes(lambda: generator.to_images(z * 1), exclude),
        checkpoint_inputs=copies * (z.nbytes + c.nbytes),
        image=prior.spec.channels * generator.out_res**2 * z.element_size(),
    )
    generator.probe_cache[shape] = probe
    return probe


def predict_memory(
    generator: LD3MGenerator, n_images: int, latent_shape: tuple[int, int, int] | None = None
) -> dict[Option, int]:
    """Predicted peak activation bytes of each option for n_images (chunk = cfg.chunk)."""
    p = probe_memory(generator, latent_shape)
    b = min(generator.cfg.chunk, n_images)
    calls = generator.unet_calls
    plain = calls * p.unet_call + p.decoder
    ckpt = calls * p.checkpoint_inputs + p.decoder
    work = b * p.unet_call  # one call's forward/backward working set (recompute under ckpt)
    images = 2 * n_images * p.image  # two_phase keeps X and its gradient
    return {
        ("single", False): n_images * (plain + p.unet_call),  # one call: images_per_call
        ("single", True): n_images * ckpt + 2 * work,
        ("two_phase", False): b * plain + work + images,
        ("two_phase", True): b * ckpt + 2 * work + images,
    }


def available_memory(device: torch.device) -> int:
    """Free bytes on device: CUDA mem_get_info, or MemAvailable of /proc/meminfo on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ConfigError("cannot read free memory (/proc/meminfo); set generator.memory_budget_gb")


def option_name(option: Option) -> str:
    """'two_phase + checkpointing' style label."""
    return option[0] + (" + checkpointing" if option[1] else "")


def choose_scheme(
    generator: LD3MGenerator,
    n_images: int,
    budget_bytes: int,
    latent_shape: tuple[int, int, int] | None = None,
    allowed: tuple[Option, ...] = tuple(COST),
) -> tuple[str, bool, str]:
    """(scheme, checkpointing, reason): the cheapest allowed option whose memory fits the budget.

    budget_bytes 0 means 70% of the device's free memory.
    """
    device = next(generator.prior.unet.parameters()).device
    budget = budget_bytes or int(BUDGET_FRACTION * available_memory(device))
    predicted = predict_memory(generator, n_images, latent_shape)
    gb = 1e9
    for option in sorted(allowed, key=lambda o: (COST[o], predicted[o])):
        if predicted[option] <= budget:
            chunk = images_per_call(option, n_images, generator.cfg.chunk)
            reason = (
                f"{option_name(option)}: {COST[option]} UNet forward-equivalents per image, "
                f"predicted {predicted[option] / gb:.2f} GB <= budget {budget / gb:.2f} GB "
                f"for {n_images} images (chunk {chunk})"
            )
            log.info("generator scheme %s", reason)
            return option[0], option[1], reason
    least = min(allowed, key=lambda o: predicted[o])
    raise ConfigError(
        f"the generator needs about {predicted[least] / gb:.2f} GB for {n_images} images even "
        f"with {option_name(least)} (chunk {generator.cfg.chunk}) but the budget is "
        f"{budget / gb:.2f} GB; lower generator.chunk or raise generator.memory_budget_gb"
    )


def resolve_scheme(
    generator: LD3MGenerator, n_images: int, latent_shape: tuple[int, int, int] | None = None
) -> tuple[str, bool, str]:
    """(scheme, checkpointing, reason) from cfg.scheme/cfg.checkpointing, choosing where 'auto'."""
    cfg = generator.cfg
    allowed = tuple(
        (scheme, ckpt)
        for scheme, ckpt in COST
        if cfg.scheme in ("auto", scheme) and cfg.checkpointing in ("auto", "on" if ckpt else "off")
    )
    if len(allowed) == 1:
        return allowed[0][0], allowed[0][1], f"{option_name(allowed[0])}: set in the config"
    budget = int(cfg.memory_budget_gb * 1e9)
    return choose_scheme(generator, n_images, budget, latent_shape, allowed)
