"""Sweep files: a base config, a grid of dotted overrides, evaluation and Slurm settings.

    name: cifar10_ld3m                 # the sweep directory is <out_dir>/<name>
    base: cpu_cifar10                  # preset name or YAML path (relative to the sweep file)
    overrides: [distill.iterations=200]
    grid:                              # cartesian product of dotted overrides
      distill.objective: [dm, mtt]
      distill.ipc: [1, 10]
    # or a list of such grids, whose runs are joined (e.g. a main grid plus an ablation):
    # grid: [{distill.objective: [dm, mtt]}, {generator.skip: [autoencoder]}]
    eval:
      archs: [ConvNet, ResNet18]
      seeds: [0, 1]
      more:                            # extra architectures for some methods/IPCs only
        - {methods: [random_real, pixel_dm, ld3m_dm], ipcs: [10], archs: [ViT]}
    train_prior: true                  # train the base config's prior once, before everything
    slurm: {partition: gpu, time_min: 240, gpus_per_node: 1, tasks_per_node: 1}

Expansion is pure: the same file always gives the same runs, each in
`<sweep dir>/runs/<readable name>-<config hash>` (never a timestamp), so resubmitting a sweep
finds its runs, checkpoints and results again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ld3m.config.io import (
    build,
    load_config,
    nondefault,
    presets_dir,
    read_yaml,
    resolve_config,
    save_config,
    to_dict,
)
from ld3m.config.schema import Config
from ld3m.errors import ConfigError
from ld3m.methods import method_name, needs_experts, needs_projector
from ld3m.paths import RunPaths

MANIFEST = "manifest.json"
STAGES = ("prior", "experts", "hello", "distill", "eval")


@dataclass(frozen=True)
class SlurmSpec:
    """Slurm parameters of every job of the sweep (per stage where it differs)."""

    partition: str = ""
    """Partition (empty: the cluster's default)."""
    time_min: int = 60
    """Time limit per job in minutes; a job that reaches it is requeued and resumes."""
    nodes: int = 1
    """Nodes per distillation job (data parallelism across nodes)."""
    tasks_per_node: int = 1
    """Processes per node for distillation (one per GPU)."""
    gpus_per_node: int = 0
    """GPUs per node (0 on CPU clusters)."""
    cpus_per_task: int = 2
    """CPU cores per process."""
    mem_gb: int = 16
    """Memory per node in GB."""
    array_parallelism: int = 32
    """How many tasks of one array run at once."""
    account: str = ""
    """Slurm account (empty: none)."""
    qos: str = ""
    """Quality of service (empty: none)."""
    max_requeue: int = 20
    """Requeues allowed per job after timeout or preemption (submitit's max_num_timeout)."""
    signal_delay_s: int = 120
    """The job is signalled this long before its time limit to checkpoint and requeue."""
    eval_time_min: int = 0
    """Time limit of evaluation tasks (0: time_min)."""
    experts_time_min: int = 0
    """Time limit of expert tasks (0: time_min)."""


@dataclass(frozen=True)
class EvalMore:
    """Architectures evaluated only on the sets of some methods and IPCs (e.g. the costly
    unseen architectures on the rows a study's targets compare)."""

    methods: tuple[str, ...] = ()
    """Method labels as in the tables (`ld3m_dm`, `pixel_dm`, `random_real`; empty: all)."""
    ipcs: tuple[int, ...] = ()
    """IPCs (empty: all)."""
    archs: tuple[str, ...] = ()
    """Architectures added for the matching runs."""

    def matches(self, method: str, ipc: int) -> bool:
        return (not self.methods or method in self.methods) and (not self.ipcs or ipc in self.ipcs)


@dataclass(frozen=True)
class SweepEval:
    """The cross-architecture evaluation array: final set x architecture x seed."""

    archs: tuple[str, ...] = ()
    """Architectures (empty: the run config's eval.archs)."""
    seeds: tuple[int, ...] = ()
    """Evaluation seeds (empty: eval.seed .. eval.seed + eval.runs - 1 of the run config)."""
    more: tuple[EvalMore, ...] = ()
    """Further architectures for the runs of some methods and IPCs only."""


@dataclass(frozen=True)
class SweepSpec:
    """A whole study: runs from a grid, their experts, distillation and evaluation."""

    name: str = ""
    """Sweep name: the directory under out_dir."""
    base: str = ""
    """Base config: a preset name or a YAML file (relative to the sweep file)."""
    out_dir: str = "sweeps_out"
    """Where sweep directories go (relative to the working directory)."""
    overrides: tuple[str, ...] = ()
    """Dotted overrides applied to every run."""
    grid: dict[str, Any] | tuple[dict[str, Any], ...] = field(default_factory=dict)
    """Dotted key -> list of values; every combination is one run. A list of such mappings
    joins their runs (duplicates are an error)."""
    baselines: tuple[int, ...] = ()
    """IPCs for which a random-real baseline set is made and evaluated alongside."""
    train_prior: bool = False
    """Train the base config's prior (its data and prior_train settings) once, into
    `<sweep dir>/priors/<data>-<hash>/`, for every latent-space run whose prior.path is empty.
    A finished prior is reused by later submissions of the sweep."""
    stages: tuple[str, ...] = STAGES
    """Stages to run (prior only with train_prior, experts only when some run uses MTT)."""
    eval: SweepEval = field(default_factory=SweepEval)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)


@dataclass(frozen=True)
class RunSpec:
    """One run of the sweep: its name, directory, overrides and merged config."""

    name: str
    dir: Path
    overrides: tuple[str, ...]
    cfg: Config
    kind: str = "distill"  # or "baseline"
    trains_prior: bool = False
    """The sweep trains the prior that cfg.prior.path names (train_prior)."""
    trains_projector: bool = False
    """The sweep trains the HeLlO projector that cfg.eval.projector names (on the weak
    teachers of cfg.experts.dir)."""
    reads_experts: bool = False
    """The run reads cfg.experts.dir (its objective, teacher or projector): the experts stage
    trains that buffer."""

    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"


def load_sweep(path: str | Path) -> tuple[SweepSpec, Path]:
    """(spec, directory of the sweep file) from a YAML sweep file (or the name of a sweep shipped
    in ld3m/presets/sweeps/, e.g. `quickstart`), keys and types checked."""
    path = resolve_sweep(path)
    tree = read_yaml(path)
    spec = build(SweepSpec, tree, prefix="", source=f"sweep file {path}")
    if not spec.name:
        raise ConfigError(f"sweep file {path} needs a name: (the sweep directory's name)")
    for grid in grids(spec):
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep file {path}: grid.{key} must be a non-empty list of "
                                  "values")  # fmt: skip
    bad = set(spec.stages) - set(STAGES)
    if bad:
        raise ConfigError(f"sweep file {path}: unknown stages {sorted(bad)}; use "
                          f"{', '.join(STAGES)}")  # fmt: skip
    return spec, path.parent


def resolve_sweep(name: str | Path) -> Path:
    """An existing sweep file, else the packaged sweep of that name."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = presets_dir() / "sweeps" / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    shipped = sorted(p.stem for p in (presets_dir() / "sweeps").glob("*.yaml"))
    raise ConfigError(f"sweep file {name} not found; pass a YAML path or one of the shipped "
                      f"sweeps: {', '.join(shipped)}")  # fmt: skip


def sweep_dir(spec: SweepSpec) -> Path:
    return Path(spec.out_dir) / spec.name


def config_hash(cfg: Config) -> str:
    """8 hex digits of the config's non-default settings, without where it is written, how it
    reports or how its set is evaluated (a setting added to ld3m later, at its default, keeps
    every hash). A changed evaluation protocol thus reuses the distilled sets: eval.jsonl
    records how each network was trained, so the sweep's rerun trains only the networks the
    new protocol trains differently."""
    tree = {k: v for k, v in nondefault(cfg).items()
            if k not in ("run.out_dir", "run.progress") and not k.startswith("eval.")}  # fmt: skip
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:8]


def readable(overrides: tuple[str, ...]) -> str:
    """`distill.objective=dm, distill.ipc=10` -> `objective-dm_ipc-10` (file-name safe)."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        parts.append(f"{key.rsplit('.', 1)[-1]}-{value}")
    text = "_".join(parts) or "base"
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text)[:80]


def grids(spec: SweepSpec) -> tuple[dict[str, Any], ...]:
    """The sweep's grids (one, or the joined list)."""
    return (spec.grid,) if isinstance(spec.grid, dict) else spec.grid


def grid_points(grid: dict[str, Any]) -> list[tuple[str, ...]]:
    """Every combination of the grid as a tuple of `key=value` overrides (file order)."""
    keys = list(grid)
    combos = itertools.product(*(grid[k] for k in keys))
    return [tuple(f"{k}={yaml_value(v)}" for k, v in zip(keys, combo, strict=True))
            for combo in combos]  # fmt: skip


def yaml_value(value: Any) -> str:
    """A grid value as override text (lists and nulls as YAML flow)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def expand(spec: SweepSpec, spec_dir: Path) -> list[RunSpec]:
    """The sweep's runs: one per grid point, plus one random-real baseline per `baselines` IPC."""
    base = str(resolve_config(spec.base, spec_dir)) if spec.base else None
    runs = []
    points = [point for grid in grids(spec) for point in grid_points(grid)]
    for point in points or [()]:
        overrides = (*spec.overrides, *point)
        cfg = load_config(base, overrides)
        name = f"{readable(point)}-{config_hash(cfg)}"
        runs.append(finish_run(spec, name, overrides, cfg, "distill"))
    for ipc in spec.baselines:
        overrides = (*spec.overrides, f"baseline.ipc={ipc}")
        cfg = load_config(base, overrides)
        name = f"random-real_ipc-{ipc}-{config_hash(cfg)}"
        runs.append(finish_run(spec, name, overrides, cfg, "baseline"))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep {spec.name}: two grid points give the same config; "
                          "remove the duplicate values")  # fmt: skip
    return runs


def finish_run(spec: SweepSpec, name: str, overrides: tuple[str, ...], cfg: Config,
               kind: str) -> RunSpec:  # fmt: skip
    """The run with its directory and its shared inputs: for MTT, SRe2L and soft-label
    evaluation the expert buffer of its expert config, for HeLlO labels the projector of its
    hello config, for latent runs of a train_prior sweep the prior of its prior config."""
    root = sweep_dir(spec)
    run_dir = root / "runs" / name
    cfg = replace(cfg, run=replace(cfg.run, out_dir=str(run_dir)))
    reads_experts = needs_experts(cfg, kind)  # before the sweep fills in paths
    if reads_experts and not cfg.experts.dir:
        buffer = root / "experts" / experts_key(cfg)
        cfg = replace(cfg, experts=replace(cfg.experts, dir=str(buffer)))
    trains_projector = needs_projector(cfg)
    if trains_projector:
        projector = root / "projectors" / projector_key(cfg)
        cfg = replace(cfg, eval=replace(cfg.eval, projector=str(projector)))
    trains_prior = (spec.train_prior and kind == "distill" and cfg.distill.space == "latent"
                    and not cfg.prior.path)  # fmt: skip
    if trains_prior:
        prior = RunPaths(root / "priors" / prior_key(cfg)).prior
        cfg = replace(cfg, prior=replace(cfg.prior, path=str(prior)))
    return RunSpec(name, run_dir, overrides, cfg, kind, trains_prior, trains_projector,
                   reads_experts)  # fmt: skip


def experts_key(cfg: Config) -> str:
    """Name of the expert buffer that a config needs (data + expert settings)."""
    return f"{cfg.data.name}-{cfg.experts.arch}-{digest(cfg, 'data', 'experts')}"


def projector_key(cfg: Config) -> str:
    """Name of the HeLlO projector a config's evaluation needs (data, hello, weak teachers)."""
    return f"{cfg.data.name}-{digest(cfg, 'data', 'hello', 'experts')}"


def prior_key(cfg: Config) -> str:
    """Name of the prior that a config trains (data + prior_train settings)."""
    return f"{cfg.data.name}-{digest(cfg, 'data', 'prior_train')}"


def digest(cfg: Config, *sections: str) -> str:
    """8 hex digits of the non-default settings of some sections of a config."""
    tree = {name: nondefault(getattr(cfg, name)) for name in sections}
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:8]


def write_configs(runs: list[RunSpec]) -> None:
    """Each run's merged config.yaml: the only thing a job needs."""
    for run in runs:
        save_config(run.cfg, run.config_path)


def eval_tasks(spec: SweepSpec, run: RunSpec) -> list[tuple[str, int]]:
    """(architecture, seed) pairs of a run's evaluation."""
    e = run.cfg.eval
    archs = list(spec.eval.archs or e.archs)
    method, ipc = run_method(run)
    for more in spec.eval.more:
        if more.matches(method, ipc):
            archs += [a for a in more.archs if a not in archs]
    seeds = spec.eval.seeds or tuple(range(e.seed, e.seed + e.runs))
    return [(a, s) for a in archs for s in seeds]


def run_method(run: RunSpec) -> tuple[str, int]:
    """(method label, IPC) of a run's evaluated set, as its table row names them."""
    if run.kind == "baseline":
        return "random_real", run.cfg.baseline.ipc
    return method_name(run.cfg), run.cfg.distill.ipc


def write_manifest(root: Path, spec: SweepSpec, runs: list[RunSpec], jobs: dict[str, Any]) -> Path:
    """manifest.json: the sweep spec, every run (name, dir, overrides, kind) and, per stage,
    each task's arguments with its job id."""
    root.mkdir(parents=True, exist_ok=True)
    data = {
        "name": spec.name,
        "spec": to_dict(spec),
        "runs": [run_record(r) for r in runs],
        "tasks": jobs,
    }
    path = root / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def run_record(run: RunSpec) -> dict[str, Any]:
    return {"name": run.name, "dir": str(run.dir), "kind": run.kind,
            "overrides": list(run.overrides)}  # fmt: skip


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a sweep directory, with a clear error when there is none."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{root} has no {MANIFEST}; pass a sweep directory made by `ld3m sweep`")
    return json.loads(path.read_text())
