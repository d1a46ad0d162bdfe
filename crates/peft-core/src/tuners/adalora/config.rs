//! `AdaLoraConfig`: HF PEFT 0.21's AdaLoRA config (`peft.tuners.adalora.config.AdaLoraConfig`, a
//! `LoraConfig` subclass; Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient
//! Fine-Tuning").
//!
//! The fields AdaLoRA inherits from LoRA (`lora_alpha`, `lora_dropout`, `target_modules`,
//! `exclude_modules`, `bias`, `fan_in_fan_out`, `init_lora_weights`, the layer selection,
//! `modules_to_save`, ...) are parsed and checked by [`LoraConfig::from_json`]; this file adds
//! AdaLoRA's own: `init_r` (the rank every targeted layer starts with), `target_r` (the average
//! rank the budget shrinks to), the schedule `tinit` / `tfinal` / `deltaT` / `total_step`, the
//! EMA factors `beta1` / `beta2`, `orth_reg_weight` and `rank_pattern` (per layer, which of the
//! `init_r` triplets the allocator kept: `{"<module>.lora_E": [true, false, ...]}`). LoRA's `r`
//! is ignored, as in HF.

use crate::error::Result;
use crate::targeting::TargetModules;
use crate::tuners::config::{LayerCommon, LayerFields, RawConfig};
use crate::tuners::lora::{InitLoraWeights, LoraConfig, MAX_RANK};
use serde_json::{json, Map, Number, Value};
use std::path::Path;
use std::sync::Mutex;

/// The fields `AdaLoraConfig` adds to `LoraConfig`, with HF PEFT 0.21's defaults.
const ADALORA_FIELDS: [&str; 9] = ["target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step"];

/// HF PEFT 0.21 defaults of every `AdaLoraConfig` field, as written to adapter_config.json
/// (LoRA's, with `peft_type` `"ADALORA"`, `rank_pattern` `null` and AdaLoRA's own fields).
pub fn hf_adalora_defaults() -> Map<String, Value> {
    let mut m = crate::tuners::lora::config::hf_lora_defaults();
    for (k, v) in [
        ("peft_type", json!("ADALORA")),
        ("rank_pattern", Value::Null),
        ("target_r", json!(8)),
        ("init_r", json!(12)),
        ("tinit", json!(0)),
        ("tfinal", json!(0)),
        ("deltaT", json!(1)),
        ("beta1", json!(0.85)),
        ("beta2", json!(0.85)),
        ("orth_reg_weight", json!(0.5)),
        ("total_step", Value::Null),
    ] {
        m.insert(k.into(), v);
    }
    m
}

/// A rank pattern: per module (`"<module>.lora_E"`, HF's on-disk key), which triplets are kept.
pub type RankPattern = Vec<(String, Vec<bool>)>;

/// HF PEFT's `AdaLoraConfig`. See the module docs.
#[derive(Debug)]
pub struct AdaLoraConfig {
    /// The rank every targeted layer starts with (`lora_A` `[init_r, in]`, `lora_E` `[init_r, 1]`,
    /// `lora_B` `[out, init_r]`).
    pub init_r: usize,
    /// The average rank per layer at the end of the budget schedule (budget `target_r · layers`).
    pub target_r: usize,
    /// Steps of the initial warm-up (budget kept at `init_r · layers`, nothing masked).
    pub tinit: usize,
    /// Steps of the final fine-tuning (the last mask kept).
    pub tfinal: usize,
    /// Masking interval (steps) during the budgeting phase.
    pub delta_t: usize,
    /// EMA factor of the sensitivity `|p · ∇p|`.
    pub beta1: f64,
    /// EMA factor of the uncertainty `|I − Ī|`.
    pub beta2: f64,
    /// Weight of the orthogonal regularisation added to the loss.
    pub orth_reg_weight: f64,
    /// The number of training steps the schedule spans (required).
    pub total_step: usize,
    /// `scaling` of every layer (HF: `lora_alpha` if > 0, else the layer's rank).
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Base weight stored `[in, out]` (GPT-2 `Conv1D`); HF sets it per target layer type.
    pub fan_in_fan_out: bool,
    /// `"none"`, `"all"` or `"lora_only"`.
    pub bias: String,
    /// HF: any true value (`true`, `"gaussian"`, ...) gives `lora_E = 0`, `lora_A`, `lora_B` ~
    /// N(0, 0.02²); `false` gives N(0, 1) for all three.
    pub init_lora_weights: InitLoraWeights,
    /// The allocator's rank pattern (HF mutates `config.rank_pattern` in `update_and_allocate`;
    /// so does [`crate::PeftModel::update_and_allocate`] through this lock).
    rank_pattern: Mutex<Option<RankPattern>>,
    /// The fields every layer tuner's config has (targeting, `task_type`, ...; `cfg.field`
    /// reads them through `Deref`).
    pub common: LayerCommon,
}

crate::tuners::config::impl_deref_common!(AdaLoraConfig => LayerCommon; eq_by_json);

impl Clone for AdaLoraConfig {
    fn clone(&self) -> Self {
        AdaLoraConfig {
            init_r: self.init_r,
            target_r: self.target_r,
            tinit: self.tinit,
            tfinal: self.tfinal,
            delta_t: self.delta_t,
            beta1: self.beta1,
            beta2: self.beta2,
            orth_reg_weight: self.orth_reg_weight,
            total_step: self.total_step,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            fan_in_fan_out: self.fan_in_fan_out,
            bias: self.bias.clone(),
            init_lora_weights: self.init_lora_weights.clone(),
            rank_pattern: Mutex::new(self.rank_pattern()),
            common: self.common.clone(),
        }
    }
}

impl AdaLoraConfig {
    /// Build from an adapter_config.json object (missing fields take HF's defaults).
    ///
    /// Errors: `InvalidAdapterConfig` naming the field: LoRA's checks of the inherited fields
    /// (see [`LoraConfig::from_json`]), and HF `AdaLoraConfig.__post_init__`'s refusals with its
    /// messages: `use_dora` (`PeftType.ADALORA does not support DoRA.`), a non-empty
    /// `loftq_config`, `layers_to_transform` with a regex `target_modules`, `total_step` missing
    /// or ≤ 0, a negative `orth_reg_weight`, `tinit >= total_step - tfinal` (no budgeting
    /// phase); also (HF's `RankAllocator` asserts or fails later) `beta1` / `beta2` outside
    /// (0, 1), `deltaT` of 0, `init_r` / `target_r` / `tinit` / `tfinal` that are not
    /// non-negative integers, and a `rank_pattern` that is not an object of boolean lists.
    pub fn from_json(v: &Value, path: Option<&Path>) -> Result<Self> {
        let rc = RawConfig::parse(v, path, hf_adalora_defaults(), &["ADALORA"], "an AdaLoraConfig")?;
        let raw = &rc.raw;
        // The inherited fields, through LoRA's parser (AdaLoRA ignores `r` and has its own
        // `rank_pattern`).
        let mut as_lora = raw.clone();
        for k in ADALORA_FIELDS {
            as_lora.remove(k);
        }
        as_lora.insert("peft_type".into(), json!("LORA"));
        as_lora.insert("r".into(), json!(8));
        as_lora.insert("rank_pattern".into(), json!({}));
        let lora = LoraConfig::from_json(&Value::Object(as_lora), path)?;
        let common = LayerCommon::parse(&rc, LayerFields::ALL)?;
        if lora.use_dora {
            return Err(rc.bad("PeftType.ADALORA does not support DoRA. (`use_dora`)".into()));
        }
        if raw.get("loftq_config").is_some_and(|l| !l.is_null() && l != &json!({})) {
            return Err(rc.bad("PeftType.ADALORA does not support LOFTQ. (`loftq_config`)".into()));
        }
        if matches!(lora.common.target_modules, TargetModules::Regex(_)) && lora.layers_to_transform.is_some() {
            return Err(rc.bad("`layers_to_transform` cannot be used when `target_modules` is a str.".into()));
        }
        let (init_r, target_r) = (rc.uint("init_r", MAX_RANK)?, rc.uint("target_r", MAX_RANK)?);
        let (tinit, tfinal) = (rc.uint("tinit", usize::MAX >> 1)?, rc.uint("tfinal", usize::MAX >> 1)?);
        let delta_t = rc.field("deltaT", |x| x.as_u64().filter(|n| *n >= 1).map(|n| n as usize), |x| {
            format!("`deltaT` must be a positive integer (the masking interval in steps), found {x}")
        })?;
        let total_step = match raw["total_step"].as_i64() {
            Some(t) if t > 0 => t as usize,
            _ if raw["total_step"].is_null() || raw["total_step"].as_f64().is_some_and(|t| t <= 0.0) => {
                return Err(rc.bad("AdaLoRA does not work when `total_step` is None, supply a value > 0.".into()))
            }
            _ => return Err(rc.bad(format!("`total_step` must be a positive integer, found {}", raw["total_step"]))),
        };
        let unit = |k: &str| -> Result<f64> {
            rc.field(k, |x| x.as_f64().filter(|b| *b > 0.0 && *b < 1.0), |x| format!("`{k}` must be a number in (0, 1) (HF's RankAllocator asserts it), found {x}"))
        };
        let (beta1, beta2) = (unit("beta1")?, unit("beta2")?);
        let orth_reg_weight = rc.number("orth_reg_weight")?;
        if orth_reg_weight < 0.0 {
            return Err(rc.bad(format!("`orth_reg_weight` should be greater than or equal to 0, but the value passed is {}", py_float(orth_reg_weight))));
        }
        if tinit as i128 >= total_step as i128 - tfinal as i128 {
            return Err(rc.bad(format!(
                "The supplied schedule values don't allow for a budgeting phase. Decrease `tfinal`/`tinit` or increase `total_step`. (tinit={tinit}, tfinal={tfinal}, total_step={total_step})"
            )));
        }
        let rank_pattern = parse_rank_pattern(&raw["rank_pattern"]).map_err(|m| rc.bad(m))?;
        Ok(AdaLoraConfig {
            init_r,
            target_r,
            tinit,
            tfinal,
            delta_t,
            beta1,
            beta2,
            orth_reg_weight,
            total_step,
            lora_alpha: lora.lora_alpha,
            lora_dropout: lora.lora_dropout,
            fan_in_fan_out: lora.fan_in_fan_out,
            bias: lora.bias,
            init_lora_weights: lora.init_lora_weights,
            rank_pattern: Mutex::new(rank_pattern),
            common,
        })
    }

    /// Whether the file sets LoRA's `r` to another value than its default 8 (HF then warns that
    /// AdaLoRA ignores it).
    pub fn sets_lora_r(&self) -> bool {
        self.raw.get("r").and_then(|r| r.as_u64()) != Some(8)
    }

    /// The current rank pattern (`None` until the allocator first masks, or as loaded).
    pub fn rank_pattern(&self) -> Option<RankPattern> {
        self.rank_pattern.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Record the allocator's rank pattern (sorted by key, as HF's JSON writes it).
    pub(crate) fn set_rank_pattern(&self, mut p: Option<RankPattern>) {
        if let Some(p) = &mut p {
            p.sort_by(|a, b| a.0.cmp(&b.0));
        }
        *self.rank_pattern.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// The kept-triplet mask of module `m` in the rank pattern (`<m>.lora_E`), if any.
    pub fn mask_of(&self, m: &str) -> Option<Vec<bool>> {
        let key = format!("{m}.lora_E");
        self.rank_pattern()?.into_iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// The config as HF's adapter_config.json object.
    pub fn to_json(&self) -> Value {
        self.common.to_json_with(|m| {
            // Python float fields: HF writes `0.0`, never `0` (JSON from JS loses the distinction).
            for (k, p) in [("lora_dropout", self.lora_dropout), ("beta1", self.beta1), ("beta2", self.beta2), ("orth_reg_weight", self.orth_reg_weight)] {
                m.insert(k.into(), Number::from_f64(p).map(Value::Number).unwrap_or(Value::Null));
            }
            m.insert("fan_in_fan_out".into(), Value::Bool(self.fan_in_fan_out));
            m.insert("bias".into(), Value::String(self.bias.clone()));
            m.insert(
                "rank_pattern".into(),
                match self.rank_pattern() {
                    Some(p) => Value::Object(p.into_iter().map(|(k, v)| (k, Value::from(v))).collect()),
                    None => Value::Null,
                },
            );
        })
    }
}

/// Python's `repr` of a float (`-1.0`, `0.5`).
fn py_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// `rank_pattern`: `null` or `{key: [bool, ...]}` (HF's saved form).
fn parse_rank_pattern(v: &Value) -> std::result::Result<Option<RankPattern>, String> {
    match v {
        Value::Null => Ok(None),
        Value::Object(o) => {
            let mut out = Vec::with_capacity(o.len());
            for (k, x) in o {
                let bits = x
                    .as_array()
                    .and_then(|a| a.iter().map(|b| b.as_bool()).collect::<Option<Vec<bool>>>())
                    .ok_or_else(|| format!("`rank_pattern[{k:?}]` must be a list of booleans (the triplets the allocator kept), found {x}"))?;
                if bits.len() > MAX_RANK {
                    return Err(format!("`rank_pattern[{k:?}]` has {} entries (at most {MAX_RANK})", bits.len()));
                }
                out.push((k.clone(), bits));
            }
            out.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(Some(out))
        }
        other => Err(format!("`rank_pattern` must be an object of module key -> list of booleans, found {other}")),
    }
}

crate::tuners::config::impl_tuner_config!(AdaLoraConfig, "ADALORA");

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        json!({"peft_type": "ADALORA", "target_modules": ["q_proj"], "total_step": 10})
    }

    #[test]
    fn refusals_name_the_field() {
        for (patch, field) in [
            (json!({"total_step": null}), "`total_step`"),
            (json!({"total_step": 0}), "`total_step`"),
            (json!({"tinit": 5, "tfinal": 5}), "budgeting phase"),
            (json!({"use_dora": true}), "DoRA"),
            (json!({"orth_reg_weight": -1.0}), "`orth_reg_weight`"),
            (json!({"beta1": 1.0}), "`beta1`"),
            (json!({"deltaT": 0}), "`deltaT`"),
            (json!({"init_r": -1}), "`init_r`"),
            (json!({"rank_pattern": {"a.lora_E": [1]}}), "`rank_pattern"),
            (json!({"lora_dropout": 2.0}), "`lora_dropout`"),
            (json!({"target_modules": "q_proj", "layers_to_transform": [0]}), "`layers_to_transform`"),
        ] {
            let mut v = base();
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
            let e = AdaLoraConfig::from_json(&v, None).unwrap_err();
            assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn defaults_round_trip_with_python_floats() {
        let c = AdaLoraConfig::from_json(&json!({"peft_type": "ADALORA", "target_modules": ["q_proj"], "total_step": 10, "orth_reg_weight": 0}), None).unwrap();
        let text = crate::io::python_json_dumps(&c.to_json());
        assert!(text.contains("\"orth_reg_weight\": 0.0,"), "{text}");
        assert!(text.contains("\"rank_pattern\": null,"), "{text}");
        assert_eq!((c.init_r, c.target_r, c.delta_t), (12, 8, 1));
    }
}
