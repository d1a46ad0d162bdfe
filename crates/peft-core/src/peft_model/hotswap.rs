//! Swapping a loaded LoRA adapter's weights in place from a folder (HF
//! `peft.utils.hotswap.hotswap_adapter`).

use super::*;

/// The LoRA config fields that change a model's output besides the weights; a hotswap needs them
/// equal (HF `CONFIG_KEYS_TO_CHECK[LORA]`).
const KEYS_TO_CHECK: [&str; 4] = ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"];

impl PeftModel {
    /// Replace the weights of the loaded LoRA adapter `name` with those of the adapter in `dir`
    /// (HF `hotswap_adapter`): no re-injection, the same parameters (the same `Var`s, unless the
    /// rank grows) get the new values; the name, the active set and
    /// the adapter's config stay as they are, and each layer's scaling becomes the new config's
    /// (`lora_alpha` / `r`, or rsLoRA, with its `rank_pattern` / `alpha_pattern`). Modules the
    /// new file has no weights for get zeros (HF), so they no longer contribute.
    ///
    /// Errors: `AdapterNotFound`; `InvalidArgument` when `name` is not a LoRA adapter;
    /// `InvalidAdapterConfig` (naming `adapter_config.json`) for another PEFT type or when
    /// `use_rslora`, `lora_dropout`, `alpha_pattern` or `use_dora` differ (HF's "Configs are
    /// incompatible"); `SafetensorsInvalid` for tensors of modules the adapter does not target
    /// (HF's "unexpected keys"); `ShapeMismatch` for a weight whose dimensions other than the
    /// rank differ; `InvalidState` while the adapter is merged. Nothing is changed when an error
    /// is returned.
    ///
    /// Another rank is swapped as HF does: a smaller one is zero-padded into the current
    /// tensors (same parameters), a larger one replaces them (new parameters of the new shape).
    /// The layer keeps its `lora_alpha` and the adapter its config (HF updates only the
    /// scaling), so [`Self::set_adapter_scale`] afterwards still starts from the old adapter's
    /// `lora_alpha / r`, and saving writes the old config next to the new weights. The new
    /// weights are stored as f32 (as loading does).
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
        // The adapter's parameters as the file names them: disk key -> (shape, rank dimension:
        // rows of `lora_A` / `lora_embedding_A`, columns of `lora_B` / `lora_embedding_B`).
        let mut expected: HashMap<String, (Vec<usize>, Option<usize>)> = HashMap::new();
        for (m, lin) in self.base.named_layers() {
            for (slot, var) in lin.adapter_params(name) {
                let rank_dim = if slot.name.ends_with("_A") { Some(0) } else if slot.name.ends_with("_B") { Some(1) } else { None };
                expected.insert(slot.disk_key(&m), (var.dims().to_vec(), rank_dim));
            }
        }
        let mut found: HashMap<String, Tensor> = HashMap::new();
        let mut unexpected = Vec::new();
        for (key, t) in tensors {
            let k = strip_adapter_name(key.strip_prefix(KEY_PREFIX).unwrap_or(&key));
            match expected.get(&k) {
                Some((shape, rank_dim)) => {
                    // Another rank is fine (HF pads a smaller one with zeros and replaces the
                    // tensor for a larger one); every other dimension must match.
                    let fits = t.rank() == shape.len() && t.dims().iter().zip(shape).enumerate().all(|(d, (a, b))| a == b || Some(d) == *rank_dim);
                    if !fits {
                        return Err(PeftError::ShapeMismatch { name: format!("{} (key `{key}`; a hotswap keeps the layers' shapes, only the rank may differ)", wpath.display()), expected: shape.clone(), found: t.dims().to_vec() });
                    }
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
        for (m, lin) in self.base.named_layers_mut() {
            let params: Vec<_> = lin.adapter_params(name).into_iter().map(|(s, v)| (s, v.clone())).collect();
            let mut any = false;
            let mut grown = Vec::new();
            for (slot, var) in params {
                let Some(t) = found.remove(&slot.disk_key(&m)) else {
                    // Not in the new file: zeroed, so that the module no longer contributes (HF).
                    var.set(&var.zeros_like()?)?;
                    continue;
                };
                any = true;
                let t = t.to_dtype(var.dtype())?;
                if t.dims() == var.dims() {
                    var.set(&t)?;
                } else if t.dims().iter().zip(var.dims()).all(|(n, o)| n <= o) {
                    // A smaller rank: zeros, then the new weights in the leading rows (A) or
                    // columns (B); the padding contributes nothing (HF).
                    let ranges: Vec<std::ops::Range<usize>> = t.dims().iter().map(|&n| 0..n).collect();
                    var.set(&var.zeros_like()?.slice_assign(&ranges, &t)?)?;
                } else {
                    grown.push((slot, Var::from_tensor(&t)?));
                }
            }
            // A larger rank: the parameters are replaced (HF `swap_tensors`), and the layer's
            // rank follows them.
            for (slot, v) in grown {
                lin.set_adapter_param(name, &slot, v)?;
            }
            if let Some(ad) = lin.lora_mut(name) {
                ad.r = ad.a.dims()[0];
                if any {
                    ad.scaling = new_lora.scaling(new_lora.rank_for(&m), new_lora.alpha_for(&m));
                }
            }
        }
        Ok(())
    }
}
