//! Times one training step's loss + gradients on a real model, through the fused engine and
//! through the general path (candle's autograd), for profiling with `perf`.
//!
//! `cargo run --release -p peft-core --example profile_train -- model.gguf [batch] [seq] [engine|general|both] [lora|all|prefix|prompt] [iters]`
use peft_core::model::loader::load_causal_lm;
use peft_core::peft_model::PeftModel;
use peft_core::train::{loss_and_grads, Batch};
use peft_core::tuners::AdapterConfig;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    fn mi_option_set(option: std::os::raw::c_int, value: std::os::raw::c_long);
}

fn main() -> peft_core::Result<()> {
    // As the Node addon does: keep freed memory 30 s (mi_option_purge_delay = 15).
    unsafe { mi_option_set(15, 30_000) };
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("model path");
    let b: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(4);
    let s: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(128);
    let which = args.get(4).cloned().unwrap_or_else(|| "both".into());
    let method = args.get(5).cloned().unwrap_or_else(|| "lora".into());
    let iters: usize = args.get(6).map(|s| s.parse().unwrap()).unwrap_or(4);
    let loaded = load_causal_lm(std::path::Path::new(path), candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let mut m = PeftModel::new(loaded.model);
    let cfg = match method.as_str() {
        "lora" => serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "init_lora_weights": false}),
        "all" => serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear", "init_lora_weights": false}),
        "prefix" => serde_json::json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 20}),
        "prompt" => serde_json::json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 20}),
        other => panic!("unknown method {other}"),
    };
    m.add_adapter("default", AdapterConfig::from_json(&cfg, None)?, 0)?;
    let vocab = m.base.info().vocab_size as u32;
    let ids: Vec<u32> = (0..b * s).map(|i| (i as u32 * 7919) % vocab).collect();
    let batch = Batch { labels: ids.iter().map(|&x| x as i64).collect(), input_ids: ids, attention_mask: vec![1; b * s], batch_size: b, seq_len: s, ..Default::default() };
    for mode in ["engine", "general"] {
        if which != "both" && which != mode {
            continue;
        }
        peft_core::engine::force_general_path(mode == "general");
        for it in 0..iters {
            let t0 = Instant::now();
            let (loss, _, grads) = loss_and_grads(&m, &batch, None, None)?;
            let dt = t0.elapsed();
            drop(grads);
            println!("{mode} iter {it}: loss {loss:.5} loss+grads {:.0} ms ({:.1} tokens/s)", dt.as_secs_f64() * 1e3, (b * s) as f64 / dt.as_secs_f64());
        }
    }
    Ok(())
}
