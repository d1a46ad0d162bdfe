//! Times training steps (loss + gradients, general path) of a BERT-family classifier or a T5
//! model with and without gradient checkpointing, for the README's figures; run it under
//! `/usr/bin/time -v` for the peak RSS, once per setting.
//!
//! `cargo run --release -p peft-core --example profile_ckpt -- model_dir [batch] [seq] [ckpt|plain] [iters]`
//!
//! LoRA r=8 on the attention's query and value (`query`/`value`, T5's `q`/`v`); BERT rows get
//! class labels, T5 rows `seq / 4` target tokens. Prints each step's time and the resident set
//! size after loading.
use peft_core::model::Task;
use peft_core::peft_model::PeftModel;
use peft_core::train::{loss_and_grads_with, Batch};
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
    let path = args.get(1).expect("model folder");
    let b: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(8);
    let s: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(128);
    let ckpt = args.get(4).map(|s| s == "ckpt").unwrap_or(false);
    let iters: usize = args.get(5).map(|s| s.parse().unwrap()).unwrap_or(4);
    let loaded = peft_core::model::loader::load_model(std::path::Path::new(path), candle_core::DType::F32, &candle_core::Device::Cpu, &Default::default())?;
    let rss = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| s.lines().find(|l| l.starts_with("VmRSS")).map(|l| l.to_string())).unwrap_or_default();
    println!("loaded: {rss}");
    let mut m = PeftModel::new(loaded.model);
    let task = m.base.task();
    let targets = if task == Task::Seq2SeqLm { ["q", "v"] } else { ["query", "value"] };
    let cfg = serde_json::json!({"peft_type": "LORA", "task_type": task.task_type(), "r": 8, "lora_alpha": 16, "target_modules": targets, "init_lora_weights": false});
    m.add_adapter("default", AdapterConfig::from_json(&cfg, None)?, 1)?;
    let vocab = m.base.info().vocab_size as u32;
    let ids: Vec<u32> = (0..b * s).map(|i| 2 + (i as u32 * 7919) % (vocab - 2)).collect();
    let labels: Vec<i64> = match task {
        Task::Seq2SeqLm => (0..b * (s / 4)).map(|i| 2 + (i as i64 * 31) % (vocab as i64 - 2)).collect(),
        _ => (0..b).map(|i| (i % 3) as i64).collect(),
    };
    let batch = Batch { input_ids: ids, attention_mask: vec![1; b * s], labels, batch_size: b, seq_len: s, ..Default::default() };
    for i in 0..iters {
        let t = Instant::now();
        let (loss, _, _) = loss_and_grads_with(&m, &batch, None, None, ckpt)?;
        println!("step {i}: {:.3} s (loss {loss:.5}, {})", t.elapsed().as_secs_f64(), if ckpt { "checkpointed" } else { "plain" });
    }
    Ok(())
}
