"""Quality benchmark: every method at CPU scale beside the published anchors, through a sweep.

Runs the shipped sweep `sweeps/quality_<dataset>_cpu.yaml` (random-real, pixel DC/DM/MTT, LD3M
DC/DM/MTT, the autoencoder-only ablation; IPC 1 and 10; every set on ConvNet, and on AlexNet,
VGG11, ResNet18 and ViT the sets named in the sweep file's `eval.more`) with the chosen executor,
waits, and prints the result table with the published ConvNet anchors of the same method and
IPC next to it, and the targets of the study (LD3M-DM vs pixel DM at IPC 10: +1 pp ConvNet,
+2 pp unseen mean; every method above random-real). Resumable: rerunning the command skips
every finished run, shard and evaluation.

Budgets (one network per cell; the sweep trains the dataset's CPU prior once unless --prior is
given): CIFAR-10, preset cpu_cifar10_short: 50 distillation iterations, 2 experts x 3 epochs, a
100-epoch evaluation protocol. Imagenette-128, preset cpu_imagenette128: 20 iterations, 2
experts x 1 epoch, the same protocol over 50 epochs. docs/benchmarks.md has the measured times:
hours on 2 CPU cores; on a cluster use `--executor slurm`.

    .venv/bin/python benchmarks/quality.py --dataset cifar10 --executor local \
        --prior runs/prior_cifar10_cpu/prior
    .venv/bin/python benchmarks/quality.py --dataset imagenette128 --executor local
    .venv/bin/python benchmarks/quality.py --dataset cifar10 --smoke  # pipeline check, ConvNet
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml

from ld3m.hpc.submit import submit_sweep
from ld3m.report.tables import UNSEEN, formatted, load_records, summary_table, write_tables

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
ANCHORS = {  # (dataset, method, ipc) -> (ConvNet accuracy %, source); CIFAR-10, ConvNet-3
    ("cifar10", "random_real", 1): ("14.4 ± 2.0", "DC paper"),
    ("cifar10", "random_real", 10): ("26.0 ± 1.2", "DC paper"),
    ("cifar10", "pixel_dc", 1): ("28.3 ± 0.5", "DC paper"),
    ("cifar10", "pixel_dc", 10): ("44.9 ± 0.5", "DC paper"),
    ("cifar10", "pixel_dm", 1): ("26.0 ± 0.8", "DM paper"),
    ("cifar10", "pixel_dm", 10): ("48.9 ± 0.6", "DM paper"),
    ("cifar10", "pixel_mtt", 1): ("46.3 ± 0.8", "MTT paper"),
    ("cifar10", "pixel_mtt", 10): ("65.3 ± 0.7", "MTT paper"),
    ("imagenette", "pixel_mtt", 1): ("47.7 ± 0.9", "MTT paper, 128 px ConvNet-D5"),
    ("imagenette", "pixel_mtt", 10): ("63.0 ± 1.3", "MTT paper, 128 px ConvNet-D5"),
}
SMOKE = [
    "distill.iterations=2", "distill.export_every=2", "distill.save_every=1",
    "distill.batch_real=16", "experts.num=2", "experts.epochs=2", "experts.keep_epochs=0",
    "distill.mtt.syn_steps=2", "distill.mtt.expert_epochs=1", "distill.mtt.max_start_epoch=1",
    "eval.epochs=2", "prior_train.ae_steps=2", "prior_train.unet_steps=2",
    "prior_train.quality_per_class=0", "generator.steps=2",
]  # fmt: skip


def targets(table: pd.DataFrame) -> list[str]:
    """The study's targets, checked on the measured table."""
    means = table["mean"]
    lines = []
    for dataset in sorted({idx[0] for idx in means.index}):
        rows = {(m, i): means.loc[(dataset, m, i)] for d, m, i in means.index if d == dataset}
        if ("ld3m_dm", 10) in rows and ("pixel_dm", 10) in rows:
            ld3m, pixel = rows[("ld3m_dm", 10)], rows[("pixel_dm", 10)]
            conv = ld3m["ConvNet"] - pixel["ConvNet"]
            unseen = ld3m[UNSEEN] - pixel[UNSEEN]
            unseen_text = "not on every unseen architecture yet" if pd.isna(unseen) \
                else f"{unseen:+.1f} pp"  # fmt: skip
            lines.append(f"{dataset}: LD3M-DM - pixel DM at IPC 10: ConvNet {conv:+.1f} pp "
                         f"(target >= +1), unseen mean {unseen_text} (target >= +2)")  # fmt: skip
        for ipc in (1, 10):
            base = rows.get(("random_real", ipc))
            if base is None:
                continue
            below = [m for (m, i), r in rows.items() if i == ipc and m != "random_real"
                     and r["ConvNet"] <= base["ConvNet"]]  # fmt: skip
            lines.append(f"{dataset} IPC {ipc}: methods not above random-real on ConvNet: "
                         f"{', '.join(below) or 'none'}")  # fmt: skip
    return lines


def movement(root: Path) -> pd.DataFrame:
    """How far each final set lies from the real images it started from: |S - R| / |R| over
    the whole set, R the random-real set of the same IPC (the same seed-0 draw every run is
    initialised from; for LD3M it includes the prior's decoding gap)."""
    from ld3m.artifacts import load_set
    from ld3m.config.io import load_config
    from ld3m.hpc.jobs import final_set
    from ld3m.hpc.sweep import read_manifest
    from ld3m.methods import method_name

    runs = read_manifest(root)["runs"]
    real = {}
    for run in runs:
        if run["kind"] == "baseline":
            cfg = load_config(Path(run["dir"]) / "config.yaml")
            real[cfg.baseline.ipc] = load_set(final_set(cfg, "baseline")).images
    rows = []
    for run in runs:
        cfg = load_config(Path(run["dir"]) / "config.yaml")
        path = final_set(cfg, run["kind"])
        if run["kind"] != "distill" or not path.is_file() or cfg.distill.ipc not in real:
            continue
        ref = real[cfg.distill.ipc]
        moved = float((load_set(path).images - ref).norm() / ref.norm())
        rows.append({"method": method_name(cfg), "ipc": cfg.distill.ipc, "moved": moved})
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "imagenette128"])
    p.add_argument("--executor", default="local", choices=["local", "slurm", "debug"])
    p.add_argument("--root", help="the dataset tar/folder (default: the preset's data.root)")
    p.add_argument("--prior", help="use this prior instead of training one")
    p.add_argument("--smoke", action="store_true", help="tiny budgets: check the pipeline")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    args = p.parse_args()
    overrides = [*args.overrides]
    if args.root:
        overrides.append(f"data.root={args.root}")
    if args.prior:
        overrides.append(f"prior.path={args.prior}")
    sweep = SWEEPS / f"quality_{args.dataset}_cpu.yaml"
    if args.smoke:  # its own sweep directory, so smoke results never mix with real ones
        overrides += SMOKE
        spec = yaml.safe_load(sweep.read_text())
        spec["name"] += "_smoke"
        spec["eval"] = {"archs": ["ConvNet"], "seeds": [0]}
        sweep = Path(spec["out_dir"]) / f"{spec['name']}.yaml"
        sweep.parent.mkdir(parents=True, exist_ok=True)
        sweep.write_text(yaml.safe_dump(spec))
    root = submit_sweep(sweep, args.executor, overrides, wait=True)
    table = summary_table(load_records([root]))
    if table.empty:
        print(f"no evaluation records under {root}")
        return
    write_tables(table, root / "report")
    shown = formatted(table)
    shown["ConvNet anchor"] = [
        " ".join(ANCHORS.get((d, m, i), ("–", ""))) for d, m, i in
        zip(shown["dataset"], shown["method"], shown["ipc"], strict=True)
    ]  # fmt: skip
    print(shown.to_markdown(index=False, disable_numparse=True))
    print("\n".join(["", *targets(table)]))
    moved = movement(root)
    if not moved.empty:
        print("\nfinal set vs the real images it started from (|S - R| / |R|):")
        print(moved.to_markdown(index=False, floatfmt=".3f"))
    print(f"\ntables: {root / 'report'}")


if __name__ == "__main__":
    main()
