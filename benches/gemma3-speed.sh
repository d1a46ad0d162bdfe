#!/bin/bash
# Gemma 3 LoRA training, side by side with HF PEFT, interleaved: per round HF PEFT, peft-node
# (fused engine), peft-node with PEFT_ENGINE=0 (the general candle path), 2 threads each, on a
# random-init gemma-3-270m-shaped model (benches/gemma3_ref.py make). Needs `npm run build`.
#
#   benches/gemma3-speed.sh /path/to/python-with-torch-peft [rounds=3] [model dir]
#
# Prints one JSON line per run (tokens/s median over 6 timed steps after 2 warm-up steps, peak
# RSS); run it on an otherwise idle machine.
set -euo pipefail
PY=${1:?python with torch, transformers and peft}
ROUNDS=${2:-3}
DIR=${3:-.cache/models/gemma-3-270m-random}
cd "$(dirname "$0")/.."
[ -f "$DIR/model.safetensors" ] || "$PY" benches/gemma3_ref.py make "$DIR"
for r in $(seq 1 "$ROUNDS"); do
  echo "# round $r"
  "$PY" benches/gemma3_ref.py train "$DIR" --threads 2 2>/dev/null | grep '^{'
  RAYON_NUM_THREADS=2 node dist/benches/train.bench.js --model "$DIR" --only train | sed 's/"impl":"peft-node"/"impl":"peft-node (engine)"/'
  PEFT_ENGINE=0 RAYON_NUM_THREADS=2 node dist/benches/train.bench.js --model "$DIR" --only train | sed 's/"impl":"peft-node"/"impl":"peft-node (general path)"/'
done
