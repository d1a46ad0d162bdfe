"""HF PEFT's side of the Gemma 3 training benchmark (benches/gemma3-speed.sh).

  python benches/gemma3_ref.py make DIR     # a random-init gemma-3-270m-shaped model (seed 0), f32 safetensors
  python benches/gemma3_ref.py train DIR [--batch 4] [--seq 128] [--warmup 2] [--steps 6] [--threads 2]

`train` runs what `node dist/benches/train.bench.js --model DIR --only train` runs on peft-node's
side: LoRA r=8, alpha=16 on q,k,v,o (init_lora_weights=False), AdamW lr 2e-4 over the adapter,
random ids from a fixed generator, batch x seq tokens per step, `warmup` untimed steps then
`steps` timed ones; prints one JSON line with tokens/s (median, min, max) and peak RSS.
The shape is google/gemma-3-270m's config (vocab 262144, hidden 640, 18 layers, 4 heads over 1
key/value head of 256, intermediate 2048, sliding window 512 on five of every six layers); the
weights are random (transformers' init), which does not change the time of a step.
"""
import argparse
import json
import resource
import sys
import time


def config():
    from transformers import Gemma3TextConfig
    return Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=512, max_position_embeddings=32768, rms_norm_eps=1e-6,
        tie_word_embeddings=True, final_logit_softcapping=None, attn_logit_softcapping=None,
        hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )


def make(d):
    import torch
    from transformers import Gemma3ForCausalLM
    torch.manual_seed(0)
    m = Gemma3ForCausalLM(config()).to(torch.float32)
    m.save_pretrained(d, safe_serialization=True)
    print(json.dumps({"made": d, "params": sum(p.numel() for p in m.parameters())}))


def train(a):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM
    if a.threads:
        torch.set_num_threads(a.threads)
    base = Gemma3ForCausalLM.from_pretrained(a.dir, dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, base.config.vocab_size, (a.batch, a.seq), generator=g)
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    rates = sorted(a.batch * a.seq / t for t in times)
    print(json.dumps({"bench": "train", "impl": "hf-peft", "model": "gemma-3-270m-shaped", "name": "lora_r8_qkvo",
                      "shape": {"batch": a.batch, "seq": a.seq}, "threads": torch.get_num_threads(),
                      "tokens_per_s": {"median": rates[len(rates) // 2], "min": rates[0], "max": rates[-1], "n": len(rates)},
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make"); p.add_argument("dir")
    p = sub.add_parser("train"); p.add_argument("dir")
    p.add_argument("--batch", type=int, default=4); p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2); p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.dir)
    else:
        a.dir = a.dir
        train(a)


if __name__ == "__main__":
    sys.exit(main())
