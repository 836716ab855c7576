"""hftl: Hugging Face-centric transfer learning. `hftl train CONFIG key=value ...`, or from Python (a notebook):

    import hftl
    results = hftl.run("minilm_sst2_head", {"data.train_file": "train.csv", "data.validation_file": "dev.csv"})
    results["validation"]["accuracy"]        # the final metrics by split; the model folder is at output.dir

Nothing heavy is imported until a function is called, so `import hftl` (and `hftl --version`) stays instant. (The
function is `run`, not `train`: `hftl.train` is the training-loop module, which would shadow it once imported.)
"""
from __future__ import annotations

import time

__version__ = "0.1.0"
# When the package was first imported: `hftl train` counts its start-up (the imports before the run) from here.
IMPORTED = time.perf_counter()


def configure(preset: str | None = None, overrides: dict | list[str] | None = None, **keys):
    """The resolved hftl.config.Config that `hftl train PRESET key=value ...` would run. `preset`: a path or a shipped
    preset's name (None: the embedded default); `overrides`: {"train.epochs": 2} (Python values) or ["train.epochs=2"]
    (command-line text); `keys`: the same as keywords with "__" for the dot, e.g. train__epochs=2. Bad input raises
    hftl.errors.UserError (the message names the key and the fix), before anything loads."""
    import json

    from .presets import load

    if isinstance(overrides, dict):
        # JSON is YAML, which is how override values are read: every Python value keeps its type (a str stays a str; a Path becomes its text).
        overrides = [f"{k}={json.dumps(v, default=str)}" for k, v in overrides.items()]
    texts = [*(overrides or []), *(f"{k.replace('__', '.')}={json.dumps(v, default=str)}" for k, v in keys.items())]
    return load(preset, texts)


def run(preset: str | None = None, overrides: dict | list[str] | None = None, **keys) -> dict:
    """Run one training as `hftl train` does (the same checks, outputs and model folder) and return its final
    metrics by split: {"validation": {"accuracy": ..., ...}, "test": {...}}. Arguments as for `configure`; a Config
    object may be passed as `preset` instead."""
    from .config import Config
    from .recipe import train

    return train(preset if isinstance(preset, Config) else configure(preset, overrides, **keys))
