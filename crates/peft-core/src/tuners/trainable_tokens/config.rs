//! `TrainableTokensConfig`: HF PEFT 0.21's trainable-tokens config
//! (`peft.tuners.trainable_tokens.config.TrainableTokensConfig`). Only the embedding rows listed
//! in `token_indices` are trained and saved (`trainable_tokens_delta` `[len(token_indices), dim]`
//! per targeted layer); see [`super::layer`] for the forward and merge.

use crate::error::Result;
use crate::targeting::{targets_to_json, TargetModules};
use crate::tuners::config::{PeftCommon, RawConfig};
use serde_json::{json, Map, Value};
use std::path::Path;

/// HF PEFT 0.21 defaults of every `TrainableTokensConfig` field, as written to adapter_config.json.
pub fn hf_trainable_tokens_defaults() -> Map<String, Value> {
    crate::tuners::config::json_object(json!({
        "auto_mapping": null, "base_model_name_or_path": null, "inference_mode": false, "init_weights": true,
        "peft_type": "TRAINABLE_TOKENS", "peft_version": "0.21.0", "revision": null, "target_modules": null,
        "task_type": null, "token_indices": []
    }))
}

/// HF PEFT's `TrainableTokensConfig`. See the module docs.
#[derive(Debug, Clone)]
pub struct TrainableTokensConfig {
    /// The rows (token ids) to train, in this order (the rows of `trainable_tokens_delta`).
    pub token_indices: Vec<i64>,
    /// The layers to wrap; `None` (HF's default) resolves, when the adapter is added, to the
    /// model's input embedding (`model.embed_tokens`, `transformer.wte`, ...), which is what HF
    /// then writes.
    pub target_modules: Option<TargetModules>,
    /// `true` (HF's default): the trainable rows start as the embedding's rows (a no-op);
    /// `false`: N(0, 1).
    pub init_weights: bool,
    /// The fields every config has (`task_type`, ...; `cfg.field` reads them through `Deref`).
    pub common: PeftCommon,
}

crate::tuners::config::impl_deref_common!(TrainableTokensConfig => PeftCommon; eq_by_json);

impl TrainableTokensConfig {
    /// Build from an adapter_config.json object (missing fields take HF's defaults).
    ///
    /// Errors: `InvalidAdapterConfig` naming the field: `token_indices` not a list of
    /// non-negative integers, `target_modules` not a string or a list of strings, booleans of
    /// another type.
    pub fn from_json(v: &Value, path: Option<&Path>) -> Result<Self> {
        let rc = RawConfig::parse(v, path, hf_trainable_tokens_defaults(), &["TRAINABLE_TOKENS"], "a TrainableTokensConfig")?;
        let token_indices = parse_token_indices(&rc.raw["token_indices"]).map_err(|m| rc.bad(m))?;
        let target_modules = rc.targets("target_modules")?;
        Ok(TrainableTokensConfig {
            token_indices,
            target_modules,
            init_weights: rc.bool("init_weights")?,
            common: PeftCommon::parse(&rc)?,
        })
    }

    /// The config as HF's adapter_config.json object (keys sorted, as HF writes them).
    pub fn to_json(&self) -> Value {
        self.common.to_json_with(|m| {
            m.insert("token_indices".into(), Value::from(self.token_indices.clone()));
            m.insert("target_modules".into(), targets_to_json(&self.target_modules));
            m.insert("init_weights".into(), Value::Bool(self.init_weights));
        })
    }
}

/// `token_indices` (a JSON list of non-negative integers).
pub(crate) fn parse_token_indices(v: &Value) -> std::result::Result<Vec<i64>, String> {
    let bad = || format!("`token_indices` must be a list of non-negative integers (token ids), found {v}");
    v.as_array().ok_or_else(bad)?.iter().map(|x| x.as_i64().filter(|i| *i >= 0).ok_or_else(bad)).collect()
}

crate::tuners::config::impl_tuner_config!(@impl [] TrainableTokensConfig, |_c| "TRAINABLE_TOKENS", false,
    fn modules_to_save(&self) -> Option<Vec<String>> {
        None
    }
    fn set_modules_to_save(&mut self, _v: Option<Vec<String>>) {}
    fn target_modules(&self) -> Option<&crate::targeting::TargetModules> {
        self.target_modules.as_ref()
    }
    fn unknown_fields(&self) -> &[String] {
        self.common.unknown_fields()
    }
);
