"""CompVis latent-diffusion state-dict names and shapes, and their diffusers names.

Generated from the diffusers configs by walking the CompVis module structure: openaimodel.UNetModel
(ResBlock, SpatialTransformer, Downsample `op`, Upsample `conv`), taming Encoder/Decoder/
VectorQuantizer, ClassEmbedder and the DDPM schedule buffers. `compvis_key_shapes` lists a
checkpoint's keys; `unet_leaves`/`vq_leaves` pair each CompVis name with its diffusers name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from ld3m.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VQ_PREFIX = "first_stage_model."
CLASS_KEY = "cond_stage_model.embedding.weight"
SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)  # fmt: skip


class Leaf(NamedTuple):
    """One tensor: CompVis name, diffusers name, CompVis shape, squeeze 1x1 conv -> Linear."""

    src: str
    dst: str
    shape: tuple[int, ...]
    squeeze: bool = False


# ---------------------------------------------------------------- CompVis modules, leaf by leaf


def _conv(src: str, dst: str, cin: int, cout: int, k: int = 3, squeeze: bool = False) -> list[Leaf]:
    return [
        Leaf(f"{src}.weight", f"{dst}.weight", (cout, cin, k, k), squeeze),
        Leaf(f"{src}.bias", f"{dst}.bias", (cout,)),
    ]


def _linear(src: str, dst: str, cin: int, cout: int, bias: bool = True) -> list[Leaf]:
    weight = [Leaf(f"{src}.weight", f"{dst}.weight", (cout, cin))]
    return weight + ([Leaf(f"{src}.bias", f"{dst}.bias", (cout,))] if bias else [])


def _norm(src: str, dst: str, c: int) -> list[Leaf]:
    return [Leaf(f"{src}.weight", f"{dst}.weight", (c,)), Leaf(f"{src}.bias", f"{dst}.bias", (c,))]


def _resblock(src: str, dst: str, cin: int, cout: int, emb: int) -> list[Leaf]:
    """openaimodel.ResBlock (no scale-shift norm) -> diffusers ResnetBlock2D."""
    leaves = (
        _norm(f"{src}.in_layers.0", f"{dst}.norm1", cin)
        + _conv(f"{src}.in_layers.2", f"{dst}.conv1", cin, cout)
        + _linear(f"{src}.emb_layers.1", f"{dst}.time_emb_proj", emb, cout)
        + _norm(f"{src}.out_layers.0", f"{dst}.norm2", cout)
        + _conv(f"{src}.out_layers.3", f"{dst}.conv2", cout, cout)
    )
    if cin != cout:
        leaves += _conv(f"{src}.skip_connection", f"{dst}.conv_shortcut", cin, cout, k=1)
    return leaves


def _attention(src: str, dst: str, c: int, kv_dim: int) -> list[Leaf]:
    return (
        _linear(f"{src}.to_q", f"{dst}.to_q", c, c, bias=False)
        + _linear(f"{src}.to_k", f"{dst}.to_k", kv_dim, c, bias=False)
        + _linear(f"{src}.to_v", f"{dst}.to_v", kv_dim, c, bias=False)
        + _linear(f"{src}.to_out.0", f"{dst}.to_out.0", c, c)
    )


def _transformer(src: str, dst: str, c: int, context: int, depth: int) -> list[Leaf]:
    """attention.SpatialTransformer (conv projections) -> diffusers Transformer2DModel."""
    leaves = _norm(f"{src}.norm", f"{dst}.norm", c) + _conv(
        f"{src}.proj_in", f"{dst}.proj_in", c, c, k=1
    )
    for d in range(depth):
        s, t = f"{src}.transformer_blocks.{d}", f"{dst}.transformer_blocks.{d}"
        leaves += _attention(f"{s}.attn1", f"{t}.attn1", c, c)
        leaves += _linear(f"{s}.ff.net.0.proj", f"{t}.ff.net.0.proj", c, 8 * c)  # GEGLU
        leaves += _linear(f"{s}.ff.net.2", f"{t}.ff.net.2", 4 * c, c)
        leaves += _attention(f"{s}.attn2", f"{t}.attn2", c, context)
        for n in (1, 2, 3):
            leaves += _norm(f"{s}.norm{n}", f"{t}.norm{n}", c)
    return leaves + _conv(f"{src}.proj_out", f"{dst}.proj_out", c, c, k=1)


def _vq_resblock(src: str, dst: str, cin: int, cout: int) -> list[Leaf]:
    """taming ResnetBlock (no time embedding) -> diffusers ResnetBlock2D."""
    leaves = (
        _norm(f"{src}.norm1", f"{dst}.norm1", cin)
        + _conv(f"{src}.conv1", f"{dst}.conv1", cin, cout)
        + _norm(f"{src}.norm2", f"{dst}.norm2", cout)
        + _conv(f"{src}.conv2", f"{dst}.conv2", cout, cout)
    )
    if cin != cout:
        leaves += _conv(f"{src}.nin_shortcut", f"{dst}.conv_shortcut", cin, cout, k=1)
    return leaves


def _vq_attention(src: str, dst: str, c: int) -> list[Leaf]:
    """taming AttnBlock (1x1 conv q/k/v/proj_out) -> diffusers Attention (Linear)."""
    leaves = _norm(f"{src}.norm", f"{dst}.group_norm", c)
    for s, t in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        leaves += _conv(f"{src}.{s}", f"{dst}.{t}", c, c, k=1, squeeze=True)
    return leaves


# ---------------------------------------------------------------- whole models


def unet_leaves(cfg: Mapping[str, Any]) -> list[Leaf]:
    """openaimodel.UNetModel (spatial transformer, class context) <-> UNet2DConditionModel."""
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise CheckpointError(f"unet mid_block_type {cfg['mid_block_type']} has no CompVis form")
    chans, emb = list(cfg["block_out_channels"]), 4 * cfg["block_out_channels"][0]
    leaves = _linear("time_embed.0", "time_embedding.linear_1", chans[0], emb)
    leaves += _linear("time_embed.2", "time_embedding.linear_2", emb, emb)
    leaves += _conv("input_blocks.0.0", "conv_in", cfg["in_channels"], chans[0])
    down, skips = _unet_down(cfg, emb)
    ch, context = chans[-1], int(cfg["cross_attention_dim"])
    depth = _depth(cfg)
    leaves += down + _resblock("middle_block.0", "mid_block.resnets.0", ch, ch, emb)
    leaves += _transformer("middle_block.1", "mid_block.attentions.0", ch, context, depth)
    leaves += _resblock("middle_block.2", "mid_block.resnets.1", ch, ch, emb)
    leaves += _unet_up(cfg, emb, skips)
    ch, out = chans[0], cfg["out_channels"]
    return leaves + _norm("out.0", "conv_norm_out", ch) + _conv("out.2", "conv_out", ch, out)


def _depth(cfg: Mapping[str, Any]) -> int:
    depth = cfg.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        raise CheckpointError("per-level transformer depths have no CompVis form; use one int")
    return depth


def _unet_down(cfg: Mapping[str, Any], emb: int) -> tuple[list[Leaf], list[int]]:
    """input_blocks 1.. -> down_blocks; also the skip channels the output blocks consume."""
    chans, nrb = list(cfg["block_out_channels"]), int(cfg["layers_per_block"])
    attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    context, depth = int(cfg["cross_attention_dim"]), _depth(cfg)
    leaves, ch, skips, idx = [], chans[0], [chans[0]], 1
    for lvl, cout in enumerate(chans):
        d = f"down_blocks.{lvl}"
        for j in range(nrb):
            s = f"input_blocks.{idx}"
            leaves += _resblock(f"{s}.0", f"{d}.resnets.{j}", ch, cout, emb)
            ch = cout
            if attn[lvl]:
                leaves += _transformer(f"{s}.1", f"{d}.attentions.{j}", ch, context, depth)
            skips, idx = [*skips, ch], idx + 1
        if lvl != len(chans) - 1:
            leaves += _conv(f"input_blocks.{idx}.0.op", f"{d}.downsamplers.0.conv", ch, ch)
            skips, idx = [*skips, ch], idx + 1
    return leaves, skips


def _unet_up(cfg: Mapping[str, Any], emb: int, skips: list[int]) -> list[Leaf]:
    """output_blocks -> up_blocks (deepest level first); each ResBlock eats one skip."""
    chans, nrb = list(cfg["block_out_channels"]), int(cfg["layers_per_block"])
    attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    context, depth = int(cfg["cross_attention_dim"]), _depth(cfg)
    leaves, ch, skips, idx, last = [], chans[-1], list(skips), 0, len(chans) - 1
    for lvl in reversed(range(len(chans))):
        d = f"up_blocks.{last - lvl}"
        for i in range(nrb + 1):
            s, sub = f"output_blocks.{idx}", 1
            leaves += _resblock(f"{s}.0", f"{d}.resnets.{i}", ch + skips.pop(), chans[lvl], emb)
            ch = chans[lvl]
            if attn[lvl]:
                leaves += _transformer(f"{s}.1", f"{d}.attentions.{i}", ch, context, depth)
                sub = 2
            if lvl and i == nrb:
                leaves += _conv(f"{s}.{sub}.conv", f"{d}.upsamplers.0.conv", ch, ch)
            idx += 1
    return leaves


def vq_leaves(cfg: Mapping[str, Any]) -> list[Leaf]:
    """taming VQModel (no attention inside levels) <-> diffusers VQModel."""
    z, e = int(cfg["latent_channels"]), int(cfg.get("vq_embed_dim") or cfg["latent_channels"])
    leaves = _vq_encoder(cfg) + _vq_decoder(cfg)
    codes = "quantize.embedding.weight"
    leaves.append(Leaf(codes, codes, (cfg["num_vq_embeddings"], e)))
    leaves += _conv("quant_conv", "quant_conv", z, e, k=1)
    return leaves + _conv("post_quant_conv", "post_quant_conv", e, z, k=1)


def _vq_encoder(cfg: Mapping[str, Any]) -> list[Leaf]:
    chans, nrb = list(cfg["block_out_channels"]), int(cfg["layers_per_block"])
    ch = chans[0]
    leaves = _conv("encoder.conv_in", "encoder.conv_in", cfg["in_channels"], ch)
    for i, cout in enumerate(chans):
        s, d = f"encoder.down.{i}", f"encoder.down_blocks.{i}"
        for j in range(nrb):
            leaves += _vq_resblock(f"{s}.block.{j}", f"{d}.resnets.{j}", ch, cout)
            ch = cout
        if i != len(chans) - 1:
            leaves += _conv(f"{s}.downsample.conv", f"{d}.downsamplers.0.conv", ch, ch)
    leaves += _vq_mid("encoder", ch) + _norm("encoder.norm_out", "encoder.conv_norm_out", ch)
    return leaves + _conv("encoder.conv_out", "encoder.conv_out", ch, cfg["latent_channels"])


def _vq_decoder(cfg: Mapping[str, Any]) -> list[Leaf]:
    """taming decoder.up.{i} is diffusers decoder.up_blocks.{last - i} (up.0 = full resolution)."""
    chans, nrb = list(cfg["block_out_channels"]), int(cfg["layers_per_block"])
    last = len(chans) - 1
    leaves = _conv("decoder.conv_in", "decoder.conv_in", cfg["latent_channels"], chans[-1])
    leaves += _vq_mid("decoder", chans[-1])
    for i, cout in enumerate(chans):
        s, d, cin = f"decoder.up.{i}", f"decoder.up_blocks.{last - i}", chans[min(i + 1, last)]
        for j in range(nrb + 1):
            leaves += _vq_resblock(f"{s}.block.{j}", f"{d}.resnets.{j}", cin, cout)
            cin = cout
        if i != 0:
            leaves += _conv(f"{s}.upsample.conv", f"{d}.upsamplers.0.conv", cout, cout)
    leaves += _norm("decoder.norm_out", "decoder.conv_norm_out", chans[0])
    return leaves + _conv("decoder.conv_out", "decoder.conv_out", chans[0], cfg["out_channels"])


def _vq_mid(part: str, c: int) -> list[Leaf]:
    src, dst = f"{part}.mid", f"{part}.mid_block"
    return (
        _vq_resblock(f"{src}.block_1", f"{dst}.resnets.0", c, c)
        + _vq_attention(f"{src}.attn_1", f"{dst}.attentions.0", c)
        + _vq_resblock(f"{src}.block_2", f"{dst}.resnets.1", c, c)
    )


def compvis_key_shapes(
    unet_cfg: Mapping[str, Any],
    vq_cfg: Mapping[str, Any],
    num_classes_plus_null: int,
    context_dim: int,
    num_timesteps: int = 1000,
) -> dict[str, tuple[int, ...]]:
    """Every key and shape of a CompVis LatentDiffusion state dict, in state_dict order."""
    shapes = {key: (num_timesteps,) for key in SCHEDULE_KEYS}
    shapes |= {UNET_PREFIX + leaf.src: leaf.shape for leaf in unet_leaves(unet_cfg)}
    shapes |= {VQ_PREFIX + leaf.src: leaf.shape for leaf in vq_leaves(vq_cfg)}
    shapes[CLASS_KEY] = (num_classes_plus_null, context_dim)
    return shapes
