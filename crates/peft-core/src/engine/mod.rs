//! The fused CPU engine for the decoder hot path (issue 12).
//!
//! A training step of a Llama-family model (Llama, SmolLM2, Qwen2, Qwen3, Mistral, SmolLM3), of
//! Gemma 3 (four `1 + w` RMSNorms per layer, GeGLU, scaled embeddings, sliding-window layers with
//! their own RoPE table; not with `final_logit_softcapping`) or of Phi-3 (fused `qkv_proj` and
//! `gate_up_proj`, each one product with one LoRA over its whole output as HF PEFT's keys address
//! it; partial RoPE; `longrope` short or long factors chosen per forward with the attention
//! factor; `sliding_window`) with LoRA adapters
//! (plain or rsLoRA, dropout, several active adapters, any of the layers' linear modules) or with
//! prefix tuning / prompt tuning / P-tuning / multitask prompt tuning runs here as an explicit
//! forward and backward pass per decoder layer on `f32` buffers that are reused across steps,
//! instead of candle's per-op autograd graph over the frozen base:
//!
//! * no gradient is formed for frozen weights, and no graph node allocates, zero-fills or adds a
//!   gradient buffer; the residual stream's gradient flows through one buffer in place;
//! * LoRA's low-rank product is accumulated straight into the base product's output;
//! * RMSNorm (and the per-head q/k RMSNorm of Qwen3 and Gemma 3), RoPE (whole or, Phi-3's
//!   `partial_rotary_factor`, on the first dimensions of each head), SwiGLU, GeGLU (tanh
//!   approximation) and softmax have hand-written,
//!   vectorised backward passes ([`simd`]), dispatched at run time to AVX-512 or AVX2; SmolLM3's
//!   NoPE layers skip RoPE in both directions;
//! * attention runs in parallel over (batch × key/value head), skips the causal upper triangle
//!   in blocks of rows and reads q/k/v in place (no transposes);
//! * `lm_head` and the cross-entropy are fused and chunked over rows: no `[tokens × vocab]`
//!   tensor exists, and rows without a label are skipped.
//! * with gradient checkpointing ([`try_loss_and_grads_with`]), the forward keeps each layer's
//!   input and LoRA dropout seeds only, and the backward recomputes one layer's activations at a
//!   time into a shared buffer, replaying the seeds: the same numbers bit for bit.
//!
//! The engine computes exactly what the general path (`PeftModel::forward` + candle's
//! `backward`) computes, up to float rounding; `crates/peft-core/tests/engine.rs` compares the
//! two on random shapes. Anything it does not cover (DoRA, (IA)³, LoRA bias or
//! `modules_to_save`, LoRA on embeddings or the head, other families, other dtypes, other task
//! heads, mixed-adapter batches naming another tuner or DoRA, Phi-3's cached step that re-rotates
//! the cache to longrope's long factors) goes through the general path, chosen per step by
//! [`try_loss_and_grads`]. Setting the environment variable `PEFT_ENGINE=0` forces the general
//! path (for comparisons).

pub mod amx;
pub mod gemm;
mod llama;
pub mod quant;
pub mod simd;

pub use llama::{try_forward, try_loss_and_grads, try_loss_and_grads_with, KvStore};

use std::sync::{Arc, Mutex, OnceLock};

thread_local! {
    static FORCE_GENERAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the engine may be used on this thread (`PEFT_ENGINE=0` turns it off everywhere,
/// [`force_general_path`] on the calling thread).
pub fn enabled() -> bool {
    !FORCE_GENERAL.with(|f| f.get()) && !matches!(std::env::var("PEFT_ENGINE").as_deref(), Ok("0") | Ok("off") | Ok("false"))
}

/// Makes training steps started from the calling thread use the general path (`true`) or the
/// engine where it applies (`false`, the default). For tests that compare the two.
pub fn force_general_path(on: bool) {
    FORCE_GENERAL.with(|f| f.set(on));
}

/// A/B switches for interleaved measurements of the engine against its earlier code paths
/// (`crates/peft-core/examples/profile_train.rs`); 0 (the default) is the current engine.
static AB_FLAGS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// Few-row `x·Wᵀ` products (decoding) through the `gemm` crate instead of [`gemm`]'s own kernel.
#[doc(hidden)]
pub const AB_GEMM_CRATE_GEMV: u32 = 1;
/// Cached decoding appends with `Tensor::cat` per layer and token instead of in place.
#[doc(hidden)]
pub const AB_CAT_KV_CACHE: u32 = 2;
/// Threaded products through the `gemm` crate's own rayon split (and the k/v projections on one
/// thread) instead of [`gemm::gemm`]'s one block per thread.
#[doc(hidden)]
pub const AB_GEMM_CRATE_SPLIT: u32 = 4;

/// Narrow `x·Wᵀ` products (LoRA rank sides) through the `gemm` crate instead of the AVX-512
/// dot-product kernel, and the `∂B` product in its earlier orientation.
#[doc(hidden)]
pub const AB_GEMM_CRATE_NARROW: u32 = 8;

/// The training backward through every layer down to the input, whatever is trainable.
#[doc(hidden)]
pub const AB_FULL_BACKWARD: u32 = 16;

/// Large products in bf16x3 on AMX (as `set_float32_matmul_precision(High)`).
#[doc(hidden)]
pub const AB_MATMUL_HIGH: u32 = 32;

/// Large products in one bf16 pass on AMX (as `set_float32_matmul_precision(Medium)`).
#[doc(hidden)]
pub const AB_MATMUL_MEDIUM: u32 = 64;
/// Decoding through kept-quantized weights runs q/k/v and gate/up as separate products with
/// the LoRA terms after each, instead of one shared product per input
/// (`engine::quant::matmul_t_multi`).
pub const AB_SEPARATE_DECODE_PRODUCTS: u32 = 128;
/// Rank-side (skinny) products on one thread, as before session 16, instead of one block per
/// thread from 2^20 multiply-adds (`gemm::split_blocks`).
pub const AB_SKINNY_ONE_THREAD: u32 = 256;

/// Sets the A/B switches (`AB_*`, for benchmarks only).
#[doc(hidden)]
pub fn set_ab_flags(flags: u32) {
    AB_FLAGS.store(flags, std::sync::atomic::Ordering::Relaxed);
}

#[inline]
pub(crate) fn ab_flags() -> u32 {
    AB_FLAGS.load(std::sync::atomic::Ordering::Relaxed)
}

fn pool_slot() -> &'static Mutex<Option<Arc<rayon::ThreadPool>>> {
    static POOL: OnceLock<Mutex<Option<Arc<rayon::ThreadPool>>>> = OnceLock::new();
    POOL.get_or_init(|| Mutex::new(None))
}

/// Default thread count: `RAYON_NUM_THREADS` when set, else every available core.
fn default_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// Sets the number of threads the engine uses (its one rayon pool; `0` = every core). Takes
/// effect for the next step. Rayon's workers sleep when idle, so no thread spins between calls.
///
/// Errors: `Internal` when the operating system refuses to create the threads.
pub fn set_num_threads(n: usize) -> crate::Result<()> {
    let n = if n == 0 { default_threads() } else { n };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("peft-engine-{i}"))
        .build()
        .map_err(|e| crate::PeftError::Internal(format!("cannot start {n} engine threads: {e}")))?;
    *pool_slot().lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(pool));
    Ok(())
}

/// The engine's thread count.
pub fn num_threads() -> usize {
    pool().current_num_threads()
}

/// The engine's pool, created with [`default_threads`] threads on first use.
pub(crate) fn pool() -> Arc<rayon::ThreadPool> {
    let mut slot = pool_slot().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = slot.as_ref() {
        return p.clone();
    }
    let n = default_threads();
    let p = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("peft-engine-{i}"))
            .build()
            .unwrap_or_else(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a one-thread pool")),
    );
    *slot = Some(p.clone());
    p
}

/// Dropout keep-mask with a counter-based generator: element `i` of the call seeded `seed` is
/// dropped when `splitmix64(seed + i·φ) < p · 2⁶⁴`, else scaled by `1 / (1 − p)` (inverted
/// dropout, as `torch.nn.Dropout`). Both the engine and the general path draw one `seed` per
/// module call from the step's seeded generator, so their masks are identical, and the mask can
/// be regenerated in the backward pass instead of stored.
pub fn dropout_mask(seed: u64, p: f64, out: &mut [f32]) {
    let keep = (1.0 / (1.0 - p)) as f32;
    let thr = if p >= 1.0 { u64::MAX } else { (p * 18_446_744_073_709_551_616.0) as u64 };
    for (i, o) in out.iter_mut().enumerate() {
        *o = if splitmix64(seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))) < thr { 0.0 } else { keep };
    }
}

#[inline(always)]
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Draws the seed of one dropout call from the step's generator (or the thread's generator
/// when none is given).
pub fn dropout_seed(rng: Option<&Mutex<rand::rngs::StdRng>>) -> u64 {
    use rand::Rng;
    match rng {
        Some(r) => r.lock().unwrap_or_else(|p| p.into_inner()).random::<u64>(),
        None => rand::rng().random::<u64>(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dropout_mask_has_the_right_rate_and_scale() {
        let mut m = vec![0f32; 100_000];
        super::dropout_mask(7, 0.25, &mut m);
        let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / m.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "{dropped}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        let mut again = vec![0f32; 100_000];
        super::dropout_mask(7, 0.25, &mut again);
        assert_eq!(m, again);
        super::dropout_mask(8, 0.25, &mut again);
        assert_ne!(m, again);
    }
}
