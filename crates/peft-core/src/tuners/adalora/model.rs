//! AdaLoRA injection (HF `AdaLoraModel.__init__`, `_check_new_adapter_config`,
//! `_create_and_replace`, `AdaLoraLayer.update_layer`, `resize_modules_by_rank_pattern`), the
//! orthogonal regularisation (HF `AdaLoraModel.forward`), the saved state dict
//! (`resize_state_dict_by_rank_pattern`) and the public `update_and_allocate`.

use super::config::AdaLoraConfig;
use super::layer::AdaLoraLayer;
use crate::error::{PeftError, Result};
use crate::keys::KEY_PREFIX;
use crate::peft_model::PeftModel;
use crate::tuners::layer::AdapterLayer;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// HF's message when a second trainable AdaLoRA adapter is added.
pub const ONE_TRAINABLE: &str = "AdaLoraModel supports only 1 trainable adapter. When using multiple adapters, set inference_mode to True for all adapters except the one you want to train.";

fn bad(msg: String) -> PeftError {
    PeftError::InvalidAdapterConfig { path: None, msg }
}

fn normal(rng: &mut rand::rngs::StdRng, n: usize, std: f32) -> Result<Vec<f32>> {
    let d = Normal::new(0.0f32, std).map_err(|e| PeftError::Internal(e.to_string()))?;
    Ok((0..n).map(|_| d.sample(rng)).collect())
}

fn var(v: Vec<f32>, shape: (usize, usize), device: &Device) -> Result<Var> {
    if v.is_empty() {
        return Ok(Var::from_tensor(&Tensor::zeros(shape, DType::F32, device)?)?);
    }
    Ok(Var::from_tensor(&Tensor::from_vec(v, shape, device)?)?)
}

/// The rank of module `m` under `cfg`: the kept triplets of its `rank_pattern` entry, else
/// `init_r`.
///
/// Errors: `InvalidAdapterConfig` when the entry's length is not `init_r`.
pub(crate) fn rank_of(cfg: &AdaLoraConfig, m: &str) -> Result<usize> {
    match cfg.mask_of(m) {
        Some(mask) if mask.len() != cfg.init_r => Err(bad(format!(
            "`rank_pattern[\"{m}.lora_E\"]` has {} entries but `init_r` is {}",
            mask.len(),
            cfg.init_r
        ))),
        Some(mask) => Ok(mask.iter().filter(|k| **k).count()),
        None => Ok(cfg.init_r),
    }
}

/// The trainable AdaLoRA adapter of `model` (HF `trainable_adapter_name`): its name and config.
fn trainable(model: &PeftModel) -> Option<(&str, &AdaLoraConfig)> {
    model.configs.iter().find_map(|(n, c)| c.get::<AdaLoraConfig>().filter(|c| !c.inference_mode).map(|c| (n.as_str(), c)))
}

fn trainable_or_err(model: &PeftModel) -> Result<(&str, &AdaLoraConfig)> {
    trainable(model).ok_or_else(|| PeftError::InvalidState("the model has no trainable AdaLoRA adapter (update_and_allocate needs one whose inference_mode is false)".into()))
}

/// HF `AdaLoraModel.forward`'s orthogonal regularisation of adapter `name`:
/// `orth_reg_weight · mean over every lora_A and lora_B of ‖P Pᵀ − I‖_F` (`‖QᵀQ − I‖_F` for `B`),
/// a scalar f32 tensor (tracked when `train`). `None` when the weight is 0 or the adapter has no
/// layer. Layers of rank 0 count with a norm of 0, as in HF.
pub(crate) fn orth_regularization(model: &PeftModel, name: &str, cfg: &AdaLoraConfig, train: bool) -> Result<Option<Tensor>> {
    if cfg.orth_reg_weight == 0.0 {
        return Ok(None);
    }
    let mut sum: Option<Tensor> = None;
    let mut n = 0usize;
    for (_, lin) in model.base.named_layers() {
        let Some(l) = lin.layers.get(name).and_then(|l| l.as_any()).and_then(|a| a.downcast_ref::<AdaLoraLayer>()) else { continue };
        for (v, is_a) in [(&l.a, true), (&l.b, false)] {
            n += 1;
            let r = l.rank();
            if r == 0 {
                continue;
            }
            let p = if train { v.as_tensor().clone() } else { v.as_tensor().detach() }.to_dtype(DType::F32)?;
            let cov = if is_a { p.matmul(&p.t()?)? } else { p.t()?.matmul(&p)? };
            let d = (cov - Tensor::eye(r, DType::F32, p.device())?)?;
            let norm = d.sqr()?.sum_all()?.sqrt()?;
            sum = Some(match sum {
                Some(s) => (s + norm)?,
                None => norm,
            });
        }
    }
    if n == 0 {
        return Ok(None);
    }
    let dev = model.base.device().clone();
    let sum = match sum {
        Some(s) => s,
        None => Tensor::new(0f32, &dev)?,
    };
    Ok(Some(((sum / n as f64)? * cfg.orth_reg_weight)?))
}

/// HF `_get_adapter_state_dict` + `resize_state_dict_by_rank_pattern`: with a rank pattern, the
/// masked triplets of full-rank layers are dropped from adapter `name`'s tensors (rows of
/// `lora_A` / `lora_E`, columns of `lora_B`); layers already of the kept rank stay as they are.
pub(crate) fn resize_state_dict(model: &PeftModel, name: &str, cfg: &AdaLoraConfig, tensors: &mut [(String, Tensor)]) -> Result<()> {
    let Some(pattern) = cfg.rank_pattern() else { return Ok(()) };
    let masks: HashMap<String, Vec<bool>> = pattern.into_iter().filter_map(|(k, v)| k.strip_suffix(".lora_E").map(|m| (m.to_string(), v))).collect();
    for (m, lin) in model.base.named_layers() {
        if !lin.layers.get(name).is_some_and(|l| l.peft_type() == "ADALORA") {
            continue;
        }
        let Some(keep) = masks.get(&m) else { continue };
        let idx: Vec<u32> = keep.iter().enumerate().filter(|(_, k)| **k).map(|(i, _)| i as u32).collect();
        for (slot, dim) in [("lora_A", 0usize), ("lora_E", 0), ("lora_B", 1)] {
            let key = format!("{KEY_PREFIX}{m}.{slot}");
            let Some((_, t)) = tensors.iter_mut().find(|(k, _)| *k == key) else { continue };
            if t.dims()[dim] == idx.len() {
                continue;
            }
            if t.dims()[dim] != keep.len() {
                return Err(PeftError::InvalidState(format!(
                    "`{key}` has {} triplets but the rank_pattern entry `{m}.lora_E` has {}",
                    t.dims()[dim],
                    keep.len()
                )));
            }
            *t = if idx.is_empty() {
                let mut shape = t.dims().to_vec();
                shape[dim] = 0;
                Tensor::zeros(shape, t.dtype(), t.device())?
            } else {
                t.index_select(&Tensor::from_vec(idx.clone(), idx.len(), t.device())?, dim)?.contiguous()?
            };
        }
    }
    Ok(())
}

impl PeftModel {
    /// HF `AdaLoraModel.update_and_allocate(global_step)` for the model's trainable AdaLoRA
    /// adapter, given the gradients `grads` of the optimizer step just taken (call it after the
    /// optimizer step, before the gradients are dropped, with the 0-based step index as HF's
    /// AdaLoRA examples do; [`crate::train::Trainer::step`] calls it itself unless
    /// [`crate::train::TrainingArgs::tuner_step_hooks`] is off). Updates the importance
    /// averages, masks `lora_E` rows down to the step's budget and records the config's
    /// `rank_pattern` (see [`super::allocator`]).
    ///
    /// Errors: `InvalidState` when the model has no trainable AdaLoRA adapter (HF: an
    /// `AttributeError`), when the budget does not lie below `init_r · layers` (`target_r` ≥
    /// `init_r`; HF: torch's `kthvalue` error), or when a step after `total_step − tfinal` finds
    /// no rank pattern.
    pub fn update_and_allocate(&self, global_step: usize, grads: &GradStore) -> Result<()> {
        let (name, cfg) = trainable_or_err(self)?;
        super::allocator::record(self, name, grads);
        super::allocator::update_and_allocate(self, name, cfg, global_step)
    }

    /// [`Self::update_and_allocate`] with the gradients of the last optimizer step the
    /// [`crate::train::Trainer`] took (kept by the AdaLoRA layers, as torch keeps `p.grad` until
    /// `zero_grad`): for loops that run the trainer with `tuner_step_hooks` off and allocate
    /// themselves (TS `PeftModel.updateAndAllocate(globalStep)`).
    ///
    /// Errors: as [`Self::update_and_allocate`]; `InvalidState` when no step was recorded.
    pub fn update_and_allocate_recorded(&self, global_step: usize) -> Result<()> {
        let (name, cfg) = trainable_or_err(self)?;
        let ls: Vec<_> = self.base.named_layers().into_iter().filter_map(|(_, lin)| lin.layers.get(name).and_then(|l| l.as_any()).and_then(|a| a.downcast_ref::<AdaLoraLayer>()).map(|l| l.importance.lock().unwrap_or_else(|e| e.into_inner()).grads.is_empty())).collect();
        if ls.iter().all(|empty| *empty) {
            return Err(PeftError::InvalidState(format!("AdaLoRA adapter `{name}` has no gradients of an optimizer step to allocate with (run a Trainer step first)")));
        }
        super::allocator::update_and_allocate(self, name, cfg, global_step)
    }

    /// Inject an AdaLoRA adapter (HF `AdaLoraModel`): one [`AdaLoraLayer`] per targeted linear /
    /// `Conv1D` layer, of rank `init_r`, or of the kept triplets of the config's `rank_pattern`
    /// when it has one (HF `resize_modules_by_rank_pattern` on load; `ranknum` stays `init_r`).
    /// Init (HF `reset_lora_parameters`, drawn from an RNG seeded with `seed`): `lora_E = 0`,
    /// `lora_A`, `lora_B` ~ N(0, 0.02²) for any true `init_lora_weights`; N(0, 1) for all three
    /// with `false`.
    ///
    /// Errors (the model then unchanged): `InvalidAdapterConfig` for a second adapter that is not
    /// in inference mode (HF's message [`ONE_TRAINABLE`]), an embedding target (HF's message),
    /// a `rank_pattern` entry whose length is not `init_r`; `NoTargetModules`.
    pub(crate) fn add_adalora(&mut self, name: &str, mut cfg: AdaLoraConfig, seed: u64) -> Result<Vec<String>> {
        if !cfg.inference_mode && trainable(self).is_some() {
            return Err(bad(ONE_TRAINABLE.into()));
        }
        if cfg.sets_lora_r() {
            self.warnings.push("Note that `r` is not used in AdaLora and will be ignored.If you intended to set the initial rank, use `init_r` instead.".into());
        }
        let random = cfg.init_lora_weights == crate::tuners::lora::InitLoraWeights::Random;
        let planned = self.plan_layers_with(
            name,
            &mut cfg,
            seed,
            |model, cfg, selected| {
                // HF `_create_new_module` per target, in module order: embeddings refused,
                // `fan_in_fan_out` fitted to the layout, the rank of the kept triplets.
                let mut ranks = HashMap::new();
                for (mname, lin) in model.base.named_layers().into_iter().filter(|(m, _)| selected.contains(m)) {
                    if lin.is_embedding {
                        return Err(bad(format!(
                            "Target module `{mname}` (Embedding) is not supported. Currently, only `torch.nn.Linear`, `Conv1D`, and `torch.nn.Conv2d` are supported."
                        )));
                    }
                    crate::peft_model::fit_fan_in_fan_out(&mut model.warnings, lin, &mut cfg.fan_in_fan_out);
                    let r = rank_of(cfg, &mname)?;
                    ranks.insert(mname, r);
                }
                Ok(ranks)
            },
            |cfg, ranks, mname, lin, rng, device| {
                let (r, inf, outf) = (ranks.get(mname).copied().unwrap_or(cfg.init_r), lin.in_features(), lin.out_features());
                let (a, e, b) = if random {
                    (normal(rng, r * inf, 1.0)?, normal(rng, r, 1.0)?, normal(rng, outf * r, 1.0)?)
                } else {
                    let a = normal(rng, r * inf, 0.02)?;
                    let b = normal(rng, outf * r, 0.02)?;
                    (a, vec![0f32; r], b)
                };
                Ok(Box::new(AdaLoraLayer {
                    a: var(a, (r, inf), device)?,
                    e: var(e, (r, 1), device)?,
                    b: var(b, (outf, r), device)?,
                    ranknum: if r == 0 { 0.0 } else { cfg.init_r as f64 },
                    scaling: if cfg.lora_alpha > 0.0 { cfg.lora_alpha } else { r as f64 },
                    dropout: cfg.lora_dropout,
                    importance: Arc::new(Mutex::new(Default::default())),
                }) as Box<dyn AdapterLayer>)
            },
        )?;
        self.install_layers(name, cfg.into(), planned)
    }
}
