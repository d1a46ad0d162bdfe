//! `add_weighted_adapter` against HF PEFT 0.21 (`__test__/scripts/make_weighted_fixtures.py`):
//! every deterministic combination type, with ranks that differ, rsLoRA, negative weights and a
//! single adapter: the new adapter's per-layer delta weights and the logits with it active.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use peft_core::model::ForwardOptions;
use peft_core::peft_model::PeftModel;
use peft_core::tuners::weighted::{Combination, MajoritySign, WeightedAdapterOptions};

const CASE: &str = "weighted";

fn model() -> PeftModel {
    let path = fixtures_dir().join("models/llama");
    let loaded = peft_core::model::loader::load_causal_lm(&path, DType::F32, &Device::Cpu).unwrap();
    let mut m = PeftModel::new(loaded.model);
    for n in ["a", "b", "c"] {
        let r = m.load_adapter(&case_dir(CASE).join(n), n, false, None).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
        assert!(r.missing_keys.is_empty() && r.unexpected_keys.is_empty());
    }
    m
}

fn options(call: &serde_json::Value) -> WeightedAdapterOptions {
    WeightedAdapterOptions {
        adapters: call["adapters"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect(),
        weights: call["weights"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect(),
        adapter_name: "mix".into(),
        combination_type: Combination::parse(call["combination_type"].as_str().unwrap()).unwrap(),
        svd_rank: call["svd_rank"].as_u64().map(|r| r as usize),
        svd_clamp: None,
        density: call["density"].as_f64(),
        majority_sign_method: if call["majority_sign_method"] == "frequency" { MajoritySign::Frequency } else { MajoritySign::Total },
        seed: 0,
    }
}

#[test]
fn every_deterministic_combination_matches_hf() {
    let exp = Expected::load(CASE);
    let info = case_json(CASE);
    let (ids, b, s) = exp.ids("input_ids");
    for (key, combo) in info["combos"].as_object().unwrap() {
        let mut m = model();
        m.add_weighted_adapter(&options(&combo["call"])).unwrap_or_else(|e| panic!("{key}: [{}] {e}", e.code()));
        let cfg = m.peft_config("mix").unwrap().to_json();
        assert_eq!(cfg["r"], combo["r"], "{key}: r");
        assert_eq!(cfg["lora_alpha"].as_f64(), combo["lora_alpha"].as_f64(), "{key}: lora_alpha");
        let mut ours: Vec<String> = cfg["target_modules"].as_array().map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect()).unwrap_or_default();
        ours.sort();
        let want: Vec<String> = combo["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        assert_eq!(ours, want, "{key}: target_modules");
        let layers = combo["layers"].as_object().unwrap();
        let mut checked = 0;
        for (name, lin) in m.base.named_linears() {
            if lin.lora("mix").is_none() {
                assert!(!layers.contains_key(&name), "{key}: HF has the new adapter on {name}");
                continue;
            }
            let d = lin.delta_weight("mix").unwrap();
            // SVD results are computed in f64 here and f32 in torch: compare with a tolerance
            // relative to the delta's scale.
            let want = exp.get(&format!("{key}.{name}"));
            let scale = want.abs().unwrap().max_keepdim(0).unwrap().max_keepdim(1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
            assert_close(&format!("{key} {name} delta"), &d, want, 1e-5 * scale.max(1.0), 1e-4);
            checked += 1;
        }
        assert_eq!(checked, layers.len(), "{key}: layers carrying the new adapter");
        m.set_adapter(&["mix".to_string()]).unwrap();
        let logits = m.forward(&ids, b, s, &ForwardOptions::default(), None).unwrap();
        assert_close(&format!("{key} logits"), &logits, exp.get(&format!("{key}.logits")), 1e-4, 1e-4);
    }
}

#[test]
fn cat_reproduces_the_weighted_sum_of_deltas_exactly() {
    let mut m = model();
    let o = WeightedAdapterOptions {
        adapters: vec!["a".into(), "b".into()],
        weights: vec![0.3, -1.2],
        adapter_name: "mix".into(),
        combination_type: Combination::Cat,
        svd_rank: None,
        svd_clamp: None,
        density: None,
        majority_sign_method: MajoritySign::Total,
        seed: 0,
    };
    m.add_weighted_adapter(&o).unwrap();
    for (name, lin) in m.base.named_linears() {
        if lin.lora("mix").is_none() {
            continue;
        }
        let mut want: Option<Tensor> = None;
        for (a, w) in [("a", 0.3), ("b", -1.2)] {
            if lin.lora(a).is_some() {
                let d = (lin.delta_weight(a).unwrap() * w).unwrap();
                want = Some(match want {
                    Some(x) => (x + d).unwrap(),
                    None => d,
                });
            }
        }
        assert_close(&format!("cat {name}"), &lin.delta_weight("mix").unwrap(), &want.unwrap(), 1e-6, 1e-5);
    }
}

#[test]
fn dare_prunes_with_a_seed_and_refusals_have_codes() {
    let mk = |c: Combination, density: Option<f64>, seed: u64| WeightedAdapterOptions {
        adapters: vec!["a".into(), "b".into()],
        weights: vec![1.0, 1.0],
        adapter_name: "mix".into(),
        combination_type: c,
        svd_rank: None,
        svd_clamp: None,
        density,
        majority_sign_method: MajoritySign::Total,
        seed,
    };
    let deltas = |o: &WeightedAdapterOptions| -> Vec<Tensor> {
        let mut m = model();
        m.add_weighted_adapter(o).unwrap();
        m.base.named_linears().into_iter().filter(|(_, l)| l.lora("mix").is_some()).map(|(_, l)| l.delta_weight("mix").unwrap()).collect()
    };
    for c in [Combination::DareLinear, Combination::DareTies, Combination::DareLinearSvd, Combination::DareTiesSvd] {
        let x = deltas(&mk(c, Some(0.5), 1));
        let y = deltas(&mk(c, Some(0.5), 1));
        let z = deltas(&mk(c, Some(0.5), 2));
        let same = x.iter().zip(&y).all(|(p, q)| p.to_vec2::<f32>().unwrap() == q.to_vec2::<f32>().unwrap());
        let differ = x.iter().zip(&z).any(|(p, q)| p.to_vec2::<f32>().unwrap() != q.to_vec2::<f32>().unwrap());
        assert!(same && differ, "{c:?}: a seed fixes the pruning, another seed changes it");
    }
    // density ≥ 1: no pruning, HF's warning; dare_linear then equals linear.
    let mut m = model();
    m.add_weighted_adapter(&mk(Combination::DareLinear, Some(1.0), 1)).unwrap();
    assert!(m.take_warnings().iter().any(|w| w.contains("no pruning will be performed")));
    let mut l = model();
    l.add_weighted_adapter(&mk(Combination::Linear, None, 1)).unwrap();
    for ((_, p), (_, q)) in m.base.named_linears().into_iter().zip(l.base.named_linears()) {
        if p.lora("mix").is_some() {
            assert_close("dare_linear density 1 = linear", &p.delta_weight("mix").unwrap(), &q.delta_weight("mix").unwrap(), 1e-7, 1e-6);
        }
    }
    let mut m = model();
    let e = m.add_weighted_adapter(&mk(Combination::Ties, None, 0)).unwrap_err();
    assert_eq!((e.code(), e.to_string().contains("density")), ("ERR_INVALID_ARGUMENT", true), "{e}");
    let mut o = mk(Combination::Linear, None, 0);
    o.adapters = vec!["a".into(), "c".into()];
    let e = m.add_weighted_adapter(&o).unwrap_err();
    assert!(e.to_string().contains("same r value"), "{e}");
    o.adapters = vec!["a".into(), "nope".into()];
    assert_eq!(m.add_weighted_adapter(&o).unwrap_err().code(), "ERR_ADAPTER_NOT_FOUND");
    o.adapters = vec!["a".into()];
    assert_eq!(m.add_weighted_adapter(&o).unwrap_err().code(), "ERR_INVALID_ARGUMENT", "one weight per adapter");
    assert!(m.peft_config("mix").is_err(), "a refused call adds nothing");
    // svd_clamp: U and Vᵀ clamped to ±(their 0.9 quantile), so several entries sit exactly at
    // the largest magnitude (unclamped SVD factors have one largest entry).
    for clamp in [None, Some(0.9)] {
        let mut o = mk(Combination::Svd, None, 0);
        o.svd_clamp = clamp;
        let mut m = model();
        m.add_weighted_adapter(&o).unwrap();
        let (_, l) = m.base.named_linears().into_iter().find(|(_, l)| l.lora("mix").is_some()).unwrap();
        let ad = l.lora("mix").unwrap();
        let mut vals: Vec<f32> = ad.a.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        vals.extend(ad.b.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let top = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
        let at_top = vals.iter().filter(|v| v.abs() == top).count();
        match clamp {
            None => assert_eq!(at_top, 1, "unclamped"),
            Some(_) => assert!(at_top >= 2, "clamped: {at_top} entries at ±{top}"),
        }
    }
}
