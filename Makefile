# The two commands a fresh machine needs (both run scripts/setup.sh first):
#   make demo   - the embedded default run, offline: MiniLM fine-tuned on the VADER lexicon
#   make test   - the whole test suite
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench-sst2

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/hftl train output.overwrite=true

test: setup
	.venv/bin/python -m pytest -q

bench-sst2: setup
	.venv/bin/python scripts/sst2_modes.py
