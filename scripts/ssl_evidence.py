"""Real-data evidence for unsupervised transfer: does continued self-supervised pretraining on the target's unlabelled
inputs help fine-tuning, and how does a source checkpoint pretrained without labels compare with a supervised one?

    .venv/bin/python scripts/pretrain_source.py image && .venv/bin/python scripts/pretrain_source.py speech
    .venv/bin/python scripts/pretrain_source.py image --self-supervised && .venv/bin/python scripts/pretrain_source.py speech --self-supervised
    .venv/bin/python scripts/ssl_evidence.py [--tasks image speech] [--budgets 5 20 all] [--seeds 0 1 2] [--methods ...]

The tasks, splits and label budgets are scripts/transfer_evidence.py's: speech, the tiny wav2vec2 of the three source
FSDD speakers -> the held-apart speaker nicolas (test takes 0-14, validation 15-19, pool 20-49); images, the tiny
USPS ViT -> scikit-learn's digits (test half, 5 per class validation, the rest the pool). For every budget (labels
per class drawn from the pool, or all of it) and seed, each method fine-tunes in full (the presets
recipes/configs/{audio/wav2vec2_fsdd,image/vit_digits}_full.yaml) for the same number of optimizer steps, the best
per-epoch evaluation on validation kept, and is scored on the test split:

    scratch           the architecture randomly initialised
    supervised        the supervised source checkpoint (pretrain_source.py), fine-tuned directly
    supervised+ssl    the same after continued self-supervised pretraining (adapt.pretrain=auto: wav2vec2's masked
                      contrastive loss / SimMIM) on the target's unlabelled pool: every pool input, none of its labels
    supervised+coral  the supervised source with domain alignment (adapt.align=coral, data.target = the unlabelled pool)
    supervised+mmd    the same with adapt.align=mmd
    unsupervised      the source checkpoint pretrained without labels (pretrain_source.py --self-supervised)
    unsupervised+ssl  that one after continued self-supervised pretraining on the target's pool

The self-supervised stage depends on the seed but not on the label budget, so it runs once per (task, checkpoint,
seed), as `hftl train` runs it, and each budget fine-tunes from its folder. Results are kept in
outputs/ssl_evidence/results.json (a rerun skips what is there; --fresh redoes all); the table goes to
scripts/results/ssl_evidence.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.chdir(ROOT)

from pretrain_source import self_supervised  # noqa: E402
from transfer_evidence import PRETRAINED, budget_subset, image_splits, speech_splits, write_csv  # noqa: E402

OUT = ROOT / "outputs" / "ssl_evidence"
# method -> (starting checkpoint, continued self-supervised stage first, overrides of the fine-tuning run)
METHODS = {
    "scratch": ("init", False, []),
    "supervised": ("source", False, []),
    "supervised+ssl": ("source", True, []),
    "supervised+coral": ("source", False, ["adapt.align=coral"]),
    "supervised+mmd": ("source", False, ["adapt.align=mmd"]),
    "unsupervised": ("unsupervised", False, []),
    "unsupervised+ssl": ("unsupervised", True, []),
}
TASKS = {
    "speech": {"preset": "recipes/configs/audio/wav2vec2_fsdd_full.yaml", "task": "audio-classification", "column": "audio_column",
               "init": "wav2vec2-tiny-init", "source": "wav2vec2-fsdd3", "unsupervised": "wav2vec2-fsdd3-ssl", "steps": 100,
               # The pool: 300 clips, 19 batches of 16 an epoch.
               "stage": ["adapt.pretrain_epochs=5", "adapt.pretrain_learning_rate=5e-4", "train.batch_size=16", "data.max_duration=1.0"],
               "what": "tiny wav2vec2, FSDD speakers george, jackson, lucas -> nicolas"},
    "image": {"preset": "recipes/configs/image/vit_digits_full.yaml", "task": "image-classification", "column": "image_column",
              "init": "vit-tiny-init", "source": "vit-usps", "unsupervised": "vit-usps-ssl", "steps": 150,
              # The pool: about 850 images, 27 batches of 32 an epoch.
              "stage": ["adapt.pretrain_epochs=5", "adapt.pretrain_learning_rate=1e-3", "train.batch_size=32"],
              "what": "tiny ViT, USPS -> scikit-learn digits"},
}


def quiet(log: Path, run):
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return run()


def stage(task: str, start: str, pool: Path, seed: int, extra: list[str]) -> tuple[Path, dict]:
    """The self-supervised stage on the target's unlabelled pool, once per (task, starting checkpoint, seed)."""
    spec = TASKS[task]
    out = OUT / "runs" / task / f"stage-{start}-seed{seed}"
    folder = Path(f"{out}.pretrained")
    if not (folder / "pretrain.json").is_file():
        quiet(out.parent / f"{out.name}.log", lambda: self_supervised(
            spec["task"], PRETRAINED / spec[start], pool, out, [*spec["stage"], f"train.seed={seed}", *extra]))
    return folder, json.loads((folder / "pretrain.json").read_text())


def run_one(task: str, method: str, budget: str, seed: int, files: dict[str, Path], steps: int, stage_extra: list[str]) -> dict:
    from hftl import recipe
    from hftl.config import load_config

    spec = TASKS[task]
    start, ssl, extra = METHODS[method]
    model, info = PRETRAINED / spec[start], None
    if ssl:
        model, info = stage(task, start, files["pool"], seed, stage_extra)
    out = OUT / "runs" / task / f"{method}-{budget}-seed{seed}"
    overrides = [
        f"model.name_or_path={model}", "data.builtin=null",
        f"data.train_file={files['train']}", f"data.validation_file={files['validation']}", f"data.test_file={files['test']}",
        f"data.{spec['column']}=path", "data.label_column=label", f"train.seed={seed}", f"train.max_steps={steps}",
        f"output.dir={out}", "output.overwrite=true", "output.verify_reload=16", "adapt.solve_head=false", *extra,
        *([f"data.target={files['pool']}"] if "adapt.align" in " ".join(extra) else []),
    ]
    if task == "speech" and start == "init":  # a random waveform encoder must learn too (as transfer_evidence.py)
        overrides.append("adapt.freeze_feature_encoder=false")
    cfg = load_config(spec["preset"], overrides)
    started = time.perf_counter()
    results = quiet(out.parent / f"{out.name}.log", lambda: recipe.train(cfg))
    return {"accuracy": results["test"]["accuracy"], "validation_accuracy": results["validation"]["accuracy"],
            "seconds": time.perf_counter() - started, "stage": info}


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def recorded(task: str, results: dict) -> str:
    """The runs' own seconds, kept in results.json when they ran (a rerun that reuses them takes none)."""
    runs = [r for k, r in results.items() if k.startswith(f"{task}/")]
    if not runs:
        return "none"
    seconds = [r["seconds"] for r in runs]
    return f"{len(runs)} runs, {sum(seconds):.0f} s in all, {min(seconds):.0f}-{max(seconds):.0f} s each"


# Each question the evidence asks, as (method, the method it is measured against).
CONTRASTS = [
    ("supervised+ssl", "supervised", "continued self-supervised pretraining on the target pool, supervised source"),
    ("unsupervised+ssl", "unsupervised", "the same stage, unsupervised source"),
    ("supervised+coral", "supervised", "CORAL alignment to the target pool"),
    ("supervised+mmd", "supervised", "MMD alignment to the target pool"),
    ("unsupervised", "scratch", "the unsupervised source against scratch"),
    ("supervised", "unsupervised", "the supervised source against the unsupervised one"),
]


def contrasts(task: str, results: dict, budgets: list[str], seeds: list[int], methods: list[str]) -> list[str]:
    """Where each arm helped: its test accuracy minus its reference's, paired by seed (the same training rows and
    fine-tuning seed), judged by hftl compare's test (the 95% t-interval of the mean gain: better / worse /
    inconclusive)."""
    from hftl.compare import WORSE, verdict

    lines = ["| question | " + " | ".join(f"{b} labels per class" if b != "all" else "all labels" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for arm, reference, what in CONTRASTS:
        if arm not in methods or reference not in methods:
            continue
        cells = []
        for budget in budgets:
            pairs = [(results[a], results[r]) for s in seeds
                     if (a := f"{task}/{arm}/{budget}/{s}") in results and (r := f"{task}/{reference}/{budget}/{s}") in results]
            if not pairs:
                cells.append("-")
                continue
            v = verdict([100 * a["accuracy"] for a, _ in pairs], [100 * r["accuracy"] for _, r in pairs])
            interval = f" [{v['low']:+.1f}, {v['high']:+.1f}]" if v["low"] is not None else ""
            cells.append(f"{v['gain']:+.1f}{interval} {'worse' if v['verdict'] == WORSE else v['verdict']}")
        lines.append(f"| {what} ({arm} − {reference}) | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--budgets", nargs="+", default=["5", "20", "all"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps", type=int, help="fine-tuning optimizer steps per run (default: image 150, speech 100)")
    ap.add_argument("--stage", nargs="*", default=[], help="key=value overrides of the self-supervised stage, e.g. "
                    "adapt.pretrain_epochs=1 (a smoke run)")
    ap.add_argument("--fresh", action="store_true", help="redo runs already in outputs/ssl_evidence/results.json")
    ap.add_argument("--out", default=str(ROOT / "scripts" / "results" / "ssl_evidence.md"))
    args = ap.parse_args()
    for task in args.tasks:
        for start in {METHODS[m][0] for m in args.methods}:
            if not (PRETRAINED / TASKS[task][start] / "config.json").is_file():
                flag = " --self-supervised" if start == "unsupervised" else ""
                sys.exit(f"{PRETRAINED / TASKS[task][start]} is missing: run `.venv/bin/python scripts/pretrain_source.py "
                         f"{task}{flag}` first.")

    store = OUT / "results.json"
    results = {} if args.fresh or not store.exists() else json.loads(store.read_text())
    if args.fresh and (OUT / "runs").exists():  # the stages' folders too
        import shutil

        shutil.rmtree(OUT / "runs")
    sections, started = [], time.perf_counter()
    for task in args.tasks:
        splits = image_splits() if task == "image" else speech_splits()
        steps = args.steps or TASKS[task]["steps"]
        data = OUT / "data" / task
        fixed = {name: write_csv(data / f"{name}.csv", splits[name]) for name in ("validation", "test", "pool")}
        task_start = time.perf_counter()
        for seed in args.seeds:
            for budget in args.budgets:
                train = write_csv(data / f"train-{budget}-seed{seed}.csv", budget_subset(splits["pool"], budget, seed))
                for method in args.methods:
                    key = f"{task}/{method}/{budget}/{seed}"
                    if key not in results:
                        results[key] = run_one(task, method, budget, seed, {"train": train, **fixed}, steps, args.stage)
                        store.parent.mkdir(parents=True, exist_ok=True)
                        tmp = store.with_suffix(f".{os.getpid()}.tmp")
                        # Another instance (--tasks speech beside --tasks image) may have stored its runs meanwhile.
                        on_disk = json.loads(store.read_text()) if store.exists() and not args.fresh else {}
                        results = {**on_disk, **results}
                        tmp.write_text(json.dumps(results, indent=1))
                        tmp.replace(store)
                    r = results[key]
                    print(f"{key}: test accuracy {100 * r['accuracy']:.1f}% ({r['seconds']:.0f} s)", flush=True)
        per_class = len(splits["pool"]) // len({r["label"] for r in splits["pool"]})
        lines = ["| labels per class | " + " | ".join(args.methods) + " |", "|---|" + "---|" * len(args.methods)]
        for budget in args.budgets:
            accs = {m: [100 * results[k]["accuracy"] for s in args.seeds if (k := f"{task}/{m}/{budget}/{s}") in results]
                    for m in args.methods}
            lines.append(f"| {f'all ({per_class})' if budget == 'all' else budget} | " + " | ".join(cell(accs[m]) for m in args.methods) + " |")
        stages = [r["stage"] for k, r in results.items() if k.startswith(f"{task}/") and r.get("stage")]
        seen = {(s["settings"]["base"], s["settings"]["seed"]): s for s in stages}.values()
        sections += [f"### {task}: {TASKS[task]['what']}", "",
                     f"Test accuracy (%) on {len(splits['test'])} held-out examples, mean ± standard deviation over seeds "
                     f"{', '.join(map(str, args.seeds))}; {steps} fine-tuning steps per run, best of the per-epoch evaluations "
                     f"on a validation split of {len(splits['validation'])}. Fine-tuning runs' seconds as recorded when they ran "
                     f"(the stages' own are listed below): {recorded(task, results)}; new runs now: "
                     f"{time.perf_counter() - task_start:.0f} s.", "", *lines, "",
                     "Gain in test accuracy points, mean over seeds paired by seed, with its 95% confidence interval and "
                     "hftl compare's verdict (better / worse / inconclusive; no verdict from one seed):", "",
                     *contrasts(task, results, args.budgets, args.seeds, args.methods), ""]
        if seen:
            sections += ["Self-supervised stages on the target pool (held-out loss before -> after, steps):", "",
                         *[f"- from {Path(s['settings']['base']).name}, seed {s['settings']['seed']}: {s['objective']} "
                           f"{s['heldout_loss_before']:.4f} -> {s['heldout_loss_after']:.4f}, {s['steps']} steps, {s['seconds']:.0f} s"
                           for s in seen], ""]
    command = " ".join([".venv/bin/python scripts/ssl_evidence.py", *sys.argv[1:]])
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, {os.environ['OMP_NUM_THREADS']} thread(s) per run"
    text = "\n".join(["## Unsupervised transfer: continued self-supervised pretraining, unsupervised vs supervised source", "",
                      f"Command: `{command}` ({time.perf_counter() - started:.0f} s of new runs on {machine}; runs found in "
                      "outputs/ssl_evidence/results.json are reused).", "", *sections])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
