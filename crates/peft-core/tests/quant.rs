//! Kept-quantized frozen weights (`peft_core::engine::quant`, issue 20): parsing of GGUF blocks
//! against candle's own dequantization, the integer forward against an f64 product on the
//! dequantized weight within the derived activation-quantization bound (every kernel the CPU
//! has, random shapes with output rows that are not multiples of 16 or 32 and ragged row
//! counts), the input gradient against f64, and coded errors for corrupted blocks.
//!
//! The bound: the forward quantizes each 32-block `b` of a row of `x` to `s_b·q` with
//! `s_b = max|x_b|/127` and `q = round(x/s_b)`, so `|x_i − s_b·q_i| ≤ s_b/2`; the integer dot
//! products and the weight are exact, hence
//! `|y_j − (x·Wᵀ)_j| ≤ Σ_b (s_b/2)·Σ_{i∈b}|W_ji| + ε·Σ_i|W_ji·x_i|` with `ε` covering f32 rounding
//! of the scale products and the sum over blocks (`ε = 1e-5` here: a few hundred f32 ulps).

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::Device;
use half::f16;
use peft_core::engine::quant::{Kernel, QuantType, QuantWeight};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TYPES: [QuantType; 5] = [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1, QuantType::Q4K, QuantType::Q6K];

fn ggml(t: QuantType) -> GgmlDType {
    match t {
        QuantType::Q8_0 => GgmlDType::Q8_0,
        QuantType::Q4_0 => GgmlDType::Q4_0,
        QuantType::Q4_1 => GgmlDType::Q4_1,
        QuantType::Q4K => GgmlDType::Q4K,
        QuantType::Q6K => GgmlDType::Q6K,
    }
}

fn f16b(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

/// Random but valid GGUF blocks of `t` for a `[rows, cols]` weight: scales of a typical trained
/// layer (|w| up to ~0.1), random codes.
fn random_blocks(t: QuantType, rows: usize, cols: usize, rng: &mut StdRng) -> Vec<u8> {
    let nblk = rows * cols / t.block_elems();
    let mut out = Vec::with_capacity(nblk * t.block_bytes());
    for _ in 0..nblk {
        match t {
            QuantType::Q8_0 => {
                out.extend_from_slice(&f16b(rng.random_range(1e-4f32..1e-3)));
                out.extend((0..32).map(|_| rng.random::<u8>()));
            }
            QuantType::Q4_0 => {
                out.extend_from_slice(&f16b(rng.random_range(1e-3f32..1.5e-2)));
                out.extend((0..16).map(|_| rng.random::<u8>()));
            }
            QuantType::Q4_1 => {
                out.extend_from_slice(&f16b(rng.random_range(1e-3f32..1.5e-2)));
                out.extend_from_slice(&f16b(rng.random_range(-0.1f32..0.0)));
                out.extend((0..16).map(|_| rng.random::<u8>()));
            }
            QuantType::Q4K => {
                out.extend_from_slice(&f16b(rng.random_range(1e-4f32..3e-4)));
                out.extend_from_slice(&f16b(rng.random_range(1e-4f32..2e-3)));
                out.extend((0..12 + 128).map(|_| rng.random::<u8>()));
            }
            QuantType::Q6K => {
                // ql, qh: random codes; sub-scales: any i8 (negative ones too); d last
                out.extend((0..128 + 64).map(|_| rng.random::<u8>()));
                out.extend((0..16).map(|_| rng.random::<u8>()));
                out.extend_from_slice(&f16b(rng.random_range(1e-5f32..1e-4)));
            }
        }
    }
    out
}

fn candle_dequant(t: QuantType, rows: usize, cols: usize, bytes: &[u8]) -> Vec<f32> {
    let q = qtensor_from_ggml(ggml(t), bytes, vec![rows, cols], &Device::Cpu).unwrap();
    q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn randn(n: usize, rng: &mut StdRng) -> Vec<f32> {
    // Roughly normal activations with occasional outliers (as hidden states have).
    (0..n)
        .map(|_| {
            let v: f32 = (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum();
            if rng.random_range(0..50) == 0 {
                v * 8.0
            } else {
                v
            }
        })
        .collect()
}

#[test]
fn repacked_blocks_dequantize_like_candle() {
    let mut rng = StdRng::seed_from_u64(1);
    for t in TYPES {
        for (rows, cols) in [(1, 256), (5, 512), (16, 256), (17, 768), (50, 256)] {
            let bytes = random_blocks(t, rows, cols, &mut rng);
            let w = QuantWeight::from_gguf_bytes("blk.0.test.weight", t, rows, cols, &bytes).unwrap();
            let ours = w.dequantize();
            let theirs = candle_dequant(t, rows, cols, &bytes);
            assert_eq!(ours.len(), theirs.len());
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!((a - b).abs() <= 1e-6 * b.abs() + 1e-9, "{t:?} [{rows}x{cols}] element {i}: {a} vs candle {b}");
            }
            assert!(ours.iter().any(|&v| v != 0.0));
        }
    }
}

/// `x·Wᵀ` in f64 on the dequantized weight, the derived bound per output, and `Σ|W x|`.
fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut y, mut bound, mut mag) = (vec![0f64; m * n], vec![0f64; m * n], vec![0f64; m * n]);
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        let s: Vec<f64> = xr.chunks(32).map(|b| b.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0).collect();
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            let (mut acc, mut bd, mut mg) = (0f64, 0f64, 0f64);
            for i in 0..k {
                acc += xr[i] as f64 * wr[i] as f64;
                bd += s[i / 32] / 2.0 * (wr[i] as f64).abs();
                mg += (xr[i] as f64 * wr[i] as f64).abs();
            }
            y[r * n + j] = acc;
            bound[r * n + j] = bd;
            mag[r * n + j] = mg;
        }
    }
    (y, bound, mag)
}

#[test]
fn forward_is_within_the_activation_quantization_bound_on_every_kernel() {
    let mut rng = StdRng::seed_from_u64(2);
    let kernels = Kernel::all_available();
    eprintln!("kernels on this CPU: {:?} (best {:?})", kernels, Kernel::best());
    // (out rows, in cols): rows not multiples of 16/32; row counts ragged (1..130).
    let shapes = [(1, 256), (7, 256), (33, 512), (50, 768), (100, 256), (16, 256)];
    let ms = [1, 2, 3, 5, 9, 67, 130];
    let mut worst_ratio = 0f64;
    for t in TYPES {
        for (si, &(n, k)) in shapes.iter().enumerate() {
            let bytes = random_blocks(t, n, k, &mut rng);
            let w = QuantWeight::from_gguf_bytes("blk.1.ffn_up.weight", t, n, k, &bytes).unwrap();
            let wd = w.dequantize();
            let m = ms[(si + t as usize) % ms.len()].max(if si == 5 { 130 } else { 0 });
            let x = randn(m * k, &mut rng);
            let (yref, bound, mag) = reference(&x, &wd, m, n, k);
            let mut scalar = vec![0f32; m * n];
            w.matmul_t_with(Kernel::Scalar, &x, m, &mut scalar, false).unwrap();
            for &kern in &kernels {
                let mut y = vec![f32::NAN; m * n];
                w.matmul_t_with(kern, &x, m, &mut y, false).unwrap();
                for i in 0..m * n {
                    let err = (y[i] as f64 - yref[i]).abs();
                    let lim = bound[i] + 1e-5 * mag[i];
                    assert!(err <= lim, "{t:?} {kern:?} [{m}x{k}]x[{n}x{k}]ᵀ out {i}: {} vs {} (err {err:e} > bound {lim:e})", y[i], yref[i]);
                    worst_ratio = worst_ratio.max(err / lim);
                    // Kernels differ from the scalar one only in f32 summation order.
                    assert!((y[i] - scalar[i]).abs() as f64 <= 2e-6 * mag[i] + 1e-12, "{t:?} {kern:?} vs scalar at {i}: {} vs {}", y[i], scalar[i]);
                }
                // acc = true adds onto the destination.
                let mut y2 = vec![1.5f32; m * n];
                w.matmul_t_with(kern, &x, m, &mut y2, true).unwrap();
                for i in 0..m * n {
                    assert!((y2[i] - (1.5 + y[i])).abs() <= 1e-5 * (1.5 + y[i].abs()), "{t:?} {kern:?} acc at {i}");
                }
            }
        }
    }
    // The bound is not vacuous: the observed error uses a real part of it.
    eprintln!("worst err / bound: {worst_ratio:.3}");
    assert!(worst_ratio > 0.01 && worst_ratio <= 1.0);
}

#[test]
fn activations_on_the_grid_give_the_exact_product() {
    // When every block of x is already s·q with max |q| = 127, quantizing x loses nothing and
    // the integer path must equal the f64 product up to f32 rounding.
    let mut rng = StdRng::seed_from_u64(3);
    for t in TYPES {
        let (m, n, k) = (9, 37, 512);
        let bytes = random_blocks(t, n, k, &mut rng);
        let w = QuantWeight::from_gguf_bytes("w", t, n, k, &bytes).unwrap();
        let wd = w.dequantize();
        let mut x = vec![0f32; m * k];
        for blk in x.chunks_mut(32) {
            let s = 2f32.powi(rng.random_range(-8..2));
            for v in blk.iter_mut() {
                *v = s * rng.random_range(-127i32..=127) as f32;
            }
            blk[rng.random_range(0..32)] = 127.0 * s;
        }
        let (yref, _, mag) = reference(&x, &wd, m, n, k);
        for kern in Kernel::all_available() {
            let mut y = vec![0f32; m * n];
            w.matmul_t_with(kern, &x, m, &mut y, false).unwrap();
            for i in 0..m * n {
                assert!((y[i] as f64 - yref[i]).abs() <= 1e-6 * mag[i], "{t:?} {kern:?} at {i}: {} vs {}", y[i], yref[i]);
            }
        }
    }
}

#[test]
fn large_products_split_over_the_pool_match_the_scalar_kernel() {
    // Big enough for the threaded split over row tiles and groups (and a 1-row decode split).
    let mut rng = StdRng::seed_from_u64(4);
    for t in [QuantType::Q8_0, QuantType::Q4_1] {
        let (n, k) = (1000, 576);
        let w = QuantWeight::from_gguf_bytes("w", t, n, k, &random_blocks(t, n, k, &mut rng)).unwrap();
        for m in [1, 200] {
            let x = randn(m * k, &mut rng);
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            w.matmul_t_with(Kernel::best(), &x, m, &mut a, false).unwrap();
            w.matmul_t_with(Kernel::Scalar, &x, m, &mut b, false).unwrap();
            for i in 0..m * n {
                assert!((a[i] - b[i]).abs() <= 1e-4 * (1.0 + b[i].abs()), "{t:?} m={m} at {i}: {} vs {}", a[i], b[i]);
            }
        }
    }
}

#[test]
fn shared_input_products_equal_separate_products_bit_for_bit() {
    // q/k/v-like parts (rows 96 / 48 / 40: a partial last group), two weight types, biases and
    // LoRA terms of ranks 8 (the AVX-512 short-row kernel), 4 and 16, for 1 to 4 rows (decoding):
    // matmul_t_multi must give what matmul_t_with + a bias add + gemm's h·Bᵀ give, exactly.
    use peft_core::engine::gemm::{gemm, Dst, View};
    use peft_core::engine::quant::{matmul_t_multi, MultiPart};
    let mut rng = StdRng::seed_from_u64(12);
    let k = 256;
    let specs = [(QuantType::Q4_1, 96, vec![8]), (QuantType::Q8_0, 48, vec![]), (QuantType::Q4_1, 40, vec![4, 16])];
    let ws: Vec<QuantWeight> = specs.iter().map(|(t, n, _)| QuantWeight::from_gguf_bytes("w", *t, *n, k, &random_blocks(*t, *n, k, &mut rng)).unwrap()).collect();
    let biases: Vec<Vec<f32>> = specs.iter().map(|(_, n, _)| randn(*n, &mut rng)).collect();
    let bs: Vec<Vec<Vec<f32>>> = specs.iter().map(|(_, n, rs)| rs.iter().map(|r| randn(n * r, &mut rng)).collect()).collect();
    for m in 1..=4 {
        let x = randn(m * k, &mut rng);
        let hs: Vec<Vec<Vec<f32>>> = specs.iter().map(|(_, _, rs)| rs.iter().map(|r| randn(m * r, &mut rng)).collect()).collect();
        // separate: base, bias, then each h·Bᵀ through gemm (as the engine's lin_fwd does)
        let mut want: Vec<Vec<f32>> = Vec::new();
        for (p, (_, n, rs)) in specs.iter().enumerate() {
            let mut y = vec![0f32; m * n];
            ws[p].matmul_t_with(Kernel::best(), &x, m, &mut y, false).unwrap();
            for row in y.chunks_mut(*n) {
                for (v, b) in row.iter_mut().zip(&biases[p]) {
                    *v += b;
                }
            }
            for (l, r) in rs.iter().enumerate() {
                gemm(&mut Dst::of(&mut y, m, *n), View::of(&hs[p][l], m, *r), View::of(&bs[p][l], *n, *r).t(), 1.0, true, 2);
            }
            want.push(y);
        }
        let mut got: Vec<Vec<f32>> = specs.iter().map(|(_, n, _)| vec![f32::NAN; m * n]).collect();
        let mut parts: Vec<MultiPart> = got
            .iter_mut()
            .enumerate()
            .map(|(p, y)| MultiPart {
                w: &ws[p],
                y,
                bias: Some(&biases[p]),
                lora: specs[p].2.iter().enumerate().map(|(l, r)| (&hs[p][l][..], &bs[p][l][..], *r)).collect(),
            })
            .collect();
        matmul_t_multi(&x, m, &mut parts, false).unwrap();
        for p in 0..specs.len() {
            for (i, (a, b)) in got[p].iter().zip(&want[p]).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "m={m} part {p} at {i}: {a} vs {b}");
            }
        }
    }
    // shape errors name the weight; more than 4 rows with LoRA terms is refused
    let mut y = vec![0f32; 5];
    let err = matmul_t_multi(&vec![0f32; k], 1, &mut [MultiPart { w: &ws[1], y: &mut y, bias: None, lora: vec![] }], false).unwrap_err();
    assert_eq!(err.code(), "ERR_SHAPE_MISMATCH");
    let (h, b) = (vec![0f32; 5 * 8], vec![0f32; 96 * 8]);
    let mut y = vec![0f32; 5 * 96];
    let err = matmul_t_multi(&vec![0f32; 5 * k], 5, &mut [MultiPart { w: &ws[0], y: &mut y, bias: None, lora: vec![(&h[..], &b[..], 8)] }], false).unwrap_err();
    assert_eq!(err.code(), "ERR_INVALID_ARGUMENT");
}

#[test]
fn non_finite_activations_give_nan_outputs() {
    let mut rng = StdRng::seed_from_u64(5);
    let (n, k) = (20, 64);
    let w = QuantWeight::from_gguf_bytes("w", QuantType::Q4_0, n, k, &random_blocks(QuantType::Q4_0, n, k, &mut rng)).unwrap();
    let mut x = randn(3 * k, &mut rng);
    x[k + 5] = f32::NAN;
    x[2 * k + 40] = f32::INFINITY;
    for kern in Kernel::all_available() {
        let mut y = vec![0f32; 3 * n];
        w.matmul_t_with(kern, &x, 3, &mut y, false).unwrap();
        assert!(y[..n].iter().all(|v| v.is_finite()), "{kern:?}");
        assert!(y[n..].iter().all(|v| v.is_nan()), "{kern:?}: {:?}", &y[n..]);
    }
}

/// `dY·W` in f64 on the dequantized weight `[n, k]`, and `Σ_j |dY_j·W_ji|` per output.
fn input_grad_reference(dy: &[f32], wd: &[f32], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut want, mut mag) = (vec![0f64; m * k], vec![0f64; m * k]);
    for r in 0..m {
        for j in 0..n {
            let g = dy[r * n + j] as f64;
            for c in 0..k {
                let p = g * wd[j * k + c] as f64;
                want[r * k + c] += p;
                mag[r * k + c] += p.abs();
            }
        }
    }
    (want, mag)
}

#[test]
fn input_gradient_matches_f64_on_the_dequantized_weight() {
    let mut rng = StdRng::seed_from_u64(6);
    for t in TYPES {
        for (m, n, k) in [(1, 7, 256), (5, 33, 512), (67, 100, 768), (300, 50, 256)] {
            let w = QuantWeight::from_gguf_bytes("w", t, n, k, &random_blocks(t, n, k, &mut rng)).unwrap();
            let wd = w.dequantize();
            let dy = randn(m * n, &mut rng);
            let mut dx = vec![0.25f32; m * k];
            w.matmul_panels(&dy, m, &mut dx, true).unwrap();
            let (want, mags) = input_grad_reference(&dy, &wd, m, n, k);
            for r in 0..m {
                for c in 0..k {
                    let (acc, mag) = (want[r * k + c], mags[r * k + c]);
                    let got = dx[r * k + c] as f64 - 0.25;
                    assert!((got - acc).abs() <= 1e-5 * mag + 1e-6, "{t:?} [{m}x{n}]·[{n}x{k}] ({r},{c}): {got} vs {acc}");
                }
            }
            let mut dx2 = vec![7f32; m * k];
            w.matmul_panels(&dy, m, &mut dx2, false).unwrap();
            for i in 0..m * k {
                assert!((dx2[i] - (dx[i] - 0.25)).abs() <= 1e-5 * (1.0 + dx2[i].abs()));
            }
        }
    }
}

/// The bf16 bound of the AMX path per output (each operand rounded to 8 significant bits), with room for `f32` accumulation (`k·2⁻²⁴` of
/// the magnitude covers any summation order).
fn bf16_bound(mag: f64, k: usize) -> f64 {
    (2f64.powi(-7) + 2f64.powi(-16) + k as f64 * 2f64.powi(-24)) * mag + 1e-6
}

#[test]
fn amx_bf16_forward_and_input_gradient_are_within_the_bf16_bound() {
    if !peft_core::engine::amx::available() {
        eprintln!("AMX-BF16 is not available on this CPU: the batched path is the integer kernels (tested above)");
        let w = QuantWeight::from_gguf_bytes("w", QuantType::Q8_0, 32, 32, &random_blocks(QuantType::Q8_0, 32, 32, &mut StdRng::seed_from_u64(1))).unwrap();
        let e = w.matmul_t_amx(&[0.0; 32 * 32], 32, &mut [0.0; 32 * 32], false).unwrap_err();
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
        return;
    }
    let mut rng = StdRng::seed_from_u64(12);
    for t in TYPES {
        // Rows of W not a multiple of 32 and odd (a zero half panel, an odd inner dimension for
        // the input gradient), rows of x not a multiple of 32, and an input gradient whose inner
        // dimension spans two 4096-row chunks.
        for (m, n, k) in [(32, 32, 256), (40, 49, 512), (67, 100, 768), (33, 4201, 256)] {
            let w = QuantWeight::from_gguf_bytes("w", t, n, k, &random_blocks(t, n, k, &mut rng)).unwrap();
            let wd = w.dequantize();
            let x = randn(m * k, &mut rng);
            let (yr, _, mag) = reference(&x, &wd, m, n, k);
            let mut y = vec![0.5f32; m * n];
            w.matmul_t_amx(&x, m, &mut y, true).unwrap();
            for i in 0..m * n {
                let got = y[i] as f64 - 0.5;
                assert!((got - yr[i]).abs() <= bf16_bound(mag[i], k), "{t:?} x·Wᵀ [{m}x{k}]·[{k}x{n}] at {i}: {got} vs {}", yr[i]);
            }
            let mut y2 = vec![9f32; m * n];
            w.matmul_t_amx(&x, m, &mut y2, false).unwrap();
            for i in 0..m * n {
                assert!((y2[i] as f64 - (y[i] as f64 - 0.5)).abs() <= 1e-5 * (1.0 + y2[i].abs() as f64), "{t:?} overwrite at {i}");
            }
            // Routing: from AMX_MIN_ROWS rows matmul_t is this path, below it the integer kernel.
            let mut y3 = vec![0f32; m * n];
            w.matmul_t(&x, m, &mut y3, false).unwrap();
            if peft_core::engine::quant::amx_bf16() {
                assert_eq!(y3, y2, "{t:?}: matmul_t with {m} rows takes the AMX path");
            }
            let mut y1 = vec![0f32; n];
            let mut y1k = vec![0f32; n];
            w.matmul_t(&x[..k], 1, &mut y1, false).unwrap();
            w.matmul_t_with(Kernel::best(), &x[..k], 1, &mut y1k, false).unwrap();
            assert_eq!(y1, y1k, "{t:?}: one row takes the integer kernel");

            let dy = randn(m * n, &mut rng);
            let mut dx = vec![0.25f32; m * k];
            w.matmul_amx(&dy, m, &mut dx, true).unwrap();
            let (want, mags) = input_grad_reference(&dy, &wd, m, n, k);
            for r in 0..m {
                for c in 0..k {
                    let (acc, mg) = (want[r * k + c], mags[r * k + c]);
                    let got = dx[r * k + c] as f64 - 0.25;
                    assert!((got - acc).abs() <= bf16_bound(mg, n), "{t:?} dY·W [{m}x{n}]·[{n}x{k}] ({r},{c}): {got} vs {acc}");
                }
            }
            let mut dx2 = vec![3f32; m * k];
            w.matmul(&dy, m, &mut dx2, false).unwrap();
            if peft_core::engine::quant::amx_bf16() {
                for i in 0..m * k {
                    assert!((dx2[i] as f64 - (dx[i] as f64 - 0.25)).abs() <= 1e-5 * (1.0 + dx2[i].abs() as f64), "{t:?}: matmul with {m} rows takes the AMX path");
                }
            }
        }
    }
}

#[test]
fn q8_0_quantization_round_trips_within_half_a_step() {
    let mut rng = StdRng::seed_from_u64(7);
    let (n, k) = (21, 96);
    let src: Vec<f32> = randn(n * k, &mut rng).iter().map(|v| v * 0.05).collect();
    let w = QuantWeight::quantize_q8_0("lm.w", n, k, &src).unwrap();
    let back = w.dequantize();
    for (bi, (a, b)) in src.chunks(32).zip(back.chunks(32)).enumerate() {
        let amax = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let step = f16::from_f32(amax / 127.0).to_f32();
        for (x, y) in a.iter().zip(b) {
            // half a step plus the f16 rounding of the scale (relative 2^-11 of |x|)
            assert!((x - y).abs() <= step / 2.0 + x.abs() * 1e-3, "block {bi}: {x} vs {y} (step {step})");
        }
    }
    // two groups of 16 rows at 1.0625 bytes per weight (a byte per code and the f16 scale per
    // 32, as in the file)
    assert_eq!(w.bytes(), 32 * 96 * 17 / 16);
}

fn assert_gguf_err(r: peft_core::Result<QuantWeight>, needles: &[&str]) {
    match r {
        Ok(w) => panic!("accepted a corrupted tensor: {w:?}"),
        Err(e) => {
            assert_eq!(e.code(), "ERR_GGUF_INVALID", "{e}");
            let msg = e.to_string();
            for n in needles {
                assert!(msg.contains(n), "`{msg}` should mention `{n}`");
            }
        }
    }
}

#[test]
fn corrupted_blocks_are_coded_errors_naming_the_tensor() {
    let mut rng = StdRng::seed_from_u64(8);
    let name = "blk.3.attn_q.weight";
    for t in TYPES {
        let (n, k) = (4, 512);
        let good = random_blocks(t, n, k, &mut rng);
        assert!(QuantWeight::from_gguf_bytes(name, t, n, k, &good).is_ok());
        // truncated and trailing bytes
        assert_gguf_err(QuantWeight::from_gguf_bytes(name, t, n, k, &good[..good.len() - 1]), &[name, "truncated"]);
        let mut long = good.clone();
        long.push(0);
        assert_gguf_err(QuantWeight::from_gguf_bytes(name, t, n, k, &long), &[name]);
        // a row length that is not a whole number of blocks
        assert_gguf_err(QuantWeight::from_gguf_bytes(name, t, n, k - 16, &good), &[name, "multiple"]);
        // NaN / infinite scale in row 2, second block of the row
        for bad in [f32::NAN, f32::INFINITY] {
            let mut b = good.clone();
            let at = (2 * (k / t.block_elems()) + 1) * t.block_bytes() + if t == QuantType::Q6K { 208 } else { 0 };
            b[at..at + 2].copy_from_slice(&f16b(bad));
            assert_gguf_err(QuantWeight::from_gguf_bytes(name, t, n, k, &b), &[name, "scale", "row 2", "block 1"]);
        }
        // NaN minimum (types with one)
        if matches!(t, QuantType::Q4_1 | QuantType::Q4K) {
            let mut b = good.clone();
            b[2..4].copy_from_slice(&f16b(f32::NEG_INFINITY));
            assert_gguf_err(QuantWeight::from_gguf_bytes(name, t, n, k, &b), &[name, "minimum", "row 0"]);
        }
    }
    assert_gguf_err(QuantWeight::from_gguf_bytes(name, QuantType::Q8_0, 0, 32, &[]), &[name, "empty"]);
    assert_gguf_err(QuantWeight::quantize_q8_0(name, 1, 32, &[f32::NAN; 32]), &[name, "non-finite"]);
    // shape mismatches in the products are coded too
    let w = QuantWeight::from_gguf_bytes(name, QuantType::Q8_0, 2, 32, &random_blocks(QuantType::Q8_0, 2, 32, &mut rng)).unwrap();
    let e = w.matmul_t(&[0.0; 31], 1, &mut [0.0; 2], false).unwrap_err();
    assert_eq!(e.code(), "ERR_SHAPE_MISMATCH");
    assert!(e.to_string().contains(name));
    let e = w.matmul(&[0.0; 2], 1, &mut [0.0; 33], false).unwrap_err();
    assert_eq!(e.code(), "ERR_SHAPE_MISMATCH");
}

#[test]
fn unsupported_ggml_types_are_not_kept_quantized() {
    assert_eq!(QuantType::from_ggml(GgmlDType::Q5K), None);
    assert_eq!(QuantType::from_ggml(GgmlDType::Q5_0), None);
    assert_eq!(QuantType::from_ggml(GgmlDType::Q6K), Some(QuantType::Q6K));
    assert_eq!(QuantType::from_ggml(GgmlDType::F16), None);
    assert_eq!(QuantType::from_ggml(GgmlDType::Q4_1), Some(QuantType::Q4_1));
    assert_eq!(QuantType::from_ggml(GgmlDType::Q4K), Some(QuantType::Q4K));
}

/// Quantizing f32 weights at load (`quantization: 'q8_0' | 'q4_0'` on a model folder) gives
/// exactly the blocks of llama.cpp's reference quantizers: `tests/data/quant_reference.json`
/// holds f32 rows (typical weights, an all-zero block, a negative largest magnitude and a tie of
/// |max| with opposite signs, codes near .5, f16-subnormal and large scales) and their Q8_0 /
/// Q4_0 blocks and dequantized values from the PyPI `gguf` package's numpy ports of
/// `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref` (`__test__/scripts/make_quant_reference.py`).
#[test]
fn quantizing_at_load_matches_llama_cpp_reference_rounding() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/quant_reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let (rows, cols) = (v["rows"].as_u64().unwrap() as usize, v["cols"].as_u64().unwrap() as usize);
    let bits = |key: &str| -> Vec<f32> { v[key].as_array().unwrap().iter().map(|b| f32::from_bits(b.as_u64().unwrap() as u32)).collect() };
    let x = bits("x_bits");
    assert_eq!(x.len(), rows * cols);
    for (t, key) in [(QuantType::Q8_0, "Q8_0"), (QuantType::Q4_0, "Q4_0")] {
        let hex = v[key].as_str().unwrap();
        let want: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let ours = QuantWeight::quantize_blocks(t, &x).unwrap();
        assert_eq!(ours.len(), want.len(), "{key}");
        for (bi, (a, b)) in ours.chunks(t.block_bytes()).zip(want.chunks(t.block_bytes())).enumerate() {
            assert_eq!(a, b, "{key} block {bi} (row {}, block {} of the row)", bi / (cols / 32), bi % (cols / 32));
        }
        let w = QuantWeight::quantize("model.layers.0.mlp.up_proj.weight", t, rows, cols, &x).unwrap();
        assert_eq!(w.backend(), key.to_ascii_lowercase());
        let deq = w.dequantize();
        let ref_deq = bits(&format!("{key}_dequantized_bits"));
        for (i, (a, b)) in deq.iter().zip(&ref_deq).enumerate() {
            // d·q in f32 both here and in gguf: identical
            assert_eq!(a.to_bits(), b.to_bits(), "{key} element {i} (row {}): {a} vs reference {b}", i / cols);
        }
        // and the GGUF blocks read back give the same weight (only the backend name differs)
        let from_file = QuantWeight::from_gguf_bytes("blk.0.ffn_up.weight", t, rows, cols, &want).unwrap();
        assert_eq!(from_file.dequantize(), deq);
        assert_eq!(from_file.backend(), format!("gguf-{key}"));
    }
    assert_gguf_err(QuantWeight::quantize("w", QuantType::Q4_1, 1, 32, &[0.5; 32]), &["w", "Q4_1", "not supported"]);
    assert_gguf_err(QuantWeight::quantize("w", QuantType::Q4_0, 1, 48, &[0.5; 48]), &["w", "multiple of 32"]);
}

