"""Command line: `hftl train [CONFIG] [key=value ...]`, `hftl push OUT_DIR [key=value ...]`, `hftl modes`.

Also runs as `accelerate launch -m hftl train CONFIG ...` (hftl/__main__.py).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "text" / "minilm_vader_full.yaml"
RECIPES = {
    "text-classification": "recipes.text_classification",
    "audio-classification": "recipes.audio_classification",
    "image-classification": "recipes.image_classification",
}

EPILOG = """examples:
  hftl train                                   # the embedded default: MiniLM on the VADER lexicon, offline
  hftl train recipes/configs/text/minilm_sst2_lora.yaml train.epochs=2 output.dir=outputs/sst2
  hftl train CONFIG adapt.mode=head train.learning_rate=1e-3
  accelerate launch -m hftl train CONFIG       # several GPUs/processes
  hftl train --help-config                     # every key, its type, default and meaning
  hftl train CONFIG hub.push=true hub.model_id=alice/minilm-sst2   # publish (token: HF_TOKEN or `hf auth login`)
  hftl push outputs/sst2 hub.model_id=alice/minilm-sst2            # publish a finished run's folder
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
    _recipe(cfg.task).main(cfg)
    return 0


def _recipe(task: str):
    if task not in RECIPES:
        raise ValueError(f"task='{task}' has no recipe; choose one of {sorted(RECIPES)}.")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout's recipes/ package
    return importlib.import_module(RECIPES[task])


def _push(args) -> int:
    from hftl.config import load_config
    from hftl.hub import OutputError
    from hftl.run import Modality, push

    config = Path(args.out_dir) / "hftl_config.yaml"
    if not config.is_file():
        raise OutputError(f"'{config}' does not exist; `hftl push` publishes a folder written by `hftl train` (give its output.dir).")
    cfg = load_config(config, ["hub.push=true", *args.overrides])
    modality = next(v for v in vars(_recipe(cfg.task)).values() if isinstance(v, Modality) and v.pipeline_tag == cfg.task)
    url, checked = push(args.out_dir, cfg, modality)
    print(f"Pushed {url} (round trip: files identical, {checked} validation predictions identical)")
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
    p = sub.add_parser("push", help="publish a model folder `hftl train` wrote to the Hub, then download and re-check it",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  HF_TOKEN=hf_... hftl push outputs/minilm_sst2_full hub.model_id=alice/minilm-sst2 hub.private=true")
    p.add_argument("out_dir", help="the output.dir of a finished `hftl train` run")
    p.add_argument("overrides", nargs="*", help="key=value: hub.model_id, hub.private, hub.revision (and data.* to find the validation rows)")
    p.set_defaults(func=_push)
    p = sub.add_parser("modes", help="list the adaptation modes")
    p.set_defaults(func=_modes)
    args = parser.parse_args(argv)
    from hftl.checkpoint import CheckpointError
    from hftl.config import ConfigError
    from hftl.data import DataError
    from hftl.hub import OutputError
    from hftl.train import LaunchError, NonFiniteLossError

    try:
        return args.func(args)
    except (ConfigError, DataError, OutputError, CheckpointError, LaunchError, NonFiniteLossError) as e:
        print(f"hftl: error: {e}", file=sys.stderr)
        return 2
