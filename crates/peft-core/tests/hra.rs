//! HRA, Householder reflection adaptation, against HF PEFT 0.21: `__test__/fixtures/cases/
//! llama_hra` (HRAConfig r=4 on q_proj/v_proj/down_proj of the tiny Llama, init_weights=False)
//! and `llama_hra_gs` (r=3 with apply_GS on k_proj/o_proj/gate_proj, HF's odd-r initialisation);
//! made by `__test__/scripts/make_hra_fixtures.py`.
//!
//! Run: `cargo test -p peft-core --profile test-release --test hra`.

mod common;

use candle_core::{DType, Device};
use common::*;
use peft_core::model::loader::load_causal_lm;
use peft_core::peft_model::PeftModel;
use peft_core::tuners::config::AdapterConfig;
use serde_json::json;

const CASE: &str = "llama_hra";
const GS: &str = "llama_hra_gs";

fn hra(extra: serde_json::Value) -> AdapterConfig {
    config_with(json!({"peft_type": "HRA", "task_type": "CAUSAL_LM", "r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}), extra)
}

/// Adapter, disabled (= base), merge / unmerge, `merge_and_unload` and greedy ids of `case`.
fn check_case_logits(case: &str) {
    let exp = Expected::load(case);
    let mut m = adapter_peft(case, false);
    assert_eq!(m.peft_type(), Some("HRA"));
    check_adapter_then_disabled(&mut m, &exp);
    check_greedy("", &m, &exp);
    // Merge (W H) and unmerge (W H⁻¹): the base weights come back within 1e-6.
    check_merge_unmerge(&mut m, &exp, |_| {});
    check_logits("unmerged", &m, &exp, "logits_unmerged");
    check_merge_and_unload(case, &exp);
}

#[test]
fn hra_logits_adapted_disabled_merged_and_greedy_match_hf() {
    check_case_logits(CASE);
}

#[test]
fn hra_gram_schmidt_logits_and_gradients_match_hf() {
    check_case_logits(GS);
    let m = adapter_peft(GS, true);
    check_hf_counts(GS, &m);
    check_hf_loss_and_grads(GS, &m);
}

#[test]
fn hra_round_trip_is_byte_identical() {
    for case in [CASE, GS] {
        resave_case(case);
    }
}

#[test]
fn hra_counts_status_and_gradients_match_hf() {
    let m = adapter_peft(CASE, true);
    check_counts_and_status(CASE, &m, 6, "hra.HRALinear", "HRAModel");
    check_hf_loss_and_grads(CASE, &m);
}

#[test]
fn hra_fresh_adapter_is_a_no_op_for_even_r_and_trains_only_hra_u() {
    let exp = Expected::load(CASE);
    let mut m = base_peft(CASE);
    let targeted = m.add_adapter("default", hra(json!({})), 7).unwrap();
    assert_eq!(targeted.len(), 6);
    assert!(m.take_warnings().iter().all(|w| !w.contains("symmetric")));
    // init_weights=True with an even r: equal column pairs, H = I.
    check_logits("fresh HRA (init_weights=True, r=4)", &m, &exp, "logits_base");
    assert_eq!(m.nb_trainable_parameters().0 as u64, case_json(CASE)["trainable_params"].as_u64().unwrap(), "HF's trainable count");
    // One SGD step: only hra_u has gradients (non-zero at the identity), and it moves the logits.
    check_one_step_trains_only(&m, &exp, ".hra_u");
    // An odd r cannot start at the identity: HF's warning, and the logits move.
    let mut m2 = base_peft(CASE);
    m2.add_adapter("odd", hra(json!({"r": 3})), 1).unwrap();
    let want = case_json(GS)["warnings"][0].as_str().unwrap().to_string();
    assert!(m2.take_warnings().contains(&want), "HF's warning: {want}");
    assert!(max_abs(&(forward_batch(&m2, &exp) - exp.get("logits_base")).unwrap()) > 1e-4);
}

#[test]
fn hra_two_active_adapters_multiply_in_activation_order() {
    // HF: W H_a H_b for active [a, b]. Merging a then b gives the same weights, so the unmerged
    // forward of both must equal the forward after merging both.
    let exp = Expected::load(CASE);
    let mut m = base_peft(CASE);
    m.add_adapter("a", hra(json!({"init_weights": false})), 1).unwrap();
    m.add_adapter("b", hra(json!({"init_weights": false, "apply_GS": true, "r": 2})), 2).unwrap();
    m.set_adapter(&["a".to_string()]).unwrap();
    let only_a = forward_batch(&m, &exp);
    m.set_adapter(&["a".to_string(), "b".to_string()]).unwrap();
    let both = forward_batch(&m, &exp);
    assert!(max_abs(&(&both - &only_a).unwrap()) > 1e-4, "adapter b changes the output");
    m.merge_adapter(None, true).unwrap();
    let merged = forward_batch(&m, &exp);
    assert_close("two adapters: unmerged vs merged", &both, &merged, 1e-4, 1e-4);
    // The other order of activation is another product (W H_b H_a): a different output.
    m.unmerge_adapter().unwrap();
    m.set_adapter(&["b".to_string(), "a".to_string()]).unwrap();
    assert!(max_abs(&(forward_batch(&m, &exp) - &both).unwrap()) > 1e-5, "the order of the reflections matters");
}

#[test]
fn hra_config_parses_hf_options_and_refuses_bad_ones() {
    check_hf_options_roundtrip(CASE);
    let base = |extra: serde_json::Value| json_with(json!({"peft_type": "HRA", "r": 4, "target_modules": ["q_proj"]}), extra);
    check_config_refusals(&[
        (base(json!({"r": 0})), "`r` should be a positive integer value"),
        (base(json!({"r": -1})), "`r`"),
        (base(json!({"r": "4"})), "`r`"),
        (base(json!({"apply_GS": "yes"})), "apply_GS"),
        (base(json!({"init_weights": null})), "init_weights"),
        (base(json!({"bias": "lora_only"})), "bias"),
        (base(json!({"layers_pattern": "layers"})), "layers_to_transform"),
        (json!({"peft_type": "HRA", "r": 8}), "target_modules"),
    ]);
    // HF's refusal of GPT-2's Conv1D (case.json records HF's TypeError text) and of embeddings.
    let gpt2 = load_causal_lm(&fixtures_dir().join("models").join("gpt2"), DType::F32, &Device::Cpu).unwrap();
    let mut g = PeftModel::new(gpt2.model);
    let e = g.add_adapter("x", AdapterConfig::from_json(&base(json!({"target_modules": ["c_attn"]})), None).unwrap(), 1).unwrap_err();
    assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
    let hf_msg = case_json(CASE)["gpt2_refusal"].as_str().unwrap().to_string();
    assert!(e.to_string().contains(&hf_msg), "{e}\nvs HF: {hf_msg}");
    let mut m = base_peft(CASE);
    for (extra, what) in [(json!({"target_modules": ["embed_tokens"]}), "Target module Embedding(256, 64) is not supported"), (json!({"target_modules": ["nope"]}), "")] {
        let e = m.add_adapter("x", hra(extra), 1).unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
    }
    assert!(m.adapter_names().is_empty());
}

#[test]
fn hra_refuses_mixed_batches() {
    check_mixed_batch_refused(CASE, &adapter_peft(CASE, false), &["HRA"]);
}

#[test]
fn hra_bias_hra_only_and_all_train_and_save_hfs_biases() {
    // HRA on the tiny BERT's query/value: HF's trainable counts and saved keys.
    check_bert_bias(CASE, &["hra_only", "all"], |bias| json!({"peft_type": "HRA", "r": 4, "target_modules": ["query", "value"], "bias": bias}));
}
