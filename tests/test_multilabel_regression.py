"""Multi-label classification and regression (hftl/tasks/multi_label.py, regression.py), end to end on tiny models:
every mode and option trains through the task (falling loss), the saved folder reloads through pipeline() with the
evaluated predictions, config.json and the card carry the task, and text, speech and images all take both tasks."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import NEGATIVE, POSITIVE, card_results, read_json, write_rows
from hftl.config import load_config

LABELS = ("good", "bad", "letter")  # a row's labels: its words' kinds


def multi_rows(n: int, seed: int) -> list[dict]:
    """Rows of 1-3 words; a row's labels are the kinds of word it has (often two, sometimes one, never none)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        kinds = rng.sample(LABELS, rng.randint(1, 2))
        words = [rng.choice({"good": POSITIVE, "bad": NEGATIVE, "letter": list("xyz")}[k]) for k in kinds]
        rows.append({"text": " ".join(words), "label": sorted(kinds)})
    return rows


def pair_rows(n: int, seed: int) -> list[dict]:
    """Sentence pairs scored by how many positive words they share (0-3, plus noise): an STS-like target."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        shared = rng.randint(0, 3)
        first = [rng.choice(POSITIVE) for _ in range(3)]
        second = first[:shared] + [rng.choice(NEGATIVE) for _ in range(3 - shared)]
        rows.append({"sentence1": " ".join(first), "sentence2": " ".join(second), "score": round(shared + rng.uniform(0, 0.5), 3)})
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tasks_data")
    return {
        "multi_train": write_rows(folder / "multi_train.jsonl", multi_rows(64, 0)),
        "multi_validation": write_rows(folder / "multi_validation.jsonl", multi_rows(24, 1)),
        "multi_target": write_rows(folder / "multi_target.jsonl", [{"text": r["text"]} for r in multi_rows(24, 2)]),
        "pairs_train": write_rows(folder / "pairs_train.csv", pair_rows(64, 0)),
        "pairs_validation": write_rows(folder / "pairs_validation.csv", pair_rows(24, 1)),
        "pairs_target": write_rows(folder / "pairs_target.csv", [{k: r[k] for k in ("sentence1", "sentence2")} for r in pair_rows(24, 2)]),
    }


def cfg_for(kind: str, tiny_bert, data, out: Path, *overrides):
    common = [f"model.name_or_path={tiny_bert}", "data.max_length=24", f"output.dir={out}", "train.batch_size=8",
              "train.eval_batch_size=32", "train.epochs=4", "train.min_steps=null", "train.log_every=1000"]
    if kind == "multi":
        task = [f"data.train_file={data['multi_train']}", f"data.validation_file={data['multi_validation']}", "train.learning_rate=0.005"]
    else:
        task = [f"data.train_file={data['pairs_train']}", f"data.validation_file={data['pairs_validation']}", "data.text_column=sentence1",
                "data.text_pair_column=sentence2", "data.label_column=score", "train.learning_rate=0.003"]
    return load_config(None, [*common, *task, *overrides])


def pipeline_scores(out: Path, inputs: list) -> tuple[np.ndarray, list[str], object]:
    """Every label's score per input, in id order, as transformers.pipeline reports them from the saved folder."""
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(out), device=-1)
    names = [clf.model.config.id2label[i] for i in range(clf.model.config.num_labels)]
    ranked = clf(inputs, top_k=None)
    return np.array([[next(r["score"] for r in row if r["label"] == n) for n in names] for row in ranked]), names, clf.model.config


# ---------------------------------------------------------------- the two tasks, text, three main modes


@pytest.fixture(scope="module", params=["head", "lora", "full"])
def multi_run(request, tiny_bert, data, tmp_path_factory):
    from hftl.recipe import train

    out = tmp_path_factory.mktemp(f"multi_{request.param}") / "out"
    rate = {"lora": ["train.learning_rate=0.02"], "head": ["train.learning_rate=0.05"]}.get(request.param, [])  # adapters, a lone head: faster
    results = train(cfg_for("multi", tiny_bert, data, out, f"adapt.mode={request.param}", "train.epochs=10", *rate))
    return request.param, out, results


def test_multi_label_learns_and_the_saved_folder_reproduces_it(multi_run, data):
    mode, out, results = multi_run
    saved = read_json(out / "results.json")
    assert saved["task"] == "multi_label"
    assert set(results["validation"]) >= {"micro_f1", "macro_f1", "micro_precision", "micro_recall", "subset_accuracy", "loss"}
    # the labels are the words' kinds; predicting every label scores about 0.67 here
    assert results["validation"]["micro_f1"] > 0.72
    if mode == "head":  # a frozen backbone: one logistic regression per label, solved, not trained
        assert saved["solver"]["method"].startswith("one-vs-rest logistic regression")
    else:
        assert saved["history"][-1]["train_loss"] < saved["history"][0]["train_loss"]
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification" and config["hftl_thresholds"] == [0.5, 0.5, 0.5]
    predictions = read_json(out / "predictions_validation.json")
    rows = [json.loads(line) for line in data["multi_validation"].read_text().splitlines()]
    scores, names, _ = pipeline_scores(out, [r["text"] for r in rows])
    assert not np.allclose(scores.sum(1), 1)  # one sigmoid per label, not a softmax over them
    assert [[n for n, s in zip(names, row) if s > 0.5] for row in scores] == predictions
    assert all(isinstance(p, list) and set(p) <= set(LABELS) for p in predictions)


def test_multi_label_card_lists_the_task_metrics_and_each_label(multi_run):
    from huggingface_hub import ModelCard

    _, out, results = multi_run
    card = ModelCard.load(out / "README.md")
    metrics = card_results(card.text)["validation"]
    assert metrics["micro_f1"] == pytest.approx(results["validation"]["micro_f1"], abs=5e-5)
    assert metrics["subset_accuracy"] == pytest.approx(results["validation"]["subset_accuracy"], abs=5e-5)
    assert "3 labels, multi-label" in card.text and "| support | precision | recall | F1 | threshold |" in card.text
    for label in LABELS:
        assert f"| {label} |" in card.text
    assert (out / "per_label_f1.png").stat().st_size > 1000 and not (out / "confusion_matrix.png").exists()


@pytest.fixture(scope="module", params=["head", "lora", "full"])
def pair_run(request, tiny_bert, data, tmp_path_factory):
    from hftl.recipe import train

    out = tmp_path_factory.mktemp(f"pairs_{request.param}") / "out"
    rate = {"lora": ["train.learning_rate=0.02"]}.get(request.param, [])
    results = train(cfg_for("pairs", tiny_bert, data, out, f"adapt.mode={request.param}", *rate))
    return request.param, out, results


def test_regression_on_pairs_learns_and_pipeline_gives_the_evaluated_scores(pair_run, data):
    import csv

    mode, out, results = pair_run
    saved = read_json(out / "results.json")
    assert saved["task"] == "regression"
    assert results["validation"]["pearson"] > 0.5 and results["validation"]["spearman"] > 0.5
    if mode == "head":  # a frozen backbone: the head is solved (ridge), not trained
        assert saved["solver"]["method"].startswith("ridge")
    else:
        assert saved["history"][-1]["train_loss"] < saved["history"][0]["train_loss"]
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == "regression" and config["id2label"] == {"0": "score"}
    targets = [float(r["score"]) for r in csv.DictReader(open(data["pairs_train"]))]
    assert config["hftl_target_mean"] == pytest.approx([np.mean(targets)]) and config["hftl_target_std"] == pytest.approx([np.std(targets)])
    predictions = read_json(out / "predictions_validation.json")
    rows = list(csv.DictReader(open(data["pairs_validation"])))
    scores, _, _ = pipeline_scores(out, [{"text": r["sentence1"], "text_pair": r["sentence2"]} for r in rows])
    # the saved head outputs the targets' own scale (the normalisation is folded in), as evaluation reported them
    assert scores[:, 0] == pytest.approx(predictions, abs=1e-4)
    assert 0 <= np.mean(predictions) <= 4
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    names = set(card_results(card.text)["validation"])
    assert {"mse", "mae", "pearson", "spearman"} <= names and "regression: 1 target(s)" in card.text
    assert (out / "predictions_vs_targets.png").stat().st_size > 1000


# ---------------------------------------------------------------- every other mode and option goes through the task


OTHERS = {  # name -> overrides
    "ia3": ["adapt.mode=ia3", "train.learning_rate=0.02"],
    "partial": ["adapt.mode=partial", "adapt.top_layers=1"],
    "gradual": ["adapt.mode=gradual", "adapt.top_layers=1"],
    # The probe trained, not solved: a solved ridge probe's weak penalty amplifies the dropout noise of stage 2's first
    # steps (training loss far above validation's), which this toy check of a falling loss cannot tell from divergence.
    "lpft": ["adapt.mode=lpft", "adapt.lp_epochs=2", "adapt.solve_head=false"],
    "l2sp+layer_lr_decay": ["adapt.mode=full", "adapt.l2sp=0.01", "adapt.layer_lr_decay=0.8"],
    "coral": ["adapt.mode=full", "adapt.align=coral", "data.target={target}"],
    "reweight": ["adapt.mode=full", "adapt.reweight=true", "data.target={target}"],
    "head-adamw": ["adapt.mode=head", "adapt.solve_head=false", "train.learning_rate=0.05"],
}


@pytest.mark.parametrize("kind", ["multi", "pairs"])
@pytest.mark.parametrize("name", list(OTHERS))
def test_every_mode_and_option_trains_through_the_task(name, kind, tiny_bert, data, tmp_path):
    from hftl.recipe import train

    overrides = [o.format(target=data[f"{kind}_target"]) for o in OTHERS[name]]
    train(cfg_for(kind, tiny_bert, data, tmp_path / "out", *overrides))  # the reload check inside compares every row
    saved = read_json(tmp_path / "out" / "results.json")
    losses = [h["train_loss"] for h in saved["history"]]
    assert losses[-1] < losses[0], losses
    assert saved["task"] == ("multi_label" if kind == "multi" else "regression")


# ---------------------------------------------------------------- options of each task


def test_thresholds_tuned_on_validation_are_stored_and_used(tiny_bert, data, tmp_path):
    from hftl.recipe import train

    out = tmp_path / "out"
    results = train(cfg_for("multi", tiny_bert, data, out, "adapt.mode=full", "train.tune_thresholds=true", "train.class_weights=balanced",
                            "train.epochs=10"))
    config = json.loads((out / "config.json").read_text())
    saved = read_json(out / "results.json")
    assert saved["calibrated"]["tuned_on"] == "validation"
    assert config["hftl_thresholds"] == [saved["calibrated"]["thresholds"][n] for n in sorted(LABELS)]
    assert all(0.05 <= t <= 0.95 for t in config["hftl_thresholds"])
    rows = [json.loads(line) for line in data["multi_validation"].read_text().splitlines()]
    scores, names, _ = pipeline_scores(out, [r["text"] for r in rows])
    want = [[n for n, s, t in zip(names, row, config["hftl_thresholds"]) if s > t] for row in scores]
    assert want == read_json(out / "predictions_validation.json")
    assert "thresholds tuned on validation" in (out / "README.md").read_text()
    assert results["validation"]["micro_f1"] > 0.7


def test_pos_weight_and_huber_shape_the_losses():
    from datasets import Dataset

    from hftl.tasks.multi_label import MultiLabel
    from hftl.tasks.regression import Regression

    task = MultiLabel(["a", "b"])
    task.observe_train(task.add_labels(Dataset.from_dict({"x": [0] * 4}), [[1, 0], [1, 0], [1, 1], [0, 0]]))
    task.configure(load_config(None, ["train.class_weights=balanced"]))
    assert task.pos_weight.tolist() == pytest.approx([1 / 3, 3.0])  # negatives / positives per label
    logits, labels = torch.tensor([[0.3, -1.0], [2.0, 0.5]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    want = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=torch.tensor([1 / 3, 3.0]))
    assert float(task.loss(logits, labels)) == pytest.approx(float(want))
    assert task.predict(np.array([[0.1, -0.1]])) == [[1, 0]] and task.readable([[1, 0], [0, 0]]) == [["a"], []]

    reg = Regression(["y"])
    reg.observe_train(reg.add_labels(Dataset.from_dict({"x": [0] * 4}), [[1.0], [3.0], [5.0], [7.0]]))
    reg.configure(load_config(None, ["train.regression_loss=huber"]))
    mean, std = 4.0, float(np.std([1, 3, 5, 7]))
    out, target = torch.tensor([[0.0], [3.0]]), torch.tensor([[4.0], [4.0 + 3 * std]])
    assert float(reg.loss(out, target)) == pytest.approx(float(F.huber_loss(out, (target - mean) / std)))
    assert reg.predict(np.array([[1.0]])) == [[pytest.approx(mean + std)]]


def test_several_flag_columns_are_one_multi_label_target(tiny_bert, tmp_path):
    """data.label_columns: one 0/1 column per label (the column names are the labels)."""
    from hftl.recipe import train

    rows = [{"text": r["text"], **{k: int(k in r["label"]) for k in LABELS}} for r in multi_rows(48, 3)]
    path = write_rows(tmp_path / "flags.csv", rows)
    out = tmp_path / "out"
    train(load_config(None, [f"model.name_or_path={tiny_bert}", f"data.train_file={path}", "data.label_columns=[good, bad, letter]", "data.max_length=24",
                             "data.validation_fraction=0.25", f"output.dir={out}", "train.epochs=2", "train.batch_size=8",
                             "train.learning_rate=0.005", "adapt.mode=full"]))
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "good", "1": "bad", "2": "letter"} and config["problem_type"] == "multi_label_classification"


# ---------------------------------------------------------------- speech and images take both tasks


def test_speech_regression_and_image_multi_label(tmp_path):
    import soundfile as sf

    from hftl.recipe import train
    from test_audio import WINDOW, tiny_speech_model, tone
    from test_image import stripes, tiny_vit

    rng = np.random.default_rng(0)
    (tmp_path / "clips").mkdir()
    rows = []
    for i in range(32):  # the target: whether the tone is high (1) or low (0), with noise: a regression on pitch
        label = ("low", "high")[i % 2]
        path = tmp_path / "clips" / f"{i}.wav"
        sf.write(path, tone(label, 0.08, rng), 8000)
        rows.append({"path": str(path), "pitch": float(i % 2) + float(rng.uniform(0, 0.2))})
    clips = write_rows(tmp_path / "clips.csv", rows)
    out = tmp_path / "speech"
    results = train(load_config(None, ["task=audio-classification", f"model.name_or_path={tiny_speech_model(tmp_path / 'w2v')}",
                                       f"data.train_file={clips}", "data.audio_column=path", "data.label_column=pitch",
                                       "data.problem_type=regression", f"data.max_duration={WINDOW}", "data.validation_fraction=0.25",
                                       f"output.dir={out}", "adapt.mode=full", "train.epochs=4", "train.batch_size=8",
                                       "train.learning_rate=0.01"]))
    assert json.loads((out / "config.json").read_text())["problem_type"] == "regression"
    assert results["validation"]["mse"] < np.var([r["pitch"] for r in rows])  # better than predicting the mean

    (tmp_path / "images").mkdir()
    rows = []
    for i in range(32):  # h, v, or both stripes overlaid
        kinds = [["h"], ["v"], ["h", "v"]][i % 3]
        pictures = [np.asarray(stripes(k, 16, "L", rng), dtype=np.float32) for k in kinds]
        path = tmp_path / "images" / f"{i}.png"
        from PIL import Image

        Image.fromarray(np.mean(pictures, 0).astype(np.uint8)).save(path)
        rows.append({"image": str(path), "label": kinds})
    listed = write_rows(tmp_path / "images.jsonl", rows)
    out = tmp_path / "vision"
    results = train(load_config(None, ["task=image-classification", f"model.name_or_path={tiny_vit(tmp_path / 'vit')}",
                                       f"data.train_file={listed}", "data.validation_fraction=0.25", f"output.dir={out}",
                                       "adapt.mode=full", "train.epochs=4", "train.batch_size=8", "train.learning_rate=0.005"]))
    assert json.loads((out / "config.json").read_text())["problem_type"] == "multi_label_classification"
    assert all(isinstance(p, list) for p in read_json(out / "predictions_validation.json"))
    assert 0 <= results["validation"]["micro_f1"] <= 1


# ---------------------------------------------------------------- hftl predict / evaluate serve both tasks


def test_predict_and_evaluate_round_trip_both_tasks(multi_run, pair_run, data, tmp_path):
    from hftl import cli

    for (mode, out, results), file in ((multi_run, data["multi_validation"]), (pair_run, data["pairs_validation"])):
        predicted = tmp_path / f"{out.parent.name}.jsonl"
        assert cli.main(["predict", str(out), str(file), "--out", str(predicted)]) == 0
        rows = [json.loads(line) for line in predicted.read_text().splitlines()]
        expected = read_json(out / "predictions_validation.json")
        if "labels" in rows[0]:  # multi-label: the labels above their thresholds, and every label's probability
            assert [r["labels"] for r in rows] == expected and all(set(r["scores"]) == set(LABELS) for r in rows)
        else:
            assert [r["score"] for r in rows] == pytest.approx(expected, abs=1e-4)
        folder = tmp_path / f"eval-{out.parent.name}"
        assert cli.main(["evaluate", str(out), str(file), "--out", str(folder)]) == 0
        metrics = read_json(folder / "metrics.json")["metrics"]
        assert metrics == pytest.approx(results["validation"], abs=1e-5)  # the loss too: the same unit as training's
