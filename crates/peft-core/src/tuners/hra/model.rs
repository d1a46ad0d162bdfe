//! HRA injection (HF `HRAModel._create_and_replace` / `_create_new_module`,
//! `HRALayer.update_layer`, `reset_hra_parameters`).

use super::layer::HraLayer;
use super::HraConfig;
use crate::error::{PeftError, Result};
use crate::peft_model::PeftModel;
use crate::tuners::layer::AdapterLayer;
use crate::tuners::linear::PeftLinear;
use candle_core::{Device, Tensor, Var};

/// HF's refusal of a layer type HRA does not adapt (`TypeError` of `_create_new_module`): GPT-2's
/// `Conv1D` and embeddings.
pub(super) fn unsupported_target(mname: &str, lin: &PeftLinear) -> Option<PeftError> {
    let module = if lin.is_embedding {
        // torch's repr: `Embedding(num_embeddings, embedding_dim)`.
        let (rows, dim) = (lin.in_features(), lin.out_features());
        format!("Embedding({rows}, {dim})")
    } else if lin.transposed {
        format!("Conv1D(nf={}, nx={})", lin.out_features(), lin.in_features())
    } else {
        return None;
    };
    Some(PeftError::InvalidAdapterConfig {
        path: None,
        msg: format!("Target module {module} is not supported. Currently, only `torch.nn.Linear` and `torch.nn.Conv2d` are supported. (module `{mname}`)"),
    })
}

/// `hra_u` `[in, r]` for a new layer (HF `reset_hra_parameters[_random]`): with `init_weights`
/// and an even `r`, `r / 2` kaiming-uniform columns (bound `1 / √(r/2)`) each repeated twice
/// (`repeat_interleave(2, dim=1)`: the reflections cancel in pairs, `H = I`); otherwise `r`
/// kaiming-uniform columns (bound `1 / √r`).
pub(super) fn init_u(cfg: &HraConfig, in_features: usize, rng: &mut rand::rngs::StdRng, device: &Device) -> Result<Tensor> {
    let r = cfg.r;
    if cfg.init_weights && r % 2 == 0 {
        let half = crate::peft_model::kaiming_uniform(rng, in_features, r / 2);
        let vals: Vec<f32> = half.chunks(r / 2).flat_map(|row| row.iter().flat_map(|v| [*v, *v])).collect();
        return Ok(Tensor::from_vec(vals, (in_features, r), device)?);
    }
    Ok(Tensor::from_vec(crate::peft_model::kaiming_uniform(rng, in_features, r), (in_features, r), device)?)
}

impl PeftModel {
    /// Inject an HRA adapter (HF `HRAModel`): one [`HraLayer`] per targeted linear layer, in
    /// module order. `init_weights` with an odd `r` gives HF's warning (random columns instead
    /// of the identity). `bias` = `"all"` / `"hra_only"` is applied by the generic registration.
    ///
    /// Errors (the model then unchanged): `InvalidAdapterConfig` for a GPT-2 `Conv1D` or an
    /// embedding target (HF's `TypeError` text); `NoTargetModules`.
    pub(crate) fn add_hra(&mut self, name: &str, mut cfg: HraConfig, seed: u64) -> Result<Vec<String>> {
        let planned = self.plan_layers(name, &mut cfg, seed, |cfg, mname, lin, rng, device| {
            if let Some(e) = unsupported_target(mname, lin) {
                return Err(e);
            }
            let u = init_u(cfg, lin.in_features(), rng, device)?;
            Ok(Box::new(HraLayer { u: Var::from_tensor(&u)?, r: cfg.r, apply_gs: cfg.apply_gs }) as Box<dyn AdapterLayer>)
        })?;
        if cfg.init_weights && cfg.r % 2 != 0 {
            self.warnings.push("The symmetric initialization can NOT be performed when r is odd!".into());
        }
        self.install_layers(name, cfg.into(), planned)
    }
}
