"""`ld3m render-sbatch`: fill the plain sbatch templates of slurm/ from a config.

Placeholders are `{{name}}`. A placeholder whose value is None (an unset partition, account or
QoS, no GPUs) removes its whole line, so the script asks Slurm only for what was set. Slurm
settings come as `slurm.<key>=value` overrides next to the config overrides (keys: SlurmSpec).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ld3m
from ld3m.config.io import build, load_config, parse_override, save_config, set_dotted
from ld3m.config.schema import Config
from ld3m.errors import ConfigError
from ld3m.hpc.jobs import final_set
from ld3m.hpc.sweep import SlurmSpec
from ld3m.paths import RunPaths

TEMPLATES = ("distill", "experts", "eval")
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass(frozen=True)
class RenderRequest:
    template: str
    config: str | None
    overrides: tuple[str, ...]
    launcher: str = "torchrun"
    set_path: str | None = None
    shards: int = 0


def templates_dir() -> Path:
    """slurm/ of the source tree ld3m runs from (installed with `pip install -e`)."""
    return Path(ld3m.__file__).resolve().parents[1] / "slurm"


def split_overrides(overrides: tuple[str, ...]) -> tuple[SlurmSpec, tuple[str, ...]]:
    """(SlurmSpec from `slurm.*` overrides, the remaining config overrides)."""
    tree: dict[str, Any] = {}
    rest = []
    for item in overrides:
        key, value = parse_override(item)
        if key.startswith("slurm."):
            set_dotted(tree, key.removeprefix("slurm."), value, source=f"override '{item}'")
        else:
            rest.append(item)
    return build(SlurmSpec, tree, prefix="slurm.", source="overrides"), tuple(rest)


def hhmmss(minutes: int) -> str:
    return f"{minutes // 60}:{minutes % 60:02d}:00"


def common_values(cfg: Config, slurm: SlurmSpec, template: str, config: Path) -> dict[str, Any]:
    """Values every template uses."""
    bindir = Path(sys.executable).parent
    run_dir = Path(cfg.run.out_dir).absolute()  # the job may start in another directory
    time_min = {"eval": slurm.eval_time_min, "experts": slurm.experts_time_min}.get(template, 0)
    return {
        "job_name": f"ld3m-{template}-{run_dir.name}",
        "partition": slurm.partition or None,
        "account": slurm.account or None,
        "qos": slurm.qos or None,
        "mem_gb": slurm.mem_gb,
        "time": hhmmss(time_min or slurm.time_min),
        "signal_delay_s": slurm.signal_delay_s,
        "log_dir": str(run_dir / "logs"),
        "run_dir": str(run_dir),
        "config": str(config),
        "python": sys.executable,
        "accelerate": str(bindir / "accelerate"),
        "ld3m": str(bindir / "ld3m"),
        "cpus_per_task": slurm.cpus_per_task,
        "array_parallelism": slurm.array_parallelism,
        "gpus_one": 1 if slurm.gpus_per_node else None,
    }


def template_values(req: RenderRequest, cfg: Config, slurm: SlurmSpec) -> dict[str, Any]:
    """All placeholder values of `req.template`."""
    config = RunPaths(Path(cfg.run.out_dir).absolute()).config
    values = common_values(cfg, slurm, req.template, config)
    if req.template == "distill":
        if req.launcher not in ("torchrun", "accelerate"):
            raise ConfigError(f"--launcher {req.launcher}: use torchrun or accelerate")
        values.update(
            nodes=slurm.nodes, tasks_per_node=slurm.tasks_per_node, launcher=req.launcher,
            cpus_per_node=slurm.cpus_per_task * slurm.tasks_per_node,
            gpus_per_node=slurm.gpus_per_node or None,
        )  # fmt: skip
    elif req.template == "experts":
        if not cfg.experts.dir:
            raise ConfigError("render-sbatch experts needs experts.dir=<buffer directory>")
        shards = req.shards or min(cfg.experts.num, slurm.array_parallelism)
        experts_dir = str(Path(cfg.experts.dir).absolute())
        values.update(shards=shards, last_shard=shards - 1, experts_dir=experts_dir)
    else:
        set_path = str(Path(req.set_path or final_set(cfg, "distill")).absolute())
        seeds = list(range(cfg.eval.seed, cfg.eval.seed + cfg.eval.runs))
        values.update(
            set=set_path, eval_jsonl=str(RunPaths(Path(cfg.run.out_dir).absolute()).eval_jsonl),
            archs=" ".join(cfg.eval.archs), seeds=" ".join(map(str, seeds)),
            last_task=len(cfg.eval.archs) * len(seeds) - 1,
        )  # fmt: skip
    return values


def fill(text: str, values: dict[str, Any]) -> str:
    """Replace placeholders; drop lines with a None value; unknown placeholders are an error."""
    lines = []
    for line in text.splitlines():
        names = PLACEHOLDER.findall(line)
        missing = [n for n in names if n not in values]
        if missing:
            raise ConfigError(f"template placeholder(s) {missing} have no value")
        if any(values[n] is None for n in names):
            continue
        lines.append(PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), line))
    return "\n".join(lines) + "\n"


def render_sbatch(req: RenderRequest) -> str:
    """The filled script; the merged config is written to the run directory it names."""
    if req.template not in TEMPLATES:
        raise ConfigError(f"unknown template {req.template!r}: use one of {', '.join(TEMPLATES)}")
    path = templates_dir() / f"{req.template}.sbatch"
    if not path.is_file():
        raise ConfigError(f"{path} is missing; install ld3m from its source tree (pip install -e)")
    slurm, overrides = split_overrides(req.overrides)
    cfg = load_config(req.config, overrides)
    values = template_values(req, cfg, slurm)
    text = fill(path.read_text(), values)
    Path(values["log_dir"]).mkdir(parents=True, exist_ok=True)  # sbatch does not create it
    save_config(cfg, RunPaths(Path(cfg.run.out_dir)).config)
    return text
