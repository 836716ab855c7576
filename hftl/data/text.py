"""Text modality: tokenize once with a cached batched map; pad each batch only to its longest row."""
from __future__ import annotations

from datasets import DatasetDict
from transformers import DataCollatorWithPadding

from ..config import DataConfig


def prepare(splits: DatasetDict, tokenizer, cfg: DataConfig) -> tuple[DatasetDict, DataCollatorWithPadding]:
    def tokenize(batch):
        pair = batch[cfg.text_pair_column] if cfg.text_pair_column else None
        texts = [str(t) if t is not None else "" for t in batch[cfg.text_column]]
        if pair is not None:
            pair = [str(t) if t is not None else "" for t in pair]
        return tokenizer(texts, pair, truncation=True, max_length=cfg.max_length)

    keep = {"labels"}
    encoded = splits.map(
        tokenize,
        batched=True,
        remove_columns=[c for c in splits["train"].column_names if c not in keep],
        desc="Tokenizing",
    )
    return encoded, DataCollatorWithPadding(tokenizer)


def inputs_for_pipeline(ds, cfg: DataConfig) -> list:
    """Raw rows in the form `transformers.pipeline('text-classification')` takes."""
    if cfg.text_pair_column:
        return [{"text": a, "text_pair": b} for a, b in zip(ds[cfg.text_column], ds[cfg.text_pair_column])]
    return list(ds[cfg.text_column])
