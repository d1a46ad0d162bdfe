//! Data-driven LoRA initialisations that move the principal part of a base weight into the
//! adapter: PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors
//! Adaptation of Large Language Models"; HF `LoraLayer.pissa_init`) and OLoRA (Büyükakyüz 2024,
//! "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models"; HF `olora_init`).
//!
//! Both take the base weight `W` `[out, in]` (f32) and return `A` `[r, in]`, `B` `[out, r]` and
//! the residual `W − s·B A` that replaces the base weight, so `residual + s·B A = W`: the model's
//! outputs are unchanged at initialisation. Decompositions run in f64 (nalgebra) and are returned
//! as f32 tensors on `W`'s device.

use crate::error::{PeftError, Result};
use candle_core::{DType, Tensor};
use nalgebra::DMatrix;

fn to_matrix(w: &Tensor) -> Result<DMatrix<f64>> {
    let (out, inp) = w.dims2()?;
    let v = w.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(DMatrix::from_row_slice(out, inp, &v))
}

fn to_tensor(m: &DMatrix<f64>, like: &Tensor) -> Result<Tensor> {
    let (rows, cols) = m.shape();
    let mut v = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            v.push(m[(i, j)] as f32);
        }
    }
    Ok(Tensor::from_vec(v, (rows, cols), like.device())?)
}

fn check_rank(w: &Tensor, r: usize, what: &str) -> Result<()> {
    let (out, inp) = w.dims2()?;
    if r == 0 || r > out.min(inp) {
        return Err(PeftError::InvalidAdapterConfig {
            path: None,
            msg: format!("{what} needs 1 ≤ r ≤ min(out, in) = {}, found r = {r}", out.min(inp)),
        });
    }
    Ok(())
}

/// PiSSA: `W = U S Vᵀ`; `A = diag(√(S_r / s)) V_rᵀ`, `B = U_r diag(√(S_r / s))` (the top `r`
/// singular triplets), residual `W − s·B A`. Returns `(A, B, residual)`.
///
/// Errors: `InvalidAdapterConfig` when `r` exceeds `min(out, in)`; `Internal` when the SVD does
/// not converge.
pub fn pissa(w: &Tensor, r: usize, scaling: f64) -> Result<(Tensor, Tensor, Tensor)> {
    check_rank(w, r, "PiSSA")?;
    let m = to_matrix(w)?;
    let svd = m.clone().try_svd(true, true, 1e-12, 10_000).ok_or_else(|| PeftError::Internal("PiSSA: the SVD did not converge".into()))?;
    let (u, vt) = (svd.u.expect("requested U"), svd.v_t.expect("requested Vᵀ"));
    // Singular values in descending order (as torch.linalg.svd returns them).
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    let (out, inp) = m.shape();
    let mut a = DMatrix::<f64>::zeros(r, inp);
    let mut b = DMatrix::<f64>::zeros(out, r);
    for (k, &i) in order.iter().take(r).enumerate() {
        let sq = (svd.singular_values[i] / scaling).sqrt();
        for j in 0..inp {
            a[(k, j)] = sq * vt[(i, j)];
        }
        for j in 0..out {
            b[(j, k)] = u[(j, i)] * sq;
        }
    }
    let residual = &m - (&b * &a) * scaling;
    Ok((to_tensor(&a, w)?, to_tensor(&b, w)?, to_tensor(&residual, w)?))
}

/// OLoRA: `W = Q R`; `A = R[:r]`, `B = Q[:, :r]`, residual `W − s·B A`. Returns
/// `(A, B, residual)`.
///
/// Errors: `InvalidAdapterConfig` when `r` exceeds `min(out, in)`.
pub fn olora(w: &Tensor, r: usize, scaling: f64) -> Result<(Tensor, Tensor, Tensor)> {
    check_rank(w, r, "OLoRA")?;
    let m = to_matrix(w)?;
    let qr = m.clone().qr();
    let (q, rr) = (qr.q(), qr.r());
    let b = q.columns(0, r).into_owned();
    let a = rr.rows(0, r).into_owned();
    let residual = &m - (&b * &a) * scaling;
    Ok((to_tensor(&a, w)?, to_tensor(&b, w)?, to_tensor(&residual, w)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn w() -> Tensor {
        let v: Vec<f32> = (0..6 * 4).map(|i| ((i * 7919 % 23) as f32 - 11.0) / 7.0).collect();
        Tensor::from_vec(v, (6, 4), &Device::Cpu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn residual_plus_adapter_is_the_weight() {
        for (name, f) in [("pissa", pissa as fn(&Tensor, usize, f64) -> Result<(Tensor, Tensor, Tensor)>), ("olora", olora)] {
            let (a, b, res) = f(&w(), 2, 2.0).unwrap();
            assert_eq!((a.dims(), b.dims()), (&[2, 4][..], &[6, 2][..]));
            let back = (res + (b.matmul(&a).unwrap() * 2.0).unwrap()).unwrap();
            assert!(max_abs(&(back - w()).unwrap()) < 1e-5, "{name}");
        }
    }

    #[test]
    fn pissa_takes_the_principal_part_and_olora_is_orthonormal() {
        // PiSSA with r = full rank leaves a zero residual; with r = 1, s·B A is the best rank-1
        // approximation, whose error is the second singular value's share.
        let (_, _, res) = pissa(&w(), 4, 1.0).unwrap();
        assert!(max_abs(&res) < 1e-5);
        let (_, b, _) = olora(&w(), 3, 1.0).unwrap();
        let btb = b.t().unwrap().matmul(&b).unwrap();
        let eye = Tensor::eye(3, DType::F32, &Device::Cpu).unwrap();
        assert!(max_abs(&(btb - eye).unwrap()) < 1e-5, "Q columns are orthonormal");
        assert!(pissa(&w(), 5, 1.0).is_err());
    }
}
