//! # peft-core
//!
//! Parameter-efficient fine-tuning on [candle](https://github.com/huggingface/candle), with
//! Hugging Face PEFT's semantics and on-disk format (PEFT 0.21).
//!
//! * [`model`]: Llama-family decoders whose modules carry transformers' names
//!   (`model.layers.0.self_attn.q_proj`), loaded from HF folders or GGUF files.
//! * [`tuners`]: tuner layers. LoRA (`y = W x + scaling · B A x`, Hu et al. 2021).
//! * [`peft_model`]: the adapter-managing wrapper (`PeftModel` in HF PEFT).
//! * [`io`]: adapter_config.json / adapter_model.safetensors reading and atomic writing.
//! * [`export`]: llama.cpp GGUF LoRA adapters, merged models as HF folders or GGUF files.
//! * [`train`]: AdamW training of adapter parameters with HF Trainer's defaults.

pub mod chat_template;
pub mod engine;
pub mod error;
pub mod export;
pub mod gguf;
pub mod generate;
pub mod io;
pub mod keys;
pub mod model;
pub mod model_card;
pub mod ops;
pub mod peft_model;
pub mod progress;
pub mod targeting;
pub mod tokenizer;
pub mod train;
pub mod tuners;

pub use error::{PeftError, Result};
