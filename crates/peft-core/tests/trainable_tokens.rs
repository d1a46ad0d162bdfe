//! Trainable tokens (issue 15) against HF PEFT 0.21: `__test__/fixtures/cases/llama_tt`
//! (TrainableTokensConfig on the tiny Llama), `gpt2_tt` (GPT-2, `lm_head` tied to `wte`),
//! `llama_lora_tt` (LoRA with `trainable_token_indices` as a list) and `gpt2_lora_tt` (the dict
//! form on GPT-2); made by `__test__/scripts/make_trainable_tokens_fixtures.py`.
//!
//! Run: `cargo test -p peft-core --release --test trainable_tokens`.

mod common;

use common::*;
use peft_core::tuners::config::AdapterConfig;
use serde_json::json;
use std::collections::BTreeSet;

const STANDALONE: [&str; 2] = ["llama_tt", "gpt2_tt"];
const WITH_LORA: [&str; 2] = ["llama_lora_tt", "gpt2_lora_tt"];

fn token_indices(case: &str) -> Vec<i64> {
    case_json(case)["token_indices"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

fn tt(extra: serde_json::Value) -> AdapterConfig {
    config_with(json!({"peft_type": "TRAINABLE_TOKENS"}), extra)
}

/// Adapted, disabled, merged / unmerged and merge_and_unload logits, greedy ids.
fn check_forward_paths(case: &str, exact_unmerge: bool) {
    let exp = Expected::load(case);
    let mut m = adapter_peft(case, false);
    check_adapter_then_disabled(&mut m, &exp);
    check_greedy(&format!("{case}:"), &m, &exp);
    // Rows are replaced, not added: unmerging restores the base exactly.
    let before = base_weights(&m);
    check_merge_unmerge(&mut m, &exp, |_| {});
    for ((n, a), (_, b)) in before.iter().zip(base_weights(&m)).filter(|_| exact_unmerge) {
        assert_eq!(max_abs(&(a - &b).unwrap()), 0.0, "{case} {n}: unmerge must restore the rows exactly");
    }
    let mut m = adapter_peft(case, false);
    m.merge_and_unload(None, true).unwrap();
    check_logits("merge_and_unload", &m, &exp, "logits_merged");
}

/// Counts, trainable keys, loss and gradients (only the adapter's rows get one).
fn check_training(case: &str) {
    let exp = Expected::load(case);
    let cj = case_json(case);
    let m = adapter_peft(case, true);
    let (trainable, total) = m.nb_trainable_parameters();
    assert_eq!(trainable as u64, cj["trainable_params"].as_u64().unwrap(), "{case}: trainable parameters");
    assert_eq!(total as u64, cj["all_params"].as_u64().unwrap(), "{case}: all parameters");
    assert!(peft_core::engine::try_loss_and_grads(&m, &expected_batch(&exp), None, None).unwrap().is_none(), "{case}: the engine must decline trainable tokens");
    check_hf_loss_and_grads(case, &m);
}

#[test]
fn trainable_tokens_logits_merge_and_greedy_match_hf() {
    for case in STANDALONE {
        check_forward_paths(case, true);
    }
}

#[test]
fn trainable_tokens_counts_and_gradients_match_hf() {
    for case in STANDALONE {
        check_training(case);
    }
    let m = adapter_peft("llama_tt", false);
    assert_eq!(m.model_status().unwrap()["adapter_model_type"], "TrainableTokensModel");
    let status = m.layer_status().unwrap();
    assert_eq!(status.len(), 1, "{status:?}");
    // GPT-2: the embedding and the tied lm_head.
    let status = adapter_peft("gpt2_tt", false).layer_status().unwrap();
    assert_eq!(status.len(), 2, "{status:?}");
    // HF's module_type is the class name (`TrainableTokensLayer` has no `peft.` repr prefix).
    assert!(status.iter().all(|s| s["module_type"] == "TrainableTokensLayer"), "{status:?}");
}

#[test]
fn trainable_tokens_round_trip_is_byte_identical() {
    for case in STANDALONE {
        resave_case(case);
    }
}

#[test]
fn trainable_tokens_new_adapter_is_a_no_op_and_saves_hf_config() {
    for case in STANDALONE {
        let exp = Expected::load(case);
        let mut m = base_peft(case);
        let idx = token_indices(case);
        let targeted = m.add_adapter("default", tt(json!({"token_indices": idx})), 1).unwrap();
        let emb = if case.starts_with("gpt2") { "transformer.wte" } else { "model.embed_tokens" };
        assert!(targeted.contains(&emb.to_string()), "{targeted:?}");
        check_logits("fresh (init_weights=True)", &m, &exp, "logits_base");
        // HF writes the resolved input embedding name.
        let cfg = m.peft_config("default").unwrap().to_json();
        assert_eq!(cfg["target_modules"], json!(emb));
        let hf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(case_dir(case).join("adapter_config.json")).unwrap()).unwrap();
        for k in ["target_modules", "token_indices", "init_weights", "peft_type", "task_type"] {
            assert_eq!(cfg[k], hf[k], "{case}: {k}");
        }
        assert_eq!(m.nb_trainable_parameters(), (case_json(case)["trainable_params"].as_u64().unwrap() as usize, case_json(case)["all_params"].as_u64().unwrap() as usize));
        let keys: Vec<String> = m.adapter_state_dict("default").unwrap().into_iter().map(|(k, _)| k).collect();
        let hf_keys: Vec<String> = serde_json::from_value(case_json(case)["adapter_keys"].clone()).unwrap();
        assert_eq!(keys, hf_keys, "{case}: saved keys");
        // init_weights=false: random rows, the adapter changes the output.
        let mut m = base_peft(case);
        m.add_adapter("default", tt(json!({"token_indices": idx, "init_weights": false})), 1).unwrap();
        assert!(max_abs(&(forward_batch(&m, &exp) - exp.get("logits_base")).unwrap()) > 1e-3);
    }
}

#[test]
fn trainable_tokens_refuse_bad_input_as_hf() {
    let case = "llama_tt";
    let mut m = base_peft(case);
    let e = m.add_adapter("default", tt(json!({"token_indices": [1, 300]})), 1).unwrap_err();
    assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
    assert!(e.to_string().contains("token_indices") && e.to_string().contains("index 300 is out of bounds for dimension 0 with size 256"), "{e}");
    let e = m.add_adapter("default", tt(json!({"token_indices": [1], "target_modules": ["nope"]})), 1).unwrap_err();
    assert_eq!(e.code(), "ERR_NO_TARGET_MODULES", "{e}");
    assert!(e.to_string().contains("Target modules") && e.to_string().contains("nope"), "{e}");
    let e = AdapterConfig::from_json(&json!({"peft_type": "TRAINABLE_TOKENS", "token_indices": [1, -2]}), None).unwrap_err();
    assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
    assert!(e.to_string().contains("token_indices"), "{e}");
    assert!(m.adapter_names().is_empty());
    // GPT-2's Conv1D layers are refused (HF's forward: "unknown layer type").
    let mut g = base_peft("gpt2_tt");
    let e = g.add_adapter("default", tt(json!({"token_indices": [1], "target_modules": ["c_attn"]})), 1).unwrap_err();
    assert!(e.to_string().contains("TrainableTokensLayer wraps an unknown layer type"), "{e}");
    // Mixed batches: HF's standalone tuner has no hook for them; refused here.
    check_mixed_batch_refused(case, &adapter_peft(case, false), &[]);
}

#[test]
fn trainable_tokens_two_adapters_with_overlapping_rows() {
    let case = "llama_tt";
    let mut m = adapter_peft(case, false);
    // A second adapter on other rows; both active replace their own rows.
    m.add_adapter("b", tt(json!({"token_indices": [2, 3], "target_modules": "model.embed_tokens"})), 1).unwrap();
    let exp = Expected::load(case);
    check_logits("default still active", &m, &exp, "logits_adapter");
    m.set_adapter(&["b".to_string()]).unwrap();
    check_logits("b (no-op)", &m, &exp, "logits_base");
    // Both active: disjoint rows each replace their own; overlapping rows give HF's error.
    m.set_adapter(&["default".to_string(), "b".to_string()]).unwrap();
    check_logits("default + b (b a no-op)", &m, &exp, "logits_adapter");
    let idx = token_indices(case);
    m.add_adapter("c", tt(json!({"token_indices": [idx[0]], "target_modules": "model.embed_tokens"})), 1).unwrap();
    m.set_adapter(&["default".to_string(), "c".to_string()]).unwrap();
    let (ids, b, s) = exp.ids("input_ids");
    let e = m.forward(&ids, b, s, &Default::default(), None).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_STATE");
    assert!(e.to_string().contains("Token indices of adapter c are already defined"), "{e}");
    let e = m.merge_adapter(None, false).unwrap_err();
    assert!(e.to_string().contains("Token indices of adapter c are already defined"), "{e}");
}

#[test]
fn lora_trainable_token_indices_match_hf() {
    for case in WITH_LORA {
        check_forward_paths(case, false);
        check_training(case);
        resave_case(case);
        // Mixed batch: HF's wrapper gives each row its adapter's tokens.
        let exp = Expected::load(case);
        let m = adapter_peft(case, false);
        let (ids, b, s) = exp.ids("input_ids");
        let got = forward(&m, &ids, b, s, &exp.mask("attention_mask"), Some(vec![Some("default".into()), Some("__base__".into())].into_iter().map(|x: Option<String>| x.filter(|n| n != "__base__")).collect()));
        let (atol, rtol) = logits_tol(case);
        assert_close(&format!("{case} mixed"), &got, exp.get("logits_mixed"), atol, rtol);
    }
}

#[test]
fn lora_trainable_token_indices_new_adapter_and_errors() {
    for case in WITH_LORA {
        let exp = Expected::load(case);
        let hf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(case_dir(case).join("adapter_config.json")).unwrap()).unwrap();
        let mut cfg = hf.clone();
        cfg["init_lora_weights"] = json!(true);
        cfg["inference_mode"] = json!(false);
        let mut m = base_peft(case);
        m.add_adapter("default", AdapterConfig::from_json(&cfg, None).unwrap(), 1).unwrap();
        check_logits("fresh LoRA + trainable tokens (a no-op)", &m, &exp, "logits_base");
        let keys: Vec<String> = m.adapter_state_dict("default").unwrap().into_iter().map(|(k, _)| k).collect();
        let hf_keys: Vec<String> = serde_json::from_value(case_json(case)["adapter_keys"].clone()).unwrap();
        assert_eq!(keys, hf_keys, "{case}: saved keys");
        assert_eq!(m.nb_trainable_parameters().0 as u64, case_json(case)["trainable_params"].as_u64().unwrap(), "{case}: trainable");
        assert_eq!(m.peft_config("default").unwrap().to_json()["trainable_token_indices"], hf["trainable_token_indices"]);
    }
    let base = json!({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]});
    let with = |v: serde_json::Value| {
        let mut c = base.clone();
        c["trainable_token_indices"] = v;
        AdapterConfig::from_json(&c, None)
    };
    let mut m = base_peft("llama_lora_tt");
    let e = m.add_adapter("default", with(json!([1, 300])).unwrap(), 1).unwrap_err();
    assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
    assert!(e.to_string().contains("trainable_token_indices") && e.to_string().contains("index 300 is out of bounds for dimension 0 with size 256"), "{e}");
    let e = m.add_adapter("default", with(json!({"nope": [1]})).unwrap(), 1).unwrap_err();
    assert!(e.to_string().contains("trainable_token_indices") && e.to_string().contains("Target modules {'nope'} not found in the base model"), "{e}");
    let e = with(json!("x")).unwrap_err();
    assert!(e.to_string().contains("trainable_token_indices"), "{e}");
    let e = with(json!({"embed_tokens": [1, -1]})).unwrap_err();
    assert!(e.to_string().contains("trainable_token_indices") && e.to_string().contains("embed_tokens"), "{e}");
    assert!(m.adapter_names().is_empty());
}

/// HF `get_layer_status` names the standalone layer after the embedding (`model.<m>`) and the
/// layer of LoRA's `trainable_token_indices` after its wrapper's sub-module
/// (`model.<m>.token_adapter`); reference: `cases/compat_save_status.json`
/// (`__test__/scripts/make_save_status_fixtures.py`).
#[test]
fn trainable_tokens_layer_status_names_match_hf() {
    let p = fixtures_dir().join("cases/compat_save_status.json");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    for case in STANDALONE.iter().chain(WITH_LORA.iter()) {
        let m = adapter_peft(case, false);
        let got: BTreeSet<(String, String)> = m
            .layer_status()
            .unwrap()
            .iter()
            .filter(|s| s["module_type"] == "TrainableTokensLayer")
            .map(|s| (s["name"].as_str().unwrap().to_string(), s["module_type"].as_str().unwrap().to_string()))
            .collect();
        let exp: BTreeSet<(String, String)> = reference["layer_status"][case]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e[0].as_str().unwrap().to_string(), e[1].as_str().unwrap().to_string()))
            .collect();
        assert!(!exp.is_empty(), "{case}: no reference");
        assert_eq!(got, exp, "{case}");
    }
}
