//! `LoKrConfig`: HF PEFT 0.21's LoKr config (a `LycorisConfig` subclass). Each targeted linear
//! layer gets `ΔW = (w1 ⊗ w2) · alpha / r` (Kronecker product; see [`super::layer`]), saved as
//! `<module>.lokr_w1` or `.lokr_w1_a` + `.lokr_w1_b`, and `.lokr_w2` or `.lokr_w2_a` +
//! `.lokr_w2_b` (no `.weight`).

use crate::error::Result;
use crate::targeting::{targets_from_json, TargetModules};
use crate::tuners::config::RawConfig;
use crate::tuners::lora::MAX_RANK;
use serde_json::{json, Map, Number, Value};
use std::path::Path;

/// HF PEFT 0.21 defaults of every `LoKrConfig` field, as written to adapter_config.json.
pub fn hf_lokr_defaults() -> Map<String, Value> {
    match json!({
        "alpha": 8, "alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": null,
        "decompose_both": false, "decompose_factor": -1, "exclude_modules": null, "inference_mode": false,
        "init_weights": true, "layers_pattern": null, "layers_to_transform": null, "module_dropout": 0.0,
        "modules_to_save": null, "peft_type": "LOKR", "peft_version": "0.21.0", "r": 8, "rank_dropout": 0.0,
        "rank_dropout_scale": false, "rank_pattern": {}, "revision": null, "target_modules": null,
        "task_type": null, "use_effective_conv2d": false
    }) {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

/// HF's `init_weights` of `LoKrConfig` (`true`, `false` or `"lycoris"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LokrInit {
    /// `true` (HF's default): `lokr_w1` (or `lokr_w1_a`) zero, so `ΔW = 0`; the rest
    /// kaiming-uniform(a=√5).
    Zero,
    /// `"lycoris"` (LyCORIS's own init): `lokr_w2` (or `lokr_w2_b`) zero, the rest kaiming-uniform.
    Lycoris,
    /// `false`: every factor kaiming-uniform (not a no-op; for tests).
    Random,
}

/// HF PEFT's `LoKrConfig`. See the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct LokrConfig {
    pub r: usize,
    pub alpha: f64,
    /// Training only: each output row of `ΔW` is kept with probability `1 - rank_dropout`
    /// (divided by the kept fraction when `rank_dropout_scale`).
    pub rank_dropout: f64,
    /// Training only: the whole adapter is skipped for a forward with this probability.
    pub module_dropout: f64,
    /// Conv layers only in HF; no effect on linear layers (kept for the file).
    pub use_effective_conv2d: bool,
    /// Also decompose the left factor `w1` into `w1_a w1_b` when `r < max(dims of w1) / 2`.
    pub decompose_both: bool,
    /// HF `factorization()`'s `factor`: `-1` splits each dimension near its square root.
    pub decompose_factor: i64,
    /// Divide the rank-dropout mask by its mean (HF `rank_dropout_scale`).
    pub rank_dropout_scale: bool,
    pub init_weights: LokrInit,
    pub target_modules: TargetModules,
    pub exclude_modules: Option<TargetModules>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Option<Vec<String>>,
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub modules_to_save: Option<Vec<String>>,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    pub inference_mode: bool,
    raw: Map<String, Value>,
    unknown: Vec<String>,
}

impl LokrConfig {
    /// Build from an adapter_config.json object. Errors: `InvalidAdapterConfig` naming the field
    /// (wrong types, `r` outside 1..=2^16, dropouts outside [0, 1), `init_weights` other than
    /// `true` / `false` / `"lycoris"`, invalid pattern regexes, `layers_pattern` without
    /// `layers_to_transform`).
    pub fn from_json(v: &Value, path: Option<&Path>) -> Result<Self> {
        let rc = RawConfig::parse(v, path, hf_lokr_defaults(), &["LOKR"], "LoKrConfig")?;
        let raw = &rc.raw;
        let r = raw["r"].as_u64().filter(|r| *r >= 1 && *r as usize <= MAX_RANK)
            .ok_or_else(|| rc.bad(format!("`r` should be a positive integer value (at most {MAX_RANK}), found {}", raw["r"])))? as usize;
        let alpha = raw["alpha"].as_f64().ok_or_else(|| rc.bad(format!("`alpha` must be a number, found {}", raw["alpha"])))?;
        let prob = |k: &str| -> Result<f64> {
            raw[k].as_f64().filter(|p| (0.0..1.0).contains(p)).ok_or_else(|| rc.bad(format!("`{k}` must be a number in [0, 1), found {}", raw[k])))
        };
        let decompose_factor = raw["decompose_factor"].as_i64().ok_or_else(|| rc.bad(format!("`decompose_factor` must be an integer, found {}", raw["decompose_factor"])))?;
        let init_weights = match &raw["init_weights"] {
            Value::Bool(true) => LokrInit::Zero,
            Value::Bool(false) => LokrInit::Random,
            Value::String(s) if s == "lycoris" => LokrInit::Lycoris,
            other => return Err(rc.bad(format!("`init_weights` must be true, false or \"lycoris\", found {other}"))),
        };
        let target_modules = targets_from_json(&raw["target_modules"], "target_modules")
            .map_err(|m| rc.bad(m))?
            .ok_or_else(|| rc.bad("`target_modules` must be given (a list of module names, a regex string or \"all-linear\")".into()))?;
        let exclude_modules = targets_from_json(&raw["exclude_modules"], "exclude_modules").map_err(|m| rc.bad(m))?;
        let (layers_to_transform, layers_pattern) = rc.layers()?;
        Ok(LokrConfig {
            r,
            alpha,
            rank_dropout: prob("rank_dropout")?,
            module_dropout: prob("module_dropout")?,
            use_effective_conv2d: rc.bool("use_effective_conv2d")?,
            decompose_both: rc.bool("decompose_both")?,
            decompose_factor,
            rank_dropout_scale: rc.bool("rank_dropout_scale")?,
            init_weights,
            target_modules,
            exclude_modules,
            layers_to_transform,
            layers_pattern,
            rank_pattern: rc.rank_pattern(MAX_RANK)?,
            alpha_pattern: rc.alpha_pattern()?,
            modules_to_save: rc.modules_to_save()?,
            task_type: rc.opt_str("task_type"),
            base_model_name_or_path: rc.opt_str("base_model_name_or_path"),
            inference_mode: rc.bool("inference_mode")?,
            unknown: rc.unknown.clone(),
            raw: rc.raw.clone(),
        })
    }

    /// The module-targeting rule of this config.
    pub fn rule(&self) -> crate::targeting::Rule<'_> {
        crate::targeting::Rule {
            targets: &self.target_modules,
            exclude: self.exclude_modules.as_ref(),
            layers: self.layers_to_transform.as_deref(),
            layers_pattern: self.layers_pattern.as_deref(),
            saved: self.modules_to_save.as_deref().unwrap_or(&[]),
        }
    }

    /// Fields of the source JSON that HF's LoKrConfig does not have.
    pub fn unknown_fields(&self) -> &[String] {
        &self.unknown
    }

    /// Effective rank of module `name` (HF `rank_pattern` lookup via `get_pattern_key`, else `r`).
    pub fn rank_for(&self, name: &str) -> usize {
        crate::targeting::pattern_lookup(&self.rank_pattern, name).unwrap_or(self.r)
    }

    /// Effective alpha of module `name` (`alpha_pattern`, else `alpha`).
    pub fn alpha_for(&self, name: &str) -> f64 {
        crate::targeting::pattern_lookup(&self.alpha_pattern, name).unwrap_or(self.alpha)
    }

    /// The config as HF's adapter_config.json object.
    pub fn to_json(&self) -> Value {
        let mut m = self.raw.clone();
        // Python float fields: HF writes `0.0`, never `0` (JSON from JS loses the distinction).
        for (k, p) in [("rank_dropout", self.rank_dropout), ("module_dropout", self.module_dropout)] {
            m.insert(k.into(), Number::from_f64(p).map(Value::Number).unwrap_or(Value::Null));
        }
        crate::tuners::config::layer_config_json(m, self, &self.exclude_modules)
    }
}

crate::tuners::config::impl_tuner_config!(LokrConfig, "LOKR");
