"""What the head reads (adapt.pooling, adapt.layer), the solved head, and few-shot training (issue 15)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import read_json, toy_rows, write_rows
from hftl import pooling, solver
from hftl.config import ConfigError


def st_folder(src: Path, dst: Path, mode: str | None, normalize: bool = False, legacy: bool = True) -> Path:
    """A copy of the tiny BERT with a sentence-transformers modules.json + Pooling config (mode None: no ST files)."""
    shutil.copytree(src, dst)
    if mode is None:
        return dst
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (dst / "modules.json").write_text(json.dumps(modules))
    (dst / "1_Pooling").mkdir()
    config = ({f"pooling_mode_{m}_token" if m == "cls" else f"pooling_mode_{m}_tokens": m == mode for m in ("cls", "mean", "max")}
              if legacy else {"pooling_mode": mode})
    (dst / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **config}))
    return dst


def bert_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize("mode,normalize,legacy", [("mean", True, True), ("cls", False, True), ("max", False, False), ("mean", False, False)])
def test_auto_reads_the_sentence_transformers_pooling_config(tiny_bert, tmp_path, mode, normalize, legacy):
    folder = st_folder(tiny_bert, tmp_path / "st", mode, normalize, legacy)
    r = pooling.resolve("auto", None, str(folder), bert_config(folder), "text-classification")
    assert (r.pooling, r.normalize, r.native, r.layers) == (mode, normalize, False, None)
    assert "sentence-transformers" in r.why and r.library == "sentence-transformers"


def test_auto_without_a_pooling_config_is_the_architectures_head(tiny_bert):
    r = pooling.resolve("auto", None, str(tiny_bert), bert_config(tiny_bert), "text-classification")
    assert (r.pooling, r.native, r.library) == ("pooler", True, "transformers")
    for task, native in (("audio-classification", "mean"), ("image-classification", "cls")):
        r = pooling.resolve("auto", None, str(tiny_bert), bert_config(tiny_bert), task)
        assert (r.pooling, r.native) == (native, True)
        assert pooling.resolve(native, None, str(tiny_bert), bert_config(tiny_bert), task).native


def test_explicit_pooling_overrides_the_checkpoint(tiny_bert, tmp_path):
    folder = st_folder(tiny_bert, tmp_path / "st", "mean", normalize=True)
    r = pooling.resolve("pooler", None, str(folder), bert_config(folder), "text-classification")
    assert (r.pooling, r.native, r.normalize) == ("pooler", True, False)
    r = pooling.resolve("max", None, str(folder), bert_config(folder), "text-classification")
    assert (r.pooling, r.native, r.normalize) == ("max", False, False)  # the checkpoint normalised its mean, not a max
    r = pooling.resolve("mean", None, str(folder), bert_config(folder), "text-classification")
    assert r.normalize  # the checkpoint's own pooling, asked for by name, comes with its normalisation


def test_refusals_name_the_key(tiny_bert):
    config = bert_config(tiny_bert)
    with pytest.raises(ConfigError, match="adapt.pooling='avg'"):
        pooling.resolve("avg", None, str(tiny_bert), config, "text-classification")
    with pytest.raises(ConfigError, match="adapt.pooling=max: image-classification"):
        pooling.resolve("max", None, str(tiny_bert), config, "image-classification")
    for layer in (0, 3, -3):  # the tiny BERT has 2 layers
        with pytest.raises(ConfigError, match=f"adapt.layer={layer}: the checkpoint has 2 encoder layers"):
            pooling.resolve("auto", layer, str(tiny_bert), config, "text-classification")
    assert pooling.resolve("auto", 1, str(tiny_bert), config, "text-classification").layers == 1
    assert pooling.resolve("auto", -2, str(tiny_bert), config, "text-classification").layers == 1
    assert pooling.resolve("auto", -1, str(tiny_bert), config, "text-classification").layers is None  # the last: nothing cut


# ---------------------------------------------------------------- the solver


def blobs(n: int, dim: int, k: int, seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 2
    y = rng.integers(0, k, size=n)
    return (centres[y] + rng.normal(size=(n, dim))) * scale, y


@pytest.mark.parametrize("k", [2, 3])
def test_solved_head_equals_scikit_learns_logistic_regression(k):
    from sklearn.linear_model import LogisticRegression

    (x, y), (xv, yv) = blobs(200, 6, k, 0, scale=5.0), blobs(100, 6, k, 1, scale=5.0)
    x, xv = x.astype(np.float32), xv.astype(np.float32)  # features are float32, as the cache stores them
    sol = solver.solve_logistic(x, y, k, xv, yv, lambda clf, z, t: float((clf.predict(z) == t).mean()), grid=(0.1,))
    # The reference: scikit-learn on the features centred and scaled by their root-mean-square deviation.
    mean = x.mean(0)
    scale = np.sqrt(((x - mean) ** 2).mean())
    reference = LogisticRegression(C=0.1, max_iter=5000, tol=1e-8).fit((x - mean) / scale, y)
    logits = xv @ sol.weight.T + sol.bias
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    assert np.allclose(probabilities, reference.predict_proba((xv - mean) / scale), atol=1e-4)
    assert sol.c == 0.1 and sol.selected_on == "validation"


def test_the_penalty_is_chosen_on_validation_and_the_grid_widens_past_its_end():
    x, y = blobs(300, 4, 2, 0)
    xv, yv = blobs(100, 4, 2, 1)
    seen = []

    def score(clf, z, t):  # prefers the weakest penalty: the grid must widen upward until the score stops rising
        seen.append(clf.C)
        return min(clf.C, 100.0)

    sol = solver.solve_logistic(x, y, 2, xv, yv, score, grid=(0.1, 1.0, 10.0))
    assert sol.c == pytest.approx(100.0) and max(seen) > 100.0
    assert [round(e["C"], 3) for e in sol.path][:3] == [0.1, 1.0, 10.0]


def test_small_or_missing_validation_cross_validates_on_the_training_rows():
    x, y = blobs(40, 4, 2, 0)
    sol = solver.solve_logistic(x, y, 2, x[:0], y[:0], lambda clf, z, t: float((clf.predict(z) == t).mean()), grid=(0.01, 1.0))
    assert sol.selected_on.startswith("cross-validation (5 folds")


def test_the_walk_towards_weak_penalties_stops_once_the_score_has_fallen_twice():
    x, y = blobs(300, 4, 2, 0)
    xv, yv = blobs(100, 4, 2, 1)
    seen = []

    def score(clf, z, t):  # peaks at C=0.01 and falls after it: C=1 and beyond (the slow fits) are never needed
        seen.append(clf.C)
        return -abs(np.log10(clf.C) + 2)

    sol = solver.solve_logistic(x, y, 2, xv, yv, score, grid=(1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0))
    assert sol.c == pytest.approx(1e-2) and sol.selected_on == "validation"
    assert max(seen) == pytest.approx(1.0) and 10.0 not in seen  # 0.1 and 1 fell below the best: stop there


def test_a_carved_validation_split_leaves_the_penalty_to_cross_validation(make_cfg, toy_data, tmp_path):
    """The split hftl carves at random from train is one noisy tenth of it: the solver folds the training rows instead,
    and the carved rows are still scored (unseen by any choice). A validation file the user gives is chosen on."""
    out = run(make_cfg, tmp_path, adapt__mode="head", data__validation_file=None, data__validation_fraction=0.25)
    results = read_json(out / "results.json")
    assert results["solver"]["selected_on"].startswith("cross-validation (")
    assert "validation" in results["results"]
    assert "chosen by cross-validation" in (out / "README.md").read_text()
    # (the toy validation file has 16 rows, too few to rank penalties: the training file stands in for a large one)
    given = run(make_cfg, tmp_path / "given", adapt__mode="head", data__validation_file=str(toy_data["train"]))
    assert read_json(given / "results.json")["solver"]["selected_on"] == "validation"


def test_a_chain_of_linear_layers_carries_the_solution():
    layers = [nn.Linear(5, 4), nn.Linear(4, 3)]  # e.g. wav2vec2's projector + classifier
    assert solver.linear_chain(layers, 3) and not solver.linear_chain([nn.Linear(5, 2), nn.Linear(2, 3)], 3)
    w, b = np.random.default_rng(0).normal(size=(3, 5)), np.arange(3.0)
    solver.write_into(layers, w, b)
    x = torch.randn(7, 5)
    assert torch.allclose(nn.Sequential(*layers)(x), x @ torch.tensor(w, dtype=torch.float32).T + torch.tensor(b, dtype=torch.float32), atol=1e-5)


# ---------------------------------------------------------------- runs: each choice round-trips through its loader


def run(make_cfg, tmp_path, **overrides):
    from hftl.recipe import train as main

    cfg = make_cfg(tmp_path, **overrides)
    main(cfg)
    return Path(cfg.output.dir)


def test_mean_pooling_is_saved_for_sentence_transformers_and_reloads_through_it(make_cfg, tiny_bert, tmp_path):
    folder = st_folder(tiny_bert, tmp_path / "st", "mean", normalize=True)
    out = run(make_cfg, tmp_path, model__name_or_path=str(folder), adapt__mode="head", output__verify_reload=16)
    modules = read_json(out / "modules.json")
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize", "Dense"]
    results = read_json(out / "results.json")
    assert results["representation"]["pooling"] == "mean" and results["solver"]["C"] > 0
    card = (out / "README.md").read_text()
    assert "library_name: sentence-transformers" in card and "SentenceTransformer(" in card
    # The folder loads with sentence-transformers alone and gives what training evaluated, row for row.
    validation = [r["text"] for r in toy_rows(16, seed=1)]
    names, logits = pooling.predict_sentence_transformers(out, validation)
    assert [names[i] for i in logits.argmax(-1).tolist()] == read_json(out / "predictions_validation.json")
    assert results["results"]["validation"]["accuracy"] >= 0.9  # the toy words are separable on frozen features


def test_pooler_and_an_earlier_layer_stay_standard_transformers_folders(make_cfg, tiny_bert, tmp_path):
    from transformers import pipeline

    folder = st_folder(tiny_bert, tmp_path / "st", "mean")
    out = run(make_cfg, tmp_path, model__name_or_path=str(folder), adapt__mode="head", adapt__pooling="pooler", adapt__layer=1,
              output__verify_reload=16)
    config = read_json(out / "config.json")
    assert config["num_hidden_layers"] == 1 and config["architectures"] == ["BertForSequenceClassification"]
    assert not (out / "modules.json").exists()
    clf = pipeline("text-classification", model=str(out))
    got = [r["label"] for r in clf([r["text"] for r in toy_rows(16, seed=1)])]
    assert got == read_json(out / "predictions_validation.json")


@pytest.mark.parametrize("mode", ["full", "lora", "lpft"])
def test_modes_that_train_the_backbone_read_the_chosen_pooling(make_cfg, tiny_bert, tmp_path, mode):
    folder = st_folder(tiny_bert, tmp_path / "st", "mean")
    # lpft fits its probe on frozen features, so auto reads the checkpoint's mean; full and lora fine-tune from a fresh
    # head, where auto keeps the architecture's pooler (a pipeline folder), so they ask for the mean by name.
    pooled = {} if mode == "lpft" else {"adapt__pooling": "mean"}
    out = run(make_cfg, tmp_path, model__name_or_path=str(folder), adapt__mode=mode, train__max_steps=8, output__verify_reload=16,
              **pooled)
    assert (out / "modules.json").is_file()  # the reload check inside the run went through sentence-transformers
    results = read_json(out / "results.json")
    assert results["representation"]["pooling"] == "mean"
    if mode == "lpft":  # fine-tuning starts from the probe solved on the mean-pooled features
        assert results["solver"] is None or results["solver"]["C"] > 0
        assert results["results"]["validation"]["accuracy"] >= 0.75
    else:
        losses = [e["loss"] for e in results["step_log"]]
        assert losses[-1] < losses[0]


def test_contrastive_few_shot_leaves_chance(make_cfg, tiny_bert, tmp_path):
    folder = st_folder(tiny_bert, tmp_path / "st", "mean", normalize=True)
    test = write_rows(tmp_path / "test.csv", toy_rows(80, seed=7))
    out = run(make_cfg, tmp_path, model__name_or_path=str(folder), adapt__mode="contrastive", adapt__pair_iterations=5,
              data__samples_per_class=8, data__validation_file=None, data__validation_fraction=0, data__test_file=str(test),
              train__epochs=1, train__batch_size=8, train__learning_rate="0.0003", output__verify_reload=16)
    results = read_json(out / "results.json")
    assert "validation" not in results["results"]
    assert results["results"]["test"]["accuracy"] >= 0.7  # chance is 0.5; 56 of 80 right by chance has p < 0.001
    stages = {e["stage"] for e in results["step_log"]}
    assert stages == {"contrastive"}  # the head was solved: no optimizer steps of its own
    assert results["solver"]["selected_on"].startswith("cross-validation")  # 8 rows, no validation: folds of the training rows
    assert (out / "predictions_test.json").is_file()


def test_rank_scores_the_pooling_the_checkpoint_was_trained_for(make_cfg, tiny_bert, tmp_path):
    from hftl import rank
    from hftl.modalities.text import TEXT

    folder = st_folder(tiny_bert, tmp_path / "st", "max")
    cfg = make_cfg(tmp_path, train__feature_cache_dir=str(tmp_path / "cache"))
    result = rank.rank(cfg, TEXT, [str(folder), str(tiny_bert)])
    assert {r["model"] for r in result["models"]} == {str(folder), str(tiny_bert)}
    # The ST folder's features are its max-pooled tokens (32 wide), the plain folder's its pooler output (32 wide too):
    # different features of the same weights, so different scores.
    scores = {r["model"]: r["logme"] for r in result["models"]}
    assert scores[str(folder)] != scores[str(tiny_bert)]


# ---------------------------------------------------------------- few-shot: in-batch pairs and label templates


def test_in_batch_pairs_loss_is_the_squared_error_over_every_pair(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    from hftl.adapt.contrastive import InBatchPairs, InBatchPairsTask, stage_steps
    from hftl.cache import heads_removed

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()
    inputs = {"input_ids": torch.randint(5, 50, (4, 6), generator=torch.Generator().manual_seed(0)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    labels = torch.tensor([0, 1, 0, 1])
    task = InBatchPairsTask(["similar"])
    loss = task.loss(InBatchPairs(model, ["classifier"])(**inputs).logits, labels)
    with heads_removed(model, ["classifier"]):
        v = torch.nn.functional.normalize(model(**inputs).logits, dim=-1)
    # The six pairs by hand: (0,2) and (1,3) share a label (target 1), the other four do not (target 0).
    want = [(float(v[i] @ v[j]) - (1.0 if labels[i] == labels[j] else 0.0)) ** 2 for i in range(4) for j in range(i + 1, 4)]
    assert float(loss) == pytest.approx(sum(want) / 6, rel=1e-5)
    assert float(task.loss(InBatchPairs(model, ["classifier"])(**{k: x[:1] for k, x in inputs.items()}).logits, labels[:1])) == 0.0
    # SetFit's step count for the same rounds: 16 rows, 20 rounds, 2 pairs per row a round, batch 16 -> 40 steps.
    assert stage_steps(16, 20, 16, 1.0) == 40 and stage_steps(128, 20, 16, 1.0) == 320 and stage_steps(3, 1, 64, 1.0) == 1


def test_label_template_adds_two_rows_per_label_to_train_only(toy_data):
    from hftl.config import DataConfig
    from hftl.data import load_splits

    cfg = DataConfig(train_file=str(toy_data["train"]), validation_file=str(toy_data["validation"]), samples_per_class=3,
                     label_template="This sentence is {}.")
    splits, _ = load_splits(cfg, seed=0)
    names = splits["train"].features["labels"].names
    added = splits["train"].select(range(len(splits["train"]) - 2 * len(names), len(splits["train"])))
    assert len(splits["train"]) == 3 * len(names) + 2 * len(names)
    assert sorted(zip(added["text"], added["labels"])) == sorted((f"This sentence is {n}.", i) for i, n in enumerate(names) for _ in range(2))
    assert not any(t.startswith("This sentence is") for t in splits["validation"]["text"])


@pytest.mark.parametrize("change,message", [
    ({"label_template": "no placeholder"}, r"must hold exactly one '\{\}'"),
    ({"label_template": "{} and {}"}, r"must hold exactly one '\{\}'"),
    ({"label_template": "This is {}.", "text_pair_column": "text"}, r"the rows are pairs"),
])
def test_label_template_refusals(toy_data, change, message):
    from hftl.config import DataConfig
    from hftl.data import DataError, load_splits

    cfg = DataConfig(train_file=str(toy_data["train"]), validation_file=str(toy_data["validation"]), **change)
    with pytest.raises(DataError, match=message):
        load_splits(cfg, seed=0)


def test_label_template_refuses_numeric_label_names(tmp_path):
    from hftl.config import DataConfig
    from hftl.data import DataError, load_splits

    rows = [{"text": f"row {i}", "label": i % 2} for i in range(20)]
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "ids.csv", rows)), label_template="This is {}.")
    with pytest.raises(DataError, match=r"they are numbers \['0', '1'\]: name them with data\.label_names"):
        load_splits(cfg, seed=0)
    cfg = DataConfig(train_file=cfg.train_file, label_template="This is {}.", label_names=["negative", "positive"])
    assert "This is positive." in load_splits(cfg, seed=0)[0]["train"]["text"]
