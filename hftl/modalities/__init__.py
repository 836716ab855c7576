"""What depends on the kind of input (text, speech, images), one file each, looked up by `task`.

A `Modality` says which AutoModelFor*Classification to load, its processor (tokenizer, feature extractor, image
processor), how to turn raw splits into model inputs, and what `transformers.pipeline` takes. The path every
modality shares is hftl/recipe.py; what depends on the kind of target (classes, label sets, numbers) is hftl/tasks/.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..config import TASKS, Config, ConfigError

# config.TASKS -> the module here that defines it (each has a module-level MODALITY).
MODULES = {"text-classification": "text", "audio-classification": "audio", "image-classification": "image",
           "token-classification": "tokens"}


@dataclass
class Modality:
    pipeline_tag: str  # e.g. "text-classification"; also the pipeline() task
    auto_class: Any  # e.g. AutoModelForSequenceClassification
    load_processor: Callable[[str, Config], Any]  # (path, cfg) -> tokenizer / feature extractor / image processor
    prepare: Callable  # (splits, processor, cfg) -> (encoded DatasetDict with 'labels', collator)
    pipeline_inputs: Callable  # (raw split rows, cfg) -> list that pipeline(pipeline_tag) accepts
    input_keys: tuple[str, ...] = ("text_column", "text_pair_column")  # DataConfig keys naming the input columns
    # Media: (splits, cfg) -> (splits without rows whose file cannot be decoded, {split: [ids of rows left out]}).
    check: Callable | None = None


def get(task: str) -> Modality:
    """The Modality of config key `task` (text-classification, audio-classification, image-classification)."""
    if task not in MODULES:  # load_config refuses it first; a Config built in code reaches here
        raise ConfigError(f"task='{task}' is unknown; choose one of {', '.join(TASKS)}.")
    return importlib.import_module(f"{__name__}.{MODULES[task]}").MODALITY
