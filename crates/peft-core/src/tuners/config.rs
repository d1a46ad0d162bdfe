//! `AdapterConfig`: any adapter config this crate can load, dispatched on HF's `peft_type`
//! through the tuner registry ([`super::registry`]).
//!
//! Each tuner's config type implements [`TunerConfig`] (HF's `PeftConfig` subclasses): the
//! fields every PEFT config has (`task_type`, `base_model_name_or_path`, `inference_mode`,
//! `modules_to_save`, the unknown fields of a loaded file) behind one set of accessors, and its
//! own fields on the concrete type. [`AdapterConfig`] owns one boxed `TunerConfig`; code that needs
//! a tuner's own fields asks for the concrete type with [`AdapterConfig::get`].

use super::ia3::Ia3Config;
use super::lora::{LoraConfig, TargetModules};
use super::prompt::PromptLearningConfig;
use crate::error::{PeftError, Result};
use serde_json::{Map, Value};
use std::any::Any;
use std::path::Path;

/// The contract of a tuner's config (HF `PeftConfig` / `PeftConfigMixin`).
///
/// Implementations keep every field of the source JSON (typed where the tuner acts on it,
/// verbatim otherwise) so that [`TunerConfig::to_json`] writes HF's adapter_config.json back byte
/// for byte.
pub trait TunerConfig: Send + Sync + std::fmt::Debug + Any {
    /// HF's `peft_type` string (`"LORA"`, `"IA3"`, `"PREFIX_TUNING"`, ...).
    fn peft_type(&self) -> &'static str;
    /// HF `is_prompt_learning`.
    fn is_prompt_learning(&self) -> bool {
        false
    }
    /// `task_type` (`None` when unset).
    fn task_type(&self) -> Option<&str>;
    fn inference_mode(&self) -> bool;
    fn set_inference_mode(&mut self, on: bool);
    fn base_model_name_or_path(&self) -> Option<&str>;
    fn set_base_model_name_or_path(&mut self, v: Option<String>);
    /// `modules_to_save` (`None` when unset).
    fn modules_to_save(&self) -> Option<Vec<String>>;
    fn set_modules_to_save(&mut self, v: Option<Vec<String>>);
    /// Fields of the source JSON that HF's config class does not have.
    fn unknown_fields(&self) -> &[String];
    /// `target_modules` of tuners that inject into named layers (`None` for prompt learning).
    fn target_modules(&self) -> Option<&TargetModules> {
        None
    }
    /// The config as HF's adapter_config.json object.
    fn to_json(&self) -> Value;
    /// The `bias` field as HF reads it (`getattr(config, "bias", "none")`, see
    /// `crate::peft_model::bias`): `None` when the config has no such field.
    fn bias(&self) -> Option<String> {
        self.to_json().get("bias").and_then(|b| b.as_str()).map(String::from)
    }
    /// A boxed copy.
    fn clone_box(&self) -> Box<dyn TunerConfig>;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Implements [`TunerConfig`] (and `From<T> for AdapterConfig`) for a config struct whose
/// common fields (`task_type`, `inference_mode`, `base_model_name_or_path`) read as `self.field`
/// (plain fields, or through `Deref` to a [`PeftCommon`]) and with an inherent `to_json()`:
/// - `impl_tuner_config!(T, "PEFT_TYPE")`: a tuner that injects into layers, with a
///   [`LayerCommon`] field named `common` that it derefs to;
/// - `impl_tuner_config!(<K: Bound> T<K>, K::PEFT_TYPE_EXPR)`: the same for a generic config
///   (one type parameter with one bound);
/// - `impl_tuner_config!(T, prompt: |c| c.peft_type_expr)`: a prompt-learning config, whose
///   `modules_to_save` goes through its inherent `modules_to_save()` / `set_modules_to_save()`,
///   with an inherent `unknown_fields()`;
/// - `impl_tuner_config!(@impl [] T, |c| "PEFT_TYPE", is_prompt_learning, items...)`: the rest
///   spelled out (`modules_to_save`, `set_modules_to_save`, `unknown_fields`, optionally
///   `target_modules`).
macro_rules! impl_tuner_config {
    (<$g:ident: $bound:path> $ty:ty, $peft_type:expr) => {
        $crate::tuners::config::impl_tuner_config!(@layer [$g: $bound] $ty, $peft_type);
    };
    ($ty:ty, $peft_type:expr) => {
        $crate::tuners::config::impl_tuner_config!(@layer [] $ty, $peft_type);
    };
    (@layer [$($gen:tt)*] $ty:ty, $peft_type:expr) => {
        $crate::tuners::config::impl_tuner_config!(@impl [$($gen)*] $ty, |_c| $peft_type, false,
            fn modules_to_save(&self) -> Option<Vec<String>> {
                self.modules_to_save.clone()
            }
            fn set_modules_to_save(&mut self, v: Option<Vec<String>>) {
                self.modules_to_save = v;
            }
            fn target_modules(&self) -> Option<&$crate::targeting::TargetModules> {
                Some(&self.target_modules)
            }
            fn unknown_fields(&self) -> &[String] {
                self.common.unknown_fields()
            }
        );
    };
    ($ty:ty, prompt: |$c:ident| $peft_type:expr) => {
        $crate::tuners::config::impl_tuner_config!(@impl [] $ty, |$c| $peft_type, true,
            fn modules_to_save(&self) -> Option<Vec<String>> {
                <$ty>::modules_to_save(self)
            }
            fn set_modules_to_save(&mut self, v: Option<Vec<String>>) {
                <$ty>::set_modules_to_save(self, v)
            }
            fn unknown_fields(&self) -> &[String] {
                <$ty>::unknown_fields(self)
            }
        );
    };
    (@impl [$($gen:tt)*] $ty:ty, |$c:ident| $peft_type:expr, $prompt:expr, $($items:item)*) => {
        impl<$($gen)*> $crate::tuners::config::TunerConfig for $ty {
            fn peft_type(&self) -> &'static str {
                let $c = self;
                let _ = $c;
                $peft_type
            }
            fn is_prompt_learning(&self) -> bool {
                $prompt
            }
            fn task_type(&self) -> Option<&str> {
                self.task_type.as_deref()
            }
            fn inference_mode(&self) -> bool {
                self.inference_mode
            }
            fn set_inference_mode(&mut self, on: bool) {
                self.inference_mode = on;
            }
            fn base_model_name_or_path(&self) -> Option<&str> {
                self.base_model_name_or_path.as_deref()
            }
            fn set_base_model_name_or_path(&mut self, v: Option<String>) {
                self.base_model_name_or_path = v;
            }
            fn to_json(&self) -> serde_json::Value {
                <$ty>::to_json(self)
            }
            fn clone_box(&self) -> Box<dyn $crate::tuners::config::TunerConfig> {
                Box::new(self.clone())
            }
            fn as_any(&self) -> &dyn std::any::Any {
                self
            }
            fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
                self
            }
            $($items)*
        }
        impl<$($gen)*> From<$ty> for $crate::tuners::config::AdapterConfig {
            fn from(c: $ty) -> Self {
                $crate::tuners::config::AdapterConfig::new(c)
            }
        }
    };
}
pub(crate) use impl_tuner_config;

/// `Deref` / `DerefMut` of a tuner's config to the shared part it holds in its `common` field
/// ([`LayerCommon`] or [`PeftCommon`]), so that `cfg.task_type` or `cfg.target_modules` read the
/// same on every config: `impl_deref_common!(T => LayerCommon)`, or
/// `impl_deref_common!(<K> T<K> => LayerCommon)` for a generic config. With `; eq_by_json`
/// (`impl_deref_common!(T => LayerCommon; eq_by_json)`) it also implements `PartialEq` as
/// equality of the configs' adapter_config.json objects (`to_json()`), for configs holding
/// fields without `PartialEq` (AdaLoRA's lock) or equal whenever HF would write the same file.
macro_rules! impl_deref_common {
    (<$g:ident> $ty:ty => $target:ty) => {
        $crate::tuners::config::impl_deref_common!(@impl [$g] $ty => $target);
    };
    ($ty:ty => $target:ty) => {
        $crate::tuners::config::impl_deref_common!(@impl [] $ty => $target);
    };
    ($ty:ty => $target:ty; eq_by_json) => {
        $crate::tuners::config::impl_deref_common!(@impl [] $ty => $target);
        impl PartialEq for $ty {
            fn eq(&self, other: &Self) -> bool {
                self.to_json() == other.to_json()
            }
        }
    };
    (@impl [$($g:ident)?] $ty:ty => $target:ty) => {
        impl$(<$g>)? std::ops::Deref for $ty {
            type Target = $target;
            fn deref(&self) -> &$target {
                &self.common
            }
        }
        impl$(<$g>)? std::ops::DerefMut for $ty {
            fn deref_mut(&mut self) -> &mut $target {
                &mut self.common
            }
        }
    };
}
pub(crate) use impl_deref_common;

/// The map of a JSON object (HF's defaults tables, written as `json!({...})` literals); an empty
/// map for any other value.
pub fn json_object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// `(layers_to_transform, layers_pattern)` of a config (see [`RawConfig::layers`]).
pub type LayerSelection = (Option<Vec<usize>>, Option<Vec<String>>);

/// The parts of an adapter_config.json object every config parses the same way: the object
/// merged over the tuner's HF defaults (`raw`), the names of fields HF's class lacks
/// (`unknown`), and typed readers reporting `InvalidAdapterConfig` with the file and field.
pub struct RawConfig<'p> {
    pub raw: Map<String, Value>,
    pub unknown: Vec<String>,
    path: Option<&'p Path>,
}

impl<'p> RawConfig<'p> {
    /// Merge `v` over `defaults`; `peft_type` must be one of `peft_types` (`class` names HF's
    /// config class in the message, with its article: `"an IA3Config"`).
    ///
    /// Errors: `InvalidAdapterConfig` when `v` is not an object or names another `peft_type`.
    pub fn parse(v: &Value, path: Option<&'p Path>, defaults: Map<String, Value>, peft_types: &[&str], class: &str) -> Result<Self> {
        let bad = |msg: String| PeftError::InvalidAdapterConfig { path: path.map(|p| p.to_path_buf()), msg };
        let obj = v.as_object().ok_or_else(|| bad("the top level must be a JSON object".into()))?;
        let unknown: Vec<String> = obj.keys().filter(|k| !defaults.contains_key(*k)).cloned().collect();
        let mut raw = defaults;
        for (k, val) in obj {
            raw.insert(k.clone(), val.clone());
        }
        let pt = raw.get("peft_type").and_then(|x| x.as_str()).unwrap_or_default();
        if !peft_types.contains(&pt) {
            return Err(bad(format!("`peft_type` must be {} for {class}, found {}", peft_types.iter().map(|t| format!("{t:?}")).collect::<Vec<_>>().join(" or "), raw["peft_type"])));
        }
        Ok(RawConfig { raw, unknown, path })
    }

    /// The `InvalidAdapterConfig` error of this file.
    pub fn bad(&self, msg: String) -> PeftError {
        PeftError::InvalidAdapterConfig { path: self.path.map(|p| p.to_path_buf()), msg }
    }

    /// A boolean field. Errors: `InvalidAdapterConfig` for another JSON type.
    pub fn bool(&self, k: &str) -> Result<bool> {
        self.raw[k].as_bool().ok_or_else(|| self.bad(format!("`{k}` must be a boolean, found {}", self.raw[k])))
    }

    /// Field `k` as `read` takes it, else `InvalidAdapterConfig` with `msg` of the field's value
    /// (the tuner's own message, HF's where it has one). The typed readers below are this with
    /// the messages every config shares.
    pub fn field<T>(&self, k: &str, read: impl FnOnce(&Value) -> Option<T>, msg: impl FnOnce(&Value) -> String) -> Result<T> {
        let v = &self.raw[k];
        read(v).ok_or_else(|| self.bad(msg(v)))
    }

    /// A number field (a Python `float` / `int`: `lora_alpha`, `alpha`, `d_initial`, ...).
    /// Errors: `InvalidAdapterConfig` "`k` must be a number, found …".
    pub fn number(&self, k: &str) -> Result<f64> {
        self.field(k, |x| x.as_f64(), |x| format!("`{k}` must be a number, found {x}"))
    }

    /// A probability in `[0, 1)` (the dropouts: `lora_dropout`, `vera_dropout`, `rank_dropout`,
    /// `module_dropout`). Errors: `InvalidAdapterConfig` "`k` must be a number in [0, 1), found …".
    pub fn prob(&self, k: &str) -> Result<f64> {
        self.field(k, |x| x.as_f64().filter(|p| (0.0..1.0).contains(p)), |x| format!("`{k}` must be a number in [0, 1), found {x}"))
    }

    /// An integer field (VeRA's `projection_prng_key`). Errors: `InvalidAdapterConfig` "`k`
    /// must be an integer, found …".
    pub fn int(&self, k: &str) -> Result<i64> {
        self.field(k, |x| x.as_i64(), |x| format!("`{k}` must be an integer, found {x}"))
    }

    /// A non-negative integer of at most `max` (OFT's `r` / `oft_block_size`, AdaLoRA's
    /// `init_r`, ...). Errors: `InvalidAdapterConfig` "`k` must be a non-negative integer (at
    /// most `max`), found …".
    pub fn uint(&self, k: &str, max: usize) -> Result<usize> {
        self.field(k, |x| x.as_u64().filter(|n| *n as usize <= max).map(|n| n as usize), |x| format!("`{k}` must be a non-negative integer (at most {max}), found {x}"))
    }

    /// A rank in `1..=max` (VeRA's and LyCORIS's `r`; HF `update_layer`: "`r` should be a
    /// positive integer value"). Errors: `InvalidAdapterConfig` "`k` should be a positive
    /// integer value (at most `max`), found …".
    pub fn rank(&self, k: &str, max: usize) -> Result<usize> {
        self.field(k, |x| x.as_u64().filter(|n| *n >= 1 && *n as usize <= max).map(|n| n as usize), |x| {
            format!("`{k}` should be a positive integer value (at most {max}), found {x}")
        })
    }

    /// A string field that must be one of `choices` (`bias`: `"none"`, `"all"` or the tuner's
    /// `"<method>_only"`). Errors: `InvalidAdapterConfig` "`k` must be "a", "b" or "c", found …".
    pub fn one_of(&self, k: &str, choices: &[&str]) -> Result<String> {
        self.field(k, |x| x.as_str().filter(|s| choices.contains(s)).map(String::from), |x| {
            let quoted: Vec<String> = choices.iter().map(|c| format!("{c:?}")).collect();
            let list = match quoted.split_last() {
                Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
                _ => quoted.join(""),
            };
            format!("`{k}` must be {list}, found {x}")
        })
    }

    /// A module-name field as HF's configs take one (`target_modules`, `exclude_modules`,
    /// `feedforward_modules`): `null` or absent → `None`, else a list of names, a regex string
    /// or `"all-linear"` (as `crate::targeting::targets_from_json` reads them).
    ///
    /// Errors: `InvalidAdapterConfig` naming `k` for other JSON types or an invalid regex.
    pub fn targets(&self, k: &str) -> Result<Option<TargetModules>> {
        crate::targeting::targets_from_json(self.raw.get(k).unwrap_or(&Value::Null), k).map_err(|m| self.bad(m))
    }

    /// An optional string field (`null` → `None`).
    pub fn opt_str(&self, k: &str) -> Option<String> {
        self.raw.get(k).and_then(|x| x.as_str()).map(String::from)
    }

    /// `rank_pattern`: `null` or an object of regex → rank in `1..=max_rank` (HF's
    /// `get_pattern_key` keys), in file order.
    ///
    /// Errors: `InvalidAdapterConfig` naming the key for a bad rank or regex.
    pub fn rank_pattern(&self, max_rank: usize) -> Result<Vec<(String, usize)>> {
        self.pattern("rank_pattern", |x| x.as_u64().filter(|n| *n >= 1 && *n as usize <= max_rank).map(|n| n as usize), "a positive integer")
    }

    /// `alpha_pattern`: `null` or an object of regex → alpha, in file order.
    ///
    /// Errors: `InvalidAdapterConfig` naming the key for a bad alpha or regex.
    pub fn alpha_pattern(&self) -> Result<Vec<(String, f64)>> {
        self.pattern("alpha_pattern", |x| x.as_f64(), "a number")
    }

    fn pattern<T>(&self, field: &str, value: impl Fn(&Value) -> Option<T>, what: &str) -> Result<Vec<(String, T)>> {
        let mut out = Vec::new();
        match &self.raw[field] {
            Value::Object(m) => {
                for (k, x) in m {
                    let v = value(x).ok_or_else(|| self.bad(format!("`{field}[{k:?}]` must be {what}, found {x}")))?;
                    regex::Regex::new(k).map_err(|e| self.bad(format!("`{field}` key {k:?} is not a valid regex: {e}")))?;
                    out.push((k.clone(), v));
                }
            }
            Value::Null => {}
            _ => return Err(self.bad(format!("`{field}` must be an object"))),
        }
        Ok(out)
    }

    /// `layers_to_transform` (`null`, an integer or a list of integers) and `layers_pattern`
    /// (`null`, a string or a list of strings), as HF's `LycorisConfig` / `LoraConfig` read them.
    ///
    /// Errors: `InvalidAdapterConfig` for other JSON types, and (HF `__post_init__`) when
    /// `layers_pattern` is given without `layers_to_transform`.
    pub fn layers(&self) -> Result<LayerSelection> {
        let layers_pattern = match &self.raw["layers_pattern"] {
            Value::Null => None,
            Value::String(s) => Some(vec![s.clone()]),
            Value::Array(a) => Some(
                a.iter()
                    .map(|x| x.as_str().map(String::from).ok_or_else(|| self.bad(format!("`layers_pattern` must hold strings, found {x}"))))
                    .collect::<Result<Vec<_>>>()?,
            ),
            other => return Err(self.bad(format!("`layers_pattern` must be a string or a list of strings, found {other}"))),
        };
        let layers_to_transform = match &self.raw["layers_to_transform"] {
            Value::Null => None,
            Value::Number(n) => Some(vec![n.as_u64().ok_or_else(|| self.bad("`layers_to_transform` must be non-negative".into()))? as usize]),
            Value::Array(a) => Some(
                a.iter()
                    .map(|x| x.as_u64().map(|n| n as usize).ok_or_else(|| self.bad(format!("`layers_to_transform` must hold integers, found {x}"))))
                    .collect::<Result<Vec<_>>>()?,
            ),
            other => return Err(self.bad(format!("`layers_to_transform` must be an integer or a list, found {other}"))),
        };
        if layers_pattern.is_some() && layers_to_transform.is_none() {
            return Err(self.bad("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ".into()));
        }
        Ok((layers_to_transform, layers_pattern))
    }

    /// `modules_to_save`: `null`, a list of strings, or one string (a one-name list).
    ///
    /// Errors: `InvalidAdapterConfig` for anything else.
    pub fn modules_to_save(&self) -> Result<Option<Vec<String>>> {
        match &self.raw["modules_to_save"] {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(vec![s.clone()])),
            Value::Array(a) => Ok(Some(
                a.iter()
                    .map(|x| x.as_str().map(String::from).ok_or_else(|| self.bad(format!("`modules_to_save` must hold strings, found {x}"))))
                    .collect::<Result<Vec<_>>>()?,
            )),
            other => Err(self.bad(format!("`modules_to_save` must be a list of strings, found {other}"))),
        }
    }
}

/// The fields of HF's `PeftConfig` base class that every config here keeps typed
/// (`task_type`, `base_model_name_or_path`, `revision`, `inference_mode`), with the whole
/// source object (`raw`, merged over the tuner's HF defaults) and the names of the fields HF's
/// class lacks (`unknown`). A tuner's config holds one (directly, or inside a [`LayerCommon`])
/// and derefs to it, so `cfg.task_type` reads the same on every config.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftCommon {
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    pub revision: Option<String>,
    pub inference_mode: bool,
    /// The complete JSON object, HF field names, as it will be written; holds the fields this
    /// crate does not act on.
    pub(crate) raw: Map<String, Value>,
    unknown: Vec<String>,
}

impl PeftCommon {
    /// Read the common fields of a parsed config.
    ///
    /// Errors: `InvalidAdapterConfig` naming the field: `task_type`, `base_model_name_or_path` or
    /// `revision` that is neither a string nor `null`, an `inference_mode` that is not a boolean.
    pub fn parse(rc: &RawConfig) -> Result<Self> {
        let opt_str = |k: &str| -> Result<Option<String>> {
            match rc.raw.get(k).unwrap_or(&Value::Null) {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s.clone())),
                other => Err(rc.bad(format!("`{k}` must be a string or null, found {other}"))),
            }
        };
        Ok(PeftCommon {
            task_type: opt_str("task_type")?,
            base_model_name_or_path: opt_str("base_model_name_or_path")?,
            revision: opt_str("revision")?,
            inference_mode: rc.bool("inference_mode")?,
            raw: rc.raw.clone(),
            unknown: rc.unknown.clone(),
        })
    }

    /// Fields of the source JSON that HF's config class does not have (kept, not acted on).
    pub fn unknown_fields(&self) -> &[String] {
        &self.unknown
    }

    /// HF's adapter_config.json object: the source fields, with `own` writing the tuner's typed
    /// fields back, then the common ones (`inference_mode`, `base_model_name_or_path`,
    /// `task_type`, `peft_version`), keys sorted as HF's `json.dumps(sort_keys=True)` writes them.
    pub fn to_json_with(&self, own: impl FnOnce(&mut Map<String, Value>)) -> Value {
        let mut m = self.raw.clone();
        own(&mut m);
        let opt_str = |v: &Option<String>| v.clone().map(Value::String).unwrap_or(Value::Null);
        m.insert("inference_mode".into(), Value::Bool(self.inference_mode));
        m.insert("base_model_name_or_path".into(), opt_str(&self.base_model_name_or_path));
        m.insert("task_type".into(), opt_str(&self.task_type));
        m.insert("peft_version".into(), Value::String("0.21.0".into()));
        Value::Object(m.into_iter().collect::<std::collections::BTreeMap<_, _>>().into_iter().collect())
    }
}

/// Which of the optional targeting fields a layer tuner's HF config class has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerFields {
    /// `exclude_modules` (VeRA has none).
    pub exclude_modules: bool,
    /// `layers_to_transform` / `layers_pattern` ((IA)³ has none).
    pub layer_selection: bool,
}

impl LayerFields {
    /// Every targeting field (LoRA, LyCORIS, OFT).
    pub const ALL: LayerFields = LayerFields { exclude_modules: true, layer_selection: true };
}

/// What the configs of tuners that inject into named layers share (HF `LoraConfig`,
/// `IA3Config`, `VeraConfig`, `LycorisConfig`, `OFTConfig`, ...): the [`PeftCommon`] fields plus
/// the targeting ones, parsed, checked and written back once. Derefs to [`PeftCommon`].
#[derive(Debug, Clone, PartialEq)]
pub struct LayerCommon {
    pub peft: PeftCommon,
    /// `target_modules` (required: a list of names, a regex string or `"all-linear"`).
    pub target_modules: TargetModules,
    pub exclude_modules: Option<TargetModules>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Option<Vec<String>>,
    pub modules_to_save: Option<Vec<String>>,
    fields: LayerFields,
}

impl std::ops::Deref for LayerCommon {
    type Target = PeftCommon;
    fn deref(&self) -> &PeftCommon {
        &self.peft
    }
}

impl std::ops::DerefMut for LayerCommon {
    fn deref_mut(&mut self) -> &mut PeftCommon {
        &mut self.peft
    }
}

impl LayerCommon {
    /// Read the common and targeting fields of a parsed config; `fields` says which optional
    /// ones its HF class has (the others stay in `raw` as they were).
    ///
    /// Errors: as [`PeftCommon::parse`], and `InvalidAdapterConfig` naming the field for a
    /// missing or malformed `target_modules`, a malformed `exclude_modules` or
    /// `modules_to_save`, and (HF `__post_init__`) `layers_pattern` without
    /// `layers_to_transform`.
    pub fn parse(rc: &RawConfig, fields: LayerFields) -> Result<Self> {
        let target_modules = rc
            .targets("target_modules")?
            .ok_or_else(|| rc.bad("`target_modules` must be given (a list of module names, a regex string or \"all-linear\")".into()))?;
        let exclude_modules = if fields.exclude_modules { rc.targets("exclude_modules")? } else { None };
        let (layers_to_transform, layers_pattern) = if fields.layer_selection { rc.layers()? } else { (None, None) };
        Ok(LayerCommon {
            peft: PeftCommon::parse(rc)?,
            target_modules,
            exclude_modules,
            layers_to_transform,
            layers_pattern,
            modules_to_save: rc.modules_to_save()?,
            fields,
        })
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

    /// Is module `m` a target of this config on a model with head `task` (the output head is no
    /// `"all-linear"` target)? What the tuners' load-time shape checks ask.
    pub fn selects(&self, m: &str, task: crate::model::Task) -> bool {
        self.rule().select(m, crate::peft_model::is_output_head(task, m)) == crate::targeting::Selection::Target
    }

    /// HF's adapter_config.json object: as [`PeftCommon::to_json_with`], with `target_modules`,
    /// `exclude_modules` (when the class has it) and `modules_to_save` written back too.
    pub fn to_json_with(&self, own: impl FnOnce(&mut Map<String, Value>)) -> Value {
        self.peft.to_json_with(|m| {
            own(m);
            m.insert("target_modules".into(), crate::targeting::targets_to_json(&Some(self.target_modules.clone())));
            if self.fields.exclude_modules {
                m.insert("exclude_modules".into(), crate::targeting::targets_to_json(&self.exclude_modules));
            }
            m.insert("modules_to_save".into(), self.modules_to_save.clone().map(Value::from).unwrap_or(Value::Null));
        })
    }
}

/// One adapter's config: any registered tuner's (HF `PeftConfig` subclasses). See the module docs.
#[derive(Debug)]
pub struct AdapterConfig(Box<dyn TunerConfig>);

impl Clone for AdapterConfig {
    fn clone(&self) -> Self {
        AdapterConfig(self.0.clone_box())
    }
}

impl PartialEq for AdapterConfig {
    fn eq(&self, other: &Self) -> bool {
        self.peft_type() == other.peft_type() && self.to_json() == other.to_json()
    }
}

impl AdapterConfig {
    /// Wrap a tuner's config.
    pub fn new(c: impl TunerConfig) -> Self {
        AdapterConfig(Box::new(c))
    }

    /// Parse an adapter_config.json object, choosing the config class by `peft_type` from the
    /// tuner registry.
    ///
    /// Errors: `InvalidAdapterConfig` naming the field at fault; an unknown or unsupported
    /// `peft_type` lists the supported ones.
    pub fn from_json(v: &Value, path: Option<&Path>) -> Result<Self> {
        let bad = |msg: String| PeftError::InvalidAdapterConfig { path: path.map(|p| p.to_path_buf()), msg };
        let obj = v.as_object().ok_or_else(|| bad("the top level must be a JSON object".into()))?;
        let pt = obj.get("peft_type").and_then(|t| t.as_str());
        match pt.and_then(super::registry::tuner_for) {
            Some(t) => t.parse_config(v, path),
            None => Err(bad(format!("`peft_type` {pt:?} is not supported (supported: {:?})", super::registry::supported_peft_types()))),
        }
    }

    /// Parse an adapter_config.json file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| PeftError::InvalidAdapterConfig { path: Some(path.to_path_buf()), msg: format!("not valid JSON: {e}") })?;
        Self::from_json(&v, Some(path))
    }

    /// The tuner's own config type, when it is `T`.
    pub fn get<T: TunerConfig>(&self) -> Option<&T> {
        self.0.as_any().downcast_ref::<T>()
    }

    /// Mutable twin of [`Self::get`].
    pub fn get_mut<T: TunerConfig>(&mut self) -> Option<&mut T> {
        self.0.as_any_mut().downcast_mut::<T>()
    }

    /// The tuner that handles this config (registered for its `peft_type`).
    pub fn tuner(&self) -> &'static dyn super::registry::Tuner {
        super::registry::tuner_for(self.peft_type()).expect("every config type is registered")
    }

    /// HF's `peft_type` string.
    pub fn peft_type(&self) -> &'static str {
        self.0.peft_type()
    }

    /// HF `is_prompt_learning`.
    pub fn is_prompt_learning(&self) -> bool {
        self.0.is_prompt_learning()
    }

    pub fn as_lora(&self) -> Option<&LoraConfig> {
        self.get()
    }

    pub fn as_ia3(&self) -> Option<&Ia3Config> {
        self.get()
    }

    pub fn as_prompt(&self) -> Option<&PromptLearningConfig> {
        self.get()
    }

    /// The common part (see [`TunerConfig`]).
    pub fn common(&self) -> &dyn TunerConfig {
        self.0.as_ref()
    }

    /// Mutable twin of [`Self::common`].
    pub fn common_mut(&mut self) -> &mut dyn TunerConfig {
        self.0.as_mut()
    }

    /// `task_type` as a [`crate::model::Task`] (`None` when unset or unknown).
    pub fn task(&self) -> Option<crate::model::Task> {
        self.0.task_type().and_then(crate::model::Task::from_task_type)
    }

    /// HF `PeftModelForSequenceClassification` / `...TokenClassification` /
    /// `...QuestionAnswering`: append the task's head modules (`classifier`, `score` /
    /// `qa_outputs`, see [`crate::model::Task::head_modules`]) to `modules_to_save` (created when
    /// `None`), each once. Other task types leave the config unchanged.
    pub fn add_task_head_modules(&mut self) {
        let Some(task) = self.task() else { return };
        let names = task.head_modules();
        if names.is_empty() {
            return;
        }
        let mut list = self.0.modules_to_save().unwrap_or_default();
        for n in names {
            if !list.iter().any(|x| x == n) {
                list.push(n.to_string());
            }
        }
        self.0.set_modules_to_save(Some(list));
    }

    /// `modules_to_save` of the config (empty when unset).
    pub fn modules_to_save(&self) -> Vec<String> {
        self.0.modules_to_save().unwrap_or_default()
    }

    pub fn inference_mode(&self) -> bool {
        self.0.inference_mode()
    }

    pub fn set_inference_mode(&mut self, on: bool) {
        self.0.set_inference_mode(on)
    }

    pub fn base_model_name_or_path(&self) -> Option<&str> {
        self.0.base_model_name_or_path()
    }

    pub fn set_base_model_name_or_path(&mut self, v: Option<String>) {
        self.0.set_base_model_name_or_path(v)
    }

    /// Fields of the source JSON that HF's config class does not have.
    pub fn unknown_fields(&self) -> &[String] {
        self.0.unknown_fields()
    }

    /// The config as HF's adapter_config.json object.
    pub fn to_json(&self) -> Value {
        self.0.to_json()
    }

    /// `adapter_config.json` text exactly as HF writes it.
    pub fn to_json_string(&self) -> String {
        crate::io::python_json_dumps(&self.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The typed readers keep the messages the configs wrote by hand before them.
    #[test]
    fn readers_report_the_field_with_the_configs_messages() {
        let defaults = json_object(json!({"peft_type": "X", "r": 0, "bias": "some", "p": 1.5, "a": "x", "k": 1.5, "n": -1, "t": 3}));
        let rc = RawConfig::parse(&json!({}), None, defaults, &["X"], "an XConfig").unwrap();
        let msg = |e: PeftError| {
            assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
            e.to_string()
        };
        assert!(msg(rc.rank("r", 8).unwrap_err()).contains("`r` should be a positive integer value (at most 8), found 0"));
        assert!(msg(rc.one_of("bias", &["none", "all", "x_only"]).unwrap_err()).contains("`bias` must be \"none\", \"all\" or \"x_only\", found \"some\""));
        assert!(msg(rc.one_of("bias", &["none", "all"]).unwrap_err()).contains("`bias` must be \"none\" or \"all\", found \"some\""));
        assert!(msg(rc.prob("p").unwrap_err()).contains("`p` must be a number in [0, 1), found 1.5"));
        assert!(msg(rc.number("a").unwrap_err()).contains("`a` must be a number, found \"x\""));
        assert!(msg(rc.int("k").unwrap_err()).contains("`k` must be an integer, found 1.5"));
        assert!(msg(rc.uint("n", 4).unwrap_err()).contains("`n` must be a non-negative integer (at most 4), found -1"));
        assert!(msg(rc.uint("t", 2).unwrap_err()).contains("`t` must be a non-negative integer (at most 2), found 3"));
        assert!(msg(rc.targets("t").unwrap_err()).contains("`t`"));
        assert_eq!(rc.uint("t", 3).unwrap(), 3);
        assert_eq!(rc.number("k").unwrap(), 1.5);
        assert_eq!(rc.targets("absent").unwrap(), None);
        assert!(json_object(json!([1])).is_empty());
    }
}
