//! `LoraConfig`: the fields of HF PEFT 0.21's `LoraConfig`, read from and written to
//! `adapter_config.json` with HF's names and values.
//!
//! Fields this crate acts on are typed; every other field is kept verbatim (unknown fields of a
//! loaded file are preserved and reported by [`LoraConfig::unknown_fields`]).

use crate::error::{PeftError, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

pub use crate::targeting::TargetModules;

/// HF `init_lora_weights`.
#[derive(Debug, Clone, PartialEq)]
pub enum InitLoraWeights {
    /// `true`: `lora_A` Kaiming-uniform (a = √5), `lora_B` zeros (the adapter starts as a no-op).
    Default,
    /// `"gaussian"`: `lora_A` ~ N(0, 1/r), `lora_B` zeros.
    Gaussian,
    /// `false`: both `lora_A` and `lora_B` Kaiming-uniform (a = √5), like `nn.Linear`'s default
    /// init: the adapter is not a no-op (used for tests).
    Random,
    /// `"pissa"` / `"pissa_niter_<n>"` (Meng et al. 2024, "PiSSA: Principal Singular Values and
    /// Singular Vectors Adaptation"; HF `pissa_init`): with `W = U S Vᵀ` (f32 SVD of the base
    /// weight `[out, in]`), `A = diag(√(S_r/s)) V_rᵀ`, `B = U_r diag(√(S_r/s))` and the base weight
    /// becomes the residual `W − s·B A`. `pissa_niter_<n>` (HF: randomized SVD with n subspace
    /// iterations) uses the exact SVD here, which the randomized one approximates.
    Pissa(Option<usize>),
    /// `"olora"` (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation"; HF `olora_init`):
    /// `W = Q R` (f32 QR), `A = R[:r]`, `B = Q[:, :r]`, base weight `W − s·B A`.
    Olora,
}

/// HF PEFT's `LoraConfig` (peft 0.21.0). See the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: TargetModules,
    pub exclude_modules: Option<TargetModules>,
    pub lora_dropout: f64,
    pub fan_in_fan_out: bool,
    /// `"none"`, `"all"` or `"lora_only"`.
    pub bias: String,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub init_lora_weights: InitLoraWeights,
    pub modules_to_save: Option<Vec<String>>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Option<Vec<String>>,
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    pub revision: Option<String>,
    pub inference_mode: bool,
    /// The complete JSON object, HF field names, as it will be written (kept in sync by
    /// [`LoraConfig::to_json`]); holds fields this crate does not act on.
    raw: Map<String, Value>,
    unknown: Vec<String>,
}

/// Largest accepted rank; larger values are refused before anything is allocated.
pub const MAX_RANK: usize = 1 << 16;

/// HF PEFT 0.21 defaults for every `LoraConfig` field, as written to adapter_config.json.
pub fn hf_lora_defaults() -> Map<String, Value> {
    let v = json!({
        "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null, "auto_mapping": null,
        "base_model_name_or_path": null, "bias": "none", "corda_config": null, "ensure_weight_tying": false,
        "eva_config": null, "exclude_modules": null, "fan_in_fan_out": false, "inference_mode": false,
        "init_lora_weights": true, "kasa_config": null, "layer_replication": null, "layers_pattern": null,
        "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 8, "lora_bias": false,
        "lora_dropout": 0.0, "lora_ga_config": null, "megatron_config": null, "megatron_core": "megatron.core",
        "modules_to_save": null, "monteclora_config": null, "peft_type": "LORA", "peft_version": "0.21.0",
        "qalora_group_size": 16, "r": 8, "rank_pattern": {}, "revision": null, "target_modules": null,
        "target_parameters": null, "task_type": null, "trainable_token_indices": null, "use_bdlora": null,
        "use_dora": false, "use_qalora": false, "use_rslora": false, "velora_config": null
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

use crate::targeting::targets_from_json;

impl LoraConfig {
    /// Build from an adapter_config.json object (HF snake_case). Missing fields take HF's
    /// defaults. `path` names the file in errors.
    ///
    /// Errors: `InvalidAdapterConfig` for a wrong `peft_type`, `r` that is not a positive integer
    /// (or above [`MAX_RANK`]), a non-numeric `lora_alpha`, malformed `target_modules`, an
    /// invalid regex and an unknown `bias` value.
    pub fn from_json(v: &Value, path: Option<&Path>) -> Result<Self> {
        let rc = crate::tuners::config::RawConfig::parse(v, path, hf_lora_defaults(), &["LORA"], "a LoraConfig")?;
        let bad = |msg: String| rc.bad(msg);
        let raw = &rc.raw;
        let r = match &raw["r"] {
            Value::Number(n) if n.as_u64().is_some() => n.as_u64().unwrap() as usize,
            other => return Err(bad(format!("`r` must be a positive integer, found {other}"))),
        };
        if r == 0 || r > MAX_RANK {
            return Err(bad(format!("`r` must be between 1 and {MAX_RANK}, found {r}")));
        }
        let lora_alpha = raw["lora_alpha"]
            .as_f64()
            .ok_or_else(|| bad(format!("`lora_alpha` must be a number, found {}", raw["lora_alpha"])))?;
        let lora_dropout = raw["lora_dropout"]
            .as_f64()
            .filter(|p| (0.0..1.0).contains(p))
            .ok_or_else(|| bad(format!("`lora_dropout` must be a number in [0, 1), found {}", raw["lora_dropout"])))?;
        let target_modules = targets_from_json(&raw["target_modules"], "target_modules")
            .map_err(bad)?
            .ok_or_else(|| bad("`target_modules` must be given (a list of module names, a regex string or \"all-linear\")".into()))?;
        let exclude_modules = targets_from_json(&raw["exclude_modules"], "exclude_modules").map_err(bad)?;
        let get_bool = |k: &str| -> Result<bool> {
            raw[k].as_bool().ok_or_else(|| bad(format!("`{k}` must be a boolean, found {}", raw[k])))
        };
        let fan_in_fan_out = get_bool("fan_in_fan_out")?;
        let use_rslora = get_bool("use_rslora")?;
        let use_dora = get_bool("use_dora")?;
        let inference_mode = get_bool("inference_mode")?;
        let bias = raw["bias"].as_str().unwrap_or("").to_string();
        if !["none", "all", "lora_only"].contains(&bias.as_str()) {
            return Err(bad(format!("`bias` must be \"none\", \"all\" or \"lora_only\", found {}", raw["bias"])));
        }
        let init_lora_weights = match &raw["init_lora_weights"] {
            Value::Bool(true) => InitLoraWeights::Default,
            Value::Bool(false) => InitLoraWeights::Random,
            Value::String(s) if s == "gaussian" => InitLoraWeights::Gaussian,
            Value::String(s) if s == "pissa" => InitLoraWeights::Pissa(None),
            Value::String(s) if s == "olora" => InitLoraWeights::Olora,
            Value::String(s) if s.starts_with("pissa_niter_") => match s["pissa_niter_".len()..].parse::<usize>() {
                Ok(n) if n >= 1 => InitLoraWeights::Pissa(Some(n)),
                _ => return Err(bad(format!("`init_lora_weights` {s:?}: the number of iterations after `pissa_niter_` must be a positive integer"))),
            },
            Value::String(s) if ["loftq", "eva", "corda", "orthogonal"].contains(&s.as_str()) => {
                return Err(bad(format!("`init_lora_weights` {s:?} is not supported here (supported: true, false, \"gaussian\", \"pissa\", \"pissa_niter_<n>\", \"olora\")")))
            }
            other => return Err(bad(format!("`init_lora_weights` must be true, false, \"gaussian\", \"pissa\", \"pissa_niter_<n>\" or \"olora\", found {other}"))),
        };
        let str_list = |k: &str| -> Result<Option<Vec<String>>> {
            match &raw[k] {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(vec![s.clone()])),
                Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map(String::from).ok_or_else(|| bad(format!("`{k}` must hold strings, found {x}"))))
                    .collect::<Result<Vec<_>>>()
                    .map(Some),
                other => Err(bad(format!("`{k}` must be a list of strings, found {other}"))),
            }
        };
        let modules_to_save = str_list("modules_to_save")?;
        let layers_pattern = str_list("layers_pattern")?;
        let layers_to_transform = match &raw["layers_to_transform"] {
            Value::Null => None,
            Value::Number(n) => Some(vec![n.as_u64().ok_or_else(|| bad("`layers_to_transform` must be non-negative".into()))? as usize]),
            Value::Array(a) => Some(
                a.iter()
                    .map(|x| x.as_u64().map(|n| n as usize).ok_or_else(|| bad(format!("`layers_to_transform` must hold integers, found {x}"))))
                    .collect::<Result<Vec<_>>>()?,
            ),
            other => return Err(bad(format!("`layers_to_transform` must be an integer or a list, found {other}"))),
        };
        let rank_pattern = rc.rank_pattern(MAX_RANK)?;
        let alpha_pattern = rc.alpha_pattern()?;
        let opt_str = |k: &str| raw[k].as_str().map(String::from);
        trainable_token_indices_of(&raw["trainable_token_indices"]).map_err(bad)?;
        Ok(LoraConfig {
            r,
            lora_alpha,
            target_modules,
            exclude_modules,
            lora_dropout,
            fan_in_fan_out,
            bias,
            use_rslora,
            use_dora,
            init_lora_weights,
            modules_to_save,
            layers_to_transform,
            layers_pattern,
            rank_pattern,
            alpha_pattern,
            task_type: opt_str("task_type"),
            base_model_name_or_path: opt_str("base_model_name_or_path"),
            revision: opt_str("revision"),
            inference_mode,
            unknown: rc.unknown.clone(),
            raw: rc.raw.clone(),
        })
    }

    /// `trainable_token_indices` (HF: a list of token ids for the input embedding, or a dict of
    /// module name → token ids): `None` when unset; `Some` pairs of `(module key, ids)` where an
    /// empty key means the input embedding. See [`crate::tuners::trainable_tokens`].
    pub fn trainable_token_indices(&self) -> Option<Vec<(String, Vec<i64>)>> {
        trainable_token_indices_of(self.raw.get("trainable_token_indices").unwrap_or(&Value::Null)).ok().flatten()
    }

    /// Parse an adapter_config.json file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| PeftError::InvalidAdapterConfig {
            path: Some(path.to_path_buf()),
            msg: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(&v, Some(path))
    }

    /// The module-targeting rule of this config (target/exclude modules, the layer selection,
    /// and `modules_to_save`, which HF never adapts).
    pub fn rule(&self) -> crate::targeting::Rule<'_> {
        crate::targeting::Rule {
            targets: &self.target_modules,
            exclude: self.exclude_modules.as_ref(),
            layers: self.layers_to_transform.as_deref(),
            layers_pattern: self.layers_pattern.as_deref(),
            saved: self.modules_to_save.as_deref().unwrap_or(&[]),
        }
    }

    /// Fields of the source JSON that HF PEFT 0.21's LoraConfig does not have (kept, not acted on).
    pub fn unknown_fields(&self) -> &[String] {
        &self.unknown
    }

    /// The config as HF's adapter_config.json object (all fields, sorted keys when serialized).
    pub fn to_json(&self) -> Value {
        let mut m = self.raw.clone();
        m.insert("fan_in_fan_out".into(), Value::Bool(self.fan_in_fan_out));
        m.insert("bias".into(), Value::String(self.bias.clone()));
        // A Python float field: HF writes `0.0`, never `0` (JSON from JS loses the distinction).
        m.insert("lora_dropout".into(), serde_json::Number::from_f64(self.lora_dropout).map(Value::Number).unwrap_or(Value::Null));
        crate::tuners::config::layer_config_json(m, self, &self.exclude_modules)
    }

    /// `adapter_config.json` text exactly as HF writes it (`json.dumps(indent=2, sort_keys=True)`).
    pub fn to_json_string(&self) -> String {
        crate::io::python_json_dumps(&self.to_json())
    }

    /// Effective rank of the module `name` (HF `rank_pattern` lookup, else `r`).
    pub fn rank_for(&self, name: &str) -> usize {
        crate::targeting::pattern_lookup(&self.rank_pattern, name).unwrap_or(self.r)
    }

    /// Effective alpha of the module `name` (HF `alpha_pattern` lookup, else `lora_alpha`).
    pub fn alpha_for(&self, name: &str) -> f64 {
        crate::targeting::pattern_lookup(&self.alpha_pattern, name).unwrap_or(self.lora_alpha)
    }

    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA (Kalajdzievski 2023).
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

crate::tuners::config::impl_tuner_config!(LoraConfig, "LORA");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_fields_are_written_as_python_floats() {
        let c = LoraConfig::from_json(&json!({"peft_type": "LORA", "target_modules": ["q_proj"], "lora_dropout": 0}), None).unwrap();
        let text = c.to_json_string();
        assert!(text.contains("\"lora_dropout\": 0.0,"), "{text}");
        assert!(text.contains("\"lora_alpha\": 8,"), "{text}");
    }

    #[test]
    fn invalid_configs_are_refused_with_the_field_named() {
        for (v, field) in [
            (json!({"peft_type": "LORA", "target_modules": ["q"], "r": 0}), "`r`"),
            (json!({"peft_type": "LORA", "target_modules": ["q"], "r": 1_000_000_000u64}), "`r`"),
            (json!({"peft_type": "LORA", "target_modules": ["q"], "lora_alpha": "x"}), "`lora_alpha`"),
            (json!({"peft_type": "LORA", "target_modules": 3}), "`target_modules`"),
            (json!({"peft_type": "LORA", "target_modules": "("}), "`target_modules`"),
            (json!({"peft_type": "IA3", "target_modules": ["q"]}), "`peft_type`"),
        ] {
            let e = LoraConfig::from_json(&v, None).unwrap_err();
            assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
            assert!(e.to_string().contains(field), "{e}");
        }
    }
}

/// `trainable_token_indices` as `(module key, ids)` pairs (`""` for the list form).
fn trainable_token_indices_of(v: &Value) -> std::result::Result<Option<Vec<(String, Vec<i64>)>>, String> {
    use crate::tuners::trainable_tokens::config::parse_token_indices;
    let err = |m: String| m.replace("`token_indices`", "`trainable_token_indices`");
    match v {
        Value::Null => Ok(None),
        Value::Array(_) => Ok(Some(vec![(String::new(), parse_token_indices(v).map_err(err)?)])),
        Value::Object(o) => o
            .iter()
            .map(|(k, x)| Ok((k.clone(), parse_token_indices(x).map_err(|m| err(m).replace("(token ids)", &format!("(token ids) for `{k}`")))?)))
            .collect::<std::result::Result<Vec<_>, String>>()
            .map(Some),
        other => Err(format!("`trainable_token_indices` must be a list of token ids or an object of module name -> token ids, found {other}")),
    }
}
