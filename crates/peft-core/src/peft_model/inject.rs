//! Adding adapters (HF `inject_adapter` / `add_adapter`): targeting, initialisation, `modules_to_save` copies and trainable biases.

use super::*;
use crate::tuners::layer::AdapterLayer;

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
        // HF `_setup_prompt_encoder`: a prefix-tuning adapter on a model with gradient
        // checkpointing on is refused.
        if self.gradient_checkpointing && cfg.as_prompt().is_some_and(|p| p.method == PromptMethod::PrefixTuning) {
            return Err(super::checkpointing::prefix_refusal());
        }
        if let Some(existing) = self.peft_type() {
            if existing != cfg.peft_type() {
                return Err(PeftError::InvalidAdapterConfig {
                    path: None,
                    msg: format!("Cannot combine adapters with different peft types. Found {existing} and {}.", cfg.peft_type()),
                });
            }
        }
        let task_type = cfg.common().task_type().map(String::from);
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
        if let Some(prefix) = crate::tuners::registry::tuner_for(cfg.peft_type()).and_then(|t| t.prefix(cfg.peft_type())) {
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
        if let Some(c) = cfg.as_lora() {
            let names: Vec<String> = self.base.named_layers().into_iter().map(|(n, _)| n).collect();
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
        let tuner = cfg.tuner();
        // HF `BaseTuner._check_new_adapter_config`: at most one adapter with a trainable bias.
        if BiasMode::of(&cfg) != BiasMode::None && self.configs.iter().any(|(_, c)| BiasMode::of(c) != BiasMode::None) {
            return Err(PeftError::InvalidAdapterConfig {
                path: None,
                msg: format!("{} supports only 1 adapter with bias. When using multiple adapters, set bias to 'none' for all adapters.", tuner.model_class()),
            });
        }
        tuner.inject(self, name, cfg, seed)
    }

    /// HF `BaseTuner._check_tied_modules` for a layer tuner's config on a model whose `lm_head`
    /// (T5: also both stacks' `embed_tokens`) is tied to the input embedding
    /// (`tie_word_embeddings`): when the adapter wraps a tied
    /// layer (an `embed_tokens` / `lm_head` entry in `modules_to_save` or `target_modules`), HF's
    /// warning; with `ensure_weight_tying`, HF's warnings when nothing tied is involved. HF 0.21
    /// implements `ensure_weight_tying` for a tied layer in the adapter by tying the adapter's
    /// copies; that is not built here, so such a config is refused rather than silently untied.
    ///
    /// Errors: `InvalidAdapterConfig` naming `ensure_weight_tying` in that last case.
    pub(crate) fn check_tied_modules(&mut self, cfg: &AdapterConfig) -> Result<()> {
        // (Trainable tokens too: HF's `TrainableTokensModel` warns here when `target_modules`
        // names `embed_tokens` on a tied model, e.g. T5's two stacks, which it does not tie.)
        let Some(targets) = cfg.common().target_modules() else { return Ok(()) };
        let mts = cfg.modules_to_save();
        let json = cfg.to_json();
        // Configs with the field (LoRA) warn about it; others (IA3) say no tying exists.
        let has_field = json.get("ensure_weight_tying").is_some();
        let ensure = json["ensure_weight_tying"].as_bool().unwrap_or(false);
        let last = |m: &str| m.rsplit('.').next().unwrap_or(m).to_string();
        let to_save = mts.iter().any(|m| EMBEDDING_LAYER_NAMES.contains(&last(m).as_str()));
        let in_target = match targets {
            TargetModules::List(l) => l.iter().any(|m| EMBEDDING_LAYER_NAMES.contains(&last(m).as_str())),
            TargetModules::Regex(r) => EMBEDDING_LAYER_NAMES.iter().any(|n| regex::Regex::new(&format!("^(?:{r})$")).map(|re| re.is_match(n)).unwrap_or(false)),
            TargetModules::AllLinear => false,
        };
        // HF `_get_module_names_tied_with_embedding` non-empty.
        let tied = !self.base.tied_to_input_embedding().is_empty();
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

    /// HF `BaseTuner.inject_adapter`'s first steps for a tuner whose adapters live on named
    /// linear layers: the model's `name_or_path` as `base_model_name_or_path` when the config has
    /// none, and the `modules_to_save` copies of adapter `name` planned
    /// ([`Self::plan_saved_copies`]).
    pub(crate) fn prepare_layer_adapter(&mut self, name: &str, c: &mut crate::tuners::config::LayerCommon) -> Result<HashMap<String, (Var, Option<Var>)>> {
        self.fill_base_model_name(c);
        let task = c.task_type.as_deref().and_then(Task::from_task_type);
        self.plan_saved_copies(name, &c.modules_to_save.clone().unwrap_or_default(), task)
    }

    /// The model's `name_or_path` as the config's `base_model_name_or_path` when it has none
    /// (HF `inject_adapter`).
    pub(crate) fn fill_base_model_name(&self, c: &mut crate::tuners::config::PeftCommon) {
        if c.base_model_name_or_path.is_none() {
            c.base_model_name_or_path = self.base.info().name_or_path.clone();
        }
    }

    /// The linear modules a layer tuner's config selects (HF `_check_target_module_exists` over
    /// `named_modules`; `"all-linear"` leaves out the output head and embeddings).
    ///
    /// Errors: `NoTargetModules` with HF's message (which names the layer selection or the
    /// targets that matched nothing) when none is selected.
    pub(crate) fn select_layers(&self, c: &crate::tuners::config::LayerCommon) -> Result<std::collections::HashSet<String>> {
        let mut misses = crate::targeting::Misses::default();
        let mut selected = std::collections::HashSet::new();
        let rule = c.rule();
        for (mname, lin) in self.base.named_layers() {
            let sel = rule.select(&mname, lin.is_embedding || is_output_head(self.base.task(), &mname));
            if misses.note(&mname, sel, c.layers_pattern.as_deref()) {
                selected.insert(mname);
            }
        }
        if selected.is_empty() {
            let targets = crate::targeting::targets_to_json(&Some(c.target_modules.clone()));
            return Err(self.no_targets(&targets, &misses, c.layers_to_transform.as_deref(), c.layers_pattern.as_deref()));
        }
        Ok(selected)
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
            for (mname, lin) in self.base.named_layers() {
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

    /// HF `BaseTuner.inject_adapter` for a tuner whose adapter is one [`AdapterLayer`] per
    /// targeted linear module: the config's common steps ([`Self::prepare_layer_adapter`]), the
    /// selected modules ([`Self::select_layers`]), and `make`'s layer for each of them in module
    /// order, drawn from one RNG seeded with `seed`; returns the planned layers and the
    /// `modules_to_save` copies for [`Self::install_layers`]. Nothing on the model changes.
    ///
    /// Errors: `NoTargetModules`; the first error of `make` (a target the tuner refuses).
    pub(crate) fn plan_layers<C>(&mut self, name: &str, cfg: &mut C, seed: u64, mut make: impl FnMut(&C, &str, &crate::tuners::linear::PeftLinear, &mut rand::rngs::StdRng, &candle_core::Device) -> Result<Box<dyn AdapterLayer>>) -> Result<PlannedLayers>
    where
        C: std::ops::DerefMut<Target = crate::tuners::config::LayerCommon>,
    {
        self.plan_layers_with(name, cfg, seed, |_, _, _| Ok(()), |cfg, _, m, lin, rng, device| make(cfg, m, lin, rng, device))
    }

    /// [`Self::plan_layers`] for a tuner with model-level state its layers share (HF
    /// `uses_shared_state`; VeRA's `vera_A` / `vera_B`, HF `_pre_injection_hook` +
    /// `_init_vera_A_vera_B`): once the modules are selected and before any layer is made,
    /// `shared` sees the model, the config and the selected module paths in module order, checks
    /// them and returns the state (`S`) that `make` then receives for every layer. Nothing on the
    /// model changes but its warnings.
    ///
    /// Errors: `NoTargetModules`; the error of `shared`; the first error of `make`.
    pub(crate) fn plan_layers_with<C, S>(
        &mut self,
        name: &str,
        cfg: &mut C,
        seed: u64,
        shared: impl FnOnce(&mut Self, &mut C, &[String]) -> Result<S>,
        mut make: impl FnMut(&C, &S, &str, &crate::tuners::linear::PeftLinear, &mut rand::rngs::StdRng, &candle_core::Device) -> Result<Box<dyn AdapterLayer>>,
    ) -> Result<PlannedLayers>
    where
        C: std::ops::DerefMut<Target = crate::tuners::config::LayerCommon>,
    {
        use rand::SeedableRng;
        let copies = self.prepare_layer_adapter(name, cfg)?;
        let selected = self.select_layers(cfg)?;
        let ordered: Vec<String> = self.base.named_layers().into_iter().map(|(m, _)| m).filter(|m| selected.contains(m)).collect();
        let state = shared(self, cfg, &ordered)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let device = self.base.device().clone();
        let mut layers = HashMap::new();
        for (mname, lin) in self.base.named_layers().into_iter().filter(|(m, _)| selected.contains(m)) {
            let layer = make(cfg, &state, &mname, lin, &mut rng, &device)?;
            layers.insert(mname, layer);
        }
        Ok(PlannedLayers { layers, copies })
    }

    /// Install what [`Self::plan_layers`] planned for adapter `name` with its config
    /// ([`Self::install_planned`]). Returns the targeted module paths, sorted.
    pub(crate) fn install_layers(&mut self, name: &str, cfg: AdapterConfig, planned: PlannedLayers) -> Result<Vec<String>> {
        self.install_planned(name, cfg, planned.layers, planned.copies, |lin, name, l| {
            lin.layers.insert(name, l);
        })
    }

    /// The end of injecting adapter `name` (HF `inject_adapter`) for a tuner whose layers are
    /// planned first and installed only when every target is valid: each planned layer into its
    /// module with `put`, the `modules_to_save` copies, then the config (the model's first
    /// adapter becomes active). Returns the targeted module paths, sorted.
    pub(crate) fn install_planned<L>(&mut self, name: &str, cfg: AdapterConfig, mut planned: HashMap<String, L>, copies: HashMap<String, (Var, Option<Var>)>, put: impl Fn(&mut crate::tuners::linear::PeftLinear, String, L)) -> Result<Vec<String>> {
        let mut targeted: Vec<String> = planned.keys().cloned().collect();
        targeted.sort();
        let first = self.configs.is_empty();
        for (mname, lin) in self.base.named_layers_mut() {
            if let Some(l) = planned.remove(&mname) {
                put(lin, name.to_string(), l);
            }
        }
        self.install_saved_copies(name, copies);
        self.register(name, cfg, first)?;
        Ok(targeted)
    }

    pub(crate) fn install_saved_copies(&mut self, name: &str, mut copies: HashMap<String, (Var, Option<Var>)>) {
        for (mname, lin) in self.base.named_layers_mut() {
            if let Some(c) = copies.remove(&mname) {
                lin.saved_copies.insert(name.to_string(), c);
            }
        }
    }

    /// Record a newly injected adapter's config; the model's first adapter becomes active (as
    /// `get_peft_model` does), later ones are not. A trainable adapter's config `bias` makes the
    /// base biases it names trainable (HF `_mark_only_adapters_as_trainable`, see
    /// [`BiasMode`]).
    pub(crate) fn register(&mut self, name: &str, cfg: AdapterConfig, first: bool) -> Result<()> {
        let bias = if cfg.inference_mode() { BiasMode::None } else { BiasMode::of(&cfg) };
        self.configs.push((name.to_string(), cfg));
        if first {
            // active without `set_adapter`'s explicit `requires_grad`: the default (trainable
            // unless the config is in inference mode) is HF's state after `get_peft_model` /
            // `PeftModel.from_pretrained`
            self.active = vec![name.to_string()];
        }
        self.sync_layers();
        self.make_biases_trainable(bias)
    }

    pub(crate) fn sync_layers(&mut self) {
        let active = self.active.clone();
        let disabled = self.disabled;
        for (_, lin) in self.base.named_layers_mut() {
            lin.active = active
                .iter()
                .filter(|a| lin.has_adapter(a) || lin.saved_copies.contains_key(*a))
                .cloned()
                .collect();
            lin.disabled = disabled;
        }
        for (_, host) in self.base.named_attention_prompts_mut() {
            host.active = active.iter().find(|a| host.adapters.contains_key(*a)).cloned();
            host.disabled = disabled;
        }
    }
}

/// HF `_create_new_module`: the target's layout decides `fan_in_fan_out` (true for a GPT-2
/// `Conv1D`, false for an `nn.Linear`), with HF's warning pushed to `warnings` when the config
/// said otherwise.
pub(crate) fn fit_fan_in_fan_out(warnings: &mut Vec<String>, lin: &crate::tuners::linear::PeftLinear, fan_in_fan_out: &mut bool) {
    if lin.transposed && !*fan_in_fan_out {
        warnings.push("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.".into());
        *fan_in_fan_out = true;
    } else if !lin.transposed && *fan_in_fan_out {
        warnings.push("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False.".into());
        *fan_in_fan_out = false;
    }
}

/// The layers a tuner planned for one adapter ([`PeftModel::plan_layers`]), by module path, and
/// its `modules_to_save` copies.
pub(crate) struct PlannedLayers {
    pub layers: HashMap<String, Box<dyn AdapterLayer>>,
    pub copies: HashMap<String, (Var, Option<Var>)>,
}
