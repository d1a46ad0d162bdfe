//! Single-precision matrix products of the engine, on strided views of `f32` buffers, through
//! the `gemm` crate (run-time dispatched AVX-512 / AVX2 / NEON micro-kernels; candle's own CPU
//! backend uses the same crate). Products write into (or accumulate onto) their destination, so
//! the engine never allocates an output per call.

use gemm::Parallelism;

/// A read-only strided matrix view: element `(i, j)` is at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct View {
    ptr: *const f32,
    pub rows: usize,
    pub cols: usize,
    rs: isize,
    cs: isize,
}

// SAFETY: a `View` is only read, and the engine keeps what it points into alive and unmodified
// for as long as the view is used (the model is borrowed for the whole step).
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    /// Row-major `[rows, cols]` with leading dimension `ld` starting at `data[off]`.
    ///
    /// Panics if the view reaches past the end of `data`.
    pub fn rm(data: &[f32], off: usize, rows: usize, cols: usize, ld: usize) -> View {
        if rows > 0 && cols > 0 {
            assert!(off + (rows - 1) * ld + cols <= data.len(), "gemm view out of bounds");
        }
        View { ptr: data[off..].as_ptr(), rows, cols, rs: ld as isize, cs: 1 }
    }

    /// Contiguous row-major `[rows, cols]`.
    pub fn of(data: &[f32], rows: usize, cols: usize) -> View {
        View::rm(data, 0, rows, cols, cols)
    }

    /// The transpose (no copy).
    pub fn t(self) -> View {
        View { ptr: self.ptr, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    /// Element `(i, j)`.
    ///
    /// Panics if `i ≥ rows` or `j ≥ cols`.
    #[inline(always)]
    pub(crate) fn at(&self, i: usize, j: usize) -> f32 {
        assert!(i < self.rows && j < self.cols);
        // SAFETY: inside the bounds-checked viewed region.
        unsafe { *self.ptr.offset(i as isize * self.rs + j as isize * self.cs) }
    }

    /// The row stride in elements.
    pub(crate) fn row_stride(&self) -> isize {
        self.rs
    }

    /// The column stride in elements.
    pub(crate) fn col_stride(&self) -> isize {
        self.cs
    }

    /// The address of row `i`'s first element (`i < rows`).
    pub(crate) fn row_ptr(&self, i: usize) -> *const f32 {
        assert!(i < self.rows);
        // SAFETY: inside the viewed region.
        unsafe { self.ptr.offset(i as isize * self.rs) }
    }

    /// The address of column `j`'s first element (`j < cols`).
    pub(crate) fn col_ptr(&self, j: usize) -> *const f32 {
        assert!(j < self.cols);
        // SAFETY: inside the viewed region.
        unsafe { self.ptr.offset(j as isize * self.cs) }
    }

    /// Rows `r0 .. r0 + n` of the view.
    pub fn rows(self, r0: usize, n: usize) -> View {
        assert!(r0 + n <= self.rows);
        // SAFETY: stays inside the viewed region (checked above).
        View { ptr: unsafe { self.ptr.offset(r0 as isize * self.rs) }, rows: n, ..self }
    }

    /// Columns `c0 .. c0 + n` of the view.
    pub fn cols(self, c0: usize, n: usize) -> View {
        assert!(c0 + n <= self.cols);
        // SAFETY: stays inside the viewed region (checked above).
        View { ptr: unsafe { self.ptr.offset(c0 as isize * self.cs) }, cols: n, ..self }
    }
}

/// A writable row-major destination `[rows, cols]` with leading dimension `ld`.
pub struct Dst {
    ptr: *mut f32,
    pub rows: usize,
    pub cols: usize,
    ld: usize,
}

// SAFETY: a `Dst` is created from a unique borrow (or disjoint parts of one) and written by one
// product at a time.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Dst {
    /// Row-major `[rows, cols]` with leading dimension `ld` starting at `data[off]`.
    pub fn rm(data: &mut [f32], off: usize, rows: usize, cols: usize, ld: usize) -> Dst {
        if rows > 0 && cols > 0 {
            assert!(off + (rows - 1) * ld + cols <= data.len(), "gemm destination out of bounds");
        }
        Dst { ptr: data[off..].as_mut_ptr(), rows, cols, ld }
    }

    /// Contiguous row-major `[rows, cols]`.
    pub fn of(data: &mut [f32], rows: usize, cols: usize) -> Dst {
        Dst::rm(data, 0, rows, cols, cols)
    }

    /// A raw destination; the caller guarantees that the region is valid and not aliased.
    ///
    /// # Safety
    /// `ptr .. ptr + (rows-1)·ld + cols` must be valid for writes for the product's duration.
    pub unsafe fn raw(ptr: *mut f32, rows: usize, cols: usize, ld: usize) -> Dst {
        Dst { ptr, rows, cols, ld }
    }

    /// The first element's address.
    pub(crate) fn ptr_mut(&mut self) -> *mut f32 {
        self.ptr
    }

    /// The leading dimension (elements between rows).
    pub(crate) fn ld(&self) -> usize {
        self.ld
    }

    /// Rows `r0 .. r0 + n`.
    pub fn rows(&mut self, r0: usize, n: usize) -> Dst {
        assert!(r0 + n <= self.rows);
        // SAFETY: inside the destination region.
        Dst { ptr: unsafe { self.ptr.add(r0 * self.ld) }, rows: n, cols: self.cols, ld: self.ld }
    }

    /// Columns `c0 .. c0 + n`.
    pub fn cols(&mut self, c0: usize, n: usize) -> Dst {
        assert!(c0 + n <= self.cols);
        // SAFETY: inside the destination region.
        Dst { ptr: unsafe { self.ptr.add(c0) }, rows: self.rows, cols: n, ld: self.ld }
    }
}

/// Products with fewer multiply-adds stay in f32 whatever the matmul precision.
const AMX_MIN_WORK: usize = 1 << 22;
/// Products with a longer inner dimension stay in f32 whatever the matmul precision.
const AMX_MAX_K: usize = 8192;

/// Products smaller than this many multiply-adds run on one thread (threading costs more).
const PAR_MIN_WORK: usize = 1 << 20;

/// Products whose right operand has at least this many elements are threaded whatever the
/// row count: a matrix-vector product is bound by reading the weight, which both cores speed up.
const PAR_MIN_WEIGHT: usize = 1 << 16;

/// `dst = (acc ? dst : 0) + alpha · a · b`, with `a` `[m, k]`, `b` `[k, n]`, `dst` `[m, n]`, at the
/// process's matmul precision: a large product runs in bf16x3 / bf16 on AMX when
/// [`super::amx::set_float32_matmul_precision`] asks for it, everything else as [`gemm_f32`].
/// `threads > 1` lets a large product use the current rayon pool.
///
/// Panics if the shapes do not agree.
pub fn gemm(dst: &mut Dst, a: View, b: View, alpha: f32, acc: bool, threads: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    // Products large enough that converting and packing the operands is repaid (64 rows or
    // more: decoding stays f32), with an inner dimension short enough that the panels of the
    // converted operands stay in L2 (the lm_head's input gradient, k = 49152, runs at half the
    // f32 speed in bf16x3). Attention calls `gemm_f32` itself.
    if m >= 64 && n >= 128 && (128..=AMX_MAX_K).contains(&k) && m * n * k >= AMX_MIN_WORK {
        let passes = super::amx::passes();
        if passes > 0 {
            super::amx::gemm(dst, a, b, alpha, acc, threads, passes);
            return;
        }
    }
    gemm_f32(dst, a, b, alpha, acc, threads)
}

/// `dst = (acc ? dst : 0) + alpha · a · b` in f32 whatever the matmul precision (attention's
/// products: scores and probabilities keep f32 as in the general path).
/// `threads > 1` lets a large product use the current rayon pool.
///
/// Panics if the shapes do not agree.
pub fn gemm_f32(dst: &mut Dst, a: View, b: View, alpha: f32, acc: bool, threads: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && dst.rows == m && dst.cols == n, "gemm shape mismatch: [{m}x{k}]·[{}x{n}] -> [{}x{}]", b.rows, dst.rows, dst.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                // SAFETY: row i of the destination region.
                unsafe { std::slice::from_raw_parts_mut(dst.ptr.add(i * dst.ld), n) }.fill(0.0);
            }
        }
        return;
    }
    // A rank-side product large enough to repay a second thread (every LoRA product of a
    // training step but the k/v projections' 512 × 192 × 8 ones): one block per thread.
    // Measured on SmolLM2, 4 × 128, interleaved (`PEFT_AB=0,256`): the LoRA phases of an
    // all-linear step fall from 184 to 149 ms (median of 8), of a q,k,v,o step from 61 to 50 ms.
    if threads > 1
        && m.min(n).min(k) < 64
        && m.max(n) >= 128
        && m > GEMV_MAX_ROWS
        && m * n * k >= SKINNY_PAR_MIN_WORK
        && super::ab_flags() & super::AB_SKINNY_ONE_THREAD == 0
    {
        split_blocks(dst, a, b, alpha, acc, threads, |d, a, b, alpha, acc| gemm_f32(d, a, b, alpha, acc, 1));
        return;
    }
    // A few rows against a row-major weight (`x·Wᵀ` while decoding): a streaming kernel over
    // the weight's rows, split across threads by output columns (see [`gemv_nt`]).
    if m <= GEMV_MAX_ROWS && a.cs == 1 && b.rs == 1 && super::ab_flags() & super::AB_GEMM_CRATE_GEMV == 0 {
        gemv_nt(dst, a, b, alpha, acc, threads);
        return;
    }
    // A narrow `x·Wᵀ` (a LoRA rank side: `x·Aᵀ`, `gy·B`): dot products of each row of `a` with
    // the few rows of `W`, on AVX-512 (the `gemm` crate reaches 60 GFLOP/s on [512x576]·[576x8]).
    #[cfg(target_arch = "x86_64")]
    if n <= NARROW_MAX && a.cs == 1 && b.rs == 1 && super::simd::level() >= 3 && super::ab_flags() & super::AB_GEMM_CRATE_NARROW == 0 {
        // SAFETY: AVX-512F is present (level 3); the views were bounds-checked when built, and
        // the destination does not alias them.
        unsafe { narrow_nt_avx512(dst, a, b, alpha, acc) };
        return;
    }
    // The same on AVX2 + FMA (AMD Zen 2/3, Intel before AVX-512) up to rank 8: on a Zen 3 core
    // [512x576]·[576x8] runs at 73-80 GFLOP/s against the `gemm` crate's 46-50 (interleaved, 15
    // rounds); at 16 columns the crate is ahead (85 against 74).
    #[cfg(target_arch = "x86_64")]
    if n <= NARROW_MAX_AVX2 && a.cs == 1 && b.rs == 1 && super::simd::level() == 2 && super::ab_flags() & super::AB_GEMM_CRATE_NARROW == 0 {
        // SAFETY: AVX2 and FMA are present (level 2); the views were bounds-checked when built,
        // and the destination does not alias them.
        unsafe { narrow_nt_avx2(dst, a, b, alpha, acc) };
        return;
    }
    if super::ab_flags() & super::AB_GEMM_CRATE_SPLIT != 0 {
        // The earlier rule: the `gemm` crate's own rayon split, narrow outputs on one thread.
        let skinny = m.min(n).min(k) < 64 || (n < 256 && m >= 64);
        let big = !skinny && (m * n * k >= PAR_MIN_WORK || n * k >= PAR_MIN_WEIGHT) || (m < 64 && n * k >= PAR_MIN_WEIGHT && n.min(k) >= 64);
        let par = if threads > 1 && big { Parallelism::Rayon(threads) } else { Parallelism::None };
        // SAFETY: as in `gemm_seq`'s contract: bounds checked when the views were built.
        unsafe { gemm_seq(dst.ptr, dst.ld, a, b, alpha, acc, par) };
        return;
    }
    // A smaller skinny product (a LoRA rank-r side: m, n or k below 64) runs on one thread: the
    // `gemm` crate's own split costs more than it gains there (benches/README.md: rank-8 shapes
    // run at 24-58 GFLOP/s on two threads against 43-156 on one). Few rows against a large weight are memory-bound and
    // are split whatever their count, so that both cores stream the weight.
    let skinny = m.min(n).min(k) < 64;
    let big = m * n * k >= PAR_MIN_WORK || n * k >= PAR_MIN_WEIGHT;
    if threads < 2 || skinny && !(m < 64 && n * k >= PAR_MIN_WEIGHT && n.min(k) >= 64) || !big {
        // SAFETY: bounds checked when the views were built.
        unsafe { gemm_seq(dst.ptr, dst.ld, a, b, alpha, acc, Parallelism::None) };
        return;
    }
    // Threaded: the product is cut into one block per thread along the longer of its row and
    // column dimensions, and each block runs single-threaded. On SmolLM2's training shapes with
    // 2 threads this reaches 310-390 GFLOP/s where the `gemm` crate's own rayon split reaches
    // 270-350 (and 190 for the n = 192 k/v projections, which it did not speed up at all).
    split_blocks(dst, a, b, alpha, acc, threads.min(m.max(n) / 32).max(1), |d, a, b, alpha, acc| {
        // SAFETY: `d` is the block's own destination region; bounds checked when built.
        unsafe { gemm_seq(d.ptr, d.ld, a, b, alpha, acc, Parallelism::None) }
    });
}

/// `dst = (acc ? dst : 0) + alpha · a · b` cut along the longer of its row and column
/// dimensions into `blocks` blocks (of a multiple of 16 rows or columns), run in parallel on the
/// current rayon pool, each by `single` on one thread (one `gemm` crate call for large products;
/// [`gemm_f32`]'s one-thread route, the narrow kernel or one crate call, for rank-side ones).
/// Large products use one block per thread; so do rank-side ones
/// (one of `m`, `n`, `k` below 64) from [`SKINNY_PAR_MIN_WORK`] multiply-adds: they stream a
/// full-size operand or destination (`h·Bᵀ` adds into the `[T, out]` output), so two cores read
/// and write it twice as fast.
fn split_blocks(dst: &mut Dst, a: View, b: View, alpha: f32, acc: bool, blocks: usize, single: impl Fn(&mut Dst, View, View, f32, bool) + Sync) {
    let (m, n) = (a.rows, b.cols);
    let along_rows = m >= n;
    let len = if along_rows { m } else { n };
    let per = len.div_ceil(blocks).div_ceil(16) * 16;
    let (dp, dld, drows, dcols) = (SyncMut(dst.ptr), dst.ld, dst.rows, dst.cols);
    let run = |c: usize| {
        let (i0, n_i) = (c * per, per.min(len - c * per));
        // SAFETY: block `c` covers rows (or columns) i0 .. i0 + n_i of the destination, which no
        // other block writes; the operand views are sub-views of bounds-checked views.
        let mut whole = unsafe { Dst::raw(dp.get(), drows, dcols, dld) };
        if along_rows {
            single(&mut whole.rows(i0, n_i), a.rows(i0, n_i), b, alpha, acc)
        } else {
            single(&mut whole.cols(i0, n_i), a, b.cols(i0, n_i), alpha, acc)
        }
    };
    match len.div_ceil(per) {
        1 => run(0),
        nb => {
            use rayon::prelude::*;
            (0..nb).into_par_iter().for_each(run)
        }
    }
}

/// Rank-side products from this many multiply-adds run one block per thread ([`split_blocks`]).
const SKINNY_PAR_MIN_WORK: usize = 1 << 20;

/// One `gemm` crate call: `dst = (acc ? dst : 0) + alpha · a · b` with `dst` row-major at
/// `dst_ptr` (leading dimension `ld`).
///
/// # Safety
/// `dst_ptr` must point to `a.rows` rows of `b.cols` writable elements spaced `ld` apart that no
/// other thread touches during the call and that do not alias the operands.
unsafe fn gemm_seq(dst_ptr: *mut f32, ld: usize, a: View, b: View, alpha: f32, acc: bool, par: Parallelism) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    gemm::gemm(m, n, k, dst_ptr, 1, ld as isize, acc, a.ptr, a.cs, a.rs, b.ptr, b.cs, b.rs, 1.0f32, alpha, false, false, false, par)
}

/// Output widths up to this use [`narrow_nt_avx512`] for `x·Wᵀ` products on AVX-512 CPUs.
const NARROW_MAX: usize = 32;

/// Output widths up to this use [`narrow_nt_avx2`] for `x·Wᵀ` products on AVX2 CPUs.
const NARROW_MAX_AVX2: usize = 8;

/// `dst = (acc ? dst : 0) + alpha · a · Wᵀ` for a narrow output (`n ≤ NARROW_MAX`): `b = Wᵀ` with
/// `W` `[n, k]` in rows of unit stride, `a` `[m, k]` in rows of unit stride. Two rows of `a`
/// against eight rows of `W` at a time: sixteen AVX-512 accumulators, each `a` element loaded
/// once per eight rows of `W` (which stay in L1: 8 × k floats), fused multiply-adds, one
/// horizontal sum per output. Single-threaded; [`gemm_f32`] hands it
/// one block of rows per thread from 2^20 multiply-adds ([`split_blocks`]).
///
/// # Safety
/// The CPU must support AVX-512F; the views must be in bounds and not alias `dst`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn narrow_nt_avx512(dst: &mut Dst, a: View, b: View, alpha: f32, acc: bool) {
    use std::arch::x86_64::*;
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let (ald, wld) = (a.rs as usize, b.cs as usize);
    let tail = k % 16;
    let full = k - tail;
    let mask: __mmask16 = ((1u32 << tail) - 1) as __mmask16;
    for j0 in (0..n).step_by(8) {
        let nj = (n - j0).min(8);
        // Rows past the end of W repeat its first row of the group; their sums are discarded.
        let w: [*const f32; 8] = std::array::from_fn(|j| b.ptr.add((j0 + if j < nj { j } else { 0 }) * wld));
        let mut i = 0;
        while i < m {
            let two = i + 1 < m;
            let x0 = a.ptr.add(i * ald);
            let x1 = if two { a.ptr.add((i + 1) * ald) } else { x0 };
            let mut s0 = [_mm512_setzero_ps(); 8];
            let mut s1 = [_mm512_setzero_ps(); 8];
            let mut l = 0;
            while l < full {
                let v0 = _mm512_loadu_ps(x0.add(l));
                let v1 = _mm512_loadu_ps(x1.add(l));
                for j in 0..8 {
                    let wv = _mm512_loadu_ps(w[j].add(l));
                    s0[j] = _mm512_fmadd_ps(v0, wv, s0[j]);
                    s1[j] = _mm512_fmadd_ps(v1, wv, s1[j]);
                }
                l += 16;
            }
            if tail > 0 {
                let v0 = _mm512_maskz_loadu_ps(mask, x0.add(l));
                let v1 = _mm512_maskz_loadu_ps(mask, x1.add(l));
                for j in 0..8 {
                    let wv = _mm512_maskz_loadu_ps(mask, w[j].add(l));
                    s0[j] = _mm512_fmadd_ps(v0, wv, s0[j]);
                    s1[j] = _mm512_fmadd_ps(v1, wv, s1[j]);
                }
            }
            for (r, s) in [(i, &s0), (i + 1, &s1)] {
                if r >= m {
                    break;
                }
                let out = dst.ptr.add(r * dst.ld + j0);
                for (j, v) in s.iter().take(nj).enumerate() {
                    let y = alpha * _mm512_reduce_add_ps(*v);
                    *out.add(j) = if acc { *out.add(j) + y } else { y };
                }
            }
            i += 2;
        }
    }
}

/// [`narrow_nt_avx512`] for AVX2 + FMA: three rows of `a` against four rows of `W` at a time
/// (twelve 8-lane accumulators; each `a` vector loaded once per four rows of `W`, each `W`
/// vector once per three rows of `a`), the `k % 8` tail through masked loads, one horizontal
/// sum per output.
///
/// # Safety
/// The CPU must support AVX2 and FMA; the views must be in bounds and not alias `dst`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn narrow_nt_avx2(dst: &mut Dst, a: View, b: View, alpha: f32, acc: bool) {
    use std::arch::x86_64::*;
    const R: usize = 3;
    const J: usize = 4;
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let (ald, wld) = (a.rs as usize, b.cs as usize);
    let tail = k % 8;
    let full = k - tail;
    let lanes: [i32; 8] = std::array::from_fn(|i| if i < tail { -1 } else { 0 });
    let mask = _mm256_loadu_si256(lanes.as_ptr() as *const __m256i);
    let hsum = |v: __m256| {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    };
    for j0 in (0..n).step_by(J) {
        let nj = (n - j0).min(J);
        // Rows past the end of W repeat its first row of the group (and rows past the end of
        // `a` its first row of the group); their sums are discarded.
        let w: [*const f32; J] = std::array::from_fn(|j| b.ptr.add((j0 + if j < nj { j } else { 0 }) * wld));
        let mut i = 0;
        while i < m {
            let x: [*const f32; R] = std::array::from_fn(|r| a.ptr.add(if i + r < m { i + r } else { i } * ald));
            let mut s = [[_mm256_setzero_ps(); J]; R];
            let mut l = 0;
            while l < full {
                let v: [__m256; R] = std::array::from_fn(|r| _mm256_loadu_ps(x[r].add(l)));
                for j in 0..J {
                    let wv = _mm256_loadu_ps(w[j].add(l));
                    for r in 0..R {
                        s[r][j] = _mm256_fmadd_ps(v[r], wv, s[r][j]);
                    }
                }
                l += 8;
            }
            if tail > 0 {
                let v: [__m256; R] = std::array::from_fn(|r| _mm256_maskload_ps(x[r].add(l), mask));
                for j in 0..J {
                    let wv = _mm256_maskload_ps(w[j].add(l), mask);
                    for r in 0..R {
                        s[r][j] = _mm256_fmadd_ps(v[r], wv, s[r][j]);
                    }
                }
            }
            for (r, sr) in s.iter().enumerate().take(m - i) {
                let out = dst.ptr.add((i + r) * dst.ld + j0);
                for (j, v) in sr.iter().take(nj).enumerate() {
                    let y = alpha * hsum(*v);
                    *out.add(j) = if acc { *out.add(j) + y } else { y };
                }
            }
            i += R;
        }
    }
}

/// Row counts up to this use [`gemv_nt`] for `x·Wᵀ` products.
const GEMV_MAX_ROWS: usize = 4;

/// `dst = (acc ? dst : 0) + alpha · a · b` for `m ≤ GEMV_MAX_ROWS` rows of `a` (unit column
/// stride) and `b = Wᵀ` with `W` `[n, k]` in rows of unit stride: each output `(i, j)` is a dot
/// product of row `i` of `a` with row `j` of `W`. The product is bound by reading `W` once
/// (decoding); `W`'s rows are split into chunks over the current rayon pool when it is large, so
/// both cores stream. The `gemm` crate pays more per call here (packing, its own split).
fn gemv_nt(dst: &mut Dst, a: View, b: View, alpha: f32, acc: bool, threads: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let (wp, wld) = (SyncPtr(b.ptr), b.cs as usize);
    let (ap, ald) = (SyncPtr(a.ptr), a.rs as usize);
    let (dp, dld) = (SyncMut(dst.ptr), dst.ld);
    let run = |j0: usize, j1: usize| {
        // SAFETY: the views were bounds-checked when built: rows j0..j1 of W (`k` elements each,
        // leading dimension `wld`), the `m` rows of `a`, and columns j0..j1 of the destination
        // rows, which no other chunk writes.
        unsafe {
            let x = |i: usize| std::slice::from_raw_parts(ap.get().add(i * ald), k);
            let w = std::slice::from_raw_parts(wp.get().add(j0 * wld), (j1 - j0 - 1) * wld + k);
            // (fixed arrays, no allocation per call: decoding makes hundreds of these per token)
            let mut ys: [&mut [f32]; GEMV_MAX_ROWS] = std::array::from_fn(|i| if i < m { std::slice::from_raw_parts_mut(dp.get().add(i * dld + j0), j1 - j0) } else { &mut [] });
            let xs: [&[f32]; GEMV_MAX_ROWS] = std::array::from_fn(|i| if i < m { x(i) } else { &[] });
            gemv_block(w, wld, k, &xs[..m], &mut ys[..m], alpha, acc);
        }
    };
    let chunks = if threads > 1 && n * k >= PAR_MIN_WEIGHT { (threads * 4).min(n / 16).max(1) } else { 1 };
    if chunks == 1 {
        run(0, n);
        return;
    }
    // Chunks of whole groups of 4 rows, balanced.
    let per = n.div_ceil(chunks).div_ceil(4) * 4;
    use rayon::prelude::*;
    (0..n.div_ceil(per)).into_par_iter().for_each(|c| run(c * per, ((c + 1) * per).min(n)));
}

/// `ys[i][j] = (acc ? ys[i][j] : 0) + alpha·Σ_c w[j·ld + c]·xs[i][c]` for up to
/// [`GEMV_MAX_ROWS`] rows `xs` (each at least `k` long) against the rows of `w` (`ys[i].len()`
/// rows of `k` elements, leading dimension `ld`): the block kernel of [`gemv_nt`], also used
/// by the quantized products' LoRA epilogue (`engine::quant::matmul_t_multi`), so that a
/// 16-row-aligned block of `W` gives the same numbers as the whole product.
///
/// Panics if `xs` holds more than [`GEMV_MAX_ROWS`] rows or fewer than `ys`, or `w` is short.
pub(crate) fn gemv_block(w: &[f32], ld: usize, k: usize, xs: &[&[f32]], ys: &mut [&mut [f32]], alpha: f32, acc: bool) {
    let m = ys.len();
    assert!(m <= GEMV_MAX_ROWS && xs.len() >= m && xs.iter().all(|x| x.len() >= k));
    let n = ys.first().map_or(0, |y| y.len());
    if n == 0 || m == 0 {
        return;
    }
    assert!(ys.iter().all(|y| y.len() == n) && w.len() >= (n - 1) * ld + k, "gemv_block: short operands");
    // Rows of 8 or 16 (the `B` side of a rank-8 / rank-16 LoRA, `h·Bᵀ`): dot products
    // across 16 rows at once (see `short_rows_avx512`), where one row at a time leaves
    // most of a vector empty.
    #[cfg(target_arch = "x86_64")]
    if (k == 8 || k == 16) && ld == k && super::simd::level() >= 3 && super::ab_flags() & super::AB_GEMM_CRATE_GEMV == 0 {
        for (x, y) in xs.iter().zip(ys.iter_mut()) {
            // SAFETY: AVX-512F is present (level 3); `w` holds n rows of k, `x` at least k.
            unsafe { short_rows_avx512(w, k, x, y, alpha, acc) };
        }
        return;
    }
    super::simd::gemv_rows(w, ld, k, &xs[..m], ys, alpha, acc)
}

/// `y[j] = (acc ? y[j] : 0) + alpha·Σ_c w[j·k + c]·x[c]` for contiguous rows of `k` = 8 or 16
/// elements: 16 rows at a time, their products held two rows per vector (`k` = 16: one row,
/// folded to two half-rows first), then summed per row by three rounds of lane permutes and
/// adds (8 lanes → 4 → 2 → 1), which leaves the 16 row sums in row order in one vector. Rows
/// past the last multiple of 16 are summed one at a time.
///
/// # Safety
/// AVX-512F; `w` holds `y.len()` rows of `k` elements, `x` at least `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn short_rows_avx512(w: &[f32], k: usize, x: &[f32], y: &mut [f32], alpha: f32, acc: bool) {
    use std::arch::x86_64::*;
    debug_assert!((k == 8 || k == 16) && x.len() >= k && w.len() >= y.len() * k);
    let n = y.len();
    let idx = |v: [i32; 16]| _mm512_loadu_si512(v.as_ptr() as *const __m512i);
    // Round 1: groups of 8 lanes → 4; round 2: 4 → 2; round 3: 2 → 1 (each index vector picks
    // the first half of every group from both inputs, +offset the second half).
    let r1 = idx([0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]);
    let r2 = idx([0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29]);
    let r3 = idx([0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30]);
    // k = 16: lanes 0..8 and 8..16 of two rows' products → [row a half sums | row b half sums].
    let r0 = idx([0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23]);
    let fold = |a: __m512, b: __m512, ix: __m512i, off: i32| _mm512_add_ps(_mm512_permutex2var_ps(a, ix, b), _mm512_permutex2var_ps(a, _mm512_add_epi32(ix, _mm512_set1_epi32(off)), b));
    let xv = if k == 8 {
        let h = _mm256_loadu_ps(x.as_ptr());
        _mm512_insertf32x8::<1>(_mm512_castps256_ps512(h), h)
    } else {
        _mm512_loadu_ps(x.as_ptr())
    };
    let mut j = 0;
    while j + 16 <= n {
        let base = w.as_ptr().add(j * k);
        let mut p = [_mm512_setzero_ps(); 8];
        for (i, pi) in p.iter_mut().enumerate() {
            *pi = if k == 8 {
                _mm512_mul_ps(_mm512_loadu_ps(base.add(16 * i)), xv)
            } else {
                let a = _mm512_mul_ps(_mm512_loadu_ps(base.add(32 * i)), xv);
                let b = _mm512_mul_ps(_mm512_loadu_ps(base.add(32 * i + 16)), xv);
                fold(a, b, r0, 8)
            };
        }
        let q = [fold(p[0], p[1], r1, 4), fold(p[2], p[3], r1, 4), fold(p[4], p[5], r1, 4), fold(p[6], p[7], r1, 4)];
        let h = [fold(q[0], q[1], r2, 2), fold(q[2], q[3], r2, 2)];
        let z = _mm512_mul_ps(fold(h[0], h[1], r3, 1), _mm512_set1_ps(alpha));
        let out = y.as_mut_ptr().add(j);
        _mm512_storeu_ps(out, if acc { _mm512_add_ps(_mm512_loadu_ps(out), z) } else { z });
        j += 16;
    }
    for (jj, o) in y.iter_mut().enumerate().skip(j) {
        let s: f32 = w[jj * k..jj * k + k].iter().zip(x).map(|(a, b)| a * b).sum();
        *o = if acc { *o + alpha * s } else { alpha * s };
    }
}

/// Raw operand pointers for [`gemv_nt`]'s tasks.
#[derive(Clone, Copy)]
struct SyncPtr(*const f32);
// SAFETY: only read, see `gemv_nt`.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn get(self) -> *const f32 {
        self.0
    }
}
#[derive(Clone, Copy)]
pub(crate) struct SyncMut(pub(crate) *mut f32);
// SAFETY: each task writes disjoint columns, see `gemv_nt` and `amx::gemm`.
unsafe impl Send for SyncMut {}
unsafe impl Sync for SyncMut {}
impl SyncMut {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn strided_products_match_naive() {
        let (m, k, n) = (37, 19, 23);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 17) as f32 - 8.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let want = naive(&a, &b, m, k, n);
        let mut c = vec![1f32; m * n];
        gemm(&mut Dst::of(&mut c, m, n), View::of(&a, m, k), View::of(&b, k, n), 1.0, false, 2);
        assert_eq!(c, want);
        // accumulate with alpha, transposed operand
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect(); // [n, k]
        gemm(&mut Dst::of(&mut c, m, n), View::of(&a, m, k), View::of(&bt, n, k).t(), 0.5, true, 1);
        for (x, w) in c.iter().zip(&want) {
            assert_eq!(*x, 1.5 * w);
        }
        // a column block of a wider destination
        let mut wide = vec![0f32; m * (n + 5)];
        gemm(&mut Dst::rm(&mut wide, 0, m, n + 5, n + 5).cols(5, n), View::of(&a, m, k), View::of(&b, k, n), 1.0, false, 1);
        assert_eq!(wide[5..5 + n], want[..n]);
    }

    #[test]
    fn split_rank_side_products_match_one_thread() {
        // The LoRA rank sides large enough for `split_blocks`: x·Aᵀ (narrow output), h·Bᵀ
        // (k = 8, accumulated into a wider destination's column block), hᵀ·gy and tmpᵀ·x
        // (8 rows, split by columns); each equals the one-thread route bit for bit.
        for (m, k, n, nt) in [(512, 576, 8, true), (512, 1536, 8, true), (512, 8, 1536, true), (8, 512, 1536, false), (8, 512, 576, false), (333, 8, 1000, true)] {
            assert!(m * n * k >= SKINNY_PAR_MIN_WORK);
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 17) as f32 * 0.25 - 2.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 7) % 13) as f32 * 0.5 - 3.0).collect();
            // b = Wᵀ ([k, n] as a view of the row-major [n, k]) for x·Wᵀ, else b = W as [k, n].
            let b = |w: &[f32]| if nt { View::of(w, n, k).t() } else { View::of(w, k, n) };
            let bk: Vec<f32> = if nt { (0..k * n).map(|i| w[(i % n) * k + i / n]).collect() } else { w.clone() };
            let want = naive(&a, &bk, m, k, n);
            let (ld, off) = (n + 7, 3);
            let mut one = vec![0.5f32; m * ld];
            let mut two = one.clone();
            gemm(&mut Dst::rm(&mut one, 0, m, ld, ld).cols(off, n), View::of(&a, m, k), b(&w), 0.5, true, 1);
            gemm(&mut Dst::rm(&mut two, 0, m, ld, ld).cols(off, n), View::of(&a, m, k), b(&w), 0.5, true, 2);
            assert_eq!(one, two, "[{m}x{k}]·[{k}x{n}]");
            for i in 0..m {
                for j in 0..ld {
                    let got = two[i * ld + j];
                    let exp = if (off..off + n).contains(&j) { 0.5 + 0.5 * want[i * n + j - off] } else { 0.5 };
                    assert!((got - exp).abs() <= 1e-4 * exp.abs().max(1.0), "[{m}x{k}]·[{k}x{n}] at ({i},{j}): {got} vs {exp}");
                }
            }
        }
    }

    #[test]
    fn few_row_products_match_naive() {
        // x·Wᵀ with 1..=4 rows (the decoding kernel), odd sizes, a strided W, alpha and acc.
        for (m, k, n) in [(1, 37, 23), (2, 576, 70), (3, 5, 9), (4, 64, 1300), (1, 600, 300)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 17) as f32 * 0.25 - 2.0).collect();
            let ld = k + 3;
            let w: Vec<f32> = (0..n * ld).map(|i| ((i * 7) % 13) as f32 * 0.5 - 3.0).collect();
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * ld + i / n]).collect(); // [k, n]
            let want = naive(&a, &wt, m, k, n);
            let mut c = vec![1f32; m * n];
            gemm(&mut Dst::of(&mut c, m, n), View::of(&a, m, k), View::rm(&w, 0, n, k, ld).t(), 2.0, true, 2);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - (1.0 + 2.0 * y)).abs() <= 1e-4 * y.abs().max(1.0), "[{m}x{k}]x[{k}x{n}]: {x} vs {}", 1.0 + 2.0 * y);
            }
            gemm(&mut Dst::of(&mut c, m, n), View::of(&a, m, k), View::rm(&w, 0, n, k, ld).t(), 1.0, false, 1);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0));
            }
        }
    }

    #[test]
    fn short_row_products_match_naive() {
        // h·Bᵀ for a rank-8 / rank-16 LoRA B [n, r] (contiguous rows of 8 or 16) with 1..=4 rows
        // of h: the 16-rows-at-once kernel, with a tail of n % 16 rows, alpha and acc.
        for (m, k, n) in [(1, 8, 576), (2, 8, 37), (4, 16, 1536), (3, 16, 21), (1, 8, 5)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 17) as f32 * 0.25 - 2.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 7) % 13) as f32 * 0.5 - 3.0).collect();
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect(); // [k, n]
            let want = naive(&a, &wt, m, k, n);
            let mut c = vec![1f32; m * n];
            gemm(&mut Dst::of(&mut c, m, n), View::of(&a, m, k), View::of(&w, n, k).t(), 2.0, true, 2);
            for (i, (x, y)) in c.iter().zip(&want).enumerate() {
                assert!((x - (1.0 + 2.0 * y)).abs() <= 1e-5 * y.abs().max(1.0), "[{m}x{k}]x[{k}x{n}] at {i}: {x} vs {}", 1.0 + 2.0 * y);
            }
            gemm(&mut Dst::of(&mut c, m, n), View::of(&a, m, k), View::of(&w, n, k).t(), 1.0, false, 1);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0));
            }
        }
    }

    #[test]
    fn threaded_block_split_matches_one_thread() {
        // Products large enough to be cut into one block per thread: along the rows (m ≥ n), along
        // the columns (n > m), few rows against a large weight, uneven block sizes, a strided
        // destination, alpha and accumulation. Each block is the same single-threaded product
        // over a sub-view, so the result equals the one-thread product exactly.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (m, k, n) in [(301, 96, 70), (70, 96, 517), (9, 300, 700), (128, 64, 128)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 17) as f32 * 0.25 - 2.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 7) % 13) as f32 * 0.5 - 3.0).collect(); // [n, k]
            let ld = n + 3;
            let mut one = vec![0.5f32; m * ld];
            gemm(&mut Dst::rm(&mut one, 0, m, n, ld), View::of(&a, m, k), View::of(&w, n, k).t(), 0.75, true, 1);
            for threads in [2, 3] {
                let mut par = vec![0.5f32; m * ld];
                pool.install(|| gemm(&mut Dst::rm(&mut par, 0, m, n, ld), View::of(&a, m, k), View::of(&w, n, k).t(), 0.75, true, threads));
                assert_eq!(par, one, "[{m}x{k}]x[{k}x{n}] on {threads} threads");
            }
            let want = naive(&a, &(0..k * n).map(|i| w[(i % n) * k + i / n]).collect::<Vec<_>>(), m, k, n);
            for i in 0..m {
                for j in 0..n {
                    let (x, y) = (one[i * ld + j], 0.5 + 0.75 * want[i * n + j]);
                    assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "[{m}x{k}]x[{k}x{n}] ({i},{j}): {x} vs {y}");
                }
                assert_eq!(one[i * ld + n..(i + 1) * ld], [0.5f32; 3], "padding columns untouched");
            }
        }
    }

    #[test]
    fn narrow_products_match_naive() {
        // x·Wᵀ with an output of at most 32 columns (LoRA rank sides): odd row counts, k with and
        // without a 16-wide tail, widths below, at and above one group of 8, strided operands,
        // alpha and accumulation; on AVX-512 and AVX2 CPUs through the dot-product kernels.
        for (m, k, n) in [(7, 37, 8), (512, 576, 8), (33, 16, 13), (5, 100, 32), (64, 8, 3), (9, 1536, 17)] {
            let (ald, wld) = (k + 5, k + 2);
            let a: Vec<f32> = (0..m * ald).map(|i| ((i * 31) % 17) as f32 * 0.25 - 2.0).collect();
            let w: Vec<f32> = (0..n * wld).map(|i| ((i * 7) % 13) as f32 * 0.5 - 3.0).collect();
            let ac: Vec<f32> = (0..m * k).map(|i| a[(i / k) * ald + i % k]).collect();
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * wld + i / n]).collect(); // [k, n]
            let want = naive(&ac, &wt, m, k, n);
            let mut c = vec![1f32; m * n];
            gemm(&mut Dst::of(&mut c, m, n), View::rm(&a, 0, m, k, ald), View::rm(&w, 0, n, k, wld).t(), 2.0, true, 2);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - (1.0 + 2.0 * y)).abs() <= 1e-4 * y.abs().max(1.0), "[{m}x{k}]x[{k}x{n}]: {x} vs {}", 1.0 + 2.0 * y);
            }
            gemm(&mut Dst::of(&mut c, m, n), View::rm(&a, 0, m, k, ald), View::rm(&w, 0, n, k, wld).t(), 1.0, false, 1);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "[{m}x{k}]x[{k}x{n}]: {x} vs {y}");
            }
            // The AVX2 kernel itself, also on CPUs where `gemm` picks the AVX-512 one.
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                let mut c = vec![1f32; m * n];
                // SAFETY: AVX2 and FMA checked; views in bounds; `c` is its own buffer.
                unsafe { narrow_nt_avx2(&mut Dst::of(&mut c, m, n), View::rm(&a, 0, m, k, ald), View::rm(&w, 0, n, k, wld).t(), -0.5, true) };
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - (1.0 - 0.5 * y)).abs() <= 1e-4 * y.abs().max(1.0), "avx2 [{m}x{k}]x[{k}x{n}]: {x} vs {}", 1.0 - 0.5 * y);
                }
            }
        }
    }
}
