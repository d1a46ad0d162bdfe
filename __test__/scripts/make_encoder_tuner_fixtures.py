"""HF PEFT 0.21 reference cases for the layer tuners on GPT-2, T5 and BERT (issue 15: "on GPT-2 / BERT / T5
wherever HF supports the method there"): `__test__/fixtures/cases/{gpt2,t5,bert}_<tuner>` for LoRA,
IA3, LoHa, LoKr, VeRA, OFT, AdaLoRA and HRA wherever HF applies them.

Run with torch 2.13 + transformers 5.18 + peft 0.21 (the venv of benches/README.md):

    python __test__/scripts/make_encoder_tuner_fixtures.py

- GPT-2 (`models/gpt2`, `GPT2LMHeadModel`, CAUSAL_LM): LoRA and IA3 on `c_attn` and `mlp.c_proj` (IA3:
  feed-forward); `[2, 7]` ids, row 1 padded by 2, labels = ids with -100 on the padding. Of the other
  tuners HF 0.21 applies to GPT-2's `Conv1D` layers, VeRA and AdaLoRA have their own GPT-2 cases
  (`gpt2_vera*`, `gpt2_adalora`); LoHa, LoKr, OFT and HRA refuse them.
- T5 (`models/t5`, `T5ForConditionalGeneration`, task_type SEQ_2_SEQ_LM): targets `q`, `v` (every
  self- and cross-attention) and `wo`; the batch is `input_ids` / `attention_mask` `[2, 7]` (row 1
  right-padded by 2) with `labels` `[2, 5]` (-100 on row 1's last), `decoder_input_ids` = T5's
  `_shift_right(labels)`.
- BERT (`models/bert`, `BertForSequenceClassification` with 3 labels, task_type SEQ_CLS, so HF adds
  `classifier` to modules_to_save): targets `query`, `value` and `intermediate.dense`; the batch is
  `[2, 7]` ids (row 1 padded by 2) with class labels `[2]`.
- BERT also gets trainable tokens (`bert_tt`) on `word_embeddings`, on ids the batch uses.
- T5's embedding modules (`python make_encoder_tuner_fixtures.py t5-embedding` writes only these):
  transformers 5.18 ties `encoder.embed_tokens`, `decoder.embed_tokens` and `lm_head` to `shared`
  (`_tied_weights_keys`), and the stacks call their own `embed_tokens`, never `shared`.
  `t5_tt`: trainable tokens on `shared` (HF puts layers tied to it on the three tied modules and
  saves the delta under all four keys); `t5_tt_embed`: on `embed_tokens` (two independent layers,
  nothing tied, HF's tying warning); `t5_lora_tt`: LoRA on `q`, `v` with
  `trainable_token_indices` (list form: `shared`, the tied modules follow, one key saved);
  `t5_lora_emb`: LoRA on `embed_tokens` (two `lora.Embedding`s on one table: a merge adds both
  deltas to it, so both stacks and `lm_head` see `W + ΔE + ΔD`); `t5_oft_emb`: OFT the same way;
  `t5_lora_shared`: LoRA on `shared`, which the forward never calls (adapter logits = base
  logits, no gradient: HF's `grad` is None, so no `grad.*` is written), while a merge writes into
  the one table and changes the model.
- Issue 18's decoder families (`models/{llama3,qwen3,gemma3,smollm3,phi3}`, CAUSAL_LM): IA3, LoHa, LoKr,
  VeRA, OFT, AdaLoRA and HRA on `q_proj`, `v_proj`, `down_proj` (Phi-3: the fused `qkv_proj`, `o_proj`,
  `gate_up_proj`); IA3's feed-forward module is `down_proj` (`gate_up_proj`).
- Each tuner starts from HF's non-identity init where it has one (`init_*_weights=False`); parameters
  that are still all zero (AdaLoRA's `lora_E`, the IA3 vectors' ones, OFT's small `oft_R`) are then
  drawn N(0, 0.1²) (OFT: its values times 3), and the classifier copy gets N(0, 0.05²) added: the
  values on disk are the truth.
- Writes the adapter folder, `expected.safetensors` (inputs, labels, logits adapted / merged /
  unmerged / disabled, loss, `grad.<key>` of every trainable parameter under its on-disk key) and
  `case.json` (counts, keys, tolerances).
"""

import json
import os

import fixture_common as fc

fc.start()  # PYTHONHASHSEED=0 (target_modules is a set in HF's config), in the fixtures root

import torch
from peft import (AdaLoraConfig, HRAConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, TrainableTokensConfig,
                  VeraConfig, get_peft_model)

DECODER_TUNERS = ["ia3", "loha", "lokr", "vera", "oft", "adalora", "hra"]

FAMILIES = {
    "gpt2": dict(task="CAUSAL_LM", targets=["c_attn", "mlp.c_proj"], ff=["mlp.c_proj"], tuners=["lora", "ia3"]),
    "t5": dict(task="SEQ_2_SEQ_LM", targets=["q", "v", "wo"], ff=["wo"]),
    # Issue 18's decoder families (their LoRA and prefix cases come from their own generators).
    **{f: dict(task="CAUSAL_LM", targets=["q_proj", "v_proj", "down_proj"], ff=["down_proj"], tuners=DECODER_TUNERS)
       for f in ["llama3", "qwen3", "gemma3", "smollm3"]},
    "phi3": dict(task="CAUSAL_LM", targets=["qkv_proj", "o_proj", "gate_up_proj"], ff=["gate_up_proj"], tuners=DECODER_TUNERS),
    "bert": dict(task="SEQ_CLS", targets=["query", "value", "intermediate.dense"], ff=["intermediate.dense"], embedding="word_embeddings"),
}


def configs(fam):
    f = FAMILIES[fam]
    common = dict(task_type=f["task"], target_modules=f["targets"])
    every = {
        "lora": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **common),
        "ia3": IA3Config(feedforward_modules=f["ff"], init_ia3_weights=False, **common),
        "loha": LoHaConfig(r=4, alpha=8, init_weights=False, **common),
        "lokr": LoKrConfig(r=4, alpha=8, init_weights=False, **common),
        "vera": VeraConfig(r=8, init_weights=False, **common),
        "oft": OFTConfig(oft_block_size=8, init_weights=False, **common),
        "adalora": AdaLoraConfig(init_r=4, target_r=2, total_step=10, **common),
        "hra": HRAConfig(r=4, init_weights=False, **common),
    }
    if "embedding" in f:
        every["tt"] = None  # made per case: its token indices come from the case's batch
    return {k: v for k, v in every.items() if k in f.get("tuners", every)}


def load(fam):
    if fam in ("llama3", "qwen3", "gemma3", "smollm3", "phi3"):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(f"models/{fam}", attn_implementation="eager").eval()
    if fam == "gpt2":
        from transformers import GPT2LMHeadModel
        return GPT2LMHeadModel.from_pretrained("models/gpt2", attn_implementation="eager").eval()
    if fam == "t5":
        from transformers import T5ForConditionalGeneration
        # PEFT 0.21's PeftModelForSeq2SeqLM reads a generation hook that transformers 5.18 renamed;
        # alias it (only `generate` uses it, this script does not).
        if not hasattr(T5ForConditionalGeneration, "_prepare_encoder_decoder_kwargs_for_generation"):
            T5ForConditionalGeneration._prepare_encoder_decoder_kwargs_for_generation = T5ForConditionalGeneration._prepare_text_encoder_decoder_kwargs_for_generation
        return T5ForConditionalGeneration.from_pretrained("models/t5", attn_implementation="eager").eval()
    from transformers import BertForSequenceClassification
    return BertForSequenceClassification.from_pretrained("models/bert", attn_implementation="eager").eval()


def batch(fam, seed, vocab):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    ids[1, -2:] = 0
    if fam == "t5":
        labels = torch.randint(3, vocab, (2, 5), generator=g)
        labels[1, -1] = -100
    elif FAMILIES[fam]["task"] == "CAUSAL_LM":
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.tensor([2, 0])
    return ids, mask, labels


def perturb(model, tuner):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
            elif tuner == "oft":
                p.mul_(3.0)
            elif bool((p == 0).all()) or (tuner == "ia3" and bool((p == 1).all())):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if tuner == "ia3" else 0.0))


def run(model, fam, ids, mask, labels, disabled=False, merged=False):
    kw = dict(input_ids=ids, attention_mask=mask)
    if fam == "t5":
        kw["decoder_input_ids"] = model.get_base_model()._shift_right(labels)
    with torch.no_grad():
        if disabled:
            with model.disable_adapter():
                return model(**kw).logits
        if merged:
            model.merge_adapter()
            out = model(**kw).logits
            model.unmerge_adapter()
            return out
        return model(**kw).logits


def case(fam, tuner, cfg, seed, description=None, kind=None):
    torch.manual_seed(seed)
    model = get_peft_model(load(fam), cfg)
    perturb(model, kind or tuner)
    if "tt" in tuner and tuner != "tt":
        # LoRA's token rows (and `t5_tt_embed`'s second layer) start as the base rows: move them.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "trainable_tokens_delta" in n and tuner != "tt_embed":
                    p.add_(0.5 * torch.randn_like(p))
    out = f"cases/{fam}_{tuner}"
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    card = f"{out}/README.md"
    if os.path.exists(card):
        os.remove(card)
    trainable, total = fc.param_counts(model)
    ids, mask, labels = batch(fam, seed, model.config.vocab_size)
    model.eval()
    adapted = run(model, fam, ids, mask, labels)
    disabled = run(model, fam, ids, mask, labels, disabled=True)
    model.zero_grad()
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    res = model(**kw)
    loss = res.loss  # eval mode: AdaLoRA's orthogonal regularisation is added in training mode only
    if loss.requires_grad:  # not for LoRA on T5's `shared`: nothing trainable is reached
        loss.backward()
    # On-disk keys: the classifier copy is saved as `classifier.weight` (modules_to_save dropped).
    # A parameter the forward never reaches (LoRA on T5's `shared`) has no gradient in HF.
    grads = {f"grad.{n.replace('.default', '')}".replace(".modules_to_save", ""): p.grad.detach().clone().contiguous()
             for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    merged = run(model, fam, ids, mask, labels, merged=True)
    unmerged = run(model, fam, ids, mask, labels)
    tensors = {"input_ids": ids, "attention_mask": mask, "labels": labels, "logits_adapter": adapted,
               "logits_merged": merged, "logits_unmerged": unmerged, "logits_disabled": disabled,
               "loss": loss.detach().reshape(1).float(), **grads}
    if fam == "t5":
        tensors["decoder_input_ids"] = model.get_base_model()._shift_right(labels)
    fc.save_expected(out, tensors)
    info = {
        "name": os.path.basename(out), "generator": "make_encoder_tuner_fixtures.py",
        "description": description or f"{type(cfg).__name__} on {fam} ({FAMILIES[fam]['task']}), targets {FAMILIES[fam]['targets']}, perturbed off the identity (see the generator).",
        "base_model": f"models/{fam}", "seed": seed, "peft_type": str(cfg.peft_type.value),
        "trainable_params": trainable, "all_params": total,
        "adapter_keys": fc.keys_of(f"{out}/adapter_model.safetensors"),
        "merged_vs_adapter_max_abs": float((merged - adapted).abs().max()),
        "adapter_vs_disabled_max_abs": float((adapted - disabled).abs().max()),
        "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4, "loss_atol": 1e-5, "grad_rtol": 1e-4},
        "versions": fc.versions(),
    }
    with open(f"{out}/case.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print(out, trainable, float(loss), info["adapter_vs_disabled_max_abs"], info["merged_vs_adapter_max_abs"])


def t5_embedding_cases(seed):
    """The T5 embedding cases (see the module docs), from `seed` on; the token indices of each are
    ids its own batch uses (in both rows)."""
    task = dict(task_type="SEQ_2_SEQ_LM")
    specs = [
        ("tt", lambda t: TrainableTokensConfig(target_modules=["shared"], token_indices=t, init_weights=False, **task), "tt",
         "TrainableTokensConfig on T5's `shared` (tied: encoder/decoder embed_tokens, lm_head)"),
        ("tt_embed", lambda t: TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=t, init_weights=False, **task), "tt",
         "TrainableTokensConfig on T5's `embed_tokens` (two independent layers)"),
        ("lora_tt", lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False, trainable_token_indices=t, **task), "lora",
         "LoraConfig on q, v with trainable_token_indices (list form: `shared`, tied modules follow)"),
        ("lora_emb", lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"], init_lora_weights=False, **task), "lora",
         "LoraConfig on T5's `embed_tokens` (two lora.Embedding on one table)"),
        ("oft_emb", lambda t: OFTConfig(oft_block_size=8, target_modules=["embed_tokens"], init_weights=False, **task), "oft",
         "OFTConfig on T5's `embed_tokens` (two OFT Embedding layers on one table)"),
        ("lora_shared", lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=["shared"], init_lora_weights=False, **task), "lora",
         "LoraConfig on T5's `shared`, which the forward never calls (merging still changes the one table)"),
    ]
    for tuner, make, kind, desc in specs:
        ids = batch("t5", seed, 128)[0]
        tokens = sorted({int(i) for i in ids[0, :4]} | {int(ids[1, 0])})
        case("t5", tuner, make(tokens), seed, description=desc, kind=kind)
        seed += 1
    return seed


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["t5-embedding"]:
        t5_embedding_cases(2118)
        sys.exit(0)
    seed = 2100
    for fam in ["t5", "bert", "gpt2"]:  # the seeds of the first two families stay as first written
        for tuner, cfg in configs(fam).items():
            if tuner != "tt":
                case(fam, tuner, cfg, seed)
                seed += 1
    seed += 1  # the seed of `t5_tt` (the T5 embedding cases, written by `t5_embedding_cases` from 2118)
    for fam, vocab in [("bert", 160)]:  # trainable tokens on the input embedding, added later
        ids = batch(fam, seed, vocab)[0]
        tokens = sorted({int(i) for i in ids[0, :4]} | {int(ids[1, 0])})  # ids the batch uses, in both rows
        f = FAMILIES[fam]
        cfg = TrainableTokensConfig(task_type=f["task"], target_modules=[f["embedding"]], token_indices=tokens, init_weights=False)
        case(fam, "tt", cfg, seed)
        seed += 1
    seed = 2300
    for fam in ["llama3", "qwen3", "gemma3", "smollm3", "phi3"]:  # issue 18's families, every layer tuner but LoRA
        for tuner, cfg in configs(fam).items():
            case(fam, tuner, cfg, seed)
            seed += 1
    t5_embedding_cases(2118)
    print("encoder tuner fixtures written")
