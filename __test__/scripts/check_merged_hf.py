"""Load a model folder written by peft-node's `PreTrainedModel.savePretrained` with HF transformers
and write its logits for given token ids, so that a test can compare them with peft-node's.

Usage: python check_merged_hf.py <model-dir> <ids-json> <out.f32> [text]
  ids-json: [[id, ...], ...] (rows of equal length); out.f32 receives the logits, float32
  little-endian, shape [rows, seq, vocab]. Prints one JSON line: {"shape": [...], "class": ...,
  "tokenizer_ids": ids of `text` by AutoTokenizer (when a text is given)}.
"""
import json
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, ids_json, out = sys.argv[1], sys.argv[2], sys.argv[3]
text = sys.argv[4] if len(sys.argv) > 4 else None
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
model.eval()
ids = torch.tensor(json.loads(ids_json), dtype=torch.long)
with torch.no_grad():
    logits = model(input_ids=ids).logits.float().numpy()
logits.astype("<f4").tofile(out)
info = {"shape": list(logits.shape), "class": type(model).__name__}
if text is not None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    info["tokenizer_ids"] = tok(text, add_special_tokens=False)["input_ids"]
print(json.dumps(info))
