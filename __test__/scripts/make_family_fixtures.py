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
import math

import fixture_common as fc

fc.start()  # PYTHONHASHSEED=0, in the fixtures root

import numpy as np
import torch
import gguf
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
from fixture_common import byte_tokens, greedy, permute


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


# --- GGUF (PyPI gguf = llama.cpp's gguf-py) ---------------------------------------------------

def llama3_rope_factors(cfg):
    # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (llama.cpp divides each frequency by its factor)
    rp = cfg["rope_parameters"]
    base, dim = rp["rope_theta"], cfg["head_dim"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
    low_wl, high_wl = old / lo, old / hi
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old / wl - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(name):
    from safetensors.numpy import load_file
    cfg = json.load(open(f"models/{name}/config.json"))
    w = load_file(f"models/{name}/model.safetensors")
    arch = "qwen3" if name == "qwen3" else "llama"
    H, NH, NKV, HD = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    g = gguf.GGUFWriter(f"models/{name}.gguf", arch)
    g.add_name(f"tiny-{name}-fixture")
    g.add_context_length(cfg["max_position_embeddings"])
    g.add_embedding_length(H)
    g.add_block_count(cfg["num_hidden_layers"])
    g.add_feed_forward_length(cfg["intermediate_size"])
    g.add_rope_dimension_count(HD)
    g.add_head_count(NH)
    g.add_head_count_kv(NKV)
    g.add_key_length(HD)
    g.add_value_length(HD)
    g.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    g.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    g.add_vocab_size(cfg["vocab_size"])
    g.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = byte_tokens()
    g.add_tokenizer_model("gpt2")
    g.add_tokenizer_pre("gpt-2")
    g.add_token_list(tokens)
    g.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * 253)
    g.add_token_merges(["Ġ t"])
    g.add_bos_token_id(cfg["bos_token_id"])
    g.add_eos_token_id(cfg["eos_token_id"])
    g.add_pad_token_id(cfg["pad_token_id"])
    g.add_add_bos_token(False)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    if arch == "qwen3":
        names.update({"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})
    if cfg["rope_parameters"].get("rope_type") == "llama3":
        g.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    g.add_tensor("token_embd.weight", w["model.embed_tokens.weight"].astype(np.float32))
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in names.items():
            t = w[f"model.layers.{i}.{hf}.weight"].astype(np.float32)
            if arch == "llama" and gg == "attn_q":
                t = permute(t, NH)
            elif arch == "llama" and gg == "attn_k":
                t = permute(t, NKV)
            g.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    g.add_tensor("output_norm.weight", w["model.norm.weight"].astype(np.float32))
    if not cfg.get("tie_word_embeddings"):
        g.add_tensor("output.weight", w["lm_head.weight"].astype(np.float32))
    fc.finish_gguf(g)


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
