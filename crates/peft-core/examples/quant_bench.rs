//! Micro benchmark of the kept-quantized frozen linear (`engine::quant`, issue 20) against the
//! engine's f32 GEMM on SmolLM2-135M's shapes, for 1 row (decoding) and 256 rows (prefill /
//! training): GFLOP/s (2·m·n·k per product) of `x·Wᵀ` (int8 forward, per kernel and type) and of
//! `dY·W` (input gradient through dequantized panels), best of several timed runs.
//!
//! `cargo run --release -p peft-core --example quant_bench [threads]` (default 2 threads).
//! The numbers depend on what else runs on the machine: report the load average with them.

use peft_core::engine::gemm::{gemm, Dst, View};
use peft_core::engine::quant::{Kernel, QuantType, QuantWeight};
use std::time::Instant;

fn time_best(mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    let start = Instant::now();
    let mut runs = 0;
    while runs < 5 || (start.elapsed().as_secs_f64() < 0.4 && runs < 2000) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        runs += 1;
    }
    best
}

fn main() -> peft_core::Result<()> {
    let threads: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    peft_core::engine::set_num_threads(threads)?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("threads {threads}; kernels {:?} (best {:?}); loadavg {}", Kernel::all_available(), Kernel::best(), load.trim());
    let shapes = [(576usize, 576usize), (1536, 576), (576, 1536), (49152, 576)];
    let amx = peft_core::engine::amx::available();
    println!(
        "{:>12} {:>5} {:>10} {:>11} {:>11} {:>11} {:>11} {:>11} | {:>10} {:>11} {:>11}",
        "W [out,in]", "rows", "f32 x·Wᵀ", "Q8_0 best", "Q8_0 avx2", "Q4_1 best", "Q4_1 avx2", "Q4_1 amx", "f32 dY·W", "Q4_1 panels", "Q4_1 amx"
    );
    let mut seed = 1u64;
    let mut rnd = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    for (n, k) in shapes {
        let wf: Vec<f32> = (0..n * k).map(|_| rnd() * 0.1).collect();
        let q8 = QuantWeight::quantize_q8_0("w", n, k, &wf)?;
        // A Q4_1 weight with the same magnitudes: blocks written directly (d, m, nibbles).
        let mut q41b = Vec::with_capacity(n * k / 32 * 20);
        for _ in 0..n * k / 32 {
            q41b.extend_from_slice(&half::f16::from_f32(0.1 / 15.0).to_le_bytes());
            q41b.extend_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
            q41b.extend((0..16).map(|_| ((rnd() + 0.5) * 255.0) as u8));
        }
        let q41 = QuantWeight::from_gguf_bytes("w", QuantType::Q4_1, n, k, &q41b)?;
        let wdq = q8.dequantize();
        for m in [1usize, 256] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let dy: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
            let mut y = vec![0f32; m * n];
            let mut dx = vec![0f32; m * k];
            let flop = 2.0 * (m * n * k) as f64 / 1e9;
            let f32_fwd = time_best(|| gemm(&mut Dst::of(&mut y, m, n), View::of(&x, m, k), View::of(&wdq, n, k).t(), 1.0, false, threads));
            let run = |w: &QuantWeight, kern: Kernel, y: &mut Vec<f32>| time_best(|| w.matmul_t_with(kern, &x, m, y, false).unwrap());
            let q8b = run(&q8, Kernel::best(), &mut y);
            let q8a = run(&q8, Kernel::Avx2, &mut y);
            let q4b = run(&q41, Kernel::best(), &mut y);
            let q4a = run(&q41, Kernel::Avx2, &mut y);
            let f32_bwd = time_best(|| gemm(&mut Dst::of(&mut dx, m, k), View::of(&dy, m, n), View::of(&wdq, n, k), 1.0, false, threads));
            let q4bwd = time_best(|| q41.matmul_panels(&dy, m, &mut dx, false).unwrap());
            // AMX bf16 (the batched path): NaN where the CPU has no AMX.
            let q4amx = if amx { time_best(|| q41.matmul_t_amx(&x, m, &mut y, false).unwrap()) } else { f64::NAN };
            let q4amxb = if amx { time_best(|| q41.matmul_amx(&dy, m, &mut dx, false).unwrap()) } else { f64::NAN };
            println!(
                "{:>12} {:>5} {:>10.1} {:>11.1} {:>11.1} {:>11.1} {:>11.1} {:>11.1} | {:>10.1} {:>11.1} {:>11.1}",
                format!("{n}x{k}"),
                m,
                flop / f32_fwd,
                flop / q8b,
                flop / q8a,
                flop / q4b,
                flop / q4a,
                flop / q4amx,
                flop / f32_bwd,
                flop / q4bwd,
                flop / q4amxb
            );
        }
    }
    println!("GFLOP/s = 2·rows·out·in / best time; weights: f32 {} B/weight, Q8_0 1.0625, Q4_1 0.625 (repacked, the file's f16 scales)", 4);
    println!("loadavg after: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    Ok(())
}
