"""Multi-label classification: a set of labels per row (possibly empty); one sigmoid per label, binary cross-entropy,
a label predicted when its probability exceeds its threshold (train.threshold, or tuned per label on validation).

Labels come as a column of lists (label names, or ids named by data.label_names) or as several 0/1 columns
(data.label_columns, whose names are the labels). They are encoded as 0/1 float vectors ('labels'), one entry per
label in name order (data.label_names' order when given, else sorted).
"""
from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from torch.nn import functional as F

from .. import solver
from ..config import Config, ConfigError, DataConfig
from ..data import DataError, label_columns, source_of
from . import Task, register

THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)  # train.tune_thresholds tries these per label
# The trust checks (hftl/trust.py): collapse when one label set has this share of the predictions or more; "clearly
# above the majority baseline" needs this much more micro-F1.
COLLAPSE_SHARE = 0.95
BASELINE_MARGIN = 0.05


def _is_flag(v) -> bool:
    return isinstance(v, (bool, int, float)) and v in (0, 1)


def label_names_of(train: Dataset, cfg: DataConfig) -> list[str]:
    """The labels in output order: data.label_columns' names, data.label_names, or the names the lists hold, sorted."""
    if cfg.label_columns:
        return [str(c) for c in cfg.label_columns]
    values = [v for row in train[cfg.label_column] for v in row]
    if cfg.label_names:
        return [str(n) for n in cfg.label_names]
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [str(i) for i in range(max(values) + 1)]
    return sorted({str(v) for v in values})


class MultiLabel(Task):
    name = "multi_label"
    problem_type = "multi_label_classification"
    metric_names = ("micro_f1", "macro_f1", "micro_precision", "micro_recall", "subset_accuracy")
    default_metric_for_best = "micro_f1"
    stratify = False  # a row has several labels: no stratum

    pos_weight: torch.Tensor | None = None  # train.class_weights (configure)
    positives: np.ndarray | None = None  # training rows per label (observe_train)
    rows = 0

    def __init__(self, names: list[str], thresholds: list[float] | None = None):
        super().__init__(names)
        self.thresholds = np.asarray(thresholds if thresholds is not None else [0.5] * len(names), dtype=np.float64)
        self.tuned = False

    # ------------------------------------------------------------ settings

    def observe_train(self, train: Dataset) -> None:
        labels = np.asarray(train["labels"], dtype=np.float64).reshape(len(train), -1)
        self.positives, self.rows = labels.sum(0), len(labels)

    def configure(self, cfg: Config) -> Config:
        cfg = super().configure(cfg)
        t = cfg.train
        if t.label_smoothing:
            raise ConfigError("train.label_smoothing is for single-label cross-entropy; multi-label rows train binary "
                              "cross-entropy per label: set train.label_smoothing=0.")
        if not self.tuned:
            self.thresholds = np.full(self.num_outputs, t.threshold)
        spec, self.pos_weight = t.class_weights, None
        if spec == ["balanced"]:
            if self.positives is None:
                raise ConfigError("train.class_weights=balanced weighs labels by their training rows, which this run has not read.")
            # torch's pos_weight: negatives / positives; a label no training row has stays 1 (nothing to weigh up)
            neg = self.rows - self.positives
            self.pos_weight = torch.tensor(np.where(self.positives > 0, neg / np.maximum(self.positives, 1), 1.0), dtype=torch.float32)
        elif spec is not None:
            if len(spec) != self.num_outputs or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in spec):
                raise ConfigError(f"train.class_weights={spec}: give balanced, or {self.num_outputs} positive weights of at least 0, "
                                  f"one per label in this order: {', '.join(self.names)}.")
            self.pos_weight = torch.tensor([float(w) for w in spec])
        return cfg

    # ------------------------------------------------------------ labels

    @classmethod
    def read(cls, train: Dataset, cfg: DataConfig) -> "MultiLabel":
        names = label_names_of(train, cfg)
        if len(names) < 2:
            raise DataError(f"the train split{source_of('train', cfg)} names {len(names)} label(s) {names}; multi-label "
                            "classification needs at least two (one yes/no label is single-label: data.problem_type=single_label).")
        return cls(names)

    def encode(self, ds: Dataset, role: str, cfg: DataConfig) -> Dataset:
        """0/1 vectors, one entry per label; refuses labels training never saw, and columns that are not 0/1."""
        index = {n: i for i, n in enumerate(self.names)}
        k = len(self.names)
        vectors = []
        if cfg.label_columns:
            columns = [ds[c] for c in cfg.label_columns]
            for c, values in zip(cfg.label_columns, columns):
                bad = next((i for i, v in enumerate(values) if not _is_flag(v)), None)
                if bad is not None:
                    raise DataError(f"the {role} split{source_of(role, cfg)} has {values[bad]!r} in label column '{c}' at row "
                                    f"{bad}; multi-label columns (data.label_columns) hold 0 or 1.")
            vectors = [[float(v) for v in row] for row in zip(*columns)]
        else:
            named_ids = bool(cfg.label_names)
            for r, row in enumerate(ds[cfg.label_column]):
                if not isinstance(row, (list, tuple)):
                    raise DataError(f"the {role} split{source_of(role, cfg)} has {row!r} in label column '{cfg.label_column}' at row "
                                    f"{r}; multi-label rows hold a list of labels (e.g. [joy, surprise], or [] for none).")
                vector = [0.0] * k
                for v in row:
                    name = self.names[v] if named_ids and isinstance(v, int) and 0 <= v < k else str(v)
                    if name not in index:
                        raise DataError(f"the {role} split{source_of(role, cfg)} has label {v!r} (row {r}) that "
                                        + ("data.label_names does not name" if named_ids else "the train split never has")
                                        + f"; the labels are {self.names}.")
                    vector[index[name]] = 1.0
                vectors.append(vector)
        return self.add_labels(ds.remove_columns([c for c in label_columns(cfg) if c in ds.column_names]), vectors)

    def check_train(self, train: Dataset, cfg: DataConfig, after: str = "") -> None:
        """Every label should have a positive training row; one that has none cannot be learnt (it is never predicted)."""
        positives = np.asarray(train["labels"]).reshape(len(train), -1).sum(0)
        if not positives.any():
            raise DataError(f"the train split{source_of('train', cfg)} has no row with any label{after}; multi-label training "
                            "needs rows that carry labels.")

    # ------------------------------------------------------------ loss and predictions

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        per = F.binary_cross_entropy_with_logits(logits.float(), labels.float().view(logits.shape), pos_weight=weight,
                                                 reduction="none").mean(-1)  # one value per row: the mean over labels
        return per if reduction == "none" else per.mean() if reduction == "mean" else per.sum()

    def predict(self, logits: np.ndarray) -> list[list[int]]:
        return (self.scores(logits) > self.thresholds).astype(int).tolist()

    def references(self, labels: np.ndarray) -> list:
        return np.asarray(labels).round().astype(int).tolist()

    def tune(self, logits: np.ndarray, labels: np.ndarray) -> list[float]:
        """train.tune_thresholds: per label, the threshold of THRESHOLD_GRID with the best F1 on these rows (ties: the
        one nearest 0.5); a label without positive rows keeps train.threshold."""
        from sklearn.metrics import f1_score

        scores, truth = self.scores(logits), np.asarray(labels).round().astype(int)
        for j in range(self.num_outputs):
            if truth[:, j].any():
                f1 = [f1_score(truth[:, j], scores[:, j] > th, zero_division=0) for th in THRESHOLD_GRID]
                best = max(f1)
                self.thresholds[j] = min((th for th, f in zip(THRESHOLD_GRID, f1) if f == best), key=lambda th: abs(th - 0.5))
        self.tuned = True
        return self.thresholds.tolist()

    def calibrate(self, result: dict, splits, cfg: Config, modules) -> dict | None:
        """train.tune_thresholds: thresholds from the validation split's outputs, then every split's predictions and
        metrics again under them. Returns what to record, or None."""
        if not cfg.train.tune_thresholds:
            return self.fit_temperature(result, splits, cfg, modules)
        if "validation" not in result["logits"]:
            raise ConfigError("train.tune_thresholds=true chooses thresholds on the validation split, which this run has "
                              "none of (data.validation_fraction=0): give one, or set train.tune_thresholds=false.")
        self.tune(result["logits"]["validation"], np.asarray(splits["validation"]["labels"]))
        for split, logits in result["logits"].items():
            preds = self.predict(logits)
            scores = self.compute(modules, preds, self.references(np.asarray(splits[split]["labels"])))
            result["results"][split] = {**result["results"][split], **scores}
            result["predictions"][split] = preds
        tuned = {"thresholds": dict(zip(self.names, self.thresholds.tolist())), "tuned_on": "validation"}
        temperature = self.fit_temperature(result, splits, cfg, modules)  # after: the thresholds move with it
        return {**tuned, **(temperature or {})}

    def set_temperature(self, temperature: float) -> None:
        """The thresholds move with the temperature, so every decision stays as it was: a label's logit z passes its
        threshold th at temperature T exactly when sigmoid(z / T') > sigmoid(T * logit(th) / T')."""
        z = self.temperature * np.log(self.thresholds / (1 - self.thresholds))
        super().set_temperature(temperature)
        self.thresholds = 1 / (1 + np.exp(-z / self.temperature))

    def solve(self, x, y, x_val, y_val, t, modules):
        """One-vs-rest logistic regression on frozen features, one C chosen by train.metric_for_best (hftl/solver.py)."""
        if self.pos_weight is not None:
            return "train.class_weights weighs the positive rows, which the solved logistic regressions do not"
        if (self.thresholds != 0.5).any():
            return "train.threshold is not 0.5, where the solved logistic regressions put the decision"
        sign = 1 if t.greater_is_better else -1
        # Only the module that decides (each evaluate compute costs ~10 ms, and the walk scores dozens of fits).
        deciding = {k: m for k, m in modules.items() if k == t.metric_for_best} or modules

        def score(logits_of, z, labels) -> float:
            logits = logits_of(z)
            if t.metric_for_best == "loss":
                return -float(self.loss(torch.as_tensor(logits), torch.as_tensor(labels, dtype=torch.float32)))
            return sign * self.compute(deciding, self.predict(logits), labels.tolist())[t.metric_for_best]

        return solver.solve_one_vs_rest(x, y, x_val, y_val, score, seed=t.seed), "one-vs-rest logistic regression (L2, lbfgs)"

    # ------------------------------------------------------------ what users see

    def scores(self, logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
        """Each label's sigmoid probability (of logits / train.calibrate's temperature)."""
        t = self.temperature if temperature is None else temperature
        return (torch.as_tensor(np.asarray(logits), dtype=torch.float32) / t).sigmoid().numpy()

    def readable(self, predictions: list) -> list[list[str]]:
        return [[n for n, p in zip(self.names, row) if p] for row in predictions]

    def readable_from_scores(self, scores: np.ndarray) -> list[list[str]]:
        return self.readable((np.asarray(scores) > self.thresholds).astype(int).tolist())

    def row(self, scores: np.ndarray) -> dict:
        scores = np.asarray(scores)
        return {"labels": [n for n, s, th in zip(self.names, scores, self.thresholds) if s > th],
                "scores": {n: float(s) for n, s in zip(self.names, scores)}}

    def near_tie(self, scores: np.ndarray, expected: list[str]) -> float:
        """The largest distance to its threshold of a label decided differently from `expected`."""
        scores, want = np.asarray(scores), set(expected)
        off = [abs(s - th) for n, s, th in zip(self.names, scores, self.thresholds) if (s > th) != (n in want)]
        return float(max(off, default=0.0))

    figure_name = "per_label_f1.png"
    figure_caption = "Per-label precision, recall and F1"

    def figure(self, references: list, predictions: list, path, title: str = ""):
        from .. import plots

        rows = self.card_rows(references, predictions)
        return plots.per_label_png({m: [r[m] for r in rows] for m in ("precision", "recall", "f1")}, self.names,
                                   [r["support"] for r in rows], path, title)

    def card_rows(self, references: list, predictions: list) -> list[dict]:
        from sklearn.metrics import precision_recall_fscore_support

        p, r, f, support = precision_recall_fscore_support(np.asarray(references), np.asarray(predictions), zero_division=0)
        return [{"name": n, "support": int(s), "precision": float(a), "recall": float(b), "f1": float(c),
                 "threshold": float(th)} for n, a, b, c, s, th in zip(self.names, p, r, f, support, self.thresholds)]

    def model_config(self) -> dict:
        return {"hftl_thresholds": [float(t) for t in self.thresholds], **super().model_config()}

    # ------------------------------------------------------------ whether to trust the run (hftl/trust.py)

    def majority(self, train_references: list) -> list[int]:
        """Each label as most training rows have it (present in more than half: predicted)."""
        return (np.asarray(train_references, dtype=np.float64).reshape(-1, self.num_outputs).mean(0) > 0.5).astype(int).tolist()

    def above_baseline(self, model: dict, baseline: dict, n: int) -> tuple[bool | None, str]:
        """Clearly above: micro-F1 at least BASELINE_MARGIN above the majority baseline's."""
        if not n:
            return None, "Not assessed: the split has no rows."
        scores = (f"micro-F1 {model['micro_f1']:.4f} against {baseline['micro_f1']:.4f}, subset accuracy "
                  f"{model['subset_accuracy']:.4f} against {baseline['subset_accuracy']:.4f} for predicting each label as most "
                  "training rows have it")
        if model["micro_f1"] >= baseline["micro_f1"] + BASELINE_MARGIN:
            return True, f"clearly above the majority baseline: {scores}."
        return False, f"NOT clearly above the majority baseline: {scores} (clearly above needs micro-F1 {BASELINE_MARGIN:g} higher)."

    def collapse(self, predictions: list, references: list) -> dict:
        """Collapsed: one label set (often none, or all) is COLLAPSE_SHARE of the predictions or more while the split's
        label sets are not that uniform themselves."""
        from collections import Counter

        n = len(predictions)
        if not n:
            return {"collapsed": None, "text": "Not assessed: the split has no rows."}
        pred, truth = np.asarray(predictions).reshape(n, -1), np.asarray(references).reshape(n, -1)
        top, count = Counter(map(tuple, pred.tolist())).most_common(1)[0]
        true_share = Counter(map(tuple, truth.tolist())).most_common(1)[0][1] / n
        share, none, every = count / n, float((pred.sum(1) == 0).mean()), float((pred.sum(1) == self.num_outputs).mean())
        collapsed = share >= COLLAPSE_SHARE and true_share < COLLAPSE_SHARE
        label_set = self.readable([list(top)])[0]
        text = (f"{100 * share:.1f}% of the {n} rows get the same labels {label_set} (the most common true set: "
                f"{100 * true_share:.1f}%); rows with no label {100 * none:.1f}%, with every label {100 * every:.1f}%")
        text = f"COLLAPSED: {text}. The model gives every input the same labels." if collapsed else text + "."
        return {"collapsed": collapsed, "share": share, "labels": label_set, "label_share": true_share, "no_label": none,
                "every_label": every, "text": text}

    def calibration(self, logits: np.ndarray, references: list) -> dict:
        """Per label, its probability against whether it applies; the mean over the labels (the diagram pools them)."""
        from ..trust import ECE_BINS, reliability

        truth = np.asarray(references, dtype=np.float64).reshape(len(references), -1)
        out = {}
        for key, t in (("ece", None), ("ece_uncalibrated", 1.0)):
            p = self.scores(logits, t)
            out[key] = float(np.mean([reliability(p[:, j], truth[:, j])[0] for j in range(self.num_outputs)]))
            out.setdefault("per_label", dict(zip(self.names, (reliability(p[:, j], truth[:, j])[0] for j in range(self.num_outputs)))))
            out.setdefault("bins", reliability(p, truth)[1])
        return {**out, "what": f"each label's probability against whether it applies, {ECE_BINS} bins, averaged over the labels"}

    def calibration_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

    @classmethod
    def from_model_config(cls, config) -> "MultiLabel":
        names = [config.id2label[i] for i in range(config.num_labels)]
        return cls(names, getattr(config, "hftl_thresholds", None))


register(MultiLabel)
