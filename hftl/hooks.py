"""The interface through which adaptation modes and options (hftl/adapt) act on the training loop (hftl/train.py).

A hook subclasses `Hook` and overrides what it needs; the loop calls every method of every hook, in the order
`hftl.adapt.build_hooks` gives (the mode's hooks first, then the options in `hftl.adapt.OPTION_ORDER`).
"""
from __future__ import annotations


class Hook:
    # Batch columns the hook reads (e.g. reweighting's 'weight') that the model must not receive.
    batch_keys: tuple[str, ...] = ()
    # What the hook measured, for results.json ("options", by `name`) and the card's transfer options line.
    name: str = ""
    report: dict | None = None

    def param_groups(self, model) -> list[dict] | None:
        """The optimizer's parameter groups, or None; the first hook that returns some wins (gradual unfreezing's
        groups already carry the layer-wise rates)."""
        return None

    def setup(self, accelerator, total_steps: int, steps_per_epoch: int) -> None:
        """After accelerator.prepare, once the run's step counts are known (e.g. prepare a dataloader of its own)."""

    def on_step(self, model, step: int, epoch: int) -> None:
        """Before each optimizer step's batches (e.g. unfreeze layers); `model` is unwrapped."""

    def loss(self, model, batch: dict, outputs, loss, progress: float):
        """The loss to back-propagate, given the task's loss (or the previous hook's); progress runs from 0 to 1."""
        return loss

    def after_optimizer_step(self, model, step: int) -> None:
        """After optimizer.step(), gradients still there (AdaLoRA's rank budget); `model` is unwrapped."""
