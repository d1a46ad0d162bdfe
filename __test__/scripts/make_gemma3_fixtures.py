"""HF PEFT 0.21 reference fixtures for Gemma 3 (issue 18), beside make_family_fixtures.py:

* `models/gemma3`  : Gemma3ForCausalLM (model_type `gemma3_text`, the architecture of
  google/gemma-3-270m), tiny and random-init: hidden 64, 4 layers alternating sliding / full
  attention (sliding_window 6 < the test sequence of 12), 4 heads, 2 kv heads, head_dim 32 !=
  64 / 4, query_pre_attn_scalar 24 (!= head_dim), local rope theta 10000, global rope theta 1e6
  with linear scaling (factor 2), final_logit_softcapping 30, tied embeddings, random (1 + w)
  norm weights;
* `models/gemma3.gguf`: the same weights written with PyPI `gguf` as llama.cpp's
  convert_hf_to_gguf.py `Gemma3Model` writes them (arch `gemma3`, norm weights stored with +1
  added, llama.cpp tensor names, SentencePiece-style `llama` tokenizer metadata), plus
  `gemma3.attention.sliding_window_pattern` (per-layer bools), `gemma3.rope.freq_base_swa` and
  `gemma3.attention.scale` (query_pre_attn_scalar^-1/2), which the tiny model needs because it
  departs from llama.cpp's built-in Gemma 3 values (pattern 6, local base 10000, scale
  head_dim^-1/2);
* case `gemma3_lora_all` (LoRA r=8 alpha=16 on q/k/v/o/gate/up/down, init_lora_weights=False):
  base / adapter / disabled / merged logits, loss, LoRA gradients, greedy ids (base, adapter,
  merged); case `gemma3_prefix` (prefix tuning, 4 virtual tokens, fewer than the window so that
  HF's sliding cache keeps all of them): adapter logits and greedy ids.

Run with torch 2.13 + transformers 5.18 + peft 0.21 + gguf from PyPI:

    /work/venv-hf/bin/python __test__/scripts/make_gemma3_fixtures.py
"""

import json

import fixture_common as fc

fc.start()  # PYTHONHASHSEED=0, in the fixtures root

import numpy as np
import torch
import gguf
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from fixture_common import greedy


NAME = "gemma3"
S = 12
CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=128, hidden_activation="gelu_pytorch_tanh",
              pad_token_id=0, eos_token_id=1, bos_token_id=2, attention_dropout=0.0, initializer_range=0.1,
              rms_norm_eps=1e-6, query_pre_attn_scalar=24, sliding_window=6,
              layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
              final_logit_softcapping=30.0, attn_logit_softcapping=None, tie_word_embeddings=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(path=f"models/{NAME}"):
    return Gemma3ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def make_model():
    torch.manual_seed(31)
    m = Gemma3ForCausalLM(Gemma3TextConfig(**CONFIG)).eval()
    with torch.no_grad():  # Gemma initialises norms to 0 (scale 1 + w): random w, so they are tested
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(0.3 * torch.randn(p.shape))
    m.save_pretrained(f"models/{NAME}")


def inputs(seed, b=2, s=S):
    return fc.padded_inputs(seed, CONFIG["vocab_size"], 4, b, s)


def write_gguf():
    """As convert_hf_to_gguf.py `Gemma3Model` (TextModel.set_gguf_parameters + its own keys)."""
    from safetensors.numpy import load_file
    cfg = json.load(open(f"models/{NAME}/config.json"))
    w = load_file(f"models/{NAME}/model.safetensors")
    H, HD = cfg["hidden_size"], cfg["head_dim"]
    g = gguf.GGUFWriter(f"models/{NAME}.gguf", "gemma3")
    g.add_name(f"tiny-{NAME}-fixture")
    g.add_block_count(cfg["num_hidden_layers"])
    g.add_context_length(cfg["max_position_embeddings"])
    g.add_embedding_length(H)
    g.add_feed_forward_length(cfg["intermediate_size"])
    g.add_head_count(cfg["num_attention_heads"])
    g.add_head_count_kv(cfg["num_key_value_heads"])
    g.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    g.add_key_length(HD)
    g.add_value_length(HD)
    g.add_rope_freq_base(cfg["rope_parameters"]["full_attention"]["rope_theta"])
    g.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)  # TextModel: rope_type linear on global layers
    g.add_rope_scaling_factor(cfg["rope_parameters"]["full_attention"]["factor"])
    g.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    g.add_sliding_window(cfg["sliding_window"])
    # Not written by convert_hf_to_gguf.py for gemma3 (llama.cpp hard-codes pattern 6 and local base 10000);
    # the tiny model needs them.
    g.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
    g.add_rope_freq_base_swa(cfg["rope_parameters"]["sliding_attention"]["rope_theta"])
    g.add_attention_scale(cfg["query_pre_attn_scalar"] ** -0.5)  # llama.cpp's rule would be head_dim ** -0.5
    g.add_file_type(gguf.LlamaFileType.ALL_F32)
    # SentencePiece vocabulary (`_set_vocab_sentencepiece`): <pad> <eos> <bos> <unk>, byte tokens, pieces.
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(200)] + \
        [f"\u2581{chr(ord('a') + i % 26)}{i // 26}" for i in range(52)]
    assert len(tokens) == cfg["vocab_size"]
    g.add_tokenizer_model("llama")
    g.add_tokenizer_pre("default")
    g.add_token_list(tokens)
    g.add_token_scores([0.0] * 204 + [-float(i) for i in range(52)])
    g.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.UNKNOWN] + [gguf.TokenType.BYTE] * 200 +
                      [gguf.TokenType.NORMAL] * 52)
    g.add_bos_token_id(cfg["bos_token_id"])
    g.add_eos_token_id(cfg["eos_token_id"])
    g.add_unk_token_id(3)
    g.add_pad_token_id(cfg["pad_token_id"])
    g.add_add_bos_token(True)
    g.add_add_eos_token(False)
    g.add_add_space_prefix(False)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}

    def put(gg, hf):
        t = w[hf].astype(np.float32)
        if hf.endswith("norm.weight"):
            t = t + 1.0  # Gemma3Model.norm_shift: llama.cpp stores 1 + w
        g.add_tensor(gg, np.ascontiguousarray(t))

    put("token_embd.weight", "model.embed_tokens.weight")
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in names.items():
            put(f"blk.{i}.{gg}.weight", f"model.layers.{i}.{hf}.weight")
    put("output_norm.weight", "model.norm.weight")  # lm_head is tied (and skipped by the converter)
    fc.finish_gguf(g)


def lora_case(name, seed):
    obs = fc.lora_case(name, load, inputs, seed, TARGETS)
    return {**obs, "grad_keys": len(obs["grad_keys"])}


def prefix_case(name, seed):
    return fc.prefix_case(name, load, inputs, seed, 4)


def sensitivity():
    """How much each Gemma 3 feature moves the base logits (a test could not notice a missing feature
    that moves them by less than its tolerance), and whether transformers applies
    attn_logit_softcapping at all."""
    ids, mask = inputs(301)
    m = load()
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).logits
    obs = {}
    for key, change in [("sliding_window", {"sliding_window": 64}),
                        ("final_logit_softcapping", {"final_logit_softcapping": None}),
                        ("query_pre_attn_scalar", {"query_pre_attn_scalar": 32}),
                        ("rope_linear_factor", {"rope_parameters": {**CONFIG["rope_parameters"], "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}),
                        ("attn_logit_softcapping_1.0", {"attn_logit_softcapping": 1.0})]:
        other = Gemma3ForCausalLM(Gemma3TextConfig(**{**CONFIG, **change}))
        other.load_state_dict(m.state_dict())
        other.eval()
        other.config._attn_implementation = "eager"
        with torch.no_grad():
            obs[f"without_{key}_max_abs" if key != "attn_logit_softcapping_1.0" else "with_attn_logit_softcapping_1.0_max_abs"] = \
                float((other(input_ids=ids, attention_mask=mask).logits - ref).abs().max())
    return obs


def main():
    make_model()
    write_gguf()
    obs = {"gemma3_lora_all": lora_case("gemma3_lora_all", 301), "gemma3_prefix": prefix_case("gemma3_prefix", 302)}
    obs["gemma3_lora_all"]["base_logits_sensitivity"] = sensitivity()
    versions = fc.versions(gguf=True)
    for case in ("gemma3_lora_all", "gemma3_prefix"):
        fc.write_case_json(case, "__test__/scripts/make_gemma3_fixtures.py", obs[case], versions)
    print(json.dumps(obs, indent=1))


if __name__ == "__main__":
    main()
