"""HF PEFT 0.21 reference for `PeftModel.set_requires_grad` (HF: enable or disable gradients on
the given adapters until the next `set_adapter`; refused for prompt learning): a scripted
sequence of calls on the tiny Llama with LoRA adapters `a` (q/v, r 2, active), `b` (q, r 4),
`c` (v, r 2, added later) and `m` (LoRA on q with `modules_to_save` ["lm_head"], loaded with
`is_trainable=False`), and after each call the model status' `requires_grad` and
`get_nb_trainable_parameters()`; then `set_adapter` on the frozen `m`, with `inference_mode=True`, and
`PeftModel.from_pretrained` (frozen) before and after `set_adapter("default")`.

Run with torch 2.13 + transformers 5.18 + peft 0.21 from PyPI:

    python __test__/scripts/make_requires_grad_fixtures.py

It writes `__test__/fixtures/cases/requires_grad.json`: `{"steps": [{"call": [method, args...],
"requires_grad": {adapter: bool | "irregular"}, "nb_trainable": [trainable, all]}, ...],
"prompt_error": <HF's TypeError message for a prompt-tuning model>, "frozen_then_set": [status
requires_grad, counts, status requires_grad, counts]}`.
"""

import json
import tempfile

from fixture_common import start

start()

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model  # noqa: E402


def main():
    torch.manual_seed(0)
    # `m`: an adapter with a modules_to_save copy, saved and loaded back frozen
    src = get_peft_model(AutoModelForCausalLM.from_pretrained("models/llama").eval(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    mdir = tempfile.mkdtemp()
    src.save_pretrained(mdir)

    pm = get_peft_model(AutoModelForCausalLM.from_pretrained("models/llama").eval(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    steps = []

    def record(call):
        steps.append({"call": call, "requires_grad": dict(pm.get_model_status().requires_grad), "nb_trainable": list(pm.get_nb_trainable_parameters())})

    record(["init"])
    pm.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"]))
    record(["addAdapter", "b"])
    pm.set_requires_grad("b", True)
    record(["setRequiresGrad", "b", True])
    pm.add_adapter("c", LoraConfig(r=2, target_modules=["v_proj"]))
    record(["addAdapter", "c"])
    pm.set_requires_grad(["a"], False)
    record(["setRequiresGrad", ["a"], False])
    pm.load_adapter(mdir, "m", is_trainable=False)
    record(["loadAdapter", "m"])
    pm.set_requires_grad(["m", "c"], True)
    record(["setRequiresGrad", ["m", "c"], True])
    pm.set_adapter("b")
    record(["setAdapter", "b"])
    pm.set_requires_grad("b", False)
    record(["setRequiresGrad", "b", False])
    pm.set_requires_grad("a", True)
    record(["setRequiresGrad", "a", True])
    pm.delete_adapter("c")
    record(["deleteAdapter", "c"])
    # `set_adapter` makes the adapter trainable even when it was loaded frozen
    pm.set_adapter("m")
    record(["setAdapter", "m"])
    pm.set_adapter("a", inference_mode=True)
    record(["setAdapter", "a", {"inferenceMode": True}])
    pm.set_adapter("b")
    record(["setAdapter", "b"])

    # a model loaded frozen (`PeftModel.from_pretrained`, is_trainable=False) and set active again
    fz = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("models/llama").eval(), mdir)
    frozen = [dict(fz.get_model_status().requires_grad), list(fz.get_nb_trainable_parameters())]
    fz.set_adapter("default")
    frozen.append(dict(fz.get_model_status().requires_grad))
    frozen.append(list(fz.get_nb_trainable_parameters()))

    pt = get_peft_model(AutoModelForCausalLM.from_pretrained("models/llama").eval(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    try:
        pt.set_requires_grad("default", False)
        prompt_error = None
    except TypeError as e:
        prompt_error = str(e)
    with open("cases/requires_grad.json", "w") as f:
        json.dump({"steps": steps, "prompt_error": prompt_error, "frozen_then_set": frozen}, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
