"""Random-real CIFAR-10 baseline against the published anchors (ConvNet-3, DC/MTT protocol).

For IPC 1 and 10 and evaluation with and without DSA: `--runs` random draws of IPC real
training images per class (draw r uses seed r), each trained from scratch with run seed r for
`--epochs` epochs (SGD lr 0.01, momentum 0.9, weight decay 5e-4, x0.1 at half time, no EMA,
batch 256), tested once at the end on the 10,000 test images. Prints mean +- std (population,
as the research code) beside the anchors. Resumable: finished runs are read back from
`<out>/eval.jsonl`.

    .venv/bin/python benchmarks/random_real.py --root ../shared/data/cifar10.tar
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from ld3m.artifacts import save_set
from ld3m.baseline import random_real_set
from ld3m.config.schema import DataConfig, EvalConfig
from ld3m.data.datasets import load_dataset
from ld3m.evaluate.harness import evaluate_set

ANCHORS = {
    # (ipc, dsa): (mean, std or None, source)
    (1, False): (14.4, 2.0, "DC paper, official CIFAR-10, no augmentation"),
    (10, False): (26.0, 1.2, "DC paper, official CIFAR-10, no augmentation"),
    (1, True): (15.5, None, "research code evaluate_synset on this JPEG copy, DSA"),
    (10, True): (31.0, None, "research code evaluate_synset on this JPEG copy, DSA"),
}


def protocol(epochs: int, dsa: bool, run: int) -> EvalConfig:
    """DC/MTT evaluation protocol for ConvNet-3, one run with seed `run`."""
    return EvalConfig(
        archs=("ConvNetD3",),
        runs=1,
        seed=run,
        epochs=epochs,
        lr=0.01,
        schedule="step",
        ema_decay=None,
        dsa=dsa,
    )


def one_run(data_cfg: DataConfig, set_path: Path, cfg: EvalConfig, out: Path, threads: int) -> dict:
    """Evaluate one (set, protocol, seed) in a worker process."""
    torch.set_num_threads(threads)
    return evaluate_set(set_path, data_cfg, cfg, out, progress_mode="off")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data/cifar10.tar")
    parser.add_argument("--out", default="runs/bench_random_real")
    parser.add_argument("--cache-dir", default="~/.cache/ld3m/data")
    parser.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="parallel runs (1 thread each)")
    args = parser.parse_args()

    start = time.perf_counter()
    out = Path(args.out)
    data_cfg = DataConfig(name="cifar10", root=args.root, cache_dir=args.cache_dir)
    data = load_dataset(data_cfg)
    jobs = []
    for ipc in args.ipcs:
        for run in range(args.runs):
            set_path = out / "artifacts" / f"random_real_ipc{ipc}_draw{run}.safetensors"
            if not set_path.exists():
                save_set(set_path, random_real_set(data, ipc, seed=run))
            for dsa in (False, True):
                jobs.append(((ipc, dsa), set_path, protocol(args.epochs, dsa, run)))
    threads = max(1, (os.cpu_count() or 2) // args.workers)
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [
            (key, pool.submit(one_run, data_cfg, p, c, out / "eval.jsonl", threads))
            for key, p, c in jobs
        ]
        results: dict[tuple[int, bool], list[dict]] = {}
        for key, fut in futures:
            results.setdefault(key, []).append(fut.result())
    report(results, args, time.perf_counter() - start)


def report(
    results: dict[tuple[int, bool], list[dict]], args: argparse.Namespace, wall: float
) -> None:
    """Markdown table of mean +- std beside the anchors, plus run times."""
    print(f"\nCIFAR-10 random-real, ConvNet-3, {args.runs} runs x {args.epochs} epochs\n")
    print("| IPC | eval DSA | ld3m acc (%) | anchor (%) | anchor source | s per run |")
    print("|---|---|---|---|---|---|")
    for (ipc, dsa), records in sorted(results.items()):
        accs = [100 * r["acc"] for r in records]
        secs = statistics.fmean(r["wall_s"] for r in records)
        mean, std, source = ANCHORS.get((ipc, dsa), (float("nan"), None, "-"))
        anchor = f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "")
        line = f"| {ipc} | {'yes' if dsa else 'no'} | {statistics.fmean(accs):.1f} ± "
        print(line + f"{statistics.pstdev(accs):.1f} | {anchor} | {source} | {secs:.0f} |")
    print(f"\nwall time: {wall:.0f} s with {args.workers} worker(s)")


if __name__ == "__main__":
    main()
