//! Tensor building blocks with the gradient behaviour PEFT training needs.
//!
//! candle's backward pass of `matmul` computes the gradient of *both* operands, also when one
//! is a frozen weight, which doubles the cost of every frozen linear layer in a LoRA backward
//! pass. [`frozen_linear`] is a custom op whose backward only produces the input gradient
//! (`dL/dx = dL/dy · W`), the frozen weight receives none. Several fused candle ops have no
//! backward at all (`softmax_last_dim`, `rms_norm`, `rope`); the functions here use the fused
//! forms only when `train == false` and the differentiable compositions otherwise.

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

/// RMSNorm as in transformers' `LlamaRMSNorm`: computed in f32,
/// `y = w · (x / sqrt(mean(x², -1) + eps))`, cast back to `x`'s dtype before the weight multiply.
///
/// `x`: `[..., hidden]`, `w`: `[hidden]`. Differentiable when `train` is true.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, train: bool) -> candle_core::Result<Tensor> {
    if !train && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        return candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32);
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(w)
}

/// Softmax over the last dimension (f32). Uses the fused kernel only when no gradient is needed.
pub fn softmax_last(x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
    if train {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }
}

/// Rotary position embedding, the "rotate_half" (GPT-NeoX / HF Llama) form:
/// `x · cos + rotate_half(x) · sin`.
///
/// * `x`: `[b, heads, s, head_dim]`
/// * `cos`, `sin`: `[b, s, head_dim / 2]` (one row of angles per position, `θ_i = pos / theta^(2i/d)`).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, train: bool) -> candle_core::Result<Tensor> {
    if !train {
        return candle_nn::rotary_emb::rope(&x.contiguous()?, &cos.contiguous()?, &sin.contiguous()?);
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

/// Mean cross-entropy of causal-LM logits against labels, with HF's shift and ignore index.
///
/// * `logits`: `[b, s, vocab]` (any float dtype; computed in f32)
/// * `labels`: `[b, s]` u32/i64 ids where `-100` (for i64) marks ignored positions; for u32 input
///   pass `mask` instead.
/// * `mask`: `[b, s]` f32 1/0 weights of the **label** positions (already shifted or not, see
///   `shift`).
///
/// Returns a scalar: `Σ mask · (-log softmax(logits)[label]) / Σ mask`, with `logits[:, :-1]`
/// scored against `labels[:, 1:]` when `shift` is true (transformers' `ForCausalLMLoss`).
pub fn causal_lm_loss(logits: &Tensor, labels: &[i64], b: usize, s: usize, shift: bool) -> candle_core::Result<(Tensor, usize)> {
    let vocab = logits.dim(D::Minus1)?;
    let (logits, s_eff, offset) = if shift { (logits.narrow(1, 0, s - 1)?, s - 1, 1) } else { (logits.clone(), s, 0) };
    let mut targets = Vec::with_capacity(b * s_eff);
    let mut weights = Vec::with_capacity(b * s_eff);
    for bi in 0..b {
        for si in 0..s_eff {
            let l = labels[bi * s + si + offset];
            if l < 0 || l as usize >= vocab {
                targets.push(0u32);
                weights.push(0f32);
            } else {
                targets.push(l as u32);
                weights.push(1f32);
            }
        }
    }
    let n: usize = weights.iter().filter(|w| **w > 0.0).count();
    let device = logits.device();
    let logits = logits.reshape((b * s_eff, vocab))?.to_dtype(DType::F32)?;
    let targets = Tensor::from_vec(targets, (b * s_eff, 1), device)?;
    let weights = Tensor::from_vec(weights, b * s_eff, device)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&targets, 1)?.squeeze(1)?;
    let total = (picked * weights)?.sum_all()?.neg()?;
    Ok(((total / (n.max(1) as f64))?, n))
}
