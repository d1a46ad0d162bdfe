//! LoHa (Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
//! Federated Learning"; the LyCORIS implementation) as HF PEFT 0.21 implements it (`LoHaModel`)
//! for linear layers: `ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r`.
//!
//! - [`config`]: `LoHaConfig`; [`layer`]: the four factors, forward, `ΔW`, dropouts; `model`:
//!   injection. The layer lives in [`PeftLinear::others`] (the fused engine then takes the general
//!   path).

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

/// The LoHa tuner (HF `LoHaModel`), registered for `peft_type` `"LOHA"`.
pub struct LohaTuner;

impl Tuner for LohaTuner {
    fn peft_types(&self) -> &'static [&'static str] {
        &["LOHA"]
    }
    fn model_class(&self) -> &'static str {
        "LoHaModel"
    }
    fn prefix(&self) -> Option<&'static str> {
        Some("hada_")
    }
    fn slots(&self) -> &'static [Slot] {
        &layer::SLOTS
    }
    fn parse_config(&self, v: &serde_json::Value, path: Option<&Path>) -> Result<AdapterConfig> {
        Ok(LohaConfig::from_json(v, path)?.into())
    }
    fn inject(&self, model: &mut PeftModel, name: &str, cfg: AdapterConfig, seed: u64) -> Result<Vec<String>> {
        let c = cfg.get::<LohaConfig>().expect("a LOHA config").clone();
        model.add_loha(name, c, seed)
    }
    fn expected_params(&self, cfg: &AdapterConfig, task: Task, m: &str, lin: &PeftLinear) -> Vec<(Slot, Vec<usize>)> {
        let Some(c) = cfg.get::<LohaConfig>() else { return vec![] };
        if lin.is_embedding || c.rule().select(m, is_output_head(task, m)) != crate::targeting::Selection::Target {
            return vec![];
        }
        let (r, outf, inf) = (c.rank_for(m), lin.out_features(), lin.in_features());
        vec![(layer::HADA_W1_A, vec![outf, r]), (layer::HADA_W1_B, vec![r, inf]), (layer::HADA_W2_A, vec![outf, r]), (layer::HADA_W2_B, vec![r, inf])]
    }
}
