//! GPT-2 causal LM (`GPT2LMHeadModel`) with transformers' module names.
//!
//! `h₀ = wte(ids) + wpe(positions)`; per block
//! `a = h + c_proj(attn(c_attn(ln_1(h))))`, `h' = a + mlp.c_proj(gelu_new(mlp.c_fc(ln_2(a))))`;
//! `logits = ln_f(h_L) · wteᵀ` (`lm_head` is tied to `wte`). LayerNorm with
//! `layer_norm_epsilon`, `gelu_new` (tanh approximation), scaled dot-product attention
//! (`1/√head_dim`) with an additive causal + padding mask, absolute positions `past .. past + s`
//! (or the given position ids). The `Conv1D` layers (`c_attn`, `c_proj`, `c_fc`) store their
//! weight `[in, out]`; they are [`PeftLinear`]s with `transposed = true`. Matches transformers'
//! `GPT2LMHeadModel` with eager attention (no `scale_attn_by_inverse_layer_idx`, no
//! `reorder_and_upcast_attn`, no cross-attention).

use super::config::{get_f64, get_usize, token_ids};
use super::forward::{ForwardOptions, KvCache};
use super::{causal_mask, BaseModel, ModelInfo, Task};
use crate::error::{PeftError, Result};
use crate::ops::{layer_norm, softmax_last};
use crate::tuners::linear::{LinearCtx, PeftLinear};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// GPT-2 hyper-parameters from a transformers `config.json` (`model_type: "gpt2"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    /// `n_embd`.
    pub n_embd: usize,
    /// `n_layer`.
    pub n_layer: usize,
    /// `n_head`.
    pub n_head: usize,
    /// `n_positions`: size of the position table `wpe`.
    pub n_positions: usize,
    /// `n_inner` (default `4 · n_embd`): the MLP width.
    pub n_inner: usize,
    pub layer_norm_epsilon: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype named in the config, informational.
    pub dtype: Option<String>,
    /// `_name_or_path`, used as `base_model_name_or_path` when saving adapters.
    pub name_or_path: Option<String>,
}

impl Gpt2Config {
    /// Parse a transformers GPT-2 `config.json` value. `path` is used in error messages only.
    ///
    /// Errors: `InvalidModelConfig` for a missing/mistyped field, an unsupported option
    /// (`activation_function` other than `gelu_new`, `scale_attn_by_inverse_layer_idx`,
    /// `reorder_and_upcast_attn`, `add_cross_attention`, `scale_attn_weights: false`), or
    /// `n_embd` not divisible by `n_head`.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |msg: String| PeftError::InvalidModelConfig { path: path.to_path_buf(), msg };
        if !v.is_object() {
            return Err(bad("the top level must be a JSON object".into()));
        }
        let req = |k: &str| -> Result<usize> { get_usize(v, k, path)?.ok_or_else(|| bad(format!("missing required field `{k}`"))) };
        let n_embd = req("n_embd")?;
        let n_head = req("n_head")?;
        if n_embd == 0 || n_head == 0 || n_embd % n_head != 0 {
            return Err(bad(format!("`n_embd` ({n_embd}) must be a positive multiple of `n_head` ({n_head})")));
        }
        let act = v.get("activation_function").and_then(|x| x.as_str()).unwrap_or("gelu_new");
        if act != "gelu_new" {
            return Err(bad(format!("activation_function `{act}` is not supported (only `gelu_new`)")));
        }
        for (k, unsupported) in [("scale_attn_by_inverse_layer_idx", true), ("reorder_and_upcast_attn", true), ("add_cross_attention", true), ("scale_attn_weights", false)] {
            if v.get(k).and_then(|x| x.as_bool()) == Some(unsupported) {
                return Err(bad(format!("`{k}: {unsupported}` is not supported")));
            }
        }
        Ok(Gpt2Config {
            vocab_size: req("vocab_size")?,
            n_layer: req("n_layer")?,
            n_positions: get_usize(v, "n_positions", path)?.unwrap_or(1024),
            n_inner: get_usize(v, "n_inner", path)?.unwrap_or(4 * n_embd),
            layer_norm_epsilon: get_f64(v, "layer_norm_epsilon", path)?.unwrap_or(1e-5),
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_id: token_ids(v.get("eos_token_id")),
            pad_token_id: token_ids(v.get("pad_token_id")).first().copied(),
            dtype: v.get("dtype").or(v.get("torch_dtype")).and_then(|x| x.as_str()).map(String::from),
            name_or_path: v.get("_name_or_path").and_then(|x| x.as_str()).map(String::from),
            n_embd,
            n_head,
        })
    }
}

/// A LayerNorm's parameters (`weight`, `bias`: `[hidden]`).
pub struct LayerNorm {
    pub weight: Tensor,
    /// May be a trainable variable (LoRA `bias: "all"`); it is detached outside training.
    pub bias: Tensor,
}

/// The module paths (below `transformer.h.N.`) of a block's Conv1D layers, in the order
/// `[c_attn, attn_c_proj, c_fc, mlp_c_proj]` of [`Gpt2Block`]'s fields: the one declaration that
/// loading and listing share.
const BLOCK_LINEARS: [&str; 4] = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];

/// One GPT-2 block (`transformer.h.{i}`).
pub struct Gpt2Block {
    pub ln_1: LayerNorm,
    /// `attn.c_attn`: Conv1D `n_embd → 3·n_embd` (q, k, v concatenated).
    pub c_attn: PeftLinear,
    /// `attn.c_proj`: Conv1D `n_embd → n_embd`.
    pub attn_c_proj: PeftLinear,
    pub ln_2: LayerNorm,
    /// `mlp.c_fc`: Conv1D `n_embd → n_inner`.
    pub c_fc: PeftLinear,
    /// `mlp.c_proj`: Conv1D `n_inner → n_embd`.
    pub mlp_c_proj: PeftLinear,
}

/// transformers' `GPT2LMHeadModel`. See the module docs.
pub struct Gpt2LMHeadModel {
    pub config: Gpt2Config,
    /// `transformer.wte.weight` `[vocab, n_embd]` (also the output head).
    pub wte: PeftLinear,
    /// `transformer.wpe.weight` `[n_positions, n_embd]`.
    pub wpe: Tensor,
    pub h: Vec<Gpt2Block>,
    pub ln_f: LayerNorm,
    /// `lm_head`: `[vocab, n_embd]` nn.Linear without bias, weight tied to `wte`; or, for
    /// `GPT2ForSequenceClassification`, `score` `[num_labels, n_embd]` (no bias).
    pub lm_head: PeftLinear,
    head_name: &'static str,
    pub device: Device,
    pub dtype: DType,
    info: ModelInfo,
}

impl Gpt2LMHeadModel {
    /// Build from HF-named tensors (`transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight`
    /// `[in, out]`, ...), converted to `dtype`. The `transformer.` prefix may be missing (a
    /// `GPT2Model` checkpoint); `lm_head.weight` is ignored when present (it is tied to `wte`).
    ///
    /// Errors: `InvalidModelConfig` naming a missing tensor, `ShapeMismatch` naming a misshapen one.
    pub fn from_tensors(config: Gpt2Config, t: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_tensors_for(config, t, dtype, device, Task::CausalLm, None)
    }

    /// Build with the head of `task`: `CausalLm` (`GPT2LMHeadModel`) or `SeqCls`
    /// (`GPT2ForSequenceClassification`: `score.weight` `[num_labels, n_embd]` must be in `t`;
    /// pooled on the last non-pad token).
    ///
    /// Errors: as [`Self::from_tensors`]; `InvalidModelConfig` for another task.
    pub fn from_tensors_for(config: Gpt2Config, mut t: HashMap<String, Tensor>, dtype: DType, device: &Device, task: Task, num_labels: Option<usize>) -> Result<Self> {
        let score = match task {
            Task::CausalLm => None,
            Task::SeqCls => {
                let p = std::path::PathBuf::from(config.name_or_path.clone().unwrap_or_else(|| "<model>".into()));
                let n = num_labels.ok_or_else(|| PeftError::InvalidModelConfig { path: p.clone(), msg: "sequence classification needs `num_labels`".into() })?;
                let w = t.remove("score.weight").ok_or_else(|| PeftError::InvalidModelConfig { path: p.clone(), msg: "the weights have no tensor `score.weight`".into() })?;
                if w.dims() != [n, config.n_embd] {
                    return Err(PeftError::ShapeMismatch { name: "score.weight".into(), expected: vec![n, config.n_embd], found: w.dims().to_vec() });
                }
                Some(w.to_dtype(dtype)?.to_device(device)?.contiguous()?)
            }
            other => {
                return Err(PeftError::InvalidModelConfig {
                    path: std::path::PathBuf::from(config.name_or_path.clone().unwrap_or_else(|| "<model>".into())),
                    msg: format!("gpt2 models have no {} head here (supported: CAUSAL_LM, SEQ_CLS)", other.task_type()),
                })
            }
        };
        let c = &config;
        let path = std::path::PathBuf::from(c.name_or_path.clone().unwrap_or_else(|| "<model>".into()));
        let mut take = |name: &str, shape: &[usize]| {
            let full = format!("transformer.{name}");
            super::take_weight(&mut t, &[&full, name], &full, shape, dtype, device, &path)
        };
        let (e, inner) = (c.n_embd, c.n_inner);
        let wte = PeftLinear::embedding(take("wte.weight", &[c.vocab_size, e])?);
        let wpe = take("wpe.weight", &[c.n_positions, e])?;
        let mut h = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = format!("h.{i}");
            let mut ln = |name: &str| -> Result<LayerNorm> {
                Ok(LayerNorm { weight: take(&format!("{p}.{name}.weight"), &[e])?, bias: take(&format!("{p}.{name}.bias"), &[e])? })
            };
            let (ln_1, ln_2) = (ln("ln_1")?, ln("ln_2")?);
            let mut conv = |name: &str, inp: usize, out: usize| -> Result<PeftLinear> {
                let w = take(&format!("{p}.{name}.weight"), &[inp, out])?;
                let b = take(&format!("{p}.{name}.bias"), &[out])?;
                Ok(PeftLinear::new(w, Some(b), true))
            };
            let [c_attn, attn_c_proj, c_fc, mlp_c_proj] = BLOCK_LINEARS;
            h.push(Gpt2Block {
                ln_1,
                c_attn: conv(c_attn, e, 3 * e)?,
                attn_c_proj: conv(attn_c_proj, e, e)?,
                ln_2,
                c_fc: conv(c_fc, e, inner)?,
                mlp_c_proj: conv(mlp_c_proj, inner, e)?,
            });
        }
        let ln_f = LayerNorm { weight: take("ln_f.weight", &[e])?, bias: take("ln_f.bias", &[e])? };
        let info = ModelInfo {
            architecture: if task == Task::SeqCls { "GPT2ForSequenceClassification".into() } else { "GPT2LMHeadModel".into() },
            model_type: "gpt2".into(),
            name_or_path: c.name_or_path.clone(),
            vocab_size: c.vocab_size,
            hidden_size: e,
            num_hidden_layers: c.n_layer,
            num_attention_heads: c.n_head,
            num_key_value_heads: None,
            head_dim: e / c.n_head,
            max_position_embeddings: c.n_positions,
            pad_token_id: c.pad_token_id,
            bos_token_id: c.bos_token_id,
            eos_token_id: c.eos_token_id.clone(),
            decoder_start_token_id: None,
            task,
            num_labels: if task == Task::SeqCls { num_labels } else { None },
        };
        Ok(Gpt2LMHeadModel {
            head_name: if score.is_some() { "score" } else { "lm_head" },
            lm_head: PeftLinear::new(score.unwrap_or_else(|| wte.weight.clone()), None, false),
            wte,
            wpe,
            h,
            ln_f,
            device: device.clone(),
            dtype,
            info,
            config,
        })
    }

    fn ln(&self, x: &Tensor, n: &LayerNorm, train: bool) -> Result<Tensor> {
        Ok(layer_norm(x, &n.weight, &n.bias, self.config.layer_norm_epsilon, train)?)
    }

    fn block_forward(&self, l: &Gpt2Block, x: &Tensor, lin: &LinearCtx, mask: Option<&Tensor>, kv: Option<&mut Option<(Tensor, Tensor)>>) -> Result<Tensor> {
        let (b, s, e) = x.dims3()?;
        let (nh, hd) = (self.config.n_head, e / self.config.n_head);
        let n1 = self.ln(x, &l.ln_1, lin.train)?;
        let qkv = l.c_attn.forward(&n1, lin)?;
        let heads = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(2, i * e, e)?.reshape((b, s, nh, hd))?.transpose(1, 2)?) };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let (k, v) = match kv {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k.contiguous()?], 2)?, Tensor::cat(&[&pv, &v.contiguous()?], 2)?),
                    None => (k.contiguous()?, v.contiguous()?),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k.contiguous()?, v.contiguous()?),
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.contiguous()?.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax_last(&scores, lin.train)?.to_dtype(self.dtype)?;
        let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, e))?;
        let a = (x + l.attn_c_proj.forward(&attn, lin)?)?;
        let n2 = self.ln(&a, &l.ln_2, lin.train)?;
        let m = l.mlp_c_proj.forward(&l.c_fc.forward(&n2, lin)?.gelu()?, lin)?;
        Ok((a + m)?)
    }
}

impl BaseModel for Gpt2LMHeadModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn pools_last_token(&self) -> bool {
        true
    }

    /// config.json's GPT-2 fields plus transformers' `attribute_map` aliases (`hidden_size`,
    /// `num_hidden_layers`, `num_attention_heads`, `max_position_embeddings`).
    fn config_json(&self) -> Value {
        let c = &self.config;
        serde_json::json!({
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
            "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_positions": c.n_positions,
            "n_inner": c.n_inner, "activation_function": "gelu_new", "layer_norm_epsilon": c.layer_norm_epsilon,
            "tie_word_embeddings": true, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
            "pad_token_id": c.pad_token_id, "dtype": c.dtype, "_name_or_path": c.name_or_path,
            // transformers' GPT2Config.attribute_map aliases
            "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "max_position_embeddings": c.n_positions,
        })
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    // Every linear layer with its transformers module path, in module order (the output head
    // last).
    super::named_twins!(linears: |this| {
        let Gpt2LMHeadModel { wte, h, lm_head, head_name, .. } = this;
        let mut out = vec![("transformer.wte".to_string(), wte)];
        for (i, l) in h.into_iter().enumerate() {
            let Gpt2Block { c_attn, attn_c_proj, c_fc, mlp_c_proj, .. } = l;
            let named = BLOCK_LINEARS.into_iter().zip([c_attn, attn_c_proj, c_fc, mlp_c_proj]);
            out.extend(named.map(|(n, lin)| (format!("transformer.h.{i}.{n}"), lin)));
        }
        out.push((head_name.to_string(), lm_head));
        out
    });

    // LayerNorm biases (LoRA's `bias: "all"`).
    super::named_twins!(norm_biases: |this| {
        let Gpt2LMHeadModel { h, ln_f: LayerNorm { bias: bias_f, .. }, .. } = this;
        let mut out = Vec::new();
        for (i, l) in h.into_iter().enumerate() {
            let Gpt2Block { ln_1: LayerNorm { bias: b1, .. }, ln_2: LayerNorm { bias: b2, .. }, .. } = l;
            out.push((format!("transformer.h.{i}.ln_1"), b1));
            out.push((format!("transformer.h.{i}.ln_2"), b2));
        }
        out.push(("transformer.ln_f".into(), bias_f));
        out
    });

    fn module_names(&self) -> Vec<String> {
        let mut out = vec!["transformer".to_string(), "transformer.wte".into(), "transformer.wpe".into(), "transformer.drop".into(), "transformer.h".into()];
        for i in 0..self.h.len() {
            let p = format!("transformer.h.{i}");
            out.push(p.clone());
            out.push(format!("{p}.ln_1"));
            out.push(format!("{p}.attn"));
            for n in ["c_attn", "c_proj", "attn_dropout", "resid_dropout"] {
                out.push(format!("{p}.attn.{n}"));
            }
            out.push(format!("{p}.ln_2"));
            out.push(format!("{p}.mlp"));
            for n in ["c_fc", "c_proj", "act", "dropout"] {
                out.push(format!("{p}.mlp.{n}"));
            }
        }
        out.push("transformer.ln_f".into());
        out.push(self.head_name.into());
        out
    }

    fn base_param_count(&self) -> usize {
        let ln = |n: &LayerNorm| n.weight.elem_count() + n.bias.elem_count();
        let mut n = self.wpe.elem_count() + ln(&self.ln_f);
        for l in &self.h {
            n += ln(&l.ln_1) + ln(&l.ln_2);
        }
        for (name, lin) in self.named_linears() {
            if name != "lm_head" {
                n += lin.base_param_count();
            }
        }
        n
    }

    fn word_embeddings(&self) -> &Tensor {
        &self.wte.weight
    }

    fn embed(&self, ids: &[u32], b: usize, s: usize) -> Result<Tensor> {
        self.embed_with(ids, b, s, &ForwardOptions::default())
    }

    fn embed_with(&self, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions) -> Result<Tensor> {
        let vocab = self.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(PeftError::invalid_arg("inputIds", format!("token id {bad} is outside the vocabulary (size {vocab})")));
        }
        let idx = Tensor::from_slice(ids, b * s, &self.device)?;
        let ctx = opts.linear_ctx();
        self.wte.forward_embedding(&idx, b, s, &ctx)
    }


    fn forward_embeds(&self, x: &Tensor, opts: &ForwardOptions, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let past = cache.as_ref().map(|c| c.seq_len()).unwrap_or(0);
        let (pe, mask) = self.forward_parts(b, s, past, opts)?;
        let lin = opts.linear_ctx();
        let mut h = (x.to_dtype(self.dtype)? + pe)?;
        for (i, l) in self.h.iter().enumerate() {
            let kv = cache.as_mut().map(|c| &mut c.layers[i]);
            h = self.block_forward(l, &h, &lin, mask.as_ref(), kv)?;
        }
        self.head_forward(&h, &lin, opts)
    }

    fn layer_stack<'a>(&'a self, x: &Tensor, opts: &'a ForwardOptions) -> Option<Result<Box<dyn super::checkpoint::LayerStack + 'a>>> {
        let stack = || -> Result<Box<dyn super::checkpoint::LayerStack + 'a>> {
            let (b, s, _) = x.dims3()?;
            // The same positions and mask as `forward_embeds` without a cache.
            let (pe, mask) = self.forward_parts(b, s, 0, opts)?;
            let ctx = StackCtx { pe, mask, lin: opts.linear_ctx() };
            let input = |m: &Self, x: &Tensor, c: &StackCtx| Ok((x.to_dtype(m.dtype)? + &c.pe)?);
            let layer = |m: &Self, i: usize, x: &Tensor, c: &StackCtx| m.block_forward(&m.h[i], x, &c.lin, c.mask.as_ref(), None);
            let head = |m: &Self, h: &Tensor, c: &StackCtx, opts: &ForwardOptions| m.head_forward(h, &c.lin, opts);
            Ok(super::checkpoint::Layers::new(self, ctx, opts, self.h.len(), layer, head).with_input(input).boxed())
        };
        Some(stack())
    }
}

/// What [`Gpt2LMHeadModel`]'s blocks share in one forward (see [`BaseModel::layer_stack`]):
/// position embeddings `[b, s, n_embd]`, the additive mask and the linears' context.
struct StackCtx<'a> {
    pe: Tensor,
    mask: Option<Tensor>,
    lin: LinearCtx<'a>,
}

impl Gpt2LMHeadModel {
    /// Position embeddings `[b, s, n_embd]` and the additive mask of a forward of `s` new
    /// positions after `past` cached ones.
    ///
    /// Errors: `InvalidArgument` naming `inputIds` when `past + s` exceeds `n_positions`, or
    /// `positionIds` of the wrong length or beyond `n_positions`.
    fn forward_parts(&self, b: usize, s: usize, past: usize, opts: &ForwardOptions) -> Result<(Tensor, Option<Tensor>)> {
        let c = &self.config;
        let total = past + s;
        if total > c.n_positions {
            return Err(PeftError::invalid_arg("inputIds", format!("sequence length {total} exceeds n_positions {}", c.n_positions)));
        }
        let positions: Vec<u32> = match &opts.position_ids {
            Some(p) => {
                if p.len() != b * s {
                    return Err(PeftError::invalid_arg("positionIds", format!("expected {} values", b * s)));
                }
                if let Some(bad) = p.iter().find(|&&q| q as usize >= c.n_positions) {
                    return Err(PeftError::invalid_arg("positionIds", format!("position {bad} exceeds n_positions {}", c.n_positions)));
                }
                p.clone()
            }
            None => (0..b).flat_map(|_| (past..total).map(|p| p as u32)).collect(),
        };
        let pos = Tensor::from_vec(positions, b * s, &self.device)?;
        let pe = self.wpe.index_select(&pos, 0)?.reshape((b, s, c.n_embd))?;
        Ok((pe, causal_mask(opts.attention_mask.as_ref(), b, s, past, &self.device)?))
    }

    /// Final layer norm and head on the last block's output `h` `[b, s, n_embd]` (pooled rows
    /// for sequence classification).
    fn head_forward(&self, h: &Tensor, lin: &LinearCtx, opts: &ForwardOptions) -> Result<Tensor> {
        let (b, s, _) = h.dims3()?;
        if self.info.task == Task::SeqCls {
            let idx = opts.pool_index.clone().unwrap_or_else(|| vec![s - 1; b]);
            let h = super::gather_rows(h, &idx)?;
            let h = self.ln(&h, &self.ln_f, opts.train)?;
            return Ok(self.lm_head.forward(&h, lin)?.squeeze(1)?);
        }
        let h = if opts.last_only { h.narrow(1, s - 1, 1)? } else { h.clone() };
        let h = self.ln(&h, &self.ln_f, opts.train)?;
        self.lm_head.forward(&h, lin)
    }
}
