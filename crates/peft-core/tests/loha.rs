//! LoHa (issue 15) against HF PEFT 0.21: `__test__/fixtures/cases/llama_loha` (LoHaConfig r=4,
//! alpha=8 on q_proj/v_proj of the tiny Llama, init_weights=False; made by
//! `__test__/scripts/make_loha_fixtures.py`).
//!
//! Run: `cargo test -p peft-core --test loha`.

mod common;

use common::*;
use peft_core::peft_model::PeftModel;
use peft_core::train::{loss_and_grads, Batch};
use peft_core::tuners::config::AdapterConfig;
use serde_json::json;

const CASE: &str = "llama_loha";

#[test]
fn loha_logits_adapted_disabled_merged_match_hf() {
    let exp = Expected::load(CASE);
    let mut m = adapter_peft(CASE, false);
    assert_eq!(m.peft_type().as_deref(), Some("LOHA"));
    check_adapter_then_disabled(&mut m, &exp);
    check_merge_unmerge(&mut m, &exp, |_| {});
    m.set_disabled(true).unwrap();
    check_logits("disabled after unmerge", &m, &exp, "logits_base");
}

#[test]
fn loha_merge_and_unload_matches_hf_merged() {
    let exp = Expected::load(CASE);
    let mut m = adapter_peft(CASE, false);
    m.merge_and_unload(None, true).unwrap();
    check_logits("merge_and_unload", &m, &exp, "logits_merged");
}

#[test]
fn loha_round_trip_is_byte_identical() {
    resave_case(CASE);
}

#[test]
fn loha_counts_status_and_gradients_match_hf() {
    let m = adapter_peft(CASE, true);
    check_counts_and_status(CASE, &m, 4, "loha.Linear", "LoHaModel");

    check_hf_loss_and_grads(CASE, &m);
}

#[test]
fn loha_fresh_adapter_is_a_no_op_and_config_round_trips() {
    let exp = Expected::load(CASE);
    let mut m = base_peft(CASE);
    let cfg = AdapterConfig::from_json(&json!({"peft_type": "LOHA", "task_type": "CAUSAL_LM", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}), None).unwrap();
    let targeted = m.add_adapter("default", cfg, 7).unwrap();
    assert_eq!(targeted.len(), 4);
    // init_weights=True: hada_w2_b = 0, so ΔW = 0.
    check_logits("fresh LoHa (init_weights=True)", &m, &exp, "logits_base");
    let (trainable, _) = m.nb_trainable_parameters();
    assert_eq!(trainable as u64, case_json(CASE)["trainable_params"].as_u64().unwrap());
    // HF's own options JSON parses and is written back unchanged.
    let hf = case_json(CASE)["options_to_dict"].clone();
    let c = AdapterConfig::from_json(&hf, None).unwrap();
    let mut want = hf.clone();
    want["peft_type"] = json!("LOHA");
    assert_eq!(c.to_json()["rank_pattern"], want["rank_pattern"]);
    assert_eq!(c.to_json()["rank_dropout"], json!(0.1));
    assert!(c.unknown_fields().is_empty(), "{:?}", c.unknown_fields());
}

#[test]
fn loha_refuses_what_hf_refuses() {
    let mut m = base_peft(CASE);
    check_config_refusals(&[
        (json!({"peft_type": "LOHA", "r": 0, "target_modules": ["q_proj"]}), "`r`"),
        (json!({"peft_type": "LOHA", "rank_dropout": 1.5, "target_modules": ["q_proj"]}), "rank_dropout"),
        (json!({"peft_type": "LOHA", "layers_pattern": "layers", "target_modules": ["q_proj"]}), "layers_to_transform"),
    ]);
    let e = m.add_adapter("x", AdapterConfig::from_json(&json!({"peft_type": "LOHA", "target_modules": ["embed_tokens"]}), None).unwrap(), 1).unwrap_err();
    assert!(e.to_string().contains("not supported"), "{e}");
    assert!(m.adapter_names().is_empty());
}

#[test]
fn loha_dropouts_apply_in_training_only() {
    // Same seed, same factors (alpha 400: a large ΔW); only the dropouts differ. Eval: identical logits. Training: rank
    // dropout changes the loss; module dropout near 1 skips every LoHa layer (loss = the base's).
    let exp = Expected::load(CASE);
    let (ids, b, s) = exp.ids("input_ids");
    let batch = Batch { input_ids: ids, attention_mask: exp.mask("attention_mask"), labels: exp.i64s("labels"), batch_size: b, seq_len: s, task_ids: None, ..Default::default() };
    let make = |extra: serde_json::Value| {
        let mut m = base_peft(CASE);
        let mut c = json!({"peft_type": "LOHA", "task_type": "CAUSAL_LM", "r": 4, "alpha": 400, "init_weights": false, "target_modules": ["q_proj", "v_proj"]});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        m.add_adapter("default", AdapterConfig::from_json(&c, None).unwrap(), 3).unwrap();
        m
    };
    let rng = || Some(std::sync::Arc::new(std::sync::Mutex::new(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(11))));
    let plain = make(json!({}));
    let rank = make(json!({"rank_dropout": 0.5}));
    let module = make(json!({"module_dropout": 0.999}));
    let eval = |m: &PeftModel| forward_batch(m, &exp);
    assert_eq!(max_abs(&(eval(&plain) - eval(&rank)).unwrap()), 0.0, "rank dropout acts in eval");
    assert_eq!(max_abs(&(eval(&plain) - eval(&module)).unwrap()), 0.0, "module dropout acts in eval");
    let (lp, _, _) = loss_and_grads(&plain, &batch, None, rng()).unwrap();
    let (lr, _, gr) = loss_and_grads(&rank, &batch, None, rng()).unwrap();
    assert!(lr.is_finite() && (lr - lp).abs() > 1e-6, "rank dropout: {lr} vs {lp}");
    assert!(rank.trainable_parameters().iter().all(|(_, v)| gr.get(v.as_tensor()).is_some()));
    let (lm, _, _) = loss_and_grads(&module, &batch, None, rng()).unwrap();
    let mut base = make(json!({}));
    base.set_disabled(true).unwrap();
    let (lb, _, _) = loss_and_grads(&base, &batch, None, rng()).unwrap_or_else(|e| panic!("disabled loss: [{}] {e}", e.code()));
    visible(&format!("loha dropout losses: plain {lp} rank {lr} module {lm} base {lb}"));
    assert!((lm - lb).abs() <= 1e-6 && (lm - lp).abs() > 1e-6, "module dropout 0.999: {lm} vs base {lb}");
}
