"""`hftl export MODEL_DIR --onnx [--int8]`: a text model folder `hftl train` wrote, as ONNX for serving, checked.

The route: torch's own ONNX exporter (`torch.onnx.export(dynamo=True)`, which needs onnxscript), then ONNX Runtime
to check it, and `onnxruntime.quantization.quantize_dynamic` for int8 (weights int8, activations quantised on the
fly). Not optimum: optimum-onnx 0.1.0 requires transformers < 4.58, so it cannot share hftl's environment
(transformers 5). TorchScript's exporter (dynamo=False) works for BERT too, but torch deprecates it.

The check is the pipeline reload check's: the validation rows that the folder's hftl_config.yaml names (re-read as
`hftl push` re-reads them) go through the PyTorch model in the folder and the exported one, batch for batch on the same
token ids. fp32 must predict exactly what training's evaluation recorded in predictions_validation.json, with every
logit within FP32_ATOL of PyTorch's; int8 must agree with those predictions on at least INT8_MIN_AGREEMENT of the
rows. `--texts` checks given texts against the PyTorch model instead. Nothing is moved into place unless it passes.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import uuid
from pathlib import Path

from . import outdir
from .config import load_config
from .extras import require
from .outdir import OutputError

FP32_ATOL = 1e-4  # largest |ONNX Runtime logit - PyTorch logit| allowed for fp32 (measured: ~1e-6 on MiniLM, 1e-8 tiny BERT)
INT8_MIN_AGREEMENT = 0.95  # share of rows where int8 must predict the recorded label
# Int8 weights per output channel, in 7 bits (reduce_range): on x86 CPUs without VNNI (AVX2 only, as here) ONNX Runtime's
# u8s8 kernels saturate 16-bit sums of products. On the tiny test BERT, full-range int8 agreed with fp32 on 75% of the
# rows (logits off by up to 0.14); with these settings on all of them (off by 0.017).
INT8_SETTINGS = {"per_channel": True, "reduce_range": True}
BATCH = 32
FP32_FILE, INT8_FILE = "model.onnx", "model_quantized.onnx"  # the names optimum and transformers.js look for


def export(model_dir: str | Path, out: str | Path | None = None, int8: bool = False, texts: list[str] | None = None,
           overwrite: bool = False) -> dict:
    """Export, check, and move the folder into place; returns what export.json records (and a one-line summary)."""
    folder = Path(model_dir)
    config_file = folder / "hftl_config.yaml"
    if not config_file.is_file():
        raise OutputError(f"'{folder}' has no hftl_config.yaml: `hftl export` takes a model folder `hftl train` wrote (its output.dir).")
    cfg = load_config(config_file)
    if cfg.task != "text-classification":
        raise OutputError(f"'{folder}' holds a {cfg.task} model; `hftl export --onnx` exports text-classification models only.")
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module, "onnx", "hftl export --onnx")
    final = outdir.real(out if out is not None else folder / "onnx")
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not overwrite:
        raise OutputError(f"'{final}' exists; give another --out, or --overwrite to replace it (once the new export is checked).")

    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True).eval()
    if model.config.problem_type not in (None, "single_label_classification"):  # the check below compares argmax labels
        raise OutputError(f"'{folder}' holds a {model.config.problem_type} model; `hftl export --onnx` checks the export by its "
                          "predicted class and exports single-label classifiers only so far.")
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    inputs, expected, truth, rows_from = _rows(folder, cfg, texts)
    feeds = [_feed(tokenizer, inputs[i:i + BATCH], cfg.data.max_length) for i in range(0, len(inputs), BATCH)]
    with torch.inference_mode():
        reference = np.concatenate([model(**{k: torch.from_numpy(v) for k, v in f.items()}).logits.numpy() for f in feeds])
    if expected is None:  # given texts: the PyTorch model's predictions are the reference
        expected = [labels[i] for i in reference.argmax(-1)]

    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        _export_onnx(model, _feed(tokenizer, [inputs[0]] * 2, cfg.data.max_length, pad_to=8), tmp / FP32_FILE)
        report = {"exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}", "rows": len(inputs),
                  "rows_from": rows_from, "labels": labels, "fp32_atol": FP32_ATOL}
        if truth is not None:  # the validation labels: what each model's predictions score
            report["pytorch_accuracy"] = _accuracy(expected, truth)
        report["fp32"] = _check(tmp / FP32_FILE, feeds, reference, expected, labels, truth)
        worst = report["fp32"]["max_abs_logit_diff"]
        if worst > FP32_ATOL or report["fp32"]["disagree"]:
            raise OutputError(_mismatch("fp32", report["fp32"], rows_from) if report["fp32"]["disagree"] else
                              f"the ONNX export's logits differ from PyTorch's by up to {worst:.2e} on {rows_from} "
                              f"(allowed: {FP32_ATOL:.0e}); nothing was written.")
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(tmp / FP32_FILE, tmp / INT8_FILE, **INT8_SETTINGS, weight_type=QuantType.QInt8)
            report["int8_settings"] = {**INT8_SETTINGS, "weight_type": "QInt8"}
            report["int8_min_agreement"] = INT8_MIN_AGREEMENT
            report["int8"] = _check(tmp / INT8_FILE, feeds, reference, expected, labels, truth)
            if report["int8"]["agreement"] < INT8_MIN_AGREEMENT:
                raise OutputError(_mismatch("int8", report["int8"], rows_from, INT8_MIN_AGREEMENT))
        # Config and tokenizer beside the .onnx files: the folder serves on its own (optimum's ORTModel layout).
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        report["versions"] = {m: importlib.metadata.version(m) for m in ("onnx", "onnxruntime", "onnxscript")}
        (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
        outdir.fsync_tree(tmp)
        _swap_in(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    kinds = " and ".join(k for k in ("fp32", "int8") if k in report)
    report["summary"] = (
        f"Exported {final / FP32_FILE}" + (f" and {INT8_FILE}" if int8 else "") + f" ({kinds} checked in ONNX Runtime on "
        f"{rows_from}: fp32 predictions identical, logits within {report['fp32']['max_abs_logit_diff']:.1e}"
        + (f"; int8 agrees on {100 * report['int8']['agreement']:.1f}%" if int8 else "") + ")")
    return report


def _rows(folder: Path, cfg, texts: list[str] | None) -> tuple[list, list[str] | None, list[str] | None, str]:
    """(pipeline-style inputs, the labels they must get or None, their true labels or None, where they came from)."""
    if texts:
        return list(texts), None, None, f"{len(texts)} given text(s)"
    from .data import DataError, load_splits
    from .data.text import inputs_for_pipeline

    predictions = folder / "predictions_validation.json"
    if not predictions.is_file():
        raise OutputError(f"'{folder}' has no predictions_validation.json to check the export against; pass --texts to check on given texts.")
    try:
        splits, _ = load_splits(cfg.data, cfg.train.seed)
    except DataError as e:
        raise DataError(f"{e} (`hftl export` re-reads the validation rows named in {folder / 'hftl_config.yaml'} to check "
                        "the export: run it where training ran, or pass --texts to check on given texts.)") from e
    recorded = json.loads(predictions.read_text())
    validation = splits["validation"]
    if len(recorded) != len(validation):
        raise OutputError(f"{predictions} has {len(recorded)} predictions but the validation split its hftl_config.yaml names has "
                          f"{len(validation)} rows: the data changed since training; pass --texts to check on given texts.")
    names = validation.features["labels"].names
    truth = [names[i] for i in validation["labels"]]
    return inputs_for_pipeline(validation, cfg.data), recorded, truth, f"{len(recorded)} validation rows"


def _feed(tokenizer, inputs: list, max_length: int, pad_to: int | None = None) -> dict:
    """Token ids as training's tokenization made them (truncated to data.max_length), padded to the batch's longest;
    with `pad_to`, cut or padded to exactly that many tokens (the export's example input)."""
    first = [x["text"] if isinstance(x, dict) else x for x in inputs]
    pair = [x["text_pair"] for x in inputs] if isinstance(inputs[0], dict) else None
    padding = {"padding": "max_length", "max_length": pad_to} if pad_to else {"padding": True, "max_length": max_length}
    enc = tokenizer(first, pair, truncation=True, return_tensors="np", **padding)
    return {k: enc[k].astype("int64") for k in tokenizer.model_input_names if k in enc}


def _export_onnx(model, example: dict, path: Path) -> None:
    import torch

    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    # `example` has two rows of several tokens: a dimension of size 1 would be fixed at 1 in the graph.
    example = {k: torch.from_numpy(v) for k, v in example.items()}
    program = torch.onnx.export(model, (), kwargs=example, dynamo=True, verbose=False, input_names=list(example),
                                output_names=["logits"], dynamic_shapes={k: {0: batch, 1: sequence} for k in example})
    program.save(str(path))


def _accuracy(predicted: list[str], truth: list[str]) -> float:
    return sum(p == t for p, t in zip(predicted, truth)) / len(truth)


def _check(path: Path, feeds: list[dict], reference, expected: list[str], labels: list[str], truth: list[str] | None) -> dict:
    """ONNX Runtime on `feeds`: the largest logit difference to `reference` (PyTorch), the agreement with `expected`
    and, with `truth`, the accuracy."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    logits = np.concatenate([session.run(["logits"], {k: v for k, v in f.items() if k in names})[0] for f in feeds])
    got = [labels[i] for i in logits.argmax(-1)]
    disagree = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    return {"max_abs_logit_diff": float(np.abs(logits - reference).max()), "agreement": 1 - len(disagree) / len(expected),
            **({"accuracy": _accuracy(got, truth)} if truth is not None else {}),
            "disagree": disagree[:20], "first": (disagree[0], got[disagree[0]], expected[disagree[0]]) if disagree else None}


def _mismatch(kind: str, result: dict, rows_from: str, minimum: float | None = None) -> str:
    row, got, want = result["first"]
    allowed = f" (at least {100 * minimum:.0f}% needed)" if minimum else " (fp32 must predict every row as recorded)"
    return (f"the {kind} ONNX model agrees with the recorded predictions on {100 * result['agreement']:.1f}% of {rows_from}"
            f"{allowed}; first difference: row {row}, ONNX says {got!r}, expected {want!r}. Nothing was written.")


def _swap_in(tmp: Path, final: Path) -> None:
    """`tmp` becomes `final`; an existing `final` (--overwrite) is replaced in one step where the OS allows."""
    if final.exists():
        if outdir.exchange(tmp, final):
            shutil.rmtree(tmp)
        else:
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    outdir.fsync(final.parent)
