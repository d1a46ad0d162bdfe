"""HF PEFT 0.21 reference for two HF-compatibility details of issue 14: the `auto_mapping` that
`PeftModel.save_pretrained` writes into adapter_config.json when the config has no `task_type`
(the base model's class and its transformers module), and the module names `get_layer_status`
reports for trainable tokens (standalone: the embedding itself; under LoRA's
`trainable_token_indices`: the wrapper's `<m>.token_adapter`).

Run with torch 2.13 + transformers 5.18 + peft 0.21 from PyPI:

    python __test__/scripts/make_save_status_fixtures.py

It writes `__test__/fixtures/cases/compat_save_status.json`:
`{"configs": {<case>: adapter_config.json object of a fresh save}, "layer_status": {<case>:
[[name, module_type], ...]}}`. Base models are the tiny models of `__test__/fixtures/models/`.
"""

import json
import os
import tempfile

from fixture_common import start

start()

from transformers import AutoModelForCausalLM  # noqa: E402
from peft import IA3Config, LoraConfig, PeftConfig, get_peft_model  # noqa: E402


def fresh_config(cls, model, cfg):
    pm = get_peft_model(cls.from_pretrained(f"models/{model}").eval(), cfg)
    d = tempfile.mkdtemp()
    pm.save_pretrained(d)
    with open(os.path.join(d, "adapter_config.json")) as f:
        return json.load(f)


def main():
    configs = {
        "llama_lora": fresh_config(AutoModelForCausalLM, "llama", LoraConfig(r=2, target_modules=["q_proj", "v_proj"])),
        "gpt2_lora": fresh_config(AutoModelForCausalLM, "gpt2", LoraConfig(r=2, target_modules=["c_attn"])),
        "llama_ia3": fresh_config(AutoModelForCausalLM, "llama", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
        "gemma3_lora": fresh_config(AutoModelForCausalLM, "gemma3", LoraConfig(r=2, target_modules=["q_proj"])),
        "llama_lora_causal": fresh_config(AutoModelForCausalLM, "llama", LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")),
    }
    status = {}
    for case, model in [("llama_tt", "llama"), ("gpt2_tt", "gpt2"), ("llama_lora_tt", "llama"), ("gpt2_lora_tt", "gpt2")]:
        cfg = PeftConfig.from_pretrained(f"cases/{case}")
        pm = get_peft_model(AutoModelForCausalLM.from_pretrained(f"models/{model}").eval(), cfg)
        status[case] = [[s.name, s.module_type] for s in pm.get_layer_status() if "TrainableTokens" in s.module_type]
    with open("cases/compat_save_status.json", "w") as f:
        json.dump({"configs": configs, "layer_status": status}, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
