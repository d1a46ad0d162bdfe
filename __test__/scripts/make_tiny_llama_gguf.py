"""Write __test__/fixtures/models/llama.gguf: the tiny Llama fixture (__test__/fixtures/models/llama,
made by HF transformers) as an f32 GGUF file, with the PyPI `gguf` package (llama.cpp's gguf-py),
independently of peft-node's own GGUF writer.

The weights are renamed and the q/k rows permuted as llama.cpp's convert_hf_to_gguf.py does for
the `llama` architecture. The fixture's tokenizer is a WordLevel one, which GGUF cannot hold, so
the file gets a synthetic byte-level BPE vocabulary of the same size (256): <pad>, <s>, </s> as
control tokens (ids 0, 1, 2, as in the fixture), 252 byte tokens and one merge ("Ġ t"). Tests
feed token ids, so the vocabulary only has to be loadable by llama.cpp and by peft-node.

Run: /work/venv-hf/bin/python __test__/scripts/make_tiny_llama_gguf.py   (needs `pip install gguf`)
"""
import json
import os
import sys

import numpy as np
import gguf
from safetensors.numpy import load_file
from fixture_common import byte_tokens, finish_gguf, permute

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "fixtures", "models", "llama")
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "fixtures", "models", "llama.gguf")

cfg = json.load(open(os.path.join(SRC, "config.json")))
w = load_file(os.path.join(SRC, "model.safetensors"))
H, NH, NKV, HD = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]


tokens = byte_tokens()
assert len(tokens) == cfg["vocab_size"] == 256 and len(set(tokens)) == 256
types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * 253

g = gguf.GGUFWriter(OUT, "llama")
g.add_name("tiny-llama-fixture")
g.add_context_length(cfg["max_position_embeddings"])
g.add_embedding_length(H)
g.add_block_count(cfg["num_hidden_layers"])
g.add_feed_forward_length(cfg["intermediate_size"])
g.add_rope_dimension_count(HD)
g.add_head_count(NH)
g.add_head_count_kv(NKV)
g.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
g.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
g.add_vocab_size(cfg["vocab_size"])
g.add_file_type(gguf.LlamaFileType.ALL_F32)
g.add_tokenizer_model("gpt2")
g.add_tokenizer_pre("gpt-2")
g.add_token_list(tokens)
g.add_token_types(types)
g.add_token_merges(["Ġ t"])
g.add_bos_token_id(cfg["bos_token_id"])
g.add_eos_token_id(cfg["eos_token_id"])
g.add_pad_token_id(cfg["pad_token_id"])
g.add_add_bos_token(False)

names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
g.add_tensor("token_embd.weight", w["model.embed_tokens.weight"].astype(np.float32))
for i in range(cfg["num_hidden_layers"]):
    for hf, gg in names.items():
        t = w[f"model.layers.{i}.{hf}.weight"].astype(np.float32)
        if gg == "attn_q":
            t = permute(t, NH)
        elif gg == "attn_k":
            t = permute(t, NKV)
        g.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
g.add_tensor("output_norm.weight", w["model.norm.weight"].astype(np.float32))
g.add_tensor("output.weight", w["lm_head.weight"].astype(np.float32))
finish_gguf(g)
print("wrote", OUT, os.path.getsize(OUT), "bytes")
