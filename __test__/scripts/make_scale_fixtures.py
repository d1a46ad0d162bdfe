"""HF PEFT 0.21 reference for LoRA scales (issue 15): `LoraLayer.set_scale` on every layer holding
an adapter (rsLoRA adapter `b` of the weighted case) and `peft.helpers.rescale_adapter_scale`
(adapter `a`), on the tiny llama.

    python __test__/scripts/make_scale_fixtures.py   # torch 2.13, transformers 5.18, peft 0.21

Reads the adapters of `__test__/fixtures/cases/weighted/` and writes
`__test__/fixtures/cases/scale/expected.safetensors` (input ids and logits).
"""

import os

import torch
from safetensors.torch import save_file
from peft import PeftModel
from peft.helpers import rescale_adapter_scale
from peft.tuners.lora import LoraLayer

from fixture_common import load_tiny_llama as base, save_seeded_adapters, start

start()
OUT = "cases/scale"


def main():
    os.makedirs(OUT, exist_ok=True)
    m = PeftModel.from_pretrained(base(), "cases/weighted/a", adapter_name="a")
    m.load_adapter("cases/weighted/b", adapter_name="b")
    g = torch.Generator().manual_seed(3020)
    ids = torch.randint(3, 256, (2, 7), generator=g)
    out = {"input_ids": ids}

    def logits():
        with torch.no_grad():
            return m(input_ids=ids).logits.contiguous()

    def set_scale(name, scale):
        for mod in m.modules():
            if isinstance(mod, LoraLayer):
                mod.set_scale(name, scale)

    m.set_adapter("b")
    out["logits_b"] = logits()
    set_scale("b", 0.5)
    out["logits_b_scale_0.5"] = logits()
    set_scale("b", -2.0)
    out["logits_b_scale_-2"] = logits()
    set_scale("b", 1.0)
    assert torch.equal(logits(), out["logits_b"])
    m.set_adapter("a")
    out["logits_a"] = logits()
    with rescale_adapter_scale(m, 0.25):
        out["logits_a_rescale_0.25"] = logits()
        with rescale_adapter_scale(m, 2.0):
            out["logits_a_rescale_0.25_2"] = logits()
    assert torch.equal(logits(), out["logits_a"])
    save_file(out, f"{OUT}/expected.safetensors")


if __name__ == "__main__":
    main()
