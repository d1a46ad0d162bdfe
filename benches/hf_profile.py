"""HF PEFT's LoRA training step under torch.profiler: how much of it is matrix products.

    /work/venv-hf/bin/python benches/hf_profile.py [--batch 4] [--seq 128] [--steps 2] [--target qkvo]

Builds the SmolLM2-135M-shaped Llama of `../shared/reference/bench_ref.py` (random init, fp32,
2 threads by default), wraps it with LoRA r=8 as `bench_ref.py train` does, runs warm-up steps
(forward with labels, backward, AdamW), then profiles `--steps` steps and prints one JSON line:
the unprofiled step times (s), the profiled steps' total CPU self time, and the self time and
share of `aten::mm` / `aten::addmm` / `aten::bmm` (every linear, LoRA's and lm_head's included;
attention's products sit inside its SDPA op). Set the benchmark beside the fused engine's
`PEFT_ENGINE_PROFILE=1` phases (`crates/peft-core/examples/profile_train.rs`).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "reference"))
import bench_ref  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timed", type=int, default=3)
    ap.add_argument("--target", default="qkvo")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    import torch
    from peft import get_peft_model
    from torch.profiler import ProfilerActivity, profile

    bench_ref.set_threads(args.threads)
    model = get_peft_model(bench_ref.build_base(0), bench_ref.lora_config(args.target))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, bench_ref.SMOL_CFG["vocab_size"], (args.batch, args.seq), generator=g)
    attn = torch.ones_like(ids)

    def step():
        out = model(input_ids=ids, attention_mask=attn, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.timed):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    mm = {e.key: e.self_cpu_time_total for e in ev if e.key in ("aten::mm", "aten::addmm", "aten::bmm")}
    top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:8]
    print(json.dumps({
        "threads": torch.get_num_threads(),
        "shape": [args.batch, args.seq],
        "step_s": [round(t, 4) for t in times],
        "profiled_self_s_per_step": round(total / 1e6 / args.steps, 4),
        "products_s_per_step": {k: round(v / 1e6 / args.steps, 4) for k, v in mm.items()},
        "products_share": round(sum(mm.values()) / total, 4),
        "top_self_s_per_step": {e.key: round(e.self_cpu_time_total / 1e6 / args.steps, 4) for e in top},
    }))


if __name__ == "__main__":
    main()
