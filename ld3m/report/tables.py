"""Result tables and plots from the records ld3m writes (`ld3m table`, tools/results.py).

Input: sweep directories (their manifest.json lists the runs) or run directories. Each run's
eval.jsonl gives one row per trained network; metrics.jsonl gives the loss curve. Output:
Markdown, CSV and LaTeX tables with mean ± std over evaluation seeds, one row per
(dataset, method, IPC), one column per architecture plus the mean over the architectures the
set was not distilled with ("unseen"); PNG plots of accuracy over distillation steps and of the
matching loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ld3m.config.schema import EvalConfig
from ld3m.jsonl import read_jsonl
from ld3m.paths import RunPaths

ROW_KEYS = ["dataset", "method", "ipc"]
UNSEEN = "unseen mean"


def run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories named by `paths`: a sweep directory expands to its manifest's runs."""
    out = []
    for path in paths:
        manifest = path / "manifest.json"
        if manifest.is_file():
            out += [Path(r["dir"]) for r in json.loads(manifest.read_text())["runs"]]
        else:
            out.append(path)
    return out


def run_eval_config(run: Path) -> EvalConfig:
    """The evaluation settings of the run's config.yaml (defaults where it has none)."""
    from ld3m.config.io import load_config
    from ld3m.evaluate.harness import eval_config

    config = RunPaths(run).config
    return eval_config(load_config(config)) if config.is_file() else EvalConfig()


def load_records(paths: list[Path]) -> pd.DataFrame:
    """Every evaluation record of the runs, with `run`, `distill_arch`, `current` (whether the
    run's evaluation settings still train the record's network so, `trains_as`) and
    `config_labels` added."""
    from ld3m.evaluate.harness import trains_as

    rows = []
    for run in run_dirs(paths):
        ecfg = run_eval_config(run)
        for record in read_jsonl(RunPaths(run).eval_jsonl):
            rows.append({**record, "method": row_method(record), "run": str(run),
                         "distill_arch": ecfg.distill_arch,
                         "current": trains_as(record, ecfg),
                         "config_labels": ecfg.labels})  # fmt: skip
    return pd.DataFrame(rows)


def row_method(record: dict) -> str:
    """The table row's method: soft-label (teacher) evaluations are `<method>+teacher`, apart
    from the hard-label protocol's rows."""
    labels = record.get("labels", "hard")
    return record["method"] if labels == "hard" else f"{record['method']}+{labels}"


def one_protocol(records: pd.DataFrame) -> pd.DataFrame:
    """Per run and table row, the records of one evaluation protocol, never a mean over two:
    in the row of the run config's labels the networks its settings still train so (what its
    sweep evaluates; none yet = not shown), in another row (e.g. an `ld3m eval` with soft
    labels on a hard-label run) the protocol written last."""
    if records.empty or "current" not in records:
        return records
    labels = records["labels"].fillna("hard") if "labels" in records else "hard"
    records = records.assign(own_row=labels == records["config_labels"])
    kept = []
    for _, group in records.groupby(["run", "method"], sort=False):
        if group["own_row"].any():
            kept.append(group[group["current"]])
        else:
            kept.append(group[group["protocol"] == group["protocol"].iloc[-1]])
    return pd.concat(kept).drop(columns="own_row")


def final_records(records: pd.DataFrame) -> pd.DataFrame:
    """Records of each run's newest evaluated set (largest distillation step)."""
    if records.empty:
        return records
    newest = records.groupby("run")["step"].transform("max")
    return records[records["step"] == newest]


def summary_table(records: pd.DataFrame) -> pd.DataFrame:
    """Rows (dataset, method, ipc); per architecture `mean`, `std`, `n` of accuracy in %, and the
    unseen-architecture mean (mean of the per-architecture means, distillation arch excluded;
    see `unseen_means`)."""
    records = one_protocol(records)
    if records.empty:
        return pd.DataFrame()
    df = final_records(records).assign(acc=lambda d: 100 * d["acc"])
    grouped = df.groupby([*ROW_KEYS, "arch"])["acc"]
    stats = pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=0),
                          "count": grouped.count()})  # population std, as the harness  # fmt: skip
    table = stats.unstack("arch")
    distill = df.groupby(ROW_KEYS)["distill_arch"].first()
    table[("mean", UNSEEN)] = unseen_means(table["mean"], distill)
    return table


def unseen_means(means: pd.DataFrame, distill_arch: pd.Series) -> list[float]:
    """Per row, the mean over the architectures it was not distilled with; NaN where the row
    lacks one that another row of its dataset has (a sweep cut short), so that two rows'
    unseen means always average the same architectures."""
    measured = means.notna().groupby(level="dataset").any()  # dataset x arch: any row has it
    out = []
    for idx in means.index:
        archs = measured.columns[measured.loc[idx[0]]]
        unseen = [a for a in archs if a != distill_arch.loc[idx]]
        out.append(means.loc[idx, unseen].mean(skipna=False))  # NaN if one is missing or none
    return out


def archs_in_order(table: pd.DataFrame) -> list[str]:
    preferred = ["ConvNet", "AlexNet", "VGG11", "ResNet18", "ViT"]
    archs = [a for a in table["mean"].columns if a != UNSEEN]
    return sorted(archs, key=lambda a: (preferred.index(a) if a in preferred else 99, a))


def formatted(table: pd.DataFrame, pm: str = " ± ") -> pd.DataFrame:
    """`mean ± std` strings, one column per architecture, then the unseen mean."""
    out = pd.DataFrame(index=table.index)
    for arch in archs_in_order(table):
        mean, std, n = table[("mean", arch)], table[("std", arch)], table[("count", arch)]
        out[arch] = [cell(m, s, c, pm) for m, s, c in zip(mean, std, n, strict=True)]
    unseen = table[("mean", UNSEEN)]
    out[UNSEEN] = [f"{u:.1f}" if pd.notna(u) else "–" for u in unseen]
    return out.reset_index()


def cell(mean: float, std: float, count: float, pm: str) -> str:
    """`mean ± std`, just `mean` for a single network (no spread to show), `–` for none."""
    if pd.isna(mean):
        return "–"
    return f"{mean:.1f}" if count == 1 else f"{mean:.1f}{pm}{std:.1f}"


def write_tables(table: pd.DataFrame, out_dir: Path, stem: str = "results") -> list[Path]:
    """results.md, results.csv (numbers) and results.tex in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv, tex = (out_dir / f"{stem}.{ext}" for ext in ("md", "csv", "tex"))
    md.write_text(formatted(table).to_markdown(index=False, disable_numparse=True) + "\n")
    flat = table.copy()
    flat.columns = [f"{arch}_{stat}" for stat, arch in flat.columns]
    flat.reset_index().to_csv(csv, index=False)
    tex.write_text(formatted(table, pm=" $\\pm$ ").to_latex(index=False, escape=False))
    return [md, csv, tex]


def plot_accuracy_over_steps(records: pd.DataFrame, path: Path) -> Path | None:
    """Mean accuracy of each run's evaluated sets over distillation steps (one line per run and
    architecture that has more than one evaluated step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if records.empty:
        return None
    curves = records.groupby(["run", "arch", "step"])["acc"].mean().reset_index()
    curves = curves[curves.groupby(["run", "arch"])["step"].transform("size") > 1]
    if curves.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for (run, arch), part in curves.groupby(["run", "arch"]):
        ax.plot(part["step"], 100 * part["acc"], marker="o", label=f"{Path(run).name} {arch}")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_losses(paths: list[Path], path: Path, tag: str = "loss/match") -> Path | None:
    """The matching loss of every run over steps (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for run in run_dirs(paths):
        points = [(r["step"], r["value"]) for r in read_jsonl(RunPaths(run).metrics_jsonl)
                  if r.get("tag") == tag]  # fmt: skip
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=run.name)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set_xlabel("distillation step")
    ax.set_ylabel(tag)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(paths: list[Path], out_dir: Path) -> list[Path]:
    """Tables and plots of the runs under `paths` into `out_dir`; the files written."""
    records = load_records(paths)
    written = []
    table = summary_table(records)
    if not table.empty:
        written += write_tables(table, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for made in (plot_accuracy_over_steps(records, out_dir / "accuracy_over_steps.png"),
                 plot_losses(paths, out_dir / "loss.png")):  # fmt: skip
        if made is not None:
            written.append(made)
    return written
