"""HF PEFT 0.21 reference case for LoHa (issue 15): `__test__/fixtures/cases/llama_loha`.

Run with torch 2.13 + transformers 5.18 + peft 0.21 (the venv of benches/README.md):

    python __test__/scripts/make_loha_fixtures.py

LoHaConfig(r=4, alpha=8, target_modules=['q_proj', 'v_proj'], init_weights=False) on the tiny
Llama of `__test__/fixtures/models/llama` (init_weights=False: all four hada_* kaiming-uniform, so
the adapter is not a no-op). Writes the adapter folder as save_pretrained wrote it,
`expected.safetensors` (inputs, labels, logits adapted / merged / disabled / base, loss and
`grad.<adapter key>` for every hada_* tensor) and `case.json` (counts, keys, the TS-side config
JSON of a second option set).
"""

import json
import os

import fixture_common as fc

fc.start()  # PYTHONHASHSEED=0 (target_modules is a set in HF's config), in the fixtures root

import torch
from peft import LoHaConfig, get_peft_model
from fixture_common import load_tiny_llama as load
NAME = "llama_loha"
OUT = f"cases/{NAME}"


def main():
    seed = 1500
    torch.manual_seed(seed)
    cfg = LoHaConfig(task_type="CAUSAL_LM", r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    model = get_peft_model(load(), cfg)
    trainable, total, ids, mask, labels = fc.save_adapter_and_batch(model, OUT, seed)
    adapted = fc.adapter_logits(model, ids, mask)
    disabled = fc.adapter_logits(model, ids, mask, disabled=True)
    base = fc.adapter_logits(load(), ids, mask)
    # Loss and gradients (eval mode, autograd on), keyed by the on-disk key.
    loss, grads = fc.loss_and_grads(model, ids, mask, labels)
    merged = fc.adapter_logits(model, ids, mask, merged=True)
    unmerged = fc.adapter_logits(model, ids, mask)
    fc.save_expected(OUT, {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "logits_adapter": adapted, "logits_merged": merged, "logits_unmerged": unmerged,
        "logits_disabled": disabled, "logits_base": base,
        "loss": loss, **grads,
    })
    keys = fc.keys_of(f"{OUT}/adapter_model.safetensors")
    # A second option set for the TS LoHaConfig.toJSON test (not saved as an adapter).
    opts = LoHaConfig(
        r=8, alpha=16, rank_dropout=0.1, module_dropout=0.05, target_modules=["q_proj", "v_proj"],
        rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 4}, use_effective_conv2d=True, task_type="CAUSAL_LM",
    )
    opts_json = opts.to_dict()
    opts_json["target_modules"] = sorted(opts_json["target_modules"])
    info = {
        "name": NAME,
        "description": "LoHa r=4 alpha=8 on q_proj/v_proj, init_weights=False (all hada_* kaiming-uniform).",
        "base_model": "models/llama",
        "seed": seed,
        "config_kwargs": {"task_type": "CAUSAL_LM", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_weights": False},
        "trainable_params": trainable,
        "all_params": total,
        "adapter_keys": keys,
        "merged_vs_adapter_max_abs": float((merged - adapted).abs().max()),
        "disabled_vs_base_max_abs": float((disabled - base).abs().max()),
        "adapter_vs_base_max_abs": float((adapted - base).abs().max()),
        "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4, "loss_atol": 1e-5, "grad_rtol": 1e-4},
        "options_config_kwargs": "LoHaConfig(r=8, alpha=16, rank_dropout=0.1, module_dropout=0.05, target_modules=['q_proj','v_proj'], rank_pattern={'q_proj': 4}, alpha_pattern={'v_proj': 4}, use_effective_conv2d=True, task_type='CAUSAL_LM')",
        "options_to_dict": json.loads(json.dumps(opts_json, default=str)),
        "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__, "transformers": __import__("transformers").__version__},
    }
    with open(f"{OUT}/case.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    if os.path.exists(f"{OUT}/README.md"):
        os.remove(f"{OUT}/README.md")
    print(NAME, "trainable", trainable, "keys", keys[:4], "merged-vs-adapter", info["merged_vs_adapter_max_abs"])


if __name__ == "__main__":
    main()
