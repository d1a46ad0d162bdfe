//! Gemma 3 text decoder (transformers' `Gemma3ForCausalLM`, config `model_type: "gemma3_text"`,
//! e.g. google/gemma-3-270m) with transformers' module names.
//!
//! Per layer, with `n(x, w) = x / sqrt(mean(x²) + eps) · (1 + w)` computed in f32 and cast back
//! (Gemma's RMSNorm; checkpoints store `w`, initialised to 0):
//!
//! ```text
//! a   = attn(n(x, input_layernorm))              q, k: per-head n(·, q_norm / k_norm), then RoPE
//! h   = x + n(o_proj(a), post_attention_layernorm)
//! out = h + n(down_proj(gelu_tanh(gate_proj(m)) · up_proj(m)), post_feedforward_layernorm),
//!       m = n(h, pre_feedforward_layernorm)
//! ```
//!
//! Input embeddings are multiplied by `sqrt(hidden_size)` (rounded to the embedding's dtype, as
//! transformers' `Gemma3TextScaledWordEmbedding`), attention scores by
//! `query_pre_attn_scalar^-1/2`. Each layer is `sliding_attention` (keys within the last
//! `sliding_window` positions, RoPE theta of the local layers, 10000 by default) or
//! `full_attention` (causal, the global theta and optional `linear` RoPE scaling), from
//! `layer_types` (else every `sliding_window_pattern`-th layer is global, 6 by default). The
//! logits are soft-capped `c · tanh(logits / c)` when `final_logit_softcapping` is set.
//! `attn_logit_softcapping` is read but not applied: transformers 5.18's `Gemma3Attention` does
//! not pass it to the attention function either (so the logits match theirs).
//!
//! The fused engine (`crate::engine`) computes this architecture too (`as_gemma3`): LoRA and
//! prefix / prompt training, inference and cached decoding in f32 on the CPU, with the same
//! numbers; it declines `final_logit_softcapping` (unset in Gemma 3's released configs), which
//! then runs here, as does everything the engine declines for Llama.

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

/// The `architectures` values read as Gemma 3 text decoders.
pub const GEMMA3_ARCHITECTURES: &[&str] = &["Gemma3ForCausalLM"];

/// Hyper-parameters of a Gemma 3 text decoder (transformers' `Gemma3TextConfig` fields).
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Independent of hidden / heads (256 in the released models).
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2`.
    pub query_pre_attn_scalar: f64,
    /// Keys a sliding layer sees: positions `> q - sliding_window`. `None`: none is windowed.
    pub sliding_window: Option<usize>,
    /// Per layer: `true` for `sliding_attention`, `false` for `full_attention`.
    pub sliding_layers: Vec<bool>,
    /// RoPE theta of the global (full-attention) layers (`rope_parameters.full_attention`).
    pub rope_theta: f64,
    /// RoPE theta of the sliding layers (`rope_parameters.sliding_attention`, older configs'
    /// `rope_local_base_freq`).
    pub rope_local_theta: f64,
    /// `linear` RoPE scaling factor of the global layers (frequencies divided by it).
    pub rope_linear_factor: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// Read but not applied (as transformers 5.18, see the module docs).
    pub attn_logit_softcapping: Option<f64>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub dtype: Option<String>,
    pub name_or_path: Option<String>,
    /// The HF folder or GGUF file the model was loaded from.
    pub source_path: Option<PathBuf>,
    /// The config.json the model was built from (reported by [`BaseModel::config_json`]);
    /// `None` for a GGUF file (then a config is synthesised from the fields).
    pub raw: Option<Value>,
}

/// Per-layer `sliding_attention` flags from `sliding_window_pattern` (transformers' backward
/// compatible rule: layer `i` is global when `(i + 1) % pattern == 0`).
pub fn sliding_from_pattern(layers: usize, pattern: usize) -> Vec<bool> {
    (0..layers).map(|i| pattern == 0 || (i + 1) % pattern != 0).collect()
}

impl Gemma3Config {
    /// Parse a `Gemma3TextConfig` config.json (`model_type: "gemma3_text"`). `path` is used in
    /// error messages only.
    ///
    /// Errors: `InvalidModelConfig` for a missing or mistyped field, inconsistent head counts or
    /// layer types, an unsupported `hidden_activation` (only `gelu_pytorch_tanh`), RoPE type
    /// (`default`, `linear`) or `use_bidirectional_attention: true`.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |msg: String| PeftError::InvalidModelConfig { path: path.to_path_buf(), msg };
        if !v.is_object() {
            return Err(bad("the top level must be a JSON object".into()));
        }
        let architecture = v.get("architectures").and_then(|a| a.get(0)).and_then(|x| x.as_str()).unwrap_or("Gemma3ForCausalLM");
        if !GEMMA3_ARCHITECTURES.contains(&architecture) {
            return Err(bad(format!("architecture `{architecture}` is not a Gemma 3 text decoder; supported architectures: {}", supported_architectures().join(", "))));
        }
        let defaults = DecoderDefaults { heads: Some(8), kv_heads: Some(4), head_dim: Some(256), rms_norm_eps: 1e-6, max_position_embeddings: 131_072, tie_word_embeddings: true };
        let f = DecoderFields::from_json(v, path, &defaults)?;
        let (num_hidden_layers, head_dim) = (f.num_hidden_layers, f.head_dim);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad(format!("`head_dim` {head_dim} must be positive and even (RoPE)")));
        }
        let act = v.get("hidden_activation").or(v.get("hidden_act")).and_then(|x| x.as_str()).unwrap_or("gelu_pytorch_tanh");
        if act != "gelu_pytorch_tanh" {
            return Err(bad(format!("hidden_activation `{act}` is not supported (supported: gelu_pytorch_tanh)")));
        }
        if v.get("use_bidirectional_attention").and_then(|x| x.as_bool()) == Some(true) {
            return Err(bad("`use_bidirectional_attention: true` is not supported (causal decoders only)".into()));
        }
        let sliding_layers = match v.get("layer_types").filter(|x| !x.is_null()) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(bad(format!("`layer_types` entry {t} is not sliding_attention or full_attention"))),
                })
                .collect::<Result<Vec<_>>>()?,
            Some(other) => return Err(bad(format!("`layer_types` must be an array, found {other}"))),
            None => sliding_from_pattern(num_hidden_layers, get_usize(v, "sliding_window_pattern", path)?.unwrap_or(6)),
        };
        if sliding_layers.len() != num_hidden_layers {
            return Err(bad(format!("`layer_types` has {} entries for {num_hidden_layers} layers", sliding_layers.len())));
        }
        // transformers 5: rope_parameters = {sliding_attention: {...}, full_attention: {...}};
        // older configs: rope_theta, rope_local_base_freq and rope_scaling (global layers).
        let rp = v.get("rope_parameters").filter(|x| !x.is_null());
        let theta = |layer: &str, flat: &str, default: f64| -> Result<f64> {
            let t = rp.and_then(|p| p.get(layer)).and_then(|p| p.get("rope_theta")).and_then(|x| x.as_f64());
            Ok(t.or(get_f64(v, flat, path)?).unwrap_or(default))
        };
        let rope_theta = theta("full_attention", "rope_theta", 1_000_000.0)?;
        let rope_local_theta = theta("sliding_attention", "rope_local_base_freq", 10_000.0)?;
        let mut rope_linear_factor = None;
        let scalings = [
            ("rope_parameters.full_attention", rp.and_then(|p| p.get("full_attention"))),
            ("rope_parameters.sliding_attention", rp.and_then(|p| p.get("sliding_attention"))),
            ("rope_scaling", v.get("rope_scaling").filter(|x| !x.is_null())),
        ];
        for (key, p) in scalings {
            let Some(p) = p else { continue };
            let rt = p.get("rope_type").or(p.get("type")).and_then(|x| x.as_str()).unwrap_or("default");
            match (rt, key) {
                ("default", _) => {}
                ("linear", "rope_parameters.full_attention" | "rope_scaling") => match p.get("factor").and_then(|x| x.as_f64()) {
                    Some(f) if f.is_finite() && f > 0.0 => rope_linear_factor = Some(f),
                    _ => return Err(bad(format!("`{key}` of rope_type linear needs a positive `factor`"))),
                },
                (other, _) => return Err(bad(format!("rope_type `{other}` ({key}) is not supported (supported: default; linear on full-attention layers)"))),
            }
        }
        for (name, t) in [("full_attention rope_theta", rope_theta), ("sliding_attention rope_theta", rope_local_theta)] {
            if !(t.is_finite() && t > 0.0) {
                return Err(bad(format!("{name} must be positive, found {t}")));
            }
        }
        let softcap = |k: &str| -> Result<Option<f64>> {
            match get_f64(v, k, path)? {
                Some(c) if !(c.is_finite() && c > 0.0) => Err(bad(format!("`{k}` must be positive, found {c}"))),
                c => Ok(c),
            }
        };
        Ok(Gemma3Config {
            vocab_size: f.vocab_size,
            intermediate_size: f.intermediate_size,
            num_hidden_layers,
            hidden_size: f.hidden_size,
            num_attention_heads: f.num_attention_heads,
            num_key_value_heads: f.num_key_value_heads,
            head_dim,
            rms_norm_eps: f.rms_norm_eps,
            query_pre_attn_scalar: get_f64(v, "query_pre_attn_scalar", path)?.unwrap_or(256.0),
            sliding_window: get_usize(v, "sliding_window", path)?.filter(|&w| w > 0),
            sliding_layers,
            rope_theta,
            rope_local_theta,
            rope_linear_factor,
            final_logit_softcapping: softcap("final_logit_softcapping")?,
            attn_logit_softcapping: softcap("attn_logit_softcapping")?,
            max_position_embeddings: f.max_position_embeddings,
            tie_word_embeddings: f.tie_word_embeddings,
            attention_bias: v.get("attention_bias").and_then(|x| x.as_bool()).unwrap_or(false),
            bos_token_id: f.bos_token_id,
            eos_token_id: f.eos_token_id,
            pad_token_id: f.pad_token_id,
            dtype: f.dtype,
            name_or_path: f.name_or_path,
            source_path: None,
            raw: Some(v.clone()),
        })
    }

    /// RoPE inverse frequencies `[head_dim / 2]` of a sliding (`local`) or global layer:
    /// `1 / theta^(2i/d)`, divided by the linear factor on global layers.
    pub fn inv_freq(&self, local: bool) -> Vec<f32> {
        let (theta, factor) = if local { (self.rope_local_theta, 1.0) } else { (self.rope_theta, self.rope_linear_factor.unwrap_or(1.0)) };
        let d = self.head_dim as f64;
        // transformers computes `1 / base ** (arange(0, d, 2).float() / d)` in f32.
        (0..self.head_dim / 2).map(|i| ((1.0 / theta.powf(2.0 * i as f64 / d)) as f32) / factor as f32).collect()
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
        let layer_types: Vec<&str> = self.sliding_layers.iter().map(|&s| if s { "sliding_attention" } else { "full_attention" }).collect();
        let mut full = serde_json::json!({ "rope_type": "default", "rope_theta": self.rope_theta });
        if let Some(f) = self.rope_linear_factor {
            full = serde_json::json!({ "rope_type": "linear", "factor": f, "rope_theta": self.rope_theta });
        }
        serde_json::json!({
            "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window, "layer_types": layer_types,
            "rope_parameters": { "full_attention": full, "sliding_attention": { "rope_type": "default", "rope_theta": self.rope_local_theta } },
            "final_logit_softcapping": self.final_logit_softcapping, "attn_logit_softcapping": self.attn_logit_softcapping,
            "max_position_embeddings": self.max_position_embeddings, "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id, "dtype": self.dtype, "_name_or_path": self.name_or_path,
        })
    }
}

/// A Gemma RMSNorm: the checkpoint weight `w` `[dim]` and the scale `1 + w` in f32 that the
/// forward uses.
pub struct GemmaNorm {
    pub weight: Tensor,
    scale: Tensor,
}

impl GemmaNorm {
    fn new(weight: Tensor) -> Result<Self> {
        let scale = (weight.to_dtype(DType::F32)? + 1.0)?;
        Ok(GemmaNorm { weight, scale })
    }

    /// The f32 scale `1 + w` `[dim]` that the forward multiplies by (what the fused engine reads).
    pub fn scale(&self) -> &Tensor {
        &self.scale
    }

    /// `x / sqrt(mean(x²) + eps) · (1 + w)` over the last dimension, in f32, cast back to `x`'s
    /// dtype (transformers' `Gemma3RMSNorm`).
    pub fn forward(&self, x: &Tensor, eps: f64, train: bool) -> Result<Tensor> {
        let dtype = x.dtype();
        Ok(rms_norm(&x.to_dtype(DType::F32)?, &self.scale, eps, train)?.to_dtype(dtype)?)
    }
}

pub struct Attention {
    pub q_proj: PeftLinear,
    pub k_proj: PeftLinear,
    pub v_proj: PeftLinear,
    pub o_proj: PeftLinear,
    pub q_norm: GemmaNorm,
    pub k_norm: GemmaNorm,
}

pub struct Mlp {
    pub gate_proj: PeftLinear,
    pub up_proj: PeftLinear,
    pub down_proj: PeftLinear,
}

pub struct DecoderLayer {
    pub input_layernorm: GemmaNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: GemmaNorm,
    pub pre_feedforward_layernorm: GemmaNorm,
    pub mlp: Mlp,
    pub post_feedforward_layernorm: GemmaNorm,
    /// `sliding_attention` (windowed, local RoPE) or `full_attention`.
    pub sliding: bool,
}

/// The whole model; `lm_head.weight` shares `embed_tokens`' storage when the embeddings are tied.
pub struct Gemma3ForCausalLM {
    pub config: Gemma3Config,
    /// `[vocab, hidden]`.
    pub embed_tokens: PeftLinear,
    pub layers: Vec<DecoderLayer>,
    pub norm: GemmaNorm,
    pub lm_head: PeftLinear,
    inv_freq_local: Vec<f32>,
    inv_freq_global: Vec<f32>,
    pub device: Device,
    pub dtype: DType,
    info: ModelInfo,
}

/// What every layer of one forward shares: the linear context and, per layer type, the RoPE
/// tables and the additive mask.
struct Ctx<'a> {
    lin: LinearCtx<'a>,
    /// `[sliding, full]` (cos, sin), each `[b, s, head_dim / 2]`.
    rope: [(Tensor, Tensor); 2],
    /// `[sliding, full]` additive masks `[b, 1, s, total]`.
    mask: [Option<Tensor>; 2],
}

impl Gemma3ForCausalLM {
    /// Build from HF-named tensors (`model.embed_tokens.weight`, ...), converted to `dtype`.
    /// Norm weights are transformers' `w` (GGUF files store `1 + w`; the GGUF loader subtracts 1).
    ///
    /// Errors: `InvalidModelConfig` / `ShapeMismatch` naming a missing or misshapen tensor.
    pub fn from_tensors(config: Gemma3Config, mut t: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Result<Self> {
        let c = &config;
        let path = config_name(c);
        let mut take = |name: &str, shape: &[usize]| super::take_weight(&mut t, &[name], name, shape, dtype, device, &path);
        let (h, hd, f) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let q_out = c.num_attention_heads * hd;
        let kv_out = c.num_key_value_heads * hd;
        let embed_tokens = PeftLinear::embedding(take("model.embed_tokens.weight", &[c.vocab_size, h])?);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<PeftLinear> {
                let w = take(&format!("{p}.{name}.weight"), &[out, inp])?;
                let b = if bias { Some(take(&format!("{p}.{name}.bias"), &[out])?) } else { None };
                Ok(PeftLinear::new(w, b, false))
            };
            let [q, k, v, o, gate, up, down] = decoder::LLAMA_LAYER_LINEARS;
            let self_attn_lin = (lin(q, q_out, h, c.attention_bias)?, lin(k, kv_out, h, c.attention_bias)?, lin(v, kv_out, h, c.attention_bias)?, lin(o, h, q_out, c.attention_bias)?);
            let mlp = Mlp { gate_proj: lin(gate, f, h, false)?, up_proj: lin(up, f, h, false)?, down_proj: lin(down, h, f, false)? };
            let mut norm = |name: &str, dim: usize| -> Result<GemmaNorm> { GemmaNorm::new(take(&format!("{p}.{name}.weight"), &[dim])?) };
            let (q_proj, k_proj, v_proj, o_proj) = self_attn_lin;
            let self_attn = Attention { q_proj, k_proj, v_proj, o_proj, q_norm: norm("self_attn.q_norm", hd)?, k_norm: norm("self_attn.k_norm", hd)? };
            layers.push(DecoderLayer {
                input_layernorm: norm("input_layernorm", h)?,
                self_attn,
                post_attention_layernorm: norm("post_attention_layernorm", h)?,
                pre_feedforward_layernorm: norm("pre_feedforward_layernorm", h)?,
                mlp,
                post_feedforward_layernorm: norm("post_feedforward_layernorm", h)?,
                sliding: c.sliding_layers[i],
            });
        }
        let norm = GemmaNorm::new(take("model.norm.weight", &[h])?)?;
        let lm_w = if c.tie_word_embeddings { embed_tokens.weight.clone() } else { take("lm_head.weight", &[c.vocab_size, h])? };
        let info = decoder::model_info(c, "Gemma3ForCausalLM".into(), "gemma3_text".into(), Task::CausalLm, None);
        Ok(Gemma3ForCausalLM {
            inv_freq_local: c.inv_freq(true),
            inv_freq_global: c.inv_freq(false),
            info,
            config,
            embed_tokens,
            layers,
            norm,
            lm_head: PeftLinear::new(lm_w, None, false),
            device: device.clone(),
            dtype,
        })
    }

    /// [`BaseModel::embed_with`]: the (LoRA-adapted) embedding rows times `sqrt(hidden_size)`
    /// rounded to the model dtype.
    fn embed_scaled(&self, ids: &[u32], b: usize, s: usize, ctx: &LinearCtx) -> Result<Tensor> {
        let e = decoder::embed_ids(&self.embed_tokens, self.config.vocab_size, ids, b, s, &self.device, ctx)?;
        let scale = Tensor::new((self.config.hidden_size as f32).sqrt(), &self.device)?.to_dtype(e.dtype())?;
        Ok(e.broadcast_mul(&scale)?)
    }

    fn rope_tables(&self, positions: &[u32], b: usize, s: usize, inv_freq: &[f32]) -> Result<(Tensor, Tensor)> {
        let angles = decoder::rope_angles(positions, inv_freq, b, s, &self.device)?;
        Ok((angles.cos()?.to_dtype(self.dtype)?, angles.sin()?.to_dtype(self.dtype)?))
    }

    fn layer_forward(&self, l: &DecoderLayer, x: &Tensor, ctx: &Ctx, kv: Option<&mut Option<(Tensor, Tensor)>>) -> Result<Tensor> {
        let c = &self.config;
        let (train, eps) = (ctx.lin.train, c.rms_norm_eps);
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let a = &l.self_attn;
        let n1 = l.input_layernorm.forward(x, eps, train)?;
        let q = a.q_norm.forward(&a.q_proj.forward(&n1, &ctx.lin)?.reshape((b, s, nh, hd))?, eps, train)?.transpose(1, 2)?;
        let k = a.k_norm.forward(&a.k_proj.forward(&n1, &ctx.lin)?.reshape((b, s, nkv, hd))?, eps, train)?.transpose(1, 2)?;
        let v = a.v_proj.forward(&n1, &ctx.lin)?.reshape((b, s, nkv, hd))?.transpose(1, 2)?;
        let which = if l.sliding { 0 } else { 1 };
        let (cos, sin) = &ctx.rope[which];
        let q = rope(&q, cos, sin, train)?;
        let k = rope(&k, cos, sin, train)?;
        let (k, v) = append_kv(kv, k, v)?;
        let (k, v) = repeat_kv(k, v, nh)?;
        let scores = (q.contiguous()?.matmul(&k.t()?)? * c.query_pre_attn_scalar.powf(-0.5))?.to_dtype(DType::F32)?;
        let scores = match &ctx.mask[which] {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax_last(&scores, train)?.to_dtype(self.dtype)?;
        let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, nh * hd))?;
        let o = a.o_proj.forward(&attn, &ctx.lin)?;
        let h = (x + l.post_attention_layernorm.forward(&o, eps, train)?)?;
        let m = l.pre_feedforward_layernorm.forward(&h, eps, train)?;
        let g = l.mlp.gate_proj.forward(&m, &ctx.lin)?.gelu()?; // tanh approximation = gelu_pytorch_tanh
        let d = l.mlp.down_proj.forward(&(g * l.mlp.up_proj.forward(&m, &ctx.lin)?)?, &ctx.lin)?;
        Ok((h + l.post_feedforward_layernorm.forward(&d, eps, train)?)?)
    }
}

impl BaseModel for Gemma3ForCausalLM {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn layer_stack<'a>(&'a self, x: &Tensor, opts: &'a ForwardOptions) -> Option<Result<Box<dyn super::checkpoint::LayerStack + 'a>>> {
        let layer = |m: &Self, i: usize, x: &Tensor, ctx: &Ctx| m.layer_forward(&m.layers[i], x, ctx, None);
        Some(self.ctx(x, opts, None).map(|ctx| super::checkpoint::Layers::new(self, ctx, opts, self.layers.len(), layer, Self::head_forward).boxed()))
    }
    fn as_gemma3(&self) -> Option<&Gemma3ForCausalLM> {
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
        let Gemma3ForCausalLM { embed_tokens, layers, lm_head, .. } = this;
        let layers = IntoIterator::into_iter(layers).map(|l| {
            let DecoderLayer { self_attn: Attention { q_proj, k_proj, v_proj, o_proj, .. }, mlp: Mlp { gate_proj, up_proj, down_proj }, .. } = l;
            decoder::llama_layer_linears([q_proj, k_proj, v_proj, o_proj], [gate_proj, up_proj, down_proj])
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
        let norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"];
        decoder::module_names(self.layers.len(), &["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"], &["gate_proj", "up_proj", "down_proj"], &norms, "lm_head")
    }
    fn base_param_count(&self) -> usize {
        let mut n = self.norm.weight.elem_count();
        for l in &self.layers {
            let norms = [&l.input_layernorm, &l.post_attention_layernorm, &l.pre_feedforward_layernorm, &l.post_feedforward_layernorm, &l.self_attn.q_norm, &l.self_attn.k_norm];
            n += norms.iter().map(|x| x.weight.elem_count()).sum::<usize>();
        }
        decoder::base_param_count(n, self.named_linears(), self.config.tie_word_embeddings)
    }
    fn word_embeddings(&self) -> &Tensor {
        &self.embed_tokens.weight
    }
    fn embed(&self, ids: &[u32], b: usize, s: usize) -> Result<Tensor> {
        self.embed_scaled(ids, b, s, &LinearCtx::default())
    }
    fn embed_with(&self, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions) -> Result<Tensor> {
        self.embed_scaled(ids, b, s, &opts.linear_ctx())
    }
    fn forward_embeds(&self, x: &Tensor, opts: &ForwardOptions, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let ctx = self.ctx(x, opts, cache.as_deref())?;
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_mut().map(|c| &mut c.layers[i]);
            h = self.layer_forward(layer, &h, &ctx, kv)?;
        }
        self.head_forward(&h, &ctx, opts)
    }
}

impl Gemma3ForCausalLM {
    /// What every layer of one forward of `x` `[b, s, hidden]` shares (see [`Ctx`]).
    fn ctx<'o>(&self, x: &Tensor, opts: &'o ForwardOptions, cache: Option<&KvCache>) -> Result<Ctx<'o>> {
        let (b, s, _) = x.dims3()?;
        let c = &self.config;
        let (past, positions) = decoder::positions(opts, cache, b, s, c.max_position_embeddings)?;
        let rope = [self.rope_tables(&positions, b, s, &self.inv_freq_local)?, self.rope_tables(&positions, b, s, &self.inv_freq_global)?];
        let mask = [
            super::windowed_causal_mask(opts.attention_mask.as_ref(), b, s, past, c.sliding_window, &self.device)?,
            super::causal_mask(opts.attention_mask.as_ref(), b, s, past, &self.device)?,
        ];
        Ok(Ctx { lin: opts.linear_ctx(), rope, mask })
    }

    /// Final norm, head and logit soft-capping on the last layer's output `h` `[b, s, hidden]`.
    fn head_forward(&self, h: &Tensor, ctx: &Ctx, opts: &ForwardOptions) -> Result<Tensor> {
        let c = &self.config;
        let s = h.dim(1)?;
        let h = if opts.last_only { h.narrow(1, s - 1, 1)? } else { h.clone() };
        let h = self.norm.forward(&h, c.rms_norm_eps, opts.train)?;
        let logits = self.lm_head.forward(&h, &ctx.lin)?;
        match c.final_logit_softcapping {
            Some(cap) => Ok(((logits / cap)?.tanh()? * cap)?),
            None => Ok(logits),
        }
    }

}
