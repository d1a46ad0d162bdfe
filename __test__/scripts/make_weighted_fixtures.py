"""HF PEFT 0.21 reference for `add_weighted_adapter` (issue 15): two LoRA adapters on the tiny
llama, combined with every deterministic combination type; the new adapter's delta weights
(scaling * B @ A per layer) and the logits with it active.

    python __test__/scripts/make_weighted_fixtures.py   # torch 2.13, transformers 5.18, peft 0.21

Writes `__test__/fixtures/cases/weighted/` (adapters `a/`, `b/`, `c/`, `expected.safetensors`,
`case.json`).
"""

import json
import os

import torch
from safetensors.torch import save_file
from peft import LoraConfig, PeftModel

from fixture_common import load_tiny_llama as base, save_seeded_adapters, start

start()
OUT = "cases/weighted"


def main():
    os.makedirs(OUT, exist_ok=True)
    specs = {
        "a": (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), 3001),
        "b": (LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj"], init_lora_weights=False), 3002),
        "c": (LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj", "down_proj"], init_lora_weights=False), 3003),
    }
    save_seeded_adapters(OUT, specs)
    g = torch.Generator().manual_seed(3010)
    ids = torch.randint(3, 256, (2, 6), generator=g)
    expected = {"input_ids": ids}
    combos = {
        "cat": dict(adapters=["a", "b", "c"], weights=[1.0, -0.5, 2.0], combination_type="cat"),
        "svd": dict(adapters=["a", "b", "c"], weights=[1.0, -0.5, 2.0], combination_type="svd"),
        "svd_r2": dict(adapters=["a", "b"], weights=[0.7, 0.3], combination_type="svd", svd_rank=2),
        "linear": dict(adapters=["a", "b"], weights=[1.0, -0.5], combination_type="linear"),
        "single": dict(adapters=["b"], weights=[-0.7], combination_type="svd"),
        "ties": dict(adapters=["a", "b"], weights=[1.0, 0.6], combination_type="ties", density=0.5),
        "ties_frequency": dict(adapters=["a", "b"], weights=[1.0, 0.6], combination_type="ties", density=0.5, majority_sign_method="frequency"),
        "magnitude_prune": dict(adapters=["a", "b"], weights=[1.0, 0.6], combination_type="magnitude_prune", density=0.4),
        "ties_svd": dict(adapters=["a", "b", "c"], weights=[1.0, 0.6, -1.0], combination_type="ties_svd", density=0.5),
        "magnitude_prune_svd": dict(adapters=["a", "b", "c"], weights=[1.0, 0.6, -1.0], combination_type="magnitude_prune_svd", density=0.3),
    }
    info = {"combos": {}, "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__}}
    for key, kw in combos.items():
        m = PeftModel.from_pretrained(base(), f"{OUT}/a", adapter_name="a")
        m.load_adapter(f"{OUT}/b", adapter_name="b")
        m.load_adapter(f"{OUT}/c", adapter_name="c")
        m.add_weighted_adapter(adapter_name="mix", **kw)
        m.set_adapter("mix")
        m.eval()
        layers = {}
        for name, mod in m.base_model.model.named_modules():
            if hasattr(mod, "lora_A") and "mix" in mod.lora_A:
                d = mod.get_delta_weight("mix").detach().contiguous()
                expected[f"{key}.{name}"] = d
                layers[name] = list(mod.lora_A["mix"].weight.shape)
        with torch.no_grad():
            expected[f"{key}.logits"] = m(input_ids=ids).logits.contiguous()
        cfg = m.peft_config["mix"]
        info["combos"][key] = {
            "call": kw,
            "r": cfg.r,
            "lora_alpha": cfg.lora_alpha,
            "target_modules": sorted(cfg.target_modules) if isinstance(cfg.target_modules, (set, list)) else cfg.target_modules,
            "layers": layers,
        }
    save_file(expected, f"{OUT}/expected.safetensors")
    with open(f"{OUT}/case.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print(json.dumps({k: (v["r"], v["lora_alpha"], v["target_modules"], len(v["layers"])) for k, v in info["combos"].items()}, indent=1))


if __name__ == "__main__":
    main()
