"""`hftl compare`: several adaptation modes over seeds and label budgets on one data set, each against training from scratch.

Every (mode, label budget, learning rate, seed) is one ordinary `hftl train` run (the task's recipe) written to
REPORT_DIR/runs/<mode>-<budget>-lr<rate>-s<seed>; a budget is labelled rows kept per class (--labels-per-class,
data.samples_per_class) or training rows in all (--train-rows, data.max_train_samples: sentences for token
classification, whose rows have no single class; also regression); a run whose results.json exists is read back instead of trained
again, so an interrupted compare continues where it stopped. Two modes always run: `scratch` (the same architecture
with random weights, every weight trainable, full mode, none of the options that presume pretrained weights: what
pretraining is measured against) and `head` (the cheapest transfer).

Each (mode, budget) gets its own learning rate, chosen on validation (mean over the seeds) from the config's rate times
each of --lr-scales, the grid widened once by one step when the best sits at its edge, or from --lr-trials Optuna TPE
trials over that range; a head that is solved (adapt.solve_head) uses no rate and runs once per seed. The verdict per
(mode, budget) reads the held-out split (data.target's labelled rows, else test, else validation, which then also chose
the rates) and is one of better, worse (negative transfer) or inconclusive, from the 95% confidence interval of the mean
difference to scratch over seeds (paired by seed, t-distribution); with fewer than MIN_SEEDS seeds there is none.
The report folder gets report.md, report.json and three PNG plots; each transferred run's model card gets the verdict.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import re
import statistics
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from huggingface_hub import ModelCard

from . import adapt, cards, plots, recipe
from .config import Config, ConfigError, _flatten as flat, load_config, to_dict
from .train import NonFiniteLossError

SCRATCH = "scratch"
ALWAYS = (SCRATCH, "head")
LR_SCALES = (0.3, 1, 3, 10)  # --lr-scales' default: times the config's train.learning_rate
# The verdicts, in the report and in the model cards alike.
BETTER, WORSE, INCONCLUSIVE = "better", "worse (negative transfer)", "inconclusive"
MIN_SEEDS = 2  # a t-interval needs a spread: two paired differences at least
NEEDS_SEEDS = f"needs at least {MIN_SEEDS} seeds"
CONFIDENCE = 0.95
CARD_SECTION = "## Transfer check"
NOT_COMPARED = ", and this run did not compare against such a baseline"  # the card template's words when it has no transfer check
PNGS = {"accuracy_vs_labels.png": "label budget", "accuracy_vs_params.png": "trainable parameters",
        "accuracy_vs_time.png": "training time"}
# The two kinds of label budget: the config key a run sets, and how the report names a budget.
PER_CLASS, ROWS = "labels_per_class", "train_rows"
UNITS = {PER_CLASS: {"key": "samples_per_class", "name": "labels/class", "folder": ""},
         ROWS: {"key": "max_train_samples", "name": "training rows", "folder": "rows"}}
# Keys whose setting presumes pretrained weights (keep part of them as they are, pull them back towards their
# pretrained values, continue their pretraining, read one of their layers): scratch runs them at their defaults.
PRETRAINED_ONLY = ("adapt.freeze_feature_encoder", "adapt.l2sp", "adapt.layer_lr_decay", "adapt.pretrain", "adapt.pooling", "adapt.layer")


def train(cfg: Config) -> dict:
    """One ordinary `hftl train` run of `cfg` (hftl/recipe.py); returns its results. The one place `hftl compare` and
    `hftl tune` start a run."""
    return recipe.train(cfg)


def parse_budgets(values, unit: str = PER_CLASS) -> list[int | None]:
    """'all' -> None (every training row), else a positive number of rows (per label, or in all)."""
    flag = "--" + unit.replace("_", "-")
    if not values:
        raise ConfigError(f"{flag}: give at least one budget, e.g. {flag} 5 20 all.")
    out = []
    for v in values:
        if str(v).lower() == "all":
            out.append(None)
        elif str(v).isdigit() and int(v) > 0:
            out.append(int(v))
        else:
            raise ConfigError(f"{flag} {v!r}: give positive whole numbers or 'all', e.g. {flag} 5 20 all.")
    return list(dict.fromkeys(out))


def budget_name(budget: int | None) -> str:
    return "all" if budget is None else str(budget)


def modes_to_run(modes) -> list[str]:
    """Scratch and head first, then the modes asked for, each once; unknown names are refused now, not mid-way."""
    modes = list(dict.fromkeys([*ALWAYS, *modes]))
    unknown = [m for m in modes if m != SCRATCH and m not in adapt.MODES]
    if unknown:
        raise ConfigError(f"--modes {', '.join(unknown)}: unknown mode; choose from {', '.join(sorted(adapt.MODES))} "
                          f"(`hftl modes`; '{SCRATCH}' and 'head' always run).")
    return modes


def scratch_config(base: Config) -> tuple[Config, list[str]]:
    """The user's config as the from-scratch baseline runs it, and what that changed (for the report): the same
    architecture with random weights, full mode, and PRETRAINED_ONLY at their defaults."""
    cfg = copy.deepcopy(base)
    cfg.model.from_scratch, cfg.adapt.mode = True, "full"
    defaults = flat(to_dict(Config()))
    for key in PRETRAINED_ONLY:
        section, leaf = key.split(".")
        setattr(getattr(cfg, section), leaf, defaults[key])
    given, now = flat(to_dict(base)), flat(to_dict(cfg))
    changed = [f"{k}={_yaml(now[k])} (the config: {_yaml(given[k])})" for k in ("model.from_scratch", "adapt.mode", *PRETRAINED_ONLY)
               if now[k] != given[k]]
    return cfg, changed


def _yaml(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def run_config(base: Config, mode: str, budget: int | None, seed: int, lr: float, folder: Path, unit: str = PER_CLASS) -> Config:
    """The user's config with what one run changes."""
    if mode == SCRATCH:
        cfg = scratch_config(base)[0]
    else:
        cfg = copy.deepcopy(base)
        cfg.adapt.mode = mode
    setattr(cfg.data, UNITS[unit]["key"], budget)
    cfg.train.seed, cfg.train.learning_rate = seed, lr
    # The folder holds only our runs; one without results.json is an unfinished one to replace. Compare never publishes.
    cfg.output.dir, cfg.output.overwrite, cfg.hub.push = str(folder), True, False
    return cfg


def check_reusable(folder: Path, cfg: Config) -> None:
    """A finished run is reused only if it was trained with the config asked for now (output.* aside: the folder may have moved)."""
    saved, want = flat(to_dict(load_config(folder / "hftl_config.yaml"))), flat(to_dict(cfg))
    changed = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in want.items() if not k.startswith("output.") and saved.get(k) != v]
    if changed:
        raise ConfigError(f"'{folder}' is a finished run of another configuration ({'; '.join(changed[:5])}); give --out a new "
                          "report folder, or delete that run folder to train it again.")


def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def verdict(transfer: list[float], scratch: list[float], greater_is_better: bool = True, confidence: float = CONFIDENCE) -> dict:
    """A transferred mode against scratch from runs paired by seed (transfer[i] and scratch[i] share seed i, hence the
    training rows of a label budget): the CONFIDENCE interval of the mean gain (transfer minus scratch; the other way
    round when lower is better) from the t-distribution with n-1 degrees of freedom. BETTER when it lies above 0, WORSE
    below, INCONCLUSIVE when it holds 0; no verdict (NEEDS_SEEDS) from fewer than MIN_SEEDS pairs.
    Returns {verdict, gain, low, high, n, text}: text is the sentence the report and the cards print."""
    from scipy.stats import t as student

    if len(transfer) != len(scratch):
        raise ValueError(f"verdict: {len(transfer)} transfer and {len(scratch)} scratch results; they pair by seed")
    sign = 1 if greater_is_better else -1
    gains = [sign * (a - b) for a, b in zip(transfer, scratch)]
    n, gain = len(gains), statistics.fmean(gains)
    tr, sc = mean_sd(transfer), mean_sd(scratch)
    numbers = f"{tr['mean']:.4f} ± {tr['sd']:.4f} vs scratch {sc['mean']:.4f} ± {sc['sd']:.4f} over {n} seed(s), gain {gain:+.4f}"
    if n < MIN_SEEDS:
        return {"verdict": NEEDS_SEEDS, "gain": gain, "low": None, "high": None, "n": n,
                "text": f"no verdict, it {NEEDS_SEEDS} (ran {n}): {numbers}"}
    half = student.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(gains) / math.sqrt(n)
    low, high = gain - half, gain + half
    word = BETTER if low > 0 else WORSE if high < 0 else INCONCLUSIVE
    text = (f"{word}: {numbers}, {100 * confidence:g}% confidence interval [{low:+.4f}, {high:+.4f}] (paired by seed, "
            f"t-distribution){'; more seeds narrow it' if word == INCONCLUSIVE else ''}")
    return {"verdict": word, "gain": gain, "low": low, "high": high, "n": n, "text": text}


def widen(rates: list[float], best: float) -> float | None:
    """The rate one step beyond the grid's edge where `best` sits (the step: the grid's mean ratio between neighbours,
    rounded to one significant figure: 0.3..10 gives 30 or 0.09), or None when the best is inside it."""
    rates = sorted(rates)
    if len(rates) < 2 or best not in (rates[0], rates[-1]):
        return None
    step = (rates[-1] / rates[0]) ** (1 / (len(rates) - 1))
    return float(f"{rates[-1] * step if best == rates[-1] else rates[0] / step:.1g}")


def choose(validation: dict[float, float | None], greater_is_better: bool) -> float | None:
    """The rate with the best mean validation score; a tie keeps the smaller rate; a rate where a seed diverged (None)
    is not a choice. None when every rate diverged."""
    sign = 1 if greater_is_better else -1
    ok = [r for r, v in validation.items() if v is not None]
    return max(ok, key=lambda r: (sign * validation[r], -r)) if ok else None


def verdict_split(runs: list[dict]) -> str:
    """The held-out split the verdicts read: data.target's labelled rows, else test, else validation (which also chose
    the learning rates and the best evaluation, so its numbers are optimistic)."""
    return next(s for s in ("target", "test", "validation") if all(s in r["results"] for r in runs))


def overfitting(history: list[dict], metric: str, greater_is_better: bool) -> str | None:
    """The card's overfitting check (validation loss rising while training loss falls, or a large gap); None when it is silent."""
    text = cards.overfitting_check(history, metric, greater_is_better)
    return text if text.startswith("Signs of overfitting") else None


def write_card_check(folder: Path, text: str) -> None:
    """Put the verdict in the run's model card where and as the card template renders CardData.transfer_check
    (the card's data is not kept, so the rendered text is edited); a re-run replaces the section."""
    path = folder / "README.md"
    card = ModelCard.load(path)
    body = card.text
    if CARD_SECTION in body:
        before, after = body.split(CARD_SECTION, 1)
        body = before + (after[after.index("\n## ") + 1:] if "\n## " in after else "")
    section = f"{CARD_SECTION}\n\n`hftl compare` trained this configuration against a from-scratch baseline (same architecture, " \
              f"random weights, every weight trainable, full mode; each at the learning rate validation chose): {text}\n\n"
    body = body.replace("\n## Training\n", f"\n{section}## Training\n", 1) if "\n## Training\n" in body else f"{body.rstrip()}\n\n{section}"
    # The Checks section's line (not assessed, or an earlier verdict) says this verdict
    line = f"- Negative transfer: {text} (see the transfer check below)"
    card.text = re.sub(r"^- Negative transfer: .*$", lambda _: line, body.replace(NOT_COMPARED, ": see the transfer check above"),
                       count=1, flags=re.M)
    card.save(path)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():  # platform.processor() is often empty on Linux
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpu = f"; GPU: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "; no GPU"
    return f"CPU: {cpu} ({os.cpu_count()} cores){gpu}"


def compare(base: Config, modes, seeds, budgets, out: str | Path, command: str = "hftl.compare.compare() from Python",
            lr_scales=LR_SCALES, lr_trials: int | None = None, unit: str = PER_CLASS, mode_rates: dict | None = None) -> dict:
    """Run (or reuse) every run of `base` (the user's config), then write report.md, report.json and the plots to `out`;
    returns report.json's content. `command` is quoted in the report. `budgets` count labelled rows per class (`unit`
    PER_CLASS) or training rows in all (ROWS). Learning rates per (mode, budget): the grid base rate x `lr_scales`
    (widened once at an edge), or `lr_trials` Optuna trials over its range (hftl[tune]); `mode_rates` ({mode: rate},
    --mode-lr) replaces the base rate for the modes it names (scratch included)."""
    out = Path(out)
    from .tasks import resolve_metrics

    base = resolve_metrics(base)  # what the config leaves to the task (read from the labels): the score's metric and direction
    metric, better = base.train.metric_for_best, base.train.greater_is_better
    modes, budgets = modes_to_run(modes), parse_budgets(budgets, unit)
    if unit == PER_CLASS and base.task == "token-classification" and any(b is not None for b in budgets):
        raise ConfigError("--labels-per-class: a sentence of token classification has many tags, not one class to count it "
                          "under; give the budget in labelled sentences with --train-rows (e.g. --train-rows 50 200 all).")
    if not seeds or not all(str(s).isdigit() for s in seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: give one or more whole numbers, e.g. --seeds 0 1 2.")
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    scales = sorted({float(s) for s in lr_scales}) if lr_scales else []
    if not scales or min(scales) <= 0:
        raise ConfigError(f"--lr-scales {' '.join(f'{float(x):g}' for x in lr_scales or [])}: give one or more positive numbers, e.g. --lr-scales 0.3 1 3 10 "
                          "(1 alone: the config's train.learning_rate for every mode).")
    if lr_trials is not None and (lr_trials < 1 or len(scales) < 2):
        raise ConfigError(f"--lr-trials {lr_trials}: give a positive number of trials, and --lr-scales at least two values: the "
                          "smallest and largest bound the rates the tuner tries.")
    if lr_trials is not None:
        from .tune import require_optuna

        require_optuna("hftl compare --lr-trials")  # now, not after the first mode's runs
    no_validation = ("--lr-scales 1 (every mode at the config's train.learning_rate) or keep a validation split "
                     "(data.validation_file, or data.validation_fraction > 0)")
    if (len(scales) > 1 or lr_trials is not None) and base.data.validation_fraction == 0 and not base.data.validation_file \
            and base.data.name is None:
        raise ConfigError("data.validation_fraction=0 and no data.validation_file: there is no validation split to choose each "
                          f"mode's learning rate on; give {no_validation}.")
    mode_rates = dict(mode_rates or {})
    stray = sorted(set(mode_rates) - set(modes))
    if stray or not all(isinstance(r, (int, float)) and r > 0 for r in mode_rates.values()):
        raise ConfigError(f"--mode-lr {' '.join(f'{m}={r}' for m, r in mode_rates.items())}: give MODE=RATE with a positive rate for "
                          f"modes this compare runs ({', '.join(modes)})" + (f"; {', '.join(stray)} does not run" if stray else "") + ".")
    # The process group the runs' Accelerators join; ACCELERATE_USE_CPU read as AcceleratorState reads it (CPU torchrun).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    runs, searches = [], []
    for mode in modes:
        base_lr = float(mode_rates.get(mode, base.train.learning_rate))
        grid = [float(f"{base_lr * s:.6g}") for s in scales]
        for budget in budgets:
            tried: dict[float, list[dict]] = {}

            def at(lr: float) -> float | None:
                """Every seed's run at `lr`; their mean validation score, None when one diverged."""
                if lr not in tried:
                    tried[lr] = [_one(base, mode, budget, seed, lr, out, state, unit) for seed in seeds]
                if any(r["diverged"] for r in tried[lr]):
                    return None
                if len(grid) == 1 and lr_trials is None:  # nothing to choose between: validation is not needed
                    return 0.0
                if not all("validation" in r["results"] for r in tried[lr]):
                    raise ConfigError(f"the runs have no validation split to choose each mode's learning rate on; give {no_validation}.")
                return statistics.fmean(r["results"]["validation"][metric] for r in tried[lr])

            search = {"mode": mode, "budget": budget_name(budget)}
            if mode == "head" and at(base_lr) is not None and all(r["solver"] for r in tried[base_lr]):
                search.update(how="solved", chosen=base_lr)  # solved on the features: no learning rate to choose
            elif lr_trials is not None:
                search.update(how="tuner", chosen=_tune_rate(at, grid[0], grid[-1], lr_trials, better))
            else:
                for lr in grid:
                    at(lr)
                chosen = choose({lr: at(lr) for lr in tried}, better)
                wider = widen(grid, chosen) if chosen is not None else None
                if wider is not None:
                    at(wider)
                    chosen = choose({lr: at(lr) for lr in tried}, better)
                search.update(how="grid", widened=wider, chosen=chosen,
                              at_edge=chosen is not None and len(tried) > 1 and chosen in (min(tried), max(tried)))
            if search["chosen"] is None:
                raise ConfigError(f"mode {mode}, {budget_name(budget)} {UNITS[unit]['name']}: training diverged at every learning rate "
                                  f"tried ({', '.join(f'{lr:g}' for lr in sorted(tried))}); lower train.learning_rate or --lr-scales.")
            search["validation"] = {f"{lr:g}": at(lr) for lr in sorted(tried)}
            searches.append(search)
            for lr in sorted(tried):
                runs += [{**r, "chosen": lr == search["chosen"]} for r in tried[lr]]
    chosen = [r for r in runs if r["chosen"]]
    split = verdict_split(chosen)
    splits = [s for s in ("validation", "test", "target") if all(s in r["results"] for r in chosen)]
    groups = []
    for search in searches:
        rs = [r for r in chosen if (r["mode"], r["budget"]) == (search["mode"], search["budget"])]
        groups.append({"mode": search["mode"], "budget": search["budget"], "seeds": seeds,
                       "learning_rate": search["chosen"], "lr_search": search,
                       **{s: mean_sd([r["results"][s][metric] for r in rs]) for s in splits},
                       "trainable_params": rs[0]["trainable_params"],
                       "train_seconds": statistics.fmean(r["train_seconds"] for r in rs)})
    for g in groups:
        if g["mode"] != SCRATCH:
            def scores(mode):  # in seed order: the verdict pairs them
                return [next(r["results"][split][metric] for r in chosen if (r["mode"], r["budget"], r["seed"]) ==
                             (mode, g["budget"], seed)) for seed in seeds]
            g["verdict"] = verdict(scores(g["mode"]), scores(SCRATCH), better)
            g["transfer_check"] = g["verdict"]["text"]
    report = {"command": command, "machine": machine(), "metric": metric, "greater_is_better": better, "budget_unit": unit,
              "verdict_split": split, "splits": splits, "scratch": scratch_config(base)[1],
              "lr": {"base": base.train.learning_rate, "per_mode": mode_rates, "scales": scales, "trials": lr_trials},
              "groups": groups, "runs": runs}
    if not state.is_main_process:  # one process writes the cards' verdicts, the report and the plots
        return report
    for g in groups:
        for r in chosen:
            if g["mode"] != SCRATCH and (r["mode"], r["budget"]) == (g["mode"], g["budget"]):
                write_card_check(out / r["folder"], f"on {split} {metric}, {g['transfer_check']}.")
    _plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = _markdown(report)
    (out / "report.md").write_text(text)
    print(text)
    return report


def _one(base: Config, mode: str, budget: int | None, seed: int, lr: float, out: Path, state, unit: str = PER_CLASS) -> dict:
    """One run, trained or read back; a run whose loss went non-finite is recorded (beside its folder, so a rerun does not
    train it again) as diverged."""
    folder = out / "runs" / f"{mode}-{UNITS[unit]['folder'] if budget else ''}{budget_name(budget)}-lr{lr:g}-s{seed}"
    cfg = run_config(base, mode, budget, seed, lr, folder, unit)
    record = {"mode": mode, "budget": budget_name(budget), "seed": seed, "learning_rate": lr,
              "folder": str(folder.relative_to(out)), "diverged": None}
    diverged = folder.with_name(f"{folder.name}.diverged.json")
    if (folder / "results.json").is_file():
        check_reusable(folder, cfg)
    elif diverged.is_file() and json.loads(diverged.read_text())["config"] == json.loads(json.dumps(to_dict(cfg))):
        return {**record, "diverged": json.loads(diverged.read_text())["error"]}
    else:
        try:
            train(cfg)
        except NonFiniteLossError as e:  # every process raises it at the same step
            if state.is_main_process:
                diverged.parent.mkdir(parents=True, exist_ok=True)
                diverged.write_text(json.dumps({"error": str(e), "config": to_dict(cfg)}, indent=1) + "\n")
            state.wait_for_everyone()
            return {**record, "diverged": str(e)}
    # Under `accelerate launch` every process trains; the main one writes results.json after the others return.
    state.wait_for_everyone()
    saved = json.loads((folder / "results.json").read_text())
    return {**record, **{k: saved[k] for k in ("results", "train_seconds", "trainable_params", "total_params")},
            "solver": saved.get("solver"), "overfitting": overfitting(saved["history"], base.train.metric_for_best,
                                                                        base.train.greater_is_better)}


def _tune_rate(at, low: float, high: float, trials: int, greater_is_better: bool) -> float | None:
    """The rate `trials` Optuna TPE trials find in [low, high] (log scale), each scored by at(rate): the mean validation
    score over the seeds. The sampler is seeded, so a rerun proposes the same rates and reuses their runs."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if greater_is_better else "minimize",
                                sampler=optuna.samplers.TPESampler(seed=0))
    # A diverged rate scores nan: Optuna records the trial as failed and samples on.
    def objective(trial) -> float:
        score = at(float(f"{trial.suggest_float('learning_rate', low, high, log=True):.3g}"))
        return math.nan if score is None else score

    study.optimize(objective, n_trials=trials)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return float(f"{study.best_params['learning_rate']:.3g}") if done else None


def _plots(report: dict, out: Path) -> None:
    metric, split, unit = report["metric"], report["verdict_split"], UNITS[report["budget_unit"]]["name"]
    budgets = list(dict.fromkeys(g["budget"] for g in report["groups"]))
    by_mode = {m: [g for g in report["groups"] if g["mode"] == m] for m in dict.fromkeys(g["mode"] for g in report["groups"])}
    ylabel = f"{split} {metric} (mean ± sd over seeds)"
    plots.errorbar_png({m: (list(range(len(gs))), [g[split]["mean"] for g in gs], [g[split]["sd"] for g in gs])
                        for m, gs in by_mode.items()}, out / "accuracy_vs_labels.png", unit, ylabel,
                       xticks=budgets)
    for png, key, xlabel, logx in (("accuracy_vs_params.png", "trainable_params", "trainable parameters (log scale)", True),
                                   ("accuracy_vs_time.png", "train_seconds", "training wall time (s, mean over seeds)", False)):
        plots.errorbar_png({m: ([g[key] for g in gs], [g[split]["mean"] for g in gs], [g[split]["sd"] for g in gs])
                            for m, gs in by_mode.items()}, out / png, xlabel, ylabel, logx=logx, connect=False,
                           notes={m: [f"{g['budget']}{'/class' if unit == 'labels/class' else ' rows'}" for g in gs] for m, gs in by_mode.items()})


def _markdown(report: dict) -> str:
    metric, split, splits = report["metric"], report["verdict_split"], report["splits"]
    unit = UNITS[report["budget_unit"]]["name"]
    lr = report["lr"]
    lines = ["# hftl compare", "",
             f"{metric} as mean ± standard deviation over seeds {', '.join(map(str, report['groups'][0]['seeds']))}, each mode at "
             f"its own learning rate (chosen on validation); `{SCRATCH}` is the same architecture trained from random weights "
             "(no transfer).", "",
             f"| mode | {unit} | learning rate | " + " | ".join(f"{s} {metric}" for s in splits) + " | trainable params | wall s (training) |",
             "|---|---|---|" + "---|" * len(splits) + "---|---|"]
    for g in report["groups"]:
        rate = "solved (none)" if g["lr_search"]["how"] == "solved" else f"{g['learning_rate']:g}"
        lines.append(f"| {g['mode']} | {g['budget']} | {rate} | " + " | ".join(f"{g[s]['mean']:.4f} ± {g[s]['sd']:.4f}" for s in splits)
                     + f" | {g['trainable_params']:,} | {g['train_seconds']:.1f} |")
    lines += ["", f"## Transfer check ({split} {metric} against training from scratch)", "",
              f"Per mode and label budget: the {100 * CONFIDENCE:g}% confidence interval of the mean gain over scratch, runs paired by "
              f"seed (the same training rows), from the t-distribution: **{BETTER}** when it lies above 0, **{WORSE}** below, "
              f"**{INCONCLUSIVE}** when it holds 0; fewer than {MIN_SEEDS} seeds give no verdict. Each verdict is tested on its own "
              "(no correction for comparing several modes).", ""]
    if split == "validation":
        lines += ["No test split (data.test_file / data.test_split): these verdicts read the validation split, which also chose "
                  "each mode's learning rate and best evaluation, so every number here is optimistic. Give a test split to "
                  "report on rows nothing was chosen on.", ""]
    for g in report["groups"]:
        if g["mode"] != SCRATCH:
            lines.append(f"- {g['mode']}, {g['budget']} {unit}: " + (f"**{g['transfer_check']}**" if g["verdict"]["verdict"] == WORSE
                                                                                      else g["transfer_check"]))
    lines += ["", "## The from-scratch baseline", "",
              f"`{SCRATCH}` ran with " + ", ".join(f"`{c}`" for c in report["scratch"]) + "; everything else as the config says, "
              "every weight trainable. Options that presume pretrained weights run at their defaults: "
              + ", ".join(f"`{k}`" for k in PRETRAINED_ONLY) + ".", "",
              "## Learning rates (chosen on validation)", ""]
    per_mode = lr.get("per_mode") or {}
    # the rate each mode's grid is built on: the config's, or the one --mode-lr gave it
    named = ", ".join(f"{m} {r:g}" for m, r in per_mode.items())
    if per_mode and {g["mode"] for g in report["groups"]} <= set(per_mode):  # --mode-lr named every mode: no config rate ran
        based = f"the rates --mode-lr gave ({named})"
    else:
        based = f"the config's {lr['base']:g}" + (f" ({named} by --mode-lr)" if per_mode else "")
    if len(lr["scales"]) == 1 and not lr["trials"]:
        lines.append(f"{'One rate per mode' if per_mode else 'One rate for every mode'} and budget (--lr-scales {lr['scales'][0]:g}): "
                     f"{based} times {lr['scales'][0]:g}; nothing was chosen.")
    elif lr["trials"]:
        span = f"{lr['scales'][0]:g} to {lr['scales'][-1]:g}"
        where = f"from {based} times {span} (log scale)" if per_mode else \
            f"over {lr['base'] * lr['scales'][0]:g} to {lr['base'] * lr['scales'][-1]:g} (log scale; {based} times {span})"
        lines.append(f"Per mode and budget, {lr['trials']} Optuna TPE trials {where}, each scored by its mean validation {metric} over the seeds.")
    else:
        lines.append(f"Per mode and budget, {based} times {', '.join(f'{s:g}' for s in lr['scales'])}, scored by the "
                     f"mean validation {metric} over the seeds (a tie keeps the smaller rate); when the best sat at the grid's "
                     "edge, the grid was widened once by one step.")
    lines.append("")
    for g in report["groups"]:
        search = g["lr_search"]
        if len(lr["scales"]) == 1 and not lr["trials"] and search["how"] != "solved":
            continue
        if search["how"] == "solved":
            lines.append(f"- {g['mode']}, {g['budget']}: the head was solved on the frozen features (adapt.solve_head): no "
                         "learning rate.")
            continue
        tried = ", ".join(f"{r}: {'diverged' if v is None else f'{v:.4f}'}" for r, v in search["validation"].items())
        line = f"- {g['mode']}, {g['budget']}: {tried}; chosen {search['chosen']:g}"
        if search.get("widened"):
            line += f" (the best of the first grid sat at its edge: widened to {search['widened']:g})"
        if search.get("at_edge"):
            line += "; still at the edge of the grid: the best rate may lie beyond it"
        lines.append(line)
    flagged = [r for r in report["runs"] if r["chosen"] and r["overfitting"]]
    lines += ["", "## Train/validation gap", ""]
    lines += [f"- {r['mode']}, {r['budget']} {unit}, seed {r['seed']}: {r['overfitting']}" for r in flagged] or \
             ["No run shows validation loss rising while training loss falls, or a large gap between them."]
    lines += ["", "## Plots", ""] + [f"![{split} {metric} vs {what}]({png})" for png, what in PNGS.items()]
    lines += ["", "## How this was made", "", f"```\n{report['command']}\n```", "", f"Machine: {report['machine']}",
              "", "Every run's numbers: report.json; each run's folder (model, card, results.json): runs/ (the runs at the rates "
              "not chosen too).", ""]
    return "\n".join(lines)
