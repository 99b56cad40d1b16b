"""HeLlO's CLIP label projector on a tiny randomly initialised CLIP built here (offline)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ld3m.config.io import load_config
from ld3m.errors import ConfigError
from ld3m.evaluate.hello import (
    build_projector,
    class_text_embeddings,
    load_clip,
    load_projector,
    train_projector,
    weak_teacher_logits,
)
from ld3m.evaluate.train_eval import Labels, TrainData, train_and_test
from tests.test_distill import tiny_experts, toy_data


def make_tiny_clip(folder: Path) -> Path:
    """A 1-layer CLIP (16-d, 32 px, 8 px patches) and a character-level tokenizer, saved with
    transformers like a real checkpoint."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    text = dict(vocab_size=54, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=52,
                eos_token_id=53, pad_token_id=53)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)
              ).save_pretrained(folder)  # fmt: skip
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def hello_cfg(tmp_path: Path, clip: Path, *extra: str):
    return load_config(None, [f"hello.clip={clip}", "hello.encoder_rank=2", "hello.head_rank=2",
                              "hello.steps=30", "hello.batch=12", "hello.lr=0.01",
                              "run.progress=off", *extra])  # fmt: skip


def test_projector_starts_as_clips_zero_shot_classifier(clip_dir: Path, tmp_path: Path) -> None:
    data = toy_data()
    cfg = hello_cfg(tmp_path, clip_dir)
    projector = build_projector(cfg.hello, data.info)
    clip, tokenizer = load_clip(clip_dir)
    text = class_text_embeddings(clip, tokenizer, data.info.class_names, cfg.hello.template)
    x, _ = data.train_tensors()
    pixels = projector.clip_input(x[:4])
    with torch.no_grad():
        feats = clip.get_image_features(pixel_values=pixels)  # an output object in transformers 5
    image = F.normalize(getattr(feats, "pooler_output", feats), dim=-1)
    expected = clip.logit_scale.exp() * image @ text.T
    torch.testing.assert_close(projector(x[:4]), expected, rtol=1e-4, atol=1e-5)
    trainable = {n for n, p in projector.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(n.startswith("head.") for n in trainable)  # W gets its own low-rank update
    assert any("q_proj" in n for n in trainable)  # ... and so does the image encoder


def test_training_lowers_its_loss_and_the_saved_projector_round_trips(
    clip_dir: Path, tmp_path: Path
) -> None:
    data = toy_data()
    cfg = hello_cfg(tmp_path, clip_dir, f"experts.dir={tiny_experts(tmp_path, data)}")
    x, y = data.train_tensors()
    teachers = weak_teacher_logits(cfg, data)

    def loss(p: torch.nn.Module) -> float:
        with torch.no_grad():
            out = p(x)
            return float(F.mse_loss(out, teachers(x)) + F.cross_entropy(out, y))

    before = loss(build_projector(cfg.hello, data.info))
    path = train_projector(cfg, data, tmp_path / "projector")
    loaded = load_projector(path.parent, data.info)
    assert loss(loaded) < 0.8 * before
    again = load_projector(path.parent, data.info)
    torch.testing.assert_close(loaded(x[:5]), again(x[:5]))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_projector_labels_train_the_student_online(clip_dir: Path, tmp_path: Path) -> None:
    """Evaluation with labels=projector: the student regresses the projector's outputs on every
    augmented batch (+ beta CE); hard labels alone give another network."""
    data = toy_data()
    projector = build_projector(hello_cfg(tmp_path, clip_dir).hello, data.info).eval()
    x, y = data.train_tensors()
    logits = torch.randn(len(y), 3)
    loss = Labels(projector=lambda b: logits, ce_weight=0.5)(lambda b: logits + 1, x, y)
    torch.testing.assert_close(loss, 1.0 + 0.5 * F.cross_entropy(logits + 1, y))
    tensors = TrainData(x[:6], y[:6], x, y, num_classes=3)
    cfg = dataclasses.replace(load_config(None, []).eval, epochs=3, dsa=True)
    online = train_and_test("ConvNetD3", tensors, cfg, 0.01, 0, labels=Labels(projector=projector))
    hard = train_and_test("ConvNetD3", tensors, cfg, 0.01, 0)
    assert online.train_acc != hard.train_acc or online.acc != hard.acc


def test_missing_or_wrong_checkpoints_are_one_line_errors(clip_dir: Path, tmp_path: Path) -> None:
    data = toy_data()
    with pytest.raises(ConfigError, match=r"no CLIP checkpoint at .*hello\.clip"):
        build_projector(load_config(None, []).hello, data.info)
    with pytest.raises(ConfigError, match="no CLIP checkpoint"):
        load_clip(tmp_path / "absent")
    with pytest.raises(ConfigError, match="no HeLlO projector"):
        load_projector(tmp_path / "nothing", data.info)
    with pytest.raises(ConfigError, match="weak teachers"):
        weak_teacher_logits(hello_cfg(tmp_path, clip_dir), data)


def test_a_sweep_trains_the_projector_once_and_labels_every_evaluation(
    clip_dir: Path, tmp_path: Path, capsys
) -> None:
    """eval.labels=projector in a sweep: experts (weak teachers) -> one projector -> every set
    evaluated with HeLlO labels -> `+projector` rows."""
    from ld3m.cli import main
    from ld3m.hpc.submit import submit_sweep
    from tests.test_sweep import tiny_overrides, write_sweep

    overrides = [*tiny_overrides(tmp_path), "eval.labels=projector", f"hello.clip={clip_dir}",
                 "hello.encoder_rank=2", "hello.head_rank=2", "hello.steps=3",
                 "hello.batch=4"]  # fmt: skip
    path = write_sweep(tmp_path, overrides=overrides, grid={"distill.objective": ["dm"]},
                       eval={"archs": ["ConvNetD3"], "seeds": [0]})  # fmt: skip
    root = submit_sweep(path, "debug")
    projectors = list((root / "projectors").glob("*/projector.safetensors"))
    assert len(projectors) == 1
    manifest = json.loads((root / "manifest.json").read_text())
    assert len(manifest["tasks"]["hello"]) == 1
    records = [json.loads(line) for run in manifest["runs"]
               for line in (Path(run["dir"]) / "eval.jsonl").read_text().splitlines()]  # fmt: skip
    assert len(records) == 2 and {r["labels"] for r in records} == {"projector"}
    assert {r["projector"] for r in records} == {str(projectors[0].parent)}
    assert main(["table", str(root)]) == 0
    out = capsys.readouterr().out
    assert "pixel_dm+projector" in out and "random_real+projector" in out
