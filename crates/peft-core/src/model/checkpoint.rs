//! Gradient checkpointing on the general path (candle's autograd): a layer-wise backward
//! driver, as torch's `checkpoint` does it for transformers' `GradientCheckpointingLayer`s.
//!
//! The forward runs the decoder layers without keeping their graphs: each layer sees its input
//! detached (`x_i`, kept, `[b, s, hidden]`) and its output is detached in turn, so only the
//! layer inputs outlive the layer. The head (final norm, `lm_head`) and the loss then run on a
//! fresh variable `h_L`, and `loss.backward()` gives the head's parameter gradients and
//! `g_L = ∂loss/∂h_L`. From the top layer down, layer `i` is recomputed from `x_i` as a fresh
//! variable, `Σ (layer_i(x_i) ⊙ g_{i+1})` is backpropagated (its gradient with respect to a
//! parameter or to `x_i` is exactly the chain rule's `J_iᵀ g_{i+1}`), the parameter gradients
//! are added to the store and `g_i = ∂/∂x_i` goes down. Last, when the input embeddings have a
//! graph of their own (prompt tuning's virtual tokens, LoRA on the embedding), `Σ (x_0 ⊙ g_0)`
//! is backpropagated through it.
//!
//! LoRA dropout in a recomputed layer draws from a copy of the step's generator as it was
//! before that layer's first forward, so it applies the same masks (torch's checkpoint
//! restores the RNG state the same way), and the generator ends where the plain forward
//! leaves it. Losses are identical to the plain path's; gradients agree up to float rounding
//! (they are summed in another order).
//!
//! Memory: the plain path keeps every layer's intermediate tensors (and candle keeps the
//! gradient of each) until the backward ends; here one layer's are alive at a time, plus the
//! `L` layer inputs. Cost: one more forward pass through the layers.

use crate::error::{PeftError, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};
use rand::rngs::StdRng;
use std::collections::HashSet;
use std::sync::Mutex;

/// A decoder's layers for one forward pass, run one at a time (the per-pass context, such as
/// RoPE tables and masks, is held by the implementer). See [`super::BaseModel::layer_stack`].
pub trait LayerStack {
    /// What the first layer sees, from the input embeddings `x` (GPT-2 adds its position
    /// embeddings; the identity elsewhere). Gradients flow back through it.
    fn input(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    /// Number of decoder layers.
    fn num_layers(&self) -> usize;
    /// Layer `i` on `x` `[b, s, hidden]` → `[b, s, hidden]`, with LoRA dropout drawn from `rng`.
    fn layer(&self, i: usize, x: &Tensor, rng: Option<&Mutex<StdRng>>) -> Result<Tensor>;
    /// What follows the last layer: final norm and head → logits.
    fn head(&self, h: &Tensor) -> Result<Tensor>;
}

/// Runs `stack` on the input embeddings `x0` with gradient checkpointing and backpropagates
/// the loss that `loss` forms from the logits (it returns the scalar to differentiate and a
/// value handed back). `rng` is the step's dropout generator. Returns that value and the
/// gradients of the variables in `keep` (every other gradient is dropped as soon as it is
/// used).
///
/// Errors: those of the layers, the head and `loss`; `Internal` if a recomputed layer does not
/// depend on its input.
pub(crate) fn checkpointed_backward<R>(
    stack: &dyn LayerStack,
    x0: &Tensor,
    rng: Option<&Mutex<StdRng>>,
    keep: &HashSet<TensorId>,
    loss: impl FnOnce(&Tensor) -> Result<(Tensor, R)>,
) -> Result<(R, GradStore)> {
    let x0 = &stack.input(x0)?;
    let n = stack.num_layers();
    let snapshot = || rng.map(|r| r.lock().unwrap_or_else(|p| p.into_inner()).clone());
    // Forward: keep each layer's input and the generator's state before it.
    let mut saved: Vec<(Tensor, Option<StdRng>)> = Vec::with_capacity(n);
    let mut h = x0.detach();
    for i in 0..n {
        saved.push((h.clone(), snapshot()));
        h = stack.layer(i, &h, rng)?.detach();
    }
    let h_last = Var::from_tensor(&h)?;
    drop(h);
    let logits = stack.head(h_last.as_tensor())?;
    let (l, out) = loss(&logits)?;
    drop(logits);
    let mut grads = l.backward()?;
    let mut g = grads
        .remove(h_last.as_tensor())
        .ok_or_else(|| PeftError::Internal("gradient checkpointing: the loss does not depend on the last layer".into()))?;
    let mut store = GradStore::default();
    let take = |grads: GradStore, store: &mut GradStore| -> Result<()> {
        let mut kept = GradStore::default();
        for id in grads.get_ids().filter(|id| keep.contains(id)) {
            if let Some(t) = grads.get_id(*id) {
                kept.insert_id(*id, t.clone());
            }
        }
        store.extend(kept)?;
        Ok(())
    };
    take(grads, &mut store)?;
    // Backward, top layer first: recompute the layer from its input, backpropagate `g`.
    for i in (0..n).rev() {
        let (x, state) = saved.pop().ok_or_else(|| PeftError::Internal(format!("gradient checkpointing: no saved input for layer {i}")))?;
        let xi = Var::from_tensor(&x)?;
        drop(x);
        let local = state.map(Mutex::new);
        let y = stack.layer(i, xi.as_tensor(), local.as_ref())?;
        let s = (y * &g)?.sum_all()?;
        grads = s.backward()?;
        g = grads
            .remove(xi.as_tensor())
            .ok_or_else(|| PeftError::Internal(format!("gradient checkpointing: layer {i} does not depend on its input")))?;
        take(grads, &mut store)?;
    }
    // The embeddings' own graph (virtual tokens, LoRA on the embedding), if any.
    if x0.track_op() {
        let s = (x0 * &g)?.sum_all()?;
        take(s.backward()?, &mut store)?;
    }
    Ok((out, store))
}
