"""contrastive: tune the body on pairs of labelled rows, then solve the head on it (in the spirit of SetFit,
Tunstall et al. 2022, "Efficient Few-Shot Learning Without Prompts").

With a few labelled rows per class, fine-tuning a classifier end to end takes a handful of optimizer steps from a
random head and stays near chance. Pairs give many more training signals from the same rows: stage 1 draws, for
every labelled row and each of adapt.pair_iterations rounds, one row of the same label (target similarity 1) and
one of another label (target 0), and trains the whole backbone so that the cosine similarity of the two rows'
pooled vectors (what the head reads: hftl/pooling.py, e.g. all-MiniLM's normalised mean) matches the target
(SetFit's CosineSimilarityLoss), with the run's train.* settings, through the shared loop (checkpoints, resume,
signals, the non-finite-loss guard, many processes). Validation scores stage 1 by pair accuracy (cosine > 0.5
exactly when the pair shares a label) on pairs drawn the same way from the validation rows. Stage 2 solves the
head on the tuned, frozen body (hftl/solver.py, with the feature cache) as head mode does.
"""
from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import SequenceClassifierOutput

from .. import cache, checkpoint, train
from ..config import ConfigError
from ..tasks import Task
from . import register_mode, set_trainable


def pairs(labels: list[int], iterations: int, seed: int, split: int = 0) -> dict[str, list]:
    """SetFit's pair sampling: per round and row, one partner of the same label (label 1: similarity 1) and one of
    another (label 0: similarity 0). A row whose label no other row has gets no positive partner, a label set of one
    class no negative. `split` tags the rows for PairCollator."""
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    a, b, target = [], [], []
    others = {y: [j for j in range(len(labels)) if labels[j] != y] for y in by_label}
    for _ in range(iterations):
        for i, y in enumerate(labels):
            same = [j for j in by_label[y] if j != i]
            for partners, value in ((same, 1), (others[y], 0)):
                if partners:
                    a.append(i), b.append(rng.choice(partners)), target.append(value)
    return {"split": [split] * len(a), "a": a, "b": b, "labels": target}


class PairCollator:
    """Batches of pairs: each side's rows fetched from the model inputs of the split the pair came from
    (`splits[row['split']]`) and padded by the run's own collator."""

    def __init__(self, splits: list, collator):
        self.splits, self.collator = splits, collator

    def __call__(self, batch: list[dict]) -> dict:
        out = {"labels": torch.tensor([r["labels"] for r in batch])}
        for side in ("a", "b"):
            inputs = self.collator([{k: v for k, v in self.splits[r["split"]][int(r[side])].items() if k != "labels"} for r in batch])
            if "num_windows" in inputs:
                raise ConfigError("adapt.mode=contrastive compares one model input per row; these rows are cut into several "
                                  "windows (audio longer than data.max_duration): raise data.max_duration or use adapt.mode=lpft.")
            out.update({f"{side}_{k}": v for k, v in inputs.items() if k != "labels"})
        return out


class PairModel(nn.Module):
    """The classifier's body as a pair scorer: its 'logits' are the cosine similarity of the two rows' pooled vectors
    (the head swapped out), one per pair."""

    def __init__(self, model: nn.Module, head: list[str]):
        super().__init__()
        self.model, self.head = model, head

    def embed(self, inputs: dict) -> torch.Tensor:
        with cache.heads_removed(self.model, self.head):
            return self.model(**inputs).logits

    def forward(self, **inputs) -> SequenceClassifierOutput:
        sides = {s: {k[2:]: v for k, v in inputs.items() if k.startswith(s + "_")} for s in ("a", "b")}
        cos = F.cosine_similarity(self.embed(sides["a"]), self.embed(sides["b"]), dim=-1)
        return SequenceClassifierOutput(logits=cos.unsqueeze(-1))


class PairTask(Task):
    """Stage 1's target: the pair's similarity (1: a shared label, 0: none), squared error on the cosine (SetFit's
    CosineSimilarityLoss); a pair is predicted alike when the cosine is above 0.5, scored by accuracy."""
    name = "pairs"
    metric_names = ("accuracy",)
    default_metric_for_best = "accuracy"

    def loss(self, logits, labels, reduction="mean"):
        return F.mse_loss(logits[:, 0].float(), labels.float(), reduction=reduction)

    def predict(self, logits):
        return (np.asarray(logits)[:, 0] > 0.5).astype(int).tolist()


def apply(model, cfg, head):
    if cfg.pair_iterations < 1:
        raise ConfigError(f"adapt.pair_iterations={cfg.pair_iterations}; the contrastive stage needs at least 1 round of pairs (default 20).")
    model.requires_grad_(True)
    return model


def fit(model, ctx, hooks) -> dict:
    cfg, accelerator, encoded = ctx.cfg, ctx.accelerator, ctx.encoded
    if hooks:
        raise ConfigError("adapt.mode=contrastive trains on pairs of rows, which the options that reweight or align the "
                          "classification loss (adapt.reweight, adapt.align, adapt.l2sp, adapt.layer_lr_decay) do not act on; "
                          "turn them off, or use adapt.mode=lpft.")
    seed = cfg.train.seed
    sources = [s for s in ("train", "validation") if s in encoded]
    pair_splits = DatasetDict({
        # Validation pairs: one round, so that stage 1's evaluation costs about two classification evaluations.
        split: Dataset.from_dict(pairs(list(encoded[split]["labels"]), cfg.adapt.pair_iterations if split == "train" else 1, seed + i, i))
        for i, split in enumerate(sources)
    })
    if not len(pair_splits["train"]):
        raise ConfigError("adapt.mode=contrastive: the training rows give no pairs (it needs at least two rows).")
    set_trainable(model, [n for n, _ in model.named_children() if n not in ctx.head])  # the head has no gradient here
    # The pairs set stage 1's budget (adapt.pair_iterations rounds, train.epochs passes), so no train.min_steps here.
    body_cfg = replace(cfg, train=replace(cfg.train, min_steps=None, metric_for_best="accuracy", greater_is_better=True,
                                          metrics=["accuracy"], checkpoint_dir=str(checkpoint.root(cfg) / "contrastive")),
                       hub=replace(cfg.hub, strategy="end"))
    accelerator.print(f"contrastive stage 1: {len(pair_splits['train']):,} pairs from {len(encoded['train']):,} labelled rows "
                      f"({cfg.adapt.pair_iterations} rounds), cosine-similarity loss on what the head reads")
    body = train.fit(PairModel(model, ctx.head), pair_splits, PairCollator([encoded[s] for s in sources], ctx.collator), body_cfg,
                     accelerator, task=PairTask(["similar"]))
    accelerator.free_memory()

    model = body["model"].model
    accelerator.print("contrastive stage 2: the head on the tuned body, frozen")
    set_trainable(model, ctx.head)
    head_cfg = replace(cfg, train=replace(cfg.train, epochs=cfg.adapt.lp_epochs, max_steps=None, learning_rate=cfg.adapt.lp_learning_rate,
                                          checkpoint_dir=str(checkpoint.root(cfg) / "head"), resume=None))
    probe = cache.fit_on_features(model, ctx.head, encoded, ctx.collator, head_cfg, accelerator, ctx.task) \
        or train.fit(model, encoded, ctx.collator, head_cfg, accelerator, task=ctx.task)

    def tag(entries, stage, offset=0):
        return [{"stage": stage, **e, "step": e["step"] + offset} for e in entries]

    offset = body["steps"]
    return {
        **probe,
        "history": tag(body["history"], "contrastive") + tag(probe["history"], "head", offset),
        "step_log": tag(body["step_log"], "contrastive") + tag(probe["step_log"], "head", offset),
        "best_step": offset + probe["best_step"],
        "steps": offset + probe["steps"],
        "train_seconds": body["train_seconds"] + probe["train_seconds"],
        "contrastive": {"pairs": len(pair_splits["train"]), "steps": body["steps"], "validation_pair_accuracy": body["results"].get("validation", {}).get("accuracy")},
    }


register_mode(
    "contrastive", apply, fit=fit, frozen_features=True,
    help="Few labels (SetFit-style): tune the whole backbone on pairs of labelled rows (same label: cosine similarity 1, "
         "other label: 0; adapt.pair_iterations rounds) with train.*, then solve the head on the tuned, frozen body.",
)
