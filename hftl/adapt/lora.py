"""lora: low-rank adapters through peft; the task head trains in full and is saved with them.

The helpers here serve every peft mode (the others are in adapters.py: ia3, adalora, loha, lokr).
"""
from __future__ import annotations

from torch import nn

from ..config import ConfigError
from . import register_mode

# peft is imported inside the functions that use it: it costs 1.7 s, which head mode and every run without an
# adapter would pay at import for nothing.


def default_targets(model: nn.Module, head: list[str], known=None) -> list[str]:
    """peft's per-architecture choice (`known`, one of its TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING; lora's when
    None; BERT: query, value), else every Linear outside the head."""
    if known is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known
    model_type = getattr(model.config, "model_type", None)
    if known.get(model_type):
        return list(known[model_type])
    linears = [
        n for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(n == h or n.startswith(h + ".") for h in head)
    ]
    if not linears:
        raise ConfigError(f"peft has no default target modules for model type {model_type!r}, and {type(model).__name__} has "
                          f"no nn.Linear layer outside its head {head} to adapt; name the modules with adapt.target_modules=[...].")
    return linears


def targets(model: nn.Module, cfg, head: list[str], known=None) -> list[str]:
    return cfg.target_modules or default_targets(model, head, known)


def wrap(model: nn.Module, config, cfg) -> nn.Module:
    """get_peft_model; a target module the model lacks is the user's adapt.target_modules to fix."""
    from peft import NoMatchingPeftModuleError, get_peft_model

    try:
        return get_peft_model(model, config)
    except NoMatchingPeftModuleError as e:
        if cfg.target_modules:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(f"adapt.target_modules={cfg.target_modules}: {e} Linear layers of this model are named {names}; "
                              "or leave adapt.target_modules unset for peft's default.") from None
        raise


def export(model):
    # Merged weights make an ordinary transformers folder that pipeline() loads without peft.
    return model.merge_and_unload()


def register_peft_mode(name: str, apply, hooks=None) -> None:
    register_mode(name, apply, export=export, hooks=hooks, peft=True)


def apply(model, cfg, head):
    from peft import LoraConfig

    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets(model, cfg, head),
        # peft adds only 'classifier'/'score' on its own; wav2vec2's 'projector' is new too.
        modules_to_save=head,
    )
    return wrap(model, config, cfg)


register_peft_mode("lora", apply)
