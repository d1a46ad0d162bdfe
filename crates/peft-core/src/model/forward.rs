//! What every base model's forward pass takes besides its input: [`ForwardOptions`] (masks,
//! positions, training mode, mixed-batch adapters, task extras) and the [`KvCache`] of past
//! keys and values (with the encoder state of encoder-decoder models).

use crate::tuners::linear::RowAdapters;
use candle_core::Tensor;
use std::any::Any;

/// A model's own per-cache state (see [`KvCache::model_state`]): any `Clone + Debug` type.
pub trait CacheState: Any + std::fmt::Debug + Send + Sync {
    fn clone_box(&self) -> Box<dyn CacheState>;
}

impl<T: Any + Clone + std::fmt::Debug + Send + Sync> CacheState for T {
    fn clone_box(&self) -> Box<dyn CacheState> {
        Box::new(self.clone())
    }
}

impl Clone for Box<dyn CacheState> {
    fn clone(&self) -> Self {
        (**self).clone_box()
    }
}

/// Per-layer key/value cache: `[b, kv_heads, t, head_dim]` each.
///
/// Encoder-decoder models (T5) also keep what does not change while decoding: the encoder's
/// output and padding mask, and each decoder layer's cross-attention keys/values computed from
/// it (transformers' `EncoderDecoderCache.cross_attention_cache`). Decoder-only models leave
/// these empty; `layers` then holds the decoder self-attention.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Self-attention (k, v) per (decoder) layer.
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    /// Encoder-decoder: cross-attention (k, v) `[b, heads, s_enc, head_dim]` per decoder layer.
    pub cross: Vec<Option<(Tensor, Tensor)>>,
    /// Encoder-decoder: the encoder's last hidden state `[b, s_enc, hidden]` (set on the first
    /// step; later steps reuse it instead of encoding again).
    pub encoder_hidden: Option<Tensor>,
    /// Encoder-decoder: the encoder's 1/0 padding mask `[b, s_enc]` (`None` = all ones).
    pub encoder_mask: Option<Vec<u8>>,
    /// What a model keeps with its cache besides keys and values (Phi-3's longrope keeps which
    /// cached keys it rotated with which factors, see [`crate::model::phi3`]); `None` for the
    /// models that keep nothing. A clone clones it.
    pub model_state: Option<Box<dyn CacheState>>,
    /// The fused engine's in-place key/value buffers behind `layers` (see
    /// [`crate::engine::KvStore`]); a clone starts without them.
    #[doc(hidden)]
    pub engine: crate::engine::KvStore,
}

impl KvCache {
    /// An empty cache for `n_layers` self-attention layers.
    pub fn new(n_layers: usize) -> Self {
        KvCache { layers: vec![None; n_layers], ..Default::default() }
    }
    /// The model state of type `T` kept with this cache, created with `T::default()` when the
    /// cache holds none (or another model's).
    pub fn model_state<T: CacheState + Default>(&mut self) -> &mut T {
        if !self.model_state.as_deref().is_some_and(|s| (s as &dyn Any).is::<T>()) {
            self.model_state = Some(Box::new(T::default()));
        }
        let state = self.model_state.as_deref_mut().and_then(|s| (s as &mut dyn Any).downcast_mut::<T>());
        state.expect("the model state was just set to a T")
    }
    /// Number of cached positions.
    pub fn seq_len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map(|(k, _)| k.dim(2).unwrap_or(0)).unwrap_or(0)
    }
}

/// Options of one forward pass.
#[derive(Clone, Default)]
pub struct ForwardOptions {
    /// `[b, past + s]` 1/0 mask over cached and new positions; `None` = all ones.
    pub attention_mask: Option<Vec<u8>>,
    /// `[b, s]` position ids; `None` = `past .. past + s` for every row.
    pub position_ids: Option<Vec<u32>>,
    /// Training mode: dropout on, differentiable kernels.
    pub train: bool,
    /// Mixed batch adapters, one per row (`None` = base).
    pub adapter_rows: Option<RowAdapters>,
    /// Mixed batch: one scale per row (with `adapter_rows`), multiplying that row's LoRA
    /// scaling (HF `set_scale` per row; llama.cpp's per-request LoRA scale). `None` = all 1.
    pub adapter_scales: Option<std::sync::Arc<Vec<f64>>>,
    /// Compute logits for the last position only (generation).
    pub last_only: bool,
    /// Seeded source of LoRA dropout masks while training.
    pub dropout_rng: Option<std::sync::Arc<std::sync::Mutex<rand::rngs::StdRng>>>,
    /// Multitask prompt tuning: one task id per row.
    pub task_ids: Option<Vec<u32>>,
    /// Sequence classification on decoder models: the position pooled per row (`[b]`, indices
    /// into the sequence passed to `forward_embeds`). `None` = the last position (transformers'
    /// behaviour for `inputs_embeds`); `BaseModel::forward` fills it from the ids.
    pub pool_index: Option<Vec<usize>>,
    /// BERT-family segment ids `[b, s]` (`None` = all 0).
    pub token_type_ids: Option<Vec<u32>>,
    /// Encoder-decoder models: decoder input ids `[b, t]` (row-major), required in every call;
    /// with a cache that already holds the encoder output, only the new decoder tokens (the
    /// encoder input is then not re-encoded, see `T5ForConditionalGeneration::forward_embeds`).
    pub decoder_input_ids: Option<Vec<u32>>,
    /// Encoder-decoder models: `[b, past + t]` 1/0 decoder mask (`None` = all ones).
    pub decoder_attention_mask: Option<Vec<u8>>,
}

impl ForwardOptions {
    /// The linear layers' context of this forward pass: training mode, the mixed-batch rows and
    /// their scales, and the dropout source.
    pub(crate) fn linear_ctx(&self) -> crate::tuners::linear::LinearCtx<'_> {
        crate::tuners::linear::LinearCtx { train: self.train, rows: self.adapter_rows.as_ref(), row_scales: self.adapter_scales.as_ref(), rng: self.dropout_rng.as_deref() }
    }
}
