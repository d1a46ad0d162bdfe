//! LoKr (LyCORIS's Low-Rank Kronecker product adapter; Yeh et al. 2023, "Navigating
//! Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation", and KronA,
//! Edalati et al. 2022) as HF PEFT 0.21 implements it (`LoKrModel`) for linear layers:
//! `ΔW = (w1 ⊗ w2) · alpha / r`, each factor a full matrix or a rank-r product.
//!
//! - [`config`]: `LoKrConfig`; [`layer`]: `factorization`, the factor shapes, forward, `ΔW`,
//!   dropouts; `model`: a new layer's factors with HF's three initialisations. The layer lives
//!   in [`PeftLinear::layers`] (the fused engine then takes the general path). What LoKr shares
//!   with LoHa (config fields, injection, registry entry, dropout draws) is
//!   [`crate::tuners::lycoris`].
//! - Not implemented: HF's `Conv1d` / `Conv2d` LoKr layers (`lokr_t2`, `use_effective_conv2d`);
//!   a conv target does not exist in the supported models.

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

/// The LoKr tuner (HF `LoKrModel`), registered for `peft_type` `"LOKR"`.
pub static TUNER: LycorisTuner<Lokr> = LycorisTuner::new();

impl LycorisKind for Lokr {
    const NAMES: LycorisNames = LycorisNames { peft_types: &["LOKR"], config_class: "LoKrConfig", model_class: "LoKrModel", name: "LoKr", prefix: "lokr_", slots: &layer::SLOTS };
    fn own_defaults() -> Map<String, Value> {
        crate::tuners::config::json_object(json!({
            "decompose_both": false, "decompose_factor": -1, "init_weights": true, "peft_type": "LOKR",
            "rank_dropout_scale": false, "use_effective_conv2d": false
        }))
    }
    /// Errors: `InvalidAdapterConfig` for non-boolean flags, a non-integer `decompose_factor`
    /// and `init_weights` other than `true` / `false` / `"lycoris"`.
    fn parse(rc: &RawConfig) -> Result<Self> {
        let decompose_factor = rc.int("decompose_factor")?;
        let init_weights = match &rc.raw["init_weights"] {
            Value::Bool(true) => LokrInit::Zero,
            Value::Bool(false) => LokrInit::Random,
            Value::String(s) if s == "lycoris" => LokrInit::Lycoris,
            other => return Err(rc.bad(format!("`init_weights` must be true, false or \"lycoris\", found {other}"))),
        };
        Ok(Lokr {
            use_effective_conv2d: rc.bool("use_effective_conv2d")?,
            decompose_both: rc.bool("decompose_both")?,
            decompose_factor,
            rank_dropout_scale: rc.bool("rank_dropout_scale")?,
            init_weights,
        })
    }
    fn param_shapes(cfg: &LokrConfig, lin: &PeftLinear, r: usize) -> Vec<(Slot, Vec<usize>)> {
        layer::LokrShape::new(lin.out_features(), lin.in_features(), r, cfg.own.decompose_both, cfg.own.decompose_factor).params()
    }
    fn new_layer(cfg: &LokrConfig, lin: &PeftLinear, r: usize, alpha: f64, rng: &mut rand::rngs::StdRng, device: &Device) -> Result<Box<dyn AdapterLayer>> {
        Ok(Box::new(model::new_layer(cfg, lin, r, alpha, rng, device)?))
    }
}
