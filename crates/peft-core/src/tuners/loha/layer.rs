//! LoHa layers (HF `loha.Linear`): `ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · scaling` with `w1_a`, `w2_a`
//! `[out, r]`, `w1_b`, `w2_b` `[r, in]` and `scaling = alpha / r`; forward adds `x ΔWᵀ` (HF builds
//! `ΔW` and calls `F.linear(x, ΔW)`, so does this). While training, HF's `module_dropout` skips the
//! adapter for a whole forward with that probability and `rank_dropout` keeps each output row of
//! `ΔW` with probability `1 - p`, dividing the 0/1 mask by its mean.

use crate::error::Result;
use crate::tuners::layer::{AdapterLayer, Slot};
use crate::tuners::linear::{LinearCtx, PeftLinear};
use crate::tuners::lycoris::{draw_dropout, rows_and_out_dims, Dropout};
use candle_core::{DType, Tensor, Var};

pub const HADA_W1_A: Slot = Slot::param("hada_w1_a");
pub const HADA_W1_B: Slot = Slot::param("hada_w1_b");
pub const HADA_W2_A: Slot = Slot::param("hada_w2_a");
pub const HADA_W2_B: Slot = Slot::param("hada_w2_b");
/// Every LoHa slot of a linear layer, in HF's state-dict order.
pub const SLOTS: [Slot; 4] = [HADA_W1_A, HADA_W1_B, HADA_W2_A, HADA_W2_B];

/// One LoHa adapter of one linear layer (f32 parameters).
#[derive(Debug, Clone)]
pub struct LohaLayer {
    pub w1_a: Var,
    pub w1_b: Var,
    pub w2_a: Var,
    pub w2_b: Var,
    pub r: usize,
    pub alpha: f64,
    /// `alpha / r`.
    pub scaling: f64,
    pub rank_dropout: f64,
    pub module_dropout: f64,
}

impl LohaLayer {
    fn t(v: &Var, train: bool) -> Tensor {
        if train { v.as_tensor().clone() } else { v.as_tensor().detach() }
    }

    /// `ΔW` `[out, in]` f32 (HF `get_delta_weight`, `make_weight`), tracked when `train`.
    fn delta(&self, train: bool) -> Result<Tensor> {
        let f = |v: &Var| Self::t(v, train).to_dtype(DType::F32);
        let p1 = f(&self.w1_a)?.matmul(&f(&self.w1_b)?)?;
        let p2 = f(&self.w2_a)?.matmul(&f(&self.w2_b)?)?;
        Ok(((p1 * p2)? * self.scaling)?)
    }
}

impl AdapterLayer for LohaLayer {
    crate::tuners::layer::declare_layer!(peft_type: "LOHA", module_type: "loha.Linear", layer: "a LoHa linear layer", slots: [HADA_W1_A => w1_a, HADA_W1_B => w1_b, HADA_W2_A => w2_a, HADA_W2_B => w2_b]);
    fn delta_weight(&self, _lin: &PeftLinear) -> Result<Tensor> {
        self.delta(false)
    }
    fn forward_delta(&self, lin: &PeftLinear, x: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        let (inf, out) = (lin.in_features(), lin.out_features());
        let (m, out_dims) = rows_and_out_dims(x, out);
        let mut dw = self.delta(ctx.train)?;
        match draw_dropout(ctx, self.module_dropout, self.rank_dropout, out) {
            Dropout::Off => {}
            Dropout::SkipModule => return Ok(Tensor::zeros(out_dims, DType::F32, x.device())?),
            Dropout::Rows { keep, mean } => {
                // HF: `drop /= drop.mean()` always (an all-zero mask gives NaN, as in HF), rows
                // of ΔW scaled.
                let drop: Vec<f32> = keep.into_iter().map(|k| k / mean).collect();
                dw = dw.broadcast_mul(&Tensor::from_vec(drop, (out, 1), x.device())?)?;
            }
        }
        let y = x.to_dtype(DType::F32)?.reshape((m, inf))?.matmul(&dw.t()?)?;
        Ok(y.reshape(out_dims)?)
    }
}
