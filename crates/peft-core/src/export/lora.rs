//! A HF PEFT LoRA adapter folder → a llama.cpp GGUF LoRA adapter (the format of llama.cpp's
//! `convert_lora_to_gguf.py`, loaded by `llama_adapter_lora_init`, node-llama-cpp's
//! `createContext({ lora })` and ollama's `ADAPTER`).
//!
//! What is written:
//! * metadata `general.architecture` (the base's GGUF architecture, which llama.cpp checks
//!   against the model), `general.type = "adapter"`, `adapter.type = "lora"`,
//!   `adapter.lora.alpha` (f32, the config's `lora_alpha`), `general.name`,
//!   `general.file_type`;
//! * per adapted module `blk.N.<name>.weight.lora_a` (HF `lora_A.weight`, shape `[r, in]`, so
//!   ggml `ne = [in, r]`) and `.lora_b` (HF `lora_B.weight`, `[out, r]`, ggml `ne = [r, out]`).
//!
//! llama.cpp applies `y += s · B (A x)` with one file-wide `s = alpha / r` (its
//! `llama_adapter_lora_weight::get_scale`, `r` the rank of that module's B). HF's scaling is
//! `lora_alpha_m / r_m` per module (`alpha_pattern`, `rank_pattern`), or `lora_alpha_m / √r_m`
//! with rsLoRA. Where the two differ, `B` is multiplied by `scaling_hf · r_m / alpha` so that
//! llama.cpp's `s` times the stored `B` equals HF's `scaling · B` exactly (up to the output
//! type's rounding). With `lora_alpha = 0` the file says `alpha = 0` (llama.cpp then uses
//! `s = 1`) and `B` carries the whole scaling.
//!
//! For the `llama` architecture the rows of q/k `B` are permuted as llama.cpp permutes the base
//! q/k weights ([`super::permute_qk`]); `A` is unchanged (it acts on the input side).
//!
//! Refused with `ExportUnsupported` (what llama.cpp cannot apply): DoRA (`use_dora`),
//! `modules_to_save`, trained biases (`bias` other than `"none"`), LoRA on embedding layers or
//! on the output head, IA3 and prompt-learning adapters, and non-Llama-family bases.

use super::gguf_writer::{GgmlType, GgufWriter};
use super::{gguf_architecture, hf_module_to_gguf, permute_qk};
use crate::error::{PeftError, Result};
use crate::io::read_safetensors;
use crate::model::config::{LlamaConfig, LLAMA_ARCHITECTURES};
use crate::tuners::config::AdapterConfig;
use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Options of [`export_gguf_lora`].
#[derive(Debug, Clone)]
pub struct LoraExportOptions {
    /// The base model the adapter was trained on: a HF folder (config.json) or a `.gguf` file;
    /// only its hyper-parameters are read. `None`: the adapter's `base_model_name_or_path`.
    pub base_model: Option<PathBuf>,
    /// Type of the LoRA tensors. Q8_0 applies to tensors whose rows are a multiple of 32 (the
    /// `A` matrices for usual model widths); the others are written as F16.
    pub outtype: GgmlType,
}

impl Default for LoraExportOptions {
    fn default() -> Self {
        LoraExportOptions { base_model: None, outtype: GgmlType::F32 }
    }
}

/// What [`export_gguf_lora`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraExportReport {
    /// The GGUF `general.architecture` written.
    pub architecture: String,
    /// `adapter.lora.alpha`.
    pub alpha: f64,
    /// Number of adapted modules (each gives a `lora_a` and a `lora_b` tensor).
    pub modules: usize,
    /// Modules whose `B` carries a folded factor (rsLoRA, rank/alpha patterns), with the factor.
    pub folded: Vec<(String, f64)>,
}

fn unsupported(what: impl Into<String>, msg: impl Into<String>) -> PeftError {
    PeftError::ExportUnsupported { what: what.into(), msg: msg.into() }
}

/// The Llama-family hyper-parameters of `base` (a HF folder or a GGUF file).
///
/// Errors: `NotFound`; `ExportUnsupported` naming a non-Llama architecture; the config / GGUF
/// parsing errors.
pub(crate) fn base_config(base: &Path) -> Result<LlamaConfig> {
    if !base.exists() {
        return Err(PeftError::NotFound { path: base.into(), what: "the base model (baseModel) does not exist".into() });
    }
    if crate::model::loader::is_gguf(base) {
        let content = crate::gguf::read_gguf_header(base)?;
        let arch = crate::gguf_container::meta::string(&content.metadata, "general.architecture", base)?.unwrap_or_default();
        if arch != "llama" {
            // The architecture's own refusal where the exporter has one (SmolLM3: its NoPE layers).
            if let Ok(cfg) = crate::gguf::read_gguf_config(base) {
                super::gguf_architecture(&cfg)?;
            }
            return Err(unsupported(format!("architecture `{arch}`"), format!("{}: only `llama` GGUF bases are supported", base.display())));
        }
        return crate::gguf::read_gguf_config(base);
    }
    let cfg_path = base.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| PeftError::io(&cfg_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| PeftError::InvalidModelConfig { path: cfg_path.clone(), msg: format!("not valid JSON: {e}") })?;
    let arch = crate::model::loader::architecture_of(&v).unwrap_or_else(|| "LlamaForCausalLM".into());
    if !LLAMA_ARCHITECTURES.contains(&arch.as_str()) || !arch.ends_with("ForCausalLM") {
        return Err(unsupported(
            format!("architecture `{arch}`"),
            format!("{}: GGUF export supports Llama-family causal LMs ({})", cfg_path.display(), LLAMA_ARCHITECTURES.iter().filter(|a| a.ends_with("ForCausalLM")).copied().collect::<Vec<_>>().join(", ")),
        ));
    }
    LlamaConfig::from_json(&v, &cfg_path)
}

/// `[out, in]` of a Llama module's weight.
fn module_shape(cfg: &LlamaConfig, sub: &str) -> Option<(usize, usize)> {
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    Some(match sub {
        "attn_q" => (q, h),
        "attn_k" | "attn_v" => (kv, h),
        "attn_output" => (h, q),
        "ffn_gate" | "ffn_up" => (f, h),
        "ffn_down" => (h, f),
        _ => return None,
    })
}

/// Convert the HF PEFT LoRA adapter in `adapter_dir` (adapter_config.json +
/// adapter_model.safetensors) to a llama.cpp GGUF LoRA file at `out` (written atomically).
/// See the module docs for the format, the scale folding and the refusals.
///
/// Errors: `NotFound` (adapter files, base model); `ExportUnsupported` naming what llama.cpp
/// cannot apply (`use_dora`, `modules_to_save`, `bias`, LoRA on `model.embed_tokens` /
/// `lm_head`, IA3, prompt learning, another architecture); `InvalidArgument` when no base model
/// is given or recorded; `ShapeMismatch` when a LoRA tensor does not fit the base;
/// `InvalidAdapterConfig`, `SafetensorsInvalid`, `GgufInvalid`, `Io`.
pub fn export_gguf_lora(adapter_dir: &Path, out: &Path, opts: &LoraExportOptions) -> Result<LoraExportReport> {
    let cfg_path = adapter_dir.join("adapter_config.json");
    let any = AdapterConfig::from_file(&cfg_path)?;
    let cfg = match any.as_lora() {
        Some(c) => c.clone(),
        None => {
            let what = if any.is_prompt_learning() { format!("a prompt-learning adapter ({})", any.peft_type()) } else { format!("an {} adapter", any.peft_type()) };
            return Err(unsupported(what, format!("{}: llama.cpp applies LoRA adapters only", cfg_path.display())));
        }
    };
    if cfg.use_dora {
        return Err(unsupported("a DoRA adapter (`use_dora`)", format!("{}: llama.cpp has no DoRA magnitude vectors; merge it instead (mergeAndUnload, then exportGguf)", cfg_path.display())));
    }
    if let Some(m) = cfg.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
        return Err(unsupported(
            format!("`modules_to_save` ({m:?})"),
            format!("{}: a GGUF LoRA file holds low-rank pairs only, not full module copies; merge it instead (mergeAndUnload, then exportGguf)", cfg_path.display()),
        ));
    }
    if cfg.bias != "none" {
        return Err(unsupported(format!("`bias` = \"{}\"", cfg.bias), format!("{}: llama.cpp LoRA files carry no bias terms; merge it instead", cfg_path.display())));
    }
    let base = match &opts.base_model {
        Some(b) => b.clone(),
        None => cfg
            .base_model_name_or_path
            .as_ref()
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .ok_or_else(|| PeftError::invalid_arg("baseModel", format!("is required: {} names no local base model (base_model_name_or_path = {:?})", cfg_path.display(), cfg.base_model_name_or_path)))?,
    };
    let bcfg = base_config(&base)?;
    let (arch, permute) = gguf_architecture(&bcfg)?;

    let wpath = adapter_dir.join("adapter_model.safetensors");
    if !wpath.exists() {
        return Err(PeftError::NotFound { path: wpath, what: "the adapter folder has no adapter_model.safetensors".into() });
    }
    let tensors = read_safetensors(&wpath, &Device::Cpu)?;
    // module path → (A, B)
    let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (key, t) in tensors {
        let rest = key.strip_prefix("base_model.model.").unwrap_or(&key);
        if rest.contains("lora_embedding_A") || rest.contains("lora_embedding_B") {
            return Err(unsupported(format!("LoRA on an embedding layer (`{key}`)"), format!("{}: not exported to GGUF here; merge it instead", wpath.display())));
        }
        if rest.contains("lora_magnitude_vector") {
            return Err(unsupported(format!("DoRA (`{key}`)"), format!("{}: llama.cpp has no DoRA magnitude vectors", wpath.display())));
        }
        let (module, slot) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else {
            return Err(unsupported(format!("tensor `{key}`"), format!("{}: only lora_A / lora_B weights can go into a GGUF LoRA file", wpath.display())));
        };
        let e = pairs.entry(module.to_string()).or_default();
        if slot == 0 { e.0 = Some(t) } else { e.1 = Some(t) }
    }
    if pairs.is_empty() {
        return Err(PeftError::SafetensorsInvalid { path: wpath, msg: "holds no LoRA tensors".into() });
    }

    let alpha_g = cfg.lora_alpha;
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String(arch.into()));
    w.set("general.type", Value::String("adapter".into()));
    let name = adapter_dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
    w.set("general.name", Value::String(name));
    w.set("general.file_type", Value::U32(opts.outtype.file_type()));
    if opts.outtype == GgmlType::Q8_0 {
        w.set("general.quantization_version", Value::U32(2));
    }
    w.set("adapter.type", Value::String("lora".into()));
    w.set("adapter.lora.alpha", Value::F32(alpha_g as f32));

    // Natural order: by layer number, then module.
    let mut modules: Vec<(String, String)> = Vec::new();
    for module in pairs.keys() {
        if module == "lm_head" || module == "model.embed_tokens" {
            return Err(unsupported(format!("LoRA on `{module}`"), format!("{}: LoRA on the embedding / output layers is not exported to GGUF here; merge it instead", wpath.display())));
        }
        let g = hf_module_to_gguf(module).ok_or_else(|| unsupported(format!("LoRA on `{module}`"), format!("{}: llama.cpp has no tensor for this module", wpath.display())))?;
        modules.push((module.clone(), g));
    }
    let layer_of = |g: &str| g.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|n| n.parse::<usize>().ok()).unwrap_or(usize::MAX);
    modules.sort_by(|a, b| (layer_of(&a.1), &a.1).cmp(&(layer_of(&b.1), &b.1)));

    let mut folded = Vec::new();
    for (module, g) in &modules {
        let (a, b) = &pairs[module];
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(PeftError::SafetensorsInvalid { path: wpath.clone(), msg: format!("module `{module}` lacks its lora_A or lora_B weight") }),
        };
        let layer = layer_of(g);
        let sub = g.rsplit('.').next().unwrap_or_default();
        let (o, i) = module_shape(&bcfg, sub).ok_or_else(|| unsupported(format!("LoRA on `{module}`"), "no llama.cpp LoRA target"))?;
        if layer >= bcfg.num_hidden_layers {
            return Err(PeftError::ShapeMismatch { name: format!("{module} (layer {layer} of a {}-layer base)", bcfg.num_hidden_layers), expected: vec![bcfg.num_hidden_layers], found: vec![layer + 1] });
        }
        let r = a.dims().first().copied().unwrap_or(0);
        if a.dims() != [r, i] {
            return Err(PeftError::ShapeMismatch { name: format!("{module}.lora_A.weight"), expected: vec![r, i], found: a.dims().to_vec() });
        }
        if b.dims() != [o, r] {
            return Err(PeftError::ShapeMismatch { name: format!("{module}.lora_B.weight"), expected: vec![o, r], found: b.dims().to_vec() });
        }
        let want_r = cfg.rank_for(module);
        if want_r != r {
            return Err(PeftError::ShapeMismatch { name: format!("{module}.lora_A.weight (rank from adapter_config.json)"), expected: vec![want_r, i], found: vec![r, i] });
        }
        let scaling = cfg.scaling(r, cfg.alpha_for(module));
        let factor = if alpha_g == 0.0 { scaling } else { scaling * r as f64 / alpha_g };
        let mut b = b.to_dtype(DType::F32)?;
        if permute && sub == "attn_q" {
            b = permute_qk(&b, bcfg.num_attention_heads)?;
        } else if permute && sub == "attn_k" {
            b = permute_qk(&b, bcfg.num_key_value_heads)?;
        }
        if (factor - 1.0).abs() > 1e-12 {
            b = (b * factor)?;
            folded.push((module.clone(), factor));
        }
        w.add_tensor(&format!("{g}.weight.lora_a"), a.to_dtype(DType::F32)?, opts.outtype)?;
        w.add_tensor(&format!("{g}.weight.lora_b"), b, opts.outtype)?;
    }
    w.write(out)?;
    Ok(LoraExportReport { architecture: arch.into(), alpha: alpha_g, modules: modules.len(), folded })
}
