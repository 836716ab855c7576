"""Checkpoints, resume and preemption (hftl/checkpoint.py and the loop in hftl/train.py).

A run stopped mid-epoch by a signal and resumed must reproduce the uninterrupted run exactly: the
same loss and learning rate at every step, the same evaluations, the same final weights. Run as a
script, this file is the child process of the SIGTERM test:

    python tests/test_resume.py FORWARD SIGNAL key=value ...   # `hftl train`, signalling itself at that forward
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hftl import models

REPO_ROOT = Path(__file__).resolve().parents[1]
# 64 toy rows: batches of 16 (or 8, accumulated in pairs) give 4 optimizer steps an epoch, 8 in all.
# Evaluation every 2 steps; a checkpoint every 4.
BASE = {"train.epochs": 2, "train.evals_per_epoch": 2, "train.save_every": 4, "train.metrics": ["accuracy"],
        "output.verify_reload": 0}
VARIANTS = {
    "no-dropout": {"train.batch_size": 8, "train.gradient_accumulation_steps": 2, "train.group_by_length": False},
    # Dropout draws from the global RNG, which the data loader must not touch (LengthGroupedSampler path).
    "dropout": {"train.batch_size": 16},
}
STOP_AT_STEP = 6  # in the second epoch, two of its four steps done


def signalling(load_classifier, forward: int, signum: int):
    """Wrap models.load_classifier so the model sends `signum` to this process during its `forward`-th training forward."""

    def load(*args, **kwargs):
        model, new_keys = load_classifier(*args, **kwargs)
        calls = itertools.count(1)

        def hook(module, inputs):
            if module.training and next(calls) == forward:
                os.kill(os.getpid(), signum)

        model.register_forward_pre_hook(hook)
        return model, new_keys

    return load


def forward_of_step(variant: str, step: int) -> int:
    """The first training forward of optimizer step `step`."""
    return (step - 1) * VARIANTS[variant].get("train.gradient_accumulation_steps", 1) + 1


def no_dropout_checkpoint(tiny_bert: Path, folder: Path) -> Path:
    shutil.copytree(tiny_bert, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def dropout_free_bert(tiny_bert, tmp_path_factory) -> Path:
    return no_dropout_checkpoint(tiny_bert, tmp_path_factory.mktemp("no_dropout") / "bert")


@pytest.fixture
def variant_cfg(make_cfg, dropout_free_bert):
    def make(tmp: Path, variant: str, **extra):
        values = {**BASE, **VARIANTS[variant], **extra}
        if variant == "no-dropout":
            values["model.name_or_path"] = str(dropout_free_bert)
        return make_cfg(tmp, extra=values)

    return make


_uninterrupted: dict[str, Path] = {}


@pytest.fixture
def uninterrupted(variant_cfg, tmp_path_factory):
    """variant -> output folder of that variant's uninterrupted run (run once per session)."""
    from recipes.text_classification import main

    def get(variant: str) -> Path:
        if variant not in _uninterrupted:
            cfg = variant_cfg(tmp_path_factory.mktemp(f"uninterrupted-{variant}"), variant)
            main(cfg)
            _uninterrupted[variant] = Path(cfg.output.dir)
        return _uninterrupted[variant]

    return get


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def recorded_run(step: Path) -> dict:
    """The settings a checkpoint was written with (from its completion marker)."""
    from hftl.checkpoint import MARKER

    return json.loads((step / MARKER).read_text())["run"]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Same per-step losses and learning rates, evaluations, final weights (last checkpoint) and saved model."""
    got, want = results(resumed), results(reference)
    assert [s["step"] for s in got["step_log"]] == [s["step"] for s in want["step_log"]] == list(range(1, 9))
    assert got["step_log"] == want["step_log"]
    assert got["history"] == want["history"]
    assert got["results"] == want["results"]
    for a, b in [(Path(f"{resumed}.checkpoints/step-8"), Path(f"{reference}.checkpoints/step-8")), (resumed, reference)]:
        wa, wb = weights(a), weights(b)
        assert wa.keys() == wb.keys()
        assert all((wa[k] == wb[k]).all() for k in wa), f"weights in {a} differ from {b}"


@pytest.mark.parametrize("variant,signum", [("no-dropout", signal.SIGUSR1), ("dropout", signal.SIGTERM)])
def test_resume_mid_epoch_reproduces_uninterrupted_run(variant, signum, variant_cfg, uninterrupted, tmp_path, monkeypatch, capsys):
    from recipes.text_classification import main

    reference = uninterrupted(variant)
    if variant == "dropout":  # the point of this variant: dropout draws from the RNG that must be restored
        assert json.loads((reference / "config.json").read_text())["hidden_dropout_prob"] > 0
    with monkeypatch.context() as m:
        m.setattr(models, "load_classifier", signalling(models.load_classifier, forward_of_step(variant, STOP_AT_STEP), signum))
        with pytest.raises(SystemExit) as stopped:
            main(variant_cfg(tmp_path, variant))
    assert stopped.value.code == 143
    out = tmp_path / "out"
    assert not out.exists()
    assert sorted(p.name for p in Path(f"{out}.checkpoints").iterdir()) == ["step-4", "step-6"]

    main(variant_cfg(tmp_path, variant, **{"train.resume": "auto"}))  # a new model, optimizer and loop: all from the checkpoint
    assert f"Resumed from {out}.checkpoints/step-6: step 6 of 8, epoch 1" in capsys.readouterr().out
    assert_same_run(out, reference)


def test_sigterm_in_a_real_process_saves_exits_143_and_the_rerun_continues(variant_cfg, uninterrupted, tmp_path, capsys):
    """The signal goes to a separate `hftl train` process; the rerun (this process) shares no memory with it."""
    from recipes.text_classification import main

    cfg = variant_cfg(tmp_path, "no-dropout", **{"train.save_every": None})
    child = subprocess.run([sys.executable, __file__, str(forward_of_step("no-dropout", STOP_AT_STEP)), "SIGTERM", *cli_overrides(cfg)],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert child.returncode == 143, child.stderr[-3000:]
    assert "Stop signal received" in child.stdout and "(step 6)" in child.stdout
    folder = Path(f"{cfg.output.dir}.checkpoints")
    assert [p.name for p in folder.iterdir()] == ["step-6"]  # no periodic checkpoints: only the one the signal asked for

    main(variant_cfg(tmp_path, "no-dropout", **{"train.save_every": None, "train.resume": "auto"}))
    assert "Resumed from" in capsys.readouterr().out
    reference = results(uninterrupted("no-dropout"))
    assert results(Path(cfg.output.dir))["step_log"] == reference["step_log"]
    assert results(Path(cfg.output.dir))["history"] == reference["history"]


def cli_overrides(cfg) -> list[str]:
    """`key=value` arguments that make `hftl train` run exactly `cfg` (JSON values parse as YAML)."""
    from hftl.config import to_dict

    return [f"{section}.{k}={json.dumps(v)}" for section, values in to_dict(cfg).items() if isinstance(values, dict)
            for k, v in values.items()]


# ---------------------------------------------------------------- partial and damaged checkpoints


@pytest.fixture
def checkpoints(uninterrupted, tmp_path) -> Path:
    """A copy of a real run's checkpoint folder (step-4 and step-8)."""
    return Path(shutil.copytree(f"{uninterrupted('no-dropout')}.checkpoints", tmp_path / "ckpt"))


def test_auto_resume_takes_the_newest_complete_checkpoint_and_ignores_partial_ones(checkpoints, make_cfg, tmp_path):
    from accelerate import Accelerator

    from hftl import checkpoint

    shutil.copytree(checkpoints / "step-8", checkpoints / ".step-12.tmp")  # a write that was cut off
    shutil.copytree(checkpoints / "step-8", checkpoints / "step-16")
    (checkpoints / "step-16" / checkpoint.MARKER).unlink()  # no completion marker
    cfg = make_cfg(tmp_path, extra={"train.checkpoint_dir": str(checkpoints), "train.resume": "auto"})
    assert checkpoint.complete(checkpoints) == [checkpoints / "step-4", checkpoints / "step-8"]
    run = recorded_run(checkpoints / "step-8")
    assert checkpoint.find_resume(cfg, run, Accelerator()) == checkpoints / "step-8"


DAMAGES = [
    ("model.safetensors", "model weights", "missing"),
    ("model.safetensors", "model weights", "truncated"),
    ("optimizer.bin", "optimizer state", "truncated"),
    ("scheduler.json", "learning-rate scheduler state", "missing"),
    ("loop.json", "training-loop state", "truncated"),
    ("loop_best.safetensors", "training-loop state", "corrupted"),
    ("random_states_0.pkl", "random-number-generator state", "missing"),  # Accelerate alone would skip it silently
    ("random_states_0.pkl", "random-number-generator state", "corrupted"),
]


@pytest.mark.parametrize("name,role,damage", DAMAGES, ids=[f"{n}-{d}" for n, _, d in DAMAGES])
def test_damaged_checkpoint_is_refused_naming_the_file(name, role, damage, checkpoints):
    from hftl import checkpoint

    step = checkpoints / "step-8"
    run = recorded_run(step)
    checkpoint.verify(step, run)  # intact: accepted
    f = step / name
    data = f.read_bytes()
    if damage == "missing":
        f.unlink()
    elif damage == "truncated":
        f.write_bytes(data[: len(data) // 2])
    else:  # same size, one byte flipped
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(checkpoint.CheckpointError, match=f"'{name}' \\({role}.*{damage}"):
        checkpoint.verify(step, run)


def test_resume_from_a_damaged_checkpoint_stops_before_training(checkpoints, make_cfg, tmp_path):
    from hftl import checkpoint
    from recipes.text_classification import main

    (checkpoints / "step-8" / "optimizer.bin").unlink()
    cfg = make_cfg(tmp_path, extra={**BASE, **VARIANTS["no-dropout"], "train.resume": str(checkpoints / "step-8")})
    with pytest.raises(checkpoint.CheckpointError, match="'optimizer.bin' \\(optimizer state\\) is missing"):
        main(cfg)
    assert not Path(cfg.output.dir).exists()


def test_checkpoint_of_another_setup_or_an_earlier_run_is_refused(checkpoints, make_cfg, tmp_path):
    from accelerate import Accelerator

    from hftl import checkpoint

    step = checkpoints / "step-8"
    run = recorded_run(step)
    with pytest.raises(checkpoint.CheckpointError, match="train.batch_size=8; this run has train.batch_size=32"):
        checkpoint.verify(step, {**run, "train.batch_size": 32})
    # Starting afresh where an earlier run left checkpoints would mix two runs' checkpoints.
    cfg = make_cfg(tmp_path, extra={"train.checkpoint_dir": str(checkpoints), "output.overwrite": False})
    with pytest.raises(checkpoint.CheckpointError, match="earlier run .*train.resume=auto"):
        checkpoint.find_resume(cfg, run, Accelerator())


if __name__ == "__main__":
    forward, signame, *overrides = sys.argv[1:]
    models.load_classifier = signalling(models.load_classifier, int(forward), signal.Signals[signame])
    from hftl.cli import main

    raise SystemExit(main(["train", *overrides]))
