#!/usr/bin/env bash
# Offline demo: set up .venv (skipped when nothing changed), build the demo checkpoint (RANDOM weights, real Mistral
# tokenizer, llava-v1.6-mistral layout) into ./demo-checkpoint if absent, write a real photo (scikit-image's cat)
# and run `llava-next generate`. Needs no hub access. The answer is meaningless by design: the weights are random
# (`generate` prints the RANDOM WEIGHTS warning once).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONWARNINGS="ignore::DeprecationWarning"
bash scripts/setup.sh
CKPT=./demo-checkpoint
if [ ! -f "$CKPT/model.safetensors" ]; then
  echo "[demo] building the demo checkpoint in $CKPT"
  .venv/bin/llava-next demo-checkpoint "$CKPT" --force --quiet >/dev/null
fi
if [ ! -f "$CKPT/cat.png" ]; then
  echo "[demo] writing a photo to $CKPT/cat.png"
  .venv/bin/python -c "import sys; from PIL import Image; from skimage import data; Image.fromarray(data.chelsea()).save(sys.argv[1])" "$CKPT/cat.png"
fi
echo "[demo] generating"
.venv/bin/llava-next generate --model "$CKPT" --image "$CKPT/cat.png" --prompt "What is shown in this image?" --max-new-tokens 30
