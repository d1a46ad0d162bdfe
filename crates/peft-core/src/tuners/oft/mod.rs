//! OFT, orthogonal finetuning (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by
//! Orthogonal Finetuning"; Liu et al. 2024 for the block-diagonal, Cayley-Neumann form), as HF
//! PEFT 0.21 implements it (`OFTModel`, `peft.tuners.oft`) for linear layers and embeddings: a
//! linear layer sees its input rotated by a block-diagonal orthogonal matrix, `y = (x R) Wᵀ + b`,
//! an embedding's looked-up rows are rotated, `y = W[ids] R`, each block the Cayley transform of
//! a trainable skew-symmetric matrix.
//!
//! - [`config`]: `OFTConfig` (`r` or `oft_block_size`, the Cayley-Neumann series and its number of
//!   terms, COFT's `eps`, `block_share`, `bias`, `init_weights`, ...); [`layer`]: the skew
//!   matrices, the transform (series or exact), COFT's projection, the rotated input, merge
//!   (`W Rᵀ`; an embedding table `W R`) and unmerge (`W R⁻ᵀ`; `W R⁻¹`); `model`: injection. The
//!   layer lives in [`PeftLinear::layers`] and acts through [`AdapterLayer::transform_input`]
//!   (embeddings: [`AdapterLayer::apply_embedding`]); the fused engine then takes the general
//!   path.
//! - Files: `<module>.oft_R.weight` `[r, k (k-1)/2]` (`[1, …]` with `block_share`), and
//!   `<module>.oft_embedding_R.weight` for an embedding, as HF writes them (HF also saves the
//!   base table of a targeted `embed_tokens` as `<module>.base_layer.weight`,
//!   `save_embedding_layers="auto"`); a file with HF's pre-0.15 keys (`.oft_r.`) is refused
//!   with HF's message, and a config without `oft_block_size` (PEFT < 0.14) with HF's
//!   `check_kwargs` message.
//! - Targets: `nn.Linear` layers and embedding tables (the Llama family's `embed_tokens`,
//!   GPT-2's `wte`). With tied embeddings (GPT-2) the output head keeps the base table while
//!   unmerged and, as with HF's in-place merge into the shared weight, sees the merged table
//!   once merged. HF 0.21 refuses GPT-2's `Conv1D` (a `TypeError`), and so does peft-node
//!   (`ERR_ADAPTER_CONFIG_INVALID`, HF's text); HF's `oft.Conv2d` is not built here (the
//!   supported architectures have no `Conv2d`).
//! - Mixed batches (`adapterNames`) are refused for OFT layers: HF 0.21's `oft.Linear` has no
//!   per-row hook and ignores `adapter_names`.
//!
//! [`AdapterLayer::transform_input`]: crate::tuners::layer::AdapterLayer::transform_input
//! [`AdapterLayer::apply_embedding`]: crate::tuners::layer::AdapterLayer::apply_embedding
//! [`PeftLinear::layers`]: crate::tuners::linear::PeftLinear::layers

pub mod config;
pub mod layer;
mod model;

pub use config::*;

use crate::error::{PeftError, Result};
use crate::peft_model::PeftModel;
use crate::tuners::config::AdapterConfig;
use crate::tuners::registry::Tuner;
use candle_core::Tensor;
use std::path::Path;

/// The OFT tuner (HF `OFTModel`), registered for `peft_type` `"OFT"`.
pub struct OftTuner;

/// The registry entry.
pub static TUNER: OftTuner = OftTuner;

impl Tuner for OftTuner {
    // `oft_R` `[r, n]` (`[1, n]` with `block_share`) with the layer's own `r` / block size;
    // `oft_embedding_R` on an embedding table (blocks over its `dim`).
    crate::tuners::registry::declare_tuner!(peft_types: &["OFT"], model_class: "OFTModel", prefix: "oft_", slots: &layer::SLOTS, config: OftConfig, inject: add_oft,
        expected: |c, _m, lin| if lin.is_embedding || !lin.transposed => {
            let (r, k, _) = c.layer_dims(layer::OftLayer::rotated_dim(lin));
            let slot = if lin.is_embedding { layer::OFT_EMBEDDING_R } else { layer::OFT_R };
            vec![(slot, vec![if c.block_share { 1 } else { r }, layer::OftLayer::n_elements(k)])]
        });
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
