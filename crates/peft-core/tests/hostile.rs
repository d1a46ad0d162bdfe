//! Hostile inputs: malformed safetensors, GGUF and adapter_config.json files must give the
//! documented error code with a message naming the file and the tensor/key at fault, never a
//! panic, and never an allocation sized by the attacker before validation.
//!
//! The allocation claim is measured: this test binary's global allocator records, per thread,
//! the largest single allocation made while a [`peak_alloc`] closure runs.

use candle_core::{Device, Tensor};
use peft_core::io::{read_safetensors, safetensors_bytes};
use peft_core::tuners::LoraConfig;
use peft_core::PeftError;
use serde_json::json;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Largest-allocation tracker (per thread, so parallel tests do not disturb each other)
// ---------------------------------------------------------------------------------------------

struct Tracking;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let _ = PEAK.try_with(|p| p.set(p.get().max(size)));
        }
    });
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Run `f` and return its result with the largest single allocation it made on this thread.
fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    PEAK.with(|p| p.set(0));
    TRACK.with(|t| t.set(true));
    let r = f();
    TRACK.with(|t| t.set(false));
    (r, PEAK.with(|p| p.get()))
}

/// No allocation above this while rejecting a small hostile file (the files here are < 64 KiB).
const SMALL: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn tmp_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hostile-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn st_file(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(&h);
    b.extend_from_slice(data);
    b
}

/// Assert `r` is `ERR_SAFETENSORS_INVALID` mentioning the file name and every `needles`.
fn assert_st_invalid<T: std::fmt::Debug>(r: peft_core::Result<T>, file: &str, needles: &[&str], case: &str) {
    match r {
        Err(e) => {
            let msg = e.to_string();
            assert_eq!(e.code(), "ERR_SAFETENSORS_INVALID", "{case}: {msg}");
            assert!(msg.contains(file), "{case}: message should name the file: {msg}");
            for n in needles {
                assert!(msg.contains(n), "{case}: message should mention {n:?}: {msg}");
            }
        }
        Ok(v) => panic!("{case}: expected ERR_SAFETENSORS_INVALID, got Ok({v:?})"),
    }
}

fn read_hostile(dir: &Path, name: &str, bytes: &[u8]) -> (peft_core::Result<Vec<(String, Tensor)>>, usize) {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    peak_alloc(|| read_safetensors(&p, &Device::Cpu))
}

// ---------------------------------------------------------------------------------------------
// Safetensors
// ---------------------------------------------------------------------------------------------

#[test]
fn hostile_safetensors_are_refused_with_file_and_tensor_named() {
    let dir = tmp_dir("st");
    let f32s = |n: usize| vec![0u8; 4 * n];
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        // header length past the end of the file
        ("len_past_eof.safetensors", { let mut b = 1000u64.to_le_bytes().to_vec(); b.extend_from_slice(b"{}"); b }, vec!["header length 1000", "past the end"]),
        // absurdly large header length (must not be allocated)
        ("len_huge.safetensors", { let mut b = u64::MAX.to_le_bytes().to_vec(); b.extend_from_slice(b"{}"); b }, vec!["exceeds the limit"]),
        ("len_99mb.safetensors", { let mut b = 99_000_000u64.to_le_bytes().to_vec(); b.extend_from_slice(b"{}"); b }, vec!["past the end"]),
        // header JSON that is not an object
        ("array.safetensors", st_file(&json!([1, 2, 3]), &[]), vec!["must be a JSON object", "an array"]),
        ("string.safetensors", st_file(&json!("x"), &[]), vec!["must be a JSON object"]),
        ("not_json.safetensors", { let mut b = 5u64.to_le_bytes().to_vec(); b.extend_from_slice(b"{nope"); b }, vec!["not valid JSON"]),
        ("not_utf8.safetensors", { let mut b = 4u64.to_le_bytes().to_vec(); b.extend_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]); b }, vec!["UTF-8"]),
        // overlapping offsets
        (
            "overlap.safetensors",
            st_file(&json!({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}), &f32s(6)),
            vec!["`b`", "overlaps tensor `a`"],
        ),
        // offsets past the data
        (
            "past_data.safetensors",
            st_file(&json!({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}), &f32s(4)),
            vec!["`w`", "run past the data"],
        ),
        (
            "past_data_u64.safetensors",
            st_file(&json!({"w": {"dtype": "F32", "shape": [4611686018427387904u64], "data_offsets": [0, 18446744073709551615u64]}}), &f32s(4)),
            vec!["`w`"],
        ),
        // offsets disagreeing with dtype × shape
        (
            "size.safetensors",
            st_file(&json!({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}), &f32s(4)),
            vec!["`w`", "needs 24"],
        ),
        (
            "overflow.safetensors",
            st_file(&json!({"w": {"dtype": "F64", "shape": [4294967296u64, 4294967296u64, 16], "data_offsets": [0, 16]}}), &f32s(4)),
            vec!["`w`", "overflows"],
        ),
        // unknown / unsupported dtype
        ("dtype.safetensors", st_file(&json!({"w": {"dtype": "F42", "shape": [4], "data_offsets": [0, 16]}}), &f32s(4)), vec!["`w`", "unknown dtype \"F42\""]),
        ("dtype_i8.safetensors", st_file(&json!({"w": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]}}), &[0u8; 4]), vec!["`w`", "I8"]),
        // duplicate names (the JSON object has the key twice; a plain map would keep only one)
        (
            "dup.safetensors",
            {
                let h = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
                let mut b = (h.len() as u64).to_le_bytes().to_vec();
                b.extend_from_slice(h);
                b.extend_from_slice(&[0u8; 8]);
                b
            },
            vec!["`w`", "appears twice"],
        ),
        // malformed entries
        ("entry_type.safetensors", st_file(&json!({"w": 5}), &[]), vec!["`w`", "must be an object"]),
        ("shape_neg.safetensors", st_file(&json!({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}), &f32s(1)), vec!["`w`", "shape"]),
        ("offsets_bad.safetensors", st_file(&json!({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}), &f32s(1)), vec!["`w`", "data_offsets"]),
        ("offsets_rev.safetensors", st_file(&json!({"w": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}), &f32s(1)), vec!["`w`"]),
        ("gap.safetensors", st_file(&json!({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}), &f32s(2)), vec!["`w`", "gap"]),
        ("trailing.safetensors", st_file(&json!({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}), &f32s(3)), vec!["trailing"]),
        ("meta.safetensors", st_file(&json!({"__metadata__": {"format": 1}}), &[]), vec!["__metadata__"]),
        ("short.safetensors", vec![1, 2, 3], vec!["too short"]),
    ];
    for (name, bytes, needles) in &cases {
        let (r, peak) = read_hostile(&dir, name, bytes);
        assert_st_invalid(r, name, needles, name);
        assert!(peak < SMALL, "{name}: an allocation of {peak} bytes was made while rejecting a {}-byte file", bytes.len());
    }
    // A valid file still reads (the checks are not over-strict), zero-sized tensors included.
    let ok = st_file(
        &json!({"__metadata__": {"format": "pt"}, "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "i": {"dtype": "I32", "shape": [1], "data_offsets": [8, 12]}}),
        &[0, 0, 128, 63, 0, 0, 0, 64, 7, 0, 0, 0],
    );
    let (r, _) = read_hostile(&dir, "ok.safetensors", &ok);
    let r = r.unwrap();
    assert_eq!(r.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["e", "w", "i"]);
    assert_eq!(r[1].1.to_vec1::<f32>().unwrap(), [1.0, 2.0]);
    assert_eq!(r[2].1.to_vec1::<i64>().unwrap(), [7]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn safetensors_truncated_at_every_byte_is_refused() {
    let dir = tmp_dir("trunc");
    let a = Tensor::arange(0f32, 24., &Device::Cpu).unwrap().reshape((4, 6)).unwrap();
    let b = Tensor::arange(0f32, 8., &Device::Cpu).unwrap();
    let bytes = safetensors_bytes(&[("layer.lora_A.weight".into(), a), ("layer.lora_B.weight".into(), b)], Some(&[("format", "pt")])).unwrap();
    let p = dir.join("cut.safetensors");
    let mut max_peak = 0;
    for cut in 0..bytes.len() {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let (r, peak) = peak_alloc(|| read_safetensors(&p, &Device::Cpu));
        assert_st_invalid(r, "cut.safetensors", &[], &format!("cut at {cut}/{}", bytes.len()));
        max_peak = max_peak.max(peak);
    }
    assert!(max_peak < SMALL);
    // Cuts inside the data name the tensor whose bytes are missing.
    std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
    assert_st_invalid(read_safetensors(&p, &Device::Cpu), "cut.safetensors", &["layer.lora_B.weight", "run past"], "last bytes cut");
    // Appending bytes is refused too.
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 4]);
    std::fs::write(&p, &longer).unwrap();
    assert_st_invalid(read_safetensors(&p, &Device::Cpu), "cut.safetensors", &["trailing"], "4 bytes appended");
    std::fs::write(&p, &bytes).unwrap();
    assert_eq!(read_safetensors(&p, &Device::Cpu).unwrap().len(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// GGUF: counts and lengths larger than the file
// ---------------------------------------------------------------------------------------------

fn gguf_head(tensors: u64, kvs: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&tensors.to_le_bytes());
    b.extend_from_slice(&kvs.to_le_bytes());
    b
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

#[test]
fn hostile_gguf_counts_and_lengths_fail_without_huge_allocations() {
    // candle attaches a captured backtrace to its errors when RUST_BACKTRACE is set (as
    // `cargo test` runs may have it); symbolizing it allocates megabytes that have nothing to do
    // with the file. Library backtraces are switched off so that only the parser is measured.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    let dir = tmp_dir("gguf");
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    cases.push(("tensors_huge.gguf", { let mut b = gguf_head(1 << 40, 0); b.resize(64, 0); b }, "tensor_count"));
    cases.push(("kvs_huge.gguf", { let mut b = gguf_head(0, u64::MAX); b.resize(64, 0); b }, "metadata_kv_count"));
    cases.push(("kvs_past_file.gguf", { let mut b = gguf_head(0, 1000); b.resize(64, 0); b }, "remaining"));
    // a key whose length is u64::MAX / larger than the file
    cases.push(("key_len.gguf", { let mut b = gguf_head(0, 1); b.extend_from_slice(&u64::MAX.to_le_bytes()); b.resize(64, 0); b }, "string length"));
    cases.push(("key_len2.gguf", { let mut b = gguf_head(0, 1); b.extend_from_slice(&5000u64.to_le_bytes()); b.resize(64, 0); b }, "string length"));
    // a string value larger than the file
    cases.push((
        "str_len.gguf",
        {
            let mut b = gguf_head(0, 1);
            put_str(&mut b, "general.name");
            b.extend_from_slice(&8u32.to_le_bytes());
            b.extend_from_slice(&(1u64 << 29).to_le_bytes());
            b.extend_from_slice(b"abc");
            b
        },
        "string length",
    ));
    // an array whose element count is larger than the file
    cases.push((
        "arr_len.gguf",
        {
            let mut b = gguf_head(0, 1);
            put_str(&mut b, "tokenizer.ggml.tokens");
            b.extend_from_slice(&9u32.to_le_bytes());
            b.extend_from_slice(&8u32.to_le_bytes());
            b.extend_from_slice(&(1u64 << 29).to_le_bytes());
            b.resize(b.len() + 32, 0);
            b
        },
        "array",
    ));
    // unknown metadata value type
    cases.push((
        "value_type.gguf",
        {
            let mut b = gguf_head(0, 1);
            put_str(&mut b, "general.name");
            b.extend_from_slice(&77u32.to_le_bytes());
            b.resize(b.len() + 16, 0);
            b
        },
        "cannot parse",
    ));
    // tensor with too many dimensions / unknown ggml type / data past the end
    let tensor_info = |n_dims: u32, dims: &[u64], ty: u32, offset: u64| {
        let mut b = gguf_head(1, 0);
        put_str(&mut b, "token_embd.weight");
        b.extend_from_slice(&n_dims.to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b.resize(b.len().div_ceil(32) * 32 + 64, 0);
        b
    };
    cases.push(("ndims.gguf", tensor_info(u32::MAX, &[4], 0, 0), "dimensions"));
    cases.push(("ggml_type.gguf", tensor_info(1, &[4], 999, 0), "unknown tensor type"));
    // magic / version
    cases.push(("magic.gguf", { let mut b = gguf_head(0, 0); b[..4].copy_from_slice(b"GGUG"); b }, "bad magic"));
    cases.push(("version.gguf", { let mut b = gguf_head(0, 0); b[4..8].copy_from_slice(&99u32.to_le_bytes()); b }, "version 99"));
    cases.push(("short.gguf", b"GGUF".to_vec(), "too short"));
    for (name, bytes, needle) in &cases {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let (r, peak) = peak_alloc(|| peft_core::gguf::load_gguf(&p, candle_core::DType::F32, &Device::Cpu).map(|_| ()));
        let e = r.expect_err(name);
        let msg = e.to_string();
        assert_eq!(e.code(), "ERR_GGUF_INVALID", "{name}: {msg}");
        assert!(msg.contains(name), "{name}: the message names the file: {msg}");
        assert!(msg.contains(needle), "{name}: the message should mention {needle:?}: {msg}");
        assert!(peak < SMALL, "{name}: an allocation of {peak} bytes was made while rejecting a {}-byte file", bytes.len());
    }
    // Tensor data past the end of the file (a header that parses, a tensor that does not fit).
    let mut b = gguf_head(1, 0);
    put_str(&mut b, "token_embd.weight");
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&64u64.to_le_bytes());
    b.extend_from_slice(&(1u64 << 20).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    let p = dir.join("data_past.gguf");
    std::fs::write(&p, &b).unwrap();
    let (r, peak) = peak_alloc(|| peft_core::gguf::read_gguf_tokenizer(&p).map(|_| ()));
    assert!(r.is_err());
    assert!(peak < SMALL, "data_past.gguf: allocation of {peak} bytes");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// adapter_config.json / config.json
// ---------------------------------------------------------------------------------------------

fn cfg_err(v: serde_json::Value) -> PeftError {
    LoraConfig::from_json(&v, Some(Path::new("/x/adapter_config.json"))).expect_err(&v.to_string())
}

#[test]
fn hostile_adapter_configs_are_refused_naming_the_key() {
    let base = json!({"peft_type": "LORA", "target_modules": ["q_proj"], "r": 8, "lora_alpha": 16});
    let with = |k: &str, v: serde_json::Value| {
        let mut o = base.clone();
        o[k] = v;
        o
    };
    let cases = vec![
        (with("r", json!(0)), "`r`"),
        (with("r", json!(-4)), "`r`"),
        (with("r", json!(1_000_000_000u64)), "`r`"),
        (with("r", json!(8.5)), "`r`"),
        (with("r", json!("8")), "`r`"),
        (with("r", json!(null)), "`r`"),
        (with("lora_alpha", json!("16")), "`lora_alpha`"),
        (with("lora_alpha", json!([16])), "`lora_alpha`"),
        (with("lora_dropout", json!(1.5)), "`lora_dropout`"),
        (with("peft_type", json!("BOGUS")), "`peft_type`"),
        (with("peft_type", json!(7)), "`peft_type`"),
        (with("target_modules", json!(42)), "`target_modules`"),
        (with("target_modules", json!({"a": 1})), "`target_modules`"),
        (with("target_modules", json!([1, 2])), "`target_modules`"),
        (with("target_modules", json!("(unclosed")), "`target_modules`"),
        (with("target_modules", json!(null)), "`target_modules`"),
        // a regex whose compiled program is huge: refused by the engine's size limit
        (with("target_modules", json!("((a{100}){100}){100}")), "`target_modules`"),
        (with("exclude_modules", json!(3)), "`exclude_modules`"),
        (with("fan_in_fan_out", json!("yes")), "`fan_in_fan_out`"),
        (with("use_rslora", json!(1)), "`use_rslora`"),
        (with("bias", json!("some")), "`bias`"),
        (with("init_lora_weights", json!("loftq")), "`init_lora_weights`"),
        (with("init_lora_weights", json!("pissa_niter_x")), "`init_lora_weights`"),
        (with("modules_to_save", json!([1])), "`modules_to_save`"),
        (with("layers_to_transform", json!([-1])), "`layers_to_transform`"),
        (with("rank_pattern", json!({"q_proj": 1_000_000_000u64})), "`rank_pattern"),
        (with("rank_pattern", json!({"(": 4})), "`rank_pattern`"),
        (with("rank_pattern", json!([1])), "`rank_pattern`"),
        (with("alpha_pattern", json!({"q": "x"})), "`alpha_pattern"),
        (json!([1, 2]), "JSON object"),
        (json!("LORA"), "JSON object"),
    ];
    for (v, key) in cases {
        let e = cfg_err(v.clone());
        let msg = e.to_string();
        assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID", "{v}: {msg}");
        assert!(msg.contains("adapter_config.json"), "{v}: names the file: {msg}");
        assert!(msg.contains(key), "{v}: names {key}: {msg}");
    }
}

#[test]
fn catastrophic_backtracking_regexes_complete() {
    use peft_core::targeting::{matches_target, pattern_lookup};
    use peft_core::tuners::lora::TargetModules;
    // Exponential for backtracking engines on a non-matching subject; linear for `regex`.
    let evil = ["(a+)+b", "(a|a)*b", "(a|aa)+b", "(.*a){20}b", "(a*)*b"];
    let subject = format!("model.layers.0.{}", "a".repeat(50_000));
    for r in evil {
        let cfg = LoraConfig::from_json(&json!({"peft_type": "LORA", "target_modules": r, "rank_pattern": {r: 4}}), None).unwrap();
        assert!(!matches_target(&cfg.target_modules, &subject, false), "{r}");
        assert!(!matches_target(&TargetModules::Regex(r.into()), &subject, false), "{r}");
        assert_eq!(pattern_lookup(&[(r.to_string(), 4usize)], &subject), None, "{r}");
    }
}

#[test]
fn hostile_model_configs_are_refused_naming_the_key() {
    use peft_core::model::config::LlamaConfig;
    let good = json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256});
    assert!(LlamaConfig::from_json(&good, Path::new("config.json")).is_ok());
    let with = |k: &str, v: serde_json::Value| {
        let mut o = good.clone();
        o[k] = v;
        o
    };
    for (v, key) in [
        (with("hidden_size", json!("64")), "hidden_size"),
        (with("hidden_size", json!(-64)), "hidden_size"),
        (with("num_attention_heads", json!(0)), "num_attention_heads"),
        (with("num_key_value_heads", json!(3)), "num_key_value_heads"),
        (with("vocab_size", json!(1.5)), "vocab_size"),
        (with("rms_norm_eps", json!("small")), "rms_norm_eps"),
        (with("architectures", json!(["GPT2LMHeadModel"])), "GPT2LMHeadModel"),
        (json!([1]), "JSON object"),
    ] {
        let e = LlamaConfig::from_json(&v, Path::new("/m/config.json")).expect_err(&v.to_string());
        let msg = e.to_string();
        assert_eq!(e.code(), "ERR_MODEL_CONFIG_INVALID", "{v}: {msg}");
        assert!(msg.contains("config.json") && msg.contains(key), "{v}: {msg}");
    }
}
