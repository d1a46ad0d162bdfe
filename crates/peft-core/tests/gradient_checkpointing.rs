//! Gradient checkpointing (transformers' `gradient_checkpointing_enable` + PEFT's
//! `prepare_model_for_gradient_checkpointing`): a training step with it gives the loss and
//! every trainable gradient of the step without it — bit for bit on the fused engine, within
//! float rounding on the general path (its layer-wise driver sums the gradients in another
//! order) — on random tiny Llama models with grouped-query attention and padded rows (LoRA
//! with dropout, LoRA on the embedding, prompt tuning, DoRA, (IA)³) and on Gemma 3; trainer runs
//! with it follow the same loss trajectory; Phi-3 on the engine and on the general path, GPT-2
//! on the general path; prefix tuning and uncovered models (T5) are refused with coded errors
//! naming `gradientCheckpointing` (HF's text for prefix tuning).

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device};
use common::random::*;
use common::*;
use peft_core::engine;
use peft_core::model::loader::load_causal_lm;
use peft_core::peft_model::PeftModel;
use peft_core::train::{loss_and_grads_with, Batch, Trainer, TrainingArgs};
use peft_core::tuners::AdapterConfig;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::{Arc, Mutex};

const PREFIX_TEXT: &str = "PREFIX_TUNING does not work with gradient checkpointing.";

/// A random Llama with grouped-query attention (6 query heads over 2 key/value heads,
/// head_dim 8 ≠ hidden / heads), 3 layers.
fn llama(seed: u64) -> PeftModel {
    let sh = Shape { hidden: 40, heads: 6, kv: 2, head_dim: 8, inter: 56, layers: 3, vocab: 97, model_type: "llama", tie: false };
    random_llama(&sh, seed)
}

/// A random Gemma 3 text decoder (sliding, full, sliding layers; window 6, shorter than the rows).
fn gemma3(seed: u64) -> PeftModel {
    random_gemma3(seed, &[true, false, true], None)
}

fn adapter(v: serde_json::Value) -> AdapterConfig {
    AdapterConfig::from_json(&v, None).unwrap()
}

/// One step's loss, scored tokens and gradients, on the engine (`general` false) or the
/// general path, with checkpointing on or off, dropout drawn from a generator seeded 99 (also
/// returned, to compare where the step leaves it).
fn step(m: &PeftModel, b: &Batch, general: bool, ckpt: bool) -> (f64, usize, GradStore, u64) {
    let rng = Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(99)));
    engine::force_general_path(general);
    let out = loss_and_grads_with(m, b, Some(77), Some(rng.clone()), ckpt);
    engine::force_general_path(false);
    let (l, n, g) = out.unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    let after = rng.lock().unwrap().random::<u64>();
    (l, n, g, after)
}

fn flat(g: &GradStore, var: &candle_core::Var, what: &str, name: &str) -> Vec<f32> {
    g.get(var.as_tensor())
        .unwrap_or_else(|| panic!("{what}: no gradient for {name}"))
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Checkpointing on and off give the same loss, the same scored tokens, the same dropout draws
/// and every trainable gradient equal: bit for bit (`rel` = 0) or within `rel` of the
/// gradient's largest entry. Returns the checkpointed step.
fn same(what: &str, m: &PeftModel, b: &Batch, general: bool, rel: f32) -> (f64, GradStore) {
    let (l0, n0, g0, r0) = step(m, b, general, false);
    let (l1, n1, g1, r1) = step(m, b, general, true);
    assert_eq!(n0, n1, "{what}: scored tokens");
    assert_eq!(r0, r1, "{what}: the step left the dropout generator elsewhere");
    if rel == 0.0 {
        assert_eq!(l0.to_bits(), l1.to_bits(), "{what}: loss {l0} vs {l1}");
    } else {
        assert!((l0 - l1).abs() <= 1e-6 * l0.abs(), "{what}: loss {l0} vs {l1}");
    }
    let params = m.trainable_parameters();
    assert!(!params.is_empty());
    for (name, var) in &params {
        let a = flat(&g0, var, what, name);
        let c = flat(&g1, var, what, name);
        let scale = a.iter().fold(0f32, |s, x| s.max(x.abs()));
        assert!(scale > 1e-7, "{what}: gradient of {name} is zero");
        if rel == 0.0 {
            assert!(a.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: gradient of {name} is not bit-equal");
        } else {
            let diff = a.iter().zip(&c).fold(0f32, |d, (x, y)| d.max((x - y).abs()));
            assert!(diff <= rel * scale, "{what}: gradient of {name} differs by {diff} (largest entry {scale})");
        }
    }
    visible(&format!("ok {what}: {} gradients, loss {l1}", params.len()));
    (l1, g1)
}

/// The checkpointed engine step against the checkpointed general step (1e-4 relative, the
/// engine suite's bar).
fn engine_matches_general(what: &str, m: &PeftModel, b: &Batch) {
    let (le, _, ge, _) = step(m, b, false, true);
    let (lg, _, gg, _) = step(m, b, true, true);
    assert!((le - lg).abs() <= 1e-5 * lg.abs().max(1.0), "{what}: loss {le} vs {lg}");
    for (name, var) in m.trainable_parameters() {
        let a = flat(&ge, &var, what, &name);
        let c = flat(&gg, &var, what, &name);
        let scale = c.iter().fold(0f32, |s, x| s.max(x.abs())).max(1e-6);
        let diff = a.iter().zip(&c).fold(0f32, |d, (x, y)| d.max((x - y).abs()));
        assert!(diff <= 1e-4 * scale, "{what}: gradient of {name} differs by {diff} (largest entry {scale})");
    }
}

fn llama_batch(seed: u64) -> Batch {
    ragged_batch(3, 13, 97, &[(0, false), (4, true), (3, false)], seed)
}

#[test]
fn engine_lora_is_bit_equal_with_and_without() {
    let mut m = llama(1);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "init_lora_weights": false})), 2).unwrap();
    let b = llama_batch(3);
    assert!(engine::try_loss_and_grads_with(&m, &b, None, None, true).unwrap().is_some(), "the engine runs LoRA q,k,v,o with checkpointing");
    same("engine LoRA q,k,v,o + dropout", &m, &b, false, 0.0);
    engine_matches_general("LoRA q,k,v,o + dropout", &m, &b);
    // All linears, adapters only in the top layer (the backward stops below it), rsLoRA.
    let mut a = llama(4);
    a.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 3, "lora_alpha": 6, "use_rslora": true, "target_modules": "all-linear", "layers_to_transform": [2], "init_lora_weights": false})), 5).unwrap();
    same("engine LoRA all-linear, top layer only", &a, &llama_batch(6), false, 0.0);
}

#[test]
fn engine_prompt_tuning_is_bit_equal_with_and_without() {
    let mut m = llama(7);
    m.add_adapter("default", adapter(json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 5})), 8).unwrap();
    let b = ragged_batch(2, 11, 97, &[(3, true), (2, false)], 9);
    same("engine prompt tuning", &m, &b, false, 0.0);
    same("general prompt tuning", &m, &b, true, 1e-6);
    engine_matches_general("prompt tuning", &m, &b);
    let mut p = llama(10);
    p.add_adapter("default", adapter(json!({"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "encoder_hidden_size": 16})), 11).unwrap();
    same("engine P-tuning", &p, &b, false, 0.0);
    same("general P-tuning", &p, &b, true, 1e-6);
}

#[test]
fn gemma3_with_and_without() {
    let mut m = gemma3(21);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "all-linear", "init_lora_weights": false})), 22).unwrap();
    let b = ragged_batch(3, 17, 89, &[(0, false), (5, true), (3, false)], 23);
    same("gemma3 engine LoRA all-linear + dropout", &m, &b, false, 0.0);
    same("gemma3 general LoRA all-linear + dropout", &m, &b, true, 1e-6);
    engine_matches_general("gemma3 LoRA", &m, &b);
}

/// Phi-3 on the engine (fused qkv_proj / gate_up_proj, partial RoPE, longrope past the original
/// length; the HF fixture model): bit for bit with and without, and against the general path.
#[test]
fn phi3_engine_with_and_without() {
    let mut p = PeftModel::new(load_causal_lm(&fixtures_dir().join("models/phi3"), DType::F32, &Device::Cpu).unwrap().model);
    p.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "init_lora_weights": false})), 75).unwrap();
    let vocab = p.base.info().vocab_size;
    let b = ragged_batch(3, 12, vocab, &[(0, false), (3, true), (2, false)], 76);
    assert!(engine::try_loss_and_grads_with(&p, &b, None, None, true).unwrap().is_some(), "the engine runs Phi-3 LoRA with checkpointing");
    same("phi3 engine LoRA + dropout", &p, &b, false, 0.0);
    engine_matches_general("phi3 LoRA + dropout", &p, &b);
}

#[test]
fn general_path_with_and_without() {
    let b = llama_batch(31);
    // LoRA with dropout on the general path: the recomputed layers draw the same masks.
    let mut m = llama(30);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.2, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_lora_weights": false})), 32).unwrap();
    same("general LoRA + dropout", &m, &b, true, 1e-6);
    // DoRA and (IA)³ only run on the general path.
    let mut d = llama(33);
    d.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "init_lora_weights": false})), 34).unwrap();
    assert!(engine::try_loss_and_grads_with(&d, &b, None, None, true).unwrap().is_none());
    same("general DoRA", &d, &b, true, 1e-6);
    let mut i = llama(35);
    i.add_adapter("default", adapter(json!({"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"], "init_ia3_weights": false})), 36).unwrap();
    same("general IA3", &i, &b, true, 1e-6);
    // LoRA on the embedding: the input embeddings have a graph of their own.
    let mut e = llama(37);
    e.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "o_proj"], "init_lora_weights": false})), 38).unwrap();
    same("general LoRA on embed_tokens", &e, &b, true, 1e-6);
}

/// The model setting and the trainer option both turn it on; three optimizer steps (two
/// micro-batches each, dropout) follow the same loss trajectory as without it.
#[test]
fn trainer_runs_match_without_checkpointing() {
    let make = || {
        let mut m = llama(41);
        m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "init_lora_weights": false})), 42).unwrap();
        m
    };
    let batches = [llama_batch(43), llama_batch(44)];
    let run = |m: &PeftModel, ckpt_arg: bool, general: bool| -> Vec<(u64, u64)> {
        let args = TrainingArgs { learning_rate: 1e-2, max_steps: 3, seed: 5, gradient_checkpointing: ckpt_arg, ..Default::default() };
        let mut tr = Trainer::new(m, args).unwrap();
        engine::force_general_path(general);
        let out: Vec<(u64, u64)> = (0..3).map(|_| tr.step(m, &batches).map(|o| (o.loss.to_bits(), o.grad_norm.to_bits()))).collect::<Result<_, _>>().unwrap();
        engine::force_general_path(false);
        out
    };
    let plain = run(&make(), false, false);
    assert_eq!(run(&make(), true, false), plain, "trainer option, engine: bit-equal losses and gradient norms");
    let mut on = make();
    on.set_gradient_checkpointing(true).unwrap();
    assert!(on.gradient_checkpointing());
    assert_eq!(run(&on, false, false), plain, "model setting, engine");
    let general = run(&make(), false, true);
    let general_ckpt = run(&make(), true, true);
    for (k, ((l0, _), (l1, _))) in general.iter().zip(&general_ckpt).enumerate() {
        let (l0, l1) = (f64::from_bits(*l0), f64::from_bits(*l1));
        assert!((l0 - l1).abs() <= 1e-6 * l0.abs(), "general path step {k}: loss {l0} vs {l1}");
    }
}

#[test]
fn prefix_tuning_is_refused_with_hf_text() {
    let prefix = || adapter(json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4}));
    // Adding a prefix adapter to a model with checkpointing on (HF `_setup_prompt_encoder`).
    let mut m = llama(51);
    m.set_gradient_checkpointing(true).unwrap();
    let e = m.add_adapter("default", prefix(), 52).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains("gradientCheckpointing") && e.to_string().contains(PREFIX_TEXT), "{e}");
    assert!(m.adapter_names().is_empty(), "the model is left unchanged");
    // Turning it on with a prefix adapter, a trainer asking for it, a checkpointed step.
    let mut p = llama(53);
    p.add_adapter("default", prefix(), 54).unwrap();
    let e = p.set_gradient_checkpointing(true).unwrap_err();
    assert!(e.to_string().contains(PREFIX_TEXT), "{e}");
    assert!(!p.gradient_checkpointing());
    let args = TrainingArgs { gradient_checkpointing: true, ..Default::default() };
    let e = Trainer::new(&p, args).err().expect("refused");
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains(PREFIX_TEXT), "{e}");
    for general in [false, true] {
        engine::force_general_path(general);
        let e = loss_and_grads_with(&p, &llama_batch(55), None, None, true).unwrap_err();
        engine::force_general_path(false);
        assert!(e.to_string().contains("`gradientCheckpointing`") && e.to_string().contains(PREFIX_TEXT), "{e}");
    }
    // Without it prefix tuning trains as before.
    assert!(loss_and_grads_with(&p, &llama_batch(55), None, None, false).is_ok());
}

/// Phi-3 and GPT-2 (general path only): LoRA with dropout (and GPT-2's fused `c_attn`).
#[test]
fn phi3_and_gpt2_with_and_without() {
    let load = |name: &str| PeftModel::new(load_causal_lm(&fixtures_dir().join("models").join(name), DType::F32, &Device::Cpu).unwrap().model);
    let mut p = load("phi3");
    p.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["qkv_proj", "o_proj", "gate_up_proj"], "init_lora_weights": false})), 71).unwrap();
    let vocab = p.base.info().vocab_size;
    same("phi3 general LoRA + dropout", &p, &ragged_batch(2, 12, vocab, &[(3, true)], 72), true, 1e-6);
    let mut g = load("gpt2");
    g.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["c_attn", "c_proj"], "init_lora_weights": false})), 73).unwrap();
    let vocab = g.base.info().vocab_size;
    same("gpt2 general LoRA + dropout", &g, &ragged_batch(2, 12, vocab, &[(0, false), (4, false)], 74), true, 1e-6);
}

#[test]
fn uncovered_models_are_refused() {
    let path = fixtures_dir().join("models/t5");
    let mut m = PeftModel::new(load_causal_lm(&path, DType::F32, &Device::Cpu).unwrap().model);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 2, "target_modules": ["q", "v"]})), 61).unwrap();
    let ids: Vec<u32> = (1..9).collect();
    let b = Batch { input_ids: ids.clone(), attention_mask: vec![1; 8], labels: ids.iter().map(|&i| i as i64).collect(), batch_size: 1, seq_len: 8, ..Default::default() };
    let e = loss_and_grads_with(&m, &b, None, None, true).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains("`gradientCheckpointing`") && e.to_string().contains("SEQ_2_SEQ_LM"), "{e}");
    // The trainer refuses at its step, before any update.
    m.set_gradient_checkpointing(true).unwrap();
    let mut tr = Trainer::new(&m, TrainingArgs::default()).unwrap();
    let e = tr.step(&m, std::slice::from_ref(&b)).unwrap_err();
    assert!(e.to_string().contains("`gradientCheckpointing`"), "{e}");
    assert_eq!(tr.global_step(), 0);
    m.set_gradient_checkpointing(false).unwrap();
    assert!(tr.step(&m, &[b]).is_ok());
}
