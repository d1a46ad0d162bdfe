//! HRA, Householder reflection adaptation (Yuan et al. 2024, "Bridging The Gap between Low-rank
//! and Orthogonal Adaptation via Householder Reflection Adaptation", arXiv:2405.17484), as HF
//! PEFT 0.21 implements it (`HRAModel`, `peft.tuners.hra`) for linear layers: the base weight
//! `W` `[out, in]` is multiplied by a chain of `r` Householder reflections, `y = x (W H)ᵀ + b`,
//! `H = Π (I - 2 û_i û_iᵀ)` over the normalised columns of the trainable `hra_u` `[in, r]`
//! (or one reflection of their Gram-Schmidt basis with `apply_GS`).
//!
//! - [`config`]: `HRAConfig` (`r`, `apply_GS`, `init_weights`, `bias`, targeting);
//!   [`layer`]: the reflections, the reflected input, merge (`W H`) and unmerge (`W H⁻¹`);
//!   `model`: injection. The layer lives in [`PeftLinear::layers`] and acts through
//!   [`AdapterLayer::forward_host`] (the fused engine then takes the general path).
//! - Files: `<module>.hra_u` `[in, r]`, as HF writes them.
//! - Targets: `nn.Linear` layers. HF 0.21 refuses GPT-2's `Conv1D` and embeddings (a
//!   `TypeError`), and so does peft-node (`ERR_ADAPTER_CONFIG_INVALID`, HF's text). HF's
//!   `HRAConv2d` has no counterpart: no model here has Conv2d layers.
//! - Mixed batches (`adapterNames`) are refused for HRA layers (HF's `HRALinear` ignores them),
//!   and so is a runtime scale (HF: "Scaling operation for HRA not supported").
//!
//! [`AdapterLayer::forward_host`]: crate::tuners::layer::AdapterLayer::forward_host
//! [`PeftLinear::layers`]: crate::tuners::linear::PeftLinear::layers

pub mod config;
pub mod layer;
mod model;

pub use config::*;

use crate::tuners::registry::Tuner;

/// The HRA tuner (HF `HRAModel`), registered for `peft_type` `"HRA"`.
pub struct HraTuner;

/// The registry entry.
pub static TUNER: HraTuner = HraTuner;

impl Tuner for HraTuner {
    // `hra_u` `[in, r]` on every selected linear layer.
    crate::tuners::registry::declare_tuner!(peft_types: &["HRA"], model_class: "HRAModel", prefix: "hra_", slots: &layer::SLOTS, config: HraConfig, inject: add_hra,
        expected: |c, _m, lin| if !lin.is_embedding && !lin.transposed => vec![(layer::HRA_U, vec![lin.in_features(), c.r])]);
}
