//! QLoRA on the CPU (issue 20): a GGUF base loaded with its layer weights kept quantized
//! (`LoadRequest::keep_quantized`) against the same file dequantized at load.
//!
//! The fixture is the tiny Llama GGUF re-exported with Q8_0 linear weights (the project's own
//! GGUF writer, `export_merged_gguf`). Each base product under `keep` differs from the
//! dequantized one only by the activation quantization (per-product bound derived and tested in
//! `tests/quant.rs`); through the network these errors compound, so the logits are compared
//! with a tolerance relative to the logits' scale, and training losses within 1%.

#[path = "common/mod.rs"]
mod common;

use candle_core::{DType, Device, Tensor};
use common::fixtures_dir;
use peft_core::engine;
use peft_core::export::{self, gguf_writer::GgmlType};
use peft_core::model::loader::{load_causal_lm, load_model, LoadRequest};
use peft_core::model::ForwardOptions;
use peft_core::peft_model::PeftModel;
use peft_core::train::{loss_and_grads, AdamW, Batch};
use peft_core::tuners::AdapterConfig;
use serde_json::json;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The tiny Llama GGUF with its 2-D weights stored as Q8_0 (written once per test process).
fn q8_gguf() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("peft-qlora-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("llama-q8_0.gguf");
        let base = PeftModel::new(load_causal_lm(&fixtures_dir().join("models/llama.gguf"), DType::F32, &Device::Cpu).unwrap().model);
        let types = export::export_merged_gguf(&base, &p, GgmlType::Q8_0).unwrap();
        assert!(types.iter().filter(|(n, t)| n.contains("attn_q") && *t == GgmlType::Q8_0).count() >= 2, "{types:?}");
        p
    })
    .clone()
}

fn load(keep: bool) -> PeftModel {
    let req = LoadRequest { keep_quantized: keep, ..Default::default() };
    PeftModel::new(load_model(&q8_gguf(), DType::F32, &Device::Cpu, &req).unwrap().model)
}

fn logits(m: &PeftModel, ids: &[u32]) -> Vec<f32> {
    let t: Tensor = m.forward(ids, 1, ids.len(), &ForwardOptions::default(), None).unwrap();
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

const IDS: [u32; 12] = [1, 17, 42, 99, 3, 250, 7, 128, 64, 5, 200, 31];

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |a, x| a.max(x.abs()))
}

/// The largest elementwise |a - b|.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// The logits of `m` through the general path (candle graph) instead of the engine.
fn general_logits(m: &PeftModel, ids: &[u32]) -> Vec<f32> {
    engine::force_general_path(true);
    let g = logits(m, ids);
    engine::force_general_path(false);
    g
}

#[test]
fn keep_holds_every_layer_linear_quantized_and_reports_it() {
    let m = load(true);
    let mut n = 0;
    for (name, lin) in m.base.named_linears() {
        // the layers' linears and the output head (`output.weight`, Q8_0 in this file)
        let is_layer = name.contains(".layers.") || name == "lm_head";
        assert_eq!(lin.quant.is_some(), is_layer, "{name}");
        if let Some(q) = &lin.quant {
            n += 1;
            assert_eq!(q.quant_type().name(), "Q8_0");
            assert_eq!(lin.weight.dims(), &[q.rows(), q.cols()]);
            // The placeholder holds no data: every stride is 0.
            assert!(lin.weight.stride().iter().all(|&s| s == 0), "{name}");
        }
    }
    assert_eq!(n, 7 * m.base.num_layers() + 1);
    assert!(load(false).base.named_linears().iter().all(|(_, l)| l.quant.is_none()));
}

/// The logits of `k` (kept quantized) against those of `d` (dequantized): within 3% of the logit
/// scale and not equal, and the general path equal to the engine's within 1e-4 of the scale.
/// Returns both logits.
fn check_keep_logits(k: &PeftModel, d: &PeftModel, what: &str) -> (Vec<f32>, Vec<f32>) {
    let (a, b) = (logits(k, &IDS), logits(d, &IDS));
    let scale = max_abs(&b);
    let diff = max_diff(&a, &b);
    eprintln!("{what}: max |Δlogit| {diff:.3e} (max |logit| {scale:.3})");
    // 8-bit activations: ~0.4% relative error per product (max|x|/254 per element against
    // typical |x|), a few products deep; 3% of the logit scale leaves room, and the difference
    // must not be zero (the kernels ran).
    assert!(diff <= 0.03 * scale && diff > 0.0, "{diff} vs scale {scale}");
    // the general path (candle graph + quant_linear op) computes the same as the engine
    let dg = max_diff(&a, &general_logits(k, &IDS));
    assert!(dg <= 1e-4 * scale, "engine vs general path under keep: {dg}");
    (a, b)
}

#[test]
fn keep_logits_match_the_dequantized_model() {
    let (k, d) = (load(true), load(false));
    // 40 tokens: from AMX_MIN_ROWS rows the layers' products take the batched path (bf16 on
    // AMX where the CPU has it), the same bound holds, and the general path agrees with the engine.
    let long: Vec<u32> = (0..40u32).map(|i| (i * 53 + 9) % 250 + 1).collect();
    assert!(long.len() >= engine::quant::AMX_MIN_ROWS);
    // Where the CPU has AMX this test runs the AMX path (unless the environment turned it off).
    if engine::amx::available() && std::env::var_os("PEFT_QUANT_AMX").is_none() && std::env::var_os("PEFT_QUANT_KERNEL").is_none() {
        assert!(engine::quant::amx_bf16());
    }
    let (la, lb) = (logits(&k, &long), logits(&d, &long));
    let scale = max_abs(&lb);
    let diff = max_diff(&la, &lb);
    eprintln!("40 tokens: max |Δlogit| {diff:.3e} (max |logit| {scale:.3}, AMX bf16: {})", engine::quant::amx_bf16());
    assert!(diff <= 0.03 * scale && diff > 0.0, "{diff} vs scale {scale}");
    assert!(max_diff(&la, &general_logits(&k, &long)) <= 1e-4 * scale);
    let (a, b) = check_keep_logits(&k, &d, "untied");
    // greedy next tokens agree at (almost) every position
    let vocab = b.len() / IDS.len();
    let argmax = |v: &[f32]| -> Vec<usize> { v.chunks(vocab).map(|r| r.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0).collect() };
    let agree = argmax(&a).iter().zip(argmax(&b)).filter(|(x, y)| **x == *y).count();
    assert!(agree + 1 >= IDS.len(), "greedy tokens agree at {agree} of {} positions", IDS.len());
}

fn batch() -> Batch {
    let (b, s) = (2, 16);
    let ids: Vec<u32> = (0..b * s).map(|i| ((i * 37 + 11) % 250) as u32 + 1).collect();
    let labels: Vec<i64> = ids.iter().enumerate().map(|(i, &t)| if i % s < 3 { -100 } else { t as i64 }).collect();
    Batch { input_ids: ids, attention_mask: vec![1; b * s], labels, batch_size: b, seq_len: s, ..Default::default() }
}

fn lora(m: &mut PeftModel) {
    let cfg = AdapterConfig::from_json(&json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}), None).unwrap();
    m.add_adapter("default", cfg, 7).unwrap();
}

fn train(m: &PeftModel, steps: usize) -> Vec<f64> {
    let params = candle_nn::ParamsAdamW { lr: 5e-3, ..Default::default() };
    let mut opt = AdamW::new(m.trainable_parameters(), params).unwrap();
    let b = batch();
    (0..steps)
        .map(|_| {
            let (loss, _, grads) = loss_and_grads(m, &b, None, None).unwrap();
            opt.step(&grads).unwrap();
            loss
        })
        .collect()
}

#[test]
fn training_through_the_quantized_base_matches_the_dequantized_run() {
    let (mut k, mut d) = (load(true), load(false));
    lora(&mut k);
    lora(&mut d);
    // the fused engine runs the kept-quantized model (it does not fall back to the general path)
    assert!(engine::try_loss_and_grads(&k, &batch(), None, None).unwrap().is_some(), "the engine declined a kept-quantized model");
    // every LoRA factor gets a gradient through the quantized layers above it, on both paths
    for general in [false, true] {
        engine::force_general_path(general);
        let (_, _, g) = loss_and_grads(&k, &batch(), None, None).unwrap();
        engine::force_general_path(false);
        for (name, v) in k.trainable_parameters() {
            let gv = g.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name} (general path: {general})"));
            // lora_B starts at 0, so only lora_B's gradient (gyᵀ·x·Aᵀ) is non-zero in the
            // first step; in layer 0 it needs the input gradient through every layer above.
            if name.contains("lora_B") {
                assert!(max_abs(&gv.flatten_all().unwrap().to_vec1::<f32>().unwrap()) > 0.0, "zero gradient for {name} (general path: {general})");
            }
        }
    }
    let (lk, ld) = (train(&k, 6), train(&d, 6));
    eprintln!("keep {lk:?}\ndequantize {ld:?}");
    for (i, (a, b)) in lk.iter().zip(&ld).enumerate() {
        assert!((a - b).abs() <= 0.01 * b.abs(), "step {i}: loss {a} (keep) vs {b} (dequantize)");
    }
    assert!(lk[5] < lk[0] - 0.05, "the loss must go down: {lk:?}");
}

#[test]
fn merging_into_a_quantized_base_is_refused_before_anything_changes() {
    let mut k = load(true);
    lora(&mut k);
    let before = logits(&k, &IDS);
    let e = k.merge_and_unload(None, false).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_STATE");
    assert!(e.to_string().contains("quantized") && e.to_string().contains("dequantize"), "{e}");
    assert_eq!(logits(&k, &IDS), before);
    assert!(k.base.named_linears().iter().all(|(_, l)| l.merged.is_empty()));
    // status reports the backend per layer and for the model
    let st = k.model_status().unwrap();
    assert_eq!(st["quantization_backend"], json!("gguf-Q8_0"));
    let layers = k.layer_status().unwrap();
    assert!(layers.iter().all(|l| l["quantization_backend"] == json!("gguf-Q8_0")));
    let mut d = load(false);
    lora(&mut d);
    assert_eq!(d.model_status().unwrap()["quantization_backend"], json!(null));
}

#[test]
fn a_corrupted_quantized_block_in_the_file_is_a_coded_error_naming_the_tensor() {
    use candle_core::quantized::gguf_file;
    let src = q8_gguf();
    let content = gguf_file::Content::read(&mut std::fs::File::open(&src).unwrap()).unwrap();
    let info = &content.tensor_infos["blk.1.ffn_down.weight"];
    let at = (content.tensor_data_offset + info.offset) as usize;
    let mut bytes = std::fs::read(&src).unwrap();
    // The f16 scale of the tensor's third block becomes NaN (0x7e00).
    bytes[at + 2 * 34..at + 2 * 34 + 2].copy_from_slice(&[0x00, 0x7e]);
    let bad = src.with_file_name("corrupt-q8_0.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    let req = LoadRequest { keep_quantized: true, ..Default::default() };
    let e = load_model(&bad, DType::F32, &Device::Cpu, &req).err().expect("a NaN scale must not load");
    assert_eq!(e.code(), "ERR_GGUF_INVALID", "{e}");
    assert!(e.to_string().contains("model.layers.1.mlp.down_proj.weight") && e.to_string().contains("block 2"), "{e}");
    // 'keep' on a model folder is refused with a coded error
    let e = load_model(&fixtures_dir().join("models/llama"), DType::F32, &Device::Cpu, &req).err().unwrap();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT", "{e}");
}

/// A 1-layer Llama GGUF (hidden 256, intermediate 512, the tiny fixture's tokenizer and heads)
/// with random weights and its seven layer linears stored as `Q6_K` (candle's port of
/// llama.cpp's `quantize_row_q6_K_ref`; `Q6_K` needs rows of a multiple of 256, which the tiny
/// fixture's 64-wide layers are not). Written once per test process.
fn q6k_gguf() -> PathBuf {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use rand::{Rng, SeedableRng};
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let src = fixtures_dir().join("models/llama.gguf");
        let content = gguf_file::Content::read(&mut std::fs::File::open(&src).unwrap()).unwrap();
        let (h, ff, vocab, heads, kv) = (256usize, 512usize, 256usize, 4usize, 2usize);
        let mut meta = content.metadata.clone();
        let set = |meta: &mut std::collections::HashMap<String, gguf_file::Value>, k: &str, v: usize| {
            let old = meta.get(k).unwrap_or_else(|| panic!("{k}"));
            let nv = match old {
                gguf_file::Value::U32(_) => gguf_file::Value::U32(v as u32),
                gguf_file::Value::U64(_) => gguf_file::Value::U64(v as u64),
                gguf_file::Value::I32(_) => gguf_file::Value::I32(v as i32),
                o => panic!("{k}: {o:?}"),
            };
            meta.insert(k.to_string(), nv);
        };
        set(&mut meta, "llama.embedding_length", h);
        set(&mut meta, "llama.feed_forward_length", ff);
        set(&mut meta, "llama.block_count", 1);
        set(&mut meta, "llama.rope.dimension_count", h / heads);
        let mut rng = rand::rngs::StdRng::seed_from_u64(66);
        let mut t = |shape: &[usize], scale: f32, offset: f32| -> candle_core::Tensor {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| offset + scale * (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum::<f32>()).collect();
            candle_core::Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        let hd = h / heads;
        let mut tensors: Vec<(String, QTensor)> = vec![
            ("token_embd.weight".into(), QTensor::quantize(&t(&[vocab, h], 0.5, 0.0), GgmlDType::F32).unwrap()),
            ("output_norm.weight".into(), QTensor::quantize(&t(&[h], 0.05, 1.0), GgmlDType::F32).unwrap()),
            ("output.weight".into(), QTensor::quantize(&t(&[vocab, h], 0.05, 0.0), GgmlDType::F32).unwrap()),
            ("blk.0.attn_norm.weight".into(), QTensor::quantize(&t(&[h], 0.05, 1.0), GgmlDType::F32).unwrap()),
            ("blk.0.ffn_norm.weight".into(), QTensor::quantize(&t(&[h], 0.05, 1.0), GgmlDType::F32).unwrap()),
        ];
        for (name, rows, cols) in [("attn_q", heads * hd, h), ("attn_k", kv * hd, h), ("attn_v", kv * hd, h), ("attn_output", h, heads * hd), ("ffn_gate", ff, h), ("ffn_up", ff, h), ("ffn_down", h, ff)] {
            let w = t(&[rows, cols], 0.03, 0.0);
            tensors.push((format!("blk.0.{name}.weight"), QTensor::quantize(&w, GgmlDType::Q6K).unwrap()));
        }
        let d = std::env::temp_dir().join(format!("peft-qlora-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("llama-q6_k.gguf");
        let md: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut std::fs::File::create(&p).unwrap(), &md, &ts).unwrap();
        p
    })
    .clone()
}

/// `Q6_K` layer weights are kept quantized (backend `gguf-Q6_K`): logits within the activation
/// rounding of the dequantized load (the same 3% of the logit scale as Q8_0 above), the engine
/// and the general path agree, and LoRA on all linears trains like the dequantized run (1%).
#[test]
fn q6_k_layers_are_kept_quantized_and_match_the_dequantized_model() {
    let p = q6k_gguf();
    let load6 = |keep: bool| PeftModel::new(load_model(&p, DType::F32, &Device::Cpu, &LoadRequest { keep_quantized: keep, ..Default::default() }).unwrap().model);
    let (mut k, mut d) = (load6(true), load6(false));
    let mut n = 0;
    for (name, lin) in k.base.named_linears() {
        if let Some(q) = &lin.quant {
            n += 1;
            assert_eq!(q.backend(), "gguf-Q6_K", "{name}");
        } else {
            assert!(!name.contains(".layers."), "{name} not kept quantized");
        }
    }
    assert_eq!(n, 7);
    let (a, b) = (logits(&k, &IDS), logits(&d, &IDS));
    let scale = max_abs(&b);
    let diff = max_diff(&a, &b);
    eprintln!("Q6_K: max |Δlogit| {diff:.3e} (max |logit| {scale:.3})");
    assert!(diff <= 0.03 * scale && diff > 0.0, "{diff} vs scale {scale}");
    let dg = max_diff(&a, &general_logits(&k, &IDS));
    let dgd = max_diff(&b, &general_logits(&d, &IDS));
    eprintln!("engine vs general path: keep {dg:.3e}, dequantize {dgd:.3e}");
    assert!(dgd <= 1e-4 * scale, "engine vs general path, dequantized: {dgd}");
    // Under keep the two paths agree only up to the activation rounding: their f32 inputs differ
    // in the last bits (summation order), and an activation that sits on a rounding boundary of
    // its 8-bit code flips in one path (here one flip moves the logits by ~3e-3 with the vector
    // kernels, 1e-6 with the scalar one; the kernels themselves agree to 1e-6).
    assert!(dg <= 0.03 * scale, "engine vs general path under keep: {dg}");
    lora(&mut k);
    lora(&mut d);
    let (lk, ld) = (train(&k, 4), train(&d, 4));
    eprintln!("Q6_K keep {lk:?}\ndequantize {ld:?}");
    for (i, (a, b)) in lk.iter().zip(&ld).enumerate() {
        assert!((a - b).abs() <= 0.01 * b.abs(), "step {i}: loss {a} (keep) vs {b} (dequantize)");
    }
    assert!(lk[3] < lk[0], "the loss must go down: {lk:?}");
}

/// `LoadRequest::quantize` on a Llama-family folder (`quantization: 'q8_0' | 'q4_0'`): every
/// decoder layer linear is quantized at load (zero-stride placeholder, backend `q8_0` /
/// `q4_0`), its weight equals llama.cpp's reference quantization of the folder's f32 weight
/// (through `QuantWeight::quantize`, checked byte for byte against gguf-py in `tests/quant.rs`),
/// it works with an f16 `dtype`, and a `.gguf` file or another architecture is a coded error.
#[test]
fn quantizing_a_model_folder_at_load() {
    use peft_core::engine::quant::{QuantType, QuantWeight};
    let dir = fixtures_dir().join("models/llama");
    let f32m = load_causal_lm(&dir, DType::F32, &Device::Cpu).unwrap().model;
    for qt in [QuantType::Q8_0, QuantType::Q4_0] {
        let req = LoadRequest { quantize: Some(qt), ..Default::default() };
        let m = load_model(&dir, DType::F32, &Device::Cpu, &req).unwrap().model;
        let dense: std::collections::HashMap<String, Tensor> = f32m.named_linears().into_iter().map(|(n, l)| (n, l.weight.clone())).collect();
        let mut n = 0;
        for (name, lin) in m.named_linears() {
            match &lin.quant {
                Some(q) => {
                    n += 1;
                    assert!(name.contains(".layers."), "{name}");
                    assert_eq!(q.backend(), qt.name().to_ascii_lowercase());
                    assert!(lin.weight.stride().iter().all(|&s| s == 0), "{name}");
                    let w = &dense[&name];
                    let (r, c) = w.dims2().unwrap();
                    let want = QuantWeight::quantize(&name, qt, r, c, &w.flatten_all().unwrap().to_vec1::<f32>().unwrap()).unwrap();
                    assert_eq!(q.dequantize(), want.dequantize(), "{name}");
                }
                None => assert!(!name.contains(".layers."), "{name} not quantized"),
            }
        }
        assert_eq!(n, 7 * m.num_layers());
        // f16 dtype: the model runs, with f16 logits
        let h = PeftModel::new(load_model(&dir, DType::F16, &Device::Cpu, &req).unwrap().model);
        let t = h.forward(&IDS, 1, IDS.len(), &ForwardOptions::default(), None).unwrap();
        assert_eq!(t.dtype(), DType::F16);
        assert!(t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
    }
    let req = LoadRequest { quantize: Some(QuantType::Q8_0), ..Default::default() };
    for (p, needle) in [(fixtures_dir().join("models/llama.gguf"), "'keep'"), (fixtures_dir().join("models/gpt2"), "GPT2LMHeadModel")] {
        let e = load_model(&p, DType::F32, &Device::Cpu, &req).err().expect("refused");
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT", "{e}");
        assert!(e.to_string().contains("quantization") && e.to_string().contains(needle), "{e}");
    }
}

/// Writes `dst`: the GGUF `src` with its metadata and each tensor passed through `f` (dropped on
/// `None`). Returns the written tensors' names and types.
fn rewrite_gguf(src: &std::path::Path, dst: &std::path::Path, f: impl Fn(&str, candle_core::quantized::QTensor) -> Option<candle_core::quantized::QTensor>) -> Vec<(String, candle_core::quantized::GgmlDType)> {
    use candle_core::quantized::{gguf_file, QTensor};
    let mut file = std::fs::File::open(src).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in content.tensor_infos.keys() {
        if let Some(t) = f(name, content.tensor(&mut file, name, &Device::Cpu).unwrap()) {
            tensors.push((name.clone(), t));
        }
    }
    let md: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(dst).unwrap(), &md, &ts).unwrap();
    tensors.iter().map(|(n, t)| (n.clone(), t.dtype())).collect()
}

/// The Q8_0 tiny Llama GGUF without its `output.weight`: a model with tied embeddings, whose
/// head is the Q8_0 `token_embd.weight` (written once per test process).
fn tied_q8_gguf() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let src = q8_gguf();
        let p = src.with_file_name("llama-tied-q8_0.gguf");
        let kept = rewrite_gguf(&src, &p, |name, t| (name != "output.weight").then_some(t));
        assert!(kept.iter().any(|(n, t)| n == "token_embd.weight" && *t == candle_core::quantized::GgmlDType::Q8_0));
        p
    })
    .clone()
}

fn load_tied(keep: bool) -> PeftModel {
    let req = LoadRequest { keep_quantized: keep, ..Default::default() };
    PeftModel::new(load_model(&tied_q8_gguf(), DType::F32, &Device::Cpu, &req).unwrap().model)
}

/// With tied embeddings, `keep` computes the logits from the file's quantized `token_embd`
/// (as llama.cpp does), while the embedding lookup reads the same table dequantized: the
/// lookup is exactly the dequantized model's, the logits are within the activation rounding,
/// and the engine, the general path and training all use the quantized head.
#[test]
fn keep_computes_the_logits_from_the_quantized_tied_embedding() {
    let (k, d) = (load_tied(true), load_tied(false));
    let llama = k.base.as_llama().unwrap();
    let q = llama.lm_head.quant.as_ref().expect("the tied head is kept quantized");
    assert_eq!((q.quant_type().name(), q.rows(), q.cols()), ("Q8_0", llama.config.vocab_size, llama.config.hidden_size));
    assert!(llama.lm_head.weight.stride().iter().all(|&s| s == 0), "the head's placeholder holds no data");
    // the embedding table is the dequantized one, bit for bit
    let table = |m: &PeftModel| m.base.as_llama().unwrap().embed_tokens.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(table(&k), table(&d));
    assert_eq!(llama.lm_head.dense_weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), table(&d));
    check_keep_logits(&k, &d, "tied");
    // a training step: the engine (quantized head forward, dequantized panels backward) against
    // the general path (quant_linear op), loss and every LoRA gradient
    let mut k = k;
    lora(&mut k);
    let b = Batch { input_ids: IDS.to_vec(), attention_mask: vec![1; IDS.len()], labels: IDS.iter().map(|&t| t as i64).collect(), batch_size: 1, seq_len: IDS.len(), ..Default::default() };
    // lora_B is zero at init: give it values so that lora_A's gradients are not all zero
    for (name, v) in k.trainable_parameters() {
        if name.contains("lora_B") {
            let n = v.elem_count();
            let vals: Vec<f32> = (0..n).map(|i| ((i * 7919 % 101) as f32 - 50.0) * 1e-3).collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    let (le, _, ge) = engine::try_loss_and_grads(&k, &b, None, None).unwrap().expect("the engine runs a kept-quantized head");
    engine::force_general_path(true);
    let (lg, _, gg) = loss_and_grads(&k, &b, None, None).unwrap();
    engine::force_general_path(false);
    assert!((le - lg).abs() <= 1e-5 * lg.abs(), "loss: engine {le} vs general {lg}");
    for (name, v) in k.trainable_parameters() {
        let x = ge.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = gg.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let m = max_abs(&y);
        assert!(m > 0.0, "zero gradient for {name}");
        assert!(max_diff(&x, &y) <= 1e-3 * m, "{name}: engine vs general {} (max {m})", max_diff(&x, &y));
    }
}

/// A model loaded with `keep` and no adapters exports the dequantized weights (the layers'
/// placeholders hold no data): its merged state dict equals the dequantized model's.
#[test]
fn a_kept_quantized_model_exports_its_dequantized_weights() {
    for (k, d) in [(load(true), load(false)), (load_tied(true), load_tied(false))] {
        let (sk, sd) = (export::merged::llama_state_dict(k.base.as_llama().unwrap()).unwrap(), export::merged::llama_state_dict(d.base.as_llama().unwrap()).unwrap());
        assert_eq!(sk.len(), sd.len());
        for ((nk, tk), (nd, td)) in sk.iter().zip(&sd) {
            assert_eq!(nk, nd);
            let (a, b) = (tk.flatten_all().unwrap().to_vec1::<f32>().unwrap(), td.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            assert!(a == b, "{nk} differs from the dequantized model's (max |Δ| {})", max_diff(&a, &b));
        }
    }
}

/// A sequence-classification model from a kept-quantized GGUF: the layers stay quantized, the
/// new `score` head is a dense f32 layer (the file's output head belongs to `lm_head`, which it
/// replaces), and it classifies.
#[test]
fn keep_with_a_classification_head_keeps_the_layers_and_a_dense_score() {
    use peft_core::model::Task;
    for path in [q8_gguf(), tied_q8_gguf()] {
        let req = LoadRequest { keep_quantized: true, task: Some(Task::SeqCls), num_labels: Some(3), ..Default::default() };
        let m = PeftModel::new(load_model(&path, DType::F32, &Device::Cpu, &req).unwrap().model);
        for (name, lin) in m.base.named_linears() {
            assert_eq!(lin.quant.is_some(), name.contains(".layers."), "{name}");
        }
        let t: Tensor = m.forward(&IDS, 1, IDS.len(), &ForwardOptions::default(), None).unwrap();
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.len() >= 3 && v.iter().all(|x| x.is_finite()), "{:?}", t.dims());
    }
}

/// The f32 tiny Llama GGUF with only its `output.weight` in Q8_0: under `keep` the head alone is
/// quantized (as with a file whose layer types have no integer kernels).
fn head_only_q8_gguf() -> PathBuf {
    use candle_core::quantized::{GgmlDType, QTensor};
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = q8_gguf().with_file_name("llama-head-q8_0.gguf");
        rewrite_gguf(&fixtures_dir().join("models/llama.gguf"), &p, |name, t| {
            Some(if name == "output.weight" { QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), GgmlDType::Q8_0).unwrap() } else { t })
        });
        p
    })
    .clone()
}

/// A quantized head that holds no adapter does not stop merging the layers' adapters, and a
/// trained `modules_to_save` copy of the head replaces the quantized head when merged and
/// unloaded (it is not silently dropped).
#[test]
fn a_quantized_head_without_adapters_does_not_block_merging_and_its_trained_copy_wins() {
    let req = LoadRequest { keep_quantized: true, ..Default::default() };
    let mut m = PeftModel::new(load_model(&head_only_q8_gguf(), DType::F32, &Device::Cpu, &req).unwrap().model);
    let quantized: Vec<String> = m.base.named_linears().into_iter().filter(|(_, l)| l.quant.is_some()).map(|(n, _)| n).collect();
    assert_eq!(quantized, vec!["lm_head".to_string()]);
    let cfg = AdapterConfig::from_json(&json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": false, "modules_to_save": ["lm_head"]}), None).unwrap();
    m.add_adapter("default", cfg, 7).unwrap();
    // a "trained" head copy: twice the (dequantized) head
    for (name, lin) in m.base.named_linears() {
        if name == "lm_head" {
            let (w, _) = lin.saved_copies.get("default").expect("modules_to_save copy");
            w.set(&(w.as_tensor() * 2.0).unwrap()).unwrap();
        }
    }
    let before = logits(&m, &IDS);
    m.merge_and_unload(None, false).unwrap();
    let after = logits(&m, &IDS);
    let head = m.base.named_linears().into_iter().find(|(n, _)| n == "lm_head").unwrap().1.quant.is_some();
    assert!(!head, "the merged-in copy replaced the quantized head");
    let scale = max_abs(&before);
    let diff = max_diff(&before, &after);
    assert!(diff <= 1e-5 * scale, "logits moved by {diff} (scale {scale}) when merging");
}

/// AdaLoRA (issue 15) on q/v/down_proj with a budget schedule over 6 steps; `init` is
/// `init_lora_weights` (`false`: lora_E is drawn too, so the SVD delta is non-zero before
/// training; `true`: HF's default, lora_E = 0).
fn adalora(m: &mut PeftModel, init: bool) -> Vec<String> {
    let cfg = AdapterConfig::from_json(
        &json!({"peft_type": "ADALORA", "task_type": "CAUSAL_LM", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "total_step": 6,
                "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_lora_weights": init}),
        None,
    )
    .unwrap();
    m.add_adapter("default", cfg, 13).unwrap()
}

#[test]
fn adalora_over_a_kept_quantized_base_adds_its_svd_delta_to_the_quantized_output() {
    // HF `adalora.bnb.SVDLinear8bitLt` / `SVDLinear4bit` / `gptq.SVDQuantLinear`: the base runs
    // quantized and `(x (P ⊙ Λ)ᵀ Qᵀ) · s / (ranknum + 1e-5)` is added to its output. Here: the
    // same file kept quantized and dequantized, the same adapter (same seed), layer by layer.
    let (mut k, mut d) = (load(true), load(false));
    let targeted = adalora(&mut k, false);
    assert_eq!(targeted, adalora(&mut d, false));
    assert_eq!(targeted.len(), 3 * k.base.num_layers());
    let x = Tensor::randn(0f32, 1.0, (5, 1), &Device::Cpu).unwrap();
    let ctx = peft_core::tuners::linear::LinearCtx::default();
    for ((name, lk), (_, ld)) in k.base.named_linears().into_iter().zip(d.base.named_linears()).filter(|((n, _), _)| targeted.contains(n)) {
        assert!(lk.quant.is_some() && ld.quant.is_none(), "{name}");
        let x = x.broadcast_as((5, lk.in_features())).unwrap().contiguous().unwrap();
        let x = x.broadcast_mul(&Tensor::arange(0f32, lk.in_features() as f32, &Device::Cpu).unwrap().affine(0.01, -0.3).unwrap().unsqueeze(0).unwrap()).unwrap();
        let out = |l: &peft_core::tuners::linear::PeftLinear, off: bool| {
            let mut l = l.clone();
            l.disabled = off;
            l.forward(&x, &ctx).unwrap()
        };
        let (yk, bk, yd, bd) = (out(lk, false), out(lk, true), out(ld, false), out(ld, true));
        let (dk, dd) = ((&yk - &bk).unwrap(), (&yd - &bd).unwrap());
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = max_abs(&v(&dd));
        assert!(scale > 1e-3, "{name}: the SVD delta is not zero ({scale})");
        // The delta does not depend on the base: equal up to the f32 rounding of `y - base`.
        let dd_diff = max_diff(&v(&dk), &v(&dd));
        assert!(dd_diff <= 1e-5 * (1.0 + max_abs(&v(&yd))), "{name}: delta over the quantized base differs by {dd_diff}");
        // The base outputs differ only by the kernels' activation quantization.
        let bdiff = max_diff(&v(&bk), &v(&bd));
        assert!(bdiff > 0.0 && bdiff <= 0.02 * max_abs(&v(&bd)), "{name}: base {bdiff}");
    }
    // Through the network: within the kept model's tolerance of the dequantized logits, and the
    // adapter moves the logits far more than the quantization does.
    let (lk, ld) = check_keep_logits(&k, &d, "AdaLoRA keep vs dequantize");
    k.set_disabled(true).unwrap();
    let off = logits(&k, &IDS);
    k.set_disabled(false).unwrap();
    assert!(max_diff(&lk, &off) > 10.0 * max_diff(&lk, &ld), "adapter effect {} vs quantization {}", max_diff(&lk, &off), max_diff(&lk, &ld));
    // Merging into the quantized base is refused, as for LoRA.
    let e = k.merge_adapter(None, false).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_STATE");
    assert!(e.to_string().contains("quantized"), "{e}");
    assert_eq!(logits(&k, &IDS), lk);
}

#[test]
fn adalora_training_with_rank_allocation_over_a_kept_quantized_base_matches_the_dequantized_run() {
    let (mut k, mut d) = (load(true), load(false));
    adalora(&mut k, true);
    adalora(&mut d, true);
    let run = |m: &PeftModel| -> Vec<f64> {
        let mut tr = peft_core::train::Trainer::new(m, peft_core::train::TrainingArgs { learning_rate: 1e-2, max_steps: 6, seed: 3, ..Default::default() }).unwrap();
        (0..6).map(|_| tr.step(m, std::slice::from_ref(&batch())).unwrap().loss).collect()
    };
    let (lk, ld) = (run(&k), run(&d));
    eprintln!("AdaLoRA keep {lk:?}\ndequantize {ld:?}");
    // The quantization moves the loss by ~1e-5 of it; 1e-3 is well below what training moves it
    // (an adapter that did nothing over the quantized base would fail here).
    for (i, (a, b)) in lk.iter().zip(&ld).enumerate() {
        assert!((a - b).abs() <= 1e-3 * b.abs(), "step {i}: loss {a} (keep) vs {b} (dequantize)");
    }
    assert!(lk[5] < lk[0] - 10.0 * 1e-3 * lk[0], "the loss must go down by more than the tolerance: {lk:?}");
    // The budget phase ended (total_step - tfinal = 4): both keep target_r triplets per layer.
    for m in [&k, &d] {
        let cfg = m.peft_config("default").unwrap().get::<peft_core::tuners::adalora::AdaLoraConfig>().unwrap().clone();
        let pattern = cfg.rank_pattern().expect("a rank pattern after the budgeting phase");
        assert_eq!(pattern.iter().map(|(_, v)| v.iter().filter(|x| **x).count()).sum::<usize>(), 2 * 3 * m.base.num_layers(), "{pattern:?}");
    }
    // The pruned adapter trained over the quantized base saves, and reloads over it unchanged.
    let before = logits(&k, &IDS);
    let out = std::env::temp_dir().join(format!("peft-qlora-adalora-{}", std::process::id()));
    k.save_pretrained(&out, None).unwrap();
    let mut again = load(true);
    again.load_adapter(&out, "default", false, None).unwrap();
    assert!(max_diff(&logits(&again, &IDS), &before) <= 1e-5 * max_abs(&before));
    std::fs::remove_dir_all(&out).ok();
}

/// An adapter on the input embedding of a tied model: merging rotates / shifts the shared table,
/// which HF's tied `lm_head` then uses too. Dequantized, the head follows the merged table (and
/// the base table again after unmerging); kept quantized, the head cannot follow, so the merge is
/// refused before anything changes.
#[test]
fn merging_an_embedding_adapter_of_a_tied_model_moves_the_head_or_is_refused_when_it_is_quantized() {
    let oft = || AdapterConfig::from_json(&json!({"peft_type": "OFT", "r": 0, "oft_block_size": 16, "target_modules": ["embed_tokens"], "init_weights": false}), None).unwrap();
    let head = |m: &PeftModel| m.base.as_llama().unwrap().lm_head.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let table = |m: &PeftModel| m.base.as_llama().unwrap().embed_tokens.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut d = load_tied(false);
    d.add_adapter("default", oft(), 9).unwrap();
    let base_head = head(&d);
    let adapted = logits(&d, &IDS);
    d.merge_adapter(None, true).unwrap();
    assert_eq!(head(&d), table(&d), "the tied head holds the merged table");
    assert!(max_diff(&head(&d), &base_head) > 1e-3);
    assert!(max_diff(&logits(&d, &IDS), &adapted) > 1e-3, "merged, the head sees the rotated table too (as HF)");
    d.unmerge_adapter().unwrap();
    assert!(max_diff(&head(&d), &base_head) <= 1e-5 * max_abs(&base_head));
    assert!(max_diff(&logits(&d, &IDS), &adapted) <= 1e-4 * max_abs(&adapted));

    let mut k = load_tied(true);
    k.add_adapter("default", oft(), 9).unwrap();
    let before = logits(&k, &IDS);
    let e = k.merge_adapter(None, false).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_STATE");
    assert!(e.to_string().contains("model.embed_tokens") && e.to_string().contains("lm_head") && e.to_string().contains("quantized"), "{e}");
    assert!(k.base.named_linears().iter().all(|(_, l)| l.merged.is_empty()));
    assert_eq!(logits(&k, &IDS), before);
}

/// An adapter saved with its embedding table (HF `save_embedding_layers`) replaces the table
/// of a tied model on load, and HF's tied head, the same `Parameter`, computes the logits from
/// the loaded table too. Kept quantized, the head holds a quantized copy of the file's table
/// (`tie_groups` still counts it in the embedding's group): it drops that copy and takes the
/// loaded table, as the dequantized model's head does.
#[test]
fn loading_a_saved_table_into_a_tied_model_moves_a_kept_quantized_head_too() {
    use peft_core::peft_model::{SaveEmbeddingLayers, SaveOptions};
    let cfg = || AdapterConfig::from_json(&json!({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}), None).unwrap();
    let mut src = load_tied(false);
    src.add_adapter("default", cfg(), 1).unwrap();
    // a "fine-tuned" table: the tied embedding and head hold one tensor, replaced for both
    let table = (&src.base.as_llama().unwrap().embed_tokens.weight * 1.5).unwrap();
    for (name, lin) in src.base.named_linears_mut() {
        if name == "model.embed_tokens" || name == "lm_head" {
            lin.weight = table.clone();
        }
    }
    let dir = std::env::temp_dir().join(format!("peft-qlora-tied-table-{}", std::process::id()));
    src.save_pretrained_with(&dir, None, &SaveOptions { save_embedding_layers: SaveEmbeddingLayers::Yes, ..Default::default() }).unwrap();
    let (mut k, mut d) = (load_tied(true), load_tied(false));
    let before = logits(&k, &IDS);
    assert_eq!(k.tie_groups(), vec![vec!["model.embed_tokens".to_string(), "lm_head".to_string()]]);
    k.load_adapter(&dir, "default", false, None).unwrap();
    d.load_adapter(&dir, "default", false, None).unwrap();
    let head = &k.base.as_llama().unwrap().lm_head;
    assert!(head.quant.is_none(), "the head dropped its quantized copy of the old table");
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(flat(&head.weight), flat(&table));
    assert_eq!(flat(&k.base.as_llama().unwrap().embed_tokens.weight), flat(&table));
    let (a, _) = check_keep_logits(&k, &d, "tied, loaded table");
    assert!(max_diff(&a, &before) > 0.1 * max_abs(&before), "the loaded table changed the logits");
    std::fs::remove_dir_all(&dir).ok();
}
