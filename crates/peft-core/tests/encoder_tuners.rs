//! Every layer tuner on the encoder and encoder-decoder families, LoRA and IA3 on GPT-2's
//! `Conv1D` layers, and every layer tuner but LoRA (which has its own cases) on issue 18's
//! decoder families (Llama 3.x, Qwen3, Gemma 3, SmolLM3, Phi-3 with its fused `qkv_proj` /
//! `gate_up_proj`), against HF PEFT 0.21 (issue 15:
//! "on GPT-2 / BERT / T5 wherever HF supports the method there"): LoRA, IA3, LoHa, LoKr, VeRA,
//! OFT, AdaLoRA and HRA on T5 (`T5ForConditionalGeneration`, SEQ_2_SEQ_LM: `q`, `v` of every
//! self- and cross-attention and `wo`) and on BERT (`BertForSequenceClassification`, SEQ_CLS:
//! `query`, `value`, `intermediate.dense`, with HF's `classifier` copy in modules_to_save).
//! `__test__/fixtures/cases/{t5,bert}_<tuner>`, `gpt2_{lora,ia3}` and
//! `{llama3,qwen3,gemma3,smollm3,phi3}_<tuner>`, made by
//! `__test__/scripts/make_encoder_tuner_fixtures.py`: for each, the parameter counts, adapter /
//! disabled / merged / unmerged logits, the loss and every trainable gradient, and a
//! byte-identical re-save of HF's files.
//!
//! Run: `cargo test -p peft-core --profile test-release --test encoder_tuners`.

mod common;

use common::*;

const TUNERS: [&str; 8] = ["lora", "ia3", "loha", "lokr", "vera", "oft", "adalora", "hra"];

fn check_case(case: &str) {
    let exp = Expected::load(case);
    let cj = case_json(case);
    let mut m = adapter_peft(case, true);
    assert_eq!(m.peft_type(), cj["peft_type"].as_str(), "{case}: peft_type");
    let (trainable, total) = m.nb_trainable_parameters();
    assert_eq!((trainable as u64, total as u64), (cj["trainable_params"].as_u64().unwrap(), cj["all_params"].as_u64().unwrap()), "{case}: HF's parameter counts");
    check_logits("adapter", &m, &exp, "logits_adapter");
    let (n, worst) = check_hf_loss_and_grads(case, &m);
    let want = if case.ends_with("_tt") { 1 } else { 4 };
    assert!(n >= want, "{case}: only {n} gradients compared");
    m.set_disabled(true).unwrap();
    check_logits("disabled", &m, &exp, "logits_disabled");
    m.set_disabled(false).unwrap();
    // OFT's unmerge multiplies by the inverse rotation: its f32 rounding on T5's 128-wide `wo`
    // reaches about 1.2e-6 (weights of order 1).
    check_merge_unmerge_within(&mut m, &exp, 1e-5, |_| {});
    resave_case(case);
    visible(&format!("ok {case}: counts {trainable}/{total}, logits (adapter, disabled, merged, unmerged), loss, {n} gradients (max |diff| / max |grad| = {worst:.2e}), re-save"));
}

#[test]
fn lora_and_ia3_on_gpt2_conv1d_match_hf() {
    // VeRA and AdaLoRA on GPT-2 have their own cases (tests/vera.rs, tests/adalora.rs).
    for t in ["lora", "ia3"] {
        check_case(&format!("gpt2_{t}"));
    }
}

#[test]
fn every_layer_tuner_on_t5_matches_hf() {
    for t in TUNERS {
        check_case(&format!("t5_{t}"));
    }
}

#[test]
fn every_layer_tuner_on_bert_matches_hf() {
    for t in TUNERS {
        check_case(&format!("bert_{t}"));
    }
    // Trainable tokens on `word_embeddings` (rows the batch uses).
    check_case("bert_tt");
}

#[test]
fn every_layer_tuner_on_the_newer_decoder_families_matches_hf() {
    for fam in ["llama3", "qwen3", "gemma3", "smollm3", "phi3"] {
        for t in TUNERS.iter().filter(|t| **t != "lora") {
            check_case(&format!("{fam}_{t}"));
        }
    }
}
