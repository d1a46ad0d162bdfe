//! Tuner layers and configs. A tuner is a config (what HF writes as `adapter_config.json`) plus
//! the per-layer state it adds to the base model's linear layers (LoRA), or a prompt encoder
//! that feeds the frozen model (prompt learning).

pub mod config;
pub mod ia3;
pub mod init;
pub mod linear;
pub mod lora;
pub mod prompt;
pub mod weighted;

pub use config::AdapterConfig;
pub use ia3::Ia3Config;
pub use linear::{LoraAdapter, PeftLinear, RowAdapters};
pub use lora::{InitLoraWeights, LoraConfig, TargetModules};
pub use prompt::{PromptEncoder, PromptLearningConfig, PromptMethod};
