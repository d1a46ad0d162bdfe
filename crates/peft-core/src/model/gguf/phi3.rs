//! Phi-3 GGUF files (`general.architecture = "phi3"`), as llama.cpp's `convert_hf_to_gguf.py`
//! (`Phi3MiniModel`) writes them, read as transformers' `Phi3ForCausalLM` weights and config.
//!
//! Names: `blk.N.attn_qkv` → `self_attn.qkv_proj` (fused, q then k then v rows, not
//! permuted: llama.cpp runs Phi-3 with NEOX RoPE), `attn_output` → `o_proj`, `ffn_up` →
//! `mlp.gate_up_proj` (gate rows then up rows, as transformers), `ffn_down` → `down_proj`,
//! `attn_norm` / `ffn_norm` → `input_layernorm` / `post_attention_layernorm`; `output.weight`
//! absent = tied embeddings. The global `rope_factors_long.weight` / `rope_factors_short.weight`
//! (`[rotary_dim / 2]`) are longrope's `long_factor` / `short_factor`.
//!
//! Metadata (`phi3.` prefix): `context_length` (max_position_embeddings),
//! `rope.scaling.original_context_length`, `embedding_length`, `feed_forward_length`,
//! `block_count`, `attention.head_count`, `attention.head_count_kv`,
//! `attention.layer_norm_rms_epsilon`, `rope.dimension_count` (rotated dims per head:
//! `partial_rotary_factor = dimension_count / head_dim`), `rope.freq_base`,
//! `attention.sliding_window` (0 = none), `rope.scaling.attn_factor` (longrope's attention
//! factor; default transformers' rule from context_length / original). The short or long
//! factors are chosen per forward by sequence length as transformers does (llama.cpp chooses
//! by context size), so the file gives the HF folder's logits.
//!
//! The tokenizer: a byte-level BPE (`gpt2`, Phi-4-mini) and llama.cpp's SentencePiece
//! (`llama`, Phi-3 / Phi-3.5-mini) are built, the latter as transformers builds Phi-3's from a
//! GGUF (byte fallback, a `▁` prepended and spaces as `▁` by the normalizer, no pre-tokenizer).
//! Another tokenizer model loads the model without a tokenizer, with a notice; malformed
//! tokenizer metadata is `GgufInvalid` naming the key.

use super::{check_tensor_shapes, decoder_tensor_shapes, dtype_name, embedding_rows, invalid, load_arch_weights, meta, open_gguf, opt_uint, optional_tokenizer, read_dequantized, validate_tensor_infos, ArchWeights, GgufDims};
use crate::error::Result;
use crate::model::phi3::{longrope_attention_factor, LongRope, Phi3Config};
use crate::tokenizer::Tokenizer;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A Phi-3 GGUF file converted to transformers form.
#[derive(Debug)]
pub struct GgufPhi3 {
    pub config: Phi3Config,
    /// Dequantized weights by transformers name.
    pub tensors: HashMap<String, Tensor>,
    /// The file's tokenizer; `None` for a tokenizer model that is not built (see the module
    /// docs and `notices`).
    pub tokenizer: Option<Tokenizer>,
    pub notices: Vec<String>,
}

/// transformers' name of a Phi-3 GGUF weight; `None` for a name this architecture lacks (the
/// rope factor tensors are config, not weights).
pub fn phi3_hf_name(name: &str) -> Option<String> {
    super::decoder_hf_name(name, |module| {
        let hf = match module {
            "attn_norm" => "input_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            "attn_qkv" => "self_attn.qkv_proj",
            "attn_output" => "self_attn.o_proj",
            "ffn_up" => "mlp.gate_up_proj",
            "ffn_down" => "mlp.down_proj",
            _ => return None,
        };
        Some((hf, false))
    })
}

/// The [`Phi3Config`] of a `phi3` GGUF file's metadata, without the longrope factors (which
/// are tensors; [`load_gguf_phi3`] adds them).
///
/// Errors: `GgufInvalid` for another architecture, a missing or mistyped key, or inconsistent
/// sizes.
pub fn phi3_config_from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Phi3Config> {
    let md = &content.metadata;
    let arch = meta::string(md, "general.architecture", path)?.unwrap_or_default();
    if arch != "phi3" {
        return Err(invalid(path, format!("architecture `{arch}` is not phi3")));
    }
    let k = |key: &str| format!("phi3.{key}");
    let GgufDims { hidden, layers, ffn, heads, kv_heads, context } = GgufDims::read(content, "phi3", path)?;
    if hidden % heads != 0 {
        return Err(invalid(path, format!("phi3.embedding_length {hidden} is not a multiple of phi3.attention.head_count {heads}")));
    }
    let head_dim = hidden / heads;
    let rotary_dim = opt_uint(content, &k("rope.dimension_count"), path)?.unwrap_or(head_dim);
    if rotary_dim == 0 || rotary_dim % 2 != 0 || rotary_dim > head_dim {
        return Err(invalid(path, format!("phi3.rope.dimension_count {rotary_dim} must be even and within head_dim {head_dim}")));
    }
    let rms_norm_eps = meta::float(md, &k("attention.layer_norm_rms_epsilon"), path)?.unwrap_or(1e-5);
    let rope_theta = meta::float(md, &k("rope.freq_base"), path)?.unwrap_or(10_000.0);
    if !(rope_theta > 0.0 && rms_norm_eps >= 0.0) {
        return Err(invalid(path, "rope.freq_base and layer_norm_rms_epsilon must be positive"));
    }
    let vocab_size = embedding_rows(content, path)?;
    let tok_id = |key: &str| -> Result<Option<u32>> { Ok(meta::uint(md, key, path)?.filter(|&v| v < vocab_size as u64).map(|v| v as u32)) };
    Ok(Phi3Config {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        rotary_dim,
        partial_rotary_factor: rotary_dim as f64 / head_dim as f64,
        longrope: None,
        sliding_window: opt_uint(content, &k("attention.sliding_window"), path)?.filter(|&w| w > 0),
        max_position_embeddings: context,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_token_id: tok_id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: tok_id("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
        pad_token_id: tok_id("tokenizer.ggml.padding_token_id")?,
        dtype: None,
        name_or_path: meta::string(md, "general.name", path)?,
        source_path: None,
        raw: None,
    })
}

/// Load a Phi-3 GGUF file: every tensor dequantized (f32 on the CPU), converted to `dtype` on
/// `device`; the rope factor tensors become the config's longrope; progress in tensors through
/// `ctl`.
///
/// Errors: `GgufInvalid` for a malformed file, a missing, unexpected or misshapen tensor, only
/// one of the two rope factor tensors, or the metadata errors of [`phi3_config_from_gguf`];
/// `Aborted`.
pub fn load_gguf_phi3(path: &Path, dtype: DType, device: &Device, ctl: &crate::progress::Control) -> Result<GgufPhi3> {
    let (content, mut reader, file_size) = open_gguf(path)?;
    validate_tensor_infos(&content, file_size, path)?;
    let mut config = phi3_config_from_gguf(&content, path)?;
    config.dtype = Some(dtype_name(dtype));
    let c = &config;
    let (h, hd, f) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let per_layer = |l: usize| {
        let shapes = [("attn_norm", vec![h]), ("ffn_norm", vec![h]), ("attn_qkv", vec![q + 2 * kv, h]), ("attn_output", vec![h, q]), ("ffn_up", vec![2 * f, h]), ("ffn_down", vec![h, f])];
        shapes.into_iter().map(|(n, s)| (format!("blk.{l}.{n}.weight"), s)).collect()
    };
    let expected = decoder_tensor_shapes(&content, "phi3", (c.vocab_size, h, c.tie_word_embeddings, c.num_hidden_layers), vec![], per_layer, path)?;
    let factors = ["rope_factors_long.weight", "rope_factors_short.weight"];
    let n_factors = factors.iter().filter(|n| content.tensor_infos.contains_key(**n)).count();
    if n_factors == 1 {
        return Err(invalid(path, "one of rope_factors_long.weight / rope_factors_short.weight without the other"));
    }
    let mut checked = expected.clone();
    if n_factors == 2 {
        checked.extend(factors.iter().map(|n| (n.to_string(), vec![c.rotary_dim / 2])));
    }
    check_tensor_shapes(&content, &checked, &format!("{}-layer phi3", c.num_hidden_layers), path)?;
    if n_factors == 2 {
        let vec = |t: Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?) };
        let long_factor = vec(read_dequantized(&content, &mut reader, factors[0], path)?)?;
        let short_factor = vec(read_dequantized(&content, &mut reader, factors[1], path)?)?;
        let md = &content.metadata;
        let original = opt_uint(&content, "phi3.rope.scaling.original_context_length", path)?.unwrap_or(c.max_position_embeddings);
        if original < 2 {
            return Err(invalid(path, format!("phi3.rope.scaling.original_context_length must be at least 2, found {original}")));
        }
        let attention_factor = match meta::float(md, "phi3.rope.scaling.attn_factor", path)? {
            Some(a) if a.is_finite() && a > 0.0 => a,
            Some(a) => return Err(invalid(path, format!("phi3.rope.scaling.attn_factor must be positive, found {a}"))),
            None => longrope_attention_factor(c.max_position_embeddings as f64 / original as f64, original),
        };
        config.longrope = Some(LongRope { short_factor, long_factor, original_max_position_embeddings: original, attention_factor });
    }
    let mut notices = Vec::new();
    let tokenizer = optional_tokenizer(&content, path, &mut notices)?;
    let arch = ArchWeights { hf_name: phi3_hf_name, fix: None };
    let tensors = load_arch_weights(&content, &mut reader, &expected, &arch, (checked.len() - expected.len(), checked.len()), dtype, device, ctl, path)?;
    Ok(GgufPhi3 { config, tensors, tokenizer, notices })
}
