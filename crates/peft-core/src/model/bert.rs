//! BERT encoders (`BertModel`, `BertForSequenceClassification`, `BertForTokenClassification`,
//! `BertForQuestionAnswering`) with transformers' module names (Devlin et al. 2018,
//! <https://arxiv.org/abs/1810.04805>; transformers' `modeling_bert.py`, eager attention).
//!
//! Embeddings: `h₀ = LayerNorm(x + token_type_embeddings(tt) + position_embeddings(pos))`,
//! where `x` is the word embedding of the ids (or prompt-tuning input embeddings), `tt` the
//! segment ids (0 by default) and `pos = past .. past + s` (`past` = prefix-tuning length, as
//! transformers offsets positions by `past_key_values_length`). Per layer:
//! `a = LayerNorm(h + attention.output.dense(attn(query(h), key(h), value(h))))`,
//! `h' = LayerNorm(a + output.dense(act(intermediate.dense(a))))`, with bidirectional scaled
//! dot-product attention (`1/√head_dim`) and an additive padding mask (no causal mask).
//! Heads:
//! - sequence classification: `classifier(tanh(pooler.dense(h_L[:, 0])))` → `[b, num_labels]`;
//! - token classification: `classifier(h_L)` → `[b, s, num_labels]` (no pooler, as HF builds
//!   `BertModel(config, add_pooling_layer=False)`);
//! - question answering: `qa_outputs(h_L)` → `[b, s, 2]` (start `[..., 0]`, end `[..., 1]`;
//!   no pooler);
//! - feature extraction (`BertModel`): the last hidden state `[b, s, hidden]`; module paths
//!   have no `bert.` prefix, as in transformers' `BertModel`.
//!
//! DistilBERT (`DistilBertModel`, `DistilBertFor{SequenceClassification,TokenClassification,
//! QuestionAnswering}`, Sanh et al. 2019, <https://arxiv.org/abs/1910.01108>) is the same
//! post-LayerNorm encoder under other names (`distilbert.transformer.layer.{i}.attention.q_lin`,
//! `k_lin`, `v_lin`, `out_lin`, `sa_layer_norm`, `ffn.lin1`, `ffn.lin2`, `output_layer_norm`;
//! LayerNorm eps 1e-12) without token type embeddings; its sequence classifier is
//! `classifier(relu(pre_classifier(h_L[:, 0])))`. It has no `past_key_values`, so prefix tuning
//! is refused on it (as in HF).
//!
//! RoBERTa (`RobertaModel`, `RobertaFor{SequenceClassification,TokenClassification,
//! QuestionAnswering}`): BERT's layers under `roberta.`; positions from the ids (padding keeps
//! `padding_idx`, real tokens count from `padding_idx + 1`); sequence classification is
//! `classifier.out_proj(tanh(classifier.dense(h_L[:, 0])))` (no pooler).
//!
//! Dropout of the base model (`hidden_dropout_prob`, `attention_probs_dropout_prob`) is not
//! applied, also while training (as for the other base models here); LoRA's own dropout is.
//! Prefix tuning: a [`KvCache`] holding per-layer prefix keys/values `[b, heads, n, head_dim]`
//! is prepended to every layer's keys/values (HF passes them as `past_key_values` to the
//! encoder); the cache is read, never extended (an encoder has nothing to decode).

use super::config::{get_f64, get_usize};
use super::forward::{ForwardOptions, KvCache};
use super::{BaseModel, ModelInfo, Task};
use crate::error::{PeftError, Result};
use crate::ops::{layer_norm, softmax_last};
use crate::tuners::linear::{LinearCtx, PeftLinear};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The `architectures` values read by [`BertModel`] (`BertForMaskedLM` / `BertForPreTraining`
/// checkpoints are read as the encoder; their `cls.*` tensors are ignored).
pub const BERT_ARCHITECTURES: &[&str] = &[
    "BertModel",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
    "BertForMaskedLM",
    "BertForPreTraining",
    "DistilBertModel",
    "DistilBertForSequenceClassification",
    "DistilBertForTokenClassification",
    "DistilBertForQuestionAnswering",
    "DistilBertForMaskedLM",
    "RobertaModel",
    "RobertaForSequenceClassification",
    "RobertaForTokenClassification",
    "RobertaForQuestionAnswering",
    "RobertaForMaskedLM",
];

/// Which encoder family a [`BertConfig`] describes (`model_type` `bert` or `distilbert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BertFamily {
    Bert,
    DistilBert,
    /// RoBERTa (Liu et al. 2019): BERT's layers under `roberta.`, positions counted from
    /// `padding_idx + 1` (padding keeps `padding_idx`), a `RobertaClassificationHead`
    /// (`classifier.dense` + tanh + `classifier.out_proj` on token 0) instead of pooler +
    /// classifier.
    Roberta,
}

/// transformers' module names of one family.
struct Names {
    /// Attribute of the encoder in the `*For*` classes (`bert`, `distilbert`).
    base: &'static str,
    layers: &'static str,
    query: &'static str,
    key: &'static str,
    value: &'static str,
    attn_out: &'static str,
    attn_norm: &'static str,
    intermediate: &'static str,
    output: &'static str,
    out_norm: &'static str,
    /// Extra submodules of a layer, for `module_names`.
    others: &'static [&'static str],
}

const BERT_NAMES: Names = Names {
    base: "bert",
    layers: "encoder.layer",
    query: "attention.self.query",
    key: "attention.self.key",
    value: "attention.self.value",
    attn_out: "attention.output.dense",
    attn_norm: "attention.output.LayerNorm",
    intermediate: "intermediate.dense",
    output: "output.dense",
    out_norm: "output.LayerNorm",
    others: &["attention", "attention.self", "attention.self.dropout", "attention.output", "attention.output.dropout", "intermediate", "intermediate.intermediate_act_fn", "output", "output.dropout"],
};

const ROBERTA_NAMES: Names = Names { base: "roberta", ..BERT_NAMES };

const DISTILBERT_NAMES: Names = Names {
    base: "distilbert",
    layers: "transformer.layer",
    query: "attention.q_lin",
    key: "attention.k_lin",
    value: "attention.v_lin",
    attn_out: "attention.out_lin",
    attn_norm: "sa_layer_norm",
    intermediate: "ffn.lin1",
    output: "ffn.lin2",
    out_norm: "output_layer_norm",
    others: &["attention", "attention.dropout", "ffn", "ffn.dropout", "ffn.activation"],
};

impl BertFamily {
    fn names(self) -> &'static Names {
        match self {
            BertFamily::Bert => &BERT_NAMES,
            BertFamily::DistilBert => &DISTILBERT_NAMES,
            BertFamily::Roberta => &ROBERTA_NAMES,
        }
    }
}

/// The activation named by `hidden_act` (transformers' `ACT2FN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: exact GELU, `x · Φ(x)` (erf form).
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_new",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
        }
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Relu => x.relu()?,
            Activation::Silu => x.silu()?,
        })
    }
}

/// BERT hyper-parameters from a transformers `config.json` (`model_type: "bert"`).
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    /// `bert` or `distilbert` (DistilBERT's `dim`, `n_layers`, `n_heads`, `hidden_dim`,
    /// `activation` are read into the BERT names below).
    pub family: BertFamily,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    /// Size of the position table (512 for the published checkpoints).
    pub max_position_embeddings: usize,
    /// Number of segment types (`token_type_ids` must be below it; 2 by default, 0 for
    /// DistilBERT, which has no token type embeddings).
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    /// Standard deviation of freshly initialised head weights (0.02 by default).
    pub initializer_range: f64,
    pub pad_token_id: Option<u32>,
    /// Labels of the classification head (`id2label` length, else `num_labels`), if the config
    /// names any.
    pub num_labels: Option<usize>,
    /// The dtype named in the config, informational.
    pub dtype: Option<String>,
    /// `_name_or_path`, used as `base_model_name_or_path` when saving adapters.
    pub name_or_path: Option<String>,
}

impl BertConfig {
    /// Parse a transformers BERT `config.json` value. `path` is used in error messages only.
    ///
    /// Errors: `InvalidModelConfig` for a missing or mistyped field, `hidden_size` not divisible
    /// by `num_attention_heads`, an unknown `hidden_act`, or an unsupported option
    /// (`position_embedding_type` other than `absolute`, `is_decoder: true`,
    /// `add_cross_attention: true`).
    /// A `model_type: "distilbert"` config is read as DistilBERT (`dim`, `n_layers`, `n_heads`,
    /// `hidden_dim`, `activation`; `sinusoidal_pos_embds` needs no special case, the table is
    /// in the checkpoint).
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |msg: String| PeftError::InvalidModelConfig { path: path.to_path_buf(), msg };
        if !v.is_object() {
            return Err(bad("the top level must be a JSON object".into()));
        }
        // `model_type`, else the family the `architectures` entry names.
        let arch = v.get("architectures").and_then(|a| a.as_array()).and_then(|a| a.first()).and_then(|x| x.as_str()).unwrap_or("");
        let model_type = v.get("model_type").and_then(|x| x.as_str()).or(if arch.starts_with("DistilBert") {
            Some("distilbert")
        } else if arch.starts_with("Roberta") {
            Some("roberta")
        } else {
            None
        });
        if model_type == Some("distilbert") {
            return Self::from_distilbert_json(v, path);
        }
        let family = if model_type == Some("roberta") { BertFamily::Roberta } else { BertFamily::Bert };
        let req = |k: &str| -> Result<usize> { get_usize(v, k, path)?.ok_or_else(|| bad(format!("missing required field `{k}`"))) };
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        if hidden_size == 0 || num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(bad(format!("`hidden_size` ({hidden_size}) must be a positive multiple of `num_attention_heads` ({num_attention_heads})")));
        }
        let act = v.get("hidden_act").and_then(|x| x.as_str()).unwrap_or("gelu");
        let hidden_act = Activation::parse(act).ok_or_else(|| bad(format!("hidden_act `{act}` is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu, silu)")))?;
        let pet = v.get("position_embedding_type").and_then(|x| x.as_str()).unwrap_or("absolute");
        if pet != "absolute" {
            return Err(bad(format!("position_embedding_type `{pet}` is not supported (only `absolute`)")));
        }
        for k in ["is_decoder", "add_cross_attention"] {
            if v.get(k).and_then(|x| x.as_bool()) == Some(true) {
                return Err(bad(format!("`{k}: true` is not supported (BERT is read as a bidirectional encoder)")));
            }
        }
        let num_labels = v
            .get("id2label")
            .and_then(|m| m.as_object())
            .map(|m| m.len())
            .filter(|&n| n > 0)
            .or(get_usize(v, "num_labels", path)?);
        Ok(BertConfig {
            family,
            vocab_size: req("vocab_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            intermediate_size: req("intermediate_size")?,
            max_position_embeddings: get_usize(v, "max_position_embeddings", path)?.unwrap_or(512),
            type_vocab_size: get_usize(v, "type_vocab_size", path)?.unwrap_or(2),
            layer_norm_eps: get_f64(v, "layer_norm_eps", path)?.unwrap_or(1e-12),
            initializer_range: get_f64(v, "initializer_range", path)?.unwrap_or(0.02),
            pad_token_id: get_usize(v, "pad_token_id", path)?.map(|x| x as u32),
            dtype: v.get("dtype").or(v.get("torch_dtype")).and_then(|x| x.as_str()).map(String::from),
            name_or_path: v.get("_name_or_path").and_then(|x| x.as_str()).map(String::from),
            hidden_size,
            num_attention_heads,
            hidden_act,
            num_labels,
        })
    }

    fn from_distilbert_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |msg: String| PeftError::InvalidModelConfig { path: path.to_path_buf(), msg };
        let req = |k: &str| -> Result<usize> { get_usize(v, k, path)?.ok_or_else(|| bad(format!("missing required field `{k}`"))) };
        let dim = req("dim")?;
        let n_heads = req("n_heads")?;
        if dim == 0 || n_heads == 0 || dim % n_heads != 0 {
            return Err(bad(format!("`dim` ({dim}) must be a positive multiple of `n_heads` ({n_heads})")));
        }
        let act = v.get("activation").and_then(|x| x.as_str()).unwrap_or("gelu");
        let hidden_act = Activation::parse(act).ok_or_else(|| bad(format!("activation `{act}` is not supported (gelu, gelu_new, relu, silu)")))?;
        let num_labels = v.get("id2label").and_then(|m| m.as_object()).map(|m| m.len()).filter(|&n| n > 0).or(get_usize(v, "num_labels", path)?);
        Ok(BertConfig {
            family: BertFamily::DistilBert,
            vocab_size: req("vocab_size")?,
            hidden_size: dim,
            num_hidden_layers: req("n_layers")?,
            num_attention_heads: n_heads,
            intermediate_size: req("hidden_dim")?,
            hidden_act,
            max_position_embeddings: get_usize(v, "max_position_embeddings", path)?.unwrap_or(512),
            type_vocab_size: 0,
            layer_norm_eps: 1e-12,
            initializer_range: get_f64(v, "initializer_range", path)?.unwrap_or(0.02),
            pad_token_id: get_usize(v, "pad_token_id", path)?.map(|x| x as u32),
            num_labels,
            dtype: v.get("dtype").or(v.get("torch_dtype")).and_then(|x| x.as_str()).map(String::from),
            name_or_path: v.get("_name_or_path").and_then(|x| x.as_str()).map(String::from),
        })
    }
}

/// A LayerNorm's parameters (`weight`, `bias`: `[hidden]`).
pub struct Norm {
    pub weight: Tensor,
    /// May be a trainable variable (LoRA `bias: "all"`); detached outside training.
    pub bias: Tensor,
}

/// One encoder layer (`encoder.layer.{i}`).
pub struct BertLayer {
    /// `attention.self.query` / `key` / `value`: `hidden → hidden`, with bias.
    pub query: PeftLinear,
    pub key: PeftLinear,
    pub value: PeftLinear,
    /// `attention.output.dense`: `hidden → hidden`.
    pub attn_out: PeftLinear,
    /// `attention.output.LayerNorm`.
    pub attn_norm: Norm,
    /// `intermediate.dense`: `hidden → intermediate_size`.
    pub intermediate: PeftLinear,
    /// `output.dense`: `intermediate_size → hidden`.
    pub output: PeftLinear,
    /// `output.LayerNorm`.
    pub out_norm: Norm,
}

/// A BERT encoder with the head of [`ModelInfo::task`]. See the module docs.
pub struct BertModel {
    pub config: BertConfig,
    /// `embeddings.word_embeddings` (`weight` `[vocab, hidden]`), an embedding-kind
    /// [`PeftLinear`] so LoRA can target it (HF `lora.Embedding`).
    pub word_embeddings: PeftLinear,
    /// `embeddings.position_embeddings.weight` `[max_position_embeddings, hidden]`.
    pub position_embeddings: Tensor,
    /// `embeddings.token_type_embeddings.weight` `[type_vocab_size, hidden]` (`None` for
    /// DistilBERT).
    pub token_type_embeddings: Option<Tensor>,
    /// `embeddings.LayerNorm`.
    pub embed_norm: Norm,
    pub layers: Vec<BertLayer>,
    /// `pooler.dense` (`hidden → hidden`, tanh): present for `BertModel` and
    /// `BertForSequenceClassification`, absent for the token-classification and QA heads (and
    /// for a feature extractor read from a checkpoint without pooler weights).
    pub pooler: Option<PeftLinear>,
    /// Module path of `pooler`: `bert.pooler.dense` / `pooler.dense`, or DistilBERT's
    /// `pre_classifier` (ReLU instead of tanh).
    pooler_name: String,
    /// Module path of `head`: `classifier`, `qa_outputs`, or RoBERTa's `classifier.out_proj`.
    head_path: String,
    /// `classifier` (`[num_labels, hidden]`) or `qa_outputs` (`[2, hidden]`), with bias.
    pub head: Option<PeftLinear>,
    /// `"bert."` / `"distilbert."` for the `*For*` classes, `""` for the bare model
    /// (transformers' module paths).
    prefix: String,
    pub device: Device,
    pub dtype: DType,
    info: ModelInfo,
}

fn arch_name(family: BertFamily, task: Task) -> String {
    let stem = match family {
        BertFamily::Bert => "Bert",
        BertFamily::DistilBert => "DistilBert",
        BertFamily::Roberta => "Roberta",
    };
    let suffix = match task {
        Task::SeqCls => "ForSequenceClassification",
        Task::TokenCls => "ForTokenClassification",
        Task::QuestionAns => "ForQuestionAnswering",
        _ => "Model",
    };
    format!("{stem}{suffix}")
}

fn head_name(task: Task) -> Option<&'static str> {
    match task {
        Task::SeqCls | Task::TokenCls => Some("classifier"),
        Task::QuestionAns => Some("qa_outputs"),
        _ => None,
    }
}

/// Masked mean over the sequence, as sentence-transformers' `Pooling(pooling_mode_mean_tokens)`
/// computes sentence embeddings: `Σ_t h[b, t] · m[b, t] / max(Σ_t m[b, t], 1e-9)`.
///
/// * `hidden`: `[b, s, h]`, any float dtype (summed in f32, returned in `hidden`'s dtype);
/// * `mask`: `b × s` 1/0 values (row-major; non-zero = a real token).
///
/// Returns `[b, h]`; differentiable with respect to `hidden`. A row without any real token
/// gives zeros (the 1e-9 floor, as sentence-transformers).
///
/// Errors: `InvalidArgument` (`attentionMask`) when `mask` does not have `b × s` values;
/// `InvalidArgument` (`hidden`) when `hidden` is not 3-D.
pub fn mean_pool(hidden: &Tensor, mask: &[u8]) -> Result<Tensor> {
    let (b, s, _) = hidden.dims3().map_err(|_| PeftError::invalid_arg("hidden", format!("must be [batch, seq, hidden], found {:?}", hidden.dims())))?;
    if mask.len() != b * s {
        return Err(PeftError::invalid_arg("attentionMask", format!("has {} values, expected {b} × {s}", mask.len())));
    }
    let m: Vec<f32> = mask.iter().map(|&x| if x != 0 { 1.0 } else { 0.0 }).collect();
    let counts: Vec<f32> = (0..b).map(|r| m[r * s..(r + 1) * s].iter().sum::<f32>().max(1e-9)).collect();
    let m = Tensor::from_vec(m, (b, s, 1), hidden.device())?;
    let counts = Tensor::from_vec(counts, (b, 1), hidden.device())?;
    let summed = hidden.to_dtype(DType::F32)?.broadcast_mul(&m)?.sum(1)?;
    Ok(summed.broadcast_div(&counts)?.to_dtype(hidden.dtype())?)
}

impl BertModel {
    /// Build from HF-named tensors, converted to `dtype`, with the head of `task`:
    /// `FeatureExtraction` (`BertModel`), `SeqCls`, `TokenCls` (both need `classifier.weight`
    /// `[num_labels, hidden]` and `classifier.bias` in `t`) or `QuestionAns` (`qa_outputs.*`,
    /// `[2, hidden]`). Encoder tensors may carry the `bert.` prefix or not (sentence-transformers
    /// checkpoints have none); `cls.*` (masked-LM / NSP heads) and `embeddings.position_ids`
    /// are ignored. The pooler is required for sequence classification; a feature extractor
    /// keeps it when the checkpoint has it.
    ///
    /// Errors: `InvalidModelConfig` naming a missing tensor, a task without a BERT head
    /// (`CAUSAL_LM`, `SEQ_2_SEQ_LM`) or a missing `num_labels`; `ShapeMismatch` naming a
    /// misshapen tensor.
    pub fn from_tensors_for(config: BertConfig, mut t: HashMap<String, Tensor>, dtype: DType, device: &Device, task: Task, num_labels: Option<usize>) -> Result<Self> {
        let path = PathBuf::from(config.name_or_path.clone().unwrap_or_else(|| "<model>".into()));
        let head_out = match task {
            Task::SeqCls | Task::TokenCls => Some(num_labels.ok_or_else(|| PeftError::InvalidModelConfig {
                path: path.clone(),
                msg: format!("{} needs `num_labels`", task.task_type()),
            })?),
            Task::QuestionAns => Some(2),
            Task::FeatureExtraction => None,
            other => {
                return Err(PeftError::InvalidModelConfig {
                    path,
                    msg: format!("{} models have no {} head (supported: SEQ_CLS, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION)", config.family.names().base, other.task_type()),
                })
            }
        };
        let nm = config.family.names();
        let base = nm.base;
        let prefix = if task == Task::FeatureExtraction { String::new() } else { format!("{base}.") };
        let c = &config;
        let distil = c.family == BertFamily::DistilBert;
        let roberta = c.family == BertFamily::Roberta;
        let has_pooler = !distil && (t.contains_key("pooler.dense.weight") || t.contains_key(&format!("{base}.pooler.dense.weight")));
        let conv = |x: Tensor| -> Result<Tensor> { Ok(x.to_dtype(dtype)?.to_device(device)?.contiguous()?) };
        let mut take = |name: &str, shape: &[usize]| super::take_weight(&mut t, &[&format!("{base}.{name}"), name], &format!("{prefix}{name}"), shape, dtype, device, &path);
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let word_embeddings = PeftLinear::embedding(take("embeddings.word_embeddings.weight", &[c.vocab_size, h])?);
        let position_embeddings = take("embeddings.position_embeddings.weight", &[c.max_position_embeddings, h])?;
        let token_type_embeddings = if distil { None } else { Some(take("embeddings.token_type_embeddings.weight", &[c.type_vocab_size, h])?) };
        let embed_norm = Norm { weight: take("embeddings.LayerNorm.weight", &[h])?, bias: take("embeddings.LayerNorm.bias", &[h])? };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("{}.{i}", nm.layers);
            let mut lin = |name: &str, out: usize, inp: usize| -> Result<PeftLinear> {
                let w = take(&format!("{p}.{name}.weight"), &[out, inp])?;
                let b = take(&format!("{p}.{name}.bias"), &[out])?;
                Ok(PeftLinear::new(w, Some(b), false))
            };
            let query = lin(nm.query, h, h)?;
            let key = lin(nm.key, h, h)?;
            let value = lin(nm.value, h, h)?;
            let attn_out = lin(nm.attn_out, h, h)?;
            let intermediate = lin(nm.intermediate, inter, h)?;
            let output = lin(nm.output, h, inter)?;
            let mut norm = |name: &str| -> Result<Norm> { Ok(Norm { weight: take(&format!("{p}.{name}.weight"), &[h])?, bias: take(&format!("{p}.{name}.bias"), &[h])? }) };
            let attn_norm = norm(nm.attn_norm)?;
            let out_norm = norm(nm.out_norm)?;
            layers.push(BertLayer { query, key, value, attn_out, attn_norm, intermediate, output, out_norm });
        }
        let pooler_name = match (c.family, task) {
            (BertFamily::DistilBert, _) => "pre_classifier".to_string(),
            (BertFamily::Roberta, Task::SeqCls) => "classifier.dense".to_string(),
            _ => format!("{prefix}pooler.dense"),
        };
        let pooler = match task {
            Task::SeqCls if distil || roberta => {
                let mut get = |leaf: &str, shape: &[usize]| -> Result<Tensor> {
                    let key = format!("{pooler_name}.{leaf}");
                    let x = t.remove(&key).ok_or_else(|| PeftError::InvalidModelConfig { path: path.clone(), msg: format!("the weights have no tensor `{key}`") })?;
                    if x.dims() != shape {
                        return Err(PeftError::ShapeMismatch { name: key, expected: shape.to_vec(), found: x.dims().to_vec() });
                    }
                    conv(x)
                };
                Some(PeftLinear::new(get("weight", &[h, h])?, Some(get("bias", &[h])?), false))
            }
            Task::SeqCls => Some(PeftLinear::new(take("pooler.dense.weight", &[h, h])?, Some(take("pooler.dense.bias", &[h])?), false)),
            Task::FeatureExtraction if has_pooler => {
                Some(PeftLinear::new(take("pooler.dense.weight", &[h, h])?, Some(take("pooler.dense.bias", &[h])?), false))
            }
            _ => None,
        };
        let head_path = match (roberta, task) {
            (true, Task::SeqCls) => "classifier.out_proj".to_string(),
            _ => head_name(task).unwrap_or_default().to_string(),
        };
        let head = match (head_name(task).map(|_| head_path.as_str()), head_out) {
            (Some(name), Some(out)) => {
                let mut get = |leaf: &str, shape: &[usize]| -> Result<Tensor> {
                    let key = format!("{name}.{leaf}");
                    let x = t.remove(&key).ok_or_else(|| PeftError::InvalidModelConfig { path: path.clone(), msg: format!("the weights have no tensor `{key}`") })?;
                    if x.dims() != shape {
                        // transformers refuses this too (unless `ignore_mismatched_sizes=True`).
                        let name = format!("{key} (the checkpoint's `{name}` has {} outputs; load with that many labels, or from a checkpoint without this head)", x.dims()[0]);
                        return Err(PeftError::ShapeMismatch { name, expected: shape.to_vec(), found: x.dims().to_vec() });
                    }
                    conv(x)
                };
                Some(PeftLinear::new(get("weight", &[out, h])?, Some(get("bias", &[out])?), false))
            }
            _ => None,
        };
        let info = ModelInfo {
            architecture: arch_name(c.family, task),
            model_type: match c.family {
                BertFamily::Bert => "bert".into(),
                BertFamily::DistilBert => "distilbert".into(),
                BertFamily::Roberta => "roberta".into(),
            },
            name_or_path: c.name_or_path.clone(),
            vocab_size: c.vocab_size,
            hidden_size: h,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: None,
            head_dim: h / c.num_attention_heads,
            max_position_embeddings: c.max_position_embeddings,
            pad_token_id: c.pad_token_id,
            bos_token_id: None,
            eos_token_id: vec![],
            decoder_start_token_id: None,
            task,
            num_labels: if matches!(task, Task::SeqCls | Task::TokenCls) { num_labels } else { None },
        };
        Ok(BertModel { word_embeddings, position_embeddings, token_type_embeddings, embed_norm, layers, pooler, pooler_name, head_path, head, prefix, device: device.clone(), dtype, info, config })
    }

    fn ln(&self, x: &Tensor, n: &Norm, train: bool) -> Result<Tensor> {
        Ok(layer_norm(x, &n.weight, &n.bias, self.config.layer_norm_eps, train)?)
    }

    /// Additive mask `[b, 1, 1, total]` (f32; 0 for keys that may be attended, `f32::MIN` for
    /// padding); `None` when nothing is masked.
    fn padding_mask(&self, mask: Option<&Vec<u8>>, b: usize, total: usize) -> Result<Option<Tensor>> {
        let Some(m) = mask else { return Ok(None) };
        if m.len() != b * total {
            return Err(PeftError::invalid_arg("attentionMask", format!("has {} values, expected {b} × {total}", m.len())));
        }
        if m.iter().all(|&x| x != 0) {
            return Ok(None);
        }
        let v: Vec<f32> = m.iter().map(|&x| if x != 0 { 0.0 } else { f32::MIN }).collect();
        Ok(Some(Tensor::from_vec(v, (b, 1, 1, total), &self.device)?))
    }

    fn layer_forward(&self, l: &BertLayer, x: &Tensor, lin: &LinearCtx, mask: Option<&Tensor>, prefix: Option<&(Tensor, Tensor)>) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let nh = self.config.num_attention_heads;
        let hd = h / nh;
        let heads = |y: Tensor| -> Result<Tensor> { Ok(y.reshape((b, s, nh, hd))?.transpose(1, 2)?.contiguous()?) };
        let q = heads(l.query.forward(x, lin)?)?;
        let k = heads(l.key.forward(x, lin)?)?;
        let v = heads(l.value.forward(x, lin)?)?;
        let (k, v) = match prefix {
            Some((pk, pv)) => (Tensor::cat(&[&pk.to_dtype(self.dtype)?, &k], 2)?, Tensor::cat(&[&pv.to_dtype(self.dtype)?, &v], 2)?),
            None => (k, v),
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax_last(&scores, lin.train)?.to_dtype(self.dtype)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))?;
        let a = self.ln(&(l.attn_out.forward(&ctx, lin)? + x)?, &l.attn_norm, lin.train)?;
        let m = self.config.hidden_act.apply(&l.intermediate.forward(&a, lin)?)?;
        self.ln(&(l.output.forward(&m, lin)? + a)?, &l.out_norm, lin.train)
    }

    /// Index a `[rows, hidden]` table with `ids` (`[b, s]` row-major) → `[b, s, hidden]`.
    fn lookup(&self, table: &Tensor, ids: Vec<u32>, b: usize, s: usize) -> Result<Tensor> {
        let idx = Tensor::from_vec(ids, b * s, &self.device)?;
        Ok(table.index_select(&idx, 0)?.reshape((b, s, self.config.hidden_size))?)
    }

    fn prefixed(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

impl BaseModel for BertModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// config.json's BERT fields (transformers' names), with `architectures` naming the class
    /// built here.
    fn config_json(&self) -> Value {
        let c = &self.config;
        if c.family == BertFamily::DistilBert {
            let mut v = serde_json::json!({
                "model_type": "distilbert", "architectures": [self.info.architecture], "vocab_size": c.vocab_size,
                "dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
                "hidden_dim": c.intermediate_size, "activation": c.hidden_act.name(),
                "max_position_embeddings": c.max_position_embeddings, "initializer_range": c.initializer_range,
                "pad_token_id": c.pad_token_id, "dtype": c.dtype, "_name_or_path": c.name_or_path,
                // transformers' DistilBertConfig.attribute_map aliases
                "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            });
            if let Some(n) = self.info.num_labels {
                v["num_labels"] = n.into();
            }
            return v;
        }
        let mut v = serde_json::json!({
            "model_type": "bert", "architectures": [self.info.architecture], "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
            "hidden_act": c.hidden_act.name(), "max_position_embeddings": c.max_position_embeddings,
            "type_vocab_size": c.type_vocab_size, "layer_norm_eps": c.layer_norm_eps,
            "initializer_range": c.initializer_range, "pad_token_id": c.pad_token_id,
            "position_embedding_type": "absolute", "is_decoder": false, "dtype": c.dtype,
            "_name_or_path": c.name_or_path,
        });
        if let Some(n) = self.info.num_labels {
            v["num_labels"] = n.into();
        }
        v
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    // Every linear layer with its transformers module path (family names from
    // `BertFamily::names`), in module order: embeddings, layers, pooler, head.
    super::named_twins!(linears: |this| {
        let BertModel { config, word_embeddings, layers, pooler, pooler_name, head, head_path, prefix, .. } = this;
        let nm = config.family.names();
        let mut out = vec![(format!("{prefix}embeddings.word_embeddings"), word_embeddings)];
        for (i, l) in layers.into_iter().enumerate() {
            let BertLayer { query, key, value, attn_out, intermediate, output, .. } = l;
            let named = [(nm.query, query), (nm.key, key), (nm.value, value), (nm.attn_out, attn_out), (nm.intermediate, intermediate), (nm.output, output)];
            out.extend(named.into_iter().map(|(n, lin)| (format!("{prefix}{}.{i}.{n}", nm.layers), lin)));
        }
        if let Some(pl) = pooler {
            out.push((pooler_name.to_string(), pl));
        }
        if let Some(h) = head {
            out.push((head_path.to_string(), h));
        }
        out
    });

    // LayerNorm biases (LoRA's `bias: "all"`).
    super::named_twins!(norm_biases: |this| {
        let BertModel { config, embed_norm: Norm { bias: emb_bias, .. }, layers, prefix, .. } = this;
        let nm = config.family.names();
        let mut out = vec![(format!("{prefix}embeddings.LayerNorm"), emb_bias)];
        for (i, l) in layers.into_iter().enumerate() {
            let BertLayer { attn_norm: Norm { bias: b1, .. }, out_norm: Norm { bias: b2, .. }, .. } = l;
            out.push((format!("{prefix}{}.{i}.{}", nm.layers, nm.attn_norm), b1));
            out.push((format!("{prefix}{}.{i}.{}", nm.layers, nm.out_norm), b2));
        }
        out
    });

    fn module_names(&self) -> Vec<String> {
        let nm = self.config.family.names();
        let distil = self.config.family == BertFamily::DistilBert;
        let mut out = Vec::new();
        if !self.prefix.is_empty() {
            out.push(nm.base.to_string());
        }
        let mut emb = vec!["embeddings", "embeddings.word_embeddings", "embeddings.position_embeddings"];
        if !distil {
            emb.push("embeddings.token_type_embeddings");
        }
        emb.extend(["embeddings.LayerNorm", "embeddings.dropout"]);
        emb.extend(if distil { ["transformer", "transformer.layer"] } else { ["encoder", "encoder.layer"] });
        for n in emb {
            out.push(self.prefixed(n));
        }
        for i in 0..self.layers.len() {
            let p = self.prefixed(&format!("{}.{i}", nm.layers));
            out.push(p.clone());
            for n in [nm.query, nm.key, nm.value, nm.attn_out, nm.attn_norm, nm.intermediate, nm.output, nm.out_norm].iter().chain(nm.others) {
                out.push(format!("{p}.{n}"));
            }
        }
        if self.pooler.is_some() {
            if distil {
                out.push("pre_classifier".into());
            } else if self.config.family == BertFamily::Roberta && self.info.task == Task::SeqCls {
                out.extend(["classifier".to_string(), "classifier.dense".into(), "classifier.dropout".into(), "classifier.out_proj".into()]);
            } else {
                for n in ["pooler", "pooler.dense", "pooler.activation"] {
                    out.push(self.prefixed(n));
                }
            }
        }
        match self.info.task {
            Task::SeqCls if self.config.family == BertFamily::Roberta => {}
            Task::SeqCls | Task::TokenCls => out.extend(["dropout".to_string(), "classifier".to_string()]),
            Task::QuestionAns => out.extend(["dropout".to_string(), "qa_outputs".to_string()]),
            _ => {}
        }
        if self.info.task == Task::QuestionAns && !distil {
            out.retain(|n| n != "dropout"); // BertForQuestionAnswering has no top-level dropout
        }
        out
    }

    fn base_param_count(&self) -> usize {
        let norm = |n: &Norm| n.weight.elem_count() + n.bias.elem_count();
        let te = self.token_type_embeddings.as_ref().map(|t| t.elem_count()).unwrap_or(0);
        // The word embeddings are counted with the linears below (`named_linears` lists them).
        let mut n = self.position_embeddings.elem_count() + te + norm(&self.embed_norm);
        for l in &self.layers {
            n += norm(&l.attn_norm) + norm(&l.out_norm);
        }
        n + self.named_linears().iter().map(|(_, l)| l.base_param_count()).sum::<usize>()
    }

    fn word_embeddings(&self) -> &Tensor {
        &self.word_embeddings.weight
    }

    fn embed(&self, ids: &[u32], b: usize, s: usize) -> Result<Tensor> {
        self.embed_with(ids, b, s, &ForwardOptions::default())
    }

    /// Word embeddings with LoRA on `embeddings.word_embeddings` when an adapter targets it.
    fn embed_with(&self, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions) -> Result<Tensor> {
        let vocab = self.config.vocab_size;
        if ids.len() != b * s {
            return Err(PeftError::invalid_arg("inputIds", format!("has {} ids, expected batch {b} × seq {s}", ids.len())));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(PeftError::invalid_arg("inputIds", format!("token id {bad} is outside the vocabulary (size {vocab})")));
        }
        let idx = Tensor::from_slice(ids, b * s, &self.device)?;
        let ctx = opts.linear_ctx();
        self.word_embeddings.forward_embedding(&idx, b, s, &ctx)
    }

    /// RoBERTa computes its positions from the ids (transformers'
    /// `create_position_ids_from_input_ids`): real tokens count from `padding_idx + 1` (after the
    /// prefix, if any), padding keeps `padding_idx`. BERT and DistilBERT use `past .. past + s`
    /// (`forward_embeds`' default).
    fn ids_options(&self, ids: &[u32], _b: usize, s: usize, opts: &ForwardOptions, cache: Option<&KvCache>) -> Result<Option<ForwardOptions>> {
        if self.config.family != BertFamily::Roberta || opts.position_ids.is_some() || s == 0 {
            return Ok(None);
        }
        let pad = self.config.pad_token_id.unwrap_or(1);
        let past = cache.and_then(|c| c.layers.first().cloned().flatten()).map(|(k, _)| k.dim(2)).transpose()?.unwrap_or(0) as u32;
        let positions = ids
            .chunks(s)
            .flat_map(|row| {
                let mut n = 0u32;
                row.iter().map(move |&id| {
                    if id == pad {
                        pad
                    } else {
                        n += 1;
                        n + past + pad
                    }
                })
            })
            .collect();
        Ok(Some(ForwardOptions { position_ids: Some(positions), ..opts.clone() }))
    }

    /// See the module docs. `x`: `[b, s, hidden]`; `opts.attention_mask`: `b × (past + s)`
    /// (`past` = prefix length in `cache`); `opts.token_type_ids`: `b × s`, each below
    /// `type_vocab_size`; `opts.position_ids`: `b × s`, each below `max_position_embeddings`.
    ///
    /// Errors: `InvalidArgument` for a mask, token type ids or position ids of the wrong length
    /// or out of range, a sequence (prefix included) longer than `max_position_embeddings`, or
    /// a cache that does not fit (layer count, batch size, heads, head size).
    fn forward_embeds(&self, x: &Tensor, opts: &ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, _, _) = x.dims3()?;
        let c = &self.config;
        let nh = c.num_attention_heads;
        let hd = c.hidden_size / nh;
        let prefix: Vec<Option<(Tensor, Tensor)>> = match cache {
            None => vec![None; self.layers.len()],
            Some(cache) => {
                if cache.layers.len() != self.layers.len() {
                    return Err(PeftError::invalid_arg("cache", format!("has {} layers, the model has {}", cache.layers.len(), self.layers.len())));
                }
                cache.layers.clone()
            }
        };
        let past = prefix.first().and_then(|p| p.as_ref()).map(|(k, _)| k.dim(2)).transpose()?.unwrap_or(0);
        if past > 0 && c.family == BertFamily::DistilBert {
            return Err(PeftError::invalid_arg("cache", "DistilBERT has no past_key_values, so prefix tuning cannot be applied to it (HF refuses it too); use prompt tuning or LoRA"));
        }
        for (i, p) in prefix.iter().enumerate() {
            let ok = match p {
                Some((k, v)) => k.dims() == [b, nh, past, hd] && v.dims() == [b, nh, past, hd],
                None => past == 0,
            };
            if !ok {
                return Err(PeftError::invalid_arg(
                    "cache",
                    format!("layer {i}: bert reads the cache as prefix keys/values of shape [{b}, {nh}, {past}, {hd}] in every layer (it has no decoding cache)"),
                ));
            }
        }
        let ctx = self.ctx(x, opts, past)?;
        let mut h = self.embeddings(x, &ctx)?;
        for (l, p) in self.layers.iter().zip(&prefix) {
            h = self.layer_forward(l, &h, &ctx.lin, ctx.mask.as_ref(), p.as_ref())?;
        }
        self.head_forward(&h, &ctx, opts)
    }

    /// Gradient checkpointing: the embeddings (positions, token types, LayerNorm) as the
    /// stack's input, one `BertLayer` at a time, then the task head (see
    /// [`BaseModel::layer_stack`]). Every head is covered; prefix tuning is refused earlier.
    fn layer_stack<'a>(&'a self, x: &Tensor, opts: &'a ForwardOptions) -> Option<Result<Box<dyn super::checkpoint::LayerStack + 'a>>> {
        let input = |m: &Self, x: &Tensor, ctx: &Ctx| m.embeddings(x, ctx);
        let layer = |m: &Self, i: usize, x: &Tensor, ctx: &Ctx| m.layer_forward(&m.layers[i], x, &ctx.lin, ctx.mask.as_ref(), None);
        Some(self.ctx(x, opts, 0).map(|ctx| super::checkpoint::Layers::new(self, ctx, opts, self.layers.len(), layer, Self::head_forward).with_input(input).boxed()))
    }
}

/// What every layer of one [`BertModel`] forward shares: the linears' context, the position and
/// token type embeddings `[b, s, hidden]` and the additive padding mask `[b, 1, 1, past + s]`.
struct Ctx<'a> {
    lin: LinearCtx<'a>,
    pe: Tensor,
    te: Option<Tensor>,
    mask: Option<Tensor>,
}

impl BertModel {
    /// The [`Ctx`] of a forward of `x` `[b, s, hidden]` after `past` prefix positions.
    ///
    /// Errors: see [`BaseModel::forward_embeds`] (positions, token types, mask).
    fn ctx<'o>(&self, x: &Tensor, opts: &'o ForwardOptions, past: usize) -> Result<Ctx<'o>> {
        let (b, s, _) = x.dims3()?;
        let c = &self.config;
        let total = past + s;
        if total > c.max_position_embeddings {
            return Err(PeftError::invalid_arg("inputIds", format!("sequence length {total} exceeds max_position_embeddings {}", c.max_position_embeddings)));
        }
        let positions: Vec<u32> = match &opts.position_ids {
            Some(p) => {
                if p.len() != b * s {
                    return Err(PeftError::invalid_arg("positionIds", format!("has {} values, expected {b} × {s}", p.len())));
                }
                if let Some(bad) = p.iter().find(|&&q| q as usize >= c.max_position_embeddings) {
                    return Err(PeftError::invalid_arg("positionIds", format!("position {bad} exceeds max_position_embeddings {}", c.max_position_embeddings)));
                }
                p.clone()
            }
            // RoBERTa from embeddings: `padding_idx + 1 ..` whatever the past length (transformers'
            // `create_position_ids_from_inputs_embeds`).
            None if c.family == BertFamily::Roberta => {
                let first = c.pad_token_id.unwrap_or(1) + 1;
                (0..b).flat_map(|_| (0..s as u32).map(move |p| first + p)).collect()
            }
            None => (0..b).flat_map(|_| (past..total).map(|p| p as u32)).collect(),
        };
        if let Some(bad) = positions.iter().find(|&&q| q as usize >= c.max_position_embeddings) {
            return Err(PeftError::invalid_arg("inputIds", format!("position {bad} exceeds max_position_embeddings {} (sequence too long)", c.max_position_embeddings)));
        }
        let types: Vec<u32> = match &opts.token_type_ids {
            Some(_) if self.token_type_embeddings.is_none() => {
                return Err(PeftError::invalid_arg("tokenTypeIds", "DistilBERT has no token type embeddings; leave tokenTypeIds out"));
            }
            Some(t) => {
                if t.len() != b * s {
                    return Err(PeftError::invalid_arg("tokenTypeIds", format!("has {} values, expected {b} × {s}", t.len())));
                }
                if let Some(bad) = t.iter().find(|&&q| q as usize >= c.type_vocab_size) {
                    return Err(PeftError::invalid_arg("tokenTypeIds", format!("token type {bad} is not below type_vocab_size {}", c.type_vocab_size)));
                }
                t.clone()
            }
            None => vec![0; b * s],
        };
        let pe = self.lookup(&self.position_embeddings, positions, b, s)?;
        let te = match &self.token_type_embeddings {
            Some(table) => Some(self.lookup(table, types, b, s)?),
            None => None,
        };
        let mask = self.padding_mask(opts.attention_mask.as_ref(), b, total)?;
        Ok(Ctx { lin: opts.linear_ctx(), pe, te, mask })
    }

    /// `LayerNorm(x + token_type_embeddings + position_embeddings)` (the embeddings module).
    fn embeddings(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let e = match &ctx.te {
            Some(te) => ((x.to_dtype(self.dtype)? + te)? + &ctx.pe)?,
            None => (x.to_dtype(self.dtype)? + &ctx.pe)?,
        };
        self.ln(&e, &self.embed_norm, ctx.lin.train)
    }

    /// The task head on the last layer's output `h` `[b, s, hidden]` (see the module docs).
    fn head_forward(&self, h: &Tensor, ctx: &Ctx, _opts: &ForwardOptions) -> Result<Tensor> {
        let lin = &ctx.lin;
        match self.info.task {
            Task::SeqCls => {
                let pooler = self.pooler.as_ref().ok_or_else(|| PeftError::Internal("sequence classification without pooler".into()))?;
                let first = h.narrow(1, 0, 1)?.squeeze(1)?;
                let pooled = pooler.forward(&first, lin)?;
                let pooled = if self.config.family == BertFamily::DistilBert { pooled.relu()? } else { pooled.tanh()? };
                self.head.as_ref().ok_or_else(|| PeftError::Internal("missing classifier".into()))?.forward(&pooled, lin)
            }
            Task::TokenCls | Task::QuestionAns => self.head.as_ref().ok_or_else(|| PeftError::Internal("missing head".into()))?.forward(h, lin),
            _ => Ok(h.clone()),
        }
    }
}

/// Add the head weights a checkpoint lacks for `task`, as transformers initialises new modules
/// (`_init_weights`: weight `normal(0, initializer_range)`, bias zeros), recording each key in
/// `record`: the pooler (`bert.pooler.dense`) for sequence classification, then `classifier`
/// `[num_labels, hidden]` (SEQ_CLS, TOKEN_CLS) or `qa_outputs` `[2, hidden]` (QUESTION_ANS).
/// A head the checkpoint has is kept (its shape is checked when the model is built).
///
/// Errors: `InvalidArgument` for a bad `initializer_range`.
#[allow(clippy::too_many_arguments)]
pub fn init_missing_heads(t: &mut HashMap<String, Tensor>, task: Task, num_labels: Option<usize>, config: &BertConfig, v: &Value, seed: u64, device: &Device, record: &mut Vec<String>) -> Result<()> {
    let h = config.hidden_size;
    let add = |t: &mut HashMap<String, Tensor>, module: &str, out: usize, k: u64, record: &mut Vec<String>| -> Result<()> {
        let w = format!("{module}.weight");
        if !t.contains_key(&w) {
            super::loader::init_missing(t, &w, out, h, v, seed.wrapping_add(k), device, record)?;
            t.insert(format!("{module}.bias"), Tensor::zeros(out, DType::F32, device)?);
            record.push(format!("{module}.bias"));
        }
        Ok(())
    };
    if task == Task::SeqCls {
        match config.family {
            BertFamily::Bert if !t.contains_key("pooler.dense.weight") => add(t, "bert.pooler.dense", h, 1, record)?,
            BertFamily::DistilBert => add(t, "pre_classifier", h, 1, record)?,
            BertFamily::Roberta => {
                add(t, "classifier.dense", h, 1, record)?;
                return add(t, "classifier.out_proj", num_labels.unwrap_or(2), 0, record);
            }
            _ => {}
        }
    }
    match (head_name(task), task) {
        (Some(name), Task::QuestionAns) => add(t, name, 2, 0, record),
        (Some(name), _) => add(t, name, num_labels.unwrap_or(2), 0, record),
        _ => Ok(()),
    }
}
