"""gradual: ULMFiT gradual unfreezing (Howard & Ruder 2018). The head (and what sits above the encoder stack)
trains from the start; every adapt.unfreeze_every epochs the next adapt.top_layers layers below unfreeze, from
the top down, the embeddings last. With train.scheduler=slanted_triangular and adapt.layer_lr_decay=1/2.6
this is ULMFiT's recipe."""
from __future__ import annotations

import math

from ..config import ConfigError
from . import Hook, register_mode
from .layers import depths, layerwise_groups


def apply(model, cfg, head):
    # Everything may train; before each optimizer step the hook freezes what the current stage leaves out.
    model.requires_grad_(True)
    return model


def unfreeze_stage(depth: int, n_layers: int, per_stage: int) -> int:
    """The stage from which a parameter at `depth` trains: 0 above the stack, one more per `per_stage` layers down,
    the embeddings (depth 0) one stage after the lowest layer."""
    if depth > n_layers:
        return 0
    if depth == 0:
        return math.ceil(n_layers / per_stage) + 1
    return math.ceil((n_layers + 1 - depth) / per_stage)


class GradualUnfreezing(Hook):
    def __init__(self, model, ctx):
        a = ctx.cfg.adapt
        if a.top_layers < 1:
            raise ConfigError(f"adapt.top_layers={a.top_layers}: gradual unfreezes this many layers per stage; use 1 or more.")
        if a.unfreeze_every <= 0:
            raise ConfigError(f"adapt.unfreeze_every={a.unfreeze_every}: epochs between stages must be > 0 (e.g. 1).")
        self.cfg = ctx.cfg
        depth, self.n_layers = depths(model)
        # Only what may train at all: adapt.freeze_feature_encoder has frozen a speech model's waveform encoder by now.
        self.depth = {p: d for p, d in depth.items() if p.requires_grad}
        self.stage = {p: unfreeze_stage(d, self.n_layers, a.top_layers) for p, d in self.depth.items()}
        self.current = None

    def param_groups(self, model):
        # Every parameter that will ever train, so the optimizer and scheduler hold it from the start (AdamW skips
        # it while it is frozen and has no gradient).
        return layerwise_groups(model, self.cfg, [(n, p) for n, p in model.named_parameters() if p in self.stage])

    def setup(self, accelerator, total_steps, steps_per_epoch):
        self.print = accelerator.print
        # fit's count, from the data: train.max_steps does not stretch an epoch.
        self.steps_per_epoch = steps_per_epoch
        # Whole steps per stage: a float boundary (0.3 / 0.1 = 2.999...) would land a step early or late.
        self.steps_per_stage = max(1, round(self.steps_per_epoch * self.cfg.adapt.unfreeze_every))

    def on_step(self, model, step, epoch):
        # From the step, not a counter: a resumed run lands in the same stage.
        stage = step // self.steps_per_stage
        if stage == self.current:
            return
        self.current = stage
        for p, s in self.stage.items():
            p.requires_grad_(s <= stage)
        lowest = min(d for p, d in self.depth.items() if p.requires_grad)
        what = ("the head and what sits above the encoder layers" if lowest > self.n_layers
                else f"encoder layers {lowest}-{self.n_layers} of {self.n_layers} and above" if lowest > 0 else "everything")
        self.print(f"gradual unfreezing: step {step} (epoch {step / self.steps_per_epoch:.2f}), stage {stage}: training {what}")


register_mode("gradual", apply, hooks=lambda model, ctx: [GradualUnfreezing(model, ctx)])
