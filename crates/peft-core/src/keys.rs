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

/// The on-disk keys of a LoRA layer's A and B (adapter name removed): `<m>.lora_A.weight` /
/// `<m>.lora_B.weight`, or for an embedding layer HF's `<m>.lora_embedding_A` /
/// `<m>.lora_embedding_B` (plain parameters, no `.weight`).
pub fn lora_keys(m: &str, is_embedding: bool) -> (String, String) {
    if is_embedding {
        (format!("{m}.lora_embedding_A"), format!("{m}.lora_embedding_B"))
    } else {
        (format!("{m}.lora_A.weight"), format!("{m}.lora_B.weight"))
    }
}

/// `x.lora_A.<name>.weight` → `x.lora_A.weight` (HF's adapter-name removal rule, inverted).
pub fn strip_adapter_name(k: &str) -> String {
    // `<m>.modules_to_save.<name>.<param>` -> `<m>.<param>`
    if let Some(i) = k.find(".modules_to_save.") {
        let rest = &k[i + ".modules_to_save.".len()..];
        if let Some(j) = rest.find('.') {
            return format!("{}.{}", &k[..i], &rest[j + 1..]);
        }
    }
    // `<m>.lora_magnitude_vector.<name>.weight` -> `<m>.lora_magnitude_vector`; `<m>.ia3_l.<name>` -> `<m>.ia3_l`
    for slot in [".lora_magnitude_vector.", ".ia3_l.", ".lora_embedding_A.", ".lora_embedding_B."] {
        if let Some(i) = k.rfind(slot) {
            return format!("{}{}", &k[..i], slot.trim_end_matches('.'));
        }
    }
    for slot in [".lora_A.", ".lora_B."] {
        if let Some(i) = k.rfind(slot) {
            let rest = &k[i + slot.len()..];
            if rest != "weight" && rest.ends_with(".weight") {
                return format!("{}{}weight", &k[..i], slot);
            }
        }
    }
    k.to_string()
}

/// The model's name of the on-disk key `k` (no prefix) for adapter `name` (the inverse of
/// [`strip_adapter_name`] for tuner slots): `m.lora_A.weight` → `m.lora_A.<name>.weight`,
/// `m.lora_magnitude_vector` → `m.lora_magnitude_vector.<name>.weight`, `m.ia3_l` →
/// `m.ia3_l.<name>`, `m.lora_embedding_A` → `m.lora_embedding_A.<name>`. Other keys are
/// returned unchanged.
pub fn with_adapter_name(k: &str, name: &str) -> String {
    for slot in [".lora_A.weight", ".lora_B.weight"] {
        if let Some(m) = k.strip_suffix(slot) {
            return format!("{m}{}.{name}.weight", &slot[..slot.len() - ".weight".len()]);
        }
    }
    if let Some(m) = k.strip_suffix(".lora_magnitude_vector") {
        return format!("{m}.lora_magnitude_vector.{name}.weight");
    }
    for slot in [".ia3_l", ".lora_embedding_A", ".lora_embedding_B"] {
        if k.ends_with(slot) {
            return format!("{k}.{name}");
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
}
