//! # peft-core
//!
//! Parameter-efficient fine-tuning on [candle](https://github.com/huggingface/candle), with
//! Hugging Face PEFT's semantics and on-disk format (PEFT 0.21).
//!
//! * [`model`]: base models whose modules carry transformers' names
//!   (`model.layers.0.self_attn.q_proj`): the Llama family (Llama, SmolLM2, Qwen2, Mistral),
//!   GPT-2, the BERT family and T5, with every HF task head, loaded from HF folders or GGUF files.
//! * [`tuners`]: one folder per method (`tuners/lora/`, `tuners/ia3/`, `tuners/prompt/`), each a
//!   config, a layer and its injection, registered once in [`tuners::registry`] (HF's
//!   `BaseTuner` / `BaseTunerLayer` split: [`tuners::registry::Tuner`],
//!   [`tuners::layer::AdapterLayer`], [`tuners::config::TunerConfig`]): LoRA (Hu et al. 2021)
//!   with rsLoRA, DoRA, PiSSA / OLoRA, (IA)³, the prompt-learning methods, and
//!   [`tuners::weighted`] (HF's `add_weighted_adapter`). [`tuners::linear::PeftLinear`] hosts
//!   every tuner's layer on a base linear layer.
//! * [`targeting`]: HF's module-targeting rules (`target_modules`, `exclude_modules`,
//!   `layers_to_transform`, `modules_to_save` never adapted); [`keys`]: the state-dict key
//!   grammar (on-disk and in-model names).
//! * [`peft_model`]: the adapter-managing wrapper (`PeftModel` in HF PEFT): add / load / save /
//!   merge / disable / status.
//! * [`engine`]: the fused CPU forward and backward of Llama-family decoders (chosen
//!   automatically; the general path handles the rest).
//! * [`train`]: AdamW training with HF Trainer's defaults and schedules; [`generate`]: greedy and
//!   sampled generation with a KV cache, streaming hooks and stop strings.
//! * [`tokenizer`], [`chat_template`]: tokenizers from HF folders and GGUF files, and the model's
//!   own Jinja chat template (minijinja).
//! * [`io`], [`gguf`], [`export`]: safetensors / adapter files with atomic writes, GGUF reading,
//!   and export to llama.cpp (GGUF LoRA adapters, merged models as HF folders or GGUF files).
//! * [`progress`]: progress reports and cancellation of long calls; [`error`]: the one error
//!   type, whose variants map to the stable codes JS sees.

pub mod chat_template;
pub mod engine;
pub mod error;
pub mod export;
pub(crate) mod gguf_container;
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
/// GGUF model loading lives with the models ([`model::gguf`]); this keeps its public path.
pub use model::gguf;
