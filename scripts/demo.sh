#!/usr/bin/env bash
# Offline demo: set up .venv, build the demo checkpoint (RANDOM weights, real Mistral tokenizer, llava-v1.6-mistral
# layout) into ./demo-checkpoint if absent, write a real photo (scikit-image's cat) and run `llava-next generate`.
# Needs no hub access. The answer is meaningless by design: the weights are random.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CKPT=./demo-checkpoint
if [ ! -f "$CKPT/model.safetensors" ]; then
  .venv/bin/llava-next demo-checkpoint "$CKPT" --force
fi
if [ ! -f "$CKPT/cat.png" ]; then
  .venv/bin/python -c "import sys; from PIL import Image; from skimage import data; Image.fromarray(data.chelsea()).save(sys.argv[1])" "$CKPT/cat.png"
fi
.venv/bin/llava-next generate --model "$CKPT" --image "$CKPT/cat.png" --prompt "What is shown in this image?" --max-new-tokens 30
