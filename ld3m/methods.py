"""Method labels (how a run's sets and table rows are named) and what a method needs."""

from __future__ import annotations

from ld3m.config.schema import Config


def method_name(cfg: Config) -> str:
    """The method label of a run's sets and table rows: `pixel_dm`, `ld3m_dcc`, `pixel_mtt_ast`
    (MTT with any of AST's options), `pixel_sre2l` or `pixel_cda` (with CDA's curriculum),
    and for LD3M with another skip mode than the released one
    `ld3m_dm_<skip>` (e.g. the autoencoder-only ablation `ld3m_dm_autoencoder`)."""
    d, skip = cfg.distill, cfg.generator.skip
    objective = d.objective + ("_ast" if uses_ast(cfg) else "")
    if d.objective == "sre2l" and d.sre2l.curriculum != "none":
        objective = "cda"  # SRe2L with CDA's crop curriculum
    if d.space == "pixel":
        return f"pixel_{objective}"
    return f"ld3m_{objective}" + ("" if skip == "released" else f"_{skip}")


def uses_ast(cfg: Config) -> bool:
    """MTT with any of AST's options: smooth experts (clipping loss, input-gradient penalty), a
    student with momentum, the balanced loss, intermediate matching, weight perturbation or the
    representative (k-means) initialisation."""
    d, m, e = cfg.distill, cfg.distill.mtt, cfg.experts
    options = (m.student_momentum, m.balanced_loss, m.intermediate != "off", m.perturb,
               d.init == "kmeans", e.loss_scale_epochs, e.grad_penalty)  # fmt: skip
    return d.objective == "mtt" and any(options)


EXPERT_OBJECTIVES = ("mtt", "sre2l")
"""Objectives that read an expert buffer: MTT's trajectories, SRe2L's teacher (expert 0)."""


def needs_experts(cfg: Config, kind: str = "distill") -> bool:
    """The run (a distillation, or a random-real `baseline`) reads experts.dir: its objective
    uses experts, its evaluation takes soft labels from a teacher without eval.teacher, or
    from a projector the sweep trains on weak expert teachers."""
    distills = kind == "distill" and cfg.distill.objective in EXPERT_OBJECTIVES
    return distills or labels_need_teacher(cfg) or needs_projector(cfg)


def labels_need_teacher(cfg: Config) -> bool:
    """The evaluation takes soft labels from the teacher of experts.dir (no eval.teacher)."""
    return cfg.eval.labels == "teacher" and not cfg.eval.teacher


def needs_projector(cfg: Config) -> bool:
    """The evaluation takes HeLlO labels from a projector the sweep trains (its weak teachers
    are the experts of experts.dir)."""
    return cfg.eval.labels == "projector" and not cfg.eval.projector
