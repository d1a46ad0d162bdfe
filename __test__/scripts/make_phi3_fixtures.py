"""HF PEFT 0.21 reference fixtures for Phi-3 (issue 18), beside make_family_fixtures.py:

* `models/phi3`: Phi3ForCausalLM (model_type `phi3`, the architecture of Phi-3-mini /
  Phi-3.5-mini / Phi-4-mini), tiny and random-init: hidden 64, intermediate 64, vocab 128, 2 layers, 4 heads, 2 kv heads
  (head_dim 16), fused `qkv_proj` and `gate_up_proj`, partial_rotary_factor 0.75 (12 of 16 head
  dims rotated, as Phi-4-mini), `longrope` scaling with distinct short / long factors,
  original_max_position_embeddings 8 < the test sequence of 12 (so transformers uses the long
  factors), max_position_embeddings 64 (attention factor sqrt(1 + ln 8 / ln 8)), untied
  embeddings, no sliding window, random norm weights;
* `models/phi3_tied`: default RoPE, full rotary, tied embeddings, sliding_window 6 < 12 (as
  Phi-3-mini's sliding_window), 1 layer;
* `models/phi3.gguf`: the `phi3` weights written with PyPI `gguf` as llama.cpp's
  convert_hf_to_gguf.py `Phi3MiniModel` writes them (arch `phi3`, fused `attn_qkv` and `ffn_up`
  (gate then up rows), `rope.dimension_count` 12, `rope.scaling.original_context_length`,
  `rope.scaling.attn_factor`, `rope_factors_long.weight` / `rope_factors_short.weight`,
  sliding_window 0, a byte-level BPE (`gpt2`) vocabulary as for Phi-4-mini);
* case `phi3_lora` (LoRA r=8 alpha=16 on qkv_proj / o_proj / gate_up_proj / down_proj,
  init_lora_weights=False): base / adapter / disabled / merged logits, loss, LoRA gradients,
  greedy ids (prompt 7 tokens + 6 new: the decode steps cross original_max_position_embeddings,
  so the long factors take over mid-generation, as in transformers); case `phi3_short`: base
  logits of a 6-token batch (short factors); case `phi3_tied_lora` (all-linear on phi3_tied):
  base / adapter / merged logits and greedy ids; case `phi3_prefix` (prefix tuning, 4 virtual
  tokens): adapter logits and greedy ids.

Run with torch 2.13 + transformers 5.18 + peft 0.21 + gguf from PyPI:

    /work/venv-hf/bin/python __test__/scripts/make_phi3_fixtures.py
"""

import json
import math
import os

import fixture_common as fc

fc.start()  # PYTHONHASHSEED=0, in the fixtures root

import numpy as np
import torch
import gguf
from transformers import Phi3ForCausalLM, Phi3Config
from peft import LoraConfig, get_peft_model
from fixture_common import byte_tokens, greedy, save_expected


S = 12
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              pad_token_id=0, eos_token_id=1, bos_token_id=2, attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
              initializer_range=0.1, rms_norm_eps=1e-5, hidden_act="silu")
CONFIGS = {
    "phi3": dict(COMMON, num_hidden_layers=2, max_position_embeddings=64, original_max_position_embeddings=8,
                 tie_word_embeddings=False, sliding_window=None,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                  "short_factor": [1.0, 1.1, 1.3, 1.7, 2.3, 3.1],
                                  "long_factor": [1.0, 1.6, 2.9, 5.2, 9.7, 17.0]}),
    "phi3_tied": dict(COMMON, num_hidden_layers=1, max_position_embeddings=128, original_max_position_embeddings=128,
                      tie_word_embeddings=True, sliding_window=6,
                      rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}


def load(name):
    return Phi3ForCausalLM.from_pretrained(f"models/{name}", attn_implementation="eager").eval()


def make_model(name, seed):
    torch.manual_seed(seed)
    m = Phi3ForCausalLM(Phi3Config(**CONFIGS[name])).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape))
    m.save_pretrained(f"models/{name}")


def inputs(seed, b=2, s=S):
    return fc.padded_inputs(seed, COMMON["vocab_size"], 4, b, s)


def greedy_longrope(model, ids, obs, key):
    """Greedy ids without a cache: transformers 5.18's Phi-3 `prepare_inputs_for_generation` drops
    the cache at the step that crosses original_max_position_embeddings (to recompute it with the
    long factors) but generate then feeds only that step's token, without any context; the
    uncached ids are the intended ones. The cached ids are recorded in case.json."""
    ids_nc = greedy(model, ids, use_cache=False)
    obs.setdefault("hf_generate_use_cache_true", {})[key] = greedy(model, ids).tolist()
    obs.setdefault("hf_generate_use_cache_false", {})[key] = ids_nc.tolist()
    return ids_nc


def write_gguf(name="phi3"):
    """As convert_hf_to_gguf.py `Phi3MiniModel` (set_gguf_parameters + generate_extra_tensors)."""
    from safetensors.numpy import load_file
    cfg = json.load(open(f"models/{name}/config.json"))
    w = load_file(f"models/{name}/model.safetensors")
    rp = cfg["rope_parameters"]
    H, NH = cfg["hidden_size"], cfg["num_attention_heads"]
    g = gguf.GGUFWriter(f"models/{name}.gguf", "phi3")
    g.add_name(f"tiny-{name}-fixture")
    max_pos, orig = cfg["max_position_embeddings"], cfg["original_max_position_embeddings"]
    rope_dims = int(rp.get("partial_rotary_factor", 1.0) * H) // NH
    g.add_context_length(max_pos)
    g.add_rope_scaling_orig_ctx_len(orig)
    g.add_embedding_length(H)
    g.add_feed_forward_length(cfg["intermediate_size"])
    g.add_block_count(cfg["num_hidden_layers"])
    g.add_head_count(NH)
    g.add_head_count_kv(cfg["num_key_value_heads"])
    g.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    g.add_rope_dimension_count(rope_dims)
    g.add_rope_freq_base(rp["rope_theta"])
    g.add_file_type(gguf.LlamaFileType.ALL_F32)
    g.add_sliding_window(cfg.get("sliding_window") or 0)
    scale = max_pos / orig
    g.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
    # A byte-level BPE vocabulary (`_set_vocab_gpt2`, as Phi-4-mini), the one make_family_fixtures.py writes.
    tokens = byte_tokens()[:127] + ["Ġt"]  # the vocabulary is 128: bytes up to "y" and the merge
    fc.add_byte_vocab(g, cfg, tokens)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
             "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}

    def put(gg, hf):
        g.add_tensor(gg, np.ascontiguousarray(w[hf].astype(np.float32)))

    put("token_embd.weight", "model.embed_tokens.weight")
    # generate_extra_tensors: the longrope factors, global tensors
    g.add_tensor("rope_factors_long.weight", np.array(rp["long_factor"], dtype=np.float32))
    g.add_tensor("rope_factors_short.weight", np.array(rp["short_factor"], dtype=np.float32))
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in names.items():
            put(f"blk.{i}.{gg}.weight", f"model.layers.{i}.{hf}.weight")
    put("output_norm.weight", "model.norm.weight")
    if not cfg["tie_word_embeddings"]:
        put("output.weight", "lm_head.weight")
    fc.finish_gguf(g)


def lora_case(name, model, seed, targets, full=True):
    out = f"cases/{name}"
    os.makedirs(out, exist_ok=True)
    ids, mask = inputs(seed)
    base_model = load(model)
    with torch.no_grad():
        logits_base = base_model(input_ids=ids, attention_mask=mask).logits
    gen_ids = ids[:1, :7].clone()
    obs = {}
    longrope = CONFIGS[model]["rope_parameters"]["rope_type"] == "longrope"
    gr = (lambda mm, key: greedy_longrope(mm, gen_ids, obs, key)) if longrope else (lambda mm, key: greedy(mm, gen_ids))
    gen_base = gr(base_model, "generate_base")
    torch.manual_seed(seed)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0,
                     init_lora_weights=False)
    pm = get_peft_model(load(model), cfg).eval()
    pm.save_pretrained(out)
    with torch.no_grad():
        logits_adapter = pm(input_ids=ids, attention_mask=mask).logits
        with pm.disable_adapter():
            logits_disabled = pm(input_ids=ids, attention_mask=mask).logits
    gen_adapter = gr(pm, "generate_adapter")
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    if full:
        with torch.enable_grad():
            pm.zero_grad(set_to_none=True)
            o = pm(input_ids=ids, attention_mask=mask, labels=labels)
            o.loss.backward()
        grads = fc.lora_grads(pm)
        grads["loss"] = o.loss.detach().reshape(1)
    merged = pm.merge_and_unload().eval()
    with torch.no_grad():
        logits_merged = merged(input_ids=ids, attention_mask=mask).logits
    gen_merged = gr(merged, "generate_merged")
    t = {"input_ids": ids, "attention_mask": mask, "labels": labels,
         "logits_base": logits_base, "logits_adapter": logits_adapter, "logits_disabled": logits_disabled,
         "logits_merged": logits_merged, "generate_input_ids": gen_ids, "generate_base": gen_base,
         "generate_adapter": gen_adapter, "generate_merged": gen_merged, **grads}
    save_expected(out, t)
    return {"adapter_vs_base_max_abs": float((logits_adapter - logits_base).abs().max()),
            "disabled_vs_base_max_abs": float((logits_disabled - logits_base).abs().max()),
            "grad_keys": len(grads) - (1 if full else 0), **obs}


def short_case(name, seed):
    """Base logits of a sequence within original_max_position_embeddings (short factors)."""
    out = f"cases/{name}"
    os.makedirs(out, exist_ok=True)
    ids, mask = inputs(seed, s=6)
    with torch.no_grad():
        logits_base = load("phi3")(input_ids=ids, attention_mask=mask).logits
    save_expected(out, {"input_ids": ids, "attention_mask": mask, "logits_base": logits_base})
    return {}


def prefix_case(name, seed):
    return fc.prefix_case(name, lambda: load("phi3"), inputs, seed, 4)


def sensitivity():
    """How much each Phi-3 feature moves the base logits of the phi3_lora batch."""
    ids, mask = inputs(401)
    m = load("phi3")
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).logits
    obs = {}
    rp = CONFIGS["phi3"]["rope_parameters"]
    for key, change in [("long_factors", {"rope_parameters": {**rp, "long_factor": rp["short_factor"]}}),
                        ("attention_factor", {"max_position_embeddings": 8}),
                        ("partial_rotary", {"rope_parameters": {**rp, "partial_rotary_factor": 1.0,
                                                                "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}})]:
        other = Phi3ForCausalLM(Phi3Config(**{**CONFIGS["phi3"], **change}))
        other.load_state_dict(m.state_dict())
        other.eval()
        other.config._attn_implementation = "eager"
        with torch.no_grad():
            obs[f"without_{key}_max_abs"] = float((other(input_ids=ids, attention_mask=mask).logits - ref).abs().max())
    return obs


def main():
    make_model("phi3", 41)
    make_model("phi3_tied", 42)
    write_gguf("phi3")
    obs = {"phi3_lora": lora_case("phi3_lora", "phi3", 401, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
           "phi3_short": short_case("phi3_short", 402),
           "phi3_tied_lora": lora_case("phi3_tied_lora", "phi3_tied", 403, "all-linear", full=False),
           "phi3_prefix": prefix_case("phi3_prefix", 404)}
    obs["phi3_lora"]["base_logits_sensitivity"] = sensitivity()
    versions = fc.versions(gguf=True)
    for case in obs:
        fc.write_case_json(case, "__test__/scripts/make_phi3_fixtures.py", obs[case], versions)
    print(json.dumps(obs, indent=1))


if __name__ == "__main__":
    main()
