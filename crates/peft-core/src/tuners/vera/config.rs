//! `VeraConfig`: HF PEFT 0.21's VeRA config (`peft.tuners.vera.config.VeraConfig`; Kopiczko et
//! al. 2024, "VeRA: Vector-based Random Matrix Adaptation"). Each targeted linear layer gets two
//! trainable vectors, `vera_lambda_d` `[r]` and `vera_lambda_b` `[out]`, over one pair of frozen
//! random projections shared by the whole model (`vera_A` `[r, max_in]`, `vera_B` `[max_out, r]`,
//! saved as `base_model.vera_A` / `base_model.vera_B` when `save_projection`). See
//! [`super::layer`] for the forward and `ΔW`.

use super::layer::Projections;
use crate::error::Result;
use crate::tuners::config::{LayerCommon, LayerFields, RawConfig};
use crate::tuners::lora::MAX_RANK;
use serde_json::{json, Map, Number, Value};
use std::path::Path;

/// HF PEFT 0.21 defaults of every `VeraConfig` field, as written to adapter_config.json.
pub fn hf_vera_defaults() -> Map<String, Value> {
    crate::tuners::config::json_object(json!({
        "auto_mapping": null, "base_model_name_or_path": null, "bias": "none", "d_initial": 0.1,
        "fan_in_fan_out": false, "inference_mode": false, "init_weights": true, "layers_pattern": null,
        "layers_to_transform": null, "modules_to_save": null, "peft_type": "VERA", "peft_version": "0.21.0",
        "projection_prng_key": 0, "r": 256, "revision": null, "save_projection": true, "target_modules": null,
        "task_type": null, "vera_dropout": 0.0
    }))
}

/// HF PEFT's `VeraConfig`. See the module docs.
#[derive(Debug, Clone)]
pub struct VeraConfig {
    /// The rank: rows of `vera_A`, columns of `vera_B`, length of `vera_lambda_d` (HF default 256).
    pub r: usize,
    /// Seed of the projections' `torch.Generator` (kaiming-uniform `vera_A` then `vera_B`); all
    /// VeRA adapters of a model must share it (HF).
    pub projection_prng_key: i64,
    /// Save the projections in adapter_model.safetensors (`base_model.vera_A` / `vera_B`); when
    /// false they are regenerated from `projection_prng_key` on load.
    pub save_projection: bool,
    /// Dropout on the adapter's input while training.
    pub vera_dropout: f64,
    /// The initial value of every `vera_lambda_d` entry (`init_weights=true`).
    pub d_initial: f64,
    /// Base weight stored `[in, out]` (GPT-2 `Conv1D`); HF sets it per target layer type.
    pub fan_in_fan_out: bool,
    /// `"none"`, `"all"` or `"vera_only"`.
    pub bias: String,
    /// `true`: `lambda_b = 0`, `lambda_d = d_initial` (a no-op); `false`: `lambda_b = 1`,
    /// `lambda_d ~ N(0, 1)`.
    pub init_weights: bool,
    /// The fields every layer tuner's config has (`VeraConfig` has no `exclude_modules`).
    pub common: LayerCommon,
    /// Projections read from an adapter file, used by the injection that loads it (never
    /// written to JSON; cleared once the adapter is injected).
    pub(crate) loaded_projections: Option<Projections>,
}

crate::tuners::config::impl_deref_common!(VeraConfig => LayerCommon; eq_by_json);

impl VeraConfig {
    /// Build from an adapter_config.json object (missing fields take HF's defaults). Errors:
    /// `InvalidAdapterConfig` naming the field: wrong types, `r` outside 1..=2^16, `vera_dropout`
    /// outside [0, 1), `bias` other than `none` / `all` / `vera_only`, a `projection_prng_key`
    /// that is not an integer, `layers_pattern` without `layers_to_transform`.
    pub fn from_json(v: &Value, path: Option<&Path>) -> Result<Self> {
        let rc = RawConfig::parse(v, path, hf_vera_defaults(), &["VERA"], "a VeraConfig")?;
        let r = rc.rank("r", MAX_RANK)?;
        let vera_dropout = rc.prob("vera_dropout")?;
        let d_initial = rc.number("d_initial")?;
        let projection_prng_key = rc.int("projection_prng_key")?;
        let bias = rc.one_of("bias", &["none", "all", "vera_only"])?;
        let common = LayerCommon::parse(&rc, LayerFields { exclude_modules: false, layer_selection: true })?;
        Ok(VeraConfig {
            r,
            projection_prng_key,
            save_projection: rc.bool("save_projection")?,
            vera_dropout,
            d_initial,
            fan_in_fan_out: rc.bool("fan_in_fan_out")?,
            bias,
            init_weights: rc.bool("init_weights")?,
            common,
            loaded_projections: None,
        })
    }

    /// The config as HF's adapter_config.json object.
    pub fn to_json(&self) -> Value {
        self.common.to_json_with(|m| {
            // Python float fields: HF writes `0.0`, never `0` (JSON from JS loses the distinction).
            for (k, p) in [("vera_dropout", self.vera_dropout), ("d_initial", self.d_initial)] {
                m.insert(k.into(), Number::from_f64(p).map(Value::Number).unwrap_or(Value::Null));
            }
            m.insert("fan_in_fan_out".into(), Value::Bool(self.fan_in_fan_out));
        })
    }
}

crate::tuners::config::impl_tuner_config!(VeraConfig, "VERA");
