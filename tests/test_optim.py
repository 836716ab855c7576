"""train.optimizer (adamw, adafactor, sgd), train.gradient_checkpointing and train.compile."""
from __future__ import annotations

import pytest
import torch

import hftl.train
from conftest import read_json
from hftl.config import ConfigError, load_config


def _run(make_cfg, tmp_path, monkeypatch, **extra):
    """A tiny run; returns its per-step training losses and what speed_up / _optimizer saw."""
    from hftl.recipe import train as main

    seen = {}
    real_optimizer, real_speed_up = hftl.train._optimizer, hftl.train.speed_up

    def optimizer(model, cfg, hooks=()):
        seen["optimizer"] = real_optimizer(model, cfg, hooks)
        return seen["optimizer"]

    def speed_up(model, cfg):
        real_speed_up(model, cfg)
        seen["checkpointing"] = getattr(model, "is_gradient_checkpointing", None)

    monkeypatch.setattr(hftl.train, "_optimizer", optimizer)
    monkeypatch.setattr(hftl.train, "speed_up", speed_up)
    main(make_cfg(tmp_path, extra={"output.verify_reload": 16, **extra}))
    return [e["loss"] for e in read_json(tmp_path / "out" / "results.json")["step_log"]], seen


@pytest.mark.parametrize("name, cls, lr", [("adamw", "AdamW", "0.005"), ("adafactor", "Adafactor", "0.005"), ("sgd", "SGD", "0.1")])
def test_each_optimizer_trains(make_cfg, tmp_path, monkeypatch, name, cls, lr):
    losses, seen = _run(make_cfg, tmp_path, monkeypatch, **{"train.optimizer": name, "train.learning_rate": lr})
    assert type(seen["optimizer"]).__name__ == cls
    if name == "sgd":
        assert all(g["momentum"] == 0.9 for g in seen["optimizer"].param_groups)
    if name == "adafactor":  # a fixed rate that the schedule drives, not Adafactor's relative step
        assert not seen["optimizer"].defaults["relative_step"]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, losses


def test_unknown_optimizer_is_refused_at_config_load():
    with pytest.raises(ConfigError, match="adamw, adafactor, sgd"):
        load_config(None, ["train.optimizer=adam"])


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_losses(make_cfg, tmp_path, monkeypatch, mode):
    plain, seen = _run(make_cfg, tmp_path / "plain", monkeypatch, **{"adapt.mode": mode, "train.epochs": 1})
    assert seen["checkpointing"] is False
    checkpointed, seen = _run(make_cfg, tmp_path / "ckpt", monkeypatch,
                              **{"adapt.mode": mode, "train.epochs": 1, "train.gradient_checkpointing": True})
    assert seen["checkpointing"] is True  # on the transformers model (under peft: the one it wraps)
    assert checkpointed == pytest.approx(plain, abs=1e-5)


def test_compile_trains_and_saves_a_folder_that_reloads(make_cfg, tmp_path, monkeypatch):
    """train.compile compiles the model in place (nn.Module.compile). Inductor's code generation takes minutes on
    2 CPU cores, so this test asks dynamo for its eager backend: the graph capture, guards and recompiles that hftl's
    loop, evaluation and save go through are the same; only the kernels differ."""
    import torch._dynamo

    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real(self, **{**kw, "backend": "eager"}))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    losses, _ = _run(make_cfg, tmp_path, monkeypatch, **{"train.compile": True, "train.max_steps": 6})
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the forward did run compiled
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert (tmp_path / "out" / "model.safetensors").is_file()  # and the pipeline reload check passed on it


def test_resume_with_another_optimizer_is_refused(make_cfg, tmp_path):
    """A checkpoint holds its optimizer's state: another train.optimizer cannot continue it exactly."""
    from hftl.checkpoint import CheckpointError
    from hftl.recipe import train as main

    main(make_cfg(tmp_path, extra={"train.max_steps": 2, "train.save_every": 1, "output.verify_reload": 0}))
    with pytest.raises(CheckpointError, match="train.optimizer=adamw; this run has train.optimizer=sgd"):
        main(make_cfg(tmp_path, extra={"train.max_steps": 2, "train.save_every": 1, "train.resume": "auto",
                                       "train.optimizer": "sgd", "output.overwrite": True, "output.verify_reload": 0}))
