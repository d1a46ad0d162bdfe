//! Times one training step's loss + gradients on a real model, through the fused engine and
//! through the general path (candle's autograd), for profiling with `perf`.
//!
//! `cargo run --release -p peft-core --example profile_train -- model.gguf [batch] [seq] [engine|general|both|decode|bandwidth] [lora|all|prefix|prompt|base|merged] [iters]`
//!
//! * `decode`: greedy generation of 64 tokens after a `seq`-token prompt (batch `batch`; the
//!   side-by-side bench's decode row is `1 32`): tokens/s = 64 / (time of 65 new tokens − time of 1).
//!   `base` = no adapter, `lora` = LoRA q,k,v,o unmerged, `merged` = the same merged.
//! * `bandwidth`: the machine's read bandwidth (a streaming sum over 1 GiB on every engine
//!   thread) and the engine's few-row `x·Wᵀ` kernel on a 1 GiB weight, in GB/s.
//! * `fused-gemm`: the training step's q/k/v and gate/up products on SmolLM2's shapes with
//!   `batch × seq` rows, as separate products and as one product over concatenated weights
//!   (forward `x·Wᵀ` and input gradient `g·W`), interleaved, `iters` rounds.
//! * `prefill`: one forward pass (no gradients) over `batch × seq` tokens, `iters` times:
//!   tokens/s (the prompt-processing figure; `1 256` is llama.cpp's `pp256`).
//! * `PEFT_CKPT=1`: training steps with gradient checkpointing (run under `/usr/bin/time -v`
//!   with `engine` or `general` alone for the peak RSS of one path).
//! * `PEFT_QUANT=keep`: load a GGUF base with its layer weights kept quantized (issue 20);
//!   the resident set size after loading is printed either way.
//! * `PEFT_AB=a,b,...` (with `engine` or `decode`): runs `iters` rounds, each trying the engine
//!   with the A/B switches `a`, then `b`, ... (`peft_core::engine::AB_*`, 0 = current), and
//!   prints min / median per variant: an interleaved comparison in one process.
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
    if which == "bandwidth" {
        bandwidth();
        return Ok(());
    }
    if which == "fused-gemm" {
        fused_gemm(b * s, iters);
        return Ok(());
    }
    let keep = std::env::var("PEFT_QUANT").as_deref() == Ok("keep");
    let req = peft_core::model::loader::LoadRequest { keep_quantized: keep, ..Default::default() };
    let loaded = peft_core::model::loader::load_model(std::path::Path::new(path), candle_core::DType::F32, &candle_core::Device::Cpu, &req)?;
    let rss = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| s.lines().find(|l| l.starts_with("VmRSS")).map(|l| l.to_string())).unwrap_or_default();
    println!("loaded ({}): {rss}", if keep { "quantization keep" } else { "dequantize" });
    let mut m = PeftModel::new(loaded.model);
    let cfg = match method.as_str() {
        "lora" => serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "init_lora_weights": false}),
        "all" => serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear", "init_lora_weights": false}),
        "prefix" => serde_json::json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 20}),
        "prompt" => serde_json::json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 20}),
        "base" => serde_json::Value::Null,
        "merged" => serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "init_lora_weights": false}),
        other => panic!("unknown method {other}"),
    };
    if !cfg.is_null() {
        m.add_adapter("default", AdapterConfig::from_json(&cfg, None)?, 0)?;
    }
    if method == "merged" {
        m.merge_adapter(None, false)?;
    }
    if std::env::var("PEFT_CKPT").as_deref() == Ok("1") {
        m.set_gradient_checkpointing(true)?;
        println!("gradient checkpointing on");
    }
    let variants: Vec<u32> = std::env::var("PEFT_AB").ok().map(|v| v.split(',').map(|x| x.trim().parse().expect("PEFT_AB: numbers")).collect()).unwrap_or_default();
    if which == "decode" || !variants.is_empty() {
        let variants = if variants.is_empty() { vec![0] } else { variants };
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
        let vocab = m.base.info().vocab_size as u32;
        let prompt: Vec<u32> = (0..b * s).map(|i| (i as u32 * 7919 + 11) % vocab).collect();
        let ids: Vec<u32> = (0..b * s).map(|i| (i as u32 * 7919) % vocab).collect();
        let batch = Batch { labels: ids.iter().map(|&x| x as i64).collect(), input_ids: ids, attention_mask: vec![1; b * s], batch_size: b, seq_len: s, ..Default::default() };
        let mut reference: Option<Vec<Vec<u32>>> = None;
        for round in 0..iters {
            for (vi, &flags) in variants.iter().enumerate() {
                peft_core::engine::set_ab_flags(flags);
                let x = if which == "decode" {
                    let gen = |n: usize| -> peft_core::Result<(f64, Vec<Vec<u32>>)> {
                        let o = peft_core::generate::GenerateOptions { max_new_tokens: n, ..Default::default() };
                        let t0 = Instant::now();
                        let out = peft_core::generate::generate(&m, &prompt, b, s, None, None, &o, &|| false)?;
                        Ok((t0.elapsed().as_secs_f64(), out))
                    };
                    let (t1, _) = gen(1)?;
                    let (t65, out) = gen(65)?;
                    match &reference {
                        Some(r) => assert_eq!(r, &out, "variant {flags} generated other tokens"),
                        None => reference = Some(out),
                    }
                    (b * 64) as f64 / (t65 - t1)
                } else {
                    let t0 = Instant::now();
                    let (_, _, grads) = loss_and_grads(&m, &batch, None, None)?;
                    let dt = t0.elapsed().as_secs_f64();
                    drop(grads);
                    dt * 1e3
                };
                println!("round {round} variant {flags}: {x:.2} {}", if which == "decode" { "tokens/s" } else { "ms" });
                times[vi].push(x);
            }
        }
        peft_core::engine::set_ab_flags(0);
        for (vi, &flags) in variants.iter().enumerate() {
            let mut t = times[vi].clone();
            t.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let unit = if which == "decode" { "tokens/s" } else { "ms" };
            println!("variant {flags}: min {:.2} median {:.2} max {:.2} {unit} over {} rounds", t[0], t[t.len() / 2], t[t.len() - 1], t.len());
        }
        return Ok(());
    }
    if which == "prefill" {
        let vocab = m.base.info().vocab_size as u32;
        let ids: Vec<u32> = (0..b * s).map(|i| (i as u32 * 7919 + 3) % vocab).collect();
        for it in 0..iters {
            let t0 = Instant::now();
            let y = m.forward(&ids, b, s, &peft_core::model::ForwardOptions::default(), None)?;
            let dt = t0.elapsed().as_secs_f64();
            drop(y);
            println!("prefill iter {it}: {} tokens in {:.0} ms ({:.1} tokens/s)", b * s, dt * 1e3, (b * s) as f64 / dt);
        }
        return Ok(());
    }
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

/// Read bandwidth: a streaming sum over 1 GiB on every engine thread, and the engine's
/// decoding kernel (`x·Wᵀ` with one row) over a 1 GiB weight.
fn bandwidth() {
    use rayon::prelude::*;
    let n = 1usize << 28;
    let data: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(peft_core::engine::num_threads()).build().unwrap();
    let threads = pool.current_num_threads();
    let mut best_sum = 0f64;
    let mut best_gemv = 0f64;
    let k = 576;
    let rows = n / k;
    let x = vec![1f32; k];
    let mut y = vec![0f32; rows];
    for _ in 0..5 {
        let t0 = Instant::now();
        let s: f32 = pool.install(|| {
            data.par_chunks(1 << 20)
                .map(|c| {
                    let mut acc = [0f32; 16];
                    for v in c.chunks_exact(16) {
                        for i in 0..16 {
                            acc[i] += v[i];
                        }
                    }
                    acc.iter().sum::<f32>()
                })
                .sum()
        });
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best_sum = best_sum.max((n * 4) as f64 / dt / 1e9);
        let t0 = Instant::now();
        pool.install(|| {
            peft_core::engine::gemm::gemm(
                &mut peft_core::engine::gemm::Dst::of(&mut y, 1, rows),
                peft_core::engine::gemm::View::of(&x, 1, k),
                peft_core::engine::gemm::View::of(&data[..rows * k], rows, k).t(),
                1.0,
                false,
                threads,
            )
        });
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(&y);
        best_gemv = best_gemv.max((rows * k * 4) as f64 / dt / 1e9);
    }
    println!("read bandwidth, {threads} threads, best of 5 over 1 GiB: streaming sum {best_sum:.1} GB/s, engine x·Wᵀ kernel {best_gemv:.1} GB/s");
}

/// Separate against fused q/k/v and gate/up products (SmolLM2-135M shapes, `t` rows).
fn fused_gemm(t: usize, rounds: usize) {
    use peft_core::engine::gemm::{gemm, Dst, View};
    let (h, qd, kd, inter) = (576usize, 576usize, 192usize, 1536usize);
    let threads = peft_core::engine::num_threads();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let fill = |n: usize| -> Vec<f32> { (0..n).map(|i| ((i * 2654435761usize) % 1000) as f32 * 1e-3 - 0.5).collect() };
    let x = fill(t * h);
    for (name, parts) in [("q,k,v", vec![qd, kd, kd]), ("gate,up", vec![inter, inter])] {
        let n: usize = parts.iter().sum();
        let w = fill(n * h);
        let gy = fill(t * n);
        let mut y = vec![0f32; t * n];
        let mut gx = vec![0f32; t * h];
        let mut res: [Vec<f64>; 4] = Default::default();
        for _ in 0..rounds {
            for v in 0..4 {
                let fused = v % 2 == 1;
                let t0 = Instant::now();
                for _ in 0..5 {
                    pool.install(|| {
                        if v < 2 {
                            // forward: y[:, part] = x · W_partᵀ
                            if fused {
                                gemm(&mut Dst::of(&mut y, t, n), View::of(&x, t, h), View::of(&w, n, h).t(), 1.0, false, threads);
                            } else {
                                let mut off = 0;
                                for &p in &parts {
                                    gemm(&mut Dst::rm(&mut y, 0, t, n, n).cols(off, p), View::of(&x, t, h), View::rm(&w, off * h, p, h, h).t(), 1.0, false, threads);
                                    off += p;
                                }
                            }
                        } else if fused {
                            gemm(&mut Dst::of(&mut gx, t, h), View::of(&gy, t, n), View::of(&w, n, h), 1.0, false, threads);
                        } else {
                            let mut off = 0;
                            for (i, &p) in parts.iter().enumerate() {
                                gemm(&mut Dst::of(&mut gx, t, h), View::rm(&gy, off, t, p, n), View::rm(&w, off * h, p, h, h), 1.0, i > 0, threads);
                                off += p;
                            }
                        }
                    });
                }
                res[v].push(t0.elapsed().as_secs_f64() * 1e3 / 5.0);
            }
        }
        for (v, what) in ["forward separate", "forward fused", "input grad separate", "input grad fused"].iter().enumerate() {
            let mut r = res[v].clone();
            r.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let flop = 2.0 * (t * n * h) as f64;
            println!("{name} {what} [{t}x{h}]x[{h}x{n}]: min {:.3} ms median {:.3} ms ({:.0} GFLOP/s at min) over {} rounds", r[0], r[r.len() / 2], flop / r[0] / 1e6, r.len());
        }
    }
}
