//! One `Task` type for all async work, with panic catching and error mapping.

use napi::bindgen_prelude::{ToNapiValue, TypeName};
use napi::{Env, Status, Task};
use peft_core::PeftError;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A PeftError as a JS error: message `[CODE] text`.
pub fn to_napi(e: PeftError) -> napi::Error {
    napi::Error::new(Status::GenericFailure, format!("[{}] {}", e.code(), e))
}

/// An error with our code for binding-level argument checks.
pub fn arg_err(arg: &str, msg: impl std::fmt::Display) -> napi::Error {
    to_napi(PeftError::invalid_arg(arg, msg.to_string()))
}

/// Run `f`, turning a panic into an `ERR_INTERNAL` error.
pub fn guard<T>(f: impl FnOnce() -> peft_core::Result<T>) -> napi::Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(to_napi),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(napi::Error::new(Status::GenericFailure, format!("[ERR_INTERNAL] panic in native code: {msg}")))
        }
    }
}

type Work<O> = Box<dyn FnOnce() -> peft_core::Result<O> + Send>;
type Finish<O, J> = fn(Env, O) -> napi::Result<J>;

/// Async work: `work` runs off the JS thread, `finish` builds the JS value on it.
pub struct Job<O: Send + 'static, J> {
    work: Option<Work<O>>,
    finish: Finish<O, J>,
}

impl<O: Send + 'static, J> Job<O, J> {
    pub fn new(work: impl FnOnce() -> peft_core::Result<O> + Send + 'static, finish: Finish<O, J>) -> Self {
        Job { work: Some(Box::new(work)), finish }
    }
}

impl<O: Send + 'static> Job<O, O> {
    /// A job whose output is already a JS-convertible value.
    pub fn plain(work: impl FnOnce() -> peft_core::Result<O> + Send + 'static) -> Self {
        Job { work: Some(Box::new(work)), finish: |_, o| Ok(o) }
    }
}

impl<O: Send + 'static, J: ToNapiValue + TypeName> Task for Job<O, J> {
    type Output = O;
    type JsValue = J;

    fn compute(&mut self) -> napi::Result<O> {
        let work = self.work.take().ok_or_else(|| napi::Error::from_reason("[ERR_INTERNAL] task ran twice"))?;
        guard(work)
    }

    fn resolve(&mut self, env: Env, output: O) -> napi::Result<J> {
        (self.finish)(env, output)
    }
}
