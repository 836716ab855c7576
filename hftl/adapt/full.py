"""full: fine-tune every parameter."""
from . import register_mode


def apply(model, cfg, head):
    model.requires_grad_(True)
    return model


register_mode("full", apply)
