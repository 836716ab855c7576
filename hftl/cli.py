"""Command line: `hftl train [CONFIG] [key=value ...]`, `hftl modes`.

Also runs as `accelerate launch -m hftl train CONFIG ...` (hftl/__main__.py).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "text" / "minilm_vader_full.yaml"
RECIPES = {"text-classification": "recipes.text_classification"}

EPILOG = """examples:
  hftl train                                   # the embedded default: MiniLM on the VADER lexicon, offline
  hftl train recipes/configs/text/minilm_sst2_lora.yaml train.epochs=2 output.dir=outputs/sst2
  hftl train CONFIG adapt.mode=head train.learning_rate=1e-3
  accelerate launch -m hftl train CONFIG       # several GPUs/processes
  hftl train --help-config                     # every key, its type, default and meaning
"""


def _train(args) -> int:
    from hftl.config import describe, load_config

    if args.help_config:
        print(describe())
        return 0
    config = args.config
    overrides = list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `hftl train train.epochs=1` means: default preset + override
        config = None
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    if cfg.task not in RECIPES:
        raise ValueError(f"task='{cfg.task}' has no recipe; choose one of {sorted(RECIPES)}.")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout's recipes/ package
    importlib.import_module(RECIPES[cfg.task]).main(cfg)
    return 0


def _modes(args) -> int:
    from hftl.adapt import MODES

    for mode in MODES.values():
        print(f"{mode.name:8s} {mode.help}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hftl", description="Transfer learning for Hugging Face classifiers.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a classifier from a YAML preset and key=value overrides",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("config", nargs="?", help=f"YAML preset (default: the embedded {DEFAULT_CONFIG.name})")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. adapt.mode=lora train.epochs=2")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.set_defaults(func=_train)
    p = sub.add_parser("modes", help="list the adaptation modes")
    p.set_defaults(func=_modes)
    args = parser.parse_args(argv)
    from hftl.config import ConfigError
    from hftl.data import DataError
    from hftl.hub import OutputError

    try:
        return args.func(args)
    except (ConfigError, DataError, OutputError) as e:
        print(f"hftl: error: {e}", file=sys.stderr)
        return 2
