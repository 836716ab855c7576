"""The one path every run takes: config -> data -> model -> mode -> loop -> model folder + card.

What depends on the modality (text, speech, images) is a `Modality` (hftl/modalities/): which
AutoModelFor*Classification to load, its processor, how to turn raw splits into model inputs, and what
`transformers.pipeline` takes.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from . import adapt, cache, cards, checkpoint, domain, hub, modalities, models, outdir, plots, pretrain, trust
from . import metrics as metrics_lib
from .config import Config, ConfigError, to_dict, to_yaml
from .errors import UserError
from .outdir import OutputError
from .data import DataError, check_source, load_labelled, load_target
from .modalities import Modality
from .train import fit, make_accelerator, tensor_core_padding


def load_checked(cfg: Config, modality: Modality):
    """`load_labelled`, then the modality's check of every media file (data.on_bad_sample: error or skip).
    Returns (splits, source, skipped rows, the task)."""
    splits, source, task = load_labelled(cfg.data, cfg.train.seed, modality.input_keys)
    splits, skipped = modality.check(splits, cfg) if modality.check else (splits, {})
    return splits, source, skipped, task


class Phases:
    """Where a run's time goes: seconds per phase, each from the end of the one before ("start-up" from `started`, when
    hftl was imported for `hftl train`), printed as one line at the end and kept in results.json (up to the save)."""

    def __init__(self, started: float | None = None):
        self.last, self.seconds = started or time.perf_counter(), {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self.last, 2)
        self.last = now

    def split(self, phase: str, part: str, part_seconds: float) -> None:
        """Move `part_seconds` of `phase` (measured inside it) into `part`, placed before it."""
        whole = self.seconds.pop(phase)
        self.seconds[part] = round(min(part_seconds, whole), 2)
        self.seconds[phase] = round(max(whole - part_seconds, 0.0), 2)

    def line(self) -> str:
        return "Time: " + "; ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()) + \
            f" (total {sum(self.seconds.values()):.1f} s)"


def train(cfg: Config, modality: Modality | None = None, started: float | None = None) -> dict:
    """Train, evaluate and save one run of `cfg` (its `task` picks the modality unless `modality` is given); returns
    the final metrics by split. `started`: a time.perf_counter() value the start-up phase counts from (default: now)."""
    phases = Phases(started)
    modality = modality or modalities.get(cfg.task)
    accelerator = make_accelerator(cfg.train)
    mode = adapt.get_mode(cfg.adapt.mode)
    check_source(cfg.data)  # a preset that leaves data to the user says so before anything loads
    cache.check_settings(cfg)  # before minutes of loading and preprocessing
    if cfg.train.metrics is not None:  # a metric that cannot load fails now, not at the first evaluation
        metrics_lib.load_metrics(cfg.train.metrics)
    with claim(cfg, accelerator):
        return _run(cfg, modality, accelerator, mode, phases)


@contextlib.contextmanager
def claim(cfg: Config, accelerator):
    """output.dir and the checkpoint folder are this run's until it ends (hftl/outdir.py): lock them, put back or
    remove what a killed run left beside them, and refuse an output.dir in the way. On the main process; an error
    reaches every process."""
    out, ckpt = outdir.real(cfg.output.dir), checkpoint.root(cfg)
    held = contextlib.ExitStack()

    def take():
        if out != Path(cfg.output.dir):
            print(f"output.dir '{cfg.output.dir}' is a symbolic link: writing into '{out}', where it points (the link stays).")
        held.enter_context(outdir.lock(out, "output.dir"))
        if ckpt != out:
            held.enter_context(outdir.lock(ckpt, "train.checkpoint_dir"))
        held.callback(outdir.unreserve, out)  # an exception after check_space: hand the space back
        for folder in (out, Path(f"{cfg.output.dir}.pretrained")):  # adapt.pretrain's folder is written the same way
            outdir.recover(folder)
        for tmp in sorted(ckpt.glob(".step-*.tmp")):
            shutil.rmtree(tmp)
            print(f"Removed '{tmp}', a checkpoint that a killed run did not finish writing.")
        hub.check_output_dir(str(out), cfg.output.overwrite)

    try:
        checkpoint._on_main(accelerator, take)
        yield
    finally:
        held.close()


# Files of a model folder that are weights: the rest (tokenizer, processor and model configs) goes to output.dir as is.
WEIGHT_SUFFIXES = (".safetensors", ".h5", ".msgpack", ".onnx", *hub.PICKLE_SUFFIXES)


def check_space(cfg: Config, model, path: str, accelerator) -> None:
    """Refuse, before training, when output.dir's or the checkpoints' disk has no room for what the run will write;
    then set the output's share aside (outdir.reserve) until the final write, so that training cannot use it up."""
    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    weights, trainable = size([*model.parameters(), *model.buffers()]), size(p for p in model.parameters() if p.requires_grad)
    source = Path(path)
    processor = sum(f.stat().st_size for f in source.iterdir() if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES)) \
        if source.is_dir() else 0
    # The card, plots, results.json (and the adapter): 10% and 16 MB more.
    output = int(1.1 * (weights + processor + trainable * cfg.adapt.save_adapter)) + 16 * outdir.MB
    out, root = outdir.real(cfg.output.dir), checkpoint.root(cfg)
    needs = [("output.dir", out, output)]
    if cfg.train.save_every:
        # Each holds the model, AdamW's two moments of every trainable weight and the best evaluation's copy of them; the
        # newest is written before the oldest of train.keep_last is deleted.
        count = max(1, cfg.train.keep_last + 1 - len(checkpoint.complete(root)))
        needs.append((f"{count} checkpoint(s) in", root, count * int(1.1 * (weights + 3 * trainable))))

    def do():
        outdir.check_space(needs)
        outdir.reserve(out, output)

    checkpoint._on_main(accelerator, do)


def _run(cfg: Config, modality: Modality, accelerator, mode, phases: Phases) -> dict:
    hub.check_hub_config(cfg.hub)
    if cfg.hub.push and accelerator.is_main_process:  # no token, no permission: fail now, not after training
        hub.prepare_repo(cfg.hub)
    accelerator.print("Resolved config:\n" + to_yaml(cfg))
    phases.mark("start-up (imports, config, checks)")

    path, base_model = models.resolve(cfg.model)
    inherited = cards.inherited_metadata(path)  # license, language: from the base model's own card, before pretraining
    try:
        processor = modality.load_processor(path, cfg)
    except UserError:
        raise
    except (OSError, ValueError) as e:  # transformers: no such Hub repo, not cached offline, no processor files for the task
        raise ConfigError(f"model.name_or_path='{cfg.model.name_or_path}': cannot load it for task={cfg.task} "
                          f"({(str(e).strip().splitlines() or [type(e).__name__])[0].strip()}). Give a local model folder or a "
                          "Hub id of a checkpoint for this task (downloads need network; with HF_HUB_OFFLINE=1 only what is "
                          "cached).") from e
    models.check_code(path, cfg.model)  # a Hub checkpoint's files are here now
    phases.mark("model")
    # Read from the checkpoint as given (its sentence-transformers pooling config), also when MLM pretraining continues it.
    reads = models.representation(path, cfg.model, cfg.adapt, cfg.task, frozen=mode.frozen_features)
    accelerator.print(f"the head reads: {reads.describe()}")
    with accelerator.main_process_first():  # one process preprocesses, the others read its cache
        splits, source, skipped, task = load_checked(cfg, modality)
        given, cfg = cfg, task.configure(cfg)  # what the config leaves to the task (train.metrics, metric_for_best), or its refusal
        mode.check_task(task)
        metrics_lib.load_metrics(cfg.train.metrics)
        encoded, collator = modality.prepare(splits, processor, cfg)
        collator = tensor_core_padding(collator, accelerator)
        target = None
        if cfg.data.target:  # adapt.align / adapt.reweight read its inputs; its labels, if any, give a 'target' evaluation
            target_rows, bad = load_target(cfg.data, task, modality.input_keys,
                                    (lambda s: modality.check(s, cfg)) if modality.check else None)
            target_encoded, _ = modality.prepare(target_rows, processor, cfg)
            target, skipped = target_encoded.pop("train"), {**skipped, **bad}
            encoded.update(target_encoded)
    phases.mark("data (read, check, preprocess)")
    checked = reported_split(splits)  # the split the reload check, the picture and predictions_<split>.json use
    for split, ids in skipped.items():
        accelerator.print(f"data.on_bad_sample=skip: left out {len(ids)} {split} row(s) whose file cannot be read: " + "; ".join(ids[:20])
                          + (f"; ... (all in {Path(cfg.output.dir) / 'skipped_rows.json'})" if len(ids) > 20 else ""))
    labels = task.names

    if cfg.adapt.pretrain:  # continued self-supervised pretraining on unlabelled in-domain inputs; the classifier starts from its folder
        path = pretrain.continue_pretraining(cfg, path, splits, processor, accelerator, target_rows["train"] if cfg.data.target else None,
                                            modality)
        phases.mark("continued pretraining (adapt.pretrain)")
    model, new_keys = models.load_classifier(modality.auto_class, path, labels, cfg.model, reads)
    model.config.problem_type = task.problem_type  # what pipeline() reads: softmax, sigmoid or the scores themselves
    if not reads.native:  # saved for sentence-transformers, which must truncate as training did
        model.max_seq_length = cfg.data.max_length
    head = adapt.head_modules(model, new_keys)
    # Before training, on the features training starts from: how far data.target's rows lie from the training rows.
    domain_gap = None if target is None else domain.estimate(model, head, encoded["train"], target, collator,
                                                             cfg.train.eval_batch_size, accelerator, cfg.train.seed,
                                                             adapting=bool(cfg.adapt.align or cfg.adapt.reweight or cfg.adapt.pretrain))
    model = mode.apply(model, cfg.adapt, head)
    if cfg.adapt.freeze_feature_encoder:
        adapt.freeze_feature_encoder(model)
    ctx = adapt.Context(cfg, head, encoded, collator, accelerator, target=target, task=task)
    hooks = adapt.build_hooks(model, mode, ctx)
    trainable, total = adapt.count_parameters(model)
    accelerator.print(f"mode={mode.name} head={head} trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    check_space(cfg, model, path, accelerator)
    phases.mark("model")

    if mode.staged:  # a mode with stages of its own (lpft, contrastive)
        result = mode.fit(model, ctx, hooks)
    else:
        # A frozen backbone runs once over the data and the head trains on the cached features (hftl/cache.py);
        # hooks (reweighting, alignment, ...) need the whole model's forward.
        result = (mode.frozen_backbone and not hooks and cache.fit_on_features(model, head, encoded, collator, cfg, accelerator, task)) \
            or fit(model, encoded, collator, cfg, accelerator, hooks, task=task)
    phases.mark("final evaluation")
    # train_seconds: the loop (a cached head's: its features and solve); before it the loop's set-up (loaders, prepare,
    # optimizer: the plain loop reports it), after it the final evaluation.
    if result.get("setup_seconds") is not None:
        phases.split("final evaluation", "loop set-up", result["setup_seconds"])
    phases.split("final evaluation", "training", result["train_seconds"])
    # multi-label thresholds, train.calibrate's temperature
    calibrated = task.calibrate(result, splits, cfg, metrics_lib.load_metrics(cfg.train.metrics))
    results = result["results"]
    accelerator.print("Final: " + " ".join(f"{s}/{k}={v:.4f}" for s, r in results.items() for k, v in r.items()))
    # Whether to trust it (hftl/trust.py): majority baseline, collapse, per-class scores, calibration, on every
    # evaluated split; a 'target' evaluation's rows are data.target's.
    labelled = {**splits, **({"target": target_rows["target"]} if "target" in result["predictions"] else {})}
    overfitting = cards.overfitting_check(result["history"], cfg.train.metric_for_best, cfg.train.greater_is_better)
    checks = trust.assess(task, labelled, result, overfitting, domain_gap)
    for line in trust.log_lines(checks):
        accelerator.print(line)
    if cfg.train.fail_on_collapse and trust.collapsed(checks):  # every process stops here; nothing is written
        raise OutputError(
            "train.fail_on_collapse=true: the predictions collapsed on the "
            + " ".join(f"{s} split: {checks['collapse'][s]['text'].removeprefix('COLLAPSED: ')}" for s in trust.collapsed(checks))
            + f" Nothing was written to output.dir '{cfg.output.dir}' (an existing folder there is as it was). Train "
            "longer or at another train.learning_rate, try train.class_weights=balanced for lopsided classes, or set "
            "train.fail_on_collapse=false to save the model with the check's warning in its card.")
    if not accelerator.is_main_process:  # only one process writes
        return results
    phases.mark("calibration and trust checks")
    evaluated = list(result["predictions"])
    reports = {h.name: h.report for h in hooks if h.report}  # what the options measured (reweighting's effective sample size)
    trained = bool(result["history"] or result.get("step_log"))

    def figure_of(split: str) -> str:  # the reported split's picture keeps the task's name; the others add the split's
        return task.figure_name if split == checked else task.figure_name.replace(".png", f"_{split}.png")
    reliability_split = checked if checked in checks["calibration"] else None

    card = cards.render(
        cards.CardData(
            model_name=cfg.hub.model_id or Path(cfg.output.dir).name,
            base_model=base_model,
            dataset_name=cfg.data.dataset_name or source,
            dataset_id=cfg.data.name,
            pipeline_tag=modality.pipeline_tag,
            mode=mode.name,
            mode_help=mode.help,
            labels=labels,
            trainable_params=trainable,
            total_params=total,
            hyperparameters=cards.hyperparameters(to_dict(cfg)["train"], result["steps"], result.get("steps_per_epoch"),
                                                  solved=bool(result.get("solver"))),
            results=results,
            split_sizes={s: len(d) for s, d in splits.items()},
            history=result["history"],
            metric_for_best=cfg.train.metric_for_best,
            best_step=result["best_step"],
            steps=result["steps"],
            train_seconds=result["train_seconds"],
            skipped={s: len(ids) for s, ids in skipped.items()},
            greater_is_better=cfg.train.greater_is_better,
            figures={**{figure_of(s): f"{task.figure_caption} on the {s} split" for s in [checked, *(s for s in evaluated if s != checked)]},
                     **({trust.RELIABILITY_PNG: f"Reliability diagram on the {reliability_split} split"} if reliability_split else {}),
                     **({plots.CURVES_PNG: "Training and validation loss, and validation " + cfg.train.metric_for_best} if trained else {})},
            domain_gap=domain_gap,
            library_name=reads.library,
            representation=reads.describe(),
            solver=result.get("solver"),
            pretrain=json.loads((Path(path) / "pretrain.json").read_text()) if cfg.adapt.pretrain else None,
            task=task.name,
            per_class=trust.card_tables(task, checks),
            calibrated=calibrated,
            checks=checks["list"],
            transfer=cards.transfer_options(to_dict(cfg)["adapt"], mode.name, reports),
            from_scratch=cfg.model.from_scratch,
            stride=cfg.data.stride,
            **inherited,
        ),
        cfg.train.metrics,
    )
    predicted = {s: task.readable(p) for s, p in result["predictions"].items()}
    inputs, expected, kept = reload_check(cfg, modality, splits[checked], predicted[checked])
    tie = hub.MIXED_PRECISION_TIE if accelerator.mixed_precision != "no" else 0.0
    # A fitted temperature changes the scores, not the predictions: the reload check compares the scores too, which
    # proves it was folded into the saved head.
    scores = task.scores(np.asarray(result["logits"][checked])[kept]) if task.temperature != 1.0 else None
    verify = (lambda folder: hub.verify_reload(folder, modality.pipeline_tag, inputs, expected, tie, scores)) if expected else None

    def export(trained):
        saved = mode.export(trained)  # merged adapters, a plain transformers model
        saved.config.update(task.model_config())  # thresholds, target statistics: read back by tasks.from_model_config
        return task.export(saved, head)
    outdir.unreserve(outdir.real(cfg.output.dir))  # the space set aside for this write
    out = hub.save_output(
        cfg.output.dir,
        result["model"],
        processor,
        card,
        extra={
            "hftl_config.yaml": to_yaml(given),  # as given: what it leaves to the task is the task's again on a rerun
            "results.json": {"results": results, "history": result["history"], "train_seconds": result["train_seconds"],
                             "trainable_params": trainable, "total_params": total, "best_step": result["best_step"],
                             "mixed_precision": accelerator.mixed_precision,
                             "feature_cache": result.get("feature_cache"), "step_log": result.get("step_log"), "domain_gap": domain_gap,
                             "representation": {**vars(reads), "library": reads.library}, "solver": result.get("solver"),
                             "pretrain": json.loads((Path(path) / "pretrain.json").read_text()) if cfg.adapt.pretrain else None,
                             "task": task.name, "calibrated": calibrated, "checks": checks, "options": reports,
                             # the save's own time is not known yet when this file is written: it is on the log's "Time:" line
                             "seconds": dict(phases.seconds)},
            **{f"predictions_{s}.json": predicted[s] for s in evaluated},
            **{figure_of(s): (lambda file, s=s: task.figure(task.references(task.labels_of(labelled[s])), result["predictions"][s],
                                                            file, f"{task.figure_caption} on the {s} split"))
               for s in evaluated},
            **({trust.RELIABILITY_PNG: lambda file: plots.reliability_png(checks["calibration"][reliability_split]["bins"], file,
                                                                            ece=checks["calibration"][reliability_split]["ece"])}
               if reliability_split else {}),
            # A head solved and nothing trained has no curve to draw.
            **({plots.CURVES_PNG: lambda file: plots.learning_curves_png(result.get("step_log") or [], result["history"],
                                                                       cfg.train.metric_for_best, file)} if trained else {}),
            **({"skipped_rows.json": skipped} if skipped else {}),
        },
        overwrite=cfg.output.overwrite,
        verify=verify,
        export=export,
        save_adapter=cfg.adapt.save_adapter and mode.peft,
        release=True,  # the run is done with it; the reload check loads the saved copy
        if_disk_full=_finish_later(result.get("checkpoint")),
    )
    agree = "agree (near-ties allowed: mixed precision)" if tie else "identical"
    loader = "transformers.pipeline" if reads.native else "sentence-transformers"
    accelerator.print(f"Saved {out} (reload check through {loader}: {len(expected)} {checked} predictions {agree})")
    phases.mark("card, figures, saving and the reload check")
    if cfg.hub.push:
        url = hub.publish(out, cfg.hub, modality.pipeline_tag, inputs, expected, tie)
        accelerator.print(f"Pushed {url} (round trip: files identical, {len(expected)} validation predictions {agree})")
        phases.mark("pushing to the Hub")
    accelerator.print(phases.line())
    return results


def _finish_later(kept: Path | None) -> str:
    """What a failed final write's error adds: where the trained model is, and how to finish the run without training."""
    if kept:
        return (f"The trained model is kept in checkpoint '{kept}', this run's last step: free some space and run the same "
                "command with train.resume=auto, which trains no further and writes output.dir from it.")
    return ("This run kept no checkpoint of its last step (train.save_every is null), so its trained weights are lost: free "
            "some space and train again (with train.save_every set, a failed final write is finished from the last checkpoint "
            "by train.resume=auto).")


def reported_split(splits) -> str:
    """The split the reload check, the confusion matrix and predictions_<split>.json use: validation, or the test split
    when data.validation_fraction=0 left none."""
    return "validation" if "validation" in splits else "test"


def reload_check(cfg: Config, modality: Modality, validation, predicted: list[str]) -> tuple[list, list[str]]:
    """Pipeline inputs and the labels training's evaluation predicted, for the first output.verify_reload validation rows."""
    n = min(cfg.output.verify_reload, len(validation))
    inputs = modality.pipeline_inputs(validation.select(range(n)), cfg)
    # None: a row pipeline() does not reproduce (audio: a clip evaluated in several windows); it is not compared.
    keep = [i for i, x in enumerate(inputs) if x is not None]
    return [inputs[i] for i in keep], [predicted[i] for i in keep], keep


def push(folder: str | Path, cfg: Config, modality: Modality | None = None) -> tuple[str, int]:
    """`hftl push OUT_DIR`: publish a folder `hftl train` wrote, with the same round trip as a run.

    The validation rows are re-read from the data its hftl_config.yaml names; the expected labels are
    its predictions_validation.json. Returns the commit URL and how many predictions were re-checked."""
    modality = modality or modalities.get(cfg.task)
    folder = Path(folder)
    checked = "validation" if (folder / "predictions_validation.json").is_file() else "test"
    predicted = json.loads((folder / f"predictions_{checked}.json").read_text())
    inputs, expected = [], []
    if cfg.output.verify_reload:
        try:
            splits, _, _, _ = load_checked(cfg, modality)
        except DataError as e:
            raise DataError(f"{e} (`hftl push` re-reads the validation rows named in {folder / 'hftl_config.yaml'} to re-check the "
                            "pushed model: run it where training ran, override the data.* keys, or pass output.verify_reload=0 "
                            "to compare files only.)") from e
        inputs, expected, _ = reload_check(cfg, modality, splits[checked], predicted)
    results = json.loads((folder / "results.json").read_text()) if (folder / "results.json").is_file() else {}
    tie = hub.MIXED_PRECISION_TIE if results.get("mixed_precision", "no") != "no" else 0.0
    return hub.publish(folder, cfg.hub, modality.pipeline_tag, inputs, expected, tie), len(expected)
