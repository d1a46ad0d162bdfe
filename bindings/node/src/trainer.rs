//! `NativeTrainer`: optimizer state; one `step` call = one optimizer step, off the JS thread.
//! The JS `Trainer` drives the loop, so progress callbacks and AbortSignal act between steps.

use crate::model::{with_model, NativeModel, Shared};
use crate::task::{guard, Job};
use napi::bindgen_prelude::AsyncTask;
use peft_core::train::{Batch, LrSchedule, Trainer, TrainingArgs};

use std::sync::{Arc, Mutex};

#[napi(object)]
pub struct TrainingArgsJs {
    pub learning_rate: f64,
    pub max_steps: u32,
    pub warmup_steps: u32,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub seed: u32,
    /// transformers' `lr_scheduler_type` (`linear` when absent).
    pub lr_scheduler_type: Option<String>,
    /// transformers' `gradient_checkpointing` (off when absent).
    pub gradient_checkpointing: Option<bool>,
    /// Run the tuners' after-step logic (AdaLoRA's `update_and_allocate`) after every step (default true).
    pub tuner_step_hooks: Option<bool>,
}

#[napi(object)]
pub struct BatchJs {
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<u8>,
    /// Labels, -100 = ignored.
    pub labels: Vec<i32>,
    pub batch_size: u32,
    pub seq_len: u32,
    /// Multitask prompt tuning: one task id per row.
    pub task_ids: Option<Vec<u32>>,
    /// BERT-family segment ids `[b, s]`.
    pub token_type_ids: Option<Vec<u32>>,
    /// QUESTION_ANS: answer start token per row `[b]`.
    pub start_positions: Option<Vec<i32>>,
    /// QUESTION_ANS: answer end token per row `[b]`.
    pub end_positions: Option<Vec<i32>>,
    /// SEQ_2_SEQ_LM: decoder input ids `[b, t]` (default: labels shifted right).
    pub decoder_input_ids: Option<Vec<u32>>,
    /// SEQ_2_SEQ_LM: decoder mask `[b, t]`.
    pub decoder_attention_mask: Option<Vec<u8>>,
    /// CPT: token types `[b, s]` (HF `input_type_mask`; 0 on padding).
    pub input_type_mask: Option<Vec<i64>>,
}

#[napi(object)]
pub struct StepResult {
    pub step: u32,
    pub loss: f64,
    pub grad_norm: f64,
    pub learning_rate: f64,
    pub tokens: u32,
}

/// The evaluation loss of one batch and its label items.
#[napi(object)]
pub struct EvalBatchResult {
    pub loss: f64,
    pub items: u32,
}

fn to_batches(batches: Vec<BatchJs>) -> Vec<Batch> {
    batches
        .into_iter()
        .map(|b| Batch {
            input_ids: b.input_ids,
            attention_mask: b.attention_mask,
            labels: b.labels.into_iter().map(|l| l as i64).collect(),
            batch_size: b.batch_size as usize,
            seq_len: b.seq_len as usize,
            task_ids: b.task_ids,
            token_type_ids: b.token_type_ids,
            start_positions: b.start_positions.map(|v| v.into_iter().map(|x| x as i64).collect()),
            end_positions: b.end_positions.map(|v| v.into_iter().map(|x| x as i64).collect()),
            decoder_input_ids: b.decoder_input_ids,
            decoder_attention_mask: b.decoder_attention_mask,
            input_type_mask: b.input_type_mask,
        })
        .collect()
}

#[napi]
pub struct NativeTrainer {
    trainer: Arc<Mutex<Trainer>>,
    model: Shared,
}

#[napi]
impl NativeTrainer {
    #[napi(constructor, catch_unwind)]
    pub fn new(model: &NativeModel, args: TrainingArgsJs) -> napi::Result<Self> {
        let a = TrainingArgs {
            learning_rate: args.learning_rate,
            max_steps: args.max_steps as usize,
            warmup_steps: args.warmup_steps as usize,
            weight_decay: args.weight_decay,
            adam_beta1: args.adam_beta1,
            adam_beta2: args.adam_beta2,
            adam_epsilon: args.adam_epsilon,
            max_grad_norm: args.max_grad_norm,
            seed: args.seed as u64,
            lr_scheduler_type: match &args.lr_scheduler_type {
                Some(n) => guard(|| LrSchedule::parse(n))?,
                None => LrSchedule::Linear,
            },
            gradient_checkpointing: args.gradient_checkpointing.unwrap_or(false),
            tuner_step_hooks: args.tuner_step_hooks.unwrap_or(true),
        };
        let trainer = guard(|| with_model(&model.inner, |m| Trainer::new(m, a)))?;
        Ok(NativeTrainer { trainer: Arc::new(Mutex::new(trainer)), model: model.inner.clone() })
    }

    /// One optimizer step over the given micro-batches (gradient accumulation).
    #[napi(ts_return_type = "Promise<StepResult>")]
    pub fn step(&self, batches: Vec<BatchJs>) -> AsyncTask<Job<StepResult, StepResult>> {
        let trainer = self.trainer.clone();
        let model = self.model.clone();
        let batches = to_batches(batches);
        AsyncTask::new(Job::plain(move || {
            let mut t = trainer.lock().unwrap_or_else(|p| p.into_inner());
            let out = with_model(&model, |m| t.step(m, &batches))?;
            Ok(StepResult {
                step: out.step as u32,
                loss: out.loss,
                grad_norm: out.grad_norm,
                learning_rate: out.learning_rate,
                tokens: out.tokens as u32,
            })
        }))
    }

    /// Evaluation losses of batches (no training): one `{ loss, items }` per batch, the loss
    /// averaged over the batch's label items.
    #[napi(ts_return_type = "Promise<EvalBatchResult[]>")]
    pub fn evaluate(&self, batches: Vec<BatchJs>) -> AsyncTask<Job<Vec<EvalBatchResult>, Vec<EvalBatchResult>>> {
        let trainer = self.trainer.clone();
        let model = self.model.clone();
        let batches = to_batches(batches);
        AsyncTask::new(Job::plain(move || {
            let t = trainer.lock().unwrap_or_else(|p| p.into_inner());
            with_model(&model, |m| {
                batches.iter().map(|b| t.eval_batch(m, b).map(|(loss, items)| EvalBatchResult { loss, items: items as u32 })).collect()
            })
        }))
    }

    /// Write a checkpoint folder `dir` (adapters in HF format, AdamW state, resume state with
    /// `extraJson` stored as `extra`, and `hfStateJson` as transformers' trainer_state.json),
    /// atomically (temp folder + rename). Resolves to `dir`.
    #[napi(ts_return_type = "Promise<string>")]
    pub fn save_checkpoint(&self, dir: String, extra_json: String, hf_state_json: Option<String>) -> AsyncTask<Job<String, String>> {
        let trainer = self.trainer.clone();
        let model = self.model.clone();
        AsyncTask::new(Job::plain(move || {
            let extra: serde_json::Value = serde_json::from_str(&extra_json)
                .map_err(|e| peft_core::PeftError::invalid_arg("extraJson", format!("not valid JSON: {e}")))?;
            let hf: Option<serde_json::Value> = hf_state_json
                .map(|h| serde_json::from_str(&h).map_err(|e| peft_core::PeftError::invalid_arg("hfStateJson", format!("not valid JSON: {e}"))))
                .transpose()?;
            let t = trainer.lock().unwrap_or_else(|p| p.into_inner());
            let p = with_model(&model, |m| t.save_checkpoint_with_state(m, std::path::Path::new(&dir), extra, hf.as_ref()))?;
            Ok(p.to_string_lossy().into_owned())
        }))
    }

    /// Restore a checkpoint folder written by `saveCheckpoint`; resolves to its `extra` as JSON.
    #[napi(ts_return_type = "Promise<string>")]
    pub fn load_checkpoint(&self, dir: String) -> AsyncTask<Job<String, String>> {
        let trainer = self.trainer.clone();
        let model = self.model.clone();
        AsyncTask::new(Job::plain(move || {
            let mut t = trainer.lock().unwrap_or_else(|p| p.into_inner());
            let extra = with_model(&model, |m| t.load_checkpoint(m, std::path::Path::new(&dir)))?;
            Ok(extra.to_string())
        }))
    }

    /// Learning rate the next step will use.
    #[napi(getter)]
    pub fn current_lr(&self) -> f64 {
        self.trainer.lock().map(|t| t.current_lr()).unwrap_or(0.0)
    }

    #[napi(getter)]
    pub fn global_step(&self) -> u32 {
        self.trainer.lock().map(|t| t.global_step() as u32).unwrap_or(0)
    }
}

