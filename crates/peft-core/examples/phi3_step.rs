//! Times a training step (loss + LoRA gradients) of a Phi-3-shaped random model on the fused
//! engine and on the general path (candle's autograd), interleaved in one process.
//!
//! `cargo run --profile test-release -p peft-core --example phi3_step -- [batch] [seq] [iters] [layers]`
//!
//! The model has Phi-4-mini's layer structure at a small width: hidden 768, 12 query heads over
//! 4 key/value heads of head_dim 64, `partial_rotary_factor` 0.75, intermediate 2048, Phi-3's
//! vocabulary of 32064, `longrope` (original length 4096, so a 128-token batch uses the short
//! factors) and `sliding_window` 2047; weights N(0, 0.02²) from a fixed seed. The adapter is
//! LoRA r 8 on `qkv_proj` and `o_proj` (HF PEFT's default targets for Phi-3). Prints each
//! path's per-step time (min and median over `iters` rounds after one warm-up step each) and
//! tokens/s; the first round also checks that the two losses agree.
use candle_core::{DType, Device, Tensor};
use peft_core::model::phi3::{Phi3Config, Phi3ForCausalLM};
use peft_core::peft_model::PeftModel;
use peft_core::train::{loss_and_grads, Batch};
use peft_core::tuners::AdapterConfig;
use std::collections::HashMap;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Deterministic values in (-1, 1) (splitmix64).
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn main() -> peft_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).map(|s| s.parse().expect("a number")).unwrap_or(d);
    let (b, s, iters, layers) = (arg(1, 4), arg(2, 128), arg(3, 5), arg(4, 6));
    let (h, heads, kv, hd, inter, vocab) = (768usize, 12usize, 4usize, 64usize, 2048usize, 32064usize);
    let rd = hd * 3 / 4;
    let cfg = serde_json::json!({
        "model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "vocab_size": vocab, "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": hd, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "sliding_window": 2047, "tie_word_embeddings": true,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": vec![1.0; rd / 2], "long_factor": (0..rd / 2).map(|i| 1.0 + i as f64).collect::<Vec<_>>()},
    });
    let config = Phi3Config::from_json(&cfg, std::path::Path::new("phi3-step"))?;
    let mut g = Gen(7);
    let mut t = HashMap::new();
    let mut put = |name: String, shape: Vec<usize>, norm: bool| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| if norm { 1.0 + 0.1 * g.next() } else { 0.035 * g.next() }).collect();
        t.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).expect("a tensor"));
    };
    let (q, kvd) = (heads * hd, kv * hd);
    put("model.embed_tokens.weight".into(), vec![vocab, h], false);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (n, o, inp) in [("self_attn.qkv_proj", q + 2 * kvd, h), ("self_attn.o_proj", h, q), ("mlp.gate_up_proj", 2 * inter, h), ("mlp.down_proj", h, inter)] {
            put(format!("{p}.{n}.weight"), vec![o, inp], false);
        }
        put(format!("{p}.input_layernorm.weight"), vec![h], true);
        put(format!("{p}.post_attention_layernorm.weight"), vec![h], true);
    }
    put("model.norm.weight".into(), vec![h], true);
    let mut m = PeftModel::new(Box::new(Phi3ForCausalLM::from_tensors(config, t, DType::F32, &Device::Cpu)?));
    let lora = serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["qkv_proj", "o_proj"], "init_lora_weights": false});
    m.add_adapter("default", AdapterConfig::from_json(&lora, None)?, 0)?;
    let ids: Vec<u32> = (0..b * s).map(|i| ((i as u64 * 2_654_435_761) % vocab as u64) as u32).collect();
    let batch = Batch { labels: ids.iter().map(|&i| i as i64).collect(), input_ids: ids, attention_mask: vec![1; b * s], batch_size: b, seq_len: s, ..Default::default() };
    println!("Phi-3-shaped model: {layers} layers, hidden {h}, GQA {heads}/{kv}, head_dim {hd} (rotary {rd}), vocab {vocab}; LoRA r 8 qkv_proj,o_proj; batch {b} x {s}; {} engine threads", peft_core::engine::num_threads());
    let step = |general: bool| -> peft_core::Result<(f64, f64)> {
        peft_core::engine::force_general_path(general);
        let t0 = Instant::now();
        let out = loss_and_grads(&m, &batch, None, None);
        let dt = t0.elapsed().as_secs_f64();
        peft_core::engine::force_general_path(false);
        Ok((out?.0, dt))
    };
    let (le, _) = step(false)?;
    let (lg, _) = step(true)?;
    println!("warm-up losses: engine {le:.6}, general {lg:.6}");
    assert!((le - lg).abs() <= 1e-4 * lg.abs(), "the paths disagree");
    let (mut te, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        te.push(step(false)?.1);
        tg.push(step(true)?.1);
    }
    for (name, v) in [("engine", &mut te), ("general", &mut tg)] {
        v.sort_by(f64::total_cmp);
        let med = v[v.len() / 2];
        println!("{name}: step min {:.3} s, median {med:.3} s, max {:.3} s; {:.0} tokens/s (median)", v[0], v[v.len() - 1], (b * s) as f64 / med);
    }
    println!("engine / general (medians): {:.2}x faster", tg[tg.len() / 2] / te[te.len() / 2]);
    Ok(())
}
