//! LoKr layers (HF `lokr.Linear`; LyCORIS's LoKr, Yeh et al. 2023, "Navigating Text-To-Image
//! Customization: From LyCORIS Fine-Tuning to Model Evaluation"):
//! `ΔW = (w1 ⊗ w2) · scaling`, `scaling = alpha / r`, for a base weight `[out, in]`.
//!
//! Shapes (HF `update_layer`): `factorization(out) = (a, b)`, `factorization(in) = (c, d)`, so
//! `out = a·b`, `in = c·d`; `w1` is `[a, c]` and `w2` `[b, d]`, and `w1 ⊗ w2` is `[a·b, c·d]`
//! with `(w1 ⊗ w2)[i·b + k, j·d + l] = w1[i, j] · w2[k, l]`. Each factor is either a full
//! matrix (`lokr_w1`, `lokr_w2`) or a rank-r product (`lokr_w1_a [a, r] @ lokr_w1_b [r, c]`,
//! `lokr_w2_a [b, r] @ lokr_w2_b [r, d]`):
//! - `w2` is decomposed when `r < max(b, d) / 2`;
//! - `w1` is decomposed when `decompose_both` and `r < max(a, c) / 2`.
//!
//! The scaling stays `alpha / r` when both factors are full (r then only scales). Parameters are
//! f32. The forward computes `x ΔWᵀ` without building `ΔW`: with `x` viewed as `[m, c, d]`,
//! `y[m] = w1 · (x[m] · w2ᵀ)` (`[a, b]`, flattened to `out`), equal to HF's
//! `F.linear(x, ΔW)` up to f32 rounding. While training, `module_dropout` skips the adapter for
//! a whole forward with that probability, and `rank_dropout` keeps each output row of `ΔW` with
//! probability `1 - p` (HF `get_delta_weight(apply_rank_dropout=True)`), the 0/1 mask divided by
//! its mean when `rank_dropout_scale` (an all-zero mask stays zero here, where HF divides by 0).
//!
//! ```
//! use peft_core::tuners::lokr::layer::{factorization, LokrShape};
//! assert_eq!(factorization(256, -1), (16, 16));
//! assert_eq!(factorization(128, -1), (8, 16));
//! assert_eq!(factorization(127, -1), (1, 127));
//! assert_eq!(factorization(128, 4), (4, 32));
//! // A 64 -> 128 linear with r = 2: w1 [8, 8] full, w2 [16, 8] as [16, 2] @ [2, 8].
//! let s = LokrShape::new(128, 64, 2, false, -1);
//! assert_eq!((s.w1, s.w2, s.w1_full, s.w2_full), ((8, 8), (16, 8), true, false));
//! ```

use crate::error::{PeftError, Result};
use crate::tuners::layer::{AdapterLayer, Param, Slot};
use crate::tuners::linear::{LinearCtx, PeftLinear};
use crate::tuners::lycoris::{draw_dropout, rows_and_out_dims, Dropout};
use candle_core::{DType, Tensor, Var};

pub const LOKR_W1: Slot = Slot::param("lokr_w1");
pub const LOKR_W1_A: Slot = Slot::param("lokr_w1_a");
pub const LOKR_W1_B: Slot = Slot::param("lokr_w1_b");
pub const LOKR_W2: Slot = Slot::param("lokr_w2");
pub const LOKR_W2_A: Slot = Slot::param("lokr_w2_a");
pub const LOKR_W2_B: Slot = Slot::param("lokr_w2_b");
/// Every LoKr slot of a linear layer, in HF's state-dict order (`lokr_t2` is conv-only).
pub const SLOTS: [Slot; 6] = [LOKR_W1, LOKR_W1_A, LOKR_W1_B, LOKR_W2, LOKR_W2_A, LOKR_W2_B];

/// HF's (LyCORIS's) `factorization(dimension, factor)`: `(m, n)` with `m · n = dimension` and
/// `m <= n`. A positive `factor` dividing `dimension` gives `(factor, dimension / factor)`;
/// otherwise `m` grows through the divisors of `dimension` while `m + n` does not grow and `m`
/// stays at most `factor` (`-1`: no bound, so the pair nearest the square root).
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        let m = factor as usize;
        return (m, dimension / m);
    }
    let factor = if factor == -1 { dimension as i64 } else { factor };
    let (mut m, mut n) = (1usize, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m as i64 > factor {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n {
        (m, n) = (n, m);
    }
    (m, n)
}

/// The factor shapes of a LoKr linear layer (HF `update_layer`): `w1` `[a, c]`, `w2` `[b, d]`,
/// and whether each is a full matrix. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LokrShape {
    pub w1: (usize, usize),
    pub w2: (usize, usize),
    pub r: usize,
    pub w1_full: bool,
    pub w2_full: bool,
}

impl LokrShape {
    /// For a base weight `[out, in]` with rank `r`.
    pub fn new(out: usize, inf: usize, r: usize, decompose_both: bool, decompose_factor: i64) -> Self {
        let (in_m, in_n) = factorization(inf, decompose_factor);
        let (out_l, out_k) = factorization(out, decompose_factor);
        // HF: `r < max(...) / 2` (true division), i.e. `2r < max(...)`.
        LokrShape {
            w1: (out_l, in_m),
            w2: (out_k, in_n),
            r,
            w1_full: !(decompose_both && 2 * r < out_l.max(in_m)),
            w2_full: 2 * r >= out_k.max(in_n),
        }
    }

    /// The parameters as `(slot, shape)`, in HF's state-dict order.
    pub fn params(&self) -> Vec<(Slot, Vec<usize>)> {
        let (r, (a, c), (b, d)) = (self.r, self.w1, self.w2);
        let mut v = if self.w1_full { vec![(LOKR_W1, vec![a, c])] } else { vec![(LOKR_W1_A, vec![a, r]), (LOKR_W1_B, vec![r, c])] };
        if self.w2_full {
            v.push((LOKR_W2, vec![b, d]));
        } else {
            v.extend([(LOKR_W2_A, vec![b, r]), (LOKR_W2_B, vec![r, d])]);
        }
        v
    }
}

/// One Kronecker factor: a full matrix or a rank-r product `a @ b`.
#[derive(Debug, Clone)]
pub enum Factor {
    Full(Var),
    Product(Var, Var),
}

impl Factor {
    fn matrix(&self, train: bool) -> Result<Tensor> {
        let t = |v: &Var| -> Result<Tensor> { Ok(if train { v.as_tensor().clone() } else { v.as_tensor().detach() }.to_dtype(DType::F32)?) };
        Ok(match self {
            Factor::Full(w) => t(w)?,
            Factor::Product(a, b) => t(a)?.matmul(&t(b)?)?,
        })
    }
}

/// One LoKr adapter of one linear layer (f32 parameters).
#[derive(Debug, Clone)]
pub struct LokrLayer {
    pub w1: Factor,
    pub w2: Factor,
    pub r: usize,
    pub alpha: f64,
    /// `alpha / r`.
    pub scaling: f64,
    pub rank_dropout: f64,
    pub module_dropout: f64,
    pub rank_dropout_scale: bool,
}

/// `w1 ⊗ w2` for 2-D `w1` `[a, c]`, `w2` `[b, d]`: `[a·b, c·d]` (torch `kron`), differentiable.
pub fn kron(w1: &Tensor, w2: &Tensor) -> Result<Tensor> {
    let (a, c) = w1.dims2()?;
    let (b, d) = w2.dims2()?;
    let k = w1.reshape((a, 1, c, 1))?.broadcast_mul(&w2.reshape((1, b, 1, d))?)?;
    Ok(k.reshape((a * b, c * d))?)
}

impl LokrLayer {
    /// `ΔW` `[out, in]` f32 (HF `get_delta_weight`, `make_kron`), tracked when `train`.
    fn delta(&self, train: bool) -> Result<Tensor> {
        Ok((kron(&self.w1.matrix(train)?, &self.w2.matrix(train)?)? * self.scaling)?)
    }
}

impl AdapterLayer for LokrLayer {
    fn peft_type(&self) -> &'static str {
        "LOKR"
    }
    fn module_type(&self) -> &'static str {
        "lokr.Linear"
    }
    fn params(&self) -> Vec<Param<'_>> {
        let mut v = match &self.w1 {
            Factor::Full(w) => vec![(LOKR_W1, w)],
            Factor::Product(a, b) => vec![(LOKR_W1_A, a), (LOKR_W1_B, b)],
        };
        match &self.w2 {
            Factor::Full(w) => v.push((LOKR_W2, w)),
            Factor::Product(a, b) => v.extend([(LOKR_W2_A, a), (LOKR_W2_B, b)]),
        }
        v
    }
    fn set_param(&mut self, slot: &Slot, v: Var) -> Result<()> {
        let dst = match (slot.name, &mut self.w1, &mut self.w2) {
            ("lokr_w1", Factor::Full(w), _) | ("lokr_w2", _, Factor::Full(w)) => w,
            ("lokr_w1_a", Factor::Product(a, _), _) | ("lokr_w2_a", _, Factor::Product(a, _)) => a,
            ("lokr_w1_b", Factor::Product(_, b), _) | ("lokr_w2_b", _, Factor::Product(_, b)) => b,
            (other, _, _) => return Err(PeftError::invalid_arg("slot", format!("this LoKr linear layer has no `{other}` (its factors: {:?})", self.params().iter().map(|(s, _)| s.name).collect::<Vec<_>>()))),
        };
        *dst = v;
        Ok(())
    }
    fn delta_weight(&self, _lin: &PeftLinear) -> Result<Tensor> {
        self.delta(false)
    }
    fn forward_delta(&self, lin: &PeftLinear, x: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        let (inf, out) = (lin.in_features(), lin.out_features());
        let (m, out_dims) = rows_and_out_dims(x, out);
        let drop = match draw_dropout(ctx, self.module_dropout, self.rank_dropout, out) {
            Dropout::Off => None,
            Dropout::SkipModule => return Ok(Tensor::zeros(out_dims, DType::F32, x.device())?),
            Dropout::Rows { keep, mean } => {
                // HF: `/= drop.mean()` when rank_dropout_scale, rows of ΔW scaled (= columns of
                // the output).
                let div = if self.rank_dropout_scale && mean > 0.0 { mean } else { 1.0 };
                Some(Tensor::from_vec(keep.into_iter().map(|k| k / div).collect::<Vec<f32>>(), out, x.device())?)
            }
        };
        let (w1, w2) = (self.w1.matrix(ctx.train)?, self.w2.matrix(ctx.train)?);
        let ((a, c), (b, d)) = (w1.dims2()?, w2.dims2()?);
        debug_assert_eq!((a * b, c * d), (out, inf));
        // x [m, c·d] -> [m, c, d]; (x w2ᵀ) [m, c, b]; w1 · that -> [m, a, b] -> [m, out].
        let t = x.to_dtype(DType::F32)?.reshape((m, c, d))?.broadcast_matmul(&w2.t()?)?;
        let mut y = (w1.broadcast_matmul(&t)?.reshape((m, out))? * self.scaling)?;
        if let Some(drop) = drop {
            y = y.broadcast_mul(&drop)?;
        }
        Ok(y.reshape(out_dims)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn factorization_matches_hf() {
        // Values of HF PEFT 0.21's `factorization` (its docstring and the tiny Llama's widths).
        for (dim, f, want) in [(256, -1, (16, 16)), (128, -1, (8, 16)), (127, -1, (1, 127)), (128, 4, (4, 32)), (64, -1, (8, 8)), (32, -1, (4, 8)), (64, 4, (4, 16)), (24, 5, (4, 6)), (12, 0, (1, 12)), (1, -1, (1, 1))] {
            assert_eq!(factorization(dim, f), want, "factorization({dim}, {f})");
        }
    }

    #[test]
    fn structured_forward_equals_x_delta_t() {
        let dev = Device::Cpu;
        let w1 = Tensor::arange(0f32, 6., &dev).unwrap().reshape((2, 3)).unwrap();
        let w2 = (Tensor::arange(0f32, 20., &dev).unwrap().reshape((4, 5)).unwrap() * 0.1).unwrap();
        let kr = kron(&w1, &w2).unwrap();
        assert_eq!(kr.dims(), &[8, 15]);
        // torch.kron: (w1 ⊗ w2)[i·b + k, j·d + l] = w1[i, j] w2[k, l]
        let v = kr.to_vec2::<f32>().unwrap();
        assert!((v[4 + 3][5 * 2 + 4] - 5.0 * 1.9).abs() < 1e-5);
        let layer = LokrLayer {
            w1: Factor::Full(Var::from_tensor(&w1).unwrap()),
            w2: Factor::Product(Var::from_tensor(&w2.narrow(1, 0, 2).unwrap()).unwrap(), Var::from_tensor(&w2.narrow(0, 0, 2).unwrap()).unwrap()),
            r: 2,
            alpha: 3.0,
            scaling: 1.5,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            rank_dropout_scale: false,
        };
        let x = Tensor::arange(0f32, 45., &dev).unwrap().reshape((3, 15)).unwrap().sin().unwrap();
        let dw = layer.delta(false).unwrap();
        let want = x.matmul(&dw.t().unwrap()).unwrap();
        let lin = PeftLinear::new(Tensor::zeros((8, 15), DType::F32, &dev).unwrap(), None, false);
        let got = layer.forward_delta(&lin, &x, &LinearCtx::default()).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{diff}");
    }
}
