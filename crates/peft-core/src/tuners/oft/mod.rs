//! OFT, orthogonal finetuning (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by
//! Orthogonal Finetuning"; Liu et al. 2024 for the block-diagonal, Cayley-Neumann form), as HF
//! PEFT 0.21 implements it (`OFTModel`, `peft.tuners.oft`) for linear layers: the base layer sees
//! its input rotated by a block-diagonal orthogonal matrix, `y = (x R) Wᵀ + b`, each block the
//! Cayley transform of a trainable skew-symmetric matrix.
//!
//! - [`config`]: `OFTConfig` (`r` or `oft_block_size`, the Cayley-Neumann series and its number of
//!   terms, COFT's `eps`, `block_share`, `bias`, `init_weights`, ...); [`layer`]: the skew
//!   matrices, the transform (series or exact), COFT's projection, the rotated input, merge
//!   (`W Rᵀ`) and unmerge (`W R⁻ᵀ`); `model`: injection. The layer lives in
//!   [`PeftLinear::layers`] and acts through [`AdapterLayer::transform_input`]
//!   (the fused engine then takes the general path).
//! - Files: `<module>.oft_R.weight` `[r, k (k-1)/2]` (`[1, …]` with `block_share`), as HF writes
//!   them; a file with HF's pre-0.15 keys (`.oft_r.`) is refused with HF's message, and a config
//!   without `oft_block_size` (PEFT < 0.14) with HF's `check_kwargs` message.
//! - Targets: `nn.Linear` layers. HF 0.21 refuses GPT-2's `Conv1D` (a `TypeError`), and so does
//!   peft-node (`ERR_ADAPTER_CONFIG_INVALID`, HF's text); HF's `oft.Embedding` and `oft.Conv2d` are
//!   not built here (embedding targets are refused).
//! - Mixed batches (`adapterNames`) are refused for OFT layers: HF 0.21's `oft.Linear` has no
//!   per-row hook and ignores `adapter_names`.
//!
//! [`AdapterLayer::transform_input`]: crate::tuners::layer::AdapterLayer::transform_input

pub mod config;
pub mod layer;
mod model;

pub use config::*;

use crate::error::{PeftError, Result};
use crate::model::Task;
use crate::peft_model::PeftModel;
use crate::tuners::config::AdapterConfig;
use crate::tuners::layer::Slot;
use crate::tuners::linear::PeftLinear;
use crate::tuners::registry::Tuner;
use candle_core::Tensor;
use std::path::Path;

/// The OFT tuner (HF `OFTModel`), registered for `peft_type` `"OFT"`.
pub struct OftTuner;

/// The registry entry.
pub static TUNER: OftTuner = OftTuner;

impl Tuner for OftTuner {
    crate::tuners::registry::declare_tuner!(peft_types: &["OFT"], model_class: "OFTModel", prefix: "oft_", slots: &layer::SLOTS, config: OftConfig, inject: add_oft);
    /// `oft_R` `[r, n]` (`[1, n]` with `block_share`) with the layer's own `r` / block size.
    fn expected_params(&self, cfg: &AdapterConfig, task: Task, m: &str, lin: &PeftLinear) -> Vec<(Slot, Vec<usize>)> {
        let Some(c) = cfg.get::<OftConfig>() else { return vec![] };
        if lin.is_embedding || lin.transposed || !c.selects(m, task) {
            return vec![];
        }
        let (r, k, _) = c.layer_dims(lin.in_features());
        vec![(layer::OFT_R, vec![if c.block_share { 1 } else { r }, layer::OftLayer::n_elements(k)])]
    }
    /// HF `OFTModel._remap_adapter_state_dict_for_load`: a file of PEFT ≤ 0.15's OFT (keys with
    /// `.oft_r.`) is refused.
    fn prepare_load(&self, _model: &mut PeftModel, _cfg: &mut AdapterConfig, tensors: &mut Vec<(String, Tensor)>, wpath: &Path) -> Result<()> {
        if let Some((k, _)) = tensors.iter().find(|(k, _)| k.contains(".oft_r.") || k.ends_with(".oft_r")) {
            return Err(PeftError::SafetensorsInvalid {
                path: wpath.into(),
                msg: format!("Trying to load old OFT checkpoint, which is no longer supported. Please install PEFT <= v0.15.2 to load it or train a new OFT adapter. (key `{k}`)"),
            });
        }
        Ok(())
    }
}
