//! A linear layer of the base model that can carry LoRA adapters.
//!
//! `y = x Wᵀ + b + Σ_{a ∈ active, not merged} scaling_a · (dropout(x) A_aᵀ) B_aᵀ`
//! (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; HF PEFT's
//! `lora.Linear`). `A_a`: `[r, in]` (`lora_A`), `B_a`: `[out, r]` (`lora_B`), kept in f32
//! (HF's `autocast_adapter_dtype`); the low-rank path runs in f32 and is cast to the base dtype.

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
}

/// Per-row adapter choice of a mixed batch (`adapter_names` in HF): `None` = base model.
pub type RowAdapters = Arc<Vec<Option<String>>>;

/// A base linear layer plus its LoRA adapters. See the module docs.
#[derive(Debug, Clone)]
pub struct PeftLinear {
    /// Base weight: `[out, in]`, or `[in, out]` when `transposed` (GPT-2 `Conv1D`).
    pub weight: Tensor,
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
        PeftLinear { weight, bias, transposed, adapters: BTreeMap::new(), active: vec![], merged: vec![], disabled: false, saved_copies: BTreeMap::new() }
    }

    pub fn in_features(&self) -> usize {
        let d = self.weight.dims();
        if self.transposed { d[0] } else { d[1] }
    }

    pub fn out_features(&self) -> usize {
        let d = self.weight.dims();
        if self.transposed { d[1] } else { d[0] }
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
        Ok((ad.b.as_tensor().matmul(ad.a.as_tensor())? * ad.scaling)?)
    }

    fn lora_path(&self, x: &Tensor, ad: &LoraAdapter, ctx: &LinearCtx) -> Result<Tensor> {
        let mut xf = x.to_dtype(DType::F32)?;
        if ctx.train && ad.dropout > 0.0 {
            xf = dropout(&xf, ad.dropout, ctx.rng)?;
        }
        let dims = xf.dims().to_vec();
        let m: usize = dims[..dims.len() - 1].iter().product();
        let x2 = xf.reshape((m, dims[dims.len() - 1]))?;
        // Outside training the adapter weights are detached so no autograd graph is kept
        // (a KV cache would otherwise pin every step's graph).
        let (a, b) = if ctx.train {
            (ad.a.as_tensor().clone(), ad.b.as_tensor().clone())
        } else {
            (ad.a.as_tensor().detach(), ad.b.as_tensor().detach())
        };
        let h = (x2.matmul(&a.t()?)? * ad.scaling)?;
        let y = h.matmul(&b.t()?)?;
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

    /// Forward: `x` `[..., in]` (base dtype) → `[..., out]` (base dtype).
    pub fn forward(&self, x: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        if !self.saved_copies.is_empty() && !self.disabled {
            return self.forward_with_copies(x, ctx);
        }
        let mut y = frozen_linear(x, &self.weight, self.bias.as_ref(), self.transposed)?;
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
                let delta = self.lora_path(x, ad, ctx)?;
                y = (y + delta.to_dtype(x.dtype())?)?;
            }
        }
        Ok(y)
    }

    /// Forward of a module with modules_to_save copies: the first active adapter that has a copy
    /// replaces the base parameters; in a mixed batch each row uses its own adapter's copy.
    fn forward_with_copies(&self, x: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        if let Some(rows) = ctx.rows {
            let mut y = frozen_linear(x, &self.weight, self.bias.as_ref(), self.transposed)?;
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
            None => Ok(frozen_linear(x, &self.weight, self.bias.as_ref(), self.transposed)?),
        }
    }

    /// Add `scaling · B A` of each named adapter into the base weight (HF `merge`). Adapters
    /// already merged are skipped, so merging twice never adds a delta twice. With `safe`, the
    /// merged weight is checked for NaN/Inf before it replaces the old one.
    pub fn merge(&mut self, names: &[String], safe: bool) -> Result<()> {
        for name in names {
            if self.merged.contains(name) || !self.adapters.contains_key(name) {
                continue;
            }
            let delta = self.delta_weight(name)?;
            let delta = if self.transposed { delta.t()? } else { delta };
            let w = (self.weight.to_dtype(DType::F32)? + delta)?;
            if safe {
                let s = w.sum_all()?.to_scalar::<f32>()?;
                if !s.is_finite() {
                    return Err(PeftError::InvalidState(format!(
                        "NaNs or Infs detected in the merged weights; the adapter `{name}` seems broken"
                    )));
                }
            }
            self.weight = w.to_dtype(self.weight.dtype())?.contiguous()?;
            self.merged.push(name.clone());
        }
        Ok(())
    }

    /// Subtract the deltas of all merged adapters (HF `unmerge`), newest first.
    pub fn unmerge(&mut self) -> Result<()> {
        while let Some(name) = self.merged.pop() {
            let delta = self.delta_weight(&name)?;
            let delta = if self.transposed { delta.t()? } else { delta };
            let w = (self.weight.to_dtype(DType::F32)? - delta)?;
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
    use rand::Rng;
    let n = x.elem_count();
    let scale = 1.0 / (1.0 - p) as f32;
    let mask: Vec<f32> = match rng {
        Some(r) => {
            let mut r = r.lock().map_err(|_| PeftError::Internal("rng lock poisoned".into()))?;
            (0..n).map(|_| if r.random::<f64>() < p { 0.0 } else { scale }).collect()
        }
        None => {
            let mut r = rand::rng();
            (0..n).map(|_| if r.random::<f64>() < p { 0.0 } else { scale }).collect()
        }
    };
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
    Ok((x * mask)?)
}
