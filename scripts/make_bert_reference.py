"""Reference numbers for peft-core's BERT tests, computed with torch + transformers + peft.

Used only to produce test data (users never need Python). Reference stack: torch 2.13 (CPU),
transformers 5.18, peft 0.21; fp32, eager attention, eval mode.

    python scripts/make_bert_reference.py            # tiny BERT heads, prefix / prompt tuning
    python scripts/make_bert_reference.py --minilm .cache/models/all-MiniLM-L6-v2

Writes (relative to the repository root):
  __test__/fixtures/bert_reference/heads.safetensors
      head weights drawn here (classifier for token classification, qa_outputs) and the outputs
      HF computes with them on the tiny fixture BERT (__test__/fixtures/models/bert):
      token-classification logits + loss, QA start/end logits + loss with out-of-range
      positions (clamped), BertModel last hidden state, sequence-classification logits with
      token_type_ids.
  __test__/fixtures/bert_reference/prefix_seqcls/   PrefixTuningConfig(SEQ_CLS) adapter + logits
  __test__/fixtures/bert_reference/prompt_seqcls/   PromptTuningConfig(SEQ_CLS) adapter + logits
  __test__/fixtures/models/distilbert/ + bert_reference/distilbert_lora_seqcls/   a tiny random
      DistilBERT (seeded), a LoRA SEQ_CLS adapter on q_lin/v_lin, base/adapter logits, hidden
      states and QA logits
  __test__/fixtures/models/roberta/ + bert_reference/roberta_lora_seqcls/   the same for a tiny
      random RoBERTa (pad 1, positions from padding_idx + 1, RobertaClassificationHead)
  __test__/fixtures/minilm/expected.safetensors     (--minilm) last hidden state and mean-pooled
      embeddings of all-MiniLM-L6-v2 for a few sentences, with the tokenizer's ids.
"""

import argparse
import os
import sys

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FX = os.path.join(ROOT, "__test__", "fixtures")
BERT = os.path.join(FX, "models", "bert")


def batch():
    g = torch.Generator().manual_seed(20261129)
    ids = torch.randint(3, 160, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    ids[1, 5:] = 0
    mask[1, 5:] = 0
    tt = torch.zeros(2, 7, dtype=torch.long)
    tt[0, 4:] = 1
    tt[1, 3:5] = 1
    return ids, mask, tt


def heads():
    from transformers import BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification, BertModel

    ids, mask, tt = batch()
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}
    torch.manual_seed(7)
    tok = BertForTokenClassification.from_pretrained(BERT, num_labels=5, attn_implementation="eager", ignore_mismatched_sizes=True).eval()
    with torch.no_grad():
        tok.classifier.weight.normal_(0, 0.2)
        tok.classifier.bias.normal_(0, 0.2)
    labels = torch.randint(0, 5, (2, 7), generator=torch.Generator().manual_seed(3))
    labels[1, 5:] = -100
    o = tok(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    out.update({"tok.classifier.weight": tok.classifier.weight, "tok.classifier.bias": tok.classifier.bias,
                "tok.labels": labels, "tok.logits": o.logits, "tok.loss": o.loss.reshape(1)})

    qa = BertForQuestionAnswering.from_pretrained(BERT, num_labels=2, attn_implementation="eager").eval()
    with torch.no_grad():
        qa.qa_outputs.weight.normal_(0, 0.2)
        qa.qa_outputs.bias.normal_(0, 0.2)
    start = torch.tensor([2, 9])  # 9 > seq len: clamped to 7 and ignored
    end = torch.tensor([4, 3])
    o = qa(input_ids=ids, attention_mask=mask, token_type_ids=tt, start_positions=start, end_positions=end)
    out.update({"qa.qa_outputs.weight": qa.qa_outputs.weight, "qa.qa_outputs.bias": qa.qa_outputs.bias,
                "qa.start_positions": start, "qa.end_positions": end,
                "qa.start_logits": o.start_logits, "qa.end_logits": o.end_logits, "qa.loss": o.loss.reshape(1)})

    base = BertModel.from_pretrained(BERT, attn_implementation="eager").eval()
    o = base(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    out["base.last_hidden_state"] = o.last_hidden_state
    out["base.last_hidden_state_no_tt"] = base(input_ids=ids, attention_mask=mask).last_hidden_state

    seq = BertForSequenceClassification.from_pretrained(BERT, attn_implementation="eager").eval()
    out["seqcls.logits_tt"] = seq(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
    d = os.path.join(FX, "bert_reference")
    os.makedirs(d, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in out.items()}, os.path.join(d, "heads.safetensors"), metadata={"format": "pt"})


def prompt_learning():
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import BertForSequenceClassification

    ids, mask, tt = batch()
    for name, cfg in [
        ("prefix_seqcls", PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)),
        ("prompt_seqcls", PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)),
    ]:
        torch.manual_seed(11)
        base = BertForSequenceClassification.from_pretrained(BERT, attn_implementation="eager").eval()
        m = get_peft_model(base, cfg).eval()
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "modules_to_save" in n:
                    p.add_(torch.randn_like(p) * 0.05)
        d = os.path.join(FX, "bert_reference", name)
        m.save_pretrained(d)
        with torch.no_grad():
            logits = m(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
            logits_no_tt = m(input_ids=ids, attention_mask=mask).logits
        save_file({"input_ids": ids, "attention_mask": mask, "token_type_ids": tt, "logits": logits.contiguous(),
                   "logits_no_tt": logits_no_tt.contiguous()}, os.path.join(d, "expected.safetensors"), metadata={"format": "pt"})
        # Paths relative to __test__/fixtures, as in the shared fixture set.
        import json
        cp = os.path.join(d, "adapter_config.json")
        c = json.load(open(cp))
        c["base_model_name_or_path"] = "models/bert"
        with open(cp, "w") as f:
            json.dump(c, f, indent=2, sort_keys=True)
        readme = os.path.join(d, "README.md")
        if os.path.exists(readme):
            os.remove(readme)


def distilbert():
    """Tiny DistilBERT (same shape as the fixture BERT) + a HF PEFT LoRA SEQ_CLS adapter."""
    import json
    from peft import LoraConfig, get_peft_model
    from transformers import DistilBertConfig, DistilBertForQuestionAnswering, DistilBertForSequenceClassification, DistilBertModel

    torch.manual_seed(31)
    cfg = DistilBertConfig(vocab_size=160, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64,
                           pad_token_id=0, num_labels=3, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
    model = DistilBertForSequenceClassification(cfg).eval()
    mdir = os.path.join(FX, "models", "distilbert")
    model.save_pretrained(mdir)
    ids, mask, _ = batch()
    model = DistilBertForSequenceClassification.from_pretrained(mdir, attn_implementation="eager").eval()
    out = {"input_ids": ids, "attention_mask": mask, "logits_base": model(input_ids=ids, attention_mask=mask).logits}
    torch.manual_seed(32)
    pm = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["q_lin", "v_lin"], init_lora_weights=False)).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    d = os.path.join(FX, "bert_reference", "distilbert_lora_seqcls")
    pm.save_pretrained(d)
    cp = os.path.join(d, "adapter_config.json")
    c = json.load(open(cp))
    c["base_model_name_or_path"] = "models/distilbert"
    with open(cp, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
    os.remove(os.path.join(d, "README.md"))
    with torch.no_grad():
        out["logits_adapter"] = pm(input_ids=ids, attention_mask=mask).logits
    enc = DistilBertModel.from_pretrained(mdir, attn_implementation="eager").eval()
    out["last_hidden_state"] = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    qa = DistilBertForQuestionAnswering.from_pretrained(mdir, num_labels=2, attn_implementation="eager").eval()
    with torch.no_grad():
        qa.qa_outputs.weight.normal_(0, 0.2)
        qa.qa_outputs.bias.normal_(0, 0.2)
        o = qa(input_ids=ids, attention_mask=mask)
    out.update({"qa.qa_outputs.weight": qa.qa_outputs.weight, "qa.qa_outputs.bias": qa.qa_outputs.bias,
                "qa.start_logits": o.start_logits, "qa.end_logits": o.end_logits})
    save_file({k: v.detach().contiguous() for k, v in out.items()}, os.path.join(d, "expected.safetensors"), metadata={"format": "pt"})


def roberta():
    """Tiny RoBERTa (pad 1, positions offset by padding_idx + 1) + a HF PEFT LoRA SEQ_CLS adapter
    (the whole RobertaClassificationHead `classifier` is in modules_to_save)."""
    import json
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel

    torch.manual_seed(41)
    cfg = RobertaConfig(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = RobertaForSequenceClassification(cfg).eval()
    mdir = os.path.join(FX, "models", "roberta")
    model.save_pretrained(mdir)
    ids, mask, _ = batch()
    ids[1, 5:] = 1  # RoBERTa pads with 1
    model = RobertaForSequenceClassification.from_pretrained(mdir, attn_implementation="eager").eval()
    out = {"input_ids": ids, "attention_mask": mask, "logits_base": model(input_ids=ids, attention_mask=mask).logits}
    torch.manual_seed(42)
    pm = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    d = os.path.join(FX, "bert_reference", "roberta_lora_seqcls")
    pm.save_pretrained(d)
    cp = os.path.join(d, "adapter_config.json")
    c = json.load(open(cp))
    c["base_model_name_or_path"] = "models/roberta"
    with open(cp, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
    os.remove(os.path.join(d, "README.md"))
    with torch.no_grad():
        out["logits_adapter"] = pm(input_ids=ids, attention_mask=mask).logits
    enc = RobertaModel.from_pretrained(mdir, attn_implementation="eager").eval()
    out["last_hidden_state"] = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    save_file({k: v.detach().contiguous() for k, v in out.items()}, os.path.join(d, "expected.safetensors"), metadata={"format": "pt"})


SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome!",
    "Parameter-efficient fine-tuning trains a few weights.",
]


def minilm(path):
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    model = BertModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "token_type_ids": enc["token_type_ids"],
           "last_hidden_state": h.contiguous(), "mean_pooled": pooled.contiguous()}
    d = os.path.join(FX, "minilm")
    os.makedirs(d, exist_ok=True)
    save_file(out, os.path.join(d, "expected.safetensors"), metadata={"format": "pt", "sentences": "\n".join(SENTENCES)})


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--minilm", help="all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer.json)")
    a = ap.parse_args()
    torch.set_grad_enabled(True)
    heads()
    prompt_learning()
    distilbert()
    roberta()
    if a.minilm:
        minilm(a.minilm)
    print("ok", file=sys.stderr)
