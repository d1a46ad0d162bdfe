"""HF PEFT 0.21 reference cases for LoKr (issue 15): `__test__/fixtures/cases/llama_lokr*`.

Run with torch 2.13 + transformers 5.18 + peft 0.21 (the venv of benches/README.md):

    python __test__/scripts/make_lokr_fixtures.py            # write the four cases
    python __test__/scripts/make_lokr_fixtures.py --check DIR # load an adapter peft-node saved in HF

Every case is a LoKrConfig on the tiny Llama of `__test__/fixtures/models/llama` with
init_weights=False (every lokr_* factor kaiming-uniform, so the adapter is not a no-op). HF's
`factorization()` splits the dimensions (64 -> 8x8, 32 -> 4x8, 128 -> 8x16; with
decompose_factor=4: 64 -> 4x16, 32 -> 4x8), and the rank decides which factors are full
matrices (`lokr_w1`, `lokr_w2`) or low-rank pairs (`lokr_w1_a`/`_b`, `lokr_w2_a`/`_b`):

- `llama_lokr`: r=2, alpha=4 on q/v_proj: full `lokr_w1`, decomposed `lokr_w2_a`/`lokr_w2_b`;
- `llama_lokr_both`: decompose_both=True, r=2 on q/v/up/down_proj: every factor decomposed;
- `llama_lokr_full`: r=8, alpha=2, decompose_both=True on all seven linears: r >= max/2
  everywhere, so HF uses full `lokr_w1` and `lokr_w2` (r only enters the scaling alpha/r);
- `llama_lokr_patterns`: r=2 on q/k/v/o_proj, decompose_factor=4, rank_pattern {q_proj: 8,
  layers.1.self_attn.k_proj: 1}, alpha_pattern {v_proj: 16}, rank/module dropout set (no effect
  in eval) and rank_dropout_scale=True.

Per case: the adapter folder as save_pretrained wrote it, `expected.safetensors` (inputs, labels,
logits adapted / merged / unmerged / disabled / base, loss, `grad.<adapter key>` of every lokr_*
tensor in eval mode, greedy ids of the adapter, base and merged model) and `case.json` (counts,
keys, which factors are full, HF's `to_dict()` of extra option sets for the TS config test).

`--check DIR`: DIR holds `adapter/` (a LoKr adapter folder written by peft-node) and
`ours.safetensors` (`input_ids`, `attention_mask`, `logits`: peft-node's logits with that
adapter); HF loads the folder and prints the max abs difference of its logits from ours.
"""

import json
import os
import sys

import fixture_common as fc

fc.start(enter_root=False)  # PYTHONHASHSEED=0 (target_modules is a set in HF's config); --check resolves its path first

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from peft import LoKrConfig, PeftModel, get_peft_model
from fixture_common import ROOT, greedy, load_tiny_llama as load

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = [
    ("llama_lokr", 1600, "LoKr r=2 alpha=4 on q_proj/v_proj, init_weights=False: full lokr_w1, decomposed lokr_w2_a/lokr_w2_b.",
     dict(task_type="CAUSAL_LM", r=2, alpha=4, target_modules=["q_proj", "v_proj"], init_weights=False)),
    ("llama_lokr_both", 1610, "LoKr decompose_both=True r=2 alpha=4 on q/v/up/down_proj, init_weights=False: every factor decomposed.",
     dict(task_type="CAUSAL_LM", r=2, alpha=4, decompose_both=True, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], init_weights=False)),
    ("llama_lokr_full", 1620, "LoKr r=8 alpha=2 decompose_both=True on every linear, init_weights=False: r is large, so full lokr_w1 and lokr_w2.",
     dict(task_type="CAUSAL_LM", r=8, alpha=2, decompose_both=True, target_modules=ALL, init_weights=False)),
    ("llama_lokr_patterns", 1630, "LoKr r=2 alpha=4 decompose_factor=4 on q/k/v/o_proj with rank_pattern and alpha_pattern, dropouts set (eval), init_weights=False.",
     dict(task_type="CAUSAL_LM", r=2, alpha=4, decompose_factor=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
          rank_pattern={"q_proj": 8, "layers.1.self_attn.k_proj": 1}, alpha_pattern={"v_proj": 16},
          rank_dropout=0.25, module_dropout=0.1, rank_dropout_scale=True, init_weights=False)),
]


def make_case(name, seed, description, kwargs):
    out_dir = f"cases/{name}"
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    model = get_peft_model(load(), LoKrConfig(**kwargs))
    model.save_pretrained(out_dir)
    trainable, total = fc.param_counts(model)
    ids, mask, labels, g = fc.lycoris_batch(seed, model.config.vocab_size)
    gen_ids = torch.randint(3, model.config.vocab_size, (2, 4), generator=g)
    model.eval()
    base_model = load()
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids, attention_mask=mask).logits
        base = base_model(input_ids=ids, attention_mask=mask).logits
    gen_adapter = greedy(model, gen_ids)
    gen_base = greedy(base_model, gen_ids)
    # Loss and gradients (eval mode: no dropout), keyed by the on-disk key.
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = fc.adapter_grads(model)
    with torch.no_grad():
        model.merge_adapter()
        merged = model(input_ids=ids, attention_mask=mask).logits
        gen_merged = greedy(model, gen_ids)
        model.unmerge_adapter()
        unmerged = model(input_ids=ids, attention_mask=mask).logits
    save_file(
        {
            "input_ids": ids, "attention_mask": mask, "labels": labels,
            "logits_adapter": adapted.contiguous(), "logits_merged": merged.contiguous(),
            "logits_unmerged": unmerged.contiguous(), "logits_disabled": disabled.contiguous(),
            "logits_base": base.contiguous(), "loss": out.loss.detach().reshape(1).float(),
            "generate_input_ids": gen_ids, "generate_adapter": gen_adapter, "generate_base": gen_base,
            "generate_merged": gen_merged,
            **grads,
        },
        f"{out_dir}/expected.safetensors",
    )
    with safe_open(f"{out_dir}/adapter_model.safetensors", "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in sorted(f.keys())}
    info = {
        "name": name,
        "description": description,
        "base_model": "models/llama",
        "seed": seed,
        "config_kwargs": kwargs,
        "trainable_params": trainable,
        "all_params": total,
        "adapter_keys": list(shapes),
        "adapter_shapes": shapes,
        "merged_vs_adapter_max_abs": float((merged - adapted).abs().max()),
        "disabled_vs_base_max_abs": float((disabled - base).abs().max()),
        "adapter_vs_base_max_abs": float((adapted - base).abs().max()),
        "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4, "loss_atol": 1e-5, "grad_rtol": 1e-4},
        "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__, "transformers": __import__("transformers").__version__},
    }
    if name == "llama_lokr":
        # Option sets for the TS LoKrConfig.toJSON test (not saved as adapters; peft_version is added at save).
        opts = []
        for o in [
            dict(r=8, alpha=16, rank_dropout=0.1, module_dropout=0.05, target_modules=["q_proj", "v_proj"],
                 rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 4}, use_effective_conv2d=True, decompose_both=True,
                 decompose_factor=4, rank_dropout_scale=True, task_type="CAUSAL_LM"),
            dict(target_modules=["q_proj"], init_weights="lycoris", exclude_modules=["layers.0.self_attn.q_proj"],
                 layers_to_transform=[1], layers_pattern="layers", modules_to_save=["lm_head"]),
        ]:
            d = LoKrConfig(**o).to_dict()
            for k in ("target_modules", "exclude_modules"):
                if isinstance(d[k], (set, list)):
                    d[k] = sorted(d[k])
            opts.append({"kwargs": o, "to_dict": json.loads(json.dumps(d, default=str))})
        info["options"] = opts
    with open(f"{out_dir}/case.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    if os.path.exists(f"{out_dir}/README.md"):
        os.remove(f"{out_dir}/README.md")
    print(name, "trainable", trainable, "shapes", {k.split("layers.")[1]: v for k, v in list(shapes.items())[:4]},
          "merged-vs-adapter", info["merged_vs_adapter_max_abs"], "adapter-vs-base", info["adapter_vs_base_max_abs"])


def check(d):
    """Load peft-node's adapter folder `d/adapter` in HF and compare logits with `d/ours.safetensors`."""
    ours = load_file(os.path.join(d, "ours.safetensors"))
    model = PeftModel.from_pretrained(load(), os.path.join(d, "adapter")).eval()
    with torch.no_grad():
        theirs = model(input_ids=ours["input_ids"].long(), attention_mask=ours["attention_mask"].long()).logits
    diff = (theirs - ours["logits"]).abs().max().item()
    rel = diff / ours["logits"].abs().max().item()
    cfg = model.peft_config["default"]
    print(f"HF loaded peft-node's LoKr adapter ({type(cfg).__name__}, r={cfg.r}): max abs diff {diff:.3e}, rel {rel:.3e}")
    sys.exit(0 if diff <= 1e-4 else 1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        target = os.path.abspath(sys.argv[2])
        os.chdir(ROOT)
        check(target)
    else:
        os.chdir(ROOT)
        for c in CASES:
            make_case(*c)
