//! CPT, context-aware prompt tuning (issue 15), against HF PEFT 0.21:
//! `__test__/fixtures/cases/llama_cpt` (CPTConfig with two in-context examples, types 1..8, decay
//! loss 0.8, projection eps 0.2 / format 0.1, trained 4 AdamW steps in HF, saved) and `gpt2_cpt`
//! (the same on the tiny GPT-2), made by `__test__/scripts/make_cpt_fixtures.py`.
//!
//! Run: `cargo test --profile test-release -p peft-core --test cpt`.

mod common;

use candle_core::Tensor;
use common::*;
use peft_core::generate::{generate, GenerateOptions};
use peft_core::train::{loss_and_grads, Batch, LrSchedule, Trainer, TrainingArgs};
use peft_core::tuners::config::AdapterConfig;
use peft_core::tuners::prompt::PromptHead;
use serde_json::json;

const CASE: &str = "llama_cpt";

fn file_config() -> serde_json::Value {
    file_config_of(CASE)
}

fn file_config_of(case: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(case_dir(case).join("adapter_config.json")).unwrap()).unwrap()
}

fn fresh_model() -> peft_core::peft_model::PeftModel {
    fresh_model_of(CASE)
}

/// The case's base with the case's config added as a trainable (fresh) adapter.
fn fresh_model_of(case: &str) -> peft_core::peft_model::PeftModel {
    let mut v = file_config_of(case);
    v["inference_mode"] = json!(false);
    let cfg = AdapterConfig::from_json(&v, None).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    let mut m = base_peft(case);
    m.add_adapter("default", cfg, 0).unwrap_or_else(|e| panic!("add_adapter: [{}] {e}", e.code()));
    m
}

fn cpt_batch(exp: &Expected) -> Batch {
    Batch { input_type_mask: Some(exp.i64s("input_type_mask")), ..expected_batch(exp) }
}

fn set_delta(m: &peft_core::peft_model::PeftModel, delta: &Tensor) {
    match &m.prompt_encoder("default").unwrap().head {
        PromptHead::Cpt(h) => h.delta.set(delta).unwrap(),
        _ => panic!("not a CPT encoder"),
    }
}

fn delta_of(m: &peft_core::peft_model::PeftModel) -> Tensor {
    match &m.prompt_encoder("default").unwrap().head {
        PromptHead::Cpt(h) => h.delta.as_tensor().clone(),
        _ => panic!("not a CPT encoder"),
    }
}

#[test]
fn cpt_loaded_adapter_logits_and_greedy_match_hf() {
    let exp = Expected::load(CASE);
    let m = adapter_peft(CASE, false);
    assert_eq!(m.peft_type(), Some("CPT"));
    // Logits cover the 10 virtual tokens and the 7 real ones, as HF's do.
    check_logits("loaded", &m, &exp, "logits_adapter");
    let (ids, _, _) = exp.ids("input_ids");
    let opts = GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![], pad_token_id: 0, use_cache: true, ..Default::default() };
    for use_cache in [true, false] {
        let got = generate(&m, &ids[..5], 1, 5, None, None, &GenerateOptions { use_cache, ..opts.clone() }, &|| false).unwrap();
        assert_eq!(got, exp.rows_u32("greedy"), "greedy ids (use_cache={use_cache})");
    }
}

#[test]
fn cpt_round_trip_is_byte_identical() {
    resave_case(CASE);
}

#[test]
fn cpt_config_matches_hf_defaults_and_refusals() {
    let cj = case_json(CASE);
    // HF's CPTConfig(task_type="CAUSAL_LM").to_dict() and a second option set.
    for (given, key) in [
        (json!({"peft_type": "CPT", "task_type": "CAUSAL_LM"}), "default_to_dict"),
        (
            json!({"peft_type": "CPT", "task_type": "CAUSAL_LM", "cpt_token_ids": [4, 5, 6], "cpt_mask": [1, 1, 0], "cpt_tokens_type_mask": [1, 2, 4],
                   "opt_weighted_loss_type": "decay", "opt_loss_decay_factor": 0.5, "opt_projection_epsilon": 0.3, "opt_projection_format_epsilon": 0.05,
                   "tokenizer_name_or_path": "models/llama"}),
            "options_to_dict",
        ),
    ] {
        let c = AdapterConfig::from_json(&given, None).unwrap();
        assert_eq!(c.to_json(), cj[key], "{key}");
    }
    // A file's num_virtual_tokens is re-derived from cpt_token_ids, as HF's __post_init__ does.
    let c = AdapterConfig::from_json(&json!({"peft_type": "CPT", "task_type": "CAUSAL_LM", "cpt_token_ids": [1, 2], "num_virtual_tokens": 9}), None).unwrap();
    assert_eq!(c.to_json()["num_virtual_tokens"], 2);
    // HF's refusals, with HF's messages.
    for (v, which) in [
        (json!({"peft_type": "CPT", "cpt_token_ids": [1, 2], "task_type": "SEQ_CLS"}), "task_type"),
        (json!({"peft_type": "CPT", "cpt_token_ids": [1, 2], "cpt_mask": [1], "task_type": "CAUSAL_LM"}), "lengths"),
        (json!({"peft_type": "CPT", "cpt_token_ids": [1, 2], "cpt_tokens_type_mask": [1, 2, 3], "task_type": "CAUSAL_LM"}), "type_lengths"),
    ] {
        let e = AdapterConfig::from_json(&v, None).unwrap_err();
        assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
        let want = cj["refusals"][which].as_str().unwrap();
        assert!(e.to_string().contains(want), "{which}: {e} (HF: {want})");
    }
    // Our own checks, each naming the field.
    for (v, field) in [
        (json!({"opt_weighted_loss_type": "linear"}), "opt_weighted_loss_type"),
        (json!({"opt_loss_decay_factor": -1.0}), "opt_loss_decay_factor"),
        (json!({"opt_projection_epsilon": "big"}), "opt_projection_epsilon"),
        (json!({"cpt_token_ids": [1, -2]}), "cpt_token_ids"),
        (json!({"cpt_token_ids": []}), "cpt_token_ids"),
        (json!({"cpt_token_ids": [1], "cpt_tokens_type_mask": [-1]}), "cpt_tokens_type_mask"),
    ] {
        let mut c = json!({"peft_type": "CPT", "task_type": "CAUSAL_LM"});
        for (k, x) in v.as_object().unwrap() {
            c[k] = x.clone();
        }
        let e = AdapterConfig::from_json(&c, None).unwrap_err();
        assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
        assert!(e.to_string().contains(field), "{field}: {e}");
    }
}

#[test]
fn cpt_counts_loss_and_masked_gradients_match_hf() {
    let exp = Expected::load(CASE);
    let cj = case_json(CASE);
    let m = fresh_model();
    let (trainable, total) = m.nb_trainable_parameters();
    assert_eq!(trainable as u64, cj["fresh_trainable_params"].as_u64().unwrap(), "trainable parameters (delta only)");
    assert_eq!(total as u64, cj["fresh_all_params"].as_u64().unwrap(), "all parameters (frozen embedding counted)");
    let keys: Vec<String> = m.trainable_parameters().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec!["prompt_encoder.default.delta_embedding.weight".to_string()]);
    // The trained state: HF's projected delta after 4 steps.
    set_delta(&m, exp.get("train_delta"));
    check_logits("trained", &m, &exp, "logits_trained");
    for kind in ["decay", "none"] {
        let mut cfg = file_config();
        cfg["inference_mode"] = json!(false);
        cfg["opt_weighted_loss_type"] = json!(kind);
        let mut mk = base_peft(CASE);
        mk.add_adapter("default", AdapterConfig::from_json(&cfg, None).unwrap(), 0).unwrap();
        set_delta(&mk, exp.get("train_delta"));
        // The fused engine declines CPT (its loss and type masks live on the general path).
        assert!(peft_core::engine::try_loss_and_grads(&mk, &cpt_batch(&exp), None, None).unwrap().is_none(), "the engine must decline CPT");
        let (loss, n, grads) = loss_and_grads(&mk, &cpt_batch(&exp), None, None).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
        let want = exp.get(&format!("loss_{kind}")).to_vec1::<f32>().unwrap()[0] as f64;
        visible(&format!("diff {CASE} loss_{kind}: got {loss:.8} expected {want:.8} ({n} label positions)"));
        assert!((loss - want).abs() <= 1e-5, "loss_{kind} {loss} vs {want}");
        let v = mk.trainable_parameters()[0].1.clone();
        let g = grads.get(v.as_tensor()).expect("a gradient for the delta");
        let e = exp.get(&format!("grad_{kind}.prompt_encoder.default.delta_embedding.weight"));
        assert_close(&format!("grad_{kind}"), g, e, 1e-4 * max_abs(e), 1e-4);
        // Label-type rows (types 4 and 8: rows 4 and 9) get no gradient, as HF's hook masks them.
        let rows = g.abs().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!((rows[4], rows[9]), (0.0, 0.0), "{rows:?}");
        assert!(rows[0] > 0.0 && rows[1] > 0.0);
    }
}

#[test]
fn cpt_training_trajectory_with_projection_matches_hf() {
    let exp = Expected::load(CASE);
    let m = fresh_model();
    let args = TrainingArgs { learning_rate: 0.01, max_steps: 4, max_grad_norm: 0.0, weight_decay: 0.0, lr_scheduler_type: LrSchedule::Constant, ..Default::default() };
    let mut tr = Trainer::new(&m, args).unwrap();
    let want = exp.get("train_loss").to_vec1::<f32>().unwrap();
    let batch = cpt_batch(&exp);
    for (i, w) in want.iter().enumerate() {
        let out = tr.step(&m, std::slice::from_ref(&batch)).unwrap_or_else(|e| panic!("step {i}: [{}] {e}", e.code()));
        visible(&format!("diff {CASE} train step {i}: loss {:.8} expected {w:.8}", out.loss));
        assert!((out.loss - *w as f64).abs() <= 2e-5, "step {i}: loss {} vs {w}", out.loss);
    }
    // The after-step hook projected the delta: row norms are at most eps·sqrt(64/2048).
    assert_close("delta after 4 steps", &delta_of(&m), exp.get("train_delta"), 1e-5, 1e-3);
    let sd: std::collections::HashMap<String, Tensor> = m.adapter_state_dict("default").unwrap().into_iter().collect();
    assert_close("prompt_embeddings after 4 steps", &sd["prompt_embeddings"], exp.get("train_table"), 1e-5, 1e-4);
    let norms = delta_of(&m).sqr().unwrap().sum(1).unwrap().sqrt().unwrap().to_vec1::<f32>().unwrap();
    let eps = [0.1f32, 0.2, 0.2, 0.1, 0.0, 0.1, 0.2, 0.2, 0.1, 0.0].map(|e| e * (64f32 / 2048.0).sqrt());
    for (i, (n, e)) in norms.iter().zip(eps).enumerate() {
        assert!(*n <= e * (1.0 + 1e-5) + 1e-9, "row {i}: norm {n} above eps {e}");
    }
    // Saved after training, loaded again: the same logits (the table becomes the embedding).
    let dir = temp_dir("cpt-trained");
    m.save_pretrained(&dir, None).unwrap();
    let mut back = base_peft(CASE);
    back.load_adapter(&dir, "default", false, None).unwrap();
    let (ids, b, s) = exp.ids("input_ids");
    let mask = exp.mask("attention_mask");
    let a = forward(&m, &ids, b, s, &mask, None);
    let r = forward(&back, &ids, b, s, &mask, None);
    assert_close("reloaded vs trained logits", &r, &a, 1e-5, 1e-5);
    remove_dir(&dir);
}

#[test]
fn cpt_refusals_carry_codes() {
    let exp = Expected::load(CASE);
    let m = fresh_model();
    // Type mask of the wrong length.
    let mut b = cpt_batch(&exp);
    b.input_type_mask = Some(vec![4; 3]);
    let e = loss_and_grads(&m, &b, None, None).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains("inputTypeMask"), "{e}");
    // No label position (types 1..3 only, no label in the prefix types either after the shift).
    let mut cfg = file_config();
    cfg["inference_mode"] = json!(false);
    cfg["cpt_tokens_type_mask"] = json!([1, 2, 2, 3, 1, 5, 6, 6, 7, 5]);
    let mut m2 = base_peft(CASE);
    m2.add_adapter("default", AdapterConfig::from_json(&cfg, None).unwrap(), 0).unwrap();
    let mut b = cpt_batch(&exp);
    b.input_type_mask = Some(vec![2; 14]); // shifted by max 7: type 9, not a label type
    let e = loss_and_grads(&m2, &b, None, None).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains("inputTypeMask"), "{e}");
    // A type mask with a non-CPT adapter.
    let lora = AdapterConfig::from_json(&json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "target_modules": ["q_proj"]}), None).unwrap();
    let mut ml = base_peft(CASE);
    ml.add_adapter("default", lora, 0).unwrap();
    let e = loss_and_grads(&ml, &cpt_batch(&exp), None, None).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains("inputTypeMask"), "{e}");
    // Token ids outside the vocabulary.
    let mut cfg = file_config();
    cfg["inference_mode"] = json!(false);
    cfg["cpt_token_ids"] = json!([1, 2, 3, 4, 5, 6, 7, 8, 9, 4096]);
    let mut m3 = base_peft(CASE);
    let e = m3.add_adapter("default", AdapterConfig::from_json(&cfg, None).unwrap(), 0).unwrap_err();
    assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
    assert!(e.to_string().contains("cpt_token_ids"), "{e}");
    assert!(m3.adapter_names().is_empty(), "a refused adapter leaves the model unchanged");
    // Refused as every prompt-learning adapter is (HF's PeftModel for prompt learning: one
    // active adapter, no merge, no layer status, `set_requires_grad` a TypeError).
    let mut m = fresh_model();
    let e = m.merge_adapter(None, false).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_STATE");
    assert!(e.to_string().contains("CPT adapters cannot be merged"), "{e}");
    let e = m.layer_status().unwrap_err();
    assert!(e.to_string().contains("prompt-learning adapters (CPT)"), "{e}");
    let e = m.set_requires_grad(&["default".to_string()], false).unwrap_err();
    assert!(e.to_string().contains("Setting `requires_grad` is not supported for prompt learning methods like CPT."), "{e}");
    m.add_adapter("second", AdapterConfig::from_json(&file_config(), None).unwrap(), 0).unwrap();
    let e = m.set_adapter(&["default".to_string(), "second".to_string()]).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains("exactly one active adapter"), "{e}");
}

#[test]
fn cpt_checkpoint_resume_continues_hf_trajectory() {
    // Two steps, a checkpoint, a fresh model resumed from it, two more steps: HF's steps 3 and 4.
    let exp = Expected::load(CASE);
    let want = exp.get("train_loss").to_vec1::<f32>().unwrap();
    let args = TrainingArgs { learning_rate: 0.01, max_steps: 4, max_grad_norm: 0.0, weight_decay: 0.0, lr_scheduler_type: LrSchedule::Constant, ..Default::default() };
    let batch = cpt_batch(&exp);
    let m = fresh_model();
    let mut tr = Trainer::new(&m, args.clone()).unwrap();
    for _ in 0..2 {
        tr.step(&m, std::slice::from_ref(&batch)).unwrap();
    }
    let dir = temp_dir("cpt-ckpt");
    let ckpt = tr.save_checkpoint(&m, &dir.join("checkpoint-2"), json!({})).unwrap();
    let m2 = fresh_model();
    let mut tr2 = Trainer::new(&m2, args).unwrap();
    tr2.load_checkpoint(&m2, &ckpt).unwrap_or_else(|e| panic!("load_checkpoint: [{}] {e}", e.code()));
    assert_close("delta after resume", &delta_of(&m2), &delta_of(&m), 0.0, 0.0);
    for w in &want[2..] {
        let out = tr2.step(&m2, std::slice::from_ref(&batch)).unwrap();
        assert!((out.loss - *w as f64).abs() <= 2e-5, "resumed step {}: loss {} vs {w}", out.step, out.loss);
    }
    assert_close("delta after 4 steps (resumed)", &delta_of(&m2), exp.get("train_delta"), 1e-5, 1e-3);
    remove_dir(&dir);
}

#[test]
fn cpt_on_gpt2_matches_hf() {
    const G: &str = "gpt2_cpt";
    let exp = Expected::load(G);
    let m = adapter_peft(G, false);
    check_logits("gpt2 loaded", &m, &exp, "logits_adapter");
    let (ids, _, _) = exp.ids("input_ids");
    let opts = GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![], pad_token_id: 0, ..Default::default() };
    for use_cache in [true, false] {
        let got = generate(&m, &ids[..5], 1, 5, None, None, &GenerateOptions { use_cache, ..opts.clone() }, &|| false).unwrap();
        assert_eq!(got, exp.rows_u32("greedy"), "gpt2 greedy ids (use_cache={use_cache})");
    }
    resave_case(G);
    let cj = case_json(G);
    // HF's training steps, then the loss and masked gradient at HF's trained delta.
    let m = fresh_model_of(G);
    let (trainable, total) = m.nb_trainable_parameters();
    assert_eq!((trainable as u64, total as u64), (cj["fresh_trainable_params"].as_u64().unwrap(), cj["fresh_all_params"].as_u64().unwrap()));
    let args = TrainingArgs { learning_rate: 0.01, max_steps: 4, max_grad_norm: 0.0, weight_decay: 0.0, lr_scheduler_type: LrSchedule::Constant, ..Default::default() };
    let mut tr = Trainer::new(&m, args).unwrap();
    let batch = cpt_batch(&exp);
    for (i, w) in exp.get("train_loss").to_vec1::<f32>().unwrap().iter().enumerate() {
        let out = tr.step(&m, std::slice::from_ref(&batch)).unwrap();
        assert!((out.loss - *w as f64).abs() <= 2e-5, "gpt2 step {i}: loss {} vs {w}", out.loss);
    }
    let sd: std::collections::HashMap<String, Tensor> = m.adapter_state_dict("default").unwrap().into_iter().collect();
    assert_close("gpt2 prompt_embeddings after 4 steps", &sd["prompt_embeddings"], exp.get("train_table"), 1e-5, 1e-4);
    let m = fresh_model_of(G);
    set_delta(&m, exp.get("train_delta"));
    let (loss, _, grads) = loss_and_grads(&m, &batch, None, None).unwrap();
    let want = exp.get("loss_decay").to_vec1::<f32>().unwrap()[0] as f64;
    assert!((loss - want).abs() <= 1e-5, "gpt2 loss_decay {loss} vs {want}");
    let v = m.trainable_parameters()[0].1.clone();
    let e = exp.get("grad_decay.prompt_encoder.default.delta_embedding.weight");
    assert_close("gpt2 grad_decay", grads.get(v.as_tensor()).unwrap(), e, 1e-4 * max_abs(e), 1e-4);
}

#[test]
fn cpt_is_refused_on_models_that_are_not_causal_lms() {
    // HF: CPTConfig only supports CAUSAL_LM; a BERT sequence classifier cannot host it.
    let mut m = base_peft("bert_lora_seqcls");
    let e = m.add_adapter("default", AdapterConfig::from_json(&json!({"peft_type": "CPT", "task_type": "CAUSAL_LM", "cpt_token_ids": [1, 2]}), None).unwrap(), 0).unwrap_err();
    assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
    assert!(e.to_string().contains("CAUSAL_LM"), "{e}");
    assert!(m.adapter_names().is_empty());
}

#[test]
fn cpt_trainer_step_with_bad_labels_is_a_coded_error() {
    let exp = Expected::load(CASE);
    let m = fresh_model();
    let mut tr = Trainer::new(&m, TrainingArgs::default()).unwrap();
    let mut b = cpt_batch(&exp);
    b.labels.truncate(5);
    let e = tr.step(&m, &[b]).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains("labels"), "{e}");
}
