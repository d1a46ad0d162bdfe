//! The base-model biases an adapter trains and saves (HF `BaseTuner`'s generic `bias` handling:
//! `_mark_only_adapters_as_trainable` and `_get_learnable_bias_state_dict`). Every tuner whose
//! config has a `bias` field gets it from here (LoRA's `"lora_only"`, VeRA's `"vera_only"`, any
//! `"<method>_only"` alike, as HF reads `getattr(config, "bias", "none")`); no tuner is named.

use super::*;

/// Which base biases an adapter trains and saves (HF config field `bias`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BiasMode {
    /// `"none"` (or no `bias` field): no base bias.
    None,
    /// `"all"`: every bias of the model, adapted layers' as `<m>.base_layer.bias`, the others
    /// (linears, LayerNorms) at their plain paths.
    All,
    /// `"<method>_only"` (`"lora_only"`, `"vera_only"`): the biases of the adapted layers.
    AdaptedOnly,
}

impl BiasMode {
    /// The mode of `cfg` (HF `getattr(config, "bias", "none")`, `bias.endswith("_only")`).
    pub(crate) fn of(cfg: &AdapterConfig) -> BiasMode {
        match cfg.common().bias().as_deref() {
            None | Some("none") => BiasMode::None,
            Some("all") => BiasMode::All,
            Some(b) if b.ends_with("_only") => BiasMode::AdaptedOnly,
            Some(_) => BiasMode::None,
        }
    }
}

impl PeftModel {
    /// The bias mode of adapter `name` ([`BiasMode::None`] for an unknown name).
    pub(crate) fn bias_mode(&self, name: &str) -> BiasMode {
        self.peft_config(name).map(BiasMode::of).unwrap_or(BiasMode::None)
    }

    /// The base biases mode `mode` trains and saves, as `(on-disk key, bias)`: the biases of
    /// adapted layers as `base_model.model.<module>.base_layer.bias`; with [`BiasMode::All`] also
    /// every other bias of the model at its plain path (`base_model.model.transformer.h.0.ln_1.bias`).
    /// Layers wrapped by `modules_to_save` are left out (their copies are saved as such).
    pub(crate) fn bias_entries(&self, mode: BiasMode) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        if mode == BiasMode::None {
            return out;
        }
        for (m, lin) in self.base.named_layers() {
            let Some(b) = &lin.bias else { continue };
            if !lin.saved_copies.is_empty() {
                continue;
            }
            if lin.has_adapters() {
                out.push((format!("{KEY_PREFIX}{m}.base_layer.bias"), b.clone()));
            } else if mode == BiasMode::All {
                out.push((format!("{KEY_PREFIX}{m}.bias"), b.clone()));
            }
        }
        if mode == BiasMode::All {
            for (m, b) in self.base.named_norm_biases() {
                out.push((format!("{KEY_PREFIX}{m}.bias"), b.clone()));
            }
        }
        out
    }

    /// The bias tensors adapter `name`'s state dict holds (detached): [`Self::bias_entries`]
    /// and, with `bias="all"`, the biases of `modules_to_save` wrappers: HF keeps every
    /// state-dict key holding "bias", so a wrapper contributes its frozen original's bias
    /// (`<m>.original_module.bias`) and each copy's bias under the wrapper's own key
    /// (`<m>.modules_to_save.<adapter>.bias`, the saved adapter's name removed). HF loads the
    /// first back into the base and reports the second as unexpected; both are written so files
    /// stay byte-identical.
    pub(crate) fn bias_state_dict(&self, name: &str) -> Vec<(String, Tensor)> {
        let mode = self.bias_mode(name);
        let mut out: Vec<(String, Tensor)> = self.bias_entries(mode).into_iter().map(|(k, b)| (k, b.detach())).collect();
        if mode != BiasMode::All {
            return out;
        }
        for (m, lin) in self.base.named_layers() {
            if lin.saved_copies.is_empty() {
                continue;
            }
            if let Some(b) = &lin.bias {
                out.push((format!("{KEY_PREFIX}{m}.original_module.bias"), b.detach()));
            }
            for (n, (_, b)) in &lin.saved_copies {
                if let Some(b) = b {
                    let slot = if n == name { "modules_to_save".to_string() } else { format!("modules_to_save.{n}") };
                    out.push((format!("{KEY_PREFIX}{m}.{slot}.bias"), b.as_tensor().detach()));
                }
            }
        }
        out
    }

    /// Turn the biases [`Self::bias_entries`] names into trainable variables (in place: the layers
    /// use the variable's tensor, so optimizer updates reach the forward pass).
    pub(crate) fn make_biases_trainable(&mut self, mode: BiasMode) -> Result<()> {
        if mode == BiasMode::None {
            return Ok(());
        }
        let to_var = |t: &mut Tensor| -> Result<()> {
            if !t.is_variable() {
                *t = Var::from_tensor(t)?.as_tensor().clone();
            }
            Ok(())
        };
        for (_, lin) in self.base.named_layers_mut() {
            if !lin.saved_copies.is_empty() || (mode == BiasMode::AdaptedOnly && !lin.has_adapters()) {
                continue;
            }
            if let Some(b) = lin.bias.as_mut() {
                to_var(b)?;
            }
        }
        if mode == BiasMode::All {
            for (_, b) in self.base.named_norm_biases_mut() {
                to_var(b)?;
            }
        }
        Ok(())
    }
}
