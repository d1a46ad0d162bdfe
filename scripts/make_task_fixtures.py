#!/usr/bin/env python
"""Reference fixtures for decoder-model task heads (not in ../shared/fixtures), produced by
transformers 5.18 + PEFT 0.21 on CPU, fp32, fixed seeds.

    PYTHONHASHSEED=0 python scripts/make_task_fixtures.py   # writes under __test__/fixtures/

Models (built from the tiny llama / gpt2 fixtures' weights plus a seeded head):
  models/llama_seqcls   LlamaForSequenceClassification, 3 labels, pad_token_id 0
  models/gpt2_seqcls    GPT2ForSequenceClassification, 2 labels, pad_token_id 0
Cases (adapter files exactly as save_pretrained wrote them, plus expected.safetensors):
  llama_lora_seqcls     LoRA r=4 on q_proj/v_proj, SEQ_CLS (PEFT adds `score` to modules_to_save;
                        the copy is perturbed), logits base/adapter/merged, loss with labels
  llama_prompt_seqcls   prompt tuning (4 virtual tokens) SEQ_CLS: the `score` copy is saved with
                        the prompt table
  gpt2_lora_seqcls      LoRA on c_attn (fan_in_fan_out) SEQ_CLS
Inputs: batch 2, seq 7, row 1 right-padded with 2 pad tokens (pooling = last non-pad token).
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification
from peft import LoraConfig, PromptTuningConfig, get_peft_model

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "__test__", "fixtures")
os.chdir(ROOT)


def inputs(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    ids[1, 5:] = 0
    mask[1, 5:] = 0
    return ids, mask


def build(kind):
    if kind == "llama":
        cfg = json.load(open("models/llama/config.json"))
        cfg.update(num_labels=3, pad_token_id=0, architectures=["LlamaForSequenceClassification"])
        config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("transformers_version",)})
        torch.manual_seed(7)
        model = LlamaForSequenceClassification(config)
        src = "models/llama/model.safetensors"
    else:
        cfg = json.load(open("models/gpt2/config.json"))
        cfg.update(num_labels=2, pad_token_id=0, architectures=["GPT2ForSequenceClassification"])
        config = GPT2Config(**{k: v for k, v in cfg.items() if k not in ("transformers_version",)})
        torch.manual_seed(8)
        model = GPT2ForSequenceClassification(config)
        src = "models/gpt2/model.safetensors"
    from safetensors.torch import load_file
    sd = load_file(src)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert missing == ["score.weight"], missing
    model.eval()
    out = f"models/{kind}_seqcls"
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    return model, out


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def case(name, base_kind, peft_cfg, seed, merge=True):
    model, path = build(base_kind)
    model = type(model).from_pretrained(path, attn_implementation="eager")
    model.eval()
    ids, mask = inputs(model.config.vocab_size, seed)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(seed)
    pm = get_peft_model(model, peft_cfg)
    perturb(pm, seed + 1)
    pm.eval()
    labels = torch.tensor([1, 0])
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    exp = {"input_ids": ids, "attention_mask": mask, "labels": labels, "logits_base": base,
           "logits_adapter": out.logits.detach(), "loss": out.loss.detach().reshape(1)}
    with torch.no_grad():
        rows = [pm(input_ids=ids[i:i + 1, : int(mask[i].sum())]).logits for i in range(2)]
    exp["logits_rows_alone"] = torch.cat(rows, 0)
    d = f"cases/{name}"
    shutil.rmtree(d, ignore_errors=True)
    pm.save_pretrained(d)
    if merge:
        with torch.no_grad():
            merged = pm.merge_and_unload()
            exp["logits_merged"] = merged(input_ids=ids, attention_mask=mask).logits
    save_file({k: v.contiguous() for k, v in exp.items()}, f"{d}/expected.safetensors")
    info = {"name": name, "base_model": path, "generator": "scripts/make_task_fixtures.py",
            "config": json.load(open(f"{d}/adapter_config.json")),
            "inputs": "batch 2 x seq 7, row 1 right-padded with 2 pad tokens (id 0)",
            "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4, "loss_atol": 1e-5},
            "library_versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                                 "peft": __import__("peft").__version__}}
    json.dump(info, open(f"{d}/case.json", "w"), indent=2)
    print(name, {k: list(v.shape) for k, v in exp.items()})


case("llama_lora_seqcls", "llama", LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), 11)
case("llama_prompt_seqcls", "llama", PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4), 12, merge=False)
case("gpt2_lora_seqcls", "gpt2", LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False), 13)


def embedding_case():
    """llama_lora_embedding: LoRA on `embed_tokens` (lora.Embedding: lora_embedding_A/B) and
    q_proj of the causal llama; save_embedding_layers="auto" saves the targeted embedding's
    base weight as `...embed_tokens.base_layer.weight`."""
    from transformers import LlamaForCausalLM
    name = "llama_lora_embedding"
    model = LlamaForCausalLM.from_pretrained("models/llama", attn_implementation="eager")
    model.eval()
    ids, mask = inputs(model.config.vocab_size, 21)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(21)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False))
    pm.eval()
    labels = ids.masked_fill(mask == 0, -100)
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    exp = {"input_ids": ids, "attention_mask": mask, "labels": labels, "logits_base": base,
           "logits_adapter": out.logits.detach(), "loss": out.loss.detach().reshape(1)}
    out.loss.backward()
    for n, p in pm.named_parameters():
        if "lora_embedding" in n:
            exp["grad." + n.replace(".default", "")] = p.grad.detach().clone()
    d = f"cases/{name}"
    shutil.rmtree(d, ignore_errors=True)
    pm.save_pretrained(d)
    with torch.no_grad():
        exp["logits_merged"] = pm.merge_and_unload()(input_ids=ids, attention_mask=mask).logits
    save_file({k: v.contiguous() for k, v in exp.items()}, f"{d}/expected.safetensors")
    info = {"name": name, "base_model": "models/llama", "generator": "scripts/make_task_fixtures.py",
            "config": json.load(open(f"{d}/adapter_config.json")),
            "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4, "loss_atol": 1e-5},
            "library_versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                                 "peft": __import__("peft").__version__}}
    json.dump(info, open(f"{d}/case.json", "w"), indent=2)
    print(name, {k: list(v.shape) for k, v in exp.items()})


embedding_case()


def pissa_olora_cases():
    """llama_lora_pissa / llama_lora_olora: the adapters right after `init_lora_weights="pissa"` /
    `"olora"` (r=4 on q_proj/v_proj). A and B are decompositions of the base weights (unique up
    to signs, so compare products B·A); `residual.<module>` holds the mutated base weight; the
    logits equal the base model's."""
    from transformers import LlamaForCausalLM
    for init in ["pissa", "olora"]:
        name = f"llama_lora_{init}"
        model = LlamaForCausalLM.from_pretrained("models/llama", attn_implementation="eager")
        model.eval()
        ids, mask = inputs(model.config.vocab_size, 31)
        with torch.no_grad():
            base = model(input_ids=ids, attention_mask=mask).logits
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
        pm.eval()
        exp = {"input_ids": ids, "attention_mask": mask, "logits_base": base}
        with torch.no_grad():
            exp["logits_adapter"] = pm(input_ids=ids, attention_mask=mask).logits
        for n, mod in pm.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                key = n.replace("base_model.model.", "")
                exp[f"residual.{key}"] = mod.base_layer.weight.detach().clone()
                exp[f"delta.{key}"] = (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).detach() * mod.scaling["default"]
        d = f"cases/{name}"
        shutil.rmtree(d, ignore_errors=True)
        pm.save_pretrained(d)
        save_file({k: v.contiguous() for k, v in exp.items()}, f"{d}/expected.safetensors")
        info = {"name": name, "base_model": "models/llama", "generator": "scripts/make_task_fixtures.py",
                "config": json.load(open(f"{d}/adapter_config.json")),
                "tolerances": {"logits_atol": 1e-4, "logits_rtol": 1e-4},
                "library_versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                                     "peft": __import__("peft").__version__}}
        json.dump(info, open(f"{d}/case.json", "w"), indent=2)
        print(name, sorted(exp.keys())[:6])


pissa_olora_cases()
