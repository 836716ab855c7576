"""Real-data evidence for the three core modes: MiniLM on SST-2 (../shared/data/text/sst2).

    .venv/bin/python scripts/sst2_modes.py [--modes head lora full] [key=value ...]

Runs `hftl train recipes/configs/text/minilm_sst2_<mode>.yaml` for each mode as a user would (a
fresh process each), and writes scripts/results/sst2_modes.md: validation accuracy / macro-F1,
wall time of the whole command, training time, and trainable parameters.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SST2 = Path(os.environ.get("HFTL_SHARED_DATA", ROOT.parent / "shared" / "data")) / "text" / "sst2"  # as scripts/benchlib.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["head", "lora", "full"])
    ap.add_argument("--out", default=str(ROOT / "scripts" / "results" / "sst2_modes.md"))
    ap.add_argument("overrides", nargs="*", help="extra key=value for every run")
    args = ap.parse_args()
    hftl = str(Path(sys.executable).with_name("hftl"))
    rows = []
    for mode in args.modes:
        out_dir = ROOT / "outputs" / f"bench_sst2_{mode}"
        # The presets name no data: SST-2 from this environment's shared folder.
        cmd = [hftl, "train", f"recipes/configs/text/minilm_sst2_{mode}.yaml", f"data.train_file={SST2 / 'train.csv'}",
               f"data.validation_file={SST2 / 'validation.csv'}", f"output.dir={out_dir}", "output.overwrite=true", *args.overrides]
        print("$", " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - start
        res = json.loads((out_dir / "results.json").read_text())
        val = res["results"]["validation"]
        cfg = (out_dir / "hftl_config.yaml").read_text()
        epochs = next(line.split(":")[1].strip() for line in cfg.splitlines() if line.strip().startswith("epochs:"))
        lr = next(line.split(":")[1].strip() for line in cfg.splitlines() if line.strip().startswith("learning_rate:"))
        rows.append(f"| {mode} | {epochs} | {lr} | {100 * val['accuracy']:.2f} | {100 * val['f1']:.2f} | "
                    f"{wall:.0f} | {res['train_seconds']:.0f} | {res['trainable_params']:,} ({100 * res['trainable_params'] / res['total_params']:.2f}%) |")
        print(rows[-1], flush=True)
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    table = "\n".join([
        f"SST-2 validation (872 sentences), all-MiniLM-L6-v2, seed 42, batch 32; {machine}.",
        "Command: `" + " ".join([".venv/bin/python scripts/sst2_modes.py --modes", *args.modes, *args.overrides]) + "`",
        "",
        "| mode | epochs | learning rate | accuracy % | macro-F1 % | wall s (whole command) | train s | trainable params |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
