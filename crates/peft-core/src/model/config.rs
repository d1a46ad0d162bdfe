//! Llama-family model configuration, read from a transformers `config.json`
//! (both the older layout with top-level `rope_theta` / `torch_dtype` and the
//! transformers-5 layout with `rope_parameters` / `dtype`) or filled from GGUF metadata.

use crate::error::{PeftError, Result};
use serde_json::Value;
use std::path::Path;

/// Architecture hyper-parameters of a Llama-family decoder (Llama, SmolLM2, Qwen2, Mistral).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `model_type` from config.json ("llama", "qwen2", "mistral").
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Size of one attention head (`head_dim`, default hidden_size / num_attention_heads).
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2, or Llama's `attention_bias`).
    pub attention_bias: bool,
    /// The MLP projections carry a bias (`mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype named in the config ("float32", "bfloat16", ...), informational.
    pub dtype: Option<String>,
    /// `_name_or_path`, used as `base_model_name_or_path` when saving adapters.
    pub name_or_path: Option<String>,
    /// The `architectures` entry, e.g. "LlamaForCausalLM".
    pub architecture: String,
    /// The HF folder or GGUF file the model was loaded from (set by the loader; `None` for a
    /// config parsed on its own). Exports read the tokenizer from there, whatever
    /// `_name_or_path` says.
    pub source_path: Option<std::path::PathBuf>,
}

pub(crate) fn get_usize(v: &Value, key: &str, path: &Path) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| PeftError::InvalidModelConfig {
            path: path.to_path_buf(),
            msg: format!("`{key}` must be a non-negative integer, found {x}"),
        }),
    }
}

pub(crate) fn get_f64(v: &Value, key: &str, path: &Path) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).ok_or_else(|| PeftError::InvalidModelConfig {
            path: path.to_path_buf(),
            msg: format!("`{key}` must be a number, found {x}"),
        }),
    }
}

pub(crate) fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => vec![],
    }
}

/// The Llama-family `architectures` values [`LlamaConfig`] reads (causal LM and sequence
/// classification heads).
pub const LLAMA_ARCHITECTURES: &[&str] = &[
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    "MistralForCausalLM",
    "MistralForSequenceClassification",
    "Qwen2ForCausalLM",
    "Qwen2ForSequenceClassification",
];

/// The GPT-2 `architectures` values.
pub const GPT2_ARCHITECTURES: &[&str] = &["GPT2LMHeadModel", "GPT2ForSequenceClassification"];

/// The T5 `architectures` values.
pub const T5_ARCHITECTURES: &[&str] = &["T5ForConditionalGeneration"];

/// Every supported `architectures` value, per family (the loader dispatches on them; see
/// [`crate::model::loader::load_model`]).
pub fn supported_architectures() -> Vec<&'static str> {
    [LLAMA_ARCHITECTURES, GPT2_ARCHITECTURES, crate::model::bert::BERT_ARCHITECTURES, T5_ARCHITECTURES].concat()
}

impl LlamaConfig {
    /// Parse a transformers `config.json` value. `path` is used in error messages only.
    ///
    /// Errors: `InvalidModelConfig` when a required field is missing or of the wrong type, or the
    /// architecture is not a supported Llama-family decoder.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |msg: String| PeftError::InvalidModelConfig { path: path.to_path_buf(), msg };
        if !v.is_object() {
            return Err(bad("the top level must be a JSON object".into()));
        }
        let model_type = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("llama").to_string();
        let architecture = v
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|x| x.as_str())
            .map(|s| s.to_string())
            .unwrap_or_else(|| match model_type.as_str() {
                "qwen2" => "Qwen2ForCausalLM".into(),
                "mistral" => "MistralForCausalLM".into(),
                _ => "LlamaForCausalLM".into(),
            });
        if !LLAMA_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(bad(format!(
                "architecture `{architecture}` is not a Llama-family decoder ({}); supported architectures: {}",
                LLAMA_ARCHITECTURES.join(", "),
                supported_architectures().join(", ")
            )));
        }
        let req = |k: &str| -> Result<usize> {
            get_usize(v, k, path)?.ok_or_else(|| bad(format!("missing required field `{k}`")))
        };
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size == 0 {
            return Err(bad("`hidden_size` and `num_attention_heads` must be positive".into()));
        }
        let num_key_value_heads = get_usize(v, "num_key_value_heads", path)?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(bad(format!(
                "`num_key_value_heads` ({num_key_value_heads}) must divide `num_attention_heads` ({num_attention_heads})"
            )));
        }
        let head_dim = get_usize(v, "head_dim", path)?.unwrap_or(hidden_size / num_attention_heads);
        let rope_theta = match get_f64(v, "rope_theta", path)? {
            Some(t) => t,
            None => v
                .get("rope_parameters")
                .and_then(|p| p.get("rope_theta"))
                .and_then(|t| t.as_f64())
                .unwrap_or(10000.0),
        };
        if let Some(rt) = v.get("rope_parameters").and_then(|p| p.get("rope_type")).and_then(|t| t.as_str()) {
            if rt != "default" {
                return Err(bad(format!("rope_type `{rt}` is not supported (only `default`)")));
            }
        }
        if let Some(Value::Object(_)) = v.get("rope_scaling") {
            let rt = v["rope_scaling"].get("rope_type").or(v["rope_scaling"].get("type"));
            if rt.and_then(|x| x.as_str()).map(|s| s != "default").unwrap_or(true) {
                return Err(bad(format!("rope_scaling {} is not supported", v["rope_scaling"])));
            }
        }
        let cfg = LlamaConfig {
            vocab_size: req("vocab_size")?,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            hidden_size,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: get_f64(v, "rms_norm_eps", path)?.unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: get_usize(v, "max_position_embeddings", path)?.unwrap_or(2048),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(false),
            attention_bias: v.get("attention_bias").and_then(|x| x.as_bool()).unwrap_or(model_type == "qwen2"),
            mlp_bias: v.get("mlp_bias").and_then(|x| x.as_bool()).unwrap_or(false),
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_id: token_ids(v.get("eos_token_id")),
            pad_token_id: token_ids(v.get("pad_token_id")).first().copied(),
            dtype: v.get("dtype").or(v.get("torch_dtype")).and_then(|x| x.as_str()).map(String::from),
            name_or_path: v.get("_name_or_path").and_then(|x| x.as_str()).map(String::from),
            model_type,
            architecture,
            source_path: None,
        };
        Ok(cfg)
    }

    /// Read and parse `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| PeftError::InvalidModelConfig {
            path: path.to_path_buf(),
            msg: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(&v, path)
    }
}
