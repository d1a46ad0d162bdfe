//! T5 encoder-decoder (`T5ForConditionalGeneration`) with transformers' module names.
//!
//! Encoder block `i` (`encoder.block.{i}`):
//! `h = x + o(attn(q(n₀(x)), k(n₀(x)), v(n₀(x)); B_enc + M))` (`layer.0.SelfAttention`),
//! `out = h + wo(act(wi(n₁(h))))` (`layer.1.DenseReluDense`; gated: `wo(act(wi_0(n)) · wi_1(n))`).
//! Decoder block `i` (`decoder.block.{i}`) adds cross-attention between the two:
//! `layer.0.SelfAttention` (causal, `B_dec`), `layer.1.EncDecAttention` (keys/values from the
//! encoder output, padding mask only), `layer.2.DenseReluDense`. Every `nⱼ` is a
//! `T5LayerNorm` (RMS norm without mean subtraction or bias, `layer_norm_epsilon`); each stack
//! ends with `final_layer_norm`; `logits = lm_head(d · s)` with `s = d_model^-0.5` when
//! `scale_decoder_outputs` is true and 1 otherwise.
//!
//! Attention scores are `q · kᵀ` **without** the `1/√d_kv` factor, plus the relative position
//! bias `B[h, i, j] = relative_attention_bias[bucket(j − i), h]` (Raffel et al. 2020, §2.1;
//! transformers' `T5Attention._relative_position_bucket`): bidirectional buckets in the encoder,
//! unidirectional (only `j ≤ i` distinguished) in the decoder; the bias table exists in block 0
//! of each stack only and is shared by the others. Query positions start at the number of
//! cached positions (a prefix-tuning prefix counts), as transformers' `compute_bias` does with
//! `past_seen_tokens`. Cross-attention has no position bias.
//!
//! The word embeddings `shared` feed both stacks (no scaling) through the stacks' own modules
//! `encoder.embed_tokens` and `decoder.embed_tokens`, which hold the same table (transformers
//! 5.18 ties them to `shared.weight` through `_tied_weights_keys`; `shared` itself is never
//! called in the forward), and so is `lm_head`, whatever config.json's `tie_word_embeddings`
//! says; a module whose own table is in the checkpoint with other values (FLAN-T5's
//! `lm_head.weight`) keeps it, untied, as transformers does. All three embedding modules are embedding-kind [`PeftLinear`]s sharing one
//! tensor, so adapters can sit on each as HF PEFT puts them there (a LoRA or OFT layer on
//! `shared` alone never reaches the forward, as in HF; a merge into any of them changes the one
//! table, see `PeftModel::merge_adapter`). T5's own dropout (`dropout_rate`) is not
//! applied, also while training (as for the other base models here; LoRA dropout is).
//! Matches transformers 5.18's `T5ForConditionalGeneration` with eager attention.

use super::config::{get_f64, get_usize, token_ids};
use super::forward::{ForwardOptions, KvCache};
use super::checkpoint::LayerStack;
use super::{causal_mask, BaseModel, ModelInfo, Task};
use crate::error::{PeftError, Result};
use crate::ops::{rms_norm, softmax_last};
use crate::tuners::linear::{LinearCtx, PeftLinear};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The feed-forward activation (`dense_act_fn`: transformers' `ACT2FN` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum T5Activation {
    /// `"relu"` (original T5).
    Relu,
    /// `"gelu"`: exact erf GELU.
    Gelu,
    /// `"gelu_new"`: tanh approximation (T5 v1.1 / flan-t5 `"gated-gelu"`).
    GeluNew,
    /// `"silu"` / `"swish"`.
    Silu,
}

impl T5Activation {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "relu" => T5Activation::Relu,
            "gelu" => T5Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => T5Activation::GeluNew,
            "silu" | "swish" => T5Activation::Silu,
            _ => return None,
        })
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            T5Activation::Relu => x.relu(),
            T5Activation::Gelu => x.gelu_erf(),
            T5Activation::GeluNew => x.gelu(),
            T5Activation::Silu => x.silu(),
        }
    }
}

/// T5 hyper-parameters from a transformers `config.json` (`model_type: "t5"`).
#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    /// Rows of `shared` (and `lm_head`).
    pub vocab_size: usize,
    /// Hidden size of both stacks (transformers' `hidden_size` alias).
    pub d_model: usize,
    /// Size of one attention head.
    pub d_kv: usize,
    /// Feed-forward width.
    pub d_ff: usize,
    /// Encoder blocks (transformers' `num_hidden_layers` alias).
    pub num_layers: usize,
    /// Decoder blocks (default `num_layers`).
    pub num_decoder_layers: usize,
    /// Attention heads of every attention layer (`num_attention_heads` alias).
    pub num_heads: usize,
    /// Buckets of the relative position bias (default 32).
    pub relative_attention_num_buckets: usize,
    /// Distance from which relative positions share the last bucket (default 128).
    pub relative_attention_max_distance: usize,
    /// `T5LayerNorm` epsilon (default 1e-6).
    pub layer_norm_epsilon: f64,
    /// `feed_forward_proj` as written (`"relu"`, `"gated-gelu"`, ...).
    pub feed_forward_proj: String,
    /// `is_gated_act`: `wi_0`/`wi_1` instead of `wi` (from config.json, else from `feed_forward_proj`).
    pub is_gated_act: bool,
    /// `dense_act_fn` (from config.json, else from `feed_forward_proj`; `"gated-gelu"` → `gelu_new`).
    pub dense_act_fn: String,
    /// `dense_act_fn` parsed.
    pub activation: T5Activation,
    /// `tie_word_embeddings` as config.json states it (default true).
    pub tie_word_embeddings: bool,
    /// Multiply the decoder output by `d_model^-0.5` before `lm_head`: config.json's
    /// `scale_decoder_outputs` when present, else `tie_word_embeddings != false` (transformers'
    /// `T5Config.__post_init__`).
    pub scale_decoder_outputs: bool,
    /// `pad_token_id` (T5: 0); also what `-100` labels become in the shifted decoder input.
    pub pad_token_id: Option<u32>,
    /// `eos_token_id`, one or several ids (T5: 1).
    pub eos_token_id: Vec<u32>,
    /// First decoder token of generation and of shifted labels (T5: 0, the pad token).
    pub decoder_start_token_id: Option<u32>,
    /// The dtype named in the config, informational.
    pub dtype: Option<String>,
    /// `_name_or_path`, used as `base_model_name_or_path` when saving adapters.
    pub name_or_path: Option<String>,
}

impl T5Config {
    /// Parse a transformers T5 `config.json` value. `path` is used in error messages only.
    ///
    /// Errors: `InvalidModelConfig` for a missing/mistyped field, a `feed_forward_proj` that is
    /// not `ACT` or `gated-ACT` (transformers' check), an activation other than relu, gelu,
    /// gelu_new, silu, or zero-sized dimensions.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |msg: String| PeftError::InvalidModelConfig { path: path.to_path_buf(), msg };
        if !v.is_object() {
            return Err(bad("the top level must be a JSON object".into()));
        }
        let req = |k: &str| -> Result<usize> { get_usize(v, k, path)?.ok_or_else(|| bad(format!("missing required field `{k}`"))) };
        let d_model = req("d_model")?;
        let num_heads = req("num_heads")?;
        let d_kv = req("d_kv")?;
        let num_layers = req("num_layers")?;
        if d_model == 0 || num_heads == 0 || d_kv == 0 {
            return Err(bad("`d_model`, `num_heads` and `d_kv` must be positive".into()));
        }
        let ffp = v.get("feed_forward_proj").and_then(|x| x.as_str()).unwrap_or("relu").to_string();
        let parts: Vec<&str> = ffp.split('-').collect();
        if parts.len() > 2 || (parts.len() == 2 && parts[0] != "gated") {
            return Err(bad(format!("`feed_forward_proj`: {ffp} is not of the format `gated-{{ACT_FN}}` or `{{ACT_FN}}` (e.g. 'gated-gelu' or 'relu')")));
        }
        let derived_act = if ffp == "gated-gelu" { "gelu_new".to_string() } else { parts[parts.len() - 1].to_string() };
        let dense_act_fn = v.get("dense_act_fn").and_then(|x| x.as_str()).map(String::from).unwrap_or(derived_act);
        let is_gated_act = v.get("is_gated_act").and_then(|x| x.as_bool()).unwrap_or(parts[0] == "gated" && parts.len() == 2);
        let activation = T5Activation::parse(&dense_act_fn).ok_or_else(|| bad(format!("`dense_act_fn` `{dense_act_fn}` is not supported (relu, gelu, gelu_new, silu)")))?;
        let tie = v.get("tie_word_embeddings").and_then(|x| x.as_bool());
        let buckets = get_usize(v, "relative_attention_num_buckets", path)?.unwrap_or(32);
        if buckets < 2 {
            return Err(bad(format!("`relative_attention_num_buckets` must be at least 2, found {buckets}")));
        }
        Ok(T5Config {
            vocab_size: req("vocab_size")?,
            d_ff: req("d_ff")?,
            num_decoder_layers: get_usize(v, "num_decoder_layers", path)?.unwrap_or(num_layers),
            relative_attention_num_buckets: buckets,
            relative_attention_max_distance: get_usize(v, "relative_attention_max_distance", path)?.unwrap_or(128),
            layer_norm_epsilon: get_f64(v, "layer_norm_epsilon", path)?.unwrap_or(1e-6),
            feed_forward_proj: ffp,
            is_gated_act,
            dense_act_fn,
            activation,
            tie_word_embeddings: tie.unwrap_or(true),
            scale_decoder_outputs: v.get("scale_decoder_outputs").and_then(|x| x.as_bool()).unwrap_or(tie != Some(false)),
            pad_token_id: token_ids(v.get("pad_token_id")).first().copied(),
            eos_token_id: token_ids(v.get("eos_token_id")),
            decoder_start_token_id: token_ids(v.get("decoder_start_token_id")).first().copied(),
            dtype: v.get("dtype").or(v.get("torch_dtype")).and_then(|x| x.as_str()).map(String::from),
            name_or_path: v.get("_name_or_path").and_then(|x| x.as_str()).map(String::from),
            d_model,
            d_kv,
            num_layers,
            num_heads,
        })
    }
}

/// One `T5Attention` (`SelfAttention` or `EncDecAttention`): bias-free `q`, `k`, `v`
/// (`d_model → num_heads·d_kv`) and `o` (back to `d_model`).
pub struct T5Attention {
    /// Query projection `[num_heads·d_kv, d_model]`.
    pub q: PeftLinear,
    /// Key projection `[num_heads·d_kv, d_model]` (applied to the encoder output in cross-attention).
    pub k: PeftLinear,
    /// Value projection `[num_heads·d_kv, d_model]`.
    pub v: PeftLinear,
    /// Output projection `[d_model, num_heads·d_kv]`.
    pub o: PeftLinear,
    /// `relative_attention_bias.weight` `[num_buckets, num_heads]` (block 0 of each stack only).
    pub relative_attention_bias: Option<Tensor>,
}

/// `DenseReluDense`: `T5DenseActDense` (`wi`, `wo`) or `T5DenseGatedActDense` (`wi_0`, `wi_1`, `wo`).
pub enum T5DenseReluDense {
    /// `wi` `[d_ff, d_model]`, `wo` `[d_model, d_ff]` (`feed_forward_proj: "relu"` etc.).
    Plain { wi: PeftLinear, wo: PeftLinear },
    /// `wi_0` (activated), `wi_1` (linear) `[d_ff, d_model]`, `wo` `[d_model, d_ff]`
    /// (`feed_forward_proj: "gated-gelu"`, T5 v1.1 / flan-t5).
    Gated { wi_0: PeftLinear, wi_1: PeftLinear, wo: PeftLinear },
}

impl T5DenseReluDense {
    /// `wo(act(wi(x)))`, or gated `wo(act(wi_0(x)) · wi_1(x))` (`T5DenseGatedActDense`):
    /// `x` `[..., d_model]` → `[..., d_model]`.
    pub fn forward(&self, act: T5Activation, x: &Tensor, lin: &LinearCtx) -> Result<Tensor> {
        match self {
            T5DenseReluDense::Plain { wi, wo } => wo.forward(&act.apply(&wi.forward(x, lin)?)?, lin),
            T5DenseReluDense::Gated { wi_0, wi_1, wo } => {
                let g = act.apply(&wi_0.forward(x, lin)?)?;
                wo.forward(&(g * wi_1.forward(x, lin)?)?, lin)
            }
        }
    }
}

/// One `T5Block`. `cross` (decoder only) is `layer.1`: its `layer_norm.weight` and `EncDecAttention`.
pub struct T5Block {
    /// `layer.0.layer_norm.weight` `[d_model]`.
    pub self_attn_norm: Tensor,
    /// `layer.0.SelfAttention` (bidirectional in the encoder, causal in the decoder).
    pub self_attn: T5Attention,
    /// Decoder only: `layer.1.layer_norm.weight` `[d_model]` and `layer.1.EncDecAttention`.
    pub cross: Option<(Tensor, T5Attention)>,
    /// `layer.{1|2}.layer_norm.weight` `[d_model]`.
    pub ff_norm: Tensor,
    /// `layer.{1|2}.DenseReluDense`.
    pub ff: T5DenseReluDense,
}

/// transformers' `T5ForConditionalGeneration`. See the module docs.
pub struct T5ForConditionalGeneration {
    /// The parsed config.json.
    pub config: T5Config,
    /// `shared` `[vocab, d_model]` (an embedding-kind [`PeftLinear`]): the model's input
    /// embedding (`get_input_embeddings`); its table is the one the two stacks' `embed_tokens`
    /// (and a tied `lm_head`) hold.
    pub shared: PeftLinear,
    /// `encoder.embed_tokens`: the table of `shared`, looked up for the encoder's input ids.
    pub encoder_embed_tokens: PeftLinear,
    /// `decoder.embed_tokens`: the table of `shared`, looked up for the decoder's input ids.
    pub decoder_embed_tokens: PeftLinear,
    /// `encoder.block.{i}` (`num_layers` blocks).
    pub encoder: Vec<T5Block>,
    /// `encoder.final_layer_norm.weight`.
    pub encoder_final_layer_norm: Tensor,
    /// `decoder.block.{i}` (`num_decoder_layers` blocks).
    pub decoder: Vec<T5Block>,
    /// `decoder.final_layer_norm.weight`.
    pub decoder_final_layer_norm: Tensor,
    /// `lm_head` `[vocab, d_model]`, no bias (tied to `shared` unless the checkpoint has one with other values).
    pub lm_head: PeftLinear,
    /// Where the weights live.
    pub device: Device,
    /// Weights' and activations' dtype (attention scores, position bias and masks are f32).
    pub dtype: DType,
    info: ModelInfo,
    /// `lm_head` shares `shared`'s weight (counted once).
    lm_head_tied: bool,
    /// `encoder.embed_tokens` / `decoder.embed_tokens` share `shared`'s weight.
    stacks_tied: [bool; 2],
}

/// Checkpoint tensors being taken apart by name.
struct Weights {
    t: HashMap<String, Tensor>,
    dtype: DType,
    device: Device,
    path: PathBuf,
}

impl Weights {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        super::take_weight(&mut self.t, &[name], name, shape, self.dtype, &self.device, &self.path)
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<PeftLinear> {
        Ok(PeftLinear::new(self.take(&format!("{name}.weight"), &[out, inp])?, None, false))
    }

    fn attention(&mut self, prefix: &str, c: &T5Config, relative_bias: bool) -> Result<T5Attention> {
        let (d, inner) = (c.d_model, c.num_heads * c.d_kv);
        let [q, k, v, o] = attn_names(prefix.to_string());
        Ok(T5Attention {
            q: self.linear(&q, inner, d)?,
            k: self.linear(&k, inner, d)?,
            v: self.linear(&v, inner, d)?,
            o: self.linear(&o, d, inner)?,
            relative_attention_bias: if relative_bias {
                Some(self.take(&format!("{prefix}.relative_attention_bias.weight"), &[c.relative_attention_num_buckets, c.num_heads])?)
            } else {
                None
            },
        })
    }
}

/// transformers' `T5Attention._relative_position_bucket` for one relative position
/// `rel = key position − query position`.
pub fn relative_position_bucket(rel: i64, bidirectional: bool, num_buckets: usize, max_distance: usize) -> usize {
    let mut nb = num_buckets as i64;
    let mut ret = 0i64;
    let n = if bidirectional {
        nb /= 2;
        if rel > 0 {
            ret += nb;
        }
        rel.abs()
    } else {
        -(rel.min(0))
    };
    let max_exact = (nb / 2).max(1);
    if n < max_exact {
        return (ret + n) as usize;
    }
    // Computed in f32 like torch (`log(n / max_exact) / log(max_distance / max_exact) * (nb - max_exact)`,
    // truncated).
    let ratio = (n as f32 / max_exact as f32).ln() / ((max_distance as f64 / max_exact as f64).ln() as f32) * (nb - max_exact) as f32;
    let large = (max_exact + ratio as i64).min(nb - 1);
    (ret + large) as usize
}


impl T5ForConditionalGeneration {
    /// Build from HF-named tensors (`shared.weight`, `encoder.block.0.layer.0.SelfAttention.q.weight`,
    /// ...), converted to `dtype`. `encoder.embed_tokens`, `decoder.embed_tokens` and `lm_head`
    /// hold `shared`'s table (one tensor), as transformers 5 ties them whatever
    /// `tie_word_embeddings` says, unless the checkpoint has the module's own table
    /// (`<stack>.embed_tokens.weight`, `lm_head.weight`) with other values than `shared.weight`
    /// (FLAN-T5's separate `lm_head`, for one): then that table, untied.
    ///
    /// Errors: `InvalidModelConfig` naming a missing tensor, `ShapeMismatch` naming a misshapen one.
    pub fn from_tensors(config: T5Config, t: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Result<Self> {
        let c = &config;
        let path = PathBuf::from(c.name_or_path.clone().unwrap_or_else(|| "<model>".into()));
        let mut w = Weights { t, dtype, device: device.clone(), path };
        let (d, ff) = (c.d_model, c.d_ff);
        let shared = w.take("shared.weight", &[c.vocab_size, d])?;
        let mut stacks = Vec::new();
        for (stack, n) in [("encoder", c.num_layers), ("decoder", c.num_decoder_layers)] {
            let is_dec = stack == "decoder";
            let mut blocks = Vec::with_capacity(n);
            for i in 0..n {
                let p = format!("{stack}.block.{i}.layer");
                let self_attn = w.attention(&format!("{p}.0.SelfAttention"), c, i == 0)?;
                let self_attn_norm = w.take(&format!("{p}.0.layer_norm.weight"), &[d])?;
                let cross = if is_dec {
                    let a = w.attention(&format!("{p}.1.EncDecAttention"), c, false)?;
                    Some((w.take(&format!("{p}.1.layer_norm.weight"), &[d])?, a))
                } else {
                    None
                };
                let fi = if is_dec { 2 } else { 1 };
                let names = ff_names(format!("{p}.{fi}"), c.is_gated_act);
                let ff_mod = match names.as_slice() {
                    [wi_0, wi_1, wo] => T5DenseReluDense::Gated { wi_0: w.linear(wi_0, ff, d)?, wi_1: w.linear(wi_1, ff, d)?, wo: w.linear(wo, d, ff)? },
                    [wi, wo] => T5DenseReluDense::Plain { wi: w.linear(wi, ff, d)?, wo: w.linear(wo, d, ff)? },
                    _ => unreachable!("ff_names gives 2 or 3 names"),
                };
                let ff_norm = w.take(&format!("{p}.{fi}.layer_norm.weight"), &[d])?;
                blocks.push(T5Block { self_attn_norm, self_attn, cross, ff_norm, ff: ff_mod });
            }
            let final_norm = w.take(&format!("{stack}.final_layer_norm.weight"), &[d])?;
            stacks.push((blocks, final_norm));
        }
        // transformers 5 ties `encoder.embed_tokens`, `decoder.embed_tokens` and `lm_head` to
        // `shared` whatever config.json says (`T5Config` forces `tie_word_embeddings` and reads a
        // `false` as `scale_decoder_outputs = false`), except a module whose own table is in the
        // checkpoint with other values than `shared` ("... so we will NOT tie them").
        let mut alias = |key: &str| -> Result<(Tensor, bool)> {
            if !w.t.contains_key(key) {
                return Ok((shared.clone(), true));
            }
            let own = w.take(key, &[c.vocab_size, d])?;
            let same = (&own - &shared)?.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()? == 0.0;
            Ok(if same { (shared.clone(), true) } else { (own, false) })
        };
        let (encoder_table, encoder_tied) = alias("encoder.embed_tokens.weight")?;
        let (decoder_table, decoder_tied) = alias("decoder.embed_tokens.weight")?;
        let (lm_w, lm_head_tied) = alias("lm_head.weight")?;
        let (decoder, decoder_final_layer_norm) = stacks.pop().expect("two stacks");
        let (encoder, encoder_final_layer_norm) = stacks.pop().expect("two stacks");
        let info = ModelInfo {
            architecture: "T5ForConditionalGeneration".into(),
            model_type: "t5".into(),
            name_or_path: c.name_or_path.clone(),
            vocab_size: c.vocab_size,
            hidden_size: d,
            num_hidden_layers: c.num_layers,
            num_attention_heads: c.num_heads,
            num_key_value_heads: None,
            head_dim: c.d_kv,
            // Relative positions: no length limit.
            max_position_embeddings: usize::MAX,
            pad_token_id: c.pad_token_id,
            bos_token_id: None,
            eos_token_id: c.eos_token_id.clone(),
            decoder_start_token_id: c.decoder_start_token_id,
            task: Task::Seq2SeqLm,
            num_labels: None,
        };
        Ok(T5ForConditionalGeneration {
            lm_head: PeftLinear::new(lm_w, None, false),
            encoder_embed_tokens: PeftLinear::embedding(encoder_table),
            decoder_embed_tokens: PeftLinear::embedding(decoder_table),
            shared: PeftLinear::embedding(shared),
            encoder,
            encoder_final_layer_norm,
            decoder,
            decoder_final_layer_norm,
            device: device.clone(),
            dtype,
            info,
            lm_head_tied,
            stacks_tied: [encoder_tied, decoder_tied],
            config,
        })
    }

    /// Relative position bias `[1, heads, q_len, k_len]` f32 for queries at positions
    /// `q_offset .. q_offset + q_len` and keys at `0 .. k_len`.
    fn position_bias(&self, table: &Tensor, bidirectional: bool, q_len: usize, k_len: usize, q_offset: usize) -> Result<Tensor> {
        let c = &self.config;
        let (nb, md) = (c.relative_attention_num_buckets, c.relative_attention_max_distance);
        let idx: Vec<u32> = (0..q_len)
            .flat_map(|i| (0..k_len).map(move |j| relative_position_bucket(j as i64 - (i + q_offset) as i64, bidirectional, nb, md) as u32))
            .collect();
        let idx = Tensor::from_vec(idx, q_len * k_len, &self.device)?;
        let v = table.index_select(&idx, 0)?.reshape((q_len, k_len, c.num_heads))?.permute((2, 0, 1))?.unsqueeze(0)?;
        Ok(v.to_dtype(DType::F32)?)
    }

    /// Additive key-padding mask `[b, 1, 1, s]` (0 / `f32::MIN`); `None` when nothing is masked.
    fn key_mask(&self, mask: Option<&Vec<u8>>, b: usize, s: usize, arg: &str) -> Result<Option<Tensor>> {
        let Some(m) = mask else { return Ok(None) };
        if m.len() != b * s {
            return Err(PeftError::invalid_arg(arg, format!("has {} values, expected {b} × {s}", m.len())));
        }
        if m.iter().all(|&x| x != 0) {
            return Ok(None);
        }
        let v: Vec<f32> = m.iter().map(|&x| if x != 0 { 0.0 } else { f32::MIN }).collect();
        Ok(Some(Tensor::from_vec(v, (b, 1, 1, s), &self.device)?))
    }

    /// One `T5Attention`. `x` `[b, s, d_model]`; `kv_src` is the encoder output for
    /// cross-attention (`None` = self-attention); `bias` `[1|b, heads, s, t]` f32 (position bias
    /// plus mask). `slot` is this layer's cache entry: self-attention appends to it,
    /// cross-attention computes it once and reuses it.
    #[allow(clippy::too_many_arguments)]
    fn attention(&self, a: &T5Attention, x: &Tensor, kv_src: Option<&Tensor>, bias: Option<&Tensor>, lin: &LinearCtx, slot: Option<&mut Option<(Tensor, Tensor)>>) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (h, dk) = (self.config.num_heads, self.config.d_kv);
        let q = a.q.forward(x, lin)?.reshape((b, s, h, dk))?.transpose(1, 2)?.contiguous()?;
        let proj = |src: &Tensor| -> Result<(Tensor, Tensor)> {
            let t = src.dim(1)?;
            let k = a.k.forward(src, lin)?.reshape((b, t, h, dk))?.transpose(1, 2)?.contiguous()?;
            let v = a.v.forward(src, lin)?.reshape((b, t, h, dk))?.transpose(1, 2)?.contiguous()?;
            Ok((k, v))
        };
        let (k, v) = match (kv_src, slot) {
            (Some(src), Some(slot)) => match slot {
                Some(kv) => kv.clone(),
                None => {
                    let kv = proj(src)?;
                    *slot = Some(kv.clone());
                    kv
                }
            },
            (Some(src), None) => proj(src)?,
            (None, Some(slot)) => {
                let (k, v) = proj(x)?;
                let kv = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some(kv.clone());
                kv
            }
            (None, None) => proj(x)?,
        };
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        let scores = match bias {
            Some(bias) => scores.broadcast_add(bias)?,
            None => scores,
        };
        let probs = softmax_last(&scores, lin.train)?.to_dtype(self.dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h * dk))?;
        a.o.forward(&out, lin)
    }

    fn feed_forward(&self, f: &T5DenseReluDense, x: &Tensor, lin: &LinearCtx) -> Result<Tensor> {
        f.forward(self.config.activation, x, lin)
    }

    /// The encoder (`T5Stack` with `is_decoder = False`): input embeddings `[b, s, d_model]` and
    /// an optional 1/0 padding mask `[b, s]` → `encoder.last_hidden_state` `[b, s, d_model]`.
    ///
    /// Errors: `InvalidArgument` (`attentionMask`) for a mask of the wrong length.
    pub fn encode(&self, x: &Tensor, mask: Option<&Vec<u8>>, opts: &ForwardOptions) -> Result<Tensor> {
        let lin = opts.linear_ctx();
        let bias = self.encoder_bias(x, mask)?;
        let mut h = x.to_dtype(self.dtype)?;
        for blk in &self.encoder {
            h = self.encoder_block(blk, &h, &bias, &lin)?;
        }
        self.encoder_final(&h, &lin)
    }

    /// The encoder's relative position bias plus padding mask `[1|b, heads, s, s]` (f32), shared
    /// by every encoder block, for input embeddings `x` `[b, s, d_model]`.
    fn encoder_bias(&self, x: &Tensor, mask: Option<&Vec<u8>>) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let table = self.encoder[0].self_attn.relative_attention_bias.as_ref().expect("encoder block 0 has the bias table");
        let bias = self.position_bias(table, true, s, s, 0)?;
        Ok(match self.key_mask(mask, b, s, "attentionMask")? {
            Some(m) => bias.broadcast_add(&m)?,
            None => bias,
        })
    }

    /// One encoder block on `h` `[b, s, d_model]` with the stack's `bias`.
    fn encoder_block(&self, blk: &T5Block, h: &Tensor, bias: &Tensor, lin: &LinearCtx) -> Result<Tensor> {
        let eps = self.config.layer_norm_epsilon;
        let n = rms_norm(h, &blk.self_attn_norm, eps, lin.train)?;
        let h = (h + self.attention(&blk.self_attn, &n, None, Some(bias), lin, None)?)?;
        let n = rms_norm(&h, &blk.ff_norm, eps, lin.train)?;
        Ok((&h + self.feed_forward(&blk.ff, &n, lin)?)?)
    }

    /// `encoder.final_layer_norm`.
    fn encoder_final(&self, h: &Tensor, lin: &LinearCtx) -> Result<Tensor> {
        Ok(rms_norm(h, &self.encoder_final_layer_norm, self.config.layer_norm_epsilon, lin.train)?)
    }

    /// The decoder and `lm_head`: decoder ids `[b, t]` over the encoder output `enc`
    /// `[b, s, d_model]` (padding mask `enc_mask` `[b, s]`) → logits `[b, t, vocab]`
    /// (`[b, 1, vocab]` with `last_only`). `cache` supplies past self-attention keys/values
    /// (e.g. a prefix) and the cross-attention keys/values, and receives the new ones.
    fn decode(&self, enc: &Tensor, enc_mask: Option<&Vec<u8>>, opts: &ForwardOptions, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, s_enc, _) = enc.dims3()?;
        let t = self.decoder_len(opts, b)?;
        let n_dec = self.decoder.len();
        if let Some(cache) = cache.as_deref_mut() {
            if cache.layers.len() < n_dec {
                cache.layers.resize(n_dec, None);
            }
            if cache.cross.len() < n_dec {
                cache.cross.resize(n_dec, None);
            }
            if let Some((k, _)) = cache.layers[0].as_ref() {
                if k.dim(0)? != b {
                    return Err(PeftError::invalid_arg("decoderInputIds", format!("batch {b} does not match the cache's batch {}", k.dim(0)?)));
                }
            }
        }
        let past = cache.as_ref().map(|c| c.seq_len()).unwrap_or(0);
        let ctx = self.decoder_ctx(s_enc, enc_mask, opts, b, t, past)?;
        let mut h = ctx.x.clone();
        for (i, blk) in self.decoder.iter().enumerate() {
            let slots = cache.as_deref_mut().map(|c| (&mut c.layers[i], &mut c.cross[i]));
            h = self.decoder_block(blk, &h, &ctx.self_bias, enc, ctx.cross_bias.as_ref(), &ctx.lin, slots)?;
        }
        self.decoder_head(&h, &ctx.lin, opts.last_only)
    }

    /// The decoder's target length `t` from `opts.decoder_input_ids` (`b × t` ids, each in the
    /// vocabulary).
    ///
    /// Errors: `InvalidArgument` naming `decoderInputIds`.
    fn decoder_len(&self, opts: &ForwardOptions, b: usize) -> Result<usize> {
        let ids = opts.decoder_input_ids.as_ref().ok_or_else(|| {
            PeftError::invalid_arg("decoderInputIds", "T5ForConditionalGeneration needs decoder input ids (or labels to derive them from while training)")
        })?;
        if ids.is_empty() || !ids.len().is_multiple_of(b) {
            return Err(PeftError::invalid_arg("decoderInputIds", format!("has {} ids, expected batch {b} × target length", ids.len())));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.config.vocab_size) {
            return Err(PeftError::invalid_arg("decoderInputIds", format!("token id {bad} is outside the vocabulary (size {})", self.config.vocab_size)));
        }
        Ok(ids.len() / b)
    }

    /// What every decoder block of one forward of `t` new positions after `past` shares (see
    /// [`DecoderCtx`]) over an encoder output of `s_enc` positions; the ids were checked by
    /// [`Self::decoder_len`].
    ///
    /// Errors: `InvalidArgument` for a decoder mask of the wrong length or an encoder mask
    /// that does not fit `b × s_enc`.
    fn decoder_ctx<'o>(&self, s_enc: usize, enc_mask: Option<&Vec<u8>>, opts: &'o ForwardOptions, b: usize, t: usize, past: usize) -> Result<DecoderCtx<'o>> {
        if let Some(m) = &opts.decoder_attention_mask {
            if m.len() != b * (past + t) {
                return Err(PeftError::invalid_arg("decoderAttentionMask", format!("has {} values, expected {b} × {} (cached + new positions)", m.len(), past + t)));
            }
        }
        let table = self.decoder[0].self_attn.relative_attention_bias.as_ref().expect("decoder block 0 has the bias table");
        let self_bias = self.position_bias(table, false, t, past + t, past)?;
        let self_bias = match causal_mask(opts.decoder_attention_mask.as_ref(), b, t, past, &self.device)? {
            Some(m) => self_bias.broadcast_add(&m)?,
            None => self_bias,
        };
        let cross_bias = self.key_mask(enc_mask, b, s_enc, "attentionMask")?;
        let ids = opts.decoder_input_ids.as_deref().unwrap_or_default();
        let vocab = self.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(PeftError::invalid_arg("decoderInputIds", format!("token id {bad} is outside the vocabulary (size {vocab})")));
        }
        let lin = opts.linear_ctx();
        let idx = Tensor::from_slice(ids, b * t, &self.device)?;
        let x = self.decoder_embed_tokens.forward_embedding(&idx, b, t, &lin)?;
        Ok(DecoderCtx { lin, self_bias, cross_bias, x })
    }

    /// One decoder block on `h` `[b, t, d_model]`: self-attention with `self_bias`,
    /// cross-attention over the encoder output `enc` with `cross_bias`, feed-forward. `slots`:
    /// this block's self- and cross-attention cache entries.
    #[allow(clippy::too_many_arguments)]
    fn decoder_block(&self, blk: &T5Block, h: &Tensor, self_bias: &Tensor, enc: &Tensor, cross_bias: Option<&Tensor>, lin: &LinearCtx, slots: Option<(&mut KvSlot, &mut KvSlot)>) -> Result<Tensor> {
        let eps = self.config.layer_norm_epsilon;
        let (self_slot, cross_slot) = match slots {
            Some((a, c)) => (Some(a), Some(c)),
            None => (None, None),
        };
        let n = rms_norm(h, &blk.self_attn_norm, eps, lin.train)?;
        let h = (h + self.attention(&blk.self_attn, &n, None, Some(self_bias), lin, self_slot)?)?;
        let (norm, cross) = blk.cross.as_ref().expect("decoder blocks have cross-attention");
        let n = rms_norm(&h, norm, eps, lin.train)?;
        let h = (&h + self.attention(cross, &n, Some(enc), cross_bias, lin, cross_slot)?)?;
        let n = rms_norm(&h, &blk.ff_norm, eps, lin.train)?;
        Ok((&h + self.feed_forward(&blk.ff, &n, lin)?)?)
    }

    /// `decoder.final_layer_norm`, the output scaling and `lm_head` on the last decoder block's
    /// output `h` `[b, t, d_model]` (the last position only with `last_only`).
    fn decoder_head(&self, h: &Tensor, lin: &LinearCtx, last_only: bool) -> Result<Tensor> {
        let c = &self.config;
        let t = h.dim(1)?;
        let h = if last_only { h.narrow(1, t - 1, 1)? } else { h.clone() };
        let h = rms_norm(&h, &self.decoder_final_layer_norm, c.layer_norm_epsilon, lin.train)?;
        let h = if c.scale_decoder_outputs { (h * (c.d_model as f64).powf(-0.5))? } else { h };
        self.lm_head.forward(&h, lin)
    }
}

/// One layer's cached keys and values `[b, heads, t, d_kv]` each (see [`KvCache`]).
type KvSlot = Option<(Tensor, Tensor)>;

/// What every decoder block of one forward shares: the linears' context, the self-attention
/// position bias plus causal/padding mask `[1|b, heads, t, past + t]` (f32), the
/// cross-attention padding mask `[b, 1, 1, s_enc]` and the decoder's input embeddings
/// `[b, t, d_model]` (`decoder.embed_tokens` rows of the decoder ids, with its adapters, unscaled).
struct DecoderCtx<'a> {
    lin: LinearCtx<'a>,
    self_bias: Tensor,
    cross_bias: Option<Tensor>,
    x: Tensor,
}

/// Gradient checkpointing: [`T5ForConditionalGeneration`]'s encoder blocks for one forward; its
/// head is `encoder.final_layer_norm`, its side input the position bias (see
/// [`BaseModel::layer_stack`]).
struct EncoderStack<'a> {
    m: &'a T5ForConditionalGeneration,
    lin: LinearCtx<'a>,
    bias: Tensor,
}

impl LayerStack for EncoderStack<'_> {
    fn input(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.to_dtype(self.m.dtype)?)
    }
    fn num_layers(&self) -> usize {
        self.m.encoder.len()
    }
    fn side_inputs(&self) -> Vec<Tensor> {
        vec![self.bias.clone()]
    }
    fn layer(&self, i: usize, x: &Tensor, side: &[Tensor]) -> Result<Tensor> {
        self.m.encoder_block(&self.m.encoder[i], x, &side[0], &self.lin)
    }
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        self.m.encoder_final(h, &self.lin)
    }
}

/// Gradient checkpointing: the decoder blocks, whose side inputs are the self-attention bias
/// and the encoder output (every block's cross-attention reads it), over `encoder`.
struct DecoderStack<'a> {
    m: &'a T5ForConditionalGeneration,
    ctx: DecoderCtx<'a>,
    encoder: EncoderStack<'a>,
}

impl LayerStack for DecoderStack<'_> {
    fn num_layers(&self) -> usize {
        self.m.decoder.len()
    }
    fn side_inputs(&self) -> Vec<Tensor> {
        vec![self.ctx.self_bias.clone()]
    }
    fn layer(&self, i: usize, x: &Tensor, side: &[Tensor]) -> Result<Tensor> {
        let [self_bias, enc] = side else {
            return Err(PeftError::Internal(format!("T5 decoder layer {i}: expected the bias and the encoder output as side inputs, got {}", side.len())));
        };
        self.m.decoder_block(&self.m.decoder[i], x, self_bias, enc, self.ctx.cross_bias.as_ref(), &self.ctx.lin, None)
    }
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        self.m.decoder_head(h, &self.ctx.lin, false)
    }
    fn encoder(&self) -> Option<(&dyn LayerStack, &Tensor)> {
        Some((&self.encoder, &self.ctx.x))
    }
}

/// The linears of one `T5Attention` under prefix `p` (`...SelfAttention` / `...EncDecAttention`),
/// in module order: the names the loader reads and `named_linears` lists.
fn attn_names(p: String) -> [String; 4] {
    ["q", "k", "v", "o"].map(|n| format!("{p}.{n}"))
}

/// The linears of `{p}.DenseReluDense` in module order (`wi`, `wo`; gated: `wi_0`, `wi_1`, `wo`):
/// the names the loader reads and `named_linears` lists.
fn ff_names(p: String, gated: bool) -> Vec<String> {
    let names: &[&str] = if gated { &["wi_0", "wi_1", "wo"] } else { &["wi", "wo"] };
    names.iter().map(|n| format!("{p}.DenseReluDense.{n}")).collect()
}

impl BaseModel for T5ForConditionalGeneration {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// config.json's T5 fields plus transformers' `attribute_map` aliases (`hidden_size`,
    /// `num_attention_heads`, `num_hidden_layers`, `head_dim`).
    fn config_json(&self) -> Value {
        let c = &self.config;
        serde_json::json!({
            "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": c.vocab_size,
            "d_model": c.d_model, "d_kv": c.d_kv, "d_ff": c.d_ff, "num_layers": c.num_layers,
            "num_decoder_layers": c.num_decoder_layers, "num_heads": c.num_heads,
            "relative_attention_num_buckets": c.relative_attention_num_buckets,
            "relative_attention_max_distance": c.relative_attention_max_distance,
            "layer_norm_epsilon": c.layer_norm_epsilon, "feed_forward_proj": c.feed_forward_proj,
            "dense_act_fn": c.dense_act_fn, "is_gated_act": c.is_gated_act,
            "tie_word_embeddings": c.tie_word_embeddings, "scale_decoder_outputs": c.scale_decoder_outputs,
            "is_encoder_decoder": true, "pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id,
            "decoder_start_token_id": c.decoder_start_token_id, "dtype": c.dtype, "_name_or_path": c.name_or_path,
            // transformers' T5Config.attribute_map aliases
            "hidden_size": c.d_model, "num_attention_heads": c.num_heads, "num_hidden_layers": c.num_layers,
            "head_dim": c.d_kv,
        })
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    /// The linear layers (`nn.Linear`): [`BaseModel::named_layers`] without the three
    /// embedding tables.
    fn named_linears(&self) -> Vec<(String, &PeftLinear)> {
        self.named_layers().into_iter().filter(|(_, l)| !l.is_embedding).collect()
    }

    fn named_linears_mut(&mut self) -> Vec<(String, &mut PeftLinear)> {
        self.named_layers_mut().into_iter().filter(|(_, l)| !l.is_embedding).collect()
    }

    // `shared`, `encoder.embed_tokens`, `encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}`,
    // `encoder.block.{i}.layer.1.DenseReluDense.{wi,wo}` (gated: `wi_0`, `wi_1`, `wo`), then
    // `decoder.embed_tokens` and per decoder block `layer.0.SelfAttention`,
    // `layer.1.EncDecAttention`, `layer.2.DenseReluDense`, and `lm_head` last (module order).
    super::named_twins!(layers: |this| {
        let T5ForConditionalGeneration { config, shared, encoder_embed_tokens, decoder_embed_tokens, encoder, decoder, lm_head, .. } = this;
        let gated = config.is_gated_act;
        let mut out = vec![("shared".to_string(), shared)];
        for (stack, embed, blocks) in [("encoder", encoder_embed_tokens, encoder), ("decoder", decoder_embed_tokens, decoder)] {
            out.push((format!("{stack}.embed_tokens"), embed));
            for (i, blk) in blocks.into_iter().enumerate() {
                let p = format!("{stack}.block.{i}.layer");
                let T5Block { self_attn, cross, ff, .. } = blk;
                let T5Attention { q, k, v, o, .. } = self_attn;
                out.extend(attn_names(format!("{p}.0.SelfAttention")).into_iter().zip([q, k, v, o]));
                let fi = match cross {
                    Some((_, a)) => {
                        let T5Attention { q, k, v, o, .. } = a;
                        out.extend(attn_names(format!("{p}.1.EncDecAttention")).into_iter().zip([q, k, v, o]));
                        2
                    }
                    None => 1,
                };
                let lins = match ff {
                    T5DenseReluDense::Plain { wi, wo } => vec![wi, wo],
                    T5DenseReluDense::Gated { wi_0, wi_1, wo } => vec![wi_0, wi_1, wo],
                };
                out.extend(ff_names(format!("{p}.{fi}"), gated).into_iter().zip(lins));
            }
        }
        out.push(("lm_head".into(), lm_head));
        out
    });

    fn named_norm_biases_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        vec![]
    }

    fn named_norm_biases(&self) -> Vec<(String, &Tensor)> {
        vec![]
    }

    fn module_names(&self) -> Vec<String> {
        let gated = self.config.is_gated_act;
        let mut out = vec!["shared".to_string()];
        for (stack, blocks) in [("encoder", &self.encoder), ("decoder", &self.decoder)] {
            out.extend([stack.to_string(), format!("{stack}.embed_tokens"), format!("{stack}.block")]);
            for (i, blk) in blocks.iter().enumerate() {
                let p = format!("{stack}.block.{i}");
                out.extend([p.clone(), format!("{p}.layer"), format!("{p}.layer.0"), format!("{p}.layer.0.SelfAttention")]);
                out.extend(attn_names(format!("{p}.layer.0.SelfAttention")));
                if blk.self_attn.relative_attention_bias.is_some() {
                    out.push(format!("{p}.layer.0.SelfAttention.relative_attention_bias"));
                }
                out.extend([format!("{p}.layer.0.layer_norm"), format!("{p}.layer.0.dropout")]);
                let fi = if blk.cross.is_some() {
                    out.extend([format!("{p}.layer.1"), format!("{p}.layer.1.EncDecAttention")]);
                    out.extend(attn_names(format!("{p}.layer.1.EncDecAttention")));
                    out.extend([format!("{p}.layer.1.layer_norm"), format!("{p}.layer.1.dropout")]);
                    2
                } else {
                    1
                };
                out.extend([format!("{p}.layer.{fi}"), format!("{p}.layer.{fi}.DenseReluDense")]);
                out.extend(ff_names(format!("{p}.layer.{fi}"), gated));
                out.extend([
                    format!("{p}.layer.{fi}.DenseReluDense.dropout"),
                    format!("{p}.layer.{fi}.DenseReluDense.act"),
                    format!("{p}.layer.{fi}.layer_norm"),
                    format!("{p}.layer.{fi}.dropout"),
                ]);
            }
            out.extend([format!("{stack}.final_layer_norm"), format!("{stack}.dropout")]);
        }
        out.push("lm_head".into());
        out
    }

    /// `shared`, every linear except a tied `lm_head` and the stacks' `embed_tokens` (tied to
    /// `shared`), the layer norms and the two bias tables (as `named_parameters` counts them).
    fn base_param_count(&self) -> usize {
        let tied = self.lm_head_tied;
        let mut n = self.encoder_final_layer_norm.elem_count() + self.decoder_final_layer_norm.elem_count();
        for blk in self.encoder.iter().chain(&self.decoder) {
            n += blk.self_attn_norm.elem_count() + blk.ff_norm.elem_count();
            n += blk.cross.as_ref().map(|(w, _)| w.elem_count()).unwrap_or(0);
            n += blk.self_attn.relative_attention_bias.as_ref().map(|t| t.elem_count()).unwrap_or(0);
        }
        for (name, lin) in self.named_layers() {
            if (name == "lm_head" && tied) || (name == "encoder.embed_tokens" && self.stacks_tied[0]) || (name == "decoder.embed_tokens" && self.stacks_tied[1]) {
                continue;
            }
            n += lin.base_param_count();
        }
        n
    }

    fn word_embeddings(&self) -> &Tensor {
        &self.shared.weight
    }

    fn embed(&self, ids: &[u32], b: usize, s: usize) -> Result<Tensor> {
        self.embed_with(ids, b, s, &ForwardOptions::default())
    }

    /// The encoder's input embeddings: `encoder.embed_tokens` (HF's `T5Stack` calls its own
    /// module, not `shared`) with its adapters.
    fn embed_with(&self, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions) -> Result<Tensor> {
        super::decoder::embed_ids(&self.encoder_embed_tokens, self.config.vocab_size, ids, b, s, &self.device, &opts.linear_ctx())
    }

    /// transformers' `_tied_weights_keys` as transformers 5 applies them to T5 (always, whatever
    /// config.json's `tie_word_embeddings`): the two stacks' `embed_tokens` and `lm_head`, each
    /// unless the checkpoint holds its own table with other values than `shared`.
    fn tied_to_input_embedding(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, tied) in [("decoder.embed_tokens", self.stacks_tied[1]), ("encoder.embed_tokens", self.stacks_tied[0]), ("lm_head", self.lm_head_tied)] {
            if tied {
                out.push(name.to_string());
            }
        }
        out
    }

    /// `x`: encoder input embeddings `[b, s, d_model]` with `opts.attention_mask` `[b, s]`;
    /// `opts.decoder_input_ids` `[b, t]` (required) with `opts.decoder_attention_mask`
    /// `[b, past + t]` → decoder logits `[b, t, vocab]`. `position_ids` are not used (relative
    /// positions).
    ///
    /// With a `cache` that already holds the encoder output (a later decoding step), `x` and
    /// `attention_mask` are not used: the cached encoder output and mask are (as transformers'
    /// `generate` passes `encoder_outputs`). Otherwise the encoder runs and, with a cache, its
    /// output and mask are stored there.
    fn forward_embeds(&self, x: &Tensor, opts: &ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let cached = cache.as_ref().and_then(|c| c.encoder_hidden.clone().map(|h| (h, c.encoder_mask.clone())));
        let (enc, mask) = match cached {
            Some(hm) => hm,
            None => {
                let (b, s, _) = x.dims3()?;
                if let Some(m) = &opts.attention_mask {
                    if m.len() != b * s {
                        return Err(PeftError::invalid_arg("attentionMask", format!("has {} values, expected {b} × {s}", m.len())));
                    }
                }
                let h = self.encode(x, opts.attention_mask.as_ref(), opts)?;
                (h, opts.attention_mask.clone())
            }
        };
        let mut cache = cache;
        if let Some(c) = cache.as_deref_mut() {
            if c.encoder_hidden.is_none() {
                c.encoder_hidden = Some(enc.clone());
                c.encoder_mask = mask.clone();
            }
        }
        self.decode(&enc, mask.as_ref(), opts, cache)
    }

    /// Gradient checkpointing: the encoder's blocks on `x` (head: `encoder.final_layer_norm`),
    /// then the decoder's on the `decoder_input_ids` embeddings with the encoder output as a
    /// side input of every block (head: final norm, scaling, `lm_head`); see
    /// [`super::checkpoint`]. Prefix tuning is refused earlier.
    ///
    /// Errors: as [`BaseModel::forward_embeds`] (masks, decoder ids).
    fn layer_stack<'a>(&'a self, x: &Tensor, opts: &'a ForwardOptions) -> Option<Result<Box<dyn LayerStack + 'a>>> {
        let stack = || -> Result<Box<dyn LayerStack + 'a>> {
            let (b, s, _) = x.dims3()?;
            if let Some(m) = &opts.attention_mask {
                if m.len() != b * s {
                    return Err(PeftError::invalid_arg("attentionMask", format!("has {} values, expected {b} × {s}", m.len())));
                }
            }
            let encoder = EncoderStack { m: self, lin: opts.linear_ctx(), bias: self.encoder_bias(x, opts.attention_mask.as_ref())? };
            let t = self.decoder_len(opts, b)?;
            let ctx = self.decoder_ctx(s, opts.attention_mask.as_ref(), opts, b, t, 0)?;
            Ok(Box::new(DecoderStack { m: self, ctx, encoder }))
        };
        Some(stack())
    }

    /// Decoder blocks (the self-attention layers of a [`KvCache`]); `info().num_hidden_layers`
    /// is the encoder's `num_layers`, as transformers' alias has it.
    #[allow(clippy::misnamed_getters)]
    fn num_layers(&self) -> usize {
        self.config.num_decoder_layers
    }

    fn new_cache(&self) -> KvCache {
        let n = self.config.num_decoder_layers;
        KvCache { layers: vec![None; n], cross: vec![None; n], ..Default::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket as bucket;
    use super::*;

    fn lin(v: &[f32]) -> PeftLinear {
        PeftLinear::new(Tensor::from_slice(v, (2, 2), &Device::Cpu).unwrap(), None, false)
    }

    #[test]
    fn gated_feed_forward_gates_the_activated_branch() {
        // x = [1, -1]; wi_0 = I, wi_1 = diag(2, 3), wo = I → act([1, -1]) · [2, -3].
        let ff = T5DenseReluDense::Gated { wi_0: lin(&[1., 0., 0., 1.]), wi_1: lin(&[2., 0., 0., 3.]), wo: lin(&[1., 0., 0., 1.]) };
        let x = Tensor::from_slice(&[1f32, -1.], (1, 2), &Device::Cpu).unwrap();
        let ctx = LinearCtx { train: false, rows: None, row_scales: None, rng: None };
        let run = |a| -> Vec<f32> { ff.forward(a, &x, &ctx).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
        let close = |got: Vec<f32>, want: [f32; 2]| got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-5);
        assert!(close(run(T5Activation::Relu), [2.0, 0.0]));
        // gelu_new(1) = 0.841192, gelu_new(-1) = -0.158808 (tanh form); erf GELU: 0.841345, -0.158655.
        assert!(close(run(T5Activation::GeluNew), [1.682384, 0.476424]), "{:?}", run(T5Activation::GeluNew));
        assert!(close(run(T5Activation::Gelu), [1.682689, 0.475965]), "{:?}", run(T5Activation::Gelu));
    }

    #[test]
    fn config_follows_transformers_post_init() {
        let p = Path::new("config.json");
        let base = serde_json::json!({"vocab_size": 10, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 2, "num_heads": 2});
        let with = |k: &str, v: Value| {
            let mut x = base.clone();
            x[k] = v;
            T5Config::from_json(&x, p)
        };
        let c = T5Config::from_json(&base, p).unwrap();
        assert_eq!((c.is_gated_act, c.activation, c.scale_decoder_outputs, c.num_decoder_layers, c.relative_attention_num_buckets), (false, T5Activation::Relu, true, 2, 32));
        let g = with("feed_forward_proj", "gated-gelu".into()).unwrap();
        assert_eq!((g.is_gated_act, g.activation, g.dense_act_fn.as_str()), (true, T5Activation::GeluNew, "gelu_new"));
        assert_eq!(with("feed_forward_proj", "gated-silu".into()).unwrap().activation, T5Activation::Silu);
        // v1.1 configs say `tie_word_embeddings: false` → no scaling; an explicit
        // `scale_decoder_outputs` wins (transformers sets config.json's keys after `__post_init__`).
        assert!(!with("tie_word_embeddings", false.into()).unwrap().scale_decoder_outputs);
        assert!(!with("scale_decoder_outputs", false.into()).unwrap().scale_decoder_outputs);
        let mut both = base.clone();
        both["tie_word_embeddings"] = false.into();
        both["scale_decoder_outputs"] = true.into();
        assert!(T5Config::from_json(&both, p).unwrap().scale_decoder_outputs);
        let e = with("feed_forward_proj", "double-gelu".into()).unwrap_err();
        assert!(e.to_string().contains("feed_forward_proj"), "{e}");
        let e = with("feed_forward_proj", "tanh".into()).unwrap_err();
        assert!(e.to_string().contains("dense_act_fn"), "{e}");
        let mut missing = base.clone();
        missing.as_object_mut().unwrap().remove("d_kv");
        assert!(T5Config::from_json(&missing, p).unwrap_err().to_string().contains("d_kv"));
    }

    #[test]
    fn buckets_follow_transformers() {
        // Values from transformers' `_relative_position_bucket` (num_buckets 32, max_distance 128).
        let bi: Vec<usize> = [-200, -128, -20, -8, -7, -1, 0, 1, 7, 8, 20, 128].iter().map(|&r| bucket(r, true, 32, 128)).collect();
        assert_eq!(bi, [15, 15, 10, 8, 7, 1, 0, 17, 23, 24, 26, 31]);
        let uni: Vec<usize> = [-200, -20, -16, -15, -1, 0, 3].iter().map(|&r| bucket(r, false, 32, 128)).collect();
        assert_eq!(uni, [31, 17, 16, 15, 1, 0, 0]);
    }
}
