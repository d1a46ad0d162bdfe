//! AdaLoRA's SVD-form layer (HF `adalora.SVDLinear`; Zhang et al. 2023). With `P = lora_A`
//! `[r, in]` (right singular vectors), `Λ = lora_E` `[r, 1]` (singular values) and
//! `Q = lora_B` `[out, r]` (left singular vectors), `s = scaling` (HF: `lora_alpha`, or `r` when
//! `lora_alpha` ≤ 0) and `ranknum` (the layer's rank when created, a float that is neither trained
//! nor saved):
//!
//! - forward adds `(dropout(x) (P ⊙ Λ)ᵀ Qᵀ) · s / (ranknum + 1e-5)` for `x` `[..., in]` (dropout only
//!   while training);
//! - `ΔW = Q (P ⊙ Λ) · s / (ranknum + 1e-5)` `[out, in]` (HF `get_delta_weight`), added to the base
//!   weight on merge (transposed for a `Conv1D` base);
//! - the allocator ([`super::allocator`]) masks triplets by zeroing rows of `Λ`; a layer loaded
//!   with a `rank_pattern` holds only the kept triplets (`r` = their count) but keeps
//!   `ranknum = init_r` (HF `resize_modules_by_rank_pattern` copies it), so its output equals the
//!   masked full-rank layer's. A layer of rank 0 adds nothing.
//!
//! Parameters are HF `nn.ParameterDict` entries: saved as `<module>.lora_A` / `.lora_B` /
//! `.lora_E` (no `.weight`).

use crate::error::Result;
use crate::tuners::layer::{AdapterLayer, Slot};
use crate::tuners::linear::{dropout, LinearCtx, PeftLinear};
use crate::tuners::lycoris::rows_and_out_dims;
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The slot names of a layer's parameters, in HF's order.
pub(crate) const NAMES: [&str; 3] = ["lora_A", "lora_B", "lora_E"];

pub const LORA_A: Slot = Slot::param("lora_A");
pub const LORA_B: Slot = Slot::param("lora_B");
pub const LORA_E: Slot = Slot::param("lora_E");
/// Every AdaLoRA slot, in HF's state-dict order.
pub const SLOTS: [Slot; 3] = [LORA_A, LORA_B, LORA_E];

/// The allocator's state of one layer: per slot name, the moving averages (HF `exp_avg_ipt[n]`,
/// `exp_avg_unc[n]`) and the gradient of the last optimizer step the trainer recorded (torch's
/// `p.grad` until `zero_grad`, for [`crate::PeftModel::update_and_allocate_recorded`]).
#[derive(Debug, Default)]
pub(crate) struct Importance {
    pub ema: HashMap<&'static str, (Tensor, Tensor)>,
    pub grads: HashMap<&'static str, Tensor>,
}

/// One AdaLoRA adapter of one linear layer.
#[derive(Debug, Clone)]
pub struct AdaLoraLayer {
    /// `lora_A` `[r, in]`, trainable.
    pub a: Var,
    /// `lora_E` `[r, 1]`, trainable.
    pub e: Var,
    /// `lora_B` `[out, r]`, trainable.
    pub b: Var,
    /// HF `ranknum`: the rank the layer was created with (`init_r`; 0 for a layer resized to 0).
    pub ranknum: f64,
    /// HF `scaling`: `lora_alpha` (or `r` when `lora_alpha` ≤ 0).
    pub scaling: f64,
    pub dropout: f64,
    /// The allocator's state for this layer (shared by clones made while training).
    pub(crate) importance: Arc<Mutex<Importance>>,
}

impl AdaLoraLayer {
    /// The variable of slot `name` (`lora_A`, `lora_B`, `lora_E`).
    pub(crate) fn var(&self, name: &str) -> &Var {
        match name {
            "lora_A" => &self.a,
            "lora_B" => &self.b,
            _ => &self.e,
        }
    }

    /// The current rank (rows of `lora_A`).
    pub fn rank(&self) -> usize {
        self.a.as_tensor().dims().first().copied().unwrap_or(0)
    }

    fn t(v: &Var, train: bool) -> Result<Tensor> {
        let t = if train { v.as_tensor().clone() } else { v.as_tensor().detach() };
        Ok(t.to_dtype(DType::F32)?)
    }

    /// `s / (ranknum + 1e-5)`, with `ranknum + 1e-5` rounded to f32 as HF's float32 buffer is.
    fn factor(&self) -> f64 {
        self.scaling / ((self.ranknum as f32) + 1e-5f32) as f64
    }

    /// `(P ⊙ Λ)` `[r, in]` f32.
    fn scaled_a(&self, train: bool) -> Result<Tensor> {
        Ok(Self::t(&self.a, train)?.broadcast_mul(&Self::t(&self.e, train)?)?)
    }
}

impl AdapterLayer for AdaLoraLayer {
    crate::tuners::layer::declare_layer!(peft_type: "ADALORA", module_type: "adalora.SVDLinear", layer: "an AdaLoRA layer", slots: [LORA_A => a, LORA_B => b, LORA_E => e]);
    fn delta_weight(&self, lin: &PeftLinear) -> Result<Tensor> {
        if self.rank() == 0 {
            return Ok(Tensor::zeros((lin.out_features(), lin.in_features()), DType::F32, lin.weight.device())?);
        }
        let b = Self::t(&self.b, false)?;
        Ok((b.matmul(&self.scaled_a(false)?)? * self.factor())?)
    }
    fn forward_delta(&self, lin: &PeftLinear, x: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        let (m, out_dims) = rows_and_out_dims(x, lin.out_features());
        if self.rank() == 0 {
            return Ok(Tensor::zeros(out_dims, DType::F32, x.device())?);
        }
        let mut xf = x.to_dtype(DType::F32)?.reshape((m, lin.in_features()))?;
        if ctx.train && self.dropout > 0.0 {
            xf = dropout(&xf, self.dropout, ctx.rng)?;
        }
        let h = xf.matmul(&self.scaled_a(ctx.train)?.t()?)?;
        let y = h.matmul(&Self::t(&self.b, ctx.train)?.t()?)?;
        Ok((y * self.factor())?.reshape(out_dims)?)
    }
    /// HF's `ranknum` (a one-element parameter, frozen and not saved).
    fn frozen_param_count(&self) -> usize {
        1
    }
    /// HF's `SVDLinear.forward` ignores `adapter_names`; mixed batches are refused here.
    fn mixed_batch(&self) -> bool {
        false
    }
}
