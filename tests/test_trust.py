"""Every run says whether to trust it (hftl/trust.py, issue 21): majority baseline, collapse, per-class scores,
calibration and temperature scaling, through the task of each kind; end to end on the tiny BERT."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import toy_rows, write_rows
from hftl import hub, trust
from hftl.config import load_config, to_yaml
from hftl.metrics import load_metrics
from hftl.tasks.multi_label import MultiLabel
from hftl.tasks.regression import Regression
from hftl.tasks.single_label import SingleLabel


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assess(task, train_labels, labels, predictions, logits=None):
    """trust.assess on fixed predictions of one 'validation' split."""
    logits = np.zeros((len(labels), task.num_outputs)) if logits is None else logits
    result = {"predictions": {"validation": predictions}, "logits": {"validation": logits}}
    return trust.assess(task, {"train": {"labels": train_labels}, "validation": {"labels": labels}}, result,
                        "Not assessed: one evaluation.", None)


# ---------------------------------------------------------------- majority baseline


def test_majority_baseline_equals_a_hand_count():
    task = SingleLabel(["ham", "spam", "eggs"])
    train = [0, 0, 0, 1, 2, 0, 1]  # 'ham' most often
    labels = [0, 1, 0, 2, 1, 0, 0, 0]
    record = assess(task, train, labels, [0] * len(labels))
    base = record["majority_baseline"]["validation"]
    assert base["prediction"] == "ham"
    # By hand: always 'ham' gets the 5 'ham' rows of 8 right; F1 of ham = 2 * (5/8 * 1) / (5/8 + 1), spam and eggs 0.
    assert base["baseline"]["accuracy"] == pytest.approx(5 / 8)
    assert base["baseline"]["f1"] == pytest.approx((2 * (5 / 8) / (5 / 8 + 1)) / 3)
    # The model predicting 'ham' everywhere is the baseline: not clearly above it, and collapsed.
    assert base["clearly_above"] is False and "NOT clearly above" in base["text"]
    assert record["collapse"]["validation"]["collapsed"] is True and trust.collapsed(record) == ["validation"]
    assert record["collapse"]["validation"]["never_predicted"] == ["spam", "eggs"]
    # A model right on every row is clearly above (its accuracy interval's lower end 0.68 > 5/8).
    good = assess(task, train, labels, labels)
    assert good["majority_baseline"]["validation"]["clearly_above"] is True and not trust.collapsed(good)
    verdicts = {c["check"]: c["verdict"] for c in good["list"]}
    assert verdicts == {"overfitting": "not assessed", "majority baseline": "ok", "collapse": "ok", "calibration": "warning"}


def test_majority_baseline_of_multi_label_and_regression_by_hand():
    ml = MultiLabel(["a", "b", "c"])
    train = [[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 1, 1]]  # a in 3 of 4 (majority), b in 2 of 4 (not more than half), c in 1
    assert ml.majority(train) == [1, 0, 0]
    labels = [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    base = assess(ml, train, labels, [[1, 0, 0]] * 3)["majority_baseline"]["validation"]["baseline"]
    assert base["subset_accuracy"] == pytest.approx(1 / 3)  # only the first row is exactly {a}
    # micro-F1 by hand: predicted a three times, 2 right; 4 true labels in all: P = 2/3, R = 2/4
    assert base["micro_f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    collapse = assess(ml, train, labels, [[0, 0, 0]] * 3)["collapse"]["validation"]
    assert collapse["collapsed"] and collapse["no_label"] == 1.0 and collapse["labels"] == []

    reg = Regression(["y"])
    train, labels = [[1.0], [2.0], [6.0]], [[0.0], [3.0], [6.0]]  # training mean 3
    record = assess(reg, train, labels, [[0.1], [3.0], [5.9]])
    base = record["majority_baseline"]["validation"]
    assert base["prediction"] == pytest.approx(3.0)
    assert base["baseline"]["mse"] == pytest.approx((9 + 0 + 9) / 3) and base["clearly_above"]
    flat = assess(reg, train, labels, [[3.0], [3.01], [2.99]])["collapse"]["validation"]
    assert flat["collapsed"] and flat["variance_ratio"]["y"] < 0.01


# ---------------------------------------------------------------- per-class scores


def test_per_class_rows_equal_scikit_learn():
    from sklearn.metrics import classification_report

    task = SingleLabel(["a", "b", "c", "d"])
    labels = [0, 1, 2, 2, 1, 0, 3, 2, 1, 0]
    preds = [0, 2, 2, 2, 1, 1, 0, 2, 1, 0]  # 'd' never predicted, 'c' over-predicted
    report = classification_report(labels, preds, labels=[0, 1, 2, 3], target_names=task.names, output_dict=True, zero_division=0)
    rows = task.card_rows(labels, preds)
    assert [r["name"] for r in rows] == task.names
    for r in rows:
        want = report[r["name"]]
        assert (r["precision"], r["recall"], r["f1"], r["support"]) == pytest.approx(
            (want["precision"], want["recall"], want["f1-score"], want["support"]))

    ml = MultiLabel(["x", "y", "z"])
    truth, guess = [[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], [[1, 0, 0], [0, 1, 1], [1, 0, 0], [0, 0, 1]]
    report = classification_report(np.array(truth), np.array(guess), target_names=ml.names, output_dict=True, zero_division=0)
    for r in ml.card_rows(truth, guess):
        want = report[r["name"]]
        assert (r["precision"], r["recall"], r["f1"], r["support"]) == pytest.approx(
            (want["precision"], want["recall"], want["f1-score"], want["support"]))


def test_long_label_sets_show_the_worst_and_best_classes_in_the_card():
    names = [f"c{i}" for i in range(30)]
    task = SingleLabel(names)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 30, 600).tolist()
    preds = [y if rng.random() < y / 30 else (y + 1) % 30 for y in labels]  # class i right about i/30 of the time
    record = assess(task, labels, labels, preds)
    table = trust.card_tables(task, record)["validation"]
    rows = record["per_class"]["validation"]
    f1 = sorted(r["f1"] for r in rows)
    assert len(table["rows"]) == 2 * trust.CARD_EXTREMES and "every one is in results.json" in table["note"]
    assert sorted(r["f1"] for r in table["rows"]) == f1[:5] + f1[-5:]
    assert len(rows) == 30  # all in the record results.json gets


# ---------------------------------------------------------------- calibration


def overconfident(n=400, k=3, seed=0):
    """Logits that put ~0.99 on their top class while only ~60% of the rows are right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    top = np.where(rng.random(n) < 0.6, labels, (labels + 1) % k)
    logits = rng.normal(0, 0.3, (n, k))
    logits[np.arange(n), top] += 6.0
    return logits, labels


def test_temperature_scaling_lowers_the_calibration_error_of_an_overconfident_model():
    cfg = load_config(None, ["train.calibrate=true"])
    task = SingleLabel(["a", "b", "c"])
    logits, labels = overconfident()
    before = task.calibration(logits, labels.tolist())
    result = {"logits": {"validation": logits}, "predictions": {"validation": task.predict(logits)},
              "results": {"validation": {}}}
    fitted = task.calibrate(result, {"validation": {"labels": labels}}, cfg, load_metrics(["accuracy"]))
    after = task.calibration(logits, labels.tolist())
    assert fitted["temperature"] > 2 and task.temperature == fitted["temperature"]
    assert fitted["validation_nll_after"] < fitted["validation_nll_before"]
    assert before["ece"] > 0.3 and after["ece"] < before["ece"] / 3 and after["ece_uncalibrated"] == pytest.approx(before["ece"])
    assert result["predictions"]["validation"] == logits.argmax(-1).tolist()  # the decisions do not change
    assert task.model_config() == {"hftl_temperature": task.temperature}

    # Multi-label: one temperature for all labels; the thresholds move with it, so no decision changes.
    ml = MultiLabel(["a", "b"], thresholds=[0.3, 0.7])
    z = np.random.default_rng(1).normal(0, 6, (200, 2))
    truth = (np.random.default_rng(2).random((200, 2)) < 1 / (1 + np.exp(-z / 6))).astype(float)  # true scale: z / 6
    decided = ml.predict(z)
    result = {"logits": {"validation": z}, "predictions": {"validation": decided}, "results": {"validation": {}}}
    ece = ml.calibration(z, truth.tolist())["ece"]
    fitted = ml.calibrate(result, {"validation": {"labels": truth}}, cfg, load_metrics(["micro_f1"]))
    assert 3 < fitted["temperature"] < 12 and ml.calibration(z, truth.tolist())["ece"] < ece
    assert ml.predict(z) == decided and result["predictions"]["validation"] == decided


def test_regression_refuses_train_calibrate():
    from hftl.config import ConfigError

    task = Regression(["y"])
    with pytest.raises(ConfigError, match="train.calibrate"):
        task.configure(load_config(None, ["train.calibrate=true", "train.metrics=[mse]"]))


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("trust_data")
    same = [{"text": "good", "label": "positive" if i % 2 == 0 else "negative"} for i in range(16)]
    noisy = toy_rows(40, seed=3)
    for r in noisy[::3]:  # a third of the labels flipped: a model sure of its words is over-confident here
        r["label"] = "negative" if r["label"] == "positive" else "positive"
    return {"same": write_rows(folder / "same.csv", same), "noisy": write_rows(folder / "noisy.csv", noisy),
            "test": write_rows(folder / "test.csv", toy_rows(12, seed=4))}


def test_a_collapsed_run_is_flagged_and_refused_with_fail_on_collapse(make_cfg, tmp_path, files, capsys):
    """A validation split whose every row is the same text gets one prediction for all rows, whatever the model
    learnt, while its labels are half and half: collapse, and not above the majority baseline."""
    from hftl import cli
    from hftl.recipe import train

    cfg = make_cfg(tmp_path, adapt__mode="head", train__epochs=1, data__validation_file=str(files["same"]),
                   data__test_file=str(files["test"]))
    train(cfg)
    out = Path(cfg.output.dir)
    checks = json.loads((out / "results.json").read_text())["checks"]
    assert checks["collapse"]["validation"]["collapsed"] is True and checks["collapse"]["validation"]["share"] == 1.0
    assert checks["majority_baseline"]["validation"]["clearly_above"] is False
    assert set(checks["per_class"]) == {"validation", "test"}
    card = (out / "README.md").read_text()
    assert "## Checks" in card and "- Collapse (validation): **warning**: COLLAPSED" in card
    assert "- Majority baseline (validation): **warning**: NOT clearly above" in card
    assert "- Negative transfer: not assessed" in card and "On the test split:" in card
    # The test split has its own predictions and picture; the card links them.
    assert len(json.loads((out / "predictions_test.json").read_text())) == 12
    assert (out / "confusion_matrix_test.png").stat().st_size > 1000 and "(confusion_matrix_test.png)" in card
    assert (out / trust.RELIABILITY_PNG).stat().st_size > 1000
    assert "check collapse (validation): WARNING: COLLAPSED" in capsys.readouterr().out

    # With the option on, the same run is an error before anything is written: the folder above stays as it was.
    before = snapshot(out)
    config = tmp_path / "collapse.yaml"
    config.write_text(to_yaml(cfg))
    code = cli.main(["train", str(config), "train.fail_on_collapse=true", "output.overwrite=true"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("hftl: error: train.fail_on_collapse=true: the predictions collapsed on the validation split: 100.0% of the 16 predictions are")
    assert "Nothing was written" in err
    assert snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")) == []


def test_calibrated_run_saves_the_temperature_and_the_folder_reproduces_the_calibrated_scores(make_cfg, tmp_path, files):
    from hftl.recipe import train

    cfg = make_cfg(tmp_path, adapt__mode="full", train__epochs=3, train__calibrate=True,
                   data__validation_file=str(files["noisy"]))
    train(cfg)
    out = Path(cfg.output.dir)
    saved = json.loads((out / "results.json").read_text())
    config = json.loads((out / "config.json").read_text())
    t = saved["calibrated"]["temperature"]
    assert config["hftl_temperature"] == pytest.approx(t) and t > 1.2  # over-confident on the flipped labels
    calibration = saved["checks"]["calibration"]["validation"]
    assert calibration["ece"] < calibration["ece_uncalibrated"]
    assert "Temperature scaling (`train.calibrate`): T=" in (out / "README.md").read_text()

    # pipeline() from the folder gives the calibrated scores: their calibration error is the one recorded, and undoing
    # the temperature (softmax of T * log p) gives the uncalibrated one.
    import csv

    rows = list(csv.DictReader(open(files["noisy"])))
    scores, kind = hub.reload_scores(out, "text-classification", [r["text"] for r in rows])
    assert kind.temperature == 1.0  # folded into the head: the reloaded task adds nothing
    truth = np.array([kind.names.index(r["label"]) for r in rows])
    ece, _ = trust.reliability(scores.max(-1), scores.argmax(-1) == truth)
    assert ece == pytest.approx(calibration["ece"], abs=1e-4)
    raw = torch.as_tensor(t * np.log(scores)).softmax(-1).numpy()
    ece_raw, _ = trust.reliability(raw.max(-1), raw.argmax(-1) == truth)
    assert ece_raw == pytest.approx(calibration["ece_uncalibrated"], abs=1e-4)
    assert kind.readable_from_scores(scores) == json.loads((out / "predictions_validation.json").read_text())


def test_the_reload_check_catches_a_temperature_left_out_of_the_head(make_cfg, tmp_path, files, monkeypatch):
    from hftl.recipe import train
    from hftl.tasks import Task

    monkeypatch.setattr(SingleLabel, "export", lambda self, model, head: model)  # the fold forgotten
    cfg = make_cfg(tmp_path, adapt__mode="head", train__epochs=2, train__calibrate=True, data__validation_file=str(files["noisy"]))
    with pytest.raises(hub.OutputError, match="temperature"):
        train(cfg)
    assert not Path(cfg.output.dir).exists()
    assert Task.export is not SingleLabel.export


def test_multi_label_run_calibrates_with_tuned_thresholds_and_every_split_gets_its_checks(tiny_bert, tmp_path):
    """Thresholds tuned, then the temperature: the saved folder's pipeline() scores are the calibrated ones, and its
    thresholds (moved with the temperature) give the evaluated label sets."""
    from test_multilabel_regression import multi_rows

    from hftl.recipe import train

    noisy = multi_rows(32, 1)
    for r in noisy[::3]:
        r["label"] = ["letter"]  # labels the words do not support: confident scores are wrong here
    data = {"train": write_rows(tmp_path / "train.jsonl", multi_rows(64, 0)), "validation": write_rows(tmp_path / "val.jsonl", noisy),
            "test": write_rows(tmp_path / "test.jsonl", multi_rows(12, 2))}
    out = tmp_path / "out"
    train(load_config(None, [f"model.name_or_path={tiny_bert}", "data.max_length=24", f"output.dir={out}", "train.batch_size=8",
                             "train.epochs=4", "train.min_steps=null", "train.learning_rate=0.005", "adapt.mode=full",
                             f"data.train_file={data['train']}", f"data.validation_file={data['validation']}",
                             f"data.test_file={data['test']}", "train.tune_thresholds=true", "train.calibrate=true"]))
    saved, config = json.loads((out / "results.json").read_text()), json.loads((out / "config.json").read_text())
    t = saved["calibrated"]["temperature"]
    assert config["hftl_temperature"] == pytest.approx(t) and t != pytest.approx(1.0, abs=0.05)
    # The stored thresholds are the tuned ones moved to the new scale: sigmoid(logit(tuned) / T).
    tuned = np.array(list(saved["calibrated"]["thresholds"].values()))
    assert np.allclose(config["hftl_thresholds"], 1 / (1 + np.exp(-np.log(tuned / (1 - tuned)) / t)))
    assert set(saved["checks"]["collapse"]) == set(saved["checks"]["calibration"]) == {"validation", "test"}
    assert (out / "per_label_f1_test.png").is_file() and len(json.loads((out / "predictions_test.json").read_text())) == 12

    scores, kind = hub.reload_scores(out, "text-classification", [r["text"] for r in noisy])
    truth = np.array([[float(n in r["label"]) for n in kind.names] for r in noisy])
    ece = np.mean([trust.reliability(scores[:, j], truth[:, j])[0] for j in range(len(kind.names))])
    assert ece == pytest.approx(saved["checks"]["calibration"]["validation"]["ece"], abs=1e-4)
    assert kind.readable_from_scores(scores) == json.loads((out / "predictions_validation.json").read_text())
