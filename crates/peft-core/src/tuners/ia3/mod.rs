//! (IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
//! In-Context Learning") as HF PEFT 0.21 implements it (`IA3Model`): one learned vector per
//! targeted linear layer scaling its output, or its input for `feedforward_modules`.
//!
//! - [`config`]: `IA3Config`; [`layer`]: the vector, forward and merge; `model`: injection.

pub mod config;
pub mod layer;
mod model;

pub use config::*;

use crate::error::Result;
use crate::model::Task;
use crate::peft_model::PeftModel;
use crate::tuners::config::AdapterConfig;
use crate::tuners::layer::Slot;
use crate::tuners::linear::PeftLinear;
use crate::tuners::registry::Tuner;
use std::path::Path;

/// The (IA)³ tuner (HF `IA3Model`), registered for `peft_type` `"IA3"`.
pub struct Ia3Tuner;

impl Tuner for Ia3Tuner {
    fn peft_types(&self) -> &'static [&'static str] {
        &["IA3"]
    }
    fn model_class(&self) -> &'static str {
        "IA3Model"
    }
    fn prefix(&self) -> Option<&'static str> {
        Some("ia3_")
    }
    fn slots(&self) -> &'static [Slot] {
        &[layer::IA3_L]
    }
    fn parse_config(&self, v: &serde_json::Value, path: Option<&Path>) -> Result<AdapterConfig> {
        Ok(Ia3Config::from_json(v, path)?.into())
    }
    fn inject(&self, model: &mut PeftModel, name: &str, cfg: AdapterConfig, seed: u64) -> Result<Vec<String>> {
        let c = cfg.as_ia3().expect("an IA3 config").clone();
        model.add_ia3(name, c, seed)
    }
    fn expected_params(&self, cfg: &AdapterConfig, task: Task, m: &str, lin: &PeftLinear) -> Vec<(Slot, Vec<usize>)> {
        let Some(c) = cfg.as_ia3() else { return vec![] };
        if !c.selects(m, task) {
            return vec![];
        }
        let shape = if c.is_feedforward(m) { vec![1, lin.in_features()] } else { vec![lin.out_features(), 1] };
        vec![(layer::IA3_L, shape)]
    }
}
