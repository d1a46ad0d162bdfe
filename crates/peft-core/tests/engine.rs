//! The fused engine (`peft_core::engine`) against the general path (candle's autograd over
//! `PeftModel::forward`): loss and every trainable gradient on random Llama-family models of
//! several shapes (grouped-query attention, head_dim ≠ hidden/heads, attention biases, padded
//! batches), for LoRA (q,k,v,o and all-linear, rsLoRA, several active adapters, dropout with a
//! fixed seed, merged and disabled adapters) and prompt learning (prefix tuning with and without
//! projection, prompt tuning, P-tuning, multitask prompt tuning); SmolLM3's NoPE layers; Gemma 3;
//! Phi-3 (fused `qkv_proj` / `gate_up_proj`, partial RoPE, longrope, sliding window).

mod common;

use common::random::*;
use peft_core::engine;
use peft_core::peft_model::PeftModel;
use peft_core::train::{loss_and_grads, Batch};
use peft_core::tuners::AdapterConfig;
use rand::SeedableRng;
use serde_json::json;
use std::sync::{Arc, Mutex};

fn adapter(v: serde_json::Value) -> AdapterConfig {
    AdapterConfig::from_json(&v, None).unwrap()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |a, &x| a.max(x.abs()))
}

/// Runs both paths with the same seeded generator and compares the loss and every trainable
/// gradient (relative to the gradient's largest entry).
fn compare(what: &str, m: &PeftModel, b: &Batch, total: Option<usize>) {
    compare_with(what, m, b, total, false)
}

/// [`compare`], with the engine's gradient checkpointing on (`ckpt`) against the general path.
fn compare_with(what: &str, m: &PeftModel, b: &Batch, total: Option<usize>, ckpt: bool) {
    let rng = || Some(Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(99))));
    let fast = if ckpt { engine::try_loss_and_grads_with(m, b, total, rng(), true) } else { engine::try_loss_and_grads(m, b, total, rng()) }.unwrap();
    let (l1, n1, g1) = fast.unwrap_or_else(|| panic!("{what}: the engine declined a model it should run"));
    engine::force_general_path(true);
    let (l2, n2, g2) = loss_and_grads(m, b, total, rng()).unwrap();
    engine::force_general_path(false);
    assert_eq!(n1, n2, "{what}: scored tokens");
    assert!((l1 - l2).abs() <= 1e-5 * l2.abs().max(1.0), "{what}: loss {l1} vs {l2}");
    let params = m.trainable_parameters();
    assert!(!params.is_empty());
    for (name, var) in params {
        let a = g1.get(var.as_tensor()).unwrap_or_else(|| panic!("{what}: engine has no gradient for {name}"));
        let e = g2.get(var.as_tensor()).unwrap_or_else(|| panic!("{what}: general path has no gradient for {name}"));
        assert_eq!(a.dims(), e.dims(), "{what}: {name}");
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let e = e.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = max_abs(&e).max(1e-6);
        let diff = a.iter().zip(&e).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-4 * scale, "{what}: gradient of {name} differs by {diff} (largest entry {scale})");
        assert!(scale > 1e-7, "{what}: gradient of {name} is zero");
    }
}

fn gqa() -> Shape {
    // head_dim 12 ≠ hidden / heads = 8; 4 query heads over 2 key/value heads.
    Shape { hidden: 32, heads: 4, kv: 2, head_dim: 12, inter: 48, layers: 2, vocab: 97, model_type: "llama", tie: false }
}

#[test]
fn lora_qkvo_gqa_padded_batch() {
    let mut m = random_llama(&gqa(), 1);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "init_lora_weights": false})), 3).unwrap();
    let b = ragged_batch(3, 37, 97, &[(0, false), (5, true), (9, false)], 11);
    compare("q,k,v,o padded", &m, &b, None);
    compare("q,k,v,o with num_items_in_batch", &m, &b, Some(123));
    // unpadded, one row, and a batch long enough for several attention row blocks
    compare("unpadded", &m, &ragged_batch(2, 70, 97, &[], 12), None);
    compare("one row", &m, &ragged_batch(1, 5, 97, &[], 13), None);
}

#[test]
fn lora_all_linear_rslora_qwen2_biases_tied() {
    let sh = Shape { hidden: 24, heads: 6, kv: 3, head_dim: 4, inter: 40, layers: 3, vocab: 61, model_type: "qwen2", tie: true };
    let mut m = random_llama(&sh, 2);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 3, "lora_alpha": 5, "use_rslora": true, "target_modules": "all-linear", "init_lora_weights": false})), 4).unwrap();
    compare("all-linear rsLoRA", &m, &ragged_batch(2, 19, 61, &[(4, true)], 21), None);
}

#[test]
fn lora_on_upper_layers_only() {
    // The backward stops at the lowest adapted layer (its q/k/v input gradient is not computed):
    // adapters on layer 2 of 4 (attention and MLP), then on the top layer's MLP only.
    let sh = Shape { layers: 4, ..gqa() };
    let mut m = random_llama(&sh, 5);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"], "layers_to_transform": [2, 3], "init_lora_weights": false})), 3).unwrap();
    compare("layers 2-3", &m, &ragged_batch(2, 21, 97, &[(3, true)], 31), None);
    let mut m = random_llama(&sh, 6);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["down_proj"], "layers_to_transform": [3], "init_lora_weights": false})), 3).unwrap();
    compare("top layer MLP only", &m, &ragged_batch(2, 21, 97, &[], 32), None);
}

#[test]
fn lora_dropout_with_a_fixed_seed() {
    let mut m = random_llama(&gqa(), 3);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 16, "lora_dropout": 0.3, "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"], "init_lora_weights": false})), 5).unwrap();
    compare("dropout 0.3", &m, &ragged_batch(2, 23, 97, &[(3, false)], 31), None);
}

#[test]
fn several_adapters_merged_and_disabled() {
    let mut m = random_llama(&gqa(), 4);
    m.add_adapter("a", adapter(json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "up_proj"], "init_lora_weights": false})), 6).unwrap();
    m.add_adapter("b", adapter(json!({"peft_type": "LORA", "r": 5, "lora_alpha": 3, "target_modules": ["q_proj", "k_proj", "down_proj"], "init_lora_weights": false})), 7).unwrap();
    let bt = ragged_batch(2, 17, 97, &[(2, true)], 41);
    m.set_adapter(&["a".to_string(), "b".to_string()]).unwrap();
    compare("two active adapters", &m, &bt, None);
    m.set_adapter(&["b".to_string()]).unwrap();
    compare("adapter b", &m, &bt, None);
    // `a` merged into the base while `b` trains
    m.merge_adapter(Some(&["a".to_string()]), false).unwrap();
    m.set_adapter(&["a".to_string(), "b".to_string()]).unwrap();
    compare("a merged, b active", &m, &bt, None);
}

#[test]
fn prefix_tuning_with_and_without_projection() {
    for (proj, tag) in [(false, "prefix"), (true, "prefix+projection")] {
        let mut m = random_llama(&gqa(), 5);
        m.add_adapter("default", adapter(json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 6, "prefix_projection": proj, "encoder_hidden_size": 16})), 8).unwrap();
        compare(tag, &m, &ragged_batch(3, 21, 97, &[(0, false), (4, true), (6, false)], 51), None);
    }
}

#[test]
fn prompt_tuning_ptuning_and_multitask() {
    let cases = [
        ("prompt tuning", json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 5})),
        ("p-tuning mlp", json!({"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "encoder_hidden_size": 16, "encoder_reparameterization_type": "MLP"})),
        ("p-tuning lstm", json!({"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "encoder_hidden_size": 8, "encoder_reparameterization_type": "LSTM"})),
        ("multitask", json!({"peft_type": "MULTITASK_PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "num_tasks": 3})),
    ];
    for (tag, cfg) in cases {
        let mut m = random_llama(&gqa(), 6);
        m.add_adapter("default", adapter(cfg), 9).unwrap();
        let mut b = ragged_batch(2, 15, 97, &[(3, true)], 61);
        if tag == "multitask" {
            b.task_ids = Some(vec![2, 0]);
        }
        compare(tag, &m, &b, None);
    }
}

/// Qwen3's per-head q/k RMSNorm (before RoPE) in the engine: training (LoRA on every linear,
/// with the q/k projections adapted so that gradients flow back through both norms), inference
/// logits with padding, and cached decoding, all against the general path.
#[test]
fn qwen3_qk_norm_training_inference_and_decoding() {
    let sh = Shape { hidden: 32, heads: 4, kv: 2, head_dim: 12, inter: 40, layers: 2, vocab: 89, model_type: "qwen3", tie: true };
    let mut m = random_llama(&sh, 21);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": false})), 5).unwrap();
    compare("qwen3 all-linear", &m, &ragged_batch(3, 17, 89, &[(0, false), (5, true), (3, false)], 23), None);
    let bt = ragged_batch(2, 13, 89, &[(4, true)], 29);
    compare_logits("qwen3 logits", &m, &bt, false, None);
    // a prefill and three cached steps, engine against general path
    decoding_matches_the_general_path("qwen3", &m, &bt, sh.layers);
}

/// A prefill of the 2-row batch `bt` and three cached single-token steps: the last-position
/// logits of every step are the same on the engine and on the general path.
fn decoding_matches_the_general_path(what: &str, m: &PeftModel, bt: &Batch, layers: usize) {
    use peft_core::model::{ForwardOptions, KvCache};
    let (b, s) = (bt.batch_size, bt.seq_len);
    assert_eq!(b, 2);
    let run = |general: bool| -> Vec<Vec<f32>> {
        engine::force_general_path(general);
        let mut cache = KvCache::new(layers);
        let opts = ForwardOptions { attention_mask: Some(bt.attention_mask.clone()), last_only: true, ..Default::default() };
        let mut out = vec![m.forward(&bt.input_ids, b, s, &opts, Some(&mut cache)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()];
        let mut mask = bt.attention_mask.clone();
        for step in 0..3u32 {
            let len = s + step as usize;
            mask = (0..b).flat_map(|r| mask[r * len..(r + 1) * len].iter().copied().chain([1u8])).collect();
            let opts = ForwardOptions { attention_mask: Some(mask.clone()), last_only: true, ..Default::default() };
            out.push(m.forward(&[7 + step, 40 + step], b, 1, &opts, Some(&mut cache)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        engine::force_general_path(false);
        out
    };
    for (i, (a, e)) in run(false).iter().zip(&run(true)).enumerate() {
        let diff = a.iter().zip(e).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-5 * max_abs(e).max(1.0), "{what} decoding step {i}: logits differ by {diff}");
    }
}

/// SmolLM3's NoPE layers (no RoPE on layers 1 and 3 of 4) in the engine: LoRA training on every
/// linear (gradients through the NoPE layers' q/k without the RoPE transpose), prefix tuning
/// training, inference logits with padding and cached decoding, all against the general path.
#[test]
fn smollm3_nope_training_inference_and_decoding() {
    let sh = Shape { hidden: 32, heads: 4, kv: 2, head_dim: 8, inter: 40, layers: 4, vocab: 89, model_type: "smollm3", tie: true };
    let mut m = random_llama(&sh, 41);
    assert_eq!(m.base.as_llama().unwrap().config.rope_layers, Some(vec![true, false, true, false]));
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": false})), 5).unwrap();
    compare("smollm3 all-linear", &m, &ragged_batch(3, 17, 89, &[(0, false), (5, true), (3, false)], 43), None);
    let bt = ragged_batch(2, 13, 89, &[(4, true)], 47);
    compare_logits("smollm3 logits", &m, &bt, false, None);
    let pos: Vec<u32> = (0..2 * 13).map(|i| (i % 13) as u32 + 5).collect();
    compare_logits("smollm3 explicit positions", &m, &bt, false, Some(pos));
    decoding_matches_the_general_path("smollm3", &m, &bt, sh.layers);
    let mut p = random_llama(&sh, 42);
    p.add_adapter("default", adapter(json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 6})), 8).unwrap();
    compare("smollm3 prefix tuning", &p, &ragged_batch(3, 15, 89, &[(0, false), (4, true), (2, false)], 53), None);
}

/// Mixed batches (HF's `adapter_names`): each row gets its own LoRA adapter (or none, also
/// `None` rows), on the engine and on the general path: full logits with padding, and a
/// prefill plus cached decoding steps; an inactive adapter named by a row counts too.
#[test]
fn mixed_batches_match_the_general_path() {
    use peft_core::model::{ForwardOptions, KvCache};
    let mut m = random_llama(&gqa(), 31);
    m.add_adapter("a", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_lora_weights": false})), 6).unwrap();
    m.add_adapter("b", adapter(json!({"peft_type": "LORA", "r": 2, "lora_alpha": 6, "use_rslora": true, "target_modules": ["k_proj", "o_proj", "up_proj", "v_proj"], "init_lora_weights": false})), 7).unwrap();
    m.set_adapter(&["a".to_string()]).unwrap();
    let (b, s) = (5, 11);
    let bt = ragged_batch(b, s, 97, &[(0, false), (3, true), (0, false), (2, false), (4, true)], 33);
    let names = |v: &[Option<&str>]| -> Arc<Vec<Option<String>>> { Arc::new(v.iter().map(|n| n.map(String::from)).collect()) };
    let rows = names(&[Some("a"), None, Some("b"), Some("b"), None]);
    let run = |m: &PeftModel, general: bool, last_only: bool, cache: Option<&mut KvCache>| -> Vec<f32> {
        engine::force_general_path(general);
        let opts = ForwardOptions { attention_mask: Some(bt.attention_mask.clone()), last_only, adapter_rows: Some(rows.clone()), ..Default::default() };
        let y = m.forward(&bt.input_ids, b, s, &opts, cache).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        engine::force_general_path(false);
        y
    };
    let opts = ForwardOptions { attention_mask: Some(bt.attention_mask.clone()), adapter_rows: Some(rows.clone()), ..Default::default() };
    assert!(engine::try_forward(&m, &bt.input_ids, b, s, &opts, None).unwrap().is_some(), "the engine should run a LoRA mixed batch");
    let (fast, slow) = (run(&m, false, false, None), run(&m, true, false, None));
    let diff = fast.iter().zip(&slow).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff <= 1e-5 * max_abs(&slow).max(1.0), "mixed batch logits differ by {diff}");
    // the rows really differ by adapter: the base-only rows equal a plain base forward's rows
    m.set_disabled(true).unwrap();
    let base = run(&m, false, false, None);
    m.set_disabled(false).unwrap();
    let same = |r: usize| fast[r * s * 97..(r + 1) * s * 97] == base[r * s * 97..(r + 1) * s * 97];
    assert!(same(1) && same(4), "rows without an adapter must be the base model's");
    assert!(!same(0) && !same(2) && !same(3), "rows with an adapter must differ from the base model's");
    // prefill + cached steps
    let decode = |m: &PeftModel, general: bool| -> Vec<Vec<f32>> {
        let mut cache = KvCache::new(2);
        let mut out = vec![run(m, general, true, Some(&mut cache))];
        let mut mask = bt.attention_mask.clone();
        for step in 0..3u32 {
            let len = s + step as usize;
            mask = (0..b).flat_map(|r| mask[r * len..(r + 1) * len].iter().copied().chain([1u8])).collect();
            engine::force_general_path(general);
            let opts = ForwardOptions { attention_mask: Some(mask.clone()), last_only: true, adapter_rows: Some(rows.clone()), ..Default::default() };
            let ids: Vec<u32> = (0..b as u32).map(|r| 3 + r * 11 + step).collect();
            out.push(m.forward(&ids, b, 1, &opts, Some(&mut cache)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
            engine::force_general_path(false);
        }
        out
    };
    for (i, (a, e)) in decode(&m, false).iter().zip(&decode(&m, true)).enumerate() {
        let diff = a.iter().zip(e).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-5 * max_abs(e).max(1.0), "mixed batch decoding step {i}: logits differ by {diff}");
    }
}

#[test]
fn engine_declines_what_it_does_not_compute() {
    let mut m = random_llama(&gqa(), 7);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "use_dora": true})), 1).unwrap();
    assert!(engine::try_loss_and_grads(&m, &ragged_batch(1, 8, 97, &[], 1), None, None).unwrap().is_none(), "DoRA goes through the general path");
    let mut m = random_llama(&gqa(), 7);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]})), 1).unwrap();
    assert!(engine::try_loss_and_grads(&m, &ragged_batch(1, 8, 97, &[], 1), None, None).unwrap().is_none(), "modules_to_save goes through the general path");
    let mut m = random_llama(&gqa(), 7);
    m.add_adapter("default", adapter(json!({"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]})), 1).unwrap();
    assert!(engine::try_loss_and_grads(&m, &ragged_batch(1, 8, 97, &[], 1), None, None).unwrap().is_none(), "IA3 goes through the general path");
}

/// The engine's inference forward against the general path's logits.
fn compare_logits(what: &str, m: &PeftModel, b: &Batch, last_only: bool, positions: Option<Vec<u32>>) {
    let opts = peft_core::model::ForwardOptions { attention_mask: Some(b.attention_mask.clone()), last_only, position_ids: positions, ..Default::default() };
    let fast = engine::try_forward(m, &b.input_ids, b.batch_size, b.seq_len, &opts, None).unwrap().unwrap_or_else(|| panic!("{what}: the engine declined"));
    engine::force_general_path(true);
    let slow = m.forward(&b.input_ids, b.batch_size, b.seq_len, &opts, None).unwrap();
    engine::force_general_path(false);
    assert_eq!(fast.dims(), slow.dims(), "{what}");
    let a = fast.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let e = slow.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = max_abs(&e);
    let diff = a.iter().zip(&e).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff <= 1e-5 * scale.max(1.0), "{what}: logits differ by {diff} (largest {scale})");
    // and `PeftModel::forward` takes the engine when it applies
    let via = m.forward(&b.input_ids, b.batch_size, b.seq_len, &opts, None).unwrap();
    assert_eq!(via.flatten_all().unwrap().to_vec1::<f32>().unwrap(), a, "{what}: PeftModel::forward");
}

#[test]
fn inference_logits_match_the_general_path() {
    let mut m = random_llama(&gqa(), 8);
    let bt = ragged_batch(3, 29, 97, &[(0, false), (6, true), (4, false)], 71);
    compare_logits("base", &m, &bt, false, None);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.2, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], "init_lora_weights": false})), 3).unwrap();
    compare_logits("LoRA unmerged", &m, &bt, false, None);
    compare_logits("LoRA last position", &m, &bt, true, None);
    let pos: Vec<u32> = (0..3 * 29).map(|i| (i % 29) as u32 + 3).collect();
    compare_logits("LoRA explicit positions", &m, &bt, false, Some(pos));
    m.merge_adapter(None, false).unwrap();
    compare_logits("LoRA merged", &m, &bt, false, None);
    m.unmerge_adapter().unwrap();
    m.set_disabled(true).unwrap();
    compare_logits("disabled", &m, &bt, false, None);
    let sh = Shape { hidden: 24, heads: 6, kv: 3, head_dim: 4, inter: 40, layers: 3, vocab: 61, model_type: "qwen2", tie: true };
    let mut q = random_llama(&sh, 9);
    q.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 3, "lora_alpha": 5, "use_rslora": true, "target_modules": "all-linear", "init_lora_weights": false})), 4).unwrap();
    compare_logits("qwen2 all-linear", &q, &ragged_batch(2, 40, 61, &[(7, true)], 81), false, None);
}

/// Cached decoding: a prefill then single-token steps with a KV cache, through the engine and
/// through the general path, give the same logits at every step (padded rows included), and the
/// engine's cache holds the same keys/values.
#[test]
fn cached_decoding_matches_the_general_path() {
    use peft_core::model::{ForwardOptions, KvCache};
    let mut m = random_llama(&gqa(), 10);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj"], "init_lora_weights": false})), 3).unwrap();
    let (b, s) = (2, 9);
    let bt = ragged_batch(b, s, 97, &[(0, false), (3, true)], 91);
    let run = |general: bool| -> (Vec<Vec<f32>>, KvCache) {
        engine::force_general_path(general);
        let mut cache = KvCache::new(2);
        let mut mask = bt.attention_mask.clone();
        let mut out = Vec::new();
        let opts = ForwardOptions { attention_mask: Some(mask.clone()), last_only: true, ..Default::default() };
        let l = m.forward(&bt.input_ids, b, s, &opts, Some(&mut cache)).unwrap();
        out.push(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        for step in 0..4u32 {
            // append one token per row
            let mut grown = Vec::new();
            for r in 0..b {
                grown.extend_from_slice(&mask[r * (s + step as usize)..(r + 1) * (s + step as usize)]);
                grown.push(1);
            }
            mask = grown;
            let ids = vec![5 + step, 17 + step];
            let opts = ForwardOptions { attention_mask: Some(mask.clone()), last_only: true, ..Default::default() };
            let l = m.forward(&ids, b, 1, &opts, Some(&mut cache)).unwrap();
            out.push(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        engine::force_general_path(false);
        (out, cache)
    };
    let (fast, fc) = run(false);
    let (slow, sc) = run(true);
    assert_eq!(fc.seq_len(), s + 4);
    for (i, (a, e)) in fast.iter().zip(&slow).enumerate() {
        let diff = a.iter().zip(e).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-5 * max_abs(e).max(1.0), "step {i}: logits differ by {diff}");
    }
    for (l, (a, e)) in fc.layers.iter().zip(&sc.layers).enumerate() {
        let (a, e) = (a.as_ref().unwrap(), e.as_ref().unwrap());
        for (x, y) in [(&a.0, &e.0), (&a.1, &e.1)] {
            assert_eq!(x.dims(), y.dims(), "layer {l}");
            let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let diff = x.iter().zip(&y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(diff <= 1e-5 * max_abs(&y).max(1.0), "layer {l}: cache differs by {diff}");
        }
    }
}

/// The engine's in-place KV cache: decoding far past its first capacity (64 positions, so it
/// grows twice), switching between the engine and the general path on the same cache object,
/// a cache cloned mid-way that then diverges from the original, and a cache truncated by the
/// caller: every step's logits match a general-path-only run of the same steps.
#[test]
fn cached_decoding_grows_and_mixes_paths() {
    use peft_core::model::{ForwardOptions, KvCache};
    let mut m = random_llama(&gqa(), 12);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"], "init_lora_weights": false})), 3).unwrap();
    let (b, s) = (2, 7);
    let bt = ragged_batch(b, s, 97, &[(0, false), (2, true)], 93);
    let mask_for = |len: usize| -> Vec<u8> {
        (0..b).flat_map(|r| (0..len).map(move |i| if r == 1 && i < 2 { 0 } else { 1 })).collect()
    };
    let step = |cache: &mut KvCache, ids: &[u32], general: bool| -> Vec<f32> {
        let n = ids.len() / b;
        let len = cache.seq_len() + n;
        engine::force_general_path(general);
        let opts = ForwardOptions { attention_mask: Some(mask_for(len)), last_only: true, ..Default::default() };
        let l = m.forward(ids, b, n, &opts, Some(cache)).unwrap();
        engine::force_general_path(false);
        l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let close = |what: &str, a: &[f32], e: &[f32]| {
        let diff = a.iter().zip(e).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 2e-5 * max_abs(e).max(1.0), "{what}: logits differ by {diff}");
    };
    let tok = |i: usize| vec![(3 + i * 5) as u32 % 97, (11 + i * 7) as u32 % 97];
    // Reference: the general path only.
    let mut rc = KvCache::new(2);
    let mut want = vec![step(&mut rc, &bt.input_ids, true)];
    for i in 0..140 {
        want.push(step(&mut rc, &tok(i), true));
    }
    // The engine, with general-path steps in between (steps 30..33 and 100).
    let mut c = KvCache::new(2);
    close("prefill", &step(&mut c, &bt.input_ids, false), &want[0]);
    let mut forked = None;
    for i in 0..140 {
        let general = (30..33).contains(&i) || i == 100;
        close(&format!("step {i}"), &step(&mut c, &tok(i), general), &want[i + 1]);
        if i == 50 {
            forked = Some(c.clone());
        }
    }
    assert_eq!(c.seq_len(), s + 140);
    // The clone taken after step 50 continues on its own (its own storage): steps 51.. again.
    let mut f = forked.unwrap();
    for i in 51..80 {
        close(&format!("clone, step {i}"), &step(&mut f, &tok(i), false), &want[i + 1]);
    }
    // The original is untouched by the clone's appends: truncate it to step 60 and go on.
    let keep = s + 61;
    for l in c.layers.iter_mut() {
        let (k, v) = l.take().unwrap();
        *l = Some((k.narrow(2, 0, keep).unwrap(), v.narrow(2, 0, keep).unwrap()));
    }
    for i in 61..70 {
        close(&format!("truncated, step {i}"), &step(&mut c, &tok(i), false), &want[i + 1]);
    }
}

/// `set_float32_matmul_precision` (PyTorch's names): "high" (bf16x3 on AMX) keeps the loss and
/// every LoRA gradient within 1e-3 of the "highest" (f32) engine (measured: loss 5e-7 relative,
/// gradients 2.1e-4 of their largest entry), "medium" (bf16) within 0.2 (measured 8.5e-2), on
/// a model large enough for its products to take the AMX path (hidden 256, 128 tokens); and the
/// results differ from f32 at all (the path ran). Skipped visibly without AMX.
#[test]
fn matmul_precision_high_and_medium_stay_close_to_f32() {
    use peft_core::engine::amx::{self, MatmulPrecision};
    if !amx::available() {
        eprintln!("skipped: no AMX on this machine (matmul precision stays f32)");
        return;
    }
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            amx::set_float32_matmul_precision(MatmulPrecision::Highest);
        }
    }
    let _reset = Reset;
    let sh = Shape { hidden: 256, heads: 4, kv: 2, head_dim: 64, inter: 512, layers: 2, vocab: 512, model_type: "llama", tie: false };
    let mut m = random_llama(&sh, 31);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear", "init_lora_weights": false})), 5).unwrap();
    let b = ragged_batch(2, 64, sh.vocab, &[(5, false)], 8);
    let run = |p: MatmulPrecision| {
        amx::set_float32_matmul_precision(p);
        let (l, _, g) = engine::try_loss_and_grads(&m, &b, None, None).unwrap().expect("the engine runs this model");
        let grads: Vec<Vec<f32>> = m.trainable_parameters().iter().map(|(_, v)| g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
        (l, grads)
    };
    let (l0, g0) = run(MatmulPrecision::Highest);
    for (p, tol) in [(MatmulPrecision::High, 1e-3f32), (MatmulPrecision::Medium, 2e-1)] {
        let (l, g) = run(p);
        eprintln!("{}: loss {l} vs {l0}", p.name());
        assert!((l - l0).abs() <= tol as f64 * l0.abs(), "{}: loss {l} vs {l0}", p.name());
        let mut worst = 0f32;
        for (a, e) in g.iter().zip(&g0) {
            let scale = max_abs(e).max(1e-6);
            worst = worst.max(a.iter().zip(e).fold(0f32, |mx, (x, y)| mx.max((x - y).abs())) / scale);
        }
        eprintln!("{}: worst gradient difference {worst:.2e} of the largest entry", p.name());
        assert!(worst <= tol, "{}: gradients differ by {worst} of their largest entry", p.name());
        assert!(worst > 0.0, "{}: identical to f32, the AMX path did not run", p.name());
    }
}


/// Gemma 3 in the engine (four norms per layer, GeGLU, q/k norms, scaled embeddings,
/// `query_pre_attn_scalar`, sliding-window and full layers with two RoPE tables): LoRA training
/// on every linear with padded rows (the window shorter than the rows), inference logits,
/// cached decoding past the window, prefix tuning and prompt tuning, all against the general
/// path; logit soft-capping is left to the general path.
#[test]
fn gemma3_training_inference_and_decoding() {
    let sliding = [true, false, true];
    let mut m = random_gemma3(61, &sliding, None);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": false})), 5).unwrap();
    compare("gemma3 all-linear", &m, &ragged_batch(3, 17, 89, &[(0, false), (5, true), (3, false)], 63), None);
    let bt = ragged_batch(2, 13, 89, &[(4, true)], 67);
    compare_logits("gemma3 logits", &m, &bt, false, None);
    compare_logits("gemma3 last-only logits", &m, &bt, true, None);
    decoding_matches_the_general_path("gemma3", &m, &bt, sliding.len());
    let mut p = random_gemma3(62, &sliding, None);
    p.add_adapter("default", adapter(json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4})), 8).unwrap();
    compare("gemma3 prefix tuning", &p, &ragged_batch(3, 9, 89, &[(0, false), (2, true), (3, false)], 71), None);
    let mut pt = random_gemma3(63, &sliding, None);
    pt.add_adapter("default", adapter(json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 5})), 9).unwrap();
    compare("gemma3 prompt tuning", &pt, &ragged_batch(2, 11, 89, &[(3, true)], 73), None);
}

/// `final_logit_softcapping` (Gemma 2 style) is not computed by the engine: the general path runs.
#[test]
fn gemma3_softcapping_goes_to_the_general_path() {
    let m = random_gemma3(64, &[true, false], Some(30.0));
    assert_eq!(m.base.as_gemma3().unwrap().config.final_logit_softcapping, Some(30.0));
    assert!(engine::try_loss_and_grads(&m, &ragged_batch(1, 8, 89, &[], 1), None, None).unwrap().is_none());
    let m = random_gemma3(64, &[true, false], None);
    assert!(engine::try_loss_and_grads(&m, &ragged_batch(1, 8, 89, &[], 1), None, None).unwrap().is_some());
}


/// LoRA on Phi-3's four linears (the fused `qkv_proj` and `gate_up_proj` included, one LoRA each
/// over the whole fused output): r 4, dropout `dropout`.
fn phi3_lora(seed: u64, dropout: f64) -> PeftModel {
    let mut m = random_phi3(seed, 2, Some(7));
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": dropout, "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "init_lora_weights": false})), 5).unwrap();
    m
}

/// Phi-3 training on the engine (fused linears with one LoRA each, GQA, partial RoPE 0.75,
/// longrope, sliding window 7 shorter than the rows, padded rows): loss and every LoRA
/// gradient against the general path, with the long factors (17 positions > original 10) and
/// the short ones (8 positions), with LoRA dropout, and with gradient checkpointing.
#[test]
fn phi3_lora_training_matches_the_general_path() {
    let m = phi3_lora(81, 0.0);
    let long = ragged_batch(3, 17, 83, &[(0, false), (5, true), (3, false)], 82);
    let short = ragged_batch(2, 8, 83, &[(2, true)], 83);
    compare("phi3 long factors", &m, &long, None);
    compare("phi3 short factors", &m, &short, None);
    compare_with("phi3 gradient checkpointing", &m, &long, None, true);
    let d = phi3_lora(84, 0.2);
    compare("phi3 dropout", &d, &long, Some(40));
    compare_with("phi3 dropout + gradient checkpointing", &d, &long, None, true);
    // LoRA on the fused MLP only, in the top layer: the backward stops above layer 0
    let mut top = random_phi3(85, 3, None);
    top.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 3, "lora_alpha": 5, "use_rslora": true, "target_modules": ["gate_up_proj"], "layers_to_transform": [2], "init_lora_weights": false})), 6).unwrap();
    compare("phi3 top gate_up_proj only, no window", &top, &long, None);
}

/// Phi-3 inference on the engine: full and last-only logits with padding, explicit positions,
/// both longrope factor sets, merged and disabled adapters.
#[test]
fn phi3_logits_match_the_general_path() {
    let mut m = phi3_lora(91, 0.1);
    let long = ragged_batch(2, 15, 83, &[(4, true)], 92);
    let short = ragged_batch(3, 9, 83, &[(0, false), (2, true), (3, false)], 93);
    compare_logits("phi3 logits, long factors", &m, &long, false, None);
    compare_logits("phi3 last-only logits", &m, &long, true, None);
    compare_logits("phi3 logits, short factors", &m, &short, false, None);
    // positions 2..10 (within the original length) and 4..12 (past it)
    for (off, tag) in [(1u32, "phi3 explicit positions (short)"), (3, "phi3 explicit positions (long)")] {
        let pos: Vec<u32> = (0..3 * 9).map(|i| (i % 9) as u32 + off).collect();
        compare_logits(tag, &m, &short, false, Some(pos));
    }
    m.merge_adapter(None, false).unwrap();
    compare_logits("phi3 merged", &m, &long, false, None);
    m.unmerge_adapter().unwrap();
    m.set_disabled(true).unwrap();
    compare_logits("phi3 disabled", &m, &short, false, None);
}

/// Phi-3 cached decoding on the engine: a prefill within the original length (short factors),
/// then single-token steps across it. The step that crosses it re-rotates the cached keys to
/// the long factors on the general path (`Phi3ForCausalLM`); the engine declines exactly that
/// step and runs all the others on the same cache. Every step's logits, and the final cache,
/// match a general-path-only run; a prefill already past the original length runs on the
/// engine throughout.
#[test]
fn phi3_cached_decoding_matches_the_general_path() {
    use peft_core::model::{ForwardOptions, KvCache};
    let m = phi3_lora(95, 0.0);
    for (s, steps, want_declined) in [(7usize, 6u32, 1usize), (12, 3, 0)] {
        let bt = ragged_batch(2, s, 83, &[(0, false), (3, true)], 96);
        let b = 2;
        // (logits per step, final cache, steps the engine declined)
        let run = |general: bool| -> (Vec<Vec<f32>>, KvCache, usize) {
            let mut cache = KvCache::new(2);
            let mut declined = 0;
            let mut fwd = |ids: &[u32], n: usize, mask: &[u8], cache: &mut KvCache| -> Vec<f32> {
                let opts = ForwardOptions { attention_mask: Some(mask.to_vec()), last_only: true, ..Default::default() };
                let fast = if general { None } else { engine::try_forward(&m, ids, b, n, &opts, Some(&mut *cache)).unwrap() };
                let y = match fast {
                    Some(y) => y,
                    None => {
                        declined += usize::from(!general);
                        engine::force_general_path(true);
                        let y = m.forward(ids, b, n, &opts, Some(&mut *cache)).unwrap();
                        engine::force_general_path(false);
                        y
                    }
                };
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            let mut out = vec![fwd(&bt.input_ids, s, &bt.attention_mask, &mut cache)];
            let mut mask = bt.attention_mask.clone();
            for step in 0..steps {
                let len = s + step as usize;
                mask = (0..b).flat_map(|r| mask[r * len..(r + 1) * len].iter().copied().chain([1u8])).collect();
                out.push(fwd(&[7 + step, 40 + step], 1, &mask, &mut cache));
            }
            (out, cache, declined)
        };
        let (fast, fc, declined) = run(false);
        let (slow, sc, _) = run(true);
        assert_eq!(declined, want_declined, "prefill {s}: steps the engine declined");
        for (i, (a, e)) in fast.iter().zip(&slow).enumerate() {
            let diff = a.iter().zip(e).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff <= 1e-5 * max_abs(e).max(1.0), "phi3 prefill {s}, decoding step {i}: logits differ by {diff}");
        }
        for (l, (a, e)) in fc.layers.iter().zip(&sc.layers).enumerate() {
            let (a, e) = (a.as_ref().unwrap(), e.as_ref().unwrap());
            for (x, y) in [(&a.0, &e.0), (&a.1, &e.1)] {
                assert_eq!(x.dims(), y.dims(), "layer {l}");
                let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let diff = x.iter().zip(&y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(diff <= 1e-5 * max_abs(&y).max(1.0), "phi3 prefill {s}, layer {l}: cache differs by {diff}");
            }
        }
    }
    // and through `PeftModel::forward` (the engine where it applies), as `decoding_matches_the_general_path`
    decoding_matches_the_general_path("phi3", &m, &ragged_batch(2, 8, 83, &[(2, true)], 97), 2);
}

/// Phi-3 prefix tuning and prompt tuning on the engine (long and short factors), and mixed
/// batches of two LoRA adapters (logits and cached decoding).
#[test]
fn phi3_prompt_learning_and_mixed_batches() {
    use peft_core::model::{ForwardOptions, KvCache};
    let mut p = random_phi3(101, 2, Some(7));
    p.add_adapter("default", adapter(json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4})), 8).unwrap();
    compare("phi3 prefix tuning, long", &p, &ragged_batch(3, 11, 83, &[(0, false), (2, true), (3, false)], 102), None);
    compare("phi3 prefix tuning, short", &p, &ragged_batch(2, 5, 83, &[(1, true)], 103), None);
    let mut pt = random_phi3(104, 2, Some(7));
    pt.add_adapter("default", adapter(json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 5})), 9).unwrap();
    compare("phi3 prompt tuning, long", &pt, &ragged_batch(2, 11, 83, &[(3, true)], 105), None);
    compare("phi3 prompt tuning, short", &pt, &ragged_batch(2, 4, 83, &[], 106), None);

    let mut m = random_phi3(107, 2, Some(7));
    m.add_adapter("a", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj", "down_proj"], "init_lora_weights": false})), 6).unwrap();
    m.add_adapter("b", adapter(json!({"peft_type": "LORA", "r": 2, "lora_alpha": 6, "use_rslora": true, "target_modules": ["qkv_proj", "o_proj", "gate_up_proj"], "init_lora_weights": false})), 7).unwrap();
    m.set_adapter(&["a".to_string()]).unwrap();
    let (b, s) = (3, 12);
    let bt = ragged_batch(b, s, 83, &[(0, false), (3, true), (2, false)], 108);
    let rows: Arc<Vec<Option<String>>> = Arc::new(vec![Some("a".into()), None, Some("b".into())]);
    let opts = ForwardOptions { attention_mask: Some(bt.attention_mask.clone()), adapter_rows: Some(rows.clone()), ..Default::default() };
    let fast = engine::try_forward(&m, &bt.input_ids, b, s, &opts, None).unwrap().expect("the engine runs a Phi-3 LoRA mixed batch");
    engine::force_general_path(true);
    let slow = m.forward(&bt.input_ids, b, s, &opts, None).unwrap();
    engine::force_general_path(false);
    let (fast, slow) = (fast.flatten_all().unwrap().to_vec1::<f32>().unwrap(), slow.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let diff = fast.iter().zip(&slow).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff <= 1e-5 * max_abs(&slow).max(1.0), "phi3 mixed batch logits differ by {diff}");
    let decode = |general: bool| -> Vec<Vec<f32>> {
        engine::force_general_path(general);
        let mut cache = KvCache::new(2);
        let opts = ForwardOptions { attention_mask: Some(bt.attention_mask.clone()), last_only: true, adapter_rows: Some(rows.clone()), ..Default::default() };
        let mut out = vec![m.forward(&bt.input_ids, b, s, &opts, Some(&mut cache)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()];
        let mut mask = bt.attention_mask.clone();
        for step in 0..3u32 {
            let len = s + step as usize;
            mask = (0..b).flat_map(|r| mask[r * len..(r + 1) * len].iter().copied().chain([1u8])).collect();
            let opts = ForwardOptions { attention_mask: Some(mask.clone()), last_only: true, adapter_rows: Some(rows.clone()), ..Default::default() };
            let ids: Vec<u32> = (0..b as u32).map(|r| 3 + r * 11 + step).collect();
            out.push(m.forward(&ids, b, 1, &opts, Some(&mut cache)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        engine::force_general_path(false);
        out
    };
    for (i, (a, e)) in decode(false).iter().zip(&decode(true)).enumerate() {
        let diff = a.iter().zip(e).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-5 * max_abs(e).max(1.0), "phi3 mixed batch decoding step {i}: logits differ by {diff}");
    }
}

/// What the engine does not compute on Phi-3 goes to the general path: DoRA on the fused
/// `qkv_proj`, and LoRA on the embedding.
#[test]
fn phi3_engine_declines_what_it_does_not_compute() {
    let bt = ragged_batch(1, 8, 83, &[], 1);
    let m = phi3_lora(111, 0.0);
    assert!(engine::try_loss_and_grads(&m, &bt, None, None).unwrap().is_some(), "the engine runs Phi-3 LoRA");
    let mut d = random_phi3(112, 2, None);
    d.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["qkv_proj"], "use_dora": true})), 1).unwrap();
    assert!(engine::try_loss_and_grads(&d, &bt, None, None).unwrap().is_none(), "DoRA goes through the general path");
    let mut e = random_phi3(113, 2, None);
    e.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["embed_tokens", "qkv_proj"]})), 1).unwrap();
    assert!(engine::try_loss_and_grads(&e, &bt, None, None).unwrap().is_none(), "LoRA on the embedding goes through the general path");
}
