"""Serving throughput on CPU: `transformers.pipeline()` on an hftl folder vs its `hftl export --onnx [--int8]` models.

    .venv/bin/python scripts/bench_onnx.py            # trains the model first (about 1 min), then measures

The model: all-MiniLM-L6-v2 fine-tuned by `hftl train recipes/configs/text/minilm_sst2_full.yaml` on 2,000 SST-2
training rows for one epoch (a model to serve, not the best one; the full preset's accuracy is in the README). Then
`hftl export MODEL --onnx --int8` (which checks both exports against the folder's own predictions before writing them),
and on SST-2's 872 validation sentences, batch 32, in this one process after one warm-up pass each:
- pipeline fp32: `pipeline("text-classification", model=MODEL, batch_size=32)`;
- ONNX Runtime fp32 and int8: the same tokenizer (padded to each batch's longest, truncated at data.max_length), one
  `InferenceSession` each with its default threads.
Each is timed --repeats times; the table shows the fastest (rows per second) and the accuracy. Run it alone: the times
mean nothing beside other jobs.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import time
from pathlib import Path

from benchlib import HFTL_PYTHON, ROOT, SHARED_DATA, command_line, load, machine

SST2 = SHARED_DATA / "text" / "sst2"
BATCH = 32


def best_of(repeats: int, run) -> tuple[float, list]:
    run()  # warm-up: first-call allocations and thread pools are not serving cost
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_onnx")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "onnx.md")
    args = p.parse_args()
    model = args.work / "model"
    started = load()
    if not (model / "results.json").is_file():
        subprocess.run([str(HFTL_PYTHON), "-m", "hftl", "train", str(ROOT / "recipes/configs/text/minilm_sst2_full.yaml"),
                        f"data.train_file={SST2 / 'train.csv'}", f"data.validation_file={SST2 / 'validation.csv'}",
                        "data.max_train_samples=2000", "train.epochs=1", f"output.dir={model}", "output.overwrite=true"], check=True)
    if not (model / "onnx" / "model_quantized.onnx").is_file():
        subprocess.run([str(HFTL_PYTHON), "-m", "hftl", "export", str(model), "--onnx", "--int8", "--overwrite"], check=True)
    export = json.loads((model / "onnx" / "export.json").read_text())

    import numpy as np
    import onnxruntime
    from transformers import AutoTokenizer, pipeline

    with open(SST2 / "validation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    texts, truth = [r["text"] for r in rows], [int(r["label"]) for r in rows]
    label_names = json.loads((model / "config.json").read_text())["id2label"]
    names = [label_names[str(i)] for i in range(len(label_names))]
    tokenizer = AutoTokenizer.from_pretrained(model)
    results = {}

    classifier = pipeline("text-classification", model=str(model), device="cpu")

    def run_pipeline():
        return [names.index(o["label"]) for o in classifier(texts, batch_size=BATCH, truncation=True)]

    results["pipeline() fp32 (PyTorch)"] = best_of(args.repeats, run_pipeline)
    max_length = 128
    for label, file in (("ONNX Runtime fp32", "model.onnx"), ("ONNX Runtime int8 (dynamic)", "model_quantized.onnx")):
        session = onnxruntime.InferenceSession(str(model / "onnx" / file), providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}

        def run_onnx(session=session, wanted=wanted):
            out = []
            for i in range(0, len(texts), BATCH):
                enc = tokenizer(texts[i:i + BATCH], padding=True, truncation=True, max_length=max_length, return_tensors="np")
                feed = {k: v.astype("int64") for k, v in enc.items() if k in wanted}
                out += session.run(["logits"], feed)[0].argmax(-1).tolist()
            return out

        results[label] = best_of(args.repeats, run_onnx)

    lines = ["# Serving throughput on CPU: pipeline() vs ONNX Runtime (`scripts/bench_onnx.py`)", "",
             f"Command: `{command_line()}`", f"Machine: {machine()}; load average at start {started}.",
             f"Finished {time.strftime('%Y-%m-%d %H:%M')}. Model: {model.resolve().relative_to(ROOT) if model.resolve().is_relative_to(ROOT) else model.name} (MiniLM, full mode, 2,000 SST-2 rows, 1 epoch). "
             "Export check (`hftl export`, on the same 872 rows): fp32 predictions agree "
             f"{100 * export['fp32']['agreement']:.1f}% (logits within {export['fp32']['max_abs_logit_diff']:.1e}), int8 "
             f"{100 * export['int8']['agreement']:.1f}% ({export['exporter']}).", "",
             f"SST-2 validation, {len(texts)} sentences, batch {BATCH}, fastest of {args.repeats} after a warm-up:", "",
             "| runtime | seconds | rows/s | vs pipeline() | accuracy % |", "|---|---:|---:|---:|---:|"]
    base = results["pipeline() fp32 (PyTorch)"][0]
    for label, (seconds, predicted) in results.items():
        accuracy = 100 * float(np.mean(np.array(predicted) == np.array(truth)))
        lines.append(f"| {label} | {seconds:.2f} | {len(texts) / seconds:.0f} | {base / seconds:.2f}x | {accuracy:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
