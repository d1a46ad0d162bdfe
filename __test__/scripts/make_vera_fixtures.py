"""HF PEFT 0.21 reference cases for VeRA (issue 15): `__test__/fixtures/cases/{llama_vera,
llama_vera_noproj, llama_vera_multi, gpt2_vera}`.

Run with torch 2.13 + transformers 5.18 + peft 0.21 (the venv of benches/README.md):

    python __test__/scripts/make_vera_fixtures.py

- `llama_vera`: VeraConfig(r=4, target_modules=['q_proj', 'v_proj', 'down_proj'],
  projection_prng_key=7, init_weights=False) on the tiny Llama of `__test__/fixtures/models/llama`.
  The targets have different shapes (q 64x64, v 32x64, down 64x128), so the shared projections
  (vera_A [4, 128], vera_B [64, 4]) are sliced per layer. After get_peft_model every lambda_b is
  set to N(1, 0.5) (HF starts it at ones with init_weights=False), so each output row is weighted
  differently. Writes the adapter folder (projections saved: `base_model.vera_A` /
  `base_model.vera_B`), `expected.safetensors` (inputs, labels, logits adapted / merged /
  unmerged / disabled / base, loss, `grad.<key>` of every lambda, `greedy` ids) and `case.json`
  (counts, keys, the TS-side config JSON of a second option set).
- `llama_vera_noproj`: the same adapter saved with save_projection=False (no projections in the
  file: they are regenerated from projection_prng_key with torch's generator); `logits_adapter`.
- `llama_vera_multi`: `llama_vera` plus a second adapter `other` (r=4 on k_proj/o_proj, smaller
  shapes than the first adapter's projections, which it shares as HF does; HF 0.21 accepts a lower
  r at injection but its forward then fails, so the ranks are equal); `other/` holds its folder;
  `logits_other` with `other` active.
- `gpt2_vera`: VeraConfig(r=4, target_modules=['c_attn', 'c_proj'], init_weights=False) on the
  tiny GPT-2 (Conv1D layers: HF sets fan_in_fan_out=True); logits adapted / merged / disabled.
- `gpt2_vera_bias_all`, `gpt2_vera_bias_only`: bias="all" / "vera_only" on c_attn (biases trained
  and saved with the adapter).
"""

import json
import os

import fixture_common as fc

fc.start()  # PYTHONHASHSEED=0 (target_modules is a set in HF's config), in the fixtures root

import torch
from peft import PeftModel, VeraConfig, get_peft_model
from safetensors import safe_open
from fixture_common import keys_of, load_tiny_llama as load


def write_case(out, info):
    """`<out>/case.json`: the case's facts, flat (as the LoHa / LoKr cases)."""
    info = {"name": os.path.basename(out), "generator": "make_vera_fixtures.py", **info, "versions": fc.versions()}
    for readme in [f"{out}/README.md", f"{out}/other/README.md"]:
        if os.path.exists(readme):
            os.remove(readme)
    with open(f"{out}/case.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


def load_gpt2():
    """The tiny GPT-2 of `models/gpt2` (eager attention, eval mode)."""
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained("models/gpt2", attn_implementation="eager").eval()


def randomise_lambda_b(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "vera_lambda_b" in n:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))


def llama_cases():
    seed = 1700
    torch.manual_seed(seed)
    kwargs = dict(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj", "down_proj"], projection_prng_key=7, init_weights=False)
    model = get_peft_model(load(), VeraConfig(**kwargs))
    randomise_lambda_b(model, seed + 2)
    out = "cases/llama_vera"
    trainable, total, ids, mask, labels = fc.save_adapter_and_batch(model, out, seed)
    adapted = fc.adapter_logits(model, ids, mask)
    disabled = fc.adapter_logits(model, ids, mask, disabled=True)
    base = fc.adapter_logits(load(), ids, mask)
    loss, grads = fc.loss_and_grads(model, ids, mask, labels)
    greedy = fc.greedy(model, ids[:1, :5])
    merged = fc.adapter_logits(model, ids, mask, merged=True)
    unmerged = fc.adapter_logits(model, ids, mask)
    fc.save_expected(out, {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "logits_adapter": adapted, "logits_merged": merged, "logits_unmerged": unmerged,
        "logits_disabled": disabled, "logits_base": base,
        "loss": loss, "greedy": greedy, **grads,
    })
    # A second option set for the TS VeraConfig.toJSON test (not saved as an adapter).
    opts = VeraConfig(
        r=16, target_modules=["q_proj", "v_proj"], projection_prng_key=3, save_projection=False, vera_dropout=0.1,
        d_initial=0.5, fan_in_fan_out=True, bias="vera_only", layers_to_transform=[0], layers_pattern="layers",
        modules_to_save=["lm_head"], task_type="CAUSAL_LM",
    )
    opts_json = opts.to_dict()
    opts_json["target_modules"] = sorted(opts_json["target_modules"])
    with safe_open(f"{out}/adapter_model.safetensors", "pt") as f:
        vera_a = f.get_tensor("base_model.vera_A")
    write_case(out, {
        "description": "VeRA r=4 on q_proj/v_proj/down_proj (shapes 64x64, 32x64, 64x128: projections sliced), projection_prng_key=7, init_weights=False, lambda_b = N(1, 0.5).",
        "base_model": "models/llama",
        "seed": seed,
        "config_kwargs": kwargs,
        "trainable_params": trainable,
        "all_params": total,
        "adapter_keys": keys_of(f"{out}/adapter_model.safetensors"),
        "projection_shapes": {"vera_A": [4, 128], "vera_B": [64, 4]},
        "vera_A_first": [float(x) for x in vera_a.flatten()[:4]],
        "merged_vs_adapter_max_abs": float((merged - adapted).abs().max()),
        "adapter_vs_base_max_abs": float((adapted - base).abs().max()),
        "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4, "loss_atol": 1e-5, "grad_rtol": 1e-4},
        "options_config_kwargs": "VeraConfig(r=16, target_modules=['q_proj','v_proj'], projection_prng_key=3, save_projection=False, vera_dropout=0.1, d_initial=0.5, fan_in_fan_out=True, bias='vera_only', layers_to_transform=[0], layers_pattern='layers', modules_to_save=['lm_head'], task_type='CAUSAL_LM')",
        "options_to_dict": json.loads(json.dumps(opts_json, default=str)),
    })

    # The same adapter without projections in its file.
    out2 = "cases/llama_vera_noproj"
    os.makedirs(out2, exist_ok=True)
    model.peft_config["default"].save_projection = False
    model.base_model.vera_A._persistent = False  # HF builds the BufferDict with persistent=save_projection
    model.base_model.vera_B._persistent = False
    model.save_pretrained(out2)
    model.peft_config["default"].save_projection = True
    model.base_model.vera_A._persistent = True
    model.base_model.vera_B._persistent = True
    # Check that HF itself reloads it (from the PRNG key) to the same logits.
    again_logits = fc.adapter_logits(PeftModel.from_pretrained(load(), out2).eval(), ids, mask)
    assert (again_logits - adapted).abs().max() < 1e-5, "HF reload without projections differs"
    fc.save_expected(out2, {"input_ids": ids, "attention_mask": mask, "logits_adapter": adapted})
    write_case(out2, {
        "description": "llama_vera saved with save_projection=False (projections regenerated from projection_prng_key=7 on load).",
        "base_model": "models/llama",
        "adapter_keys": keys_of(f"{out2}/adapter_model.safetensors"),
    })

    # A second adapter sharing the first one's projections (lower rank, other shapes).
    out3 = "cases/llama_vera_multi"
    os.makedirs(out3, exist_ok=True)
    model.add_adapter("other", VeraConfig(task_type="CAUSAL_LM", r=4, target_modules=["k_proj", "o_proj"], projection_prng_key=7, init_weights=False))
    randomise_lambda_b(model, seed + 3)  # both adapters' lambda_b redrawn
    model.save_pretrained(out3)
    trainable_m, total_m = fc.param_counts(model)
    model.eval()
    with torch.no_grad():
        model.set_adapter("default")
        adapted_d = model(input_ids=ids, attention_mask=mask).logits
        model.set_adapter("other")
        adapted_o = model(input_ids=ids, attention_mask=mask).logits
    fc.save_expected(out3, {"input_ids": ids, "attention_mask": mask, "logits_adapter": adapted_d, "logits_other": adapted_o})
    write_case(out3, {
        "description": "llama_vera (lambda_b redrawn) + adapter `other` (VeRA r=4 on k_proj/o_proj, sharing the first adapter's projections); logits_other with `other` active.",
        "base_model": "models/llama",
        "trainable_params_other_active": trainable_m,
        "all_params": total_m,
        "adapter_keys": keys_of(f"{out3}/adapter_model.safetensors"),
        "other_keys": keys_of(f"{out3}/other/adapter_model.safetensors"),
    })


def gpt2_case():
    seed = 1710
    torch.manual_seed(seed)
    kwargs = dict(task_type="CAUSAL_LM", r=4, target_modules=["c_attn", "c_proj"], init_weights=False)
    model = get_peft_model(load_gpt2(), VeraConfig(**kwargs))
    randomise_lambda_b(model, seed + 2)
    out = "cases/gpt2_vera"
    trainable, total, ids, mask, labels = fc.save_adapter_and_batch(model, out, seed)
    adapted = fc.adapter_logits(model, ids, mask)
    disabled = fc.adapter_logits(model, ids, mask, disabled=True)
    merged = fc.adapter_logits(model, ids, mask, merged=True)
    loss, grads = fc.loss_and_grads(model, ids, mask, labels)  # after the merge / unmerge round trip, as before
    fc.save_expected(out, {
        "input_ids": ids, "attention_mask": mask, "labels": labels, "logits_adapter": adapted,
        "logits_merged": merged, "logits_disabled": disabled, "loss": loss, **grads,
    })
    write_case(out, {
        "description": "VeRA r=4 on GPT-2's c_attn (Conv1D 64->192) and c_proj (attention 64->64, MLP 256->64), init_weights=False, lambda_b = N(1, 0.5); HF sets fan_in_fan_out=True for Conv1D.",
        "base_model": "models/gpt2",
        "seed": seed,
        "config_kwargs": kwargs,
        "trainable_params": trainable,
        "all_params": total,
        "adapter_keys": keys_of(f"{out}/adapter_model.safetensors"),
        "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4, "loss_atol": 1e-5, "grad_rtol": 1e-4},
    })


def gpt2_bias_cases():
    """`gpt2_vera_bias_all` / `gpt2_vera_bias_only`: bias="all" / "vera_only" on c_attn; the biases
    are trained and saved with the adapter (before saving, every trainable bias gets + 0.01 so the
    file differs from the base)."""
    for bias, seed in [("all", 1720), ("vera_only", 1730)]:
        torch.manual_seed(seed)
        kwargs = dict(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"], init_weights=False, bias=bias)
        model = get_peft_model(load_gpt2(), VeraConfig(**kwargs))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and n.endswith(".bias"):
                    p.add_(0.01)
        out = f"cases/gpt2_vera_bias_{'all' if bias == 'all' else 'only'}"
        trainable, total, ids, mask, labels = fc.save_adapter_and_batch(model, out, seed)
        adapted = fc.adapter_logits(model, ids, mask)
        # The lambdas' gradients only (the trained biases have theirs too).
        loss, grads = fc.loss_and_grads(model, ids, mask, labels, lambda m: {
            k: v for k, v in fc.adapter_grads(m).items() if "vera_lambda" in k})
        fc.save_expected(out, {"input_ids": ids, "attention_mask": mask, "labels": labels, "logits_adapter": adapted,
                               "loss": loss, **grads})
        write_case(out, {
            "description": f"VeRA r=4 on GPT-2 c_attn with bias={bias!r} (trainable biases + 0.01 before saving).",
            "base_model": "models/gpt2",
            "seed": seed,
            "config_kwargs": kwargs,
            "trainable_params": trainable,
            "all_params": total,
            "trainable_names": sorted(n for n, p in model.named_parameters() if p.requires_grad),
            "adapter_keys": keys_of(f"{out}/adapter_model.safetensors"),
            "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4, "loss_atol": 1e-5, "grad_rtol": 1e-4},
        })


if __name__ == "__main__":
    llama_cases()
    gpt2_case()
    gpt2_bias_cases()
    print("vera fixtures written")
