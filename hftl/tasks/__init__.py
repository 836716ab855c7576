"""Tasks: what differs between kinds of target, one file each (single_label.py, and the others beside it).

A task owns how labels are read and encoded, the head's `problem_type`, the loss, what a prediction is, the
metrics, what the reload check compares, the pictures and the card's entries. The loop (hftl/train.py), the
feature cache and the solved head (hftl/cache.py, hftl/solver.py), reweighting, the reload check (hftl/hub.py),
the card and `hftl predict` / `hftl evaluate` ask the task instead of assuming cross-entropy and argmax.

`Task` is also the interface `hftl.train.fit` trains and evaluates through, so a stage with a target of its own
(contrastive pairs, masked-LM pretraining) passes a small task of its own. A task for labelled rows is chosen by
data.problem_type or the labels of the training split (`kind_of`); adding one means one new file that subclasses `Task` and registers itself.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..config import LOWER_IS_BETTER, TASK_METRICS, Config, ConfigError


class Task:
    name = ""  # its name in messages and in TASK_METRICS
    problem_type: str | None = None  # what transformers' config.problem_type calls it (pipeline() reads it)
    metric_names: tuple[str, ...] = ()  # the shipped metric modules (hftl/metrics) it reports, its default train.metrics
    default_metric_for_best = "loss"
    per_token = False  # its head reads one vector per position (token classification), not one per row (hftl/cache.py)
    group_by_length = True  # train.group_by_length=null's value for this task
    shuffle_grouped_batches = False  # train.shuffle_grouped_batches=null's value
    random_batch_modes: tuple[str, ...] = ()  # adaptation modes for which train.group_by_length=null means random batches
    solver_metric = ""  # what `solve` chooses the penalty by, when not train.metric_for_best
    # Set by hftl.data.load_labelled when it carved the validation split from train (data.validation_fraction): a solved
    # head then cross-validates its penalty on the training rows, which a random tenth of them cannot beat.
    validation_carved = False

    def __init__(self, names: list[str]):
        self.names = list(names)  # one per model output: class, label or target names

    @property
    def num_outputs(self) -> int:
        return len(self.names)

    # ------------------------------------------------------------ training and evaluation (hftl.train)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The training loss of a batch; reduction='none': one value per row (reweighting, evaluation)."""
        raise NotImplementedError

    def predict(self, logits: np.ndarray) -> list:
        """One prediction per row of model outputs (n x outputs), as the metrics take it."""
        raise NotImplementedError

    def predict_rows(self, logits: np.ndarray, labels: np.ndarray) -> list:
        """`predict` for evaluation, which also has the rows' encoded labels (token classification reads which
        positions are words from them)."""
        return self.predict(logits)

    def row_scores(self, logits: np.ndarray, labels: np.ndarray):
        """`scores` of each row for `row` (hftl predict / evaluate), which also have the rows' encoded labels."""
        return self.scores(logits)

    def labels_of(self, ds):
        """A split's encoded 'labels' as `references` takes them (token classification: lists of unequal length)."""
        return np.asarray(ds["labels"])

    def references(self, labels: np.ndarray) -> list:
        """The encoded 'labels' of rows as the metrics take them."""
        return labels.tolist()

    def compute(self, modules: dict, predictions: list, references: list) -> dict[str, float]:
        from .. import metrics

        return metrics.compute(modules, predictions, references)

    # ------------------------------------------------------------ what users see (predictions files, reload check, hftl predict)

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """What pipeline() reports per output (n x outputs): probabilities, or the scores themselves."""
        raise NotImplementedError

    def readable(self, predictions: list) -> list:
        """`predict`'s predictions as written in predictions_<split>.json and compared by the reload check: label
        names, lists of them, or numbers."""
        raise NotImplementedError

    def readable_from_scores(self, scores: np.ndarray) -> list:
        """The readable predictions that `scores` (n x outputs, as pipeline() reports them) stand for."""
        raise NotImplementedError

    def row(self, scores: np.ndarray) -> dict:
        """One row of `hftl predict`'s output from its scores (one per output, as pipeline() reports them)."""
        raise NotImplementedError

    def near_tie(self, scores: np.ndarray, expected) -> float:
        """How far `scores` (one row, as pipeline() reports them) are from giving the `expected` readable prediction:
        0 when they give it; the reload check lets a mixed-precision run differ by up to hftl.hub.MIXED_PRECISION_TIE."""
        raise NotImplementedError

    def figure(self, references: list, predictions: list, path, title: str = ""):
        """The task's picture of one split's predictions (a confusion matrix, a scatter plot), written to `path`."""
        raise NotImplementedError

    figure_name = ""  # its file name in the model folder
    figure_caption = ""  # '... on the {split} split'

    def export(self, model, head: list[str]):
        """The trained model as it is saved (regression: the target scaling folded into the head; train.calibrate: the
        temperature folded into it, so pipeline()'s scores are the calibrated ones)."""
        if self.temperature != 1.0:
            layer = last_linear(model, head, self.num_outputs)
            with torch.no_grad():  # logits / T: the head's last linear layer divided through
                layer.weight.div_(self.temperature)
                if layer.bias is not None:
                    layer.bias.div_(self.temperature)
        return model

    def calibrate(self, result: dict, splits, cfg: Config, modules) -> dict | None:
        """After training, before saving: settings chosen on the validation outputs (train.calibrate's temperature;
        multi-label thresholds), with `result`'s predictions and metrics updated to them. Returns what to record, or None."""
        return self.fit_temperature(result, splits, cfg, modules)

    # ------------------------------------------------------------ whether to trust the run (hftl/trust.py)

    # train.calibrate's temperature: scores are of logits / temperature. Folded into the saved head by `export`, so a
    # task rebuilt from a saved folder (from_model_config) keeps 1 (config.json's hftl_temperature is the record).
    temperature = 1.0

    def majority(self, train_references: list):
        """The majority baseline's one prediction for every row (as `predict` gives them), from the training split's
        references."""
        raise NotImplementedError

    def describe_constant(self, constant):
        """The majority baseline's prediction as results.json records it."""
        return self.readable([constant])[0]

    def constant_predictions(self, constant, references: list) -> list:
        """The majority baseline's predictions for rows with these references: `constant` for every row."""
        return [constant] * len(references)

    def above_baseline(self, model: dict, baseline: dict, n: int) -> tuple[bool | None, str]:
        """Whether the model's scores (the task's metrics on `n` rows) are clearly above the majority baseline's, and a
        sentence saying so; None: not assessable."""
        raise NotImplementedError

    def collapse(self, predictions: list, references: list) -> dict:
        """How much of one split's predictions are one and the same: {'collapsed': bool or None, 'text': ..., ...}."""
        raise NotImplementedError

    def calibration(self, logits: np.ndarray, references: list) -> dict | None:
        """Expected calibration error of the scores on one split ({'ece', 'ece_uncalibrated', 'bins', 'what'}), or None
        for a task whose scores are not probabilities."""
        return None

    def calibration_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The negative log-likelihood train.calibrate's temperature minimises on validation."""
        raise ConfigError(f"train.calibrate fits a temperature to class probabilities, which the {self.name} task does not "
                          "output; set train.calibrate=false.")

    def set_temperature(self, temperature: float) -> None:
        self.temperature = float(temperature)

    def fit_temperature(self, result: dict, splits, cfg: Config, modules) -> dict | None:
        """train.calibrate: the temperature minimising the validation split's negative log-likelihood; then every
        split's predictions and metrics under it (the decisions stay the same: argmax, and thresholds moved with it)."""
        if not cfg.train.calibrate:
            return None
        from .. import trust

        if "validation" not in result["logits"]:
            raise ConfigError("train.calibrate=true fits the temperature on the validation split, which this run has none "
                              "of (data.validation_fraction=0): give one, or set train.calibrate=false.")
        logits, labels = result["logits"]["validation"], np.asarray(splits["validation"]["labels"])
        nll = lambda t: float(self.calibration_loss(torch.as_tensor(np.asarray(logits), dtype=torch.float64) / t,  # noqa: E731
                                                    torch.as_tensor(labels)))
        temperature = trust.fit_temperature(self.calibration_loss, logits, labels)
        self.set_temperature(temperature)
        for split, z in result["logits"].items():
            preds = self.predict(z)
            result["predictions"][split] = preds
            result["results"][split] = {**result["results"][split], **self.compute(modules, preds, self.references(np.asarray(splits[split]["labels"])))}
        return {"temperature": temperature, "fitted_on": "validation", "validation_nll_before": nll(1.0),
                "validation_nll_after": nll(temperature)}

    def solve(self, x, y, x_val, y_val, t, modules):
        """The head solved on frozen features (adapt.solve_head): (hftl.solver.Solution, its method), or why not."""
        return f"the {self.name} task has no solved head"

    def per_class(self, train, k: int, seed: int):
        from ..data import DataError

        raise DataError(f"data.samples_per_class keeps k rows of each class, which {self.name} labels do not have (a row has "
                        "several labels, or a number); set data.samples_per_class=null (data.max_train_samples bounds the rows).")

    def check_carved(self, whole, train, validation, cfg) -> None:
        """Refuse a carved validation split that cannot measure what training learns; by default, nothing to refuse."""

    # Labels as a vector per row (multi-label 0/1, regression targets), one entry per output.
    def add_labels(self, ds, labels: list):
        from datasets import Sequence, Value

        if "labels" in ds.column_names:  # the model reads 'labels'; a stray one would shadow ours
            ds = ds.remove_columns("labels")
        return ds.add_column("labels", labels, feature=Sequence(Value("float32"), length=self.num_outputs))

    def blank(self, n: int) -> list:
        """Labels for `n` unlabelled rows (data.target's, which are never trained on)."""
        return [[0.0] * self.num_outputs for _ in range(n)]

    def model_config(self) -> dict:
        """What the saved model's config.json keeps of the task besides id2label and problem_type (a decision
        threshold, target statistics), read back by `from_model_config`; hftl_temperature (train.calibrate) is the
        record of what `export` folded into the head."""
        return {"hftl_temperature": self.temperature} if self.temperature != 1.0 else {}

    def card_rows(self, references: list, predictions: list) -> list[dict] | None:
        """Per-output rows of one split (name, support, precision, recall, F1 ...; regression: per target errors) for
        results.json and the card's per-class table."""
        return None

    # ------------------------------------------------------------ settings

    def observe_train(self, train) -> None:
        """The final training split (encoded 'labels'), for settings that depend on it (train.class_weights=balanced)."""

    def configure(self, cfg: Config) -> Config:
        """`cfg` with what it leaves to the task filled in (train.metrics, metric_for_best, greater_is_better), after
        refusing the settings this task cannot serve."""
        t = cfg.train
        metrics = list(t.metrics) if t.metrics is not None else list(self.metric_names)
        foreign = [m for m in metrics if m not in self.metric_names and any(m in names for names in TASK_METRICS.values())]
        if foreign:
            raise ConfigError(f"train.metrics has {foreign}, which the {self.name} task does not report; it reports "
                              f"{', '.join(self.metric_names)} (or a Hub metric by name).")
        best = t.metric_for_best or (self.default_metric_for_best if self.default_metric_for_best in [*metrics, "loss"] else metrics[0])
        if best != "loss" and best not in metrics and all(m in self.metric_names for m in metrics):
            raise ConfigError(f"train.metric_for_best='{best}' is not computed: validation reports {', '.join([*metrics, 'loss'])} "
                              f"(train.metrics, plus loss, for the {self.name} task). Choose one of those, or add it to "
                              "train.metrics.")
        better = t.greater_is_better if t.greater_is_better is not None else best not in LOWER_IS_BETTER
        grouped = t.group_by_length
        if grouped is None:
            grouped = self.group_by_length and cfg.adapt.mode not in self.random_batch_modes
        shuffled = self.shuffle_grouped_batches if t.shuffle_grouped_batches is None else t.shuffle_grouped_batches
        return dataclasses.replace(cfg, train=dataclasses.replace(t, metrics=metrics, metric_for_best=best, greater_is_better=better,
                                                                  group_by_length=grouped, shuffle_grouped_batches=shuffled))


def last_linear(model, head: list[str], outputs: int):
    """The head's last nn.Linear layer with `outputs` outputs: where `export` folds a scaling of the logits."""
    from torch import nn

    found = [m for name, m in model.named_modules() if any(name == h or name.endswith("." + h) or name.startswith(h + ".")
                                                            for h in head) and isinstance(m, nn.Linear) and m.out_features == outputs]
    if not found:
        raise RuntimeError(f"hftl bug: no linear layer with {outputs} outputs in the head {head} to rescale")
    return found[-1]


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    if cls.name in TASKS:
        raise ValueError(f"hftl bug: task '{cls.name}' is registered twice")
    TASKS[cls.name] = cls
    return cls


def read(train, cfg) -> Task:
    """The task for the training split `train` (raw rows) under DataConfig `cfg` (data.problem_type, else what the
    label column(s) hold), its label names fixed from them."""
    return TASKS[kind_of(train, cfg)].read(train, cfg)


def kind_of(train, cfg) -> str:
    """data.problem_type, or for auto: several columns of 0/1 or a column of lists -> multi_label, numbers with
    fractions -> regression (several number columns: regression), else single_label."""
    from datasets import LargeList, Sequence, Value

    if cfg.problem_type != "auto":
        return cfg.problem_type
    columns = cfg.label_columns or [cfg.label_column]
    if cfg.label_columns:
        flags = all(isinstance(v, (bool, int, float)) and v in (0, 1) for c in columns for v in train[c])
        return "multi_label" if flags else "regression"
    feature = train.features[columns[0]]
    if isinstance(feature, (Sequence, LargeList, list)) or (not isinstance(feature, Value) and isinstance(train[0][columns[0]], list)):
        return "multi_label"
    if isinstance(feature, Value) and feature.dtype.startswith("float"):
        values = [v for v in train[columns[0]] if v is not None]
        if any(not float(v).is_integer() for v in values):
            return "regression"
    return "single_label"


def for_config(cfg: Config) -> Task:
    """The task `cfg`'s data is trained as, without label names: what `hftl compare` / `hftl tune` resolve before their
    runs (metrics, metric_for_best). data.problem_type=auto reads the training split's label column(s) to decide."""
    kind = cfg.data.problem_type
    if kind == "auto":
        from ..data import load_raw

        kind = kind_of(load_raw(cfg.data)[0]["train"], cfg.data)
    return TASKS[kind]([])


def resolve_metrics(cfg: Config) -> Config:
    """`cfg` with train.metrics, metric_for_best and greater_is_better filled in as its task's runs will fill them.
    train.group_by_length stays as given: it can depend on the adaptation mode, and `hftl compare` / `hftl tune` derive
    runs of other modes from this config, each resolving it for its own mode."""
    resolved = Task.configure(for_config(cfg), cfg)
    return dataclasses.replace(resolved, train=dataclasses.replace(resolved.train, group_by_length=cfg.train.group_by_length))


def from_model_config(config) -> Task:
    """The task a saved model (its transformers config) was trained for, as `hftl predict` / `hftl evaluate` use it:
    its output names from id2label, what `Task.model_config` stored, the kind from problem_type."""
    from .token_classification import TokenClassification, is_token_model

    if is_token_model(config):  # transformers keeps no problem_type for token classification: its architecture says it
        return TokenClassification.from_model_config(config)
    kind = {cls.problem_type: cls for cls in TASKS.values() if cls.problem_type}.get(config.problem_type or "single_label_classification")
    if kind is None:
        raise ConfigError(f"the model's config has problem_type={config.problem_type!r}; hftl knows "
                          f"{', '.join(c.problem_type for c in TASKS.values() if c.problem_type)}.")
    return kind.from_model_config(config)


from . import multi_label, regression, single_label, token_classification  # noqa: E402,F401  (each registers itself)
