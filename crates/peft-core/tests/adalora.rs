//! AdaLoRA (issue 15) against HF PEFT 0.21: `__test__/fixtures/cases/llama_adalora_init` (AdaLoRA
//! init_r=6 target_r=3 lora_alpha=16 on q_proj/v_proj/down_proj of the tiny Llama, tinit=2
//! tfinal=3 deltaT=2 total_step=10, `lora_E` random, and HF's trajectory of 10 SGD steps with
//! `update_and_allocate` after each), `llama_adalora` (that model saved after the steps: a
//! `rank_pattern` with layers pruned to 0, 2, 4 and 6 triplets) and `gpt2_adalora` (GPT-2
//! `c_attn`, `Conv1D`); made by `__test__/scripts/make_adalora_fixtures.py`.
//!
//! Run: `cargo test -p peft-core --profile test-release --test adalora`.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use peft_core::peft_model::PeftModel;
use peft_core::train::{loss_and_grads, Trainer, TrainingArgs};
use peft_core::tuners::adalora::{AdaLoraConfig, ONE_TRAINABLE};
use peft_core::tuners::config::AdapterConfig;
use serde_json::json;

const INIT: &str = "llama_adalora_init";
const CASE: &str = "llama_adalora";
const GPT2: &str = "gpt2_adalora";

fn adalora(extra: serde_json::Value) -> AdapterConfig {
    config_with(json!({"peft_type": "ADALORA", "task_type": "CAUSAL_LM", "init_r": 4, "target_r": 2, "total_step": 10, "target_modules": ["q_proj", "v_proj"]}), extra)
}

/// The loss (with the orthogonal regularisation) and every gradient of `m` against the case's
/// (`check_hf_loss_and_grads`; HF's empty gradients of rank-0 layers have no counterpart with
/// elements), with at least 6 gradients compared.
fn check_grads(case: &str, m: &PeftModel) {
    let (checked, _) = check_hf_loss_and_grads(case, m);
    assert!(checked >= 6, "{case}: only {checked} gradients compared");
}

fn gpt2_peft(case: &str) -> PeftModel {
    adapter_peft(case, true)
}

#[test]
fn adalora_with_rank_pattern_logits_disabled_merged_and_greedy_match_hf() {
    let exp = Expected::load(CASE);
    let mut m = adapter_peft(CASE, false);
    assert_eq!(m.peft_type(), Some("ADALORA"));
    // The loaded layers hold the kept triplets only (HF resize_modules_by_rank_pattern).
    let ranks = case_json(CASE)["ranks"].clone();
    for (k, v) in m.adapter_state_dict("default").unwrap() {
        if let Some(mname) = k.strip_prefix("base_model.model.").and_then(|k| k.strip_suffix(".lora_E")) {
            assert_eq!(v.dims(), &[ranks[format!("{mname}.lora_E")].as_u64().unwrap() as usize, 1], "{k}");
        }
    }
    check_logits("adapter", &m, &exp, "logits_adapter");
    check_greedy("", &m, &exp);
    m.set_disabled(true).unwrap();
    check_logits("disabled", &m, &exp, "logits_disabled");
    m.set_disabled(false).unwrap();
    let before = base_weights(&m);
    m.merge_adapter(None, true).unwrap();
    check_logits("merged", &m, &exp, "logits_merged");
    m.unmerge_adapter().unwrap();
    check_logits("unmerged", &m, &exp, "logits_adapter");
    for ((n, a), (_, b)) in before.iter().zip(base_weights(&m)) {
        let d = max_abs(&(a - &b).unwrap());
        assert!(d <= 1e-6, "{n}: unmerged weight differs from the base by {d:e}");
    }
    m.merge_and_unload(None, true).unwrap();
    check_logits("merge_and_unload", &m, &exp, "logits_merged");
    // Mixed batches are refused (HF's SVDLinear ignores adapter_names).
    let m = adapter_peft(CASE, false);
    let (ids, b, s) = exp.ids("input_ids");
    let e = m
        .forward(&ids, b, s, &peft_core::model::ForwardOptions { adapter_rows: Some(std::sync::Arc::new(vec![Some("default".into()); b])), ..Default::default() }, None)
        .unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT", "{e}");
}

#[test]
fn adalora_round_trip_is_byte_identical() {
    for case in [CASE, INIT, GPT2] {
        if case == GPT2 {
            let m = gpt2_peft(GPT2);
            let out = temp_dir("adalora-gpt2");
            m.save_pretrained(&out, None).unwrap();
            for f in ["adapter_model.safetensors", "adapter_config.json"] {
                assert!(std::fs::read(case_dir(GPT2).join(f)).unwrap() == std::fs::read(out.join(f)).unwrap(), "{GPT2}: re-saved {f} differs");
            }
            remove_dir(&out);
        } else {
            resave_case(case);
        }
    }
}

#[test]
fn adalora_loss_with_orth_reg_gradients_and_counts_match_hf() {
    let m = adapter_peft(CASE, true);
    // The total includes HF's frozen one-element `ranknum` per layer.
    check_counts_and_status(CASE, &m, 6, "adalora.SVDLinear", "AdaLoraModel");
    check_grads(CASE, &m);
    // GPT-2 Conv1D.
    let exp = Expected::load(GPT2);
    let mut g = gpt2_peft(GPT2);
    assert_eq!(g.nb_trainable_parameters().0 as u64, case_json(GPT2)["trainable_params"].as_u64().unwrap(), "GPT-2 trainable parameters");
    check_logits("gpt2 adapter", &g, &exp, "logits_adapter");
    check_grads(GPT2, &g);
    g.set_disabled(true).unwrap();
    check_logits("gpt2 disabled", &g, &exp, "logits_disabled");
    g.set_disabled(false).unwrap();
    g.merge_adapter(None, true).unwrap();
    check_logits("gpt2 merged", &g, &exp, "logits_merged");
    // A fresh adapter from HF's init case's config: HF's trainable count.
    let mut f = base_peft(INIT);
    let cfg = AdapterConfig::from_file(&case_dir(INIT).join("adapter_config.json")).unwrap();
    let mut cfg = cfg;
    cfg.set_inference_mode(false);
    f.add_adapter("default", cfg, 3).unwrap();
    let (trainable, total) = f.nb_trainable_parameters();
    assert_eq!((trainable as u64, total as u64), (case_json(INIT)["trainable_params"].as_u64().unwrap(), case_json(INIT)["all_params"].as_u64().unwrap()), "fresh adapter's counts");
    // HF warns that AdaLoRA ignores LoRA's `r`.
    let mut w = base_peft(INIT);
    w.add_adapter("default", adalora(json!({"r": 4})), 1).unwrap();
    assert!(w.take_warnings().iter().any(|x| x.starts_with("Note that `r` is not used in AdaLora")));
}

#[test]
fn adalora_allocator_trajectory_matches_hf() {
    let exp = Expected::load(INIT);
    let cj = case_json(INIT);
    let lr = cj["sgd_lr"].as_f64().unwrap();
    let m = adapter_peft(INIT, true);
    check_logits("initial adapter", &m, &exp, "logits_adapter");
    let batch = expected_batch(&exp);
    for step in 0..10 {
        let (loss, _, grads) = loss_and_grads(&m, &batch, None, None).unwrap();
        let want = exp.get(&format!("loss.{step}")).flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((loss - want).abs() <= 1e-5, "step {step}: loss {loss} vs HF {want}");
        for (k, v) in m.trainable_parameters() {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("step {step}: no gradient for {k}"));
            v.set(&(v.as_tensor() - (g * lr).unwrap()).unwrap()).unwrap();
        }
        m.update_and_allocate(step, &grads).unwrap();
        for (k, v) in m.trainable_parameters() {
            assert_close(&format!("step {step} {k}"), v.as_tensor(), exp.get(&format!("step{step}.{k}")), 1e-5, 1e-4);
        }
        let got = m.peft_config("default").unwrap().to_json()["rank_pattern"].clone();
        assert_eq!(got, cj["rank_patterns"][step], "step {step}: rank_pattern");
    }
    visible("ok llama_adalora_init: 10 steps, weights within 1e-5 and every rank pattern identical to HF's");
    // The saved adapter: HF's config byte for byte, HF's tensors (pruned) within 1e-5.
    let out = temp_dir("adalora-trained");
    m.save_pretrained(&out, None).unwrap();
    assert_eq!(std::fs::read_to_string(out.join("adapter_config.json")).unwrap(), std::fs::read_to_string(case_dir(CASE).join("adapter_config.json")).unwrap());
    let ours = peft_core::io::read_safetensors(&out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let hf = peft_core::io::read_safetensors(&case_dir(CASE).join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(ours.len(), hf.len());
    for (k, t) in &hf {
        let o = &ours.iter().find(|(n, _)| n == k).unwrap_or_else(|| panic!("{k} not saved")).1;
        assert_eq!(o.dims(), t.dims(), "{k}");
        if t.elem_count() > 0 {
            assert_close(k, o, t, 1e-5, 1e-4);
        }
    }
    remove_dir(&out);
}

#[test]
fn adalora_trainer_allocates_and_the_pruned_adapter_reloads() {
    let exp = Expected::load(CASE);
    let mut m = base_peft(CASE);
    m.add_adapter("default", adalora(json!({"tinit": 0, "tfinal": 1, "deltaT": 1, "total_step": 4, "init_lora_weights": false})), 5).unwrap();
    let batch = expected_batch(&exp);
    let mut tr = Trainer::new(&m, TrainingArgs { learning_rate: 1e-2, max_steps: 4, seed: 1, ..Default::default() }).unwrap();
    for _ in 0..4 {
        tr.step(&m, std::slice::from_ref(&batch)).unwrap();
    }
    // After total_step - tfinal = 3: the final pattern keeps target_r · layers = 2 · 4 triplets.
    let cfg = m.peft_config("default").unwrap().get::<AdaLoraConfig>().unwrap().clone();
    let pattern = cfg.rank_pattern().expect("a rank pattern after the budgeting phase");
    assert_eq!(pattern.len(), 4);
    assert_eq!(pattern.iter().map(|(_, v)| v.iter().filter(|k| **k).count()).sum::<usize>(), 8, "{pattern:?}");
    for (k, v) in m.adapter_state_dict("default").unwrap() {
        if let Some(mname) = k.strip_prefix("base_model.model.").and_then(|k| k.strip_suffix(".lora_E")) {
            let keep = &pattern.iter().find(|(p, _)| p == &format!("{mname}.lora_E")).unwrap().1;
            assert_eq!(v.dims()[0], keep.iter().filter(|k| **k).count(), "{k}: the saved lora_E holds the kept triplets");
        }
    }
    let before = forward_batch(&m, &exp);
    let out = temp_dir("adalora-trainer");
    m.save_pretrained(&out, None).unwrap();
    let mut again = base_peft(CASE);
    again.load_adapter(&out, "default", false, None).unwrap();
    assert_close("reloaded pruned adapter", &forward_batch(&again, &exp), &before, 1e-5, 1e-5);
    remove_dir(&out);
}

#[test]
fn adalora_config_matches_hf_and_refuses_bad_values() {
    let cj = case_json(INIT);
    let hf = cj["options_to_dict"].clone();
    let c = AdapterConfig::from_json(&hf, None).unwrap();
    assert!(c.unknown_fields().is_empty(), "{:?}", c.unknown_fields());
    let mut want = hf.clone();
    want["peft_version"] = json!("0.21.0");
    assert_eq!(c.to_json(), want);
    let r = &cj["refusals"];
    for (patch, msg) in [
        (json!({"total_step": null}), r["total_step_missing"].as_str().unwrap()),
        (json!({"tinit": 5, "tfinal": 5}), r["no_budgeting_phase"].as_str().unwrap()),
        (json!({"use_dora": true}), r["use_dora"].as_str().unwrap()),
        (json!({"orth_reg_weight": -1.0}), r["orth_reg_weight"].as_str().unwrap()),
        (json!({"beta2": 0}), "`beta2`"),
        (json!({"deltaT": 0}), "`deltaT`"),
        (json!({"target_r": "2"}), "`target_r`"),
        (json!({"rank_pattern": [true]}), "`rank_pattern`"),
        (json!({"loftq_config": {"loftq_bits": 4}}), "does not support LOFTQ"),
        (json!({"lora_alpha": "x"}), "`lora_alpha`"),
    ] {
        let mut v = json!({"peft_type": "ADALORA", "target_modules": ["q_proj"], "total_step": 10});
        for (k, x) in patch.as_object().unwrap() {
            v[k] = x.clone();
        }
        let e = AdapterConfig::from_json(&v, None).unwrap_err();
        assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID", "{e}");
        assert!(e.to_string().contains(msg), "{msg}: {e}");
    }
    // One trainable AdaLoRA adapter per model (HF's message); others in inference mode are fine.
    let mut m = base_peft(CASE);
    m.add_adapter("a", adalora(json!({})), 1).unwrap();
    let e = m.add_adapter("b", adalora(json!({})), 2).unwrap_err();
    assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
    assert!(e.to_string().contains(ONE_TRAINABLE), "{e}");
    assert_eq!(r["two_trainable"].as_str().unwrap(), ONE_TRAINABLE);
    m.add_adapter("c", adalora(json!({"inference_mode": true})), 3).unwrap();
    // A rank pattern whose length is not init_r.
    let mut m = base_peft(CASE);
    let e = m.add_adapter("a", adalora(json!({"target_modules": ["q_proj"], "rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [true]}})), 1).unwrap_err();
    assert!(e.to_string().contains("rank_pattern"), "{e}");
    // update_and_allocate without a trainable AdaLoRA adapter, and target_r >= init_r.
    let e = adapter_peft(CASE, false).update_and_allocate(0, &Tensor::new(0f32, &Device::Cpu).unwrap().backward().unwrap()).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_STATE");
    let mut m = base_peft(CASE);
    m.add_adapter("a", adalora(json!({"init_r": 2, "target_r": 2, "tinit": 0, "tfinal": 0})), 1).unwrap();
    let (_, _, grads) = loss_and_grads(&m, &expected_batch(&Expected::load(CASE)), None, None).unwrap();
    let e = m.update_and_allocate(1, &grads).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_STATE");
    assert!(e.to_string().contains("target_r must be smaller than init_r"), "{e}");
}

#[test]
fn adalora_is_left_to_the_general_path_by_the_fused_engine() {
    let exp = Expected::load(CASE);
    let batch = expected_batch(&exp);
    let (ids, b, s) = exp.ids("input_ids");
    let opts = peft_core::model::ForwardOptions::default();
    // A plain LoRA adapter on the same model runs on the engine (when it is enabled here) ...
    let lora = adapter_peft("llama_lora_qv", false);
    let lora_runs = peft_core::engine::try_forward(&lora, &ids, b, s, &opts, None).unwrap().is_some();
    assert_eq!(lora_runs, peft_core::engine::enabled());
    // ... an AdaLoRA adapter never does.
    let m = adapter_peft(CASE, true);
    assert!(peft_core::engine::try_forward(&m, &ids, b, s, &opts, None).unwrap().is_none());
    assert!(peft_core::engine::try_loss_and_grads(&m, &batch, None, None).unwrap().is_none());
}
