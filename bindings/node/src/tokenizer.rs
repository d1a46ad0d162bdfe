//! `NativeTokenizer`: HF `tokenizers` tokenizer from tokenizer.json or GGUF metadata.

use crate::task::{guard, Job};
use napi::bindgen_prelude::AsyncTask;
use peft_core::tokenizer::{ChatOptions, Tokenizer};
use std::sync::Arc;

/// Options of `applyChatTemplate` / `encodeChats` (JSON values travel as strings).
#[napi(object)]
pub struct ChatOptionsJs {
    pub add_generation_prompt: Option<bool>,
    pub chat_template: Option<String>,
    /// JSON array of tool schemas.
    pub tools_json: Option<String>,
    /// JSON object of extra template variables.
    pub kwargs_json: Option<String>,
}

/// One tokenized conversation, or the error it raised (so a caller can name its source line).
#[napi(object)]
pub struct ChatEncodingJs {
    pub input_ids: Vec<u32>,
    pub assistant_mask: Vec<u8>,
    pub error: Option<String>,
}

fn parse_json(arg: &str, text: &str) -> peft_core::Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| peft_core::PeftError::invalid_arg(arg, format!("not valid JSON: {e}")))
}

fn chat_options(o: &ChatOptionsJs) -> peft_core::Result<ChatOptions> {
    let extra = match &o.kwargs_json {
        Some(k) => match parse_json("kwargs", k)? {
            serde_json::Value::Object(m) => m,
            _ => return Err(peft_core::PeftError::invalid_arg("kwargs", "must be an object")),
        },
        None => Default::default(),
    };
    let tools = o.tools_json.as_deref().map(|t| parse_json("tools", t)).transpose()?;
    Ok(ChatOptions { add_generation_prompt: o.add_generation_prompt.unwrap_or(false), chat_template: o.chat_template.clone(), tools, extra })
}

fn messages_of(arg: &str, v: serde_json::Value) -> peft_core::Result<Vec<serde_json::Value>> {
    match v {
        serde_json::Value::Array(a) => Ok(a),
        _ => Err(peft_core::PeftError::invalid_arg(arg, "must be an array of messages")),
    }
}

#[napi]
pub struct NativeTokenizer {
    inner: Arc<Tokenizer>,
}

impl NativeTokenizer {
    pub fn from_arc(inner: Arc<Tokenizer>) -> Self {
        NativeTokenizer { inner }
    }

    /// The shared core tokenizer (for jobs that decode off the JS thread).
    pub fn arc(&self) -> Arc<Tokenizer> {
        self.inner.clone()
    }
}

/// Load a tokenizer from a model folder (tokenizer.json) or a .gguf file.
#[napi(ts_return_type = "Promise<NativeTokenizer>")]
pub fn load_tokenizer(path: String) -> AsyncTask<Job<NativeTokenizer, NativeTokenizer>> {
    AsyncTask::new(Job::plain(move || {
        let t = Tokenizer::from_pretrained(std::path::Path::new(&path))?;
        Ok(NativeTokenizer { inner: Arc::new(t) })
    }))
}

#[napi]
impl NativeTokenizer {
    #[napi(catch_unwind)]
    pub fn encode(&self, text: String, add_special_tokens: bool) -> napi::Result<Vec<u32>> {
        guard(|| self.inner.encode(&text, add_special_tokens))
    }

    #[napi(catch_unwind)]
    pub fn decode(&self, ids: Vec<u32>, skip_special_tokens: bool) -> napi::Result<String> {
        guard(|| self.inner.decode(&ids, skip_special_tokens))
    }

    /// Render messages (a JSON array) with the chat template.
    #[napi(catch_unwind)]
    pub fn apply_chat_template(&self, messages_json: String, options: ChatOptionsJs) -> napi::Result<String> {
        guard(|| {
            let msgs = messages_of("messages", parse_json("messages", &messages_json)?)?;
            self.inner.apply_chat_template(&msgs, &chat_options(&options)?)
        })
    }

    /// Render and tokenize conversations (a JSON array of message arrays) off the JS thread,
    /// with each one's assistant-token mask; a conversation that fails carries its error
    /// (`[CODE] message`) instead of failing the batch.
    #[napi(ts_return_type = "Promise<ChatEncodingJs[]>")]
    pub fn encode_chats(&self, conversations_json: String, options: ChatOptionsJs) -> AsyncTask<Job<Vec<ChatEncodingJs>, Vec<ChatEncodingJs>>> {
        let tok = self.inner.clone();
        AsyncTask::new(Job::plain(move || {
            let opts = chat_options(&options)?;
            let convs = messages_of("conversations", parse_json("conversations", &conversations_json)?)?;
            Ok(convs
                .into_iter()
                .map(|c| {
                    let r = messages_of("messages", c).and_then(|m| tok.encode_chat(&m, &opts));
                    match r {
                        Ok(e) => ChatEncodingJs { input_ids: e.ids, assistant_mask: e.assistant_mask, error: None },
                        Err(e) => ChatEncodingJs { input_ids: vec![], assistant_mask: vec![], error: Some(format!("[{}] {}", e.code(), e)) },
                    }
                })
                .collect())
        }))
    }

    /// Encode many texts off the JS thread.
    #[napi(ts_return_type = "Promise<number[][]>")]
    pub fn encode_batch(&self, texts: Vec<String>, add_special_tokens: bool) -> AsyncTask<Job<Vec<Vec<u32>>, Vec<Vec<u32>>>> {
        let tok = self.inner.clone();
        AsyncTask::new(Job::plain(move || texts.iter().map(|t| tok.encode(t, add_special_tokens)).collect()))
    }

    /// The model's chat template source, if it has one.
    #[napi(getter)]
    pub fn chat_template(&self) -> Option<String> {
        self.inner.chat_template().map(String::from)
    }

    /// Special token strings as `[name, token]` pairs (`bos_token`, `eos_token`, ...).
    #[napi(getter)]
    pub fn special_tokens(&self) -> Vec<Vec<String>> {
        self.inner.special_tokens().iter().map(|(k, v)| vec![k.clone(), v.clone()]).collect()
    }

    #[napi]
    pub fn token_to_id(&self, token: String) -> Option<u32> {
        self.inner.token_to_id(&token)
    }

    #[napi]
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    #[napi(getter)]
    pub fn vocab_size(&self) -> u32 {
        self.inner.vocab_size() as u32
    }

    #[napi(getter)]
    pub fn bos_token_id(&self) -> Option<u32> {
        self.inner.bos_token_id()
    }

    #[napi(getter)]
    pub fn eos_token_id(&self) -> Option<u32> {
        self.inner.eos_token_id()
    }

    #[napi(getter)]
    pub fn pad_token_id(&self) -> Option<u32> {
        self.inner.pad_token_id()
    }
}
