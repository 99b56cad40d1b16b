"""Evaluation harness: training works, records are written, reruns skip finished runs."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch

from ld3m.artifacts import SetMeta, SyntheticSet, load_set, save_set
from ld3m.baseline import random_real_set
from ld3m.config.io import load_config
from ld3m.config.schema import DataConfig, EvalConfig
from ld3m.data.datasets import load_dataset
from ld3m.errors import CheckpointError, ConfigError, DataError
from ld3m.evaluate import harness
from ld3m.evaluate.harness import (
    evaluate_set,
    format_summary,
    protocol_key,
    summarize,
    trains_as,
    unseen_mean,
)
from ld3m.evaluate.train_eval import (
    RunResult,
    TrainData,
    make_scheduler,
    resolve_lr,
    train_and_test,
)
from ld3m.jsonl import read_jsonl


def separable(n_per_class: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c = a bright square at a class-specific position, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n_per_class * classes, 3, 16, 16, generator=gen)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    for i, c in enumerate(y.tolist()):
        row, col = divmod(c, 2)
        x[i, :, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] += 2.0
    return x, y


def test_training_reaches_high_accuracy_on_separable_data() -> None:
    train_x, train_y = separable(5, 4, seed=0)
    test_x, test_y = separable(50, 4, seed=1)
    data = TrainData(train_x, train_y, test_x, test_y, num_classes=4)
    cfg = EvalConfig(epochs=60, dsa=False, ema_decay=None, schedule="step", lr=0.01)
    result = train_and_test("ConvNetD3", data, cfg, lr=0.01, seed=0)
    assert result.acc >= 0.95
    # An untrained network is at chance: the accuracy above comes from training.
    untrained = train_and_test("ConvNetD3", data, dataclasses.replace(cfg, epochs=0), 0.01, 0)
    assert untrained.acc < 0.6


def test_training_is_reproducible_per_seed() -> None:
    train_x, train_y = separable(3, 4, seed=0)
    test_x, test_y = separable(20, 4, seed=1)
    data = TrainData(train_x, train_y, test_x, test_y, num_classes=4)
    cfg = EvalConfig(epochs=5, dsa=True)
    a = train_and_test("ConvNetD3", data, cfg, lr=0.01, seed=3)
    b = train_and_test("ConvNetD3", data, cfg, lr=0.01, seed=3)
    assert (a.acc, a.train_acc) == (b.acc, b.train_acc)


def test_learning_rate_table_and_schedules() -> None:
    cfg = EvalConfig()
    assert resolve_lr(cfg, "VGG11", None) == 1e-4
    assert resolve_lr(cfg, "ResNet18", 0.05) == 1e-3
    assert resolve_lr(dataclasses.replace(cfg, learned_lr=True), "ResNet18", 0.05) == 0.05
    assert resolve_lr(dataclasses.replace(cfg, lr=0.01), "VGG11", None) == 0.01
    per_arch = load_config(None, ["eval.lr=0.01", "eval.arch_lr={VGG11: 1.0e-4, AlexNet: 0.1}"])
    assert per_arch.eval.arch_lr == {"VGG11": 1e-4, "AlexNet": 0.1}
    assert [resolve_lr(per_arch.eval, a, None) for a in ("VGG11", "AlexNet", "ViT")] == [
        1e-4, 0.1, 0.01]  # fmt: skip
    assert protocol_key(per_arch.eval) != protocol_key(dataclasses.replace(per_arch.eval,
                                                                           arch_lr={}))  # fmt: skip
    assert protocol_key(cfg) == "8828103847d2"  # unchanged by adding arch_lr (records stay valid)
    with pytest.raises(ConfigError, match=r"arch_lr\.VGG11"):
        load_config(None, ["eval.arch_lr={VGG11: fast}"])

    def lrs(schedule: str) -> list[float]:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = make_scheduler(opt, dataclasses.replace(cfg, epochs=10, schedule=schedule))
        out = []
        for _ in range(10):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    warm = lrs("warmup_cosine")
    assert warm[0] == pytest.approx(1e-7) and warm[5] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(warm[:6]))  # warm-up rises
    assert all(a > b for a, b in itertools.pairwise(warm[5:]))  # cosine falls
    assert lrs("step") == [1.0] * 5 + [pytest.approx(0.1)] * 5


def test_set_file_round_trip_and_grid(tmp_path: Path) -> None:
    meta = SetMeta("toy", 2, 1, 8, (0.5,), (0.25,), 2, "random_real", ("a", "b"))
    synset = SyntheticSet(
        torch.randn(4, 1, 8, 8),
        torch.tensor([0, 0, 1, 1]),
        meta,
        lr=0.02,
        latents={"z": torch.randn(4, 3, 2, 2)},
    )
    path = save_set(tmp_path / "set.safetensors", synset)
    back = load_set(path)
    assert torch.equal(back.images, synset.images) and torch.equal(back.labels, synset.labels)
    assert back.meta == meta and back.lr == pytest.approx(0.02)
    assert torch.equal(back.latents["z"], synset.latents["z"])
    from PIL import Image

    grid = Image.open(path.with_suffix(".png"))
    assert grid.size == (2 + 2 * 10, 2 + 2 * 10)  # one row per class, one column per image
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_set(tmp_path / "bad.safetensors")


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    return DataConfig(name="mnist5k", res=16, cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_random_real_then_eval_records(mnist: DataConfig, tmp_path: Path, monkeypatch) -> None:
    data = load_dataset(mnist)
    synset = random_real_set(data, ipc=10, seed=0)
    assert synset.images.shape == (100, 1, 16, 16)
    assert torch.equal(synset.labels, torch.arange(10).repeat_interleave(10))
    again = random_real_set(data, ipc=10, seed=0)
    assert torch.equal(again.images, synset.images)  # seeded
    assert not torch.equal(random_real_set(data, 10, seed=1).images, synset.images)

    path = save_set(tmp_path / "artifacts" / "rr.safetensors", synset)
    cfg = EvalConfig(
        archs=("ConvNet",), runs=2, epochs=40, schedule="step", lr=0.01, ema_decay=None, dsa=False
    )
    out = tmp_path / "eval.jsonl"
    records = evaluate_set(path, mnist, cfg, out, "off")
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 2 and [r["seed"] for r in lines] == [0, 1]
    for r in lines:
        assert {"set", "arch", "seed", "acc", "epochs", "wall_s", "method", "ipc"} <= set(r)
        assert r["method"] == "random_real" and r["epochs"] == 40
        assert r["acc"] > 0.6  # 100 real MNIST digits train a ConvNet far above chance (10%)
    summary = summarize(records)
    assert summary[0].runs == 2 and "ConvNet" in format_summary(summary, "ConvNet")

    # A rerun skips finished (arch, seed) pairs instead of training again.
    monkeypatch.setattr(harness, "train_and_test", lambda *a, **k: pytest.fail("retrained"))
    assert evaluate_set(path, mnist, cfg, out, "off") == records
    assert len(out.read_text().splitlines()) == 2


def test_per_ipc_learning_rates_apply_to_sets_of_their_ipc(
    mnist: DataConfig, tmp_path: Path, monkeypatch
) -> None:
    cfg = load_config(None, ["eval.lr=0.01", "eval.arch_lr={AlexNet: 0.03}",
                             "eval.ipc_arch_lr={1: {AlexNet: 0.005}}"]).eval  # fmt: skip
    assert cfg.ipc_arch_lr == {1: {"AlexNet": 0.005}}
    cfg = dataclasses.replace(cfg, archs=("AlexNet", "ConvNet"), runs=1)
    monkeypatch.setattr(harness, "train_and_test", lambda arch, data, ecfg, lr, *a: RunResult(
        acc=0.5, train_acc=1.0, lr=lr, wall_s=0.0))  # fmt: skip
    data = load_dataset(mnist)
    lrs, keys = {}, {}
    for ipc in (1, 10):
        path = save_set(tmp_path / f"ipc{ipc}.safetensors", random_real_set(data, ipc, seed=0))
        records = evaluate_set(path, mnist, cfg, tmp_path / "eval.jsonl", "off")
        lrs[ipc] = [r["lr"] for r in records]
        keys[ipc] = records[0]["protocol"]
    assert lrs == {1: [0.005, 0.01], 10: [0.03, 0.01]}
    # A table for IPC 1 leaves the IPC-10 protocol as it was: its records stay valid.
    assert keys[10] == protocol_key(dataclasses.replace(cfg, ipc_arch_lr={})) != keys[1]
    with pytest.raises(ValueError, match="at_ipc"):
        protocol_key(cfg)


def test_a_changed_rate_reevaluates_only_the_networks_it_trains(
    mnist: DataConfig, tmp_path: Path, monkeypatch
) -> None:
    trained: list[tuple[str, float]] = []

    def fake(arch, data, ecfg, lr, *a) -> RunResult:
        trained.append((arch, lr))
        return RunResult(acc=0.5, train_acc=1.0, lr=lr, wall_s=0.0)

    monkeypatch.setattr(harness, "train_and_test", fake)
    cfg = dataclasses.replace(load_config(None, ["eval.lr=0.01"]).eval,
                              archs=("AlexNet", "ConvNet"), runs=1)  # fmt: skip
    data = load_dataset(mnist)
    path = save_set(tmp_path / "set.safetensors", random_real_set(data, 10, seed=0))
    out = tmp_path / "eval.jsonl"
    evaluate_set(path, mnist, cfg, out, "off")
    # AlexNet's rate changed at IPC 10 (the protocol key of every IPC-10 record changes):
    # only AlexNet trains again; ConvNet's network is trained as before and is kept.
    slower = dataclasses.replace(cfg, ipc_arch_lr={10: {"AlexNet": 0.003}})
    records = evaluate_set(path, mnist, slower, out, "off")
    assert trained == [("AlexNet", 0.01), ("ConvNet", 0.01), ("AlexNet", 0.003)]
    assert [r["lr"] for r in records] == [0.003, 0.01]
    old_alexnet, convnet = list(read_jsonl(out))[:2]
    assert trains_as(convnet, slower) and not trains_as(old_alexnet, slower)
    assert not trains_as(convnet, dataclasses.replace(slower, epochs=slower.epochs + 1))
    evaluate_set(path, mnist, slower, out, "off")  # a rerun trains nothing
    assert len(trained) == 3


def test_eval_refuses_a_set_from_another_dataset(mnist: DataConfig, tmp_path: Path) -> None:
    meta = SetMeta("cifar10", 10, 3, 32, (0.5,) * 3, (0.5,) * 3, 1, "random_real")
    path = save_set(
        tmp_path / "s.safetensors", SyntheticSet(torch.zeros(10, 3, 32, 32), torch.arange(10), meta)
    )
    with pytest.raises(DataError, match=r"data\.name=cifar10"):
        evaluate_set(path, mnist, EvalConfig(), tmp_path / "e.jsonl", "off")


def test_unseen_mean_excludes_distillation_arch() -> None:
    records = [
        {"arch": a, "acc": acc}
        for a, acc in [("ConvNet", 0.9), ("VGG11", 0.5), ("ViT", 0.3), ("VGG11", 0.7)]
    ]
    s = summarize(records)
    assert [x.arch for x in s] == ["ConvNet", "VGG11", "ViT"]
    assert s[1].mean == pytest.approx(0.6) and s[1].std == pytest.approx(0.1)
    assert unseen_mean(s, "ConvNet") == pytest.approx(0.45)


class Oracle(torch.nn.Module):
    """A toy teacher that knows where each class's bright square is (logits = quadrant means)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = [x[:, :, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8].mean(dim=(1, 2, 3))
             for r in (0, 1) for c in (0, 1)]  # fmt: skip
        return 4 * torch.stack(q, dim=1)


def test_soft_label_protocol_learns_from_the_teacher_not_the_labels() -> None:
    """With eval.labels=teacher the student is trained on T^2 KL to the teacher's softened
    predictions: wrong hard labels do not matter, while the hard-label protocol learns them."""
    from ld3m.evaluate.train_eval import Labels

    logits, teacher_logits = torch.randn(5, 4), torch.randn(5, 4)
    t = 3.0
    p = torch.softmax(teacher_logits / t, 1)
    expected = (p * (p.log() - torch.log_softmax(logits / t, 1))).sum(1).mean() * t * t
    loss = Labels(lambda x: teacher_logits, t)(lambda x: logits, None, None)
    torch.testing.assert_close(loss, expected)
    train_x, train_y = separable(5, 4, seed=0)
    test_x, test_y = separable(50, 4, seed=1)
    wrong = (train_y + 1) % 4  # every hard label is wrong
    data = TrainData(train_x, wrong, test_x, test_y, num_classes=4)
    cfg = EvalConfig(epochs=60, dsa=False, ema_decay=None, schedule="step", lr=0.01)
    soft = train_and_test("ConvNetD3", data, cfg, 0.01, 0, labels=Labels(teacher=Oracle()))
    hard = train_and_test("ConvNetD3", data, cfg, 0.01, 0)
    assert soft.acc >= 0.9 and hard.acc <= 0.1


def test_soft_label_records_have_their_own_protocol_and_rows() -> None:
    from ld3m.report.tables import row_method

    hard, soft = EvalConfig(), EvalConfig(labels="teacher", teacher="/buf", temperature=4.0)
    assert protocol_key(hard) == protocol_key(dataclasses.replace(hard, temperature=9.0))
    assert protocol_key(soft) != protocol_key(hard)
    assert protocol_key(soft) != protocol_key(dataclasses.replace(soft, teacher="/other"))
    assert row_method({"method": "random_real"}) == "random_real"
    assert row_method({"method": "pixel_sre2l", "labels": "teacher"}) == "pixel_sre2l+teacher"
    cfg = load_config(None, ["eval.labels=teacher", "experts.dir=/experts"])
    assert harness.eval_config(cfg).teacher == "/experts"
