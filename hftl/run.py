"""The one path every recipe takes: config -> data -> model -> mode -> loop -> model folder + card.

A recipe (recipes/<task>.py) supplies only what depends on the modality, as a `Modality`: which
AutoModelFor*Classification to load, its processor (tokenizer, feature extractor, image
processor), how to turn raw splits into model inputs, and what `transformers.pipeline` takes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import adapt, cards, hub, models
from .config import Config, to_dict, to_yaml
from .data import load_splits
from .train import fit, make_accelerator


@dataclass
class Modality:
    pipeline_tag: str  # e.g. "text-classification"; also the pipeline() task
    auto_class: Any  # e.g. AutoModelForSequenceClassification
    load_processor: Callable[[str, Config], Any]  # (path, cfg) -> tokenizer / feature extractor / image processor
    prepare: Callable  # (splits, processor, cfg) -> (encoded DatasetDict with 'labels', collator)
    pipeline_inputs: Callable  # (raw split rows, cfg) -> list that pipeline(pipeline_tag) accepts
    input_keys: tuple[str, ...] = ("text_column", "text_pair_column")  # DataConfig keys naming the input columns


def run(cfg: Config, modality: Modality) -> dict:
    accelerator = make_accelerator(cfg.train)
    mode = adapt.get_mode(cfg.adapt.mode)
    hub.check_output_dir(cfg.output.dir, cfg.output.overwrite)
    accelerator.print("Resolved config:\n" + to_yaml(cfg))

    path, base_model = models.resolve(cfg.model)
    processor = modality.load_processor(path, cfg)
    with accelerator.main_process_first():  # one process preprocesses, the others read its cache
        splits, source = load_splits(cfg.data, cfg.train.seed, modality.input_keys)
        encoded, collator = modality.prepare(splits, processor, cfg)
    labels = splits["train"].features["labels"].names

    model, new_keys = models.load_classifier(modality.auto_class, path, labels, cfg.model)
    head = adapt.head_modules(model, new_keys)
    model = mode.apply(model, cfg.adapt, head)
    trainable, total = adapt.count_parameters(model)
    accelerator.print(f"mode={mode.name} head={head} trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    result = fit(model, encoded, collator, cfg, accelerator)
    results = result["results"]
    accelerator.print("Final: " + " ".join(f"{s}/{k}={v:.4f}" for s, r in results.items() for k, v in r.items()))
    if not accelerator.is_main_process:  # only one process writes
        return results

    card = cards.render(
        cards.CardData(
            model_name=Path(cfg.output.dir).name,
            base_model=base_model,
            dataset_name=source,
            dataset_id=cfg.data.name,
            pipeline_tag=modality.pipeline_tag,
            mode=mode.name,
            mode_help=mode.help,
            labels=labels,
            trainable_params=trainable,
            total_params=total,
            hyperparameters={k: v for k, v in to_dict(cfg)["train"].items() if v is not None},
            results=results,
            split_sizes={s: len(d) for s, d in splits.items()},
            history=result["history"],
            metric_for_best=cfg.train.metric_for_best,
            best_step=result["best_step"],
            steps=result["steps"],
            train_seconds=result["train_seconds"],
        ),
        cfg.train.metrics,
    )
    predicted = [labels[p] for p in result["predictions"]["validation"]]
    n = min(cfg.output.verify_reload, len(splits["validation"]))
    rows = splits["validation"].select(range(n))
    verify = (lambda folder: hub.verify_reload(folder, modality.pipeline_tag, modality.pipeline_inputs(rows, cfg), predicted[:n])) if n else None
    out = hub.save_output(
        cfg.output.dir,
        result["model"],
        processor,
        card,
        extra={
            "hftl_config.yaml": to_yaml(cfg),
            "results.json": {"results": results, "history": result["history"], "train_seconds": result["train_seconds"],
                             "trainable_params": trainable, "total_params": total, "best_step": result["best_step"]},
            "predictions_validation.json": predicted,
        },
        overwrite=cfg.output.overwrite,
        verify=verify,
        export=mode.export,
        save_adapter=cfg.adapt.save_adapter and mode.name == "lora",
    )
    accelerator.print(f"Saved {out} (pipeline reload check: {n} validation predictions identical)")
    return results
