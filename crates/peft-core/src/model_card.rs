//! The adapter folder's README.md model card, created or updated as HF PEFT's
//! `create_or_update_model_card` does: YAML front matter with `library_name: peft`,
//! `base_model`, `pipeline_tag: text-generation` (when unset) and the PEFT tags
//! (`base_model:adapter:<base>`, `lora` for LoRA, `transformers`), and a
//! `### Framework versions` block listing `- PEFT 0.21.0`.
//!
//! Unlike HF (which replaces the `tags` list), tags a user wrote are kept; every other line of
//! an existing card (front matter and body) is kept as it was.

/// The PEFT version written to model cards and adapter configs.
pub const PEFT_VERSION: &str = "0.21.0";

/// HF `_get_peft_specific_model_tags`, sorted.
pub fn peft_tags(peft_type: &str, base: &str) -> Vec<String> {
    let mut t = vec![format!("base_model:adapter:{base}"), "transformers".to_string()];
    if peft_type == "LORA" {
        t.push("lora".into());
    }
    t.sort();
    t
}

fn template(base: &str, tags: &[String]) -> String {
    let mut s = String::from("---\n");
    s.push_str(&format!("base_model: {base}\nlibrary_name: peft\npipeline_tag: text-generation\ntags:\n"));
    for t in tags {
        s.push_str(&format!("- {t}\n"));
    }
    s.push_str("---\n\n# Model Card for Model ID\n\nAn adapter saved by peft-node in Hugging Face PEFT's format.\n\n### Framework versions\n\n");
    s.push_str(&format!("- PEFT {PEFT_VERSION}\n"));
    s
}

/// One top-level front-matter entry: its first line and the indented / list lines under it.
struct Entry {
    key: Option<String>,
    lines: Vec<String>,
}

fn parse_front(front: &str) -> Vec<Entry> {
    let mut out: Vec<Entry> = Vec::new();
    for line in front.lines() {
        let top = !line.starts_with(' ') && !line.starts_with('\t') && !line.starts_with('-') && !line.starts_with('#');
        let key = if top { line.split_once(':').map(|(k, _)| k.trim().to_string()) } else { None };
        match (key, out.last_mut()) {
            (Some(k), _) => out.push(Entry { key: Some(k), lines: vec![line.to_string()] }),
            (None, Some(last)) => last.lines.push(line.to_string()),
            (None, None) => out.push(Entry { key: None, lines: vec![line.to_string()] }),
        }
    }
    out
}

fn yaml_scalar(v: &str) -> String {
    let plain = !v.is_empty() && v.chars().all(|c| c.is_alphanumeric() || "-_./:@+".contains(c)) && !v.starts_with(['-', ':', '@']);
    if plain {
        v.to_string()
    } else {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// Tags already listed under `tags:` (block list or inline `[a, b]`).
fn existing_tags(e: &Entry) -> Vec<String> {
    let first = e.lines[0].split_once(':').map(|(_, v)| v.trim()).unwrap_or("");
    let clean = |s: &str| s.trim().trim_matches('"').trim_matches('\'').to_string();
    if first.starts_with('[') {
        return first.trim_matches(|c| c == '[' || c == ']').split(',').map(clean).filter(|s| !s.is_empty()).collect();
    }
    if !first.is_empty() {
        return vec![clean(first)];
    }
    e.lines[1..].iter().filter_map(|l| l.trim_start().strip_prefix("- ").map(clean)).collect()
}

/// The card text to write: a new card when `existing` is `None`, else `existing` updated.
pub fn create_or_update(existing: Option<&str>, peft_type: &str, base: &str) -> String {
    let ours = peft_tags(peft_type, base);
    let Some(text) = existing else { return template(base, &ours) };
    let (front, body) = match text.strip_prefix("---\n").and_then(|rest| {
        let end = if rest.starts_with("---\n") { Some(0) } else { rest.find("\n---\n").map(|i| i + 1).or_else(|| rest.strip_suffix("\n---").map(|r| r.len() + 1)) };
        end.map(|i| (&rest[..i], rest[i..].strip_prefix("---").unwrap_or("").strip_prefix('\n').unwrap_or("")))
    }) {
        Some((f, b)) => (f.to_string(), b.to_string()),
        None => (String::new(), text.to_string()),
    };
    let mut entries = parse_front(&front);
    let mut set = |key: &str, value: String, only_if_missing: bool| {
        match entries.iter_mut().find(|e| e.key.as_deref() == Some(key)) {
            Some(_) if only_if_missing => {}
            Some(e) => e.lines = vec![format!("{key}: {value}")],
            None => entries.push(Entry { key: Some(key.into()), lines: vec![format!("{key}: {value}")] }),
        }
    };
    set("base_model", yaml_scalar(base), false);
    set("library_name", "peft".into(), false);
    set("pipeline_tag", "text-generation".into(), true);
    let mut tags = entries.iter().find(|e| e.key.as_deref() == Some("tags")).map(existing_tags).unwrap_or_default();
    for t in ours {
        if !tags.contains(&t) {
            tags.push(t);
        }
    }
    let mut tag_lines = vec!["tags:".to_string()];
    tag_lines.extend(tags.iter().map(|t| format!("- {}", yaml_scalar(t))));
    match entries.iter_mut().find(|e| e.key.as_deref() == Some("tags")) {
        Some(e) => e.lines = tag_lines,
        None => entries.push(Entry { key: Some("tags".into()), lines: tag_lines }),
    }
    let mut out = String::from("---\n");
    for e in &entries {
        for l in &e.lines {
            out.push_str(l);
            out.push('\n');
        }
    }
    out.push_str("---\n");
    let mut lines: Vec<String> = body.lines().map(String::from).collect();
    let version_line = format!("- PEFT {PEFT_VERSION}");
    if !lines.contains(&version_line) {
        let heading = "### Framework versions";
        match lines.iter().position(|l| l == heading) {
            Some(i) => lines.insert((i + 2).min(lines.len()), version_line),
            None => {
                lines.push(String::new());
                lines.push(heading.into());
                lines.push(String::new());
                lines.push(version_line);
            }
        }
    }
    out.push_str(&lines.join("\n"));
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_card_has_hf_fields() {
        let c = create_or_update(None, "LORA", "models/llama");
        assert!(c.starts_with("---\nbase_model: models/llama\nlibrary_name: peft\npipeline_tag: text-generation\ntags:\n- base_model:adapter:models/llama\n- lora\n- transformers\n---\n"), "{c}");
        assert!(c.contains("### Framework versions\n\n- PEFT 0.21.0\n"));
    }

    #[test]
    fn update_keeps_user_text_and_tags() {
        let user = "---\nlicense: mit\ntags:\n- my-tag\nbase_model: old/base\nlanguage:\n  - en\n---\n\n# My adapter\n\nTrained on my data.\n";
        let c = create_or_update(Some(user), "LORA", "new/base");
        assert!(c.contains("license: mit\n"), "{c}");
        assert!(c.contains("language:\n  - en\n"), "{c}");
        assert!(c.contains("base_model: new/base\n") && !c.contains("old/base"), "{c}");
        assert!(c.contains("tags:\n- my-tag\n- base_model:adapter:new/base\n- lora\n- transformers\n"), "{c}");
        assert!(c.contains("library_name: peft\n") && c.contains("pipeline_tag: text-generation\n"));
        assert!(c.contains("# My adapter\n\nTrained on my data.\n"), "{c}");
        assert!(c.ends_with("### Framework versions\n\n- PEFT 0.21.0\n"), "{c}");
        // Updating again changes nothing.
        assert_eq!(create_or_update(Some(&c), "LORA", "new/base"), c);
    }

    #[test]
    fn card_without_front_matter_gets_one() {
        let c = create_or_update(Some("# Notes\nhello\n"), "IA3", "b");
        assert!(c.starts_with("---\nbase_model: b\nlibrary_name: peft\npipeline_tag: text-generation\ntags:\n- base_model:adapter:b\n- transformers\n---\n# Notes\nhello\n"), "{c}");
    }
}
