//! VeRA (issue 15) against HF PEFT 0.21: `__test__/fixtures/cases/llama_vera` (VeraConfig r=4 on
//! q_proj/v_proj/down_proj of the tiny Llama, projection_prng_key=7, init_weights=False, lambda_b
//! randomised), `llama_vera_noproj` (the same saved with save_projection=False),
//! `llama_vera_multi` (a second adapter sharing the projections) and `gpt2_vera` (Conv1D);
//! made by `__test__/scripts/make_vera_fixtures.py`.
//!
//! Run: `cargo test -p peft-core --release --test vera`.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use peft_core::train::loss_and_grads;
use peft_core::tuners::config::AdapterConfig;
use peft_core::tuners::vera::TorchGenerator;
use serde_json::json;

const CASE: &str = "llama_vera";

fn file_tensor(case: &str, key: &str) -> Tensor {
    let t = peft_core::io::read_safetensors(&case_dir(case).join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    t.into_iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("{case}: no `{key}`")).1
}

fn vera(extra: serde_json::Value) -> AdapterConfig {
    config_with(json!({"peft_type": "VERA", "task_type": "CAUSAL_LM", "r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "projection_prng_key": 7}), extra)
}

#[test]
fn vera_logits_adapted_disabled_merged_and_greedy_match_hf() {
    let exp = Expected::load(CASE);
    let mut m = adapter_peft(CASE, false);
    assert_eq!(m.peft_type(), Some("VERA"));
    check_adapter_then_disabled(&mut m, &exp);
    check_greedy("", &m, &exp);
    check_merge_unmerge(&mut m, &exp, |_| {});
    check_merge_and_unload(CASE, &exp);
}

#[test]
fn vera_round_trip_is_byte_identical() {
    for case in [CASE, "llama_vera_noproj", "gpt2_vera"] {
        resave_case(case);
    }
}

#[test]
fn vera_counts_status_and_gradients_match_hf() {
    let exp = Expected::load(CASE);
    let m = adapter_peft(CASE, true);
    check_counts_and_status(CASE, &m, 6, "vera.Linear", "VeraModel");
    // The fused engine declines VeRA layers, so training takes the general path.
    assert!(peft_core::engine::try_loss_and_grads(&m, &expected_batch(&exp), None, None).unwrap().is_none(), "the engine must decline VeRA");
    check_hf_loss_and_grads(CASE, &m);
}

#[test]
fn vera_projections_are_torchs_draw() {
    // torch.Generator().manual_seed(7): vera_A [4, 128] then vera_B [64, 4], kaiming-uniform.
    let mut g = TorchGenerator::new(7);
    let a = Tensor::from_vec(g.kaiming(4, 128), (4, 128), &Device::Cpu).unwrap();
    let b = Tensor::from_vec(g.kaiming(64, 4), (64, 4), &Device::Cpu).unwrap();
    assert_eq!(max_abs(&(&a - file_tensor(CASE, "base_model.vera_A")).unwrap()), 0.0, "vera_A");
    assert_eq!(max_abs(&(&b - file_tensor(CASE, "base_model.vera_B")).unwrap()), 0.0, "vera_B");
    // A fresh adapter draws the same projections (init_weights=True: a no-op) and saves them.
    let exp = Expected::load(CASE);
    let mut m = base_peft(CASE);
    assert_eq!(m.add_adapter("default", vera(json!({})), 3).unwrap().len(), 6);
    check_logits("fresh VeRA (init_weights=True)", &m, &exp, "logits_base");
    let sd: std::collections::HashMap<String, Tensor> = m.adapter_state_dict("default").unwrap().into_iter().collect();
    assert_eq!(max_abs(&(&sd["base_model.vera_A"] - &a).unwrap()), 0.0);
    assert_eq!(max_abs(&(&sd["base_model.vera_B"] - &b).unwrap()), 0.0);
    let ld = sd["base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_d"].to_vec1::<f32>().unwrap();
    assert_eq!(ld, vec![0.1f32; 4], "lambda_d = d_initial");
    assert_eq!(m.nb_trainable_parameters().0 as u64, case_json(CASE)["trainable_params"].as_u64().unwrap());
}

#[test]
fn vera_without_saved_projections_loads_from_the_key() {
    let exp = Expected::load("llama_vera_noproj");
    let mut m = base_peft("llama_vera_noproj");
    m.load_adapter(&case_dir("llama_vera_noproj"), "default", false, None).unwrap();
    check_logits("save_projection=False", &m, &exp, "logits_adapter");
    assert!(m.take_warnings().iter().any(|w| w.contains("PRNG initialisation")));
    // save_projection=True but the file lacks them: HF's error, with the file named.
    let dir = temp_dir("vera-noproj");
    copy_files(&case_dir("llama_vera_noproj"), &dir);
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap().replace("\"save_projection\": false", "\"save_projection\": true");
    std::fs::write(&cfg_path, text).unwrap();
    let mut m = base_peft("llama_vera_noproj");
    let e = m.load_adapter(&dir, "default", false, None).unwrap_err();
    assert_eq!(e.code(), "ERR_SAFETENSORS_INVALID");
    assert!(e.to_string().contains("base_model.vera_A") && e.to_string().contains("adapter_model.safetensors"), "{e}");
    assert!(m.adapter_names().is_empty());
    remove_dir(&dir);
}

#[test]
fn vera_second_adapter_shares_the_projections() {
    let case = "llama_vera_multi";
    let exp = Expected::load(case);
    let mut m = adapter_peft(case, false);
    m.load_adapter(&case_dir(case).join("other"), "other", false, None).unwrap();
    check_logits("default", &m, &exp, "logits_adapter");
    m.set_adapter(&["other".to_string()]).unwrap();
    check_logits("other", &m, &exp, "logits_other");
    // Saving both writes HF's two folders byte for byte.
    let out = temp_dir("vera-multi");
    m.save_pretrained(&out, None).unwrap();
    for f in ["adapter_model.safetensors", "other/adapter_model.safetensors", "adapter_config.json", "other/adapter_config.json"] {
        assert!(std::fs::read(out.join(f)).unwrap() == std::fs::read(case_dir(case).join(f)).unwrap(), "{f}");
    }
    remove_dir(&out);
    // HF's refusals for a later adapter.
    for (extra, what) in [
        (json!({"projection_prng_key": 3}), "PRNG initialisation key must be the same"),
        (json!({"save_projection": false}), "saved for all adapters or none"),
        (json!({"r": 8}), "same r"),
    ] {
        let e = m.add_adapter("bad", vera(extra), 1).unwrap_err();
        assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
        assert!(e.to_string().contains(what), "{e}");
    }
    // Projections sized for q/v (in 64) cannot serve down_proj (in 128) of a later adapter.
    let mut m2 = base_peft(case);
    m2.add_adapter("a", vera(json!({"target_modules": ["q_proj"]})), 1).unwrap();
    let e = m2.add_adapter("b", vera(json!({"target_modules": ["down_proj"]})), 1).unwrap_err();
    assert!(e.to_string().contains("vera_A has a size of 64 but 128 or greater is required"), "{e}");
    assert_eq!(m2.adapter_names(), vec!["a".to_string()]);
}

#[test]
fn vera_gpt2_conv1d_matches_hf() {
    let case = "gpt2_vera";
    let exp = Expected::load(case);
    let mut m = adapter_peft(case, true);
    check_logits("adapter", &m, &exp, "logits_adapter");
    let (loss, _, grads) = loss_and_grads(&m, &expected_batch(&exp), None, None).unwrap();
    let want = exp.get("loss").flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    assert!((loss - want).abs() <= 1e-5, "loss {loss} vs {want}");
    for (k, v) in &m.trainable_parameters() {
        let e = exp.get(&format!("grad.{k}"));
        assert_close(&format!("grad.{k}"), grads.get(v.as_tensor()).unwrap(), e, 1e-4 * max_abs(e), 1e-4);
    }
    assert_eq!(m.nb_trainable_parameters().0 as u64, case_json(case)["trainable_params"].as_u64().unwrap());
    m.set_disabled(true).unwrap();
    check_logits("disabled", &m, &exp, "logits_disabled");
    m.set_disabled(false).unwrap();
    m.merge_adapter(None, true).unwrap();
    check_logits("merged", &m, &exp, "logits_merged");
    // A new adapter on Conv1D layers gets fan_in_fan_out=true with HF's warning.
    let mut m = base_peft(case);
    let cfg = AdapterConfig::from_json(&json!({"peft_type": "VERA", "r": 4, "target_modules": ["c_attn"]}), None).unwrap();
    m.add_adapter("default", cfg, 1).unwrap();
    assert_eq!(m.peft_config("default").unwrap().to_json()["fan_in_fan_out"], json!(true));
    assert!(m.take_warnings().iter().any(|w| w.contains("Setting fan_in_fan_out to True")));
}

#[test]
fn vera_config_parses_hf_options_and_refuses_bad_ones() {
    check_hf_options_roundtrip(CASE);
    check_config_refusals(&[
        (json!({"peft_type": "VERA", "r": 0, "target_modules": ["q_proj"]}), "`r`"),
        (json!({"peft_type": "VERA", "vera_dropout": 1.5, "target_modules": ["q_proj"]}), "vera_dropout"),
        (json!({"peft_type": "VERA", "bias": "lora_only", "target_modules": ["q_proj"]}), "bias"),
        (json!({"peft_type": "VERA", "projection_prng_key": "x", "target_modules": ["q_proj"]}), "projection_prng_key"),
        (json!({"peft_type": "VERA", "d_initial": null, "target_modules": ["q_proj"]}), "d_initial"),
        (json!({"peft_type": "VERA", "layers_pattern": "layers", "target_modules": ["q_proj"]}), "layers_to_transform"),
    ]);
    let mut m = base_peft(CASE);
    for (extra, what) in [(json!({"target_modules": ["embed_tokens"]}), "not supported"), (json!({"target_modules": ["nope"]}), "")] {
        let e = m.add_adapter("x", vera(extra), 1).unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
    }
    assert!(m.adapter_names().is_empty());
}

#[test]
fn vera_dropout_applies_in_training_only() {
    let exp = Expected::load(CASE);
    let make = |p: f64| {
        let mut m = base_peft(CASE);
        m.add_adapter("default", vera(json!({"init_weights": false, "vera_dropout": p})), 3).unwrap();
        m
    };
    let rng = || Some(std::sync::Arc::new(std::sync::Mutex::new(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(11))));
    let (plain, dropped) = (make(0.0), make(0.5));
    assert_eq!(max_abs(&(forward_batch(&plain, &exp) - forward_batch(&dropped, &exp)).unwrap()), 0.0, "dropout acts in eval");
    let (lp, _, _) = loss_and_grads(&plain, &expected_batch(&exp), None, rng()).unwrap();
    let (ld, _, g) = loss_and_grads(&dropped, &expected_batch(&exp), None, rng()).unwrap();
    assert!(ld.is_finite() && (ld - lp).abs() > 1e-7, "dropout: {ld} vs {lp}");
    assert!(dropped.trainable_parameters().iter().all(|(_, v)| g.get(v.as_tensor()).is_some()));
}

#[test]
fn vera_bias_all_and_vera_only_match_hf() {
    for case in ["gpt2_vera_bias_all", "gpt2_vera_bias_only"] {
        let exp = Expected::load(case);
        let cj = case_json(case);
        let m = adapter_peft(case, true);
        check_logits("adapter (saved biases loaded)", &m, &exp, "logits_adapter");
        check_hf_counts(case, &m);
        let (loss, _, grads) = loss_and_grads(&m, &expected_batch(&exp), None, None).unwrap();
        let want = exp.get("loss").flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((loss - want).abs() <= 1e-5, "{case} loss {loss} vs {want}");
        for (k, v) in m.trainable_parameters().iter().filter(|(k, _)| k.contains("vera_lambda")) {
            let e = exp.get(&format!("grad.{k}"));
            assert_close(&format!("{case} grad.{k}"), grads.get(v.as_tensor()).unwrap(), e, 1e-4 * max_abs(e), 1e-4);
        }
        let out = temp_dir("vera-bias");
        m.save_pretrained(&out, None).unwrap();
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            assert!(std::fs::read(out.join(f)).unwrap() == std::fs::read(case_dir(case).join(f)).unwrap(), "{case} {f} differs from HF's");
        }
        remove_dir(&out);
        // A fresh adapter with the same config trains the same set of parameters as HF.
        let mut fresh = base_peft(case);
        let mut c = cj["config_kwargs"].clone();
        c["peft_type"] = json!("VERA");
        fresh.add_adapter("default", AdapterConfig::from_json(&c, None).unwrap(), 1).unwrap();
        assert_eq!(fresh.nb_trainable_parameters().0 as u64, cj["trainable_params"].as_u64().unwrap(), "{case} fresh trainable count");
    }
}
