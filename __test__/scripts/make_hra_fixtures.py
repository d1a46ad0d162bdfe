"""HF PEFT 0.21 reference cases for HRA, Householder reflection adaptation (Yuan et al. 2024,
arXiv:2405.17484): `__test__/fixtures/cases/{llama_hra, llama_hra_gs}`.

Run with torch 2.13 + transformers 5.18 + peft 0.21 (the venv of benches/README.md):

    python __test__/scripts/make_hra_fixtures.py

- `llama_hra`: HRAConfig(r=4, target_modules=['q_proj', 'v_proj', 'down_proj'], init_weights=False) on the
  tiny Llama of `__test__/fixtures/models/llama` (HF's defaults otherwise: no Gram-Schmidt). `hra_u`
  `[in, r]` starts kaiming-uniform (init_weights=False), so the reflections are far from the identity.
  Writes the adapter folder, `expected.safetensors` (inputs, labels, logits adapted / merged / unmerged /
  disabled / base, loss, `grad.<key>` of every `hra_u`, `greedy` ids) and `case.json` (counts, keys, the
  TS-side config JSON of a second option set, GPT-2's refusal, BERT's biases).
- `llama_hra_gs`: HRAConfig(r=3, apply_GS=True, target_modules=['k_proj', 'o_proj', 'gate_proj'],
  ) with the default init_weights=True and an odd r:
  HF warns that the symmetric initialization is impossible and draws kaiming-uniform values instead.
  Logits adapted / merged / unmerged / disabled, loss and gradients.
"""

import json
import os
import warnings

import fixture_common as fc

fc.start()  # PYTHONHASHSEED=0 (target_modules is a set in HF's config), in the fixtures root

import torch
from peft import HRAConfig, get_peft_model, get_peft_model_state_dict
from fixture_common import keys_of, load_tiny_llama as load


def write_case(out, info):
    info = {"name": os.path.basename(out), "generator": "make_hra_fixtures.py", **info, "versions": fc.versions()}
    readme = f"{out}/README.md"  # save_pretrained's model card: not a fixture
    if os.path.exists(readme):
        os.remove(readme)
    with open(f"{out}/case.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


def hra_grads(model):
    """`grad.<key>` of every `hra_u` under its on-disk key (`.default` removed)."""
    return {k: v for k, v in fc.adapter_grads(model).items() if "hra_u" in k}


def full_case(out, seed, kwargs, description, extra=None):
    torch.manual_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(load(), HRAConfig(**kwargs))
    notes = sorted({str(w.message) for w in caught if "HRA" in str(w.message) or "symmetric" in str(w.message)})
    trainable, total, ids, mask, labels = fc.save_adapter_and_batch(model, out, seed)
    adapted = fc.adapter_logits(model, ids, mask)
    disabled = fc.adapter_logits(model, ids, mask, disabled=True)
    base = fc.adapter_logits(load(), ids, mask)
    loss, grads = fc.loss_and_grads(model, ids, mask, labels, hra_grads)
    greedy = fc.greedy(model, ids[:1, :5])
    merged = fc.adapter_logits(model, ids, mask, merged=True)
    unmerged = fc.adapter_logits(model, ids, mask)
    fc.save_expected(out, {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "logits_adapter": adapted, "logits_merged": merged, "logits_unmerged": unmerged,
        "logits_disabled": disabled, "logits_base": base,
        "loss": loss, "greedy": greedy, **grads,
    })
    write_case(out, {
        "description": description,
        "base_model": "models/llama",
        "seed": seed,
        "config_kwargs": kwargs,
        "warnings": notes,
        "trainable_params": trainable,
        "all_params": total,
        "adapter_keys": keys_of(f"{out}/adapter_model.safetensors"),
        "merged_vs_adapter_max_abs": float((merged - adapted).abs().max()),
        "adapter_vs_base_max_abs": float((adapted - base).abs().max()),
        "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4, "loss_atol": 1e-5, "grad_rtol": 1e-4},
        **(extra or {}),
    })


def bert_bias():
    """HRA(r=4) on the tiny BERT's query/value (nn.Linear with biases) with bias="hra_only" / "all": the
    trainable count and the saved keys."""
    from transformers import AutoModel
    out = {}
    for bias in ["hra_only", "all"]:
        m = get_peft_model(AutoModel.from_pretrained("models/bert"), HRAConfig(r=4, target_modules=["query", "value"], bias=bias))
        sd = get_peft_model_state_dict(m)
        out[bias] = {"trainable_params": fc.param_counts(m)[0], "adapter_keys": sorted(sd)}
    return out


def extras():
    opts = HRAConfig(
        r=6, apply_GS=True, target_modules=["q_proj", "v_proj"], exclude_modules=["k_proj"], init_weights=False,
        layers_to_transform=[0], layers_pattern="layers", bias="hra_only", modules_to_save=["lm_head"],
        task_type="CAUSAL_LM",
    )
    opts_json = opts.to_dict()
    for k in ["target_modules", "exclude_modules"]:
        opts_json[k] = sorted(opts_json[k])
    try:
        from transformers import GPT2LMHeadModel
        get_peft_model(GPT2LMHeadModel.from_pretrained("models/gpt2").eval(), HRAConfig(target_modules=["c_attn"], r=4))
        gpt2_refusal = None
    except TypeError as e:
        gpt2_refusal = str(e)
    return {
        "options_config_kwargs": "HRAConfig(r=6, apply_GS=True, target_modules=['q_proj','v_proj'], exclude_modules=['k_proj'], init_weights=False, layers_to_transform=[0], layers_pattern='layers', bias='hra_only', modules_to_save=['lm_head'], task_type='CAUSAL_LM')",
        "options_to_dict": json.loads(json.dumps(opts_json, default=str)),
        "gpt2_refusal": gpt2_refusal,
        "bert_bias": bert_bias(),
    }


if __name__ == "__main__":
    full_case(
        "cases/llama_hra", 1900,
        dict(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False),
        "HRA r=4 on q_proj/v_proj/down_proj, a chain of 4 Householder reflections per layer (no Gram-Schmidt), init_weights=False (kaiming-uniform hra_u).",
        extras(),
    )
    full_case(
        "cases/llama_hra_gs", 1910,
        dict(task_type="CAUSAL_LM", r=3, apply_GS=True, target_modules=["k_proj", "o_proj", "gate_proj"]),
        "HRA r=3 with apply_GS=True (one reflection I - 2 Q Q^T of the Gram-Schmidt basis Q of hra_u) on k_proj/o_proj/gate_proj; init_weights=True with an odd r: HF warns and draws kaiming-uniform values.",
    )
    print("hra fixtures written")
