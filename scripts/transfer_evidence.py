"""Real-data evidence for transfer: training from scratch vs head vs lora vs full, at several label budgets.

    .venv/bin/python scripts/pretrain_source.py image       # once: the source checkpoints
    .venv/bin/python scripts/pretrain_source.py speech
    .venv/bin/python scripts/transfer_evidence.py [--tasks image speech] [--budgets 5 20 all] [--seeds 0 1 2]

image:  the USPS-pretrained tiny ViT (outputs/pretrained/vit-usps) -> scikit-learn's bundled handwritten
        digits (load_digits: other writers, another scanner, 8x8 instead of 16x16). Fixed splits, drawn
        once (seed 1234, stratified): test = half of the 1,797 images, validation = 5 per class, and the
        rest is the pool that training subsets are drawn from (about 85 per class).
speech: the tiny wav2vec2 pretrained on FSDD speakers george, jackson, lucas (outputs/pretrained/
        wav2vec2-fsdd3) -> the held-apart speaker nicolas: test = takes 0-14 (150 clips), validation =
        takes 15-19 (5 per class), pool = takes 20-49 (30 per class).

For every budget (labels per class, or all of the pool) and seed, a class-balanced training subset is
drawn from the pool with that seed. Every method is an ordinary hftl run through its recipe, from the
presets recipes/configs/{image/vit_digits,audio/wav2vec2_fsdd}_<mode>.yaml, with the same number of
optimizer steps (--steps) whatever the budget; the validation split picks the best evaluation (once
per epoch) and the table reports accuracy on the test split:

    scratch  the same architecture randomly initialised (outputs/pretrained/<arch>-tiny-init), mode full
    head     the source checkpoint, backbone frozen, new head trained
    lora     the source checkpoint, LoRA adapters + new head
    full     the source checkpoint, every parameter

Writes scripts/results/transfer_evidence.md (the table, with this command) and keeps every run's
result in outputs/evidence/results.json; a rerun skips the runs found there (--fresh: redo all).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from a second thread, and on a busy machine OpenMP threads that wait for
# each other make a step up to 10x slower. Set OMP_NUM_THREADS to change.
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the presets' paths are relative to the repository root

OUT = ROOT / "outputs" / "evidence"
PRETRAINED = ROOT / "outputs" / "pretrained"
METHODS = {"scratch": "full", "head": "head", "lora": "lora", "full": "full"}  # method -> adaptation mode
TASKS = {
    "image": {"preset": "recipes/configs/image/vit_digits_{mode}.yaml", "source": "vit-usps", "init": "vit-tiny-init",
              "column": "image_column", "steps": 150, "what": "USPS-pretrained tiny ViT -> scikit-learn digits"},
    "speech": {"preset": "recipes/configs/audio/wav2vec2_fsdd_{mode}.yaml", "source": "wav2vec2-fsdd3", "init": "wav2vec2-tiny-init",
               "column": "audio_column", "steps": 100, "what": "wav2vec2 pretrained on FSDD speakers george, jackson, lucas -> speaker nicolas"},
}


def write_csv(path: Path, rows: list[dict], columns=("path", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Aside, then renamed: instances of the evidence scripts run side by side (one per core) and rewrite the same
    # split files, which another's run may be reading.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({c: r[c] for c in columns} for r in rows)
    tmp.replace(path)
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def image_splits() -> dict[str, list[dict]]:
    """scikit-learn's digits as PNG files under outputs/evidence/digits, split once (seed 1234)."""
    from hftl.config import DataConfig
    from hftl.data.builtin import sklearn_digits

    folder = OUT / "digits"
    ds = sklearn_digits(DataConfig())["train"]
    rows = []
    for i, row in enumerate(ds):
        path = folder / f"{i:04d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            row["image"].save(path)
        rows.append({"path": str(path), "label": str(row["label"])})
    rng = random.Random(1234)
    splits = {"test": [], "validation": [], "pool": []}
    for label in sorted({r["label"] for r in rows}):
        members = [r for r in rows if r["label"] == label]
        rng.shuffle(members)
        half = len(members) // 2
        splits["test"] += members[:half]
        splits["validation"] += members[half:half + 5]
        splits["pool"] += members[half + 5:]
    return splits


def speech_splits() -> dict[str, list[dict]]:
    folder = PRETRAINED / "fsdd-splits"
    return {name: read_csv(folder / f"target_{name}.csv") for name in ("test", "validation", "pool")}


def budget_subset(pool: list[dict], budget: str, seed: int) -> list[dict]:
    if budget == "all":
        return list(pool)
    rng = random.Random(seed)
    out = []
    for label in sorted({r["label"] for r in pool}):
        members = [r for r in pool if r["label"] == label]
        out += rng.sample(members, min(int(budget), len(members)))
    return out


def run_one(task: str, method: str, budget: str, seed: int, files: dict[str, Path], steps: int) -> dict:
    from hftl import recipe
    from hftl.config import load_config

    spec = TASKS[task]
    mode = METHODS[method]
    out = OUT / "runs" / task / f"{method}-{budget}-seed{seed}"
    overrides = [
        f"model.name_or_path={PRETRAINED / spec['init' if method == 'scratch' else 'source']}",
        "data.builtin=null",
        f"data.train_file={files['train']}", f"data.validation_file={files['validation']}", f"data.test_file={files['test']}",
        f"data.{spec['column']}=path", "data.label_column=label",
        f"train.seed={seed}", f"train.max_steps={steps}",
        f"output.dir={out}", "output.overwrite=true", "output.verify_reload=16",
        # The method the committed tables measured: the head trained by AdamW, not solved (scripts/bench_fewshot.py
        # compares the solved head).
        "adapt.solve_head=false",
    ]
    if task == "speech" and method == "scratch":  # a random waveform encoder must learn too
        overrides.append("adapt.freeze_feature_encoder=false")
    cfg = load_config(spec["preset"].format(mode=mode), overrides)
    log = out.parent / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        results = recipe.train(cfg)
    info = json.loads((out / "results.json").read_text())
    return {"accuracy": results["test"]["accuracy"], "validation_accuracy": results["validation"]["accuracy"],
            "trainable_params": info["trainable_params"], "total_params": info["total_params"],
            "seconds": time.perf_counter() - start, "train_examples": len(read_csv(files["train"]))}


def table(task: str, results: dict, budgets: list[str], seeds: list[int], pool: int) -> list[str]:
    lines = ["| labels per class | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for budget in budgets:
        cells = []
        for method in METHODS:
            accs = [results[f"{task}/{method}/{budget}/{s}"]["accuracy"] * 100 for s in seeds if f"{task}/{method}/{budget}/{s}" in results]
            if not accs:
                cells.append("-")
                continue
            spread = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
            cells.append(f"{statistics.mean(accs):.1f}{spread}")
        label = f"all ({pool})" if budget == "all" else budget
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    params = {m: next((r for k, r in results.items() if k.startswith(f"{task}/{m}/")), None) for m in METHODS}
    lines += ["", "Trainable parameters: " + ", ".join(
        f"{m} {p['trainable_params']:,} of {p['total_params']:,}" for m, p in params.items() if p) + "."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--budgets", nargs="+", default=["5", "20", "all"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default: image 150, speech 100)")
    ap.add_argument("--fresh", action="store_true", help="redo runs already in outputs/evidence/results.json")
    ap.add_argument("--out", default=str(ROOT / "scripts" / "results" / "transfer_evidence.md"))
    args = ap.parse_args()
    for task in args.tasks:
        for key in ("source", "init"):
            if not (PRETRAINED / TASKS[task][key] / "config.json").is_file():
                sys.exit(f"{PRETRAINED / TASKS[task][key]} is missing: run `.venv/bin/python scripts/pretrain_source.py "
                         f"{task}` first (it writes the source and from-config checkpoints).")

    store = OUT / "results.json"
    results = {} if args.fresh or not store.exists() else json.loads(store.read_text())
    sections, started = [], time.perf_counter()
    for task in args.tasks:
        splits = image_splits() if task == "image" else speech_splits()
        steps = args.steps or TASKS[task]["steps"]
        data = OUT / "data" / task
        fixed = {name: write_csv(data / f"{name}.csv", splits[name]) for name in ("validation", "test")}
        task_start = time.perf_counter()
        for budget in args.budgets:
            for seed in args.seeds:
                train = write_csv(data / f"train-{budget}-seed{seed}.csv", budget_subset(splits["pool"], budget, seed))
                for method in args.methods:
                    key = f"{task}/{method}/{budget}/{seed}"
                    if key not in results:
                        results[key] = run_one(task, method, budget, seed, {"train": train, **fixed}, steps)
                        store.write_text(json.dumps(results, indent=1))
                    r = results[key]
                    print(f"{key}: test accuracy {100 * r['accuracy']:.1f}% ({r['train_examples']} training examples, {r['seconds']:.0f} s)", flush=True)
        per_class = len(splits["pool"]) // len({r["label"] for r in splits["pool"]})
        source = json.loads((PRETRAINED / f"{TASKS[task]['source']}-source" / "results.json").read_text()) \
            if (PRETRAINED / f"{TASKS[task]['source']}-source" / "results.json").exists() else None
        sections += [f"### {task}: {TASKS[task]['what']}", "",
                     f"Test accuracy (%) on {len(splits['test'])} held-out examples, mean ± standard deviation over seeds "
                     f"{', '.join(map(str, args.seeds))}; {steps} optimizer steps per run; best of the per-epoch evaluations on a "
                     f"fixed validation split of {len(splits['validation'])} ({time.perf_counter() - task_start:.0f} s for this task).",
                     *([f"The source run itself: validation accuracy {100 * source['results']['validation']['accuracy']:.1f}%"
                        + (f", test {100 * source['results']['test']['accuracy']:.1f}%" if "test" in source["results"] else "") + "."] if source else []),
                     "", *table(task, results, args.budgets, args.seeds, per_class), ""]
    command = " ".join([".venv/bin/python scripts/transfer_evidence.py", *sys.argv[1:]])
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, {os.environ['OMP_NUM_THREADS']} thread(s) per run"
    text = "\n".join([
        "## Transfer evidence: scratch vs head vs lora vs full", "",
        "Source checkpoints: `.venv/bin/python scripts/pretrain_source.py image` and `... speech` "
        "(recipes/configs/image/vit_usps_source.yaml, recipes/configs/audio/wav2vec2_fsdd3_source.yaml).",
        f"Command: `{command}` ({time.perf_counter() - started:.0f} s on {machine}).", "",
        *sections,
    ])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
