//! What the decoder-only families with RoPE and grouped-query attention (Llama, Gemma 3, Phi-3)
//! share, written once: the config.json fields every one of them reads ([`DecoderFields`]), the
//! [`ModelInfo`] built from them, the embedding lookup with its vocabulary check, the forward
//! preamble (cache length, length check, positions) and RoPE angle tables, the key/value cache
//! append, the GQA head repeat and the base parameter count.
//!
//! Per layer, with `n_rep = heads / kv_heads`, attention sees keys and values
//! `[b, kv_heads, t, head_dim]` repeated to `[b, heads, t, head_dim]` (transformers' `repeat_kv`),
//! `t` = the cached positions followed by the new ones.

use super::config::{get_f64, get_usize, token_ids};
use super::forward::{ForwardOptions, KvCache};
use super::{ModelInfo, Task};
use crate::error::{PeftError, Result};
use crate::tuners::linear::{LinearCtx, PeftLinear};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The config.json fields every decoder family reads, with the same names in each family's
/// config struct.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DecoderFields {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub dtype: Option<String>,
    pub name_or_path: Option<String>,
}

/// A family's defaults for the fields of [`DecoderFields`] that config.json may leave out
/// (transformers' config class defaults).
pub(crate) struct DecoderDefaults {
    /// `num_attention_heads` (`None`: required).
    pub heads: Option<usize>,
    /// `num_key_value_heads` (`None`: `num_attention_heads`).
    pub kv_heads: Option<usize>,
    /// `head_dim` (`None`: `hidden_size / num_attention_heads`).
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

impl DecoderFields {
    /// Read the common fields of a transformers config.json (`path` for error messages only).
    ///
    /// Errors: `InvalidModelConfig` for a missing required field (`vocab_size`, `hidden_size`,
    /// `intermediate_size`, `num_hidden_layers`, and `num_attention_heads` where `d` has no
    /// default), a mistyped one, or head counts that are zero or do not divide.
    pub fn from_json(v: &Value, path: &Path, d: &DecoderDefaults) -> Result<Self> {
        let bad = |msg: String| PeftError::InvalidModelConfig { path: path.to_path_buf(), msg };
        let req = |k: &str| -> Result<usize> { get_usize(v, k, path)?.ok_or_else(|| bad(format!("missing required field `{k}`"))) };
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = match d.heads {
            None => req("num_attention_heads")?,
            Some(h) => get_usize(v, "num_attention_heads", path)?.unwrap_or(h),
        };
        if hidden_size == 0 || num_attention_heads == 0 {
            return Err(bad("`hidden_size` and `num_attention_heads` must be positive".into()));
        }
        let num_key_value_heads = get_usize(v, "num_key_value_heads", path)?.unwrap_or(d.kv_heads.unwrap_or(num_attention_heads));
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(bad(format!("`num_key_value_heads` ({num_key_value_heads}) must divide `num_attention_heads` ({num_attention_heads})")));
        }
        let head_dim = get_usize(v, "head_dim", path)?.unwrap_or(d.head_dim.unwrap_or(hidden_size / num_attention_heads));
        Ok(DecoderFields {
            vocab_size: req("vocab_size")?,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            hidden_size,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: get_f64(v, "rms_norm_eps", path)?.unwrap_or(d.rms_norm_eps),
            max_position_embeddings: get_usize(v, "max_position_embeddings", path)?.unwrap_or(d.max_position_embeddings),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(d.tie_word_embeddings),
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_id: token_ids(v.get("eos_token_id")),
            pad_token_id: token_ids(v.get("pad_token_id")).first().copied(),
            dtype: v.get("dtype").or(v.get("torch_dtype")).and_then(|x| x.as_str()).map(String::from),
            name_or_path: v.get("_name_or_path").and_then(|x| x.as_str()).map(String::from),
        })
    }
}

/// A decoder family's config: its [`DecoderFields`] (copied out of the struct's own fields of
/// the same names).
pub(crate) trait DecoderConfig {
    fn decoder_fields(&self) -> DecoderFields;
}

macro_rules! impl_decoder_config {
    ($($t:ty),*) => {$(
        impl DecoderConfig for $t {
            fn decoder_fields(&self) -> DecoderFields {
                DecoderFields {
                    vocab_size: self.vocab_size,
                    hidden_size: self.hidden_size,
                    intermediate_size: self.intermediate_size,
                    num_hidden_layers: self.num_hidden_layers,
                    num_attention_heads: self.num_attention_heads,
                    num_key_value_heads: self.num_key_value_heads,
                    head_dim: self.head_dim,
                    rms_norm_eps: self.rms_norm_eps,
                    max_position_embeddings: self.max_position_embeddings,
                    tie_word_embeddings: self.tie_word_embeddings,
                    bos_token_id: self.bos_token_id,
                    eos_token_id: self.eos_token_id.clone(),
                    pad_token_id: self.pad_token_id,
                    dtype: self.dtype.clone(),
                    name_or_path: self.name_or_path.clone(),
                }
            }
        }
    )*};
}
impl_decoder_config!(super::config::LlamaConfig, super::gemma3::Gemma3Config, super::phi3::Phi3Config);

/// The path shown in a model's error messages: `_name_or_path`, else `<model>`.
pub(crate) fn config_name(c: &impl DecoderConfig) -> PathBuf {
    PathBuf::from(c.decoder_fields().name_or_path.unwrap_or_else(|| "<model>".into()))
}

/// [`ModelInfo`] of a decoder built with the head of `task`.
pub(crate) fn model_info(c: &impl DecoderConfig, architecture: String, model_type: String, task: Task, num_labels: Option<usize>) -> ModelInfo {
    let f = c.decoder_fields();
    ModelInfo {
        architecture,
        model_type,
        name_or_path: f.name_or_path,
        vocab_size: f.vocab_size,
        hidden_size: f.hidden_size,
        num_hidden_layers: f.num_hidden_layers,
        num_attention_heads: f.num_attention_heads,
        num_key_value_heads: Some(f.num_key_value_heads),
        head_dim: f.head_dim,
        max_position_embeddings: f.max_position_embeddings,
        pad_token_id: f.pad_token_id,
        bos_token_id: f.bos_token_id,
        eos_token_id: f.eos_token_id,
        decoder_start_token_id: None,
        task,
        num_labels,
    }
}


/// Embedding rows of `ids` `[b, s]` → `[b, s, hidden]` (with LoRA-on-embedding adapters in `ctx`).
///
/// Errors: `InvalidArgument` for an id outside the vocabulary of `table` (`vocab` rows).
pub(crate) fn embed_ids(table: &PeftLinear, vocab: usize, ids: &[u32], b: usize, s: usize, device: &Device, ctx: &LinearCtx) -> Result<Tensor> {
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(PeftError::invalid_arg("inputIds", format!("token id {bad} is outside the vocabulary (size {vocab})")));
    }
    let idx = Tensor::from_slice(ids, b * s, device)?;
    table.forward_embedding(&idx, b, s, ctx)
}

/// The forward preamble: the number of cached positions `past` and the position of each new
/// token, `[b, s]` row-major (`opts.position_ids`, else `past .. past + s` in every row).
///
/// Errors: `InvalidArgument` when `past + s` exceeds `max_position_embeddings`, or for position
/// ids of the wrong length.
pub(crate) fn positions(opts: &ForwardOptions, cache: Option<&KvCache>, b: usize, s: usize, max_position_embeddings: usize) -> Result<(usize, Vec<u32>)> {
    let past = cache.map(|c| c.seq_len()).unwrap_or(0);
    let total = past + s;
    if total > max_position_embeddings {
        return Err(PeftError::invalid_arg("inputIds", format!("sequence length {total} exceeds max_position_embeddings {max_position_embeddings}")));
    }
    let positions = match &opts.position_ids {
        Some(p) if p.len() != b * s => return Err(PeftError::invalid_arg("positionIds", format!("expected {} values", b * s))),
        Some(p) => p.clone(),
        None => (0..b).flat_map(|_| (past..total).map(|p| p as u32)).collect(),
    };
    Ok((past, positions))
}

/// RoPE angles `position · inv_freq[i]` in f32, `[b, s, inv_freq.len()]`.
pub(crate) fn rope_angles(positions: &[u32], inv_freq: &[f32], b: usize, s: usize, device: &Device) -> Result<Tensor> {
    let angles: Vec<f32> = positions.iter().flat_map(|&p| inv_freq.iter().map(move |f| p as f32 * f)).collect();
    Ok(Tensor::from_vec(angles, (b, s, inv_freq.len()), device)?)
}

/// Append this step's keys and values `[b, kv_heads, s, head_dim]` to a layer's cache slot (when
/// there is one) and return what attention sees: the cached positions followed by the new ones.
pub(crate) fn append_kv(slot: Option<&mut Option<(Tensor, Tensor)>>, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
    let Some(slot) = slot else { return Ok((k, v)) };
    let (k, v) = match slot.take() {
        Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v.contiguous()?], 2)?),
        None => (k.contiguous()?, v.contiguous()?),
    };
    *slot = Some((k.clone(), v.clone()));
    Ok((k, v))
}

/// Grouped-query attention: keys and values `[b, kv_heads, t, head_dim]` repeated to
/// `[b, heads, t, head_dim]` (each kv head serves `heads / kv_heads` query heads), contiguous.
pub(crate) fn repeat_kv(k: Tensor, v: Tensor, heads: usize) -> Result<(Tensor, Tensor)> {
    let (b, nkv, t, hd) = k.dims4()?;
    let n_rep = heads / nkv;
    if n_rep <= 1 {
        return Ok((k.contiguous()?, v.contiguous()?));
    }
    let rep = |x: Tensor| x.unsqueeze(2)?.broadcast_as((b, nkv, n_rep, t, hd))?.reshape((b, heads, t, hd));
    Ok((rep(k)?, rep(v)?))
}

/// Base-model parameters, tied weights counted once (as torch's `named_parameters`): the norm
/// weights' `norm_elems` plus every linear of `linears`, without `lm_head` when it is `tied` to
/// the embeddings.
pub(crate) fn base_param_count(norm_elems: usize, linears: Vec<(String, &PeftLinear)>, tied: bool) -> usize {
    norm_elems + linears.into_iter().filter(|(name, _)| !(tied && name == "lm_head")).map(|(_, lin)| lin.base_param_count()).sum::<usize>()
}

/// Every module path of a decoder with transformers' layout, in module order: `model`,
/// `model.embed_tokens`, per layer `model.layers.N`, its `self_attn` and the `attn` children,
/// its `mlp` and the `mlp` children, its `norms`; then `model.norm` and the `head`.
pub(crate) fn module_names(layers: usize, attn: &[&str], mlp: &[&str], norms: &[&str], head: &str) -> Vec<String> {
    let mut out = vec!["model".to_string(), "model.embed_tokens".to_string()];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        out.push(p.clone());
        out.push(format!("{p}.self_attn"));
        out.extend(attn.iter().map(|n| format!("{p}.self_attn.{n}")));
        out.push(format!("{p}.mlp"));
        out.extend(mlp.iter().map(|n| format!("{p}.mlp.{n}")));
        out.extend(norms.iter().map(|n| format!("{p}.{n}")));
    }
    out.push("model.norm".into());
    out.push(head.into());
    out
}

/// A decoder's linear layers with their module paths, in module order: `model.embed_tokens`,
/// each layer's `(name, linear)` pairs under `model.layers.N.`, then the head `(path, linear)`.
/// `L` is `&PeftLinear` or `&mut PeftLinear` (see [`super::named_twins`]).
pub(crate) fn named_linears<L>(embed: L, layers: impl IntoIterator<Item = Vec<(&'static str, L)>>, (head, lm_head): (&str, L)) -> Vec<(String, L)> {
    let mut out = vec![("model.embed_tokens".to_string(), embed)];
    for (i, named) in layers.into_iter().enumerate() {
        out.extend(named.into_iter().map(|(n, lin)| (format!("model.layers.{i}.{n}"), lin)));
    }
    out.push((head.to_string(), lm_head));
    out
}

/// The module paths (below `model.layers.N.`) of a Llama-style layer's seven linears, in the
/// order `[q, k, v, o, gate, up, down]`: the one declaration that loading (`from_tensors`, which
/// destructures it in that order) and listing ([`llama_layer_linears`]) share.
pub(crate) const LLAMA_LAYER_LINEARS: [&str; 7] = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

/// The seven linears of a Llama-style layer with their names ([`LLAMA_LAYER_LINEARS`]).
pub(crate) fn llama_layer_linears<L>([q, k, v, o]: [L; 4], [gate, up, down]: [L; 3]) -> Vec<(&'static str, L)> {
    LLAMA_LAYER_LINEARS.into_iter().zip([q, k, v, o, gate, up, down]).collect()
}
