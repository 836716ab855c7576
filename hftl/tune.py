"""`hftl tune CONFIG --trials N key=range ...`: hyperparameter search with Optuna, every trial an ordinary hftl run.

Optuna's TPE sampler proposes each trial's values; the trial runs as `hftl train` would, in OUT/trials/trial-NNNN, and
its score is the validation train.metric_for_best (the best evaluation's). The validation score of every evaluation
during training is reported to the trial (hftl.train.EVALUATION_LISTENERS), so the pruner (median, or successive
halving) stops a trial that trails the others at the same step. The study lives in Optuna's own storage: by default a
journal file in OUT; several `hftl tune` workers (on one machine or many) that name the same --study-name and
--storage (an RDB URL such as sqlite:///study.db or postgresql://..., or journal:PATH on a filesystem they share) take
trials from one study, each trial number once. At the end each worker writes, from the whole study, OUT/report.md,
report.json, the plots (optimisation history, parameter importance, intermediate values) and OUT/best.yaml: the best
trial's configuration as a preset that `hftl train` loads.

key=range forms (the value decides; anything else is an ordinary key=value for every trial):
    float:LO:HI         uniform          e.g. adapt.lora_dropout=float:0:0.3
    log:LO:HI           log-uniform      e.g. train.learning_rate=log:1e-5:1e-3
    int:LO:HI[:STEP]    whole numbers    e.g. adapt.lora_r=int:4:32:4
    choice:A,B,...      one of these     e.g. train.epochs=choice:1,2,3  (values read as YAML, as key=value is)
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import Config, ConfigError, _flatten as flat, all_keys, from_flat, to_dict, to_yaml
from .extras import require

KINDS = ("float", "log", "int", "choice")
PRUNERS = ("median", "halving", "none")
NO_VALIDATION = ("hftl tune scores each trial on the validation split, and this config has none (data.validation_fraction=0): "
                 "give data.validation_file, or a validation fraction.")
PNGS = {"optimization_history.png": "optimisation history", "param_importances.png": "parameter importance",
        "intermediate_values.png": "validation score at each evaluation, per trial"}


def require_optuna(needed_for: str = "hftl tune"):
    """optuna, or a one-line error naming the extra that installs it."""
    return require("optuna", "tune", needed_for)


@dataclass
class Param:
    """One searched key and its range."""
    key: str
    kind: str  # one of KINDS
    low: float | int | None = None
    high: float | int | None = None
    step: int | None = None
    choices: list | None = None

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1)
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")

    def ends(self) -> list:
        """The values that bound the range (every value of a choice)."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def spec(self) -> str:
        if self.kind == "choice":
            return f"choice:{','.join(map(str, self.choices))}"
        return f"{self.kind}:{self.low:g}:{self.high:g}" + (f":{self.step}" if self.step else "")


def parse_param(text: str) -> Param | None:
    """`key=kind:...` as a Param; None when the value is not a range (then it is an ordinary override)."""
    key, _, value = text.partition("=")
    kind, sep, rest = value.partition(":")
    if not sep or kind not in KINDS:
        return None
    key = key.strip()
    forms = {"float": "float:LO:HI", "log": "log:LO:HI", "int": "int:LO:HI[:STEP]", "choice": "choice:A,B,..."}

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{text}: {why}; the form is {key}={forms[kind]} (`hftl tune --help`).")

    if key not in all_keys():
        raise ConfigError(f"{text}: unknown config key '{key}' (`hftl train --help-config` lists every key).")
    if kind == "choice":
        choices = [yaml.safe_load(v) if v.strip() else "" for v in rest.split(",")]
        if len(choices) < 2 or any(isinstance(c, (list, dict)) for c in choices):
            raise bad("give two or more plain values")
        if len(set(map(repr, choices))) < len(choices):
            raise bad("a value is listed twice")
        return Param(key, kind, choices=choices)
    parts = rest.split(":")
    if len(parts) not in ((2, 3) if kind == "int" else (2,)):
        raise bad("wrong number of fields")
    number = int if kind == "int" else float
    try:
        low, high, *step = (number(p) for p in parts)
    except ValueError:
        raise bad(f"{'whole numbers' if kind == 'int' else 'numbers'} expected") from None
    if not low < high:
        raise bad(f"LO ({low}) must be below HI ({high})")
    if kind == "log" and low <= 0:
        raise bad("a log range needs LO > 0")
    if step and (step[0] < 1 or (high - low) % step[0]):
        raise bad(f"STEP must be a positive whole number that divides HI - LO ({high - low})")
    return Param(key, kind, low, high, step[0] if step else None)


def split_args(args: list[str]) -> tuple[list[Param], list[str]]:
    """The key=range arguments as Params (each key once), the rest as key=value overrides."""
    space, overrides = [], []
    for a in args:
        param = parse_param(a)
        if param is None:
            overrides.append(a)
        elif any(p.key == param.key for p in space):
            raise ConfigError(f"{a}: {param.key} is searched twice; give one range per key.")
        else:
            space.append(param)
    return space, overrides


def trial_config(base: Config, params: dict, folder: Path) -> Config:
    """`base` with a trial's values and its own output folder; validated as any config is (a bad value names its key)."""
    cfg = from_flat({**flat(to_dict(base)), **params})
    cfg.output.dir, cfg.hub.push = str(folder), False  # a trial never publishes
    return cfg


def check_space(base: Config, space: list[Param]) -> None:
    """Every end of every range gives a valid config: a range the run cannot take is refused before any training."""
    if not space:
        raise ConfigError("hftl tune: give at least one key=range to search, e.g. train.learning_rate=log:1e-5:1e-3 (`hftl tune --help`).")
    for p in space:
        for value in p.ends():
            try:
                trial_config(base, {p.key: value}, Path(base.output.dir))
            except ConfigError as e:
                raise ConfigError(f"{p.key}={p.spec()}: {value!r} is not a value it takes ({e})") from None


def open_storage(url: str):
    """An Optuna storage from --storage: an RDB URL (SQLAlchemy's form) or journal:PATH (a file, e.g. on shared storage)."""
    optuna = require_optuna()
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise ConfigError(f"--storage {url}: give an RDB URL (sqlite:///study.db, postgresql://user@host/db, ...) or journal:PATH.")
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # SQLAlchemy: a malformed URL, a missing database driver, a server that does not answer
        raise ConfigError(f"--storage {redact(url)}: cannot open it ({(str(e).strip().splitlines() or [type(e).__name__])[0]}).") from None


def redact(url: str) -> str:
    """The URL without its password, for reports and messages."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


@contextmanager
def reporting(listen):
    """`listen(entry, last)` hears every validation evaluation of the runs started inside the block."""
    from .train import EVALUATION_LISTENERS

    EVALUATION_LISTENERS.append(listen)
    try:
        yield
    finally:
        EVALUATION_LISTENERS.remove(listen)


def make_pruner(name: str):
    optuna = require_optuna()
    if name not in PRUNERS:
        raise ConfigError(f"--pruner {name}: choose one of {', '.join(PRUNERS)}.")
    return {"median": optuna.pruners.MedianPruner, "halving": optuna.pruners.SuccessiveHalvingPruner,
            "none": optuna.pruners.NopPruner}[name]()


def tune(base: Config, space: list[Param], trials: int, out: str | Path, study_name: str = "hftl", storage: str | None = None,
         pruner="median", sampler_seed: int | None = None, command: str = "hftl.tune.tune() from Python") -> dict:
    """Run `trials` trials of the study (joining it when it exists), then write the report, plots and best.yaml to `out`
    from every trial of the study; returns report.json's content. `pruner`: a name of PRUNERS or an Optuna pruner."""
    optuna = require_optuna()
    from .compare import train  # the one place hftl's own commands start a run
    from .train import NonFiniteLossError

    if trials < 1:
        raise ConfigError(f"--trials {trials}: give a positive number of trials for this worker.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("hftl tune runs its trials in one process; to use more processes or machines, start more `hftl tune` "
                          "workers with the same --study-name and --storage instead of launching one with several processes.")
    if base.data.validation_fraction == 0 and not (base.data.validation_file or base.data.name or base.data.data_dir):
        raise ConfigError(NO_VALIDATION)
    check_space(base, space)
    out = Path(out)
    storage = storage or f"journal:{out / 'study.journal'}"
    from .tasks import resolve_metrics

    base = resolve_metrics(base)  # what the config leaves to the task (read from the labels): the score's metric and direction
    metric, better = base.train.metric_for_best, base.train.greater_is_better
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=open_storage(storage), study_name=study_name, load_if_exists=True,
                                direction="maximize" if better else "minimize",
                                sampler=optuna.samplers.TPESampler(seed=sampler_seed),
                                pruner=make_pruner(pruner) if isinstance(pruner, str) else pruner)
    # What every worker of one study must share: the searched ranges and the score.
    signature = {"space": {p.key: p.spec() for p in space}, "metric": metric, "greater_is_better": better}
    if "hftl" not in study.user_attrs:
        study.set_user_attr("hftl", signature)
    elif study.user_attrs["hftl"] != signature:
        raise ConfigError(f"study '{study_name}' in {redact(storage)} searches {study.user_attrs['hftl']}, not {signature}; give "
                          "another --study-name, or the same ranges and train.metric_for_best.")
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial) -> float:
        folder = out / "trials" / f"trial-{trial.number:04d}"
        cfg = trial_config(base, {p.key: p.suggest(trial) for p in space}, folder)
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("folder", str(folder))
        trial.set_user_attr("config", json.loads(json.dumps(to_dict(cfg))))

        def listen(entry: dict, last: bool) -> None:
            trial.report(entry[f"eval_{metric}"], entry["step"])
            if not last and trial.should_prune():  # the last evaluation is the result: nothing left to save
                raise optuna.TrialPruned(f"{metric} {entry[f'eval_{metric}']:.4f} at step {entry['step']}")

        start = time.perf_counter()
        try:
            with reporting(listen):
                results = train(cfg)
        finally:
            trial.set_user_attr("seconds", time.perf_counter() - start)
        trial.set_user_attr("results", results)
        if "validation" not in results:
            raise ConfigError(NO_VALIDATION)
        return results["validation"][metric]

    # A trial whose loss went non-finite (too large a rate) is recorded as failed and the search goes on.
    study.optimize(objective, n_trials=trials, catch=(NonFiniteLossError,), gc_after_trial=True)
    return write_report(study, base, out, storage, command)


def write_report(study, base: Config, out: Path, storage: str, command: str) -> dict:
    optuna = require_optuna()
    state = optuna.trial.TrialState
    done = [t for t in study.trials if t.state == state.COMPLETE]
    metric = study.user_attrs["hftl"]["metric"]
    rows = [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
             "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
             **{k: t.user_attrs.get(k) for k in ("worker", "folder", "seconds", "results")}} for t in study.trials]
    report = {"command": command, "study": study.study_name, "storage": redact(storage), "metric": metric,
              "direction": study.direction.name.lower(), "space": study.user_attrs["hftl"]["space"],
              "counts": {s.name: sum(t.state == s for t in study.trials) for s in state if any(t.state == s for t in study.trials)},
              "trials": rows, "best": None, "plots": {}}
    out.mkdir(parents=True, exist_ok=True)
    if done:
        best = study.best_trial
        cfg = from_flat(flat(best.user_attrs["config"]))
        cfg.output.dir = str(out / "best")
        header = (f"# hftl tune: the best of {len(done)} finished trial(s) of study '{study.study_name}': trial {best.number}, "
                  f"validation {metric} {best.value:.4f}\n# with " + ", ".join(f"{k}={v}" for k, v in best.params.items())
                  + f"\n# (its model: {best.user_attrs['folder']}). Train it again: hftl train {out / 'best.yaml'}\n")
        _write(out / "best.yaml", header + to_yaml(cfg))
        report["best"] = {"number": best.number, "value": best.value, "params": best.params, "folder": best.user_attrs["folder"],
                          "results": best.user_attrs.get("results"), "preset": str(out / "best.yaml")}
    report["plots"] = _plots(study, out)
    _write(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    text = _markdown(report)
    _write(out / "report.md", text)
    print(text)
    return report


def _write(path: Path, text: str) -> None:
    """Whole or not at all: several workers may write the report of one study at once."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plots(study, out: Path) -> dict[str, str]:
    """optuna.visualization.matplotlib's figures as PNG files; {file: why not drawn} for those it cannot draw yet."""
    import matplotlib
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis
    from optuna.exceptions import ExperimentalWarning

    drawn = {}
    for png, draw in (("optimization_history.png", vis.plot_optimization_history),
                      ("param_importances.png", vis.plot_param_importances),
                      ("intermediate_values.png", vis.plot_intermediate_values)):
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        if png == "param_importances.png" and (len(complete) < 2 or all(len({repr(t.params.get(k)) for t in complete}) < 2
                                                                         for k in complete[0].params)):
            drawn[png] = "needs two finished trials with different values"
            continue
        if png == "intermediate_values.png" and not any(t.intermediate_values for t in study.trials):
            drawn[png] = "no trial reported an evaluation during training"
            continue
        # rc_context: Optuna switches matplotlib's global style; the pictures hftl draws afterwards keep theirs.
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore", ExperimentalWarning)
            fig = draw(study).figure
            tmp = out / f".{png}.{os.getpid()}.tmp.png"
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
            plt.close(fig)
        os.replace(tmp, out / png)
        drawn[png] = "drawn"
    return drawn


def _markdown(report: dict) -> str:
    metric = report["metric"]
    best = report["best"]
    lines = ["# hftl tune", "",
             f"Study `{report['study']}` ({report['storage']}): " + ", ".join(f"{n} {s.lower()}" for s, n in report["counts"].items())
             + f" trial(s); each scored by its validation {metric} ({report['direction']}), the best evaluation's.", "",
             "Searched: " + ", ".join(f"`{k}={v}`" for k, v in report["space"].items()) + ".", ""]
    if best:
        test = (best["results"] or {}).get("test")
        lines += [f"**Best: trial {best['number']}, validation {metric} {best['value']:.4f}** with "
                  + ", ".join(f"`{k}={_short(v)}`" for k, v in best["params"].items())
                  + (f"; its test {metric} {test[metric]:.4f} (not used to choose)" if test and metric in test else "")
                  + f". As a preset: `{best['preset']}` (`hftl train {best['preset']}`); its model: `{best['folder']}`.", ""]
    else:
        lines += ["No trial has finished yet: no best configuration.", ""]
    keys = list(report["space"])
    lines += ["| trial | state | " + " | ".join(keys) + f" | validation {metric} | evaluations | seconds | worker |",
              "|---|---|" + "---|" * len(keys) + "---|---|---|---|"]
    for t in report["trials"]:
        value = "" if t["value"] is None else f"{t['value']:.4f}"
        seconds = "" if t["seconds"] is None else f"{t['seconds']:.1f}"
        lines.append(f"| {t['number']} | {t['state'].lower()} | " + " | ".join(_short(t["params"].get(k, "")) for k in keys)
                     + f" | {value} | {len(t['intermediate'])} | {seconds} | {t['worker'] or ''} |")
    lines += ["", "## Plots", ""]
    for png, what in PNGS.items():
        lines.append(f"![{what}]({png})" if report["plots"].get(png) == "drawn" else f"- {what}: not drawn ({report['plots'].get(png)})")
    lines += ["", "## How this was made", "", f"```\n{report['command']}\n```", "",
              "Every trial is an ordinary `hftl train` run in its folder (model, card, results.json; a pruned trial stops "
              "before saving one); report.json has every trial's values and evaluations.", ""]
    return "\n".join(lines)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) and not math.isnan(value) else str(value)

