//! LoHa (Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
//! Federated Learning"; the LyCORIS implementation) as HF PEFT 0.21 implements it (`LoHaModel`)
//! for linear layers: `ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r`.
//!
//! - [`config`]: `LoHaConfig`; [`layer`]: the four factors, forward, `ΔW`, dropouts; `model`:
//!   a new layer's factors. The layer lives in [`PeftLinear::layers`] (the fused engine then
//!   takes the general path). What LoHa shares with LoKr (config fields, injection, registry
//!   entry, dropout draws) is [`crate::tuners::lycoris`].

pub mod config;
pub mod layer;
mod model;

pub use config::*;

use crate::error::Result;
use crate::tuners::config::RawConfig;
use crate::tuners::layer::{AdapterLayer, Slot};
use crate::tuners::linear::PeftLinear;
use crate::tuners::lycoris::{LycorisKind, LycorisNames, LycorisTuner};
use candle_core::Device;
use serde_json::{json, Map, Value};

/// The LoHa tuner (HF `LoHaModel`), registered for `peft_type` `"LOHA"`.
pub static TUNER: LycorisTuner<Loha> = LycorisTuner::new();

impl LycorisKind for Loha {
    const NAMES: LycorisNames = LycorisNames { peft_types: &["LOHA"], config_class: "LoHaConfig", model_class: "LoHaModel", name: "LoHa", prefix: "hada_", slots: &layer::SLOTS };
    fn own_defaults() -> Map<String, Value> {
        crate::tuners::config::json_object(json!({"init_weights": true, "peft_type": "LOHA", "use_effective_conv2d": false}))
    }
    fn parse(rc: &RawConfig) -> Result<Self> {
        Ok(Loha { use_effective_conv2d: rc.bool("use_effective_conv2d")?, init_weights: rc.bool("init_weights")? })
    }
    fn param_shapes(_cfg: &LohaConfig, lin: &PeftLinear, r: usize) -> Vec<(Slot, Vec<usize>)> {
        let (outf, inf) = (lin.out_features(), lin.in_features());
        vec![(layer::HADA_W1_A, vec![outf, r]), (layer::HADA_W1_B, vec![r, inf]), (layer::HADA_W2_A, vec![outf, r]), (layer::HADA_W2_B, vec![r, inf])]
    }
    fn new_layer(cfg: &LohaConfig, lin: &PeftLinear, r: usize, alpha: f64, rng: &mut rand::rngs::StdRng, device: &Device) -> Result<Box<dyn AdapterLayer>> {
        Ok(Box::new(model::new_layer(cfg, lin, r, alpha, rng, device)?))
    }
}
