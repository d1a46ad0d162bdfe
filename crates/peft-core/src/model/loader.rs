//! Loading a Llama-family causal LM from a Hugging Face model folder (config.json +
//! model.safetensors or a sharded model.safetensors.index.json) or from a GGUF file.

use super::config::{LlamaConfig, LLAMA_ARCHITECTURES, SUPPORTED_ARCHITECTURES};
use super::gpt2::{Gpt2Config, Gpt2LMHeadModel};
use super::llama::LlamaForCausalLM;
use super::BaseModel;
use crate::error::{PeftError, Result};
use crate::io::read_safetensors;
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A loaded base model and, when the source carries one, its tokenizer.
pub struct LoadedModel {
    /// The model (Llama family or GPT-2), ready for [`crate::peft_model::PeftModel::new`].
    pub model: Box<dyn BaseModel>,
    pub tokenizer: Option<Tokenizer>,
}

/// Whether `path` names a GGUF file (by extension, else by its magic bytes).
pub fn is_gguf(path: &Path) -> bool {
    if path.is_dir() {
        return false;
    }
    if path.extension().map(|e| e.eq_ignore_ascii_case("gguf")).unwrap_or(false) {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).map(|_| &magic == b"GGUF").unwrap_or(false)
}

/// Load from a HF folder or a `.gguf` file; HF folders are dispatched on config.json's
/// `architectures` (else `model_type`): Llama-family decoders (`LlamaForCausalLM`,
/// `MistralForCausalLM`, `Qwen2ForCausalLM`) and `GPT2LMHeadModel`. Weights are converted to `dtype`
/// (`F32`, `F16` or `BF16`; GGUF quantized tensors are dequantized).
///
/// Errors: `NotFound` (missing path, config.json or weights), `InvalidModelConfig` (also for an
/// unsupported architecture, naming it and listing the supported ones),
/// `SafetensorsInvalid`, `GgufInvalid`, `ShapeMismatch`.
pub fn load_causal_lm(path: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    if !path.exists() {
        return Err(PeftError::NotFound { path: path.into(), what: "model folder or .gguf file does not exist".into() });
    }
    if is_gguf(path) {
        let mut g = crate::gguf::load_gguf(path, dtype, device)?;
        // As for HF folders, the source path is the model's name (GGUF's `general.name` is a
        // display name, not something HF can load an adapter's base model from).
        g.config.name_or_path = Some(path.to_string_lossy().into_owned());
        let model = LlamaForCausalLM::from_tensors(g.config, g.tensors, dtype, device)?;
        return Ok(LoadedModel { model: Box::new(model), tokenizer: Some(g.tokenizer) });
    }
    if !path.is_dir() {
        return Err(PeftError::invalid_arg("path", format!("{} is neither a model folder nor a .gguf file", path.display())));
    }
    let cfg_path = path.join("config.json");
    if !cfg_path.exists() {
        return Err(PeftError::NotFound { path: cfg_path, what: "the model folder has no config.json".into() });
    }
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| PeftError::io(&cfg_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| PeftError::InvalidModelConfig { path: cfg_path.clone(), msg: format!("not valid JSON: {e}") })?;
    let model: Box<dyn BaseModel> = match architecture_of(&v) {
        Some(a) if a == "GPT2LMHeadModel" => {
            let mut config = Gpt2Config::from_json(&v, &cfg_path)?;
            if config.name_or_path.is_none() {
                config.name_or_path = Some(path.to_string_lossy().into_owned());
            }
            let tensors = load_folder_weights(path, device)?;
            Box::new(Gpt2LMHeadModel::from_tensors(config, tensors, dtype, device)?)
        }
        Some(a) if !LLAMA_ARCHITECTURES.contains(&a.as_str()) => {
            return Err(PeftError::InvalidModelConfig {
                path: cfg_path,
                msg: format!("architecture `{a}` is not supported; supported architectures: {}", SUPPORTED_ARCHITECTURES.join(", ")),
            });
        }
        _ => {
            let mut config = LlamaConfig::from_json(&v, &cfg_path)?;
            if config.name_or_path.is_none() {
                config.name_or_path = Some(path.to_string_lossy().into_owned());
            }
            let tensors = load_folder_weights(path, device)?;
            Box::new(LlamaForCausalLM::from_tensors(config, tensors, dtype, device)?)
        }
    };
    let tok_path = path.join("tokenizer.json");
    let tokenizer = if tok_path.exists() { Some(Tokenizer::from_pretrained(path)?) } else { None };
    Ok(LoadedModel { model, tokenizer })
}

/// The architecture a config.json names: its first `architectures` entry, else derived from
/// `model_type` (`gpt2` → `GPT2LMHeadModel`, `llama` / `qwen2` / `mistral` → their causal LMs),
/// `None` when neither is present (read as Llama).
pub fn architecture_of(v: &serde_json::Value) -> Option<String> {
    if let Some(a) = v.get("architectures").and_then(|a| a.as_array()).and_then(|a| a.first()).and_then(|x| x.as_str()) {
        return Some(a.to_string());
    }
    Some(
        match v.get("model_type").and_then(|x| x.as_str())? {
            "gpt2" => "GPT2LMHeadModel",
            "qwen2" => "Qwen2ForCausalLM",
            "mistral" => "MistralForCausalLM",
            "llama" => "LlamaForCausalLM",
            other => other,
        }
        .to_string(),
    )
}

/// All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`.
pub fn load_folder_weights(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| PeftError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| PeftError::InvalidModelConfig { path: index.clone(), msg: format!("not valid JSON: {e}") })?;
        let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| PeftError::InvalidModelConfig {
            path: index.clone(),
            msg: "missing `weight_map` object".into(),
        })?;
        let mut names: Vec<String> = map.values().filter_map(|x| x.as_str().map(String::from)).collect();
        names.sort();
        names.dedup();
        for n in &names {
            if n.contains('/') || n.contains('\\') || n.contains("..") {
                return Err(PeftError::InvalidModelConfig { path: index.clone(), msg: format!("shard name {n:?} is not a plain file name") });
            }
        }
        names.into_iter().map(|n| dir.join(n)).collect()
    } else {
        return Err(PeftError::NotFound {
            path: dir.into(),
            what: "no model.safetensors or model.safetensors.index.json in the model folder".into(),
        });
    };
    let mut out = HashMap::new();
    for f in files {
        for (k, t) in read_safetensors(&f, device)? {
            out.insert(k, t);
        }
    }
    Ok(out)
}
