//! What HF's LyCORIS tuners (LoHa, LoKr) share, as HF PEFT 0.21's `lycoris_utils.py` shares it
//! between them (`LycorisConfig`, `LycorisLayer`, `LycorisTuner`):
//!
//! - [`LycorisConfig`]: the config fields every LyCORIS config has (`r`, `alpha`, the two
//!   dropouts, targeting, `rank_pattern` / `alpha_pattern`, ...), parsed and written back once;
//!   the method's own fields are its [`LycorisKind`] value ([`LycorisConfig::own`]);
//! - [`LycorisTuner`]: the registry entry of a method (HF `LycorisTuner`): config parsing,
//!   injection (`_create_and_replace`: linear layers only, embeddings and GPT-2 `Conv1D` refused)
//!   and the load-time shapes, each asking the method only for what differs;
//! - [`draw_dropout`]: the training-time `module_dropout` / `rank_dropout` draws of a forward.
//!
//! A LyCORIS method is then its [`LycorisKind`] impl (names, defaults, own fields, parameter
//! shapes, a new layer) and its layer (an [`AdapterLayer`]).

use crate::error::{PeftError, Result};
use crate::peft_model::PeftModel;
use crate::tuners::config::{LayerCommon, LayerFields, RawConfig};
use crate::tuners::layer::{AdapterLayer, Slot};
use crate::tuners::linear::{LinearCtx, PeftLinear};
use crate::tuners::lora::MAX_RANK;
use crate::tuners::registry::Tuner;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Number, Value};
use std::marker::PhantomData;
use std::path::Path;

/// The names under which HF registers a LyCORIS method (`register_peft_method` and its config
/// and model classes).
#[derive(Debug, Clone, Copy)]
pub struct LycorisNames {
    /// HF's `peft_type` (one entry: `&["LOHA"]`).
    pub peft_types: &'static [&'static str],
    /// HF's config class (`"LoHaConfig"`), named in config errors.
    pub config_class: &'static str,
    /// HF's tuner model class (`"LoHaModel"`).
    pub model_class: &'static str,
    /// The method's name in messages (`"LoHa"`).
    pub name: &'static str,
    /// HF's parameter-name prefix (`"hada_"`).
    pub prefix: &'static str,
    /// Every slot of the method's linear layer, in HF's state-dict order.
    pub slots: &'static [Slot],
}

/// One LyCORIS method (LoHa, LoKr): its names, its own config fields (the value itself, kept in
/// [`LycorisConfig::own`]) and what its layers look like.
pub trait LycorisKind: Sized + Clone + PartialEq + std::fmt::Debug + Send + Sync + 'static {
    /// The method's HF names.
    const NAMES: LycorisNames;
    /// HF PEFT 0.21 defaults of the method's own fields (`peft_type` included); the common
    /// ones are [`lycoris_defaults`].
    fn own_defaults() -> Map<String, Value>;
    /// Read the method's own fields. Errors: `InvalidAdapterConfig` naming the field.
    fn parse(rc: &RawConfig) -> Result<Self>;
    /// The parameters of the layer for base layer `lin` at rank `r`, as `(slot, shape)`.
    fn param_shapes(cfg: &LycorisConfig<Self>, lin: &PeftLinear, r: usize) -> Vec<(Slot, Vec<usize>)>;
    /// A new layer for `lin` (HF `update_layer` + `reset_adapter_parameters`), drawing its
    /// initial values from `rng`.
    fn new_layer(cfg: &LycorisConfig<Self>, lin: &PeftLinear, r: usize, alpha: f64, rng: &mut rand::rngs::StdRng, device: &Device) -> Result<Box<dyn AdapterLayer>>;
}

/// HF PEFT 0.21 defaults of the fields every LyCORIS config has, as written to
/// adapter_config.json (the method adds its own with [`LycorisKind::own_defaults`]).
pub fn lycoris_defaults() -> Map<String, Value> {
    crate::tuners::config::json_object(json!({
        "alpha": 8, "alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": null,
        "exclude_modules": null, "inference_mode": false, "layers_pattern": null,
        "layers_to_transform": null, "module_dropout": 0.0, "modules_to_save": null,
        "peft_version": "0.21.0", "r": 8, "rank_dropout": 0.0, "rank_pattern": {}, "revision": null,
        "target_modules": null, "task_type": null
    }))
}

/// A LyCORIS config (HF `LycorisConfig` and its subclasses `LoHaConfig`, `LoKrConfig`): the
/// common fields, typed, and the method's own in [`Self::own`].
#[derive(Debug, Clone, PartialEq)]
pub struct LycorisConfig<K> {
    pub r: usize,
    pub alpha: f64,
    /// Training only: each output row of `ΔW` is kept with probability `1 - rank_dropout` (the
    /// method's layer says how the mask is rescaled).
    pub rank_dropout: f64,
    /// Training only: the whole adapter is skipped for a forward with this probability.
    pub module_dropout: f64,
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    /// The method's own fields (LoHa's `init_weights`, LoKr's `decompose_both`, ...).
    pub own: K,
    /// The fields every layer tuner's config has.
    pub common: LayerCommon,
}

crate::tuners::config::impl_deref_common!(<K> LycorisConfig<K> => LayerCommon);

impl<K: LycorisKind> LycorisConfig<K> {
    /// HF PEFT 0.21 defaults of every field of the method's config, as written to
    /// adapter_config.json.
    pub fn hf_defaults() -> Map<String, Value> {
        let mut m = lycoris_defaults();
        m.extend(K::own_defaults());
        m
    }

    /// Build from an adapter_config.json object (missing fields take HF's defaults). Errors:
    /// `InvalidAdapterConfig` naming the field (wrong types, `r` outside 1..=2^16, dropouts
    /// outside [0, 1), invalid pattern regexes, `layers_pattern` without `layers_to_transform`,
    /// and the method's own checks).
    pub fn from_json(v: &Value, path: Option<&Path>) -> Result<Self> {
        let rc = RawConfig::parse(v, path, Self::hf_defaults(), K::NAMES.peft_types, K::NAMES.config_class)?;
        let (r, alpha) = (rc.rank("r", MAX_RANK)?, rc.number("alpha")?);
        let (rank_dropout, module_dropout) = (rc.prob("rank_dropout")?, rc.prob("module_dropout")?);
        let common = LayerCommon::parse(&rc, LayerFields::ALL)?;
        Ok(LycorisConfig {
            r,
            alpha,
            rank_dropout,
            module_dropout,
            rank_pattern: rc.rank_pattern(MAX_RANK)?,
            alpha_pattern: rc.alpha_pattern()?,
            own: K::parse(&rc)?,
            common,
        })
    }

    /// Effective rank of module `name` (HF `rank_pattern` lookup via `get_pattern_key`, else `r`).
    pub fn rank_for(&self, name: &str) -> usize {
        crate::targeting::pattern_lookup(&self.rank_pattern, name).unwrap_or(self.r)
    }

    /// Effective alpha of module `name` (`alpha_pattern`, else `alpha`).
    pub fn alpha_for(&self, name: &str) -> f64 {
        crate::targeting::pattern_lookup(&self.alpha_pattern, name).unwrap_or(self.alpha)
    }

    /// The config as HF's adapter_config.json object.
    pub fn to_json(&self) -> Value {
        self.common.to_json_with(|m| {
            // Python float fields: HF writes `0.0`, never `0` (JSON from JS loses the distinction).
            for (k, p) in [("rank_dropout", self.rank_dropout), ("module_dropout", self.module_dropout)] {
                m.insert(k.into(), Number::from_f64(p).map(Value::Number).unwrap_or(Value::Null));
            }
        })
    }
}

crate::tuners::config::impl_tuner_config!(<K: LycorisKind> LycorisConfig<K>, K::NAMES.peft_types[0]);

/// The registry entry of a LyCORIS method (HF `LycorisTuner`).
pub struct LycorisTuner<K>(PhantomData<K>);

impl<K> LycorisTuner<K> {
    pub const fn new() -> Self {
        LycorisTuner(PhantomData)
    }
}

impl<K> Default for LycorisTuner<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: LycorisKind> Tuner for LycorisTuner<K> {
    crate::tuners::registry::declare_tuner!(peft_types: K::NAMES.peft_types, model_class: K::NAMES.model_class, prefix: K::NAMES.prefix, slots: K::NAMES.slots, config: LycorisConfig<K>, inject: add_lycoris,
        expected: |c, m, lin| if !lin.is_embedding => K::param_shapes(c, lin, c.rank_for(m)));
}

impl PeftModel {
    /// Inject a LyCORIS adapter (HF `LycorisTuner._create_and_replace`): one layer of the method
    /// per targeted linear layer, with r and alpha from `rank_pattern` / `alpha_pattern`,
    /// initialised by [`LycorisKind::new_layer`] from one RNG seeded with `seed`, in module order.
    ///
    /// Errors: `InvalidAdapterConfig` for an embedding or a GPT-2 `Conv1D` target (HF: "Target
    /// module of type ... not supported") or when nothing matches. The model is then unchanged.
    pub(crate) fn add_lycoris<K: LycorisKind>(&mut self, name: &str, mut cfg: LycorisConfig<K>, seed: u64) -> Result<Vec<String>> {
        let planned = self.plan_layers(name, &mut cfg, seed, |cfg, mname, lin, rng, device| {
            if lin.is_embedding || lin.transposed {
                let kind = if lin.is_embedding { "Embedding" } else { "Conv1D" };
                return Err(PeftError::InvalidAdapterConfig {
                    path: None,
                    msg: format!("Target module `{mname}` of type {kind} not supported, currently only adapters for Conv2d, Conv1d, Linear are supported ({} here: Linear)", K::NAMES.name),
                });
            }
            K::new_layer(cfg, lin, cfg.rank_for(mname), cfg.alpha_for(mname), rng, device)
        })?;
        self.install_layers(name, cfg.into(), planned)
    }
}

/// The training-time dropouts of one LyCORIS forward (HF `LycorisLayer` subclasses' `forward`
/// and `get_delta_weight(apply_rank_dropout=True)`).
#[derive(Debug)]
pub enum Dropout {
    /// No dropout this forward (not training, or both probabilities 0, or not drawn).
    Off,
    /// `module_dropout` drew: the adapter adds nothing this forward.
    SkipModule,
    /// `rank_dropout`: the 0/1 keep mask of the `out` rows of `ΔW` and its mean (the method
    /// decides whether to divide by it).
    Rows { keep: Vec<f32>, mean: f32 },
}

/// Draw the dropouts of one forward from the layer context's dropout stream, in HF's order:
/// first the module (`torch.rand(1) > module_dropout` keeps it), then one draw per output row
/// (`rand(out) > rank_dropout` keeps the row). Draws nothing unless `ctx.train` and a
/// probability is positive.
pub fn draw_dropout(ctx: &LinearCtx, module_dropout: f64, rank_dropout: f64, out: usize) -> Dropout {
    if !ctx.train || (module_dropout <= 0.0 && rank_dropout <= 0.0) {
        return Dropout::Off;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(crate::engine::dropout_seed(ctx.rng));
    if module_dropout > 0.0 && rng.random::<f64>() <= module_dropout {
        return Dropout::SkipModule;
    }
    if rank_dropout <= 0.0 {
        return Dropout::Off;
    }
    let keep: Vec<f32> = (0..out).map(|_| if rng.random::<f64>() > rank_dropout { 1.0 } else { 0.0 }).collect();
    let mean = keep.iter().sum::<f32>() / out as f32;
    Dropout::Rows { keep, mean }
}

/// `x` `[..., in]` seen as `[m, in]`: `m`, and the dims of the layer's output `[..., out]`.
pub fn rows_and_out_dims(x: &Tensor, out: usize) -> (usize, Vec<usize>) {
    let dims = x.dims();
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("x has a feature axis") = out;
    (dims[..dims.len() - 1].iter().product(), out_dims)
}
