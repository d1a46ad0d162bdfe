//! Experiment (issue 12): does a GEMM of our own with the frozen weight packed once beat the
//! `gemm` crate on SmolLM2-135M's training shapes? One thread, an AVX-512 6×64 micro-kernel
//! (24 zmm accumulators, B panels of 64 columns × k, A panels of 6 rows), BLIS loop order
//! (NC 768, KC 256, MC 96). Prints GFLOP/s of both and the max difference.
//!
//!   cargo run --release -p peft-core --example packed_gemm            # B packed on every call
//!   PRE=1 cargo run --release -p peft-core --example packed_gemm      # B packed once (frozen weight)
//!   FLUSH=1 ...                                                       # 64 MB written before every call
//!
//! Result (2026-12-06, benches/README.md "A pre-packed GEMM of our own"): parity at best, so the
//! engine keeps the crate. Not used by the library.

#[cfg(not(target_arch = "x86_64"))]
fn main() {}

#[cfg(target_arch = "x86_64")]
fn main() {
    if !std::arch::is_x86_feature_detected!("avx512f") {
        eprintln!("packed_gemm needs AVX-512F");
        return;
    }
    x86::main()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::time::Instant;

    const MR: usize = 6;
    const NR: usize = 64;

    #[derive(Clone, Copy)]
    struct V { p: *const f32, rs: isize, cs: isize }
    impl V { unsafe fn at(&self, i: usize, j: usize) -> f32 { *self.p.offset(i as isize * self.rs + j as isize * self.cs) } }

    /// pack B[k0..k0+kc, j0..j0+nc] into panels of NR columns: out[p][kk][NR]
    unsafe fn pack_b(b: V, k0: usize, kc: usize, j0: usize, nc: usize, out: &mut [f32]) {
        let np = nc.div_ceil(NR);
        for p in 0..np {
            let jw = NR.min(nc - p * NR);
            let base = p * kc * NR;
            if b.cs == 1 {
                for kk in 0..kc {
                    let src = b.p.offset((k0 + kk) as isize * b.rs + (j0 + p * NR) as isize);
                    let dst = out.as_mut_ptr().add(base + kk * NR);
                    std::ptr::copy_nonoverlapping(src, dst, jw);
                    for j in jw..NR { *dst.add(j) = 0.0; }
                }
            } else {
                // transpose-gather: column j of B is contiguous along k (rs == 1)
                for j in 0..NR {
                    if j < jw {
                        let src = b.p.offset(k0 as isize * b.rs + (j0 + p * NR + j) as isize * b.cs);
                        for kk in 0..kc { *out.get_unchecked_mut(base + kk * NR + j) = *src.offset(kk as isize * b.rs); }
                    } else {
                        for kk in 0..kc { *out.get_unchecked_mut(base + kk * NR + j) = 0.0; }
                    }
                }
            }
        }
    }

    /// pack A[i0..i0+mc, k0..k0+kc] into panels of MR rows: out[q][kk][MR]
    unsafe fn pack_a(a: V, i0: usize, mc: usize, k0: usize, kc: usize, out: &mut [f32]) {
        let nq = mc.div_ceil(MR);
        for q in 0..nq {
            let iw = MR.min(mc - q * MR);
            let base = q * kc * MR;
            for i in 0..MR {
                if i < iw {
                    let src = a.p.offset((i0 + q * MR + i) as isize * a.rs + k0 as isize * a.cs);
                    for kk in 0..kc { *out.get_unchecked_mut(base + kk * MR + i) = *src.offset(kk as isize * a.cs); }
                } else {
                    for kk in 0..kc { *out.get_unchecked_mut(base + kk * MR + i) = 0.0; }
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn kern(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, mr: usize, nr: usize, alpha: f32, load: bool) {
        let mut acc = [[_mm512_setzero_ps(); 4]; MR];
        let mut ap = a;
        let mut bp = b;
        for _ in 0..kc {
            let b0 = _mm512_loadu_ps(bp);
            let b1 = _mm512_loadu_ps(bp.add(16));
            let b2 = _mm512_loadu_ps(bp.add(32));
            let b3 = _mm512_loadu_ps(bp.add(48));
            _mm_prefetch::<_MM_HINT_T0>(bp.add(NR * 8) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(bp.add(NR * 8 + 16) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(bp.add(NR * 8 + 32) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(bp.add(NR * 8 + 48) as *const i8);
            for i in 0..MR {
                let x = _mm512_set1_ps(*ap.add(i));
                acc[i][0] = _mm512_fmadd_ps(x, b0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(x, b1, acc[i][1]);
                acc[i][2] = _mm512_fmadd_ps(x, b2, acc[i][2]);
                acc[i][3] = _mm512_fmadd_ps(x, b3, acc[i][3]);
            }
            ap = ap.add(MR);
            bp = bp.add(NR);
        }
        let al = _mm512_set1_ps(alpha);
        if mr == MR && nr == NR {
            for i in 0..MR {
                let row = c.add(i * ldc);
                for v in 0..4 {
                    let p = row.add(v * 16);
                    let r = if load { _mm512_fmadd_ps(al, acc[i][v], _mm512_loadu_ps(p)) } else { _mm512_mul_ps(al, acc[i][v]) };
                    _mm512_storeu_ps(p, r);
                }
            }
        } else {
            for i in 0..mr {
                let row = c.add(i * ldc);
                for v in 0..4 {
                    if v * 16 >= nr { break; }
                    let w = (nr - v * 16).min(16);
                    let m: __mmask16 = if w == 16 { 0xffff } else { (1u16 << w) - 1 };
                    let p = row.add(v * 16);
                    let r = if load { _mm512_fmadd_ps(al, acc[i][v], _mm512_maskz_loadu_ps(m, p)) } else { _mm512_mul_ps(al, acc[i][v]) };
                    _mm512_mask_storeu_ps(p, m, r);
                }
            }
        }
    }

    struct Ws { a: Vec<f32>, b: Vec<f32> }

    const KC: usize = 256;
    const MC: usize = 96;
    const NC: usize = 768;

    /// C[m,n] = (acc?C:0) + alpha A B  ; single thread
    unsafe fn mygemm(m: usize, n: usize, k: usize, c: *mut f32, ldc: usize, a: V, b: V, alpha: f32, acc: bool, ws: &mut Ws, order: u8, pre: Option<&[f32]>) {
        ws.b.resize(KC * NC.div_ceil(NR) * NR, 0.0);
        ws.a.resize(KC * MC.div_ceil(MR) * MR, 0.0);
        let mut jc = 0;
        while jc < n {
            let nc = NC.min(n - jc);
            let mut pc = 0;
            while pc < k {
                let kc = KC.min(k - pc);
                let bpk: *const f32 = if let Some(pk) = pre { pk.as_ptr().add(jc * k + pc * NR) } else { pack_b(b, pc, kc, jc, nc, &mut ws.b); ws.b.as_ptr() };
                let pstride = if pre.is_some() { k * NR } else { kc * NR };
                let load = acc || pc > 0;
                let mut ic = 0;
                while ic < m {
                    let mc = MC.min(m - ic);
                    pack_a(a, ic, mc, pc, kc, &mut ws.a);
                    let nq = mc.div_ceil(MR);
                    let np = nc.div_ceil(NR);
                    if order == 0 {
                        for q in 0..nq {
                            for p in 0..np {
                                kern(kc, ws.a.as_ptr().add(q * kc * MR), bpk.add(p * pstride), c.add((ic + q * MR) * ldc + jc + p * NR), ldc, MR.min(mc - q * MR), NR.min(nc - p * NR), alpha, load);
                            }
                        }
                    } else {
                        for p in 0..np {
                            for q in 0..nq {
                                kern(kc, ws.a.as_ptr().add(q * kc * MR), bpk.add(p * pstride), c.add((ic + q * MR) * ldc + jc + p * NR), ldc, MR.min(mc - q * MR), NR.min(nc - p * NR), alpha, load);
                            }
                        }
                    }
                    ic += mc;
                }
                pc += kc;
            }
            jc += nc;
        }
    }

    fn rnd(n: usize, s: u64) -> Vec<f32> { let mut x = s; (0..n).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5 }).collect() }

    pub fn main() {
        let shapes: &[(&str, usize, usize, usize, bool)] = &[
            ("q/o NT 512x576x576", 512, 576, 576, true),
            ("kv NT 512x576x192", 512, 576, 192, true),
            ("gate NT 512x576x1536", 512, 576, 1536, true),
            ("down NT 512x1536x576", 512, 1536, 576, true),
            ("head NT 256x576x49152", 256, 576, 49152, true),
            ("dq NN 512x576x576", 512, 576, 576, false),
            ("dgate NN 512x1536x576", 512, 1536, 576, false),
            ("ddown NN 512x576x1536", 512, 576, 1536, false),
            ("dhead NN 256x49152x576", 256, 49152, 576, false),
        ];
        let order: u8 = std::env::var("ORDER").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut ws = Ws { a: vec![], b: vec![] };
        for &(name, m, k, n, nt) in shapes {
            let a = rnd(m * k, 1);
            let w = rnd(k * n, 2); // NT: W [n,k]; NN: W [k,n]
            let av = V { p: a.as_ptr(), rs: k as isize, cs: 1 };
            let bv = if nt { V { p: w.as_ptr(), rs: 1, cs: k as isize } } else { V { p: w.as_ptr(), rs: n as isize, cs: 1 } };
            let pre: Option<Vec<f32>> = if std::env::var("PRE").is_ok() { let mut v = vec![0f32; n.div_ceil(NR) * NR * k]; unsafe { pack_b(bv, 0, k, 0, n, &mut v) }; Some(v) } else { None };
            let mut c1 = vec![0f32; m * n];
            let mut c2 = vec![0f32; m * n];
            unsafe { mygemm(m, n, k, c1.as_mut_ptr(), n, av, bv, 1.0, false, &mut ws, order, pre.as_deref()) };
            unsafe { gemm::gemm(m, n, k, c2.as_mut_ptr(), 1, n as isize, false, av.p, av.cs, av.rs, bv.p, bv.cs, bv.rs, 1.0, 1.0, false, false, false, gemm::Parallelism::None) };
            let mut md = 0f32; for i in 0..m*n { md = md.max((c1[i]-c2[i]).abs()); }
            let _ = unsafe { av.at(0,0) };
            let flops = 2.0 * (m * n * k) as f64;
            let reps = ((3e9 / flops) as usize).max(2);
            let mut best = [f64::MAX; 2];
            if std::env::var("FLUSH").is_ok() {
                let mut junk = vec![0u8; 64 << 20];
                let mut tot = [0f64; 2];
                let reps = reps.min(40);
                for r in 0..reps {
                    for which in 0..2 {
                        for x in junk.iter_mut().step_by(64) { *x = x.wrapping_add(r as u8); }
                        let t = Instant::now();
                        if which == 0 { unsafe { mygemm(m, n, k, c1.as_mut_ptr(), n, av, bv, 1.0, false, &mut ws, order, pre.as_deref()) } } else { unsafe { gemm::gemm(m, n, k, c2.as_mut_ptr(), 1, n as isize, false, av.p, av.cs, av.rs, bv.p, bv.cs, bv.rs, 1.0, 1.0, false, false, false, gemm::Parallelism::None) } }
                        tot[which] += t.elapsed().as_secs_f64();
                    }
                }
                best = [tot[0] / reps as f64, tot[1] / reps as f64];
            } else {
            for _round in 0..5 {
                let t = Instant::now();
                for _ in 0..reps { unsafe { mygemm(m, n, k, c1.as_mut_ptr(), n, av, bv, 1.0, false, &mut ws, order, pre.as_deref()) }; }
                best[0] = best[0].min(t.elapsed().as_secs_f64() / reps as f64);
                let t = Instant::now();
                for _ in 0..reps { unsafe { gemm::gemm(m, n, k, c2.as_mut_ptr(), 1, n as isize, false, av.p, av.cs, av.rs, bv.p, bv.cs, bv.rs, 1.0, 1.0, false, false, false, gemm::Parallelism::None) }; }
                best[1] = best[1].min(t.elapsed().as_secs_f64() / reps as f64);
            }
            }
            println!("{name:28} mine {:6.1} GF/s  gemm {:6.1} GF/s  ratio {:.2}  maxdiff {md:.2e}", flops / best[0] / 1e9, flops / best[1] / 1e9, best[1] / best[0]);
        }
    }

}
