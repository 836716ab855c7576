"""head: feature extraction. The pretrained backbone is frozen; only the task head trains."""
from . import register_mode, set_trainable


def apply(model, cfg, head):
    set_trainable(model, head)
    return model


register_mode("head", apply, frozen_backbone=True)
