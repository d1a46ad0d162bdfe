//! Gemma 3 GGUF files (`general.architecture = "gemma3"`), as llama.cpp's
//! `convert_hf_to_gguf.py` (`Gemma3Model`) writes them, read as transformers'
//! `Gemma3ForCausalLM` weights and config.
//!
//! Names: `blk.N.attn_norm` → `input_layernorm`, `post_attention_norm` →
//! `post_attention_layernorm`, `ffn_norm` → `pre_feedforward_layernorm`, `post_ffw_norm` →
//! `post_feedforward_layernorm`, `attn_q_norm` / `attn_k_norm` → `self_attn.q_norm` / `k_norm`,
//! the linears as for Llama (q/k rows are not permuted: llama.cpp runs Gemma with NEOX RoPE).
//! Every `*norm.weight` is stored as `1 + w` (the converter's `norm_shift`); 1 is subtracted
//! here so that the tensors are transformers' `w`.
//!
//! Metadata (`gemma3.` prefix): `context_length`, `embedding_length`, `block_count`,
//! `feed_forward_length`, `attention.head_count`, `attention.head_count_kv`,
//! `attention.key_length` (= `value_length`), `attention.layer_norm_rms_epsilon`,
//! `rope.freq_base` (global layers), `rope.scaling.type` `linear` + `rope.scaling.factor`,
//! `attention.sliding_window`, `final_logit_softcapping`. What the converter does not write
//! takes llama.cpp's built-in Gemma 3 values unless the file has the key: the sliding pattern
//! (`attention.sliding_window_pattern`, an integer or per-layer booleans; default 6), the local
//! RoPE base (`rope.freq_base_swa`; default 10000) and the attention scale
//! (`attention.scale` = `query_pre_attn_scalar^-1/2`; default: `query_pre_attn_scalar` =
//! head_dim, or hidden / heads for the 62-layer 27B model, as llama.cpp's `f_attention_scale`). The vocabulary size is the embedding's row count.
//!
//! The tokenizer: llama.cpp writes Gemma's SentencePiece model (`tokenizer.ggml.model =
//! "llama"`), which [`Tokenizer::from_gguf`] builds as transformers' `GemmaTokenizer` (byte
//! fallback, `▁` for spaces, no prefix space, merges in token order; `<mask>` is added as a
//! special token when the vocabulary lacks it, as in transformers). A byte-level BPE (`gpt2`)
//! tokenizer is read as for Llama. Another tokenizer model (or a byte-level split with a
//! SentencePiece vocabulary) loads the model without a tokenizer, with a notice; malformed
//! tokenizer metadata is `GgufInvalid` naming the key.

use super::{check_tensor_shapes, decoder_tensor_shapes, dtype_name, embedding_rows, invalid, load_arch_weights, meta, open_gguf, opt_uint, optional_tokenizer, validate_tensor_infos, ArchWeights, GgufDims};
use crate::error::Result;
use crate::model::gemma3::{sliding_from_pattern, Gemma3Config};
use crate::tokenizer::Tokenizer;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A Gemma 3 GGUF file converted to transformers form.
#[derive(Debug)]
pub struct GgufGemma3 {
    pub config: Gemma3Config,
    /// Dequantized weights by transformers name (norm weights as transformers' `w`).
    pub tensors: HashMap<String, Tensor>,
    /// The file's tokenizer; `None` for a tokenizer model that is not built (see the module
    /// docs and `notices`).
    pub tokenizer: Option<Tokenizer>,
    pub notices: Vec<String>,
}

/// transformers' name of a Gemma 3 GGUF tensor; `None` for a name this architecture lacks.
pub fn gemma3_hf_name(name: &str) -> Option<String> {
    super::decoder_hf_name(name, |module| {
        let hf = match module {
            "attn_norm" => "input_layernorm",
            "post_attention_norm" => "post_attention_layernorm",
            "ffn_norm" => "pre_feedforward_layernorm",
            "post_ffw_norm" => "post_feedforward_layernorm",
            "attn_q_norm" => "self_attn.q_norm",
            "attn_k_norm" => "self_attn.k_norm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            _ => return None,
        };
        Some((hf, false))
    })
}

/// The [`Gemma3Config`] of a `gemma3` GGUF file's metadata (see the module docs).
///
/// Errors: `GgufInvalid` for another architecture, a missing or mistyped key, inconsistent
/// head counts, an unsupported RoPE scaling or a sliding pattern of the wrong length.
pub fn gemma3_config_from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Gemma3Config> {
    let md = &content.metadata;
    let arch = meta::string(md, "general.architecture", path)?.unwrap_or_default();
    if arch != "gemma3" {
        return Err(invalid(path, format!("architecture `{arch}` is not gemma3")));
    }
    let k = |key: &str| format!("gemma3.{key}");
    let GgufDims { hidden, layers, ffn, heads, kv_heads, context } = GgufDims::read(content, "gemma3", path)?;
    let head_dim = opt_uint(content, &k("attention.key_length"), path)?.unwrap_or(hidden / heads);
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(invalid(path, format!("head dimension {head_dim} must be positive and even (RoPE)")));
    }
    if let Some(v) = opt_uint(content, &k("attention.value_length"), path)? {
        if v != head_dim {
            return Err(invalid(path, format!("gemma3.attention.value_length {v} != key_length {head_dim} is not supported")));
        }
    }
    let rope_linear_factor = match meta::string(md, &k("rope.scaling.type"), path)?.as_deref() {
        None | Some("none") => None,
        Some("linear") => match meta::float(md, &k("rope.scaling.factor"), path)? {
            Some(f) if f.is_finite() && f > 0.0 => Some(f),
            _ => return Err(invalid(path, "rope.scaling.type linear needs a positive gemma3.rope.scaling.factor")),
        },
        Some(t) => return Err(invalid(path, format!("RoPE scaling `{t}` (gemma3.rope.scaling.type) is not supported (supported: linear)"))),
    };
    let sliding_layers = match md.get(&k("attention.sliding_window_pattern")) {
        None => sliding_from_pattern(layers, 6),
        Some(gguf_file::Value::Array(a)) => {
            let v: Option<Vec<bool>> = a.iter().map(|x| if let gguf_file::Value::Bool(b) = x { Some(*b) } else { None }).collect();
            match v {
                Some(v) if v.len() == layers => v,
                _ => return Err(invalid(path, format!("gemma3.attention.sliding_window_pattern must be {layers} booleans or an integer"))),
            }
        }
        Some(_) => sliding_from_pattern(layers, opt_uint(content, &k("attention.sliding_window_pattern"), path)?.unwrap_or(6)),
    };
    let rms_norm_eps = meta::float(md, &k("attention.layer_norm_rms_epsilon"), path)?.unwrap_or(1e-6);
    let rope_theta = meta::float(md, &k("rope.freq_base"), path)?.unwrap_or(1_000_000.0);
    let rope_local_theta = meta::float(md, &k("rope.freq_base_swa"), path)?.unwrap_or(10_000.0);
    if !(rope_theta > 0.0 && rope_local_theta > 0.0 && rms_norm_eps >= 0.0) {
        return Err(invalid(path, "rope.freq_base, rope.freq_base_swa and layer_norm_rms_epsilon must be positive"));
    }
    let vocab_size = embedding_rows(content, path)?;
    let tok_id = |key: &str| -> Result<Option<u32>> {
        Ok(meta::uint(md, key, path)?.filter(|&v| v < vocab_size as u64).map(|v| v as u32))
    };
    let positive = |key: &str| -> Result<Option<f64>> { Ok(meta::float(md, &k(key), path)?.filter(|c| *c > 0.0)) };
    Ok(Gemma3Config {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps,
        query_pre_attn_scalar: match meta::float(md, &k("attention.scale"), path)? {
            Some(s) if s.is_finite() && s > 0.0 => 1.0 / (s * s),
            Some(s) => return Err(invalid(path, format!("gemma3.attention.scale must be positive, found {s}"))),
            None if layers == 62 => (hidden / heads) as f64,
            None => head_dim as f64,
        },
        sliding_window: opt_uint(content, &k("attention.sliding_window"), path)?.filter(|&w| w > 0),
        sliding_layers,
        rope_theta,
        rope_local_theta,
        rope_linear_factor,
        final_logit_softcapping: positive("final_logit_softcapping")?,
        attn_logit_softcapping: positive("attn_logit_softcapping")?,
        max_position_embeddings: context,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: false,
        bos_token_id: tok_id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: tok_id("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
        pad_token_id: tok_id("tokenizer.ggml.padding_token_id")?,
        dtype: None,
        name_or_path: meta::string(md, "general.name", path)?,
        source_path: None,
        raw: None,
    })
}

/// Load a Gemma 3 GGUF file: every tensor dequantized (f32 on the CPU), norm weights shifted
/// back by −1, converted to `dtype` on `device`; progress in tensors through `ctl`.
///
/// Errors: `GgufInvalid` for a malformed file, a missing, unexpected or misshapen tensor, or
/// the metadata errors of [`gemma3_config_from_gguf`]; `Aborted`.
pub fn load_gguf_gemma3(path: &Path, dtype: DType, device: &Device, ctl: &crate::progress::Control) -> Result<GgufGemma3> {
    let (content, mut reader, file_size) = open_gguf(path)?;
    validate_tensor_infos(&content, file_size, path)?;
    let mut config = gemma3_config_from_gguf(&content, path)?;
    config.dtype = Some(dtype_name(dtype));
    let c = &config;
    let (h, hd, f) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let per_layer = |l: usize| {
        let norms = [("attn_norm", h), ("post_attention_norm", h), ("ffn_norm", h), ("post_ffw_norm", h), ("attn_q_norm", hd), ("attn_k_norm", hd)];
        let linear = [("attn_q", q, h), ("attn_k", kv, h), ("attn_v", kv, h), ("attn_output", h, q), ("ffn_gate", f, h), ("ffn_up", f, h), ("ffn_down", h, f)];
        let norms = norms.into_iter().map(|(n, d)| (format!("blk.{l}.{n}.weight"), vec![d]));
        norms.chain(linear.into_iter().map(|(n, o, i)| (format!("blk.{l}.{n}.weight"), vec![o, i]))).collect()
    };
    let expected = decoder_tensor_shapes(&content, "gemma3", (c.vocab_size, h, c.tie_word_embeddings, c.num_hidden_layers), vec![], per_layer, path)?;
    check_tensor_shapes(&content, &expected, &format!("{}-layer gemma3", c.num_hidden_layers), path)?;
    let mut notices = Vec::new();
    let tokenizer = optional_tokenizer(&content, path, &mut notices)?;
    // Gemma3Model.norm_shift: llama.cpp stores `1 + w`.
    let shift = |name: &str, t: Tensor| -> Result<Tensor> { if name.ends_with("norm.weight") { Ok((t.to_dtype(DType::F32)? - 1.0)?) } else { Ok(t) } };
    let arch = ArchWeights { hf_name: gemma3_hf_name, fix: Some(&shift) };
    let tensors = load_arch_weights(&content, &mut reader, &expected, &arch, (0, expected.len()), dtype, device, ctl, path)?;
    Ok(GgufGemma3 { config, tensors, tokenizer, notices })
}
