//! `LoHaConfig`: HF PEFT 0.21's LoHa config (`LycorisConfig` subclass; Hyeon-Woo et al. 2022,
//! "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning", via
//! LyCORIS). Each targeted linear layer gets `ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r`, saved
//! as `<module>.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b` (no `.weight`). The fields
//! every LyCORIS config has are [`LycorisConfig`]'s; LoHa's own are [`Loha`].

use crate::tuners::lycoris::LycorisConfig;
use serde_json::{Map, Value};

/// HF PEFT 0.21 defaults of every `LoHaConfig` field, as written to adapter_config.json.
pub fn hf_loha_defaults() -> Map<String, Value> {
    LohaConfig::hf_defaults()
}

/// HF PEFT's `LoHaConfig`: the LyCORIS fields and [`Loha`]'s. See the module docs.
pub type LohaConfig = LycorisConfig<Loha>;

/// LoHa's own fields of `LoHaConfig` (in [`LycorisConfig::own`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Loha {
    /// Conv layers only in HF; no effect on linear layers (kept for the file).
    pub use_effective_conv2d: bool,
    /// `true`: `hada_w2_b` starts at zero (a no-op); `false`: all four kaiming-uniform (tests).
    pub init_weights: bool,
}
