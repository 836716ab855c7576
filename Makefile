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

# One worker per core (pytest-xdist), a test file's tests on one worker so its module fixtures build once: the suite
# is single-threaded (tests/conftest.py sets OMP_NUM_THREADS=1), so 2 cores take it from 16 to 7.5 minutes.
test: setup
	.venv/bin/python -m pytest -q -n auto --dist loadfile

bench-sst2: setup
	.venv/bin/python scripts/sst2_modes.py
