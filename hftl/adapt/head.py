"""head: feature extraction. The pretrained backbone is frozen; only the task head trains."""
from . import register_mode, set_trainable


def apply(model, cfg, head):
    set_trainable(model, head)
    return model


register_mode("head", apply, frozen_backbone=True,
              help="Frozen backbone (feature extraction): the head is solved on its features (adapt.solve_head), read as the "
                   "checkpoint was trained to give them (adapt.pooling); cheapest.")
