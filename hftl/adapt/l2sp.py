"""L2-SP (Li, Grandvalet & Davoine 2018): pull the fine-tuned backbone towards its pretrained weights instead of
towards zero, adding adapt.l2sp * sum ||w - w0||^2 to the loss. The head is new, so it has no w0 and is left out."""
from __future__ import annotations

import torch

from ..config import ConfigError
from . import Hook, register_option
from .layers import head_parameters


class L2SP(Hook):
    def __init__(self, weight: float, params: list):
        self.weight = weight
        self.pairs = [(p, p.detach().clone()) for p in params]  # (parameter, its pretrained value)

    def setup(self, accelerator, total_steps, steps_per_epoch):
        self.pairs = [(p, w0.to(accelerator.device)) for p, w0 in self.pairs]

    def loss(self, model, batch, outputs, loss, progress):
        # Only what trains now (gradual unfreezing): a frozen weight is still w0.
        terms = [(p - w0).pow(2).sum() for p, w0 in self.pairs if p.requires_grad]
        return loss + self.weight * torch.stack(terms).sum() if terms else loss


def build(model, ctx):
    weight = ctx.cfg.adapt.l2sp
    if weight == 0:
        return None
    if weight < 0:
        raise ConfigError(f"adapt.l2sp={weight} must be >= 0 (0: off; try 0.01).")
    from peft import PeftModel  # here, not at import: only a run that asks for L2-SP pays peft's 1.7 s import

    head = head_parameters(model, ctx.head)
    # Pretrained weights that may train; peft's adapter weights (named with its prefix, e.g. 'lora_') are new, like the head.
    prefix = model.base_model.prefix if isinstance(model, PeftModel) else None
    params = [p for n, p in model.named_parameters()
              if p.requires_grad and p not in head and not (prefix and prefix in n)]
    if not params:
        raise ConfigError(f"adapt.l2sp={weight} does nothing with adapt.mode={ctx.cfg.adapt.mode}: no pretrained weight trains. "
                          "Use a mode that trains the backbone (full, partial, gradual) or adapt.l2sp=0.")
    return L2SP(weight, params)


register_option("l2sp", build)
