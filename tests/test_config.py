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


def test_extends_merges_mappings_deeply_and_the_child_wins(tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "base.yaml").write_text(
        "seed: 1\nbackbone: resnet18\noptim: {lr: 0.1, epochs: 7}\nmethods:\n  - name: finetune\n  - name: mas\n"
        "tags: [a, b]\n")
    (tmp_path / "presets" / "middle.yaml").write_text("extends: base.yaml\noptim: {epochs: 3}\ntags: [c]\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: presets/middle.yaml\nseed: 4\noptim: {momentum: 0.5}\nmethods:\n  - name: ewc\n")
    config = load_config(child, Experiment, ["optim.lr=0.2"])
    assert config.seed == 4 and config.backbone == "resnet18"  # the child wins; untouched keys are inherited
    assert (config.optim.lr, config.optim.epochs, config.optim.momentum) == (0.2, 3, 0.5)  # merged key by key
    assert [m.name for m in config.methods] == ["ewc"] and config.tags == ["c"]  # lists are replaced, not merged


def test_extends_refuses_cycles_and_missing_bases_with_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match="cycle") as caught:
        load_config(tmp_path / "a.yaml", Experiment)
    assert "\n" not in str(caught.value)
    (tmp_path / "self.yaml").write_text("extends: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "self.yaml", Experiment)
    (tmp_path / "orphan.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="not found.*nowhere.yaml"):
        load_config(tmp_path / "orphan.yaml", Experiment)
    (tmp_path / "bad.yaml").write_text("extends: [x]\n")
    with pytest.raises(ConfigError, match="extends must be"):
        load_config(tmp_path / "bad.yaml", Experiment)


def test_the_paper_presets_extend_one_base():
    from pathlib import Path

    from triplets.config import read_preset
    from triplets.facts.train_config import load_train_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    for name, fact_file, epochs in (("vg_random8", "data/vg_random8.h5", 5), ("vg_semantic8", "data/vg_semantic8.h5", 5),
                                    ("midscale4", "data/midscale4.h5", 10)):
        assert "extends" in (configs / f"{name}.yaml").read_text()
        config = load_train_config(configs / f"{name}.yaml")
        assert config.data.fact_file == fact_file and config.optim.epochs == epochs
        assert config.model.backbone == "vgg16" and config.loss.contrastive_weight == 1.0
        assert read_preset(configs / f"{name}.yaml")["methods"][1]["options"] == {"lam": 5.0, "mode": "exact"}
