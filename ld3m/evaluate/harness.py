"""`ld3m eval`: architectures x run seeds for one synthetic-set file, recorded in eval.jsonl.

Each finished network appends one record; a rerun (e.g. after preemption) skips the
(set, architecture, seed) combinations already recorded under the same training settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ld3m.artifacts import SyntheticSet, load_set
from ld3m.config.io import to_dict
from ld3m.config.schema import Config, DataConfig, EvalConfig
from ld3m.data.datasets import RealDataset, load_dataset
from ld3m.errors import DataError
from ld3m.evaluate.train_eval import Labels, TrainData, at_ipc, resolve_lr, train_and_test
from ld3m.jsonl import append_jsonl, read_jsonl
from ld3m.models.teacher import load_teacher
from ld3m.utils.progress import ProgressMode

log = logging.getLogger(__name__)

PROTOCOL_FIELDS = (
    "epochs",
    "batch_train",
    "lr",
    "arch_lr",
    "learned_lr",
    "schedule",
    "momentum",
    "weight_decay",
    "ema_decay",
    "dsa",
    "dsa_strategy",
    "labels",
    "teacher",
    "temperature",
    "projector",
    "ce_weight",
)
"""EvalConfig fields that change a result; together they form the protocol key."""
LABEL_FIELDS = {"teacher": ("teacher", "temperature"), "projector": ("projector", "ce_weight")}
"""Protocol fields that only matter with eval.labels=teacher / projector."""


@dataclass(frozen=True)
class ArchSummary:
    """Mean and (population) standard deviation of final test accuracy over runs."""

    arch: str
    mean: float
    std: float
    runs: int


def file_digest(path: Path) -> str:
    """Short content hash identifying a synthetic-set file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def label_source(cfg: EvalConfig, data: RealDataset) -> Labels:
    """The training loss of the protocol: hard labels, the BN teacher's or the projector's."""
    if cfg.labels == "teacher":
        return Labels(teacher=load_teacher(cfg.teacher, data), temperature=cfg.temperature)
    if cfg.labels == "projector":
        from ld3m.evaluate.hello import load_projector

        return Labels(projector=load_projector(cfg.projector, data.info), ce_weight=cfg.ce_weight)
    return Labels()


def eval_config(cfg: Config) -> EvalConfig:
    """The run's evaluation settings, the soft-label teacher resolved (eval.teacher, else
    experts.dir)."""
    if cfg.eval.labels == "teacher" and not cfg.eval.teacher:
        return dataclasses.replace(cfg.eval, teacher=cfg.experts.dir)
    return cfg.eval


def protocol_key(cfg: EvalConfig) -> str:
    """Short hash of the result-changing evaluation settings of a protocol resolved for one
    IPC (`at_ipc`)."""
    if cfg.ipc_arch_lr:
        raise ValueError("protocol_key needs the protocol of one IPC: pass at_ipc(cfg, ipc)")
    fields = {k: v for k, v in to_dict(cfg).items() if k in PROTOCOL_FIELDS}
    if not fields["arch_lr"]:
        del fields["arch_lr"]  # keys of records written before arch_lr existed stay valid
    return _digest(_used(fields))


def network_key(fields: Mapping[str, Any]) -> str:
    """Short hash of how one network is trained: the protocol fields of a record (or of a
    protocol with `lr` resolved for the network's architecture), `arch_lr` left out, so only
    the rate this network trains at counts."""
    used = {k: fields.get(k) for k in PROTOCOL_FIELDS if k != "arch_lr"}
    if used["learned_lr"]:
        used["lr"] = "learned"  # the set's own rate: the same for every record of a set
    return _digest(_used(used))


def trains_as(record: Mapping[str, Any], cfg: EvalConfig) -> bool:
    """Whether the network of `record` was trained as `cfg` trains it now (at the record's IPC):
    a rate changed for one architecture or IPC makes only those networks stale, not the other
    architectures' of the same protocol."""
    cfg = at_ipc(cfg, record["ipc"])
    if record.get("protocol") == protocol_key(cfg):
        return True
    if "arch" not in record or "lr" not in record:
        return False
    lr = resolve_lr(cfg, record["arch"], None)
    return network_key(record) == network_key({**to_dict(cfg), "lr": lr})


def _used(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` without the label settings its label source does not read."""
    labels = fields.get("labels") or "hard"
    unused = [k for source, keys in LABEL_FIELDS.items() if source != labels for k in keys]
    if labels == "hard":  # keys of records written before soft labels existed stay valid
        unused.append("labels")
    return {k: v for k, v in fields.items() if k not in unused}


def _digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def check_compatible(synset: SyntheticSet, data: RealDataset, set_path: Path) -> None:
    """The set must have been made from this dataset's classes, channels and resolution."""
    meta, info = synset.meta, data.info
    if (meta.num_classes, meta.channels, meta.res) != (info.num_classes, info.channels, info.res):
        raise DataError(
            f"synthetic set {set_path} ({meta.dataset}: {meta.num_classes} classes, "
            f"{meta.channels}x{meta.res}px) does not match dataset {info.name} "
            f"({info.num_classes} classes, {info.channels}x{info.res}px); "
            "pass data.name/data.root/data.res of its dataset"
        )


def load_for_set(synset: SyntheticSet, data_cfg: DataConfig) -> RealDataset:
    """Load the real dataset a set belongs to, at the set's resolution unless one is configured."""
    if data_cfg.name != synset.meta.dataset:
        raise DataError(
            f"synthetic set was made from '{synset.meta.dataset}' but data.name is "
            f"'{data_cfg.name}'; pass data.name={synset.meta.dataset} (and its data.root)"
        )
    res = data_cfg.res or synset.meta.res
    return load_dataset(dataclasses.replace(data_cfg, res=res))


def evaluate_set(
    set_path: Path,
    data_cfg: DataConfig,
    cfg: EvalConfig,
    out_jsonl: Path,
    progress_mode: ProgressMode = "auto",
) -> list[dict[str, Any]]:
    """Train `cfg.runs` fresh networks of every `cfg.archs` on the set; return all its records."""
    synset = load_set(set_path)
    cfg = at_ipc(cfg, synset.meta.ipc)
    data = load_for_set(synset, data_cfg)
    check_compatible(synset, data, set_path)
    test_images, test_labels = data.test_tensors()
    labels: Labels | None = None  # loaded on the first network to train, not for a rerun
    tensors = TrainData(
        synset.images, synset.labels, test_images, test_labels, data.info.num_classes
    )
    base = {
        "set": str(set_path),
        "set_digest": file_digest(set_path),
        "method": synset.meta.method,
        "dataset": synset.meta.dataset,
        "ipc": synset.meta.ipc,
        "step": synset.meta.step,
        "protocol": protocol_key(cfg),
        **{k: v for k, v in to_dict(cfg).items() if k in PROTOCOL_FIELDS},
    }
    done = {
        (r["arch"], r["seed"]): r
        for r in read_jsonl(out_jsonl)
        if r.get("set_digest") == base["set_digest"] and trains_as(r, cfg)
    }
    records = []
    for arch in cfg.archs:
        for seed in range(cfg.seed, cfg.seed + cfg.runs):
            if (arch, seed) in done:
                records.append(done[(arch, seed)])
                continue
            lr = resolve_lr(cfg, arch, synset.lr)
            if labels is None:
                labels = label_source(cfg, data)
            result = train_and_test(arch, tensors, cfg, lr, seed, progress_mode, labels)
            record = {
                **base,
                "arch": arch,
                "seed": seed,
                "lr": lr,
                "acc": result.acc,
                "train_acc": result.train_acc,
                "wall_s": round(result.wall_s, 2),
            }
            append_jsonl(out_jsonl, record)
            log.info(
                "%s seed %d: test acc %.2f%% (%.0f s)", arch, seed, 100 * result.acc, result.wall_s
            )
            records.append(record)
    return records


def summarize(records: list[dict[str, Any]]) -> list[ArchSummary]:
    """Mean +- population std of final accuracy per architecture, in first-seen order."""
    by_arch: dict[str, list[float]] = {}
    for r in records:
        by_arch.setdefault(r["arch"], []).append(r["acc"])
    return [
        ArchSummary(arch, statistics.fmean(accs), statistics.pstdev(accs), len(accs))
        for arch, accs in by_arch.items()
    ]


def unseen_mean(summaries: list[ArchSummary], distill_arch: str) -> float | None:
    """Mean over architectures other than the distillation one (LD3M's 'Avg_Cross')."""
    unseen = [s.mean for s in summaries if s.arch != distill_arch]
    return statistics.fmean(unseen) if unseen else None


def format_summary(summaries: list[ArchSummary], distill_arch: str) -> str:
    """Human-readable table: arch, mean +- std (percent), runs; then the unseen mean."""
    lines = [f"{'arch':<12} {'acc (%)':>16} {'runs':>5}"]
    for s in summaries:
        lines.append(f"{s.arch:<12} {100 * s.mean:>8.2f} ± {100 * s.std:<5.2f} {s.runs:>5}")
    cross = unseen_mean(summaries, distill_arch)
    if cross is not None:
        lines.append(f"{'unseen mean':<12} {100 * cross:>8.2f}")
    return "\n".join(lines)
