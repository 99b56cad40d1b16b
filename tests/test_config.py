"""Config: YAML + dotted overrides, type checks, unknown keys, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ld3m.config.io import all_keys, load_config, preset_names, save_config
from ld3m.config.schema import Config
from ld3m.errors import ConfigError


def test_defaults_then_file_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("eval:\n  epochs: 50\n  runs: 3\ndata:\n  name: cifar10\n")
    cfg = load_config(f, ["eval.epochs=300", "eval.lr=0.01", "eval.archs=ConvNet,VGG11"])
    assert cfg.eval.epochs == 300  # override beats file
    assert cfg.eval.runs == 3  # file beats default
    assert cfg.data.name == "cifar10"
    assert cfg.eval.lr == 0.01
    assert cfg.eval.archs == ("ConvNet", "VGG11")
    assert cfg.baseline == Config().baseline  # untouched section keeps defaults


def test_on_off_overrides_stay_strings() -> None:
    assert load_config(None, ["run.progress=off"]).run.progress == "off"
    assert load_config(None, ["run.progress=on"]).run.progress == "on"


def test_int_is_accepted_for_float_and_null_for_optional() -> None:
    cfg = load_config(None, ["eval.lr=1", "eval.ema_decay=null"])
    assert cfg.eval.lr == 1.0 and isinstance(cfg.eval.lr, float)
    assert cfg.eval.ema_decay is None


@pytest.mark.parametrize(
    ("override", "words"),
    [
        (
            "eval.epoch=3",
            ["unknown config key 'eval.epoch'", "did you mean 'epochs'", "batch_train"],
        ),
        ("evl.epochs=3", ["unknown config key 'evl'", "did you mean 'eval'"]),
        ("eval.epochs=many", ["'eval.epochs' must be of type int", "'many'"]),
        ("eval.epochs=3.5", ["'eval.epochs' must be of type int"]),
        ("eval.dsa=3", ["'eval.dsa' must be of type bool"]),
        ("eval.schedule=linear", ["must be one of warmup_cosine, step"]),
        ("eval.epochs", ["must look like section.key=value"]),
        ("eval=3", ["'eval' must be a mapping"]),
    ],
)
def test_bad_overrides_are_one_line_errors(override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_unknown_key_in_file_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("data:\n  nam: cifar10\n")
    with pytest.raises(
        ConfigError, match=r"unknown config key 'data.nam' \(config file .*bad.yaml\)"
    ):
        load_config(f)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a YAML file nor a preset; presets: "):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("eval: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["eval.archs=[ConvNet]", "data.res=32", "eval.ema_decay=null"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["eval"]["archs"] == ["ConvNet"]


def test_all_keys_lists_dotted_leaves() -> None:
    keys = all_keys()
    assert "eval.epochs" in keys and "data.name" in keys
    assert "eval" not in keys


def test_base_chain_merges_section_by_section(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("eval:\n  epochs: 7\n  runs: 2\ndata:\n  res: 16\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\neval:\n  runs: 3\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("base: ../b.yaml\ndata:\n  name: cifar10\n")
    cfg = load_config(tmp_path / "sub" / "c.yaml", ["eval.runs=4"])
    assert (cfg.eval.epochs, cfg.eval.runs, cfg.data.res, cfg.data.name) == (7, 4, 16, "cifar10")
    assert load_config(tmp_path / "b.yaml").eval.runs == 3


def test_base_may_name_a_preset_and_cycles_are_refused(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("base: quickstart\neval:\n  epochs: 3\n")
    cfg = load_config(tmp_path / "mine.yaml")
    assert cfg.data.name == "mnist5k" and cfg.eval.epochs == 3
    (tmp_path / "x.yaml").write_text("base: y.yaml\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "x.yaml")
    (tmp_path / "typo.yaml").write_text("base: quikstart\n")
    with pytest.raises(ConfigError, match="did you mean 'quickstart'"):
        load_config(tmp_path / "typo.yaml")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads(name: str) -> None:
    load_config(name)


@pytest.mark.parametrize("res, depth, steps", [(128, 5, 10), (256, 6, 20)])
@pytest.mark.parametrize("objective, lr", [("dc", 0.1), ("dm", 1.0), ("mtt", 500.0)])
@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_published_presets(res: int, depth: int, steps: int, objective: str, lr: float,
                           ipc: int) -> None:  # fmt: skip
    from ld3m.models.networks import default_convnet_depth

    cfg = load_config(f"ld3m_imagenet{res}_{objective}", [f"distill.ipc={ipc}"])
    d = cfg.distill
    assert (cfg.data.res, cfg.generator.steps, cfg.generator.guidance) == (res, steps, 3.0)
    assert (d.objective, d.lr, d.ipc, d.iterations, d.momentum) == (objective, lr, ipc, 10000, 0.5)
    assert d.arch == cfg.eval.distill_arch == "ConvNet" and default_convnet_depth(res) == depth
    assert set(cfg.eval.archs) == {"ConvNet", "AlexNet", "VGG11", "ResNet18", "ViT"}
    assert (cfg.eval.epochs, cfg.eval.runs, cfg.eval.ema_decay) == (1000, 5, 0.995)
    if objective == "mtt":
        m = d.mtt
        assert (m.syn_steps, m.expert_epochs, m.max_start_epoch, m.lr_init) == (10, 2, 2, 0.01)
        assert cfg.experts.keep_epochs >= m.max_start_epoch + m.expert_epochs
        assert cfg.experts.dir.endswith(str(res))
