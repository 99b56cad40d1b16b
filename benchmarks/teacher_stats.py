"""Loading an SRe2L teacher with and without its kept BN statistics, side by side.

Copies the expert buffer to a temporary folder without `teacher_bn.safetensors`, loads the
teacher there twice (the first load recomputes the statistics over the train split and keeps
them, the second reads them back) and prints both times and their ratio.

    .venv/bin/python benchmarks/teacher_stats.py \
        runs/bench_seed_methods/sre2l_cifar10_cpu/experts/cifar10-ConvNetBN-<hash> \
        --root ../shared/data/cifar10.tar --threads 1
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ld3m.config.schema import DataConfig
from ld3m.data.datasets import load_dataset
from ld3m.models.teacher import STATS_FILE, load_teacher


def timed_load(buffer: Path, data) -> float:
    start = time.perf_counter()
    load_teacher(buffer, data)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("buffer", type=Path, help="expert buffer trained with experts.arch=ConvNetBN")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--root", default="../shared/data/cifar10.tar")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(DataConfig(name=args.dataset, root=args.root))
    with tempfile.TemporaryDirectory() as tmp:
        buffer = Path(tmp) / "buffer"
        shutil.copytree(args.buffer, buffer, ignore=shutil.ignore_patterns(STATS_FILE))
        cold = timed_load(buffer, data)
        warm = timed_load(buffer, data)
    print(f"threads {args.threads}, {len(data.train_labels)} train images")
    print(f"recompute BN statistics: {cold:.1f} s")
    print(f"read kept statistics:    {warm:.2f} s")
    print(f"ratio: {cold / warm:.0f}x")


if __name__ == "__main__":
    main()
