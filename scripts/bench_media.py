"""hftl against transformers.Trainer on images (USPS) and audio (FSDD): training samples/s, wall time, memory, accuracy.

    # the full measurement (presets' epochs and batch sizes, every row)
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_media.py
    # a smoke run in minutes
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_media.py --epochs 1 --train-samples 64 --eval-samples 32 \\
        --audio-model outputs/pretrained/wav2vec2-tiny-init --out /tmp/bench_media.md

Measured as scripts/bench.py measures text (its `launch` and `machine` are reused): every system is a fresh
process with its own empty datasets cache, timed from start to exit, its peak resident memory read with
getrusage. Per task and adaptation mode (--modes full head), with the hyperparameters of hftl's preset
(recipes/configs/image/vit_digits_<mode>.yaml, recipes/configs/audio/wav2vec2_fsdd_<mode>.yaml: epochs,
batch size, learning rate, weight decay, warmup ratio, gradient clipping) and the same seed:

  hftl     `hftl train <preset>` with the data, model, seed and sizes as overrides.
  Trainer  transformers.Trainer set up as the official examples (examples/pytorch/image-classification/
           run_image_classification.py, audio-classification/run_audio_classification.py), run the way their
           READMEs run them: evaluate and save every epoch, load the best epoch (accuracy) at the end;
           per-device eval batch 8 (the default), then predict the test rows and save the model.
    images: torchvision transforms in set_transform (Resize + CenterCrop to the processor's size, ToTensor,
           Normalize with its mean/std; RGB), a collate_fn stacking pixel_values + labels,
           remove_unused_columns=False. The example's RandomResizedCrop + RandomHorizontalFlip are left out
           by default, as hftl's digit presets do not augment (and a random crop would rule out hftl's head-mode
           feature cache); --augment gives both a RandomResizedCrop of scale 0.6-1 (hftl: data.augment=[crop]),
           never a flip (digits are not mirror-symmetric).
    audio: datasets' Audio(sampling_rate=16 kHz) cast, a random max_length_seconds (data.max_duration, 1 s)
           window of longer clips for training (FSDD's clips are all shorter), the feature extractor with
           attention masks (the example's --attention_mask default), batches padded to their longest clip by
           the default DataCollatorWithPadding; freeze_feature_encoder as the preset says.
  head mode: the Trainer freezes the backbone (model.base_model) and runs it every epoch; hftl runs it once
           and trains the head on cached features.

Rows: USPS (imagefolder) trains on train less 10% carved (stratified, seeded) for validation, as hftl carves
it, and tests on its test split (2,007); FSDD trains on speaker nicolas' takes 20-49 (300), validates on
15-19, tests on 0-14 (150), the lists in outputs/pretrained/fsdd-splits. --train-samples shuffles the training
rows with the seed and keeps N; --eval-samples keeps the first M validation and test rows (both as hftl does).
Both systems select their best epoch on validation and are scored on the same test rows: the Trainer's
accuracy is recomputed from its predictions, hftl's is the test accuracy its own evaluation writes.

Samples/s: training rows x epochs / training seconds (hftl: results.json train_seconds, the loop with its
per-epoch validation, plus the feature pass in head mode; Trainer: trainer.train(), with its per-epoch
evaluation and checkpoint), and / the whole process's wall seconds (end to end).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench import ROOT, finish, launch, machine, measured  # scripts/bench.py: the same process launch, machine line and reuse

PRESETS = {"image": "recipes/configs/image/vit_digits_{mode}.yaml", "audio": "recipes/configs/audio/wav2vec2_fsdd_{mode}.yaml"}
USPS = ROOT.parent / "shared" / "data" / "images" / "usps"
FSDD_SPLITS = ROOT / "outputs" / "pretrained" / "fsdd-splits"  # scripts/pretrain_source.py speech writes the lists
TASK_DATA = {  # overrides that point a preset at the benchmark's rows (the presets name no data)
    "image": [f"data.data_dir={USPS}", "data.test_split=test"],
    "audio": [f"data.train_file={FSDD_SPLITS / 'target_pool.csv'}", f"data.validation_file={FSDD_SPLITS / 'target_validation.csv'}",
              f"data.test_file={FSDD_SPLITS / 'target_test.csv'}"],
}
CROP_SCALE = 0.6  # --augment: hftl's own USPS recipe (vit_usps_source.yaml) crops this much


# ---------------------------------------------------------------- the Trainer job (its own process)


def load_rows(job: dict):
    """train / validation / test with a ClassLabel 'label', selected as hftl selects them (hftl/data/__init__.py)."""
    import datasets

    if job["task"] == "image":
        ds = datasets.load_dataset("imagefolder", data_dir=job["data_dir"])
        parts = ds["train"].train_test_split(test_size=job["validation_fraction"], seed=job["seed"], stratify_by_column="label")
        ds = datasets.DatasetDict(train=parts["train"], validation=parts["test"], test=ds["test"])
    else:
        ds = datasets.load_dataset("csv", data_files=job["files"])
        ds = ds.select_columns(["path", "label"]).class_encode_column("label")  # ints 0..9 -> names '0'..'9', as hftl names them
        # csv paths arrive as large_string, which datasets casts to Audio only from string
        ds = ds.cast_column("path", datasets.Value("string")).cast_column("path", datasets.Audio(sampling_rate=job["sampling_rate"]))
    if job["train_samples"]:
        ds["train"] = ds["train"].shuffle(seed=job["seed"]).select(range(min(job["train_samples"], len(ds["train"]))))
    if job["eval_samples"]:
        for split in ("validation", "test"):
            ds[split] = ds[split].select(range(min(job["eval_samples"], len(ds[split]))))
    return ds


def image_setup(job: dict, ds):
    """run_image_classification.py: torchvision transforms applied in set_transform, stacked by collate_fn."""
    import torch
    from torchvision.transforms import CenterCrop, Compose, Normalize, RandomResizedCrop, Resize, ToTensor
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(job["model"])
    size = processor.size["shortest_edge"] if "shortest_edge" in processor.size else (processor.size["height"], processor.size["width"])
    normalize = Normalize(mean=processor.image_mean, std=processor.image_std)
    val_tf = Compose([Resize(size), CenterCrop(size), ToTensor(), normalize])
    train_tf = Compose([RandomResizedCrop(size, scale=(CROP_SCALE, 1.0)), ToTensor(), normalize]) if job["augment"] else val_tf

    def transforms(tf):
        def apply(batch):
            batch["pixel_values"] = [tf(image.convert("RGB")) for image in batch["image"]]
            return batch
        return apply

    ds["train"].set_transform(transforms(train_tf))
    for split in ("validation", "test"):
        ds[split].set_transform(transforms(val_tf))

    def collate_fn(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]), "labels": torch.tensor([e["label"] for e in examples])}

    model = AutoModelForImageClassification.from_pretrained(job["model"], **label_maps(ds))
    return model, processor, collate_fn


def audio_setup(job: dict, ds):
    """run_audio_classification.py: random window for training, feature extractor in set_transform, padded by the default collator."""
    import random

    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    fe = AutoFeatureExtractor.from_pretrained(job["model"], return_attention_mask=True)
    rate, window = fe.sampling_rate, round(job["max_duration"] * fe.sampling_rate)

    def random_subsample(wav):  # the example's, which draws with Python's random
        if len(wav) <= window:
            return wav
        offset = random.randint(0, len(wav) - window - 1)
        return wav[offset:offset + window]

    def train_transforms(batch):
        inputs = fe([random_subsample(a["array"]) for a in batch["path"]], sampling_rate=rate)
        return {"input_values": inputs["input_values"], "labels": list(batch["label"])}

    def val_transforms(batch):
        inputs = fe([a["array"] for a in batch["path"]], sampling_rate=rate)
        return {"input_values": inputs["input_values"], "labels": list(batch["label"])}

    ds["train"].set_transform(train_transforms, output_all_columns=False)
    for split in ("validation", "test"):
        ds[split].set_transform(val_transforms, output_all_columns=False)
    model = AutoModelForAudioClassification.from_pretrained(job["model"], **label_maps(ds))
    if job["freeze_feature_encoder"]:
        model.freeze_feature_encoder()
    return model, fe, None  # None: Trainer picks DataCollatorWithPadding(feature extractor)


def label_maps(ds) -> dict:
    names = ds["train"].features["label"].names
    return {"num_labels": len(names), "label2id": {n: i for i, n in enumerate(names)}, "id2label": dict(enumerate(names))}


def trainer_job(job: dict) -> dict:
    import numpy as np
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(job["seed"])
    ds = load_rows(job)
    truth = np.array(ds["test"]["label"])  # before set_transform, which would decode every file to read it
    rows = len(ds["train"])
    model, processor, collator = (image_setup if job["task"] == "image" else audio_setup)(job, ds)
    if job["mode"] == "head":
        model.base_model.requires_grad_(False)  # the backbone frozen; the head (ViT: classifier; wav2vec2: projector, classifier) trains
    out = tempfile.mkdtemp(prefix="bench-media-trainer-")
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=job["batch_size"], learning_rate=job["lr"], num_train_epochs=job["epochs"],
        weight_decay=job["weight_decay"], warmup_steps=job["warmup_ratio"], lr_scheduler_type="linear", max_grad_norm=job["max_grad_norm"],
        seed=job["seed"], eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="accuracy",
        save_total_limit=1, remove_unused_columns=False, report_to="none", disable_tqdm=True,
    )

    def compute_metrics(p):
        return {"accuracy": float((np.argmax(p.predictions, axis=1) == p.label_ids).mean())}

    trainer = Trainer(model=model, args=args, train_dataset=ds["train"], eval_dataset=ds["validation"], compute_metrics=compute_metrics,
                      processing_class=processor, **({"data_collator": collator} if collator else {}))
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    trainer.save_model()
    predictions = np.asarray(trainer.predict(ds["test"]).predictions).argmax(-1)
    return {"rows": rows, "test_rows": len(truth), "train_seconds": train_seconds, "accuracy": float((predictions == truth).mean()),
            "steps": trainer.state.global_step}


# ---------------------------------------------------------------- the parent


def overrides(task: str, mode: str, args) -> list[str]:
    """hftl's key=value overrides for this run; the Trainer reads its settings from the config they resolve to."""
    model = args.image_model if task == "image" else args.audio_model
    o = [*TASK_DATA[task], f"model.name_or_path={model}", f"train.seed={args.seed}"]
    o += ["adapt.solve_head=false"] if mode == "head" else []  # the head trained by AdamW, as the Trainer trains it
    o += [f"train.epochs={args.epochs}"] if args.epochs else []
    o += [f"train.batch_size={args.batch_size}"] if args.batch_size else []
    o += [f"data.max_train_samples={args.train_samples}"] if args.train_samples else []
    o += [f"data.max_eval_samples={args.eval_samples}"] if args.eval_samples else []
    o += ["data.augment=[crop]", f"data.crop_scale={CROP_SCALE}"] if args.augment and task == "image" else []
    return o


def run_hftl(task: str, mode: str, args, folder: Path) -> dict:
    out = folder / "model"
    cmd = [str(Path(sys.executable).with_name("hftl")), "train", PRESETS[task].format(mode=mode), *overrides(task, mode, args),
           f"output.dir={out}", "output.overwrite=true"]
    m = launch(cmd, folder / "log.txt", folder / "datasets-cache")
    res = json.loads((out / "results.json").read_text())
    return {**m, "train_seconds": res["train_seconds"], "accuracy": res["results"]["test"]["accuracy"], "steps": len(res["step_log"]),
            "feature_cache": res.get("feature_cache"), "command": shlex.join(cmd[1:])}


def run_trainer(task: str, mode: str, args, folder: Path) -> dict:
    from hftl.config import load_config

    cfg = load_config(ROOT / PRESETS[task].format(mode=mode), overrides(task, mode, args))
    d, t = cfg.data, cfg.train
    job = {"task": task, "mode": mode, "model": str(ROOT / cfg.model.name_or_path), "seed": t.seed, "epochs": t.epochs,
           "batch_size": t.batch_size, "lr": t.learning_rate, "weight_decay": t.weight_decay, "warmup_ratio": t.warmup_ratio,
           "max_grad_norm": t.max_grad_norm, "train_samples": d.max_train_samples, "eval_samples": d.max_eval_samples,
           "augment": bool(d.augment), "validation_fraction": d.validation_fraction, "data_dir": d.data_dir,
           "files": {s: str(ROOT / f) for s, f in (("train", d.train_file), ("validation", d.validation_file), ("test", d.test_file)) if f},
           "max_duration": d.max_duration, "sampling_rate": 16000, "freeze_feature_encoder": cfg.adapt.freeze_feature_encoder}
    spec, result = folder / "job.json", folder / "result.json"
    spec.write_text(json.dumps(job))
    m = launch([sys.executable, __file__, "--job", str(spec), "--result", str(result)], folder / "log.txt", folder / "datasets-cache")
    return {**m, **json.loads(result.read_text()), "epochs": t.epochs, "batch_size": t.batch_size, "lr": t.learning_rate}


def table(task: str, mode: str, runs: dict) -> list[str]:
    ours, peer = runs["hftl"], runs["trainer"]
    samples = peer["rows"] * peer["epochs"]
    what = {"image": f"USPS, {Path(ours['model']).name}", "audio": f"FSDD speaker nicolas, {Path(ours['model']).name}"}[task]
    lines = [f"### {task} ({what}), {mode}: {peer['epochs']:g} epochs, batch {peer['batch_size']}, learning rate {peer['lr']:g}, "
             f"{peer['rows']:,} training rows, {peer['test_rows']:,} test rows", "",
             "| system | train s | training samples/s | wall s (whole process) | end-to-end samples/s | test accuracy % | peak memory MiB | load avg before | finished |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in (("hftl", ours), ("Trainer, official example setup", peer)):
        lines.append(f"| {name} | {r['train_seconds']:.1f} | {samples / r['train_seconds']:.1f} | {r['wall']:.1f} | {samples / r['wall']:.1f} | "
                     f"{100 * r['accuracy']:.2f} | {r['peak_mib']:.0f} | {r['load_before']:.2f} | {r.get('at', '')} |")
    lines += ["", f"hftl / Trainer samples/s: training {peer['train_seconds'] / ours['train_seconds']:.2f}x, "
                  f"end to end {peer['wall'] / ours['wall']:.2f}x (above 1: hftl is faster)."]
    if ours.get("feature_cache"):
        lines += [f"hftl head: features computed in {ours['feature_cache']['seconds']:.1f}s, the head trained on them for "
                  f"{ours['train_seconds'] - ours['feature_cache']['seconds']:.1f}s."]
    return lines + ["", f"hftl command: `hftl {ours['command']}`", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["image", "audio"], choices=list(PRESETS))
    ap.add_argument("--modes", nargs="+", default=["full", "head"], choices=["full", "head"])
    ap.add_argument("--epochs", type=float, default=None, help="default: each preset's")
    ap.add_argument("--batch-size", type=int, default=None, help="default: each preset's (image 32, audio 16)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--train-samples", type=int, default=None, help="training rows (default: all; USPS 6,561, FSDD 300)")
    ap.add_argument("--eval-samples", type=int, default=None, help="first M validation and test rows (default: all)")
    ap.add_argument("--augment", action="store_true", help="images: random resized crop (scale 0.6-1) in training, both systems")
    ap.add_argument("--image-model", default="outputs/pretrained/vit-usps")
    ap.add_argument("--audio-model", default="outputs/pretrained/wav2vec2-fsdd3")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS_media.md"))
    ap.add_argument("--keep", action="store_true", help="keep the jobs' folders (logs, model folders) and print where")
    ap.add_argument("--work", help="keep every job's folder and measurement here, and reuse those of jobs found finished "
                    "there with the same settings (resume a benchmark that was cut short)")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:  # a child: run one Trainer job, write its result
        Path(args.result).write_text(json.dumps(trainer_job(json.loads(Path(args.job).read_text()))))
        return
    for task in args.tasks:
        model = args.image_model if task == "image" else args.audio_model
        if not (ROOT / model / "config.json").is_file():
            raise SystemExit(f"bench_media: {model} has no config.json yet (scripts/pretrain_source.py writes it); "
                             f"pass --{task}-model another checkpoint folder")

    command = "HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_media.py " + shlex.join(sys.argv[1:])
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="hftl-bench-media-"))
    started, report = time.strftime("%Y-%m-%d %H:%M"), []
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "keep", "work", "job", "result", "tasks", "modes")}
    for task in args.tasks:
        for mode in args.modes:
            runs = {}
            for system, fn in (("hftl", run_hftl), ("trainer", run_trainer)):
                spec = {"task": task, "mode": mode, "system": system, **settings}
                runs[system] = {**measured(work, f"{task}-{mode}-{system}", spec, lambda folder: fn(task, mode, args, folder)),
                                "model": args.image_model if task == "image" else args.audio_model}
            # Both must have trained the same rows for the same epochs: equal optimizer steps say so.
            expected = math.ceil(math.ceil(runs["trainer"]["rows"] / runs["trainer"]["batch_size"]) * runs["trainer"]["epochs"])
            if runs["hftl"]["steps"] != expected or runs["trainer"]["steps"] != expected:
                raise SystemExit(f"bench_media: {task} {mode}: {expected} optimizer steps expected, hftl took {runs['hftl']['steps']}, "
                                 f"Trainer {runs['trainer']['steps']} (job folders: {work})")
            report += table(task, mode, runs)
            print(json.dumps({task: {mode: runs}}), flush=True)

    lines = ["## Audio and images: hftl against Trainer set up like the official examples", "",
             f"Seed {args.seed}; run {started}. Each number is one process, start to exit; 'load avg before' is the 1-minute "
             "load average when it started (a busy machine slows everything). How each system is set up and measured: the "
             "docstring of scripts/bench_media.py.", "",
             f"Command: `{command}`", "", f"Machine: {machine()}", "", *report]
    finish(lines, args.out, work, args.keep or bool(args.work))


if __name__ == "__main__":
    main()
