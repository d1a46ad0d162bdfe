//! LoKr (LyCORIS's Low-Rank Kronecker product adapter; Yeh et al. 2023, "Navigating
//! Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation", and KronA,
//! Edalati et al. 2022) as HF PEFT 0.21 implements it (`LoKrModel`) for linear layers:
//! `ΔW = (w1 ⊗ w2) · alpha / r`, each factor a full matrix or a rank-r product.
//!
//! - [`config`]: `LoKrConfig`; [`layer`]: `factorization`, the factor shapes, forward, `ΔW`,
//!   dropouts; `model`: injection and HF's three initialisations. The layer lives in
//!   [`PeftLinear::others`] (the fused engine then takes the general path).
//! - Not implemented: HF's `Conv1d` / `Conv2d` LoKr layers (`lokr_t2`, `use_effective_conv2d`);
//!   a conv target does not exist in the supported models.

pub mod config;
pub mod layer;
mod model;

pub use config::*;

use crate::error::Result;
use crate::model::Task;
use crate::peft_model::{is_output_head, PeftModel};
use crate::tuners::config::AdapterConfig;
use crate::tuners::layer::Slot;
use crate::tuners::linear::PeftLinear;
use crate::tuners::registry::Tuner;
use std::path::Path;

/// The LoKr tuner (HF `LoKrModel`), registered for `peft_type` `"LOKR"`.
pub struct LokrTuner;

impl Tuner for LokrTuner {
    fn peft_types(&self) -> &'static [&'static str] {
        &["LOKR"]
    }
    fn model_class(&self) -> &'static str {
        "LoKrModel"
    }
    fn prefix(&self) -> Option<&'static str> {
        Some("lokr_")
    }
    fn slots(&self) -> &'static [Slot] {
        &layer::SLOTS
    }
    fn parse_config(&self, v: &serde_json::Value, path: Option<&Path>) -> Result<AdapterConfig> {
        Ok(LokrConfig::from_json(v, path)?.into())
    }
    fn inject(&self, model: &mut PeftModel, name: &str, cfg: AdapterConfig, seed: u64) -> Result<Vec<String>> {
        let c = cfg.get::<LokrConfig>().expect("a LOKR config").clone();
        model.add_lokr(name, c, seed)
    }
    fn expected_params(&self, cfg: &AdapterConfig, task: Task, m: &str, lin: &PeftLinear) -> Vec<(Slot, Vec<usize>)> {
        let Some(c) = cfg.get::<LokrConfig>() else { return vec![] };
        if lin.is_embedding || c.rule().select(m, is_output_head(task, m)) != crate::targeting::Selection::Target {
            return vec![];
        }
        layer::LokrShape::new(lin.out_features(), lin.in_features(), c.rank_for(m), c.decompose_both, c.decompose_factor).params()
    }
}
