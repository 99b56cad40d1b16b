"""How LD3M's cost scales, at CPU scale on MNIST-5k (offline): three measurements, one run each.

  t       accuracy and seconds per iteration against the number of DDIM steps T (0 = decode Z
          directly, the autoencoder-only ablation; 2, 5, 10, 20 = the released skip mode):
          LD3M-DM IPC 10 on the quickstart prior, each set evaluated on ConvNet and ResNet18
          (the paper's Fig. 4 at small scale)
  procs   seconds per iteration of 1 process (2 threads, real batch 2B per class) against 2
          data-parallel processes (torchrun, 1 thread each, real batch B per rank) for the same
          global work, pixel and latent DM
  ipc-res seconds per LD3M-DM iteration for IPC 1/10/50 at 16/32/64 px (priors of one
          architecture, autoencoder f=2, trained for a single step: time does not depend on
          the weights), drawn as a plot

Each writes `<out>/<name>.json` and prints a Markdown table; `ipc-res` also writes a PNG. Runs
live under `<out>/runs/` and are reused when the command is repeated (seconds per iteration are
read back from their metrics.jsonl: the median over the iterations after the first).

    .venv/bin/python benchmarks/scale.py t procs ipc-res --out runs/bench_scale
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ld3m.config.io import load_config, save_config
from ld3m.config.schema import Config
from ld3m.distill.loop import run_distillation
from ld3m.evaluate.harness import evaluate_set
from ld3m.jsonl import read_jsonl
from ld3m.paths import RunPaths
from ld3m.prior.train import train_prior

QUIET = ["run.progress='off'"]


def quickstart(out_dir: Path, *overrides: str) -> Config:
    """The quickstart config with `overrides`, writing into out_dir."""
    return load_config("quickstart", [*QUIET, f"run.out_dir={out_dir}", *overrides])


def ensure_prior(out: Path, *overrides: str) -> Path:
    """A prior trained with the quickstart's prior settings (plus overrides), once."""
    cfg = quickstart(out, *overrides)
    prior = RunPaths(out).prior
    return prior if prior.is_dir() else Path(str(train_prior(cfg)))


def seconds_per_iteration(run: Path) -> float:
    """Median of time/iteration_s after the first iteration (warm-up)."""
    times = [r["value"] for r in read_jsonl(RunPaths(run).metrics_jsonl)
             if r["tag"] == "time/iteration_s"]  # fmt: skip
    return statistics.median(times[1:] or times)


def distil(cfg: Config) -> Path:
    """Run (or finish) a distillation; returns its final set."""
    final = RunPaths(Path(cfg.run.out_dir)).distilled_set(cfg.distill.iterations)
    return final if final.is_file() else run_distillation(cfg)


def t_tradeoff(out: Path, iterations: int) -> list[dict]:
    """Accuracy (ConvNet, ResNet18) and s/iteration against T."""
    prior = ensure_prior(out / "prior")
    rows = []
    for steps in (0, 2, 5, 10, 20):
        skip = "autoencoder" if steps == 0 else "released"
        cfg = quickstart(out / "runs" / f"t{steps}", f"prior.path={prior}", "distill.ipc=10",
                         "distill.objective=dm", f"distill.iterations={iterations}",
                         f"distill.export_every={iterations}", f"generator.steps={max(steps, 1)}",
                         f"generator.skip={skip}", "eval.archs=[ConvNet,ResNet18]")  # fmt: skip
        final = distil(cfg)
        records = evaluate_set(final, cfg.data, cfg.eval, RunPaths(final.parents[1]).eval_jsonl,
                               "off")  # fmt: skip
        acc = {r["arch"]: round(100 * r["acc"], 1) for r in records}
        rows.append({"T": steps, "s_per_iter": round(seconds_per_iteration(final.parents[1]), 3),
                     **acc})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def procs(out: Path, iterations: int, batch: int) -> list[dict]:
    """1 process x 2 threads x batch 2B against 2 processes x 1 thread x batch B."""
    prior = ensure_prior(out / "prior")
    rows = []
    for space in ("pixel", "latent"):
        common = [f"prior.path={prior}", "distill.objective=dm", f"distill.space={space}",
                  "distill.ipc=10", f"distill.iterations={iterations}",
                  f"distill.export_every={iterations}"]  # fmt: skip
        one = quickstart(out / "runs" / f"{space}-1proc", *common, "run.threads=2",
                         f"distill.batch_real={2 * batch}")  # fmt: skip
        distil(one)
        two = quickstart(out / "runs" / f"{space}-2proc", *common, "run.threads=1",
                         f"distill.batch_real={batch}")  # fmt: skip
        torchrun(two, 2)
        t1, t2 = (seconds_per_iteration(Path(c.run.out_dir)) for c in (one, two))
        rows.append({"space": space, "global_real_batch": 2 * batch, "1proc_s": round(t1, 3),
                     "2proc_s": round(t2, 3), "speedup": round(t1 / t2, 2)})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def torchrun(cfg: Config, n: int) -> None:
    """`torchrun --nproc_per_node n -m ld3m distill --config <its config.yaml>` (if unfinished)."""
    paths = RunPaths(Path(cfg.run.out_dir))
    if paths.distilled_set(cfg.distill.iterations).is_file():
        return
    save_config(cfg, paths.config)
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.run.threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "ld3m", "distill", "--config", str(paths.config)]  # fmt: skip
    subprocess.run(cmd, check=True, env=env)


def ipc_res(out: Path, iterations: int) -> list[dict]:
    """s/iteration of LD3M-DM for each IPC and resolution; plus the plot."""
    rows = []
    for res in (16, 32, 64):
        prior = ensure_prior(out / f"prior{res}", f"data.res={res}", "prior_train.ae_steps=1",
                             "prior_train.unet_steps=1", "prior_train.quality_per_class=0",
                             "prior_train.grid_per_class=1")  # fmt: skip
        for ipc in (1, 10, 50):
            cfg = quickstart(out / "runs" / f"res{res}-ipc{ipc}", f"prior.path={prior}",
                             f"data.res={res}", f"distill.ipc={ipc}", "distill.objective=dm",
                             f"distill.iterations={iterations}",
                             f"distill.export_every={iterations}")  # fmt: skip
            distil(cfg)
            seconds = seconds_per_iteration(Path(cfg.run.out_dir))
            rows.append({"res": res, "ipc": ipc, "s_per_iter": round(seconds, 3)})
            print(rows[-1], flush=True)
    plot_ipc_res(rows, out / "ipc_res.png")
    return rows


def plot_ipc_res(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for res in sorted({r["res"] for r in rows}):
        part = [r for r in rows if r["res"] == res]
        ax.plot([r["ipc"] for r in part], [r["s_per_iter"] for r in part], marker="o",
                label=f"{res} px")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images per class (IPC)")
    ax.set_ylabel("seconds per iteration")
    ax.set_title("LD3M-DM on MNIST-5k, T = 5, 2 CPU threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(path)


def markdown(rows: Sequence[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="+", choices=["t", "procs", "ipc-res"])
    p.add_argument("--out", default="runs/bench_scale")
    p.add_argument("--iterations", type=int, default=30, help="distillation iterations per run")
    p.add_argument("--batch", type=int, default=32, help="procs: real images per class per rank")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    measure = {
        "t": lambda: t_tradeoff(out, args.iterations),
        "procs": lambda: procs(out, min(args.iterations, 10), args.batch),
        "ipc-res": lambda: ipc_res(out, min(args.iterations, 3)),
    }
    for name in args.what:
        rows = measure[name]()
        (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
        print(f"\n## {name}\n\n{markdown(rows)}\n", flush=True)


if __name__ == "__main__":
    main()
