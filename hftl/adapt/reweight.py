"""adapt.reweight: instance reweighting for covariate shift, with unlabelled target rows (data.target).

Before training, the model as loaded (heads removed: the features its head reads, `hftl.domain.pooled_features`)
embeds the source training rows and the target rows, and the domain classifier of hftl/domain.py
estimates p = p(target | x), out of fold, so no row's weight comes from a classifier that saw that row. The density ratio p_target(x) / p_source(x) is
p/(1-p) * n_source/n_target; clipped at adapt.reweight_clip and normalised to mean 1, it weighs each
source row's loss (the task's: cross-entropy, binary cross-entropy or squared error): rows that look like the target
count more (Shimodaira 2000).
"""
from __future__ import annotations

import numpy as np
from torch import nn

from ..config import ConfigError
from ..data import DataError
from ..domain import FOLDS, pooled_features, target_probability
from . import Context, Hook, register_option


def density_ratio(source: np.ndarray, target: np.ndarray, seed: int) -> np.ndarray:
    """p_target(x) / p_source(x) for each source row, from a domain classifier's out-of-fold probabilities."""
    folds = min(FOLDS, len(source), len(target))
    if folds < 2:
        raise DataError(f"adapt.reweight needs at least 2 training rows and 2 data.target rows to cross-validate its domain "
                        f"classifier; there are {len(source)} and {len(target)}.")
    p = target_probability(source, target, seed, folds)[: len(source)]
    p = p.clip(1e-6, 1 - 1e-6)
    return p / (1 - p) * len(source) / len(target)


def clipped_weights(ratio: np.ndarray, clip: float) -> np.ndarray:
    """min(clip, s * ratio), with the scale s that makes the mean 1: the largest ratios are clipped, the rest scaled.

    (Clipping after normalising would break the mean; normalising after clipping, the clip.)"""
    r = np.sort(ratio)[::-1]
    n = len(r)
    for k in range(n):  # k: how many of the largest ratios end up clipped
        s = (n - k * clip) / r[k:].sum()
        if s * r[k] <= clip:
            break
    return np.minimum(s * ratio, clip)


class Reweight(Hook):
    batch_keys = ("weight",)  # a training-batch column for the loss, not for the model
    name = "reweight"

    def __init__(self, weights: np.ndarray, task):
        self.weights, self.task = weights, task
        # Kish's effective sample size: how many equally weighted rows the weighted loss is worth.
        self.report = {"rows": len(weights), "effective_sample_size": round(float(weights.sum() ** 2 / (weights ** 2).sum()), 1),
                       "min": round(float(weights.min()), 4), "max": round(float(weights.max()), 4)}

    def loss(self, model, batch, outputs, loss, progress):
        per_row = self.task.loss(outputs.logits, batch["labels"], reduction="none")
        # The task's loss is the unweighted mean: swap it for the weighted one, keeping what earlier hooks added.
        return loss - per_row.mean() + (batch["weight"] * per_row).mean()


def build(model: nn.Module, ctx: Context):
    cfg = ctx.cfg
    if not cfg.adapt.reweight:
        return None
    if ctx.target is None:
        raise ConfigError("adapt.reweight=true weighs training rows by how much they look like unlabelled target rows: set "
                          "data.target to a file or folder of them (the input column is enough), or adapt.reweight=false.")
    if cfg.adapt.reweight_clip < 1:
        raise ConfigError(f"adapt.reweight_clip={cfg.adapt.reweight_clip}; the weights have mean 1, so the largest must be "
                          "at least 1 (e.g. 10).")
    accelerator = ctx.accelerator
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the transformers model inside
    base.to(accelerator.device)
    source, target = (pooled_features(base, ctx.head, ds, ctx.collator, cfg.train.eval_batch_size, accelerator)
                      for ds in (ctx.encoded["train"], ctx.target))
    w = clipped_weights(density_ratio(source, target, cfg.train.seed), cfg.adapt.reweight_clip)
    ctx.encoded["train"] = ctx.encoded["train"].add_column("weight", w.tolist())
    hook = Reweight(w, ctx.task)
    accelerator.print(f"reweight: weights min {w.min():.3f} mean {w.mean():.3f} max {w.max():.3f}; effective sample size "
                      f"{hook.report['effective_sample_size']:.1f} of {len(w)} training rows")
    return hook


register_option("reweight", build)
