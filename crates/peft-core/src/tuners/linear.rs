//! The host layer of every tuner (HF `BaseTunerLayer` plus the wrapped base layer): a linear
//! layer (or embedding table) of the base model with the adapters each tuner adds to it.
//!
//! `y = f(x)` with the [`AdapterLayer`] of each active unmerged adapter applied in turn
//! ([`AdapterLayer::apply`]; by default `y += forward_delta(x)`), for example:
//! * LoRA / DoRA ([`crate::tuners::lora::layer`]): `y += scaling · (dropout(x) Aᵀ) Bᵀ`, or DoRA's
//!   magnitude-rescaled form;
//! * (IA)³ ([`crate::tuners::ia3::layer`], through [`AdapterLayer::forward_host`]):
//!   `y = (x Wᵀ + b) ⊙ l`, or `(x ⊙ l) Wᵀ + b` for feed-forward modules;
//! * weight-delta tuners (LoHa, LoKr, VeRA): `y += x ΔWᵀ`;
//! * a tuner that transforms the input instead (OFT: `y = f(x R)`) does so before the base
//!   product ([`AdapterLayer::transform_input`]);
//! * a `modules_to_save` copy (HF `ModulesToSaveWrapper`) replaces `(W, b)` while its adapter is
//!   active.
//!
//! The host names no tuner: every layer sits in [`PeftLinear::layers`], and code that needs a
//! tuner's own type uses that tuner's accessors (`PeftLinear::lora`, `PeftLinear::ia3`).
//! Every adapter's parameters are listed under HF's slot names by [`PeftLinear::adapter_params`],
//! which is what saving, loading, training, counting and casting use.

use super::layer::{AdapterLayer, Param, Slot};
use crate::error::{PeftError, Result};
use crate::ops::frozen_linear;
use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Per-row adapter choice of a mixed batch (`adapter_names` in HF): `None` = base model.
pub type RowAdapters = Arc<Vec<Option<String>>>;

/// A base linear layer plus its adapters. See the module docs.
#[derive(Debug, Clone)]
pub struct PeftLinear {
    /// Base weight: `[out, in]`, or `[in, out]` when `transposed` (GPT-2 `Conv1D`).
    pub weight: Tensor,
    /// Base bias `[out]`. A trainable variable while a LoRA adapter with `bias != "none"` trains
    /// it (HF `bias="all" | "lora_only"`); forward passes outside training detach it.
    pub bias: Option<Tensor>,
    /// Weight stored `[in, out]` (HF `fan_in_fan_out`).
    pub transposed: bool,
    /// Names of the adapters that take part in `forward`.
    pub active: Vec<String>,
    /// Names of the adapters whose delta is currently added into `weight`.
    pub merged: Vec<String>,
    /// When true, adapters are bypassed (HF `disable_adapters`).
    pub disabled: bool,
    /// `modules_to_save` copies per adapter: a trainable copy of (weight, bias) that replaces the
    /// base parameters while that adapter is active (HF `ModulesToSaveWrapper`). Kept in the base dtype.
    pub saved_copies: BTreeMap<String, (Var, Option<Var>)>,
    /// The tuner layer of each adapter here (any tuner, see [`AdapterLayer`]) per adapter name.
    pub layers: BTreeMap<String, Box<dyn AdapterLayer>>,
    /// An embedding table `[num_embeddings, dim]` (HF `lora.Embedding`), stored as a
    /// `transposed` layer with `in = num_embeddings`, `out = dim`: its LoRA `A` `[r, num]` and `B`
    /// `[dim, r]` are HF's `lora_embedding_A` / `lora_embedding_B`, and merging adds
    /// `(scaling · B A)ᵀ` to the table. Looked up with [`PeftLinear::forward_embedding`].
    pub is_embedding: bool,
    /// The base weight kept quantized (a GGUF base loaded with `quantization: 'keep'`,
    /// QLoRA-style): when set, the base product uses its kernels (`engine::quant`) and `weight` is only a
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
    /// Mixed batch: each row's scale of its LoRA adapter's delta (`None` = all 1; see
    /// `ForwardOptions::adapter_scales`).
    pub row_scales: Option<&'a Arc<Vec<f64>>>,
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
            active: vec![],
            merged: vec![],
            disabled: false,
            saved_copies: BTreeMap::new(),
            layers: BTreeMap::new(),
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
    pub(crate) fn base(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
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
    pub(crate) fn bias_for(&self, train: bool) -> Option<Tensor> {
        self.bias.as_ref().map(|b| if train { b.clone() } else { b.detach() })
    }

    /// Number of base parameters (weight and bias).
    pub fn base_param_count(&self) -> usize {
        self.weight.elem_count() + self.bias.as_ref().map(|b| b.elem_count()).unwrap_or(0)
    }

    /// The base weight as `[out, in]` f32.
    pub(crate) fn weight_out_in_f32(&self) -> Result<Tensor> {
        if let Some(q) = &self.quant {
            return Ok(Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), self.weight.device())?);
        }
        let w = self.weight.to_dtype(DType::F32)?;
        Ok(if self.transposed { w.t()?.contiguous()? } else { w })
    }

    /// The `modules_to_save` copy of `name`, as a `(weight, bias)` pair: tracked tensors while
    /// training (they are trainable), detached otherwise.
    pub(crate) fn copy_params(&self, name: &str, train: bool) -> Option<(Tensor, Option<Tensor>)> {
        let (w, b) = self.saved_copies.get(name)?;
        let t = |v: &Var| if train { v.as_tensor().clone() } else { v.as_tensor().detach() };
        Some((t(w), b.as_ref().map(t)))
    }

    /// `y = x Wᵀ + b` with a possibly trainable `(W, b)` (a modules_to_save copy).
    pub(crate) fn linear_with(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
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
        if self.disabled || self.layers.is_empty() {
            return self.base(x, self.bias_for(ctx.train).as_ref());
        }
        if let Some(y) = self.active_layers().find_map(|(_, l)| l.forward_host(self, x, ctx)) {
            return y;
        }
        // Tuners that transform the input (OFT) act before the base product, in activation order.
        let mut xin: Option<Tensor> = None;
        if ctx.rows.is_none() {
            for (_, l) in self.active_layers() {
                if let Some(t) = l.transform_input(self, xin.as_ref().unwrap_or(x), ctx) {
                    xin = Some(t?);
                }
            }
        }
        let y = self.base(xin.as_ref().unwrap_or(x), self.bias_for(ctx.train).as_ref())?;
        if let Some(rows) = ctx.rows {
            // Mixed batch: each row gets its own adapter's delta (or none).
            return self.add_row_deltas(y, rows, x.dim(0)?, ctx, |l, idx, y| l.mixed_delta(self, &x.index_select(idx, 0)?, y, idx, ctx));
        }
        self.through_active(y, |l, y| l.apply(self, x, y, ctx))
    }

    /// Embedding lookup (HF `lora.Embedding.forward`, `TrainableTokensLayer.forward`): `ids`
    /// `[b·s]` u32 → `[b, s, dim]` (base dtype): the table's rows (a modules_to_save copy's when
    /// an active adapter has one), then each active unmerged layer's
    /// [`AdapterLayer::apply_embedding`]. A mixed batch (`ctx.rows`) adds each row's own
    /// adapter ([`AdapterLayer::mixed_embedding_delta`]).
    ///
    /// Errors: `InvalidArgument` for a mixed batch with modules_to_save copies of the table, a
    /// row count that does not match, or a row naming a layer without mixed-batch support.
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
        let y = table.index_select(ids, 0)?.reshape((b, s, dim))?;
        if self.disabled || self.layers.is_empty() {
            return Ok(y);
        }
        if let Some(rows) = ctx.rows {
            let ids2 = ids.reshape((b, s))?;
            return self.add_row_deltas(y, rows, b, ctx, |l, idx, y| l.mixed_embedding_delta(self, &ids2.index_select(idx, 0)?, &y.index_select(idx, 0)?, ctx));
        }
        self.through_active(y, |l, y| l.apply_embedding(self, ids, y, ctx))
    }

    /// A mixed batch (HF `_mixed_batch_forward`) of [`Self::forward`] and
    /// [`Self::forward_embedding`]: for the rows of each adapter `rows` names, adds
    /// `delta(layer, idx, y)` (what that adapter's layer adds to rows `idx`, given the output `y`
    /// `[b, ...]` so far), scaled per row (`adapterScales`), in `y`'s dtype. Rows of
    /// `"__base__"` or of an adapter without a layer here get nothing.
    ///
    /// Errors: `InvalidArgument` naming `adapterNames` when `rows` does not hold `b` names or
    /// routes rows to a layer without mixed-batch support.
    fn add_row_deltas(&self, mut y: Tensor, rows: &RowAdapters, b: usize, ctx: &LinearCtx, delta: impl Fn(&dyn AdapterLayer, &Tensor, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        if rows.len() != b {
            return Err(PeftError::invalid_arg("adapterNames", format!("has {} names for a batch of {b} rows", rows.len())));
        }
        for (name, idx) in row_groups(rows, y.device())? {
            let Some(l) = self.layers.get(name) else { continue };
            if !l.mixed_batch() {
                return Err(mixed_refused(l.as_ref()));
            }
            let d = scale_rows(l.as_ref(), delta(l.as_ref(), &idx, &y)?, &idx, ctx)?;
            y = y.index_add(&idx, &d.to_dtype(y.dtype())?, 0)?;
        }
        Ok(y)
    }

    /// `y` through every active unmerged layer in activation order (`step`), once row-replacing
    /// layers active together are known not to share a row ([`Self::check_disjoint_rows`]).
    fn through_active(&self, mut y: Tensor, step: impl Fn(&dyn AdapterLayer, Tensor) -> Result<Tensor>) -> Result<Tensor> {
        if self.active.len() > 1 && self.replaces_rows() {
            self.check_disjoint_rows(&self.active)?;
        }
        for (_, l) in self.active_layers() {
            y = step(l, y)?;
        }
        Ok(y)
    }

    /// The layers of the active, unmerged adapters, in activation order.
    pub fn active_layers(&self) -> impl Iterator<Item = (&String, &dyn AdapterLayer)> {
        self.active.iter().filter(|n| !self.merged.contains(n)).filter_map(|n| self.layers.get(n).map(|l| (n, l.as_ref())))
    }

    /// Whether a layer here replaces rows of the base table ([`AdapterLayer::replaced_rows`]).
    fn replaces_rows(&self) -> bool {
        self.layers.values().any(|l| l.replaced_rows().is_some())
    }

    /// Forward of a module with modules_to_save copies: the first active adapter that has a copy
    /// replaces the base parameters; in a mixed batch each row uses its own adapter's copy.
    pub(crate) fn forward_with_copies(&self, x: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
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

    /// Merge each named adapter into the base weights (HF `merge`): each layer's
    /// [`AdapterLayer::merge_into`] (LoRA adds `scaling · B A`, DoRA rescales rows, (IA)³ scales
    /// rows or columns), else its [`AdapterLayer::merged_weight`] or `W + ΔW`. Adapters already
    /// merged are skipped, so merging twice never adds a delta twice. With `safe`, the merged
    /// weight is checked for NaN/Inf before it replaces the old one.
    ///
    /// Errors: `InvalidState` when `safe` finds NaN/Inf (the weights are then unchanged).
    pub fn merge(&mut self, names: &[String], safe: bool) -> Result<()> {
        // Only a layer that holds one of the adapters refuses (a quantized `lm_head` with no
        // adapter does not stop a merge of the layers' adapters).
        if names.iter().any(|n| self.has_adapter(n) && !self.merged.contains(n)) {
            self.refuse_quantized("merge an adapter")?;
        }
        if self.replaces_rows() {
            self.check_disjoint_rows(names)?;
        }
        for name in names {
            if self.merged.contains(name) {
                continue;
            }
            // The layer leaves the map while it edits the host, and comes back whatever happens.
            let Some(mut l) = self.layers.remove(name) else { continue };
            let done = self.merge_layer(name, l.as_mut(), safe);
            self.layers.insert(name.clone(), l);
            done?;
            self.merged.push(name.clone());
        }
        Ok(())
    }

    fn merge_layer(&mut self, name: &str, l: &mut dyn AdapterLayer, safe: bool) -> Result<()> {
        if let Some(done) = l.merge_into(self, name, safe) {
            return done;
        }
        let w = match l.merged_weight(self) {
            Some(w) => w?.to_dtype(DType::F32)?,
            None => {
                let delta = l.delta_weight(self)?;
                (self.weight.to_dtype(DType::F32)? + if self.transposed { delta.t()? } else { delta })?
            }
        };
        if safe && !w.sum_all()?.to_scalar::<f32>()?.is_finite() {
            return Err(PeftError::InvalidState(format!("NaNs or Infs detected in the merged weights; the adapter `{name}` seems broken")));
        }
        self.weight = w.to_dtype(self.weight.dtype())?.contiguous()?;
        Ok(())
    }

    /// Undo every merged adapter (HF `unmerge`), newest first: each layer's
    /// [`AdapterLayer::unmerge_from`] (LoRA deltas subtracted, DoRA weights divided by their
    /// merge factor, (IA)³ scalings divided out), else its [`AdapterLayer::unmerged_weight`] or
    /// `W − ΔW`.
    pub fn unmerge(&mut self) -> Result<()> {
        while let Some(name) = self.merged.pop() {
            let Some(mut l) = self.layers.remove(&name) else { continue };
            let done = self.unmerge_layer(l.as_mut());
            self.layers.insert(name, l);
            done?;
        }
        Ok(())
    }

    fn unmerge_layer(&mut self, l: &mut dyn AdapterLayer) -> Result<()> {
        if let Some(done) = l.unmerge_from(self) {
            return done;
        }
        self.weight = match l.unmerged_weight(self) {
            Some(w) => w?,
            None => {
                let delta = l.delta_weight(self)?;
                let w = (self.weight.to_dtype(DType::F32)? - if self.transposed { delta.t()? } else { delta })?;
                w.to_dtype(self.weight.dtype())?.contiguous()?
            }
        };
        Ok(())
    }

    /// HF `TrainableTokensLayer._check_overlapping_tokens`: the merged adapters and `names`
    /// (in that order, each once) whose layers replace rows ([`AdapterLayer::replaced_rows`])
    /// must replace disjoint rows.
    ///
    /// Errors: `InvalidState` with HF's message naming the first adapter that overlaps.
    pub fn check_disjoint_rows(&self, names: &[String]) -> Result<()> {
        let mut order: Vec<&String> = Vec::new();
        for n in self.merged.iter().chain(names) {
            if !order.contains(&n) {
                order.push(n);
            }
        }
        if order.len() <= 1 {
            return Ok(());
        }
        let mut seen = std::collections::HashSet::new();
        for n in order {
            let Some(rows) = self.layers.get(n).and_then(|l| l.replaced_rows()) else { continue };
            if rows.iter().any(|r| seen.contains(r)) {
                return Err(PeftError::InvalidState(format!(
                    "Token indices of adapter {n} are already defined and would result in undefined merging behavior. Only disjunct token indices are currently supported."
                )));
            }
            seen.extend(rows.iter().copied());
        }
        Ok(())
    }

    /// Whether adapter `name` has a tuner layer here (any tuner; `modules_to_save` copies aside).
    pub fn has_adapter(&self, name: &str) -> bool {
        self.layers.contains_key(name)
    }

    /// Whether any tuner layer is attached (`modules_to_save` copies aside).
    pub fn has_adapters(&self) -> bool {
        !self.layers.is_empty()
    }

    /// Every parameter adapter `name` holds in this layer, under HF's slot names (see
    /// [`Slot`]), in HF's state-dict order; `modules_to_save` copies are not included (see
    /// [`Self::saved_copies`]).
    pub fn adapter_params(&self, name: &str) -> Vec<Param<'_>> {
        self.layers.get(name).map(|l| l.params()).unwrap_or_default()
    }

    /// Replace the variable in `slot` of adapter `name` (loading, casting).
    ///
    /// Errors: `InvalidArgument` when the adapter has no such slot in this layer.
    pub fn set_adapter_param(&mut self, name: &str, slot: &Slot, v: Var) -> Result<()> {
        match self.layers.get_mut(name) {
            Some(l) => l.set_param(slot, v),
            None => Err(PeftError::invalid_arg("adapterName", format!("adapter `{name}` has no `{}` here", slot.name))),
        }
    }

    /// HF's class name of this layer once adapted (`lora.Linear`, `lora.Embedding`, `ia3.Linear`,
    /// ...: [`AdapterLayer::module_type`]), as `get_layer_status` reports it.
    pub fn tuner_module_type(&self) -> &'static str {
        self.layers.values().next().map(|l| l.module_type()).unwrap_or("Linear")
    }

    /// The kind of adapter `name`'s layer here, as the bindings report it
    /// ([`AdapterLayer::adapter_kind`]: `"lora"`, `"lora_embedding"`, `"ia3"`, `"loha"`, ...);
    /// `None` when the adapter has no tuner layer here.
    pub fn adapter_kind(&self, name: &str) -> Option<&'static str> {
        self.layers.get(name).map(|l| l.adapter_kind())
    }

    /// Names of the adapters with a tuner layer here (sorted, each once).
    pub fn tuner_adapter_names(&self) -> Vec<&String> {
        self.layers.keys().collect()
    }

    /// Every parameter of every adapter here: tuner slots and `modules_to_save` copies.
    pub fn all_adapter_vars(&self) -> Vec<&Var> {
        let mut out: Vec<&Var> = self.tuner_adapter_names().into_iter().flat_map(|n| self.adapter_params(n).into_iter().map(|(_, v)| v)).collect();
        for (w, b) in self.saved_copies.values() {
            out.push(w);
            out.extend(b.iter());
        }
        out
    }

    /// The `modules_to_save` copy of adapter `name` as `(parameter name, variable)`: `weight`
    /// and, when the layer has one, `bias`.
    pub fn saved_copy_params(&self, name: &str) -> Vec<(&'static str, &Var)> {
        match self.saved_copies.get(name) {
            Some((w, b)) => std::iter::once(("weight", w)).chain(b.iter().map(|b| ("bias", b))).collect(),
            None => vec![],
        }
    }

    /// Remove adapter `name` from this layer: its tuner layer and its `modules_to_save` copy.
    pub fn remove_adapter(&mut self, name: &str) {
        self.layers.remove(name);
        self.saved_copies.remove(name);
    }

    /// Remove every adapter (tuner layers, copies, merge and activation state).
    pub fn clear_adapters(&mut self) {
        self.saved_copies.clear();
        self.layers.clear();
        self.active.clear();
        self.merged.clear();
        self.disabled = false;
    }
}

/// The error for a mixed batch naming an adapter whose layer takes no per-row adapters.
pub(crate) fn mixed_refused(l: &dyn AdapterLayer) -> PeftError {
    PeftError::invalid_arg(
        "adapterNames",
        format!("per-row adapters (mixed batches) are not available for {} layers (HF PEFT 0.21's {} has no such hook and ignores `adapter_names`)", l.peft_type(), l.module_type()),
    )
}

/// A LoRA layer's mixed-batch delta for the batch rows `idx` (first dimension of `delta`), each
/// multiplied by its row's scale in `ctx.row_scales` (HF `set_scale` per row: the delta is
/// linear in the scaling). Other tuners' deltas are returned as they are (only LoRA has a
/// scale; `PeftModel::check_rows` refuses a scale other than 1 for their rows).
fn scale_rows(l: &dyn AdapterLayer, delta: Tensor, idx: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
    let Some(scales) = ctx.row_scales else { return Ok(delta) };
    if l.as_any().and_then(|a| a.downcast_ref::<crate::tuners::lora::layer::LoraAdapter>()).is_none() {
        return Ok(delta);
    }
    let f: Vec<f32> = idx.to_vec1::<u32>()?.iter().map(|&r| scales.get(r as usize).copied().unwrap_or(1.0) as f32).collect();
    if f.iter().all(|&x| x == 1.0) {
        return Ok(delta);
    }
    let mut shape = vec![1usize; delta.rank()];
    shape[0] = f.len();
    let f = Tensor::from_vec(f, shape, delta.device())?.to_dtype(delta.dtype())?;
    Ok(delta.broadcast_mul(&f)?)
}

/// The rows of a mixed batch grouped by adapter name: `(name, row indices as a u32 tensor)`,
/// names sorted; base-model rows (`None`) are left out.
pub(crate) fn row_groups<'r>(rows: &'r RowAdapters, device: &candle_core::Device) -> Result<Vec<(&'r String, Tensor)>> {
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
pub(crate) fn dropout(x: &Tensor, p: f64, rng: Option<&std::sync::Mutex<rand::rngs::StdRng>>) -> Result<Tensor> {
    // One seed per call from the step's generator, then a counter-based mask: the fused engine
    // draws the same seeds in the same order, so both paths drop the same elements.
    let seed = crate::engine::dropout_seed(rng);
    let mut mask = vec![0f32; x.elem_count()];
    crate::engine::dropout_mask(seed, p, &mut mask);
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
    Ok((x * mask)?)
}
