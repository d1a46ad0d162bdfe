//! Tuners: one folder per method, each registered once in [`registry`].
//!
//! A tuner is a config ([`config::TunerConfig`], what HF writes as `adapter_config.json`), the
//! layer state it adds to the base model's linear layers ([`layer`], hosted by
//! [`linear::PeftLinear`]) or a prompt encoder that feeds the frozen model, and its injection
//! into a model ([`registry::Tuner`]). Adding a tuner means one new folder and one line in
//! [`registry::TUNERS`]; a LyCORIS method's folder holds its [`lycoris::LycorisKind`] and its
//! layer, the rest is [`lycoris`]'s.
//!
//! A layer tuner's folder states only its own data and math:
//! - `config.rs`: HF's defaults table and the fields, read with [`config::RawConfig`]'s typed
//!   readers (`rank`, `prob`, `number`, `one_of`, `targets`, ...: the checks and messages every
//!   config shares) over [`config::LayerCommon`] (the targeting fields);
//! - `layer.rs`: its [`layer::AdapterLayer`], whose head (`peft_type`, `module_type`, the
//!   slot → field list behind `params` / `set_param`) is one `declare_layer!` line (defined in [`layer`]);
//! - `model.rs`: the per-layer construction passed to `PeftModel::plan_layers` (or
//!   `plan_layers_with`, for model-level state shared by the layers: VeRA's projections), then
//!   `install_layers`;
//! - `mod.rs`: the [`registry::Tuner`] impl, one `declare_tuner!` (defined in [`registry`]: names, prefix,
//!   slots, config, injection and the load-time shapes) plus the hooks the tuner overrides.

pub mod adalora;
pub mod adaption_prompt;
pub mod config;
pub mod hra;
pub mod ia3;
pub mod layer;
pub mod linear;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod lycoris;
pub mod oft;
pub mod prompt;
pub mod registry;
pub mod trainable_tokens;
pub mod vera;

pub use adalora::AdaLoraConfig;
pub use adaption_prompt::AdaptionPromptConfig;
pub use config::{AdapterConfig, TunerConfig};
pub use ia3::layer::Ia3Adapter;
pub use ia3::Ia3Config;
pub use linear::{PeftLinear, RowAdapters};
pub use lora::layer::LoraAdapter;
pub use lora::{init, weighted};
pub use lora::{InitLoraWeights, LoraConfig, TargetModules};
pub use oft::OftConfig;
pub use prompt::{PromptEncoder, PromptLearningConfig, PromptMethod};
pub use trainable_tokens::TrainableTokensConfig;
pub use vera::VeraConfig;
