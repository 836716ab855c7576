"""Labelled data sets that installed packages ship, so the default run needs no download."""
from __future__ import annotations

from pathlib import Path

import datasets

from ..config import ConfigError, DataConfig
from ..extras import require


def vader_lexicon(cfg: DataConfig) -> dict[str, datasets.Dataset]:
    """Human-rated word sentiment from the MIT-licensed vaderSentiment package.

    Each of the 7,517 lexicon entries (words, slang, emoticons) carries the mean of ten raters'
    scores in [-4, 4]. Entries at least ``min_abs_rating`` from zero become 'positive' or
    'negative'; the ambiguous middle is left out.
    """
    vaderSentiment = require("vaderSentiment", "demo", "data.builtin=vader_lexicon")
    path = Path(vaderSentiment.__file__).with_name("vader_lexicon.txt")
    # QUOTE_NONE: entries such as '"' or "'" are tokens, not quotes.
    ds = datasets.load_dataset(
        "csv", data_files=str(path), split="train", delimiter="\t", quoting=3,
        column_names=["text", "mean_rating", "std", "ratings"], keep_default_na=False,
    )
    ds = ds.filter(lambda r: abs(r["mean_rating"]) >= cfg.min_abs_rating)
    ds = ds.map(lambda r: {"label": "positive" if r["mean_rating"] > 0 else "negative"})
    return {"train": ds.select_columns(["text", "label", "mean_rating"])}


def sklearn_digits(cfg: DataConfig) -> dict[str, datasets.Dataset]:
    """Handwritten digits bundled with scikit-learn (`load_digits`: the UCI optdigits test set, 13 writers).

    1,797 scans downsampled to 8x8 pixels with 17 grey levels, as grayscale images (ink bright,
    levels 0-16 scaled to 0-255) in an `image` column, with `label` 0-9.
    """
    import numpy as np
    import PIL.Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [PIL.Image.fromarray(np.round(x * 255 / 16).astype(np.uint8)) for x in digits.images]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return {"train": datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)}


BUILTIN = {"vader_lexicon": vader_lexicon, "sklearn_digits": sklearn_digits}


def load_builtin(cfg: DataConfig) -> dict[str, datasets.Dataset]:
    if cfg.builtin not in BUILTIN:
        raise ConfigError(f"data.builtin='{cfg.builtin}' is unknown; choose one of {', '.join(BUILTIN)}.")
    return BUILTIN[cfg.builtin](cfg)
