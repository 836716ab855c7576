"""Token classification (task=token-classification, hftl/tasks/token_classification.py, hftl/modalities/tokens.py) on
the tiny BERT: first-sub-token labels on a word split into several pieces, an entity cut by truncation counted, the
entity metrics' seqeval conventions, every mode training with falling loss and the saved folder's pipeline giving the
evaluated tags, and the one-line refusals of bad tag data and settings that do not fit."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import NEGATIVE, POSITIVE, read_json, write_rows
from hftl.config import ConfigError, load_config
from hftl.data import DataError

# Toy NER: positive words are PER (runs of one or two), negative words LOC, letter words ('xyz' -> x ##y ##z) O.
LETTERS = "xyzab"


def ner_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.randint(2, 6)):
            k = rng.random()
            if k < 0.3:
                span, kind = [rng.choice(POSITIVE) for _ in range(rng.randint(1, 2))], "PER"
            elif k < 0.5:
                span, kind = [rng.choice(NEGATIVE)], "LOC"
            else:
                span, kind = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 3)))], None
            words += span
            tags += ["O"] if kind is None else [f"B-{kind}"] + [f"I-{kind}"] * (len(span) - 1)
        rows.append({"tokens": words, "ner_tags": tags})
    return rows


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ner")
    return {"train": write_rows(folder / "train.jsonl", ner_rows(64, 0)),
            "validation": write_rows(folder / "validation.jsonl", ner_rows(24, 1))}


def ner_cfg(tiny_bert, ner_data, out: Path, *overrides, train=None, validation=None):
    return load_config(None, [
        "task=token-classification", f"model.name_or_path={tiny_bert}", f"data.train_file={train or ner_data['train']}",
        f"data.validation_file={validation or ner_data['validation']}", "data.max_length=24", f"output.dir={out}",
        "train.batch_size=8", "train.eval_batch_size=32", "train.epochs=6", "train.min_steps=null", "train.log_every=1000",
        "train.learning_rate=0.02", *overrides])


# ---------------------------------------------------------------- word pieces and truncation


def test_labels_go_on_each_words_first_piece_and_truncation_cuts_are_counted(tiny_bert, capsys):
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from hftl.modalities import tokens
    from hftl.tasks.token_classification import TokenClassification

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    words, tags = ["great", "xyz", "bad", "ab", "good", "fine"], ["B-PER", "O", "B-LOC", "O", "B-PER", "I-PER"]
    task = TokenClassification(["O", "B-LOC", "B-PER", "I-PER"])
    raw = Dataset.from_dict({"tokens": [words], "ner_tags": [tags]})

    def prepared(*overrides):
        cfg = load_config(None, ["task=token-classification", *overrides])
        return tokens.prepare(DatasetDict(train=task.encode(raw, "train", cfg.data)), tokenizer, cfg)[0]["train"][0]

    row = prepared()
    pieces = tokenizer.convert_ids_to_tokens(row["input_ids"])
    assert pieces == ["[CLS]", "great", "x", "##y", "##z", "bad", "a", "##b", "good", "fine", "[SEP]"]
    O, B_LOC, B_PER, I_PER = range(4)
    assert row["labels"] == [-100, B_PER, O, -100, -100, B_LOC, O, -100, B_PER, I_PER, -100]
    assert "cuts" not in capsys.readouterr().out  # nothing was truncated

    # every piece trains (a B- word's later ones as I-, coded below -100), but each word is still read at its first
    row = prepared("data.label_all_subtokens=true")
    assert row["labels"][1:8] == [B_PER, O, -101 - O, -101 - O, B_LOC, O, -101 - O]
    logits = np.zeros((1, len(row["labels"]), 4))
    logits[0, np.arange(len(row["labels"])), [0] * len(row["labels"])] = 1
    logits[0, 3, B_LOC] = 5  # a later piece's output never becomes a prediction
    assert task.predict_rows(logits, np.array([row["labels"]])) == [[O] * 6]
    assert task.references(np.array([row["labels"]])) == [[B_PER, O, B_LOC, O, B_PER, I_PER]]

    # 9 positions: [CLS] great x ##y ##z bad a ##b [SEP]: 'good fine' (one entity) is cut, and said so
    row = prepared("data.max_length=9")
    assert row["labels"] == [-100, B_PER, O, -100, -100, B_LOC, O, -100, -100]
    assert "cuts 2 word(s) and 1 entity off 1 train row(s)" in capsys.readouterr().out
    # an entity that loses some of its words counts as cut
    assert tokens.cut([None, 0, 1, 1, None], ["B-PER", "I-PER", "I-PER", "O", "B-LOC"]) == (3, 2)


def test_windows_place_every_word_once_where_it_has_most_context(tiny_bert):
    """data.stride on a hand-made sentence: windows of 8 tokens (6 of the sentence) sharing 3, a word in three pieces
    ('xyz') cut across a window's start, and an entity (good fine) across two windows."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from hftl.modalities import tokens
    from hftl.tasks.token_classification import TokenClassification

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    words = ["great", "bad", "ab", "xyz", "good", "fine", "ab", "bad", "nice"]
    tags = ["B-PER", "B-LOC", "O", "O", "B-PER", "I-PER", "O", "B-LOC", "B-PER"]
    full = tokenizer(words, is_split_into_words=True)
    firsts = [j for j, w in enumerate(full.word_ids()) if w is not None and w != full.word_ids()[j - 1]]
    assert len(full["input_ids"]) == 15  # 13 of the sentence: windows from its tokens 0, 3 (inside 'ab'), 6 (inside 'xyz'), 9
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=8, stride=3, return_overflowing_tokens=True)
    windows = [enc.word_ids(i) for i in range(len(enc["input_ids"]))]
    plans = tokens.window_plan(windows, 3)
    # every word: its first piece owned by exactly one window, the one where it sits farthest from an edge
    owned = [(k, w) for k, plan in enumerate(plans) for p in plan if p and p[1] and p[2] for w in [p[0]]]
    assert sorted(w for _, w in owned) == list(range(len(words)))
    start = 0
    for k, (ids, plan) in enumerate(zip(windows, plans)):
        content = [j for j, w in enumerate(ids) if w is not None]
        # a window's tokens are the sentence's from `start`: a first piece is one exactly where the sentence has one
        assert [plan[j][1] for j in content] == [start + 1 + i in firsts for i in range(len(content))]
        for i, j in enumerate(content):
            if plan[j][1] and plan[j][2]:
                here = min(i, len(content) - 1 - i)
                for other, (ids2, plan2) in enumerate(zip(windows, plans)):
                    c2 = [x for x, w in enumerate(ids2) if w is not None]
                    elsewhere = [min(i2, len(c2) - 1 - i2) for i2, x in enumerate(c2) if plan2[x][1] and ids2[x] == ids[j]]
                    assert all(e <= here for e in elsewhere)
        start += len(content) - 3
    assert len(windows) == 4 and [plans[k][1][1] for k in range(4)] == [True, False, False, True]  # two start inside a word

    task = TokenClassification(["O", "B-LOC", "B-PER", "I-PER"])
    cfg = load_config(None, ["task=token-classification", "data.max_length=8", "data.stride=3"])
    raw = task.encode(Dataset.from_dict({"tokens": [words], "ner_tags": [tags]}), "train", cfg.data)
    assert raw["labels"] == [[task.names.index(t) for t in tags]]
    encoded, collator = tokens.prepare(DatasetDict(train=raw, validation=raw), tokenizer, cfg)
    assert len(encoded["validation"]) == len(windows) and encoded["validation"]["window_of"] == [0] * len(windows)
    assert "window_of" not in encoded["train"].column_names  # training needs no joining back
    batch = collator([encoded["validation"][k] for k in range(len(windows))])
    assert batch["window_of"].tolist() == [0] * len(windows) and batch["labels"].shape[0] == len(windows)
    # joined back, the windows give each word's tag once, in order, as the unwindowed sentence does
    labels = batch["labels"].numpy()
    logits = np.eye(4)[np.where(labels >= 0, labels, 0)]
    joined_logits, joined_labels = tokens.merge_windows(logits, labels, batch["window_of"].numpy())
    assert task.references(joined_labels) == raw["labels"]
    assert task.predict_rows(joined_logits, joined_labels) == task.references(joined_labels)
    with pytest.raises(ConfigError, match="data.stride=6: windows of data.max_length=8 tokens hold 6"):
        tokens.prepare(DatasetDict(train=raw), tokenizer, load_config(None, ["task=token-classification", "data.max_length=8",
                                                                              "data.stride=6"]))


# ---------------------------------------------------------------- metrics


def test_entity_metrics_follow_seqeval_conventions():
    from hftl.metrics import load_metrics
    from hftl.tasks.token_classification import TokenClassification

    # seqeval's README example: MISC predicted one word too early, PER right: precision = recall = F1 = 0.5, accuracy 0.8
    true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    task = TokenClassification(["O", "B-MISC", "I-MISC", "B-PER", "I-PER"])
    ids = lambda rows: [[task.names.index(t) for t in r] for r in rows]  # noqa: E731
    modules = load_metrics(list(task.metric_names))
    scores = task.compute(modules, ids(pred), ids(true))
    assert scores == pytest.approx({"entity_f1": 0.5, "entity_precision": 0.5, "entity_recall": 0.5, "token_accuracy": 0.8})
    # non-strict (conlleval) mode: an I- that starts a chunk is an entity of its type; B- after B- splits entities
    scores = task.compute(modules, ids([["I-PER", "I-PER", "O"], ["B-PER", "B-PER", "O"]]), ids([["B-PER", "I-PER", "O"], ["B-PER", "I-PER", "O"]]))
    assert scores["entity_precision"] == pytest.approx(1 / 3) and scores["entity_recall"] == pytest.approx(1 / 2)


# ---------------------------------------------------------------- grouped batches


def test_grouped_batches_weigh_every_labelled_word_the_same():
    """With length-grouped batches a token task's batch loss is its summed word loss over the mean labelled words per
    batch: over an epoch, a batch of one short sentence and one of a long one add up to the per-word mean loss times
    the batches, as random batches give on average, instead of each batch's own mean counting once."""
    import torch
    from datasets import Dataset

    from hftl.config import TrainConfig
    from hftl.tasks.token_classification import CONTINUATION, IGNORE, TokenClassification
    from hftl.train import labelled_per_batch

    # row 0: 1 labelled word; row 1: 5 labelled positions (one a later piece trained under label_all_subtokens)
    labels = [[IGNORE, 1, IGNORE], [IGNORE, 0, 2, CONTINUATION - 2, 0, 1, IGNORE, IGNORE]]
    ds = Dataset.from_dict({"input_ids": [[1] * len(r) for r in labels], "labels": labels})
    assert labelled_per_batch(ds, TrainConfig(group_by_length=True), batches=2) == 3.0
    assert labelled_per_batch(ds, TrainConfig(group_by_length=False), batches=2) is None  # random: each batch's mean
    assert labelled_per_batch(ds.remove_columns("input_ids"), TrainConfig(group_by_length=True), batches=2) is None  # no lengths, no groups

    task = TokenClassification(["O", "B-PER", "I-PER"])
    torch.manual_seed(0)
    logits = [torch.randn(1, len(r), 3) for r in labels]
    batch_labels = [torch.tensor([r]) for r in labels]
    weighted = sum(task.loss(x, y, reduction="sum") / 3.0 for x, y in zip(logits, batch_labels))
    per_word = torch.cat([task.loss(x, y, reduction="none") * (y != IGNORE).sum() for x, y in zip(logits, batch_labels)]).sum() / 6
    assert weighted == pytest.approx(float(per_word) * 2)
    assert weighted != pytest.approx(float(sum(task.loss(x, y) for x, y in zip(logits, batch_labels))))


def test_token_classification_groups_its_batches_in_random_order_by_default(ner_data):
    from hftl.tasks import for_config, resolve_metrics

    for overrides, grouped, shuffled in (([], True, True), (["train.group_by_length=false"], False, True),
                                         (["train.shuffle_grouped_batches=false"], True, False),
                                         # LoRA keeps random batches (grouped ones cost it F1 on CoNLL-2003), unless asked
                                         (["adapt.mode=lora"], False, True), (["adapt.mode=lora", "train.group_by_length=true"], True, True),
                                         (["adapt.mode=lpft"], True, True)):
        cfg = load_config(None, ["task=token-classification", f"data.train_file={ner_data['train']}", *overrides])
        t = for_config(cfg).configure(cfg).train
        assert (t.group_by_length, t.shuffle_grouped_batches) == (grouped, shuffled), overrides
        # compare and tune derive other modes' runs from this: the batch order is left for each run's mode
        assert resolve_metrics(cfg).train.group_by_length == cfg.train.group_by_length
    # rows of one label keep transformers' order: a group of batches from its longest to its shortest
    cfg = load_config(None, ["data.problem_type=single_label", "adapt.mode=lora"])
    t = for_config(cfg).configure(cfg).train
    assert (t.group_by_length, t.shuffle_grouped_batches) == (True, False)


# ---------------------------------------------------------------- every mode


# "options": full fine-tuning with every piece labelled, layer-wise rates, L2-SP, label smoothing, a carved validation
# split, after masked-LM pretraining on the training sentences
# "stride", "stride-head": full and head mode with sentences in windows of 10 tokens sharing 3 (data.stride), which
# most rows overflow
@pytest.fixture(scope="module", params=["full", "head", "head-adamw", "lora", "partial", "gradual", "lpft", "options", "stride",
                                        "stride-head"])
def run(request, tiny_bert, ner_data, tmp_path_factory):
    from hftl.recipe import train

    out = tmp_path_factory.mktemp(f"ner_{request.param}") / "out"
    # full at half the others' rate: on these 48 steps of length-grouped batches in random order (the token default)
    # 0.02 reached validation entity F1 0.31, 0.01 0.59 (random batches at 0.02: 0.43)
    extra = {"full": ["train.learning_rate=0.01"],
             "lpft": ["adapt.lp_epochs=2", "train.epochs=4"], "head-adamw": ["adapt.mode=head", "adapt.solve_head=false"],
             "options": ["adapt.mode=full", "data.label_all_subtokens=true", "adapt.layer_lr_decay=0.8", "adapt.l2sp=0.01",
                         "train.label_smoothing=0.1", "data.validation_fraction=0.25", "adapt.pretrain=mlm", "adapt.pretrain_epochs=1"],
             "stride": ["adapt.mode=full", "data.max_length=10", "data.stride=3"],
             "stride-head": ["adapt.mode=head", "data.max_length=10", "data.stride=3"]}.get(request.param, [])
    mode = [] if request.param in ("options", "head-adamw", "stride", "stride-head") else [f"adapt.mode={request.param}"]
    cfg = ner_cfg(tiny_bert, ner_data, out, *mode, *extra)
    if request.param == "options":  # validation carved from train: its rows are the reload check's
        cfg.data.validation_file = None
    results = train(cfg)
    return request.param, out, results


def test_every_mode_trains_with_falling_loss_and_the_pipeline_gives_the_evaluated_tags(run, ner_data):
    from transformers import pipeline

    from hftl.metrics.entities import entities as entity_spans
    from hftl.tasks import from_model_config
    from hftl.tasks.token_classification import pipeline_scores

    mode, out, results = run
    saved = read_json(out / "results.json")
    assert saved["task"] == "token_classification"
    assert set(results["validation"]) == {"entity_f1", "entity_precision", "entity_recall", "token_accuracy", "loss"}
    if mode in ("head", "stride-head"):  # solved on the cached features of each word's first piece, not trained
        assert saved["solver"]["method"] == "logistic regression (L2, lbfgs) on each word's first-piece features"
        assert saved["solver"]["metric"] == "per-word log-loss" and results["validation"]["entity_f1"] > 0.3
    else:
        history = [h for h in saved["history"] if h.get("stage", "fine_tune") == "fine_tune"]
        assert history[-1]["train_loss"] < history[0]["train_loss"], history
        assert history[-1]["eval_loss"] < history[0]["eval_loss"], history
    if mode == "options":  # validation was carved from train; the run's own reload check compared its rows
        assert len(read_json(out / "predictions_validation.json")) == 16
        assert saved["pretrain"]["objective"] == "mlm" and saved["pretrain"]["source"] == "the training texts"
        return
    predictions = read_json(out / "predictions_validation.json")
    rows = [json.loads(line) for line in ner_data["validation"].read_text().splitlines()]
    if mode in ("head", "head-adamw", "lpft"):  # the frozen backbone ran once: the cache holds a vector per word (its first piece)
        from datasets import Dataset

        cache = saved["feature_cache"]
        assert cache["head"] == ["classifier"]
        cached = Dataset.from_file(cache["splits"]["validation"]["file"])
        assert {r: len(f) // 32 for r, f in zip(cached["row"], cached["features"])} == {i: len(r["tokens"]) for i, r in enumerate(rows)}
    # What the run's own reload check compared, redone here: word-level tags of pipeline('token-classification').
    assert [len(p) for p in predictions] == [len(r["tokens"]) for r in rows]  # under data.stride too: every word
    if mode.startswith("stride"):
        assert saved["feature_cache"]["splits"]["validation"]["rows"] > len(rows) if mode == "stride-head" else True
    scores, task = pipeline_scores(out, [r["tokens"] for r in rows])
    assert task.readable_from_scores(scores) == predictions
    # every tag's probability per word, so a mixed-precision run's near-ties are measured, not guessed
    assert all(np.allclose(s.sum(-1), 1) for s in scores)
    row = scores[0]
    assert task.near_tie(row, predictions[0]) == 0
    second = [task.names[int(j)] for j in np.argsort(row, -1)[:, -2]]
    assert task.near_tie(row, second) == pytest.approx(max(np.sort(row, -1)[:, -1] - np.sort(row, -1)[:, -2]))
    tagger = pipeline("token-classification", model=str(out), device=-1)
    config = tagger.model.config
    assert config.architectures == ["BertForTokenClassification"] and from_model_config(config).name == "token_classification"
    if mode.startswith("stride"):  # the windows joined back: hftl predict and evaluate read them as training did
        assert "stride=3" in (out / "README.md").read_text()
        check_predict_and_evaluate(out, ner_data, rows, predictions, results)
        return
    # What the card tells users to run: entities grouped from the first pieces' tags are the evaluated ones.
    for row, tags in zip(rows, predictions):
        found = tagger(" ".join(row["tokens"]), aggregation_strategy="first")
        words = [(e["entity_group"], e["word"]) for e in found]
        assert words == [(kind, " ".join(row["tokens"][a:b + 1])) for kind, a, b in entity_spans([tags])], (row, tags)


    if mode == "full":
        check_card(out, results)
        check_predict_and_evaluate(out, ner_data, rows, predictions, results)


def check_card(out: Path, results: dict) -> None:
    """Full fine-tuning learns the entities; the card lists each entity type's scores and how to reload the model."""
    assert results["validation"]["entity_f1"] > 0.4  # the untrained model's is ~0.1 on these rows
    card = (out / "README.md").read_text()
    assert "token classification: 4 IOB2 tags" in card and 'aggregation_strategy="first"' in card
    assert "| PER |" in card and "| LOC |" in card
    assert (out / "per_entity.png").stat().st_size > 1000


# ---------------------------------------------------------------- one-line refusals


def _bad(tmp_path, rows, name="bad.jsonl"):
    return write_rows(tmp_path / name, rows)


@pytest.mark.parametrize("rows,role,message", [
    ([{"tokens": ["good", "bad"], "ner_tags": ["B-PER"]}], "train", "row 1 (file '{train}') has 2 words ('tokens') but 1 tags"),
    ([{"tokens": ["x", "good"], "ner_tags": ["O", "I-PER"]}], "train", "row 1 (file '{train}') is not IOB2: 'I-PER' at word 1 follows 'O': in IOB2 an entity starts with B-PER (for IOB1 data, where I- starts an entity, set data.tag_scheme=iob1)"),
    ([{"tokens": ["x", "good"], "ner_tags": ["O", "B-ORG"]}], "validation", "row 1 (file '{validation}') has tag(s) ['B-ORG'] that the train split never has"),
])
def test_bad_tag_rows_are_refused_in_one_line_naming_the_row(tiny_bert, ner_data, tmp_path, rows, role, message):
    from hftl.recipe import train

    good = ner_rows(8, 5)
    files = {"train": _bad(tmp_path, good + rows, "train.jsonl") if role == "train" else ner_data["train"],
             "validation": _bad(tmp_path, good[:1] + rows, "validation.jsonl") if role == "validation" else ner_data["validation"]}
    if role == "train":
        message = message.replace("row 1", f"row {len(good)}")
    with pytest.raises(DataError) as e:
        train(ner_cfg(tiny_bert, ner_data, tmp_path / "out", train=files["train"], validation=files["validation"]))
    assert message.format(**files) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides,message", [
    (["train.class_weights=[1, 2, 2, 2]"], "train.class_weights=[1, 2, 2, 2]: not implemented for task=token-classification"),
    (["adapt.align=coral", f"data.target={Path(__file__)}"], "adapt.align=coral: not implemented for task=token-classification"),
    (["data.stride=30"], "data.stride=30: windows of data.max_length=24 tokens hold 22 of the sentence's"),
    (["adapt.mode=contrastive"], "adapt.mode=contrastive pairs rows of the same class"),
])
def test_settings_that_do_not_fit_tokens_are_refused_in_one_line(tiny_bert, ner_data, tmp_path, overrides, message):
    from hftl.recipe import train

    with pytest.raises(ConfigError) as e:
        train(ner_cfg(tiny_bert, ner_data, tmp_path / "out", *overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_task_and_the_problem_type_go_together():
    assert load_config(None, ["task=token-classification"]).data.problem_type == "token_classification"
    with pytest.raises(ConfigError, match="set task=token-classification"):
        load_config(None, ["data.problem_type=token_classification"])
    with pytest.raises(ConfigError, match="data.problem_type=multi_label; set data.problem_type=auto"):
        load_config(None, ["task=token-classification", "data.problem_type=multi_label"])


def check_predict_and_evaluate(out: Path, ner_data, rows: list[dict], predictions: list, results: dict) -> None:
    """`hftl predict` tags an unlabelled file's words as training evaluated them; `hftl evaluate` scores the labelled
    validation file as training did."""
    from hftl.predict import evaluate, predict

    unlabelled = write_rows(out.parent / "words.jsonl", [{"tokens": r["tokens"]} for r in rows])
    assert predict(str(out), str(unlabelled), str(out.parent / "tags.jsonl")) == len(rows)
    lines = [json.loads(line) for line in (out.parent / "tags.jsonl").read_text().splitlines()]
    assert [line["tags"] for line in lines] == predictions
    first = next(line for line in lines if line["entities"])
    start, end, kind = first["entities"][0]["start"], first["entities"][0]["end"], first["entities"][0]["type"]
    assert first["tags"][start] in (f"B-{kind}", f"I-{kind}") and all(t == f"I-{kind}" for t in first["tags"][start + 1:end])
    report = evaluate(str(out), str(ner_data["validation"]), str(out.parent / "evaluated"))
    assert report["metrics"] == pytest.approx(results["validation"], abs=1e-5)


def test_tag_ids_named_by_label_names_and_non_iob2_tag_names(tmp_path):
    from datasets import ClassLabel, Dataset, Sequence

    from hftl.tasks.token_classification import TokenClassification

    cfg = load_config(None, ["task=token-classification", "data.label_names=[O, B-PER, I-PER, B-LOC]"]).data
    ids = Dataset.from_dict({"tokens": [["good", "nice", "x"], ["bad"]], "ner_tags": [[1, 2, 0], [3]]})
    task = TokenClassification.read(ids, cfg)
    assert task.names == ["O", "B-PER", "I-PER", "B-LOC"]
    assert task.encode(ids, "train", cfg)["labels"] == [[1, 2, 0], [3]]
    # a Hub data set's Sequence(ClassLabel) names its own tags
    hub = ids.cast_column("ner_tags", Sequence(ClassLabel(names=["O", "B-PER", "I-PER", "B-LOC"])))
    plain = load_config(None, ["task=token-classification"]).data
    assert TokenClassification.read(hub, plain).names == task.names
    with pytest.raises(DataError, match="holds tag ids; name them with data.label_names"):
        TokenClassification.read(ids, plain)
    iobes = Dataset.from_dict({"tokens": [["good", "x"]], "ner_tags": [["S-PER", "O"]]})
    with pytest.raises(DataError, match="has tag 'S-PER'; token classification reads IOB2 tags"):
        TokenClassification.read(iobes, plain)


def test_iob1_tags_are_converted_on_request():
    from datasets import Dataset

    from hftl.tasks.token_classification import TokenClassification, iob1_to_iob2

    assert iob1_to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]) == ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"]
    rows = Dataset.from_dict({"tokens": [["good", "nice", "fine", "x", "bad"]], "ner_tags": [["I-PER", "I-PER", "B-PER", "O", "I-LOC"]]})
    cfg = load_config(None, ["task=token-classification", "data.tag_scheme=iob1"]).data
    task = TokenClassification.read(rows, cfg)
    assert set(task.names) == {"O", "B-PER", "I-PER", "B-LOC", "I-LOC"}
    assert task.readable(task.encode(rows, "train", cfg)["labels"]) == [["B-PER", "I-PER", "B-PER", "O", "B-LOC"]]


# ---------------------------------------------------------------- choosing a checkpoint, and comparing modes


def test_rank_scores_each_words_features_and_head_mode_reads_them_back(tiny_bert, sentiment, ner_data, tmp_path, capsys):
    """'sentiment' pushes the PER (positive) and LOC (negative) words' embeddings apart: its word features rank first."""
    from hftl import cli
    from hftl.rank import words
    from hftl.tasks.token_classification import CONTINUATION

    data = ["task=token-classification", f"data.train_file={ner_data['train']}", f"data.validation_file={ner_data['validation']}",
            "data.max_length=24", f"train.feature_cache_dir={tmp_path / 'features'}"]
    assert cli.main(["rank", "--models", str(tiny_bert), f"scratch:{sentiment}", str(sentiment), *data, "--out", str(tmp_path / "r.json")]) == 0
    result = read_json(tmp_path / "r.json")
    assert result["task"] == "token-classification" and result["labels"] == ["O", "B-LOC", "B-PER", "I-PER"]
    assert [m["model"] for m in result["models"]][0] == str(sentiment)
    assert all(m["feature_dim"] == 32 and m["feature_cache"] == "computed" and np.isfinite(m["logme"]) for m in result["models"])
    assert "| 1 | " + str(sentiment) in capsys.readouterr().out

    out = tmp_path / "head"  # the winner's head trains on the word features ranking stored
    assert cli.main(["train", f"model.name_or_path={sentiment}", "adapt.mode=head", *data, "output.verify_reload=0", f"output.dir={out}"]) == 0
    cache = read_json(out / "results.json")["feature_cache"]["splits"]["train"]
    best = result["models"][0]
    assert cache["hit"] and cache["file"] == best["cache_file"]

    # a row's cached vectors are its labelled pieces': a later piece (data.label_all_subtokens) is not a word
    x, y = words([np.arange(6.0), np.arange(6.0, 8.0)], [[2, CONTINUATION - 3, 0], [1]])
    assert y.tolist() == [2, 0, 1] and x.tolist() == [[0, 1], [4, 5], [6, 7]]


def test_compare_counts_budgets_in_sentences(tiny_bert, ner_data, tmp_path, capsys):
    from hftl import cli

    args = ["compare", "--modes", "head", "--seeds", "0", "1", "--lr-scales", "1", "--out", str(tmp_path / "cmp"),
            "task=token-classification", f"model.name_or_path={tiny_bert}", f"data.train_file={ner_data['train']}",
            f"data.validation_file={ner_data['validation']}", "data.max_length=24", "train.batch_size=8", "train.max_steps=4",
            "output.verify_reload=0"]
    assert cli.main([*args, "--labels-per-class", "5"]) == 2
    assert "give the budget in labelled sentences with --train-rows" in capsys.readouterr().err
    assert cli.main([*args, "--labels-per-class", "5", "--train-rows", "5"]) == 2
    assert "--labels-per-class and --train-rows both given" in capsys.readouterr().err

    assert cli.main([*args, "--train-rows", "5", "--mode-lr", "lora=1e-3"]) == 2
    assert "--mode-lr lora=0.001: give MODE=RATE with a positive rate for modes this compare runs (scratch, head); lora does not run" \
        in capsys.readouterr().err

    # scratch at its own rate (--mode-lr), head at the config's
    assert cli.main([*args, "--train-rows", "16", "all", "--mode-lr", "scratch=0.02"]) == 0, capsys.readouterr().err
    assert {p.name for p in (tmp_path / "cmp" / "runs").iterdir()} >= {"scratch-rows16-lr0.02-s0", "head-all-lr5e-05-s1"}
    report = read_json(tmp_path / "cmp" / "report.json")
    assert report["budget_unit"] == "train_rows" and report["metric"] == "entity_f1"
    assert {(g["mode"], g["budget"]) for g in report["groups"]} == {(m, b) for m in ("scratch", "head") for b in ("16", "all")}
    run = load_config(tmp_path / "cmp" / "runs" / "head-rows16-lr5e-05-s1" / "hftl_config.yaml")
    assert run.data.max_train_samples == 16 and run.data.samples_per_class is None and run.train.seed == 1
    assert read_json(tmp_path / "cmp" / "runs" / "head-rows16-lr5e-05-s1" / "results.json")["feature_cache"]["splits"]["train"]["rows"] == 16
    text = (tmp_path / "cmp" / "report.md").read_text()
    assert "| mode | training rows | learning rate |" in text and "- head, 16 training rows: " in text
    assert "--train-rows 16 all --lr-scales 1 --mode-lr scratch=0.02" in text
    assert "One rate per mode and budget (--lr-scales 1): the config's 5e-05 (scratch 0.02 by --mode-lr) times 1" in text
    # --mode-lr naming every mode that ran: no config rate is in play, and the report does not name one
    from hftl.compare import _markdown

    report["lr"]["per_mode"] = {"scratch": 0.02, "head": 1e-3}
    assert "(--lr-scales 1): the rates --mode-lr gave (scratch 0.02, head 0.001) times 1" in _markdown(report)


def test_the_solved_head_scores_validation_tags_the_few_training_sentences_lack():
    """A budget of 16 CoNLL sentences may hold no I-LOC while validation does: the penalty is still chosen (that word's
    tag has probability 0, clipped) and the head never predicts the tag it never saw."""
    from hftl.config import TrainConfig
    from hftl.tasks.token_classification import TokenClassification

    task = TokenClassification(["O", "B-PER", "I-PER", "B-LOC"])
    rng = np.random.default_rng(0)
    y, y_val = rng.choice([0, 1, 3], 300), np.r_[rng.choice([0, 1, 3], 100), [2, 2]]
    centres = rng.normal(size=(4, 8)) * 3
    x, x_val = centres[y] + rng.normal(size=(300, 8)), centres[y_val] + rng.normal(size=(102, 8))
    solution, _ = task.solve(x, y, x_val, y_val, TrainConfig(), {})
    assert solution.selected_on == "validation" and np.isfinite([p["score"] for p in solution.path]).all()
    assert solution.weight.shape == (4, 8) and solution.bias[2] == -1e4
    assert (np.argmax(x_val @ solution.weight.T + solution.bias, 1)[:100] == y_val[:100]).mean() > 0.9
