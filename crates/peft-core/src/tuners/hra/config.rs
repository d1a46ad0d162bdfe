//! `HRAConfig`: HF PEFT 0.21's HRA config (`peft.tuners.hra.config.HRAConfig`; Yuan et al. 2024,
//! "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection
//! Adaptation", arXiv:2405.17484). Each targeted linear layer (in → out) multiplies its weight
//! by a chain of `r` Householder reflections built from the columns of `hra_u` `[in, r]`; see
//! [`super::layer`] for the math.

use crate::error::Result;
use crate::tuners::config::{LayerCommon, LayerFields, RawConfig};
use serde_json::{json, Map, Value};
use std::path::Path;

/// HF PEFT 0.21 defaults of every `HRAConfig` field, as written to adapter_config.json.
pub fn hf_hra_defaults() -> Map<String, Value> {
    crate::tuners::config::json_object(json!({
        "apply_GS": false, "auto_mapping": null, "base_model_name_or_path": null, "bias": "none",
        "exclude_modules": null, "inference_mode": false, "init_weights": true, "layers_pattern": null,
        "layers_to_transform": null, "modules_to_save": null, "peft_type": "HRA", "peft_version": "0.21.0",
        "r": 8, "revision": null, "target_modules": null, "task_type": null
    }))
}

/// The largest `r` accepted (a layer's `hra_u` holds `in · r` values).
pub const MAX_HRA_R: usize = 1 << 16;

/// HF PEFT's `HRAConfig`. See the module docs.
#[derive(Debug, Clone)]
pub struct HraConfig {
    /// Reflections per layer (HF default 8). An even `r` lets `init_weights` start at the
    /// identity (each vector drawn twice); an odd one gets HF's warning and random vectors.
    pub r: usize,
    /// `apply_GS`: one reflection `I - 2 Q Qᵀ` of the Gram-Schmidt basis `Q` of `hra_u` instead
    /// of the product of `r` reflections.
    pub apply_gs: bool,
    /// `true` (HF's default): pairs of equal columns (the identity, for an even `r`); `false`:
    /// kaiming-uniform columns.
    pub init_weights: bool,
    /// `"none"`, `"all"` or `"hra_only"`.
    pub bias: String,
    /// The fields every layer tuner's config has.
    pub common: LayerCommon,
}

crate::tuners::config::impl_deref_common!(HraConfig => LayerCommon; eq_by_json);

impl HraConfig {
    /// Build from an adapter_config.json object (missing fields take HF's defaults).
    ///
    /// Errors: `InvalidAdapterConfig` naming the field: wrong JSON types; `r` not in
    /// `1..=65536` (HF's `update_layer`: "`r` should be a positive integer value"); `bias` other
    /// than `none` / `all` / `hra_only`; a missing `target_modules`; `layers_pattern` without
    /// `layers_to_transform` (HF's `__post_init__`).
    pub fn from_json(v: &Value, path: Option<&Path>) -> Result<Self> {
        let rc = RawConfig::parse(v, path, hf_hra_defaults(), &["HRA"], "an HRAConfig")?;
        let r = rc.field("r", |x| x.as_u64().filter(|n| *n >= 1 && *n as usize <= MAX_HRA_R).map(|n| n as usize), |x| {
            format!("`r` should be a positive integer value (at most {MAX_HRA_R}) but the value passed is {x}")
        })?;
        let bias = rc.one_of("bias", &["none", "all", "hra_only"])?;
        Ok(HraConfig { r, apply_gs: rc.bool("apply_GS")?, init_weights: rc.bool("init_weights")?, bias, common: LayerCommon::parse(&rc, LayerFields::ALL)? })
    }

    /// The config as HF's adapter_config.json object.
    pub fn to_json(&self) -> Value {
        self.common.to_json_with(|_| {})
    }
}

crate::tuners::config::impl_tuner_config!(HraConfig, "HRA");
