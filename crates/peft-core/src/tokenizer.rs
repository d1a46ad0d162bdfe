//! Text tokenization: a thin wrapper over Hugging Face [`tokenizers`] that can be built
//! from a transformers model folder (`tokenizer.json` + `tokenizer_config.json`) or from the
//! vocabulary embedded in a GGUF file, plus the model's chat template (rendered with
//! [`crate::chat_template`]).
//!
//! GGUF tokenizers are rebuilt the way Hugging Face's own `tokenizer.json` describes a
//! byte-level BPE (GPT-2 family): a `BPE` model over `tokenizer.ggml.tokens` /
//! `tokenizer.ggml.merges`, a `ByteLevel` pre-tokenizer (preceded by the split that llama.cpp
//! associates with `tokenizer.ggml.pre`), a `ByteLevel` decoder, and every *control* token
//! (`tokenizer.ggml.token_type == 3`) registered as a special added token so that text such
//! as `<|im_start|>` encodes to its single id, exactly as with the original `tokenizer.json`.
//! SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`: Llama 2, Phi-3, Gemma) are
//! rebuilt as transformers 5.18 rebuilds them from a GGUF (a byte-fallback `BPE` with the `▁`
//! normalizer / pre-tokenizer and decoder of each family), see the `spm` module.

use crate::chat_template::{token_mask, ChatTemplate, RenderContext};
use crate::error::{PeftError, Result};
use candle_core::quantized::gguf_file;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

mod spm;

/// The default system prompt that SmolLM2's chat template inserts when a conversation does
/// not start with a system message (from the `chat_template` shipped with
/// `HuggingFaceTB/SmolLM2-*-Instruct`).
pub const SMOLLM_DEFAULT_SYSTEM_PROMPT: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// GGUF token types (`tokenizer.ggml.token_type`), as written by llama.cpp's converter
/// (`gguf.TokenType`): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Pre-tokenizer split regex of Llama 3 (`tokenizer.ggml.pre = "llama-bpe"`), as in the
/// `Split` pre-tokenizer of Meta-Llama-3's `tokenizer.json`.
pub(crate) const LLAMA3_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Pre-tokenizer split regex of Qwen2 (`tokenizer.ggml.pre = "qwen2"`), as in Qwen2's
/// `tokenizer.json`.
pub(crate) const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// One message of a chat conversation (`{"role": ..., "content": ...}` in transformers'
/// `apply_chat_template`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (any string is accepted and copied verbatim).
    pub role: String,
    /// The message text, copied verbatim (special-token text inside it is not escaped).
    pub content: String,
}

impl ChatMessage {
    /// Convenience constructor.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }

    /// The message as the JSON object a chat template sees (`{"role": ..., "content": ...}`).
    pub fn to_json(&self) -> Value {
        serde_json::json!({ "role": self.role, "content": self.content })
    }

    /// Several messages as JSON objects.
    pub fn to_json_list(messages: &[ChatMessage]) -> Vec<Value> {
        messages.iter().map(ChatMessage::to_json).collect()
    }
}

/// Options of [`Tokenizer::apply_chat_template`] / [`Tokenizer::encode_chat`], named after
/// transformers' `apply_chat_template` arguments.
#[derive(Debug, Clone, Default)]
pub struct ChatOptions {
    /// Append the prompt that opens an assistant turn.
    pub add_generation_prompt: bool,
    /// A template to use instead of the tokenizer's own.
    pub chat_template: Option<String>,
    /// Tool schemas passed to the template as `tools`.
    pub tools: Option<Value>,
    /// Extra template variables (transformers' `**kwargs`, e.g. `date_string`).
    pub extra: serde_json::Map<String, Value>,
}

/// A tokenized conversation ([`Tokenizer::encode_chat`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatEncoding {
    /// The rendered text.
    pub text: String,
    /// Its token ids (encoded without adding special tokens, as transformers'
    /// `apply_chat_template(tokenize=True)` does: the template writes them).
    pub ids: Vec<u32>,
    /// 1 for tokens of assistant turns (see
    /// [`ChatTemplate::render_with_assistant_ranges`]), 0 elsewhere; one per id.
    pub assistant_mask: Vec<u8>,
}

/// A text tokenizer with the model's special-token ids and chat template.
///
/// Wraps a [`tokenizers::Tokenizer`]; ids are `u32` as in Hugging Face tokenizers.
/// Cloning is cheap relative to loading (the vocabulary is copied, nothing is re-read).
/// `Debug` prints a summary, not the vocabulary.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    chat_template: Option<String>,
    /// Special token strings by transformers' attribute name (`bos_token`, `eos_token`, ...).
    special_tokens: Vec<(String, String)>,
    /// Where the tokenizer was loaded from (named in errors).
    source: Option<PathBuf>,
    /// The last compiled template, by source.
    compiled: Arc<Mutex<Option<Arc<ChatTemplate>>>>,
}

/// transformers' `SPECIAL_TOKENS_ATTRIBUTES`, the names a chat template sees.
const SPECIAL_TOKEN_NAMES: [&str; 7] = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_id", &self.eos_token_id)
            .field("pad_token_id", &self.pad_token_id)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn tok_err(context: &str, e: impl std::fmt::Display) -> PeftError {
    PeftError::Tokenizer(format!("{context}: {e}"))
}

/// A special token in `tokenizer_config.json`: either a plain string or an `AddedToken`
/// object (`{"content": "<s>", ...}`, optionally tagged `"__type": "AddedToken"`).
fn config_token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

/// `chat_template` in `tokenizer_config.json`: a string, or a list of
/// `{"name": ..., "template": ...}` (the one named `default` is used, else the first).
fn config_chat_template(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => {
            let named = |n: &str| {
                a.iter().find(|t| t.get("name").and_then(|x| x.as_str()) == Some(n))
            };
            named("default")
                .or_else(|| a.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(String::from)
        }
        _ => None,
    }
}

impl Tokenizer {
    /// Load a Hugging Face `tokenizer.json` file (any model type the `tokenizers` crate
    /// supports: BPE, WordLevel, WordPiece, Unigram).
    ///
    /// No `tokenizer_config.json` is read, so [`bos_token_id`](Self::bos_token_id) and friends
    /// are `None` and there is no chat template; use [`from_pretrained`](Self::from_pretrained)
    /// for a model folder.
    ///
    /// Errors: `NotFound` / `Io` if the file cannot be read, `Tokenizer` if it is not a valid
    /// `tokenizer.json`.
    pub fn from_file(tokenizer_json: &Path) -> Result<Self> {
        let bytes = std::fs::read(tokenizer_json).map_err(|e| PeftError::io(tokenizer_json, e))?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| tok_err(&format!("cannot parse {}", tokenizer_json.display()), e))?;
        // transformers' fast tokenizers ignore the file's padding and truncation unless a call
        // asks for them (sentence-transformers' files pad every text to 128 tokens).
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| tok_err(&format!("cannot disable truncation of {}", tokenizer_json.display()), e))?;
        Ok(Tokenizer {
            inner,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            chat_template: None,
            special_tokens: Vec::new(),
            source: Some(tokenizer_json.to_path_buf()),
            compiled: Arc::default(),
        })
    }

    /// Load the tokenizer of a model, like transformers' `AutoTokenizer.from_pretrained` on a
    /// local path. `path` may be:
    ///
    /// * a folder containing `tokenizer.json` and optionally `tokenizer_config.json`; from the
    ///   latter `bos_token`, `eos_token`, `pad_token` (strings or `AddedToken` objects) are
    ///   resolved to ids, `chat_template` is kept (a `chat_template.jinja` file in the folder
    ///   takes precedence, as in transformers), and `bos/eos/pad/unk_token` and
    ///   `additional_special_tokens` are registered as special tokens (skipped by
    ///   `decode(.., true)`) when `tokenizer.json` did not already mark them so;
    /// * a `tokenizer.json` file (its folder's `tokenizer_config.json` is read as above);
    /// * a `.gguf` file: the embedded tokenizer, see [`from_gguf`](Self::from_gguf).
    ///
    /// BOS/EOS insertion for tokenizer.json-based tokenizers is whatever the file's
    /// post-processor does (transformers behaves the same way for fast tokenizers).
    ///
    /// Errors: `NotFound` when the path or `tokenizer.json` is missing, `Io`, `Tokenizer` for
    /// an invalid `tokenizer.json` / `tokenizer_config.json`, `GgufInvalid` for a bad GGUF.
    pub fn from_pretrained(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(PeftError::NotFound {
                path: path.to_path_buf(),
                what: "tokenizer folder or file does not exist".into(),
            });
        }
        let (dir, json): (PathBuf, PathBuf) = if path.is_dir() {
            (path.to_path_buf(), path.join("tokenizer.json"))
        } else {
            let is_gguf = path
                .extension()
                .and_then(|e| e.to_str())
                .map(|e| e.eq_ignore_ascii_case("gguf"))
                .unwrap_or(false);
            if is_gguf {
                let (content, _, _) = crate::gguf_container::open_gguf(path)?;
                return Tokenizer::from_gguf(&content, path);
            }
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                return Err(PeftError::invalid_arg(
                    "path",
                    format!(
                        "{} is neither a folder with tokenizer.json, a tokenizer.json file, nor a .gguf file",
                        path.display()
                    ),
                ));
            }
            (path.parent().map(Path::to_path_buf).unwrap_or_default(), path.to_path_buf())
        };
        if !json.is_file() {
            return Err(PeftError::NotFound {
                path: json,
                what: "tokenizer.json (the model folder has no tokenizer.json)".into(),
            });
        }
        let mut tok = Self::from_file(&json)?;
        tok.source = Some(dir.clone());
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| PeftError::io(&cfg_path, e))?;
            let cfg: Value = serde_json::from_str(&text)
                .map_err(|e| tok_err(&format!("{} is not valid JSON", cfg_path.display()), e))?;
            tok.apply_tokenizer_config(&cfg);
        }
        // transformers >= 4.47 saves the template as a separate `chat_template.jinja`, which
        // takes precedence over a `chat_template` entry of tokenizer_config.json.
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            tok.chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| PeftError::io(&jinja, e))?);
        }
        Ok(tok)
    }

    /// Apply the special tokens and chat template of a parsed `tokenizer_config.json`.
    fn apply_tokenizer_config(&mut self, cfg: &Value) {
        let mut specials: Vec<String> = Vec::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let Some(s) = config_token_str(cfg.get(key)) {
                specials.push(s);
            }
        }
        if let Some(Value::Array(a)) = cfg.get("additional_special_tokens") {
            specials.extend(a.iter().filter_map(|v| config_token_str(Some(v))));
        }
        let to_add: Vec<AddedToken> = specials
            .iter()
            .filter(|s| {
                self.inner.token_to_id(s).is_some()
                    && !self.inner.get_added_vocabulary().is_special_token(s)
            })
            .map(|s| AddedToken::from(s.clone(), true))
            .collect();
        if !to_add.is_empty() {
            // Tokens already in the vocabulary keep their ids; this only marks them special.
            let _ = self.inner.add_special_tokens(to_add);
        }
        let id_of = |key: &str| config_token_str(cfg.get(key)).and_then(|s| self.inner.token_to_id(&s));
        self.bos_token_id = id_of("bos_token");
        self.eos_token_id = id_of("eos_token");
        self.pad_token_id = id_of("pad_token");
        self.chat_template = config_chat_template(cfg.get("chat_template"));
        self.special_tokens = SPECIAL_TOKEN_NAMES
            .iter()
            .filter_map(|k| config_token_str(cfg.get(*k)).map(|v| (k.to_string(), v)))
            .collect();
    }

    /// Build the tokenizer embedded in GGUF metadata (GGUF spec, "tokenizer.ggml.*" keys).
    ///
    /// Two tokenizer models are supported. SentencePiece (`tokenizer.ggml.model == "llama"`:
    /// Llama 2, Mistral v0.1, Phi-3 / Phi-3.5-mini, Gemma 1-3) is built as transformers 5.18
    /// builds it from a GGUF: a byte-fallback `BPE` over `tokenizer.ggml.tokens` with the merges
    /// of `tokenizer.ggml.merges` or, without them, those implied by the vocabulary ordered by
    /// `tokenizer.ggml.scores` (Gemma: by token position); the `▁` normalizer / pre-tokenizer
    /// and decoder of the family chosen by `general.architecture` (`phi3`; `gemma`, `gemma2`,
    /// `gemma3`; anything else as Llama); control tokens (and the class's default special
    /// tokens) special, user-defined tokens added; `add_bos_token` / `add_eos_token` ignored,
    /// as transformers ignores them (nothing is added by `encode(.., true)`).
    ///
    /// Byte-level BPE (`tokenizer.ggml.model == "gpt2"`, used by SmolLM2, Llama 3, Qwen2,
    /// Phi-4-mini, StarCoder, ...): the Hugging Face pipeline is reconstructed from:
    ///
    /// * `tokenizer.ggml.tokens` (token strings, in byte-level alphabet, index = id) and
    ///   `tokenizer.ggml.merges` (`"left right"` strings, in rank order) → `BPE` model;
    /// * `tokenizer.ggml.pre` → pre-tokenizer, mirroring llama.cpp's table:
    ///   `gpt2`/`default`/absent/`mpt`/`olmo` → `ByteLevel(add_prefix_space=false,
    ///   use_regex=true)` (the GPT-2 regex); `smollm`/`starcoder`/`refact`/`codeshell` →
    ///   `Digits(individual)` then that `ByteLevel`; `llama-bpe`/`llama3` and `qwen2` → their
    ///   `Split` regex then `ByteLevel(use_regex=false)` (Llama 3 also sets
    ///   `ignore_merges`, as its `tokenizer.json` does);
    /// * `tokenizer.ggml.token_type`: control tokens (3) become special added tokens,
    ///   user-defined tokens (4) plain added tokens; both are matched before BPE;
    /// * `tokenizer.ggml.{bos,eos,padding}_token_id` → the special ids;
    ///   `tokenizer.ggml.add_bos_token` / `add_eos_token` (default false) → a
    ///   `TemplateProcessing` post-processor used when `add_special_tokens` is true;
    /// * `tokenizer.chat_template` → [`chat_template`](Self::chat_template).
    ///
    /// The decoder is `ByteLevel`. If a token string occurs twice in the list, the first id
    /// wins for encoding (the later id cannot be represented by a `BPE` vocabulary).
    ///
    /// Errors: `Tokenizer` (naming `path`) for an unsupported tokenizer model (e.g. `t5`) or
    /// pre-tokenizer (a byte-level split with a SentencePiece vocabulary); `GgufInvalid`
    /// (naming `path` and the key) when keys are missing (`tokenizer.ggml.tokens`; for
    /// SentencePiece `general.architecture`, and `tokenizer.ggml.scores` when there are no
    /// merges), of the wrong type, inconsistent (token_type / scores length, a NaN score,
    /// special id out of range) or merges reference unknown tokens.
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        use crate::gguf_container::meta;
        let bad = |msg: String| PeftError::GgufInvalid { path: path.to_path_buf(), msg };
        let md = &content.metadata;
        let model = meta::string(md, "tokenizer.ggml.model", path)?
            .ok_or_else(|| bad("missing metadata key `tokenizer.ggml.model` (the file has no tokenizer)".into()))?;
        if model == "llama" {
            return spm::from_gguf(content, path);
        }
        if model != "gpt2" {
            return Err(PeftError::Tokenizer(format!(
                "{}: GGUF tokenizer model `tokenizer.ggml.model = {model}` is not supported (supported: byte-level \
                 BPE `gpt2`, SentencePiece `llama`); load the model's tokenizer.json instead",
                path.display()
            )));
        }
        let pre = meta::string(md, "tokenizer.ggml.pre", path)?.unwrap_or_else(|| "default".into());
        let tokens = meta::string_array(md, "tokenizer.ggml.tokens", path)?
            .ok_or_else(|| bad("missing metadata key `tokenizer.ggml.tokens`".into()))?;
        if tokens.is_empty() {
            return Err(bad("`tokenizer.ggml.tokens` is empty".into()));
        }
        if tokens.len() > u32::MAX as usize {
            return Err(bad("`tokenizer.ggml.tokens` has more than 2^32 entries".into()));
        }
        let merges_raw = meta::string_array(md, "tokenizer.ggml.merges", path)?
            .ok_or_else(|| bad("missing metadata key `tokenizer.ggml.merges` (required for BPE)".into()))?;
        let token_types = meta::int_array(md, "tokenizer.ggml.token_type", path)?;
        if let Some(tt) = &token_types {
            if tt.len() != tokens.len() {
                return Err(bad(format!(
                    "`tokenizer.ggml.token_type` has {} entries but `tokenizer.ggml.tokens` has {}",
                    tt.len(),
                    tokens.len()
                )));
            }
        }

        let mut vocab = Vocab::default();
        for (id, t) in tokens.iter().enumerate() {
            vocab.entry(t.to_string()).or_insert(id as u32);
        }
        let mut merges = Vec::with_capacity(merges_raw.len());
        for (i, m) in merges_raw.iter().enumerate() {
            // Split at the first space after the first character, like llama.cpp
            // (`word.find(' ', 1)`), so a merge whose left part is a space still parses.
            let first_len = m.chars().next().map(char::len_utf8).unwrap_or(0);
            let split = m[first_len..].find(' ').map(|p| p + first_len);
            match split {
                Some(p) if p + 1 < m.len() => merges.push((m[..p].to_string(), m[p + 1..].to_string())),
                _ => return Err(bad(format!("merge #{i} `{m}` is not of the form \"left right\""))),
            }
        }

        let (pre_tokenizer, ignore_merges): (PreTokenizerWrapper, bool) = match pre.as_str() {
            "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" => (ByteLevel::new(false, true, true).into(), false),
            "smollm" | "starcoder" | "refact" | "codeshell" => (
                Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
                false,
            ),
            "llama-bpe" | "llama3" | "qwen2" => {
                let re = if pre == "qwen2" { QWEN2_SPLIT_REGEX } else { LLAMA3_SPLIT_REGEX };
                let split = Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| tok_err("cannot compile the pre-tokenizer regex", e))?;
                (
                    Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into(),
                    pre != "qwen2",
                )
            }
            other => {
                return Err(PeftError::Tokenizer(format!(
                    "{}: GGUF pre-tokenizer `tokenizer.ggml.pre = {other}` is not supported \
                     (supported: gpt-2, gpt2, default, mpt, olmo, smollm, starcoder, refact, codeshell, \
                     llama-bpe, llama3, qwen2); load the model's tokenizer.json instead",
                    path.display()
                )))
            }
        };

        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| bad(format!("cannot build the BPE tokenizer from tokenizer.ggml.tokens/merges: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        if let Some(tt) = &token_types {
            let mut special = Vec::new();
            let mut user = Vec::new();
            for (t, &ty) in tokens.iter().zip(tt.iter()) {
                if ty == TOKEN_TYPE_CONTROL {
                    special.push(AddedToken::from(t.to_string(), true));
                } else if ty == TOKEN_TYPE_USER_DEFINED {
                    user.push(AddedToken::from(t.to_string(), false).normalized(false));
                }
            }
            if !special.is_empty() {
                inner.add_special_tokens(special).map_err(|e| tok_err("cannot add control tokens", e))?;
            }
            if !user.is_empty() {
                inner.add_tokens(user).map_err(|e| tok_err("cannot add user-defined tokens", e))?;
            }
        }

        let n = tokens.len() as u64;
        let special_id = |key: &str| -> Result<Option<u32>> {
            match meta::uint(md, key, path)? {
                None => Ok(None),
                Some(id) if id < n => Ok(Some(id as u32)),
                Some(id) => Err(bad(format!("`{key}` = {id} is out of range (the vocabulary has {n} tokens)"))),
            }
        };
        let bos_token_id = special_id("tokenizer.ggml.bos_token_id")?;
        let eos_token_id = special_id("tokenizer.ggml.eos_token_id")?;
        let pad_token_id = special_id("tokenizer.ggml.padding_token_id")?;
        let add_bos = meta::boolean(md, "tokenizer.ggml.add_bos_token", path)?.unwrap_or(false);
        let add_eos = meta::boolean(md, "tokenizer.ggml.add_eos_token", path)?.unwrap_or(false);

        let mut pieces_a: Vec<String> = Vec::new();
        let mut specials: Vec<(String, u32)> = Vec::new();
        let mut push_special = |id: Option<u32>, what: &str, out: &mut Vec<String>| -> Result<()> {
            let id = id.ok_or_else(|| {
                bad(format!("tokenizer.ggml.add_{what}_token is true but tokenizer.ggml.{what}_token_id is missing"))
            })?;
            let tok = tokens[id as usize].to_string();
            if !specials.iter().any(|(t, _)| *t == tok) {
                specials.push((tok.clone(), id));
            }
            out.push(tok);
            Ok(())
        };
        if add_bos || add_eos {
            if add_bos {
                push_special(bos_token_id, "bos", &mut pieces_a)?;
            }
            pieces_a.push("$A".into());
            if add_eos {
                push_special(eos_token_id, "eos", &mut pieces_a)?;
            }
            let pieces_b: Vec<String> = pieces_a
                .iter()
                .map(|p| if p == "$A" { "$B:1".to_string() } else { format!("{p}:1") })
                .collect();
            let mut pair = pieces_a.clone();
            pair.extend(pieces_b);
            let post = TemplateProcessing::builder()
                .try_single(pieces_a)
                .and_then(|b| b.try_pair(pair))
                .map_err(|e| tok_err("cannot build the BOS/EOS template", e))?
                .special_tokens(specials)
                .build()
                .map_err(|e| tok_err("cannot build the BOS/EOS template", e))?;
            inner.with_post_processor(Some(post));
        }

        let chat_template = meta::string(md, "tokenizer.chat_template", path)?;
        let unk_token_id = special_id("tokenizer.ggml.unknown_token_id")?;
        let special_tokens = [("bos_token", bos_token_id), ("eos_token", eos_token_id), ("unk_token", unk_token_id), ("pad_token", pad_token_id)]
            .into_iter()
            .filter_map(|(k, id)| id.map(|id| (k.to_string(), tokens[id as usize].to_string())))
            .collect();
        Ok(Tokenizer {
            inner,
            bos_token_id,
            eos_token_id,
            pad_token_id,
            chat_template,
            special_tokens,
            source: Some(path.to_path_buf()),
            compiled: Arc::default(),
        })
    }

    /// Encode `text` to token ids. With `add_special_tokens`, the tokenizer's post-processor
    /// adds its special tokens (e.g. BOS for Llama 2/3; nothing for SmolLM2, whose GGUF has
    /// `tokenizer.ggml.add_bos_token = false` and whose tokenizer.json adds nothing).
    /// Special-token text in `text` (e.g. `<|im_start|>`) encodes to its single id, as in
    /// transformers.
    ///
    /// Errors: `Tokenizer` when the underlying tokenizer fails (e.g. a character that is not
    /// in a non-byte-level vocabulary and there is no unknown token).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| tok_err("cannot encode text", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encode a text, or a text pair (BERT's `[CLS] a [SEP] b [SEP]`), to `(ids, token_type_ids)`
    /// as transformers' `tokenizer(a, b)` returns `input_ids` and `token_type_ids`: the segment
    /// ids come from the post-processor (0 for the first text and its special tokens, 1 for
    /// the second with WordPiece/BERT templates; all 0 for tokenizers without segments).
    ///
    /// Errors: `Tokenizer` when the underlying tokenizer fails.
    pub fn encode_with_type_ids(&self, text: &str, pair: Option<&str>, add_special_tokens: bool) -> Result<(Vec<u32>, Vec<u32>)> {
        let enc = match pair {
            Some(b) => self.inner.encode((text, b), add_special_tokens),
            None => self.inner.encode(text, add_special_tokens),
        }
        .map_err(|e| tok_err("cannot encode text", e))?;
        Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
    }

    /// Decode ids back to text (`tokenizer.decode` in transformers, without
    /// `clean_up_tokenization_spaces`). With `skip_special_tokens`, special tokens (control
    /// tokens of a GGUF, `"special": true` added tokens of a tokenizer.json) are dropped.
    /// Unknown ids are skipped.
    ///
    /// Errors: `Tokenizer` when the decoder fails.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| tok_err("cannot decode ids", e))
    }

    /// Id of a token string (vocabulary or added token, in the tokenizer's own alphabet, e.g.
    /// `"Ġthe"` for byte-level BPE), or `None`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token string of an id, or `None` when out of range.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of tokens including added tokens (`len(tokenizer)` in transformers).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Beginning-of-sequence token id, if the model defines one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// End-of-sequence token id, if the model defines one (for SmolLM2-Instruct `<|im_end|>`, 2).
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    /// Padding token id, if the model defines one.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id
    }

    /// The model's Jinja chat template string (GGUF `tokenizer.chat_template` or
    /// `chat_template` of tokenizer_config.json), kept for inspection; it is not executed.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The tokenizer as `tokenizer.json` text (the `tokenizers` crate's serialization, which
    /// transformers' `PreTrainedTokenizerFast` / `TokenizersBackend` reads).
    ///
    /// Errors: `Tokenizer` when serialization fails.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| tok_err("cannot serialize the tokenizer", e))
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Special token strings by transformers' attribute name (`bos_token`, `eos_token`,
    /// `unk_token`, `pad_token`, ...), as the chat template sees them: from
    /// tokenizer_config.json, or the GGUF's `tokenizer.ggml.*_token_id` tokens.
    pub fn special_tokens(&self) -> &[(String, String)] {
        &self.special_tokens
    }

    /// Set or replace the chat template (transformers' `tokenizer.chat_template = ...`).
    pub fn set_chat_template(&mut self, template: Option<String>) {
        self.chat_template = template;
    }

    fn template_for(&self, opts: &ChatOptions) -> Result<Arc<ChatTemplate>> {
        let src = match opts.chat_template.as_deref().or(self.chat_template.as_deref()) {
            Some(s) => s,
            None => {
                let from = self.source.as_ref().map(|p| format!(" loaded from {}", p.display())).unwrap_or_default();
                return Err(PeftError::ChatTemplate(format!(
                    "the tokenizer{from} has no chat template (no `chat_template` in tokenizer_config.json, no \
                     chat_template.jinja, no GGUF `tokenizer.chat_template`); pass one with the `chatTemplate` option"
                )));
            }
        };
        let mut cache = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cache.as_ref().filter(|t| t.source() == src) {
            return Ok(t.clone());
        }
        let t = Arc::new(ChatTemplate::new(src)?);
        *cache = Some(t.clone());
        Ok(t)
    }

    fn render_context(&self, opts: &ChatOptions) -> RenderContext {
        RenderContext {
            add_generation_prompt: opts.add_generation_prompt,
            special_tokens: self.special_tokens.clone(),
            tools: opts.tools.clone(),
            documents: None,
            extra: opts.extra.clone(),
        }
    }

    /// Render a conversation with the model's chat template (or `opts.chat_template`), as
    /// transformers' `apply_chat_template(messages, tokenize=False, ...)` does; see
    /// [`crate::chat_template`] for the environment. `messages` are JSON objects
    /// (`{"role", "content"}`, plus any fields the template reads, such as `tool_calls`).
    /// The result is text; encode it with `encode(.., false)` (the special tokens in it are
    /// recognised).
    ///
    /// Errors: `ChatTemplate` when the tokenizer has no template and none is given (naming
    /// where the tokenizer came from), when the template does not compile, or when it raises
    /// (its `raise_exception` message); `InvalidArgument` for messages holding U+F0000/U+F0001.
    pub fn apply_chat_template(&self, messages: &[Value], opts: &ChatOptions) -> Result<String> {
        self.template_for(opts)?.render(messages, &self.render_context(opts))
    }

    /// Render and tokenize a conversation, with the mask of its assistant tokens: the tokens
    /// that overlap the assistant ranges of
    /// [`ChatTemplate::render_with_assistant_ranges`] (each assistant content and the
    /// end-of-turn text right after it, or the template's `{% generation %}` blocks). TRL's
    /// `assistant_only_loss` trains on exactly these tokens.
    ///
    /// Errors: those of [`Self::apply_chat_template`]; `ChatTemplate` when the assistant
    /// text cannot be located; `Tokenizer` when encoding fails.
    pub fn encode_chat(&self, messages: &[Value], opts: &ChatOptions) -> Result<ChatEncoding> {
        let t = self.template_for(opts)?;
        let (text, ranges) = t.render_with_assistant_ranges(messages, &self.render_context(opts))?;
        let enc = self.inner.encode(text.as_str(), false).map_err(|e| tok_err("cannot encode the rendered conversation", e))?;
        let assistant_mask = token_mask(enc.get_offsets(), &ranges);
        Ok(ChatEncoding { text, ids: enc.get_ids().to_vec(), assistant_mask })
    }

    /// Token ids and byte offsets `(start, end)` of `text` in `text` (no special tokens added).
    ///
    /// Errors: `Tokenizer` when encoding fails.
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| tok_err("cannot encode text", e))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }
}
