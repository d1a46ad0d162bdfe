//! Random-weight models and batches for the tests that compare two computations of the same
//! thing (the fused engine against the general path, gradient checkpointing on and off): the
//! values only need to be non-trivial and reproducible from a seed.

use candle_core::{DType, Device, Tensor};
use peft_core::model::config::LlamaConfig;
use peft_core::model::llama::LlamaForCausalLM;
use peft_core::peft_model::PeftModel;
use peft_core::train::Batch;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde_json::json;
use std::collections::HashMap;

/// The dimensions of a random Llama-family decoder (`model_type` `llama`, `qwen2` with q/k/v
/// biases, `qwen3` with q/k norms, `smollm3` with NoPE layers).
pub struct Shape {
    pub hidden: usize,
    pub heads: usize,
    pub kv: usize,
    pub head_dim: usize,
    pub inter: usize,
    pub layers: usize,
    pub vocab: usize,
    pub model_type: &'static str,
    pub tie: bool,
}

/// A random Llama-family decoder of shape `sh`, weights N(0, 0.15²), norm weights 1 ± 0.2.
pub fn random_llama(sh: &Shape, seed: u64) -> PeftModel {
    let cfg = json!({
        "model_type": sh.model_type, "vocab_size": sh.vocab, "hidden_size": sh.hidden, "intermediate_size": sh.inter,
        "num_hidden_layers": sh.layers, "num_attention_heads": sh.heads, "num_key_value_heads": sh.kv,
        "head_dim": sh.head_dim, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": sh.tie,
    });
    let mut cfg = cfg;
    if sh.model_type == "smollm3" {
        // NoPE layers at 1, 3, ...: a NoPE layer between RoPE layers.
        cfg["no_rope_layers"] = (0..sh.layers).map(|i| u8::from(i % 2 == 0)).collect::<Vec<_>>().into();
    }
    let config = LlamaConfig::from_json(&cfg, std::path::Path::new("engine-test")).unwrap();
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 0.15).unwrap();
    let mut t = HashMap::new();
    let mut put = |name: String, shape: Vec<usize>, norm: bool, r: &mut rand::rngs::StdRng| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = if norm { (0..n).map(|_| 1.0 + r.random_range(-0.2f32..0.2)).collect() } else { (0..n).map(|_| normal.sample(r)).collect() };
        t.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    };
    let (h, q, kv) = (sh.hidden, sh.heads * sh.head_dim, sh.kv * sh.head_dim);
    put("model.embed_tokens.weight".into(), vec![sh.vocab, h], false, &mut r);
    for i in 0..sh.layers {
        let p = format!("model.layers.{i}");
        for (n, o, inp) in [("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h), ("self_attn.o_proj", h, q), ("mlp.gate_proj", sh.inter, h), ("mlp.up_proj", sh.inter, h), ("mlp.down_proj", h, sh.inter)] {
            put(format!("{p}.{n}.weight"), vec![o, inp], false, &mut r);
        }
        if sh.model_type == "qwen2" {
            for (n, o) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                put(format!("{p}.self_attn.{n}.bias"), vec![o], false, &mut r);
            }
        }
        if sh.model_type == "qwen3" {
            put(format!("{p}.self_attn.q_norm.weight"), vec![sh.head_dim], true, &mut r);
            put(format!("{p}.self_attn.k_norm.weight"), vec![sh.head_dim], true, &mut r);
        }
        put(format!("{p}.input_layernorm.weight"), vec![h], true, &mut r);
        put(format!("{p}.post_attention_layernorm.weight"), vec![h], true, &mut r);
    }
    put("model.norm.weight".into(), vec![h], true, &mut r);
    if !sh.tie {
        put("lm_head.weight".into(), vec![sh.vocab, h], false, &mut r);
    }
    PeftModel::new(Box::new(LlamaForCausalLM::from_tensors(config, t, DType::F32, &Device::Cpu).unwrap()))
}

/// A batch with ragged rows: row i keeps `s - pad_i` tokens, padded on the left or the right.
pub fn ragged_batch(b: usize, s: usize, vocab: usize, pads: &[(usize, bool)], seed: u64) -> Batch {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut ids = vec![0u32; b * s];
    let mut mask = vec![1u8; b * s];
    let mut labels = vec![-100i64; b * s];
    for bi in 0..b {
        let (pad, left) = pads.get(bi).copied().unwrap_or((0, false));
        for i in 0..s {
            let is_pad = if left { i < pad } else { i >= s - pad };
            let id = r.random_range(0..vocab as u32);
            ids[bi * s + i] = if is_pad { 0 } else { id };
            mask[bi * s + i] = u8::from(!is_pad);
            labels[bi * s + i] = if is_pad || r.random_bool(0.1) { -100 } else { id as i64 };
        }
    }
    Batch { input_ids: ids, attention_mask: mask, labels, batch_size: b, seq_len: s, ..Default::default() }
}

/// A random Gemma 3 text decoder: layers `sliding` (true = sliding_attention) with
/// `sliding_window` 6 (shorter than the batches below, so the window masks keys), a
/// `query_pre_attn_scalar` other than head_dim, `linear` RoPE scaling on the full layers, norm
/// weights around 0 (scales `1 + w`), tied embeddings.
/// `softcap`: `final_logit_softcapping` (`None`: absent).
pub fn random_gemma3(seed: u64, sliding: &[bool], softcap: Option<f64>) -> PeftModel {
    use peft_core::model::gemma3::{Gemma3Config, Gemma3ForCausalLM};
    let (h, heads, kv, hd, inter, vocab) = (32usize, 4usize, 2usize, 12usize, 40usize, 89usize);
    let types: Vec<&str> = sliding.iter().map(|&s| if s { "sliding_attention" } else { "full_attention" }).collect();
    let cfg = json!({
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": vocab, "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": sliding.len(), "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": hd, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 20,
        "sliding_window": 6, "layer_types": types, "max_position_embeddings": 256, "tie_word_embeddings": true,
        "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": softcap,
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0}, "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    });
    let config = Gemma3Config::from_json(&cfg, std::path::Path::new("engine-gemma3")).unwrap();
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 0.15).unwrap();
    let mut t = HashMap::new();
    let mut put = |name: String, shape: Vec<usize>, norm: bool, r: &mut rand::rngs::StdRng| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = if norm { (0..n).map(|_| r.random_range(-0.2f32..0.2)).collect() } else { (0..n).map(|_| normal.sample(r)).collect() };
        t.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    };
    let (q, kvd) = (heads * hd, kv * hd);
    put("model.embed_tokens.weight".into(), vec![vocab, h], false, &mut r);
    for i in 0..sliding.len() {
        let p = format!("model.layers.{i}");
        for (n, o, inp) in [("self_attn.q_proj", q, h), ("self_attn.k_proj", kvd, h), ("self_attn.v_proj", kvd, h), ("self_attn.o_proj", h, q), ("mlp.gate_proj", inter, h), ("mlp.up_proj", inter, h), ("mlp.down_proj", h, inter)] {
            put(format!("{p}.{n}.weight"), vec![o, inp], false, &mut r);
        }
        put(format!("{p}.self_attn.q_norm.weight"), vec![hd], true, &mut r);
        put(format!("{p}.self_attn.k_norm.weight"), vec![hd], true, &mut r);
        for n in ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"] {
            put(format!("{p}.{n}.weight"), vec![h], true, &mut r);
        }
    }
    put("model.norm.weight".into(), vec![h], true, &mut r);
    PeftModel::new(Box::new(Gemma3ForCausalLM::from_tensors(config, t, DType::F32, &Device::Cpu).unwrap()))
}

/// A random Phi-3 decoder (fused `qkv_proj` / `gate_up_proj`): hidden 32, 4 query heads over 2
/// key/value heads of head_dim 16 (≠ hidden / heads), `partial_rotary_factor` 0.75 (12 of 16
/// dimensions rotated), `longrope` with `original_max_position_embeddings` 10 (a forward whose largest position + 1
/// exceeds 10 uses the long factors, else the short ones; attention factor from
/// `max_position_embeddings` 256 / 10), `sliding_window` `window` (`None`: absent), untied
/// embeddings, weights N(0, 0.15²), norm weights 1 ± 0.2.
pub fn random_phi3(seed: u64, layers: usize, window: Option<usize>) -> PeftModel {
    use peft_core::model::phi3::{Phi3Config, Phi3ForCausalLM};
    let (h, heads, kv, hd, inter, vocab) = (32usize, 4usize, 2usize, 16usize, 40usize, 83usize);
    let rd = hd * 3 / 4;
    let short: Vec<f64> = (0..rd / 2).map(|i| 1.0 + 0.15 * i as f64).collect();
    let long: Vec<f64> = (0..rd / 2).map(|i| 1.0 + 1.7 * i as f64 * i as f64).collect();
    let cfg = json!({
        "model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "vocab_size": vocab, "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": hd, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "max_position_embeddings": 256, "original_max_position_embeddings": 10, "sliding_window": window,
        "tie_word_embeddings": false,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": short, "long_factor": long, "original_max_position_embeddings": 10},
    });
    let config = Phi3Config::from_json(&cfg, std::path::Path::new("engine-phi3")).unwrap();
    assert_eq!((config.rotary_dim, config.head_dim), (rd, hd));
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 0.15).unwrap();
    let mut t = HashMap::new();
    let mut put = |name: String, shape: Vec<usize>, norm: bool, r: &mut rand::rngs::StdRng| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = if norm { (0..n).map(|_| 1.0 + r.random_range(-0.2f32..0.2)).collect() } else { (0..n).map(|_| normal.sample(r)).collect() };
        t.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    };
    let (q, kvd) = (heads * hd, kv * hd);
    put("model.embed_tokens.weight".into(), vec![vocab, h], false, &mut r);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (n, o, inp) in [("self_attn.qkv_proj", q + 2 * kvd, h), ("self_attn.o_proj", h, q), ("mlp.gate_up_proj", 2 * inter, h), ("mlp.down_proj", h, inter)] {
            put(format!("{p}.{n}.weight"), vec![o, inp], false, &mut r);
        }
        put(format!("{p}.input_layernorm.weight"), vec![h], true, &mut r);
        put(format!("{p}.post_attention_layernorm.weight"), vec![h], true, &mut r);
    }
    put("model.norm.weight".into(), vec![h], true, &mut r);
    put("lm_head.weight".into(), vec![vocab, h], false, &mut r);
    PeftModel::new(Box::new(Phi3ForCausalLM::from_tensors(config, t, DType::F32, &Device::Cpu).unwrap()))
}
