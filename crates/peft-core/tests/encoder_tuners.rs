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
//! T5's embedding modules (`shared`, tied in transformers 5.18 to `encoder.embed_tokens`,
//! `decoder.embed_tokens` and `lm_head`): `t5_tt`, `t5_tt_embed`, `t5_lora_tt`, `t5_lora_emb`,
//! `t5_oft_emb`, `t5_lora_shared` (see the generator's docs for what HF does in each).
//!
//! Run: `cargo test -p peft-core --profile test-release --test encoder_tuners`.

mod common;

use candle_core::Tensor;
use common::*;
use peft_core::peft_model::PeftModel;

const TUNERS: [&str; 8] = ["lora", "ia3", "loha", "lokr", "vera", "oft", "adalora", "hra"];

fn check_case(case: &str) {
    check_case_with(case, if case.ends_with("_tt") { 1 } else { 4 }, true);
}

/// [`check_case`] with at least `want` gradients compared; `restores`: HF's unmerge gives the
/// base weights back (not so for OFT on both of T5's tied `embed_tokens`, see
/// [`adapters_on_t5_embedding_modules_match_hf`]; HF's unmerged logits are matched either way).
fn check_case_with(case: &str, want: usize, restores: bool) {
    let exp = Expected::load(case);
    let cj = case_json(case);
    let mut m = adapter_peft(case, true);
    assert_eq!(m.peft_type(), cj["peft_type"].as_str(), "{case}: peft_type");
    check_hf_counts(case, &m);
    let (trainable, total) = m.nb_trainable_parameters();
    check_logits("adapter", &m, &exp, "logits_adapter");
    let (n, worst) = check_hf_loss_and_grads(case, &m);
    assert!(n >= want, "{case}: only {n} gradients compared");
    m.set_disabled(true).unwrap();
    check_logits("disabled", &m, &exp, "logits_disabled");
    m.set_disabled(false).unwrap();
    // OFT's unmerge multiplies by the inverse rotation: its f32 rounding on T5's 128-wide `wo`
    // reaches about 1.2e-6 (weights of order 1).
    if restores {
        check_merge_unmerge_within(&mut m, &exp, 1e-5, |_| {});
    } else {
        m.merge_adapter(None, true).unwrap();
        check_logits("merged", &m, &exp, "logits_merged");
        m.unmerge_adapter().unwrap();
        check_logits("unmerged", &m, &exp, "logits_unmerged");
    }
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

/// The three embedding tables of T5 (`shared`, `encoder.embed_tokens`, `decoder.embed_tokens`).
fn t5_tables(m: &PeftModel) -> Vec<(String, Tensor)> {
    m.base.named_layers().into_iter().filter(|(_, l)| l.is_embedding).map(|(n, l)| (n, l.weight.clone())).collect()
}

/// After a merge and unmerge, every table (and a tied `lm_head`) is the base table again, and
/// all of them are one table again (HF's one tied `Parameter`).
fn check_tables_restored(case: &str, m: &mut PeftModel, before: &[(String, Tensor)]) {
    m.merge_adapter(None, true).unwrap();
    let merged = t5_tables(m);
    for (n, t) in &merged {
        let d = max_abs(&(t - &merged[0].1).unwrap());
        assert!(d == 0.0, "{case}: merged {n} differs from merged shared by {d:e} (one tied table in HF)");
    }
    m.unmerge_adapter().unwrap();
    for ((n, a), (_, b)) in before.iter().zip(t5_tables(m)) {
        let d = max_abs(&(a - &b).unwrap());
        assert!(d <= 1e-5, "{case} {n}: unmerged table differs from the base by {d:e}");
    }
}

#[test]
fn adapters_on_t5_embedding_modules_match_hf() {
    // Trainable tokens on `shared` (delta saved under all four tied keys), on `embed_tokens`
    // (two layers), LoRA's `trainable_token_indices`, LoRA and OFT on `embed_tokens` (merging
    // adds both stacks' deltas to the one table: `W + ΔE + ΔD`, `W R_E R_D`). HF's OFT unmerge
    // then multiplies by `R_Eᵀ` and `R_Dᵀ` in module order, which does not give `W` back
    // (`W R_E R_D R_Eᵀ R_Dᵀ`; the rotations do not commute): its unmerged logits are matched, the
    // base is not restored, as in HF.
    for (case, grads, restores) in [("t5_tt", 1, true), ("t5_tt_embed", 2, true), ("t5_lora_tt", 17, true), ("t5_lora_emb", 4, true), ("t5_oft_emb", 2, false)] {
        check_case_with(case, grads, restores);
        if restores {
            let mut m = adapter_peft(case, true);
            let before = t5_tables(&m);
            check_tables_restored(case, &mut m, &before);
        }
    }
}

#[test]
fn trainable_tokens_on_t5_shared_tie_hfs_modules() {
    let m = adapter_peft("t5_tt", true);
    // HF's layer status: the owner on `shared` and tied layers on the three tied modules.
    let status = m.layer_status().unwrap();
    let names: Vec<&str> = status.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["model.shared", "model.encoder.embed_tokens", "model.decoder.embed_tokens", "model.lm_head"], "{status:?}");
    // One trainable parameter (the tied layers hold the owner's).
    let params: Vec<String> = m.trainable_parameters().into_iter().map(|(k, _)| k).collect();
    assert_eq!(params, ["base_model.model.shared.trainable_tokens_delta"]);
    // LoRA on `embed_tokens`: HF wraps the two stacks' modules (not `shared`), each its own
    // `lora.Embedding`.
    let status = adapter_peft("t5_lora_emb", true).layer_status().unwrap();
    let names: Vec<(&str, &str)> = status.iter().map(|s| (s["name"].as_str().unwrap(), s["module_type"].as_str().unwrap())).collect();
    assert_eq!(names, [("model.encoder.embed_tokens", "lora.Embedding"), ("model.decoder.embed_tokens", "lora.Embedding")]);
    let keys = case_json("t5_tt")["adapter_keys"].clone();
    assert_eq!(keys.as_array().unwrap().len(), 4, "{keys}");
}

#[test]
fn lora_on_t5_shared_never_reaches_the_forward_as_in_hf() {
    let case = "t5_lora_shared";
    let exp = Expected::load(case);
    let mut m = adapter_peft(case, true);
    check_hf_counts(case, &m);
    // HF: T5Stack calls its own `embed_tokens`, so the adapter changes nothing ...
    check_logits("adapter", &m, &exp, "logits_adapter");
    check_logits("adapter = disabled", &m, &exp, "logits_disabled");
    // ... and its parameters get no gradient (HF's `grad` is None: no `grad.*` in the fixture).
    assert!(!exp.t.keys().any(|k| k.starts_with("grad.")), "{case}: HF wrote gradients");
    let (loss, _, grads) = peft_core::train::loss_and_grads(&m, &expected_batch(&exp), None, None).unwrap();
    let want = exp.get("loss").flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    assert!((loss - want).abs() <= 1e-5, "{case}: loss {loss} vs {want}");
    let params = m.trainable_parameters();
    assert_eq!(params.len(), 2, "lora_embedding_A/B of shared");
    for (k, v) in &params {
        if let Some(g) = grads.get(v.as_tensor()) {
            assert_eq!(max_abs(g), 0.0, "{case}: gradient of {k}");
        }
    }
    // A merge writes `W + ΔW` into the one table: both stacks and `lm_head` change.
    let before = t5_tables(&m);
    check_merge_unmerge_within(&mut m, &exp, 1e-5, |_| {});
    check_tables_restored(case, &mut m, &before);
    resave_case(case);
}

#[test]
fn t5_embedding_adapters_warn_as_hf() {
    const TIED: &str = "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, ";
    // LoRA on `embed_tokens`: HF's injection warning (LoRA has `ensure_weight_tying`), and its
    // merge warning naming the two tied targets in module order.
    let mut m = adapter_peft("t5_lora_emb", true);
    let w = m.take_warnings();
    assert!(w.iter().any(|x| x.starts_with(&format!("{TIED}but `ensure_weight_tying` is not set to True."))), "{w:?}");
    m.merge_adapter(None, false).unwrap();
    let w = m.take_warnings();
    let merge = "Model with `tie_word_embeddings=True` and the tied_target_modules=['encoder.embed_tokens', 'decoder.embed_tokens'] are part of the adapter. This can lead to complications.";
    assert!(w.iter().any(|x| x.starts_with(merge) && x.ends_with("model = AutoModelForCausalLM.from_pretrained(untied_model_dir)\n```\n")), "{w:?}");
    // Trainable tokens on `embed_tokens`: HF's TrainableTokensModel warns at injection (no
    // `ensure_weight_tying` field), never on merge (its `_get_tied_target_modules` is empty).
    let mut m = adapter_peft("t5_tt_embed", true);
    let w = m.take_warnings();
    assert!(w.iter().any(|x| x.starts_with(&format!("{TIED}but no implementation exists to tie the adapters."))), "{w:?}");
    m.merge_adapter(None, false).unwrap();
    assert!(!m.take_warnings().iter().any(|x| x.contains("tied_target_modules")));
    // On `shared` (not one of HF's embedding layer names) nothing is said.
    let mut m = adapter_peft("t5_tt", true);
    m.merge_adapter(None, false).unwrap();
    assert_eq!(m.take_warnings(), Vec::<String>::new());
}
