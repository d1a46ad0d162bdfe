//! Exports: the GGUF v3 writer, HF LoRA adapters → llama.cpp GGUF LoRA files (names, q/k
//! permutation, rsLoRA / pattern scales folded into B, refusals with their codes), and merged
//! models written as GGUF and as HF folders, read back with independent readers (candle's GGUF
//! reader, our HF loader) and compared with the merged model's logits.
//!
//! The GGUF base is `__test__/fixtures/models/llama.gguf`, the tiny Llama fixture converted by
//! the PyPI `gguf` package (`__test__/scripts/make_tiny_llama_gguf.py`), so the fixture
//! adapters made by HF PEFT for `models/llama` fit it.

mod common;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{DType, Device, Tensor};
use common::{case_dir, fixtures_dir};
use peft_core::export::{self, GgmlType, GgufWriter, LoraExportOptions, MergedSaveOptions};
use peft_core::model::loader::load_causal_lm;
use peft_core::model::ForwardOptions;
use peft_core::peft_model::PeftModel;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn tiny_gguf() -> PathBuf {
    fixtures_dir().join("models/llama.gguf")
}

fn tiny_hf() -> PathBuf {
    fixtures_dir().join("models/llama")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peft-export-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every tensor of a GGUF file, dequantized to f32, with the metadata.
fn read_gguf(path: &Path) -> (HashMap<String, Value>, HashMap<String, (Tensor, u32)>) {
    let mut f = std::fs::File::open(path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut out = HashMap::new();
    for (name, info) in &c.tensor_infos {
        let ty = match info.ggml_dtype {
            candle_core::quantized::GgmlDType::F32 => 0,
            candle_core::quantized::GgmlDType::F16 => 1,
            candle_core::quantized::GgmlDType::Q8_0 => 8,
            other => panic!("unexpected type {other:?}"),
        };
        let q = info.read(&mut f, c.tensor_data_offset, &Device::Cpu).unwrap();
        out.insert(name.clone(), (q.dequantize(&Device::Cpu).unwrap(), ty));
    }
    (c.metadata, out)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn logits(m: &PeftModel, ids: &[u32]) -> Tensor {
    m.forward(ids, 1, ids.len(), &ForwardOptions::default(), None).unwrap().to_dtype(DType::F32).unwrap()
}

const IDS: [u32; 8] = [1, 17, 42, 99, 3, 250, 7, 128];

#[test]
fn gguf_writer_writes_v3_with_aligned_f32_f16_q8_0_tensors() {
    let d = scratch("writer");
    let p = d.join("w.gguf");
    let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
    let v = Tensor::randn(0f32, 1.0, (5,), &Device::Cpu).unwrap();
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("some.array", Value::Array(vec![Value::String("a".into()), Value::String("bc".into())]));
    w.set("some.f32", Value::F32(0.5));
    w.add_tensor("a", x.clone(), GgmlType::F32).unwrap();
    w.add_tensor("b", x.clone(), GgmlType::F16).unwrap();
    w.add_tensor("c", x.clone(), GgmlType::Q8_0).unwrap();
    // 5 values per row: Q8_0 is impossible, F16 is used.
    assert_eq!(w.add_tensor("d", v.clone(), GgmlType::Q8_0).unwrap(), GgmlType::F16);
    assert_eq!(w.add_tensor("a", v.clone(), GgmlType::F32).unwrap_err().code(), "ERR_INVALID_ARGUMENT");
    w.write(&p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(&bytes[0..4], b"GGUF");
    assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
    let mut f = std::fs::File::open(&p).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(c.tensor_data_offset % 32, 0);
    for info in c.tensor_infos.values() {
        assert_eq!(info.offset % 32, 0);
    }
    let (md, t) = read_gguf(&p);
    assert!(matches!(&md["some.array"], Value::Array(a) if a.len() == 2));
    assert!(matches!(md["some.f32"], Value::F32(x) if x == 0.5));
    assert_eq!(max_diff(&t["a"].0, &x), 0.0);
    assert!(max_diff(&t["b"].0, &x) < 2e-3);
    let amax = x.abs().unwrap().max(1).unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(max_diff(&t["c"].0, &x) <= amax / 127.0 * 0.5 + 1e-3, "q8_0 error beyond half a step");
    assert_eq!((t["a"].1, t["b"].1, t["c"].1, t["d"].1), (0, 1, 8, 1));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn tiny_gguf_fixture_equals_the_hf_fixture() {
    let g = PeftModel::new(load_causal_lm(&tiny_gguf(), DType::F32, &Device::Cpu).unwrap().model);
    let h = PeftModel::new(load_causal_lm(&tiny_hf(), DType::F32, &Device::Cpu).unwrap().model);
    assert!(max_diff(&logits(&g, &IDS), &logits(&h, &IDS)) < 1e-5);
}

/// The LoRA pairs of a GGUF LoRA file as HF would hold them: `(A, B · alpha / r)` with B's
/// q/k rows put back in HF order, by HF module path.
fn effective_pairs(path: &Path, n_head: usize, n_kv: usize) -> (f32, HashMap<String, (Tensor, Tensor)>) {
    let (md, t) = read_gguf(path);
    let alpha = match md["adapter.lora.alpha"] {
        Value::F32(a) => a,
        ref other => panic!("alpha {other:?}"),
    };
    let mut out = HashMap::new();
    for (name, (a, _)) in &t {
        let Some(base) = name.strip_suffix(".weight.lora_a") else { continue };
        let mut b = t[&format!("{base}.weight.lora_b")].0.clone();
        if base.ends_with("attn_q") {
            b = peft_core::gguf::unpermute_qk(&b, n_head).unwrap();
        } else if base.ends_with("attn_k") {
            b = peft_core::gguf::unpermute_qk(&b, n_kv).unwrap();
        }
        let r = b.dims()[1] as f64;
        let b = (b * (alpha as f64 / r)).unwrap();
        let hf = peft_core::gguf::gguf_to_hf_name(&format!("{base}.weight")).unwrap();
        out.insert(hf.strip_suffix(".weight").unwrap().to_string(), (a.clone(), b));
    }
    (alpha, out)
}

#[test]
fn lora_export_names_permutation_and_folded_scales_match_hf() {
    let d = scratch("lora");
    for (case, base) in [("llama_lora_qv", tiny_gguf()), ("llama_lora_qv_rslora", tiny_hf()), ("llama_lora_patterns", tiny_gguf())] {
        let out = d.join(format!("{case}.gguf"));
        let rep = export::export_gguf_lora(&case_dir(case), &out, &LoraExportOptions { base_model: Some(base), outtype: GgmlType::F32 }).unwrap();
        assert_eq!(rep.architecture, "llama");
        let (md, _) = read_gguf(&out);
        assert!(matches!(&md["general.type"], Value::String(s) if s == "adapter"));
        assert!(matches!(&md["adapter.type"], Value::String(s) if s == "lora"));
        assert!(matches!(&md["general.architecture"], Value::String(s) if s == "llama"));
        let (alpha, pairs) = effective_pairs(&out, 4, 2);
        // HF's delta (scaling · B A) from our own loader of the HF adapter.
        let mut m = PeftModel::new(load_causal_lm(&tiny_hf(), DType::F32, &Device::Cpu).unwrap().model);
        m.load_adapter(&case_dir(case), "default", false, None).unwrap();
        let mut n = 0;
        for (path, lin) in m.base.named_linears() {
            let Some(ad) = lin.lora("default") else { continue };
            let (a, b) = &pairs[&path];
            let want = (ad.b.as_tensor().matmul(ad.a.as_tensor()).unwrap() * ad.scaling).unwrap();
            let got = b.matmul(a).unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "{case} {path}");
            n += 1;
        }
        assert_eq!(n, pairs.len(), "{case}");
        assert_eq!(rep.modules, n);
        match case {
            "llama_lora_qv" => assert!(rep.folded.is_empty() && alpha == 16.0),
            "llama_lora_qv_rslora" => assert!(rep.folded.len() == n && (rep.folded[0].1 - 8f64.sqrt()).abs() < 1e-9),
            _ => assert!(!rep.folded.is_empty() && rep.folded.len() < n),
        }
    }
    // q8_0: A (rows of 64) quantized, B (rows of r = 8) in f16.
    let out = d.join("q8.gguf");
    export::export_gguf_lora(&case_dir("llama_lora_qv"), &out, &LoraExportOptions { base_model: Some(tiny_gguf()), outtype: GgmlType::Q8_0 }).unwrap();
    let (_, t) = read_gguf(&out);
    assert_eq!(t["blk.0.attn_q.weight.lora_a"].1, 8);
    assert_eq!(t["blk.0.attn_q.weight.lora_b"].1, 1);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn lora_export_for_a_qwen2_base_keeps_hf_row_order() {
    // The tiny Llama's config as a Qwen2 config (same shapes): GGUF architecture `qwen2`, whose
    // q/k rows llama.cpp does not permute.
    let d = scratch("qwen2");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tiny_hf().join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "qwen2".into();
    cfg["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    std::fs::create_dir_all(d.join("base")).unwrap();
    std::fs::write(d.join("base/config.json"), cfg.to_string()).unwrap();
    let out = d.join("q.gguf");
    let rep = export::export_gguf_lora(&case_dir("llama_lora_qv"), &out, &LoraExportOptions { base_model: Some(d.join("base")), outtype: GgmlType::F32 }).unwrap();
    assert_eq!(rep.architecture, "qwen2");
    let (md, t) = read_gguf(&out);
    assert!(matches!(&md["general.architecture"], Value::String(s) if s == "qwen2"));
    let hf = peft_core::io::read_safetensors(&case_dir("llama_lora_qv").join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let b = &hf.iter().find(|(k, _)| k == "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight").unwrap().1;
    assert_eq!(max_diff(&t["blk.1.attn_q.weight.lora_b"].0, b), 0.0);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn lora_export_refusals_have_codes_and_name_the_feature() {
    let d = scratch("refuse");
    let out = d.join("x.gguf");
    let opts = LoraExportOptions { base_model: Some(tiny_gguf()), outtype: GgmlType::F32 };
    for (case, needle) in [
        ("llama_lora_dora", "use_dora"),
        ("llama_lora_all_linear_mts", "modules_to_save"),
        ("llama_lora_embedding", "embedding"),
        ("llama_ia3", "IA3"),
        ("llama_prefix", "PREFIX_TUNING"),
        ("llama_prompt_random", "PROMPT_TUNING"),
    ] {
        let e = export::export_gguf_lora(&case_dir(case), &out, &opts).unwrap_err();
        assert_eq!(e.code(), "ERR_EXPORT_UNSUPPORTED", "{case}: {e}");
        assert!(e.to_string().contains(needle), "{case}: {e}");
        assert!(!out.exists(), "{case} left a file");
    }
    let e = export::export_gguf_lora(&case_dir("gpt2_lora_c_attn"), &out, &LoraExportOptions { base_model: Some(fixtures_dir().join("models/gpt2")), outtype: GgmlType::F32 }).unwrap_err();
    assert_eq!(e.code(), "ERR_EXPORT_UNSUPPORTED");
    assert!(e.to_string().contains("GPT2LMHeadModel"), "{e}");
    // No base given and the recorded one (`models/llama`, relative) does not exist from here.
    let e = export::export_gguf_lora(&case_dir("llama_lora_qv"), &out, &LoraExportOptions::default()).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains("baseModel"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn merged_gguf_and_hf_folder_reload_to_the_merged_logits() {
    let d = scratch("merged");
    let loaded = load_causal_lm(&tiny_gguf(), DType::F32, &Device::Cpu).unwrap();
    let tok = loaded.tokenizer.clone();
    let mut m = PeftModel::new(loaded.model);
    m.load_adapter(&case_dir("llama_lora_patterns"), "default", false, None).unwrap();
    let with_adapter = logits(&m, &IDS);
    let e = export::export_merged_gguf(&m, &d.join("x.gguf"), GgmlType::F32).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_STATE");
    assert!(e.to_string().contains("mergeAndUnload"), "{e}");
    m.merge_and_unload(None, false).unwrap();
    let merged = logits(&m, &IDS);
    assert!(max_diff(&merged, &with_adapter) < 1e-4);

    for (ty, tol) in [(GgmlType::F32, 1e-5f32), (GgmlType::F16, 2e-2), (GgmlType::Q8_0, 6e-2)] {
        let p = d.join(format!("merged-{ty:?}.gguf"));
        let types = export::export_merged_gguf(&m, &p, ty).unwrap();
        assert!(types.iter().filter(|(n, _)| n.ends_with("_norm.weight")).all(|(_, t)| *t == GgmlType::F32));
        let back = PeftModel::new(load_causal_lm(&p, DType::F32, &Device::Cpu).unwrap().model);
        let diff = max_diff(&logits(&back, &IDS), &merged);
        common::visible(&format!("merged GGUF {ty:?}: max |logit diff| = {diff:.2e}"));
        assert!(diff < tol, "{ty:?}: {diff}");
        // The source metadata (tokenizer) is carried over.
        let (md, _) = read_gguf(&p);
        assert!(matches!(&md["tokenizer.ggml.model"], Value::String(s) if s == "gpt2"));
        assert!(matches!(md["general.file_type"], Value::U32(t) if t == ty.file_type()));
    }

    // HF folder, sharded: 200 KB shards.
    let hf = d.join("hf");
    let files = export::save_merged_pretrained(&m, &hf, tok.as_ref(), &MergedSaveOptions { max_shard_size: 200_000 }).unwrap();
    assert!(files.iter().any(|f| f.ends_with("model.safetensors.index.json")));
    let shards = std::fs::read_dir(&hf).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("model-")).count();
    assert!(shards >= 2, "{shards} shards");
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf.join("model.safetensors.index.json")).unwrap()).unwrap();
    let n_params: usize = export::merged::llama_state_dict(m.base.as_llama().unwrap()).unwrap().iter().map(|(_, t)| t.elem_count()).sum();
    assert_eq!(index["metadata"]["total_parameters"].as_u64(), Some(n_params as u64));
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(4 * n_params as u64));
    assert_eq!(index["weight_map"].as_object().unwrap().len(), 21);
    assert!(hf.join("tokenizer.json").exists() && hf.join("tokenizer_config.json").exists());
    let back = load_causal_lm(&hf, DType::F32, &Device::Cpu).unwrap();
    assert!(back.tokenizer.is_some());
    let back = PeftModel::new(back.model);
    assert_eq!(max_diff(&logits(&back, &IDS), &merged), 0.0);
    // Saved again unsharded: the old shards and index go.
    export::save_merged_pretrained(&m, &hf, tok.as_ref(), &MergedSaveOptions::default()).unwrap();
    let names: Vec<String> = std::fs::read_dir(&hf).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.contains(&"model.safetensors".to_string()) && !names.iter().any(|n| n.starts_with("model-") || n.ends_with("index.json")), "{names:?}");

    // The HF folder, loaded again, exported as GGUF: metadata built from config.json and
    // tokenizer.json gives the source file's tokenizer back, and the same logits. A
    // `_name_or_path` naming a hub id (as older transformers wrote) does not hide the folder.
    export::save_merged_pretrained(&m, &hf, tok.as_ref(), &MergedSaveOptions::default()).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    cfg["_name_or_path"] = "someone/tiny-llama".into();
    std::fs::write(hf.join("config.json"), cfg.to_string()).unwrap();
    let from_hf = PeftModel::new(load_causal_lm(&hf, DType::F32, &Device::Cpu).unwrap().model);
    let p = d.join("from-hf.gguf");
    export::export_merged_gguf(&from_hf, &p, GgmlType::F32).unwrap();
    let back = PeftModel::new(load_causal_lm(&p, DType::F32, &Device::Cpu).unwrap().model);
    assert_eq!(max_diff(&logits(&back, &IDS), &merged), 0.0);
    let (src_md, _) = read_gguf(&tiny_gguf());
    let (md, _) = read_gguf(&p);
    for k in ["tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"] {
        assert_eq!(format!("{:?}", md[k]), format!("{:?}", src_md[k]), "{k}");
    }
    // token types: i32 here, whatever integer type the source used
    let ints = |v: &Value| match v {
        Value::Array(a) => a.iter().map(|x| x.to_i32().unwrap()).collect::<Vec<i32>>(),
        _ => panic!(),
    };
    assert_eq!(ints(&md["tokenizer.ggml.token_type"]), ints(&src_md["tokenizer.ggml.token_type"]));

    // The fixture's own HF folder has a WordLevel tokenizer, which GGUF cannot hold.
    let mut h = PeftModel::new(load_causal_lm(&tiny_hf(), DType::F32, &Device::Cpu).unwrap().model);
    h.merge_and_unload(None, false).unwrap();
    let e = export::export_merged_gguf(&h, &d.join("y.gguf"), GgmlType::F32).unwrap_err();
    assert_eq!(e.code(), "ERR_EXPORT_UNSUPPORTED", "{e}");
    assert!(e.to_string().contains("WordLevel"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}
