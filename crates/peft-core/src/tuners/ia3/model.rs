//! Injecting (IA)³ vectors into a model (HF `IA3Model._create_and_replace`).

use super::layer::Ia3Adapter;
use super::Ia3Config;
use crate::error::{PeftError, Result};
use crate::peft_model::PeftModel;
use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;

impl PeftModel {
    /// Inject an (IA)³ adapter (HF `IA3Model`): one vector per targeted linear layer, `[out, 1]`
    /// or `[1, in]` for feed-forward modules; ones with `init_ia3_weights` (a no-op), else N(0, 1).
    pub(crate) fn add_ia3(&mut self, name: &str, mut cfg: Ia3Config, seed: u64) -> Result<Vec<String>> {
        let copies = self.prepare_layer_adapter(name, &mut cfg.common)?;
        let selected = self.select_layers(&cfg)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 1.0).map_err(|e| PeftError::Internal(e.to_string()))?;
        let device = self.base.device().clone();
        let mut planned: HashMap<String, Ia3Adapter> = HashMap::new();
        for (mname, lin) in self.base.named_linears().into_iter().filter(|(m, _)| selected.contains(m)) {
            if lin.is_embedding {
                return Err(PeftError::InvalidAdapterConfig {
                    path: None,
                    msg: format!("Target module `{mname}` is an embedding layer, which IA3 does not support. Currently, only `torch.nn.Linear`, `torch.nn.Conv2d`, and `Conv1D` are supported."),
                });
            }
            let ff = cfg.is_feedforward(&mname);
            let shape = if ff { (1, lin.in_features()) } else { (lin.out_features(), 1) };
            let n = shape.0 * shape.1;
            let v: Vec<f32> = if cfg.init_ia3_weights { vec![1.0; n] } else { (0..n).map(|_| normal.sample(&mut rng)).collect() };
            planned.insert(mname, Ia3Adapter { l: Var::from_tensor(&Tensor::from_vec(v, shape, &device)?)?, feedforward: ff });
        }
        self.install_planned(name, cfg.into(), planned, copies, |lin, name, ad| {
            lin.layers.insert(name, Box::new(ad));
        })
    }
}
