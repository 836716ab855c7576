"""Single-label classification: one class per row; softmax over the classes, cross-entropy, argmax.

Labels may be a ClassLabel, integers 0..K-1 (named by data.label_names) or strings; the mapping is fixed from the
training split (sorted names) and stored in the model's config (id2label / label2id).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Value
from torch.nn import functional as F

from .. import solver
from ..config import Config, ConfigError, DataConfig
from ..data import DataError, source_of
from . import Task, register

# A float label column with more distinct values than this is a measurement (a regression target), not classes.
MAX_FLOAT_CLASSES = 10
# The trust checks (hftl/trust.py): collapse when one class has this share of the predictions or more; "clearly above
# the majority baseline" by macro-F1 needs this much more than the baseline's.
COLLAPSE_SHARE = 0.95
BASELINE_MARGIN = 0.05


def label_names_of(train: Dataset, cfg: DataConfig) -> list[str]:
    """Label names in id order, fixed from the training split."""
    feature = train.features[cfg.label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values = sorted(set(train[cfg.label_column]), key=lambda v: (str(type(v)), v))
    fractional = [v for v in values if isinstance(v, float) and not v.is_integer()]
    if fractional:  # whole numbers stored as floats (0.0/1.0, e.g. a column with gaps read by pandas) may still be classes
        column = f"the train split's label column '{cfg.label_column}'{source_of('train', cfg)}"
        shown = ", ".join(f"{v:g}" for v in fractional[:5])
        if len(values) > MAX_FLOAT_CLASSES:
            raise DataError(f"{column} holds {len(values)} distinct numbers with fractions ({shown}, ...): a regression "
                            "target, not class labels (one class per value would be meaningless), but data.problem_type="
                            "single_label. Set data.problem_type=regression (or auto), or data.label_column to the column "
                            "with the classes.")
        raise DataError(f"{column} holds numbers with fractions ({shown}); class labels are strings or whole numbers "
                        "0..K-1. Write the classes as such, or set data.label_column to the column that has them.")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        k = max(values) + 1
        if min(values) < 0:
            raise DataError(f"integer labels must be 0..K-1; the train split has {min(values)}.")
        if cfg.label_names:
            if len(cfg.label_names) < k:
                raise DataError(f"data.label_names names {len(cfg.label_names)} labels but the train split has label {k - 1}.")
            return [str(n) for n in cfg.label_names]
        return [str(i) for i in range(k)]
    if cfg.label_names:
        raise DataError("data.label_names is only for integer labels; the train split's labels are strings already.")
    return [str(v) for v in values]


def one_per_row(ds: Dataset, role: str, cfg: DataConfig) -> None:
    """Refuse a label column of lists: those are multi-label rows."""
    if not isinstance(ds.features[cfg.label_column], (ClassLabel, Value)):
        raw = ds[cfg.label_column]
        row = next((i for i, v in enumerate(raw) if isinstance(v, (list, tuple))), 0)
        raise DataError(f"the {role} split's label column '{cfg.label_column}'{source_of(role, cfg)} holds lists (row {row}: "
                        f"{str(raw[row])[:80]}), but data.problem_type=single_label reads one label per row: set "
                        "data.problem_type=multi_label (or auto), or give one label per row.")


class SingleLabel(Task):
    name = "single_label"
    problem_type = "single_label_classification"
    metric_names = ("accuracy", "f1", "precision", "recall")
    default_metric_for_best = "accuracy"
    stratify = True  # a carved validation split keeps the label shares

    weight: torch.Tensor | None = None  # train.class_weights, one per class (configure)
    smoothing = 0.0  # train.label_smoothing
    counts: Counter | None = None  # training rows per class id (observe_train)

    # ------------------------------------------------------------ settings

    def observe_train(self, train: Dataset) -> None:
        self.counts = Counter(train["labels"])

    def configure(self, cfg: Config) -> Config:
        cfg = super().configure(cfg)
        t = cfg.train
        self.smoothing, self.weight = t.label_smoothing, None
        spec = t.class_weights
        if spec == ["balanced"]:
            if not self.counts:
                raise ConfigError("train.class_weights=balanced weighs the classes by their training rows, which this run has not read.")
            n, k = sum(self.counts.values()), len(self.counts)
            # scikit-learn's 'balanced': n / (classes x rows of the class); a class without training rows weighs nothing
            self.weight = torch.tensor([n / (k * self.counts[i]) if self.counts.get(i) else 0.0 for i in range(self.num_outputs)])
        elif spec is not None:
            if len(spec) != self.num_outputs or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in spec):
                raise ConfigError(f"train.class_weights={spec}: give balanced, or {self.num_outputs} weights of at least 0, one per "
                                  f"label in this order: {', '.join(self.names)}.")
            self.weight = torch.tensor([float(w) for w in spec])
        return cfg

    # ------------------------------------------------------------ labels

    @classmethod
    def read(cls, train: Dataset, cfg: DataConfig) -> "SingleLabel":
        if cfg.label_columns:
            raise DataError(f"data.label_columns={cfg.label_columns} gives several label columns, but data.problem_type="
                            "single_label reads one: set data.label_column (and data.label_columns=null), or "
                            "data.problem_type=multi_label / regression (or auto).")
        one_per_row(train, "train", cfg)
        names = label_names_of(train, cfg)
        if len(names) < 2:
            raise DataError(f"the train split has a single label {names}; classification needs at least two.")
        return cls(names)

    def encode(self, ds: Dataset, role: str, cfg: DataConfig) -> Dataset:
        """Map the label column to ids (ClassLabel 'labels'), refusing labels training never saw."""
        one_per_row(ds, role, cfg)
        feature = ds.features[cfg.label_column]
        raw = ds[cfg.label_column]
        if isinstance(feature, ClassLabel):
            raw = [feature.int2str(v) for v in raw]
        elif cfg.label_names and all(isinstance(v, int) for v in raw):
            raw = [self.names[v] if 0 <= v < len(self.names) else str(v) for v in raw]
        else:
            raw = [str(v) for v in raw]
        index = {n: i for i, n in enumerate(self.names)}
        unseen = sorted(set(raw) - set(index))
        if unseen:
            row = next(i for i, v in enumerate(raw) if v not in index)
            raise DataError(
                f"the {role} split has label(s) {unseen} (first at row {row}) that the train split never has; "
                f"train labels are {self.names}."
            )
        return self.add_labels(ds.remove_columns(cfg.label_column), [index[v] for v in raw])

    def add_labels(self, ds: Dataset, labels: list) -> Dataset:
        if "labels" in ds.column_names:  # the model reads 'labels'; a stray one would shadow ours
            ds = ds.remove_columns("labels")
        return ds.add_column("labels", labels, feature=ClassLabel(names=self.names))

    def blank(self, n: int) -> list:
        """Labels for `n` unlabelled rows (data.target's, which are never trained on)."""
        return [0] * n

    def check_train(self, train: Dataset, cfg: DataConfig, after: str = "") -> None:
        """A classifier needs rows of two labels or more to train on (the names may list more than the rows hold)."""
        present = set(train["labels"])
        if len(present) < 2:
            raise DataError(f"the train split{source_of('train', cfg)} has rows of a single label{after} "
                            f"({', '.join(repr(self.names[i]) for i in present)}); classification needs rows of at least two.")

    def check_carved(self, whole: Dataset, train: Dataset, validation: Dataset, cfg: DataConfig) -> None:
        """A validation split carved from train must hold every label training has, and training every label it holds:
        a label only in validation is never learnt, one only in training is never measured."""
        counts = Counter(whole["labels"])
        in_train, in_val = set(train["labels"]), set(validation["labels"])
        problems = [f"{where} {', '.join(f'{self.names[i]!r} ({counts[i]} row(s) in all)' for i in sorted(ids))}"
                    for where, ids in (("only in validation:", set(counts) - in_train), ("only in training:", set(counts) - in_val)) if ids]
        if problems:
            raise DataError(f"carving data.validation_fraction={cfg.validation_fraction} of the train split{source_of('train', cfg)} "
                            f"as validation leaves label(s) {'; '.join(problems)}. Add rows of those labels, raise "
                            "data.validation_fraction, or give a validation split (data.validation_file / data.validation_split).")

    def per_class(self, train: Dataset, k: int, seed: int) -> Dataset:
        """The label budget (data.samples_per_class): k seeded-random training rows of every label, in shuffled order."""
        shuffled = train.shuffle(seed=seed)
        labels = list(shuffled["labels"])
        counts = Counter(labels)
        short = [f"'{name}' has {counts[i]}" for i, name in enumerate(self.names) if counts[i] < k]
        if short:
            raise DataError(f"data.samples_per_class={k}, but in the train split (after validation is carved) label "
                            f"{', '.join(short)} row(s); lower data.samples_per_class to at most "
                            f"{min(counts[i] for i in range(len(self.names)))} or add rows.")
        taken, keep = Counter(), []
        for i, y in enumerate(labels):
            if taken[y] < k:
                taken[y] += 1
                keep.append(i)
        return shuffled.select(keep)

    # ------------------------------------------------------------ loss and predictions

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(logits.device)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), weight=weight,
                               label_smoothing=self.smoothing, reduction=reduction)

    def predict(self, logits: np.ndarray) -> list[int]:
        return np.asarray(logits).argmax(-1).tolist()

    # ------------------------------------------------------------ the solved head (adapt.solve_head)

    def solve(self, x, y, x_val, y_val, t, modules):
        """Multinomial logistic regression on frozen features, C chosen by train.metric_for_best (hftl/solver.py)."""
        if self.weight is not None or self.smoothing:
            return "train.class_weights / train.label_smoothing change the loss, which the solved logistic regression does not minimise"
        sign = 1 if t.greater_is_better else -1
        # Only the module that decides (each evaluate compute costs ~10 ms, and the walk scores dozens of fits).
        deciding = {k: m for k, m in modules.items() if k == t.metric_for_best} or modules

        def score(clf, z, labels) -> float:
            if t.metric_for_best == "loss":
                from sklearn.metrics import log_loss

                return sign * log_loss(labels, clf.predict_proba(z), labels=clf.classes_)
            return sign * self.compute(deciding, clf.predict(z).tolist(), labels.tolist())[t.metric_for_best]

        return solver.solve_logistic(x, y, self.num_outputs, x_val, y_val, score, seed=t.seed), "logistic regression (L2, lbfgs)"

    # ------------------------------------------------------------ what users see

    def scores(self, logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
        """What pipeline() reports per label: softmax probabilities (of logits / train.calibrate's temperature)."""
        t = self.temperature if temperature is None else temperature
        return (torch.as_tensor(np.asarray(logits), dtype=torch.float32) / t).softmax(-1).numpy()

    def readable(self, predictions: list) -> list[str]:
        return [self.names[p] for p in predictions]

    def readable_from_scores(self, scores: np.ndarray) -> list[str]:
        return self.readable(np.asarray(scores).argmax(-1).tolist())

    def row(self, scores: np.ndarray) -> dict:
        scores = np.asarray(scores)
        return {"label": self.names[int(scores.argmax())], "scores": {n: float(s) for n, s in zip(self.names, scores)}}

    def near_tie(self, scores: np.ndarray, expected: str) -> float:
        scores = np.asarray(scores)
        return float(scores.max() - scores[self.names.index(expected)]) if expected in self.names else float("inf")

    figure_name = "confusion_matrix.png"
    figure_caption = "Confusion matrix"

    def figure(self, references: list, predictions: list, path, title: str = ""):
        from .. import plots

        return plots.confusion_matrix_png(plots.confusion_counts(list(references), list(predictions), self.num_outputs),
                                          self.names, path, title)

    # ------------------------------------------------------------ whether to trust the run (hftl/trust.py)

    def majority(self, train_references: list) -> int:
        """The most frequent training class (the lowest id on a tie)."""
        return int(np.bincount(np.asarray(train_references, dtype=int), minlength=self.num_outputs).argmax())

    def above_baseline(self, model: dict, baseline: dict, n: int) -> tuple[bool | None, str]:
        """Clearly above: the lower end of the 95% Wilson interval of the model's accuracy is above the baseline's
        accuracy (more right rows than chance variation of the baseline's rate explains), or its macro-F1 is at least
        BASELINE_MARGIN above the baseline's (a model that trades accuracy on the majority class for the others)."""
        from ..trust import wilson_lower

        if not n:
            return None, "Not assessed: the split has no rows."
        acc, base_acc, f1, base_f1 = model["accuracy"], baseline["accuracy"], model["f1"], baseline["f1"]
        low = wilson_lower(acc * n, n)
        scores = (f"accuracy {acc:.4f} (95% interval from {low:.4f}) against {base_acc:.4f}, macro-F1 {f1:.4f} against "
                  f"{base_f1:.4f} for always predicting the most frequent training class")
        if low > base_acc or f1 >= base_f1 + BASELINE_MARGIN:
            return True, f"clearly above the majority baseline: {scores}."
        return False, (f"NOT clearly above the majority baseline: {scores} (clearly above needs the accuracy's interval "
                       f"above it, or macro-F1 {BASELINE_MARGIN:g} higher). The model may have learnt little more than "
                       "the class shares: check the per-class recall below.")

    def collapse(self, predictions: list, references: list) -> dict:
        """Collapsed: one class gets COLLAPSE_SHARE of the predictions or more while the split's labels are not that
        lopsided themselves."""
        n = len(predictions)
        if not n:
            return {"collapsed": None, "text": "Not assessed: the split has no rows."}
        counts = np.bincount(np.asarray(predictions, dtype=int), minlength=self.num_outputs)
        truth = np.bincount(np.asarray(references, dtype=int), minlength=self.num_outputs)
        top, share, true_share = int(counts.argmax()), float(counts.max() / n), float(truth.max() / n)
        never = [self.names[i] for i in range(self.num_outputs) if counts[i] == 0 and truth[i] > 0]
        collapsed = share >= COLLAPSE_SHARE and true_share < COLLAPSE_SHARE
        text = (f"{100 * share:.1f}% of the {n} predictions are '{self.names[top]}' (the largest class has {100 * true_share:.1f}% "
                "of the labels)" + (f"; never predicted: {', '.join(repr(c) for c in never)}" if never else ""))
        text = (f"COLLAPSED: {text}. The model predicts one class whatever the input." if collapsed else text + ".")
        return {"collapsed": collapsed, "share": share, "class": self.names[top], "label_share": true_share,
                "never_predicted": never, "text": text}

    def card_rows(self, references: list, predictions: list) -> list[dict]:
        from sklearn.metrics import precision_recall_fscore_support

        p, r, f, support = precision_recall_fscore_support(np.asarray(references), np.asarray(predictions),
                                                           labels=list(range(self.num_outputs)), zero_division=0)
        return [{"name": n, "support": int(s), "precision": float(a), "recall": float(b), "f1": float(c)}
                for n, a, b, c, s in zip(self.names, p, r, f, support)]

    def calibration(self, logits: np.ndarray, references: list) -> dict:
        """The top class's probability against whether it is right (Guo et al. 2017's reliability)."""
        from ..trust import ECE_BINS, reliability

        truth = np.asarray(references, dtype=int)
        out = {}
        for key, t in (("ece", None), ("ece_uncalibrated", 1.0)):
            p = self.scores(logits, t)
            ece, bins = reliability(p.max(-1), p.argmax(-1) == truth)
            out.setdefault("bins", bins)
            out[key] = ece
        return {**out, "what": f"top-class probability against accuracy in {ECE_BINS} bins"}

    def calibration_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels.long())

    @classmethod
    def from_model_config(cls, config) -> "SingleLabel":
        return cls([config.id2label[i] for i in range(config.num_labels)])


register(SingleLabel)
