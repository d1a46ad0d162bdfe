"""HF PEFT 0.21 reference fixtures for the newer Llama-like families of issue 18:

* `models/llama3`  : LlamaForCausalLM with Llama 3.x RoPE scaling (`rope_type: "llama3"`),
  and `models/llama3.gguf` (arch `llama`, q/k rows permuted as convert_hf_to_gguf.py does, and
  the precomputed `rope_freqs.weight` factors llama.cpp stores for llama3 scaling);
* `models/qwen3`   : Qwen3ForCausalLM (per-head q/k RMSNorm, explicit head_dim 32 != 64/4,
  tied embeddings), and `models/qwen3.gguf` (arch `qwen3`, no q/k permutation, attn_q_norm /
  attn_k_norm);
* cases `llama3_lora_qv`, `qwen3_lora_qv` (LoRA r=8 alpha=16 on q_proj/v_proj,
  init_lora_weights=False): base / adapter / disabled / merged logits, loss, lora gradients,
  greedy ids (base, adapter, merged); `qwen3_prefix`, `llama3_prefix` (prefix tuning, 5
  virtual tokens): adapter logits and greedy ids.

Everything is fp32, tiny (hidden 64, 2 layers, vocab 256), random-init with fixed seeds, no
downloads. Run with torch 2.13 + transformers 5.18 + peft 0.21 + gguf from PyPI:

    /work/venv-hf/bin/python __test__/scripts/make_family_fixtures.py
"""

import json

import fixture_common as fc

fc.start()  # PYTHONHASHSEED=0, in the fixtures root

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM


COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, hidden_act="silu", pad_token_id=0, bos_token_id=1,
              eos_token_id=2, attention_dropout=0.0, initializer_range=0.1)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
MODELS = {
    "llama3": (LlamaForCausalLM, LlamaConfig(**COMMON, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                             rope_parameters=dict(LLAMA3_ROPE)), 21),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**COMMON, head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                            attention_bias=False, use_sliding_window=False,
                                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), 22),
}
S = 12  # sequence length: long enough for the llama3-scaled low frequencies to matter


def load(name):
    cls = MODELS[name][0]
    return cls.from_pretrained(f"models/{name}", attn_implementation="eager").eval()


def make_model(name):
    cls, cfg, seed = MODELS[name]
    torch.manual_seed(seed)
    m = cls(cfg).eval()
    with torch.no_grad():  # random (not unit) norm weights, so the norms are really tested
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape))
    m.save_pretrained(f"models/{name}")


def inputs(seed, vocab=256, b=2, s=S):
    return fc.padded_inputs(seed, vocab, 3, b, s)


# --- GGUF: fixture_common.write_decoder_gguf (arch `llama` / `qwen3`) ---------------------------

def write_gguf(name):
    fc.write_decoder_gguf(name, "qwen3" if name == "qwen3" else "llama")


# --- cases --------------------------------------------------------------------------------------

def lora_case(name, base, seed):
    return fc.lora_case(name, lambda: load(base), inputs, seed, ["q_proj", "v_proj"])


def prefix_case(name, base, seed):
    return fc.prefix_case(name, lambda: load(base), inputs, seed, 5)


def main():
    obs = {}
    for name in MODELS:
        make_model(name)
        write_gguf(name)
    # How much llama3 scaling changes the logits (the test would not notice a missing scaling otherwise).
    ids, mask = inputs(201)
    m = load("llama3")
    with torch.no_grad():
        scaled = m(input_ids=ids, attention_mask=mask).logits
        cfg = json.load(open("models/llama3/config.json"))
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
        plain = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "dtype")}))
        plain.load_state_dict(m.state_dict())
        plain.eval()
        unscaled = plain(input_ids=ids, attention_mask=mask).logits
    obs["llama3_scaled_vs_unscaled_max_abs"] = float((scaled - unscaled).abs().max())
    obs["llama3_lora_qv"] = lora_case("llama3_lora_qv", "llama3", 201)
    obs["llama3_lora_qv"]["logits_with_vs_without_llama3_scaling_max_abs"] = obs["llama3_scaled_vs_unscaled_max_abs"]
    obs["qwen3_lora_qv"] = lora_case("qwen3_lora_qv", "qwen3", 202)
    obs["qwen3_prefix"] = prefix_case("qwen3_prefix", "qwen3", 203)
    obs["llama3_prefix"] = prefix_case("llama3_prefix", "llama3", 204)
    obs["versions"] = fc.versions(gguf=True)
    obs["tolerances"] = {"logits_atol": 1e-4, "logits_rtol": 1e-4, "grad_rtol": 1e-4,
                         "grad_atol": "1e-4 * max |expected gradient| of the tensor"}
    for case in ("llama3_lora_qv", "qwen3_lora_qv", "qwen3_prefix", "llama3_prefix"):
        fc.write_case_json(case, "__test__/scripts/make_family_fixtures.py", obs[case], obs["versions"])
    print(json.dumps(obs, indent=1))


if __name__ == "__main__":
    main()
