//! Trainable-tokens injection (HF `TrainableTokensModel._prepare_adapter_config`,
//! `inject_adapter` with its weight-tying pass, `_create_and_replace`,
//! `TrainableTokensLayer.update_layer`).

use super::layer::{original_rows, TrainableTokensLayer, TRAINABLE_TOKENS_DELTA};
use super::TrainableTokensConfig;
use crate::error::{PeftError, Result};
use crate::peft_model::{is_output_head, PeftModel};
use crate::targeting::{Rule, Selection, TargetModules};
use crate::tuners::layer::{AdapterLayer, Slot};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;

/// The input embedding's module path (HF `_get_input_embeddings_name`): the model's first
/// embedding table (`model.embed_tokens`, `transformer.wte`, ...).
pub(crate) fn input_embedding_name(model: &PeftModel) -> Option<String> {
    model.base.named_layers().into_iter().find(|(_, l)| l.is_embedding).map(|(m, _)| m)
}

/// The modules tied to the input embedding (HF `_get_module_names_tied_with_embedding`, see
/// [`crate::model::BaseModel::tied_to_input_embedding`]): a tied `lm_head`; on T5 also
/// `encoder.embed_tokens` and `decoder.embed_tokens`.
pub(crate) fn tied_modules(model: &PeftModel) -> Vec<String> {
    model.base.tied_to_input_embedding()
}

/// A new trainable-tokens layer on module `m` of `model` (HF `update_layer`): `delta` starts as
/// the base rows (`init_weights`) or N(0, 1) from `rng`.
pub(crate) fn new_layer(model: &PeftModel, m: &str, indices: &[i64], init_weights: bool, slot: Slot, mixed_batch: bool, rng: &mut rand::rngs::StdRng) -> Result<TrainableTokensLayer> {
    let lins = model.base.named_layers();
    let lin = lins.iter().find(|(n, _)| n == m).map(|(_, l)| *l).ok_or_else(|| PeftError::Internal(format!("no module `{m}`")))?;
    let (rows, dim) = lin.weight.dims2()?;
    let idx = super::layer::checked_indices(indices, rows)?;
    let delta = if init_weights {
        original_rows(lin, &idx)?.to_dtype(DType::F32)?
    } else {
        let normal = Normal::new(0.0f32, 1.0).map_err(|e| PeftError::Internal(e.to_string()))?;
        let v: Vec<f32> = (0..idx.len() * dim).map(|_| normal.sample(rng)).collect();
        Tensor::from_vec(v, (idx.len(), dim), lin.weight.device())?
    };
    TrainableTokensLayer::new(lin, indices, Var::from_tensor(&delta)?, slot, mixed_batch)
}

/// Layers tied to the input embedding's layer `owner` (HF's weight-tying pass): one per module of
/// [`tied_modules`], replacing a layer the targeting put there.
pub(crate) fn tied_layers(model: &PeftModel, owner: &TrainableTokensLayer) -> Result<Vec<(String, TrainableTokensLayer)>> {
    let tied = tied_modules(model);
    let mut out = Vec::new();
    for (m, lin) in model.base.named_layers() {
        if tied.contains(&m) {
            out.push((m, TrainableTokensLayer::tied_to(owner, lin)?));
        }
    }
    Ok(out)
}

impl PeftModel {
    /// Inject a trainable-tokens adapter (HF `TrainableTokensModel`): one
    /// [`TrainableTokensLayer`] per targeted module (`target_modules` unset: the input
    /// embedding, whose name is then written to the config as HF does), plus a layer tied to the
    /// input embedding's on a tied `lm_head`.
    ///
    /// Errors (the model then unchanged): `InvalidAdapterConfig` for an index outside a target's
    /// table (HF's `IndexError` message, naming `token_indices`) or a GPT-2 `Conv1D` target;
    /// `NoTargetModules` (HF's message) when nothing matches.
    pub(crate) fn add_trainable_tokens(&mut self, name: &str, mut cfg: TrainableTokensConfig, seed: u64) -> Result<Vec<String>> {
        if cfg.base_model_name_or_path.is_none() {
            cfg.base_model_name_or_path = self.base.info().name_or_path.clone();
        }
        if cfg.target_modules.is_none() {
            let emb = input_embedding_name(self).unwrap_or_else(|| "embed_tokens".into());
            cfg.target_modules = Some(TargetModules::Regex(emb));
        }
        let targets = cfg.target_modules.clone().expect("resolved above");
        let rule = Rule { targets: &targets, exclude: None, layers: None, layers_pattern: None, saved: &[] };
        let mut misses = crate::targeting::Misses::default();
        let mut names = Vec::new();
        for (m, _) in self.base.named_layers() {
            let sel = rule.select(&m, is_output_head(self.base.task(), &m));
            if misses.note(&m, sel, None) && sel == Selection::Target {
                names.push(m);
            }
        }
        if names.is_empty() {
            return Err(self.no_targets(&cfg.to_json()["target_modules"], &misses, None, None));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut planned: HashMap<String, Box<dyn AdapterLayer>> = HashMap::new();
        let emb = input_embedding_name(self);
        let mut owner = None;
        for m in &names {
            let l = new_layer(self, m, &cfg.token_indices, cfg.init_weights, TRAINABLE_TOKENS_DELTA, false, &mut rng)?;
            if Some(m) == emb.as_ref() {
                owner = Some(l.clone());
            }
            planned.insert(m.clone(), Box::new(l));
        }
        if let Some(owner) = owner {
            for (m, l) in tied_layers(self, &owner)? {
                planned.insert(m, Box::new(l));
            }
        }
        self.install_planned(name, cfg.into(), planned, HashMap::new(), |lin, name, l| {
            lin.layers.insert(name, l);
        })
    }
}

impl PeftModel {
    /// LoRA's `trainable_token_indices` (HF `LoraModel` wrapping the embedding(s) in a
    /// `TrainableTokensWrapper`, `_set_trainable`): a trainable-tokens layer under the slot
    /// `token_adapter.trainable_tokens_delta` on the input embedding (list form) or on every
    /// module whose name ends with a key of the dict form, rows starting as the base rows; a tied
    /// `lm_head` follows the input embedding's layer (not saved, as in HF). Returns the planned
    /// layers by module; the caller installs them with the LoRA layers.
    ///
    /// Errors: `InvalidAdapterConfig` naming `trainable_token_indices` for a key that matches no
    /// module (HF's message), an index outside the table (HF's `IndexError` message), or a module
    /// that LoRA also targets (not supported here).
    pub(crate) fn plan_lora_trainable_tokens(&self, cfg: &crate::tuners::lora::LoraConfig, lora_targets: &[String], rng: &mut rand::rngs::StdRng) -> Result<HashMap<String, Box<dyn AdapterLayer>>> {
        let mut out: HashMap<String, Box<dyn AdapterLayer>> = HashMap::new();
        let Some(spec) = cfg.trainable_token_indices() else { return Ok(out) };
        let bad = |msg: String| PeftError::InvalidAdapterConfig { path: None, msg: format!("`trainable_token_indices`: {msg}") };
        let emb = input_embedding_name(self);
        let names: Vec<String> = self.base.named_layers().into_iter().map(|(m, _)| m).collect();
        let mut owner = None;
        for (key, ids) in spec {
            let matched: Vec<String> = if key.is_empty() { emb.clone().into_iter().collect() } else { names.iter().filter(|m| m.ends_with(&key)).cloned().collect() };
            if matched.is_empty() {
                let key = if key.is_empty() { "embed_tokens".to_string() } else { key };
                return Err(bad(format!("Target modules {{'{key}'}} not found in the base model. Please check the target modules and try again.")));
            }
            for m in matched {
                if lora_targets.contains(&m) {
                    return Err(bad(format!("`{m}` is also a LoRA target (`target_modules`); LoRA and trainable tokens on the same layer are not supported here")));
                }
                let l = new_layer(self, &m, &ids, true, super::layer::TOKEN_ADAPTER_DELTA, true, rng).map_err(|e| match e {
                    PeftError::InvalidAdapterConfig { msg, .. } => bad(msg.replace("`token_indices`: ", "")),
                    e => e,
                })?;
                if Some(&m) == emb.as_ref() {
                    owner = Some(l.clone());
                }
                out.insert(m, Box::new(l));
            }
        }
        if let Some(owner) = owner {
            for (m, l) in tied_layers(self, &owner)? {
                if lora_targets.contains(&m) {
                    return Err(bad(format!("`{m}` is tied to the input embedding and is also a LoRA target (`target_modules`); not supported here")));
                }
                out.insert(m, Box::new(l));
            }
        }
        Ok(out)
    }
}

/// LoRA's expected `token_adapter.trainable_tokens_delta` of module `m` (layer `lin`) for
/// `trainable_token_indices`, `(slot, [k, dim])` (loading checks the file's tensors with it).
pub(crate) fn lora_expected_tokens(cfg: &crate::tuners::lora::LoraConfig, m: &str, lin: &crate::tuners::linear::PeftLinear) -> Option<(Slot, Vec<usize>)> {
    let spec = cfg.trainable_token_indices()?;
    let (_, dim) = lin.weight.dims2().ok()?;
    spec.into_iter()
        .find(|(key, _)| if key.is_empty() { lin.is_embedding } else { m.ends_with(key.as_str()) })
        .map(|(_, ids)| (super::layer::TOKEN_ADAPTER_DELTA, vec![ids.len(), dim]))
}

/// The `token_adapter.trainable_tokens_delta` keys that [`lora_expected_tokens`] lists but no
/// layer holds: LoRA's list-form `trainable_token_indices` wraps only the input embedding (HF
/// `get_input_embeddings()`), so on T5 the other embedding modules (`encoder.embed_tokens`,
/// `decoder.embed_tokens`, tied to `shared`) get tied layers without a parameter and no key.
pub(crate) fn lora_unheld_token_keys(model: &PeftModel, cfg: &crate::tuners::config::AdapterConfig) -> Vec<String> {
    let Some(spec) = cfg.as_lora().and_then(|c| c.trainable_token_indices()) else { return vec![] };
    if !spec.iter().any(|(k, _)| k.is_empty()) {
        return vec![];
    }
    let input = input_embedding_name(model);
    model.base.named_layers().into_iter().filter(|(m, l)| l.is_embedding && Some(m) != input.as_ref()).map(|(m, _)| super::layer::TOKEN_ADAPTER_DELTA.disk_key(&m)).collect()
}
