"""Token classification (NER, tagging): one IOB2 tag per word; softmax over the tags at each word, cross-entropy.

Rows hold a list of words (data.tokens_column) and a list of tags (data.tags_column: names, or ids named by
data.label_names). A word is scored at its first sub-token (pipeline("token-classification")'s
aggregation_strategy="first"); with data.label_all_subtokens its later pieces train too (a B-X word's as I-X, as
transformers' run_ner.py does), coded below CONTINUATION so that evaluation still finds each word's first piece.

The model's outputs are per sub-token (rows x positions x tags); evaluation pads them to the split's longest row
(labels -100) and predicts one tag per word the model saw: a word cut off by data.max_length is not predicted
(the modality counts those words and the entities they cut, hftl/modalities/tokens.py). Metrics are entity-level
precision/recall/F1 with seqeval's default conventions (hftl/metrics/entities.py) and word-level tag accuracy.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Sequence
from torch.nn import functional as F

from ..config import Config, ConfigError, DataConfig
from ..data import DataError, source_of
from ..metrics import entities
from . import Task, register

IGNORE = -100  # torch's ignore_index: special tokens, padding, and a word's later sub-tokens
# A later sub-token of a word trained under data.label_all_subtokens, tag t, is coded CONTINUATION - t (<= -101): the
# loss trains it as t, evaluation and predictions skip it (they read a word's first piece, coded t >= 0).
CONTINUATION = -101
OUTSIDE = "O"
# data.stride: the column (and batch key) naming the sentence an evaluation row is a window of (hftl/modalities/tokens.py)
WINDOW = "window_of"


def iob2_problem(tags: list[str]) -> str | None:
    """Where `tags` break IOB2: an I-X that follows neither B-X nor I-X, or a tag that is not O, B-X or I-X."""
    prev = OUTSIDE
    for j, tag in enumerate(tags):
        if tag != OUTSIDE and not (len(tag) > 2 and tag[:2] in ("B-", "I-")):
            return f"tag {tag!r} at word {j} is not O, B-<type> or I-<type>"
        if tag.startswith("I-") and prev not in (f"B-{tag[2:]}", tag):
            return (f"{tag!r} at word {j} follows {prev!r}: in IOB2 an entity starts with B-{tag[2:]} (for IOB1 data, where I- "
                    "starts an entity, set data.tag_scheme=iob1)")
        prev = tag
    return None


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """IOB1 (I- starts an entity; B- only one right after another of its type) as IOB2: an I-X that follows neither
    B-X nor I-X becomes B-X."""
    out, prev = [], OUTSIDE
    for tag in tags:
        out.append(f"B-{tag[2:]}" if tag.startswith("I-") and prev not in (f"B-{tag[2:]}", tag) else tag)
        prev = tag
    return out


def tag_names_of(train: Dataset, cfg: DataConfig) -> list[str]:
    """Tag names in id order: the column's ClassLabel names, data.label_names for integer ids, else the training
    split's tags sorted, O first."""
    feature = train.features[cfg.tags_column]
    inner = getattr(feature, "feature", None)
    if isinstance(inner, ClassLabel):
        return list(inner.names)
    values = {v for row in train[cfg.tags_column] if isinstance(row, list) for v in row}
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if not cfg.label_names:
            raise DataError(f"the train split's tags column '{cfg.tags_column}'{source_of('train', cfg)} holds tag ids; name "
                            "them with data.label_names (e.g. [O, B-PER, I-PER, ...], in id order) or write the tags as names.")
        if max(values) >= len(cfg.label_names) or min(values) < 0:
            raise DataError(f"data.label_names names {len(cfg.label_names)} tags but the train split has tag id {max(values)}.")
        return [str(n) for n in cfg.label_names]
    if cfg.label_names:
        raise DataError("data.label_names is only for integer tag ids; the train split's tags are names already.")
    names = sorted(str(v) for v in values)
    return ([OUTSIDE] if OUTSIDE in names else []) + [n for n in names if n != OUTSIDE]


class TokenClassification(Task):
    name = "token_classification"
    problem_type = None  # transformers has none for tokens; a saved model is told apart by its architecture
    metric_names = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")
    default_metric_for_best = "entity_f1"
    stratify = False  # a row has many tags: no stratum
    smoothing = 0.0  # train.label_smoothing
    per_token = True  # the feature cache keeps a vector per labelled position (hftl/cache.py)
    # CoNLL-2003's sentence length goes with what they hold (short: headlines, sports tables). Length-grouped batches
    # as transformers groups them left LoRA at 0.708 test entity F1 after one epoch against 0.747 with random batches:
    # each step weighed a batch of 3-word headlines as much as one of 40-word sentences, and a group of 50 batches ran
    # from its longest to its shortest. The loss weighing every word the same (hftl/train.py: labelled_per_batch) and
    # the batches in random order fixed that for full fine-tuning: 0.802 and 0.801 against the Trainer's random
    # batches' 0.804 and 0.798 (seeds 42 and 0), 2.1-2.3x faster end to end. Not for LoRA: 0.734 and 0.724 against
    # the Trainer's 0.737 and 0.739, so LoRA keeps random batches (0.747 and 0.742, 0.94-0.95x the Trainer's time)
    # (scripts/results/tasks_conll.md, tasks_conll_seed0.md). The other peft modes were not measured on tokens.
    group_by_length = True
    random_batch_modes = ("lora",)
    shuffle_grouped_batches = True
    # The solver sees words, not sentences, so entity scores cannot rank its penalties: the per-word loss does.
    solver_metric = "per-word log-loss"

    # ------------------------------------------------------------ settings

    def configure(self, cfg: Config) -> Config:
        cfg = super().configure(cfg)
        a, d, t = cfg.adapt, cfg.data, cfg.train
        refused = [(key, value) for key, value in (("adapt.align", a.align), ("adapt.reweight", a.reweight or None),
                                                  ("data.target", d.target),
                                                  ("train.class_weights", t.class_weights),
                                                  ("data.label_template", d.label_template))
                   if value is not None]
        if refused:
            key, value = refused[0]
            off = "false" if key == "adapt.reweight" else "null"
            raise ConfigError(f"{key}={value}: not implemented for task=token-classification yet; set {key}={off}.")
        self.smoothing = t.label_smoothing
        return cfg

    # ------------------------------------------------------------ labels

    @classmethod
    def read(cls, train: Dataset, cfg: DataConfig) -> "TokenClassification":
        names = tag_names_of(train, cfg)
        if cfg.tag_scheme == "iob1":  # an entity that IOB1 starts with I-X starts with B-X once converted
            names += sorted({f"B-{n[2:]}" for n in names if n.startswith("I-")} - set(names))
        bad = next((n for n in names if iob2_problem([n.replace("I-", "B-", 1)])), None)
        if bad is not None:
            raise DataError(f"the train split's tags column '{cfg.tags_column}'{source_of('train', cfg)} has tag {bad!r}; "
                            "token classification reads IOB2 tags: O, B-<type>, I-<type> (e.g. B-PER, I-PER).")
        if len(names) < 2:
            raise DataError(f"the train split has a single tag {names}; token classification needs at least two.")
        return cls(names)

    def encode(self, ds: Dataset, role: str, cfg: DataConfig) -> Dataset:
        """The tags as ids ('labels', a list per row), after the one-line checks that name the row: a tokens/tags pair
        of unequal length, an empty row, a tag training never saw, a sequence that is not IOB2."""
        where = source_of(role, cfg)
        tokens_col, tags_col = cfg.tokens_column, cfg.tags_column
        inner = getattr(ds.features[tags_col], "feature", None)
        index = {n: i for i, n in enumerate(self.names)}
        labels = []
        for i, (tokens, tags) in enumerate(zip(ds[tokens_col], ds[tags_col])):
            if not isinstance(tokens, list) or not all(isinstance(w, str) for w in tokens):
                raise DataError(f"the {role} split's row {i}{where}: data.tokens_column '{tokens_col}' holds {str(tokens)[:60]}, "
                                "not a list of words (strings).")
            if not isinstance(tags, list):
                raise DataError(f"the {role} split's row {i}{where}: data.tags_column '{tags_col}' holds {str(tags)[:60]}, not a "
                                "list of tags, one per word.")
            if not tokens:
                raise DataError(f"the {role} split's row {i}{where} has no words; drop it (a row needs at least one word).")
            if len(tokens) != len(tags):
                raise DataError(f"the {role} split's row {i}{where} has {len(tokens)} words ('{tokens_col}') but {len(tags)} tags "
                                f"('{tags_col}'); give one tag per word.")
            if isinstance(inner, ClassLabel):
                tags = [inner.int2str(v) for v in tags]
            elif cfg.label_names:
                tags = [self.names[v] if isinstance(v, int) and 0 <= v < len(self.names) else str(v) for v in tags]
            else:
                tags = [str(v) for v in tags]
            if cfg.tag_scheme == "iob1":
                tags = iob1_to_iob2(tags)
            unseen = sorted(set(tags) - set(index))
            if unseen:
                raise DataError(f"the {role} split's row {i}{where} has tag(s) {unseen} that the train split never has; train "
                                f"tags are {self.names}.")
            problem = iob2_problem(tags)
            if problem:
                raise DataError(f"the {role} split's row {i}{where} is not IOB2: {problem}.")
            labels.append([index[t] for t in tags])
        return self.add_labels(ds.remove_columns(tags_col), labels)

    def add_labels(self, ds: Dataset, labels: list) -> Dataset:
        if "labels" in ds.column_names:  # the model reads 'labels'; a stray one would shadow ours
            ds = ds.remove_columns("labels")
        # The names ride with the column: the modality reads them to label a B- word's later pieces as I-.
        return ds.add_column("labels", labels, feature=Sequence(ClassLabel(names=self.names)))

    def blank(self, n: int) -> list:
        return [[] for _ in range(n)]

    def labels_of(self, ds: Dataset):
        return [list(row) for row in ds["labels"]]

    def check_train(self, train: Dataset, cfg: DataConfig, after: str = "") -> None:
        present = {t for row in train["labels"] for t in row}
        if len(present) < 2:
            raise DataError(f"the train split{source_of('train', cfg)} has words of a single tag{after} "
                            f"({', '.join(repr(self.names[i]) for i in present)}); token classification needs at least two.")

    def observe_train(self, train: Dataset) -> None:
        self.counts = Counter(t for row in train["labels"] for t in row)

    # ------------------------------------------------------------ loss and predictions

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over the labelled sub-tokens; reduction='none': one value per row, the mean over its labelled
        sub-tokens (0 for a row with none), so reweighting and evaluation weigh rows as for the other tasks."""
        labels = labels.to(logits.device).long()
        target = torch.where(labels <= CONTINUATION, CONTINUATION - labels, labels)
        each = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                                    label_smoothing=self.smoothing, reduction="none").view(target.shape)
        mask = (target != IGNORE).to(each.dtype)
        if reduction == "none":
            return (each * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        if reduction == "sum":
            return each.sum()
        return each.sum() / mask.sum().clamp(min=1)

    def predict(self, logits: np.ndarray) -> list:
        raise ConfigError("token classification predicts a tag per word, which needs the word boundaries (predict_rows).")

    def predict_rows(self, logits: np.ndarray, labels: np.ndarray) -> list[list[int]]:
        """One tag id per word the model saw: the argmax at each word's first sub-token (labels >= 0)."""
        logits, labels = np.asarray(logits), np.asarray(labels)
        best = logits.argmax(-1)
        return [best[i][labels[i] >= 0].tolist() for i in range(len(labels))]

    def references(self, labels) -> list[list[int]]:
        """Tag ids per word: from padded sub-token labels (n x positions) the first pieces', from word-level rows as is."""
        if isinstance(labels, np.ndarray) and labels.ndim == 2 and labels.dtype != object:
            return [row[row >= 0].tolist() for row in labels]
        return [list(row) for row in labels]

    def tag_rows(self, rows) -> list[list[str]]:
        return [[self.names[t] for t in row] for row in rows]

    def compute(self, modules: dict, predictions: list, references: list) -> dict[str, float]:
        predictions, references = self.tag_rows(predictions), self.tag_rows(references)
        scores = {}
        for metric in modules.values():
            scores.update({k: float(v) for k, v in metric.compute(predictions=predictions, references=references).items()})
        return scores

    def solve(self, x, y, x_val, y_val, t, modules):
        """Multinomial logistic regression on the frozen features of each word's first piece (hftl/solver.py), C chosen
        by the per-word cross-entropy on validation (or cross-validated): the loss AdamW would minimise."""
        from .. import solver

        if self.smoothing:
            return "train.label_smoothing changes the loss, which the solved logistic regression does not minimise"

        def score(clf, z, labels) -> float:
            """Minus the mean cross-entropy over the words, every tag counted: a tag few training sentences lack (I-LOC
            in 16 CoNLL sentences) gets probability 0, clipped, where validation has it."""
            proba = np.zeros((len(labels), self.num_outputs))
            proba[:, clf.classes_] = clf.predict_proba(z)
            return float(np.log(np.clip(proba[np.arange(len(labels)), labels], 1e-15, 1)).mean())

        return (solver.solve_logistic(x, y, self.num_outputs, x_val, y_val, score, seed=t.seed),
                "logistic regression (L2, lbfgs) on each word's first-piece features")

    # ------------------------------------------------------------ what users see

    def scores(self, logits: np.ndarray) -> np.ndarray:
        return torch.as_tensor(np.asarray(logits), dtype=torch.float32).softmax(-1).numpy()

    def row_scores(self, logits: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
        """Per row, the tags' probabilities at each word's first sub-token (words x tags)."""
        probabilities, labels = self.scores(logits), np.asarray(labels)
        return [probabilities[i][labels[i] >= 0] for i in range(len(labels))]

    def readable(self, predictions: list) -> list[list[str]]:
        """Word-level tags per row."""
        return self.tag_rows(predictions)

    def readable_from_scores(self, scores) -> list[list[str]]:
        """`scores`: per row, a (words x tags) array of what pipeline() gives each word's first sub-token."""
        return [[self.names[int(j)] for j in np.asarray(s).argmax(-1)] if len(s) else [] for s in scores]

    def row(self, scores) -> dict:
        """A tag per word (with its probability), and the entities they make: type and word span [start, end)."""
        scores = np.asarray(scores)
        tags = self.readable_from_scores([scores])[0]
        return {"tags": tags, "scores": [float(s.max()) for s in scores],
                "entities": [{"type": k, "start": a, "end": b + 1} for k, a, b in entities.entities([tags])]}

    def near_tie(self, scores, expected: list[str]) -> float:
        """0 when the row's words get the `expected` tags; else the largest gap between a word's best probability and
        the expected tag's (inf for a tag the model lacks, or a word the pipeline did not score)."""
        scores = np.asarray(scores)
        if len(scores) < len(expected):
            return float("inf")
        gaps = [float(s.max() - s[self.names.index(e)]) if e in self.names else float("inf") for s, e in zip(scores, expected)]
        return max(gaps, default=0.0)

    figure_name = "per_entity.png"
    figure_caption = "Entity-level precision, recall and F1 per entity type"

    def _per_type(self, references: list, predictions: list):
        refs = self.tag_rows(references)
        preds = self.tag_rows(predictions)
        # A word cut off by truncation has no prediction; score the words the model saw, as evaluation does.
        refs = [r[:len(p)] for r, p in zip(refs, preds)]
        return refs, preds, entities.types(refs + preds)

    def figure(self, references: list, predictions: list, path, title: str = ""):
        from .. import plots

        refs, preds, kinds = self._per_type(references, predictions)
        per = [entities.scores(refs, preds, k) for k in kinds]
        return plots.per_label_png({m: [s[m] for s in per] for m in ("precision", "recall", "f1")}, kinds,
                                   [s["support"] for s in per], path, title or self.figure_caption)

    # ------------------------------------------------------------ whether to trust the run (hftl/trust.py), per word

    def majority(self, train_references: list) -> int:
        """The most frequent training tag (on CoNLL-2003, 'O'): every word tagged with it finds no entity."""
        return int(np.bincount([t for row in train_references for t in row], minlength=self.num_outputs).argmax())

    def describe_constant(self, constant: int) -> str:
        return f"{self.names[constant]} (every word)"

    def constant_predictions(self, constant: int, references: list) -> list:
        return [[constant] * len(row) for row in references]

    def above_baseline(self, model: dict, baseline: dict, n: int) -> tuple[bool | None, str]:
        """Clearly above: entity F1 at least BASELINE_MARGIN above tagging every word with the most frequent tag."""
        from .single_label import BASELINE_MARGIN

        if not n:
            return None, "Not assessed: the split has no rows."
        f1, base = model["entity_f1"], baseline["entity_f1"]
        scores = f"entity F1 {f1:.4f} against {base:.4f} for tagging every word with the most frequent training tag"
        if f1 >= base + BASELINE_MARGIN:
            return True, f"clearly above the majority baseline: {scores}."
        return False, f"NOT clearly above the majority baseline: {scores} (clearly above needs {BASELINE_MARGIN:g} more)."

    def collapse(self, predictions: list, references: list) -> dict:
        """As single-label's, over words: one tag for COLLAPSE_SHARE of the words while the tags are not that lopsided."""
        from .single_label import SingleLabel

        flat = SingleLabel(self.names)
        out = flat.collapse([t for row in predictions for t in row], [t for row in references for t in row])
        out["text"] = out["text"].replace("predictions are", "words' predicted tags are").replace("one class", "one tag")
        return out

    def card_rows(self, references: list, predictions: list) -> list[dict]:
        refs, preds, kinds = self._per_type(references, predictions)
        return [{"name": k, **entities.scores(refs, preds, k)} for k in kinds]

    @classmethod
    def from_model_config(cls, config) -> "TokenClassification":
        return cls([config.id2label[i] for i in range(config.num_labels)])


def is_token_model(config) -> bool:
    """A saved model for token classification: transformers stores no problem_type for it, only the architecture."""
    return any(a.endswith("ForTokenClassification") for a in getattr(config, "architectures", None) or ())


register(TokenClassification)


def pipeline_scores(folder, inputs: list[list[str]]):
    """(per row, a words x tags array of probabilities; the folder's task) from pipeline('token-classification') on
    the saved folder, fed the rows' words (is_split_into_words): each word's row is the softmax the pipeline computes
    at its first sub-token, which is the tag aggregation_strategy='first' gives it. The pipeline's own preprocessing
    and forward run; its postprocess reports only each piece's best score, so the softmax is taken here as it takes
    it, keeping every tag's probability for the near-ties of a mixed-precision run. A word the tokenizer gives no
    piece (or one past truncation) has no row, as evaluation predicted none for it. A model trained with data.stride
    (the folder's hftl_config.yaml says) is called with that stride, and each word read in the window training
    scored it in (hftl/modalities/tokens.py: window_plan)."""
    import yaml
    from transformers import pipeline

    from ..modalities.tokens import window_plan
    from . import from_model_config

    saved = Path(folder) / "hftl_config.yaml"
    stride = ((yaml.safe_load(saved.read_text()) or {}).get("data") or {}).get("stride") if saved.is_file() else None
    clf = pipeline("token-classification", model=str(folder), device=-1, model_kwargs={"use_safetensors": True})
    kind = from_model_config(clf.model.config)
    preprocess, forward, _ = clf._sanitize_parameters(is_split_into_words=True, **({"stride": stride, "aggregation_strategy": "first"}
                                                                                     if stride else {}))
    out = []
    for words in inputs:
        rows = []
        chunks = [clf.forward(model_inputs, **forward) for model_inputs in clf.preprocess(words, **preprocess)]
        plans = window_plan([c["word_ids"] for c in chunks], stride) if stride else [None] * len(chunks)
        for outputs, plan in zip(chunks, plans):
            logits = outputs["logits"][0].float().numpy()
            shifted = np.exp(logits - logits.max(-1, keepdims=True))  # the pipeline's postprocess softmax
            probabilities, prev = shifted / shifted.sum(-1, keepdims=True), None
            for j, w in enumerate(outputs["word_ids"]):
                if (plan[j] is not None and plan[j][1] and plan[j][2]) if plan else (w is not None and w != prev):
                    rows.append(probabilities[j])
                prev = w
        out.append(np.array(rows).reshape(len(rows), len(kind.names)))
    return out, kind
