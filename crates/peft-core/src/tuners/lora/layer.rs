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
use crate::tuners::layer::{AdapterLayer, Param, Slot};
use crate::tuners::linear::{dropout, LinearCtx, PeftLinear};
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

/// One LoRA adapter of one layer (HF `lora.Linear` / `lora.Embedding` for one adapter name),
/// hosted in [`PeftLinear::layers`] and read back with [`PeftLinear::lora`].
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
    /// The adapter sits on an embedding table (HF `lora.Embedding`: slots `lora_embedding_A` /
    /// `lora_embedding_B`, `A` `[r, num_embeddings]`, `B` `[dim, r]`).
    pub embedding: bool,
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

    /// `scaling · B A`, `[out, in]` f32 (HF `get_delta_weight`).
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().to_dtype(DType::F32)?.matmul(&self.a.as_tensor().to_dtype(DType::F32)?)? * self.scaling)?)
    }

    /// The embedding contribution `scaling · A[:, ids]ᵀ Bᵀ` for token ids `ids` (any shape,
    /// `rows · s` ids) as `[rows, s, dim]` f32 (no dropout, as in HF `lora.Embedding`).
    fn embedding_delta(&self, ids: &Tensor, rows: usize, s: usize, dim: usize, train: bool) -> Result<Tensor> {
        let a = if train { self.a.as_tensor().clone() } else { self.a.as_tensor().detach() };
        let bm = if train { self.b.as_tensor().clone() } else { self.b.as_tensor().detach() };
        let xa = a.t()?.contiguous()?.index_select(&ids.flatten_all()?, 0)?; // [n, r]
        Ok((xa.matmul(&bm.t()?)? * self.scaling)?.reshape((rows, s, dim))?)
    }
}

impl AdapterLayer for LoraAdapter {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }
    fn module_type(&self) -> &'static str {
        if self.embedding { "lora.Embedding" } else { "lora.Linear" }
    }
    fn adapter_kind(&self) -> &'static str {
        if self.embedding { "lora_embedding" } else { "lora" }
    }
    /// A, B and (DoRA) the magnitude under their slots.
    fn params(&self) -> Vec<Param<'_>> {
        let (sa, sb) = Self::ab_slots(self.embedding);
        let mut out = vec![(sa, &self.a), (sb, &self.b)];
        if let Some(m) = &self.magnitude {
            out.push((LORA_MAGNITUDE, m));
        }
        out
    }
    fn set_param(&mut self, slot: &Slot, v: Var) -> Result<()> {
        let (sa, sb) = Self::ab_slots(self.embedding);
        if *slot == sa {
            self.a = v;
        } else if *slot == sb {
            self.b = v;
        } else if *slot == LORA_MAGNITUDE && self.magnitude.is_some() {
            self.magnitude = Some(v);
        } else {
            return Err(PeftError::invalid_arg("slot", format!("this {} layer has no `{}`", self.module_type(), slot.name)));
        }
        Ok(())
    }
    fn delta_weight(&self, _lin: &PeftLinear) -> Result<Tensor> {
        self.delta()
    }
    /// `s · dropout(x) Aᵀ Bᵀ`, or DoRA's delta over the base output.
    fn forward_delta(&self, lin: &PeftLinear, x: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        match &self.magnitude {
            Some(m) => {
                let y = lin.base(x, lin.bias_for(ctx.train).as_ref())?;
                lin.dora_delta(x, &y, self, m, ctx)
            }
            None => lin.lora_path(x, self, ctx),
        }
    }
    fn apply(&self, lin: &PeftLinear, x: &Tensor, y: Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        let delta = match &self.magnitude {
            Some(m) => lin.dora_delta(x, &y, self, m, ctx)?,
            None => lin.lora_path(x, self, ctx)?,
        };
        Ok((y + delta.to_dtype(x.dtype())?)?)
    }
    fn apply_embedding(&self, _lin: &PeftLinear, ids: &Tensor, y: Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        let (rows, s, dim) = y.dims3()?;
        let d = self.embedding_delta(ids, rows, s, dim, ctx.train)?;
        Ok((&y + d.to_dtype(y.dtype())?)?)
    }
    fn mixed_embedding_delta(&self, _lin: &PeftLinear, ids: &Tensor, y: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        let (rows, s, dim) = y.dims3()?;
        Ok(self.embedding_delta(ids, rows, s, dim, ctx.train)?.to_dtype(y.dtype())?)
    }
    /// HF refuses `adapter_names` with DoRA.
    fn mixed_delta(&self, lin: &PeftLinear, x: &Tensor, _y: &Tensor, _idx: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        if self.magnitude.is_some() {
            return Err(PeftError::invalid_arg("adapterNames", "Cannot pass `adapter_names` when DoRA is enabled."));
        }
        lin.lora_path(x, self, ctx)
    }
    fn merge_into(&mut self, lin: &mut PeftLinear, name: &str, safe: bool) -> Option<Result<()>> {
        Some(lin.merge_lora(name, self, safe))
    }
    fn unmerge_from(&mut self, lin: &mut PeftLinear) -> Option<Result<()>> {
        Some(lin.unmerge_lora(self))
    }
}

/// Typed access to the LoRA layers a [`PeftLinear`] hosts (the fused engine, weighted adapters,
/// hotswap, scaling, PiSSA / OLoRA and the tests read and edit them through these).
impl PeftLinear {
    /// LoRA adapter `name` of this layer (`None`: no such adapter, or not a LoRA one).
    pub fn lora(&self, name: &str) -> Option<&LoraAdapter> {
        self.layers.get(name)?.as_any()?.downcast_ref::<LoraAdapter>()
    }

    /// The mutable twin of [`PeftLinear::lora`].
    pub fn lora_mut(&mut self, name: &str) -> Option<&mut LoraAdapter> {
        self.layers.get_mut(name)?.as_any_mut()?.downcast_mut::<LoraAdapter>()
    }

    /// Every LoRA adapter of this layer with its name, sorted by name.
    pub fn loras(&self) -> impl Iterator<Item = (&String, &LoraAdapter)> {
        self.layers.iter().filter_map(|(n, l)| Some((n, l.as_any()?.downcast_ref::<LoraAdapter>()?)))
    }

    /// The mutable twin of [`PeftLinear::loras`].
    pub fn loras_mut(&mut self) -> impl Iterator<Item = (&String, &mut LoraAdapter)> {
        self.layers.iter_mut().filter_map(|(n, l)| Some((n, l.as_any_mut()?.downcast_mut::<LoraAdapter>()?)))
    }

    /// `scaling · B A` as a `[out, in]` f32 tensor (HF `get_delta_weight`).
    ///
    /// Errors: `AdapterNotFound` when `name` is not a LoRA adapter of this layer (listing those
    /// that are).
    pub fn delta_weight(&self, name: &str) -> Result<Tensor> {
        let ad = self.lora(name).ok_or_else(|| PeftError::AdapterNotFound { name: name.into(), available: self.loras().map(|(n, _)| n.clone()).collect() })?;
        ad.delta()
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

    /// Merge LoRA adapter `ad` (named `name`) into the base weight (see [`PeftLinear::merge`]);
    /// DoRA keeps the row norm it used so that unmerging is exact.
    pub(crate) fn merge_lora(&mut self, name: &str, ad: &mut LoraAdapter, safe: bool) -> Result<()> {
        let delta = ad.delta()?;
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
        ad.merged_norm = norm;
        Ok(())
    }

    /// Undo the merge of LoRA adapter `ad` (see [`PeftLinear::unmerge`]).
    pub(crate) fn unmerge_lora(&mut self, ad: &LoraAdapter) -> Result<()> {
        let delta = ad.delta()?;
        let w = match ad.magnitude.clone().zip(ad.merged_norm.clone()) {
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
