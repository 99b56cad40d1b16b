"""`ld3m prior train` on a tiny config: a loadable prior, falling losses, exact resume, a torn
checkpoint ignored, the sample grid in TensorBoard."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ld3m.cli import main
from ld3m.config.io import load_config
from ld3m.config.schema import Config
from ld3m.data.datasets import load_dataset
from ld3m.errors import ConfigError
from ld3m.jsonl import read_jsonl
from ld3m.paths import RunPaths
from ld3m.prior.model import load_prior
from ld3m.prior.quality import psnr, round_trip
from ld3m.prior.train import train_prior

TINY = [
    "data.res=16",
    "prior_train.ae_channels=[8,16]",
    "prior_train.latent_channels=2",
    "prior_train.ae_batch=16",
    "prior_train.unet_channels=[16,32]",
    "prior_train.unet_attention=[false,true]",
    "prior_train.norm_groups=8",
    "prior_train.context_dim=16",
    "prior_train.heads=2",
    "prior_train.unet_batch=32",
    "prior_train.warmup_steps=5",
    "prior_train.sample_steps=4",
    "prior_train.grid_per_class=3",
    "run.progress='off'",  # quoted: YAML reads a bare off as False
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


def tiny(out: Path, cache: Path, *extra: str) -> list[str]:
    """Overrides of a tiny run into `out`."""
    return [*TINY, f"run.out_dir={out}", f"data.cache_dir={cache}", *extra]


def tiny_config(out: Path, cache: Path, *extra: str) -> Config:
    return load_config(None, tiny(out, cache, *extra))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[Path, str]:
    """A complete tiny run through the command-line entry point; (run dir, printed output)."""
    out = tmp_path_factory.mktemp("run")
    extra = (
        "prior_train.ae_steps=30", "prior_train.unet_steps=30", "prior_train.log_every=1",
        "prior_train.save_every=10", "prior_train.quality_per_class=4",
        "prior_train.quality_epochs=1",
    )  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["prior", "train", *tiny(out, cache, *extra), "--no-resume"]) == 0
    return out, printed.getvalue()


def losses(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one tag in metrics.jsonl."""
    return [
        (r["step"], r["value"])
        for r in read_jsonl(RunPaths(run_dir).metrics_jsonl)
        if r["tag"] == tag
    ]


def test_run_writes_a_loadable_prior(full_run: tuple[Path, str]) -> None:
    out, printed = full_run
    assert printed.strip().splitlines()[-1] == str(out / "prior")
    assert "class consistency" in printed
    prior = load_prior(out / "prior")
    spec = prior.spec
    assert (spec.num_classes, spec.null_class, spec.image_size, spec.channels) == (10, 10, 16, 1)
    assert (spec.autoencoder, spec.latent_channels, spec.latent_size) == ("kl", 2, 8)
    assert spec.scale_factor > 0 and spec.class_names[3] == "3"
    assert 0 <= spec.extra["quality"]["quality/class_consistency"] <= 1
    z = prior.encode(torch.rand(2, 1, 16, 16) * 2 - 1)
    assert z.shape == (2, 2, 8, 8)
    eps = prior.unet(z, 500, encoder_hidden_states=prior.embed(torch.tensor([1, 2]))).sample
    assert eps.shape == z.shape and prior.decode(z).shape == (2, 1, 16, 16)
    assert prior.class_embeddings.shape == (11, 16)
    assert not (out / "prior.tmp").exists()


def test_losses_fall(full_run: tuple[Path, str]) -> None:
    out, _ = full_run
    for tag, steps in (("loss/autoencoder", 30), ("loss/unet", 30)):
        values = [v for _, v in losses(out, tag)]
        assert len(values) == steps
        first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
        assert last < 0.8 * first, (tag, first, last)


def test_sample_grid_and_quality_are_recorded(full_run: tuple[Path, str]) -> None:
    out, _ = full_run
    acc = EventAccumulator(str(RunPaths(out).tb), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    grid = acc.Images("samples")[-1]
    assert grid.step == 60
    assert (grid.width, grid.height) == (3 * 20, 10 * 20)  # 3 per class, one row per class
    assert (out / "samples.png").is_file()
    tags = {r["tag"] for r in read_jsonl(RunPaths(out).metrics_jsonl)}
    assert {
        "quality/class_consistency",
        "quality/real_test_acc",
        "quality/recon_psnr",
        "quality/recon_test_acc",
    } <= tags
    assert "autoencoder round trips of test images: PSNR" in full_run[1]


def test_psnr_of_known_errors() -> None:
    a = torch.full((2, 1, 4, 4), 100, dtype=torch.uint8)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 1) == pytest.approx(10 * math.log10(255**2), abs=1e-9)  # mse 1
    assert psnr(a, a + 10) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-9)


def test_round_trip_converts_pixels_exactly(full_run: tuple[Path, str], cache: Path) -> None:
    """With an identity autoencoder the round trip returns the uint8 images unchanged; the
    trained one returns images of the same shape that differ from them."""
    out, _ = full_run
    prior = load_prior(out / "prior")
    real = load_dataset(tiny_config(out, cache).data).test_images[:150]  # > one chunk
    trips = round_trip(prior, real)
    assert trips.shape == real.shape and trips.dtype == torch.uint8
    assert 0 < psnr(trips, real) < float("inf")
    prior.encode = prior.decode = lambda x: x  # type: ignore[method-assign]
    assert torch.equal(round_trip(prior, real), real)


def test_resume_equals_uninterrupted_run(tmp_path: Path, cache: Path) -> None:
    extra = ("prior_train.ae_steps=8", "prior_train.unet_steps=8", "prior_train.save_every=3",
             "prior_train.log_every=1", "prior_train.quality_per_class=0")  # fmt: skip
    whole = train_prior(tiny_config(tmp_path / "a", cache, *extra))
    b = tmp_path / "b"
    assert train_prior(tiny_config(b, cache, *extra), stop_after=5) is None  # in stage 1
    ckpt = RunPaths(b).ckpt
    (ckpt / "step_00000099.tmp").mkdir()  # torn: crashed before the rename
    (ckpt / "step_00000098").mkdir()  # torn: renamed, never marked
    (ckpt / "step_00000098" / "state.pt").write_bytes(b"garbage")
    assert train_prior(tiny_config(b, cache, *extra), stop_after=12) is None  # in stage 2
    resumed = train_prior(tiny_config(b, cache, *extra))
    assert whole is not None and resumed is not None
    weights = "diffusion_pytorch_model.safetensors"
    for part in (f"unet/{weights}", f"vae/{weights}", "class_embeddings.safetensors"):
        x, y = load_file(str(whole / part)), load_file(str(resumed / part))
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=1e-6)
    assert load_prior(whole).spec.scale_factor == load_prior(resumed).spec.scale_factor
    for tag, steps in (("loss/autoencoder", range(1, 9)), ("loss/unet", range(9, 17))):
        a_steps, a_values = zip(*losses(tmp_path / "a", tag), strict=True)
        b_steps, b_values = zip(*losses(b, tag), strict=True)  # each step recorded once
        assert a_steps == b_steps == tuple(steps)
        assert b_values == pytest.approx(a_values, abs=1e-6)


def test_resume_with_other_shapes_is_refused(tmp_path: Path, cache: Path) -> None:
    extra = (
        "prior_train.ae_steps=2",
        "prior_train.unet_steps=2",
        "prior_train.quality_per_class=0",
    )
    assert train_prior(tiny_config(tmp_path, cache, *extra), stop_after=1) is None
    with pytest.raises(ConfigError, match=r"prior_train.latent_channels.*--no-resume"):
        train_prior(tiny_config(tmp_path, cache, *extra, "prior_train.latent_channels=3"))


def test_sizes_that_do_not_divide_are_config_errors(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.res=18"):
        train_prior(tiny_config(tmp_path, cache, "data.res=18", "prior_train.ae_channels=[8,8,8]"))
