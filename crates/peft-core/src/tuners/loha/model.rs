//! Injecting LoHa layers into a model (HF `LoHaModel._create_and_replace`, `LoHaLayer.update_layer`).

use super::layer::LohaLayer;
use super::LohaConfig;
use crate::error::{PeftError, Result};
use crate::model::Task;
use crate::peft_model::{is_output_head, kaiming_uniform, PeftModel};
use candle_core::{Tensor, Var};
use rand::SeedableRng;
use std::collections::HashMap;

impl PeftModel {
    /// Inject a LoHa adapter: per targeted linear layer `w1_a`, `w2_a` `[out, r]` and `w1_b`,
    /// `w2_b` `[r, in]` (r and alpha from `rank_pattern` / `alpha_pattern`), initialised as HF's
    /// `reset_adapter_parameters`: kaiming-uniform(a=√5) `w1_a`, `w1_b`, `w2_a` and zero `w2_b`
    /// (a no-op), or with `init_weights=false` all four kaiming-uniform.
    ///
    /// Errors: `InvalidAdapterConfig` for an embedding or a GPT-2 `Conv1D` target (HF: "Target
    /// module of type ... not supported") or when nothing matches. The model is then unchanged.
    pub(crate) fn add_loha(&mut self, name: &str, mut cfg: LohaConfig, seed: u64) -> Result<Vec<String>> {
        if cfg.base_model_name_or_path.is_none() {
            cfg.base_model_name_or_path = self.base.info().name_or_path.clone();
        }
        let task = cfg.task_type.as_deref().and_then(Task::from_task_type);
        let copies = self.plan_saved_copies(name, &cfg.modules_to_save.clone().unwrap_or_default(), task)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let device = self.base.device().clone();
        let mut planned: HashMap<String, LohaLayer> = HashMap::new();
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
                    msg: format!("Target module `{mname}` of type {kind} not supported, currently only adapters for Conv2d, Conv1d, Linear are supported (LoHa here: Linear)"),
                });
            }
            let (r, alpha) = (cfg.rank_for(&mname), cfg.alpha_for(&mname));
            let (outf, inf) = (lin.out_features(), lin.in_features());
            let var = |v: Vec<f32>, rows: usize, cols: usize| -> Result<Var> { Ok(Var::from_tensor(&Tensor::from_vec(v, (rows, cols), &device)?)?) };
            let w1_a = var(kaiming_uniform(&mut rng, outf, r), outf, r)?;
            let w1_b = var(kaiming_uniform(&mut rng, r, inf), r, inf)?;
            let w2_a = var(kaiming_uniform(&mut rng, outf, r), outf, r)?;
            let w2_b = if cfg.init_weights { vec![0.0; r * inf] } else { kaiming_uniform(&mut rng, r, inf) };
            let w2_b = var(w2_b, r, inf)?;
            let layer = LohaLayer {
                w1_a,
                w1_b,
                w2_a,
                w2_b,
                r,
                alpha,
                scaling: alpha / r as f64,
                rank_dropout: cfg.rank_dropout,
                module_dropout: cfg.module_dropout,
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
