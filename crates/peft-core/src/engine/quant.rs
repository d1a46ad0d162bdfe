//! Frozen linear weights kept quantized (QLoRA-style training and inference on the CPU, issue 20)
//! with integer dot-product kernels.
//!
//! A [`QuantWeight`] holds a frozen `W` of shape `[out, in]` (PyTorch's `nn.Linear` layout) in
//! one of llama.cpp's block formats, read from GGUF tensor bytes (block layouts from the GGUF
//! spec, <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>, and llama.cpp's
//! `ggml-common.h` / `ggml-quants.c`):
//!
//! | type   | block | bytes | value of element `i`                                            |
//! |--------|-------|-------|-----------------------------------------------------------------|
//! | `Q8_0` | 32    | 34    | `d · q[i]`, `d` f16, `q` i8                                      |
//! | `Q4_0` | 32    | 18    | `d · (n[i] − 8)`, `d` f16, `n` 4-bit (`i < 16`: low nibble of byte `i`, else high nibble of byte `i − 16`) |
//! | `Q4_1` | 32    | 20    | `d · n[i] + m`, `d`, `m` f16, `n` as `Q4_0`                      |
//! | `Q4_K` | 256   | 144   | 8 sub-blocks of 32: `d·sc[s] · n[i] − dmin·mn[s]`, 6-bit `sc`/`mn` packed in 12 bytes, `n` 4-bit (in 64-element chunks: low nibbles then high nibbles of 32 bytes) |
//! | `Q6_K` | 256   | 210   | 16 sub-blocks of 16: `d·sc[s] · (n[i] − 32)`, `n` 6-bit (low 4 bits in `ql[128]`, high 2 in `qh[64]`, interleaved as `dequantize_row_q6_K` reads them), `sc` i8 ×16, `d` f16 last |
//!
//! Every supported type is an affine code per 32 elements, `w = d·n + m` with an unsigned
//! integer `n`, so the kernels share one form; `Q6_K` has a scale per 16 elements, kept as two
//! scales per 32-element block (`d` for elements 0..16, `d2` for 16..32) whose integer sums the
//! kernels accumulate apart. At load the blocks are repacked (losslessly) into
//! groups of 16 output rows, interleaved by 4 input elements, so that one 512-bit load holds four
//! consecutive `n` of 16 rows and one `vpdpbusd` with a broadcast activation word accumulates all
//! 16 rows (llama.cpp's "repacked" CPU layouts work the same way). Scales (`d`, and `m` for
//! `Q4_1` / `Q4_K`, `d2` for `Q6_K`) stay the file's f16 values where the type stores them so
//! (`Q8_0`, `Q4_0`, `Q4_1`) and become `f32` for the K-quants (an f16 times a sub-block integer),
//! so memory per weight is 1.0625 bytes (`Q8_0`), 0.5625 (`Q4_0`), 0.625 (`Q4_1`), as in the
//! file, 0.75 (`Q4_K`, 0.5625 in the file) and 1.25 (`Q6_K`: one byte per 6-bit code, against
//! 0.82 in the file), against 4 for `f32`. Other GGUF types (`Q5_*`, `Q2_K`, `Q3_K`,
//! `Q5_K` ...) are not kept quantized: [`QuantType::from_ggml`] returns `None` and the loader
//! dequantizes them as before.
//!
//! **Forward** `y = x·Wᵀ` ([`QuantWeight::matmul_t`]): each row of `x` is quantized per block
//! of 32 to 8 bits, `x ≈ s·q` with `s = max|x|/127`, `q ∈ [−127, 127]` (llama.cpp's `Q8_0` /
//! `Q8_K` activation quantization); the block dot products `Σ n·q` are exact in `i32`
//! (`vpdpbusd` on AVX-512 VNNI or AVX-VNNI, `vpmaddubsw` + `vpmaddwd` on AVX2, scalar elsewhere,
//! chosen at run time), then the scales are folded in `f32`:
//! `y += d·s·(Σ n·q − o·Σq) + m·s·Σq`, with the offset `o` = 128 (`Q8_0`, stored `n = q + 128`),
//! 8 (`Q4_0`), 32 (`Q6_K`, per half block with its scale) or 0 (with `m`). Error bound (against `x·Wᵀ` in exact arithmetic on the
//! dequantized `W`): each activation moves by at most `s_b/2` in block `b`, so
//! `|Δy_j| ≤ Σ_b (s_b / 2)·Σ_{i∈b} |W_ji|` plus `f32` rounding; `tests/quant.rs` checks it.
//!
//! **Input gradient** `dX = dY·W` ([`QuantWeight::matmul`]): `W` is needed along its other
//! dimension. Panels of up to 256 input columns are dequantized to `f32` (`[out, ≤256]`, at most
//! `out·1024` bytes per thread) and multiplied with the engine's `f32` GEMM ([`super::gemm`]);
//! panels run in parallel. This is exact up to `f32` rounding (no activation quantization of
//! `dY`) and needs no second copy of `W`. A second, transposed quantized copy would need a
//! requantization of `W` along `out` (lossy: it would no longer be the file's weight) and double
//! the memory, so it is not kept.
//!
//! **Batched products on AMX** (from [`AMX_MIN_ROWS`] rows: prefill and training; see
//! [`amx_bf16`]): where the CPU has AMX-BF16, both products run on the tile unit in bf16 with
//! `f32` accumulation, as QLoRA computes (4-bit storage, bf16 compute). Each block of 32 rows
//! (forward) or 32 columns (input gradient) of `W` is dequantized in registers and written
//! straight into the tile layout ([`super::amx::PackB`]); nothing of `W` is kept in another
//! form between calls. Error bound: `(2⁻⁷ + 2⁻¹⁶)·|x_i·W_ji|` per product term (both operands
//! rounded to 8 significant bits). Decoding (one row) stays on the integer kernels, which read
//! the packed codes once. AMX-INT8 (`tdpbusd`) is not used: a scale per 32 elements of both
//! operands would have to be folded in after every 32-deep tile product.

use crate::{PeftError, Result};
use half::f16;

/// Output rows per packed group (one 512-bit vector of `i32` / `f32` lanes).
const R: usize = 16;
/// Elements per scale block of the packed layout.
const QK: usize = 32;
/// Widest dequantized panel of the input-gradient product, in input columns.
const PANEL_MAX: usize = 256;

/// Panel width for `dY·W` over `k` input columns: as wide as `PANEL_MAX` allows while giving
/// every thread the same number of panels (a multiple of 32). `PEFT_QUANT_PANEL=<n>` overrides
/// it (for measurements).
fn panel_width(k: usize, threads: usize) -> usize {
    // Read once: this runs for every input-gradient product of every step.
    static OVERRIDE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let fixed = *OVERRIDE.get_or_init(|| std::env::var("PEFT_QUANT_PANEL").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&w| w >= QK));
    if let Some(w) = fixed {
        return w / QK * QK;
    }
    let panels = threads.max(1) * k.div_ceil(threads.max(1) * PANEL_MAX);
    k.div_ceil(panels).div_ceil(QK) * QK
}

/// The GGUF block types kept quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// `Q8_0`: 32 × i8 with an f16 scale.
    Q8_0,
    /// `Q4_0`: 32 × 4-bit with an f16 scale, offset −8.
    Q4_0,
    /// `Q4_1`: 32 × 4-bit with an f16 scale and an f16 minimum.
    Q4_1,
    /// `Q4_K`: 256-element super-blocks of 8 × 32 × 4-bit with 6-bit sub-scales and minimums.
    Q4K,
    /// `Q6_K`: 256-element super-blocks of 16 × 16 × 6-bit with 8-bit sub-scales, offset −32.
    Q6K,
}

impl QuantType {
    /// llama.cpp's name (`"Q8_0"`, `"Q4_0"`, `"Q4_1"`, `"Q4_K"`).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q4K => "Q4_K",
            QuantType::Q6K => "Q6_K",
        }
    }

    /// Elements per GGUF block.
    pub fn block_elems(self) -> usize {
        match self {
            QuantType::Q4K | QuantType::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes per GGUF block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::Q8_0 => 34,
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q4K => 144,
            QuantType::Q6K => 210,
        }
    }

    /// The kept-quantized type for a ggml type, `None` for types that are dequantized instead.
    pub fn from_ggml(t: candle_core::quantized::GgmlDType) -> Option<QuantType> {
        use candle_core::quantized::GgmlDType as G;
        match t {
            G::Q8_0 => Some(QuantType::Q8_0),
            G::Q4_0 => Some(QuantType::Q4_0),
            G::Q4_1 => Some(QuantType::Q4_1),
            G::Q4K => Some(QuantType::Q4K),
            G::Q6K => Some(QuantType::Q6K),
            _ => None,
        }
    }

    /// Whether the packed codes are 4-bit (two per byte); else one byte per code.
    fn nibbles(self) -> bool {
        matches!(self, QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q4K)
    }

    /// Whether the per-block scales (and minimums) are kept as the file's f16 values (`Q8_0`,
    /// `Q4_0`, `Q4_1`: exact, and 2 bytes each instead of 4 read per decoded token); `Q4_K` /
    /// `Q6_K` scales are products of an f16 and a sub-block integer, kept as f32.
    fn f16_scales(self) -> bool {
        matches!(self, QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q4_1)
    }

    /// Whether each 32-element block has two scales, one per 16 elements (`Q6_K`).
    fn half_scales(self) -> bool {
        self == QuantType::Q6K
    }

    /// Whether blocks carry a minimum `m` (else the offset is a constant).
    fn has_min(self) -> bool {
        matches!(self, QuantType::Q4_1 | QuantType::Q4K)
    }

    /// The constant offset `o` in `w = d·(n − o)` for types without a minimum.
    fn offset(self) -> i32 {
        match self {
            QuantType::Q8_0 => 128,
            QuantType::Q4_0 => 8,
            QuantType::Q6K => 32,
            _ => 0,
        }
    }

    /// Packed quant bytes per group of 16 rows and block of 32.
    fn group_block_bytes(self) -> usize {
        if self.nibbles() {
            R * QK / 2
        } else {
            R * QK
        }
    }
}

/// An integer kernel family. [`Kernel::best`] picks the widest the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Portable Rust (any CPU).
    Scalar,
    /// AVX2: `vpmaddubsw` + `vpmaddwd` (16-bit intermediate sums; `Q8_0` uses the sign trick so
    /// that they cannot saturate).
    Avx2,
    /// AVX-VNNI: 256-bit `vpdpbusd` (VEX encoding, e.g. Alder Lake).
    AvxVnni,
    /// AVX-512 VNNI: 512-bit `vpdpbusd`.
    Avx512Vnni,
}

impl Kernel {
    /// Whether this CPU can run the kernel.
    pub fn available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("f16c"),
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => Kernel::Avx2.available() && std::arch::is_x86_feature_detected!("avxvnni"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
                    && Kernel::Avx2.available()
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every kernel this CPU can run, narrowest first.
    pub fn all_available() -> Vec<Kernel> {
        [Kernel::Scalar, Kernel::Avx2, Kernel::AvxVnni, Kernel::Avx512Vnni].into_iter().filter(|k| k.available()).collect()
    }

    /// The widest kernel this CPU can run (detected once). `PEFT_QUANT_KERNEL=scalar|avx2|avxvnni|avx512vnni`
    /// caps it (for comparisons); a kernel the CPU lacks is ignored.
    pub fn best() -> Kernel {
        use std::sync::OnceLock;
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            let all = Kernel::all_available();
            let want = match std::env::var("PEFT_QUANT_KERNEL").as_deref() {
                Ok("scalar") => Some(Kernel::Scalar),
                Ok("avx2") => Some(Kernel::Avx2),
                Ok("avxvnni") => Some(Kernel::AvxVnni),
                Ok("avx512vnni") => Some(Kernel::Avx512Vnni),
                _ => None,
            };
            match want {
                Some(k) if all.contains(&k) => k,
                _ => *all.last().unwrap_or(&Kernel::Scalar),
            }
        })
    }

    /// A short name (`"avx512vnni"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::AvxVnni => "avxvnni",
            Kernel::Avx512Vnni => "avx512vnni",
        }
    }
}

/// A frozen linear weight `W` `[rows = out, cols = in]` kept quantized, repacked for the integer
/// kernels (see the module docs for the layout and the formats). Immutable once built.
pub struct QuantWeight {
    name: String,
    ty: QuantType,
    rows: usize,
    cols: usize,
    /// `[group][block][k4 or k4-pair][16 rows][4 bytes]` unsigned codes `n` (nibble pairs for
    /// 4-bit types: low nibble = element `4j + b`, high nibble = element `16 + 4j + b`).
    q: Vec<u8>,
    /// `[group][block][16 rows]` scales `d` (0 for padding rows).
    d: Scales,
    /// `[group][block][16 rows]` minimums `m` (types with a minimum only, else empty).
    m: Scales,
    /// `[group][block][16 rows]` scales of elements 16..32 of each block (`Q6_K` only, else
    /// empty); `d` then scales elements 0..16.
    d2: Vec<f32>,
    /// Quantized at load from an f32/f16/bf16 weight ([`QuantWeight::quantize`]) rather than
    /// read from GGUF blocks; only changes [`QuantWeight::backend`].
    at_load: bool,
}

impl std::fmt::Debug for QuantWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantWeight({} {} [{}, {}])", self.name, self.ty.name(), self.rows, self.cols)
    }
}

/// Per-row scale values of the packed layout, `[group][block][16 rows]`: f16 bits where the
/// type stores them as f16 ([`QuantType::f16_scales`]), else f32; little-endian bytes, read with
/// unaligned loads.
struct Scales {
    half: bool,
    bytes: Vec<u8>,
}

impl Scales {
    fn new(half: bool, n: usize) -> Scales {
        Scales { half, bytes: vec![0u8; n * if half { 2 } else { 4 }] }
    }

    /// Sets value `i`. A value that f16 does not hold exactly cannot come here (`half` types
    /// store the file's f16 values).
    fn set(&mut self, i: usize, v: f32) {
        if self.half {
            let h = f16::from_f32(v);
            debug_assert!(h.to_f32() == v || v.is_nan());
            self.bytes[2 * i..2 * i + 2].copy_from_slice(&h.to_le_bytes());
        } else {
            self.bytes[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Value `i`.
    fn get(&self, i: usize) -> f32 {
        if self.half {
            f16::from_le_bytes([self.bytes[2 * i], self.bytes[2 * i + 1]]).to_f32()
        } else {
            f32::from_le_bytes(self.bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"))
        }
    }

    /// The address of value `i` (`i` within the values, or one past the end).
    fn ptr(&self, i: usize) -> *const u8 {
        self.bytes[i * if self.half { 2 } else { 4 }..].as_ptr()
    }

    /// Value `i` behind a raw pointer from [`Scales::ptr`].
    ///
    /// # Safety
    /// `p` must point at values of the given kind with `i` inside them.
    unsafe fn read(p: *const u8, i: usize, half: bool) -> f32 {
        if half {
            f16::from_le_bytes([*p.add(2 * i), *p.add(2 * i + 1)]).to_f32()
        } else {
            f32::from_le_bytes(std::ptr::read_unaligned(p.add(4 * i) as *const [u8; 4]))
        }
    }

    /// 16 values from `i` (AVX-512F; f16 through `vcvtph2ps`).
    ///
    /// # Safety
    /// AVX-512F; values `i .. i + 16` exist.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(&self, i: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        if self.half {
            _mm512_cvtph_ps(_mm256_loadu_si256(self.bytes.as_ptr().add(2 * i) as *const __m256i))
        } else {
            _mm512_loadu_ps(self.bytes.as_ptr().add(4 * i) as *const f32)
        }
    }
}

fn bad(name: &str, msg: impl Into<String>) -> PeftError {
    PeftError::QuantInvalid { tensor: name.to_string(), msg: msg.into() }
}

fn rd_f16(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// llama.cpp's `get_scale_min_k4`: the 6-bit scale and minimum of sub-block `j` (0..8) of a
/// `Q4_K` super-block from its 12 packed bytes.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

impl QuantWeight {
    /// Builds the weight from GGUF tensor bytes: `rows · cols / block_elems` blocks of `ty`,
    /// row-major (GGUF's `ne = [cols, rows]`). `name` is used in errors.
    ///
    /// Errors (`ERR_GGUF_INVALID`, [`PeftError::QuantInvalid`] naming `name`): `cols` not a
    /// multiple of the block size, a byte length that is not exactly the expected one (truncated
    /// or trailing data), a NaN or infinite `f16` scale or minimum (with the row and block).
    pub fn from_gguf_bytes(name: &str, ty: QuantType, rows: usize, cols: usize, data: &[u8]) -> Result<QuantWeight> {
        let be = ty.block_elems();
        if rows == 0 || cols == 0 {
            return Err(bad(name, format!("empty shape [{rows}, {cols}]")));
        }
        if !cols.is_multiple_of(be) {
            return Err(bad(name, format!("{} needs rows of a multiple of {be} elements, found {cols}", ty.name())));
        }
        let bpr = cols / be; // GGUF blocks per row
        let want = rows.checked_mul(bpr).and_then(|n| n.checked_mul(ty.block_bytes()));
        if want != Some(data.len()) {
            return Err(bad(
                name,
                format!("{} [{rows}, {cols}] needs {} bytes, found {} (truncated or corrupted data)", ty.name(), want.map_or("too many".into(), |w| w.to_string()), data.len()),
            ));
        }
        let nb = cols / QK;
        let groups = rows.div_ceil(R);
        let gbb = ty.group_block_bytes();
        let mut w = QuantWeight {
            name: name.to_string(),
            ty,
            rows,
            cols,
            q: vec![0u8; groups * nb * gbb],
            d: Scales::new(ty.f16_scales(), groups * nb * R),
            m: Scales::new(ty.f16_scales(), if ty.has_min() { groups * nb * R } else { 0 }),
            d2: if ty.half_scales() { vec![0f32; groups * nb * R] } else { Vec::new() },
            at_load: false,
        };
        let mut n = [0u8; QK];
        for r in 0..rows {
            let (g, lane) = (r / R, r % R);
            let row = &data[r * bpr * ty.block_bytes()..(r + 1) * bpr * ty.block_bytes()];
            for gb in 0..bpr {
                let blk = &row[gb * ty.block_bytes()..(gb + 1) * ty.block_bytes()];
                let check = |v: f32, what: &str| -> Result<f32> {
                    if v.is_finite() {
                        Ok(v)
                    } else {
                        Err(bad(name, format!("{what} of row {r}, block {gb} is {v} ({} data is corrupted)", ty.name())))
                    }
                };
                // (sub-block index along the row, n, d, m, d2) for each 32-element sub-block.
                let mut put = |b: usize, n: &[u8; QK], d: f32, m: f32, d2: f32| {
                    let base = (g * nb + b) * gbb;
                    for (i, &v) in n.iter().enumerate() {
                        if ty.nibbles() {
                            // element i: k4 pair j = (i % 16) / 4, byte b = i % 4, high nibble if i >= 16
                            let j = (i % 16) / 4;
                            let at = base + (j * R + lane) * 4 + i % 4;
                            w.q[at] |= if i < 16 { v } else { v << 4 };
                        } else {
                            w.q[base + ((i / 4) * R + lane) * 4 + i % 4] = v;
                        }
                    }
                    w.d.set((g * nb + b) * R + lane, d);
                    if ty.has_min() {
                        w.m.set((g * nb + b) * R + lane, m);
                    }
                    if ty.half_scales() {
                        w.d2[(g * nb + b) * R + lane] = d2;
                    }
                };
                match ty {
                    QuantType::Q8_0 => {
                        let d = check(rd_f16(blk, 0), "scale")?;
                        for i in 0..QK {
                            n[i] = (blk[2 + i] as i8 as i32 + 128) as u8;
                        }
                        put(gb, &n, d, 0.0, 0.0);
                    }
                    QuantType::Q4_0 | QuantType::Q4_1 => {
                        let d = check(rd_f16(blk, 0), "scale")?;
                        let (m, qs) = if ty == QuantType::Q4_1 { (check(rd_f16(blk, 2), "minimum")?, &blk[4..20]) } else { (0.0, &blk[2..18]) };
                        for i in 0..16 {
                            n[i] = qs[i] & 0xF;
                            n[i + 16] = qs[i] >> 4;
                        }
                        put(gb, &n, d, m, 0.0);
                    }
                    QuantType::Q4K => {
                        let d = check(rd_f16(blk, 0), "scale")?;
                        let dmin = check(rd_f16(blk, 2), "minimum")?;
                        let sc = &blk[4..16];
                        let qs = &blk[16..144];
                        for c in 0..4 {
                            let q = &qs[c * 32..(c + 1) * 32];
                            for (half, shift) in [(0usize, 0u8), (1, 4)] {
                                let s = 2 * c + half;
                                let (scv, mnv) = scale_min_k4(s, sc);
                                for l in 0..QK {
                                    n[l] = (q[l] >> shift) & 0xF;
                                }
                                put(gb * 8 + s, &n, d * scv as f32, -(dmin * mnv as f32), 0.0);
                            }
                        }
                    }
                    QuantType::Q6K => {
                        // llama.cpp's dequantize_row_q6_K: ql[128] low 4 bits, qh[64] high 2
                        // bits, scales[16] i8 (one per 16 elements), d f16 at byte 208.
                        let d = check(rd_f16(blk, 208), "scale")?;
                        let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
                        let mut q = [0u8; 256];
                        for c in 0..2 {
                            for l in 0..32 {
                                let (a, b, h) = (ql[c * 64 + l], ql[c * 64 + l + 32], qh[c * 32 + l]);
                                q[c * 128 + l] = (a & 0xF) | ((h & 3) << 4);
                                q[c * 128 + l + 32] = (b & 0xF) | (((h >> 2) & 3) << 4);
                                q[c * 128 + l + 64] = (a >> 4) | (((h >> 4) & 3) << 4);
                                q[c * 128 + l + 96] = (b >> 4) | (((h >> 6) & 3) << 4);
                            }
                        }
                        for s in 0..8 {
                            n.copy_from_slice(&q[s * QK..(s + 1) * QK]);
                            put(gb * 8 + s, &n, d * sc[2 * s] as i8 as f32, 0.0, d * sc[2 * s + 1] as i8 as f32);
                        }
                    }
                }
            }
        }
        Ok(w)
    }

    /// Quantizes an `f32` weight `[rows, cols]` (row-major) to `Q8_0` as llama.cpp's
    /// `quantize_row_q8_0_ref` does; see [`QuantWeight::quantize`].
    ///
    /// Errors: as [`QuantWeight::quantize`].
    pub fn quantize_q8_0(name: &str, rows: usize, cols: usize, w: &[f32]) -> Result<QuantWeight> {
        QuantWeight::quantize(name, QuantType::Q8_0, rows, cols, w)
    }

    /// The GGUF blocks of one row-major `f32` weight quantized to `ty` by round-to-nearest, as
    /// llama.cpp's reference quantizers (`ggml-quants.c`) compute them, per block of 32:
    ///
    /// - `Q8_0` (`quantize_row_q8_0_ref`): `d = max|x|/127`, `q = roundf(x/d)` (half away from
    ///   zero), `d` stored as f16; 34 bytes.
    /// - `Q4_0` (`quantize_row_q4_0_ref`): `d = x_max/−8` where `x_max` is the first element of
    ///   largest magnitude (sign kept), `n = min(15, trunc(x/d + 8.5))`, `d` stored as f16
    ///   (the codes use the f32 `d`, as llama.cpp does); 18 bytes, element `i < 16` in the low
    ///   nibble of byte `i`, element `16 + i` in its high nibble.
    ///
    /// Returns `None` for the other types (they are never produced from f32 here).
    pub fn quantize_blocks(ty: QuantType, w: &[f32]) -> Option<Vec<u8>> {
        let mut bytes = Vec::with_capacity(w.len() / QK * ty.block_bytes());
        for blk in w.chunks_exact(QK) {
            match ty {
                QuantType::Q8_0 => {
                    let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    bytes.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    bytes.extend(blk.iter().map(|v| ((v * id).round() as i32).clamp(-127, 127) as i8 as u8));
                }
                QuantType::Q4_0 => {
                    let (mut amax, mut max) = (0f32, 0f32);
                    for &v in blk {
                        if amax < v.abs() {
                            amax = v.abs();
                            max = v;
                        }
                    }
                    let d = max / -8.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    bytes.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    // (int8_t)(x·id + 8.5f): truncation toward zero, then min(15, ·)
                    let code = |v: f32| ((v * id + 8.5) as i8).clamp(0, 15) as u8;
                    for j in 0..QK / 2 {
                        bytes.push(code(blk[j]) | (code(blk[QK / 2 + j]) << 4));
                    }
                }
                _ => return None,
            }
        }
        Some(bytes)
    }

    /// Quantizes an `f32` weight `[rows, cols]` (row-major) to `ty` (`Q8_0` or `Q4_0`) with
    /// llama.cpp's round-to-nearest reference quantizers ([`QuantWeight::quantize_blocks`]) and
    /// keeps it in the packed form. For quantizing f32/f16/bf16 checkpoints at load
    /// (`quantization: 'q8_0'` / `'q4_0'`); [`QuantWeight::backend`] then reports `"q8_0"` /
    /// `"q4_0"`.
    ///
    /// Errors: `ERR_GGUF_INVALID` ([`PeftError::QuantInvalid`]) naming `name` for a length that
    /// is not `rows · cols`, `cols` not a multiple of 32, a non-finite weight (with its row), or
    /// a type other than `Q8_0` / `Q4_0`.
    pub fn quantize(name: &str, ty: QuantType, rows: usize, cols: usize, w: &[f32]) -> Result<QuantWeight> {
        if w.len() != rows * cols {
            return Err(bad(name, format!("{} values for a [{rows}, {cols}] weight", w.len())));
        }
        if !cols.is_multiple_of(QK) {
            return Err(bad(name, format!("{} needs rows of a multiple of 32 elements, found {cols}", ty.name())));
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(bad(name, format!("non-finite weight {} in row {}", w[i], i / cols)));
        }
        let bytes = QuantWeight::quantize_blocks(ty, w).ok_or_else(|| bad(name, format!("quantizing to {} is not supported (Q8_0 and Q4_0 are)", ty.name())))?;
        let mut q = QuantWeight::from_gguf_bytes(name, ty, rows, cols, &bytes)?;
        q.at_load = true;
        Ok(q)
    }

    /// The backend string reported by `getLayerStatus()` / `getModelStatus()`
    /// (`quantizationBackend`): `"gguf-<TYPE>"` (e.g. `"gguf-Q4_1"`) for blocks read from a GGUF
    /// file, the load option's value (`"q8_0"`, `"q4_0"`) for a weight quantized at load.
    pub fn backend(&self) -> String {
        if self.at_load {
            self.ty.name().to_ascii_lowercase()
        } else {
            format!("gguf-{}", self.ty.name())
        }
    }

    /// The tensor name given at load.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The block type.
    pub fn quant_type(&self) -> QuantType {
        self.ty
    }
    /// `out` (rows of `W`).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// `in` (columns of `W`).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes held (codes and scales, including the padding rows of the last group).
    pub fn bytes(&self) -> usize {
        self.q.len() + self.d.bytes.len() + self.m.bytes.len() + 4 * self.d2.len()
    }

    /// Block `b` (32 columns) of group `g` (16 rows) dequantized: `out[lane][i]` =
    /// `W[16g + lane, 32b + i]`, as llama.cpp's `dequantize_row_*` computes it (`d·q`,
    /// `d·(n − 8)`, `d·n + m`, `d·sc·n − dmin·mn`); padding rows give 0.
    fn dequant_block(&self, g: usize, b: usize, out: &mut [[f32; QK]; R]) {
        let nb = self.cols / QK;
        let gbb = self.ty.group_block_bytes();
        let q = &self.q[(g * nb + b) * gbb..(g * nb + b + 1) * gbb];
        let at = (g * nb + b) * R;
        let off = self.ty.offset() as f32;
        for (lane, o) in out.iter_mut().enumerate() {
            let mut n = [0u8; QK];
            if self.ty.nibbles() {
                for j in 0..4 {
                    for t in 0..4 {
                        let v = q[(j * R + lane) * 4 + t];
                        n[4 * j + t] = v & 0xF;
                        n[16 + 4 * j + t] = v >> 4;
                    }
                }
            } else {
                for j in 0..8 {
                    n[4 * j..4 * j + 4].copy_from_slice(&q[(j * R + lane) * 4..(j * R + lane) * 4 + 4]);
                }
            }
            if self.ty.has_min() {
                let (d, m) = (self.d.get(at + lane), self.m.get(at + lane));
                for (v, &c) in o.iter_mut().zip(&n) {
                    *v = d * c as f32 + m;
                }
            } else if self.ty.half_scales() {
                let d2 = self.d2[(g * nb + b) * R + lane];
                let d = self.d.get(at + lane);
                for (i, (v, &c)) in o.iter_mut().zip(&n).enumerate() {
                    *v = if i < QK / 2 { d } else { d2 } * (c as f32 - off);
                }
            } else {
                let d = self.d.get(at + lane);
                for (v, &c) in o.iter_mut().zip(&n) {
                    *v = d * (c as f32 - off);
                }
            }
        }
    }

    /// Columns `c0 .. c0 + w` (`c0`, `w` multiples of 32) of every row, dequantized into
    /// `out` `[rows, w]` row-major.
    fn dequant_panel(&self, c0: usize, w: usize, out: &mut [f32]) {
        let mut blk = [[0f32; QK]; R];
        for g in 0..self.rows.div_ceil(R) {
            for bi in 0..w / QK {
                self.dequant_block(g, c0 / QK + bi, &mut blk);
                for (lane, vals) in blk.iter().enumerate().take(self.rows - g * R) {
                    let r = g * R + lane;
                    out[r * w + bi * QK..r * w + (bi + 1) * QK].copy_from_slice(vals);
                }
            }
        }
    }

    /// The whole weight dequantized, `[rows, cols]` row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequant_panel(0, self.cols, &mut out);
        out
    }

    fn check_shapes(&self, what: &str, x: usize, xw: usize, m: usize, y: usize, yw: usize) -> Result<()> {
        if x != m * xw || y != m * yw {
            return Err(PeftError::ShapeMismatch {
                name: format!("{} ({what})", self.name),
                expected: vec![m * xw, m * yw],
                found: vec![x, y],
            });
        }
        Ok(())
    }

    /// `y = (acc ? y : 0) + x·Wᵀ`: `x` `[m, cols]` f32 row-major, `y` `[m, rows]` f32 row-major.
    /// From [`AMX_MIN_ROWS`] rows where [`amx_bf16`] is on (whatever the rows are: a prompt, a
    /// training batch, or 32 or more sequences decoding together), on AMX in bf16
    /// ([`QuantWeight::matmul_t_amx`]); otherwise through [`Kernel::best`] with activations
    /// quantized to 8 bits per block of 32 (error bound in the module docs), on the engine's
    /// thread pool, blocked over 16-row groups of `W` and 64-row tiles of `x` (one row, decoding,
    /// is split over groups only).
    ///
    /// Errors: `ERR_SHAPE_MISMATCH` when `x.len() != m·cols` or `y.len() != m·rows`.
    pub fn matmul_t(&self, x: &[f32], m: usize, y: &mut [f32], acc: bool) -> Result<()> {
        if m >= AMX_MIN_ROWS && amx_bf16() {
            return self.matmul_t_amx(x, m, y, acc);
        }
        self.matmul_t_with(Kernel::best(), x, m, y, acc)
    }

    /// [`QuantWeight::matmul_t`] on AMX in bf16 (the batched path, see the module docs): blocks
    /// of 32 rows of `W` are dequantized to `f32` and rounded to bf16, `x` is rounded to bf16,
    /// and `TDPBF16PS` accumulates in `f32`. Error bound against `x·Wᵀ` in exact arithmetic on
    /// the dequantized `W`: `|Δy_j| ≤ (2⁻⁷ + 2⁻¹⁶)·Σ_i |x_i·W_ji|` plus `f32` accumulation
    /// rounding (the same order as the 8-bit activation bound of the integer kernels, see
    /// [`amx_bf16`]).
    ///
    /// Errors: as `matmul_t`, and `ERR_INVALID_ARGUMENT` where AMX-BF16 is not available
    /// ([`super::amx::available`]).
    pub fn matmul_t_amx(&self, x: &[f32], m: usize, y: &mut [f32], acc: bool) -> Result<()> {
        self.check_shapes("x·Wᵀ", x.len(), self.cols, m, y.len(), self.rows)?;
        amx_required()?;
        if m == 0 {
            return Ok(());
        }
        let (n, k, threads) = (self.rows, self.cols, super::num_threads().max(1));
        let mut dst = super::gemm::Dst::of(y, m, n);
        super::pool().install(|| super::amx::gemm_with(&mut dst, super::gemm::View::of(x, m, k), &RowsT(self), 1.0, acc, threads, 1));
        Ok(())
    }

    /// [`QuantWeight::matmul_t`] with a chosen kernel (for tests and benchmarks).
    ///
    /// Errors: as `matmul_t`, and `ERR_INVALID_ARGUMENT` for a kernel this CPU cannot run.
    pub fn matmul_t_with(&self, kernel: Kernel, x: &[f32], m: usize, y: &mut [f32], acc: bool) -> Result<()> {
        self.check_shapes("x·Wᵀ", x.len(), self.cols, m, y.len(), self.rows)?;
        if !kernel.available() {
            return Err(PeftError::invalid_arg("kernel", format!("{} is not supported by this CPU", kernel.name())));
        }
        if m == 0 {
            return Ok(());
        }
        let mut xa = QAct::quantize(x, m, self.cols);
        if self.ty.half_scales() {
            xa.sum16 = xa.q.chunks_exact(QK / 2).map(|c| c.iter().map(|&v| v as i32).sum()).collect();
        }
        self.run_t(kernel, &xa, y, acc);
        Ok(())
    }

    fn run_t(&self, kernel: Kernel, xa: &QAct, y: &mut [f32], acc: bool) {
        run_parts(kernel, xa, &mut [MultiPart { w: self, y, bias: None, lora: Vec::new() }], acc);
    }

    fn kernel_call(&self, kernel: Kernel, g: usize, xa: &QAct, r: usize, mr: usize, out: &mut [[f32; R]; 8]) {
        let nb = self.cols / QK;
        let gbb = self.ty.group_block_bytes();
        let args = Args {
            nb,
            wq: self.q[g * nb * gbb..(g + 1) * nb * gbb].as_ptr(),
            wd: self.d.ptr(g * nb * R),
            wm: if self.ty.has_min() { self.m.ptr(g * nb * R) } else { std::ptr::null() },
            xq: xa.q[r * xa.k..].as_ptr(),
            ldx: xa.k,
            xs: xa.s[r * nb..].as_ptr(),
            xsum: xa.sum[r * nb..].as_ptr(),
            xss: xa.ss[r * nb..].as_ptr(),
            ldb: nb,
            ty: self.ty,
            wd2: if self.ty.half_scales() { self.d2[g * nb * R..(g + 1) * nb * R].as_ptr() } else { std::ptr::null() },
            xsum16: if self.ty.half_scales() { xa.sum16[r * 2 * nb..].as_ptr() } else { std::ptr::null() },
        };
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => {
                // SAFETY: the kernel was checked to be available; Args points into live buffers
                // of the sizes the kernel reads (nb blocks of one group, mr rows of x).
                unsafe { x86::dispatch_512(&args, mr, out) }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => unsafe { x86::dispatch_256::<true>(&args, mr, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::dispatch_256::<false>(&args, mr, out) },
            _ => scalar_kernel(&args, mr, out),
        }
    }

    /// `dX = (acc ? dX : 0) + dY·W`: `dy` `[m, rows]` f32, `dx` `[m, cols]` f32 (the input
    /// gradient of `x·Wᵀ`). From [`AMX_MIN_ROWS`] rows where [`amx_bf16`] is on, on AMX in bf16
    /// ([`QuantWeight::matmul_amx`], relative error about 2⁻⁷ per product term); otherwise
    /// through dequantized `f32` panels ([`QuantWeight::matmul_panels`]: exact up to `f32`
    /// rounding at the default matmul precision).
    ///
    /// Errors: `ERR_SHAPE_MISMATCH` when `dy.len() != m·rows` or `dx.len() != m·cols`.
    pub fn matmul(&self, dy: &[f32], m: usize, dx: &mut [f32], acc: bool) -> Result<()> {
        if m >= AMX_MIN_ROWS && amx_bf16() {
            return self.matmul_amx(dy, m, dx, acc);
        }
        self.matmul_panels(dy, m, dx, acc)
    }

    /// [`QuantWeight::matmul`] on AMX in bf16 (the batched path): `dY` and blocks of 32 columns
    /// of the dequantized `W` rounded to bf16, `f32` accumulation, the inner dimension (`W`'s
    /// rows) taken [`AMX_K_CHUNK`] at a time (bounds the converted `dY` panel). Error
    /// bound: `|ΔdX_i| ≤ (2⁻⁷ + 2⁻¹⁶)·Σ_j |dY_j·W_ji|` plus `f32` accumulation rounding.
    ///
    /// Errors: as `matmul`, and `ERR_INVALID_ARGUMENT` where AMX-BF16 is not available.
    pub fn matmul_amx(&self, dy: &[f32], m: usize, dx: &mut [f32], acc: bool) -> Result<()> {
        self.check_shapes("dY·W", dy.len(), self.rows, m, dx.len(), self.cols)?;
        amx_required()?;
        if m == 0 {
            return Ok(());
        }
        let (n, k, threads) = (self.rows, self.cols, super::num_threads().max(1));
        let mut dst = super::gemm::Dst::of(dx, m, k);
        super::pool().install(|| {
            let mut r0 = 0;
            while r0 < n {
                let kc = AMX_K_CHUNK.min(n - r0);
                let a = super::gemm::View::rm(dy, r0, m, kc, n);
                super::amx::gemm_with(&mut dst, a, &ColsOf { w: self, r0, rows: kc }, 1.0, acc || r0 > 0, threads, 1);
                r0 += kc;
            }
        });
        Ok(())
    }

    /// [`QuantWeight::matmul`] through dequantized `f32` panels: panels of up to 256 columns of
    /// `W` are dequantized and multiplied with the engine's GEMM at the float32 matmul precision
    /// ([`super::gemm::gemm`]), in parallel over panels; exact up to `f32` rounding at the
    /// default precision.
    ///
    /// Errors: as `matmul`.
    pub fn matmul_panels(&self, dy: &[f32], m: usize, dx: &mut [f32], acc: bool) -> Result<()> {
        self.check_shapes("dY·W", dy.len(), self.rows, m, dx.len(), self.cols)?;
        if m == 0 {
            return Ok(());
        }
        let (n, k) = (self.rows, self.cols);
        let pw = panel_width(k, super::num_threads());
        let panels = k.div_ceil(pw);
        let dxp = SyncMut(dx.as_mut_ptr());
        let task = |p: usize| {
            let (c0, c1) = (p * pw, ((p + 1) * pw).min(k));
            let w = c1 - c0;
            let mut panel = vec![0f32; n * w];
            self.dequant_panel(c0, w, &mut panel);
            // SAFETY: dx is [m, k] (checked); this task writes only columns c0..c1.
            let mut dst = unsafe { super::gemm::Dst::raw(dxp.get().add(c0), m, w, k) };
            super::gemm::gemm(&mut dst, super::gemm::View::of(dy, m, n), super::gemm::View::of(&panel, n, w), 1.0, acc, 1);
        };
        if panels == 1 || m * n * k < (1 << 20) {
            (0..panels).for_each(task);
        } else {
            use rayon::prelude::*;
            super::pool().install(|| (0..panels).into_par_iter().for_each(task));
        }
        Ok(())
    }
}

/// Rows of `x` (or `dY`) from which [`QuantWeight::matmul_t`] and [`QuantWeight::matmul`] take
/// the AMX bf16 path where it is on ([`amx_bf16`]): below it (decoding, short prompts) the
/// integer kernels read the packed codes directly, while the AMX path dequantizes the whole
/// weight on every call.
pub const AMX_MIN_ROWS: usize = 32;

/// Inner-dimension chunk (rows of `W`) of the AMX input gradient: one packed block of `W` is
/// 32 × 4096 bf16 (256 KiB, L2-resident while the rows of `dY` pass over it) and the converted
/// `dY` panel at most 8 KiB per row; the head's 49152 rows at once would make each block
/// 3 MiB.
const AMX_K_CHUNK: usize = 4096;

/// Whether batched products of weights kept quantized (at least [`AMX_MIN_ROWS`] rows) run on
/// AMX in bf16: true where AMX-BF16 is available ([`super::amx::available`]) unless the
/// environment sets `PEFT_QUANT_AMX=0` or caps the integer kernel with `PEFT_QUANT_KERNEL`
/// (for comparisons). Read once per process.
///
/// This is the QLoRA arrangement (Dettmers et al. 2023: 4-bit storage, bf16 compute; HF's
/// `bnb_4bit_compute_dtype=torch.bfloat16`). Rounding both operands to bf16 (8 significant
/// bits, relative error ≤ 2⁻⁸ each) bounds the error per product term by
/// `(2⁻⁷ + 2⁻¹⁶)·|x_i·W_ji|`; the integer kernels' bound for 8-bit activations is
/// `|W_ji|·max_b|x|/254` per term, so the bf16 bound is the tighter one for activations below
/// half their block's maximum and at most 2× looser at the maximum. One `TDPBF16PS` does 8192
/// multiply-adds.
pub fn amx_bf16() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        super::amx::available() && std::env::var_os("PEFT_QUANT_KERNEL").is_none() && std::env::var("PEFT_QUANT_AMX").map_or(true, |v| v != "0")
    })
}

/// Which kernels the products of weights kept quantized run on in this process (for status
/// reports; the values are [`Kernel::name`]s and `"amx-bf16"` / `"f32-panels"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelPaths {
    /// `x·Wᵀ` below [`AMX_MIN_ROWS`] rows (decoding): the integer kernel, e.g. `"avx512vnni"`.
    pub few_rows: &'static str,
    /// `x·Wᵀ` from [`AMX_MIN_ROWS`] rows (prefill, training): `"amx-bf16"` where [`amx_bf16`]
    /// is on, else the integer kernel.
    pub batched: &'static str,
    /// `dY·W` (the input gradient in training) from [`AMX_MIN_ROWS`] rows: `"amx-bf16"` where
    /// [`amx_bf16`] is on, else `"f32-panels"` (dequantized panels, f32 products).
    pub input_gradient: &'static str,
}

/// The kernels chosen for this CPU and environment (`PEFT_QUANT_KERNEL`, `PEFT_QUANT_AMX`).
pub fn kernel_paths() -> KernelPaths {
    let k = Kernel::best().name();
    let amx = amx_bf16();
    KernelPaths { few_rows: k, batched: if amx { "amx-bf16" } else { k }, input_gradient: if amx { "amx-bf16" } else { "f32-panels" } }
}

/// `ERR_INVALID_ARGUMENT` where AMX-BF16 cannot run (the AMX products' precondition).
fn amx_required() -> Result<()> {
    if super::amx::available() {
        Ok(())
    } else {
        Err(PeftError::invalid_arg("kernel", "AMX-BF16 is not available on this CPU (or not granted by the kernel)"))
    }
}

/// `Wᵀ` `[cols, rows]` as the right operand of `x·Wᵀ` on AMX: block `j0 .. j0 + 32` is rows
/// `j0 .. j0 + 32` of `W` (two groups of 16), dequantized.
struct RowsT<'a>(&'a QuantWeight);

impl super::amx::PackB for RowsT<'_> {
    fn rows(&self) -> usize {
        self.0.cols
    }
    fn cols(&self) -> usize {
        self.0.rows
    }
    /// Single pass only (the quantized products are bf16); AMX runs only on x86_64 with
    /// AVX-512F/BW, so there is no other packer.
    fn pack(&self, j0: usize, bp: &mut [u16], kp: usize, passes: usize) {
        assert!(passes == 1 && kp == self.0.cols, "quantized AMX products are single-pass");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AMX machines have AVX-512F/BW (checked by `amx::available`, the only way
        // here); bp holds the block's 32 × kp elements (amx::gemm_with's contract).
        unsafe {
            avx512::pack_rows_t(self.0, j0, bp)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("AMX is x86_64 only ({j0}, {})", bp.len());
    }
}

/// Rows `r0 .. r0 + rows` of `W` `[rows, cols]` as the right operand of `dY·W` on AMX: block
/// `j0 .. j0 + 32` is one block of 32 columns of those rows, dequantized.
struct ColsOf<'a> {
    w: &'a QuantWeight,
    r0: usize,
    rows: usize,
}

impl super::amx::PackB for ColsOf<'_> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.w.cols
    }
    /// Single pass only, as [`RowsT`]'s.
    fn pack(&self, j0: usize, bp: &mut [u16], kp: usize, passes: usize) {
        assert!(passes == 1, "quantized AMX products are single-pass");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in RowsT::pack; rows r0 .. r0 + rows lie inside W (matmul_amx's chunks).
        unsafe {
            avx512::pack_cols(self.w, self.r0, self.rows, j0 / QK, bp, kp)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("AMX is x86_64 only ({j0}, {kp}, {})", bp.len());
    }
}

/// The AMX packers without the `f32` detour: codes dequantized in registers (`d·n + m`),
/// rounded to bf16 (nearest even) and written straight into the pair-interleaved layout of
/// [`super::amx::pack_b_block`] (single pass).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{QuantWeight, QK, R};
    use std::arch::x86_64::*;

    /// 16 floats to bfloat16, round to nearest even (finite inputs: scales are checked at load).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn bf16(x: __m512) -> __m256i {
        let b = _mm512_castps_si512(x);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)))))
    }

    /// Per-row scale and additive term of group `g`, block `b` (elements 0..16 and 16..32:
    /// they differ for `Q6_K` only): `w = s·n + a`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn scales(w: &QuantWeight, g: usize, b: usize) -> [(__m512, __m512); 2] {
        let at = (g * (w.cols / QK) + b) * R;
        let s = w.d.load16(at);
        let off = _mm512_set1_ps(-(w.ty.offset() as f32));
        let a = if w.ty.has_min() { w.m.load16(at) } else { _mm512_mul_ps(s, off) };
        if w.ty.half_scales() {
            let s2 = _mm512_loadu_ps(w.d2.as_ptr().add(at));
            [(s, a), (s2, _mm512_mul_ps(s2, off))]
        } else {
            [(s, a), (s, a)]
        }
    }

    /// 64 codes `[16 rows][4 consecutive elements]` dequantized with the rows' `s`, `a` and
    /// stored as two pair rows of a panel (`[16 rows][2]` bf16 each): elements 0, 1 at `out`,
    /// elements 2, 3 at `out + 32`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn emit_rows(codes: __m512i, s: __m512, a: __m512, out: *mut u16) {
        let mut h = [_mm256_setzero_si256(); 4];
        for (i, hi) in h.iter_mut().enumerate() {
            // Lanes 4i .. 4i + 4, each repeated for its 4 elements.
            let base = 4 * i as i32;
            let idx = _mm512_setr_epi32(base, base, base, base, base + 1, base + 1, base + 1, base + 1, base + 2, base + 2, base + 2, base + 2, base + 3, base + 3, base + 3, base + 3);
            let n = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(match i {
                0 => _mm512_extracti32x4_epi32::<0>(codes),
                1 => _mm512_extracti32x4_epi32::<1>(codes),
                2 => _mm512_extracti32x4_epi32::<2>(codes),
                _ => _mm512_extracti32x4_epi32::<3>(codes),
            }));
            *hi = bf16(_mm512_fmadd_ps(n, _mm512_permutexvar_ps(idx, s), _mm512_permutexvar_ps(idx, a)));
        }
        let lo8 = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(h[0]), h[1]);
        let hi8 = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(h[2]), h[3]);
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        _mm512_storeu_si512(out as *mut __m512i, _mm512_permutex2var_epi32(lo8, even, hi8));
        _mm512_storeu_si512(out.add(32) as *mut __m512i, _mm512_permutex2var_epi32(lo8, odd, hi8));
    }

    /// `RowsT` block `j0 .. j0 + 32`: rows `j0 ..` of `W` (groups `j0/16`, `j0/16 + 1`) as the
    /// columns of two panels `[cols/2][16][2]`; a group past `W`'s rows is zero.
    ///
    /// # Safety
    /// AVX-512F/BW; `bp` holds `32 · w.cols` elements; `j0` a multiple of 32 below `w.rows`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_rows_t(w: &QuantWeight, j0: usize, bp: &mut [u16]) {
        let (k, nb, gbb) = (w.cols, w.cols / QK, w.ty.group_block_bytes());
        debug_assert!(bp.len() >= 32 * k);
        let mask = _mm512_set1_epi8(0x0F);
        for q in 0..2 {
            let g = j0 / R + q;
            let panel = bp.as_mut_ptr().add(q * R * k);
            if g * R >= w.rows {
                std::ptr::write_bytes(panel, 0, R * k);
                continue;
            }
            for b in 0..nb {
                let [(s, a), (s2, a2)] = scales(w, g, b);
                let qb = w.q.as_ptr().add((g * nb + b) * gbb);
                let pr = panel.add(b * QK / 2 * 32); // pair row 16b
                if w.ty.nibbles() {
                    for j in 0..4 {
                        let v = _mm512_loadu_si512(qb.add(j * 64) as *const __m512i);
                        emit_rows(_mm512_and_si512(v, mask), s, a, pr.add(2 * j * 32));
                        emit_rows(_mm512_and_si512(_mm512_srli_epi16::<4>(v), mask), s, a, pr.add((8 + 2 * j) * 32));
                    }
                } else {
                    for j in 0..8 {
                        let v = _mm512_loadu_si512(qb.add(j * 64) as *const __m512i);
                        let (s, a) = if j < 4 { (s, a) } else { (s2, a2) };
                        emit_rows(v, s, a, pr.add(2 * j * 32));
                    }
                }
            }
        }
    }

    /// The 32 elements of block `b` of row `r`, dequantized to bf16: (elements 0..16, 16..32).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn row_bf16(w: &QuantWeight, r: usize, b: usize) -> (__m256i, __m256i) {
        let (nb, gbb) = (w.cols / QK, w.ty.group_block_bytes());
        let (g, lane) = (r / R, r % R);
        let qb = w.q.as_ptr().add((g * nb + b) * gbb + lane * 4);
        let at = (g * nb + b) * R + lane;
        let d = w.d.get(at);
        let off = -(w.ty.offset() as f32);
        let (s0, a0) = (d, if w.ty.has_min() { w.m.get(at) } else { d * off });
        let (s1, a1) = if w.ty.half_scales() {
            let d2 = *w.d2.get_unchecked(at);
            (d2, d2 * off)
        } else {
            (s0, a0)
        };
        let word = |j: usize| (qb.add(j * 64) as *const i32).read_unaligned();
        let (n0, n1) = if w.ty.nibbles() {
            let v = _mm_setr_epi32(word(0), word(1), word(2), word(3));
            let m = _mm_set1_epi8(0x0F);
            (_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16::<4>(v), m))
        } else {
            (_mm_setr_epi32(word(0), word(1), word(2), word(3)), _mm_setr_epi32(word(4), word(5), word(6), word(7)))
        };
        let f = |n: __m128i, s: f32, a: f32| bf16(_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(n)), _mm512_set1_ps(s), _mm512_set1_ps(a)));
        (f(n0, s0, a0), f(n1, s1, a1))
    }

    /// `ColsOf` block: columns `32b .. 32b + 32` of rows `r0 .. r0 + kr` of `W` as two panels
    /// `[kp/2][16][2]` (rows of `W` paired), zero past `kr`.
    ///
    /// # Safety
    /// AVX-512F/BW; `bp` holds `32 · kp` elements, `kp ≥ kr` even; `r0 + kr ≤ w.rows`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_cols(w: &QuantWeight, r0: usize, kr: usize, b: usize, bp: &mut [u16], kp: usize) {
        debug_assert!(bp.len() >= 32 * kp && r0 + kr <= w.rows);
        let out = bp.as_mut_ptr();
        let zero = _mm256_setzero_si256();
        let pair = |e: __m256i, o: __m256i| _mm512_or_si512(_mm512_cvtepu16_epi32(e), _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(o)));
        for p in 0..kp / 2 {
            let (ra, rb) = (2 * p, 2 * p + 1);
            let (a0, a1) = if ra < kr { row_bf16(w, r0 + ra, b) } else { (zero, zero) };
            let (b0, b1) = if rb < kr { row_bf16(w, r0 + rb, b) } else { (zero, zero) };
            _mm512_storeu_si512(out.add(p * 32) as *mut __m512i, pair(a0, b0));
            _mm512_storeu_si512(out.add(R * kp + p * 32) as *mut __m512i, pair(a1, b1));
        }
    }
}

/// Activations quantized per row and block of 32: `x[r, b·32 + i] ≈ s[r, b]·q[r, b·32 + i]`.
struct QAct {
    m: usize,
    k: usize,
    /// `[m, k]` codes in `[−127, 127]`.
    q: Vec<i8>,
    /// `[m, k/32]` scales `max|x|/127` (NaN when the block holds a NaN or an infinity, so
    /// that the output is NaN as the f32 product would be).
    s: Vec<f32>,
    /// `[m, k/32]` sums of the codes.
    sum: Vec<i32>,
    /// `[m, k/32]` `s · Σq` (the minimum term's factor), precomputed.
    ss: Vec<f32>,
    /// `[m, k/16]` sums of the codes per half block (for `Q6_K`'s per-16 scales; else empty).
    sum16: Vec<i32>,
}

impl QAct {
    fn quantize(x: &[f32], m: usize, k: usize) -> QAct {
        let nb = k / QK;
        let mut a = QAct { m, k, q: vec![0i8; m * k], s: vec![0f32; m * nb], sum: vec![0i32; m * nb], ss: Vec::new(), sum16: Vec::new() };
        type Item<'a> = (&'a [f32], (&'a mut [i8], (&'a mut f32, &'a mut i32)));
        #[cfg(target_arch = "x86_64")]
        let wide = super::simd::level() >= 3;
        let fill = |(xb, (qb, (s, sum))): Item| {
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: AVX-512F is present (level 3); the block has QK = 32 elements.
                unsafe { quantize_block_avx512(xb, qb, s, sum) };
                return;
            }
            quantize_block(xb, qb, s, sum);
        };
        if m * k >= 1 << 16 {
            use rayon::prelude::*;
            let pit = x.par_chunks_exact(QK).zip(a.q.par_chunks_exact_mut(QK).zip(a.s.par_iter_mut().zip(a.sum.par_iter_mut())));
            super::pool().install(|| pit.for_each(fill));
        } else {
            x.chunks_exact(QK).zip(a.q.chunks_exact_mut(QK).zip(a.s.iter_mut().zip(a.sum.iter_mut()))).for_each(fill);
        }
        a.ss = a.s.iter().zip(&a.sum).map(|(&s, &t)| s * t as f32).collect();
        a
    }
}

/// One block of 32 activations to 8 bits ([`QAct::quantize`]): scale `d = max|x|/127` (NaN
/// when the block holds a NaN or an infinity, so that the product is NaN as in `f32`), codes
/// `round(x/d)` (ties away from zero) clamped to ±127, and their sum.
fn quantize_block(xb: &[f32], qb: &mut [i8], s: &mut f32, sum: &mut i32) {
    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
    // NaN when the block holds a NaN or an infinity (x·0 is NaN for those only).
    let poison = xb.iter().fold(0f32, |a, v| a + v * 0.0);
    let d = amax / 127.0;
    let id = if d > 0.0 { 127.0 / amax } else { 0.0 };
    let mut t = 0i32;
    for (q, v) in qb.iter_mut().zip(xb) {
        let c = (v * id).round().clamp(-127.0, 127.0) as i32;
        *q = c as i8;
        t += c;
    }
    *s = d + poison;
    *sum = t;
}

/// One block of [`QAct::quantize`] on AVX-512, equal to the scalar code bit for bit: scale
/// `max|x|/127` (NaN when the block holds a NaN or an infinity), codes `round(x·127/max|x|)`
/// with ties away from zero (as `f32::round`) clamped to ±127 (0 for NaN), and their sum.
///
/// # Safety
/// AVX-512F; `xb` and `qb` hold 32 elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_block_avx512(xb: &[f32], qb: &mut [i8], s: &mut f32, sum: &mut i32) {
    use std::arch::x86_64::*;
    debug_assert!(xb.len() == QK && qb.len() == QK);
    let v = [_mm512_loadu_ps(xb.as_ptr()), _mm512_loadu_ps(xb.as_ptr().add(16))];
    // max|x| ignoring NaN (vmaxps returns its second operand when either is NaN, as
    // `f32::max` keeps the number); non-finite lanes are those where x·0 is not 0.
    let zero = _mm512_setzero_ps();
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[1]), _mm512_max_ps(_mm512_abs_ps(v[0]), zero)));
    let bad = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(_mm512_mul_ps(v[0], zero), zero) | _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(_mm512_mul_ps(v[1], zero), zero);
    let d = amax / 127.0;
    let id = _mm512_set1_ps(if d > 0.0 { 127.0 / amax } else { 0.0 });
    let lim = _mm512_set1_ps(127.0);
    let mut total = _mm512_setzero_si512();
    for (h, &vh) in v.iter().enumerate() {
        let y = _mm512_mul_ps(vh, id);
        // Round to nearest even, then move exact ties away from zero (`f32::round`).
        let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
        let frac = _mm512_sub_ps(y, t);
        let tie = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(frac), _mm512_set1_ps(0.5));
        let away = _mm512_add_ps(t, _mm512_mul_ps(frac, _mm512_set1_ps(2.0)));
        let r = _mm512_mask_blend_ps(tie, r, away);
        let r = _mm512_max_ps(_mm512_min_ps(r, lim), _mm512_set1_ps(-127.0));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(y, y);
        let c = _mm512_maskz_cvtps_epi32(!nan, r);
        _mm_storeu_si128(qb.as_mut_ptr().add(16 * h) as *mut __m128i, _mm512_cvtepi32_epi8(c));
        total = _mm512_add_epi32(total, c);
    }
    *s = if bad != 0 { f32::NAN } else { d };
    *sum = _mm512_reduce_add_epi32(total);
}

/// Raw operands of one kernel call: one group of 16 rows of `W` over all `nb` blocks, and
/// `mr` rows of quantized activations.
struct Args {
    nb: usize,
    wq: *const u8,
    /// Scales `d` ([`Scales`]: f16 bits for the types of [`QuantType::f16_scales`], else f32).
    wd: *const u8,
    /// Minimums `m`, stored as `wd` (types with a minimum), else null.
    wm: *const u8,
    xq: *const i8,
    ldx: usize,
    xs: *const f32,
    xsum: *const i32,
    xss: *const f32,
    ldb: usize,
    ty: QuantType,
    /// Scales of elements 16..32 of each block (`Q6_K`), else null.
    wd2: *const f32,
    /// `[rows, 2·ldb]` half-block code sums (`Q6_K`), else null.
    xsum16: *const i32,
}

/// Portable kernel: the same arithmetic as the vector kernels (exact i32 block sums, scales
/// folded in f32), one row of `x` at a time.
fn scalar_kernel(a: &Args, mr: usize, out: &mut [[f32; R]; 8]) {
    let gbb = a.ty.group_block_bytes();
    for (rr, o) in out.iter_mut().enumerate().take(mr) {
        *o = [0f32; R];
        for b in 0..a.nb {
            // SAFETY: Args points at nb blocks of one group and mr rows of activations.
            let (wq, xq) = unsafe { (std::slice::from_raw_parts(a.wq.add(b * gbb), gbb), std::slice::from_raw_parts(a.xq.add(rr * a.ldx + b * QK), QK)) };
            let (s, sum) = unsafe { (*a.xs.add(rr * a.ldb + b), *a.xsum.add(rr * a.ldb + b)) };
            if a.ty.half_scales() {
                // SAFETY: Q6_K calls carry the half-block sums and second scales.
                let sums = unsafe { [*a.xsum16.add(rr * 2 * a.ldb + 2 * b), *a.xsum16.add(rr * 2 * a.ldb + 2 * b + 1)] };
                for (lane, ol) in o.iter_mut().enumerate() {
                    let mut dots = [-a.ty.offset() * sums[0], -a.ty.offset() * sums[1]];
                    for i in 0..QK {
                        dots[i / 16] += wq[((i / 4) * R + lane) * 4 + i % 4] as i32 * xq[i] as i32;
                    }
                    let (d, d2) = unsafe { (Scales::read(a.wd, b * R + lane, false), *a.wd2.add(b * R + lane)) };
                    *ol += dots[0] as f32 * d * s;
                    *ol += dots[1] as f32 * d2 * s;
                }
                continue;
            }
            for (lane, ol) in o.iter_mut().enumerate() {
                let mut dot = -a.ty.offset() * sum;
                for i in 0..QK {
                    let n = if a.ty.nibbles() {
                        let v = wq[(((i % 16) / 4) * R + lane) * 4 + i % 4];
                        if i < 16 {
                            v & 0xF
                        } else {
                            v >> 4
                        }
                    } else {
                        wq[((i / 4) * R + lane) * 4 + i % 4]
                    };
                    dot += n as i32 * xq[i] as i32;
                }
                let half = a.ty.f16_scales();
                let d = unsafe { Scales::read(a.wd, b * R + lane, half) };
                *ol += dot as f32 * d * s;
                if a.ty.has_min() {
                    *ol += unsafe { Scales::read(a.wm, b * R + lane, half) } * (s * sum as f32);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Args, QuantType, QK, R};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn xword(a: &Args, r: usize, b: usize, j: usize) -> i32 {
        std::ptr::read_unaligned(a.xq.add(r * a.ldx + b * QK + 4 * j) as *const i32)
    }

    /// AVX-512 VNNI: `MR` rows of x against one 16-row group, one zmm per row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    unsafe fn k512<const MR: usize, const T: u8>(a: &Args, out: &mut [[f32; R]; 8]) {
        // T: 0 = Q8_0 (offset 128), 1 = Q4_0 (offset 8), 2 = Q4_K (with minimum), 3 = Q6_K
        // (offset 32, two scales per block), 4 = Q4_1 (with minimum); f16 scales for 0, 1, 4.
        let (min, half) = (T == 2 || T == 4, T == 0 || T == 1 || T == 4);
        debug_assert_eq!(half, a.ty.f16_scales());
        let off: i32 = match T {
            0 => 128,
            1 => 8,
            _ => 0,
        };
        let gbb = if T == 0 { R * QK } else { R * QK / 2 };
        let mut facc = [_mm512_setzero_ps(); MR];
        let lo4 = _mm512_set1_epi8(0x0F);
        for b in 0..a.nb {
            if T == 3 {
                // Q6_K: codes 0..63 (offset 32) one byte each, a scale per 16 elements: elements
                // 0..16 (words j < 4) and 16..32 (j >= 4) accumulate apart.
                let mut lo = [_mm512_setzero_si512(); MR];
                let mut hi = [_mm512_setzero_si512(); MR];
                for r in 0..MR {
                    lo[r] = _mm512_set1_epi32(-32 * *a.xsum16.add(r * 2 * a.ldb + 2 * b));
                    hi[r] = _mm512_set1_epi32(-32 * *a.xsum16.add(r * 2 * a.ldb + 2 * b + 1));
                }
                let wq = a.wq.add(b * R * QK);
                for j in 0..4 {
                    let w = _mm512_loadu_si512(wq.add(j * 64) as *const _);
                    let w2 = _mm512_loadu_si512(wq.add((j + 4) * 64) as *const _);
                    for r in 0..MR {
                        lo[r] = _mm512_dpbusd_epi32(lo[r], w, _mm512_set1_epi32(xword(a, r, b, j)));
                        hi[r] = _mm512_dpbusd_epi32(hi[r], w2, _mm512_set1_epi32(xword(a, r, b, j + 4)));
                    }
                }
                let d = _mm512_loadu_ps(a.wd.add(4 * b * R) as *const f32);
                let d2 = _mm512_loadu_ps(a.wd2.add(b * R));
                for r in 0..MR {
                    let s = _mm512_set1_ps(*a.xs.add(r * a.ldb + b));
                    facc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo[r]), d), s, facc[r]);
                    facc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi[r]), d2), s, facc[r]);
                }
                continue;
            }
            let mut iacc = [_mm512_setzero_si512(); MR];
            for (r, ia) in iacc.iter_mut().enumerate() {
                *ia = _mm512_set1_epi32(-off * *a.xsum.add(r * a.ldb + b));
            }
            let wq = a.wq.add(b * gbb);
            if T == 0 {
                for j in 0..8 {
                    let w = _mm512_loadu_si512(wq.add(j * 64) as *const _);
                    for (r, ia) in iacc.iter_mut().enumerate() {
                        *ia = _mm512_dpbusd_epi32(*ia, w, _mm512_set1_epi32(xword(a, r, b, j)));
                    }
                }
            } else {
                for j in 0..4 {
                    let p = _mm512_loadu_si512(wq.add(j * 64) as *const _);
                    let lo = _mm512_and_si512(p, lo4);
                    let hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), lo4);
                    for (r, ia) in iacc.iter_mut().enumerate() {
                        *ia = _mm512_dpbusd_epi32(*ia, lo, _mm512_set1_epi32(xword(a, r, b, j)));
                        *ia = _mm512_dpbusd_epi32(*ia, hi, _mm512_set1_epi32(xword(a, r, b, j + 4)));
                    }
                }
            }
            let d = load16(a.wd, b * R, half);
            let m = if min { load16(a.wm, b * R, half) } else { d };
            for r in 0..MR {
                let s = *a.xs.add(r * a.ldb + b);
                facc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(iacc[r]), d), _mm512_set1_ps(s), facc[r]);
                if min {
                    facc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(*a.xss.add(r * a.ldb + b)), facc[r]);
                }
            }
        }
        for r in 0..MR {
            _mm512_storeu_ps(out[r].as_mut_ptr(), facc[r]);
        }
    }

    pub(super) unsafe fn dispatch_512(a: &Args, mr: usize, out: &mut [[f32; R]; 8]) {
        macro_rules! go {
            ($t:literal) => {
                match mr {
                    1 => k512::<1, $t>(a, out),
                    2 => k512::<2, $t>(a, out),
                    3 => k512::<3, $t>(a, out),
                    4 => k512::<4, $t>(a, out),
                    5 => k512::<5, $t>(a, out),
                    6 => k512::<6, $t>(a, out),
                    7 => k512::<7, $t>(a, out),
                    _ => k512::<8, $t>(a, out),
                }
            };
        }
        match a.ty {
            QuantType::Q8_0 => go!(0),
            QuantType::Q4_0 => go!(1),
            QuantType::Q6K => go!(3),
            QuantType::Q4_1 => go!(4),
            QuantType::Q4K => go!(2),
        }
    }

    /// u8 × i8 sums of 4 into i32 lanes: `vpdpbusd` (AVX-VNNI) or `vpmaddubsw` + `vpmaddwd`
    /// (AVX2; the 16-bit pair sums cannot saturate for `u ≤ 15`, nor for `Q8_0`'s sign trick).
    macro_rules! k256 {
        ($name:ident, $feat:literal, $vnni:expr) => {
            #[target_feature(enable = $feat)]
            unsafe fn $name<const MR: usize, const T: u8>(a: &Args, out: &mut [[f32; R]; 8]) {
                #[target_feature(enable = $feat)]
                #[inline]
                unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i, ones: __m256i) -> __m256i {
                    if $vnni {
                        _mm256_dpbusd_avx_epi32(acc, u, s)
                    } else {
                        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones))
                    }
                }
                // On AVX2 Q8_0 uses q = n - 128 (signed) with |q| x sign(x, q): no offset term.
                let off: i32 = match T {
                    0 if $vnni => 128,
                    1 => 8,
                    _ => 0,
                };
                let gbb = if T == 0 { R * QK } else { R * QK / 2 };
                // T as in k512; f16 scales for 0, 1, 4.
                let (min, half) = (T == 2 || T == 4, T == 0 || T == 1 || T == 4);
                debug_assert_eq!(half, a.ty.f16_scales());
                let ones = _mm256_set1_epi16(1);
                let lo4 = _mm256_set1_epi8(0x0F);
                let flip = _mm256_set1_epi8(-128i8);
                let mut facc = [[_mm256_setzero_ps(); 2]; MR];
                for b in 0..a.nb {
                    if T == 3 {
                        // Q6_K: unsigned 6-bit codes (the 16-bit pair sums of maddubs stay below
                        // 2·63·127), elements 0..16 and 16..32 accumulated apart for their scales.
                        let mut lo = [[_mm256_setzero_si256(); 2]; MR];
                        let mut hi = [[_mm256_setzero_si256(); 2]; MR];
                        for r in 0..MR {
                            let (v, v2) = (*a.xsum16.add(r * 2 * a.ldb + 2 * b), *a.xsum16.add(r * 2 * a.ldb + 2 * b + 1));
                            lo[r] = [_mm256_set1_epi32(-32 * v); 2];
                            hi[r] = [_mm256_set1_epi32(-32 * v2); 2];
                        }
                        let wq = a.wq.add(b * R * QK);
                        for j in 0..4 {
                            for h in 0..2 {
                                let w = _mm256_loadu_si256(wq.add(j * 64 + h * 32) as *const _);
                                let w2 = _mm256_loadu_si256(wq.add((j + 4) * 64 + h * 32) as *const _);
                                for r in 0..MR {
                                    lo[r][h] = dot(lo[r][h], w, _mm256_set1_epi32(xword(a, r, b, j)), ones);
                                    hi[r][h] = dot(hi[r][h], w2, _mm256_set1_epi32(xword(a, r, b, j + 4)), ones);
                                }
                            }
                        }
                        for h in 0..2 {
                            let d = _mm256_loadu_ps(a.wd.add(4 * (b * R + h * 8)) as *const f32);
                            let d2 = _mm256_loadu_ps(a.wd2.add(b * R + h * 8));
                            for r in 0..MR {
                                let s = _mm256_set1_ps(*a.xs.add(r * a.ldb + b));
                                facc[r][h] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(lo[r][h]), d), s, facc[r][h]);
                                facc[r][h] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(hi[r][h]), d2), s, facc[r][h]);
                            }
                        }
                        continue;
                    }
                    let mut iacc = [[_mm256_setzero_si256(); 2]; MR];
                    for (r, ia) in iacc.iter_mut().enumerate() {
                        let v = _mm256_set1_epi32(-off * *a.xsum.add(r * a.ldb + b));
                        *ia = [v, v];
                    }
                    let wq = a.wq.add(b * gbb);
                    if T == 0 {
                        for j in 0..8 {
                            for h in 0..2 {
                                let w = _mm256_loadu_si256(wq.add(j * 64 + h * 32) as *const _);
                                for r in 0..MR {
                                    let x = _mm256_set1_epi32(xword(a, r, b, j));
                                    iacc[r][h] = if $vnni {
                                        dot(iacc[r][h], w, x, ones)
                                    } else {
                                        let q = _mm256_xor_si256(w, flip);
                                        dot(iacc[r][h], _mm256_abs_epi8(q), _mm256_sign_epi8(x, q), ones)
                                    };
                                }
                            }
                        }
                    } else {
                        for j in 0..4 {
                            for h in 0..2 {
                                let p = _mm256_loadu_si256(wq.add(j * 64 + h * 32) as *const _);
                                let lo = _mm256_and_si256(p, lo4);
                                let hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), lo4);
                                for r in 0..MR {
                                    iacc[r][h] = dot(iacc[r][h], lo, _mm256_set1_epi32(xword(a, r, b, j)), ones);
                                    iacc[r][h] = dot(iacc[r][h], hi, _mm256_set1_epi32(xword(a, r, b, j + 4)), ones);
                                }
                            }
                        }
                    }
                    for h in 0..2 {
                        let d = load8(a.wd, b * R + h * 8, half);
                        for r in 0..MR {
                            let s = *a.xs.add(r * a.ldb + b);
                            facc[r][h] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(iacc[r][h]), d), _mm256_set1_ps(s), facc[r][h]);
                            if min {
                                let m = load8(a.wm, b * R + h * 8, half);
                                facc[r][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(*a.xss.add(r * a.ldb + b)), facc[r][h]);
                            }
                        }
                    }
                }
                for r in 0..MR {
                    _mm256_storeu_ps(out[r].as_mut_ptr(), facc[r][0]);
                    _mm256_storeu_ps(out[r].as_mut_ptr().add(8), facc[r][1]);
                }
            }
        };
    }
    k256!(k256_vnni, "avx2,fma,f16c,avxvnni", true);
    k256!(k256_avx2, "avx2,fma,f16c", false);

    /// 16 scales at element `i` of `p` ([`super::Scales`] bytes: f16 when `half`, else f32).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const u8, i: usize, half: bool) -> __m512 {
        if half {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * i) as *const __m256i))
        } else {
            _mm512_loadu_ps(p.add(4 * i) as *const f32)
        }
    }

    /// 8 scales at element `i` of `p`, as [`load16`].
    #[inline]
    #[target_feature(enable = "avx,f16c")]
    unsafe fn load8(p: *const u8, i: usize, half: bool) -> __m256 {
        if half {
            _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i) as *const __m128i))
        } else {
            _mm256_loadu_ps(p.add(4 * i) as *const f32)
        }
    }

    pub(super) unsafe fn dispatch_256<const VNNI: bool>(a: &Args, mr: usize, out: &mut [[f32; R]; 8]) {
        macro_rules! go {
            ($f:ident, $t:literal) => {
                match mr {
                    1 => $f::<1, $t>(a, out),
                    _ => $f::<2, $t>(a, out),
                }
            };
        }
        match (VNNI, a.ty) {
            (true, QuantType::Q6K) => go!(k256_vnni, 3),
            (false, QuantType::Q6K) => go!(k256_avx2, 3),
            (true, QuantType::Q8_0) => go!(k256_vnni, 0),
            (true, QuantType::Q4_0) => go!(k256_vnni, 1),
            (true, QuantType::Q4_1) => go!(k256_vnni, 4),
            (true, QuantType::Q4K) => go!(k256_vnni, 2),
            (false, QuantType::Q8_0) => go!(k256_avx2, 0),
            (false, QuantType::Q4_0) => go!(k256_avx2, 1),
            (false, QuantType::Q4_1) => go!(k256_avx2, 4),
            (false, QuantType::Q4K) => go!(k256_avx2, 2),
        }
    }
}

/// One weight of [`matmul_t_multi`]: `y` `[m, w.rows()]` receives `x·Wᵀ`, then `bias`
/// (`[w.rows()]`), then each LoRA term `(h, B, r)`: `y += h·Bᵀ` with `h` `[m, r]` (already
/// scaled) and `B` `[w.rows(), r]`, all row-major f32.
pub struct MultiPart<'a> {
    pub w: &'a QuantWeight,
    pub y: &'a mut [f32],
    pub bias: Option<&'a [f32]>,
    pub lora: Vec<(&'a [f32], &'a [f32], usize)>,
}

/// Several quantized products that share their input, in one pass over the thread pool:
/// `y_p = (acc ? y_p : 0) + x·W_pᵀ (+ bias_p) (+ Σ h·B_pᵀ)` for every part `p` (the q/k/v or
/// gate/up projections of a decoder layer while decoding), with `x` `[m, cols]` quantized to
/// 8 bits once for all of them and the parts' 16-row groups shared out as one task list, each
/// task adding the bias and the LoRA terms for the groups it computed. The outputs equal what
/// [`QuantWeight::matmul_t_with`] followed by a bias add and the `h·Bᵀ` product of
/// `engine::gemm` (`m ≤ 4` rows) give, bit for bit: the same kernels on the same 16-row blocks
/// (where `B` has 2¹⁶ elements or more, `gemm` splits its rows over threads at multiples of 4,
/// and the few rows that then sum in another order differ in rounding only).
///
/// This is the integer-kernel route (decoding); callers keep batched products (from
/// [`AMX_MIN_ROWS`] rows, where [`amx_bf16`] is on) on [`QuantWeight::matmul_t`].
///
/// Errors: `ERR_SHAPE_MISMATCH` naming the weight when the parts' `cols` differ from `x`'s or a
/// `y`, bias, `h` or `B` has the wrong length; `ERR_INVALID_ARGUMENT` when `m` is above 4 with
/// LoRA terms.
pub fn matmul_t_multi(x: &[f32], m: usize, parts: &mut [MultiPart], acc: bool) -> Result<()> {
    for p in parts.iter() {
        let (w, n) = (p.w, p.w.rows);
        w.check_shapes("x·Wᵀ", x.len(), w.cols, m, p.y.len(), n)?;
        let bad = |what: &str, e: usize, f: usize| PeftError::ShapeMismatch { name: format!("{} ({what})", w.name), expected: vec![e], found: vec![f] };
        if let Some(b) = p.bias {
            if b.len() != n {
                return Err(bad("bias", n, b.len()));
            }
        }
        for &(h, b, r) in &p.lora {
            if h.len() != m * r {
                return Err(bad("LoRA h", m * r, h.len()));
            }
            if b.len() != n * r {
                return Err(bad("LoRA B", n * r, b.len()));
            }
        }
        if !p.lora.is_empty() && m > 4 {
            return Err(PeftError::invalid_arg("m", format!("the LoRA epilogue takes at most 4 rows, not {m}")));
        }
    }
    let Some(first) = parts.first() else { return Ok(()) };
    if m == 0 {
        return Ok(());
    }
    let cols = first.w.cols;
    let kernel = Kernel::best();
    let mut xa = QAct::quantize(x, m, cols);
    if parts.iter().any(|p| p.w.ty.half_scales()) {
        xa.sum16 = xa.q.chunks_exact(QK / 2).map(|c| c.iter().map(|&v| v as i32).sum()).collect();
    }
    run_parts(kernel, &xa, parts, acc);
    Ok(())
}

/// The task loop of [`QuantWeight::run_t`] and [`matmul_t_multi`] (shapes checked by them).
fn run_parts(kernel: Kernel, xa: &QAct, parts: &mut [MultiPart], acc: bool) {
    let m = xa.m;
    // The parts' groups, numbered one after another.
    let mut first_group = Vec::with_capacity(parts.len() + 1);
    let mut groups = 0;
    let mut work = 0;
    for p in parts.iter() {
        first_group.push(groups);
        groups += p.w.rows.div_ceil(R);
        work += m * p.w.rows * p.w.cols;
    }
    first_group.push(groups);
    let threads = super::num_threads().max(1);
    // Tiles of x rows x chunks of groups, enough tasks for the pool, each small enough that
    // a group's codes (nb x 512 bytes) stay in L1 while the tile's rows pass over it.
    let mt = if m <= 4 { m } else { 64.min(m) };
    let mtiles = m.div_ceil(mt);
    let want_tasks = if work < (1 << 18) || threads == 1 { 1 } else { threads * 4 };
    let gchunks = (want_tasks.div_ceil(mtiles)).clamp(1, groups.max(1));
    let gper = groups.div_ceil(gchunks).max(1);
    let gchunks = groups.div_ceil(gper);
    let ys: Vec<SyncMut> = parts.iter_mut().map(|p| SyncMut(p.y.as_mut_ptr())).collect();
    let parts = &*parts;
    let task = |t: usize| {
        let (ti, gc) = (t / gchunks, t % gchunks);
        let (r0, r1) = (ti * mt, ((ti + 1) * mt).min(m));
        let (g0, g1) = (gc * gper, ((gc + 1) * gper).min(groups));
        let mut pi = 0;
        for gg in g0..g1 {
            while gg >= first_group[pi + 1] {
                pi += 1;
            }
            let (part, g) = (&parts[pi], gg - first_group[pi]);
            let (w, n) = (part.w, part.w.rows);
            let cols = R.min(n - g * R);
            let mut r = r0;
            while r < r1 {
                let mr = match kernel {
                    Kernel::Avx512Vnni => (r1 - r).min(8),
                    Kernel::Avx2 | Kernel::AvxVnni => (r1 - r).min(2),
                    Kernel::Scalar => 1,
                };
                let mut out = [[0f32; R]; 8];
                w.kernel_call(kernel, g, xa, r, mr, &mut out);
                for (i, o) in out.iter().enumerate().take(mr) {
                    // SAFETY: row r+i, columns g*16 .. g*16+cols of this part's y are written by
                    // this task only (tasks own disjoint (row tile, group) pairs) and lie inside
                    // y (checked by the callers).
                    let dst = unsafe { std::slice::from_raw_parts_mut(ys[pi].get().add((r + i) * n + g * R), cols) };
                    if acc {
                        for (d, v) in dst.iter_mut().zip(o) {
                            *d += v;
                        }
                    } else {
                        dst.copy_from_slice(&o[..cols]);
                    }
                    if let Some(b) = part.bias {
                        for (d, v) in dst.iter_mut().zip(&b[g * R..g * R + cols]) {
                            *d += v;
                        }
                    }
                }
                r += mr;
            }
            // The LoRA terms for this group's rows of B, all x rows of the tile at once (as
            // `gemm`'s `gemv_nt` takes them).
            for &(h, b, rk) in &part.lora {
                // (m ≤ 4 rows here: matmul_t_multi refuses more with LoRA terms)
                let rows = r1 - r0;
                let hs: [&[f32]; 4] = std::array::from_fn(|i| if i < rows { &h[(r0 + i) * rk..(r0 + i + 1) * rk] } else { &[] });
                // SAFETY: as above, the same disjoint region of y.
                let mut dsts: [&mut [f32]; 4] = std::array::from_fn(|i| if i < rows { unsafe { std::slice::from_raw_parts_mut(ys[pi].get().add((r0 + i) * n + g * R), cols) } } else { &mut [] });
                super::gemm::gemv_block(&b[g * R * rk..(g * R + cols) * rk], rk, rk, &hs[..rows], &mut dsts[..rows], 1.0, true);
            }
        }
    };
    let ntasks = mtiles * gchunks;
    if ntasks == 1 {
        task(0);
    } else {
        use rayon::prelude::*;
        super::pool().install(|| (0..ntasks).into_par_iter().for_each(task));
    }
}

#[derive(Clone, Copy)]
struct SyncMut(*mut f32);
// SAFETY: tasks write disjoint regions (see the callers).
unsafe impl Send for SyncMut {}
unsafe impl Sync for SyncMut {}
impl SyncMut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::amx::pack_b_block;
    use super::super::gemm::View;
    use super::*;

    /// GGUF blocks of `ty` with random codes and finite f16 scales in [2⁻⁸, 2⁻⁴).
    fn random_blocks(ty: QuantType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut byte = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 56) as u8
        };
        let n = rows * cols / ty.block_elems();
        let mut out = Vec::with_capacity(n * ty.block_bytes());
        for _ in 0..n {
            let mut blk: Vec<u8> = (0..ty.block_bytes()).map(|_| byte()).collect();
            let mut scale = |at: usize, b: u8| {
                let v = f16::from_f32((1.0 + b as f32 / 256.0) / 2f32.powi(4 + (b % 5) as i32));
                blk[at..at + 2].copy_from_slice(&v.to_le_bytes());
            };
            let (b0, b1) = (byte(), byte());
            match ty {
                QuantType::Q8_0 | QuantType::Q4_0 => scale(0, b0),
                QuantType::Q4_1 | QuantType::Q4K => {
                    scale(0, b0);
                    scale(2, b1);
                }
                QuantType::Q6K => scale(208, b0),
            }
            out.extend(blk);
        }
        out
    }

    /// The AVX-512 activation quantizer gives the scalar one's codes, scale and sum bit for bit:
    /// random blocks at several magnitudes, exact ties (x/d = k + 0.5), zeros, subnormals, and
    /// blocks with a NaN or an infinity.
    #[test]
    fn avx512_activation_quantizer_equals_the_scalar_one() {
        if super::super::simd::level() < 3 {
            return;
        }
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut blocks: Vec<[f32; QK]> = Vec::new();
        for mag in [1e-30f32, 1e-3, 1.0, 37.5, 1e30] {
            for _ in 0..200 {
                blocks.push(std::array::from_fn(|_| ((rnd() * 2.0 - 1.0) as f32) * mag));
            }
        }
        // ties: max 127 makes x/d = x exactly, so k + 0.5 values are exact ties
        for _ in 0..50 {
            let mut b: [f32; QK] = std::array::from_fn(|_| ((rnd() * 254.0).floor() - 127.0) as f32 + 0.5);
            b[0] = 127.0;
            blocks.push(b);
            b[0] = -127.0;
            blocks.push(b);
        }
        blocks.push([0.0; QK]);
        blocks.push(std::array::from_fn(|i| if i % 2 == 0 { 1e-45 } else { -3e-44 }));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut b: [f32; QK] = std::array::from_fn(|i| i as f32 - 7.5);
            b[19] = bad;
            blocks.push(b);
        }
        for (n, b) in blocks.iter().enumerate() {
            let (mut qa, mut sa, mut ta) = ([0i8; QK], 0f32, 0i32);
            let (mut qb, mut sb, mut tb) = ([0i8; QK], 0f32, 0i32);
            quantize_block(b, &mut qa, &mut sa, &mut ta);
            // SAFETY: AVX-512F checked above; 32-element blocks.
            unsafe { quantize_block_avx512(b, &mut qb, &mut sb, &mut tb) };
            let poisoned = sa.is_nan();
            // (a NaN's sign and payload do not matter: the block's products are NaN either way)
            assert!(if poisoned { sb.is_nan() } else { sa.to_bits() == sb.to_bits() }, "block {n}: scale {sa} vs {sb}");
            if !poisoned {
                assert_eq!(qa, qb, "block {n}: {b:?}");
                assert_eq!(ta, tb, "block {n}");
            }
        }
    }

    /// The first index where `got` and `want` differ as bf16 values (`-0` and `+0` are equal:
    /// a `Q6_K` code at its offset dequantizes to `d·0`, signed like `d` through the `f32` path
    /// and `+0` through the packer's `n·d − 32·d`).
    fn first_diff(got: &[u16], want: &[u16]) -> Option<(usize, u16, u16)> {
        let z = |v: u16| if v == 0x8000 { 0 } else { v };
        got.iter().zip(want).enumerate().find(|(_, (a, b))| z(**a) != z(**b)).map(|(i, (a, b))| (i, *a, *b))
    }

    /// The AVX-512 packers write exactly what the `f32` packer writes from the dequantized
    /// weight (bf16 round to nearest even of the same `f32` values), for every type, a row count
    /// that is neither a multiple of 32 nor even, and row chunks starting off the 16-row groups.
    #[test]
    fn avx512_packers_equal_the_f32_packer_on_the_dequantized_weight() {
        if !(std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw")) {
            eprintln!("no AVX-512F/BW: the packers are not used on this CPU");
            return;
        }
        let types = [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1, QuantType::Q4K, QuantType::Q6K];
        for (t, ty) in types.into_iter().enumerate() {
            for (rows, cols) in [(49usize, 256usize), (32, 512), (17, 256)] {
                let w = QuantWeight::from_gguf_bytes("w", ty, rows, cols, &random_blocks(ty, rows, cols, 7 + t as u64)).unwrap();
                let wd = w.dequantize();
                for j0 in (0..rows).step_by(32) {
                    let (mut got, mut want) = (vec![1u16; 32 * cols], vec![2u16; 32 * cols]);
                    // SAFETY: AVX-512F/BW checked above; got holds 32 · cols; j0 < rows.
                    unsafe { avx512::pack_rows_t(&w, j0, &mut got) };
                    pack_b_block(View::of(&wd, rows, cols).t(), j0, &mut want, cols, cols, 1);
                    assert_eq!(first_diff(&got, &want), None, "{ty:?} [{rows}, {cols}] rows from {j0}");
                }
                for (r0, kr) in [(0, rows), (16, rows - 16), (3, 7), (1, rows - 1)] {
                    let kp = kr.div_ceil(32) * 32;
                    for b in 0..cols / QK {
                        let (mut got, mut want) = (vec![1u16; 32 * kp], vec![2u16; 32 * kp]);
                        // SAFETY: as above; got holds 32 · kp; r0 + kr ≤ rows.
                        unsafe { avx512::pack_cols(&w, r0, kr, b, &mut got, kp) };
                        pack_b_block(View::rm(&wd, r0 * cols + b * QK, kr, QK, cols), 0, &mut want, kr, kp, 1);
                        assert_eq!(first_diff(&got, &want), None, "{ty:?} [{rows}, {cols}] rows {r0}..{} block {b}", r0 + kr);
                    }
                }
            }
        }
    }
}
