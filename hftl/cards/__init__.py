"""Model card: metadata and results gathered during the run, rendered with huggingface_hub.ModelCard."""
from __future__ import annotations

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
METRIC_TYPES = {"f1": "f1", "precision": "precision", "recall": "recall", "accuracy": "accuracy"}


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
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def render(data: CardData, metric_names: list[str], template: str = "classification.md") -> ModelCard:
    eval_results = [
        EvalResult(
            task_type=data.pipeline_tag,
            dataset_type=data.dataset_id or data.dataset_name,
            dataset_name=data.dataset_name,
            dataset_split=split,
            metric_type=METRIC_TYPES.get(m, m),
            metric_name=f"{m} (macro)" if m in ("f1", "precision", "recall") else m,
            metric_value=row[m],
        )
        for split, row in data.results.items()
        for m in metric_names
        if m in row
    ]
    card_data = ModelCardData(
        model_name=data.model_name,
        base_model=data.base_model,
        datasets=[data.dataset_id] if data.dataset_id else None,
        library_name="transformers",
        pipeline_tag=data.pipeline_tag,
        tags=["hftl", f"hftl-{data.mode}", "transfer-learning", data.pipeline_tag],
        metrics=[METRIC_TYPES.get(m, m) for m in metric_names],
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / template),
        metric_names=[m for m in metric_names if all(m in r for r in data.results.values())],
        base_model_ref=data.base_model or "a local checkpoint",
        model_ref=data.model_name,
        num_labels=len(data.labels),
        labels=list(enumerate(data.labels)),
        hardware=_hardware(),
        versions=_versions(),
        **{k: v for k, v in vars(data).items() if k not in ("base_model", "labels")},
    )
