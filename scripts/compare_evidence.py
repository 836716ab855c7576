"""Real-data evidence for issue 18: do `hftl compare`'s verdicts change once scratch is fair and every mode has its own
learning rate, and does `hftl tune` beat a preset?

    .venv/bin/python scripts/pretrain_source.py image && .venv/bin/python scripts/pretrain_source.py speech   # once
    .venv/bin/python scripts/compare_evidence.py [--tasks digits speech sst2] [--seeds 0 1 2] [--sst2-per-class N]
    .venv/bin/python scripts/compare_evidence.py --smoke      # minutes: tiny random checkpoints, few steps, 2 trials

digits  the README's compare example (recipes/configs/image/vit_digits_full.yaml, the USPS-pretrained tiny ViT,
        --modes lora full lpft --labels-per-class 5 20), on the fixed splits of scripts/transfer_evidence.py (a test
        half of scikit-learn's digits, 5 per class for validation, budgets drawn from the rest) so that verdicts read
        rows nothing was chosen on.
speech  the README's speech transfer table (recipes/configs/audio/wav2vec2_fsdd_full.yaml, the wav2vec2 pretrained on
        three FSDD speakers, speaker nicolas; --modes head lora full --labels-per-class 5 20 all, 100 optimizer steps).
sst2    `hftl tune` on recipes/configs/text/minilm_sst2_lora.yaml: LoRA's rate, rank and epochs, 20 trials, chosen on
        10% of the training rows, against the preset itself trained once on the same rows; SST-2's validation split is
        the held-out test of both (accuracy, wall time). --sst2-per-class N trains both on N rows per label
        (data.samples_per_class) to bound the time; the output says which.

Each compare task runs twice, with the same seeds and data:
  as landed   compare before issue 18: the preset's learning rate for every mode, scratch keeping the preset's
              options (the speech preset's adapt.freeze_feature_encoder=true: a random waveform encoder kept frozen),
              judged by the landed guard (mean gain above the larger seed spread, or above one point with one seed);
  fair        today's compare: scratch with every weight trainable and no option that presumes pretrained weights,
              each (mode, budget) at its own rate chosen on validation (the preset's x 0.3, 1, 3, 10, widened once),
              judged by the paired t-interval over seeds (better / worse (negative transfer) / inconclusive).
The table also judges the landed runs with today's test, and today's fair scratch at the preset's rate (those runs
are part of the grid), so each change can be put down to the statistics, the baseline or the rates. The landed
protocol's transferred runs are the fair grid's runs at the preset's rate (the same configurations), copied, not
trained twice.

Writes scripts/results/compare_evidence.md (--smoke: outputs/compare_evidence_smoke/compare_evidence.md); the
compare report folders and the tune study are kept under outputs/compare_evidence[_smoke]/ and a rerun reuses
their finished runs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models, busy machine: see pretrain_source.py
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.chdir(ROOT)  # the presets' paths are relative to the repository root

import pretrain_source  # noqa: E402
import transfer_evidence  # noqa: E402
from transfer_evidence import PRETRAINED, image_splits, write_csv  # noqa: E402

TASKS = {
    "digits": {"preset": "recipes/configs/image/vit_digits_full.yaml", "modes": ["lora", "full", "lpft"], "budgets": ["5", "20"],
               "source": "vit-usps", "modality": "image", "what": "USPS-pretrained tiny ViT -> scikit-learn digits (the README's compare example)"},
    "speech": {"preset": "recipes/configs/audio/wav2vec2_fsdd_full.yaml", "modes": ["head", "lora", "full"], "budgets": ["5", "20", "all"],
               "source": "wav2vec2-fsdd3", "modality": "speech", "steps": 100,
               "what": "wav2vec2 pretrained on FSDD george, jackson, lucas -> speaker nicolas (the README's speech transfer table)"},
}
SST2_PRESET = "recipes/configs/text/minilm_sst2_lora.yaml"
SST2_SPACE = ["train.learning_rate=log:1e-4:3e-3", "adapt.lora_r=int:4:32:4", "train.epochs=choice:1,2,3"]
LANDED_HELPED, LANDED_NO_GAIN = "helped", "no gain (possible negative transfer)"


def landed_guard(transfer: list[float], scratch: list[float], greater_is_better: bool = True) -> str:
    """The guard as landed before issue 18 (hftl/compare.py at 42669ae): a gain only when the mean beats scratch's by
    more than the larger of the two standard deviations (with one seed: by more than one point)."""
    from hftl.compare import mean_sd

    t, s = mean_sd(transfer), mean_sd(scratch)
    margin = max(t["sd"], s["sd"]) if min(t["n"], s["n"]) > 1 else 0.01
    return LANDED_HELPED if (t["mean"] - s["mean"]) * (1 if greater_is_better else -1) > margin else LANDED_NO_GAIN


@contextlib.contextmanager
def landed_scratch():
    """compare's scratch as landed: model.from_scratch=true and full mode, every other option as the preset sets it."""
    import hftl.compare

    def scratch_config(base):
        cfg = copy.deepcopy(base)
        cfg.model.from_scratch, cfg.adapt.mode = True, "full"
        return cfg, ["model.from_scratch=true", "adapt.mode=full", "(as landed: the preset's other options kept)"]

    fair = hftl.compare.scratch_config
    hftl.compare.scratch_config = scratch_config
    try:
        yield
    finally:
        hftl.compare.scratch_config = fair


def quiet(log: Path):
    log.parent.mkdir(parents=True, exist_ok=True)
    stack = contextlib.ExitStack()
    f = stack.enter_context(open(log, "a"))
    stack.enter_context(contextlib.redirect_stdout(f))
    stack.enter_context(contextlib.redirect_stderr(f))
    return stack


def task_overrides(task: str, smoke: bool, out: Path) -> list[str]:
    spec = TASKS[task]
    if smoke:  # a random checkpoint of the architecture stands in for the pretrained one: the mechanics, not the verdicts
        model = out / "models" / f"{spec['source']}-random"
        if not (model / "config.json").is_file():
            pretrain_source.init_checkpoint(spec["modality"], model)
    else:
        model = PRETRAINED / spec["source"]
        if not (model / "config.json").is_file():
            sys.exit(f"{model} is missing: run `.venv/bin/python scripts/pretrain_source.py {spec['modality']}` first.")
    data = []
    if task == "digits":
        splits = image_splits()
        folder = out / "data" / "digits"
        data = ["data.builtin=null", "data.image_column=path", "data.label_column=label",
                *(f"data.{k}_file={write_csv(folder / f'{name}.csv', splits[name])}"
                  for k, name in (("train", "pool"), ("validation", "validation"), ("test", "test")))]
    else:  # nicolas's lists in outputs/pretrained/fsdd-splits (pretrain_source writes them: cheap); the preset names no data
        data = pretrain_source.fsdd_data("target")
    steps = [f"train.max_steps={10 if smoke else spec['steps']}"] if smoke or "steps" in spec else []
    return [f"model.name_or_path={model}", *data, *steps, "output.verify_reload=16"]


def run_compare(task: str, args, out: Path) -> dict:
    """Both protocols of one task; returns their report.json contents."""
    from hftl.compare import compare
    from hftl.config import load_config

    spec = TASKS[task]
    modes = ["lora"] if args.smoke else spec["modes"]
    budgets = ["5"] if args.smoke else spec["budgets"]
    base = load_config(spec["preset"], task_overrides(task, args.smoke, out))
    reports, seconds = {}, {}
    fair_dir, landed_dir = out / task / "fair", out / task / "as_landed"
    start = time.perf_counter()
    with quiet(out / task / "fair.log"):
        reports["fair"] = compare(base, modes, args.seeds, budgets, fair_dir, command=f"scripts/compare_evidence.py {task}: fair",
                                  lr_scales=args.lr_scales)
    seconds["fair"] = time.perf_counter() - start
    # The landed protocol's transferred runs have the fair grid's configurations at the preset's rate: reuse them.
    rate = f"lr{base.train.learning_rate:g}-"
    for run in (fair_dir / "runs").glob(f"*-{rate}s*"):
        if not run.name.startswith("scratch-") and (run / "results.json").is_file() and not (landed_dir / "runs" / run.name).exists():
            shutil.copytree(run, landed_dir / "runs" / run.name)
    start = time.perf_counter()
    with quiet(out / task / "as_landed.log"), landed_scratch():
        reports["as_landed"] = compare(base, modes, args.seeds, budgets, landed_dir,
                                       command=f"scripts/compare_evidence.py {task}: as landed", lr_scales=[1])
    seconds["as_landed"] = time.perf_counter() - start
    return {"reports": reports, "seconds": seconds, "base_lr": base.train.learning_rate, "modes": modes, "budgets": budgets}


def scores(report: dict, mode: str, budget: str, lr: float | None = None) -> list[float]:
    """The verdict split's metric per seed (seed order) of mode at budget: its chosen runs, or its runs at rate `lr`."""
    split, metric = report["verdict_split"], report["metric"]
    out = []
    for seed in report["groups"][0]["seeds"]:
        runs = [r for r in report["runs"] if (r["mode"], r["budget"], r["seed"]) == (mode, budget, seed)
                and (r["chosen"] if lr is None else r["learning_rate"] == lr)]
        out.append(None if not runs or runs[0]["diverged"] else runs[0]["results"][split][metric])
    return out


def compare_section(task: str, got: dict) -> tuple[list[str], int, int]:
    from hftl.compare import SCRATCH, verdict

    fair, landed = got["reports"]["fair"], got["reports"]["as_landed"]
    split, metric = fair["verdict_split"], fair["metric"]

    def pct(values):
        return f"{100 * statistics.fmean(values):.1f}" if values and None not in values else "-"

    lines = ["| mode | labels/class | as landed: transfer vs scratch | landed guard | landed runs, today's test | fair scratch at the "
             "preset rate: transfer vs scratch, today's test | fair (today's compare): rate, transfer vs scratch, verdict | "
             "changed |", "|---|---|---|---|---|---|---|---|"]
    changed = total = 0
    for g in fair["groups"]:
        mode, budget = g["mode"], g["budget"]
        if mode == SCRATCH:
            continue
        lt, ls = scores(landed, mode, budget), scores(landed, SCRATCH, budget)
        old = landed_guard(lt, ls, landed["greater_is_better"])
        old_test = verdict(lt, ls, landed["greater_is_better"])["verdict"]
        pt, ps = scores(fair, mode, budget, got["base_lr"]), scores(fair, SCRATCH, budget, got["base_lr"])
        preset = verdict(pt, ps, fair["greater_is_better"])["verdict"] if None not in pt + ps else "diverged"
        new = g["verdict"]["verdict"]
        rate = "solved" if g["lr_search"]["how"] == "solved" else f"{g['learning_rate']:g}"
        # A landed "helped" stays "better"; its "no gain" is either of the other two.
        same = (old == LANDED_HELPED) == (new == "better")
        changed, total = changed + (not same), total + 1
        scratch_rate = next(x["learning_rate"] for x in fair["groups"] if (x["mode"], x["budget"]) == (SCRATCH, budget))
        lines.append(f"| {mode} | {budget} | {pct(lt)} vs {pct(ls)} | {old} | {old_test} | {pct(pt)} vs {pct(ps)}, {preset} | "
                     f"{rate} (scratch {scratch_rate:g}): {pct(scores(fair, mode, budget))} vs {pct(scores(fair, SCRATCH, budget))}, "
                     f"**{new}** | {'no' if same else '**yes**'} |")
    head = [f"### {task}: {TASKS[task]['what']}", "",
            f"{split} {metric} (%), mean over seeds {', '.join(map(str, fair['groups'][0]['seeds']))}; as landed "
            f"{got['seconds']['as_landed']:.0f} s, fair {got['seconds']['fair']:.0f} s (runs reused from an earlier invocation "
            f"count as 0). Fair scratch ran with {', '.join(f'`{c}`' for c in fair['scratch'])}. Report folders: "
            f"`outputs/compare_evidence*/{task}/fair`, `.../as_landed`.", ""]
    return head + lines + ["", f"{changed} of {total} verdicts changed (a landed 'helped' that is not 'better' now, or a landed "
                           "'no gain' that is 'better' now).", ""], changed, total


def run_sst2(args, out: Path) -> list[str]:
    from hftl.cli import main as hftl

    data = Path(args.data) / "text" / "sst2"
    # Trials are chosen on 10% of the training rows (carved with the preset's seed: the same rows for every trial) and
    # SST-2's validation split is held out as the test split, which neither the preset nor any trial was chosen on.
    fixed = [f"data.train_file={data / 'train.csv'}", "data.validation_file=null", f"data.test_file={data / 'validation.csv'}",
             "train.evals_per_epoch=2"]
    if args.sst2_per_class:  # bounds the time: the preset and every trial train on the same rows per label
        fixed.append(f"data.samples_per_class={args.sst2_per_class}")
    if args.smoke:
        fixed += ["data.max_train_samples=200", "data.max_eval_samples=100", "train.min_steps=null", "output.verify_reload=8",
                  "train.epochs=1"]
    trials = 2 if args.smoke else args.trials
    space = SST2_SPACE[:2] if args.smoke else SST2_SPACE
    # Runs on other rows per label keep folders of their own, so a rerun never reads one setting's runs as another's.
    suffix = f"-{args.sst2_per_class}-per-class" if args.sst2_per_class else ""
    preset_dir = out / "sst2" / f"preset{suffix}"
    start = time.perf_counter()
    if not (preset_dir / "results.json").is_file():
        with quiet(out / "sst2" / "preset.log"):
            rc = hftl(["train", SST2_PRESET, *fixed, f"output.dir={preset_dir}"])
        if rc:
            sys.exit(f"the preset run failed; see {out / 'sst2' / 'preset.log'}")
    preset_s = time.perf_counter() - start
    preset = json.loads((preset_dir / "results.json").read_text())
    tune_dir = out / "sst2" / f"tune{suffix}"
    # The study is kept in tune_dir: a rerun (after an interruption) runs only the trials it still lacks.
    done = sum(json.loads((tune_dir / "report.json").read_text())["counts"].values()) if (tune_dir / "report.json").is_file() else 0
    argv = ["tune", SST2_PRESET, "--trials", str(trials), "--study-name", "sst2-lora", "--out", str(tune_dir), *fixed, *space]
    start = time.perf_counter()
    if done < trials:
        with quiet(out / "sst2" / "tune.log"):
            rc = hftl([*argv[:2], "--trials", str(trials - done), *argv[4:]])
        if rc:
            sys.exit(f"hftl tune failed; see {out / 'sst2' / 'tune.log'}")
    tune_s = time.perf_counter() - start
    report = json.loads((tune_dir / "report.json").read_text())
    best, base = report["best"], preset["results"]
    trial_s = sum(t["seconds"] or 0 for t in report["trials"])
    return [f"### sst2: `hftl tune` on {SST2_PRESET}", "",
            f"`hftl {' '.join(argv).replace(str(ROOT) + '/', '').replace(str(ROOT.parent) + '/', '../')}`", "",
            "Validation: 10% of SST-2's training rows, carved with the preset's seed (the same rows for every trial), what the "
            "trials were chosen on; test: SST-2's own validation split (872 sentences), which nothing was chosen on. Training rows: "
            + (f"{args.sst2_per_class} per label (data.samples_per_class, to bound the time), for the preset and every trial."
               if args.sst2_per_class else "the other 90% (no data.samples_per_class).")
            + (" Smoke: data.max_train_samples=200, data.max_eval_samples=100, 1 epoch." if args.smoke else ""), "",
            "| | validation accuracy (chosen on) | test accuracy (held out) | wall s |", "|---|---|---|---|",
            f"| the preset (`hftl train {SST2_PRESET}`) | {100 * base['validation']['accuracy']:.2f} | {100 * base['test']['accuracy']:.2f} | "
            f"{preset_s:.0f} (training {preset['train_seconds']:.0f}) |",
            f"| best of {sum(report['counts'].values())} trials ({', '.join(f'{n} {s.lower()}' for s, n in report['counts'].items())}): trial "
            f"{best['number']}, " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
            + f" | {100 * best['value']:.2f} | {100 * best['results']['test']['accuracy']:.2f} | {tune_s:.0f} this invocation; "
            f"{trial_s:.0f} in all trials |", "",
            f"Beats the preset's validation accuracy: **{'yes' if best['value'] > base['validation']['accuracy'] else 'no'}** "
            f"({100 * (best['value'] - base['validation']['accuracy']):+.2f} points; optimistic, since the best was picked on it); "
            f"on the held-out test split: {100 * (best['results']['test']['accuracy'] - base['test']['accuracy']):+.2f} points. "
            f"Report, plots and best.yaml: `{tune_dir.relative_to(ROOT)}`.", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=[*TASKS, "sst2"], choices=[*TASKS, "sst2"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--lr-scales", nargs="+", type=float, default=[0.3, 1, 3, 10])
    ap.add_argument("--trials", type=int, default=20, help="sst2: tune trials (default 20)")
    ap.add_argument("--sst2-per-class", type=int, metavar="N",
                    help="sst2: train the preset and every trial on N rows per label (data.samples_per_class) to bound the "
                         "time; default: every training row")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder (default ../shared/data)")
    ap.add_argument("--smoke", action="store_true", help="minutes: tiny random checkpoints, one mode, one budget, 10 steps, 2 trials")
    ap.add_argument("--out", help="the markdown file (default scripts/results/compare_evidence.md; --smoke: under outputs/)")
    args = ap.parse_args()
    if args.smoke and args.seeds == [0, 1, 2]:
        args.seeds = [0, 1]
    out = ROOT / "outputs" / ("compare_evidence_smoke" if args.smoke else "compare_evidence")
    # The FSDD file lists point into the shared data folder.
    pretrain_source.FSDD = Path(args.data) / "speech" / "fsdd"
    transfer_evidence.OUT = out / "evidence"  # where image_splits() writes the digits PNGs
    started, sections, changed, total = time.perf_counter(), [], 0, 0
    for task in args.tasks:
        if task == "sst2":
            sections += run_sst2(args, out)
        else:
            got = run_compare(task, args, out)
            lines, c, t = compare_section(task, got)
            sections += lines
            changed, total = changed + c, total + t
        print(f"{task}: done ({time.perf_counter() - started:.0f} s so far)", flush=True)
    command = " ".join([".venv/bin/python scripts/compare_evidence.py", *sys.argv[1:]])
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, {os.environ['OMP_NUM_THREADS']} thread(s)"
    text = "\n".join([
        "## Comparisons that cannot mislead (issue 18)" + (" — SMOKE RUN: random checkpoints, 10 steps; the verdicts mean nothing" if args.smoke else ""), "",
        f"Command: `{command}` ({time.perf_counter() - started:.0f} s on {machine}).", "",
        *([f"Across the compare tasks, {changed} of {total} verdicts changed.", ""] if total else []),
        *sections])
    path = Path(args.out) if args.out else (out / "compare_evidence.md" if args.smoke else ROOT / "scripts" / "results" / "compare_evidence.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
