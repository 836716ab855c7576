"""The one training loop: Accelerate prepare, backward, accumulate, clip, schedule, evaluate.

Shaped like accelerate's `complete_nlp_example.py`; no callback framework. Works unchanged on one
CPU, one GPU or many processes under `accelerate launch`.
"""
from __future__ import annotations

import math
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import DatasetDict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.trainer_pt_utils import LengthGroupedSampler

from . import metrics as metrics_lib
from .config import Config, TrainConfig


class NonFiniteLossError(RuntimeError):
    pass


def make_accelerator(cfg: TrainConfig, project_dir: str | None = None) -> Accelerator:
    precision = cfg.mixed_precision
    if precision == "auto":
        # bf16 autocast is ~100x slower on CPUs without AMX; use it only where the hardware has it.
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"train.mixed_precision='{cfg.mixed_precision}'; expected auto, no, bf16 or fp16.")
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=cfg.report_to or None,
        project_dir=project_dir,
    )
    set_seed(cfg.seed)
    return accelerator


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # Biases and norm weights are not decayed (BERT convention).
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate)


def _lengths(ds) -> list[int]:
    return [len(ids) for ids in ds["input_ids"]]


def evaluate(model, dataloader, accelerator: Accelerator, metric_modules, order: list[int] | None = None) -> dict:
    """Metrics, mean loss and predictions over every example exactly once (gather_for_metrics).

    `order[i]` is the original row of the i-th example the dataloader yields; predictions come back in row order."""
    model.eval()
    preds, refs, losses = [], [], []
    with torch.inference_mode():
        for batch in dataloader:
            out = model(**batch)
            p, r, loss = accelerator.gather_for_metrics(
                (out.logits.argmax(-1), batch["labels"], out.loss.detach().repeat(len(batch["labels"])))
            )
            preds.append(p.cpu()), refs.append(r.cpu()), losses.append(loss.float().cpu())
    model.train()
    preds, refs = torch.cat(preds).tolist(), torch.cat(refs).tolist()
    if order is not None:
        unsorted = [0] * len(preds)
        for i, row in enumerate(order):
            unsorted[row] = preds[i]
        preds = unsorted
    scores = metrics_lib.compute(metric_modules, preds, refs)
    scores["loss"] = float(torch.cat(losses).mean())
    return {"metrics": scores, "predictions": preds}


def _snapshot(model) -> dict[str, torch.Tensor]:
    """CPU copy of what training can change: trainable parameters and buffers (frozen weights never move)."""
    state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().to("cpu", copy=True) for n, b in model.named_buffers()})
    return state


def fit(model, encoded: DatasetDict, collator, cfg: Config, accelerator: Accelerator) -> dict:
    """Train, evaluate on validation during training, restore the best evaluation, evaluate again."""
    t = cfg.train
    generator = torch.Generator().manual_seed(t.seed)
    if t.group_by_length and "input_ids" in encoded["train"].column_names:
        # Random "megabatches" sorted by length inside (transformers' sampler): about half the padding of random batches.
        sampler = LengthGroupedSampler(t.batch_size, lengths=_lengths(encoded["train"]), generator=generator)
        train_dl = DataLoader(encoded["train"], batch_size=t.batch_size, sampler=sampler, collate_fn=collator)
    else:
        train_dl = DataLoader(encoded["train"], batch_size=t.batch_size, shuffle=True, collate_fn=collator, generator=generator)
    # Evaluate length-sorted (least padding); `orders` maps predictions back to row order.
    orders, eval_dls = {}, {}
    for split in ("validation", "test"):
        if split in encoded:
            ds = encoded[split]
            orders[split] = sorted(range(len(ds)), key=_lengths(ds).__getitem__) if "input_ids" in ds.column_names else list(range(len(ds)))
            eval_dls[split] = DataLoader(ds.select(orders[split]), batch_size=t.eval_batch_size, collate_fn=collator)
    optimizer = _optimizer(model, t)
    model, optimizer, train_dl, *prepared = accelerator.prepare(model, optimizer, train_dl, *eval_dls.values())
    eval_dls = dict(zip(eval_dls, prepared))

    steps_per_epoch = max(1, math.ceil(len(train_dl) / t.gradient_accumulation_steps))
    total_steps = t.max_steps or max(1, math.ceil(steps_per_epoch * t.epochs))
    scheduler = get_scheduler(
        t.scheduler, optimizer, num_warmup_steps=int(t.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    eval_every = max(1, steps_per_epoch // max(1, t.evals_per_epoch))
    metric_modules = metrics_lib.load_metrics(t.metrics)
    if t.report_to:
        accelerator.init_trackers("hftl", config={"lr": t.learning_rate, "batch_size": t.batch_size, "epochs": t.epochs})

    history, best, best_state, bad_evals = [], None, None, 0
    step, running, n_running = 0, 0.0, 0
    sign = 1 if t.greater_is_better else -1
    # Redraw rarely when the output is a log file rather than a terminal.
    bar = tqdm(total=total_steps, desc="Training", disable=not accelerator.is_local_main_process,
               mininterval=0.1 if sys.stderr.isatty() else 30)
    start = time.perf_counter()
    model.train()
    stop = False
    while not stop:
        for batch in train_dl:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            # A NaN on any process stops every process at the same step.
            finite = accelerator.reduce(torch.isfinite(loss.detach()).float().reshape(1), reduction="sum")
            if finite.item() < accelerator.num_processes:
                raise NonFiniteLossError(
                    f"non-finite training loss at optimizer step {step}; lower train.learning_rate, "
                    "set train.max_grad_norm, or train.mixed_precision=no."
                )
            running, n_running = running + loss.item(), n_running + 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            bar.update(1)
            if step % t.log_every == 0:
                bar.set_postfix(loss=f"{running / n_running:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if t.report_to:
                    accelerator.log({"train/loss": running / n_running, "train/lr": scheduler.get_last_lr()[0]}, step=step)
            if step % eval_every == 0 or step == total_steps:
                result = evaluate(model, eval_dls["validation"], accelerator, metric_modules)
                scores = result["metrics"]
                if t.metric_for_best not in scores:
                    raise ValueError(f"train.metric_for_best='{t.metric_for_best}' is not computed; validation gives {sorted(scores)}.")
                entry = {"step": step, "epoch": round(step / steps_per_epoch, 3),
                         "train_loss": running / max(n_running, 1), **{f"eval_{k}": v for k, v in scores.items()}}
                history.append(entry)
                running, n_running = 0.0, 0
                accelerator.print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
                if t.report_to:
                    accelerator.log({f"eval/{k}": v for k, v in scores.items()}, step=step)
                if best is None or sign * scores[t.metric_for_best] > sign * best["metrics"][t.metric_for_best]:
                    best, bad_evals = {"step": step, "metrics": scores}, 0
                    best_state = _snapshot(accelerator.unwrap_model(model))
                else:
                    bad_evals += 1
                    if t.early_stopping_patience and bad_evals >= t.early_stopping_patience:
                        accelerator.print(f"early stopping: no {t.metric_for_best} gain in {bad_evals} evaluations")
                        stop = True
            if step >= total_steps or stop:
                stop = True
                break
    bar.close()
    train_seconds = time.perf_counter() - start

    unwrapped = accelerator.unwrap_model(model)
    if best_state is not None:
        unwrapped.load_state_dict(best_state, strict=False)
    final = {split: evaluate(model, dl, accelerator, metric_modules, orders[split]) for split, dl in eval_dls.items()}
    if t.report_to:
        accelerator.end_training()
    return {
        "model": unwrapped,
        "history": history,
        "best_step": best["step"] if best else step,
        "steps": step,
        "train_seconds": train_seconds,
        "results": {split: r["metrics"] for split, r in final.items()},
        "predictions": {split: r["predictions"] for split, r in final.items()},
    }
