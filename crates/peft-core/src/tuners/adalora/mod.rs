//! AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning")
//! as HF PEFT 0.21 implements it (`AdaLoraModel`, `peft.tuners.adalora`) for linear layers and
//! GPT-2 `Conv1D`: `ΔW = Q (P ⊙ Λ) · lora_alpha / (ranknum + 1e-5)` in SVD form, with a rank
//! budget that a schedule shrinks while training.
//!
//! - [`config`]: `AdaLoraConfig` (LoRA's fields through LoRA's parser, plus `init_r`, `target_r`,
//!   the schedule, the EMA factors, `orth_reg_weight`, `rank_pattern`); [`layer`]: the SVD-form
//!   layer (`lora_A` `[r, in]`, `lora_E` `[r, 1]`, `lora_B` `[out, r]`, `ranknum`), forward and
//!   `ΔW`; [`allocator`]: HF's `RankAllocator` (importance EMA, cubic budget, masking, rank
//!   pattern); `model`: injection (with HF's refusal of a second trainable adapter and the
//!   resize of a loaded `rank_pattern`), the orthogonal regularisation and the saved state dict.
//! - Training: the loss gains `orth_reg_weight · mean ‖P Pᵀ − I‖_F, ‖QᵀQ − I‖_F` over the
//!   trainable adapter's layers ([`crate::tuners::registry::Tuner::loss_term`], as HF's
//!   `AdaLoraModel.forward` adds it to every loss it computes), and
//!   [`crate::train::Trainer::step`] calls [`crate::PeftModel::update_and_allocate`] with the
//!   0-based step after each optimizer step ([`crate::tuners::registry::Tuner::after_step`]).
//! - Files: `<module>.lora_A` / `.lora_B` / `.lora_E` (no `.weight`; `ranknum` is not saved).
//!   With a `rank_pattern` (`{"<module>.lora_E": [bool; init_r]}` in adapter_config.json), the
//!   masked triplets are dropped on save and a loaded layer holds only the kept ones.
//! - The fused engine computes plain LoRA only and leaves AdaLoRA layers to the general path;
//!   mixed batches (`adapterNames`) are refused (HF's `SVDLinear` ignores `adapter_names`).
//! - `bias` = `"all"` / `"lora_only"` trains and saves the base biases (LoRA's handling).
//! - A base kept quantized (a GGUF loaded with `quantization: 'keep'`): the base product runs
//!   through the quantized kernels and the SVD delta is added to its output, as HF's
//!   `adalora.bnb.SVDLinear8bitLt` / `SVDLinear4bit` and `adalora.gptq.SVDQuantLinear` do
//!   (the layer never reads the base weight); training and rank allocation work as over a dense
//!   base, and merging is refused (`ERR_INVALID_STATE`), as for LoRA (tested in `tests/qlora.rs`
//!   against the same file dequantized).

pub mod allocator;
pub mod config;
pub mod layer;
mod model;

pub use config::*;
pub use model::ONE_TRAINABLE;

use crate::error::Result;
use crate::peft_model::PeftModel;
use crate::tuners::config::AdapterConfig;
use crate::tuners::registry::Tuner;
use candle_core::backprop::GradStore;
use candle_core::Tensor;

/// The AdaLoRA tuner (HF `AdaLoraModel`), registered for `peft_type` `"ADALORA"`.
pub struct AdaLoraTuner;

/// The registry entry.
pub static TUNER: AdaLoraTuner = AdaLoraTuner;

impl Tuner for AdaLoraTuner {
    crate::tuners::registry::declare_tuner!(peft_types: &["ADALORA"], model_class: "AdaLoraModel", prefix: "lora_", slots: &layer::SLOTS, config: AdaLoraConfig, inject: add_adalora,
        expected: |c, m, lin| if !lin.is_embedding => {
            let r = model::rank_of(c, m).unwrap_or(c.init_r);
            vec![(layer::LORA_A, vec![r, lin.in_features()]), (layer::LORA_B, vec![lin.out_features(), r]), (layer::LORA_E, vec![r, 1])]
        });
    fn finish_state_dict(&self, model: &PeftModel, name: &str, cfg: &AdapterConfig, tensors: &mut Vec<(String, Tensor)>) -> Result<()> {
        match cfg.get::<AdaLoraConfig>() {
            Some(c) => model::resize_state_dict(model, name, c, tensors),
            None => Ok(()),
        }
    }
    fn loss_term(&self, model: &PeftModel, name: &str, cfg: &AdapterConfig, train: bool) -> Result<Option<Tensor>> {
        match cfg.get::<AdaLoraConfig>() {
            Some(c) if !c.inference_mode => model::orth_regularization(model, name, c, train),
            _ => Ok(None),
        }
    }
    /// Records the step's gradients in the trainable adapter's layers, then (with a step index)
    /// runs HF's `update_and_allocate`.
    fn after_step(&self, model: &PeftModel, name: &str, cfg: &AdapterConfig, global_step: Option<usize>, grads: &GradStore) -> Result<()> {
        match cfg.get::<AdaLoraConfig>() {
            Some(c) if !c.inference_mode => {
                allocator::record(model, name, grads);
                match global_step {
                    Some(step) => allocator::update_and_allocate(model, name, c, step),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }
}
