"""Wall time of a 50-task sweep on a real Slurm: 25 distillation runs + 25 evaluation tasks.

MNIST-5k (offline), pixel-space DM, IPC 1, a grid over 25 distillation seeds, each final set
evaluated on one ConvNet; submitted with `ld3m sweep --executor slurm`, waited for, tabulated.
Needs a running Slurm (sudo bash slurm/local-cluster.sh up).

    .venv/bin/python benchmarks/slurm_sweep.py --out /tmp/ld3m-sweep50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import yaml

from ld3m.cli import main as ld3m_main
from ld3m.hpc.status import sweep_status
from ld3m.hpc.submit import submit_sweep

OVERRIDES = [
    "data.name=mnist5k", "distill.space=pixel", "distill.objective=dm", "distill.ipc=1",
    "distill.iterations=20", "distill.batch_real=64", "distill.save_every=10",
    "distill.export_every=20", "distill.image_every=20", "eval.epochs=20", "eval.schedule=step",
    "eval.lr=0.01", "eval.ema_decay=null", "run.threads=1", "run.progress=off",
]  # fmt: skip


def sweep_file(out: Path, runs: int) -> Path:
    spec = {
        "name": "sweep50",
        "out_dir": str(out),
        "overrides": OVERRIDES,
        "grid": {"distill.seed": list(range(runs))},
        "eval": {"archs": ["ConvNet"], "seeds": [0]},
        "slurm": {"time_min": 20, "cpus_per_task": 1, "mem_gb": 2, "array_parallelism": 50},
    }
    path = out / "sweep50.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def queued(ids: list[str]) -> bool:
    out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True,
                         text=True).stdout  # fmt: skip
    return bool(out.split())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/ld3m-sweep50")
    p.add_argument("--runs", type=int, default=25, help="distillation runs (tasks = 2 x runs)")
    args = p.parse_args()
    out = Path(args.out)
    start = time.time()
    root = submit_sweep(sweep_file(out, args.runs), "slurm")
    queued_s = time.time() - start
    manifest = json.loads((root / "manifest.json").read_text())
    ids = sorted({job.split("_")[0] for tasks in manifest["tasks"].values() for _, job in tasks})
    tasks = sum(len(t) for t in manifest["tasks"].values())
    while queued(ids):
        time.sleep(2)
    wall = time.time() - start
    states = [r.state for r in sweep_status(root)]
    ld3m_main(["table", str(root)])
    print(f"{tasks} array tasks in {len(ids)} arrays: queued in {queued_s:.1f} s, all done in "
          f"{wall:.1f} s; runs done: {states.count('done')}/{len(states)}")  # fmt: skip


if __name__ == "__main__":
    main()
