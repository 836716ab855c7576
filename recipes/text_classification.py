"""Recipe: text classification. Checkpoint + datasets pipeline + adaptation mode -> model folder.

    hftl train recipes/configs/text/minilm_vader_full.yaml [key=value ...]
    accelerate launch -m hftl train recipes/configs/text/minilm_sst2_lora.yaml

Reads top to bottom as the run goes: config -> data -> model -> mode -> loop -> folder + card.
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hftl import adapt, cards, hub, models
from hftl.config import Config, to_dict, to_yaml
from hftl.data import load_splits, text
from hftl.train import fit, make_accelerator


def main(cfg: Config) -> dict:
    accelerator = make_accelerator(cfg.train)
    mode = adapt.get_mode(cfg.adapt.mode)
    hub.check_output_dir(cfg.output.dir, cfg.output.overwrite)
    accelerator.print("Resolved config:\n" + to_yaml(cfg))

    path, base_model = models.resolve(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    with accelerator.main_process_first():  # one process tokenizes, the others read its cache
        splits, source = load_splits(cfg.data, cfg.train.seed)
        encoded, collator = text.prepare(splits, tokenizer, cfg.data)
    labels = splits["train"].features["labels"].names

    model, new_keys = models.load_classifier(AutoModelForSequenceClassification, path, labels, cfg.model)
    head = adapt.head_modules(model, new_keys)
    model = mode.apply(model, cfg.adapt, head)
    trainable, total = adapt.count_parameters(model)
    accelerator.print(f"mode={mode.name} head={head} trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    run = fit(model, encoded, collator, cfg, accelerator)
    results = run["results"]
    accelerator.print("Final: " + " ".join(f"{s}/{k}={v:.4f}" for s, r in results.items() for k, v in r.items()))
    if not accelerator.is_main_process:  # only one process writes
        return results

    trained = run["model"]
    card = cards.render(
        cards.CardData(
            model_name=Path(cfg.output.dir).name,
            base_model=base_model,
            dataset_name=source,
            dataset_id=cfg.data.name,
            pipeline_tag="text-classification",
            mode=mode.name,
            mode_help=mode.help,
            labels=labels,
            trainable_params=trainable,
            total_params=total,
            hyperparameters={k: v for k, v in to_dict(cfg)["train"].items() if v is not None},
            results=results,
            split_sizes={s: len(d) for s, d in splits.items()},
            history=run["history"],
            metric_for_best=cfg.train.metric_for_best,
            best_step=run["best_step"],
            steps=run["steps"],
            train_seconds=run["train_seconds"],
        ),
        cfg.train.metrics,
    )
    n = min(cfg.output.verify_reload, len(splits["validation"]))
    rows = splits["validation"].select(range(n))
    expected = [labels[p] for p in run["predictions"]["validation"][:n]]
    verify = (lambda folder: hub.verify_reload(folder, "text-classification", text.inputs_for_pipeline(rows, cfg.data), expected)) if n else None
    out = hub.save_output(
        cfg.output.dir,
        trained,
        tokenizer,
        card,
        extra={
            "hftl_config.yaml": to_yaml(cfg),
            "results.json": {"results": results, "history": run["history"], "train_seconds": run["train_seconds"],
                             "trainable_params": trainable, "total_params": total, "best_step": run["best_step"]},
            "predictions_validation.json": [labels[p] for p in run["predictions"]["validation"]],
        },
        overwrite=cfg.output.overwrite,
        verify=verify,
        export=mode.export,
        save_adapter=cfg.adapt.save_adapter and mode.name == "lora",
    )
    accelerator.print(f"Saved {out} (pipeline reload check: {n} validation predictions identical)")
    return results
