"""Recipe: text classification (any AutoModelForSequenceClassification checkpoint).

    hftl train recipes/configs/text/minilm_vader_full.yaml [key=value ...]
    accelerate launch -m hftl train recipes/configs/text/minilm_sst2_lora.yaml

What is text-specific lives here; the path every recipe shares is hftl/run.py.
"""
from __future__ import annotations

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hftl.config import Config
from hftl.data import text
from hftl.run import Modality, run


def load_tokenizer(path: str, cfg: Config):
    return AutoTokenizer.from_pretrained(path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)


TEXT = Modality(
    pipeline_tag="text-classification",
    auto_class=AutoModelForSequenceClassification,
    load_processor=load_tokenizer,
    prepare=lambda splits, tokenizer, cfg: text.prepare(splits, tokenizer, cfg.data),
    pipeline_inputs=lambda rows, cfg: text.inputs_for_pipeline(rows, cfg.data),
)


def main(cfg: Config) -> dict:
    return run(cfg, TEXT)
