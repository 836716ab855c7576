"""lora: low-rank adapters through peft; the task head trains in full and is saved with them."""
from __future__ import annotations

from peft import LoraConfig, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from . import register_mode


def default_targets(model: nn.Module, head: list[str]) -> list[str]:
    """peft's per-architecture choice (BERT: query, value), else every Linear outside the head."""
    known = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(getattr(model.config, "model_type", None))
    if known:
        return list(known)
    return [
        n for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(n == h or n.startswith(h + ".") for h in head)
    ]


def apply(model, cfg, head):
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules or default_targets(model, head),
        # peft adds only 'classifier'/'score' on its own; wav2vec2's 'projector' is new too.
        modules_to_save=head,
    )
    return get_peft_model(model, config)


def export(model):
    # Merged weights make an ordinary transformers folder that pipeline() loads without peft.
    return model.merge_and_unload()


register_mode("lora", apply, export=export, help="peft LoRA adapters + full head; saved merged (adapt.save_adapter=true keeps the adapter too).")
