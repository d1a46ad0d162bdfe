//! GGUF metadata for a model loaded from a Hugging Face folder: the architecture keys from its
//! config ([`LlamaConfig`]) and the tokenizer keys from its `tokenizer.json` /
//! `tokenizer_config.json`, as llama.cpp's `convert_hf_to_gguf.py` writes them for byte-level
//! BPE tokenizers (`tokenizer.ggml.model = "gpt2"`).
//!
//! * `tokenizer.ggml.tokens`: every id `0..vocab_size` (the BPE vocabulary and the added
//!   tokens); ids that have no token (a padded embedding) get `[PAD<id>]`, type unused (5).
//! * `tokenizer.ggml.token_type`: 3 (control) for special added tokens, 4 (user-defined) for
//!   other added tokens, 1 (normal) otherwise.
//! * `tokenizer.ggml.merges`: the BPE merges as `"left right"` strings.
//! * `tokenizer.ggml.pre`: llama.cpp's name of the pre-tokenizer, recognised from the
//!   `pre_tokenizer` of tokenizer.json: `ByteLevel` alone → `gpt-2`; `Digits` (single digits) +
//!   `ByteLevel` → `smollm`; Llama 3's `Split` regex + `ByteLevel` → `llama-bpe`; Qwen2's →
//!   `qwen2`. (llama.cpp's converter recognises pre-tokenizers by hashing the tokens of a test
//!   text; the structure is what those hashes stand for.)
//! * special ids from config.json, `add_bos_token` from tokenizer_config.json, the chat
//!   template from tokenizer_config.json or `chat_template.jinja`.
//!
//! Other tokenizers (WordLevel, WordPiece, SentencePiece/Unigram, BPE without byte-level
//! pre-tokenization, unrecognised pre-tokenizers) are refused with `ExportUnsupported`.

use crate::error::{PeftError, Result};
use crate::model::config::LlamaConfig;
use crate::tokenizer::{LLAMA3_SPLIT_REGEX, QWEN2_SPLIT_REGEX};
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use std::path::Path;

fn unsupported(what: impl Into<String>, msg: impl Into<String>) -> PeftError {
    PeftError::ExportUnsupported { what: what.into(), msg: msg.into() }
}

/// llama.cpp's pre-tokenizer name for a tokenizer.json `pre_tokenizer` (see the module docs).
fn pre_name(pre: &Json) -> Option<&'static str> {
    let ty = |v: &Json| v.get("type").and_then(|t| t.as_str()).unwrap_or_default().to_string();
    let byte_level = |v: &Json, regex: bool| ty(v) == "ByteLevel" && v.get("use_regex").and_then(|x| x.as_bool()).unwrap_or(true) == regex;
    if byte_level(pre, true) {
        return Some("gpt-2");
    }
    let items = pre.get("pretokenizers").and_then(|p| p.as_array()).filter(|_| ty(pre) == "Sequence")?;
    match items.as_slice() {
        [d, b] if ty(d) == "Digits" && d.get("individual_digits").and_then(|x| x.as_bool()) == Some(true) && byte_level(b, true) => Some("smollm"),
        [s, b] if ty(s) == "Split" && byte_level(b, false) => {
            match s.get("pattern").and_then(|p| p.get("Regex")).and_then(|r| r.as_str()) {
                Some(r) if r == LLAMA3_SPLIT_REGEX => Some("llama-bpe"),
                Some(r) if r == QWEN2_SPLIT_REGEX => Some("qwen2"),
                _ => None,
            }
        }
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| PeftError::Tokenizer(format!("{}: not valid JSON: {e}", path.display())))
}

/// The GGUF metadata (architecture + tokenizer) of the Llama-family model `cfg` whose HF folder
/// is `dir`, for the GGUF architecture `arch`. See the module docs.
///
/// Errors: `NotFound` (no tokenizer.json); `ExportUnsupported` for a tokenizer llama.cpp's
/// `gpt2` model cannot hold (naming its model type or pre-tokenizer); `Tokenizer` for a
/// malformed tokenizer.json.
pub fn hf_gguf_metadata(dir: &Path, cfg: &LlamaConfig, arch: &str) -> Result<Vec<(String, Value)>> {
    let tpath = dir.join("tokenizer.json");
    if !tpath.is_file() {
        return Err(PeftError::NotFound { path: tpath, what: "exportGguf needs the model folder's tokenizer.json to write the GGUF tokenizer".into() });
    }
    let tj = read_json(&tpath)?;
    let model = tj.get("model").cloned().unwrap_or(Json::Null);
    let mtype = model.get("type").and_then(|t| t.as_str()).unwrap_or("?");
    if mtype != "BPE" {
        return Err(unsupported(format!("a `{mtype}` tokenizer ({})", tpath.display()), "GGUF export writes byte-level BPE tokenizers (llama.cpp's `gpt2` model) only"));
    }
    let pre = pre_name(tj.get("pre_tokenizer").unwrap_or(&Json::Null))
        .ok_or_else(|| unsupported(format!("the pre-tokenizer of {}", tpath.display()), format!("not one llama.cpp names here (ByteLevel, SmolLM2, Llama 3, Qwen2): {}", tj.get("pre_tokenizer").unwrap_or(&Json::Null))))?;
    let bad = |m: String| PeftError::Tokenizer(format!("{}: {m}", tpath.display()));
    let n = cfg.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![1i32; n];
    let vocab = model.get("vocab").and_then(|v| v.as_object()).ok_or_else(|| bad("`model.vocab` is not an object".into()))?;
    let mut put = |id: u64, tok: &str, ty: i32| -> Result<()> {
        let i = usize::try_from(id).ok().filter(|&i| i < n).ok_or_else(|| unsupported(format!("token `{tok}` (id {id})"), format!("{}: id beyond the model's vocab_size {n}", tpath.display())))?;
        tokens[i] = Some(tok.to_string());
        types[i] = ty;
        Ok(())
    };
    for (tok, id) in vocab {
        put(id.as_u64().ok_or_else(|| bad(format!("id of `{tok}` is not an integer")))?, tok, 1)?;
    }
    for a in tj.get("added_tokens").and_then(|a| a.as_array()).map(|a| a.as_slice()).unwrap_or_default() {
        let (Some(id), Some(content)) = (a.get("id").and_then(|x| x.as_u64()), a.get("content").and_then(|x| x.as_str())) else {
            return Err(bad(format!("malformed added token {a}")));
        };
        let special = a.get("special").and_then(|x| x.as_bool()).unwrap_or(false);
        put(id, content, if special { 3 } else { 4 })?;
    }
    let mut merges = Vec::new();
    for m in model.get("merges").and_then(|m| m.as_array()).map(|m| m.as_slice()).unwrap_or_default() {
        match m {
            Json::String(s) => merges.push(Value::String(s.clone())),
            Json::Array(p) if p.len() == 2 && p.iter().all(|x| x.is_string()) => {
                merges.push(Value::String(format!("{} {}", p[0].as_str().unwrap_or_default(), p[1].as_str().unwrap_or_default())))
            }
            other => return Err(bad(format!("malformed merge {other}"))),
        }
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t {
            Some(t) => Value::String(t),
            None => {
                types[i] = 5;
                Value::String(format!("[PAD{i}]"))
            }
        })
        .collect();

    let tc = dir.join("tokenizer_config.json");
    let tc = if tc.is_file() { read_json(&tc)? } else { Json::Null };
    let chat = match tc.get("chat_template").and_then(|c| c.as_str()) {
        Some(t) => Some(t.to_string()),
        None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };

    let mut md: Vec<(String, Value)> = Vec::new();
    let mut set = |k: &str, v: Value| md.push((k.to_string(), v));
    set("general.architecture", Value::String(arch.into()));
    set("general.type", Value::String("model".into()));
    let name = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    set("general.name", Value::String(name));
    let a = |k: &str| format!("{arch}.{k}");
    set(&a("block_count"), Value::U32(cfg.num_hidden_layers as u32));
    set(&a("context_length"), Value::U32(cfg.max_position_embeddings as u32));
    set(&a("embedding_length"), Value::U32(cfg.hidden_size as u32));
    set(&a("feed_forward_length"), Value::U32(cfg.intermediate_size as u32));
    set(&a("attention.head_count"), Value::U32(cfg.num_attention_heads as u32));
    set(&a("attention.head_count_kv"), Value::U32(cfg.num_key_value_heads as u32));
    set(&a("rope.freq_base"), Value::F32(cfg.rope_theta as f32));
    set(&a("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32));
    set(&a("vocab_size"), Value::U32(n as u32));
    set(&a("rope.dimension_count"), Value::U32(cfg.head_dim as u32));
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size {
        set(&a("attention.key_length"), Value::U32(cfg.head_dim as u32));
        set(&a("attention.value_length"), Value::U32(cfg.head_dim as u32));
    }
    set("tokenizer.ggml.model", Value::String("gpt2".into()));
    set("tokenizer.ggml.pre", Value::String(pre.into()));
    set("tokenizer.ggml.tokens", Value::Array(tokens));
    set("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect()));
    set("tokenizer.ggml.merges", Value::Array(merges));
    if let Some(b) = cfg.bos_token_id {
        set("tokenizer.ggml.bos_token_id", Value::U32(b));
    }
    if let Some(e) = cfg.eos_token_id.first() {
        set("tokenizer.ggml.eos_token_id", Value::U32(*e));
    }
    if let Some(p) = cfg.pad_token_id {
        set("tokenizer.ggml.padding_token_id", Value::U32(p));
    }
    set("tokenizer.ggml.add_bos_token", Value::Bool(tc.get("add_bos_token").and_then(|x| x.as_bool()).unwrap_or(false)));
    set("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    if let Some(t) = chat {
        set("tokenizer.chat_template", Value::String(t));
    }
    Ok(md)
}
