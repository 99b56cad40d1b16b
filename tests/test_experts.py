"""Expert trajectories: training, shard store (atomic, concurrent, per task), seeded sampler."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch

from ld3m.config.io import load_config
from ld3m.config.schema import Config, ExpertsConfig
from ld3m.data.datasets import DatasetInfo, RealDataset
from ld3m.errors import CheckpointError, ConfigError, DataError
from ld3m.experts import train
from ld3m.experts.sampler import ExpertSampler
from ld3m.experts.store import ExpertSpec, ExpertStore, Trajectory, shard_name
from ld3m.experts.train import (
    experts_main,
    parse_shard,
    seeded_network,
    shard_experts,
    train_expert,
)
from ld3m.jsonl import read_jsonl
from ld3m.models.functional import flatten_params
from ld3m.models.networks import build_network

CLASSES, RES = 4, 8
SPEC = ExpertSpec("ConvNetD3", "tiny", RES, 1, CLASSES, ("w", "b"), ((2, 2), (1,)))


def tiny_dataset(train_per_class: int = 16, test_per_class: int = 16) -> RealDataset:
    """4 classes of 8 px grey images: a bright quadrant at a class-specific place, plus noise."""
    splits = []
    for n, seed in ((train_per_class, 0), (test_per_class, 1)):
        gen = torch.Generator().manual_seed(seed)
        x = 60 + 30 * torch.randn(n * CLASSES, 1, RES, RES, generator=gen)
        y = torch.arange(CLASSES).repeat_interleave(n)
        for i, c in enumerate(y.tolist()):
            row, col = divmod(c, 2)
            x[i, :, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4] += 150
        splits.append((x.clamp(0, 255).to(torch.uint8), y))
    names = tuple(str(c) for c in range(CLASSES))
    info = DatasetInfo("tiny", CLASSES, names, 1, RES, (0.35,), (0.25,), None)
    return RealDataset(*splits[0], *splits[1], info)


FAST = ExpertsConfig(arch="ConvNetD3", epochs=3, lr=0.05, batch=16, dsa=True)


def test_trajectory_starts_at_seeded_init_and_learns() -> None:
    data = tiny_dataset()
    before = torch.random.get_rng_state()
    traj = train_expert(data, dataclasses.replace(FAST, dsa=False), seed=7, progress_mode="off")
    assert torch.equal(torch.random.get_rng_state(), before)  # caller's RNG untouched
    torch.manual_seed(7)
    init = flatten_params(build_network("ConvNetD3", 1, CLASSES, RES))
    assert traj.snapshots.dtype == torch.float32
    assert traj.snapshots.shape == (FAST.epochs + 1, init.numel())
    assert torch.equal(traj.snapshots[0], init)
    assert not torch.equal(traj.snapshots[1], traj.snapshots[0])
    assert len(traj.test_acc) == FAST.epochs and (traj.arch, traj.seed) == ("ConvNetD3", 7)
    untrained = train.expert_accuracy(seeded_network("ConvNetD3", data.info, 7), data)
    assert untrained < 0.6 and traj.test_acc[-1] >= 0.9


AST = dataclasses.replace(FAST, momentum=0.9, weight_decay=1e-3, lr_milestone=1, lr_gamma=0.6,
                          loss_scale_epochs=2, grad_penalty=2.0)  # fmt: skip


@pytest.mark.parametrize("cfg", [FAST, AST], ids=["mtt", "ast"])
def test_keep_epochs_trains_only_the_kept_prefix(cfg: ExpertsConfig) -> None:
    data = tiny_dataset(train_per_class=8, test_per_class=2)
    full = train_expert(data, cfg, seed=3, progress_mode="off")
    kept = train_expert(data, dataclasses.replace(cfg, keep_epochs=2), seed=3, progress_mode="off")
    assert kept.snapshots.shape[0] == 3 and len(kept.test_acc) == 2
    torch.testing.assert_close(kept.snapshots, full.snapshots[:3], rtol=0, atol=0)
    longer = dataclasses.replace(cfg, epochs=1, keep_epochs=5)
    assert train_expert(data, longer, seed=3, progress_mode="off").snapshots.shape[0] == 2


@pytest.mark.parametrize("cfg", [FAST, AST], ids=["mtt", "ast"])
def test_preempted_expert_resumes_at_its_last_epoch(
    cfg: ExpertsConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epoch checkpoints: an expert killed in epoch 3 resumes after epoch 2 (not from scratch)
    and ends with exactly the uninterrupted trajectory (momentum, DSA stream and all)."""
    data = tiny_dataset(train_per_class=8, test_per_class=2)
    full = train_expert(data, cfg, seed=3, progress_mode="off")
    epochs_run = []
    real_epoch = train._train_epoch

    def killed_in_epoch_3(*args, **kwargs):
        epochs_run.append(args[-1])
        if len(epochs_run) == 3:
            raise KeyboardInterrupt("preempted")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "_train_epoch", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_expert(data, cfg, seed=3, progress_mode="off", ckpt=tmp_path / "ckpt")
    resumed_epochs = []

    def recorded(*args, **kwargs):
        resumed_epochs.append(args[-1])
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "_train_epoch", recorded)
    resumed = train_expert(data, cfg, seed=3, progress_mode="off", ckpt=tmp_path / "ckpt")
    assert resumed_epochs == ["seed 3 epoch 3"]  # epochs 1-2 came from the checkpoint
    torch.testing.assert_close(resumed.snapshots, full.snapshots, rtol=0, atol=0)
    assert resumed.test_acc == full.test_acc
    # A checkpoint of other settings is not resumed: a clear error names the folder.
    with pytest.raises(CheckpointError, match="other experts settings"):
        train_expert(data, dataclasses.replace(cfg, lr=0.01, epochs=4), seed=3,
                     progress_mode="off", ckpt=tmp_path / "ckpt")  # fmt: skip


def test_ast_expert_options() -> None:
    """The clipping-loss factors, the input-gradient penalty against its closed form on a
    linear network, and AST experts that learn and differ from MTT's."""
    cfg = dataclasses.replace(FAST, loss_scale_epochs=10)
    assert [train.loss_scale(cfg, e) for e in (0, 1, 9, 10, 30)] == pytest.approx(
        [0.5, 0.55, 0.95, 1.0, 1.0])  # fmt: skip
    assert train.loss_scale(FAST, 0) == 1.0
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    x = torch.randn(2, 3, 4, 4)
    g = net[1].weight.sum(0).reshape(3, 4, 4)  # d sum_k f_k / dx, the same for every sample
    expected = (g.norm(dim=0) - 1).square().mean()
    torch.testing.assert_close(train.input_grad_penalty(net, x), expected)
    data = tiny_dataset()
    ast = train_expert(data, dataclasses.replace(AST, dsa=False), seed=7, progress_mode="off")
    mtt = train_expert(data, dataclasses.replace(FAST, dsa=False), seed=7, progress_mode="off")
    assert torch.equal(ast.snapshots[0], mtt.snapshots[0])
    assert not torch.equal(ast.snapshots[1], mtt.snapshots[1]) and ast.test_acc[-1] >= 0.9
    with pytest.raises(ConfigError, match="grad_penalty"):
        train_expert(data, dataclasses.replace(FAST, grad_penalty=-1.0), seed=0)


def _args(tmp_path: Path, shard: str, *overrides: str) -> tuple[Config, str]:
    base = [f"experts.dir={tmp_path / 'buf'}", "experts.arch=ConvNetD3", "experts.num=3"]
    base += ["experts.epochs=2", "experts.batch=32", "run.progress='off'"]
    return load_config(None, [*base, *overrides]), shard


def test_shards_are_named_per_task_and_skipped_when_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_dataset(train_per_class=4, test_per_class=2)
    monkeypatch.setattr(train, "load_dataset", lambda cfg: data)
    experts_main(*_args(tmp_path, "1/2"))  # experts 1 (of 0..2)
    experts_main(*_args(tmp_path, "0/2"))  # experts 0, 2
    store = ExpertStore(tmp_path / "buf")
    assert [p.name for p in store.complete_shards()] == [shard_name(0, 2), shard_name(1, 2)]
    assert [t.expert for t in store.read_shard(store.shard_path(0, 2))] == [0, 2]
    (one,) = store.read_shard(store.shard_path(1, 2))
    assert (one.expert, one.seed, one.snapshots.shape[0]) == (1, 1, 3)
    index = json.loads(store.index_path.read_text())
    assert index["num_experts"] == 3 and [s["experts"] for s in index["shards"]] == [[0, 2], [1]]
    records = list(read_jsonl(tmp_path / "buf" / "experts.jsonl"))
    got = sorted((r["expert"], r["epoch"]) for r in records)
    assert got == [(k, e) for k in range(3) for e in (1, 2)]
    assert not any((tmp_path / "buf" / train.CKPT_DIR).iterdir())  # epoch checkpoints removed

    def must_not_train(*args: object, **kwargs: object) -> Trajectory:
        raise AssertionError("a complete shard was trained again")

    monkeypatch.setattr(train, "train_expert", must_not_train)
    capsys.readouterr()
    experts_main(*_args(tmp_path, "0/2"))
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"experts\.num"):
        experts_main(*_args(tmp_path, "0/2", "experts.num=5"))
    with pytest.raises(DataError, match="--shard i/2"):
        experts_main(*_args(tmp_path, "0/3"))


def test_shard_arguments_and_empty_dir_are_config_errors(tmp_path: Path) -> None:
    assert parse_shard("3/8") == (3, 8) and parse_shard("0/1") == (0, 1)
    assert shard_experts(1, 4, 10) == [1, 5, 9]
    for bad in ("2/2", "x", "1/0", "-1/2"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    with pytest.raises(ConfigError, match=r"experts\.dir"):
        experts_main(load_config(None, []), "0/1")
    with pytest.raises(ConfigError, match="no experts"):
        experts_main(*_args(tmp_path, "4/5"))


def fake(expert: int, snapshots: int = 3, spec: ExpertSpec = SPEC) -> Trajectory:
    """A trajectory whose every value is the expert id."""
    values = torch.full((snapshots, spec.num_params), float(expert))
    return Trajectory(values, [0.5] * (snapshots - 1), spec.arch, 100 + expert, expert)


def write_shards(root: str, shards: list[int], n: int, barrier: object) -> None:
    """Worker: write the given shards of n (started in another process)."""
    store = ExpertStore(Path(root))
    barrier.wait()  # type: ignore[attr-defined]
    for i in shards:
        store.write_shard(i, n, [fake(k) for k in shard_experts(i, n, 2 * n)], SPEC)


def test_concurrent_writers_leave_a_consistent_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listing = ExpertStore.complete_shards

    def slow_listing(self: ExpertStore) -> list[Path]:
        """Widen the race: a stale listing would overwrite a newer index without the lock."""
        found = listing(self)
        time.sleep(0.05 if len(found) < 6 else 0.0)  # an incomplete listing writes late
        return found

    monkeypatch.setattr(ExpertStore, "complete_shards", slow_listing)  # inherited by fork
    root = tmp_path / "buf"
    root.mkdir()
    (root / f".{shard_name(0, 6)}.abc.tmp").write_bytes(b"half a shard")
    ctx = mp.get_context("fork")  # the workers only write tiny tensors: no thread pools needed
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=write_shards, args=(str(root), shards, 6, barrier))
        for shards in ([0, 2, 4], [1, 3, 5])
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        if p.exitcode is None:
            p.kill()
        assert p.exitcode == 0
    index = json.loads((root / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == [shard_name(i, 6) for i in range(6)]
    assert [s["experts"] for s in index["shards"]] == [[i, i + 6] for i in range(6)]
    assert index["num_experts"] == 12 and {s["snapshots"] for s in index["shards"]} == {3}
    assert ExpertStore(root).describe().num_experts == 12


def test_failed_write_leaves_no_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ExpertStore(tmp_path)

    def crash(src: str, dst: str) -> None:
        raise OSError("killed mid-write")

    monkeypatch.setattr("ld3m.experts.store.os.replace", crash)
    with pytest.raises(OSError):
        store.write_shard(0, 1, [fake(0)], SPEC)
    assert not store.is_complete(0, 1) and list(tmp_path.iterdir()) == []


def make_store(root: Path) -> ExpertStore:
    """7 experts in 3 shards: 0/3 -> 0, 3, 6; 1/3 -> 1, 4; 2/3 -> 2, 5."""
    store = ExpertStore(root)
    for i in range(3):
        store.write_shard(i, 3, [fake(k) for k in shard_experts(i, 3, 7)], SPEC)
    return store


def take(sampler: ExpertSampler, n: int) -> list[int]:
    return [sampler.next_expert() for _ in range(n)]


def test_sampler_order_is_seeded_and_covers_every_expert_per_pass(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    a, b = ExpertSampler(store, seed=1), ExpertSampler(store, seed=1)
    first = take(a, 21)
    assert first == take(b, 21)
    assert first != take(ExpertSampler(store, seed=2), 21)
    passes = [first[j : j + 7] for j in (0, 7, 14)]
    assert all(sorted(p) == list(range(7)) for p in passes)
    assert passes[0] != passes[1]  # a new permutation each pass
    traj = ExpertSampler(store, seed=1).next()
    assert traj.expert == first[0] and traj.seed == 100 + first[0]
    assert torch.equal(traj.snapshots, fake(first[0]).snapshots)
    assert traj.arch == "ConvNetD3" and traj.test_acc == [0.5, 0.5]


def test_sampler_ranks_are_disjoint_within_a_pass(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    ranks = [ExpertSampler(store, seed=4, rank=r, world=2) for r in range(2)]
    assert ranks[0].per_pass == 3
    for _ in range(3):  # three passes
        seen = [take(s, 3) for s in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert len(set(seen[0]) | set(seen[1])) == 6
    with pytest.raises(DataError, match="fewer than 8 ranks"):
        ExpertSampler(store, seed=0, rank=0, world=8)
    with pytest.raises(ConfigError):
        ExpertSampler(store, seed=0, rank=2, world=2)


def test_sampler_state_round_trip_continues_identically(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    s = ExpertSampler(store, seed=9, rank=1, world=2)
    take(s, 5)  # mid second pass
    state = json.loads(json.dumps(s.state_dict()))
    assert (state["pass"], state["cursor"], state["seed"]) == (1, 2, 9)
    expected = take(s, 10)
    resumed = ExpertSampler(store, seed=0, rank=1, world=2)
    resumed.load_state_dict(state)
    assert take(resumed, 10) == expected
    with pytest.raises(CheckpointError, match="same number of ranks"):
        ExpertSampler(store, seed=9).load_state_dict(state)


def test_mismatched_shard_is_a_data_error(tmp_path: Path) -> None:
    store = ExpertStore(tmp_path)
    store.write_shard(0, 2, [fake(0)], SPEC)
    other = dataclasses.replace(SPEC, res=16)
    store.write_shard(1, 2, [fake(1, spec=other)], other)
    with pytest.raises(DataError, match=rf"{shard_name(1, 2)}.*res 16 vs 8"):
        store.describe()
    with pytest.raises(DataError, match="res"):
        store.check_new_shard(other, 2)


def test_empty_store_and_short_buffer_are_data_errors(tmp_path: Path) -> None:
    for make in (lambda: ExpertStore(tmp_path / "none").describe(),
                 lambda: ExpertSampler(ExpertStore(tmp_path), seed=0)):  # fmt: skip
        with pytest.raises(DataError, match=r"ld3m experts.*--shard i/n"):
            make()
    info = make_store(tmp_path).describe()
    assert (info.num_experts, info.min_snapshots, info.spec.num_params) == (7, 3, 5)
    net_info = DatasetInfo("tiny", CLASSES, tuple("abcd"), 1, RES, (0.5,), (0.5,), None)
    with pytest.raises(DataError, match="keep 2 epochs but MTT needs 4"):
        info.require(_spec_net(), net_info, min_snapshots=5)
    info.require(_spec_net(), net_info, min_snapshots=3)
    with pytest.raises(DataError, match="res=8"):
        info.require(_spec_net(), dataclasses.replace(net_info, res=16), min_snapshots=3)


def _spec_net() -> torch.nn.Module:
    """A module whose parameters are named and shaped like SPEC's (w [2,2], b [1])."""
    net = torch.nn.Module()
    net.w = torch.nn.Parameter(torch.zeros(2, 2))
    net.b = torch.nn.Parameter(torch.zeros(1))
    return net
