//! HF PEFT's state-dict key grammar, in one place.
//!
//! On disk (`adapter_model.safetensors`) every key starts with [`KEY_PREFIX`] followed by the
//! module path and the tuner's slot, without the adapter name (HF
//! `get_peft_model_state_dict` removes `.<adapter>`): `<m>.lora_A.weight`, `<m>.lora_B.weight`,
//! `<m>.lora_embedding_A`, `<m>.lora_magnitude_vector`, `<m>.ia3_l`, and for a
//! `modules_to_save` copy `<m>.weight` / `<m>.bias`. In the model (and in HF's `missing_keys`)
//! the adapter name sits after the slot: `<m>.lora_A.<adapter>.weight`,
//! `<m>.lora_magnitude_vector.<adapter>.weight`, `<m>.ia3_l.<adapter>`,
//! `<m>.modules_to_save.<adapter>.weight`.

/// The prefix of every adapter key on disk (`PeftModel` → `base_model` (the tuner model) →
/// `model` (the transformers model)).
pub const KEY_PREFIX: &str = "base_model.model.";

/// `x.lora_A.<name>.weight` → `x.lora_A.weight` (HF's adapter-name removal rule, inverted):
/// the model's key of a registered tuner slot (see [`crate::tuners::layer::Slot`]) or of a
/// `modules_to_save` copy becomes its on-disk key. Other keys are returned unchanged.
pub fn strip_adapter_name(k: &str) -> String {
    // `<m>.modules_to_save.<name>.<param>` -> `<m>.<param>`
    if let Some(i) = k.find(".modules_to_save.") {
        let rest = &k[i + ".modules_to_save.".len()..];
        if let Some(j) = rest.find('.') {
            return format!("{}.{}", &k[..i], &rest[j + 1..]);
        }
    }
    for slot in crate::tuners::registry::all_slots() {
        let needle = format!(".{}.", slot.name);
        let Some(i) = k.rfind(&needle) else { continue };
        let rest = &k[i + needle.len()..];
        let adapter = match slot.model_param {
            Some(p) => match rest.strip_suffix(&format!(".{p}")) {
                Some(a) => a,
                None => continue,
            },
            // `<m>.lora_A.weight` is already LoRA's on-disk key, not `<m>.lora_A.<adapter>` of
            // AdaLoRA's same-named parameter slot.
            None if crate::tuners::registry::all_slots().any(|o| o.name == slot.name && o.disk_param == Some(rest)) => continue,
            None => rest,
        };
        if !adapter.is_empty() && !adapter.contains('.') {
            return slot.disk_key(&k[..i]);
        }
    }
    k.to_string()
}

/// The model's name of the on-disk key `k` (no prefix) for adapter `name` (the inverse of
/// [`strip_adapter_name`] for tuner slots): `m.lora_A.weight` → `m.lora_A.<name>.weight`,
/// `m.lora_magnitude_vector` → `m.lora_magnitude_vector.<name>.weight`, `m.ia3_l` →
/// `m.ia3_l.<name>`. Other keys are returned unchanged.
pub fn with_adapter_name(k: &str, name: &str) -> String {
    for slot in crate::tuners::registry::all_slots() {
        let suffix = slot.disk_key("");
        if let Some(m) = k.strip_suffix(&suffix) {
            if !m.is_empty() {
                return slot.model_key(m, name);
            }
        }
    }
    k.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_name_removed_from_keys() {
        assert_eq!(strip_adapter_name("m.q_proj.lora_A.default.weight"), "m.q_proj.lora_A.weight");
        assert_eq!(strip_adapter_name("m.q_proj.lora_B.weight"), "m.q_proj.lora_B.weight");
        assert_eq!(strip_adapter_name("lm_head.modules_to_save.default.weight"), "lm_head.weight");
    }

    #[test]
    fn adapter_name_inserted_and_removed_round_trip() {
        for k in ["m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight", "m.v.lora_magnitude_vector", "m.k.ia3_l", "e.lora_embedding_A", "e.lora_embedding_B"] {
            let named = with_adapter_name(k, "second");
            assert!(named.contains(".second"), "{named}");
            assert_eq!(strip_adapter_name(&named), k);
        }
        assert_eq!(with_adapter_name("m.q.lora_B.weight", "x"), "m.q.lora_B.x.weight");
        assert_eq!(with_adapter_name("m.v.lora_magnitude_vector", "x"), "m.v.lora_magnitude_vector.x.weight");
    }

    #[test]
    fn adalora_parameter_slots_leave_lora_disk_keys_alone() {
        // AdaLoRA's `lora_A` / `lora_B` are parameter slots (`<m>.lora_A.<adapter>`), LoRA's are
        // modules (`<m>.lora_A.<adapter>.weight`): LoRA's disk key must not read as an adapter `weight`.
        assert_eq!(strip_adapter_name("m.q.lora_A.weight"), "m.q.lora_A.weight");
        assert_eq!(strip_adapter_name("m.q.lora_A.default"), "m.q.lora_A");
        assert_eq!(strip_adapter_name("m.q.lora_E.default"), "m.q.lora_E");
        assert_eq!(with_adapter_name("m.q.lora_E", "x"), "m.q.lora_E.x");
        assert_eq!(with_adapter_name("m.q.lora_B", "x"), "m.q.lora_B.x");
    }
}
