//! The one error type of peft-core. Every variant maps to a stable string code
//! (`PeftError::code`) that the Node binding puts on the JS `Error` as `code`.

use std::path::PathBuf;

/// Errors raised by peft-core. Messages name the file, key or argument at fault.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// A file or folder that was asked for does not exist.
    #[error("not found: {path}: {what}")]
    NotFound { path: PathBuf, what: String },
    /// An I/O failure while reading or writing `path`.
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, #[source] source: std::io::Error },
    /// A model `config.json` that cannot be parsed or has invalid values.
    #[error("invalid model config {path}: {msg}")]
    InvalidModelConfig { path: PathBuf, msg: String },
    /// An `adapter_config.json` (or a config passed from JS) that is invalid.
    #[error("invalid adapter config{}: {msg}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    InvalidAdapterConfig { path: Option<PathBuf>, msg: String },
    /// A safetensors file that is malformed or truncated.
    #[error("invalid safetensors file {path}: {msg}")]
    SafetensorsInvalid { path: PathBuf, msg: String },
    /// A GGUF file that is malformed or uses an unsupported layout.
    #[error("invalid GGUF file {path}: {msg}")]
    GgufInvalid { path: PathBuf, msg: String },
    /// A quantized tensor whose blocks are malformed (a NaN / infinite scale, a byte length that
    /// does not match its shape and type, a row length that is not a whole number of blocks).
    /// Shares `ERR_GGUF_INVALID` with [`PeftError::GgufInvalid`]: such blocks come from GGUF files.
    #[error("invalid quantized tensor {tensor}: {msg}")]
    QuantInvalid { tensor: String, msg: String },
    /// A tokenizer that cannot be built or used.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// A chat template that is missing, does not compile, or fails while rendering (its
    /// `raise_exception` message, e.g. "Conversation roles must alternate ...").
    #[error("chat template error: {0}")]
    ChatTemplate(String),
    /// A tensor whose shape does not fit where it is used (e.g. an adapter for another base).
    #[error("shape mismatch for {name}: expected {expected:?}, found {found:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, found: Vec<usize> },
    /// `target_modules` selected no module of the model: `msg` is HF's
    /// `NoMatchingPeftModuleError` text plus the modules the exclusions or the layer selection
    /// left out.
    #[error("{msg} Some module names are: {examples}")]
    NoTargetModules { msg: String, examples: String },
    /// An adapter name that is already used.
    #[error("adapter name `{0}` is already in use")]
    AdapterExists(String),
    /// An adapter name that is not known.
    #[error("adapter `{name}` does not exist (available: {available:?})")]
    AdapterNotFound { name: String, available: Vec<String> },
    /// An argument from the caller that is out of range or of the wrong form.
    #[error("invalid argument `{arg}`: {msg}")]
    InvalidArgument { arg: String, msg: String },
    /// The operation is not valid in the current state (e.g. training a merged adapter).
    #[error("invalid state: {0}")]
    InvalidState(String),
    /// An export asked for something the target format or runtime cannot express (llama.cpp
    /// cannot apply DoRA, `modules_to_save` copies, prompt learning, IA3, LoRA on embeddings;
    /// an architecture without a GGUF mapping). `what` names the feature, `msg` says why.
    #[error("cannot export {what}: {msg}")]
    ExportUnsupported { what: String, msg: String },
    /// The operation was aborted by the caller.
    #[error("aborted")]
    Aborted,
    /// An error from candle (tensor kernels); treated as internal.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// Anything that should not happen.
    #[error("internal error: {0}")]
    Internal(String),
}

impl PeftError {
    /// The stable code shown to JS users as `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            PeftError::NotFound { .. } => "ERR_NOT_FOUND",
            PeftError::Io { .. } => "ERR_IO",
            PeftError::InvalidModelConfig { .. } => "ERR_MODEL_CONFIG_INVALID",
            PeftError::InvalidAdapterConfig { .. } => "ERR_ADAPTER_CONFIG_INVALID",
            PeftError::SafetensorsInvalid { .. } => "ERR_SAFETENSORS_INVALID",
            PeftError::GgufInvalid { .. } | PeftError::QuantInvalid { .. } => "ERR_GGUF_INVALID",
            PeftError::Tokenizer(_) => "ERR_TOKENIZER",
            PeftError::ChatTemplate(_) => "ERR_CHAT_TEMPLATE",
            PeftError::ShapeMismatch { .. } => "ERR_SHAPE_MISMATCH",
            PeftError::NoTargetModules { .. } => "ERR_NO_TARGET_MODULES",
            PeftError::AdapterExists(_) => "ERR_ADAPTER_EXISTS",
            PeftError::AdapterNotFound { .. } => "ERR_ADAPTER_NOT_FOUND",
            PeftError::InvalidArgument { .. } => "ERR_INVALID_ARGUMENT",
            PeftError::InvalidState(_) => "ERR_INVALID_STATE",
            PeftError::ExportUnsupported { .. } => "ERR_EXPORT_UNSUPPORTED",
            PeftError::Aborted => "ERR_ABORTED",
            PeftError::Candle(_) => "ERR_INTERNAL",
            PeftError::Internal(_) => "ERR_INTERNAL",
        }
    }

    pub fn invalid_arg(arg: impl Into<String>, msg: impl Into<String>) -> Self {
        PeftError::InvalidArgument { arg: arg.into(), msg: msg.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            PeftError::NotFound { path, what: "no such file or directory".into() }
        } else {
            PeftError::Io { path, source }
        }
    }
}

/// Result alias used throughout peft-core.
pub type Result<T> = std::result::Result<T, PeftError>;
