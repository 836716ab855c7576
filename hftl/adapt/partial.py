"""partial: train the top adapt.top_layers encoder layers, what sits above them (final norm, pooler) and the head."""
from ..config import ConfigError
from . import register_mode, set_trainable
from .layers import depths


def apply(model, cfg, head):
    depth, n_layers = depths(model)
    if not 1 <= cfg.top_layers <= n_layers:
        raise ConfigError(f"adapt.top_layers={cfg.top_layers}: {type(model).__name__} has {n_layers} encoder layers; "
                          f"choose 1 to {n_layers} (all {n_layers}: use adapt.mode=full; none: adapt.mode=head).")
    set_trainable(model, head)
    for p, d in depth.items():
        if d > n_layers - cfg.top_layers:
            p.requires_grad_(True)
    return model


register_mode("partial", apply)
