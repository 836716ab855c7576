"""How far hftl's training is from the floor of this machine, per adaptation mode (issue 22).

The floor is the bare training step over exactly the batches hftl trains on: the same preset and overrides, read
through hftl's own data path (hftl.recipe.load_checked, the modality's prepare, hftl.train.train_dataloader: same rows,
order, padding and threads), the same model with the mode applied (hftl.adapt), the same optimizer and schedule
(hftl.train._optimizer, make_scheduler), then only forward, the task's loss, backward, clipping, optimizer step and
scheduler step, in a fresh process with nothing else in it. hftl's run is the ordinary `hftl train` of the same
config, also a fresh process. Both are repeated (--repeats); the fastest of each counts, and the spread is shown.

    # full and LoRA on all 6,920 SST-2 rows, one epoch, 3 repeats each (about 25 minutes on 2 cores; run it alone)
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_floor.py
    # a smoke run (a minute)
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_floor.py --train-samples 200 --repeats 1 --work /tmp/floor --out /tmp/floor.md

Columns: hftl's end-to-end seconds (process start to exit) and its train_seconds (its training loop, as results.json
reports it: the steps, the loss's all-process reduce, logging, the progress bar); the floor's loop seconds and its
startup (process start to the first step: imports, data, model); hftl / floor for the loop and end to end; and
what hftl spends outside its loop (startup, the final evaluation of validation, saving the folder with its card and
the pipeline() reload check), end to end minus train_seconds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import HFTL_PYTHON, ROOT, SHARED_DATA, Results, command_line, machine, timed  # noqa: E402

PRESETS = {"full": "minilm_sst2_full", "lora": "minilm_sst2_lora"}


def floor_job(job: dict) -> dict:
    """The bare loop over hftl's batches (a child process)."""
    started = time.perf_counter()
    import math

    import torch

    from hftl import adapt, models
    from hftl import modalities
    from hftl.presets import load
    from hftl.recipe import load_checked
    from hftl.train import (_optimizer, make_accelerator, make_scheduler, return_freed_blocks, schedule, speed_up,
                            tensor_core_padding, train_dataloader)

    cfg = load(job["preset"], job["overrides"])  # as `hftl train PRESET key=value ...` reads it
    modality, mode = modalities.get(cfg.task), adapt.get_mode(cfg.adapt.mode)
    accelerator = make_accelerator(cfg.train)
    path, _ = models.resolve(cfg.model)
    processor = modality.load_processor(path, cfg)
    reads = models.representation(path, cfg.model, cfg.adapt, cfg.task, frozen=mode.frozen_features)
    splits, _, _, task = load_checked(cfg, modality)
    cfg = task.configure(cfg)
    encoded, collator = modality.prepare(splits, processor, cfg)
    collator = tensor_core_padding(collator, accelerator)
    model, new_keys = models.load_classifier(modality.auto_class, path, task.names, cfg.model, reads)
    model = mode.apply(model, cfg.adapt, adapt.head_modules(model, new_keys))
    t = cfg.train
    return_freed_blocks(t.cpu_mmap_threshold_mib, accelerator.device)  # hftl's malloc setting, as fit() makes it
    train_dl = train_dataloader(encoded["train"], collator, t)
    speed_up(model, t)
    optimizer = _optimizer(model, t)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    steps_per_epoch, total_steps = schedule(train_dl, t)
    scheduler = make_scheduler(optimizer, t, total_steps)
    model.train()
    startup = time.perf_counter() - started
    start, step, epoch = time.perf_counter(), 0, 0
    while step < total_steps:
        train_dl.set_epoch(epoch)
        for batch in train_dl:
            labels = batch.pop("labels")
            loss = task.loss(model(**batch).logits, labels)
            accelerator.backward(loss)
            if t.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            if step >= total_steps:
                break
        epoch += 1
    loop = time.perf_counter() - start
    assert math.isfinite(float(loss)), "the floor's loss went non-finite"
    return {"loop_seconds": round(loop, 2), "startup_seconds": round(startup, 2), "steps": step,
            "rows": len(encoded["train"]), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=list(PRESETS))
    ap.add_argument("--train-samples", type=int, help="training rows (default: all 6,920)")
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench_floor"))
    ap.add_argument("--out", default=str(ROOT / "scripts" / "results" / "floor.md"))
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        Path(args.result).write_text(json.dumps(floor_job(json.loads(Path(args.job).read_text()))))
        return

    work, started = Path(args.work).resolve(), time.strftime("%Y-%m-%d %H:%M %Z")
    results = Results(work / "results.json")
    sst2 = SHARED_DATA / "text" / "sst2"
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    table = {}
    for mode in args.modes:
        overrides = [f"data.train_file={sst2 / 'train.csv'}", f"data.validation_file={sst2 / 'validation.csv'}",
                     f"train.epochs={args.epochs:g}", "train.mixed_precision=no",
                     *([f"data.max_train_samples={args.train_samples}"] if args.train_samples else [])]
        runs = {"hftl": [], "floor": []}
        for repeat in range(args.repeats):
            for system in ("hftl", "floor"):  # interleaved, so a slow spell of the machine hits both
                key = f"{mode} {system} {repeat} {json.dumps(overrides)}"
                folder = work / "jobs" / f"{mode}-{system}-{repeat}"

                def run(system=system, folder=folder):
                    folder.mkdir(parents=True, exist_ok=True)
                    job_env = {**env, "HF_DATASETS_CACHE": str(folder / "datasets-cache")}
                    if system == "hftl":
                        cmd = [str(HFTL_PYTHON), "-m", "hftl", "train", PRESETS[mode], *overrides, f"output.dir={folder / 'model'}",
                               "output.overwrite=true"]
                        m = timed(cmd, folder / "log.txt", job_env)
                        res = json.loads((folder / "model" / "results.json").read_text()) if m["rc"] == 0 else {}
                        return {**m, "train_seconds": res.get("train_seconds"),
                                "accuracy": res.get("results", {}).get("validation", {}).get("accuracy")}
                    spec = folder / "job.json"
                    spec.write_text(json.dumps({"preset": PRESETS[mode], "overrides": overrides}))
                    cmd = [str(HFTL_PYTHON), __file__, "--job", str(spec), "--result", str(folder / "result.json")]
                    m = timed(cmd, folder / "log.txt", job_env)
                    return {**m, **(json.loads((folder / "result.json").read_text()) if m["rc"] == 0 else {})}

                r = results.get(key, run)
                if r["rc"] != 0:
                    raise SystemExit(f"bench_floor: {key} failed (exit {r['rc']}); its output: {folder / 'log.txt'}")
                print(f"bench_floor: {mode} {system} {repeat}: {r['seconds']:.1f} s", flush=True)
                runs[system].append(r)
        table[mode] = runs

    lines = ["# hftl against the floor of this machine (bare training steps over hftl's own batches)", "",
             f"Command: `HF_HUB_OFFLINE=1 {command_line()}`", "", f"Machine: {machine()}", "", f"Run: {started}", "",
             f"all-MiniLM-L6-v2 on SST-2 ({table[args.modes[0]]['floor'][0]['rows']:,} training rows), {args.epochs:g} epoch, the "
             f"modes' presets (batch 32, fp32), {args.repeats} repeat(s), hftl and floor interleaved; the fastest of each "
             "counts, the range is the slowest to the fastest. How each is made: the docstring of scripts/bench_floor.py.", "",
             "| mode | hftl end to end s | hftl train s | floor loop s | floor startup s | hftl / floor (loop) | hftl / floor (end to end) | hftl outside its loop s | hftl accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]

    def span(values):
        return f"{min(values):.1f} ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else f"{values[0]:.1f}"

    for mode, runs in table.items():
        h, f = runs["hftl"], runs["floor"]
        h_train, h_e2e = [r["train_seconds"] for r in h], [r["seconds"] for r in h]
        f_loop, f_start = [r["loop_seconds"] for r in f], [r["startup_seconds"] for r in f]
        outside = [r["seconds"] - r["train_seconds"] for r in h]
        floor_e2e = min(f_loop) + min(f_start)
        lines.append(f"| {mode} | {span(h_e2e)} | {span(h_train)} | {span(f_loop)} | {span(f_start)} | "
                     f"{min(h_train) / min(f_loop):.2f}x | {min(h_e2e) / floor_e2e:.2f}x | {span(outside)} | "
                     f"{statistics.fmean(r['accuracy'] for r in h):.4f} |")
    lines += ["", "hftl / floor (end to end) divides hftl's fastest end-to-end time by the floor's fastest startup plus loop "
              "(a process that only loads and trains; no evaluation, no saving)."]
    if "full" in table and "lora" in table:
        full, lora = min(r["loop_seconds"] for r in table["full"]["floor"]), min(r["loop_seconds"] for r in table["lora"]["floor"])
        lines += ["", f"LoRA's floor against full's: {lora:.1f} s against {full:.1f} s ({lora / full:.2f}x): frozen weights get no "
                  "weight gradients, but every layer's backward still runs for the activations' gradients down to the "
                  "lowest adapter."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command_line(), "machine": machine(), "started": started,
                                                    "runs": table}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
