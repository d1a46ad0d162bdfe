"""HF PEFT 0.21 reference cases for the HF-compatibility gaps of issue 14 (bias='all' on models
whose non-targeted modules have biases, modules_to_save overlapping target_modules, tied
embeddings, layers_to_transform errors, partly loaded adapters).

Run with torch 2.13 + transformers 5.18 + peft 0.21 from PyPI (see benches/README.md for the venv):

    python __test__/scripts/make_compat_fixtures.py

It writes `__test__/fixtures/cases/compat_*` (adapter files as PeftModel.save_pretrained wrote
them, `expected.safetensors` with inputs and logits, `case.json` with counts, keys and HF's
messages). Base models are the shared tiny models in `__test__/fixtures/models/`.
"""

import json
import os
import warnings

import torch
from safetensors.torch import save_file
from transformers import BertForSequenceClassification, GPT2LMHeadModel, LlamaForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
os.chdir(ROOT)  # base_model_name_or_path is stored relative to the fixtures root


def load(cls, name):
    return cls.from_pretrained(f"models/{name}", attn_implementation="eager").eval()


def inputs(seed, vocab, b=2, s=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, -2:] = 0
    ids[1, -2:] = 0
    return ids, mask


def counts(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def run_case(name, cls, base, cfg, perturb, seed, note):
    out = f"cases/{name}"
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    model = get_peft_model(load(cls, base), cfg)
    g = torch.Generator().manual_seed(seed + 1)
    touched = []
    with torch.no_grad():
        for n, p in model.named_parameters():
            if perturb(n, p):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
                touched.append(n)
    trainable_names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    trainable, total = counts(model)
    model.save_pretrained(out)
    vocab = model.config.vocab_size
    ids, mask = inputs(seed, vocab)
    model.eval()
    with torch.no_grad():
        adapter = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids, attention_mask=mask).logits
        base_logits = load(cls, base)(input_ids=ids, attention_mask=mask).logits
    # A fresh load reproduces the adapter (the case is self-consistent).
    with torch.no_grad():
        re = PeftModel.from_pretrained(load(cls, base), out).eval()
        re_adapter = re(input_ids=ids, attention_mask=mask).logits
        with re.disable_adapter():
            re_disabled = re(input_ids=ids, attention_mask=mask).logits
    save_file(
        {
            "input_ids": ids,
            "attention_mask": mask,
            "logits_adapter": adapter.contiguous(),
            "logits_disabled": disabled.contiguous(),
            "logits_base": base_logits.contiguous(),
            "logits_reloaded_adapter": re_adapter.contiguous(),
            "logits_reloaded_disabled": re_disabled.contiguous(),
        },
        f"{out}/expected.safetensors",
    )
    from safetensors import safe_open

    with safe_open(f"{out}/adapter_model.safetensors", "pt") as f:
        keys = sorted(f.keys())
    # What HF's (non-strict) load reports for this file.
    from peft import PeftConfig
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    torch.manual_seed(seed)
    fresh = get_peft_model(load(cls, base), PeftConfig.from_pretrained(out))
    res = set_peft_model_state_dict(fresh, load_peft_weights(out))
    load_result = {
        "unexpected_keys": sorted(res.unexpected_keys),
        "missing_adapter_keys": sorted(k for k in res.missing_keys if "lora_" in k or "modules_to_save" in k),
    }
    info = {
        "name": name,
        "description": note,
        "base_model": f"models/{base}",
        "seed": seed,
        "trainable_params": trainable,
        "all_params": total,
        "trainable_parameter_names": trainable_names,
        "perturbed": touched,
        "adapter_keys": keys,
        "hf_load_result": load_result,
        "reload_max_abs": {
            "adapter": float((re_adapter - adapter).abs().max()),
            "disabled": float((re_disabled - disabled).abs().max()),
        },
        "disabled_vs_base_max_abs": float((disabled - base_logits).abs().max()),
        "adapter_vs_base_max_abs": float((adapter - base_logits).abs().max()),
        "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__, "transformers": __import__("transformers").__version__},
    }
    with open(f"{out}/case.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    readme = f"{out}/README.md"
    if os.path.exists(readme):
        os.remove(readme)  # PEFT's model card: irrelevant here, and it embeds dates
    print(name, "trainable", trainable, "disabled-vs-base", info["disabled_vs_base_max_abs"])


def error_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def warnings_of(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn()
    return [str(x.message) for x in w]


def main():
    # 1. bias='all' on GPT-2: every bias of the model (Conv1D of c_proj/c_fc, LayerNorms) trains
    #    and is saved; on load the biases go into the base, so disabling keeps them.
    run_case(
        "compat_gpt2_bias_all",
        GPT2LMHeadModel,
        "gpt2",
        LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias="all", lora_dropout=0.0, init_lora_weights=False),
        lambda n, p: n.endswith(".bias"),
        2001,
        "GPT-2 LoRA on c_attn with bias='all': every bias of the model perturbed and saved",
    )
    # 2. bias='all' on BERT sequence classification (biases in embeddings LayerNorm, attention
    #    output, intermediate, pooler; classifier is a modules_to_save copy).
    run_case(
        "compat_bert_bias_all",
        BertForSequenceClassification,
        "bert",
        LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], bias="all", lora_dropout=0.0, init_lora_weights=False),
        lambda n, p: n.endswith(".bias"),
        2002,
        "BERT SEQ_CLS LoRA on query/value with bias='all': every bias perturbed and saved",
    )
    # 3. modules_to_save overlapping target_modules: HF excludes the module from LoRA
    #    (`_ExcludedModule`) and wraps it as a trainable copy.
    run_case(
        "compat_llama_mts_overlap",
        LlamaForCausalLM,
        "llama",
        LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["q_proj"], lora_dropout=0.0, init_lora_weights=False),
        lambda n, p: ".modules_to_save." in n,
        2003,
        "LoRA on q_proj/v_proj with modules_to_save=['q_proj']: q_proj gets no LoRA, only a (perturbed) copy",
    )
    messages = {}
    # Every target also in modules_to_save: HF's error.
    messages["mts_covers_all_targets"] = error_of(
        lambda: get_peft_model(load(LlamaForCausalLM, "llama"), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["q_proj"]))
    )
    # layers_to_transform naming no existing layer.
    messages["layers_to_transform_missing"] = error_of(
        lambda: get_peft_model(load(LlamaForCausalLM, "llama"), LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[5], layers_pattern="layers"))
    )
    # Tied embeddings (GPT-2 ties lm_head to wte).
    messages["tied_mts_warning"] = warnings_of(
        lambda: get_peft_model(load(GPT2LMHeadModel, "gpt2"), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["wte"]))
    )
    messages["tied_mts_lm_head_warning"] = warnings_of(
        lambda: get_peft_model(load(GPT2LMHeadModel, "gpt2"), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["lm_head"]))
    )
    messages["tied_target_lm_head_warning"] = warnings_of(
        lambda: get_peft_model(load(GPT2LMHeadModel, "gpt2"), LoraConfig(r=4, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True))
    )
    messages["ensure_weight_tying_no_tied_warning"] = warnings_of(
        lambda: get_peft_model(load(LlamaForCausalLM, "llama"), LoraConfig(r=4, target_modules=["q_proj"], ensure_weight_tying=True))
    )
    messages["ensure_weight_tying_nothing_targeted_warning"] = warnings_of(
        lambda: get_peft_model(load(GPT2LMHeadModel, "gpt2"), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, ensure_weight_tying=True))
    )
    # A partly loaded adapter: one tensor removed from the file, one foreign tensor added.
    from safetensors.torch import load_file

    partial = "cases/compat_llama_partial"
    os.makedirs(partial, exist_ok=True)
    src = "cases/llama_lora_qv"
    with open(f"{src}/adapter_config.json") as f:
        cfg = f.read()
    with open(f"{partial}/adapter_config.json", "w") as f:
        f.write(cfg)
    t = load_file(f"{src}/adapter_model.safetensors")
    t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(8, 64)
    save_file(t, f"{partial}/adapter_model.safetensors", metadata={"format": "pt"})

    def load_partial():
        m = PeftModel.from_pretrained(load(LlamaForCausalLM, "llama"), partial)
        r = m.load_adapter(partial, "second")
        messages["partial_load_adapter_result"] = {"missing_keys": sorted(r.missing_keys), "unexpected_keys": sorted(r.unexpected_keys)}

    messages["partial_from_pretrained_warnings"] = warnings_of(load_partial)
    with open("cases/compat_messages.json", "w") as f:
        json.dump(messages, f, indent=2)
        f.write("\n")
    print(json.dumps(messages, indent=2))


if __name__ == "__main__":
    main()
