"""The fault suite, configs (issue 28): YAML read with bounds (alias bombs, deep nesting, huge
files), error lines of bounded length, numbers out of range and NaN refused at validation, before
any run folder exists (the rules every case follows: tests/test_faults.py)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from triplets.cli import main
import triplets.config as config_module
from triplets.errors import ConfigError

from test_faults import (  # noqa: F401 - fixtures are found by name
    own,
    rec_copy,
    recognition_run,
    refused,
    world,
    write_config,
)

LONGEST_LINE = 400


def alias_bomb(levels: int = 6, fanout: int = 9) -> str:
    """A YAML value of ``fanout ** (levels + 1)`` leaves written in a few hundred bytes."""
    lines = ["bomb0: &a0 [" + ", ".join(['"lol"'] * fanout) + "]"]
    for level in range(1, levels + 1):
        lines.append(f"bomb{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * fanout) + "]")
    return "\n".join(lines)


def bomb_config(tmp_path: Path, facts: Path, where: str) -> Path:
    """A training config whose ``where`` (``optim.lr``, ``search.start`` or a method label) is
    the alias bomb."""
    base = yaml.safe_load(write_config(tmp_path / "base.yaml", facts).read_text())
    text = alias_bomb() + "\n" + yaml.safe_dump(base, sort_keys=False)
    value = "*a6"
    if where == "optim.lr":
        text = text.replace("lr: 0.05", f"lr: {value}")
    elif where == "search.start":
        text += f"search: {{enabled: true, start: {value}}}\n"
    else:
        text = text.replace("- name: finetune", f"- name: finetune\n  label: {value}")
    assert value in text
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the YAML reader

@pytest.mark.parametrize("where", ["optim.lr", "search.start", "label"])
def test_an_alias_bomb_is_refused_at_once_in_one_short_line(world, tmp_path, capsys, where):
    config = bomb_config(tmp_path, world["facts"], where)
    started = time.perf_counter()
    err = refused(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "r")], "alias bomb", tmp_path)
    assert time.perf_counter() - started < 5 and len(err) < LONGEST_LINE
    assert not (tmp_path / "r").exists()


def test_an_alias_bomb_in_a_set_value_is_refused(world, tmp_path, capsys):
    bomb = "{" + alias_bomb().replace("\n", ", ") + "}"
    err = refused(capsys, ["train", "--config", str(world["config"]), "--out", str(tmp_path / "r"), "--set",
                           f"optim.lr={bomb}"], "alias bomb", tmp_path)
    assert len(err) < LONGEST_LINE


def test_anchors_and_aliases_within_the_bound_are_read():
    assert config_module.read_yaml("a: &x {k: 1}\nb: *x\nc: {<<: *x, d: 2}", "v") == {"a": {"k": 1}, "b": {"k": 1},
                                                                         "c": {"k": 1, "d": 2}}
    small = alias_bomb(levels=3, fanout=9)  # 9^4 = 6,561 leaves
    assert len(config_module.read_yaml(small, "v")["bomb3"]) == 9
    with pytest.raises(ConfigError, match="alias bomb"):
        config_module.read_yaml(alias_bomb(levels=5, fanout=9), "v")  # 9^6 = 531,441 > config_module.MAX_CONFIG_VALUES
    assert 9 ** 4 < config_module.MAX_CONFIG_VALUES < 9 ** 6


def test_a_self_referencing_alias_is_refused():
    with pytest.raises(ConfigError, match="more than"):
        config_module.read_yaml("a: &x [1, *x]", "v")


def test_yaml_nested_too_deep_is_one_line(world, tmp_path, capsys):
    config = tmp_path / "deep.yaml"
    config.write_text("data: " + "[" * 5000 + "]" * 5000 + "\n")
    err = refused(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "r")], "nested deeper", tmp_path)
    assert len(err) < LONGEST_LINE


def test_a_config_file_larger_than_a_config_is_refused(tmp_path, capsys):
    config = tmp_path / "huge.yaml"
    config.write_text("# " + "x" * config_module.MAX_CONFIG_BYTES + "\n")
    refused(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "r")], "more than a config may hold",
            tmp_path)


def test_a_huge_quoted_value_is_cut_in_the_error_line(world, tmp_path, capsys):
    config = write_config(tmp_path / "long.yaml", world["facts"], optim={"lr": "x" * 200_000, "epochs": 1})
    err = refused(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "r")], "optim: lr", tmp_path)
    assert len(err) < LONGEST_LINE


def test_a_huge_unknown_key_is_cut_in_the_error_line(world, tmp_path, capsys):
    err = refused(capsys, ["train", "--config", str(world["config"]), "--out", str(tmp_path / "r"), "--set",
                           "optim." + "k" * 100_000 + "=1"], "unknown key", tmp_path)
    assert len(err) < LONGEST_LINE


def test_a_resumed_run_config_that_is_an_alias_bomb_is_refused(own, capsys):
    (own["partial"] / "config.yaml").write_text(alias_bomb() + "\n")
    err = refused(capsys, ["train", "--config", str(own["config"]), "--out", str(own["partial"]), "--resume"],
                  "not a readable run config .*alias bomb", own["partial"])
    assert len(err) < LONGEST_LINE


# --------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("setting, pattern", [
    ("seed=999999999999999999999", "seed"),
    ("seed=-1", "seed"),
    ("num_threads=100000000000000000000", "num_threads"),
    ("num_threads=99999", "num_threads"),
    ("optim.batch_size=99999999999999999999999", "optim.batch_size"),
    ("optim.lr=" + "9" * 400, "optim.lr"),
    ("eval.batch_size=0", "eval.batch_size"),
])
def test_numbers_out_of_range_are_refused_before_the_run_folder_exists(world, tmp_path, capsys, setting, pattern):
    refused(capsys, ["train", "--config", str(world["config"]), "--out", str(tmp_path / "r"), "--set", setting],
            pattern, tmp_path)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("setting", ["loss.contrastive_weight=.nan", "loss.temperature=.inf",
                                     "optim.weight_decay=.nan", "optim.weight_decay=.inf",
                                     "online_importance.query_weight=.nan", "search.decay=.nan"])
def test_nan_and_infinity_are_refused(world, tmp_path, capsys, setting):
    key = setting.split("=")[0]
    refused(capsys, ["train", "--config", str(world["config"]), "--out", str(tmp_path / "r"), "--set", setting],
            key.replace(".", r"\."), tmp_path)
    assert not (tmp_path / "r").exists()


def test_nan_in_a_config_file_is_refused(world, tmp_path, capsys):
    config = write_config(tmp_path / "nan.yaml", world["facts"])
    config.write_text(config.read_text() + "loss:\n  contrastive_weight: .nan\n")
    refused(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "r")], r"loss\.contrastive_weight",
            tmp_path)


def test_nan_inside_method_options_is_refused(world, tmp_path, capsys):
    config = write_config(tmp_path / "nan.yaml", world["facts"], methods=[{"name": "mas", "options": {"lam": "x"}}])
    config.write_text(config.read_text().replace("lam: x", "lam: .nan"))
    refused(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "r")], "lam: NaN|lam.*NaN", tmp_path)


def test_recognition_seed_out_of_range_and_bomb(recognition_run, tmp_path, capsys):
    refused(capsys, ["recognition", "--config", str(recognition_run["config"]), "--out", str(tmp_path / "r"),
                     "--set", "seed=999999999999999999999"], "seed", tmp_path)
    refused(capsys, ["recognition", "--config", str(recognition_run["config"]), "--out", str(tmp_path / "r"),
                     "--set", "model.width=10000000"], "model.width", tmp_path)
    config = tmp_path / "bomb.yaml"
    config.write_text(alias_bomb() + "\n" + recognition_run["config"].read_text())
    refused(capsys, ["recognition", "--config", str(config), "--out", str(tmp_path / "r")], "alias bomb", tmp_path)
    assert not (tmp_path / "r").exists()


def test_train_with_the_largest_seed_accepted(world, tmp_path):
    """The bound is the one torch, numpy and Python all take: a run at 2^63 - 1 trains."""
    assert main(["train", "--config", str(world["config"]), "--out", str(tmp_path / "r"), "--no-progress",
                 "--set", f"seed={(1 << 63) - 1}", "--set", "eval.index=none"]) == 0
