"""HF PEFT 0.21 reference cases for adaption prompt (LLaMA-Adapter, Zhang et al. 2023; issue 15):
`__test__/fixtures/cases/{llama_adaption_prompt, llama_adaption_prompt_multi, llama3_adaption_prompt}`.

Run with torch 2.13 + transformers 5.18 + peft 0.21 (the venv of benches/README.md):

    python __test__/scripts/make_adaption_prompt_fixtures.py

- `llama_adaption_prompt`: AdaptionPromptConfig(adapter_len=4, adapter_layers=1, task_type="CAUSAL_LM")
  on the tiny Llama of `__test__/fixtures/models/llama` (4 heads, 2 key/value heads: HF's
  `repeat_interleave` of the adapter keys/values). Only the top layer (`model.layers.1.self_attn`)
  is wrapped. HF starts the gate at zero (the adapter is then a no-op): after get_peft_model the
  gate is set to a seeded N(0.5, 0.2) value (the prompt keeps HF's seeded N(0, 1) init). Writes the
  adapter folder, `expected.safetensors` (inputs with a padded row, labels, logits adapter /
  disabled / base, loss, `grad.<key>` of adaption_prompt and adaption_gate, `greedy` ids with the
  KV cache and `greedy_nocache` without) and `case.json` (counts, keys, HF's messages).
- `llama_adaption_prompt_multi`: llama_adaption_prompt plus adapter `other` (adapter_len=3,
  adapter_layers=2: both layers), gates seeded; `other/` holds its folder; `logits_other` with
  `other` active, `logits_adapter` with `default` active again.
- `llama3_adaption_prompt`: adapter_len=5, adapter_layers=2 on the tiny Llama 3.x model (llama3
  RoPE scaling of the recomputed queries); logits, loss, gradients, greedy ids.
- `mistral_adaption_prompt`: adapter_len=3, adapter_layers=2 on `models/mistral`, a tiny
  MistralForCausalLM written here with the tiny Llama's weights (`model_type` "mistral", HF's other
  supported Llama-family type; no sliding window); logits, loss, gradients, greedy ids.
"""

import json
import os

import fixture_common as fc

fc.start()  # PYTHONHASHSEED=0, in the fixtures root

import torch
from peft import AdaptionPromptConfig, PeftModel, get_peft_model
from fixture_common import keys_of, load_tiny_llama as load


def load_llama3():
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained("models/llama3", attn_implementation="eager").eval()


def make_tiny_mistral():
    """`models/mistral`: MistralForCausalLM with the tiny Llama's config values and weights."""
    from transformers import MistralConfig, MistralForCausalLM
    llama = load()
    c = llama.config
    cfg = MistralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
                        rms_norm_eps=c.rms_norm_eps, rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    m = MistralForCausalLM(cfg)
    m.load_state_dict(llama.state_dict())
    m.save_pretrained("models/mistral")


def load_mistral():
    from transformers import MistralForCausalLM
    return MistralForCausalLM.from_pretrained("models/mistral", attn_implementation="eager").eval()


def write_case(out, info):
    info = {"name": os.path.basename(out), "generator": "make_adaption_prompt_fixtures.py", **info, "versions": fc.versions()}
    for readme in [f"{out}/README.md", f"{out}/other/README.md"]:
        if os.path.exists(readme):
            os.remove(readme)
    with open(f"{out}/case.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


def randomise_gates(model, seed):
    """Every adaption_gate of the model's active adapter (the cached ones are not parameters) := N(0.5, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("adaption_gate"):
                p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=g))


def grads_of(model):
    return {f"grad.{n}": p.grad.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def full_case(out, load_fn, base_path, seed, kwargs):
    torch.manual_seed(seed)
    model = get_peft_model(load_fn(), AdaptionPromptConfig(**kwargs))
    randomise_gates(model, seed + 2)
    trainable, total, ids, mask, labels = fc.save_adapter_and_batch(model, out, seed)
    adapted = fc.adapter_logits(model, ids, mask)
    disabled = fc.adapter_logits(model, ids, mask, disabled=True)
    base = fc.adapter_logits(load_fn(), ids, mask)
    model.train()
    loss, grads = fc.loss_and_grads(model, ids, mask, labels, grads_of)
    model.eval()
    greedy = fc.greedy(model, ids[:1, :5])
    greedy_nocache = fc.greedy(model, ids[:1, :5], use_cache=False)
    assert torch.equal(greedy, greedy_nocache), "HF cached and uncached greedy ids differ"
    # HF reloads its own folder to the same logits.
    again = fc.adapter_logits(PeftModel.from_pretrained(load_fn(), out).eval(), ids, mask)
    assert (again - adapted).abs().max() < 1e-6
    fc.save_expected(out, {
        "input_ids": ids, "attention_mask": mask, "labels": labels, "logits_adapter": adapted,
        "logits_disabled": disabled, "logits_base": base, "loss": loss, "greedy": greedy,
        "greedy_nocache": greedy_nocache, **grads,
    })
    return model, ids, mask, {
        "base_model": base_path,
        "seed": seed,
        "config_kwargs": kwargs,
        "trainable_params": trainable,
        "all_params": total,
        "adapter_keys": keys_of(f"{out}/adapter_model.safetensors"),
        "adapter_vs_base_max_abs": float((adapted - base).abs().max()),
        "disabled_vs_base_max_abs": float((disabled - base).abs().max()),
        "tolerances": {"logits_atol": 1e-5, "logits_rtol": 1e-4, "loss_atol": 1e-5, "grad_rtol": 1e-4},
    }


def messages():
    """HF's errors for the refusals the tests check."""
    msgs = {}
    try:
        get_peft_model(load(), AdaptionPromptConfig(adapter_len=2, adapter_layers=3))
    except ValueError as e:
        msgs["too_many_layers"] = str(e)
    from transformers import AutoModelForCausalLM
    try:
        get_peft_model(AutoModelForCausalLM.from_pretrained("models/qwen3"), AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    except ValueError as e:
        msgs["unsupported_qwen3"] = str(e)
    m = get_peft_model(load(), AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    try:
        m.merge_and_unload()
    except AttributeError as e:
        msgs["merge_and_unload"] = str(e)
    try:
        m.get_layer_status()
    except TypeError as e:
        msgs["layer_status"] = str(e)
    # The TS toJSON reference: a config with every field set, as HF writes it.
    c = AdaptionPromptConfig(adapter_len=7, adapter_layers=2, task_type="CAUSAL_LM", target_modules="self_attn",
                             base_model_name_or_path="some/base", revision="main", inference_mode=False)
    msgs["options_to_dict"] = json.loads(json.dumps(c.to_dict(), default=str))
    return msgs


def main():
    out = "cases/llama_adaption_prompt"
    kwargs = dict(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=1)
    model, ids, mask, info = full_case(out, load, "models/llama", 1800, kwargs)
    write_case(out, {
        "description": "Adaption prompt adapter_len=4, adapter_layers=1 (model.layers.1.self_attn wrapped) on the tiny GQA Llama; prompt HF-initialised N(0,1) under torch.manual_seed(1800), gate := N(0.5, 0.2).",
        **info,
        "messages": messages(),
    })

    out2 = "cases/llama_adaption_prompt_multi"
    os.makedirs(out2, exist_ok=True)
    torch.manual_seed(1803)
    model.add_adapter("other", AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=2))
    model.set_adapter("other")
    randomise_gates(model, 1804)
    model.set_adapter("default")
    model.save_pretrained(out2)
    model.eval()
    with torch.no_grad():
        adapted_d = model(input_ids=ids, attention_mask=mask).logits
        model.set_adapter("other")
        trainable_o, total_o = fc.param_counts(model)
        adapted_o = model(input_ids=ids, attention_mask=mask).logits
        model.set_adapter("default")
    fc.save_expected(out2, {"input_ids": ids, "attention_mask": mask, "logits_adapter": adapted_d, "logits_other": adapted_o})
    write_case(out2, {
        "description": "llama_adaption_prompt + adapter `other` (adapter_len=3, adapter_layers=2, gates := N(0.5, 0.2) seeded 1804); logits_other with `other` active.",
        "base_model": "models/llama",
        "trainable_params_other_active": trainable_o,
        "all_params_other_active": total_o,
        "adapter_keys": keys_of(f"{out2}/adapter_model.safetensors"),
        "other_keys": keys_of(f"{out2}/other/adapter_model.safetensors"),
    })

    out3 = "cases/llama3_adaption_prompt"
    kwargs3 = dict(task_type="CAUSAL_LM", adapter_len=5, adapter_layers=2)
    _, _, _, info3 = full_case(out3, load_llama3, "models/llama3", 1810, kwargs3)
    write_case(out3, {"description": "Adaption prompt adapter_len=5, adapter_layers=2 on the tiny Llama 3.x model (llama3 RoPE scaling); gates := N(0.5, 0.2).", **info3})

    make_tiny_mistral()
    out4 = "cases/mistral_adaption_prompt"
    kwargs4 = dict(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=2)
    _, _, _, info4 = full_case(out4, load_mistral, "models/mistral", 1820, kwargs4)
    write_case(out4, {"description": "Adaption prompt adapter_len=3, adapter_layers=2 on models/mistral (MistralForCausalLM with the tiny Llama's weights); gates := N(0.5, 0.2).", **info4})


if __name__ == "__main__":
    main()
    print("adaption prompt fixtures written")
