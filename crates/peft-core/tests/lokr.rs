//! LoKr (issue 15) against HF PEFT 0.21: the `__test__/fixtures/cases/llama_lokr*` cases made by
//! `__test__/scripts/make_lokr_fixtures.py` on the tiny Llama, init_weights=False:
//! - `llama_lokr`: r=2 on q/v_proj (full `lokr_w1`, decomposed `lokr_w2_a`/`_b`);
//! - `llama_lokr_both`: decompose_both, r=2 on q/v/up/down_proj (every factor decomposed);
//! - `llama_lokr_full`: r=8 on every linear (r large: full `lokr_w1` and `lokr_w2`);
//! - `llama_lokr_patterns`: decompose_factor=4, rank_pattern, alpha_pattern, dropouts set.
//!
//! Per case: adapted / disabled / merged / unmerged / merge_and_unload logits (1e-4), greedy ids
//! (with and without a KV cache), loss (1e-5), every lokr_* gradient (1e-4 relative to the
//! tensor's largest), parameter counts, layer/model status, byte-identical re-save of HF's files.
//!
//! Run: `cargo test --release -p peft-core --test lokr`. With `LOKR_HF_CHECK_DIR=<dir>`,
//! `lokr_adapter_for_hf_check` also writes an adapter of ours there for
//! `make_lokr_fixtures.py --check <dir>` (HF loads it and compares logits).

mod common;

use candle_core::Tensor;
use common::*;
use peft_core::generate::{generate, GenerateOptions};
use peft_core::peft_model::PeftModel;
use peft_core::train::loss_and_grads;
use peft_core::tuners::config::AdapterConfig;
use serde_json::json;
use std::collections::BTreeSet;

const CASES: [&str; 4] = ["llama_lokr", "llama_lokr_both", "llama_lokr_full", "llama_lokr_patterns"];

fn check_generate(what: &str, m: &PeftModel, exp: &Expected, key: &str) {
    let (ids, b, s) = exp.ids("generate_input_ids");
    let want = exp.rows_u32(key);
    for use_cache in [true, false] {
        let opts = GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![], pad_token_id: 0, use_cache, ..Default::default() };
        let got = generate(m, &ids, b, s, None, None, &opts, &|| false).unwrap_or_else(|e| panic!("generate: [{}] {e}", e.code()));
        assert_eq!(got, want, "{} {what}: generate(use_cache={use_cache}) != `{key}`", exp.case);
    }
}

fn lokr_config(extra: serde_json::Value) -> AdapterConfig {
    let mut c = json!({"peft_type": "LOKR", "task_type": "CAUSAL_LM", "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    AdapterConfig::from_json(&c, None).unwrap_or_else(|e| panic!("{c}: {e}"))
}

/// The case's adapter, trainable. HF's gradients were taken in eval mode (no dropout), so a
/// config with dropouts is loaded with them set to 0 (the same numbers, since training here
/// applies dropout).
fn trainable_without_dropout(case: &str) -> PeftModel {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(case_dir(case).join("adapter_config.json")).unwrap()).unwrap();
    if v["rank_dropout"] == json!(0.0) && v["module_dropout"] == json!(0.0) {
        return adapter_peft(case, true);
    }
    v["rank_dropout"] = json!(0.0);
    v["module_dropout"] = json!(0.0);
    let mut m = base_peft(case);
    let res = m.load_adapter(&case_dir(case), "default", true, Some(AdapterConfig::from_json(&v, None).unwrap())).unwrap();
    assert!(res.missing_keys.is_empty() && res.unexpected_keys.is_empty(), "{res:?}");
    m
}

#[test]
fn lokr_logits_generate_merge_match_hf() {
    for case in CASES {
        let exp = Expected::load(case);
        let mut m = adapter_peft(case, false);
        assert_eq!(m.peft_type(), Some("LOKR"));
        check_adapter_then_disabled(&mut m, &exp);
        check_generate("adapter", &m, &exp, "generate_adapter");
        m.set_disabled(true).unwrap();
        check_generate("disabled", &m, &exp, "generate_base");
        m.set_disabled(false).unwrap();
        check_merge_unmerge(&mut m, &exp, |m| check_generate("merged", m, &exp, "generate_merged"));
        check_merge_and_unload(case, &exp);
        visible(&format!("ok {case}: adapter/disabled/merged/unmerged logits and greedy ids"));
    }
}

#[test]
fn lokr_round_trip_is_byte_identical() {
    for case in CASES {
        resave_case(case);
    }
}

#[test]
fn lokr_counts_status_shapes_and_gradients_match_hf() {
    for case in CASES {
        let cj = case_json(case);
        let m = trainable_without_dropout(case);
        let (trainable, total) = m.nb_trainable_parameters();
        assert_eq!(trainable as u64, cj["trainable_params"].as_u64().unwrap(), "{case}: trainable parameters");
        assert_eq!(total as u64, cj["all_params"].as_u64().unwrap(), "{case}: all parameters");
        let status = m.layer_status().unwrap();
        let n_layers = cj["adapter_keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().rsplit_once('.').unwrap().0.to_string()).collect::<BTreeSet<_>>().len();
        assert_eq!(status.len(), n_layers, "{status:?}");
        assert!(status.iter().all(|s| s["module_type"] == "lokr.Linear"), "{status:?}");
        assert_eq!(m.model_status().unwrap()["adapter_model_type"], "LoKrModel");
        // The factors (full or decomposed) and their shapes are HF's.
        let shapes: Vec<(String, Vec<usize>)> = m.trainable_parameters().iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
        let want: Vec<(String, Vec<usize>)> = cj["adapter_shapes"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), serde_json::from_value(v.clone()).unwrap())).collect();
        let mut got = shapes.clone();
        got.sort();
        assert_eq!(got, want, "{case}: parameter shapes");

        let (n, worst) = check_hf_loss_and_grads(case, &m);
        visible(&format!("ok {case}: counts {trainable}/{total}, loss, {n} gradients (max |diff| / max |grad| = {worst:.2e})"));
    }
}

#[test]
fn lokr_inits_and_config_round_trip() {
    let exp = Expected::load("llama_lokr");
    // init_weights=true (w1 = 0) and "lycoris" (w2 = 0) start as no-ops; training still reaches
    // the non-zero factor's partner (HF's gradients: dL/dw1 != 0 for true, dL/dw2 != 0 for lycoris).
    for (init, zero_slot) in [(json!(true), "lokr_w1"), (json!("lycoris"), "lokr_w2_b")] {
        for both in [false, true] {
            let mut m = base_peft("llama_lokr");
            let targeted = m.add_adapter("default", lokr_config(json!({"init_weights": init, "decompose_both": both})), 7).unwrap();
            assert_eq!(targeted.len(), 4);
            check_logits(&format!("fresh LoKr (init_weights={init}, decompose_both={both})"), &m, &exp, "logits_base");
            let (trainable, _) = m.nb_trainable_parameters();
            if !both {
                assert_eq!(trainable as u64, case_json("llama_lokr")["trainable_params"].as_u64().unwrap());
            }
            let (_, _, grads) = loss_and_grads(&m, &expected_batch(&exp), None, None).unwrap();
            let zero = if both && zero_slot == "lokr_w1" { "lokr_w1_a" } else { zero_slot };
            for (k, v) in m.trainable_parameters() {
                let w = max_abs(v.as_tensor());
                let g = grads.get(v.as_tensor()).map(max_abs).unwrap_or(0.0);
                if k.ends_with(&format!(".{zero}")) {
                    assert_eq!(w, 0.0, "{k} starts at zero");
                    assert!(g > 0.0, "{k}: the zero factor gets a gradient");
                } else {
                    assert!(w > 0.0, "{k} is kaiming-uniform");
                }
            }
        }
    }
    // HF's to_dict() of two option sets parses and is written back unchanged.
    for o in case_json("llama_lokr")["options"].as_array().unwrap() {
        let hf = o["to_dict"].clone();
        let c = AdapterConfig::from_json(&hf, None).unwrap();
        assert!(c.unknown_fields().is_empty(), "{:?}", c.unknown_fields());
        let mut ours = c.to_json();
        let mut theirs = hf.clone();
        for v in [&mut ours, &mut theirs] {
            let obj = v.as_object_mut().unwrap();
            obj.remove("peft_version");
            for k in ["target_modules", "exclude_modules"] {
                if let Some(serde_json::Value::Array(a)) = obj.get_mut(k) {
                    a.sort_by_key(|x| x.to_string());
                }
            }
        }
        assert_eq!(ours, theirs, "options {}", o["kwargs"]);
    }
}

#[test]
fn lokr_refuses_what_hf_refuses() {
    let mut m = base_peft("llama_lokr");
    for (bad, what) in [
        (json!({"peft_type": "LOKR", "r": 0, "target_modules": ["q_proj"]}), "`r`"),
        (json!({"peft_type": "LOKR", "rank_dropout": 1.5, "target_modules": ["q_proj"]}), "rank_dropout"),
        (json!({"peft_type": "LOKR", "init_weights": "gaussian", "target_modules": ["q_proj"]}), "init_weights"),
        (json!({"peft_type": "LOKR", "decompose_factor": 2.5, "target_modules": ["q_proj"]}), "decompose_factor"),
        (json!({"peft_type": "LOKR", "layers_pattern": "layers", "target_modules": ["q_proj"]}), "layers_to_transform"),
    ] {
        let e = AdapterConfig::from_json(&bad, None).unwrap_err();
        assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
        assert!(e.to_string().contains(what), "{e}");
    }
    let e = m.add_adapter("x", lokr_config(json!({"target_modules": ["embed_tokens"]})), 1).unwrap_err();
    assert!(e.to_string().contains("not supported"), "{e}");
    let e = m.add_adapter("x", lokr_config(json!({"target_modules": ["nothing_here"]})), 1).unwrap_err();
    assert_eq!(e.code(), "ERR_NO_TARGET_MODULES", "{e}");
    assert!(m.adapter_names().is_empty());
    // A file whose factor kinds do not fit the config (a full lokr_w2 where r=2 decomposes it).
    let dir = temp_dir("lokr-bad");
    copy_files(&case_dir("llama_lokr_full"), &dir);
    let cfg = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap().replace("\"r\": 8", "\"r\": 2");
    std::fs::write(dir.join("adapter_config.json"), cfg).unwrap();
    // (r=2 with decompose_both decomposes both factors of every layer: no tensor fits)
    let e = m.load_adapter(&dir, "default", false, None).unwrap_err();
    assert!(e.to_string().contains("no tensor of the file matches") && e.to_string().contains("lokr_w2"), "{e}");
    assert!(m.adapter_names().is_empty());
    remove_dir(&dir);
}

#[test]
fn lokr_dropouts_apply_in_training_only_and_gradients_flow() {
    // Same seed, same factors; only the dropouts differ. Eval: identical logits. Training: rank
    // dropout (seeded; torch's RNG cannot be matched) changes the loss and every factor still
    // gets a gradient; module dropout near 1 skips every LoKr layer (loss = the base's).
    let exp = Expected::load("llama_lokr");
    let make = |extra: serde_json::Value| {
        let mut m = base_peft("llama_lokr");
        let mut e = json!({"alpha": 400, "init_weights": false, "decompose_both": true});
        for (k, v) in extra.as_object().unwrap() {
            e[k] = v.clone();
        }
        m.add_adapter("default", lokr_config(e), 3).unwrap();
        m
    };
    let rng = || Some(std::sync::Arc::new(std::sync::Mutex::new(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(11))));
    let plain = make(json!({}));
    let eval = |m: &PeftModel| forward_batch(m, &exp);
    let (lp, _, _) = loss_and_grads(&plain, &expected_batch(&exp), None, rng()).unwrap();
    for extra in [json!({"rank_dropout": 0.5}), json!({"rank_dropout": 0.5, "rank_dropout_scale": true})] {
        let rank = make(extra.clone());
        assert_eq!(max_abs(&(eval(&plain) - eval(&rank)).unwrap()), 0.0, "rank dropout acts in eval");
        let (lr, _, gr) = loss_and_grads(&rank, &expected_batch(&exp), None, rng()).unwrap();
        assert!(lr.is_finite() && (lr - lp).abs() > 1e-6, "{extra}: {lr} vs {lp}");
        for (k, v) in rank.trainable_parameters() {
            let g = gr.get(v.as_tensor()).unwrap_or_else(|| panic!("{extra}: no gradient for {k}"));
            assert!(max_abs(g) > 0.0 && max_abs(g).is_finite(), "{extra}: gradient of {k}");
        }
        visible(&format!("lokr {extra}: loss {lr} (no dropout {lp})"));
    }
    let module = make(json!({"module_dropout": 0.999}));
    assert_eq!(max_abs(&(eval(&plain) - eval(&module)).unwrap()), 0.0, "module dropout acts in eval");
    let (lm, _, _) = loss_and_grads(&module, &expected_batch(&exp), None, rng()).unwrap();
    let mut base = make(json!({}));
    base.set_disabled(true).unwrap();
    let (lb, _, _) = loss_and_grads(&base, &expected_batch(&exp), None, rng()).unwrap_or_else(|e| panic!("disabled loss: [{}] {e}", e.code()));
    assert!((lm - lb).abs() <= 1e-6 && (lm - lp).abs() > 1e-6, "module dropout 0.999: {lm} vs base {lb}");
}

#[test]
fn lokr_adapter_for_hf_check() {
    // An adapter of ours (init_weights=false, decompose_both, mixed full/decomposed factors),
    // saved and reloaded here; with LOKR_HF_CHECK_DIR also written for HF to load.
    let exp = Expected::load("llama_lokr");
    let mut m = base_peft("llama_lokr");
    let cfg = lokr_config(json!({"r": 3, "alpha": 5, "decompose_both": true, "init_weights": false, "target_modules": ["q_proj", "k_proj", "up_proj", "down_proj"], "rank_pattern": {"up_proj": 8}, "base_model_name_or_path": "models/llama"}));
    m.add_adapter("default", cfg, 21).unwrap();
    let ours = forward_batch(&m, &exp);
    let out = match std::env::var("LOKR_HF_CHECK_DIR") {
        Ok(d) => std::path::PathBuf::from(d),
        Err(_) => temp_dir("lokr-hf"),
    };
    m.save_pretrained(&out.join("adapter"), None).unwrap();
    let mut again = base_peft("llama_lokr");
    again.load_adapter(&out.join("adapter"), "default", false, None).unwrap();
    assert_eq!(max_abs(&(forward_batch(&again, &exp) - &ours).unwrap()), 0.0, "reloaded adapter");
    let (ids, b, s) = exp.ids("input_ids");
    let t = [
        ("input_ids".to_string(), Tensor::from_vec(ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), (b, s), &candle_core::Device::Cpu).unwrap()),
        ("attention_mask".to_string(), exp.get("attention_mask").clone()),
        ("logits".to_string(), ours),
    ];
    std::fs::write(out.join("ours.safetensors"), peft_core::io::safetensors_bytes(&t, None).unwrap()).unwrap();
    if std::env::var("LOKR_HF_CHECK_DIR").is_err() {
        remove_dir(&out);
    }
}
