//! Llama-family model configuration, read from a transformers `config.json`
//! (both the older layout with top-level `rope_theta` / `torch_dtype` and the
//! transformers-5 layout with `rope_parameters` / `dtype`) or filled from GGUF metadata.

use super::decoder::{DecoderDefaults, DecoderFields};
use crate::error::{PeftError, Result};
use serde_json::Value;
use std::path::Path;

/// RoPE frequency scaling applied to the default inverse frequencies `1 / theta^(2i/d)`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.x (`rope_type: "llama3"`), as transformers' `_compute_llama3_parameters`:
    /// wavelengths `2π / f` above `original_max_position_embeddings / low_freq_factor` are divided
    /// by `factor`, those below `original / high_freq_factor` are kept, and the ones between are
    /// interpolated with `smooth = (original / wavelen - low) / (high - low)`.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
    /// Per-frequency divisors, `[head_dim / 2]` (llama.cpp's precomputed `rope_freqs.weight` of a
    /// GGUF file: the frequency used is `f / factors[i]`).
    Factors(Vec<f32>),
}

/// Architecture hyper-parameters of a Llama-family decoder (Llama, Llama 3.x, SmolLM2, Qwen2,
/// Qwen3, Mistral, SmolLM3).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `model_type` from config.json ("llama", "qwen2", "qwen3", "mistral", "smollm3").
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
    /// RoPE scaling (`None` = the default frequencies).
    pub rope_scaling: Option<RopeScaling>,
    /// Qwen3: per-head RMSNorm of the queries and keys (`self_attn.q_norm` / `k_norm`, weight
    /// `[head_dim]`) after the projections' reshape to heads and before RoPE.
    pub qk_norm: bool,
    /// SmolLM3's NoPE layers: `None` = every layer applies RoPE; `Some(v)` (one entry per layer)
    /// = layer `i` applies RoPE to its queries and keys iff `v[i]`, and a `false` layer is a
    /// NoPE layer (no position encoding at all). Read from config.json's `no_rope_layers`
    /// (1 = RoPE, 0 = NoPE, as transformers' `SmolLM3Config`), else built from
    /// `no_rope_layer_interval` (default 4: every fourth layer is NoPE); a `smollm3` GGUF gets
    /// llama.cpp's fixed step of 4. See [`Self::layer_uses_rope`].
    pub rope_layers: Option<Vec<bool>>,
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
    "Qwen3ForCausalLM",
    "Qwen3ForSequenceClassification",
    "SmolLM3ForCausalLM",
    "SmolLM3ForSequenceClassification",
];

/// SmolLM3's per-layer RoPE flags (`true` = the layer applies RoPE) from a config.json, as
/// transformers' `SmolLM3Config.__post_init__`: `no_rope_layers` (1 = RoPE, 0 = NoPE; at least
/// one entry per layer, entries past `num_hidden_layers` unused), else
/// `no_rope_layer_interval` (default 4; layer `i` is NoPE when `(i + 1) % interval == 0`).
/// `layer_types` may only name `full_attention` (sliding-window layers are not supported).
///
/// Errors: `InvalidModelConfig` naming the key for a `no_rope_layers` that is not a list of 0/1
/// or is shorter than `num_hidden_layers`, a `no_rope_layer_interval` of 0 or not an integer,
/// or a `layer_types` entry other than `full_attention`.
pub(crate) fn smollm3_rope_layers(v: &Value, layers: usize, path: &Path) -> Result<Vec<bool>> {
    let bad = |msg: String| PeftError::InvalidModelConfig { path: path.to_path_buf(), msg };
    if let Some(lt) = v.get("layer_types").filter(|x| !x.is_null()) {
        let arr = lt.as_array().ok_or_else(|| bad(format!("`layer_types` must be a list, found {lt}")))?;
        if let Some((i, t)) = arr.iter().enumerate().find(|(_, t)| t.as_str() != Some("full_attention")) {
            return Err(bad(format!("`layer_types[{i}]` is {t}: only \"full_attention\" layers are supported (sliding-window attention is not)")));
        }
    }
    match v.get("no_rope_layers").filter(|x| !x.is_null()) {
        Some(x) => {
            let arr = x.as_array().ok_or_else(|| bad(format!("`no_rope_layers` must be a list of 0/1 (1 = the layer applies RoPE), found {x}")))?;
            if arr.len() < layers {
                return Err(bad(format!("`no_rope_layers` has {} entries; it needs one per layer (num_hidden_layers = {layers})", arr.len())));
            }
            arr.iter()
                .take(layers)
                .enumerate()
                .map(|(i, e)| match (e.as_u64(), e.as_bool()) {
                    (Some(0), _) | (_, Some(false)) => Ok(false),
                    (Some(1), _) | (_, Some(true)) => Ok(true),
                    _ => Err(bad(format!("`no_rope_layers[{i}]` must be 0 (NoPE) or 1 (RoPE), found {e}"))),
                })
                .collect()
        }
        None => {
            let interval = match v.get("no_rope_layer_interval").filter(|x| !x.is_null()) {
                None => 4,
                Some(x) => match x.as_u64() {
                    Some(n) if n > 0 => n as usize,
                    _ => return Err(bad(format!("`no_rope_layer_interval` must be a positive integer, found {x}"))),
                },
            };
            Ok((0..layers).map(|i| (i + 1) % interval != 0).collect())
        }
    }
}

/// The GPT-2 `architectures` values.
pub const GPT2_ARCHITECTURES: &[&str] = &["GPT2LMHeadModel", "GPT2ForSequenceClassification"];

/// The T5 `architectures` values.
pub const T5_ARCHITECTURES: &[&str] = &["T5ForConditionalGeneration"];

/// Every supported `architectures` value, per family (the loader dispatches on them; see
/// [`crate::model::loader::load_model`]).
pub fn supported_architectures() -> Vec<&'static str> {
    [LLAMA_ARCHITECTURES, crate::model::gemma3::GEMMA3_ARCHITECTURES, crate::model::phi3::PHI3_ARCHITECTURES, GPT2_ARCHITECTURES, crate::model::bert::BERT_ARCHITECTURES, T5_ARCHITECTURES].concat()
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
                "qwen3" => "Qwen3ForCausalLM".into(),
                "smollm3" => "SmolLM3ForCausalLM".into(),
                _ => "LlamaForCausalLM".into(),
            });
        if !LLAMA_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(bad(format!(
                "architecture `{architecture}` is not a Llama-family decoder ({}); supported architectures: {}",
                LLAMA_ARCHITECTURES.join(", "),
                supported_architectures().join(", ")
            )));
        }
        // SmolLM3 named only by its architecture is still SmolLM3 (NoPE layers, its defaults).
        let smollm3 = model_type == "smollm3" || architecture.starts_with("SmolLM3");
        let model_type = if smollm3 { "smollm3".to_string() } else { model_type };
        let defaults = if smollm3 {
            // transformers' SmolLM3Config defaults.
            DecoderDefaults { heads: Some(16), kv_heads: Some(4), head_dim: None, rms_norm_eps: 1e-6, max_position_embeddings: 32768, tie_word_embeddings: true }
        } else {
            DecoderDefaults { heads: None, kv_heads: None, head_dim: None, rms_norm_eps: 1e-6, max_position_embeddings: 2048, tie_word_embeddings: false }
        };
        let f = DecoderFields::from_json(v, path, &defaults)?;
        let rope_theta = match get_f64(v, "rope_theta", path)? {
            Some(t) => t,
            None => v
                .get("rope_parameters")
                .and_then(|p| p.get("rope_theta"))
                .and_then(|t| t.as_f64())
                .unwrap_or(if smollm3 { 2_000_000.0 } else { 10000.0 }),
        };
        // transformers 5 writes `rope_parameters` (rope_theta + the scaling fields); older
        // configs write `rope_scaling` (the scaling fields, `type` or `rope_type`).
        let mut rope_scaling = None;
        for key in ["rope_parameters", "rope_scaling"] {
            let Some(p) = v.get(key).filter(|p| !p.is_null()) else { continue };
            if !p.is_object() {
                return Err(bad(format!("`{key}` must be an object, found {p}")));
            }
            let rt = p.get("rope_type").or(p.get("type")).and_then(|x| x.as_str()).unwrap_or("default");
            match rt {
                "default" => {}
                "llama3" => {
                    let f = |k: &str, d: Option<f64>| -> Result<f64> {
                        match p.get(k).and_then(|x| x.as_f64()).or(d) {
                            Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                            Some(x) => Err(bad(format!("`{key}.{k}` must be a positive number, found {x}"))),
                            None => Err(bad(format!("`{key}` of rope_type llama3 needs `{k}`"))),
                        }
                    };
                    let s = RopeScaling::Llama3 {
                        factor: f("factor", None)?,
                        low_freq_factor: f("low_freq_factor", None)?,
                        high_freq_factor: f("high_freq_factor", None)?,
                        original_max_position_embeddings: f("original_max_position_embeddings", None)?,
                    };
                    if let RopeScaling::Llama3 { low_freq_factor, high_freq_factor, .. } = &s {
                        if high_freq_factor <= low_freq_factor {
                            return Err(bad(format!("`{key}`: high_freq_factor must exceed low_freq_factor")));
                        }
                    }
                    rope_scaling = Some(s);
                }
                other => {
                    return Err(bad(format!("rope_type `{other}` ({key}) is not supported (supported: default, llama3)")));
                }
            }
        }
        if v.get("use_sliding_window").and_then(|x| x.as_bool()) == Some(true) {
            return Err(bad("`use_sliding_window: true` (sliding-window attention) is not supported".into()));
        }
        let rope_layers = if smollm3 { Some(smollm3_rope_layers(v, f.num_hidden_layers, path)?) } else { None };
        let cfg = LlamaConfig {
            vocab_size: f.vocab_size,
            intermediate_size: f.intermediate_size,
            num_hidden_layers: f.num_hidden_layers,
            hidden_size: f.hidden_size,
            num_attention_heads: f.num_attention_heads,
            num_key_value_heads: f.num_key_value_heads,
            head_dim: f.head_dim,
            rms_norm_eps: f.rms_norm_eps,
            rope_theta,
            rope_scaling,
            qk_norm: model_type == "qwen3",
            rope_layers,
            max_position_embeddings: f.max_position_embeddings,
            tie_word_embeddings: f.tie_word_embeddings,
            attention_bias: v.get("attention_bias").and_then(|x| x.as_bool()).unwrap_or(model_type == "qwen2"),
            mlp_bias: v.get("mlp_bias").and_then(|x| x.as_bool()).unwrap_or(false),
            bos_token_id: f.bos_token_id,
            eos_token_id: f.eos_token_id,
            pad_token_id: f.pad_token_id,
            dtype: f.dtype,
            name_or_path: f.name_or_path,
            model_type,
            architecture,
            source_path: None,
        };
        Ok(cfg)
    }

    /// Whether decoder layer `layer` applies RoPE (false for SmolLM3's NoPE layers, see
    /// [`Self::rope_layers`]).
    pub fn layer_uses_rope(&self, layer: usize) -> bool {
        self.rope_layers.as_ref().is_none_or(|v| v.get(layer).copied().unwrap_or(true))
    }

    /// RoPE inverse frequencies `[head_dim / 2]`: `1 / theta^(2i/d)` with [`Self::rope_scaling`]
    /// applied.
    pub fn inv_freq(&self) -> Vec<f32> {
        let hd = self.head_dim;
        let base: Vec<f64> = (0..hd / 2).map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / hd as f64)).collect();
        match &self.rope_scaling {
            None => base.iter().map(|&f| f as f32).collect(),
            Some(RopeScaling::Factors(k)) => base.iter().zip(k).map(|(&f, &k)| (f / k as f64) as f32).collect(),
            Some(RopeScaling::Llama3 { factor, low_freq_factor: lo, high_freq_factor: hi, original_max_position_embeddings: old }) => base
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let (low_wl, high_wl) = (old / lo, old / hi);
                    let g = if wavelen < high_wl {
                        f
                    } else if wavelen > low_wl {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * f / factor + smooth * f
                    };
                    g as f32
                })
                .collect(),
        }
    }

    /// transformers 5's `rope_parameters` (rope_theta, and the llama3 scaling fields). Scaling
    /// known only as GGUF per-frequency factors has no config.json form and is written as
    /// `default` plus `"gguf_rope_freqs"` (the factors); saving such a model is refused.
    pub fn rope_parameters_json(&self) -> Value {
        match &self.rope_scaling {
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => serde_json::json!({
                "factor": factor, "high_freq_factor": high_freq_factor, "low_freq_factor": low_freq_factor,
                "original_max_position_embeddings": *original_max_position_embeddings as u64,
                "rope_theta": self.rope_theta, "rope_type": "llama3",
            }),
            Some(RopeScaling::Factors(f)) => serde_json::json!({ "rope_theta": self.rope_theta, "rope_type": "default", "gguf_rope_freqs": f }),
            None => serde_json::json!({ "rope_theta": self.rope_theta, "rope_type": "default" }),
        }
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
