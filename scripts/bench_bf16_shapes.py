"""Where bf16 autocast loses on a GPU: per-step time of a plain PyTorch training loop (no hftl) for one BERT-family
architecture, over fixed, varied (dynamic padding) and rounded-up sequence lengths, in fp32 and bf16.

    .venv/bin/python scripts/bench_bf16_shapes.py ARCH_FOLDER [ARCH_FOLDER ...]   # folders with a config.json; CUDA needed

Random weights and token ids (speed only), batch 32, AdamW, 150 steps per case (the same 150 lengths for every
case of a kind); prints a Markdown table: total seconds and the mean milliseconds per step after the first 50.
"""
import json, random, sys, time, torch
from transformers import AutoConfig, AutoModelForSequenceClassification
dev = "cuda"  # speed on a GPU is the question; on a CPU bf16 autocast is far slower still
def run(arch, precision, lengths, steps=150, batch=32):
    cfg = AutoConfig.from_pretrained(arch, num_labels=2)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(steps):
        L = lengths[i % len(lengths)]
        ids = torch.randint(1000, 2000, (batch, L), device=dev); y = torch.randint(0, 2, (batch,), device=dev)
        torch.cuda.synchronize(); t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=y).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    return sum(times), sum(times[50:]) / len(times[50:])
random.seed(0)
varied = [random.randint(8, 66) for _ in range(150)]
cases = {"fixed 64": [64], "varied 8-66": varied, "varied, to multiple of 8": [-(-l // 8) * 8 for l in varied], "varied, to multiple of 64": [64 if l <= 64 else 128 for l in varied]}
print("| model | lengths | precision | total s (150 steps) | ms/step after 50 |")
for arch in sys.argv[1:]:
    for name, lengths in cases.items():
        for p in ("no", "bf16"):
            tot, per = run(arch, p, lengths)
            print(f"| {arch.split('/')[-1]} | {name} | {p} | {tot:.2f} | {1000*per:.1f} |", flush=True)
