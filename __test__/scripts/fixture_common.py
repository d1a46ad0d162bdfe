"""What the fixture generators share (make_family_fixtures.py, make_gemma3_fixtures.py,
make_phi3_fixtures.py, make_smollm3_fixtures.py, make_lokr_fixtures.py, make_loha_fixtures.py,
make_vera_fixtures.py, make_weighted_fixtures.py, make_hotswap_fixtures.py, make_scale_fixtures.py,
make_tiny_llama_gguf.py): the reproducible start, the test batches, greedy generation, gradients
keyed by the on-disk adapter key, seeded adapters saved as HF writes them, the adapter / disabled /
merged logits and loss of the LoHa / VeRA cases, the LoRA and prefix-tuning cases of the decoder
families, and the GGUF helpers (the byte-level vocabulary; the Llama-layout writer shared by the
llama / llama3 / qwen3 / smollm3 GGUFs).

Importing it changes nothing; a generator calls `start()` first (before torch is imported by
anything else it needs), which re-executes it with PYTHONHASHSEED=0 and enters the fixtures root.
"""

import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")


def start(enter_root=True):
    """PEFT writes `target_modules` as list(set): fix the hash seed so that the files are
    reproducible (re-executes the script once), then (with `enter_root`) work in the fixtures
    root, since base_model_name_or_path is stored relative to it."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "PYTHONHASHSEED": "0"})
    if enter_root:
        os.chdir(ROOT)


def load_tiny_llama():
    """The tiny Llama of `models/llama` (eager attention, eval mode)."""
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained("models/llama", attn_implementation="eager").eval()


def save_seeded_adapters(out, specs, load=load_tiny_llama):
    """For each `name: (config, seed)` of `specs`: seed torch, wrap a fresh base from `load` with
    the config and write `out/name` as save_pretrained does, less the generated model card."""
    import torch
    from peft import get_peft_model
    for name, (cfg, seed) in specs.items():
        torch.manual_seed(seed)
        m = get_peft_model(load(), cfg)
        m.save_pretrained(f"{out}/{name}")
        card = f"{out}/{name}/README.md"
        if os.path.exists(card):
            os.remove(card)


def versions(gguf=False):
    import peft
    import torch
    import transformers
    v = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    if gguf:
        v["gguf"] = "PyPI gguf"
    return v


def padded_inputs(seed, vocab, low, b, s):
    """A `[b, s]` batch of ids in [low, vocab) whose second row ends in 3 pad tokens (id 0, mask 0)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, -3:] = 0
    ids[1, -3:] = 0
    return ids, mask


def lycoris_batch(seed, vocab):
    """The LoKr / LoHa cases' batch: `[2, 7]` ids in [3, vocab) from a generator seeded `seed + 1`,
    the second row ending in 2 pad tokens; returns the generator too (LoKr draws its prompts from it)."""
    import torch
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, vocab, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    ids[1, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels, g


def param_counts(model):
    """(trainable, all) parameter counts."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))


def greedy(model, ids, use_cache=True):
    """6 greedy tokens after `ids` (no eos stop, pad 0)."""
    import torch
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              num_beams=1, use_cache=use_cache, eos_token_id=None, pad_token_id=0)


def lora_grads(model):
    """`grad.<key>` of every parameter with a gradient, `.default.weight` → `.weight` (LoRA's on-disk keys)."""
    return {"grad." + n.replace(".default.weight", ".weight"): p.grad.detach().clone()
            for n, p in model.named_parameters() if p.grad is not None}


def adapter_grads(model):
    """`grad.<key>` of every trainable parameter, `.default` removed (LyCORIS' on-disk keys), contiguous."""
    return {f"grad.{n.replace('.default', '')}": p.grad.detach().clone().contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def keys_of(path):
    """The sorted tensor keys of a safetensors file."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return sorted(f.keys())


def save_adapter_and_batch(model, out, seed):
    """Write `out` as `model.save_pretrained` does (the folder made first), then put the model in eval
    mode; returns its (trainable, all) parameter counts and the `lycoris_batch(seed, …)` ids, mask, labels."""
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    trainable, total = param_counts(model)
    ids, mask, labels, _ = lycoris_batch(seed, model.config.vocab_size)
    model.eval()
    return trainable, total, ids, mask, labels


def adapter_logits(model, ids, mask, disabled=False, merged=False):
    """No-grad logits of `model` on the batch: as is, with its adapter disabled (`disable_adapter()`),
    or with the adapter merged (`merge_adapter()`, unmerged again afterwards)."""
    import torch
    with torch.no_grad():
        if disabled:
            with model.disable_adapter():
                return model(input_ids=ids, attention_mask=mask).logits
        if merged:
            model.merge_adapter()
            out = model(input_ids=ids, attention_mask=mask).logits
            model.unmerge_adapter()
            return out
        return model(input_ids=ids, attention_mask=mask).logits


def loss_and_grads(model, ids, mask, labels, grads=adapter_grads):
    """Zero the gradients, backpropagate the loss on the batch (autograd on, the model's mode as is);
    returns the loss as a float `[1]` tensor and `grads(model)`."""
    model.zero_grad()
    res = model(input_ids=ids, attention_mask=mask, labels=labels)
    res.loss.backward()
    return res.loss.detach().reshape(1).float(), grads(model)


def save_expected(out, tensors):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/expected.safetensors")


def lora_case(out, load, inputs, seed, target_modules):
    """A decoder family's LoRA case (r=8, alpha=16, init_lora_weights=False) in `cases/<out>`: base /
    adapter / disabled / merged logits, loss, LoRA gradients, greedy ids (base, adapter, merged).
    `load()` gives a fresh base model, `inputs(seed)` the batch."""
    import torch
    from peft import LoraConfig, get_peft_model
    out = f"cases/{out}"
    os.makedirs(out, exist_ok=True)
    ids, mask = inputs(seed)
    base_model = load()
    with torch.no_grad():
        logits_base = base_model(input_ids=ids, attention_mask=mask).logits
    gen_ids = ids[:1, :7].clone()
    gen_base = greedy(base_model, gen_ids)
    torch.manual_seed(seed)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=target_modules, lora_dropout=0.0,
                     init_lora_weights=False)
    pm = get_peft_model(load(), cfg).eval()
    pm.save_pretrained(out)
    with torch.no_grad():
        logits_adapter = pm(input_ids=ids, attention_mask=mask).logits
        with pm.disable_adapter():
            logits_disabled = pm(input_ids=ids, attention_mask=mask).logits
    gen_adapter = greedy(pm, gen_ids)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.enable_grad():
        pm.zero_grad(set_to_none=True)
        o = pm(input_ids=ids, attention_mask=mask, labels=labels)
        o.loss.backward()
    grads = lora_grads(pm)
    merged = pm.merge_and_unload().eval()
    with torch.no_grad():
        logits_merged = merged(input_ids=ids, attention_mask=mask).logits
    gen_merged = greedy(merged, gen_ids)
    save_expected(out, {"input_ids": ids, "attention_mask": mask, "labels": labels, "loss": o.loss.detach().reshape(1),
                        "logits_base": logits_base, "logits_adapter": logits_adapter, "logits_disabled": logits_disabled,
                        "logits_merged": logits_merged, "generate_input_ids": gen_ids, "generate_base": gen_base,
                        "generate_adapter": gen_adapter, "generate_merged": gen_merged, **grads})
    return {"adapter_vs_base_max_abs": float((logits_adapter - logits_base).abs().max()),
            "disabled_vs_base_max_abs": float((logits_disabled - logits_base).abs().max()),
            "grad_keys": sorted(grads)}


def prefix_case(out, load, inputs, seed, num_virtual_tokens):
    """A decoder family's prefix-tuning case in `cases/<out>`: adapter logits and greedy ids."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model
    out = f"cases/{out}"
    os.makedirs(out, exist_ok=True)
    ids, mask = inputs(seed)
    torch.manual_seed(seed)
    pm = get_peft_model(load(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)).eval()
    pm.save_pretrained(out)
    with torch.no_grad():
        logits_adapter = pm(input_ids=ids, attention_mask=mask).logits
        logits_base = load()(input_ids=ids, attention_mask=mask).logits
    gen_ids = ids[:1, :7].clone()
    save_expected(out, {"input_ids": ids, "attention_mask": mask, "logits_base": logits_base,
                        "logits_adapter": logits_adapter, "generate_input_ids": gen_ids,
                        "generate_adapter": greedy(pm, gen_ids)})
    return {"adapter_vs_base_max_abs": float((logits_adapter - logits_base).abs().max())}


def write_case_json(case, generator, observed, versions):
    import json
    with open(f"cases/{case}/case.json", "w") as f:
        json.dump({"name": case, "generator": generator, "observed": observed,
                   "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4}, "versions": versions}, f, indent=1)


# --- GGUF (PyPI gguf = llama.cpp's gguf-py) ---------------------------------------------------

def byte_tokens():
    """A byte-level BPE (`gpt2`) vocabulary of 256: <pad> <s> </s>, 252 byte tokens, "Ġt"."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = {b: chr(c) for b, c in zip(bs, cs)}
    order = [10] + list(range(32, 127)) + list(range(161, 173)) + list(range(174, 256)) + list(range(0, 10)) + \
        list(range(11, 32)) + list(range(127, 161)) + [173]
    return ["<pad>", "<s>", "</s>"] + [table[b] for b in order[:252]] + ["Ġt"]


def permute(x, n_head):
    """convert_hf_to_gguf.py's q/k row permutation of Llama."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def finish_gguf(g):
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()


def add_byte_vocab(g, cfg, tokens):
    """The byte-level BPE (`gpt2`) vocabulary `tokens` (the first 3 control, one merge "Ġ t") and the
    bos / eos / pad ids of `cfg`."""
    import gguf
    g.add_tokenizer_model("gpt2")
    g.add_tokenizer_pre("gpt-2")
    g.add_token_list(tokens)
    g.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    g.add_token_merges(["Ġ t"])
    g.add_bos_token_id(cfg["bos_token_id"])
    g.add_eos_token_id(cfg["eos_token_id"])
    g.add_pad_token_id(cfg["pad_token_id"])


def llama3_rope_factors(cfg):
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: llama.cpp divides each RoPE frequency by its factor."""
    import math
    import numpy as np
    import torch
    rp = cfg["rope_parameters"]
    base, dim = rp["rope_theta"], cfg["head_dim"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
    low_wl, high_wl = old / lo, old / hi
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old / wl - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_decoder_gguf(name, arch, path=None, key_value_length=True):
    """`models/<name>.gguf` (or `path`) from the HF folder `models/<name>`, as convert_hf_to_gguf.py's
    `LlamaModel` (and its subclasses) writes a Llama-layout decoder: arch `llama` and `smollm3`
    (`SmolLM3Model(LlamaModel)`) with q/k rows permuted, `qwen3` without (NEOX RoPE) and with
    attn_q_norm / attn_k_norm; key/value lengths only where config.json states `head_dim` (and
    `key_value_length`: make_tiny_llama_gguf.py's llama.gguf has none); llama3 scaling as
    `rope_freqs.weight`; no `output.weight` when tied; the byte-level BPE (`gpt2`) vocabulary of
    `byte_tokens()`."""
    import json
    import numpy as np
    import gguf
    from safetensors.numpy import load_file
    cfg = json.load(open(f"models/{name}/config.json"))
    w = load_file(f"models/{name}/model.safetensors")
    H, NH, NKV = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    HD = cfg.get("head_dim") or H // NH
    g = gguf.GGUFWriter(path or f"models/{name}.gguf", arch)
    g.add_name(f"tiny-{name}-fixture")
    g.add_context_length(cfg["max_position_embeddings"])
    g.add_embedding_length(H)
    g.add_block_count(cfg["num_hidden_layers"])
    g.add_feed_forward_length(cfg["intermediate_size"])
    g.add_rope_dimension_count(HD)
    g.add_head_count(NH)
    g.add_head_count_kv(NKV)
    if key_value_length and "head_dim" in cfg:
        g.add_key_length(HD)
        g.add_value_length(HD)
    g.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    g.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    g.add_vocab_size(cfg["vocab_size"])
    g.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_byte_vocab(g, cfg, byte_tokens())
    g.add_add_bos_token(False)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    if arch == "qwen3":
        names.update({"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})
    permuted = arch in ("llama", "smollm3")
    if cfg["rope_parameters"].get("rope_type") == "llama3":
        g.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    g.add_tensor("token_embd.weight", w["model.embed_tokens.weight"].astype(np.float32))
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in names.items():
            t = w[f"model.layers.{i}.{hf}.weight"].astype(np.float32)
            if permuted and gg == "attn_q":
                t = permute(t, NH)
            elif permuted and gg == "attn_k":
                t = permute(t, NKV)
            g.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    g.add_tensor("output_norm.weight", w["model.norm.weight"].astype(np.float32))
    if not cfg.get("tie_word_embeddings"):
        g.add_tensor("output.weight", w["lm_head.weight"].astype(np.float32))
    finish_gguf(g)
