"""adapt.align: domain adaptation on unlabelled target rows (data.target): dann, coral or mmd.

Each training step also runs the model on a batch of target rows (labels never used) and adds
adapt.align_weight times a term that pulls the features of the two domains together. The features
are what the final classifier reads (the input of 'classifier' / 'score': BERT's and ViT's pooled
output, wav2vec2's projected mean), captured with a forward pre-hook.

- dann (Ganin et al. 2016): a small domain classifier learns to tell source (0) from target (1); a
  gradient-reversal layer in front of it makes the features learn the opposite, with a coefficient
  ramped 2/(1+exp(-10p))-1 over training progress p. The classifier is not part of the saved model.
- coral (Sun & Saenko 2016): ||C_s - C_t||_F^2 / (4 d^2) between the feature covariances.
- mmd: multi-kernel Gaussian MMD^2 (biased estimate; the mean of kernels at bandwidths around the median pairwise
  distance), its weight ramped from 0 to 1 as DANN's coefficient is.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ConfigError
from ..train import train_dataloader
from . import Context, Hook, get_mode, register_option

CLASSIFIER_NAMES = ("classifier", "score")  # the final layer transformers' classification heads call
MMD_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # kernel bandwidths, as multiples of the median squared distance


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -coef."""

    @staticmethod
    def forward(ctx, x, coef: float):
        ctx.coef = coef
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coef * grad, None


def dann_coefficient(progress: float) -> float:
    """Ganin et al. 2016: 0 at the start (the domain classifier's early noise stays out of the features), -> 1."""
    return 2 / (1 + math.exp(-10 * progress)) - 1


def _covariance(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(0)
    return centred.T @ centred / max(len(x) - 1, 1)  # a batch of one row (an epoch's last) has covariance 0


def coral(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    d = source.shape[1]
    return (_covariance(source) - _covariance(target)).pow(2).sum() / (4 * d * d)


def mmd(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = torch.cat([source, target])
    norms = x.pow(2).sum(1)
    # Squared distances from norms and dot products: no sqrt, whose gradient at distance 0 is NaN.
    d2 = (norms[:, None] + norms[None] - 2 * x @ x.T).clamp_min(0)
    off_diagonal = d2[~torch.eye(len(x), dtype=torch.bool, device=x.device)]
    median = off_diagonal.detach().median().clamp_min(1e-8) if len(off_diagonal) else d2.new_tensor(1.0)
    # The mean over bandwidths, not the sum: a sum makes the term len(MMD_SCALES) times larger than the task loss, and
    # on real data (UCI sentiment, FSDD) adapt.align_weight=1 then collapsed the features to one point (MMD 0, chance accuracy).
    k = sum(torch.exp(-d2 / (median * s)) for s in MMD_SCALES) / len(MMD_SCALES)
    n = len(source)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def classifier_module(model: nn.Module) -> nn.Module:
    """The final classification layer (outermost module so named; peft wraps it, and the wrapper is called)."""
    for wanted in CLASSIFIER_NAMES:
        found = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == wanted]
        if found:
            return found[0]  # named_modules lists outer modules first
    raise ConfigError(f"adapt.align needs the model's final classification layer (a module named one of {CLASSIFIER_NAMES}); "
                      f"{type(model).__name__} has none. Set adapt.align=null.")


class Align(Hook):
    def __init__(self, model: nn.Module, ctx: Context):
        self.ctx, self.name, self.weight = ctx, ctx.cfg.adapt.align, ctx.cfg.adapt.align_weight
        classifier = classifier_module(model)
        self.features = None
        classifier.register_forward_pre_hook(self._capture)
        self.discriminator = None
        if self.name == "dann":
            dim = next(m for m in classifier.modules() if isinstance(m, nn.Linear)).in_features
            self.discriminator = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))
            # Its own optimizer (train.learning_rate, no schedule), stepped with the model's: the discriminator trains
            # alongside the model but is no part of it, so the saved folder stays a plain transformers model.
            self.optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=ctx.cfg.train.learning_rate)
        self.history: list[float] = []  # the alignment term per batch

    def _capture(self, module, args):
        x = args[0]
        self.features = x[:, 0] if x.ndim == 3 else x  # a head that reads every token (RoBERTa): its first one

    def setup(self, accelerator, total_steps, steps_per_epoch):
        self.accelerator = accelerator
        # The training loader's recipe (shuffled, seeded, length-grouped), drawn from endlessly.
        loader = accelerator.prepare(train_dataloader(self.ctx.target, self.ctx.collator, self.ctx.cfg.train))
        if self.discriminator is not None:
            # On the device, its gradients averaged across processes, its weights in training checkpoints.
            self.discriminator = accelerator.prepare(self.discriminator)

        def cycle():
            epoch = 0
            while True:
                loader.set_epoch(epoch)
                yield from loader
                epoch += 1

        self.batches = cycle()

    def loss(self, model, batch, outputs, loss, progress):
        source = self.features.float()
        target_batch = {k: v for k, v in next(self.batches).items() if k not in ("labels", "num_windows")}
        model(**target_batch)
        target = self.features.float()
        if self.name == "dann":
            both = GradientReversal.apply(torch.cat([source, target]), dann_coefficient(progress))
            domain = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).to(both.device)
            term = F.binary_cross_entropy_with_logits(self.discriminator(both).squeeze(-1), domain)
        elif self.name == "mmd":
            # Ramped like DANN's reversal (as in Long et al.'s DAN follow-ups): early features are the pretrained ones,
            # which the task loss has not yet shaped; a full-strength MMD pull then drags them together before they separate classes.
            term = dann_coefficient(progress) * mmd(source, target)
        else:
            term = coral(source, target)
        self.history.append(term.item())
        if self.ctx.cfg.train.report_to:
            self.accelerator.log({f"train/align_{self.name}": self.history[-1]})
        return loss + self.weight * term

    def after_optimizer_step(self, model, step):
        if self.discriminator is None:
            return
        # Under fp16 the gradients carry the loss scale, to which AdamW's step is (up to eps) blind; an overflow is
        # skipped, as the model's optimizer skips it.
        if all(torch.isfinite(p.grad).all() for p in self.discriminator.parameters() if p.grad is not None):
            self.optimizer.step()
        self.optimizer.zero_grad()


ALIGNERS = ("dann", "coral", "mmd")


def build(model: nn.Module, ctx: Context):
    name = ctx.cfg.adapt.align
    if name is None:
        return None
    if name not in ALIGNERS:
        raise ConfigError(f"adapt.align='{name}' is unknown; choose one of {', '.join(ALIGNERS)}, or null for none.")
    if ctx.target is None:
        raise ConfigError(f"adapt.align={name} aligns the training rows with unlabelled target rows: set data.target to a "
                          "file or folder of them (the input column is enough), or adapt.align=null.")
    if get_mode(ctx.cfg.adapt.mode).frozen_backbone:
        raise ConfigError(f"adapt.align={name} moves the features the head reads, but adapt.mode={ctx.cfg.adapt.mode} trains "
                          "no backbone: choose a mode that does (full, lora, ...), or adapt.align=null.")
    return Align(model, ctx)


register_option("align", build)
