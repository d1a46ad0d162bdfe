//! A merged model (after `merge_and_unload`) written as a Hugging Face model folder
//! ([`save_merged_pretrained`]) or as a GGUF file for llama.cpp ([`export_merged_gguf`]).
//!
//! Llama-family models only (Llama, SmolLM2, Mistral, Qwen2). The model must carry no adapter
//! any more: merge them first (`merge_and_unload`), or `unload` them.

use super::gguf_writer::{GgmlType, GgufWriter};
use super::{gguf_architecture, hf_module_to_gguf, permute_qk};
use crate::error::{PeftError, Result};
use crate::io::{safetensors_bytes, write_atomic};
use crate::model::llama::LlamaForCausalLM;
use crate::model::{BaseModel, Task};
use crate::peft_model::PeftModel;
use crate::tokenizer::Tokenizer;
use candle_core::quantized::gguf_file::Value;
use candle_core::Tensor;
use std::path::Path;

/// Options of [`save_merged_pretrained`].
#[derive(Debug, Clone)]
pub struct MergedSaveOptions {
    /// Largest shard in bytes (transformers' `max_shard_size`; default 50 GB, transformers 5's
    /// default). A tensor larger than this gets a shard of its own.
    pub max_shard_size: u64,
}

impl Default for MergedSaveOptions {
    fn default() -> Self {
        MergedSaveOptions { max_shard_size: 50_000_000_000 }
    }
}

fn unsupported(what: impl Into<String>, msg: impl Into<String>) -> PeftError {
    PeftError::ExportUnsupported { what: what.into(), msg: msg.into() }
}

/// The Llama model of `m`, checked to carry no adapter.
fn plain_llama<'a>(m: &'a PeftModel, call: &str) -> Result<&'a LlamaForCausalLM> {
    let names = m.adapter_names();
    let carries = m.base.named_layers().iter().any(|(_, l)| l.has_adapters() || !l.saved_copies.is_empty());
    if !names.is_empty() || carries {
        return Err(PeftError::InvalidState(format!(
            "{call}: the model still carries adapters {names:?}; call mergeAndUnload() (or unload()) first, or export the adapter with exportGgufLora"
        )));
    }
    let llama = m.base.as_llama().ok_or_else(|| {
        let i = m.base.info();
        unsupported(format!("architecture `{}`", i.architecture), format!("{call} supports Llama-family models (Llama, SmolLM2, Mistral, Qwen2, Qwen3)"))
    })?;
    if let Some(crate::model::config::RopeScaling::Factors(_)) = llama.config.rope_scaling {
        return Err(unsupported(
            "RoPE scaling factors from GGUF",
            format!("{call}: the model's RoPE scaling came from a GGUF `rope_freqs.weight`, which has no config.json form"),
        ));
    }
    Ok(llama)
}

/// The model's weights under their transformers names, in module order (the `state_dict` that
/// `save_pretrained` writes: a tied `lm_head` is left out). A weight kept quantized is given
/// dequantized (its placeholder holds no data).
///
/// Errors: candle errors from dequantizing a kept-quantized weight.
pub fn llama_state_dict(m: &LlamaForCausalLM) -> Result<Vec<(String, Tensor)>> {
    let dense = |lin: &crate::tuners::linear::PeftLinear| lin.dense_weight();
    let mut out = vec![("model.embed_tokens.weight".to_string(), m.embed_tokens.weight.clone())];
    for (i, l) in m.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), l.input_layernorm.clone()));
        for (n, lin) in [
            ("self_attn.q_proj", &l.self_attn.q_proj),
            ("self_attn.k_proj", &l.self_attn.k_proj),
            ("self_attn.v_proj", &l.self_attn.v_proj),
            ("self_attn.o_proj", &l.self_attn.o_proj),
        ] {
            out.push((format!("{p}.{n}.weight"), dense(lin)?));
            if let Some(b) = &lin.bias {
                out.push((format!("{p}.{n}.bias"), b.clone()));
            }
        }
        if let (Some(qn), Some(kn)) = (&l.self_attn.q_norm, &l.self_attn.k_norm) {
            out.push((format!("{p}.self_attn.q_norm.weight"), qn.clone()));
            out.push((format!("{p}.self_attn.k_norm.weight"), kn.clone()));
        }
        for (n, lin) in [
            ("mlp.gate_proj", &l.mlp.gate_proj),
            ("mlp.up_proj", &l.mlp.up_proj),
            ("mlp.down_proj", &l.mlp.down_proj),
        ] {
            out.push((format!("{p}.{n}.weight"), dense(lin)?));
            if let Some(b) = &lin.bias {
                out.push((format!("{p}.{n}.bias"), b.clone()));
            }
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), l.post_attention_layernorm.clone()));
    }
    out.push(("model.norm.weight".into(), m.norm.clone()));
    match m.info().task {
        Task::SeqCls => out.push(("score.weight".into(), dense(&m.lm_head)?)),
        _ if !m.config.tie_word_embeddings => out.push(("lm_head.weight".into(), dense(&m.lm_head)?)),
        _ => {}
    }
    Ok(out)
}

/// config.json as transformers 5 writes it for this model (the fields that differ from the
/// defaults of `LlamaConfig` / `Qwen2Config` / `MistralConfig`, sorted by key; SmolLM3's
/// `no_rope_layers` written out).
fn hf_config(m: &LlamaForCausalLM) -> serde_json::Value {
    let c = &m.config;
    let dtype = match m.dtype {
        candle_core::DType::F16 => "float16",
        candle_core::DType::BF16 => "bfloat16",
        _ => "float32",
    };
    let one_or_many = |v: &[u32]| match v {
        [] => serde_json::Value::Null,
        [x] => serde_json::json!(x),
        many => serde_json::json!(many),
    };
    let mut v = serde_json::json!({
        "architectures": [m.info().architecture],
        "attention_bias": c.attention_bias,
        "attention_dropout": 0.0,
        "bos_token_id": c.bos_token_id,
        "dtype": dtype,
        "eos_token_id": one_or_many(&c.eos_token_id),
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "mlp_bias": c.mlp_bias,
        "model_type": c.model_type,
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads,
        "pad_token_id": c.pad_token_id,
        "pretraining_tp": 1,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": c.rope_parameters_json(),
        "tie_word_embeddings": c.tie_word_embeddings,
        "transformers_version": "5.18.0",
        "use_cache": true,
        "vocab_size": c.vocab_size,
    });
    let o = v.as_object_mut().expect("object");
    match c.model_type.as_str() {
        "qwen2" => {
            o.remove("attention_bias");
            o.remove("mlp_bias");
            o.remove("pretraining_tp");
            o.remove("head_dim");
            o.insert("use_sliding_window".into(), false.into());
            o.insert("sliding_window".into(), serde_json::Value::Null);
            o.insert("max_window_layers".into(), c.num_hidden_layers.into());
        }
        "qwen3" => {
            o.remove("mlp_bias");
            o.remove("pretraining_tp");
            o.insert("use_sliding_window".into(), false.into());
            o.insert("sliding_window".into(), serde_json::Value::Null);
            o.insert("max_window_layers".into(), c.num_hidden_layers.into());
            o.insert("layer_types".into(), vec!["full_attention"; c.num_hidden_layers].into());
        }
        "smollm3" => {
            o.remove("pretraining_tp");
            let rope_layers: Vec<u8> = (0..c.num_hidden_layers).map(|i| u8::from(c.layer_uses_rope(i))).collect();
            o.insert("no_rope_layers".into(), rope_layers.into());
            o.insert("use_sliding_window".into(), false.into());
            o.insert("sliding_window".into(), serde_json::Value::Null);
            o.insert("layer_types".into(), vec!["full_attention"; c.num_hidden_layers].into());
        }
        "mistral" => {
            o.remove("attention_bias");
            o.remove("mlp_bias");
            o.remove("pretraining_tp");
            o.insert("sliding_window".into(), serde_json::Value::Null);
        }
        _ => {}
    }
    if let Some(n) = m.info().num_labels {
        let id2label: serde_json::Map<String, serde_json::Value> = (0..n).map(|i| (i.to_string(), format!("LABEL_{i}").into())).collect();
        let label2id: serde_json::Map<String, serde_json::Value> = (0..n).map(|i| (format!("LABEL_{i}"), i.into())).collect();
        o.insert("id2label".into(), id2label.into());
        o.insert("label2id".into(), label2id.into());
    }
    v
}

/// Where the model was loaded from: the loader's record, else `name_or_path`.
fn source_of(m: &LlamaForCausalLM) -> Option<&Path> {
    m.config.source_path.as_deref().or_else(|| m.config.name_or_path.as_deref().map(Path::new))
}

/// `model-00001-of-00003.safetensors`-style shard name, as transformers names them.
fn shard_name(i: usize, n: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
}

fn is_weights_file(name: &str) -> bool {
    if name == "model.safetensors" || name == "model.safetensors.index.json" {
        return true;
    }
    let Some(rest) = name.strip_prefix("model-").and_then(|r| r.strip_suffix(".safetensors")) else { return false };
    let parts: Vec<&str> = rest.split("-of-").collect();
    parts.len() == 2 && parts.iter().all(|p| p.len() == 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Files of a HF model folder's tokenizer, copied as they are when the model came from one.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
];

/// Save the merged model `m` as a transformers model folder in `dir` (created if missing):
/// `config.json`, the weights in safetensors (`model.safetensors`, or shards of at most
/// `max_shard_size` bytes named `model-0000i-of-0000n.safetensors` with
/// `model.safetensors.index.json` mapping each tensor to its shard with `total_parameters` and
/// `total_size`, as transformers 5 writes them), and the tokenizer: for a model loaded from a HF folder its tokenizer files
/// (`tokenizer.json`, `tokenizer_config.json`, ...) are copied; for a model loaded from a GGUF
/// file, `tokenizer` (the one built from the GGUF metadata) is written as `tokenizer.json` with
/// a `tokenizer_config.json` naming its special tokens and chat template. Tensors keep the
/// model's dtype. Each file is written atomically; weight files of an earlier save that this
/// one does not use are removed afterwards. Returns the written file paths.
///
/// Errors: `InvalidState` when adapters are still attached; `ExportUnsupported` for a
/// non-Llama-family model; `InvalidArgument` for `max_shard_size = 0`; `Io`; `Tokenizer`.
pub fn save_merged_pretrained(m: &PeftModel, dir: &Path, tokenizer: Option<&Tokenizer>, opts: &MergedSaveOptions) -> Result<Vec<std::path::PathBuf>> {
    let llama = plain_llama(m, "savePretrained")?;
    if opts.max_shard_size == 0 {
        return Err(PeftError::invalid_arg("maxShardSize", "must be at least 1 byte"));
    }
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
    let state = llama_state_dict(llama)?;
    // Split in order, as transformers' `split_torch_state_dict_into_shards` does.
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![vec![]];
    // A tensor larger than the limit gets a shard of its own, as in `huggingface_hub`.
    let mut cur = 0u64;
    let mut total = 0u64;
    let mut params = 0u64;
    for (k, t) in state {
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        total += bytes;
        params += t.elem_count() as u64;
        let open = !shards.last().map(|s| s.is_empty()).unwrap_or(true);
        if open && cur + bytes > opts.max_shard_size {
            shards.push(vec![]);
            cur = 0;
        }
        cur += bytes;
        shards.last_mut().expect("one shard").push((k, t));
    }
    let n = shards.len();
    let mut written = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = if n == 1 { "model.safetensors".to_string() } else { shard_name(i, n) };
        let bytes = safetensors_bytes(shard, Some(&[("format", "pt")]))?;
        let path = dir.join(&name);
        write_atomic(&path, &bytes)?;
        written.push(path);
        for (k, _) in shard {
            weight_map.insert(k.clone(), name.clone().into());
        }
    }
    if n > 1 {
        let mut sorted: Vec<(String, serde_json::Value)> = weight_map.into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let index = serde_json::json!({
            "metadata": { "total_parameters": params, "total_size": total },
            "weight_map": serde_json::Map::from_iter(sorted),
        });
        let path = dir.join("model.safetensors.index.json");
        write_atomic(&path, (crate::io::python_json_dumps(&index) + "\n").as_bytes())?;
        written.push(path);
    }
    let cfg_path = dir.join("config.json");
    write_atomic(&cfg_path, (crate::io::python_json_dumps(&hf_config(llama)) + "\n").as_bytes())?;
    written.push(cfg_path);

    // Tokenizer files.
    let source = source_of(llama).filter(|p| p.is_dir());
    match (source, tokenizer) {
        (Some(src), _) => {
            for f in TOKENIZER_FILES {
                let from = src.join(f);
                if from.is_file() && src.canonicalize().ok() != dir.canonicalize().ok() {
                    let bytes = std::fs::read(&from).map_err(|e| PeftError::io(&from, e))?;
                    let to = dir.join(f);
                    write_atomic(&to, &bytes)?;
                    written.push(to);
                }
            }
        }
        (None, Some(tok)) => {
            let tpath = dir.join("tokenizer.json");
            write_atomic(&tpath, tok.to_json()?.as_bytes())?;
            written.push(tpath);
            let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).map(serde_json::Value::from).unwrap_or(serde_json::Value::Null);
            let mut tc = serde_json::json!({
                "backend": "tokenizers",
                "bos_token": name(tok.bos_token_id()),
                "eos_token": name(tok.eos_token_id()),
                "pad_token": name(tok.pad_token_id()),
                "model_max_length": llama.config.max_position_embeddings,
                "tokenizer_class": "TokenizersBackend",
            });
            if let Some(t) = tok.chat_template() {
                tc["chat_template"] = t.into();
            }
            let cpath = dir.join("tokenizer_config.json");
            write_atomic(&cpath, (crate::io::python_json_dumps(&tc) + "\n").as_bytes())?;
            written.push(cpath);
        }
        (None, None) => {}
    }

    // Weight files of an earlier save that this one replaced.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_weights_file(&name) && !written.iter().any(|p| p.file_name().map(|f| f.to_string_lossy() == name).unwrap_or(false)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(written)
}

/// Write the merged model `m` as a GGUF file for llama.cpp at `out` (atomically).
///
/// The metadata comes from where the model was loaded (`source_path`, else `name_or_path`): a
/// Llama GGUF file's
/// metadata (hyper-parameters, tokenizer, chat template, ...) is copied; for a HF folder it is
/// built from the config and the folder's byte-level BPE tokenizer
/// ([`super::hf_metadata::hf_gguf_metadata`]). `general.file_type` is set for `outtype`, and the
/// model's merged weights are written under
/// llama.cpp's names with the q/k rows permuted as llama.cpp stores them. 1-D tensors (norms,
/// biases) are f32; the others `outtype` (Q8_0 falls back to F16 for rows that are not a
/// multiple of 32). Returns the tensors written with their types.
///
/// Errors: `InvalidState` when adapters are still attached or the source GGUF file no longer
/// matches the model; `ExportUnsupported` for a HF folder whose tokenizer is not byte-level BPE
/// (naming it), a non-Llama model or a sequence-classification head; `NotFound` when the
/// source file / folder (or its tokenizer.json) is gone; `GgufInvalid`; `Tokenizer`; `Io`.
pub fn export_merged_gguf(m: &PeftModel, out: &Path, outtype: GgmlType) -> Result<Vec<(String, GgmlType)>> {
    let llama = plain_llama(m, "exportGguf")?;
    if llama.info().task != Task::CausalLm {
        return Err(unsupported(format!("a {} head", llama.info().task.task_type()), "GGUF export writes causal LMs only"));
    }
    if llama.config.rope_scaling.is_some() {
        return Err(unsupported("RoPE scaling", "exportGguf does not write Llama 3.x RoPE scaling (`rope_freqs.weight`) yet"));
    }
    let (arch, permute) = gguf_architecture(&llama.config)?;
    let c = &llama.config;
    let mut w = GgufWriter::new();
    match source_of(llama) {
        Some(src) if src.is_file() && crate::model::loader::is_gguf(src) => {
            let content = crate::gguf::read_gguf_header(src)?;
            let scfg = crate::gguf::llama_config_from_gguf(&content, src)?;
            if (scfg.hidden_size, scfg.num_hidden_layers, scfg.vocab_size, scfg.tie_word_embeddings) != (c.hidden_size, c.num_hidden_layers, c.vocab_size, c.tie_word_embeddings) {
                return Err(PeftError::InvalidState(format!("{} no longer matches the loaded model's hyper-parameters", src.display())));
            }
            let mut keys: Vec<&String> = content.metadata.keys().collect();
            // general.* first, then the rest, each sorted (the reader does not keep the order).
            keys.sort_by_key(|k| (!k.starts_with("general."), k.as_str()));
            for k in keys {
                if k != "general.alignment" {
                    w.set(k, content.metadata[k].clone());
                }
            }
        }
        Some(dir) if dir.is_dir() => {
            for (k, v) in super::hf_metadata::hf_gguf_metadata(dir, c, arch)? {
                w.set(&k, v);
            }
        }
        other => {
            return Err(PeftError::NotFound {
                path: other.map(|p| p.to_path_buf()).unwrap_or_default(),
                what: "exportGguf reads the tokenizer of the GGUF file or HF folder the model was loaded from, and it is no longer there".into(),
            })
        }
    }
    w.set("general.architecture", Value::String(arch.into()));
    w.set("general.file_type", Value::U32(outtype.file_type()));
    w.set("general.quantization_version", Value::U32(2));
    let mut written = Vec::new();
    for (hf, t) in llama_state_dict(llama)? {
        let (module, leaf) = hf.rsplit_once('.').ok_or_else(|| PeftError::Internal(format!("bad name {hf}")))?;
        let g = hf_module_to_gguf(module).ok_or_else(|| PeftError::Internal(format!("no GGUF name for {hf}")))?;
        let mut t = t;
        if permute && g.ends_with(".attn_q") {
            t = permute_qk(&t, c.num_attention_heads)?;
        } else if permute && g.ends_with(".attn_k") {
            t = permute_qk(&t, c.num_key_value_heads)?;
        }
        let ty = if t.rank() == 1 { GgmlType::F32 } else { outtype };
        let name = format!("{g}.{leaf}");
        let used = w.add_tensor(&name, t, ty)?;
        written.push((name, used));
    }
    w.write(out)?;
    Ok(written)
}
