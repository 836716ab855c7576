"""`hftl compare`: several adaptation modes over seeds and label budgets on one data set, with a guard for negative transfer.

Every (mode, labels per class, seed) is one ordinary `hftl train` run (the task's recipe) written to
REPORT_DIR/runs/<mode>-<budget>-s<seed>; a run whose results.json exists is read back instead of trained
again, so an interrupted compare continues where it stopped. Two modes always run: `scratch` (the same
architecture with random weights, model.from_scratch=true, trained in full mode: what pretraining is
measured against) and `head` (the cheapest transfer). The report folder gets report.md, report.json and
three PNG plots; each transferred run's model card gets the verdict against scratch.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import statistics
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from huggingface_hub import ModelCard

from . import adapt, cards, plots, recipe
from .config import Config, ConfigError, _flatten as flat, load_config, to_dict

SCRATCH = "scratch"
ALWAYS = (SCRATCH, "head")
ONE_POINT = 0.01  # the shipped metrics are fractions: a point is 0.01
NO_GAIN = "no gain over training from scratch (possible negative transfer)"
CARD_SECTION = "## Transfer check"
NOT_COMPARED = ", and this run did not compare against such a baseline"  # the card template's words when it has no transfer check
PNGS = {"accuracy_vs_labels.png": "labels per class", "accuracy_vs_params.png": "trainable parameters",
        "accuracy_vs_time.png": "training time"}


def parse_budgets(values) -> list[int | None]:
    """'all' -> None (every training row), else a positive number of rows per label."""
    if not values:
        raise ConfigError("--labels-per-class: give at least one budget, e.g. --labels-per-class 5 20 all.")
    out = []
    for v in values:
        if str(v).lower() == "all":
            out.append(None)
        elif str(v).isdigit() and int(v) > 0:
            out.append(int(v))
        else:
            raise ConfigError(f"--labels-per-class {v!r}: give positive whole numbers or 'all', e.g. --labels-per-class 5 20 all.")
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


def run_config(base: Config, mode: str, budget: int | None, seed: int, folder: Path) -> Config:
    """The user's config with what one run changes."""
    cfg = copy.deepcopy(base)
    cfg.model.from_scratch = mode == SCRATCH
    cfg.adapt.mode = "full" if mode == SCRATCH else mode
    cfg.data.samples_per_class, cfg.train.seed = budget, seed
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


def guard(transfer: list[float], scratch: list[float], greater_is_better: bool = True) -> tuple[bool, str]:
    """(gain?, sentence with the numbers): a transferred mode gains only if its mean beats scratch's by more than the
    larger standard deviation of the two (one seed each: by more than one point)."""
    t, s = mean_sd(transfer), mean_sd(scratch)
    n = min(t["n"], s["n"])
    margin, why = (max(t["sd"], s["sd"]), "the larger standard deviation") if n > 1 else (ONE_POINT, "one point, with one seed")
    gain = (t["mean"] - s["mean"]) * (1 if greater_is_better else -1)
    numbers = (f"{t['mean']:.4f} ± {t['sd']:.4f} vs scratch {s['mean']:.4f} ± {s['sd']:.4f} over {n} seed(s): "
               f"gain {gain:+.4f}, {'more' if gain > margin else 'not more'} than {margin:.4f} ({why})")
    return gain > margin, (f"gain over training from scratch: {numbers}" if gain > margin else f"{NO_GAIN}: {numbers}")


def guard_split(runs: list[dict]) -> str:
    """The held-out split the guard reads: data.target's labelled rows, else test, else validation (which also picked the best epoch)."""
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
              f"random weights): {text}\n\n"
    body = body.replace("\n## Training\n", f"\n{section}## Training\n", 1) if "\n## Training\n" in body else f"{body.rstrip()}\n\n{section}"
    card.text = body.replace(NOT_COMPARED, ": see the transfer check above")
    card.save(path)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():  # platform.processor() is often empty on Linux
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpu = f"; GPU: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "; no GPU"
    return f"CPU: {cpu} ({os.cpu_count()} cores){gpu}"


def compare(base: Config, modes, seeds, budgets, out: str | Path, command: str = "hftl.compare.compare() from Python") -> dict:
    """Run (or reuse) every run of `base` (the user's config), then write report.md, report.json and the plots to `out`;
    returns report.json's content. `command` is quoted in the report."""
    out = Path(out)
    from .tasks.single_label import SingleLabel

    # Label budgets are rows per class: compare's runs are single-label, whose task fills in what the config leaves.
    resolved = SingleLabel([]).configure(base).train
    metric, better = resolved.metric_for_best, resolved.greater_is_better
    modes, budgets = modes_to_run(modes), parse_budgets(budgets)
    if not seeds or not all(str(s).isdigit() for s in seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: give one or more whole numbers, e.g. --seeds 0 1 2.")
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    # The process group the runs' Accelerators join; ACCELERATE_USE_CPU read as AcceleratorState reads it (CPU torchrun).
    runs, state = [], PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    for mode in modes:
        for budget in budgets:
            for seed in seeds:
                folder = out / "runs" / f"{mode}-{budget_name(budget)}-s{seed}"
                cfg = run_config(base, mode, budget, seed, folder)
                if (folder / "results.json").is_file():
                    check_reusable(folder, cfg)
                else:
                    recipe.train(cfg)
                # Under `accelerate launch` every process trains; the main one writes results.json after the others return.
                state.wait_for_everyone()
                saved = json.loads((folder / "results.json").read_text())
                runs.append({"mode": mode, "labels_per_class": budget_name(budget), "seed": seed,
                             "folder": str(folder.relative_to(out)),
                             **{k: saved[k] for k in ("results", "train_seconds", "trainable_params", "total_params")},
                             "overfitting": overfitting(saved["history"], metric, better)})
    split = guard_split(runs)
    splits = [s for s in ("validation", "test", "target") if all(s in r["results"] for r in runs)]
    groups = []
    for mode in modes:
        for budget in map(budget_name, budgets):
            rs = [r for r in runs if r["mode"] == mode and r["labels_per_class"] == budget]
            groups.append({"mode": mode, "labels_per_class": budget, "seeds": seeds,
                           **{s: mean_sd([r["results"][s][metric] for r in rs]) for s in splits},
                           "trainable_params": rs[0]["trainable_params"],
                           "train_seconds": statistics.fmean(r["train_seconds"] for r in rs)})
    for g in groups:
        if g["mode"] != SCRATCH:
            same = [r for r in runs if r["labels_per_class"] == g["labels_per_class"]]
            g["gain"], g["transfer_check"] = guard([r["results"][split][metric] for r in same if r["mode"] == g["mode"]],
                                                   [r["results"][split][metric] for r in same if r["mode"] == SCRATCH], better)
    report = {"command": command, "machine": machine(), "metric": metric, "greater_is_better": better,
              "guard_split": split, "splits": splits, "groups": groups, "runs": runs}
    if not state.is_main_process:  # one process writes the cards' verdicts, the report and the plots
        return report
    for g in groups:
        for r in runs:
            if g["mode"] != SCRATCH and (r["mode"], r["labels_per_class"]) == (g["mode"], g["labels_per_class"]):
                write_card_check(out / r["folder"], f"on {split} {metric}, {g['transfer_check']}.")
    _plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = _markdown(report)
    (out / "report.md").write_text(text)
    print(text)
    return report


def _plots(report: dict, out: Path) -> None:
    metric, split = report["metric"], report["guard_split"]
    budgets = list(dict.fromkeys(g["labels_per_class"] for g in report["groups"]))
    by_mode = {m: [g for g in report["groups"] if g["mode"] == m] for m in dict.fromkeys(g["mode"] for g in report["groups"])}
    ylabel = f"{split} {metric} (mean ± sd over seeds)"
    plots.errorbar_png({m: (list(range(len(gs))), [g[split]["mean"] for g in gs], [g[split]["sd"] for g in gs])
                        for m, gs in by_mode.items()}, out / "accuracy_vs_labels.png", "labels per class", ylabel,
                       xticks=budgets)
    for png, key, xlabel, logx in (("accuracy_vs_params.png", "trainable_params", "trainable parameters (log scale)", True),
                                   ("accuracy_vs_time.png", "train_seconds", "training wall time (s, mean over seeds)", False)):
        plots.errorbar_png({m: ([g[key] for g in gs], [g[split]["mean"] for g in gs], [g[split]["sd"] for g in gs])
                            for m, gs in by_mode.items()}, out / png, xlabel, ylabel, logx=logx, connect=False,
                           notes={m: [f"{g['labels_per_class']}/class" for g in gs] for m, gs in by_mode.items()})


def _markdown(report: dict) -> str:
    metric, split, splits = report["metric"], report["guard_split"], report["splits"]
    lines = ["# hftl compare", "",
             f"{metric} as mean ± standard deviation over seeds {', '.join(map(str, report['groups'][0]['seeds']))}; "
             f"`{SCRATCH}` is the same architecture trained from random weights (no transfer).", "",
             "| mode | labels/class | " + " | ".join(f"{s} {metric}" for s in splits) + " | trainable params | wall s (training) |",
             "|---|---|" + "---|" * len(splits) + "---|---|"]
    for g in report["groups"]:
        lines.append(f"| {g['mode']} | {g['labels_per_class']} | " + " | ".join(f"{g[s]['mean']:.4f} ± {g[s]['sd']:.4f}" for s in splits)
                     + f" | {g['trainable_params']:,} | {g['train_seconds']:.1f} |")
    lines += ["", f"## Transfer check ({split} {metric} against training from scratch)", ""]
    for g in report["groups"]:
        if g["mode"] != SCRATCH:
            text = g["transfer_check"]
            lines.append(f"- {g['mode']}, {g['labels_per_class']} labels/class: " + (text if g["gain"] else f"**{text}**"))
    flagged = [r for r in report["runs"] if r["overfitting"]]
    lines += ["", "## Train/validation gap", ""]
    lines += [f"- {r['mode']}, {r['labels_per_class']} labels/class, seed {r['seed']}: {r['overfitting']}" for r in flagged] or \
             ["No run shows validation loss rising while training loss falls, or a large gap between them."]
    lines += ["", "## Plots", ""] + [f"![{split} {metric} vs {what}]({png})" for png, what in PNGS.items()]
    lines += ["", "## How this was made", "", f"```\n{report['command']}\n```", "", f"Machine: {report['machine']}",
              "", "Every run's numbers: report.json; each run's folder (model, card, results.json): runs/.", ""]
    return "\n".join(lines)
