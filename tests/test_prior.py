"""Prior layout: save, validate, load; malformed directories give the promised error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ld3m.errors import PriorLayoutError
from ld3m.prior.model import load_prior


def test_saved_prior_loads_frozen_and_runs(tiny_prior_dir: Path) -> None:
    prior = load_prior(tiny_prior_dir)
    assert not prior.unet.training and not prior.vae.training
    assert all(not p.requires_grad for p in prior.unet.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = prior.encode(x)
    assert z.shape == (2, 3, 4, 4)
    eps = prior.unet(z, 10, encoder_hidden_states=prior.embed(torch.tensor([0, 2]))).sample
    assert eps.shape == z.shape
    assert prior.decode(z).shape == x.shape
    assert prior.null_context(2).shape == (2, 1, 8)


def test_quantize_is_straight_through(tiny_prior_dir: Path) -> None:
    prior = load_prior(tiny_prior_dir)
    z = torch.randn(1, 3, 4, 4, requires_grad=True)
    q = prior.quantize(z)
    codebook = prior.vae.quantize.embedding.weight
    rows = q.detach().permute(0, 2, 3, 1).reshape(-1, 1, 3)
    assert torch.isclose(rows, codebook[None], atol=1e-6).all(-1).any(-1).all()  # codebook rows
    q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # identity gradient
    assert not torch.equal(q, z)


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda root: (root / "prior.json").unlink(), ["missing prior.json", "ld3m prior convert"]),
        (lambda root: shutil.rmtree(root / "unet"), ["missing unet/config.json"]),
        (lambda root: next((root / "vae").glob("*.safetensors")).unlink(), ["vae/ weights"]),
        (lambda root: (root / "class_embeddings.safetensors").unlink(), ["class_embeddings"]),
        (lambda root: (root / "prior.json").write_text("{oops"), ["prior.json is unreadable"]),
        (
            lambda root: (root / "class_embeddings.safetensors").write_bytes(b"junk"),
            ["cannot be loaded"],
        ),
    ],
)
def test_malformed_prior_dir_is_one_line_error(tiny_prior_dir: Path, damage, words) -> None:
    damage(tiny_prior_dir)
    with pytest.raises(PriorLayoutError) as info:
        load_prior(tiny_prior_dir)
    message = str(info.value)
    assert "\n" not in message and "ld3m prior train" in message
    for word in words:
        assert word in message


def test_inconsistent_spec_is_reported(tiny_prior_dir: Path) -> None:
    spec = json.loads((tiny_prior_dir / "prior.json").read_text())
    spec["num_classes"] = 7
    spec["null_class"] = 7
    (tiny_prior_dir / "prior.json").write_text(json.dumps(spec))
    with pytest.raises(PriorLayoutError, match=r"class table .* needs 8 rows"):
        load_prior(tiny_prior_dir)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(PriorLayoutError, match="not a directory"):
        load_prior(tmp_path / "nowhere")
