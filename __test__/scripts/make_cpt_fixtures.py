"""HF PEFT 0.21 reference case for CPT, context-aware prompt tuning (Blau et al. 2024,
arXiv 2410.17222; issue 15): `__test__/fixtures/cases/llama_cpt`.

Run with torch 2.13 + transformers 5.18 + peft 0.21 (the venv of benches/README.md):

    python __test__/scripts/make_cpt_fixtures.py

CPTConfig(cpt_token_ids=<10 ids>, cpt_tokens_type_mask=[1,2,2,3,4, 5,6,6,7,8] (two in-context
examples: input template 1/5, input 2/6, output template 3/7, label 4/8), opt_weighted_loss_type
"decay", opt_loss_decay_factor=0.8, opt_projection_epsilon=0.2, opt_projection_format_epsilon=0.1,
task_type CAUSAL_LM) on the tiny Llama of `__test__/fixtures/models/llama`.

- Training: `STEPS` steps of torch.optim.AdamW(lr=0.01, weight_decay=0) on the batch below with
  the CPT loss (the delta projection happens in CPTEmbedding.forward, i.e. before every step after
  the first; the gradient of label-type rows is masked by HF's backward hook). `train_loss`
  holds the loss of each step, `train_delta` / `train_table` the projected delta and the prompt
  table after the last step.
- The trained model (eval mode): `logits_trained`, the CPT loss with "decay" and with "none" and
  the gradient of `delta_embedding.weight` (label-type rows masked to 0) for both.
- The trained adapter is saved (`adapter_config.json`, `adapter_model.safetensors`:
  `prompt_embeddings` = embedding + projected delta), then reloaded (HF refuses is_trainable for
  prompt learning; it puts the saved table into `embedding` beside a zero delta): `logits_adapter`,
  `greedy` ids (with and without cache: equal).
- `case.json`: parameter counts (HF get_nb_trainable_parameters of the fresh and of the loaded
  model), the config's to_dict of a second option set, HF's refusals.

`gpt2_cpt`: the same config on the tiny GPT-2 of `__test__/fixtures/models/gpt2` (learned
position embeddings; batch ids below its vocabulary of 192): the trajectory (`train_loss`,
`train_table`), the saved adapter, `logits_adapter` and `greedy` of the reloaded adapter,
`loss_decay` and the masked gradient of the trained model.
"""

import json
import os

import fixture_common as fc

fc.start()  # in the fixtures root

import torch
from peft import CPTConfig, PeftModel, get_peft_model
from fixture_common import keys_of, load_tiny_llama as load

STEPS = 4
OUT = "cases/llama_cpt"
TOKEN_IDS = [11, 23, 37, 5, 90, 11, 41, 52, 5, 77]
TYPES = [1, 2, 2, 3, 4, 5, 6, 6, 7, 8]


def batch(vocab=256):
    """[2, 7]: row 0 = template, input x2, output template, label x2, template; row 1 ends in
    2 pads (type 0, mask 0, label -100). Types: 1 input template, 2 input, 3 output template, 4 label."""
    g = torch.Generator().manual_seed(1901)
    ids = torch.randint(3, vocab, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    ids[1, -2:] = 0
    types = torch.tensor([[1, 2, 2, 3, 4, 4, 1], [1, 2, 3, 4, 4, 0, 0]])
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels, types


def cfg(**kw):
    return CPTConfig(cpt_token_ids=TOKEN_IDS, cpt_tokens_type_mask=TYPES, opt_weighted_loss_type="decay",
                     opt_loss_decay_factor=0.8, opt_projection_epsilon=0.2, opt_projection_format_epsilon=0.1,
                     task_type="CAUSAL_LM", **kw)


def run(model, ids, mask, labels, types):
    return model(input_ids=ids, attention_mask=mask, labels=labels, input_type_mask=types.clone())


def main():
    torch.manual_seed(1900)
    ids, mask, labels, types = batch()
    model = get_peft_model(load(), cfg())
    fresh_counts = model.get_nb_trainable_parameters()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        out = run(model, ids, mask, labels, types)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    model.eval()
    enc = model.prompt_encoder["default"]
    with torch.no_grad():
        delta = enc.get_projection().clone()
        table = model.get_prompt_embedding_to_save("default").clone()
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT)
    if os.path.exists(f"{OUT}/README.md"):
        os.remove(f"{OUT}/README.md")

    # Reload (HF refuses is_trainable=True for prompt learning): the saved table goes into
    # `embedding`, the delta is zero.
    loaded = PeftModel.from_pretrained(load(), OUT)
    loaded_counts = loaded.get_nb_trainable_parameters()
    loaded.eval()
    with torch.no_grad():
        logits = loaded(input_ids=ids, attention_mask=mask).logits
        logits_typed = run(loaded, ids, mask, labels, types).logits
    assert torch.equal(logits, logits_typed)
    greedy = fc.greedy(loaded, ids[:1, :5])
    greedy_nocache = fc.greedy(loaded, ids[:1, :5], use_cache=False)
    assert torch.equal(greedy, greedy_nocache)
    # Loss and gradient of the trained model (its delta is `train_delta`), in eval mode.
    res = {}
    with torch.no_grad():
        res["logits_trained"] = model(input_ids=ids, attention_mask=mask).logits
    for kind in ["decay", "none"]:
        model.peft_config["default"].opt_weighted_loss_type = kind
        model.zero_grad()
        out = run(model, ids, mask, labels, types)
        out.loss.backward()
        res[f"loss_{kind}"] = out.loss.detach().reshape(1).float()
        res[f"grad_{kind}.prompt_encoder.default.delta_embedding.weight"] = enc_grad(model)
    model.peft_config["default"].opt_weighted_loss_type = "decay"
    base_logits = fc.adapter_logits(load(), ids, mask)

    fc.save_expected(OUT, {
        "input_ids": ids, "attention_mask": mask, "labels": labels, "input_type_mask": types,
        "logits_adapter": logits, "logits_base": base_logits, "greedy": greedy,
        "train_loss": torch.tensor(losses, dtype=torch.float32), "train_delta": delta, "train_table": table,
        **res,
    })

    refusals = {}
    for name, kw in {
        "task_type": dict(cpt_token_ids=[1, 2], task_type="SEQ_CLS"),
        "lengths": dict(cpt_token_ids=[1, 2], cpt_mask=[1], task_type="CAUSAL_LM"),
        "type_lengths": dict(cpt_token_ids=[1, 2], cpt_tokens_type_mask=[1, 2, 3], task_type="CAUSAL_LM"),
    }.items():
        try:
            CPTConfig(**kw)
            refusals[name] = None
        except ValueError as e:
            refusals[name] = str(e)
    default = CPTConfig(task_type="CAUSAL_LM").to_dict()
    opts = CPTConfig(cpt_token_ids=[4, 5, 6], cpt_mask=[1, 1, 0], cpt_tokens_type_mask=[1, 2, 4], opt_weighted_loss_type="decay",
                     opt_loss_decay_factor=0.5, opt_projection_epsilon=0.3, opt_projection_format_epsilon=0.05,
                     tokenizer_name_or_path="models/llama", task_type="CAUSAL_LM").to_dict()
    info = {
        "name": "llama_cpt", "generator": "make_cpt_fixtures.py",
        "description": "CPT with two in-context examples (types 1..8), decay loss (0.8), projection eps 0.2 / format 0.1, trained 4 AdamW steps (lr 0.01) in HF; then saved and reloaded (HF: inference only).",
        "base_model": "models/llama",
        "cpt_token_ids": TOKEN_IDS, "cpt_tokens_type_mask": TYPES, "steps": STEPS, "lr": 0.01,
        "fresh_trainable_params": fresh_counts[0], "fresh_all_params": fresh_counts[1],
        "trainable_params": loaded_counts[0], "all_params": loaded_counts[1],
        "adapter_keys": keys_of(f"{OUT}/adapter_model.safetensors"),
        "adapter_vs_base_max_abs": float((logits[:, len(TOKEN_IDS):] - base_logits).abs().max()),
        "refusals": refusals,
        "default_to_dict": json.loads(json.dumps(default, default=str)),
        "options_to_dict": json.loads(json.dumps(opts, default=str)),
        "tolerances": {"logits_atol": 1e-4, "loss_atol": 1e-5, "grad_rtol": 1e-4},
        "versions": fc.versions(),
    }
    with open(f"{OUT}/case.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


def enc_grad(model):
    return model.prompt_encoder["default"].delta_embedding.weight.grad.detach().clone()


def gpt2_case():
    from transformers import GPT2LMHeadModel
    load_gpt2 = lambda: GPT2LMHeadModel.from_pretrained("models/gpt2", attn_implementation="eager").eval()  # noqa: E731
    out_dir = "cases/gpt2_cpt"
    torch.manual_seed(1910)
    ids, mask, labels, types = batch(vocab=192)
    model = get_peft_model(load_gpt2(), cfg())
    counts = model.get_nb_trainable_parameters()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        out = run(model, ids, mask, labels, types)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    model.eval()
    with torch.no_grad():
        table = model.get_prompt_embedding_to_save("default").clone()
        delta = model.prompt_encoder["default"].get_projection().clone()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    if os.path.exists(f"{out_dir}/README.md"):
        os.remove(f"{out_dir}/README.md")
    model.zero_grad()
    out = run(model, ids, mask, labels, types)
    out.loss.backward()
    res = {"loss_decay": out.loss.detach().reshape(1).float(),
           "grad_decay.prompt_encoder.default.delta_embedding.weight": enc_grad(model)}
    loaded = PeftModel.from_pretrained(load_gpt2(), out_dir).eval()
    with torch.no_grad():
        logits = loaded(input_ids=ids, attention_mask=mask).logits
    greedy = fc.greedy(loaded, ids[:1, :5])
    assert torch.equal(greedy, fc.greedy(loaded, ids[:1, :5], use_cache=False))
    fc.save_expected(out_dir, {
        "input_ids": ids, "attention_mask": mask, "labels": labels, "input_type_mask": types,
        "logits_adapter": logits, "greedy": greedy, "train_loss": torch.tensor(losses, dtype=torch.float32),
        "train_delta": delta, "train_table": table, **res,
    })
    info = {
        "name": "gpt2_cpt", "generator": "make_cpt_fixtures.py",
        "description": "llama_cpt's CPT config on the tiny GPT-2, trained 4 AdamW steps (lr 0.01) in HF, saved, reloaded.",
        "base_model": "models/gpt2", "steps": STEPS, "lr": 0.01,
        "fresh_trainable_params": counts[0], "fresh_all_params": counts[1],
        "adapter_keys": keys_of(f"{out_dir}/adapter_model.safetensors"),
        "tolerances": {"logits_atol": 1e-4, "loss_atol": 1e-5, "grad_rtol": 1e-4},
        "versions": fc.versions(),
    }
    with open(f"{out_dir}/case.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
    gpt2_case()
