"""ia3, adalora, loha, lokr: peft's other adapter methods, set up as lora is (lora.py).

Each wraps peft's per-architecture default target modules (else every Linear outside the head; or
adapt.target_modules), trains its adapter plus the whole task head (modules_to_save), and is saved
merged into a plain transformers model; adapt.save_adapter=true also writes the unmerged adapter.
"""
from __future__ import annotations

from ..config import ConfigError
from . import Hook
from .lora import register_peft_mode, targets, wrap


def rank(cfg) -> int:
    if cfg.peft_r < 1:
        raise ConfigError(f"adapt.peft_r={cfg.peft_r}; the adapter rank must be at least 1 (default 8).")
    return cfg.peft_r


# peft is imported inside each method (lora.py says why).


def ia3(model, cfg, head):
    from peft import IA3Config
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING, TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING

    names = targets(model, cfg, head, TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)
    # IA3 scales a feed-forward layer's input and any other layer's output; peft knows which are feed-forward
    # per architecture (and requires them among the targets). Elsewhere every target scales its output.
    feedforward = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(getattr(model.config, "model_type", None), [])
    config = IA3Config(target_modules=names, feedforward_modules=[m for m in feedforward if m in names], modules_to_save=head)
    return wrap(model, config, cfg)


def adalora(model, cfg, head):
    from peft import AdaLoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING

    config = AdaLoraConfig(
        target_r=rank(cfg),
        init_r=(3 * rank(cfg) + 1) // 2,  # the paper starts each matrix at 1.5x the target average rank
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        total_step=1,  # a placeholder: RankBudget.setup sets the run's real count once fit knows it
        target_modules=targets(model, cfg, head, TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING),
        modules_to_save=head,
    )
    return wrap(model, config, cfg)


class RankBudget(Hook):
    """AdaLoRA's rank reallocation, as peft asks: update_and_allocate after each optimizer step, gradients still there."""

    def __init__(self, model):
        self.config = model.active_peft_config  # the object peft's RankAllocator reads its schedule from

    def setup(self, accelerator, total_steps, steps_per_epoch):
        # The split peft's AdaLoraConfig docstring illustrates: full rank for the first 10% of the steps, pruning to the
        # target budget until the last 20%, which train the final ranks.
        self.config.total_step, self.config.tinit, self.config.tfinal = total_steps, total_steps // 10, total_steps // 5

    def after_optimizer_step(self, model, step):
        c = self.config
        if c.rank_pattern is None and step > c.total_step - c.tfinal:
            # Resumed inside the final phase: peft keeps the final rank pattern outside the checkpoint, but the
            # checkpoint's lora_E holds it, as the zeros peft's last masking left.
            c.rank_pattern = {n: (p != 0).view(-1).tolist() for n, p in model.base_model.model.named_parameters() if "lora_E" in n}
        model.base_model.update_and_allocate(step)


def loha(model, cfg, head):
    from peft import LoHaConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING

    config = LoHaConfig(r=rank(cfg), target_modules=targets(model, cfg, head, TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING),
                        modules_to_save=head)
    return wrap(model, config, cfg)


def lokr(model, cfg, head):
    from peft import LoKrConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING

    config = LoKrConfig(r=rank(cfg), target_modules=targets(model, cfg, head, TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING),
                        modules_to_save=head)
    return wrap(model, config, cfg)


register_peft_mode("ia3", ia3)
register_peft_mode("adalora", adalora, hooks=lambda model, ctx: [RankBudget(model)])
register_peft_mode("loha", loha)
register_peft_mode("lokr", lokr)
