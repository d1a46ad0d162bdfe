//! Exports that need no loaded model: a HF PEFT LoRA adapter folder to a llama.cpp GGUF LoRA file.

use crate::task::Job;
use napi::bindgen_prelude::AsyncTask;
use peft_core::export::{GgmlType, LoraExportOptions, LoraExportReport};

/// What `exportGgufLora` wrote.
#[napi(object)]
pub struct LoraExportResult {
    /// GGUF `general.architecture` of the file (`llama`, `qwen2`).
    pub architecture: String,
    /// `adapter.lora.alpha`.
    pub alpha: f64,
    /// Adapted modules (each a `lora_a` + `lora_b` tensor pair).
    pub modules: u32,
    /// Modules whose B holds a folded scale factor (rsLoRA, rank/alpha patterns).
    pub folded: Vec<String>,
}

/// Convert the LoRA adapter folder `adapterDir` to a llama.cpp GGUF LoRA file `outFile`, off the
/// JS thread. `baseModel`: HF folder or .gguf of the base (default: the adapter's
/// base_model_name_or_path); `outtype`: 'f32' (default) | 'f16' | 'q8_0'.
#[napi(ts_return_type = "Promise<LoraExportResult>")]
pub fn export_gguf_lora(adapter_dir: String, out_file: String, base_model: Option<String>, outtype: Option<String>) -> AsyncTask<Job<LoraExportReport, LoraExportResult>> {
    AsyncTask::new(Job::new(
        move || {
            let outtype = match outtype.as_deref() {
                None => GgmlType::F32,
                Some(t) => GgmlType::parse(t)?,
            };
            let opts = LoraExportOptions { base_model: base_model.map(std::path::PathBuf::from), outtype };
            peft_core::export::export_gguf_lora(std::path::Path::new(&adapter_dir), std::path::Path::new(&out_file), &opts)
        },
        |_, r| {
            Ok(LoraExportResult { architecture: r.architecture, alpha: r.alpha, modules: r.modules as u32, folded: r.folded.into_iter().map(|(m, _)| m).collect() })
        },
    ))
}
