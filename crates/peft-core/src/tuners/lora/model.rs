//! Injecting LoRA adapters into a model (HF `LoraModel._create_and_replace`) and the base biases
//! a LoRA config trains (`bias: "all" | "lora_only"`).

use super::init::{olora, pissa};
use super::layer::LoraAdapter;
use super::{InitLoraWeights, LoraConfig};
use crate::error::{PeftError, Result};
use crate::keys::KEY_PREFIX;
use crate::model::Task;
use crate::peft_model::{is_output_head, kaiming_uniform, PeftModel};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;

impl PeftModel {
    pub(crate) fn add_lora(&mut self, name: &str, mut cfg: LoraConfig, seed: u64) -> Result<Vec<String>> {
        // HF `BaseTuner._check_new_adapter_config`: at most one adapter with a trainable bias.
        if cfg.bias != "none" && self.configs.iter().any(|(_, c)| c.as_lora().is_some_and(|o| o.bias != "none")) {
            return Err(PeftError::InvalidAdapterConfig {
                path: None,
                msg: "LoraModel supports only 1 adapter with bias. When using multiple adapters, set bias to 'none' for all adapters.".into(),
            });
        }
        if cfg.base_model_name_or_path.is_none() {
            cfg.base_model_name_or_path = self.base.info().name_or_path.clone();
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let device = self.base.device().clone();
        let mut planned: Vec<(String, LoraAdapter)> = Vec::new();
        let mut residuals: HashMap<String, Tensor> = HashMap::new();
        let mut misses = crate::targeting::Misses::default();
        for (mname, lin) in self.base.named_linears() {
            // `all-linear` leaves out the output head and embedding layers (they are no nn.Linear).
            let sel = cfg.rule().select(&mname, lin.is_embedding || is_output_head(self.base.task(), &mname));
            if !misses.note(&mname, sel, cfg.layers_pattern.as_deref()) {
                continue;
            }
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
                planned.push((mname, LoraAdapter { a, b, r, alpha, scaling: cfg.scaling(r, alpha), dropout: cfg.lora_dropout, magnitude: None, merged_norm: None }));
                continue;
            }
            // HF `_create_new_module`: the layer type decides `fan_in_fan_out` (with a warning).
            if lin.transposed && !cfg.fan_in_fan_out {
                self.warnings.push("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.".into());
                cfg.fan_in_fan_out = true;
            } else if !lin.transposed && cfg.fan_in_fan_out {
                self.warnings.push("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False.".into());
                cfg.fan_in_fan_out = false;
            }
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
                let ad = LoraAdapter { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)?, r, alpha, scaling, dropout: cfg.lora_dropout, magnitude: None, merged_norm: None };
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
            let mut ad = LoraAdapter { a, b, r, alpha, scaling: cfg.scaling(r, alpha), dropout: cfg.lora_dropout, magnitude: None, merged_norm: None };
            if cfg.use_dora {
                // DoRA starts with m = ‖W + s·B A‖ per row (HF `DoraLinearLayer.update_layer`).
                ad.magnitude = Some(Var::from_tensor(&lin.dora_weight_norm(&ad)?)?);
            }
            planned.push((mname, ad));
        }
        if planned.is_empty() {
            return Err(self.no_targets(&cfg.to_json()["target_modules"], &misses, cfg.layers_to_transform.as_deref(), cfg.layers_pattern.as_deref()));
        }
        let mut tokens = self.plan_lora_trainable_tokens(&cfg, &targeted_modules(&planned), &mut rng)?;
        let task = cfg.task_type.as_deref().and_then(Task::from_task_type);
        let mut copies = self.plan_saved_copies(name, &cfg.modules_to_save.clone().unwrap_or_default(), task)?;
        let first = self.configs.is_empty();
        let targeted: Vec<String> = planned.iter().map(|(n, _)| n.clone()).collect();
        let mut planned: std::collections::HashMap<String, LoraAdapter> = planned.into_iter().collect();
        for (mname, lin) in self.base.named_linears_mut() {
            if let Some(ad) = planned.remove(&mname) {
                lin.adapters.insert(name.to_string(), ad);
            }
            if let Some(c) = copies.remove(&mname) {
                lin.saved_copies.insert(name.to_string(), c);
            }
            if let Some(res) = residuals.remove(&mname) {
                lin.weight = res;
            }
        }
        for (mname, lin) in self.base.named_linears_mut() {
            if let Some(l) = tokens.remove(&mname) {
                lin.others.insert(name.to_string(), l);
            }
        }
        let (bias_mode, trainable) = (cfg.bias.clone(), !cfg.inference_mode);
        self.register(name, cfg.into(), first)?;
        if bias_mode != "none" && trainable {
            self.make_biases_trainable(&bias_mode)?;
        }
        Ok(targeted)
    }

    /// The base biases a LoRA adapter with `bias` = `"all"` or `"lora_only"` trains and saves
    /// (HF `_mark_only_adapters_as_trainable` / `_get_learnable_bias_state_dict`), as
    /// `(on-disk key, bias)`: `lora_only` = the biases of LoRA layers, saved as
    /// `base_model.model.<module>.base_layer.bias`; `all` = those plus every other bias of the
    /// model at its plain path (`base_model.model.transformer.h.0.ln_1.bias`). Layers wrapped by
    /// `modules_to_save` are left out (their copies are saved as such). Empty for `"none"`.
    pub(crate) fn bias_entries(&self, mode: &str) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        if mode == "none" {
            return out;
        }
        for (m, lin) in self.base.named_linears() {
            let Some(b) = &lin.bias else { continue };
            if !lin.saved_copies.is_empty() {
                continue;
            }
            if lin.has_adapters() {
                out.push((format!("{KEY_PREFIX}{m}.base_layer.bias"), b.clone()));
            } else if mode == "all" {
                out.push((format!("{KEY_PREFIX}{m}.bias"), b.clone()));
            }
        }
        if mode == "all" {
            for (m, b) in self.base.named_norm_biases() {
                out.push((format!("{KEY_PREFIX}{m}.bias"), b.clone()));
            }
        }
        out
    }

    /// Turn the biases [`Self::bias_entries`] names into trainable variables (in place: the layers
    /// use the variable's tensor, so optimizer updates reach the forward pass).
    pub(crate) fn make_biases_trainable(&mut self, mode: &str) -> Result<()> {
        let to_var = |t: &mut Tensor| -> Result<()> {
            if !t.is_variable() {
                *t = Var::from_tensor(t)?.as_tensor().clone();
            }
            Ok(())
        };
        for (_, lin) in self.base.named_linears_mut() {
            if !lin.saved_copies.is_empty() || (mode == "lora_only" && !lin.has_adapters()) {
                continue;
            }
            if let Some(b) = lin.bias.as_mut() {
                to_var(b)?;
            }
        }
        if mode == "all" {
            for (_, b) in self.base.named_norm_biases_mut() {
                to_var(b)?;
            }
        }
        Ok(())
    }

    /// The `bias` setting of adapter `name` (see [`config_bias_mode`]).
    pub(crate) fn bias_mode(&self, name: &str) -> String {
        self.peft_config(name).map(config_bias_mode).unwrap_or_else(|_| "none".into())
    }
}

/// The `bias` setting of a config as the bias helpers read it: LoRA's `"none"` / `"all"` /
/// `"lora_only"`; VeRA's `"vera_only"` reads as `"lora_only"` (HF treats every `"<method>_only"`
/// alike: the biases of the adapted layers); other tuners' from their
/// [`crate::tuners::registry::Tuner::bias_mode`] (OFT's `"oft_only"`); `"none"` for tuners without the field.
pub(crate) fn config_bias_mode(cfg: &crate::tuners::AdapterConfig) -> String {
    if let Some(c) = cfg.as_lora() {
        return c.bias.clone();
    }
    match cfg.get::<crate::tuners::VeraConfig>().map(|c| c.bias.as_str()) {
        Some("vera_only") => "lora_only".into(),
        Some(b) => b.into(),
        None => cfg.tuner().bias_mode(cfg).unwrap_or_else(|| "none".into()),
    }
}

fn targeted_modules(planned: &[(String, LoraAdapter)]) -> Vec<String> {
    planned.iter().map(|(n, _)| n.clone()).collect()
}
