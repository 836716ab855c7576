"""Continued masked-language-model pretraining before classification (adapt.pretrain=mlm).

Domain- and task-adaptive pretraining (Gururangan et al. 2020, "Don't Stop Pretraining"): keep training
the encoder's own self-supervised objective on unlabelled in-domain text, then classify from that
checkpoint. The stage writes `<output.dir>.pretrained` (weights with their MLM head, tokenizer,
pretrain.json, README) and the classifier loads from there; 5% of the texts are held out to show the
masked-LM loss the stage started and ended with. The stage trains on the shared loop (hftl.train.fit), as the speech
and image stages do (hftl/pretrain_media.py): checkpoints, train.resume, stop signals, the non-finite-loss guard.
"""
from __future__ import annotations

import json
import math
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import torch
from accelerate.utils import set_seed
from datasets import Dataset, Value
from huggingface_hub import ModelCard
from datasets import DatasetDict
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoModelForMaskedLM, DataCollatorForLanguageModeling, DataCollatorWithPadding
from transformers.modeling_outputs import ModelOutput

from . import hub, models, pretrain_media
from .config import Config, ConfigError
from .data import FORMATS, DataError, _load_file, load_target
from .train import NonFiniteLossError, _lengths, fit

OBJECTIVES = ("auto", "mlm", "wav2vec2", "mim")  # speech and images: hftl/pretrain_media.py
HELDOUT = 0.05  # share of the texts that only measure the masked-LM loss
MASKED_TOKENS, MAX_PASSES = 2000, 20  # held-out masked tokens to aim for, and at most this many maskings of each text
TEXT_KEYS = ("text_column", "text_pair_column")  # DataConfig keys of the columns whose texts are pretrained on


def continue_pretraining(cfg: Config, path: str, splits, tokenizer, accelerator, target: Dataset | None = None, modality=None) -> str:
    """Train `path` as a masked LM on in-domain text and return the folder the classifier should load; speech and image
    checkpoints go to their own objectives (hftl/pretrain_media.py), which need the recipe's `modality`."""
    a, t = cfg.adapt, cfg.train
    if a.pretrain not in OBJECTIVES:
        raise ConfigError(f"adapt.pretrain='{a.pretrain}' is unknown; choose one of {list(OBJECTIVES)} or null (no pretraining stage).")
    objective = pretrain_media.objective_for(cfg, path)
    if objective in pretrain_media.OBJECTIVES:
        return pretrain_media.continue_pretraining(cfg, objective, path, splits, tokenizer, accelerator, target, modality)
    if cfg.task not in ("text-classification", "token-classification"):
        raise ConfigError(f"adapt.pretrain=mlm continues masked-language-model pretraining, which is for text; task={cfg.task} "
                          "has no masked-token objective here. Set adapt.pretrain=null.")
    if cfg.model.from_scratch:
        raise ConfigError("model.from_scratch=true re-initialises every weight after adapt.pretrain has trained them; "
                          "set one of them to false/null.")
    if tokenizer.mask_token is None:
        raise ConfigError(f"adapt.pretrain=mlm: the tokenizer of '{path}' has no mask token, so it was not pretrained with "
                          "masked-language modelling; use an encoder checkpoint (BERT, RoBERTa, ...) or set adapt.pretrain=null.")
    out = Path(str(Path(cfg.output.dir)) + ".pretrained")
    settings = {"base": path, "revision": cfg.model.revision, "pretrain_file": a.pretrain_file, "target": cfg.data.target,
                "epochs": a.pretrain_epochs, "learning_rate": a.pretrain_learning_rate, "mlm_probability": a.mlm_probability,
                "max_length": cfg.data.max_length, "seed": t.seed}
    if out.exists():
        info = out / "pretrain.json"
        if t.resume and info.is_file() and json.loads(info.read_text()).get("settings") == settings:
            # A resumed run continues the classifier stage; its checkpoints were trained from this folder.
            accelerator.print(f"adapt.pretrain: train.resume is set and {out} was written with these settings; reusing it.")
            return str(out)
        if not cfg.output.overwrite:
            raise hub.OutputError(f"'{out}' (adapt.pretrain's checkpoint for output.dir={cfg.output.dir}) exists; choose another "
                                  "output.dir, delete that folder, or set output.overwrite=true to replace it.")

    with accelerator.main_process_first():  # one process tokenizes, the others read its cache
        texts, source = _texts(cfg, splits, target)
        parts = texts.train_test_split(test_size=HELDOUT, seed=t.seed)
        encoded = parts.map(_tokenize(tokenizer, cfg.data.max_length), batched=True, remove_columns=["text"], desc="Tokenizing (mlm)")
    model = _load(AutoModelForMaskedLM, path, cfg).to(accelerator.device)

    start = time.perf_counter()
    # Held-out masks are drawn once, by a seeded collator, so before and after see the same ones.
    passes = min(MAX_PASSES, math.ceil(MASKED_TOKENS / max(1.0, a.mlm_probability * sum(_lengths(encoded["test"])))))
    heldout_dl = DataLoader(encoded["test"], batch_size=t.eval_batch_size,
                            collate_fn=DataCollatorForLanguageModeling(tokenizer, mlm_probability=a.mlm_probability, seed=t.seed))
    heldout = [batch for _ in range(passes) for batch in heldout_dl]
    before = _heldout_loss(model, heldout, accelerator)
    # The stage runs on the shared loop (hftl.train.fit: checkpoints in <train.checkpoint_dir>/pretrain, train.resume,
    # stop signals, the non-finite-loss guard, many processes), as the speech and image stages do. Training masks are
    # drawn in the objective's forward from torch's global RNG, which checkpoints save per process (the data loader reads
    # a batch ahead, so masks drawn there would not resume exactly); each process draws its own.
    stage = pretrain_media.stage_config(cfg)
    rows = encoded["train"].remove_columns([c for c in ("special_tokens_mask",) if c in encoded["train"].column_names])
    rows = rows.add_column("labels", [0] * len(rows))  # the loop's placeholder: the objective makes its own targets
    torch.manual_seed(t.seed + accelerator.process_index)
    objective = MaskedLM(model, DataCollatorForLanguageModeling(tokenizer, mlm_probability=a.mlm_probability))
    result = fit(objective, DatasetDict(train=rows), DataCollatorWithPadding(tokenizer), stage, accelerator,
                 task=pretrain_media.SelfSupervised(["unlabelled"]))
    model, step = result["model"].model, result["steps"]
    after = _heldout_loss(model, heldout, accelerator)
    if after is not None and not math.isfinite(after):
        raise NonFiniteLossError(f"adapt.pretrain: the held-out masked-LM loss is {after} after {step} steps; lower "
                                 "adapt.pretrain_learning_rate or set train.max_grad_norm.")
    log = result["step_log"]
    info = {"objective": "mlm", "source": source, "texts": len(parts["train"]), "rows": len(encoded["train"]),
            "heldout_texts": len(parts["test"]), "heldout_masked_tokens": sum(int((b["labels"] != -100).sum()) for b in heldout),
            "steps": step, "heldout_loss_before": before, "heldout_loss_after": after,
            "train_loss_first": log[0]["loss"] if log else None, "train_loss_last": log[-1]["loss"] if log else None,
            "heldout_perplexity_before": _perplexity(before), "heldout_perplexity_after": _perplexity(after),
            "seconds": round(time.perf_counter() - start, 2), "folder": str(out), "settings": settings}
    accelerator.print(f"adapt.pretrain=mlm: held-out masked-LM loss {_fmt(before)} -> {_fmt(after)} (perplexity "
                      f"{_fmt(info['heldout_perplexity_before'])} -> {_fmt(info['heldout_perplexity_after'])}) over "
                      f"{info['heldout_masked_tokens']} masked tokens of {info['heldout_texts']} held-out texts; trained on "
                      f"{info['texts']} texts from {source}, {step} steps, {info['seconds']}s")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # only one process writes
        _save(accelerator.unwrap_model(model), path, tokenizer, info, cfg)
        accelerator.print(f"Saved {out}; the classifier starts from it")
    accelerator.wait_for_everyone()  # the others load the classifier from the folder only once it is there
    accelerator.free_memory(model)
    # The classifier stage draws its head initialisation and data order as a run without this stage would.
    set_seed(t.seed)
    return str(out)


class MaskedLM(nn.Module):
    """The masked-LM loss of a batch whose masks it draws itself (transformers' DataCollatorForLanguageModeling rule:
    mlm_probability of the tokens, 80% [MASK], 10% a random token, 10% kept; special and padding tokens never), from
    torch's global RNG. A batch that already has its masked 'labels' (the held-out ones) is scored as it is."""

    def __init__(self, model, masker: DataCollatorForLanguageModeling):
        super().__init__()
        self.model, self.masker = model, masker

    def forward(self, input_ids, attention_mask=None, labels=None, **inputs) -> ModelOutput:
        if labels is None:
            device = input_ids.device
            special = torch.tensor([self.masker.tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
                                    for row in input_ids.tolist()], dtype=torch.bool)
            if attention_mask is not None:
                special |= attention_mask.cpu() == 0
            input_ids, labels = self.masker.torch_mask_tokens(input_ids.cpu().clone(), special_tokens_mask=special)
            input_ids, labels = input_ids.to(device), labels.to(device)
        loss = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **inputs).loss
        if not (labels != -100).any():  # nothing masked in this batch (very short texts): a zero that still touches the weights
            loss = sum(p.sum() for p in self.model.parameters()) * 0.0
        return ModelOutput(loss=loss, logits=loss)  # 'logits': what SelfSupervised hands the loop as the loss


def _load(auto_cls, path: str, cfg: Config):
    """`auto_cls.from_pretrained` with the classifier's safety settings (safetensors unless model.allow_pickle)."""
    m = cfg.model
    try:
        return auto_cls.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code,
                                        use_safetensors=None if m.allow_pickle else True)
    except OSError as e:
        if m.allow_pickle or "safetensors" not in str(e):
            raise
        raise ConfigError(models._no_safetensors(path)) from e
    except pickle.UnpicklingError as e:
        raise ConfigError(models.pickle_refused(path, e)) from e
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        raise ConfigError(f"adapt.pretrain=mlm: '{path}' has no masked-language-model form in transformers "
                          "(AutoModelForMaskedLM); use an encoder checkpoint (BERT, RoBERTa, ...) or set adapt.pretrain=null.") from e


def _column(ds: Dataset, column: str) -> Dataset:
    """The rows' `column` as a string column named 'text'."""
    ds = ds.select_columns([column])
    ds = ds if column == "text" else ds.rename_column(column, "text")
    return ds.cast_column("text", Value("string"))


def _sentences(ds: Dataset, column: str) -> Dataset:
    """Rows of words (token classification's `column`) as a string column 'text': the words joined by spaces."""
    return ds.map(lambda b: {"text": [" ".join(words) for words in b[column]]}, batched=True, remove_columns=ds.column_names,
                  desc="Joining words")


def _texts(cfg: Config, splits, target: Dataset | None) -> tuple[Dataset, str]:
    """Non-blank texts: adapt.pretrain_file's, else the training texts (both columns of a pair) plus data.target's."""
    d, file = cfg.data, cfg.adapt.pretrain_file
    if file:
        p = Path(file)
        if not p.is_file():
            raise DataError(f"adapt.pretrain_file: file '{file}' does not exist.")
        if p.suffix.lower() != ".txt" and p.suffix.lower() not in FORMATS:
            raise DataError(f"adapt.pretrain_file: '{file}' has suffix '{p.suffix}'; expected .txt (one text per line) "
                            f"or one of {', '.join(FORMATS)}.")
        if p.stat().st_size == 0:
            raise DataError(f"adapt.pretrain_file: '{file}' is empty; it needs at least two texts.")
        if p.suffix.lower() == ".txt":
            texts = datasets.load_dataset("text", data_files=str(p), split="train")  # cached by the file's content
        else:
            texts = _load_file(file, "pretrain_file")
            if d.text_column not in texts.column_names:
                raise DataError(f"adapt.pretrain_file '{file}' has no column '{d.text_column}' (data.text_column); its columns are "
                                f"{texts.column_names}. Set data.text_column, or give a .txt file with one text per line.")
            texts = _column(texts, d.text_column)
        source = file
    else:
        if target is None and d.target:
            target = load_target(d, splits["train"].features["labels"].names, TEXT_KEYS)[0]["train"]
        sources = [splits["train"]] + ([target] if target is not None else [])
        if cfg.task == "token-classification":  # rows of words: their sentences
            texts = datasets.concatenate_datasets([_sentences(ds, d.tokens_column) for ds in sources])
        else:
            texts = datasets.concatenate_datasets([_column(ds, getattr(d, k)) for ds in sources for k in TEXT_KEYS if getattr(d, k)])
        source = "the training texts" + (" and data.target's" if target is not None else "")
    texts = texts.filter(lambda b: [t is not None and t.strip() != "" for t in b["text"]], batched=True, desc="Dropping blank texts")
    if len(texts) < 2:
        raise DataError(f"adapt.pretrain: {source} give(s) {len(texts)} non-blank text(s); masked-LM pretraining needs at least "
                        "two (one is held out to measure it).")
    return texts, source


def _tokenize(tokenizer, max_length: int):
    def tokenize(batch):
        # A text longer than max_length continues in further rows (fast tokenizers) instead of being cut off.
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length, return_special_tokens_mask=True,
                        return_overflowing_tokens=tokenizer.is_fast)
        enc.pop("overflow_to_sample_mapping", None)
        return enc

    return tokenize


def _heldout_loss(model, batches: list[dict], accelerator) -> float | None:
    """Mean masked-LM loss per masked held-out token (None when no token was masked). Every process computes
    the same number over all held-out batches."""
    model = accelerator.unwrap_model(model)
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode(), accelerator.autocast():
        for batch in batches:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            n = int((batch["labels"] != -100).sum())
            if n:
                total, count = total + model(**batch).loss.float().item() * n, count + n
    model.train()
    return total / count if count else None


def _perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 700))  # 700: beyond it exp overflows a float


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _save(model, path: str, tokenizer, info: dict, cfg: Config) -> None:
    """Write the folder atomically (hub.save_output), keeping the checkpoint's weights the masked LM does not
    use (BERT's pooler): the classifier then finds everything the original checkpoint gave it."""
    trained = model.base_model.state_dict()
    base = _load(AutoModel, path, cfg).state_dict()
    state = {**model.state_dict(), **{f"{model.base_model_prefix}.{k}": v for k, v in base.items() if k not in trained}}
    card = ModelCard(
        "---\nlibrary_name: transformers\npipeline_tag: fill-mask\ntags: [hftl, continued-pretraining]\n---\n"
        f"# {Path(info['folder']).name}\n\nMasked-language-model continued pretraining (Gururangan et al. 2020) of `{path}` "
        f"on {info['texts']} texts from {info['source']}: {info['steps']} steps; held-out masked-LM loss "
        f"{_fmt(info['heldout_loss_before'])} -> {_fmt(info['heldout_loss_after'])} on {info['heldout_texts']} texts. "
        f"The first stage of the hftl run that writes `{cfg.output.dir}`; details in pretrain.json.\n"
    )
    # save_output writes export(model).save_pretrained(folder): hand it the state with the kept weights.
    hub.save_output(info["folder"], model, tokenizer, card, {"pretrain.json": info}, overwrite=cfg.output.overwrite,
                    export=lambda m: SimpleNamespace(save_pretrained=lambda folder: m.save_pretrained(folder, state_dict=state)))
