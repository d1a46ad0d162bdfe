//! The engine's decoder step (the Llama family, and Gemma 3 through the same layer with its
//! extra norms, GeGLU and sliding windows, and Phi-3 with its fused q|k|v and gate|up linears
//! ([`Layer::fused`]), partial RoPE ([`Arch::rotary`]) and per-forward longrope tables
//! ([`Plan::rope_of`]); see [`Arch`] and [`Layer`]): explicit forward and backward per decoder
//! layer.
//!
//! Shapes (row-major, token-major): `T = b·s` tokens, `H` hidden, `QD = heads·head_dim`,
//! `KD = kv_heads·head_dim`, `I` intermediate, `P` prefix length (prefix tuning, else 0),
//! `t = P + s` key positions. Activations are stored as `[T, features]`, so a head is a strided
//! column block and attention needs no transposes.

use super::gemm::{gemm, gemm_f32, Dst, View};
use super::simd;
use crate::error::{PeftError, Result};
use crate::model::llama::LlamaForCausalLM;
use crate::model::Task;
use crate::peft_model::PeftModel;
use crate::train::{extended_labels, Batch};
use crate::tuners::linear::PeftLinear;
use crate::tuners::prompt::PromptMethod;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Storage, Tensor, Var};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// A read-only view of a contiguous f32 CPU tensor's data. The tensor must outlive every use
/// and must not be written meanwhile (the model is borrowed for the whole step).
#[derive(Clone, Copy)]
struct Raw {
    ptr: *const f32,
    len: usize,
}

// SAFETY: see the type's docs; the data is only read.
unsafe impl Send for Raw {}
unsafe impl Sync for Raw {}

impl Raw {
    fn of(t: &Tensor) -> Option<Raw> {
        if t.dtype() != DType::F32 || !t.device().is_cpu() || !t.is_contiguous() {
            return None;
        }
        let (st, l) = t.storage_and_layout();
        match &*st {
            Storage::Cpu(CpuStorage::F32(v)) => {
                let s = &v[l.start_offset()..];
                (s.len() >= t.elem_count()).then(|| Raw {
                    ptr: s.as_ptr(),
                    len: t.elem_count(),
                })
            }
            _ => None,
        }
    }
    fn get(&self) -> &[f32] {
        // SAFETY: built from a live tensor's storage (see the type's docs).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// One active, unmerged LoRA adapter of a linear layer.
struct Lora {
    a: Raw,
    b: Raw,
    r: usize,
    scaling: f32,
    dropout: f64,
    var_a: Var,
    var_b: Var,
    /// A mixed batch (`adapterNames`): the batch rows this adapter applies to (`None` = all).
    rows: Option<Arc<Vec<bool>>>,
}

impl Lora {
    /// The engine's view of one LoRA adapter of a layer (`None` when a weight is not a plain
    /// contiguous f32 CPU tensor).
    fn of(ad: &crate::tuners::lora::layer::LoraAdapter, rows: Option<Arc<Vec<bool>>>) -> Option<Lora> {
        Some(Lora {
            a: Raw::of(ad.a.as_tensor())?,
            b: Raw::of(ad.b.as_tensor())?,
            r: ad.r,
            scaling: ad.scaling as f32,
            dropout: ad.dropout,
            var_a: ad.a.clone(),
            var_b: ad.b.clone(),
            rows,
        })
    }
}

/// A mixed batch (`adapterNames`): the adapter of each row and, with `adapterScales`, each
/// row's scale of its LoRA delta (`None` = all 1).
#[derive(Clone, Copy)]
struct Mixed<'a> {
    rows: &'a crate::tuners::linear::RowAdapters,
    scales: Option<&'a [f64]>,
}

impl Mixed<'_> {
    fn scale(&self, row: usize) -> f64 {
        self.scales.and_then(|s| s.get(row).copied()).unwrap_or(1.0)
    }
}

/// A frozen linear layer `y = x Wᵀ + b` with its active LoRA adapters.
struct Lin {
    /// The f32 weight `[out, in]`, or `None` when it is kept quantized (`q`).
    w: Option<Raw>,
    /// The weight kept quantized (QLoRA-style, `engine::quant`): the base products run as
    /// `QuantWeight::matmul_t` / `matmul` route them (AMX in bf16 from 32 rows where the CPU
    /// has it; otherwise the integer kernels forward and dequantized panels for the input
    /// gradient).
    q: Option<Arc<super::quant::QuantWeight>>,
    bias: Option<Raw>,
    out: usize,
    inp: usize,
    loras: Vec<Lora>,
}

impl Lin {
    /// The empty place of a linear that a fused one computes (see [`Layer::fused`]): no weight,
    /// no adapter; never run.
    fn none() -> Lin {
        Lin {
            w: None,
            q: None,
            bias: None,
            out: 0,
            inp: 0,
            loras: Vec::new(),
        }
    }

    /// `None` when the layer carries something the engine does not compute (DoRA, (IA)³, other
    /// tuners' layers, modules_to_save copies, a trainable bias, a transposed or non-f32 weight).
    /// With `rows` (a mixed batch), each named adapter applies to its own rows only, whether it
    /// is active or not, as `PeftLinear::forward` does; an adapter of another tuner, a
    /// modules_to_save copy or DoRA named by a row is left to the general path. Rows of one
    /// adapter with different scales become one entry per scale (`scaling · scale`).
    fn of(l: &PeftLinear, mixed: Option<Mixed<'_>>) -> Option<Lin> {
        if l.transposed || l.is_embedding {
            return None;
        }
        // Only plain LoRA layers are computed here (see `PeftLinear::lora`).
        if !l.disabled
            && (!l.saved_copies.is_empty()
                || l.active
                    .iter()
                    .any(|n| l.has_adapter(n) && l.lora(n).is_none() && !l.merged.contains(n)))
        {
            return None;
        }
        if l.bias
            .as_ref()
            .is_some_and(|b| b.is_variable() || b.track_op())
        {
            return None;
        }
        let mut loras = Vec::new();
        if let (Some(mx), false) = (mixed, l.disabled) {
            let rows = mx.rows;
            let mut names: Vec<&String> = rows.iter().flatten().collect();
            names.sort();
            names.dedup();
            for name in names {
                if l.saved_copies.contains_key(name) || (l.has_adapter(name) && l.lora(name).is_none()) {
                    return None;
                }
                let Some(ad) = l.lora(name) else {
                    continue;
                };
                if ad.magnitude.is_some() {
                    return None;
                }
                let mut scales: Vec<f64> = (0..rows.len()).filter(|&i| rows[i].as_ref() == Some(name)).map(|i| mx.scale(i)).collect();
                scales.sort_by(f64::total_cmp);
                scales.dedup();
                for sc in scales {
                    let mask = (0..rows.len()).map(|i| rows[i].as_ref() == Some(name) && mx.scale(i) == sc).collect();
                    let mut lo = Lora::of(ad, Some(Arc::new(mask)))?;
                    lo.scaling = (ad.scaling * sc) as f32;
                    loras.push(lo);
                }
            }
        } else if !l.disabled {
            for name in &l.active {
                if l.merged.contains(name) {
                    continue;
                }
                let Some(ad) = l.lora(name) else {
                    continue;
                };
                if ad.magnitude.is_some() {
                    return None;
                }
                loras.push(Lora::of(ad, None)?);
            }
        }
        let (out, inp) = l.weight.dims2().ok()?;
        for lo in &loras {
            if lo.a.len != lo.r * inp || lo.b.len != out * lo.r {
                return None;
            }
        }
        let bias = match &l.bias {
            Some(b) => Some(Raw::of(b)?),
            None => None,
        };
        let (w, q) = match &l.quant {
            Some(q) if q.rows() == out && q.cols() == inp => (None, Some(q.clone())),
            Some(_) => return None,
            None => (Some(Raw::of(&l.weight)?), None),
        };
        Some(Lin {
            w,
            q,
            bias,
            out,
            inp,
            loras,
        })
    }
}

struct Layer {
    ln1: Raw,
    ln2: Raw,
    /// Qwen3's per-head RMSNorm weights of the queries and keys (`self_attn.q_norm` /
    /// `k_norm`, `[head_dim]`), applied to each head before RoPE.
    qk_norm: Option<(Raw, Raw)>,
    /// Whether RoPE rotates this layer's queries and keys (false for SmolLM3's NoPE layers:
    /// neither the forward rotation nor its transpose in the backward is applied).
    rope: bool,
    /// Which of [`Arch::inv_freq`]'s RoPE tables the layer uses (Gemma 3: 0 for sliding
    /// layers, 1 for full-attention layers; 0 everywhere else).
    rope_table: usize,
    /// Gemma 3's sliding layers: a query at position `i` sees keys at positions `> i - window`.
    window: Option<usize>,
    /// Gemma 3: RMSNorm scales (`1 + w`) applied to the attention output after `o_proj`
    /// (`post_attention_layernorm`) and to the MLP output after `down_proj`
    /// (`post_feedforward_layernorm`), before each residual add. (`ln2` is then the
    /// `pre_feedforward_layernorm`.)
    post_attn: Option<Raw>,
    post_ff: Option<Raw>,
    /// Phi-3's fused linears: `lins[Q]` is `self_attn.qkv_proj` (`[QD + 2·KD, H]`: q rows, then
    /// k, then v) and `lins[GATE]` is `mlp.gate_up_proj` (`[2·I, H]`: gate rows, then up), each
    /// with its LoRA adapters over the whole fused output, as HF PEFT's keys address them;
    /// `lins[K]`, `lins[V]` and `lins[UP]` are then empty ([`Lin::none`]). The fused product is
    /// computed into a `[T, out]` buffer and its column blocks copied out to q/k/v (g/u); the
    /// backward copies their gradients back into one `[T, out]` gradient.
    fused: bool,
    /// q, k, v, o, gate, up, down.
    lins: [Lin; 7],
}

const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// Model dimensions of one step.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Dims {
    b: usize,
    s: usize,
    p: usize,
    h: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    inter: usize,
    vocab: usize,
}

impl Dims {
    fn t(&self) -> usize {
        self.p + self.s
    }
    fn tok(&self) -> usize {
        self.b * self.s
    }
    fn qd(&self) -> usize {
        self.nh * self.hd
    }
    fn kd(&self) -> usize {
        self.nkv * self.hd
    }
}

/// The output head's weight `[vocab, H]`: f32, or kept quantized (a GGUF base loaded with
/// `quantization: 'keep'`, whose logits llama.cpp also computes from the file's quantized
/// `output.weight` / tied `token_embd.weight`).
enum Head {
    F32(Raw),
    Quant(Arc<super::quant::QuantWeight>),
}

impl Head {
    /// `y[m, vocab] = x[m, H]·Wᵀ`; `precise` keeps an f32 head on f32 products whatever the
    /// float32 matmul precision (the training loss). A quantized head runs as the layers do
    /// ([`super::quant::QuantWeight::matmul_t`]: integer kernels with 8-bit activations, or
    /// AMX in bf16 from 32 rows).
    fn logits(&self, x: &[f32], m: usize, h: usize, vocab: usize, y: &mut [f32], threads: usize, precise: bool) {
        match self {
            Head::F32(w) => {
                let f = if precise { gemm_f32 } else { gemm };
                f(&mut Dst::of(y, m, vocab), View::of(x, m, h), View::of(w.get(), vocab, h).t(), 1.0, false, threads)
            }
            Head::Quant(q) => {
                // Shapes agree by construction (Plan::of checks q against [vocab, H]); a
                // mismatch would leave NaN, never garbage.
                if q.matmul_t(&x[..m * h], m, &mut y[..m * vocab], false).is_err() {
                    y.fill(f32::NAN);
                }
            }
        }
    }

    /// `gx[m, H] = g[m, vocab]·W`: an f32 head in f32; a quantized head as the layers' input
    /// gradients ([`super::quant::QuantWeight::matmul`]).
    fn input_grad(&self, g: &[f32], m: usize, h: usize, vocab: usize, gx: &mut [f32], threads: usize) {
        match self {
            Head::F32(w) => gemm_f32(&mut Dst::of(gx, m, h), View::of(g, m, vocab), View::of(w.get(), vocab, h), 1.0, false, threads),
            Head::Quant(q) => {
                if q.matmul(&g[..m * vocab], m, &mut gx[..m * h], false).is_err() {
                    gx.fill(f32::NAN);
                }
            }
        }
    }
}

/// What differs between the decoder families the engine computes (Llama and its relatives;
/// Gemma 3), read from the model's config.
struct Arch {
    vocab: usize,
    h: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    inter: usize,
    max_pos: usize,
    device: candle_core::Device,
    /// RoPE inverse frequencies `[rotary / 2]` per table ([`Layer::rope_table`]).
    inv_freq: Vec<Vec<f32>>,
    /// Dimensions of each head that RoPE rotates (even): `hd`, or Phi-3's
    /// `head_dim · partial_rotary_factor` (the rest of the head passes through).
    rotary: usize,
    /// Gemma 3: input embeddings are multiplied by `sqrt(hidden)` (f32).
    embed_scale: Option<f32>,
    /// Attention scores' scale: `head_dim^-1/2`, or Gemma 3's `query_pre_attn_scalar^-1/2`.
    attn_scale: f32,
    /// The MLP's activation is `gelu_pytorch_tanh` (GeGLU, Gemma 3) instead of SiLU (SwiGLU).
    gelu: bool,
}

/// The model's weights as the engine reads them.
struct Plan<'m> {
    arch: Arch,
    layers: Vec<Layer>,
    norm: Raw,
    head: Head,
    embed: Raw,
    eps: f32,
    /// Phi-3: the RoPE table is chosen per forward by the model's own
    /// [`Phi3Config::inv_freq`](crate::model::phi3::Phi3Config::inv_freq) (longrope's short or
    /// long factors and attention factor) instead of [`Arch::inv_freq`].
    rope_of: Option<&'m crate::model::phi3::Phi3Config>,
    _model: std::marker::PhantomData<&'m ()>,
}

/// Whether an embedding or output head carries something the engine does not compute (an
/// unmerged adapter of any tuner, a modules_to_save copy, a bias).
fn live_table(l: &PeftLinear) -> bool {
    let live = !l.disabled
        && l.active.iter().any(|n| {
            (l.has_adapter(n) && (l.lora(n).is_none() || !l.merged.contains(n)))
                || l.saved_copies.contains_key(n)
        });
    live || l.bias.is_some()
}

/// The output head of `[vocab, hidden]`: f32, or kept quantized.
fn head_of(l: &PeftLinear, vocab: usize, h: usize) -> Option<Head> {
    match &l.quant {
        Some(q) if q.rows() == vocab && q.cols() == h => Some(Head::Quant(q.clone())),
        Some(_) => None,
        None => Some(Head::F32(Raw::of(&l.weight)?)),
    }
}

/// The seven linears of a decoder layer, in [`Layer::lins`] order.
fn lins_of(ls: [&PeftLinear; 7], rows: Option<Mixed<'_>>) -> Option<[Lin; 7]> {
    Some([
        Lin::of(ls[0], rows)?,
        Lin::of(ls[1], rows)?,
        Lin::of(ls[2], rows)?,
        Lin::of(ls[3], rows)?,
        Lin::of(ls[4], rows)?,
        Lin::of(ls[5], rows)?,
        Lin::of(ls[6], rows)?,
    ])
}

impl<'m> Plan<'m> {
    /// The plan of a Llama-family model (Llama 2/3, SmolLM2/3, Qwen2/3, Mistral), or `None`
    /// when it needs the general path.
    fn of(m: &'m LlamaForCausalLM, rows: Option<Mixed<'_>>) -> Option<Plan<'m>> {
        if m.dtype != DType::F32
            || !m.device.is_cpu()
            || crate::model::BaseModel::task(m) != Task::CausalLm
        {
            return None;
        }
        // The embedding and the head must be plain tables (no LoRA, no modules_to_save copy).
        if live_table(&m.embed_tokens) || live_table(&m.lm_head) {
            return None;
        }
        let c = &m.config;
        let mut layers = Vec::with_capacity(m.layers.len());
        for (li, l) in m.layers.iter().enumerate() {
            let a = &l.self_attn;
            // An attention module that carries a live adapter of its own (an adaption prompt)
            // is computed by the general path.
            if a.prompts.live().is_some() {
                return None;
            }
            let f = &l.mlp;
            let qk_norm = match (&a.q_norm, &a.k_norm) {
                (Some(q), Some(k)) => Some((Raw::of(q)?, Raw::of(k)?)),
                (None, None) => None,
                _ => return None,
            };
            layers.push(Layer {
                ln1: Raw::of(&l.input_layernorm)?,
                ln2: Raw::of(&l.post_attention_layernorm)?,
                qk_norm,
                rope: c.layer_uses_rope(li),
                rope_table: 0,
                window: None,
                post_attn: None,
                post_ff: None,
                fused: false,
                lins: lins_of([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &f.gate_proj, &f.up_proj, &f.down_proj], rows)?,
            });
        }
        let ok = c.head_dim % 2 == 0 && c.num_key_value_heads > 0 && c.num_attention_heads % c.num_key_value_heads == 0;
        if !ok {
            return None;
        }
        Some(Plan {
            arch: Arch {
                vocab: c.vocab_size,
                h: c.hidden_size,
                nh: c.num_attention_heads,
                nkv: c.num_key_value_heads,
                hd: c.head_dim,
                inter: c.intermediate_size,
                max_pos: c.max_position_embeddings,
                device: m.device.clone(),
                inv_freq: vec![m.inv_freq().to_vec()],
                rotary: c.head_dim,
                embed_scale: None,
                attn_scale: 1.0 / (c.head_dim as f32).sqrt(),
                gelu: false,
            },
            layers,
            norm: Raw::of(&m.norm)?,
            head: head_of(&m.lm_head, c.vocab_size, c.hidden_size)?,
            embed: Raw::of(&m.embed_tokens.weight)?,
            eps: c.rms_norm_eps as f32,
            rope_of: None,
            _model: std::marker::PhantomData,
        })
    }

    /// The plan of a Gemma 3 text decoder (four norms per layer with `1 + w` scales, q/k norms,
    /// GeGLU, scaled embeddings, `query_pre_attn_scalar`, sliding-window layers with their own
    /// RoPE table), or `None` when it needs the general path (logit soft-capping, f16/bf16, ...).
    fn of_gemma3(m: &'m crate::model::gemma3::Gemma3ForCausalLM, rows: Option<Mixed<'_>>) -> Option<Plan<'m>> {
        let c = &m.config;
        if m.dtype != DType::F32 || !m.device.is_cpu() || c.final_logit_softcapping.is_some() {
            return None;
        }
        if live_table(&m.embed_tokens) || live_table(&m.lm_head) {
            return None;
        }
        let ok = c.head_dim % 2 == 0 && c.num_key_value_heads > 0 && c.num_attention_heads % c.num_key_value_heads == 0;
        if !ok || c.sliding_layers.len() != m.layers.len() {
            return None;
        }
        let mut layers = Vec::with_capacity(m.layers.len());
        for l in &m.layers {
            let a = &l.self_attn;
            let f = &l.mlp;
            layers.push(Layer {
                ln1: Raw::of(l.input_layernorm.scale())?,
                ln2: Raw::of(l.pre_feedforward_layernorm.scale())?,
                qk_norm: Some((Raw::of(a.q_norm.scale())?, Raw::of(a.k_norm.scale())?)),
                rope: true,
                rope_table: usize::from(!l.sliding),
                window: if l.sliding { c.sliding_window } else { None },
                post_attn: Some(Raw::of(l.post_attention_layernorm.scale())?),
                post_ff: Some(Raw::of(l.post_feedforward_layernorm.scale())?),
                fused: false,
                lins: lins_of([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &f.gate_proj, &f.up_proj, &f.down_proj], rows)?,
            });
        }
        Some(Plan {
            arch: Arch {
                vocab: c.vocab_size,
                h: c.hidden_size,
                nh: c.num_attention_heads,
                nkv: c.num_key_value_heads,
                hd: c.head_dim,
                inter: c.intermediate_size,
                max_pos: c.max_position_embeddings,
                device: m.device.clone(),
                inv_freq: vec![c.inv_freq(true), c.inv_freq(false)],
                rotary: c.head_dim,
                // `sqrt(hidden)` rounded to f32, as transformers' scaled embedding in f32.
                embed_scale: Some((c.hidden_size as f32).sqrt()),
                attn_scale: c.query_pre_attn_scalar.powf(-0.5) as f32,
                gelu: true,
            },
            layers,
            norm: Raw::of(m.norm.scale())?,
            head: head_of(&m.lm_head, c.vocab_size, c.hidden_size)?,
            embed: Raw::of(&m.embed_tokens.weight)?,
            eps: c.rms_norm_eps as f32,
            rope_of: None,
            _model: std::marker::PhantomData,
        })
    }

    /// The plan of a Phi-3 decoder (fused `qkv_proj` and `gate_up_proj`, see [`Layer::fused`];
    /// partial RoPE; longrope tables chosen per forward, [`Plan::rope_of`]; `sliding_window` on
    /// every layer), or `None` when it needs the general path (f16/bf16, a non-CPU device, an
    /// adapter the engine does not compute).
    fn of_phi3(m: &'m crate::model::phi3::Phi3ForCausalLM, rows: Option<Mixed<'_>>) -> Option<Plan<'m>> {
        let c = &m.config;
        if m.dtype != DType::F32 || !m.device.is_cpu() || crate::model::BaseModel::task(m) != Task::CausalLm {
            return None;
        }
        if live_table(&m.embed_tokens) || live_table(&m.lm_head) {
            return None;
        }
        let ok = c.num_key_value_heads > 0
            && c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
            && c.rotary_dim.is_multiple_of(2)
            && c.rotary_dim > 0
            && c.rotary_dim <= c.head_dim;
        if !ok {
            return None;
        }
        let (qd, kd, inter) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size);
        let mut layers = Vec::with_capacity(m.layers.len());
        for l in &m.layers {
            let a = &l.self_attn;
            let f = &l.mlp;
            let qkv = Lin::of(&a.qkv_proj, rows)?;
            let gate_up = Lin::of(&f.gate_up_proj, rows)?;
            if qkv.out != qd + 2 * kd || gate_up.out != 2 * inter {
                return None;
            }
            layers.push(Layer {
                ln1: Raw::of(&l.input_layernorm)?,
                ln2: Raw::of(&l.post_attention_layernorm)?,
                qk_norm: None,
                rope: true,
                rope_table: 0,
                window: c.sliding_window,
                post_attn: None,
                post_ff: None,
                fused: true,
                lins: [qkv, Lin::none(), Lin::none(), Lin::of(&a.o_proj, rows)?, gate_up, Lin::none(), Lin::of(&f.down_proj, rows)?],
            });
        }
        Some(Plan {
            arch: Arch {
                vocab: c.vocab_size,
                h: c.hidden_size,
                nh: c.num_attention_heads,
                nkv: c.num_key_value_heads,
                hd: c.head_dim,
                inter,
                max_pos: c.max_position_embeddings,
                device: m.device.clone(),
                // Unused: `rope_of` gives each forward's table.
                inv_freq: Vec::new(),
                rotary: c.rotary_dim,
                embed_scale: None,
                attn_scale: 1.0 / (c.head_dim as f32).sqrt(),
                gelu: false,
            },
            layers,
            norm: Raw::of(&m.norm)?,
            head: head_of(&m.lm_head, c.vocab_size, c.hidden_size)?,
            embed: Raw::of(&m.embed_tokens.weight)?,
            eps: c.rms_norm_eps as f32,
            rope_of: Some(c),
            _model: std::marker::PhantomData,
        })
    }
}

/// What the forward pass keeps of one LoRA adapter for the backward.
#[derive(Default)]
struct LoraAct {
    /// `scaling · dropout(x) Aᵀ`, `[T, r]`.
    h: Vec<f32>,
    /// Seed of the dropout mask (regenerated in the backward), when dropout is on.
    seed: Option<u64>,
}

/// Saved activations of one decoder layer.
#[derive(Default)]
struct LayerActs {
    /// Layer input `[T, H]`.
    x: Vec<f32>,
    rstd1: Vec<f32>,
    /// After RoPE: `[T, QD]`, `[T, KD]`; `v` `[T, KD]`.
    q: Vec<f32>,
    k: Vec<f32>,
    /// Qwen3: the projections before the per-head q/k RMSNorm (`[T, QD]`, `[T, KD]`) and its
    /// reciprocal RMS per head (`[T · heads]`, `[T · kv_heads]`).
    q_raw: Vec<f32>,
    k_raw: Vec<f32>,
    rstd_q: Vec<f32>,
    rstd_k: Vec<f32>,
    v: Vec<f32>,
    /// Attention probabilities `[b, heads, s, t]`.
    probs: Vec<f32>,
    /// Attention output before `o_proj`, `[T, QD]`.
    attn: Vec<f32>,
    /// Residual after attention, `[T, H]`.
    hmid: Vec<f32>,
    rstd2: Vec<f32>,
    /// Gate and up projections `[T, I]`.
    g: Vec<f32>,
    u: Vec<f32>,
    /// Gemma 3: `o_proj`'s and `down_proj`'s outputs `[T, H]` before their post-norms, and
    /// those norms' reciprocal RMS `[T]`.
    o_raw: Vec<f32>,
    rstd_po: Vec<f32>,
    d_raw: Vec<f32>,
    rstd_pf: Vec<f32>,
    lora: [Vec<LoraAct>; 7],
}

/// What gradient checkpointing keeps of one decoder layer between the forward and the backward:
/// its input and the dropout seeds its LoRA adapters drew, from which the backward recomputes
/// the layer's [`LayerActs`] (bit for bit) into one shared buffer.
#[derive(Default)]
struct LayerCheckpoint {
    /// Layer input `[T, H]`.
    x: Vec<f32>,
    /// Per linear module, per adapter: the dropout seed drawn by the forward.
    seeds: [Vec<Option<u64>>; 7],
}

/// What [`forward_layers`] keeps for a backward.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Nothing: all layers share one set of buffers (inference).
    Nothing,
    /// Every layer's activations.
    All,
    /// Gradient checkpointing: every layer's input and dropout seeds (`Workspace::ckpt`); the
    /// layers share one set of activation buffers.
    Inputs,
}

/// Buffers reused across steps (an arena): activations and scratch space.
#[derive(Default)]
struct Workspace {
    dims: Option<Dims>,
    acts: Vec<LayerActs>,
    /// Gradient checkpointing: what each layer keeps instead of its [`LayerActs`].
    ckpt: Vec<LayerCheckpoint>,
    /// Output of the last layer `[T, H]`.
    out: Vec<f32>,
    n: Vec<f32>,
    n2: Vec<f32>,
    tmp_h: Vec<f32>,
    act: Vec<f32>,
    gi: Vec<f32>,
    gq: Vec<f32>,
    gk: Vec<f32>,
    gv: Vec<f32>,
    /// Qwen3: gradients of the q/k projections' outputs (before the per-head RMSNorm).
    gq_raw: Vec<f32>,
    gk_raw: Vec<f32>,
    gattn: Vec<f32>,
    g: Vec<f32>,
    gn: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// The second RoPE table (Gemma 3's full-attention layers).
    cos2: Vec<f32>,
    sin2: Vec<f32>,
    /// Gemma 3: the gradient of a post-normed branch (`o_proj` or `down_proj` output) `[T, H]`.
    gpost: Vec<f32>,
    rstd_f: Vec<f32>,
    drop_x: Vec<f32>,
    drop_m: Vec<f32>,
    lora_tmp: Vec<f32>,
    lora_bt: Vec<f32>,
    lora_tmp2: Vec<f32>,
    logits: Vec<f32>,
    hc: Vec<f32>,
    ghc: Vec<f32>,
    /// Phi-3 ([`Layer::fused`]): the fused `qkv_proj` output `[T, QD + 2·KD]` and `gate_up_proj`
    /// output `[T, 2·I]`, or their gradients in the backward.
    fused_qkv: Vec<f32>,
    fused_gu: Vec<f32>,
}

/// The token ranges `(first, count)` of the maximal runs of selected batch rows (`s` tokens
/// per row, row-major tokens).
fn row_runs(sel: &[bool], s: usize) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut r = 0;
    while r < sel.len() {
        if !sel[r] {
            r += 1;
            continue;
        }
        let r0 = r;
        while r < sel.len() && sel[r] {
            r += 1;
        }
        runs.push((r0 * s, (r - r0) * s));
    }
    runs
}

/// Copies the column blocks of `src` (`[tk, Σ wᵢ]`, row-major) into `parts` (`[tk, wᵢ]` each,
/// in order): a fused linear's output split into its parts ([`Layer::fused`]).
fn split_cols(src: &[f32], tk: usize, parts: &mut [&mut [f32]]) {
    if tk == 0 {
        return;
    }
    let width = src.len() / tk;
    let mut off = 0;
    for p in parts.iter_mut() {
        let w = p.len() / tk;
        if w > 0 {
            for (dst, row) in p.chunks_exact_mut(w).zip(src.chunks_exact(width)) {
                dst.copy_from_slice(&row[off..off + w]);
            }
        }
        off += w;
    }
}

/// The inverse of [`split_cols`]: `parts` (`[tk, wᵢ]` each) side by side into `dst`
/// (`[tk, Σ wᵢ]`): the parts' gradients joined into the fused linear's output gradient.
fn join_cols(parts: &[&[f32]], tk: usize, dst: &mut [f32]) {
    if tk == 0 {
        return;
    }
    let width = dst.len() / tk;
    let mut off = 0;
    for p in parts {
        let w = p.len() / tk;
        if w > 0 {
            for (src, row) in p.chunks_exact(w).zip(dst.chunks_exact_mut(width)) {
                row[off..off + w].copy_from_slice(src);
            }
        }
        off += w;
    }
}

/// A buffer of exactly `n` elements, reusing the allocation (contents unspecified).
fn buf(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() != n {
        v.clear();
        v.resize(n, 0.0);
    }
    &mut v[..]
}

/// The process's reusable workspaces: one for training steps, one for inference (so that an
/// evaluation between steps does not evict the training buffers). A caller that finds one busy
/// (two models working at once) uses a temporary workspace.
fn workspace_slot(train: bool) -> &'static Mutex<Workspace> {
    static TRAIN: std::sync::OnceLock<Mutex<Workspace>> = std::sync::OnceLock::new();
    static INFER: std::sync::OnceLock<Mutex<Workspace>> = std::sync::OnceLock::new();
    (if train { &TRAIN } else { &INFER }).get_or_init(|| Mutex::new(Workspace::default()))
}

/// Locks the workspace of `train`, or gives a fresh one when it is busy; resets it when the
/// shapes changed (so that two sizes are never kept alive).
fn with_workspace<R>(train: bool, d: Dims, f: impl FnOnce(&mut Workspace) -> R) -> R {
    let mut guard = workspace_slot(train).try_lock();
    let mut own = Workspace::default();
    let ws: &mut Workspace = match guard.as_mut() {
        Ok(g) => g,
        Err(_) => &mut own,
    };
    // The prefix length alone (a KV cache growing by one position per decoding step) does not
    // reset the buffers: `buf` resizes each one as it is used.
    if ws.dims.map(|w| Dims { p: 0, ..w }) != Some(Dims { p: 0, ..d }) {
        *ws = Workspace {
            dims: Some(d),
            ..Default::default()
        };
    }
    f(ws)
}

/// Per-token masking facts for attention.
struct MaskInfo {
    /// `[b, t]` key mask (1 = attend), `None` = all ones.
    keys: Option<Vec<u8>>,
    /// Per (b, i): number of key columns the row may see before masking holes
    /// (`P + i + 1`), or `t` for a row whose every key is masked (candle's softmax then spreads
    /// evenly over the whole row).
    limit: Vec<usize>,
    /// Per (b, i): whether every key is masked.
    dead: Vec<bool>,
    /// Per b: whether the row has masked keys inside its causal window (holes to zero).
    holes: Vec<bool>,
    /// Per (b, i): the first key column inside a sliding window (Gemma 3's sliding layers:
    /// keys at positions `> P + i - window`); all 0 without a window.
    lo: Vec<usize>,
}

impl MaskInfo {
    /// The masks of `d`'s attention: causal, the key mask `keys` (`[b, t]`), and with `window`
    /// a sliding window over key positions (as `windowed_causal_mask` builds it for the general
    /// path: key `j` is seen by query `i` when `j ≤ P + i` and `j + window > P + i`).
    fn new(d: &Dims, keys: Option<Vec<u8>>, window: Option<usize>) -> MaskInfo {
        let (b, s, p, t) = (d.b, d.s, d.p, d.t());
        let mut limit = vec![0; b * s];
        let mut dead = vec![false; b * s];
        let mut holes = vec![false; b];
        let mut lo = vec![0; b * s];
        for bi in 0..b {
            let km = keys.as_ref().map(|k| &k[bi * t..(bi + 1) * t]);
            holes[bi] = km.is_some_and(|k| k.contains(&0));
            // `seen[j]`: unmasked keys among columns 0..j (a prefix count).
            let mut seen = vec![0usize; t + 1];
            for j in 0..t {
                seen[j + 1] = seen[j] + usize::from(km.map(|k| k[j] != 0).unwrap_or(true));
            }
            for i in 0..s {
                let idx = bi * s + i;
                let first = window.map(|w| (p + i + 1).saturating_sub(w)).unwrap_or(0);
                let visible = seen[p + i + 1] - seen[first];
                lo[idx] = first;
                dead[idx] = visible == 0;
                limit[idx] = if visible == 0 { t } else { p + i + 1 };
            }
        }
        MaskInfo {
            keys,
            limit,
            dead,
            holes,
            lo,
        }
    }
}

/// Row-parallel wrappers of the [`simd`] kernels: the rows are split into one chunk per thread
/// of the current pool (these kernels are memory-bound; one thread would leave a core idle).
mod par {
    use super::simd;
    use rayon::prelude::*;

    /// Rows per chunk for `rows` rows.
    fn per(rows: usize) -> usize {
        rows.div_ceil(rayon::current_num_threads()).max(1)
    }

    pub fn rms_norm_fwd(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
        let d = w.len();
        let p = per(rstd.len());
        y.par_chunks_mut(p * d)
            .zip(rstd.par_chunks_mut(p))
            .zip(x.par_chunks(p * d))
            .for_each(|((y, r), x)| simd::rms_norm_fwd(x, w, eps, y, r));
    }

    pub fn rms_norm_apply(x: &[f32], w: &[f32], rstd: &[f32], y: &mut [f32]) {
        let d = w.len();
        let p = per(rstd.len());
        y.par_chunks_mut(p * d)
            .zip(rstd.par_chunks(p))
            .zip(x.par_chunks(p * d))
            .for_each(|((y, r), x)| simd::rms_norm_apply(x, w, r, y));
    }

    pub fn rms_norm_bwd_acc(x: &[f32], w: &[f32], rstd: &[f32], gy: &[f32], gx: &mut [f32]) {
        let d = w.len();
        let p = per(rstd.len());
        gx.par_chunks_mut(p * d)
            .zip(rstd.par_chunks(p))
            .zip(x.par_chunks(p * d).zip(gy.par_chunks(p * d)))
            .for_each(|((gx, r), (x, gy))| simd::rms_norm_bwd_acc(x, w, r, gy, gx));
    }

    /// RoPE on the first `rd` dimensions of each head ([`simd::rope_inplace`]).
    pub fn rope_inplace(
        x: &mut [f32],
        cos: &[f32],
        sin: &[f32],
        heads: usize,
        hd: usize,
        rd: usize,
        sign: f32,
    ) {
        let half = rd / 2;
        let rows = cos.len() / half;
        let p = per(rows);
        x.par_chunks_mut(p * heads * hd)
            .zip(cos.par_chunks(p * half).zip(sin.par_chunks(p * half)))
            .for_each(|(x, (c, s))| simd::rope_inplace(x, c, s, heads, hd, rd, sign));
    }

    /// Elementwise kernels: chunks of whole cache lines per thread; one chunk (no hand-off to
    /// another thread, which costs more than it saves) below `SMALL` elements (decoding).
    fn per_elems(n: usize) -> usize {
        const SMALL: usize = 1 << 14;
        if n < SMALL {
            return n.max(1);
        }
        n.div_ceil(rayon::current_num_threads()).div_ceil(16).max(1) * 16
    }

    pub fn silu_mul(g: &[f32], u: &[f32], a: &mut [f32]) {
        let p = per_elems(a.len());
        a.par_chunks_mut(p)
            .zip(g.par_chunks(p).zip(u.par_chunks(p)))
            .for_each(|(a, (g, u))| simd::silu_mul(g, u, a));
    }

    pub fn silu_mul_bwd_inplace(g: &mut [f32], u: &mut [f32], ga: &[f32]) {
        let p = per_elems(ga.len());
        g.par_chunks_mut(p)
            .zip(u.par_chunks_mut(p))
            .zip(ga.par_chunks(p))
            .for_each(|((g, u), ga)| simd::silu_mul_bwd_inplace(g, u, ga));
    }

    /// The gated MLP's activation: `a = act(g) · u` with SiLU (SwiGLU) or, with `gelu`, the
    /// tanh-approximated GELU (GeGLU).
    pub fn glu(gelu: bool, g: &[f32], u: &[f32], a: &mut [f32]) {
        if !gelu {
            return silu_mul(g, u, a);
        }
        let p = per_elems(a.len());
        a.par_chunks_mut(p)
            .zip(g.par_chunks(p).zip(u.par_chunks(p)))
            .for_each(|(a, (g, u))| simd::gelu_tanh_mul(g, u, a));
    }

    /// Backward of [`glu`], in place as [`silu_mul_bwd_inplace`].
    pub fn glu_bwd_inplace(gelu: bool, g: &mut [f32], u: &mut [f32], ga: &[f32]) {
        if !gelu {
            return silu_mul_bwd_inplace(g, u, ga);
        }
        let p = per_elems(ga.len());
        g.par_chunks_mut(p)
            .zip(u.par_chunks_mut(p))
            .zip(ga.par_chunks(p))
            .for_each(|((g, u), ga)| simd::gelu_tanh_mul_bwd_inplace(g, u, ga));
    }

    pub fn add_to(a: &[f32], b: &[f32], y: &mut [f32]) {
        let p = per_elems(y.len());
        y.par_chunks_mut(p)
            .zip(a.par_chunks(p).zip(b.par_chunks(p)))
            .for_each(|(y, (a, b))| simd::add_to(a, b, y));
    }
}

/// Optional phase timer (`PEFT_ENGINE_PROFILE=1` prints each step's breakdown to stderr).
struct Prof {
    on: bool,
    ns: [std::sync::atomic::AtomicU64; PHASES.len()],
}

const PHASES: [&str; 9] = [
    "fwd base GEMM",
    "fwd LoRA",
    "fwd attention",
    "fwd norm/rope/act",
    "lm_head+CE",
    "bwd base GEMM",
    "bwd LoRA",
    "bwd attention",
    "bwd norm/rope/act",
];
const P_FWD_LIN: usize = 0;
const P_FWD_LORA: usize = 1;
const P_FWD_ATTN: usize = 2;
const P_FWD_ELT: usize = 3;
const P_HEAD: usize = 4;
const P_BWD_LIN: usize = 5;
const P_BWD_LORA: usize = 6;
const P_BWD_ATTN: usize = 7;
const P_BWD_ELT: usize = 8;

impl Prof {
    fn new() -> Prof {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| std::env::var("PEFT_ENGINE_PROFILE").is_ok_and(|v| v != "0"));
        Prof {
            on,
            ns: Default::default(),
        }
    }
    fn start(&self) -> Option<std::time::Instant> {
        self.on.then(std::time::Instant::now)
    }
    fn add(&self, phase: usize, t: Option<std::time::Instant>) {
        if let Some(t) = t {
            self.ns[phase].fetch_add(
                t.elapsed().as_nanos() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }
    fn report(&self, what: &str) {
        if !self.on {
            return;
        }
        let v: Vec<u64> = self
            .ns
            .iter()
            .map(|a| a.load(std::sync::atomic::Ordering::Relaxed))
            .collect();
        let total: u64 = v.iter().sum();
        let parts: Vec<String> = PHASES
            .iter()
            .zip(&v)
            .map(|(n, &x)| format!("{n} {:.1} ms", x as f64 / 1e6))
            .collect();
        eprintln!(
            "[peft-engine] {what}: {:.1} ms: {}",
            total as f64 / 1e6,
            parts.join(", ")
        );
    }
}

/// Rows per attention block (the causal triangle is skipped per block).
const RB: usize = 32;

/// A pointer that may cross threads; users write disjoint regions only.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: every user writes a region no other task touches.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `SendPtr`).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// Prefix keys/values for one layer: the first `P` positions of `[b, kv_heads, cap, hd]` each
/// (`cap = P` for prefix tuning; a KV cache's capacity while decoding).
struct Prefix {
    k: Raw,
    v: Raw,
    cap: usize,
}

struct Step {
    prof: Prof,
    d: Dims,
    /// Training: LoRA dropout is applied.
    train: bool,
    mask: MaskInfo,
    /// The masks of the sliding-window layers (Gemma 3), and which layers use them.
    mask_w: Option<MaskInfo>,
    windowed: Vec<bool>,
    /// Attention scores' scale ([`Arch::attn_scale`]).
    attn_scale: f32,
    threads: usize,
    rng: Option<Arc<Mutex<rand::rngs::StdRng>>>,
    prefix: Vec<Prefix>,
    /// Gradient checkpointing's recomputation of a layer: LoRA dropout reuses the seeds in the
    /// layer's [`LoraAct::seed`] (those of its first forward) instead of drawing new ones.
    replay: std::sync::atomic::AtomicBool,
}

impl Step {
    /// The step's masks for layer `l`'s attention, and its attention settings taken from `plan`.
    fn masks(plan: &Plan, d: &Dims, keys: Option<Vec<u8>>) -> (MaskInfo, Option<MaskInfo>, Vec<bool>) {
        let window = plan.layers.iter().find_map(|l| l.window);
        // A window no query can reach past (every key within it) changes nothing.
        let window = window.filter(|&w| w < d.t());
        let windowed: Vec<bool> = plan.layers.iter().map(|l| window.is_some() && l.window.is_some()).collect();
        let mask_w = window.map(|w| MaskInfo::new(d, keys.clone(), Some(w)));
        (MaskInfo::new(d, keys, None), mask_w, windowed)
    }

    fn mask_for(&self, l: usize) -> &MaskInfo {
        match (&self.mask_w, self.windowed.get(l)) {
            (Some(m), Some(true)) => m,
            _ => &self.mask,
        }
    }

    /// `y = x Wᵀ + b + Σ scaling · (dropout(x) Aᵀ) Bᵀ`, saving each adapter's `[T, r]` product.
    fn lin_fwd(
        &self,
        lin: &Lin,
        x: &[f32],
        y: &mut [f32],
        saves: &mut Vec<LoraAct>,
        drop_x: &mut Vec<f32>,
    ) {
        let t = self.d.tok();
        let t0 = self.prof.start();
        match (&lin.q, &lin.w) {
            (Some(q), _) => {
                // Shapes agree by construction (Lin::of checks q against [out, in], the step's
                // buffers are [T, in] / [T, out]); a mismatch would leave NaN, never garbage.
                if q.matmul_t(&x[..t * lin.inp], t, &mut y[..t * lin.out], false).is_err() {
                    y.fill(f32::NAN);
                }
            }
            (None, Some(w)) => gemm(
                &mut Dst::of(y, t, lin.out),
                View::of(x, t, lin.inp),
                View::of(w.get(), lin.out, lin.inp).t(),
                1.0,
                false,
                self.threads,
            ),
            (None, None) => y.fill(f32::NAN),
        }
        if let Some(b) = &lin.bias {
            simd::add_bias(y, b.get());
        }
        self.prof.add(P_FWD_LIN, t0);
        let t0 = self.prof.start();
        saves.resize_with(lin.loras.len(), LoraAct::default);
        for (lo, sv) in lin.loras.iter().zip(saves.iter_mut()) {
            let h = buf(&mut sv.h, t * lo.r);
            let xin: &[f32] = if self.train && lo.dropout > 0.0 {
                let replayed = sv.seed.filter(|_| self.replay.load(std::sync::atomic::Ordering::Relaxed));
                let seed = replayed.unwrap_or_else(|| super::dropout_seed(self.rng.as_deref()));
                sv.seed = Some(seed);
                let dx = buf(drop_x, t * lin.inp);
                super::dropout_mask(seed, lo.dropout, dx);
                for (o, &v) in dx.iter_mut().zip(x) {
                    *o *= v;
                }
                dx
            } else {
                sv.seed = None;
                x
            };
            // Token ranges the adapter applies to: all, or the runs of its batch rows.
            let runs: Vec<(usize, usize)> = match &lo.rows {
                None => vec![(0, t)],
                Some(sel) => row_runs(sel, self.d.s),
            };
            for (r0, n) in runs {
                gemm(
                    &mut Dst::of(h, t, lo.r).rows(r0, n),
                    View::of(xin, t, lin.inp).rows(r0, n),
                    View::of(lo.a.get(), lo.r, lin.inp).t(),
                    lo.scaling,
                    false,
                    self.threads,
                );
                gemm(
                    &mut Dst::of(y, t, lin.out).rows(r0, n),
                    View::of(h, t, lo.r).rows(r0, n),
                    View::of(lo.b.get(), lin.out, lo.r).t(),
                    1.0,
                    true,
                    self.threads,
                );
            }
        }
        self.prof.add(P_FWD_LORA, t0);
    }

    /// Decoding through kept-quantized weights: the linears in `lins` share their input `x`
    /// (q/k/v, gate/up; or one linear alone, o and down), so their base products, biases and LoRA `h·Bᵀ` terms run as one
    /// [`super::quant::matmul_t_multi`] (one activation quantization and one pass over the pool
    /// instead of one per linear, and the adapters' `B` side shared out over the threads with
    /// the base rows), giving the same numbers as one [`Self::lin_fwd`] each. Returns false,
    /// doing nothing, where that route does not apply: a linear not kept quantized, more than 4
    /// tokens, LoRA dropout in training, or a mixed batch.
    fn lin_fwd_shared(&self, lins: &[&Lin], x: &[f32], ys: &mut [&mut [f32]], saves: &mut [&mut Vec<LoraAct>]) -> bool {
        let t = self.d.tok();
        if t > 4
            || super::ab_flags() & super::AB_SEPARATE_DECODE_PRODUCTS != 0
            || lins
                .iter()
                .any(|l| l.q.is_none() || l.loras.iter().any(|lo| lo.rows.is_some() || (self.train && lo.dropout > 0.0)))
        {
            return false;
        }
        let t0 = self.prof.start();
        // h = scaling · x Aᵀ for every adapter, as lin_fwd computes it.
        for (lin, sv) in lins.iter().zip(saves.iter_mut()) {
            sv.resize_with(lin.loras.len(), LoraAct::default);
            for (lo, a) in lin.loras.iter().zip(sv.iter_mut()) {
                a.seed = None;
                gemm(
                    &mut Dst::of(buf(&mut a.h, t * lo.r), t, lo.r),
                    View::of(x, t, lin.inp),
                    View::of(lo.a.get(), lo.r, lin.inp).t(),
                    lo.scaling,
                    false,
                    self.threads,
                );
            }
        }
        let mut parts: Vec<super::quant::MultiPart> = Vec::with_capacity(lins.len());
        for ((lin, y), sv) in lins.iter().zip(ys.iter_mut()).zip(saves.iter()) {
            let Some(w) = lin.q.as_deref() else { return false };
            parts.push(super::quant::MultiPart {
                w,
                y: &mut y[..t * lin.out],
                bias: lin.bias.as_ref().map(|b| b.get()),
                lora: lin.loras.iter().zip(sv.iter()).map(|(lo, a)| (&a.h[..], lo.b.get(), lo.r)).collect(),
            });
        }
        // Shapes agree by construction (see lin_fwd); a mismatch would leave NaN, never garbage.
        if super::quant::matmul_t_multi(&x[..t * lins[0].inp], t, &mut parts, false).is_err() {
            for p in parts {
                p.y.fill(f32::NAN);
            }
        }
        self.prof.add(P_FWD_LIN, t0);
        true
    }

    /// Linears sharing the input `x`: one [`Self::lin_fwd_shared`] product where it applies,
    /// else one [`Self::lin_fwd`] each.
    fn lin_fwd_group(&self, lins: &[&Lin], x: &[f32], ys: &mut [&mut [f32]], saves: &mut [&mut Vec<LoraAct>], drop_x: &mut Vec<f32>) {
        if !self.lin_fwd_shared(lins, x, ys, saves) {
            for ((lin, y), sv) in lins.iter().zip(ys.iter_mut()).zip(saves.iter_mut()) {
                self.lin_fwd(lin, x, y, sv, drop_x);
            }
        }
    }

    /// Backward of [`Self::lin_fwd`]: `gx (+)= gy W + Σ scaling · mask ⊙ (gy B) A`, and the
    /// adapters' gradients `∂B = gyᵀ h`, `∂A = scaling · (gy B)ᵀ dropout(x)`. With `need_gx`
    /// false only the adapters' gradients are computed (`gx` is left as it is).
    #[allow(clippy::too_many_arguments)]
    fn lin_bwd(
        &self,
        lin: &Lin,
        gy: &[f32],
        x: &[f32],
        gx: &mut [f32],
        acc: bool,
        need_gx: bool,
        saves: &[LoraAct],
        grads: &mut Vec<(Var, Vec<f32>)>,
        ws: &mut Scratch,
    ) {
        let t = self.d.tok();
        let t0 = self.prof.start();
        match (&lin.q, &lin.w) {
            _ if !need_gx => {}
            (Some(q), _) => {
                // See lin_fwd: shapes agree by construction.
                if q.matmul(&gy[..t * lin.out], t, &mut gx[..t * lin.inp], acc).is_err() {
                    gx.fill(f32::NAN);
                }
            }
            (None, Some(w)) => gemm(
                &mut Dst::of(gx, t, lin.inp),
                View::of(gy, t, lin.out),
                View::of(w.get(), lin.out, lin.inp),
                1.0,
                acc,
                self.threads,
            ),
            (None, None) => gx.fill(f32::NAN),
        }
        self.prof.add(P_BWD_LIN, t0);
        let t0 = self.prof.start();
        for (lo, sv) in lin.loras.iter().zip(saves) {
            let mut gb = vec![0f32; lin.out * lo.r];
            let tmp = buf(&mut ws.lora_tmp, t * lo.r);
            if super::ab_flags() & super::AB_GEMM_CRATE_NARROW != 0 {
                gemm(&mut Dst::of(&mut gb, lin.out, lo.r), View::of(gy, t, lin.out).t(), View::of(&sv.h, t, lo.r), 1.0, false, self.threads);
                gemm(&mut Dst::of(tmp, t, lo.r), View::of(gy, t, lin.out), View::of(lo.b.get(), lin.out, lo.r), 1.0, false, self.threads);
            } else {
                // `∂Bᵀ = hᵀ·gy` ([r, T]·[T, out]: a wide product, 3-4× faster in the `gemm` crate
                // than the narrow `gyᵀ·h`), transposed into `∂B` `[out, r]`.
                let gbt = buf(&mut ws.lora_bt, lo.r * lin.out);
                gemm(&mut Dst::of(gbt, lo.r, lin.out), View::of(&sv.h, t, lo.r).t(), View::of(gy, t, lin.out), 1.0, false, self.threads);
                for (o, row) in gb.chunks_exact_mut(lo.r).enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = gbt[j * lin.out + o];
                    }
                }
                // `gy·B` as `gy·(Bᵀ)ᵀ` with `Bᵀ` `[r, out]` in rows: the narrow dot-product kernel.
                let bt = buf(&mut ws.lora_bt, lo.r * lin.out);
                for (o, row) in lo.b.get().chunks_exact(lo.r).enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        bt[j * lin.out + o] = v;
                    }
                }
                gemm(&mut Dst::of(tmp, t, lo.r), View::of(gy, t, lin.out), View::of(bt, lo.r, lin.out).t(), 1.0, false, self.threads);
            }
            let mut ga = vec![0f32; lo.r * lin.inp];
            match sv.seed {
                Some(seed) => {
                    let m = buf(&mut ws.drop_m, t * lin.inp);
                    super::dropout_mask(seed, lo.dropout, m);
                    let dx = buf(&mut ws.drop_x, t * lin.inp);
                    simd::mul_to(x, m, dx);
                    gemm(
                        &mut Dst::of(&mut ga, lo.r, lin.inp),
                        View::of(tmp, t, lo.r).t(),
                        View::of(dx, t, lin.inp),
                        lo.scaling,
                        false,
                        self.threads,
                    );
                    let t2 = buf(&mut ws.lora_tmp2, t * lin.inp);
                    if need_gx {
                        gemm(
                        &mut Dst::of(t2, t, lin.inp),
                        View::of(tmp, t, lo.r),
                        View::of(lo.a.get(), lo.r, lin.inp),
                        1.0,
                        false,
                        self.threads,
                    );
                    }
                    if need_gx {
                        simd::mul_acc(t2, m, lo.scaling, gx);
                    }
                }
                None => {
                    gemm(
                        &mut Dst::of(&mut ga, lo.r, lin.inp),
                        View::of(tmp, t, lo.r).t(),
                        View::of(x, t, lin.inp),
                        lo.scaling,
                        false,
                        self.threads,
                    );
                    if need_gx {
                        gemm(
                        &mut Dst::of(gx, t, lin.inp),
                        View::of(tmp, t, lo.r),
                        View::of(lo.a.get(), lo.r, lin.inp),
                        lo.scaling,
                        true,
                        self.threads,
                    );
                    }
                }
            }
            grads.push((lo.var_a.clone(), ga));
            grads.push((lo.var_b.clone(), gb));
        }
        self.prof.add(P_BWD_LORA, t0);
    }

    /// Causal (grouped-query) attention of one layer: `probs = softmax(q kᵀ / sqrt(hd) + mask)`,
    /// `attn = probs v`, with the prefix keys/values in front of the real ones.
    fn attn_fwd(
        &self,
        l: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        probs: &mut [f32],
        attn: &mut [f32],
    ) {
        let d = self.d;
        let (s, p, t, hd, qd, kd) = (d.s, d.p, d.t(), d.hd, d.qd(), d.kd());
        let rep = d.nh / d.nkv;
        let scale = self.attn_scale;
        let mask = self.mask_for(l);
        let probs_p = SendPtr(probs.as_mut_ptr());
        let attn_p = SendPtr(attn.as_mut_ptr());
        let attn_len = attn.len();
        let pre = self.prefix.get(l);
        (0..d.b * d.nh).into_par_iter().for_each(|bh| {
            let (bi, h) = (bh / d.nh, bh % d.nh);
            let g = h / rep;
            let qv = View::rm(q, bi * s * qd + h * hd, s, hd, qd);
            let kv = View::rm(k, bi * s * kd + g * hd, s, hd, kd);
            let vv = View::rm(v, bi * s * kd + g * hd, s, hd, kd);
            let pk = pre.map(|x| View::rm(x.k.get(), (bi * d.nkv + g) * x.cap * hd, p, hd, hd));
            let pv = pre.map(|x| View::rm(x.v.get(), (bi * d.nkv + g) * x.cap * hd, p, hd, hd));
            // SAFETY: task (bi, h) owns probs[(bi·nh + h)·s·t ..][..s·t] and the column block h
            // of rows bi·s .. (bi+1)·s of `attn`.
            let pr =
                unsafe { std::slice::from_raw_parts_mut(probs_p.ptr().add(bh * s * t), s * t) };
            assert!(bi * s * qd + (s - 1) * qd + h * hd + hd <= attn_len);
            let mut out = unsafe { Dst::raw(attn_p.ptr().add(bi * s * qd + h * hd), s, hd, qd) };
            let keys = mask.keys.as_ref().map(|km| &km[bi * t..(bi + 1) * t]);
            for i0 in (0..s).step_by(RB) {
                let n = RB.min(s - i0);
                let lim = (i0..i0 + n)
                    .map(|i| mask.limit[bi * s + i])
                    .max()
                    .unwrap_or(t);
                let mut sc = Dst::rm(pr, i0 * t, n, t, t);
                if let Some(pk) = pk {
                    gemm_f32(&mut sc.cols(0, p), qv.rows(i0, n), pk.t(), scale, false, 1);
                }
                gemm_f32(
                    &mut sc.cols(p, lim - p),
                    qv.rows(i0, n),
                    kv.rows(0, lim - p).t(),
                    scale,
                    false,
                    1,
                );
                for i in i0..i0 + n {
                    let row = &mut pr[i * t..(i + 1) * t];
                    let idx = bi * s + i;
                    if mask.dead[idx] {
                        simd::softmax_prefix(row, 0);
                        continue;
                    }
                    let valid = mask.limit[idx];
                    let lo = mask.lo[idx];
                    let km = keys.filter(|_| mask.holes[bi]);
                    if km.is_some() || lo > 0 {
                        // Keys outside the window or masked: f32::MIN for the softmax (exp
                        // underflows to 0, as the general path's additive mask), then exactly 0.
                        let masked = |j: usize| j < lo || km.is_some_and(|k| k[j] == 0);
                        for (j, x) in row[..valid].iter_mut().enumerate() {
                            if masked(j) {
                                *x = f32::MIN;
                            }
                        }
                        simd::softmax_prefix(row, valid);
                        for (j, x) in row[..valid].iter_mut().enumerate() {
                            if masked(j) {
                                *x = 0.0;
                            }
                        }
                    } else {
                        simd::softmax_prefix(row, valid);
                    }
                }
                let pview = View::rm(pr, i0 * t, n, t, t);
                let mut ob = out.rows(i0, n);
                match pv {
                    Some(pv) => {
                        gemm_f32(&mut ob, pview.cols(0, p), pv, 1.0, false, 1);
                        gemm_f32(
                            &mut ob,
                            pview.cols(p, lim - p),
                            vv.rows(0, lim - p),
                            1.0,
                            true,
                            1,
                        );
                    }
                    None => gemm_f32(&mut ob, pview.cols(0, lim), vv.rows(0, lim), 1.0, false, 1),
                }
            }
        });
    }

    /// Backward of [`Self::attn_fwd`], in parallel over (batch, kv head): `gq` is overwritten,
    /// `gk`, `gv` and the prefix gradients `gpk`, `gpv` (`[b, kv_heads, P, hd]`) are zeroed and
    /// accumulated over the heads of each group.
    #[allow(clippy::too_many_arguments)]
    fn attn_bwd(
        &self,
        l: usize,
        a: &LayerActs,
        gattn: &[f32],
        gq: &mut [f32],
        gk: &mut [f32],
        gv: &mut [f32],
        gpk: &mut [f32],
        gpv: &mut [f32],
    ) {
        let d = self.d;
        let (s, p, t, hd, qd, kd) = (d.s, d.p, d.t(), d.hd, d.qd(), d.kd());
        let rep = d.nh / d.nkv;
        let scale = self.attn_scale;
        let mask = self.mask_for(l);
        gk.fill(0.0);
        gv.fill(0.0);
        gpk.fill(0.0);
        gpv.fill(0.0);
        let (gq_p, gk_p, gv_p, gpk_p, gpv_p) = (
            SendPtr(gq.as_mut_ptr()),
            SendPtr(gk.as_mut_ptr()),
            SendPtr(gv.as_mut_ptr()),
            SendPtr(gpk.as_mut_ptr()),
            SendPtr(gpv.as_mut_ptr()),
        );
        let (q, k, v, probs) = (&a.q[..], &a.k[..], &a.v[..], &a.probs[..]);
        let pre = self.prefix.get(l);
        (0..d.b * d.nkv).into_par_iter().for_each(|bg| {
            let (bi, g) = (bg / d.nkv, bg % d.nkv);
            let kv = View::rm(k, bi * s * kd + g * hd, s, hd, kd);
            let vv = View::rm(v, bi * s * kd + g * hd, s, hd, kd);
            let pk = pre.map(|x| View::rm(x.k.get(), (bi * d.nkv + g) * x.cap * hd, p, hd, hd));
            let pv = pre.map(|x| View::rm(x.v.get(), (bi * d.nkv + g) * x.cap * hd, p, hd, hd));
            // SAFETY: task (bi, g) owns the column block g of rows bi·s .. (bi+1)·s of gk / gv,
            // the prefix gradient block (bi, g), and the column blocks of its heads in gq.
            let mut gkd = unsafe { Dst::raw(gk_p.ptr().add(bi * s * kd + g * hd), s, hd, kd) };
            let mut gvd = unsafe { Dst::raw(gv_p.ptr().add(bi * s * kd + g * hd), s, hd, kd) };
            let mut gpkd =
                unsafe { Dst::raw(gpk_p.ptr().add((bi * d.nkv + g) * p * hd), p, hd, hd) };
            let mut gpvd =
                unsafe { Dst::raw(gpv_p.ptr().add((bi * d.nkv + g) * p * hd), p, hd, hd) };
            let mut gp = vec![0f32; RB * t];
            for h in g * rep..(g + 1) * rep {
                let qv = View::rm(q, bi * s * qd + h * hd, s, hd, qd);
                let go = View::rm(gattn, bi * s * qd + h * hd, s, hd, qd);
                let mut gqd = unsafe { Dst::raw(gq_p.ptr().add(bi * s * qd + h * hd), s, hd, qd) };
                let pr = &probs[(bi * d.nh + h) * s * t..][..s * t];
                for i0 in (0..s).step_by(RB) {
                    let n = RB.min(s - i0);
                    let lim = (i0..i0 + n)
                        .map(|i| mask.limit[bi * s + i])
                        .max()
                        .unwrap_or(t);
                    let pview = View::rm(pr, i0 * t, n, t, t);
                    let mut gpd = Dst::rm(&mut gp, 0, n, t, t);
                    if let Some(pv) = pv {
                        gemm_f32(&mut gpd.cols(0, p), go.rows(i0, n), pv.t(), 1.0, false, 1);
                    }
                    gemm_f32(
                        &mut gpd.cols(p, lim - p),
                        go.rows(i0, n),
                        vv.rows(0, lim - p).t(),
                        1.0,
                        false,
                        1,
                    );
                    for r in 0..n {
                        simd::softmax_bwd_inplace(
                            &pr[(i0 + r) * t..(i0 + r) * t + lim],
                            &mut gp[r * t..r * t + lim],
                            scale,
                        );
                    }
                    let gs = View::rm(&gp, 0, n, t, t);
                    let mut gqb = gqd.rows(i0, n);
                    match pk {
                        Some(pk) => {
                            gemm_f32(&mut gqb, gs.cols(0, p), pk, 1.0, false, 1);
                            gemm_f32(
                                &mut gqb,
                                gs.cols(p, lim - p),
                                kv.rows(0, lim - p),
                                1.0,
                                true,
                                1,
                            );
                        }
                        None => gemm_f32(&mut gqb, gs.cols(0, lim), kv.rows(0, lim), 1.0, false, 1),
                    }
                    let qb = qv.rows(i0, n);
                    let gob = go.rows(i0, n);
                    gemm_f32(
                        &mut gkd.rows(0, lim - p),
                        gs.cols(p, lim - p).t(),
                        qb,
                        1.0,
                        true,
                        1,
                    );
                    gemm_f32(
                        &mut gvd.rows(0, lim - p),
                        pview.cols(p, lim - p).t(),
                        gob,
                        1.0,
                        true,
                        1,
                    );
                    if p > 0 {
                        gemm_f32(&mut gpkd, gs.cols(0, p).t(), qb, 1.0, true, 1);
                        gemm_f32(&mut gpvd, pview.cols(0, p).t(), gob, 1.0, true, 1);
                    }
                }
            }
        });
    }
}

/// Scratch buffers handed to the linear backward.
struct Scratch {
    /// `[r, out]`: `∂Bᵀ`, then `Bᵀ` (LoRA backward).
    lora_bt: Vec<f32>,
    drop_x: Vec<f32>,
    drop_m: Vec<f32>,
    lora_tmp: Vec<f32>,
    lora_tmp2: Vec<f32>,
}

/// Fills the RoPE tables `[T, rotary / 2]` for `positions` (`[T]`), as
/// `LlamaForCausalLM::forward_embeds` does: `ws.cos` / `ws.sin` from the first of
/// [`Arch::inv_freq`], `ws.cos2` / `ws.sin2` from the second. With [`Plan::rope_of`] (Phi-3)
/// the one table is the model's own choice for this forward (longrope: short or long factors
/// by the largest position + 1), cos and sin times its attention factor, as
/// `Phi3ForCausalLM`'s forward computes them.
fn rope_tables(plan: &Plan, ws: &mut Workspace, positions: &[u32]) {
    let half = plan.arch.rotary / 2;
    let tk = positions.len();
    let per_forward;
    let (tables, scale): (&[Vec<f32>], f32) = match plan.rope_of {
        Some(c) => {
            let seq_len = positions.iter().max().map_or(0, |&p| p as usize + 1);
            let (inv, scale) = c.inv_freq(seq_len);
            per_forward = [inv];
            (&per_forward, scale)
        }
        None => (&plan.arch.inv_freq, 1.0),
    };
    for (ti, inv) in tables.iter().enumerate().take(2) {
        let (cos, sin) = if ti == 0 { (&mut ws.cos, &mut ws.sin) } else { (&mut ws.cos2, &mut ws.sin2) };
        let cos = buf(cos, tk * half);
        for (i, &p) in positions.iter().enumerate() {
            for (j, f) in inv.iter().enumerate() {
                cos[i * half + j] = (p as f32 * f).cos() * scale;
            }
        }
        let sin = buf(sin, tk * half);
        for (i, &p) in positions.iter().enumerate() {
            for (j, f) in inv.iter().enumerate() {
                sin[i * half + j] = (p as f32 * f).sin() * scale;
            }
        }
    }
}

/// The decoder layers' forward from `x0` `[T, H]`; the last layer's output is left in
/// `ws.out`. What is kept for a backward is `keep`'s choice.
fn forward_layers(
    step: &Step,
    plan: &Plan,
    ws: &mut Workspace,
    x0: &[f32],
    keep: Keep,
    mut kv_out: Option<&mut Vec<(Vec<f32>, Vec<f32>)>>,
) {
    let d = step.d;
    let nl = plan.layers.len();
    let tk_h = d.tok() * d.h;
    let all = keep == Keep::All;
    // The layer buffers leave the workspace for the loop (moves, no copies) so that a layer
    // can borrow them beside the workspace's scratch buffers.
    let mut acts = std::mem::take(&mut ws.acts);
    let mut out = std::mem::take(&mut ws.out);
    acts.resize_with(if all { nl } else { 1 }, LayerActs::default);
    if keep == Keep::Inputs {
        ws.ckpt.resize_with(nl, LayerCheckpoint::default);
    } else if keep == Keep::All {
        ws.ckpt = Vec::new();
    }
    buf(&mut acts[0].x, tk_h).copy_from_slice(x0);
    for li in 0..nl {
        let ai = if all { li } else { 0 };
        let last = li + 1 == nl;
        let (before, rest) = acts.split_at_mut(ai + 1);
        let a = &mut before[ai];
        let next = if all && !last { &mut rest[0].x } else { &mut out };
        layer_fwd(step, plan, ws, li, a, next, kv_out.as_deref_mut());
        if keep == Keep::Inputs {
            // The layer's input moves to its checkpoint (the checkpoint's old buffer comes back
            // as scratch), and its dropout seeds are noted for the recomputation.
            let c = &mut ws.ckpt[li];
            std::mem::swap(&mut c.x, &mut a.x);
            for (seeds, saves) in c.seeds.iter_mut().zip(&a.lora) {
                seeds.clear();
                seeds.extend(saves.iter().map(|sv| sv.seed));
            }
        }
        if !all && !last {
            std::mem::swap(&mut acts[0].x, &mut out);
        }
    }
    ws.acts = acts;
    ws.out = out;
}

/// Gradient checkpointing: recomputes layer `li`'s activations into `ws.acts[0]` from its
/// checkpoint (input and dropout seeds), exactly as its first forward made them. The layer's
/// output is written to `ws.out`, which the backward no longer reads.
fn recompute_layer(step: &Step, plan: &Plan, ws: &mut Workspace, li: usize) {
    let mut acts = std::mem::take(&mut ws.acts);
    let mut out = std::mem::take(&mut ws.out);
    let a = &mut acts[0];
    let c = &mut ws.ckpt[li];
    std::mem::swap(&mut a.x, &mut c.x);
    for (saves, seeds) in a.lora.iter_mut().zip(&c.seeds) {
        saves.resize_with(seeds.len(), LoraAct::default);
        for (sv, &seed) in saves.iter_mut().zip(seeds) {
            sv.seed = seed;
        }
    }
    step.replay.store(true, std::sync::atomic::Ordering::Relaxed);
    layer_fwd(step, plan, ws, li, a, &mut out, None);
    step.replay.store(false, std::sync::atomic::Ordering::Relaxed);
    ws.acts = acts;
    ws.out = out;
}

/// One decoder layer's forward from `a.x` `[T, H]` into `next` `[T, H]`, keeping its
/// activations in `a`.
fn layer_fwd(
    step: &Step,
    plan: &Plan,
    ws: &mut Workspace,
    li: usize,
    a: &mut LayerActs,
    next: &mut Vec<f32>,
    kv_out: Option<&mut Vec<(Vec<f32>, Vec<f32>)>>,
) {
    let d = step.d;
    let (tk, h, qd, kd, inter) = (d.tok(), d.h, d.qd(), d.kd(), d.inter);
    {
        let layer = &plan.layers[li];
        let n1 = buf(&mut ws.n, tk * h);
        {
            let t0 = step.prof.start();
            par::rms_norm_fwd(&a.x, layer.ln1.get(), plan.eps, n1, buf(&mut a.rstd1, tk));
            step.prof.add(P_FWD_ELT, t0);
        }
        // With Qwen3's q/k norm the projections land in `q_raw` / `k_raw` and are normalised
        // per head (rows of `head_dim`) into `q` / `k`.
        let (qdst, kdst) = if layer.qk_norm.is_some() { (&mut a.q_raw, &mut a.k_raw) } else { (&mut a.q, &mut a.k) };
        if layer.fused {
            // Phi-3: one `qkv_proj` product (and its LoRA terms), split into q, k, v.
            let qkv = buf(&mut ws.fused_qkv, tk * (qd + 2 * kd));
            step.lin_fwd_group(&[&layer.lins[Q]], n1, &mut [&mut *qkv], &mut [&mut a.lora[Q]], &mut ws.drop_x);
            let t0 = step.prof.start();
            split_cols(qkv, tk, &mut [buf(qdst, tk * qd), buf(kdst, tk * kd), buf(&mut a.v, tk * kd)]);
            step.prof.add(P_FWD_ELT, t0);
        } else {
            let [lq, lk, lv] = a.lora.get_disjoint_mut([Q, K, V]).expect("distinct indices");
            step.lin_fwd_group(
                &[&layer.lins[Q], &layer.lins[K], &layer.lins[V]],
                n1,
                &mut [buf(qdst, tk * qd), buf(kdst, tk * kd), buf(&mut a.v, tk * kd)],
                &mut [lq, lk, lv],
                &mut ws.drop_x,
            );
        }
        if let Some((qn, kn)) = &layer.qk_norm {
            let t0 = step.prof.start();
            par::rms_norm_fwd(&a.q_raw, qn.get(), plan.eps, buf(&mut a.q, tk * qd), buf(&mut a.rstd_q, tk * d.nh));
            par::rms_norm_fwd(&a.k_raw, kn.get(), plan.eps, buf(&mut a.k, tk * kd), buf(&mut a.rstd_k, tk * d.nkv));
            step.prof.add(P_FWD_ELT, t0);
        }
        if layer.rope {
            let t0 = step.prof.start();
            let (cos, sin) = if layer.rope_table == 1 { (&ws.cos2, &ws.sin2) } else { (&ws.cos, &ws.sin) };
            par::rope_inplace(&mut a.q, cos, sin, d.nh, d.hd, plan.arch.rotary, 1.0);
            par::rope_inplace(&mut a.k, cos, sin, d.nkv, d.hd, plan.arch.rotary, 1.0);
            step.prof.add(P_FWD_ELT, t0);
        }
        buf(&mut a.probs, d.b * d.nh * d.s * d.t());
        buf(&mut a.attn, tk * qd);
        {
            let t0 = step.prof.start();
            step.attn_fwd(li, &a.q, &a.k, &a.v, &mut a.probs, &mut a.attn);
            step.prof.add(P_FWD_ATTN, t0);
        }
        if let Some(out) = kv_out {
            out.push((a.k.clone(), a.v.clone()));
        }
        // Gemma 3: `o_proj`'s output is kept (`o_raw`) and post-normed into `tmp_h`.
        let o_dst = if layer.post_attn.is_some() { &mut a.o_raw } else { &mut ws.tmp_h };
        let tmp = buf(o_dst, tk * h);
        step.lin_fwd_group(&[&layer.lins[O]], &a.attn, &mut [tmp], &mut [&mut a.lora[O]], &mut ws.drop_x);
        {
            let t0 = step.prof.start();
            if let Some(pn) = &layer.post_attn {
                par::rms_norm_fwd(&a.o_raw, pn.get(), plan.eps, buf(&mut ws.tmp_h, tk * h), buf(&mut a.rstd_po, tk));
            }
            par::add_to(&a.x, &ws.tmp_h, buf(&mut a.hmid, tk * h));
            step.prof.add(P_FWD_ELT, t0);
        }
        let n2 = buf(&mut ws.n, tk * h);
        {
            let t0 = step.prof.start();
            par::rms_norm_fwd(
                &a.hmid,
                layer.ln2.get(),
                plan.eps,
                n2,
                buf(&mut a.rstd2, tk),
            );
            step.prof.add(P_FWD_ELT, t0);
        }
        if layer.fused {
            // Phi-3: one `gate_up_proj` product, split into gate and up.
            let gu = buf(&mut ws.fused_gu, tk * 2 * inter);
            step.lin_fwd_group(&[&layer.lins[GATE]], n2, &mut [&mut *gu], &mut [&mut a.lora[GATE]], &mut ws.drop_x);
            let t0 = step.prof.start();
            split_cols(gu, tk, &mut [buf(&mut a.g, tk * inter), buf(&mut a.u, tk * inter)]);
            step.prof.add(P_FWD_ELT, t0);
        } else {
            let [lg, lu] = a.lora.get_disjoint_mut([GATE, UP]).expect("distinct indices");
            step.lin_fwd_group(
                &[&layer.lins[GATE], &layer.lins[UP]],
                n2,
                &mut [buf(&mut a.g, tk * inter), buf(&mut a.u, tk * inter)],
                &mut [lg, lu],
                &mut ws.drop_x,
            );
        }
        let act = buf(&mut ws.act, tk * inter);
        {
            let t0 = step.prof.start();
            par::glu(plan.arch.gelu, &a.g, &a.u, act);
            step.prof.add(P_FWD_ELT, t0);
        }
        let d_dst = if layer.post_ff.is_some() { &mut a.d_raw } else { &mut ws.tmp_h };
        let tmp = buf(d_dst, tk * h);
        step.lin_fwd_group(&[&layer.lins[DOWN]], act, &mut [tmp], &mut [&mut a.lora[DOWN]], &mut ws.drop_x);
        if let Some(pn) = &layer.post_ff {
            let t0 = step.prof.start();
            par::rms_norm_fwd(&a.d_raw, pn.get(), plan.eps, buf(&mut ws.tmp_h, tk * h), buf(&mut a.rstd_pf, tk));
            step.prof.add(P_FWD_ELT, t0);
        }
        let next = buf(next, tk * h);
        {
            let t0 = step.prof.start();
            par::add_to(&a.hmid, &ws.tmp_h, next);
            step.prof.add(P_FWD_ELT, t0);
        }
    }
}

/// What the engine's step returns.
struct StepResult {
    /// `Σ (lse − x_target)` over the scored rows.
    loss_sum: f64,
    /// Scored rows.
    n: usize,
    /// LoRA gradients.
    grads: Vec<(Var, Vec<f32>)>,
    /// Gradient of the input embeddings `[T, H]` (prompt learning), if asked for.
    gx: Option<Vec<f32>>,
    /// Gradients of each layer's prefix keys/values (prefix tuning).
    gprefix: Vec<(Vec<f32>, Vec<f32>)>,
}

/// Runs one forward + backward. `x0`: input embeddings `[T, H]`; `labels`: `[b, s]` (shifted
/// by one inside); `weight`: the loss weight of each scored row.
#[allow(clippy::too_many_arguments)]
fn run(
    plan: &Plan,
    d: Dims,
    x0: &[f32],
    keys: Option<Vec<u8>>,
    positions: &[u32],
    labels: &[i64],
    weight: Option<f32>,
    prefix: Vec<Prefix>,
    want_gx: bool,
    rng: Option<Arc<Mutex<rand::rngs::StdRng>>>,
    threads: usize,
    ckpt: bool,
) -> StepResult {
    with_workspace(true, d, |ws| {
        run_in(
            ws, plan, d, x0, keys, positions, labels, weight, prefix, want_gx, rng, threads, ckpt,
        )
    })
}

/// The gradient of a branch's output before its post-norm (Gemma 3's post-attention and
/// post-feedforward RMSNorms, scale `norm`): from the residual gradient `g` `[T, H]`, through
/// the norm of the saved pre-norm output `raw` (reciprocal RMS `rstd`), into `scratch`. Without
/// a post-norm the branch's gradient is `g` itself.
fn post_norm_bwd<'a>(step: &Step, norm: Option<&Raw>, raw: &[f32], rstd: &[f32], g: &'a [f32], scratch: &'a mut Vec<f32>) -> &'a [f32] {
    let Some(pn) = norm else { return g };
    let t0 = step.prof.start();
    let gp = buf(scratch, g.len());
    gp.fill(0.0);
    par::rms_norm_bwd_acc(raw, pn.get(), rstd, g, gp);
    step.prof.add(P_BWD_ELT, t0);
    &scratch[..]
}

#[allow(clippy::too_many_arguments)]
fn run_in(
    ws: &mut Workspace,
    plan: &Plan,
    d: Dims,
    x0: &[f32],
    keys: Option<Vec<u8>>,
    positions: &[u32],
    labels: &[i64],
    weight: Option<f32>,
    prefix: Vec<Prefix>,
    want_gx: bool,
    rng: Option<Arc<Mutex<rand::rngs::StdRng>>>,
    threads: usize,
    ckpt: bool,
) -> StepResult {
    let nl = plan.layers.len();
    let (mask, mask_w, windowed) = Step::masks(plan, &d, keys);
    let step = Step {
        prof: Prof::new(),
        d,
        train: true,
        mask,
        mask_w,
        windowed,
        attn_scale: plan.arch.attn_scale,
        threads,
        rng,
        prefix,
        replay: std::sync::atomic::AtomicBool::new(false),
    };
    rope_tables(plan, ws, positions);
    // ---- forward ----
    // With gradient checkpointing only each layer's input is kept; the backward recomputes
    // the layer's activations from it, one layer at a time.
    forward_layers(&step, plan, ws, x0, if ckpt { Keep::Inputs } else { Keep::All }, None);
    let (tk, h, qd, kd, inter) = (d.tok(), d.h, d.qd(), d.kd(), d.inter);
    // ---- final norm, lm_head and cross-entropy, chunked over scored rows ----
    let t_head = step.prof.start();
    let hf = buf(&mut ws.n, tk * h);
    par::rms_norm_fwd(
        &ws.out,
        plan.norm.get(),
        plan.eps,
        hf,
        buf(&mut ws.rstd_f, tk),
    );
    let mut rows: Vec<(usize, usize)> = Vec::new();
    for bi in 0..d.b {
        for i in 0..d.s.saturating_sub(1) {
            let l = labels[bi * d.s + i + 1];
            if l >= 0 && (l as usize) < d.vocab {
                rows.push((bi * d.s + i, l as usize));
            }
        }
    }
    let n = rows.len();
    let w = weight.unwrap_or(1.0 / n.max(1) as f32);
    let ghf = buf(&mut ws.gn, tk * h);
    ghf.fill(0.0);
    let mut loss_sum = 0f64;
    const CH: usize = 256;
    for chunk in rows.chunks(CH) {
        let c = chunk.len();
        let hc = buf(&mut ws.hc, c * h);
        for (r, &(row, _)) in chunk.iter().enumerate() {
            hc[r * h..(r + 1) * h].copy_from_slice(&hf[row * h..(row + 1) * h]);
        }
        let logits = buf(&mut ws.logits, c * d.vocab);
        plan.head.logits(hc, c, h, d.vocab, logits, threads, true);
        loss_sum += logits
            .par_chunks_mut(d.vocab)
            .zip(chunk.par_iter())
            .map(|(row, &(_, target))| simd::cross_entropy_row(row, target, w) / w as f64)
            .sum::<f64>();
        let ghc = buf(&mut ws.ghc, c * h);
        plan.head.input_grad(logits, c, h, d.vocab, ghc, threads);
        for (r, &(row, _)) in chunk.iter().enumerate() {
            ghf[row * h..(row + 1) * h].copy_from_slice(&ghc[r * h..(r + 1) * h]);
        }
    }
    step.prof.add(P_HEAD, t_head);
    let g = buf(&mut ws.g, tk * h);
    g.fill(0.0);
    {
        let t0 = step.prof.start();
        par::rms_norm_bwd_acc(&ws.out, plan.norm.get(), &ws.rstd_f, &ws.gn, g);
        step.prof.add(P_BWD_ELT, t0);
    }
    // ---- backward through the layers; `ws.g` is the residual stream's gradient ----
    let mut grads = Vec::new();
    let mut gprefix = Vec::new();
    let mut scratch = Scratch {
        drop_x: std::mem::take(&mut ws.drop_x),
        drop_m: std::mem::take(&mut ws.drop_m),
        lora_tmp: std::mem::take(&mut ws.lora_tmp),
        lora_bt: std::mem::take(&mut ws.lora_bt),
        lora_tmp2: std::mem::take(&mut ws.lora_tmp2),
    };
    // Below the lowest layer holding an adapter nothing trainable is left, unless the input
    // gradient is wanted (prompt learning) or prefixes are trained in every layer: as autograd
    // does, the backward stops there, and that layer's q/k/v input gradient is not computed.
    let lowest = if want_gx || d.p > 0 || super::ab_flags() & super::AB_FULL_BACKWARD != 0 {
        0
    } else {
        plan.layers.iter().position(|l| l.lins.iter().any(|x| !x.loras.is_empty())).unwrap_or(nl)
    };
    for li in (lowest..nl).rev() {
        let need_in = li > lowest || want_gx || super::ab_flags() & super::AB_FULL_BACKWARD != 0;
        let layer = &plan.layers[li];
        let ai = if ckpt {
            recompute_layer(&step, plan, ws, li);
            0
        } else {
            li
        };
        let a = &mut ws.acts[ai];
        // MLP
        let needs = |m: usize| !layer.lins[m].loras.is_empty();
        let act = buf(&mut ws.act, tk * inter);
        if needs(DOWN) {
            {
                let t0 = step.prof.start();
                par::glu(plan.arch.gelu, &a.g, &a.u, act);
                step.prof.add(P_BWD_ELT, t0);
            }
        }
        // Gemma 3: back through the post-feedforward norm to `down_proj`'s output.
        let gy_down = post_norm_bwd(&step, layer.post_ff.as_ref(), &a.d_raw, &a.rstd_pf, &ws.g, &mut ws.gpost);
        let gi = buf(&mut ws.gi, tk * inter);
        step.lin_bwd(
            &layer.lins[DOWN],
            gy_down,
            act,
            gi,
            false,
            true,
            &a.lora[DOWN],
            &mut grads,
            &mut scratch,
        );
        {
            let t0 = step.prof.start();
            par::glu_bwd_inplace(plan.arch.gelu, &mut a.g, &mut a.u, gi);
            step.prof.add(P_BWD_ELT, t0);
        }
        let n2 = buf(&mut ws.n2, tk * h);
        if needs(GATE) || needs(UP) {
            {
                let t0 = step.prof.start();
                par::rms_norm_apply(&a.hmid, layer.ln2.get(), &a.rstd2, n2);
                step.prof.add(P_BWD_ELT, t0);
            }
        }
        let gn = buf(&mut ws.gn, tk * h);
        if layer.fused {
            // Phi-3: the gate and up gradients side by side, `gate_up_proj`'s output gradient.
            let t0 = step.prof.start();
            let gu = buf(&mut ws.fused_gu, tk * 2 * inter);
            join_cols(&[&a.g[..], &a.u[..]], tk, gu);
            step.prof.add(P_BWD_ELT, t0);
            step.lin_bwd(&layer.lins[GATE], gu, n2, gn, false, true, &a.lora[GATE], &mut grads, &mut scratch);
        } else {
            step.lin_bwd(
                &layer.lins[GATE],
                &a.g,
                n2,
                gn,
                false,
                true,
                &a.lora[GATE],
                &mut grads,
                &mut scratch,
            );
            step.lin_bwd(
                &layer.lins[UP],
                &a.u,
                n2,
                gn,
                true,
                true,
                &a.lora[UP],
                &mut grads,
                &mut scratch,
            );
        }
        {
            let t0 = step.prof.start();
            par::rms_norm_bwd_acc(&a.hmid, layer.ln2.get(), &a.rstd2, gn, &mut ws.g);
            step.prof.add(P_BWD_ELT, t0);
        }
        // attention
        let gy_o = post_norm_bwd(&step, layer.post_attn.as_ref(), &a.o_raw, &a.rstd_po, &ws.g, &mut ws.gpost);
        let gattn = buf(&mut ws.gattn, tk * qd);
        step.lin_bwd(
            &layer.lins[O],
            gy_o,
            &a.attn,
            gattn,
            false,
            true,
            &a.lora[O],
            &mut grads,
            &mut scratch,
        );
        let gq = buf(&mut ws.gq, tk * qd);
        let gk = buf(&mut ws.gk, tk * kd);
        let gv = buf(&mut ws.gv, tk * kd);
        let np = d.b * d.nkv * d.p * d.hd;
        let (mut gpk, mut gpv) = (vec![0f32; np], vec![0f32; np]);
        {
            let t0 = step.prof.start();
            step.attn_bwd(li, a, gattn, gq, gk, gv, &mut gpk, &mut gpv);
            step.prof.add(P_BWD_ATTN, t0);
        }
        if d.p > 0 {
            gprefix.push((gpk, gpv));
        }
        if layer.rope {
            let t0 = step.prof.start();
            let (cos, sin) = if layer.rope_table == 1 { (&ws.cos2, &ws.sin2) } else { (&ws.cos, &ws.sin) };
            par::rope_inplace(gq, cos, sin, d.nh, d.hd, plan.arch.rotary, -1.0);
            par::rope_inplace(gk, cos, sin, d.nkv, d.hd, plan.arch.rotary, -1.0);
            step.prof.add(P_BWD_ELT, t0);
        }
        // Qwen3: back through the per-head q/k RMSNorm (its weights are frozen).
        let (gq, gk): (&[f32], &[f32]) = match &layer.qk_norm {
            Some((qn, kn)) => {
                let t0 = step.prof.start();
                let gqr = buf(&mut ws.gq_raw, tk * qd);
                gqr.fill(0.0);
                par::rms_norm_bwd_acc(&a.q_raw, qn.get(), &a.rstd_q, gq, gqr);
                let gkr = buf(&mut ws.gk_raw, tk * kd);
                gkr.fill(0.0);
                par::rms_norm_bwd_acc(&a.k_raw, kn.get(), &a.rstd_k, gk, gkr);
                step.prof.add(P_BWD_ELT, t0);
                (&ws.gq_raw, &ws.gk_raw)
            }
            None => (gq, gk),
        };
        let n1 = buf(&mut ws.n2, tk * h);
        if needs(Q) || needs(K) || needs(V) {
            {
                let t0 = step.prof.start();
                par::rms_norm_apply(&a.x, layer.ln1.get(), &a.rstd1, n1);
                step.prof.add(P_BWD_ELT, t0);
            }
        }
        let gn = buf(&mut ws.gn, tk * h);
        if layer.fused {
            // Phi-3: the q, k, v gradients side by side, `qkv_proj`'s output gradient.
            let t0 = step.prof.start();
            let gqkv = buf(&mut ws.fused_qkv, tk * (qd + 2 * kd));
            join_cols(&[gq, gk, &*gv], tk, gqkv);
            step.prof.add(P_BWD_ELT, t0);
            step.lin_bwd(&layer.lins[Q], gqkv, n1, gn, false, need_in, &a.lora[Q], &mut grads, &mut scratch);
        } else {
            step.lin_bwd(
                &layer.lins[Q],
                gq,
                n1,
                gn,
                false,
                need_in,
                &a.lora[Q],
                &mut grads,
                &mut scratch,
            );
            step.lin_bwd(
                &layer.lins[K],
                gk,
                n1,
                gn,
                true,
                need_in,
                &a.lora[K],
                &mut grads,
                &mut scratch,
            );
            step.lin_bwd(
                &layer.lins[V],
                gv,
                n1,
                gn,
                true,
                need_in,
                &a.lora[V],
                &mut grads,
                &mut scratch,
            );
        }
        if need_in {
            let t0 = step.prof.start();
            par::rms_norm_bwd_acc(&a.x, layer.ln1.get(), &a.rstd1, gn, &mut ws.g);
            step.prof.add(P_BWD_ELT, t0);
        }
    }
    gprefix.reverse();
    step.prof.report("training step");
    (ws.drop_x, ws.drop_m, ws.lora_tmp, ws.lora_tmp2, ws.lora_bt) = (
        scratch.drop_x,
        scratch.drop_m,
        scratch.lora_tmp,
        scratch.lora_tmp2,
        scratch.lora_bt,
    );
    StepResult {
        loss_sum,
        n,
        grads,
        gx: want_gx.then(|| ws.g.clone()),
        gprefix,
    }
}

/// The engine's storage behind a [`KvCache`](crate::model::KvCache): per layer, key and value
/// buffers `[b, kv_heads, cap, hd]` that cached decoding appends to in place (capacity doubling
/// when full), instead of concatenating a new tensor per layer and token. The cache's public
/// `layers` then hold views of the first `len` positions, so the general path, `seq_len` and
/// callers read them as before.
///
/// The store is trusted only while `layers` still holds exactly the views it handed out (same
/// tensor ids) with `len` positions; after anything else wrote `layers` (the general path,
/// a caller truncating or replacing them) the next engine call copies them into a fresh store.
/// Positions below `len` are never rewritten, and a grown or re-imported store is a new
/// allocation, so views kept by callers (or by a cloned cache) stay valid. A clone of a cache
/// starts with an empty store, so two caches never append into the same buffers.
#[derive(Default)]
pub struct KvStore {
    inner: Option<KvBuffers>,
}

struct KvBuffers {
    b: usize,
    nkv: usize,
    hd: usize,
    cap: usize,
    len: usize,
    /// Per layer: keys and values `[b, kv_heads, cap, hd]`.
    bufs: Vec<(Tensor, Tensor)>,
    /// Ids of the views last put into `KvCache::layers`.
    ids: Vec<(candle_core::TensorId, candle_core::TensorId)>,
}

impl Clone for KvStore {
    fn clone(&self) -> Self {
        KvStore::default()
    }
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(st) => write!(f, "KvStore {{ len: {}, cap: {} }}", st.len, st.cap),
            None => write!(f, "KvStore {{ empty }}"),
        }
    }
}

impl KvStore {
    /// Makes `cache`'s store hold its `past` positions with room for `need`: kept as it is when
    /// it is current and large enough, else rebuilt (copying the cache's tensors).
    #[allow(clippy::too_many_arguments)]
    fn ready<'c>(
        cache: &'c mut crate::model::KvCache,
        b: usize,
        nkv: usize,
        hd: usize,
        past: usize,
        need: usize,
        max_pos: usize,
        dev: &candle_core::Device,
    ) -> Result<&'c KvBuffers> {
        let current = cache.engine.inner.as_ref().is_some_and(|st| {
            st.b == b
                && st.nkv == nkv
                && st.hd == hd
                && st.len == past
                && past > 0
                && st.ids.len() == cache.layers.len()
                && cache.layers.iter().zip(&st.ids).all(|(l, id)| {
                    l.as_ref()
                        .is_some_and(|(k, v)| k.id() == id.0 && v.id() == id.1)
                })
        });
        if current && cache.engine.inner.as_ref().is_some_and(|st| st.cap >= need) {
            return Ok(cache.engine.inner.as_ref().expect("checked"));
        }
        let cap = need.next_power_of_two().max(64).min(max_pos.max(need));
        let mut bufs = Vec::with_capacity(cache.layers.len());
        for l in &cache.layers {
            let mut kb = vec![0f32; b * nkv * cap * hd];
            let mut vb = vec![0f32; b * nkv * cap * hd];
            if let (Some((k, v)), true) = (l, past > 0) {
                for (src, dst) in [(k, &mut kb), (v, &mut vb)] {
                    let data = src.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    for bg in 0..b * nkv {
                        dst[bg * cap * hd..][..past * hd]
                            .copy_from_slice(&data[bg * past * hd..][..past * hd]);
                    }
                }
            }
            bufs.push((
                Tensor::from_vec(kb, (b, nkv, cap, hd), dev)?,
                Tensor::from_vec(vb, (b, nkv, cap, hd), dev)?,
            ));
        }
        cache.engine.inner = Some(KvBuffers {
            b,
            nkv,
            hd,
            cap,
            len: past,
            bufs,
            ids: Vec::new(),
        });
        Ok(cache.engine.inner.as_ref().expect("just set"))
    }
}

/// The engine's plan of `model`'s base (a Llama-family, Gemma 3 or Phi-3 decoder: [`Plan::of`],
/// [`Plan::of_gemma3`], [`Plan::of_phi3`]), or `None` when the general path must run it.
fn plan_for<'m>(model: &'m PeftModel, rows: Option<Mixed<'_>>) -> Option<Plan<'m>> {
    if let Some(llama) = model.base.as_llama() {
        return Plan::of(llama, rows);
    }
    if let Some(gemma) = model.base.as_gemma3() {
        return Plan::of_gemma3(gemma, rows);
    }
    Plan::of_phi3(model.base.as_phi3()?, rows)
}

/// `InvalidArgument` naming `inputIds` for an id outside the vocabulary (the general path's error).
fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&i| i as usize >= vocab) {
        Some(bad) => Err(PeftError::invalid_arg(
            "inputIds",
            format!("token id {bad} is outside the vocabulary (size {vocab})"),
        )),
        None => Ok(()),
    }
}

/// The engine's version of `train::loss_and_grads` for a Llama-family causal LM, or `Ok(None)`
/// when the model or its adapters need the general path (see the module docs of
/// [`crate::engine`]). Returns `(mean loss, label tokens, gradients)` exactly as the general
/// path does; with `total_items`, the gradients are those of `mean · n / total_items`.
///
/// Errors: as the general path (`InvalidArgument` for ids outside the vocabulary, a mask of
/// the wrong length or a sequence longer than `max_position_embeddings`).
pub fn try_loss_and_grads(
    model: &PeftModel,
    batch: &Batch,
    total_items: Option<usize>,
    rng: Option<Arc<Mutex<rand::rngs::StdRng>>>,
) -> Result<Option<(f64, usize, GradStore)>> {
    try_loss_and_grads_with(model, batch, total_items, rng, model.gradient_checkpointing())
}

/// [`try_loss_and_grads`] with gradient checkpointing on (`ckpt`) or off, whatever the model's
/// setting. With it, the forward keeps each decoder layer's input `[T, H]` (and its LoRA
/// dropout seeds) instead of its activations, and the backward recomputes one layer's
/// activations at a time into a shared buffer just before that layer's backward: the same
/// loss and gradients bit for bit, one layer's activations in memory instead of all of them,
/// for one more forward pass of the layers above the lowest trainable one.
///
/// Errors: those of [`try_loss_and_grads`].
pub fn try_loss_and_grads_with(
    model: &PeftModel,
    batch: &Batch,
    total_items: Option<usize>,
    rng: Option<Arc<Mutex<rand::rngs::StdRng>>>,
    ckpt: bool,
) -> Result<Option<(f64, usize, GradStore)>> {
    if ckpt {
        model.check_gradient_checkpointing()?;
    }
    if !super::enabled()
        || batch.token_type_ids.is_some()
        || batch.decoder_input_ids.is_some()
        || batch.input_type_mask.is_some()
        || model.active_cpt().is_some()
    {
        return Ok(None);
    }
    let Some(plan) = plan_for(model, None) else {
        return Ok(None);
    };
    let c = &plan.arch;
    let prompt = model.active_prompt();
    // Prompt learning and LoRA adapters never coexist (HF refuses the mix); a prompt adapter
    // with a LoRA adapter active elsewhere would need both paths.
    if prompt.is_some()
        && plan
            .layers
            .iter()
            .any(|l| l.lins.iter().any(|x| !x.loras.is_empty()))
    {
        return Ok(None);
    }
    let (b, s) = (batch.batch_size, batch.seq_len);
    check_ids(&batch.input_ids, c.vocab)?;
    let h = c.h;
    let embed = plan.embed.get();
    let escale = plan.arch.embed_scale;
    // Token embeddings (times Gemma 3's `sqrt(hidden)`, as the base model's `embed` computes them).
    let gather = |ids: &[u32], out: &mut Vec<f32>| {
        let start = out.len();
        for &id in ids {
            out.extend_from_slice(&embed[id as usize * h..(id as usize + 1) * h]);
        }
        if let Some(sc) = escale {
            out[start..].iter_mut().for_each(|v| *v *= sc);
        }
    };
    let threads = super::num_threads();
    let mut dims = Dims {
        b,
        s,
        p: 0,
        h,
        nh: c.nh,
        nkv: c.nkv,
        hd: c.hd,
        inter: c.inter,
        vocab: c.vocab,
    };
    let rng_ref = rng.as_deref();
    // Inputs per method, mirroring `PeftModel::prompt_forward` and `BaseModel::forward`.
    let mut x0 = Vec::with_capacity(b * s * h);
    let mut keys = Some(batch.attention_mask.clone());
    let mut prompts: Option<Tensor> = None;
    let mut prefix_tensors: Vec<(Tensor, Tensor)> = Vec::new();
    let mut prefix = Vec::new();
    match prompt {
        None => gather(&batch.input_ids, &mut x0),
        Some((cfg, enc)) => {
            let n = cfg.total_virtual_tokens();
            keys = Some(
                (0..b)
                    .flat_map(|r| {
                        std::iter::repeat_n(1u8, n)
                            .chain(batch.attention_mask[r * s..(r + 1) * s].iter().copied())
                    })
                    .collect(),
            );
            if cfg.method == PromptMethod::PrefixTuning {
                let n = cfg.num_virtual_tokens;
                dims.p = n;
                prefix_tensors = model.prefix_key_values(cfg, enc, b, true, rng_ref)?;
                for (k, v) in &prefix_tensors {
                    if k.dims() != [b, dims.nkv, n, dims.hd]
                        || v.dims() != [b, dims.nkv, n, dims.hd]
                    {
                        return Ok(None);
                    }
                    let (Some(k), Some(v)) = (Raw::of(k), Raw::of(v)) else {
                        return Ok(None);
                    };
                    prefix.push(Prefix { k, v, cap: n });
                }
                if prefix.len() != plan.layers.len() {
                    return Ok(None);
                }
                gather(&batch.input_ids, &mut x0);
            } else {
                // Virtual token embeddings in front of the real ones.
                let mut real = Vec::with_capacity(b * s * h);
                gather(&batch.input_ids, &mut real);
                let p = enc
                    .batch_prompts(b, batch.task_ids.as_deref(), true, rng_ref)?
                    .to_dtype(DType::F32)?
                    .contiguous()?;
                if p.dims() != [b, n, h] {
                    return Ok(None);
                }
                let pv = p.flatten_all()?.to_vec1::<f32>()?;
                x0.clear();
                for r in 0..b {
                    x0.extend_from_slice(&pv[r * n * h..(r + 1) * n * h]);
                    x0.extend_from_slice(&real[r * s * h..(r + 1) * s * h]);
                }
                dims.s = n + s;
                prompts = Some(p);
            }
        }
    }
    let total = dims.t();
    if total > c.max_pos {
        return Err(PeftError::invalid_arg(
            "inputIds",
            format!(
                "sequence length {total} exceeds max_position_embeddings {}",
                c.max_pos
            ),
        ));
    }
    if keys.as_ref().is_some_and(|k| k.iter().all(|&v| v != 0)) {
        keys = None;
    }
    let positions: Vec<u32> = (0..b)
        .flat_map(|_| (dims.p..dims.p + dims.s).map(|p| p as u32))
        .collect();
    let (labels, lseq) = extended_labels(model, batch);
    if lseq != dims.s || labels.len() != b * dims.s {
        return Ok(None);
    }
    // Scored rows (after the shift) decide the weight, as `causal_lm_loss` and the trainer do.
    let n_items = (0..b)
        .map(|r| {
            (1..dims.s)
                .filter(|&i| {
                    labels[r * dims.s + i] >= 0 && (labels[r * dims.s + i] as usize) < dims.vocab
                })
                .count()
        })
        .sum::<usize>();
    let weight = match total_items {
        Some(t) if t > 0 => 1.0 / t as f32,
        _ => 1.0 / n_items.max(1) as f32,
    };
    let want_gx = prompts.is_some();
    let res = super::pool().install(|| {
        run(
            &plan,
            dims,
            &x0,
            keys,
            &positions,
            &labels,
            Some(weight),
            prefix,
            want_gx,
            rng,
            threads,
            ckpt,
        )
    });
    let mean = if res.n > 0 {
        (res.loss_sum / res.n as f64) as f32 as f64
    } else {
        0.0
    };
    let dev = plan.arch.device.clone();
    // Gradients of the prompt encoders: backpropagate the engine's input gradient through
    // candle's graph of the prompt tables (`Σ prompts ⊙ g` has gradient `g` w.r.t. `prompts`).
    let mut store = if let (Some(p), Some(gx)) = (&prompts, &res.gx) {
        let n = p.dim(1)?;
        let mut gp = Vec::with_capacity(b * n * h);
        for r in 0..b {
            gp.extend_from_slice(&gx[r * dims.s * h..(r * dims.s + n) * h]);
        }
        let gp = Tensor::from_vec(gp, (b, n, h), &dev)?;
        (p * gp)?.sum_all()?.backward()?
    } else if !prefix_tensors.is_empty() {
        let mut acc: Option<Tensor> = None;
        for ((k, v), (gk, gv)) in prefix_tensors.iter().zip(&res.gprefix) {
            let gk = Tensor::from_slice(gk, k.dims(), &dev)?;
            let gv = Tensor::from_slice(gv, v.dims(), &dev)?;
            let term = ((k * gk)?.sum_all()? + (v * gv)?.sum_all()?)?;
            acc = Some(match acc {
                Some(a) => (a + term)?,
                None => term,
            });
        }
        match acc {
            Some(a) => a.backward()?,
            None => GradStore::default(),
        }
    } else {
        GradStore::default()
    };
    for (var, g) in res.grads {
        let t = Tensor::from_vec(g, var.shape(), &dev)?.to_dtype(var.dtype())?;
        let t = match store.remove(var.as_tensor()) {
            Some(prev) => (prev + t)?,
            None => t,
        };
        store.insert(var.as_tensor(), t);
    }
    Ok(Some((mean, res.n, store)))
}

/// The engine's inference forward for a Llama-family causal LM with LoRA adapters (merged or
/// not) or none: logits `[b, s, vocab]` f32 (`[b, 1, vocab]` with `last_only`), as
/// `PeftModel::forward` returns them, with or without a KV cache. Mixed batches
/// (`opts.adapter_rows`, HF's `adapter_names`) apply each row's named LoRA adapter to that row's
/// tokens only. `Ok(None)` when the general path is needed: training, prompt learning, a row
/// naming an adapter of another tuner (or DoRA), or anything [`try_loss_and_grads`] declines.
///
/// Errors: `InvalidArgument` for ids outside the vocabulary, a mask or position ids of the
/// wrong length, or a sequence longer than `max_position_embeddings`.
pub fn try_forward(
    model: &PeftModel,
    ids: &[u32],
    b: usize,
    s: usize,
    opts: &crate::model::ForwardOptions,
    mut cache: Option<&mut crate::model::KvCache>,
) -> Result<Option<Tensor>> {
    if !super::enabled()
        || opts.train
        || opts.adapter_rows.as_ref().is_some_and(|r| r.len() != b)
        || opts.token_type_ids.is_some()
        || opts.decoder_input_ids.is_some()
        || opts.task_ids.is_some()
    {
        return Ok(None);
    }
    if model.active_prompt().is_some() || b == 0 || s == 0 || ids.len() != b * s {
        return Ok(None);
    }
    let mixed = opts.adapter_rows.as_ref().map(|rows| Mixed { rows, scales: opts.adapter_scales.as_deref().map(|v| v.as_slice()) });
    let Some(plan) = plan_for(model, mixed) else {
        return Ok(None);
    };
    let c = &plan.arch;
    check_ids(ids, c.vocab)?;
    // A KV cache enters as the attention's prefix (`[b, kv_heads, past, hd]` per layer, keys
    // after RoPE, as the general path stores them); the new keys/values are appended after.
    let (nkv, hd) = (c.nkv, c.hd);
    let past = cache.as_ref().map(|c| c.seq_len()).unwrap_or(0);
    let total = past + s;
    if total > c.max_pos {
        return Err(PeftError::invalid_arg(
            "inputIds",
            format!(
                "sequence length {total} exceeds max_position_embeddings {}",
                c.max_pos
            ),
        ));
    }
    if let Some(m) = &opts.attention_mask {
        if m.len() != b * total {
            return Err(PeftError::invalid_arg(
                "attentionMask",
                format!("has {} values, expected {b} × {total}", m.len()),
            ));
        }
    }
    let positions: Vec<u32> = match &opts.position_ids {
        Some(p) if p.len() != b * s => {
            return Err(PeftError::invalid_arg(
                "positionIds",
                format!("expected {} values", b * s),
            ))
        }
        Some(p) => p.clone(),
        None => (0..b)
            .flat_map(|_| (past..total).map(|p| p as u32))
            .collect(),
    };
    // Phi-3's longrope: a cached step that crosses the original length re-rotates the cached
    // keys to the long factors (`Phi3ForCausalLM::forward_embeds`); that step is left to it.
    let seq_len = positions.iter().max().map_or(0, |&p| p as usize + 1);
    if let (Some(phi3), Some(cache)) = (model.base.as_phi3(), cache.as_mut()) {
        if phi3.rerotates_cache(cache, past, seq_len) {
            return Ok(None);
        }
    }
    let legacy_cache = super::ab_flags() & super::AB_CAT_KV_CACHE != 0;
    let mut prefix = Vec::new();
    if let Some(cache) = cache.as_mut() {
        if cache.layers.len() != plan.layers.len() || !cache.cross.is_empty() {
            return Ok(None);
        }
        for l in &cache.layers {
            match l {
                Some((k, v)) if past > 0 => {
                    if k.dims() != [b, nkv, past, hd] || v.dims() != [b, nkv, past, hd] {
                        return Ok(None);
                    }
                    if legacy_cache {
                        let (Some(k), Some(v)) = (Raw::of(k), Raw::of(v)) else {
                            return Ok(None);
                        };
                        prefix.push(Prefix { k, v, cap: past });
                    }
                }
                None if past == 0 => {}
                _ => return Ok(None),
            }
        }
        if !legacy_cache {
            let st = KvStore::ready(
                cache,
                b,
                nkv,
                hd,
                past,
                total,
                c.max_pos,
                &plan.arch.device,
            )?;
            if past > 0 {
                for (k, v) in &st.bufs {
                    let (Some(k), Some(v)) = (Raw::of(k), Raw::of(v)) else {
                        return Ok(None);
                    };
                    prefix.push(Prefix { k, v, cap: st.cap });
                }
            }
        }
    }
    let h = c.h;
    let embed = plan.embed.get();
    let mut x0 = Vec::with_capacity(b * s * h);
    for &id in ids {
        x0.extend_from_slice(&embed[id as usize * h..(id as usize + 1) * h]);
    }
    if let Some(sc) = plan.arch.embed_scale {
        x0.iter_mut().for_each(|v| *v *= sc);
    }
    let d = Dims {
        b,
        s,
        p: past,
        h,
        nh: c.nh,
        nkv: c.nkv,
        hd: c.hd,
        inter: c.inter,
        vocab: c.vocab,
    };
    let mut kv_out: Option<Vec<(Vec<f32>, Vec<f32>)>> = cache.as_ref().map(|_| Vec::new());
    let keys = opts
        .attention_mask
        .clone()
        .filter(|k| k.contains(&0));
    let threads = super::num_threads();
    let (mask, mask_w, windowed) = Step::masks(&plan, &d, keys);
    let step = Step {
        prof: Prof::new(),
        d,
        train: false,
        mask,
        mask_w,
        windowed,
        attn_scale: plan.arch.attn_scale,
        threads,
        rng: None,
        prefix,
        replay: std::sync::atomic::AtomicBool::new(false),
    };
    let rows: Vec<usize> = if opts.last_only {
        (0..b).map(|r| r * s + s - 1).collect()
    } else {
        (0..b * s).collect()
    };
    let logits = super::pool().install(|| {
        with_workspace(false, d, |ws| {
            rope_tables(&plan, ws, &positions);
            forward_layers(&step, &plan, ws, &x0, Keep::Nothing, kv_out.as_mut());
            let hf = buf(&mut ws.n, d.tok() * h);
            par::rms_norm_fwd(
                &ws.out,
                plan.norm.get(),
                plan.eps,
                hf,
                buf(&mut ws.rstd_f, d.tok()),
            );
            let mut out = vec![0f32; rows.len() * d.vocab];
            let src: &[f32] = if opts.last_only {
                let hc = buf(&mut ws.hc, rows.len() * h);
                for (r, &row) in rows.iter().enumerate() {
                    hc[r * h..(r + 1) * h].copy_from_slice(&ws.n[row * h..(row + 1) * h]);
                }
                &ws.hc
            } else {
                &ws.n
            };
            plan.head.logits(&src[..rows.len() * h], rows.len(), h, d.vocab, &mut out, threads, false);
            out
        })
    });
    if let (Some(cache), Some(kv)) = (cache, kv_out) {
        if let Some(phi3) = model.base.as_phi3() {
            phi3.note_cached_forward(cache, past, seq_len);
        }
        // Append the new keys/values, `[b, kv_heads, s, hd]`, to each layer's cache.
        let kd = nkv * hd;
        let to_heads = |x: &[f32]| -> Vec<f32> {
            let mut out = vec![0f32; b * s * kd];
            for bi in 0..b {
                for i in 0..s {
                    for g in 0..nkv {
                        let src = &x[(bi * s + i) * kd + g * hd..][..hd];
                        out[((bi * nkv + g) * s + i) * hd..][..hd].copy_from_slice(src);
                    }
                }
            }
            out
        };
        if legacy_cache {
            for (slot, (k, v)) in cache.layers.iter_mut().zip(kv) {
                let k = Tensor::from_vec(to_heads(&k), (b, nkv, s, hd), &plan.arch.device)?;
                let v = Tensor::from_vec(to_heads(&v), (b, nkv, s, hd), &plan.arch.device)?;
                *slot = Some(match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                });
            }
        } else {
            // In place, after the cached positions; the cache's tensors become views of the
            // first `past + s` positions.
            let Some(st) = cache.engine.inner.as_mut() else {
                return Err(PeftError::Internal(
                    "the KV store vanished during a forward".into(),
                ));
            };
            st.ids.clear();
            st.len = 0;
            for ((slot, (k, v)), (kb, vb)) in cache.layers.iter_mut().zip(kv).zip(&st.bufs) {
                let k = Tensor::from_vec(to_heads(&k), (b, nkv, s, hd), &plan.arch.device)?;
                let v = Tensor::from_vec(to_heads(&v), (b, nkv, s, hd), &plan.arch.device)?;
                kb.slice_set(&k, 2, past)?;
                vb.slice_set(&v, 2, past)?;
                let (k, v) = (kb.narrow(2, 0, total)?, vb.narrow(2, 0, total)?);
                st.ids.push((k.id(), v.id()));
                *slot = Some((k, v));
            }
            st.len = total;
        }
    }
    let t = if opts.last_only { 1 } else { s };
    Ok(Some(Tensor::from_vec(
        logits,
        (b, t, d.vocab),
        &plan.arch.device,
    )?))
}
