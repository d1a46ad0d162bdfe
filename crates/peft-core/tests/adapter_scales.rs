//! Per-row adapter scales in mixed batches (issue 15, part 2; llama.cpp's per-request LoRA scale,
//! PR #10994): `ForwardOptions::adapter_scales` / `GenerateOptions::adapter_scales` multiply each
//! row's LoRA delta, so a mixed batch with scales equals the single-adapter runs after
//! `set_adapter_scale` (HF `set_scale`) or `rescale_adapter_scale` with the same scale per row,
//! on the general path and on the fused engine.
//!
//! Run: `cargo test --profile test-release -p peft-core --test adapter_scales`.

mod common;

use candle_core::Tensor;
use common::*;
use peft_core::generate::{generate, GenerateOptions};
use peft_core::model::ForwardOptions;
use peft_core::peft_model::PeftModel;
use peft_core::tuners::config::AdapterConfig;
use serde_json::json;
use std::sync::Arc;

const CASE: &str = "llama_lora_qv"; // only for its base model (the tiny Llama)

fn two_adapters() -> PeftModel {
    let mut m = base_peft(CASE);
    let cfg = |v: serde_json::Value| AdapterConfig::from_json(&v, None).unwrap();
    m.add_adapter("a", cfg(json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "up_proj"], "init_lora_weights": false})), 6).unwrap();
    m.add_adapter("b", cfg(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 3, "use_rslora": true, "target_modules": ["q_proj", "k_proj", "down_proj"], "init_lora_weights": false})), 7).unwrap();
    m
}

const IDS: [u32; 24] = [5, 17, 33, 9, 120, 44, 12, 200, 64, 3, 99, 150, 31, 8, 77, 140, 2, 250, 61, 19, 88, 7, 45, 230];
const B: usize = 4;
const S: usize = 6;

fn rows() -> Vec<Option<String>> {
    vec![Some("a".into()), Some("b".into()), None, Some("a".into())]
}
const SCALES: [f64; 4] = [0.5, 2.0, 3.0, -1.5];

fn mixed(m: &PeftModel, scales: Option<Vec<f64>>) -> peft_core::error::Result<Tensor> {
    let opts = ForwardOptions { adapter_rows: Some(Arc::new(rows())), adapter_scales: scales.map(Arc::new), ..Default::default() };
    m.forward(&IDS, B, S, &opts, None)
}

fn row(t: &Tensor, i: usize) -> Tensor {
    t.narrow(0, i, 1).unwrap()
}

/// Row `i` of the batch run with only adapter `name` active at scale `s` (`None`: adapters disabled).
fn single(m: &mut PeftModel, name: Option<&str>, s: f64, i: usize, rescale: bool) -> Tensor {
    let plain = ForwardOptions::default();
    let out = match name {
        None => {
            m.set_disabled(true).unwrap();
            let y = m.forward(&IDS, B, S, &plain, None).unwrap();
            m.set_disabled(false).unwrap();
            y
        }
        Some(n) => {
            m.set_adapter(&[n.to_string()]).unwrap();
            if rescale {
                m.rescale_adapter_scale(s).unwrap();
            } else {
                m.set_adapter_scale(n, s).unwrap();
            }
            let y = m.forward(&IDS, B, S, &plain, None).unwrap();
            if rescale {
                assert!(m.restore_adapter_scale());
            } else {
                m.set_adapter_scale(n, 1.0).unwrap();
            }
            y
        }
    };
    row(&out, i)
}

#[test]
fn mixed_batch_scales_equal_single_adapter_runs_after_set_scale() {
    for general in [false, true] {
        peft_core::engine::force_general_path(general);
        let path = if general { "general path" } else { "engine" };
        let mut m = two_adapters();
        let got = mixed(&m, Some(SCALES.to_vec())).unwrap();
        for (i, (name, s)) in rows().iter().zip(SCALES).enumerate() {
            let want = single(&mut m, name.as_deref(), s, i, false);
            assert_close(&format!("{path}: row {i} ({name:?} × {s}) vs setScale"), &row(&got, i), &want, 1e-5, 1e-5);
            if name.is_some() {
                let want = single(&mut m, name.as_deref(), s, i, true);
                assert_close(&format!("{path}: row {i} vs rescaleAdapterScale"), &row(&got, i), &want, 1e-5, 1e-5);
            }
        }
        // Scales of 1 (or none) leave the mixed batch as it was.
        let ones = mixed(&m, Some(vec![1.0; B])).unwrap();
        let none = mixed(&m, None).unwrap();
        assert_eq!(max_abs(&(&ones - &none).unwrap()), 0.0, "{path}: scales of 1");
        assert!(max_abs(&(&got - &none).unwrap()) > 1e-3, "{path}: the scales change the output");
    }
    // Both paths agree.
    peft_core::engine::force_general_path(true);
    let g = mixed(&two_adapters(), Some(SCALES.to_vec())).unwrap();
    peft_core::engine::force_general_path(false);
    let e = mixed(&two_adapters(), Some(SCALES.to_vec())).unwrap();
    assert_close("engine vs general path", &e, &g, 1e-5, 1e-5);
}

#[test]
fn mixed_generate_with_scales_equals_per_row_generation() {
    for general in [false, true] {
        peft_core::engine::force_general_path(general);
        let mut m = two_adapters();
        let o = GenerateOptions { max_new_tokens: 5, eos_token_ids: vec![], pad_token_id: 0, adapter_scales: Some(SCALES.to_vec()), ..Default::default() };
        let got = generate(&m, &IDS, B, S, None, Some(Arc::new(rows())), &o, &|| false).unwrap();
        for (i, (name, s)) in rows().iter().zip(SCALES).enumerate() {
            let plain = GenerateOptions { adapter_scales: None, ..o.clone() };
            let want = match name {
                None => {
                    m.set_disabled(true).unwrap();
                    let w = generate(&m, &IDS[i * S..(i + 1) * S], 1, S, None, None, &plain, &|| false).unwrap();
                    m.set_disabled(false).unwrap();
                    w
                }
                Some(n) => {
                    m.set_adapter(&[n.clone()]).unwrap();
                    m.set_adapter_scale(n, s).unwrap();
                    let w = generate(&m, &IDS[i * S..(i + 1) * S], 1, S, None, None, &plain, &|| false).unwrap();
                    m.set_adapter_scale(n, 1.0).unwrap();
                    w
                }
            };
            assert_eq!(got[i], want[0], "general={general}: row {i} ({name:?} × {s})");
        }
    }
    peft_core::engine::force_general_path(false);
}

#[test]
fn bad_scales_are_refused_naming_adapter_scales() {
    let m = two_adapters();
    let check = |r: peft_core::error::Result<Tensor>, what: &str| {
        let e = r.err().unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT", "{what}: {e}");
        assert!(e.to_string().contains("adapterScales"), "{what}: {e}");
    };
    check(mixed(&m, Some(vec![1.0; 3])), "length mismatch");
    check(mixed(&m, Some(vec![1.0, f64::NAN, 1.0, 1.0])), "NaN");
    check(mixed(&m, Some(vec![1.0, 1.0, 1.0, f64::INFINITY])), "infinite");
    let opts = ForwardOptions { adapter_scales: Some(Arc::new(vec![1.0; B])), ..Default::default() };
    check(m.forward(&IDS, B, S, &opts, None), "without adapterNames");
    // Only LoRA adapters have a scale.
    let mut v = base_peft(CASE);
    v.add_adapter("v", AdapterConfig::from_json(&json!({"peft_type": "VERA", "r": 4, "target_modules": ["q_proj"]}), None).unwrap(), 1).unwrap();
    let opts = |s: f64| ForwardOptions { adapter_rows: Some(Arc::new(vec![Some("v".into()); B])), adapter_scales: Some(Arc::new(vec![s; B])), ..Default::default() };
    check(v.forward(&IDS, B, S, &opts(2.0), None), "VeRA row");
    assert!(v.forward(&IDS, B, S, &opts(1.0), None).is_ok(), "a scale of 1 is no scale");
    let o = GenerateOptions { max_new_tokens: 2, adapter_scales: Some(vec![1.0; 2]), ..Default::default() };
    let e = generate(&m, &IDS, B, S, None, Some(Arc::new(rows())), &o, &|| false).unwrap_err();
    assert!(e.to_string().contains("adapterScales"), "{e}");
}
