//! The layer-level tuner contract (HF `BaseTunerLayer`): the named parameter slots an adapter
//! adds to a layer, and, for tuners whose layer is a weight delta, its forward contribution and
//! merge.
//!
//! HF names an adapter's parameters `<module>.<slot>.<adapter>[.<param>]` in the model and
//! `<module>.<slot>[.<param>]` on disk (the adapter name removed by `get_peft_model_state_dict`).
//! A [`Slot`] states that grammar once per parameter kind; [`crate::keys`] applies it for every
//! registered tuner, and `PeftModel`'s save, load, trainable-parameter, counting, casting and
//! memory code loop over [`crate::tuners::linear::PeftLinear::adapter_params`] instead of
//! naming tuners.

use super::linear::{LinearCtx, PeftLinear};
use crate::error::Result;
use candle_core::{Tensor, Var};

/// One named parameter kind of an adapter layer, under HF's names.
///
/// - `lora_A` (an `nn.Linear` in a `ModuleDict`): model `<m>.lora_A.<adapter>.weight`, disk
///   `<m>.lora_A.weight` → [`Slot::module`].
/// - `ia3_l`, `lora_embedding_A` (`nn.ParameterDict` entries): model `<m>.ia3_l.<adapter>`, disk
///   `<m>.ia3_l` → [`Slot::param`].
/// - `lora_magnitude_vector` (a module whose `.weight` HF's state dict renames away): model
///   `<m>.lora_magnitude_vector.<adapter>.weight`, disk `<m>.lora_magnitude_vector`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot {
    /// The attribute name in HF's layer (`lora_A`, `ia3_l`, `hada_w1_a`, ...).
    pub name: &'static str,
    /// The parameter name after the adapter name in the model's keys (`None`: the slot entry is
    /// the parameter itself).
    pub model_param: Option<&'static str>,
    /// The parameter name on disk after the slot (`None`: the key ends with the slot name).
    pub disk_param: Option<&'static str>,
}

impl Slot {
    /// A sub-module slot holding `.weight` (HF `ModuleDict` of `nn.Linear`).
    pub const fn module(name: &'static str) -> Slot {
        Slot { name, model_param: Some("weight"), disk_param: Some("weight") }
    }

    /// A parameter slot (HF `ParameterDict` entry).
    pub const fn param(name: &'static str) -> Slot {
        Slot { name, model_param: None, disk_param: None }
    }

    /// The on-disk key of this slot of module `m` (no `base_model.model.` prefix).
    pub fn disk_key(&self, m: &str) -> String {
        match self.disk_param {
            Some(p) => format!("{m}.{}.{p}", self.name),
            None => format!("{m}.{}", self.name),
        }
    }

    /// The model's key of this slot of module `m` for adapter `adapter` (HF `named_parameters`).
    pub fn model_key(&self, m: &str, adapter: &str) -> String {
        match self.model_param {
            Some(p) => format!("{m}.{}.{adapter}.{p}", self.name),
            None => format!("{m}.{}.{adapter}", self.name),
        }
    }
}

/// A parameter of an adapter layer: its slot and variable.
pub type Param<'a> = (Slot, &'a Var);

/// The layer one adapter of one tuner adds to one linear layer or embedding table (HF's
/// `BaseTunerLayer` subclasses: `lora.Linear`, `ia3.Linear`, `loha.Linear`, ...).
/// [`PeftLinear`] keeps these layers per adapter name in one map ([`PeftLinear::layers`]) and
/// names no tuner: for every active unmerged layer it calls [`AdapterLayer::apply`] (by default
/// the base output plus [`AdapterLayer::forward_delta`]), merges by adding
/// [`AdapterLayer::delta_weight`] and unmerges by subtracting it. Tuners whose layer is more than
/// a weight delta override the hooks with defaults: LoRA/DoRA (`apply`, `merge_into`,
/// `unmerge_from`), (IA)³ (`forward_host`: the active vectors together scale the input or the
/// output), trainable tokens (`merged_weight`, `replaced_rows`). Code that needs a tuner's own
/// type (the fused engine reading LoRA's `A`/`B`) downcasts with [`LayerBox::as_any`]
/// through accessors in that tuner's folder (`PeftLinear::lora`).
pub trait AdapterLayer: LayerBox + Send + Sync + std::fmt::Debug {
    /// HF `peft_type` of the tuner.
    fn peft_type(&self) -> &'static str;
    /// HF's class name of the adapted layer (`"loha.Linear"`), as `get_layer_status` reports it.
    fn module_type(&self) -> &'static str;
    /// Every parameter under its slot, in HF's state-dict order.
    fn params(&self) -> Vec<Param<'_>>;
    /// Replace the variable of `slot` (loading, casting).
    ///
    /// Errors: `InvalidArgument` for a slot this layer does not have.
    fn set_param(&mut self, slot: &Slot, v: Var) -> Result<()>;
    /// `ΔW` `[out, in]` f32 for the base layer `lin` (HF `get_delta_weight`).
    fn delta_weight(&self, lin: &PeftLinear) -> Result<Tensor>;
    /// The contribution `x ΔWᵀ` (or the tuner's cheaper equivalent) for input `x` `[..., in]`,
    /// `[..., out]` f32, tracked while `ctx.train`.
    fn forward_delta(&self, lin: &PeftLinear, x: &Tensor, ctx: &LinearCtx) -> Result<Tensor>;
    /// Model-level buffers this layer references (HF `uses_shared_state`: VeRA's `vera_A` /
    /// `vera_B`, shared by every layer and adapter of the model), by HF's attribute name. Empty
    /// for tuners whose layers own all their state.
    fn shared_tensors(&self) -> Vec<(&'static str, Tensor)> {
        vec![]
    }
    /// The layer's output given the base output `y` (and the adapters applied before it) for
    /// input `x` `[..., in]`, in `y`'s dtype. Weight-delta tuners add
    /// [`AdapterLayer::forward_delta`] (the default); trainable tokens replace output columns.
    fn apply(&self, lin: &PeftLinear, x: &Tensor, y: Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        Ok((y + self.forward_delta(lin, x, ctx)?.to_dtype(x.dtype())?)?)
    }
    /// For tuners that act on the layer's input (HF OFT: `base_layer(x R)`): the input `[..., in]`
    /// the base layer then sees, in `x`'s dtype, given the input `x` as the adapters applied
    /// before this one left it. `None` (the default): the input passes unchanged. A layer that
    /// returns `Some` also overrides [`AdapterLayer::apply`] (its effect is already in the base
    /// output). Not called for mixed batches.
    fn transform_input(&self, lin: &PeftLinear, x: &Tensor, ctx: &LinearCtx) -> Option<Result<Tensor>> {
        let _ = (lin, x, ctx);
        None
    }
    /// An embedding lookup: `y` `[..., dim]` holds the rows of token ids `ids` looked up so far;
    /// returns the adapted rows (trainable tokens replace theirs). The default leaves them as
    /// they are (tuners that do not adapt embeddings never sit on one).
    fn apply_embedding(&self, lin: &PeftLinear, ids: &Tensor, y: Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        let _ = (lin, ids, ctx);
        Ok(y)
    }
    /// For tuners whose merge replaces weights instead of adding `ΔW` (trainable tokens, HF
    /// `index_copy`): the merged base weight, in the base dtype and layout. `None` (the
    /// default): merging adds [`AdapterLayer::delta_weight`].
    fn merged_weight(&self, lin: &PeftLinear) -> Option<Result<Tensor>> {
        let _ = lin;
        None
    }
    /// The twin of [`AdapterLayer::merged_weight`] for unmerging (the base weight restored).
    fn unmerged_weight(&self, lin: &PeftLinear) -> Option<Result<Tensor>> {
        let _ = lin;
        None
    }
    /// For tuners that replace rows of the base table (trainable tokens): the rows. Two such
    /// adapters active or merged together must not share a row (HF
    /// `_check_overlapping_tokens`, see [`PeftLinear::check_disjoint_rows`]).
    fn replaced_rows(&self) -> Option<&[u32]> {
        None
    }
    /// Whether mixed batches (`adapterNames`) may route rows to this layer.
    fn mixed_batch(&self) -> bool {
        true
    }
    /// In a mixed batch, what this layer adds to the output rows `idx` of `y` (the batch's output
    /// so far), given those rows' input `x`: [`AdapterLayer::forward_delta`] for weight-delta
    /// tuners (the default); row-replacing layers return the change [`AdapterLayer::apply`]
    /// makes to those rows.
    fn mixed_delta(&self, lin: &PeftLinear, x: &Tensor, y: &Tensor, idx: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        let _ = (y, idx);
        self.forward_delta(lin, x, ctx)
    }
    /// The sub-module of the host under which HF's `get_layer_status` names this layer
    /// (`Some("token_adapter")` for LoRA's `trainable_token_indices`, HF's
    /// `TrainableTokensWrapper.token_adapter`); `None` (the default): the host module itself.
    fn status_submodule(&self) -> Option<&'static str> {
        None
    }
    /// The kind of the layer as the bindings report it (`"lora"`, `"lora_embedding"`, `"ia3"`,
    /// `"loha"`): by default [`AdapterLayer::module_type`] without its class when the class is
    /// `Linear` (the facade writes `<kind>.Linear` back), else the whole module type
    /// (`"adalora.SVDLinear"`, `"hra.HRALinear"`).
    fn adapter_kind(&self) -> &'static str {
        let t = self.module_type();
        t.strip_suffix(".Linear").unwrap_or(t)
    }
    /// For tuners whose active layers together replace the host's forward instead of adding to
    /// the base output ((IA)³, HF `ia3.Linear.forward`: the product of every active vector
    /// scales the input or the output once): the host's output for `x` `[..., in]`, in `x`'s
    /// dtype. `None` (the default): the per-adapter path ([`AdapterLayer::apply`]). The host
    /// asks its active unmerged layers in order, before the base product, and uses the first
    /// answer.
    fn forward_host(&self, lin: &PeftLinear, x: &Tensor, ctx: &LinearCtx) -> Option<Result<Tensor>> {
        let _ = (lin, x, ctx);
        None
    }
    /// In a mixed batch, what this layer adds to the looked-up rows `y` `[n, s, dim]` of token
    /// ids `ids` `[n, s]` of an embedding table: by default the change
    /// [`AdapterLayer::apply_embedding`] makes; tuners with an additive form return it directly
    /// (no `(y + δ) − y` rounding round trip).
    fn mixed_embedding_delta(&self, lin: &PeftLinear, ids: &Tensor, y: &Tensor, ctx: &LinearCtx) -> Result<Tensor> {
        Ok((self.apply_embedding(lin, ids, y.clone(), ctx)? - y)?)
    }
    /// For tuners whose merge is more than replacing the weight ((IA)³ also scales the bias,
    /// DoRA keeps the row norm it merged with): merge this layer (adapter `name`) into `lin`'s
    /// base parameters, checking for NaN/Inf first when `safe` (with the tuner's HF message).
    /// The host takes the layer out of its map during the call and records the merge itself.
    /// `None` (the default): the host merges [`AdapterLayer::merged_weight`] or adds
    /// [`AdapterLayer::delta_weight`].
    fn merge_into(&mut self, lin: &mut PeftLinear, name: &str, safe: bool) -> Option<Result<()>> {
        let _ = (lin, name, safe);
        None
    }
    /// The twin of [`AdapterLayer::merge_into`] for unmerging. `None` (the default): the host
    /// uses [`AdapterLayer::unmerged_weight`] or subtracts [`AdapterLayer::delta_weight`].
    fn unmerge_from(&mut self, lin: &mut PeftLinear) -> Option<Result<()>> {
        let _ = lin;
        None
    }
    /// Elements of parameters HF's layer registers that are neither trained nor saved (AdaLoRA's
    /// `ranknum`, one per layer): HF's `get_nb_trainable_parameters` counts them in the total.
    /// Default 0.
    fn frozen_param_count(&self) -> usize {
        0
    }
}

/// The declarative head of an [`AdapterLayer`] impl, written inside `impl AdapterLayer for T {}`
/// (HF `BaseTunerLayer`'s `adapter_layer_names`: the parameter attributes a layer registers per
/// adapter). It writes the four methods that only restate the layer's data:
///
/// - `peft_type` (HF's `peft_type`) and `module_type` (HF's layer class, `"ia3.Linear"`);
/// - `params`: each listed slot with its `Var` field, in the order given (HF's state-dict
///   order);
/// - `set_param`: replaces the field of the slot with that name; any other slot is refused with
///   `InvalidArgument` naming `slot` (the message `<layer> has no` and the slot's name, see
///   [`no_slot`]).
///
/// ```ignore
/// impl AdapterLayer for VeraLayer {
///     declare_layer!(peft_type: "VERA", module_type: "vera.Linear", layer: "a VeRA linear layer",
///         slots: [VERA_LAMBDA_B => lambda_b, VERA_LAMBDA_D => lambda_d]);
///     fn delta_weight(&self, lin: &PeftLinear) -> Result<Tensor> { ... }
/// }
/// ```
///
/// Layers whose slots depend on their state (LoRA's embedding slots and DoRA magnitude, LoKr's
/// full or factored `w1` / `w2`, OFT's embedding slot, trainable tokens' tying) write `params` /
/// `set_param` themselves.
macro_rules! declare_layer {
    (peft_type: $pt:expr, module_type: $mt:expr, layer: $what:expr, slots: [$($slot:expr => $field:ident),+ $(,)?] $(,)?) => {
        fn peft_type(&self) -> &'static str {
            $pt
        }
        fn module_type(&self) -> &'static str {
            $mt
        }
        fn params(&self) -> Vec<$crate::tuners::layer::Param<'_>> {
            vec![$(($slot, &self.$field)),+]
        }
        fn set_param(&mut self, slot: &$crate::tuners::layer::Slot, v: candle_core::Var) -> $crate::error::Result<()> {
            $(
                if slot.name == $slot.name {
                    self.$field = v;
                    return Ok(());
                }
            )+
            Err($crate::tuners::layer::no_slot($what, slot))
        }
    };
}
pub(crate) use declare_layer;

/// The `InvalidArgument` error of [`AdapterLayer::set_param`] for a slot the layer does not
/// have, its message `<layer> has no` and the slot's name in backticks (`layer` with its article:
/// `"an HRA linear layer"`).
pub fn no_slot(layer: &str, slot: &Slot) -> crate::error::PeftError {
    crate::error::PeftError::invalid_arg("slot", format!("{layer} has no `{}`", slot.name))
}

/// Copying and downcasting a boxed [`AdapterLayer`]: implemented once for every `Clone` layer
/// type, so a tuner's layer writes none of it.
pub trait LayerBox {
    /// A boxed copy.
    fn clone_box(&self) -> Box<dyn AdapterLayer>;
    /// The concrete layer, for tuners that look at their own layers (trainable tokens' tying,
    /// LoRA's typed accessors, which downcast it). Always `Some`.
    fn as_any(&self) -> Option<&dyn std::any::Any>;
    /// The mutable twin of [`LayerBox::as_any`] (LoRA's scaling, hotswap and weighted adapters
    /// edit their layers in place).
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any>;
}

impl<T: AdapterLayer + Clone + 'static> LayerBox for T {
    fn clone_box(&self) -> Box<dyn AdapterLayer> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

impl Clone for Box<dyn AdapterLayer> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tuners::ia3::layer::{Ia3Adapter, IA3_L};
    use candle_core::Device;

    /// `declare_layer!`'s `set_param` replaces the slot's field and refuses other slots, naming
    /// `slot` with the layer's message.
    #[test]
    fn declared_layer_sets_its_slots_and_refuses_others() {
        let var = |v: f32| Var::from_tensor(&Tensor::new(&[v], &Device::Cpu).unwrap()).unwrap();
        let mut l = Ia3Adapter { l: var(1.0), feedforward: false };
        assert_eq!((l.peft_type(), l.module_type()), ("IA3", "ia3.Linear"));
        l.set_param(&IA3_L, var(2.0)).unwrap();
        let params = l.params();
        assert_eq!(params.len(), 1);
        assert_eq!(params[0].0, IA3_L);
        assert_eq!(params[0].1.as_tensor().to_vec1::<f32>().unwrap(), [2.0]);
        let e = l.set_param(&Slot::param("lora_A"), var(3.0)).unwrap_err();
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
        assert!(e.to_string().contains("an ia3.Linear layer has no `lora_A`"), "{e}");
    }
}
