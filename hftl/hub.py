"""Write the model folder atomically, then prove that `transformers.pipeline` loads it and agrees."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from transformers import pipeline


class OutputError(RuntimeError):
    pass


def check_output_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse, before any training, to clobber an existing non-empty output folder."""
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise OutputError(f"output.dir '{out_dir}' is a file; give a folder path.")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise OutputError(f"output.dir '{out_dir}' exists and is not empty; choose another output.dir or set output.overwrite=true.")


def verify_reload(folder: Path, task: str, inputs: list, expected: list[str]) -> int:
    """Run pipeline(task) from the saved folder; fail loudly if any prediction differs."""
    clf = pipeline(task, model=str(folder), device=-1)
    got = [r["label"] if isinstance(r, dict) else r[0]["label"] for r in clf(inputs, batch_size=8)]
    diff = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    if diff:
        i = diff[0]
        raise OutputError(
            f"the saved model in '{folder}' predicts differently from training's evaluation on {len(diff)} of "
            f"{len(expected)} validation rows (first: row {i}, pipeline says {got[i]!r}, evaluation said {expected[i]!r})."
        )
    return len(expected)


def save_output(out_dir: str, model, processor, card, extra: dict[str, object], overwrite: bool,
                verify=None, export=lambda m: m, save_adapter: bool = False) -> Path:
    """Write everything to a temporary sibling folder, check it, then swap it into place.

    An existing output is replaced only after the new one is complete and verified, so a failed
    run never leaves a half-written folder or loses the previous one.
    """
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if save_adapter:  # before export: merging LoRA removes the adapter layers
            model.save_pretrained(tmp / "adapter")
        export(model).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        card.save(tmp / "README.md")
        for name, content in extra.items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2, default=str)
            (tmp / name).write_text(text)
        if verify is not None:
            verify(tmp)
        if final.exists():
            check_output_dir(out_dir, overwrite)
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final
