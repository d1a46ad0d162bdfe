//! A linear layer of the base model that can carry LoRA, DoRA or (IA)³ adapters.
//!
//! * LoRA (Hu et al. 2021; HF `lora.Linear`):
//!   `y = x Wᵀ + b + Σ_{a ∈ active, not merged} scaling_a · (dropout(x) A_aᵀ) B_aᵀ`.
//!   `A_a`: `[r, in]` (`lora_A`), `B_a`: `[out, r]` (`lora_B`), kept in f32 (HF's
//!   `autocast_adapter_dtype`); the low-rank path runs in f32 and is cast to the base dtype.
//! * DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"; HF
//!   `DoraLinearLayer`): `y = b + (m / ‖W + s·B A‖_row) ⊙ (x Wᵀ + s · x Aᵀ Bᵀ)`, with the
//!   magnitude `m` `[out]` trainable and the row norm treated as a constant (detached).
//! * (IA)³ (Liu et al. 2022; HF `ia3.Linear`): `y = (x Wᵀ + b) ⊙ l` with `l` `[out, 1]`, or for
//!   feed-forward modules `y = (x ⊙ l) Wᵀ + b` with `l` `[1, in]`; several active vectors
//!   multiply.

use crate::error::{PeftError, Result};
use crate::ops::frozen_linear;
use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;
use std::sync::Arc;

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

/// One (IA)³ vector of one layer.
#[derive(Debug, Clone)]
pub struct Ia3Adapter {
    /// `ia3_l`: `[out, 1]` (output scaling) or `[1, in]` (feed-forward: input scaling), f32.
    pub l: Var,
    pub feedforward: bool,
}

/// Per-row adapter choice of a mixed batch (`adapter_names` in HF): `None` = base model.
pub type RowAdapters = Arc<Vec<Option<String>>>;

/// A base linear layer plus its LoRA adapters. See the module docs.
#[derive(Debug, Clone)]
pub struct PeftLinear {
    /// Base weight: `[out, in]`, or `[in, out]` when `transposed` (GPT-2 `Conv1D`).
    pub weight: Tensor,
    /// Base bias `[out]`. A trainable variable while a LoRA adapter with `bias != "none"` trains
    /// it (HF `bias="all" | "lora_only"`); forward passes outside training detach it.
    pub bias: Option<Tensor>,
    /// Weight stored `[in, out]` (HF `fan_in_fan_out`).
    pub transposed: bool,
    pub adapters: BTreeMap<String, LoraAdapter>,
    /// Names of the adapters that take part in `forward`.
    pub active: Vec<String>,
    /// Names of the adapters whose delta is currently added into `weight`.
    pub merged: Vec<String>,
    /// When true, adapters are bypassed (HF `disable_adapters`).
    pub disabled: bool,
    /// `modules_to_save` copies per adapter: a trainable copy of (weight, bias) that replaces the
    /// base parameters while that adapter is active (HF `ModulesToSaveWrapper`). Kept in the base dtype.
    pub saved_copies: BTreeMap<String, (Var, Option<Var>)>,
    /// (IA)³ vectors per adapter.
    pub ia3: BTreeMap<String, Ia3Adapter>,
    /// An embedding table `[num_embeddings, dim]` (HF `lora.Embedding`), stored as a
    /// `transposed` layer with `in = num_embeddings`, `out = dim`: its LoRA `A` `[r, num]` and `B`
    /// `[dim, r]` are HF's `lora_embedding_A` / `lora_embedding_B`, and merging adds
    /// `(scaling · B A)ᵀ` to the table. Looked up with [`PeftLinear::forward_embedding`].
    pub is_embedding: bool,
    /// The base weight kept quantized (a GGUF base loaded with `quantization: 'keep'`,
    /// QLoRA-style): when set, the base product uses its integer kernels and `weight` is only a
    /// zero-stride `[out, in]` placeholder that holds no data (its shape is still right).
    /// Merging into such a base is refused (`ERR_INVALID_STATE`), as HF refuses merging into a
    /// bitsandbytes 4-bit base without dequantizing.
    pub quant: Option<std::sync::Arc<crate::engine::quant::QuantWeight>>,
}

/// What a forward pass needs to know beyond the input.
#[derive(Clone, Default)]
pub struct LinearCtx<'a> {
    /// Training: dropout is applied and gradients flow.
    pub train: bool,
    /// Mixed batch: which adapter each row uses (overrides `active`).
    pub rows: Option<&'a RowAdapters>,
    /// Source of dropout masks while training.
    pub rng: Option<&'a std::sync::Mutex<rand::rngs::StdRng>>,
}

impl PeftLinear {
    /// A plain layer with no adapter.
    pub fn new(weight: Tensor, bias: Option<Tensor>, transposed: bool) -> Self {
        PeftLinear {
            weight,
            bias,
            transposed,
            adapters: BTreeMap::new(),
            active: vec![],
            merged: vec![],
            disabled: false,
            saved_copies: BTreeMap::new(),
            ia3: BTreeMap::new(),
            is_embedding: false,
            quant: None,
        }
    }

    /// Makes the layer use `q` as its frozen base weight (see [`PeftLinear::quant`]); `weight`
    /// becomes a placeholder that holds no data.
    ///
    /// Errors: `ERR_SHAPE_MISMATCH` when `q` is not `[out, in]` of this layer;
    /// `ERR_INVALID_STATE` for a transposed layer or an embedding.
    pub fn set_quantized(&mut self, q: std::sync::Arc<crate::engine::quant::QuantWeight>) -> Result<()> {
        if self.transposed || self.is_embedding {
            return Err(PeftError::InvalidState(format!("{}: only [out, in] linear layers can keep a quantized weight", q.name())));
        }
        if self.weight.dims() != [q.rows(), q.cols()] {
            return Err(PeftError::ShapeMismatch { name: q.name().to_string(), expected: self.weight.dims().to_vec(), found: vec![q.rows(), q.cols()] });
        }
        self.weight = Tensor::zeros((), self.weight.dtype(), self.weight.device())?.broadcast_as((q.rows(), q.cols()))?;
        self.quant = Some(q);
        Ok(())
    }

    /// The frozen base product `x·Wᵀ (+ bias)`, through the quantized kernels when the weight is
    /// kept quantized (result in f32 then, cast back to `x`'s dtype).
    fn base(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        match &self.quant {
            Some(q) => Ok(crate::ops::quant_linear(x, q, bias)?.to_dtype(x.dtype())?),
            None => Ok(frozen_linear(x, &self.weight, bias, self.transposed)?),
        }
    }

    /// The base weight as a dense tensor in the base dtype and layout: `weight`, or the kept
    /// quantized weight dequantized (a fresh `[out, in]` f32 tensor cast to the base dtype).
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.quant {
            Some(q) => Ok(Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), self.weight.device())?.to_dtype(self.weight.dtype())?),
            None => Ok(self.weight.clone()),
        }
    }

    /// Refuses weight edits (merge, unmerge, modules_to_save copies) on a quantized base.
    pub fn refuse_quantized(&self, what: &str) -> Result<()> {
        match &self.quant {
            Some(q) => Err(PeftError::InvalidState(format!(
                "cannot {what} on {}: the base weight is kept quantized ({}); load the model with quantization: 'dequantize' to merge (as HF PEFT refuses merging into a 4-bit bitsandbytes base without dequantizing)",
                q.name(),
                q.quant_type().name()
            ))),
            None => Ok(()),
        }
    }

    /// An embedding table `[num_embeddings, dim]` that can carry LoRA adapters (HF
    /// `lora.Embedding`); see [`PeftLinear::is_embedding`].
    pub fn embedding(table: Tensor) -> Self {
        let mut l = PeftLinear::new(table, None, true);
        l.is_embedding = true;
        l
    }

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
        if self.disabled || self.adapters.is_empty() {
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
                let Some(ad) = self.adapters.get(name) else { continue };
                let sub = ids2.index_select(&idx, 0)?.flatten_all()?;
                let d = delta(ad, &sub, idx.dim(0)?)?.to_dtype(y.dtype())?;
                y = y.index_add(&idx, &d, 0)?;
            }
            return Ok(y);
        }
        for name in &self.active {
            if self.merged.contains(name) {
                continue;
            }
            if let Some(ad) = self.adapters.get(name) {
                y = (y + delta(ad, ids, b)?.to_dtype(table.dtype())?)?;
            }
        }
        Ok(y)
    }

    pub fn in_features(&self) -> usize {
        let d = self.weight.dims();
        if self.transposed { d[0] } else { d[1] }
    }

    pub fn out_features(&self) -> usize {
        let d = self.weight.dims();
        if self.transposed { d[1] } else { d[0] }
    }

    /// The bias as the forward pass uses it: tracked while training, detached otherwise (so a
    /// trainable bias keeps no autograd graph alive during inference).
    fn bias_for(&self, train: bool) -> Option<Tensor> {
        self.bias.as_ref().map(|b| if train { b.clone() } else { b.detach() })
    }

    /// Number of base parameters (weight and bias).
    pub fn base_param_count(&self) -> usize {
        self.weight.elem_count() + self.bias.as_ref().map(|b| b.elem_count()).unwrap_or(0)
    }

    /// `scaling · B A` as a `[out, in]` f32 tensor (HF `get_delta_weight`).
    pub fn delta_weight(&self, name: &str) -> Result<Tensor> {
        let ad = self.adapters.get(name).ok_or_else(|| PeftError::AdapterNotFound {
            name: name.into(),
            available: self.adapters.keys().cloned().collect(),
        })?;
        Ok((ad.b.as_tensor().to_dtype(DType::F32)?.matmul(&ad.a.as_tensor().to_dtype(DType::F32)?)? * ad.scaling)?)
    }

    /// The base weight as `[out, in]` f32.
    fn weight_out_in_f32(&self) -> Result<Tensor> {
        if let Some(q) = &self.quant {
            return Ok(Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), self.weight.device())?);
        }
        let w = self.weight.to_dtype(DType::F32)?;
        Ok(if self.transposed { w.t()?.contiguous()? } else { w })
    }

    /// DoRA's `‖W + s·B A‖` per output row, `[out]` f32, detached (HF `get_weight_norm`).
    pub fn dora_weight_norm(&self, ad: &LoraAdapter) -> Result<Tensor> {
        let lw = ad.b.as_tensor().detach().to_dtype(DType::F32)?.matmul(&ad.a.as_tensor().detach().to_dtype(DType::F32)?)?;
        let w = (self.weight_out_in_f32()? + (lw * ad.scaling)?)?;
        Ok(w.sqr()?.sum(1)?.sqrt()?)
    }

    /// DoRA's delta over the base output `y` (which includes the bias):
    /// `(m/‖·‖ - 1) ⊙ x Wᵀ + (m/‖·‖) ⊙ s · x Aᵀ Bᵀ`, with `x` dropped out while training.
    fn dora_delta(&self, x: &Tensor, y: &Tensor, ad: &LoraAdapter, mag: &Var, ctx: &LinearCtx) -> Result<Tensor> {
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

    fn lora_path(&self, x: &Tensor, ad: &LoraAdapter, ctx: &LinearCtx) -> Result<Tensor> {
        let mut xf = x.to_dtype(DType::F32)?;
        if ctx.train && ad.dropout > 0.0 {
            xf = dropout(&xf, ad.dropout, ctx.rng)?;
        }
        self.lora_path_no_dropout(&xf, ad, ctx)
    }

    /// `s · x Aᵀ Bᵀ` on an f32 input that is already dropped out.
    fn lora_path_no_dropout(&self, xf: &Tensor, ad: &LoraAdapter, ctx: &LinearCtx) -> Result<Tensor> {
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

    /// The `modules_to_save` copy of `name`, as a `(weight, bias)` pair: tracked tensors while
    /// training (they are trainable), detached otherwise.
    fn copy_params(&self, name: &str, train: bool) -> Option<(Tensor, Option<Tensor>)> {
        let (w, b) = self.saved_copies.get(name)?;
        let t = |v: &Var| if train { v.as_tensor().clone() } else { v.as_tensor().detach() };
        Some((t(w), b.as_ref().map(t)))
    }

    /// `y = x Wᵀ + b` with a possibly trainable `(W, b)` (a modules_to_save copy).
    fn linear_with(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let wt = if self.transposed { w.clone() } else { w.t()? };
        let dims = x.dims().to_vec();
        let m: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((m, dims[dims.len() - 1]))?.matmul(&wt)?;
        let y = match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = self.out_features();
        Ok(y.reshape(out)?)
    }

    /// The product of the active, unmerged (IA)³ vectors, flattened, with whether it scales the
    /// input (`None` when no such vector is active).
    fn ia3_scaling(&self, train: bool) -> Option<(Tensor, bool)> {
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

    /// Forward: `x` `[..., in]` (base dtype) → `[..., out]` (base dtype).
    pub fn forward(&self, x: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        if !self.saved_copies.is_empty() && !self.disabled {
            return self.forward_with_copies(x, ctx);
        }
        if !self.disabled && !self.ia3.is_empty() {
            if let Some((l, ff)) = self.ia3_scaling(ctx.train) {
                if ctx.rows.is_some() {
                    return Err(PeftError::invalid_arg("adapterNames", "per-row adapters (mixed batches) are available for LoRA adapters only"));
                }
                let dt = x.dtype();
                return Ok(if ff {
                    let xs = x.to_dtype(DType::F32)?.broadcast_mul(&l)?.to_dtype(dt)?;
                    self.base(&xs, self.bias_for(ctx.train).as_ref())?
                } else {
                    let y = self.base(x, self.bias_for(ctx.train).as_ref())?;
                    y.to_dtype(DType::F32)?.broadcast_mul(&l)?.to_dtype(dt)?
                });
            }
        }
        let mut y = self.base(x, self.bias_for(ctx.train).as_ref())?;
        if self.disabled || self.adapters.is_empty() {
            return Ok(y);
        }
        if let Some(rows) = ctx.rows {
            // Mixed batch: each row gets its own adapter's delta (or none).
            let b = x.dim(0)?;
            if rows.len() != b {
                return Err(PeftError::invalid_arg("adapterNames", format!("has {} names for a batch of {b} rows", rows.len())));
            }
            for (name, idx) in row_groups(rows, x.device())? {
                let Some(ad) = self.adapters.get(name) else { continue };
                if ad.magnitude.is_some() {
                    return Err(PeftError::invalid_arg("adapterNames", "Cannot pass `adapter_names` when DoRA is enabled."));
                }
                let sub = x.index_select(&idx, 0)?;
                let delta = self.lora_path(&sub, ad, ctx)?.to_dtype(y.dtype())?;
                y = y.index_add(&idx, &delta, 0)?;
            }
            return Ok(y);
        }
        for name in &self.active {
            if self.merged.contains(name) {
                continue;
            }
            if let Some(ad) = self.adapters.get(name) {
                let delta = match &ad.magnitude {
                    Some(m) => self.dora_delta(x, &y, ad, m, ctx)?,
                    None => self.lora_path(x, ad, ctx)?,
                };
                y = (y + delta.to_dtype(x.dtype())?)?;
            }
        }
        Ok(y)
    }

    /// Forward of a module with modules_to_save copies: the first active adapter that has a copy
    /// replaces the base parameters; in a mixed batch each row uses its own adapter's copy.
    fn forward_with_copies(&self, x: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        if let Some(rows) = ctx.rows {
            let mut y = self.base(x, self.bias_for(ctx.train).as_ref())?;
            for (name, idx) in row_groups(rows, x.device())? {
                let Some((w, b)) = self.copy_params(name, ctx.train) else { continue };
                let sub = x.index_select(&idx, 0)?;
                let delta = (self.linear_with(&sub, &w, b.as_ref())? - y.index_select(&idx, 0)?)?;
                y = y.index_add(&idx, &delta, 0)?;
            }
            return Ok(y);
        }
        match self.active.iter().find(|n| self.saved_copies.contains_key(*n)) {
            Some(name) => {
                let (w, b) = self.copy_params(name, ctx.train).expect("checked above");
                self.linear_with(x, &w, b.as_ref())
            }
            None => Ok(self.base(x, self.bias_for(ctx.train).as_ref())?),
        }
    }

    /// Add `scaling · B A` of each named adapter into the base weight (HF `merge`). Adapters
    /// already merged are skipped, so merging twice never adds a delta twice. With `safe`, the
    /// merged weight is checked for NaN/Inf before it replaces the old one.
    pub fn merge(&mut self, names: &[String], safe: bool) -> Result<()> {
        if names.iter().any(|n| !self.merged.contains(n)) {
            self.refuse_quantized("merge an adapter")?;
        }
        for name in names {
            if self.merged.contains(name) {
                continue;
            }
            if let Some(ia) = self.ia3.get(name) {
                self.merge_ia3(name, ia.clone(), safe)?;
                continue;
            }
            let Some(ad) = self.adapters.get(name).cloned() else { continue };
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
        }
        Ok(())
    }

    /// (IA)³ merge (HF `ia3.Linear.merge`): scale the weight's rows (output vectors; the bias too)
    /// or columns (feed-forward vectors) by `l`.
    fn merge_ia3(&mut self, name: &str, ad: Ia3Adapter, safe: bool) -> Result<()> {
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
    fn ia3_scaled(&self, ad: &Ia3Adapter, inverse: bool) -> Result<(Tensor, Option<Tensor>)> {
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

    /// Undo every merged adapter (HF `unmerge`), newest first: LoRA deltas are subtracted, DoRA
    /// weights divided by their merge factor, (IA)³ scalings divided out.
    pub fn unmerge(&mut self) -> Result<()> {
        while let Some(name) = self.merged.pop() {
            if let Some(ia) = self.ia3.get(&name).cloned() {
                let (w, b) = self.ia3_scaled(&ia, true)?;
                self.weight = w;
                self.bias = b;
                continue;
            }
            let ad = self.adapters.get(&name).cloned();
            let delta = self.delta_weight(&name)?;
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
        }
        Ok(())
    }
}

/// The rows of a mixed batch grouped by adapter name: `(name, row indices as a u32 tensor)`,
/// names sorted; base-model rows (`None`) are left out.
fn row_groups<'r>(rows: &'r RowAdapters, device: &candle_core::Device) -> Result<Vec<(&'r String, Tensor)>> {
    let mut names: Vec<&String> = rows.iter().flatten().collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let idx: Vec<u32> = rows.iter().enumerate().filter(|(_, r)| r.as_ref() == Some(name)).map(|(i, _)| i as u32).collect();
            let n = idx.len();
            Ok((name, Tensor::from_vec(idx, n, device)?))
        })
        .collect()
}

/// Inverted dropout with a seeded mask: `x · mask / (1 - p)`.
fn dropout(x: &Tensor, p: f64, rng: Option<&std::sync::Mutex<rand::rngs::StdRng>>) -> Result<Tensor> {
    // One seed per call from the step's generator, then a counter-based mask: the fused engine
    // draws the same seeds in the same order, so both paths drop the same elements.
    let seed = crate::engine::dropout_seed(rng);
    let mut mask = vec![0f32; x.elem_count()];
    crate::engine::dropout_mask(seed, p, &mut mask);
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
    Ok((x * mask)?)
}
