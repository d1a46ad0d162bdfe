//! Adaption prompt (LLaMA-Adapter; issue 15) against HF PEFT 0.21:
//! `__test__/fixtures/cases/llama_adaption_prompt` (adapter_len=4, adapter_layers=1 on the tiny
//! GQA Llama, gate set to a seeded non-zero value), `llama_adaption_prompt_multi` (a second
//! adapter on both layers), `llama3_adaption_prompt` (Llama 3.x RoPE scaling) and
//! `mistral_adaption_prompt` (`model_type` "mistral"); made by
//! `__test__/scripts/make_adaption_prompt_fixtures.py`.
//!
//! Run: `cargo test -p peft-core --release --test adaption_prompt`.

mod common;

use candle_core::Tensor;
use common::*;
use peft_core::generate::{generate, GenerateOptions};
use peft_core::train::{loss_and_grads, AdamW};
use peft_core::tuners::config::AdapterConfig;
use serde_json::json;
use std::collections::BTreeSet;

const CASE: &str = "llama_adaption_prompt";

fn config(extra: serde_json::Value) -> AdapterConfig {
    config_with(json!({"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "adapter_len": 4, "adapter_layers": 1}), extra)
}

fn hf_loss(exp: &Expected) -> f64 {
    exp.get("loss").flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64
}

#[test]
fn adaption_prompt_logits_disabled_and_greedy_match_hf() {
    for case in [CASE, "llama3_adaption_prompt", "mistral_adaption_prompt"] {
        let exp = Expected::load(case);
        let mut m = adapter_peft(case, false);
        assert_eq!(m.peft_type(), Some("ADAPTION_PROMPT"));
        check_logits("adapter", &m, &exp, "logits_adapter");
        assert!(max_abs(&(exp.get("logits_adapter") - exp.get("logits_base")).unwrap()) > 1e-3, "{case}: the adapter must change the logits");
        let (ids, _, _) = exp.ids("input_ids");
        let prompt: Vec<u32> = ids[..5].to_vec();
        let opts = GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![], pad_token_id: 0, ..Default::default() };
        for use_cache in [true, false] {
            let got = generate(&m, &prompt, 1, 5, None, None, &GenerateOptions { use_cache, ..opts.clone() }, &|| false).unwrap();
            assert_eq!(got, exp.rows_u32("greedy"), "{case} greedy ids (use_cache={use_cache})");
        }
        m.set_disabled(true).unwrap();
        check_logits("disabled", &m, &exp, "logits_disabled");
        check_logits("disabled = base", &m, &exp, "logits_base");
        m.set_disabled(false).unwrap();
        check_logits("enabled again", &m, &exp, "logits_adapter");
    }
}

#[test]
fn adaption_prompt_loss_gradients_and_counts_match_hf() {
    for case in [CASE, "llama3_adaption_prompt", "mistral_adaption_prompt"] {
        let exp = Expected::load(case);
        let m = adapter_peft(case, true);
        check_hf_counts(case, &m);
        // The fused engine declines a model whose attention carries an adaption prompt.
        assert!(peft_core::engine::try_loss_and_grads(&m, &expected_batch(&exp), None, None).unwrap().is_none(), "the engine must decline adaption prompts");
        let (loss, _, grads) = loss_and_grads(&m, &expected_batch(&exp), None, None).unwrap_or_else(|e| panic!("loss_and_grads: [{}] {e}", e.code()));
        let want = hf_loss(&exp);
        visible(&format!("diff {case} loss: got {loss:.8} expected {want:.8}"));
        assert!((loss - want).abs() <= 1e-5, "{case} loss {loss} vs {want}");
        let params = m.trainable_parameters();
        let keys: BTreeSet<String> = params.iter().map(|(k, _)| k.clone()).collect();
        let want_keys: BTreeSet<String> = exp.t.keys().filter_map(|k| k.strip_prefix("grad.")).map(String::from).collect();
        assert_eq!(keys, want_keys, "{case} trainable parameters vs HF's grad.* keys");
        for (k, v) in &params {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {k}"));
            let e = exp.get(&format!("grad.{k}"));
            assert!(max_abs(e) > 0.0, "{case} {k}: HF's gradient is zero");
            assert_close(&format!("{case} grad.{k}"), g, e, 1e-4 * max_abs(e), 1e-4);
        }
    }
}

#[test]
fn adaption_prompt_round_trip_is_byte_identical() {
    for case in [CASE, "llama3_adaption_prompt", "mistral_adaption_prompt"] {
        resave_case(case);
    }
}

#[test]
fn adaption_prompt_training_step_changes_only_the_adapter() {
    let exp = Expected::load(CASE);
    let m = adapter_peft(CASE, true);
    let base_before = base_weights(&m);
    let params = m.trainable_parameters();
    let before: Vec<Tensor> = params.iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
    let mut opt = AdamW::new(params.clone(), candle_nn::ParamsAdamW { lr: 1e-2, ..Default::default() }).unwrap();
    let (l0, _, grads) = loss_and_grads(&m, &expected_batch(&exp), None, None).unwrap();
    opt.step(&grads).unwrap();
    for ((k, v), b) in params.iter().zip(&before) {
        assert!(max_abs(&(v.as_tensor() - b).unwrap()) > 0.0, "{k} did not change");
    }
    for ((n, a), (_, b)) in base_before.iter().zip(base_weights(&m)) {
        assert_eq!(max_abs(&(a - &b).unwrap()), 0.0, "base weight {n} changed");
    }
    let (l1, _, _) = loss_and_grads(&m, &expected_batch(&exp), None, None).unwrap();
    assert!(l1 < l0, "one AdamW step should lower the loss: {l0} -> {l1}");
    // Loaded for inference, nothing trains.
    assert!(adapter_peft(CASE, false).trainable_parameters().is_empty());
}

#[test]
fn adaption_prompt_second_adapter_switches_and_saves_as_hf() {
    let case = "llama_adaption_prompt_multi";
    let exp = Expected::load(case);
    let cj = case_json(case);
    let mut m = adapter_peft(case, true);
    m.load_adapter(&case_dir(case).join("other"), "other", true, None).unwrap();
    check_logits("default", &m, &exp, "logits_adapter");
    m.set_adapter(&["other".to_string()]).unwrap();
    check_logits("other", &m, &exp, "logits_other");
    let (trainable, _) = m.nb_trainable_parameters();
    assert_eq!(trainable as u64, cj["trainable_params_other_active"].as_u64().unwrap());
    let e = m.set_adapter(&["default".to_string(), "other".to_string()]).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT", "{e}");
    m.set_adapter(&["default".to_string()]).unwrap();
    let out = temp_dir("adaption-multi");
    m.save_pretrained(&out, None).unwrap();
    for f in ["adapter_model.safetensors", "other/adapter_model.safetensors"] {
        assert!(std::fs::read(out.join(f)).unwrap() == std::fs::read(case_dir(case).join(f)).unwrap(), "{f}");
    }
    remove_dir(&out);
    // Deleting the active adapter activates the remaining one (HF `delete_adapter`).
    m.delete_adapter("default").unwrap();
    assert_eq!(m.active_adapters(), ["other".to_string()]);
    check_logits("other after delete", &m, &exp, "logits_other");
    m.unload().unwrap();
    check_logits("unloaded", &m, &Expected::load(CASE), "logits_base");
}

#[test]
fn adaption_prompt_refusals_are_coded_and_name_the_field() {
    let cj = case_json(CASE);
    let msgs = &cj["messages"];
    // Merging: HF's AdaptionPromptModel has no merge.
    let mut m = adapter_peft(CASE, false);
    for e in [m.merge_adapter(None, false).unwrap_err(), m.merge_and_unload(None, false).unwrap_err()] {
        assert_eq!(e.code(), "ERR_INVALID_STATE");
        assert!(e.to_string().contains(msgs["merge_and_unload"].as_str().unwrap()), "{e}");
    }
    let e = m.layer_status().unwrap_err();
    assert!(e.to_string().contains(msgs["layer_status"].as_str().unwrap()), "{e}");
    // Mixed batches.
    let exp = Expected::load(CASE);
    let (ids, b, s) = exp.ids("input_ids");
    let opts = peft_core::model::ForwardOptions { adapter_rows: Some(std::sync::Arc::new(vec![Some("default".into()); b])), ..Default::default() };
    assert_eq!(m.forward(&ids, b, s, &opts, None).unwrap_err().code(), "ERR_INVALID_ARGUMENT");
    check_logits("after the refusals", &m, &exp, "logits_adapter");
    // HF's errors when the adapter does not fit the model.
    let mut fresh = base_peft(CASE);
    let e = fresh.add_adapter("x", config(json!({"adapter_layers": 3})), 1).unwrap_err();
    assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
    assert!(e.to_string().contains(msgs["too_many_layers"].as_str().unwrap()), "{e}");
    let e = fresh.add_adapter("x", config(json!({"target_modules": "mlp"})), 1).unwrap_err();
    assert!(e.to_string().contains("target_modules"), "{e}");
    assert!(fresh.adapter_names().is_empty());
    let mut qwen3 = peft_core::peft_model::PeftModel::new(
        peft_core::model::loader::load_causal_lm(&fixtures_dir().join("models/qwen3"), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap().model,
    );
    let e = qwen3.add_adapter("x", config(json!({})), 1).unwrap_err();
    assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
    assert!(e.to_string().contains(msgs["unsupported_qwen3"].as_str().unwrap()), "{e}");
    // Bad values, each naming its field.
    for (bad, what) in [
        (json!({"adapter_len": 0}), "adapter_len"),
        (json!({"adapter_len": null}), "adapter_len"),
        (json!({"adapter_len": 2.5}), "adapter_len"),
        (json!({"adapter_layers": 0}), "adapter_layers"),
        (json!({"adapter_layers": -1}), "adapter_layers"),
        (json!({"target_modules": ["self_attn"]}), "target_modules"),
        (json!({"inference_mode": "yes"}), "inference_mode"),
    ] {
        let mut c = json!({"peft_type": "ADAPTION_PROMPT", "adapter_len": 4, "adapter_layers": 1});
        for (k, v) in bad.as_object().unwrap() {
            c[k] = v.clone();
        }
        let e = AdapterConfig::from_json(&c, None).unwrap_err();
        assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
}

#[test]
fn adaption_prompt_new_adapter_is_a_no_op_and_its_config_is_hfs() {
    let exp = Expected::load(CASE);
    let mut m = base_peft(CASE);
    let targeted = m.add_adapter("default", config(json!({"base_model_name_or_path": "models/llama"})), 5).unwrap();
    assert_eq!(targeted, vec!["model.layers.1.self_attn".to_string()]);
    // Zero-init gate: the new adapter leaves the model unchanged (HF).
    check_logits("fresh adapter", &m, &exp, "logits_base");
    assert_eq!(m.nb_trainable_parameters().0 as u64, case_json(CASE)["trainable_params"].as_u64().unwrap());
    // HF's prepare_config fills target_modules; the file equals HF's adapter_config.json.
    let out = temp_dir("adaption-fresh");
    m.save_pretrained(&out, None).unwrap();
    let ours = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
    assert_eq!(ours, std::fs::read_to_string(case_dir(CASE).join("adapter_config.json")).unwrap());
    let keys: Vec<String> = peft_core::io::read_safetensors(&out.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap().into_iter().map(|(k, _)| k).collect();
    let want: Vec<String> = case_json(CASE)["adapter_keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()).collect();
    assert_eq!(keys.into_iter().collect::<BTreeSet<_>>(), want.into_iter().collect::<BTreeSet<_>>());
    remove_dir(&out);
    // HF's to_dict of a fully specified config parses and writes back unchanged.
    let hf = case_json(CASE)["messages"]["options_to_dict"].clone();
    let c = AdapterConfig::from_json(&hf, None).unwrap();
    assert!(c.unknown_fields().is_empty(), "{:?}", c.unknown_fields());
    assert_eq!(c.to_json(), hf);
}
