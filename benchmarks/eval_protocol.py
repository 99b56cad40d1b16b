"""Choose a short evaluation protocol on held-out TRAINING images, never on the test split.

The CPU benchmarks cannot afford LD3M's 1000-epoch evaluation. This script trains each
(architecture, learning rate, schedule, EMA) candidate on the random-real IPC-10 set (seed 0,
the draw every benchmark starts from) for `--epochs` epochs and reports its accuracy on
`--holdout` random training images (a fixed draw; at most the set's own 100 images can be among
them) and its training accuracy. The benchmark presets take the best candidate per
architecture.

    .venv/bin/python benchmarks/eval_protocol.py --root ../shared/data/cifar10.tar \\
        ConvNet:0.01:step:none ConvNet:0.001:warmup_cosine:0.995 AlexNet:0.03:step:none
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from ld3m.baseline import random_real_set
from ld3m.config.io import load_config
from ld3m.data.datasets import load_dataset
from ld3m.evaluate.train_eval import TrainData, train_and_test


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("candidates", nargs="+", help="ARCH:LR:SCHEDULE:EMA (EMA 'none' or a decay)")
    p.add_argument("--config", default="cpu_cifar10", help="preset giving data and the protocol")
    p.add_argument("--root", help="dataset tar/folder (default: the preset's data.root)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--holdout", type=int, default=2000, help="held-out training images")
    args = p.parse_args()
    cfg = load_config(args.config, [f"data.root={args.root}"] if args.root else [])
    data = load_dataset(cfg.data)
    synset = random_real_set(data, args.ipc, seed=0)
    x, y = data.train_tensors()
    held = torch.randperm(len(y), generator=torch.Generator().manual_seed(123))[: args.holdout]
    tensors = TrainData(synset.images, synset.labels, x[held], y[held], data.info.num_classes)
    print("| arch | lr | schedule | EMA | held-out acc (%) | train acc (%) | s |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.candidates:
        arch, lr, schedule, ema = spec.split(":")
        ecfg = replace(cfg.eval, epochs=args.epochs, schedule=schedule,
                       ema_decay=None if ema == "none" else float(ema))  # fmt: skip
        r = train_and_test(arch, tensors, ecfg, float(lr), seed=0)
        print(f"| {arch} | {lr} | {schedule} | {ema} | {100 * r.acc:.1f} | "
              f"{100 * r.train_acc:.0f} | {r.wall_s:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
