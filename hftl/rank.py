"""`hftl rank`: order candidate checkpoints for a task by transferability estimates, before training any.

Each candidate is loaded the way `hftl train` loads it (hftl/recipe.py: its processor, the same rows and
preparation, a classifier for the task's labels); the features its classification head would read for
each training row are extracted once (hftl/cache.py: head modules swapped for nn.Identity) and scored
with LogME and H-score (hftl/estimates.py). The features are stored under the same cache file name a
head-mode `hftl train` of that checkpoint uses, so ranking again, or training the winner's head
afterwards, reads them instead of running the backbone again.

`scratch:<name>` stands for <name>'s architecture with random weights (model.from_scratch): the
baseline that shows what pretraining buys on this task.
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager

from accelerate.utils import set_seed
from datasets import DatasetDict

from . import adapt, cache, estimates, models
from .config import Config, ConfigError
from .modalities import Modality
from .recipe import load_checked
from .train import make_accelerator, tensor_core_padding

SCRATCH = "scratch:"


def rank(cfg: Config, modality: Modality, candidates: list[str]) -> dict:
    """Score every candidate on cfg's training rows; the result's 'models' are sorted best first (by LogME)."""
    if not candidates:
        raise ConfigError("`hftl rank` needs checkpoints to compare: --models NAME [NAME ...] (Hub ids, local folders, or scratch:NAME).")
    accelerator = make_accelerator(cfg.train)
    splits, source, _, task = load_checked(cfg, modality)  # the raw rows do not depend on the checkpoint: read them once
    # LogME and H-score as computed here score one class per vector: a row's (single-label) or a word's (tokens)
    if task.name not in ("single_label", "token_classification"):
        raise ConfigError(f"`hftl rank` scores checkpoints by how well their features separate the classes (LogME, H-score); "
                          f"these labels are {task.name}, which it does not score yet. Compare checkpoints with short "
                          "`hftl train` runs (or `hftl compare`) instead.")
    feature = splits["train"].features["labels"]
    labels = getattr(feature, "feature", feature).names  # token tags: a ClassLabel inside the Sequence
    # Every candidate's processor first, so a misspelt name fails now rather than after the others' features.
    loaded = [_processor(cfg, modality, candidate) for candidate in candidates]
    rows = [_score(*each, modality, splits["train"], labels, accelerator, task.per_token) for each in loaded]
    rows.sort(key=lambda r: -r["logme"])
    return {"task": cfg.task, "data": source, "train_rows": len(splits["train"]), "labels": labels, "ranked_by": "logme",
            "models": [{"rank": i, **r} for i, r in enumerate(rows, 1)]}


@contextmanager
def _naming(candidate: str):
    try:
        yield
    except OSError as e:  # transformers: no such folder or Hub repo, or one without the files asked for
        raise ConfigError(f"--models entry '{candidate}': cannot load '{candidate.removeprefix(SCRATCH)}' ({(str(e).splitlines() or [type(e).__name__])[0]}). "
                          "Give a local model folder or a Hub id (downloads need network; with HF_HUB_OFFLINE=1 only what is "
                          "cached), or scratch:NAME.") from e


def _processor(cfg: Config, modality: Modality, candidate: str) -> tuple:
    """(candidate, its config, its path, its processor)."""
    # The candidate replaces model.name_or_path, so the cache key is the one `hftl train model.name_or_path=<name>` computes.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=candidate.removeprefix(SCRATCH),
                                                             from_scratch=candidate.startswith(SCRATCH)))
    with _naming(candidate):
        path, _ = models.resolve(cfg.model)
        return candidate, cfg, path, modality.load_processor(path, cfg)


def _score(candidate: str, cfg: Config, path: str, processor, modality: Modality, train, labels: list[str], accelerator,
           per_token: bool = False) -> dict:
    """One candidate's scores. `per_token` (token classification): one vector per word, its first piece's, scored
    against the word's tag, the vectors a head-mode run's cache holds (and under the same file name)."""
    encoded, collator = modality.prepare(DatasetDict({"train": train}), processor, cfg)
    collator = tensor_core_padding(collator, accelerator)
    set_seed(cfg.train.seed)  # the same random weights every time for scratch:, so their features are cached too
    with _naming(candidate):
        reads = models.representation(path, cfg.model, cfg.adapt, cfg.task)
        model, new_keys = models.load_classifier(modality.auto_class, path, labels, cfg.model, reads)
    head = adapt.head_modules(model, new_keys)
    model.to(accelerator.device)

    start = time.perf_counter()
    base = cache._checkpoint_fingerprint(model, head, collator, cfg, accelerator.mixed_precision, accelerator.device)
    features, info = cache.split_features(model, head, "train", encoded["train"], collator, base, cfg, accelerator, per_token)
    batch = features.with_format("numpy")[:]
    x, y = batch["features"], batch["labels"]
    if per_token:
        x, y = words(x, y)
    if x.dtype == object:  # rows of different lengths: the head reads a vector per token or window, not one per row
        raise ConfigError(f"--models entry '{candidate}': the head {head} of {type(model).__name__} reads more than one vector per "
                          "row (e.g. every token), so there are no pooled features to score; hftl rank scores models whose head "
                          "reads one pooled vector (BERT, ViT, wav2vec2, decoder models, ...).")
    logme, hscore = estimates.logme(x, y), estimates.hscore(x, y)
    seconds = time.perf_counter() - start
    cached = "hit" if info["hit"] else "computed" if info["file"] else \
        "computed, not cached (" + ("random preprocessing)" if info["random"] else "collator cannot be fingerprinted)")
    return {"model": candidate, "logme": logme, "hscore": hscore, "seconds": seconds, "feature_cache": cached,
            "cache_file": info["file"], "feature_dim": int(x.shape[1])}


def words(features, labels) -> tuple:
    """(words x dim, tags) from per-row cached token features (each row's labelled positions' vectors, flattened) and
    labels: each word's first piece (label >= 0; the later pieces data.label_all_subtokens trains are left out)."""
    import numpy as np

    rows = [(np.asarray(f).reshape(len(t), -1), np.asarray(t)) for f, t in zip(features, labels) if len(t)]
    x, y = np.concatenate([f for f, _ in rows]), np.concatenate([t for _, t in rows])
    return x[y >= 0], y[y >= 0]


def table(result: dict) -> str:
    """The ranking as a markdown table, with a line saying what it was computed on."""
    lines = [f"{result['task']}: {result['train_rows']} training rows of {result['data']}, {len(result['labels'])} labels. "
             "Ranked by LogME; higher is better for LogME and H-score.", "",
             "| rank | model | LogME | H-score | seconds | features |", "|---:|---|---:|---:|---:|---|"]
    lines += [f"| {r['rank']} | {r['model']} | {r['logme']:.4f} | {r['hscore']:.4f} | {r['seconds']:.2f} | {r['feature_cache']} |"
              for r in result["models"]]
    return "\n".join(lines)
