//! A new LoKr layer (HF `LoKrLayer.update_layer` and its three `reset_adapter_parameters*`);
//! injection itself is [`crate::tuners::lycoris`]'s.

use super::layer::{Factor, LokrLayer, LokrShape};
use super::{LokrConfig, LokrInit};
use crate::error::Result;
use crate::peft_model::kaiming_uniform;
use crate::tuners::linear::PeftLinear;
use candle_core::{Device, Tensor, Var};

/// The LoKr layer of `lin`: the factors of [`LokrShape`] (`scaling = alpha / r`), initialised
/// as HF:
/// - `init_weights = true`: `lokr_w1` (or `lokr_w1_a`) zero, so the adapter starts as a
///   no-op; `lokr_w1_b`, `lokr_w2` (or `lokr_w2_a`, `lokr_w2_b`) kaiming-uniform(a=√5);
/// - `"lycoris"`: `lokr_w2` (or `lokr_w2_b`) zero, the others kaiming-uniform;
/// - `false`: all kaiming-uniform.
pub(super) fn new_layer(cfg: &LokrConfig, lin: &PeftLinear, r: usize, alpha: f64, rng: &mut rand::rngs::StdRng, device: &Device) -> Result<LokrLayer> {
    let shape = LokrShape::new(lin.out_features(), lin.in_features(), r, cfg.own.decompose_both, cfg.own.decompose_factor);
    // `zero`: this matrix starts at zero; otherwise kaiming-uniform(a=√5) (bound 1/√fan_in).
    let mut var = |rows: usize, cols: usize, zero: bool| -> Result<Var> {
        let v = if zero { vec![0.0; rows * cols] } else { kaiming_uniform(rng, rows, cols) };
        Ok(Var::from_tensor(&Tensor::from_vec(v, (rows, cols), device)?)?)
    };
    let (zero1, zero2) = match cfg.own.init_weights {
        LokrInit::Zero => (true, false),
        LokrInit::Lycoris => (false, true),
        LokrInit::Random => (false, false),
    };
    let ((a, c), (b, d)) = (shape.w1, shape.w2);
    // Zero init clears `w1` / `w1_a` (true) or `w2` / `w2_b` (lycoris), as HF.
    let w1 = if shape.w1_full { Factor::Full(var(a, c, zero1)?) } else { Factor::Product(var(a, r, zero1)?, var(r, c, false)?) };
    let w2 = if shape.w2_full { Factor::Full(var(b, d, zero2)?) } else { Factor::Product(var(b, r, false)?, var(r, d, zero2)?) };
    Ok(LokrLayer {
        w1,
        w2,
        r,
        alpha,
        scaling: alpha / r as f64,
        rank_dropout: cfg.rank_dropout,
        module_dropout: cfg.module_dropout,
        rank_dropout_scale: cfg.own.rank_dropout_scale,
    })
}
