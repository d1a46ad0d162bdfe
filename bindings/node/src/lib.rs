//! peft-node's N-API binding: converts JS values, calls peft-core, maps errors. No PEFT logic.
//!
//! Errors reach JS as `Error` whose message starts with `[CODE] ` (a stable code such as
//! `ERR_NOT_FOUND`); the TypeScript facade moves that code to `error.code`. Heavy calls are
//! `AsyncTask`s run on libuv's thread pool; panics there become `ERR_INTERNAL` errors.
#![deny(clippy::all)]

#[macro_use]
extern crate napi_derive;

mod model;
mod safetensors_js;
mod task;
mod tokenizer;
mod trainer;

pub use model::*;
pub use safetensors_js::*;
pub use tokenizer::*;
pub use trainer::*;

/// mimalloc keeps freed pages for reuse: training allocates and frees large activation buffers
/// every step, and glibc's allocator returns them to the OS, paying a page fault per 4 KiB on
/// the next step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
