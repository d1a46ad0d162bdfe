"""HF PEFT 0.21 reference cases for trainable tokens (issue 15): `__test__/fixtures/cases/{llama_tt,
gpt2_tt, llama_lora_tt, gpt2_lora_tt}`.

Run with torch 2.13 + transformers 5.18 + peft 0.21 (the venv of benches/README.md):

    python __test__/scripts/make_trainable_tokens_fixtures.py

- `llama_tt`: TrainableTokensConfig(token_indices=[...]) on the tiny Llama of
  `__test__/fixtures/models/llama` (untied `lm_head`). HF resolves `target_modules` to the input
  embedding's name (`model.embed_tokens`) and writes it. After get_peft_model each trainable row
  gets + N(0, 0.5) so the adapter changes the output. Writes the adapter folder (one key,
  `...embed_tokens.trainable_tokens_delta` `[k, dim]`), `expected.safetensors` (inputs, labels,
  logits adapted / merged / unmerged / disabled / base, loss, `grad.<key>`, `greedy` ids) and
  `case.json` (counts, keys, the options' to_dict for the TS toJSON test).
- `gpt2_tt`: the same on the tiny GPT-2, whose `lm_head` is tied to `transformer.wte`: HF puts a
  tied layer on `lm_head` (the logits of the trainable tokens use the new rows too) and saves the
  delta twice (`transformer.wte.trainable_tokens_delta` and `lm_head.trainable_tokens_delta`).
- `llama_lora_tt`: LoraConfig(r=4 on q_proj/v_proj, init_lora_weights=False,
  trainable_token_indices=[...]) (list form: the input embedding is wrapped; key
  `...embed_tokens.token_adapter.trainable_tokens_delta`); `logits_mixed` for a mixed batch
  (adapter_names ["default", "__base__"], HF's AuxiliaryTrainingWrapper routes the rows).
- `gpt2_lora_tt`: the dict form `trainable_token_indices={"wte": [...]}` on GPT-2 (c_attn LoRA);
  the tied `lm_head` follows `wte` but is not saved.
"""

import json
import os

import fixture_common as fc

fc.start()  # PYTHONHASHSEED=0 (target_modules is a set in HF's config), in the fixtures root

import torch
from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model
from fixture_common import keys_of, load_tiny_llama


def load_gpt2():
    """The tiny GPT-2 of `models/gpt2` (eager attention, eval mode)."""
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained("models/gpt2", attn_implementation="eager").eval()


def write_case(out, info):
    """`<out>/case.json`: the case's facts, flat (as the VeRA cases)."""
    info = {"name": os.path.basename(out), "generator": "make_trainable_tokens_fixtures.py", **info, "versions": fc.versions()}
    if os.path.exists(f"{out}/README.md"):
        os.remove(f"{out}/README.md")
    with open(f"{out}/case.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


def perturb_deltas(model, seed):
    """Every `trainable_tokens_delta` row gets + N(0, 0.5) (HF starts them equal to the embedding rows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def token_indices_for(ids):
    """Four ids of the batch's first row (so the batch uses the trainable rows) and one id that is not in it."""
    row = [int(x) for x in ids[0]]
    chosen = list(dict.fromkeys(row))[:4]
    extra = next(i for i in range(5, 100) if i not in set(int(x) for x in ids.flatten()))
    return chosen[:2] + [extra] + chosen[2:]


def run_case(out, load, make_cfg, seed, description, mixed=False):
    torch.manual_seed(seed)
    vocab = load().config.vocab_size
    ids, mask, labels, _ = fc.lycoris_batch(seed, vocab)
    indices = token_indices_for(ids)
    cfg, kwargs = make_cfg(indices)
    model = get_peft_model(load(), cfg)
    perturb_deltas(model, seed + 2)
    trainable, total, ids2, mask2, labels2 = fc.save_adapter_and_batch(model, out, seed)
    assert torch.equal(ids, ids2)
    adapted = fc.adapter_logits(model, ids, mask)
    disabled = fc.adapter_logits(model, ids, mask, disabled=True)
    base = fc.adapter_logits(load(), ids, mask)
    loss, grads = fc.loss_and_grads(model, ids, mask, labels)
    greedy = fc.greedy(model, ids[:1, :5])
    merged = fc.adapter_logits(model, ids, mask, merged=True)
    unmerged = fc.adapter_logits(model, ids, mask)
    tensors = {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "logits_adapter": adapted, "logits_merged": merged, "logits_unmerged": unmerged,
        "logits_disabled": disabled, "logits_base": base, "loss": loss, "greedy": greedy, **grads,
    }
    if mixed:
        with torch.no_grad():
            tensors["logits_mixed"] = model(input_ids=ids, attention_mask=mask, adapter_names=["default", "__base__"]).logits
    # HF reloads its own file to the same logits.
    again = PeftModel.from_pretrained(load(), out).eval()
    assert (fc.adapter_logits(again, ids, mask) - adapted).abs().max() < 1e-6
    fc.save_expected(out, tensors)
    write_case(out, {
        "description": description,
        "base_model": "models/" + ("gpt2" if load is load_gpt2 else "llama"),
        "seed": seed,
        "config_kwargs": kwargs,
        "token_indices": indices,
        "trainable_params": trainable,
        "all_params": total,
        "adapter_keys": keys_of(f"{out}/adapter_model.safetensors"),
        "grad_keys": sorted(grads),
        "adapter_vs_base_max_abs": float((adapted - base).abs().max()),
        "merged_vs_adapter_max_abs": float((merged - adapted).abs().max()),
        "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4, "loss_atol": 1e-5, "grad_rtol": 1e-4},
    })


def standalone(indices):
    kwargs = dict(token_indices=indices)
    return TrainableTokensConfig(**kwargs), kwargs


def lora_list(indices):
    kwargs = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                  trainable_token_indices=indices)
    return LoraConfig(**kwargs), kwargs


def lora_dict(indices):
    kwargs = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False,
                  trainable_token_indices={"wte": indices})
    return LoraConfig(**kwargs), kwargs


def options_json():
    """A second option set for the TS TrainableTokensConfig.toJSON test (not saved as an adapter)."""
    opts = TrainableTokensConfig(token_indices=[3, 1, 4], target_modules=["embed_tokens"], init_weights=False,
                                 task_type="CAUSAL_LM", inference_mode=True)
    d = opts.to_dict()
    d["target_modules"] = sorted(d["target_modules"])
    return json.loads(json.dumps(d, default=str))


if __name__ == "__main__":
    run_case("cases/llama_tt", load_tiny_llama, standalone, 1800,
             "TrainableTokensConfig on the tiny Llama (target_modules resolved to model.embed_tokens); delta rows + N(0, 0.5).")
    with open("cases/llama_tt/case.json") as f:
        info = json.load(f)
    info["options_to_dict"] = options_json()
    with open("cases/llama_tt/case.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    run_case("cases/gpt2_tt", load_gpt2, standalone, 1810,
             "TrainableTokensConfig on the tiny GPT-2 (lm_head tied to transformer.wte: a tied layer on lm_head, the delta saved under both keys); delta rows + N(0, 0.5).")
    run_case("cases/llama_lora_tt", load_tiny_llama, lora_list, 1820,
             "LoRA r=4 on q_proj/v_proj (init_lora_weights=False) with trainable_token_indices (list form: the input embedding); delta rows + N(0, 0.5); logits_mixed for adapter_names ['default', '__base__'].",
             mixed=True)
    run_case("cases/gpt2_lora_tt", load_gpt2, lora_dict, 1830,
             "LoRA r=4 on GPT-2 c_attn (init_lora_weights=False) with trainable_token_indices={'wte': [...]} (dict form; the tied lm_head follows wte, not saved); delta rows + N(0, 0.5); logits_mixed.",
             mixed=True)
    print("trainable tokens fixtures written")
