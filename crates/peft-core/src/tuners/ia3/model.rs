//! Injecting (IA)³ vectors into a model (HF `IA3Model._create_and_replace`).

use super::layer::Ia3Adapter;
use super::Ia3Config;
use crate::error::{PeftError, Result};
use crate::peft_model::PeftModel;
use candle_core::{Tensor, Var};
use rand_distr::{Distribution, Normal};

impl PeftModel {
    /// Inject an (IA)³ adapter (HF `IA3Model`): one vector per targeted linear layer, `[out, 1]`
    /// or `[1, in]` for feed-forward modules; ones with `init_ia3_weights` (a no-op), else N(0, 1).
    pub(crate) fn add_ia3(&mut self, name: &str, mut cfg: Ia3Config, seed: u64) -> Result<Vec<String>> {
        let normal = Normal::new(0.0f32, 1.0).map_err(|e| PeftError::Internal(e.to_string()))?;
        let planned = self.plan_layers(name, &mut cfg, seed, |cfg, mname, lin, rng, device| {
            if lin.is_embedding {
                return Err(PeftError::InvalidAdapterConfig {
                    path: None,
                    msg: format!("Target module `{mname}` is an embedding layer, which IA3 does not support. Currently, only `torch.nn.Linear`, `torch.nn.Conv2d`, and `Conv1D` are supported."),
                });
            }
            let ff = cfg.is_feedforward(mname);
            let shape = if ff { (1, lin.in_features()) } else { (lin.out_features(), 1) };
            let n = shape.0 * shape.1;
            let v: Vec<f32> = if cfg.init_ia3_weights { vec![1.0; n] } else { (0..n).map(|_| normal.sample(rng)).collect() };
            Ok(Box::new(Ia3Adapter { l: Var::from_tensor(&Tensor::from_vec(v, shape, device)?)?, feedforward: ff }) as Box<dyn crate::tuners::layer::AdapterLayer>)
        })?;
        self.install_layers(name, cfg.into(), planned)
    }
}
