"""HF PEFT 0.21 reference cases for OFT (issue 15): `__test__/fixtures/cases/{llama_oft, llama_oft_variants,
llama_oft_neumann3, llama_oft_embedding, gpt2_oft_wte}`.

Run with torch 2.13 + transformers 5.18 + peft 0.21 (the venv of benches/README.md):

    python __test__/scripts/make_oft_fixtures.py

- `llama_oft`: OFTConfig(oft_block_size=8, target_modules=['q_proj', 'v_proj', 'down_proj'],
  init_weights=False) on the tiny Llama of `__test__/fixtures/models/llama`: HF's defaults otherwise
  (r=0, Cayley-Neumann with 5 terms, no COFT, no block sharing). `oft_R` weights start N(0, 0.1)
  (HF's init_weights=False), then are scaled by 3 so the rotations are far from the identity.
  Writes the adapter folder, `expected.safetensors` (inputs, labels, logits adapted / merged /
  unmerged / disabled / base, loss, `grad.<key>` of every `oft_R`, `greedy` ids) and `case.json`
  (counts, keys, the TS-side config JSON of a second option set).
- `llama_oft_variants`: OFTConfig(r=3, oft_block_size=0, block_share=True, use_cayley_neumann=False,
  coft=True, eps=0.5, target_modules=['q_proj', 'down_proj'], init_weights=False): r=3 does not divide
  q_proj's 64 or down_proj's 128 inputs, so HF adjusts it to 2 per layer (blocks of 32 and 64, with its
  warning); one shared block per layer (`oft_R` `[1, n]`); the exact Cayley transform (a linear solve);
  COFT projects each block's skew matrix into the `eps / sqrt(blocks)` ball, writing the projected values
  back into `oft_R` during every forward. The file holds the weights before any forward (so a loader must
  project them); `after.<key>` in `expected.safetensors` are the weights after HF's first forward.
- `llama_oft_neumann3`: `llama_oft`'s options with num_cayley_neumann_terms=3; logits only.
- `bert_bias` in `llama_oft/case.json`: OFT on the tiny BERT's query/value with bias="oft_only" / "all"
  (trainable count and saved keys: the biases HF trains and saves with the adapter).

- `llama_oft_embedding`: OFTConfig(oft_block_size=8, target_modules=['embed_tokens', 'q_proj', 'down_proj'],
  init_weights=False) on the tiny Llama (untied embeddings): HF's `oft.Embedding` rotates the looked-up rows
  `[..., 64]` blockwise (`oft_embedding_R`, 8 blocks of 8), the linears as in `llama_oft`. `oft_R` /
  `oft_embedding_R` scaled by 3. Adapter / merged / unmerged / disabled / base logits, loss, gradients, greedy
  ids.
- `gpt2_oft_wte`: OFTConfig(r=4, oft_block_size=0, target_modules=['wte'], init_weights=False; weights as
  initialised, not scaled) on the tiny GPT-2, whose `lm_head` is tied to `wte`: unmerged, only the looked-up rows are rotated (the head keeps the
  base table); merging rewrites the shared table in place (`W R`), so the merged logits also see the rotated
  head (`logits_merged` differs from `logits_adapter`; `merge_and_unload` keeps it).

HF 0.21 refuses OFT on GPT-2's `Conv1D` layers (`TypeError: Target module Conv1D(nf=192, nx=64) is not
supported. ...`); `case.json` of `llama_oft` records that message (`gpt2_refusal`).
"""

import json
import os

import fixture_common as fc

fc.start()  # PYTHONHASHSEED=0 (target_modules is a set in HF's config), in the fixtures root

import torch
from peft import OFTConfig, get_peft_model
from fixture_common import keys_of, load_tiny_llama as load


def write_case(out, info):
    """`<out>/case.json`: the case's facts, flat (as the LoHa / LoKr / VeRA cases)."""
    info = {"name": os.path.basename(out), "generator": "make_oft_fixtures.py", **info, "versions": fc.versions()}
    readme = f"{out}/README.md"
    if os.path.exists(readme):
        os.remove(readme)
    with open(f"{out}/case.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


def scale_oft(model, factor):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "oft_R" in n or "oft_embedding_R" in n:
                p.mul_(factor)


def oft_grads(model):
    """`grad.<key>` of every `oft_R` / `oft_embedding_R` weight under its on-disk key (`.default` removed)."""
    return {k: v for k, v in fc.adapter_grads(model).items() if "oft_R" in k or "oft_embedding_R" in k}


def bert_bias():
    """OFT(oft_block_size=8) on the tiny BERT's query/value (`AutoModel`, nn.Linear with biases) with
    bias="oft_only" / "all": the trainable count and the saved keys (the trained biases included)."""
    from transformers import AutoModel
    out = {}
    for bias in ["oft_only", "all"]:
        m = get_peft_model(AutoModel.from_pretrained("models/bert"), OFTConfig(oft_block_size=8, target_modules=["query", "value"], bias=bias))
        sd = __import__("peft").get_peft_model_state_dict(m)
        out[bias] = {"trainable_params": fc.param_counts(m)[0], "adapter_keys": sorted(sd)}
    return out


def llama_oft():
    seed = 1800
    torch.manual_seed(seed)
    kwargs = dict(task_type="CAUSAL_LM", oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)
    model = get_peft_model(load(), OFTConfig(**kwargs))
    scale_oft(model, 3.0)
    out = "cases/llama_oft"
    trainable, total, ids, mask, labels = fc.save_adapter_and_batch(model, out, seed)
    adapted = fc.adapter_logits(model, ids, mask)
    disabled = fc.adapter_logits(model, ids, mask, disabled=True)
    base = fc.adapter_logits(load(), ids, mask)
    loss, grads = fc.loss_and_grads(model, ids, mask, labels, oft_grads)
    greedy = fc.greedy(model, ids[:1, :5])
    merged = fc.adapter_logits(model, ids, mask, merged=True)
    unmerged = fc.adapter_logits(model, ids, mask)
    fc.save_expected(out, {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "logits_adapter": adapted, "logits_merged": merged, "logits_unmerged": unmerged,
        "logits_disabled": disabled, "logits_base": base,
        "loss": loss, "greedy": greedy, **grads,
    })
    # A second option set for the TS OFTConfig.toJSON test (not saved as an adapter).
    opts = OFTConfig(
        r=4, oft_block_size=0, module_dropout=0.1, target_modules=["q_proj", "v_proj"], bias="oft_only",
        exclude_modules=["k_proj"], init_weights=False, layers_to_transform=[0], layers_pattern="layers",
        modules_to_save=["lm_head"], coft=True, eps=1e-3, block_share=True, use_cayley_neumann=False,
        num_cayley_neumann_terms=7, task_type="CAUSAL_LM",
    )
    opts_json = opts.to_dict()
    for k in ["target_modules", "exclude_modules"]:
        opts_json[k] = sorted(opts_json[k])
    try:
        from transformers import GPT2LMHeadModel
        get_peft_model(GPT2LMHeadModel.from_pretrained("models/gpt2").eval(), OFTConfig(target_modules=["c_attn"], oft_block_size=8))
        gpt2_refusal = None
    except TypeError as e:
        gpt2_refusal = str(e)
    write_case(out, {
        "description": "OFT oft_block_size=8 on q_proj/v_proj/down_proj (in 64, 64, 128: 8, 8, 16 blocks of 8), Cayley-Neumann (5 terms), init_weights=False, oft_R scaled by 3.",
        "base_model": "models/llama",
        "seed": seed,
        "config_kwargs": kwargs,
        "trainable_params": trainable,
        "all_params": total,
        "adapter_keys": keys_of(f"{out}/adapter_model.safetensors"),
        "merged_vs_adapter_max_abs": float((merged - adapted).abs().max()),
        "adapter_vs_base_max_abs": float((adapted - base).abs().max()),
        "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4, "loss_atol": 1e-5, "grad_rtol": 1e-4},
        "options_config_kwargs": "OFTConfig(r=4, oft_block_size=0, module_dropout=0.1, target_modules=['q_proj','v_proj'], bias='oft_only', exclude_modules=['k_proj'], init_weights=False, layers_to_transform=[0], layers_pattern='layers', modules_to_save=['lm_head'], coft=True, eps=1e-3, block_share=True, use_cayley_neumann=False, num_cayley_neumann_terms=7, task_type='CAUSAL_LM')",
        "options_to_dict": json.loads(json.dumps(opts_json, default=str)),
        "gpt2_refusal": gpt2_refusal,
        "bert_bias": bert_bias(),
    })

    # The same options with 3 Neumann terms: logits only.
    seed3 = 1810
    torch.manual_seed(seed3)
    kwargs3 = dict(kwargs, num_cayley_neumann_terms=3)
    m3 = get_peft_model(load(), OFTConfig(**kwargs3))
    scale_oft(m3, 3.0)
    out3 = "cases/llama_oft_neumann3"
    _, _, ids3, mask3, _ = fc.save_adapter_and_batch(m3, out3, seed3)
    fc.save_expected(out3, {"input_ids": ids3, "attention_mask": mask3, "logits_adapter": fc.adapter_logits(m3, ids3, mask3)})
    write_case(out3, {
        "description": "llama_oft's options with num_cayley_neumann_terms=3 (R = I + 2Q + 2Q^2 + Q^3).",
        "base_model": "models/llama",
        "seed": seed3,
        "config_kwargs": kwargs3,
        "adapter_keys": keys_of(f"{out3}/adapter_model.safetensors"),
    })


def llama_oft_variants():
    seed = 1820
    torch.manual_seed(seed)
    kwargs = dict(task_type="CAUSAL_LM", r=3, oft_block_size=0, block_share=True, use_cayley_neumann=False, coft=True, eps=0.5,
                  target_modules=["q_proj", "down_proj"], init_weights=False)
    model = get_peft_model(load(), OFTConfig(**kwargs))
    out = "cases/llama_oft_variants"
    trainable, total, ids, mask, labels = fc.save_adapter_and_batch(model, out, seed)
    adapted = fc.adapter_logits(model, ids, mask)  # COFT projects the weights in place here
    after = {f"after.{k[len('grad.'):]}": v for k, v in
             {f"grad.{n.replace('.default', '')}": p.detach().clone() for n, p in model.named_parameters() if "oft_R" in n}.items()}
    disabled = fc.adapter_logits(model, ids, mask, disabled=True)
    loss, grads = fc.loss_and_grads(model, ids, mask, labels, oft_grads)
    merged = fc.adapter_logits(model, ids, mask, merged=True)
    fc.save_expected(out, {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "logits_adapter": adapted, "logits_merged": merged, "logits_disabled": disabled,
        "loss": loss, **grads, **after,
    })
    write_case(out, {
        "description": "OFT r=3 (adjusted by HF to 2 per layer: blocks of 32 on q_proj, 64 on down_proj), block_share=True, exact Cayley (use_cayley_neumann=False), coft=True with eps=0.5, init_weights=False; the file holds the weights before COFT's in-place projection, after.<key> the weights after HF's first forward.",
        "base_model": "models/llama",
        "seed": seed,
        "config_kwargs": kwargs,
        "trainable_params": trainable,
        "all_params": total,
        "adapter_keys": keys_of(f"{out}/adapter_model.safetensors"),
        "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4, "loss_atol": 1e-5, "grad_rtol": 1e-4},
    })


def load_gpt2():
    """The tiny GPT-2 of `models/gpt2` (eager attention, eval mode); `lm_head` tied to `wte`."""
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained("models/gpt2", attn_implementation="eager").eval()


def embedding_case(out, load, seed, kwargs, description, scale):
    """An OFT case on an embedding (+ linears), weights scaled by `scale`: adapter, merged,
    merge_and_unload, unmerged, disabled and base logits, loss, gradients, greedy ids (adapter and
    merged); `case.json` with counts and keys."""
    torch.manual_seed(seed)
    model = get_peft_model(load(), OFTConfig(**kwargs))
    scale_oft(model, scale)
    trainable, total, ids, mask, labels = fc.save_adapter_and_batch(model, out, seed)
    adapted = fc.adapter_logits(model, ids, mask)
    disabled = fc.adapter_logits(model, ids, mask, disabled=True)
    base = fc.adapter_logits(load(), ids, mask)
    loss, grads = fc.loss_and_grads(model, ids, mask, labels, oft_grads)
    greedy = fc.greedy(model, ids[:1, :5])
    merged = fc.adapter_logits(model, ids, mask, merged=True)
    unmerged = fc.adapter_logits(model, ids, mask)
    model.merge_adapter()
    greedy_merged = fc.greedy(model, ids[:1, :5])
    model.unmerge_adapter()
    unloaded = model.merge_and_unload()
    with torch.no_grad():
        merged_unloaded = unloaded(input_ids=ids, attention_mask=mask).logits
    fc.save_expected(out, {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "logits_adapter": adapted, "logits_merged": merged, "logits_unmerged": unmerged,
        "logits_merge_and_unload": merged_unloaded,
        "logits_disabled": disabled, "logits_base": base,
        "loss": loss, "greedy": greedy, "greedy_merged": greedy_merged, **grads,
    })
    write_case(out, {
        "description": description,
        "base_model": "models/" + ("gpt2" if load is load_gpt2 else "llama"),
        "seed": seed,
        "config_kwargs": kwargs,
        "trainable_params": trainable,
        "all_params": total,
        "adapter_keys": keys_of(f"{out}/adapter_model.safetensors"),
        "merged_vs_adapter_max_abs": float((merged - adapted).abs().max()),
        "adapter_vs_base_max_abs": float((adapted - base).abs().max()),
        "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4, "loss_atol": 1e-5, "grad_rtol": 1e-4},
    })


def oft_embedding_cases():
    embedding_case(
        "cases/llama_oft_embedding", load, 1830,
        dict(task_type="CAUSAL_LM", oft_block_size=8, target_modules=["embed_tokens", "q_proj", "down_proj"], init_weights=False),
        "OFT oft_block_size=8 on embed_tokens (oft.Embedding: the looked-up rows [.., 64] rotated by 8 blocks of 8, oft_embedding_R) and q_proj/down_proj, Cayley-Neumann (5 terms), init_weights=False, weights scaled by 3; untied embeddings.",
        3.0,
    )
    embedding_case(
        "cases/gpt2_oft_wte", load_gpt2, 1840,
        dict(task_type="CAUSAL_LM", r=4, oft_block_size=0, target_modules=["wte"], init_weights=False),
        "OFT r=4 (blocks of 16) on GPT-2's wte (oft.Embedding), init_weights=False (N(0, 0.1), not scaled: blocks of 16 scaled by 3 make the 5-term series far from orthogonal and its inverse ill-conditioned). lm_head is tied to wte: unmerged only the looked-up rows are rotated; merging rotates the shared table in place, so the merged logits also see the rotated head.",
        1.0,
    )


if __name__ == "__main__":
    llama_oft()
    llama_oft_variants()
    oft_embedding_cases()
    print("oft fixtures written")
