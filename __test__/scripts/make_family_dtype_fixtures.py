"""Issue 18's HF-folder variants: each newer family's tiny model (`models/{llama3,qwen3,gemma3,smollm3,phi3}`)
saved by transformers 5.18 as a user's checkpoint would be, in `__test__/fixtures/models/dtypes/`:

- `<family>_bf16_sharded`: loaded with `dtype=torch.bfloat16` and saved with `max_shard_size="40KB"` (several
  `model-0000i-of-0000n.safetensors` and `model.safetensors.index.json`);
- `<family>_f16`: loaded with `dtype=torch.float16`, saved as one file.

Each folder also holds `expected.safetensors`: `input_ids` `[2, 6]` and `logits`, transformers' logits of
that folder loaded back in float32 (eager attention), i.e. of the rounded weights.

Run with torch 2.13 + transformers 5.18 (the venv of benches/README.md):

    python __test__/scripts/make_family_dtype_fixtures.py
"""

import os
import shutil

import fixture_common as fc

fc.start()

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

FAMILIES = ["llama3", "qwen3", "gemma3", "smollm3", "phi3"]


def write(fam, kind, dtype, shard):
    out = f"models/dtypes/{fam}_{kind}"
    if os.path.exists(out):
        shutil.rmtree(out)
    m = AutoModelForCausalLM.from_pretrained(f"models/{fam}", dtype=dtype)
    m.save_pretrained(out, max_shard_size=shard) if shard else m.save_pretrained(out)
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(len(fam))
    ids = torch.randint(3, back.config.vocab_size, (2, 6), generator=g)
    with torch.no_grad():
        logits = back(input_ids=ids).logits
    save_file({"input_ids": ids, "logits": logits.contiguous()}, f"{out}/expected.safetensors")
    print(out, sorted(os.listdir(out)))


if __name__ == "__main__":
    for fam in FAMILIES:
        write(fam, "bf16_sharded", torch.bfloat16, "40KB")
        write(fam, "f16", torch.float16, None)
