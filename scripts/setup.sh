#!/usr/bin/env bash
# One-time set-up on a fresh machine (Python 3.11, pip, apt): FFmpeg for audio decoding, then a
# virtual environment in .venv with hftl and its pinned torch/torchaudio pair. Idempotent: reruns
# only reinstall when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

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
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test,tune]"
  touch "$stamp"
fi
