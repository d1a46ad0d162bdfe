"""HF PEFT 0.21 reference for `hotswap_adapter` (issue 15) on the tiny llama: adapter `a` of the
weighted case is loaded as "default", then swapped in place for `a2` (same targets and rank,
another lora_alpha and other weights), for `q_only` (q_proj only: v_proj's weights become 0), for
`r2` (rank 2: zero-padded into the rank-4 tensors) and for `r8` (rank 8: the tensors grow).

    python __test__/scripts/make_hotswap_fixtures.py   # torch 2.13, transformers 5.18, peft 0.21

Writes `__test__/fixtures/cases/hotswap/` (adapters `a2/`, `q_only/`, `r2/`, `r8/`, `rslora/` (incompatible),
`expected.safetensors`).
"""

import os

import torch
from safetensors.torch import save_file
from peft import LoraConfig, PeftModel
from peft.utils.hotswap import hotswap_adapter

from fixture_common import load_tiny_llama as base, save_seeded_adapters, start

start()
OUT = "cases/hotswap"


def main():
    os.makedirs(OUT, exist_ok=True)
    specs = {
        "a2": (LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False), 3031),
        "q_only": (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False), 3032),
        "rslora": (LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"], init_lora_weights=False), 3033),
        "r2": (LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False), 3034),
        "r8": (LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), 3035),
    }
    save_seeded_adapters(OUT, specs)
    g = torch.Generator().manual_seed(3030)
    ids = torch.randint(3, 256, (2, 7), generator=g)
    out = {"input_ids": ids}
    m = PeftModel.from_pretrained(base(), "cases/weighted/a")

    def logits():
        with torch.no_grad():
            return m(input_ids=ids).logits.contiguous()

    out["logits_a"] = logits()
    hotswap_adapter(m, f"{OUT}/a2", adapter_name="default", torch_device="cpu")
    out["logits_a2"] = logits()
    hotswap_adapter(m, f"{OUT}/q_only", adapter_name="default", torch_device="cpu")
    out["logits_q_only"] = logits()
    hotswap_adapter(m, f"{OUT}/r2", adapter_name="default", torch_device="cpu")
    out["logits_r2"] = logits()
    hotswap_adapter(m, f"{OUT}/r8", adapter_name="default", torch_device="cpu")
    out["logits_r8"] = logits()
    hotswap_adapter(m, f"{OUT}/a2", adapter_name="default", torch_device="cpu")
    out["logits_r8_then_a2"] = logits()
    try:
        hotswap_adapter(m, f"{OUT}/rslora", adapter_name="default", torch_device="cpu")
        raise SystemExit("expected an error")
    except ValueError as e:
        assert "use_rslora" in str(e), e
    # a fresh load of a2 / r2 / r8 gives the hotswapped logits
    for name, key in [("a2", "logits_a2"), ("r2", "logits_r2"), ("r8", "logits_r8"), ("a2", "logits_r8_then_a2")]:
        fresh = PeftModel.from_pretrained(base(), f"{OUT}/{name}")
        with torch.no_grad():
            assert torch.allclose(fresh(input_ids=ids).logits, out[key], atol=1e-5), name
    save_file(out, f"{OUT}/expected.safetensors")


if __name__ == "__main__":
    main()
