//! Injecting LoKr layers into a model (HF `LoKrModel._create_and_replace`,
//! `LoKrLayer.update_layer` and its three `reset_adapter_parameters*`).

use super::layer::{Factor, LokrLayer, LokrShape};
use super::{LokrConfig, LokrInit};
use crate::error::{PeftError, Result};
use crate::model::Task;
use crate::peft_model::{is_output_head, kaiming_uniform, PeftModel};
use candle_core::{Tensor, Var};
use rand::SeedableRng;
use std::collections::HashMap;

impl PeftModel {
    /// Inject a LoKr adapter: per targeted linear layer the factors of [`LokrShape`] (r and
    /// alpha from `rank_pattern` / `alpha_pattern`, `scaling = alpha / r`), initialised as HF:
    /// - `init_weights = true`: `lokr_w1` (or `lokr_w1_a`) zero, so the adapter starts as a
    ///   no-op; `lokr_w1_b`, `lokr_w2` (or `lokr_w2_a`, `lokr_w2_b`) kaiming-uniform(a=√5);
    /// - `"lycoris"`: `lokr_w2` (or `lokr_w2_b`) zero, the others kaiming-uniform;
    /// - `false`: all kaiming-uniform.
    ///
    /// Errors: `InvalidAdapterConfig` for an embedding or a GPT-2 `Conv1D` target (HF: "Target
    /// module of type ... not supported") or when nothing matches. The model is then unchanged.
    pub(crate) fn add_lokr(&mut self, name: &str, mut cfg: LokrConfig, seed: u64) -> Result<Vec<String>> {
        if cfg.base_model_name_or_path.is_none() {
            cfg.base_model_name_or_path = self.base.info().name_or_path.clone();
        }
        let task = cfg.task_type.as_deref().and_then(Task::from_task_type);
        let copies = self.plan_saved_copies(name, &cfg.modules_to_save.clone().unwrap_or_default(), task)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let device = self.base.device().clone();
        let mut planned: HashMap<String, LokrLayer> = HashMap::new();
        let mut misses = crate::targeting::Misses::default();
        for (mname, lin) in self.base.named_linears() {
            let sel = cfg.rule().select(&mname, lin.is_embedding || is_output_head(self.base.task(), &mname));
            if !misses.note(&mname, sel, cfg.layers_pattern.as_deref()) {
                continue;
            }
            if lin.is_embedding || lin.transposed {
                let kind = if lin.is_embedding { "Embedding" } else { "Conv1D" };
                return Err(PeftError::InvalidAdapterConfig {
                    path: None,
                    msg: format!("Target module `{mname}` of type {kind} not supported, currently only adapters for Conv2d, Conv1d, Linear are supported (LoKr here: Linear)"),
                });
            }
            let (r, alpha) = (cfg.rank_for(&mname), cfg.alpha_for(&mname));
            let shape = LokrShape::new(lin.out_features(), lin.in_features(), r, cfg.decompose_both, cfg.decompose_factor);
            // `zero`: this matrix starts at zero; otherwise kaiming-uniform(a=√5) (bound 1/√fan_in).
            let mut var = |rows: usize, cols: usize, zero: bool| -> Result<Var> {
                let v = if zero { vec![0.0; rows * cols] } else { kaiming_uniform(&mut rng, rows, cols) };
                Ok(Var::from_tensor(&Tensor::from_vec(v, (rows, cols), &device)?)?)
            };
            let (zero1, zero2) = match cfg.init_weights {
                LokrInit::Zero => (true, false),
                LokrInit::Lycoris => (false, true),
                LokrInit::Random => (false, false),
            };
            let ((a, c), (b, d)) = (shape.w1, shape.w2);
            // Zero init clears `w1` / `w1_a` (true) or `w2` / `w2_b` (lycoris), as HF.
            let w1 = if shape.w1_full { Factor::Full(var(a, c, zero1)?) } else { Factor::Product(var(a, r, zero1)?, var(r, c, false)?) };
            let w2 = if shape.w2_full { Factor::Full(var(b, d, zero2)?) } else { Factor::Product(var(b, r, false)?, var(r, d, zero2)?) };
            let layer = LokrLayer {
                w1,
                w2,
                r,
                alpha,
                scaling: alpha / r as f64,
                rank_dropout: cfg.rank_dropout,
                module_dropout: cfg.module_dropout,
                rank_dropout_scale: cfg.rank_dropout_scale,
            };
            planned.insert(mname, layer);
        }
        if planned.is_empty() {
            return Err(self.no_targets(&cfg.to_json()["target_modules"], &misses, cfg.layers_to_transform.as_deref(), cfg.layers_pattern.as_deref()));
        }
        let mut targeted: Vec<String> = planned.keys().cloned().collect();
        targeted.sort();
        let first = self.configs.is_empty();
        for (mname, lin) in self.base.named_linears_mut() {
            if let Some(l) = planned.remove(&mname) {
                lin.others.insert(name.to_string(), Box::new(l));
            }
        }
        self.install_saved_copies(name, copies);
        self.register(name, cfg.into(), first)?;
        Ok(targeted)
    }
}
