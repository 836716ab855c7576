"""Feature cache (hftl/cache.py) and length-aware batching (hftl/train.py).

Text runs go through the real `hftl.recipe.train` path with conftest's tiny BERT, re-saved without dropout
(so cached and uncached head training see the same features); audio-style inputs use a tiny wav2vec2
built from config and hftl's audio collator.
"""
from __future__ import annotations

import functools
import json
import random
import shutil

import datasets
import pytest
import torch
from conftest import toy_rows, write_rows
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel, DistilBertConfig,
                          DistilBertForSequenceClassification, Wav2Vec2Config, Wav2Vec2FeatureExtractor,
                          Wav2Vec2ForSequenceClassification)

from hftl import adapt, cache, metrics
from hftl.config import ConfigError, load_config
from hftl.data import audio, text
from hftl.recipe import train as run
from hftl.train import _lengths, evaluate, make_accelerator, sorted_order, train_dataloader
from hftl.modalities.text import TEXT


def save_backbone(tiny_bert, folder, seed):
    """conftest's tiny BERT architecture and tokenizer, without dropout, with weights drawn from `seed`."""
    config = BertConfig.from_pretrained(tiny_bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("cache")
    save_backbone(tiny_bert, root / "backbone", seed=0)
    write_rows(root / "train.csv", toy_rows(64, seed=0))
    write_rows(root / "validation.csv", toy_rows(24, seed=1))
    return root


def train(toy, out, *overrides):
    cfg = load_config(None, [
        f"model.name_or_path={toy / 'backbone'}", f"data.train_file={toy / 'train.csv'}", f"data.validation_file={toy / 'validation.csv'}",
        # AdamW on the cache against AdamW through the whole model (the solved head is tests/test_features.py's)
        "adapt.mode=head", "adapt.solve_head=false", "data.max_length=32", "train.epochs=2", "train.batch_size=8", "train.learning_rate=0.01",
        "train.metrics=[accuracy]", f"train.feature_cache_dir={toy / 'features'}", f"output.dir={toy / out}", "output.overwrite=true",
        "output.verify_reload=0", *overrides,
    ])
    run(cfg, TEXT)
    return json.loads((toy / out / "results.json").read_text()), json.loads((toy / out / "predictions_validation.json").read_text())


def hits(results) -> dict[str, bool]:
    return {split: f["hit"] for split, f in results["feature_cache"]["splits"].items()}


def test_cache_hit_and_miss_on_changed_data_preprocessing_or_checkpoint(toy, tiny_bert):
    first, preds = train(toy, "a")
    assert hits(first) == {"train": False, "validation": False}
    again, preds_again = train(toy, "a")
    assert hits(again) == {"train": True, "validation": True}
    assert preds_again == preds and again["results"] == first["results"]

    # Preprocessing: another max_length is another tokenization of both splits.
    assert hits(train(toy, "a", "data.max_length=8")[0]) == {"train": False, "validation": False}

    # Data: the same train file rewritten with other rows; validation is unchanged and still reused.
    write_rows(toy / "train.csv", toy_rows(64, seed=3))
    assert hits(train(toy, "a")[0]) == {"train": False, "validation": True}

    # Checkpoint: other weights in the same folder.
    save_backbone(tiny_bert, toy / "backbone", seed=5)
    assert hits(train(toy, "a")[0]) == {"train": False, "validation": False}
    assert hits(train(toy, "a")[0]) == {"train": True, "validation": True}


def test_cached_head_is_the_saved_model_and_trains_like_the_uncached_path(toy):
    # Same shuffled batches on both paths (no length grouping), no dropout: the same head must come out.
    cached, cached_preds = train(toy, "cached", "train.cache_features=true", "train.group_by_length=false", "output.verify_reload=24")
    plain, plain_preds = train(toy, "plain", "train.cache_features=false", "train.group_by_length=false")
    assert cached["feature_cache"]["head"] == ["classifier"] and plain["feature_cache"] is None
    assert cached_preds == plain_preds
    assert cached["results"]["validation"]["loss"] == pytest.approx(plain["results"]["validation"]["loss"], abs=1e-5)
    a = AutoModelForSequenceClassification.from_pretrained(toy / "cached")
    b = AutoModelForSequenceClassification.from_pretrained(toy / "plain")
    torch.testing.assert_close(a.classifier.weight, b.classifier.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.bert.pooler.dense.weight, b.bert.pooler.dense.weight, atol=0, rtol=0)  # backbone untouched

    # The saved folder, evaluated through the uncached path on every validation row, gives what training reported.
    rows = toy_rows(24, seed=1)
    ds = datasets.Dataset.from_dict({"text": [r["text"] for r in rows], "labels": [a.config.label2id[r["label"]] for r in rows]})
    encoded, collator = text.prepare(datasets.DatasetDict(train=ds, validation=ds), AutoTokenizer.from_pretrained(toy / "cached"),
                                     load_config(None, []).data)
    dl = torch.utils.data.DataLoader(encoded["validation"], batch_size=len(ds), collate_fn=collator)  # one batch, as cached evaluation
    out = evaluate(a, dl, make_accelerator(load_config(None, []).train), metrics.load_metrics(["accuracy"]))
    assert [a.config.id2label[p] for p in out["predictions"]] == cached_preds
    assert out["metrics"]["loss"] == pytest.approx(cached["results"]["validation"]["loss"], abs=1e-5)
    truth = [r["label"] for r in rows]
    assert cached["results"]["validation"]["accuracy"] == pytest.approx(sum(p == t for p, t in zip(cached_preds, truth)) / len(truth))


def test_cache_refuses_modes_that_train_the_backbone(tmp_path, capsys):
    from hftl.cli import main

    # Refused before the model or data are read: the checkpoint named here does not exist.
    with pytest.raises(ConfigError, match=r"train.cache_features=true .*adapt.mode=lora"):
        cache.check_settings(load_config(None, ["train.cache_features=true", "adapt.mode=lora"]))
    assert main(["train", "train.cache_features=true", "adapt.mode=full", f"model.name_or_path={tmp_path / 'missing'}",
                 f"output.dir={tmp_path / 'out'}"]) == 2
    assert "train.cache_features=true needs a frozen backbone" in capsys.readouterr().err
    cache.check_settings(load_config(None, ["train.cache_features=true", "adapt.mode=head"]))
    cache.check_settings(load_config(None, ["train.cache_features=true", "adapt.mode=contrastive"]))  # its head stage is frozen
    assert [m.name for m in adapt.MODES.values() if m.frozen_backbone] == ["head"]  # the only mode the recipe caches whole


def tiny_wav2vec2():
    torch.manual_seed(0)
    return Wav2Vec2ForSequenceClassification(Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, conv_dim=(8, 8), conv_kernel=(10, 3),
        conv_stride=(5, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=8, num_labels=2))


def audio_splits(noise: bool = False) -> datasets.DatasetDict:
    """Waveforms cut into 800-sample windows on the fly (like hftl.data.audio): validation rows hold 1 or 2 windows."""
    rng = random.Random(0)

    def split(n, windows):
        return datasets.Dataset.from_dict({"wave": [[rng.uniform(-1, 1) for _ in range(800 * windows(i))] for i in range(n)],
                                           "labels": [i % 2 for i in range(n)]})

    def transform(batch, train):
        waves = [torch.tensor(w).view(-1, 800) for w in batch["wave"]]
        if noise and train:  # augmentation drawn anew every epoch
            waves = [w + 0.01 * torch.randn_like(w) for w in waves]
        return {"input_values": waves, "labels": batch["labels"]}

    return datasets.DatasetDict(train=split(24, lambda i: 1).with_transform(functools.partial(transform, train=True)),
                                validation=split(10, lambda i: 1 + i % 2).with_transform(functools.partial(transform, train=False)))


def test_cached_head_on_transformed_inputs_with_windows_matches_the_full_model(tmp_path):
    cfg = load_config(None, ["adapt.solve_head=false", "train.epochs=2", "train.batch_size=4", "train.learning_rate=0.01", "train.metrics=[accuracy]",
                             f"train.feature_cache_dir={tmp_path}"])
    model, encoded = tiny_wav2vec2(), audio_splits()
    collator = functools.partial(audio.collate, feature_extractor=Wav2Vec2FeatureExtractor(sampling_rate=800))
    accelerator = make_accelerator(cfg.train)
    result = cache.fit_on_features(model, adapt.head_modules(model, []), encoded, collator, cfg, accelerator)
    assert result["feature_cache"]["head"] == ["projector", "classifier"]
    assert all(not s["hit"] and s["file"] for s in result["feature_cache"]["splits"].values())
    # The returned full model, run on the raw windows (logits averaged per clip), gives what the cached head gave.
    dl = torch.utils.data.DataLoader(encoded["validation"], batch_size=cfg.train.eval_batch_size, collate_fn=collator)
    dl = accelerator.prepare(dl)  # batches on the model's device, as in training
    out = evaluate(result["model"], dl, accelerator, metrics.load_metrics(["accuracy"]))
    assert out["predictions"] == result["predictions"]["validation"]
    assert out["metrics"]["loss"] == pytest.approx(result["results"]["validation"]["loss"], abs=1e-5)


def test_randomly_prepared_rows_are_not_cached(tmp_path):
    model, encoded = tiny_wav2vec2(), audio_splits(noise=True)
    collator = functools.partial(audio.collate, feature_extractor=Wav2Vec2FeatureExtractor(sampling_rate=800))
    head = adapt.head_modules(model, [])
    cfg = load_config(None, [f"train.feature_cache_dir={tmp_path}"])
    accelerator = make_accelerator(cfg.train)
    state = torch.get_rng_state()
    assert cache.fit_on_features(model, head, encoded, collator, cfg, accelerator) is None
    assert torch.equal(torch.get_rng_state(), state)  # the probe's draws are undone: the uncached run draws as without it
    cfg.train.cache_features = True
    with pytest.raises(ConfigError, match="train.cache_features=true, but the training rows are prepared with random draws"):
        cache.fit_on_features(model, head, encoded, collator, cfg, accelerator)


def pad_ids(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def test_replay_is_exact_for_wav2vec2_and_refused_where_the_head_is_not_a_chain():
    # wav2vec2: 'projector' on every frame, masked mean, 'classifier'; the mean commutes with the affine projector.
    w2v = tiny_wav2vec2()
    extractor = Wav2Vec2FeatureExtractor(return_attention_mask=True)
    rows = [{"input_values": torch.randn(n).tolist()} for n in (400, 900, 650)]
    head = adapt.head_modules(w2v, [])
    replayed = cache.replay_head(w2v, head, rows, lambda r: extractor.pad(r, return_tensors="pt"), "cpu")
    assert isinstance(replayed, cache.CachedHead) and replayed.names == ["projector", "classifier"]
    # DistilBERT applies a ReLU between 'pre_classifier' and 'classifier': not a chain of head modules.
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=16))
    reason = cache.replay_head(distil, adapt.head_modules(distil, []), [{"input_ids": [1, 5, 7, 2]}, {"input_ids": [1, 9, 2]}], pad_ids, "cpu")
    assert isinstance(reason, str) and "do not give the model's logits" in reason


@pytest.mark.parametrize("column", ["input_ids", "input_values"])
def test_length_grouping_keeps_every_example_exactly_once(column):
    rng = random.Random(0)
    n = 203  # not a multiple of the batch size
    ds = datasets.Dataset.from_dict({column: [[1] * rng.randint(1, 300) for _ in range(n)], "row": list(range(n))})
    ds = ds.shuffle(seed=1).select(range(150))  # lengths must follow the indices mapping, not the file
    assert _lengths(ds) == [len(x) for x in ds[column]]
    t = load_config(None, ["train.batch_size=8"]).train
    loader = train_dataloader(ds, lambda rows: [(r["row"], len(r[column])) for r in rows], t)
    batches = list(loader)
    seen = [row for b in batches for row, _ in b]
    assert sorted(seen) == sorted(ds["row"])  # every example exactly once
    loader.sampler.set_epoch(1)  # what Accelerate's loader calls each epoch
    again = [row for b in loader for row, _ in b]
    assert sorted(again) == sorted(seen) and again != seen  # once each again, in a new order
    grouped = sum(max(n for _, n in b) for b in batches)
    t.group_by_length = False
    shuffled = sum(max(n for _, n in b) for b in train_dataloader(ds, lambda rows: [(r["row"], len(r[column])) for r in rows], t))
    assert grouped < 0.7 * shuffled  # padded length per batch: grouping must save a lot of it
    order = sorted_order(ds)
    assert sorted(order) == list(range(len(ds))) and [_lengths(ds)[i] for i in order] == sorted(_lengths(ds))
    # train.shuffle_grouped_batches: the same batches, the longest still first, the others in random order (not
    # each group of 50 from its longest to its shortest), the order a function of the seed and the epoch alone
    t.group_by_length, t.shuffle_grouped_batches = True, True
    as_sets = lambda loader: [frozenset(row for row, _ in b) for b in loader]  # noqa: E731
    mixed = train_dataloader(ds, lambda rows: [(r["row"], len(r[column])) for r in rows], t)
    drawn = list(mixed)  # epoch 0, drawn from the same seed as `batches`
    plain, shuffled_order = [frozenset(row for row, _ in b) for b in batches], [frozenset(row for row, _ in b) for b in drawn]
    assert shuffled_order[0] == plain[0] and sorted(shuffled_order, key=sorted) == sorted(plain, key=sorted)
    assert shuffled_order != plain
    longest = [max(n for _, n in b) for b in drawn]
    assert longest[0] == max(longest) and longest[1:] != sorted(longest[1:], reverse=True)
    assert [len(b) for b in drawn] == [len(b) for b in batches] == [8] * 18 + [6]  # the short batch still last
    mixed.sampler.set_epoch(1)
    once = as_sets(mixed)
    mixed.sampler.set_epoch(1)
    assert as_sets(mixed) == once


def test_head_mode_runs_the_backbone_only_over_the_training_rows_its_steps_read(toy, tmp_path, monkeypatch):
    """200 training rows and 3 optimizer steps of 8: the backbone runs over the 24 rows those steps read (and
    validation, and the probe batch), and the head comes out as it would from the whole split's cache."""
    write_rows(tmp_path / "train200.csv", toy_rows(200, seed=7))
    forward_rows = []
    forward = BertModel.forward

    def counting(self, *args, **kwargs):
        forward_rows.append(len(args[0] if args else kwargs["input_ids"]))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(BertModel, "forward", counting)
    data = [f"data.train_file={tmp_path / 'train200.csv'}", f"train.feature_cache_dir={tmp_path / 'features'}",
            "train.group_by_length=false"]  # for the uncached run below: the same shuffled batches as the cached path
    probe = 2 * 8  # replay_head runs the model twice on 8 rows, in every run

    def head_run(out, *overrides):
        forward_rows.clear()
        results, preds = train(toy, tmp_path / out, *data, *overrides)
        head = AutoModelForSequenceClassification.from_pretrained(tmp_path / out).classifier
        return results, preds, head, sum(forward_rows) - probe

    few, few_preds, few_head, rows = head_run("few", "train.max_steps=3")
    assert rows == (3 + 1) * 8 + 24  # the rows 3 steps read, the batch the loader reads ahead, the 24 validation rows
    assert few["feature_cache"]["splits"]["train"] == {**few["feature_cache"]["splits"]["train"], "hit": False, "rows": 32}
    assert [s["step"] for s in few["step_log"]] == [1, 2, 3]

    again, again_preds, _, rows = head_run("again", "train.max_steps=3")  # the same run: both caches reused
    assert rows == 0 and hits(again) == {"train": True, "validation": True}
    assert again_preds == few_preds and again["step_log"] == few["step_log"]

    # Training the head on the whole split's cache (written by a run that reads every row) for the same 3 steps.
    assert head_run("all-rows", "train.epochs=1")[3] == 200
    whole, whole_preds, whole_head, rows = head_run("whole", "train.max_steps=3")
    assert rows == 0 and whole["feature_cache"]["splits"]["train"]["rows"] == 200
    assert whole_preds == few_preds
    # The same head: features of a row computed in other batches may differ in the last bits (padding, GEMM shapes).
    assert [s["step"] for s in whole["step_log"]] == [1, 2, 3]
    assert [s["loss"] for s in whole["step_log"]] == pytest.approx([s["loss"] for s in few["step_log"]], abs=1e-6)
    torch.testing.assert_close(whole_head.weight, few_head.weight, atol=1e-6, rtol=1e-5)

    # And as training through the whole model (no dropout in this backbone) for those steps.
    plain, plain_preds, plain_head, _ = head_run("plain", "train.max_steps=3", "train.cache_features=false")
    assert plain["feature_cache"] is None and plain_preds == few_preds
    torch.testing.assert_close(plain_head.weight, few_head.weight, atol=1e-5, rtol=1e-4)


def test_head_mode_on_the_rows_its_steps_read_resumes_exactly(toy, tmp_path):
    """A resumed run draws the same rows (from step 0), reads the same cache file and continues the same batches."""
    write_rows(tmp_path / "train200.csv", toy_rows(200, seed=7))
    data = [f"data.train_file={tmp_path / 'train200.csv'}", f"train.feature_cache_dir={tmp_path / 'features'}",
            "train.max_steps=5", "train.save_every=2", "train.keep_last=3"]  # step-2 survives the checkpoints of steps 4 and 5
    straight, straight_preds = train(toy, tmp_path / "straight", *data)
    assert straight["feature_cache"]["splits"]["train"]["rows"] == (5 + 1) * 8
    shutil.copytree(tmp_path / "straight.checkpoints" / "step-2", tmp_path / "kept" / "step-2")
    resumed, resumed_preds = train(toy, tmp_path / "resumed", *data, f"train.resume={tmp_path / 'kept' / 'step-2'}")
    assert hits(resumed) == {"train": True, "validation": True}
    assert resumed["step_log"] == straight["step_log"] and resumed["history"] == straight["history"] and resumed_preds == straight_preds
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "straight").classifier.weight
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "resumed").classifier.weight
    assert torch.equal(a, b)
