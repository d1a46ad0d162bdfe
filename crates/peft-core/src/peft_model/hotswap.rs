//! Swapping a loaded LoRA adapter's weights in place from a folder (HF
//! `peft.utils.hotswap.hotswap_adapter`).

use super::*;

/// The LoRA config fields that change a model's output besides the weights; a hotswap needs them
/// equal (HF `CONFIG_KEYS_TO_CHECK[LORA]`).
const KEYS_TO_CHECK: [&str; 4] = ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"];

impl PeftModel {
    /// Replace the weights of the loaded LoRA adapter `name` with those of the adapter in `dir`
    /// (HF `hotswap_adapter`): no re-injection, the same parameters (and the same `Var`s, so a
    /// model being served keeps its buffers) get the new values; the name, the active set and
    /// the adapter's config stay as they are, and each layer's scaling becomes the new config's
    /// (`lora_alpha` / `r`, or rsLoRA, with its `rank_pattern` / `alpha_pattern`). Modules the
    /// new file has no weights for get zeros (HF), so they no longer contribute.
    ///
    /// Errors: `AdapterNotFound`; `InvalidArgument` when `name` is not a LoRA adapter;
    /// `InvalidAdapterConfig` (naming `adapter_config.json`) for another PEFT type or when
    /// `use_rslora`, `lora_dropout`, `alpha_pattern` or `use_dora` differ (HF's "Configs are
    /// incompatible"); `SafetensorsInvalid` for tensors of modules the adapter does not target
    /// (HF's "unexpected keys"); `ShapeMismatch` for a weight of another shape (a different rank:
    /// load it as a new adapter instead); `InvalidState` while the adapter is merged. Nothing is
    /// changed when an error is returned.
    pub fn hotswap_adapter(&mut self, dir: &Path, name: &str) -> Result<()> {
        let old = self.peft_config(name)?.clone();
        let Some(old_lora) = old.as_lora() else {
            return Err(PeftError::invalid_arg("adapterName", format!("'{name}' is a {} adapter: hotswapping supports LoRA only (HF)", old.peft_type())));
        };
        if !dir.exists() {
            return Err(PeftError::NotFound { path: dir.into(), what: "adapter folder does not exist".into() });
        }
        let cfg_path = dir.join("adapter_config.json");
        let new = AdapterConfig::from_file(&cfg_path)?;
        let Some(new_lora) = new.as_lora() else {
            return Err(PeftError::InvalidAdapterConfig { path: Some(cfg_path), msg: format!("Incompatible PEFT types found: {} and {}", old.peft_type(), new.peft_type()) });
        };
        let sorted = |v: &[(String, f64)]| {
            let mut v = v.to_vec();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let differs = [
            old_lora.use_rslora != new_lora.use_rslora,
            old_lora.lora_dropout != new_lora.lora_dropout,
            sorted(&old_lora.alpha_pattern) != sorted(&new_lora.alpha_pattern),
            old_lora.use_dora != new_lora.use_dora,
        ];
        if let Some(i) = differs.iter().position(|d| *d) {
            let (a, b) = match i {
                0 => (old_lora.use_rslora.to_string(), new_lora.use_rslora.to_string()),
                1 => (old_lora.lora_dropout.to_string(), new_lora.lora_dropout.to_string()),
                2 => (format!("{:?}", sorted(&old_lora.alpha_pattern)), format!("{:?}", sorted(&new_lora.alpha_pattern))),
                _ => (old_lora.use_dora.to_string(), new_lora.use_dora.to_string()),
            };
            return Err(PeftError::InvalidAdapterConfig { path: Some(cfg_path), msg: format!("Configs are incompatible: for {}, {a} != {b}", KEYS_TO_CHECK[i]) });
        }
        if self.merged_adapters().iter().any(|m| m == name) {
            return Err(PeftError::InvalidState(format!(
                "Cannot hot-swap adapter '{name}' because it is currently merged into the base weights. Please unmerge the adapter first (unmergeAdapter()); unmerging after a swap of merged weights would otherwise corrupt them."
            )));
        }
        let wpath = dir.join("adapter_model.safetensors");
        let tensors = read_safetensors(&wpath, self.base.device())?;
        // The adapter's parameters as the file names them: disk key -> shape.
        let mut expected: HashMap<String, Vec<usize>> = HashMap::new();
        for (m, lin) in self.base.named_linears() {
            for (slot, var) in lin.adapter_params(name) {
                expected.insert(slot.disk_key(&m), var.dims().to_vec());
            }
        }
        let mut found: HashMap<String, Tensor> = HashMap::new();
        let mut unexpected = Vec::new();
        for (key, t) in tensors {
            let k = strip_adapter_name(key.strip_prefix(KEY_PREFIX).unwrap_or(&key));
            match expected.get(&k) {
                Some(shape) if t.dims() != shape.as_slice() => {
                    return Err(PeftError::ShapeMismatch { name: format!("{} (key `{key}`; hotswapping needs the loaded adapter's shapes: load an adapter of another rank as a new adapter)", wpath.display()), expected: shape.clone(), found: t.dims().to_vec() });
                }
                Some(_) => {
                    found.insert(k, t);
                }
                None => unexpected.push(key),
            }
        }
        if !unexpected.is_empty() {
            unexpected.sort();
            return Err(PeftError::SafetensorsInvalid { path: wpath, msg: format!("Hot swapping the adapter did not succeed, unexpected keys found: {}.", unexpected.join(", ")) });
        }
        let new_lora = new_lora.clone();
        for (m, lin) in self.base.named_linears_mut() {
            let params: Vec<_> = lin.adapter_params(name).into_iter().map(|(s, v)| (s, v.clone())).collect();
            let mut any = false;
            for (slot, var) in params {
                match found.remove(&slot.disk_key(&m)) {
                    Some(t) => {
                        var.set(&t.to_dtype(var.dtype())?)?;
                        any = true;
                    }
                    None => var.set(&var.zeros_like()?)?,
                }
            }
            if any {
                if let Some(ad) = lin.adapters.get_mut(name) {
                    ad.scaling = new_lora.scaling(new_lora.rank_for(&m), new_lora.alpha_for(&m));
                }
            }
        }
        Ok(())
    }
}
