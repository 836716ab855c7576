"""lpft: a linear probe on the frozen backbone, then fine-tuning everything from that head; on the tiny BERT.

Spies on the two stages' entry points keep the weights each stage started from and ended with.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_json

# The probe trained with AdamW, so both stages have steps to record (a solved probe has none: tests/test_features.py).
SETTINGS = {"adapt.mode": "lpft", "adapt.solve_head": False, "adapt.lp_epochs": 5, "adapt.lp_learning_rate": "0.05",
            "train.epochs": 3, "train.learning_rate": "0.005", "train.save_every": 8, "train.keep_last": 1}


def _copy(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # CPU: compared with files


def _split(state) -> tuple[dict, dict]:
    head = {k: v for k, v in state.items() if k.startswith("classifier.")}
    return head, {k: v for k, v in state.items() if k not in head}


@pytest.fixture(scope="module")
def run(make_cfg, tmp_path_factory):
    import hftl.cache
    import hftl.models
    import hftl.train
    from hftl.recipe import train as main

    cfg = make_cfg(tmp_path_factory.mktemp("lpft"), extra=SETTINGS)
    seen = {"fit": []}
    load, probe, fit = hftl.models.load_classifier, hftl.cache.fit_on_features, hftl.train.fit

    def spy_load(*args, **kwargs):
        model, new_keys = load(*args, **kwargs)
        seen["initial"] = _copy(model)
        return model, new_keys

    def spy_probe(model, head, encoded, collator, cfg, accelerator, *rest):
        seen["probe_trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        result = probe(model, head, encoded, collator, cfg, accelerator, *rest)
        seen["probe"] = _copy(result["model"])
        return result

    def spy_fit(model, encoded, collator, cfg, accelerator, hooks=(), **kwargs):
        seen["fit"].append({"state": _copy(model), "cfg": cfg, "frozen": [n for n, p in model.named_parameters() if not p.requires_grad]})
        return fit(model, encoded, collator, cfg, accelerator, hooks, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hftl.models, "load_classifier", spy_load)
        mp.setattr(hftl.cache, "fit_on_features", spy_probe)
        mp.setattr(hftl.train, "fit", spy_fit)
        results = main(cfg)
    return cfg, results, seen


def test_stage1_trains_only_the_head_on_cached_features(run):
    cfg, _, seen = run
    assert seen["probe_trainable"] == {"classifier.weight", "classifier.bias"}
    head0, backbone0 = _split(seen["initial"])
    head1, backbone1 = _split(seen["probe"])
    assert all(torch.equal(backbone0[k], backbone1[k]) for k in backbone0)
    assert all(not torch.equal(head0[k], head1[k]) for k in head0)
    assert read_json(Path(cfg.output.dir) / "results.json")["feature_cache"]["head"] == ["classifier"]


def test_stage2_fine_tunes_everything_from_the_probed_head(run):
    cfg, _, seen = run
    (stage2,) = seen["fit"]  # stage 1 ran on cached features, not through the loop on the whole model
    assert not stage2["frozen"]
    from hftl.tasks.single_label import SingleLabel

    assert stage2["cfg"] == SingleLabel([]).configure(cfg)  # the run's own train settings (the task's metrics filled in)
    assert all(torch.equal(stage2["state"][k], v) for k, v in seen["probe"].items())
    saved = load_file(str(Path(cfg.output.dir) / "model.safetensors"))
    _, backbone0 = _split(seen["initial"])
    assert any(".encoder." in k and not torch.equal(saved[k], v) for k, v in backbone0.items())
    head1, _ = _split(seen["probe"])
    assert any(not torch.equal(saved[k], v) for k, v in head1.items())


def test_results_record_both_stages(run):
    cfg, results, _ = run
    info = read_json(Path(cfg.output.dir) / "results.json")
    history = info["history"]
    assert [h["stage"] for h in history] == ["linear_probe"] * 5 + ["fine_tune"] * 3
    steps = [h["step"] for h in history]
    assert steps == [8 * i for i in range(1, 9)]  # 8 steps per epoch, counted on across the stages
    assert 40 < info["best_step"] <= 64
    assert [e["step"] for e in info["step_log"]] == list(range(1, 65))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert results["validation"]["accuracy"] >= 15 / 16


def test_checkpoints_of_the_two_stages_stay_apart(run):
    from hftl.checkpoint import complete

    cfg, results, seen = run
    root = Path(f"{cfg.output.dir}.checkpoints")
    (stage2,) = complete(root)
    (stage1,) = complete(root / "linear-probe")
    assert stage2.name == "step-24" and stage1.name == "step-40"  # each stage counts its own steps
    # stage 2's checkpoint holds only its own model and optimizer, not stage 1's cached head
    files = {p.name for p in stage2.iterdir()}
    assert {"model.safetensors", "optimizer.bin"} <= files and not any(f.startswith(("model_1", "optimizer_1")) for f in files)
    assert load_file(str(stage2 / "model.safetensors")).keys() == seen["initial"].keys()

    # train.resume=auto: each stage continues from its own (here: final) checkpoint; the record is the same
    from hftl.recipe import train as main

    first = read_json(Path(cfg.output.dir) / "results.json")
    assert main(replace(cfg, train=replace(cfg.train, resume="auto"), output=replace(cfg.output, overwrite=True))) == results
    again = read_json(Path(cfg.output.dir) / "results.json")
    assert again["history"] == first["history"] and again["best_step"] == first["best_step"]


def test_probe_needs_epochs():
    from hftl.adapt import get_mode
    from hftl.config import AdaptConfig, ConfigError

    with pytest.raises(ConfigError, match=r"adapt\.lp_epochs=0.*adapt\.mode=full"):
        get_mode("lpft").apply(torch.nn.Linear(2, 2), AdaptConfig(lp_epochs=0), [])
