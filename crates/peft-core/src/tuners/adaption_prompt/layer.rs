//! The adapted attention of one decoder layer (HF `AdaptedAttention`, which wraps `self_attn`):
//! a learned prompt `P` `[1, L, hidden]` (`adaption_prompt`) and a scalar gate `g` `[1]`
//! (`adaption_gate`, zero at init, so a new adapter leaves the model unchanged).
//!
//! With the wrapped attention's own projections (no RoPE on the prompt's keys, no mask: every
//! query position sees every prompt token), for queries `q` `[b, heads, s, head_dim]` after RoPE:
//!
//! ```text
//! K = repeat_interleave(k_proj(P) as [1, kv_heads, L, head_dim], heads / kv_heads)   (GQA as HF)
//! V = repeat_interleave(v_proj(P) as [1, kv_heads, L, head_dim], heads / kv_heads)
//! A = g · softmax_f32(q Kᵀ / √head_dim)                   [b, heads, s, L]
//! out = attention(x) + o_proj(A V as [b, s, heads · head_dim])
//! ```
//!
//! `o_proj` is applied with its bias, so a model with `attention_bias` adds the bias twice, as HF
//! does. The host [`AttentionPrompts`] keeps every adapter's pair per layer and which one is
//! active; like HF's `AdaptionPromptModel`, one adapter at a time takes part.

use crate::error::Result;
use crate::ops::softmax_last;
use crate::tuners::linear::{LinearCtx, PeftLinear};
use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;

/// HF's parameter name of the prompt (`<layer>.self_attn.adaption_prompt`).
pub const ADAPTION_PROMPT: &str = "adaption_prompt";
/// HF's parameter name of the gate (`<layer>.self_attn.adaption_gate`).
pub const ADAPTION_GATE: &str = "adaption_gate";

/// One adapter's parameters in one attention module.
#[derive(Debug, Clone)]
pub struct AdaptedAttention {
    /// `[1, adapter_len, hidden_size]`, f32 (HF: N(0, 1) at init).
    pub prompt: Var,
    /// `[1]`, f32 (HF: 0 at init).
    pub gate: Var,
}

/// The projections and head layout of the wrapped attention module.
pub struct AttentionProjections<'a> {
    pub k_proj: &'a PeftLinear,
    pub v_proj: &'a PeftLinear,
    pub o_proj: &'a PeftLinear,
    pub num_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
}

impl AdaptedAttention {
    /// The parameters under HF's names, in HF's state-dict order.
    pub fn params(&self) -> [(&'static str, &Var); 2] {
        [(ADAPTION_PROMPT, &self.prompt), (ADAPTION_GATE, &self.gate)]
    }

    /// What the adapter adds to the attention output (see the module docs), `[b, s, hidden]`
    /// in `q`'s dtype, for queries `q` `[b, heads, s, head_dim]` after RoPE. Differentiable
    /// with respect to the prompt and the gate (scores and softmax in f32, as HF upcasts them).
    ///
    /// Errors: shape errors when `q` or the projections do not fit the prompt.
    pub fn output(&self, q: &Tensor, p: &AttentionProjections, ctx: &LinearCtx) -> Result<Tensor> {
        let dtype = q.dtype();
        let (b, nh, s, hd) = q.dims4()?;
        let prompt = self.prompt.as_tensor().to_dtype(dtype)?;
        let len = prompt.dim(1)?;
        // The prompt's own keys/values: one set for the whole batch (no per-row adapters).
        let lctx = LinearCtx { train: ctx.train, rows: None, row_scales: None, rng: ctx.rng };
        let heads = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((1, len, p.num_key_value_heads, hd))?.transpose(1, 2)?.contiguous()?) };
        let k = heads(p.k_proj.forward(&prompt, &lctx)?)?;
        let v = heads(p.v_proj.forward(&prompt, &lctx)?)?;
        let (k, v) = crate::model::decoder::repeat_kv(k, v, nh)?;
        let k = k.broadcast_as((b, nh, len, hd))?.contiguous()?;
        let v = v.broadcast_as((b, nh, len, hd))?.contiguous()?;
        let scores = (q.contiguous()?.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let probs = softmax_last(&scores.to_dtype(DType::F32)?, ctx.train)?.to_dtype(dtype)?;
        let probs = probs.broadcast_mul(&self.gate.as_tensor().to_dtype(dtype)?)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, nh * hd))?;
        p.o_proj.forward(&out, &lctx)
    }
}

/// The adaption prompts an attention module hosts (HF keeps the active adapter's
/// `AdaptedAttention` in the model and the others in `_cached_adapters`): every adapter's
/// parameters by name, the active one, and whether adapters are disabled.
#[derive(Debug, Clone, Default)]
pub struct AttentionPrompts {
    pub adapters: BTreeMap<String, AdaptedAttention>,
    /// The adapter that takes part in forward passes (`None`: none of this module's).
    pub active: Option<String>,
    /// Adapters bypassed (HF `disable_adapter_layers` swaps the wrapped attention back in).
    pub disabled: bool,
}

impl AttentionPrompts {
    /// The adapter that changes this module's output now, if any.
    pub fn live(&self) -> Option<&AdaptedAttention> {
        if self.disabled {
            return None;
        }
        self.active.as_ref().and_then(|n| self.adapters.get(n))
    }

    /// Every parameter of every adapter.
    pub fn all_vars(&self) -> Vec<&Var> {
        self.adapters.values().flat_map(|a| [&a.prompt, &a.gate]).collect()
    }
}
