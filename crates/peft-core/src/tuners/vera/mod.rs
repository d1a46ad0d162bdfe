//! VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation") as HF PEFT 0.21
//! implements it (`VeraModel`, `peft.tuners.vera`) for linear layers and GPT-2 `Conv1D`:
//! `ΔW = (λ_b ⊙ B_l)(λ_d ⊙ A_l)` over one pair of frozen random projections shared by the model.
//!
//! - [`config`]: `VeraConfig`; [`layer`]: the two vectors, the sliced projections, forward and
//!   `ΔW`; `model`: injection (the projections sized to the largest targeted layer, created from
//!   `projection_prng_key` with torch's generator, loaded from a file, or shared with the model's
//!   earlier VeRA adapters, with HF's checks) and [`TorchGenerator`]. The layer lives in
//!   [`PeftLinear::layers`] (the fused engine then takes the general path).
//! - Files: the lambdas at `<module>.vera_lambda_b` / `.vera_lambda_d`; the projections at
//!   `base_model.vera_A` / `base_model.vera_B` when `save_projection` (HF's default), otherwise
//!   regenerated on load from `projection_prng_key`, drawn exactly as torch's CPU
//!   `torch.Generator().manual_seed(key)` + `uniform_` draw them (kaiming-uniform, `vera_A` then
//!   `vera_B`), so new adapters' projections also equal HF's.
//! - Mixed batches (`adapterNames`) give each row its own adapter's VeRA delta, as for LoHa /
//!   LoKr; HF 0.21's `VeraModel` has no such hook and ignores `adapter_names` (every row gets the
//!   active adapter), so these batches have no HF reference.
//! - `bias` = `"all"` / `"vera_only"` trains and saves the base biases as LoRA's `"all"` /
//!   `"lora_only"` do (HF treats every `"<method>_only"` alike).
//!
//! [`PeftLinear::layers`]: crate::tuners::linear::PeftLinear::layers

pub mod config;
pub mod layer;
mod model;

pub use config::*;
pub use model::TorchGenerator;

use crate::error::{PeftError, Result};
use crate::peft_model::PeftModel;
use crate::tuners::config::AdapterConfig;
use crate::tuners::registry::Tuner;
use candle_core::Tensor;
use std::path::Path;

/// The on-disk keys of the shared projections (HF removes the adapter name from
/// `base_model.vera_A.<adapter>`).
pub const VERA_A_KEY: &str = "base_model.vera_A";
pub const VERA_B_KEY: &str = "base_model.vera_B";

/// The VeRA tuner (HF `VeraModel`), registered for `peft_type` `"VERA"`.
pub struct VeraTuner;

/// The registry entry.
pub static TUNER: VeraTuner = VeraTuner;

impl Tuner for VeraTuner {
    crate::tuners::registry::declare_tuner!(peft_types: &["VERA"], model_class: "VeraModel", prefix: "vera_lambda_", slots: &layer::SLOTS, config: VeraConfig, inject: add_vera,
        expected: |c, _m, lin| if !lin.is_embedding => vec![(layer::VERA_LAMBDA_B, vec![lin.out_features()]), (layer::VERA_LAMBDA_D, vec![c.r])]);
    /// Takes `base_model.vera_A` / `base_model.vera_B` out of the file's tensors into the config
    /// (HF `_remap_adapter_state_dict_for_load`). With `save_projection` they must be there (HF's
    /// error); without it they are ignored with HF's warning and regenerated from the key.
    fn prepare_load(&self, model: &mut PeftModel, cfg: &mut AdapterConfig, tensors: &mut Vec<(String, Tensor)>, wpath: &Path) -> Result<()> {
        let mut a = None;
        let mut b = None;
        tensors.retain(|(k, t)| {
            let slot = if k == VERA_A_KEY || k.starts_with("base_model.vera_A.") {
                &mut a
            } else if k == VERA_B_KEY || k.starts_with("base_model.vera_B.") {
                &mut b
            } else {
                return true;
            };
            *slot = Some(t.clone());
            false
        });
        let Some(c) = cfg.get_mut::<VeraConfig>() else { return Ok(()) };
        match (c.save_projection, a, b) {
            (true, Some(a), Some(b)) => {
                c.loaded_projections = Some(layer::Projections { a: a.to_dtype(candle_core::DType::F32)?, b: b.to_dtype(candle_core::DType::F32)? });
            }
            (true, a, _) => {
                let key = if a.is_none() { VERA_A_KEY } else { VERA_B_KEY };
                return Err(PeftError::SafetensorsInvalid {
                    path: wpath.into(),
                    msg: format!("Specified to load vera_A and vera_B from state dictionary however they were not present! (`{key}` is missing; the adapter's config has save_projection=true)"),
                });
            }
            (false, a, _) => model.warnings.push(if a.is_some() {
                "Specified to not load vera_A and vera_B from state dictionary however they are present in state dictionary! Consider using them to ensure checkpoint loading is correct on all platforms using `peft_config.save_projection = True`".into()
            } else {
                "Specified to not load vera_A and vera_B from state dictionary. This means we will be relying on PRNG initialisation to restore these projections using `config.projection_prng_key`, which may not be accurate on all system configurations.".into()
            }),
        }
        Ok(())
    }
    /// `base_model.vera_A` / `base_model.vera_B` of adapter `name` when its config has
    /// `save_projection` (HF `_get_adapter_state_dict`).
    fn shared_state_dict(&self, model: &PeftModel, name: &str, cfg: &AdapterConfig) -> Result<Vec<(String, Tensor)>> {
        if !cfg.get::<VeraConfig>().map(|c| c.save_projection).unwrap_or(false) {
            return Ok(vec![]);
        }
        Ok(model.vera_projections(Some(name)).map(|p| vec![(VERA_A_KEY.to_string(), p.a), (VERA_B_KEY.to_string(), p.b)]).unwrap_or_default())
    }
}
