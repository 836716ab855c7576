"""Token classification (NER, tagging): any AutoModelForTokenClassification checkpoint with a fast tokenizer; rows of
words (data.tokens_column) and IOB2 tags (data.tags_column), labels on each word's first sub-token.

    hftl train task=token-classification data.train_file=train.jsonl data.validation_file=validation.jsonl
"""
from __future__ import annotations

from datasets import DatasetDict
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

from ..config import Config, ConfigError, DataConfig
from ..metrics import entities
from ..tasks.token_classification import CONTINUATION, IGNORE
from . import Modality
from .text import load_tokenizer


def load_word_tokenizer(path: str, cfg: Config):
    tokenizer = load_tokenizer(path, cfg)
    if not tokenizer.is_fast:  # word_ids(), which puts a word's tag on its pieces, is a fast tokenizer's
        raise ConfigError(f"model.name_or_path='{cfg.model.name_or_path}' has a slow (Python) tokenizer; token classification "
                          "needs a fast one (tokenizer.json) to map sub-tokens to words. Choose a checkpoint that has one.")
    # pipeline("token-classification") on the saved folder truncates where training did, so a long sentence's words
    # are read in the same context (and the reload check compares like with like).
    tokenizer.model_max_length = min(tokenizer.model_max_length, cfg.data.max_length)
    return tokenizer


def align(word_ids: list, tags: list[int], all_subtokens: bool, inside: list[int]) -> list[int]:
    """Sub-token labels for one row: a word's tag on its first piece; its other pieces IGNORE, or with `all_subtokens`
    coded CONTINUATION - tag, a B-X word's as I-X (`inside[tag]`); special tokens IGNORE."""
    labels, prev = [], None
    for w in word_ids:
        if w is None:
            labels.append(IGNORE)
        elif w != prev:
            labels.append(tags[w] if tags else 0)  # unlabelled rows (hftl predict): any id >= 0 marks the word's first piece
        else:
            labels.append(CONTINUATION - inside[tags[w]] if all_subtokens and tags else IGNORE)
        prev = w
    return labels


def cut(word_ids: list, tags: list[str]) -> tuple[int, int]:
    """(words, entities) that truncation cut from a row: words after the last one the model sees, and entities with
    at least one of those words."""
    if not tags:  # unlabelled rows (hftl predict): nothing to count
        return 0, 0
    seen = max((w for w in word_ids if w is not None), default=-1) + 1
    return len(tags) - seen, sum(1 for _, _, end in entities.entities([tags]) if end >= seen)


def prepare(splits: DatasetDict, tokenizer, cfg: Config):
    d: DataConfig = cfg.data
    names = splits["train"].features["labels"].feature.names
    # A B-X word's later pieces train as I-X (run_ner.py's b_to_i_label), when the tags have I-X.
    inside = [names.index(f"I-{n[2:]}") if n.startswith("B-") and f"I-{n[2:]}" in names else i for i, n in enumerate(names)]

    def tokenize(batch):
        encoded = tokenizer(batch[d.tokens_column], is_split_into_words=True, truncation=True, max_length=d.max_length)
        encoded["labels"] = [align(encoded.word_ids(i), tags, d.label_all_subtokens, inside) for i, tags in enumerate(batch["labels"])]
        lost = [cut(encoded.word_ids(i), [names[t] for t in tags]) for i, tags in enumerate(batch["labels"])]
        encoded["cut_words"], encoded["cut_entities"] = [w for w, _ in lost], [e for _, e in lost]
        return encoded

    encoded = splits.map(tokenize, batched=True, remove_columns=splits["train"].column_names, desc="Tokenizing words")
    for split, ds in encoded.items():
        words, ents = sum(ds["cut_words"]), sum(ds["cut_entities"])
        if words:  # truncation is reported, not hidden: those words are neither trained on nor evaluated
            rows = sum(1 for w in ds["cut_words"] if w)
            print(f"data.max_length={d.max_length} cuts {words} word(s) and {ents} entit{'y' if ents == 1 else 'ies'} off "
                  f"{rows} {split} row(s); they are not trained on or evaluated. Raise data.max_length to keep them.")
    encoded = encoded.remove_columns(["cut_words", "cut_entities"])
    return encoded, DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE)


def inputs_for_pipeline(ds, cfg: Config) -> list:
    """Raw rows as pipeline('token-classification', is_split_into_words=True) takes them: lists of words."""
    return [list(words) for words in ds[cfg.data.tokens_column]]


MODALITY = TOKENS = Modality(
    pipeline_tag="token-classification",
    auto_class=AutoModelForTokenClassification,
    load_processor=load_word_tokenizer,
    prepare=prepare,
    pipeline_inputs=inputs_for_pipeline,
    input_keys=("tokens_column",),
)
