"""`ld3m prior convert`: CompVis names and shapes, mapping, file handling, and block numerics."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ld3m.errors import CheckpointError, Ld3mError
from ld3m.prior.architectures import (
    CIN256_UNET,
    CIN256_VQ,
    build_unet,
    build_vq,
    cin256_spec,
    unet_config,
    vq_config,
)
from ld3m.prior.convert import (
    check_shapes,
    compvis_key_shapes,
    compvis_to_diffusers,
    convert_checkpoint,
)
from ld3m.prior.layout import PriorSpec
from ld3m.prior.model import Prior, load_prior
from tests.conftest import SHARED

U, V = "model.diffusion_model.", "first_stage_model."
# Same structure as cin256-v2 (4 UNet levels, attention at 1-3, 2 res blocks, 3 VQ levels,
# 32 norm groups), tiny widths.
TINY_UNET = unet_config((32, 64, 96, 160), (False, True, True, True), cross_attention_dim=16,
                        latent_channels=3, sample_size=8)  # fmt: skip
TINY_VQ = vq_config((32, 32, 64), latent_channels=3, num_embeddings=16, sample_size=32)
TINY_SPEC = PriorSpec(num_classes=10, null_class=10, image_size=32, channels=3, latent_channels=3,
                      latent_size=8, autoencoder="vq")  # fmt: skip


def released_keys() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released cin256-v2 model.ckpt, from ../shared/notes."""
    path = SHARED / "notes" / "cin256-v2-keys.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not found: this test needs the shared notes beside the checkout")
    rows = [line.split("\t") for line in path.read_text().splitlines() if line[:1] != "#"]
    return {k: tuple(int(x) for x in s.strip("[]").split(", ")) for k, s, _ in rows[1:]}


def tiny_state(betas: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Random CompVis-named tensors for the tiny config, with a consistent DDPM schedule."""
    g = torch.Generator().manual_seed(0)
    shapes = compvis_key_shapes(TINY_UNET, TINY_VQ, 11, 16)
    state = {k: 0.2 * torch.randn(s, generator=g) for k, s in shapes.items()}
    if betas is None:
        betas = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2
    state["betas"] = betas.float()
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    return state


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Prior]:
    state = tiny_state()
    ckpt = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save({"state_dict": state, "global_step": torch.tensor(7)}, ckpt)
    out = convert_checkpoint(ckpt, ckpt.parent / "prior", unet_cfg=TINY_UNET, vq_cfg=TINY_VQ,
                             spec=TINY_SPEC)  # fmt: skip
    return state, ckpt, load_prior(out)


def meta_targets(unet_cfg: dict, vq_cfg: dict) -> tuple[dict, dict]:
    shapes = [{k: tuple(t.shape) for k, t in m.state_dict().items()}
              for m in (build_unet(unet_cfg, "meta"), build_vq(vq_cfg, "meta"))]  # fmt: skip
    return shapes[0], shapes[1]


# ---------------------------------------------------------------- names and shapes


def test_key_shapes_reproduce_released_checkpoint() -> None:
    expected = released_keys()
    got = compvis_key_shapes(CIN256_UNET, CIN256_VQ, 1001, 512)
    assert len(got) == 906
    assert got == expected
    assert list(got) == list(expected)  # even the state_dict order


@pytest.mark.parametrize("source", ["released", "derived-small"])
def test_mapping_lands_on_every_diffusers_key(source: str) -> None:
    if source == "released":
        shapes, unet_cfg, vq_cfg, spec = released_keys(), CIN256_UNET, CIN256_VQ, cin256_spec()
    else:  # another structure entirely: 2 UNet levels, 1 res block, 4 groups
        unet_cfg = unet_config((8, 16), (False, True), 8, 3, 4, layers_per_block=1,
                               norm_num_groups=4)  # fmt: skip
        vq_cfg = vq_config((8, 8, 16), 3, 16, 16, layers_per_block=1, norm_num_groups=4)
        shapes = compvis_key_shapes(unet_cfg, vq_cfg, 4, 8)
        spec = dataclasses.replace(TINY_SPEC, num_classes=3, null_class=3)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    weights = compvis_to_diffusers(state, unet_cfg, vq_cfg)
    unet_target, vae_target = meta_targets(unet_cfg, vq_cfg)
    assert {k: tuple(t.shape) for k, t in weights.unet.items()} == unet_target
    assert {k: tuple(t.shape) for k, t in weights.vae.items()} == vae_target
    assert len(weights.schedule) == 12
    check_shapes(weights, unet_cfg, vq_cfg, spec)


def test_unknown_and_missing_keys_are_named() -> None:
    state = tiny_state()
    with pytest.raises(CheckpointError, match=r"1 unknown keys \(model\.diffusion_model\.extra"):
        compvis_to_diffusers({**state, U + "extra.weight": torch.zeros(1)}, TINY_UNET, TINY_VQ)
    del state[V + "decoder.up.1.upsample.conv.weight"]
    with pytest.raises(CheckpointError, match=r"1 expected keys \(first_stage_model\.decoder\.up"):
        compvis_to_diffusers(state, TINY_UNET, TINY_VQ)
    state = tiny_state()
    state[V + "quant_conv.weight"] = torch.zeros(4, 3, 1, 1)
    weights = compvis_to_diffusers(state, TINY_UNET, TINY_VQ)
    with pytest.raises(CheckpointError, match=r"quant_conv.weight is \(4, 3, 1, 1\)"):
        check_shapes(weights, TINY_UNET, TINY_VQ, TINY_SPEC)


# ---------------------------------------------------------------- a converted tiny checkpoint


def test_tiny_checkpoint_converts_and_runs(converted: tuple[dict, Path, Prior]) -> None:
    _, ckpt, prior = converted
    assert prior.spec.source == str(ckpt) and prior.spec.null_class == 10
    assert not (ckpt.parent / "prior.tmp").exists()
    torch.manual_seed(0)
    latents, classes = torch.randn(2, 3, 8, 8), torch.tensor([3, 10])
    with torch.no_grad():
        eps = prior.unet(latents, torch.tensor([10, 500]), prior.embed(classes)).sample
        images = prior.decode(latents)
    assert eps.shape == (2, 3, 8, 8) and torch.isfinite(eps).all()
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_every_tensor_landed(converted: tuple[dict, Path, Prior]) -> None:
    state, _, prior = converted
    vae, unet = prior.vae, prior.unet
    attn = vae.encoder.mid_block.attentions[0]
    assert torch.equal(attn.to_q.weight, state[V + "encoder.mid.attn_1.q.weight"][:, :, 0, 0])
    assert torch.equal(attn.to_out[0].bias, state[V + "encoder.mid.attn_1.proj_out.bias"])
    assert torch.equal(vae.decoder.up_blocks[0].resnets[0].conv1.weight,
                       state[V + "decoder.up.2.block.0.conv1.weight"])  # fmt: skip
    assert torch.equal(vae.decoder.up_blocks[2].resnets[2].conv2.bias,
                       state[V + "decoder.up.0.block.2.conv2.bias"])  # fmt: skip
    assert torch.equal(unet.up_blocks[0].upsamplers[0].conv.weight,
                       state[U + "output_blocks.2.2.conv.weight"])  # fmt: skip
    assert torch.equal(unet.up_blocks[2].upsamplers[0].conv.weight,
                       state[U + "output_blocks.8.2.conv.weight"])  # fmt: skip
    assert torch.equal(prior.class_embeddings, state["cond_stage_model.embedding.weight"])

    def fingerprints(tensors: list[torch.Tensor]) -> list[int]:
        return sorted(hash(t.detach().contiguous().numpy().tobytes()) for t in tensors)

    # by value, not by name: the converted tensors are exactly the CompVis ones, one to one
    source = [t for k, t in state.items() if k.startswith((U, V))]
    target = [*unet.state_dict().values(), *vae.state_dict().values()]
    assert fingerprints(source) == fingerprints(target)


# ---------------------------------------------------------------- numerics against CompVis code


def test_resblock_matches_compvis(converted: tuple[dict, Path, Prior]) -> None:
    """openaimodel.ResBlock written out by hand from the CompVis tensors (32 -> 64, 1x1 skip)."""
    state, _, prior = converted

    def p(name: str) -> torch.Tensor:
        return state[f"{U}input_blocks.4.0.{name}"]

    torch.manual_seed(1)
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 128)
    h = F.silu(F.group_norm(x, 32, p("in_layers.0.weight"), p("in_layers.0.bias")))
    h = F.conv2d(h, p("in_layers.2.weight"), p("in_layers.2.bias"), padding=1)
    h = h + F.linear(F.silu(emb), p("emb_layers.1.weight"), p("emb_layers.1.bias"))[..., None, None]
    h = F.silu(F.group_norm(h, 32, p("out_layers.0.weight"), p("out_layers.0.bias")))
    h = F.conv2d(h, p("out_layers.3.weight"), p("out_layers.3.bias"), padding=1)
    reference = F.conv2d(x, p("skip_connection.weight"), p("skip_connection.bias")) + h
    with torch.no_grad():
        got = prior.unet.down_blocks[1].resnets[0](x, emb)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)


def test_vq_attention_matches_taming(converted: tuple[dict, Path, Prior]) -> None:
    """taming AttnBlock: norm, 1x1 q/k/v, softmax(q^T k / sqrt(C)), proj_out, residual."""
    state, _, prior = converted

    def p(name: str) -> torch.Tensor:
        return state[f"{V}decoder.mid.attn_1.{name}"]

    torch.manual_seed(2)
    x = torch.randn(2, 64, 4, 4)
    h = F.group_norm(x, 32, p("norm.weight"), p("norm.bias"), eps=1e-6)
    q, k, v = (F.conv2d(h, p(f"{n}.weight"), p(f"{n}.bias")).flatten(2) for n in "qkv")
    w = torch.softmax(q.transpose(1, 2) @ k * 64**-0.5, dim=2)  # [B, hw_q, hw_k]
    h = (v @ w.transpose(1, 2)).reshape(x.shape)
    reference = x + F.conv2d(h, p("proj_out.weight"), p("proj_out.bias"))
    with torch.no_grad():
        got = prior.vae.decoder.mid_block.attentions[0](x)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)


def test_time_embedding_and_transformer_match_compvis(converted: tuple[dict, Path, Prior]) -> None:
    """timestep_embedding + time_embed MLP, and a SpatialTransformer with class cross-attention."""
    state, _, prior = converted
    unet, t = prior.unet, torch.tensor([0, 17, 999])
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(16) / 16)
    args = t[:, None].float() * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    emb = F.linear(emb, state[U + "time_embed.0.weight"], state[U + "time_embed.0.bias"])
    emb = F.linear(F.silu(emb), state[U + "time_embed.2.weight"], state[U + "time_embed.2.bias"])
    with torch.no_grad():
        got = unet.time_embedding(unet.time_proj(t))
    torch.testing.assert_close(got, emb, rtol=1e-4, atol=1e-5)

    def p(name: str) -> torch.Tensor:
        return state[f"{U}input_blocks.4.1.{name}"]

    def attend(x: torch.Tensor, ctx: torch.Tensor, a: str) -> torch.Tensor:
        q, k, v = (z @ p(f"transformer_blocks.0.{a}.to_{n}.weight").T
                   for z, n in ((x, "q"), (ctx, "k"), (ctx, "v")))  # fmt: skip
        out = torch.softmax(q @ k.transpose(1, 2) * 64**-0.5, dim=-1) @ v
        return F.linear(out, p(f"transformer_blocks.0.{a}.to_out.0.weight"),
                        p(f"transformer_blocks.0.{a}.to_out.0.bias"))  # fmt: skip

    def ln(x: torch.Tensor, i: int) -> torch.Tensor:
        w, b = p(f"transformer_blocks.0.norm{i}.weight"), p(f"transformer_blocks.0.norm{i}.bias")
        return F.layer_norm(x, (64,), w, b)

    torch.manual_seed(3)
    x, ctx = torch.randn(2, 64, 4, 4), prior.embed(torch.tensor([1, 10]))
    h = F.group_norm(x, 32, p("norm.weight"), p("norm.bias"), eps=1e-6)
    h = F.conv2d(h, p("proj_in.weight"), p("proj_in.bias")).flatten(2).transpose(1, 2)
    h = attend(ln(h, 1), ln(h, 1), "attn1") + h
    h = attend(ln(h, 2), ctx, "attn2") + h
    a, gate = F.linear(ln(h, 3), p("transformer_blocks.0.ff.net.0.proj.weight"),
                       p("transformer_blocks.0.ff.net.0.proj.bias")).chunk(2, dim=-1)  # fmt: skip
    h = F.linear(a * F.gelu(gate), p("transformer_blocks.0.ff.net.2.weight"),
                 p("transformer_blocks.0.ff.net.2.bias")) + h  # fmt: skip
    h = h.transpose(1, 2).reshape(x.shape)
    reference = F.conv2d(h, p("proj_out.weight"), p("proj_out.bias")) + x
    with torch.no_grad():
        got = unet.down_blocks[1].attentions[0](x, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- files and refusals


def convert(ckpt: Path, out: Path, **kwargs: bool) -> Path:
    return convert_checkpoint(ckpt, out, unet_cfg=TINY_UNET, vq_cfg=TINY_VQ, spec=TINY_SPEC,
                              **kwargs)  # fmt: skip


def test_wrong_schedule_is_rejected_and_nothing_is_written(tmp_path: Path) -> None:
    ckpt = tmp_path / "linear.ckpt"
    linear = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.save({"state_dict": tiny_state(linear)}, ckpt)
    with pytest.raises(CheckpointError, match="betas differ from the prior spec") as info:
        convert(ckpt, tmp_path / "prior")
    assert "\n" not in str(info.value) and str(ckpt) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear.ckpt"]


def test_unreadable_files_give_one_line(tmp_path: Path) -> None:
    for name, data in (("bad.ckpt", b"not a checkpoint"), ("bad.safetensors", b"\x00" * 64)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=r"is unreadable \(.+\); re-download it") as info:
            convert(tmp_path / name, tmp_path / "prior")
        assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="not found"):
        convert(tmp_path / "absent.ckpt", tmp_path / "prior")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        convert(tmp_path / "list.pt", tmp_path / "prior")


def test_pickled_objects_need_trust_and_safetensors_work(tmp_path: Path) -> None:
    state = tiny_state()
    ckpt = tmp_path / "lightning.ckpt"
    lightning = {"state_dict": state, "hyper_parameters": argparse.Namespace(lr=1e-4)}
    torch.save(lightning, ckpt, _use_new_zipfile_serialization=False)  # legacy: no mmap
    with pytest.raises(
        CheckpointError,
        match=r"\(argparse.Namespace\) besides tensors; rerun with --trust-checkpoint",
    ):
        convert(ckpt, tmp_path / "a")
    assert load_prior(convert(ckpt, tmp_path / "a", trust_pickle=True)).spec.num_classes == 10
    save_file(state, str(tmp_path / "flat.safetensors"))
    prior = load_prior(convert(tmp_path / "flat.safetensors", tmp_path / "b"))
    assert torch.equal(prior.class_embeddings, state["cond_stage_model.embedding.weight"])


def test_existing_output_needs_force(converted: tuple[dict, Path, Prior], tmp_path: Path) -> None:
    _, ckpt, _ = converted
    out = tmp_path / "prior"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(Ld3mError, match="not empty; pass --force"):
        convert(ckpt, out)
    assert (out / "keep.txt").exists()
    convert(ckpt, out, force=True)
    assert not (out / "keep.txt").exists() and load_prior(out).spec.num_classes == 10


def test_cli_arguments() -> None:
    from ld3m.cli import make_parser

    args = make_parser().parse_args(
        ["prior", "convert", "model.ckpt", "priors/cin256", "--force", "--trust-checkpoint"]
    )
    assert (args.checkpoint, args.out, args.force, args.trust_checkpoint) == (
        "model.ckpt",
        "priors/cin256",
        True,
        True,
    )
    assert args.run.__name__ == "cmd_prior_convert"
