//! `NativeTokenizer`: HF `tokenizers` tokenizer from tokenizer.json or GGUF metadata.

use crate::task::{guard, Job};
use napi::bindgen_prelude::AsyncTask;
use peft_core::tokenizer::{ChatMessage as CoreMessage, Tokenizer};
use std::sync::Arc;

#[napi(object)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
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

    #[napi(catch_unwind)]
    pub fn apply_chat_template(&self, messages: Vec<ChatMessage>, add_generation_prompt: bool) -> napi::Result<String> {
        let msgs: Vec<CoreMessage> = messages.into_iter().map(|m| CoreMessage { role: m.role, content: m.content }).collect();
        guard(|| Ok(self.inner.apply_chat_template(&msgs, add_generation_prompt)))
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
