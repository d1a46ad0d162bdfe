"""Write __test__/fixtures/models/llama.gguf: the tiny Llama fixture (__test__/fixtures/models/llama,
made by HF transformers) as an f32 GGUF file, with the PyPI `gguf` package (llama.cpp's gguf-py),
independently of peft-node's own GGUF writer.

The weights are renamed and the q/k rows permuted as llama.cpp's convert_hf_to_gguf.py does for
the `llama` architecture. The fixture's tokenizer is a WordLevel one, which GGUF cannot hold, so
the file gets a synthetic byte-level BPE vocabulary of the same size (256): <pad>, <s>, </s> as
control tokens (ids 0, 1, 2, as in the fixture), 252 byte tokens and one merge ("Ġ t"). Tests
feed token ids, so the vocabulary only has to be loadable by llama.cpp and by peft-node.

The writer is fixture_common.write_decoder_gguf (arch `llama`, without the key/value lengths).

Run: /work/venv-hf/bin/python __test__/scripts/make_tiny_llama_gguf.py   (needs `pip install gguf`)
"""
import json
import os
import sys

import fixture_common as fc

OUT = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.path.join(fc.ROOT, "models", "llama.gguf")
os.chdir(fc.ROOT)  # write_decoder_gguf reads models/llama relative to the fixtures root
tokens = fc.byte_tokens()
assert len(tokens) == json.load(open("models/llama/config.json"))["vocab_size"] == 256 and len(set(tokens)) == 256
fc.write_decoder_gguf("llama", "llama", OUT, key_value_length=False)
print("wrote", OUT, os.path.getsize(OUT), "bytes")
