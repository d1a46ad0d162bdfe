//! Prompt learning (HF PEFT 0.21 `PromptLearningConfig` and its prompt encoders): the base model
//! is left untouched and frozen; a per-adapter encoder produces either virtual token embeddings
//! that are prepended to the input embeddings (prompt tuning, Lester et al. 2021; P-tuning, Liu
//! et al. 2021; multitask prompt tuning, Wang et al. 2023) or per-layer key/value prefixes that
//! are placed in the attention cache before the real tokens (prefix tuning, Li & Liang 2021).
//!
//! On disk (as HF writes it): `adapter_config.json` with the method's fields, and
//! `adapter_model.safetensors` holding `prompt_embeddings` — the *computed* prompt table
//! `[num_virtual_tokens · num_transformer_submodules, dim]` (for prefix tuning `dim` is
//! `num_layers · 2 · token_dim`). Reparameterisations (the P-tuning MLP/LSTM, the prefix
//! projection MLP) are not stored: a loaded adapter uses the stored table directly. Multitask
//! prompt tuning also stores `prefix_task_cols` `[num_tasks, n, num_ranks]` and
//! `prefix_task_rows` `[num_tasks, num_ranks, token_dim]`. CPT (context-aware prompt tuning, see
//! [`cpt`]) stores its table `E[cpt_token_ids] + P(δ)` the same way.

pub mod cpt;
mod model;
pub use cpt::{CptHead, CptOptions};
pub use model::PromptTuner;

use crate::error::{PeftError, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Which prompt-learning method (HF `peft_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptMethod {
    /// `PREFIX_TUNING`: per-layer key/value prefixes.
    PrefixTuning,
    /// `PROMPT_TUNING`: trainable virtual token embeddings.
    PromptTuning,
    /// `P_TUNING`: virtual token embeddings reparameterised by an MLP or a bidirectional LSTM.
    PTuning,
    /// `MULTITASK_PROMPT_TUNING`: a shared prompt times a rank-`num_ranks` task-specific matrix.
    MultitaskPromptTuning,
    /// `CPT`: context-aware prompt tuning (in-context examples as virtual tokens plus a
    /// norm-bounded trainable delta; see [`cpt`]).
    Cpt,
}

impl PromptMethod {
    /// HF's `peft_type` string.
    pub fn as_str(&self) -> &'static str {
        match self {
            PromptMethod::PrefixTuning => "PREFIX_TUNING",
            PromptMethod::PromptTuning => "PROMPT_TUNING",
            PromptMethod::PTuning => "P_TUNING",
            PromptMethod::MultitaskPromptTuning => "MULTITASK_PROMPT_TUNING",
            PromptMethod::Cpt => "CPT",
        }
    }
    /// Parse HF's `peft_type` string.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "PREFIX_TUNING" => PromptMethod::PrefixTuning,
            "PROMPT_TUNING" => PromptMethod::PromptTuning,
            "P_TUNING" => PromptMethod::PTuning,
            "MULTITASK_PROMPT_TUNING" => PromptMethod::MultitaskPromptTuning,
            "CPT" => PromptMethod::Cpt,
            _ => return None,
        })
    }
}

/// Largest accepted `num_virtual_tokens` (and encoder sizes); larger values are refused before
/// anything is allocated.
pub const MAX_VIRTUAL_TOKENS: usize = 1 << 14;
const MAX_DIM: usize = 1 << 16;

fn defaults_for(method: PromptMethod) -> Map<String, Value> {
    let mut v = json!({
        "auto_mapping": null, "base_model_name_or_path": null, "inference_mode": false, "modules_to_save": null,
        "num_attention_heads": null, "num_layers": null, "num_transformer_submodules": null,
        "num_virtual_tokens": null, "peft_type": method.as_str(), "peft_version": "0.21.0", "revision": null,
        "task_type": null, "token_dim": null
    });
    let extra = match method {
        PromptMethod::PrefixTuning => json!({"encoder_hidden_size": null, "init_weights": null, "prefix_projection": false}),
        PromptMethod::PromptTuning => json!({
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": null, "tokenizer_kwargs": null, "tokenizer_name_or_path": null
        }),
        PromptMethod::PTuning => json!({
            "encoder_dropout": 0.0, "encoder_hidden_size": null, "encoder_num_layers": 2, "encoder_reparameterization_type": "MLP"
        }),
        PromptMethod::MultitaskPromptTuning => json!({
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": null, "tokenizer_kwargs": null, "tokenizer_name_or_path": null,
            "prompt_tuning_init_state_dict_path": null, "prompt_tuning_init_task": 0, "num_ranks": 1, "num_tasks": 1
        }),
        PromptMethod::Cpt => cpt::defaults(),
    };
    let (Value::Object(m), Value::Object(e)) = (&mut v, extra) else { unreachable!() };
    m.extend(e);
    std::mem::take(m)
}

/// HF PEFT's prompt-learning configs (`PrefixTuningConfig`, `PromptTuningConfig`,
/// `PromptEncoderConfig`, `MultitaskPromptTuningConfig`, `CPTConfig`) in one type, selected by
/// `method`.
/// Fields that do not apply to a method keep their defaults and are not written.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLearningConfig {
    pub method: PromptMethod,
    pub num_virtual_tokens: usize,
    /// Width of a virtual token (`hidden_size`); for prefix tuning on a model with
    /// `num_key_value_heads`, the per-layer key/value width `head_dim · num_key_value_heads`.
    pub token_dim: Option<usize>,
    pub num_layers: Option<usize>,
    /// Attention heads (for prefix tuning on GQA models: the key/value head count).
    pub num_attention_heads: Option<usize>,
    /// 2 for encoder-decoder (`SEQ_2_SEQ_LM`), else 1.
    pub num_transformer_submodules: Option<usize>,
    pub encoder_hidden_size: Option<usize>,
    pub prefix_projection: bool,
    /// Prefix tuning `init_weights: "zero"`.
    pub init_weights_zero: bool,
    /// `RANDOM`, `TEXT`, `SAMPLE_VOCAB` (+ `AVERAGE_SOURCE_TASKS`, `EXACT_SOURCE_TASK`,
    /// `ONLY_SOURCE_SHARED` for multitask prompt tuning).
    pub prompt_tuning_init: String,
    pub prompt_tuning_init_text: Option<String>,
    pub tokenizer_name_or_path: Option<String>,
    /// `MLP` or `LSTM` (P-tuning).
    pub encoder_reparameterization_type: String,
    pub encoder_num_layers: usize,
    pub encoder_dropout: f64,
    pub num_tasks: usize,
    pub num_ranks: usize,
    pub prompt_tuning_init_task: usize,
    pub prompt_tuning_init_state_dict_path: Option<String>,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    pub inference_mode: bool,
    /// CPT's own fields (`Some` exactly when `method` is [`PromptMethod::Cpt`]).
    pub cpt: Option<CptOptions>,
    raw: Map<String, Value>,
    unknown: Vec<String>,
}

impl PromptLearningConfig {
    /// Build from an adapter_config.json object (HF snake_case); missing fields take HF's
    /// defaults. `path` names the file in errors.
    ///
    /// Errors: `InvalidAdapterConfig` naming the field: unknown `peft_type`, a
    /// `num_virtual_tokens` that is not an integer in 1..=16384, sizes that are not positive
    /// integers, an unknown init or reparameterisation type, `TEXT` init without text or
    /// tokenizer, `tokenizer_kwargs` without `TEXT` init (HF's checks).
    pub fn from_json(v: &Value, path: Option<&Path>) -> Result<Self> {
        let bad = |msg: String| PeftError::InvalidAdapterConfig { path: path.map(|p| p.to_path_buf()), msg };
        let obj = v.as_object().ok_or_else(|| bad("the top level must be a JSON object".into()))?;
        let method = match obj.get("peft_type").and_then(|x| x.as_str()) {
            Some(s) => PromptMethod::parse(s).ok_or_else(|| {
                bad(format!("`peft_type` {s:?} is not a prompt-learning method (PREFIX_TUNING, PROMPT_TUNING, P_TUNING, MULTITASK_PROMPT_TUNING, CPT)"))
            })?,
            None => return Err(bad(format!("`peft_type` must be a string, found {:?}", obj.get("peft_type")))),
        };
        let defaults = defaults_for(method);
        let unknown: Vec<String> = obj.keys().filter(|k| !defaults.contains_key(*k)).cloned().collect();
        let mut raw = defaults;
        for (k, val) in obj {
            raw.insert(k.clone(), val.clone());
        }
        let opt_size = |k: &str, max: usize| -> Result<Option<usize>> {
            match &raw.get(k).cloned().unwrap_or(Value::Null) {
                Value::Null => Ok(None),
                Value::Number(n) => match n.as_u64() {
                    Some(x) if x >= 1 && x as usize <= max => Ok(Some(x as usize)),
                    _ => Err(bad(format!("`{k}` must be an integer between 1 and {max}, found {n}"))),
                },
                other => Err(bad(format!("`{k}` must be an integer, found {other}"))),
            }
        };
        match raw.get("modules_to_save") {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) if a.iter().all(|x| x.is_string()) => {}
            Some(other) => return Err(bad(format!("`modules_to_save` must be a list of strings or null, found {other}"))),
        }
        // CPT (HF `CPTConfig.__post_init__`): one virtual token per `cpt_token_ids` entry, one
        // transformer submodule, whatever the file says.
        let cpt = match method {
            PromptMethod::Cpt => {
                let task = match raw.get("task_type") {
                    Some(Value::String(t)) => Some(t.as_str()),
                    _ => None,
                };
                Some(CptOptions::from_raw(&raw, task, path)?)
            }
            _ => None,
        };
        let num_virtual_tokens = match &cpt {
            Some(c) => c.cpt_token_ids.len(),
            None => opt_size("num_virtual_tokens", MAX_VIRTUAL_TOKENS)?
                .ok_or_else(|| bad("`num_virtual_tokens` must be given (a positive integer)".into()))?,
        };
        let token_dim = opt_size("token_dim", MAX_DIM)?;
        let num_layers = opt_size("num_layers", 4096)?;
        let num_attention_heads = opt_size("num_attention_heads", MAX_DIM)?;
        let num_transformer_submodules = if cpt.is_some() { Some(1) } else { opt_size("num_transformer_submodules", 2)? };
        let encoder_hidden_size = opt_size("encoder_hidden_size", MAX_DIM)?;
        let get_bool = |k: &str| -> Result<bool> {
            match raw.get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(bad(format!("`{k}` must be a boolean, found {other}"))),
            }
        };
        let opt_str = |k: &str| -> Result<Option<String>> {
            match raw.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(bad(format!("`{k}` must be a string, found {other}"))),
            }
        };
        let prefix_projection = get_bool("prefix_projection")?;
        let inference_mode = get_bool("inference_mode")?;
        let init_weights_zero = match opt_str("init_weights")? {
            None => false,
            Some(s) if s == "zero" => true,
            Some(s) => return Err(bad(format!("`init_weights` must be null or \"zero\", found {s:?}"))),
        };
        let prompt_tuning_init = opt_str("prompt_tuning_init")?.unwrap_or_else(|| "RANDOM".into());
        let allowed: &[&str] = match method {
            PromptMethod::MultitaskPromptTuning => &["RANDOM", "TEXT", "SAMPLE_VOCAB", "AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"],
            _ => &["RANDOM", "TEXT", "SAMPLE_VOCAB"],
        };
        if matches!(method, PromptMethod::PromptTuning | PromptMethod::MultitaskPromptTuning) && !allowed.contains(&prompt_tuning_init.as_str()) {
            return Err(bad(format!("`prompt_tuning_init` must be one of {allowed:?}, found {prompt_tuning_init:?}")));
        }
        let prompt_tuning_init_text = opt_str("prompt_tuning_init_text")?;
        let tokenizer_name_or_path = opt_str("tokenizer_name_or_path")?;
        if prompt_tuning_init == "TEXT" {
            if tokenizer_name_or_path.is_none() {
                return Err(bad("When prompt_tuning_init='TEXT', tokenizer_name_or_path can't be None.".into()));
            }
            if prompt_tuning_init_text.is_none() {
                return Err(bad("When prompt_tuning_init='TEXT', prompt_tuning_init_text can't be None.".into()));
            }
        }
        let has_kwargs = raw.get("tokenizer_kwargs").map(|v| !v.is_null() && v != &json!({})).unwrap_or(false);
        if has_kwargs && prompt_tuning_init != "TEXT" {
            return Err(bad("tokenizer_kwargs only valid when using prompt_tuning_init='TEXT'.".into()));
        }
        let encoder_reparameterization_type = opt_str("encoder_reparameterization_type")?.unwrap_or_else(|| "MLP".into());
        if method == PromptMethod::PTuning && !["MLP", "LSTM"].contains(&encoder_reparameterization_type.as_str()) {
            return Err(bad(format!("`encoder_reparameterization_type` must be \"MLP\" or \"LSTM\", found {encoder_reparameterization_type:?}")));
        }
        let encoder_num_layers = opt_size("encoder_num_layers", 64)?.unwrap_or(2);
        let encoder_dropout = match raw.get("encoder_dropout") {
            None | Some(Value::Null) => 0.0,
            Some(v) => v.as_f64().filter(|p| (0.0..1.0).contains(p)).ok_or_else(|| bad(format!("`encoder_dropout` must be a number in [0, 1), found {v}")))?,
        };
        let num_tasks = opt_size("num_tasks", 1 << 16)?.unwrap_or(1);
        let num_ranks = opt_size("num_ranks", MAX_DIM)?.unwrap_or(1);
        let prompt_tuning_init_task = match raw.get("prompt_tuning_init_task") {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_u64().ok_or_else(|| bad(format!("`prompt_tuning_init_task` must be a non-negative integer, found {v}")))? as usize,
        };
        let prompt_tuning_init_state_dict_path = opt_str("prompt_tuning_init_state_dict_path")?;
        if ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"].contains(&prompt_tuning_init.as_str())
            && prompt_tuning_init_state_dict_path.is_none()
        {
            return Err(bad(format!("prompt_tuning_init_state_dict_path needs to be specified with {prompt_tuning_init} init method")));
        }
        if method == PromptMethod::MultitaskPromptTuning && prompt_tuning_init == "EXACT_SOURCE_TASK" && prompt_tuning_init_task >= (1 << 16) {
            return Err(bad("`prompt_tuning_init_task` is too large".into()));
        }
        Ok(PromptLearningConfig {
            method,
            num_virtual_tokens,
            token_dim,
            num_layers,
            num_attention_heads,
            num_transformer_submodules,
            encoder_hidden_size,
            prefix_projection,
            init_weights_zero,
            prompt_tuning_init,
            prompt_tuning_init_text,
            tokenizer_name_or_path,
            encoder_reparameterization_type,
            encoder_num_layers,
            encoder_dropout,
            num_tasks,
            num_ranks,
            prompt_tuning_init_task,
            prompt_tuning_init_state_dict_path,
            task_type: opt_str("task_type")?,
            base_model_name_or_path: opt_str("base_model_name_or_path")?,
            inference_mode,
            cpt,
            raw,
            unknown,
        })
    }

    /// Whether `modules_to_save` is set to a non-empty list.
    pub fn modules_to_save_given(&self) -> bool {
        self.raw.get("modules_to_save").and_then(|v| v.as_array()).map(|a| !a.is_empty()).unwrap_or(false)
    }

    /// `modules_to_save` (`None` when null). Non-string entries are skipped (validated at parse).
    pub fn modules_to_save(&self) -> Option<Vec<String>> {
        self.raw.get("modules_to_save").and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
    }

    /// Set `modules_to_save` (written to adapter_config.json as HF writes it).
    pub fn set_modules_to_save(&mut self, v: Option<Vec<String>>) {
        self.raw["modules_to_save"] = match v {
            Some(list) => serde_json::Value::from(list),
            None => serde_json::Value::Null,
        };
    }

    /// Fields of the source JSON that HF's config class does not have (kept, not acted on).
    pub fn unknown_fields(&self) -> &[String] {
        &self.unknown
    }

    /// Fill the fields HF derives from the base model (`_prepare_prompt_learning_config`):
    /// `num_layers`, `token_dim`, `num_attention_heads`, `num_transformer_submodules` (2 for
    /// `SEQ_2_SEQ_LM`), `encoder_hidden_size` (= `token_dim`); for prefix tuning on a model with
    /// `num_key_value_heads`, `token_dim = head_dim · num_key_value_heads` and
    /// `num_attention_heads = num_key_value_heads`. Fields already set are kept.
    pub fn prepare(&mut self, dims: &ModelDims) {
        if self.num_layers.is_none() {
            self.num_layers = Some(dims.num_layers);
        }
        if self.token_dim.is_none() {
            self.token_dim = Some(dims.hidden_size);
        }
        if self.num_attention_heads.is_none() {
            self.num_attention_heads = Some(dims.num_attention_heads);
        }
        if self.method == PromptMethod::PrefixTuning {
            if let Some(kv) = dims.num_key_value_heads {
                self.token_dim = Some(dims.head_dim * kv);
                self.num_attention_heads = Some(kv);
            }
        }
        if self.num_transformer_submodules.is_none() {
            self.num_transformer_submodules = Some(if self.task_type.as_deref() == Some("SEQ_2_SEQ_LM") { 2 } else { 1 });
        }
        if matches!(self.method, PromptMethod::PrefixTuning | PromptMethod::PTuning) && self.encoder_hidden_size.is_none() {
            self.encoder_hidden_size = self.token_dim;
        }
    }

    /// `num_virtual_tokens · num_transformer_submodules`.
    pub fn total_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens * self.num_transformer_submodules.unwrap_or(1)
    }

    /// Width of a row of the saved `prompt_embeddings` table: `num_layers · 2 · token_dim` for
    /// prefix tuning, `token_dim` otherwise.
    pub fn table_dim(&self) -> usize {
        let td = self.token_dim.unwrap_or(0);
        match self.method {
            PromptMethod::PrefixTuning => self.num_layers.unwrap_or(0) * 2 * td,
            _ => td,
        }
    }

    /// Rows of the saved table: prefix tuning stores `num_virtual_tokens` rows, the others
    /// `total_virtual_tokens`.
    pub fn table_rows(&self) -> usize {
        match self.method {
            PromptMethod::PrefixTuning => self.num_virtual_tokens,
            _ => self.total_virtual_tokens(),
        }
    }

    /// The config as HF's adapter_config.json object.
    pub fn to_json(&self) -> Value {
        let mut m = self.raw.clone();
        let num = |x: Option<usize>| x.map(|v| Value::from(v as u64)).unwrap_or(Value::Null);
        let s = |x: &Option<String>| x.clone().map(Value::String).unwrap_or(Value::Null);
        m.insert("num_virtual_tokens".into(), num(Some(self.num_virtual_tokens)));
        m.insert("token_dim".into(), num(self.token_dim));
        m.insert("num_layers".into(), num(self.num_layers));
        m.insert("num_attention_heads".into(), num(self.num_attention_heads));
        m.insert("num_transformer_submodules".into(), num(self.num_transformer_submodules));
        m.insert("inference_mode".into(), Value::Bool(self.inference_mode));
        m.insert("base_model_name_or_path".into(), s(&self.base_model_name_or_path));
        m.insert("task_type".into(), s(&self.task_type));
        m.insert("peft_type".into(), Value::String(self.method.as_str().into()));
        m.insert("peft_version".into(), Value::String("0.21.0".into()));
        match self.method {
            PromptMethod::PrefixTuning => {
                m.insert("encoder_hidden_size".into(), num(self.encoder_hidden_size));
                m.insert("prefix_projection".into(), Value::Bool(self.prefix_projection));
            }
            PromptMethod::PTuning => {
                m.insert("encoder_hidden_size".into(), num(self.encoder_hidden_size));
                m.insert("encoder_reparameterization_type".into(), Value::String(self.encoder_reparameterization_type.clone()));
                m.insert("encoder_num_layers".into(), num(Some(self.encoder_num_layers)));
                m.insert("encoder_dropout".into(), serde_json::Number::from_f64(self.encoder_dropout).map(Value::Number).unwrap_or(Value::Null));
            }
            PromptMethod::PromptTuning | PromptMethod::MultitaskPromptTuning => {
                m.insert("prompt_tuning_init".into(), Value::String(self.prompt_tuning_init.clone()));
                m.insert("prompt_tuning_init_text".into(), s(&self.prompt_tuning_init_text));
                m.insert("tokenizer_name_or_path".into(), s(&self.tokenizer_name_or_path));
                if self.method == PromptMethod::MultitaskPromptTuning {
                    m.insert("num_tasks".into(), num(Some(self.num_tasks)));
                    m.insert("num_ranks".into(), num(Some(self.num_ranks)));
                    m.insert("prompt_tuning_init_task".into(), Value::from(self.prompt_tuning_init_task as u64));
                    m.insert("prompt_tuning_init_state_dict_path".into(), s(&self.prompt_tuning_init_state_dict_path));
                }
            }
            PromptMethod::Cpt => {
                m.insert("tokenizer_name_or_path".into(), s(&self.tokenizer_name_or_path));
                if let Some(c) = &self.cpt {
                    c.write(&mut m);
                }
            }
        }
        let sorted: BTreeMap<String, Value> = m.into_iter().collect();
        serde_json::to_value(sorted).expect("a map of JSON values serializes")
    }
}

/// What [`PromptLearningConfig::prepare`] needs from the base model's config.
#[derive(Debug, Clone)]
pub struct ModelDims {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    /// `Some` when the config has `num_key_value_heads` (Llama family).
    pub num_key_value_heads: Option<usize>,
    pub head_dim: usize,
    pub vocab_size: usize,
}

/// A `torch.nn.Linear` with trainable weight `[out, in]` and bias `[out]`.
pub struct TrainLinear {
    pub weight: Var,
    pub bias: Var,
}

impl TrainLinear {
    fn new(rng: &mut rand::rngs::StdRng, inp: usize, out: usize, zero: bool, device: &Device) -> Result<Self> {
        // nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
        let bound = 1.0 / (inp as f32).sqrt();
        let mut u = |n: usize| -> Vec<f32> { if zero { vec![0.0; n] } else { (0..n).map(|_| rng.random_range(-bound..bound)).collect() } };
        let w = Tensor::from_vec(u(out * inp), (out, inp), device)?;
        let b = Tensor::from_vec(u(out), out, device)?;
        Ok(TrainLinear { weight: Var::from_tensor(&w)?, bias: Var::from_tensor(&b)? })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.as_tensor().t()?)?.broadcast_add(self.bias.as_tensor())?)
    }
    fn vars(&self) -> Vec<Var> {
        vec![self.weight.clone(), self.bias.clone()]
    }
}

/// One direction of one LSTM layer (`torch.nn.LSTM` weights; gate order i, f, g, o).
pub struct LstmDirection {
    /// `[4·hidden, input]`.
    pub w_ih: Var,
    /// `[4·hidden, hidden]`.
    pub w_hh: Var,
    pub b_ih: Var,
    pub b_hh: Var,
}

/// How the virtual tokens are computed from the embedding table during training.
pub enum PromptHead {
    /// The table itself (prompt tuning; prefix tuning without projection; any loaded adapter).
    Direct,
    /// Prefix projection: `Linear(token_dim, encoder_hidden) → tanh → Linear(·, num_layers·2·token_dim)`.
    PrefixMlp(TrainLinear, TrainLinear),
    /// P-tuning MLP: `Linear → ReLU → Linear → ReLU → Linear` (encoder_num_layers is ignored, as in HF).
    PtuningMlp(TrainLinear, TrainLinear, TrainLinear),
    /// P-tuning LSTM: bidirectional `encoder_num_layers`-layer LSTM, then
    /// `Linear(2h, 2h) → ReLU → Linear(2h, token_dim)`.
    PtuningLstm { layers: Vec<[LstmDirection; 2]>, dropout: f64, mlp: (TrainLinear, TrainLinear) },
    /// CPT: the table is `embedding + P(δ)` with `embedding` frozen and δ trainable (see [`cpt`]).
    Cpt(CptHead),
}

/// The per-adapter prompt encoder (HF `PrefixEncoder` / `PromptEmbedding` / `PromptEncoder` /
/// `MultitaskPromptEmbedding`).
pub struct PromptEncoder {
    /// `[rows, dim]` f32: the virtual token embeddings (or, for a loaded adapter, the saved table).
    pub embedding: Var,
    pub head: PromptHead,
    /// Multitask prompt tuning: `prefix_task_cols` `[num_tasks, n, num_ranks]` and
    /// `prefix_task_rows` `[num_tasks, num_ranks, token_dim]`.
    pub task: Option<(Var, Var)>,
}

fn normal(rng: &mut rand::rngs::StdRng, n: usize, std: f32) -> Result<Vec<f32>> {
    let d = Normal::new(0.0f32, std).map_err(|e| PeftError::Internal(e.to_string()))?;
    Ok((0..n).map(|_| d.sample(rng)).collect())
}

/// Where a fresh encoder's initial rows come from besides random init.
pub enum PromptInit<'a> {
    /// N(0, 1) (torch.nn.Embedding's default).
    Random,
    /// Rows of the word-embedding matrix `[vocab, hidden]` for these token ids (TEXT and
    /// SAMPLE_VOCAB init); the ids are already repeated/truncated to the row count.
    FromVocab { word_embeddings: &'a Tensor, ids: Vec<u32> },
}

impl PromptEncoder {
    /// A fresh (trainable) encoder for `cfg` (already [`PromptLearningConfig::prepare`]d).
    /// `seed` drives the random init.
    ///
    /// Errors: `InvalidAdapterConfig` when a derived size is missing.
    pub fn new(cfg: &PromptLearningConfig, init: PromptInit, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let missing = |f: &str| PeftError::InvalidAdapterConfig { path: None, msg: format!("`{f}` is not set (prepare the config against a model first)") };
        let td = cfg.token_dim.ok_or_else(|| missing("token_dim"))?;
        let rows = cfg.table_rows();
        let emb_dim = match (cfg.method, cfg.prefix_projection) {
            (PromptMethod::PrefixTuning, false) => cfg.table_dim(),
            _ => td,
        };
        let data = match &init {
            PromptInit::FromVocab { word_embeddings, ids } => {
                if ids.len() != rows {
                    return Err(PeftError::Internal(format!("init ids: {} rows expected, got {}", rows, ids.len())));
                }
                let idx = Tensor::from_slice(ids, ids.len(), word_embeddings.device())?;
                word_embeddings.index_select(&idx, 0)?.to_dtype(DType::F32)?.to_device(device)?
            }
            PromptInit::Random => {
                let zero = cfg.method == PromptMethod::PrefixTuning && cfg.init_weights_zero && !cfg.prefix_projection;
                let v = if zero { vec![0.0; rows * emb_dim] } else { normal(&mut rng, rows * emb_dim, 1.0)? };
                Tensor::from_vec(v, (rows, emb_dim), device)?
            }
        };
        if data.dims() != [rows, emb_dim] {
            return Err(PeftError::ShapeMismatch { name: "prompt embedding init".into(), expected: vec![rows, emb_dim], found: data.dims().to_vec() });
        }
        let embedding = Var::from_tensor(&data)?;
        let hidden = cfg.encoder_hidden_size.unwrap_or(td);
        let head = match cfg.method {
            PromptMethod::PrefixTuning if cfg.prefix_projection => PromptHead::PrefixMlp(
                TrainLinear::new(&mut rng, td, hidden, false, device)?,
                TrainLinear::new(&mut rng, hidden, cfg.table_dim(), cfg.init_weights_zero, device)?,
            ),
            PromptMethod::PTuning if cfg.encoder_reparameterization_type == "LSTM" => {
                let mut layers = Vec::new();
                let bound = 1.0 / (hidden as f32).sqrt();
                for l in 0..cfg.encoder_num_layers {
                    let inp = if l == 0 { td } else { 2 * hidden };
                    let mut dir = || -> Result<LstmDirection> {
                        let mut u = |r: usize, c: usize| -> Result<Var> {
                            let v: Vec<f32> = (0..r * c).map(|_| rng.random_range(-bound..bound)).collect();
                            Ok(Var::from_tensor(&Tensor::from_vec(v, (r, c), device)?.squeeze_if(c == 1)?)?)
                        };
                        Ok(LstmDirection { w_ih: u(4 * hidden, inp)?, w_hh: u(4 * hidden, hidden)?, b_ih: u(4 * hidden, 1)?, b_hh: u(4 * hidden, 1)? })
                    };
                    let f = dir()?;
                    let b = dir()?;
                    layers.push([f, b]);
                }
                let mlp = (TrainLinear::new(&mut rng, 2 * hidden, 2 * hidden, false, device)?, TrainLinear::new(&mut rng, 2 * hidden, td, false, device)?);
                PromptHead::PtuningLstm { layers, dropout: cfg.encoder_dropout, mlp }
            }
            PromptMethod::PTuning => PromptHead::PtuningMlp(
                TrainLinear::new(&mut rng, td, hidden, false, device)?,
                TrainLinear::new(&mut rng, hidden, hidden, false, device)?,
                TrainLinear::new(&mut rng, hidden, td, false, device)?,
            ),
            PromptMethod::Cpt => {
                let opts = cfg.cpt.as_ref().ok_or_else(|| missing("cpt_token_ids"))?;
                PromptHead::Cpt(CptHead::new(opts, td, device)?)
            }
            _ => PromptHead::Direct,
        };
        let task = if cfg.method == PromptMethod::MultitaskPromptTuning {
            let n = cfg.total_virtual_tokens();
            let cols = Tensor::from_vec(normal(&mut rng, cfg.num_tasks * n * cfg.num_ranks, 0.02)?, (cfg.num_tasks, n, cfg.num_ranks), device)?;
            let rws = Tensor::from_vec(normal(&mut rng, cfg.num_tasks * cfg.num_ranks * td, 0.02)?, (cfg.num_tasks, cfg.num_ranks, td), device)?;
            Some((Var::from_tensor(&cols)?, Var::from_tensor(&rws)?))
        } else {
            None
        };
        Ok(PromptEncoder { embedding, head, task })
    }

    /// An encoder holding a saved table (`prompt_embeddings` `[rows, dim]`) used as is, with the
    /// multitask matrices when given.
    pub fn from_table(table: &Tensor, task: Option<(Tensor, Tensor)>) -> Result<Self> {
        let task = match task {
            Some((c, r)) => Some((Var::from_tensor(&c.to_dtype(DType::F32)?)?, Var::from_tensor(&r.to_dtype(DType::F32)?)?)),
            None => None,
        };
        Ok(PromptEncoder { embedding: Var::from_tensor(&table.to_dtype(DType::F32)?)?, head: PromptHead::Direct, task })
    }

    /// Every trainable parameter with a descriptive name (HF's parameter names under the
    /// encoder; for optimizers). CPT trains only `delta_embedding.weight` (its `embedding` is
    /// frozen).
    pub fn vars(&self) -> Vec<(String, Var)> {
        if let PromptHead::Cpt(h) = &self.head {
            return vec![("delta_embedding.weight".to_string(), h.delta.clone())];
        }
        let mut out = vec![("embedding.weight".to_string(), self.embedding.clone())];
        let lin = |out: &mut Vec<(String, Var)>, name: &str, l: &TrainLinear| {
            let v = l.vars();
            out.push((format!("{name}.weight"), v[0].clone()));
            out.push((format!("{name}.bias"), v[1].clone()));
        };
        match &self.head {
            PromptHead::Direct | PromptHead::Cpt(_) => {}
            PromptHead::PrefixMlp(a, b) => {
                lin(&mut out, "transform.0", a);
                lin(&mut out, "transform.2", b);
            }
            PromptHead::PtuningMlp(a, b, c) => {
                lin(&mut out, "mlp_head.0", a);
                lin(&mut out, "mlp_head.2", b);
                lin(&mut out, "mlp_head.4", c);
            }
            PromptHead::PtuningLstm { layers, mlp, .. } => {
                for (l, dirs) in layers.iter().enumerate() {
                    for (d, sfx) in dirs.iter().zip(["", "_reverse"]) {
                        out.push((format!("lstm_head.weight_ih_l{l}{sfx}"), d.w_ih.clone()));
                        out.push((format!("lstm_head.weight_hh_l{l}{sfx}"), d.w_hh.clone()));
                        out.push((format!("lstm_head.bias_ih_l{l}{sfx}"), d.b_ih.clone()));
                        out.push((format!("lstm_head.bias_hh_l{l}{sfx}"), d.b_hh.clone()));
                    }
                }
                lin(&mut out, "mlp_head.0", &mlp.0);
                lin(&mut out, "mlp_head.2", &mlp.1);
            }
        }
        if let Some((c, r)) = &self.task {
            out.push(("prefix_task_cols".into(), c.clone()));
            out.push(("prefix_task_rows".into(), r.clone()));
        }
        out
    }

    /// Number of parameters (HF counts all of them as trainable unless in inference mode;
    /// CPT's frozen `embedding` counts here but not in [`Self::vars`]).
    pub fn param_count(&self) -> usize {
        let frozen = if matches!(self.head, PromptHead::Cpt(_)) { self.embedding.elem_count() } else { 0 };
        frozen + self.vars().iter().map(|(_, v)| v.elem_count()).sum::<usize>()
    }

    /// The encoder's part of the trainer's after-optimizer-step hook: CPT projects its delta
    /// back into its norm bounds (HF does this at the start of every forward); the other heads
    /// have nothing to do.
    pub fn after_optimizer_step(&self) -> Result<()> {
        match &self.head {
            PromptHead::Cpt(h) => h.project(),
            _ => Ok(()),
        }
    }

    /// The prompt table `[rows, dim]` f32 after the reparameterisation head (not the multitask
    /// task product). `train` enables the LSTM's inter-layer dropout, drawn from `rng`.
    pub fn table(&self, train: bool, rng: Option<&std::sync::Mutex<rand::rngs::StdRng>>) -> Result<Tensor> {
        let e = self.embedding.as_tensor();
        Ok(match &self.head {
            PromptHead::Direct => e.clone(),
            PromptHead::Cpt(h) => h.table(e)?,
            PromptHead::PrefixMlp(a, b) => b.forward(&a.forward(e)?.tanh()?)?,
            PromptHead::PtuningMlp(a, b, c) => c.forward(&b.forward(&a.forward(e)?.relu()?)?.relu()?)?,
            PromptHead::PtuningLstm { layers, dropout, mlp } => {
                let mut x = e.clone();
                for (i, dirs) in layers.iter().enumerate() {
                    let f = lstm_direction(&x, &dirs[0], false)?;
                    let b = lstm_direction(&x, &dirs[1], true)?;
                    x = Tensor::cat(&[&f, &b], D::Minus1)?;
                    if train && *dropout > 0.0 && i + 1 < layers.len() {
                        x = dropout_mask(&x, *dropout, rng)?;
                    }
                }
                mlp.1.forward(&mlp.0.forward(&x)?.relu()?)?
            }
        })
    }

    /// The saved `prompt_embeddings` (HF `get_prompt_embedding_to_save`): the computed table, or
    /// for multitask prompt tuning the shared embedding itself.
    pub fn table_to_save(&self) -> Result<Tensor> {
        if self.task.is_some() {
            return Ok(self.embedding.as_tensor().detach());
        }
        Ok(self.table(false, None)?.detach())
    }

    /// Virtual token embeddings for a batch: `[b, rows, dim]` f32. Multitask prompt tuning
    /// multiplies the shared table elementwise by `cols[task] @ rows[task]` per row
    /// (`task_ids` required, one per row).
    ///
    /// Errors: `InvalidArgument` (`taskIds` missing, wrong length or out of range).
    pub fn batch_prompts(&self, b: usize, task_ids: Option<&[u32]>, train: bool, rng: Option<&std::sync::Mutex<rand::rngs::StdRng>>) -> Result<Tensor> {
        let t = self.table(train, rng)?;
        let (rows, dim) = t.dims2()?;
        match &self.task {
            None => Ok(t.unsqueeze(0)?.broadcast_as((b, rows, dim))?),
            Some((cols, trows)) => {
                let ids = task_ids.ok_or_else(|| PeftError::invalid_arg("taskIds", "multitask prompt tuning needs one task id per row"))?;
                if ids.len() != b {
                    return Err(PeftError::invalid_arg("taskIds", format!("has {} ids but the batch has {b} rows", ids.len())));
                }
                let nt = cols.dim(0)?;
                if let Some(bad) = ids.iter().find(|&&i| i as usize >= nt) {
                    return Err(PeftError::invalid_arg("taskIds", format!("task id {bad} is out of range (num_tasks {nt})")));
                }
                let idx = Tensor::from_slice(ids, b, t.device())?;
                let c = cols.as_tensor().index_select(&idx, 0)?; // [b, n, r]
                let r = trows.as_tensor().index_select(&idx, 0)?; // [b, r, d]
                let task_prompts = c.matmul(&r)?; // [b, n, d]
                Ok(t.unsqueeze(0)?.broadcast_as((b, rows, dim))?.mul(&task_prompts)?)
            }
        }
    }
}

trait SqueezeIf {
    fn squeeze_if(self, yes: bool) -> candle_core::Result<Tensor>;
}
impl SqueezeIf for Tensor {
    fn squeeze_if(self, yes: bool) -> candle_core::Result<Tensor> {
        if yes {
            self.squeeze(1)
        } else {
            Ok(self)
        }
    }
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    // Differentiable composition (candle's fused sigmoid op is not used on training paths).
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// One LSTM direction over a sequence `x` `[n, in]` → `[n, hidden]` (zero initial state), torch
/// gate order i, f, g, o.
fn lstm_direction(x: &Tensor, d: &LstmDirection, reverse: bool) -> Result<Tensor> {
    let n = x.dim(0)?;
    let h_size = d.w_hh.dim(1)?;
    let xw = x.matmul(&d.w_ih.as_tensor().t()?)?.broadcast_add(d.b_ih.as_tensor())?.broadcast_add(d.b_hh.as_tensor())?; // [n, 4h]
    let mut h = Tensor::zeros((1, h_size), DType::F32, x.device())?;
    let mut c = h.clone();
    let mut outs: Vec<Tensor> = vec![h.clone(); n];
    let order: Vec<usize> = if reverse { (0..n).rev().collect() } else { (0..n).collect() };
    for t in order {
        let g = (xw.narrow(0, t, 1)? + h.matmul(&d.w_hh.as_tensor().t()?)?)?;
        let i = sigmoid(&g.narrow(1, 0, h_size)?)?;
        let f = sigmoid(&g.narrow(1, h_size, h_size)?)?;
        let gg = g.narrow(1, 2 * h_size, h_size)?.tanh()?;
        let o = sigmoid(&g.narrow(1, 3 * h_size, h_size)?)?;
        c = ((f * &c)? + (i * gg)?)?;
        h = (o * c.tanh()?)?;
        outs[t] = h.clone();
    }
    Ok(Tensor::cat(&outs, 0)?)
}

fn dropout_mask(x: &Tensor, p: f64, rng: Option<&std::sync::Mutex<rand::rngs::StdRng>>) -> Result<Tensor> {
    let n = x.elem_count();
    let keep = 1.0 / (1.0 - p) as f32;
    let mask: Vec<f32> = match rng {
        Some(r) => {
            let mut g = r.lock().unwrap_or_else(|e| e.into_inner());
            (0..n).map(|_| if g.random::<f64>() < p { 0.0 } else { keep }).collect()
        }
        None => {
            let mut g = rand::rng();
            (0..n).map(|_| if g.random::<f64>() < p { 0.0 } else { keep }).collect()
        }
    };
    Ok((x * Tensor::from_vec(mask, x.dims(), x.device())?)?)
}

/// Token ids for TEXT init (HF `PromptEmbedding`): the text's ids truncated to `rows`, or
/// repeated cyclically up to `rows`.
///
/// Errors: `InvalidAdapterConfig` when the text tokenizes to nothing.
pub fn text_init_ids(text_ids: &[u32], rows: usize) -> Result<Vec<u32>> {
    if text_ids.is_empty() {
        return Err(PeftError::InvalidAdapterConfig { path: None, msg: "`prompt_tuning_init_text` tokenizes to no tokens".into() });
    }
    Ok(text_ids.iter().copied().cycle().take(rows).collect())
}

crate::tuners::config::impl_tuner_config!(PromptLearningConfig, prompt: |c| c.method.as_str());

/// HF's refusals for prompt-learning adapters (every prompt-learning tuner: prefix, prompt,
/// P-tuning, multitask prompt tuning, CPT): HF's `PeftModel` for them takes one active adapter,
/// cannot merge (the base weights do not change), has no layer status, and raises a `TypeError`
/// from `set_requires_grad`. Mixed batches are refused by the prompt forward itself.
pub(crate) fn refusal(op: crate::tuners::registry::Operation, cfg: &crate::tuners::AdapterConfig) -> Option<PeftError> {
    use crate::tuners::registry::Operation;
    match op {
        Operation::SeveralActive => Some(PeftError::invalid_arg("adapterName", "prompt-learning models have exactly one active adapter")),
        Operation::Merge => Some(PeftError::InvalidState(format!("{} adapters cannot be merged: they do not change the base model's weights", cfg.peft_type()))),
        Operation::Status => Some(PeftError::InvalidState(format!(
            "layer and model status are not available for prompt-learning adapters ({}): they do not change the model's layers (HF's get_layer_status() refuses them too)",
            cfg.peft_type()
        ))),
        Operation::SetRequiresGrad => Some(PeftError::InvalidState(format!("Setting `requires_grad` is not supported for prompt learning methods like {}.", cfg.peft_type()))),
        Operation::MixedBatch => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: Value) -> PromptLearningConfig {
        PromptLearningConfig::from_json(&v, None).unwrap()
    }

    fn llama_dims() -> ModelDims {
        ModelDims { num_layers: 2, hidden_size: 64, num_attention_heads: 4, num_key_value_heads: Some(2), head_dim: 16, vocab_size: 256 }
    }

    #[test]
    fn prepare_fills_derived_fields_like_hf() {
        let mut p = cfg(json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 5, "task_type": "CAUSAL_LM"}));
        p.prepare(&llama_dims());
        assert_eq!((p.token_dim, p.num_attention_heads, p.num_layers, p.encoder_hidden_size, p.num_transformer_submodules), (Some(32), Some(2), Some(2), Some(32), Some(1)));
        assert_eq!(p.table_dim(), 128);
        let mut t = cfg(json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "task_type": "SEQ_2_SEQ_LM"}));
        t.prepare(&llama_dims());
        assert_eq!((t.token_dim, t.num_attention_heads, t.num_transformer_submodules), (Some(64), Some(4), Some(2)));
        assert_eq!(t.total_virtual_tokens(), 8);
    }

    #[test]
    fn bad_configs_name_the_field() {
        for (v, field) in [
            (json!({"peft_type": "PROMPT_TUNING"}), "num_virtual_tokens"),
            (json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 1_000_000_000u64}), "num_virtual_tokens"),
            (json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 0}), "num_virtual_tokens"),
            (json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "prompt_tuning_init": "TEXT"}), "tokenizer_name_or_path"),
            (json!({"peft_type": "P_TUNING", "num_virtual_tokens": 4, "encoder_reparameterization_type": "GRU"}), "encoder_reparameterization_type"),
            (json!({"peft_type": "LORA", "num_virtual_tokens": 4}), "peft_type"),
            (json!({"peft_type": "MULTITASK_PROMPT_TUNING", "num_virtual_tokens": 4, "prompt_tuning_init": "EXACT_SOURCE_TASK"}), "prompt_tuning_init_state_dict_path"),
        ] {
            let e = PromptLearningConfig::from_json(&v, None).unwrap_err();
            assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn lstm_and_mlp_heads_are_differentiable() {
        for kind in ["MLP", "LSTM"] {
            let mut c = cfg(json!({"peft_type": "P_TUNING", "num_virtual_tokens": 3, "encoder_reparameterization_type": kind, "encoder_hidden_size": 5}));
            c.prepare(&ModelDims { num_layers: 1, hidden_size: 6, num_attention_heads: 2, num_key_value_heads: None, head_dim: 3, vocab_size: 10 });
            let enc = PromptEncoder::new(&c, PromptInit::Random, 1, &Device::Cpu).unwrap();
            let t = enc.table(true, None).unwrap();
            assert_eq!(t.dims(), &[3, 6]);
            let grads = t.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in enc.vars() {
                let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{kind}: no gradient for {name}"));
                let n = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(n > 0.0, "{kind}: zero gradient for {name}");
            }
        }
    }

    #[test]
    fn lstm_matches_a_hand_computed_step() {
        // One token, hidden 1, input 1: h = o * tanh(i * g) with c0 = 0.
        let v = |x: f32, shape: &[usize]| Var::from_tensor(&Tensor::full(x, shape, &Device::Cpu).unwrap()).unwrap();
        let d = LstmDirection { w_ih: v(0.5, &[4, 1]), w_hh: v(0.0, &[4, 1]), b_ih: v(0.1, &[4]), b_hh: v(0.0, &[4]) };
        let x = Tensor::new(&[[2.0f32]], &Device::Cpu).unwrap();
        let h = lstm_direction(&x, &d, false).unwrap().to_vec2::<f32>().unwrap()[0][0];
        let z = 0.5 * 2.0 + 0.1f32;
        let s = 1.0 / (1.0 + (-z).exp());
        let expect = s * (s * z.tanh()).tanh();
        assert!((h - expect).abs() < 1e-6, "{h} vs {expect}");
    }

    #[test]
    fn text_init_repeats_or_truncates() {
        assert_eq!(text_init_ids(&[4, 5], 5).unwrap(), vec![4, 5, 4, 5, 4]);
        assert_eq!(text_init_ids(&[4, 5, 6], 2).unwrap(), vec![4, 5]);
        assert!(text_init_ids(&[], 2).is_err());
    }
}
