"""The YAML/dataclass configuration loader: keys, types, overrides, nearest-name errors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from triplets.config import apply_override, from_dict, load_config, to_dict
from triplets.errors import ConfigError


@dataclass
class Optim:
    lr: float = 0.05
    epochs: int = 5
    momentum: float = 0.9


@dataclass
class Method:
    name: str
    options: dict = field(default_factory=dict)


@dataclass
class Experiment:
    seed: int = 0
    backbone: Literal["small_cnn", "resnet18"] = "small_cnn"
    optim: Optim = field(default_factory=Optim)
    methods: list[Method] = field(default_factory=list)
    importance_data: str | None = None
    tags: list[str] = field(default_factory=list)


def test_yaml_with_nested_sections_and_lists(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "seed: 3\noptim:\n  lr: 1e-2\n  epochs: 2\nmethods:\n  - name: mas\n    options: {lam: 0.5}\n  - name: finetune\n"
    )
    config = load_config(path, Experiment)
    assert config.seed == 3
    assert config.optim.lr == pytest.approx(0.01) and config.optim.epochs == 2 and config.optim.momentum == 0.9
    assert [m.name for m in config.methods] == ["mas", "finetune"]
    assert config.methods[0].options == {"lam": 0.5}
    assert to_dict(config)["optim"] == {"lr": 0.01, "epochs": 2, "momentum": 0.9}


def test_unknown_key_names_the_nearest_valid_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'lrr'; did you mean 'lr'\?"):
        load_config(path, Experiment)


def test_wrong_type_and_literal_are_rejected():
    with pytest.raises(ConfigError, match="expected an integer"):
        from_dict(Experiment, {"seed": "three"})
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        from_dict(Experiment, {"backbone": "resnet19"})
    with pytest.raises(ConfigError, match="expected true or false|expected a number"):
        from_dict(Optim, {"lr": True})


def test_overrides_reach_nested_keys_and_parse_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n")
    config = load_config(path, Experiment, ["optim.lr=0.2", "seed=7", "importance_data=test", "tags=a,b"])
    assert config.optim.lr == pytest.approx(0.2)
    assert config.seed == 7 and config.importance_data == "test" and config.tags == ["a", "b"]
    raw = {"optim": 3}
    with pytest.raises(ConfigError, match="not a section"):
        apply_override(raw, "optim.lr=1")
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "seed")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml", Experiment)
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, Experiment)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top, Experiment)
