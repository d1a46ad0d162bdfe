//! Training of adapter parameters: causal-LM loss, backward with candle's autograd, gradient
//! accumulation, clipping by global norm, AdamW, and a linear warm-up/decay schedule — the
//! defaults of transformers' `Trainer` (AdamW betas 0.9/0.999, eps 1e-8, weight decay 0,
//! `get_linear_schedule_with_warmup`, `clip_grad_norm_`).

use crate::error::{PeftError, Result};
use crate::model::ForwardOptions;
use crate::ops::causal_lm_loss;
use crate::peft_model::PeftModel;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::SeedableRng;
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
        }
    }
}

/// One micro-batch: row-major `[b, s]` ids, mask (1 = token, 0 = pad) and labels (`-100` =
/// ignored). Labels are the input ids in the usual causal-LM case; the loss shifts them.
#[derive(Debug, Clone)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<u8>,
    pub labels: Vec<i64>,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Multitask prompt tuning: one task id per row.
    pub task_ids: Option<Vec<u32>>,
}

impl Batch {
    fn validate(&self, vocab: usize) -> Result<()> {
        let n = self.batch_size * self.seq_len;
        if n == 0 {
            return Err(PeftError::invalid_arg("batch", "is empty"));
        }
        if self.input_ids.len() != n || self.attention_mask.len() != n || self.labels.len() != n {
            return Err(PeftError::invalid_arg(
                "batch",
                format!("inputIds/attentionMask/labels must each have {} × {} values", self.batch_size, self.seq_len),
            ));
        }
        if let Some(bad) = self.labels.iter().find(|&&l| l != -100 && (l < 0 || l as usize >= vocab)) {
            return Err(PeftError::invalid_arg("labels", format!("label {bad} is neither -100 (ignored) nor a token id below the vocabulary size {vocab}")));
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

/// Optimizer state for the trainable adapter parameters of a [`PeftModel`].
pub struct Trainer {
    args: TrainingArgs,
    opt: AdamW,
    vars: Vec<(String, Var)>,
    step: usize,
    rng: Arc<Mutex<rand::rngs::StdRng>>,
}

/// Loss (mean over label tokens) and gradients of the trainable parameters for one batch,
/// scaled by `scale` (for accumulation). Returns `(loss, label tokens, grads)`.
pub fn loss_and_grads(model: &PeftModel, batch: &Batch, total_items: Option<usize>, rng: Option<Arc<Mutex<rand::rngs::StdRng>>>) -> Result<(f64, usize, GradStore)> {
    batch.validate(model.base.config.vocab_size)?;
    let opts = ForwardOptions {
        attention_mask: Some(batch.attention_mask.clone()),
        train: true,
        dropout_rng: rng,
        task_ids: batch.task_ids.clone(),
        ..Default::default()
    };
    let logits = model.forward(&batch.input_ids, batch.batch_size, batch.seq_len, &opts, None)?;
    let (labels, seq) = extended_labels(model, batch);
    let (mean, n) = causal_lm_loss(&logits, &labels, batch.batch_size, seq, true)?;
    let loss_val = mean.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? as f64;
    let scaled = match total_items {
        Some(t) if t > 0 => (mean * (n as f64 / t as f64))?,
        _ => mean,
    };
    let grads = scaled.backward()?;
    Ok((loss_val, n, grads))
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

/// Label tokens that count towards the loss (after the causal shift).
fn label_items(model: &PeftModel, batch: &Batch) -> usize {
    let (labels, s) = extended_labels(model, batch);
    (0..batch.batch_size).map(|r| (1..s).filter(|&i| labels.get(r * s + i).map(|&l| l >= 0).unwrap_or(false)).count()).sum()
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
                "the model has no trainable parameters (is the active adapter loaded with isTrainable: false?)".into(),
            ));
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
        let opt = AdamW::new(vars.iter().map(|(_, v)| v.clone()).collect(), params)?;
        let rng = Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(args.seed)));
        Ok(Trainer { args, opt, vars, step: 0, rng })
    }

    /// Optimizer steps taken so far.
    pub fn global_step(&self) -> usize {
        self.step
    }

    /// Learning rate of the next step.
    pub fn current_lr(&self) -> f64 {
        self.args.learning_rate * linear_schedule(self.step, self.args.warmup_steps, self.args.max_steps)
    }

    /// One optimizer step over `micro_batches` (gradient accumulation): the loss of each is
    /// weighted by its share of all label tokens (transformers' `num_items_in_batch`), gradients
    /// are summed, clipped to `max_grad_norm`, and AdamW is applied.
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
        for b in micro_batches {
            let (loss, n, grads) = loss_and_grads(model, b, Some(total_items), Some(self.rng.clone()))?;
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
        self.step += 1;
        let loss = if items > 0 { loss_sum / items as f64 } else { 0.0 };
        if !loss.is_finite() {
            return Err(PeftError::InvalidState(format!("the loss became {loss} at step {}", self.step)));
        }
        Ok(StepOutput { step: self.step, loss, grad_norm: norm, learning_rate: lr, tokens })
    }
}
