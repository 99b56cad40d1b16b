"""`ld3m status SWEEP_DIR`: one line per run, read from the run directories (and squeue).

state: `queued`/`running` while Slurm lists the run's job, otherwise from the files: `done`
(final set written), `partial` (checkpoints but no final set: preempted, failed or stopped),
`new` (nothing yet).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ld3m.checkpoint import CheckpointManager
from ld3m.config.io import load_config
from ld3m.evaluate.harness import eval_config, trains_as
from ld3m.hpc.jobs import final_set
from ld3m.hpc.sweep import read_manifest
from ld3m.jsonl import read_jsonl
from ld3m.paths import RunPaths

TAIL_BYTES = 1 << 16


@dataclass
class RunStatus:
    name: str
    kind: str
    state: str
    step: int | None
    iterations: int | None
    loss: float | None
    eval_acc: float | None
    eval_n: int


def last_scalar(path: Path, tag: str) -> tuple[int, float] | None:
    """(step, value) of the newest `tag` record in a metrics.jsonl, reading only its tail."""
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        fh.seek(max(0, fh.seek(0, 2) - TAIL_BYTES))
        lines = fh.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("tag") == tag:
            return int(record["step"]), float(record["value"])
    return None


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm state of each listed job still in the queue ({} without Slurm)."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        job, _, state = line.strip().partition(" ")
        states[job] = {"PENDING": "queued", "RUNNING": "running"}.get(state, state.lower())
    return states


def run_status(run: dict[str, Any], job_state: str | None) -> RunStatus:
    """The status of one run of a manifest."""
    paths = RunPaths(Path(run["dir"]))
    cfg = load_config(paths.config)
    kind = run.get("kind", "distill")
    done = final_set(cfg, kind).is_file()
    loss = last_scalar(paths.metrics_jsonl, "loss/match")
    steps = [s for s, _ in CheckpointManager(paths.ckpt).complete(warn=False)]
    step = loss[0] if loss else (steps[-1] if steps else None)
    if job_state:
        state = job_state
    elif done:
        state = "done"
    else:
        state = "partial" if steps or loss else "new"
    ecfg = eval_config(cfg)
    accs = [r["acc"] for r in read_jsonl(paths.eval_jsonl)  # the current protocol's networks
            if r.get("arch") == ecfg.distill_arch
            and trains_as(r, ecfg)]  # fmt: skip
    iterations = cfg.distill.iterations if kind == "distill" else None
    return RunStatus(
        run["name"], kind, state, step, iterations, loss[1] if loss else None,
        sum(accs) / len(accs) if accs else None, len(accs),
    )  # fmt: skip


def sweep_status(root: Path) -> list[RunStatus]:
    """Status of every run of the sweep directory `root`."""
    manifest = read_manifest(root)
    by_task = {tuple(task): job for task, job in manifest.get("tasks", {}).get("distill", [])}
    states = queue_states(sorted({job for job in by_task.values()}))
    out = []
    for run in manifest["runs"]:
        cfg_path = str(Path(run["dir"]) / "config.yaml")
        job = by_task.get(("distill", cfg_path))
        out.append(run_status(run, states.get(job) if job else None))
    return out


def format_status(rows: list[RunStatus]) -> str:
    """Aligned text: one line per run."""
    lines = [f"{'run':<48} {'state':<8} {'step':>11} {'loss':>10} {'eval acc':>12}"]
    for r in rows:
        step = "-" if r.step is None else f"{r.step}" + (f"/{r.iterations}" if r.iterations else "")
        loss = "-" if r.loss is None else f"{r.loss:.4g}"
        acc = "-" if r.eval_acc is None else f"{100 * r.eval_acc:.1f}% (n={r.eval_n})"
        lines.append(f"{r.name[:48]:<48} {r.state:<8} {step:>11} {loss:>10} {acc:>12}")
    return "\n".join(lines)
