//! HF PEFT's module-targeting rules (`check_target_module_exists`, `get_pattern_key`).
//!
//! * a list of names matches a module whose full name equals a name or ends with `.{name}`
//!   (dot boundary: `q_proj` matches `model.layers.3.self_attn.q_proj`, not `xq_proj`);
//! * a string is a regular expression that must match the whole module name
//!   (the `regex` crate: linear time, no catastrophic backtracking);
//! * `"all-linear"` is every linear layer except the output head;
//! * `layers_to_transform` keeps modules whose `.{layers_pattern}.{i}.` index is listed.

use crate::tuners::lora::{LoraConfig, TargetModules};
use regex::Regex;

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

/// Should the tuner of `cfg` be injected into the linear module `name`?
pub fn is_target(cfg: &LoraConfig, name: &str, is_output_head: bool) -> bool {
    is_target_with(&cfg.target_modules, cfg.exclude_modules.as_ref(), cfg.layers_to_transform.as_deref(), cfg.layers_pattern.as_deref(), name, is_output_head)
}

/// The targeting rule on its parts (shared by every tuner config): `targets` select, `exclude`
/// removes, and `layers` (when given) keeps only modules whose layer index is listed.
pub fn is_target_with(
    targets: &TargetModules,
    exclude: Option<&TargetModules>,
    layers: Option<&[usize]>,
    layers_pattern: Option<&[String]>,
    name: &str,
    is_output_head: bool,
) -> bool {
    if !matches_target(targets, name, is_output_head) {
        return false;
    }
    if let Some(ex) = exclude {
        if matches_target(ex, name, false) {
            return false;
        }
    }
    match layers {
        Some(layers) => match layer_index(name, layers_pattern) {
            Some(i) => layers.contains(&i),
            None => false,
        },
        None => true,
    }
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
