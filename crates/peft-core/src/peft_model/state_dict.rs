//! Adapter parameters: trainable sets, counts and the state dict under HF's keys (HF `get_peft_model_state_dict`, `get_nb_trainable_parameters`).

use super::*;

impl PeftModel {
    /// Adapter parameters that training updates: those of the active adapters that require
    /// gradients ([`Self::requires_grad`]: by default, not in inference mode), as `(key as
    /// saved on disk, Var)`.
    pub fn trainable_parameters(&self) -> Vec<(String, Var)> {
        self.trainable_parameters_by_adapter().into_iter().flat_map(|(_, v)| v).collect()
    }

    /// [`Self::trainable_parameters`] grouped by adapter name (active adapters in order).
    pub fn trainable_parameters_by_adapter(&self) -> Vec<(String, Vec<(String, Var)>)> {
        self.trainable_parameters_of(&self.active)
    }

    /// The parameters training would update for each of `names` if they were the active
    /// adapters (unknown names give nothing; each [`GradPart`] counts when
    /// [`Self::set_requires_grad`] enabled it, or by default when the adapter is not in
    /// inference mode), grouped by adapter.
    pub fn trainable_parameters_of(&self, names: &[String]) -> Vec<(String, Vec<(String, Var)>)> {
        let mut groups = Vec::new();
        for name in names {
            if self.peft_config(name).is_err() {
                continue;
            }
            let out: Vec<(String, Var)> = self.adapter_param_parts(name).into_iter().filter(|(part, _, _)| self.grad_flag(name, *part, true)).map(|(_, k, v)| (k, v)).collect();
            if !out.is_empty() {
                groups.push((name.clone(), out));
            }
        }
        groups
    }

    /// Every trainable-kind parameter of adapter `name`, whatever its flags, each with its
    /// [`GradPart`]: the tuner layers' (or the prompt encoder's), LoRA's bias entries and the
    /// adaption prompts' are `Layers`, the modules_to_save copies `Copies`. Keys as saved on
    /// disk, in the order training has always used (bias entries, then module by module).
    pub fn adapter_param_parts(&self, name: &str) -> Vec<(GradPart, String, Var)> {
        let mut out = Vec::new();
        if let Some(enc) = self.prompt_encoders.get(name) {
            // (prompt learning keys its modules_to_save copies as HF's prompt-learning state dict)
            out.extend(enc.vars().into_iter().map(|(p, v)| (GradPart::Layers, format!("prompt_encoder.{name}.{p}"), v)));
            for (m, lin) in self.base.named_layers() {
                if let Some((w, b)) = lin.saved_copies.get(name) {
                    out.push((GradPart::Copies, format!("base_model.{m}.weight"), w.clone()));
                    out.extend(b.iter().map(|b| (GradPart::Copies, format!("base_model.{m}.bias"), b.clone())));
                }
            }
            return out;
        }
        for (k, b) in self.bias_entries(self.bias_mode(name)) {
            if b.is_variable() {
                if let Ok(v) = Var::from_tensor(&b) {
                    out.push((GradPart::Layers, k, v));
                }
            }
        }
        for (m, lin) in self.base.named_layers() {
            for (slot, v) in lin.adapter_params(name) {
                out.push((GradPart::Layers, format!("{KEY_PREFIX}{}", slot.disk_key(&m)), v.clone()));
            }
            for (p, v) in lin.saved_copy_params(name) {
                out.push((GradPart::Copies, format!("{KEY_PREFIX}{m}.{p}"), v.clone()));
            }
        }
        for (m, host) in self.base.named_attention_prompts() {
            for (p, v) in host.adapters.get(name).map(|a| a.params()).into_iter().flatten() {
                out.push((GradPart::Layers, format!("{KEY_PREFIX}{m}.{p}"), v.clone()));
            }
        }
        out
    }

    /// `requires_grad` of adapter `name`'s `part` if the adapter were active (`active`) or not:
    /// what [`Self::set_requires_grad`] set since the last `set_adapter`, else HF's default,
    /// `active` and not in inference mode.
    fn grad_flag(&self, name: &str, part: GradPart, active: bool) -> bool {
        match self.grad_flags.part(part).get(name) {
            Some(&on) => on,
            None => active && self.peft_config(name).map(|c| !c.inference_mode()).unwrap_or(false),
        }
    }

    /// HF's `requires_grad` of adapter `name`'s parameters of `part`, as `get_layer_status`
    /// reports it: set by [`Self::set_requires_grad`] since the last `set_adapter`, else `true`
    /// for an active adapter that is not in inference mode.
    pub fn requires_grad(&self, name: &str, part: GradPart) -> bool {
        self.grad_flag(name, part, self.active.iter().any(|a| a == name))
    }

    /// HF `set_requires_grad(adapter_names, requires_grad)`: enable or disable gradients of the
    /// given adapters' parameters (tuner layers and modules_to_save copies) until the next
    /// `set_adapter`, which resets every tuner layer and the copies of the adapters it
    /// deactivates or activates (HF `ModulesToSaveWrapper.set_adapter`; other copies keep their
    /// flag). Training updates the active adapters that require gradients; an inactive adapter
    /// counts as trainable in [`Self::nb_trainable_parameters`] but is not used by the forward.
    ///
    /// Errors: `AdapterNotFound` for an unknown name (HF ignores it); `InvalidState` for
    /// prompt-learning and adaption-prompt adapters (HF: a `TypeError`, and no such method).
    pub fn set_requires_grad(&mut self, names: &[String], requires_grad: bool) -> Result<()> {
        self.check_allowed(Operation::SetRequiresGrad, names)?;
        for n in names {
            self.grad_flags.layers.insert(n.clone(), requires_grad);
            self.grad_flags.copies.insert(n.clone(), requires_grad);
        }
        Ok(())
    }

    /// The flags [`Self::set_requires_grad`] set that are still in force, per [`GradPart`]:
    /// `(adapter, requires_grad)` sorted by name (adapters without one follow the default).
    pub fn grad_flags(&self, part: GradPart) -> Vec<(String, bool)> {
        self.grad_flags.part(part).iter().map(|(n, &b)| (n.clone(), b)).collect()
    }

    /// `(trainable, all)` parameter counts as HF `get_nb_trainable_parameters` reports them:
    /// trainable counts every adapter part that requires gradients ([`Self::requires_grad`]).
    pub fn nb_trainable_parameters(&self) -> (usize, usize) {
        let trainable: usize = self
            .configs
            .iter()
            .flat_map(|(n, _)| self.adapter_param_parts(n).into_iter().filter(|(part, _, _)| self.requires_grad(n, *part)))
            .map(|(_, _, v)| v.elem_count())
            .sum();
        let adapters: usize = self.base.named_layers().iter().flat_map(|(_, l)| l.all_adapter_vars()).map(|v| v.elem_count()).sum::<usize>()
            + self.base.named_layers().iter().flat_map(|(_, l)| l.layers.values()).map(|l| l.frozen_param_count()).sum::<usize>();
        let prompts: usize = self.prompt_encoders.values().map(|e| e.param_count()).sum();
        let attention: usize = self.base.named_attention_prompts().iter().flat_map(|(_, h)| h.all_vars()).map(|v| v.elem_count()).sum();
        (trainable, self.base.base_param_count() + adapters + prompts + attention)
    }

    /// The base embedding layers saved with adapter `name` (HF `get_peft_model_state_dict`'s
    /// `save_embedding_layers`): with `Auto`, only when the config's `target_modules` names an
    /// embedding layer (`embed_tokens` / `lm_head`, HF's `EMBEDDING_LAYER_NAMES`) and the adapter
    /// does not use trainable tokens. When targeted, each of the input and output embeddings that
    /// carries adapters of any tuner (HF `has_valid_embedding_base_layer`) is saved as
    /// `<module>.base_layer.weight`; with `Yes` and no targeted embedding, both are saved as
    /// `<module>.weight` (the input embedding `model.embed_tokens` / `transformer.wte`, and
    /// `lm_head` on causal LMs). Weights are the unmerged base weights, in the base dtype.
    ///
    /// Errors: `AdapterNotFound`.
    pub fn embedding_layers_to_save(&self, name: &str, mode: SaveEmbeddingLayers) -> Result<Vec<(String, Tensor)>> {
        let cfg = self.peft_config(name)?;
        let targets = cfg.common().target_modules().cloned();
        let names = ["embed_tokens", "lm_head"];
        let targeted = match &targets {
            Some(crate::tuners::lora::TargetModules::List(l)) => names.iter().any(|n| l.iter().any(|x| x == n)),
            Some(crate::tuners::lora::TargetModules::Regex(r)) => {
                let re = regex::Regex::new(&format!("^(?:{r})$")).ok();
                self.base.named_layers().iter().any(|(m, _)| {
                    names.iter().any(|n| m == n || m.ends_with(&format!(".{n}"))) && re.as_ref().map(|re| re.is_match(m)).unwrap_or(false)
                })
            }
            _ => false,
        };
        // HF: `using_trainable_tokens` leaves `auto` to its vocabulary-resize check (false here).
        let uses_tt = cfg.peft_type() == "TRAINABLE_TOKENS" || !cfg.to_json()["trainable_token_indices"].is_null();
        let save = match mode {
            SaveEmbeddingLayers::No => false,
            SaveEmbeddingLayers::Yes => true,
            SaveEmbeddingLayers::Auto => targeted && !uses_tt,
        };
        let mut out = Vec::new();
        if !save {
            return Ok(out);
        }
        // HF looks at `get_input_embeddings()` (the first embedding: T5's `shared`, not the
        // stacks' `embed_tokens` tied to it) and `get_output_embeddings()`.
        let input = crate::tuners::trainable_tokens::input_embedding_name(self);
        for (m, lin) in self.base.named_layers() {
            let is_output = m == "lm_head" && self.base.task() == Task::CausalLm;
            if !(Some(&m) == input.as_ref() || is_output) {
                continue;
            }
            let w = self.unmerged_base_weight(lin)?;
            if targeted {
                if lin.has_adapters() {
                    out.push((format!("{KEY_PREFIX}{m}.base_layer.weight"), w));
                }
            } else {
                out.push((format!("{KEY_PREFIX}{m}.weight"), w));
            }
        }
        Ok(out)
    }

    /// A layer's base weight without any merged LoRA delta, in the base dtype and layout.
    pub(crate) fn unmerged_base_weight(&self, lin: &crate::tuners::linear::PeftLinear) -> Result<Tensor> {
        let mut w = lin.dense_weight()?.to_dtype(DType::F32)?;
        for n in &lin.merged {
            if lin.lora(n).is_some() {
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
            for (m, lin) in self.base.named_layers() {
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
        out.extend(self.bias_state_dict(name));
        for (m, lin) in self.base.named_layers() {
            for (slot, v) in lin.adapter_params(name) {
                out.push((format!("{KEY_PREFIX}{}", slot.disk_key(&m)), v.as_tensor().detach()));
            }
            for (p, v) in lin.saved_copy_params(name) {
                out.push((format!("{KEY_PREFIX}{m}.{p}"), v.as_tensor().detach()));
            }
        }
        for (m, host) in self.base.named_attention_prompts() {
            for (p, v) in host.adapters.get(name).map(|a| a.params()).into_iter().flatten() {
                out.push((format!("{KEY_PREFIX}{m}.{p}"), v.as_tensor().detach()));
            }
        }
        let cfg = self.peft_config(name)?;
        out.extend(cfg.tuner().shared_state_dict(self, name, cfg)?);
        cfg.tuner().finish_state_dict(self, name, cfg, &mut out)?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Store adapter `name`'s weights in `dtype` (HF `_cast_adapter_dtype` with autocast off).
    pub(crate) fn cast_adapter(&mut self, name: &str, dtype: DType) -> Result<()> {
        for (_, lin) in self.base.named_layers_mut() {
            let cast: Vec<_> = lin.adapter_params(name).into_iter().map(|(s, v)| Ok((s, Var::from_tensor(&v.as_tensor().to_dtype(dtype)?)?))).collect::<Result<_>>()?;
            for (slot, v) in cast {
                lin.set_adapter_param(name, &slot, v)?;
            }
        }
        for (_, host) in self.base.named_attention_prompts_mut() {
            if let Some(a) = host.adapters.get_mut(name) {
                a.prompt = Var::from_tensor(&a.prompt.as_tensor().to_dtype(dtype)?)?;
                a.gate = Var::from_tensor(&a.gate.as_tensor().to_dtype(dtype)?)?;
            }
        }
        Ok(())
    }
}
