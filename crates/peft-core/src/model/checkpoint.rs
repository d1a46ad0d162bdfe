//! Gradient checkpointing on the general path (candle's autograd): a layer-wise backward
//! driver, as torch's `checkpoint` does it for transformers' `GradientCheckpointingLayer`s.
//!
//! The forward runs the layers without keeping their graphs: each layer sees its input
//! detached (`x_i`, kept, `[b, s, hidden]`) and its output is detached in turn, so only the
//! layer inputs outlive the layer. The head (final norm, `lm_head` / classifier) and the loss
//! then run on a fresh variable `h_L`, and `loss.backward()` gives the head's parameter
//! gradients and `g_L = ∂loss/∂h_L`. From the top layer down, layer `i` is recomputed from
//! `x_i` as a fresh variable, `Σ (layer_i(x_i) ⊙ g_{i+1})` is backpropagated (its gradient with
//! respect to a parameter or to `x_i` is exactly the chain rule's `J_iᵀ g_{i+1}`), the parameter
//! gradients are added to the store and `g_i = ∂/∂x_i` goes down. Last, when the input
//! embeddings have a graph of their own (prompt tuning's virtual tokens, LoRA on the embedding,
//! BERT's embedding LayerNorm bias with `bias: "all"`), `Σ (x_0 ⊙ g_0)` is backpropagated
//! through it.
//!
//! Side inputs: tensors that every layer reads besides its input (T5's relative position bias,
//! built once from block 0's table; a T5 decoder layer's cross-attention reads the encoder
//! output). A side input `e` with a graph of its own is a fresh variable in the recomputed
//! layers; its gradient `g_e = Σ_i ∂/∂e` accumulates over the layers, and `Σ (e ⊙ g_e)` is
//! backpropagated through `e`'s graph with the input's. An encoder-decoder model
//! ([`LayerStack::encoder`]) runs in two levels: the encoder's stack runs first, its head's
//! output `E` (the encoder's last hidden state, a function of the encoder's `h_L` variable) is
//! the decoder layers' side input, and the decoder's whole checkpointed backward is the
//! encoder's "loss": it returns `Σ (E ⊙ g_E)`, whose backward gives the encoder's `g_L`; the
//! encoder's layers are then recomputed in turn.
//!
//! LoRA dropout in a recomputed layer draws from the step's generator reset to its state
//! before that layer's first forward, so it applies the same masks (torch's checkpoint
//! restores the RNG state the same way); the generator is put back where the forward left it
//! when the backward ends (also on an error), so it ends where the plain step leaves it.
//! Losses are identical to the plain path's; gradients agree up to float rounding (they may be
//! summed in another order: a side input's gradient is summed layer by layer).
//!
//! Memory: the plain path keeps every layer's intermediate tensors (and candle keeps the
//! gradient of each) until the backward ends; here one layer's are alive at a time, plus the
//! `L` layer inputs (and, for T5, the encoder's `L_enc` inputs while the decoder runs). Cost:
//! one more forward pass through the layers.

use super::forward::ForwardOptions;
use crate::error::{PeftError, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};
use rand::rngs::StdRng;
use std::collections::HashSet;
use std::sync::Mutex;

/// A model's layers for one forward pass, run one at a time (the per-pass context, such as
/// RoPE tables, masks and the linears' context with the step's dropout generator, is held by
/// the implementer). See [`super::BaseModel::layer_stack`].
pub trait LayerStack {
    /// What the first layer sees, from the input embeddings `x` (GPT-2 adds its position
    /// embeddings, BERT its position and token type embeddings and the embedding LayerNorm;
    /// the identity elsewhere). Gradients flow back through it.
    fn input(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    /// Number of layers.
    fn num_layers(&self) -> usize;
    /// Tensors every layer reads besides its input (T5: the stack's relative position bias
    /// plus mask), handed to [`LayerStack::layer`] as `side` in this order. Default: none.
    fn side_inputs(&self) -> Vec<Tensor> {
        vec![]
    }
    /// Layer `i` on `x` `[b, s, hidden]` → `[b, s, hidden]`. `side`: [`LayerStack::side_inputs`],
    /// then, for the decoder of an encoder-decoder model, the encoder's output `[b, s_enc,
    /// hidden]`; the driver may hand them as fresh variables (same values).
    fn layer(&self, i: usize, x: &Tensor, side: &[Tensor]) -> Result<Tensor>;
    /// What follows the last layer: final norm and head → logits (an encoder's: its output).
    fn head(&self, h: &Tensor) -> Result<Tensor>;
    /// Encoder-decoder models (T5), on the decoder's stack: the encoder's stack and the
    /// decoder's own input embeddings `[b, t, hidden]`. The driver then runs the encoder on
    /// the input embeddings it is given, and this stack on the returned ones with the
    /// encoder's head output as the last side input of every layer. Default: `None`.
    fn encoder(&self) -> Option<(&dyn LayerStack, &Tensor)> {
        None
    }
}

/// A [`LayerStack`] made of a model's own per-layer and head functions over its per-forward
/// context `C` (RoPE tables, masks, the linears' context): what the decoders' (and BERT's)
/// `layer_stack`s share. `layer(m, i, x, ctx)` runs layer `i` as the model's forward does
/// without a cache; `head(m, h, ctx, opts)` the final norm and head; `input(m, x, ctx)` (when
/// given) what precedes the first layer.
pub(crate) struct Layers<'a, M, C> {
    m: &'a M,
    ctx: C,
    opts: &'a ForwardOptions,
    n: usize,
    input: Option<InputFn<M, C>>,
    layer: LayerFn<M, C>,
    head: HeadFn<M, C>,
}

/// [`Layers`]' input function: `(model, x, ctx)` → the first layer's input.
pub(crate) type InputFn<M, C> = fn(&M, &Tensor, &C) -> Result<Tensor>;
/// [`Layers`]' layer function: `(model, i, x, ctx)` → layer `i`'s output.
pub(crate) type LayerFn<M, C> = fn(&M, usize, &Tensor, &C) -> Result<Tensor>;
/// [`Layers`]' head function: `(model, h, ctx, opts)` → logits.
pub(crate) type HeadFn<M, C> = fn(&M, &Tensor, &C, &ForwardOptions) -> Result<Tensor>;

impl<'a, M, C: 'a> Layers<'a, M, C> {
    /// `n` layers of `m` over `ctx` (see [`Layers`]).
    pub(crate) fn new(m: &'a M, ctx: C, opts: &'a ForwardOptions, n: usize, layer: LayerFn<M, C>, head: HeadFn<M, C>) -> Self {
        Layers { m, ctx, opts, n, input: None, layer, head }
    }
    /// With `input` before the first layer (see [`LayerStack::input`]).
    pub(crate) fn with_input(self, input: InputFn<M, C>) -> Self {
        Layers { input: Some(input), ..self }
    }
    /// As the boxed stack [`super::BaseModel::layer_stack`] returns.
    pub(crate) fn boxed(self) -> Box<dyn LayerStack + 'a> {
        Box::new(self)
    }
}

impl<M, C> LayerStack for Layers<'_, M, C> {
    fn input(&self, x: &Tensor) -> Result<Tensor> {
        match self.input {
            Some(f) => f(self.m, x, &self.ctx),
            None => Ok(x.clone()),
        }
    }
    fn num_layers(&self) -> usize {
        self.n
    }
    fn layer(&self, i: usize, x: &Tensor, _side: &[Tensor]) -> Result<Tensor> {
        (self.layer)(self.m, i, x, &self.ctx)
    }
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        (self.head)(self.m, h, &self.ctx, self.opts)
    }
}

/// Runs `stack` on the input embeddings `x0` with gradient checkpointing and backpropagates
/// the loss that `loss` forms from the logits (it returns the scalar to differentiate and a
/// value handed back). `rng` is the step's dropout generator (the one the stack's layers draw
/// from). Returns that value and the gradients of the variables in `keep` (every other
/// gradient is dropped as soon as it is used). An encoder-decoder stack
/// ([`LayerStack::encoder`]) runs its encoder on `x0` first.
///
/// Errors: those of the layers, the heads and `loss`; `Internal` if a recomputed layer does
/// not depend on its input or a decoder not on its encoder.
pub(crate) fn checkpointed_backward<R>(
    stack: &dyn LayerStack,
    x0: &Tensor,
    rng: Option<&Mutex<StdRng>>,
    keep: &HashSet<TensorId>,
    loss: impl FnOnce(&Tensor) -> Result<(Tensor, R)>,
) -> Result<(R, GradStore)> {
    let (out, mut store, rest) = match stack.encoder() {
        None => drive(stack, x0, None, rng, keep, loss)?,
        Some((encoder, dec_x0)) => {
            // The decoder's checkpointed backward is the encoder's loss: `Σ (E ⊙ g_E)`.
            let ((out, dec_store), mut store, rest) = drive(encoder, x0, None, rng, keep, |enc_out| {
                let (out, dec_store, rest) = drive(stack, dec_x0, Some(enc_out), rng, keep, loss)?;
                let rest = rest.ok_or_else(|| PeftError::Internal("gradient checkpointing: the decoder does not depend on the encoder output".into()))?;
                Ok((rest, (out, dec_store)))
            })?;
            store.extend(dec_store)?;
            (out, store, rest)
        }
    };
    // The graphs of the input embeddings (virtual tokens, LoRA on the embedding) and of the
    // side inputs, if any.
    if let Some(rest) = rest {
        keep_grads(rest.backward()?, keep, &mut store)?;
    }
    Ok((out, store))
}

/// Adds the gradients in `grads` of the variables in `keep` to `store`.
fn keep_grads(grads: GradStore, keep: &HashSet<TensorId>, store: &mut GradStore) -> Result<()> {
    let mut kept = GradStore::default();
    for id in grads.get_ids().filter(|id| keep.contains(id)) {
        if let Some(t) = grads.get_id(*id) {
            kept.insert_id(*id, t.clone());
        }
    }
    store.extend(kept)?;
    Ok(())
}

fn lock(r: &Mutex<StdRng>) -> std::sync::MutexGuard<'_, StdRng> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// Puts the step's generator back to `end` when dropped.
struct Rewind<'r> {
    rng: Option<&'r Mutex<StdRng>>,
    end: Option<StdRng>,
}

impl Drop for Rewind<'_> {
    fn drop(&mut self) {
        if let (Some(r), Some(end)) = (self.rng, self.end.take()) {
            *lock(r) = end;
        }
    }
}

/// One stack's checkpointed forward and backward (see the module docs): `outer` is a side
/// input from outside (the encoder output, appended to the stack's own). Returns `loss`'s
/// value, the kept parameter gradients and, when the input embeddings or a side input have a
/// graph of their own, the scalar `Σ (x_0 ⊙ g_0) + Σ_e (e ⊙ g_e)` whose backward finishes the
/// gradient through those graphs.
fn drive<R>(
    stack: &dyn LayerStack,
    x0: &Tensor,
    outer: Option<&Tensor>,
    rng: Option<&Mutex<StdRng>>,
    keep: &HashSet<TensorId>,
    loss: impl FnOnce(&Tensor) -> Result<(Tensor, R)>,
) -> Result<(R, GradStore, Option<Tensor>)> {
    let x0 = &stack.input(x0)?;
    let mut sides = stack.side_inputs();
    sides.extend(outer.cloned());
    let detached: Vec<Tensor> = sides.iter().map(|t| t.detach()).collect();
    let n = stack.num_layers();
    let snapshot = || rng.map(|r| lock(r).clone());
    // Forward: keep each layer's input and the generator's state before it.
    let mut saved: Vec<(Tensor, Option<StdRng>)> = Vec::with_capacity(n);
    let mut h = x0.detach();
    for i in 0..n {
        saved.push((h.clone(), snapshot()));
        h = stack.layer(i, &h, &detached)?.detach();
    }
    let h_last = Var::from_tensor(&h)?;
    drop(h);
    let logits = stack.head(h_last.as_tensor())?;
    let (l, out) = loss(&logits)?;
    drop(logits);
    // The recomputations below rewind the generator; it ends where the forward left it.
    let _rewind = Rewind { rng, end: snapshot() };
    let mut grads = l.backward()?;
    drop(l);
    // candle leaves a variable's gradient attached to the graph it was computed from (through
    // the parameters): detached, it is a plain value for the next backward.
    let mut g = grads
        .remove(h_last.as_tensor())
        .ok_or_else(|| PeftError::Internal("gradient checkpointing: the loss does not depend on the last layer".into()))?
        .detach();
    let mut store = GradStore::default();
    keep_grads(grads, keep, &mut store)?;
    // Side inputs with a graph of their own are variables in the recomputed layers.
    let vars: Vec<Option<Var>> = sides.iter().map(|t| if t.track_op() { Var::from_tensor(&t.detach()).map(Some) } else { Ok(None) }).collect::<candle_core::Result<_>>()?;
    let recompute_sides: Vec<Tensor> = vars.iter().zip(&detached).map(|(v, d)| v.as_ref().map(|v| v.as_tensor().clone()).unwrap_or_else(|| d.clone())).collect();
    drop(detached);
    let mut side_grads: Vec<Option<Tensor>> = vec![None; sides.len()];
    // Backward, top layer first: recompute the layer from its input, backpropagate `g`.
    for i in (0..n).rev() {
        let (x, state) = saved.pop().ok_or_else(|| PeftError::Internal(format!("gradient checkpointing: no saved input for layer {i}")))?;
        let xi = Var::from_tensor(&x)?;
        drop(x);
        if let (Some(r), Some(state)) = (rng, state) {
            *lock(r) = state;
        }
        let y = stack.layer(i, xi.as_tensor(), &recompute_sides)?;
        let s = (y * &g)?.sum_all()?;
        grads = s.backward()?;
        g = grads
            .remove(xi.as_tensor())
            .ok_or_else(|| PeftError::Internal(format!("gradient checkpointing: layer {i} does not depend on its input")))?
            .detach();
        for (acc, v) in side_grads.iter_mut().zip(&vars) {
            if let Some(gv) = v.as_ref().and_then(|v| grads.remove(v.as_tensor())).map(|t| t.detach()) {
                *acc = Some(match acc.take() {
                    Some(a) => (a + gv)?,
                    None => gv,
                });
            }
        }
        keep_grads(grads, keep, &mut store)?;
    }
    let mut rest: Option<Tensor> = None;
    let mut add = |t: &Tensor, g: &Tensor| -> Result<()> {
        let term = (t * g)?.sum_all()?;
        rest = Some(match rest.take() {
            Some(r) => (r + term)?,
            None => term,
        });
        Ok(())
    };
    if x0.track_op() {
        add(x0, &g)?;
    }
    for (t, gt) in sides.iter().zip(&side_grads) {
        if let Some(gt) = gt {
            add(t, gt)?;
        }
    }
    Ok((out, store, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Layers `tanh(x·W_i + e)` reading a side input `e = 2·p` (a graph of its own), head
    /// `h·v`; the input `x0 = 3·q` has a graph too.
    struct Toy {
        w: Vec<Var>,
        v: Var,
        e: Tensor,
        /// Break the recomputation (a test that it can fail).
        wrong_recompute: std::cell::Cell<usize>,
    }

    impl LayerStack for Toy {
        fn num_layers(&self) -> usize {
            self.w.len()
        }
        fn side_inputs(&self) -> Vec<Tensor> {
            vec![self.e.clone()]
        }
        fn layer(&self, i: usize, x: &Tensor, side: &[Tensor]) -> Result<Tensor> {
            let calls = self.wrong_recompute.get();
            let y = x.matmul(self.w[i].as_tensor())?.broadcast_add(&side[0])?.tanh()?;
            if calls > 0 {
                self.wrong_recompute.set(calls + 1);
                if calls > self.w.len() {
                    return Ok((y * 1.5)?);
                }
            }
            Ok(y)
        }
        fn head(&self, h: &Tensor) -> Result<Tensor> {
            Ok(h.matmul(self.v.as_tensor())?)
        }
    }

    fn toy(wrong: bool) -> (Toy, Var, Var, Tensor) {
        let dev = Device::Cpu;
        let r = |s: &[usize], seed: f64| Var::from_tensor(&(Tensor::arange(0f32, s.iter().product::<usize>() as f32, &dev).unwrap().reshape(s).unwrap() * seed).unwrap().sin().unwrap()).unwrap();
        let p = r(&[1, 4], 0.7);
        let q = r(&[3, 4], 1.3);
        let e = (p.as_tensor() * 2.0).unwrap();
        let x0 = (q.as_tensor() * 3.0).unwrap();
        let w = (0..3).map(|i| r(&[4, 4], 0.3 + i as f64)).collect();
        (Toy { w, v: r(&[4, 1], 2.1), e, wrong_recompute: std::cell::Cell::new(usize::from(wrong)) }, p, q, x0)
    }

    fn grads_of(t: &Toy, p: &Var, q: &Var, g: &GradStore) -> Vec<Vec<f32>> {
        let mut vars = vec![p, q, &t.v];
        vars.extend(t.w.iter());
        vars.iter().map(|v| g.get(v.as_tensor()).expect("a gradient").flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    }

    fn checkpointed(wrong: bool) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let (t, p, q, x0) = toy(wrong);
        let mut h = x0.clone();
        for i in 0..3 {
            h = t.layer(i, &h, std::slice::from_ref(&t.e)).unwrap();
        }
        let plain = t.head(&h).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let keep: HashSet<TensorId> = [&p, &q, &t.v].into_iter().chain(t.w.iter()).map(|v| v.as_tensor().id()).collect();
        let ((), ck) = checkpointed_backward(&t, &x0, None, &keep, |y| Ok((y.sqr()?.sum_all()?, ()))).unwrap();
        (grads_of(&t, &p, &q, &plain), grads_of(&t, &p, &q, &ck))
    }

    /// A side input with a graph gets every layer's gradient; the input's graph gets its own.
    #[test]
    fn side_inputs_and_input_graphs_get_their_gradients() {
        let (plain, ck) = checkpointed(false);
        for (a, b) in plain.iter().zip(&ck) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{a:?} vs {b:?}");
            }
        }
        let (plain, ck) = checkpointed(true);
        assert!(plain.iter().zip(&ck).any(|(a, b)| a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-3)), "a wrong recomputation is caught");
    }
}
