//! Base models. Every linear layer is a [`crate::tuners::linear::PeftLinear`], addressed by its
//! transformers module path, so tuners attach by name without changing the model's code.

pub mod config;
pub mod llama;
pub mod loader;

pub use config::LlamaConfig;
pub use llama::{ForwardOptions, KvCache, LlamaForCausalLM};
