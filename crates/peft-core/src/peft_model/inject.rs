//! Adding adapters (HF `inject_adapter` / `add_adapter`): targeting, initialisation, `modules_to_save` copies and trainable biases.

use super::*;

impl PeftModel {
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
    pub(crate) fn check_tied_modules(&mut self, cfg: &AdapterConfig) -> Result<()> {
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

    pub(crate) fn add_lora(&mut self, name: &str, mut cfg: LoraConfig, seed: u64) -> Result<Vec<String>> {
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
                lin.refuse_quantized("initialise PiSSA / OLoRA (they rewrite the base weight)")?;
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
    pub(crate) fn make_biases_trainable(&mut self, mode: &str) -> Result<()> {
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
    pub(crate) fn bias_mode(&self, name: &str) -> String {
        match self.peft_config(name) {
            Ok(AdapterConfig::Lora(c)) => c.bias.clone(),
            _ => "none".into(),
        }
    }

    /// Inject an (IA)³ adapter (HF `IA3Model`): one vector per targeted linear layer, `[out, 1]`
    /// or `[1, in]` for feed-forward modules; ones with `init_ia3_weights` (a no-op), else N(0, 1).
    pub(crate) fn add_ia3(&mut self, name: &str, mut cfg: Ia3Config, seed: u64) -> Result<Vec<String>> {
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
    pub(crate) fn no_targets(&self, targets: &serde_json::Value, misses: &crate::targeting::Misses, layers: Option<&[usize]>, layers_pattern: Option<&[String]>) -> PeftError {
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
    pub(crate) fn add_prompt(&mut self, name: &str, mut cfg: PromptLearningConfig, seed: u64, encoder: Option<PromptEncoder>) -> Result<()> {
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
    pub(crate) fn plan_saved_copies(&mut self, name: &str, wanted: &[String], task: Option<Task>) -> Result<HashMap<String, (Var, Option<Var>)>> {
        let mut copies = HashMap::new();
        let mut unmatched = Vec::new();
        for w in wanted {
            let mut found = false;
            for (mname, lin) in self.base.named_linears() {
                if saves_module(&mname, w) {
                    let wt = Var::from_tensor(&lin.dense_weight()?.copy()?)?;
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

    pub(crate) fn install_saved_copies(&mut self, name: &str, mut copies: HashMap<String, (Var, Option<Var>)>) {
        for (mname, lin) in self.base.named_linears_mut() {
            if let Some(c) = copies.remove(&mname) {
                lin.saved_copies.insert(name.to_string(), c);
            }
        }
    }

    /// Record a newly injected adapter's config; the model's first adapter becomes active (as
    /// `get_peft_model` does), later ones are not.
    pub(crate) fn register(&mut self, name: &str, cfg: AdapterConfig, first: bool) -> Result<()> {
        self.configs.push((name.to_string(), cfg));
        if first {
            self.set_adapter(&[name.to_string()])
        } else {
            self.sync_layers();
            Ok(())
        }
    }

    pub(crate) fn sync_layers(&mut self) {
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
}
