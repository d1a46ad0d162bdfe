//! HF-compatibility cases found by replaying upstream bug reports (issue 14), each against HF PEFT
//! 0.21 reference data made by `__test__/scripts/make_compat_fixtures.py`:
//! `bias="all"` on models whose non-targeted modules have biases (GPT-2, BERT), a module both in
//! `target_modules` and `modules_to_save`, tied embeddings, `layers_to_transform` naming no layer,
//! and a partly matching adapter file.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use peft_core::model::ForwardOptions;
use peft_core::peft_model::PeftModel;
use peft_core::tuners::AdapterConfig;
use serde_json::json;

fn lora(v: serde_json::Value) -> AdapterConfig {
    AdapterConfig::from_json(&v, None).unwrap_or_else(|e| panic!("config: [{}] {e}", e.code()))
}

fn messages() -> serde_json::Value {
    let p = fixtures_dir().join("cases/compat_messages.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn base_of(model: &str) -> PeftModel {
    let path = fixtures_dir().join("models").join(model);
    let loaded = peft_core::model::loader::load_causal_lm(&path, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    PeftModel::new(loaded.model)
}

/// Forward the case's batch; sequence-classification logits come as they are.
fn logits(m: &PeftModel, exp: &Expected) -> Tensor {
    let (ids, b, s) = exp.ids("input_ids");
    let opts = ForwardOptions { attention_mask: Some(exp.mask("attention_mask")), ..Default::default() };
    m.forward(&ids, b, s, &opts, None).unwrap_or_else(|e| panic!("forward: [{}] {e}", e.code()))
}

fn check(what: &str, m: &PeftModel, exp: &Expected, key: &str) {
    let got = logits(m, exp);
    assert_close(&format!("{} {what}", exp.case), &got, exp.get(key), 1e-4, 1e-4);
}

/// Load the case's HF adapter: adapter and disabled logits equal HF's, the counts equal HF's,
/// and a re-save writes HF's file byte for byte.
fn hf_case_roundtrip(case: &str) {
    let exp = Expected::load(case);
    let info = case_json(case);
    let mut m = base_peft(case);
    let res = m.load_adapter(&case_dir(case), "default", false, None).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    let hf_keys = |k: &str| -> Vec<String> { info["hf_load_result"][k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect() };
    assert_eq!(res.unexpected_keys, hf_keys("unexpected_keys"), "{case}: unexpected keys as HF reports them");
    assert_eq!(res.missing_keys, hf_keys("missing_adapter_keys"), "{case}: missing keys as HF reports them");
    check("adapter", &m, &exp, "logits_adapter");
    m.set_disabled(true).unwrap();
    check("disabled", &m, &exp, "logits_disabled");
    m.set_disabled(false).unwrap();
    let out = temp_dir(&format!("compat-{case}"));
    m.save_pretrained(&out, None).unwrap();
    let fx = std::fs::read(case_dir(case).join("adapter_model.safetensors")).unwrap();
    let ours = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    if fx != ours {
        let keys = |p: &std::path::Path| -> Vec<String> { peft_core::io::read_safetensors(p, &Device::Cpu).unwrap().into_iter().map(|(k, _)| k).collect() };
        panic!("{case}: re-save differs from HF's file\n ours {:?}\n HF   {:?}", keys(&out.join("adapter_model.safetensors")), info["adapter_keys"]);
    }
    remove_dir(&out);
    visible(&format!("ok {case}: logits adapter/disabled match HF, re-save byte-identical"));
}

#[test]
fn gpt2_bias_all_matches_hf() {
    hf_case_roundtrip("compat_gpt2_bias_all");
}

#[test]
fn bert_bias_all_matches_hf() {
    hf_case_roundtrip("compat_bert_bias_all");
}

/// `bias="all"` added here trains exactly HF's parameters (names and count).
#[test]
fn bias_all_trainable_parameters_equal_hf() {
    for (case, model, cfg) in [
        ("compat_gpt2_bias_all", "gpt2", json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": true, "bias": "all"})),
    ] {
        let info = case_json(case);
        let mut m = base_of(model);
        m.add_adapter("default", lora(cfg), 1).unwrap();
        let (trainable, total) = m.nb_trainable_parameters();
        assert_eq!(trainable as u64, info["trainable_params"].as_u64().unwrap(), "{case}: trainable count");
        assert_eq!(total as u64, info["all_params"].as_u64().unwrap(), "{case}: all-params count");
    }
}

#[test]
fn modules_to_save_overlapping_a_target_matches_hf() {
    let case = "compat_llama_mts_overlap";
    hf_case_roundtrip(case);
    // Added here: q_proj gets no LoRA (HF `_ExcludedModule`), only the trainable copy.
    let mut m = base_of("llama");
    let targeted = m
        .add_adapter("default", lora(json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["q_proj"]})), 1)
        .unwrap();
    assert!(targeted.iter().all(|t| t.ends_with("v_proj")), "q_proj must not get LoRA: {targeted:?}");
    let info = case_json(case);
    let (trainable, total) = m.nb_trainable_parameters();
    assert_eq!(trainable as u64, info["trainable_params"].as_u64().unwrap(), "trainable count");
    assert_eq!(total as u64, info["all_params"].as_u64().unwrap(), "all-params count");
    // Every target also in modules_to_save: HF's NoMatchingPeftModuleError.
    let mut m = base_of("llama");
    let e = m
        .add_adapter("default", lora(json!({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "modules_to_save": ["q_proj"]})), 1)
        .expect_err("every target is a modules_to_save module");
    assert_eq!(e.code(), "ERR_NO_TARGET_MODULES");
    let hf = messages()["mts_covers_all_targets"].as_str().unwrap().trim_start_matches("NoMatchingPeftModuleError: ").to_string();
    assert!(e.to_string().contains(&hf), "message {e} lacks HF's {hf}");
}

#[test]
fn layers_to_transform_without_such_layer_names_the_selection() {
    let mut m = base_of("llama");
    let e = m
        .add_adapter("default", lora(json!({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "layers_to_transform": [5], "layers_pattern": "layers"})), 1)
        .expect_err("no layer 5");
    assert_eq!(e.code(), "ERR_NO_TARGET_MODULES");
    let msg = e.to_string();
    assert!(msg.contains("layers_to_transform") && msg.contains("[5]"), "{msg}");
    assert!(msg.contains("0..=1") || msg.contains("0 to 1") || msg.contains("layers 0-1"), "message should name the layers that exist: {msg}");
}

#[test]
fn partly_matching_adapter_reports_missing_and_unexpected_keys() {
    let case = "compat_llama_partial";
    let hf = &messages()["partial_load_adapter_result"];
    let mut m = base_of("llama");
    let r = m.load_adapter(&case_dir(case), "second", false, None).unwrap();
    let want = |k: &str| -> Vec<String> { hf[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect() };
    assert_eq!(r.missing_keys, want("missing_keys"), "missing keys (HF keeps the adapter name in them)");
    assert_eq!(r.unexpected_keys, want("unexpected_keys"), "unexpected keys");
}

#[test]
fn tied_embeddings_warn_as_hf() {
    let msgs = messages();
    let hf = msgs["tied_mts_lm_head_warning"][0].as_str().unwrap();
    let mut m = base_of("gpt2");
    m.add_adapter("default", lora(json!({"peft_type": "LORA", "r": 4, "target_modules": ["c_attn"], "fan_in_fan_out": true, "modules_to_save": ["lm_head"]})), 1).unwrap();
    let w = m.take_warnings();
    assert!(w.iter().any(|x| x == hf), "{w:?}");
    // Untied llama: no such warning.
    let mut m = base_of("llama");
    m.add_adapter("default", lora(json!({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]})), 1).unwrap();
    assert!(!m.take_warnings().iter().any(|x| x.contains("tie_word_embeddings")));
    // ensure_weight_tying with nothing tied: HF's warning, accepted.
    let mut m = base_of("llama");
    m.add_adapter("default", lora(json!({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "ensure_weight_tying": true})), 1).unwrap();
    let w = m.take_warnings();
    let hf = msgs["ensure_weight_tying_no_tied_warning"][0].as_str().unwrap();
    assert!(w.iter().any(|x| x == hf), "{w:?}");
    let mut m = base_of("gpt2");
    m.add_adapter("default", lora(json!({"peft_type": "LORA", "r": 4, "target_modules": ["c_attn"], "fan_in_fan_out": true, "ensure_weight_tying": true})), 1).unwrap();
    let w = m.take_warnings();
    let hf = msgs["ensure_weight_tying_nothing_targeted_warning"][0].as_str().unwrap();
    assert!(w.iter().any(|x| x == hf), "{w:?}");
    // ensure_weight_tying on a tied module in the adapter: not built here, refused clearly.
    let mut m = base_of("gpt2");
    let e = m
        .add_adapter("default", lora(json!({"peft_type": "LORA", "r": 4, "target_modules": ["c_attn"], "fan_in_fan_out": true, "modules_to_save": ["lm_head"], "ensure_weight_tying": true})), 1)
        .expect_err("ensure_weight_tying with a tied module is refused");
    assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
    assert!(e.to_string().contains("ensure_weight_tying"), "{e}");
}

/// HF `PeftModel.save_pretrained` writes `auto_mapping` (the base model's transformers class
/// and module) into a fresh adapter_config.json when the config has no `task_type`, and keeps
/// `null` with one; reference: `cases/compat_save_status.json`
/// (`__test__/scripts/make_save_status_fixtures.py`).
#[test]
fn fresh_save_writes_hf_auto_mapping() {
    let p = fixtures_dir().join("cases/compat_save_status.json");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let cases = [
        ("llama_lora", "llama", json!({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj", "v_proj"]})),
        ("gpt2_lora", "gpt2", json!({"peft_type": "LORA", "r": 2, "target_modules": ["c_attn"]})),
        ("llama_ia3", "llama", json!({"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]})),
        ("gemma3_lora", "gemma3", json!({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]})),
        ("llama_lora_causal", "llama", json!({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"})),
    ];
    for (case, model, cfg) in cases {
        let mut m = base_of(model);
        m.add_adapter("default", lora(cfg), 0).unwrap_or_else(|e| panic!("{case}: [{}] {e}", e.code()));
        let dir = temp_dir(&format!("auto_mapping_{case}"));
        m.save_pretrained(&dir, None).unwrap_or_else(|e| panic!("{case}: [{}] {e}", e.code()));
        let got: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
        let exp = &reference["configs"][case];
        assert!(exp.is_object(), "{case}: no reference");
        assert_eq!(got["auto_mapping"], exp["auto_mapping"], "{case}: auto_mapping");
        assert_eq!(got["task_type"], exp["task_type"], "{case}: task_type");
        remove_dir(&dir);
    }
}

/// HF `add_adapter` / `get_peft_model` warn when the adapter's name is part of its method's
/// parameter prefix (`PEFT_TYPE_TO_PREFIX_MAPPING`, which HF 0.21 has for every method): the
/// prefix comes from the registry, for layer tuners and prompt learning alike.
#[test]
fn adapter_names_inside_the_method_prefix_warn_as_hf() {
    let warned = |cfg: serde_json::Value, name: &str| -> Vec<String> {
        let mut m = base_peft("llama_lora_qv");
        m.add_adapter(name, AdapterConfig::from_json(&cfg, None).unwrap(), 1).unwrap();
        m.take_warnings().into_iter().filter(|w| w.contains("should not be contained in the prefix")).collect()
    };
    let lin = |t: &str| json!({"peft_type": t, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"});
    let prompt = |t: &str| json!({"peft_type": t, "task_type": "CAUSAL_LM", "num_virtual_tokens": 2});
    for (cfg, name, prefix) in [
        (lin("LORA"), "lora", "lora_"),
        (lin("LOHA"), "hada", "hada_"),
        (lin("LOKR"), "lokr", "lokr_"),
        (lin("VERA"), "vera", "vera_lambda_"),
        (lin("HRA"), "hra", "hra_"),
        (lin("IA3"), "ia3", "ia3_"),
        (json!({"peft_type": "OFT", "oft_block_size": 8, "r": 0, "target_modules": ["q_proj"]}), "oft", "oft_"),
        (prompt("PROMPT_TUNING"), "prompt", "prompt_tuning_"),
        (prompt("PREFIX_TUNING"), "tuning", "prefix_tuning_"),
        (prompt("P_TUNING"), "p", "p_tuning_"),
    ] {
        let w = warned(cfg.clone(), name);
        assert_eq!(w, vec![format!("Adapter name '{name}' should not be contained in the prefix '{prefix}'. This may lead to reinitialization of the adapter weights during loading.")], "{cfg}");
        assert!(warned(cfg.clone(), "default").is_empty(), "{cfg}: `default` is not in `{prefix}`");
    }
}
