"""The one training loop: Accelerate prepare, backward, accumulate, clip, schedule, evaluate.

Shaped like accelerate's `complete_nlp_example.py`; no callback framework. Works unchanged on one
CPU, one GPU or many processes under `accelerate launch`.
"""
from __future__ import annotations

import ctypes
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import accelerate.utils
import numpy as np
import pyarrow.compute as pc
import torch
from accelerate import Accelerator, tracking
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, get_int_from_env, set_seed
from datasets import DatasetDict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from . import checkpoint, hub
from . import metrics as metrics_lib
from .config import TRACKERS, Config, ConfigError, TrainConfig, to_flat
from .errors import UserError
from .tasks.token_classification import IGNORE, WINDOW


class NonFiniteLossError(UserError, RuntimeError):
    """Training diverged; the message names the settings to change."""


class LaunchError(UserError, RuntimeError):
    """The launcher started processes that Accelerate does not join into one run."""


def make_accelerator(cfg: TrainConfig, project_dir: str | None = None) -> Accelerator:
    precision = cfg.mixed_precision
    if precision == "auto":
        # fp32 on every device. bf16 autocast is ~100x slower on CPUs without AMX, and on an H200 it made hftl
        # slower for MiniLM (0.33x) and bert-base (0.54x) fine-tuning: at this size the steps are bound by kernel
        # launches, and GEMMs over odd sequence lengths miss the tensor cores (scripts/results/precision_h200.md).
        # Large models gain from train.mixed_precision=bf16; scripts/bench_precision.py measures it.
        precision = "no"
    if precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"train.mixed_precision='{cfg.mixed_precision}'; expected auto, no, bf16 or fp16.")
    mmap_threshold_bytes(cfg.cpu_mmap_threshold_mib)  # a bad value fails now, not after loading and preprocessing
    check_trackers(cfg)
    # One process may hold several runs (hftl compare, a notebook); Accelerate keeps one global state and refuses a
    # second Accelerator with another precision unless it is reset. The process group (PartialState) stays.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # Trackers are attached in fit (start_trackers), which knows output.dir and so where their files go.
        project_dir=project_dir,
        # Plain shuffling reseeds with seed + epoch (SeedableRandomSampler), so a resumed run can replay an epoch's order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    launched = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    if launched > 1 and accelerator.num_processes == 1:
        # e.g. CPU-only torchrun without ACCELERATE_USE_CPU=1: N independent runs that would all write the same outputs.
        raise LaunchError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but Accelerate sees a single one: each "
            "would train alone and write the same files. On CPU set ACCELERATE_USE_CPU=1 "
            "(ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m hftl train ...); on GPUs make sure CUDA is visible, "
            "or start with `accelerate launch -m hftl train ...`."
        )
    set_seed(cfg.seed)
    return accelerator


def check_trackers(cfg: TrainConfig) -> None:
    """Each train.report_to tracker is installed (Accelerate's own check), before any data is read."""
    for name in cfg.report_to or ():
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to has '{name}'; choose from {', '.join(TRACKERS)} (or null for none).")
        if not getattr(accelerate.utils, f"is_{name}_available")():
            raise ConfigError(f"train.report_to has {name}, which is not installed: pip install 'hftl[{name}]'.")


def start_trackers(accelerator: Accelerator, cfg: Config) -> None:
    """Accelerate's trackers for train.report_to, named by train.tracker_project and train.run_name, with the
    resolved config as the run's hyperparameters. Local files go to train.logging_dir, by default 'runs' beside
    output.dir: never inside it, since output.dir is written elsewhere and swapped in whole at the end."""
    t, out = cfg.train, Path(cfg.output.dir)
    root = Path(t.logging_dir) if t.logging_dir else out.absolute().parent / "runs"
    run = run_name(cfg)
    make = {
        "tensorboard": lambda: tracking.TensorBoardTracker(run, root / t.tracker_project),  # events in <root>/<project>/<run>
        "wandb": lambda: tracking.WandBTracker(t.tracker_project, name=run, dir=str(root)),
        "mlflow": lambda: tracking.MLflowTracker(t.tracker_project, str(root.absolute() / "mlflow"), run_name=run),
        "trackio": lambda: tracking.TrackioTracker(t.tracker_project, name=run),
    }
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
    accelerator.log_with = [make[name]() for name in t.report_to]
    # init_trackers adds to the trackers of an earlier fit on this accelerator (lpft's two stages), and would start
    # and feed those again: end_training finished them.
    accelerator.trackers = []
    # TensorBoard's hparams take numbers, text and booleans only: null and lists go as their JSON text.
    hparams = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in to_flat(cfg).items()}
    accelerator.init_trackers(t.tracker_project, config=hparams)
    accelerator.print(f"Tracking run '{run}' of project '{t.tracker_project}' with {', '.join(t.report_to)}"
                      + (f" (TensorBoard: {root / t.tracker_project / run})" if "tensorboard" in t.report_to else ""))


def run_name(cfg: Config) -> str:
    """train.run_name, or output.dir's name and the time now."""
    return cfg.train.run_name or f"{Path(cfg.output.dir).name}-{time.strftime('%Y%m%d-%H%M%S')}"


def return_freed_blocks(threshold_mib: float | None, device: torch.device) -> bool:
    """Training on a CPU with glibc: allocations of at least `threshold_mib` get their own memory mapping, handed back
    to the system when freed (mallopt M_MMAP_THRESHOLD). Returns whether the threshold was set. Called when training
    starts, not before: inference (feature caching, hftl rank) leaves no heap holes behind, and there the fresh
    mappings only cost time (head mode's feature pass on SST-2: 37-42 s instead of 29-30 s).

    Why: glibc raises its threshold to the largest block freed so far (up to 32 MiB), so after the first batch every
    activation tensor that backward keeps (a few MiB, a new shape each batch) comes from the heap, whose freed holes
    fragment and are kept. MiniLM full fine-tuning on SST-2 (1 epoch, 2 CPU cores, one run each) peaked at 2,291 MiB
    with glibc's default and 1,970 MiB with 2 MiB, in the same time (1 MiB: 1,890 MiB but training 20% slower, as each
    mapping is faulted in afresh; 4 MiB: 2,212 MiB); BENCHMARKS.md's "glibc" rows: 2,235 -> 2,004 MiB.
    MALLOC_MMAP_THRESHOLD_ in the environment wins."""
    size = mmap_threshold_bytes(threshold_mib)
    if size is None or device.type != "cpu" or "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    M_MMAP_THRESHOLD = -3
    return bool(mallopt(M_MMAP_THRESHOLD, size))


def mmap_threshold_bytes(threshold_mib: float | None) -> int | None:
    """train.cpu_mmap_threshold_mib in bytes (None or 0: glibc's default); checked when the run starts, not when training does."""
    if not threshold_mib:
        return None
    if not 0 < threshold_mib <= 32:  # glibc refuses more than 32 MiB
        raise ConfigError(f"train.cpu_mmap_threshold_mib={threshold_mib}; expected a size in MiB above 0 and at most 32, 0 "
                         "(glibc's adaptive default) or null (2 MiB for length-grouped batches, else glibc's default).")
    return int(threshold_mib * 2**20)


# train.cpu_mmap_threshold_mib=null with length-grouped batches in sorted order. Batches whose shape jumps from step to
# step (random ones; grouped ones in random order, token classification's default) keep glibc's threshold: each
# has a new, large shape, and mapping those blocks afresh every step cost CoNLL-2003 full fine-tuning 17% of its
# training time with random batches (60 steps of MiniLM, 2 CPU cores, twice each in turn: 49.2-50.3 s against
# 41.9 s; the Trainer, on glibc's default: 42.4-42.8 s), LoRA on grouped batches in random order 9% (120 steps:
# 38.3 s against 35.2 s).
GROUPED_MMAP_THRESHOLD_MIB = 2.0


def cpu_mmap_threshold(t: TrainConfig) -> float | None:
    """The threshold a run's training sets (train.cpu_mmap_threshold_mib, null resolved by the batches' order)."""
    if t.cpu_mmap_threshold_mib is not None:
        return t.cpu_mmap_threshold_mib
    return GROUPED_MMAP_THRESHOLD_MIB if t.group_by_length is not False and not t.shuffle_grouped_batches else None


def tensor_core_padding(collator, accelerator: Accelerator):
    """Under bf16/fp16, pad text batches to a multiple of 8 (as transformers' examples do): on an H200, bf16 steps
    over varied odd lengths took 2.7x as long as over lengths rounded to 8 (scripts/results/precision_h200.md)."""
    if accelerator.mixed_precision != "no" and hasattr(collator, "pad_to_multiple_of"):
        collator.pad_to_multiple_of = 8
    return collator


def param_groups(params, weight_decay: float, **extra) -> list[dict]:
    """AdamW groups for (name, parameter) pairs: biases and norm weights are not decayed (BERT convention)."""
    decay, no_decay = [], []
    for _, p in params:
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, **extra}, {"params": no_decay, "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"]]


def _optimizer(model, cfg: TrainConfig, hooks=()) -> torch.optim.Optimizer:
    # A hook may lay out the groups itself (per-layer rates; layers that become trainable later). AdamW skips a
    # parameter whose .grad is None, so a frozen one in a group stays bit-identical until it is unfrozen.
    groups = next((g for h in hooks if (g := h.param_groups(model)) is not None), None)
    if groups is None:
        groups = param_groups([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # Fused, as Trainer's default: one kernel for all parameters. The per-tensor loop's temporaries raised the peak
        # memory of full fine-tuning of MiniLM on 2,000 SST-2 rows from 2,211 to 2,319 MB (2 CPU cores), and it was slower.
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=True)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed rate, as Trainer's optim=adafactor: train.learning_rate and train.scheduler then mean what they mean
        # for the other optimizers (Adafactor's own relative step would ignore both).
        return Adafactor(groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.momentum)
    raise ConfigError(f"train.optimizer='{cfg.optimizer}'; expected adamw, adafactor or sgd.")


def speed_up(model, cfg: TrainConfig) -> None:
    """train.gradient_checkpointing and train.compile, in place, before accelerator.prepare."""
    if cfg.gradient_checkpointing:
        # transformers' own (activation_checkpointing_enable since 5.x renamed it; use_reentrant=False, so frozen
        # embeddings under peft need no enable_input_require_grads); a peft model forwards the call to the model it
        # wraps. hftl's cached-feature head has no backbone to recompute: nothing to do there.
        enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable", None)
        if enable is not None:
            try:
                enable({"use_reentrant": False})
            except ValueError as e:  # a model class that does not support it says so
                raise ConfigError(f"train.gradient_checkpointing=true: {e} Set train.gradient_checkpointing=false.") from None
    if cfg.compile:
        # In place (nn.Module.compile): the module stays itself, so its state_dict keys, unwrap_model and the saved
        # folder are as without compiling.
        model.compile()


def make_scheduler(optimizer, t: TrainConfig, total_steps: int):
    warmup = int(t.warmup_ratio * total_steps)
    if t.scheduler == "slanted_triangular":
        # ULMFiT (Howard & Ruder 2018), eq. 3: rise linearly for `cut` steps, fall linearly for the rest, ratio 32.
        cut, ratio = max(1, warmup), 32

        def factor(step):
            p = step / cut if step < cut else 1 - (step - cut) / max(1, total_steps - cut)
            return (1 + p * (ratio - 1)) / ratio

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    # Imported here: transformers.optimization pulls in trainer_utils and with it peft (1.7 s) for any run.
    from transformers import get_scheduler

    return get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# Columns whose list length is a row's length: token ids (text), waveform samples (audio held in the rows).
LENGTH_COLUMNS = ("input_ids", "input_values")
# A column that holds the length itself: audio decoded on the fly (hftl/data/audio.py), its samples per model input.
LENGTH_VALUE_COLUMN = "num_samples"


def _lengths(ds) -> list[int] | None:
    """Each row's input length, read from Arrow without decoding the rows; None when no column has one."""
    column = next((c for c in LENGTH_COLUMNS if c in ds.column_names), None)
    if column is not None:
        return pc.list_value_length(ds.with_format("arrow")[column]).to_pylist()
    if LENGTH_VALUE_COLUMN in ds.column_names:
        return ds.with_format("arrow")[LENGTH_VALUE_COLUMN].to_pylist()
    return None


def sorted_order(ds) -> list[int]:
    """Row indices by input length, so batches of neighbours pad least; row order when rows have no length."""
    lengths = _lengths(ds)
    return list(range(len(ds))) if lengths is None else sorted(range(len(ds)), key=lengths.__getitem__)


def train_dataloader(ds, collator, t: TrainConfig) -> DataLoader:
    """Shuffled training batches; with group_by_length, rows of similar length share a batch."""
    generator = torch.Generator().manual_seed(t.seed)
    lengths = _lengths(ds) if t.group_by_length is not False else None  # null (no task resolved it): grouped
    if lengths is None:
        return DataLoader(ds, batch_size=t.batch_size, shuffle=True, collate_fn=collator, generator=generator)
    # Random "megabatches" sorted by length inside (transformers' sampler): about half the padding of random batches
    # (CoNLL-2003: 294,244 padded sub-tokens an epoch against 738,760 in random batches of 32).
    sampler = EpochSeededLengthGroupedSampler(t.batch_size, lengths=lengths, generator=generator, seed=t.seed,
                                              shuffle_batches=bool(t.shuffle_grouped_batches))
    # The loader draws its worker base seed from `generator` too, not from the global RNG that dropout uses.
    return DataLoader(ds, batch_size=t.batch_size, sampler=sampler, collate_fn=collator, generator=generator)


def schedule(train_dl, t: TrainConfig) -> tuple[int, int]:
    """(optimizer steps an epoch, optimizer steps in all) over the prepared training loader `train_dl`: train.max_steps,
    else train.epochs' worth, but at least train.min_steps (a few labelled rows would otherwise get a handful of steps)."""
    steps_per_epoch = max(1, math.ceil(len(train_dl) / t.gradient_accumulation_steps))
    return steps_per_epoch, t.max_steps or max(1, math.ceil(steps_per_epoch * t.epochs), t.min_steps or 0)


def rows_read(ds, t: TrainConfig, accelerator: Accelerator) -> list[int]:
    """The rows of `ds` that `fit` reads on this process, in its order: the batches its prepared training loader yields,
    epoch by epoch (each drawn from seed + epoch), up to the last optimizer step, and the one batch after it that
    Accelerate's loader reads ahead (to know whether the epoch ends there). Only indices are drawn, no row is read, and
    nothing draws from the global RNG (the seedable sampler has its own generator)."""
    train_dl = accelerator.prepare(train_dataloader(ds, None, t))
    steps_per_epoch, total_steps = schedule(train_dl, t)
    rows = []
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        train_dl.set_epoch(epoch)
        # An epoch's last step may take fewer batches than the accumulation (the loader's end syncs the gradients).
        batches = min(len(train_dl), (total_steps - epoch * steps_per_epoch) * t.gradient_accumulation_steps + 1)
        rows += [row for batch in itertools.islice(train_dl.batch_sampler, batches) for row in batch]
    return rows


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' LengthGroupedSampler whose order depends only on (seed, epoch), like Accelerate's
    SeedableRandomSampler: Accelerate's dataloader calls set_epoch, and a resumed run replays an epoch's order."""

    def __init__(self, *args, seed: int, shuffle_batches: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed, self.shuffle_batches = seed, shuffle_batches

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)

    def __iter__(self):
        indices = get_length_grouped_indices(self.lengths, self.batch_size, generator=self.generator)
        if not self.shuffle_batches:
            return iter(indices)
        # train.shuffle_grouped_batches: the batches in random order; the longest stays first (memory runs out at
        # once) and a short last one last (the loader cuts this stream into batches: one short batch in the middle
        # would shift every later cut)
        batches = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        last = [batches.pop()] if len(batches) > 1 and len(batches[-1]) < self.batch_size else []
        order = [0] + (torch.randperm(len(batches) - 1, generator=self.generator) + 1).tolist()
        return iter([i for b in order for i in batches[b]] + [i for b in last for i in b])


def average_windows(logits: torch.Tensor, labels: torch.Tensor, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example logits (mean over its windows) and labels, for a batch whose rows are the consecutive
    windows of its examples, `windows[i]` of them for example i (see hftl/data/audio.py)."""
    example = torch.repeat_interleave(torch.arange(len(windows), device=logits.device), windows)
    summed = torch.zeros(len(windows), logits.shape[-1], dtype=logits.dtype, device=logits.device).index_add_(0, example, logits)
    return summed / windows.unsqueeze(-1).to(logits.dtype), labels[windows.cumsum(0) - windows]


def eval_dataloader(ds, collator, batch_size: int) -> tuple[list[int], DataLoader]:
    """Length-sorted batches (least padding) and the order that maps what they yield back to rows (for evaluate)."""
    order = sorted_order(ds)
    return order, DataLoader(ds.select(order), batch_size=batch_size, collate_fn=collator)


def token_slices(batch: dict, max_tokens: int | None):
    """The batch in row slices of at most `max_tokens` padded tokens (text: input_ids); whole when unbounded or not text."""
    ids = batch.get("input_ids")
    if not max_tokens or ids is None or ids.ndim != 2 or ids.numel() <= max_tokens:
        yield batch
        return
    rows = max(1, max_tokens // ids.shape[1])
    for i in range(0, len(ids), rows):
        yield {k: v[i:i + rows] if torch.is_tensor(v) and v.shape[:1] == ids.shape[:1] else v for k, v in batch.items()}


def evaluate(model, dataloader, accelerator: Accelerator, metric_modules, order: list[int] | None = None,
             max_tokens: int | None = None, task=None) -> dict:
    """Metrics, mean loss, predictions and the model's outputs over every example exactly once (gather_for_metrics).

    `task` (hftl/tasks/) says what a prediction is and computes the loss and the metrics. `order[i]` is the original row
    of the i-th example the dataloader yields; predictions and outputs ('logits') come back in row order. `max_tokens`
    (train.eval_batch_tokens): the model runs on row slices of a text batch with at most this many padded tokens, so a
    batch of the longest rows needs no more memory than one of short rows. No `task`: single-label classification."""
    task = task or _single_label()
    model.eval()
    outputs, refs, losses, sentences = [], [], [], []
    with torch.inference_mode():
        for batch in dataloader:
            windows, labels = batch.pop("num_windows", None), batch.pop("labels")
            sentence = batch.pop(WINDOW, None)  # token classification under data.stride: the sentence each window is of
            logits = torch.cat([model(**part).logits for part in token_slices(batch, max_tokens)]).float()
            if windows is not None:  # examples cut into several model inputs (audio windows): average their logits
                logits, labels = average_windows(logits, labels, windows)
            # Loss per example, not the batch mean: the mean over the split then weighs every example once,
            # however the batches fell (a short last batch, or one that even_batches padded on another process).
            loss = task.loss(logits, labels, reduction="none")
            if logits.ndim == 3:  # per-token outputs (token classification): processes' batches differ in length
                logits, labels = accelerator.pad_across_processes(logits, dim=1), accelerator.pad_across_processes(labels, dim=1, pad_index=-100)
            out, ref, loss = accelerator.gather_for_metrics((logits, labels, loss))
            outputs.append(out.cpu()), refs.append(ref.cpu()), losses.append(loss.float().cpu())
            if sentence is not None:
                sentences.append(accelerator.gather_for_metrics(sentence).cpu())
    model.train()
    outputs, refs = pad_positions(outputs, refs)
    logits, labels = torch.cat(outputs).numpy(), torch.cat(refs).numpy()
    if sentences:  # windows back into their sentences, in row order; the loss is then each sentence's, as for the others
        logits, labels, order = *joined(logits, labels, torch.cat(sentences).numpy(), order), None
        losses = [task.loss(torch.as_tensor(logits), torch.as_tensor(labels), reduction="none").float()]
    preds = task.predict_rows(logits, labels)
    # Score while predictions and references are still in the same (loader) order.
    scores = task.compute(metric_modules, preds, task.references(labels))
    scores["loss"] = float(torch.cat(losses).mean())
    if order is not None:
        back = np.empty(len(order), dtype=np.int64)
        back[order] = np.arange(len(order))  # back[row]: where the loader yielded that row
        preds, logits = [preds[i] for i in back], logits[back]
    return {"metrics": scores, "predictions": preds, "logits": logits}


def joined(logits: np.ndarray, labels: np.ndarray, sentences: np.ndarray, order: list[int] | None):
    """Windows' outputs and labels (in loader order; `order` maps them to rows) joined into their sentences, in
    sentence order (hftl/modalities/tokens.py, data.stride)."""
    from .modalities.tokens import merge_windows

    if order is not None:
        back = np.empty(len(order), dtype=np.int64)
        back[order] = np.arange(len(order))
        logits, labels, sentences = logits[back], labels[back], sentences[back]
    return merge_windows(logits, labels, sentences)


def pad_positions(outputs: list[torch.Tensor], labels: list[torch.Tensor]) -> tuple[list, list]:
    """Per-token batches (rows x positions x outputs, each batch as long as its longest row) padded to the longest
    batch, so a split's outputs are one array: zero logits where labels are -100, which no loss or prediction reads.
    Other outputs are returned as they are."""
    if not outputs or outputs[0].ndim != 3:
        return outputs, labels
    n = max(o.shape[1] for o in outputs)
    return ([torch.nn.functional.pad(o, (0, 0, 0, n - o.shape[1])) for o in outputs],
            [torch.nn.functional.pad(y, (0, n - y.shape[1]), value=-100) for y in labels])


def _single_label():
    from .tasks.single_label import SingleLabel

    return SingleLabel([])


def _snapshot(model, held: set[int]) -> dict[str, torch.Tensor]:
    """CPU copy of what training can change: parameters the optimizer holds (`held`: their ids; a layer that gradual
    unfreezing thaws later is held while still frozen), trainable ones, and buffers (other weights never move)."""
    state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad or id(p) in held}
    state.update({n: b.detach().to("cpu", copy=True) for n, b in model.named_buffers()})
    return state


# Each is called as listen(entry, last) after every validation evaluation of `fit` (entry: the history row just added;
# last: the final one, after the last step). `hftl tune` reports them to its Optuna trial, whose pruner may stop the run
# by raising optuna.TrialPruned from the listener. Empty unless a tuner put one here.
EVALUATION_LISTENERS: list = []


class LoopState:
    """The loop's own progress; saved in every checkpoint (as JSON + safetensors) so a resume continues exactly."""

    def __init__(self):
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batches = 0  # batches of `epoch` this process has trained on
        self.stopped = False  # early stopping fired
        self.history: list[dict] = []  # one entry per evaluation
        self.log: list[dict] = []  # one entry per optimizer step: loss (mean over processes and accumulated batches), lr
        self.best: dict | None = None
        self.best_state: dict | None = None
        self.bad_evals = 0
        self.running, self.n_running = 0.0, 0  # training loss since the last evaluation
        self.seconds = 0.0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


class Checkpoints:
    """A fit's checkpoints (hftl/checkpoint.py): resuming from one, one every train.save_every steps and at the last
    step, and one when a stop signal arrives (then the run exits with 143). `run` is what a checkpoint must share with
    this run to continue it exactly; `bounds`, what loop.json's step, epoch and batch must fit."""

    def __init__(self, cfg: Config, accelerator: Accelerator, run: dict, bounds: dict):
        self.cfg, self.accelerator, self.run, self.bounds = cfg, accelerator, run, bounds
        self.root = checkpoint.root(cfg)

    def resume(self, scheduler, loop: LoopState) -> None:
        path = checkpoint.find_resume(self.cfg, self.run, self.accelerator, self.bounds)
        if path is not None:
            checkpoint.load(self.accelerator, path, scheduler, loop)
            self.accelerator.print(f"Resumed from {path}: step {loop.step} of {self.bounds['total_steps']}, epoch {loop.epoch}, "
                                   f"batch {loop.batches}")

    def after_step(self, loop: LoopState, scheduler, seconds: float, stop_asked: bool) -> None:
        """With checkpoints on, every train.save_every steps and the last step (as Trainer's: if the final write fails, a
        full disk, train.resume=auto finishes the run from it without training again); always on a stop signal."""
        t = self.cfg.train
        last = loop.step >= self.bounds["total_steps"] or loop.stopped
        if not ((t.save_every and (loop.step % t.save_every == 0 or last)) or stop_asked):
            return
        loop.seconds = seconds
        path = checkpoint.save(self.accelerator, self.root, loop.step, t.keep_last, self.run,
                               publish=lambda folder: hub.push_checkpoint(folder, self.cfg.hub), scheduler=scheduler, loop=loop)
        if stop_asked:
            self.accelerator.print(f"Stop signal received: saved {path} (step {loop.step}); exiting with code "
                                   f"{checkpoint.EXIT_PREEMPTED}. Rerun with train.resume=auto to continue.")
            raise checkpoint.Preempted()

    def newest(self) -> Path | None:
        kept = checkpoint.complete(self.root)
        return kept[-1] if kept else None

    def of_step(self, step: int) -> Path | None:
        """The complete checkpoint of `step`, if one was written."""
        folder = self.root / f"step-{step}"
        return folder if (folder / checkpoint.MARKER).is_file() else None


class Selection:
    """Which evaluation's weights are the result (train.metric_for_best), and early stopping
    (train.early_stopping_patience). Its state lives in the LoopState, so a resumed run continues it."""

    def __init__(self, t: TrainConfig, accelerator: Accelerator, held: set[int], steps_per_epoch: int):
        self.t, self.accelerator, self.held, self.steps_per_epoch = t, accelerator, held, steps_per_epoch
        self.sign = 1 if t.greater_is_better else -1

    def observe(self, loop: LoopState, scores: dict, model, last: bool = False) -> None:
        """Record a validation evaluation at loop.step; keep a copy of the weights when it is the best so far (not
        `last`: after the last step the weights in place are the best, nothing to copy and restore)."""
        t = self.t
        if t.metric_for_best not in scores:
            raise ConfigError(f"train.metric_for_best='{t.metric_for_best}' is not computed; validation gives {sorted(scores)}.")
        entry = {"step": loop.step, "epoch": round(loop.step / self.steps_per_epoch, 3),
                 "train_loss": loop.running / max(loop.n_running, 1), **{f"eval_{k}": v for k, v in scores.items()}}
        loop.history.append(entry)
        loop.running, loop.n_running = 0.0, 0
        self.accelerator.print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
        for listen in EVALUATION_LISTENERS:
            listen(entry, last)
        if t.report_to:
            self.accelerator.log({**{f"eval/{k}": v for k, v in scores.items()}, "train/epoch": entry["epoch"],
                                  "train/mean_loss": entry["train_loss"]}, step=loop.step)
        if loop.best is None or self.sign * scores[t.metric_for_best] > self.sign * loop.best["metrics"][t.metric_for_best]:
            loop.best, loop.bad_evals = {"step": loop.step, "metrics": scores}, 0
            loop.best_state = None  # the old copy goes before the new one is made: never two in memory
            if not last:
                loop.best_state = _snapshot(self.accelerator.unwrap_model(model), self.held)
        else:
            loop.bad_evals += 1
            if t.early_stopping_patience and loop.bad_evals >= t.early_stopping_patience:
                self.accelerator.print(f"early stopping: no {t.metric_for_best} gain in {loop.bad_evals} evaluations")
                loop.stopped = True

    def restore(self, loop: LoopState, model) -> bool:
        """Put the best evaluation's weights back when an earlier one than the last state was best; whether it did."""
        if loop.best_state is None:
            return False
        model.load_state_dict(loop.best_state, strict=False)
        return True


def labelled_per_batch(ds, t: TrainConfig, batches: int) -> float | None:
    """For a task that labels positions (token classification) on length-grouped batches: the mean labelled
    positions in a training batch over an epoch of `batches` batches, by which each batch's summed loss is divided;
    None otherwise (each batch's loss is its mean over its labelled positions).

    Why: grouped batches of three-word headlines would otherwise weigh as much, per step, as batches of 40-word
    sentences; divided by one constant, every labelled word weighs the same, as it does in random batches."""
    if t.group_by_length is False or _lengths(ds) is None or "labels" not in ds.column_names:
        return None
    flat = pc.list_flatten(ds.with_format("arrow")["labels"])  # a list of position labels per row
    labelled = len(flat) - (pc.sum(pc.equal(flat, IGNORE)).as_py() or 0)
    return max(labelled / max(batches, 1), 1.0)


def _batch_loss(model, batch: dict, task, hooks, hook_keys: set[str], progress: float, per_batch: float | None = None):
    """The loss of one batch: the task's on the model's outputs (summed over positions and divided by `per_batch`
    when given, `labelled_per_batch`), then each hook's in order."""
    labels = batch.pop("labels")
    extra = {k: batch.pop(k) for k in hook_keys if k in batch}
    outputs = model(**batch)
    loss = task.loss(outputs.logits, labels) if per_batch is None else task.loss(outputs.logits, labels, reduction="sum") / per_batch
    for h in hooks:
        loss = h.loss(model, {**batch, **extra, "labels": labels}, outputs, loss, progress)
    return loss


def _all_processes(loss, stopping: bool, accelerator: Accelerator) -> tuple[float, float]:
    """One collective per batch, before backward: the loss summed over processes (non-finite when any process's is, so
    every process stops together and no NaN reaches the weights) and how many processes received a stop signal."""
    total, asked = accelerator.reduce(
        torch.stack([loss.detach().float(), torch.tensor(float(stopping), device=loss.device)]), reduction="sum").tolist()
    return total, asked


def fit(model, encoded: DatasetDict, collator, cfg: Config, accelerator: Accelerator, hooks=(), task=None) -> dict:
    """Train, evaluate on validation during training, restore the best evaluation, evaluate every other split.

    `task` (hftl/tasks/) gives the loss and what evaluation predicts and scores; `cfg.train`'s metrics must be concrete
    (`task.configure`). Checkpoints (`Checkpoints`) every train.save_every steps and when SIGTERM/SIGUSR1 arrives (then
    exits with 143); train.resume continues from one with the same data order, RNG state and losses. `Selection` keeps
    the best evaluation's weights and stops early.

    `hooks` (`hftl.hooks.Hook`) are what the adaptation modes and options (hftl/adapt) add to the plain loop; every
    method of every hook is called, in order; a loss hook gets the previous hook's loss."""
    began = time.perf_counter()
    task = task or _single_label()
    cfg = task.configure(cfg)
    t = cfg.train
    checkpoint.check_settings(cfg)
    return_freed_blocks(cpu_mmap_threshold(t), accelerator.device)

    # ---- setup: loaders, optimizer, schedule, resume
    train_dl = train_dataloader(encoded["train"], collator, t)
    per_batch = labelled_per_batch(encoded["train"], t, len(train_dl)) if task.per_token else None
    orders, eval_dls = {}, {}
    for split in encoded:  # validation, and test / target (data.target's labels) when present
        if split != "train":
            orders[split], eval_dls[split] = eval_dataloader(encoded[split], collator, t.eval_batch_size)
    speed_up(model, t)
    optimizer = _optimizer(model, t, hooks)
    model, optimizer, train_dl, *prepared = accelerator.prepare(model, optimizer, train_dl, *eval_dls.values())
    eval_dls = dict(zip(eval_dls, prepared))

    steps_per_epoch, total_steps = schedule(train_dl, t)
    if not t.max_steps and total_steps > math.ceil(steps_per_epoch * t.epochs):
        accelerator.print(f"train.min_steps={t.min_steps}: {len(encoded['train']):,} training rows make {math.ceil(steps_per_epoch * t.epochs)} "
                          f"optimizer steps in train.epochs={t.epochs:g}; training {total_steps} ({total_steps / steps_per_epoch:g} epochs) "
                          "instead (train.min_steps=null: exactly train.epochs)")
    # Not prepared: Accelerate's scheduler wrapper steps once per process, and our steps are already per process.
    scheduler = make_scheduler(optimizer, t, total_steps)
    for h in hooks:
        h.setup(accelerator, total_steps, steps_per_epoch)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    hook_keys = {k for h in hooks for k in h.batch_keys}
    loop = LoopState()
    run = {"processes": accelerator.num_processes, "train.batch_size": t.batch_size, "train.seed": t.seed,
           "train.gradient_accumulation_steps": t.gradient_accumulation_steps, "train.group_by_length": t.group_by_length,
           "train.optimizer": t.optimizer,
           "training rows": len(encoded["train"]), "total optimizer steps (train.epochs, train.max_steps)": total_steps}
    bounds = {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "batches_per_epoch": len(train_dl),
              "accumulation": t.gradient_accumulation_steps}
    checkpoints = Checkpoints(cfg, accelerator, run, bounds)
    checkpoints.resume(scheduler, loop)
    eval_every = max(1, steps_per_epoch // max(1, t.evals_per_epoch))
    # Without a validation split (data.validation_fraction=0: few labels, all of them for training) nothing is
    # selected during training: the last state is the result, scored on the other splits.
    validating = "validation" in eval_dls
    metric_modules = metrics_lib.load_metrics(t.metrics)
    selection = Selection(t, accelerator, held, steps_per_epoch)
    if t.report_to:
        start_trackers(accelerator, cfg)

    def validate(last: bool = False, order=None) -> dict:
        result = evaluate(model, eval_dls["validation"], accelerator, metric_modules, order, t.eval_batch_tokens, task)
        selection.observe(loop, result["metrics"], model, last)
        return result

    # ---- train
    # Redraw rarely when the output is a log file rather than a terminal.
    bar = tqdm(total=total_steps, initial=loop.step, desc="Training", disable=not accelerator.is_local_main_process,
               mininterval=0.1 if sys.stderr.isatty() else 30)
    setup_seconds = time.perf_counter() - began  # loaders, prepare, optimizer, resume: before the first step
    start = time.perf_counter() - loop.seconds
    model.train()
    step_loss, step_batches, stop_asked = 0.0, 0, False
    with checkpoint.stop_signals() as signals:
        while loop.step < total_steps and not loop.stopped:
            # The epoch's order comes from seed + epoch; a resumed epoch skips the batches already trained on.
            train_dl.set_epoch(loop.epoch)
            batches = accelerator.skip_first_batches(train_dl, loop.batches) if loop.batches else train_dl
            for batch in batches:
                if step_batches == 0:
                    for h in hooks:
                        h.on_step(accelerator.unwrap_model(model), loop.step, loop.epoch)
                with accelerator.accumulate(model):
                    loss = _batch_loss(model, batch, task, hooks, hook_keys, loop.step / total_steps, per_batch)
                    total, asked = _all_processes(loss, bool(signals), accelerator)
                    if not math.isfinite(total):
                        kept = checkpoints.newest()
                        raise NonFiniteLossError(
                            f"non-finite training loss ({total}) at optimizer step {loop.step + 1} on at least one process; "
                            f"every process stopped before applying it"
                            + (f" (the last complete checkpoint, {kept}, is untouched)" if kept else "")
                            + ". Lower train.learning_rate, set train.max_grad_norm, or train.mixed_precision=no."
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        for h in hooks:
                            h.after_optimizer_step(accelerator.unwrap_model(model), loop.step + 1)
                    optimizer.zero_grad()
                stop_asked = stop_asked or asked > 0
                step_loss, step_batches = step_loss + total / accelerator.num_processes, step_batches + 1
                loop.batches += 1
                if loop.batches == len(train_dl):
                    loop.epoch, loop.batches = loop.epoch + 1, 0
                if not accelerator.sync_gradients:
                    continue
                lr = scheduler.get_last_lr()[0]  # the rate this step used
                scheduler.step()
                loop.step += 1
                loop.log.append({"step": loop.step, "loss": step_loss / step_batches, "lr": lr})
                loop.running, loop.n_running = loop.running + step_loss, loop.n_running + step_batches
                step_loss, step_batches = 0.0, 0
                bar.update(1)
                if loop.step % t.log_every == 0:
                    bar.set_postfix(loss=f"{loop.log[-1]['loss']:.4f}", lr=f"{lr:.2e}")
                    if t.report_to:
                        accelerator.log({"train/loss": loop.log[-1]["loss"], "train/lr": lr}, step=loop.step)
                # The last step's evaluation runs after the loop, once the optimizer's state is gone (see below).
                if validating and loop.step % eval_every == 0 and loop.step < total_steps:
                    validate()
                checkpoints.after_step(loop, scheduler, time.perf_counter() - start, stop_asked)
                if loop.step >= total_steps or loop.stopped:
                    break
    bar.close()
    train_seconds = time.perf_counter() - start
    # Training is over: let go of the gradients and the optimizer's state (AdamW: twice the trainable weights) before
    # the final evaluation, the save and the pipeline() reload check, which loads a second copy of the model.
    optimizer.zero_grad(set_to_none=True)
    del optimizer, scheduler
    accelerator.free_memory()

    # ---- evaluate: the best state on every split
    unwrapped = accelerator.unwrap_model(model)
    final = {}
    if validating and not loop.stopped and (not loop.history or loop.history[-1]["step"] != loop.step):
        # The last step's evaluation, without the optimizer's state in memory; when these weights are the best it is
        # also the final validation result (one pass over validation, not two).
        final["validation"] = validate(last=True, order=orders["validation"])
    if selection.restore(loop, unwrapped):  # an earlier evaluation was better: its weights are the result
        final.pop("validation", None)
    final = {split: final.get(split) or evaluate(model, dl, accelerator, metric_modules, orders[split], t.eval_batch_tokens, task)
             for split, dl in eval_dls.items()}
    if t.report_to:
        accelerator.log({f"{split}/{k}": v for split, r in final.items() for k, v in r["metrics"].items()}, step=loop.step)
        accelerator.end_training()
    return {
        "model": unwrapped,
        # The complete checkpoint of the state these results come from, if any (the final write's failure names it).
        "checkpoint": checkpoints.of_step(loop.step),
        "history": loop.history,
        "step_log": loop.log,
        "best_step": loop.best["step"] if loop.best else loop.step,
        "steps": loop.step,
        "steps_per_epoch": steps_per_epoch,
        "train_seconds": train_seconds,
        "setup_seconds": setup_seconds,
        "results": {split: r["metrics"] for split, r in final.items()},
        "predictions": {split: r["predictions"] for split, r in final.items()},
        "logits": {split: r["logits"] for split, r in final.items()},
    }
