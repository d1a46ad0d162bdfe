//! Base models. Every linear layer is a [`crate::tuners::linear::PeftLinear`], addressed by its
//! transformers module path, so tuners attach by name without changing the model's code.
//!
//! [`BaseModel`] is what [`crate::peft_model::PeftModel`] needs from a base model; it is
//! implemented by [`LlamaForCausalLM`] (Llama, Llama 3.x, Qwen2, Qwen3, Mistral),
//! [`Gemma3ForCausalLM`] (Gemma 3 text), [`Phi3ForCausalLM`] (Phi-3 / Phi-3.5 / Phi-4-mini),
//! [`Gpt2LMHeadModel`],
//! [`BertModel`] (BERT, DistilBERT, RoBERTa encoders with their task heads) and
//! [`T5ForConditionalGeneration`] (encoder-decoder).

pub mod bert;
pub mod config;
pub mod checkpoint;
pub(crate) mod decoder;
pub mod forward;
pub mod gemma3;
pub mod gguf;
pub mod gpt2;
pub mod llama;
pub mod loader;
pub mod phi3;
pub mod t5;

pub use bert::{mean_pool, BertConfig, BertModel};
pub use config::LlamaConfig;
pub use gemma3::{Gemma3Config, Gemma3ForCausalLM};
pub use gpt2::{Gpt2Config, Gpt2LMHeadModel};
pub use forward::{ForwardOptions, KvCache};
pub use llama::LlamaForCausalLM;
pub use phi3::{Phi3Config, Phi3ForCausalLM};
pub use t5::{T5Config, T5ForConditionalGeneration};

use crate::error::{PeftError, Result};
use crate::tuners::linear::PeftLinear;
use candle_core::{DType, Device, Tensor};

/// The architecture facts of a base model that PEFT code reads (HF's `model.config` fields
/// under their Llama names; GPT-2's `n_embd` is `hidden_size`, `n_head` is
/// `num_attention_heads`, `n_layer` is `num_hidden_layers`, `n_positions` is
/// `max_position_embeddings`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The `architectures` entry of config.json, e.g. `"LlamaForCausalLM"`, `"GPT2LMHeadModel"`.
    pub architecture: String,
    /// `model_type` of config.json (`"llama"`, `"qwen2"`, `"gpt2"`, ...).
    pub model_type: String,
    /// `_name_or_path` (or the folder the model was loaded from); written as
    /// `base_model_name_or_path` when adapters are saved.
    pub name_or_path: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `Some` only when the config has `num_key_value_heads` (Llama family); HF's prefix tuning
    /// then sizes its per-layer prefix by the KV heads. `None` for GPT-2.
    pub num_key_value_heads: Option<usize>,
    /// Size of one attention head.
    pub head_dim: usize,
    /// Longest sequence (cache included) the model accepts.
    pub max_position_embeddings: usize,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
    /// Encoder-decoder models: the first decoder token (`decoder_start_token_id`); `None` for
    /// decoder-only and encoder-only models.
    pub decoder_start_token_id: Option<u32>,
    /// The head this model was built with (HF's `AutoModelFor*` class).
    pub task: Task,
    /// Output classes of a classification head (`len(id2label)` / `num_labels` of config.json);
    /// `None` for heads without labels (causal LM, QA, feature extraction, seq2seq).
    pub num_labels: Option<usize>,
}

/// A model head, named as HF PEFT's `task_type` names it (`PeftModelFor*` / `AutoModelFor*`).
///
/// What [`BaseModel::forward_embeds`] returns for each:
/// - `CausalLm`, `Seq2SeqLm`: logits `[b, s, vocab]` (decoder positions for seq2seq);
/// - `SeqCls`: pooled logits `[b, num_labels]` (pooling per architecture: BERT's pooler on token
///   0; Llama/GPT-2 take the last non-pad token, see [`ForwardOptions::pool_index`]);
/// - `TokenCls`: `[b, s, num_labels]`;
/// - `QuestionAns`: `[b, s, 2]` (start logits `[..., 0]`, end logits `[..., 1]`, as HF splits
///   `qa_outputs`);
/// - `FeatureExtraction`: the last hidden state `[b, s, hidden]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    CausalLm,
    SeqCls,
    TokenCls,
    QuestionAns,
    FeatureExtraction,
    Seq2SeqLm,
}

impl Task {
    /// Every task, in HF's order.
    pub const ALL: [Task; 6] = [Task::SeqCls, Task::Seq2SeqLm, Task::CausalLm, Task::TokenCls, Task::QuestionAns, Task::FeatureExtraction];

    /// HF PEFT's `task_type` string (`"CAUSAL_LM"`, `"SEQ_CLS"`, `"TOKEN_CLS"`, `"QUESTION_ANS"`,
    /// `"FEATURE_EXTRACTION"`, `"SEQ_2_SEQ_LM"`).
    pub fn task_type(self) -> &'static str {
        match self {
            Task::CausalLm => "CAUSAL_LM",
            Task::SeqCls => "SEQ_CLS",
            Task::TokenCls => "TOKEN_CLS",
            Task::QuestionAns => "QUESTION_ANS",
            Task::FeatureExtraction => "FEATURE_EXTRACTION",
            Task::Seq2SeqLm => "SEQ_2_SEQ_LM",
        }
    }

    /// The transformers (and peft-node) loader for this head: `AutoModelForCausalLM`, ...
    pub fn auto_class(self) -> &'static str {
        match self {
            Task::CausalLm => "AutoModelForCausalLM",
            Task::SeqCls => "AutoModelForSequenceClassification",
            Task::TokenCls => "AutoModelForTokenClassification",
            Task::QuestionAns => "AutoModelForQuestionAnswering",
            Task::FeatureExtraction => "AutoModel",
            Task::Seq2SeqLm => "AutoModelForSeq2SeqLM",
        }
    }

    /// Parse a `task_type` string; `None` for an unknown one.
    pub fn from_task_type(s: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.task_type() == s)
    }

    /// The modules HF's `PeftModelFor*` adds to `modules_to_save` for this task
    /// (`classifier_module_names` / `qa_module_names`); names that match nothing are ignored.
    pub fn head_modules(self) -> &'static [&'static str] {
        match self {
            Task::SeqCls | Task::TokenCls => &["classifier", "score"],
            Task::QuestionAns => &["qa_outputs"],
            _ => &[],
        }
    }
}

/// `LlamaForSequenceClassification` / `GPT2ForSequenceClassification` pooling: per row, the
/// index of the rightmost token that is not `pad_token_id` (0 when the row is all padding), as
/// transformers computes `last_non_pad_token` from `input_ids`. Without a pad token, `s - 1` for
/// a batch of one.
///
/// Errors: `InvalidArgument` ("Cannot handle batch sizes > 1 if no padding token is defined", as
/// transformers) when `pad` is `None` and `b > 1`.
pub fn last_non_pad_indices(ids: &[u32], b: usize, s: usize, pad: Option<u32>) -> Result<Vec<usize>> {
    match pad {
        None if b > 1 => Err(PeftError::invalid_arg(
            "inputIds",
            "Cannot handle batch sizes > 1 if no padding token is defined (config.json has no `pad_token_id`)",
        )),
        None => Ok(vec![s.saturating_sub(1); b]),
        Some(p) => Ok((0..b).map(|r| (0..s).rev().find(|&i| ids[r * s + i] != p).unwrap_or(0)).collect()),
    }
}

/// Gather one position per row: `h` `[b, s, d]`, `idx[r] < s` → `[b, 1, d]` (differentiable).
pub(crate) fn gather_rows(h: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let (b, s, _) = h.dims3()?;
    if idx.len() != b || idx.iter().any(|&i| i >= s) {
        return Err(PeftError::invalid_arg("poolIndex", format!("needs {b} positions below {s}")));
    }
    let rows: Vec<Tensor> = idx.iter().enumerate().map(|(r, &i)| h.narrow(0, r, 1)?.narrow(1, i, 1)).collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

/// Take a checkpoint tensor out of `t` (under the first of `keys` present, e.g. with and without
/// a `transformer.` / `bert.` prefix), check its shape and convert it to `dtype` on `device`,
/// contiguous. Shared by the models' `from_tensors`.
///
/// Errors: `InvalidModelConfig` naming `shown` when no key is present (`path` is the model
/// folder), `ShapeMismatch` naming `shown` for another shape.
pub(crate) fn take_weight(t: &mut std::collections::HashMap<String, Tensor>, keys: &[&str], shown: &str, shape: &[usize], dtype: DType, device: &Device, path: &std::path::Path) -> Result<Tensor> {
    let x = keys
        .iter()
        .find_map(|k| t.remove(*k))
        .ok_or_else(|| PeftError::InvalidModelConfig { path: path.to_path_buf(), msg: format!("the weights have no tensor `{shown}`") })?;
    if x.dims() != shape {
        return Err(PeftError::ShapeMismatch { name: shown.into(), expected: shape.to_vec(), found: x.dims().to_vec() });
    }
    let x = x.to_dtype(dtype)?.to_device(device)?;
    // A zero-stride placeholder (a weight kept quantized, see `PeftLinear::quant`) holds no
    // data: keep it as it is instead of materialising zeros.
    if x.elem_count() > 1 && x.stride().iter().all(|&s| s == 0) {
        return Ok(x);
    }
    Ok(x.contiguous()?)
}

/// Freshly initialised head weight `[out, in]` as transformers' `_init_weights` does for a
/// linear layer: `normal(0, std)` (std = `initializer_range`, 0.02 by default), drawn from a
/// seeded `StdRng`, f32.
///
/// Errors: `InvalidArgument` for a negative or non-finite `std`.
pub fn init_normal(out: usize, inp: usize, std: f64, seed: u64, device: &Device) -> Result<Tensor> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let dist = rand_distr::Normal::new(0.0f32, std as f32).map_err(|e| PeftError::invalid_arg("initializer_range", e.to_string()))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..out * inp).map(|_| dist.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(v, (out, inp), device)?)
}

/// Declares a model's layers with their transformers module paths once, and expands that one
/// body into both [`BaseModel::named_linears`] and [`BaseModel::named_linears_mut`] (and the
/// `named_layers` and `named_norm_biases` pairs): the body destructures `$this` (`&Self` in one, `&mut Self` in the
/// other; match ergonomics give `&` or `&mut` bindings), so the two lists cannot drift apart.
macro_rules! named_twins {
    (@twins $name:ident, $name_mut:ident, $item:ty, |$this:ident| $body:block) => {
        fn $name(&self) -> Vec<(String, &$item)> {
            let $this = self;
            $body
        }
        fn $name_mut(&mut self) -> Vec<(String, &mut $item)> {
            let $this = self;
            $body
        }
    };
    (linears: |$this:ident| $body:block) => {
        $crate::model::named_twins!(@twins named_linears, named_linears_mut, $crate::tuners::linear::PeftLinear, |$this| $body);
    };
    (layers: |$this:ident| $body:block) => {
        $crate::model::named_twins!(@twins named_layers, named_layers_mut, $crate::tuners::linear::PeftLinear, |$this| $body);
    };
    (norm_biases: |$this:ident| $body:block) => {
        $crate::model::named_twins!(@twins named_norm_biases, named_norm_biases_mut, candle_core::Tensor, |$this| $body);
    };
}
pub(crate) use named_twins;

/// A base model that adapters attach to (object safe; `PeftModel` holds a
/// `Box<dyn BaseModel>`): a decoder-only LM or classifier, or an encoder-decoder (T5, whose
/// `embed` / `forward_embeds` input is the encoder's and whose logits are the decoder's; see
/// [`ForwardOptions::decoder_input_ids`]).
///
/// Tensors: token ids are `u32`, row-major `[b, s]`; embeddings `[b, s, hidden]` and logits
/// `[b, s, vocab]` are in [`BaseModel::dtype`]. Key/value caches are [`KvCache`]s with one
/// `[b, kv_heads, t, head_dim]` pair per layer.
pub trait BaseModel: Send + Sync {
    /// Architecture facts (see [`ModelInfo`]).
    fn info(&self) -> &ModelInfo;
    /// The model as a Llama-family decoder, for the fused engine (`None` for other families).
    fn as_llama(&self) -> Option<&llama::LlamaForCausalLM> {
        None
    }
    /// The model as a Phi-3 decoder, for the fused engine (`None` for other families).
    fn as_phi3(&self) -> Option<&phi3::Phi3ForCausalLM> {
        None
    }
    /// The model as a Gemma 3 text decoder, for the fused engine (`None` for other families).
    fn as_gemma3(&self) -> Option<&gemma3::Gemma3ForCausalLM> {
        None
    }
    /// Gradient checkpointing on the general path: the model's layers for one training forward
    /// of the input embeddings `x` `[b, s, hidden]` (no cache; `opts` as
    /// [`BaseModel::ids_options`] gives them), run one at a time by [`checkpoint`]'s driver; an
    /// encoder-decoder returns its decoder's stack holding the encoder's
    /// ([`checkpoint::LayerStack::encoder`]). `None` for a model without it (the step is then
    /// refused); every model here has one.
    ///
    /// Errors (inside the `Some`): those of [`BaseModel::forward_embeds`] for `x` and `opts`.
    fn layer_stack<'a>(&'a self, x: &Tensor, opts: &'a ForwardOptions) -> Option<Result<Box<dyn checkpoint::LayerStack + 'a>>> {
        let _ = (x, opts);
        None
    }
    /// The model's config as transformers names it (the config.json fields this crate reads).
    fn config_json(&self) -> serde_json::Value;
    /// The device the weights live on.
    fn device(&self) -> &Device;
    /// The dtype the weights are stored and run in (F32, F16 or BF16).
    fn dtype(&self) -> DType;
    /// Every linear layer (nn.Linear or GPT-2 Conv1D) with its transformers module path, in
    /// module order; the output head comes last as `lm_head`.
    fn named_linears(&self) -> Vec<(String, &PeftLinear)>;
    /// Mutable twin of [`BaseModel::named_linears`] (same names, same order).
    fn named_linears_mut(&mut self) -> Vec<(String, &mut PeftLinear)>;
    /// Every module adapters can sit on, with its transformers module path, in module order:
    /// [`BaseModel::named_linears`] plus embedding tables that model lists apart (T5's
    /// `shared`, `encoder.embed_tokens`, `decoder.embed_tokens`, which its `named_linears`
    /// leaves out). What targeting, injection, merging, saving and loading walk. Default:
    /// `named_linears`.
    fn named_layers(&self) -> Vec<(String, &PeftLinear)> {
        self.named_linears()
    }
    /// Mutable twin of [`BaseModel::named_layers`] (same names, same order).
    fn named_layers_mut(&mut self) -> Vec<(String, &mut PeftLinear)> {
        self.named_linears_mut()
    }
    /// Biases of modules that are not linear layers (GPT-2's LayerNorm `ln_1`, `ln_2`, `ln_f`),
    /// as `(module path, bias [hidden])`; empty for Llama (RMSNorm has no bias). Used by LoRA's
    /// `bias: "all"`.
    fn named_norm_biases_mut(&mut self) -> Vec<(String, &mut Tensor)>;
    /// Read-only twin of [`BaseModel::named_norm_biases_mut`].
    fn named_norm_biases(&self) -> Vec<(String, &Tensor)>;
    /// The attention modules that can host adaption prompts (HF `AdaptedAttention` wraps
    /// them), with their module paths (`model.layers.<i>.self_attn`) in layer order; empty for
    /// models whose attention does not take them (the default).
    fn named_attention_prompts(&self) -> Vec<(String, &crate::tuners::adaption_prompt::AttentionPrompts)> {
        vec![]
    }
    /// Mutable twin of [`BaseModel::named_attention_prompts`] (same names, same order).
    fn named_attention_prompts_mut(&mut self) -> Vec<(String, &mut crate::tuners::adaption_prompt::AttentionPrompts)> {
        vec![]
    }
    /// The modules whose weight is the input embedding's table (HF
    /// `_get_module_names_tied_with_embedding`: the targets of transformers'
    /// `_tied_weights_keys` whose source is the input embedding, empty when config.json says
    /// `tie_word_embeddings: false`), sorted. Trainable tokens put a layer tied to the input
    /// embedding's on each. Default: `lm_head` of a causal or seq2seq LM under
    /// `tie_word_embeddings`; T5 adds the stacks' `embed_tokens`.
    fn tied_to_input_embedding(&self) -> Vec<String> {
        let tied = self.config_json()["tie_word_embeddings"].as_bool() == Some(true) && matches!(self.task(), Task::CausalLm | Task::Seq2SeqLm);
        if !tied {
            return vec![];
        }
        self.named_layers().into_iter().map(|(m, _)| m).filter(|m| m == "lm_head").collect()
    }
    /// Every module path (for error messages and targeting).
    fn module_names(&self) -> Vec<String>;
    /// Number of base-model parameters, tied weights counted once (as torch's `named_parameters`).
    fn base_param_count(&self) -> usize;
    /// The input word-embedding table `[vocab, hidden]` (`model.embed_tokens`, `transformer.wte`).
    fn word_embeddings(&self) -> &Tensor;
    /// Token embeddings only (no position embeddings): `ids` `[b, s]` → `[b, s, hidden]`.
    ///
    /// Errors: `InvalidArgument` for an id outside the vocabulary.
    fn embed(&self, ids: &[u32], b: usize, s: usize) -> Result<Tensor>;
    /// [`BaseModel::embed`] with the forward options: LoRA adapters on the embedding layer
    /// (HF `lora.Embedding`) add their delta here, per row in a mixed batch. Default: `embed`.
    ///
    /// Errors: as [`BaseModel::embed`].
    fn embed_with(&self, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions) -> Result<Tensor> {
        let _ = opts;
        self.embed(ids, b, s)
    }
    /// Forward from input embeddings `[b, s, hidden]` (as [`BaseModel::embed`] returns them;
    /// prompt learning prepends virtual tokens) → logits `[b, s, vocab]` (`[b, 1, vocab]` with
    /// `last_only`). `cache`, when given, supplies past keys/values and receives the new ones.
    ///
    /// Errors: `InvalidArgument` for a mask or position ids of the wrong length, or a sequence
    /// longer than `max_position_embeddings`.
    fn forward_embeds(&self, x: &Tensor, opts: &ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor>;
    /// Forward from token ids `[b, s]` → logits; see [`BaseModel::forward_embeds`].
    fn forward(&self, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        if ids.len() != b * s {
            return Err(PeftError::invalid_arg("inputIds", format!("has {} ids, expected batch {b} × seq {s}", ids.len())));
        }
        let x = self.embed_with(ids, b, s, opts)?;
        match self.ids_options(ids, b, s, opts, cache.as_deref())? {
            Some(o) => self.forward_embeds(&x, &o, cache),
            None => self.forward_embeds(&x, opts, cache),
        }
    }
    /// The options [`BaseModel::forward`] hands to [`BaseModel::forward_embeds`] for the token
    /// ids `ids` `[b, s]` after the positions in `cache`: decoder models' sequence
    /// classification pools each row's last non-pad token (`pool_index`, unless given);
    /// RoBERTa counts its positions from the ids. `None`: `opts` as they are. Gradient
    /// checkpointing's driver starts from the same options.
    ///
    /// Errors: `InvalidArgument` when the ids do not fit `b × s`.
    fn ids_options(&self, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions, cache: Option<&KvCache>) -> Result<Option<ForwardOptions>> {
        let _ = cache;
        if self.task() == Task::SeqCls && opts.pool_index.is_none() && self.pools_last_token() {
            let mut o = opts.clone();
            o.pool_index = Some(last_non_pad_indices(ids, b, s, self.info().pad_token_id)?);
            return Ok(Some(o));
        }
        Ok(None)
    }
    /// Whether sequence classification pools the last non-pad token (decoder models: Llama,
    /// GPT-2) rather than a fixed token (BERT's `[CLS]`).
    fn pools_last_token(&self) -> bool {
        false
    }
    /// The head (see [`Task`]); `info().task`.
    fn task(&self) -> Task {
        self.info().task
    }
    /// Number of decoder layers (the length of a [`KvCache`]).
    fn num_layers(&self) -> usize {
        self.info().num_hidden_layers
    }
    /// An empty cache for this model.
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.num_layers())
    }
}

/// Additive attention mask `[b, 1, s, past + s]` (f32; 0 where a query may attend, `f32::MIN`
/// elsewhere) for causal attention over `past` cached and `s` new positions, with an optional
/// 1/0 padding mask `[b, past + s]`. `None` when nothing is masked (one new token, no padding).
///
/// Errors: `InvalidArgument` when the padding mask has the wrong length.
pub(crate) fn causal_mask(mask: Option<&Vec<u8>>, b: usize, s: usize, past: usize, device: &Device) -> Result<Option<Tensor>> {
    windowed_causal_mask(mask, b, s, past, None, device)
}

/// [`causal_mask`] restricted to a sliding window (Gemma 3's `sliding_attention` layers, as
/// transformers' `sliding_window_overlay`): query position `q` attends key position `k` when
/// `q - window < k <= q`. `window: None` is the plain causal mask.
///
/// Errors: as [`causal_mask`].
pub(crate) fn windowed_causal_mask(mask: Option<&Vec<u8>>, b: usize, s: usize, past: usize, window: Option<usize>, device: &Device) -> Result<Option<Tensor>> {
    let total = past + s;
    if let Some(m) = mask {
        if m.len() != b * total {
            return Err(PeftError::invalid_arg("attentionMask", format!("has {} values, expected {b} × {total}", m.len())));
        }
    }
    let all_ones = mask.map(|m| m.iter().all(|&v| v != 0)).unwrap_or(true);
    if s == 1 && all_ones && window.map(|w| total <= w).unwrap_or(true) {
        return Ok(None);
    }
    let mut v = vec![0f32; b * s * total];
    for bi in 0..b {
        for i in 0..s {
            for j in 0..total {
                let in_window = window.map(|w| j + w > past + i).unwrap_or(true);
                let ok = j <= past + i && in_window && mask.map(|m| m[bi * total + j] != 0).unwrap_or(true);
                if !ok {
                    v[(bi * s + i) * total + j] = f32::MIN;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(v, (b, 1, s, total), device)?))
}
