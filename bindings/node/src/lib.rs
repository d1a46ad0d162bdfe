//! peft-node's N-API binding: converts JS values, calls peft-core, maps errors. No PEFT logic.
//!
//! Errors reach JS as `Error` whose message starts with `[CODE] ` (a stable code such as
//! `ERR_NOT_FOUND`); the TypeScript facade moves that code to `error.code`. Heavy calls are
//! `AsyncTask`s run on libuv's thread pool; panics there become `ERR_INTERNAL` errors.
#![deny(clippy::all)]

#[macro_use]
extern crate napi_derive;

mod export;
mod model;
mod safetensors_js;
mod task;
mod tokenizer;
mod trainer;
mod tuners;

pub use export::*;
pub use model::*;
pub use safetensors_js::*;
pub use tokenizer::*;
pub use trainer::*;
pub use tuners::*;

/// mimalloc keeps freed pages for reuse: training allocates and frees large activation buffers
/// every step, and glibc's allocator returns them to the OS, paying a page fault per 4 KiB on
/// the next step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's option setter (linked with the allocator above).
    fn mi_option_set(option: std::os::raw::c_int, value: std::os::raw::c_long);
}

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e`.
const MI_OPTION_PURGE_DELAY: std::os::raw::c_int = 15;

/// Keep freed memory for 30 s before returning it to the OS (mimalloc's default is 1 s). A
/// training step frees and re-allocates the same large GEMM packing buffers once per step, which
/// can take longer than a second; purging them between steps cost ~1,200 page faults (2 MiB
/// pages zeroed by the kernel) per SmolLM2 step. Idle memory is still returned after 30 s.
#[napi_derive::module_init]
fn init() {
    // SAFETY: a plain option write, valid at any time after the allocator is linked.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 30_000) };
}
