"""Precision and architecture-only checkpoints: what `hftl train` does with train.mixed_precision and
model.from_scratch on a folder that holds a config but no weights."""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hftl.config import ConfigError, ModelConfig, TrainConfig
from hftl.models import load_classifier
from hftl.train import make_accelerator, tensor_core_padding


def test_auto_precision_is_fp32_and_precisions_can_change_within_a_process(tiny_bert):
    collator = lambda: DataCollatorWithPadding(AutoTokenizer.from_pretrained(tiny_bert))  # noqa: E731
    assert make_accelerator(TrainConfig(mixed_precision="auto")).mixed_precision == "no"
    assert tensor_core_padding(collator(), make_accelerator(TrainConfig())).pad_to_multiple_of is None
    # A second run in the same process with another precision (hftl compare, a notebook) gets it.
    bf16 = make_accelerator(TrainConfig(mixed_precision="bf16"))
    assert bf16.mixed_precision == "bf16"
    padded = tensor_core_padding(collator(), bf16)
    assert padded.pad_to_multiple_of == 8
    batch = padded([{"input_ids": [2, 5, 6], "labels": 0}, {"input_ids": [2, 5, 6, 7, 8, 3], "labels": 1}])
    assert batch["input_ids"].shape == (2, 8)
    assert make_accelerator(TrainConfig(mixed_precision="no")).mixed_precision == "no"


def test_from_scratch_needs_only_the_architecture(tiny_bert, tmp_path):
    arch = tmp_path / "arch"
    arch.mkdir()
    for f in tiny_bert.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, arch)
    torch.manual_seed(1)  # tiny_bert's weights were drawn with seed 0
    model, head = load_classifier(AutoModelForSequenceClassification, str(arch), ["neg", "pos"], ModelConfig(from_scratch=True))
    assert head == ["classifier.bias", "classifier.weight"]
    assert model.config.id2label == {0: "neg", 1: "pos"}
    pretrained = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    assert not torch.equal(model.bert.embeddings.word_embeddings.weight, pretrained.bert.embeddings.word_embeddings.weight)
    # The same folder without model.from_scratch has no weights to transfer: the error says so.
    with pytest.raises(ConfigError, match="has no model.safetensors"):
        load_classifier(AutoModelForSequenceClassification, str(arch), ["neg", "pos"], ModelConfig())
