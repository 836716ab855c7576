"""Model card: metadata and results gathered during the run, rendered with huggingface_hub.ModelCard."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

# model_cards/ sits beside hftl/ in a checkout; a wheel carries it inside the package.
TEMPLATES = next(
    (p for p in (Path(__file__).resolve().parents[1] / "model_cards", Path(__file__).resolve().parents[2] / "model_cards") if p.is_dir()),
    Path(__file__).resolve().parents[2] / "model_cards",
)
# The Hub's metric ids (model-index `type`) and the names shown for hftl's metrics.
METRIC_TYPES = {"f1": "f1", "precision": "precision", "recall": "recall", "accuracy": "accuracy", "micro_f1": "f1",
                "macro_f1": "f1", "micro_precision": "precision", "micro_recall": "recall", "subset_accuracy": "accuracy",
                "mse": "mse", "mae": "mae", "pearson": "pearsonr", "spearman": "spearmanr"}
METRIC_NAMES = {"f1": "f1 (macro)", "precision": "precision (macro)", "recall": "recall (macro)", "micro_f1": "f1 (micro)",
                "macro_f1": "f1 (macro)", "micro_precision": "precision (micro)", "micro_recall": "recall (micro)",
                "subset_accuracy": "subset accuracy (exact match)", "pearson": "Pearson r", "spearman": "Spearman rho"}
# What the card's first line says the labels are, by task (hftl/tasks/).
TASK_SUMMARY = {"single_label": "{n} classes", "multi_label": "{n} labels, multi-label: any number per input",
                "regression": "regression: {n} target(s)", "token_classification": "token classification: {n} IOB2 tags, one per word"}


@dataclass
class CardData:
    """Everything the card says, filled in as the run goes."""

    model_name: str
    base_model: str | None  # Hub id, never a local path
    dataset_name: str
    dataset_id: str | None  # Hub id of the data set when it has one
    pipeline_tag: str
    mode: str
    mode_help: str
    labels: list[str]
    trainable_params: int
    total_params: int
    hyperparameters: dict
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    split_sizes: dict[str, int] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    metric_for_best: str = "accuracy"
    best_step: int = 0
    steps: int = 0
    train_seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)  # rows left out per split: their media file could not be read
    greater_is_better: bool = True  # for metric_for_best
    figures: dict[str, str] = field(default_factory=dict)  # PNG file in the model folder -> caption
    domain_gap: dict | None = None  # hftl.domain.estimate's result when data.target was given
    transfer_check: str | None = None  # filled by `hftl compare`: this run against a from-scratch baseline
    library_name: str = "transformers"  # or sentence-transformers, for a pooling transformers' heads cannot express
    representation: str | None = None  # what the head reads (hftl.pooling.Representation.describe)
    solver: dict | None = None  # the solved head's method and penalty (hftl.cache.solve_head), when it was solved
    pretrain: dict | None = None  # adapt.pretrain's pretrain.json: objective, inputs, steps, held-out loss before/after
    task: str = "single_label"  # hftl/tasks/ name
    per_class: dict = field(default_factory=dict)  # split -> the per-class table (hftl.trust.card_tables of Task.card_rows)
    calibrated: dict | None = None  # thresholds tuned / the temperature fitted on validation (Task.calibrate)
    checks: list[dict] = field(default_factory=list)  # hftl.trust.assess's checks: check, split, verdict, text
    transfer: list[str] = field(default_factory=list)  # every transfer option that ran, with its settings (transfer_options)
    from_scratch: bool = False  # model.from_scratch: random weights, a baseline with nothing transferred
    license: str | None = None  # the base model's, from its own card (inherited_metadata)
    language: str | list | None = None
    stride: int | None = None  # token classification's data.stride: the pipeline reads long sentences in windows too


# The overfitting check (see `overfitting_check`).
LOSS_RISE = 0.10  # validation loss up by this share after the best evaluation ...
LOSS_RATIO = 2.0  # ... or, at the end, validation loss at least this many times the training loss
LOSS_GAP = 0.1  # and at least this much above it (tiny losses differ by large ratios that mean nothing)


def overfitting_check(history: list[dict], metric: str, greater_is_better: bool = True) -> str:
    """One sentence: signs of overfitting in the evaluations (`hftl.train.fit`'s history), or that none were seen.

    It fires when either holds:
    - after the best evaluation (by `metric`) validation loss rose by LOSS_RISE or more (relative) by the last
      evaluation while training loss fell: the model kept fitting the training rows and got worse on others;
    - at the last evaluation validation loss is at least LOSS_RATIO times the training loss and LOSS_GAP above it.
    The training loss is the mean over the steps since the evaluation before, with dropout on, as training saw it."""
    if len(history) < 2:
        return "Not assessed: it needs at least two validation evaluations (raise train.epochs or train.evals_per_epoch)."
    sign = 1 if greater_is_better else -1
    best = max(range(len(history)), key=lambda i: (sign * history[i][f"eval_{metric}"], -i))  # earliest best, as fit keeps it
    b, last = history[best], history[-1]
    signs = []
    rise = (last["eval_loss"] - b["eval_loss"]) / max(b["eval_loss"], 1e-12)
    if best < len(history) - 1 and rise >= LOSS_RISE and last["train_loss"] < b["train_loss"]:
        signs.append(f"after the best evaluation (step {b['step']} of {last['step']}) validation loss rose {100 * rise:.0f}% "
                     f"({b['eval_loss']:.4f} -> {last['eval_loss']:.4f}) while training loss fell ({b['train_loss']:.4f} -> "
                     f"{last['train_loss']:.4f}); the model from step {b['step']} is the one saved")
    if last["eval_loss"] >= LOSS_RATIO * last["train_loss"] and last["eval_loss"] - last["train_loss"] >= LOSS_GAP:
        signs.append(f"at the last evaluation validation loss ({last['eval_loss']:.4f}) is "
                     f"{last['eval_loss'] / max(last['train_loss'], 1e-12):.1f}x the training loss ({last['train_loss']:.4f})")
    if signs:
        return "Signs of overfitting: " + "; ".join(signs) + ". More data, fewer epochs, or a mode with fewer trainable parameters may help."
    return (f"No sign of overfitting: validation loss did not rise {100 * LOSS_RISE:.0f}% or more after the best evaluation while "
            f"training loss fell, and it ended below {LOSS_RATIO:g}x the training loss.")


def inherited_metadata(path: str) -> dict:
    """license and language from the base model's own card (README.md in its local folder), where it says them: a
    fine-tuned model is under its base model's license, and reads the same language."""
    card = Path(path) / "README.md"
    if not card.is_file():
        return {}
    try:
        data = ModelCard.load(str(card), ignore_metadata_errors=True).data
    except Exception:  # a README without metadata, or one huggingface_hub cannot parse: nothing to inherit
        return {}
    return {k: getattr(data, k, None) for k in ("license", "language") if getattr(data, k, None)}


PEFT_SETTINGS = {"lora": ("lora_r", "lora_alpha", "lora_dropout"), "adalora": ("peft_r", "lora_alpha", "lora_dropout"),
                 "loha": ("peft_r",), "lokr": ("peft_r",), "ia3": ()}


def transfer_options(adapt: dict, mode: str, reports: dict | None = None) -> list[str]:
    """Each transfer setting of this run that is on, as `key=value` text for the card (adapt.* as to_dict gives it):
    the adapter's shape, which layers train and at what rates, alignment, reweighting, L2-SP; `reports`: what the
    options' hooks measured (hftl.hooks.Hook.report by name), e.g. reweighting's effective sample size."""
    out, reports = [], reports or {}
    if mode in PEFT_SETTINGS:
        targets = adapt["target_modules"] or "peft's default for the architecture"
        out.append(", ".join([*(f"adapt.{k}={adapt[k]}" for k in PEFT_SETTINGS[mode]), f"adapter on {targets}"]))
    if mode == "partial":
        out.append(f"adapt.top_layers={adapt['top_layers']} (the top encoder layers train; the rest stay frozen)")
    if mode == "gradual":
        out.append(f"adapt.unfreeze_every={adapt['unfreeze_every']} epochs (one more layer from the top each time)")
    if mode == "lpft":
        out.append(f"adapt.lp_epochs={adapt['lp_epochs']}, adapt.lp_learning_rate={adapt['lp_learning_rate']} (the head first)")
    if adapt["layer_lr_decay"] != 1.0:
        out.append(f"adapt.layer_lr_decay={adapt['layer_lr_decay']} (each layer down trains at that times the rate above it)")
    if adapt["l2sp"]:
        out.append(f"adapt.l2sp={adapt['l2sp']} (pretrained weights pulled towards their starting values)")
    if adapt["freeze_feature_encoder"]:
        out.append("adapt.freeze_feature_encoder=true (the waveform encoder stays as pretrained)")
    if adapt["align"]:
        out.append(f"adapt.align={adapt['align']}, adapt.align_weight={adapt['align_weight']} (domain alignment on data.target)")
    if adapt["reweight"]:
        line = f"adapt.reweight=true, adapt.reweight_clip={adapt['reweight_clip']} (training rows weighted towards data.target"
        if r := reports.get("reweight"):
            line += (f"; weights {r['min']:g} to {r['max']:g}, effective sample size {r['effective_sample_size']:g} of "
                     f"{r['rows']} training rows")
        out.append(line + ")")
    return out


# train.* keys that shape the result and belong in the card; the rest run the machinery (logging, checkpoints, memory,
# evaluation batching) and change nothing a reader of the model needs.
HYPERPARAMETERS = ("batch_size", "gradient_accumulation_steps", "learning_rate", "optimizer", "momentum", "weight_decay",
                   "warmup_ratio", "scheduler", "max_grad_norm", "class_weights", "label_smoothing", "regression_loss",
                   "normalize_targets", "mixed_precision", "seed", "metric_for_best", "early_stopping_patience", "threshold")


def hyperparameters(train: dict, steps: int, steps_per_epoch: int | None, solved: bool) -> dict:
    """What ran: optimizer steps and the epochs they make (not train.epochs beside a train.max_steps that overrode it),
    and the keys of HYPERPARAMETERS. A head that was solved and nothing else (no optimizer step) has none of them."""
    if solved and not steps:
        return {"seed": train["seed"]}
    out = {"optimizer steps": steps}
    if steps_per_epoch:
        out["epochs run"] = round(steps / steps_per_epoch, 3)
    return {**out, **{k: train[k] for k in HYPERPARAMETERS if train.get(k) is not None}}


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("hftl", "transformers", "torch", "datasets", "peft", "accelerate", "evaluate", "huggingface_hub"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    threads, processes = torch.get_num_threads(), int(os.environ.get("WORLD_SIZE", "1"))
    each = f"{threads} thread{'s' if threads != 1 else ''}"
    return f"CPU ({platform.processor() or platform.machine()}, " + (f"{processes} processes x {each} each)" if processes > 1 else f"{each})")


def hub_dataset_id(dataset_id: str | None) -> str | None:
    """data.name when it is a Hub data set's id: not a local folder or file that load_dataset read."""
    return dataset_id if dataset_id and not Path(dataset_id).exists() else None


def render(data: CardData, metric_names: list[str], template: str = "classification.md") -> ModelCard:
    # The Hub's model-index names its data set by Hub id (`dataset.type`, required: huggingface_hub's ModelCard.load
    # refuses a result without one). Local files have none, so their results are only in the card's table and
    # results.json, not in a model-index that would pass a folder's name off as a Hub data set.
    hub_id = hub_dataset_id(data.dataset_id)
    eval_results = [] if hub_id is None else [
        EvalResult(
            task_type=data.pipeline_tag,
            dataset_type=hub_id,
            dataset_name=data.dataset_name,
            dataset_split=split,
            metric_type=METRIC_TYPES.get(m, m),
            metric_name=METRIC_NAMES.get(m, m),
            metric_value=row[m],
        )
        for split, row in data.results.items()
        for m in metric_names
        if m in row
    ]
    card_data = ModelCardData(
        # huggingface_hub uses model_name to build the model-index; without one it would be a stray top-level key
        model_name=data.model_name if eval_results else None,
        base_model=data.base_model,
        datasets=[hub_id] if hub_id else None,
        library_name=data.library_name,
        license=data.license,
        language=data.language,
        pipeline_tag=data.pipeline_tag,
        tags=["hftl", f"hftl-{data.mode}", "transfer-learning", data.pipeline_tag],
        metrics=list(dict.fromkeys(METRIC_TYPES.get(m, m) for m in metric_names)),
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / template),
        metric_names=[m for m in metric_names if all(m in r for r in data.results.values())],
        base_model_ref=(f"a randomly initialised model in the architecture of {data.base_model or 'a local checkpoint'} "
                        "(model.from_scratch=true: nothing transferred, a baseline)") if data.from_scratch
        else data.base_model or "a local checkpoint",
        model_ref=data.model_name,
        num_labels=len(data.labels),
        task_summary=TASK_SUMMARY.get(data.task, "{n} outputs").format(n=len(data.labels)),
        labels=list(enumerate(data.labels)),
        hardware=_hardware(),
        overfitting=overfitting_check(data.history, data.metric_for_best, data.greater_is_better),
        versions=_versions(),
        **{k: v for k, v in vars(data).items() if k not in ("base_model", "labels")},
    )
