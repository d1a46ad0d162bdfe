"""Writes a Llama-architecture GGUF with random weights in a published model's shape, for measuring
memory and speed of training through a base kept quantized (`benches/qlora-memory.ts`).

The weights are N(0, 0.02) (norms 1), so the model says nothing; only the shapes, the tensor types
and therefore the bytes match the named model. Written with the PyPI `gguf` package (its numpy
quantizers, llama.cpp's reference round-to-nearest): the 2-D layer weights and `token_embd` in
`--type` (Q4_1 by default), the untied `output.weight` in Q8_0; norms in f32. The tokenizer is a
stand-in of the right size (a byte-level BPE with the 256 byte symbols, no merges, and numbered
placeholder tokens up to the vocabulary size, and one merge), so the file serves random token ids only.

    python benches/make-random-gguf.py --shape llama-3.1-8b --out .cache/models/random-llama-3.1-8b.Q4_1.gguf
"""

import argparse
import sys

import numpy as np
import gguf

# name: (hidden, layers, heads, kv_heads, intermediate, vocab, rope_theta, tied), from the models'
# config.json on the Hugging Face Hub.
SHAPES = {
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128256, 500000.0, True),
    "llama-3.2-3b": (3072, 28, 24, 8, 8192, 128256, 500000.0, True),
    "llama-3.1-8b": (4096, 32, 32, 8, 14336, 128256, 500000.0, False),
    "llama-2-13b": (5120, 40, 40, 40, 13824, 32000, 10000.0, False),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--out", required=True)
    p.add_argument("--type", default="Q4_1", choices=["Q4_0", "Q4_1", "Q8_0"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    hidden, layers, heads, kv, inter, vocab, theta, tied = SHAPES[a.shape]
    qt = getattr(gguf.GGMLQuantizationType, a.type)
    rng = np.random.default_rng(a.seed)
    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name(f"random {a.shape}")
    w.add_context_length(8192)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    # GPT-2's byte-to-symbol table (printable bytes map to themselves, the rest to U+0100 on).
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = iter(range(0x100, 0x200))
    symbols = [chr(b) if b in keep else chr(next(extra)) for b in range(256)]
    w.add_tokenizer_model("gpt2")
    # One merge (GGUF needs a non-empty merge list for BPE): "Ġ" + "t" (space, t).
    w.add_token_list(symbols + ["\u0120t"] + [f"<|random_{i}|>" for i in range(vocab - 257)])
    w.add_token_types([1] * 257 + [3] * (vocab - 257))
    w.add_token_merges(["\u0120 t"])
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)

    def mat(name: str, rows: int, cols: int, t: gguf.GGMLQuantizationType) -> None:
        x = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float32)
        q = gguf.quants.quantize(x, t)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=t)

    def vec(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    hd = hidden // heads
    mat("token_embd.weight", vocab, hidden, qt if not tied else gguf.GGMLQuantizationType.Q8_0)
    for i in range(layers):
        vec(f"blk.{i}.attn_norm.weight", hidden)
        mat(f"blk.{i}.attn_q.weight", heads * hd, hidden, qt)
        mat(f"blk.{i}.attn_k.weight", kv * hd, hidden, qt)
        mat(f"blk.{i}.attn_v.weight", kv * hd, hidden, qt)
        mat(f"blk.{i}.attn_output.weight", hidden, heads * hd, qt)
        vec(f"blk.{i}.ffn_norm.weight", hidden)
        mat(f"blk.{i}.ffn_gate.weight", inter, hidden, qt)
        mat(f"blk.{i}.ffn_up.weight", inter, hidden, qt)
        mat(f"blk.{i}.ffn_down.weight", hidden, inter, qt)
        print(f"layer {i + 1}/{layers}", file=sys.stderr, flush=True)
    vec("output_norm.weight", hidden)
    if not tied:
        mat("output.weight", vocab, hidden, gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
