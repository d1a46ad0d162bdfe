//! Loading Llama-architecture GGUF files (llama.cpp's format) as Hugging Face transformers
//! weights.
//!
//! The file is parsed with `candle_core::quantized::gguf_file` (GGUF spec:
//! <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>), every tensor is dequantized
//! (`QTensor::dequantize`) and converted to the requested dtype, renamed from llama.cpp's names
//! (`blk.0.attn_q.weight`) to transformers' (`model.layers.0.self_attn.q_proj.weight`), and the
//! q/k projection rows that llama.cpp's `convert_hf_to_gguf.py` permutes for its interleaved
//! RoPE are put back in Hugging Face's order (rotate-half RoPE), so that the result is the
//! state dict of the original `LlamaForCausalLM` checkpoint (up to quantization error).
//!
//! Robustness: the header (magic, version) is checked before candle parses the file; every
//! tensor's byte range is checked against the file size (with overflow-checked arithmetic)
//! before any tensor data is read; tensor shapes are checked against the hyper-parameters
//! before dequantizing; and candle's parser runs under `catch_unwind`, so a malformed file
//! yields `PeftError::GgufInvalid` rather than a panic (this requires `panic = "unwind"`, the
//! profile setting of this workspace).

use crate::error::{PeftError, Result};
pub(crate) use crate::gguf_container::meta;
use crate::gguf_container::{invalid, open_gguf, validate_tensor_infos};
use crate::model::config::LlamaConfig;
use crate::tokenizer::Tokenizer;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

/// A GGUF model converted to transformers form.
#[derive(Debug)]
pub struct GgufModel {
    /// Hyper-parameters from the `llama.*` and `tokenizer.ggml.*` metadata.
    pub config: LlamaConfig,
    /// Dequantized weights by transformers name, in the requested dtype and device, with
    /// transformers' shapes (`[out_features, in_features]` for linear weights,
    /// `[vocab, hidden]` for the embedding, `[hidden]` for RMSNorm weights). `lm_head.weight`
    /// is present only when the file has an `output.weight` tensor
    /// (`config.tie_word_embeddings` is false); otherwise the embedding is tied.
    pub tensors: HashMap<String, Tensor>,
    /// The tokenizer embedded in the file (see [`Tokenizer::from_gguf`]).
    pub tokenizer: Tokenizer,
    /// With [`load_gguf_opts`]`(keep_quantized = true)`: the decoder layers' linear weights
    /// (q/k/v/o, gate/up/down) whose GGUF type has integer kernels (`Q8_0`, `Q4_0`, `Q4_1`,
    /// `Q4_K`, `Q6_K`), kept quantized, by transformers name (`model.layers.0.self_attn.q_proj.weight`);
    /// `tensors` then holds a zero-stride placeholder of the right shape for each. The output
    /// head is kept too, as `lm_head.weight`: from `output.weight` (placeholder in `tensors`),
    /// or with tied embeddings from `token_embd.weight` (whose dequantized table stays in
    /// `tensors` for the embedding lookup). Empty otherwise.
    pub quantized: HashMap<String, std::sync::Arc<crate::engine::quant::QuantWeight>>,
    /// One line per GGUF type that was asked to stay quantized but was dequantized instead
    /// (no kernels for it), e.g. `"6 tensors of type Q6K dequantized to f32 (no integer kernels for this type)"`.
    pub notices: Vec<String>,
}

mod gemma3;
pub use gemma3::{gemma3_config_from_gguf, gemma3_hf_name, load_gguf_gemma3, GgufGemma3};
mod phi3;
pub use phi3::{load_gguf_phi3, phi3_config_from_gguf, phi3_hf_name, GgufPhi3};

/// `general.architecture` of a GGUF file (reads the header only).
///
/// Errors: as [`read_gguf_header`]; `GgufInvalid` when the key is missing.
pub fn gguf_architecture(path: &Path) -> Result<String> {
    let (content, _, _) = open_gguf(path)?;
    meta::string(&content.metadata, "general.architecture", path)?.ok_or_else(|| invalid(path, "missing metadata key `general.architecture`"))
}

/// Map a llama.cpp tensor name to its transformers name (`LlamaForCausalLM` state dict),
/// following the tensor table of llama.cpp's `gguf-py/gguf/tensor_mapping.py`:
///
/// | GGUF | transformers |
/// |---|---|
/// | `token_embd.weight` | `model.embed_tokens.weight` |
/// | `output_norm.weight` | `model.norm.weight` |
/// | `output.weight` | `lm_head.weight` |
/// | `blk.N.attn_norm.weight` | `model.layers.N.input_layernorm.weight` |
/// | `blk.N.attn_{q,k,v,output}.{weight,bias}` | `model.layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}` |
/// | `blk.N.attn_{q,k}_norm.weight` (Qwen3) | `model.layers.N.self_attn.{q,k}_norm.weight` |
/// | `blk.N.ffn_norm.weight` | `model.layers.N.post_attention_layernorm.weight` |
/// | `blk.N.ffn_{gate,up,down}.{weight,bias}` | `model.layers.N.mlp.{gate,up,down}_proj.{weight,bias}` |
///
/// Returns `None` for any other name. The layer index is not range-checked here.
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    decoder_hf_name(name, |module| {
        Some(match module {
            "attn_norm" => ("input_layernorm", false),
            "attn_q_norm" => ("self_attn.q_norm", false),
            "attn_k_norm" => ("self_attn.k_norm", false),
            "ffn_norm" => ("post_attention_layernorm", false),
            "attn_q" => ("self_attn.q_proj", true),
            "attn_k" => ("self_attn.k_proj", true),
            "attn_v" => ("self_attn.v_proj", true),
            "attn_output" => ("self_attn.o_proj", true),
            "ffn_gate" => ("mlp.gate_proj", true),
            "ffn_up" => ("mlp.up_proj", true),
            "ffn_down" => ("mlp.down_proj", true),
            _ => return None,
        })
    })
}

/// transformers' name of a decoder GGUF tensor: `token_embd` / `output_norm` / `output`, or
/// `blk.N.<module>.weight` (`.bias` where allowed) with `module(<module>)` = the architecture's
/// `(transformers module, may have a bias)`. `None` for any other name (a layer number with a
/// leading zero included).
pub(crate) fn decoder_hf_name(name: &str, module: impl Fn(&str) -> Option<(&'static str, bool)>) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let (layer, rest) = name.strip_prefix("blk.")?.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) || (layer.len() > 1 && layer.starts_with('0')) {
        return None;
    }
    let (m, param) = rest.rsplit_once('.')?;
    let (hf, bias) = module(m)?;
    match param {
        "weight" => {}
        "bias" if bias => {}
        _ => return None,
    }
    Some(format!("model.layers.{layer}.{hf}.{param}"))
}

/// The head count whose q/k row permutation llama.cpp applied to GGUF tensor `name`: the
/// attention heads for `attn_q`, the KV heads for `attn_k`, for the `llama` and `smollm3`
/// architectures only (convert_hf_to_gguf.py's `SmolLM3Model` is a `LlamaModel`; the NEOX-RoPE
/// architectures, Qwen2/Qwen3, keep Hugging Face's order); `None` otherwise.
fn permuted_heads(config: &LlamaConfig, name: &str) -> Option<usize> {
    if config.model_type != "llama" && config.model_type != "smollm3" {
        return None;
    }
    if name.contains(".attn_q.") {
        Some(config.num_attention_heads)
    } else if name.contains(".attn_k.") {
        Some(config.num_key_value_heads)
    } else {
        None
    }
}

/// Undo the row permutation that llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`)
/// applies to `q_proj` / `k_proj` weights and biases:
///
/// ```text
/// gguf = hf.reshape(n_head, 2, rows / n_head / 2, *rest).swapaxes(1, 2).reshape(hf.shape)
/// ```
///
/// i.e. within each head, row `j * head_dim/2 + i` of the HF weight (rotate-half RoPE pairs
/// dimension `i` with `i + head_dim/2`) becomes row `2 * i + j` (interleaved RoPE pairs
/// `2i` with `2i + 1`). The inverse applied here is
/// `gguf.reshape(n_head, head_dim/2, 2, *rest).swapaxes(1, 2).reshape(shape)`.
///
/// `w` has shape `[n_head * head_dim, in]` (weight) or `[n_head * head_dim]` (bias);
/// `n_head` is `llama.attention.head_count` for q and `head_count_kv` for k. Any dtype and
/// device. Errors: `InvalidArgument` for a scalar or when the first dimension is not a
/// multiple of `2 * n_head`.
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = *dims.first().ok_or_else(|| PeftError::invalid_arg("w", "unpermute_qk needs at least one dimension"))?;
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        return Err(PeftError::invalid_arg(
            "n_head",
            format!("unpermute_qk: {rows} rows are not a multiple of 2 * n_head ({n_head})"),
        ));
    }
    let half = rows / n_head / 2;
    let mut split = vec![n_head, half, 2];
    split.extend_from_slice(&dims[1..]);
    Ok(w.reshape(split)?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// [`unpermute_qk`] on the raw rows of a quantized `[rows, ·]` tensor (whole rows move, so the
/// blocks are untouched). Errors when `rows` is not a multiple of `2·n_head`.
fn unpermute_rows_raw(raw: &[u8], rows: usize, n_head: usize) -> std::result::Result<Vec<u8>, ()> {
    if n_head == 0 || rows == 0 || !rows.is_multiple_of(2 * n_head) || !raw.len().is_multiple_of(rows) {
        return Err(());
    }
    let rb = raw.len() / rows;
    let per_head = rows / n_head;
    let half = per_head / 2;
    let mut out = vec![0u8; raw.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                // new row (h, j, i) = old row (h, i, j): reshape(n_head, half, 2).swapaxes(1, 2)
                let (new, old) = (h * per_head + j * half + i, h * per_head + i * 2 + j);
                out[new * rb..(new + 1) * rb].copy_from_slice(&raw[old * rb..(old + 1) * rb]);
            }
        }
    }
    Ok(out)
}

fn req_uint(content: &gguf_file::Content, key: &str, path: &Path) -> Result<usize> {
    let v = meta::uint(&content.metadata, key, path)?
        .ok_or_else(|| invalid(path, format!("missing metadata key `{key}`")))?;
    usize::try_from(v).map_err(|_| invalid(path, format!("metadata `{key}` = {v} is too large")))
}

fn opt_uint(content: &gguf_file::Content, key: &str, path: &Path) -> Result<Option<usize>> {
    match meta::uint(&content.metadata, key, path)? {
        None => Ok(None),
        Some(v) => usize::try_from(v)
            .map(Some)
            .map_err(|_| invalid(path, format!("metadata `{key}` = {v} is too large"))),
    }
}

/// Build a [`LlamaConfig`] from the metadata of a `general.architecture = "llama"`, `"qwen3"`
/// or `"smollm3"` GGUF file (for `qwen3` / `smollm3` the keys below are prefixed with the
/// architecture instead of `llama.`; `qwen3` gets `qk_norm`; `smollm3` gets
/// `SmolLM3ForCausalLM`'s NoPE layers as llama.cpp builds them: no metadata key carries the
/// pattern, llama.cpp fixes `n_no_rope_layer_step = 4`, so layer `i` skips RoPE when
/// `(i + 1) % 4 == 0`, transformers' default `no_rope_layer_interval`).
///
/// Keys (GGUF spec, "LLM" section): `llama.context_length` → `max_position_embeddings`,
/// `llama.embedding_length` → `hidden_size`, `llama.feed_forward_length` →
/// `intermediate_size`, `llama.block_count` → `num_hidden_layers`,
/// `llama.attention.head_count` → `num_attention_heads`, `llama.attention.head_count_kv`
/// (default: head_count) → `num_key_value_heads`, `llama.rope.freq_base` (default 10000) →
/// `rope_theta`, `llama.attention.layer_norm_rms_epsilon` → `rms_norm_eps`,
/// `llama.attention.key_length` (default hidden/heads) → `head_dim`, `llama.vocab_size`
/// (default: length of `tokenizer.ggml.tokens`) → `vocab_size`, `tokenizer.ggml.bos_token_id`,
/// `eos_token_id` (+ `eot_token_id` when different), `padding_token_id`;
/// `tie_word_embeddings` is true when there is no `output.weight` tensor, `attention_bias` /
/// `mlp_bias` when `blk.0.attn_q.bias` / `blk.0.ffn_up.bias` exist; `name_or_path` is
/// `general.name` or the file stem. `dtype` is left `None` (set by [`load_gguf`]).
///
/// Errors (`GgufInvalid`): another architecture, a missing or mistyped required key,
/// inconsistent head counts, or features this crate does not implement (RoPE scaling other
/// than Llama 3.x's `rope_freqs.weight`, which [`load_gguf`] reads, partial rotary dimensions, mixture of experts, `value_length != key_length`).
pub fn llama_config_from_gguf(content: &gguf_file::Content, path: &Path) -> Result<LlamaConfig> {
    let md = &content.metadata;
    let arch = meta::string(md, "general.architecture", path)?
        .ok_or_else(|| invalid(path, "missing metadata key `general.architecture`"))?;
    if arch != "llama" && arch != "qwen3" && arch != "smollm3" {
        return Err(invalid(
            path,
            format!("unsupported architecture `{arch}` (general.architecture); only `llama`, `qwen3` and `smollm3` GGUF files are supported here"),
        ));
    }
    let k = |key: &str| format!("{arch}.{key}");
    let GgufDims { hidden, layers, ffn, heads, kv_heads, context: ctx } = GgufDims::read(content, &arch, path)?;
    let head_dim = match opt_uint(content, &k("attention.key_length"), path)? {
        Some(k) => k,
        None => {
            if hidden % heads != 0 {
                return Err(invalid(path, format!("embedding_length {hidden} is not a multiple of head_count {heads}")));
            }
            hidden / heads
        }
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(invalid(path, format!("head dimension {head_dim} must be positive and even (RoPE)")));
    }
    if let Some(v) = opt_uint(content, &k("attention.value_length"), path)? {
        if v != head_dim {
            return Err(invalid(path, format!("{arch}.attention.value_length {v} != key_length {head_dim} is not supported")));
        }
    }
    if let Some(r) = opt_uint(content, &k("rope.dimension_count"), path)? {
        if r != head_dim {
            return Err(invalid(
                path,
                format!("partial rotary embeddings ({arch}.rope.dimension_count {r} != head dim {head_dim}) are not supported"),
            ));
        }
    }
    if let Some(t) = meta::string(md, &k("rope.scaling.type"), path)? {
        if t != "none" {
            return Err(invalid(path, format!("RoPE scaling `{t}` ({arch}.rope.scaling.type) is not supported")));
        }
    }
    if opt_uint(content, &k("expert_count"), path)?.unwrap_or(0) > 0 {
        return Err(invalid(path, format!("mixture-of-experts models ({arch}.expert_count > 0) are not supported")));
    }
    let rope_theta = meta::float(md, &k("rope.freq_base"), path)?.unwrap_or(10000.0);
    let rms_norm_eps = meta::float(md, &k("attention.layer_norm_rms_epsilon"), path)?
        .ok_or_else(|| invalid(path, format!("missing metadata key `{arch}.attention.layer_norm_rms_epsilon`")))?;
    if !(rope_theta.is_finite() && rope_theta > 0.0 && rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
        return Err(invalid(path, format!("invalid rope.freq_base {rope_theta} or layer_norm_rms_epsilon {rms_norm_eps}")));
    }
    let vocab_size = match opt_uint(content, &k("vocab_size"), path)? {
        Some(v) => v,
        None => match md.get("tokenizer.ggml.tokens") {
            Some(gguf_file::Value::Array(a)) => a.len(),
            _ => {
                return Err(invalid(path, format!("missing metadata key `{arch}.vocab_size` (and no `tokenizer.ggml.tokens`)")))
            }
        },
    };
    if vocab_size == 0 {
        return Err(invalid(path, "the vocabulary size is 0"));
    }
    let tok_id = |key: &str| -> Result<Option<u32>> {
        match meta::uint(md, key, path)? {
            None => Ok(None),
            Some(v) if v < vocab_size as u64 => Ok(Some(v as u32)),
            Some(v) => Err(invalid(path, format!("`{key}` = {v} is out of range (vocab size {vocab_size})"))),
        }
    };
    let bos = tok_id("tokenizer.ggml.bos_token_id")?;
    let mut eos: Vec<u32> = tok_id("tokenizer.ggml.eos_token_id")?.into_iter().collect();
    if let Some(eot) = tok_id("tokenizer.ggml.eot_token_id")? {
        if !eos.contains(&eot) {
            eos.push(eot);
        }
    }
    let pad = tok_id("tokenizer.ggml.padding_token_id")?;
    let name = meta::string(md, "general.name", path)?
        .filter(|s| !s.trim().is_empty())
        .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()));
    Ok(LlamaConfig {
        model_type: arch.clone(),
        vocab_size,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        // Llama 3.x scaling is stored as the tensor `rope_freqs.weight`, read by `load_gguf`.
        rope_scaling: None,
        qk_norm: arch == "qwen3",
        rope_layers: (arch == "smollm3").then(|| (0..layers).map(|i| (i + 1) % SMOLLM3_NO_ROPE_LAYER_STEP != 0).collect()),
        max_position_embeddings: ctx,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        mlp_bias: content.tensor_infos.contains_key("blk.0.ffn_up.bias"),
        bos_token_id: bos,
        eos_token_id: eos,
        pad_token_id: pad,
        dtype: None,
        name_or_path: name,
        architecture: match arch.as_str() {
            "qwen3" => "Qwen3ForCausalLM".into(),
            "smollm3" => "SmolLM3ForCausalLM".into(),
            _ => "LlamaForCausalLM".into(),
        },
        source_path: None,
    })
}

/// llama.cpp's `n_no_rope_layer_step` for arch `smollm3` (a constant there, not a metadata key):
/// every fourth layer is a NoPE layer.
pub const SMOLLM3_NO_ROPE_LAYER_STEP: usize = 4;

/// The sizes every decoder GGUF file states under its architecture's prefix (`<arch>.`).
pub(crate) struct GgufDims {
    /// `embedding_length`.
    pub hidden: usize,
    /// `block_count`.
    pub layers: usize,
    /// `feed_forward_length`.
    pub ffn: usize,
    /// `attention.head_count`.
    pub heads: usize,
    /// `attention.head_count_kv` (default: `heads`).
    pub kv_heads: usize,
    /// `context_length`.
    pub context: usize,
}

impl GgufDims {
    /// Read the sizes of an `arch` file.
    ///
    /// Errors: `GgufInvalid` for a missing or mistyped key, a size of 0, or KV heads that do not
    /// divide the heads.
    pub(crate) fn read(content: &gguf_file::Content, arch: &str, path: &Path) -> Result<GgufDims> {
        let k = |key: &str| format!("{arch}.{key}");
        let hidden = req_uint(content, &k("embedding_length"), path)?;
        let layers = req_uint(content, &k("block_count"), path)?;
        let ffn = req_uint(content, &k("feed_forward_length"), path)?;
        let heads = req_uint(content, &k("attention.head_count"), path)?;
        let context = req_uint(content, &k("context_length"), path)?;
        let kv_heads = opt_uint(content, &k("attention.head_count_kv"), path)?.unwrap_or(heads);
        if hidden == 0 || layers == 0 || ffn == 0 || heads == 0 || kv_heads == 0 {
            return Err(invalid(path, "embedding_length, block_count, feed_forward_length, head_count and head_count_kv must be positive"));
        }
        if heads % kv_heads != 0 {
            return Err(invalid(path, format!("{arch}.attention.head_count_kv ({kv_heads}) must divide {arch}.attention.head_count ({heads})")));
        }
        Ok(GgufDims { hidden, layers, ffn, heads, kv_heads, context })
    }
}

/// The vocabulary size of a file as its embedding's row count.
///
/// Errors: `GgufInvalid` when `token_embd.weight` is missing or not 2-D.
pub(crate) fn embedding_rows(content: &gguf_file::Content, path: &Path) -> Result<usize> {
    match content.tensor_infos.get("token_embd.weight") {
        Some(t) if t.shape.dims().len() == 2 => Ok(t.shape.dims()[0]),
        _ => Err(invalid(path, "tensor `token_embd.weight` is missing or not 2-D")),
    }
}

/// The tensors of a decoder GGUF file with their transformers shapes, in load order:
/// `token_embd`, `output_norm`, `output` (untied only), the architecture's `globals`, then
/// `per_layer(l)` for every block. Stops at the first block whose first tensor is missing, so
/// that a huge bogus `block_count` costs nothing.
///
/// Errors: `GgufInvalid` naming that missing tensor.
pub(crate) fn decoder_tensor_shapes(
    content: &gguf_file::Content,
    arch: &str,
    (vocab, hidden, tied, layers): (usize, usize, bool, usize),
    globals: Vec<(String, Vec<usize>)>,
    per_layer: impl Fn(usize) -> Vec<(String, Vec<usize>)>,
    path: &Path,
) -> Result<Vec<(String, Vec<usize>)>> {
    let mut out = vec![("token_embd.weight".to_string(), vec![vocab, hidden]), ("output_norm.weight".to_string(), vec![hidden])];
    if !tied {
        out.push(("output.weight".into(), vec![vocab, hidden]));
    }
    out.extend(globals);
    for l in 0..layers {
        let block = per_layer(l);
        if let Some((first, _)) = block.first().filter(|(n, _)| !content.tensor_infos.contains_key(n)) {
            return Err(invalid(path, format!("tensor `{first}` is missing ({arch}.block_count = {layers})")));
        }
        out.extend(block);
    }
    Ok(out)
}

/// Check that the file holds exactly the tensors of `expected`, with those (transformers order)
/// shapes.
///
/// Errors: `GgufInvalid` naming a missing or misshapen tensor, or the unexpected ones.
pub(crate) fn check_tensor_shapes(content: &gguf_file::Content, expected: &[(String, Vec<usize>)], what: &str, path: &Path) -> Result<()> {
    for (name, shape) in expected {
        let info = content.tensor_infos.get(name).ok_or_else(|| invalid(path, format!("tensor `{name}` is missing")))?;
        if info.shape.dims() != shape.as_slice() {
            return Err(invalid(path, format!("tensor `{name}` has shape {:?} (transformers order), expected {shape:?} from the metadata", info.shape.dims())));
        }
    }
    if content.tensor_infos.len() != expected.len() {
        let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let mut extra: Vec<&String> = content.tensor_infos.keys().filter(|k| !known.contains(k.as_str())).collect();
        extra.sort();
        return Err(invalid(path, format!("unexpected tensor(s) for a {what} model: {extra:?}")));
    }
    Ok(())
}

/// Run a candle read of tensor `name`, turning its errors and panics (malformed data) into
/// `GgufInvalid` naming the tensor.
fn guarded_read<T>(content: &gguf_file::Content, name: &str, path: &Path, read: impl FnOnce(&gguf_file::TensorInfo) -> candle_core::Result<T>) -> Result<T> {
    let info = &content.tensor_infos[name];
    let ty = info.ggml_dtype;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(info))) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(invalid(path, format!("cannot read tensor `{name}` ({ty:?}): {e}"))),
        Err(_) => Err(invalid(path, format!("cannot read tensor `{name}` ({ty:?}): malformed data"))),
    }
}

/// Tensor `name` read and dequantized to f32 on the CPU.
///
/// Errors: `GgufInvalid` naming the tensor for unreadable or malformed data.
pub(crate) fn read_dequantized(content: &gguf_file::Content, reader: &mut BufReader<File>, name: &str, path: &Path) -> Result<Tensor> {
    guarded_read(content, name, path, |info| info.read(reader, content.tensor_data_offset, &Device::Cpu)?.dequantize(&Device::Cpu))
}

/// The file's tokenizer; `None` with a notice in `notices` for a tokenizer model that is not
/// built (neither byte-level BPE `gpt2` nor SentencePiece `llama`, e.g. `t5`), or a byte-level
/// split declared with a SentencePiece vocabulary.
///
/// Errors: `GgufInvalid` for malformed tokenizer metadata.
pub(crate) fn optional_tokenizer(content: &gguf_file::Content, path: &Path, notices: &mut Vec<String>) -> Result<Option<Tokenizer>> {
    match Tokenizer::from_gguf(content, path) {
        Ok(t) => Ok(Some(t)),
        Err(PeftError::Tokenizer(msg)) => {
            notices.push(format!("no tokenizer: {msg}"));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A per-architecture change of a dequantized tensor, by GGUF name.
pub(crate) type TensorFix<'a> = &'a dyn Fn(&str, Tensor) -> Result<Tensor>;

/// How a non-Llama decoder architecture's weights are read by [`load_arch_weights`].
pub(crate) struct ArchWeights<'a> {
    /// transformers' name of a GGUF weight.
    pub hf_name: fn(&str) -> Option<String>,
    /// Applied to each dequantized f32 tensor (by GGUF name) before the cast to the model dtype
    /// (Gemma's norm shift); `None`: as read.
    pub fix: Option<TensorFix<'a>>,
}

/// Read the `weights` (GGUF name, shape; checked before) dequantized, fixed by `arch`, converted
/// to `dtype` on `device`, by transformers name; one progress tick each after `done` ticks
/// for tensors the caller read itself (of `total`).
///
/// Errors: as [`read_dequantized`]; `Aborted` through `ctl`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn load_arch_weights(
    content: &gguf_file::Content,
    reader: &mut BufReader<File>,
    weights: &[(String, Vec<usize>)],
    arch: &ArchWeights,
    (done, total): (usize, usize),
    dtype: DType,
    device: &Device,
    ctl: &crate::progress::Control,
    path: &Path,
) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::with_capacity(weights.len());
    let mut counter = crate::progress::Counter::new(ctl, total as u64);
    for _ in 0..done {
        counter.tick()?;
    }
    for (name, _) in weights {
        let hf = (arch.hf_name)(name).ok_or_else(|| PeftError::Internal(format!("no HF name for {name}")))?;
        let t = read_dequantized(content, reader, name, path)?;
        let t = match arch.fix {
            Some(fix) => fix(name, t)?,
            None => t,
        };
        tensors.insert(hf, t.to_dtype(dtype)?.to_device(device)?);
        counter.tick()?;
    }
    counter.finish();
    Ok(tensors)
}

/// The config's `dtype` name of a load in `dtype` (`float32` for anything but F16 / BF16).
pub(crate) fn dtype_name(dtype: DType) -> String {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
    .to_string()
}

/// The transformers shape every tensor of `cfg` must have, by GGUF name. Biases are included
/// only for tensors present in the file.
fn expected_shapes(cfg: &LlamaConfig, content: &gguf_file::Content, path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let ovf = || invalid(path, "hyper-parameters overflow when computing tensor sizes");
    let q_rows = cfg.num_attention_heads.checked_mul(cfg.head_dim).ok_or_else(ovf)?;
    let kv_rows = cfg.num_key_value_heads.checked_mul(cfg.head_dim).ok_or_else(ovf)?;
    let (h, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let mut globals = vec![];
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        globals.push(("rope_freqs.weight".into(), vec![cfg.head_dim / 2]));
    }
    let per_layer = |l: usize| {
        let mut out = vec![(format!("blk.{l}.attn_norm.weight"), vec![h]), (format!("blk.{l}.ffn_norm.weight"), vec![h])];
        if cfg.qk_norm {
            out.push((format!("blk.{l}.attn_q_norm.weight"), vec![cfg.head_dim]));
            out.push((format!("blk.{l}.attn_k_norm.weight"), vec![cfg.head_dim]));
        }
        let linear = [("attn_q", q_rows, h), ("attn_k", kv_rows, h), ("attn_v", kv_rows, h), ("attn_output", h, q_rows), ("ffn_gate", f, h), ("ffn_up", f, h), ("ffn_down", h, f)];
        for (m, o, inp) in linear {
            out.push((format!("blk.{l}.{m}.weight"), vec![o, inp]));
            let b = format!("blk.{l}.{m}.bias");
            if content.tensor_infos.contains_key(&b) {
                out.push((b, vec![o]));
            }
        }
        out
    };
    decoder_tensor_shapes(content, &cfg.model_type, (v, h, cfg.tie_word_embeddings, cfg.num_hidden_layers), globals, per_layer, path)
}

/// Read a GGUF file's header: metadata and tensor infos (checked to lie inside the file); no
/// tensor data is read. Used by the exports to copy a source file's metadata.
///
/// Errors: `NotFound`/`Io` for an unreadable file, `GgufInvalid` for a malformed one.
pub fn read_gguf_header(path: &Path) -> Result<gguf_file::Content> {
    let (content, _, file_size) = open_gguf(path)?;
    validate_tensor_infos(&content, file_size, path)?;
    Ok(content)
}

/// The [`LlamaConfig`] of a Llama GGUF file, from its metadata only (see
/// [`llama_config_from_gguf`]); `name_or_path` is the file's path.
///
/// Errors: as [`read_gguf_header`] and [`llama_config_from_gguf`].
pub fn read_gguf_config(path: &Path) -> Result<LlamaConfig> {
    let content = read_gguf_header(path)?;
    let mut cfg = llama_config_from_gguf(&content, path)?;
    cfg.name_or_path = Some(path.to_string_lossy().into_owned());
    Ok(cfg)
}

/// Read only the tokenizer embedded in a GGUF file (see [`Tokenizer::from_gguf`]); tensor
/// data is not read.
///
/// Errors: `NotFound`/`Io` for an unreadable file, `GgufInvalid` for a malformed file or
/// tokenizer metadata, `Tokenizer` for an unsupported tokenizer model.
pub fn read_gguf_tokenizer(path: &Path) -> Result<Tokenizer> {
    let (content, _, _) = open_gguf(path)?;
    Tokenizer::from_gguf(&content, path)
}

/// Load a Llama-architecture GGUF file as transformers weights, config and tokenizer.
///
/// Every tensor is dequantized with candle (`QTensor::dequantize`, any ggml type candle
/// supports: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q8_K), converted to `dtype`
/// (dequantization happens in f32 on the CPU, then the tensor is cast and moved to `device`),
/// renamed with [`gguf_to_hf_name`], and q/k projections are un-permuted with
/// [`unpermute_qk`] (n_head = head_count for q, head_count_kv for k). The result equals the
/// original Hugging Face checkpoint up to quantization error.
///
/// Errors: `InvalidArgument` for a non-float `dtype`; `NotFound`/`Io` for an unreadable
/// file; `GgufInvalid` naming the file for a bad
/// magic or version, a truncated file, an unknown tensor type, an architecture other than
/// `llama`, a missing/mistyped metadata key, a missing, unexpected or wrongly shaped tensor,
/// or tensor data outside the file; `Tokenizer` for an unsupported tokenizer model.
pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<GgufModel> {
    load_gguf_ctl(path, dtype, device, &crate::progress::Control::NONE)
}

/// [`load_gguf`] reporting progress in tensors (`total` = the file's tensor count, reported as
/// each is read and dequantized) and polling `ctl` after each one; on an abort the tensors read
/// so far are dropped before this returns `Aborted`.
pub fn load_gguf_ctl(path: &Path, dtype: DType, device: &Device, ctl: &crate::progress::Control) -> Result<GgufModel> {
    load_gguf_opts(path, dtype, device, ctl, false)
}

/// Whether a GGUF tensor is a decoder layer's linear weight (kept quantized on request).
fn is_layer_linear(gguf_name: &str) -> bool {
    [".attn_q.", ".attn_k.", ".attn_v.", ".attn_output.", ".ffn_gate.", ".ffn_up.", ".ffn_down."].iter().any(|p| gguf_name.contains(p))
        && gguf_name.ends_with(".weight")
}

/// [`load_gguf_ctl`], and with `keep_quantized` the decoder layers' linear weights and the
/// output head (`output.weight`, or a tied `token_embd.weight`) of a type with integer kernels
/// stay quantized ([`GgufModel::quantized`], QLoRA-style; q/k rows are un-permuted on the raw
/// blocks, which is lossless). Other quantized types are dequantized as
/// before, with one line per type in [`GgufModel::notices`] (also printed to stderr).
///
/// Errors: as [`load_gguf`]; `ERR_GGUF_INVALID` ([`PeftError::QuantInvalid`]) naming the
/// tensor for a corrupted block (a NaN or infinite scale).
pub fn load_gguf_opts(path: &Path, dtype: DType, device: &Device, ctl: &crate::progress::Control, keep_quantized: bool) -> Result<GgufModel> {
    let dtype_name = match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        other => {
            return Err(PeftError::invalid_arg(
                "dtype",
                format!("{other:?} is not a floating-point dtype (use F32, F16, BF16 or F64)"),
            ))
        }
    };
    let (content, mut reader, file_size) = open_gguf(path)?;
    let mut config = llama_config_from_gguf(&content, path)?;
    config.dtype = Some(dtype_name.to_string());
    validate_tensor_infos(&content, file_size, path)?;

    let expected = expected_shapes(&config, &content, path)?;
    check_tensor_shapes(&content, &expected, &format!("{}-layer {}", config.num_hidden_layers, config.model_type), path)?;

    let tokenizer = Tokenizer::from_gguf(&content, path)?;

    let mut tensors = HashMap::with_capacity(expected.len());
    let mut quantized = HashMap::new();
    let mut skipped: std::collections::BTreeMap<String, usize> = Default::default();
    let mut counter = crate::progress::Counter::new(ctl, expected.len() as u64);
    for (name, _) in &expected {
        // `rope_freqs.weight` has no transformers name: it becomes `config.rope_scaling` below.
        let hf = match gguf_to_hf_name(name) {
            Some(h) => h,
            None if name == "rope_freqs.weight" => String::new(),
            None => return Err(PeftError::Internal(format!("no HF name for {name}"))),
        };
        let info = &content.tensor_infos[name];
        let ty = info.ggml_dtype;
        if keep_quantized && is_layer_linear(name) && ty != candle_core::quantized::GgmlDType::F32 {
            if let Some(qt) = crate::engine::quant::QuantType::from_ggml(ty) {
                let dims = info.shape.dims().to_vec();
                let (rows, cols) = (dims[0], dims[1]);
                let mut raw = guarded_read(&content, name, path, |info| Ok(info.read(&mut reader, content.tensor_data_offset, &Device::Cpu)?.data()?.into_owned()))?;
                if let Some(h) = permuted_heads(&config, name) {
                    raw = unpermute_rows_raw(&raw, rows, h).map_err(|_| invalid(path, format!("tensor `{name}`: {rows} rows are not a multiple of 2 x {h} heads")))?;
                }
                let w = crate::engine::quant::QuantWeight::from_gguf_bytes(&hf, qt, rows, cols, &raw)?;
                tensors.insert(hf.clone(), Tensor::zeros((), dtype, device)?.broadcast_as((rows, cols))?);
                quantized.insert(hf, std::sync::Arc::new(w));
                counter.tick()?;
                continue;
            } else if is_layer_linear(name) && !matches!(ty, candle_core::quantized::GgmlDType::F16 | candle_core::quantized::GgmlDType::BF16) {
                *skipped.entry(format!("{ty:?}")).or_default() += 1;
            }
        }
        // The output head: llama.cpp computes the logits with the file's quantized
        // `output.weight` (or, with tied embeddings, `token_embd.weight`), and `keep` does the
        // same; a tied table is also dequantized below for the embedding lookup.
        let head = name == "output.weight" || (name == "token_embd.weight" && config.tie_word_embeddings);
        if keep_quantized && head {
            if let Some(qt) = crate::engine::quant::QuantType::from_ggml(ty) {
                let dims = info.shape.dims().to_vec();
                let (rows, cols) = (dims[0], dims[1]);
                let raw = guarded_read(&content, name, path, |info| Ok(info.read(&mut reader, content.tensor_data_offset, &Device::Cpu)?.data()?.into_owned()))?;
                let w = crate::engine::quant::QuantWeight::from_gguf_bytes("lm_head.weight", qt, rows, cols, &raw)?;
                quantized.insert("lm_head.weight".to_string(), std::sync::Arc::new(w));
                if name == "output.weight" {
                    tensors.insert(hf, Tensor::zeros((), dtype, device)?.broadcast_as((rows, cols))?);
                    counter.tick()?;
                    continue;
                }
            } else if !matches!(ty, candle_core::quantized::GgmlDType::F32 | candle_core::quantized::GgmlDType::F16 | candle_core::quantized::GgmlDType::BF16) {
                *skipped.entry(format!("{ty:?}")).or_default() += 1;
            }
        }
        let mut t = read_dequantized(&content, &mut reader, name, path)?;
        if name == "rope_freqs.weight" {
            // llama.cpp's Llama 3.x RoPE scaling: per-frequency divisors (convert_hf_to_gguf.py
            // `LlamaModel.generate_extra_tensors`).
            let f: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            if f.iter().any(|x| !x.is_finite() || *x <= 0.0) {
                return Err(invalid(path, "`rope_freqs.weight` holds a non-positive or non-finite factor"));
            }
            config.rope_scaling = Some(crate::model::config::RopeScaling::Factors(f));
            counter.tick()?;
            continue;
        }
        if let Some(h) = permuted_heads(&config, name) {
            t = unpermute_qk(&t, h)?;
        }
        let t = t.to_dtype(dtype)?.to_device(device)?;
        tensors.insert(hf, t);
        counter.tick()?;
    }
    counter.finish();
    let notices: Vec<String> = skipped.iter().map(|(t, n)| format!("{n} tensors of type {t} dequantized to f32 (no integer kernels for this type)")).collect();
    for n in &notices {
        eprintln!("peft-node: {}: {n}", path.display());
    }
    Ok(GgufModel { config, tensors, tokenizer, quantized, notices })
}
