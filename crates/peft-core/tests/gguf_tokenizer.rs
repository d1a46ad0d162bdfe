//! GGUF loading (renaming, q/k un-permutation, malformed files) and tokenizers (GGUF-embedded
//! byte-level BPE, tokenizer.json folders, ChatML).
//!
//! Tests that need the real SmolLM2-135M-Instruct GGUF look for it in `$PEFT_GGUF`, then in
//! `<workspace>/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf`, and print `skipped: ...` when
//! it is absent. Everything else uses tiny GGUF files written byte by byte below.

use candle_core::{DType, Device, Tensor};
use peft_core::gguf::{gguf_to_hf_name, load_gguf, read_gguf_tokenizer, unpermute_qk};
use peft_core::tokenizer::{ChatMessage, ChatOptions, Tokenizer, SMOLLM_DEFAULT_SYSTEM_PROMPT};
use peft_core::PeftError;
use std::io::Write;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Print a line that `cargo test` shows even for passing tests (libtest captures `println!`
/// and `eprintln!`, not direct writes to the stderr handle).
fn visible(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn real_gguf() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PEFT_GGUF") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
        visible(&format!("note: PEFT_GGUF={} is not a file", p.display()));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    p.is_file().then_some(p)
}

macro_rules! need_real_gguf {
    ($test:expr) => {
        match real_gguf() {
            Some(p) => p,
            None => {
                visible(&format!(
                    "skipped: {}: SmolLM2-135M-Instruct.Q4_1.gguf not found (set PEFT_GGUF or put it in .cache/models/)",
                    $test
                ));
                return;
            }
        }
    };
}

fn tmp_dir() -> PathBuf {
    // Under target/tmp (removed by `cargo clean`), one folder per test process.
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("gguf_tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_tmp(name: &str, bytes: &[u8]) -> PathBuf {
    let p = tmp_dir().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn assert_gguf_invalid<T: std::fmt::Debug>(r: peft_core::Result<T>, needle: &str) -> String {
    match r {
        Err(e @ PeftError::GgufInvalid { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(needle), "error `{msg}` should mention `{needle}`");
            assert_eq!(e.code(), "ERR_GGUF_INVALID");
            msg
        }
        other => panic!("expected GgufInvalid mentioning `{needle}`, got {other:?}"),
    }
}

/// Deterministic pseudo-random f32 values in [-1, 1) (64-bit LCG, high bits).
fn lcg_values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), written out with indices:
/// `w.reshape(n_head, 2, rows/n_head/2, *rest).swapaxes(1, 2).reshape(w.shape)`
/// applied to a row-major `[rows, cols]` matrix (`cols = 1` for a bias).
fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                // new[h, i, j] = old[h, j, i]
                let new_row = h * hd + i * 2 + j;
                let old_row = h * hd + j * half + i;
                out[new_row * cols..(new_row + 1) * cols].copy_from_slice(&w[old_row * cols..(old_row + 1) * cols]);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// A minimal GGUF v3 writer (GGUF spec: little-endian header, typed key/values, tensor infos with
// dims in ggml order (innermost first), data aligned to `general.alignment` = 32).
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
enum Mv {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArr(Vec<String>),
    I32Arr(Vec<i32>),
}

#[derive(Clone)]
struct RawTensor {
    name: String,
    /// Hugging Face / candle order (outermost first).
    dims: Vec<usize>,
    ggml_type: u32,
    data: Vec<u8>,
}

#[derive(Clone, Default)]
struct GgufBuilder {
    kvs: Vec<(String, Mv)>,
    tensors: Vec<RawTensor>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

impl GgufBuilder {
    fn kv(&mut self, k: &str, v: Mv) -> &mut Self {
        self.kvs.retain(|(key, _)| key != k);
        self.kvs.push((k.to_string(), v));
        self
    }
    fn remove_kv(&mut self, k: &str) -> &mut Self {
        self.kvs.retain(|(key, _)| key != k);
        self
    }
    fn f32_tensor(&mut self, name: &str, dims: &[usize], values: &[f32]) -> &mut Self {
        assert_eq!(dims.iter().product::<usize>(), values.len());
        self.tensors.retain(|t| t.name != name);
        self.tensors.push(RawTensor {
            name: name.into(),
            dims: dims.to_vec(),
            ggml_type: 0,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        self
    }
    fn remove_tensor(&mut self, name: &str) -> &mut Self {
        self.tensors.retain(|t| t.name != name);
        self
    }
    /// Bytes of the file and the offset where tensor data starts.
    fn build_with_data_offset(&self) -> (Vec<u8>, usize) {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut b, k);
            match v {
                Mv::U32(x) => {
                    b.extend_from_slice(&4u32.to_le_bytes());
                    b.extend_from_slice(&x.to_le_bytes());
                }
                Mv::F32(x) => {
                    b.extend_from_slice(&6u32.to_le_bytes());
                    b.extend_from_slice(&x.to_le_bytes());
                }
                Mv::Bool(x) => {
                    b.extend_from_slice(&7u32.to_le_bytes());
                    b.push(*x as u8);
                }
                Mv::Str(s) => {
                    b.extend_from_slice(&8u32.to_le_bytes());
                    put_str(&mut b, s);
                }
                Mv::StrArr(a) => {
                    b.extend_from_slice(&9u32.to_le_bytes());
                    b.extend_from_slice(&8u32.to_le_bytes());
                    b.extend_from_slice(&(a.len() as u64).to_le_bytes());
                    for s in a {
                        put_str(&mut b, s);
                    }
                }
                Mv::I32Arr(a) => {
                    b.extend_from_slice(&9u32.to_le_bytes());
                    b.extend_from_slice(&5u32.to_le_bytes());
                    b.extend_from_slice(&(a.len() as u64).to_le_bytes());
                    for x in a {
                        b.extend_from_slice(&x.to_le_bytes());
                    }
                }
            }
        }
        let align = |n: usize| n.div_ceil(32) * 32;
        let mut offset = 0usize;
        for t in &self.tensors {
            put_str(&mut b, &t.name);
            b.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in t.dims.iter().rev() {
                b.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            b.extend_from_slice(&t.ggml_type.to_le_bytes());
            b.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = align(offset + t.data.len());
        }
        b.resize(align(b.len()), 0);
        let data_start = b.len();
        for t in &self.tensors {
            b.extend_from_slice(&t.data);
            b.resize(align(b.len()), 0);
        }
        (b, data_start)
    }
    fn build(&self) -> Vec<u8> {
        self.build_with_data_offset().0
    }
}

// Tiny llama: hidden 16, 2 heads of dim 8, 1 kv head, ffn 24, 2 layers, vocab 8. A head dim
// of at least 6 matters: for head_dim 4 llama.cpp's permutation is its own inverse, so a test
// could not tell the un-permutation from the permutation.
const H: usize = 16;
const HEADS: usize = 2;
const KV: usize = 1;
const HD: usize = 8;
const FFN: usize = 24;
const LAYERS: usize = 2;
const TOKENS: [&str; 8] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "Ġ", "ab", "Ġab"];

/// The tiny model in Hugging Face layout: (HF name, shape, values). `output` adds an untied
/// `lm_head.weight`; `bias` adds q/k/v biases.
fn tiny_hf_tensors(output: bool, bias: bool) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let v = TOKENS.len();
    let mut out = Vec::new();
    let mut seed = 1u64;
    let mut add = |name: String, dims: Vec<usize>| {
        seed += 1;
        let n = dims.iter().product();
        out.push((name, dims, lcg_values(seed, n)));
    };
    add("model.embed_tokens.weight".into(), vec![v, H]);
    add("model.norm.weight".into(), vec![H]);
    if output {
        add("lm_head.weight".into(), vec![v, H]);
    }
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![H]);
        add(format!("{p}.post_attention_layernorm.weight"), vec![H]);
        add(format!("{p}.self_attn.q_proj.weight"), vec![HEADS * HD, H]);
        add(format!("{p}.self_attn.k_proj.weight"), vec![KV * HD, H]);
        add(format!("{p}.self_attn.v_proj.weight"), vec![KV * HD, H]);
        add(format!("{p}.self_attn.o_proj.weight"), vec![H, HEADS * HD]);
        add(format!("{p}.mlp.gate_proj.weight"), vec![FFN, H]);
        add(format!("{p}.mlp.up_proj.weight"), vec![FFN, H]);
        add(format!("{p}.mlp.down_proj.weight"), vec![H, FFN]);
        if bias {
            add(format!("{p}.self_attn.q_proj.bias"), vec![HEADS * HD]);
            add(format!("{p}.self_attn.k_proj.bias"), vec![KV * HD]);
            add(format!("{p}.self_attn.v_proj.bias"), vec![KV * HD]);
        }
    }
    out
}

/// HF name -> GGUF name (the inverse table, written independently of the library).
fn hf_to_gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (l, rest) = rest.split_once('.').unwrap();
    let table = [
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    let (module, param) = rest.rsplit_once('.').unwrap();
    let g = table.iter().find(|(h, _)| *h == module).unwrap().1;
    format!("blk.{l}.{g}.{param}")
}

fn tiny_builder(output: bool, bias: bool) -> GgufBuilder {
    let mut g = GgufBuilder::default();
    g.kv("general.architecture", Mv::Str("llama".into()))
        .kv("general.name", Mv::Str("tiny-test".into()))
        .kv("llama.context_length", Mv::U32(256))
        .kv("llama.embedding_length", Mv::U32(H as u32))
        .kv("llama.feed_forward_length", Mv::U32(FFN as u32))
        .kv("llama.block_count", Mv::U32(LAYERS as u32))
        .kv("llama.attention.head_count", Mv::U32(HEADS as u32))
        .kv("llama.attention.head_count_kv", Mv::U32(KV as u32))
        .kv("llama.rope.freq_base", Mv::F32(50000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", Mv::F32(1e-5))
        .kv("tokenizer.ggml.model", Mv::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Mv::Str("smollm".into()))
        .kv("tokenizer.ggml.tokens", Mv::StrArr(TOKENS.iter().map(|s| s.to_string()).collect()))
        .kv("tokenizer.ggml.token_type", Mv::I32Arr(vec![3, 3, 3, 1, 1, 1, 1, 1]))
        .kv("tokenizer.ggml.merges", Mv::StrArr(vec!["a b".into(), "Ġ ab".into()]))
        .kv("tokenizer.ggml.bos_token_id", Mv::U32(1))
        .kv("tokenizer.ggml.eos_token_id", Mv::U32(2))
        .kv("tokenizer.ggml.padding_token_id", Mv::U32(2))
        .kv("tokenizer.ggml.add_bos_token", Mv::Bool(false))
        .kv(
            "tokenizer.chat_template",
            // SmolLM2-Instruct's own template (ChatML with a default system prompt).
            Mv::Str(include_str!("../../../__test__/fixtures/chat_templates/HuggingFaceTB-SmolLM2-135M-Instruct.jinja").into()),
        );
    for (name, dims, values) in tiny_hf_tensors(output, bias) {
        let gname = hf_to_gguf_name(&name);
        let values = if name.contains("q_proj") || name.contains("k_proj") {
            let n_head = if name.contains("q_proj") { HEADS } else { KV };
            let cols = if dims.len() == 2 { dims[1] } else { 1 };
            llama_cpp_permute(&values, dims[0], cols, n_head)
        } else {
            values
        };
        g.f32_tensor(&gname, &dims, &values);
    }
    g
}

fn tensor_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tiny hand-written GGUF files
// ---------------------------------------------------------------------------------------------

#[test]
fn tiny_gguf_renames_and_unpermutes_qk_exactly() {
    let path = write_tmp("tiny_tied.gguf", &tiny_builder(false, false).build());
    let m = load_gguf(&path, DType::F32, &Device::Cpu).expect("tiny GGUF loads");

    let c = &m.config;
    assert_eq!(c.hidden_size, H);
    assert_eq!(c.num_attention_heads, HEADS);
    assert_eq!(c.num_key_value_heads, KV);
    assert_eq!(c.head_dim, HD);
    assert_eq!(c.intermediate_size, FFN);
    assert_eq!(c.num_hidden_layers, LAYERS);
    assert_eq!(c.vocab_size, TOKENS.len(), "vocab size falls back to the token list length");
    assert_eq!(c.max_position_embeddings, 256);
    assert_eq!(c.rope_theta, 50000.0);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-12);
    assert!(c.tie_word_embeddings);
    assert!(!c.attention_bias && !c.mlp_bias);
    assert_eq!((c.bos_token_id, c.eos_token_id.clone(), c.pad_token_id), (Some(1), vec![2], Some(2)));
    assert_eq!(c.architecture, "LlamaForCausalLM");
    assert_eq!(c.model_type, "llama");
    assert_eq!(c.name_or_path.as_deref(), Some("tiny-test"));
    assert_eq!(c.dtype.as_deref(), Some("float32"));

    let expected = tiny_hf_tensors(false, false);
    let mut names: Vec<&String> = m.tensors.keys().collect();
    names.sort();
    let mut want: Vec<&String> = expected.iter().map(|(n, _, _)| n).collect();
    want.sort();
    assert_eq!(names, want, "exactly the HF tensor names, no lm_head when tied");
    for (name, dims, values) in &expected {
        let t = &m.tensors[name];
        assert_eq!(t.dims(), dims.as_slice(), "{name} shape");
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(&tensor_vec(t), values, "{name} must equal the HF tensor exactly");
    }
    // The permutation is neither the identity nor its own inverse for these shapes, so the
    // comparison above checks the direction of the un-permutation too.
    let q = &expected.iter().find(|(n, _, _)| n == "model.layers.0.self_attn.q_proj.weight").unwrap().2;
    let once = llama_cpp_permute(q, HEADS * HD, H, HEADS);
    assert_ne!(&once, q);
    assert_ne!(&llama_cpp_permute(&once, HEADS * HD, H, HEADS), q);

    // The embedded tokenizer works too.
    let tok = &m.tokenizer;
    assert_eq!(tok.vocab_size(), TOKENS.len());
    assert_eq!(tok.encode("ab ab", false).unwrap(), vec![6, 7]);
    assert_eq!(tok.encode("<|im_start|>ab<|im_end|>", true).unwrap(), vec![1, 6, 2], "no BOS: add_bos_token=false");
    assert_eq!(tok.decode(&[1, 6, 7, 2], false).unwrap(), "<|im_start|>ab ab<|im_end|>");
    assert_eq!(tok.decode(&[1, 6, 7, 2], true).unwrap(), "ab ab");
    assert_eq!((tok.bos_token_id(), tok.eos_token_id(), tok.pad_token_id()), (Some(1), Some(2), Some(2)));
}

#[test]
fn tiny_gguf_untied_with_biases_and_bf16() {
    let path = write_tmp("tiny_untied.gguf", &tiny_builder(true, true).build());
    let m = load_gguf(&path, DType::BF16, &Device::Cpu).expect("tiny GGUF loads");
    assert!(!m.config.tie_word_embeddings);
    assert!(m.config.attention_bias);
    assert_eq!(m.config.dtype.as_deref(), Some("bfloat16"));
    let expected = tiny_hf_tensors(true, true);
    assert_eq!(m.tensors.len(), expected.len());
    assert!(m.tensors.contains_key("lm_head.weight"));
    for (name, dims, values) in &expected {
        let t = &m.tensors[name];
        assert_eq!(t.dims(), dims.as_slice(), "{name} shape");
        assert_eq!(t.dtype(), DType::BF16, "{name} dtype");
        let want: Vec<f32> = values.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
        assert_eq!(tensor_vec(t), want, "{name} (q/k biases are un-permuted like the weights)");
    }
}

#[test]
fn unpermute_qk_inverts_llama_cpp_permute() {
    // Several head counts / head dims, weights and biases.
    for &(n_head, hd, cols) in &[(1usize, 2usize, 3usize), (2, 4, 5), (3, 8, 1), (4, 6, 2)] {
        let rows = n_head * hd;
        let hf = lcg_values((n_head * 100 + hd) as u64, rows * cols);
        let gguf = llama_cpp_permute(&hf, rows, cols, n_head);
        let t = if cols == 1 {
            Tensor::from_vec(gguf, rows, &Device::Cpu).unwrap()
        } else {
            Tensor::from_vec(gguf, (rows, cols), &Device::Cpu).unwrap()
        };
        let back = unpermute_qk(&t, n_head).unwrap();
        assert_eq!(back.dims(), t.dims());
        assert_eq!(tensor_vec(&back), hf, "n_head {n_head}, head_dim {hd}, cols {cols}");
    }
    let bad = Tensor::zeros((6, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(unpermute_qk(&bad, 4).is_err(), "6 rows cannot hold 4 heads");
}

#[test]
fn gguf_names_map_to_transformers_names() {
    let cases = [
        ("token_embd.weight", Some("model.embed_tokens.weight")),
        ("output_norm.weight", Some("model.norm.weight")),
        ("output.weight", Some("lm_head.weight")),
        ("blk.0.attn_norm.weight", Some("model.layers.0.input_layernorm.weight")),
        ("blk.12.attn_q.weight", Some("model.layers.12.self_attn.q_proj.weight")),
        ("blk.3.attn_k.bias", Some("model.layers.3.self_attn.k_proj.bias")),
        ("blk.3.attn_v.weight", Some("model.layers.3.self_attn.v_proj.weight")),
        ("blk.29.attn_output.weight", Some("model.layers.29.self_attn.o_proj.weight")),
        ("blk.1.ffn_norm.weight", Some("model.layers.1.post_attention_layernorm.weight")),
        ("blk.1.ffn_gate.weight", Some("model.layers.1.mlp.gate_proj.weight")),
        ("blk.1.ffn_up.weight", Some("model.layers.1.mlp.up_proj.weight")),
        ("blk.1.ffn_down.bias", Some("model.layers.1.mlp.down_proj.bias")),
        ("blk.1.attn_norm.bias", None),
        ("blk.x.attn_q.weight", None),
        ("blk.01.attn_q.weight", None),
        ("rope_freqs.weight", None),
        ("blk.0.attn_qkv.weight", None),
    ];
    for (g, hf) in cases {
        assert_eq!(gguf_to_hf_name(g).as_deref(), hf, "{g}");
    }
}

#[test]
fn malformed_gguf_files_are_errors_not_panics() {
    let good = tiny_builder(false, false);
    let (bytes, data_start) = good.build_with_data_offset();

    // A non-float dtype is refused before reading.
    let p = write_tmp("good.gguf", &bytes);
    assert!(matches!(load_gguf(&p, DType::U8, &Device::Cpu), Err(PeftError::InvalidArgument { .. })));

    // Missing file.
    let missing = tmp_dir().join("does-not-exist.gguf");
    assert!(matches!(load_gguf(&missing, DType::F32, &Device::Cpu), Err(PeftError::NotFound { .. })));

    // Bad magic.
    let mut b = bytes.clone();
    b[0..4].copy_from_slice(b"GGML");
    let p = write_tmp("bad_magic.gguf", &b);
    let msg = assert_gguf_invalid(load_gguf(&p, DType::F32, &Device::Cpu), "bad magic");
    assert!(msg.contains("bad_magic.gguf"), "the message names the file: {msg}");
    assert_gguf_invalid(read_gguf_tokenizer(&p), "bad magic");

    // Unsupported version, big-endian.
    let mut b = bytes.clone();
    b[4..8].copy_from_slice(&7u32.to_le_bytes());
    assert_gguf_invalid(load_gguf(&write_tmp("v7.gguf", &b), DType::F32, &Device::Cpu), "version 7");
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_gguf_invalid(load_gguf(&write_tmp("be.gguf", &b), DType::F32, &Device::Cpu), "big-endian");

    // Truncated at every length inside the header and at many points inside the data.
    let p = tmp_dir().join("truncated.gguf");
    let cuts: Vec<usize> = (0..data_start).chain((data_start..bytes.len()).step_by(13)).collect();
    for &n in &cuts {
        std::fs::write(&p, &bytes[..n]).unwrap();
        match load_gguf(&p, DType::F32, &Device::Cpu) {
            Err(PeftError::GgufInvalid { .. }) => {}
            other => panic!("truncated to {n} of {} bytes: expected GgufInvalid, got {:?}", bytes.len(), other.map(|_| ())),
        }
    }
    std::fs::write(&p, &bytes[..bytes.len() - 40]).unwrap();
    assert_gguf_invalid(load_gguf(&p, DType::F32, &Device::Cpu), "truncated");
    std::fs::write(&p, &bytes[..10]).unwrap();
    assert_gguf_invalid(load_gguf(&p, DType::F32, &Device::Cpu), "too short");

    // Unknown tensor type id.
    let mut g = good.clone();
    g.tensors[0].ggml_type = 99;
    assert_gguf_invalid(load_gguf(&write_tmp("bad_type.gguf", &g.build()), DType::F32, &Device::Cpu), "unknown tensor type");

    // Unsupported architecture.
    let mut g = good.clone();
    g.kv("general.architecture", Mv::Str("gpt2".into()));
    assert_gguf_invalid(load_gguf(&write_tmp("arch.gguf", &g.build()), DType::F32, &Device::Cpu), "unsupported architecture `gpt2`");

    // Missing metadata key.
    let mut g = good.clone();
    g.remove_kv("llama.embedding_length");
    assert_gguf_invalid(load_gguf(&write_tmp("nokey.gguf", &g.build()), DType::F32, &Device::Cpu), "llama.embedding_length");

    // Wrongly typed metadata.
    let mut g = good.clone();
    g.kv("llama.block_count", Mv::Str("two".into()));
    assert_gguf_invalid(load_gguf(&write_tmp("badkey.gguf", &g.build()), DType::F32, &Device::Cpu), "llama.block_count");

    // Missing tensor.
    let mut g = good.clone();
    g.remove_tensor("blk.1.ffn_up.weight");
    assert_gguf_invalid(load_gguf(&write_tmp("notensor.gguf", &g.build()), DType::F32, &Device::Cpu), "blk.1.ffn_up.weight");

    // A tensor of the wrong shape.
    let mut g = good.clone();
    g.f32_tensor("blk.0.attn_k.weight", &[HD * 2, H], &vec![0.0; HD * 2 * H]);
    assert_gguf_invalid(load_gguf(&write_tmp("shape.gguf", &g.build()), DType::F32, &Device::Cpu), "blk.0.attn_k.weight");

    // An unexpected tensor.
    let mut g = good.clone();
    g.f32_tensor("blk.2.attn_norm.weight", &[H], &[1.0; H]);
    assert_gguf_invalid(load_gguf(&write_tmp("extra.gguf", &g.build()), DType::F32, &Device::Cpu), "blk.2.attn_norm.weight");

    // Head counts that do not divide.
    let mut g = good.clone();
    g.kv("llama.attention.head_count_kv", Mv::U32(3));
    assert_gguf_invalid(load_gguf(&write_tmp("heads.gguf", &g.build()), DType::F32, &Device::Cpu), "head_count_kv");

    // A special token id outside the vocabulary.
    let mut g = good.clone();
    g.kv("tokenizer.ggml.eos_token_id", Mv::U32(1000));
    assert_gguf_invalid(load_gguf(&write_tmp("eos.gguf", &g.build()), DType::F32, &Device::Cpu), "eos_token_id");

    // `general.alignment = 0` makes candle's parser divide by zero: caught, reported.
    let mut g = good.clone();
    g.kv("general.alignment", Mv::U32(0));
    let p = write_tmp("align0.gguf", &g.build());
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = load_gguf(&p, DType::F32, &Device::Cpu);
    std::panic::set_hook(hook);
    assert_gguf_invalid(r, "malformed");

    // Random byte corruption of the header: any result but a panic is acceptable.
    let p = tmp_dir().join("fuzz.gguf");
    let mut s = 0x9e3779b97f4a7c15u64;
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for _ in 0..300 {
        let mut b = bytes.clone();
        for _ in 0..3 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let pos = 4 + (s >> 33) as usize % (data_start - 4);
            b[pos] = (s >> 20) as u8;
        }
        std::fs::write(&p, &b).unwrap();
        let r = std::panic::catch_unwind(|| load_gguf(&p, DType::F32, &Device::Cpu).map(|_| ()));
        if r.is_err() {
            std::panic::set_hook(hook);
            panic!("load_gguf panicked on a corrupted header");
        }
    }
    std::panic::set_hook(hook);
}

#[test]
fn unsupported_gguf_tokenizer_is_refused() {
    let mut g = tiny_builder(false, false);
    g.kv("tokenizer.ggml.model", Mv::Str("t5".into()));
    let p = write_tmp("unigram.gguf", &g.build());
    match read_gguf_tokenizer(&p) {
        Err(PeftError::Tokenizer(msg)) => assert!(msg.contains("`tokenizer.ggml.model = t5` is not supported"), "{msg}"),
        other => panic!("expected a Tokenizer error, got {other:?}"),
    }
    let mut g = tiny_builder(false, false);
    g.kv("tokenizer.ggml.pre", Mv::Str("some-new-pre".into()));
    match read_gguf_tokenizer(&write_tmp("pre.gguf", &g.build())) {
        Err(PeftError::Tokenizer(msg)) => assert!(msg.contains("some-new-pre"), "{msg}"),
        other => panic!("expected a Tokenizer error, got {other:?}"),
    }
    let mut g = tiny_builder(false, false);
    g.kv("tokenizer.ggml.merges", Mv::StrArr(vec!["a zz".into()]));
    assert_gguf_invalid(read_gguf_tokenizer(&write_tmp("merges.gguf", &g.build())), "merges");
}

#[test]
fn gguf_pre_tokenizer_variants_build_and_encode() {
    for pre in ["gpt2", "default", "smollm", "llama-bpe", "qwen2"] {
        let mut g = tiny_builder(false, false);
        g.kv("tokenizer.ggml.pre", Mv::Str(pre.into()));
        let tok = read_gguf_tokenizer(&write_tmp(&format!("pre-{pre}.gguf"), &g.build())).unwrap();
        assert_eq!(tok.encode("ab ab", false).unwrap(), vec![6, 7], "pre = {pre}");
        assert_eq!(tok.decode(&[6, 7], false).unwrap(), "ab ab", "pre = {pre}");
    }
    let mut g = tiny_builder(false, false);
    g.remove_kv("tokenizer.ggml.pre");
    let tok = read_gguf_tokenizer(&write_tmp("pre-none.gguf", &g.build())).unwrap();
    assert_eq!(tok.encode("<|im_start|>ab ab", false).unwrap(), vec![1, 6, 7]);
}

#[test]
fn gguf_add_bos_token_is_respected() {
    let mut g = tiny_builder(false, false);
    g.kv("tokenizer.ggml.add_bos_token", Mv::Bool(true));
    let tok = read_gguf_tokenizer(&write_tmp("bos.gguf", &g.build())).unwrap();
    assert_eq!(tok.encode("ab", true).unwrap(), vec![1, 6]);
    assert_eq!(tok.encode("ab", false).unwrap(), vec![6]);
}

/// The tokenizer's own template, rendered (transformers' `apply_chat_template(tokenize=False)`).
fn chat(tok: &Tokenizer, msgs: &[ChatMessage], add_generation_prompt: bool) -> String {
    let opts = ChatOptions { add_generation_prompt, ..Default::default() };
    tok.apply_chat_template(&ChatMessage::to_json_list(msgs), &opts).unwrap()
}

#[test]
fn chat_template_chatml_and_default_system() {
    let tok = read_gguf_tokenizer(&write_tmp("chat.gguf", &tiny_builder(false, false).build())).unwrap();
    let msgs = vec![ChatMessage::new("user", "Hi!"), ChatMessage::new("assistant", "Hello.")];
    let out = chat(&tok, &msgs, true);
    assert_eq!(
        out,
        format!(
            "<|im_start|>system\n{SMOLLM_DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n\
             <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>assistant\n"
        )
    );
    let with_system = vec![ChatMessage::new("system", "Be terse."), ChatMessage::new("user", "Hi!")];
    assert_eq!(chat(&tok, &with_system, false), "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n");
    assert_eq!(chat(&tok, &[], true), "<|im_start|>assistant\n");
    assert_eq!(tok.special_tokens().iter().find(|(k, _)| k == "eos_token").map(|(_, v)| v.as_str()), Some("<|im_end|>"));

    // A GGUF without a template: a clear error naming the file, unless a template is given.
    let mut g = tiny_builder(false, false);
    g.remove_kv("tokenizer.chat_template");
    let tok = read_gguf_tokenizer(&write_tmp("chat2.gguf", &g.build())).unwrap();
    let err = tok.apply_chat_template(&ChatMessage::to_json_list(&msgs[..1]), &ChatOptions::default()).unwrap_err();
    assert_eq!(err.code(), "ERR_CHAT_TEMPLATE");
    assert!(err.to_string().contains("chat2.gguf") && err.to_string().contains("no chat template"), "{err}");
    let opts = ChatOptions { chat_template: Some("{{ eos_token }}{{ messages | length }}".into()), ..Default::default() };
    assert_eq!(tok.apply_chat_template(&ChatMessage::to_json_list(&msgs), &opts).unwrap(), "<|im_end|>2");
}

// ---------------------------------------------------------------------------------------------
// tokenizer.json folders
// ---------------------------------------------------------------------------------------------

fn llama_tokenizer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/llama_tokenizer")
}

#[test]
fn from_pretrained_word_level_folder() {
    let dir = llama_tokenizer_dir();
    let tok = Tokenizer::from_pretrained(&dir).unwrap();
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.pad_token_id(), Some(0));
    assert_eq!(tok.vocab_size(), 256);
    assert_eq!(tok.token_to_id("sentiment"), Some(6));
    assert_eq!(tok.id_to_token(5).as_deref(), Some("the"));
    let ids = tok.encode("classify the sentiment of this review", true).unwrap();
    assert_eq!(ids, vec![4, 5, 6, 7, 8, 9], "the post-processor adds no special tokens");
    assert_eq!(tok.encode("classify zzzunknown", false).unwrap(), vec![4, 3], "unknown words map to <unk>");
    assert_eq!(tok.decode(&ids, false).unwrap(), "classify the sentiment of this review");
    assert_eq!(tok.decode(&[1, 4, 5, 2], true).unwrap(), "classify the");
    assert!(tok.chat_template().is_none());
    assert!(matches!(
        tok.apply_chat_template(&ChatMessage::to_json_list(&[ChatMessage::new("user", "x")]), &ChatOptions::default()),
        Err(PeftError::ChatTemplate(_))
    ));

    // A tokenizer.json path reads its folder's tokenizer_config.json too; from_file does not.
    let via_file = Tokenizer::from_pretrained(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(via_file.eos_token_id(), Some(2));
    let bare = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(bare.eos_token_id(), None);
    assert_eq!(bare.encode("the", false).unwrap(), vec![5]);

    // transformers >= 4.47 writes chat_template.jinja next to tokenizer_config.json.
    let with_jinja = tmp_dir().join("jinja_tok_dir");
    std::fs::create_dir_all(&with_jinja).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir.join(f), with_jinja.join(f)).unwrap();
    }
    let jinja = format!("{{{{ '<|im_start|>system\n{SMOLLM_DEFAULT_SYSTEM_PROMPT}<|im_end|>\n' }}}}");
    std::fs::write(with_jinja.join("chat_template.jinja"), &jinja).unwrap();
    let tok = Tokenizer::from_pretrained(&with_jinja).unwrap();
    assert_eq!(tok.chat_template(), Some(jinja.as_str()));
    assert!(chat(&tok, &[ChatMessage::new("user", "x")], false).starts_with("<|im_start|>system\n"));

    // Missing things.
    let empty = tmp_dir().join("empty_tok_dir");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(matches!(Tokenizer::from_pretrained(&empty), Err(PeftError::NotFound { .. })));
    assert!(matches!(Tokenizer::from_pretrained(&empty.join("nope")), Err(PeftError::NotFound { .. })));
    let bad = tmp_dir().join("bad_tok_dir");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("tokenizer.json"), b"{ not json").unwrap();
    assert!(matches!(Tokenizer::from_pretrained(&bad), Err(PeftError::Tokenizer(_))));
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2-135M-Instruct GGUF
// ---------------------------------------------------------------------------------------------

#[test]
fn real_smollm2_gguf_config_and_tensors() {
    let path = need_real_gguf!("real_smollm2_gguf_config_and_tensors");
    let t0 = std::time::Instant::now();
    let m = load_gguf(&path, DType::F32, &Device::Cpu).unwrap();
    visible(&format!("SmolLM2-135M Q4_1 GGUF loaded (f32, CPU) in {:.2?}", t0.elapsed()));
    let c = &m.config;
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.num_hidden_layers, 30);
    assert_eq!(c.num_attention_heads, 9);
    assert_eq!(c.num_key_value_heads, 3);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.max_position_embeddings, 8192);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert!(c.tie_word_embeddings);
    assert!(!c.attention_bias && !c.mlp_bias);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_id, vec![2]);
    assert_eq!(c.pad_token_id, Some(2));
    assert_eq!(c.architecture, "LlamaForCausalLM");

    assert_eq!(m.tensors.len(), 272);
    let shape = |n: &str| m.tensors.get(n).unwrap_or_else(|| panic!("missing {n}")).dims().to_vec();
    assert_eq!(shape("model.embed_tokens.weight"), vec![49152, 576]);
    assert_eq!(shape("model.norm.weight"), vec![576]);
    assert!(!m.tensors.contains_key("lm_head.weight"));
    for l in 0..30 {
        let p = format!("model.layers.{l}");
        assert_eq!(shape(&format!("{p}.input_layernorm.weight")), vec![576]);
        assert_eq!(shape(&format!("{p}.post_attention_layernorm.weight")), vec![576]);
        assert_eq!(shape(&format!("{p}.self_attn.q_proj.weight")), vec![576, 576]);
        assert_eq!(shape(&format!("{p}.self_attn.k_proj.weight")), vec![192, 576]);
        assert_eq!(shape(&format!("{p}.self_attn.v_proj.weight")), vec![192, 576]);
        assert_eq!(shape(&format!("{p}.self_attn.o_proj.weight")), vec![576, 576]);
        assert_eq!(shape(&format!("{p}.mlp.gate_proj.weight")), vec![1536, 576]);
        assert_eq!(shape(&format!("{p}.mlp.up_proj.weight")), vec![1536, 576]);
        assert_eq!(shape(&format!("{p}.mlp.down_proj.weight")), vec![576, 1536]);
    }
    for t in m.tensors.values() {
        assert_eq!(t.dtype(), DType::F32);
    }
    // Values are finite and RMSNorm weights are plausible.
    let emb = &m.tensors["model.embed_tokens.weight"];
    let s = emb.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(s.is_finite() && s > 0.0);
    let norm = tensor_vec(&m.tensors["model.norm.weight"]);
    assert!(norm.iter().all(|v| v.is_finite()));
}

#[test]
fn real_smollm2_tokenizer() {
    let path = need_real_gguf!("real_smollm2_tokenizer");
    let tok = read_gguf_tokenizer(&path).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), vec![1]);
    assert_eq!(tok.encode("<|im_start|>", true).unwrap(), vec![1], "SmolLM2 adds no BOS");
    assert_eq!((tok.bos_token_id(), tok.eos_token_id(), tok.pad_token_id()), (Some(1), Some(2), Some(2)));

    let text = "Hello, world! Ça coûte 12,50 € — naïve café 日本語 🙂 ok?\n  indented\tline";
    let ids = tok.encode(text, false).unwrap();
    assert!(ids.len() > 10 && ids.iter().all(|&i| i < 49152));
    assert_eq!(tok.decode(&ids, false).unwrap(), text, "byte-level BPE round trip is lossless");

    // GPT-2 style pieces and SmolLM's individual-digit split.
    let hello = tok.encode("Hello world", false).unwrap();
    let pieces: Vec<String> = hello.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    assert_eq!(pieces, vec!["Hello", "Ġworld"]);
    let digits = tok.encode("12345", false).unwrap();
    let pieces: Vec<String> = digits.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    assert_eq!(pieces, vec!["1", "2", "3", "4", "5"]);

    // ChatML with SmolLM2's default system prompt, special tokens as single ids.
    let chat = chat(&tok, &[ChatMessage::new("user", "What is 2+2?")], true);
    assert_eq!(
        chat,
        format!("<|im_start|>system\n{SMOLLM_DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    );
    let ids = tok.encode(&chat, false).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3, "three <|im_start|>");
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2, "two <|im_end|>");
    assert_eq!(tok.decode(&ids, false).unwrap(), chat);
    let plain = tok.decode(&ids, true).unwrap();
    assert!(!plain.contains("<|im_start|>") && plain.contains("What is 2+2?"));

    // from_pretrained on the .gguf path gives the same tokenizer.
    let tok2 = Tokenizer::from_pretrained(&path).unwrap();
    assert_eq!(tok2.encode(text, false).unwrap(), tok.encode(text, false).unwrap());
}
