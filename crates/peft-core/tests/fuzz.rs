//! A bounded, seeded mutation fuzzer (no external fuzzing engine) over the three parsers that
//! read downloaded files: safetensors, GGUF and adapter_config.json. Inputs are random bytes and
//! mutations of valid files (byte flips, interesting values, truncation, extension, splices,
//! JSON-aware edits). The property: every input returns `Ok` or the parser's own error code,
//! and nothing panics. The number of inputs is fixed (not a time budget), so runs are
//! reproducible; `PEFT_FUZZ_SCALE=10` multiplies it for longer local runs. Each test prints how
//! many inputs it tried and the outcome counts.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use peft_core::io::{parse_safetensors, read_safetensors, safetensors_bytes};
use peft_core::tuners::LoraConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn visible(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn scale() -> usize {
    std::env::var("PEFT_FUZZ_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1)
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

const INTERESTING: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'}', b'[', b']', b',', b':', b'9', b'-'];

/// One random mutation of `b` (never more than 64 KiB longer than the seed).
fn mutate(rng: &mut StdRng, b: &mut Vec<u8>, dict: &[&[u8]]) {
    let n = b.len().max(1);
    match rng.random_range(0..9) {
        0 => {
            if !b.is_empty() {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => {
            if !b.is_empty() {
                let i = rng.random_range(0..b.len());
                b[i] = INTERESTING[rng.random_range(0..INTERESTING.len())];
            }
        }
        2 => b.truncate(rng.random_range(0..n)),
        3 => {
            let extra = rng.random_range(1..64);
            b.extend((0..extra).map(|_| rng.random::<u8>()));
        }
        4 => {
            // overwrite 8 bytes with an extreme little-endian u64 (lengths, counts, offsets)
            if b.len() >= 8 {
                let i = rng.random_range(0..b.len() - 7);
                let v: u64 = [0, 1, u64::MAX, u64::MAX / 2, 1 << 32, 1 << 40, (1 << 30) + 1, rng.random()][rng.random_range(0..8)];
                b[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        5 => {
            // splice a dictionary token
            let tok = dict[rng.random_range(0..dict.len())];
            let i = rng.random_range(0..=b.len());
            b.splice(i..i, tok.iter().copied());
        }
        6 => {
            // duplicate a range
            if b.len() > 2 {
                let i = rng.random_range(0..b.len() - 1);
                let j = rng.random_range(i + 1..b.len().min(i + 128) + 1);
                let chunk = b[i..j].to_vec();
                let at = rng.random_range(0..=b.len());
                b.splice(at..at, chunk);
            }
        }
        7 => {
            // delete a range
            if b.len() > 2 {
                let i = rng.random_range(0..b.len() - 1);
                let j = rng.random_range(i + 1..b.len().min(i + 64) + 1);
                b.drain(i..j);
            }
        }
        _ => {
            // replace a digit run with a huge or negative number
            if let Some(i) = (0..8).map(|_| rng.random_range(0..n)).find(|&i| b.get(i).is_some_and(|c| c.is_ascii_digit())) {
                let rep: &[u8] = [&b"18446744073709551615"[..], b"-1", b"1e309", b"99999999999", b"0"][rng.random_range(0..5)];
                b.splice(i..i + 1, rep.iter().copied());
            }
        }
    }
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.random_range(0..max);
    (0..n).map(|_| rng.random()).collect()
}

/// Run `f` under `catch_unwind`; a panic fails the test with the input's description.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            panic!("panic on {what}: {msg}");
        }
    }
}

fn count(outcomes: &mut BTreeMap<String, usize>, key: impl Into<String>) {
    *outcomes.entry(key.into()).or_default() += 1;
}

// ---------------------------------------------------------------------------------------------

fn st_seeds() -> Vec<Vec<u8>> {
    let dev = Device::Cpu;
    let a = Tensor::arange(0f32, 12., &dev).unwrap().reshape((3, 4)).unwrap();
    let b = Tensor::arange(0f32, 6., &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let c = Tensor::new(&[1i64, -2, 3], &dev).unwrap();
    let fixture = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../__test__/fixtures/cases/llama_lora_qv/adapter_model.safetensors")).unwrap();
    vec![
        safetensors_bytes(&[("base_model.model.q.lora_A.weight".into(), a.clone()), ("b".into(), b), ("c".into(), c)], Some(&[("format", "pt")])).unwrap(),
        safetensors_bytes(&[("w".into(), a)], None).unwrap(),
        fixture,
    ]
}

#[test]
fn fuzz_safetensors_reader() {
    let mut rng = StdRng::seed_from_u64(0x5afe);
    let seeds = st_seeds();
    let dict: &[&[u8]] = &[b"\"dtype\"", b"\"F32\"", b"\"I8\"", b"\"shape\"", b"[0,0]", b"\"data_offsets\"", b"{}", b"[]", b"null", b"\"__metadata__\"", b",\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}"];
    let n_mut = 6000 * scale();
    let n_rand = 1000 * scale();
    let mut outcomes = BTreeMap::new();
    let path = Path::new("fuzz.safetensors");
    for i in 0..n_mut + n_rand {
        let input = if i < n_mut {
            let mut b = seeds[i % seeds.len()].clone();
            for _ in 0..rng.random_range(1..5) {
                mutate(&mut rng, &mut b, dict);
            }
            b
        } else {
            random_bytes(&mut rng, 256)
        };
        let r = no_panic(&format!("safetensors input #{i} ({} bytes)", input.len()), || parse_safetensors(&input, path, &Device::Cpu));
        match r {
            Ok(ts) => {
                let bytes: usize = ts.iter().map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes()).sum();
                // I32 is widened to I64, hence the factor 2
                assert!(bytes <= 2 * input.len(), "input #{i}: {bytes} tensor bytes from a {}-byte file", input.len());
                count(&mut outcomes, "ok");
            }
            Err(e) => {
                assert_eq!(e.code(), "ERR_SAFETENSORS_INVALID", "input #{i}: {e}");
                assert!(e.to_string().contains("fuzz.safetensors"), "input #{i}: {e}");
                count(&mut outcomes, "ERR_SAFETENSORS_INVALID");
            }
        }
    }
    // The file path (read_safetensors: length checks against the file size) on a subset.
    let dir = tmp_dir("st");
    let p = dir.join("fuzz.safetensors");
    let n_file = 500 * scale();
    for i in 0..n_file {
        let mut b = seeds[i % seeds.len()].clone();
        mutate(&mut rng, &mut b, dict);
        std::fs::write(&p, &b).unwrap();
        match no_panic(&format!("safetensors file #{i}"), || read_safetensors(&p, &Device::Cpu)) {
            Ok(_) => count(&mut outcomes, "file ok"),
            Err(e) => {
                assert_eq!(e.code(), "ERR_SAFETENSORS_INVALID", "file #{i}: {e}");
                count(&mut outcomes, "file ERR_SAFETENSORS_INVALID");
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    visible(&format!("fuzz safetensors: {} inputs ({n_mut} mutated, {n_rand} random, {n_file} via files), no panic; outcomes {outcomes:?}", n_mut + n_rand + n_file));
}

// ---------------------------------------------------------------------------------------------

/// A small but complete llama GGUF (1 layer, vocab 6, F32 and Q8_0 tensors) written with
/// candle's GGUF writer.
fn gguf_seed() -> Vec<u8> {
    use gguf_file::Value as V;
    let (h, ffn, vocab) = (32usize, 64usize, 6usize);
    let dev = Device::Cpu;
    // deterministic values (candle's randn is not seeded), so every run fuzzes the same seed file
    let t = |dims: &[usize], q: GgmlDType| {
        let n: usize = dims.iter().product();
        let v = Tensor::arange(0u32, n as u32, &dev).unwrap().to_dtype(DType::F32).unwrap();
        let v = ((v * 0.37).unwrap().sin().unwrap() * 0.1).unwrap().reshape(dims).unwrap();
        QTensor::quantize(&v, q).unwrap()
    };
    let tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), t(&[vocab, h], GgmlDType::F32)),
        ("output_norm.weight".into(), t(&[h], GgmlDType::F32)),
        ("blk.0.attn_norm.weight".into(), t(&[h], GgmlDType::F32)),
        ("blk.0.ffn_norm.weight".into(), t(&[h], GgmlDType::F32)),
        ("blk.0.attn_q.weight".into(), t(&[h, h], GgmlDType::Q8_0)),
        ("blk.0.attn_k.weight".into(), t(&[h / 2, h], GgmlDType::F32)),
        ("blk.0.attn_v.weight".into(), t(&[h / 2, h], GgmlDType::F32)),
        ("blk.0.attn_output.weight".into(), t(&[h, h], GgmlDType::Q8_0)),
        ("blk.0.ffn_gate.weight".into(), t(&[ffn, h], GgmlDType::Q8_0)),
        ("blk.0.ffn_up.weight".into(), t(&[ffn, h], GgmlDType::F32)),
        ("blk.0.ffn_down.weight".into(), t(&[h, ffn], GgmlDType::Q8_0)),
    ];
    let tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab"];
    let md: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.context_length", V::U32(64)),
        ("llama.embedding_length", V::U32(h as u32)),
        ("llama.feed_forward_length", V::U32(ffn as u32)),
        ("llama.block_count", V::U32(1)),
        ("llama.attention.head_count", V::U32(4)),
        ("llama.attention.head_count_kv", V::U32(2)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("tokenizer.ggml.model", V::String("gpt2".into())),
        ("tokenizer.ggml.pre", V::String("smollm".into())),
        ("tokenizer.ggml.tokens", V::Array(tokens.iter().map(|s| V::String(s.to_string())).collect())),
        ("tokenizer.ggml.token_type", V::Array(vec![V::I32(3), V::I32(3), V::I32(3), V::I32(1), V::I32(1), V::I32(1)])),
        ("tokenizer.ggml.merges", V::Array(vec![V::String("a b".into())])),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
    ];
    let mut buf = std::io::Cursor::new(Vec::new());
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut buf, &md_refs, &t_refs).unwrap();
    buf.into_inner()
}

#[test]
fn fuzz_gguf_parser() {
    let mut rng = StdRng::seed_from_u64(0x6661);
    let seed = gguf_seed();
    let dir = tmp_dir("gguf");
    let p = dir.join("fuzz.gguf");
    // the seed itself loads (so the mutations start from a file that gets deep into the loader)
    std::fs::write(&p, &seed).unwrap();
    let m = peft_core::gguf::load_gguf(&p, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("seed: [{}] {e}", e.code()));
    assert_eq!(m.config.num_hidden_layers, 1);
    let dict: &[&[u8]] = &[b"GGUF", b"llama", &8u32.to_le_bytes(), &9u32.to_le_bytes(), &12u32.to_le_bytes(), &99u32.to_le_bytes()];
    let n_mut = 1500 * scale();
    let n_rand = 300 * scale();
    let mut outcomes = BTreeMap::new();
    let quiet = std::panic::take_hook();
    for i in 0..n_mut + n_rand {
        let input = if i < n_mut {
            let mut b = seed.clone();
            // keep most mutations in the header, where the parser is
            for _ in 0..rng.random_range(1..4) {
                let header_len = 1200.min(b.len());
                if rng.random_bool(0.8) {
                    let mut head = b[..header_len].to_vec();
                    mutate(&mut rng, &mut head, dict);
                    b.splice(..header_len, head);
                } else {
                    mutate(&mut rng, &mut b, dict);
                }
            }
            b
        } else {
            let mut b = b"GGUF\x03\x00\x00\x00".to_vec();
            b.extend(random_bytes(&mut rng, 512));
            b
        };
        std::fs::write(&p, &input).unwrap();
        // load_gguf catches candle's panics itself (and says so in the error); silence the hook's
        // printing of those while the property (no panic escapes) is checked.
        std::panic::set_hook(Box::new(|_| {}));
        let r = catch_unwind(AssertUnwindSafe(|| peft_core::gguf::load_gguf(&p, DType::F32, &Device::Cpu).map(|_| ())));
        let _ = std::panic::take_hook();
        match r {
            Err(_) => {
                std::panic::set_hook(quiet);
                panic!("load_gguf panicked on input #{i} ({} bytes)", input.len());
            }
            Ok(Ok(())) => count(&mut outcomes, "ok"),
            Ok(Err(e)) => {
                let code = e.code();
                assert!(
                    ["ERR_GGUF_INVALID", "ERR_TOKENIZER", "ERR_SHAPE_MISMATCH"].contains(&code),
                    "input #{i}: unexpected code {code}: {e}"
                );
                if code == "ERR_GGUF_INVALID" {
                    assert!(e.to_string().contains("fuzz.gguf"), "input #{i}: {e}");
                }
                count(&mut outcomes, code);
            }
        }
    }
    std::panic::set_hook(quiet);
    std::fs::remove_dir_all(&dir).unwrap();
    visible(&format!("fuzz gguf: {} inputs ({n_mut} mutated, {n_rand} random), no panic; outcomes {outcomes:?}", n_mut + n_rand));
}

// ---------------------------------------------------------------------------------------------

fn random_json(rng: &mut StdRng, depth: usize) -> serde_json::Value {
    use serde_json::Value as J;
    match rng.random_range(0..if depth > 2 { 6 } else { 8 }) {
        0 => J::Null,
        1 => J::Bool(rng.random()),
        2 => J::from([0i64, 1, -1, 8, 1 << 40, i64::MAX, i64::MIN][rng.random_range(0..7)]),
        3 => serde_json::Number::from_f64([0.5, -3.0, 1e300, 16.0, 0.0][rng.random_range(0..5)]).map(J::Number).unwrap_or(J::Null),
        4 | 5 => J::String(
            ["q_proj", "v_proj", "all-linear", "LORA", "(a+)+b", ".*\\.(q|v)_proj", "(", "", "gaussian", "none", "lora_only", "layers"][rng.random_range(0..12)].into(),
        ),
        6 => J::Array((0..rng.random_range(0..4)).map(|_| random_json(rng, depth + 1)).collect()),
        _ => J::Object((0..rng.random_range(0..4)).map(|_| (["q_proj", "x", "layers.0.self_attn.v_proj", ".*"][rng.random_range(0..4)].to_string(), random_json(rng, depth + 1))).collect()),
    }
}

#[test]
fn fuzz_adapter_config_parser() {
    let mut rng = StdRng::seed_from_u64(0xada9);
    let fixture = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../__test__/fixtures/cases/llama_lora_qv/adapter_config.json")).unwrap();
    let base: serde_json::Value = serde_json::from_slice(&fixture).unwrap();
    let keys: Vec<String> = base.as_object().unwrap().keys().cloned().collect();
    let modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head", "model.layers.12.self_attn.v_proj"];
    let dict: &[&[u8]] = &[b"\"r\"", b"\"target_modules\"", b"null", b"[]", b"{}", b"\"(a+)+$\"", b"true", b"-1"];
    let n_field = 6000 * scale();
    let n_text = 3000 * scale();
    let mut outcomes = BTreeMap::new();
    let path = Path::new("adapter_config.json");
    let check = |i: usize, v: &serde_json::Value, outcomes: &mut BTreeMap<String, usize>| {
        match no_panic(&format!("adapter_config input #{i}"), || LoraConfig::from_json(v, Some(path))) {
            Ok(cfg) => {
                assert!(cfg.r >= 1 && cfg.r <= peft_core::tuners::lora::MAX_RANK, "input #{i}: r = {}", cfg.r);
                no_panic(&format!("targeting #{i}"), || {
                    for m in modules {
                        let _ = cfg.rule().select(m, m == "lm_head");
                        let _ = cfg.rank_for(m);
                        let _ = cfg.alpha_for(m);
                    }
                    let _ = cfg.to_json_string();
                });
                count(outcomes, "ok");
            }
            Err(e) => {
                assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID", "input #{i}: {e}");
                assert!(e.to_string().contains("adapter_config.json"), "input #{i}: {e}");
                count(outcomes, "ERR_ADAPTER_CONFIG_INVALID");
            }
        }
    };
    // structure-aware: random values in 1-3 fields of the real config, or random top-level values
    for i in 0..n_field {
        let v = if rng.random_bool(0.9) {
            let mut v = base.clone();
            for _ in 0..rng.random_range(1..4) {
                let k = &keys[rng.random_range(0..keys.len())];
                v[k.as_str()] = random_json(&mut rng, 0);
            }
            v
        } else {
            random_json(&mut rng, 0)
        };
        check(i, &v, &mut outcomes);
    }
    // text mutations of the file, through the JSON parser
    for i in 0..n_text {
        let mut b = fixture.clone();
        for _ in 0..rng.random_range(1..4) {
            mutate(&mut rng, &mut b, dict);
        }
        match serde_json::from_slice::<serde_json::Value>(&b) {
            Ok(v) => check(n_field + i, &v, &mut outcomes),
            Err(_) => count(&mut outcomes, "not JSON"),
        }
    }
    visible(&format!("fuzz adapter_config: {} inputs ({n_field} structured, {n_text} text mutations), no panic; outcomes {outcomes:?}", n_field + n_text));
}
