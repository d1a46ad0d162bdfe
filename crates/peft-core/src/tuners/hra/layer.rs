//! HRA layers (HF `hra.HRALinear`). For a base layer `y = x Wᵀ + b` with `in` inputs, the
//! adapter holds `hra_u` `[in, r]`, whose columns `u_i` define Householder reflections
//! `R_i = I - 2 û_i û_iᵀ` (`û_i = u_i / ‖u_i‖`).
//!
//! - HF's `get_delta_weight` (the multiplier, not a delta): `H = R_0 R_1 ⋯ R_{r-1}` `[in, in]`;
//!   with `apply_GS`, `H = I - 2 Q Qᵀ` where `Q` `[in, r]` is the Gram-Schmidt basis of `u`'s
//!   columns (modified Gram-Schmidt, in column order).
//! - Forward (HF `HRALinear.forward`): `y = x (W H)ᵀ + b`. Several active HRA adapters multiply
//!   in activation order, `W H_1 H_2`. peft-node never forms `W H`: the base layer sees the input
//!   reflected, `x Hᵀ = x R_{r-1} ⋯ R_0` (each step `x - 2 (x û_i) û_iᵀ`, `O(in · r)` per row
//!   instead of HF's `O(in²)` matrix per call), the last active adapter's reflections first.
//!   The two orders of products give the same `y` up to f32 rounding.
//! - Merge: `W ← W H` (HF `torch.mm(W, H)`); unmerge: `W ← W H_rev` with the reflections in the
//!   reverse order, `H_rev = R_{r-1} ⋯ R_0 = H⁻¹` (each `R_i` is its own inverse; with
//!   `apply_GS`, `H` is its own inverse).
//!
//! HF 0.21's `HRALinear` has no per-row hook (no `adapter_names`): mixed batches are refused.

use crate::error::{PeftError, Result};
use crate::tuners::layer::{AdapterLayer, Slot};
use crate::tuners::linear::{LinearCtx, PeftLinear};
use candle_core::{DType, Tensor, Var};

/// `<module>.hra_u.<adapter>` in the model, `<module>.hra_u` on disk (an `nn.ParameterDict`
/// entry).
pub const HRA_U: Slot = Slot::param("hra_u");
/// Every HRA slot of a linear layer.
pub const SLOTS: [Slot; 1] = [HRA_U];

/// One HRA adapter of one linear layer.
#[derive(Debug, Clone)]
pub struct HraLayer {
    /// `hra_u` `[in, r]`, trainable.
    pub u: Var,
    /// Reflections (`hra_u`'s columns).
    pub r: usize,
    /// `apply_GS`: one reflection of the Gram-Schmidt basis instead of `r` reflections.
    pub apply_gs: bool,
}

impl HraLayer {
    /// The reflection vectors as the columns of `[in, r]` f32, tracked when `train`: each
    /// column of `hra_u` over its norm, or (`apply_GS`) the Gram-Schmidt basis.
    fn basis(&self, train: bool) -> Result<Tensor> {
        let u = if train { self.u.as_tensor().clone() } else { self.u.as_tensor().detach() };
        let u = u.to_dtype(DType::F32)?;
        if !self.apply_gs {
            return Ok(u.broadcast_div(&u.sqr()?.sum_keepdim(0)?.sqrt()?)?);
        }
        // HF: w_0 = u_0 / ‖u_0‖; u_i minus its projection on each earlier w_j in turn, normalised.
        let mut cols: Vec<Tensor> = Vec::with_capacity(self.r);
        for i in 0..self.r {
            let mut ui = u.narrow(1, i, 1)?;
            for wj in &cols {
                let dot = wj.t()?.matmul(&ui)?; // [1, 1]
                ui = (ui - wj.broadcast_mul(&dot)?)?;
            }
            let norm = ui.sqr()?.sum_all()?.sqrt()?;
            cols.push(ui.broadcast_div(&norm)?);
        }
        Ok(Tensor::cat(&cols, 1)?)
    }

    /// `x` `[m, in]` f32 times `Hᵀ` (see the module docs), tracked when `train`.
    fn reflect_rows(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let q = self.basis(train)?;
        if self.apply_gs {
            // H = I - 2 Q Qᵀ is symmetric.
            return Ok((x - (x.matmul(&q)?.matmul(&q.t()?)? * 2.0)?)?);
        }
        let mut y = x.clone();
        for i in (0..self.r).rev() {
            let qi = q.narrow(1, i, 1)?; // [in, 1]
            y = (&y - (y.matmul(&qi)?.matmul(&qi.t()?)? * 2.0)?)?;
        }
        Ok(y)
    }

    /// HF `get_delta_weight(reverse)`: `H` `[in, in]` f32 (or `H_rev` when `reverse`, ignored
    /// with `apply_GS` as in HF).
    pub fn householder(&self, reverse: bool) -> Result<Tensor> {
        let q = self.basis(false)?;
        let n = q.dim(0)?;
        let eye = Tensor::eye(n, DType::F32, q.device())?;
        if self.apply_gs {
            return Ok((eye - (q.matmul(&q.t()?)? * 2.0)?)?);
        }
        let mut h = eye;
        let order: Vec<usize> = if reverse { (0..self.r).rev().collect() } else { (0..self.r).collect() };
        for i in order {
            let qi = q.narrow(1, i, 1)?;
            h = (&h - (h.matmul(&qi)?.matmul(&qi.t()?)? * 2.0)?)?;
        }
        Ok(h)
    }

    /// The base weight `[out, in]` f32 times `mat` `[in, in]`, back in the base dtype and layout.
    fn weight_times(lin: &PeftLinear, mat: &Tensor) -> Result<Tensor> {
        let merged = lin.weight_out_in_f32()?.matmul(mat)?;
        let merged = if lin.transposed { merged.t()? } else { merged };
        Ok(merged.to_dtype(lin.weight.dtype())?.contiguous()?)
    }

    /// The input `x` `[..., in]` as the base layer of `lin` sees it under the active HRA layers
    /// `chain` (activation order): `x (H_1 ⋯ H_k)ᵀ`, in `x`'s dtype.
    fn reflect_input(lin: &PeftLinear, chain: &[&HraLayer], x: &Tensor, train: bool) -> Result<Tensor> {
        let inf = lin.in_features();
        let dims = x.dims().to_vec();
        if dims.last() != Some(&inf) {
            return Err(PeftError::ShapeMismatch { name: "HRA input".into(), expected: vec![inf], found: dims });
        }
        let m: usize = dims[..dims.len() - 1].iter().product();
        let mut y = x.to_dtype(DType::F32)?.reshape((m, inf))?;
        for l in chain.iter().rev() {
            y = l.reflect_rows(&y, train)?;
        }
        Ok(y.reshape(dims)?.to_dtype(x.dtype())?)
    }
}

impl AdapterLayer for HraLayer {
    crate::tuners::layer::declare_layer!(peft_type: "HRA", module_type: "hra.HRALinear", layer: "an HRA linear layer", slots: [HRA_U => u]);
    /// `W H - W` `[out, in]` f32: the change merging makes (merging itself uses
    /// [`AdapterLayer::merged_weight`]).
    fn delta_weight(&self, lin: &PeftLinear) -> Result<Tensor> {
        let w = lin.weight_out_in_f32()?;
        Ok((w.matmul(&self.householder(false)?)? - w)?)
    }
    /// `(x Hᵀ - x) Wᵀ` (no bias): what this adapter alone adds to the base output.
    fn forward_delta(&self, lin: &PeftLinear, x: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        let d = (Self::reflect_input(lin, &[self], x, ctx.train)? - x)?;
        Ok(lin.base(&d, None)?.to_dtype(DType::F32)?)
    }
    /// Every active HRA layer of `lin` together (HF multiplies their `H` in activation order
    /// before the one product): the base layer on the reflected input. Mixed batches go to the
    /// host's per-row path, which refuses HRA layers.
    fn forward_host(&self, lin: &PeftLinear, x: &Tensor, ctx: &LinearCtx) -> Option<Result<Tensor>> {
        if ctx.rows.is_some() {
            return None;
        }
        let chain: Vec<&HraLayer> = lin.active_layers().filter_map(|(_, l)| l.as_any().and_then(|a| a.downcast_ref::<HraLayer>())).collect();
        Some(Self::reflect_input(lin, &chain, x, ctx.train).and_then(|xr| lin.base(&xr, lin.bias_for(ctx.train).as_ref())))
    }
    fn merged_weight(&self, lin: &PeftLinear) -> Option<Result<Tensor>> {
        Some(self.householder(false).and_then(|h| Self::weight_times(lin, &h)))
    }
    fn unmerged_weight(&self, lin: &PeftLinear) -> Option<Result<Tensor>> {
        Some(self.householder(true).and_then(|h| Self::weight_times(lin, &h)))
    }
    /// HF 0.21's `HRALinear` has no per-row adapter hook.
    fn mixed_batch(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn layer(vals: Vec<f32>, n: usize, gs: bool) -> HraLayer {
        let r = vals.len() / n;
        HraLayer { u: Var::from_tensor(&Tensor::from_vec(vals, (n, r), &Device::Cpu).unwrap()).unwrap(), r, apply_gs: gs }
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn householder_is_orthogonal_and_reverse_is_its_inverse() {
        let vals = vec![0.3, -0.2, 0.5, 0.1, 0.4, -0.6, 0.7, 0.2, -0.3, 0.9, 0.05, -0.45];
        for gs in [false, true] {
            let l = layer(vals.clone(), 4, gs);
            let (h, hr) = (l.householder(false).unwrap(), l.householder(true).unwrap());
            let eye = Tensor::eye(4, DType::F32, &Device::Cpu).unwrap();
            assert!(max_abs(&(h.matmul(&h.t().unwrap()).unwrap() - &eye).unwrap()) < 1e-5, "gs={gs}: H Hᵀ = I");
            assert!(max_abs(&(h.matmul(&hr).unwrap() - &eye).unwrap()) < 1e-5, "gs={gs}: H H_rev = I");
        }
        // Equal column pairs (HF's symmetric init) cancel: H = I.
        let l = layer(vec![0.3, 0.3, -0.2, -0.2, 0.5, 0.5], 3, false);
        let eye = Tensor::eye(3, DType::F32, &Device::Cpu).unwrap();
        assert!(max_abs(&(l.householder(false).unwrap() - eye).unwrap()) < 1e-6);
    }

    #[test]
    fn reflecting_rows_equals_multiplying_by_h_transposed() {
        let vals = vec![0.3, -0.2, 0.5, 0.1, 0.4, -0.6, 0.7, 0.2, -0.3, 0.9, 0.05, -0.45];
        let x = Tensor::from_vec((0..8).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<f32>>(), (2, 4), &Device::Cpu).unwrap();
        for gs in [false, true] {
            let l = layer(vals.clone(), 4, gs);
            let want = x.matmul(&l.householder(false).unwrap().t().unwrap()).unwrap();
            let got = l.reflect_rows(&x, false).unwrap();
            assert!(max_abs(&(got - want).unwrap()) < 1e-6, "gs={gs}");
        }
    }
}
