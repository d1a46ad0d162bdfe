//! `LoKrConfig`: HF PEFT 0.21's LoKr config (a `LycorisConfig` subclass). Each targeted linear
//! layer gets `ΔW = (w1 ⊗ w2) · alpha / r` (Kronecker product; see [`super::layer`]), saved as
//! `<module>.lokr_w1` or `.lokr_w1_a` + `.lokr_w1_b`, and `.lokr_w2` or `.lokr_w2_a` +
//! `.lokr_w2_b` (no `.weight`). The fields every LyCORIS config has are [`LycorisConfig`]'s;
//! LoKr's own are [`Lokr`].

use crate::tuners::lycoris::LycorisConfig;
use serde_json::{Map, Value};

/// HF PEFT 0.21 defaults of every `LoKrConfig` field, as written to adapter_config.json.
pub fn hf_lokr_defaults() -> Map<String, Value> {
    LokrConfig::hf_defaults()
}

/// HF's `init_weights` of `LoKrConfig` (`true`, `false` or `"lycoris"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LokrInit {
    /// `true` (HF's default): `lokr_w1` (or `lokr_w1_a`) zero, so `ΔW = 0`; the rest
    /// kaiming-uniform(a=√5).
    Zero,
    /// `"lycoris"` (LyCORIS's own init): `lokr_w2` (or `lokr_w2_b`) zero, the rest kaiming-uniform.
    Lycoris,
    /// `false`: every factor kaiming-uniform (not a no-op; for tests).
    Random,
}

/// HF PEFT's `LoKrConfig`: the LyCORIS fields and [`Lokr`]'s. See the module docs. Its
/// `rank_dropout` mask is divided by the kept fraction only when `rank_dropout_scale`.
pub type LokrConfig = LycorisConfig<Lokr>;

/// LoKr's own fields of `LoKrConfig` (in [`LycorisConfig::own`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Lokr {
    /// Conv layers only in HF; no effect on linear layers (kept for the file).
    pub use_effective_conv2d: bool,
    /// Also decompose the left factor `w1` into `w1_a w1_b` when `r < max(dims of w1) / 2`.
    pub decompose_both: bool,
    /// HF `factorization()`'s `factor`: `-1` splits each dimension near its square root.
    pub decompose_factor: i64,
    /// Divide the rank-dropout mask by its mean (HF `rank_dropout_scale`).
    pub rank_dropout_scale: bool,
    pub init_weights: LokrInit,
}
