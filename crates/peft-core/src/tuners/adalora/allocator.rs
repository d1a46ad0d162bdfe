//! AdaLoRA's rank allocator (HF `RankAllocator` and `AdaLoraModel.update_and_allocate`; Zhang et
//! al. 2023, §3.2-3.3), for the one trainable AdaLoRA adapter of a model.
//!
//! After each optimizer step (the parameters updated, their gradients `g` still known):
//!
//! - importance of every entry of `lora_A`, `lora_E`, `lora_B`: `I = |p · g|`; sensitivity
//!   `Ī ← β₁ Ī + (1 − β₁) I`; uncertainty `Ū ← β₂ Ū + (1 − β₂) |I − Ī|` (both start at 0), while
//!   `step < total_step − tfinal`;
//! - budget (in triplets, over all layers): `init_r · layers` while `step ≤ tinit`, then
//!   `⌊(b₀ − b_T) (1 − (step − tinit) / (total_step − tfinal − tinit))³ + b_T⌋` with
//!   `b_T = target_r · layers`, and `b_T` after `total_step − tfinal`;
//! - every `deltaT` steps of the budgeting phase, and once at `step = total_step − tfinal`: the
//!   score of triplet `i` of a layer is `S_E[i] + mean_j S_A[i, j] + mean_j S_B[j, i]` with
//!   `S = Ī · Ū`; the `init_r · layers − budget` lowest scores over all layers (ties at the
//!   threshold included) get their `lora_E` row set to 0, and the kept triplets are recorded as
//!   the config's `rank_pattern`. At `total_step − tfinal` the averages are reset;
//! - after `total_step − tfinal`, the recorded pattern is applied to `lora_E` again every step.

use super::config::AdaLoraConfig;
use super::layer::{AdaLoraLayer, NAMES};
use crate::error::{PeftError, Result};
use crate::peft_model::PeftModel;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// HF `RankAllocator.budget_schedule`: `(budget, mask now)` at `step` for a model whose layers
/// start with `init_bgt` triplets in all and end with `target_bgt`.
pub fn budget_schedule(c: &AdaLoraConfig, init_bgt: usize, target_bgt: usize, step: usize) -> (usize, bool) {
    let (tinit, tfinal, total) = (c.tinit as i64, c.tfinal as i64, c.total_step as i64);
    let s = step as i64;
    if s <= tinit {
        (init_bgt, false)
    } else if s > total - tfinal {
        (target_bgt, true)
    } else {
        let mul = 1.0 - (s - tinit) as f64 / (total - tfinal - tinit) as f64;
        let budget = ((init_bgt as f64 - target_bgt as f64) * mul.powf(3.0) + target_bgt as f64) as i64;
        (budget.max(0) as usize, s % c.delta_t as i64 == 0)
    }
}

/// The AdaLoRA layers of adapter `name`, in module order.
fn layers<'m>(model: &'m PeftModel, name: &str) -> Vec<(String, &'m AdaLoraLayer)> {
    model
        .base
        .named_layers()
        .into_iter()
        .filter_map(|(m, lin)| lin.layers.get(name).and_then(|l| l.as_any()).and_then(|a| a.downcast_ref::<AdaLoraLayer>()).map(|l| (m, l)))
        .collect()
}

fn f32_of(v: &Var) -> Result<Tensor> {
    Ok(v.as_tensor().detach().to_dtype(DType::F32)?)
}

/// Record the gradients of the optimizer step just taken (`None` where `grads` has none).
pub(crate) fn record_gradients(l: &AdaLoraLayer, grads: &GradStore) {
    let mut imp = l.importance.lock().unwrap_or_else(|e| e.into_inner());
    imp.grads.clear();
    for slot in NAMES {
        if let Some(g) = grads.get(l.var(slot).as_tensor()) {
            imp.grads.insert(slot, g.clone());
        }
    }
}

/// HF `update_ipt` for one layer, with the gradients recorded by [`record_gradients`] (zeros
/// where none was).
fn update_importance(l: &AdaLoraLayer, c: &AdaLoraConfig) -> Result<()> {
    let mut imp = l.importance.lock().unwrap_or_else(|e| e.into_inner());
    for slot in NAMES {
        let p = f32_of(l.var(slot))?;
        if p.elem_count() == 0 {
            continue;
        }
        let g = match imp.grads.get(slot) {
            Some(g) => g.to_dtype(DType::F32)?,
            None => p.zeros_like()?,
        };
        let ipt = (&p * &g)?.abs()?;
        let (avg, unc) = match imp.ema.get(slot) {
            Some((a, u)) => (a.clone(), u.clone()),
            None => (p.zeros_like()?, p.zeros_like()?),
        };
        let avg = ((avg * c.beta1)? + (&ipt * (1.0 - c.beta1))?)?;
        let unc = ((unc * c.beta2)? + ((&ipt - &avg)?.abs()? * (1.0 - c.beta2))?)?;
        imp.ema.insert(slot, (avg, unc));
    }
    Ok(())
}

/// The triplet scores `[r]` of one layer (HF `_element_score` + `_combine_ipt`).
fn triplet_scores(l: &AdaLoraLayer) -> Result<Vec<f32>> {
    let r = l.rank();
    let imp = l.importance.lock().unwrap_or_else(|e| e.into_inner());
    let score = |slot: &str| -> Result<Option<Tensor>> { Ok(imp.ema.get(slot).map(|(a, u)| a * u).transpose()?) };
    let (Some(sa), Some(sb), Some(se)) = (score("lora_A")?, score("lora_B")?, score("lora_E")?) else {
        return Ok(vec![0.0; r]);
    };
    let a = sa.mean(1)?;
    let b = sb.mean(0)?;
    let e = se.reshape(r)?;
    Ok((e + (a + b)?)?.to_vec1::<f32>()?)
}

/// Zero the rows of `lora_E` whose `keep` is false (HF `masked_fill_(..., 0.0)`).
fn mask_e(l: &AdaLoraLayer, keep: &[bool]) -> Result<()> {
    let e = l.e.as_tensor();
    let mask = Tensor::from_vec(keep.iter().map(|&k| k as u8).collect::<Vec<u8>>(), (keep.len(), 1), e.device())?;
    let masked = mask.where_cond(&e.detach(), &e.zeros_like()?)?;
    l.e.set(&masked)?;
    Ok(())
}

/// HF `mask_to_budget`: mask the lowest-scoring triplets down to `budget`; returns the kept
/// triplets per `<module>.lora_E`.
fn mask_to_budget(ls: &[(String, &AdaLoraLayer)], init_bgt: usize, budget: usize) -> Result<Vec<(String, Vec<bool>)>> {
    let scores: Vec<Vec<f32>> = ls.iter().map(|(_, l)| triplet_scores(l)).collect::<Result<_>>()?;
    let mut all: Vec<f32> = scores.iter().flatten().copied().collect();
    let k = init_bgt as i64 - budget as i64;
    if k < 1 || k as usize > all.len() {
        return Err(PeftError::InvalidState(format!(
            "AdaLoRA cannot mask {k} of {} triplets (torch: `kthvalue(): selected number k out of range`); the budget {budget} must lie below init_r · layers = {init_bgt}: target_r must be smaller than init_r",
            all.len()
        )));
    }
    all.sort_by(|a, b| a.total_cmp(b));
    let threshold = all[k as usize - 1];
    let mut pattern = Vec::with_capacity(ls.len());
    for ((m, l), s) in ls.iter().zip(scores) {
        let keep: Vec<bool> = s.iter().map(|&x| !(x <= threshold)).collect();
        mask_e(l, &keep)?;
        pattern.push((format!("{m}.lora_E"), keep));
    }
    Ok(pattern)
}

/// Record the gradients `grads` of the step just taken in adapter `name`'s layers.
pub(crate) fn record(model: &PeftModel, name: &str, grads: &GradStore) {
    for (_, l) in layers(model, name) {
        record_gradients(l, grads);
    }
}

/// HF `AdaLoraModel.update_and_allocate(global_step)` for adapter `name` with config `c`, with
/// the gradients last recorded ([`record`]).
pub(crate) fn update_and_allocate(model: &PeftModel, name: &str, c: &AdaLoraConfig, global_step: usize) -> Result<()> {
    let ls = layers(model, name);
    let init_bgt = c.init_r * ls.len();
    let target_bgt = c.target_r * ls.len();
    let end = c.total_step as i64 - c.tfinal as i64;
    let step = global_step as i64;
    if step < end {
        for (_, l) in &ls {
            update_importance(l, c)?;
        }
        let (budget, mask) = budget_schedule(c, init_bgt, target_bgt, global_step);
        if mask {
            c.set_rank_pattern(Some(mask_to_budget(&ls, init_bgt, budget)?));
        }
    } else if step == end {
        let (budget, _) = budget_schedule(c, init_bgt, target_bgt, global_step);
        c.set_rank_pattern(Some(mask_to_budget(&ls, init_bgt, budget)?));
        for (_, l) in &ls {
            l.importance.lock().unwrap_or_else(|e| e.into_inner()).ema.clear();
        }
    } else {
        let Some(pattern) = c.rank_pattern() else {
            return Err(PeftError::InvalidState(format!(
                "AdaLoRA adapter `{name}` has no rank_pattern to apply at step {global_step} (after total_step - tfinal = {end}); the steps before it were not allocated"
            )));
        };
        for (m, l) in &ls {
            let key = format!("{m}.lora_E");
            let keep = pattern.iter().find(|(k, _)| *k == key).map(|(_, v)| v).ok_or_else(|| {
                PeftError::InvalidState(format!("the rank_pattern of AdaLoRA adapter `{name}` has no entry `{key}`"))
            })?;
            // A layer loaded with the pattern already holds only the kept triplets.
            if keep.len() == l.rank() {
                mask_e(l, keep)?;
            }
        }
    }
    Ok(())
}
