//! (IA)³ layers (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
//! Cheaper than In-Context Learning"; HF `ia3.Linear`): `y = (x Wᵀ + b) ⊙ l` with `l` `[out, 1]`,
//! or for feed-forward modules `y = (x ⊙ l) Wᵀ + b` with `l` `[1, in]`; several active vectors
//! multiply.

use crate::error::{PeftError, Result};
use crate::tuners::layer::{AdapterLayer, Slot};
use crate::tuners::linear::{LinearCtx, PeftLinear};
use candle_core::{DType, Tensor, Var};

/// `ia3_l`: `<m>.ia3_l.<adapter>` in the model, `<m>.ia3_l` on disk.
pub const IA3_L: Slot = Slot::param("ia3_l");

/// One (IA)³ vector of one layer (HF `ia3.Linear` for one adapter name), hosted in
/// [`PeftLinear::layers`] and read back with [`PeftLinear::ia3`].
#[derive(Debug, Clone)]
pub struct Ia3Adapter {
    /// `ia3_l`: `[out, 1]` (output scaling) or `[1, in]` (feed-forward: input scaling), f32.
    pub l: Var,
    pub feedforward: bool,
}

impl AdapterLayer for Ia3Adapter {
    crate::tuners::layer::declare_layer!(peft_type: "IA3", module_type: "ia3.Linear", layer: "an ia3.Linear layer", slots: [IA3_L => l]);
    /// The weight change of a merge, `W ⊙ l − W` `[out, in]` f32 (the bias change of an output
    /// vector is not part of it).
    fn delta_weight(&self, lin: &PeftLinear) -> Result<Tensor> {
        let l = self.l.as_tensor().detach().flatten_all()?.to_dtype(DType::F32)?;
        let w = lin.weight_out_in_f32()?;
        let scaled = if self.feedforward { w.broadcast_mul(&l.unsqueeze(0)?)? } else { w.broadcast_mul(&l.unsqueeze(1)?)? };
        Ok((scaled - w)?)
    }
    /// This vector's output minus the base output, f32 (the host normally takes
    /// [`AdapterLayer::forward_host`] instead).
    fn forward_delta(&self, lin: &PeftLinear, x: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        let y = lin.base(x, lin.bias_for(ctx.train).as_ref())?.to_dtype(DType::F32)?;
        let scaled = lin.ia3_apply(x, &self.vector(ctx.train)?, self.feedforward, ctx)?.to_dtype(DType::F32)?;
        Ok((scaled - y)?)
    }
    /// Every active (IA)³ vector of the host together (HF `ia3.Linear.forward`).
    fn forward_host(&self, lin: &PeftLinear, x: &Tensor, ctx: &LinearCtx) -> Option<Result<Tensor>> {
        match lin.ia3_scaling(ctx.train) {
            Ok(Some((l, ff))) => Some(if ctx.rows.is_some() {
                Err(PeftError::invalid_arg("adapterNames", "per-row adapters (mixed batches) are available for LoRA adapters only"))
            } else {
                lin.ia3_apply(x, &l, ff, ctx)
            }),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
    fn mixed_batch(&self) -> bool {
        false
    }
    fn merge_into(&mut self, lin: &mut PeftLinear, name: &str, safe: bool) -> Option<Result<()>> {
        Some(lin.merge_ia3(name, self, safe))
    }
    fn unmerge_from(&mut self, lin: &mut PeftLinear) -> Option<Result<()>> {
        Some(lin.unmerge_ia3(self))
    }
}

impl Ia3Adapter {
    /// `l` flattened to f32, tracked while `train`.
    fn vector(&self, train: bool) -> Result<Tensor> {
        let l = if train { self.l.as_tensor().clone() } else { self.l.as_tensor().detach() };
        Ok(l.flatten_all()?.to_dtype(DType::F32)?)
    }
}

impl PeftLinear {
    /// (IA)³ adapter `name` of this layer (`None`: no such adapter, or not an (IA)³ one).
    pub fn ia3(&self, name: &str) -> Option<&Ia3Adapter> {
        self.layers.get(name)?.as_any()?.downcast_ref::<Ia3Adapter>()
    }

    /// The product of the active, unmerged (IA)³ vectors, flattened, with whether it scales the
    /// input (`None` when no such vector is active).
    pub(crate) fn ia3_scaling(&self, train: bool) -> Result<Option<(Tensor, bool)>> {
        let mut acc: Option<Tensor> = None;
        let mut ff = false;
        for name in &self.active {
            if self.merged.contains(name) {
                continue;
            }
            if let Some(ad) = self.ia3(name) {
                let l = ad.vector(train)?;
                ff = ad.feedforward;
                acc = Some(match acc {
                    Some(a) => (a * l)?,
                    None => l,
                });
            }
        }
        Ok(acc.map(|a| (a, ff)))
    }

    /// `(x ⊙ l) Wᵀ + b` (feed-forward) or `(x Wᵀ + b) ⊙ l`, in `x`'s dtype.
    fn ia3_apply(&self, x: &Tensor, l: &Tensor, ff: bool, ctx: &LinearCtx) -> Result<Tensor> {
        let dt = x.dtype();
        Ok(if ff {
            let xs = x.to_dtype(DType::F32)?.broadcast_mul(l)?.to_dtype(dt)?;
            self.base(&xs, self.bias_for(ctx.train).as_ref())?
        } else {
            let y = self.base(x, self.bias_for(ctx.train).as_ref())?;
            y.to_dtype(DType::F32)?.broadcast_mul(l)?.to_dtype(dt)?
        })
    }

    /// (IA)³ merge (HF `ia3.Linear.merge`): scale the weight's rows (output vectors; the bias too)
    /// or columns (feed-forward vectors) by `l`.
    pub(crate) fn merge_ia3(&mut self, name: &str, ad: &Ia3Adapter, safe: bool) -> Result<()> {
        let (w, b) = self.ia3_scaled(ad, false)?;
        if safe {
            let s = w.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()? + b.as_ref().map(|b| b.sum_all().and_then(|x| x.to_dtype(DType::F32)?.to_scalar::<f32>()).unwrap_or(f32::NAN)).unwrap_or(0.0);
            if !s.is_finite() {
                return Err(PeftError::InvalidState(format!("NaNs detected in the merged weights. The adapter {name} seems to be broken")));
            }
        }
        self.weight = w;
        self.bias = b;
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
