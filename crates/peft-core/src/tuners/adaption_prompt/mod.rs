//! Adaption prompt (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models
//! with Zero-init Attention") as HF PEFT 0.21 implements it (`AdaptionPromptModel`,
//! `peft.tuners.adaption_prompt`) for the Llama family (`model_type` `llama` and `mistral`,
//! HF's `TRANSFORMERS_MODEL_CONFIG`; other model types are refused with HF's
//! `Unsupported model type for adaption prompt: '<type>'.`, and GPT-2, which HF wraps with
//! `AdaptedAttentionGPT`, is not implemented here).
//!
//! - [`config`]: `AdaptionPromptConfig` (`adapter_len`, `adapter_layers`, `target_modules`);
//!   [`layer`]: the per-layer prompt `[1, adapter_len, hidden]` and gate `[1]` and their
//!   contribution to the attention output (the math is there); `model`: which attention modules
//!   are wrapped (the top `adapter_layers`), initialisation and loading.
//! - The parameters live in the base model's attention modules
//!   ([`crate::model::BaseModel::named_attention_prompts`], the Llama family's
//!   `self_attn`); a module carrying a live prompt makes the fused engine leave the model to the
//!   general path.
//! - Files: `<layer>.self_attn.adaption_prompt` and `<layer>.self_attn.adaption_gate` under
//!   `base_model.model.`, without adapter name (as HF writes them).
//! - As in HF: one adapter is active at a time (several adapters may be added and switched);
//!   merging is refused (HF's `AdaptionPromptModel` has no merge); no mixed batches; no
//!   `modules_to_save`; `get_layer_status` refuses it.

pub mod config;
pub mod layer;
mod model;

pub use config::AdaptionPromptConfig;
pub use layer::{AdaptedAttention, AttentionPrompts};
pub use model::SUPPORTED_MODEL_TYPES;

use crate::error::{PeftError, Result};
use crate::peft_model::{LoadResult, PeftModel};
use crate::tuners::config::AdapterConfig;
use crate::tuners::registry::{Operation, Tuner};
use candle_core::Tensor;
use std::path::Path;

/// The adaption prompt tuner (HF `AdaptionPromptModel`), registered for `peft_type`
/// `"ADAPTION_PROMPT"`.
pub struct AdaptionPromptTuner;

/// The registry entry.
pub static TUNER: AdaptionPromptTuner = AdaptionPromptTuner;

impl Tuner for AdaptionPromptTuner {
    crate::tuners::registry::declare_tuner!(peft_types: &["ADAPTION_PROMPT"], model_class: "AdaptionPromptModel", config: AdaptionPromptConfig,
        inject: |model, name, c, seed| model.add_adaption_prompt(name, c, seed, Default::default()));
    fn prefix(&self, _peft_type: &str) -> Option<&'static str> {
        Some("adaption_prompt_")
    }
    /// HF's `AdaptionPromptModel` takes one active adapter, has no merge, no layer status and
    /// no `set_requires_grad`, and HF's mixed batches do not reach its attention wrappers.
    fn refusal(&self, op: Operation, name: &str, _cfg: &AdapterConfig) -> Option<PeftError> {
        Some(match op {
            Operation::SeveralActive => PeftError::invalid_arg("adapterName", "adaption prompt models have exactly one active adapter (HF `AdaptionPromptModel.set_adapter` takes one name)"),
            Operation::Merge => PeftError::InvalidState(format!(
                "adapter `{name}` is an adaption prompt, which cannot be merged: it adds attention over learned prompt tokens instead of changing weights (HF's AdaptionPromptModel has no merge_adapter / merge_and_unload: \"'LlamaForCausalLM' object has no attribute 'merge_and_unload'\")"
            )),
            Operation::Status => PeftError::InvalidState(
                "layer and model status are not available for adaption prompt adapters: they wrap attention modules, not layers (HF: \"get_layer_status() got an invalid PeftModel instance; prefix tuning and adaption prompt are not supported.\")".into(),
            ),
            Operation::MixedBatch => PeftError::invalid_arg("adapterNames", format!("per-row adapters (mixed batches) are not available with adaption prompt adapters (`{name}`)")),
            Operation::SetRequiresGrad => PeftError::InvalidState(format!(
                "setRequiresGrad is not available for adaption prompt adapters (`{name}`): HF's AdaptionPromptModel has no set_requires_grad"
            )),
        })
    }
    fn load(&self, model: &mut PeftModel, name: &str, cfg: &AdapterConfig, tensors: &mut Vec<(String, Tensor)>, wpath: &Path) -> Option<Result<LoadResult>> {
        let c = cfg.get::<AdaptionPromptConfig>()?.clone();
        Some(model.load_adaption_prompt(name, c, std::mem::take(tensors), wpath))
    }
}
