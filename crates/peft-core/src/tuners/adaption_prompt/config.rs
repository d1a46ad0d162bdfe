//! `AdaptionPromptConfig`: HF PEFT 0.21's adaption prompt config
//! (`peft.tuners.adaption_prompt.config.AdaptionPromptConfig`; Zhang et al. 2023, "LLaMA-Adapter:
//! Efficient Fine-tuning of Language Models with Zero-init Attention"): `adapter_len` learned
//! prompt tokens and a zero-initialised gate in each of the top `adapter_layers` attention modules
//! (`target_modules`, HF's `"self_attn"` for the Llama family).

use crate::error::{PeftError, Result};
use crate::tuners::config::{PeftCommon, RawConfig};
use serde_json::{json, Map, Value};
use std::path::Path;

/// Largest accepted `adapter_len` (the prompt is `[1, adapter_len, hidden]` per layer).
pub const MAX_ADAPTER_LEN: usize = 1 << 14;

/// HF PEFT 0.21 defaults of every `AdaptionPromptConfig` field, as written to adapter_config.json.
pub fn hf_adaption_prompt_defaults() -> Map<String, Value> {
    crate::tuners::config::json_object(json!({
        "adapter_layers": null, "adapter_len": null, "auto_mapping": null, "base_model_name_or_path": null,
        "inference_mode": false, "peft_type": "ADAPTION_PROMPT", "peft_version": "0.21.0", "revision": null,
        "target_modules": null, "task_type": null
    }))
}

/// HF PEFT's `AdaptionPromptConfig`. See the module docs.
#[derive(Debug, Clone)]
pub struct AdaptionPromptConfig {
    /// Number of learned prompt tokens per adapted layer (`adaption_prompt` is
    /// `[1, adapter_len, hidden_size]`).
    pub adapter_len: usize,
    /// Number of adapted decoder layers, counted from the top (HF `parents[-adapter_layers:]`).
    pub adapter_layers: usize,
    /// The attention submodule that is wrapped; `None` until the adapter is added, when HF's
    /// `prepare_config` sets the model type's default (`"self_attn"`).
    pub target_modules: Option<String>,
    /// The fields every config has (`task_type`, ...; `cfg.field` reads them through `Deref`).
    pub common: PeftCommon,
}

crate::tuners::config::impl_deref_common!(AdaptionPromptConfig => PeftCommon; eq_by_json);

impl AdaptionPromptConfig {
    /// A config with HF's defaults and the two required sizes.
    ///
    /// Errors: as [`Self::from_json`].
    pub fn new(adapter_len: usize, adapter_layers: usize) -> Result<Self> {
        Self::from_json(&json!({"peft_type": "ADAPTION_PROMPT", "adapter_len": adapter_len, "adapter_layers": adapter_layers}), None)
    }

    /// Build from an adapter_config.json object (missing fields take HF's defaults).
    ///
    /// Errors: `InvalidAdapterConfig` naming the field: `adapter_len` that is not an integer in
    /// 1..=16384 or `adapter_layers` that is not a positive integer (HF accepts 0 and `None`
    /// and then fails or, for `adapter_layers = 0`, adapts every layer through `parents[-0:]`;
    /// both are refused here), a `target_modules` that is not a string, other wrong types.
    pub fn from_json(v: &Value, path: Option<&Path>) -> Result<Self> {
        let rc = RawConfig::parse(v, path, hf_adaption_prompt_defaults(), &["ADAPTION_PROMPT"], "an AdaptionPromptConfig")?;
        let size = |k: &str, opt: &str, max: usize| -> Result<usize> {
            match rc.raw[k].as_u64() {
                Some(n) if n >= 1 && n as usize <= max => Ok(n as usize),
                _ if rc.raw[k].is_null() => Err(rc.bad(format!("`{k}` (option `{opt}`) must be given: a positive integer"))),
                _ => Err(rc.bad(format!("`{k}` (option `{opt}`) must be an integer between 1 and {max}, found {}", rc.raw[k]))),
            }
        };
        let adapter_len = size("adapter_len", "adapterLen", MAX_ADAPTER_LEN)?;
        let adapter_layers = size("adapter_layers", "adapterLayers", 4096)?;
        let target_modules = match &rc.raw["target_modules"] {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => return Err(rc.bad(format!("`target_modules` (option `targetModules`) must be the name of the attention submodule (a string, \"self_attn\"), found {other}"))),
        };
        Ok(AdaptionPromptConfig { adapter_len, adapter_layers, target_modules, common: PeftCommon::parse(&rc)? })
    }

    /// The config as HF's adapter_config.json object (keys sorted, as HF's
    /// `json.dumps(sort_keys=True)` writes them).
    pub fn to_json(&self) -> Value {
        self.common.to_json_with(|m| {
            m.insert("adapter_len".into(), json!(self.adapter_len));
            m.insert("adapter_layers".into(), json!(self.adapter_layers));
            m.insert("target_modules".into(), self.target_modules.clone().map(Value::String).unwrap_or(Value::Null));
        })
    }
}

crate::tuners::config::impl_tuner_config!(@impl [] AdaptionPromptConfig, |_c| "ADAPTION_PROMPT", false,
    /// HF's `AdaptionPromptConfig` has no `modules_to_save`.
    fn modules_to_save(&self) -> Option<Vec<String>> {
        None
    }
    fn set_modules_to_save(&mut self, _v: Option<Vec<String>>) {}
    fn unknown_fields(&self) -> &[String] {
        self.common.unknown_fields()
    }
);

/// The `InvalidAdapterConfig` error of a config that does not fit the model.
pub(crate) fn misfit(msg: String) -> PeftError {
    PeftError::InvalidAdapterConfig { path: None, msg }
}
