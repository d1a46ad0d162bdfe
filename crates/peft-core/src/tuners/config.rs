//! `AdapterConfig`: any adapter config this crate can load, dispatched on HF's `peft_type`.

use super::ia3::Ia3Config;
use super::lora::LoraConfig;
use super::prompt::PromptLearningConfig;
use crate::error::{PeftError, Result};
use serde_json::Value;
use std::path::Path;

/// One adapter's config: LoRA or a prompt-learning method (HF `PeftConfig` subclasses).
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterConfig {
    Lora(LoraConfig),
    Ia3(Ia3Config),
    Prompt(PromptLearningConfig),
}

impl From<Ia3Config> for AdapterConfig {
    fn from(c: Ia3Config) -> Self {
        AdapterConfig::Ia3(c)
    }
}

impl From<LoraConfig> for AdapterConfig {
    fn from(c: LoraConfig) -> Self {
        AdapterConfig::Lora(c)
    }
}

impl From<PromptLearningConfig> for AdapterConfig {
    fn from(c: PromptLearningConfig) -> Self {
        AdapterConfig::Prompt(c)
    }
}

/// The `peft_type` values this crate loads.
pub const SUPPORTED_PEFT_TYPES: &[&str] = &["LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"];

impl AdapterConfig {
    /// Parse an adapter_config.json object, choosing the config class by `peft_type`.
    ///
    /// Errors: `InvalidAdapterConfig` naming the field at fault; an unknown or unsupported
    /// `peft_type` lists the supported ones.
    pub fn from_json(v: &Value, path: Option<&Path>) -> Result<Self> {
        let bad = |msg: String| PeftError::InvalidAdapterConfig { path: path.map(|p| p.to_path_buf()), msg };
        let obj = v.as_object().ok_or_else(|| bad("the top level must be a JSON object".into()))?;
        match obj.get("peft_type").and_then(|t| t.as_str()) {
            Some("LORA") => Ok(AdapterConfig::Lora(LoraConfig::from_json(v, path)?)),
            Some("IA3") => Ok(AdapterConfig::Ia3(Ia3Config::from_json(v, path)?)),
            Some("PREFIX_TUNING" | "PROMPT_TUNING" | "P_TUNING" | "MULTITASK_PROMPT_TUNING") => {
                Ok(AdapterConfig::Prompt(PromptLearningConfig::from_json(v, path)?))
            }
            other => Err(bad(format!("`peft_type` {other:?} is not supported (supported: {SUPPORTED_PEFT_TYPES:?})"))),
        }
    }

    /// Parse an adapter_config.json file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| PeftError::InvalidAdapterConfig { path: Some(path.to_path_buf()), msg: format!("not valid JSON: {e}") })?;
        Self::from_json(&v, Some(path))
    }

    /// HF's `peft_type` string.
    pub fn peft_type(&self) -> &'static str {
        match self {
            AdapterConfig::Lora(_) => "LORA",
            AdapterConfig::Ia3(_) => "IA3",
            AdapterConfig::Prompt(p) => p.method.as_str(),
        }
    }

    /// HF `is_prompt_learning`.
    pub fn is_prompt_learning(&self) -> bool {
        matches!(self, AdapterConfig::Prompt(_))
    }

    pub fn as_lora(&self) -> Option<&LoraConfig> {
        match self {
            AdapterConfig::Lora(c) => Some(c),
            _ => None,
        }
    }

    pub fn as_ia3(&self) -> Option<&Ia3Config> {
        match self {
            AdapterConfig::Ia3(c) => Some(c),
            _ => None,
        }
    }

    /// The head `task_type` names (`None` when unset or unknown).
    pub fn task(&self) -> Option<crate::model::Task> {
        let t = match self {
            AdapterConfig::Lora(c) => c.task_type.as_deref(),
            AdapterConfig::Ia3(c) => c.task_type.as_deref(),
            AdapterConfig::Prompt(c) => c.task_type.as_deref(),
        };
        t.and_then(crate::model::Task::from_task_type)
    }

    /// HF `PeftModelForSequenceClassification` / `...TokenClassification` /
    /// `...QuestionAnswering`: append the task's head modules (`classifier`, `score` /
    /// `qa_outputs`, see [`crate::model::Task::head_modules`]) to `modules_to_save` (created when
    /// `None`), each once. Other task types leave the config unchanged.
    pub fn add_task_head_modules(&mut self) {
        let Some(task) = self.task() else { return };
        let names = task.head_modules();
        if names.is_empty() {
            return;
        }
        let extend = |list: &mut Vec<String>| {
            for n in names {
                if !list.iter().any(|x| x == n) {
                    list.push(n.to_string());
                }
            }
        };
        match self {
            AdapterConfig::Lora(c) => extend(c.modules_to_save.get_or_insert_with(Vec::new)),
            AdapterConfig::Ia3(c) => extend(c.modules_to_save.get_or_insert_with(Vec::new)),
            AdapterConfig::Prompt(c) => {
                let mut list = c.modules_to_save().unwrap_or_default();
                extend(&mut list);
                c.set_modules_to_save(Some(list));
            }
        }
    }

    /// `modules_to_save` of the config (any PEFT type).
    pub fn modules_to_save(&self) -> Vec<String> {
        match self {
            AdapterConfig::Lora(c) => c.modules_to_save.clone().unwrap_or_default(),
            AdapterConfig::Ia3(c) => c.modules_to_save.clone().unwrap_or_default(),
            AdapterConfig::Prompt(c) => c.modules_to_save().unwrap_or_default(),
        }
    }

    pub fn as_prompt(&self) -> Option<&PromptLearningConfig> {
        match self {
            AdapterConfig::Prompt(c) => Some(c),
            _ => None,
        }
    }

    pub fn inference_mode(&self) -> bool {
        match self {
            AdapterConfig::Lora(c) => c.inference_mode,
            AdapterConfig::Ia3(c) => c.inference_mode,
            AdapterConfig::Prompt(c) => c.inference_mode,
        }
    }

    pub fn set_inference_mode(&mut self, on: bool) {
        match self {
            AdapterConfig::Lora(c) => c.inference_mode = on,
            AdapterConfig::Ia3(c) => c.inference_mode = on,
            AdapterConfig::Prompt(c) => c.inference_mode = on,
        }
    }

    pub fn base_model_name_or_path(&self) -> Option<&str> {
        match self {
            AdapterConfig::Lora(c) => c.base_model_name_or_path.as_deref(),
            AdapterConfig::Ia3(c) => c.base_model_name_or_path.as_deref(),
            AdapterConfig::Prompt(c) => c.base_model_name_or_path.as_deref(),
        }
    }

    pub fn set_base_model_name_or_path(&mut self, v: Option<String>) {
        match self {
            AdapterConfig::Lora(c) => c.base_model_name_or_path = v,
            AdapterConfig::Ia3(c) => c.base_model_name_or_path = v,
            AdapterConfig::Prompt(c) => c.base_model_name_or_path = v,
        }
    }

    /// Fields of the source JSON that HF's config class does not have.
    pub fn unknown_fields(&self) -> &[String] {
        match self {
            AdapterConfig::Lora(c) => c.unknown_fields(),
            AdapterConfig::Ia3(c) => c.unknown_fields(),
            AdapterConfig::Prompt(c) => c.unknown_fields(),
        }
    }

    /// The config as HF's adapter_config.json object.
    pub fn to_json(&self) -> Value {
        match self {
            AdapterConfig::Lora(c) => c.to_json(),
            AdapterConfig::Ia3(c) => c.to_json(),
            AdapterConfig::Prompt(c) => c.to_json(),
        }
    }

    /// `adapter_config.json` text exactly as HF writes it.
    pub fn to_json_string(&self) -> String {
        crate::io::python_json_dumps(&self.to_json())
    }
}
