"""Token classification (NER, tagging): any AutoModelForTokenClassification checkpoint with a fast tokenizer; rows of
words (data.tokens_column) and IOB2 tags (data.tags_column), labels on each word's first sub-token.

    hftl train task=token-classification data.train_file=train.jsonl data.validation_file=validation.jsonl
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from datasets import DatasetDict
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

from ..config import Config, ConfigError, DataConfig
from ..metrics import entities
from ..tasks.token_classification import CONTINUATION, IGNORE, WINDOW
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


# data.stride: a long sentence becomes overlapping windows of data.max_length tokens (the tokenizer's overflow, as
# pipeline("token-classification", stride=...) cuts it), each window a row. Every word is trained on and scored in
# exactly one window, the one that holds its first piece farthest from either edge (the most context on both sides);
# its other appearances are left out of the loss. An evaluation split's rows say which sentence they are a window
# of (WINDOW), and evaluation joins a sentence's windows back (merge_windows) before predicting and scoring.


def window_plan(windows: list[list], stride: int) -> list[list]:
    """For one sentence's windows (each a word_ids() list, in order): per position None (special token, padding) or
    (word, first piece?, owned?): `owned` when this window is the one that trains and scores the word.
    Consecutive windows share `stride` tokens (the tokenizer's overflow), which places each window's tokens in the
    whole sentence, so a window that starts inside a word knows its first tokens are not first pieces."""
    placed, start, prev_first = [], 0, []
    for k, ids in enumerate(windows):
        content = [j for j, w in enumerate(ids) if w is not None]
        firsts = []
        for i, j in enumerate(content):
            if i == 0 and k:  # the previous window's token at the same place says whether it starts a word
                firsts.append(prev_first[len(prev_first) - stride])
            else:
                firsts.append(i == 0 or ids[j] != ids[content[i - 1]])
        placed.append((start, content, firsts))
        start, prev_first = start + len(content) - stride, firsts
    owner = {}  # word -> (context on its shorter side, -window): the most central first piece wins, ties the earlier
    for k, (start, content, firsts) in enumerate(placed):
        for i, j in enumerate(content):
            if firsts[i]:
                key = (min(i, len(content) - 1 - i), -k)
                w = windows[k][j]
                owner[w] = max(owner.get(w, key), key)
    plans = []
    for k, ((_, content, firsts), ids) in enumerate(zip(placed, windows)):
        plan = [None] * len(ids)
        for i, j in enumerate(content):
            plan[j] = (ids[j], firsts[i], -owner.get(ids[j], (0, -k))[1] == k)
        plans.append(plan)
    return plans


def merge_windows(logits: np.ndarray, labels: np.ndarray, window_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-window outputs (windows x positions x tags) and labels in row order, consecutive windows of a sentence
    sharing its `window_of` -> per sentence the positions its windows train and score (label != IGNORE), joined in
    order: (sentences x positions x tags, sentences x positions), padded with zero logits and IGNORE labels."""
    starts = np.flatnonzero(np.r_[True, window_of[1:] != window_of[:-1]])
    groups = np.split(np.arange(len(window_of)), starts[1:])
    keep = [[(i, labels[i] != IGNORE) for i in g] for g in groups]
    width = max((sum(int(m.sum()) for _, m in k) for k in keep), default=0)
    out_logits = np.zeros((len(groups), width, logits.shape[-1]), dtype=logits.dtype)
    out_labels = np.full((len(groups), width), IGNORE, dtype=labels.dtype)
    for r, k in enumerate(keep):
        row_logits = np.concatenate([logits[i][m] for i, m in k]) if k else np.zeros((0, logits.shape[-1]))
        row_labels = np.concatenate([labels[i][m] for i, m in k]) if k else np.zeros(0)
        out_logits[r, :len(row_labels)], out_labels[r, :len(row_labels)] = row_logits, row_labels
    return out_logits, out_labels


def collate_windows(rows: list[dict], collator) -> dict:
    """The token collator's batch, with each row's sentence (WINDOW) beside it, for evaluation to join windows."""
    batch = collator([{k: v for k, v in r.items() if k != WINDOW} for r in rows])
    if WINDOW in rows[0]:
        batch[WINDOW] = torch.tensor([r[WINDOW] for r in rows])
    return batch


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

    if d.stride is not None:
        return windowed(splits, tokenizer, cfg, inside)

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


def windowed(splits: DatasetDict, tokenizer, cfg: Config, inside: list[int]):
    """prepare() under data.stride: every sentence in windows of data.max_length tokens, `stride` shared between
    neighbours, each window a row labelled by window_plan; evaluation splits keep each window's sentence (WINDOW)."""
    d: DataConfig = cfg.data
    room = d.max_length - tokenizer.num_special_tokens_to_add()
    if d.stride >= room:
        raise ConfigError(f"data.stride={d.stride}: windows of data.max_length={d.max_length} tokens hold {room} of the sentence's "
                          f"(the rest are special tokens), and neighbours share data.stride of them; give a stride below {room} "
                          f"(e.g. {max(1, room // 4)}), or raise data.max_length.")

    def tokenize(batch, rows, split):
        encoded = tokenizer(batch[d.tokens_column], is_split_into_words=True, truncation=True, max_length=d.max_length,
                            stride=d.stride, return_overflowing_tokens=True)
        sample = encoded["overflow_to_sample_mapping"]
        out = {k: encoded[k] for k in encoded if k != "overflow_to_sample_mapping"}
        out["labels"], out[WINDOW] = [], []
        for s in range(len(batch[d.tokens_column])):
            ks = [i for i, x in enumerate(sample) if x == s]
            tags = batch["labels"][s]

            def label(p) -> int:  # as align() labels, for the words this window owns
                if p is None or not p[2]:
                    return IGNORE
                if p[1]:
                    return tags[p[0]] if tags else 0  # unlabelled rows (hftl predict): any id >= 0 marks a first piece
                return CONTINUATION - inside[tags[p[0]]] if d.label_all_subtokens and tags else IGNORE

            for plan in window_plan([encoded.word_ids(i) for i in ks], d.stride):
                out["labels"].append([label(p) for p in plan])
                out[WINDOW].append(rows[s])
        if split == "train":  # training needs no joining back
            del out[WINDOW]
        return out

    encoded = DatasetDict({split: ds.map(functools.partial(tokenize, split=split), batched=True, with_indices=True,
                                         remove_columns=ds.column_names, desc=f"Tokenizing {split} words in windows")
                           for split, ds in splits.items()})
    collator = DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE)
    return encoded, functools.partial(collate_windows, collator=collator)


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
