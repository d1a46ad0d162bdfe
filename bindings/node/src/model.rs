//! `NativeModel`: a base model and its adapters, shared by the JS `PreTrainedModel` and
//! `PeftModel` facades (as in HF, `get_peft_model` changes the base model in place).

use crate::task::{arg_err, guard, to_napi, Job};
use napi::bindgen_prelude::AsyncTask;
use napi::bindgen_prelude::{Float32Array, Uint32Array, Uint8Array};
use napi::bindgen_prelude::Function;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use peft_core::generate::{generate_with, GenerateHooks, GenerateOptions, Step, StopStrings};
use peft_core::progress::Control;
use peft_core::model::loader::{self as loader, LoadRequest};
use peft_core::model::{ForwardOptions, Task};
use peft_core::peft_model::{GradPart, PeftModel, SaveEmbeddingLayers, SaveOptions, BASE_ADAPTER};
use peft_core::tuners::AdapterConfig;
use peft_core::PeftError;
use napi::bindgen_prelude::ObjectFinalize;
use napi::Env;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub type Shared = Arc<Mutex<Option<PeftModel>>>;

pub fn lock(m: &Shared) -> peft_core::Result<MutexGuard<'_, Option<PeftModel>>> {
    Ok(m.lock().unwrap_or_else(|p| p.into_inner()))
}

pub fn with_model<T>(m: &Shared, f: impl FnOnce(&mut PeftModel) -> peft_core::Result<T>) -> peft_core::Result<T> {
    let mut g = lock(m)?;
    let model = g.as_mut().ok_or_else(|| PeftError::InvalidState("the model was disposed".into()))?;
    f(model)
}

fn parse_dtype(d: &str) -> peft_core::Result<candle_core::DType> {
    match d {
        "f32" | "float32" => Ok(candle_core::DType::F32),
        "f16" | "float16" => Ok(candle_core::DType::F16),
        "bf16" | "bfloat16" => Ok(candle_core::DType::BF16),
        other => Err(PeftError::invalid_arg("dtype", format!("must be 'f32', 'f16' or 'bf16', found {other:?}"))),
    }
}

/// A cancellation flag shared with a running task (set from an AbortSignal listener).
#[napi]
pub struct AbortFlag {
    flag: Arc<AtomicBool>,
}

#[napi]
impl AbortFlag {
    #[napi(constructor)]
    pub fn new() -> Self {
        AbortFlag { flag: Arc::new(AtomicBool::new(false)) }
    }
    #[napi]
    pub fn abort(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }
    #[napi(getter)]
    pub fn aborted(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

impl Default for AbortFlag {
    fn default() -> Self {
        Self::new()
    }
}

/// One progress report of a load or save: `loaded` of `total` tensors done.
#[napi(object)]
pub struct ProgressJs {
    /// Tensors read (loads) or serialized (saves) so far.
    pub loaded: u32,
    /// Tensors of the whole operation.
    pub total: u32,
}

/// One generation step, as streamed to `generate`'s `onStep`.
#[napi(object)]
pub struct GenerateStepJs {
    /// 0-based index of the step among the new tokens.
    pub step: u32,
    /// Each row's token of this step (`padTokenId` for rows finished earlier).
    pub tokens: Vec<u32>,
    /// Whether each row is finished after this step.
    pub finished: Vec<bool>,
    /// With a tokenizer: each row's new text since the previous step (decoded without special
    /// tokens; text that ends inside a UTF-8 character is held back until it is complete).
    pub text: Option<Vec<String>>,
}

/// What `generate` resolves with.
#[napi(object)]
pub struct GenerateResultJs {
    /// Each row's prompt + new tokens (decoder sequences for seq2seq).
    pub sequences: Vec<Vec<u32>>,
    /// Steps delivered to `onStep` (the facade waits for all of them before resolving).
    pub steps: u32,
}

type ProgressFn = ThreadsafeFunction<ProgressJs, (), ProgressJs, napi::Status, false>;
type StepFn = ThreadsafeFunction<GenerateStepJs, (), GenerateStepJs, napi::Status, false>;

/// A threadsafe function for progress reports (called without blocking from the job's thread;
/// released when the job ends, after its queued calls were delivered).
fn progress_tsfn(f: Option<Function<'_, ProgressJs, ()>>) -> napi::Result<Option<Arc<ProgressFn>>> {
    f.map(|f| f.build_threadsafe_function::<ProgressJs>().build().map(Arc::new)).transpose()
}

/// Runs `work` with a [`Control`] that reports to `progress` and stops when `flag` is set.
fn with_control<T>(progress: Option<Arc<ProgressFn>>, flag: Arc<AtomicBool>, work: impl FnOnce(&Control) -> peft_core::Result<T>) -> peft_core::Result<T> {
    let has_progress = progress.is_some();
    let report = move |loaded: u64, total: u64| {
        if let Some(p) = &progress {
            let _ = p.call(ProgressJs { loaded: loaded as u32, total: total as u32 }, ThreadsafeFunctionCallMode::NonBlocking);
        }
    };
    let stop = move || flag.load(Ordering::SeqCst);
    work(&Control { progress: if has_progress { Some(&report) } else { None }, should_stop: Some(&stop) })
}

#[napi(object)]
pub struct ForwardResult {
    /// The head's output, row-major, f32: logits `[batch, seq, vocab]` (causal / seq2seq LM),
    /// `[batch, num_labels]` (SEQ_CLS), `[batch, seq, num_labels]` (TOKEN_CLS), `[batch, seq, 2]`
    /// (QUESTION_ANS) or the last hidden state `[batch, seq, hidden]` (FEATURE_EXTRACTION).
    pub data: Float32Array,
    pub shape: Vec<u32>,
    /// The task's loss when labels were given (mean, as transformers computes it).
    pub loss: Option<f64>,
}

/// A row-major f32 tensor.
#[napi(object)]
pub struct TensorF32 {
    pub data: Float32Array,
    pub shape: Vec<u32>,
}

#[napi(object)]
pub struct TaskInfo {
    /// HF `task_type` of the model's head.
    pub task_type: String,
    pub num_labels: Option<u32>,
    /// The transformers class the model was built as, e.g. `LlamaForSequenceClassification`.
    pub architecture: String,
}

/// Optional forward inputs beyond ids and mask.
#[napi(object)]
pub struct ForwardExtra {
    /// Multitask prompt tuning: one task id per row.
    pub task_ids: Option<Vec<u32>>,
    /// BERT-family segment ids `[b, s]`, row-major.
    pub token_type_ids: Option<Vec<u32>>,
    /// Encoder-decoder models: decoder input ids `[b, t]`, row-major.
    pub decoder_input_ids: Option<Vec<u32>>,
    /// Encoder-decoder models: decoder mask `[b, t]`.
    pub decoder_attention_mask: Option<Vec<u8>>,
    /// Labels for the loss (shape per task, see `peft_core::train::Batch`); -100 = ignored.
    pub labels: Option<Vec<i32>>,
    /// QUESTION_ANS: answer start / end per row.
    pub start_positions: Option<Vec<i32>>,
    pub end_positions: Option<Vec<i32>>,
    /// CPT: token types `[b, s]` for the loss (HF `input_type_mask`).
    pub input_type_mask: Option<Vec<i64>>,
    /// Mixed batches: each row's scale of its LoRA adapter (with `adapter_names`).
    pub adapter_scales: Option<Vec<f64>>,
}

#[napi(object)]
pub struct GenerateArgs {
    pub max_new_tokens: u32,
    pub do_sample: bool,
    pub temperature: f64,
    pub top_k: u32,
    pub top_p: f64,
    pub seed: u32,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
    pub use_cache: bool,
    /// Multitask prompt tuning: one task id per row.
    pub task_ids: Option<Vec<u32>>,
    /// Mixed batches: each row's scale of its LoRA adapter (with `adapter_names`).
    pub adapter_scales: Option<Vec<f64>>,
}

#[napi(object)]
pub struct LoadResultJs {
    pub missing_keys: Vec<String>,
    pub unexpected_keys: Vec<String>,
}

/// The result of loading a model: the model and (when the source carries one) a tokenizer.
///
/// The bytes of the base weights are reported to V8 as external memory when the model reaches
/// JS, and the report is undone by `dispose()` or, if the user never disposes, by the finalizer
/// that runs when the JS object is garbage-collected (which also frees the model).
#[napi(custom_finalize)]
pub struct NativeModel {
    pub(crate) inner: Shared,
    tokenizer: Option<Arc<peft_core::tokenizer::Tokenizer>>,
    /// Bytes currently reported to V8 (`adjust_external_memory`); 0 once undone.
    external: Arc<AtomicI64>,
    /// Head weights that were freshly initialised at load (not in the checkpoint).
    newly_initialized: Vec<String>,
    /// Set by `dispose()`; read without the model's lock.
    freed: Arc<AtomicBool>,
}

impl NativeModel {
    /// Undo the external-memory report (once; later calls do nothing).
    fn release_external(&self, env: &Env) {
        let n = self.external.swap(0, Ordering::SeqCst);
        if n > 0 {
            let _ = report_external(env, -n);
        }
    }
}

impl ObjectFinalize for NativeModel {
    fn finalize(self, env: Env) -> napi::Result<()> {
        self.release_external(&env);
        Ok(())
    }
}

/// Bytes this addon currently reports to V8 as external memory, over all models of the process
/// (every `adjust_external_memory` call of this file goes through [`report_external`]). For
/// tests and diagnostics: Node's `process.memoryUsage().external` does not show these reports.
#[napi]
pub fn native_reported_memory() -> f64 {
    REPORTED.load(Ordering::SeqCst) as f64
}

static REPORTED: AtomicI64 = AtomicI64::new(0);

/// Sets the number of threads of the engine's one compute pool, shared by every model of the
/// process (`0` = every core). Never waits for a running job: a running step finishes on the
/// old pool, the next one uses the new pool.
#[napi(catch_unwind)]
pub fn set_num_threads(n: u32) -> napi::Result<()> {
    peft_core::engine::set_num_threads(n as usize).map_err(to_napi)
}

/// The engine pool's thread count.
#[napi(catch_unwind)]
pub fn num_threads() -> u32 {
    peft_core::engine::num_threads() as u32
}

/// Sets the internal precision of the engine's large `f32` matrix products for the process
/// (`torch.set_float32_matmul_precision`): "highest", "high" (bf16x3 on AMX) or "medium" (bf16
/// on AMX). Errors: `ERR_INVALID_ARGUMENT` naming `precision` for another value.
#[napi(catch_unwind)]
pub fn set_float32_matmul_precision(precision: String) -> napi::Result<()> {
    use peft_core::engine::amx;
    let p = amx::MatmulPrecision::parse(&precision)
        .ok_or_else(|| peft_core::PeftError::invalid_arg("precision", format!("must be 'highest', 'high' or 'medium', found '{precision}'")))
        .map_err(to_napi)?;
    amx::set_float32_matmul_precision(p);
    Ok(())
}

/// The precision set by [`set_float32_matmul_precision`] ("highest" unless set).
#[napi(catch_unwind)]
pub fn float32_matmul_precision() -> String {
    peft_core::engine::amx::float32_matmul_precision().name().to_string()
}

/// Whether this CPU and kernel let the engine use AMX (what "high" and "medium" need).
#[napi(catch_unwind)]
pub fn amx_available() -> bool {
    peft_core::engine::amx::available()
}

/// The kernels of the products of weights kept quantized (`quantization: 'keep' | 'q8_0' |
/// 'q4_0'`) on this machine: `{ fewRows, batched, inputGradient }` as JSON.
#[napi(catch_unwind)]
pub fn quantization_kernels_json() -> String {
    let k = peft_core::engine::quant::kernel_paths();
    serde_json::json!({ "fewRows": k.few_rows, "batched": k.batched, "inputGradient": k.input_gradient }).to_string()
}

/// Tell V8 about `delta` bytes of native memory (negative: freed) and keep [`REPORTED`] in step.
fn report_external(env: &Env, delta: i64) -> napi::Result<()> {
    env.adjust_external_memory(delta)?;
    REPORTED.fetch_add(delta, Ordering::SeqCst);
    Ok(())
}

/// Load a base model from a HF folder or a GGUF file, off the JS thread. `task` is an HF
/// `task_type` string choosing the head (`AutoModelFor*`); `None` = the checkpoint's own head.
/// `progress` receives `{ loaded, total }` in tensors of the checkpoint (asynchronously, from
/// the loading thread; the last report of a successful load has `loaded == total`); `abort`
/// stops the load between tensors with `ERR_ABORTED`, dropping what was read.
#[napi(ts_return_type = "Promise<NativeModel>")]
pub fn load_model(
    path: String,
    dtype: String,
    task: Option<String>,
    num_labels: Option<u32>,
    seed: Option<u32>,
    quantization: Option<String>,
    progress: Option<Function<'_, ProgressJs, ()>>,
    abort: Option<&AbortFlag>,
) -> napi::Result<AsyncTask<Job<NativeModel, NativeModel>>> {
    let progress = progress_tsfn(progress)?;
    let flag = abort.map(|a| a.flag.clone()).unwrap_or_default();
    Ok(AsyncTask::new(Job::new(
        move || {
            let dt = parse_dtype(&dtype)?;
            let task = match task.as_deref() {
                None => None,
                Some(t) => Some(Task::from_task_type(t).ok_or_else(|| {
                    PeftError::invalid_arg("taskType", format!("unknown task type {t:?}; expected one of {}", Task::ALL.map(|t| t.task_type()).join(", ")))
                })?),
            };
            if num_labels == Some(0) {
                return Err(PeftError::invalid_arg("numLabels", "must be at least 1"));
            }
            use peft_core::engine::quant::QuantType;
            let (keep_quantized, quantize) = match quantization.as_deref() {
                None | Some("dequantize") => (false, None),
                Some("keep") => (true, None),
                Some("q8_0") => (false, Some(QuantType::Q8_0)),
                Some("q4_0") => (false, Some(QuantType::Q4_0)),
                Some(o) => return Err(PeftError::invalid_arg("quantization", format!("must be 'dequantize', 'keep', 'q8_0' or 'q4_0', found {o:?}"))),
            };
            let req = LoadRequest { task, num_labels: num_labels.map(|n| n as usize), seed: seed.unwrap_or(0) as u64, keep_quantized, quantize };
            let loaded = with_control(progress, flag, |ctl| loader::load_model_ctl(std::path::Path::new(&path), dt, &candle_core::Device::Cpu, &req, ctl))?;
            // Native memory: dense weights at the dtype's size, kept-quantized ones at theirs.
            // A tied head kept quantized was not counted as a dense weight (the embedding
            // table it shares stays dense for the lookup).
            let tied = loaded.model.as_llama().is_some_and(|l| l.config.tie_word_embeddings);
            let (mut dense, mut packed) = (loaded.model.base_param_count(), 0usize);
            for (name, l) in loaded.model.named_layers() {
                if let Some(q) = &l.quant {
                    if !(tied && name == "lm_head") {
                        dense = dense.saturating_sub(q.rows() * q.cols());
                    }
                    packed += q.bytes();
                }
            }
            let bytes = (dense * dt.size_in_bytes() + packed) as i64;
            Ok(NativeModel {
                inner: Arc::new(Mutex::new(Some(PeftModel::new(loaded.model)))),
                tokenizer: loaded.tokenizer.map(Arc::new),
                external: Arc::new(AtomicI64::new(bytes)),
                newly_initialized: loaded.newly_initialized,
                freed: Arc::new(AtomicBool::new(false)),
            })
        },
        |env, m| {
            let n = m.external.load(Ordering::SeqCst);
            if n > 0 {
                report_external(&env, n)?;
            }
            Ok(m)
        },
    )))
}

fn to_rows(names: Option<Vec<String>>) -> Option<peft_core::tuners::RowAdapters> {
    names.map(|n| Arc::new(n.into_iter().map(|x| if x == BASE_ADAPTER { None } else { Some(x) }).collect()))
}

#[napi]
impl NativeModel {
    /// The tokenizer that came with the model file (GGUF metadata or tokenizer.json), if any.
    #[napi]
    pub fn take_tokenizer(&mut self) -> Option<crate::tokenizer::NativeTokenizer> {
        self.tokenizer.clone().map(crate::tokenizer::NativeTokenizer::from_arc)
    }

    /// Head weights that were freshly initialised at load because the checkpoint lacks them
    /// (transformers' "newly initialized" list), e.g. `["score.weight"]`.
    #[napi(getter)]
    pub fn newly_initialized(&self) -> Vec<String> {
        self.newly_initialized.clone()
    }

    /// The model's head as an HF `task_type` string (`"CAUSAL_LM"`, `"SEQ_CLS"`, ...) and, for
    /// classification heads, its number of labels.
    #[napi(catch_unwind)]
    pub fn task_info(&self) -> napi::Result<TaskInfo> {
        guard(|| {
            with_model(&self.inner, |m| {
                let i = m.base.info();
                Ok(TaskInfo { task_type: i.task.task_type().to_string(), num_labels: i.num_labels.map(|n| n as u32), architecture: i.architecture.clone() })
            })
        })
    }

    /// The model's config as JSON (transformers names).
    #[napi(catch_unwind)]
    pub fn config_json(&self) -> napi::Result<String> {
        guard(|| {
            with_model(&self.inner, |m| {
                Ok(m.base.config_json().to_string())
            })
        })
    }

    /// Add an adapter from an adapter_config.json object (as JSON text; LoRA or a prompt-learning
    /// method, chosen by `peft_type`). Returns the targeted module names (none for prompt
    /// learning).
    #[napi(catch_unwind)]
    pub fn add_adapter(&self, name: String, config_json: String, seed: u32) -> napi::Result<Vec<String>> {
        guard(|| {
            let v: serde_json::Value = serde_json::from_str(&config_json)
                .map_err(|e| PeftError::InvalidAdapterConfig { path: None, msg: format!("not valid JSON: {e}") })?;
            let cfg = AdapterConfig::from_json(&v, None)?;
            with_model(&self.inner, |m| m.add_adapter(&name, cfg, seed as u64))
        })
    }

    /// Gradient checkpointing on or off for training steps (see
    /// `PeftModel::set_gradient_checkpointing`; refused for prefix tuning with HF's text).
    #[napi(catch_unwind)]
    pub fn set_gradient_checkpointing(&self, on: bool) -> napi::Result<()> {
        guard(|| with_model(&self.inner, |m| m.set_gradient_checkpointing(on)))
    }

    /// Whether gradient checkpointing is on.
    #[napi(catch_unwind)]
    pub fn gradient_checkpointing(&self) -> napi::Result<bool> {
        guard(|| with_model(&self.inner, |m| Ok(m.gradient_checkpointing())))
    }

    /// HF `set_adapter(names, inference_mode)` (see `PeftModel::set_adapter_with`).
    #[napi(catch_unwind)]
    pub fn set_adapter(&self, names: Vec<String>, inference_mode: Option<bool>) -> napi::Result<()> {
        guard(|| with_model(&self.inner, |m| m.set_adapter_with(&names, inference_mode.unwrap_or(false))))
    }

    /// HF `get_prompt_embedding_to_save` (see `PeftModel::prompt_embedding_to_save`), as f32.
    #[napi(ts_return_type = "Promise<TensorF32>")]
    pub fn prompt_embedding_to_save(&self, name: String) -> AsyncTask<Job<(Vec<f32>, Vec<u32>), TensorF32>> {
        let inner = self.inner.clone();
        AsyncTask::new(Job::new(
            move || {
                with_model(&inner, |m| {
                    let t = m.prompt_embedding_to_save(&name)?.to_dtype(candle_core::DType::F32)?;
                    let shape = t.dims().iter().map(|&d| d as u32).collect();
                    Ok((t.flatten_all()?.to_vec1::<f32>()?, shape))
                })
            },
            |_, (data, shape)| Ok(TensorF32 { data: data.into(), shape }),
        ))
    }

    /// The `setRequiresGrad` flags in force, as JSON `{"layers": {adapter: bool}, "copies":
    /// {...}}` (for the JS snapshot's resync).
    #[napi(catch_unwind)]
    pub fn grad_flags_json(&self) -> napi::Result<String> {
        guard(|| {
            with_model(&self.inner, |m| {
                let obj = |p: GradPart| serde_json::Value::Object(m.grad_flags(p).into_iter().map(|(n, b)| (n, serde_json::Value::Bool(b))).collect());
                Ok(serde_json::json!({"layers": obj(GradPart::Layers), "copies": obj(GradPart::Copies)}).to_string())
            })
        })
    }

    /// HF `set_requires_grad` (see `PeftModel::set_requires_grad`).
    #[napi(catch_unwind)]
    pub fn set_requires_grad(&self, names: Vec<String>, requires_grad: bool) -> napi::Result<()> {
        guard(|| with_model(&self.inner, |m| m.set_requires_grad(&names, requires_grad)))
    }

    /// HF `LoraLayer.set_scale` on every layer holding `name` (see `PeftModel::set_adapter_scale`).
    #[napi(catch_unwind)]
    pub fn set_adapter_scale(&self, name: String, scale: f64) -> napi::Result<()> {
        guard(|| with_model(&self.inner, |m| m.set_adapter_scale(&name, scale)))
    }

    /// Multiply every LoRA scaling by `multiplier` until `restoreAdapterScale` (HF
    /// `rescale_adapter_scale`).
    #[napi(catch_unwind)]
    pub fn rescale_adapter_scale(&self, multiplier: f64) -> napi::Result<()> {
        guard(|| with_model(&self.inner, |m| m.rescale_adapter_scale(multiplier)))
    }

    /// Undo the latest `rescaleAdapterScale`; `false` when there was none.
    #[napi(catch_unwind)]
    pub fn restore_adapter_scale(&self) -> napi::Result<bool> {
        guard(|| with_model(&self.inner, |m| Ok(m.restore_adapter_scale())))
    }

    #[napi(catch_unwind)]
    pub fn set_disabled(&self, disabled: bool) -> napi::Result<()> {
        guard(|| with_model(&self.inner, |m| m.set_disabled(disabled)))
    }

    #[napi(catch_unwind)]
    pub fn is_disabled(&self) -> napi::Result<bool> {
        guard(|| with_model(&self.inner, |m| Ok(m.is_disabled())))
    }

    #[napi(catch_unwind)]
    pub fn merge_adapter(&self, names: Option<Vec<String>>, safe_merge: bool) -> napi::Result<()> {
        guard(|| with_model(&self.inner, |m| m.merge_adapter(names.as_deref(), safe_merge)))
    }

    #[napi(catch_unwind)]
    pub fn unmerge_adapter(&self) -> napi::Result<()> {
        guard(|| with_model(&self.inner, |m| m.unmerge_adapter()))
    }

    #[napi(catch_unwind)]
    pub fn merge_and_unload(&self, names: Option<Vec<String>>, safe_merge: bool) -> napi::Result<()> {
        guard(|| with_model(&self.inner, |m| m.merge_and_unload(names.as_deref(), safe_merge)))
    }

    #[napi(catch_unwind)]
    pub fn unload(&self) -> napi::Result<()> {
        guard(|| with_model(&self.inner, |m| m.unload()))
    }

    #[napi(catch_unwind)]
    pub fn delete_adapter(&self, name: String) -> napi::Result<()> {
        guard(|| with_model(&self.inner, |m| m.delete_adapter(&name)))
    }

    /// AdaLoRA: HF `update_and_allocate(global_step)` with the gradients of the last trainer step.
    #[napi(catch_unwind)]
    pub fn update_and_allocate(&self, global_step: u32) -> napi::Result<()> {
        guard(|| with_model(&self.inner, |m| m.update_and_allocate_recorded(global_step as usize)))
    }

    #[napi(catch_unwind)]
    pub fn adapter_names(&self) -> napi::Result<Vec<String>> {
        guard(|| with_model(&self.inner, |m| Ok(m.adapter_names())))
    }

    #[napi(catch_unwind)]
    pub fn active_adapters(&self) -> napi::Result<Vec<String>> {
        guard(|| with_model(&self.inner, |m| Ok(m.active_adapters().to_vec())))
    }

    #[napi(catch_unwind)]
    pub fn merged_adapters(&self) -> napi::Result<Vec<String>> {
        guard(|| with_model(&self.inner, |m| Ok(m.merged_adapters())))
    }

    /// adapter_config.json text of adapter `name`, as HF writes it.
    #[napi(catch_unwind)]
    pub fn peft_config_json(&self, name: String) -> napi::Result<String> {
        guard(|| with_model(&self.inner, |m| m.config_json(&name)))
    }

    /// HF `peft_type` of the model's adapters, or null before the first one.
    #[napi(catch_unwind)]
    pub fn peft_type(&self) -> napi::Result<Option<String>> {
        guard(|| with_model(&self.inner, |m| Ok(m.peft_type().map(String::from))))
    }

    /// Whether the adapters are prompt-learning adapters.
    #[napi(catch_unwind)]
    pub fn is_prompt_learning(&self) -> napi::Result<bool> {
        guard(|| with_model(&self.inner, |m| Ok(m.is_prompt_learning())))
    }

    /// The dtype the base model runs in, as torch names it (`float32`, `bfloat16`, `float16`).
    #[napi(catch_unwind)]
    pub fn dtype_name(&self) -> napi::Result<String> {
        guard(|| {
            with_model(&self.inner, |m| {
                Ok(match m.base.dtype() {
                    candle_core::DType::BF16 => "bfloat16",
                    candle_core::DType::F16 => "float16",
                    _ => "float32",
                }
                .to_string())
            })
        })
    }

    /// Warnings raised by the model since the last call (HF `warnings.warn` messages).
    #[napi(catch_unwind)]
    pub fn take_warnings(&self) -> napi::Result<Vec<String>> {
        guard(|| with_model(&self.inner, |m| Ok(m.take_warnings())))
    }

    /// What never changes after load, as JSON, for the JS facade's snapshot: `layers` (the path of
    /// every linear layer that can carry adapters, in the model's order), `baseParams` (HF's
    /// count of base parameters), `dtype` (torch's name of the base dtype) and `device` (torch's
    /// device type: `cpu`, `cuda`).
    #[napi(catch_unwind)]
    pub fn base_info_json(&self) -> napi::Result<String> {
        guard(|| {
            with_model(&self.inner, |m| {
                let dtype = match m.base.dtype() {
                    candle_core::DType::BF16 => "bfloat16",
                    candle_core::DType::F16 => "float16",
                    _ => "float32",
                };
                let device = match m.base.device() {
                    candle_core::Device::Cpu => "cpu",
                    candle_core::Device::Cuda(_) => "cuda",
                    candle_core::Device::Metal(_) => "mps",
                };
                let layers: Vec<String> = m.base.named_layers().into_iter().map(|(p, _)| p).collect();
                // Layers whose base weight is kept quantized: path -> backend ("gguf-<TYPE>", "q8_0", ...).
                let quantized: serde_json::Map<String, serde_json::Value> = m
                    .base
                    .named_layers()
                    .into_iter()
                    .filter_map(|(p, l)| l.quant.as_ref().map(|q| (p, serde_json::json!(q.backend()))))
                    .collect();
                Ok(serde_json::json!({ "layers": layers, "baseParams": m.base.base_param_count(), "dtype": dtype, "device": device, "quantized": quantized }).to_string())
            })
        })
    }

    /// Everything the JS facade's snapshot keeps about adapter `name`, as JSON: `config`
    /// (adapter_config.json text), `peftType`, `modelClass` (HF's tuner model class, from the
    /// tuner registry), `promptLearning`, `inferenceMode`, `gradParams` (`[layers, copies]`: the
    /// parameters that can take gradients, in its tuner layers or prompt encoder and in its
    /// modules_to_save copies, whatever their `requires_grad`), `params` (all its parameters) and `layers` (`[path, kind]`
    /// for each layer that carries it; kind `lora`, `lora_embedding`, `ia3`, `modules_to_save`,
    /// `adaption_prompt` for an attention module wrapped by an adaption prompt, or another
    /// tuner's module-type prefix, `loha` for `loha.Linear`). Errors:
    /// `ERR_ADAPTER_NOT_FOUND`.
    #[napi(catch_unwind)]
    pub fn adapter_info_json(&self, name: String) -> napi::Result<String> {
        guard(|| {
            with_model(&self.inner, |m| {
                let cfg = m.peft_config(&name)?;
                let (peft_type, prompt, inference) = (cfg.peft_type(), cfg.is_prompt_learning(), cfg.inference_mode());
                let mut grad_params = [0usize; 2];
                for (part, _, v) in m.adapter_param_parts(&name) {
                    grad_params[(part == GradPart::Copies) as usize] += v.elem_count();
                }
                let mut params = m.prompt_encoder(&name).map(|e| e.param_count()).unwrap_or(0);
                let mut layers = Vec::new();
                for (path, l) in m.base.named_layers() {
                    if let Some((w, b)) = l.saved_copies.get(&name) {
                        params += w.elem_count() + b.as_ref().map(|b| b.elem_count()).unwrap_or(0);
                        layers.push(serde_json::json!([path, "modules_to_save"]));
                    }
                    if let Some(kind) = l.adapter_kind(&name) {
                        params += l.adapter_params(&name).iter().map(|(_, v)| v.elem_count()).sum::<usize>();
                        params += l.layers.get(&name).map(|x| x.frozen_param_count()).unwrap_or(0);
                        layers.push(serde_json::json!([path, kind]));
                    }
                }
                for (path, h) in m.base.named_attention_prompts() {
                    if let Some(a) = h.adapters.get(&name) {
                        params += a.params().iter().map(|(_, v)| v.elem_count()).sum::<usize>();
                        layers.push(serde_json::json!([path, "adaption_prompt"]));
                    }
                }
                Ok(serde_json::json!({
                    "name": name,
                    "config": m.config_json(&name)?,
                    "peftType": peft_type,
                    "modelClass": cfg.tuner().model_class(),
                    "promptLearning": prompt,
                    "inferenceMode": inference,
                    "gradParams": grad_params,
                    "params": params,
                    "layers": layers,
                })
                .to_string())
            })
        })
    }

    /// HF `get_layer_status()` as JSON (snake_case fields).
    #[napi(catch_unwind)]
    pub fn layer_status_json(&self) -> napi::Result<String> {
        guard(|| with_model(&self.inner, |m| Ok(serde_json::Value::Array(m.layer_status()?).to_string())))
    }

    /// HF `get_model_status()` as JSON (snake_case fields).
    #[napi(catch_unwind)]
    pub fn model_status_json(&self) -> napi::Result<String> {
        guard(|| with_model(&self.inner, |m| Ok(m.model_status()?.to_string())))
    }

    /// `[trainable, all]` parameter counts.
    #[napi(catch_unwind)]
    pub fn nb_trainable_parameters(&self) -> napi::Result<Vec<f64>> {
        guard(|| with_model(&self.inner, |m| { let (t, a) = m.nb_trainable_parameters(); Ok(vec![t as f64, a as f64]) }))
    }

    /// Forward pass. `inputIds` row-major `[batch, seq]`; `attentionMask` the same shape (1/0).
    #[napi(ts_return_type = "Promise<ForwardResult>")]
    pub fn forward(
        &self,
        input_ids: Uint32Array,
        batch: u32,
        seq: u32,
        attention_mask: Option<Uint8Array>,
        adapter_names: Option<Vec<String>>,
        extra: Option<ForwardExtra>,
    ) -> napi::Result<AsyncTask<Job<(candle_core::Tensor, Vec<u32>, Option<f64>), ForwardResult>>> {
        let ids = input_ids.to_vec();
        let (b, s) = (batch as usize, seq as usize);
        if ids.len() != b * s {
            return Err(arg_err("inputIds", format!("has {} values, expected {b} × {s}", ids.len())));
        }
        let mask = attention_mask.map(|m| m.to_vec());
        let inner = self.inner.clone();
        let rows = to_rows(adapter_names);
        Ok(AsyncTask::new(Job::new(
            move || {
                with_model(&inner, |m| {
                    let e = extra.unwrap_or(ForwardExtra {
                        task_ids: None,
                        token_type_ids: None,
                        decoder_input_ids: None,
                        decoder_attention_mask: None,
                        labels: None,
                        start_positions: None,
                        end_positions: None,
                        input_type_mask: None,
                        adapter_scales: None,
                    });
                    let adapter_scales = e.adapter_scales.map(std::sync::Arc::new);
                    let to64 = |v: Option<Vec<i32>>| v.map(|v| v.into_iter().map(|x| x as i64).collect::<Vec<i64>>());
                    let wants_loss = e.labels.is_some() || e.start_positions.is_some();
                    let batch = peft_core::train::Batch {
                        attention_mask: mask.clone().unwrap_or_else(|| vec![1; b * s]),
                        labels: to64(e.labels).unwrap_or_default(),
                        batch_size: b,
                        seq_len: s,
                        task_ids: e.task_ids,
                        token_type_ids: e.token_type_ids,
                        start_positions: to64(e.start_positions),
                        end_positions: to64(e.end_positions),
                        decoder_input_ids: e.decoder_input_ids,
                        decoder_attention_mask: e.decoder_attention_mask,
                        input_type_mask: e.input_type_mask,
                        input_ids: ids,
                    };
                    // The batch's own options (decoder ids from labels for seq2seq), with the
                    // caller's mask as given (None = no padding) and per-row adapters.
                    let opts = ForwardOptions { attention_mask: mask, adapter_rows: rows, adapter_scales, ..batch.forward_options(m) };
                    let logits = m.forward(&batch.input_ids, b, s, &opts, None)?;
                    let loss = if wants_loss {
                        batch.validate(m)?;
                        let (l, _) = peft_core::train::task_loss(m, &logits, &batch)?;
                        Some(l.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? as f64)
                    } else {
                        None
                    };
                    let logits = logits.to_dtype(candle_core::DType::F32)?.contiguous()?;
                    let shape = logits.dims().iter().map(|&d| d as u32).collect();
                    Ok((logits, shape, loss))
                })
            },
            |_, (logits, shape, loss)| Ok(ForwardResult { data: f32_array(logits)?, shape, loss }),
        )))
    }

    /// Generate; resolves with each row's prompt + new tokens and the number of steps streamed.
    /// `onStep` (optional) receives every step as it is produced (asynchronously, from the
    /// generating thread, in order); `stopStrings` finish a row at the token completing one of
    /// them (transformers' `StopStringCriteria`; needs `tokenizer`, which also adds each step's
    /// decoded text to the events); `abort` stops between tokens with `ERR_ABORTED`.
    #[napi(ts_return_type = "Promise<GenerateResultJs>")]
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &self,
        input_ids: Uint32Array,
        batch: u32,
        seq: u32,
        attention_mask: Option<Uint8Array>,
        args: GenerateArgs,
        adapter_names: Option<Vec<String>>,
        abort: Option<&AbortFlag>,
        on_step: Option<Function<'_, GenerateStepJs, ()>>,
        stop_strings: Option<Vec<String>>,
        tokenizer: Option<&crate::tokenizer::NativeTokenizer>,
    ) -> napi::Result<AsyncTask<Job<GenerateResultJs, GenerateResultJs>>> {
        let ids = input_ids.to_vec();
        let (b, s) = (batch as usize, seq as usize);
        let mask = attention_mask.map(|m| m.to_vec());
        let inner = self.inner.clone();
        let rows = to_rows(adapter_names);
        let flag = abort.map(|a| a.flag.clone()).unwrap_or_default();
        let stops = stop_strings.unwrap_or_default();
        if stops.iter().any(|x| x.is_empty()) {
            return Err(arg_err("stopStrings", "must not contain an empty string"));
        }
        let tok = tokenizer.map(|t| t.arc());
        if !stops.is_empty() && tok.is_none() {
            return Err(arg_err("stopStrings", "need a `tokenizer` to decode the generated tokens"));
        }
        let on_step: Option<StepFn> = on_step.map(|f| f.build_threadsafe_function::<GenerateStepJs>().build()).transpose()?;
        let o = GenerateOptions {
            max_new_tokens: args.max_new_tokens as usize,
            do_sample: args.do_sample,
            temperature: args.temperature,
            top_k: args.top_k as usize,
            top_p: args.top_p,
            seed: args.seed as u64,
            eos_token_ids: args.eos_token_ids,
            pad_token_id: args.pad_token_id,
            use_cache: args.use_cache,
            task_ids: args.task_ids,
            adapter_scales: args.adapter_scales,
        };
        Ok(AsyncTask::new(Job::plain(move || {
            with_model(&inner, |m| {
                m.check_rows(&ForwardOptions { adapter_rows: rows.clone(), adapter_scales: o.adapter_scales.clone().map(std::sync::Arc::new), ..Default::default() }, b)?;
                let start = if m.base.task() == peft_core::model::Task::Seq2SeqLm { 1 } else { s };
                let mut steps = 0u32;
                // per row: the text already sent (decoded new tokens, without special tokens)
                let mut sent: Vec<String> = vec![String::new(); b];
                let mut failed: Option<PeftError> = None;
                let mut was_finished = vec![false; b];
                let mut emit = |st: &Step| {
                    steps += 1;
                    let Some(f) = &on_step else { return };
                    let text = tok.as_ref().map(|t| {
                        (0..b)
                            .map(|r| {
                                // a row finished before this step only gets padding
                                if was_finished[r] {
                                    return String::new();
                                }
                                match t.decode(&st.rows[r][start..], true) {
                                    // held back while it ends inside a UTF-8 character
                                    Ok(full) if !full.ends_with('\u{FFFD}') && full.starts_with(sent[r].as_str()) => {
                                        let delta = full[sent[r].len()..].to_string();
                                        sent[r] = full;
                                        delta
                                    }
                                    Ok(_) => String::new(),
                                    Err(e) => {
                                        failed.get_or_insert(e);
                                        String::new()
                                    }
                                }
                            })
                            .collect()
                    });
                    was_finished.copy_from_slice(st.finished);
                    let ev = GenerateStepJs { step: st.index as u32, tokens: st.tokens.to_vec(), finished: st.finished.to_vec(), text };
                    let _ = f.call(ev, ThreadsafeFunctionCallMode::NonBlocking);
                };
                let stop = || flag.load(Ordering::SeqCst);
                let hooks = GenerateHooks {
                    should_stop: &stop,
                    on_step: Some(&mut emit),
                    stop_strings: tok.as_deref().filter(|_| !stops.is_empty()).map(|t| StopStrings { strings: &stops, tokenizer: t }),
                };
                let sequences = generate_with(m, &ids, b, s, mask, rows, &o, hooks)?;
                if let Some(e) = failed {
                    return Err(e);
                }
                Ok(GenerateResultJs { sequences, steps })
            })
        })))
    }

    /// Save adapters (all, or `selected`) in HF PEFT's layout under `dir`.
    /// `saveEmbeddingLayers`: "auto" (default), "true" or "false" (HF `save_embedding_layers`).
    /// `progress` receives `{ loaded, total }` in tensors serialized; `abort` stops the save
    /// before its files are committed (`ERR_ABORTED`; temp files and folders it created are
    /// removed). See `PeftModel::save_pretrained_ctl`.
    #[napi(ts_return_type = "Promise<Array<string>>")]
    #[allow(clippy::too_many_arguments)]
    pub fn save_pretrained(
        &self,
        dir: String,
        selected: Option<Vec<String>>,
        save_embedding_layers: Option<String>,
        path_initial_model_for_weight_conversion: Option<String>,
        progress: Option<Function<'_, ProgressJs, ()>>,
        abort: Option<&AbortFlag>,
    ) -> napi::Result<AsyncTask<Job<Vec<String>, Vec<String>>>> {
        let inner = self.inner.clone();
        let progress = progress_tsfn(progress)?;
        let flag = abort.map(|a| a.flag.clone()).unwrap_or_default();
        Ok(AsyncTask::new(Job::plain(move || {
            let emb = match save_embedding_layers.as_deref() {
                None | Some("auto") => SaveEmbeddingLayers::Auto,
                Some("true") => SaveEmbeddingLayers::Yes,
                Some("false") => SaveEmbeddingLayers::No,
                Some(o) => return Err(PeftError::invalid_arg("saveEmbeddingLayers", format!("must be 'auto' or a boolean, found {o:?}"))),
            };
            with_model(&inner, |m| {
                let opts = SaveOptions { save_embedding_layers: emb, path_initial_model_for_weight_conversion: path_initial_model_for_weight_conversion.map(std::path::PathBuf::from) };
                let files = with_control(progress, flag, |ctl| m.save_pretrained_ctl(std::path::Path::new(&dir), selected.as_deref(), &opts, ctl))?;
                Ok(files.into_iter().map(|p| p.to_string_lossy().into_owned()).collect())
            })
        })))
    }

    /// HF `hotswap_adapter`, off the JS thread (reads the folder's files): the weights of the
    /// loaded LoRA adapter `name` replaced in place by those in `dir`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn hotswap_adapter(&self, dir: String, name: String) -> AsyncTask<Job<(), ()>> {
        let inner = self.inner.clone();
        AsyncTask::new(Job::plain(move || with_model(&inner, |m| m.hotswap_adapter(std::path::Path::new(&dir), &name))))
    }

    /// HF `add_weighted_adapter`, off the JS thread (SVD-based combinations take seconds on real
    /// models). `optionsJson`: `{adapters, weights, adapterName, combinationType, svdRank,
    /// svdClamp, density, majoritySignMethod, seed}`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn add_weighted_adapter(&self, options_json: String) -> AsyncTask<Job<(), ()>> {
        let inner = self.inner.clone();
        AsyncTask::new(Job::new(
            move || {
                use peft_core::tuners::weighted::{Combination, MajoritySign, WeightedAdapterOptions};
                let v: serde_json::Value = serde_json::from_str(&options_json).map_err(|e| PeftError::invalid_arg("options", format!("not valid JSON: {e}")))?;
                let strings = |k: &str| -> Result<Vec<String>, PeftError> {
                    v[k].as_array()
                        .and_then(|a| a.iter().map(|x| x.as_str().map(String::from)).collect::<Option<Vec<_>>>())
                        .ok_or_else(|| PeftError::invalid_arg(k, "must be an array of strings"))
                };
                let weights = v["weights"]
                    .as_array()
                    .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| PeftError::invalid_arg("weights", "must be an array of numbers"))?;
                let opt_f64 = |k: &str| -> Result<Option<f64>, PeftError> {
                    match &v[k] {
                        serde_json::Value::Null => Ok(None),
                        x => x.as_f64().map(Some).ok_or_else(|| PeftError::invalid_arg(k, "must be a number")),
                    }
                };
                let svd_rank = match &v["svdRank"] {
                    serde_json::Value::Null => None,
                    x => Some(x.as_u64().ok_or_else(|| PeftError::invalid_arg("svdRank", "must be a positive integer"))? as usize),
                };
                let o = WeightedAdapterOptions {
                    adapters: strings("adapters")?,
                    weights,
                    adapter_name: v["adapterName"].as_str().ok_or_else(|| PeftError::invalid_arg("adapterName", "must be a string"))?.to_string(),
                    combination_type: Combination::parse(v["combinationType"].as_str().unwrap_or("svd"))?,
                    svd_rank,
                    svd_clamp: opt_f64("svdClamp")?,
                    density: opt_f64("density")?,
                    majority_sign_method: match v["majoritySignMethod"].as_str().unwrap_or("total") {
                        "total" => MajoritySign::Total,
                        "frequency" => MajoritySign::Frequency,
                        other => return Err(PeftError::invalid_arg("majoritySignMethod", format!("must be 'total' or 'frequency', found {other:?}"))),
                    },
                    seed: v["seed"].as_u64().unwrap_or(0),
                };
                peft_core::peft_model::validate_adapter_name(&o.adapter_name)?;
                with_model(&inner, |m| m.add_weighted_adapter(&o))
            },
            |_, _| Ok(()),
        ))
    }

    /// Load an adapter folder under `name`. `configJson` overrides the folder's adapter_config.json;
    /// `keyMapping` holds `[regex, replacement]` pairs (HF `key_mapping`, in order). `progress`
    /// receives `{ loaded, total }` in tensors of adapter_model.safetensors; `abort` stops the
    /// load between tensors (`ERR_ABORTED`), leaving the model unchanged.
    #[napi(ts_return_type = "Promise<LoadResultJs>")]
    #[allow(clippy::too_many_arguments)]
    pub fn load_adapter(
        &self,
        dir: String,
        name: String,
        is_trainable: bool,
        config_json: Option<String>,
        key_mapping: Option<Vec<Vec<String>>>,
        autocast_adapter_dtype: Option<bool>,
        low_cpu_mem_usage: Option<bool>,
        progress: Option<Function<'_, ProgressJs, ()>>,
        abort: Option<&AbortFlag>,
    ) -> napi::Result<AsyncTask<Job<peft_core::peft_model::LoadResult, LoadResultJs>>> {
        let inner = self.inner.clone();
        let progress = progress_tsfn(progress)?;
        let flag = abort.map(|a| a.flag.clone()).unwrap_or_default();
        Ok(AsyncTask::new(Job::new(
            move || {
                let cfg = match config_json {
                    Some(j) => {
                        let v: serde_json::Value = serde_json::from_str(&j)
                            .map_err(|e| PeftError::InvalidAdapterConfig { path: None, msg: format!("not valid JSON: {e}") })?;
                        Some(AdapterConfig::from_json(&v, None)?)
                    }
                    None => None,
                };
                let mut pairs = Vec::new();
                for p in key_mapping.unwrap_or_default() {
                    match p.as_slice() {
                        [a, b] => pairs.push((a.clone(), b.clone())),
                        _ => return Err(PeftError::invalid_arg("keyMapping", "must map regex strings to replacement strings")),
                    }
                }
                let o = peft_core::peft_model::LoadOptions {
                    is_trainable,
                    config: cfg,
                    key_mapping: pairs,
                    autocast_adapter_dtype: autocast_adapter_dtype.unwrap_or(true),
                    low_cpu_mem_usage: low_cpu_mem_usage.unwrap_or(false),
                };
                with_model(&inner, |m| with_control(progress, flag, |ctl| m.load_adapter_ctl(std::path::Path::new(&dir), &name, &o, ctl)))
            },
            |_, r| Ok(LoadResultJs { missing_keys: r.missing_keys, unexpected_keys: r.unexpected_keys }),
        )))
    }

    /// Save the model (merged: no adapter attached) as a transformers model folder: config.json,
    /// safetensors weights in shards of at most `maxShardSize` bytes (with
    /// model.safetensors.index.json when there are several) and the tokenizer files. Returns the
    /// written paths. See `peft_core::export::save_merged_pretrained`.
    #[napi(ts_return_type = "Promise<Array<string>>")]
    pub fn save_merged_pretrained(&self, dir: String, max_shard_size: f64) -> napi::Result<AsyncTask<Job<Vec<String>, Vec<String>>>> {
        if !(max_shard_size.is_finite() && max_shard_size >= 1.0 && max_shard_size <= 9.007_199_254_740_991e15) {
            return Err(arg_err("maxShardSize", format!("must be a positive number of bytes, found {max_shard_size}")));
        }
        let inner = self.inner.clone();
        let tok = self.tokenizer.clone();
        Ok(AsyncTask::new(Job::plain(move || {
            with_model(&inner, |m| {
                let o = peft_core::export::MergedSaveOptions { max_shard_size: max_shard_size as u64 };
                let files = peft_core::export::save_merged_pretrained(m, std::path::Path::new(&dir), tok.as_deref(), &o)?;
                Ok(files.into_iter().map(|p| p.to_string_lossy().into_owned()).collect())
            })
        })))
    }

    /// Write the model (merged: no adapter attached; loaded from a GGUF file) as a GGUF file for
    /// llama.cpp, tensors as `outtype` ('f32' | 'f16' | 'q8_0'; norms stay f32). Returns
    /// `[name, type]` pairs of the written tensors. See `peft_core::export::export_merged_gguf`.
    #[napi(ts_return_type = "Promise<Array<Array<string>>>")]
    pub fn export_gguf(&self, file: String, outtype: String) -> AsyncTask<Job<Vec<Vec<String>>, Vec<Vec<String>>>> {
        let inner = self.inner.clone();
        AsyncTask::new(Job::plain(move || {
            let ty = peft_core::export::GgmlType::parse(&outtype)?;
            with_model(&inner, |m| {
                let t = peft_core::export::export_merged_gguf(m, std::path::Path::new(&file), ty)?;
                Ok(t.into_iter().map(|(n, ty)| vec![n, format!("{ty:?}").to_lowercase()]).collect())
            })
        }))
    }

    /// Free the native model now and undo its external-memory report. Later calls fail with
    /// `ERR_INVALID_STATE`. This takes the model's lock, so it waits for a running job: the JS
    /// facade calls it only when its queue for the model is idle (`PeftModel.dispose()` schedules
    /// it after running jobs).
    #[napi]
    pub fn dispose(&self, env: Env) -> napi::Result<()> {
        let mut g = lock(&self.inner).map_err(to_napi)?;
        *g = None;
        drop(g);
        self.freed.store(true, Ordering::SeqCst);
        self.release_external(&env);
        Ok(())
    }

    /// Bring the external-memory report up to date with the model's current weights (adapters
    /// added, loaded or deleted). Never blocks: while a task holds the model, nothing changes
    /// and the report catches up on a later call. Returns the bytes now reported.
    #[napi]
    pub fn sync_external_memory(&self, env: Env) -> napi::Result<f64> {
        let now = match self.inner.try_lock() {
            Ok(g) => g.as_ref().map(|m| m.native_bytes() as i64),
            Err(_) => None,
        };
        let prev = self.external.load(Ordering::SeqCst);
        if let Some(now) = now {
            if prev > 0 && now != prev {
                report_external(&env, now - prev)?;
                self.external.store(now, Ordering::SeqCst);
            }
        }
        Ok(self.external.load(Ordering::SeqCst) as f64)
    }

    /// Bytes of native memory this model reports to V8 as external memory (0 after dispose).
    #[napi(getter)]
    pub fn external_memory(&self) -> f64 {
        self.external.load(Ordering::SeqCst) as f64
    }

    /// Whether `dispose()` has freed the model (never waits for a running job).
    #[napi(getter)]
    pub fn disposed(&self) -> bool {
        self.freed.load(Ordering::SeqCst)
    }
}

/// A contiguous `f32` CPU tensor as a JS `Float32Array` without copying: the array's external
/// backing store is the tensor's own storage, and the tensor is kept alive until V8 collects the
/// array (then dropped in the finalizer). A `[1, 256, 49152]` logits tensor is 50 MB: a copy
/// (and the page faults of a fresh 50 MB buffer) cost ~15% of a prefill. Where the runtime refuses
/// external buffers (Electron's V8 sandbox), napi-rs copies the data instead.
fn f32_array(t: candle_core::Tensor) -> napi::Result<Float32Array> {
    let (ptr, len) = {
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            // A device tensor (the `cuda` feature): copied to a JS-owned array.
            drop(storage);
            let data = t.flatten_all().and_then(|f| f.to_vec1::<f32>()).map_err(|e| to_napi(e.into()))?;
            return Ok(Float32Array::new(data));
        };
        let data = cpu.as_slice::<f32>().map_err(|e| to_napi(e.into()))?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(napi::Error::from_reason("[ERR_INTERNAL] forward output is not contiguous"));
        };
        let data = &data[start..end];
        (data.as_ptr() as *mut f32, data.len())
    };
    if len == 0 {
        return Ok(Float32Array::new(Vec::new()));
    }
    // SAFETY: `ptr .. ptr + len` lies inside the tensor's storage, which the finalizer's clone of
    // the tensor keeps alive (and never reallocates: candle storages are not resized) until V8
    // releases the array. The tensor is a fresh forward output that nothing else reads.
    Ok(unsafe { Float32Array::with_external_data(ptr, len, move |_, _| drop(t)) })
}
