//! OFT layers (HF `oft.Linear` and its `OFTRotationModule`). For a base layer `y = x Wᵀ + b` with
//! `in` inputs split into `r` blocks of `k` (`r · k = in`), the adapter holds `oft_R` `[r, n]`
//! (`[1, n]` with `block_share`), `n = k (k - 1) / 2`: row `i` is the upper triangle (row-major,
//! HF's `triu_indices(k, k, 1)`) of a skew-symmetric `Q_i = U_i - U_iᵀ` `[k, k]`.
//!
//! - Each block's rotation `R_i` is the Cayley transform of `Q_i`: with `use_cayley_neumann`
//!   (HF's default) its truncated Neumann series with `t = num_cayley_neumann_terms` terms,
//!   `R = I + 2Q + 2Q² + … + 2Q^{t-2} + Q^{max(3, t-1)}` (HF `_cayley_batch`, term for term:
//!   `t = 5` gives `I + 2Q + 2Q² + 2Q³ + Q⁴`, `t = 3` and `t = 4` give `I + 2Q + 2Q² + Q³`,
//!   `t = 2` gives `I + 2Q`, `t ≤ 1` the identity); otherwise the exact `R = (I - Q)(I + Q)⁻¹`
//!   (HF `torch.linalg.solve(I + Q, I - Q, left=False)`).
//! - With `coft`, before every use each `Q_i` whose Frobenius norm exceeds `ε' = eps / √rows`
//!   (`rows` = the rows of `oft_R`) is scaled to norm `ε'`, and the projected values are written
//!   back into `oft_R` (HF `_project_batch` under `no_grad`, also during inference).
//! - Forward (HF `Linear.forward`): the input is rotated blockwise, `x'[..., i·k:(i+1)·k] =
//!   x[..., i·k:(i+1)·k] R_i`, then the base layer runs on `x'`: `y = x' Wᵀ + b = x R Wᵀ + b`
//!   with `R = blockdiag(R_0, …, R_{r-1})` `[in, in]`. Several active OFT adapters rotate in turn.
//! - Merge: `W ← W Rᵀ` (HF `(R Wᵀ)ᵀ`); unmerge: `W ← W (R⁻¹)ᵀ` (HF inverts `R`; the Neumann
//!   series is not exactly orthogonal, so the inverse, not the transpose).
//!
//! The exact transform solves on the host in f64 (per block, Gauss-Jordan with partial
//! pivoting); its gradient is `dR = -½ (I + R) dQ (I + R)` (since `(I + Q)⁻¹ = (I + R) / 2`),
//! supplied to autograd as `R - ½ (I + R)(Q - stop(Q))(I + R)` with `R` constant: the value is
//! `R` exactly, the derivative the transform's.
//!
//! Embeddings (HF `oft.Embedding`): for a table `W` `[num_embeddings, dim]` the blocks split the
//! embedding dimension (`r · k = dim`) and the looked-up rows are rotated, `y = W[ids] R` (HF's
//! forward: `oft_embedding_R(base_layer(x))`); the parameter is `oft_embedding_R` `[r, n]`.
//! Merge: `W ← W R` (HF `torch.mm(W, R)`, in place, so a tied output head sees it too); unmerge:
//! `W ← W R⁻¹`.
//!
//! HF 0.21 builds a `MultiplicativeDropoutLayer` for `module_dropout > 0` but its forward never
//! calls it, so `module_dropout` changes nothing, there or here.

use crate::error::{PeftError, Result};
use crate::tuners::layer::{AdapterLayer, Param, Slot};
use crate::tuners::linear::{LinearCtx, PeftLinear};
use candle_core::{DType, Device, Tensor, Var};

/// `<module>.oft_R.<adapter>.weight` in the model, `<module>.oft_R.weight` on disk.
pub const OFT_R: Slot = Slot::module("oft_R");
/// An embedding's rotation (HF `oft.Embedding.oft_embedding_R`):
/// `<module>.oft_embedding_R.<adapter>.weight` in the model, `<module>.oft_embedding_R.weight` on
/// disk.
pub const OFT_EMBEDDING_R: Slot = Slot::module("oft_embedding_R");
/// Every OFT slot (linear layers, embeddings).
pub const SLOTS: [Slot; 2] = [OFT_R, OFT_EMBEDDING_R];

/// One OFT adapter of one linear layer or embedding table.
#[derive(Debug, Clone)]
pub struct OftLayer {
    /// `oft_R` (`oft_embedding_R` on an embedding) `[rows, n]` (`rows` = `r`, or 1 with
    /// `block_share`), trainable.
    pub weight: Var,
    /// HF `oft.Embedding`: the looked-up rows `[..., dim]` are rotated (`r · block_size = dim`);
    /// otherwise (HF `oft.Linear`) the input `[..., in]`.
    pub embedding: bool,
    /// Blocks per layer (`in / block_size`, `dim / block_size` on an embedding).
    pub r: usize,
    /// `k`: the side of a block.
    pub block_size: usize,
    pub block_share: bool,
    pub coft: bool,
    pub eps: f64,
    pub use_cayley_neumann: bool,
    pub num_cayley_neumann_terms: usize,
    /// Kept for the status and the file (no effect, see the module docs).
    pub module_dropout: f64,
}

impl OftLayer {
    /// Number of free parameters of one block (`k (k - 1) / 2`).
    pub fn n_elements(block_size: usize) -> usize {
        block_size * block_size.saturating_sub(1) / 2
    }

    /// HF `_project_batch` (COFT): each row of `oft_R` whose skew matrix has a Frobenius norm
    /// above `eps / √rows` scaled to that norm, written back into the variable (f32 on the host;
    /// HF computes it in f32 too).
    fn project(&self) -> Result<()> {
        let w = self.weight.as_tensor();
        let (rows, n) = w.dims2()?;
        let dt = w.dtype();
        let mut v = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let eps = (self.eps as f32) / (rows as f32).sqrt();
        let mut changed = false;
        for row in v.chunks_mut(n.max(1)).take(rows) {
            // The skew matrix holds every entry twice (once negated).
            let norm = (2.0 * row.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>()).sqrt() as f32;
            if norm > eps {
                for x in row.iter_mut() {
                    *x = eps * (*x / norm);
                }
                changed = true;
            }
        }
        if changed {
            let t = Tensor::from_vec(v, (rows, n), w.device())?.to_dtype(dt)?;
            self.weight.set(&t)?;
        }
        Ok(())
    }

    /// The skew-symmetric matrices `Q` `[rows, k, k]` (f32) of the upper triangles `u` `[rows, n]`:
    /// `Q[i, a, b] = u[i, idx(a, b)]` above the diagonal, its negation below, 0 on it (one
    /// `index_select`, so gradients reach `u`).
    fn skew(u: &Tensor, k: usize) -> Result<Tensor> {
        let rows = u.dim(0)?;
        let n = Self::n_elements(k);
        // Columns: 0 → 0, 1..=n → u, n+1..=2n → -u.
        let z = Tensor::zeros((rows, 1), DType::F32, u.device())?;
        let ext = Tensor::cat(&[&z, u, &u.neg()?], 1)?;
        let mut idx = vec![0u32; k * k];
        let mut e = 0u32;
        for a in 0..k {
            for b in (a + 1)..k {
                idx[a * k + b] = 1 + e;
                idx[b * k + a] = 1 + n as u32 + e;
                e += 1;
            }
        }
        let idx = Tensor::from_vec(idx, k * k, u.device())?;
        Ok(ext.index_select(&idx, 1)?.reshape((rows, k, k))?)
    }

    /// `I` `[rows, k, k]` f32.
    fn eye(rows: usize, k: usize, device: &Device) -> Result<Tensor> {
        Ok(Tensor::eye(k, DType::F32, device)?.unsqueeze(0)?.broadcast_as((rows, k, k))?.contiguous()?)
    }

    /// The rotation blocks `R` `[rows, k, k]` f32 (HF `_cayley_batch`), after the COFT
    /// projection; tracked when `train`.
    pub fn rotation_blocks(&self, train: bool) -> Result<Tensor> {
        if self.coft {
            self.project()?;
        }
        let k = self.block_size;
        let w = if train { self.weight.as_tensor().clone() } else { self.weight.as_tensor().detach() };
        let u = w.to_dtype(DType::F32)?;
        let rows = u.dim(0)?;
        let q = Self::skew(&u, k)?;
        let eye = Self::eye(rows, k, u.device())?;
        if self.use_cayley_neumann {
            let t = self.num_cayley_neumann_terms;
            let mut r = eye;
            if t > 1 {
                r = (r + (&q * 2.0)?)?;
                if t > 2 {
                    let q2 = q.matmul(&q)?;
                    r = (r + (&q2 * 2.0)?)?;
                    let mut p = q2;
                    for _ in 3..t.saturating_sub(1) {
                        p = p.matmul(&q)?;
                        r = (r + (&p * 2.0)?)?;
                    }
                    p = p.matmul(&q)?;
                    r = (r + p)?;
                }
            }
            return Ok(r);
        }
        let qv = q.detach().flatten_all()?.to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(qv.len());
        for blk in qv.chunks(k * k).take(rows) {
            out.extend(cayley_exact(blk, k)?);
        }
        let rc = Tensor::from_vec(out, (rows, k, k), u.device())?;
        if !train {
            return Ok(rc);
        }
        // Autograd: value R, derivative -½ (I + R) dQ (I + R).
        let ipr = (&eye + &rc)?;
        let dq = (&q - q.detach())?;
        Ok((&rc - (ipr.matmul(&dq)?.matmul(&ipr)? * 0.5)?)?)
    }

    /// The blocks of the layer `[r, k, k]` (a shared block repeated `r` times).
    fn layer_blocks(&self, train: bool) -> Result<Tensor> {
        let b = self.rotation_blocks(train)?;
        if b.dim(0)? == self.r {
            return Ok(b);
        }
        Ok(b.broadcast_as((self.r, self.block_size, self.block_size))?.contiguous()?)
    }

    /// `blockdiag(R_0, …, R_{r-1})` `[in, in]` f32 of `blocks` `[r, k, k]` (HF `_block_diagonal`).
    fn block_diag(blocks: &Tensor) -> Result<Tensor> {
        let (r, k, _) = blocks.dims3()?;
        let mut rows = Vec::with_capacity(r);
        for i in 0..r {
            rows.push(blocks.get(i)?.pad_with_zeros(1, i * k, (r - 1 - i) * k)?);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// HF `get_delta_weight` (which returns the rotation, not a weight delta):
    /// `blockdiag(R_i)` `[in, in]` f32, COFT-projected first.
    pub fn rotation(&self) -> Result<Tensor> {
        Self::block_diag(&self.layer_blocks(false)?)
    }

    /// The rotated dimension of `lin`: its inputs, or an embedding table's `dim`.
    pub fn rotated_dim(lin: &PeftLinear) -> usize {
        if lin.is_embedding {
            lin.out_features()
        } else {
            lin.in_features()
        }
    }

    /// `x` `[..., in]` (the looked-up rows `[..., dim]` of an embedding) rotated blockwise
    /// (`x R`), in `x`'s dtype (HF `OFTRotationModule.forward`: computed in the weight's dtype).
    pub fn rotate(&self, lin: &PeftLinear, x: &Tensor, train: bool) -> Result<Tensor> {
        let inf = Self::rotated_dim(lin);
        let dims = x.dims().to_vec();
        if dims.last() != Some(&inf) || self.r * self.block_size != inf {
            return Err(PeftError::ShapeMismatch { name: "OFT input".into(), expected: vec![inf], found: dims });
        }
        let m: usize = dims[..dims.len() - 1].iter().product();
        let (r, k) = (self.r, self.block_size);
        let blocks = self.layer_blocks(train)?;
        let wdt = self.weight.dtype();
        let xb = x.to_dtype(wdt)?.to_dtype(DType::F32)?.reshape((m, r, k))?.transpose(0, 1)?.contiguous()?; // [r, m, k]
        let y = xb.matmul(&blocks)?.transpose(0, 1)?.contiguous()?.reshape(dims)?; // [m, r, k] → [..., in]
        Ok(y.to_dtype(wdt)?.to_dtype(x.dtype())?)
    }

    /// The base weight `[out, in]` f32 times `mat` `[in, in]` transposed, back in the base dtype and
    /// layout.
    fn weight_times_t(lin: &PeftLinear, mat: &Tensor) -> Result<Tensor> {
        let w = lin.weight_out_in_f32()?;
        let merged = mat.matmul(&w.t()?.contiguous()?)?.t()?; // (M Wᵀ)ᵀ = W Mᵀ
        let merged = if lin.transposed { merged.t()? } else { merged };
        Ok(merged.to_dtype(lin.weight.dtype())?.contiguous()?)
    }

    /// An embedding table `[num, dim]` (f32) times `mat` `[dim, dim]`, in the base dtype (HF
    /// `oft.Embedding.merge`: `torch.mm(W, R)`).
    fn table_times(lin: &PeftLinear, mat: &Tensor) -> Result<Tensor> {
        let w = lin.weight.to_dtype(DType::F32)?;
        Ok(w.matmul(mat)?.to_dtype(lin.weight.dtype())?.contiguous()?)
    }
}

/// `(I - Q)(I + Q)⁻¹` of one `k × k` block `q` (row-major f32), computed in f64: `A = I + Q`
/// inverted by Gauss-Jordan with partial pivoting (`I + Q` is invertible for a skew `Q`: its
/// eigenvalues are `1 + iλ`).
///
/// Errors: `Internal` for a singular pivot (a non-finite `Q`).
fn cayley_exact(q: &[f32], k: usize) -> Result<Vec<f32>> {
    let a: Vec<f64> = (0..k * k).map(|i| q[i] as f64 + if i / k == i % k { 1.0 } else { 0.0 }).collect();
    let inv = invert(&a, k).ok_or_else(|| PeftError::Internal("OFT: I + Q is singular (non-finite oft_R values?)".into()))?;
    let mut out = vec![0f32; k * k];
    for i in 0..k {
        for j in 0..k {
            let mut s = 0.0;
            for l in 0..k {
                let b = if i == l { 1.0 } else { 0.0 } - q[i * k + l] as f64;
                s += b * inv[l * k + j];
            }
            out[i * k + j] = s as f32;
        }
    }
    Ok(out)
}

/// The inverse of the `k × k` row-major matrix `a` (Gauss-Jordan, partial pivoting); `None` when
/// singular or not finite.
fn invert(a: &[f64], k: usize) -> Option<Vec<f64>> {
    let mut m = a.to_vec();
    let mut inv: Vec<f64> = (0..k * k).map(|i| if i / k == i % k { 1.0 } else { 0.0 }).collect();
    for c in 0..k {
        let p = (c..k).max_by(|&x, &y| m[x * k + c].abs().total_cmp(&m[y * k + c].abs()))?;
        let pv = m[p * k + c];
        if pv == 0.0 || !pv.is_finite() {
            return None;
        }
        if p != c {
            for j in 0..k {
                m.swap(p * k + j, c * k + j);
                inv.swap(p * k + j, c * k + j);
            }
        }
        for j in 0..k {
            m[c * k + j] /= pv;
            inv[c * k + j] /= pv;
        }
        for i in 0..k {
            if i != c {
                let f = m[i * k + c];
                if f != 0.0 {
                    for j in 0..k {
                        m[i * k + j] -= f * m[c * k + j];
                        inv[i * k + j] -= f * inv[c * k + j];
                    }
                }
            }
        }
    }
    Some(inv)
}

/// The inverse of each block of `blocks` `[r, k, k]` (f64 on the host, f32 result).
fn invert_blocks(blocks: &Tensor) -> Result<Tensor> {
    let (r, k, _) = blocks.dims3()?;
    let v = blocks.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(v.len());
    for blk in v.chunks(k * k).take(r) {
        let a: Vec<f64> = blk.iter().map(|x| *x as f64).collect();
        let inv = invert(&a, k).ok_or_else(|| PeftError::InvalidState("OFT: the rotation is singular, the adapter cannot be unmerged".into()))?;
        out.extend(inv.into_iter().map(|x| x as f32));
    }
    Ok(Tensor::from_vec(out, (r, k, k), blocks.device())?)
}

impl AdapterLayer for OftLayer {
    fn peft_type(&self) -> &'static str {
        "OFT"
    }
    fn module_type(&self) -> &'static str {
        if self.embedding {
            "oft.Embedding"
        } else {
            "oft.Linear"
        }
    }
    /// `"oft"`; `"oft.Embedding"` on an embedding (the bindings report the whole class, as for
    /// LoRA's `lora.Embedding`).
    fn adapter_kind(&self) -> &'static str {
        if self.embedding {
            "oft.Embedding"
        } else {
            "oft"
        }
    }
    fn params(&self) -> Vec<Param<'_>> {
        vec![(if self.embedding { OFT_EMBEDDING_R } else { OFT_R }, &self.weight)]
    }
    fn set_param(&mut self, slot: &Slot, v: Var) -> Result<()> {
        match (slot.name, self.embedding) {
            ("oft_R", false) | ("oft_embedding_R", true) => self.weight = v,
            (other, emb) => {
                let what = if emb { "embedding" } else { "linear layer" };
                return Err(PeftError::invalid_arg("slot", format!("an OFT {what} has no `{other}`")));
            }
        }
        Ok(())
    }
    /// `W Rᵀ - W` `[out, in]` f32 (an embedding: `(W R - W)ᵀ` `[dim, num]`): the change merging
    /// makes (merging itself uses [`AdapterLayer::merged_weight`]).
    fn delta_weight(&self, lin: &PeftLinear) -> Result<Tensor> {
        let w = lin.weight_out_in_f32()?;
        if self.embedding {
            // `w` is the table transposed, `[dim, num]`: (W R)ᵀ = Rᵀ Wᵀ.
            return Ok((self.rotation()?.t()?.matmul(&w)? - w)?);
        }
        Ok((w.matmul(&self.rotation()?.t()?)? - w)?)
    }
    /// `(x R - x) Wᵀ` (no bias): what the rotation adds to the base output. Embeddings rotate
    /// their looked-up rows instead ([`AdapterLayer::apply_embedding`]).
    ///
    /// Errors: `InvalidState` on an embedding.
    fn forward_delta(&self, lin: &PeftLinear, x: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        if self.embedding {
            return Err(PeftError::InvalidState("an OFT embedding rotates its looked-up rows; it has no linear forward".into()));
        }
        let d = (self.rotate(lin, x, ctx.train)? - x)?;
        Ok(lin.base(&d, None)?.to_dtype(DType::F32)?)
    }
    fn transform_input(&self, lin: &PeftLinear, x: &Tensor, ctx: &LinearCtx) -> Option<Result<Tensor>> {
        if self.embedding {
            return None;
        }
        Some(self.rotate(lin, x, ctx.train))
    }
    /// HF `oft.Embedding.forward`: the looked-up rows `y` `[..., dim]` rotated blockwise (`y R`).
    fn apply_embedding(&self, lin: &PeftLinear, _ids: &Tensor, y: Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        if !self.embedding {
            return Ok(y);
        }
        self.rotate(lin, &y, ctx.train)
    }
    /// The rotation acted on the input ([`AdapterLayer::transform_input`]): the output is the
    /// base layer's.
    fn apply(&self, _lin: &PeftLinear, _x: &Tensor, y: Tensor, _ctx: &LinearCtx) -> Result<Tensor> {
        Ok(y)
    }
    /// `W Rᵀ` (an embedding table: `W R`), in the base dtype and layout.
    fn merged_weight(&self, lin: &PeftLinear) -> Option<Result<Tensor>> {
        if self.embedding {
            return Some(self.rotation().and_then(|r| Self::table_times(lin, &r)));
        }
        Some(self.rotation().and_then(|r| Self::weight_times_t(lin, &r)))
    }
    /// `W R⁻ᵀ` (an embedding table: `W R⁻¹`, HF `torch.linalg.inv`).
    fn unmerged_weight(&self, lin: &PeftLinear) -> Option<Result<Tensor>> {
        let inv = self.layer_blocks(false).and_then(|b| invert_blocks(&b)).and_then(|b| Self::block_diag(&b));
        Some(inv.and_then(|inv| if self.embedding { Self::table_times(lin, &inv) } else { Self::weight_times_t(lin, &inv) }))
    }
    /// HF 0.21's `oft.Linear` and `oft.Embedding` have no per-row adapter hook (they ignore
    /// `adapter_names`).
    fn mixed_batch(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(k: usize, r: usize, neumann: bool, terms: usize, vals: Vec<f32>) -> OftLayer {
        let rows = vals.len() / OftLayer::n_elements(k);
        OftLayer {
            weight: Var::from_tensor(&Tensor::from_vec(vals, (rows, OftLayer::n_elements(k)), &Device::Cpu).unwrap()).unwrap(),
            embedding: false,
            r,
            block_size: k,
            block_share: rows == 1 && r > 1,
            coft: false,
            eps: 6e-5,
            use_cayley_neumann: neumann,
            num_cayley_neumann_terms: terms,
            module_dropout: 0.0,
        }
    }

    #[test]
    fn exact_cayley_is_orthogonal_and_matches_the_2x2_formula() {
        // Q = [[0, a], [-a, 0]]: R = (I - Q)(I + Q)⁻¹ = [[1 - a², -2a], [2a, 1 - a²]] / (1 + a²).
        let a = 0.3f32;
        let r = layer(2, 1, false, 5, vec![a]).rotation_blocks(false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d = 1.0 + a * a;
        let want = [(1.0 - a * a) / d, -2.0 * a / d, 2.0 * a / d, (1.0 - a * a) / d];
        for (x, y) in r.iter().zip(want) {
            assert!((x - y).abs() < 1e-6, "{r:?} vs {want:?}");
        }
    }

    #[test]
    fn neumann_series_follows_hf_term_count() {
        // 2x2, Q² = -a² I, Q³ = -a² Q, Q⁴ = a⁴ I.
        let a = 0.2f32;
        let get = |t: usize| layer(2, 1, true, t, vec![a]).rotation_blocks(false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (a2, a4) = (a * a, a * a * a * a);
        // t = 5: I + 2Q + 2Q² + 2Q³ + Q⁴ → diagonal 1 - 2a² + a⁴, [0][1] = 2a - 2a³.
        let r5 = get(5);
        assert!((r5[0] - (1.0 - 2.0 * a2 + a4)).abs() < 1e-6 && (r5[1] - (2.0 * a - 2.0 * a * a2)).abs() < 1e-6, "{r5:?}");
        // t = 3 and 4: I + 2Q + 2Q² + Q³ → diagonal 1 - 2a², [0][1] = 2a - a³.
        for t in [3, 4] {
            let r = get(t);
            assert!((r[0] - (1.0 - 2.0 * a2)).abs() < 1e-6 && (r[1] - (2.0 * a - a * a2)).abs() < 1e-6, "t={t}: {r:?}");
        }
        assert_eq!(get(1), vec![1.0, 0.0, 0.0, 1.0]);
        assert_eq!(get(2), vec![1.0, 2.0 * a, -2.0 * a, 1.0]);
    }

    #[test]
    fn exact_cayley_gradient_matches_finite_differences() {
        // L = Σ c ⊙ R(Q) over a 3x3 block; d L / d u by central differences vs autograd.
        let u = vec![0.3f32, -0.2, 0.5];
        let c = Tensor::from_vec(vec![1.0f32, -2.0, 0.5, 0.3, 1.5, -1.0, 2.0, 0.7, -0.4], (1, 3, 3), &Device::Cpu).unwrap();
        let l = layer(3, 1, false, 5, u.clone());
        let loss = (l.rotation_blocks(true).unwrap() * &c).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap().get(l.weight.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in 0..3 {
            let f = |h: f32| {
                let mut v = u.clone();
                v[i] += h;
                (layer(3, 1, false, 5, v).rotation_blocks(false).unwrap() * &c).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
            };
            let fd = (f(1e-3) - f(-1e-3)) / 2e-3;
            assert!((fd - g[i]).abs() < 2e-3, "d/du{i}: autograd {} vs finite differences {fd}", g[i]);
        }
    }

    #[test]
    fn rotation_round_trips_through_its_inverse() {
        let l = layer(3, 2, true, 5, vec![0.3, -0.2, 0.5, 0.1, 0.4, -0.6]);
        let b = l.layer_blocks(false).unwrap();
        let prod = b.matmul(&invert_blocks(&b).unwrap()).unwrap();
        let eye = OftLayer::eye(2, 3, &Device::Cpu).unwrap();
        let err = (prod - eye).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-5, "{err}");
        let full = OftLayer::block_diag(&b).unwrap();
        assert_eq!(full.dims(), [6, 6]);
        assert_eq!(full.get(0).unwrap().to_vec1::<f32>().unwrap()[3..], [0.0, 0.0, 0.0]);
    }
}
