"""The distillation loop: resume equivalence, torn checkpoints, NaN guard, exports, tracking."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ld3m.artifacts import load_set
from ld3m.config.io import load_config
from ld3m.config.schema import Config
from ld3m.data.datasets import DatasetInfo, RealDataset
from ld3m.distill import loop
from ld3m.distill.loop import Distiller
from ld3m.distill.objectives import OBJECTIVES
from ld3m.errors import ConfigError, Interrupted, TrainingError
from ld3m.experts.sampler import ExpertSampler
from ld3m.experts.store import ExpertStore
from ld3m.experts.train import expert_spec, train_expert
from ld3m.methods import EXPERT_OBJECTIVES
from ld3m.tracking import NullTracker, Tracker
from tests.conftest import make_tiny_prior


def toy_data(res: int = 16) -> RealDataset:
    """3 classes of coloured squares with noise, uint8."""
    gen = torch.Generator().manual_seed(0)
    n, classes = 12, 3
    labels = torch.arange(classes).repeat_interleave(n)
    x = torch.rand(len(labels), 3, res, res, generator=gen) * 80
    for i, c in enumerate(labels.tolist()):
        x[i, c] += 150
    images = x.clamp(0, 255).to(torch.uint8)
    info = DatasetInfo("toy", classes, ("r", "g", "b"), 3, res, (0.5,) * 3, (0.25,) * 3, None)
    return RealDataset(images, labels, images.clone(), labels.clone(), info)


def make_cfg(tmp_path: Path, *overrides: str) -> Config:
    base = [
        f"run.out_dir={tmp_path / 'run'}", "run.progress=off", "distill.ipc=2",
        "distill.iterations=4", "distill.save_every=2", "distill.export_every=2",
        "distill.image_every=2", "distill.batch_real=4", "distill.arch=ConvNetD3",
        "generator.steps=2", "generator.chunk=4",
    ]  # fmt: skip
    return load_config(None, [*base, *overrides])


def tiny_experts(tmp_path: Path, data: RealDataset, arch: str = "ConvNetD3") -> Path:
    cfg = load_config(None, ["experts.epochs=3", "experts.batch=12", f"experts.arch={arch}"])
    store = ExpertStore(tmp_path / "experts")
    trajectories = [
        dataclasses.replace(train_expert(data, cfg.experts, seed=k, progress_mode="off"), expert=k)
        for k in range(2)
    ]
    store.write_shard(0, 1, trajectories, expert_spec(arch, data.info))
    return store.root


def build(cfg: Config, data: RealDataset) -> Distiller:
    prior = make_tiny_prior() if cfg.distill.space == "latent" else None
    experts = None
    if cfg.distill.objective in EXPERT_OBJECTIVES:
        experts = ExpertSampler(ExpertStore(Path(cfg.experts.dir)), seed=cfg.distill.seed)
    return Distiller(cfg, data, prior, experts)


class StopAfter:
    """A stop flag that is raised once the distiller has taken `steps` steps."""

    def __init__(self, distiller: Distiller, steps: int) -> None:
        self.distiller, self.steps = distiller, steps

    @property
    def requested(self) -> bool:
        return self.distiller.state.step >= self.steps


AST = [
    "distill.mtt.student_momentum=0.9",
    "distill.mtt.balanced_loss=true",
    "distill.mtt.intermediate=adaptive",
    "distill.mtt.perturb=1",
    "distill.init=kmeans",
]
CASES = [
    ("dm", "pixel"),
    ("dc", "pixel"),
    ("dcc", "pixel"),
    ("mtt", "pixel"),
    ("dm", "latent"),
    ("mtt", "latent"),
    ("mtt_ast", "latent"),
    ("sre2l", "pixel"),
    ("sre2l", "latent"),
]


@pytest.mark.parametrize(("objective", "space"), CASES)
def test_resume_equals_uninterrupted_run(tmp_path: Path, objective: str, space: str) -> None:
    data = toy_data()
    extra = [f"distill.space={space}", "distill.mtt.syn_steps=2", "distill.mtt.expert_epochs=1",
             "distill.mtt.max_start_epoch=2", "distill.dcc.warmup=0.5"]  # fmt: skip
    if objective == "mtt_ast":
        objective, extra = "mtt", [*extra, *AST, "distill.mtt.expert_epochs=2"]
    extra.append(f"distill.objective={objective}")
    if objective == "mtt":
        extra.append(f"experts.dir={tiny_experts(tmp_path, data)}")
    if objective == "sre2l":  # SRe2L's optimiser and schedule; the teacher is a BN expert
        extra += [f"experts.dir={tiny_experts(tmp_path, data, 'ConvNetBN')}",
                  "distill.optimizer=adam", "distill.lr_schedule=cosine",
                  "distill.sre2l.curriculum=cosine"]  # fmt: skip
    full_cfg = make_cfg(tmp_path / "full", *extra)
    full = build(full_cfg, data)
    full.run(NullTracker())

    # Interrupted: a stop request after 2 iterations (checkpoint at 2), as a preemption signal
    # makes it, then a fresh process resumes with the same config.
    part_cfg = make_cfg(tmp_path / "part", *extra)
    first = build(part_cfg, data)
    with pytest.raises(Interrupted, match="step 2"):
        first.run(NullTracker(), stop=StopAfter(first, 2))
    second = build(part_cfg, data)
    second.run(NullTracker())
    assert second.state.step == full.state.step == 4
    for (name, a), (_, b) in zip(full.synset.state_dict().items(),
                                 second.synset.state_dict().items(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    assert full.synset.state_dict().keys() == second.synset.state_dict().keys()
    moved = [p for p in full.synset.content() if p.grad is not None]
    assert moved  # the run really optimised something


def test_objective_lowers_loss_on_pixels(tmp_path: Path) -> None:
    data = toy_data()
    cfg = make_cfg(tmp_path, "distill.objective=dm", "distill.space=pixel", "distill.lr=1",
                   "distill.dsa=false", "distill.iterations=1")  # fmt: skip
    d = build(cfg, data)
    rng = lambda: torch.Generator().manual_seed(5)  # noqa: E731  same network every time
    before = d.objective.image_grad(d.synset.images.detach(), d.synset.labels, None, rng()).loss
    for _ in range(5):
        d.optimizer.zero_grad()
        out = d.objective.image_grad(d.synset.images.detach(), d.synset.labels, None, rng())
        d.synset.images.grad = out.grad
        d.optimizer.step()
    after = d.objective.image_grad(d.synset.images.detach(), d.synset.labels, None, rng()).loss
    assert after < 0.5 * before


def test_torn_checkpoint_is_ignored(tmp_path: Path) -> None:
    data = toy_data()
    cfg = make_cfg(tmp_path, "distill.objective=dm", "distill.space=pixel")
    build(cfg, data).run(NullTracker())
    ckpt = Path(cfg.run.out_dir) / "ckpt"
    steps = sorted(p.name for p in ckpt.iterdir())
    assert steps == ["step_00000002", "step_00000004"]
    newest = ckpt / steps[-1]
    (newest / "COMPLETE").unlink()  # torn: written but never marked
    resumed = build(cfg, data)
    assert resumed.resume() and resumed.state.step == 2


def test_nan_guard_skips_then_aborts(tmp_path: Path, monkeypatch) -> None:
    data = toy_data()
    cfg = make_cfg(
        tmp_path, "distill.objective=dm", "distill.space=pixel", "distill.nan_patience=3"
    )
    d = build(cfg, data)
    before = d.synset.images.detach().clone()
    real = d.objective.image_grad

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return dataclasses.replace(out, loss=float("nan"))

    monkeypatch.setattr(d.objective, "image_grad", poisoned)
    assert d.step().skipped and d.step().skipped
    assert torch.equal(d.synset.images.detach(), before)  # skipped steps change nothing
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        d.step()


def test_run_writes_exports_metrics_and_tensorboard(tmp_path: Path) -> None:
    data = toy_data()
    cfg = make_cfg(tmp_path, "distill.objective=dm", "distill.space=latent")
    d = build(cfg, data)
    tracker = Tracker(Path(cfg.run.out_dir))
    path = d.run(tracker)
    tracker.close()
    root = Path(cfg.run.out_dir)
    synset = load_set(path)
    assert synset.images.shape == (6, 3, 16, 16) and synset.meta.method == "ld3m_dm"
    assert set(synset.latents) == {"z", "c"} and synset.meta.step == 4
    assert (root / "artifacts" / "set_000002.safetensors").is_file()
    tags = {json.loads(line)["tag"] for line in (root / "metrics.jsonl").read_text().splitlines()}
    assert {"loss/match", "grad_norm/z", "grad_norm/c", "time/iteration_s"} <= tags
    assert any((root / "tb").iterdir())


def test_quick_eval_logs_accuracy_of_each_export(tmp_path: Path) -> None:
    data = toy_data()
    cfg = make_cfg(tmp_path, "distill.objective=dm", "distill.space=pixel",
                   "distill.quick_eval_epochs=2", "eval.distill_arch=ConvNetD3")  # fmt: skip
    tracker = Tracker(Path(cfg.run.out_dir))
    build(cfg, data).run(tracker)
    tracker.close()
    lines = (Path(cfg.run.out_dir) / "metrics.jsonl").read_text().splitlines()
    quick = [json.loads(x) for x in lines if '"eval/quick_acc"' in x]
    assert [r["step"] for r in quick] == [2, 4]  # one per export (export_every=2)
    assert all(0.0 <= r["value"] <= 1.0 for r in quick)


def test_loop_draws_nothing_from_global_rng(tmp_path: Path) -> None:
    data = toy_data()
    d = build(make_cfg(tmp_path, "distill.objective=dc", "distill.space=pixel"), data)
    state = torch.random.get_rng_state()
    d.step()
    assert torch.equal(state, torch.random.get_rng_state())


def test_default_learning_rates_cover_every_objective() -> None:
    for space in ("latent", "pixel"):
        for objective in OBJECTIVES:
            assert loop.DEFAULT_LR[(space, objective)] > 0


def test_method_names_tell_spaces_objectives_and_ablations_apart() -> None:
    from ld3m.config.io import load_config
    from ld3m.methods import method_name

    def name(*overrides: str) -> str:
        return method_name(load_config(None, list(overrides)))

    assert name("distill.space=pixel", "distill.objective=mtt") == "pixel_mtt"
    assert name("distill.space=latent", "distill.objective=dc") == "ld3m_dc"
    assert name("distill.objective=dm", "generator.skip=autoencoder") == "ld3m_dm_autoencoder"
    assert name("distill.space=pixel", "generator.skip=none") == "pixel_dm"
    assert name("distill.space=pixel", "distill.objective=dcc") == "pixel_dcc"
    assert name("distill.objective=mtt", "distill.mtt.perturb=1") == "ld3m_mtt_ast"
    assert name("distill.objective=mtt", "experts.grad_penalty=2") == "ld3m_mtt_ast"
    assert name("distill.objective=dm", "distill.mtt.perturb=1") == "ld3m_dm"
    assert name("distill.space=pixel", "distill.objective=sre2l") == "pixel_sre2l"
    assert name("distill.objective=sre2l", "distill.sre2l.curriculum=cosine") == "ld3m_cda"


def test_kmeans_init_takes_the_real_image_nearest_each_centroid() -> None:
    """Per class, k = ipc clusters of features; the init holds one real image per cluster."""
    from ld3m.distill.synthetic import build_synthetic_set, kmeans, nearest_distinct

    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(20, 2, generator=gen) * 0.1 + torch.tensor(c)
                        for c in ([0.0, 0.0], [5.0, 0.0], [0.0, 5.0])])  # fmt: skip
    centroids = kmeans(points.double(), 3, torch.Generator().manual_seed(1))
    assert sorted(centroids.round().abs().tolist()) == [[0, 0], [0, 5], [5, 0]]
    picked = nearest_distinct(points.double(), centroids)
    assert sorted((picked // 20).tolist()) == [0, 1, 2]  # one point of each cluster
    # Images whose brightness forms 2 clusters per class: ipc=2 takes one of each.
    data = toy_data()
    x = data.train_images.clone()
    x[::2] //= 4  # every other image is dark
    dark = RealDataset(x, data.train_labels, x, data.train_labels, data.info)
    synset = build_synthetic_set(dark, "pixel", 2, "kmeans", 0, None,
                                 embed=lambda b: b.mean(dim=(1, 2, 3))[:, None])  # fmt: skip
    brightness = synset.images.mean(dim=(1, 2, 3)).reshape(3, 2)
    assert bool(((brightness[:, 0] - brightness[:, 1]).abs() > 0.5).all())
    with pytest.raises(ConfigError, match="kmeans"):
        build_synthetic_set(dark, "pixel", 2, "kmeans", 0, None)


def test_sre2l_pixels_stay_valid_and_the_teacher_has_population_statistics(
    tmp_path: Path,
) -> None:
    """The loaded teacher's first BN layer holds the mean of its input over the real train
    split; SRe2L's pixel steps keep the images inside the data's valid range."""
    from ld3m.models.functional import load_flat
    from ld3m.models.networks import build_network
    from ld3m.models.teacher import bn_layers, load_teacher

    data = toy_data()
    buffer = tiny_experts(tmp_path, data, "ConvNetBN")
    teacher = load_teacher(buffer, data)
    last = ExpertSampler(ExpertStore(buffer), seed=0).load(0).snapshots[-1]
    net = load_flat(build_network("ConvNetBN", 3, 3, 16), last)
    x, _ = data.train_tensors()
    first_conv = net.features[0]
    expected = first_conv(x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn_layers(teacher)[0].running_mean, expected, rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    cfg = make_cfg(tmp_path, "distill.space=pixel", "distill.objective=sre2l",
                   f"experts.dir={buffer}", "distill.optimizer=adam", "distill.lr=5")  # fmt: skip
    d = build(cfg, data)
    for _ in range(3):
        d.step()
    low = (0 - 0.5) / 0.25
    images = d.synset.images.detach()
    assert float(images.min()) >= low - 1e-6 and float(images.max()) <= (1 - 0.5) / 0.25 + 1e-6
    assert float(images.min()) == pytest.approx(low, abs=1e-6)  # the large steps hit the bound
    with pytest.raises(ConfigError, match="BatchNorm"):
        load_teacher(tiny_experts(tmp_path / "in", data), data)


def test_teacher_statistics_are_kept_beside_the_buffer_and_redone_when_stale(
    tmp_path: Path, monkeypatch
) -> None:
    """The second load reads the BN statistics the first one computed; other data, or a
    damaged cache file, recomputes them instead of trusting the file."""
    from ld3m.models import teacher as teacher_mod
    from ld3m.models.teacher import STATS_FILE, bn_layers, load_teacher

    data = toy_data()
    buffer = tiny_experts(tmp_path, data, "ConvNetBN")
    first = bn_layers(load_teacher(buffer, data))[0].running_mean.clone()
    assert (buffer / STATS_FILE).is_file()
    calls = []
    real_calibrate = teacher_mod.calibrate
    monkeypatch.setattr(teacher_mod, "calibrate",
                        lambda *a: calls.append(1) or real_calibrate(*a))  # fmt: skip
    again = load_teacher(buffer, data)
    assert calls == [] and not again.training
    torch.testing.assert_close(bn_layers(again)[0].running_mean, first, rtol=0, atol=0)
    darker = RealDataset(data.train_images // 2, data.train_labels, data.test_images,
                         data.test_labels, data.info)  # fmt: skip
    other = bn_layers(load_teacher(buffer, darker))[0].running_mean
    assert calls == [1] and not torch.allclose(other, first)
    (buffer / STATS_FILE).write_bytes(b"not a safetensors file")
    load_teacher(buffer, data)
    assert calls == [1, 1]
