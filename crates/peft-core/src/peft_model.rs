//! `PeftModel`: a base model plus named adapters, with HF PEFT's semantics for adding, activating,
//! disabling, merging, deleting, saving and loading adapters (peft 0.21 `PeftModel` / `LoraModel`).

use crate::error::{PeftError, Result};
use crate::io::{python_json_dumps, read_safetensors, safetensors_bytes, write_atomic};
use crate::model::{ForwardOptions, KvCache, LlamaForCausalLM};
use crate::targeting::is_target;
use crate::tuners::linear::LoraAdapter;
use crate::tuners::lora::{InitLoraWeights, LoraConfig};
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::path::{Path, PathBuf};

/// Prefix of every key in adapter_model.safetensors (`base_model.model.<module path>...`).
pub const KEY_PREFIX: &str = "base_model.model.";
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

/// A base model with adapters. See the module docs.
pub struct PeftModel {
    pub base: LlamaForCausalLM,
    configs: Vec<(String, LoraConfig)>,
    active: Vec<String>,
    disabled: bool,
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

fn kaiming_uniform(rng: &mut rand::rngs::StdRng, rows: usize, cols: usize) -> Vec<f32> {
    // torch.nn.init.kaiming_uniform_(w, a=sqrt(5)) on [rows, cols]: bound = 1 / sqrt(fan_in = cols).
    let bound = 1.0 / (cols as f32).sqrt();
    (0..rows * cols).map(|_| rng.random_range(-bound..bound)).collect()
}

impl PeftModel {
    /// Wrap a base model (no adapters yet).
    pub fn new(base: LlamaForCausalLM) -> Self {
        PeftModel { base, configs: vec![], active: vec![], disabled: false }
    }

    /// Adapter names in the order they were added.
    pub fn adapter_names(&self) -> Vec<String> {
        self.configs.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The config of `name`.
    pub fn peft_config(&self, name: &str) -> Result<&LoraConfig> {
        self.configs.iter().find(|(n, _)| n == name).map(|(_, c)| c).ok_or_else(|| self.not_found(name))
    }

    fn not_found(&self, name: &str) -> PeftError {
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
        self.base.named_linears().into_iter().filter(|(_, l)| l.adapters.contains_key(name)).map(|(n, _)| n).collect()
    }

    /// Names of merged adapters (in any layer).
    pub fn merged_adapters(&self) -> Vec<String> {
        let mut out: Vec<String> = self.base.named_linears().into_iter().flat_map(|(_, l)| l.merged.clone()).collect();
        out.sort();
        out.dedup();
        out
    }

    /// Inject a new adapter (HF `add_adapter` / `inject_adapter`). The first adapter of a model is
    /// made active (as `get_peft_model` does); later ones are not. `seed` drives the weight init.
    ///
    /// Errors: `InvalidArgument` (bad name), `AdapterExists`, `NoTargetModules` (naming the
    /// targets and some module names); on any error the model is left unchanged.
    pub fn add_adapter(&mut self, name: &str, mut cfg: LoraConfig, seed: u64) -> Result<Vec<String>> {
        validate_adapter_name(name)?;
        if self.configs.iter().any(|(n, _)| n == name) {
            return Err(PeftError::AdapterExists(name.into()));
        }
        if cfg.bias != "none" {
            return Err(PeftError::InvalidAdapterConfig { path: None, msg: format!("bias {:?} is not supported yet (only \"none\")", cfg.bias) });
        }
        if cfg.base_model_name_or_path.is_none() {
            cfg.base_model_name_or_path = self.base.config.name_or_path.clone();
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let device = self.base.device.clone();
        let mut planned: Vec<(String, LoraAdapter)> = Vec::new();
        for (mname, lin) in self.base.named_linears() {
            if !is_target(&cfg, &mname, mname == "lm_head") {
                continue;
            }
            let r = cfg.rank_for(&mname);
            let alpha = cfg.alpha_for(&mname);
            let (inf, outf) = (lin.in_features(), lin.out_features());
            let a = match cfg.init_lora_weights {
                InitLoraWeights::Gaussian => {
                    let n = Normal::new(0.0f32, 1.0 / r as f32).map_err(|e| PeftError::Internal(e.to_string()))?;
                    (0..r * inf).map(|_| n.sample(&mut rng)).collect()
                }
                _ => kaiming_uniform(&mut rng, r, inf),
            };
            let b = match cfg.init_lora_weights {
                InitLoraWeights::Random => kaiming_uniform(&mut rng, outf, r),
                _ => vec![0f32; outf * r],
            };
            let a = Var::from_tensor(&Tensor::from_vec(a, (r, inf), &device)?)?;
            let b = Var::from_tensor(&Tensor::from_vec(b, (outf, r), &device)?)?;
            planned.push((mname, LoraAdapter { a, b, r, alpha, scaling: cfg.scaling(r, alpha), dropout: cfg.lora_dropout }));
        }
        if planned.is_empty() {
            let names = self.base.module_names();
            let examples: Vec<&String> = names.iter().filter(|n| n.contains("layers.0.") || !n.contains("layers.")).take(12).collect();
            return Err(PeftError::NoTargetModules {
                targets: crate::io::python_json_dumps(&cfg.to_json()["target_modules"]).replace('\n', "").replace("  ", ""),
                examples: examples.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
            });
        }
        // modules_to_save: a trainable copy of each listed (linear) module for this adapter.
        let mut copies: std::collections::HashMap<String, (Var, Option<Var>)> = Default::default();
        for wanted in cfg.modules_to_save.clone().unwrap_or_default() {
            let mut found = false;
            for (mname, lin) in self.base.named_linears() {
                if mname == wanted || mname.ends_with(&format!(".{wanted}")) {
                    let w = Var::from_tensor(&lin.weight.copy()?)?;
                    let b = match &lin.bias {
                        Some(b) => Some(Var::from_tensor(&b.copy()?)?),
                        None => None,
                    };
                    copies.insert(mname, (w, b));
                    found = true;
                }
            }
            if !found {
                return Err(PeftError::InvalidAdapterConfig {
                    path: None,
                    msg: format!("modules_to_save entry {wanted:?} matches no linear module of the model (only linear modules such as `lm_head` are supported)"),
                });
            }
        }
        let first = self.configs.is_empty();
        let targeted: Vec<String> = planned.iter().map(|(n, _)| n.clone()).collect();
        let mut planned: std::collections::HashMap<String, LoraAdapter> = planned.into_iter().collect();
        for (mname, lin) in self.base.named_linears_mut() {
            if let Some(ad) = planned.remove(&mname) {
                lin.adapters.insert(name.to_string(), ad);
            }
            if let Some(c) = copies.remove(&mname) {
                lin.saved_copies.insert(name.to_string(), c);
            }
        }
        self.configs.push((name.to_string(), cfg));
        if first {
            self.set_adapter(&[name.to_string()])?;
        } else {
            self.sync_layers();
        }
        Ok(targeted)
    }

    fn sync_layers(&mut self) {
        let active = self.active.clone();
        let disabled = self.disabled;
        for (_, lin) in self.base.named_linears_mut() {
            lin.active = active.iter().filter(|a| lin.adapters.contains_key(*a) || lin.saved_copies.contains_key(*a)).cloned().collect();
            lin.disabled = disabled;
        }
    }

    /// Make `names` the active adapters (HF `set_adapter`; several names are summed).
    ///
    /// Errors: `AdapterNotFound` for an unknown name, `InvalidArgument` for an empty list.
    pub fn set_adapter(&mut self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Err(PeftError::invalid_arg("adapterName", "at least one adapter name is required"));
        }
        for n in names {
            self.peft_config(n)?;
        }
        self.active = names.to_vec();
        self.sync_layers();
        Ok(())
    }

    /// Disable (`true`) or re-enable all adapters (HF `disable_adapter_layers` /
    /// `enable_adapter_layers`). Disabling unmerges merged adapters first.
    pub fn set_disabled(&mut self, disabled: bool) -> Result<()> {
        if disabled {
            self.unmerge_adapter()?;
        }
        self.disabled = disabled;
        self.sync_layers();
        Ok(())
    }

    /// Merge the named adapters (default: the active ones) into the base weights.
    pub fn merge_adapter(&mut self, names: Option<&[String]>, safe_merge: bool) -> Result<()> {
        let names: Vec<String> = match names {
            Some(n) => n.to_vec(),
            None => self.active.clone(),
        };
        for n in &names {
            self.peft_config(n)?;
        }
        for (_, lin) in self.base.named_linears_mut() {
            lin.merge(&names, safe_merge)?;
        }
        Ok(())
    }

    /// Subtract every merged adapter from the base weights again.
    pub fn unmerge_adapter(&mut self) -> Result<()> {
        for (_, lin) in self.base.named_linears_mut() {
            lin.unmerge()?;
        }
        Ok(())
    }

    /// Merge the given (default: active) adapters and remove all adapter state, leaving a plain
    /// base model with the deltas folded in (HF `merge_and_unload`).
    pub fn merge_and_unload(&mut self, names: Option<&[String]>, safe_merge: bool) -> Result<()> {
        self.merge_adapter(names, safe_merge)?;
        self.strip_adapters(true);
        Ok(())
    }

    /// Remove all adapters without merging (HF `unload`): the base model as it was.
    pub fn unload(&mut self) -> Result<()> {
        self.unmerge_adapter()?;
        self.strip_adapters(false);
        Ok(())
    }

    fn strip_adapters(&mut self, keep_copies: bool) {
        let active = self.active.clone();
        for (_, lin) in self.base.named_linears_mut() {
            if keep_copies {
                if let Some((w, b)) = active.iter().find_map(|a| lin.saved_copies.get(a)) {
                    lin.weight = w.as_tensor().detach();
                    if let Some(b) = b {
                        lin.bias = Some(b.as_tensor().detach());
                    }
                }
            }
            lin.saved_copies.clear();
            lin.adapters.clear();
            lin.active.clear();
            lin.merged.clear();
            lin.disabled = false;
        }
        self.configs.clear();
        self.active.clear();
        self.disabled = false;
    }

    /// Remove adapter `name` (HF `delete_adapter`). Refused while it is merged.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.peft_config(name)?;
        if self.merged_adapters().iter().any(|m| m == name) {
            return Err(PeftError::InvalidState(format!("adapter `{name}` is merged; unmerge it before deleting it")));
        }
        for (_, lin) in self.base.named_linears_mut() {
            lin.adapters.remove(name);
            lin.saved_copies.remove(name);
        }
        self.configs.retain(|(n, _)| n != name);
        self.active.retain(|n| n != name);
        if self.active.is_empty() {
            if let Some((n, _)) = self.configs.first() {
                self.active = vec![n.clone()];
            }
        }
        self.sync_layers();
        Ok(())
    }

    /// Adapter parameters that training updates: those of the active adapters whose config is
    /// not in inference mode, as `(key as saved on disk, Var)`.
    pub fn trainable_parameters(&self) -> Vec<(String, Var)> {
        self.trainable_parameters_by_adapter().into_iter().flat_map(|(_, v)| v).collect()
    }

    /// [`Self::trainable_parameters`] grouped by adapter name (active adapters in order).
    pub fn trainable_parameters_by_adapter(&self) -> Vec<(String, Vec<(String, Var)>)> {
        let mut groups = Vec::new();
        for name in &self.active {
            let Ok(cfg) = self.peft_config(name) else { continue };
            if cfg.inference_mode {
                continue;
            }
            let mut out = Vec::new();
            for (m, lin) in self.base.named_linears() {
                if let Some(ad) = lin.adapters.get(name) {
                    out.push((format!("{KEY_PREFIX}{m}.lora_A.weight"), ad.a.clone()));
                    out.push((format!("{KEY_PREFIX}{m}.lora_B.weight"), ad.b.clone()));
                }
                if let Some((w, b)) = lin.saved_copies.get(name) {
                    out.push((format!("{KEY_PREFIX}{m}.weight"), w.clone()));
                    if let Some(b) = b {
                        out.push((format!("{KEY_PREFIX}{m}.bias"), b.clone()));
                    }
                }
            }
            groups.push((name.clone(), out));
        }
        groups
    }

    /// `(trainable, all)` parameter counts as HF `get_nb_trainable_parameters` reports them.
    pub fn nb_trainable_parameters(&self) -> (usize, usize) {
        let trainable: usize = self.trainable_parameters().iter().map(|(_, v)| v.elem_count()).sum();
        let adapters: usize = self
            .base
            .named_linears()
            .iter()
            .flat_map(|(_, l)| {
                l.adapters.values().map(|a| a.a.elem_count() + a.b.elem_count()).chain(
                    l.saved_copies.values().map(|(w, b)| w.elem_count() + b.as_ref().map(|b| b.elem_count()).unwrap_or(0)),
                )
            })
            .sum();
        (trainable, self.base.base_param_count() + adapters)
    }

    /// Adapter `name`'s tensors under HF's on-disk keys (adapter name removed), sorted.
    pub fn adapter_state_dict(&self, name: &str) -> Result<Vec<(String, Tensor)>> {
        self.peft_config(name)?;
        let mut out = Vec::new();
        for (m, lin) in self.base.named_linears() {
            if let Some(ad) = lin.adapters.get(name) {
                out.push((format!("{KEY_PREFIX}{m}.lora_A.weight"), ad.a.as_tensor().detach()));
                out.push((format!("{KEY_PREFIX}{m}.lora_B.weight"), ad.b.as_tensor().detach()));
            }
            if let Some((w, b)) = lin.saved_copies.get(name) {
                out.push((format!("{KEY_PREFIX}{m}.weight"), w.as_tensor().detach()));
                if let Some(b) = b {
                    out.push((format!("{KEY_PREFIX}{m}.bias"), b.as_tensor().detach()));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Save adapters in HF PEFT's layout: `default` in `dir`, others in `dir/<name>/`, each with
    /// `adapter_config.json` (inference_mode true) and `adapter_model.safetensors`
    /// (metadata `{"format": "pt"}`); a README.md model card is created when missing. Every file
    /// is written atomically (see [`write_atomic`]).
    ///
    /// Paths: nothing is written outside `dir`. `dir` itself may be a symlink (it is followed:
    /// the caller named it); an adapter subfolder `dir/<name>` that is a symlink or not a folder
    /// is refused (`InvalidArgument`), and a file in the folder that is a symlink is replaced by a
    /// regular file, never written through. Each file is atomic on its own; the weights are
    /// written before the config, so a crash between the two leaves the new weights with the
    /// old config (the same config when the same adapter is saved again).
    pub fn save_pretrained(&self, dir: &Path, selected: Option<&[String]>) -> Result<Vec<PathBuf>> {
        let names: Vec<String> = match selected {
            Some(s) => s.to_vec(),
            None => self.adapter_names(),
        };
        if names.is_empty() {
            return Err(PeftError::InvalidState("the model has no adapter to save".into()));
        }
        let mut written = Vec::new();
        std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
        for name in &names {
            validate_adapter_name(name)?;
            let cfg = self.peft_config(name)?;
            let target = if name == "default" { dir.to_path_buf() } else { dir.join(name) };
            check_save_subfolder(dir, &target)?;
            std::fs::create_dir_all(&target).map_err(|e| PeftError::io(&target, e))?;
            let tensors = self.adapter_state_dict(name)?;
            let bytes = safetensors_bytes(&tensors, Some(&[("format", "pt")]))?;
            let mut saved = cfg.clone();
            saved.inference_mode = true;
            let wpath = target.join("adapter_model.safetensors");
            write_atomic(&wpath, &bytes)?;
            let cpath = target.join("adapter_config.json");
            write_atomic(&cpath, saved.to_json_string().as_bytes())?;
            written.push(wpath);
            written.push(cpath);
            if name == "default" || target == dir {
                let readme = dir.join("README.md");
                if !readme.exists() {
                    let base = saved.base_model_name_or_path.clone().unwrap_or_default();
                    let card = format!(
                        "---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- base_model:adapter:{base}\n- lora\n- peft-node\n---\n\n# Model Card\n\nA LoRA adapter saved by peft-node in Hugging Face PEFT's format.\n\n### Framework versions\n\n- PEFT 0.21.0\n"
                    );
                    write_atomic(&readme, card.as_bytes())?;
                }
            }
        }
        Ok(written)
    }

    /// Load an adapter saved by HF PEFT (or by [`Self::save_pretrained`]) from `dir` (holding
    /// `adapter_config.json` and `adapter_model.safetensors`) under `name` (HF `load_adapter`).
    /// Keys may carry the `base_model.model.` prefix or not, and an adapter name or not.
    /// With `is_trainable` false the adapter is loaded in inference mode (no trainable params).
    ///
    /// Errors: `NotFound`, `InvalidAdapterConfig`, `SafetensorsInvalid`, `ShapeMismatch` (naming
    /// the key, with expected and found shapes), `AdapterExists`, `NoTargetModules`. On error the
    /// model is unchanged.
    pub fn load_adapter(&mut self, dir: &Path, name: &str, is_trainable: bool, config_override: Option<LoraConfig>) -> Result<LoadResult> {
        validate_adapter_name(name)?;
        if !dir.exists() {
            return Err(PeftError::NotFound { path: dir.into(), what: "adapter folder does not exist".into() });
        }
        if self.configs.iter().any(|(n, _)| n == name) {
            return Err(PeftError::AdapterExists(name.into()));
        }
        let mut cfg = match config_override {
            Some(c) => c,
            None => LoraConfig::from_file(&dir.join("adapter_config.json"))?,
        };
        cfg.inference_mode = !is_trainable;
        let wpath = dir.join("adapter_model.safetensors");
        let tensors = read_safetensors(&wpath, &self.base.device)?;
        // Build the expected key map from the config before touching the model.
        let mut expected: std::collections::HashMap<String, (String, bool, Vec<usize>)> = Default::default();
        for (m, lin) in self.base.named_linears() {
            if is_target(&cfg, &m, m == "lm_head") {
                let r = cfg.rank_for(&m);
                expected.insert(format!("{m}.lora_A.weight"), (m.clone(), true, vec![r, lin.in_features()]));
                expected.insert(format!("{m}.lora_B.weight"), (m.clone(), false, vec![lin.out_features(), r]));
            }
            let mts = cfg.modules_to_save.clone().unwrap_or_default();
            if mts.iter().any(|w| &m == w || m.ends_with(&format!(".{w}"))) {
                expected.insert(format!("{m}.weight"), (m.clone(), false, lin.weight.dims().to_vec()));
                if let Some(b) = &lin.bias {
                    expected.insert(format!("{m}.bias"), (m.clone(), false, b.dims().to_vec()));
                }
            }
        }
        let mut found: std::collections::HashMap<String, Tensor> = Default::default();
        let mut result = LoadResult::default();
        for (key, t) in tensors {
            let k = key.strip_prefix(KEY_PREFIX).unwrap_or(&key).to_string();
            let k = strip_adapter_name(&k);
            match expected.get(&k) {
                Some((_, _, shape)) => {
                    if t.dims() != shape.as_slice() {
                        return Err(PeftError::ShapeMismatch {
                            name: format!("{} (key `{key}`)", wpath.display()),
                            expected: shape.clone(),
                            found: t.dims().to_vec(),
                        });
                    }
                    found.insert(k, t);
                }
                None => result.unexpected_keys.push(key),
            }
        }
        for k in expected.keys() {
            if !found.contains_key(k) {
                result.missing_keys.push(format!("{KEY_PREFIX}{k}"));
            }
        }
        result.missing_keys.sort();
        if found.is_empty() && !expected.is_empty() {
            return Err(PeftError::SafetensorsInvalid {
                path: wpath,
                msg: format!("no tensor of the file matches the adapter's modules (unexpected keys: {:?})", &result.unexpected_keys[..result.unexpected_keys.len().min(5)]),
            });
        }
        self.add_adapter(name, cfg, 0)?;
        for (m, lin) in self.base.named_linears_mut() {
            if let Some(ad) = lin.adapters.get_mut(name) {
                if let Some(a) = found.remove(&format!("{m}.lora_A.weight")) {
                    ad.a = Var::from_tensor(&a.to_dtype(DType::F32)?)?;
                }
                if let Some(b) = found.remove(&format!("{m}.lora_B.weight")) {
                    ad.b = Var::from_tensor(&b.to_dtype(DType::F32)?)?;
                }
            }
            let dtype = lin.weight.dtype();
            if let Some((w, b)) = lin.saved_copies.get_mut(name) {
                if let Some(t) = found.remove(&format!("{m}.weight")) {
                    *w = Var::from_tensor(&t.to_dtype(dtype)?)?;
                }
                if let (Some(bv), Some(t)) = (b.as_mut(), found.remove(&format!("{m}.bias"))) {
                    *bv = Var::from_tensor(&t.to_dtype(dtype)?)?;
                }
            }
        }
        Ok(result)
    }

    /// Forward pass (see [`LlamaForCausalLM::forward`]) with HF's checks for mixed batches:
    /// every name must exist (or be `__base__`), there must be one per row, no adapter may be
    /// merged, and the model must not be training.
    pub fn forward(&self, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.check_rows(opts, b)?;
        self.base.forward(ids, b, s, opts, cache)
    }

    /// Validate a mixed-batch request.
    pub fn check_rows(&self, opts: &ForwardOptions, b: usize) -> Result<()> {
        if let Some(rows) = &opts.adapter_rows {
            if rows.len() != b {
                return Err(PeftError::invalid_arg("adapterNames", format!("has {} names but the batch has {b} rows", rows.len())));
            }
            if opts.train {
                return Err(PeftError::InvalidState("adapterNames (mixed batches) cannot be used while training".into()));
            }
            if !self.merged_adapters().is_empty() {
                return Err(PeftError::InvalidState("adapterNames (mixed batches) cannot be used while adapters are merged".into()));
            }
            for n in rows.iter().flatten() {
                self.peft_config(n)?;
            }
        }
        Ok(())
    }

    /// Lines of `adapter_config.json` for `name` (HF's exact text).
    pub fn config_json(&self, name: &str) -> Result<String> {
        Ok(python_json_dumps(&self.peft_config(name)?.to_json()))
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

/// `x.lora_A.<name>.weight` → `x.lora_A.weight` (HF's adapter-name removal rule, inverted).
fn strip_adapter_name(k: &str) -> String {
    // `<m>.modules_to_save.<name>.<param>` -> `<m>.<param>`
    if let Some(i) = k.find(".modules_to_save.") {
        let rest = &k[i + ".modules_to_save.".len()..];
        if let Some(j) = rest.find('.') {
            return format!("{}.{}", &k[..i], &rest[j + 1..]);
        }
    }
    for slot in [".lora_A.", ".lora_B."] {
        if let Some(i) = k.rfind(slot) {
            let rest = &k[i + slot.len()..];
            if rest != "weight" && rest.ends_with(".weight") {
                return format!("{}{}weight", &k[..i], slot);
            }
        }
    }
    k.to_string()
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
    fn adapter_name_removed_from_keys() {
        assert_eq!(strip_adapter_name("m.q_proj.lora_A.default.weight"), "m.q_proj.lora_A.weight");
        assert_eq!(strip_adapter_name("m.q_proj.lora_B.weight"), "m.q_proj.lora_B.weight");
        assert_eq!(strip_adapter_name("lm_head.modules_to_save.default.weight"), "lm_head.weight");
    }
}
