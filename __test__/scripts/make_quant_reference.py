"""Reference blocks for quantizing f32 weights at load (issue 20, `quantization: 'q8_0' | 'q4_0'`).

Quantizes a few f32 rows with the PyPI `gguf` package's numpy ports of llama.cpp's reference
quantizers (`gguf.quants.quantize`: `quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`) and writes
the inputs (f32 bit patterns) and the resulting GGUF blocks (hex) to
crates/peft-core/tests/data/quant_reference.json, which `tests/quant.rs` compares against
`QuantWeight::quantize`.

Run: /work/venv-hf/bin/python __test__/scripts/make_quant_reference.py
"""
import json
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

COLS = 64
rng = np.random.default_rng(20)
rows = []
rows.append(rng.standard_normal(COLS) * 0.05)  # a typical trained layer
rows.append(rng.standard_normal(COLS) * 3.0)
r = np.zeros(COLS)  # one all-zero block, then a block with a single non-zero
r[40] = -0.25
rows.append(r)
r = rng.standard_normal(COLS) * 0.02  # largest magnitude negative; a tie of |max| with opposite signs
r[3] = -0.5
r[40] = 0.5
r[50] = -0.5
rows.append(r)
r = (np.arange(COLS) - 31.5) * 0.01  # codes near .5 boundaries
rows.append(r)
r = rng.standard_normal(COLS) * 1e-6  # scales in the f16 subnormal range
r[:32] *= 1e6 * 200.0  # and large ones
rows.append(r)
x = np.stack(rows).astype(np.float32)

out = {
    "source": "gguf (PyPI) " + __import__("importlib.metadata").metadata.version("gguf") + ", gguf.quants.quantize",
    "rows": int(x.shape[0]),
    "cols": COLS,
    "x_bits": [int(v) for v in x.view(np.uint32).reshape(-1)],
}
for name, t in [("Q8_0", T.Q8_0), ("Q4_0", T.Q4_0)]:
    out[name] = quants.quantize(x, t).tobytes().hex()
    out[name + "_dequantized_bits"] = [int(v) for v in quants.dequantize(quants.quantize(x, t), t).astype(np.float32).view(np.uint32).reshape(-1)]
dst = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "peft-core", "tests", "data", "quant_reference.json")
with open(dst, "w") as f:
    json.dump(out, f)
print("wrote", os.path.normpath(dst))
