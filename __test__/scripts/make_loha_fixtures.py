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
from safetensors.torch import save_file
from peft import LoHaConfig, get_peft_model
from fixture_common import load_tiny_llama as load
NAME = "llama_loha"
OUT = f"cases/{NAME}"


def main():
    os.makedirs(OUT, exist_ok=True)
    seed = 1500
    torch.manual_seed(seed)
    cfg = LoHaConfig(task_type="CAUSAL_LM", r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    model = get_peft_model(load(), cfg)
    model.save_pretrained(OUT)
    trainable, total = fc.param_counts(model)
    ids, mask, labels, _ = fc.lycoris_batch(seed, model.config.vocab_size)
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids, attention_mask=mask).logits
        base = load()(input_ids=ids, attention_mask=mask).logits
    # Loss and gradients (eval mode, autograd on), keyed by the on-disk key.
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = fc.adapter_grads(model)
    with torch.no_grad():
        model.merge_adapter()
        merged = model(input_ids=ids, attention_mask=mask).logits
        model.unmerge_adapter()
        unmerged = model(input_ids=ids, attention_mask=mask).logits
    save_file(
        {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "logits_adapter": adapted.contiguous(),
            "logits_merged": merged.contiguous(),
            "logits_unmerged": unmerged.contiguous(),
            "logits_disabled": disabled.contiguous(),
            "logits_base": base.contiguous(),
            "loss": out.loss.detach().reshape(1).float(),
            **grads,
        },
        f"{OUT}/expected.safetensors",
    )
    from safetensors import safe_open

    with safe_open(f"{OUT}/adapter_model.safetensors", "pt") as f:
        keys = sorted(f.keys())
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
