"""Recipe: text classification (any AutoModelForSequenceClassification checkpoint).

    hftl train recipes/configs/text/minilm_vader_full.yaml [key=value ...]
    accelerate launch -m hftl train recipes/configs/text/minilm_sst2_lora.yaml

What is text-specific lives here; the path every recipe shares is hftl/run.py.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from hftl.config import Config, ConfigError
from hftl.data import text
from hftl.run import Modality, run


def load_tokenizer(path: str, cfg: Config):
    kwargs = {"revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code}
    # A row truncated to more tokens than the model has positions fails at the first batch with a tensor-size error.
    limit = getattr(AutoConfig.from_pretrained(path, **kwargs), "max_position_embeddings", None)
    if limit is not None and cfg.data.max_length > limit:
        raise ConfigError(f"data.max_length={cfg.data.max_length}, but model '{cfg.model.name_or_path}' has "
                          f"{limit} positions (max_position_embeddings in its config.json): a longer row cannot go through "
                          f"it. Set data.max_length={limit} or less.")
    return AutoTokenizer.from_pretrained(path, **kwargs)


TEXT = Modality(
    pipeline_tag="text-classification",
    auto_class=AutoModelForSequenceClassification,
    load_processor=load_tokenizer,
    prepare=lambda splits, tokenizer, cfg: text.prepare(splits, tokenizer, cfg.data),
    pipeline_inputs=lambda rows, cfg: text.inputs_for_pipeline(rows, cfg.data),
)


def main(cfg: Config) -> dict:
    return run(cfg, TEXT)
