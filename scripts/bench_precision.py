"""Does bf16 (or fp16) autocast pay on this machine? `hftl train` of one recipe in each adaptation mode and
precision, each a fresh process timed start to exit, written as a Markdown table.

    # on a machine with a CUDA GPU (train.mixed_precision=auto picks bf16 there; this measures what it buys)
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_precision.py recipes/configs/text/minilm_sst2_full.yaml \\
        --modes full lora head --precisions no bf16 --out precision.md \\
        --set data.train_file=../shared/data/text/sst2/train.csv data.validation_file=../shared/data/text/sst2/validation.csv

On CPUs without AMX, bf16 autocast is far slower than fp32, which is why train.mixed_precision=auto
means fp32 there; run this before overriding it. Per run: wall seconds of the whole process, hftl's
train seconds (the training loop, evaluation included), validation accuracy, peak GPU memory (torch.cuda.max_memory_allocated) and peak resident host memory.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import finish, launch, machine  # noqa: E402  (scripts/bench.py: process launch, machine line)

# The child: one `hftl train`, then its peak GPU memory next to the model folder.
CHILD = ("import json, sys, torch; from hftl.cli import main; rc = main(sys.argv[2:]); "
         "json.dump({'rc': rc, 'gpu_peak_mib': torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}, "
         "open(sys.argv[1], 'w')); sys.exit(rc)")


def run(config: str, mode: str, precision: str, extra: list[str], folder: Path) -> dict:
    out = folder / "model"
    args = ["train", config, f"adapt.mode={mode}", f"train.mixed_precision={precision}", *extra,
            f"output.dir={out}", "output.overwrite=true"]
    m = launch([sys.executable, "-c", CHILD, str(folder / "child.json"), *args], folder / "log.txt", folder / "datasets-cache")
    res = json.loads((out / "results.json").read_text())
    return {**m, **json.loads((folder / "child.json").read_text()), "train_seconds": res["train_seconds"],
            "accuracy": res["results"]["validation"]["accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="an hftl recipe config")
    ap.add_argument("--set", nargs="+", default=[], dest="overrides", metavar="KEY=VALUE", help="config overrides for every run")
    ap.add_argument("--modes", nargs="+", default=["full", "lora", "head"])
    ap.add_argument("--precisions", nargs="+", default=["no", "bf16"], choices=["no", "bf16", "fp16"])
    ap.add_argument("--out", default="precision.md")
    ap.add_argument("--keep", action="store_true", help="keep the runs' folders (logs, model folders) and print where")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hftl-bench-precision-"))
    lines = ["## Mixed precision", "", f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_precision.py {shlex.join(sys.argv[1:])}`", "",
             f"Machine: {machine()}", "",
             "| mode | precision | wall s | train s | faster than fp32 (train s) | validation accuracy % | peak GPU MiB | peak host MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for mode in args.modes:
        base = None
        for precision in args.precisions:
            folder = work / f"{mode}-{precision}"
            folder.mkdir()
            r = run(args.config, mode, precision, args.overrides, folder)
            base = base or (r if precision == "no" else None)
            ratio = f"{base['train_seconds'] / r['train_seconds']:.2f}x" if base else ""
            gpu = f"{r['gpu_peak_mib']:.0f}" if r["gpu_peak_mib"] is not None else "no GPU"
            lines.append(f"| {mode} | {'fp32' if precision == 'no' else precision} | {r['wall']:.1f} | {r['train_seconds']:.1f} | {ratio} | "
                         f"{100 * r['accuracy']:.2f} | {gpu} | {r['peak_mib']:.0f} |")
            print(lines[-1], flush=True)
    lines.append("")
    finish(lines, args.out, work, args.keep)


if __name__ == "__main__":
    main()
