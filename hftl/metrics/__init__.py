"""Evaluation through `evaluate` metric modules that work offline.

`evaluate.load("accuracy")` fetches a script from the Hub, so hftl ships its own metric modules
(folders beside this file) and loads them by path. Any other name is passed to `evaluate.load`,
so Hub metrics still work when online.
"""
from __future__ import annotations

from pathlib import Path

import datasets
import evaluate
import numpy as np

from ..config import SHIPPED_METRICS, ConfigError

SHIPPED = Path(__file__).parent


# What a metric module's predictions and references are, by the task that reports it (hftl/tasks/).
INPUTS = {
    "ids": ("lists of class ids", datasets.Value("int64")),
    "multi_hot": ("lists of 0/1 vectors, one entry per label (multi-label)", datasets.Sequence(datasets.Value("int64"))),
    "values": ("lists of vectors of numbers, one entry per target (regression)", datasets.Sequence(datasets.Value("float64"))),
}


def make_module(name: str, score_fn, citation: str, inputs: str = "ids", **defaults):
    """An `evaluate.Metric` class over a scikit-learn-style score `score_fn(references, predictions, **kwargs)`;
    `defaults` (e.g. average='macro') apply unless the caller passes them."""
    what, feature = INPUTS[inputs]

    class SklearnMetric(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(
                description=f"{name} ({score_fn.__module__}.{score_fn.__name__}), shipped with hftl for offline use.",
                citation=citation,
                inputs_description=f"predictions and references: {what}.",
                features=datasets.Features({"predictions": feature, "references": feature}),
            )

        def _compute(self, predictions, references, **kwargs):
            kwargs = {**defaults, **kwargs}
            if "average" in kwargs:
                kwargs.setdefault("zero_division", 0)
            return {name: float(score_fn(np.asarray(references), np.asarray(predictions), **kwargs))}

    SklearnMetric.__name__ = name.capitalize()
    return SklearnMetric


def per_target(correlation):
    """A score(references, predictions) that averages scipy's `correlation` over target columns; a constant column (no
    spread) correlates 0 (scipy would return nan)."""
    def score(references, predictions) -> float:
        references, predictions = np.atleast_2d(references.T).T, np.atleast_2d(predictions.T).T
        return float(np.mean([correlation(r, p).statistic if np.ptp(r) and np.ptp(p) else 0.0
                              for r, p in zip(references.T, predictions.T)]))

    score.__name__ = correlation.__name__
    return score


def load_metrics(names: list[str]) -> dict[str, evaluate.EvaluationModule]:
    out = {}
    for name in names:
        local = SHIPPED / name / f"{name}.py"
        try:
            out[name] = evaluate.load(str(local) if local.is_file() else name)
        except Exception as e:  # FileNotFoundError (no such metric, or offline), ImportError (its requirements missing)
            raise ConfigError(f"train.metrics: cannot load the metric '{name}' ({type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[0]}). hftl ships {', '.join(SHIPPED_METRICS)} "
                              "(they work offline); other names load from the Hub (needs network).") from e
    return out


def compute(metrics: dict, predictions, references) -> dict[str, float]:
    predictions, references = np.asarray(predictions), np.asarray(references)
    scores = {}
    for metric in metrics.values():
        for key, value in metric.compute(predictions=predictions, references=references).items():
            scores[key] = float(value) if np.ndim(value) == 0 else value
    return scores
