//! SentencePiece-style GGUF tokenizers (`tokenizer.ggml.model = "llama"`) against transformers
//! 5.18: the files and `expected.json` of `__test__/fixtures/spm_tokenizers/`
//! (`__test__/scripts/make_spm_tokenizer_fixtures.py`): a Llama-2-style, a Phi-3-style and a
//! Gemma-style vocabulary, and the vocabulary of the Gemma 3 model fixture `models/gemma3.gguf`.
//! Ids with and without special tokens, tokens, decodes with and without `skip_special_tokens`,
//! the added tokens and special ids all equal transformers' `AutoTokenizer.from_pretrained(dir,
//! gguf_file=...)` exactly. Malformed tokenizer metadata is a
//! coded error naming the file and the key.

mod common;

use candle_core::quantized::gguf_file::Value as Gv;
use common::fixtures_dir;
use peft_core::gguf::{read_gguf_header, read_gguf_tokenizer};
use peft_core::tokenizer::Tokenizer;
use peft_core::PeftError;
use serde_json::Value;
use std::path::PathBuf;

fn expected() -> Value {
    let p = fixtures_dir().join("spm_tokenizers/expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn file(name: &str) -> PathBuf {
    fixtures_dir().join(format!("spm_tokenizers/{name}.gguf"))
}

fn check_against_transformers(name: &str) {
    let exp = &expected()["tokenizers"][name];
    let tok = read_gguf_tokenizer(&fixtures_dir().join(exp["file"].as_str().unwrap()))
        .unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    assert_eq!(tok.vocab_size() as u64, exp["len"].as_u64().unwrap(), "{name}: len(tokenizer)");
    let ids_exp = &exp["special_token_ids"];
    assert_eq!(tok.bos_token_id().map(u64::from), ids_exp["bos_token"].as_u64(), "{name}: bos");
    assert_eq!(tok.eos_token_id().map(u64::from), ids_exp["eos_token"].as_u64(), "{name}: eos");
    assert_eq!(tok.pad_token_id().map(u64::from), ids_exp["pad_token"].as_u64(), "{name}: pad");
    for (k, v) in exp["special_tokens"].as_object().unwrap() {
        let ours = tok.special_tokens().iter().find(|(n, _)| n == k).map(|(_, t)| t.as_str());
        assert_eq!(ours, v.as_str(), "{name}: {k}");
    }
    let added = tok.inner().get_added_tokens_decoder();
    let mut ours: Vec<(u32, String, bool)> = added.iter().map(|(id, t)| (*id, t.content.clone(), t.special)).collect();
    ours.sort();
    let theirs: Vec<(u32, String, bool)> = exp["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a[0].as_u64().unwrap() as u32, a[1].as_str().unwrap().to_string(), a[2].as_bool().unwrap()))
        .collect();
    assert_eq!(ours, theirs, "{name}: added tokens");

    let texts = exp["texts"].as_array().unwrap();
    assert!(texts.len() >= 40, "{name}: {} test strings", texts.len());
    for case in texts {
        let text = case["text"].as_str().unwrap();
        let with = tok.encode(text, true).unwrap_or_else(|e| panic!("{name}: encode {text:?}: {e}"));
        assert_eq!(with, ids(&case["ids"]), "{name}: ids of {text:?}");
        let without = tok.encode(text, false).unwrap();
        assert_eq!(without, ids(&case["ids_no_special"]), "{name}: ids (no special tokens) of {text:?}");
        let pieces: Vec<String> = without.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        let theirs: Vec<&str> = case["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(pieces, theirs, "{name}: tokens of {text:?}");
        assert_eq!(tok.decode(&with, false).unwrap(), case["decoded"].as_str().unwrap(), "{name}: decode of {text:?}");
        assert_eq!(
            tok.decode(&with, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "{name}: decode (skip special) of {text:?}"
        );
    }
    for case in exp["decodes"].as_array().unwrap() {
        let list = ids(&case["ids"]);
        assert_eq!(tok.decode(&list, false).unwrap(), case["decoded"].as_str().unwrap(), "{name}: decode {list:?}");
        assert_eq!(
            tok.decode(&list, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "{name}: decode {list:?} (skip special)"
        );
    }
}

#[test]
fn llama_spm_matches_transformers() {
    check_against_transformers("llama");
}

#[test]
fn phi3_spm_matches_transformers() {
    check_against_transformers("phi3");
}

#[test]
fn gemma_spm_matches_transformers() {
    check_against_transformers("gemma");
}

/// The vocabulary of the Gemma 3 model fixture (`models/gemma3.gguf`, 200 byte tokens: 4-byte
/// UTF-8 becomes `<unk>`; `<mask>` is added as id 256, past the model's 256 rows, as in transformers).
#[test]
fn gemma3_model_fixture_matches_transformers() {
    check_against_transformers("models/gemma3");
}

/// transformers ignores `tokenizer.ggml.add_bos_token` for these files (llama.gguf says true):
/// `encode(.., true)` adds no BOS, as `AutoTokenizer.from_pretrained(dir, gguf_file=...)` does.
#[test]
fn add_bos_token_is_ignored_as_in_transformers() {
    let header = read_gguf_header(&file("llama")).unwrap();
    assert!(matches!(header.metadata.get("tokenizer.ggml.add_bos_token"), Some(Gv::Bool(true))));
    let tok = read_gguf_tokenizer(&file("llama")).unwrap();
    assert_eq!(tok.encode("hello", true).unwrap(), tok.encode("hello", false).unwrap());
}

/// The fixture's metadata changed by `edit`, built with `Tokenizer::from_gguf`.
fn build_edited(name: &str, edit: impl FnOnce(&mut std::collections::HashMap<String, Gv>)) -> peft_core::Result<Tokenizer> {
    let path = file(name);
    let mut content = read_gguf_header(&path).unwrap();
    edit(&mut content.metadata);
    Tokenizer::from_gguf(&content, &path)
}

fn assert_invalid(r: peft_core::Result<Tokenizer>, key: &str, needle: &str) {
    match r {
        Err(e @ PeftError::GgufInvalid { .. }) => {
            let msg = e.to_string();
            assert_eq!(e.code(), "ERR_GGUF_INVALID");
            assert!(msg.contains("spm_tokenizers"), "names the file: {msg}");
            assert!(msg.contains(key), "names `{key}`: {msg}");
            assert!(msg.contains(needle), "mentions {needle:?}: {msg}");
        }
        Err(e) => panic!("expected ERR_GGUF_INVALID for {key}, got [{}] {e}", e.code()),
        Ok(_) => panic!("expected ERR_GGUF_INVALID for {key}, got a tokenizer"),
    }
}

#[test]
fn bad_spm_metadata_is_a_coded_error() {
    assert_invalid(build_edited("llama", |m| drop(m.remove("tokenizer.ggml.scores"))), "tokenizer.ggml.scores", "missing");
    assert_invalid(build_edited("phi3", |m| drop(m.remove("tokenizer.ggml.tokens"))), "tokenizer.ggml.tokens", "missing");
    assert_invalid(build_edited("llama", |m| drop(m.remove("general.architecture"))), "general.architecture", "missing");
    assert_invalid(
        build_edited("llama", |m| drop(m.insert("tokenizer.ggml.scores".into(), Gv::Array(vec![Gv::F32(0.0); 3])))),
        "tokenizer.ggml.scores",
        "3 entries",
    );
    assert_invalid(
        build_edited("llama", |m| {
            if let Some(Gv::Array(a)) = m.get_mut("tokenizer.ggml.scores") {
                a[300] = Gv::F32(f32::NAN);
            }
        }),
        "tokenizer.ggml.scores",
        "NaN",
    );
    assert_invalid(
        build_edited("llama", |m| drop(m.insert("tokenizer.ggml.scores".into(), Gv::String("x".into())))),
        "tokenizer.ggml.scores",
        "array",
    );
    assert_invalid(
        build_edited("gemma", |m| drop(m.insert("tokenizer.ggml.token_type".into(), Gv::Array(vec![Gv::I32(1)])))),
        "tokenizer.ggml.token_type",
        "1 entries",
    );
    assert_invalid(
        build_edited("gemma", |m| drop(m.insert("tokenizer.ggml.bos_token_id".into(), Gv::U32(1 << 20)))),
        "tokenizer.ggml.bos_token_id",
        "out of range",
    );
    assert_invalid(
        build_edited("llama", |m| drop(m.insert("tokenizer.ggml.merges".into(), Gv::Array(vec![Gv::String("a b c".into())])))),
        "tokenizer.ggml.merges",
        "left right",
    );
    assert_invalid(
        build_edited("llama", |m| drop(m.insert("tokenizer.ggml.merges".into(), Gv::Array(vec![Gv::String("\u{2581} zzz".into())])))),
        "tokenizer.ggml.merges",
        "BPE",
    );
    assert_invalid(
        build_edited("llama", |m| drop(m.insert("tokenizer.ggml.tokens".into(), Gv::Array(vec![])))),
        "tokenizer.ggml.tokens",
        "empty",
    );
    // Gemma needs no scores (its merges follow the token order).
    build_edited("gemma", |m| drop(m.remove("tokenizer.ggml.scores"))).unwrap();
    // A byte-level split with a SentencePiece vocabulary is refused, naming the key.
    match build_edited("llama", |m| drop(m.insert("tokenizer.ggml.pre".into(), Gv::String("llama-bpe".into())))) {
        Err(PeftError::Tokenizer(msg)) => {
            assert!(msg.contains("tokenizer.ggml.pre") && msg.contains("llama.gguf"), "{msg}")
        }
        other => panic!("expected ERR_TOKENIZER, got {other:?}"),
    }
}

/// The file's own merges, when it has them, are used instead of merges derived from the scores.
#[test]
fn merges_in_the_file_are_used() {
    let tok = build_edited("llama", |m| {
        m.insert("tokenizer.ggml.merges".into(), Gv::Array(vec![Gv::String("h e".into())]));
    })
    .unwrap();
    let he = tok.token_to_id("he").unwrap();
    let ids = tok.encode("hello", false).unwrap();
    assert!(ids.contains(&he), "{ids:?}");
    assert!(tok.token_to_id("\u{2581}hello").is_some() && !ids.contains(&tok.token_to_id("\u{2581}hello").unwrap()));
}
