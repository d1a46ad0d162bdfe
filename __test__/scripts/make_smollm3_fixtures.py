"""HF PEFT 0.21 reference fixtures for SmolLM3 (issue 18), beside make_family_fixtures.py:

* `models/smollm3`: SmolLM3ForCausalLM (model_type `smollm3`), tiny and random-init: hidden 32,
  intermediate 64, vocab 256, 4 layers, 4 heads, 2 kv heads (head_dim 8), tied embeddings,
  rope_theta 2e6 (SmolLM3's default), `no_rope_layer_interval` 4, so `no_rope_layers` =
  [1, 1, 1, 0]: layers 0-2 apply RoPE, layer 3 is a NoPE layer (no position encoding), as in
  SmolLM3-3B (every fourth layer); random norm weights;
* `models/smollm3.gguf`: the same weights written with PyPI `gguf` as llama.cpp's
  convert_hf_to_gguf.py `SmolLM3Model(LlamaModel)` writes them (arch `smollm3`, the `smollm3.`
  keys of a Llama file, q/k rows permuted, no `output.weight` when tied, a byte-level BPE
  (`gpt2`) vocabulary). llama.cpp has no metadata key for the NoPE pattern: it hard-codes
  `n_no_rope_layer_step = 4` for `smollm3` (layer il skips RoPE when (il + 1) % 4 == 0);
* case `smollm3_lora` (LoRA r=8 alpha=16 on the seven linears, init_lora_weights=False): base /
  adapter / disabled / merged logits, loss, LoRA gradients, greedy ids (base, adapter, merged);
  case.json records how much the NoPE layer changes the logits (the same weights with every
  layer applying RoPE); case `smollm3_prefix` (prefix tuning, 5 virtual tokens): adapter logits
  and greedy ids.

Run with torch 2.13 + transformers 5.18 + peft 0.21 + gguf from PyPI:

    /work/venv-hf/bin/python __test__/scripts/make_smollm3_fixtures.py
"""

import json

import fixture_common as fc

fc.start()  # PYTHONHASHSEED=0, in the fixtures root

import torch
import gguf
from transformers import SmolLM3Config, SmolLM3ForCausalLM


S = 12
CONFIG = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, hidden_act="silu", pad_token_id=0, bos_token_id=1,
              eos_token_id=2, attention_dropout=0.0, initializer_range=0.1, rms_norm_eps=1e-6,
              tie_word_embeddings=True, no_rope_layer_interval=4, use_sliding_window=False,
              rope_parameters={"rope_type": "default", "rope_theta": 2000000.0})


def load(path="models/smollm3"):
    return SmolLM3ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def make_model():
    torch.manual_seed(31)
    m = SmolLM3ForCausalLM(SmolLM3Config(**CONFIG)).eval()
    assert m.config.no_rope_layers == [1, 1, 1, 0], m.config.no_rope_layers
    with torch.no_grad():  # random (not unit) norm weights, so the norms are really tested
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape))
    m.save_pretrained("models/smollm3")


def inputs(seed, b=2, s=S):
    return fc.padded_inputs(seed, CONFIG["vocab_size"], 3, b, s)


def write_gguf():
    # convert_hf_to_gguf.py: SmolLM3Model(LlamaModel) with model_arch SMOLLM3 (LlamaModel's
    # parameters and tensors, q/k permuted; no head_dim in config.json, so no key/value length).
    fc.write_decoder_gguf("smollm3", gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.SMOLLM3])


def nope_effect(seed):
    """Max |logits| difference between the model and the same weights with every layer applying RoPE."""
    ids, mask = inputs(seed)
    m = load()
    cfg = SmolLM3Config(**{**CONFIG, "no_rope_layers": [1, 1, 1, 1]})
    all_rope = SmolLM3ForCausalLM(cfg).eval()
    all_rope.load_state_dict(m.state_dict())
    with torch.no_grad():
        a = m(input_ids=ids, attention_mask=mask).logits
        b = all_rope(input_ids=ids, attention_mask=mask).logits
    return float((a - b).abs().max())


def main():
    obs = {}
    make_model()
    write_gguf()
    obs["smollm3_lora"] = fc.lora_case("smollm3_lora", load, inputs, 301,
                                       ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    obs["smollm3_lora"]["no_rope_layers"] = load().config.no_rope_layers
    obs["smollm3_lora"]["logits_nope_vs_all_rope_max_abs"] = nope_effect(301)
    obs["smollm3_prefix"] = fc.prefix_case("smollm3_prefix", load, inputs, 302, 5)
    obs["versions"] = fc.versions(gguf=True)
    for case in ("smollm3_lora", "smollm3_prefix"):
        fc.write_case_json(case, "__test__/scripts/make_smollm3_fixtures.py", obs[case], obs["versions"])
    print(json.dumps(obs, indent=1))


if __name__ == "__main__":
    main()
