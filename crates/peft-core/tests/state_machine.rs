//! State-machine test of `PeftModel`: seeded random sequences of add / load / set (one or two
//! adapters) / disable / enable / merge / unmerge / delete / save+reload on the tiny Llama. After
//! every step the model's logits must equal those of a freshly built reference for the same
//! logical state (the same adapters loaded from snapshots, the same active set, the same
//! disabled flag, nothing merged), and refused operations must leave the state unchanged.
//!
//! Run: `cargo test --release -p peft-core --test state_machine`.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use peft_core::model::ForwardOptions;
use peft_core::peft_model::PeftModel;
use peft_core::tuners::LoraConfig;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::PathBuf;

/// The logical state the model should be in.
#[derive(Clone, Debug)]
struct State {
    /// Adapter names in insertion order, with the folder holding a snapshot of their weights.
    adapters: Vec<(String, PathBuf)>,
    active: Vec<String>,
    disabled: bool,
}

fn batch() -> (Vec<u32>, usize, usize, Vec<u8>) {
    (vec![5, 17, 33, 9, 120, 44, 7, 81, 12, 200, 64, 3, 0, 0], 2, 7, vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
}

fn logits(m: &PeftModel) -> Tensor {
    let (ids, b, s, mask) = batch();
    m.forward(&ids, b, s, &ForwardOptions { attention_mask: Some(mask), ..Default::default() }, None).unwrap()
}

fn reference(st: &State) -> Tensor {
    let mut r = base_peft("llama_lora_qv");
    for (name, dir) in &st.adapters {
        r.load_adapter(dir, name, false, None).unwrap();
    }
    if !st.active.is_empty() {
        r.set_adapter(&st.active).unwrap();
    }
    r.set_disabled(st.disabled).unwrap();
    logits(&r)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Save adapter `name` alone into a fresh folder (it lands in `<dir>/<name>` unless `default`).
fn snapshot(m: &PeftModel, name: &str, root: &std::path::Path, n: &mut usize) -> PathBuf {
    *n += 1;
    let d = root.join(format!("snap{n}"));
    m.save_pretrained(&d, Some(&[name.to_string()])).unwrap();
    if name == "default" { d } else { d.join(name) }
}

#[test]
fn random_operation_sequences_match_a_fresh_reference() {
    let root = temp_dir("state-machine");
    let mut snaps = 0usize;
    let mut checks = 0usize;
    for seed in 0..6u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut m = base_peft("llama_lora_qv");
        let mut st = State { adapters: vec![], active: vec![], disabled: false };
        let mut next_id = 0;
        for step in 0..30 {
            let op = rng.random_range(0..9);
            let names: Vec<String> = st.adapters.iter().map(|(n, _)| n.clone()).collect();
            let pick = |rng: &mut rand::rngs::StdRng| names[rng.random_range(0..names.len())].clone();
            let what: String;
            match op {
                0 | 1 => {
                    // add a fresh (non-trivial) LoRA adapter
                    next_id += 1;
                    let name = if names.is_empty() { "default".to_string() } else { format!("a{next_id}") };
                    let targets = [json!(["q_proj", "v_proj"]), json!(["k_proj"]), json!(["o_proj", "down_proj"])][rng.random_range(0..3)].clone();
                    let cfg = LoraConfig::from_json(&json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": false}), None).unwrap();
                    m.add_adapter(&name, cfg, seed * 100 + step).unwrap();
                    if st.adapters.is_empty() {
                        st.active = vec![name.clone()];
                    }
                    let snap = snapshot(&m, &name, &root, &mut snaps);
                    st.adapters.push((name.clone(), snap));
                    what = format!("add {name}");
                }
                2 => {
                    // load an HF-saved adapter
                    next_id += 1;
                    let name = if names.is_empty() { "default".to_string() } else { format!("h{next_id}") };
                    let src = if rng.random_bool(0.5) { case_dir("llama_lora_qv") } else { case_dir("llama_lora_multi").join("other") };
                    m.load_adapter(&src, &name, false, None).unwrap();
                    if st.adapters.is_empty() {
                        st.active = vec![name.clone()];
                    }
                    st.adapters.push((name.clone(), src));
                    what = format!("load {name}");
                }
                3 if !names.is_empty() => {
                    let n = pick(&mut rng);
                    m.set_adapter(&[n.clone()]).unwrap();
                    st.active = vec![n.clone()];
                    what = format!("set {n}");
                }
                4 if names.len() >= 2 => {
                    let a = pick(&mut rng);
                    let b = names.iter().find(|x| **x != a).unwrap().clone();
                    m.set_adapter(&[a.clone(), b.clone()]).unwrap();
                    st.active = vec![a.clone(), b.clone()];
                    what = format!("set [{a}, {b}]");
                }
                5 => {
                    let d = !st.disabled;
                    m.set_disabled(d).unwrap();
                    st.disabled = d;
                    what = format!("disabled = {d}");
                }
                6 if !names.is_empty() && !st.disabled => {
                    m.merge_adapter(None, true).unwrap();
                    // merging twice must not add the delta twice
                    if rng.random_bool(0.5) {
                        m.merge_adapter(None, false).unwrap();
                    }
                    what = "merge".into();
                }
                7 => {
                    m.unmerge_adapter().unwrap();
                    what = "unmerge".into();
                }
                8 if !names.is_empty() => {
                    let n = pick(&mut rng);
                    let merged = m.merged_adapters().contains(&n);
                    let before = logits(&m);
                    match m.delete_adapter(&n) {
                        Err(e) => {
                            assert!(merged, "delete of unmerged {n} failed: {e}");
                            assert_eq!(e.code(), "ERR_INVALID_STATE");
                            assert_eq!(max_diff(&before, &logits(&m)), 0.0, "a refused delete changed the model");
                            what = format!("delete {n} refused (merged)");
                        }
                        Ok(()) => {
                            assert!(!merged);
                            st.adapters.retain(|(x, _)| *x != n);
                            st.active.retain(|x| *x != n);
                            if st.active.is_empty() {
                                if let Some((first, _)) = st.adapters.first() {
                                    st.active = vec![first.clone()];
                                }
                            }
                            what = format!("delete {n}");
                        }
                    }
                }
                _ => {
                    // save every adapter and reload them into a fresh model: same logits
                    if names.is_empty() {
                        continue;
                    }
                    let d = root.join(format!("full{seed}-{step}"));
                    m.save_pretrained(&d, None).unwrap();
                    let mut f = base_peft("llama_lora_qv");
                    for n in &names {
                        let dir = if n == "default" { d.clone() } else { d.join(n) };
                        f.load_adapter(&dir, n, false, None).unwrap();
                    }
                    f.set_adapter(&st.active).unwrap();
                    f.set_disabled(st.disabled).unwrap();
                    let diff = max_diff(&logits(&f), &reference(&st));
                    assert!(diff < 1e-5, "seed {seed} step {step}: save+reload differs by {diff}");
                    what = "save + reload".into();
                }
            }
            // Unknown names are refused without a change.
            assert_eq!(m.set_adapter(&["nope".into()]).unwrap_err().code(), "ERR_ADAPTER_NOT_FOUND");
            assert_eq!(m.active_adapters(), st.active.as_slice(), "seed {seed} step {step} ({what}): active adapters");
            assert_eq!(m.adapter_names(), st.adapters.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(), "seed {seed} step {step} ({what})");
            let diff = max_diff(&logits(&m), &reference(&st));
            assert!(diff < 1e-5, "seed {seed} step {step} ({what}): logits differ from the reference by {diff}");
            checks += 1;
        }
    }
    visible(&format!("ok state machine: {checks} steps over 6 seeded sequences, each equal to a fresh reference (< 1e-5)"));
    remove_dir(&root);
}

/// A failing add leaves the model exactly as it was (config, layers, outputs, counts).
#[test]
fn failed_add_adapter_rolls_back() {
    let mut m = adapter_peft("llama_lora_qv", false);
    let before = logits(&m);
    let counts = m.nb_trainable_parameters();
    for bad in [
        json!({"peft_type": "LORA", "target_modules": ["nothing_matches"]}),
        json!({"peft_type": "LORA", "target_modules": ["q_proj"], "layers_to_transform": [7]}),
    ] {
        let cfg = LoraConfig::from_json(&bad, None).unwrap();
        assert!(m.add_adapter("second", cfg, 1).is_err());
        assert_eq!(m.adapter_names(), vec!["default".to_string()]);
        assert!(m.adapter_modules("second").is_empty());
        assert_eq!(m.nb_trainable_parameters(), counts);
        assert_eq!(max_diff(&before, &logits(&m)), 0.0);
    }
    // A modules_to_save entry that matches nothing is ignored with a warning (HF's
    // `_set_trainable` ignores it silently); the adapter is added.
    let cfg = LoraConfig::from_json(&json!({"peft_type": "LORA", "target_modules": ["q_proj"], "modules_to_save": ["no_such_module"]}), None).unwrap();
    m.add_adapter("third", cfg, 1).unwrap();
    assert!(m.take_warnings().iter().any(|w| w.contains("no_such_module")));
    m.delete_adapter("third").unwrap();
    assert_eq!(max_diff(&before, &logits(&m)), 0.0);
    // the existing name is refused and the adapter left untouched
    let cfg = LoraConfig::from_json(&json!({"peft_type": "LORA", "target_modules": ["k_proj"], "init_lora_weights": false}), None).unwrap();
    assert_eq!(m.add_adapter("default", cfg, 1).unwrap_err().code(), "ERR_ADAPTER_EXISTS");
    assert_eq!(max_diff(&before, &logits(&m)), 0.0);
    assert_eq!(m.adapter_modules("default").len(), 4);
}
