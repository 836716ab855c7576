"""Regression: one number per row (data.label_column) or several (data.label_columns); the head outputs them
directly, trained with MSE (or Huber, train.regression_loss).

With train.normalize_targets (the default) the loss compares the head's outputs to the targets standardised by the
training split's mean and standard deviation, so a fresh head (outputs near 0) starts in the right range whatever
the targets' scale; predictions are the outputs scaled back. The saved head is rescaled once (`export`), so the model
folder outputs the targets' own scale and `pipeline()` (function_to_apply none for problem_type regression) reports
them as they are; config.json keeps the statistics (hftl_target_mean / hftl_target_std) for the record.
"""
from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.nn import functional as F

from .. import solver
from ..config import Config, ConfigError, DataConfig
from ..data import DataError, label_columns, source_of
from . import Task, last_linear, register

# The reload check's tolerance: pipeline() runs the saved (rescaled) head in fp32, training's evaluation the unscaled
# one; they differ by float rounding, relative to the targets' spread.
RELOAD_RTOL = 1e-4
# The trust checks (hftl/trust.py): collapse when a target's prediction variance is below this share of its variance
# (a spread under a tenth); "clearly above the mean baseline" needs this R-squared against the training mean.
COLLAPSE_VARIANCE = 0.01
BASELINE_MARGIN = 0.05


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


class Regression(Task):
    name = "regression"
    problem_type = "regression"
    metric_names = ("mse", "mae", "pearson", "spearman")
    default_metric_for_best = "mse"
    stratify = False

    def __init__(self, names: list[str], mean=None, std=None):
        super().__init__(names)
        k = len(names)
        self.mean = np.zeros(k) if mean is None else np.asarray(mean, dtype=np.float64)
        self.std = np.ones(k) if std is None else np.asarray(std, dtype=np.float64)
        self.huber = False
        self.normalize = True
        self.observed: tuple[np.ndarray, np.ndarray] | None = None  # the training split's (mean, std)
        self.spread = self.std  # the targets' standard deviations: the reload check's unit
        self.unit = self.std  # the loss's unit: the spread with train.normalize_targets, else 1

    # ------------------------------------------------------------ settings

    def observe_train(self, train: Dataset) -> None:
        y = np.asarray(train["labels"], dtype=np.float64).reshape(len(train), -1)
        std = y.std(0)
        self.observed = (y.mean(0), np.where(std > 1e-12, std, 1.0))

    def configure(self, cfg: Config) -> Config:
        cfg = super().configure(cfg)
        t = cfg.train
        for key, value, off in (("class_weights", t.class_weights, None), ("label_smoothing", t.label_smoothing, 0.0)):
            if value != off:
                raise ConfigError(f"train.{key} is for classification; regression targets have no classes: set "
                                  f"train.{key}={'null' if off is None else off}.")
        if t.tune_thresholds:
            raise ConfigError("train.tune_thresholds is for multi-label classification; set it to false for regression.")
        if t.calibrate:
            raise ConfigError("train.calibrate fits a temperature to class probabilities; regression outputs numbers: set "
                              "train.calibrate=false.")
        self.huber, self.normalize = t.regression_loss == "huber", t.normalize_targets
        if self.observed is not None:
            self.mean, self.std = self.observed if self.normalize else (np.zeros(self.num_outputs), np.ones(self.num_outputs))
            self.spread = self.observed[1]
            self.unit = self.spread if self.normalize else np.ones(self.num_outputs)
        return cfg

    # ------------------------------------------------------------ labels

    @classmethod
    def read(cls, train: Dataset, cfg: DataConfig) -> "Regression":
        names = [str(c) for c in label_columns(cfg)]
        return cls(names)

    def encode(self, ds: Dataset, role: str, cfg: DataConfig) -> Dataset:
        columns = label_columns(cfg)
        values = [ds[c] for c in columns]
        for c, column in zip(columns, values):
            bad = next((i for i, v in enumerate(column) if not _number(v)), None)
            if bad is not None:
                raise DataError(f"the {role} split{source_of(role, cfg)} has {column[bad]!r} in target column '{c}' at row {bad}; "
                                "regression targets are finite numbers.")
        return self.add_labels(ds.remove_columns(columns), [[float(v) for v in row] for row in zip(*values)])

    def check_train(self, train: Dataset, cfg: DataConfig, after: str = "") -> None:
        y = np.asarray(train["labels"]).reshape(len(train), -1)
        if len(y) < 2 or not np.ptp(y, axis=0).any():
            raise DataError(f"the train split{source_of('train', cfg)}{after} has {len(y)} row(s) whose targets are all the same; "
                            "regression needs targets that vary.")

    # ------------------------------------------------------------ loss and predictions

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The error in units of the targets' spread (with train.normalize_targets): training's head outputs standardised
        targets, a saved model's the targets themselves; both give the same loss for the same predictions."""
        logits = logits.float().view(len(logits), -1)
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=logits.device)  # noqa: E731
        unit = as_tensor(self.unit)
        predicted = (logits * as_tensor(self.std) + as_tensor(self.mean)) / unit
        per = (F.huber_loss if self.huber else F.mse_loss)(predicted, labels.float().view(logits.shape) / unit, reduction="none").mean(-1)
        return per if reduction == "none" else per.mean() if reduction == "mean" else per.sum()

    def predict(self, logits: np.ndarray) -> list[list[float]]:
        return self.scores(logits).tolist()

    def references(self, labels: np.ndarray) -> list:
        return np.asarray(labels, dtype=np.float64).reshape(len(labels), -1).tolist()

    def solve(self, x, y, x_val, y_val, t, modules):
        """Ridge regression on frozen features (of the standardised targets), its penalty chosen by train.metric_for_best."""
        if self.huber:
            return "train.regression_loss=huber changes the loss, which the solved ridge regression does not minimise"
        sign = 1 if t.greater_is_better else -1
        z, z_val = (np.asarray(y) - self.mean) / self.std, (np.asarray(y_val) - self.mean) / self.std

        def score(predict, features, targets) -> float:
            outputs = predict(features)
            if t.metric_for_best == "loss":
                return -float(((outputs - targets) ** 2).mean())
            real = lambda a: (a * self.std + self.mean).tolist()  # noqa: E731 - the metrics read the targets' own scale
            return sign * self.compute(modules, real(outputs), real(targets))[t.metric_for_best]

        return solver.solve_ridge(x, z, x_val, z_val, score, seed=t.seed), "ridge regression (L2, closed form)"

    # ------------------------------------------------------------ the saved model

    def export(self, model: nn.Module, head: list[str]) -> nn.Module:
        """Fold the target scaling into the head's last linear layer, so the saved model outputs the targets' scale."""
        if not self.normalize:
            return model
        layer = last_linear(model, head, self.num_outputs)
        with torch.no_grad():
            std = torch.as_tensor(self.std, dtype=layer.weight.dtype, device=layer.weight.device)
            mean = torch.as_tensor(self.mean, dtype=layer.weight.dtype, device=layer.weight.device)
            layer.weight.mul_(std.unsqueeze(-1))
            layer.bias.mul_(std).add_(mean)
        return model

    def model_config(self) -> dict:
        mean, std = self.observed if self.observed is not None else (self.mean, self.spread)
        return {"hftl_target_mean": list(map(float, mean)), "hftl_target_std": list(map(float, std)),
                "hftl_normalized_targets": bool(self.normalize)}

    @classmethod
    def from_model_config(cls, config) -> "Regression":
        # The saved head already outputs the targets' scale: no scaling on top; the spread is the reload check's unit.
        task = cls([config.id2label[i] for i in range(config.num_labels)])
        if getattr(config, "hftl_target_std", None):
            task.spread = np.asarray(config.hftl_target_std, dtype=np.float64)
            task.unit = task.spread if getattr(config, "hftl_normalized_targets", True) else np.ones(task.num_outputs)
        return task

    # ------------------------------------------------------------ what users see

    def scores(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
        return logits * self.std + self.mean

    def readable(self, predictions: list) -> list:
        """One number per row for one target, else a {target: number} record."""
        if self.num_outputs == 1:
            return [float(p[0]) for p in predictions]
        return [dict(zip(self.names, map(float, p))) for p in predictions]

    def readable_from_scores(self, scores: np.ndarray) -> list:
        return self.readable(np.asarray(scores).reshape(len(scores), -1).tolist())

    def row(self, scores: np.ndarray) -> dict:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        return {"score": float(scores[0])} if self.num_outputs == 1 else {"scores": dict(zip(self.names, map(float, scores)))}

    def near_tie(self, scores: np.ndarray, expected) -> float:
        """0 when the scores equal the expected numbers to RELOAD_RTOL of the targets' spread; else how far they are,
        in units of that spread (the reload check then refuses, in mixed precision too, beyond MIXED_PRECISION_TIE)."""
        want = np.asarray([expected] if self.num_outputs == 1 else [expected[n] for n in self.names], dtype=np.float64)
        gap = float(np.max(np.abs(np.asarray(scores, dtype=np.float64).reshape(-1) - want) / self.spread))
        return 0.0 if gap <= RELOAD_RTOL else gap

    # ------------------------------------------------------------ whether to trust the run (hftl/trust.py)

    def majority(self, train_references: list) -> list[float]:
        """The training mean of each target (what a model that learnt nothing predicts)."""
        return np.asarray(train_references, dtype=np.float64).reshape(-1, self.num_outputs).mean(0).tolist()

    def above_baseline(self, model: dict, baseline: dict, n: int) -> tuple[bool | None, str]:
        """Clearly above: an MSE at most (1 - BASELINE_MARGIN) of the training mean's, i.e. it explains at least that
        share of the squared error predicting the mean leaves (R-squared against the training mean)."""
        if not n or not baseline["mse"]:
            return None, "Not assessed: the split's targets do not vary."
        gain = 1 - model["mse"] / baseline["mse"]
        scores = f"MSE {model['mse']:.4g} against {baseline['mse']:.4g} for predicting the training mean (R-squared {gain:.3f})"
        if gain >= BASELINE_MARGIN:
            return True, f"clearly above the mean baseline: {scores}."
        return False, f"NOT clearly above the mean baseline: {scores}; clearly above needs R-squared {BASELINE_MARGIN:g} or more."

    def collapse(self, predictions: list, references: list) -> dict:
        """Collapsed: a target's predictions vary less than COLLAPSE_VARIANCE of its values' variance on the split."""
        pred, truth = np.asarray(predictions, dtype=np.float64).reshape(len(predictions), -1), np.asarray(references, dtype=np.float64).reshape(len(references), -1)
        if len(pred) < 2 or not truth.var(0).all():
            return {"collapsed": None, "text": "Not assessed: the split's targets do not vary."}
        ratio = pred.var(0) / truth.var(0)
        collapsed = bool((ratio < COLLAPSE_VARIANCE).any())
        text = "prediction variance / target variance " + ", ".join(f"{n} {r:.3f}" for n, r in zip(self.names, ratio))
        text = (f"COLLAPSED: {text} (below {COLLAPSE_VARIANCE:g}): the model predicts nearly the same number whatever the input."
                if collapsed else text + ".")
        return {"collapsed": collapsed, "variance_ratio": dict(zip(self.names, map(float, ratio))), "text": text}

    def card_rows(self, references: list, predictions: list) -> list[dict]:
        pred, truth = np.asarray(predictions, dtype=np.float64).reshape(len(predictions), -1), np.asarray(references, dtype=np.float64).reshape(len(references), -1)
        return [{"name": n, "support": len(truth), "mse": float(((pred[:, j] - truth[:, j]) ** 2).mean()),
                 "mae": float(np.abs(pred[:, j] - truth[:, j]).mean())} for j, n in enumerate(self.names)]

    figure_name = "predictions_vs_targets.png"
    figure_caption = "Predictions against targets"

    def figure(self, references: list, predictions: list, path, title: str = ""):
        from .. import plots

        return plots.scatter_png(np.asarray(references), np.asarray(predictions), self.names, path, title)


register(Regression)
