//! Tuner layers and configs. A tuner is a config (what HF writes as `adapter_config.json`) plus
//! the per-layer state it adds to the base model's linear layers.

pub mod linear;
pub mod lora;

pub use linear::{LoraAdapter, PeftLinear, RowAdapters};
pub use lora::{InitLoraWeights, LoraConfig, TargetModules};
