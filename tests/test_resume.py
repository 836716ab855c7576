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
import re
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
    from hftl.recipe import train as main

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
    from hftl.recipe import train as main

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
    from hftl.recipe import train as main

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
    from hftl.recipe import train as main

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


# ---------------------------------------------------------------- checkpoints whose marker was rewritten to match
# The sha256 check above catches a file changed after it was written. These checkpoints were changed and their marker
# then rewritten consistently (by another tool, or by hand): what the files hold must be checked too.

# The no-dropout run: 8 optimizer steps, 4 an epoch, of 2 accumulated batches each (8 batches an epoch).
BOUNDS = {"total_steps": 8, "steps_per_epoch": 4, "batches_per_epoch": 8, "accumulation": 2}


def reseal(step: Path) -> None:
    """Rewrite the completion marker to match the files as they are now."""
    from hftl import checkpoint

    info = json.loads((step / checkpoint.MARKER).read_text())
    info["files"] = {p.relative_to(step).as_posix(): {"bytes": p.stat().st_size, "sha256": checkpoint._sha256(p)}
                     for p in sorted(step.rglob("*")) if p.is_file() and p.name != checkpoint.MARKER}
    (step / checkpoint.MARKER).write_text(json.dumps(info))


def set_json(name: str, **values):
    def edit(step: Path):
        state = json.loads((step / name).read_text())
        state.update(values)
        (step / name).write_text(json.dumps(state))

    return edit


def write(name: str, data):
    def edit(step: Path):
        (step / name).write_bytes(data() if callable(data) else data)

    return edit


class RunsCode:
    """Unpickling this calls print: a file torch.load(weights_only=True) must refuse."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def pickled(obj) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rng_state_with_a_bad_torch_state(step: Path) -> bytes:
    """Loads (weights_only), holds every key, but torch.set_rng_state refuses the value: load_state logs and goes on."""
    from accelerate.utils import load

    states = load(step / "random_states_0.pkl")
    import torch

    states["torch_manual_seed"] = torch.zeros(3, dtype=torch.uint8)
    return pickled(states)


# (edit of step-8, resealed unless the case says not, file named in the error, what the error says)
RESEALED = {
    "step-1e9": (set_json("loop.json", step=10**9), "loop.json", "step=1000000000; this run has 8 optimizer steps"),
    "batch-minus-5": (set_json("loop.json", batches=-5), "loop.json", "batches=-5; expected a finite number >= 0"),
    "batch-mid-accumulation": (set_json("loop.json", batches=3), "loop.json", "multiple of train.gradient_accumulation_steps=2"),
    "batch-past-the-epoch": (set_json("loop.json", batches=8), "loop.json", "an epoch of this run has 8 batches"),
    "epoch-disagrees": (set_json("loop.json", epoch=1), "loop.json", "step=8, epoch=1, batches=0, which disagree"),
    "step-disagrees-with-marker": (set_json("loop.json", step=4, epoch=1), "loop.json", "records step 8"),
    "log-short": (lambda step: set_json("loop.json", log=json.loads((step / "loop.json").read_text())["log"][:5])(step),
                  "loop.json", "log of 5 entries"),
    "history-not-a-list": (set_json("loop.json", history={"step": 2}), "loop.json", "history={'step': 2}; expected list"),
    "stopped-not-a-bool": (set_json("loop.json", stopped="no"), "loop.json", "stopped='no'; expected bool"),
    "running-nan": (set_json("loop.json", running=float("nan")), "loop.json", "running=nan; expected a finite number"),
    "unknown-key": (set_json("loop.json", extra=1), "loop.json", "has the keys"),
    "loop-not-a-dict": (write("loop.json", b"[8, 2, 0]"), "loop.json", "holds a JSON list, not an object"),
    "loop-not-json": (write("loop.json", b"{step: 8"), "loop.json", "cannot be loaded \\(JSONDecodeError"),
    "scheduler-behind": (set_json("scheduler.json", last_epoch=3), "scheduler.json", "not the state of a scheduler stepped 8 times"),
    "custom-state-recorded": (write("custom_checkpoint_0.pkl", pickled({"x": 1})), "custom_checkpoint_0.pkl",
                              "register_for_checkpointing state, which hftl never writes"),
    "optimizer-weights-only-refuses": (write("optimizer.bin", pickled({"state": RunsCode()})), "optimizer.bin",
                                       "cannot be loaded \\(torch.load\\(weights_only=True\\) refuses it: Unsupported global"),
    "rng-not-a-pickle": (write("random_states_0.pkl", b"not a pickle"), "random_states_0.pkl", "cannot be loaded"),
    "best-weights-not-safetensors": (write("loop_best.safetensors", b"\x08" + b"\x00" * 7 + b"{}garbage"), "loop_best.safetensors",
                                     "cannot be loaded"),
    "rng-unrecorded": (lambda step: None, "random_states_0.pkl", "which every hftl checkpoint holds"),
}


@pytest.mark.parametrize("case", RESEALED)
def test_resealed_checkpoint_with_bad_contents_is_refused_in_one_line_naming_the_file(case, checkpoints, capsys):
    from hftl import checkpoint

    edit, name, message = RESEALED[case]
    step = checkpoints / "step-8"
    run = recorded_run(step)
    assert checkpoint.verify(step, run, BOUNDS)["step"] == 8  # intact: accepted
    edit(step)
    reseal(step)
    if case == "rng-unrecorded":  # a marker that leaves out a file load_state would read if it were there
        info = json.loads((step / checkpoint.MARKER).read_text())
        del info["files"][name]
        (step / checkpoint.MARKER).write_text(json.dumps(info))
        (step / name).unlink()
    with pytest.raises(checkpoint.CheckpointError, match=f"'{name}' \\(.*{message}") as refused:
        checkpoint.verify(step, run, BOUNDS)
    assert "\n" not in str(refused.value)
    assert "pickled code ran" not in capsys.readouterr().out


def test_files_the_marker_does_not_list_are_refused_by_name(checkpoints):
    from hftl import checkpoint

    step = checkpoints / "step-8"
    (step / "custom_checkpoint_0.pkl").write_bytes(pickled({"x": 1}))  # Accelerate's load_state would read it
    (step / "notes").mkdir()
    (step / "notes" / "todo.txt").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match=r"does not list: \['custom_checkpoint_0.pkl', 'notes/todo.txt'\]"):
        checkpoint.verify(step, recorded_run(step), BOUNDS)


RESUMED_REFUSED = {
    # Accelerate's load_state would log "Could not load random states" at info level and train on with other draws.
    "rng-not-a-pickle": (write("random_states_0.pkl", b"not a pickle"), "random_states_0.pkl", "cannot be loaded"),
    "rng-not-restorable": (lambda step: write("random_states_0.pkl", rng_state_with_a_bad_torch_state(step))(step),
                           "random_states_0.pkl", "could not restore"),
    "batch-minus-5": RESEALED["batch-minus-5"],
    "loop-not-a-dict": RESEALED["loop-not-a-dict"],
    "optimizer-weights-only-refuses": RESEALED["optimizer-weights-only-refuses"],
}


@pytest.mark.parametrize("case", RESUMED_REFUSED)
def test_hftl_train_refuses_to_resume_a_resealed_bad_checkpoint_with_one_line(case, checkpoints, variant_cfg, tmp_path, capsys):
    """Through the CLI: exit 2, `hftl: error:` naming the file, no traceback, no model written. The RNG cases resumed
    silently before (and trained with other dropout draws than the run they continue)."""
    from hftl.cli import main

    edit, name, message = RESUMED_REFUSED[case]
    step = checkpoints / "step-4"
    edit(step)
    reseal(step)
    cfg = variant_cfg(tmp_path, "no-dropout", **{"train.resume": str(step)})
    assert main(["train", *cli_overrides(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hftl: error: checkpoint ") and f"'{name}'" in err[-1], err
    assert re.search(message, err[-1]) and not any("Traceback" in line for line in err)
    assert not Path(cfg.output.dir).exists()


def test_a_checkpoint_of_another_model_is_refused_in_one_line(checkpoints, variant_cfg, tiny_bert, tmp_path):
    """Weights whose shapes do not fit the model: load_state's error becomes a CheckpointError."""
    from transformers import BertConfig, BertForSequenceClassification

    from hftl import checkpoint

    step = checkpoints / "step-4"
    config = BertConfig.from_pretrained(tiny_bert, hidden_size=16, intermediate_size=8, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "other", safe_serialization=True)
    shutil.copy(tmp_path / "other" / "model.safetensors", step / "model.safetensors")
    reseal(step)
    from hftl.recipe import train as main

    with pytest.raises(checkpoint.CheckpointError, match=r"does not load into this run \(RuntimeError: Error\(s\) in loading") as refused:
        main(variant_cfg(tmp_path, "no-dropout", **{"train.resume": str(step)}))
    assert "\n" not in str(refused.value)


if __name__ == "__main__":
    forward, signame, *overrides = sys.argv[1:]
    models.load_classifier = signalling(models.load_classifier, int(forward), signal.Signals[signame])
    from hftl.cli import main

    raise SystemExit(main(["train", *overrides]))
