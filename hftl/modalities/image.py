"""Images: any AutoModelForImageClassification checkpoint (ViT, DeiT, ConvNeXT, ...); decoding and augmentation are
in hftl/data/image.py.

    hftl train recipes/configs/image/vit_digits_head.yaml [key=value ...]
"""
from __future__ import annotations

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from ..config import Config, ConfigError
from ..data import image
from . import Modality


def load_image_processor(path: str, cfg: Config):
    kwargs = {"revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code}
    channels = getattr(AutoConfig.from_pretrained(path, **kwargs), "num_channels", 3)
    if channels != 3:  # pipeline("image-classification") converts every image to RGB before the processor
        raise ConfigError(f"model.name_or_path '{path}' expects {channels}-channel images; hftl feeds RGB, as "
                          "pipeline('image-classification') does, so the saved model could not be served. Use a 3-channel checkpoint.")
    return AutoImageProcessor.from_pretrained(path, **kwargs)


MODALITY = IMAGE = Modality(
    pipeline_tag="image-classification",
    auto_class=AutoModelForImageClassification,
    load_processor=load_image_processor,
    prepare=lambda splits, processor, cfg: image.prepare(splits, processor, cfg.data),
    pipeline_inputs=lambda rows, cfg: image.inputs_for_pipeline(rows, cfg.data),
    input_keys=("image_column",),
    check=lambda splits, cfg: image.check(splits, cfg.data),
)
