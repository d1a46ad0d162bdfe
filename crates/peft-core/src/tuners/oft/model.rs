//! OFT injection (HF `OFTModel._create_and_replace` / `_create_new_module`,
//! `OFTLayer.update_layer`, `reset_oft_parameters`).

use super::layer::OftLayer;
use super::OftConfig;
use crate::error::{PeftError, Result};
use crate::peft_model::PeftModel;
use crate::tuners::layer::AdapterLayer;
use crate::tuners::linear::PeftLinear;
use candle_core::{Device, Tensor, Var};
use rand_distr::{Distribution, Normal};

/// HF's refusal of a layer type OFT does not adapt: GPT-2 `Conv1D` (HF 0.21: `TypeError`).
/// Linear layers (HF `oft.Linear`) and embedding tables (HF `oft.Embedding`) are adapted.
pub(super) fn unsupported_target(mname: &str, lin: &PeftLinear) -> Option<PeftError> {
    if lin.is_embedding || !lin.transposed {
        return None;
    }
    let msg = format!(
        "Target module Conv1D(nf={}, nx={}) is not supported. Currently, only `torch.nn.Linear`, `torch.nn.Conv2d`, `torch.nn.Embedding` (optionally quantized) are supported. (module `{mname}`: HF PEFT 0.21's OFT refuses GPT-2's Conv1D layers with this TypeError)",
        lin.out_features(),
        lin.in_features()
    );
    Some(PeftError::InvalidAdapterConfig { path: None, msg })
}

/// A new OFT layer rotating `in_features` values (a linear layer's inputs, an embedding
/// table's `dim` when `embedding`): `oft_R` / `oft_embedding_R` `[r, n]` (`[1, n]` with
/// `block_share`), zero (`init_weights`, the identity rotation) or N(0, 0.1²) drawn from `rng`;
/// plus HF's adjustment warning when `r` / `oft_block_size` does not divide `in_features`.
pub(super) fn new_layer(cfg: &OftConfig, in_features: usize, embedding: bool, rng: &mut rand::rngs::StdRng, device: &Device) -> Result<(OftLayer, Option<String>)> {
    let (r, block_size, note) = cfg.layer_dims(in_features);
    let rows = if cfg.block_share { 1 } else { r };
    let n = OftLayer::n_elements(block_size);
    let vals: Vec<f32> = if cfg.init_weights {
        vec![0.0; rows * n]
    } else {
        let normal = Normal::new(0.0f32, 0.1).map_err(|e| PeftError::Internal(e.to_string()))?;
        (0..rows * n).map(|_| normal.sample(rng)).collect()
    };
    let layer = OftLayer {
        weight: Var::from_tensor(&Tensor::from_vec(vals, (rows, n), device)?)?,
        embedding,
        r,
        block_size,
        block_share: cfg.block_share,
        coft: cfg.coft,
        eps: cfg.eps,
        use_cayley_neumann: cfg.use_cayley_neumann,
        num_cayley_neumann_terms: cfg.num_cayley_neumann_terms,
        module_dropout: cfg.module_dropout,
    };
    Ok((layer, note))
}

impl PeftModel {
    /// Inject an OFT adapter (HF `OFTModel`): one [`OftLayer`] per targeted linear layer or
    /// embedding table (HF `oft.Embedding`, rotating the embedding dimension), in module order,
    /// with per-layer `r` / `oft_block_size` (HF's adjustment and its warning when the
    /// configured value does not divide the rotated dimension). `fan_in_fan_out` is reset to
    /// false with HF's warning when a linear layer is targeted (HF `_create_new_module`; an
    /// embedding alone leaves it as it is). `bias` = `"all"` /
    /// `"oft_only"` makes every base bias / those of the OFT layers trainable (HF
    /// `_mark_only_adapters_as_trainable`). A config read from a file of PEFT < 0.18 with
    /// `use_cayley_neumann` gives HF's warning (the series changed in 0.18).
    ///
    /// Errors (the model then unchanged): `InvalidAdapterConfig` for a GPT-2 `Conv1D` target (HF's
    /// `TypeError` text); `NoTargetModules`.
    pub(crate) fn add_oft(&mut self, name: &str, mut cfg: OftConfig, seed: u64) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        let mut any_linear = false;
        let planned = self.plan_layers(name, &mut cfg, seed, |cfg, mname, lin, rng, device| {
            if let Some(e) = unsupported_target(mname, lin) {
                return Err(e);
            }
            any_linear |= !lin.is_embedding;
            let (layer, note) = new_layer(cfg, OftLayer::rotated_dim(lin), lin.is_embedding, rng, device)?;
            if let Some(n) = note.filter(|n| !notes.contains(n)) {
                notes.push(n); // HF's `warnings.warn`: each distinct message once
            }
            Ok(Box::new(layer) as Box<dyn AdapterLayer>)
        })?;
        if cfg.pre_018_neumann {
            self.warnings.push("The cayley-neumann parameterization has been slightly changed to be more numerically stable in PEFT 0.18.0. Please retrain your adapter weights with newer PEFT versions. Alternatively, downgrade PEFT to version 0.17.0 to use the old parameterization.".into());
        }
        if cfg.fan_in_fan_out && any_linear {
            self.warnings.push("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False.".into());
            cfg.fan_in_fan_out = false;
        }
        self.warnings.extend(notes);
        // `bias: "all" | "oft_only"` (HF `_mark_only_adapters_as_trainable`) is applied by the
        // generic registration (`peft_model/bias.rs`), as for every tuner with a `bias` field.
        self.install_layers(name, cfg.into(), planned)
    }
}
