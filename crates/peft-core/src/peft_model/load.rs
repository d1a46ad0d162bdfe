//! Loading adapters from HF PEFT folders (HF `load_adapter` / `set_peft_model_state_dict`).

use super::*;

impl PeftModel {
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

    pub(crate) fn load_adapter_inner(&mut self, dir: &Path, name: &str, o: &LoadOptions, ctl: &crate::progress::Control) -> Result<LoadResult> {
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
        let tuner = cfg.tuner();
        tuner.prepare_load(self, &mut cfg, &mut tensors, &wpath)?;
        // Tuners that do not live in linear layers (prompt learning, adaption prompt) load their
        // own tensors; the others leave them to the generic layer loading below.
        ctl.check()?; // the last point before such a tuner changes the model
        if let Some(r) = tuner.load(self, name, &cfg, &mut tensors, &wpath) {
            return r;
        }
        // Build the expected key map from the config before touching the model.
        let mut expected: std::collections::HashMap<String, (String, bool, Vec<usize>)> = Default::default();
        for (m, lin) in self.base.named_layers() {
            for (slot, shape) in tuner.expected_params(&cfg, self.base.task(), &m, lin) {
                expected.insert(slot.disk_key(&m), (m.clone(), true, shape));
            }
            let mts = cfg.modules_to_save();
            if mts.iter().any(|w| saves_module(&m, w)) {
                expected.insert(format!("{m}.weight"), (m.clone(), false, lin.weight.dims().to_vec()));
                if let Some(b) = &lin.bias {
                    expected.insert(format!("{m}.bias"), (m.clone(), false, b.dims().to_vec()));
                }
            }
        }
        for k in crate::tuners::trainable_tokens::lora_unheld_token_keys(self, &cfg) {
            expected.remove(&k);
        }
        // Base biases in the file (HF `bias="all" | "lora_only"`): loaded into the base layers
        // whatever the config says (HF's non-strict `load_state_dict`), replacing their values.
        let mut bias_shapes: std::collections::HashMap<String, Vec<usize>> = Default::default();
        for (m, lin) in self.base.named_layers() {
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
        for (m, lin) in self.base.named_layers() {
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
        let (bias_mode, trainable) = (BiasMode::of(&cfg), !cfg.inference_mode());
        ctl.check()?; // the last point before the model changes
        self.add_adapter(name, cfg, 0)?;
        if !emb_weights.is_empty() {
            // Tied word embeddings: HF's input embedding and `lm_head` (T5: `shared`, both
            // stacks' `embed_tokens`, `lm_head`) hold one `Parameter`, and its non-strict
            // `load_state_dict` copies the saved table into it in place, so the tied modules get
            // the table too (those without a table of their own in the file).
            let groups = self.tie_groups();
            let mut loaded = Vec::new();
            for (m, lin) in self.base.named_layers_mut() {
                if let Some(t) = emb_weights.remove(&m) {
                    lin.weight = t.to_dtype(lin.weight.dtype())?;
                    // the adapter's full weight replaces one that was kept quantized
                    lin.quant = None;
                    loaded.push(m);
                }
            }
            self.retie_tables(&groups, &loaded);
        }
        if !biases.is_empty() {
            for (m, lin) in self.base.named_layers_mut() {
                if let Some(t) = biases.remove(&m) {
                    lin.bias = Some(t.to_dtype(lin.weight.dtype())?);
                }
            }
            for (m, b) in self.base.named_norm_biases_mut() {
                if let Some(t) = biases.remove(&m) {
                    *b = t.to_dtype(b.dtype())?;
                }
            }
            if trainable {
                self.make_biases_trainable(bias_mode)?;
            }
        }
        for (m, lin) in self.base.named_layers_mut() {
            // Adapter weights are kept in f32 (HF `autocast_adapter_dtype`; see `cast_adapter`).
            let slots: Vec<_> = lin.adapter_params(name).into_iter().map(|(s, _)| s).collect();
            for slot in slots {
                if let Some(t) = found.remove(&slot.disk_key(&m)) {
                    lin.set_adapter_param(name, &slot, Var::from_tensor(&t.to_dtype(DType::F32)?)?)?;
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

}
