"""Shared fixtures: tiny priors built in code (nothing is downloaded), paths to ../shared."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ld3m.prior.architectures import build_unet, build_vq, unet_config, vq_config
from ld3m.prior.layout import PriorSpec
from ld3m.prior.model import Prior, freeze, save_prior

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """Tests use tiny models, which are overhead-bound: one torch thread is faster, and avoids
    oversubscribing the cores when other work shares the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_data(name: str) -> Path:
    """A file of ../shared/data, or skip the test with the reason."""
    path = SHARED / "data" / name
    if not path.exists():
        pytest.skip(f"{path} not found: this test needs the shared datasets beside the checkout")
    return path


def make_tiny_prior(num_classes: int = 3, image_size: int = 16, channels: int = 3) -> Prior:
    """A randomly initialised VQ-f4 + class-conditional UNet prior, small enough for CPU tests."""
    torch.manual_seed(0)
    vae = build_vq(
        vq_config((8, 8, 16), latent_channels=3, num_embeddings=16, sample_size=image_size,
                  channels=channels, layers_per_block=1, norm_num_groups=4)
    )  # fmt: skip
    unet = build_unet(
        unet_config((8, 16), (False, True), cross_attention_dim=8, latent_channels=3,
                    sample_size=image_size // 4, layers_per_block=1, norm_num_groups=4)
    )  # fmt: skip
    table = torch.randn(num_classes + 1, 8)
    spec = PriorSpec(
        num_classes=num_classes, null_class=num_classes, image_size=image_size,
        channels=channels, latent_channels=3, latent_size=image_size // 4, autoencoder="vq",
        source="tests: random tiny prior",
    )  # fmt: skip
    return freeze(Prior(spec, vae, unet, table))


@pytest.fixture
def tiny_prior() -> Prior:
    return make_tiny_prior()


@pytest.fixture
def tiny_prior_dir(tmp_path: Path) -> Path:
    prior = make_tiny_prior()
    return save_prior(tmp_path / "prior", prior.spec, prior.vae, prior.unet, prior.class_embeddings)
