"""contrastive: tune the body on pairs of labelled rows, then solve the head on it (in the spirit of SetFit,
Tunstall et al. 2022, "Efficient Few-Shot Learning Without Prompts").

With a few labelled rows per class, fine-tuning a classifier end to end takes a handful of optimizer steps from a
random head and stays near chance. Pairs give many more training signals from the same rows. SetFit draws, per
round and row, one partner of the same label and one of another, and trains the body so that the cosine similarity of
the two pooled vectors matches 1 or 0 (CosineSimilarityLoss): 2 pairs, 4 forward passes per row and round. Stage 1
here uses every pair inside each batch instead: a batch of B rows (an ordinary shuffled batch of the training rows)
gives B(B-1)/2 pairs from B forward passes, the same cosine-to-{0, 1} squared error over all of them. It runs as many
optimizer steps as SetFit would for adapt.pair_iterations rounds at train.batch_size, with half the forward passes
per step; measured on SST-2 with 8 rows per class it matched SetFit's pair sampling in accuracy with a lower spread
over seeds (scripts/bench_fewshot.py). The vectors are what the head reads (hftl/pooling.py, e.g. all-MiniLM's
normalised mean), and the stage goes through the shared loop (checkpoints, resume, signals, the non-finite-loss
guard, many processes: each process's batch gives its own pairs). It runs its whole budget, with no selection on
validation (SetFit's does not either); stage 2 solves the head on the tuned, frozen body (hftl/solver.py, with the
feature cache) as head mode does, its penalty chosen on validation or by cross-validation.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from datasets import DatasetDict
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import SequenceClassifierOutput

from .. import cache, checkpoint, train
from ..config import ConfigError
from ..tasks import Task
from . import register_mode, set_trainable


class InBatchPairs(nn.Module):
    """The classifier's body as an embedder: its 'logits' are the L2-normalised pooled vectors of the rows (the head
    swapped out), which `InBatchPairsTask` scores pair by pair."""

    def __init__(self, model: nn.Module, head: list[str]):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, **inputs) -> SequenceClassifierOutput:
        if "num_windows" in inputs:
            raise ConfigError("adapt.mode=contrastive compares one model input per row; these rows are cut into several "
                              "windows (audio longer than data.max_duration): raise data.max_duration or use adapt.mode=lpft.")
        with cache.heads_removed(self.model, self.head):
            return SequenceClassifierOutput(logits=F.normalize(self.model(**inputs).logits.float(), dim=-1))


class InBatchPairsTask(Task):
    """Stage 1's target: cosine similarity of every pair of rows in a batch, squared error to 1 for a pair of the same
    label and 0 otherwise, over the B(B-1)/2 pairs. Stage 1 never evaluates, so it predicts nothing."""
    name = "in_batch_pairs"

    def loss(self, logits, labels, reduction="mean"):
        cos = logits @ logits.T
        upper = torch.triu(torch.ones_like(cos, dtype=torch.bool), diagonal=1)
        same = (labels[:, None] == labels[None, :]).to(cos.dtype)
        # A batch of one row (a short last batch) has no pair: a zero loss that still touches every weight.
        return F.mse_loss(cos[upper], same[upper]) if len(labels) > 1 else cos.sum() * 0.0


def stage_steps(rows: int, iterations: int, batch_size: int, epochs: float) -> int:
    """The optimizer steps SetFit takes for `iterations` rounds of pairs over `rows` labelled rows (2 pairs per row a
    round, train.epochs passes) at this batch size."""
    return max(1, math.ceil(epochs * iterations * 2 * rows / batch_size))


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
    rows = len(encoded["train"])
    if rows < 2:
        raise ConfigError("adapt.mode=contrastive: the training rows give no pairs (it needs at least two rows).")
    set_trainable(model, [n for n, _ in model.named_children() if n not in ctx.head])  # the head has no gradient here
    t = cfg.train
    steps = stage_steps(rows, cfg.adapt.pair_iterations, t.batch_size * accelerator.num_processes, t.epochs)
    # The pairs set stage 1's budget (so no train.min_steps here); its only split is train: nothing is evaluated or
    # selected during it.
    body_cfg = replace(cfg, train=replace(t, max_steps=steps, min_steps=None, metrics=[], metric_for_best="loss",
                                                  greater_is_better=False, checkpoint_dir=str(checkpoint.root(cfg) / "contrastive")),
                       hub=replace(cfg.hub, strategy="end"))
    pairs = t.batch_size * (t.batch_size - 1) // 2
    accelerator.print(f"contrastive stage 1: {steps} optimizer steps over {rows:,} labelled rows ({cfg.adapt.pair_iterations} rounds "
                      f"in SetFit's terms), every pair in each batch of {t.batch_size} ({pairs:,} pairs), cosine-similarity loss "
                      "on what the head reads")
    body = train.fit(InBatchPairs(model, ctx.head), DatasetDict(train=encoded["train"]), ctx.collator, body_cfg, accelerator,
                     task=InBatchPairsTask(["similar"]))
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
        "contrastive": {"steps": body["steps"], "batch_size": t.batch_size, "pairs_per_batch": pairs,
                        "loss_first": body["step_log"][0]["loss"] if body["step_log"] else None,
                        "loss_last": body["step_log"][-1]["loss"] if body["step_log"] else None},
    }


# Pairs are 'same class' or not: a set of labels or a number defines no such pairs.
register_mode("contrastive", apply, fit=fit, frozen_features=True, tasks=("single_label",),
              why_not="pairs rows of the same class against rows of others")
