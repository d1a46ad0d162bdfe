//! Switching, disabling, merging, unloading and deleting adapters (HF `set_adapter`, `disable_adapter`, `merge_adapter`, `unmerge_adapter`, `merge_and_unload`, `unload`, `delete_adapter`).

use super::*;

impl PeftModel {
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
        // A base kept quantized cannot take a merge: refuse before any layer changes.
        for (_, lin) in self.base.named_linears() {
            if names.iter().any(|n| lin.has_adapter(n) && !lin.merged.contains(n)) {
                lin.refuse_quantized("merge an adapter")?;
            }
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

    pub(crate) fn strip_adapters(&mut self, keep_copies: bool) {
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
            lin.clear_adapters();
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
            lin.remove_adapter(name);
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
}
