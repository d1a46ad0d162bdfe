//! Text generation with a KV cache: greedy decoding or sampling with temperature, top-k and
//! top-p (nucleus), as transformers' `generate` does it for decoder-only models.
//!
//! Position ids follow `generate`: `cumsum(attention_mask) - 1` (1 where masked), so left-padded
//! batches work; finished rows are filled with `pad_token_id`.
//!
//! Encoder-decoder models (T5) encode the prompt once and decode from `decoder_start_token_id`
//! (transformers' `generate` for `is_encoder_decoder`); the result is the decoder sequence.

use crate::error::{PeftError, Result};
use crate::model::{ForwardOptions, Task};
use crate::peft_model::PeftModel;
use crate::tuners::RowAdapters;
use candle_core::DType;
use crate::tokenizer::Tokenizer;
use rand::{Rng, SeedableRng};

/// Generation settings (transformers `GenerationConfig` names).
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub do_sample: bool,
    pub temperature: f64,
    /// 0 = no top-k filtering.
    pub top_k: usize,
    /// 1.0 = no nucleus filtering.
    pub top_p: f64,
    pub seed: u64,
    /// Stop a row when it produces one of these; empty = never stop early.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
    /// Reuse keys/values across steps (false = full forward each step; identical results).
    pub use_cache: bool,
    /// Multitask prompt tuning: one task id per row.
    pub task_ids: Option<Vec<u32>>,
    /// Mixed batches: one scale per row for its LoRA adapter (see
    /// `ForwardOptions::adapter_scales`); `None` = all 1.
    pub adapter_scales: Option<Vec<f64>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 20,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            seed: 0,
            eos_token_ids: vec![],
            pad_token_id: 0,
            use_cache: true,
            task_ids: None,
            adapter_scales: None,
        }
    }
}

/// Stop strings (transformers' `stop_strings` / `StopStringCriteria`): a row finishes at the
/// token that completes one of `strings` in its decoded text. As in transformers, the match
/// may overhang both ends (for "stop": `["st", "op"]`, `["st", "opera"]` and `["las",
/// "topper"]` all match) but must end inside the newest token (`["stop", "at"]` matched one
/// step earlier, at "stop"); the row's sequence ends with that token (its text is not cut) and
/// the earlier context includes the prompt. Rows are decoded with special tokens kept.
pub struct StopStrings<'a> {
    pub strings: &'a [String],
    pub tokenizer: &'a Tokenizer,
}

impl StopStrings<'_> {
    /// Whether the last id of `ids` completes one of the stop strings (see [`StopStrings`]).
    ///
    /// Errors: `Tokenizer` when decoding fails.
    pub fn completed_by_last(&self, ids: &[u32]) -> Result<bool> {
        let Some(longest) = self.strings.iter().map(|s| s.len()).max() else { return Ok(false) };
        if ids.is_empty() || longest == 0 {
            return Ok(false);
        }
        let n = ids.len();
        // Enough earlier tokens to hold the longest stop string's other bytes: every token
        // decodes to at least one byte, so `longest` of them suffice (plus one for a token
        // split inside a UTF-8 character).
        let start = (n - 1).saturating_sub(longest + 1);
        let all = self.tokenizer.decode(&ids[start..], false)?;
        let prev = self.tokenizer.decode(&ids[start..n - 1], false)?;
        // The new token's text starts where the two decodings part (a partial UTF-8 character
        // at the end of `prev` decodes differently once completed).
        let common = all.bytes().zip(prev.bytes()).take_while(|(a, b)| a == b).count();
        // An occurrence (overlapping ones included) that ends inside the new token's text.
        Ok(self.strings.iter().filter(|s| !s.is_empty()).any(|s| {
            let first = common.saturating_sub(s.len() - 1);
            (first..all.len()).any(|i| all.is_char_boundary(i) && all[i..].starts_with(s.as_str()))
        }))
    }
}

/// One generation step as streamed to [`GenerateHooks::on_step`].
#[derive(Debug, Clone)]
pub struct Step<'a> {
    /// 0-based step index (= the position of the token among the new tokens).
    pub index: usize,
    /// The token of each row at this step (`pad_token_id` for rows that finished earlier).
    pub tokens: &'a [u32],
    /// Whether each row is finished after this step (EOS, or a stop string completed by this
    /// step's token, or earlier).
    pub finished: &'a [bool],
    /// Each row's sequence so far (prompt + new tokens; decoder sequence for seq2seq).
    pub rows: &'a [Vec<u32>],
}

/// What [`generate_with`] reports and how it stops, besides [`GenerateOptions`].
pub struct GenerateHooks<'a> {
    /// Polled before each step; `true` ends generation with `Aborted`.
    pub should_stop: &'a dyn Fn() -> bool,
    /// Called after each step, on the generating thread.
    pub on_step: Option<&'a mut dyn FnMut(&Step)>,
    /// Finish rows at stop strings (needs a tokenizer).
    pub stop_strings: Option<StopStrings<'a>>,
}

fn sample(logits: &[f32], o: &GenerateOptions, rng: &mut rand::rngs::StdRng) -> u32 {
    let argmax = |l: &[f32]| l.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |a, (i, &v)| if v > a.1 { (i, v) } else { a }).0 as u32;
    if !o.do_sample {
        return argmax(logits);
    }
    let t = o.temperature.max(1e-5) as f32;
    let mut idx: Vec<(usize, f32)> = logits.iter().map(|&v| v / t).enumerate().collect();
    idx.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
    if o.top_k > 0 && o.top_k < idx.len() {
        idx.truncate(o.top_k);
    }
    let max = idx[0].1;
    let mut probs: Vec<f64> = idx.iter().map(|(_, v)| ((v - max) as f64).exp()).collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if o.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= o.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let s: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= s);
    }
    let r: f64 = rng.random();
    let mut cum = 0.0;
    for (i, p) in probs.iter().enumerate() {
        cum += p;
        if r < cum {
            return idx[i].0 as u32;
        }
    }
    idx[probs.len() - 1].0 as u32
}

/// Generate up to `max_new_tokens` for each row of `input_ids` (`[b, s]` row-major, with an
/// optional `[b, s]` attention mask for left-padded prompts). Returns each row's prompt followed
/// by its new tokens, `[b, s + n]` (n ≤ max_new_tokens; shorter when every row hit EOS); for an
/// encoder-decoder model (T5), each row's decoder sequence `[decoder_start, new tokens...]`
/// instead (see [`generate_seq2seq`]). `should_stop` is polled between tokens (for AbortSignal); it returns `Aborted`.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &PeftModel,
    input_ids: &[u32],
    b: usize,
    s: usize,
    attention_mask: Option<Vec<u8>>,
    adapter_rows: Option<RowAdapters>,
    o: &GenerateOptions,
    should_stop: &dyn Fn() -> bool,
) -> Result<Vec<Vec<u32>>> {
    generate_with(model, input_ids, b, s, attention_mask, adapter_rows, o, GenerateHooks { should_stop, on_step: None, stop_strings: None })
}

/// [`generate`] with streaming and stop strings: `hooks.on_step` sees every step's tokens as
/// they are produced (the same tokens, in the same order, as the returned rows), and rows
/// finish at EOS or at a stop string ([`StopStrings`]), after which they get `pad_token_id`.
/// Generation ends when every row is finished, after `max_new_tokens` steps, or with `Aborted`
/// when `hooks.should_stop` returns true before a step (the KV cache and the rows are dropped).
///
/// Errors: as [`generate`]; `Tokenizer` from stop-string decoding.
#[allow(clippy::too_many_arguments)]
pub fn generate_with(
    model: &PeftModel,
    input_ids: &[u32],
    b: usize,
    s: usize,
    attention_mask: Option<Vec<u8>>,
    adapter_rows: Option<RowAdapters>,
    o: &GenerateOptions,
    mut hooks: GenerateHooks,
) -> Result<Vec<Vec<u32>>> {
    let should_stop = hooks.should_stop;
    if input_ids.len() != b * s || s == 0 {
        return Err(PeftError::invalid_arg("inputIds", format!("expected a non-empty [{b}, {s}] batch")));
    }
    match model.base.task() {
        Task::CausalLm => {}
        Task::Seq2SeqLm => return generate_seq2seq(model, input_ids, b, s, attention_mask, adapter_rows, o, hooks),
        task => {
            return Err(PeftError::InvalidState(format!(
                "generate needs a language-model head (CAUSAL_LM or SEQ_2_SEQ_LM); {} has a {} head",
                model.base.info().architecture,
                task.task_type()
            )))
        }
    }
    let max_pos = model.base.info().max_position_embeddings;
    if s.saturating_add(o.max_new_tokens) > max_pos {
        return Err(PeftError::invalid_arg(
            "maxNewTokens",
            format!("prompt length {s} + maxNewTokens {} exceeds max_position_embeddings {max_pos}", o.max_new_tokens),
        ));
    }
    let mut mask: Vec<u8> = attention_mask.unwrap_or_else(|| vec![1; b * s]);
    if mask.len() != b * s {
        return Err(PeftError::invalid_arg("attentionMask", format!("expected {b} × {s} values")));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let mut rows: Vec<Vec<u32>> = (0..b).map(|i| input_ids[i * s..(i + 1) * s].to_vec()).collect();
    let mut done = vec![false; b];
    let mut cache = model.base.new_cache();
    let mut cur_len = s;
    let mut step_ids: Vec<u32> = input_ids.to_vec();
    let mut step_len = s;
    for _ in 0..o.max_new_tokens {
        if should_stop() {
            return Err(PeftError::Aborted);
        }
        // position ids = cumsum(mask) - 1, 1 where masked; take the last `step_len` of each row.
        let mut pos = Vec::with_capacity(b * step_len);
        for r in 0..b {
            let m = &mask[r * cur_len..(r + 1) * cur_len];
            let mut c: i64 = 0;
            let all: Vec<u32> = m.iter().map(|&v| { c += v as i64; if v == 0 { 1 } else { (c - 1) as u32 } }).collect();
            pos.extend_from_slice(&all[cur_len - step_len..]);
        }
        let opts = ForwardOptions {
            attention_mask: Some(mask.clone()),
            position_ids: Some(pos),
            adapter_rows: adapter_rows.clone(),
            adapter_scales: o.adapter_scales.clone().map(std::sync::Arc::new),
            last_only: true,
            task_ids: o.task_ids.clone(),
            ..Default::default()
        };
        let logits = if o.use_cache {
            model.forward(&step_ids, b, step_len, &opts, Some(&mut cache))?
        } else {
            model.forward(&step_ids, b, step_len, &opts, None)?
        };
        let logits = logits.to_dtype(DType::F32)?.squeeze(1)?;
        let logits: Vec<Vec<f32>> = logits.to_vec2()?;
        let mut next = Vec::with_capacity(b);
        for r in 0..b {
            let tok = if done[r] { o.pad_token_id } else { sample(&logits[r], o, &mut rng) };
            rows[r].push(tok);
            next.push(tok);
        }
        finish_rows(&mut done, &next, &rows, o, &hooks)?;
        if let Some(f) = hooks.on_step.as_mut() {
            f(&Step { index: rows[0].len() - s - 1, tokens: &next, finished: &done, rows: &rows });
        }
        // Grow the mask by one column.
        let mut m2 = Vec::with_capacity(b * (cur_len + 1));
        for r in 0..b {
            m2.extend_from_slice(&mask[r * cur_len..(r + 1) * cur_len]);
            m2.push(1);
        }
        mask = m2;
        cur_len += 1;
        if o.use_cache {
            step_ids = next;
            step_len = 1;
        } else {
            step_ids = rows.iter().flat_map(|r| r.iter().copied()).collect();
            step_len = cur_len;
        }
        if done.iter().all(|d| *d) {
            break;
        }
    }
    Ok(rows)
}

/// Encoder-decoder generation (transformers' `generate` with `is_encoder_decoder`): the prompt
/// `[b, s]` (with its padding mask) is encoded once; decoding starts from
/// `decoder_start_token_id` and appends one token per step (greedy or sampled as for decoder
/// models) until `max_new_tokens` or every row has produced an EOS. With `use_cache` the
/// encoder output, cross-attention and self-attention keys/values are kept in the cache and each
/// step feeds only the newest token; without it every step re-runs the encoder and the whole
/// decoder sequence (identical results). Returns each row's decoder sequence
/// `[decoder_start, new tokens...]` (`[b, 1 + n]`); finished rows are filled with `pad_token_id`.
///
/// Errors: `InvalidModelConfig` when the model has no `decoder_start_token_id`; `Aborted`; those
/// of the forward pass.
#[allow(clippy::too_many_arguments)]
fn generate_seq2seq(
    model: &PeftModel,
    input_ids: &[u32],
    b: usize,
    s: usize,
    attention_mask: Option<Vec<u8>>,
    adapter_rows: Option<RowAdapters>,
    o: &GenerateOptions,
    mut hooks: GenerateHooks,
) -> Result<Vec<Vec<u32>>> {
    let should_stop = hooks.should_stop;
    let info = model.base.info();
    let start = info.decoder_start_token_id.ok_or_else(|| PeftError::InvalidModelConfig {
        path: std::path::PathBuf::from(info.name_or_path.clone().unwrap_or_else(|| "<model>".into())),
        msg: "config.json has no `decoder_start_token_id`, which encoder-decoder generation starts from".into(),
    })?;
    let mask: Vec<u8> = attention_mask.unwrap_or_else(|| vec![1; b * s]);
    if mask.len() != b * s {
        return Err(PeftError::invalid_arg("attentionMask", format!("expected {b} × {s} values")));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let mut rows: Vec<Vec<u32>> = vec![vec![start]; b];
    let mut done = vec![false; b];
    let mut cache = model.base.new_cache();
    let mut step: Vec<u32> = vec![start; b];
    for _ in 0..o.max_new_tokens {
        if should_stop() {
            return Err(PeftError::Aborted);
        }
        let decoder_input_ids = if o.use_cache { step.clone() } else { rows.iter().flat_map(|r| r.iter().copied()).collect() };
        let opts = ForwardOptions {
            attention_mask: Some(mask.clone()),
            adapter_rows: adapter_rows.clone(),
            adapter_scales: o.adapter_scales.clone().map(std::sync::Arc::new),
            last_only: true,
            task_ids: o.task_ids.clone(),
            decoder_input_ids: Some(decoder_input_ids),
            ..Default::default()
        };
        let logits = if o.use_cache {
            model.forward(input_ids, b, s, &opts, Some(&mut cache))?
        } else {
            model.forward(input_ids, b, s, &opts, None)?
        };
        let logits: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.squeeze(1)?.to_vec2()?;
        step.clear();
        for r in 0..b {
            let tok = if done[r] { o.pad_token_id } else { sample(&logits[r], o, &mut rng) };
            rows[r].push(tok);
            step.push(tok);
        }
        finish_rows(&mut done, &step, &rows, o, &hooks)?;
        if let Some(f) = hooks.on_step.as_mut() {
            f(&Step { index: rows[0].len() - 2, tokens: &step, finished: &done, rows: &rows });
        }
        if done.iter().all(|d| *d) {
            break;
        }
    }
    Ok(rows)
}

/// Mark rows finished by this step's tokens: EOS, or a stop string completed by the token.
fn finish_rows(done: &mut [bool], tokens: &[u32], rows: &[Vec<u32>], o: &GenerateOptions, hooks: &GenerateHooks) -> Result<()> {
    for r in 0..done.len() {
        if done[r] {
            continue;
        }
        if o.eos_token_ids.contains(&tokens[r]) {
            done[r] = true;
        } else if let Some(st) = &hooks.stop_strings {
            if st.completed_by_last(&rows[r])? {
                done[r] = true;
            }
        }
    }
    Ok(())
}
