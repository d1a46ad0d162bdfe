//! The trainable-tokens layer (HF `TrainableTokensLayer`, `peft/tuners/trainable_tokens/layer.py`).
//!
//! For a base table `W` `[rows, dim]` (an embedding `[num_embeddings, dim]`, or a linear
//! layer's weight `[out, in]`, whose rows are output features) and the adapter's token indices
//! `idx` (`k` of them), the adapter holds `delta` `[k, dim]` (HF `trainable_tokens_delta`,
//! trainable, f32) and the rows it replaces, `original` `[k, dim]` (HF
//! `trainable_tokens_original`, a buffer, not saved). With `W' = W.index_copy(0, idx, delta)`:
//!
//! - an embedding looks up `W'[ids]` (`[..., dim]`): the looked-up rows of `idx` are replaced by
//!   their `delta` rows, exactly (HF `F.embedding(x, W')`);
//! - a linear layer computes `x W'ᵀ` (HF `F.linear(x, W')`, the `lm_head` tied to the input
//!   embedding): the output columns of `idx` become `x deltaᵀ`;
//! - merging writes `W'` into the base (HF `index_copy`), unmerging writes `original` back (the
//!   rows are replaced, not added, so merge/unmerge is exact).
//!
//! A tied layer (HF `tied_adapter`: the `lm_head` sharing the input embedding's weight) uses the
//! embedding layer's `delta` (the same variable, so training updates both) and has no parameter
//! of its own: [`AdapterLayer::params`] is empty, and the standalone tuner saves its key from
//! [`TrainableTokensLayer::tied_delta`] (HF writes `lm_head.trainable_tokens_delta` too).

use crate::error::{PeftError, Result};
use crate::tuners::layer::{AdapterLayer, Param, Slot};
use crate::tuners::linear::{LinearCtx, PeftLinear};
use candle_core::{DType, Tensor, Var};
use std::sync::{Arc, RwLock};

/// The standalone tuner's slot: model `<m>.trainable_tokens_delta.<adapter>`, disk
/// `<m>.trainable_tokens_delta`.
pub const TRAINABLE_TOKENS_DELTA: Slot = Slot::param("trainable_tokens_delta");
/// LoRA's `trainable_token_indices` slot (HF `TrainableTokensWrapper.token_adapter`): model
/// `<m>.token_adapter.trainable_tokens_delta.<adapter>`, disk
/// `<m>.token_adapter.trainable_tokens_delta`.
pub const TOKEN_ADAPTER_DELTA: Slot = Slot::param("token_adapter.trainable_tokens_delta");
/// Every slot of the standalone tuner.
pub const SLOTS: [Slot; 1] = [TRAINABLE_TOKENS_DELTA];

/// One trainable-tokens adapter of one layer. See the module docs.
#[derive(Debug, Clone)]
pub struct TrainableTokensLayer {
    /// `[k, dim]` f32: the owner's parameter (for a tied layer, a copy of the owner's handle).
    pub delta: Var,
    /// The variable the forward reads, shared by the owner and its tied layers (so that loading
    /// or casting the owner's parameter reaches them).
    shared: Arc<RwLock<Var>>,
    /// `[k, dim]`, the base rows replaced (base dtype).
    pub original: Tensor,
    /// The rows replaced, in the order of `delta`'s rows.
    pub indices: Vec<u32>,
    /// `pos[row]` = the last position of `row` in `indices`, or `k` (no replacement).
    pos: Arc<Vec<u32>>,
    /// The layer's slot ([`TRAINABLE_TOKENS_DELTA`] or [`TOKEN_ADAPTER_DELTA`]).
    pub slot: Slot,
    /// Tied to another layer's adapter (no parameter of its own).
    pub tied: bool,
    /// Whether per-row adapters (mixed batches) may route rows here (HF: LoRA's wrapper does,
    /// the standalone tuner has no such hook).
    pub mixed_batch: bool,
}

impl TrainableTokensLayer {
    /// A layer over `lin` replacing rows `indices` with `delta` `[k, dim]` (f32).
    ///
    /// Errors: `InvalidAdapterConfig` for an index outside the table (HF's `IndexError`
    /// message, naming `token_indices`) or a transposed linear layer (GPT-2 `Conv1D`, which HF's
    /// forward refuses); `ShapeMismatch` for a `delta` of another shape.
    pub fn new(lin: &PeftLinear, indices: &[i64], delta: Var, slot: Slot, mixed_batch: bool) -> Result<Self> {
        check_target(lin)?;
        let (rows, dim) = lin.weight.dims2()?;
        let idx = checked_indices(indices, rows)?;
        if delta.dims() != [idx.len(), dim] {
            return Err(PeftError::ShapeMismatch { name: slot.name.into(), expected: vec![idx.len(), dim], found: delta.dims().to_vec() });
        }
        let original = original_rows(lin, &idx)?;
        let mut pos = vec![idx.len() as u32; rows];
        for (i, r) in idx.iter().enumerate() {
            pos[*r as usize] = i as u32;
        }
        Ok(TrainableTokensLayer { shared: Arc::new(RwLock::new(delta.clone())), delta, original, indices: idx, pos: Arc::new(pos), slot, tied: false, mixed_batch })
    }

    /// A layer on `lin` tied to `owner` (same indices, same variable; HF `tied_adapter`).
    pub fn tied_to(owner: &TrainableTokensLayer, lin: &PeftLinear) -> Result<Self> {
        check_target(lin)?;
        let mut l = owner.clone();
        l.original = original_rows(lin, &owner.indices)?;
        l.tied = true;
        Ok(l)
    }

    /// The variable the forward uses (the owner's, for a tied layer).
    pub fn current(&self) -> Var {
        self.shared.read().expect("trainable tokens lock").clone()
    }

    /// For a tied layer, the delta HF saves under this module's key too (the standalone tuner).
    pub fn tied_delta(&self) -> Option<Tensor> {
        self.tied.then(|| self.current().as_tensor().detach())
    }

    fn delta_as(&self, dtype: DType, train: bool) -> Result<Tensor> {
        let v = self.current();
        let t = if train { v.as_tensor().clone() } else { v.as_tensor().detach() };
        Ok(t.to_dtype(dtype)?)
    }

    /// `(positions, mask)` for rows `ids`: the row of `[delta; 0]` each id takes, and `1` where it
    /// is replaced.
    fn gather(&self, ids: &[u32], dtype: DType, device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
        let k = self.indices.len() as u32;
        let p: Vec<u32> = ids.iter().map(|i| self.pos.get(*i as usize).copied().unwrap_or(k)).collect();
        let keep: Vec<f32> = p.iter().map(|x| if *x == k { 1.0 } else { 0.0 }).collect();
        let n = p.len();
        Ok((Tensor::from_vec(p, n, device)?, Tensor::from_vec(keep, n, device)?.to_dtype(dtype)?))
    }

    /// `W` with rows `indices` replaced by `rows` `[k, dim]` (HF `index_copy`), in `W`'s dtype.
    fn with_rows(&self, lin: &PeftLinear, rows: &Tensor) -> Result<Tensor> {
        let w = lin.dense_weight()?;
        let (_, dim) = w.dims2()?;
        let dt = w.dtype();
        let mut data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let src = rows.to_dtype(dt)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (r, row) in self.indices.iter().zip(src) {
            data[*r as usize * dim..(*r as usize + 1) * dim].copy_from_slice(&row);
        }
        Ok(Tensor::from_vec(data, w.dims(), w.device())?.to_dtype(dt)?)
    }
}

fn check_target(lin: &PeftLinear) -> Result<()> {
    if lin.transposed && !lin.is_embedding {
        return Err(PeftError::InvalidAdapterConfig {
            path: None,
            msg: "TrainableTokensLayer wraps an unknown layer type, maybe you are targeting the wrong layer? (only embedding and `torch.nn.Linear` layers; GPT-2's `Conv1D` is not supported)".into(),
        });
    }
    Ok(())
}

/// `indices` as rows of a table of `rows` rows (HF indexes the weight with them).
///
/// Errors: `InvalidAdapterConfig` with HF's `IndexError` message, naming `token_indices`.
pub(crate) fn checked_indices(indices: &[i64], rows: usize) -> Result<Vec<u32>> {
    indices
        .iter()
        .map(|&i| {
            if i < 0 || i as usize >= rows {
                Err(PeftError::InvalidAdapterConfig { path: None, msg: format!("`token_indices`: index {i} is out of bounds for dimension 0 with size {rows}") })
            } else {
                Ok(i as u32)
            }
        })
        .collect()
}

/// The base rows `idx` of `lin`'s table `[k, dim]` (base dtype).
pub(crate) fn original_rows(lin: &PeftLinear, idx: &[u32]) -> Result<Tensor> {
    let w = lin.dense_weight()?;
    let t = Tensor::from_vec(idx.to_vec(), idx.len(), w.device())?;
    Ok(w.index_select(&t, 0)?.contiguous()?)
}

impl AdapterLayer for TrainableTokensLayer {
    fn peft_type(&self) -> &'static str {
        "TRAINABLE_TOKENS"
    }
    fn module_type(&self) -> &'static str {
        "TrainableTokensLayer"
    }
    /// Under LoRA (`trainable_token_indices`) HF wraps the table in a `TrainableTokensWrapper`
    /// and reports the layer as `<m>.token_adapter`.
    fn status_submodule(&self) -> Option<&'static str> {
        (self.slot == TOKEN_ADAPTER_DELTA).then_some("token_adapter")
    }
    fn params(&self) -> Vec<Param<'_>> {
        if self.tied {
            vec![]
        } else {
            vec![(self.slot, &self.delta)]
        }
    }
    fn set_param(&mut self, slot: &Slot, v: Var) -> Result<()> {
        if *slot != self.slot || self.tied {
            return Err(PeftError::invalid_arg("slot", format!("this trainable-tokens layer has no `{}`", slot.name)));
        }
        *self.shared.write().expect("trainable tokens lock") = v.clone();
        self.delta = v;
        Ok(())
    }
    /// `W' - W` `[rows, dim]` f32 (non-zero only on the replaced rows); merging uses
    /// [`AdapterLayer::merged_weight`] instead.
    fn delta_weight(&self, lin: &PeftLinear) -> Result<Tensor> {
        let w = lin.dense_weight()?;
        let merged = self.with_rows(lin, &self.delta_as(DType::F32, false)?)?;
        let d = (merged.to_dtype(DType::F32)? - w.to_dtype(DType::F32)?)?;
        Ok(if lin.transposed { d.t()?.contiguous()? } else { d })
    }
    fn forward_delta(&self, lin: &PeftLinear, x: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        let y = lin.base(x, None)?;
        let out = self.apply(lin, x, y.clone(), ctx)?;
        Ok((out.to_dtype(DType::F32)? - y.to_dtype(DType::F32)?)?)
    }
    /// `x W'ᵀ` from the base output `y`: the columns of `indices` become `x deltaᵀ`.
    fn apply(&self, _lin: &PeftLinear, x: &Tensor, y: Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        let dims = y.dims().to_vec();
        let out = *dims.last().expect("a non-scalar output");
        let m: usize = dims[..dims.len() - 1].iter().product();
        let dt = y.dtype();
        let xin = x.reshape((m, x.dim(x.rank() - 1)?))?.to_dtype(dt)?;
        let z = xin.matmul(&self.delta_as(dt, ctx.train)?.t()?)?; // [m, k]
        let z = Tensor::cat(&[z, Tensor::zeros((m, 1), dt, y.device())?], 1)?;
        let cols: Vec<u32> = (0..out as u32).collect();
        let (pos, keep) = self.gather(&cols, dt, y.device())?;
        let yr = y.reshape((m, out))?;
        let res = (yr.broadcast_mul(&keep.unsqueeze(0)?)? + z.index_select(&pos, 1)?)?;
        Ok(res.reshape(dims)?)
    }
    /// `W'[ids]`: the rows of `indices` among the looked-up rows `y` `[n, dim]` become their
    /// `delta` rows.
    fn apply_embedding(&self, _lin: &PeftLinear, ids: &Tensor, y: Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        let dims = y.dims().to_vec();
        let dim = *dims.last().expect("a non-scalar output");
        let dt = y.dtype();
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        let n = ids.len();
        let (pos, keep) = self.gather(&ids, dt, y.device())?;
        let table = Tensor::cat(&[self.delta_as(dt, ctx.train)?, Tensor::zeros((1, dim), dt, y.device())?], 0)?;
        let res = (y.reshape((n, dim))?.broadcast_mul(&keep.unsqueeze(1)?)? + table.index_select(&pos, 0)?)?;
        Ok(res.reshape(dims)?)
    }
    fn merged_weight(&self, lin: &PeftLinear) -> Option<Result<Tensor>> {
        Some(self.delta_as(DType::F32, false).and_then(|d| self.with_rows(lin, &d)))
    }
    fn unmerged_weight(&self, lin: &PeftLinear) -> Option<Result<Tensor>> {
        Some(self.with_rows(lin, &self.original))
    }
    fn replaced_rows(&self) -> Option<&[u32]> {
        Some(&self.indices)
    }
    fn mixed_batch(&self) -> bool {
        self.mixed_batch
    }
    fn mixed_delta(&self, lin: &PeftLinear, x: &Tensor, y: &Tensor, idx: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        let ys = y.index_select(idx, 0)?;
        Ok((self.apply(lin, x, ys.clone(), ctx)? - ys)?)
    }
}
