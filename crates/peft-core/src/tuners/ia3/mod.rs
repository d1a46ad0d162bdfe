//! (IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
//! In-Context Learning") as HF PEFT 0.21 implements it (`IA3Model`): one learned vector per
//! targeted linear layer scaling its output, or its input for `feedforward_modules`.
//!
//! - [`config`]: `IA3Config`; [`layer`]: the vector, forward and merge; `model`: injection.

pub mod config;
pub mod layer;
mod model;

pub use config::*;

use crate::tuners::registry::Tuner;

/// The (IA)³ tuner (HF `IA3Model`), registered for `peft_type` `"IA3"`.
pub struct Ia3Tuner;

impl Tuner for Ia3Tuner {
    crate::tuners::registry::declare_tuner!(peft_types: &["IA3"], model_class: "IA3Model", prefix: "ia3_", slots: &[layer::IA3_L], config: Ia3Config, inject: add_ia3,
        expected: |c, m, lin| if true => vec![(layer::IA3_L, if c.is_feedforward(m) { vec![1, lin.in_features()] } else { vec![lin.out_features(), 1] })]);
}
