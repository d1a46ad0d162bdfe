"""Load an adapter folder written by peft-node with HF PEFT (PeftModel.from_pretrained over a
transformers base) and write its logits for given token ids, so that a test can compare them with
peft-node's.

Usage: python check_adapter_hf.py <base-model-dir> <adapter-dir> <ids-json> <out.f32> [--inference]
  ids-json: [[id, ...], ...] (rows of equal length); out.f32 receives the logits, float32
  little-endian, shape [rows, seq, vocab]. Prints one JSON line: {"shape": [...], "peft_type": ...,
  "trainable": n, "total": n} (parameter counts of the loaded model with is_trainable=True).
  --inference: load with is_trainable=False (HF refuses is_trainable=True for prompt-learning
  adapters such as CPT).
  --decoder-ids <json>: an encoder-decoder base (T5: AutoModelForSeq2SeqLM); the ids are the
  encoder's and these rows the decoder's input ids (the logits are the decoder's).
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base_dir, adapter_dir, ids_json, out = sys.argv[1:5]
rest = sys.argv[5:]
decoder_ids = json.loads(rest[rest.index("--decoder-ids") + 1]) if "--decoder-ids" in rest else None
torch.set_num_threads(1)
if decoder_ids is None:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").eval()
else:
    from transformers import AutoModelForSeq2SeqLM
    base = AutoModelForSeq2SeqLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").eval()
    # PEFT 0.21's PeftModelForSeq2SeqLM reads a generation hook that transformers 5.18 renamed.
    cls = type(base)
    if not hasattr(cls, "_prepare_encoder_decoder_kwargs_for_generation"):
        cls._prepare_encoder_decoder_kwargs_for_generation = cls._prepare_text_encoder_decoder_kwargs_for_generation
model = PeftModel.from_pretrained(base, adapter_dir, is_trainable="--inference" not in rest).eval()
ids = torch.tensor(json.loads(ids_json), dtype=torch.long)
with torch.no_grad():
    if decoder_ids is None:
        logits = model(input_ids=ids).logits.float().numpy()
    else:
        logits = model(input_ids=ids, decoder_input_ids=torch.tensor(decoder_ids, dtype=torch.long)).logits.float().numpy()
logits.astype("<f4").tofile(out)
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
total = sum(p.numel() for p in model.parameters())
print(json.dumps({"shape": list(logits.shape), "peft_type": str(model.peft_config["default"].peft_type.value), "trainable": trainable, "total": total}))
