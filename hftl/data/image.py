"""Image modality: decode as pipeline("image-classification") does, augment for training, the checkpoint's image processor.

Every image goes through `transformers.image_utils.load_image` (EXIF rotation, then RGB: grayscale,
palette and RGBA images become the three channels the pipeline hands the model; 16-bit grayscale is first
scaled to 8 bits, see `read`) and then the
checkpoint's image processor (resize, rescale, normalise), on the fly (`with_transform`). Training can
first take a random resized crop and a horizontal flip (torchvision, data.augment); evaluation is
deterministic and computes exactly what the pipeline computes.
"""
from __future__ import annotations

import functools
import io

import numpy as np
import PIL.Image
import PIL.ImageOps
from datasets import DatasetDict, Image
from transformers import default_data_collator
from transformers.image_utils import load_image

from ..config import ConfigError, DataConfig
from ..extras import require
from . import DataError, media

# The vision extra (pip install 'hftl[vision]'), checked against torch before it loads.
v2 = require("torchvision.transforms.v2", "vision", "image data")

AUGMENTS = ("crop", "flip")


# PIL modes of 16-bit grayscale images (PNG, TIFF), whose values run to 65535.
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def read(image: PIL.Image.Image) -> PIL.Image.Image:
    """An opened image as the model sees it: `load_image` (EXIF rotation, then RGB), after scaling 16-bit grayscale to 8 bits.

    PIL's convert("RGB") clips a 16-bit value to 255, so such an image would arrive almost white. pipeline() does not
    scale either: pass it images read with this function (README, Images)."""
    image = PIL.ImageOps.exif_transpose(image)  # first: the scaled copy below has no EXIF left
    if image.mode in SIXTEEN_BIT:
        # Mode I is 32-bit; read from a 16-bit file it holds 0..65535 (the range 65535 / 255 = 257 maps onto 0..255).
        pixels = np.asarray(image, dtype=np.float64) / 257
        image = PIL.Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))  # mode L
    return load_image(image)


def decode(value: dict) -> PIL.Image.Image:
    """A row's image, fully read (a truncated file fails here), as training, evaluation and the reload check see it."""
    return read(PIL.Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]))


def check(splits: DatasetDict, cfg: DataConfig) -> tuple[DatasetDict, dict[str, list[str]]]:
    """Decode every image once before training: an empty, truncated or non-image file stops the run or is left out."""
    return media.check(media.as_files(splits, cfg.image_column, Image), cfg.image_column, decode, cfg.on_bad_sample, "image")


def augmenter(cfg: DataConfig):
    unknown = sorted(set(cfg.augment) - set(AUGMENTS))
    if unknown:
        raise ConfigError(f"data.augment has {unknown}, which images do not know; choose from {', '.join(AUGMENTS)}.")
    if not 0 < cfg.crop_scale <= 1:
        raise ConfigError(f"data.crop_scale={cfg.crop_scale}; give the smallest share of the image a crop keeps, in (0, 1].")

    def augment(image: PIL.Image.Image) -> PIL.Image.Image:
        if "crop" in cfg.augment:  # crop, then back to the image's own size: the processor resizes as at evaluation
            image = v2.RandomResizedCrop((image.height, image.width), scale=(cfg.crop_scale, 1.0))(image)
        if "flip" in cfg.augment:
            image = v2.RandomHorizontalFlip()(image)
        return image

    return augment


def _transform(batch: dict, column: str, processor, augment) -> dict:
    images = []
    for value in batch[column]:
        try:
            image = decode(value)
        except Exception as e:  # checked before training, so the file changed since
            raise DataError(f"cannot read image file '{media.name_of(value)}' ({media.reason(e)}); it could be read "
                            "before training started: was it changed or removed?") from e
        images.append(augment(image) if augment else image)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    # adapt.reweight adds a per-row loss weight to the training rows; it passes through to the collator.
    return {"pixel_values": list(pixels), "labels": batch["labels"], **({"weight": batch["weight"]} if "weight" in batch else {})}


def prepare(splits: DatasetDict, processor, cfg: DataConfig):
    """Splits that decode, augment (training) and run the image processor on the fly, and their collator."""
    augment = augmenter(cfg) if cfg.augment else None
    splits = media.as_files(splits, cfg.image_column, Image)
    encoded = DatasetDict({
        split: ds.with_transform(functools.partial(_transform, column=cfg.image_column, processor=processor,
                                                   augment=augment if split == "train" else None))
        for split, ds in splits.items()
    })
    return encoded, default_data_collator


def inputs_for_pipeline(rows, cfg: DataConfig) -> list:
    """The images as evaluation decodes them; pipeline("image-classification") takes PIL images."""
    return [decode(v) for v in media.as_file_column(rows, cfg.image_column, Image)[cfg.image_column]]
