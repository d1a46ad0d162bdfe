//! Elementwise and row kernels of the engine on `f32` slices, compiled three times (AVX-512,
//! AVX2+FMA, baseline) and dispatched at run time, so the one binary that `npm install` builds
//! uses the widest vectors the CPU has.
//!
//! Reductions are written with 16 independent accumulators so that the compiler can keep them in
//! one vector register (it does not reorder a plain sequential float sum).

/// Width of the manual accumulators (one AVX-512 register of f32).
const L: usize = 16;

#[cfg(target_arch = "x86_64")]
pub(crate) fn level() -> u8 {
    use std::sync::atomic::{AtomicU8, Ordering};
    static LEVEL: AtomicU8 = AtomicU8::new(0);
    let l = LEVEL.load(Ordering::Relaxed);
    if l != 0 {
        return l;
    }
    let l = if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vl") && std::arch::is_x86_feature_detected!("fma") {
        3
    } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        2
    } else {
        1
    };
    LEVEL.store(l, Ordering::Relaxed);
    l
}

/// Defines `pub fn $name(args)` whose body is compiled for AVX-512, AVX2+FMA and the baseline,
/// picking the widest the CPU supports at run time.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                match level() {
                    // SAFETY: the CPU supports the features each version was compiled for.
                    3 => return unsafe { v4($($arg),*) },
                    2 => return unsafe { v3($($arg),*) },
                    _ => {}
                }
            }
            inner($($arg),*)
        }
    };
}

/// `e^x` for f32 with relative error below 2e-7 on `[-87, 88]` (Cody-Waite reduction by ln 2,
/// degree-7 Taylor polynomial on `|r| ≤ ln2/2`, exponent built from bits); inputs below -87.3
/// give a tiny positive number rather than 0, inputs above 88.7 are clamped. Branch-free so that
/// loops over it vectorise.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.3, 88.7);
    let k = (x * LOG2E + 0.5).floor();
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    let bits = ((k as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// Sum of squares of `x`.
#[inline(always)]
fn sumsq(x: &[f32]) -> f32 {
    let mut acc = [0f32; L];
    let mut it = x.chunks_exact(L);
    for c in &mut it {
        for i in 0..L {
            acc[i] += c[i] * c[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for &v in it.remainder() {
        s += v * v;
    }
    s
}

/// `Σ a_i b_i`.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; L];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut ia = a.chunks_exact(L);
    let mut ib = b.chunks_exact(L);
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for i in 0..L {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ia.remainder().iter().zip(ib.remainder()) {
        s += x * y;
    }
    s
}

/// Dot products of four rows with one vector (`k` elements each).
#[inline(always)]
fn dot4(r0: &[f32], r1: &[f32], r2: &[f32], r3: &[f32], x: &[f32], k: usize) -> [f32; 4] {
    let (r0, r1, r2, r3, x) = (&r0[..k], &r1[..k], &r2[..k], &r3[..k], &x[..k]);
    let mut a = [[0f32; L]; 4];
    let full = k / L * L;
    let mut c = 0;
    while c < full {
        let xs = &x[c..c + L];
        let (w0, w1, w2, w3) = (&r0[c..c + L], &r1[c..c + L], &r2[c..c + L], &r3[c..c + L]);
        for i in 0..L {
            a[0][i] += w0[i] * xs[i];
            a[1][i] += w1[i] * xs[i];
            a[2][i] += w2[i] * xs[i];
            a[3][i] += w3[i] * xs[i];
        }
        c += L;
    }
    let mut out = [0f32; 4];
    for (q, r) in [r0, r1, r2, r3].into_iter().enumerate() {
        let mut s: f32 = a[q].iter().sum();
        for l in full..k {
            s += r[l] * x[l];
        }
        out[q] = s;
    }
    out
}

multiversion! {
    /// Rows of `x·Wᵀ` for a few vectors: `ys[i][j] = (acc ? ys[i][j] : 0) + alpha · Σ_l
    /// w[j·ld + l] · xs[i][l]` for `j < ys[i].len()`, `l < k` (the decoding kernel; four rows
    /// of `W` at a time, each read once for all the vectors).
    pub fn gemv_rows(w: &[f32], ld: usize, k: usize, xs: &[&[f32]], ys: &mut [&mut [f32]], alpha: f32, acc: bool) {
        let n = ys.first().map_or(0, |y| y.len());
        let mut j = 0;
        while j + 4 <= n {
            let r = |q: usize| &w[(j + q) * ld..(j + q) * ld + k];
            let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
            for (x, y) in xs.iter().zip(ys.iter_mut()) {
                let d = dot4(r0, r1, r2, r3, x, k);
                for q in 0..4 {
                    y[j + q] = if acc { y[j + q] + alpha * d[q] } else { alpha * d[q] };
                }
            }
            j += 4;
        }
        while j < n {
            let r = &w[j * ld..j * ld + k];
            for (x, y) in xs.iter().zip(ys.iter_mut()) {
                let d = dot(r, &x[..k]);
                y[j] = if acc { y[j] + alpha * d } else { alpha * d };
            }
            j += 1;
        }
    }
}

/// Maximum of a non-empty slice.
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; L];
    let mut it = x.chunks_exact(L);
    for c in &mut it {
        for i in 0..L {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for &v in it.remainder() {
        m = m.max(v);
    }
    m
}

multiversion! {
    /// RMSNorm of each row (HF `LlamaRMSNorm`): `y = x · rstd · w`, `rstd = 1/sqrt(mean(x²) + eps)`.
    /// `x`, `y`: `[rows, d]`; `w`: `[d]`; `rstd`: `[rows]` (saved for the backward).
    pub fn rms_norm_fwd(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
        let d = w.len();
        for ((xr, yr), r) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(rstd.iter_mut()) {
            let rs = 1.0 / (sumsq(xr) / d as f32 + eps).sqrt();
            *r = rs;
            for ((o, &xi), &wi) in yr.iter_mut().zip(xr).zip(w) {
                *o = xi * rs * wi;
            }
        }
    }
}

multiversion! {
    /// RMSNorm without the saved statistics: `y = x · rstd · w` from a given `rstd` (recomputing
    /// the normalised input in the backward).
    pub fn rms_norm_apply(x: &[f32], w: &[f32], rstd: &[f32], y: &mut [f32]) {
        let d = w.len();
        for ((xr, yr), &rs) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(rstd) {
            for ((o, &xi), &wi) in yr.iter_mut().zip(xr).zip(w) {
                *o = xi * rs * wi;
            }
        }
    }
}

multiversion! {
    /// RMSNorm backward (frozen weight): `gx += rstd · (gw − x · rstd² · mean(gw · x))` with
    /// `gw = gy ⊙ w`, per row. `gx` is accumulated into (the residual stream's gradient).
    pub fn rms_norm_bwd_acc(x: &[f32], w: &[f32], rstd: &[f32], gy: &[f32], gx: &mut [f32]) {
        let d = w.len();
        let mut gw = vec![0f32; d];
        for (((xr, gyr), gxr), &rs) in x.chunks_exact(d).zip(gy.chunks_exact(d)).zip(gx.chunks_exact_mut(d)).zip(rstd) {
            for ((o, &g), &wi) in gw.iter_mut().zip(gyr).zip(w) {
                *o = g * wi;
            }
            let m = dot(&gw, xr) / d as f32;
            let c = rs * rs * m;
            for ((o, &g), &xi) in gxr.iter_mut().zip(&gw).zip(xr) {
                *o += rs * (g - xi * c);
            }
        }
    }
}

multiversion! {
    /// Rotate-half RoPE in place on token-major rows: `x` `[rows, heads · hd]`, `cos`/`sin`
    /// `[rows, rd/2]`. The first `rd` (even, `≤ hd`) dimensions of each head are rotated
    /// (rotate-half within them; `rd < hd` is partial RoPE, Phi-3's `partial_rotary_factor`) and
    /// the rest pass through. `sign = 1` applies the rotation (forward), `-1` its transpose
    /// (backward).
    pub fn rope_inplace(x: &mut [f32], cos: &[f32], sin: &[f32], heads: usize, hd: usize, rd: usize, sign: f32) {
        let half = rd / 2;
        for ((row, c), s) in x.chunks_exact_mut(heads * hd).zip(cos.chunks_exact(half)).zip(sin.chunks_exact(half)) {
            for h in row.chunks_exact_mut(hd) {
                let (a, b) = h[..2 * half].split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    let si = sign * s[i];
                    a[i] = x1 * c[i] - x2 * si;
                    b[i] = x2 * c[i] + x1 * si;
                }
            }
        }
    }
}

/// Logistic sigmoid via [`exp_f32`].
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

multiversion! {
    /// SwiGLU forward: `a = silu(g) · u` (HF `LlamaMLP`: `act_fn(gate_proj(x)) * up_proj(x)`).
    pub fn silu_mul(g: &[f32], u: &[f32], a: &mut [f32]) {
        for ((o, &gi), &ui) in a.iter_mut().zip(g).zip(u) {
            *o = gi * sigmoid(gi) * ui;
        }
    }
}

multiversion! {
    /// SwiGLU backward, in place: on entry `g`, `u` hold the forward inputs and `ga` the gradient
    /// of `a`; on exit `g` holds `∂L/∂g = ga · u · σ(g)(1 + g(1 − σ(g)))` and `u` holds
    /// `∂L/∂u = ga · silu(g)`.
    pub fn silu_mul_bwd_inplace(g: &mut [f32], u: &mut [f32], ga: &[f32]) {
        for ((gi, ui), &gai) in g.iter_mut().zip(u.iter_mut()).zip(ga) {
            let x = *gi;
            let sg = sigmoid(x);
            let silu = x * sg;
            *gi = gai * *ui * sg * (1.0 + x * (1.0 - sg));
            *ui = gai * silu;
        }
    }
}

/// `1 − tanh(z) = 2 / (e^{2z} + 1)` with [`exp_f32`] (`z` clamped to ±40, where `e^{2z}` is
/// still a normal f32 and `1 − tanh` below 1e-34). Returned instead of `tanh` itself so that `1 − tanh²` = `s (2 − s)` keeps its
/// precision near ±1. Branch-free so that loops over it vectorise.
#[inline(always)]
fn one_minus_tanh(z: f32) -> f32 {
    let z = z.clamp(-40.0, 40.0);
    2.0 / (exp_f32(2.0 * z) + 1.0)
}

/// `√(2/π)`, the tanh approximation's inner scale.
const GELU_C: f32 = 0.797_884_56;
/// The cubic coefficient of the tanh approximation.
const GELU_A: f32 = 0.044_715;

multiversion! {
    /// GeGLU forward with the tanh approximation (transformers' `gelu_pytorch_tanh`, Gemma's MLP:
    /// `act_fn(gate_proj(x)) * up_proj(x)`): `a = gelu(g) · u`,
    /// `gelu(x) = x/2 · (1 + tanh(√(2/π) (x + 0.044715 x³)))`.
    pub fn gelu_tanh_mul(g: &[f32], u: &[f32], a: &mut [f32]) {
        for ((o, &x), &ui) in a.iter_mut().zip(g).zip(u) {
            let s = one_minus_tanh(GELU_C * (x + GELU_A * x * x * x));
            *o = 0.5 * x * (2.0 - s) * ui;
        }
    }
}

multiversion! {
    /// Backward of [`gelu_tanh_mul`], in place: on entry `g`, `u` hold the forward inputs and
    /// `ga` the gradient of `a`; on exit `g` holds `∂L/∂g = ga · u · gelu'(g)` with
    /// `gelu'(x) = (1 + t)/2 + x/2 · (1 − t²) · √(2/π) (1 + 3 · 0.044715 x²)`, and `u` holds
    /// `∂L/∂u = ga · gelu(g)`.
    pub fn gelu_tanh_mul_bwd_inplace(g: &mut [f32], u: &mut [f32], ga: &[f32]) {
        for ((gi, ui), &gai) in g.iter_mut().zip(u.iter_mut()).zip(ga) {
            let x = *gi;
            // s = 1 − t, so 1 + t = 2 − s and 1 − t² = s (2 − s).
            let s = one_minus_tanh(GELU_C * (x + GELU_A * x * x * x));
            let d = 0.5 * (2.0 - s) + 0.5 * x * (s * (2.0 - s)) * GELU_C * (1.0 + 3.0 * GELU_A * x * x);
            *gi = gai * *ui * d;
            *ui = gai * 0.5 * x * (2.0 - s);
        }
    }
}

multiversion! {
    /// Softmax of `row[..valid]` in place with the rest zeroed, as candle's softmax over a row
    /// whose masked entries hold `f32::MIN` (their `exp` underflows to exactly 0). `valid` = 0
    /// means every entry is masked: candle then gives the uniform distribution over the row.
    pub fn softmax_prefix(row: &mut [f32], valid: usize) {
        if valid == 0 {
            let u = 1.0 / row.len() as f32;
            row.iter_mut().for_each(|v| *v = u);
            return;
        }
        let (live, dead) = row.split_at_mut(valid);
        let m = max(live);
        let mut acc = [0f32; L];
        let mut it = live.chunks_exact_mut(L);
        for c in &mut it {
            for i in 0..L {
                c[i] = exp_f32(c[i] - m);
                acc[i] += c[i];
            }
        }
        let mut s: f32 = acc.iter().sum();
        for v in it.into_remainder() {
            *v = exp_f32(*v - m);
            s += *v;
        }
        let inv = 1.0 / s;
        live.iter_mut().for_each(|v| *v *= inv);
        dead.iter_mut().for_each(|v| *v = 0.0);
    }
}

multiversion! {
    /// Softmax backward over `p[..n]`, in place in `gp`: `gs = scale · p ⊙ (gp − Σ gp ⊙ p)`.
    pub fn softmax_bwd_inplace(p: &[f32], gp: &mut [f32], scale: f32) {
        let d = dot(p, gp);
        for (g, &pi) in gp.iter_mut().zip(p) {
            *g = scale * pi * (*g - d);
        }
    }
}

multiversion! {
    /// Cross-entropy of one row of logits against `target`, weighted by `w`, and its gradient in
    /// place: returns `w · (lse − x_target)` and leaves `row = w · (softmax(row) − onehot)`.
    /// The sum of exponentials is accumulated in f64 (a vocabulary-long f32 sum loses ~1e-5).
    pub fn cross_entropy_row(row: &mut [f32], target: usize, w: f32) -> f64 {
        let xt = row[target];
        let m = max(row);
        let mut acc = [0f64; L];
        let mut it = row.chunks_exact_mut(L);
        for c in &mut it {
            for i in 0..L {
                c[i] = exp_f32(c[i] - m);
                acc[i] += c[i] as f64;
            }
        }
        let mut s: f64 = acc.iter().sum();
        for v in it.into_remainder() {
            *v = exp_f32(*v - m);
            s += *v as f64;
        }
        let lse = m as f64 + s.ln();
        let k = (w as f64 / s) as f32;
        row.iter_mut().for_each(|v| *v *= k);
        row[target] -= w;
        w as f64 * (lse - xt as f64)
    }
}

multiversion! {
    /// `y += a · x`.
    pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o += a * v;
        }
    }
}

multiversion! {
    /// `y += x`.
    pub fn add_inplace(y: &mut [f32], x: &[f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o += v;
        }
    }
}

multiversion! {
    /// `y = a + b`.
    pub fn add_to(a: &[f32], b: &[f32], y: &mut [f32]) {
        for ((o, &u), &v) in y.iter_mut().zip(a).zip(b) {
            *o = u + v;
        }
    }
}

multiversion! {
    /// `y = x ⊙ m` elementwise.
    pub fn mul_to(x: &[f32], m: &[f32], y: &mut [f32]) {
        for ((o, &u), &v) in y.iter_mut().zip(x).zip(m) {
            *o = u * v;
        }
    }
}

multiversion! {
    /// `y += s · (x ⊙ m)` elementwise.
    pub fn mul_acc(x: &[f32], m: &[f32], s: f32, y: &mut [f32]) {
        for ((o, &u), &v) in y.iter_mut().zip(x).zip(m) {
            *o += s * u * v;
        }
    }
}

multiversion! {
    /// Adds the bias `b` `[d]` to every row of `y` `[rows, d]`.
    pub fn add_bias(y: &mut [f32], b: &[f32]) {
        for row in y.chunks_exact_mut(b.len()) {
            for (o, &v) in row.iter_mut().zip(b) {
                *o += v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let e = exp_f32(x) as f64;
            let r = (x as f64).exp();
            worst = worst.max(((e - r) / r).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
    }

    /// GeGLU (tanh approximation) forward and backward against f64 evaluations of the same
    /// formulas, over the range activations reach and beyond the tanh clamp.
    #[test]
    fn gelu_tanh_mul_and_backward_match_f64() {
        let gelu = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
        let xs: Vec<f32> = (0..4001).map(|i| -20.0 + i as f32 * 0.01).collect();
        let us: Vec<f32> = xs.iter().enumerate().map(|(i, _)| 0.5 + (i % 7) as f32 * 0.25).collect();
        let mut a = vec![0f32; xs.len()];
        gelu_tanh_mul(&xs, &us, &mut a);
        let ga: Vec<f32> = (0..xs.len()).map(|i| 1.0 - (i % 5) as f32 * 0.3).collect();
        let (mut g, mut u) = (xs.clone(), us.clone());
        gelu_tanh_mul_bwd_inplace(&mut g, &mut u, &ga);
        for i in 0..xs.len() {
            let (x, uu, gg) = (xs[i] as f64, us[i] as f64, ga[i] as f64);
            let want = gelu(x) * uu;
            assert!((a[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "gelu·u at {x}: {} vs {want}", a[i]);
            let h = 1e-5;
            let d = (gelu(x + h) - gelu(x - h)) / (2.0 * h);
            assert!((g[i] as f64 - gg * uu * d).abs() <= 2e-6 * (gg * uu).abs().max(1.0), "∂g at {x}: {} vs {}", g[i], gg * uu * d);
            assert!((u[i] as f64 - gg * gelu(x)).abs() <= 1e-6 * (gg * gelu(x)).abs().max(1.0), "∂u at {x}");
        }
    }

    #[test]
    fn softmax_and_cross_entropy() {
        let mut row = vec![1.0f32, 2.0, 3.0, 5.0, 7.0];
        softmax_prefix(&mut row, 3);
        let z: f32 = [1.0f32, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        assert!((row[0] - 1f32.exp() / z).abs() < 1e-6 && row[3] == 0.0 && row[4] == 0.0);
        let mut all = vec![3.0f32; 4];
        softmax_prefix(&mut all, 0);
        assert_eq!(all, vec![0.25; 4]);
        let logits: Vec<f32> = (0..37).map(|i| ((i * 7919) % 13) as f32 * 0.3 - 2.0).collect();
        let mut g = logits.clone();
        let loss = cross_entropy_row(&mut g, 5, 0.5);
        let lse = logits.iter().map(|v| (*v as f64).exp()).sum::<f64>().ln();
        assert!((loss - 0.5 * (lse - logits[5] as f64)).abs() < 1e-5);
        let p5 = (logits[5] as f64 - lse).exp();
        assert!((g[5] as f64 - 0.5 * (p5 - 1.0)).abs() < 1e-6);
    }
}
