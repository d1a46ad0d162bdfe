//! Llama-family causal LM (Llama, Llama 3.x, SmolLM2, Qwen2, Qwen3, Mistral, SmolLM3) with
//! transformers' module names.
//!
//! Per layer: `h = x + o_proj(attn(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))`,
//! `out = h + down_proj(silu(gate_proj(n2(h))) · up_proj(n2(h)))`, with RMSNorm `n1`, `n2`,
//! grouped-query attention (`num_key_value_heads` ≤ `num_attention_heads`), rotate-half RoPE
//! with the config's `rope_theta` (and Llama 3.x `llama3` frequency scaling), eager attention with an
//! additive causal + padding mask. Qwen3 adds a per-head RMSNorm of q and k (`self_attn.q_norm` /
//! `k_norm`, weight `[head_dim]`) between the reshape to heads and RoPE. SmolLM3 has NoPE
//! layers: where [`LlamaConfig::layer_uses_rope`] is false (config.json `no_rope_layers[i] == 0`)
//! the layer's queries and keys are used (and cached) without RoPE. An attention module that
//! carries a live adaption prompt ([`crate::tuners::adaption_prompt`], HF `AdaptedAttention`)
//! adds its gated attention over the learned prompt to `o_proj`'s output.
//! Matches transformers' `LlamaForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM` /
//! `SmolLM3ForCausalLM` (eager attention).

use super::config::LlamaConfig;
use super::decoder::{self, append_kv, config_name, repeat_kv};
use super::{BaseModel, ModelInfo, Task};
pub use super::forward::{ForwardOptions, KvCache};
use crate::error::{PeftError, Result};
use crate::ops::{rms_norm, rope, softmax_last};
use crate::tuners::adaption_prompt::layer::{AttentionProjections, AttentionPrompts};
use crate::tuners::linear::{LinearCtx, PeftLinear};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

pub struct Attention {
    pub q_proj: PeftLinear,
    pub k_proj: PeftLinear,
    pub v_proj: PeftLinear,
    pub o_proj: PeftLinear,
    /// Qwen3: per-head RMSNorm weights `[head_dim]` of the queries and keys.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// Adaption prompts wrapped around this attention (HF `AdaptedAttention`; see
    /// [`crate::tuners::adaption_prompt`]).
    pub prompts: AttentionPrompts,
}

pub struct Mlp {
    pub gate_proj: PeftLinear,
    pub up_proj: PeftLinear,
    pub down_proj: PeftLinear,
}

pub struct DecoderLayer {
    pub input_layernorm: Tensor,
    pub self_attn: Attention,
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp,
}

/// The whole model. `lm_head.weight` shares `embed_tokens`' storage when the embeddings are tied.
pub struct LlamaForCausalLM {
    pub config: LlamaConfig,
    /// Module path of the output head: `lm_head` (causal LM) or `score`
    /// (`LlamaForSequenceClassification`, `[num_labels, hidden]`, no bias).
    head_name: &'static str,
    /// `[vocab, hidden]`.
    pub embed_tokens: PeftLinear,
    pub layers: Vec<DecoderLayer>,
    /// `[hidden]`.
    pub norm: Tensor,
    pub lm_head: PeftLinear,
    /// RoPE inverse frequencies `1 / theta^(2i/d)`, `[head_dim / 2]` f32.
    inv_freq: Vec<f32>,
    pub device: Device,
    pub dtype: DType,
    info: ModelInfo,
}

struct Ctx<'a> {
    lin: LinearCtx<'a>,
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
}

impl LlamaForCausalLM {
    /// Build from HF-named tensors (`model.embed_tokens.weight`, ...), converted to `dtype`.
    ///
    /// Errors: `ShapeMismatch` / `InvalidModelConfig` naming the missing or misshapen tensor;
    /// `InvalidModelConfig` for [`LlamaConfig::rope_layers`] of another length than the layers.
    pub fn from_tensors(config: LlamaConfig, t: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_tensors_for(config, t, dtype, device, Task::CausalLm, None)
    }

    /// Build with the head of `task`: `CausalLm` (`lm_head`) or `SeqCls`
    /// (`LlamaForSequenceClassification`: `score.weight` `[num_labels, hidden]`, which must be in
    /// `t`; the loader initialises it when the checkpoint has none).
    ///
    /// Errors: as [`Self::from_tensors`]; `InvalidModelConfig` for another task or a missing
    /// `num_labels`.
    pub fn from_tensors_for(config: LlamaConfig, mut t: HashMap<String, Tensor>, dtype: DType, device: &Device, task: Task, num_labels: Option<usize>) -> Result<Self> {
        let c = &config;
        let path = config_name(c);
        if let Some(r) = c.rope_layers.as_ref().filter(|r| r.len() != c.num_hidden_layers) {
            return Err(PeftError::InvalidModelConfig { path, msg: format!("`no_rope_layers` has {} entries for {} layers", r.len(), c.num_hidden_layers) });
        }
        let mut take = |name: &str, shape: &[usize]| super::take_weight(&mut t, &[name], name, shape, dtype, device, &path);
        let h = c.hidden_size;
        let hd = c.head_dim;
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
            let self_attn = Attention {
                q_proj: lin(q, q_out, h, c.attention_bias)?,
                k_proj: lin(k, kv_out, h, c.attention_bias)?,
                v_proj: lin(v, kv_out, h, c.attention_bias)?,
                o_proj: lin(o, h, q_out, c.attention_bias && c.model_type != "qwen2")?,
                q_norm: None,
                k_norm: None,
                prompts: AttentionPrompts::default(),
            };
            let mlp = Mlp {
                gate_proj: lin(gate, c.intermediate_size, h, c.mlp_bias)?,
                up_proj: lin(up, c.intermediate_size, h, c.mlp_bias)?,
                down_proj: lin(down, h, c.intermediate_size, c.mlp_bias)?,
            };
            let mut self_attn = self_attn;
            if c.qk_norm {
                self_attn.q_norm = Some(take(&format!("{p}.self_attn.q_norm.weight"), &[hd])?);
                self_attn.k_norm = Some(take(&format!("{p}.self_attn.k_norm.weight"), &[hd])?);
            }
            layers.push(DecoderLayer {
                input_layernorm: take(&format!("{p}.input_layernorm.weight"), &[h])?,
                self_attn,
                post_attention_layernorm: take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp,
            });
        }
        let norm = take("model.norm.weight", &[h])?;
        let (head_name, lm_w) = match task {
            Task::CausalLm if c.tie_word_embeddings => ("lm_head", embed_tokens.weight.clone()),
            Task::CausalLm => ("lm_head", take("lm_head.weight", &[c.vocab_size, h])?),
            Task::SeqCls => {
                let n = num_labels.ok_or_else(|| PeftError::InvalidModelConfig { path: config_name(c), msg: "sequence classification needs `num_labels`".into() })?;
                ("score", take("score.weight", &[n, h])?)
            }
            other => {
                return Err(PeftError::InvalidModelConfig {
                    path: config_name(c),
                    msg: format!("{} models have no {} head here (supported: CAUSAL_LM, SEQ_CLS)", c.model_type, other.task_type()),
                })
            }
        };
        let inv_freq = c.inv_freq();
        let architecture = match task {
            Task::SeqCls => c.architecture.replace("ForCausalLM", "ForSequenceClassification"),
            _ => c.architecture.replace("ForSequenceClassification", "ForCausalLM"),
        };
        let info = decoder::model_info(c, architecture, c.model_type.clone(), task, if task == Task::SeqCls { num_labels } else { None });
        Ok(LlamaForCausalLM {
            head_name,
            info,
            config,
            embed_tokens,
            layers,
            norm,
            lm_head: PeftLinear::new(lm_w, None, false),
            inv_freq,
            device: device.clone(),
            dtype,
        })
    }

    /// Module names of every module (for error messages and targeting), transformers' naming.
    pub fn module_names(&self) -> Vec<String> {
        let attn: &[&str] = if self.config.qk_norm { &["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"] } else { &["q_proj", "k_proj", "v_proj", "o_proj"] };
        decoder::module_names(self.layers.len(), attn, &["gate_proj", "up_proj", "down_proj"], &["input_layernorm", "post_attention_layernorm"], self.head_name)
    }

    /// RoPE inverse frequencies `1 / theta^(2i/d)` (scaled as the config's `rope_scaling`
    /// says), `[head_dim / 2]`.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Number of base-model parameters, tied weights counted once (as `named_parameters`).
    pub fn base_param_count(&self) -> usize {
        let mut n = self.norm.elem_count();
        for l in &self.layers {
            n += l.input_layernorm.elem_count() + l.post_attention_layernorm.elem_count();
            n += [&l.self_attn.q_norm, &l.self_attn.k_norm].iter().filter_map(|t| t.as_ref()).map(|t| t.elem_count()).sum::<usize>();
        }
        decoder::base_param_count(n, self.named_linears(), self.config.tie_word_embeddings && self.info.task == Task::CausalLm)
    }

    /// Token embeddings: `ids` `[b, s]` u32 → `[b, s, hidden]`.
    ///
    /// Errors: `InvalidArgument` for an id outside the vocabulary.
    pub fn embed(&self, ids: &[u32], b: usize, s: usize) -> Result<Tensor> {
        self.embed_with_ctx(ids, b, s, &LinearCtx::default())
    }

    /// [`Self::embed`] with LoRA-on-embedding context (training, mixed-batch rows).
    pub fn embed_with_ctx(&self, ids: &[u32], b: usize, s: usize, ctx: &LinearCtx) -> Result<Tensor> {
        decoder::embed_ids(&self.embed_tokens, self.config.vocab_size, ids, b, s, &self.device, ctx)
    }

    /// Forward from token ids `[b, s]` (row-major) → logits `[b, s, vocab]` (or `[b, 1, vocab]`
    /// with `last_only`), in the model dtype. `cache`, when given, supplies past keys/values and
    /// receives the new ones.
    /// Sequence classification pools the last non-pad token of `ids` (see [`BaseModel::forward`]).
    pub fn forward(&self, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        BaseModel::forward(self, ids, b, s, opts, cache)
    }

    /// Forward from input embeddings `[b, s, hidden]` (prompt learning prepends virtual tokens
    /// here). See [`Self::forward`].
    pub fn forward_embeds(&self, x: &Tensor, opts: &ForwardOptions, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let ctx = self.ctx(x, opts, cache.as_deref())?;
        let c = &self.config;
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_mut().map(|c| &mut c.layers[i]);
            h = self.layer_forward(layer, &h, &ctx, kv, c.layer_uses_rope(i))?;
        }
        self.head_forward(&h, &ctx, opts)
    }

    /// What every layer of one forward of `x` `[b, s, hidden]` shares: RoPE tables for the
    /// positions and the additive mask.
    fn ctx<'o>(&self, x: &Tensor, opts: &'o ForwardOptions, cache: Option<&KvCache>) -> Result<Ctx<'o>> {
        let (b, s, _) = x.dims3()?;
        let c = &self.config;
        let (past, positions) = decoder::positions(opts, cache, b, s, c.max_position_embeddings)?;
        // Positions → rope tables [b, s, head_dim/2].
        let angles = decoder::rope_angles(&positions, &self.inv_freq, b, s, &self.device)?;
        let cos = angles.cos()?.to_dtype(self.dtype)?;
        let sin = angles.sin()?.to_dtype(self.dtype)?;
        // Additive mask [b, 1, s, total]; skipped when causal-only and s == 1.
        let mask = super::causal_mask(opts.attention_mask.as_ref(), b, s, past, &self.device)?;
        Ok(Ctx { lin: opts.linear_ctx(), cos, sin, mask })
    }


    /// Final norm and head on the last layer's output `h` `[b, s, hidden]` (pooled rows for
    /// sequence classification).
    fn head_forward(&self, h: &Tensor, ctx: &Ctx, opts: &ForwardOptions) -> Result<Tensor> {
        let (b, s, _) = h.dims3()?;
        let c = &self.config;
        if self.info.task == Task::SeqCls {
            // LlamaForSequenceClassification: score every position, keep one per row; scoring
            // only the pooled rows gives the same numbers with less work.
            let idx = opts.pool_index.clone().unwrap_or_else(|| vec![s - 1; b]);
            let h = super::gather_rows(h, &idx)?;
            let h = rms_norm(&h, &self.norm, c.rms_norm_eps, opts.train)?;
            return Ok(self.lm_head.forward(&h, &ctx.lin)?.squeeze(1)?);
        }
        let h = if opts.last_only { h.narrow(1, s - 1, 1)? } else { h.clone() };
        let h = rms_norm(&h, &self.norm, c.rms_norm_eps, opts.train)?;
        self.lm_head.forward(&h, &ctx.lin)
    }

    /// One decoder layer; `use_rope` false for a NoPE layer (SmolLM3).
    fn layer_forward(&self, l: &DecoderLayer, x: &Tensor, ctx: &Ctx, kv: Option<&mut Option<(Tensor, Tensor)>>, use_rope: bool) -> Result<Tensor> {
        let c = &self.config;
        let train = ctx.lin.train;
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let n1 = rms_norm(x, &l.input_layernorm, c.rms_norm_eps, train)?;
        let q = l.self_attn.q_proj.forward(&n1, &ctx.lin)?.reshape((b, s, nh, hd))?;
        let k = l.self_attn.k_proj.forward(&n1, &ctx.lin)?.reshape((b, s, nkv, hd))?;
        let (q, k) = match (&l.self_attn.q_norm, &l.self_attn.k_norm) {
            (Some(qn), Some(kn)) => (rms_norm(&q, qn, c.rms_norm_eps, train)?, rms_norm(&k, kn, c.rms_norm_eps, train)?),
            _ => (q, k),
        };
        let q = q.transpose(1, 2)?;
        let k = k.transpose(1, 2)?;
        let v = l.self_attn.v_proj.forward(&n1, &ctx.lin)?.reshape((b, s, nkv, hd))?.transpose(1, 2)?;
        let (q, k) = if use_rope { (rope(&q, &ctx.cos, &ctx.sin, train)?, rope(&k, &ctx.cos, &ctx.sin, train)?) } else { (q, k) };
        let (k, v) = append_kv(kv, k, v)?;
        let (k, v) = repeat_kv(k, v, nh)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let q = q.contiguous()?;
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = scores.to_dtype(DType::F32)?;
        let scores = match &ctx.mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax_last(&scores, train)?.to_dtype(self.dtype)?;
        let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, nh * hd))?;
        let o = l.self_attn.o_proj.forward(&attn, &ctx.lin)?;
        // An adaption prompt adds its gated attention over the prompt (HF `AdaptedAttention`).
        let o = match l.self_attn.prompts.live() {
            Some(ap) => {
                let a = &l.self_attn;
                let p = AttentionProjections { k_proj: &a.k_proj, v_proj: &a.v_proj, o_proj: &a.o_proj, num_heads: nh, num_key_value_heads: nkv, head_dim: hd };
                (o + ap.output(&q, &p, &ctx.lin)?)?
            }
            None => o,
        };
        let h = (x + o)?;
        let n2 = rms_norm(&h, &l.post_attention_layernorm, c.rms_norm_eps, train)?;
        let g = l.mlp.gate_proj.forward(&n2, &ctx.lin)?;
        let u = l.mlp.up_proj.forward(&n2, &ctx.lin)?;
        let d = l.mlp.down_proj.forward(&(g.silu()? * u)?, &ctx.lin)?;
        Ok((h + d)?)
    }
}

impl BaseModel for LlamaForCausalLM {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn layer_stack<'a>(&'a self, x: &Tensor, opts: &'a ForwardOptions) -> Option<Result<Box<dyn super::checkpoint::LayerStack + 'a>>> {
        let layer = |m: &Self, i: usize, x: &Tensor, ctx: &Ctx| m.layer_forward(&m.layers[i], x, ctx, None, m.config.layer_uses_rope(i));
        Some(self.ctx(x, opts, None).map(|ctx| super::checkpoint::Layers::new(self, ctx, opts, self.layers.len(), layer, Self::head_forward).boxed()))
    }
    fn as_llama(&self) -> Option<&LlamaForCausalLM> {
        Some(self)
    }
    fn pools_last_token(&self) -> bool {
        true
    }
    fn embed_with(&self, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions) -> Result<Tensor> {
        self.embed_with_ctx(ids, b, s, &opts.linear_ctx())
    }
    fn config_json(&self) -> serde_json::Value {
        let c = &self.config;
        let mut v = serde_json::json!({
            "model_type": c.model_type, "architectures": [c.architecture], "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta, "rope_parameters": c.rope_parameters_json(),
            "max_position_embeddings": c.max_position_embeddings,
            "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id, "dtype": c.dtype,
            "_name_or_path": c.name_or_path,
        });
        if let Some(r) = &c.rope_layers {
            v["no_rope_layers"] = r.iter().map(|&x| u8::from(x)).collect::<Vec<_>>().into();
        }
        v
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    // Every linear layer with its transformers module path (`model.embed_tokens`,
    // `model.layers.0.self_attn.q_proj`, ..., `lm_head` / `score`), in module order.
    super::named_twins!(linears: |this| {
        let LlamaForCausalLM { embed_tokens, layers, lm_head, head_name, .. } = this;
        let layers = IntoIterator::into_iter(layers).map(|l| {
            let DecoderLayer { self_attn: Attention { q_proj, k_proj, v_proj, o_proj, .. }, mlp: Mlp { gate_proj, up_proj, down_proj }, .. } = l;
            decoder::llama_layer_linears([q_proj, k_proj, v_proj, o_proj], [gate_proj, up_proj, down_proj])
        });
        decoder::named_linears(embed_tokens, layers, (*head_name, lm_head))
    });
    fn named_norm_biases_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        vec![]
    }
    fn named_norm_biases(&self) -> Vec<(String, &Tensor)> {
        vec![]
    }
    fn named_attention_prompts(&self) -> Vec<(String, &AttentionPrompts)> {
        self.layers.iter().enumerate().map(|(i, l)| (format!("model.layers.{i}.self_attn"), &l.self_attn.prompts)).collect()
    }
    fn named_attention_prompts_mut(&mut self) -> Vec<(String, &mut AttentionPrompts)> {
        self.layers.iter_mut().enumerate().map(|(i, l)| (format!("model.layers.{i}.self_attn"), &mut l.self_attn.prompts)).collect()
    }
    fn module_names(&self) -> Vec<String> {
        LlamaForCausalLM::module_names(self)
    }
    fn base_param_count(&self) -> usize {
        LlamaForCausalLM::base_param_count(self)
    }
    fn word_embeddings(&self) -> &Tensor {
        &self.embed_tokens.weight
    }
    fn embed(&self, ids: &[u32], b: usize, s: usize) -> Result<Tensor> {
        LlamaForCausalLM::embed(self, ids, b, s)
    }
    fn forward_embeds(&self, x: &Tensor, opts: &ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        LlamaForCausalLM::forward_embeds(self, x, opts, cache)
    }
}
