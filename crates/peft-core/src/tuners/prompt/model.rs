//! Prompt learning in a model (HF `PeftModel._setup_prompt_encoder` and
//! `set_peft_model_state_dict` for prompt-learning adapters): adding an adapter with its
//! encoder, loading its tensors, and multitask prompt tuning's source-task initialisation.

use super::{text_init_ids, PromptEncoder, PromptInit, PromptLearningConfig, PromptMethod};
use crate::error::{PeftError, Result};
use crate::io::read_safetensors;
use crate::model::Task;
use crate::peft_model::{saves_module, LoadResult, PeftModel, KEY_PREFIX};
use rand::{Rng, SeedableRng};
use crate::tuners::config::AdapterConfig;
use crate::tuners::registry::{Operation, Tuner};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The prompt-learning tuner (HF `PromptEmbedding`, `PromptEncoder`, `PrefixEncoder`,
/// `MultitaskPromptEmbedding`), registered for `PREFIX_TUNING`, `PROMPT_TUNING`, `P_TUNING` and
/// `MULTITASK_PROMPT_TUNING`. Its adapters live in the model's prompt encoders, not in layers.
pub struct PromptTuner;

impl Tuner for PromptTuner {
    // Prompt learning has no tuner model; status refuses it before asking (HF: PeftModel).
    crate::tuners::registry::declare_tuner!(peft_types: &["PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"], model_class: "PeftModel", config: PromptLearningConfig,
        inject: |model, name, c, seed| model.add_prompt(name, c, seed, None).map(|_| vec![]));
    fn prefix(&self, peft_type: &str) -> Option<&'static str> {
        match peft_type {
            "PREFIX_TUNING" => Some("prefix_tuning_"),
            "PROMPT_TUNING" => Some("prompt_tuning_"),
            "P_TUNING" => Some("p_tuning_"),
            "MULTITASK_PROMPT_TUNING" => Some("multitask_prompt_tuning_"),
            _ => None,
        }
    }
    fn refusal(&self, op: Operation, _name: &str, cfg: &AdapterConfig) -> Option<PeftError> {
        super::refusal(op, cfg)
    }
    fn load(&self, model: &mut PeftModel, name: &str, cfg: &AdapterConfig, tensors: &mut Vec<(String, Tensor)>, wpath: &Path) -> Option<Result<LoadResult>> {
        let c = cfg.as_prompt()?.clone();
        Some(model.load_prompt(name, c, std::mem::take(tensors), wpath))
    }
}

impl PeftModel {
    /// Add a prompt-learning adapter (HF `_setup_prompt_encoder`): derive the config's model
    /// fields, check them against the model, build (or take) its encoder.
    pub(crate) fn add_prompt(&mut self, name: &str, mut cfg: PromptLearningConfig, seed: u64, encoder: Option<PromptEncoder>) -> Result<()> {
        let bad = |msg: String| PeftError::InvalidAdapterConfig { path: None, msg };
        let task = cfg.task_type.as_deref().and_then(Task::from_task_type);
        let dims = self.model_dims();
        cfg.prepare(&dims);
        if cfg.base_model_name_or_path.is_none() {
            cfg.base_model_name_or_path = self.base.info().name_or_path.clone();
        }
        // HF: SEQ_2_SEQ_LM gives 2 transformer submodules (encoder and decoder), else 1.
        let seq2seq = self.base.task() == Task::Seq2SeqLm;
        if seq2seq && cfg.num_transformer_submodules != Some(2) {
            return Err(bad(format!(
                "num_transformer_submodules {:?} (task_type {:?}) does not fit the encoder-decoder model {}: use task_type \"SEQ_2_SEQ_LM\" (num_transformer_submodules 2)",
                cfg.num_transformer_submodules,
                cfg.task_type,
                self.base.info().architecture
            )));
        }
        if !seq2seq && cfg.num_transformer_submodules != Some(1) {
            return Err(bad(format!(
                "num_transformer_submodules {:?} (task_type {:?}) needs an encoder-decoder model; this model is decoder-only (use task_type \"CAUSAL_LM\")",
                cfg.num_transformer_submodules, cfg.task_type
            )));
        }
        if seq2seq && cfg.method == PromptMethod::MultitaskPromptTuning {
            return Err(bad("MULTITASK_PROMPT_TUNING is not supported for encoder-decoder models here (use PROMPT_TUNING, P_TUNING or PREFIX_TUNING)".into()));
        }
        if seq2seq && cfg.method == PromptMethod::PrefixTuning && cfg.num_layers.unwrap_or(0) < self.base.num_layers() {
            return Err(bad(format!(
                "prefix tuning `num_layers` {:?} is smaller than the model's {} decoder layers (HF PEFT builds one prefix group per layer up to num_layers)",
                cfg.num_layers,
                self.base.num_layers()
            )));
        }
        let td = cfg.token_dim.unwrap_or(0);
        let max_pos = self.base.info().max_position_embeddings;
        if cfg.total_virtual_tokens() >= max_pos {
            return Err(bad(format!(
                "`num_virtual_tokens` {} leaves no position for real tokens: the model has max_position_embeddings {max_pos}",
                cfg.num_virtual_tokens
            )));
        }
        match cfg.method {
            PromptMethod::PrefixTuning => {
                let heads = cfg.num_attention_heads.unwrap_or(0);
                if cfg.num_layers != Some(dims.num_layers) || heads != dims.num_key_value_heads.unwrap_or(dims.num_attention_heads) || td != heads * dims.head_dim {
                    return Err(bad(format!(
                        "prefix tuning config (num_layers {:?}, num_attention_heads {heads}, token_dim {td}) does not fit the model ({} layers, {} key/value heads of size {})",
                        cfg.num_layers, dims.num_layers, dims.num_key_value_heads.unwrap_or(dims.num_attention_heads), dims.head_dim
                    )));
                }
            }
            _ => {
                if td != dims.hidden_size {
                    return Err(bad(format!("token_dim {td} does not match the model's hidden size {}", dims.hidden_size)));
                }
            }
        }
        let device = self.base.device().clone();
        let encoder = match encoder {
            Some(e) => e,
            None => {
                let rows = cfg.table_rows();
                let use_vocab = !cfg.inference_mode && matches!(cfg.method, PromptMethod::PromptTuning | PromptMethod::MultitaskPromptTuning);
                let init = if let (Some(c), false) = (&cfg.cpt, cfg.inference_mode) {
                    // HF `CPTEmbedding`: the rows of the word embeddings of `cpt_token_ids`, in f32.
                    if let Some(id) = c.cpt_token_ids.iter().find(|&&x| x as usize >= dims.vocab_size) {
                        return Err(bad(format!("`cpt_token_ids` holds {id}, outside the model's vocabulary ({})", dims.vocab_size)));
                    }
                    PromptInit::FromVocab { word_embeddings: self.base.word_embeddings(), ids: c.cpt_token_ids.clone() }
                } else if use_vocab && cfg.prompt_tuning_init == "TEXT" {
                    let tpath = PathBuf::from(cfg.tokenizer_name_or_path.clone().unwrap_or_default());
                    let tok = crate::tokenizer::Tokenizer::from_pretrained(&tpath)?;
                    let ids = tok.encode(cfg.prompt_tuning_init_text.as_deref().unwrap_or(""), true)?;
                    PromptInit::FromVocab { word_embeddings: self.base.word_embeddings(), ids: text_init_ids(&ids, rows)? }
                } else if use_vocab && cfg.prompt_tuning_init == "SAMPLE_VOCAB" {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
                    let ids = (0..rows).map(|_| rng.random_range(0..dims.vocab_size as u32)).collect();
                    PromptInit::FromVocab { word_embeddings: self.base.word_embeddings(), ids }
                } else {
                    PromptInit::Random
                };
                let mut enc = PromptEncoder::new(&cfg, init, seed, &device)?;
                if cfg.method == PromptMethod::MultitaskPromptTuning && !cfg.inference_mode {
                    init_multitask_from_source(&cfg, &mut enc, &device)?;
                }
                enc
            }
        };
        let copies = self.plan_saved_copies(name, &cfg.modules_to_save().unwrap_or_default(), task)?;
        let first = self.configs.is_empty();
        self.prompt_encoders.insert(name.to_string(), encoder);
        self.install_saved_copies(name, copies);
        self.register(name, cfg.into(), first)
    }

    /// Load a prompt-learning adapter's tensors (`prompt_embeddings`, plus `prefix_task_cols` /
    /// `prefix_task_rows` for multitask prompt tuning) as HF `set_peft_model_state_dict` does.
    /// The stored table is used as is; when loaded trainable, training continues on the table
    /// itself (HF would put a freshly initialised P-tuning/projection head on top of the saved
    /// output, which changes the adapter's outputs; we keep them).
    pub(crate) fn load_prompt(&mut self, name: &str, mut cfg: PromptLearningConfig, tensors: Vec<(String, Tensor)>, wpath: &Path) -> Result<LoadResult> {
        cfg.prepare(&self.model_dims());
        let mut result = LoadResult::default();
        let mut table = None;
        let mut cols = None;
        let mut rows = None;
        let mt = cfg.method == PromptMethod::MultitaskPromptTuning;
        let td = cfg.token_dim.unwrap_or(0);
        let n = cfg.total_virtual_tokens();
        // modules_to_save copies (`base_model.<module>.weight` / `.bias`) and their shapes.
        let mts = cfg.modules_to_save().unwrap_or_default();
        let mut copy_shapes: HashMap<String, Vec<usize>> = HashMap::new();
        for (m, lin) in self.base.named_layers() {
            if mts.iter().any(|w| saves_module(&m, w)) {
                copy_shapes.insert(format!("base_model.{m}.weight"), lin.weight.dims().to_vec());
                if let Some(b) = &lin.bias {
                    copy_shapes.insert(format!("base_model.{m}.bias"), b.dims().to_vec());
                }
            }
        }
        let mut copy_tensors: HashMap<String, Tensor> = HashMap::new();
        for (key, t) in tensors {
            if let Some(shape) = copy_shapes.get(&key) {
                if t.dims() != shape.as_slice() {
                    return Err(PeftError::ShapeMismatch { name: format!("{} (key `{key}`)", wpath.display()), expected: shape.clone(), found: t.dims().to_vec() });
                }
                copy_tensors.insert(key, t);
                continue;
            }
            let k = key.strip_prefix(KEY_PREFIX).unwrap_or(&key);
            let (slot, shape) = match k {
                "prompt_embeddings" => (&mut table, vec![cfg.table_rows(), cfg.table_dim()]),
                "prefix_task_cols" if mt => (&mut cols, vec![cfg.num_tasks, n, cfg.num_ranks]),
                "prefix_task_rows" if mt => (&mut rows, vec![cfg.num_tasks, cfg.num_ranks, td]),
                _ => {
                    result.unexpected_keys.push(key);
                    continue;
                }
            };
            if t.dims() != shape.as_slice() {
                return Err(PeftError::ShapeMismatch { name: format!("{} (key `{key}`)", wpath.display()), expected: shape, found: t.dims().to_vec() });
            }
            *slot = Some(t);
        }
        let table = table.ok_or_else(|| PeftError::SafetensorsInvalid {
            path: wpath.to_path_buf(),
            msg: format!("the {} adapter file has no `prompt_embeddings` tensor", cfg.method.as_str()),
        })?;
        let task = if mt {
            let dev = self.base.device();
            let c = match cols {
                Some(c) => c,
                None => {
                    result.missing_keys.push("prefix_task_cols".into());
                    Tensor::zeros((cfg.num_tasks, n, cfg.num_ranks), DType::F32, dev)?
                }
            };
            let r = match rows {
                Some(r) => r,
                None => {
                    result.missing_keys.push("prefix_task_rows".into());
                    Tensor::zeros((cfg.num_tasks, cfg.num_ranks, td), DType::F32, dev)?
                }
            };
            Some((c, r))
        } else {
            None
        };
        for k in copy_shapes.keys() {
            if !copy_tensors.contains_key(k) {
                result.missing_keys.push(k.clone());
            }
        }
        result.missing_keys.sort();
        let mut enc = PromptEncoder::from_table(&table, task)?;
        if let Some(c) = &cfg.cpt {
            // HF: the saved table goes into `embedding`; the delta starts at zero.
            enc.head = super::PromptHead::Cpt(super::CptHead::new(c, td, self.base.device())?);
        }
        self.add_prompt(name, cfg, 0, Some(enc))?;
        for (m, lin) in self.base.named_layers_mut() {
            let dtype = lin.weight.dtype();
            if let Some((w, b)) = lin.saved_copies.get_mut(name) {
                if let Some(t) = copy_tensors.remove(&format!("base_model.{m}.weight")) {
                    *w = Var::from_tensor(&t.to_dtype(dtype)?)?;
                }
                if let (Some(bv), Some(t)) = (b.as_mut(), copy_tensors.remove(&format!("base_model.{m}.bias"))) {
                    *bv = Var::from_tensor(&t.to_dtype(dtype)?)?;
                }
            }
        }
        Ok(result)
    }
}

/// Multitask prompt tuning's source-task inits (HF `MultitaskPromptEmbedding`):
/// `AVERAGE_SOURCE_TASKS` (mean over the source tasks), `EXACT_SOURCE_TASK` (task
/// `prompt_tuning_init_task`), both loading `prompt_embeddings` and the task matrices, and
/// `ONLY_SOURCE_SHARED` (only `prompt_embeddings`), from a safetensors file.
///
/// Errors: `NotFound`/`SafetensorsInvalid` for the file, `ShapeMismatch` naming the key when
/// the source does not fit (e.g. `num_tasks` must be 1 for the averaged/exact inits, as HF's
/// strict load requires), `InvalidArgument` for a task index out of range.
fn init_multitask_from_source(cfg: &PromptLearningConfig, enc: &mut PromptEncoder, device: &candle_core::Device) -> Result<()> {
    let mode = cfg.prompt_tuning_init.as_str();
    if !["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"].contains(&mode) {
        return Ok(());
    }
    let path = PathBuf::from(cfg.prompt_tuning_init_state_dict_path.clone().unwrap_or_default());
    let src: HashMap<String, Tensor> = read_safetensors(&path, device)?.into_iter().collect();
    let get = |k: &str| -> Result<Tensor> {
        src.get(k)
            .map(|t| t.to_dtype(DType::F32))
            .transpose()?
            .ok_or_else(|| PeftError::SafetensorsInvalid { path: path.clone(), msg: format!("the source checkpoint has no `{k}` tensor") })
    };
    let fit = |k: &str, t: Tensor, want: &[usize]| -> Result<Var> {
        if t.dims() != want {
            return Err(PeftError::ShapeMismatch { name: format!("{} (key `{k}`)", path.display()), expected: want.to_vec(), found: t.dims().to_vec() });
        }
        Ok(Var::from_tensor(&t)?)
    };
    let emb = get("prompt_embeddings")?;
    enc.embedding = fit("prompt_embeddings", emb, enc.embedding.dims())?;
    if mode == "ONLY_SOURCE_SHARED" {
        return Ok(());
    }
    let (cols, rows) = (get("prefix_task_cols")?, get("prefix_task_rows")?);
    let (cols, rows) = if mode == "AVERAGE_SOURCE_TASKS" {
        (cols.mean_keepdim(0)?, rows.mean_keepdim(0)?)
    } else {
        let t = cfg.prompt_tuning_init_task;
        let nt = cols.dim(0)?;
        if t >= nt {
            return Err(PeftError::invalid_arg("promptTuningInitTask", format!("task {t} is out of range: the source has {nt} tasks")));
        }
        (cols.narrow(0, t, 1)?, rows.narrow(0, t, 1)?)
    };
    let (c0, r0) = enc.task.as_ref().map(|(c, r)| (c.dims().to_vec(), r.dims().to_vec())).unwrap_or_default();
    enc.task = Some((fit("prefix_task_cols", cols, &c0)?, fit("prefix_task_rows", rows, &r0)?));
    Ok(())
}
