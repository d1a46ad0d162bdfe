//! A new LoRA adapter combining existing ones: HF `LoraModel.add_weighted_adapter` (peft 0.21).
//!
//! Per layer, with `s_i` the scaling of adapter `i` and `w_i` its weight:
//! - `cat`: `A = [w_1 s_1 A_1; …; w_n s_n A_n]` (rows stacked), `B = [B_1 … B_n]` (columns):
//!   `B A = Σ w_i s_i B_i A_i` exactly; rank Σ r_i.
//! - `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: the merge rule applied to the
//!   A matrices with weights `sign(w_i s_i)·√|w_i s_i|` and to the B matrices with `√|w_i s_i|`
//!   (all adapters must have the same rank). Only `cat` and the SVD methods reproduce
//!   `Σ w_i ΔW_i`; these are the approximations HF documents.
//! - `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: the merge rule
//!   applied to the full deltas `ΔW_i = s_i B_i A_i` `[out, in]`, then a truncated SVD
//!   `ΔW ≈ U_r S_r V_rᵀ`: `B = U_r S_r`, `A = V_rᵀ`, rank `svd_rank` (default: the largest rank);
//!   `svd_clamp` clamps U and Vᵀ to the given quantile of their values.
//!
//! The merge rules (HF `peft.utils.merge_utils`; TIES-Merging, Yadav et al. 2023; DARE, Yu et al.
//! 2023): task arithmetic `Σ w_i T_i`; magnitude pruning keeps the `⌊density·n⌋` entries of
//! largest |value| of each tensor; DARE keeps each entry with probability `density` and divides
//! by it (seeded here, torch's global RNG in HF); TIES prunes by magnitude, elects a sign per
//! entry (`total`: sign of Σ T_i; `frequency`: sign of Σ sign(T_i); ties count as +), and averages
//! the weighted entries that agree with it.
//!
//! The new adapter's config is the first adapter's with `r = lora_alpha = new rank`, the union
//! of the target modules (a list) or the `|`-joined regexes, and empty rank/alpha patterns, as
//! HF builds it; unlike HF, `init_lora_weights` is reset to `true` (a PiSSA / OLoRA value would
//! re-initialise the base weights when the adapter is injected) and the adapter is added frozen
//! (HF `_freeze_adapter`).

use crate::error::{PeftError, Result};
use crate::peft_model::PeftModel;
use crate::tuners::{LoraConfig, TargetModules};
use candle_core::{DType, Tensor, Var};
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};

/// HF's `combination_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combination {
    Svd,
    Linear,
    Cat,
    Ties,
    TiesSvd,
    DareTies,
    DareLinear,
    DareTiesSvd,
    DareLinearSvd,
    MagnitudePrune,
    MagnitudePruneSvd,
}

/// The merge rule behind a combination type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    TaskArithmetic,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
}

impl Combination {
    pub const NAMES: [&'static str; 11] = ["svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd"];

    /// Parse HF's name. Errors: `InvalidArgument` naming `combinationType`.
    pub fn parse(s: &str) -> Result<Self> {
        use Combination::*;
        Ok(match s {
            "svd" => Svd,
            "linear" => Linear,
            "cat" => Cat,
            "ties" => Ties,
            "ties_svd" => TiesSvd,
            "dare_ties" => DareTies,
            "dare_linear" => DareLinear,
            "dare_ties_svd" => DareTiesSvd,
            "dare_linear_svd" => DareLinearSvd,
            "magnitude_prune" => MagnitudePrune,
            "magnitude_prune_svd" => MagnitudePruneSvd,
            _ => return Err(PeftError::invalid_arg("combinationType", format!("Invalid combination_type: {s} (one of {})", Self::NAMES.join(", ")))),
        })
    }

    fn is_svd(self) -> bool {
        matches!(self, Combination::Svd | Combination::TiesSvd | Combination::DareTiesSvd | Combination::DareLinearSvd | Combination::MagnitudePruneSvd)
    }

    fn rule(self) -> Rule {
        use Combination::*;
        match self {
            Svd | Linear | Cat => Rule::TaskArithmetic,
            Ties | TiesSvd => Rule::Ties,
            DareLinear | DareLinearSvd => Rule::DareLinear,
            DareTies | DareTiesSvd => Rule::DareTies,
            MagnitudePrune | MagnitudePruneSvd => Rule::MagnitudePrune,
        }
    }
}

/// HF's `majority_sign_method` of TIES.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MajoritySign {
    #[default]
    Total,
    Frequency,
}

/// The arguments of [`PeftModel::add_weighted_adapter`] (HF names).
#[derive(Clone, Debug)]
pub struct WeightedAdapterOptions {
    pub adapters: Vec<String>,
    pub weights: Vec<f64>,
    pub adapter_name: String,
    pub combination_type: Combination,
    pub svd_rank: Option<usize>,
    /// Quantile in [0, 1] for clamping U and Vᵀ.
    pub svd_clamp: Option<f64>,
    /// Fraction of entries kept by the pruning rules, in [0, 1].
    pub density: Option<f64>,
    pub majority_sign_method: MajoritySign,
    /// Seed of DARE's random pruning.
    pub seed: u64,
}

/// What the merge needs of one source adapter in one layer.
struct Source {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    scaling: f64,
    weight: f64,
}

impl PeftModel {
    /// HF `add_weighted_adapter`: add adapter `o.adapter_name` combining `o.adapters` (see the
    /// module docs for the methods). One source adapter always combines linearly, as in HF. If
    /// the name exists, HF does nothing; here that also gives a warning.
    ///
    /// Errors: `AdapterNotFound`; `InvalidArgument` (weights and adapters of different lengths,
    /// no adapters, a non-LoRA or DoRA adapter, different ranks for the rank-preserving methods,
    /// a missing or out-of-range `density`, `svdClamp` outside [0, 1], list and regex
    /// `target_modules` mixed, two adapters saving the same module); `NoTargetModules` when no
    /// layer carries a source adapter.
    pub fn add_weighted_adapter(&mut self, o: &WeightedAdapterOptions) -> Result<()> {
        if self.peft_config(&o.adapter_name).is_ok() {
            self.warn(format!("add_weighted_adapter: adapter '{}' already exists; nothing was done (as HF)", o.adapter_name));
            return Ok(());
        }
        if o.adapters.is_empty() {
            return Err(PeftError::invalid_arg("adapters", "at least one adapter name is required"));
        }
        if o.weights.len() != o.adapters.len() {
            return Err(PeftError::invalid_arg("weights", format!("{} weights for {} adapters", o.weights.len(), o.adapters.len())));
        }
        if let Some(w) = o.weights.iter().find(|w| !w.is_finite()) {
            return Err(PeftError::invalid_arg("weights", format!("must be finite numbers, found {w}")));
        }
        let mut cfgs: Vec<LoraConfig> = Vec::new();
        for a in &o.adapters {
            match self.peft_config(a)? {
                c if c.as_lora().is_some_and(|c| c.use_dora) => return Err(PeftError::invalid_arg("adapters", format!("adapter '{a}' uses DoRA; add_weighted_adapter combines plain LoRA adapters"))),
                c if c.as_lora().is_some() => cfgs.push(c.as_lora().expect("checked").clone()),
                other => return Err(PeftError::invalid_arg("adapters", format!("adapter '{a}' is {}, add_weighted_adapter combines LoRA adapters", other.peft_type()))),
            }
        }
        // HF `_check_add_weighted_adapter`.
        let saved_twice = self.base.named_layers().into_iter().find(|(_, l)| o.adapters.iter().filter(|a| l.saved_copies.contains_key(*a)).count() > 1);
        if let Some((m, _)) = saved_twice {
            return Err(PeftError::invalid_arg("adapters", format!("Cannot add weighted adapters if they target the same module with modules_to_save, but found `{m}`.")));
        }
        let combination = if o.adapters.len() == 1 { Combination::Linear } else { o.combination_type };
        let ranks: Vec<usize> = cfgs.iter().map(|c| c.rank_pattern.iter().map(|(_, r)| *r).fold(c.r, usize::max)).collect();
        let new_rank = match combination {
            Combination::Cat => ranks.iter().sum(),
            c if c.is_svd() => match o.svd_rank {
                Some(0) => return Err(PeftError::invalid_arg("svdRank", "must be ≥ 1")),
                Some(r) => r,
                None => *ranks.iter().max().unwrap_or(&1),
            },
            _ => {
                if ranks.iter().any(|&r| r != ranks[0]) {
                    return Err(PeftError::invalid_arg("adapters", "All adapters must have the same r value when using combination_type linear, ties, dare_ties or dare_linear."));
                }
                ranks[0]
            }
        };
        let rule = combination.rule();
        if rule != Rule::TaskArithmetic {
            match o.density {
                None => return Err(PeftError::invalid_arg("density", format!("is required for combination_type {:?}", Combination::NAMES[Combination::NAMES.iter().position(|n| Combination::parse(n).ok() == Some(combination)).unwrap_or(0)]))),
                Some(d) if !(d >= 0.0) || !d.is_finite() => return Err(PeftError::invalid_arg("density", format!("Density should be >= 0, got {d}"))),
                Some(d) if d >= 1.0 => self.warn(format!("The density {d} is greater than or equal to 1, no pruning will be performed.")),
                _ => {}
            }
        }
        if let Some(c) = o.svd_clamp {
            if !(0.0..=1.0).contains(&c) {
                return Err(PeftError::invalid_arg("svdClamp", format!("must be a quantile in [0, 1], found {c}")));
            }
        }
        // The new config: the first adapter's, as HF's `replace(...)`.
        let mut v = cfgs[0].to_json();
        let targets = match (&cfgs[0].target_modules, cfgs.iter().all(|c| matches!(c.target_modules, TargetModules::Regex(_)))) {
            (TargetModules::Regex(_), true) => {
                let joined: Vec<String> = cfgs.iter().map(|c| if let TargetModules::Regex(r) = &c.target_modules { format!("({r})") } else { unreachable!() }).collect();
                serde_json::Value::String(joined.join("|"))
            }
            _ if cfgs.iter().all(|c| matches!(c.target_modules, TargetModules::List(_))) => {
                let mut all: Vec<String> = Vec::new();
                for c in &cfgs {
                    if let TargetModules::List(l) = &c.target_modules {
                        for t in l {
                            if !all.contains(t) {
                                all.push(t.clone());
                            }
                        }
                    }
                }
                all.sort();
                serde_json::Value::from(all)
            }
            _ => {
                return Err(PeftError::invalid_arg(
                    "adapters",
                    "all adapter configs should follow the same target modules type. Combining adapters with `target_modules` type being a mix of list/set and string is not supported.",
                ))
            }
        };
        v["r"] = new_rank.into();
        v["lora_alpha"] = new_rank.into();
        v["target_modules"] = targets;
        v["alpha_pattern"] = serde_json::json!({});
        v["rank_pattern"] = serde_json::json!({});
        v["init_lora_weights"] = true.into();
        v["inference_mode"] = true.into();
        let cfg = LoraConfig::from_json(&v, None)?;
        // Per layer: the sources, then the combined A and B.
        let mut plans: Vec<(String, Tensor, Tensor)> = Vec::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
        let mut any = false;
        for (m, lin) in self.base.named_layers() {
            let mut srcs = Vec::new();
            for (a, &w) in o.adapters.iter().zip(&o.weights) {
                if let Some(ad) = lin.lora(a) {
                    srcs.push(Source { a: flat(ad.a.as_tensor())?, b: flat(ad.b.as_tensor())?, r: ad.r, scaling: ad.scaling, weight: w });
                }
            }
            if srcs.is_empty() {
                continue;
            }
            any = true;
            let (rows_b, cols_a) = (srcs[0].b.len() / srcs[0].r, srcs[0].a.len() / srcs[0].r);
            let (a, b) = combine(combination, rule, &srcs, new_rank, rows_b, cols_a, o, &mut rng)?;
            let dev = lin.weight.device().clone();
            plans.push((m, Tensor::from_vec(a, (new_rank, cols_a), &dev)?, Tensor::from_vec(b, (rows_b, new_rank), &dev)?));
        }
        if !any {
            return Err(PeftError::invalid_arg("adapters", "No matching LoRAs found: no layer carries any of the adapters"));
        }
        self.add_adapter(&o.adapter_name, cfg, 0)?;
        let mut plans: std::collections::HashMap<String, (Tensor, Tensor)> = plans.into_iter().map(|(m, a, b)| (m, (a, b))).collect();
        for (m, lin) in self.base.named_layers_mut() {
            let Some(ad) = lin.lora_mut(&o.adapter_name) else { continue };
            if let Some((a, b)) = plans.remove(&m) {
                ad.a = Var::from_tensor(&a)?;
                ad.b = Var::from_tensor(&b)?;
            } else {
                // Targeted by the union but carrying no source adapter: a zero delta (HF zeroes
                // the new weights before filling them).
                ad.a = Var::from_tensor(&ad.a.as_tensor().zeros_like()?)?;
                ad.b = Var::from_tensor(&ad.b.as_tensor().zeros_like()?)?;
            }
        }
        Ok(())
    }
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The combined `(A [rank, cols_a], B [rows_b, rank])` of one layer, row-major f32.
#[allow(clippy::too_many_arguments)]
fn combine(c: Combination, rule: Rule, srcs: &[Source], rank: usize, rows_b: usize, cols_a: usize, o: &WeightedAdapterOptions, rng: &mut rand::rngs::StdRng) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut a = vec![0f32; rank * cols_a];
    let mut b = vec![0f32; rows_b * rank];
    let density = o.density.unwrap_or(1.0);
    if c == Combination::Cat {
        let mut row = 0;
        for s in srcs {
            let f = (s.weight * s.scaling) as f32;
            for i in 0..s.r {
                for j in 0..cols_a {
                    a[(row + i) * cols_a + j] = s.a[i * cols_a + j] * f;
                }
                for k in 0..rows_b {
                    b[k * rank + row + i] = s.b[k * s.r + i];
                }
            }
            row += s.r;
        }
        return Ok((a, b));
    }
    if c.is_svd() {
        // Full deltas ΔW_i = s_i B_i A_i [rows_b, cols_a] in f64, merged, then truncated SVD.
        let deltas: Vec<Vec<f64>> = srcs
            .iter()
            .map(|s| {
                let bm = DMatrix::from_row_slice(rows_b, s.r, &s.b.iter().map(|&x| x as f64).collect::<Vec<_>>());
                let am = DMatrix::from_row_slice(s.r, cols_a, &s.a.iter().map(|&x| x as f64).collect::<Vec<_>>());
                let d = (bm * am) * s.scaling;
                (0..rows_b).flat_map(|i| (0..cols_a).map(move |j| (i, j))).map(|(i, j)| d[(i, j)]).collect()
            })
            .collect();
        let weights: Vec<f64> = srcs.iter().map(|s| s.weight).collect();
        let merged = merge(rule, &deltas, &weights, density, o.majority_sign_method, rng);
        let m = DMatrix::from_row_slice(rows_b, cols_a, &merged);
        let svd = m.try_svd(true, true, 1e-12, 10_000).ok_or_else(|| PeftError::Internal("add_weighted_adapter: the SVD did not converge".into()))?;
        let (u, vt) = (svd.u.ok_or_else(|| PeftError::Internal("SVD without U".into()))?, svd.v_t.ok_or_else(|| PeftError::Internal("SVD without Vᵀ".into()))?);
        let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
        order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
        let mut uu = vec![0f64; rows_b * rank];
        let mut vv = vec![0f64; rank * cols_a];
        for (k, &i) in order.iter().take(rank).enumerate() {
            let s = svd.singular_values[i];
            for r in 0..rows_b {
                uu[r * rank + k] = u[(r, i)] * s;
            }
            for j in 0..cols_a {
                vv[k * cols_a + j] = vt[(i, j)];
            }
        }
        if let Some(q) = o.svd_clamp {
            let mut dist: Vec<f64> = uu.iter().chain(vv.iter()).copied().collect();
            dist.sort_by(|x, y| x.total_cmp(y));
            // torch.quantile: linear interpolation between the closest ranks.
            let pos = q * (dist.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            let hi_val = dist[lo] + (dist[hi] - dist[lo]) * (pos - lo as f64);
            let low_val = -hi_val;
            for x in uu.iter_mut().chain(vv.iter_mut()) {
                *x = x.max(low_val).min(hi_val);
            }
        }
        return Ok((vv.into_iter().map(|x| x as f32).collect(), uu.into_iter().map(|x| x as f32).collect()));
    }
    // Rank-preserving methods: the rule on the A's and on the B's separately.
    let wa: Vec<f64> = srcs.iter().map(|s| (s.weight * s.scaling).abs().sqrt() * if s.weight * s.scaling >= 0.0 { 1.0 } else { -1.0 }).collect();
    let wb: Vec<f64> = srcs.iter().map(|s| (s.weight * s.scaling).abs().sqrt()).collect();
    let as_: Vec<Vec<f64>> = srcs.iter().map(|s| s.a.iter().map(|&x| x as f64).collect()).collect();
    let bs: Vec<Vec<f64>> = srcs.iter().map(|s| s.b.iter().map(|&x| x as f64).collect()).collect();
    let ma = merge(rule, &as_, &wa, density, o.majority_sign_method, rng);
    let mb = merge(rule, &bs, &wb, density, o.majority_sign_method, rng);
    a.copy_from_slice(&ma.into_iter().map(|x| x as f32).collect::<Vec<_>>());
    b.copy_from_slice(&mb.into_iter().map(|x| x as f32).collect::<Vec<_>>());
    Ok((a, b))
}

/// HF `merge_utils`: combine equally long task tensors with `weights`.
fn merge(rule: Rule, tasks: &[Vec<f64>], weights: &[f64], density: f64, sign: MajoritySign, rng: &mut rand::rngs::StdRng) -> Vec<f64> {
    let n = tasks[0].len();
    let pruned: Vec<Vec<f64>> = match rule {
        Rule::TaskArithmetic => tasks.to_vec(),
        Rule::Ties | Rule::MagnitudePrune => tasks.iter().map(|t| magnitude_prune(t, density)).collect(),
        Rule::DareLinear | Rule::DareTies => tasks.iter().map(|t| random_prune(t, density, rng)).collect(),
    };
    match rule {
        Rule::TaskArithmetic | Rule::MagnitudePrune | Rule::DareLinear => (0..n).map(|j| pruned.iter().zip(weights).map(|(t, w)| t[j] * w).sum()).collect(),
        Rule::Ties | Rule::DareTies => (0..n)
            .map(|j| {
                let sgn = |x: f64| if x > 0.0 { 1.0 } else if x < 0.0 { -1.0 } else { 0.0 };
                let magnitude: f64 = match sign {
                    MajoritySign::Total => pruned.iter().map(|t| t[j]).sum(),
                    MajoritySign::Frequency => pruned.iter().map(|t| sgn(t[j])).sum(),
                };
                let majority = if magnitude >= 0.0 { 1.0 } else { -1.0 };
                let (mut sum, mut count) = (0.0, 0.0);
                for (t, w) in pruned.iter().zip(weights) {
                    if sgn(t[j]) == majority {
                        sum += t[j] * w;
                        count += 1.0;
                    }
                }
                sum / f64::max(count, 1.0)
            })
            .collect(),
    }
}

/// Keep the `⌊density·n⌋` entries of largest |value| (HF `magnitude_based_pruning`); no pruning
/// when `density ≥ 1`.
fn magnitude_prune(t: &[f64], density: f64) -> Vec<f64> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let k = (density * t.len() as f64) as usize;
    let mut idx: Vec<usize> = (0..t.len()).collect();
    idx.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()).then(i.cmp(&j)));
    let mut out = vec![0.0; t.len()];
    for &i in idx.iter().take(k) {
        out[i] = t[i];
    }
    out
}

/// DARE: keep each entry with probability `density` and rescale by `1/density` (HF
/// `random_pruning(rescale=True)`); no pruning when `density ≥ 1`.
fn random_prune(t: &[f64], density: f64, rng: &mut rand::rngs::StdRng) -> Vec<f64> {
    if density >= 1.0 {
        return t.to_vec();
    }
    t.iter().map(|&x| if rng.random::<f64>() < density { x / density } else { 0.0 }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_elects_the_sign_and_averages_agreeing_entries() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let t = vec![vec![1.0, -2.0, 0.5], vec![-3.0, -1.0, 0.25]];
        let out = merge(Rule::Ties, &t, &[1.0, 1.0], 1.0, MajoritySign::Total, &mut rng);
        // entry 0: total −2 → sign −, only −3 agrees; entry 1: both −; entry 2: both +.
        assert_eq!(out, vec![-3.0, -1.5, 0.375]);
        let out = merge(Rule::Ties, &t, &[1.0, 1.0], 1.0, MajoritySign::Frequency, &mut rng);
        // entry 0: one + one − → frequency 0 ≥ 0 → +: only 1.0 agrees.
        assert_eq!(out[0], 1.0);
    }

    #[test]
    fn magnitude_pruning_keeps_the_largest_entries() {
        assert_eq!(magnitude_prune(&[0.1, -3.0, 2.0, 0.5], 0.5), vec![0.0, -3.0, 2.0, 0.0]);
        assert_eq!(magnitude_prune(&[0.1, -3.0], 1.0), vec![0.1, -3.0]);
    }

    #[test]
    fn dare_keeps_about_density_and_rescales() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let t = vec![1.0; 10_000];
        let out = random_prune(&t, 0.25, &mut rng);
        let kept = out.iter().filter(|&&x| x != 0.0).count() as f64 / 10_000.0;
        assert!((kept - 0.25).abs() < 0.02, "{kept}");
        assert!(out.iter().all(|&x| x == 0.0 || x == 4.0));
    }
}
