//! Switching, disabling, merging, unloading and deleting adapters (HF `set_adapter`, `disable_adapter`, `merge_adapter`, `unmerge_adapter`, `merge_and_unload`, `unload`, `delete_adapter`).

use super::*;

/// The example code of HF's tied-merge warning (`_check_merge_allowed`), as it prints it.
const TIED_MERGE_EXAMPLE: &str = "\n```python\nfrom transformers import AutoModelForCausalLM\n\n# Load original tied model\nmodel = AutoModelForCausalLM.from_pretrained(\"google/gemma-2-2b-it\", tie_word_embeddings=False)\n\n# Set the randomly initialized lm_head to the previously tied embeddings\nmodel.lm_head.weight.data = model.model.embed_tokens.weight.data.clone()\n\n# Save the untied model\nuntied_model_dir = \"dir/for/untied/model\"\nmodel.save_pretrained(untied_model_dir)\nmodel.config.save_pretrained(untied_model_dir)\n\n# Now use the original model but in untied format\nmodel = AutoModelForCausalLM.from_pretrained(untied_model_dir)\n```\n";

impl PeftModel {
    /// Make `names` the active adapters (HF `set_adapter`; several names are summed), trainable
    /// ([`Self::set_adapter_with`] with `inference_mode` false, HF's default).
    ///
    /// Errors: as [`Self::set_adapter_with`].
    pub fn set_adapter(&mut self, names: &[String]) -> Result<()> {
        self.set_adapter_with(names, false)
    }

    /// HF `set_adapter(adapter_name, inference_mode)`: make `names` the active adapters and set
    /// `requires_grad` as HF does: the tuner layers of `names` get `!inference_mode` (whatever
    /// their config's `inference_mode`: an adapter loaded frozen becomes trainable, as in HF)
    /// and every other adapter's `false`; the modules_to_save copies of `names` get
    /// `!inference_mode` and those of the adapters it deactivates `false` (other copies keep
    /// their flag, HF's `ModulesToSaveWrapper.set_adapter`). Prompt-learning encoders keep theirs
    /// (HF's `set_adapter` leaves them). See [`Self::requires_grad`].
    ///
    /// Errors: `AdapterNotFound` for an unknown name; `InvalidArgument` for an empty list, for
    /// several names with a prompt-learning or adaption-prompt adapter, or for several adapters
    /// with a modules_to_save copy of the same module (HF's `ModulesToSaveWrapper`: "Only one
    /// adapter can be set at a time").
    pub fn set_adapter_with(&mut self, names: &[String], inference_mode: bool) -> Result<()> {
        if names.is_empty() {
            return Err(PeftError::invalid_arg("adapterName", "at least one adapter name is required"));
        }
        for n in names {
            self.peft_config(n)?;
        }
        let layers = self.base.named_layers();
        if names.len() > 1 {
            self.check_allowed(Operation::SeveralActive, names)?;
            for (m, lin) in &layers {
                let holders: Vec<&String> = names.iter().filter(|n| lin.saved_copies.contains_key(*n)).collect();
                if holders.len() > 1 {
                    return Err(PeftError::invalid_arg(
                        "adapterName",
                        format!("adapters {holders:?} each hold a modules_to_save copy of `{m}`: only one of them can be active (HF's ModulesToSaveWrapper: \"Only one adapter can be set at a time\")"),
                    ));
                }
            }
        }
        // the adapters whose modules_to_save copies change flag (see below)
        let with_copies: Vec<String> = self.active.iter().chain(names).filter(|n| layers.iter().any(|(_, l)| l.saved_copies.contains_key(*n))).cloned().collect();
        drop(layers);
        if !self.merged_adapters().is_empty() {
            // HF LoraModel.set_adapter: unmerge first (with this warning).
            self.warnings.push("Adapter cannot be set when the model is merged. Unmerging the model first.".into());
            self.unmerge_adapter()?;
        }
        let on = |n: &String| names.contains(n) && !inference_mode;
        for (n, c) in &self.configs {
            if !c.is_prompt_learning() {
                self.grad_flags.layers.insert(n.clone(), on(n));
            }
        }
        for n in with_copies {
            let v = on(&n);
            self.grad_flags.copies.insert(n, v);
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
        self.check_allowed(Operation::Merge, &names)?;
        // A base kept quantized cannot take a merge: refuse before any layer changes.
        for (_, lin) in self.base.named_layers() {
            if names.iter().any(|n| lin.has_adapter(n) && !lin.merged.contains(n)) {
                lin.refuse_quantized("merge an adapter")?;
            }
        }
        // A module kept quantized in a tie group (a GGUF's tied output head under `keep`)
        // cannot follow a merge into the group's embedding table that HF's one shared weight
        // would give it: refuse before any layer changes.
        let lins = self.base.named_layers();
        let lin = |m: &str| lins.iter().find(|(n, _)| n == m).map(|(_, l)| *l);
        for group in self.tie_groups() {
            let merging = group.iter().find(|m| lin(m).is_some_and(|l| l.is_embedding && names.iter().any(|n| l.has_adapter(n) && !l.merged.contains(n))));
            let kept = group.iter().filter_map(|m| lin(m).map(|l| (m, l))).find(|(_, l)| l.quant.is_some() && !l.has_adapters() && l.saved_copies.is_empty());
            if let (Some(e), Some((h, head))) = (merging, kept) {
                head.refuse_quantized(&format!("merge an adapter of `{e}` (tied to `{h}`)"))?;
            }
        }
        self.warn_tied_targets();
        self.edit_tied_weights(|lin| lin.merge(&names, safe_merge))
    }

    /// HF `BaseTuner._check_merge_allowed`'s warning: with `tie_word_embeddings`, a merge when
    /// a targeted module is named like an embedding layer (`embed_tokens`, `lm_head`: T5's two
    /// stacks' `embed_tokens`, a Llama's `model.embed_tokens`), in HF's words. Trainable tokens,
    /// which tie their layers (HF `TrainableTokensModel._get_tied_target_modules` returns
    /// nothing), and LoRA's `trainable_token_indices` wrappers (not targets) do not count.
    fn warn_tied_targets(&mut self) {
        if self.base.config_json()["tie_word_embeddings"].as_bool() != Some(true) {
            return;
        }
        let untied: Vec<&String> = self.configs.iter().filter(|(_, c)| !c.tuner().ties_embedding_adapters()).map(|(n, _)| n).collect();
        let tied: Vec<String> = self
            .base
            .named_layers()
            .into_iter()
            .filter(|(m, l)| EMBEDDING_LAYER_NAMES.contains(&m.rsplit('.').next().unwrap_or(m)) && l.layers.iter().any(|(n, a)| untied.contains(&n) && a.peft_type() != "TRAINABLE_TOKENS"))
            .map(|(m, _)| format!("'{m}'"))
            .collect();
        if tied.is_empty() {
            return;
        }
        self.warnings.push(format!(
            "Model with `tie_word_embeddings=True` and the tied_target_modules=[{}] are part of the adapter. This can lead to complications. You can opt to merge the adapter after cloning the weights (to untie the embeddings). You can untie the embeddings by loading the model with `tie_word_embeddings=False`. For example:{TIED_MERGE_EXAMPLE}",
            tied.join(", ")
        ));
    }

    /// Subtract every merged adapter from the base weights again.
    pub fn unmerge_adapter(&mut self) -> Result<()> {
        self.edit_tied_weights(|lin| lin.unmerge())
    }

    /// Runs `edit` (a merge or unmerge) on every linear in module order, as HF's
    /// `merge_adapter` / `unmerge_adapter` visit `named_modules`; a module whose weight it
    /// changes hands the new table to the other modules of its tie group ([`Self::tie_groups`])
    /// before the next module runs. HF's tied modules hold one `Parameter` that each merge edits
    /// in place (`weight.data += ΔW`, `weight.data = W R`, `index_copy`), so a later module of
    /// the group merges into what the earlier ones left (T5's two `embed_tokens` with LoRA:
    /// `W + ΔE + ΔD` for both stacks, `shared` and a tied `lm_head`). Stops at the first error.
    fn edit_tied_weights(&mut self, mut edit: impl FnMut(&mut crate::tuners::linear::PeftLinear) -> Result<()>) -> Result<()> {
        let groups = self.tie_groups();
        let mut lins = self.base.named_layers_mut();
        let index: HashMap<String, usize> = lins.iter().enumerate().map(|(i, (m, _))| (m.clone(), i)).collect();
        for i in 0..lins.len() {
            let before = lins[i].1.weight.id();
            edit(&mut *lins[i].1)?;
            if lins[i].1.weight.id() == before {
                continue;
            }
            if let Some(group) = groups.iter().find(|g| g.contains(&lins[i].0)) {
                let to: Vec<usize> = group.iter().filter_map(|m| index.get(m)).copied().filter(|&j| j != i).collect();
                share_table(&mut lins, i, &to);
            }
        }
        Ok(())
    }

    /// The modules that hold one table (HF's tied parameters: a causal LM's `lm_head` built from
    /// the input embedding's weight, T5's `shared` with both stacks' `embed_tokens` and its tied
    /// `lm_head`), as groups of module paths in module order, each led by an embedding-kind
    /// module: every linear whose weight is that embedding's very tensor, or the same kept
    /// quantized weight, or (with `tie_word_embeddings`) a head kept quantized from the
    /// embedding's own table: a GGUF's tied `token_embd` under `quantization: 'keep'` gives the
    /// head a quantized copy of the table and the embedding a dequantized one (llama.cpp's
    /// split), where HF holds one `Parameter`. The one tie rule of merging, unmerging and
    /// loading a saved table.
    pub fn tie_groups(&self) -> Vec<Vec<String>> {
        let lins = self.base.named_layers();
        let tied_cfg = self.base.config_json()["tie_word_embeddings"].as_bool() == Some(true);
        let same = |e: &crate::tuners::linear::PeftLinear, b: &crate::tuners::linear::PeftLinear| {
            e.weight.id() == b.weight.id()
                || matches!((&e.quant, &b.quant), (Some(x), Some(y)) if std::sync::Arc::ptr_eq(x, y))
                || (tied_cfg && !b.is_embedding && b.quant.as_ref().is_some_and(|q| e.weight.dims() == [q.rows(), q.cols()]))
        };
        let mut groups: Vec<Vec<String>> = Vec::new();
        for (e, el) in lins.iter().filter(|(_, l)| l.is_embedding) {
            if groups.iter().any(|g| g.contains(e)) {
                continue;
            }
            let group: Vec<String> = lins.iter().filter(|(_, l)| same(el, l)).map(|(m, _)| m.clone()).collect();
            if group.len() > 1 {
                groups.push(group);
            }
        }
        groups
    }

    /// Points every other module of the tie group of each module in `loaded` at that module's
    /// current table (a module that was kept quantized drops its quantized copy); `groups` come
    /// from [`Self::tie_groups`] before the tables were replaced (loading a saved embedding
    /// table: HF's non-strict `load_state_dict` copies it into the one tied `Parameter`).
    /// Modules of `loaded` keep their own table.
    pub(super) fn retie_tables(&mut self, groups: &[Vec<String>], loaded: &[String]) {
        let mut lins = self.base.named_layers_mut();
        for m in loaded {
            let Some(group) = groups.iter().find(|g| g.contains(m)) else { continue };
            let Some(from) = lins.iter().position(|(n, _)| n == m) else { continue };
            let to: Vec<usize> = lins.iter().enumerate().filter(|(_, (n, _))| group.contains(n) && !loaded.contains(n)).map(|(j, _)| j).collect();
            share_table(&mut lins, from, &to);
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
        for (_, lin) in self.base.named_layers_mut() {
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
        self.grad_flags = GradFlags::default();
        self.disabled = false;
    }

    /// Remove adapter `name` (HF `delete_adapter`). Refused while it is merged.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.peft_config(name)?;
        if self.merged_adapters().iter().any(|m| m == name) {
            return Err(PeftError::InvalidState(format!("adapter `{name}` is merged; unmerge it before deleting it")));
        }
        for (_, lin) in self.base.named_layers_mut() {
            lin.remove_adapter(name);
        }
        for (_, host) in self.base.named_attention_prompts_mut() {
            host.adapters.remove(name);
        }
        self.prompt_encoders.remove(name);
        self.configs.retain(|(n, _)| n != name);
        self.grad_flags.layers.remove(name);
        self.grad_flags.copies.remove(name);
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
        for (_, lin) in self.base.named_layers_mut() {
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
        for (path, lin) in self.base.named_layers_mut() {
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
        for (path, lin) in self.base.named_layers_mut() {
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

/// Points the modules at `to` (indices into `lins`) at the table of module `from`, as one tied
/// `Parameter` (a module that was kept quantized drops its quantized copy).
fn share_table(lins: &mut [(String, &mut crate::tuners::linear::PeftLinear)], from: usize, to: &[usize]) {
    let w = lins[from].1.weight.clone();
    for &j in to {
        lins[j].1.weight = w.clone();
        lins[j].1.quant = None;
    }
}
