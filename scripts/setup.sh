#!/usr/bin/env bash
# One-time set-up on a fresh machine (Python 3.11, pip, apt): FFmpeg for audio decoding, then a
# virtual environment in .venv with hftl, every extra the tests use, and the torch set CI tests. Idempotent:
# reruns only reinstall when pyproject.toml or this file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# torch and the two packages built against it, as the set CI runs. pyproject.toml can only give ranges (pip cannot
# say "torchaudio of the installed torch's minor version"); hftl/extras.py refuses a mismatched pair at import.
# torchaudio 2.11.1 is torchaudio's newest release, and it fails to load beside torch 2.13.
TORCH_SET=(torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0)

if ! command -v ffmpeg >/dev/null 2>&1; then
  echo "setup: installing FFmpeg (datasets decodes audio through torchcodec, which needs its libraries)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  if ! ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg >/dev/null); then
    echo "setup: warning: could not install ffmpeg; audio recipes will need it (apt-get install ffmpeg)" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.hftl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # The pins in the same resolve as hftl's ranges, so no other requirement moves them.
  .venv/bin/python -m pip install -q -e ".[test]" "${TORCH_SET[@]}"
  touch "$stamp"
fi
