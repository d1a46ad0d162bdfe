//! Times the phases of one LoRA training step on a real model (forward, loss, backward, update).
//! `cargo run --release -p peft-core --example profile_train -- model.gguf [batch] [seq]`
use peft_core::model::loader::load_causal_lm;
use peft_core::model::ForwardOptions;
use peft_core::ops::causal_lm_loss;
use peft_core::peft_model::PeftModel;
use peft_core::tuners::LoraConfig;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> peft_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("model path");
    let b: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(4);
    let s: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(128);
    let loaded = load_causal_lm(std::path::Path::new(path), candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let mut m = PeftModel::new(loaded.model);
    let cfg = LoraConfig::from_json(&serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "init_lora_weights": false}), None)?;
    m.add_adapter("default", cfg, 0)?;
    let vocab = m.base.info().vocab_size as u32;
    let ids: Vec<u32> = (0..b * s).map(|i| (i as u32 * 7919) % vocab).collect();
    let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    for it in 0..3 {
        let t0 = Instant::now();
        let opts = ForwardOptions { train: true, ..Default::default() };
        let logits = m.forward(&ids, b, s, &opts, None)?;
        let t1 = Instant::now();
        let (loss, _) = causal_lm_loss(&logits, &labels, b, s, true)?;
        let t2 = Instant::now();
        let grads = loss.backward()?;
        let t3 = Instant::now();
        drop(grads);
        let opts = ForwardOptions { train: false, ..Default::default() };
        let _ = m.forward(&ids, b, s, &opts, None)?;
        let t4 = Instant::now();
        println!("iter {it}: fwd(train) {:?} loss {:?} bwd {:?} | fwd(infer) {:?}", t1 - t0, t2 - t1, t3 - t2, t4 - t3);
    }
    Ok(())
}
