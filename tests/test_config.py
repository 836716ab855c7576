"""hftl.config: YAML preset + key=value overrides -> typed dataclasses, with errors that say the fix."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT
from hftl.config import Config, ConfigError, all_keys, load_config, parse_override, to_yaml

PRESETS = sorted((REPO_ROOT / "recipes" / "configs").rglob("*.yaml"))


def test_defaults_load():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.task == "text-classification"
    assert cfg.adapt.mode == "full"
    assert cfg.train.learning_rate == 5e-5 and isinstance(cfg.train.learning_rate, float)
    # Left to the task (hftl/tasks/); single-label fills in what it always was.
    assert cfg.train.metrics is None and cfg.train.metric_for_best is None
    from hftl.tasks.single_label import SingleLabel

    t = SingleLabel(["a", "b"]).configure(cfg).train
    assert t.metrics == ["accuracy", "f1", "precision", "recall"] and t.metric_for_best == "accuracy" and t.greater_is_better
    assert cfg.output.overwrite is False
    assert cfg.data.validation_file is None


def test_preset_then_overrides(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text(
        "model:\n  name_or_path: some/model\n"
        "data:\n  train_file: a.csv\n  validation_file: b.csv\n  label_names: [neg, pos]\n"
        "train:\n  batch_size: 16\n  learning_rate: 0.001\n  epochs: 2\n"
        "output:\n  dir: out\n"
    )
    cfg = load_config(preset, [
        "train.batch_size=4",              # int
        "train.warmup_ratio=0",            # int where a float is expected -> float
        "train.epochs=0.5",                # float
        "output.overwrite=true",           # bool
        "train.metrics=[accuracy, f1]",    # list
        "adapt.target_modules=query,value",  # comma-separated list
        "data.validation_file=null",       # null
        "model.revision=",                 # empty string stays a string
    ])
    # from the preset, untouched
    assert cfg.model.name_or_path == "some/model"
    assert cfg.data.train_file == "a.csv"
    assert cfg.data.label_names == ["neg", "pos"]
    assert cfg.train.learning_rate == 0.001
    assert cfg.output.dir == "out"
    # overridden, with the declared types
    assert cfg.train.batch_size == 4 and type(cfg.train.batch_size) is int
    assert cfg.train.warmup_ratio == 0.0 and type(cfg.train.warmup_ratio) is float
    assert cfg.train.epochs == 0.5
    assert cfg.output.overwrite is True
    assert cfg.train.metrics == ["accuracy", "f1"]
    assert cfg.adapt.target_modules == ["query", "value"]
    assert cfg.data.validation_file is None
    assert cfg.model.revision == ""
    # the rest stays at its default
    assert cfg.adapt.mode == Config().adapt.mode


def test_later_override_wins():
    cfg = load_config(None, ["train.seed=1", "train.seed=7"])
    assert cfg.train.seed == 7


def test_numeric_string_for_str_key_stays_str():
    cfg = load_config(None, ["model.revision=123", "model.name_or_path=42"])
    assert cfg.model.revision == "123" and cfg.model.name_or_path == "42"


@pytest.mark.parametrize("where", ["override", "preset"])
def test_scientific_notation_float(tmp_path, where):
    if where == "override":
        cfg = load_config(None, ["train.learning_rate=1e-3"])
    else:
        preset = tmp_path / "p.yaml"
        preset.write_text("train:\n  learning_rate: 1e-3\n")
        cfg = load_config(preset)
    assert cfg.train.learning_rate == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("train.lr", "train.learning_rate"),
        ("modle.name_or_path", "model.name_or_path"),
        ("train.epoch", "train.epochs"),
        ("data.text_colum", "data.text_column"),
    ],
)
def test_unknown_key_suggests_nearest(key, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=1"])
    msg = str(e.value)
    assert f"'{key}'" in msg
    assert suggestion in msg
    assert "--help-config" in msg


def test_unknown_key_in_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.lr.*train\.learning_rate"):
        load_config(preset)


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.batch_size=abc", "train.batch_size", "int"),
        ("train.batch_size=2.5", "train.batch_size", "int"),
        ("output.overwrite=maybe", "output.overwrite", "bool"),
        ("train.learning_rate=fast", "train.learning_rate", "float"),
        ("train.max_steps=true", "train.max_steps", "int"),
        ("model.name_or_path=[a, b]", "model.name_or_path", "str"),
    ],
)
def test_wrong_type_names_key_and_type(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{key}'" in msg
    assert f"expects {expected}" in msg


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError):
        parse_override("adapt.mode")


def test_parse_override_types():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=[x, y]") == ("a.b", ["x", "y"])
    assert parse_override("a.b=x=y") == ("a.b", "x=y")  # only the first '=' splits


def test_text_keys_take_the_text_as_typed(tmp_path):
    # YAML would read 'no' as false; the documented value of train.mixed_precision is 'no'.
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert parse_override("model.revision=null") == ("model.revision", None)
    assert parse_override("model.revision=off") == ("model.revision", "off")
    assert parse_override("train.fp16_placeholder=no") == ("train.fp16_placeholder", False)  # unknown key: left to from_flat to refuse
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  mixed_precision: no\n")  # unquoted in a file: YAML's boolean; the error says to quote it
    with pytest.raises(ConfigError, match='quote the text, e.g. mixed_precision: "no"'):
        load_config(preset)


def test_missing_and_invalid_preset_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_to_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["adapt.mode=lora", "train.metrics=[accuracy]", "data.label_names=[a, b]", "train.max_steps=3"])
    path = tmp_path / "saved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_every_key_has_help():
    keys = all_keys()
    assert "train.learning_rate" in keys and "model.name_or_path" in keys and "adapt.mode" in keys
    missing = [k for k, (_, f) in keys.items() if not f.metadata.get("help")]
    assert not missing


def test_presets_exist():
    assert PRESETS, "recipes/configs holds no presets"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_preset_loads_and_names_its_command(preset: Path):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert yaml.safe_load(preset.read_text())  # a mapping, not empty
    own = preset.relative_to(REPO_ROOT).as_posix()
    first = preset.read_text().splitlines()[0]
    script = re.fullmatch(r"# (?:\.venv/bin/)?python (scripts/\S+\.py)(?: .*)?", first)
    if script:
        # A preset a script runs (e.g. source pretraining, which first writes the checkpoint it starts
        # from): the script must exist and name this preset.
        assert (REPO_ROOT / script.group(1)).is_file(), first
        assert own in (REPO_ROOT / script.group(1)).read_text(), f"{script.group(1)} does not mention {own}"
    else:
        assert first == f"# hftl train {own}", first
