"""Cheap, honest prior quality: do class-conditional samples look like their class?

A ConvNet is trained on the REAL training set, checked on the real test set, then asked to
classify class-conditional DDIM samples of the prior. The share it labels as the class they
were drawn for is the class consistency (chance = 1 / num_classes). The autoencoder is checked
on its own: real test images go through encode + decode, and the report gives the round trips'
PSNR and the same ConvNet's accuracy on them (LD3M starts from such round trips, so a weak
autoencoder caps every latent-space result).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ld3m.data.datasets import RealDataset
from ld3m.models.networks import build_network
from ld3m.prior.model import Prior

log = logging.getLogger(__name__)

CLASSIFIER = "ConvNet"
CLASSIFIER_WIDTH = 32
CLASSIFIER_LR = 1e-3
BATCH = 128
SAMPLE_CHUNK = 100
RECON_IMAGES = 500
"""Real test images (evenly spaced) the autoencoder round trip is measured on."""


@dataclass(frozen=True)
class QualityReport:
    """Outcome of one quality check."""

    class_consistency: float
    """Share of samples the real-data ConvNet assigns to the class they were drawn for."""
    real_test_acc: float
    """The same ConvNet's accuracy on the real test split (how much to trust the first number)."""
    recon_psnr: float
    """PSNR (dB, 8-bit pixels) of autoencoder round trips of real test images."""
    recon_test_acc: float
    """The ConvNet's accuracy on those round trips (against real_test_acc on the originals)."""
    n_per_class: int
    guidance: float
    steps: int

    def summary(self, num_classes: int) -> str:
        """One line for the terminal."""
        return (
            f"class consistency {self.class_consistency:.3f} (chance {1 / num_classes:.3f}; "
            f"real-data {CLASSIFIER} test accuracy {self.real_test_acc:.3f}; {self.n_per_class} "
            f"samples per class, guidance {self.guidance}, {self.steps} DDIM steps); autoencoder "
            f"round trips of test images: PSNR {self.recon_psnr:.1f} dB, {CLASSIFIER} accuracy "
            f"{self.recon_test_acc:.3f}"
        )

    def as_metrics(self) -> dict[str, float]:
        """Scalars for the tracker."""
        return {
            "quality/class_consistency": self.class_consistency,
            "quality/real_test_acc": self.real_test_acc,
            "quality/recon_psnr": self.recon_psnr,
            "quality/recon_test_acc": self.recon_test_acc,
        }


@torch.no_grad()
def sample_images(
    prior: Prior, classes: torch.Tensor, guidance: float, steps: int, generator: torch.Generator
) -> torch.Tensor:
    """Class-conditional DDIM (eta 0) samples [B, C, H, W] in [-1, 1] for prior classes [B]."""
    spec = prior.spec
    device = prior.class_embeddings.device
    scheduler = prior.make_scheduler()
    scheduler.set_timesteps(steps)
    shape = (len(classes), spec.latent_channels, spec.latent_size, spec.latent_size)
    z = torch.randn(shape, generator=generator).to(device)
    context = torch.cat([prior.embed(classes.to(device)), prior.null_context(len(classes))])
    for t in scheduler.timesteps:
        eps_c, eps_u = prior.unet(torch.cat([z, z]), t, encoder_hidden_states=context).sample.chunk(
            2
        )
        eps = eps_u + guidance * (eps_c - eps_u)
        z = scheduler.step(eps, t, z, eta=0.0).prev_sample
    return prior.decode(z).clamp(-1.0, 1.0)


def sample_grid(
    prior: Prior, per_class: int, guidance: float, steps: int, seed: int
) -> torch.Tensor:
    """Samples [num_classes * per_class, C, H, W] in [0, 1], one row of `per_class` per class."""
    classes = torch.arange(prior.spec.num_classes).repeat_interleave(per_class)
    images = _sample_chunked(prior, classes, guidance, steps, torch.Generator().manual_seed(seed))
    return (images + 1) / 2


def _sample_chunked(
    prior: Prior, classes: torch.Tensor, guidance: float, steps: int, generator: torch.Generator
) -> torch.Tensor:
    """`sample_images` in chunks of SAMPLE_CHUNK, on the CPU."""
    parts = [
        sample_images(prior, chunk, guidance, steps, generator).cpu()
        for chunk in classes.split(SAMPLE_CHUNK)
    ]
    return torch.cat(parts)


def train_classifier(
    data: RealDataset, epochs: int, seed: int, device: torch.device | str = "cpu"
) -> tuple[nn.Module, float]:
    """A ConvNet trained with Adam on the real training set; returns (net, real test accuracy)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    info = data.info
    net = build_network(
        CLASSIFIER, info.channels, info.num_classes, info.res, width=CLASSIFIER_WIDTH
    )
    net.to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=CLASSIFIER_LR)
    for _ in range(epochs):
        for idx in torch.randperm(len(data.train_labels), generator=gen).split(BATCH):
            x = data.normalize(data.train_images[idx]).to(device)
            loss = F.cross_entropy(net(x), data.train_labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval()
    return net, _accuracy(net, data, data.test_images, data.test_labels)


@torch.no_grad()
def _accuracy(
    net: nn.Module, data: RealDataset, images: torch.Tensor, labels: torch.Tensor
) -> float:
    """Top-1 accuracy of `net` on uint8 images [N, C, H, W] (normalised batch by batch)."""
    device = next(net.parameters()).device
    correct = 0
    for x, y in zip(images.split(500), labels.split(500), strict=True):
        correct += int((net(data.normalize(x).to(device)).argmax(1).cpu() == y).sum())
    return correct / max(len(labels), 1)


def prior_classes(prior: Prior, data: RealDataset) -> torch.Tensor:
    """Prior class index of each dataset label: identity for a prior trained on this dataset,
    the ImageNet index (`info.prior_classes`) for an ImageNet prior."""
    info = data.info
    if prior.spec.num_classes != info.num_classes and info.prior_classes is not None:
        return torch.tensor(info.prior_classes)
    return torch.arange(info.num_classes)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, C, H, W] -> float in [-1, 1] (the inverse of `to_uint8` at one size)."""
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: torch.Tensor, res: int) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] as uint8 at `res` px, like decoded real images."""
    if images.shape[-1] != res:
        images = F.interpolate(images, size=(res, res), mode="bilinear", antialias=True)
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio (dB) between two uint8 image tensors of one shape."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


@torch.no_grad()
def round_trip(prior: Prior, images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, C, H, W] through the prior's encode + decode, as uint8 at the same size."""
    device = prior.class_embeddings.device
    res = images.shape[-1]
    parts = []
    for x in images.split(SAMPLE_CHUNK):
        z = prior.encode(to_pixels(x).to(device))
        parts.append(to_uint8(prior.decode(z).clamp(-1.0, 1.0).cpu(), res))
    return torch.cat(parts)


class RoundTripReport(NamedTuple):
    """The autoencoder on real test images: how close, and how recognisable, its round trips are."""

    psnr: float
    acc_round_trips: float
    """A real-data classifier's accuracy on the round trips ..."""
    acc_originals: float
    """... and on the same images as they are."""


def measure_autoencoder(
    prior: Prior, net: nn.Module, data: RealDataset, n_images: int = RECON_IMAGES
) -> RoundTripReport:
    """Round trips of `n_images` evenly spaced real test images, judged by classifier `net`."""
    pick = torch.linspace(0, len(data.test_labels) - 1, min(n_images, len(data.test_labels)))
    idx = pick.round().long().unique()
    originals, labels = data.test_images[idx], data.test_labels[idx]
    trips = round_trip(prior, originals)
    return RoundTripReport(
        psnr(trips, originals),
        _accuracy(net, data, trips, labels),
        _accuracy(net, data, originals, labels),
    )


def measure_quality(
    prior: Prior,
    data: RealDataset,
    n_per_class: int,
    guidance: float,
    steps: int,
    seed: int,
    epochs: int = 3,
) -> QualityReport:
    """Train the real-data ConvNet, then classify `n_per_class` samples per class."""
    device = prior.class_embeddings.device
    net, real_acc = train_classifier(data, epochs, seed, device)
    log.info("quality: %s on the real data: test accuracy %.4f", CLASSIFIER, real_acc)
    labels = torch.arange(data.info.num_classes).repeat_interleave(n_per_class)
    gen = torch.Generator().manual_seed(seed)
    images = _sample_chunked(prior, prior_classes(prior, data)[labels], guidance, steps, gen)
    consistency = _accuracy(net, data, to_uint8(images, data.info.res), labels)
    trips = measure_autoencoder(prior, net, data)
    return QualityReport(
        class_consistency=consistency,
        real_test_acc=real_acc,
        recon_psnr=trips.psnr,
        recon_test_acc=trips.acc_round_trips,
        n_per_class=n_per_class,
        guidance=guidance,
        steps=steps,
    )


def class_consistency(
    prior: Prior, data: RealDataset, n_per_class: int, guidance: float, steps: int, seed: int
) -> float:
    """Share of class-conditional samples a real-data ConvNet assigns to their class."""
    return measure_quality(prior, data, n_per_class, guidance, steps, seed).class_consistency
