"""HF PEFT 0.21 reference cases for AdaLoRA (issue 15): `__test__/fixtures/cases/{llama_adalora_init,
llama_adalora, gpt2_adalora}`.

Run with torch 2.13 + transformers 5.18 + peft 0.21 (the venv of benches/README.md):

    python __test__/scripts/make_adalora_fixtures.py

- `llama_adalora_init`: AdaLoraConfig(init_r=6, target_r=3, lora_alpha=16, target_modules=['q_proj', 'v_proj',
  'down_proj'], tinit=2, tfinal=3, deltaT=2, total_step=10, beta1=0.85, beta2=0.85, orth_reg_weight=0.5) on the
  tiny Llama, HF's init (A, B ~ N(0, 0.02), E = 0), then `lora_E` set to N(0, 0.5) (so the adapter changes the
  logits) and saved. `expected.safetensors` holds the batch and, for each of the 10 steps of a plain loop
  (`loss = model(...).loss` with the orthogonal regularisation, `loss.backward()`, `SGD(lr=0.5).step()`,
  `model.base_model.update_and_allocate(step)`, `zero_grad()`; step 0-based as in HF's AdaLoRA examples), the loss
  (`loss.<k>`) and every AdaLoRA weight afterwards (`step<k>.<key>`); `case.json` the rank pattern after each step
  (`null` while HF keeps none) and HF's refusal messages.
- `llama_adalora`: that model saved after the 10 steps (`rank_pattern` in adapter_config.json, the masked triplets
  dropped from the file), reloaded by HF: adapter / merged / disabled logits, the loss (with the orthogonal
  regularisation, on the reloaded trainable model whose layers have the pruned ranks) and its gradients, greedy ids.
- `gpt2_adalora`: AdaLoRA (init_r=4) on GPT-2's `c_attn` (`Conv1D`, fan_in_fan_out), `lora_E` N(0, 0.5):
  adapter / merged / disabled logits, loss and gradients.
"""

import json
import os

import fixture_common as fc

fc.start()  # PYTHONHASHSEED=0 (target_modules is a set in HF's config), in the fixtures root

import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from fixture_common import keys_of, load_tiny_llama as load


def write_case(out, info):
    info = {"name": os.path.basename(out), "generator": "make_adalora_fixtures.py", **info, "versions": fc.versions()}
    readme = f"{out}/README.md"
    if os.path.exists(readme):
        os.remove(readme)
    with open(f"{out}/case.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


def randomize_e(model, std=0.5):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p.normal_(0.0, std)


def weights(model, prefix):
    """`<prefix>.<key>` of every AdaLoRA parameter under its on-disk key (`.default` removed)."""
    return {f"{prefix}.{n.replace('.default', '')}": p.detach().clone().contiguous()
            for n, p in model.named_parameters() if "lora_" in n}


def grads(model):
    return {k: v for k, v in fc.adapter_grads(model).items() if "lora_" in k}


def refusals():
    out = {}
    for name, kw in {
        "total_step_missing": dict(target_modules=["q_proj"]),
        "no_budgeting_phase": dict(target_modules=["q_proj"], total_step=10, tinit=5, tfinal=5),
        "use_dora": dict(target_modules=["q_proj"], total_step=10, use_dora=True),
        "orth_reg_weight": dict(target_modules=["q_proj"], total_step=10, orth_reg_weight=-1.0),
    }.items():
        try:
            AdaLoraConfig(**kw)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    m = get_peft_model(load(), AdaLoraConfig(target_modules=["q_proj"], total_step=10))
    try:
        m.add_adapter("second", AdaLoraConfig(target_modules=["q_proj"], total_step=10))
        out["two_trainable"] = None
    except ValueError as e:
        out["two_trainable"] = str(e)
    return out


def llama():
    seed = 2100
    torch.manual_seed(seed)
    kwargs = dict(task_type="CAUSAL_LM", init_r=6, target_r=3, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                  tinit=2, tfinal=3, deltaT=2, total_step=10)
    model = get_peft_model(load(), AdaLoraConfig(**kwargs))
    randomize_e(model)
    out0 = "cases/llama_adalora_init"
    trainable0, total0, ids, mask, labels = fc.save_adapter_and_batch(model, out0, seed)
    init_logits = fc.adapter_logits(model, ids, mask)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    tensors = {"input_ids": ids, "attention_mask": mask, "labels": labels, "logits_adapter": init_logits}
    patterns = []
    for step in range(10):
        res = model(input_ids=ids, attention_mask=mask, labels=labels)
        res.loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
        tensors[f"loss.{step}"] = res.loss.detach().reshape(1).float()
        tensors.update(weights(model, f"step{step}"))
        rp = model.peft_config["default"].rank_pattern
        patterns.append(None if rp is None else {k.replace(".default", ""): v for k, v in rp.items()})
    fc.save_expected(out0, tensors)
    opts = AdaLoraConfig(init_r=10, target_r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                         tinit=5, tfinal=7, deltaT=3, beta1=0.8, beta2=0.9, orth_reg_weight=0.2, total_step=100,
                         bias="lora_only", modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    opts_json = opts.to_dict()
    opts_json["target_modules"] = sorted(opts_json["target_modules"])
    write_case(out0, {
        "description": "AdaLoRA init_r=6 target_r=3 lora_alpha=16 on q_proj/v_proj/down_proj, tinit=2 tfinal=3 deltaT=2 total_step=10; lora_E ~ N(0, 0.5); 10 SGD(lr=0.5) steps with update_and_allocate(step) after each.",
        "base_model": "models/llama",
        "seed": seed,
        "config_kwargs": kwargs,
        "trainable_params": trainable0,
        "all_params": total0,
        "adapter_keys": keys_of(f"{out0}/adapter_model.safetensors"),
        "sgd_lr": 0.5,
        "rank_patterns": patterns,
        "options_to_dict": json.loads(json.dumps(opts_json, default=str)),
        "refusals": refusals(),
        "tolerances": {"weight_atol": 1e-5, "loss_atol": 1e-5},
    })

    out = "cases/llama_adalora"
    model.save_pretrained(out)
    inf = PeftModel.from_pretrained(load(), out).eval()
    adapted = fc.adapter_logits(inf, ids, mask)
    disabled = fc.adapter_logits(inf, ids, mask, disabled=True)
    merged = fc.adapter_logits(inf, ids, mask, merged=True)
    greedy = fc.greedy(inf, ids[:1, :5])
    tr = PeftModel.from_pretrained(load(), out, is_trainable=True).eval()
    loss, g = fc.loss_and_grads(tr, ids, mask, labels, grads)
    fc.save_expected(out, {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "logits_adapter": adapted, "logits_merged": merged, "logits_disabled": disabled,
        "loss": loss, "greedy": greedy, **g,
    })
    write_case(out, {
        "description": "llama_adalora_init after its 10 steps, saved by HF (rank_pattern in the config, pruned triplets dropped), reloaded by HF for the logits, loss (with orth reg) and grads.",
        "base_model": "models/llama",
        "trainable_params": fc.param_counts(tr)[0],
        "all_params": fc.param_counts(tr)[1],
        "adapter_keys": keys_of(f"{out}/adapter_model.safetensors"),
        "ranks": {k: sum(v) for k, v in patterns[-1].items()},
        "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4, "loss_atol": 1e-5, "grad_rtol": 1e-4},
    })


def gpt2():
    from transformers import GPT2LMHeadModel
    seed = 2200
    torch.manual_seed(seed)
    kwargs = dict(task_type="CAUSAL_LM", init_r=4, target_r=2, target_modules=["c_attn"], total_step=10)
    model = get_peft_model(GPT2LMHeadModel.from_pretrained("models/gpt2").eval(), AdaLoraConfig(**kwargs))
    randomize_e(model)
    out = "cases/gpt2_adalora"
    trainable, total, ids, mask, labels = fc.save_adapter_and_batch(model, out, seed)
    adapted = fc.adapter_logits(model, ids, mask)
    disabled = fc.adapter_logits(model, ids, mask, disabled=True)
    loss, g = fc.loss_and_grads(model, ids, mask, labels, grads)
    merged = fc.adapter_logits(model, ids, mask, merged=True)
    fc.save_expected(out, {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "logits_adapter": adapted, "logits_merged": merged, "logits_disabled": disabled,
        "loss": loss, **g,
    })
    write_case(out, {
        "description": "AdaLoRA init_r=4 on GPT-2 c_attn (Conv1D: HF sets fan_in_fan_out), lora_E ~ N(0, 0.5).",
        "base_model": "models/gpt2",
        "seed": seed,
        "config_kwargs": kwargs,
        "trainable_params": trainable,
        "all_params": total,
        "adapter_keys": keys_of(f"{out}/adapter_model.safetensors"),
        "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4, "loss_atol": 1e-5, "grad_rtol": 1e-4},
    })


if __name__ == "__main__":
    llama()
    gpt2()
    print("adalora fixtures written")
