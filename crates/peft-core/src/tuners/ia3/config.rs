//! `IA3Config`: HF PEFT 0.21's (IA)³ config (Liu et al. 2022, "Few-Shot Parameter-Efficient
//! Fine-Tuning is Better and Cheaper than In-Context Learning"). Each targeted linear layer gets
//! a learned vector `ia3_l`: `[out, 1]` scaling the layer's output (bias included), or, for
//! `feedforward_modules`, `[1, in]` scaling its input. Saved as `<module>.ia3_l` (no `.weight`).

use crate::targeting::{targets_to_json, TargetModules};
use crate::error::Result;
use crate::tuners::config::{LayerCommon, LayerFields, RawConfig};
use serde_json::{json, Map, Value};
use std::path::Path;

/// HF PEFT 0.21 defaults of every `IA3Config` field, as written to adapter_config.json.
pub fn hf_ia3_defaults() -> Map<String, Value> {
    crate::tuners::config::json_object(json!({
        "auto_mapping": null, "base_model_name_or_path": null, "exclude_modules": null, "fan_in_fan_out": false,
        "feedforward_modules": null, "inference_mode": false, "init_ia3_weights": true, "modules_to_save": null,
        "peft_type": "IA3", "peft_version": "0.21.0", "revision": null, "target_modules": null, "task_type": null
    }))
}

/// HF PEFT's `IA3Config`. See the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Ia3Config {
    /// Modules whose input (not output) is scaled; must be among the targets.
    pub feedforward_modules: Option<TargetModules>,
    pub fan_in_fan_out: bool,
    /// `true`: vectors start at 1 (a no-op); `false`: N(0, 1) (for tests).
    pub init_ia3_weights: bool,
    /// The fields every layer tuner's config has (`IA3Config` has no layer selection).
    pub common: LayerCommon,
}

crate::tuners::config::impl_deref_common!(Ia3Config => LayerCommon);

impl Ia3Config {
    /// Build from an adapter_config.json object. Errors: `InvalidAdapterConfig` naming the
    /// field (wrong types, invalid regex, feedforward modules that are not targets).
    pub fn from_json(v: &Value, path: Option<&Path>) -> Result<Self> {
        let rc = RawConfig::parse(v, path, hf_ia3_defaults(), &["IA3"], "an IA3Config")?;
        let common = LayerCommon::parse(&rc, LayerFields { exclude_modules: true, layer_selection: false })?;
        let feedforward_modules = rc.targets("feedforward_modules")?;
        if let (Some(TargetModules::List(ff)), TargetModules::List(t)) = (&feedforward_modules, &common.target_modules) {
            if !ff.iter().all(|f| t.contains(f)) {
                return Err(rc.bad("`feedforward_modules` should be a subset of `target_modules`".into()));
            }
        }
        Ok(Ia3Config { feedforward_modules, fan_in_fan_out: rc.bool("fan_in_fan_out")?, init_ia3_weights: rc.bool("init_ia3_weights")?, common })
    }

    /// Is the module `name` (a target) a feed-forward module (input scaled)?
    pub fn is_feedforward(&self, name: &str) -> bool {
        self.feedforward_modules.as_ref().map(|f| crate::targeting::matches_target(f, name, false)).unwrap_or(false)
    }

    /// The config as HF's adapter_config.json object.
    pub fn to_json(&self) -> Value {
        self.common.to_json_with(|m| {
            m.insert("feedforward_modules".into(), targets_to_json(&self.feedforward_modules));
        })
    }
}

crate::tuners::config::impl_tuner_config!(Ia3Config, "IA3");

