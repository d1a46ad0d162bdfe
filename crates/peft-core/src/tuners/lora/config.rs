//! `LoraConfig`: the fields of HF PEFT 0.21's `LoraConfig`, read from and written to
//! `adapter_config.json` with HF's names and values.
//!
//! Fields this crate acts on are typed; every other field is kept verbatim (unknown fields of a
//! loaded file are preserved and reported by [`crate::tuners::config::PeftCommon::unknown_fields`]).

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
    pub lora_dropout: f64,
    pub fan_in_fan_out: bool,
    /// `"none"`, `"all"` or `"lora_only"`.
    pub bias: String,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub init_lora_weights: InitLoraWeights,
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    /// The fields every layer tuner's config has (targeting, `task_type`, ...; `cfg.field`
    /// reads them through `Deref`).
    pub common: LayerCommon,
}

crate::tuners::config::impl_deref_common!(LoraConfig => LayerCommon);

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
    crate::tuners::config::json_object(v)
}

use crate::tuners::config::{LayerCommon, LayerFields};

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
        let (lora_alpha, lora_dropout) = (rc.number("lora_alpha")?, rc.prob("lora_dropout")?);
        let common = LayerCommon::parse(&rc, LayerFields::ALL)?;
        let (fan_in_fan_out, use_rslora, use_dora) = (rc.bool("fan_in_fan_out")?, rc.bool("use_rslora")?, rc.bool("use_dora")?);
        let bias = rc.one_of("bias", &["none", "all", "lora_only"])?;
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
        let rank_pattern = rc.rank_pattern(MAX_RANK)?;
        let alpha_pattern = rc.alpha_pattern()?;
        trainable_token_indices_of(&raw["trainable_token_indices"]).map_err(bad)?;
        Ok(LoraConfig {
            r,
            lora_alpha,
            lora_dropout,
            fan_in_fan_out,
            bias,
            use_rslora,
            use_dora,
            init_lora_weights,
            rank_pattern,
            alpha_pattern,
            common,
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

    /// The config as HF's adapter_config.json object (all fields, sorted keys when serialized).
    pub fn to_json(&self) -> Value {
        self.common.to_json_with(|m| {
            m.insert("fan_in_fan_out".into(), Value::Bool(self.fan_in_fan_out));
            m.insert("bias".into(), Value::String(self.bias.clone()));
            // A Python float field: HF writes `0.0`, never `0` (JSON from JS loses the distinction).
            m.insert("lora_dropout".into(), serde_json::Number::from_f64(self.lora_dropout).map(Value::Number).unwrap_or(Value::Null));
        })
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
            // HF `LoraConfig.__post_init__`; read by the shared `LayerCommon` parser.
            (json!({"peft_type": "LORA", "target_modules": ["q"], "layers_pattern": "layers"}), "`layers_to_transform`"),
            (json!({"peft_type": "LORA", "target_modules": ["q"], "task_type": 3}), "`task_type`"),
            (json!({"peft_type": "LORA", "target_modules": ["q"], "modules_to_save": [1]}), "`modules_to_save`"),
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
