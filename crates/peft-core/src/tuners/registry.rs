//! The tuner registry (HF `PEFT_TYPE_TO_TUNER_MAPPING` / `register_peft_method`): every tuner is
//! one [`Tuner`] value in [`TUNERS`]. Config parsing, injection, the key grammar and load-time
//! shape checks find the tuner here by `peft_type`; nothing else names tuners.

use super::config::AdapterConfig;
use super::layer::Slot;
use super::linear::PeftLinear;
use crate::error::{PeftError, Result};
use crate::model::Task;
use crate::peft_model::{LoadResult, PeftModel};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde_json::Value;
use std::path::Path;

/// The [`PeftModel`] operations that the adapters of some tuners refuse, as HF's models raise
/// for them (see [`Tuner::refusal`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// `set_adapter` with several names at once.
    SeveralActive,
    /// `merge_adapter` / `merge_and_unload` of the adapter.
    Merge,
    /// `get_layer_status` / `get_model_status` of a model that holds the adapter.
    Status,
    /// The adapter named for rows of a mixed batch (`adapter_names`).
    MixedBatch,
    /// `set_requires_grad` of the adapter.
    SetRequiresGrad,
}

/// The model-level tuner contract (HF `BaseTuner` plus its registration).
pub trait Tuner: Sync {
    /// The `peft_type` strings this tuner handles (several for prompt learning).
    fn peft_types(&self) -> &'static [&'static str];
    /// HF's tuner model class (`"LoraModel"`), as `get_model_status` reports it.
    fn model_class(&self) -> &'static str;
    /// HF `PEFT_TYPE_TO_PREFIX_MAPPING`: the prefix of `peft_type`'s parameter names
    /// (`"lora_"`, `"prompt_tuning_"`), which HF warns an adapter name must not be part of.
    fn prefix(&self, _peft_type: &str) -> Option<&'static str> {
        None
    }
    /// The parameter slots the tuner's layers hold (the key grammar, see [`Slot`]).
    fn slots(&self) -> &'static [Slot] {
        &[]
    }
    /// Whether the tuner ties its own adapters of the input embedding and a tied `lm_head` (HF
    /// `TrainableTokensModel` overrides `_get_tied_target_modules`), so HF's warning on merging
    /// an adapter with tied targets (`_check_merge_allowed`) does not apply.
    fn ties_embedding_adapters(&self) -> bool {
        false
    }
    /// HF's refusal of `op` for adapter `name` of this tuner (config `cfg`): the error the model
    /// returns before anything changes, or `None` when the tuner allows it (the default).
    fn refusal(&self, op: Operation, name: &str, cfg: &AdapterConfig) -> Option<PeftError> {
        let _ = (op, name, cfg);
        None
    }
    /// Parse HF's adapter_config.json object into this tuner's config.
    ///
    /// Errors: `InvalidAdapterConfig` naming the field.
    fn parse_config(&self, v: &Value, path: Option<&Path>) -> Result<AdapterConfig>;
    /// Inject adapter `name` into `model` (HF `inject_adapter` / `_create_and_replace`); returns
    /// the targeted module paths (empty for prompt learning). On error the model is unchanged.
    fn inject(&self, model: &mut PeftModel, name: &str, cfg: AdapterConfig, seed: u64) -> Result<Vec<String>>;
    /// The parameters adapter `cfg` will hold in module `m` (layer `lin`) as `(slot, shape)`:
    /// empty when the module is not targeted. Used to check a file's tensors before the model
    /// changes.
    fn expected_params(&self, cfg: &AdapterConfig, task: Task, m: &str, lin: &PeftLinear) -> Vec<(Slot, Vec<usize>)> {
        let _ = (cfg, task, m, lin);
        vec![]
    }
    /// Called by `load_adapter` with the file's tensors before its keys are matched to the
    /// model: a tuner with model-level state (HF `uses_shared_state`, VeRA's projections) takes
    /// its tensors out of `tensors` into `cfg` for [`Tuner::inject`].
    ///
    /// Errors: the tuner's (a missing tensor the config requires).
    fn prepare_load(&self, model: &mut PeftModel, cfg: &mut AdapterConfig, tensors: &mut Vec<(String, Tensor)>, wpath: &Path) -> Result<()> {
        let _ = (model, cfg, tensors, wpath);
        Ok(())
    }
    /// Model-level tensors saved with adapter `name` besides its layers' slots, under their
    /// on-disk keys (VeRA: `base_model.vera_A` / `base_model.vera_B`).
    fn shared_state_dict(&self, model: &PeftModel, name: &str, cfg: &AdapterConfig) -> Result<Vec<(String, Tensor)>> {
        let _ = (model, name, cfg);
        Ok(vec![])
    }
    /// Post-process adapter `name`'s tensors (on-disk keys) before they are saved, after
    /// [`Tuner::shared_state_dict`] (HF `_get_adapter_state_dict` overrides: AdaLoRA drops the
    /// triplets its `rank_pattern` masked).
    ///
    /// Errors: the tuner's.
    fn finish_state_dict(&self, model: &PeftModel, name: &str, cfg: &AdapterConfig, tensors: &mut Vec<(String, Tensor)>) -> Result<()> {
        let _ = (model, name, cfg, tensors);
        Ok(())
    }
    /// A term this tuner adds to every loss computed with adapter `name` (HF tuner models that
    /// override `forward` to add to `outputs.loss`: AdaLoRA's orthogonal regularisation): a
    /// scalar f32 tensor, tracked for gradients when `train`. `None` (the default): nothing.
    fn loss_term(&self, model: &PeftModel, name: &str, cfg: &AdapterConfig, train: bool) -> Result<Option<Tensor>> {
        let _ = (model, name, cfg, train);
        Ok(None)
    }
    /// Called by the trainer after each optimizer step (parameters updated, `grads` the step's
    /// gradients as applied, after clipping) for every adapter `name` of this tuner, with the
    /// 0-based `global_step` (HF: what a training loop calls between `optimizer.step()` and
    /// `zero_grad()`, AdaLoRA's `update_and_allocate`). `global_step` is `None` when the
    /// trainer leaves that logic to the caller (`TrainingArgs::tuner_step_hooks` off): the tuner
    /// only records what a later call needs. The default does nothing.
    fn after_step(&self, model: &PeftModel, name: &str, cfg: &AdapterConfig, global_step: Option<usize>, grads: &GradStore) -> Result<()> {
        let _ = (model, name, cfg, global_step, grads);
        Ok(())
    }
    /// Tuners that do not live in layers (prompt learning) load their own tensors; `None` means
    /// the generic layer loading applies.
    fn load(&self, model: &mut PeftModel, name: &str, cfg: &AdapterConfig, tensors: &mut Vec<(String, Tensor)>, wpath: &Path) -> Option<Result<LoadResult>> {
        let _ = (model, name, cfg, tensors, wpath);
        None
    }
}

/// The declarative part of a tuner's [`Tuner`] impl, written inside `impl Tuner for T {}` (HF
/// `register_peft_method(name, config_cls, model_cls, prefix)`):
///
/// - `declare_tuner!(peft_types: P, model_class: M, config: C, inject: |model, name, c, seed| E)`:
///   its `peft_type`s, HF's tuner model class, parsing with `C::from_json`, and injection as `E`
///   with `c` the adapter's `C` (prompt learning, adaption prompt);
/// - `declare_tuner!(peft_types: P, model_class: M, prefix: X, slots: S, config: C, inject: add)`:
///   a layer tuner's, with the parameter prefix and slots (the key grammar) and injection with
///   `PeftModel::<add>(name, config, seed)`.
///
/// With `expected: |c, m, lin| if ADAPTS => SHAPES` it also writes [`Tuner::expected_params`]
/// (the load-time shape check, HF's `_create_and_replace` seen from the file): for a config of
/// the tuner's type `c` that selects module `m` ([`crate::tuners::config::LayerCommon::selects`])
/// whose layer `lin` is a kind the tuner adapts (`ADAPTS`), the `(slot, shape)` list `SHAPES`;
/// nothing otherwise.
macro_rules! declare_tuner {
    (peft_types: $pt:expr, model_class: $mc:expr, prefix: $pf:expr, slots: $slots:expr, config: $cfg:ty, inject: $add:ident,
     expected: |$c:ident, $m:ident, $lin:ident| if $adapts:expr => $shapes:expr $(,)?) => {
        $crate::tuners::registry::declare_tuner!(peft_types: $pt, model_class: $mc, prefix: $pf, slots: $slots, config: $cfg, inject: $add);
        fn expected_params(&self, cfg: &$crate::tuners::config::AdapterConfig, task: $crate::model::Task, $m: &str, $lin: &$crate::tuners::linear::PeftLinear) -> Vec<($crate::tuners::layer::Slot, Vec<usize>)> {
            let Some($c) = cfg.get::<$cfg>() else { return vec![] };
            if !($adapts) || !$c.selects($m, task) {
                return vec![];
            }
            $shapes
        }
    };
    (peft_types: $pt:expr, model_class: $mc:expr, config: $cfg:ty, inject: |$model:ident, $name:ident, $c:ident, $seed:ident| $inject:expr $(,)?) => {
        fn peft_types(&self) -> &'static [&'static str] {
            $pt
        }
        fn model_class(&self) -> &'static str {
            $mc
        }
        fn parse_config(&self, v: &serde_json::Value, path: Option<&std::path::Path>) -> $crate::error::Result<$crate::tuners::config::AdapterConfig> {
            Ok(<$cfg>::from_json(v, path)?.into())
        }
        fn inject(&self, $model: &mut $crate::peft_model::PeftModel, $name: &str, cfg: $crate::tuners::config::AdapterConfig, $seed: u64) -> $crate::error::Result<Vec<String>> {
            let $c = cfg.get::<$cfg>().expect(concat!("a ", stringify!($cfg))).clone();
            $inject
        }
    };
    (peft_types: $pt:expr, model_class: $mc:expr, prefix: $pf:expr, slots: $slots:expr, config: $cfg:ty, inject: $add:ident $(,)?) => {
        $crate::tuners::registry::declare_tuner!(peft_types: $pt, model_class: $mc, config: $cfg, inject: |model, name, c, seed| model.$add(name, c, seed));
        fn prefix(&self, _peft_type: &str) -> Option<&'static str> {
            Some($pf)
        }
        fn slots(&self) -> &'static [$crate::tuners::layer::Slot] {
            $slots
        }
    };
}
pub(crate) use declare_tuner;

/// Every registered tuner.
pub static TUNERS: &[&dyn Tuner] = &[&super::lora::LoraTuner, &super::ia3::Ia3Tuner, &super::loha::TUNER, &super::lokr::TUNER, &super::vera::TUNER, &super::oft::TUNER, &super::trainable_tokens::TUNER, &super::prompt::PromptTuner, &super::prompt::cpt::TUNER, &super::adaption_prompt::TUNER, &super::adalora::TUNER, &super::hra::TUNER];

/// The tuner registered for `peft_type`.
pub fn tuner_for(peft_type: &str) -> Option<&'static dyn Tuner> {
    TUNERS.iter().copied().find(|t| t.peft_types().contains(&peft_type))
}

/// Every `peft_type` this crate loads, in registry order.
pub fn supported_peft_types() -> Vec<&'static str> {
    TUNERS.iter().flat_map(|t| t.peft_types().iter().copied()).collect()
}

/// The slots of every registered tuner.
pub fn all_slots() -> impl Iterator<Item = &'static Slot> {
    TUNERS.iter().flat_map(|t| t.slots().iter())
}
