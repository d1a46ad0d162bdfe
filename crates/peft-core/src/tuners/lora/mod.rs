//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") and its variants
//! as HF PEFT 0.21 implements them: rsLoRA, DoRA, PiSSA / OLoRA initialisation, rank and alpha
//! patterns, trainable biases, LoRA on embeddings; plus adapter arithmetic
//! ([`weighted`], HF `add_weighted_adapter`).
//!
//! - [`config`]: `LoraConfig` (adapter_config.json);
//! - [`layer`]: the layer (`lora_A`, `lora_B`, `lora_magnitude_vector`, forward, merge);
//! - `model`: injection into a model (HF `LoraModel._create_and_replace`) and trainable biases;
//! - [`init`]: PiSSA / OLoRA initialisation; [`weighted`]: combining adapters.

pub mod config;
pub mod init;
pub mod layer;
mod model;
pub mod weighted;

pub use config::*;

use crate::model::Task;
use crate::tuners::config::AdapterConfig;
use crate::tuners::layer::Slot;
use crate::tuners::linear::PeftLinear;
use crate::tuners::registry::Tuner;

/// LoRA's slots ([`layer::SLOTS`]) plus the trainable-tokens slot of `trainable_token_indices`.
static SLOTS_WITH_TOKENS: [Slot; 6] = [layer::LORA_A, layer::LORA_B, layer::LORA_EMBEDDING_A, layer::LORA_EMBEDDING_B, layer::LORA_MAGNITUDE, crate::tuners::trainable_tokens::layer::TOKEN_ADAPTER_DELTA];

/// The LoRA tuner (HF `LoraModel`), registered for `peft_type` `"LORA"`.
pub struct LoraTuner;

impl Tuner for LoraTuner {
    // LoRA's slots and the `token_adapter.trainable_tokens_delta` of `trainable_token_indices`.
    crate::tuners::registry::declare_tuner!(peft_types: &["LORA"], model_class: "LoraModel", prefix: "lora_", slots: &SLOTS_WITH_TOKENS, config: LoraConfig, inject: add_lora);
    fn expected_params(&self, cfg: &AdapterConfig, task: Task, m: &str, lin: &PeftLinear) -> Vec<(Slot, Vec<usize>)> {
        let Some(c) = cfg.as_lora() else { return vec![] };
        if !c.selects(m, task) {
            return crate::tuners::trainable_tokens::lora_expected_tokens(c, m, lin).into_iter().collect();
        }
        let r = c.rank_for(m);
        let (sa, sb) = layer::LoraAdapter::ab_slots(lin.is_embedding);
        let mut out = vec![(sa, vec![r, lin.in_features()]), (sb, vec![lin.out_features(), r])];
        if c.use_dora {
            out.push((layer::LORA_MAGNITUDE, vec![lin.out_features()]));
        }
        out
    }
}
