"""Reference fixtures for GGUF SentencePiece tokenizers (`tokenizer.ggml.model = "llama"`, issue 18):
tokenizer-only GGUF files in `spm_tokenizers/` and what transformers 5.18 makes of them.

* Two tiny SentencePiece BPE models are trained here with PyPI `sentencepiece` (one thread, a fixed
  corpus, so the run is deterministic) and written with PyPI `gguf` as llama.cpp's
  convert_hf_to_gguf.py writes SentencePiece vocabularies (`_create_vocab_sentencepiece`: tokens,
  scores, token types from IsUnknown / IsControl / IsUnused / IsByte, added tokens as CONTROL when
  special else USER_DEFINED; `SpecialVocab`: bos / eos / unk / pad ids, add_bos / add_eos):
  * `llama.gguf` (arch `llama`, Llama-2 style: `<unk> <s> </s>`, 256 byte tokens, pieces with
    `add_dummy_prefix`, an added control token `<|im_start|>` and a user-defined `<tool>`;
    add_bos_token true);
  * `phi3.gguf` (arch `phi3`, Phi-3-mini style: the same SentencePiece model plus Phi-3's added
    tokens `<|endoftext|>` `<|assistant|>` `<|end|>` `<|user|>` (control) and a user-defined
    `<|placeholder1|>`; eos and pad `<|endoftext|>`);
  * `gemma.gguf` (arch `gemma3`, Gemma style: `<pad> <eos> <bos> <unk> <mask>` first, control
    `<start_of_turn>` / `<end_of_turn>`, user-defined newline and tab runs, multi-space tokens
    stored as real spaces, no dummy prefix, a partial byte table (bytes >= 0xF0 missing, so 4-byte
    UTF-8 falls back to `<unk>`); add_space_prefix false).
* `expected.json`: for each file (and for `models/gemma3.gguf` of make_gemma3_fixtures.py, which
  is only read, with 6 greedy tokens of the HF folder `models/gemma3` after a prompt that the GGUF's
  tokenizer encoded), transformers' `AutoTokenizer.from_pretrained(dir,
  gguf_file=...)`: its class, len, special tokens and ids, added tokens, and per test string the ids
  with and without special tokens, the tokens, and the decodes with and without
  `skip_special_tokens`; plus decodes of hand-made id lists (byte tokens that form invalid UTF-8,
  special ids, leading `▁`).

transformers 5.18 builds these as: Llama -> `LlamaTokenizer` (BPE with byte fallback and no unk
token, merges derived from the vocabulary ordered by score, Metaspace prepend "first"); Phi-3 ->
the same BPE with a Prepend("▁") + Replace(" ", "▁") normalizer and no pre-tokenizer; Gemma ->
`GemmaTokenizer` (Replace(" ", "▁"), unk "<unk>", merges ordered by token position, multi-space
tokens respelled as "▁"); it ignores add_bos_token / add_eos_token and add_space_prefix.

Run with torch 2.13 + transformers 5.18 + tokenizers 0.23 + PyPI gguf + sentencepiece:

    /work/venv-hf/bin/python __test__/scripts/make_spm_tokenizer_fixtures.py
"""

import io
import json
import os

import fixture_common as fc

fc.start()  # PYTHONHASHSEED=0, in the fixtures root

import gguf
import sentencepiece as spm
import tokenizers
import transformers

OUT = "spm_tokenizers"

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "Tokenizers split text into pieces; pieces map to ids.",
    "  two leading spaces, and   three inside, then a tab\there.",
    "Line one\nLine two\n\nLine four after a blank line.",
    "Numbers: 12345, 2026 and 3.14159 are digits.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber \u00e9t\u00e9 gar\u00e7on.",
    "hello hello hello world world world the the the",
    "def main():\n    return 42\n",
    "\u00bfQu\u00e9 tal? \u00a1Muy bien! \u00e0 la fa\u00e7on.",
]

TEXTS = [
    "",
    "Hello world",
    "hello",
    " hello",
    "  hello",
    "hello ",
    "hello  ",
    "   ",
    " ",
    "the quick brown fox",
    "a  b   c    d",
    "Line one\nLine two",
    "\n",
    "\n\nstart with newlines",
    "tabs\tand\t\ttabs",
    "trailing newline\n",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9",
    "\u00fcber gro\u00df",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "emoji \U0001F600 and \U0001F680!",
    "\U0001F44D\U0001F3FD",
    "Numbers 12345 and 3.14",
    "def main():\n    return 42",
    "zzz qqq xxx",
    "<s>",
    "</s>",
    "<unk>",
    "<s>hello</s>",
    "hello <s> world",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|><|assistant|>answer<|end|>",
    "<|user|>\nquestion<|end|>\n<|assistant|>",
    "<tool>call</tool>",
    "<|placeholder1|>x",
    "<bos>text<eos>",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "<mask> and <pad>",
    "\u2581 already a metaspace",
    "mixed \u2581\u2581 marks",
    "\u00a0non-breaking\u00a0space",
    "a\r\nwindows line",
]


def train(**opts):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4), model_writer=buf, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, num_threads=1,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
                                   minloglevel=2, **opts)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def spm_vocab(sp, user_defined=()):
    """`_create_vocab_sentencepiece`: (tokens, scores, types) of the model (the Python binding has no
    IsUserDefined; the user-defined symbols are passed in)."""
    T = gguf.TokenType
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        piece = sp.IdToPiece(i)
        tokens.append(piece)
        scores.append(sp.GetScore(i))
        if sp.IsUnknown(i):
            types.append(T.UNKNOWN)
        elif sp.IsControl(i):
            types.append(T.CONTROL)
        elif sp.IsUnused(i):
            types.append(T.UNUSED)
        elif sp.IsByte(i):
            types.append(T.BYTE)
        elif piece in user_defined:
            types.append(T.USER_DEFINED)
        else:
            types.append(T.NORMAL)
    return tokens, scores, types


def add_tokens(vocab, added):
    """Added tokens (added_tokens_decoder of tokenizer_config.json): CONTROL when special, else
    USER_DEFINED, score -1000 as llama.cpp writes them."""
    tokens, scores, types = vocab
    for text, special in added:
        tokens.append(text)
        scores.append(-1000.0)
        types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    return tokens, scores, types


def write(name, arch, vocab, ids, add_bos, add_eos=False, add_space_prefix=None):
    tokens, scores, types = vocab
    g = gguf.GGUFWriter(f"{OUT}/{name}.gguf", arch)
    g.add_name(f"tiny-{name}-spm-tokenizer-fixture")
    # The few hyper-parameters transformers' GGUF config reader wants (a vocab-only file).
    g.add_block_count(1)
    g.add_context_length(64)
    g.add_embedding_length(8)
    g.add_feed_forward_length(16)
    g.add_head_count(1)
    g.add_head_count_kv(1)
    g.add_layer_norm_rms_eps(1e-6)
    g.add_file_type(gguf.LlamaFileType.ALL_F32)
    g.add_tokenizer_model("llama")
    g.add_tokenizer_pre("default")
    g.add_token_list(tokens)
    g.add_token_scores(scores)
    g.add_token_types(types)
    for key, tok in ids.items():
        getattr(g, f"add_{key}_token_id")(tokens.index(tok))
    g.add_add_bos_token(add_bos)
    g.add_add_eos_token(add_eos)
    if add_space_prefix is not None:
        g.add_add_space_prefix(add_space_prefix)
    fc.finish_gguf(g)


def llama_vocab():
    sp = train(vocab_size=420, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    return spm_vocab(sp)


def gemma_vocab():
    ws = ["\n", "\n\n", "\t", "\t\t"]
    sp = train(vocab_size=380, add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
               pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
               control_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
               user_defined_symbols=ws + ["\u2581\u2581", "\u2581\u2581\u2581"])
    tokens, scores, types = spm_vocab(sp, user_defined=ws + ["\u2581\u2581", "\u2581\u2581\u2581"])
    # Gemma's files spell runs of spaces with real spaces (transformers' gemma_tokenizer respells them).
    tokens = [" " * len(t) if t and set(t) == {"\u2581"} and len(t) > 1 else t for t in tokens]
    # Drop the byte tokens of 0xF0..0xFF (4-byte UTF-8 leads): those characters become <unk>.
    keep = [i for i, t in enumerate(tokens) if not (types[i] == gguf.TokenType.BYTE and int(t[3:5], 16) >= 0xF0)]
    return [tokens[i] for i in keep], [scores[i] for i in keep], [types[i] for i in keep]


def observe(name, folder=OUT):
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(folder, gguf_file=f"{name}.gguf")
    backend = json.loads(t.backend_tokenizer.to_str())
    texts = []
    for s in TEXTS:
        ids = t.encode(s)
        plain = t.encode(s, add_special_tokens=False)
        texts.append({"text": s, "ids": ids, "ids_no_special": plain, "tokens": t.convert_ids_to_tokens(plain),
                      "decoded": t.decode(ids), "decoded_skip_special": t.decode(ids, skip_special_tokens=True)})
    n = len(t)
    specials = [a["id"] for a in backend["added_tokens"] if a["special"]]
    id_lists = [[], [specials[0]], specials[:3] + [specials[0]], [n - 1, 0, 1, 2], list(range(n - 40, n)),
                [t.convert_tokens_to_ids("<0xE2>"), t.convert_tokens_to_ids("<0x82>")],
                [t.convert_tokens_to_ids("<0xE2>"), t.convert_tokens_to_ids("<0x82>"), t.convert_tokens_to_ids("<0xAC>")],
                [t.convert_tokens_to_ids("<0xFF>") or 0, t.convert_tokens_to_ids("<0x41>")],
                t.encode("  spaced  out  ", add_special_tokens=False) + specials[:2]]
    decodes = [{"ids": ids, "decoded": t.decode(ids), "decoded_skip_special": t.decode(ids, skip_special_tokens=True)}
               for ids in id_lists]
    return {
        "file": f"{folder}/{name}.gguf",
        "class": type(t).__name__,
        "len": n,
        "special_tokens": {k: getattr(t, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")},
        "special_token_ids": {k: getattr(t, f"{k}_id") for k in ("bos_token", "eos_token", "unk_token", "pad_token")},
        "added_tokens": [[a["id"], a["content"], a["special"]] for a in backend["added_tokens"]],
        "texts": texts,
        "decodes": decodes,
    }


def gemma3_generate(prompt="hello world\nthe model"):
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM
    t = AutoTokenizer.from_pretrained("models", gguf_file="gemma3.gguf")
    m = Gemma3ForCausalLM.from_pretrained("models/gemma3", attn_implementation="eager").eval()
    ids = t.encode(prompt)
    out = fc.greedy(m, torch.tensor([ids]))[0].tolist()
    return {"prompt": prompt, "input_ids": ids, "output_ids": out, "text": t.decode(out),
            "new_text_skip_special": t.decode(out[len(ids):], skip_special_tokens=True)}


def main():
    os.makedirs(OUT, exist_ok=True)
    llama = llama_vocab()
    write("llama", "llama", add_tokens(llama, [("<|im_start|>", True), ("<|im_end|>", True), ("<tool>", False)]),
          {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}, add_bos=True)
    phi3 = add_tokens(llama_vocab(), [("<|endoftext|>", True), ("<|assistant|>", True), ("<|placeholder1|>", False),
                                      ("<|end|>", True), ("<|user|>", True)])
    write("phi3", "phi3", phi3, {"bos": "<s>", "eos": "<|endoftext|>", "unk": "<unk>", "pad": "<|endoftext|>"},
          add_bos=False, add_eos=False)
    write("gemma", "gemma3", gemma_vocab(), {"bos": "<bos>", "eos": "<eos>", "unk": "<unk>", "pad": "<pad>"},
          add_bos=True, add_space_prefix=False)
    expected = {"generator": "__test__/scripts/make_spm_tokenizer_fixtures.py",
                "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                             "sentencepiece": spm.__version__, "gguf": "PyPI gguf"},
                "tokenizers": {name: observe(name) for name in ("llama", "phi3", "gemma")}}
    # The Gemma 3 model fixture's vocabulary (make_gemma3_fixtures.py; read, not rewritten), and
    # 6 greedy tokens of its HF folder after a prompt tokenized by the GGUF's tokenizer.
    expected["tokenizers"]["models/gemma3"] = observe("gemma3", "models")
    expected["tokenizers"]["models/gemma3"]["generate"] = gemma3_generate()
    with open(f"{OUT}/expected.json", "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
        f.write("\n")
    for name, obs in expected["tokenizers"].items():
        print(name, obs["class"], obs["len"], obs["special_tokens"])


if __name__ == "__main__":
    main()
