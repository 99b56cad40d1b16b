"""On-disk expert buffer: one safetensors shard per array task, plus a rebuilt index.

A shard `shard_{i:05d}_of_{n:05d}.safetensors` holds one float32 tensor `expert_{k:05d}`
[snapshots, P] per expert k (flat parameters in `named_parameters` order) and JSON metadata
(architecture, dataset, parameter layout, seeds, test accuracies). It is written under a hidden
temporary name and `os.replace`d, so a shard file that exists is complete. `index.json` is a
convenience listing for people and tools; it is rebuilt from the directory listing under an
exclusive lock after every write, so concurrent writers always leave it consistent. Readers
trust the directory listing, never the index.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ld3m.data.datasets import DatasetInfo
from ld3m.errors import DataError
from ld3m.models.functional import param_shapes

log = logging.getLogger(__name__)

FORMAT = 1
SHARD_RE = re.compile(r"^shard_(\d{5})_of_(\d{5})\.safetensors$")
INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
RUN_HINT = "run `ld3m experts` (on a Slurm array: `ld3m experts --shard i/n`, one task per shard)"


@dataclass(frozen=True)
class Trajectory:
    """One expert: flat parameter snapshots after init and after every epoch."""

    snapshots: torch.Tensor
    """float32 [epochs + 1, P]: row 0 is the initialisation, row e the weights after epoch e."""
    test_acc: list[float]
    """Test accuracy after each epoch (len = rows - 1)."""
    arch: str
    seed: int
    expert: int = -1
    """Expert id k (trained with seed `experts.seed + k`); -1 before it is stored."""


@dataclass(frozen=True)
class ExpertSpec:
    """What every shard of one buffer must share: architecture, data and parameter layout."""

    arch: str
    dataset: str
    res: int
    channels: int
    num_classes: int
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_network(cls, arch: str, net: nn.Module, info: DatasetInfo) -> ExpertSpec:
        """The spec of experts of `arch` (built as `net`) on the dataset described by `info`."""
        names, shapes = zip(*param_shapes(net), strict=True)
        return cls(
            arch, info.name, info.res, info.channels, info.num_classes,
            tuple(names), tuple(tuple(s) for s in shapes),
        )  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpertSpec:
        """Rebuild from `asdict` output after a JSON round trip."""
        d = dict(d)
        d["param_names"] = tuple(d["param_names"])
        d["param_shapes"] = tuple(tuple(s) for s in d["param_shapes"])
        return cls(**d)

    @property
    def num_params(self) -> int:
        """P, the length of one flat snapshot."""
        return sum(int(torch.Size(s).numel()) for s in self.param_shapes)

    def differences(self, other: ExpertSpec) -> list[str]:
        """Names of the fields that differ from `other` ([] when compatible)."""
        return [k for k, v in asdict(self).items() if asdict(other)[k] != v]


@dataclass(frozen=True)
class ShardMeta:
    """The header of one complete shard (read without loading its tensors)."""

    path: Path
    shard: int
    of: int
    spec: ExpertSpec
    experts: tuple[int, ...]
    seeds: tuple[int, ...]
    test_acc: tuple[tuple[float, ...], ...]
    snapshots: int
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoreInfo:
    """A validated summary of every complete shard of a buffer."""

    root: Path
    spec: ExpertSpec
    shards: tuple[ShardMeta, ...]
    num_experts: int
    min_snapshots: int
    """Fewest snapshots of any expert (MTT needs max_start_epoch + expert_epochs + 1)."""

    def require(self, net: nn.Module, info: DatasetInfo, min_snapshots: int) -> None:
        """Raise DataError unless these experts fit `net` on `info` with enough snapshots."""
        for key, want in (
            ("dataset", info.name), ("res", info.res),
            ("channels", info.channels), ("num_classes", info.num_classes),
        ):  # fmt: skip
            have = getattr(self.spec, key)
            if have != want:
                raise DataError(
                    f"experts in {self.root} were trained with {key}={have} but this run uses "
                    f"{want}; point experts.dir at a matching buffer or retrain with `ld3m experts`"
                )
        shapes = [(n, tuple(s)) for n, s in param_shapes(net)]
        if shapes != list(zip(self.spec.param_names, self.spec.param_shapes, strict=True)):
            raise DataError(
                f"experts in {self.root} are {self.spec.arch} with {self.spec.num_params} "
                f"parameters, which does not match the network matched on; set the same arch "
                "as experts.arch or retrain with `ld3m experts`"
            )
        if self.min_snapshots < min_snapshots:
            raise DataError(
                f"experts in {self.root} keep {self.min_snapshots - 1} epochs but MTT needs "
                f"{min_snapshots - 1} (max_start_epoch + expert_epochs); lower those or retrain "
                "with more experts.epochs / experts.keep_epochs"
            )


def shard_name(i: int, n: int) -> str:
    """File name of shard i of n."""
    return f"shard_{i:05d}_of_{n:05d}.safetensors"


def tensor_name(expert: int) -> str:
    """Tensor name of expert k inside its shard."""
    return f"expert_{expert:05d}"


class ExpertStore:
    """A directory of expert shards (see the module docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        """Use `root` (created on the first write)."""
        self.root = Path(root).expanduser()

    @property
    def index_path(self) -> Path:
        """The rebuilt listing of complete shards."""
        return self.root / INDEX_NAME

    def shard_path(self, i: int, n: int) -> Path:
        """Where shard i of n lives."""
        return self.root / shard_name(i, n)

    def complete_shards(self) -> list[Path]:
        """Complete shard files, sorted by name (temporary files never match)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if SHARD_RE.match(p.name) and p.is_file())

    def is_complete(self, i: int, n: int) -> bool:
        """Whether shard i of n has been written completely."""
        return self.shard_path(i, n).is_file()

    def shard_meta(self, path: Path) -> ShardMeta:
        """Read the header of a shard file (no tensors are loaded)."""
        fix = f"delete it and rerun its task ({RUN_HINT})"
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["ld3m"])
            if meta["format"] != FORMAT:
                raise ValueError(f"format {meta['format']}, this ld3m reads {FORMAT}")
            return ShardMeta(
                path=path, shard=int(meta["shard"][0]), of=int(meta["shard"][1]),
                spec=ExpertSpec.from_dict(meta["spec"]), experts=tuple(meta["experts"]),
                seeds=tuple(meta["seeds"]), test_acc=tuple(tuple(a) for a in meta["test_acc"]),
                snapshots=int(meta["snapshots"]), config=meta.get("config", {}),
            )  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"unreadable expert shard {path} ({exc}); {fix}") from None

    def read_shard(self, path: Path) -> list[Trajectory]:
        """Load every expert of one shard file."""
        meta = self.shard_meta(path)
        tensors = load_file(str(path))
        return [
            Trajectory(tensors[tensor_name(k)], list(acc), meta.spec.arch, seed, k)
            for k, seed, acc in zip(meta.experts, meta.seeds, meta.test_acc, strict=True)
        ]

    def describe(self) -> StoreInfo:
        """Validate every complete shard against the others and summarise the buffer."""
        paths = self.complete_shards()
        if not paths:
            raise DataError(f"no complete expert shard in experts.dir={self.root}; {RUN_HINT}")
        metas = [self.shard_meta(p) for p in paths]
        first, owner = metas[0], {}
        for meta in metas:
            _check_spec(first, meta.path, meta.spec)
            for k in meta.experts:
                if k in owner:
                    raise DataError(
                        f"expert {k} is in both {owner[k].name} and {meta.path.name} (shards of "
                        f"different --shard splits); delete one split's shards from {self.root}"
                    )
                owner[k] = meta.path
        return StoreInfo(
            self.root, first.spec, tuple(metas), len(owner), min(m.snapshots for m in metas)
        )

    def check_new_shard(self, spec: ExpertSpec, n: int) -> None:
        """Raise DataError if shards already here disagree with a shard of `spec`, split n."""
        for path in self.complete_shards():
            meta = self.shard_meta(path)
            what = _diff_text(spec, meta.spec)
            if what:
                raise DataError(
                    f"{path} holds different experts ({what}; this config first); use a new "
                    "experts.dir, or the data/experts settings those experts were trained with"
                )
            if meta.of != n:
                raise DataError(
                    f"{self.root} already holds {path.name}, split into {meta.of} shards; use "
                    f"--shard i/{meta.of}, or a new experts.dir for a {n}-way split"
                )

    def write_shard(
        self,
        i: int,
        n: int,
        trajectories: Sequence[Trajectory],
        spec: ExpertSpec,
        config: dict[str, Any] | None = None,
    ) -> Path:
        """Write shard i of n atomically (temp file, fsync, os.replace), then rebuild the index."""
        if any(t.expert < 0 for t in trajectories):
            raise ValueError("every trajectory needs its expert id before it is stored")
        snapshots = {int(t.snapshots.shape[0]) for t in trajectories}
        widths = {int(t.snapshots.shape[1]) for t in trajectories}
        if len(snapshots) != 1 or widths != {spec.num_params}:
            raise ValueError(f"trajectories must share [snapshots, {spec.num_params}] shapes")
        meta = {
            "format": FORMAT, "shard": [i, n], "spec": asdict(spec),
            "experts": [t.expert for t in trajectories], "seeds": [t.seed for t in trajectories],
            "test_acc": [list(t.test_acc) for t in trajectories],
            "snapshots": snapshots.pop(), "config": config or {},
        }  # fmt: skip
        tensors = {
            tensor_name(t.expert): t.snapshots.to(torch.float32).contiguous() for t in trajectories
        }
        path = self.shard_path(i, n)
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"ld3m": json.dumps(meta)})
            _fsync(Path(tmp))
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        self.rebuild_index()
        return path

    def rebuild_index(self) -> Path:
        """Rewrite index.json from the listing of complete shards, under an exclusive lock."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_NAME, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                shards = []
                for path in self.complete_shards():
                    try:
                        meta = self.shard_meta(path)
                    except DataError as exc:
                        log.warning("index: skipping %s", exc)
                        continue
                    shards.append(
                        {"file": path.name, "shard": meta.shard, "of": meta.of,
                         "experts": list(meta.experts), "snapshots": meta.snapshots}
                    )  # fmt: skip
                index = {
                    "format": FORMAT,
                    "num_experts": sum(len(s["experts"]) for s in shards),
                    "shards": shards,
                }
                _write_json_atomic(self.index_path, index)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        return self.index_path


def _diff_text(spec: ExpertSpec, ref: ExpertSpec) -> str:
    """'field a vs b' for each differing field ('' when compatible); layouts as parameter counts."""
    parts = []
    for key in spec.differences(ref):
        if key in ("param_names", "param_shapes"):
            parts.append(f"{key} ({spec.num_params} vs {ref.num_params} parameters)")
        else:
            parts.append(f"{key} {getattr(spec, key)!r} vs {getattr(ref, key)!r}")
    return ", ".join(parts)


def _check_spec(ref: ShardMeta, path: Path, spec: ExpertSpec) -> None:
    """DataError naming both shards when `spec` (of the shard at `path`) differs from `ref`."""
    what = _diff_text(spec, ref.spec)
    if what:
        raise DataError(
            f"expert shard {path} does not match {ref.path.name} ({what}); delete it or move it "
            f"to its own experts.dir, then rerun its task ({RUN_HINT})"
        )


def _fsync(path: Path) -> None:
    """Flush a written file to disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temp file beside `path` and os.replace it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
