//! Injecting LoRA adapters into a model (HF `LoraModel._create_and_replace`); the base biases a
//! LoRA config trains (`bias: "all" | "lora_only"`) are HF's generic `BaseTuner` handling
//! (`crate::peft_model::bias`).

use super::init::{olora, pissa};
use super::layer::LoraAdapter;
use super::{InitLoraWeights, LoraConfig};
use crate::error::{PeftError, Result};
use crate::model::Task;
use crate::peft_model::{kaiming_uniform, PeftModel};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;

impl PeftModel {
    pub(crate) fn add_lora(&mut self, name: &str, mut cfg: LoraConfig, seed: u64) -> Result<Vec<String>> {
        self.fill_base_model_name(&mut cfg.common);
        let selected = self.select_layers(&cfg)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let device = self.base.device().clone();
        let mut planned: Vec<(String, LoraAdapter)> = Vec::new();
        let mut residuals: HashMap<String, Tensor> = HashMap::new();
        for (mname, lin) in self.base.named_layers().into_iter().filter(|(m, _)| selected.contains(m)) {
            if lin.is_embedding {
                // HF `lora.Embedding`: A [r, num_embeddings], B [dim, r]; init_lora_weights=True
                // gives A = 0, B ~ N(0, 1) (`reset_lora_parameters`), False keeps randn for both.
                if cfg.use_dora {
                    return Err(PeftError::InvalidAdapterConfig {
                        path: None,
                        msg: format!("`use_dora` on the embedding layer `{mname}` is not supported here; leave it out of target_modules or disable DoRA"),
                    });
                }
                let r = cfg.rank_for(&mname);
                let alpha = cfg.alpha_for(&mname);
                let (num, dim) = (lin.in_features(), lin.out_features());
                let n = Normal::new(0.0f32, 1.0).map_err(|e| PeftError::Internal(e.to_string()))?;
                let a: Vec<f32> = match cfg.init_lora_weights {
                    InitLoraWeights::Random => (0..r * num).map(|_| n.sample(&mut rng)).collect(),
                    _ => vec![0f32; r * num],
                };
                let b: Vec<f32> = (0..dim * r).map(|_| n.sample(&mut rng)).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (r, num), &device)?)?;
                let b = Var::from_tensor(&Tensor::from_vec(b, (dim, r), &device)?)?;
                planned.push((mname, LoraAdapter { a, b, r, alpha, scaling: cfg.scaling(r, alpha), dropout: cfg.lora_dropout, magnitude: None, merged_norm: None, embedding: true }));
                continue;
            }
            crate::peft_model::fit_fan_in_fan_out(&mut self.warnings, lin, &mut cfg.fan_in_fan_out);
            let r = cfg.rank_for(&mname);
            let alpha = cfg.alpha_for(&mname);
            let (inf, outf) = (lin.in_features(), lin.out_features());
            if matches!(cfg.init_lora_weights, InitLoraWeights::Pissa(_) | InitLoraWeights::Olora) {
                if cfg.use_dora {
                    return Err(PeftError::InvalidAdapterConfig { path: None, msg: "`init_lora_weights` \"pissa\" / \"olora\" together with `use_dora` is not supported here".into() });
                }
                lin.refuse_quantized("initialise PiSSA / OLoRA (they rewrite the base weight)")?;
                // The base weight [out, in] in f32; the residual replaces it when the adapter is
                // installed (HF `pissa_init` / `olora_init` mutate the base layer).
                let w = lin.weight.to_dtype(DType::F32)?;
                let w = if lin.transposed { w.t()?.contiguous()? } else { w };
                let scaling = cfg.scaling(r, alpha);
                let (a, b, res) = match cfg.init_lora_weights {
                    InitLoraWeights::Olora => olora(&w, r, scaling)?,
                    _ => pissa(&w, r, scaling)?,
                };
                let res = if lin.transposed { res.t()?.contiguous()? } else { res };
                residuals.insert(mname.clone(), res.to_dtype(lin.weight.dtype())?);
                let ad = LoraAdapter { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)?, r, alpha, scaling, dropout: cfg.lora_dropout, magnitude: None, merged_norm: None, embedding: false };
                planned.push((mname, ad));
                continue;
            }
            let a = match cfg.init_lora_weights {
                InitLoraWeights::Gaussian => {
                    let n = Normal::new(0.0f32, 1.0 / r as f32).map_err(|e| PeftError::Internal(e.to_string()))?;
                    (0..r * inf).map(|_| n.sample(&mut rng)).collect()
                }
                _ => kaiming_uniform(&mut rng, r, inf),
            };
            let b = match cfg.init_lora_weights {
                InitLoraWeights::Random => kaiming_uniform(&mut rng, outf, r),
                _ => vec![0f32; outf * r],
            };
            let a = Var::from_tensor(&Tensor::from_vec(a, (r, inf), &device)?)?;
            let b = Var::from_tensor(&Tensor::from_vec(b, (outf, r), &device)?)?;
            let mut ad = LoraAdapter { a, b, r, alpha, scaling: cfg.scaling(r, alpha), dropout: cfg.lora_dropout, magnitude: None, merged_norm: None, embedding: false };
            if cfg.use_dora {
                // DoRA starts with m = ‖W + s·B A‖ per row (HF `DoraLinearLayer.update_layer`).
                ad.magnitude = Some(Var::from_tensor(&lin.dora_weight_norm(&ad)?)?);
            }
            planned.push((mname, ad));
        }
        let mut tokens = self.plan_lora_trainable_tokens(&cfg, &targeted_modules(&planned), &mut rng)?;
        let task = cfg.task_type.as_deref().and_then(Task::from_task_type);
        let mut copies = self.plan_saved_copies(name, &cfg.modules_to_save.clone().unwrap_or_default(), task)?;
        let first = self.configs.is_empty();
        let targeted: Vec<String> = planned.iter().map(|(n, _)| n.clone()).collect();
        let mut planned: std::collections::HashMap<String, LoraAdapter> = planned.into_iter().collect();
        for (mname, lin) in self.base.named_layers_mut() {
            if let Some(ad) = planned.remove(&mname) {
                lin.layers.insert(name.to_string(), Box::new(ad));
            }
            if let Some(c) = copies.remove(&mname) {
                lin.saved_copies.insert(name.to_string(), c);
            }
            if let Some(res) = residuals.remove(&mname) {
                lin.weight = res;
            }
        }
        for (mname, lin) in self.base.named_layers_mut() {
            if let Some(l) = tokens.remove(&mname) {
                lin.layers.insert(name.to_string(), l);
            }
        }
        self.register(name, cfg.into(), first)?;
        Ok(targeted)
    }
}

fn targeted_modules(planned: &[(String, LoraAdapter)]) -> Vec<String> {
    planned.iter().map(|(n, _)| n.clone()).collect()
}
