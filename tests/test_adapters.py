"""peft's other adapter modes (ia3, adalora, loha, lokr) through the whole text recipe on the tiny BERT.

One run per mode (module-scoped, adapt.save_adapter=true); a spy on the loop keeps what trained and the
unmerged peft model as training left it, before the save merged it.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_json
from hftl.config import AdaptConfig, ConfigError

# Per mode: the name peft gives its adapter parameters, its peft_type, and settings that learn the toy task quickly.
MODES = {
    "ia3": ("ia3_l", "IA3", {"train.learning_rate": "0.02"}),
    "adalora": ("lora_", "ADALORA", {"train.learning_rate": "0.02"}),
    "loha": ("hada_", "LOHA", {"train.learning_rate": "0.02"}),
    "lokr": ("lokr_", "LOKR", {"train.learning_rate": "0.02"}),
}
PEFT_MARKERS = ("lora_", "hada_", "lokr_", "ia3_", "base_layer", "modules_to_save", "original_module", "base_model.model")


class Run:
    def __init__(self, mode, cfg, trainable, unmerged, allocated):
        self.mode, self.cfg, self.out = mode, cfg, Path(cfg.output.dir)
        self.marker, self.peft_type, _ = MODES[mode]
        self.trainable = trainable  # parameter names that required grad when the loop started
        self.unmerged = unmerged  # the peft model's state_dict when the loop returned
        self.allocated = allocated  # steps AdaLoRA's update_and_allocate was called with
        self.results = read_json(self.out / "results.json")


@pytest.fixture(scope="module", params=list(MODES))
def run(request, make_cfg, tmp_path_factory):
    import hftl.recipe
    from peft.tuners.adalora.model import AdaLoraModel
    from hftl.recipe import train as main

    mode = request.param
    cfg = make_cfg(tmp_path_factory.mktemp(f"peft_{mode}"),
                   extra={"adapt.mode": mode, "adapt.save_adapter": True, "train.epochs": 5, **MODES[mode][2]})
    seen, allocated = {}, []
    fit, allocate = hftl.recipe.fit, AdaLoraModel.update_and_allocate

    def spy_fit(model, *args, **kwargs):
        seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        result = fit(model, *args, **kwargs)
        seen["unmerged"] = {k: v.detach().cpu().clone() for k, v in result["model"].state_dict().items()}
        return result

    def spy_allocate(self, global_step):
        allocated.append(global_step)
        return allocate(self, global_step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hftl.recipe, "fit", spy_fit)
        mp.setattr(AdaLoraModel, "update_and_allocate", spy_allocate)
        main(cfg)
    return Run(mode, cfg, seen["trainable"], seen["unmerged"], allocated)


def test_only_adapter_and_head_train(run):
    adapter = {n for n in run.trainable if run.marker in n}
    head = {n for n in run.trainable if ".modules_to_save." in n}
    assert adapter and {n.rsplit(".", 1)[-1] for n in head} == {"weight", "bias"}
    assert run.trainable == adapter | head
    assert run.results["trainable_params"] < run.results["total_params"] / 5


def test_base_weights_untouched_until_merge(run, tiny_bert):
    original = load_file(str(tiny_bert / "model.safetensors"))
    base = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in run.unmerged.items()
            if not any(m in k for m in ("lora_", "hada_", "lokr_", "ia3_", "modules_to_save", "original_module", "ranknum"))}
    for k, v in original.items():
        assert torch.equal(base["bert." + k], v), k


def test_trained_and_saved_plain_merged_model(run, tiny_bert):
    from transformers import AutoModelForSequenceClassification

    history = run.results["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert min(h["eval_loss"] for h in history) < 0.6  # well below chance (ln 2 = 0.69)
    saved = load_file(str(run.out / "model.safetensors"))
    assert not [k for k in saved if any(m in k for m in PEFT_MARKERS)]
    _, info = AutoModelForSequenceClassification.from_pretrained(str(run.out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # merging moved exactly the adapted weights
    targets = read_json(run.out / "adapter" / "adapter_config.json")["target_modules"]
    original = load_file(str(tiny_bert / "model.safetensors"))
    changed = {k for k, v in original.items() if not torch.equal(saved["bert." + k], v)}
    assert changed and all(any(k.removesuffix(".weight").endswith(t) for t in targets) for k in changed), changed


def test_adapter_folder_reproduces_merged_model(run, tiny_bert):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert read_json(run.out / "adapter" / "adapter_config.json")["peft_type"] == run.peft_type
    tokenizer = AutoTokenizer.from_pretrained(str(run.out))
    batch = tokenizer(["great nice", "awful", "sad poor ugly", "fine"], padding=True, return_tensors="pt")
    merged = AutoModelForSequenceClassification.from_pretrained(str(run.out)).eval()
    plain = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    unmerged = PeftModel.from_pretrained(plain, str(run.out / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(unmerged(**batch).logits, merged(**batch).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("run", ["ia3"], indirect=True)
def test_ia3_feedforward_modules_from_peft(run):
    config = read_json(run.out / "adapter" / "adapter_config.json")
    assert sorted(config["target_modules"]) == ["key", "output.dense", "value"]
    assert config["feedforward_modules"] == ["output.dense"]


@pytest.mark.parametrize("run", ["adalora"], indirect=True)
def test_adalora_allocates_after_every_step(run):
    steps = run.results["history"][-1]["step"]
    assert steps == 5 * 64 // 8
    assert run.allocated == list(range(1, steps + 1))
    config = read_json(run.out / "adapter" / "adapter_config.json")
    assert (config["total_step"], config["tinit"], config["tfinal"]) == (steps, steps // 10, steps // 5)
    assert config["init_r"] == 12 and config["target_r"] == 8
    # the budget was cut to the target: 8 of 12 ranks on average over the adapted matrices
    kept = [sum(v) for v in config["rank_pattern"].values()]
    assert sum(kept) == 8 * len(kept) and max(kept) <= 12


# ---------------------------------------------------------------- errors and resume, without training


@pytest.fixture
def tiny_classifier(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)


def test_target_modules_the_model_lacks(tiny_classifier):
    from hftl.adapt import get_mode

    with pytest.raises(ConfigError, match=r"adapt\.target_modules=\['attn'\].*named \[.*'query'"):
        get_mode("loha").apply(tiny_classifier, AdaptConfig(target_modules=["attn"]), ["classifier"])


def test_rank_must_be_positive(tiny_classifier):
    from hftl.adapt import get_mode

    with pytest.raises(ConfigError, match=r"adapt\.peft_r=0"):
        get_mode("lokr").apply(tiny_classifier, AdaptConfig(peft_r=0), ["classifier"])


def test_no_default_targets_and_no_linear_layers():
    from types import SimpleNamespace

    from hftl.adapt.lora import default_targets

    model = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3))
    model.config = SimpleNamespace(model_type="toy-conv")
    with pytest.raises(ConfigError, match=r"'toy-conv'.*adapt\.target_modules"):
        default_targets(model, [])


def test_adalora_resumed_in_final_phase_recovers_rank_pattern(tiny_classifier):
    from hftl.adapt import get_mode
    from hftl.adapt.adapters import RankBudget

    model = get_mode("adalora").apply(tiny_classifier, AdaptConfig(), ["classifier"])
    budget = RankBudget(model)
    budget.setup(None, 10, 10)  # final phase: steps 9 and 10
    assert model.active_peft_config.rank_pattern is None  # as after a resume: peft does not checkpoint it
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.fill_(1.0)
                p[::3] = 0.0  # what the last masking left
    budget.after_optimizer_step(model, 9)
    pattern = model.active_peft_config.rank_pattern
    assert pattern and all(v == [i % 3 != 0 for i in range(12)] for v in pattern.values())
