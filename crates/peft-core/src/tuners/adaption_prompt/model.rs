//! Adaption prompts in a model (HF `AdaptionPromptModel.add_adapter` and
//! `set_peft_model_state_dict` for adaption prompts): which attention modules an adapter wraps,
//! its initialisation, and loading its tensors.

use super::config::{misfit, AdaptionPromptConfig};
use super::layer::{AdaptedAttention, ADAPTION_GATE, ADAPTION_PROMPT};
use crate::error::{PeftError, Result};
use crate::model::Task;
use crate::peft_model::{LoadResult, PeftModel, KEY_PREFIX};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;
use std::path::Path;

/// The model types whose attention HF PEFT 0.21 wraps with `AdaptedAttention`
/// (`TRANSFORMERS_MODEL_CONFIG`, less `gpt2`, which HF wraps with `AdaptedAttentionGPT`).
pub const SUPPORTED_MODEL_TYPES: [&str; 2] = ["llama", "mistral"];

impl PeftModel {
    /// HF `prepare_config` plus the checks of `add_adapter`: fills `target_modules`, and returns
    /// the module paths of the wrapped attention modules (the top `adapter_layers`, in order).
    ///
    /// Errors: `InvalidAdapterConfig` with HF's messages for an unsupported model type and for
    /// more `adapter_layers` than the model has; for a `target_modules` other than
    /// `"self_attn"`, a model that is not a causal LM, or a head layout HF's `view` would reject.
    pub(crate) fn plan_adaption_prompt(&self, cfg: &mut AdaptionPromptConfig) -> Result<Vec<String>> {
        let info = self.base.info();
        let mt = info.model_type.as_str();
        if mt == "gpt2" {
            return Err(misfit(
                "adaption prompt on GPT-2 (HF `AdaptedAttentionGPT`) is not implemented in peft-node: use a Llama or Mistral model".into(),
            ));
        }
        let hosts: Vec<String> = self.base.named_attention_prompts().into_iter().map(|(m, _)| m).collect();
        if !SUPPORTED_MODEL_TYPES.contains(&mt) || hosts.is_empty() {
            return Err(misfit(format!("Unsupported model type for adaption prompt: '{mt}'.")));
        }
        let target = cfg.target_modules.get_or_insert_with(|| "self_attn".into());
        if target != "self_attn" {
            return Err(misfit(format!("`target_modules` (option `targetModules`) must be \"self_attn\" (the {mt} attention module HF wraps), found {target:?}")));
        }
        if self.base.task() != Task::CausalLm {
            return Err(misfit(format!("adaption prompt needs a causal LM (AutoModelForCausalLM); this model has a {} head", self.base.task().task_type())));
        }
        if let Some(t) = cfg.task_type.as_deref().filter(|t| *t != "CAUSAL_LM") {
            return Err(misfit(format!("`task_type` {t:?} (option `taskType`) is not supported for adaption prompt: use \"CAUSAL_LM\"")));
        }
        if hosts.len() < cfg.adapter_layers {
            return Err(misfit(format!("Config specifies more adapter layers '{}' than the model has '{}'.", cfg.adapter_layers, hosts.len())));
        }
        // HF: factor = k_proj.in_features // k_proj.out_features; the keys are viewed as
        // [1, len, num_heads // factor, head_dim].
        let (h, nh, hd) = (info.hidden_size, info.num_attention_heads, info.head_dim);
        let nkv = info.num_key_value_heads.unwrap_or(nh);
        let factor = h / (nkv * hd).max(1);
        if factor == 0 || nh / factor != nkv {
            return Err(misfit(format!(
                "adaption prompt cannot view this model's keys as HF does: hidden_size {h} // (num_key_value_heads {nkv} · head_dim {hd}) = {factor} does not divide num_attention_heads {nh} into {nkv} key/value heads"
            )));
        }
        Ok(hosts[hosts.len() - cfg.adapter_layers..].to_vec())
    }

    /// Add an adaption-prompt adapter (HF `AdaptionPromptModel.add_adapter`): each of the top
    /// `adapter_layers` attention modules gets a prompt `[1, adapter_len, hidden]` drawn from
    /// N(0, 1) (seeded by `seed`) and a zero gate, or the tensors of `loaded` (by module path).
    /// The model's first adapter becomes active. Returns the wrapped module paths.
    ///
    /// Errors: as [`Self::plan_adaption_prompt`]; on error the model is unchanged.
    pub(crate) fn add_adaption_prompt(&mut self, name: &str, mut cfg: AdaptionPromptConfig, seed: u64, mut loaded: HashMap<String, (Option<Tensor>, Option<Tensor>)>) -> Result<Vec<String>> {
        let chosen = self.plan_adaption_prompt(&mut cfg)?;
        if cfg.base_model_name_or_path.is_none() {
            cfg.base_model_name_or_path = self.base.info().name_or_path.clone();
        }
        let (len, h) = (cfg.adapter_len, self.base.info().hidden_size);
        let device = self.base.device().clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = Normal::new(0f32, 1f32).expect("a valid normal distribution");
        let mut made = HashMap::new();
        for m in &chosen {
            let (p, g) = loaded.remove(m).unwrap_or((None, None));
            let prompt = match p {
                Some(t) => t.to_dtype(DType::F32)?,
                None => Tensor::from_vec((0..len * h).map(|_| normal.sample(&mut rng)).collect::<Vec<f32>>(), (1, len, h), &device)?,
            };
            let gate = match g {
                Some(t) => t.to_dtype(DType::F32)?,
                None => Tensor::zeros(1, DType::F32, &device)?,
            };
            made.insert(m.clone(), AdaptedAttention { prompt: Var::from_tensor(&prompt)?, gate: Var::from_tensor(&gate)? });
        }
        let first = self.configs.is_empty();
        for (m, host) in self.base.named_attention_prompts_mut() {
            if let Some(a) = made.remove(&m) {
                host.adapters.insert(name.to_string(), a);
            }
        }
        self.register(name, cfg.into(), first)?;
        Ok(chosen)
    }

    /// Load an adaption-prompt adapter's tensors (`<module>.adaption_prompt` `[1, adapter_len,
    /// hidden]` and `<module>.adaption_gate` `[1]` of each wrapped module, HF's keys, which carry
    /// no adapter name); parameters the file lacks keep their initial values and are reported
    /// as missing keys (HF's names), tensors of other modules as unexpected keys.
    ///
    /// Errors: as [`Self::plan_adaption_prompt`]; `ShapeMismatch` naming the key;
    /// `SafetensorsInvalid` when no tensor of the file belongs to the adapter.
    pub(crate) fn load_adaption_prompt(&mut self, name: &str, mut cfg: AdaptionPromptConfig, tensors: Vec<(String, Tensor)>, wpath: &Path) -> Result<LoadResult> {
        let chosen = self.plan_adaption_prompt(&mut cfg)?;
        let h = self.base.info().hidden_size;
        let mut result = LoadResult::default();
        let mut loaded: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (key, t) in tensors {
            let k = key.strip_prefix(KEY_PREFIX).unwrap_or(&key);
            let hit = k.rsplit_once('.').filter(|(m, _)| chosen.iter().any(|c| c == m));
            let (m, shape, is_prompt) = match hit {
                Some((m, ADAPTION_PROMPT)) => (m, vec![1, cfg.adapter_len, h], true),
                Some((m, ADAPTION_GATE)) => (m, vec![1], false),
                _ => {
                    result.unexpected_keys.push(key);
                    continue;
                }
            };
            if t.dims() != shape.as_slice() {
                return Err(PeftError::ShapeMismatch { name: format!("{} (key `{key}`)", wpath.display()), expected: shape, found: t.dims().to_vec() });
            }
            let e = loaded.entry(m.to_string()).or_default();
            if is_prompt {
                e.0 = Some(t);
            } else {
                e.1 = Some(t);
            }
        }
        if loaded.is_empty() {
            return Err(PeftError::SafetensorsInvalid {
                path: wpath.to_path_buf(),
                msg: format!(
                    "no tensor of the file is an adaption prompt of the wrapped modules {chosen:?} (unexpected keys: {:?})",
                    &result.unexpected_keys[..result.unexpected_keys.len().min(5)]
                ),
            });
        }
        for m in &chosen {
            let e = loaded.get(m);
            for (slot, have) in [(ADAPTION_PROMPT, e.is_some_and(|e| e.0.is_some())), (ADAPTION_GATE, e.is_some_and(|e| e.1.is_some()))] {
                if !have {
                    result.missing_keys.push(format!("{KEY_PREFIX}{m}.{slot}"));
                }
            }
        }
        result.missing_keys.sort();
        self.add_adaption_prompt(name, cfg, 0, loaded)?;
        Ok(result)
    }
}
