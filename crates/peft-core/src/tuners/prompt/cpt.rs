//! CPT, context-aware prompt tuning (Blau et al. 2024, "Context-aware Prompt Tuning: Advancing
//! In-Context Learning with Adversarial Methods", arXiv 2410.17222), as HF PEFT 0.21 implements
//! it for causal LMs (`peft/tuners/cpt/`, `PeftModelForCausalLM._cpt_forward`).
//!
//! The virtual tokens are in-context examples: `cpt_token_ids` (`n` ids) with a type per token in
//! `cpt_tokens_type_mask` (`1` input template, `2` input, `3` output template, `4` label; the
//! `k`-th example uses `4k+1 ..= 4k+4`). The prompt table is
//!
//! `prompt = E[cpt_token_ids] + P(δ)`, `E` the base word embeddings (frozen, f32), `δ` `[n, token_dim]`
//! the trainable delta (starts at 0),
//!
//! where `P` scales each row of `δ` to a norm of at most `ε_i` (`P(δ)_i = δ_i · ε_i / max(‖δ_i‖, ε_i)`
//! for `‖δ_i‖ > 0`), with `ε_i = opt_projection_format_epsilon · sqrt(token_dim / 2048)` for template
//! tokens (type `≡ 1, 3 mod 4`), `opt_projection_epsilon · sqrt(token_dim / 2048)` for input tokens
//! (`≡ 2 mod 4`) and `1e-10` otherwise. HF applies `P` to the stored delta at every forward; here
//! the table applies it to the value (with the gradient passed straight to `δ`) and
//! [`CptHead::project`] writes it back after every optimizer step (the trainer's generic
//! after-step hook), which leaves the same numbers. The gradient of `δ` is zero on label rows
//! (type `≡ 0 mod 4`, HF's backward hook).
//!
//! The loss (HF `CPTEmbedding.calculate_loss`): labels are `cpt_token_ids ++ labels`, types are
//! `cpt_tokens_type_mask ++ input_type_mask'` where the input types above 0 are shifted by
//! `max(cpt_tokens_type_mask)` (an absent `input_type_mask` counts as all 4s); only positions of a
//! type `> 0` and `≡ 0 mod 4` keep their label. With the usual causal shift, the loss is the mean
//! over the kept positions of `w · CE`, where `w = 1` for `opt_weighted_loss_type = "none"` and,
//! for `"decay"`, `opt_loss_decay_factor^j` for the label group `j` places from the last one (the
//! query's labels have weight 1, the in-context labels before them decay).
//!
//! On disk: HF's adapter_config.json with the fields below, and `prompt_embeddings` `[n, token_dim]`
//! = `E[cpt_token_ids] + P(δ)`. A loaded adapter puts that table in place of `E` with `δ = 0` (as
//! HF's `_load_adapter_state_dict` does).

use crate::error::{PeftError, Result};
use crate::model::Task;
use crate::peft_model::{LoadResult, PeftModel};
use crate::tuners::config::AdapterConfig;
use super::PromptLearningConfig;
use crate::tuners::registry::Tuner;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Map, Value};
use std::path::Path;

/// The CPT-specific fields of HF's `CPTConfig` (the prompt-learning ones live on
/// [`super::PromptLearningConfig`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CptOptions {
    /// The in-context token ids (default `[0]`); `num_virtual_tokens = len`.
    pub cpt_token_ids: Vec<u32>,
    /// Default all ones. HF keeps it in the config and does not use it otherwise.
    pub cpt_mask: Vec<i64>,
    /// Token types (default all 1s), see the module docs.
    pub cpt_tokens_type_mask: Vec<i64>,
    /// `"none"` or `"decay"`.
    pub opt_weighted_loss_type: String,
    pub opt_loss_decay_factor: f64,
    pub opt_projection_epsilon: f64,
    pub opt_projection_format_epsilon: f64,
}

/// HF's defaults of the CPT fields (`CPTConfig` before `__post_init__`).
pub(super) fn defaults() -> Value {
    json!({
        "cpt_token_ids": null, "cpt_mask": null, "cpt_tokens_type_mask": null, "opt_weighted_loss_type": "none",
        "opt_loss_decay_factor": 1.0, "opt_projection_epsilon": 0.1, "opt_projection_format_epsilon": 0.1,
        "tokenizer_name_or_path": null
    })
}

impl CptOptions {
    /// Read and check the CPT fields of `raw` (HF `CPTConfig.__post_init__`): `task_type` must be
    /// `CAUSAL_LM`; absent lists take HF's defaults; the three lists must have one entry per
    /// token. Also refused here (HF would fail later or compute a meaningless loss): ids that are
    /// not non-negative integers, negative types, an `opt_weighted_loss_type` other than
    /// `"none"` / `"decay"`, and non-finite or negative factors.
    ///
    /// Errors: `InvalidAdapterConfig` naming the field (HF's message where HF has one).
    pub fn from_raw(raw: &Map<String, Value>, task_type: Option<&str>, path: Option<&Path>) -> Result<Self> {
        let bad = |msg: String| PeftError::InvalidAdapterConfig { path: path.map(|p| p.to_path_buf()), msg };
        if task_type != Some("CAUSAL_LM") {
            return Err(bad("CPTConfig only supports task_type = CAUSAL_LM.".into()));
        }
        let ints = |k: &str| -> Result<Option<Vec<i64>>> {
            match raw.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| x.as_i64().ok_or_else(|| bad(format!("`{k}` must be a list of integers, found {x} in it"))))
                    .collect::<Result<Vec<_>>>()
                    .map(Some),
                Some(other) => Err(bad(format!("`{k}` must be a list of integers or null, found {other}"))),
            }
        };
        let ids = ints("cpt_token_ids")?.unwrap_or_else(|| vec![0]);
        if ids.is_empty() || ids.len() > super::MAX_VIRTUAL_TOKENS {
            return Err(bad(format!("`cpt_token_ids` must hold between 1 and {} token ids, found {}", super::MAX_VIRTUAL_TOKENS, ids.len())));
        }
        if let Some(x) = ids.iter().find(|&&x| x < 0 || x > u32::MAX as i64) {
            return Err(bad(format!("`cpt_token_ids` must hold token ids (non-negative integers), found {x}")));
        }
        let mask = ints("cpt_mask")?.unwrap_or_else(|| vec![1; ids.len()]);
        let types = ints("cpt_tokens_type_mask")?.unwrap_or_else(|| vec![1; ids.len()]);
        if mask.len() != ids.len() || types.len() != ids.len() {
            return Err(bad("cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same length.".into()));
        }
        if let Some(t) = types.iter().find(|&&t| t < 0) {
            return Err(bad(format!("`cpt_tokens_type_mask` values must be non-negative, found {t}")));
        }
        let loss_type = match raw.get("opt_weighted_loss_type") {
            None | Some(Value::Null) => "none".to_string(),
            Some(Value::String(s)) if s == "none" || s == "decay" => s.clone(),
            Some(other) => return Err(bad(format!("`opt_weighted_loss_type` must be \"none\" or \"decay\", found {other}"))),
        };
        let num = |k: &str, default: f64| -> Result<f64> {
            match raw.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v.as_f64().filter(|x| x.is_finite() && *x >= 0.0).ok_or_else(|| bad(format!("`{k}` must be a finite non-negative number, found {v}"))),
            }
        };
        Ok(CptOptions {
            cpt_token_ids: ids.iter().map(|&x| x as u32).collect(),
            cpt_mask: mask,
            cpt_tokens_type_mask: types,
            opt_weighted_loss_type: loss_type,
            opt_loss_decay_factor: num("opt_loss_decay_factor", 1.0)?,
            opt_projection_epsilon: num("opt_projection_epsilon", 0.1)?,
            opt_projection_format_epsilon: num("opt_projection_format_epsilon", 0.1)?,
        })
    }

    /// Write the CPT fields into an adapter_config.json object (numbers kept as given when they
    /// parse to the same value, so HF's files re-save byte for byte).
    pub(super) fn write(&self, m: &mut Map<String, Value>) {
        m.insert("cpt_token_ids".into(), Value::from(self.cpt_token_ids.clone()));
        m.insert("cpt_mask".into(), Value::from(self.cpt_mask.clone()));
        m.insert("cpt_tokens_type_mask".into(), Value::from(self.cpt_tokens_type_mask.clone()));
        m.insert("opt_weighted_loss_type".into(), Value::String(self.opt_weighted_loss_type.clone()));
        for (k, v) in [
            ("opt_loss_decay_factor", self.opt_loss_decay_factor),
            ("opt_projection_epsilon", self.opt_projection_epsilon),
            ("opt_projection_format_epsilon", self.opt_projection_format_epsilon),
        ] {
            if m.get(k).and_then(|x| x.as_f64()) != Some(v) {
                m.insert(k.into(), serde_json::Number::from_f64(v).map(Value::Number).unwrap_or(Value::Null));
            }
        }
    }

    /// Per-token projection radius `ε` `[n]` (HF `CPTEmbedding.get_epsilon`) for width `token_dim`.
    pub fn epsilon(&self, token_dim: usize) -> Vec<f32> {
        // HF: eps * sqrt(Tensor([token_dim / 2048])) in float32.
        let scale = ((token_dim as f64 / 2048.0) as f32).sqrt();
        let fmt = self.opt_projection_format_epsilon as f32 * scale;
        let inp = self.opt_projection_epsilon as f32 * scale;
        self.cpt_tokens_type_mask
            .iter()
            .map(|&t| match (t > 0, t % 4) {
                (true, 1) | (true, 3) => fmt,
                (true, 2) => inp,
                _ => 1e-10,
            })
            .collect()
    }

    /// Rows of δ that receive gradients (HF's backward hook): types `≡ 1, 2, 3 mod 4`.
    pub fn grad_mask(&self) -> Vec<f32> {
        self.cpt_tokens_type_mask.iter().map(|&t| if matches!(t % 4, 1..=3) { 1.0 } else { 0.0 }).collect()
    }
}

/// The trainable part of a CPT encoder (HF `CPTEmbedding.delta_embedding` with its masks).
pub struct CptHead {
    /// `[n, token_dim]` f32, trainable.
    pub delta: Var,
    /// `[n, 1]` f32: 1 where δ gets gradients.
    grad_mask: Tensor,
    /// `[n]` f32 projection radii.
    epsilon: Tensor,
}

impl CptHead {
    /// A zero delta for `opts` on `device`.
    pub fn new(opts: &CptOptions, token_dim: usize, device: &Device) -> Result<Self> {
        let n = opts.cpt_token_ids.len();
        Ok(CptHead {
            delta: Var::from_tensor(&Tensor::zeros((n, token_dim), DType::F32, device)?)?,
            grad_mask: Tensor::from_vec(opts.grad_mask(), (n, 1), device)?,
            epsilon: Tensor::from_vec(opts.epsilon(token_dim), n, device)?,
        })
    }

    /// `P(δ)` (HF `get_projection`), detached: rows with norm 0 unchanged, others scaled by
    /// `ε / max(‖δ_i‖, ε)`.
    pub fn projected(&self) -> Result<Tensor> {
        let d = self.delta.as_tensor().detach();
        let norm = d.sqr()?.sum(1)?.sqrt()?; // [n]
        let denom = norm.maximum(&self.epsilon)?;
        let factor = self.epsilon.div(&denom)?;
        let positive = norm.gt(0f64)?;
        let factor = positive.where_cond(&factor, &Tensor::ones_like(&factor)?)?;
        Ok(d.broadcast_mul(&factor.unsqueeze(1)?)?)
    }

    /// Write `P(δ)` back into δ (run after every optimizer step, as HF's forward does before
    /// using δ).
    pub fn project(&self) -> Result<()> {
        let p = self.projected()?;
        self.delta.set(&p)?;
        Ok(())
    }

    /// `embedding + P(δ)` `[n, token_dim]`; the gradient reaches δ on the unmasked rows only.
    pub fn table(&self, embedding: &Tensor) -> Result<Tensor> {
        let value = (embedding.detach() + self.projected()?)?;
        let d = self.delta.as_tensor().broadcast_mul(&self.grad_mask)?;
        // `d - d.detach()` is exactly 0 and carries the masked identity gradient to δ.
        Ok((value + (&d - d.detach())?)?)
    }
}

/// HF's CPT labels and types for a causal-LM batch: `(labels, types)` `[b, n + s]` each, labels
/// `-100` where the type is not a label type (see the module docs).
///
/// Errors: `InvalidArgument` naming `labels` (not `b × s` values) or `inputTypeMask` (wrong
/// length, negative values).
pub fn cpt_labels(opts: &CptOptions, labels: &[i64], input_type_mask: Option<&[i64]>, b: usize, s: usize) -> Result<(Vec<i64>, Vec<i64>)> {
    if labels.len() != b * s {
        return Err(PeftError::invalid_arg("labels", format!("has {} values, expected batch {b} × seq {s}", labels.len())));
    }
    if let Some(m) = input_type_mask {
        if m.len() != b * s {
            return Err(PeftError::invalid_arg("inputTypeMask", format!("has {} values, expected batch {b} × seq {s}", m.len())));
        }
        if let Some(t) = m.iter().find(|&&t| t < 0) {
            return Err(PeftError::invalid_arg("inputTypeMask", format!("values must be non-negative token types, found {t}")));
        }
    }
    let n = opts.cpt_token_ids.len();
    let shift = opts.cpt_tokens_type_mask.iter().copied().max().unwrap_or(0);
    let mut out_l = Vec::with_capacity(b * (n + s));
    let mut out_t = Vec::with_capacity(b * (n + s));
    for r in 0..b {
        out_l.extend(opts.cpt_token_ids.iter().map(|&x| x as i64));
        out_t.extend_from_slice(&opts.cpt_tokens_type_mask);
        out_l.extend_from_slice(&labels[r * s..(r + 1) * s]);
        out_t.extend((0..s).map(|i| {
            let t = input_type_mask.map(|m| m[r * s + i]).unwrap_or(4);
            if t > 0 { t + shift } else { t }
        }));
    }
    for (l, &t) in out_l.iter_mut().zip(&out_t) {
        if !(t > 0 && t % 4 == 0) {
            *l = -100;
        }
    }
    Ok((out_l, out_t))
}

/// The shifted targets and weights of the CPT loss for `[b, n + s]` labels and types (see
/// [`cpt_labels`]): position `i < n + s − 1` of row `r` scores label `i + 1`; returns
/// `(targets, weights, kept)` with `b · (n + s)` entries (weight 0 where nothing is scored).
pub fn cpt_loss_weights(opts: &CptOptions, labels: &[i64], types: &[i64], b: usize, t: usize, vocab: usize) -> (Vec<u32>, Vec<f32>, usize) {
    let mut targets = vec![0u32; b * t];
    let mut weights = vec![0f32; b * t];
    let mut kept = 0;
    for r in 0..b {
        let lab = &labels[r * t + 1..(r + 1) * t];
        let typ = &types[r * t + 1..(r + 1) * t];
        // Label groups (types > 0 and ≡ 0 mod 4), the last one weighted 1, earlier ones decayed.
        let mut groups: Vec<i64> = typ.iter().copied().filter(|&x| x > 0 && x % 4 == 0).collect();
        groups.sort_unstable();
        groups.dedup();
        let mut decay = vec![1f32; typ.len()];
        let mut value = 1f32;
        for g in groups.iter().rev() {
            for (d, &x) in decay.iter_mut().zip(typ) {
                if x == *g {
                    *d = value;
                }
            }
            value *= opts.opt_loss_decay_factor as f32;
        }
        for (i, &l) in lab.iter().enumerate() {
            if l >= 0 && (l as usize) < vocab {
                targets[r * t + i] = l as u32;
                weights[r * t + i] = if opts.opt_weighted_loss_type == "decay" { decay[i] } else { 1.0 };
                kept += 1;
            }
        }
    }
    (targets, weights, kept)
}

/// The CPT loss (HF `CPTEmbedding.calculate_loss`) of causal-LM `logits` `[b, n + s, vocab]`
/// for a batch's `labels` `[b, s]` and `input_type_mask` `[b, s]`: `(mean, kept positions)`.
///
/// Errors: `InvalidArgument` naming `inputTypeMask` when it does not fit the batch or when no
/// position is left to score (HF's loss would be NaN), or naming `labels` when the logits do
/// not have `n + s` positions.
pub fn cpt_loss(opts: &CptOptions, logits: &Tensor, labels: &[i64], input_type_mask: Option<&[i64]>, b: usize, s: usize) -> Result<(Tensor, usize)> {
    let n = opts.cpt_token_ids.len();
    let (lb, lt, vocab) = logits.dims3()?;
    if lb != b || lt != n + s {
        return Err(PeftError::invalid_arg("labels", format!("batch {b} × seq {s} plus {n} CPT tokens does not fit logits of shape {:?}", logits.dims())));
    }
    let (labels, types) = cpt_labels(opts, labels, input_type_mask, b, s)?;
    let (targets, mut weights, kept) = cpt_loss_weights(opts, &labels, &types, b, n + s, vocab);
    if kept == 0 {
        return Err(PeftError::invalid_arg(
            "inputTypeMask",
            "leaves no label position for the CPT loss (labels count only where the shifted type is > 0 and a multiple of 4; without inputTypeMask every input token has type 4 + max(cpt_tokens_type_mask))",
        ));
    }
    let scale = 1.0 / kept as f32;
    weights.iter_mut().for_each(|w| *w *= scale);
    let flat = logits.reshape((b * (n + s), vocab))?;
    Ok((crate::ops::weighted_cross_entropy(&flat, targets, weights)?, kept))
}

/// The CPT tuner (HF `register_peft_method(name="cpt", config_cls=CPTConfig, model_cls=CPTEmbedding)`):
/// a prompt-learning method whose adapters live in the model's prompt encoders.
pub struct CptTuner;

/// The registered CPT tuner.
pub static TUNER: CptTuner = CptTuner;

impl Tuner for CptTuner {
    crate::tuners::registry::declare_tuner!(peft_types: &["CPT"], model_class: "PeftModel", config: PromptLearningConfig,
        inject: |model, name, c, seed| match model.base.task() {
            Task::CausalLm => model.add_prompt(name, c, seed, None).map(|_| vec![]),
            other => Err(PeftError::InvalidAdapterConfig { path: None, msg: format!("CPT needs a causal LM; this model is {}", other.task_type()) }),
        });
    fn prefix(&self, _peft_type: &str) -> Option<&'static str> {
        Some("cpt_")
    }
    fn refusal(&self, op: crate::tuners::registry::Operation, _name: &str, cfg: &AdapterConfig) -> Option<PeftError> {
        super::refusal(op, cfg)
    }
    /// HF projects the CPT delta into its norm bounds at the start of every forward; here that
    /// happens after every optimizer step that trained adapter `name` (active, not in inference
    /// mode), which gives the next forward the same values. Runs whatever `global_step` says
    /// (the projection is not step logic a caller takes over).
    fn after_step(&self, model: &PeftModel, name: &str, cfg: &AdapterConfig, global_step: Option<usize>, grads: &GradStore) -> Result<()> {
        let _ = (global_step, grads);
        if cfg.inference_mode() || !model.active_adapters().iter().any(|a| a == name) {
            return Ok(());
        }
        match model.prompt_encoders.get(name) {
            Some(enc) => enc.after_optimizer_step(),
            None => Ok(()),
        }
    }
    fn load(&self, model: &mut PeftModel, name: &str, cfg: &AdapterConfig, tensors: &mut Vec<(String, Tensor)>, wpath: &Path) -> Option<Result<LoadResult>> {
        let c = cfg.as_prompt()?.clone();
        if model.base.task() != Task::CausalLm {
            return Some(Err(PeftError::InvalidAdapterConfig { path: Some(wpath.to_path_buf()), msg: format!("CPT needs a causal LM; this model is {}", model.base.task().task_type()) }));
        }
        Some(model.load_prompt(name, c, std::mem::take(tensors), wpath))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(types: &[i64], kind: &str, f: f64) -> CptOptions {
        CptOptions {
            cpt_token_ids: vec![7; types.len()],
            cpt_mask: vec![1; types.len()],
            cpt_tokens_type_mask: types.to_vec(),
            opt_weighted_loss_type: kind.into(),
            opt_loss_decay_factor: f,
            opt_projection_epsilon: 0.2,
            opt_projection_format_epsilon: 0.1,
        }
    }

    #[test]
    fn labels_keep_only_label_types_after_the_shift() {
        let o = opts(&[1, 2, 3, 4], "none", 1.0);
        let (l, t) = cpt_labels(&o, &[10, 11, 12], Some(&[1, 4, 0]), 1, 3).unwrap();
        assert_eq!(t, vec![1, 2, 3, 4, 5, 8, 0]);
        assert_eq!(l, vec![-100, -100, -100, 7, -100, 11, -100]);
        // No input types: every input token is 4 + max(prefix types) = 8, a label type.
        let (l, _) = cpt_labels(&o, &[10, 11], None, 1, 2).unwrap();
        assert_eq!(l, vec![-100, -100, -100, 7, 10, 11]);
        assert_eq!(cpt_labels(&o, &[10], Some(&[1, 2]), 1, 1).unwrap_err().code(), "ERR_INVALID_ARGUMENT");
        assert!(cpt_labels(&o, &[10, 11], None, 1, 3).unwrap_err().to_string().contains("labels"));
    }

    #[test]
    fn decay_weights_the_last_label_group_one() {
        let o = opts(&[4, 8], "decay", 0.5);
        // Shifted types: [8, 12, 12]; groups 12 (weight 1) then 8 (0.5); labels all kept.
        let (l, t) = cpt_labels(&o, &[1, 2], Some(&[4, 4]), 1, 2).unwrap();
        let (_, w, kept) = cpt_loss_weights(&o, &l, &t, 1, 4, 16);
        assert_eq!((w, kept), (vec![0.5, 1.0, 1.0, 0.0], 3));
    }

    #[test]
    fn projection_caps_row_norms() {
        let o = opts(&[1, 2, 4], "none", 1.0);
        let h = CptHead::new(&o, 2048, &Device::Cpu).unwrap();
        h.delta.set(&Tensor::new(&[[3f32, 4.0], [0.03, 0.04], [1.0, 0.0]], &Device::Cpu).unwrap().pad_with_zeros(1, 0, 2046).unwrap()).unwrap();
        h.project().unwrap();
        let n = h.delta.as_tensor().sqr().unwrap().sum(1).unwrap().sqrt().unwrap().to_vec1::<f32>().unwrap();
        assert!((n[0] - 0.1).abs() < 1e-6 && (n[1] - 0.05).abs() < 1e-6 && n[2] < 1e-9, "{n:?}");
    }
}
