"""lpft: linear probe, then fine-tune (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution").

Fine-tuning everything from a randomly initialised head sends large, arbitrary gradients from the head
into the backbone and distorts its pretrained features before the head is any good. Stage 1 trains
the head alone on the frozen backbone (on cached features where possible, hftl/cache.py) for
adapt.lp_epochs at adapt.lp_learning_rate; stage 2 fine-tunes every parameter from that head with the
run's train.* settings and the options' hooks (layer_lr_decay, l2sp, ...).
"""
from __future__ import annotations

from dataclasses import replace

from .. import cache, checkpoint, train
from ..config import ConfigError
from . import freeze_feature_encoder, register_mode, set_trainable


def apply(model, cfg, head):
    if cfg.lp_epochs <= 0:
        raise ConfigError(f"adapt.lp_epochs={cfg.lp_epochs}; lpft's linear probe needs some epochs (default 5). "
                          "adapt.mode=full fine-tunes without one.")
    model.requires_grad_(True)  # every option hook is built seeing the backbone; fit freezes it for stage 1
    return model


def fit(model, ctx, hooks) -> dict:
    cfg, accelerator = ctx.cfg, ctx.accelerator
    set_trainable(model, ctx.head)
    probe_run = None
    if cfg.train.report_to:  # two fits, two tracker runs (each counts its own steps): NAME-linear-probe, then NAME
        cfg = replace(cfg, train=replace(cfg.train, run_name=train.run_name(cfg)))
        probe_run = f"{cfg.train.run_name}-linear-probe"
    probe_cfg = replace(
        cfg,
        train=replace(
            cfg.train, epochs=cfg.adapt.lp_epochs, max_steps=None, learning_rate=cfg.adapt.lp_learning_rate, run_name=probe_run,
            # Stage 1 checkpoints apart from stage 2's, so a resume never loads one stage's state into the other.
            # train.resume names stage 2's checkpoint; stage 1 continues from its own newest, if any.
            checkpoint_dir=str(checkpoint.root(cfg) / "linear-probe"), resume="auto" if cfg.train.resume else None,
        ),
        hub=replace(cfg.hub, strategy="end"),  # stage-1 checkpoints stay local: on the Hub their step-N names would pass for stage 2
    )
    accelerator.print(f"lpft stage 1: linear probe of {ctx.head} for {probe_cfg.train.epochs} epochs at lr {probe_cfg.train.learning_rate}")
    probe = cache.fit_on_features(model, ctx.head, ctx.encoded, ctx.collator, probe_cfg, accelerator, ctx.task) \
        or train.fit(model, ctx.encoded, ctx.collator, probe_cfg, accelerator, task=ctx.task)
    # Forget stage 1's prepared model and optimizer: stage 2's checkpoints then hold only its own state.
    accelerator.free_memory()

    model = probe["model"]  # the stage-1 head at its best evaluation
    model.requires_grad_(True)
    if cfg.adapt.freeze_feature_encoder:
        freeze_feature_encoder(model)
    accelerator.print("lpft stage 2: fine-tuning every parameter from the probed head")
    tuned = train.fit(model, ctx.encoded, ctx.collator, cfg, accelerator, hooks, task=ctx.task)

    # One run's record: stage-2 steps count on from stage 1's, each entry says its stage.
    offset = probe["steps"]

    def tag(entries, stage, offset):
        return [{"stage": stage, **e, "step": e["step"] + offset} for e in entries]

    return {
        **tuned,
        "history": tag(probe["history"], "linear_probe", 0) + tag(tuned["history"], "fine_tune", offset),
        "step_log": tag(probe["step_log"], "linear_probe", 0) + tag(tuned["step_log"], "fine_tune", offset),
        "best_step": offset + tuned["best_step"],
        "steps": offset + tuned["steps"],
        "train_seconds": probe["train_seconds"] + tuned["train_seconds"],
        "feature_cache": probe.get("feature_cache"),
    }


register_mode("lpft", apply, fit=fit, frozen_features=True)
