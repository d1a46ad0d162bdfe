//! VeRA layers (HF `vera.Linear`; Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix
//! Adaptation"). With the model's shared frozen projections `A` `[r, max_in]` and `B`
//! `[max_out, r]`, sliced to the layer (`A_l = A[:, :in]`, `B_l = B[:out, :]`), and the layer's
//! trainable vectors `λ_d` `[r]` and `λ_b` `[out]`:
//!
//! - forward adds `λ_b ⊙ ((λ_d ⊙ (dropout(x) A_lᵀ)) B_lᵀ)` for `x` `[..., in]` (HF
//!   `lambda_b * F.linear(lambda_d * F.linear(dropout(x), sliced_A), sliced_B)`; dropout only
//!   while training);
//! - `ΔW = (λ_b[:, None] ⊙ B_l) (λ_d[:, None] ⊙ A_l)` `[out, in]` (HF `get_delta_weight`),
//!   added to the base weight on merge (transposed for a `Conv1D` / `fan_in_fan_out` base).
//!
//! Only `vera_lambda_b` and `vera_lambda_d` are parameters (saved as `<module>.vera_lambda_b` /
//! `.vera_lambda_d`, no `.weight`); the projections are buffers shared by every VeRA layer and
//! adapter of the model (HF's `BufferDict`), saved once as `base_model.vera_A` / `vera_B`.

use crate::error::Result;
use crate::tuners::layer::{AdapterLayer, Slot};
use crate::tuners::linear::{dropout, LinearCtx, PeftLinear};
use crate::tuners::lycoris::rows_and_out_dims;
use candle_core::{DType, Tensor, Var};

pub const VERA_LAMBDA_B: Slot = Slot::param("vera_lambda_b");
pub const VERA_LAMBDA_D: Slot = Slot::param("vera_lambda_d");
/// Every VeRA slot of a linear layer, in HF's state-dict order.
pub const SLOTS: [Slot; 2] = [VERA_LAMBDA_B, VERA_LAMBDA_D];

/// The model's shared frozen projections (f32): `a` `[r, max_in]` (HF `vera_A`), `b`
/// `[max_out, r]` (HF `vera_B`). Cloning shares the storage.
#[derive(Debug, Clone)]
pub struct Projections {
    pub a: Tensor,
    pub b: Tensor,
}

/// One VeRA adapter of one linear layer.
#[derive(Debug, Clone)]
pub struct VeraLayer {
    /// `[out]`, trainable.
    pub lambda_b: Var,
    /// `[r]`, trainable.
    pub lambda_d: Var,
    /// The shared projections (full size; sliced to this layer on use).
    pub proj: Projections,
    pub r: usize,
    pub dropout: f64,
}

impl VeraLayer {
    fn t(v: &Var, train: bool) -> Result<Tensor> {
        let t = if train { v.as_tensor().clone() } else { v.as_tensor().detach() };
        Ok(t.to_dtype(DType::F32)?)
    }

    /// `(A_l [r, in], B_l [out, r])`: the projections sliced to `lin` (HF `sliced_A`, `sliced_B`).
    fn sliced(&self, lin: &PeftLinear) -> Result<(Tensor, Tensor)> {
        let a = self.proj.a.narrow(1, 0, lin.in_features())?.to_dtype(DType::F32)?;
        let b = self.proj.b.narrow(0, 0, lin.out_features())?.to_dtype(DType::F32)?;
        Ok((a, b))
    }
}

impl AdapterLayer for VeraLayer {
    crate::tuners::layer::declare_layer!(peft_type: "VERA", module_type: "vera.Linear", layer: "a VeRA linear layer", slots: [VERA_LAMBDA_B => lambda_b, VERA_LAMBDA_D => lambda_d]);
    fn delta_weight(&self, lin: &PeftLinear) -> Result<Tensor> {
        let (a, b) = self.sliced(lin)?;
        let lb = Self::t(&self.lambda_b, false)?.unsqueeze(1)?;
        let ld = Self::t(&self.lambda_d, false)?.unsqueeze(1)?;
        Ok(b.broadcast_mul(&lb)?.matmul(&a.broadcast_mul(&ld)?)?)
    }
    fn forward_delta(&self, lin: &PeftLinear, x: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        let (m, out_dims) = rows_and_out_dims(x, lin.out_features());
        let (a, b) = self.sliced(lin)?;
        let mut xf = x.to_dtype(DType::F32)?.reshape((m, lin.in_features()))?;
        if ctx.train && self.dropout > 0.0 {
            xf = dropout(&xf, self.dropout, ctx.rng)?;
        }
        let h = xf.matmul(&a.t()?)?.broadcast_mul(&Self::t(&self.lambda_d, ctx.train)?)?;
        let y = h.matmul(&b.t()?)?.broadcast_mul(&Self::t(&self.lambda_b, ctx.train)?)?;
        Ok(y.reshape(out_dims)?)
    }
    fn shared_tensors(&self) -> Vec<(&'static str, Tensor)> {
        vec![("vera_A", self.proj.a.clone()), ("vera_B", self.proj.b.clone())]
    }
}
