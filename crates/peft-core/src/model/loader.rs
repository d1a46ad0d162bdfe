//! Loading a base model from a Hugging Face model folder (config.json + model.safetensors or a
//! sharded model.safetensors.index.json; the architecture from `architectures` / `model_type`:
//! Llama family, Gemma 3, Phi-3, GPT-2, BERT family, T5, each with the requested task head) or from a
//! GGUF file (Llama family: weights dequantized, or kept quantized for the engine's integer
//! kernels; Gemma 3 and Phi-3: dequantized).

use super::bert::{BertConfig, BertModel, BERT_ARCHITECTURES};
use super::config::{supported_architectures, LlamaConfig, GPT2_ARCHITECTURES, LLAMA_ARCHITECTURES, T5_ARCHITECTURES};
use super::gemma3::{Gemma3Config, Gemma3ForCausalLM, GEMMA3_ARCHITECTURES};
use super::gpt2::{Gpt2Config, Gpt2LMHeadModel};
use super::llama::LlamaForCausalLM;
use super::phi3::{Phi3Config, Phi3ForCausalLM, PHI3_ARCHITECTURES};
use super::t5::{T5Config, T5ForConditionalGeneration};
use super::{BaseModel, Task};
use crate::error::{PeftError, Result};
use crate::io::read_safetensors_with;
use crate::progress::{Control, Counter};
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A loaded base model and, when the source carries one, its tokenizer.
pub struct LoadedModel {
    /// The model (Llama family or GPT-2), ready for [`crate::peft_model::PeftModel::new`].
    pub model: Box<dyn BaseModel>,
    pub tokenizer: Option<Tokenizer>,
    /// Head weights the checkpoint did not have and that were freshly initialised (transformers'
    /// "Some weights of X were not initialized from the model checkpoint" list), e.g.
    /// `["score.weight"]` when a causal-LM checkpoint is loaded for sequence classification.
    pub newly_initialized: Vec<String>,
}

/// Largest `num_labels` a new classification head may have (a head `[num_labels, hidden]` is
/// allocated at load; larger requests are refused before allocating).
pub const MAX_NUM_LABELS: usize = 1 << 20;

/// Which head to build, as HF's `AutoModelFor*` classes choose it.
#[derive(Debug, Clone, Default)]
pub struct LoadRequest {
    /// `None`: the head config.json's `architectures` names.
    pub task: Option<Task>,
    /// Classes of a new classification head; default: config.json's `id2label` length, else
    /// `num_labels`, else 2 (transformers' default).
    pub num_labels: Option<usize>,
    /// Seed for freshly initialised head weights.
    pub seed: u64,
    /// GGUF files: keep the decoder layers' linear weights quantized (`true`, QLoRA-style, see
    /// [`crate::engine::quant`]) or dequantize everything (`false`, the default). Ignored for
    /// HF folders (see `quantize`).
    pub keep_quantized: bool,
    /// HF folders of the Llama family: quantize the decoder layers' linear weights (q/k/v/o,
    /// gate/up/down) at load to this GGUF block type (`Q8_0` or `Q4_0`, llama.cpp's
    /// round-to-nearest reference quantizers, [`crate::engine::quant::QuantWeight::quantize`])
    /// and keep them in that form, QLoRA-style. `None` (the default): as stored.
    pub quantize: Option<crate::engine::quant::QuantType>,
}

/// The task an `architectures` entry names (`...ForCausalLM` / `GPT2LMHeadModel` → causal LM,
/// `...ForSequenceClassification` → SEQ_CLS, ...); `None` for an unknown suffix.
pub fn task_of_architecture(a: &str) -> Option<Task> {
    let table: [(&str, Task); 9] = [
        ("ForCausalLM", Task::CausalLm),
        ("LMHeadModel", Task::CausalLm),
        ("ForSequenceClassification", Task::SeqCls),
        ("ForTokenClassification", Task::TokenCls),
        ("ForQuestionAnswering", Task::QuestionAns),
        ("ForConditionalGeneration", Task::Seq2SeqLm),
        ("ForMaskedLM", Task::FeatureExtraction),
        ("ForPreTraining", Task::FeatureExtraction),
        ("Model", Task::FeatureExtraction),
    ];
    table.iter().find(|(suffix, _)| a.ends_with(suffix)).map(|(_, t)| *t)
}

/// Number of labels for a classification head: the request's, else config.json's `id2label`
/// length, else `num_labels`, else 2.
pub fn num_labels_of(v: &serde_json::Value, req: &LoadRequest) -> usize {
    req.num_labels
        .or_else(|| v.get("id2label").and_then(|m| m.as_object()).map(|m| m.len()).filter(|&n| n > 0))
        .or_else(|| v.get("num_labels").and_then(|n| n.as_u64()).map(|n| n as usize))
        .unwrap_or(2)
}

/// Insert a freshly initialised `[out, in]` weight under `key` when the checkpoint lacks it
/// (normal(0, `initializer_range`), as transformers initialises a new head), recording it.
pub fn init_missing(t: &mut HashMap<String, Tensor>, key: &str, out: usize, inp: usize, v: &serde_json::Value, seed: u64, device: &Device, record: &mut Vec<String>) -> Result<()> {
    if !t.contains_key(key) {
        let std = v.get("initializer_range").and_then(|x| x.as_f64()).unwrap_or(0.02);
        t.insert(key.to_string(), super::init_normal(out, inp, std, seed, device)?);
        record.push(key.to_string());
    }
    Ok(())
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
/// `MistralForCausalLM`, `Qwen2ForCausalLM`), `GPT2LMHeadModel` and `T5ForConditionalGeneration`
/// (encoder-decoder, SEQ_2_SEQ_LM). Weights are converted to `dtype`
/// (`F32`, `F16` or `BF16`; GGUF quantized tensors are dequantized).
///
/// Errors: `NotFound` (missing path, config.json or weights), `InvalidModelConfig` (also for an
/// unsupported architecture, naming it and listing the supported ones),
/// `SafetensorsInvalid`, `GgufInvalid`, `ShapeMismatch`.
pub fn load_causal_lm(path: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    load_model(path, dtype, device, &LoadRequest::default())
}

/// [`load_causal_lm`] with the head chosen by `req` (HF's `AutoModelFor*.from_pretrained`): a
/// checkpoint of one head can be loaded with another (a causal LM as a sequence classifier gets
/// a new `score`, listed in [`LoadedModel::newly_initialized`]).
///
/// Errors: as [`load_causal_lm`]; `InvalidModelConfig` when the architecture family has no such
/// head (naming the supported ones).
pub fn load_model(path: &Path, dtype: DType, device: &Device, req: &LoadRequest) -> Result<LoadedModel> {
    load_model_ctl(path, dtype, device, req, &Control::NONE)
}

/// [`load_model`] reporting progress and honouring cancellation through `ctl`. Unit: tensors
/// of the checkpoint (`total` = the tensors of the GGUF file, or of `model.safetensors` / all
/// shards, counted from their headers before reading), reported as each is read (GGUF: read
/// and dequantized). `ctl` is polled after each tensor and once more before the model is
/// built; on an abort the tensors read so far are dropped before this returns.
///
/// Errors: as [`load_model`]; `Aborted`.
pub fn load_model_ctl(path: &Path, dtype: DType, device: &Device, req: &LoadRequest, ctl: &Control) -> Result<LoadedModel> {
    if let Some(n) = req.num_labels {
        if n == 0 || n > MAX_NUM_LABELS {
            return Err(PeftError::invalid_arg("numLabels", format!("must be between 1 and {MAX_NUM_LABELS}, found {n}")));
        }
    }
    if !path.exists() {
        return Err(PeftError::NotFound { path: path.into(), what: "model folder or .gguf file does not exist".into() });
    }
    if req.keep_quantized && !is_gguf(path) {
        return Err(PeftError::invalid_arg(
            "quantization",
            format!("'keep' applies to .gguf files; {} is a model folder (quantize it at load with quantization: 'q8_0' or 'q4_0', or load it with 'dequantize')", path.display()),
        ));
    }
    if let Some(qt) = req.quantize {
        if is_gguf(path) {
            return Err(PeftError::invalid_arg(
                "quantization",
                format!("'{}' quantizes a model folder's weights at load; {} is a .gguf file (use 'keep' to keep its quantized types, or 'dequantize')", qt.name().to_ascii_lowercase(), path.display()),
            ));
        }
    }
    if is_gguf(path) && super::gguf::gguf_architecture(path)? == "gemma3" {
        let task = req.task.unwrap_or(Task::CausalLm);
        if task != Task::CausalLm {
            return Err(PeftError::InvalidModelConfig { path: path.into(), msg: format!("Gemma 3 has no {} head here (supported: CAUSAL_LM)", task.task_type()) });
        }
        if req.keep_quantized {
            return Err(PeftError::invalid_arg("quantization", "'keep' is not supported for Gemma 3 GGUF files (the fused engine does not run Gemma 3); load with quantization: 'dequantize'"));
        }
        let mut g = super::gguf::load_gguf_gemma3(path, dtype, device, ctl)?;
        ctl.check()?;
        g.config.name_or_path = Some(path.to_string_lossy().into_owned());
        g.config.source_path = Some(path.to_path_buf());
        let model = Gemma3ForCausalLM::from_tensors(g.config, g.tensors, dtype, device)?;
        return Ok(LoadedModel { model: Box::new(model), tokenizer: g.tokenizer, newly_initialized: vec![] });
    }
    if is_gguf(path) && super::gguf::gguf_architecture(path)? == "phi3" {
        let task = req.task.unwrap_or(Task::CausalLm);
        if task != Task::CausalLm {
            return Err(PeftError::InvalidModelConfig { path: path.into(), msg: format!("Phi-3 has no {} head here (supported: CAUSAL_LM)", task.task_type()) });
        }
        if req.keep_quantized {
            return Err(PeftError::invalid_arg("quantization", "'keep' is not supported for Phi-3 GGUF files (their weights are dequantized at load); load with quantization: 'dequantize'"));
        }
        let mut g = super::gguf::load_gguf_phi3(path, dtype, device, ctl)?;
        ctl.check()?;
        g.config.name_or_path = Some(path.to_string_lossy().into_owned());
        g.config.source_path = Some(path.to_path_buf());
        let model = Phi3ForCausalLM::from_tensors(g.config, g.tensors, dtype, device)?;
        return Ok(LoadedModel { model: Box::new(model), tokenizer: g.tokenizer, newly_initialized: vec![] });
    }
    if is_gguf(path) {
        let mut g = super::gguf::load_gguf_opts(path, dtype, device, ctl, req.keep_quantized)?;
        ctl.check()?;
        // As for HF folders, the source path is the model's name (GGUF's `general.name` is a
        // display name, not something HF can load an adapter's base model from).
        g.config.name_or_path = Some(path.to_string_lossy().into_owned());
        g.config.source_path = Some(path.to_path_buf());
        let mut newly_initialized = Vec::new();
        let task = req.task.unwrap_or(Task::CausalLm);
        let num_labels = (task == Task::SeqCls).then(|| req.num_labels.unwrap_or(2));
        if let Some(n) = num_labels {
            init_missing(&mut g.tensors, "score.weight", n, g.config.hidden_size, &serde_json::Value::Null, req.seed, device, &mut newly_initialized)?;
        }
        if task != Task::CausalLm {
            // The kept output head belongs to `lm_head`, which a classification model replaces.
            g.quantized.remove("lm_head.weight");
        }
        let mut model = LlamaForCausalLM::from_tensors_for(g.config, g.tensors, dtype, device, task, num_labels)?;
        attach_quantized(&mut model, g.quantized)?;
        return Ok(LoadedModel { model: Box::new(model), tokenizer: Some(g.tokenizer), newly_initialized });
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
    let arch = architecture_of(&v).unwrap_or_else(|| "LlamaForCausalLM".into());
    let unsupported = || PeftError::InvalidModelConfig {
        path: cfg_path.clone(),
        msg: format!("architecture `{arch}` is not supported; supported architectures: {}", supported_architectures().join(", ")),
    };
    let task = match req.task {
        Some(t) => t,
        None => task_of_architecture(&arch).ok_or_else(unsupported)?,
    };
    let mut newly_initialized = Vec::new();
    let is = |family: &[&str]| family.contains(&arch.as_str());
    let source = || Some(path.to_string_lossy().into_owned());
    if let Some(qt) = req.quantize {
        if !is(LLAMA_ARCHITECTURES) {
            return Err(PeftError::invalid_arg(
                "quantization",
                format!("'{}' is supported for Llama-family folders ({}), not for `{arch}` (the fused engine does not run it); load with quantization: 'dequantize'", qt.name().to_ascii_lowercase(), LLAMA_ARCHITECTURES.join(", ")),
            ));
        }
    }
    let model: Box<dyn BaseModel> = if is(GPT2_ARCHITECTURES) {
        let mut config = Gpt2Config::from_json(&v, &cfg_path)?;
        config.name_or_path = config.name_or_path.or_else(source);
        let mut tensors = load_folder_weights_ctl(path, device, ctl)?;
        let num_labels = (task == Task::SeqCls).then(|| num_labels_of(&v, req));
        if let Some(n) = num_labels {
            init_missing(&mut tensors, "score.weight", n, config.n_embd, &v, req.seed, device, &mut newly_initialized)?;
        }
        Box::new(Gpt2LMHeadModel::from_tensors_for(config, tensors, dtype, device, task, num_labels)?)
    } else if is(T5_ARCHITECTURES) {
        if task != Task::Seq2SeqLm {
            return Err(PeftError::InvalidModelConfig {
                path: cfg_path.clone(),
                msg: format!("T5ForConditionalGeneration has no {} head here (supported: SEQ_2_SEQ_LM)", task.task_type()),
            });
        }
        let mut config = T5Config::from_json(&v, &cfg_path)?;
        config.name_or_path = config.name_or_path.or_else(source);
        let tensors = load_folder_weights_ctl(path, device, ctl)?;
        Box::new(T5ForConditionalGeneration::from_tensors(config, tensors, dtype, device)?)
    } else if is(LLAMA_ARCHITECTURES) {
        let mut config = LlamaConfig::from_json(&v, &cfg_path)?;
        config.name_or_path = config.name_or_path.or_else(source);
        config.source_path = Some(path.to_path_buf());
        let mut tensors = load_folder_weights_ctl(path, device, ctl)?;
        let num_labels = (task == Task::SeqCls).then(|| num_labels_of(&v, req));
        if let Some(n) = num_labels {
            init_missing(&mut tensors, "score.weight", n, config.hidden_size, &v, req.seed, device, &mut newly_initialized)?;
        }
        let quantized = match req.quantize {
            Some(qt) => quantize_layer_linears(&mut tensors, qt, dtype, device, path)?,
            None => HashMap::new(),
        };
        ctl.check()?;
        let mut model = LlamaForCausalLM::from_tensors_for(config, tensors, dtype, device, task, num_labels)?;
        attach_quantized(&mut model, quantized)?;
        Box::new(model)
    } else if is(GEMMA3_ARCHITECTURES) {
        if task != Task::CausalLm {
            return Err(PeftError::InvalidModelConfig {
                path: cfg_path.clone(),
                msg: format!("Gemma3ForCausalLM has no {} head here (supported: CAUSAL_LM)", task.task_type()),
            });
        }
        let mut config = Gemma3Config::from_json(&v, &cfg_path)?;
        config.name_or_path = config.name_or_path.or_else(source);
        config.source_path = Some(path.to_path_buf());
        let tensors = load_folder_weights_ctl(path, device, ctl)?;
        Box::new(Gemma3ForCausalLM::from_tensors(config, tensors, dtype, device)?)
    } else if is(PHI3_ARCHITECTURES) {
        if task != Task::CausalLm {
            return Err(PeftError::InvalidModelConfig {
                path: cfg_path.clone(),
                msg: format!("Phi3ForCausalLM has no {} head here (supported: CAUSAL_LM)", task.task_type()),
            });
        }
        let mut config = Phi3Config::from_json(&v, &cfg_path)?;
        config.name_or_path = config.name_or_path.or_else(source);
        config.source_path = Some(path.to_path_buf());
        let tensors = load_folder_weights_ctl(path, device, ctl)?;
        Box::new(Phi3ForCausalLM::from_tensors(config, tensors, dtype, device)?)
    } else if is(BERT_ARCHITECTURES) {
        let mut config = BertConfig::from_json(&v, &cfg_path)?;
        config.name_or_path = config.name_or_path.or_else(source);
        let mut tensors = load_folder_weights_ctl(path, device, ctl)?;
        let num_labels = matches!(task, Task::SeqCls | Task::TokenCls).then(|| num_labels_of(&v, req));
        super::bert::init_missing_heads(&mut tensors, task, num_labels, &config, &v, req.seed, device, &mut newly_initialized)?;
        Box::new(BertModel::from_tensors_for(config, tensors, dtype, device, task, num_labels)?)
    } else {
        return Err(unsupported());
    };
    let tok_path = path.join("tokenizer.json");
    let tokenizer = if tok_path.exists() { Some(Tokenizer::from_pretrained(path)?) } else { None };
    Ok(LoadedModel { model, tokenizer, newly_initialized })
}

/// Whether an HF tensor name is a Llama-family decoder layer's linear weight
/// (`model.layers.<i>.self_attn.{q,k,v,o}_proj.weight`, `model.layers.<i>.mlp.{gate,up,down}_proj.weight`).
fn is_hf_layer_linear(name: &str) -> bool {
    name.starts_with("model.layers.")
        && [".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight", ".self_attn.o_proj.weight", ".mlp.gate_proj.weight", ".mlp.up_proj.weight", ".mlp.down_proj.weight"]
            .iter()
            .any(|s| name.ends_with(s))
}

/// Quantizes the decoder layers' linear weights of a Llama-family state dict to `qt` (one
/// tensor at a time, read as f32), replacing each in `tensors` by a zero-stride placeholder of
/// its shape in `dtype`. A weight whose `in` is not a multiple of 32 stays dense, with a
/// one-line notice on stderr.
///
/// Errors: `ERR_GGUF_INVALID` naming the tensor for a non-finite weight; candle errors.
fn quantize_layer_linears(
    tensors: &mut HashMap<String, Tensor>,
    qt: crate::engine::quant::QuantType,
    dtype: DType,
    device: &Device,
    path: &Path,
) -> Result<HashMap<String, std::sync::Arc<crate::engine::quant::QuantWeight>>> {
    let mut names: Vec<String> = tensors.keys().filter(|n| is_hf_layer_linear(n)).cloned().collect();
    names.sort();
    let mut out = HashMap::with_capacity(names.len());
    let mut kept_dense = 0usize;
    for name in names {
        let t = &tensors[&name];
        let (rows, cols) = t.dims2()?;
        if !cols.is_multiple_of(32) {
            kept_dense += 1;
            continue;
        }
        let w: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let q = crate::engine::quant::QuantWeight::quantize(&name, qt, rows, cols, &w)?;
        drop(w);
        tensors.insert(name.clone(), Tensor::zeros((), dtype, device)?.broadcast_as((rows, cols))?);
        out.insert(name, std::sync::Arc::new(q));
    }
    if kept_dense > 0 {
        eprintln!("peft-node: {}: {kept_dense} layer weights kept dense (their input size is not a multiple of 32, which {} needs)", path.display(), qt.name());
    }
    Ok(out)
}

/// Makes each linear layer whose `<path>.weight` is in `quantized` use it as its frozen base.
///
/// Errors: `ERR_INTERNAL` for a quantized tensor that matches no layer; as
/// [`crate::tuners::linear::PeftLinear::set_quantized`].
fn attach_quantized(model: &mut LlamaForCausalLM, mut quantized: HashMap<String, std::sync::Arc<crate::engine::quant::QuantWeight>>) -> Result<()> {
    if quantized.is_empty() {
        return Ok(());
    }
    for (name, lin) in model.named_linears_mut() {
        if let Some(q) = quantized.remove(&format!("{name}.weight")) {
            lin.set_quantized(q)?;
        }
    }
    if let Some(k) = quantized.keys().next() {
        return Err(PeftError::Internal(format!("kept-quantized tensor {k} matches no linear layer")));
    }
    Ok(())
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
            "t5" => "T5ForConditionalGeneration",
            "qwen2" => "Qwen2ForCausalLM",
            "qwen3" => "Qwen3ForCausalLM",
            "smollm3" => "SmolLM3ForCausalLM",
            "gemma3_text" => "Gemma3ForCausalLM",
            "phi3" => "Phi3ForCausalLM",
            "mistral" => "MistralForCausalLM",
            "llama" => "LlamaForCausalLM",
            "bert" => "BertModel",
            "distilbert" => "DistilBertModel",
            "roberta" => "RobertaModel",
            other => other,
        }
        .to_string(),
    )
}

/// All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`.
pub fn load_folder_weights(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    load_folder_weights_ctl(dir, device, &Control::NONE)
}

/// [`load_folder_weights`] with progress in tensors over all files and cancellation between
/// tensors (see [`load_model_ctl`]); on success the last report has `done == total` and `ctl`
/// was polled after the last tensor.
pub fn load_folder_weights_ctl(dir: &Path, device: &Device, ctl: &Control) -> Result<HashMap<String, Tensor>> {
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
    let mut total = 0u64;
    if ctl.progress.is_some() {
        for f in &files {
            total += crate::io::safetensors_tensor_count(f)? as u64;
        }
    }
    let mut counter = Counter::new(ctl, total);
    let mut out = HashMap::new();
    for f in files {
        for (k, t) in read_safetensors_with(&f, device, &mut || if ctl.progress.is_some() { counter.tick() } else { ctl.check() })? {
            out.insert(k, t);
        }
    }
    counter.finish();
    ctl.check()?;
    Ok(out)
}
