//! `f32` matrix products on Intel AMX (Advanced Matrix Extensions, Sapphire Rapids and later)
//! in reduced internal precision, selected as PyTorch selects it with
//! `torch.set_float32_matmul_precision` ([`set_float32_matmul_precision`]):
//!
//! * `"highest"` (the default): every product in `f32` ([`super::gemm`]'s kernels); nothing here
//!   runs.
//! * `"high"`: each `f32` operand is split into two bfloat16 numbers, `x = hi + lo` with
//!   `hi = bf16(x)`, `lo = bf16(x − hi)` (about 16 significant bits), and the product is
//!   `A_hi·B_hi + A_hi·B_lo + A_lo·B_hi` accumulated in `f32` by the AMX `TDPBF16PS` tile
//!   instruction (the "bf16x3" scheme PyTorch's documentation names for `"high"`; the dropped
//!   `A_lo·B_lo` term and the rounding of `lo` leave a relative error of about 2⁻¹⁶ per product
//!   term, against 2⁻²⁴ in `f32`).
//! * `"medium"`: one bfloat16 pass, `A_hi·B_hi` (8 significant bits per operand, relative error
//!   about 2⁻⁸ per term; accumulation stays `f32`).
//!
//! The three terms are one product over a three times longer inner dimension: `A' = [A_hi |
//! A_hi | A_lo]` (`[m, 3k]`) times `B' = [B_hi; B_lo; B_hi]` (`[3k, n]`), so one kernel serves
//! both precisions. `B'` is packed in AMX's pair-interleaved ("VNNI") layout, 16 columns per
//! panel; the kernel holds a 32 × 32 block of the output in four 16 × 16 `f32` tiles and steps
//! through the inner dimension 32 at a time (two tiles of `A'`, two of `B'`, four `TDPBF16PS`).
//!
//! Only large products come here (see [`super::gemm::gemm`]): the operands are converted and
//! packed on every call, which costs `O(mk + kn)` against the product's `O(mkn)`.
//!
//! The CPU must report AMX-TILE and AMX-BF16 (`cpuid` leaf 7) and Linux must grant the process
//! the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, kernel 5.16 or
//! later); otherwise [`available`] is false and every product stays in `f32`.

use super::gemm::{Dst, View};
use std::sync::atomic::{AtomicU8, Ordering};

/// Internal precision of `f32` matrix products (PyTorch's `float32_matmul_precision` values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// `f32` throughout (the default).
    Highest,
    /// bf16x3 on AMX: about 16 significant bits per operand, `f32` accumulation.
    High,
    /// One bf16 pass on AMX: 8 significant bits per operand, `f32` accumulation.
    Medium,
}

impl MatmulPrecision {
    /// Parses PyTorch's names (`"highest"`, `"high"`, `"medium"`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "highest" => Some(Self::Highest),
            "high" => Some(Self::High),
            "medium" => Some(Self::Medium),
            _ => None,
        }
    }

    /// PyTorch's name of the precision.
    pub fn name(self) -> &'static str {
        match self {
            Self::Highest => "highest",
            Self::High => "high",
            Self::Medium => "medium",
        }
    }
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Sets the internal precision of the engine's large `f32` products for the whole process (as
/// `torch.set_float32_matmul_precision`). `High` and `Medium` take effect only where
/// [`available`] is true; elsewhere products stay `f32`.
pub fn set_float32_matmul_precision(p: MatmulPrecision) {
    PRECISION.store(p as u8, Ordering::Relaxed);
}

/// The precision set by [`set_float32_matmul_precision`] (`Highest` unless set).
pub fn float32_matmul_precision() -> MatmulPrecision {
    match PRECISION.load(Ordering::Relaxed) {
        1 => MatmulPrecision::High,
        2 => MatmulPrecision::Medium,
        _ => MatmulPrecision::Highest,
    }
}

/// The number of bf16 passes the current setting asks for where AMX is present: 0 (f32), 3
/// (bf16x3) or 1 (bf16). The A/B switches of [`super::set_ab_flags`] override the setting.
pub(crate) fn passes() -> usize {
    let ab = super::ab_flags();
    let p = if ab & super::AB_MATMUL_HIGH != 0 {
        MatmulPrecision::High
    } else if ab & super::AB_MATMUL_MEDIUM != 0 {
        MatmulPrecision::Medium
    } else {
        float32_matmul_precision()
    };
    match p {
        MatmulPrecision::Highest => 0,
        _ if !available() => 0,
        MatmulPrecision::High => 3,
        MatmulPrecision::Medium => 1,
    }
}

/// Whether AMX bf16 products can run in this process (CPU support and the kernel's permission;
/// checked once).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    let l7 = std::arch::x86_64::__cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (l7.edx & (1 << 22) != 0, l7.edx & (1 << 24) != 0);
    if !(amx_bf16 && amx_tile && std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw")) {
        return false;
    }
    // arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18): 0 when granted.
    let r: i64;
    // SAFETY: a plain system call with integer arguments; it changes only the process's
    // permission to use the AMX tile state.
    unsafe {
        std::arch::asm!("syscall", inlateout("rax") 158i64 => r, in("rdi") 0x1023i64, in("rsi") 18i64,
            lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    r == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// `x` split into (`hi`, `lo`) bfloat16 halves (the bits): `hi = bf16(x)`, `lo = bf16(x − hi)`,
/// rounded to nearest even by the `half` crate (a NaN stays a NaN, quiet); `lo` is zero where
/// `hi` is infinite or NaN.
#[inline(always)]
fn split(x: f32) -> (u16, u16) {
    let hi = half::bf16::from_f32(x);
    let h = hi.to_f32();
    (hi.to_bits(), if h.is_finite() { half::bf16::from_f32(x - h).to_bits() } else { 0 })
}

/// The tile configuration: eight tiles of 16 rows × 64 bytes (16 × 16 `f32` or 16 × 32 bf16).
#[repr(C, align(64))]
struct TileCfg {
    palette: u8,
    start_row: u8,
    _reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// `dst = (acc ? dst : 0) + alpha · a · b` on AMX with `passes` bf16 passes (3: bf16x3, 1:
/// bf16), split into `threads` column ranges on the current rayon pool.
///
/// The rows of `a` are taken in panels of at most [`A_PANEL_BYTES`] of converted `A'` (up to
/// 1024 rows). Per panel, `A'` is converted once (rows split over the pool) into a buffer
/// reused across calls; each task converts and packs the `B'` panels of its own 32-column
/// blocks, [`GROUP_COLS`] blocks at a time, into its own reused buffer (864 KiB for `k` = 576
/// in bf16x3), which stays in L2 while every row block of `A'` runs over it.
///
/// Panics if the shapes disagree or `passes` is neither 1 nor 3. The caller checks [`available`].
pub(crate) fn gemm(dst: &mut Dst, a: View, b: View, alpha: f32, acc: bool, threads: usize, passes: usize) {
    gemm_with(dst, a, &b, alpha, acc, threads, passes)
}

/// A right operand `B` `[k, n]` of [`gemm_with`] that converts and packs its own blocks of 32
/// columns: an `f32` [`View`], or a weight kept quantized that dequantizes the block first
/// ([`super::quant`]).
pub(crate) trait PackB: Sync {
    /// `k`.
    fn rows(&self) -> usize;
    /// `n`.
    fn cols(&self) -> usize;
    /// Columns `j0 .. j0 + 32` (zero past `n`, and past `k` up to `kp`) into `bp` in the layout
    /// of [`pack_b_block`], with `passes` bf16 segments.
    fn pack(&self, j0: usize, bp: &mut [u16], kp: usize, passes: usize);
}

impl PackB for View {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn pack(&self, j0: usize, bp: &mut [u16], kp: usize, passes: usize) {
        pack_b_block(*self, j0, bp, self.rows, kp, passes)
    }
}

/// [`gemm`] with any [`PackB`] right operand.
///
/// Panics as [`gemm`].
pub(crate) fn gemm_with<B: PackB>(dst: &mut Dst, a: View, b: &B, alpha: f32, acc: bool, threads: usize, passes: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols());
    assert!(b.rows() == k && dst.rows == m && dst.cols == n, "amx gemm shape mismatch");
    assert!(passes == 1 || passes == 3);
    assert!(available(), "AMX is not available");
    let kk = passes * k.div_ceil(32) * 32;
    let panel = (A_PANEL_BYTES / (2 * kk) / 32 * 32).clamp(32, 1024);
    let mut r0 = 0;
    while r0 < m {
        let mr = panel.min(m - r0);
        gemm_panel(&mut dst.rows(r0, mr), a.rows(r0, mr), b, alpha, acc, threads, passes);
        r0 += mr;
    }
}

/// Converted `A'` per row panel at most (8 MiB): bounds the buffer each thread keeps.
const A_PANEL_BYTES: usize = 8 << 20;

/// [`gemm`] for one row panel.
fn gemm_panel<B: PackB>(dst: &mut Dst, a: View, b: &B, alpha: f32, acc: bool, threads: usize, passes: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols());
    let kp = k.div_ceil(32) * 32;
    let kk = passes * kp; // inner dimension of A'·B'
    let mp = m.div_ceil(32) * 32;
    let blocks = n.div_ceil(32);
    let chunks = threads.max(1).min(blocks);
    let per = blocks.div_ceil(chunks);
    let chunks = blocks.div_ceil(per); // no empty chunk
    let (dp, ld) = (super::gemm::SyncMut(dst.ptr_mut()), dst.ld());
    // The buffer is taken out of its slot for the call (and put back after): a rayon wait below
    // may run another product on this thread, which then finds the slot empty and uses its own.
    let mut abuf = A_BUF.with(|c| std::mem::take(&mut *c.borrow_mut()));
    let ap = abuf.get(mp * kk);
    {
        use rayon::prelude::*;
        let rows_per = if chunks > 1 { mp.div_ceil(chunks) } else { mp };
        let pack = |(c, part): (usize, &mut [u16])| {
            for (r, row) in part.chunks_exact_mut(kk).enumerate() {
                let i = c * rows_per + r;
                if i < m {
                    pack_a_row(a, i, row, k, kp, passes);
                } else {
                    row.fill(0);
                }
            }
        };
        if chunks > 1 {
            ap.par_chunks_mut(rows_per * kk).enumerate().for_each(pack);
        } else {
            pack((0, ap));
        }
    }
    let ap = &ap[..];
    let run = |c: usize| {
        let mut bbuf = B_BUF.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let bp = bbuf.get(GROUP_COLS * 32 * kk);
        let (c0, c1) = (c * per, ((c + 1) * per).min(blocks));
        // SAFETY: AMX is available (asserted in `gemm`) and this thread's tiles are configured
        // before use (nothing below yields to rayon, so no other product runs on this thread
        // meanwhile); the column blocks of chunk `c` belong to it alone; the packed operands hold
        // mp × kk and GROUP_COLS × 32 × kk elements, which every tile load stays in.
        unsafe {
            let _cfg = Tiles::configure();
            for g in (c0..c1).step_by(GROUP_COLS) {
                let ge = (g + GROUP_COLS).min(c1);
                for blk in g..ge {
                    b.pack(blk * 32, &mut bp[(blk - g) * 32 * kk..], kp, passes);
                }
                for ib0 in (0..mp / 32).step_by(GROUP_ROWS) {
                    let ib1 = (ib0 + GROUP_ROWS).min(mp / 32);
                    for blk in g..ge {
                        kernel(ap, &bp[(blk - g) * 32 * kk..], kk, ib0..ib1, blk, dp.get(), ld, m, n, alpha, acc);
                    }
                }
            }
        }
        B_BUF.with(|s| s.borrow_mut().keep_larger(bbuf));
    };
    if chunks <= 1 {
        run(0);
    } else {
        use rayon::prelude::*;
        (0..chunks).into_par_iter().for_each(run);
    }
    A_BUF.with(|s| s.borrow_mut().keep_larger(abuf));
}

/// A 64-byte aligned line of 32 bfloat16: tile rows that straddle two cache lines load about
/// six times slower (measured: 14.6 against 2.3 ns per 1 KiB tile).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

/// A reusable, 64-byte aligned buffer of bfloat16.
#[derive(Default)]
struct Buf(Vec<Line>);

impl Buf {
    /// Puts `other` in this slot if it is the larger buffer.
    fn keep_larger(&mut self, other: Buf) {
        if other.0.len() > self.0.len() {
            *self = other;
        }
    }

    /// The first `len` elements (`len` a multiple of 32), grown as needed, contents unspecified.
    fn get(&mut self, len: usize) -> &mut [u16] {
        debug_assert!(len.is_multiple_of(32));
        if self.0.len() < len / 32 {
            self.0.resize(len / 32, Line([0; 32]));
        }
        // SAFETY: `Line` is 32 plain u16 without padding; the vector holds at least len / 32.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u16, len) }
    }
}

/// Column blocks (of 32) whose `B'` panels are packed together: 256 columns, 864 KiB at
/// `k` = 576 in bf16x3, which stay in L2 while every row group runs over them.
const GROUP_COLS: usize = 8;
/// Row blocks (of 32) run over one group's panels before the next rows: 128 rows of `A'`
/// (432 KiB at `k` = 576 in bf16x3) stay in L2 while each panel is reused four times. Tile loads
/// measured here: 2.5 ns from L1, 6 ns from L2, 35 ns beyond, against 4.4 ns per `TDPBF16PS`.
const GROUP_ROWS: usize = 4;

thread_local! {
    /// `A'` of the products started on this thread (grown as needed, never shrunk).
    static A_BUF: std::cell::RefCell<Buf> = const { std::cell::RefCell::new(Buf(Vec::new())) };
    /// The packed `B'` block of the product this thread is working on.
    static B_BUF: std::cell::RefCell<Buf> = const { std::cell::RefCell::new(Buf(Vec::new())) };
}

/// This thread's tile configuration while alive (eight tiles of 16 rows × 64 bytes); released
/// on drop.
struct Tiles;

impl Tiles {
    /// # Safety
    /// AMX must be available.
    unsafe fn configure() -> Tiles {
        let mut cfg = TileCfg { palette: 1, start_row: 0, _reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        #[cfg(target_arch = "x86_64")]
        std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileCfg, options(nostack));
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: only built by `configure`, where AMX is available.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("tilerelease", options(nostack))
        };
    }
}

/// Row `i` of `A'`: `[hi | hi | lo]` (passes 3) or `[hi]` (passes 1) of row `i` of `a`, each
/// segment `kp` long with zeros past `k`.
fn pack_a_row(a: View, i: usize, row: &mut [u16], k: usize, kp: usize, passes: usize) {
    #[cfg(target_arch = "x86_64")]
    if a.col_stride() == 1 {
        // SAFETY: AMX machines have AVX-512F/BW (checked in `detect`); row i holds k floats.
        unsafe { pack_a_row_avx512(a.row_ptr(i), row, k, kp, passes) };
        return;
    }
    row.fill(0);
    for l in 0..k {
        let (hi, lo) = split(a.at(i, l));
        row[l] = hi;
        if passes == 3 {
            row[kp + l] = hi;
            row[2 * kp + l] = lo;
        }
    }
}

/// The `B'` panels of columns `j0 .. j0 + 32` of `b` (zero past `n`) in the pair-interleaved
/// layout: panel `q` (columns `j0 + 16q ..`) is `[kk/2][16][2]`, element `(l, j)` of `B'` at
/// `q·16·kk + (l/2)·32 + (j % 16)·2 + l % 2`; segments `[hi; lo; hi]` (passes 3) or `[hi]`.
pub(crate) fn pack_b_block(b: View, j0: usize, bp: &mut [u16], k: usize, kp: usize, passes: usize) {
    let kk = passes * kp;
    let n = b.cols;
    #[cfg(target_arch = "x86_64")]
    {
        if b.row_stride() == 1 {
            // `b = Wᵀ`, W's rows (B's columns) contiguous.
            // SAFETY: AVX-512F/BW present (see `detect`); column j of b holds k floats.
            unsafe { pack_b_nt_avx512(b, j0, bp, k, kp, passes) };
            return;
        }
        if b.col_stride() == 1 {
            // SAFETY: as above; rows of b hold n floats.
            unsafe { pack_b_nn_avx512(b, j0, bp, k, kp, passes) };
            return;
        }
    }
    bp[..32 * kk].fill(0);
    let at = |l: usize, j: usize| (j / 16 * (kk / 2) + l / 2) * 32 + j % 16 * 2 + l % 2;
    for j in j0..(j0 + 32).min(n) {
        for l in 0..k {
            let (hi, lo) = split(b.at(l, j));
            bp[at(l, j - j0)] = hi;
            if passes == 3 {
                bp[at(kp + l, j - j0)] = lo;
                bp[at(2 * kp + l, j - j0)] = hi;
            }
        }
    }
}

/// 16 floats to bfloat16 (round to nearest even), and the bfloat16 of what rounding left over.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn split16(x: std::arch::x86_64::__m512) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
    use std::arch::x86_64::*;
    let round = |x: __m512| -> __m512i {
        let b = _mm512_castps_si512(x);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        _mm512_srli_epi32::<16>(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))))
    };
    // A NaN keeps its upper half with the quiet bit set (rounding could carry it into an
    // infinity or wrap it to zero); where hi is not finite, lo is zero (x − hi would be NaN).
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(_mm512_castps_si512(x)), _mm512_set1_epi32(0x40));
    let h = _mm512_mask_blend_epi32(nan, round(x), quiet);
    let hf = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h));
    let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(hf), _mm512_set1_ps(f32::INFINITY));
    let lo = _mm512_maskz_sub_ps(finite, x, hf);
    (_mm512_cvtepi32_epi16(h), _mm512_cvtepi32_epi16(round(lo)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_a_row_avx512(x: *const f32, row: &mut [u16], k: usize, kp: usize, passes: usize) {
    use std::arch::x86_64::*;
    let out = row.as_mut_ptr();
    let mut l = 0;
    while l < kp {
        let v = if l + 16 <= k {
            _mm512_loadu_ps(x.add(l))
        } else if l < k {
            _mm512_maskz_loadu_ps(((1u32 << (k - l)) - 1) as __mmask16, x.add(l))
        } else {
            _mm512_setzero_ps()
        };
        let (hi, lo) = split16(v);
        _mm256_storeu_si256(out.add(l) as *mut __m256i, hi);
        if passes == 3 {
            _mm256_storeu_si256(out.add(kp + l) as *mut __m256i, hi);
            _mm256_storeu_si256(out.add(2 * kp + l) as *mut __m256i, lo);
        }
        l += 16;
    }
}

/// [`pack_b_block`] for `b = Wᵀ` (unit row stride: column `j` of `b` is row `j` of `W`): 32
/// consecutive `l` of one column are 16 (even, odd) pairs, which is the panel's 32-bit element
/// order; 16 columns of them form a 16 × 16 block of 32-bit elements that is transposed in
/// registers into 16 pair rows of the panel (64 contiguous bytes each).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_b_nt_avx512(b: View, j0: usize, bp: &mut [u16], k: usize, kp: usize, passes: usize) {
    use std::arch::x86_64::*;
    let kk = passes * kp;
    let n = b.cols;
    let out = bp.as_mut_ptr();
    let load = |w: *const f32, l: usize| -> __m512 {
        if l + 16 <= k {
            _mm512_loadu_ps(w.add(l))
        } else if l < k {
            _mm512_maskz_loadu_ps(((1u32 << (k - l)) - 1) as __mmask16, w.add(l))
        } else {
            _mm512_setzero_ps()
        }
    };
    for q in 0..2 {
        let panel = out.add(q * 16 * kk);
        let mut l = 0;
        while l < kp {
            let mut hi = [_mm512_setzero_si512(); 16];
            let mut lo = [_mm512_setzero_si512(); 16];
            for c in 0..16 {
                let j = j0 + 16 * q + c;
                if j >= n {
                    continue;
                }
                let w = b.col_ptr(j);
                let (h0, l0) = split16(load(w, l));
                let (h1, l1) = split16(load(w, l + 16));
                hi[c] = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(h0), h1);
                lo[c] = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(l0), l1);
            }
            let p = l / 2;
            transpose16_store(&hi, panel.add(p * 32));
            if passes == 3 {
                transpose16_store(&lo, panel.add((kp + l) / 2 * 32));
                transpose16_store(&hi, panel.add((2 * kp + l) / 2 * 32));
            }
            l += 32;
        }
    }
}

/// Stores the transpose of the 16 × 16 block of 32-bit elements `r` (row `c` = `r[c]`) as 16
/// rows of 64 bytes at `out`, `out + 32`, ... (in u16 units): row `p` holds element `p` of every
/// `r[c]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16_store(r: &[std::arch::x86_64::__m512i; 16], out: *mut u16) {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // Within each 128-bit lane L, u[4i + q] now holds column 4L + q of rows 4i .. 4i + 4; gather
    // the four row groups' lanes.
    for q in 0..4 {
        let x0 = _mm512_shuffle_i32x4::<0b10_00_10_00>(u[q], u[4 + q]);
        let x1 = _mm512_shuffle_i32x4::<0b11_01_11_01>(u[q], u[4 + q]);
        let y0 = _mm512_shuffle_i32x4::<0b10_00_10_00>(u[8 + q], u[12 + q]);
        let y1 = _mm512_shuffle_i32x4::<0b11_01_11_01>(u[8 + q], u[12 + q]);
        let rows = [
            _mm512_shuffle_i32x4::<0b10_00_10_00>(x0, y0),
            _mm512_shuffle_i32x4::<0b10_00_10_00>(x1, y1),
            _mm512_shuffle_i32x4::<0b11_01_11_01>(x0, y0),
            _mm512_shuffle_i32x4::<0b11_01_11_01>(x1, y1),
        ];
        for (lane, v) in rows.into_iter().enumerate() {
            _mm512_storeu_si512(out.add((4 * lane + q) * 32) as *mut __m512i, v);
        }
    }
}

/// [`pack_b_block`] for a row-major `b` (unit column stride): rows `l` and `l + 1` of 16
/// columns interleave into one 64-byte pair row of the panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_b_nn_avx512(b: View, j0: usize, bp: &mut [u16], k: usize, kp: usize, passes: usize) {
    use std::arch::x86_64::*;
    let kk = passes * kp;
    let n = b.cols;
    let out = bp.as_mut_ptr();
    for q in 0..2 {
        let c0 = j0 + 16 * q;
        let mask: __mmask16 = if c0 >= n { 0 } else if c0 + 16 <= n { 0xffff } else { ((1u32 << (n - c0)) - 1) as __mmask16 };
        let panel = out.add(q * 16 * kk);
        let load = |l: usize| -> __m512 { if l < k && mask != 0 { _mm512_maskz_loadu_ps(mask, b.row_ptr(l).add(c0)) } else { _mm512_setzero_ps() } };
        let mut l = 0;
        while l < kp {
            let (h0, lo0) = split16(load(l));
            let (h1, lo1) = split16(load(l + 1));
            let pair = |e: __m256i, o: __m256i| _mm512_or_si512(_mm512_cvtepu16_epi32(e), _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(o)));
            let hi = pair(h0, h1);
            _mm512_storeu_si512(panel.add(l * 16) as *mut __m512i, hi);
            if passes == 3 {
                _mm512_storeu_si512(panel.add((kp + l) * 16) as *mut __m512i, pair(lo0, lo1));
                _mm512_storeu_si512(panel.add((2 * kp + l) * 16) as *mut __m512i, hi);
            }
            l += 2;
        }
    }
}

/// Output columns `blk·32 .. blk·32 + 32` of `A'·B'` for the 32-row blocks `ibs`, `B'` being the
/// packed block `bp` of [`pack_b_block`].
///
/// # Safety
/// AMX must be available and this thread's tiles configured ([`Tiles`]); `ap` holds `ibs.end·32 × kk`,
/// `bp` `32 × kk` elements in the layouts above; `dst` points to `m` rows of `n` writable `f32`
/// spaced `ld` apart whose columns of block `blk` no other thread touches.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(ap: &[u16], bp: &[u16], kk: usize, ibs: std::ops::Range<usize>, blk: usize, dst: *mut f32, ld: usize, m: usize, n: usize, alpha: f32, acc: bool) {
    use std::arch::asm;
    let a_stride = kk * 2; // bytes between rows of A'
    #[repr(C, align(64))]
    struct CTile([f32; 32 * 32]);
    let mut ct = CTile([0f32; 32 * 32]);
    let c = &mut ct.0;
    let p0 = bp.as_ptr();
    let p1 = p0.add(16 * kk);
    debug_assert!(ap.len() >= ibs.end * 32 * kk && bp.len() >= 32 * kk);
    let j0 = blk * 32;
    for ib in ibs {
        let a0 = ap.as_ptr().add(ib * 32 * kk);
        let a1 = a0.add(16 * kk);
        let i0 = ib * 32;
        // A whole 32 × 32 block with alpha 1 accumulates in the destination itself: the tiles
        // start from it (or from zero) and are stored back, no pass over a staging buffer.
        let direct = alpha == 1.0 && i0 + 32 <= m && j0 + 32 <= n;
        let (d0, dld) = (dst.add(i0 * ld + j0), ld * 4);
        if direct && acc {
            asm!(
                "tileloadd tmm0, [{c0} + {s}*1]",
                "tileloadd tmm1, [{c1} + {s}*1]",
                "tileloadd tmm2, [{c2} + {s}*1]",
                "tileloadd tmm3, [{c3} + {s}*1]",
                c0 = in(reg) d0,
                c1 = in(reg) d0.add(16),
                c2 = in(reg) d0.add(16 * ld),
                c3 = in(reg) d0.add(16 * ld + 16),
                s = in(reg) dld,
                options(nostack),
            );
        } else {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack));
        }
        let mut l = 0;
        while l < kk {
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.add(l),
                a1 = in(reg) a1.add(l),
                b0 = in(reg) p0.add(l * 16),
                b1 = in(reg) p1.add(l * 16),
                sa = in(reg) a_stride,
                sb = in(reg) 64usize,
                options(nostack),
            );
            l += 32;
        }
        let (cp, cs) = if direct { (d0, dld) } else { (c.as_mut_ptr(), 128) };
        let cl = cs / 4;
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) cp,
            c1 = in(reg) cp.add(16),
            c2 = in(reg) cp.add(16 * cl),
            c3 = in(reg) cp.add(16 * cl + 16),
            s = in(reg) cs,
            options(nostack),
        );
        if direct {
            continue;
        }
        let w = 32.min(n - j0);
        for r in 0..32.min(m.saturating_sub(i0)) {
            let o = std::slice::from_raw_parts_mut(dst.add((i0 + r) * ld + j0), w);
            let src = &c[r * 32..r * 32 + w];
            if acc {
                for (o, s) in o.iter_mut().zip(src) {
                    *o += alpha * s;
                }
            } else {
                for (o, s) in o.iter_mut().zip(src) {
                    *o = alpha * s;
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(_: &[u16], _: &[u16], _: usize, _: std::ops::Range<usize>, _: usize, _: *mut f32, _: usize, _: usize, _: usize, _: f32, _: bool) {
    unreachable!("AMX is x86_64 only")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// AMX products against an f64 reference on shapes with tails in every dimension, a
    /// transposed (strided) right operand, a transposed left operand (the scalar conversion), a
    /// destination with a longer leading dimension (whose other elements must stay untouched),
    /// accumulation, more threads than column blocks, and alpha 1 with whole 32 × 32 blocks (the
    /// direct tile path): bf16x3 within 2⁻¹⁴·Σ|a||b| per output, bf16 within 2⁻⁷·Σ|a||b|, and
    /// bf16x3 clearly closer than bf16.
    #[test]
    fn amx_products_match_f64_within_their_precision() {
        if !available() {
            eprintln!("skipped: no AMX on this machine");
            return;
        }
        // (m, k, n, B transposed, A transposed, accumulate, threads, alpha, extra ld)
        for &(m, k, n, trans, trans_a, acc, threads, alpha, pad) in &[
            (32, 32, 32, false, false, false, 1, 0.5f32, 0),
            (45, 77, 50, true, false, true, 2, 0.5, 3),
            (130, 576, 192, true, false, false, 2, 0.5, 0),
            (17, 40, 33, false, true, true, 1, 0.5, 0),
            (96, 300, 320, true, false, true, 2, 1.0, 5),
            (64, 128, 288, false, true, false, 3, 1.0, 0),
            (70, 64, 40, true, false, true, 4, 1.0, 7),
        ] {
            let a = rand(m * k, 1 + m as u64);
            let w = rand(k * n, 2 + n as u64); // [k, n], or [n, k] when trans
            let ld = n + pad;
            let c0 = rand(m * ld, 3);
            let aview = if trans_a { View::of(&a, k, m).t() } else { View::of(&a, m, k) };
            let bview = if trans { View::of(&w, n, k).t() } else { View::of(&w, k, n) };
            let mut worst = [0f64; 2];
            for (pi, passes) in [3usize, 1].into_iter().enumerate() {
                let mut c = c0.clone();
                gemm(&mut Dst::rm(&mut c, 0, m, n, ld), aview, bview, alpha, acc, threads, passes);
                for i in 0..m {
                    for j in n..ld {
                        assert_eq!(c[i * ld + j], c0[i * ld + j], "element ({i}, {j}) outside the destination was written");
                    }
                    for j in 0..n {
                        let (mut s, mut abs) = (0f64, 0f64);
                        for l in 0..k {
                            let p = aview.at(i, l) as f64 * bview.at(l, j) as f64;
                            s += p;
                            abs += p.abs();
                        }
                        let want = alpha as f64 * s + if acc { c0[i * ld + j] as f64 } else { 0.0 };
                        let err = (c[i * ld + j] as f64 - want).abs() / (alpha as f64 * abs);
                        worst[pi] = worst[pi].max(err);
                    }
                }
            }
            eprintln!("{m}x{k}x{n}: bf16x3 {:.2e}, bf16 {:.2e}", worst[0], worst[1]);
            assert!(worst[0] <= 2f64.powi(-14), "bf16x3 error {} at {m}x{k}x{n}", worst[0]);
            assert!(worst[1] <= 2f64.powi(-7), "bf16 error {} at {m}x{k}x{n}", worst[1]);
            assert!(worst[0] * 16.0 < worst[1], "bf16x3 should be far closer than bf16");
        }
    }

    /// The vector conversion (`split16`) equals the scalar one (`split`) bit for bit, including
    /// ties, subnormals, infinities, NaN and the largest finite values.
    #[test]
    fn vector_and_scalar_bf16_splits_agree() {
        if !(std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw")) {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let mut xs: Vec<f32> = rand(4096, 9).iter().map(|x| x * 1e3).collect();
        xs.extend([0.0, -0.0, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, f32::MIN_POSITIVE / 3.0, f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, f32::from_bits(0x7f80_0001), f32::from_bits(0xffff_ffff)]);
        while !xs.len().is_multiple_of(16) {
            xs.push(0.5);
        }
        for chunk in xs.chunks(16) {
            let (mut hv, mut lv) = ([0u16; 16], [0u16; 16]);
            // SAFETY: AVX-512F/BW checked above; 16 floats in, 16 u16 out each.
            unsafe {
                use std::arch::x86_64::*;
                let (h, l) = split16(_mm512_loadu_ps(chunk.as_ptr()));
                _mm256_storeu_si256(hv.as_mut_ptr() as *mut __m256i, h);
                _mm256_storeu_si256(lv.as_mut_ptr() as *mut __m256i, l);
            }
            for (i, &x) in chunk.iter().enumerate() {
                let (h, l) = split(x);
                assert_eq!((hv[i], lv[i]), (h, l), "x = {x:e} ({:#x})", x.to_bits());
                if x.is_nan() {
                    assert!(half::bf16::from_bits(h).is_nan(), "NaN must stay NaN");
                }
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// Where the time of one AMX product goes (`cargo test --release -- --ignored amx_timing
    /// --nocapture`); prints, asserts nothing.
    #[test]
    #[ignore]
    fn amx_timing() {
        if !available() {
            return;
        }
        let (m, k, n) = (512, 576, 1536);
        let a = vec![0.5f32; m * k];
        let w = vec![0.25f32; n * k];
        let mut c = vec![0f32; m * n];
        for passes in [3usize, 1] {
            let (av, bv) = (View::of(&a, m, k), View::of(&w, n, k).t());
            let kp = k.div_ceil(32) * 32;
            let kk = passes * kp;
            let reps = 20;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                gemm(&mut Dst::of(&mut c, m, n), av, bv, 1.0, false, 1, passes);
            }
            let total = t.elapsed().as_secs_f64() / reps as f64;
            let mut ap = Buf(Vec::new());
            let ap = ap.get(m * kk);
            let t = std::time::Instant::now();
            for _ in 0..reps {
                for (i, row) in ap.chunks_exact_mut(kk).enumerate() {
                    pack_a_row(av, i, row, k, kp, passes);
                }
            }
            let pa = t.elapsed().as_secs_f64() / reps as f64;
            let mut bp = Buf(Vec::new());
            let bp = bp.get(n * kk);
            let t = std::time::Instant::now();
            for _ in 0..reps {
                for blk in 0..n / 32 {
                    pack_b_block(bv, blk * 32, &mut bp[blk * 32 * kk..], k, kp, passes);
                }
            }
            let pb = t.elapsed().as_secs_f64() / reps as f64;
            let t = std::time::Instant::now();
            unsafe {
                let _cfg = Tiles::configure();
                for _ in 0..reps {
                    for g in (0..n / 32).step_by(GROUP_COLS) {
                        for ib0 in (0..m / 32).step_by(GROUP_ROWS) {
                            for blk in g..(g + GROUP_COLS).min(n / 32) {
                                kernel(ap, &bp[blk * 32 * kk..], kk, ib0..(ib0 + GROUP_ROWS).min(m / 32), blk, c.as_mut_ptr(), n, m, n, 1.0, false);
                            }
                        }
                    }
                }
            }
            let kt = t.elapsed().as_secs_f64() / reps as f64;
            let macs = (m * n * kk) as f64;
            eprintln!("passes {passes}: total {:.2} ms, pack A {:.2} ms, pack B {:.2} ms, kernel {:.2} ms ({:.0} GMAC/s)", total * 1e3, pa * 1e3, pb * 1e3, kt * 1e3, macs / kt / 1e9);
        }
    }
}
