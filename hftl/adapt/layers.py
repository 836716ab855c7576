"""The encoder's layer stack, each parameter's depth in it, and layer-wise learning-rate decay.

Depth orders the parameters from the input up: 0 for what runs below the stack (embeddings, the
speech models' waveform feature encoder), i + 1 for layer i of L, L + 1 for what runs above it
(final norm, pooler, task head). partial and gradual freeze by depth; adapt.layer_lr_decay gives
depth d the rate train.learning_rate * decay ** (L + 1 - d) (ULMFiT's discriminative fine-tuning,
BEiT/ELECTRA's layer decay): the head learns fastest, the embeddings, most general, slowest.

Everything works by module and parameter identity, so it holds for a model peft has wrapped.
"""
from __future__ import annotations

from collections import defaultdict

from torch import nn

from ..config import ConfigError
from ..train import param_groups
from . import Hook, register_option

# What transformers calls the stack (BERT-family 'bert.encoder.layer', ViT 'vit.layers', wav2vec2/HuBERT
# 'encoder.layers', DistilBERT 'transformer.layer', decoders 'model.layers'). Preferred over the size rule,
# which a tiny speech model's conv stack ('conv_layers') can win.
KNOWN_STACKS = ("layer", "layers")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model, also when peft wraps it (whose get_submodule takes the names head_modules gave)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, module) of the encoder's stack: an nn.ModuleList of blocks of one class, the largest such outside the head."""
    candidates = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1
        # peft's copies of the head ('modules_to_save') are not the backbone
        and "modules_to_save" not in name
    ]
    if not candidates:
        raise ConfigError(
            f"{type(base_model(model)).__name__} has no encoder layer stack hftl can find (an nn.ModuleList of identical "
            "blocks, like BERT's encoder.layer); adapt.mode=partial, adapt.mode=gradual and adapt.layer_lr_decay need one. "
            "Use adapt.mode=full, lora or head with adapt.layer_lr_decay=1.0."
        )
    return max(candidates, key=lambda c: (c[0].rpartition(".")[2] in KNOWN_STACKS, sum(p.numel() for p in c[1].parameters())))


def depths(model: nn.Module) -> tuple[dict[nn.Parameter, int], int]:
    """({parameter: depth}, L). Outside the stack, a parameter registered before it runs below it and one registered
    after runs above it: transformers builds its models in forward order."""
    name, stack = layer_stack(model)
    depth = {p: i + 1 for i, block in enumerate(stack) for p in block.parameters()}
    above = set()
    if getattr(base_model(model).config, "do_stable_layer_norm", False):
        # wav2vec2/HuBERT pre-norm encoders register their final norm before the stack, and apply it after.
        above = set(model.get_submodule(name.rpartition(".")[0]).layer_norm.parameters())
    seen_stack = False
    for p in model.parameters():
        if p in depth:
            seen_stack = True
        else:
            depth[p] = len(stack) + 1 if seen_stack or p in above else 0
    return depth, len(stack)


def head_parameters(model: nn.Module, head: list[str]) -> set[nn.Parameter]:
    base = base_model(model)
    return {p for name in head for p in base.get_submodule(name).parameters()}


def layerwise_groups(model: nn.Module, cfg, params: list[tuple[str, nn.Parameter]]) -> list[dict]:
    """AdamW groups for (name, parameter) pairs, each depth at its decayed rate (cfg: the run's Config)."""
    depth, n_layers = depths(model)
    by_depth = defaultdict(list)
    for name, p in params:
        by_depth[depth[p]].append((name, p))
    t, decay = cfg.train, cfg.adapt.layer_lr_decay
    # Top first: fit logs the first group's rate, which is then train.learning_rate's schedule.
    return [g for d in sorted(by_depth, reverse=True)
            for g in param_groups(by_depth[d], t.weight_decay, lr=t.learning_rate * decay ** (n_layers + 1 - d))]


def check_decay(decay: float) -> None:
    if not 0 < decay <= 1:
        raise ConfigError(f"adapt.layer_lr_decay={decay} must be in (0, 1]: each lower layer's rate is the one above's times "
                          "this factor (try 0.8; 1.0 turns it off).")


class LayerDecay(Hook):
    def __init__(self, cfg):
        self.cfg = cfg

    def param_groups(self, model):
        return layerwise_groups(model, self.cfg, [(n, p) for n, p in model.named_parameters() if p.requires_grad])


def build(model, ctx):
    decay = ctx.cfg.adapt.layer_lr_decay
    if decay == 1.0:
        return None
    check_decay(decay)
    head = head_parameters(model, ctx.head)
    if not any(p.requires_grad and p not in head for p in model.parameters()):
        raise ConfigError(f"adapt.layer_lr_decay={decay} does nothing with adapt.mode={ctx.cfg.adapt.mode}: only the head trains. "
                          "Use a mode that trains the backbone (full, partial, gradual, lora, ...) or adapt.layer_lr_decay=1.0.")
    depths(model)  # no layer stack: say so now, not when the optimizer is built
    return LayerDecay(ctx.cfg)


register_option("layer_lr_decay", build)
