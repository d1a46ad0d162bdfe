//! Chat templates: a model's Jinja `chat_template` rendered the way transformers'
//! `apply_chat_template(..., tokenize=False)` renders it, and the assistant-token mask that
//! TRL's `assistant_only_loss` trains on.
//!
//! The engine is [`minijinja`] (as in Hugging Face's Rust servers, TGI and the tokenizers
//! ecosystem) set up like transformers' `_compile_jinja_template` (transformers 5.18,
//! `utils/chat_template_utils.py`):
//!
//! * `trim_blocks` and `lstrip_blocks` on, the template's single trailing newline dropped
//!   (Jinja2's `keep_trailing_newline=False`), loop controls (`break` / `continue`) enabled;
//! * Python string and dict methods (`.strip()`, `.startswith()`, `.split()`, `.items()`,
//!   `.get()`, ...) from `minijinja_contrib::pycompat`;
//! * `raise_exception(msg)` fails the render with `msg` ([`PeftError::ChatTemplate`]);
//! * `strftime_now(fmt)`: the local time formatted with `fmt` (Python's `datetime.now().strftime`);
//! * `tojson` is Python's `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
//!   sort_keys=False)` (transformers replaces Jinja's HTML-escaping filter with it), with the
//!   same keyword arguments;
//! * the variables are those transformers passes: `messages`, `tools` (`none` unless given),
//!   `documents` (`none`), `add_generation_prompt`, the tokenizer's special tokens
//!   (`bos_token`, `eos_token`, `unk_token`, `pad_token`, ...) and any extra keyword arguments
//!   (e.g. `date_string`, `enable_thinking`), which override the special tokens.
//!
//! transformers' own `{% generation %}` / `{% endgeneration %}` tags (its `AssistantTracker`
//! extension, used by `return_assistant_tokens_mask`) are accepted: they are rewritten into
//! blocks that mark the generated text, and render to nothing themselves.
//!
//! ```
//! use peft_core::chat_template::{ChatTemplate, RenderContext};
//! let t = ChatTemplate::new("{% for m in messages %}<|{{ m.role }}|>{{ m.content.strip() }}\n{% endfor %}").unwrap();
//! let msgs = serde_json::json!([{"role": "user", "content": " Hi! "}]);
//! let out = t.render(msgs.as_array().unwrap(), &RenderContext::default()).unwrap();
//! assert_eq!(out, "<|user|>Hi!\n");
//! ```

use crate::error::{PeftError, Result};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::Value as Json;
use std::fmt::Write as _;

/// Sentinels marking generated text (`{% generation %}` blocks and assistant contents) in a
/// rendering: characters of Unicode's private use area, refused in message contents.
const GEN_START: char = '\u{F0000}';
const GEN_END: char = '\u{F0001}';

/// Variables of a render besides `messages`.
#[derive(Debug, Clone, Default)]
pub struct RenderContext {
    /// Append the prompt that opens an assistant turn (transformers' `add_generation_prompt`).
    pub add_generation_prompt: bool,
    /// Special tokens by name (`bos_token`, `eos_token`, `unk_token`, `pad_token`, ...), as
    /// transformers' `special_tokens_map`.
    pub special_tokens: Vec<(String, String)>,
    /// Tool schemas (`tools`); `None` renders as `none`, as in transformers.
    pub tools: Option<Json>,
    /// Documents for retrieval-augmented templates (`documents`); `None` renders as `none`.
    pub documents: Option<Json>,
    /// Extra template variables (transformers' `**kwargs`); they override special tokens.
    pub extra: serde_json::Map<String, Json>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    has_generation_tags: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("chars", &self.source.len()).field("has_generation_tags", &self.has_generation_tags).finish()
    }
}

/// `{%(-|+)? (end)?generation (-|+)?%}` → a transparent `if` block that outputs a sentinel,
/// keeping the tag's whitespace control (the tag's left marker and `lstrip_blocks` act
/// before it, its right marker and `trim_blocks` after it).
fn rewrite_generation_tags(source: &str) -> (String, bool) {
    let re = regex::Regex::new(r"\{%([-+]?)\s*(end)?generation\s*([-+]?)%\}").expect("valid regex");
    let mut found = false;
    let out = re.replace_all(source, |c: &regex::Captures| {
        found = true;
        let (l, r) = (&c[1], &c[3]);
        if c.get(2).is_some() {
            format!("{{%{l} endif %}}{{% if true %}}{{{{ '{GEN_END}' }}}}{{% endif {r}%}}")
        } else {
            format!("{{%{l} if true %}}{{{{ '{GEN_START}' }}}}{{% endif %}}{{% if true {r}%}}")
        }
    });
    (out.into_owned(), found)
}

fn jinja_err(e: JinjaError) -> PeftError {
    // `raise_exception` puts the template's own message first; syntax and type errors get
    // minijinja's description with the line.
    let mut msg = match e.kind() {
        ErrorKind::InvalidOperation if e.detail().is_some() => e.detail().unwrap_or_default().to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        if !msg.contains("line") {
            let _ = write!(msg, " (template line {line})");
        }
    }
    PeftError::ChatTemplate(msg)
}

/// Python's `json.dumps` string escaping (`ensure_ascii` as given).
fn py_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{:04x}", u);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)` as `json.dumps` writes it.
pub(crate) fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        // Python: 1e+16, 1.5e-05
        let s = format!("{:e}", f);
        let (m, e) = s.split_once('e').expect("exponent");
        let e: i32 = e.parse().expect("exponent");
        return format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    let s = format!("{:?}", f);
    if s.contains('.') || s.contains('e') {
        s
    } else {
        format!("{s}.0")
    }
}

struct JsonStyle<'a> {
    indent: Option<String>,
    item_sep: &'a str,
    key_sep: &'a str,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn py_json(v: &Value, st: &JsonStyle, level: usize, out: &mut String) -> std::result::Result<(), JinjaError> {
    let newline = |out: &mut String, level: usize| {
        if let Some(ind) = &st.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Ok(f) = f64::try_from(v.clone()) {
                if f.fract() == 0.0 && v.to_string().chars().all(|c| c.is_ascii_digit() || c == '-') {
                    out.push_str(&v.to_string());
                } else {
                    out.push_str(&py_float(f));
                }
            } else {
                out.push_str(&v.to_string());
            }
        }
        ValueKind::String | ValueKind::Bytes => py_json_str(v.as_str().unwrap_or_default(), st.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(st.item_sep);
                }
                newline(out, level + 1);
                py_json(item, st, level + 1, out)?;
            }
            newline(out, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if st.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(st.item_sep);
                }
                newline(out, level + 1);
                let key = match k.kind() {
                    ValueKind::String => k.as_str().unwrap_or_default().to_string(),
                    ValueKind::None => "null".into(),
                    ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).into(),
                    _ => k.to_string(),
                };
                py_json_str(&key, st.ensure_ascii, out);
                out.push_str(st.key_sep);
                py_json(&v.get_item(k)?, st, level + 1, out)?;
            }
            newline(out, level);
            out.push('}');
        }
        _ => return Err(JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: object of type {} is not JSON serializable", v.kind()))),
    }
    Ok(())
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`.
fn tojson(v: &Value, kwargs: Kwargs) -> std::result::Result<Value, JinjaError> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(i) if i.is_none() => None,
        Some(i) if i.kind() == ValueKind::Number => Some(" ".repeat(i.as_i64().unwrap_or(0).max(0) as usize)),
        Some(i) => Some(i.as_str().unwrap_or_default().to_string()),
    };
    let (item_sep, key_sep) = match separators.filter(|s| !s.is_none()) {
        Some(s) => {
            let parts: Vec<Value> = s.try_iter()?.collect();
            if parts.len() != 2 {
                return Err(JinjaError::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair of strings"));
            }
            (parts[0].to_string(), parts[1].to_string())
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let st = JsonStyle { indent, item_sep: &item_sep, key_sep: &key_sep, sort_keys: sort_keys.unwrap_or(false), ensure_ascii: ensure_ascii.unwrap_or(false) };
    let mut out = String::new();
    py_json(v, &st, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn raise_exception(msg: String) -> std::result::Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(fmt: String) -> std::result::Result<Value, JinjaError> {
    use std::fmt::Write;
    let mut s = String::new();
    write!(s, "{}", chrono::Local::now().format(&fmt))
        .map_err(|_| JinjaError::new(ErrorKind::InvalidOperation, format!("strftime_now: invalid format `{fmt}`")))?;
    Ok(Value::from(s))
}

impl ChatTemplate {
    /// Compile a template source (a `chat_template` string or a `chat_template.jinja` file's
    /// text).
    ///
    /// Errors: `ChatTemplate` with minijinja's description and line for a syntax error.
    pub fn new(source: &str) -> Result<Self> {
        let (rewritten, has_generation_tags) = rewrite_generation_tags(source);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat_template", rewritten).map_err(jinja_err)?;
        Ok(ChatTemplate { env, source: source.to_string(), has_generation_tags })
    }

    /// The template's source as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template marks assistant text with transformers' `{% generation %}` tags.
    pub fn has_generation_tags(&self) -> bool {
        self.has_generation_tags
    }

    fn render_raw(&self, messages: &[Json], ctx: &RenderContext) -> Result<String> {
        let mut vars = serde_json::Map::new();
        for (k, v) in &ctx.special_tokens {
            vars.insert(k.clone(), Json::String(v.clone()));
        }
        for (k, v) in &ctx.extra {
            vars.insert(k.clone(), v.clone());
        }
        vars.insert("messages".into(), Json::Array(messages.to_vec()));
        vars.insert("tools".into(), ctx.tools.clone().unwrap_or(Json::Null));
        vars.insert("documents".into(), ctx.documents.clone().unwrap_or(Json::Null));
        vars.insert("add_generation_prompt".into(), Json::Bool(ctx.add_generation_prompt));
        let tmpl = self.env.get_template("chat_template").map_err(jinja_err)?;
        tmpl.render(Value::from_serialize(&vars)).map_err(jinja_err)
    }

    /// Render `messages` (JSON objects, usually `{"role", "content"}`; other fields such as
    /// `tool_calls` are passed through) as transformers' `apply_chat_template(messages,
    /// tokenize=False, add_generation_prompt=...)` does, byte for byte.
    ///
    /// Errors: `ChatTemplate` with the template's `raise_exception` message (e.g. Gemma's
    /// `System role not supported`) or minijinja's error and line; `InvalidArgument` when a
    /// message contains the private-use characters U+F0000 / U+F0001 that mark generated text.
    pub fn render(&self, messages: &[Json], ctx: &RenderContext) -> Result<String> {
        check_no_sentinels(messages)?;
        let out = self.render_raw(messages, ctx)?;
        Ok(if self.has_generation_tags { out.replace([GEN_START, GEN_END], "") } else { out })
    }

    /// Render `messages` and find the byte ranges of the assistant turns in the result, the
    /// text TRL's `assistant_only_loss` trains on.
    ///
    /// With `{% generation %}` tags in the template, the ranges are the tagged text
    /// (transformers' `return_assistant_tokens_mask`). Otherwise each assistant message's
    /// content (when not blank) is located by rendering once with its non-blank core wrapped in two
    /// private-use marker characters (so templates that `trim` or `strip()` the content behave
    /// as with the plain content; the rendering without the markers must equal the plain one)
    /// and the range is extended over the end-of-turn text the template writes right after the
    /// content (`<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`, ...): the text after the
    /// content in the rendering of the conversation up to and including that message, without
    /// its trailing whitespace. A content's leading whitespace is not in its range; its trailing
    /// whitespace is when the template writes it before the end-of-turn text (ChatML's
    /// `content + '<|im_end|>'`), since the model has to generate it.
    ///
    /// Returns `(text, ranges)`; the ranges are sorted and disjoint.
    ///
    /// Errors: `ChatTemplate` when the template fails, or when the assistant text cannot be
    /// located (a template that rewrites or drops assistant contents, such as one that removes
    /// earlier turns' reasoning; add `{% generation %}` tags to such a template).
    pub fn render_with_assistant_ranges(&self, messages: &[Json], ctx: &RenderContext) -> Result<(String, Vec<(usize, usize)>)> {
        check_no_sentinels(messages)?;
        if self.has_generation_tags {
            let raw = self.render_raw(messages, ctx)?;
            let (text, mut ranges) = split_marked(&raw).ok_or_else(|| {
                PeftError::ChatTemplate("the {% generation %} blocks of the template are unbalanced in the rendering".into())
            })?;
            ranges.retain(|(a, b)| b > a);
            return Ok((text, ranges));
        }
        let plain = self.render_raw(messages, ctx)?;
        let assistant: Vec<usize> = messages
            .iter()
            .enumerate()
            // Assistant messages with text (a blank content, e.g. beside `tool_calls`, has no text to mark).
            .filter(|(_, m)| {
                m.get("role").and_then(Json::as_str) == Some("assistant")
                    && m.get("content").and_then(Json::as_str).map(|c| !c.trim().is_empty()).unwrap_or(false)
            })
            .map(|(i, _)| i)
            .collect();
        if assistant.is_empty() {
            return Ok((plain, Vec::new()));
        }
        let marked_msgs = mark_contents(messages, &assistant);
        let marked = self.render_raw(&marked_msgs, ctx)?;
        let (text, content_ranges) = split_marked(&marked).filter(|(t, r)| *t == plain && r.len() == assistant.len()).ok_or_else(|| {
            PeftError::ChatTemplate(
                "cannot locate the assistant messages in the rendering: the template rewrites or drops assistant contents \
                 (mark the assistant text with {% generation %} ... {% endgeneration %} in the template instead)"
                    .into(),
            )
        })?;
        let mut ranges = Vec::with_capacity(assistant.len());
        for (k, &i) in assistant.iter().enumerate() {
            // The end-of-turn text: what the template writes after this content when the
            // conversation stops after it.
            let upto = self.render_raw(&mark_contents(&messages[..=i], &[i]), &RenderContext { add_generation_prompt: false, ..ctx.clone() })?;
            let suffix = match upto.rfind(GEN_END) {
                Some(p) => upto[p + GEN_END.len_utf8()..].trim_end().to_string(),
                None => String::new(),
            };
            let (s, e) = content_ranges[k];
            let end = if !suffix.is_empty() && text[e..].starts_with(&suffix) { e + suffix.len() } else { e };
            ranges.push((s, end));
        }
        Ok((text, ranges))
    }
}

/// Wrap the non-blank core of the contents of `which` messages in the sentinels.
fn mark_contents(messages: &[Json], which: &[usize]) -> Vec<Json> {
    let mut out = messages.to_vec();
    for &i in which {
        if let Some(c) = out[i].get("content").and_then(Json::as_str) {
            let core = c.trim();
            let lead = c.len() - c.trim_start().len();
            let marked = if core.is_empty() {
                format!("{c}{GEN_START}{GEN_END}")
            } else {
                format!("{}{GEN_START}{core}{GEN_END}{}", &c[..lead], &c[lead + core.len()..])
            };
            out[i]["content"] = Json::String(marked);
        }
    }
    out
}

/// Remove the sentinels from `s`, returning the text and the byte ranges they enclosed
/// (`None` when they are not properly paired).
fn split_marked(s: &str) -> Option<(String, Vec<(usize, usize)>)> {
    let mut text = String::with_capacity(s.len());
    let mut ranges = Vec::new();
    let mut open: Option<usize> = None;
    for c in s.chars() {
        match c {
            GEN_START => {
                if open.is_some() {
                    return None;
                }
                open = Some(text.len());
            }
            GEN_END => ranges.push((open.take()?, text.len())),
            c => text.push(c),
        }
    }
    if open.is_some() {
        return None;
    }
    Some((text, ranges))
}

fn check_no_sentinels(messages: &[Json]) -> Result<()> {
    fn has(v: &Json) -> bool {
        match v {
            Json::String(s) => s.contains([GEN_START, GEN_END]),
            Json::Array(a) => a.iter().any(has),
            Json::Object(o) => o.values().any(has),
            _ => false,
        }
    }
    if let Some(i) = messages.iter().position(has) {
        return Err(PeftError::invalid_arg("messages", format!("message {i} contains U+F0000 or U+F0001, which mark generated text while rendering")));
    }
    Ok(())
}

/// Per-token assistant mask (1 = assistant text) from byte `offsets` of tokens and byte
/// `ranges` of assistant text: a token is marked when its bytes overlap a range, as
/// transformers marks every token that `char_to_token` gives for a character of a
/// `{% generation %}` block.
pub fn token_mask(offsets: &[(usize, usize)], ranges: &[(usize, usize)]) -> Vec<u8> {
    offsets
        .iter()
        .map(|&(s, e)| {
            let (s, e) = if e == s { (s, s + 1) } else { (s, e) };
            u8::from(ranges.iter().any(|&(a, b)| s < b && a < e))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, v: Json) -> String {
        ChatTemplate::new(src).unwrap().render(&[], &RenderContext { extra: v.as_object().unwrap().clone(), ..Default::default() }).unwrap()
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let v = json!({"x": {"b": [1, 2.5, "é\"\n<>&", null, true], "a": {}}});
        assert_eq!(render("{{ x | tojson }}", v.clone()), r#"{"b": [1, 2.5, "é\"\n<>&", null, true], "a": {}}"#);
        assert_eq!(render("{{ x | tojson(indent=2) }}", v.clone()), "{\n  \"b\": [\n    1,\n    2.5,\n    \"é\\\"\\n<>&\",\n    null,\n    true\n  ],\n  \"a\": {}\n}");
        assert_eq!(render("{{ x | tojson(sort_keys=true, ensure_ascii=true) }}", v), r#"{"a": {}, "b": [1, 2.5, "\u00e9\"\n<>&", null, true]}"#);
        assert_eq!(py_float(1e16), "1e+16");
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(1.5e-5), "1.5e-05");
    }

    #[test]
    fn generation_tags_mark_text_and_keep_whitespace_control() {
        let src = "{% for m in messages %}{{ m.role }}:\n  {%- if m.role == 'assistant' %}\n{% generation %}\n{{ m.content }}!{% endgeneration %}\n{% else %} {{ m.content }}{% endif %}|{% endfor %}";
        let msgs = [json!({"role": "user", "content": "a"}), json!({"role": "assistant", "content": "b"})];
        let t = ChatTemplate::new(src).unwrap();
        assert!(t.has_generation_tags());
        // Jinja2 (transformers' environment) renders this to the same text.
        let want = "user: a|assistant:b!|";
        let (text, ranges) = t.render_with_assistant_ranges(&msgs, &RenderContext::default()).unwrap();
        assert_eq!(text, want);
        assert_eq!(t.render(&msgs, &RenderContext::default()).unwrap(), want);
        assert_eq!(ranges.iter().map(|&(a, b)| &text[a..b]).collect::<Vec<_>>(), vec!["b!"]);
    }

    #[test]
    fn token_mask_overlap() {
        assert_eq!(token_mask(&[(0, 2), (2, 4), (4, 6), (6, 6)], &[(3, 5)]), vec![0, 1, 1, 0]);
    }
}
