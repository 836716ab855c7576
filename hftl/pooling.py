"""What the task head reads: the representation the checkpoint was trained to give (adapt.pooling, adapt.layer).

A checkpoint is pretrained to be read one way. all-MiniLM-L6-v2 was trained by sentence-transformers to be read as
the mean of its token vectors, normalised (its `1_Pooling/config.json` and `modules.json` say so), while
`BertForSequenceClassification` classifies from the [CLS] token through BERT's pooler; frozen, that token carries
little of what the mean does (SST-2 head mode: 68% against 81% for the mean). So hftl reads what the checkpoint
says (`adapt.pooling=auto`), or what the user asks for (`pooler`, `cls`, `mean`, `max`), at the output of the last
encoder layer or of an earlier one (`adapt.layer`).

Everything downstream (head mode and its feature cache, lpft's probe, `hftl rank`, the domain-gap estimate,
reweighting) reads features through the model's own forward with its head swapped out, so choosing the
representation here is choosing it everywhere. Two ways to build it:

- **native**: the architecture's own `AutoModelFor*Classification` does it: `pooler` (the architecture's head:
  BERT's [CLS] + pooler, RoBERTa's [CLS] head, ...), wav2vec2-family `mean`, ViT `cls`. An earlier layer is the
  same model with the encoder truncated (`num_hidden_layers`), which is exact and still a standard folder, so
  `transformers.pipeline` loads the result as before.
- **sentence-transformers**: a text pooling the architecture's head cannot express (mean, max, or [CLS] without
  the pooler over a BERT body). `PooledClassifier` wraps the backbone (`AutoModel`), pools exactly as
  sentence-transformers' `Pooling` module does (and normalises where the checkpoint's `Normalize` module did), and
  classifies with one linear layer. It is saved in the sentence-transformers layout (`modules.json`: Transformer,
  Pooling, [Normalize], Dense with one output per label; safetensors only), which
  `sentence_transformers.SentenceTransformer(folder)` loads as it is, without any code of ours or of the checkpoint's:
  `encode()` gives one score (logit) per label, and the label names are in `0_Transformer/config.json`. The folder
  has no top-level config.json, so `transformers.pipeline` refuses it instead of loading the backbone with a random
  head. The reload check goes through sentence-transformers' loader.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import SequenceClassifierOutput

from .config import POOLINGS, ConfigError

# What each modality's AutoModelFor*Classification reads, when it is one of the named poolings.
NATIVE = {"text-classification": "pooler", "audio-classification": "mean", "image-classification": "cls"}
ST_LIBRARY = "sentence-transformers"


@dataclass(frozen=True)
class Representation:
    pooling: str  # pooler, cls, mean or max
    layers: int | None  # keep the first this many encoder layers (None: all)
    normalize: bool  # L2-normalise the pooled vector (the checkpoint's sentence-transformers Normalize module)
    native: bool  # the architecture's own classification model computes it
    why: str  # where the choice came from, for the log and the card

    @property
    def library(self) -> str:
        return "transformers" if self.native else ST_LIBRARY

    def describe(self) -> str:
        layer = "the last encoder layer" if self.layers is None else f"encoder layer {self.layers}"
        how = "the architecture's own head" if self.pooling == "pooler" else f"{self.pooling} pooling"
        return f"{how}{', L2-normalised' if self.normalize else ''}, at {layer} ({self.why})"


def sentence_transformers_pooling(path: str | Path) -> tuple[str, bool] | None:
    """(pooling mode, normalised) from a sentence-transformers folder's modules.json and Pooling config, or None."""
    folder = Path(path)
    modules = folder / "modules.json"
    if not modules.is_file():
        return None
    try:
        entries = json.loads(modules.read_text())
        pooling = next(m for m in entries if m.get("type", "").endswith("Pooling") and "Weighted" not in m.get("type", ""))
        config = json.loads((folder / pooling.get("path", "") / "config.json").read_text())
    except (OSError, ValueError, StopIteration, AttributeError):
        return None
    mode = config.get("pooling_mode")  # sentence-transformers >= 5 writes one key; older releases one flag per mode
    if isinstance(mode, list):
        mode = mode[0] if len(mode) == 1 else None
    if mode is None:
        flags = [m for m in ("cls", "mean", "max") if config.get(f"pooling_mode_{m}_token" if m == "cls" else f"pooling_mode_{m}_tokens")]
        mode = flags[0] if len(flags) == 1 else None
    if mode not in ("cls", "mean", "max"):
        return None
    normalized = any(m.get("type", "").endswith("Normalize") for m in entries)
    return mode, normalized


def resolve(pooling: str, layer: int | None, path: str, config, task: str, frozen: bool = True) -> Representation:
    """The representation a run reads, from adapt.pooling / adapt.layer and the checkpoint at `path`. `frozen`: the
    head is fitted on frozen features (head, lpft, contrastive, hftl rank); only then does `auto` read the checkpoint's
    sentence-transformers pooling, while fine-tuning from a fresh head keeps the architecture's own."""
    if pooling not in POOLINGS:
        raise ConfigError(f"adapt.pooling='{pooling}'; expected one of {', '.join(POOLINGS)}.")
    native_name = NATIVE.get(task, "pooler")
    found = sentence_transformers_pooling(path)
    normalize = False
    if pooling == "auto":
        if found and task == "text-classification" and frozen:
            pooling, normalize = found
            why = "the checkpoint's sentence-transformers pooling config"
        else:
            pooling, why = native_name, "the architecture's own head"
    else:
        why = "adapt.pooling"
        normalize = bool(found and found[0] == pooling and found[1])
    native = pooling in ("pooler", native_name)
    if not native and task != "text-classification":
        raise ConfigError(f"adapt.pooling={pooling}: {task} models read {native_name} pooling in their own head, and hftl "
                          f"builds other poolings for text only; set adapt.pooling=auto (or {native_name}).")
    return Representation(pooling, _layers(layer, config), normalize, native, why)


def _layers(layer: int | None, config) -> int | None:
    """adapt.layer -> how many encoder layers to keep (None: all). 1..L from the bottom, -1..-L from the top."""
    if layer is None:
        return None
    total = getattr(config, "num_hidden_layers", None)
    if total is None:
        raise ConfigError(f"adapt.layer={layer}: {type(config).__name__} has no num_hidden_layers, so hftl cannot choose an "
                          "encoder layer; leave adapt.layer unset.")
    keep = layer if layer > 0 else total + 1 + layer
    if not 1 <= keep <= total:
        raise ConfigError(f"adapt.layer={layer}: the checkpoint has {total} encoder layers; choose 1..{total} (from the bottom) "
                          f"or -1..-{total} (from the top), or leave it unset for the last.")
    return None if keep == total else keep


# ---------------------------------------------------------------- the sentence-transformers-style classifier


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """sentence-transformers' Pooling on right-padded batches, with its operations, so a saved model gives what it
    evaluated."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values
    m = mask.unsqueeze(-1).to(hidden.dtype)
    total = (hidden * m).sum(dim=1, dtype=torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype)
    return (total / torch.clamp(m.sum(dim=1, dtype=total.dtype), min=1e-9)).to(hidden.dtype)


class PooledClassifier(nn.Module):
    """backbone (AutoModel) -> pooled token vectors [-> L2 normalisation] -> linear classifier.

    Called like a transformers classifier (`model(**batch)` -> SequenceClassifierOutput; the loop computes the task's
    loss on its logits); `config` is the backbone's, carrying the label names. The backbone's own pooler (BERT) is not used: it is
    taken out of the module tree, so no optimizer or DDP sees parameters without gradients, and put back when saved,
    so the saved backbone is the checkpoint's architecture, whole."""

    def __init__(self, backbone: nn.Module, representation: Representation, num_labels: int):
        super().__init__()
        self.representation = representation
        self.unused = {}
        if getattr(backbone, "pooler", None) is not None:
            self.unused = {f"pooler.{k}": v.detach().clone() for k, v in backbone.pooler.state_dict().items()}
            backbone.pooler = None
        self.backbone = backbone
        self.config = backbone.config
        # No dropout between the pooled vector and the classifier (sentence-transformers and SetFit have none), so the
        # features a head is solved on, or a contrastive loss compares, are the ones it classifies.
        self.classifier = nn.Linear(self.config.hidden_size, num_labels)
        self.classifier.weight.data.normal_(0.0, getattr(self.config, "initializer_range", 0.02))
        self.classifier.bias.data.zero_()

    def forward(self, input_ids=None, attention_mask=None, **inputs) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        pooled = pool(hidden, attention_mask, self.representation.pooling)
        if self.representation.normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return SequenceClassifierOutput(logits=self.classifier(pooled))

    # The processor (tokenizer) goes beside the backbone, where sentence-transformers' Transformer module reads it.
    processor_subfolder = "0_Transformer"

    def save_pretrained(self, folder: str | Path) -> None:
        """The sentence-transformers layout: the backbone in 0_Transformer/ (module 0, Transformer), then Pooling,
        Normalize where the checkpoint had it, and Dense (the classifier, no activation). Weights as safetensors.
        There is deliberately no config.json at the top: transformers' pipeline() would otherwise load the backbone with
        a random classifier and predict nonsense without an error."""
        folder = Path(folder)
        state = {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
        self.backbone.save_pretrained(folder / self.processor_subfolder, state_dict={**state, **self.unused}, safe_serialization=True)
        r, dim = self.representation, self.config.hidden_size
        modules = [{"idx": 0, "name": "0", "path": self.processor_subfolder, "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        _write_json(folder / "1_Pooling" / "config.json", {
            "word_embedding_dimension": dim, "pooling_mode_cls_token": r.pooling == "cls",
            "pooling_mode_mean_tokens": r.pooling == "mean", "pooling_mode_max_tokens": r.pooling == "max",
            "pooling_mode_mean_sqrt_len_tokens": False})
        if r.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
            (folder / "2_Normalize").mkdir(exist_ok=True)
        dense = f"{len(modules)}_Dense"
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": dense, "type": "sentence_transformers.models.Dense"})
        _write_json(folder / dense / "config.json", {"in_features": dim, "out_features": self.classifier.out_features, "bias": True,
                                                     "activation_function": "torch.nn.modules.linear.Identity"})
        from safetensors.torch import save_file

        save_file({"linear.weight": self.classifier.weight.detach().cpu().contiguous(),
                   "linear.bias": self.classifier.bias.detach().cpu().contiguous()}, str(folder / dense / "model.safetensors"))
        _write_json(folder / "modules.json", modules)
        max_length = getattr(self, "max_seq_length", None) or getattr(self.config, "max_position_embeddings", 512)
        _write_json(folder / self.processor_subfolder / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
        _write_json(folder / "config_sentence_transformers.json", {"model_type": "SentenceTransformer", "similarity_fn_name": "cosine"})


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def load_sentence_transformers(folder: str | Path):
    """The saved folder through sentence-transformers' own loader (no remote code, safetensors)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError(f"adapt.pooling chose a pooling the architecture's own head cannot express, so the model is saved in the "
                          f"sentence-transformers layout, and checking it needs that library: pip install sentence-transformers "
                          f"(or set adapt.pooling=pooler for a plain transformers folder).") from None
    return SentenceTransformer(str(folder), device="cpu", local_files_only=True, trust_remote_code=False)


def predict_sentence_transformers(folder: str | Path, texts: list, batch_size: int = 32) -> tuple[list[str], torch.Tensor]:
    """(label names in id order, logits per text) for `texts` (strings, or {'text', 'text_pair'} dicts) from a saved
    sentence-transformers classifier; the names come from its Transformer module's config.json."""
    model = load_sentence_transformers(folder)
    id2label = json.loads((Path(folder) / PooledClassifier.processor_subfolder / "config.json").read_text())["id2label"]
    if texts and isinstance(texts[0], dict):
        texts = [[t["text"], t["text_pair"]] for t in texts]
    logits = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    return [id2label[str(i)] for i in range(len(id2label))], logits.cpu()


def is_sentence_transformers_classifier(folder: str | Path) -> bool:
    """A folder PooledClassifier.save_pretrained wrote: modules.json ending in a Dense layer, labels in 0_Transformer."""
    folder = Path(folder)
    try:
        modules = json.loads((folder / "modules.json").read_text())
        config = json.loads((folder / PooledClassifier.processor_subfolder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(modules) and modules[-1].get("type", "").endswith("Dense") and "id2label" in config
