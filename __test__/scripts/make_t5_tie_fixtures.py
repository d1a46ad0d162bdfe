"""T5 checkpoints whose embedding modules transformers 5 ties or not (issue 15's T5 embeddings).

transformers 5.18's `T5Config` always sets `tie_word_embeddings = True` (a config.json `false`
only turns off the decoder-output scaling), and `from_pretrained` ties `encoder.embed_tokens`,
`decoder.embed_tokens` and `lm_head` to `shared` unless the checkpoint holds that module's own
table with other values ("... so we will NOT tie them"). Two tiny checkpoints, from `models/t5`:

- `models/t5_v11`: config.json `tie_word_embeddings: false` (T5 v1.1 / FLAN-T5 style), its own
  `lm_head.weight` (other values: untied), and `encoder.embed_tokens.weight` equal to `shared`
  (tied all the same);
- `models/t5_own_encoder_table`: the default config with an `encoder.embed_tokens.weight` of
  other values (the encoder's table untied; the decoder's and `lm_head` tied).

For each, a LoRA on `embed_tokens` (both stacks' modules, `init_lora_weights=False`), saved as HF
writes it, with HF's base / adapter / merged logits and `num_parameters()` of the base:
`cases/t5_v11_lora_emb`, `cases/t5_own_encoder_table_lora_emb`.

Run with torch 2.13 + transformers 5.18 + peft 0.21: `python make_t5_tie_fixtures.py`.
"""

import fixture_common as fc

fc.start()

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import T5ForConditionalGeneration  # noqa: E402

# PEFT 0.21's PeftModelForSeq2SeqLM reads a generation hook that transformers 5.18 renamed; alias
# it (only `generate` uses it, this script does not).
if not hasattr(T5ForConditionalGeneration, "_prepare_encoder_decoder_kwargs_for_generation"):
    T5ForConditionalGeneration._prepare_encoder_decoder_kwargs_for_generation = T5ForConditionalGeneration._prepare_text_encoder_decoder_kwargs_for_generation


def make_model(name, config_edit, extra):
    out = f"models/{name}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree("models/t5", out)
    sd = load_file(f"{out}/model.safetensors")
    for k, v in extra(sd).items():
        sd[k] = v.contiguous()
    save_file(sd, f"{out}/model.safetensors", metadata={"format": "pt"})
    with open(f"{out}/config.json") as f:
        cfg = json.load(f)
    config_edit(cfg)
    with open(f"{out}/config.json", "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return out


def case(name, model_dir, seed):
    out = f"cases/{name}"
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(seed)
    base = T5ForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()
    tied = {m: getattr(base, m.split(".")[0]).embed_tokens.weight is base.shared.weight if "." in m else base.lm_head.weight is base.shared.weight
            for m in ["encoder.embed_tokens", "decoder.embed_tokens", "lm_head"]}
    n_base = base.num_parameters()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    ids[1, -2:] = 0
    labels = torch.randint(3, 128, (2, 5), generator=g)
    dec = base._shift_right(labels)
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    with torch.no_grad():
        logits_base = base(**kw).logits
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"], init_lora_weights=False, task_type="SEQ_2_SEQ_LM")
    model = get_peft_model(base, cfg).eval()
    with torch.no_grad():
        logits_adapter = model(**kw).logits
        model.merge_adapter()
        logits_merged = model(**kw).logits
        model.unmerge_adapter()
        logits_unmerged = model(**kw).logits
    model.save_pretrained(out)
    card = f"{out}/README.md"
    if os.path.exists(card):
        os.remove(card)
    fc.save_expected(out, {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "logits_base": logits_base,
                           "logits_adapter": logits_adapter, "logits_merged": logits_merged, "logits_unmerged": logits_unmerged})
    info = {
        "name": name, "generator": "make_t5_tie_fixtures.py", "base_model": model_dir, "seed": seed, "peft_type": "LORA",
        "base_num_parameters": n_base, "tied_to_shared": tied,
        "adapter_keys": fc.keys_of(f"{out}/adapter_model.safetensors"),
        "merged_vs_adapter_max_abs": float((logits_merged - logits_adapter).abs().max()),
        "adapter_vs_base_max_abs": float((logits_adapter - logits_base).abs().max()),
        "versions": fc.versions(),
    }
    with open(f"{out}/case.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print(name, tied, n_base, info["adapter_vs_base_max_abs"], info["merged_vs_adapter_max_abs"])


def v11_config(cfg):
    cfg["tie_word_embeddings"] = False
    cfg.pop("scale_decoder_outputs", None)


g = torch.Generator().manual_seed(2130)
v11 = make_model("t5_v11", v11_config, lambda sd: {
    "lm_head.weight": torch.randn(sd["shared.weight"].shape, generator=g) * 0.5,
    "encoder.embed_tokens.weight": sd["shared.weight"].clone(),
})
own = make_model("t5_own_encoder_table", lambda cfg: None, lambda sd: {
    "encoder.embed_tokens.weight": torch.randn(sd["shared.weight"].shape, generator=g) * 2.0,
})
case("t5_v11_lora_emb", v11, 2131)
case("t5_own_encoder_table_lora_emb", own, 2132)
