//! `PeftModel`: a base model plus named adapters, with HF PEFT's semantics for adding, activating,
//! disabling, merging, deleting, saving and loading adapters (peft 0.21 `PeftModel` / `LoraModel`).

use crate::error::{PeftError, Result};
use crate::io::{python_json_dumps, read_safetensors, write_atomic};
use crate::model::{BaseModel, ForwardOptions, KvCache, Task};
use crate::tuners::ia3::Ia3Config;
use crate::tuners::linear::{Ia3Adapter, LoraAdapter};
use crate::tuners::lora::{InitLoraWeights, LoraConfig, TargetModules};
use crate::tuners::prompt::{text_init_ids, ModelDims, PromptEncoder, PromptInit, PromptLearningConfig, PromptMethod};
use crate::tuners::AdapterConfig;
use std::collections::HashMap;
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::path::{Path, PathBuf};

/// Prefix of every key in adapter_model.safetensors (`base_model.model.<module path>...`).
pub use crate::keys::KEY_PREFIX;
use crate::keys::{lora_keys, strip_adapter_name, with_adapter_name};
/// The adapter name meaning "no adapter" in mixed batches.
pub const BASE_ADAPTER: &str = "__base__";

/// Keys that did not line up while loading an adapter (HF's `load_result`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadResult {
    /// Adapter parameters the model expected but the file lacks (they keep their initial values).
    pub missing_keys: Vec<String>,
    /// Keys of the file that match no adapter parameter (ignored).
    pub unexpected_keys: Vec<String>,
}

/// Options of [`PeftModel::load_adapter_with`] (HF `load_adapter` keyword arguments).
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Load with trainable weights (false: inference mode).
    pub is_trainable: bool,
    /// Use this config instead of the folder's adapter_config.json.
    pub config: Option<AdapterConfig>,
    /// `(regex, replacement)` pairs applied to each key after its `base_model.model.` /
    /// `base_model.` prefix is removed; the first pattern that matches rewrites the key (HF
    /// `key_mapping`).
    pub key_mapping: Vec<(String, String)>,
    /// Keep adapter weights in f32 (true, HF's default); false stores them in the base model's
    /// dtype.
    pub autocast_adapter_dtype: bool,
    /// HF creates the adapter on the meta device first; here loading never keeps a second copy,
    /// so this changes nothing (accepted for API compatibility).
    pub low_cpu_mem_usage: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { is_trainable: false, config: None, key_mapping: vec![], autocast_adapter_dtype: true, low_cpu_mem_usage: false }
    }
}

/// HF `PEFT_TYPE_TO_PREFIX_MAPPING`: the parameter-name prefix of a tuner's weights.
fn tuner_prefix(peft_type: &str) -> Option<&'static str> {
    match peft_type {
        "LORA" => Some("lora_"),
        "IA3" => Some("ia3_"),
        _ => None,
    }
}

/// A base model with adapters. See the module docs.
/// Options of [`PeftModel::save_pretrained_with`] (HF `save_pretrained` keyword arguments).
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    pub save_embedding_layers: SaveEmbeddingLayers,
    /// HF `path_initial_model_for_weight_conversion`: the folder of the adapter as saved right
    /// after PiSSA / OLoRA initialisation; the saved adapter is converted to a plain LoRA adapter
    /// for the original base model (see `PeftModel::convert_mutated_init`).
    pub path_initial_model_for_weight_conversion: Option<PathBuf>,
}

/// HF `save_pretrained(save_embedding_layers=...)`: whether the base embedding layers are
/// saved with the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaveEmbeddingLayers {
    /// Save them when the config's `target_modules` names an embedding layer (HF `"auto"`).
    #[default]
    Auto,
    Yes,
    No,
}

pub struct PeftModel {
    /// The base model (Llama family or GPT-2).
    pub base: Box<dyn BaseModel>,
    configs: Vec<(String, AdapterConfig)>,
    /// Prompt-learning adapters' encoders (HF `PeftModel.prompt_encoder`).
    prompt_encoders: HashMap<String, PromptEncoder>,
    active: Vec<String>,
    disabled: bool,
    /// Warnings of the last calls (HF's `warnings.warn`), drained by [`Self::take_warnings`].
    warnings: Vec<String>,
}

/// Check an adapter name is usable, also as a folder name (HF saves non-default adapters in a
/// subfolder named after them).
pub fn validate_adapter_name(name: &str) -> Result<()> {
    let bad = |m: &str| Err(PeftError::invalid_arg("adapterName", format!("{name:?} {m}")));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > 255 {
        return bad("is longer than 255 bytes");
    }
    if name.contains('/') || name.contains('\\') || name.contains('\0') || name == "." || name == ".." {
        return bad("cannot be used as a folder name (no '/', '\\', NUL, '.' or '..')");
    }
    if name.contains('.') {
        return bad("must not contain '.' (it would break parameter names)");
    }
    if name == BASE_ADAPTER {
        return bad("is reserved for the base model in mixed batches");
    }
    Ok(())
}

fn kaiming_uniform(rng: &mut rand::rngs::StdRng, rows: usize, cols: usize) -> Vec<f32> {
    // torch.nn.init.kaiming_uniform_(w, a=sqrt(5)) on [rows, cols]: bound = 1 / sqrt(fan_in = cols).
    let bound = 1.0 / (cols as f32).sqrt();
    (0..rows * cols).map(|_| rng.random_range(-bound..bound)).collect()
}

impl PeftModel {
    /// Wrap a base model (no adapters yet).
    pub fn new(base: Box<dyn BaseModel>) -> Self {
        PeftModel { base, configs: vec![], prompt_encoders: HashMap::new(), active: vec![], disabled: false, warnings: vec![] }
    }

    /// Adapter names in the order they were added.
    pub fn adapter_names(&self) -> Vec<String> {
        self.configs.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The config of `name`.
    pub fn peft_config(&self, name: &str) -> Result<&AdapterConfig> {
        self.configs.iter().find(|(n, _)| n == name).map(|(_, c)| c).ok_or_else(|| self.not_found(name))
    }

    /// Queue a warning for [`Self::take_warnings`] (HF `warnings.warn`).
    pub(crate) fn warn(&mut self, msg: String) {
        self.warnings.push(msg);
    }

    /// Warnings raised since the last call (HF's `warnings.warn` messages), oldest first.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    /// HF `peft_type` of the model's adapters (`None` before the first adapter).
    pub fn peft_type(&self) -> Option<&'static str> {
        self.configs.first().map(|(_, c)| c.peft_type())
    }

    /// HF `is_prompt_learning`: the model's adapters are prompt-learning adapters.
    pub fn is_prompt_learning(&self) -> bool {
        self.configs.first().map(|(_, c)| c.is_prompt_learning()).unwrap_or(false)
    }

    /// The prompt encoder of adapter `name` (prompt learning only).
    pub fn prompt_encoder(&self, name: &str) -> Option<&PromptEncoder> {
        self.prompt_encoders.get(name)
    }

    /// Dimensions of the base model that prompt-learning configs are derived from.
    pub fn model_dims(&self) -> ModelDims {
        let c = self.base.info();
        ModelDims {
            num_layers: c.num_hidden_layers,
            hidden_size: c.hidden_size,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            vocab_size: c.vocab_size,
        }
    }

    /// The active prompt-learning adapter and its encoder, unless adapters are disabled.
    /// The active prompt-learning adapter's config and encoder (`None` when disabled or none).
    pub(crate) fn active_prompt(&self) -> Option<(&PromptLearningConfig, &PromptEncoder)> {
        if self.disabled {
            return None;
        }
        let name = self.active.first()?;
        let cfg = self.peft_config(name).ok()?.as_prompt()?;
        Some((cfg, self.prompt_encoders.get(name)?))
    }

    fn not_found(&self, name: &str) -> PeftError {
        PeftError::AdapterNotFound { name: name.into(), available: self.adapter_names() }
    }

    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// Module paths that carry adapter `name`.
    pub fn adapter_modules(&self, name: &str) -> Vec<String> {
        self.base.named_linears().into_iter().filter(|(_, l)| l.adapters.contains_key(name) || l.ia3.contains_key(name)).map(|(n, _)| n).collect()
    }

    /// Bytes of native memory held by the model's weights: the base parameters (tied weights
    /// once) and every adapter's tensors (LoRA/DoRA, IA3, modules_to_save copies, prompt
    /// encoders). Used to report external memory to the JS engine.
    pub fn native_bytes(&self) -> usize {
        let bytes = |v: &Var| v.elem_count() * v.dtype().size_in_bytes();
        let mut n = self.base.base_param_count() * self.base.dtype().size_in_bytes();
        for (_, l) in self.base.named_linears() {
            for a in l.adapters.values() {
                n += bytes(&a.a) + bytes(&a.b) + a.magnitude.as_ref().map(bytes).unwrap_or(0);
            }
            for ia in l.ia3.values() {
                n += bytes(&ia.l);
            }
            for (w, b) in l.saved_copies.values() {
                n += bytes(w) + b.as_ref().map(bytes).unwrap_or(0);
            }
        }
        for e in self.prompt_encoders.values() {
            n += e.vars().iter().map(|(_, v)| bytes(v)).sum::<usize>();
        }
        n
    }

    /// Names of merged adapters (in any layer).
    pub fn merged_adapters(&self) -> Vec<String> {
        let mut out: Vec<String> = self.base.named_linears().into_iter().flat_map(|(_, l)| l.merged.clone()).collect();
        out.sort();
        out.dedup();
        out
    }

    /// Inject a new adapter (HF `add_adapter` / `inject_adapter`). The first adapter of a model is
    /// made active (as `get_peft_model` does); later ones are not. `seed` drives the weight init.
    ///
    /// Errors: `InvalidArgument` (bad name), `AdapterExists`, `NoTargetModules` (naming the
    /// targets and some module names); on any error the model is left unchanged.
    pub fn add_adapter(&mut self, name: &str, cfg: impl Into<AdapterConfig>, seed: u64) -> Result<Vec<String>> {
        let cfg = cfg.into();
        validate_adapter_name(name)?;
        if self.configs.iter().any(|(n, _)| n == name) {
            return Err(PeftError::AdapterExists(name.into()));
        }
        if let Some(existing) = self.peft_type() {
            if existing != cfg.peft_type() {
                return Err(PeftError::InvalidAdapterConfig {
                    path: None,
                    msg: format!("Cannot combine adapters with different peft types. Found {existing} and {}.", cfg.peft_type()),
                });
            }
        }
        let task_type = match &cfg {
            AdapterConfig::Lora(c) => c.task_type.clone(),
            AdapterConfig::Ia3(c) => c.task_type.clone(),
            AdapterConfig::Prompt(c) => c.task_type.clone(),
        };
        let head = self.base.task();
        match task_type.as_deref() {
            None => {}
            Some(t) if Some(head) == Task::from_task_type(t) => {}
            // A seq2seq prompt config on a decoder-only model is refused below with the
            // encoder-decoder reason.
            Some("SEQ_2_SEQ_LM") if cfg.is_prompt_learning() && head == Task::CausalLm => {}
            Some(t) if Task::from_task_type(t).is_none() => {
                return Err(PeftError::InvalidAdapterConfig {
                    path: None,
                    msg: format!(
                        "unknown `task_type` {t:?} (taskType); expected one of {}",
                        Task::ALL.iter().map(|t| t.task_type()).collect::<Vec<_>>().join(", ")
                    ),
                })
            }
            Some(t) => {
                return Err(PeftError::InvalidAdapterConfig {
                    path: None,
                    msg: format!(
                        "`task_type` {t:?} (taskType) does not match the model: {} has a {} head; load the model with {} for {t}, or use task_type {:?}",
                        self.base.info().architecture,
                        head.task_type(),
                        Task::from_task_type(t).map(|x| x.auto_class()).unwrap_or("AutoModelForCausalLM"),
                        head.task_type()
                    ),
                })
            }
        }
        if let Some(prefix) = tuner_prefix(cfg.peft_type()) {
            if prefix.contains(name) {
                self.warnings.push(format!(
                    "Adapter name '{name}' should not be contained in the prefix '{prefix}'. This may lead to reinitialization of the adapter weights during loading."
                ));
            }
        }
        if !cfg.unknown_fields().is_empty() {
            self.warnings.push(format!(
                "the config of adapter '{name}' has fields that {} configs do not have (kept, not used): {:?}",
                cfg.peft_type(),
                cfg.unknown_fields()
            ));
        }
        if let AdapterConfig::Lora(c) = &cfg {
            let names: Vec<String> = self.base.named_linears().into_iter().map(|(n, _)| n).collect();
            for (what, keys) in [("rank_pattern", c.rank_pattern.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>()), ("alpha_pattern", c.alpha_pattern.iter().map(|(k, _)| k.clone()).collect())] {
                for k in keys {
                    let hit = names.iter().any(|n| crate::targeting::pattern_lookup(&[(k.clone(), ())], n).is_some());
                    if !hit {
                        self.warnings.push(format!("{what} key {k:?} matches no module of the model"));
                    }
                }
            }
        }
        let mut cfg = cfg;
        cfg.add_task_head_modules();
        self.check_tied_modules(&cfg)?;
        match cfg {
            AdapterConfig::Lora(c) => self.add_lora(name, c, seed),
            AdapterConfig::Ia3(c) => self.add_ia3(name, c, seed),
            AdapterConfig::Prompt(c) => self.add_prompt(name, c, seed, None).map(|_| vec![]),
        }
    }

    /// HF `BaseTuner._check_tied_modules` for a LoRA or IA3 config on a model whose `lm_head`
    /// is tied to the input embedding (`tie_word_embeddings`): when the adapter wraps a tied
    /// layer (an `embed_tokens` / `lm_head` entry in `modules_to_save` or `target_modules`), HF's
    /// warning; with `ensure_weight_tying`, HF's warnings when nothing tied is involved. HF 0.21
    /// implements `ensure_weight_tying` for a tied layer in the adapter by tying the adapter's
    /// copies; that is not built here, so such a config is refused rather than silently untied.
    ///
    /// Errors: `InvalidAdapterConfig` naming `ensure_weight_tying` in that last case.
    fn check_tied_modules(&mut self, cfg: &AdapterConfig) -> Result<()> {
        const EMBEDDING_LAYER_NAMES: [&str; 2] = ["embed_tokens", "lm_head"];
        let (targets, mts, ensure, has_field) = match cfg {
            AdapterConfig::Lora(c) => (&c.target_modules, c.modules_to_save.clone().unwrap_or_default(), c.to_json()["ensure_weight_tying"].as_bool().unwrap_or(false), true),
            AdapterConfig::Ia3(c) => (&c.target_modules, c.modules_to_save.clone().unwrap_or_default(), false, false),
            AdapterConfig::Prompt(_) => return Ok(()),
        };
        let last = |m: &str| m.rsplit('.').next().unwrap_or(m).to_string();
        let to_save = mts.iter().any(|m| EMBEDDING_LAYER_NAMES.contains(&last(m).as_str()));
        let in_target = match targets {
            TargetModules::List(l) => l.iter().any(|m| EMBEDDING_LAYER_NAMES.contains(&last(m).as_str())),
            TargetModules::Regex(r) => EMBEDDING_LAYER_NAMES.iter().any(|n| regex::Regex::new(&format!("^(?:{r})$")).map(|re| re.is_match(n)).unwrap_or(false)),
            TargetModules::AllLinear => false,
        };
        let tied = self.base.config_json()["tie_word_embeddings"].as_bool() == Some(true) && matches!(self.base.task(), Task::CausalLm | Task::Seq2SeqLm);
        if ensure {
            if !tied {
                self.warnings.push("You have requested `ensure_weight_tying`, but no tied modules were found in the model".into());
            } else if to_save || in_target {
                return Err(PeftError::InvalidAdapterConfig {
                    path: None,
                    msg: format!(
                        "`ensure_weight_tying` (ensureWeightTying) with a tied layer in {} is not supported here: peft-node does not tie the adapter's copies of `lm_head` and the input embedding. Set it to false (the tied layers then get separate adapter weights, as HF does without it).",
                        if to_save { "`modules_to_save`" } else { "`target_modules`" }
                    ),
                });
            } else {
                self.warnings.push("You have requested `ensure_weight_tying`, but no tied modules are added in either `modules_to_save` or `target_modules`".into());
            }
        } else if (to_save || in_target) && tied {
            let how = if has_field { "but `ensure_weight_tying` is not set to True" } else { "but no implementation exists to tie the adapters" };
            self.warnings.push(format!(
                "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, {how}. This can lead to complications, for example when merging the adapter or converting your model to formats other than safetensors. Check the discussion here: https://github.com/huggingface/peft/issues/2777"
            ));
        }
        Ok(())
    }

    fn add_lora(&mut self, name: &str, mut cfg: LoraConfig, seed: u64) -> Result<Vec<String>> {
        // HF `BaseTuner._check_new_adapter_config`: at most one adapter with a trainable bias.
        if cfg.bias != "none" && self.configs.iter().any(|(_, c)| matches!(c, AdapterConfig::Lora(o) if o.bias != "none")) {
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
                // The base weight [out, in] in f32; the residual replaces it when the adapter is
                // installed (HF `pissa_init` / `olora_init` mutate the base layer).
                let w = lin.weight.to_dtype(DType::F32)?;
                let w = if lin.transposed { w.t()?.contiguous()? } else { w };
                let scaling = cfg.scaling(r, alpha);
                let (a, b, res) = match cfg.init_lora_weights {
                    InitLoraWeights::Olora => crate::tuners::init::olora(&w, r, scaling)?,
                    _ => crate::tuners::init::pissa(&w, r, scaling)?,
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
    fn bias_entries(&self, mode: &str) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        if mode == "none" {
            return out;
        }
        for (m, lin) in self.base.named_linears() {
            let Some(b) = &lin.bias else { continue };
            if !lin.saved_copies.is_empty() {
                continue;
            }
            if !lin.adapters.is_empty() {
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
    fn make_biases_trainable(&mut self, mode: &str) -> Result<()> {
        let to_var = |t: &mut Tensor| -> Result<()> {
            if !t.is_variable() {
                *t = Var::from_tensor(t)?.as_tensor().clone();
            }
            Ok(())
        };
        for (_, lin) in self.base.named_linears_mut() {
            if !lin.saved_copies.is_empty() || (mode == "lora_only" && lin.adapters.is_empty()) {
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

    /// The `bias` setting of adapter `name` (`"none"` for non-LoRA adapters).
    fn bias_mode(&self, name: &str) -> String {
        match self.peft_config(name) {
            Ok(AdapterConfig::Lora(c)) => c.bias.clone(),
            _ => "none".into(),
        }
    }

    /// Inject an (IA)³ adapter (HF `IA3Model`): one vector per targeted linear layer, `[out, 1]`
    /// or `[1, in]` for feed-forward modules; ones with `init_ia3_weights` (a no-op), else N(0, 1).
    fn add_ia3(&mut self, name: &str, mut cfg: Ia3Config, seed: u64) -> Result<Vec<String>> {
        if cfg.base_model_name_or_path.is_none() {
            cfg.base_model_name_or_path = self.base.info().name_or_path.clone();
        }
        let task = cfg.task_type.as_deref().and_then(Task::from_task_type);
        let copies = self.plan_saved_copies(name, &cfg.modules_to_save.clone().unwrap_or_default(), task)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 1.0).map_err(|e| PeftError::Internal(e.to_string()))?;
        let device = self.base.device().clone();
        let mut planned: HashMap<String, Ia3Adapter> = HashMap::new();
        let mut misses = crate::targeting::Misses::default();
        for (mname, lin) in self.base.named_linears() {
            let sel = cfg.rule().select(&mname, lin.is_embedding || is_output_head(self.base.task(), &mname));
            if !misses.note(&mname, sel, None) {
                continue;
            }
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
        if planned.is_empty() {
            return Err(self.no_targets(&crate::tuners::AdapterConfig::Ia3(cfg).to_json()["target_modules"], &misses, None, None));
        }
        let mut targeted: Vec<String> = planned.keys().cloned().collect();
        targeted.sort();
        let first = self.configs.is_empty();
        for (mname, lin) in self.base.named_linears_mut() {
            if let Some(ad) = planned.remove(&mname) {
                lin.ia3.insert(name.to_string(), ad);
            }
        }
        self.install_saved_copies(name, copies);
        self.register(name, cfg.into(), first)?;
        Ok(targeted)
    }

    /// HF's `NoMatchingPeftModuleError` for a targeting pass that selected nothing, with the
    /// modules it left out and some module names of the model.
    fn no_targets(&self, targets: &serde_json::Value, misses: &crate::targeting::Misses, layers: Option<&[usize]>, layers_pattern: Option<&[String]>) -> PeftError {
        let names = self.base.module_names();
        let examples: Vec<&String> = names.iter().filter(|n| n.contains("layers.0.") || !n.contains("layers.")).take(12).collect();
        let targets = crate::io::python_json_dumps(targets).replace('\n', "").replace("  ", "");
        PeftError::NoTargetModules {
            msg: misses.message(&targets, layers, layers_pattern),
            examples: examples.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
        }
    }

    /// Add a prompt-learning adapter (HF `_setup_prompt_encoder`): derive the config's model
    /// fields, check them against the model, build (or take) its encoder.
    fn add_prompt(&mut self, name: &str, mut cfg: PromptLearningConfig, seed: u64, encoder: Option<PromptEncoder>) -> Result<()> {
        let bad = |msg: String| PeftError::InvalidAdapterConfig { path: None, msg };
        let task = cfg.task_type.as_deref().and_then(Task::from_task_type);
        let dims = self.model_dims();
        cfg.prepare(&dims);
        if cfg.base_model_name_or_path.is_none() {
            cfg.base_model_name_or_path = self.base.info().name_or_path.clone();
        }
        // HF: SEQ_2_SEQ_LM gives 2 transformer submodules (encoder and decoder), else 1.
        let seq2seq = self.base.task() == Task::Seq2SeqLm;
        if seq2seq && cfg.num_transformer_submodules != Some(2) {
            return Err(bad(format!(
                "num_transformer_submodules {:?} (task_type {:?}) does not fit the encoder-decoder model {}: use task_type \"SEQ_2_SEQ_LM\" (num_transformer_submodules 2)",
                cfg.num_transformer_submodules,
                cfg.task_type,
                self.base.info().architecture
            )));
        }
        if !seq2seq && cfg.num_transformer_submodules != Some(1) {
            return Err(bad(format!(
                "num_transformer_submodules {:?} (task_type {:?}) needs an encoder-decoder model; this model is decoder-only (use task_type \"CAUSAL_LM\")",
                cfg.num_transformer_submodules, cfg.task_type
            )));
        }
        if seq2seq && cfg.method == PromptMethod::MultitaskPromptTuning {
            return Err(bad("MULTITASK_PROMPT_TUNING is not supported for encoder-decoder models here (use PROMPT_TUNING, P_TUNING or PREFIX_TUNING)".into()));
        }
        if seq2seq && cfg.method == PromptMethod::PrefixTuning && cfg.num_layers.unwrap_or(0) < self.base.num_layers() {
            return Err(bad(format!(
                "prefix tuning `num_layers` {:?} is smaller than the model's {} decoder layers (HF PEFT builds one prefix group per layer up to num_layers)",
                cfg.num_layers,
                self.base.num_layers()
            )));
        }
        let td = cfg.token_dim.unwrap_or(0);
        let max_pos = self.base.info().max_position_embeddings;
        if cfg.total_virtual_tokens() >= max_pos {
            return Err(bad(format!(
                "`num_virtual_tokens` {} leaves no position for real tokens: the model has max_position_embeddings {max_pos}",
                cfg.num_virtual_tokens
            )));
        }
        match cfg.method {
            PromptMethod::PrefixTuning => {
                let heads = cfg.num_attention_heads.unwrap_or(0);
                if cfg.num_layers != Some(dims.num_layers) || heads != dims.num_key_value_heads.unwrap_or(dims.num_attention_heads) || td != heads * dims.head_dim {
                    return Err(bad(format!(
                        "prefix tuning config (num_layers {:?}, num_attention_heads {heads}, token_dim {td}) does not fit the model ({} layers, {} key/value heads of size {})",
                        cfg.num_layers, dims.num_layers, dims.num_key_value_heads.unwrap_or(dims.num_attention_heads), dims.head_dim
                    )));
                }
            }
            _ => {
                if td != dims.hidden_size {
                    return Err(bad(format!("token_dim {td} does not match the model's hidden size {}", dims.hidden_size)));
                }
            }
        }
        let device = self.base.device().clone();
        let encoder = match encoder {
            Some(e) => e,
            None => {
                let rows = cfg.table_rows();
                let use_vocab = !cfg.inference_mode && matches!(cfg.method, PromptMethod::PromptTuning | PromptMethod::MultitaskPromptTuning);
                let init = if use_vocab && cfg.prompt_tuning_init == "TEXT" {
                    let tpath = PathBuf::from(cfg.tokenizer_name_or_path.clone().unwrap_or_default());
                    let tok = crate::tokenizer::Tokenizer::from_pretrained(&tpath)?;
                    let ids = tok.encode(cfg.prompt_tuning_init_text.as_deref().unwrap_or(""), true)?;
                    PromptInit::FromVocab { word_embeddings: self.base.word_embeddings(), ids: text_init_ids(&ids, rows)? }
                } else if use_vocab && cfg.prompt_tuning_init == "SAMPLE_VOCAB" {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
                    let ids = (0..rows).map(|_| rng.random_range(0..dims.vocab_size as u32)).collect();
                    PromptInit::FromVocab { word_embeddings: self.base.word_embeddings(), ids }
                } else {
                    PromptInit::Random
                };
                let mut enc = PromptEncoder::new(&cfg, init, seed, &device)?;
                if cfg.method == PromptMethod::MultitaskPromptTuning && !cfg.inference_mode {
                    init_multitask_from_source(&cfg, &mut enc, &device)?;
                }
                enc
            }
        };
        let copies = self.plan_saved_copies(name, &cfg.modules_to_save().unwrap_or_default(), task)?;
        let first = self.configs.is_empty();
        self.prompt_encoders.insert(name.to_string(), encoder);
        self.install_saved_copies(name, copies);
        self.register(name, cfg.into(), first)
    }

    /// HF `ModulesToSaveWrapper` for `modules_to_save`: a trainable copy of each listed linear
    /// module (matched by full name or dotted suffix) for adapter `name`, as `module → (weight,
    /// bias)`. Nothing is changed on the model. Entries that match nothing are ignored, as HF's
    /// `_set_trainable` does; a user's own entry (not one `task` adds) that matches nothing warns.
    fn plan_saved_copies(&mut self, name: &str, wanted: &[String], task: Option<Task>) -> Result<HashMap<String, (Var, Option<Var>)>> {
        let mut copies = HashMap::new();
        let mut unmatched = Vec::new();
        for w in wanted {
            let mut found = false;
            for (mname, lin) in self.base.named_linears() {
                if saves_module(&mname, w) {
                    let wt = Var::from_tensor(&lin.weight.copy()?)?;
                    let b = match &lin.bias {
                        Some(b) => Some(Var::from_tensor(&b.copy()?)?),
                        None => None,
                    };
                    copies.insert(mname, (wt, b));
                    found = true;
                }
            }
            let auto = task.map(|t| t.head_modules().contains(&w.as_str())).unwrap_or(false);
            if !found && !auto {
                unmatched.push(w.clone());
            }
        }
        if !unmatched.is_empty() {
            self.warnings.push(format!(
                "modules_to_save entries {unmatched:?} of adapter '{name}' match no linear module of the model and are ignored (only linear modules such as `lm_head` or `classifier` are supported)"
            ));
        }
        Ok(copies)
    }

    fn install_saved_copies(&mut self, name: &str, mut copies: HashMap<String, (Var, Option<Var>)>) {
        for (mname, lin) in self.base.named_linears_mut() {
            if let Some(c) = copies.remove(&mname) {
                lin.saved_copies.insert(name.to_string(), c);
            }
        }
    }

    /// Record a newly injected adapter's config; the model's first adapter becomes active (as
    /// `get_peft_model` does), later ones are not.
    fn register(&mut self, name: &str, cfg: AdapterConfig, first: bool) -> Result<()> {
        self.configs.push((name.to_string(), cfg));
        if first {
            self.set_adapter(&[name.to_string()])
        } else {
            self.sync_layers();
            Ok(())
        }
    }

    fn sync_layers(&mut self) {
        let active = self.active.clone();
        let disabled = self.disabled;
        for (_, lin) in self.base.named_linears_mut() {
            lin.active = active
                .iter()
                .filter(|a| lin.adapters.contains_key(*a) || lin.saved_copies.contains_key(*a) || lin.ia3.contains_key(*a))
                .cloned()
                .collect();
            lin.disabled = disabled;
        }
    }

    /// Make `names` the active adapters (HF `set_adapter`; several names are summed).
    ///
    /// Errors: `AdapterNotFound` for an unknown name, `InvalidArgument` for an empty list.
    pub fn set_adapter(&mut self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Err(PeftError::invalid_arg("adapterName", "at least one adapter name is required"));
        }
        for n in names {
            self.peft_config(n)?;
        }
        if self.is_prompt_learning() && names.len() > 1 {
            return Err(PeftError::invalid_arg("adapterName", "prompt-learning models have exactly one active adapter"));
        }
        if !self.merged_adapters().is_empty() {
            // HF LoraModel.set_adapter: unmerge first (with this warning).
            self.warnings.push("Adapter cannot be set when the model is merged. Unmerging the model first.".into());
            self.unmerge_adapter()?;
        }
        self.active = names.to_vec();
        self.sync_layers();
        Ok(())
    }

    /// Disable (`true`) or re-enable all adapters (HF `disable_adapter_layers` /
    /// `enable_adapter_layers`). Disabling unmerges merged adapters first.
    pub fn set_disabled(&mut self, disabled: bool) -> Result<()> {
        if disabled {
            self.unmerge_adapter()?;
        }
        self.disabled = disabled;
        self.sync_layers();
        Ok(())
    }

    /// Merge the named adapters (default: the active ones) into the base weights.
    pub fn merge_adapter(&mut self, names: Option<&[String]>, safe_merge: bool) -> Result<()> {
        let names: Vec<String> = match names {
            Some(n) => n.to_vec(),
            None => self.active.clone(),
        };
        for n in &names {
            self.peft_config(n)?;
        }
        if self.is_prompt_learning() {
            return Err(PeftError::InvalidState(format!(
                "{} adapters cannot be merged: they do not change the base model's weights",
                self.peft_type().unwrap_or_default()
            )));
        }
        for (_, lin) in self.base.named_linears_mut() {
            lin.merge(&names, safe_merge)?;
        }
        Ok(())
    }

    /// Subtract every merged adapter from the base weights again.
    pub fn unmerge_adapter(&mut self) -> Result<()> {
        for (_, lin) in self.base.named_linears_mut() {
            lin.unmerge()?;
        }
        Ok(())
    }

    /// Merge the given (default: active) adapters and remove all adapter state, leaving a plain
    /// base model with the deltas folded in (HF `merge_and_unload`).
    pub fn merge_and_unload(&mut self, names: Option<&[String]>, safe_merge: bool) -> Result<()> {
        self.merge_adapter(names, safe_merge)?;
        self.strip_adapters(true);
        Ok(())
    }

    /// Remove all adapters without merging (HF `unload`): the base model as it was.
    pub fn unload(&mut self) -> Result<()> {
        self.unmerge_adapter()?;
        self.strip_adapters(false);
        Ok(())
    }

    fn strip_adapters(&mut self, keep_copies: bool) {
        let active = self.active.clone();
        for (_, lin) in self.base.named_linears_mut() {
            if keep_copies {
                if let Some((w, b)) = active.iter().find_map(|a| lin.saved_copies.get(a)) {
                    lin.weight = w.as_tensor().detach();
                    if let Some(b) = b {
                        lin.bias = Some(b.as_tensor().detach());
                    }
                }
            }
            lin.saved_copies.clear();
            lin.adapters.clear();
            lin.ia3.clear();
            lin.active.clear();
            lin.merged.clear();
            lin.disabled = false;
        }
        self.configs.clear();
        self.prompt_encoders.clear();
        self.active.clear();
        self.disabled = false;
    }

    /// Remove adapter `name` (HF `delete_adapter`). Refused while it is merged.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.peft_config(name)?;
        if self.merged_adapters().iter().any(|m| m == name) {
            return Err(PeftError::InvalidState(format!("adapter `{name}` is merged; unmerge it before deleting it")));
        }
        for (_, lin) in self.base.named_linears_mut() {
            lin.adapters.remove(name);
            lin.saved_copies.remove(name);
            lin.ia3.remove(name);
        }
        self.prompt_encoders.remove(name);
        self.configs.retain(|(n, _)| n != name);
        self.active.retain(|n| n != name);
        if self.active.is_empty() {
            if let Some((n, _)) = self.configs.first() {
                self.active = vec![n.clone()];
            }
        }
        self.sync_layers();
        Ok(())
    }

    /// Adapter parameters that training updates: those of the active adapters whose config is
    /// not in inference mode, as `(key as saved on disk, Var)`.
    pub fn trainable_parameters(&self) -> Vec<(String, Var)> {
        self.trainable_parameters_by_adapter().into_iter().flat_map(|(_, v)| v).collect()
    }

    /// [`Self::trainable_parameters`] grouped by adapter name (active adapters in order).
    pub fn trainable_parameters_by_adapter(&self) -> Vec<(String, Vec<(String, Var)>)> {
        self.trainable_parameters_of(&self.active)
    }

    /// The parameters training would update for each of `names` if they were the active
    /// adapters (unknown names and adapters in inference mode give nothing), grouped by adapter.
    pub fn trainable_parameters_of(&self, names: &[String]) -> Vec<(String, Vec<(String, Var)>)> {
        let mut groups = Vec::new();
        for name in names {
            let Ok(cfg) = self.peft_config(name) else { continue };
            if cfg.inference_mode() {
                continue;
            }
            if let Some(enc) = self.prompt_encoders.get(name) {
                let mut vars: Vec<(String, Var)> = enc.vars().into_iter().map(|(p, v)| (format!("prompt_encoder.{name}.{p}"), v)).collect();
                for (m, lin) in self.base.named_linears() {
                    if let Some((w, b)) = lin.saved_copies.get(name) {
                        vars.push((format!("base_model.{m}.weight"), w.clone()));
                        if let Some(b) = b {
                            vars.push((format!("base_model.{m}.bias"), b.clone()));
                        }
                    }
                }
                groups.push((name.clone(), vars));
                continue;
            }
            let mut out = Vec::new();
            for (k, b) in self.bias_entries(&self.bias_mode(name)) {
                if b.is_variable() {
                    if let Ok(v) = Var::from_tensor(&b) {
                        out.push((k, v));
                    }
                }
            }
            for (m, lin) in self.base.named_linears() {
                if let Some(ad) = lin.adapters.get(name) {
                    let (ka, kb) = lora_keys(&m, lin.is_embedding);
                    out.push((format!("{KEY_PREFIX}{ka}"), ad.a.clone()));
                    out.push((format!("{KEY_PREFIX}{kb}"), ad.b.clone()));
                    if let Some(mag) = &ad.magnitude {
                        out.push((format!("{KEY_PREFIX}{m}.lora_magnitude_vector"), mag.clone()));
                    }
                }
                if let Some(ia) = lin.ia3.get(name) {
                    out.push((format!("{KEY_PREFIX}{m}.ia3_l"), ia.l.clone()));
                }
                if let Some((w, b)) = lin.saved_copies.get(name) {
                    out.push((format!("{KEY_PREFIX}{m}.weight"), w.clone()));
                    if let Some(b) = b {
                        out.push((format!("{KEY_PREFIX}{m}.bias"), b.clone()));
                    }
                }
            }
            groups.push((name.clone(), out));
        }
        groups
    }

    /// `(trainable, all)` parameter counts as HF `get_nb_trainable_parameters` reports them.
    pub fn nb_trainable_parameters(&self) -> (usize, usize) {
        let trainable: usize = self.trainable_parameters().iter().map(|(_, v)| v.elem_count()).sum();
        let adapters: usize = self
            .base
            .named_linears()
            .iter()
            .flat_map(|(_, l)| {
                l.adapters
                    .values()
                    .map(|a| a.a.elem_count() + a.b.elem_count() + a.magnitude.as_ref().map(|m| m.elem_count()).unwrap_or(0))
                    .chain(l.ia3.values().map(|a| a.l.elem_count()))
                    .chain(
                    l.saved_copies.values().map(|(w, b)| w.elem_count() + b.as_ref().map(|b| b.elem_count()).unwrap_or(0)),
                )
            })
            .sum();
        let prompts: usize = self.prompt_encoders.values().map(|e| e.param_count()).sum();
        (trainable, self.base.base_param_count() + adapters + prompts)
    }

    /// The base embedding layers saved with adapter `name` (HF `get_peft_model_state_dict`'s
    /// `save_embedding_layers`): with `Auto`, only when the config's `target_modules` names an
    /// embedding layer (`embed_tokens` / `lm_head`, HF's `EMBEDDING_LAYER_NAMES`). When targeted,
    /// each of the input and output embeddings that carries LoRA adapters is saved as
    /// `<module>.base_layer.weight`; with `Yes` and no targeted embedding, both are saved as
    /// `<module>.weight` (the input embedding `model.embed_tokens` / `transformer.wte`, and
    /// `lm_head` on causal LMs). Weights are the unmerged base weights, in the base dtype.
    ///
    /// Errors: `AdapterNotFound`.
    pub fn embedding_layers_to_save(&self, name: &str, mode: SaveEmbeddingLayers) -> Result<Vec<(String, Tensor)>> {
        let cfg = self.peft_config(name)?;
        let targets = match cfg {
            AdapterConfig::Lora(c) => Some(c.target_modules.clone()),
            AdapterConfig::Ia3(c) => Some(c.target_modules.clone()),
            AdapterConfig::Prompt(_) => None,
        };
        let names = ["embed_tokens", "lm_head"];
        let targeted = match &targets {
            Some(crate::tuners::lora::TargetModules::List(l)) => names.iter().any(|n| l.iter().any(|x| x == n)),
            Some(crate::tuners::lora::TargetModules::Regex(r)) => {
                let re = regex::Regex::new(&format!("^(?:{r})$")).ok();
                self.base.named_linears().iter().any(|(m, _)| {
                    names.iter().any(|n| m == n || m.ends_with(&format!(".{n}"))) && re.as_ref().map(|re| re.is_match(m)).unwrap_or(false)
                })
            }
            _ => false,
        };
        let save = match mode {
            SaveEmbeddingLayers::No => false,
            SaveEmbeddingLayers::Yes => true,
            SaveEmbeddingLayers::Auto => targeted,
        };
        let mut out = Vec::new();
        if !save {
            return Ok(out);
        }
        for (m, lin) in self.base.named_linears() {
            let is_output = m == "lm_head" && self.base.task() == Task::CausalLm;
            if !(lin.is_embedding || is_output) {
                continue;
            }
            let w = self.unmerged_base_weight(lin)?;
            if targeted {
                if !lin.adapters.is_empty() {
                    out.push((format!("{KEY_PREFIX}{m}.base_layer.weight"), w));
                }
            } else {
                out.push((format!("{KEY_PREFIX}{m}.weight"), w));
            }
        }
        Ok(out)
    }

    /// A layer's base weight without any merged LoRA delta, in the base dtype and layout.
    fn unmerged_base_weight(&self, lin: &crate::tuners::linear::PeftLinear) -> Result<Tensor> {
        let mut w = lin.weight.to_dtype(DType::F32)?;
        for n in &lin.merged {
            if lin.adapters.contains_key(n) {
                let d = lin.delta_weight(n)?;
                let d = if lin.transposed { d.t()? } else { d };
                w = (w - d)?;
            }
        }
        Ok(w.to_dtype(lin.weight.dtype())?.contiguous()?)
    }

    /// Adapter `name`'s tensors under HF's on-disk keys (adapter name removed), sorted.
    pub fn adapter_state_dict(&self, name: &str) -> Result<Vec<(String, Tensor)>> {
        self.peft_config(name)?;
        let mut out = Vec::new();
        if let Some(enc) = self.prompt_encoders.get(name) {
            out.push(("prompt_embeddings".to_string(), enc.table_to_save()?));
            if let Some((c, r)) = &enc.task {
                out.push(("prefix_task_cols".to_string(), c.as_tensor().detach()));
                out.push(("prefix_task_rows".to_string(), r.as_tensor().detach()));
            }
            for (m, lin) in self.base.named_linears() {
                if let Some((w, b)) = lin.saved_copies.get(name) {
                    out.push((format!("base_model.{m}.weight"), w.as_tensor().detach()));
                    if let Some(b) = b {
                        out.push((format!("base_model.{m}.bias"), b.as_tensor().detach()));
                    }
                }
            }
            out.sort_by(|a, b| a.0.cmp(&b.0));
            return Ok(out);
        }
        let bias_mode = self.bias_mode(name);
        for (k, b) in self.bias_entries(&bias_mode) {
            out.push((k, b.detach()));
        }
        for (m, lin) in self.base.named_linears() {
            // HF `bias="all"` keeps every state-dict key holding "bias", so a `modules_to_save`
            // wrapper also contributes its frozen original's bias (`<m>.original_module.bias`) and
            // each copy's bias under the wrapper's own key (`<m>.modules_to_save.<adapter>.bias`,
            // the saved adapter's name removed). HF loads the first back into the base and
            // reports the second as unexpected; both are written so files stay byte-identical.
            if bias_mode == "all" && !lin.saved_copies.is_empty() {
                if let Some(b) = &lin.bias {
                    out.push((format!("{KEY_PREFIX}{m}.original_module.bias"), b.detach()));
                }
                for (n, (_, b)) in &lin.saved_copies {
                    if let Some(b) = b {
                        let slot = if n == name { "modules_to_save".to_string() } else { format!("modules_to_save.{n}") };
                        out.push((format!("{KEY_PREFIX}{m}.{slot}.bias"), b.as_tensor().detach()));
                    }
                }
            }
            if let Some(ad) = lin.adapters.get(name) {
                let (ka, kb) = lora_keys(&m, lin.is_embedding);
                out.push((format!("{KEY_PREFIX}{ka}"), ad.a.as_tensor().detach()));
                out.push((format!("{KEY_PREFIX}{kb}"), ad.b.as_tensor().detach()));
                if let Some(mag) = &ad.magnitude {
                    out.push((format!("{KEY_PREFIX}{m}.lora_magnitude_vector"), mag.as_tensor().detach()));
                }
            }
            if let Some(ia) = lin.ia3.get(name) {
                out.push((format!("{KEY_PREFIX}{m}.ia3_l"), ia.l.as_tensor().detach()));
            }
            if let Some((w, b)) = lin.saved_copies.get(name) {
                out.push((format!("{KEY_PREFIX}{m}.weight"), w.as_tensor().detach()));
                if let Some(b) = b {
                    out.push((format!("{KEY_PREFIX}{m}.bias"), b.as_tensor().detach()));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Save adapters in HF PEFT's layout: `default` in `dir`, others in `dir/<name>/`, each with
    /// `adapter_config.json` (inference_mode true) and `adapter_model.safetensors`
    /// (metadata `{"format": "pt"}`); a README.md model card is created when missing. Every file
    /// is written atomically (see [`write_atomic`]).
    ///
    /// Paths: nothing is written outside `dir`. `dir` itself may be a symlink (it is followed:
    /// the caller named it); an adapter subfolder `dir/<name>` that is a symlink or not a folder
    /// is refused (`InvalidArgument`), and a file in the folder that is a symlink is replaced by a
    /// regular file, never written through. Each adapter's weights and config are written as one
    /// group ([`crate::io::write_atomic_group`]): after a crash the folder holds the old pair or
    /// (once recovered by the next save or load) the new one, never a mix.
    pub fn save_pretrained(&self, dir: &Path, selected: Option<&[String]>) -> Result<Vec<PathBuf>> {
        self.save_pretrained_with(dir, selected, &SaveOptions::default())
    }

    /// [`Self::save_pretrained`] with HF's `save_embedding_layers` and
    /// `path_initial_model_for_weight_conversion` (see [`SaveOptions`]).
    ///
    /// Errors: as [`Self::save_pretrained`]; with a conversion path, `NotFound` /
    /// `SafetensorsInvalid` / `InvalidAdapterConfig` for the initial adapter, `InvalidArgument`
    /// for a prompt-learning or IA3 adapter.
    pub fn save_pretrained_with(&self, dir: &Path, selected: Option<&[String]>, opts: &SaveOptions) -> Result<Vec<PathBuf>> {
        self.save_pretrained_ctl(dir, selected, opts, &crate::progress::Control::NONE)
    }

    /// [`Self::save_pretrained_with`] reporting progress and honouring cancellation through
    /// `ctl`. Unit: tensors, over all adapters saved (`total` = the tensors of every selected
    /// adapter's `adapter_model.safetensors`), reported as each one is serialized.
    ///
    /// Every adapter is serialized in memory first; `ctl` is polled after each tensor, so an
    /// abort there writes nothing. Then the files are written: while the first adapter's temp
    /// files are written `ctl` is still polled, and an abort there removes them; after the first
    /// adapter's group is committed the save always completes (a later abort would leave a mix
    /// of new and old adapters). Folders this call created are removed again (when empty) if it
    /// fails or is aborted, so an aborted save into a new folder leaves nothing behind.
    ///
    /// Errors: as [`Self::save_pretrained_with`]; `Aborted`.
    pub fn save_pretrained_ctl(&self, dir: &Path, selected: Option<&[String]>, opts: &SaveOptions, ctl: &crate::progress::Control) -> Result<Vec<PathBuf>> {
        let embeddings = opts.save_embedding_layers;
        let names: Vec<String> = match selected {
            Some(s) => s.to_vec(),
            None => self.adapter_names(),
        };
        if names.is_empty() {
            return Err(PeftError::InvalidState("the model has no adapter to save".into()));
        }
        // Phase 1: everything in memory (the slow part for large adapters), abortable.
        struct Prepared {
            target: PathBuf,
            tensors: Vec<(String, Tensor)>,
            config_text: String,
        }
        let mut prepared = Vec::with_capacity(names.len());
        for name in &names {
            validate_adapter_name(name)?;
            let cfg = self.peft_config(name)?;
            let target = if name == "default" { dir.to_path_buf() } else { dir.join(name) };
            let mut tensors = self.adapter_state_dict(name)?;
            tensors.extend(self.embedding_layers_to_save(name, embeddings)?);
            let mut saved = cfg.clone();
            saved.set_inference_mode(true);
            let mut config_text = saved.to_json_string();
            if let Some(initial) = &opts.path_initial_model_for_weight_conversion {
                let (t, c) = self.convert_mutated_init(tensors, &saved, initial)?;
                tensors = t;
                config_text = crate::io::python_json_dumps(&c);
            }
            tensors.sort_by(|a, b| a.0.cmp(&b.0));
            prepared.push(Prepared { target, tensors, config_text });
        }
        ctl.check()?;
        let total: u64 = prepared.iter().map(|p| p.tensors.len() as u64).sum();
        let mut counter = crate::progress::Counter::new(ctl, total);
        let mut groups = Vec::with_capacity(prepared.len());
        for p in prepared {
            let bytes = crate::io::safetensors_bytes_with(&p.tensors, Some(&[("format", "pt")]), &mut || counter.tick())?;
            groups.push((p.target, bytes, p.config_text));
        }
        counter.finish();
        ctl.check()?;
        // Phase 2: the files. Folders created here are removed again if the save fails.
        let mut created: Vec<PathBuf> = Vec::new();
        let res = self.write_prepared(dir, &names, &groups, ctl, &mut created);
        if res.is_err() {
            for d in created.iter().rev() {
                let _ = std::fs::remove_dir(d); // only when empty
            }
        }
        res
    }

    /// Phase 2 of [`Self::save_pretrained_ctl`]: folders, adapter file groups, model card.
    fn write_prepared(&self, dir: &Path, names: &[String], groups: &[(PathBuf, Vec<u8>, String)], ctl: &crate::progress::Control, created: &mut Vec<PathBuf>) -> Result<Vec<PathBuf>> {
        let mkdirs = |d: &Path, created: &mut Vec<PathBuf>| -> Result<()> {
            // the missing ancestors, outermost first, so they can be removed innermost first
            let mut missing = Vec::new();
            let mut cur = Some(d);
            while let Some(c) = cur {
                if c.as_os_str().is_empty() || std::fs::symlink_metadata(c).is_ok() {
                    break;
                }
                missing.push(c.to_path_buf());
                cur = c.parent();
            }
            std::fs::create_dir_all(d).map_err(|e| PeftError::io(d, e))?;
            created.extend(missing.into_iter().rev());
            Ok(())
        };
        mkdirs(dir, created)?;
        let mut written = Vec::new();
        for (i, (target, bytes, config_text)) in groups.iter().enumerate() {
            check_save_subfolder(dir, target)?;
            mkdirs(target, created)?;
            let files: [(&str, &[u8]); 2] = [("adapter_model.safetensors", bytes), ("adapter_config.json", config_text.as_bytes())];
            // Weights and config together: a crash leaves the old pair or the new one. Only the
            // first group can be aborted (see `save_pretrained_ctl`).
            if i == 0 {
                crate::io::write_atomic_group_with(target, &files, &|| ctl.check())?;
            } else {
                crate::io::write_atomic_group(target, &files)?;
            }
            written.push(target.join("adapter_model.safetensors"));
            written.push(target.join("adapter_config.json"));
        }
        // README.md model card in `dir`: created, or updated keeping what the user wrote
        // (HF `create_or_update_model_card`, called once per save).
        let readme = dir.join("README.md");
        let existing = match std::fs::read_to_string(&readme) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(PeftError::io(&readme, e)),
        };
        let card_cfg = self.peft_config(self.active.first().unwrap_or(&names[0])).unwrap_or(self.peft_config(&names[0])?);
        let base = card_cfg.base_model_name_or_path().unwrap_or_default().to_string();
        let card = crate::model_card::create_or_update(existing.as_deref(), card_cfg.peft_type(), &base);
        if existing.as_deref() != Some(card.as_str()) {
            write_atomic(&readme, card.as_bytes())?;
        }
        written.push(readme);
        Ok(written)
    }

    /// HF `subtract_mutated_init` (`save_pretrained(path_initial_model_for_weight_conversion=...)`):
    /// turn a PiSSA / OLoRA adapter trained on the residual base into a plain LoRA adapter for
    /// the original base. With the initial adapter `(A₀, B₀)` saved right after initialisation
    /// in `initial` and the trained `(A, B)`: `ΔW = s·(B A − B₀ A₀) = s·[B | −B₀][A ; A₀]`, so
    /// `lora_A = cat(A, A₀)` (dim 0) and `lora_B = cat(B, −B₀)` (dim 1) at rank `2r`; the config
    /// gets `r·2`, `lora_alpha·2` (`·√2` with rsLoRA, keeping the scaling), doubled
    /// `rank_pattern` / `alpha_pattern` values and `init_lora_weights: true`. Other tensors
    /// (modules_to_save copies, biases) are kept as they are valid for the original base (HF drops
    /// them). The initial folder is only read (HF rewrites its config).
    ///
    /// Errors: `InvalidArgument` for a non-LoRA adapter or rsLoRA with rank/alpha patterns (as
    /// HF); `NotFound` / `SafetensorsInvalid` for the initial adapter's files, naming a missing key.
    fn convert_mutated_init(&self, tensors: Vec<(String, Tensor)>, saved: &AdapterConfig, initial: &Path) -> Result<(Vec<(String, Tensor)>, serde_json::Value)> {
        let AdapterConfig::Lora(c) = saved else {
            return Err(PeftError::invalid_arg("pathInitialModelForWeightConversion", "converting a mutated initialisation applies to LoRA adapters (PiSSA / OLoRA) only"));
        };
        if c.use_rslora && (!c.rank_pattern.is_empty() || !c.alpha_pattern.is_empty()) {
            return Err(PeftError::invalid_arg(
                "pathInitialModelForWeightConversion",
                "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`.",
            ));
        }
        if !matches!(c.init_lora_weights, InitLoraWeights::Pissa(_) | InitLoraWeights::Olora) {
            return Err(PeftError::invalid_arg(
                "pathInitialModelForWeightConversion",
                "converts adapters initialised with init_lora_weights \"pissa\", \"pissa_niter_<n>\" or \"olora\" only (this adapter's base weights were not changed, so it is already a plain LoRA adapter)",
            ));
        }
        let wpath = initial.join("adapter_model.safetensors");
        if !wpath.exists() {
            return Err(PeftError::NotFound { path: wpath, what: "the initial adapter (saved right after PiSSA/OLoRA initialisation) has no adapter_model.safetensors".into() });
        }
        let init: HashMap<String, Tensor> = read_safetensors(&wpath, self.base.device())?.into_iter().collect();
        let mut out = Vec::with_capacity(tensors.len());
        for (k, t) in tensors {
            let is_a = k.ends_with(".lora_A.weight") || k.ends_with(".lora_embedding_A");
            let is_b = k.ends_with(".lora_B.weight") || k.ends_with(".lora_embedding_B");
            if !(is_a || is_b) {
                out.push((k, t));
                continue;
            }
            let t0 = init.get(&k).ok_or_else(|| PeftError::SafetensorsInvalid { path: wpath.clone(), msg: format!("the initial adapter has no tensor `{k}`") })?;
            if t0.dims() != t.dims() {
                return Err(PeftError::ShapeMismatch { name: format!("{} (key `{k}`: the initial adapter must be this adapter right after its PiSSA/OLoRA initialisation)", wpath.display()), expected: t.dims().to_vec(), found: t0.dims().to_vec() });
            }
            let t0 = t0.to_dtype(t.dtype())?;
            let merged = if is_a { Tensor::cat(&[&t, &t0], 0) } else { Tensor::cat(&[&t, &t0.neg()?], 1) }
                .map_err(|e| PeftError::SafetensorsInvalid { path: wpath.clone(), msg: format!("tensor `{k}` does not fit the trained adapter: {e}") })?;
            out.push((k, merged));
        }
        let mut j = saved.to_json();
        j["init_lora_weights"] = serde_json::Value::Bool(true);
        j["r"] = serde_json::json!(c.r * 2);
        let alpha = &j["lora_alpha"];
        j["lora_alpha"] = match (c.use_rslora, alpha.as_i64()) {
            (false, Some(a)) => serde_json::json!(a * 2),
            (false, None) => serde_json::json!(alpha.as_f64().unwrap_or(8.0) * 2.0),
            (true, _) => serde_json::json!(alpha.as_f64().unwrap_or(8.0) * std::f64::consts::SQRT_2),
        };
        for key in ["rank_pattern", "alpha_pattern"] {
            if let Some(m) = j[key].as_object_mut() {
                for v in m.values_mut() {
                    *v = match v.as_i64() {
                        Some(i) => serde_json::json!(i * 2),
                        None => serde_json::json!(v.as_f64().unwrap_or(0.0) * 2.0),
                    };
                }
            }
        }
        Ok((out, j))
    }

    /// Load an adapter saved by HF PEFT (or by [`Self::save_pretrained`]) from `dir` (holding
    /// `adapter_config.json` and `adapter_model.safetensors`) under `name` (HF `load_adapter`).
    /// Keys may carry the `base_model.model.` prefix or not, and an adapter name or not.
    /// With `is_trainable` false the adapter is loaded in inference mode (no trainable params).
    ///
    /// Errors: `NotFound`, `InvalidAdapterConfig`, `SafetensorsInvalid`, `ShapeMismatch` (naming
    /// the key, with expected and found shapes), `AdapterExists`, `NoTargetModules`. On error the
    /// model is unchanged.
    pub fn load_adapter(&mut self, dir: &Path, name: &str, is_trainable: bool, config_override: Option<AdapterConfig>) -> Result<LoadResult> {
        self.load_adapter_with(dir, name, &LoadOptions { is_trainable, config: config_override, ..Default::default() })
    }

    /// [`Self::load_adapter`] with HF's other options ([`LoadOptions`]).
    ///
    /// Errors: as [`Self::load_adapter`], plus `InvalidArgument` for an invalid `keyMapping`
    /// regex.
    pub fn load_adapter_with(&mut self, dir: &Path, name: &str, o: &LoadOptions) -> Result<LoadResult> {
        self.load_adapter_ctl(dir, name, o, &crate::progress::Control::NONE)
    }

    /// [`Self::load_adapter_with`] reporting progress and honouring cancellation through `ctl`.
    /// Unit: tensors of `adapter_model.safetensors` (`total` = the file's tensor count), reported
    /// as each is read. `ctl` is polled after each tensor and once more before the model is
    /// changed; an aborted load leaves the model as it was and drops what it read.
    ///
    /// Errors: as [`Self::load_adapter_with`]; `Aborted`.
    pub fn load_adapter_ctl(&mut self, dir: &Path, name: &str, o: &LoadOptions, ctl: &crate::progress::Control) -> Result<LoadResult> {
        let r = self.load_adapter_inner(dir, name, o, ctl)?;
        if !o.autocast_adapter_dtype {
            self.cast_adapter(name, self.base.dtype())?;
        }
        Ok(r)
    }

    /// Store adapter `name`'s weights in `dtype` (HF `_cast_adapter_dtype` with autocast off).
    fn cast_adapter(&mut self, name: &str, dtype: DType) -> Result<()> {
        let cast = |v: &Var| -> Result<Var> { Ok(Var::from_tensor(&v.as_tensor().to_dtype(dtype)?)?) };
        for (_, lin) in self.base.named_linears_mut() {
            if let Some(ad) = lin.adapters.get_mut(name) {
                ad.a = cast(&ad.a)?;
                ad.b = cast(&ad.b)?;
                if let Some(m) = &ad.magnitude {
                    ad.magnitude = Some(cast(m)?);
                }
            }
            if let Some(ia) = lin.ia3.get_mut(name) {
                ia.l = cast(&ia.l)?;
            }
        }
        Ok(())
    }

    fn load_adapter_inner(&mut self, dir: &Path, name: &str, o: &LoadOptions, ctl: &crate::progress::Control) -> Result<LoadResult> {
        let (is_trainable, config_override) = (o.is_trainable, o.config.clone());
        validate_adapter_name(name)?;
        if !dir.exists() {
            return Err(PeftError::NotFound { path: dir.into(), what: "adapter folder does not exist".into() });
        }
        if self.configs.iter().any(|(n, _)| n == name) {
            return Err(PeftError::AdapterExists(name.into()));
        }
        // Finish a save of this folder that a crash interrupted (see `write_atomic_group`).
        crate::io::recover_group_write(dir)?;
        let mut cfg = match config_override {
            Some(c) => c,
            None => AdapterConfig::from_file(&dir.join("adapter_config.json"))?,
        };
        cfg.set_inference_mode(!is_trainable);
        if let Some(existing) = self.peft_type() {
            if existing != cfg.peft_type() {
                return Err(PeftError::InvalidAdapterConfig {
                    path: Some(dir.join("adapter_config.json")),
                    msg: format!("Cannot combine adapters with different peft types. Found {existing} and {}.", cfg.peft_type()),
                });
            }
        }
        let wpath = dir.join("adapter_model.safetensors");
        let mut tensors = if ctl.progress.is_some() || ctl.should_stop.is_some() {
            let total = crate::io::safetensors_tensor_count(&wpath)? as u64;
            let mut counter = crate::progress::Counter::new(ctl, total);
            let t = crate::io::read_safetensors_with(&wpath, self.base.device(), &mut || counter.tick())?;
            counter.finish();
            t
        } else {
            read_safetensors(&wpath, self.base.device())?
        };
        if !o.key_mapping.is_empty() {
            let maps = o
                .key_mapping
                .iter()
                .map(|(p, r)| {
                    regex::Regex::new(p).map(|re| (re, r.clone())).map_err(|e| PeftError::invalid_arg("keyMapping", format!("pattern {p:?} is not a valid regex: {e}")))
                })
                .collect::<Result<Vec<_>>>()?;
            for (key, _) in tensors.iter_mut() {
                let prefix = if key.starts_with(KEY_PREFIX) { KEY_PREFIX } else if key.starts_with("base_model.") { "base_model." } else { "" };
                let rest = key[prefix.len()..].to_string();
                for (re, rep) in &maps {
                    if re.is_match(&rest) {
                        // Python's `\1` group references become the regex crate's `${1}`.
                        let rep = py_group_refs(rep);
                        *key = format!("{prefix}{}", re.replace_all(&rest, rep.as_str()));
                        break;
                    }
                }
            }
        }
        // HF's PeftModelFor<Task> adds the task head to modules_to_save before loading.
        let mut cfg = cfg;
        cfg.add_task_head_modules();
        if let AdapterConfig::Prompt(p) = cfg {
            ctl.check()?; // the last point before the model changes
            return self.load_prompt(name, p, tensors, &wpath);
        }
        // Build the expected key map from the config before touching the model.
        let mut expected: std::collections::HashMap<String, (String, bool, Vec<usize>)> = Default::default();
        for (m, lin) in self.base.named_linears() {
            match &cfg {
                AdapterConfig::Lora(c) if c.rule().select(&m, is_output_head(self.base.task(), &m)) == crate::targeting::Selection::Target => {
                    let r = c.rank_for(&m);
                    let (ka, kb) = lora_keys(&m, lin.is_embedding);
                    expected.insert(ka, (m.clone(), true, vec![r, lin.in_features()]));
                    expected.insert(kb, (m.clone(), false, vec![lin.out_features(), r]));
                    if c.use_dora {
                        expected.insert(format!("{m}.lora_magnitude_vector"), (m.clone(), false, vec![lin.out_features()]));
                    }
                }
                AdapterConfig::Ia3(c) if c.rule().select(&m, is_output_head(self.base.task(), &m)) == crate::targeting::Selection::Target => {
                    let shape = if c.is_feedforward(&m) { vec![1, lin.in_features()] } else { vec![lin.out_features(), 1] };
                    expected.insert(format!("{m}.ia3_l"), (m.clone(), false, shape));
                }
                _ => {}
            }
            let mts = cfg.modules_to_save();
            if mts.iter().any(|w| saves_module(&m, w)) {
                expected.insert(format!("{m}.weight"), (m.clone(), false, lin.weight.dims().to_vec()));
                if let Some(b) = &lin.bias {
                    expected.insert(format!("{m}.bias"), (m.clone(), false, b.dims().to_vec()));
                }
            }
        }
        // Base biases in the file (HF `bias="all" | "lora_only"`): loaded into the base layers
        // whatever the config says (HF's non-strict `load_state_dict`), replacing their values.
        let mut bias_shapes: std::collections::HashMap<String, Vec<usize>> = Default::default();
        for (m, lin) in self.base.named_linears() {
            if let Some(b) = &lin.bias {
                if !expected.contains_key(&format!("{m}.bias")) {
                    bias_shapes.insert(m.clone(), b.dims().to_vec());
                }
            }
        }
        for (m, b) in self.base.named_norm_biases() {
            bias_shapes.insert(m, b.dims().to_vec());
        }
        // Saved embedding layers (HF `save_embedding_layers`): `<m>.base_layer.weight` or
        // `<m>.weight` of the input embedding / lm_head replace the base weights, as HF's
        // non-strict `load_state_dict` does.
        let mut emb_shapes: std::collections::HashMap<String, Vec<usize>> = Default::default();
        for (m, lin) in self.base.named_linears() {
            if lin.is_embedding || (m == "lm_head" && self.base.task() == Task::CausalLm) {
                emb_shapes.insert(m.clone(), lin.weight.dims().to_vec());
            }
        }
        let mut emb_weights: std::collections::HashMap<String, Tensor> = Default::default();
        let mut biases: std::collections::HashMap<String, Tensor> = Default::default();
        let mut found: std::collections::HashMap<String, Tensor> = Default::default();
        let mut result = LoadResult::default();
        for (key, t) in tensors {
            let k = key.strip_prefix(KEY_PREFIX).unwrap_or(&key).to_string();
            // HF `bias="all"` writes the frozen original bias of a `modules_to_save` module
            // (see `adapter_state_dict`); HF's non-strict load puts it back into the base layer.
            if let Some(m) = k.strip_suffix(".original_module.bias") {
                if let Some((_, _, shape)) = expected.get(&format!("{m}.bias")) {
                    if t.dims() != shape.as_slice() {
                        return Err(PeftError::ShapeMismatch { name: format!("{} (key `{key}`)", wpath.display()), expected: shape.clone(), found: t.dims().to_vec() });
                    }
                    biases.insert(m.to_string(), t);
                    continue;
                }
            }
            let k = strip_adapter_name(&k);
            let emb_module = k.strip_suffix(".base_layer.weight").or_else(|| k.strip_suffix(".weight")).filter(|m| emb_shapes.contains_key(*m));
            if let (Some(m), false) = (emb_module, expected.contains_key(&k)) {
                let shape = &emb_shapes[m];
                if t.dims() != shape.as_slice() {
                    return Err(PeftError::ShapeMismatch { name: format!("{} (key `{key}`)", wpath.display()), expected: shape.clone(), found: t.dims().to_vec() });
                }
                emb_weights.insert(m.to_string(), t);
                continue;
            }
            let bias_module = k.strip_suffix(".base_layer.bias").or_else(|| k.strip_suffix(".bias")).filter(|m| bias_shapes.contains_key(*m));
            if let (Some(m), false) = (bias_module, expected.contains_key(&k)) {
                let shape = &bias_shapes[m];
                if t.dims() != shape.as_slice() {
                    return Err(PeftError::ShapeMismatch { name: format!("{} (key `{key}`)", wpath.display()), expected: shape.clone(), found: t.dims().to_vec() });
                }
                biases.insert(m.to_string(), t);
                continue;
            }
            match expected.get(&k) {
                Some((_, _, shape)) => {
                    if t.dims() != shape.as_slice() {
                        return Err(PeftError::ShapeMismatch {
                            name: format!("{} (key `{key}`)", wpath.display()),
                            expected: shape.clone(),
                            found: t.dims().to_vec(),
                        });
                    }
                    found.insert(k, t);
                }
                None => result.unexpected_keys.push(key),
            }
        }
        for k in expected.keys() {
            if !found.contains_key(k) {
                // HF reports missing keys as the model names them, with the adapter name.
                result.missing_keys.push(format!("{KEY_PREFIX}{}", with_adapter_name(k, name)));
            }
        }
        result.missing_keys.sort();
        if found.is_empty() && !expected.is_empty() {
            return Err(PeftError::SafetensorsInvalid {
                path: wpath,
                msg: format!("no tensor of the file matches the adapter's modules (unexpected keys: {:?})", &result.unexpected_keys[..result.unexpected_keys.len().min(5)]),
            });
        }
        let (bias_mode, trainable) = match &cfg {
            AdapterConfig::Lora(c) => (c.bias.clone(), !c.inference_mode),
            _ => ("none".to_string(), false),
        };
        ctl.check()?; // the last point before the model changes
        self.add_adapter(name, cfg, 0)?;
        if !emb_weights.is_empty() {
            for (m, lin) in self.base.named_linears_mut() {
                if let Some(t) = emb_weights.remove(&m) {
                    lin.weight = t.to_dtype(lin.weight.dtype())?;
                }
            }
        }
        if !biases.is_empty() {
            for (m, lin) in self.base.named_linears_mut() {
                if let Some(t) = biases.remove(&m) {
                    lin.bias = Some(t.to_dtype(lin.weight.dtype())?);
                }
            }
            for (m, b) in self.base.named_norm_biases_mut() {
                if let Some(t) = biases.remove(&m) {
                    *b = t.to_dtype(b.dtype())?;
                }
            }
            if bias_mode != "none" && trainable {
                self.make_biases_trainable(&bias_mode)?;
            }
        }
        for (m, lin) in self.base.named_linears_mut() {
            if let Some(ad) = lin.adapters.get_mut(name) {
                let (ka, kb) = lora_keys(&m, lin.is_embedding);
                if let Some(a) = found.remove(&ka) {
                    ad.a = Var::from_tensor(&a.to_dtype(DType::F32)?)?;
                }
                if let Some(b) = found.remove(&kb) {
                    ad.b = Var::from_tensor(&b.to_dtype(DType::F32)?)?;
                }
                if let Some(t) = found.remove(&format!("{m}.lora_magnitude_vector")) {
                    ad.magnitude = Some(Var::from_tensor(&t.to_dtype(DType::F32)?)?);
                }
            }
            if let Some(ia) = lin.ia3.get_mut(name) {
                if let Some(t) = found.remove(&format!("{m}.ia3_l")) {
                    ia.l = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
                }
            }
            let dtype = lin.weight.dtype();
            if let Some((w, b)) = lin.saved_copies.get_mut(name) {
                if let Some(t) = found.remove(&format!("{m}.weight")) {
                    *w = Var::from_tensor(&t.to_dtype(dtype)?)?;
                }
                if let (Some(bv), Some(t)) = (b.as_mut(), found.remove(&format!("{m}.bias"))) {
                    *bv = Var::from_tensor(&t.to_dtype(dtype)?)?;
                }
            }
        }
        Ok(result)
    }

    /// Load a prompt-learning adapter's tensors (`prompt_embeddings`, plus `prefix_task_cols` /
    /// `prefix_task_rows` for multitask prompt tuning) as HF `set_peft_model_state_dict` does.
    /// The stored table is used as is; when loaded trainable, training continues on the table
    /// itself (HF would put a freshly initialised P-tuning/projection head on top of the saved
    /// output, which changes the adapter's outputs; we keep them).
    fn load_prompt(&mut self, name: &str, mut cfg: PromptLearningConfig, tensors: Vec<(String, Tensor)>, wpath: &Path) -> Result<LoadResult> {
        cfg.prepare(&self.model_dims());
        let mut result = LoadResult::default();
        let mut table = None;
        let mut cols = None;
        let mut rows = None;
        let mt = cfg.method == PromptMethod::MultitaskPromptTuning;
        let td = cfg.token_dim.unwrap_or(0);
        let n = cfg.total_virtual_tokens();
        // modules_to_save copies (`base_model.<module>.weight` / `.bias`) and their shapes.
        let mts = cfg.modules_to_save().unwrap_or_default();
        let mut copy_shapes: HashMap<String, Vec<usize>> = HashMap::new();
        for (m, lin) in self.base.named_linears() {
            if mts.iter().any(|w| saves_module(&m, w)) {
                copy_shapes.insert(format!("base_model.{m}.weight"), lin.weight.dims().to_vec());
                if let Some(b) = &lin.bias {
                    copy_shapes.insert(format!("base_model.{m}.bias"), b.dims().to_vec());
                }
            }
        }
        let mut copy_tensors: HashMap<String, Tensor> = HashMap::new();
        for (key, t) in tensors {
            if let Some(shape) = copy_shapes.get(&key) {
                if t.dims() != shape.as_slice() {
                    return Err(PeftError::ShapeMismatch { name: format!("{} (key `{key}`)", wpath.display()), expected: shape.clone(), found: t.dims().to_vec() });
                }
                copy_tensors.insert(key, t);
                continue;
            }
            let k = key.strip_prefix(KEY_PREFIX).unwrap_or(&key);
            let (slot, shape) = match k {
                "prompt_embeddings" => (&mut table, vec![cfg.table_rows(), cfg.table_dim()]),
                "prefix_task_cols" if mt => (&mut cols, vec![cfg.num_tasks, n, cfg.num_ranks]),
                "prefix_task_rows" if mt => (&mut rows, vec![cfg.num_tasks, cfg.num_ranks, td]),
                _ => {
                    result.unexpected_keys.push(key);
                    continue;
                }
            };
            if t.dims() != shape.as_slice() {
                return Err(PeftError::ShapeMismatch { name: format!("{} (key `{key}`)", wpath.display()), expected: shape, found: t.dims().to_vec() });
            }
            *slot = Some(t);
        }
        let table = table.ok_or_else(|| PeftError::SafetensorsInvalid {
            path: wpath.to_path_buf(),
            msg: format!("the {} adapter file has no `prompt_embeddings` tensor", cfg.method.as_str()),
        })?;
        let task = if mt {
            let dev = self.base.device();
            let c = match cols {
                Some(c) => c,
                None => {
                    result.missing_keys.push("prefix_task_cols".into());
                    Tensor::zeros((cfg.num_tasks, n, cfg.num_ranks), DType::F32, dev)?
                }
            };
            let r = match rows {
                Some(r) => r,
                None => {
                    result.missing_keys.push("prefix_task_rows".into());
                    Tensor::zeros((cfg.num_tasks, cfg.num_ranks, td), DType::F32, dev)?
                }
            };
            Some((c, r))
        } else {
            None
        };
        for k in copy_shapes.keys() {
            if !copy_tensors.contains_key(k) {
                result.missing_keys.push(k.clone());
            }
        }
        result.missing_keys.sort();
        let enc = PromptEncoder::from_table(&table, task)?;
        self.add_prompt(name, cfg, 0, Some(enc))?;
        for (m, lin) in self.base.named_linears_mut() {
            let dtype = lin.weight.dtype();
            if let Some((w, b)) = lin.saved_copies.get_mut(name) {
                if let Some(t) = copy_tensors.remove(&format!("base_model.{m}.weight")) {
                    *w = Var::from_tensor(&t.to_dtype(dtype)?)?;
                }
                if let (Some(bv), Some(t)) = (b.as_mut(), copy_tensors.remove(&format!("base_model.{m}.bias"))) {
                    *bv = Var::from_tensor(&t.to_dtype(dtype)?)?;
                }
            }
        }
        Ok(result)
    }

    /// Forward pass (see [`BaseModel::forward`]) with HF's checks for mixed batches:
    /// every name must exist (or be `__base__`), there must be one per row, no adapter may be
    /// merged, and the model must not be training.
    ///
    /// With an active prompt-learning adapter (HF `PeftModelForCausalLM.forward`), `ids`,
    /// `attention_mask` and `position_ids` describe the real tokens only (the mask covers the
    /// cached real tokens plus `s`):
    /// * prefix tuning puts the per-layer key/value prefix `[b, kv_heads, n_virtual, head_dim]`
    ///   into the cache before the first step, prepends `n_virtual` ones to the mask and shifts
    ///   given position ids by `n_virtual`; logits are `[b, s, vocab]`;
    /// * prompt tuning / P-tuning / multitask prompt tuning prepend the virtual token embeddings
    ///   on the first step (no cache or an empty one), so logits are `[b, n_virtual + s, vocab]`
    ///   then; the mask gets `n_virtual` leading ones; given position ids are ignored (as HF
    ///   does) and positions run `past .. past + len`.
    ///
    /// Encoder-decoder models (SEQ_2_SEQ_LM, HF `PeftModelForSeq2SeqLM`): `ids` / `attention_mask`
    /// are the encoder's, `opts.decoder_input_ids` / `decoder_attention_mask` the decoder's, and
    /// the logits are the decoder's `[b, t, vocab]`; prompt learning follows
    /// `prompt_forward_seq2seq` (prefix on the decoder self-attention, virtual tokens before the
    /// encoder input).
    ///
    /// Errors: those of the base forward; `InvalidArgument` for `adapterNames` with prompt
    /// learning, or missing/invalid `taskIds` for multitask prompt tuning.
    pub fn forward(&self, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        if let Some((cfg, enc)) = self.active_prompt() {
            return self.prompt_forward(cfg, enc, ids, b, s, opts, cache);
        }
        self.check_rows(opts, b)?;
        let mut cache = cache;
        if self.base.task() == Task::CausalLm {
            if let Some(logits) = crate::engine::try_forward(self, ids, b, s, opts, cache.as_deref_mut())? {
                return Ok(logits);
            }
        }
        self.base.forward(ids, b, s, opts, cache)
    }

    /// Number of label positions prepended by the active adapter (`num_virtual_tokens` for
    /// prompt tuning / P-tuning / multitask prompt tuning, whose logits include the virtual
    /// positions; 0 otherwise). Training extends labels with this many `-100` on the left, as
    /// HF does.
    pub fn label_prefix_len(&self) -> usize {
        match self.active_prompt() {
            // Seq2seq: the virtual tokens go to the encoder; the decoder's logits are unchanged.
            Some((cfg, _)) if cfg.method != PromptMethod::PrefixTuning && self.base.task() != Task::Seq2SeqLm => cfg.total_virtual_tokens(),
            _ => 0,
        }
    }

    /// Per-layer prefix keys/values for a batch of `b`: `[b, kv_heads, n_virtual, head_dim]`
    /// each, in the model dtype (HF `get_prompt` for prefix tuning: the table
    /// `[n, num_layers·2·token_dim]` viewed as `[n, num_layers·2, heads, head_dim]`; chunk `2l`
    /// is layer `l`'s key, `2l + 1` its value).
    ///
    /// With `num_transformer_submodules = 2` (SEQ_2_SEQ_LM) HF concatenates the `2L` chunks with
    /// themselves and splits them in groups of 4 per decoder layer (self K, self V, cross K,
    /// cross V), then drops the cross part: decoder layer `l` gets key chunk `(4l) mod 2L` and
    /// value chunk `(4l + 1) mod 2L`; one entry per decoder layer is returned (the encoder gets
    /// no prefix).
    pub fn prefix_key_values(&self, cfg: &PromptLearningConfig, enc: &PromptEncoder, b: usize, train: bool, rng: Option<&std::sync::Mutex<rand::rngs::StdRng>>) -> Result<Vec<(Tensor, Tensor)>> {
        let n = cfg.num_virtual_tokens;
        let layers = cfg.num_layers.unwrap_or(0);
        let heads = cfg.num_attention_heads.unwrap_or(1);
        let hd = cfg.token_dim.unwrap_or(0) / heads;
        let table = enc.table(train, rng)?.to_dtype(self.base.dtype())?.reshape((n, layers * 2, heads, hd))?;
        let chunk = |j: usize| -> Result<Tensor> {
            let c = table.narrow(1, j, 1)?.squeeze(1)?.transpose(0, 1)?.unsqueeze(0)?; // [1, heads, n, hd]
            Ok(c.broadcast_as((b, heads, n, hd))?.contiguous()?)
        };
        let sub = cfg.num_transformer_submodules.unwrap_or(1).max(1);
        let count = if sub == 1 { layers } else { self.base.num_layers() };
        (0..count)
            .map(|l| {
                let kc = (2 * sub * l) % (2 * layers).max(1);
                Ok((chunk(kc)?, chunk(kc + 1)?))
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn prompt_forward(&self, cfg: &PromptLearningConfig, enc: &PromptEncoder, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        if opts.adapter_rows.is_some() {
            return Err(PeftError::invalid_arg("adapterNames", "per-row adapters (mixed batches) are not available with prompt learning"));
        }
        if ids.len() != b * s {
            return Err(PeftError::invalid_arg("inputIds", format!("has {} ids, expected batch {b} × seq {s}", ids.len())));
        }
        if self.base.task() == Task::Seq2SeqLm {
            return self.prompt_forward_seq2seq(cfg, enc, ids, b, s, opts, cache);
        }
        let n = cfg.total_virtual_tokens();
        let cached = cache.as_ref().map(|c| c.seq_len()).unwrap_or(0);
        let first = cached == 0;
        let past_real = cached.saturating_sub(n);
        let mut o = opts.clone();
        if let Some(m) = &opts.attention_mask {
            if m.len() != b * (past_real + s) {
                return Err(PeftError::invalid_arg("attentionMask", format!("has {} values, expected {b} × {}", m.len(), past_real + s)));
            }
            let w = past_real + s;
            let mut ext = Vec::with_capacity(b * (n + w));
            for r in 0..b {
                ext.extend(std::iter::repeat_n(1u8, n));
                ext.extend_from_slice(&m[r * w..(r + 1) * w]);
            }
            o.attention_mask = Some(ext);
        }
        let rng = opts.dropout_rng.as_deref();
        if cfg.method == PromptMethod::PrefixTuning {
            o.position_ids = opts.position_ids.as_ref().map(|p| p.iter().map(|&x| x + n as u32).collect());
            let mut local = self.base.new_cache();
            let cache: &mut KvCache = match cache {
                Some(c) => c,
                None => &mut local,
            };
            if first {
                for (l, kv) in self.prefix_key_values(cfg, enc, b, opts.train, rng)?.into_iter().enumerate() {
                    cache.layers[l] = Some(kv);
                }
            }
            return self.base.forward(ids, b, s, &o, Some(cache));
        }
        o.position_ids = None;
        // HF `PeftModelFor{SequenceClassification,TokenClassification,QuestionAnswering}`: the
        // virtual tokens get segment 0; `PeftModelForFeatureExtraction` drops token types.
        if let Some(tt) = &opts.token_type_ids {
            if tt.len() != b * s {
                return Err(PeftError::invalid_arg("tokenTypeIds", format!("has {} values, expected {b} × {s}", tt.len())));
            }
            o.token_type_ids = match self.base.task() {
                Task::FeatureExtraction => None,
                _ if first => Some((0..b).flat_map(|r| std::iter::repeat_n(0, n).chain(tt[r * s..(r + 1) * s].iter().copied())).collect()),
                _ => Some(tt.clone()),
            };
        }
        let x = self.base.embed(ids, b, s)?;
        let x = if first {
            let prompts = enc.batch_prompts(b, opts.task_ids.as_deref(), opts.train, rng)?.to_dtype(self.base.dtype())?;
            Tensor::cat(&[&prompts, &x], 1)?
        } else {
            x
        };
        self.base.forward_embeds(&x, &o, cache)
    }

    /// HF `PeftModelForSeq2SeqLM.forward` for prompt learning (`ids`, `attention_mask`: the
    /// encoder's real tokens; `decoder_input_ids` / `decoder_attention_mask`: the decoder's):
    /// * prefix tuning: the per-decoder-layer prefix (see [`Self::prefix_key_values`]) goes into
    ///   the decoder self-attention cache before the first step, `decoder_attention_mask` (when
    ///   given) gets `n_virtual` leading ones; the encoder and cross-attention get no prefix;
    /// * prompt tuning / P-tuning: the first `num_virtual_tokens` rows of the prompt table are
    ///   prepended to the encoder input embeddings and the encoder mask gets as many leading
    ///   ones (when the cache does not hold an encoder output yet); the decoder is unchanged.
    ///
    /// Logits are the decoder's `[b, t, vocab]` in both cases.
    #[allow(clippy::too_many_arguments)]
    fn prompt_forward_seq2seq(&self, cfg: &PromptLearningConfig, enc: &PromptEncoder, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let n = cfg.num_virtual_tokens;
        let rng = opts.dropout_rng.as_deref();
        let ones_first = |m: &[u8], arg: &str| -> Result<Vec<u8>> {
            if b == 0 || !m.len().is_multiple_of(b) {
                return Err(PeftError::invalid_arg(arg, format!("has {} values, not a multiple of the batch size {b}", m.len())));
            }
            let w = m.len() / b;
            Ok((0..b).flat_map(|r| std::iter::repeat_n(1u8, n).chain(m[r * w..(r + 1) * w].iter().copied())).collect())
        };
        let mut o = opts.clone();
        if cfg.method == PromptMethod::PrefixTuning {
            if let Some(m) = &opts.decoder_attention_mask {
                o.decoder_attention_mask = Some(ones_first(m, "decoderAttentionMask")?);
            }
            let mut local = self.base.new_cache();
            let cache: &mut KvCache = match cache {
                Some(c) => c,
                None => &mut local,
            };
            if cache.seq_len() == 0 {
                for (l, kv) in self.prefix_key_values(cfg, enc, b, opts.train, rng)?.into_iter().enumerate() {
                    cache.layers[l] = Some(kv);
                }
            }
            return self.base.forward(ids, b, s, &o, Some(cache));
        }
        let x = self.base.embed(ids, b, s)?;
        if cache.as_ref().map(|c| c.encoder_hidden.is_some()).unwrap_or(false) {
            return self.base.forward_embeds(&x, &o, cache);
        }
        if let Some(m) = &opts.attention_mask {
            if m.len() != b * s {
                return Err(PeftError::invalid_arg("attentionMask", format!("has {} values, expected {b} × {s}", m.len())));
            }
            o.attention_mask = Some(ones_first(m, "attentionMask")?);
        }
        let prompts = enc.batch_prompts(b, None, opts.train, rng)?.narrow(1, 0, n)?.to_dtype(self.base.dtype())?;
        let x = Tensor::cat(&[&prompts, &x], 1)?;
        self.base.forward_embeds(&x, &o, cache)
    }

    /// Validate a mixed-batch request.
    pub fn check_rows(&self, opts: &ForwardOptions, b: usize) -> Result<()> {
        if let Some(rows) = &opts.adapter_rows {
            if rows.len() != b {
                return Err(PeftError::invalid_arg("adapterNames", format!("has {} names but the batch has {b} rows", rows.len())));
            }
            if opts.train {
                return Err(PeftError::InvalidState("adapterNames (mixed batches) cannot be used while training".into()));
            }
            if !self.merged_adapters().is_empty() {
                return Err(PeftError::InvalidState("adapterNames (mixed batches) cannot be used while adapters are merged".into()));
            }
            for n in rows.iter().flatten() {
                self.peft_config(n)?;
            }
        }
        Ok(())
    }

    /// HF `get_layer_status`: one entry per adapter layer (`lora.Linear`, `ia3.Linear`, or
    /// `ModulesToSaveWrapper`), named as in HF's `base_model.named_modules()`
    /// (`model.<module path>`), as a JSON array with HF's field names.
    ///
    /// Errors: `InvalidState` for prompt-learning models (HF: not supported there) or a model
    /// without adapter layers.
    pub fn layer_status(&self) -> Result<Vec<serde_json::Value>> {
        use serde_json::json;
        if self.is_prompt_learning() {
            return Err(PeftError::InvalidState(format!(
                "layer and model status are not available for prompt-learning adapters ({}): they do not change the model's layers (HF's get_layer_status() refuses them too)",
                self.peft_type().unwrap_or_default()
            )));
        }
        let mut out = Vec::new();
        for (path, lin) in self.base.named_linears() {
            let (module_type, mut available): (&str, Vec<String>) = if !lin.saved_copies.is_empty() {
                ("ModulesToSaveWrapper", lin.saved_copies.keys().cloned().collect())
            } else if !lin.adapters.is_empty() {
                (if lin.is_embedding { "lora.Embedding" } else { "lora.Linear" }, lin.adapters.keys().cloned().collect())
            } else if !lin.ia3.is_empty() {
                ("ia3.Linear", lin.ia3.keys().cloned().collect())
            } else {
                continue;
            };
            available.sort();
            let requires_grad: serde_json::Map<String, serde_json::Value> = available
                .iter()
                .map(|a| {
                    let trainable = self.active.contains(a) && self.peft_config(a).map(|c| !c.inference_mode()).unwrap_or(false);
                    (a.clone(), json!(trainable))
                })
                .collect();
            let devices: serde_json::Map<String, serde_json::Value> =
                available.iter().map(|a| (a.clone(), json!([device_type(self.base.device())]))).collect();
            out.push(json!({
                "name": format!("model.{path}"),
                "module_type": module_type,
                "enabled": !lin.disabled,
                "active_adapters": self.active,
                "merged_adapters": lin.merged,
                "requires_grad": requires_grad,
                "available_adapters": available,
                "devices": devices,
                "quantization_backend": null,
            }));
        }
        if out.is_empty() {
            return Err(PeftError::InvalidState(
                "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT adapters injected in the model.".into(),
            ));
        }
        Ok(out)
    }

    /// HF `get_model_status`: the layers' states aggregated, `"irregular"` where layers disagree.
    ///
    /// Errors: as [`Self::layer_status`].
    pub fn model_status(&self) -> Result<serde_json::Value> {
        use serde_json::{json, Value};
        let layers = self.layer_status()?;
        let irregular = || Value::String("irregular".into());
        let enabled: std::collections::BTreeSet<bool> = layers.iter().map(|l| l["enabled"].as_bool().unwrap_or(false)).collect();
        let enabled = if enabled.len() == 1 { json!(enabled.into_iter().next()) } else { irregular() };
        let strs = |v: &Value| -> Vec<String> { v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default() };
        let mut available: Vec<String> = layers.iter().flat_map(|l| strs(&l["available_adapters"])).collect();
        available.sort();
        available.dedup();
        let actives: std::collections::BTreeSet<Vec<String>> = layers.iter().map(|l| strs(&l["active_adapters"])).collect();
        let active = match actives.len() {
            0 => json!([]),
            1 => json!(actives.into_iter().next()),
            _ => irregular(),
        };
        let mut merged_all: Vec<String> = layers.iter().flat_map(|l| strs(&l["merged_adapters"])).collect();
        merged_all.sort();
        merged_all.dedup();
        let mut merged = json!(merged_all);
        for l in &layers {
            let m = strs(&l["merged_adapters"]);
            if strs(&l["available_adapters"]).iter().any(|a| !m.contains(a) && merged_all.contains(a)) {
                merged = irregular();
                break;
            }
        }
        let mut rg: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
        let mut dev: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for l in &layers {
            for (k, v) in l["requires_grad"].as_object().into_iter().flatten() {
                rg.entry(k.clone()).or_default().push(v.clone());
            }
            for (k, v) in l["devices"].as_object().into_iter().flatten() {
                dev.entry(k.clone()).or_default().extend(strs(v));
            }
        }
        let requires_grad: serde_json::Map<String, Value> = rg
            .into_iter()
            .map(|(k, vals)| {
                let v = if vals.iter().all(|x| x == &json!(true)) {
                    json!(true)
                } else if vals.iter().all(|x| x == &json!(false)) {
                    json!(false)
                } else {
                    irregular()
                };
                (k, v)
            })
            .collect();
        let devices: serde_json::Map<String, Value> = dev
            .into_iter()
            .map(|(k, mut v)| {
                v.sort();
                v.dedup();
                (k, json!(v))
            })
            .collect();
        let (trainable, total) = self.nb_trainable_parameters();
        let peft_types: serde_json::Map<String, Value> = self.configs.iter().map(|(n, c)| (n.clone(), json!(c.peft_type()))).collect();
        let adapter_model_type = match self.peft_type() {
            Some("IA3") => "IA3Model",
            _ => "LoraModel",
        };
        Ok(json!({
            "base_model_type": self.base.info().architecture,
            "adapter_model_type": adapter_model_type,
            "peft_types": peft_types,
            "trainable_params": trainable,
            "total_params": total,
            "num_adapter_layers": layers.len(),
            "enabled": enabled,
            "active_adapters": active,
            "merged_adapters": merged,
            "requires_grad": requires_grad,
            "available_adapters": available,
            "devices": devices,
            "quantization_backend": null,
        }))
    }

    /// Lines of `adapter_config.json` for `name` (HF's exact text).
    pub fn config_json(&self, name: &str) -> Result<String> {
        Ok(python_json_dumps(&self.peft_config(name)?.to_json()))
    }
}

/// Multitask prompt tuning's source-task inits (HF `MultitaskPromptEmbedding`):
/// `AVERAGE_SOURCE_TASKS` (mean over the source tasks), `EXACT_SOURCE_TASK` (task
/// `prompt_tuning_init_task`), both loading `prompt_embeddings` and the task matrices, and
/// `ONLY_SOURCE_SHARED` (only `prompt_embeddings`), from a safetensors file.
///
/// Errors: `NotFound`/`SafetensorsInvalid` for the file, `ShapeMismatch` naming the key when
/// the source does not fit (e.g. `num_tasks` must be 1 for the averaged/exact inits, as HF's
/// strict load requires), `InvalidArgument` for a task index out of range.
fn init_multitask_from_source(cfg: &PromptLearningConfig, enc: &mut PromptEncoder, device: &candle_core::Device) -> Result<()> {
    let mode = cfg.prompt_tuning_init.as_str();
    if !["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"].contains(&mode) {
        return Ok(());
    }
    let path = PathBuf::from(cfg.prompt_tuning_init_state_dict_path.clone().unwrap_or_default());
    let src: HashMap<String, Tensor> = read_safetensors(&path, device)?.into_iter().collect();
    let get = |k: &str| -> Result<Tensor> {
        src.get(k)
            .map(|t| t.to_dtype(DType::F32))
            .transpose()?
            .ok_or_else(|| PeftError::SafetensorsInvalid { path: path.clone(), msg: format!("the source checkpoint has no `{k}` tensor") })
    };
    let fit = |k: &str, t: Tensor, want: &[usize]| -> Result<Var> {
        if t.dims() != want {
            return Err(PeftError::ShapeMismatch { name: format!("{} (key `{k}`)", path.display()), expected: want.to_vec(), found: t.dims().to_vec() });
        }
        Ok(Var::from_tensor(&t)?)
    };
    let emb = get("prompt_embeddings")?;
    enc.embedding = fit("prompt_embeddings", emb, enc.embedding.dims())?;
    if mode == "ONLY_SOURCE_SHARED" {
        return Ok(());
    }
    let (cols, rows) = (get("prefix_task_cols")?, get("prefix_task_rows")?);
    let (cols, rows) = if mode == "AVERAGE_SOURCE_TASKS" {
        (cols.mean_keepdim(0)?, rows.mean_keepdim(0)?)
    } else {
        let t = cfg.prompt_tuning_init_task;
        let nt = cols.dim(0)?;
        if t >= nt {
            return Err(PeftError::invalid_arg("promptTuningInitTask", format!("task {t} is out of range: the source has {nt} tasks")));
        }
        (cols.narrow(0, t, 1)?, rows.narrow(0, t, 1)?)
    };
    let (c0, r0) = enc.task.as_ref().map(|(c, r)| (c.dims().to_vec(), r.dims().to_vec())).unwrap_or_default();
    enc.task = Some((fit("prefix_task_cols", cols, &c0)?, fit("prefix_task_rows", rows, &r0)?));
    Ok(())
}

/// `\\1` (Python `re.sub` group reference) → `${1}` (regex crate syntax); `$` kept literal otherwise.
fn py_group_refs(rep: &str) -> String {
    let mut out = String::new();
    let mut chars = rep.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().map(|d| d.is_ascii_digit()).unwrap_or(false) => {
                let mut n = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    n.push(*d);
                    chars.next();
                }
                out.push_str(&format!("${{{n}}}"));
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

/// torch's device type name (`"cpu"`, `"cuda"`).
fn device_type(d: &candle_core::Device) -> &'static str {
    match d {
        candle_core::Device::Cpu => "cpu",
        candle_core::Device::Cuda(_) => "cuda",
        candle_core::Device::Metal(_) => "mps",
    }
}

/// Refuse an adapter subfolder that would lead a save outside `dir`: a symlink (to anywhere),
/// something that is not a folder, or a path that does not resolve inside `dir`.
fn check_save_subfolder(dir: &Path, target: &Path) -> Result<()> {
    if target == dir {
        return Ok(());
    }
    let bad = |m: &str| Err(PeftError::invalid_arg("adapterName", format!("cannot save into {}: {m}", target.display())));
    match std::fs::symlink_metadata(target) {
        Ok(md) if md.file_type().is_symlink() => return bad("it is a symlink (saves never follow links out of the target folder)"),
        Ok(md) if !md.is_dir() => return bad("it exists and is not a folder"),
        _ => {}
    }
    if let (Ok(d), Some(parent)) = (dir.canonicalize(), target.parent()) {
        if parent.canonicalize().map(|p| p != d).unwrap_or(true) {
            return bad("it does not lie directly inside the target folder");
        }
    }
    Ok(())
}

/// The layer `target_modules="all-linear"` leaves out (HF `_maybe_include_all_linear_layers`):
/// the output embedding `lm_head`, or for sequence classification the `score` / `classifier`
/// head (HF's `SEQ_CLS_HEAD_NAMES`).
pub(crate) fn is_output_head(task: Task, module: &str) -> bool {
    module == "lm_head" || (task == Task::SeqCls && (module == "score" || module == "classifier"))
}

/// Whether the `modules_to_save` entry `entry` selects linear module `module`: HF `_set_trainable`
/// tests a plain `key.endswith(entry)`, without a dot boundary, so `classifier` also selects
/// DistilBERT's `pre_classifier` (which HF PEFT then trains and saves).
///
/// HF wraps the matched module whole, so a linear layer is also selected when one of its parent
/// modules matches (RoBERTa's `classifier` head holds `classifier.dense` and
/// `classifier.out_proj`); the copies are saved under the same keys as HF's.
pub(crate) fn saves_module(module: &str, entry: &str) -> bool {
    module.ends_with(entry) || module.match_indices('.').any(|(i, _)| module[..i].ends_with(entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_names_are_validated() {
        for bad in ["", "a/b", "a\\b", "..", "a.b", "__base__", &"x".repeat(256)] {
            assert!(validate_adapter_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_adapter_name("default").is_ok());
    }

    #[test]
    fn python_group_references_are_translated() {
        assert_eq!(py_group_refs(r"model.\1.x"), "model.${1}.x");
        assert_eq!(py_group_refs("a$b"), "a$$b");
    }
}
