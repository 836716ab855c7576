"""The evaluate metric modules hftl ships for offline use, against values worked out by hand."""
from __future__ import annotations

import pytest

from hftl import metrics

# 3 classes, 6 rows.
REFS = [0, 0, 0, 1, 1, 2]
PREDS = [0, 1, 2, 1, 1, 1]
# class 0: TP 1, FP 0, FN 2 -> P 1,   R 1/3, F1 1/2
# class 1: TP 2, FP 2, FN 0 -> P 1/2, R 1,   F1 2/3
# class 2: TP 0, FP 1, FN 1 -> P 0,   R 0,   F1 0
EXPECTED = {
    "accuracy": 3 / 6,
    "precision": (1 + 1 / 2 + 0) / 3,   # 1/2
    "recall": (1 / 3 + 1 + 0) / 3,      # 4/9
    "f1": (1 / 2 + 2 / 3 + 0) / 3,      # 7/18
}


@pytest.fixture(scope="module")
def modules():
    return metrics.load_metrics(["accuracy", "f1", "precision", "recall"])


def test_shipped_modules_load_offline(modules):
    assert set(modules) == {"accuracy", "f1", "precision", "recall"}
    for name in modules:
        assert (metrics.SHIPPED / name / f"{name}.py").is_file()


@pytest.mark.parametrize("name", ["accuracy", "f1", "precision", "recall"])
def test_each_module_macro_3_class(modules, name):
    result = modules[name].compute(predictions=PREDS, references=REFS)
    assert set(result) == {name}
    assert result[name] == pytest.approx(EXPECTED[name], abs=1e-12)


def test_compute_all(modules):
    scores = metrics.compute(modules, PREDS, REFS)
    assert scores == pytest.approx(EXPECTED, abs=1e-12)
    assert all(type(v) is float for v in scores.values())


def test_perfect_and_all_wrong(modules):
    assert metrics.compute(modules, [2, 0, 1], [2, 0, 1]) == pytest.approx({k: 1.0 for k in EXPECTED})
    assert metrics.compute(modules, [1, 2, 0], [0, 1, 2]) == pytest.approx({k: 0.0 for k in EXPECTED})


def test_never_predicted_class_counts_zero_without_warning(modules, recwarn):
    # class 2 is never predicted: its precision is 0/0, scored 0 (zero_division=0), so macro P = (1 + 1/2 + 0) / 3
    scores = metrics.compute(modules, [0, 1, 1], [0, 1, 2])
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert not [w for w in recwarn if "zero_division" in str(w.message) or "ill-defined" in str(w.message)]


def test_average_can_be_overridden(modules):
    # micro-averaged f1 of single-label data equals accuracy
    result = modules["f1"].compute(predictions=PREDS, references=REFS, average="micro")
    assert result["f1"] == pytest.approx(EXPECTED["accuracy"])
    weighted = modules["recall"].compute(predictions=PREDS, references=REFS, average="weighted")
    assert weighted["recall"] == pytest.approx((3 * 1 / 3 + 2 * 1 + 1 * 0) / 6)  # weighted recall = accuracy


def test_reloading_modules_keeps_results_independent():
    # each training run loads the modules again; results must not leak between instances
    first = metrics.load_metrics(["accuracy"])
    second = metrics.load_metrics(["accuracy"])
    assert metrics.compute(first, [0, 1, 1, 0], [0, 1, 1, 0])["accuracy"] == 1.0
    assert metrics.compute(second, [0, 1, 1, 0], [1, 0, 1, 0])["accuracy"] == 0.5
    assert metrics.compute(first, [1, 1], [1, 0])["accuracy"] == 0.5
