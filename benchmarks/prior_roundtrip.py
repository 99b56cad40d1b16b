"""How much of the real images a prior's autoencoder keeps: PSNR of encode + decode round trips of
real test images, and an expert network's accuracy on the round trips against the originals.

LD3M initialises its latents by encoding real images, so a distilled set starts from such round
trips: an autoencoder that blurs away what a classifier needs caps every latent-space result.
The judge is the last snapshot of an expert trajectory (a network trained on the real training
set by `ld3m experts`), so no classifier is trained here.

    .venv/bin/python benchmarks/prior_roundtrip.py --config cpu_cifar10_short \\
        --prior runs/prior_cifar10_cpu/prior \\
        --experts runs/bench_quality/quality_cifar10_cpu/experts/<buffer>
"""

from __future__ import annotations

import argparse

import torch

from ld3m.config.io import load_config
from ld3m.data.datasets import load_dataset
from ld3m.experts.sampler import first_expert
from ld3m.models.teacher import expert_network
from ld3m.prior.model import load_prior
from ld3m.prior.quality import RECON_IMAGES, measure_autoencoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="preset or YAML giving the dataset")
    p.add_argument("--prior", required=True, help="prior directory")
    p.add_argument("--experts", required=True, help="expert buffer directory (the judge)")
    p.add_argument("--images", type=int, default=RECON_IMAGES, help="test images (evenly spaced)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(load_config(args.config, args.overrides).data)
    expert = first_expert(args.experts)
    info = data.info
    net = expert_network(expert, info).eval()
    report = measure_autoencoder(load_prior(args.prior), net, data, args.images)
    print(
        f"{info.name} at {info.res} px, {min(args.images, len(data.test_labels))} test images: "
        f"round-trip PSNR {report.psnr:.2f} dB; expert {expert.expert} ({expert.arch}, "
        f"{100 * expert.test_acc[-1]:.1f} % on the whole test split) accuracy "
        f"{100 * report.acc_originals:.1f} % on the originals, "
        f"{100 * report.acc_round_trips:.1f} % on the round trips"
    )


if __name__ == "__main__":
    main()
