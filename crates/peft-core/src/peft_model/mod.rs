//! `PeftModel`: a base model plus named adapters, with HF PEFT's semantics for adding, activating,
//! disabling, merging, deleting, saving and loading adapters (peft 0.21 `PeftModel` / `LoraModel`).

use crate::error::{PeftError, Result};
use crate::io::{python_json_dumps, read_safetensors, write_atomic};
use crate::model::{BaseModel, ForwardOptions, KvCache, Task};
use crate::tuners::registry::Operation;
use crate::tuners::lora::{InitLoraWeights, TargetModules};
use crate::tuners::prompt::{ModelDims, PromptEncoder, PromptLearningConfig, PromptMethod};
use crate::tuners::AdapterConfig;
use std::collections::{BTreeMap, HashMap};
use candle_core::{DType, Tensor, Var};
use rand::Rng;
use std::path::{Path, PathBuf};

mod bias;
mod inject;
mod manage;
mod state_dict;
mod save;
mod load;
mod hotswap;
mod forward;
mod status;
mod checkpointing;

/// Prefix of every key in adapter_model.safetensors (`base_model.model.<module path>...`).
pub use crate::keys::KEY_PREFIX;
pub(crate) use bias::BiasMode;
pub(crate) use checkpointing::prefix_refusal as prefix_checkpointing_refusal;
pub(crate) use inject::fit_fan_in_fan_out;
use crate::keys::{strip_adapter_name, with_adapter_name};
/// The adapter name meaning "no adapter" in mixed batches.
pub const BASE_ADAPTER: &str = "__base__";

/// Keys that did not line up while loading an adapter (HF's `load_result`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadResult {
    /// Adapter parameters the model expected but the file lacks (they keep their initial values).
    pub missing_keys: Vec<String>,
    /// Keys of the file that match no adapter parameter (ignored).
    pub unexpected_keys: Vec<String>,
}

/// Options of [`PeftModel::load_adapter_with`] (HF `load_adapter` keyword arguments).
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Load with trainable weights (false: inference mode).
    pub is_trainable: bool,
    /// Use this config instead of the folder's adapter_config.json.
    pub config: Option<AdapterConfig>,
    /// `(regex, replacement)` pairs applied to each key after its `base_model.model.` /
    /// `base_model.` prefix is removed; the first pattern that matches rewrites the key (HF
    /// `key_mapping`).
    pub key_mapping: Vec<(String, String)>,
    /// Keep adapter weights in f32 (true, HF's default); false stores them in the base model's
    /// dtype.
    pub autocast_adapter_dtype: bool,
    /// HF creates the adapter on the meta device first; here loading never keeps a second copy,
    /// so this changes nothing (accepted for API compatibility).
    pub low_cpu_mem_usage: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { is_trainable: false, config: None, key_mapping: vec![], autocast_adapter_dtype: true, low_cpu_mem_usage: false }
    }
}

/// HF `EMBEDDING_LAYER_NAMES`: the last path components of the modules HF treats as embedding
/// layers when it checks tied weights (`_check_tied_modules`, `_check_merge_allowed`).
pub(crate) const EMBEDDING_LAYER_NAMES: [&str; 2] = ["embed_tokens", "lm_head"];

/// A base model with adapters. See the module docs.
/// Options of [`PeftModel::save_pretrained_with`] (HF `save_pretrained` keyword arguments).
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    pub save_embedding_layers: SaveEmbeddingLayers,
    /// HF `path_initial_model_for_weight_conversion`: the folder of the adapter as saved right
    /// after PiSSA / OLoRA initialisation; the saved adapter is converted to a plain LoRA adapter
    /// for the original base model (see `PeftModel::convert_mutated_init`).
    pub path_initial_model_for_weight_conversion: Option<PathBuf>,
}

/// HF `save_pretrained(save_embedding_layers=...)`: whether the base embedding layers are
/// saved with the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaveEmbeddingLayers {
    /// Save them when the config's `target_modules` names an embedding layer (HF `"auto"`).
    #[default]
    Auto,
    Yes,
    No,
}

pub struct PeftModel {
    /// The base model (Llama family or GPT-2).
    pub base: Box<dyn BaseModel>,
    pub(crate) configs: Vec<(String, AdapterConfig)>,
    /// Prompt-learning adapters' encoders (HF `PeftModel.prompt_encoder`).
    pub(crate) prompt_encoders: HashMap<String, PromptEncoder>,
    pub(crate) active: Vec<String>,
    pub(crate) disabled: bool,
    /// Warnings of the last calls (HF's `warnings.warn`), drained by [`Self::take_warnings`].
    pub(crate) warnings: Vec<String>,
    /// LoRA scalings saved by [`Self::rescale_adapter_scale`] (module path, adapter, value), one
    /// entry per nested call.
    pub(crate) saved_scalings: Vec<Vec<(String, String, f64)>>,
    /// Gradient checkpointing in training steps (see [`Self::set_gradient_checkpointing`]).
    pub(crate) gradient_checkpointing: bool,
    /// What [`Self::set_requires_grad`] set (see [`Self::requires_grad`]).
    pub(crate) grad_flags: GradFlags,
}

/// The two kinds of parameters whose `requires_grad` HF tracks apart for an adapter: those of
/// its tuner layers (`BaseTunerLayer`, LoRA bias included) and its modules_to_save copies
/// (`ModulesToSaveWrapper`), which `set_adapter` resets by different rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradPart {
    Layers,
    Copies,
}

/// `requires_grad` set by [`PeftModel::set_requires_grad`], per adapter and [`GradPart`]; an
/// adapter without an entry follows HF's default (active and not in inference mode).
#[derive(Clone, Debug, Default)]
pub(crate) struct GradFlags {
    pub(crate) layers: BTreeMap<String, bool>,
    pub(crate) copies: BTreeMap<String, bool>,
}

impl GradFlags {
    fn part(&self, part: GradPart) -> &BTreeMap<String, bool> {
        match part {
            GradPart::Layers => &self.layers,
            GradPart::Copies => &self.copies,
        }
    }
}

/// Check an adapter name is usable, also as a folder name (HF saves non-default adapters in a
/// subfolder named after them).
pub fn validate_adapter_name(name: &str) -> Result<()> {
    let bad = |m: &str| Err(PeftError::invalid_arg("adapterName", format!("{name:?} {m}")));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > 255 {
        return bad("is longer than 255 bytes");
    }
    if name.contains('/') || name.contains('\\') || name.contains('\0') || name == "." || name == ".." {
        return bad("cannot be used as a folder name (no '/', '\\', NUL, '.' or '..')");
    }
    if name.contains('.') {
        return bad("must not contain '.' (it would break parameter names)");
    }
    if name == BASE_ADAPTER {
        return bad("is reserved for the base model in mixed batches");
    }
    Ok(())
}

pub(crate) fn kaiming_uniform(rng: &mut rand::rngs::StdRng, rows: usize, cols: usize) -> Vec<f32> {
    // torch.nn.init.kaiming_uniform_(w, a=sqrt(5)) on [rows, cols]: bound = 1 / sqrt(fan_in = cols).
    let bound = 1.0 / (cols as f32).sqrt();
    (0..rows * cols).map(|_| rng.random_range(-bound..bound)).collect()
}

impl PeftModel {
    /// Wrap a base model (no adapters yet).
    pub fn new(base: Box<dyn BaseModel>) -> Self {
        PeftModel { base, configs: vec![], prompt_encoders: HashMap::new(), active: vec![], disabled: false, warnings: vec![], saved_scalings: vec![], gradient_checkpointing: false, grad_flags: GradFlags::default() }
    }

    /// Adapter names in the order they were added.
    pub fn adapter_names(&self) -> Vec<String> {
        self.configs.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The config of `name`.
    pub fn peft_config(&self, name: &str) -> Result<&AdapterConfig> {
        self.configs.iter().find(|(n, _)| n == name).map(|(_, c)| c).ok_or_else(|| self.not_found(name))
    }

    /// Queue a warning for [`Self::take_warnings`] (HF `warnings.warn`).
    pub(crate) fn warn(&mut self, msg: String) {
        self.warnings.push(msg);
    }

    /// Warnings raised since the last call (HF's `warnings.warn` messages), oldest first.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    /// HF `peft_type` of the model's adapters (`None` before the first adapter).
    pub fn peft_type(&self) -> Option<&'static str> {
        self.configs.first().map(|(_, c)| c.peft_type())
    }

    /// HF `is_prompt_learning`: the model's adapters are prompt-learning adapters.
    pub fn is_prompt_learning(&self) -> bool {
        self.configs.first().map(|(_, c)| c.is_prompt_learning()).unwrap_or(false)
    }

    /// The prompt encoder of adapter `name` (prompt learning only).
    pub fn prompt_encoder(&self, name: &str) -> Option<&PromptEncoder> {
        self.prompt_encoders.get(name)
    }

    /// HF `get_prompt_embedding_to_save(adapter_name)`: the table `save_pretrained` writes as
    /// `prompt_embeddings` for prompt-learning adapter `name`, computed by its encoder from the
    /// virtual tokens (`[num_virtual_tokens · num_transformer_submodules, token_dim]` for prompt
    /// tuning, P-tuning and CPT; `[num_virtual_tokens, num_layers · 2 · token_dim]` for prefix
    /// tuning; the shared table for multitask prompt tuning), detached, in the encoder's dtype.
    ///
    /// Errors: `AdapterNotFound`; `InvalidArgument` for an adapter that is not prompt learning
    /// (HF: a `KeyError` from `prompt_encoder[adapter_name]`).
    pub fn prompt_embedding_to_save(&self, name: &str) -> Result<Tensor> {
        let cfg = self.peft_config(name)?;
        let enc = self.prompt_encoders.get(name).ok_or_else(|| {
            PeftError::invalid_arg("adapterName", format!("`{name}` is a {} adapter, not a prompt-learning one: it has no prompt embedding", cfg.peft_type()))
        })?;
        enc.table_to_save()
    }

    /// Dimensions of the base model that prompt-learning configs are derived from.
    pub fn model_dims(&self) -> ModelDims {
        let c = self.base.info();
        ModelDims {
            num_layers: c.num_hidden_layers,
            hidden_size: c.hidden_size,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            vocab_size: c.vocab_size,
        }
    }

    /// The active prompt-learning adapter and its encoder, unless adapters are disabled.
    /// The active prompt-learning adapter's config and encoder (`None` when disabled or none).
    pub(crate) fn active_prompt(&self) -> Option<(&PromptLearningConfig, &PromptEncoder)> {
        if self.disabled {
            return None;
        }
        let name = self.active.first()?;
        let cfg = self.peft_config(name).ok()?.as_prompt()?;
        Some((cfg, self.prompt_encoders.get(name)?))
    }

    /// The CPT options of the active adapter, when it is a CPT adapter (and adapters are
    /// enabled): the loss then follows [`crate::tuners::prompt::cpt::cpt_loss`].
    pub fn active_cpt(&self) -> Option<&crate::tuners::prompt::CptOptions> {
        self.active_prompt().and_then(|(c, _)| c.cpt.as_ref())
    }

    pub(crate) fn not_found(&self, name: &str) -> PeftError {
        PeftError::AdapterNotFound { name: name.into(), available: self.adapter_names() }
    }

    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// Module paths that carry adapter `name`.
    pub fn adapter_modules(&self, name: &str) -> Vec<String> {
        let mut out: Vec<String> = self.base.named_layers().into_iter().filter(|(_, l)| l.has_adapter(name)).map(|(n, _)| n).collect();
        out.extend(self.base.named_attention_prompts().into_iter().filter(|(_, h)| h.adapters.contains_key(name)).map(|(n, _)| n));
        out
    }

    /// The first refusal of `op` by the tuner of one of the adapters `names`, in order (see
    /// [`crate::tuners::registry::Tuner::refusal`]).
    ///
    /// Errors: `AdapterNotFound` for an unknown name; the tuner's refusal.
    pub(crate) fn check_allowed<'a>(&self, op: Operation, names: impl IntoIterator<Item = &'a String>) -> Result<()> {
        for n in names {
            let cfg = self.peft_config(n)?;
            if let Some(e) = cfg.tuner().refusal(op, n, cfg) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Bytes of native memory held by the model's weights: the base parameters (tied weights
    /// once) and every adapter's tensors (LoRA/DoRA, IA3, modules_to_save copies, prompt
    /// encoders). Used to report external memory to the JS engine.
    pub fn native_bytes(&self) -> usize {
        let bytes = |v: &Var| v.elem_count() * v.dtype().size_in_bytes();
        let mut n = self.base.base_param_count() * self.base.dtype().size_in_bytes();
        for (_, l) in self.base.named_layers() {
            n += l.all_adapter_vars().into_iter().map(bytes).sum::<usize>();
        }
        for e in self.prompt_encoders.values() {
            n += e.vars().iter().map(|(_, v)| bytes(v)).sum::<usize>();
        }
        for (_, host) in self.base.named_attention_prompts() {
            n += host.all_vars().into_iter().map(bytes).sum::<usize>();
        }
        n
    }

    /// Names of merged adapters (in any layer).
    pub fn merged_adapters(&self) -> Vec<String> {
        let mut out: Vec<String> = self.base.named_layers().into_iter().flat_map(|(_, l)| l.merged.clone()).collect();
        out.sort();
        out.dedup();
        out
    }

    /// Lines of `adapter_config.json` for `name` (HF's exact text).
    pub fn config_json(&self, name: &str) -> Result<String> {
        Ok(python_json_dumps(&self.peft_config(name)?.to_json()))
    }
}


/// `\\1` (Python `re.sub` group reference) → `${1}` (regex crate syntax); `$` kept literal otherwise.
fn py_group_refs(rep: &str) -> String {
    let mut out = String::new();
    let mut chars = rep.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().map(|d| d.is_ascii_digit()).unwrap_or(false) => {
                let mut n = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    n.push(*d);
                    chars.next();
                }
                out.push_str(&format!("${{{n}}}"));
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

/// torch's device type name (`"cpu"`, `"cuda"`).
fn device_type(d: &candle_core::Device) -> &'static str {
    match d {
        candle_core::Device::Cpu => "cpu",
        candle_core::Device::Cuda(_) => "cuda",
        candle_core::Device::Metal(_) => "mps",
    }
}

/// Refuse an adapter subfolder that would lead a save outside `dir`: a symlink (to anywhere),
/// something that is not a folder, or a path that does not resolve inside `dir`.
fn check_save_subfolder(dir: &Path, target: &Path) -> Result<()> {
    if target == dir {
        return Ok(());
    }
    let bad = |m: &str| Err(PeftError::invalid_arg("adapterName", format!("cannot save into {}: {m}", target.display())));
    match std::fs::symlink_metadata(target) {
        Ok(md) if md.file_type().is_symlink() => return bad("it is a symlink (saves never follow links out of the target folder)"),
        Ok(md) if !md.is_dir() => return bad("it exists and is not a folder"),
        _ => {}
    }
    if let (Ok(d), Some(parent)) = (dir.canonicalize(), target.parent()) {
        if parent.canonicalize().map(|p| p != d).unwrap_or(true) {
            return bad("it does not lie directly inside the target folder");
        }
    }
    Ok(())
}

/// The layer `target_modules="all-linear"` leaves out (HF `_maybe_include_all_linear_layers`):
/// the output embedding `lm_head`, or for sequence classification the `score` / `classifier`
/// head (HF's `SEQ_CLS_HEAD_NAMES`).
pub(crate) fn is_output_head(task: Task, module: &str) -> bool {
    module == "lm_head" || (task == Task::SeqCls && (module == "score" || module == "classifier"))
}

/// Whether the `modules_to_save` entry `entry` selects linear module `module`: HF `_set_trainable`
/// tests a plain `key.endswith(entry)`, without a dot boundary, so `classifier` also selects
/// DistilBERT's `pre_classifier` (which HF PEFT then trains and saves).
///
/// HF wraps the matched module whole, so a linear layer is also selected when one of its parent
/// modules matches (RoBERTa's `classifier` head holds `classifier.dense` and
/// `classifier.out_proj`); the copies are saved under the same keys as HF's.
pub(crate) fn saves_module(module: &str, entry: &str) -> bool {
    module.ends_with(entry) || module.match_indices('.').any(|(i, _)| module[..i].ends_with(entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_names_are_validated() {
        for bad in ["", "a/b", "a\\b", "..", "a.b", "__base__", &"x".repeat(256)] {
            assert!(validate_adapter_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_adapter_name("default").is_ok());
    }

    #[test]
    fn python_group_references_are_translated() {
        assert_eq!(py_group_refs(r"model.\1.x"), "model.${1}.x");
        assert_eq!(py_group_refs("a$b"), "a$$b");
    }
}
