//! (IA)³ layers (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
//! Cheaper than In-Context Learning"; HF `ia3.Linear`): `y = (x Wᵀ + b) ⊙ l` with `l` `[out, 1]`,
//! or for feed-forward modules `y = (x ⊙ l) Wᵀ + b` with `l` `[1, in]`; several active vectors
//! multiply.

use crate::error::{PeftError, Result};
use crate::tuners::layer::Slot;
use crate::tuners::linear::PeftLinear;
use candle_core::{DType, Tensor, Var};

/// `ia3_l`: `<m>.ia3_l.<adapter>` in the model, `<m>.ia3_l` on disk.
pub const IA3_L: Slot = Slot::param("ia3_l");

/// One (IA)³ vector of one layer.
#[derive(Debug, Clone)]
pub struct Ia3Adapter {
    /// `ia3_l`: `[out, 1]` (output scaling) or `[1, in]` (feed-forward: input scaling), f32.
    pub l: Var,
    pub feedforward: bool,
}

impl PeftLinear {
    /// The product of the active, unmerged (IA)³ vectors, flattened, with whether it scales the
    /// input (`None` when no such vector is active).
    pub(crate) fn ia3_scaling(&self, train: bool) -> Option<(Tensor, bool)> {
        let mut acc: Option<Tensor> = None;
        let mut ff = false;
        for name in &self.active {
            if self.merged.contains(name) {
                continue;
            }
            if let Some(ad) = self.ia3.get(name) {
                let l = if train { ad.l.as_tensor().clone() } else { ad.l.as_tensor().detach() };
                let l = l.flatten_all().ok()?.to_dtype(DType::F32).ok()?;
                ff = ad.feedforward;
                acc = Some(match acc {
                    Some(a) => (a * l).ok()?,
                    None => l,
                });
            }
        }
        acc.map(|a| (a, ff))
    }

    /// (IA)³ merge (HF `ia3.Linear.merge`): scale the weight's rows (output vectors; the bias too)
    /// or columns (feed-forward vectors) by `l`.
    pub(crate) fn merge_ia3(&mut self, name: &str, ad: Ia3Adapter, safe: bool) -> Result<()> {
        let (w, b) = self.ia3_scaled(&ad, false)?;
        if safe {
            let s = w.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()? + b.as_ref().map(|b| b.sum_all().and_then(|x| x.to_dtype(DType::F32)?.to_scalar::<f32>()).unwrap_or(f32::NAN)).unwrap_or(0.0);
            if !s.is_finite() {
                return Err(PeftError::InvalidState(format!("NaNs detected in the merged weights. The adapter {name} seems to be broken")));
            }
        }
        self.weight = w;
        self.bias = b;
        self.merged.push(name.to_string());
        Ok(())
    }

    /// The weight and bias scaled (or, with `inverse`, unscaled) by an (IA)³ vector.
    pub(crate) fn ia3_scaled(&self, ad: &Ia3Adapter, inverse: bool) -> Result<(Tensor, Option<Tensor>)> {
        let l = ad.l.as_tensor().detach().flatten_all()?.to_dtype(DType::F32)?;
        let l = if inverse { l.recip()? } else { l };
        let dt = self.weight.dtype();
        // Output vectors scale rows of [out, in] (columns when stored [in, out]); feed-forward
        // vectors scale the `in` axis.
        let along_out = !ad.feedforward;
        let w = self.weight.to_dtype(DType::F32)?;
        let w = if along_out != self.transposed { w.broadcast_mul(&l.unsqueeze(1)?)? } else { w.broadcast_mul(&l.unsqueeze(0)?)? };
        let b = match (&self.bias, along_out) {
            (Some(b), true) => Some((b.to_dtype(DType::F32)? * &l)?.to_dtype(b.dtype())?),
            (b, _) => b.clone(),
        };
        Ok((w.to_dtype(dt)?.contiguous()?, b))
    }

    /// Undo an (IA)³ merge (divide the scaling out again).
    pub(crate) fn unmerge_ia3(&mut self, ia: &Ia3Adapter) -> Result<()> {
        let (w, b) = self.ia3_scaled(ia, true)?;
        self.weight = w;
        self.bias = b;
        Ok(())
    }
}
