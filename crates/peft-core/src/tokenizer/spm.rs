//! SentencePiece-style GGUF vocabularies (`tokenizer.ggml.model = "llama"`: Llama 2, Mistral v0.1,
//! Phi-3 / Phi-3.5-mini, Gemma 1-3), built the way transformers 5.18 builds them when it reads a
//! GGUF (`integrations/gguf/gguf_tokenizer_mapping.py`), so that ids and decodes are transformers'.
//!
//! The file holds `tokenizer.ggml.tokens` (id = index), `tokenizer.ggml.scores`,
//! `tokenizer.ggml.token_type` and usually no merges. The tokenizer is a `BPE` model with byte
//! fallback (`<0x41>` tokens) and `fuse_unk`, over the vocabulary `{token: last index}` and the
//! merges of `tokenizer.ggml.merges` or, without them, the merges its vocabulary implies: every
//! split of a token into two vocabulary tokens, ordered best first by (score, left length, right
//! length) — the score being `tokenizer.ggml.scores`, or for Gemma minus the token's position
//! (transformers' `generate_merges`). Around it, chosen by `general.architecture`:
//!
//! | family | normalizer | pre-tokenizer | decoder | BPE unk |
//! | --- | --- | --- | --- | --- |
//! | Llama (any other architecture) | none | `Metaspace("▁", prepend first, no split)` | `Replace("▁", " ")`, `ByteFallback`, `Fuse`, `Strip(" ", 1, 0)` | none |
//! | Phi-3 (`phi3`) | `Prepend("▁")`, `Replace(" ", "▁")` | none | as Llama | none |
//! | Gemma (`gemma`, `gemma2`, `gemma3`) | `Replace(" ", "▁")` | `Split(" ", merged with previous)` | `Replace("▁", " ")`, `ByteFallback`, `Fuse` | `"<unk>"` |
//!
//! Gemma files spell tokens made only of whitespace that contain a space with real spaces; they
//! become that many `▁` first. Special tokens, in transformers' order: the class defaults
//! (`<s>`, `</s>`, `<unk>` for Llama and Phi-3; `<bos>`, `<eos>`, `<unk>`, `<pad>`, `<mask>` for
//! Gemma), then every control token (`token_type` 3), are special added tokens (a default missing
//! from the vocabulary gets the next free id); user-defined tokens (4) that are in the vocabulary
//! are plain added tokens; the tokens of `tokenizer.ggml.{bos,eos,unknown,padding}_token_id` are
//! special too. All are matched whole in text, before the normalizer.
//!
//! transformers 5.18 ignores `tokenizer.ggml.add_bos_token` / `add_eos_token` and
//! `add_space_prefix` for these files: `encode(.., true)` adds nothing, as there.

use super::Tokenizer;
use crate::error::{PeftError, Result};
use crate::gguf_container::meta;
use candle_core::quantized::gguf_file;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// `tokenizer.ggml.pre` values for which transformers replaces the pre-tokenizer with a
/// byte-level regex split (`GGUF_PRE_TOKENIZER_SPLITS`); nonsense for a SentencePiece vocabulary,
/// and refused here.
const BYTE_LEVEL_PRE: [&str; 23] = [
    "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano", "dbrx",
    "smaug-bpe", "tekken", "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "qwen35", "gpt-4o", "llama4",
    "kanana2", "talkie", "minimax-m2",
];

/// Which of transformers' SentencePiece builders a GGUF architecture gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Llama,
    Phi3,
    Gemma,
}

impl Family {
    fn of(arch: &str) -> Self {
        match arch {
            "gemma" | "gemma2" | "gemma3" => Family::Gemma,
            "phi3" => Family::Phi3,
            _ => Family::Llama,
        }
    }

    /// The special tokens transformers' tokenizer class adds on construction (`LlamaTokenizer`,
    /// `GemmaTokenizer` defaults), in `SPECIAL_TOKENS_ATTRIBUTES` order.
    fn class_defaults(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Family::Llama | Family::Phi3 => &[("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")],
            Family::Gemma => &[
                ("bos_token", "<bos>"),
                ("eos_token", "<eos>"),
                ("unk_token", "<unk>"),
                ("pad_token", "<pad>"),
                ("mask_token", "<mask>"),
            ],
        }
    }
}

/// Python's `str.isspace` for one character: Unicode `White_Space` plus the separators
/// U+001C..U+001F, which Python also counts.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Gemma files store tokens of spaces (and other whitespace) with real spaces: those become as
/// many `▁` as they have characters.
fn gemma_spelling(token: &str) -> String {
    if token.contains(' ') && token.chars().all(py_isspace) {
        "\u{2581}".repeat(token.chars().count())
    } else {
        token.to_string()
    }
}

/// transformers' `generate_merges(vocab, vocab_scores)`: for each distinct token in order of first
/// appearance (with the score of its last appearance), every split into a left and right part
/// that are both in `vocab`, those of one token ordered by the parts' ids; then all of them,
/// stably, by (score, left length, right length) descending, lengths in characters.
fn merges_from_vocab(tokens: &[String], scores: &[f64], vocab: &Vocab) -> Vec<(String, String)> {
    let mut order: Vec<(&str, f64)> = Vec::with_capacity(tokens.len());
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (t, &s) in tokens.iter().zip(scores) {
        match seen.get(t.as_str()) {
            Some(&i) => order[i].1 = s,
            None => {
                seen.insert(t, order.len());
                order.push((t, s));
            }
        }
    }
    struct Merge<'a> {
        left: &'a str,
        right: &'a str,
        score: f64,
        left_len: usize,
        right_len: usize,
    }
    let mut merges: Vec<Merge> = Vec::new();
    let mut local: Vec<(u32, u32, usize)> = Vec::new();
    for &(token, score) in &order {
        local.clear();
        for (at, _) in token.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (vocab.get(&token[..at]), vocab.get(&token[at..])) {
                local.push((l, r, at));
            }
        }
        local.sort_by_key(|&(l, r, _)| (l, r));
        for &(_, _, at) in &local {
            let (left, right) = token.split_at(at);
            merges.push(Merge { left, right, score, left_len: left.chars().count(), right_len: right.chars().count() });
        }
    }
    // Scores are checked to be numbers, so partial_cmp never fails.
    merges.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.left_len.cmp(&a.left_len))
            .then(b.right_len.cmp(&a.right_len))
    });
    merges.into_iter().map(|m| (m.left.to_string(), m.right.to_string())).collect()
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> PeftError {
    PeftError::Tokenizer(format!("{}: cannot build the SentencePiece tokenizer: {e}", path.display()))
}

/// Build the tokenizer of a GGUF file whose `tokenizer.ggml.model` is `"llama"` (see the module
/// docs for what is built).
///
/// Errors: `GgufInvalid` naming the file and key when `general.architecture`,
/// `tokenizer.ggml.tokens` or (without merges, except for Gemma) `tokenizer.ggml.scores` is
/// missing, when a key has the wrong type, when `scores` / `token_type` do not have one entry per
/// token, when a score is NaN, when a merge is not `"left right"` or names unknown tokens, or when
/// a special token id is out of range; `Tokenizer` naming the file and `tokenizer.ggml.pre` for a
/// byte-level pre-tokenizer.
pub(super) fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Tokenizer> {
    let bad = |msg: String| PeftError::GgufInvalid { path: path.to_path_buf(), msg };
    let md = &content.metadata;
    let arch = meta::string(md, "general.architecture", path)?
        .ok_or_else(|| bad("missing metadata key `general.architecture` (needed to build its SentencePiece tokenizer)".into()))?;
    let family = Family::of(&arch);
    if let Some(pre) = meta::string(md, "tokenizer.ggml.pre", path)? {
        if BYTE_LEVEL_PRE.contains(&pre.as_str()) {
            return Err(PeftError::Tokenizer(format!(
                "{}: `tokenizer.ggml.pre = {pre}` (a byte-level split) with the SentencePiece tokenizer model \
                 `tokenizer.ggml.model = llama` is not supported; load the model's tokenizer.json instead",
                path.display()
            )));
        }
    }
    let file_tokens = meta::string_array(md, "tokenizer.ggml.tokens", path)?
        .ok_or_else(|| bad("missing metadata key `tokenizer.ggml.tokens`".into()))?;
    if file_tokens.is_empty() {
        return Err(bad("`tokenizer.ggml.tokens` is empty".into()));
    }
    if file_tokens.len() > u32::MAX as usize {
        return Err(bad("`tokenizer.ggml.tokens` has more than 2^32 entries".into()));
    }
    let n = file_tokens.len();
    let per_token = |key: &str, len: usize| -> Result<()> {
        if len != n {
            return Err(bad(format!("`{key}` has {len} entries but `tokenizer.ggml.tokens` has {n}")));
        }
        Ok(())
    };
    let token_types = meta::int_array(md, "tokenizer.ggml.token_type", path)?;
    if let Some(tt) = &token_types {
        per_token("tokenizer.ggml.token_type", tt.len())?;
    }
    let file_merges = meta::string_array(md, "tokenizer.ggml.merges", path)?;

    let tokens: Vec<String> = match family {
        Family::Gemma => file_tokens.iter().map(|t| gemma_spelling(t)).collect(),
        _ => file_tokens.iter().map(|t| t.to_string()).collect(),
    };
    let mut vocab = Vocab::default();
    for (id, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), id as u32); // a repeated token keeps its last id, as a Python dict
    }
    let merges: Vec<(String, String)> = match file_merges {
        Some(raw) => raw
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut parts = m.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(l), Some(r), None) => Ok((l.to_string(), r.to_string())),
                    _ => Err(bad(format!("`tokenizer.ggml.merges`[{i}] `{m}` is not of the form \"left right\""))),
                }
            })
            .collect::<Result<_>>()?,
        None => {
            let scores: Vec<f64> = match family {
                // Gemma's scores do not follow its merge order; the token order does.
                Family::Gemma => (0..n).map(|i| -(i as f64)).collect(),
                _ => {
                    let s = meta::float_array(md, "tokenizer.ggml.scores", path)?.ok_or_else(|| {
                        bad("missing metadata key `tokenizer.ggml.scores` (a SentencePiece vocabulary without \
                             `tokenizer.ggml.merges` needs them)"
                            .into())
                    })?;
                    per_token("tokenizer.ggml.scores", s.len())?;
                    if let Some(i) = s.iter().position(|x| x.is_nan()) {
                        return Err(bad(format!("`tokenizer.ggml.scores`[{i}] is NaN")));
                    }
                    s
                }
            };
            merges_from_vocab(&tokens, &scores, &vocab)
        }
    };

    let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).fuse_unk(true).byte_fallback(true);
    if family == Family::Gemma {
        bpe = bpe.unk_token("<unk>".into());
    }
    let bpe = bpe.build().map_err(|e| {
        bad(format!("cannot build the BPE model from `tokenizer.ggml.tokens` / `tokenizer.ggml.merges`: {e}"))
    })?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let space = "\u{2581}";
    match family {
        Family::Llama => {
            inner.with_pre_tokenizer(Some(Metaspace::new('\u{2581}', PrependScheme::First, false)));
        }
        Family::Phi3 => {
            let replace = Replace::new(" ", space).map_err(|e| tok_err(path, e))?;
            inner
                .with_normalizer(Some(NormalizerSequence::new(vec![Prepend::new(space.into()).into(), replace.into()])))
                .map_err(|e| tok_err(path, e))?;
        }
        Family::Gemma => {
            inner.with_normalizer(Some(Replace::new(" ", space).map_err(|e| tok_err(path, e))?)).map_err(|e| tok_err(path, e))?;
            let split = Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false).map_err(|e| tok_err(path, e))?;
            inner.with_pre_tokenizer(Some(split));
        }
    }
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new(space, " ").map_err(|e| tok_err(path, e))?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if family != Family::Gemma {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    let post = TemplateProcessing::builder()
        .try_single(vec!["$A"])
        .and_then(|b| b.try_pair(vec!["$A", "$B:1"]))
        .map_err(|e| tok_err(path, e))?
        .build()
        .map_err(|e| tok_err(path, e))?;
    inner.with_post_processor(Some(post));

    // Special and added tokens, in the order transformers adds them (new ones take the next ids).
    let add_special = |inner: &mut tokenizers::Tokenizer, t: &str| -> Result<()> {
        if !inner.get_added_vocabulary().get_vocab().contains_key(t) {
            inner.add_special_tokens([AddedToken::from(t.to_string(), true)]).map_err(|e| tok_err(path, e))?;
        }
        Ok(())
    };
    for (_, t) in family.class_defaults() {
        add_special(&mut inner, t)?;
    }
    if let Some(tt) = &token_types {
        // Control and user-defined tokens keep the file's spelling (not Gemma's respelling).
        let control: Vec<AddedToken> = file_tokens
            .iter()
            .zip(tt)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL)
            .map(|(t, _)| AddedToken::from(t.to_string(), true))
            .collect();
        if !control.is_empty() {
            inner.add_special_tokens(control).map_err(|e| tok_err(path, e))?;
        }
        let user: Vec<AddedToken> = file_tokens
            .iter()
            .zip(tt)
            .filter(|(t, &ty)| ty == TOKEN_TYPE_USER_DEFINED && inner.token_to_id(t).is_some())
            .map(|(t, _)| AddedToken::from(t.to_string(), false).normalized(false))
            .collect();
        if !user.is_empty() {
            inner.add_tokens(user).map_err(|e| tok_err(path, e))?;
        }
    }
    let special_of = |key: &str| -> Result<Option<&str>> {
        match meta::uint(md, key, path)? {
            None => Ok(None),
            Some(id) if id < n as u64 => Ok(Some(file_tokens[id as usize])),
            Some(id) => Err(bad(format!("`{key}` = {id} is out of range (the vocabulary has {n} tokens)"))),
        }
    };
    let mut named: Vec<(&str, Option<&str>)> = vec![
        ("bos_token", special_of("tokenizer.ggml.bos_token_id")?),
        ("eos_token", special_of("tokenizer.ggml.eos_token_id")?),
        ("unk_token", special_of("tokenizer.ggml.unknown_token_id")?),
        ("pad_token", special_of("tokenizer.ggml.padding_token_id")?),
    ];
    if family == Family::Gemma {
        named.push(("mask_token", Some("<mask>"))); // GemmaTokenizer's default, which the file does not override
    }
    for (_, t) in &named {
        if let Some(t) = t {
            add_special(&mut inner, t)?;
        }
    }
    let id_of = |key: &str| named.iter().find(|(k, _)| *k == key).and_then(|(_, t)| t.and_then(|t| inner.token_to_id(t)));
    let (bos_token_id, eos_token_id, pad_token_id) = (id_of("bos_token"), id_of("eos_token"), id_of("pad_token"));
    let special_tokens = named.iter().filter_map(|(k, t)| t.map(|t| (k.to_string(), t.to_string()))).collect();
    Ok(Tokenizer {
        inner,
        bos_token_id,
        eos_token_id,
        pad_token_id,
        chat_template: meta::string(md, "tokenizer.chat_template", path)?,
        special_tokens,
        source: Some(path.to_path_buf()),
        compiled: Arc::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab_of(tokens: &[String]) -> Vocab {
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect()
    }

    #[test]
    fn merges_follow_score_then_lengths() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"].iter().map(|s| s.to_string()).collect();
        let vocab = vocab_of(&tokens);
        // abc splits as a|bc and ab|c; at equal scores the longer left part, then the longer
        // right part, comes first (transformers' generate_merges gives the same list).
        let m = merges_from_vocab(&tokens, &[0.0, 0.0, 0.0, -1.0, -2.0, -1.0], &vocab);
        let m: Vec<String> = m.iter().map(|(l, r)| format!("{l} {r}")).collect();
        assert_eq!(m, ["ab c", "a bc", "a b", "b c"]);
    }

    #[test]
    fn gemma_respells_space_runs_only() {
        assert_eq!(gemma_spelling("  "), "\u{2581}\u{2581}");
        assert_eq!(gemma_spelling(" \n"), "\u{2581}\u{2581}");
        assert_eq!(gemma_spelling("\n\n"), "\n\n");
        assert_eq!(gemma_spelling(" a"), " a");
        assert_eq!(gemma_spelling("\u{1f} "), "\u{2581}\u{2581}");
    }
}
