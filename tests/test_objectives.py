"""Matching objectives: gradients against direct autograd references, determinism, errors."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ld3m.config.schema import DCCConfig, DistillConfig, MTTConfig
from ld3m.data.augment import DiffAugment
from ld3m.data.datasets import DatasetInfo, RealDataset
from ld3m.distill.objectives import OBJECTIVES, build_objective
from ld3m.distill.objectives.base import draw_seed, seeded_network
from ld3m.distill.objectives.mtt import draw_plan
from ld3m.errors import ConfigError
from ld3m.methods import EXPERT_OBJECTIVES
from ld3m.models.functional import flatten_params, functional_forward
from ld3m.models.teacher import calibrate

K, C, R, IPC = 3, 3, 8, 2
NET = {"width": 8, "depth": 2}
STRATEGY = "color_crop_cutout_flip_scale_rotate"


class FakeExperts:
    """The ExpertSampler interface: `next()` returns an object with `.snapshots` [E+1, P]."""

    def __init__(self, snapshots: torch.Tensor) -> None:
        self.snapshots = snapshots

    def next(self) -> SimpleNamespace:
        return SimpleNamespace(snapshots=self.snapshots)


def make_data() -> RealDataset:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(K).repeat_interleave(6)
    images = torch.randint(0, 256, (labels.numel(), C, R, R), generator=g, dtype=torch.uint8)
    info = DatasetInfo("toy", K, ("a", "b", "c"), C, R, (0.5,) * C, (0.25,) * C, None)
    return RealDataset(images, labels, images, labels, info)


def make_snapshots(data: RealDataset, epochs: int = 4) -> torch.Tensor:
    """A real (full-batch SGD) trajectory of the tiny ConvNet on the toy data."""
    net = seeded_network("ConvNet", C, K, R, seed=1, overrides=NET)
    x, y = data.train_tensors()
    theta = flatten_params(net)
    snaps = [theta]
    for _ in range(epochs):
        theta = theta.detach().requires_grad_(True)
        g = torch.autograd.grad(F.cross_entropy(functional_forward(net, theta, x), y), theta)[0]
        theta = (theta - 0.5 * g).detach()
        snaps.append(theta)
    return torch.stack(snaps)


@pytest.fixture(scope="module")
def data() -> RealDataset:
    return make_data()


@pytest.fixture(scope="module")
def experts(data: RealDataset) -> FakeExperts:
    return FakeExperts(make_snapshots(data))


def make_cfg(objective: str, dsa: bool = True, **mtt: int | float) -> DistillConfig:
    mtt_cfg = MTTConfig(**{"syn_steps": 2, "max_start_epoch": 2, "expert_epochs": 2, **mtt})
    return DistillConfig(
        objective=objective, arch="ConvNet", batch_real=4, dsa=dsa, dsa_strategy=STRATEGY,
        ipc=IPC, mtt=mtt_cfg, dcc=DCCConfig(warmup=0.0),
    )  # fmt: skip


def syn_set(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(K * IPC, C, R, R, generator=g, dtype=dtype), torch.arange(
        K
    ).repeat_interleave(IPC)


def toy_teacher(data: RealDataset) -> torch.nn.Module:
    """A BatchNorm ConvNet with statistics of the toy data (untrained: inversion still works)."""
    net = seeded_network("ConvNet", C, K, R, seed=2, overrides={**NET, "norm": "batch"})
    return calibrate(net, data, batch=8, what="toy teacher")


def build(name: str, data: RealDataset, experts: FakeExperts, **kw: object) -> object:
    cfg = kw.pop("cfg", None) or make_cfg(name)
    if name == "sre2l":
        kw.setdefault("teacher", toy_teacher(data))
        kw.pop("net_overrides", None)
        return build_objective(cfg, data, K, C, R, experts, **kw)
    return build_objective(cfg, data, K, C, R, experts, net_overrides=NET, **kw)


def rng(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- direct references


def ref_distance(gr: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    if gr.ndim == 1:
        return torch.zeros((), dtype=gr.dtype)
    if gr.ndim == 4:
        gr, gs = gr.reshape(gr.shape[0], -1), gs.reshape(gs.shape[0], -1)
    cos = (gr * gs).sum(-1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + 1e-6)
    return (1 - cos).sum()


def reference(name: str, data: RealDataset, images: torch.Tensor, labels: torch.Tensor, g):
    """DC, DCC or DM loss over all classes as ONE scalar, and its autograd image gradient."""
    cfg = make_cfg(name)
    net = seeded_network("ConvNet", C, K, R, draw_seed(g), NET).double()
    params = list(net.parameters())
    aug, x_all = DiffAugment(STRATEGY), images.clone().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    g_real_mean, views = [torch.zeros_like(p) for p in params], []
    for c in range(K):
        real = data.images_of_class(c, cfg.batch_real, g).double()
        seed = draw_seed(g)
        syn = x_all[labels == c]
        if name == "dcc":  # the class-mean real gradient vs the whole set's gradient
            y_real = torch.full((len(real),), c)
            g_c = torch.autograd.grad(F.cross_entropy(net(aug(real, seed=seed)), y_real), params)
            g_real_mean = [m + gc / K for m, gc in zip(g_real_mean, g_c, strict=True)]
            views.append(aug(syn, seed=seed))
            continue
        if name == "dm":
            diff = net.embed(aug(real, seed=seed)).mean(0) - net.embed(aug(syn, seed=seed)).mean(0)
            total = total + diff.square().sum()
            continue
        y_real, y_syn = torch.full((len(real),), c), torch.full((len(syn),), c)
        g_real = torch.autograd.grad(F.cross_entropy(net(aug(real, seed=seed)), y_real), params)
        loss_syn = F.cross_entropy(net(aug(syn, seed=seed)), y_syn)
        g_syn = torch.autograd.grad(loss_syn, params, create_graph=True)
        total = total + sum(ref_distance(r, s) for r, s in zip(g_real, g_syn, strict=True))
    if name == "dcc":
        loss_syn = F.cross_entropy(net(torch.cat(views)), labels.sort().values)
        g_syn = torch.autograd.grad(loss_syn, params, create_graph=True)
        total = sum(ref_distance(r, s) for r, s in zip(g_real_mean, g_syn, strict=True))
    return total, torch.autograd.grad(total, x_all)[0]


def ref_unroll(snapshots, images, labels, alpha: float, steps: int, expert_epochs: int = 2):
    """Original MTT (start 0, whole set, no DSA): autograd through every student step."""
    net = seeded_network("ConvNet", C, K, R, 0, NET)
    theta0, target = snapshots[0].double(), snapshots[expert_epochs].double()
    x_all = images.clone().requires_grad_(True)
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    theta = theta0.clone().requires_grad_(True)
    for _ in range(steps):
        ce = F.cross_entropy(functional_forward(net, theta, x_all), labels)
        theta = theta - a * torch.autograd.grad(ce, theta, create_graph=True)[0]
    loss = (theta - target).square().sum() / (theta0 - target).square().sum()
    return (loss.detach(), *torch.autograd.grad(loss, (x_all, a)))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", ["dc", "dcc", "dm"])
def test_dc_dcc_dm_gradient_equals_direct_autograd(name: str, data: RealDataset) -> None:
    images, labels = syn_set()
    out = build(name, data, None).image_grad(images, labels, None, rng())
    ref_loss, ref_grad = reference(name, data, images, labels, rng())
    assert out.loss == pytest.approx(float(ref_loss.detach()), rel=1e-10)
    assert out.grad.abs().sum() > 0
    torch.testing.assert_close(out.grad, ref_grad, rtol=1e-8, atol=1e-12)


def test_dcc_warms_up_with_the_class_wise_loss(data: RealDataset) -> None:
    """DCC is DC's class-wise loss for the first warmup x iterations, then contrastive."""
    images, labels = syn_set()
    cfg = replace(make_cfg("dcc"), iterations=8, dcc=DCCConfig(warmup=0.25))
    dcc, dc = build("dcc", data, None, cfg=cfg), build("dc", data, None)
    for it in (0, 1):
        warm, ref = dcc.image_grad(images, labels, None, rng(), it), dc.image_grad(
            images, labels, None, rng())  # fmt: skip
        assert warm.loss == ref.loss and torch.equal(warm.grad, ref.grad)
        assert warm.stats["contrastive"] == 0.0
    after = dcc.image_grad(images, labels, None, rng(), 2)
    assert after.stats["contrastive"] == 1.0 and after.loss != ref.loss
    # One class: the class-mean real gradient is that class's, so DCC is DC.
    one = labels == 0
    a = dcc.image_grad(images[one], labels[one], None, rng(), 5)
    b = dc.image_grad(images[one], labels[one], None, rng())
    assert a.loss == pytest.approx(b.loss, rel=1e-10)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12)


def mtt_cfg(**mtt: int | float) -> DistillConfig:
    return make_cfg("mtt", dsa=False, **{"max_start_epoch": 1, **mtt})


@pytest.mark.parametrize("estimator", ["tesla", "unroll"])
def test_mtt_single_step_equals_full_unroll(estimator: str, data, experts) -> None:
    images, labels = syn_set()
    obj = build("mtt", data, experts, cfg=mtt_cfg(syn_steps=1), estimator=estimator)
    lr = torch.tensor(0.05, dtype=torch.float64)
    out = obj.image_grad(images, labels, lr, rng())
    loss, grad, lr_grad = ref_unroll(experts.snapshots, images, labels, 0.05, steps=1)
    assert out.loss == pytest.approx(float(loss), rel=1e-10)
    torch.testing.assert_close(out.grad, grad, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(out.lr_grad, lr_grad, rtol=1e-5, atol=1e-12)


def test_mtt_three_steps_tesla_is_first_order_approximation(data, experts) -> None:
    images, labels = syn_set()
    lr = torch.tensor(0.05, dtype=torch.float64)
    loss, grad, lr_grad = ref_unroll(experts.snapshots, images, labels, 0.05, steps=3)
    outs = {
        est: build("mtt", data, experts, cfg=mtt_cfg(syn_steps=3), estimator=est).image_grad(
            images, labels, lr, rng()
        )
        for est in ("tesla", "unroll")
    }
    torch.testing.assert_close(outs["unroll"].grad, grad, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(outs["unroll"].lr_grad, lr_grad, rtol=1e-5, atol=1e-12)
    tesla = outs["tesla"]
    assert tesla.loss == pytest.approx(float(loss), rel=1e-10)  # same forward unroll
    assert not torch.allclose(tesla.grad, grad, rtol=1e-3)  # later g_j's X-dependence dropped
    assert cosine(tesla.grad, grad) > 0.9
    assert float(tesla.lr_grad) != pytest.approx(float(lr_grad), rel=1e-4)
    assert float(tesla.lr_grad) * float(lr_grad) > 0


def test_mtt_tesla_matches_unroll_with_dsa_and_minibatches(data, experts) -> None:
    """One step, random start, per-sample DSA, minibatch of 4: both estimators agree exactly."""
    cfg = make_cfg("mtt", dsa=True, syn_steps=1, batch_syn=4)
    images, labels = syn_set()
    lr = torch.tensor(0.05, dtype=torch.float64)
    a, b = (
        build("mtt", data, experts, cfg=cfg, estimator=est).image_grad(images, labels, lr, rng())
        for est in ("tesla", "unroll")
    )
    assert a.stats == b.stats
    assert int((a.grad.flatten(1).abs().sum(1) > 0).sum()) == 4  # only the minibatch moves
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(a.lr_grad, b.lr_grad, rtol=1e-5, atol=1e-12)


# ---------------------------------------------------------------- AST options of MTT

AST = {"student_momentum": 0.9, "balanced_loss": True, "intermediate": "adaptive",
       "perturb": 1.0}  # fmt: skip


def ref_ast_first_order(snapshots, images, labels, alpha: float, steps: int, epochs: int, g):
    """AST's student (momentum 0.9, balanced CE, adaptive intermediate matches, perturbed start;
    start 0, whole set, no DSA) by autograd, with each g_j evaluated at a DETACHED theta_j:
    exactly the first-order quantity the derived TESLA form claims to compute."""
    net = seeded_network("ConvNet", C, K, R, 0, NET)
    draw_plan(g, len(labels), MTTConfig(syn_steps=steps, max_start_epoch=1))
    theta0 = snapshots[0].double().clone()
    offset = 0
    for p in net.parameters():
        if p.ndim == 4:
            d = torch.randn(p.numel(), generator=g, dtype=torch.float64)
            w = theta0[offset : offset + p.numel()]
            theta0[offset : offset + p.numel()] = w + (d / d.norm()) * w
        offset += p.numel()
    scale = math.log(8, 5)  # start 0 >= h = max_start_epoch // 2 = 0
    every = steps // epochs
    targets = {every * i: (snapshots[i].double(), i / epochs) for i in range(1, epochs)}
    targets[steps] = (snapshots[epochs].double(), 1.0)
    x_all = images.clone().requires_grad_(True)
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    theta, buf, loss = theta0, 0.0, torch.zeros((), dtype=torch.float64)
    for i in range(steps):
        leaf = theta.detach().requires_grad_(True)
        ce = scale * F.cross_entropy(functional_forward(net, leaf, x_all), labels)
        buf = 0.9 * buf + torch.autograd.grad(ce, leaf, create_graph=True)[0]
        theta = theta - a * buf
        if i + 1 in targets:
            target, weight = targets[i + 1]
            loss = loss + weight * (theta - target).square().sum() / (
                (theta0 - target).square().sum())  # fmt: skip
    return (loss.detach(), *torch.autograd.grad(loss, (x_all, a)))


def test_ast_tesla_equals_its_first_order_reference(data) -> None:
    """The derived TESLA form with momentum, intermediate matches, balanced CE and the
    perturbed start is the first-order gradient, exactly (seed-methods notes, AST)."""
    snapshots = make_snapshots(data, epochs=4)
    images, labels = syn_set()
    cfg = mtt_cfg(syn_steps=6, expert_epochs=3, **AST)
    lr = torch.tensor(0.05, dtype=torch.float64)
    out = build("mtt", data, FakeExperts(snapshots), cfg=cfg).image_grad(images, labels, lr, rng())
    loss, grad, lr_grad = ref_ast_first_order(snapshots, images, labels, 0.05, 6, 3, rng())
    assert out.loss == pytest.approx(float(loss), rel=1e-10)
    torch.testing.assert_close(out.grad, grad, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.lr_grad, lr_grad, rtol=1e-6, atol=1e-12)


def test_ast_tesla_approximates_the_full_unroll(data) -> None:
    """One step with every AST option: exact; several steps: a first-order approximation of
    the full unroll (same loss, gradients pointing the same way)."""
    snapshots = make_snapshots(data, epochs=4)
    images, labels = syn_set()
    lr = torch.tensor(0.05, dtype=torch.float64)
    for steps, epochs in ((1, 1), (6, 3)):
        cfg = mtt_cfg(syn_steps=steps, expert_epochs=epochs, **AST)
        a, b = (
            build("mtt", data, FakeExperts(snapshots), cfg=cfg, estimator=est).image_grad(
                images, labels, lr, rng())
            for est in ("tesla", "unroll")
        )  # fmt: skip
        assert a.loss == pytest.approx(b.loss, rel=1e-10)
        if steps == 1:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(a.lr_grad, b.lr_grad, rtol=1e-6, atol=1e-12)
        else:
            assert not torch.allclose(a.grad, b.grad, rtol=1e-3) and cosine(a.grad, b.grad) > 0.9


def test_ast_option_values(data) -> None:
    """Balanced CE factors, momentum coefficients, intermediate match steps and weights, and the
    perturbation touching conv weights only."""
    from ld3m.distill.objectives.mtt import momentum_coef

    obj = build("mtt", data, FakeExperts(make_snapshots(data, epochs=40)),
                cfg=mtt_cfg(max_start_epoch=20, syn_steps=20, expert_epochs=3, **AST))  # fmt: skip
    assert obj.ce_scale(10) == pytest.approx(math.log(8, 5))  # h = 10
    assert obj.ce_scale(19) == pytest.approx(math.log(17, 5))
    assert obj.ce_scale(0) == pytest.approx(1 / math.log(18, 5))
    assert momentum_coef(0.9, 5, 4) == 1.0 and momentum_coef(0.9, 5, 3) == pytest.approx(1.9)
    assert momentum_coef(0.0, 5, 0) == 1.0
    epochs = torch.arange(4.0)[:, None]
    assert [(m.step, float(m.target), m.weight) for m in obj.matches(epochs)] == [
        (6, 1.0, pytest.approx(1 / 3)),
        (12, 2.0, pytest.approx(2 / 3)),
        (20, 3.0, 1.0),
    ]
    theta0 = obj.endpoints(obj.experts.snapshots, 0, torch.zeros((), dtype=torch.float64))[0]
    moved = obj.perturbed(theta0, rng()) != theta0
    offset = 0
    for p in obj.net.parameters():
        assert bool(moved[offset : offset + p.numel()].any()) == (p.ndim == 4)
        offset += p.numel()
    assert torch.equal(obj.perturbed(theta0, rng()), obj.perturbed(theta0, rng()))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_descends_its_own_loss(name: str, data, experts) -> None:
    """Normalised gradient steps on the images lower the loss (same rng seed every evaluation)."""
    obj = build(name, data, experts)
    images, labels = syn_set()
    lr = torch.tensor(0.05, dtype=torch.float64)
    first = obj.image_grad(images, labels, lr, rng())
    out = first
    for _ in range(3):
        images = images - 0.3 * out.grad / out.grad.norm()
        out = obj.image_grad(images, labels, lr, rng())
    assert out.loss < first.loss


# ---------------------------------------------------------------- protocol, determinism


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_contract(name: str, data, experts) -> None:
    obj = build(name, data, experts)
    assert obj.name == name and obj.uses_experts == (name in EXPERT_OBJECTIVES)
    assert obj.learns_lr == (name == "mtt")
    images, labels = syn_set(torch.float32)
    lr = torch.tensor(0.01)
    state = torch.random.get_rng_state()
    a = obj.image_grad(images, labels, lr, rng(7))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = obj.image_grad(images, labels, lr, rng(7))
    c = obj.image_grad(images, labels, lr, rng(8))
    assert a.grad.shape == images.shape and a.grad.dtype == images.dtype
    assert torch.isfinite(a.grad).all() and a.loss > 0 and a.loss == b.loss
    assert torch.equal(a.grad, b.grad) and a.stats == b.stats
    assert not torch.equal(a.grad, c.grad)
    if obj.learns_lr:
        assert a.lr_grad.shape == lr.shape and torch.isfinite(a.lr_grad)
        assert torch.equal(a.lr_grad, b.lr_grad)
    else:
        assert a.lr_grad is None


# ---------------------------------------------------------------- errors


def test_unknown_objective(data) -> None:
    with pytest.raises(ConfigError, match=r"unknown distill\.objective 'kip'; choose one of"):
        build_objective(replace(make_cfg("dm"), objective="kip"), data, K, C, R)


def test_mtt_needs_experts(data) -> None:
    with pytest.raises(ConfigError, match="needs expert trajectories"):
        build_objective(make_cfg("mtt"), data, K, C, R, None, net_overrides=NET)


def test_mtt_too_short_trajectory(data, experts) -> None:
    obj = build("mtt", data, experts, cfg=make_cfg("mtt", max_start_epoch=3, expert_epochs=2))
    images, labels = syn_set()
    obj.image_grad(images, labels, None, rng())  # reads epoch 4 of 4: fine
    cfg = make_cfg("mtt", max_start_epoch=3, expert_epochs=3)
    with pytest.raises(ConfigError, match=r"has 4 epochs but MTT reads epoch 5.*train experts"):
        build("mtt", data, experts, cfg=cfg).image_grad(images, labels, None, rng())


def test_mtt_expert_of_other_network(data, experts) -> None:
    obj = build_objective(make_cfg("mtt"), data, K, C, R, experts, net_overrides={"width": 4})
    with pytest.raises(ConfigError, match=r"parameters; train experts with distill\.arch"):
        obj.image_grad(*syn_set(), None, rng())


# ---------------------------------------------------------------- SRe2L / CDA


def test_cda_curriculum_values() -> None:
    from ld3m.config.schema import SRe2LConfig
    from ld3m.distill.objectives.sre2l import crop_lower_bound

    def beta(curriculum: str, t: int, milestone: float = 1.0) -> float:
        return crop_lower_bound(SRe2LConfig(curriculum=curriculum, milestone=milestone), t, 100)

    assert [beta("none", t) for t in (0, 50, 99)] == [0.08] * 3  # SRe2L: constant
    assert beta("cosine", 0) == pytest.approx(1.0)
    assert beta("cosine", 50) == pytest.approx(0.08 + 0.92 * 0.5)
    assert beta("cosine", 25) == pytest.approx(0.08 + 0.92 * (1 + math.cos(math.pi / 4)) / 2)
    assert beta("linear", 25) == pytest.approx(0.08 + 0.92 * 0.75)
    assert [beta("step", t, 0.5) for t in (0, 49, 50, 99)] == [1.0, 1.0, 0.08, 0.08]
    assert beta("cosine", 60, 0.5) == beta("linear", 60, 0.5) == 0.08  # after the milestone


class TwoBN(torch.nn.Module):
    """conv -> BN -> relu -> conv -> BN -> relu -> pool -> linear, calibrated on toy data."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.c1, self.b1 = torch.nn.Conv2d(C, 6, 3, padding=1), torch.nn.BatchNorm2d(6)
        self.c2, self.b2 = torch.nn.Conv2d(6, 5, 3, padding=1), torch.nn.BatchNorm2d(5)
        self.fc = torch.nn.Linear(5, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b2(self.c2(self.b1(self.c1(x)).relu())).relu()
        return self.fc(h.mean(dim=(2, 3)))


def test_sre2l_loss_and_gradient_equal_a_direct_reference(data, monkeypatch) -> None:
    """With the augmentation switched off, the recover loss of each ipc batch (j-th image of
    each class) is CE + lambda (10 |mu_1 - rm_1| + |var_1 - rv_1| + |mu_2 - rm_2| + ...)."""
    from ld3m.distill.objectives import sre2l

    monkeypatch.setattr(sre2l, "augment", lambda x, low, jitter, gen: x)
    teacher = calibrate(TwoBN(), data, batch=8, what="toy").double()
    images, labels = syn_set()
    cfg = make_cfg("sre2l")
    out = build("sre2l", data, None, cfg=cfg, teacher=teacher).image_grad(images, labels, None,
                                                                        rng())  # fmt: skip
    x_all, total = images.clone().requires_grad_(True), 0
    for j in range(IPC):
        x, y = x_all[j::IPC], labels[j::IPC]  # class-sorted: every IPC-th image
        h1 = teacher.c1(x)
        h2 = teacher.c2(teacher.b1(h1).relu())
        stats = 0
        for w, h, bn in ((10.0, h1, teacher.b1), (1.0, h2, teacher.b2)):
            mu, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)
            stats = stats + w * ((mu - bn.running_mean).norm() + (var - bn.running_var).norm())
        total = total + F.cross_entropy(teacher(x), y) + 0.01 * stats
    assert out.loss == pytest.approx(float(total.detach()), rel=1e-10)
    torch.testing.assert_close(out.grad, torch.autograd.grad(total, x_all)[0])


def test_sre2l_augmentation_is_a_shared_seeded_crop_flip_roll() -> None:
    from ld3m.distill.objectives.sre2l import augment, crop_box

    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float64).reshape(2, 1, 8, 8)
    a, b = augment(x, 0.08, 2, rng(1)), augment(x, 0.08, 2, rng(1))
    assert torch.equal(a, b) and a.shape == x.shape
    boxes = [crop_box(32, 0.5, rng(s)) for s in range(50)]
    assert all(0.5 * 1024 * 0.9 <= h * w <= 1024 and t + h <= 32 and left + w <= 32
               for t, left, h, w in boxes)  # fmt: skip
    assert len(set(boxes)) > 10
    # Whole-image crops and no jitter: the output is x or its mirror image.
    whole = augment(x, 1.0, 0, rng(2))
    assert torch.equal(whole, x) or torch.equal(whole, x.flip(-1))
