"""Text: any AutoModelForSequenceClassification checkpoint; its tokenizer; sentence pairs (data.text_pair_column).

    hftl train recipes/configs/text/minilm_vader_full.yaml [key=value ...]
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from ..config import Config, ConfigError
from ..data import text
from . import Modality


def load_tokenizer(path: str, cfg: Config):
    kwargs = {"revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code}
    # A row truncated to more tokens than the model has positions fails at the first batch with a tensor-size error.
    limit = getattr(AutoConfig.from_pretrained(path, **kwargs), "max_position_embeddings", None)
    if limit is not None and cfg.data.max_length > limit:
        raise ConfigError(f"data.max_length={cfg.data.max_length}, but model '{cfg.model.name_or_path}' has "
                          f"{limit} positions (max_position_embeddings in its config.json): a longer row cannot go through "
                          f"it. Set data.max_length={limit} or less.")
    return AutoTokenizer.from_pretrained(path, **kwargs)


MODALITY = TEXT = Modality(
    pipeline_tag="text-classification",
    auto_class=AutoModelForSequenceClassification,
    load_processor=load_tokenizer,
    prepare=lambda splits, tokenizer, cfg: text.prepare(splits, tokenizer, cfg.data),
    pipeline_inputs=lambda rows, cfg: text.inputs_for_pipeline(rows, cfg.data),
)
