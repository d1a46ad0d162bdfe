//! Tensor building blocks with the gradient behaviour PEFT training needs.
//!
//! candle's backward pass of `matmul` computes the gradient of *both* operands, also when one
//! is a frozen weight, which doubles the cost of every frozen linear layer in a LoRA backward
//! pass. [`frozen_linear`] is a custom op whose backward only produces the input gradient
//! (`dL/dx = dL/dy · W`), the frozen weight receives none. Several fused candle ops have no
//! backward at all (`softmax_last_dim`, `rms_norm`, `rope`): on their own they would cut the
//! gradient silently. The functions here run them on a detached input and, when training,
//! connect the result to the input through [`attach`] with a hand-written backward (checked
//! against the differentiable compositions in this module's tests and by the HF gradient fixture).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, D};

/// `y = x · Wᵀ (+ bias)` with a frozen `W`.
///
/// * `x`: `[..., in]`, any float dtype equal to `w`'s.
/// * `w`: `[out, in]` (the `nn.Linear` layout), or `[in, out]` when `transposed` is true
///   (GPT-2's `Conv1D` layout, HF's `fan_in_fan_out`).
/// * `bias`: `[out]`.
///
/// Returns `[..., out]`. Gradients flow to `x` only.
pub fn frozen_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, transposed: bool) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().expect("rank >= 1");
    let out_dim = if transposed { w.dim(1)? } else { w.dim(0)? };
    let m: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((m, in_dim))?;
    let y = if x2.track_op() {
        x2.apply_op1(FrozenMatmul { w: w.clone(), transposed })?
    } else {
        let wt = if transposed { w.clone() } else { w.t()? };
        x2.matmul(&wt)?
    };
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = out_dim;
    y.reshape(out_dims)
}

/// Custom op `x[m, k] · Wᵀ` whose backward yields the gradient of `x` only.
struct FrozenMatmul {
    w: Tensor,
    transposed: bool,
}

impl FrozenMatmul {
    /// The weight as a `[k, n]` operand (view, no copy).
    fn rhs(&self) -> candle_core::Result<Tensor> {
        if self.transposed {
            Ok(self.w.clone())
        } else {
            self.w.t()
        }
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let rhs = self.rhs()?;
        let n = rhs.dim(1)?;
        let (w_storage, w_layout) = rhs.storage_and_layout();
        let w_cpu = match &*w_storage {
            Storage::Cpu(s) => s,
            _ => candle_core::bail!("frozen-matmul: weight and input are on different devices"),
        };
        let out = storage.matmul(w_cpu, (1, m, n, k), layout, w_layout)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let rhs = self.rhs()?;
        let n = rhs.dim(1)?;
        let (w_storage, w_layout) = rhs.storage_and_layout();
        let w_cuda = match &*w_storage {
            Storage::Cuda(s) => s,
            _ => candle_core::bail!("frozen-matmul: weight and input are on different devices"),
        };
        let out = storage.matmul(w_cuda, (1, m, n, k), layout, w_layout)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dL/dx = dL/dy · W  with W as [n, k].
        let w_nk = if self.transposed { self.w.t()? } else { self.w.clone() };
        Ok(Some(grad_res.matmul(&w_nk)?))
    }
}

/// `y = x · Wᵀ (+ bias)` with a frozen `W` kept quantized ([`crate::engine::quant::QuantWeight`],
/// QLoRA-style): `x` `[..., in]` (any float dtype, computed in f32), `bias` `[out]`; returns
/// `[..., out]` in f32. The forward quantizes `x` to 8 bits per block of 32 and uses the integer
/// kernels (error bound in [`crate::engine::quant`]); the backward yields `dL/dx = dL/dy · W`
/// through dequantized panels (exact up to f32 rounding), and `W` receives no gradient.
pub fn quant_linear(x: &Tensor, w: &std::sync::Arc<crate::engine::quant::QuantWeight>, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().ok_or_else(|| candle_core::Error::Msg("quant_linear: scalar input".into()))?;
    if in_dim != w.cols() {
        candle_core::bail!("quant_linear {}: input has {in_dim} features, the weight {}", w.name(), w.cols());
    }
    let m: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.to_dtype(DType::F32)?.reshape((m, in_dim))?;
    let y = x2.apply_op1(QuantMatmul { w: w.clone(), grad: false })?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
        None => y,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = w.rows();
    y.reshape(out_dims)
}

/// `x[m, in] · Wᵀ` (`grad == false`) or `g[m, out] · W` (`grad == true`, the input gradient)
/// on a quantized frozen weight.
struct QuantMatmul {
    w: std::sync::Arc<crate::engine::quant::QuantWeight>,
    grad: bool,
}

impl CustomOp1 for QuantMatmul {
    fn name(&self) -> &'static str {
        if self.grad {
            "quant-matmul-grad"
        } else {
            "quant-matmul"
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let x = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("{}: needs a contiguous f32 input", self.name()),
        };
        let n = if self.grad { self.w.cols() } else { self.w.rows() };
        let mut y = vec![0f32; m * n];
        let r = if self.grad { self.w.matmul(x, m, &mut y, false) } else { self.w.matmul_t(x, m, &mut y, false) };
        r.map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let _ = k;
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if self.grad {
            candle_core::bail!("quant-matmul-grad: no second-order gradient");
        }
        Ok(Some(grad_res.contiguous()?.apply_op1(QuantMatmul { w: self.w.clone(), grad: true })?))
    }
}

/// RMSNorm as in transformers' `LlamaRMSNorm`: `y = w · (x / sqrt(mean(x², -1) + eps))`.
///
/// `x`: `[..., hidden]`, `w`: `[hidden]` (frozen). With `train`, the fused f32 kernel runs the
/// forward and an attached backward yields `dL/dx = r·(g·w − x·r²·mean(g·w·x))`,
/// `r = 1/sqrt(mean(x²)+eps)`. Non-f32 inputs are computed in f32 like transformers.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, train: bool) -> candle_core::Result<Tensor> {
    if x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
        return normed.to_dtype(dtype)?.broadcast_mul(w);
    }
    let xd = x.detach().contiguous()?;
    let out = candle_nn::ops::rms_norm(&xd, w, eps as f32)?;
    if !train || !x.track_op() {
        return Ok(out);
    }
    let w = w.clone();
    attach(x, out, move |g| {
        let r = (xd.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let gw = g.broadcast_mul(&w)?;
        let m = (&gw * &xd)?.mean_keepdim(D::Minus1)?;
        let inner = (gw - xd.broadcast_mul(&(r.sqr()? * m)?)?)?;
        inner.broadcast_mul(&r)
    })
}

/// LayerNorm as in `torch.nn.LayerNorm` (GPT-2's `ln_1`, `ln_2`, `ln_f`):
/// `y = w · (x − mean(x)) / sqrt(var(x) + eps) + b`, biased variance over the last dimension.
///
/// * `x`: `[..., hidden]`; `w`, `b`: `[hidden]` (same dtype as `x`).
///
/// The weight is frozen. With `train` the fused f32 kernel runs the forward and an attached
/// backward yields `dL/dx = r · (g·w − mean(g·w) − x̂ · mean(g·w·x̂))` (`x̂ = (x − μ)·r`,
/// `r = 1/sqrt(var + eps)`); the bias is added outside the kernel so that a trainable bias
/// (LoRA `bias: "all"`) receives `dL/db = Σ g`. Non-f32 inputs are computed in f32 like torch's
/// autocast does and cast back.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64, train: bool) -> candle_core::Result<Tensor> {
    let b = &if train { b.clone() } else { b.detach() };
    if x.dtype() != DType::F32 {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let mu = xf.mean_keepdim(D::Minus1)?;
        let xc = xf.broadcast_sub(&mu)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
        let y = normed.broadcast_mul(&w.to_dtype(DType::F32)?)?.broadcast_add(&b.to_dtype(DType::F32)?)?;
        return y.to_dtype(dtype);
    }
    let xd = x.detach().contiguous()?;
    if !train || !x.track_op() {
        if !train || !b.track_op() {
            return candle_nn::ops::layer_norm(&xd, w, &b.detach(), eps as f32);
        }
    }
    let zeros = w.zeros_like()?;
    let out = candle_nn::ops::layer_norm(&xd, w, &zeros, eps as f32)?;
    let out = if x.track_op() {
        let w = w.clone();
        attach(x, out, move |g| {
            let mu = xd.mean_keepdim(D::Minus1)?;
            let xc = xd.broadcast_sub(&mu)?;
            let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
            let xhat = xc.broadcast_mul(&r)?;
            let gw = g.broadcast_mul(&w)?;
            let m1 = gw.mean_keepdim(D::Minus1)?;
            let m2 = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
            let inner = (gw.broadcast_sub(&m1)? - xhat.broadcast_mul(&m2)?)?;
            inner.broadcast_mul(&r)
        })?
    } else {
        out
    };
    out.broadcast_add(b)
}

/// An op whose forward result `out` was computed by a fused kernel (without graph) and whose
/// backward is `bwd(dL/dout) = dL/dx`. Connects `out` to `x` in the autograd graph.
fn attach(
    x: &Tensor,
    out: Tensor,
    bwd: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> candle_core::Result<Tensor> {
    x.apply_op1(Attached { out, bwd: Box::new(bwd) })
}

type BwdFn = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

struct Attached {
    out: Tensor,
    bwd: BwdFn,
}

impl CustomOp1 for Attached {
    fn name(&self) -> &'static str {
        "attached-fused"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self.out.contiguous()?;
        let (st, l) = out.storage_and_layout();
        match &*st {
            Storage::Cpu(cs) if l.start_offset() == 0 && l.shape().elem_count() == cs_len(cs) => Ok((cs.clone(), l.shape().clone())),
            Storage::Cpu(_) => {
                let flat = out.flatten_all()?.to_vec1::<f32>()?;
                Ok((CpuStorage::F32(flat), l.shape().clone()))
            }
            _ => candle_core::bail!("attached-fused: device mismatch"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _s: &candle_core::CudaStorage, _l: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = self.out.contiguous()?.copy()?;
        let (st, l) = out.storage_and_layout();
        match &*st {
            Storage::Cuda(cs) => Ok((cs.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("attached-fused: device mismatch"),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some((self.bwd)(grad_res)?))
    }
}

fn cs_len(cs: &CpuStorage) -> usize {
    match cs {
        CpuStorage::F32(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        CpuStorage::F64(v) => v.len(),
        _ => usize::MAX,
    }
}

/// Softmax over the last dimension: the fused kernel, with an attached backward when training
/// (`dL/dx = y · (g − Σ g·y)`).
pub fn softmax_last(x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
    let out = candle_nn::ops::softmax_last_dim(&x.detach().contiguous()?)?;
    if !train || !x.track_op() {
        return Ok(out);
    }
    let y = out.clone();
    attach(x, out, move |g| {
        let s = (g * &y)?.sum_keepdim(D::Minus1)?;
        &y * g.broadcast_sub(&s)?
    })
}

/// Rotary position embedding, the "rotate_half" (GPT-NeoX / HF Llama) form:
/// `x · cos + rotate_half(x) · sin`.
///
/// * `x`: `[b, heads, s, head_dim]`
/// * `cos`, `sin`: `[b, s, head_dim / 2]` (one row of angles per position, `θ_i = pos / theta^(2i/d)`).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, train: bool) -> candle_core::Result<Tensor> {
    if x.dtype() == cos.dtype() {
        let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
        let out = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, &cos, &sin)?;
        if !train || !x.track_op() {
            return Ok(out);
        }
        // The rotation's transpose is the rotation by −θ: dL/dx = rope(g, cos, −sin).
        let neg_sin = sin.neg()?;
        return attach(x, out, move |g| candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &neg_sin));
    }
    let (b, _h, s, d) = x.dims4()?;
    let half = d / 2;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.reshape((b, 1, s, d))?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.reshape((b, 1, s, d))?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Mean cross-entropy of causal-LM logits against labels, with HF's shift and ignore index
/// (transformers' `ForCausalLMLoss`): `logits[:, :-1]` are scored against `labels[:, 1:]` when
/// `shift` is true; labels `< 0` (HF's `-100`) or outside the vocabulary are ignored.
///
/// * `logits`: `[b, s, vocab]`, any float dtype (computed in f32)
/// * `labels`: `b × s` values, row-major
///
/// Returns the scalar mean over the scored positions and their count. The loss is one fused op
/// (log-sum-exp per row in the forward, `softmax − one_hot` in the backward), so no
/// vocabulary-sized intermediate is kept in the autograd graph.
pub fn causal_lm_loss(logits: &Tensor, labels: &[i64], b: usize, s: usize, shift: bool) -> candle_core::Result<(Tensor, usize)> {
    let vocab = logits.dim(D::Minus1)?;
    let offset = usize::from(shift);
    let mut targets = vec![0u32; b * s];
    let mut weights = vec![0f32; b * s];
    let mut n = 0usize;
    for bi in 0..b {
        for si in 0..s.saturating_sub(offset) {
            let l = labels[bi * s + si + offset];
            if l >= 0 && (l as usize) < vocab {
                targets[bi * s + si] = l as u32;
                weights[bi * s + si] = 1.0;
                n += 1;
            }
        }
    }
    let scale = 1.0 / n.max(1) as f32;
    weights.iter_mut().for_each(|w| *w *= scale);
    let logits = logits.reshape((b * s, vocab))?.to_dtype(DType::F32)?.contiguous()?;
    let loss = logits.apply_op1(CrossEntropy { targets: std::sync::Arc::new(targets), weights: std::sync::Arc::new(weights) })?;
    Ok((loss, n))
}

/// Weighted cross-entropy `Σ_i w_i · (logsumexp(x_i) − x_i,t_i)` over the rows of `logits`
/// `[n, vocab]` (any float dtype, computed in f32; one fused op, as [`causal_lm_loss`]); rows
/// with weight 0 are skipped. `targets` and `weights` have `n` entries, every target below
/// `vocab`. Used by losses that weight tokens (CPT's decayed loss).
pub fn weighted_cross_entropy(logits: &Tensor, targets: Vec<u32>, weights: Vec<f32>) -> candle_core::Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    if targets.len() != n || weights.len() != n || targets.iter().any(|&t| t as usize >= vocab) {
        candle_core::bail!("weighted_cross_entropy: {n} rows of {vocab} logits, {} targets, {} weights", targets.len(), weights.len());
    }
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    logits.apply_op1(CrossEntropy { targets: std::sync::Arc::new(targets), weights: std::sync::Arc::new(weights) })
}

/// Fused weighted cross-entropy over rows of `[n, vocab]` f32 logits: `Σ_i w_i · (lse_i − x_i,t_i)`.
struct CrossEntropy {
    targets: std::sync::Arc<Vec<u32>>,
    weights: std::sync::Arc<Vec<f32>>,
}

/// `log Σ exp(row)`, with the sum of exponentials accumulated in f64 (a vocabulary-long f32
/// sum loses ~1e-5 relative, visible in the loss).
fn row_lse(row: &[f32]) -> f32 {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    let s: f64 = row.iter().map(|&x| (x - m).exp() as f64).sum();
    (m as f64 + s.ln()) as f32
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (n, v) = layout.shape().dims2()?;
        let data = match storage {
            CpuStorage::F32(d) => &d[layout.start_offset()..layout.start_offset() + n * v],
            _ => candle_core::bail!("cross-entropy: f32 logits expected"),
        };
        let total: f64 = data
            .par_chunks(v)
            .enumerate()
            .map(|(i, row)| {
                let w = self.weights[i];
                if w == 0.0 { 0.0 } else { (w * (row_lse(row) - row[self.targets[i] as usize])) as f64 }
            })
            .sum();
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        use rayon::prelude::*;
        let (n, v) = arg.dims2()?;
        let g = grad_res.to_dtype(DType::F32)?.to_vec0::<f32>()?;
        let x = arg.detach().to_device(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; n * v];
        out.par_chunks_mut(v).zip(x.par_chunks(v)).enumerate().for_each(|(i, (o, row))| {
            let w = self.weights[i] * g;
            if w == 0.0 {
                return;
            }
            let lse = row_lse(row);
            for (oj, &xj) in o.iter_mut().zip(row) {
                *oj = w * (xj - lse).exp();
            }
            o[self.targets[i] as usize] -= w;
        });
        Ok(Some(Tensor::from_vec(out, (n, v), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| r.random_range(-1.0f32..1.0)).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
    }

    /// Gradient of `sum(f(x) * probe)` w.r.t. `x`.
    fn grad_of(f: impl Fn(&Tensor) -> Tensor, x: &Tensor, probe: &Tensor) -> (Tensor, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = f(v.as_tensor());
        let loss = (&y * probe).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        (y.detach(), g.get(v.as_tensor()).unwrap().clone())
    }

    #[test]
    fn fused_ops_have_the_composition_gradients() {
        let x = rand(&[2, 3, 5, 8], 1);
        let probe = rand(&[2, 3, 5, 8], 2);
        // softmax
        let (y1, g1) = grad_of(|x| softmax_last(x, true).unwrap(), &x, &probe);
        let (y2, g2) = grad_of(|x| candle_nn::ops::softmax(x, D::Minus1).unwrap(), &x, &probe);
        assert!(max_diff(&y1, &y2) < 1e-6 && max_diff(&g1, &g2) < 1e-5);
        // rms norm
        let w = rand(&[8], 3);
        let (y1, g1) = grad_of(|x| rms_norm(x, &w, 1e-5, true).unwrap(), &x, &probe);
        let slow = |x: &Tensor| {
            let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            x.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&w).unwrap()
        };
        let (y2, g2) = grad_of(slow, &x, &probe);
        assert!(max_diff(&y1, &y2) < 1e-5 && max_diff(&g1, &g2) < 1e-4, "rms {} {}", max_diff(&y1, &y2), max_diff(&g1, &g2));
        // rope: attached fused vs. the rotate-half composition
        let ang = rand(&[2, 5, 4], 4);
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let (y1, g1) = grad_of(|x| rope(x, &cos, &sin, true).unwrap(), &x, &probe);
        let comp = |x: &Tensor| {
            let c = Tensor::cat(&[&cos, &cos], D::Minus1).unwrap().reshape((2, 1, 5, 8)).unwrap();
            let s = Tensor::cat(&[&sin, &sin], D::Minus1).unwrap().reshape((2, 1, 5, 8)).unwrap();
            let x1 = x.narrow(D::Minus1, 0, 4).unwrap();
            let x2 = x.narrow(D::Minus1, 4, 4).unwrap();
            let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
            (x.broadcast_mul(&c).unwrap() + rot.broadcast_mul(&s).unwrap()).unwrap()
        };
        let (y2, g2) = grad_of(comp, &x, &probe);
        assert!(max_diff(&y1, &y2) < 1e-5 && max_diff(&g1, &g2) < 1e-5);
        // layer norm: attached fused vs. the mean/variance composition, input and bias gradients
        let (w, bias) = (rand(&[8], 9), rand(&[8], 10));
        let bv = Var::from_tensor(&bias).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let y1 = layer_norm(xv.as_tensor(), &w, bv.as_tensor(), 1e-5, true).unwrap();
        let g = (&y1 * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (gx1, gb1) = (g.get(xv.as_tensor()).unwrap().clone(), g.get(bv.as_tensor()).unwrap().clone());
        let bv2 = Var::from_tensor(&bias).unwrap();
        let xv2 = Var::from_tensor(&x).unwrap();
        let y2 = {
            let x = xv2.as_tensor();
            let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap()).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&w).unwrap().broadcast_add(bv2.as_tensor()).unwrap()
        };
        let g = (&y2 * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (gx2, gb2) = (g.get(xv2.as_tensor()).unwrap().clone(), g.get(bv2.as_tensor()).unwrap().clone());
        assert!(max_diff(&y1, &y2) < 1e-5, "ln fwd {}", max_diff(&y1, &y2));
        assert!(max_diff(&gx1, &gx2) < 1e-4 && max_diff(&gb1, &gb2) < 1e-5, "ln grads {} {}", max_diff(&gx1, &gx2), max_diff(&gb1, &gb2));
        assert!(gx1.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
        // inference path (fused with bias) equals the training path's values
        let y3 = layer_norm(&x, &w, &bias, 1e-5, false).unwrap();
        assert!(max_diff(&y1, &y3) < 1e-6);
        // frozen linear: input gradient only, equal to the plain matmul's
        let x2 = rand(&[6, 8], 5);
        let wt = rand(&[4, 8], 6);
        let p2 = rand(&[6, 4], 7);
        let (y1, g1) = grad_of(|x| frozen_linear(x, &wt, None, false).unwrap(), &x2, &p2);
        let (y2, g2) = grad_of(|x| x.matmul(&wt.t().unwrap()).unwrap(), &x2, &p2);
        assert!(max_diff(&y1, &y2) < 1e-5 && max_diff(&g1, &g2) < 1e-5);
    }

    #[test]
    fn fused_cross_entropy_matches_log_softmax() {
        let logits = rand(&[2, 4, 7], 8);
        let labels: Vec<i64> = vec![1, 2, -100, 3, 0, 6, 5, -100];
        let v = Var::from_tensor(&logits).unwrap();
        let (loss, n) = causal_lm_loss(v.as_tensor(), &labels, 2, 4, true).unwrap();
        assert_eq!(n, 4);
        let g1 = loss.backward().unwrap().get(v.as_tensor()).unwrap().clone();
        // reference: shifted rows (b, s) -> label (b, s+1)
        let v2 = Var::from_tensor(&logits).unwrap();
        let lp = candle_nn::ops::log_softmax(v2.as_tensor(), D::Minus1).unwrap();
        let mut terms = Vec::new();
        for (bi, si, l) in [(0usize, 0usize, 2u32), (0, 2, 3), (1, 0, 6), (1, 1, 5)] {
            terms.push(lp.get(bi).unwrap().get(si).unwrap().get(l as usize).unwrap());
        }
        let reference = (Tensor::stack(&terms, 0).unwrap().sum_all().unwrap().neg().unwrap() / 4.0).unwrap();
        let g2 = reference.backward().unwrap().get(v2.as_tensor()).unwrap().clone();
        assert!((loss.to_scalar::<f32>().unwrap() - reference.to_scalar::<f32>().unwrap()).abs() < 1e-6);
        assert!(max_diff(&g1, &g2) < 1e-6);
    }
}
