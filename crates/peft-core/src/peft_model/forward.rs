//! Forward passes through the adapted model, prompt-learning inputs included.

use super::*;

impl PeftModel {
    /// Forward pass (see [`BaseModel::forward`]) with HF's checks for mixed batches:
    /// every name must exist (or be `__base__`), there must be one per row, no adapter may be
    /// merged, and the model must not be training.
    ///
    /// With an active prompt-learning adapter (HF `PeftModelForCausalLM.forward`), `ids`,
    /// `attention_mask` and `position_ids` describe the real tokens only (the mask covers the
    /// cached real tokens plus `s`):
    /// * prefix tuning puts the per-layer key/value prefix `[b, kv_heads, n_virtual, head_dim]`
    ///   into the cache before the first step, prepends `n_virtual` ones to the mask and shifts
    ///   given position ids by `n_virtual`; logits are `[b, s, vocab]`;
    /// * prompt tuning / P-tuning / multitask prompt tuning prepend the virtual token embeddings
    ///   on the first step (no cache or an empty one), so logits are `[b, n_virtual + s, vocab]`
    ///   then; the mask gets `n_virtual` leading ones; given position ids are ignored (as HF
    ///   does) and positions run `past .. past + len`.
    ///
    /// Encoder-decoder models (SEQ_2_SEQ_LM, HF `PeftModelForSeq2SeqLM`): `ids` / `attention_mask`
    /// are the encoder's, `opts.decoder_input_ids` / `decoder_attention_mask` the decoder's, and
    /// the logits are the decoder's `[b, t, vocab]`; prompt learning follows
    /// `prompt_forward_seq2seq` (prefix on the decoder self-attention, virtual tokens before the
    /// encoder input).
    ///
    /// Errors: those of the base forward; `InvalidArgument` for `adapterNames` with prompt
    /// learning, or missing/invalid `taskIds` for multitask prompt tuning.
    pub fn forward(&self, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        if let Some((cfg, enc)) = self.active_prompt() {
            return self.prompt_forward(cfg, enc, ids, b, s, opts, cache);
        }
        self.check_rows(opts, b)?;
        let mut cache = cache;
        if self.base.task() == Task::CausalLm {
            if let Some(logits) = crate::engine::try_forward(self, ids, b, s, opts, cache.as_deref_mut())? {
                return Ok(logits);
            }
        }
        self.base.forward(ids, b, s, opts, cache)
    }

    /// Number of label positions prepended by the active adapter (`num_virtual_tokens` for
    /// prompt tuning / P-tuning / multitask prompt tuning, whose logits include the virtual
    /// positions; 0 otherwise). Training extends labels with this many `-100` on the left, as
    /// HF does.
    pub fn label_prefix_len(&self) -> usize {
        match self.active_prompt() {
            // Seq2seq: the virtual tokens go to the encoder; the decoder's logits are unchanged.
            Some((cfg, _)) if cfg.method != PromptMethod::PrefixTuning && self.base.task() != Task::Seq2SeqLm => cfg.total_virtual_tokens(),
            _ => 0,
        }
    }

    /// Per-layer prefix keys/values for a batch of `b`: `[b, kv_heads, n_virtual, head_dim]`
    /// each, in the model dtype (HF `get_prompt` for prefix tuning: the table
    /// `[n, num_layers·2·token_dim]` viewed as `[n, num_layers·2, heads, head_dim]`; chunk `2l`
    /// is layer `l`'s key, `2l + 1` its value).
    ///
    /// With `num_transformer_submodules = 2` (SEQ_2_SEQ_LM) HF concatenates the `2L` chunks with
    /// themselves and splits them in groups of 4 per decoder layer (self K, self V, cross K,
    /// cross V), then drops the cross part: decoder layer `l` gets key chunk `(4l) mod 2L` and
    /// value chunk `(4l + 1) mod 2L`; one entry per decoder layer is returned (the encoder gets
    /// no prefix).
    pub fn prefix_key_values(&self, cfg: &PromptLearningConfig, enc: &PromptEncoder, b: usize, train: bool, rng: Option<&std::sync::Mutex<rand::rngs::StdRng>>) -> Result<Vec<(Tensor, Tensor)>> {
        let n = cfg.num_virtual_tokens;
        let layers = cfg.num_layers.unwrap_or(0);
        let heads = cfg.num_attention_heads.unwrap_or(1);
        let hd = cfg.token_dim.unwrap_or(0) / heads;
        let table = enc.table(train, rng)?.to_dtype(self.base.dtype())?.reshape((n, layers * 2, heads, hd))?;
        let chunk = |j: usize| -> Result<Tensor> {
            let c = table.narrow(1, j, 1)?.squeeze(1)?.transpose(0, 1)?.unsqueeze(0)?; // [1, heads, n, hd]
            Ok(c.broadcast_as((b, heads, n, hd))?.contiguous()?)
        };
        let sub = cfg.num_transformer_submodules.unwrap_or(1).max(1);
        let count = if sub == 1 { layers } else { self.base.num_layers() };
        (0..count)
            .map(|l| {
                let kc = (2 * sub * l) % (2 * layers).max(1);
                Ok((chunk(kc)?, chunk(kc + 1)?))
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn prompt_forward(&self, cfg: &PromptLearningConfig, enc: &PromptEncoder, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        if opts.adapter_rows.is_some() {
            return Err(PeftError::invalid_arg("adapterNames", "per-row adapters (mixed batches) are not available with prompt learning"));
        }
        if opts.adapter_scales.is_some() {
            return Err(PeftError::invalid_arg("adapterScales", "per-row scales need per-row LoRA adapters (adapterNames); prompt learning has neither"));
        }
        if ids.len() != b * s {
            return Err(PeftError::invalid_arg("inputIds", format!("has {} ids, expected batch {b} × seq {s}", ids.len())));
        }
        if self.base.task() == Task::Seq2SeqLm {
            return self.prompt_forward_seq2seq(cfg, enc, ids, b, s, opts, cache);
        }
        let n = cfg.total_virtual_tokens();
        let cached = cache.as_ref().map(|c| c.seq_len()).unwrap_or(0);
        let first = cached == 0;
        let past_real = cached.saturating_sub(n);
        let mut o = prompt_options(opts, b, s, n, past_real)?;
        let rng = opts.dropout_rng.as_deref();
        if cfg.method == PromptMethod::PrefixTuning {
            o.position_ids = opts.position_ids.as_ref().map(|p| p.iter().map(|&x| x + n as u32).collect());
            let mut local = self.base.new_cache();
            let cache: &mut KvCache = match cache {
                Some(c) => c,
                None => &mut local,
            };
            if first {
                for (l, kv) in self.prefix_key_values(cfg, enc, b, opts.train, rng)?.into_iter().enumerate() {
                    cache.layers[l] = Some(kv);
                }
            }
            return self.base.forward(ids, b, s, &o, Some(cache));
        }
        let x = self.prompt_embeds(enc, n, ids, b, s, opts, first, &mut o)?;
        self.base.forward_embeds(&x, &o, cache)
    }

    /// The input embeddings `[b, s_total, hidden]` and forward options that [`Self::forward`]
    /// hands to the base model's `forward_embeds` for a forward of the whole sequence without a
    /// cache (causal LMs; with prompt tuning / P-tuning / multitask prompt tuning the virtual
    /// tokens come first; for SEQ_2_SEQ_LM the encoder's input embeddings, as
    /// [`Self::prompt_forward_seq2seq`] builds them). Gradient checkpointing's driver runs the
    /// layers from here.
    ///
    /// Errors: as [`Self::forward`]; `InvalidArgument` naming `gradientCheckpointing` for
    /// prefix tuning (HF's text).
    pub(crate) fn forward_inputs(&self, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions) -> Result<(Tensor, ForwardOptions)> {
        match self.active_prompt() {
            None => {
                self.check_rows(opts, b)?;
                if ids.len() != b * s {
                    return Err(PeftError::invalid_arg("inputIds", format!("has {} ids, expected batch {b} × seq {s}", ids.len())));
                }
                let x = self.base.embed_with(ids, b, s, opts)?;
                let o = self.base.ids_options(ids, b, s, opts, None)?.unwrap_or_else(|| opts.clone());
                Ok((x, o))
            }
            Some((cfg, _)) if cfg.method == PromptMethod::PrefixTuning => Err(super::checkpointing::prefix_refusal()),
            Some((cfg, enc)) => {
                if opts.adapter_rows.is_some() {
                    return Err(PeftError::invalid_arg("adapterNames", "per-row adapters (mixed batches) are not available with prompt learning"));
                }
                if ids.len() != b * s {
                    return Err(PeftError::invalid_arg("inputIds", format!("has {} ids, expected batch {b} × seq {s}", ids.len())));
                }
                if self.base.task() == Task::Seq2SeqLm {
                    return self.seq2seq_prompt_inputs(cfg, enc, ids, b, s, opts);
                }
                let n = cfg.total_virtual_tokens();
                let mut o = prompt_options(opts, b, s, n, 0)?;
                let x = self.prompt_embeds(enc, n, ids, b, s, opts, true, &mut o)?;
                Ok((x, o))
            }
        }
    }

    /// Prompt tuning / P-tuning / multitask prompt tuning: the input embeddings with the
    /// virtual tokens in front on the first step (`first`), and `o` adjusted for them
    /// (position ids dropped, token types extended).
    #[allow(clippy::too_many_arguments)]
    fn prompt_embeds(&self, enc: &PromptEncoder, n: usize, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions, first: bool, o: &mut ForwardOptions) -> Result<Tensor> {
        let rng = opts.dropout_rng.as_deref();
        o.position_ids = None;
        // HF `PeftModelFor{SequenceClassification,TokenClassification,QuestionAnswering}`: the
        // virtual tokens get segment 0; `PeftModelForFeatureExtraction` drops token types.
        if let Some(tt) = &opts.token_type_ids {
            if tt.len() != b * s {
                return Err(PeftError::invalid_arg("tokenTypeIds", format!("has {} values, expected {b} × {s}", tt.len())));
            }
            o.token_type_ids = match self.base.task() {
                Task::FeatureExtraction => None,
                _ if first => Some((0..b).flat_map(|r| std::iter::repeat_n(0, n).chain(tt[r * s..(r + 1) * s].iter().copied())).collect()),
                _ => Some(tt.clone()),
            };
        }
        let x = self.base.embed(ids, b, s)?;
        let x = if first {
            let prompts = enc.batch_prompts(b, opts.task_ids.as_deref(), opts.train, rng)?.to_dtype(self.base.dtype())?;
            Tensor::cat(&[&prompts, &x], 1)?
        } else {
            x
        };
        Ok(x)
    }

    /// HF `PeftModelForSeq2SeqLM.forward` for prompt learning (`ids`, `attention_mask`: the
    /// encoder's real tokens; `decoder_input_ids` / `decoder_attention_mask`: the decoder's):
    /// * prefix tuning: the per-decoder-layer prefix (see [`Self::prefix_key_values`]) goes into
    ///   the decoder self-attention cache before the first step, `decoder_attention_mask` (when
    ///   given) gets `n_virtual` leading ones; the encoder and cross-attention get no prefix;
    /// * prompt tuning / P-tuning: the first `num_virtual_tokens` rows of the prompt table are
    ///   prepended to the encoder input embeddings and the encoder mask gets as many leading
    ///   ones (when the cache does not hold an encoder output yet); the decoder is unchanged.
    ///
    /// Logits are the decoder's `[b, t, vocab]` in both cases.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn prompt_forward_seq2seq(&self, cfg: &PromptLearningConfig, enc: &PromptEncoder, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let n = cfg.num_virtual_tokens;
        let rng = opts.dropout_rng.as_deref();
        let ones_first = |m: &[u8], arg: &str| -> Result<Vec<u8>> {
            if b == 0 || !m.len().is_multiple_of(b) {
                return Err(PeftError::invalid_arg(arg, format!("has {} values, not a multiple of the batch size {b}", m.len())));
            }
            let w = m.len() / b;
            Ok((0..b).flat_map(|r| std::iter::repeat_n(1u8, n).chain(m[r * w..(r + 1) * w].iter().copied())).collect())
        };
        let mut o = opts.clone();
        if cfg.method == PromptMethod::PrefixTuning {
            if let Some(m) = &opts.decoder_attention_mask {
                o.decoder_attention_mask = Some(ones_first(m, "decoderAttentionMask")?);
            }
            let mut local = self.base.new_cache();
            let cache: &mut KvCache = match cache {
                Some(c) => c,
                None => &mut local,
            };
            if cache.seq_len() == 0 {
                for (l, kv) in self.prefix_key_values(cfg, enc, b, opts.train, rng)?.into_iter().enumerate() {
                    cache.layers[l] = Some(kv);
                }
            }
            return self.base.forward(ids, b, s, &o, Some(cache));
        }
        if cache.as_ref().map(|c| c.encoder_hidden.is_some()).unwrap_or(false) {
            let x = self.base.embed(ids, b, s)?;
            return self.base.forward_embeds(&x, &o, cache);
        }
        let (x, o) = self.seq2seq_prompt_inputs(cfg, enc, ids, b, s, opts)?;
        self.base.forward_embeds(&x, &o, cache)
    }

    /// Prompt tuning / P-tuning on SEQ_2_SEQ_LM: the encoder's input embeddings with the first
    /// `num_virtual_tokens` rows of the prompt table in front, and `opts` with as many leading
    /// ones on the encoder mask (see [`Self::prompt_forward_seq2seq`]).
    ///
    /// Errors: `InvalidArgument` naming `attentionMask` when it does not have `b × s` values.
    fn seq2seq_prompt_inputs(&self, cfg: &PromptLearningConfig, enc: &PromptEncoder, ids: &[u32], b: usize, s: usize, opts: &ForwardOptions) -> Result<(Tensor, ForwardOptions)> {
        let n = cfg.num_virtual_tokens;
        let mut o = opts.clone();
        if let Some(m) = &opts.attention_mask {
            if m.len() != b * s {
                return Err(PeftError::invalid_arg("attentionMask", format!("has {} values, expected {b} × {s}", m.len())));
            }
            o.attention_mask = Some((0..b).flat_map(|r| std::iter::repeat_n(1u8, n).chain(m[r * s..(r + 1) * s].iter().copied())).collect());
        }
        let x = self.base.embed(ids, b, s)?;
        let prompts = enc.batch_prompts(b, None, opts.train, opts.dropout_rng.as_deref())?.narrow(1, 0, n)?.to_dtype(self.base.dtype())?;
        Ok((Tensor::cat(&[&prompts, &x], 1)?, o))
    }

    /// Validate a mixed-batch request: `adapterNames` (one per row, existing adapters or
    /// `__base__`, none merged, not training) and `adapterScales` (only with `adapterNames`, one
    /// finite number per row; a scale other than 1 only on rows of LoRA adapters, the only ones
    /// with a scale; ignored on `__base__` rows).
    ///
    /// Errors: `InvalidArgument` naming `adapterNames` / `adapterScales`; `InvalidState` while
    /// training or merged.
    pub fn check_rows(&self, opts: &ForwardOptions, b: usize) -> Result<()> {
        if let Some(sc) = &opts.adapter_scales {
            let Some(rows) = &opts.adapter_rows else {
                return Err(PeftError::invalid_arg("adapterScales", "needs adapterNames (the adapter of each row)"));
            };
            if sc.len() != b {
                return Err(PeftError::invalid_arg("adapterScales", format!("has {} scales but the batch has {b} rows", sc.len())));
            }
            if let Some(x) = sc.iter().find(|x| !x.is_finite()) {
                return Err(PeftError::invalid_arg("adapterScales", format!("must be finite numbers, found {x}")));
            }
            for (r, (name, &s)) in rows.iter().zip(sc.iter()).enumerate() {
                let Some(n) = name else { continue };
                if s != 1.0 {
                    if let Ok(cfg) = self.peft_config(n) {
                        if cfg.as_lora().is_none() {
                            return Err(PeftError::invalid_arg("adapterScales", format!("row {r} uses `{n}`, a {} adapter: only LoRA adapters have a scale", cfg.peft_type())));
                        }
                    }
                }
            }
        }
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
            self.check_allowed(Operation::MixedBatch, rows.iter().flatten())?;
        }
        Ok(())
    }
}

/// `opts` for a prompt-learning forward of `s` real tokens after `past_real` cached ones, with
/// the attention mask extended by `n` leading ones for the virtual tokens.
///
/// Errors: `InvalidArgument` naming `attentionMask` when it does not have `b × (past_real + s)` values.
fn prompt_options(opts: &ForwardOptions, b: usize, s: usize, n: usize, past_real: usize) -> Result<ForwardOptions> {
    let mut o = opts.clone();
    if let Some(m) = &opts.attention_mask {
        if m.len() != b * (past_real + s) {
            return Err(PeftError::invalid_arg("attentionMask", format!("has {} values, expected {b} × {}", m.len(), past_real + s)));
        }
        let w = past_real + s;
        let mut ext = Vec::with_capacity(b * (n + w));
        for r in 0..b {
            ext.extend(std::iter::repeat_n(1u8, n));
            ext.extend_from_slice(&m[r * w..(r + 1) * w]);
        }
        o.attention_mask = Some(ext);
    }
    Ok(o)
}
