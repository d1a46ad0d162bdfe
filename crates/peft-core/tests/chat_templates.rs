//! Chat templates of real models rendered byte for byte as transformers 5.18 renders them
//! (`__test__/fixtures/chat_templates/expected.json`, made by
//! `__test__/scripts/make_chat_template_fixtures.py`), and the assistant-token mask.

use peft_core::chat_template::{ChatTemplate, RenderContext};
use peft_core::tokenizer::{ChatOptions, Tokenizer};
use peft_core::PeftError;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../__test__/fixtures/chat_templates")
}

fn template(name: &str) -> String {
    std::fs::read_to_string(fixtures().join(name)).unwrap()
}

fn ctx_of(case: &Value) -> RenderContext {
    RenderContext {
        add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
        special_tokens: case["special_tokens"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect(),
        tools: case.get("tools").cloned(),
        documents: None,
        extra: case["kwargs"].as_object().unwrap().clone(),
    }
}

#[test]
fn real_templates_render_like_transformers() {
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    let mut templates = std::collections::BTreeSet::new();
    let (mut rendered, mut raised) = (0, 0);
    for case in cases {
        let name = case["template"].as_str().unwrap();
        templates.insert(name.to_string());
        let t = ChatTemplate::new(&template(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let what = format!("{name} / {} / add_generation_prompt={}", case["conversation"], case["add_generation_prompt"]);
        let got = t.render(case["messages"].as_array().unwrap(), &ctx_of(case));
        match (case.get("rendered"), got) {
            (Some(want), Ok(got)) => {
                assert_eq!(got, want.as_str().unwrap(), "{what}");
                rendered += 1;
            }
            (None, Err(PeftError::ChatTemplate(msg))) => {
                let want = case["error"].as_str().unwrap();
                assert!(msg.starts_with(want), "{what}: error `{msg}`, transformers raised `{want}`");
                raised += 1;
            }
            (want, got) => panic!("{what}: expected {want:?}, got {got:?}"),
        }
    }
    assert_eq!(templates.len(), 5, "{templates:?}");
    assert!(rendered >= 60 && raised >= 8, "rendered {rendered}, raised {raised}");
}

/// The text covered by each assistant range.
fn spans(text: &str, ranges: &[(usize, usize)]) -> Vec<String> {
    ranges.iter().map(|&(a, b)| text[a..b].to_string()).collect()
}

#[test]
fn assistant_ranges_cover_content_and_end_of_turn() {
    let conv = json!([
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": " Bonjour !\n"},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "De rien."}
    ]);
    let conv = conv.as_array().unwrap();
    let no_system = &conv[1..];
    let ctx = |bos: &str, eos: &str| RenderContext {
        special_tokens: vec![("bos_token".into(), bos.into()), ("eos_token".into(), eos.into())],
        extra: json!({"date_string": "26 Jul 2024"}).as_object().unwrap().clone(),
        ..Default::default()
    };
    let cases: [(&str, &[Value], RenderContext, [&str; 2]); 5] = [
        ("HuggingFaceTB-SmolLM2-135M-Instruct.jinja", conv, ctx("<|im_start|>", "<|im_end|>"), ["Bonjour !\n<|im_end|>", "De rien.<|im_end|>"]),
        ("Qwen-Qwen2.5-7B-Instruct.jinja", conv, ctx("", "<|im_end|>"), ["Bonjour !\n<|im_end|>", "De rien.<|im_end|>"]),
        // The content's leading space is never in the range; its trailing newline is where the
        // template keeps it (it comes before the end-of-turn token); Llama and Gemma trim it.
        ("meta-llama-Llama-3.2-3B-Instruct.jinja", conv, ctx("<|begin_of_text|>", "<|eot_id|>"), ["Bonjour !<|eot_id|>", "De rien.<|eot_id|>"]),
        ("mistralai-Mistral-Nemo-Instruct-2407.jinja", conv, ctx("<s>", "</s>"), ["Bonjour !\n</s>", "De rien.</s>"]),
        ("google-gemma-2-2b-it.jinja", no_system, ctx("<bos>", "<eos>"), ["Bonjour !<end_of_turn>", "De rien.<end_of_turn>"]),
    ];
    for (name, msgs, ctx, want) in cases {
        let t = ChatTemplate::new(&template(name)).unwrap();
        let (text, ranges) = t.render_with_assistant_ranges(msgs, &ctx).unwrap();
        assert_eq!(text, t.render(msgs, &ctx).unwrap(), "{name}: the text is the plain rendering");
        assert_eq!(spans(&text, &ranges), want, "{name}");
    }
}

#[test]
fn assistant_ranges_refuse_a_template_that_rewrites_contents() {
    // Like Qwen3's template: earlier assistant turns lose the text before `</think>`.
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}|{% endfor %}",
    )
    .unwrap();
    let msgs = json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>x</think>a"}, {"role": "user", "content": "q2"}]);
    let err = t.render_with_assistant_ranges(msgs.as_array().unwrap(), &RenderContext::default()).unwrap_err();
    assert!(matches!(&err, PeftError::ChatTemplate(m) if m.contains("{% generation %}")), "{err}");
    // With transformers' generation tags the same template works.
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{% if not loop.last %}{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}.{% endgeneration %}{% else %}{{ m.content }}{% endif %}|{% endfor %}",
    )
    .unwrap();
    let (text, ranges) = t.render_with_assistant_ranges(msgs.as_array().unwrap(), &RenderContext::default()).unwrap();
    assert_eq!(text, "q|a.|q2|");
    assert_eq!(spans(&text, &ranges), ["a."]);
}

#[test]
fn template_errors_have_their_code_and_message() {
    let gemma = ChatTemplate::new(&template("google-gemma-2-2b-it.jinja")).unwrap();
    let err = gemma.render(json!([{"role": "system", "content": "x"}]).as_array().unwrap(), &RenderContext::default()).unwrap_err();
    assert_eq!(err.code(), "ERR_CHAT_TEMPLATE");
    assert!(err.to_string().contains("System role not supported"), "{err}");
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }").unwrap_err();
    assert_eq!(err.code(), "ERR_CHAT_TEMPLATE");
    assert!(err.to_string().contains("line 1"), "{err}");
    // Markers of generated text may not appear in messages.
    let err = gemma.render(json!([{"role": "user", "content": "a\u{F0000}"}]).as_array().unwrap(), &RenderContext::default()).unwrap_err();
    assert_eq!(err.code(), "ERR_INVALID_ARGUMENT");
}

#[test]
fn strftime_now_formats_the_local_date() {
    let t = ChatTemplate::new("{{ strftime_now('%Y') }}").unwrap();
    let year = t.render(&[], &RenderContext::default()).unwrap();
    assert_eq!(year, chrono::Local::now().format("%Y").to_string());
}

// ---------------------------------------------------------------------------------------------
// Tokenizer integration (the real SmolLM2 GGUF when cached, else skipped with a message)
// ---------------------------------------------------------------------------------------------

fn smollm2() -> Option<Tokenizer> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let p = std::env::var("PEFT_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|_| root.join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if !p.is_file() {
        eprintln!("skipped: {} is not cached (npm run demo fetches it)", p.display());
        return None;
    }
    Some(Tokenizer::from_pretrained(&p).unwrap())
}

#[test]
fn smollm2_gguf_template_and_assistant_mask() {
    let Some(tok) = smollm2() else { return };
    assert_eq!(tok.chat_template(), Some(template("HuggingFaceTB-SmolLM2-135M-Instruct.jinja").as_str()));
    let msgs = json!([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]);
    let msgs = msgs.as_array().unwrap();
    let text = tok.apply_chat_template(msgs, &ChatOptions::default()).unwrap();
    assert!(text.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), "{text}");
    for (tmpl, want) in [(None, "4.<|im_end|>"), (Some(template("meta-llama-Llama-3.2-3B-Instruct.jinja")), "4.<|eot_id|>")] {
        let opts = ChatOptions { chat_template: tmpl.clone(), extra: json!({"date_string": "26 Jul 2024"}).as_object().unwrap().clone(), ..Default::default() };
        let enc = tok.encode_chat(msgs, &opts).unwrap();
        assert_eq!(enc.text, tok.apply_chat_template(msgs, &opts).unwrap());
        assert_eq!(enc.ids, tok.encode(&enc.text, false).unwrap(), "same ids as encoding the text");
        assert_eq!(enc.assistant_mask.len(), enc.ids.len());
        let kept: Vec<u32> = enc.ids.iter().zip(&enc.assistant_mask).filter(|(_, &m)| m == 1).map(|(&i, _)| i).collect();
        assert_eq!(tok.decode(&kept, false).unwrap(), want, "template {:?}", tmpl.map(|_| "llama"));
        // The mask is one contiguous run at the end of the assistant turn.
        let first = enc.assistant_mask.iter().position(|&m| m == 1).unwrap();
        assert!(enc.assistant_mask[first..first + kept.len()].iter().all(|&m| m == 1));
    }
}

#[test]
fn a_tokenizer_without_template_says_so() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/llama_tokenizer");
    let tok = Tokenizer::from_pretrained(&dir).unwrap();
    let msgs = json!([{"role": "user", "content": "x"}]);
    let err = tok.apply_chat_template(msgs.as_array().unwrap(), &ChatOptions::default()).unwrap_err();
    assert_eq!(err.code(), "ERR_CHAT_TEMPLATE");
    assert!(err.to_string().contains("has no chat template") && err.to_string().contains("llama_tokenizer"), "{err}");
    // A template given in the options is used.
    let opts = ChatOptions { chat_template: Some("{{ bos_token }}{{ messages[0].content }}".into()), ..Default::default() };
    assert_eq!(tok.apply_chat_template(msgs.as_array().unwrap(), &opts).unwrap(), "<s>x");
}

/// transformers' `{% generation %}` tags: the rendering and the tagged texts
/// (`return_assistant_tokens_mask`'s character ranges) equal transformers'.
#[test]
fn generation_tags_mark_what_transformers_marks() {
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("generation_expected.json")).unwrap()).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 9);
    for case in cases {
        let what = format!("{} / {}", case["name"], case["conversation"]);
        let t = ChatTemplate::new(case["template"].as_str().unwrap()).unwrap();
        assert!(t.has_generation_tags(), "{what}");
        let msgs = case["messages"].as_array().unwrap();
        let (text, ranges) = t.render_with_assistant_ranges(msgs, &RenderContext::default()).unwrap();
        assert_eq!(text, case["rendered"].as_str().unwrap(), "{what}");
        assert_eq!(t.render(msgs, &RenderContext::default()).unwrap(), text, "{what}");
        let want: Vec<String> = case["assistant_texts"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        assert_eq!(spans(&text, &ranges), want, "{what}");
    }
}

/// An assistant message without text (a tool call) has no range; the rendering is unchanged.
#[test]
fn assistant_tool_call_without_text_has_no_range() {
    let t = ChatTemplate::new(&template("Qwen-Qwen2.5-7B-Instruct.jinja")).unwrap();
    let msgs = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18°C"},
        {"role": "assistant", "content": "It is 18°C."}
    ]);
    let msgs = msgs.as_array().unwrap();
    let ctx = RenderContext::default();
    let (text, ranges) = t.render_with_assistant_ranges(msgs, &ctx).unwrap();
    assert_eq!(text, t.render(msgs, &ctx).unwrap());
    // transformers 5.18's rendering of the same messages
    let want = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n\
                <|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n\
                <|im_start|>user\n<tool_response>\n18°C\n</tool_response><|im_end|>\n<|im_start|>assistant\nIt is 18°C.<|im_end|>\n";
    assert_eq!(text, want);
    assert_eq!(spans(&text, &ranges), ["It is 18°C.<|im_end|>"]);
}
