//! A new LoHa layer (HF `LoHaLayer.update_layer`, `reset_adapter_parameters`); injection itself
//! is [`crate::tuners::lycoris`]'s.

use super::layer::LohaLayer;
use super::LohaConfig;
use crate::error::Result;
use crate::peft_model::kaiming_uniform;
use crate::tuners::linear::PeftLinear;
use candle_core::{Device, Tensor, Var};

/// The LoHa layer of `lin`: `w1_a`, `w2_a` `[out, r]` and `w1_b`, `w2_b` `[r, in]`, initialised
/// as HF's `reset_adapter_parameters`: kaiming-uniform(a=√5) `w1_a`, `w1_b`, `w2_a` and zero
/// `w2_b` (a no-op), or with `init_weights=false` all four kaiming-uniform.
pub(super) fn new_layer(cfg: &LohaConfig, lin: &PeftLinear, r: usize, alpha: f64, rng: &mut rand::rngs::StdRng, device: &Device) -> Result<LohaLayer> {
    let (outf, inf) = (lin.out_features(), lin.in_features());
    let var = |v: Vec<f32>, rows: usize, cols: usize| -> Result<Var> { Ok(Var::from_tensor(&Tensor::from_vec(v, (rows, cols), device)?)?) };
    let w1_a = var(kaiming_uniform(rng, outf, r), outf, r)?;
    let w1_b = var(kaiming_uniform(rng, r, inf), r, inf)?;
    let w2_a = var(kaiming_uniform(rng, outf, r), outf, r)?;
    let w2_b = if cfg.own.init_weights { vec![0.0; r * inf] } else { kaiming_uniform(rng, r, inf) };
    let w2_b = var(w2_b, r, inf)?;
    Ok(LohaLayer {
        w1_a,
        w1_b,
        w2_a,
        w2_b,
        r,
        alpha,
        scaling: alpha / r as f64,
        rank_dropout: cfg.rank_dropout,
        module_dropout: cfg.module_dropout,
    })
}
