//! HF PEFT's module-targeting rules (`check_target_module_exists`, `get_pattern_key`).
//!
//! * a list of names matches a module whose full name equals a name or ends with `.{name}`
//!   (dot boundary: `q_proj` matches `model.layers.3.self_attn.q_proj`, not `xq_proj`);
//! * a string is a regular expression that must match the whole module name
//!   (the `regex` crate: linear time, no catastrophic backtracking);
//! * `"all-linear"` is every linear layer except the output head;
//! * `layers_to_transform` keeps modules whose `.{layers_pattern}.{i}.` index is listed.

use regex::Regex;

/// Which modules a tuner is injected into (HF `target_modules`).
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Module names; each matches a module whose name equals it or ends with `.{name}`.
    List(Vec<String>),
    /// A regular expression that must match the whole module name.
    Regex(String),
    /// `"all-linear"`: every linear layer except the output head.
    AllLinear,
}


/// Default `layers_pattern` candidates when none is configured (HF `COMMON_LAYERS_PATTERN`).
pub const COMMON_LAYERS_PATTERN: &[&str] = &["layers", "h", "block", "blocks", "layer"];

/// Does `targets` select the module `name`? `is_output_head` excludes it from `"all-linear"`.
pub fn matches_target(targets: &TargetModules, name: &str, is_output_head: bool) -> bool {
    match targets {
        TargetModules::AllLinear => !is_output_head,
        TargetModules::Regex(r) => Regex::new(&format!("^(?:{r})$")).map(|re| re.is_match(name)).unwrap_or(false),
        TargetModules::List(list) => list.iter().any(|t| name == t || name.ends_with(&format!(".{t}"))),
    }
}

/// Layer index of `name` under one of `patterns` (`model.layers.3.mlp` → 3).
pub fn layer_index(name: &str, patterns: Option<&[String]>) -> Option<usize> {
    let defaults: Vec<String> = COMMON_LAYERS_PATTERN.iter().map(|s| s.to_string()).collect();
    let patterns = patterns.unwrap_or(&defaults);
    for p in patterns {
        let re = Regex::new(&format!(r"^(?:.*\.)?{}\.(\d+)\.", regex::escape(p))).ok()?;
        if let Some(c) = re.captures(name) {
            return c[1].parse().ok();
        }
    }
    None
}

/// What the targeting rule says of one module (HF `check_target_module_exists`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// The tuner is injected.
    Target,
    /// Matched `exclude_modules`, or is a `modules_to_save` module (HF `_ExcludedModule`: an
    /// adapter never wraps a module that is saved whole).
    Excluded,
    /// Matched `target_modules` but its layer index is not in `layers_to_transform` (or it has
    /// none under `layers_pattern`).
    OutsideLayers,
    /// Not selected by `target_modules`.
    Unmatched,
}

/// The targeting rule shared by every tuner config: `targets` select; `exclude` and the
/// `saved` (`modules_to_save`) entries remove; `layers` (when given) keeps only modules whose
/// layer index is listed.
#[derive(Clone, Copy, Debug)]
pub struct Rule<'a> {
    pub targets: &'a TargetModules,
    pub exclude: Option<&'a TargetModules>,
    pub layers: Option<&'a [usize]>,
    pub layers_pattern: Option<&'a [String]>,
    pub saved: &'a [String],
}

impl Rule<'_> {
    /// Classify module `name`; `is_output_head` excludes it from `"all-linear"`. The order is
    /// HF's: `exclude_modules`, then `modules_to_save` (matched as HF does, by the regex
    /// `(^|.*\.){entry}($|\..*)`), then `target_modules`, then the layer selection.
    pub fn select(&self, name: &str, is_output_head: bool) -> Selection {
        if let Some(ex) = self.exclude {
            if matches_target(ex, name, false) {
                return Selection::Excluded;
            }
        }
        if self.saved.iter().any(|m| is_saved_module_key(name, m)) {
            return Selection::Excluded;
        }
        if !matches_target(self.targets, name, is_output_head) {
            return Selection::Unmatched;
        }
        match self.layers {
            Some(layers) => match layer_index(name, self.layers_pattern) {
                Some(i) if layers.contains(&i) => Selection::Target,
                _ => Selection::OutsideLayers,
            },
            None => Selection::Target,
        }
    }
}

/// HF's guard against adapting a `modules_to_save` module: `re.match(rf"(^|.*\.){m}($|\..*)",
/// key)` (the entry is a regex; the key must equal it or hold it between dots). An entry that is
/// not a valid regex matches nothing.
pub fn is_saved_module_key(key: &str, entry: &str) -> bool {
    Regex::new(&format!(r"^(?:|.*\.)(?:{entry})(?:$|\..*)")).map(|re| re.is_match(key)).unwrap_or(false)
}

/// What a targeting pass left out, for the error when nothing is targeted.
#[derive(Default, Debug)]
pub struct Misses {
    /// Modules removed by `exclude_modules` or `modules_to_save`.
    pub excluded: Vec<String>,
    /// Modules `target_modules` matched that the layer selection left out.
    pub outside_layers: Vec<String>,
    /// Every layer index seen among the visited modules.
    pub layers_seen: std::collections::BTreeSet<usize>,
}

impl Misses {
    /// Record module `name`'s selection; returns whether it is a target.
    pub fn note(&mut self, name: &str, sel: Selection, layers_pattern: Option<&[String]>) -> bool {
        if let Some(i) = layer_index(name, layers_pattern) {
            self.layers_seen.insert(i);
        }
        match sel {
            Selection::Target => return true,
            Selection::Excluded => self.excluded.push(name.to_string()),
            Selection::OutsideLayers => self.outside_layers.push(name.to_string()),
            Selection::Unmatched => {}
        }
        false
    }

    /// HF's `NoMatchingPeftModuleError` message for this pass (`targets` as written in the
    /// config), followed by what peft-node adds: the modules left out and why.
    pub fn message(&self, targets: &str, layers: Option<&[usize]>, layers_pattern: Option<&[String]>) -> String {
        let mut msg = if !self.excluded.is_empty() {
            "No modules were targeted for adaptation. This might be caused by a combination of mismatched target modules and excluded modules. \
             Please check your `target_modules` and `exclude_modules` configuration. You may also have only targeted modules that are marked to be saved (`modules_to_save`)."
                .to_string()
        } else {
            format!("Target modules {targets} not found in the base model. Please check the target modules and try again.")
        };
        if let Some(l) = layers {
            msg.push_str(&format!(" Note: You specified 'layers_to_transform': {l:?}."));
        }
        if let Some(p) = layers_pattern {
            let p = if p.len() == 1 { p[0].clone() } else { format!("{p:?}") };
            msg.push_str(&format!(" You also specified 'layers_pattern': {p}."));
        }
        if !self.excluded.is_empty() {
            msg.push_str(&format!(" Excluded by `exclude_modules` / `modules_to_save`: {}.", list_some(&self.excluded)));
        }
        if !self.outside_layers.is_empty() {
            let have = match (self.layers_seen.first(), self.layers_seen.last()) {
                (Some(a), Some(b)) => format!("the model's layers are {a}..={b}"),
                _ => "the model has no numbered layers".to_string(),
            };
            msg.push_str(&format!(" The layer selection excluded every matching module ({}): {have}.", list_some(&self.outside_layers)));
        }
        msg
    }
}

fn list_some(v: &[String]) -> String {
    let mut s = v.iter().take(6).cloned().collect::<Vec<_>>().join(", ");
    if v.len() > 6 {
        s.push_str(&format!(" and {} more", v.len() - 6));
    }
    s
}

/// HF `get_pattern_key`: the value of the first pattern `p` such that `(.*\.)?(p)$` matches
/// `name` (so a plain module name matches as a dot-boundary suffix).
pub fn pattern_lookup<T: Copy>(patterns: &[(String, T)], name: &str) -> Option<T> {
    for (p, v) in patterns {
        if let Ok(re) = Regex::new(&format!(r"^(?:.*\.)?(?:{p})$")) {
            if re.is_match(name) {
                return Some(*v);
            }
        }
    }
    None
}

/// Parse a `target_modules`-like field (`null`, `"all-linear"`, a regex string, a list of
/// names) as HF's configs accept it; the error names `field`.
pub(crate) fn targets_from_json(v: &serde_json::Value, field: &str) -> std::result::Result<Option<TargetModules>, String> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) if s == "all-linear" => Ok(Some(TargetModules::AllLinear)),
        serde_json::Value::String(s) => {
            regex::Regex::new(&format!("^(?:{s})$")).map_err(|e| format!("`{field}` is not a valid regex: {e}"))?;
            Ok(Some(TargetModules::Regex(s.clone())))
        }
        serde_json::Value::Array(a) => {
            let mut out = Vec::with_capacity(a.len());
            for x in a {
                match x.as_str() {
                    Some(s) if !s.is_empty() => out.push(s.to_string()),
                    _ => return Err(format!("`{field}` must be a list of non-empty strings, found {x}")),
                }
            }
            Ok(Some(TargetModules::List(out)))
        }
        other => Err(format!("`{field}` must be a list of strings or a string, found {other}")),
    }
}

/// The JSON HF writes for a `target_modules`-like field.
pub(crate) fn targets_to_json(t: &Option<TargetModules>) -> serde_json::Value {
    match t {
        None => serde_json::Value::Null,
        Some(TargetModules::AllLinear) => serde_json::Value::String("all-linear".into()),
        Some(TargetModules::Regex(s)) => serde_json::Value::String(s.clone()),
        Some(TargetModules::List(l)) => serde_json::Value::Array(l.iter().map(|s| serde_json::Value::String(s.clone())).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_targets_match_at_dot_boundary() {
        let t = TargetModules::List(vec!["q_proj".into()]);
        assert!(matches_target(&t, "model.layers.3.self_attn.q_proj", false));
        assert!(matches_target(&t, "q_proj", false));
        assert!(!matches_target(&t, "model.layers.3.self_attn.xq_proj", false));
        assert!(!matches_target(&t, "model.layers.3.self_attn.q_proj.x", false));
    }

    #[test]
    fn regex_targets_are_full_matches() {
        let t = TargetModules::Regex(r".*\.(q|v)_proj".into());
        assert!(matches_target(&t, "model.layers.0.self_attn.v_proj", false));
        assert!(!matches_target(&t, "model.layers.0.self_attn.v_proj2", false));
        let t = TargetModules::Regex("q_proj".into());
        assert!(!matches_target(&t, "model.layers.0.self_attn.q_proj", false));
    }

    #[test]
    fn all_linear_skips_output_head() {
        assert!(matches_target(&TargetModules::AllLinear, "model.layers.0.mlp.up_proj", false));
        assert!(!matches_target(&TargetModules::AllLinear, "lm_head", true));
    }

    #[test]
    fn saved_modules_are_excluded_as_hf() {
        assert!(is_saved_module_key("model.layers.0.self_attn.q_proj", "q_proj"));
        assert!(is_saved_module_key("q_proj", "q_proj"));
        assert!(is_saved_module_key("classifier.dense", "classifier"));
        assert!(!is_saved_module_key("lm_head", "head"));
        assert!(!is_saved_module_key("model.layers.0.self_attn.xq_proj", "q_proj"));
        let t = TargetModules::List(vec!["q_proj".into(), "v_proj".into()]);
        let saved = vec!["q_proj".to_string()];
        let r = Rule { targets: &t, exclude: None, layers: None, layers_pattern: None, saved: &saved };
        assert_eq!(r.select("model.layers.0.self_attn.q_proj", false), Selection::Excluded);
        assert_eq!(r.select("model.layers.0.self_attn.v_proj", false), Selection::Target);
        assert_eq!(r.select("model.layers.0.self_attn.k_proj", false), Selection::Unmatched);
    }

    #[test]
    fn layer_index_and_patterns() {
        assert_eq!(layer_index("model.layers.12.mlp.up_proj", None), Some(12));
        assert_eq!(layer_index("transformer.h.1.attn.c_attn", None), Some(1));
        assert_eq!(layer_index("lm_head", None), None);
        let pats = vec![("q_proj".to_string(), 2usize), ("layers.1.self_attn.v_proj".to_string(), 6)];
        assert_eq!(pattern_lookup(&pats, "model.layers.0.self_attn.q_proj"), Some(2));
        assert_eq!(pattern_lookup(&pats, "model.layers.1.self_attn.v_proj"), Some(6));
        assert_eq!(pattern_lookup(&pats, "model.layers.0.self_attn.v_proj"), None);
    }
}