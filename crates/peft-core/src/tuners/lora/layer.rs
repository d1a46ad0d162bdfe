//! LoRA and DoRA layers (HF `lora.Linear`, `lora.Embedding`, `DoraLinearLayer`).
//!
//! * LoRA (Hu et al. 2021): `y = x Wᵀ + b + Σ_{a ∈ active, not merged} scaling_a · (dropout(x)
//!   A_aᵀ) B_aᵀ`. `A_a`: `[r, in]` (`lora_A`), `B_a`: `[out, r]` (`lora_B`), kept in f32 (HF's
//!   `autocast_adapter_dtype`); the low-rank path runs in f32 and is cast to the base dtype.
//! * DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"):
//!   `y = b + (m / ‖W + s·B A‖_row) ⊙ (x Wᵀ + s · x Aᵀ Bᵀ)`, with the magnitude `m` `[out]`
//!   trainable and the row norm treated as a constant (detached).
//! * Embeddings (HF `lora.Embedding`): `A` `[r, num_embeddings]`, `B` `[dim, r]` stored as HF's
//!   `lora_embedding_A` / `lora_embedding_B` parameters.

use crate::error::{PeftError, Result};
use crate::tuners::layer::{Param, Slot};
use crate::tuners::linear::{dropout, row_groups, LinearCtx, PeftLinear};
use candle_core::{DType, Tensor, Var};

/// `lora_A` of a linear layer: `<m>.lora_A.<adapter>.weight`, on disk `<m>.lora_A.weight`.
pub const LORA_A: Slot = Slot::module("lora_A");
/// `lora_B` of a linear layer.
pub const LORA_B: Slot = Slot::module("lora_B");
/// `lora_embedding_A` of an embedding layer (a parameter: no `.weight`).
pub const LORA_EMBEDDING_A: Slot = Slot::param("lora_embedding_A");
/// `lora_embedding_B` of an embedding layer.
pub const LORA_EMBEDDING_B: Slot = Slot::param("lora_embedding_B");
/// DoRA's `lora_magnitude_vector`: `<m>.lora_magnitude_vector.<adapter>.weight` in the model,
/// `<m>.lora_magnitude_vector` on disk.
pub const LORA_MAGNITUDE: Slot = Slot { name: "lora_magnitude_vector", model_param: Some("weight"), disk_param: None };
/// Every LoRA slot.
pub const SLOTS: &[Slot] = &[LORA_A, LORA_B, LORA_EMBEDDING_A, LORA_EMBEDDING_B, LORA_MAGNITUDE];

/// One LoRA adapter of one layer.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `lora_A.weight`, `[r, in_features]`, f32.
    pub a: Var,
    /// `lora_B.weight`, `[out_features, r]`, f32.
    pub b: Var,
    pub r: usize,
    pub alpha: f64,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scaling: f64,
    /// Dropout probability on the adapter's input while training.
    pub dropout: f64,
    /// DoRA magnitude `lora_magnitude_vector`, `[out_features]`, f32 (`None` = plain LoRA).
    pub magnitude: Option<Var>,
    /// DoRA: the row norm `‖W + s·B A‖` used when merging, kept to unmerge exactly.
    pub merged_norm: Option<Tensor>,
}

impl LoraAdapter {
    /// The slots of A and B: `lora_A` / `lora_B` for a linear layer, `lora_embedding_A` /
    /// `lora_embedding_B` for an embedding table.
    pub fn ab_slots(embedding: bool) -> (Slot, Slot) {
        if embedding {
            (LORA_EMBEDDING_A, LORA_EMBEDDING_B)
        } else {
            (LORA_A, LORA_B)
        }
    }

    /// A, B and (DoRA) the magnitude under their slots.
    pub fn params(&self, embedding: bool) -> Vec<Param<'_>> {
        let (sa, sb) = Self::ab_slots(embedding);
        let mut out = vec![(sa, &self.a), (sb, &self.b)];
        if let Some(m) = &self.magnitude {
            out.push((LORA_MAGNITUDE, m));
        }
        out
    }

    /// Replace the variable of `slot`; false when this adapter has no such slot.
    pub fn set_param(&mut self, slot: &Slot, v: Var, embedding: bool) -> bool {
        let (sa, sb) = Self::ab_slots(embedding);
        if *slot == sa {
            self.a = v;
        } else if *slot == sb {
            self.b = v;
        } else if *slot == LORA_MAGNITUDE && self.magnitude.is_some() {
            self.magnitude = Some(v);
        } else {
            return false;
        }
        true
    }
}

impl PeftLinear {
    /// Embedding lookup (HF `lora.Embedding.forward`): `ids` `[b·s]` u32 → `[b, s, dim]` (base
    /// dtype): the table's rows (a modules_to_save copy's when an active adapter has one) plus,
    /// for each active unmerged LoRA adapter, `scaling · A[:, ids]ᵀ Bᵀ` (no dropout, as in HF).
    /// A mixed batch (`ctx.rows`) adds each row's own adapter.
    ///
    /// Errors: `InvalidArgument` for a mixed batch with modules_to_save copies of the table, or
    /// a row count that does not match.
    pub fn forward_embedding(&self, ids: &Tensor, b: usize, s: usize, ctx: &LinearCtx) -> Result<Tensor> {
        let dim = self.out_features();
        let copy = if self.disabled { None } else { self.active.iter().find_map(|n| self.copy_params(n, ctx.train)) };
        if copy.is_some() && ctx.rows.is_some() {
            return Err(PeftError::invalid_arg("adapterNames", "per-row adapters (mixed batches) are not available with a modules_to_save copy of the embedding layer"));
        }
        let table = match &copy {
            Some((w, _)) => w.clone(),
            None => self.weight.clone(),
        };
        let mut y = table.index_select(ids, 0)?.reshape((b, s, dim))?;
        if self.disabled || (self.adapters.is_empty() && self.others.is_empty()) {
            return Ok(y);
        }
        let delta = |ad: &LoraAdapter, ids: &Tensor, rows: usize| -> Result<Tensor> {
            let a = if ctx.train { ad.a.as_tensor().clone() } else { ad.a.as_tensor().detach() };
            let bm = if ctx.train { ad.b.as_tensor().clone() } else { ad.b.as_tensor().detach() };
            let xa = a.t()?.contiguous()?.index_select(ids, 0)?; // [n, r]
            Ok((xa.matmul(&bm.t()?)? * ad.scaling)?.reshape((rows, s, dim))?)
        };
        if let Some(rows) = ctx.rows {
            if rows.len() != b {
                return Err(PeftError::invalid_arg("adapterNames", format!("has {} names for a batch of {b} rows", rows.len())));
            }
            let ids2 = ids.reshape((b, s))?;
            for (name, idx) in row_groups(rows, ids.device())? {
                if let Some(l) = self.others.get(name) {
                    if !l.mixed_batch() {
                        return Err(crate::tuners::linear::mixed_refused(l.as_ref()));
                    }
                    let sub = ids2.index_select(&idx, 0)?;
                    let ys = y.index_select(&idx, 0)?;
                    let d = (l.apply_embedding(self, &sub, ys.clone(), ctx)? - ys)?;
                    y = y.index_add(&idx, &d, 0)?;
                    continue;
                }
                let Some(ad) = self.adapters.get(name) else { continue };
                let sub = ids2.index_select(&idx, 0)?.flatten_all()?;
                let d = delta(ad, &sub, idx.dim(0)?)?.to_dtype(y.dtype())?;
                y = y.index_add(&idx, &d, 0)?;
            }
            return Ok(y);
        }
        if self.active.len() > 1 && !self.others.is_empty() {
            self.check_disjoint_rows(&self.active)?;
        }
        for name in &self.active {
            if self.merged.contains(name) {
                continue;
            }
            if let Some(ad) = self.adapters.get(name) {
                y = (y + delta(ad, ids, b)?.to_dtype(table.dtype())?)?;
            } else if let Some(l) = self.others.get(name) {
                y = l.apply_embedding(self, ids, y, ctx)?;
            }
        }
        Ok(y)
    }

    /// `scaling · B A` as a `[out, in]` f32 tensor (HF `get_delta_weight`).
    pub fn delta_weight(&self, name: &str) -> Result<Tensor> {
        let ad = self.adapters.get(name).ok_or_else(|| PeftError::AdapterNotFound {
            name: name.into(),
            available: self.adapters.keys().cloned().collect(),
        })?;
        Ok((ad.b.as_tensor().to_dtype(DType::F32)?.matmul(&ad.a.as_tensor().to_dtype(DType::F32)?)? * ad.scaling)?)
    }

    /// DoRA's `‖W + s·B A‖` per output row, `[out]` f32, detached (HF `get_weight_norm`).
    pub fn dora_weight_norm(&self, ad: &LoraAdapter) -> Result<Tensor> {
        let lw = ad.b.as_tensor().detach().to_dtype(DType::F32)?.matmul(&ad.a.as_tensor().detach().to_dtype(DType::F32)?)?;
        let w = (self.weight_out_in_f32()? + (lw * ad.scaling)?)?;
        Ok(w.sqr()?.sum(1)?.sqrt()?)
    }

    /// DoRA's delta over the base output `y` (which includes the bias):
    /// `(m/‖·‖ - 1) ⊙ x Wᵀ + (m/‖·‖) ⊙ s · x Aᵀ Bᵀ`, with `x` dropped out while training.
    pub(crate) fn dora_delta(&self, x: &Tensor, y: &Tensor, ad: &LoraAdapter, mag: &Var, ctx: &LinearCtx) -> Result<Tensor> {
        let norm = self.dora_weight_norm(ad)?;
        let m = if ctx.train { mag.as_tensor().clone() } else { mag.as_tensor().detach() }.to_dtype(DType::F32)?;
        let scale = (m / norm)?; // [out]
        let dropped = ctx.train && ad.dropout > 0.0;
        let xin = if dropped { dropout(&x.to_dtype(DType::F32)?, ad.dropout, ctx.rng)? } else { x.to_dtype(DType::F32)? };
        let base = if dropped {
            self.base(&xin.to_dtype(self.weight.dtype())?, None)?.to_dtype(DType::F32)?
        } else {
            let yf = y.to_dtype(DType::F32)?;
            match &self.bias_for(ctx.train) {
                Some(b) => yf.broadcast_sub(&b.to_dtype(DType::F32)?)?,
                None => yf,
            }
        };
        let lora = self.lora_path_no_dropout(&xin, ad, ctx)?; // already scaled by s
        let d = (base.broadcast_mul(&(&scale - 1.0)?)? + lora.broadcast_mul(&scale)?)?;
        Ok(d)
    }

    pub(crate) fn lora_path(&self, x: &Tensor, ad: &LoraAdapter, ctx: &LinearCtx) -> Result<Tensor> {
        let mut xf = x.to_dtype(DType::F32)?;
        if ctx.train && ad.dropout > 0.0 {
            xf = dropout(&xf, ad.dropout, ctx.rng)?;
        }
        self.lora_path_no_dropout(&xf, ad, ctx)
    }

    /// `s · x Aᵀ Bᵀ` on an f32 input that is already dropped out.
    pub(crate) fn lora_path_no_dropout(&self, xf: &Tensor, ad: &LoraAdapter, ctx: &LinearCtx) -> Result<Tensor> {
        let dims = xf.dims().to_vec();
        let m: usize = dims[..dims.len() - 1].iter().product();
        // The low-rank path runs in the adapter's dtype (f32 unless autocast_adapter_dtype was off).
        let x2 = xf.reshape((m, dims[dims.len() - 1]))?.to_dtype(ad.a.dtype())?;
        // Outside training the adapter weights are detached so no autograd graph is kept
        // (a KV cache would otherwise pin every step's graph).
        let (a, b) = if ctx.train {
            (ad.a.as_tensor().clone(), ad.b.as_tensor().clone())
        } else {
            (ad.a.as_tensor().detach(), ad.b.as_tensor().detach())
        };
        let h = (x2.matmul(&a.t()?)? * ad.scaling)?;
        let y = h.matmul(&b.t()?)?.to_dtype(DType::F32)?;
        let mut out = dims;
        *out.last_mut().unwrap() = self.out_features();
        Ok(y.reshape(out)?)
    }

    /// Merge LoRA adapter `name` (see [`PeftLinear::merge`]); DoRA keeps the row norm it used
    /// so that unmerging is exact.
    pub(crate) fn merge_lora(&mut self, name: &String, safe: bool) -> Result<()> {
        let Some(ad) = self.adapters.get(name).cloned() else { return Ok(()) };
        let delta = self.delta_weight(name)?;
        let (w, norm) = match &ad.magnitude {
            // DoRA: W' = (m / ‖W + ΔW‖_row) ⊙ (W + ΔW) (HF `DoraLinearVariant.merge_safe`).
            Some(m) => {
                let full = (self.weight_out_in_f32()? + delta)?;
                let norm = full.sqr()?.sum(1)?.sqrt()?;
                let factor = (m.as_tensor().detach().to_dtype(DType::F32)? / &norm)?;
                let merged = full.broadcast_mul(&factor.unsqueeze(1)?)?;
                (if self.transposed { merged.t()?.contiguous()? } else { merged }, Some(norm))
            }
            None => {
                let delta = if self.transposed { delta.t()? } else { delta };
                ((self.weight.to_dtype(DType::F32)? + delta)?, None)
            }
        };
        if safe {
            let s = w.sum_all()?.to_scalar::<f32>()?;
            if !s.is_finite() {
                return Err(PeftError::InvalidState(format!(
                    "NaNs or Infs detected in the merged weights; the adapter `{name}` seems broken"
                )));
            }
        }
        self.weight = w.to_dtype(self.weight.dtype())?.contiguous()?;
        if let Some(ad) = self.adapters.get_mut(name) {
            ad.merged_norm = norm;
        }
        self.merged.push(name.clone());
        Ok(())
    }

    /// Undo the merge of LoRA adapter `name` (see [`PeftLinear::unmerge`]).
    pub(crate) fn unmerge_lora(&mut self, name: &str) -> Result<()> {
        let ad = self.adapters.get(name).cloned();
        let delta = self.delta_weight(name)?;
        let w = match ad.as_ref().and_then(|a| a.magnitude.clone().zip(a.merged_norm.clone())) {
            Some((m, norm)) => {
                let factor = (m.as_tensor().detach().to_dtype(DType::F32)? / norm)?;
                let orig = (self.weight_out_in_f32()?.broadcast_div(&factor.unsqueeze(1)?)? - delta)?;
                if self.transposed { orig.t()?.contiguous()? } else { orig }
            }
            None => {
                let delta = if self.transposed { delta.t()? } else { delta };
                (self.weight.to_dtype(DType::F32)? - delta)?
            }
        };
        self.weight = w.to_dtype(self.weight.dtype())?.contiguous()?;
        Ok(())
    }
}
