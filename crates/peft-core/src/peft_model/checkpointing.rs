//! Gradient checkpointing (transformers' `gradient_checkpointing_enable` with PEFT's
//! `prepare_model_for_gradient_checkpointing`): training steps keep each decoder layer's input
//! instead of its activations and recompute a layer's activations during the backward, just
//! before that layer's gradients are formed. Losses and gradients are unchanged (bit for bit:
//! the recomputation repeats the same operations on the same inputs, and LoRA dropout reuses
//! the masks of the first forward, as torch's checkpoint restores the RNG state); peak memory
//! holds one layer's activations instead of one per layer, and a step costs one more forward
//! pass through the layers above the lowest trainable one.
//!
//! Where it runs: the fused engine (Llama family, Gemma 3; LoRA, prompt tuning, P-tuning,
//! multitask prompt tuning) and the general path's layer-wise driver
//! ([`crate::model::checkpoint`]) for the models that implement
//! [`crate::model::BaseModel::layer_stack`]: the Llama family, Gemma 3, Phi-3, GPT-2, BERT,
//! DistilBERT, RoBERTa (every head) and T5 (encoder and decoder stacks; the encoder output
//! reaches every decoder layer's cross-attention), as transformers' `GradientCheckpointingLayer`s
//! cover them. Prompt tuning and P-tuning work with it (HF allows them); prefix tuning is
//! refused with HF's error (`PREFIX_TUNING does not work with gradient checkpointing.`, raised
//! by HF `PeftModel._setup_prompt_encoder`); a model without a layer stack would be refused by
//! the training step with an error naming `gradientCheckpointing`.

use super::*;

/// HF PEFT's message for prefix tuning with gradient checkpointing (`peft_model.py`,
/// `_setup_prompt_encoder`: `f"{config.peft_type.value} does not work with gradient checkpointing."`).
pub(crate) fn prefix_refusal() -> PeftError {
    PeftError::invalid_arg("gradientCheckpointing", "PREFIX_TUNING does not work with gradient checkpointing.")
}

impl PeftModel {
    /// Turns gradient checkpointing on or off for the training steps run on this model (HF
    /// `model.gradient_checkpointing_enable()` / `gradient_checkpointing_disable()`; a
    /// `Trainer` created with `gradient_checkpointing` turns it on for its own steps).
    ///
    /// Errors: `InvalidArgument` naming `gradientCheckpointing` with HF's text
    /// (`PREFIX_TUNING does not work with gradient checkpointing.`) when turning it on while the
    /// model holds a prefix-tuning adapter; the setting is then left unchanged.
    pub fn set_gradient_checkpointing(&mut self, on: bool) -> Result<()> {
        if on && self.has_prefix_tuning() {
            return Err(prefix_refusal());
        }
        self.gradient_checkpointing = on;
        Ok(())
    }

    /// Whether gradient checkpointing is on (HF `model.is_gradient_checkpointing`).
    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    /// Whether any adapter of the model is a prefix-tuning adapter.
    pub(crate) fn has_prefix_tuning(&self) -> bool {
        self.configs.iter().any(|(_, c)| c.as_prompt().is_some_and(|p| p.method == PromptMethod::PrefixTuning))
    }

    /// The refusals of a checkpointed training step that both paths share: prefix tuning (HF's
    /// error text).
    pub(crate) fn check_gradient_checkpointing(&self) -> Result<()> {
        match self.active_prompt() {
            Some((cfg, _)) if cfg.method == PromptMethod::PrefixTuning => Err(prefix_refusal()),
            _ => Ok(()),
        }
    }
}
