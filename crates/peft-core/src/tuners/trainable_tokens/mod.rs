//! Trainable tokens as HF PEFT 0.21 implements them (`TrainableTokensModel`,
//! `peft/tuners/trainable_tokens/`): only the rows `token_indices` of an embedding table are
//! trained, stored and saved (`trainable_tokens_delta` `[len(token_indices), dim]`), instead of
//! the whole table.
//!
//! - [`config`]: `TrainableTokensConfig` (`token_indices`, `target_modules`, `init_weights`);
//!   [`layer`]: the layer (row replacement in lookups, in a linear layer's output columns, on
//!   merge); `model`: injection, the tied `lm_head` and LoRA's `trainable_token_indices`.
//! - `target_modules` unset means the model's input embedding (`model.embed_tokens`,
//!   `transformer.wte`, ...): HF resolves it when the adapter is added and writes the name.
//! - Tied embeddings (`tie_word_embeddings`, e.g. GPT-2): the `lm_head` gets a layer tied to the
//!   embedding's (same variable), so the logits of the trainable tokens use the new rows too.
//!   HF's state dict then holds the delta twice (`<embedding>.trainable_tokens_delta` and
//!   `lm_head.trainable_tokens_delta`); both are written, and the second is accepted on load.
//! - LoRA's `trainable_token_indices` (a list: the input embedding; or `{module: indices}`) puts
//!   the same layer, under HF's `TrainableTokensWrapper` key
//!   `<module>.token_adapter.trainable_tokens_delta`, next to the LoRA layers (the tied
//!   `lm_head` follows it and is not saved, as in HF).
//! - Mixed batches: with LoRA's option each row gets its adapter's tokens (HF's
//!   `AuxiliaryTrainingWrapper`); the standalone tuner refuses `adapterNames` (HF 0.21's
//!   `TrainableTokensModel` has no such hook and silently ignores them).
//! - The layers live in [`PeftLinear::layers`], so the fused engine takes the general path while
//!   an unmerged adapter is active on the embedding or head.

pub mod config;
pub mod layer;
mod model;

pub use config::*;
pub use layer::TrainableTokensLayer;
pub(crate) use model::{input_embedding_name, lora_expected_tokens, lora_unheld_token_keys, tied_modules};

use crate::error::Result;
use crate::model::Task;
use crate::peft_model::{PeftModel, KEY_PREFIX};
use crate::tuners::config::AdapterConfig;
use crate::tuners::layer::Slot;
use crate::tuners::linear::PeftLinear;
use crate::tuners::registry::Tuner;
use candle_core::Tensor;
use std::path::Path;

/// The trainable-tokens tuner (HF `TrainableTokensModel`), registered for `peft_type`
/// `"TRAINABLE_TOKENS"`.
pub struct TrainableTokensTuner;

/// The registry entry.
pub static TUNER: TrainableTokensTuner = TrainableTokensTuner;

impl Tuner for TrainableTokensTuner {
    crate::tuners::registry::declare_tuner!(peft_types: &["TRAINABLE_TOKENS"], model_class: "TrainableTokensModel", prefix: "trainable_tokens_", slots: &layer::SLOTS, config: TrainableTokensConfig, inject: add_trainable_tokens);
    fn ties_embedding_adapters(&self) -> bool {
        true
    }
    fn expected_params(&self, cfg: &AdapterConfig, _task: Task, m: &str, lin: &PeftLinear) -> Vec<(Slot, Vec<usize>)> {
        let Some(c) = cfg.get::<TrainableTokensConfig>() else { return vec![] };
        let hit = match &c.target_modules {
            Some(t) => crate::targeting::matches_target(t, m, false),
            None => lin.is_embedding,
        };
        match (hit, lin.weight.dims2()) {
            (true, Ok((_, dim))) => vec![(layer::TRAINABLE_TOKENS_DELTA, vec![c.token_indices.len(), dim])],
            _ => vec![],
        }
    }
    /// Drops the tied layers' copies of the delta (`lm_head.trainable_tokens_delta`, which HF
    /// writes but loads into the same parameter as the embedding's), when the adapter targets
    /// the input embedding (HF ties only then: T5's `embed_tokens` targeted alone hold deltas
    /// of their own).
    fn prepare_load(&self, model: &mut PeftModel, cfg: &mut AdapterConfig, tensors: &mut Vec<(String, Tensor)>, _wpath: &Path) -> Result<()> {
        let owner = model::input_embedding_name(model);
        let ties = match (cfg.get::<TrainableTokensConfig>().and_then(|c| c.target_modules.as_ref()), owner) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(t), Some(o)) => crate::targeting::matches_target(t, &o, false),
        };
        if !ties {
            return Ok(());
        }
        let tied: Vec<String> = tied_modules(model).into_iter().map(|m| format!("{KEY_PREFIX}{}", layer::TRAINABLE_TOKENS_DELTA.disk_key(&m))).collect();
        tensors.retain(|(k, _)| !tied.contains(k));
        Ok(())
    }
    /// The tied layers' delta under their own keys (HF saves `lm_head.trainable_tokens_delta`).
    fn shared_state_dict(&self, model: &PeftModel, name: &str, _cfg: &AdapterConfig) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (m, lin) in model.base.named_layers() {
            let Some(l) = lin.layers.get(name).and_then(|l| l.as_any()).and_then(|a| a.downcast_ref::<TrainableTokensLayer>()) else { continue };
            if let Some(t) = l.tied_delta() {
                out.push((format!("{KEY_PREFIX}{}", l.slot.disk_key(&m)), t));
            }
        }
        Ok(out)
    }
}
