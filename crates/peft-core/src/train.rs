//! Training of adapter parameters: causal-LM loss, backward with candle's autograd, gradient
//! accumulation, clipping by global norm, AdamW, and transformers' learning-rate schedules
//! (linear, cosine, constant, constant with warm-up; [`LrSchedule`]) — the defaults of
//! transformers' `Trainer` (AdamW betas 0.9/0.999, eps 1e-8, weight decay 0,
//! `get_linear_schedule_with_warmup`, `clip_grad_norm_`) — and evaluation loss.

use crate::error::{PeftError, Result};
use crate::model::{ForwardOptions, Task};
use crate::ops::causal_lm_loss;
use crate::peft_model::PeftModel;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::ParamsAdamW;
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Hyper-parameters (transformers `TrainingArguments` names).
#[derive(Debug, Clone)]
pub struct TrainingArgs {
    pub learning_rate: f64,
    /// Total optimizer steps (for the schedule).
    pub max_steps: usize,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Clip the global gradient L2 norm to this value; `0` disables clipping.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// The learning-rate schedule (transformers' `lr_scheduler_type`; default linear).
    pub lr_scheduler_type: LrSchedule,
    /// Gradient checkpointing for this trainer's steps (transformers' `gradient_checkpointing`;
    /// default off): the same losses and gradients, one decoder layer's activations in memory
    /// instead of all of them, one more forward pass of the layers per step. On when either
    /// this or the model's own setting ([`PeftModel::set_gradient_checkpointing`]) is on. See
    /// `peft_model::checkpointing` for where it runs and what is refused.
    pub gradient_checkpointing: bool,
    /// Run the tuners' after-step logic after every optimizer step (default true): AdaLoRA's
    /// `update_and_allocate` with the 0-based step. `false` leaves it to the caller
    /// ([`PeftModel::update_and_allocate_recorded`], TS `updateAndAllocate`); the step's
    /// gradients are still recorded for it.
    pub tuner_step_hooks: bool,
}

/// transformers' learning-rate schedules (`SchedulerType`), as the factor applied to the base
/// learning rate at 0-based optimizer step `step` of `total` with `warmup` warm-up steps
/// (`transformers.optimization`, `_get_*_lr_lambda`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LrSchedule {
    /// `get_linear_schedule_with_warmup`: `step / warmup`, then linear decay to 0 at `total`.
    #[default]
    Linear,
    /// `get_cosine_schedule_with_warmup` (`num_cycles = 0.5`): `step / warmup`, then
    /// `0.5 · (1 + cos(π · progress))` with `progress = (step − warmup) / (total − warmup)`.
    Cosine,
    /// `get_constant_schedule`: 1 at every step (the warm-up is ignored, as in transformers).
    Constant,
    /// `get_constant_schedule_with_warmup`: `step / warmup`, then 1.
    ConstantWithWarmup,
}

impl LrSchedule {
    /// Parse transformers' name (`linear`, `cosine`, `constant`, `constant_with_warmup`).
    ///
    /// Errors: `InvalidArgument` naming `lrSchedulerType` and the supported names.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "linear" => LrSchedule::Linear,
            "cosine" => LrSchedule::Cosine,
            "constant" => LrSchedule::Constant,
            "constant_with_warmup" => LrSchedule::ConstantWithWarmup,
            other => {
                return Err(PeftError::invalid_arg(
                    "lrSchedulerType",
                    format!("`{other}` is not supported (supported: linear, cosine, constant, constant_with_warmup)"),
                ))
            }
        })
    }

    /// transformers' name of the schedule.
    pub fn name(self) -> &'static str {
        match self {
            LrSchedule::Linear => "linear",
            LrSchedule::Cosine => "cosine",
            LrSchedule::Constant => "constant",
            LrSchedule::ConstantWithWarmup => "constant_with_warmup",
        }
    }

    /// The factor at 0-based step `step`.
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        if self == LrSchedule::Constant {
            return 1.0;
        }
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        match self {
            LrSchedule::Linear => linear_schedule(step, warmup, total),
            LrSchedule::Cosine => {
                let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
            LrSchedule::Constant | LrSchedule::ConstantWithWarmup => 1.0,
        }
    }
}

impl Default for TrainingArgs {
    fn default() -> Self {
        TrainingArgs {
            learning_rate: 5e-5,
            max_steps: 1,
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            lr_scheduler_type: LrSchedule::Linear,
            gradient_checkpointing: false,
            tuner_step_hooks: true,
        }
    }
}

/// One micro-batch: row-major `[b, s]` ids, mask (1 = token, 0 = pad) and labels (`-100` =
/// ignored). What `labels` holds depends on the model's head ([`Task`]), as in transformers:
/// - `CausalLm`: `[b, s]` token ids, usually the input ids; the loss shifts them by one;
/// - `SeqCls`: `[b]` class indices;
/// - `TokenCls`: `[b, s]` class indices per token;
/// - `QuestionAns`: empty; `start_positions` / `end_positions` `[b]` instead;
/// - `Seq2SeqLm`: `[b, t]` target ids (any `t`); the decoder input is the labels shifted right
///   (`decoder_start_token_id` first, `-100` read as pad) unless `decoder_input_ids` is given.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<u8>,
    pub labels: Vec<i64>,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Multitask prompt tuning: one task id per row.
    pub task_ids: Option<Vec<u32>>,
    /// BERT-family segment ids `[b, s]`.
    pub token_type_ids: Option<Vec<u32>>,
    /// Question answering: answer start / end token per row `[b]` (clamped to `[0, s]`; `s`
    /// is ignored, as transformers does).
    pub start_positions: Option<Vec<i64>>,
    pub end_positions: Option<Vec<i64>>,
    /// Seq2seq: explicit decoder input ids `[b, t]` (default: labels shifted right).
    pub decoder_input_ids: Option<Vec<u32>>,
    /// Seq2seq: decoder mask `[b, t]`.
    pub decoder_attention_mask: Option<Vec<u8>>,
    /// CPT: the token type of every input token `[b, s]` (HF's `input_type_mask`: `0` not
    /// scored, then per example `4k+1` input template, `4k+2` input, `4k+3` output template,
    /// `4k+4` label); absent, every token counts as type 4.
    pub input_type_mask: Option<Vec<i64>>,
}

impl Batch {
    /// The forward options the batch implies (evaluation mode; set `train` / `dropout_rng` for
    /// training): its mask, task ids, token types and decoder inputs; for a seq2seq model without
    /// `decoder_input_ids`, the labels shifted right (T5's `_shift_right`).
    pub fn forward_options(&self, model: &PeftModel) -> ForwardOptions {
        let info = model.base.info();
        let decoder_input_ids = match (&self.decoder_input_ids, info.task) {
            (Some(d), _) => Some(d.clone()),
            (None, Task::Seq2SeqLm) if !self.labels.is_empty() => {
                Some(shift_right(&self.labels, self.batch_size, info.decoder_start_token_id.unwrap_or(0), info.pad_token_id.unwrap_or(0)))
            }
            _ => None,
        };
        ForwardOptions {
            attention_mask: Some(self.attention_mask.clone()),
            task_ids: self.task_ids.clone(),
            token_type_ids: self.token_type_ids.clone(),
            decoder_input_ids,
            decoder_attention_mask: self.decoder_attention_mask.clone(),
            ..Default::default()
        }
    }

    /// Check the batch against the model's head (shapes, label ranges).
    ///
    /// Errors: `InvalidArgument` naming `batch`, `labels`, `startPositions` or `endPositions`.
    pub fn validate(&self, model: &PeftModel) -> Result<()> {
        let info = model.base.info();
        let n = self.batch_size * self.seq_len;
        if n == 0 {
            return Err(PeftError::invalid_arg("batch", "is empty"));
        }
        if self.input_ids.len() != n || self.attention_mask.len() != n {
            return Err(PeftError::invalid_arg("batch", format!("inputIds/attentionMask must each have {} × {} values", self.batch_size, self.seq_len)));
        }
        let (want, classes, what) = match info.task {
            Task::CausalLm => (Some(n), info.vocab_size, "a token id below the vocabulary size"),
            Task::TokenCls => (Some(n), info.num_labels.unwrap_or(0), "a class index below num_labels"),
            Task::SeqCls => (Some(self.batch_size), info.num_labels.unwrap_or(0), "a class index below num_labels"),
            Task::Seq2SeqLm => (None, info.vocab_size, "a token id below the vocabulary size"),
            Task::QuestionAns | Task::FeatureExtraction => (None, 0, ""),
        };
        if let Some(w) = want {
            if self.labels.len() != w {
                return Err(PeftError::invalid_arg("labels", format!("must have {w} values for a {} model (batch {} × seq {})", info.task.task_type(), self.batch_size, self.seq_len)));
            }
        }
        if info.task == Task::Seq2SeqLm && (self.labels.is_empty() || self.labels.len() % self.batch_size != 0) {
            return Err(PeftError::invalid_arg("labels", format!("must hold batch {} × target length values", self.batch_size)));
        }
        if info.task == Task::QuestionAns && !self.labels.is_empty() {
            return Err(PeftError::invalid_arg("labels", "a QUESTION_ANS model takes startPositions / endPositions (one per row), not labels"));
        }
        if info.task == Task::FeatureExtraction {
            return Err(PeftError::invalid_arg("batch", "a FEATURE_EXTRACTION model has no loss to train on"));
        }
        if let Some(m) = &self.input_type_mask {
            if model.active_cpt().is_none() {
                return Err(PeftError::invalid_arg("inputTypeMask", "is only used by CPT adapters (the active adapter is not one)"));
            }
            if m.len() != n || m.iter().any(|&t| t < 0) {
                return Err(PeftError::invalid_arg("inputTypeMask", format!("must hold {} × {} non-negative token types", self.batch_size, self.seq_len)));
            }
        }
        if info.task == Task::SeqCls && info.num_labels == Some(1) {
            return Err(PeftError::invalid_arg("labels", "regression (num_labels = 1) is not supported; use at least 2 labels"));
        }
        if let Some(bad) = self.labels.iter().find(|&&l| l != -100 && (l < 0 || l as usize >= classes)) {
            return Err(PeftError::invalid_arg("labels", format!("label {bad} is neither -100 (ignored) nor {what} ({classes})")));
        }
        if info.task == Task::QuestionAns {
            for (k, v) in [("startPositions", &self.start_positions), ("endPositions", &self.end_positions)] {
                match v {
                    Some(v) if v.len() == self.batch_size => {}
                    _ => return Err(PeftError::invalid_arg(k, format!("a QUESTION_ANS batch needs {} positions", self.batch_size))),
                }
            }
        }
        Ok(())
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// 1-based optimizer step number.
    pub step: usize,
    /// Mean loss over the label tokens of the step's micro-batches.
    pub loss: f64,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used by this step.
    pub learning_rate: f64,
    /// Non-padding input tokens processed.
    pub tokens: usize,
}

/// AdamW (Loshchilov & Hutter; PyTorch `torch.optim.AdamW` semantics: decoupled weight decay
/// `θ ← θ·(1 − lr·λ)`, bias-corrected moments, `eps` added to `sqrt(v̂)`) with the same operations
/// in the same order as `candle_nn::AdamW`, so results are bit-identical, but with state that
/// can be exported and imported (for checkpoints). `m`/`v` have each parameter's shape and dtype.
pub struct AdamW {
    /// `(name, parameter, first moment m, second moment v)`.
    vars: Vec<(String, Var, Var, Var)>,
    step_t: usize,
    params: ParamsAdamW,
}

impl AdamW {
    /// Zero moments for every float parameter (non-float parameters are skipped, as candle does).
    pub fn new(vars: Vec<(String, Var)>, params: ParamsAdamW) -> Result<Self> {
        let vars = vars
            .into_iter()
            .filter(|(_, v)| v.dtype().is_float())
            .map(|(n, v)| {
                let m = Var::zeros(v.shape(), v.dtype(), v.device())?;
                let s = Var::zeros(v.shape(), v.dtype(), v.device())?;
                Ok((n, v, m, s))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { vars, step_t: 0, params })
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// Optimizer steps taken (the `t` of the bias correction).
    pub fn step_t(&self) -> usize {
        self.step_t
    }

    /// One update of every parameter that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let p = &self.params;
        let (lr, beta1, beta2) = (p.lr, p.beta1, p.beta2);
        let lr_lambda = lr * p.weight_decay;
        let scale_m = 1f64 / (1f64 - beta1.powi(self.step_t as i32));
        let scale_v = 1f64 / (1f64 - beta2.powi(self.step_t as i32));
        for (_, theta, m, v) in &self.vars {
            if let Some(g) = grads.get(theta) {
                let next_m = ((m.as_tensor() * beta1)? + (g * (1.0 - beta1))?)?;
                let next_v = ((v.as_tensor() * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                let m_hat = (&next_m * scale_m)?;
                let v_hat = (&next_v * scale_v)?;
                let next_theta = (theta.as_tensor() * (1f64 - lr_lambda))?;
                let adjusted = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
                let next_theta = (next_theta - (adjusted * lr)?)?;
                m.set(&next_m)?;
                v.set(&next_v)?;
                theta.set(&next_theta)?;
            }
        }
        Ok(())
    }

    /// The moments as `<name>.exp_avg` (m) and `<name>.exp_avg_sq` (v), torch's names.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.vars.len());
        for (n, _, m, v) in &self.vars {
            out.push((format!("{n}.exp_avg"), m.as_tensor().detach()));
            out.push((format!("{n}.exp_avg_sq"), v.as_tensor().detach()));
        }
        out
    }

    /// Restore what [`Self::state_tensors`] and [`Self::step_t`] returned. Every parameter must
    /// have both moments with its own shape; `file` names the source in errors.
    ///
    /// Errors: `InvalidState` naming the missing or mis-shaped key.
    pub fn load_state(&mut self, tensors: &std::collections::HashMap<String, Tensor>, step_t: usize, file: &Path) -> Result<()> {
        let mut staged = Vec::with_capacity(self.vars.len());
        for (n, theta, _, _) in &self.vars {
            for key in [format!("{n}.exp_avg"), format!("{n}.exp_avg_sq")] {
                let t = tensors.get(&key).ok_or_else(|| {
                    PeftError::InvalidState(format!("checkpoint {} lacks optimizer state `{key}`", file.display()))
                })?;
                if t.dims() != theta.dims() {
                    return Err(PeftError::ShapeMismatch { name: format!("{} (key `{key}`)", file.display()), expected: theta.dims().to_vec(), found: t.dims().to_vec() });
                }
                staged.push(t.to_dtype(theta.dtype())?);
            }
        }
        for (i, (_, _, m, v)) in self.vars.iter().enumerate() {
            m.set(&staged[2 * i])?;
            v.set(&staged[2 * i + 1])?;
        }
        self.step_t = step_t;
        Ok(())
    }
}

/// Optimizer state for the trainable adapter parameters of a [`PeftModel`].
pub struct Trainer {
    args: TrainingArgs,
    opt: AdamW,
    vars: Vec<(String, Var)>,
    step: usize,
}

/// Name of the trainer state file in a checkpoint folder: transformers' `TrainerState` JSON
/// (`global_step`, `log_history`, ...), as the caller gives it.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// peft-node's own resume state in a checkpoint folder (optimizer step, schedule, seed, the
/// caller's data-order state). Checkpoints written before this file existed kept these fields
/// in `trainer_state.json`, which [`Trainer::load_checkpoint`] still reads.
pub const RESUME_STATE_FILE: &str = "peft_node_state.json";
/// Name of the optimizer state file in a checkpoint folder (AdamW m and v per parameter).
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// File of a checkpoint holding every trainable parameter under the trainer's names
/// (`<adapter>/<key>`): exact training state also where the HF-format adapter file stores a
/// derived tensor (prompt learning saves the computed prompt table, not the P-tuning MLP).
pub const TRAINABLE_FILE: &str = "trainable_parameters.safetensors";

/// Loss (mean over label tokens) and gradients of the trainable parameters for one batch,
/// scaled by `scale` (for accumulation). Returns `(loss, label tokens, grads)`.
/// Gradient checkpointing follows the model's setting ([`PeftModel::gradient_checkpointing`]).
pub fn loss_and_grads(model: &PeftModel, batch: &Batch, total_items: Option<usize>, rng: Option<Arc<Mutex<rand::rngs::StdRng>>>) -> Result<(f64, usize, GradStore)> {
    loss_and_grads_with(model, batch, total_items, rng, model.gradient_checkpointing())
}

/// [`loss_and_grads`] with gradient checkpointing on (`ckpt`) or off, whatever the model's
/// setting: on the fused engine where it runs the model (see
/// [`crate::engine::try_loss_and_grads_with`]), else through the general path's layer-wise
/// driver (`model::checkpoint`) for the Llama family, Gemma 3, Phi-3, GPT-2, the BERT family
/// and T5, every head ([`crate::model::BaseModel::layer_stack`]). The loss is
/// the same as without it; gradients are the same bit for bit on the engine and up to float
/// rounding (summation order) on the general path.
///
/// Errors: those of [`loss_and_grads`]; with `ckpt`, `InvalidArgument` naming
/// `gradientCheckpointing` for prefix tuning (HF's text, `PREFIX_TUNING does not work with
/// gradient checkpointing.`) and for a model without a layer stack.
pub fn loss_and_grads_with(model: &PeftModel, batch: &Batch, total_items: Option<usize>, rng: Option<Arc<Mutex<rand::rngs::StdRng>>>, ckpt: bool) -> Result<(f64, usize, GradStore)> {
    batch.validate(model)?;
    if ckpt {
        model.check_gradient_checkpointing()?;
    }
    // The tuners' loss terms (AdaLoRA's orthogonal regularisation), added to each micro-batch's
    // loss as HF's tuner model adds them to `outputs.loss`; the fused engine computes none.
    let extra = loss_terms(model, true)?;
    if model.base.task() == Task::CausalLm && extra.is_none() {
        if let Some(out) = crate::engine::try_loss_and_grads_with(model, batch, total_items, rng.clone(), ckpt)? {
            return Ok(out);
        }
    }
    let opts = ForwardOptions { train: true, dropout_rng: rng, ..batch.forward_options(model) };
    if ckpt {
        return checkpointed_loss_and_grads(model, batch, total_items, &opts, extra);
    }
    let logits = model.forward(&batch.input_ids, batch.batch_size, batch.seq_len, &opts, None)?;
    let (mean, n) = task_loss(model, &logits, batch)?;
    let (loss_val, scaled) = step_loss(mean, n, total_items, extra)?;
    let grads = scaled.backward()?;
    Ok((loss_val, n, grads))
}

/// The general path's training step with gradient checkpointing (see [`loss_and_grads_with`]).
fn checkpointed_loss_and_grads(model: &PeftModel, batch: &Batch, total_items: Option<usize>, opts: &ForwardOptions, extra: Option<Tensor>) -> Result<(f64, usize, GradStore)> {
    let (x0, o) = model.forward_inputs(&batch.input_ids, batch.batch_size, batch.seq_len, opts)?;
    let Some(stack) = model.base.layer_stack(&x0, &o) else {
        return Err(PeftError::invalid_arg(
            "gradientCheckpointing",
            format!("is not available for {} models (supported: the Llama family, Gemma 3, Phi-3, GPT-2, BERT, DistilBERT, RoBERTa and T5)", model.base.info().architecture),
        ));
    };
    let stack = stack?;
    let keep: std::collections::HashSet<candle_core::TensorId> = model.trainable_parameters().iter().map(|(_, v)| v.as_tensor().id()).collect();
    let ((loss_val, n), grads) = crate::model::checkpoint::checkpointed_backward(&*stack, &x0, o.dropout_rng.as_deref(), &keep, |logits| {
        let (mean, n) = task_loss(model, logits, batch)?;
        // The tuners' loss terms depend on adapter parameters only: their gradients are taken
        // with the head's (the driver keeps every trainable parameter's gradient).
        let (loss_val, scaled) = step_loss(mean, n, total_items, extra)?;
        Ok((scaled, (loss_val, n)))
    })?;
    Ok((loss_val, n, grads))
}

/// A micro-batch's loss to differentiate: the task loss `mean` over its `n` label items, scaled
/// by `n / total_items` for gradient accumulation (transformers' `num_items_in_batch`), plus
/// the tuners' loss terms `extra` (unscaled, as HF adds them to each `outputs.loss`). Returns
/// `(the reported loss: mean + extra, the tensor to differentiate)`.
fn step_loss(mean: Tensor, n: usize, total_items: Option<usize>, extra: Option<Tensor>) -> Result<(f64, Tensor)> {
    let mut loss_val = mean.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? as f64;
    let mut scaled = match total_items {
        Some(t) if t > 0 => (mean * (n as f64 / t as f64))?,
        _ => mean,
    };
    if let Some(x) = extra {
        loss_val += x.to_scalar::<f32>()? as f64;
        scaled = (scaled.to_dtype(candle_core::DType::F32)? + x)?;
    }
    Ok((loss_val, scaled))
}

/// The sum of every adapter's [`crate::tuners::registry::Tuner::loss_term`] (a scalar f32
/// tensor, tracked when `train`), or `None` when no tuner adds one.
///
/// Errors: the tuners'.
pub fn loss_terms(model: &PeftModel, train: bool) -> Result<Option<Tensor>> {
    let mut sum: Option<Tensor> = None;
    for (name, cfg) in &model.configs {
        if let Some(t) = cfg.tuner().loss_term(model, name, cfg, train)? {
            sum = Some(match sum {
                Some(s) => (s + t)?,
                None => t,
            });
        }
    }
    Ok(sum)
}

/// Run every adapter's [`crate::tuners::registry::Tuner::after_step`] hook after an optimizer
/// step with the gradients `grads` it applied and its 0-based index `global_step` (`None`:
/// record only, the caller runs the step logic; AdaLoRA's `update_and_allocate`).
///
/// Errors: the tuners'.
pub fn after_optimizer_step(model: &PeftModel, global_step: Option<usize>, grads: &GradStore) -> Result<()> {
    for (name, cfg) in &model.configs {
        cfg.tuner().after_step(model, name, cfg, global_step, grads)?;
    }
    Ok(())
}

/// Labels as the loss sees them: with prompt tuning / P-tuning the logits include the virtual
/// positions, so each row gets `num_virtual_tokens` `-100` labels on the left (HF
/// `PeftModelForCausalLM.forward`). Returns `(labels, seq_len)`.
pub fn extended_labels(model: &PeftModel, batch: &Batch) -> (Vec<i64>, usize) {
    let n = model.label_prefix_len();
    if n == 0 {
        return (batch.labels.clone(), batch.seq_len);
    }
    let s = batch.seq_len;
    let mut out = Vec::with_capacity(batch.batch_size * (n + s));
    for r in 0..batch.batch_size {
        out.extend(std::iter::repeat_n(-100i64, n));
        out.extend_from_slice(&batch.labels[r * s..(r + 1) * s]);
    }
    (out, n + s)
}

/// Label items that count towards the loss (tokens after the causal shift; rows for sequence
/// classification and QA).
fn label_items(model: &PeftModel, batch: &Batch) -> usize {
    match model.base.task() {
        Task::CausalLm if model.active_cpt().is_some() => {
            let c = model.active_cpt().expect("checked");
            let Ok((labels, types)) = crate::tuners::prompt::cpt::cpt_labels(c, &batch.labels, batch.input_type_mask.as_deref(), batch.batch_size, batch.seq_len) else { return 0 };
            let t = c.cpt_token_ids.len() + batch.seq_len;
            crate::tuners::prompt::cpt::cpt_loss_weights(c, &labels, &types, batch.batch_size, t, usize::MAX).2
        }
        Task::CausalLm => {
            let (labels, s) = extended_labels(model, batch);
            (0..batch.batch_size).map(|r| (1..s).filter(|&i| labels.get(r * s + i).map(|&l| l >= 0).unwrap_or(false)).count()).sum()
        }
        Task::QuestionAns => batch.batch_size,
        _ => batch.labels.iter().filter(|&&l| l >= 0).count(),
    }
}

/// T5's `_shift_right`: `[b, t]` labels → decoder input ids: `start` first, then the labels
/// without their last column, `-100` replaced by `pad`.
pub fn shift_right(labels: &[i64], b: usize, start: u32, pad: u32) -> Vec<u32> {
    let t = labels.len() / b.max(1);
    let mut out = Vec::with_capacity(b * t);
    for r in 0..b {
        out.push(start);
        for i in 0..t.saturating_sub(1) {
            let l = labels[r * t + i];
            out.push(if l < 0 { pad } else { l as u32 });
        }
    }
    out
}

/// The loss transformers computes for the model's head, as `(mean, items)`: shifted
/// cross-entropy for causal LMs; cross-entropy over `[b, num_labels]` (SEQ_CLS), over every
/// token (TOKEN_CLS, `-100` ignored) and over decoder positions (SEQ_2_SEQ_LM, unshifted); for
/// QA the mean of the start and end cross-entropies with positions clamped to `[0, s]` and `s`
/// ignored (`BertForQuestionAnswering`). With an active CPT adapter, HF's CPT loss
/// ([`crate::tuners::prompt::cpt::cpt_loss`], using `batch.input_type_mask`).
///
/// Errors: `InvalidArgument` when the logits' shape does not fit the batch (or, for CPT, when
/// the type mask leaves no label position).
pub fn task_loss(model: &PeftModel, logits: &Tensor, batch: &Batch) -> Result<(Tensor, usize)> {
    let b = batch.batch_size;
    if let (Task::CausalLm, Some(c)) = (model.base.task(), model.active_cpt()) {
        return crate::tuners::prompt::cpt::cpt_loss(c, logits, &batch.labels, batch.input_type_mask.as_deref(), b, batch.seq_len);
    }
    Ok(match model.base.task() {
        Task::CausalLm => {
            let (labels, seq) = extended_labels(model, batch);
            causal_lm_loss(logits, &labels, b, seq, true)?
        }
        Task::SeqCls => causal_lm_loss(logits, &batch.labels, b, 1, false)?,
        Task::TokenCls | Task::Seq2SeqLm => {
            let t = batch.labels.len() / b;
            let dims = logits.dims();
            if dims.len() != 3 || dims[0] != b || dims[1] != t {
                return Err(PeftError::invalid_arg("labels", format!("{t} labels per row do not fit logits of shape {dims:?}")));
            }
            causal_lm_loss(logits, &batch.labels, b, t, false)?
        }
        Task::QuestionAns => {
            let (_, s, _) = logits.dims3()?;
            let clamp = |v: &Vec<i64>| -> Vec<i64> { v.iter().map(|&p| if p.clamp(0, s as i64) == s as i64 { -100 } else { p.clamp(0, s as i64) }).collect() };
            let start = logits.narrow(2, 0, 1)?.squeeze(2)?;
            let end = logits.narrow(2, 1, 1)?.squeeze(2)?;
            let sp = clamp(batch.start_positions.as_ref().unwrap());
            let ep = clamp(batch.end_positions.as_ref().unwrap());
            let (ls, _) = causal_lm_loss(&start, &sp, b, 1, false)?;
            let (le, _) = causal_lm_loss(&end, &ep, b, 1, false)?;
            (((ls + le)? * 0.5)?, b)
        }
        Task::FeatureExtraction => return Err(PeftError::invalid_arg("batch", "a FEATURE_EXTRACTION model has no loss")),
    })
}

/// Linear warm-up then linear decay to 0 (`get_linear_schedule_with_warmup`), as the factor
/// applied to the base learning rate at 0-based optimizer step `step`.
pub fn linear_schedule(step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        step as f64 / warmup.max(1) as f64
    } else {
        ((total as f64 - step as f64) / (total.saturating_sub(warmup)).max(1) as f64).max(0.0)
    }
}

impl Trainer {
    /// Errors: `InvalidState` when the model has no trainable parameter or merged adapters.
    pub fn new(model: &PeftModel, args: TrainingArgs) -> Result<Self> {
        if !model.merged_adapters().is_empty() {
            return Err(PeftError::InvalidState("cannot train while adapters are merged; unmerge first".into()));
        }
        if model.is_disabled() {
            return Err(PeftError::InvalidState("cannot train while adapters are disabled".into()));
        }
        let vars = model.trainable_parameters();
        if vars.is_empty() {
            return Err(PeftError::InvalidState(
                "the model has no trainable parameters (is the active adapter loaded with isTrainable: false, or frozen with setRequiresGrad?)".into(),
            ));
        }
        if args.gradient_checkpointing && model.has_prefix_tuning() {
            return Err(crate::peft_model::prefix_checkpointing_refusal());
        }
        if !(args.learning_rate.is_finite() && args.learning_rate >= 0.0) {
            return Err(PeftError::invalid_arg("learningRate", format!("must be a non-negative number, found {}", args.learning_rate)));
        }
        let params = ParamsAdamW {
            lr: args.learning_rate,
            beta1: args.adam_beta1,
            beta2: args.adam_beta2,
            eps: args.adam_epsilon,
            weight_decay: args.weight_decay,
        };
        let named: Vec<(String, Var)> = model
            .trainable_parameters_by_adapter()
            .into_iter()
            .flat_map(|(a, vs)| vs.into_iter().map(move |(k, v)| (format!("{a}/{k}"), v)))
            .collect();
        let opt = AdamW::new(named.clone(), params)?;
        Ok(Trainer { args, opt, vars: named, step: 0 })
    }

    /// The dropout RNG of 0-based optimizer step `step`: a function of the seed and the step
    /// only, so a run resumed from a checkpoint draws the same masks as an uninterrupted one.
    fn step_rng(&self) -> Arc<Mutex<rand::rngs::StdRng>> {
        let s = self.args.seed ^ (self.step as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(s)))
    }

    /// [`Self::save_checkpoint_with_state`] with a minimal transformers `TrainerState`
    /// (`global_step`, `max_steps`, empty `log_history`).
    pub fn save_checkpoint(&self, model: &PeftModel, dir: &Path, extra: serde_json::Value) -> Result<PathBuf> {
        self.save_checkpoint_with_state(model, dir, extra, None)
    }

    /// Write a checkpoint of the training state to `dir` (e.g. `out/checkpoint-20`): the model's
    /// adapters in HF PEFT format ([`PeftModel::save_pretrained`]), [`OPTIMIZER_FILE`] (AdamW
    /// moments per parameter), [`TRAINER_STATE_FILE`] (`hf_state`, transformers'
    /// `TrainerState` as JSON, written as given) and [`RESUME_STATE_FILE`] (`global_step`,
    /// optimizer step, schedule arguments, seed, and `extra`: the caller's data-order state).
    /// Everything is written to a temp folder beside `dir` which is then renamed to `dir`, so
    /// `dir` is either absent or complete; an existing `dir` is replaced.
    ///
    /// Errors: `Io` naming the path; errors of `save_pretrained`.
    pub fn save_checkpoint_with_state(&self, model: &PeftModel, dir: &Path, extra: serde_json::Value, hf_state: Option<&serde_json::Value>) -> Result<PathBuf> {
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        let fname = dir.file_name().ok_or_else(|| PeftError::invalid_arg("outputDir", format!("{} has no folder name", dir.display())))?;
        std::fs::create_dir_all(&parent).map_err(|e| PeftError::io(&parent, e))?;
        let tmp = parent.join(format!(".{}.tmp-{}", fname.to_string_lossy(), std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
        }
        let res = (|| -> Result<()> {
            std::fs::create_dir_all(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
            model.save_pretrained(&tmp, None)?;
            let opt = crate::io::safetensors_bytes(&self.opt.state_tensors(), Some(&[("format", "pt")]))?;
            crate::io::write_atomic(&tmp.join(OPTIMIZER_FILE), &opt)?;
            let params: Vec<(String, Tensor)> = self.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
            crate::io::write_atomic(&tmp.join(TRAINABLE_FILE), &crate::io::safetensors_bytes(&params, Some(&[("format", "pt")]))?)?;
            let state = serde_json::json!({
                "global_step": self.step,
                "optimizer_step": self.opt.step_t(),
                "max_steps": self.args.max_steps,
                "warmup_steps": self.args.warmup_steps,
                "learning_rate": self.args.learning_rate,
                "lr_scheduler_type": self.args.lr_scheduler_type.name(),
                "seed": self.args.seed,
                "parameters": self.vars.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
                "extra": extra,
            });
            crate::io::write_atomic(&tmp.join(RESUME_STATE_FILE), serde_json::to_string_pretty(&state).expect("JSON").as_bytes())?;
            let minimal = serde_json::json!({
                "global_step": self.step,
                "max_steps": self.args.max_steps,
                "log_history": [],
            });
            let hf = hf_state.unwrap_or(&minimal);
            crate::io::write_atomic(&tmp.join(TRAINER_STATE_FILE), serde_json::to_string_pretty(hf).expect("JSON").as_bytes())?;
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
            }
            std::fs::rename(&tmp, dir).map_err(|e| PeftError::io(dir, e))?;
            if let Ok(d) = std::fs::File::open(&parent) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if res.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        res.map(|_| dir.to_path_buf())
    }

    /// Restore a checkpoint written by [`Self::save_checkpoint`] into this trainer and `model`:
    /// the trainable adapter weights (from each active adapter's `adapter_model.safetensors`:
    /// `dir` for `default`, `dir/<name>` otherwise), the AdamW moments and step, and the
    /// optimizer step (hence the learning-rate schedule and dropout RNG). Returns `extra`.
    ///
    /// Errors: `NotFound`, `SafetensorsInvalid`, `ShapeMismatch`, `InvalidState` (a parameter
    /// missing from the checkpoint, or a malformed trainer_state.json); on error the model's
    /// weights are unchanged.
    pub fn load_checkpoint(&mut self, model: &PeftModel, dir: &Path) -> Result<serde_json::Value> {
        let spath = if dir.join(RESUME_STATE_FILE).exists() { dir.join(RESUME_STATE_FILE) } else { dir.join(TRAINER_STATE_FILE) };
        let text = std::fs::read_to_string(&spath).map_err(|e| PeftError::io(&spath, e))?;
        let state: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| PeftError::InvalidState(format!("{} is not valid JSON: {e}", spath.display())))?;
        let get = |k: &str| {
            state[k].as_u64().map(|x| x as usize).ok_or_else(|| PeftError::InvalidState(format!("{}: `{k}` must be a non-negative integer", spath.display())))
        };
        let (global_step, opt_step) = (get("global_step")?, get("optimizer_step")?);
        let mut staged: Vec<(Var, Tensor)> = Vec::new();
        let tpath = dir.join(TRAINABLE_FILE);
        let trainable: Option<std::collections::HashMap<String, Tensor>> =
            if tpath.exists() { Some(crate::io::read_safetensors(&tpath, model.base.device())?.into_iter().collect()) } else { None };
        for (adapter, vars) in model.trainable_parameters_by_adapter() {
            if let Some(file) = &trainable {
                for (key, var) in vars {
                    let name = format!("{adapter}/{key}");
                    let t = file.get(&name).ok_or_else(|| PeftError::InvalidState(format!("checkpoint {} lacks `{name}`", tpath.display())))?;
                    if t.dims() != var.dims() {
                        return Err(PeftError::ShapeMismatch { name: format!("{} (key `{name}`)", tpath.display()), expected: var.dims().to_vec(), found: t.dims().to_vec() });
                    }
                    staged.push((var.clone(), t.to_dtype(var.dtype())?));
                }
                continue;
            }
            let folder = if adapter == "default" { dir.to_path_buf() } else { dir.join(&adapter) };
            let wpath = folder.join("adapter_model.safetensors");
            let file: std::collections::HashMap<String, Tensor> = crate::io::read_safetensors(&wpath, model.base.device())?.into_iter().collect();
            for (key, var) in vars {
                let t = file.get(&key).ok_or_else(|| PeftError::InvalidState(format!("checkpoint {} lacks `{key}`", wpath.display())))?;
                if t.dims() != var.dims() {
                    return Err(PeftError::ShapeMismatch { name: format!("{} (key `{key}`)", wpath.display()), expected: var.dims().to_vec(), found: t.dims().to_vec() });
                }
                let t = t.to_dtype(var.dtype())?;
                staged.push((var, t));
            }
        }
        let opath = dir.join(OPTIMIZER_FILE);
        let opt: std::collections::HashMap<String, Tensor> = crate::io::read_safetensors(&opath, model.base.device())?.into_iter().collect();
        self.opt.load_state(&opt, opt_step, &opath)?;
        for (var, t) in staged {
            var.set(&t)?;
        }
        self.step = global_step;
        Ok(state["extra"].clone())
    }

    /// Optimizer steps taken so far.
    pub fn global_step(&self) -> usize {
        self.step
    }

    /// Learning rate of the next step.
    pub fn current_lr(&self) -> f64 {
        self.args.learning_rate * self.args.lr_scheduler_type.factor(self.step, self.args.warmup_steps, self.args.max_steps)
    }

    /// Evaluation loss of one batch, as transformers' `evaluation_loop` computes it per batch:
    /// the model in eval mode (no dropout), the head's loss averaged over the batch's label
    /// items ([`task_loss`]). Returns `(mean loss, label items)`; nothing is trained.
    ///
    /// Errors: `InvalidArgument` for a batch that does not fit the model (see
    /// [`Batch::validate`]).
    pub fn eval_batch(&self, model: &PeftModel, batch: &Batch) -> Result<(f64, usize)> {
        batch.validate(model)?;
        let opts = batch.forward_options(model);
        let logits = model.forward(&batch.input_ids, batch.batch_size, batch.seq_len, &opts, None)?.detach();
        let (mean, n) = task_loss(model, &logits, batch)?;
        let extra = match loss_terms(model, false)? {
            Some(x) => x.to_scalar::<f32>()? as f64,
            None => 0.0,
        };
        Ok((mean.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? + extra, n))
    }

    /// One optimizer step over `micro_batches` (gradient accumulation): the loss of each is
    /// weighted by its share of all label tokens (transformers' `num_items_in_batch`), gradients
    /// are summed, clipped to `max_grad_norm`, and AdamW is applied; then the tuners' after-step
    /// hooks run with the clipped gradients (AdaLoRA's `update_and_allocate(step)`, 0-based, see
    /// [`TrainingArgs::tuner_step_hooks`]). The loss includes the tuners' loss terms
    /// ([`loss_terms`]: AdaLoRA's orthogonal regularisation).
    pub fn step(&mut self, model: &PeftModel, micro_batches: &[Batch]) -> Result<StepOutput> {
        if micro_batches.is_empty() {
            return Err(PeftError::invalid_arg("batches", "at least one micro-batch is required"));
        }
        let total_items: usize = micro_batches.iter().map(|b| label_items(model, b)).sum();
        let mut acc: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let mut loss_sum = 0.0;
        let mut items = 0usize;
        let mut tokens = 0usize;
        let mut last: Option<GradStore> = None;
        let rng = self.step_rng();
        for b in micro_batches {
            let ckpt = self.args.gradient_checkpointing || model.gradient_checkpointing();
            let (loss, n, grads) = loss_and_grads_with(model, b, Some(total_items), Some(rng.clone()), ckpt)?;
            loss_sum += loss * n as f64;
            items += n;
            tokens += b.attention_mask.iter().filter(|&&m| m != 0).count();
            for (i, (_, v)) in self.vars.iter().enumerate() {
                if let Some(g) = grads.get(v.as_tensor()) {
                    acc[i] = Some(match acc[i].take() {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    });
                }
            }
            last = Some(grads);
        }
        let mut store = last.expect("at least one micro-batch");
        // Global norm and clipping (torch.nn.utils.clip_grad_norm_).
        let mut sq = 0f64;
        for g in acc.iter().flatten() {
            sq += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        }
        let norm = sq.sqrt();
        let coef = if self.args.max_grad_norm > 0.0 { (self.args.max_grad_norm / (norm + 1e-6)).min(1.0) } else { 1.0 };
        for (i, (_, v)) in self.vars.iter().enumerate() {
            match acc[i].take() {
                Some(g) => {
                    let g = if coef < 1.0 { (g * coef)? } else { g };
                    store.insert(v.as_tensor(), g);
                }
                None => {
                    store.remove(v.as_tensor());
                }
            }
        }
        let lr = self.current_lr();
        self.opt.set_learning_rate(lr);
        self.opt.step(&store)?;
        after_optimizer_step(model, self.args.tuner_step_hooks.then_some(self.step), &store)?;
        self.step += 1;
        let loss = if items > 0 { loss_sum / items as f64 } else { 0.0 };
        if !loss.is_finite() {
            return Err(PeftError::InvalidState(format!("the loss became {loss} at step {}", self.step)));
        }
        Ok(StepOutput { step: self.step, loss, grad_norm: norm, learning_rate: lr, tokens })
    }
}

#[cfg(test)]
mod tests {
    use super::LrSchedule;

    /// transformers 5.18's `get_*_schedule_with_warmup(num_warmup_steps=2, num_training_steps=6)` factors.
    #[test]
    fn schedules_match_transformers() {
        let cases: [(&str, [f64; 6]); 4] = [
            ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]),
            ("cosine", [0.0, 0.5, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627]),
            ("constant", [1.0; 6]),
            ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
        ];
        for (name, want) in cases {
            let s = LrSchedule::parse(name).unwrap();
            assert_eq!(s.name(), name);
            for (step, w) in want.iter().enumerate() {
                assert!((s.factor(step, 2, 6) - w).abs() < 1e-12, "{name} step {step}");
            }
        }
        assert_eq!(LrSchedule::parse("polynomial").unwrap_err().code(), "ERR_INVALID_ARGUMENT");
    }
}
