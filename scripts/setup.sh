#!/usr/bin/env bash
# Create .venv and install llava_next with its test extras (torch pinned to the CPU build on this machine's disk).
# Shared by scripts/demo.sh and .ci/run. Prints one line per step (and pip's "Collecting"/"Installed" lines as
# progress), hides setuptools' deprecation blocks, and skips pip entirely when .venv was set up from the same
# pyproject.toml and this script (a stamp file in .venv holds their hash). A fresh machine (no .venv, or no stamp)
# always installs everything, extras included. LLAVA_NEXT_FORCE_SETUP=1 reinstalls anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${LLAVA_NEXT_EXTRAS:-dev}
STAMP=.venv/.llava_next-setup-stamp
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) extras=$EXTRAS"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export PYTHONWARNINGS="ignore::DeprecationWarning,ignore::UserWarning"  # setuptools' warning blocks

step() { echo "[setup] $*"; }

if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ "${LLAVA_NEXT_FORCE_SETUP:-0}" != 1 ]; then
  step ".venv is up to date (pyproject.toml unchanged): skipping pip"
  exit 0
fi

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
pip_step() {  # pip with progress lines only; its full output is shown when it fails
  if ! .venv/bin/python -m pip install --progress-bar off "$@" >"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    step "pip install $* failed" >&2
    exit 1
  fi
  grep -E '^(Collecting|Successfully installed)' "$LOG" | sed 's/^/    /' || true
}

if [ ! -x .venv/bin/python ]; then
  step "1/4 creating .venv with $PY"
  "$PY" -m venv .venv
else
  step "1/4 .venv exists"
fi
rm -f "$STAMP"
step "2/4 upgrading pip"
pip_step --upgrade pip
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
step "3/4 installing torch 2.13.0 (CPU build; the largest download)"
pip_step "torch==2.13.0"
step "4/4 installing llava_next and its [$EXTRAS] extras (transformers, bitsandbytes, pytest, ...)"
pip_step -e ".[$EXTRAS]"
.venv/bin/python -c "import llava_next, torch, transformers; print('[setup] llava_next ready: torch', torch.__version__, '| transformers', transformers.__version__)"
echo "$WANT" > "$STAMP"
