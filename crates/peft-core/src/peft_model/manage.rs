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
        if names.len() > 1 && names.iter().any(|n| self.is_attention_adapter(n)) {
            return Err(PeftError::invalid_arg("adapterName", "adaption prompt models have exactly one active adapter (HF `AdaptionPromptModel.set_adapter` takes one name)"));
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
        if let Some(n) = names.iter().find(|n| self.is_attention_adapter(n)) {
            return Err(PeftError::InvalidState(format!(
                "adapter `{n}` is an adaption prompt, which cannot be merged: it adds attention over learned prompt tokens instead of changing weights (HF's AdaptionPromptModel has no merge_adapter / merge_and_unload: \"'LlamaForCausalLM' object has no attribute 'merge_and_unload'\")"
            )));
        }
        // A base kept quantized cannot take a merge: refuse before any layer changes.
        for (_, lin) in self.base.named_linears() {
            if names.iter().any(|n| lin.has_adapter(n) && !lin.merged.contains(n)) {
                lin.refuse_quantized("merge an adapter")?;
            }
        }
        // A tied output head kept quantized (a GGUF with tied embeddings under `keep`) cannot
        // follow a merge into the embedding table that HF's shared weight would give it.
        let tied_cfg = self.base.config_json()["tie_word_embeddings"].as_bool() == Some(true);
        let lins = self.base.named_linears();
        let quant_head = lins.iter().find(|(m, l)| m == "lm_head" && l.quant.is_some() && !l.has_adapters() && l.saved_copies.is_empty());
        if let (true, Some((h, head))) = (tied_cfg, quant_head) {
            if let Some((e, _)) = lins.iter().find(|(_, l)| l.is_embedding && names.iter().any(|n| l.has_adapter(n) && !l.merged.contains(n))) {
                head.refuse_quantized(&format!("merge an adapter of `{e}` (tied to `{h}`)"))?;
            }
        }
        let tied = self.tied_tables();
        let mut done = Ok(());
        for (_, lin) in self.base.named_linears_mut() {
            done = lin.merge(&names, safe_merge);
            if done.is_err() {
                break;
            }
        }
        self.retie_tables(&tied);
        done
    }

    /// Subtract every merged adapter from the base weights again.
    pub fn unmerge_adapter(&mut self) -> Result<()> {
        let tied = self.tied_tables();
        let mut done = Ok(());
        for (_, lin) in self.base.named_linears_mut() {
            done = lin.unmerge();
            if done.is_err() {
                break;
            }
        }
        self.retie_tables(&tied);
        done
    }

    /// `(embedding, head)` module pairs whose weights are one tensor (tied word embeddings: a
    /// causal LM's `lm_head` built from the input embedding's table), where the head holds no
    /// adapter, copy or quantized weight of its own. HF ties the two to one `Parameter`, so a
    /// merge into the embedding (OFT `W R`, LoRA `W + ΔW`, written into the parameter in place or
    /// through `weight.data`) changes the head too; [`Self::retie_tables`] does the same here.
    fn tied_tables(&self) -> Vec<(String, String)> {
        let lins = self.base.named_linears();
        let mut out = Vec::new();
        for (e, el) in lins.iter().filter(|(_, l)| l.is_embedding) {
            for (h, hl) in lins.iter().filter(|(_, l)| !l.is_embedding && l.quant.is_none() && !l.has_adapters() && l.saved_copies.is_empty()) {
                if hl.weight.id() == el.weight.id() {
                    out.push((e.clone(), h.clone()));
                }
            }
        }
        out
    }

    /// Points each head of `pairs` (embedding, head) at its embedding's current table, which it
    /// then holds in full (a head that was kept quantized drops its quantized copy). Pairs come
    /// from [`Self::tied_tables`] (merging) or from loading a saved embedding table.
    pub(super) fn retie_tables(&mut self, pairs: &[(String, String)]) {
        for (e, h) in pairs {
            let table = self.base.named_linears().into_iter().find(|(m, _)| m == e).map(|(_, l)| l.weight.clone());
            if let (Some(w), Some((_, head))) = (table, self.base.named_linears_mut().into_iter().find(|(m, _)| m == h)) {
                head.weight = w;
                head.quant = None;
            }
        }
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
                    // the trained copy replaces a weight that was kept quantized
                    lin.quant = None;
                    if let Some(b) = b {
                        lin.bias = Some(b.as_tensor().detach());
                    }
                }
            }
            lin.clear_adapters();
        }
        for (_, host) in self.base.named_attention_prompts_mut() {
            *host = Default::default();
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
        for (_, host) in self.base.named_attention_prompts_mut() {
            host.adapters.remove(name);
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

impl PeftModel {
    fn refuse_scale_while_merged(&self, what: &str) -> Result<()> {
        let merged = self.merged_adapters();
        if merged.is_empty() {
            return Ok(());
        }
        Err(PeftError::InvalidState(format!(
            "{what} changes the LoRA scaling of unmerged adapters only: adapter(s) {} are merged into the base weights (their scale is baked in); unmerge them first",
            merged.join(", ")
        )))
    }

    /// Set the scale of the LoRA adapter `name` to `scale` times its initial one, in every layer
    /// that holds it (HF `LoraLayer.set_scale`): `scaling = scale · lora_alpha / r`, or
    /// `scale · lora_alpha / √r` with rsLoRA, per layer (so `rank_pattern` / `alpha_pattern` are
    /// kept). `scale = 1` restores the initial scaling; `0` turns the adapter off.
    ///
    /// Errors: `AdapterNotFound`; `InvalidArgument` for a non-LoRA adapter or a non-finite scale;
    /// `InvalidState` while any adapter is merged (HF would change the scaling of a merged
    /// adapter without changing the merged weights, so a later unmerge would subtract a different
    /// delta than was added).
    pub fn set_adapter_scale(&mut self, name: &str, scale: f64) -> Result<()> {
        let cfg = self.peft_config(name)?;
        let Some(lora) = cfg.as_lora().cloned() else {
            return Err(PeftError::invalid_arg("adapterName", format!("'{name}' is not a LoRA adapter: only LoRA adapters have a scale")));
        };
        if !scale.is_finite() {
            return Err(PeftError::invalid_arg("scale", format!("must be a finite number, found {scale}")));
        }
        self.refuse_scale_while_merged("setAdapterScale")?;
        for (_, lin) in self.base.named_linears_mut() {
            if let Some(ad) = lin.lora_mut(name) {
                ad.scaling = scale * lora.scaling(ad.r, ad.alpha);
            }
        }
        Ok(())
    }

    /// Multiply the scaling of every LoRA adapter of every layer by `multiplier` until
    /// [`Self::restore_adapter_scale`] (HF `peft.helpers.rescale_adapter_scale`; with a
    /// multiplier in [0, 1] this is WiSE-FT's interpolation between the base and the fine-tuned
    /// model). Calls nest: each restore undoes the latest rescale, exactly (the scalings are
    /// saved, not divided back).
    ///
    /// Errors: `InvalidArgument` for a non-finite multiplier or a model without LoRA layers (HF's
    /// `ValueError`); `InvalidState` while any adapter is merged.
    pub fn rescale_adapter_scale(&mut self, multiplier: f64) -> Result<()> {
        if !multiplier.is_finite() {
            return Err(PeftError::invalid_arg("multiplier", format!("must be a finite number, found {multiplier}")));
        }
        self.refuse_scale_while_merged("rescaleAdapterScale")?;
        let mut saved = Vec::new();
        for (path, lin) in self.base.named_linears_mut() {
            for (name, ad) in lin.loras_mut() {
                saved.push((path.clone(), name.clone(), ad.scaling));
                ad.scaling *= multiplier;
            }
        }
        if saved.is_empty() {
            return Err(PeftError::invalid_arg("model", "scaling is only supported for models with LoRA layers"));
        }
        self.saved_scalings.push(saved);
        Ok(())
    }

    /// Undo the latest [`Self::rescale_adapter_scale`]: every LoRA scaling it changed gets its
    /// saved value back. Returns `false` when there is nothing to restore.
    pub fn restore_adapter_scale(&mut self) -> bool {
        let Some(saved) = self.saved_scalings.pop() else {
            return false;
        };
        let mut by_path: HashMap<String, Vec<(String, f64)>> = HashMap::new();
        for (path, name, s) in saved {
            by_path.entry(path).or_default().push((name, s));
        }
        for (path, lin) in self.base.named_linears_mut() {
            if let Some(list) = by_path.get(&path) {
                for (name, s) in list {
                    if let Some(ad) = lin.lora_mut(name) {
                        ad.scaling = *s;
                    }
                }
            }
        }
        true
    }
}
