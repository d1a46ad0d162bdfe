//! Phi-3 family decoder (transformers' `Phi3ForCausalLM`, config `model_type: "phi3"`:
//! Phi-3-mini, Phi-3.5-mini, Phi-4-mini) with transformers' module names.
//!
//! The layer is Llama's with two fused linears, kept fused so that HF adapters' keys and
//! `target_modules` (`qkv_proj`, `gate_up_proj`) address them as in HF PEFT (a LoRA on
//! `qkv_proj` is one LoRA on the `[q + 2·kv, hidden]` linear):
//!
//! ```text
//! q | k | v = self_attn.qkv_proj(n1(x))              rows: q heads, then kv heads of k, then of v
//! h   = x + o_proj(attn(rope(q), rope(k), v))        GQA, eager attention, head_dim^-1/2
//! g | u = mlp.gate_up_proj(n2(h))                    first half gate, second half up
//! out = h + down_proj(u · silu(g))
//! ```
//!
//! with RMSNorm `n1` = `input_layernorm`, `n2` = `post_attention_layernorm` (weight × the f32
//! normalised input cast back). RoPE rotates the first `head_dim · partial_rotary_factor`
//! dimensions of each head (rotate-half within them; Phi-4-mini: 0.75) and passes the rest
//! through. `longrope` scaling (also `su`, as transformers renames it) as transformers 5.18
//! computes it: inverse frequencies `1 / (ext · theta^(2i/d))` with `ext` = `long_factor` when
//! the forward's largest position + 1 exceeds `original_max_position_embeddings` (top-level
//! field first, as `Phi3Config`) and `short_factor` otherwise, chosen per forward call. A cached
//! generation that crosses the original length re-rotates the cached keys to the long factors,
//! so that it equals generation without a cache (what transformers' Phi-3
//! `prepare_inputs_for_generation` means to do by recomputing the cache; 5.18's `generate`
//! with a cache instead runs that step's token without any context). Cos and sin are
//! multiplied by `attention_factor` (default `sqrt(1 + ln(f) / ln(original))` with
//! `f = factor`, else `max_position_embeddings / original`; 1 when `f ≤ 1`). `sliding_window` (Phi-3-mini) restricts keys to the last
//! `sliding_window` positions, as transformers' sliding-window causal mask.
//!
//! The fused engine ([`crate::engine`]) computes this architecture too (f32 on the CPU:
//! training, logits and cached decoding with LoRA on any of the four linears, one LoRA over
//! each fused output, several adapters, mixed batches, prefix and prompt tuning), reading the
//! weights through [`BaseModel::as_phi3`] and the RoPE tables through [`Phi3Config::inv_freq`].
//! What it does not cover runs here, on the general candle path, and so does the one cached
//! step that re-rotates the cached keys to the long factors (the engine declines it).

use super::config::{get_f64, get_usize, supported_architectures};
use super::decoder::{self, append_kv, config_name, repeat_kv, DecoderDefaults, DecoderFields};
use super::{BaseModel, ModelInfo, Task};
pub use super::forward::{ForwardOptions, KvCache};
use crate::error::{PeftError, Result};
use crate::ops::{rms_norm, rope, softmax_last};
use crate::tuners::linear::{LinearCtx, PeftLinear};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The `architectures` values read as Phi-3 decoders.
pub const PHI3_ARCHITECTURES: &[&str] = &["Phi3ForCausalLM"];

/// The module paths (below `model.layers.N.`) of a Phi-3 layer's linears in transformers'
/// module order `[o, qkv, gate_up, down]`: the one declaration loading and listing share.
const LAYER_LINEARS: [&str; 4] = ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"];

/// transformers' `longrope` parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LongRope {
    /// `[rotary_dim / 2]` divisors of the frequencies for sequences within the original length.
    pub short_factor: Vec<f64>,
    /// `[rotary_dim / 2]` divisors beyond it.
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: usize,
    /// Multiplies cos and sin.
    pub attention_factor: f64,
}

/// Hyper-parameters of a Phi-3 decoder (transformers' `Phi3Config` fields).
#[derive(Debug, Clone, PartialEq)]
pub struct Phi3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Rotated dimensions per head: `int(head_dim · partial_rotary_factor)`, even.
    pub rotary_dim: usize,
    pub partial_rotary_factor: f64,
    pub longrope: Option<LongRope>,
    pub sliding_window: Option<usize>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub dtype: Option<String>,
    pub name_or_path: Option<String>,
    /// The HF folder or GGUF file the model was loaded from.
    pub source_path: Option<PathBuf>,
    /// The config.json the model was built from; `None` for a GGUF file.
    pub raw: Option<Value>,
}

/// transformers' default `attention_factor` of longrope: `sqrt(1 + ln f / ln original)`, 1 for
/// `f ≤ 1`.
pub fn longrope_attention_factor(factor: f64, original: usize) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        (1.0 + factor.ln() / (original as f64).ln()).sqrt()
    }
}

impl Phi3Config {
    /// Parse a `Phi3Config` config.json. `path` is used in error messages only.
    ///
    /// Errors: `InvalidModelConfig` for a missing or mistyped field, inconsistent head counts, an
    /// activation other than `silu`, a RoPE type other than `default` / `longrope` (`su`), or
    /// longrope factors of the wrong length.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |msg: String| PeftError::InvalidModelConfig { path: path.to_path_buf(), msg };
        if !v.is_object() {
            return Err(bad("the top level must be a JSON object".into()));
        }
        let architecture = v.get("architectures").and_then(|a| a.get(0)).and_then(|x| x.as_str()).unwrap_or("Phi3ForCausalLM");
        if !PHI3_ARCHITECTURES.contains(&architecture) {
            return Err(bad(format!("architecture `{architecture}` is not a Phi-3 decoder; supported architectures: {}", supported_architectures().join(", "))));
        }
        let defaults = DecoderDefaults { heads: None, kv_heads: None, head_dim: None, rms_norm_eps: 1e-5, max_position_embeddings: 4096, tie_word_embeddings: false };
        let f = DecoderFields::from_json(v, path, &defaults)?;
        let head_dim = f.head_dim;
        let act = v.get("hidden_act").and_then(|x| x.as_str()).unwrap_or("silu");
        if act != "silu" {
            return Err(bad(format!("hidden_act `{act}` is not supported (supported: silu)")));
        }
        let rp = v.get("rope_parameters").filter(|x| !x.is_null()).or(v.get("rope_scaling").filter(|x| !x.is_null()));
        if let Some(p) = rp {
            if !p.is_object() {
                return Err(bad(format!("`rope_parameters` must be an object, found {p}")));
            }
        }
        let rget = |k: &str| rp.and_then(|p| p.get(k)).filter(|x| !x.is_null());
        let rope_theta = match rget("rope_theta").and_then(|x| x.as_f64()) {
            Some(t) => t,
            None => get_f64(v, "rope_theta", path)?.unwrap_or(10_000.0),
        };
        let partial_rotary_factor = match rget("partial_rotary_factor").and_then(|x| x.as_f64()) {
            Some(f) => f,
            None => get_f64(v, "partial_rotary_factor", path)?.unwrap_or(1.0),
        };
        if !(rope_theta.is_finite() && rope_theta > 0.0 && partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0) {
            return Err(bad(format!("rope_theta ({rope_theta}) must be positive and partial_rotary_factor ({partial_rotary_factor}) in (0, 1]")));
        }
        let rotary_dim = (head_dim as f64 * partial_rotary_factor) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(bad(format!("rotary dimension {rotary_dim} (head_dim {head_dim} × partial_rotary_factor {partial_rotary_factor}) must be positive and even")));
        }
        let max_position_embeddings = f.max_position_embeddings;
        let rope_type = rget("rope_type").or(rget("type")).and_then(|x| x.as_str()).unwrap_or("default");
        let longrope = match rope_type {
            "default" => None,
            "longrope" | "su" => {
                let factors = |k: &str| -> Result<Vec<f64>> {
                    let a = rget(k).and_then(|x| x.as_array()).ok_or_else(|| bad(format!("`rope_parameters.{k}` (longrope) must be a list of numbers")))?;
                    let f: Option<Vec<f64>> = a.iter().map(|x| x.as_f64()).collect();
                    match f {
                        Some(f) if f.len() == rotary_dim / 2 && f.iter().all(|x| x.is_finite() && *x > 0.0) => Ok(f),
                        _ => Err(bad(format!("`rope_parameters.{k}` must be {} positive numbers (rotary_dim / 2)", rotary_dim / 2))),
                    }
                };
                // Phi3Config: the top-level field wins over rope_parameters' (transformers'
                // standardize_rope_params), and the class default is 4096.
                let original = match get_usize(v, "original_max_position_embeddings", path)? {
                    Some(o) => o,
                    None => rget("original_max_position_embeddings").and_then(|x| x.as_u64()).map(|x| x as usize).unwrap_or(4096),
                };
                if original < 2 {
                    return Err(bad(format!("original_max_position_embeddings must be at least 2, found {original}")));
                }
                let factor = rget("factor").and_then(|x| x.as_f64()).unwrap_or(max_position_embeddings as f64 / original as f64);
                let attention_factor = rget("attention_factor").and_then(|x| x.as_f64()).unwrap_or_else(|| longrope_attention_factor(factor, original));
                Some(LongRope { short_factor: factors("short_factor")?, long_factor: factors("long_factor")?, original_max_position_embeddings: original, attention_factor })
            }
            other => return Err(bad(format!("rope_type `{other}` is not supported for Phi-3 (supported: default, longrope)"))),
        };
        Ok(Phi3Config {
            vocab_size: f.vocab_size,
            intermediate_size: f.intermediate_size,
            num_hidden_layers: f.num_hidden_layers,
            hidden_size: f.hidden_size,
            num_attention_heads: f.num_attention_heads,
            num_key_value_heads: f.num_key_value_heads,
            head_dim,
            rms_norm_eps: f.rms_norm_eps,
            rope_theta,
            rotary_dim,
            partial_rotary_factor,
            longrope,
            sliding_window: get_usize(v, "sliding_window", path)?.filter(|&w| w > 0),
            max_position_embeddings,
            tie_word_embeddings: f.tie_word_embeddings,
            bos_token_id: f.bos_token_id,
            eos_token_id: f.eos_token_id,
            pad_token_id: f.pad_token_id,
            dtype: f.dtype,
            name_or_path: f.name_or_path,
            source_path: None,
            raw: Some(v.clone()),
        })
    }

    /// Inverse frequencies `[rotary_dim / 2]` for a forward whose largest position + 1 is
    /// `seq_len`, and the cos/sin multiplier (see the module docs).
    pub fn inv_freq(&self, seq_len: usize) -> (Vec<f32>, f32) {
        let d = self.rotary_dim as f64;
        let base = (0..self.rotary_dim / 2).map(|i| self.rope_theta.powf(2.0 * i as f64 / d));
        match &self.longrope {
            None => (base.map(|b| (1.0 / b) as f32).collect(), 1.0),
            Some(lr) => {
                let ext = if seq_len > lr.original_max_position_embeddings { &lr.long_factor } else { &lr.short_factor };
                (base.zip(ext).map(|(b, e)| (1.0 / (e * b)) as f32).collect(), lr.attention_factor as f32)
            }
        }
    }

    /// The config as transformers writes it (for a GGUF source, synthesised from the fields).
    pub fn to_json(&self) -> Value {
        if let Some(raw) = &self.raw {
            let mut v = raw.clone();
            if let (Some(o), Some(n)) = (v.as_object_mut(), &self.name_or_path) {
                o.insert("_name_or_path".into(), n.clone().into());
            }
            return v;
        }
        let mut rope = serde_json::json!({ "rope_type": "default", "rope_theta": self.rope_theta, "partial_rotary_factor": self.partial_rotary_factor });
        let mut original = self.max_position_embeddings;
        if let Some(lr) = &self.longrope {
            original = lr.original_max_position_embeddings;
            rope = serde_json::json!({
                "rope_type": "longrope", "rope_theta": self.rope_theta, "partial_rotary_factor": self.partial_rotary_factor,
                "short_factor": lr.short_factor, "long_factor": lr.long_factor, "attention_factor": lr.attention_factor,
                "original_max_position_embeddings": original,
            });
        }
        serde_json::json!({
            "model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "rms_norm_eps": self.rms_norm_eps, "hidden_act": "silu",
            "rope_parameters": rope, "original_max_position_embeddings": original, "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings, "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "dtype": self.dtype, "_name_or_path": self.name_or_path,
        })
    }
}

/// Longrope state kept with a [`KvCache`] ([`KvCache::model_state`]): the first cached position
/// whose keys this model rotated with the short factors (positions before it, e.g. a
/// prefix-tuning prefix, were not rotated by the model); `None` when none was.
#[derive(Debug, Clone, Default)]
struct LongRopeCache {
    short_from: Option<usize>,
}

pub struct Attention {
    /// `[(heads + 2 · kv_heads) · head_dim, hidden]`: q rows, then k, then v.
    pub qkv_proj: PeftLinear,
    pub o_proj: PeftLinear,
}

pub struct Mlp {
    /// `[2 · intermediate, hidden]`: gate rows, then up.
    pub gate_up_proj: PeftLinear,
    pub down_proj: PeftLinear,
}

pub struct DecoderLayer {
    pub input_layernorm: Tensor,
    pub self_attn: Attention,
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp,
}

/// The whole model; `lm_head.weight` shares `embed_tokens`' storage when the embeddings are tied.
pub struct Phi3ForCausalLM {
    pub config: Phi3Config,
    /// `[vocab, hidden]`.
    pub embed_tokens: PeftLinear,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    pub lm_head: PeftLinear,
    pub device: Device,
    pub dtype: DType,
    info: ModelInfo,
}

struct Ctx<'a> {
    lin: LinearCtx<'a>,
    /// `[b, s, rotary_dim / 2]`, scaled by the attention factor.
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
}

impl Phi3ForCausalLM {
    /// Build from HF-named tensors (`model.layers.0.self_attn.qkv_proj.weight`, ...), converted
    /// to `dtype`.
    ///
    /// Errors: `InvalidModelConfig` / `ShapeMismatch` naming a missing or misshapen tensor.
    pub fn from_tensors(config: Phi3Config, mut t: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Result<Self> {
        let c = &config;
        let path = config_name(c);
        let mut take = |name: &str, shape: &[usize]| super::take_weight(&mut t, &[name], name, shape, dtype, device, &path);
        let (h, hd, f) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let q_out = c.num_attention_heads * hd;
        let qkv_out = q_out + 2 * c.num_key_value_heads * hd;
        let embed_tokens = PeftLinear::embedding(take("model.embed_tokens.weight", &[c.vocab_size, h])?);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut lin = |name: &str, out: usize, inp: usize| -> Result<PeftLinear> { Ok(PeftLinear::new(take(&format!("{p}.{name}.weight"), &[out, inp])?, None, false)) };
            let [o, qkv, gate_up, down] = LAYER_LINEARS;
            let self_attn = Attention { qkv_proj: lin(qkv, qkv_out, h)?, o_proj: lin(o, h, q_out)? };
            let mlp = Mlp { gate_up_proj: lin(gate_up, 2 * f, h)?, down_proj: lin(down, h, f)? };
            layers.push(DecoderLayer {
                input_layernorm: take(&format!("{p}.input_layernorm.weight"), &[h])?,
                self_attn,
                post_attention_layernorm: take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp,
            });
        }
        let norm = take("model.norm.weight", &[h])?;
        let lm_w = if c.tie_word_embeddings { embed_tokens.weight.clone() } else { take("lm_head.weight", &[c.vocab_size, h])? };
        let info = decoder::model_info(c, "Phi3ForCausalLM".into(), "phi3".into(), Task::CausalLm, None);
        Ok(Phi3ForCausalLM { info, config, embed_tokens, layers, norm, lm_head: PeftLinear::new(lm_w, None, false), device: device.clone(), dtype })
    }

    fn embed_ctx(&self, ids: &[u32], b: usize, s: usize, ctx: &LinearCtx) -> Result<Tensor> {
        decoder::embed_ids(&self.embed_tokens, self.config.vocab_size, ids, b, s, &self.device, ctx)
    }

    /// RoPE on the first `rotary_dim` dimensions of `x` `[b, heads, s, head_dim]`.
    fn partial_rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, train: bool) -> Result<Tensor> {
        let (rd, hd) = (self.config.rotary_dim, self.config.head_dim);
        if rd == hd {
            return Ok(rope(x, cos, sin, train)?);
        }
        let r = rope(&x.narrow(3, 0, rd)?, cos, sin, train)?;
        Ok(Tensor::cat(&[&r, &x.narrow(3, rd, hd - rd)?], 3)?)
    }

    /// Longrope: the cached keys of `past` positions were rotated with the short factors and this
    /// forward uses the long ones; rotate them on by `p · (f_long − f_short)` so that the cache
    /// equals a recomputation with the long factors (transformers' Phi-3
    /// `prepare_inputs_for_generation` means to recompute the cache at this point; its 5.18
    /// generate instead runs the new token without any context). The positions of the cached
    /// keys follow generate's rule: `cumsum(mask) − 1` (1 where masked) when a mask covers them,
    /// else `0 .. past`.
    /// Only keys from `from` on are rotated (earlier ones, a prefix-tuning prefix, were never
    /// rotated by the model).
    fn rerotate_cache(&self, cache: &mut KvCache, from: usize, past: usize, mask: Option<&Vec<u8>>, b: usize) -> Result<()> {
        let c = &self.config;
        let (short, _) = c.inv_freq(0);
        let (long, _) = c.inv_freq(usize::MAX);
        let total = mask.map(|m| m.len() / b.max(1)).unwrap_or(past);
        let mut angles = Vec::with_capacity(b * past * short.len());
        for r in 0..b {
            let mut n: i64 = 0;
            for j in 0..past {
                let p = match mask {
                    Some(m) if total >= past => {
                        let on = m[r * total + j] != 0;
                        n += on as i64;
                        if on { (n - 1) as f64 } else { 1.0 }
                    }
                    _ => j as f64,
                };
                if j >= from {
                    angles.extend(short.iter().zip(&long).map(|(&s, &l)| (p * (l as f64 - s as f64)) as f32));
                }
            }
        }
        let n = past - from;
        let angles = Tensor::from_vec(angles, (b, n, short.len()), &self.device)?;
        let (cos, sin) = (angles.cos()?.to_dtype(self.dtype)?, angles.sin()?.to_dtype(self.dtype)?);
        for slot in cache.layers.iter_mut() {
            if let Some((k, v)) = slot.take() {
                let r = self.partial_rope(&k.narrow(2, from, n)?, &cos, &sin, false)?;
                let k = if from == 0 { r } else { Tensor::cat(&[&k.narrow(2, 0, from)?, &r], 2)? };
                *slot = Some((k.contiguous()?, v));
            }
        }
        cache.model_state::<LongRopeCache>().short_from = None;
        Ok(())
    }

    /// For the fused engine's cached forward (`past` cached positions, largest position + 1
    /// `seq_len`): whether [`BaseModel::forward_embeds`] would re-rotate the cached keys to the
    /// long factors (the engine then declines that forward, and this model runs it).
    pub(crate) fn rerotates_cache(&self, cache: &mut KvCache, past: usize, seq_len: usize) -> bool {
        let Some(lr) = &self.config.longrope else { return false };
        matches!(cache.model_state::<LongRopeCache>().short_from, Some(from) if seq_len > lr.original_max_position_embeddings && from < past)
    }

    /// After the fused engine ran a cached forward that needed no re-rotation: the longrope
    /// state [`BaseModel::forward_embeds`] leaves with the cache (the first position rotated
    /// with the short factors), so that either path may run the next step.
    pub(crate) fn note_cached_forward(&self, cache: &mut KvCache, past: usize, seq_len: usize) {
        if let Some(lr) = &self.config.longrope {
            let st = cache.model_state::<LongRopeCache>();
            if st.short_from.is_none() && seq_len <= lr.original_max_position_embeddings {
                st.short_from = Some(past);
            }
        }
    }

    fn layer_forward(&self, l: &DecoderLayer, x: &Tensor, ctx: &Ctx, kv: Option<&mut Option<(Tensor, Tensor)>>) -> Result<Tensor> {
        let c = &self.config;
        let (train, eps) = (ctx.lin.train, c.rms_norm_eps);
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let n1 = rms_norm(x, &l.input_layernorm, eps, train)?;
        let qkv = l.self_attn.qkv_proj.forward(&n1, &ctx.lin)?;
        let q = qkv.narrow(2, 0, nh * hd)?.reshape((b, s, nh, hd))?.transpose(1, 2)?;
        let k = qkv.narrow(2, nh * hd, nkv * hd)?.reshape((b, s, nkv, hd))?.transpose(1, 2)?;
        let v = qkv.narrow(2, (nh + nkv) * hd, nkv * hd)?.reshape((b, s, nkv, hd))?.transpose(1, 2)?;
        let q = self.partial_rope(&q, &ctx.cos, &ctx.sin, train)?;
        let k = self.partial_rope(&k, &ctx.cos, &ctx.sin, train)?;
        let (k, v) = append_kv(kv, k, v)?;
        let (k, v) = repeat_kv(k, v, nh)?;
        let scores = (q.contiguous()?.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?.to_dtype(DType::F32)?;
        let scores = match &ctx.mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax_last(&scores, train)?.to_dtype(self.dtype)?;
        let attn = probs.matmul(&v.contiguous()?)?.transpose(1, 2)?.reshape((b, s, nh * hd))?;
        let h = (x + l.self_attn.o_proj.forward(&attn, &ctx.lin)?)?;
        let n2 = rms_norm(&h, &l.post_attention_layernorm, eps, train)?;
        let gu = l.mlp.gate_up_proj.forward(&n2, &ctx.lin)?;
        let f = c.intermediate_size;
        let act = (gu.narrow(2, f, f)? * gu.narrow(2, 0, f)?.silu()?)?;
        Ok((h + l.mlp.down_proj.forward(&act, &ctx.lin)?)?)
    }
}

impl BaseModel for Phi3ForCausalLM {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn as_phi3(&self) -> Option<&Phi3ForCausalLM> {
        Some(self)
    }
    fn config_json(&self) -> Value {
        self.config.to_json()
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    // Every linear layer with its transformers module path, in module order.
    super::named_twins!(linears: |this| {
        let Phi3ForCausalLM { embed_tokens, layers, lm_head, .. } = this;
        let layers = IntoIterator::into_iter(layers).map(|l| {
            let DecoderLayer { self_attn: Attention { qkv_proj, o_proj }, mlp: Mlp { gate_up_proj, down_proj }, .. } = l;
            LAYER_LINEARS.into_iter().zip([o_proj, qkv_proj, gate_up_proj, down_proj]).collect::<Vec<_>>()
        });
        decoder::named_linears(embed_tokens, layers, ("lm_head", lm_head))
    });
    fn named_norm_biases_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        vec![]
    }
    fn named_norm_biases(&self) -> Vec<(String, &Tensor)> {
        vec![]
    }
    fn module_names(&self) -> Vec<String> {
        decoder::module_names(self.layers.len(), &["o_proj", "qkv_proj"], &["gate_up_proj", "down_proj"], &["input_layernorm", "post_attention_layernorm"], "lm_head")
    }
    fn base_param_count(&self) -> usize {
        let norms: usize = self.layers.iter().map(|l| l.input_layernorm.elem_count() + l.post_attention_layernorm.elem_count()).sum();
        decoder::base_param_count(self.norm.elem_count() + norms, self.named_linears(), self.config.tie_word_embeddings)
    }
    fn word_embeddings(&self) -> &Tensor {
        &self.embed_tokens.weight
    }
    fn embed(&self, ids: &[u32], b: usize, s: usize) -> Result<Tensor> {
        self.embed_ctx(ids, b, s, &LinearCtx::default())
    }
    fn embed_with(&self, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions) -> Result<Tensor> {
        self.embed_ctx(ids, b, s, &opts.linear_ctx())
    }
    fn forward_embeds(&self, x: &Tensor, opts: &ForwardOptions, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let c = &self.config;
        let (past, positions) = decoder::positions(opts, cache.as_deref(), b, s, c.max_position_embeddings)?;
        // transformers' longrope: the factors of this forward follow max(position_ids) + 1.
        let seq_len = positions.iter().max().map(|&p| p as usize + 1).unwrap_or(0);
        if let (Some(lr), Some(cache)) = (&c.longrope, cache.as_mut()) {
            let orig = lr.original_max_position_embeddings;
            match cache.model_state::<LongRopeCache>().short_from {
                Some(from) if seq_len > orig && from < past => self.rerotate_cache(cache, from, past, opts.attention_mask.as_ref(), b)?,
                None if seq_len <= orig => cache.model_state::<LongRopeCache>().short_from = Some(past),
                _ => {}
            }
        }
        let ctx = self.ctx(opts, &positions, b, s, past, seq_len)?;
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_mut().map(|c| &mut c.layers[i]);
            h = self.layer_forward(layer, &h, &ctx, kv)?;
        }
        self.head_forward(&h, &ctx, opts)
    }

    fn layer_stack<'a>(&'a self, x: &Tensor, opts: &'a ForwardOptions) -> Option<Result<Box<dyn super::checkpoint::LayerStack + 'a>>> {
        let stack = || -> Result<Box<dyn super::checkpoint::LayerStack + 'a>> {
            let (b, s, _) = x.dims3()?;
            let (past, positions) = decoder::positions(opts, None, b, s, self.config.max_position_embeddings)?;
            let seq_len = positions.iter().max().map(|&p| p as usize + 1).unwrap_or(0);
            let layer = |m: &Self, i: usize, x: &Tensor, ctx: &Ctx| m.layer_forward(&m.layers[i], x, ctx, None);
            Ok(super::checkpoint::Layers::new(self, self.ctx(opts, &positions, b, s, past, seq_len)?, opts, self.layers.len(), layer, Self::head_forward).boxed())
        };
        Some(stack())
    }
}

impl Phi3ForCausalLM {
    /// What every layer of one forward shares: the RoPE tables of `positions` `[b, s]` (longrope
    /// factors chosen by `seq_len`, the largest position + 1) and the additive mask.
    fn ctx<'o>(&self, opts: &'o ForwardOptions, positions: &[u32], b: usize, s: usize, past: usize, seq_len: usize) -> Result<Ctx<'o>> {
        let c = &self.config;
        let (inv_freq, scale) = c.inv_freq(seq_len);
        let angles = decoder::rope_angles(positions, &inv_freq, b, s, &self.device)?;
        let (cos, sin) = if scale == 1.0 { (angles.cos()?, angles.sin()?) } else { ((angles.cos()? * scale as f64)?, (angles.sin()? * scale as f64)?) };
        let (cos, sin) = (cos.to_dtype(self.dtype)?, sin.to_dtype(self.dtype)?);
        let mask = super::windowed_causal_mask(opts.attention_mask.as_ref(), b, s, past, c.sliding_window, &self.device)?;
        Ok(Ctx { lin: opts.linear_ctx(), cos, sin, mask })
    }

    /// Final norm and head on the last layer's output `h` `[b, s, hidden]`.
    fn head_forward(&self, h: &Tensor, ctx: &Ctx, opts: &ForwardOptions) -> Result<Tensor> {
        let s = h.dim(1)?;
        let h = if opts.last_only { h.narrow(1, s - 1, 1)? } else { h.clone() };
        let h = rms_norm(&h, &self.norm, self.config.rms_norm_eps, opts.train)?;
        self.lm_head.forward(&h, &ctx.lin)
    }
}
