"""The whole text-classification recipe in each adaptation mode, on the tiny BERT and the toy data.

One run per mode (module-scoped); the tests below read what it wrote.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import card_results, read_json
from hftl.config import load_config

# Per mode: settings with which the tiny model learns the toy task in a few seconds.
SETTINGS = {
    "head": {"train.learning_rate": "0.05", "train.epochs": 10},
    "full": {"train.learning_rate": "0.005", "train.epochs": 4},
    "lora": {"train.learning_rate": "0.02", "train.epochs": 5, "adapt.save_adapter": True},
}
MODES = list(SETTINGS)


class Run:
    def __init__(self, mode, cfg, results, out, initial, checkpoint, truth):
        self.mode, self.cfg, self.results, self.out = mode, cfg, results, out
        self.initial = initial  # state_dict of the classifier as loaded (before training)
        self.checkpoint = checkpoint  # the tiny BERT checkpoint folder
        self.truth = truth  # validation labels from the file, in row order

    @property
    def predictions(self) -> list[str]:
        return read_json(self.out / "predictions_validation.json")

    @property
    def saved(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.out / "model.safetensors"))

    def true_accuracy(self) -> float:
        return sum(p == t for p, t in zip(self.predictions, self.truth)) / len(self.truth)


@pytest.fixture(scope="module", params=MODES)
def run(request, make_cfg, tiny_bert, toy_data, tmp_path_factory):
    import hftl.models
    from hftl.recipe import train as main

    mode = request.param
    cfg = make_cfg(tmp_path_factory.mktemp(f"mode_{mode}"), extra={"adapt.mode": mode, **SETTINGS[mode]})
    initial = {}
    original = hftl.models.load_classifier

    def recording(*args, **kwargs):  # keep a copy of the freshly initialised head
        model, new_keys = original(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("classifier.")})
        return model, new_keys

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hftl.models, "load_classifier", recording)
        results = main(cfg)
    assert initial, "hftl.models.load_classifier was not called through the module"
    with open(toy_data["validation"], newline="") as f:
        truth = [r["label"] for r in csv.DictReader(f)]
    return Run(mode, cfg, results, Path(cfg.output.dir), initial, tiny_bert, truth)


def test_output_folder_complete(run):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "hftl_config.yaml", "results.json", "predictions_validation.json"):
        assert (run.out / name).is_file(), name
    # no temporary or backup siblings left behind
    assert sorted(p.name for p in run.out.parent.iterdir()) == ["out"]
    config = read_json(run.out / "config.json")
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}


def test_training_loss_fell(run):
    results = read_json(run.out / "results.json")
    if run.mode == "head":  # solved, not trained (hftl/solver.py): no steps; the penalty chosen on validation
        assert results["history"] == [] and results["solver"]["C"] > 0
        assert results["results"]["validation"]["loss"] < 0.6
        return
    history = results["history"]
    assert len(history) >= 2
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert min(h["eval_loss"] for h in history) < 0.6  # well below chance (ln 2 = 0.69)


def test_predictions_are_accurate(run):
    assert len(run.predictions) == len(run.truth) == 16
    assert set(run.predictions) <= {"negative", "positive"}
    # a linear head on a frozen random backbone separates the toy words less cleanly than the other modes
    assert run.true_accuracy() >= (13 / 16 if run.mode == "head" else 15 / 16)


def test_reported_accuracy_matches_predictions(run):
    # Regression: the final, length-sorted evaluation once scored row-ordered predictions against
    # sorted references, so results.json and the card disagreed with the saved predictions.
    reported = read_json(run.out / "results.json")["results"]["validation"]["accuracy"]
    assert reported == pytest.approx(run.true_accuracy())
    assert run.results["validation"]["accuracy"] == reported


def test_trainable_parameter_counts(run):
    info = read_json(run.out / "results.json")
    trainable, total = info["trainable_params"], info["total_params"]
    classifier = sum(v.numel() for k, v in run.saved.items() if k.startswith("classifier."))
    assert classifier == 32 * 2 + 2
    if run.mode == "head":
        assert trainable == classifier
        assert trainable / total < 0.01
    elif run.mode == "full":
        from transformers import AutoModelForSequenceClassification

        assert trainable == total
        assert total == AutoModelForSequenceClassification.from_pretrained(str(run.out)).num_parameters()
    else:  # lora: the low-rank matrices of each targeted Linear, plus the whole classifier
        from transformers import BertModel

        adapter_config = read_json(run.out / "adapter" / "adapter_config.json")
        r = adapter_config["r"]
        assert r == run.cfg.adapt.lora_r
        targets = set(adapter_config["target_modules"])
        base = BertModel.from_pretrained(str(run.checkpoint))
        linears = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets]
        assert linears
        lora = sum(r * (m.in_features + m.out_features) for m in linears)
        assert trainable == lora + classifier
        adapter = load_file(str(run.out / "adapter" / "adapter_model.safetensors"))
        assert trainable == sum(v.numel() for v in adapter.values())
        assert trainable < total


def test_backbone_and_head_weights(run):
    original = load_file(str(run.checkpoint / "model.safetensors"))
    saved = run.saved
    backbone = {k: saved["bert." + k] for k in original}  # every checkpoint tensor is in the saved model
    changed = {k for k in original if not torch.equal(original[k], backbone[k])}
    if run.mode == "head":
        assert not changed  # frozen: bit for bit the checkpoint
    elif run.mode == "full":
        assert any(".encoder." in f".{k}" for k in changed)
    else:  # lora on query/value only: exactly those merged weights moved, nothing else
        targets = read_json(run.out / "adapter" / "adapter_config.json")["target_modules"]
        assert changed
        assert all(k.split(".")[-2] in targets and k.endswith(".weight") for k in changed), changed
    # the classifier trained away from its initialisation
    assert set(run.initial) == {k for k in saved if k.startswith("classifier.")}
    assert any(not torch.equal(run.initial[k], saved[k]) for k in run.initial)


def test_pipeline_reload_predicts_saved_predictions(run):
    from transformers import pipeline

    with open(run.cfg.data.validation_file, newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    clf = pipeline("text-classification", model=str(run.out), device=-1)
    got = [p["label"] for p in clf(texts, batch_size=8)]
    assert got == run.predictions


def test_model_card(run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(str(run.out / "README.md"))
    data = card.data.to_dict()
    assert data.get("base_model") is None  # a local checkpoint has no Hub id
    assert str(run.checkpoint) not in card.content  # never a local path
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-classification"
    assert "hftl" in data["tags"]
    assert f"hftl-{run.mode}" in data["tags"] or run.mode in data["tags"]
    # Local data: no Hub id for model-index's dataset.type, so no model-index; the table holds the results
    assert "model-index" not in data and "datasets" not in data
    metrics = card_results(card.content)["validation"]
    reported = read_json(run.out / "results.json")["results"]["validation"]
    assert metrics["accuracy"] == pytest.approx(reported["accuracy"], abs=5e-5)
    assert set(metrics) >= {"accuracy", "f1", "precision", "recall"}
    # What ran, not what was configured: a solved head lists no training knobs, a trained run its steps and the epochs
    # they made; the machinery's keys (memory, logging, checkpoints, evaluation batching) are not hyperparameters.
    hyper = card.content[card.content.index("- Hyperparameters:"):].split("\n\n")[0]
    assert "pypi.org/project/hftl" not in card.content  # a page that does not exist
    for internal in ("cpu_mmap_threshold_mib", "eval_batch_tokens", "log_every", "keep_last", "feature_cache_dir", "min_steps"):
        assert internal not in hyper, internal
    history = read_json(run.out / "results.json")["history"]
    if run.mode == "lora":  # the adapter's shape is stated, not left to the reader to guess from the defaults
        assert "- Transfer options that ran: adapt.lora_r=8, adapt.lora_alpha=16, adapt.lora_dropout=0.1, adapter on " in card.content
    else:
        assert "Transfer options that ran" not in card.content  # full and head turn on no option
    if run.mode == "head":
        assert "learning_rate" not in hyper and "optimizer steps" not in hyper
        assert not (run.out / "learning_curves.png").exists()  # nothing trained: no curve to draw
    else:
        steps = history[-1]["step"]
        assert f"  - optimizer steps: {steps}" in hyper and f"  - epochs run: {history[-1]['epoch']}" in hyper
        assert "  - learning_rate: " in hyper and (run.out / "learning_curves.png").is_file()


def test_the_card_inherits_license_and_language_and_names_the_data_set(make_cfg, tiny_bert, tmp_path):
    from huggingface_hub import ModelCard

    from hftl.recipe import train

    base = tmp_path / "base"
    shutil.copytree(tiny_bert, base)
    (base / "README.md").write_text("---\nlicense: mit\nlanguage: de\n---\n# a base model\n")
    cfg = make_cfg(tmp_path, model__name_or_path=str(base), adapt__mode="head", data__dataset_name="Toy reviews")
    train(cfg)
    card = ModelCard.load(str(Path(cfg.output.dir) / "README.md"))
    assert card.data.license == "mit" and card.data.language == "de"
    assert "adapted to **Toy reviews**" in card.content
    assert "model-index" not in card.data.to_dict()  # a name, not a Hub id: no model-index to pass it off as one


def test_saved_config_reloads(run):
    assert load_config(run.out / "hftl_config.yaml") == run.cfg


@pytest.mark.parametrize("run", ["lora"], indirect=True)
def test_lora_adapter_and_merged_model(run):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    adapter = run.out / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert read_json(adapter / "adapter_config.json")["peft_type"] == "LORA"
    adapter_keys = load_file(str(adapter / "adapter_model.safetensors")).keys()
    assert any("lora_A" in k for k in adapter_keys) and any("lora_B" in k for k in adapter_keys)
    merged_keys = set(run.saved)
    assert not [k for k in merged_keys if "lora_" in k or "base_model.model" in k or "modules_to_save" in k or "original_module" in k]
    # the adapter on the base checkpoint computes what the merged model computes
    tokenizer = AutoTokenizer.from_pretrained(str(run.out))
    batch = tokenizer(["great nice", "awful", "sad poor ugly", "fine"], padding=True, return_tensors="pt")
    merged = AutoModelForSequenceClassification.from_pretrained(str(run.out)).eval()
    plain = AutoModelForSequenceClassification.from_pretrained(str(run.checkpoint), num_labels=2)
    # the merged folder has exactly a plain model's weights
    assert {n for n, _ in plain.named_parameters()} <= merged_keys <= set(plain.state_dict())
    unmerged = PeftModel.from_pretrained(plain, str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(unmerged(**batch).logits, merged(**batch).logits, atol=1e-5, rtol=1e-4)
