"""Write the model folder atomically, prove that `transformers.pipeline` loads it and agrees, and
publish it to the Hub with huggingface_hub, downloading what was pushed to check it the same way.

The token is never handled here: huggingface_hub reads it from HF_TOKEN or the stored login
(`hf auth login`) on each request, and HF_ENDPOINT picks the server.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
from huggingface_hub import HfApi, get_token, is_offline_mode, snapshot_download
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, HFValidationError, filter_repo_objects, validate_repo_id

from . import outdir, pooling
from .config import ConfigError, HubConfig
from .outdir import DiskFullError, OutputError  # noqa: F401 - hftl.hub.OutputError is what callers catch


class HubError(OutputError):
    """Publishing failed; the message names the repo, the step and the fix."""


STRATEGIES = ("end", "every_save", "checkpoint")
# Suffixes of pickle-based weight and state files; loading them can run code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def check_output_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse, before any training, to clobber an existing non-empty output folder."""
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise OutputError(f"output.dir '{out_dir}' is a file; give a folder path.")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise OutputError(f"output.dir '{out_dir}' exists and is not empty; choose another output.dir or set output.overwrite=true.")


# Under bf16/fp16 autocast, training's evaluation rounds what pipeline() computes in fp32, so a row whose two best
# labels are nearly tied can flip (seen on an H200). Such a row passes when pipeline's probability for the label the
# evaluation chose is within this of its best; a wider gap is a real difference (weights, preprocessing, label order).
MIXED_PRECISION_TIE = 0.05


# train.calibrate: pipeline()'s scores must equal the calibrated ones (float rounding of the folded head aside).
SCORE_ATOL = 1e-4


def verify_reload(folder: Path, task: str, inputs: list, expected: list, tie: float = 0.0, scores=None) -> int:
    """Run pipeline(task) from the saved folder; fail loudly if any prediction differs from `expected` (the readable
    predictions training's evaluation made: labels, label lists or numbers) by more than `tie` (see MIXED_PRECISION_TIE)
    for a mixed-precision run. What a prediction is, and how far a row is from another, is the task's (hftl/tasks/),
    rebuilt from the saved config (thresholds, problem_type), so the check also proves those were saved. Returns how
    many rows were compared. `scores` (rows x outputs), when given: the scores pipeline() must report, to SCORE_ATOL
    (train.calibrate's temperature, which changes them and not the predictions)."""
    want = scores
    scores, kind = reload_scores(folder, task, inputs)
    if want is not None:
        gap = float(np.abs(np.asarray(scores) - np.asarray(want)).max()) if len(want) else 0.0
        if gap > SCORE_ATOL + tie:
            raise OutputError(f"the saved model in '{folder}' reports scores up to {gap:.2e} away from the calibrated ones "
                              f"training's evaluation gives (allowed {SCORE_ATOL + tie:g}): the temperature (train.calibrate) "
                              "did not reach the saved head.")
    got = kind.readable_from_scores(scores)
    diff = [i for i, e in enumerate(expected) if kind.near_tie(scores[i], e) > tie]
    if diff:
        i = diff[0]
        allowed = f" beyond near-ties of {tie} (mixed precision)" if tie else ""
        raise OutputError(
            f"the saved model in '{folder}' predicts differently from training's evaluation on {len(diff)} of "
            f"{len(expected)} validation rows{allowed} (first: row {i}, pipeline says {got[i]!r}, evaluation said {expected[i]!r})."
        )
    return len(expected)


def reload_scores(folder: Path, task: str, inputs: list):
    """(scores per row and output, as pipeline() reports them, in id order; the folder's task) from the saved folder."""
    from transformers import AutoConfig

    from . import tasks

    if pooling.is_sentence_transformers_classifier(folder):  # a pooling transformers' heads cannot express (hftl/pooling.py)
        kind = tasks.from_model_config(AutoConfig.from_pretrained(Path(folder) / pooling.PooledClassifier.processor_subfolder))
        _, logits = pooling.predict_sentence_transformers(folder, inputs)
        # pipeline()'s function_to_apply: softmax, sigmoid, none; the saved head already gives the targets' scale
        return kind.scores(logits.float().numpy()), kind
    if task == "token-classification":  # a tag per word, not a label per row: the task reads the pipeline's output
        from .tasks.token_classification import pipeline_scores

        return pipeline_scores(folder, inputs)
    from transformers import pipeline  # here, not at import: loading pipelines takes seconds that writing a folder does not need

    clf = pipeline(task, model=str(folder), device=-1, model_kwargs={"use_safetensors": True})
    kind = tasks.from_model_config(clf.model.config)
    k = clf.model.config.num_labels
    index = {name: i for i, name in enumerate(kind.names)}
    scores = np.zeros((len(inputs), k))
    for row, ranked in enumerate(clf(inputs, batch_size=8, top_k=k)):
        for entry in ranked if isinstance(ranked, list) else [ranked]:
            scores[row, index[entry["label"]]] = entry["score"]
    return scores, kind


def save_output(out_dir: str, model, processor, card, extra: dict[str, object], overwrite: bool,
                verify=None, export=lambda m: m, save_adapter: bool = False, release: bool = False, if_disk_full: str = "") -> Path:
    """Write everything to a temporary sibling folder, check it, then swap it into place.

    An existing output is replaced only after the new one is complete and verified, in one atomic exchange where the
    OS has one (hftl/outdir.py), so a failed or killed run never leaves a half-written folder or loses the previous
    one. A symbolic link `out_dir` is written through: the new folder goes where it points, and the link stays. A full
    disk raises DiskFullError, with nothing of the new folder left; `if_disk_full` is added to its message (what
    to do). `extra` maps file names to a str (written as is), a
    callable (called with the file's path; it writes the file) or JSON data.
    With `release`, `model`'s weights are dropped (moved to the meta device) once written, before `verify` loads
    the folder: a run then never holds two copies of the model; `model` is unusable afterwards.
    """
    final = outdir.real(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if save_adapter:  # before export: merging LoRA removes the adapter layers
            model.save_pretrained(tmp / "adapter")
        exported = export(model)
        exported.save_pretrained(tmp)
        # A sentence-transformers-layout model (hftl/pooling.py) keeps its tokenizer beside its backbone.
        processor_folder = tmp / getattr(exported, "processor_subfolder", "")
        if release:
            exported.to("meta")
            del model, exported
        processor.save_pretrained(processor_folder)
        card.save(tmp / "README.md")
        for name, content in extra.items():
            if callable(content):  # writes the file itself at the path it is given (a PNG from hftl.plots)
                content(tmp / name)
                continue
            text = content if isinstance(content, str) else json.dumps(content, indent=2, default=str)
            (tmp / name).write_text(text)
        if verify is not None:
            verify(tmp)
        outdir.fsync_tree(tmp)
        if final.exists():
            check_output_dir(out_dir, overwrite)
            if outdir.exchange(tmp, final):  # one step: `final` is the new folder, `tmp` the old one
                shutil.rmtree(tmp)
            else:  # a death between these two renames leaves .NAME.old-*, which the next run restores (outdir.recover)
                old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        outdir.fsync(final.parent)  # the rename itself
    except Exception as e:
        if outdir.disk_full(e, final.parent):
            where = f" at '{e.filename}'" if getattr(e, "filename", None) else ""
            raise DiskFullError(f"disk full: writing output.dir '{final}' failed{where} ({str(e).strip().splitlines()[0]}); "
                                "nothing of it is left half-written" + (", and the previous output.dir is untouched" if final.exists() else "")
                                + f". {if_disk_full}".rstrip()) from e
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


# ---------------------------------------------------------------- publishing


def check_hub_config(hub: HubConfig) -> None:
    """Reject hub.* settings that cannot work, before any training and without touching the network."""
    if hub.strategy not in STRATEGIES:
        raise ConfigError(f"hub.strategy='{hub.strategy}'; expected one of {', '.join(STRATEGIES)}.")
    if not hub.push:
        return
    if not hub.model_id or hub.model_id.count("/") != 1:
        raise ConfigError(f"hub.push=true needs hub.model_id=namespace/name (your user or organisation, e.g. alice/minilm-sst2); got {hub.model_id!r}.")
    try:
        validate_repo_id(hub.model_id)
    except HFValidationError as e:
        raise ConfigError(f"hub.model_id='{hub.model_id}' is not a valid Hub repo id: {e}") from None


HINTS = {
    401: "the Hub refused the token: set HF_TOKEN to a valid token or run `hf auth login`",
    403: "the token may not write there: use a token with write access, or a hub.model_id under your user or an organisation you belong to",
    404: "the repo or branch is missing or not visible to this token: check hub.model_id and hub.revision",
}


@contextlib.contextmanager
def _hub_step(hub: HubConfig, doing: str):
    """Turn any failure of the Hub client into a HubError that says which repo, which step and what to try."""
    try:
        yield
    except HubError:
        raise
    except Exception as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = HINTS.get(status, "check the network connection and HF_ENDPOINT, then rerun (or `hftl push OUT_DIR` later)")
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"hub.model_id='{hub.model_id}': {doing} failed ({detail}); {hint}.") from e


def prepare_repo(hub: HubConfig) -> None:
    """Make sure a push can work before spending time on training: token present, repo and branch exist, visibility right."""
    check_hub_config(hub)
    if is_offline_mode():
        raise HubError("hub.push=true but HF_HUB_OFFLINE is set, which blocks every Hub request; unset HF_HUB_OFFLINE or set hub.push=false.")
    if get_token() is None:
        raise HubError("hub.push=true needs a Hugging Face token with write access: set HF_TOKEN or run `hf auth login` "
                       "(hftl reads it only from there and never writes it anywhere).")
    api = HfApi()
    with _hub_step(hub, "creating the repo"):
        api.create_repo(hub.model_id, private=hub.private, exist_ok=True)
        private = api.model_info(hub.model_id).private
    if hub.private and not private:
        raise HubError(f"hub.private=true but '{hub.model_id}' already exists and is public; make it private on the Hub, "
                       "choose another hub.model_id, or set hub.private=false.")
    if hub.revision:
        with _hub_step(hub, f"creating branch '{hub.revision}' (hub.revision)"):
            api.create_branch(hub.model_id, branch=hub.revision, exist_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def publish(folder: str | Path, hub: HubConfig, task: str, inputs: list, expected: list[str], tie: float = 0.0) -> str:
    """Push a model folder, then download exactly that commit and check it (the round trip).

    Every pushed file must come back byte-identical, and `pipeline(task)` on the download must predict
    `expected` for `inputs` (what training's evaluation predicted). Returns the commit URL."""
    folder = Path(folder)
    files = list(filter_repo_objects(sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
                                     ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise HubError(f"'{folder / pickles[0]}' is a pickle; hftl publishes weights as safetensors only. "
                       "Remove it (or save it with safetensors) and run `hftl push` again.")
    prepare_repo(hub)
    with _hub_step(hub, f"uploading '{folder}'"):
        commit = HfApi().upload_folder(repo_id=hub.model_id, folder_path=folder, revision=hub.revision,
                                       commit_message=f"hftl: upload {folder.name}")
    with tempfile.TemporaryDirectory(prefix="hftl-roundtrip-") as tmp:
        with _hub_step(hub, f"downloading commit {commit.oid} for the round-trip check"):
            snapshot_download(hub.model_id, revision=commit.oid, local_dir=tmp, allow_patterns=files)
        for name in files:
            got = Path(tmp, name)
            if not got.is_file() or _sha256(got) != _sha256(folder / name):
                what = "differs from" if got.is_file() else "did not come back; it was pushed from"
                raise HubError(f"round trip: '{name}' downloaded from '{hub.model_id}' at commit {commit.oid} {what} "
                               f"'{folder / name}'. The upload was altered or incomplete; rerun `hftl push` and check the repo on the Hub.")
        if inputs:
            try:
                verify_reload(Path(tmp), task, inputs, expected, tie)
            except OutputError as e:
                raise HubError(f"round trip: the model pushed to '{hub.model_id}' (commit {commit.oid}) does not "
                               f"reproduce training's evaluation once downloaded: {e}") from None
    return commit.commit_url


def push_checkpoint(folder: str | Path, hub: HubConfig) -> str | None:
    """Upload a training checkpoint folder as hub.strategy asks; the loop calls it on the main process after each save.

    end: nothing; every_save: to checkpoints/<folder name>/ (all kept); checkpoint: to last-checkpoint/,
    replacing the previous one, so a run can resume from the Hub. Returns the commit URL, or None."""
    if not hub.push or hub.strategy == "end":
        return None
    folder = Path(folder)
    latest_only = hub.strategy == "checkpoint"
    with _hub_step(hub, f"uploading checkpoint '{folder}' (hub.strategy={hub.strategy})"):
        commit = HfApi().upload_folder(
            repo_id=hub.model_id, folder_path=folder, revision=hub.revision,
            path_in_repo="last-checkpoint" if latest_only else f"checkpoints/{folder.name}",
            delete_patterns="*" if latest_only else None,  # files of the previous checkpoint this one lacks
            commit_message=f"hftl: checkpoint {folder.name}",
        )
    return commit.commit_url
