//! Saving adapters in HF PEFT's folder layout (HF `save_pretrained`).

use super::*;

impl PeftModel {
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
            let mut config_text = python_json_dumps(&self.config_json_to_save(&saved));
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
    pub(crate) fn write_prepared(&self, dir: &Path, names: &[String], groups: &[(PathBuf, Vec<u8>, String)], ctl: &crate::progress::Control, created: &mut Vec<PathBuf>) -> Result<Vec<PathBuf>> {
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
    pub(crate) fn convert_mutated_init(&self, tensors: Vec<(String, Tensor)>, saved: &AdapterConfig, initial: &Path) -> Result<(Vec<(String, Tensor)>, serde_json::Value)> {
        let Some(c) = saved.as_lora() else {
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
        let mut j = self.config_json_to_save(saved);
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

    /// The adapter_config.json object `save_pretrained` writes for `saved`: its JSON, and, when
    /// `task_type` is unset, HF's `auto_mapping` (`PeftModel.save_pretrained`):
    /// `{"base_model_class": <the base model's transformers class>, "parent_library":
    /// "transformers.models.<type>.modeling_<type>"}`. An `auto_mapping` the config already
    /// holds (a file HF wrote for this base) is kept as it is.
    pub(crate) fn config_json_to_save(&self, saved: &AdapterConfig) -> serde_json::Value {
        let mut j = saved.to_json();
        if saved.common().task_type().is_none() && j.get("auto_mapping").is_none_or(|v| v.is_null()) {
            if let Some(obj) = j.as_object_mut() {
                let info = self.base.info();
                // transformers' module folder: the model_type, less Gemma 3's `_text` suffix
                // (`Gemma3ForCausalLM` lives in `transformers.models.gemma3.modeling_gemma3`).
                let folder = info.model_type.strip_suffix("_text").unwrap_or(&info.model_type);
                let mapping = serde_json::json!({
                    "base_model_class": info.architecture,
                    "parent_library": format!("transformers.models.{folder}.modeling_{folder}"),
                });
                obj.insert("auto_mapping".into(), mapping);
            }
        }
        j
    }
}
