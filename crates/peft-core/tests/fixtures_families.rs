//! Golden tests for the newer Llama-like families (issue 18) against HF PEFT 0.21 (torch 2.13,
//! transformers 5.18) fixtures made by `__test__/scripts/make_family_fixtures.py`:
//!
//! * Llama 3.x RoPE scaling (`rope_parameters.rope_type = "llama3"`): `models/llama3` and its
//!   GGUF `models/llama3.gguf` (with llama.cpp's precomputed `rope_freqs.weight`), case
//!   `llama3_lora_qv`; both on the fused engine and on the general path;
//! * Qwen3 (per-head q/k RMSNorm, explicit head_dim 32 with hidden 64 / 4 heads, tied
//!   embeddings): `models/qwen3`, `models/qwen3.gguf` (arch `qwen3`), cases `qwen3_lora_qv` and
//!   `qwen3_prefix`; on the fused engine and on the general path;
//! * prefix tuning on Llama 3.x (`llama3_prefix`; inference with prompt learning runs on the
//!   general path);
//! * Gemma 3 (`Gemma3ForCausalLM`, made by `__test__/scripts/make_gemma3_fixtures.py`):
//!   `models/gemma3` (sliding and full layers with a window shorter than the batch, head_dim 32
//!   != 64/4, query_pre_attn_scalar 24, linear RoPE scaling on global layers, final logit
//!   soft-capping, tied embeddings) and `models/gemma3.gguf` (arch `gemma3`, norms stored as
//!   1 + w), cases `gemma3_lora_all` (LoRA on all seven linears) and `gemma3_prefix`; the engine
//!   declines Gemma 3 (general path);
//! * Phi-3 (`Phi3ForCausalLM`, made by `__test__/scripts/make_phi3_fixtures.py`): `models/phi3`
//!   (fused qkv_proj / gate_up_proj, GQA, partial_rotary_factor 0.75, longrope with the batch past
//!   original_max_position_embeddings, untied), `models/phi3_tied` (tied, sliding window 6),
//!   cases `phi3_lora` (LoRA on the fused linears), `phi3_short`, `phi3_tied_lora`
//!   (all-linear), `phi3_prefix`; the fused engine runs Phi-3 (declining only a cached step that
//!   re-rotates the cache to the long factors, which the general path runs).
//! * SmolLM3 (`SmolLM3ForCausalLM`, made by `__test__/scripts/make_smollm3_fixtures.py`):
//!   `models/smollm3` (4 layers, `no_rope_layers` [1, 1, 1, 0]: layer 3 is a NoPE layer, GQA,
//!   tied, rope_theta 2e6) and `models/smollm3.gguf` (arch `smollm3`, llama.cpp's fixed NoPE step
//!   of 4), cases `smollm3_lora` (LoRA on all seven linears) and `smollm3_prefix`; on the fused
//!   engine and on the general path.
//!
//! Per LoRA case: base, adapter, disabled and merged logits (1e-4), loss, LoRA gradients (1e-4
//! relative to the tensor's largest gradient), greedy ids with and without a KV cache; the GGUF
//! loads and gives the HF folder's base logits.
//!
//! Run: `cargo test --release -p peft-core --test fixtures_families`.

mod common;

use candle_core::{DType, Device};
use common::*;
use peft_core::engine;
use peft_core::generate::{generate, GenerateOptions};
use peft_core::model::config::{LlamaConfig, RopeScaling};
use peft_core::model::loader::load_causal_lm;
use peft_core::model::ForwardOptions;
use peft_core::peft_model::PeftModel;
use peft_core::train::{loss_and_grads, Batch};
use std::collections::BTreeSet;

fn gen(m: &PeftModel, exp: &Expected, use_cache: bool) -> Vec<Vec<u32>> {
    let (ids, b, s) = exp.ids("generate_input_ids");
    let opts = GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![], pad_token_id: 0, use_cache, ..Default::default() };
    generate(m, &ids, b, s, None, None, &opts, &|| false).unwrap_or_else(|e| panic!("generate: [{}] {e}", e.code()))
}

fn check_generate(what: &str, m: &PeftModel, exp: &Expected, key: &str) {
    let want = exp.rows_u32(key);
    for use_cache in [true, false] {
        assert_eq!(gen(m, exp, use_cache), want, "{} {what}: generate(use_cache={use_cache}) != `{key}`", exp.case);
    }
    visible(&format!("ok {} {what}: generate == {key} (use_cache true and false)", exp.case));
}

/// Whether the fused engine computes this model's inference forward (it must decline what it
/// does not compute).
fn engine_runs(m: &PeftModel, exp: &Expected) -> bool {
    let (ids, b, s) = exp.ids("input_ids");
    let opts = ForwardOptions { attention_mask: Some(exp.mask("attention_mask")), ..Default::default() };
    engine::try_forward(m, &ids, b, s, &opts, None).unwrap().is_some()
}

/// Base / adapter / disabled / merged logits and greedy ids of a LoRA case.
fn lora_logits_and_generate(case: &str) {
    let exp = Expected::load(case);
    let base = base_peft(case);
    check_logits("base model", &base, &exp, "logits_base");
    check_generate("base model", &base, &exp, "generate_base");
    let mut m = adapter_peft(case, false);
    check_logits("adapter", &m, &exp, "logits_adapter");
    check_generate("adapter", &m, &exp, "generate_adapter");
    m.set_disabled(true).unwrap();
    check_logits("disabled adapter", &m, &exp, "logits_disabled");
    check_logits("disabled adapter vs base", &m, &exp, "logits_base");
    m.set_disabled(false).unwrap();
    m.merge_adapter(None, false).unwrap();
    check_logits("merged (merge_adapter)", &m, &exp, "logits_merged");
    m.unmerge_adapter().unwrap();
    check_logits("unmerged", &m, &exp, "logits_adapter");
    m.merge_and_unload(None, false).unwrap();
    check_logits("merge_and_unload", &m, &exp, "logits_merged");
    check_generate("merge_and_unload", &m, &exp, "generate_merged");
}

/// Loss and every LoRA gradient of a case (`grad.*` in expected.safetensors).
fn lora_loss_and_grads(case: &str) {
    let exp = Expected::load(case);
    let m = adapter_peft(case, true);
    let (ids, b, s) = exp.ids("input_ids");
    let batch = Batch { input_ids: ids, attention_mask: exp.mask("attention_mask"), labels: exp.i64s("labels"), batch_size: b, seq_len: s, ..Default::default() };
    let (loss, _n, grads) = loss_and_grads(&m, &batch, None, None).unwrap_or_else(|e| panic!("loss_and_grads: [{}] {e}", e.code()));
    let want = exp.get("loss").flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    visible(&format!("diff {case} loss: got {loss:.8} expected {want:.8}"));
    assert!((loss - want).abs() <= 1e-4 * want.abs().max(1.0), "{case}: loss {loss} vs {want}");
    let params = m.trainable_parameters();
    let want_keys: BTreeSet<String> = exp.t.keys().filter_map(|k| k.strip_prefix("grad.")).map(String::from).collect();
    let got_keys: BTreeSet<String> = params.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(got_keys, want_keys, "{case}: trainable parameters vs grad.* keys");
    for (key, var) in &params {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{case}: no gradient for {key}"));
        let e = exp.get(&format!("grad.{key}"));
        let scale = max_abs(e);
        assert!(scale > 0.0, "{case}: expected gradient of {key} is zero");
        // 1e-4 relative to the tensor's largest gradient, plus 1e-4 of each element.
        assert_close(&format!("{case} grad.{key}"), g, e, 1e-4 * scale, 1e-4);
    }
}

/// The GGUF of a fixture model loads (config, tokenizer, weights) and gives the HF folder's
/// base logits on the case's batch.
fn gguf_matches_hf(case: &str, gguf: &str) {
    let exp = Expected::load(case);
    let path = fixtures_dir().join("models").join(gguf);
    let loaded = load_causal_lm(&path, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("load {gguf}: [{}] {e}", e.code()));
    assert!(loaded.tokenizer.is_some(), "{gguf}: no tokenizer from the file");
    let m = PeftModel::new(loaded.model);
    check_logits(&format!("GGUF {gguf} base"), &m, &exp, "logits_base");
    check_generate(&format!("GGUF {gguf} base"), &m, &exp, "generate_base");
}

fn hf_config(model: &str) -> LlamaConfig {
    LlamaConfig::from_file(&fixtures_dir().join("models").join(model).join("config.json")).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Llama 3.x RoPE scaling
// ---------------------------------------------------------------------------------------------

#[test]
fn llama3_config_and_inv_freq() {
    let c = hf_config("llama3");
    assert_eq!(
        c.rope_scaling,
        Some(RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 32.0 })
    );
    let scaled = c.inv_freq();
    let plain: Vec<f32> = (0..8).map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / 16.0) as f32).collect();
    // head_dim 16, theta 1e4, original context 32: wavelength 6.3 < 8 is kept, 19.9 is
    // interpolated, the rest (> 32) are divided by 8.
    assert!((scaled[0] - plain[0]).abs() < 1e-7);
    assert!(scaled[1] < plain[1] && scaled[1] > plain[1] / 8.0);
    for i in 2..8 {
        assert!((scaled[i] * 8.0 - plain[i]).abs() <= 1e-6 * plain[i], "freq {i}");
    }
    // llama.cpp's precomputed factors (from the GGUF) give the same frequencies.
    let g = peft_core::gguf::load_gguf(&fixtures_dir().join("models/llama3.gguf"), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(g.config.rope_scaling, Some(RopeScaling::Factors(ref f)) if f.len() == 8));
    for (a, b) in g.config.inv_freq().iter().zip(&scaled) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "GGUF inv_freq {a} vs config {b}");
    }
    // The model's config (JS `model.config`) reports the scaling as config.json does.
    let cj = base_peft("llama3_lora_qv").base.config_json();
    let on_disk: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("models/llama3/config.json")).unwrap()).unwrap();
    assert_eq!(cj["rope_parameters"], on_disk["rope_parameters"]);
    // An unknown rope_type is refused, not silently ignored.
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("models/llama3/config.json")).unwrap()).unwrap();
    v["rope_parameters"]["rope_type"] = "yarn".into();
    let e = LlamaConfig::from_json(&v, std::path::Path::new("config.json")).unwrap_err();
    assert!(e.to_string().contains("yarn"), "{e}");
    // The older layout: top-level rope_theta + `rope_scaling`.
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("models/llama3/config.json")).unwrap()).unwrap();
    let mut rs = v["rope_parameters"].take();
    v.as_object_mut().unwrap().remove("rope_parameters");
    v["rope_theta"] = 10000.0.into();
    rs.as_object_mut().unwrap().remove("rope_theta");
    v["rope_scaling"] = rs;
    assert_eq!(LlamaConfig::from_json(&v, std::path::Path::new("config.json")).unwrap().inv_freq(), scaled);
}

#[test]
fn llama3_lora_logits_generate_engine() {
    let exp = Expected::load("llama3_lora_qv");
    assert!(engine_runs(&adapter_peft("llama3_lora_qv", false), &exp), "the engine should run Llama 3.x scaling");
    lora_logits_and_generate("llama3_lora_qv");
}

#[test]
fn llama3_lora_logits_generate_general_path() {
    engine::force_general_path(true);
    let exp = Expected::load("llama3_lora_qv");
    assert!(!engine_runs(&adapter_peft("llama3_lora_qv", false), &exp));
    lora_logits_and_generate("llama3_lora_qv");
}

#[test]
fn llama3_lora_loss_and_grads_engine() {
    lora_loss_and_grads("llama3_lora_qv");
}

#[test]
fn llama3_lora_loss_and_grads_general_path() {
    engine::force_general_path(true);
    lora_loss_and_grads("llama3_lora_qv");
}

#[test]
fn llama3_gguf_matches_hf() {
    gguf_matches_hf("llama3_lora_qv", "llama3.gguf");
}

// ---------------------------------------------------------------------------------------------
// Qwen3
// ---------------------------------------------------------------------------------------------

#[test]
fn qwen3_config_and_modules() {
    let c = hf_config("qwen3");
    assert_eq!((c.model_type.as_str(), c.architecture.as_str()), ("qwen3", "Qwen3ForCausalLM"));
    assert!(c.qk_norm && !c.attention_bias && c.tie_word_embeddings);
    assert_eq!((c.head_dim, c.num_attention_heads, c.hidden_size), (32, 4, 64));
    let m = base_peft("qwen3_lora_qv");
    let names = m.base.module_names();
    assert!(names.contains(&"model.layers.1.self_attn.q_norm".to_string()) && names.contains(&"model.layers.0.self_attn.k_norm".to_string()));
    // Parameter count as transformers' named_parameters (tied lm_head once): 256*64 + 2 *
    // (q 128*64 + k 64*64 + v 64*64 + o 64*128 + 3 * 128*64 + 2*64 norms + 2*32 q/k norms) + 64.
    let per_layer = 128 * 64 + 64 * 64 * 2 + 64 * 128 + 3 * 128 * 64 + 2 * 64 + 2 * 32;
    assert_eq!(m.base.base_param_count(), 256 * 64 + 2 * per_layer + 64);
    // The GGUF config equals the HF one in everything the model uses.
    let g = peft_core::gguf::read_gguf_config(&fixtures_dir().join("models/qwen3.gguf")).unwrap();
    assert_eq!(
        (g.model_type.as_str(), g.architecture.as_str(), g.qk_norm, g.head_dim, g.tie_word_embeddings, g.num_key_value_heads),
        ("qwen3", "Qwen3ForCausalLM", true, 32, true, 2)
    );
}

#[test]
fn qwen3_lora_logits_generate_engine() {
    let exp = Expected::load("qwen3_lora_qv");
    assert!(engine_runs(&adapter_peft("qwen3_lora_qv", false), &exp), "the engine should run Qwen3 (per-head q/k norm)");
    lora_logits_and_generate("qwen3_lora_qv");
}

#[test]
fn qwen3_lora_logits_generate_general_path() {
    engine::force_general_path(true);
    let exp = Expected::load("qwen3_lora_qv");
    assert!(!engine_runs(&adapter_peft("qwen3_lora_qv", false), &exp));
    lora_logits_and_generate("qwen3_lora_qv");
}

#[test]
fn qwen3_lora_loss_and_grads_engine() {
    lora_loss_and_grads("qwen3_lora_qv");
}

#[test]
fn qwen3_lora_loss_and_grads_general_path() {
    engine::force_general_path(true);
    lora_loss_and_grads("qwen3_lora_qv");
}

#[test]
fn qwen3_gguf_matches_hf() {
    gguf_matches_hf("qwen3_lora_qv", "qwen3.gguf");
}

fn prefix_case(case: &str) {
    let exp = Expected::load(case);
    let m = adapter_peft(case, false);
    check_logits("prefix tuning", &m, &exp, "logits_adapter");
    let want = exp.rows_u32("generate_adapter");
    assert_eq!(gen(&m, &exp, true), want, "{case}: generate");
    visible(&format!("ok {case}: generate == generate_adapter"));
}

#[test]
fn qwen3_prefix_tuning() {
    prefix_case("qwen3_prefix");
}

#[test]
fn llama3_prefix_tuning() {
    prefix_case("llama3_prefix");
}

/// A merged Qwen3 / Llama 3.x model saved in HF format reloads with the same logits (q/k norms
/// and the llama3 rope parameters are written).
#[test]
fn merged_save_reloads() {
    for case in ["qwen3_lora_qv", "llama3_lora_qv"] {
        let exp = Expected::load(case);
        let mut m = adapter_peft(case, false);
        m.merge_and_unload(None, false).unwrap();
        let dir = temp_dir("families-merged");
        peft_core::export::save_merged_pretrained(&m, &dir, None, &Default::default()).unwrap_or_else(|e| panic!("{case}: [{}] {e}", e.code()));
        let re = PeftModel::new(load_causal_lm(&dir, DType::F32, &Device::Cpu).unwrap().model);
        check_logits("merged, saved and reloaded", &re, &exp, "logits_merged");
        remove_dir(&dir);
    }
}

/// Re-saving a loaded HF adapter gives HF's files: `adapter_model.safetensors` byte-identical,
/// `adapter_config.json` byte-identical (LoRA; prefix tuning too).
#[test]
fn resave_is_byte_identical() {
    for case in ["llama3_lora_qv", "qwen3_lora_qv", "qwen3_prefix", "llama3_prefix"] {
        resave_case(case);
    }
}

/// GGUF export: a merged Llama 3.x model is refused (the writer has no `rope_freqs.weight` yet),
/// and so is a Qwen3 one (no `qwen3` GGUF writer); a LoRA adapter over the Llama 3.x base exports
/// (LoRA GGUFs carry no RoPE parameters: llama.cpp takes them from the base file).
#[test]
fn gguf_export_refusals() {
    for case in ["llama3_lora_qv", "qwen3_lora_qv"] {
        let mut m = adapter_peft(case, false);
        m.merge_and_unload(None, false).unwrap();
        let out = temp_dir("families-export").join("m.gguf");
        let e = peft_core::export::export_merged_gguf(&m, &out, peft_core::export::GgmlType::F32).unwrap_err();
        assert_eq!(e.code(), "ERR_EXPORT_UNSUPPORTED", "{case}: {e}");
        visible(&format!("ok {case}: exportGguf refused: {e}"));
    }
    let out = temp_dir("families-lora-export").join("a.gguf");
    let opts = peft_core::export::LoraExportOptions { base_model: Some(fixtures_dir().join("models/llama3")), ..Default::default() };
    peft_core::export::export_gguf_lora(&case_dir("llama3_lora_qv"), &out, &opts).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    assert!(out.is_file());
}

// ---------------------------------------------------------------------------------------------
// Gemma 3
// ---------------------------------------------------------------------------------------------

fn gemma3_hf_config() -> peft_core::model::Gemma3Config {
    let p = fixtures_dir().join("models/gemma3/config.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    peft_core::model::Gemma3Config::from_json(&v, &p).unwrap()
}

#[test]
fn gemma3_config_and_modules() {
    let c = gemma3_hf_config();
    assert_eq!(c.sliding_layers, vec![true, false, true, false]);
    assert_eq!((c.sliding_window, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.hidden_size), (Some(6), 32, 4, 2, 64));
    assert_eq!((c.query_pre_attn_scalar, c.rope_theta, c.rope_local_theta, c.rope_linear_factor), (24.0, 1e6, 1e4, Some(2.0)));
    assert_eq!((c.final_logit_softcapping, c.attn_logit_softcapping, c.tie_word_embeddings), (Some(30.0), None, true));
    // Global frequencies are the 1e6 ones divided by the linear factor 2; local ones use 1e4.
    assert!((c.inv_freq(false)[0] - 0.5).abs() < 1e-7 && (c.inv_freq(true)[0] - 1.0).abs() < 1e-7);
    assert!((c.inv_freq(true)[1] - 1e4f64.powf(-2.0 / 32.0) as f32).abs() < 1e-7);
    let m = base_peft("gemma3_lora_all");
    assert_eq!(m.base.info().architecture, "Gemma3ForCausalLM");
    assert!(m.base.as_llama().is_none(), "Gemma 3 is its own model, not a Llama variant");
    let names = m.base.module_names();
    for n in ["model.layers.3.self_attn.q_norm", "model.layers.0.pre_feedforward_layernorm", "model.layers.2.post_feedforward_layernorm", "model.layers.1.mlp.down_proj"] {
        assert!(names.contains(&n.to_string()), "{n}");
    }
    // As transformers' named_parameters (tied lm_head once): 256*64 + 4 * (q 128*64 + k 64*64 +
    // v 64*64 + o 64*128 + 3 * 128*64 + 4*64 norms + 2*32 q/k norms) + 64.
    let per_layer = 128 * 64 + 64 * 64 * 2 + 64 * 128 + 3 * 128 * 64 + 4 * 64 + 2 * 32;
    assert_eq!(m.base.base_param_count(), 256 * 64 + 4 * per_layer + 64);
    // The GGUF's config equals config.json's in everything the model uses.
    let content = peft_core::gguf::read_gguf_header(&fixtures_dir().join("models/gemma3.gguf")).unwrap();
    let mut g = peft_core::gguf::gemma3_config_from_gguf(&content, std::path::Path::new("gemma3.gguf")).unwrap();
    // The attention scale comes from `gemma3.attention.scale` (f32 of 24^-1/2).
    assert!((g.query_pre_attn_scalar - 24.0).abs() < 1e-5, "{}", g.query_pre_attn_scalar);
    g.query_pre_attn_scalar = c.query_pre_attn_scalar;
    // GGUF stores the epsilon as f32.
    assert!((g.rms_norm_eps - 1e-6).abs() < 1e-12);
    g.rms_norm_eps = c.rms_norm_eps;
    g.name_or_path = c.name_or_path.clone();
    g.dtype = c.dtype.clone();
    g.raw = c.raw.clone();
    assert_eq!(g, c);
    // Refusals: bidirectional attention, another activation, an unknown rope type.
    let v = c.raw.clone().unwrap();
    for (k, val, needle) in [
        ("use_bidirectional_attention", serde_json::json!(true), "bidirectional"),
        ("hidden_activation", serde_json::json!("silu"), "silu"),
        ("rope_parameters", serde_json::json!({"full_attention": {"rope_type": "yarn", "factor": 4.0}}), "yarn"),
    ] {
        let mut w = v.clone();
        w[k] = val;
        let e = peft_core::model::Gemma3Config::from_json(&w, std::path::Path::new("config.json")).unwrap_err();
        assert!(e.to_string().contains(needle), "{k}: {e}");
    }
    // Without layer_types, sliding_window_pattern (default 6) decides.
    let mut w = v.clone();
    w.as_object_mut().unwrap().remove("layer_types");
    w["sliding_window_pattern"] = 2.into();
    assert_eq!(peft_core::model::Gemma3Config::from_json(&w, std::path::Path::new("c")).unwrap().sliding_layers, vec![true, false, true, false]);
}

#[test]
fn gemma3_lora_logits_generate() {
    let exp = Expected::load("gemma3_lora_all");
    assert!(!engine_runs(&adapter_peft("gemma3_lora_all", false), &exp), "the engine must decline Gemma 3");
    lora_logits_and_generate("gemma3_lora_all");
}

#[test]
fn gemma3_lora_loss_and_grads() {
    lora_loss_and_grads("gemma3_lora_all");
}

/// The GGUF (norms stored as 1 + w, llama.cpp names) loads through the loader and gives the HF
/// folder's logits and greedy ids; its SentencePiece (`llama`) tokenizer is built (compared with
/// transformers id for id in spm_tokenizer.rs). Without `gemma3.attention.scale` llama.cpp's rule
/// (head_dim) applies.
#[test]
fn gemma3_gguf_matches_hf() {
    let exp = Expected::load("gemma3_lora_all");
    let path = fixtures_dir().join("models/gemma3.gguf");
    let loaded = load_causal_lm(&path, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    let tok = loaded.tokenizer.as_ref().expect("gemma3.gguf: the SentencePiece tokenizer is built");
    assert_eq!((tok.bos_token_id(), tok.eos_token_id(), tok.pad_token_id()), (Some(2), Some(1), Some(0)));
    assert_eq!(loaded.model.info().architecture, "Gemma3ForCausalLM");
    let m = PeftModel::new(loaded.model);
    check_logits("GGUF gemma3.gguf base", &m, &exp, "logits_base");
    check_generate("GGUF gemma3.gguf base", &m, &exp, "generate_base");
    let g = peft_core::gguf::load_gguf_gemma3(&path, DType::F32, &Device::Cpu, &Default::default()).unwrap();
    assert!(g.tokenizer.is_some() && !g.notices.iter().any(|n| n.contains("tokenizer")), "{:?}", g.notices);
    let mut content = peft_core::gguf::read_gguf_header(&path).unwrap();
    content.metadata.remove("gemma3.attention.scale");
    assert_eq!(peft_core::gguf::gemma3_config_from_gguf(&content, &path).unwrap().query_pre_attn_scalar, 32.0);
}

#[test]
fn gemma3_prefix_tuning() {
    prefix_case("gemma3_prefix");
}

#[test]
fn gemma3_resave_is_byte_identical() {
    for case in ["gemma3_lora_all", "gemma3_prefix"] {
        resave_case(case);
    }
}

/// Saving a merged Gemma 3 model (HF folder or GGUF) and exporting its LoRA adapter as a GGUF
/// are refused with ERR_EXPORT_UNSUPPORTED, not written wrongly.
#[test]
fn gemma3_merged_exports_refused() {
    let mut m = adapter_peft("gemma3_lora_all", false);
    m.merge_and_unload(None, false).unwrap();
    let dir = temp_dir("gemma3-merged");
    let e = peft_core::export::save_merged_pretrained(&m, &dir, None, &Default::default()).unwrap_err();
    assert_eq!(e.code(), "ERR_EXPORT_UNSUPPORTED", "{e}");
    let e = peft_core::export::export_merged_gguf(&m, &dir.join("m.gguf"), peft_core::export::GgmlType::F32).unwrap_err();
    assert_eq!(e.code(), "ERR_EXPORT_UNSUPPORTED", "{e}");
    for base in ["models/gemma3", "models/gemma3.gguf"] {
        let opts = peft_core::export::LoraExportOptions { base_model: Some(fixtures_dir().join(base)), ..Default::default() };
        let e = peft_core::export::export_gguf_lora(&case_dir("gemma3_lora_all"), &dir.join("a.gguf"), &opts).unwrap_err();
        assert_eq!(e.code(), "ERR_EXPORT_UNSUPPORTED", "{base}: {e}");
    }
    remove_dir(&dir);
}

// ---------------------------------------------------------------------------------------------
// Phi-3
// ---------------------------------------------------------------------------------------------

fn phi3_hf_config(model: &str) -> peft_core::model::Phi3Config {
    let p = fixtures_dir().join("models").join(model).join("config.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    peft_core::model::Phi3Config::from_json(&v, &p).unwrap()
}

#[test]
fn phi3_config_and_modules() {
    let c = phi3_hf_config("phi3");
    assert_eq!((c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rotary_dim), (64, 4, 2, 16, 12));
    assert_eq!((c.sliding_window, c.tie_word_embeddings, c.max_position_embeddings), (None, false, 64));
    let lr = c.longrope.clone().expect("longrope");
    assert_eq!(lr.original_max_position_embeddings, 8);
    // transformers: sqrt(1 + ln(64 / 8) / ln 8).
    assert!((lr.attention_factor - 2f64.sqrt()).abs() < 1e-12, "{}", lr.attention_factor);
    // Within the original length the short factors apply, beyond it the long ones.
    let (short, a) = c.inv_freq(8);
    let (long, _) = c.inv_freq(9);
    assert_eq!(a, 2f32.sqrt());
    assert!((short[1] - (1.0 / (1.1 * 1e4f64.powf(2.0 / 12.0))) as f32).abs() < 1e-7);
    assert!((long[1] - (1.0 / (1.6 * 1e4f64.powf(2.0 / 12.0))) as f32).abs() < 1e-7);
    let t = phi3_hf_config("phi3_tied");
    assert_eq!((t.sliding_window, t.tie_word_embeddings, t.rotary_dim, t.longrope.is_none()), (Some(6), true, 16, true));
    let m = base_peft("phi3_lora");
    assert_eq!(m.base.info().architecture, "Phi3ForCausalLM");
    assert!(m.base.as_llama().is_none(), "the engine must not take Phi-3 for a Llama");
    let names = m.base.module_names();
    for n in ["model.layers.1.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.down_proj", "model.layers.0.post_attention_layernorm", "lm_head"] {
        assert!(names.contains(&n.to_string()), "{n}");
    }
    // As transformers' named_parameters: embed + lm_head 128*64 each, per layer qkv 128*64,
    // o 64*64, gate_up 128*64, down 64*64, two norms; final norm.
    let per_layer = 128 * 64 + 64 * 64 + 128 * 64 + 64 * 64 + 2 * 64;
    assert_eq!(m.base.base_param_count(), 2 * 128 * 64 + 2 * per_layer + 64);
    // Refusals: another rope type, factors of the wrong length, another activation.
    let v = c.raw.clone().unwrap();
    let mut w = v.clone();
    w["rope_parameters"]["rope_type"] = "yarn".into();
    assert!(peft_core::model::Phi3Config::from_json(&w, std::path::Path::new("c")).unwrap_err().to_string().contains("yarn"));
    let mut w = v.clone();
    w["rope_parameters"]["long_factor"] = serde_json::json!([1.0, 2.0]);
    assert!(peft_core::model::Phi3Config::from_json(&w, std::path::Path::new("c")).unwrap_err().to_string().contains("long_factor"));
    let mut w = v.clone();
    w["hidden_act"] = "gelu".into();
    assert!(peft_core::model::Phi3Config::from_json(&w, std::path::Path::new("c")).unwrap_err().to_string().contains("gelu"));
    // Older configs: `rope_scaling` of type `su`, theta and partial_rotary_factor at the top.
    let mut w = v.clone();
    let mut rs = w["rope_parameters"].clone();
    rs.as_object_mut().unwrap().remove("rope_type");
    rs.as_object_mut().unwrap().remove("rope_theta");
    rs.as_object_mut().unwrap().remove("partial_rotary_factor");
    rs["type"] = "su".into();
    w.as_object_mut().unwrap().remove("rope_parameters");
    w["rope_scaling"] = rs;
    w["rope_theta"] = 10000.0.into();
    w["partial_rotary_factor"] = 0.75.into();
    let old = peft_core::model::Phi3Config::from_json(&w, std::path::Path::new("c")).unwrap();
    assert_eq!((old.rotary_dim, old.longrope.clone(), old.rope_theta), (c.rotary_dim, c.longrope.clone(), c.rope_theta));
}

/// LoRA on the fused qkv_proj / gate_up_proj (one LoRA per fused linear, as HF) with longrope
/// long factors (the batch of 12 exceeds original_max_position_embeddings 8) and partial RoPE;
/// greedy generation crosses the original length (short factors in the prompt, long ones in the
/// later decode steps, as transformers). The fused engine computes Phi-3 (the logits, loss and
/// gradients below go through it).
#[test]
fn phi3_lora_logits_generate() {
    let exp = Expected::load("phi3_lora");
    assert!(engine_runs(&adapter_peft("phi3_lora", false), &exp), "the engine must run Phi-3");
    lora_logits_and_generate("phi3_lora");
}

#[test]
fn phi3_lora_loss_and_grads() {
    lora_loss_and_grads("phi3_lora");
}

/// A batch within original_max_position_embeddings (short factors).
#[test]
fn phi3_short_factors() {
    let exp = Expected::load("phi3_short");
    let m = PeftModel::new(load_causal_lm(&fixtures_dir().join("models/phi3"), DType::F32, &Device::Cpu).unwrap().model);
    check_logits("base model, 6 tokens", &m, &exp, "logits_base");
}

/// Tied embeddings, default RoPE, sliding window 6 < 12, LoRA "all-linear".
#[test]
fn phi3_tied_all_linear_lora() {
    lora_logits_and_generate("phi3_tied_lora");
}

#[test]
fn phi3_prefix_tuning() {
    prefix_case("phi3_prefix");
}

#[test]
fn phi3_resave_is_byte_identical() {
    for case in ["phi3_lora", "phi3_tied_lora", "phi3_prefix"] {
        resave_case(case);
    }
}

/// Saving a merged Phi-3 model (HF folder or GGUF) is refused with ERR_EXPORT_UNSUPPORTED, not
/// written wrongly.
#[test]
fn phi3_merged_exports_refused() {
    let mut m = adapter_peft("phi3_lora", false);
    m.merge_and_unload(None, false).unwrap();
    let dir = temp_dir("phi3-merged");
    let e = peft_core::export::save_merged_pretrained(&m, &dir, None, &Default::default()).unwrap_err();
    assert_eq!(e.code(), "ERR_EXPORT_UNSUPPORTED", "{e}");
    let e = peft_core::export::export_merged_gguf(&m, &dir.join("m.gguf"), peft_core::export::GgmlType::F32).unwrap_err();
    assert_eq!(e.code(), "ERR_EXPORT_UNSUPPORTED", "{e}");
    for base in ["models/phi3", "models/phi3.gguf"] {
        let opts = peft_core::export::LoraExportOptions { base_model: Some(fixtures_dir().join(base)), ..Default::default() };
        let r = peft_core::export::export_gguf_lora(&case_dir("phi3_lora"), &dir.join("a.gguf"), &opts);
        visible(&format!("phi3 exportGgufLora over {base}: {:?}", r.as_ref().map(|_| ()).map_err(|e| e.to_string())));
        assert_eq!(r.unwrap_err().code(), "ERR_EXPORT_UNSUPPORTED", "{base}");
    }
    remove_dir(&dir);
}

/// A Phi-3 GGUF with llama.cpp's SentencePiece vocabulary (Phi-3 / Phi-3.5-mini): phi3.gguf's
/// weights with the `tokenizer.*` metadata of `spm_tokenizers/phi3.gguf`, written here with
/// candle. The loader builds the tokenizer (ids equal transformers', as in spm_tokenizer.rs) and
/// the weights still give the HF folder's logits.
#[test]
fn phi3_gguf_with_sentencepiece_tokenizer() {
    use candle_core::quantized::gguf_file;
    let src = fixtures_dir().join("models/phi3.gguf");
    let spm = fixtures_dir().join("spm_tokenizers/phi3.gguf");
    let model = peft_core::gguf::read_gguf_header(&src).unwrap();
    let vocab = peft_core::gguf::read_gguf_header(&spm).unwrap();
    let mut md: Vec<(String, gguf_file::Value)> =
        model.metadata.iter().filter(|(k, _)| !k.starts_with("tokenizer.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    md.extend(vocab.metadata.iter().filter(|(k, _)| k.starts_with("tokenizer.")).map(|(k, v)| (k.clone(), v.clone())));
    md.sort_by(|a, b| a.0.cmp(&b.0));
    let mut reader = std::io::BufReader::new(std::fs::File::open(&src).unwrap());
    let mut names: Vec<&String> = model.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(String, candle_core::quantized::QTensor)> =
        names.iter().map(|n| (n.to_string(), model.tensor(&mut reader, n, &Device::Cpu).unwrap())).collect();
    let dir = temp_dir("phi3-spm");
    let path = dir.join("phi3-spm.gguf");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &candle_core::quantized::QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut w, &md_refs, &t_refs).unwrap();
    drop(w);

    let g = peft_core::gguf::load_gguf_phi3(&path, DType::F32, &Device::Cpu, &Default::default())
        .unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    assert!(!g.notices.iter().any(|n| n.contains("tokenizer")), "{:?}", g.notices);
    let tok = g.tokenizer.expect("the SentencePiece tokenizer is built");
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("spm_tokenizers/expected.json")).unwrap()).unwrap();
    for case in exp["tokenizers"]["phi3"]["texts"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text, true).unwrap(), ids, "{text:?}");
    }
    let loaded = load_causal_lm(&path, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    assert!(loaded.tokenizer.is_some());
    check_logits("GGUF phi3 + SentencePiece vocabulary", &PeftModel::new(loaded.model), &Expected::load("phi3_lora"), "logits_base");
    remove_dir(&dir);
}

/// The GGUF written as convert_hf_to_gguf.py `Phi3MiniModel` (fused attn_qkv and ffn_up,
/// rope_factors_long/short, rope.dimension_count 12, attn_factor) loads through the loader with
/// its byte-level BPE tokenizer and gives the HF folder's logits (long factors at 12 tokens,
/// short at 6) and greedy ids; its config equals config.json's.
#[test]
fn phi3_gguf_matches_hf() {
    let path = fixtures_dir().join("models/phi3.gguf");
    let exp = Expected::load("phi3_lora");
    let loaded = load_causal_lm(&path, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    assert!(loaded.tokenizer.is_some(), "phi3.gguf: no tokenizer from the file");
    assert_eq!(loaded.model.info().architecture, "Phi3ForCausalLM");
    let m = PeftModel::new(loaded.model);
    check_logits("GGUF phi3.gguf base", &m, &exp, "logits_base");
    check_generate("GGUF phi3.gguf base", &m, &exp, "generate_base");
    check_logits("GGUF phi3.gguf base, 6 tokens", &m, &Expected::load("phi3_short"), "logits_base");
    // An HF adapter over the GGUF base.
    let mut a = PeftModel::new(load_causal_lm(&path, DType::F32, &Device::Cpu).unwrap().model);
    a.load_adapter(&case_dir("phi3_lora"), "default", false, None).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    check_logits("GGUF phi3.gguf + HF LoRA", &a, &exp, "logits_adapter");
    let g = peft_core::gguf::load_gguf_phi3(&path, DType::F32, &Device::Cpu, &Default::default()).unwrap();
    let mut gc = g.config.clone();
    let c = phi3_hf_config("phi3");
    // GGUF stores the epsilon, the attention factor and the factors as f32.
    assert!((gc.rms_norm_eps - c.rms_norm_eps).abs() < 1e-12);
    let (glr, lr) = (gc.longrope.clone().unwrap(), c.longrope.clone().unwrap());
    assert!((glr.attention_factor - lr.attention_factor).abs() < 1e-6);
    for (x, y) in glr.long_factor.iter().chain(&glr.short_factor).zip(lr.long_factor.iter().chain(&lr.short_factor)) {
        assert!((x - y).abs() < 1e-6, "{x} vs {y}");
    }
    gc.rms_norm_eps = c.rms_norm_eps;
    gc.longrope = c.longrope.clone();
    gc.name_or_path = c.name_or_path.clone();
    gc.dtype = c.dtype.clone();
    gc.raw = c.raw.clone();
    assert_eq!(gc, c);
}

// ---------------------------------------------------------------------------------------------
// SmolLM3
// ---------------------------------------------------------------------------------------------

fn smollm3_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("models/smollm3/config.json")).unwrap()).unwrap()
}

/// A copy of the `smollm3` folder with config.json edited by `edit`.
fn smollm3_folder_with(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> std::path::PathBuf {
    let dir = temp_dir(tag);
    copy_files(&fixtures_dir().join("models/smollm3"), &dir);
    let mut v = smollm3_json();
    edit(&mut v);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&v).unwrap()).unwrap();
    dir
}

#[test]
fn smollm3_config_and_modules() {
    let c = hf_config("smollm3");
    assert_eq!((c.model_type.as_str(), c.architecture.as_str()), ("smollm3", "SmolLM3ForCausalLM"));
    assert_eq!(c.rope_layers, Some(vec![true, true, true, false]));
    assert!((0..3).all(|i| c.layer_uses_rope(i)) && !c.layer_uses_rope(3));
    assert!(c.tie_word_embeddings && !c.attention_bias && !c.qk_norm && c.rope_scaling.is_none());
    assert_eq!((c.rope_theta, c.head_dim, c.num_key_value_heads), (2_000_000.0, 8, 2));
    let m = base_peft("smollm3_lora");
    assert_eq!(m.base.info().architecture, "SmolLM3ForCausalLM");
    let names = m.base.module_names();
    assert!(names.contains(&"model.layers.3.self_attn.q_proj".to_string()) && names.contains(&"model.layers.3.mlp.down_proj".to_string()));
    // Parameter count as transformers' named_parameters (tied lm_head once).
    let per_layer = 32 * 32 * 2 + 16 * 32 * 2 + 3 * 64 * 32 + 2 * 32;
    assert_eq!(m.base.base_param_count(), 256 * 32 + 4 * per_layer + 32);
    // The model's config (JS `model.config`) reports the NoPE layers as config.json does.
    assert_eq!(m.base.config_json()["no_rope_layers"], smollm3_json()["no_rope_layers"]);
    // Without `no_rope_layers`, the pattern comes from `no_rope_layer_interval` (default 4).
    let mut v = smollm3_json();
    v.as_object_mut().unwrap().remove("no_rope_layers");
    assert_eq!(LlamaConfig::from_json(&v, std::path::Path::new("config.json")).unwrap().rope_layers, c.rope_layers);
    v["no_rope_layer_interval"] = 2.into();
    assert_eq!(LlamaConfig::from_json(&v, std::path::Path::new("config.json")).unwrap().rope_layers, Some(vec![true, false, true, false]));
    // Named by its architecture only: still SmolLM3 with its NoPE layers and default theta.
    let mut v = smollm3_json();
    v.as_object_mut().unwrap().remove("model_type");
    v.as_object_mut().unwrap().remove("rope_parameters");
    let d = LlamaConfig::from_json(&v, std::path::Path::new("config.json")).unwrap();
    assert_eq!((d.model_type.as_str(), d.rope_layers.clone(), d.rope_theta), ("smollm3", c.rope_layers.clone(), 2_000_000.0));
    // The GGUF config equals the HF one in everything the model uses.
    let g = peft_core::gguf::read_gguf_config(&fixtures_dir().join("models/smollm3.gguf")).unwrap();
    assert_eq!(
        (g.model_type.as_str(), g.architecture.as_str(), g.rope_layers.clone(), g.tie_word_embeddings, g.num_key_value_heads, g.head_dim, g.rope_theta),
        ("smollm3", "SmolLM3ForCausalLM", c.rope_layers.clone(), true, 2, 8, 2_000_000.0)
    );
}

/// Bad SmolLM3 configs are refused with ERR_MODEL_CONFIG_INVALID naming the key (from the JSON
/// and through the loader), never a panic.
#[test]
fn smollm3_bad_configs_are_coded_errors() {
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("no_rope_layers", Box::new(|v: &mut serde_json::Value| v["no_rope_layers"] = serde_json::json!([1, 1, 0]))),
        ("no_rope_layers", Box::new(|v: &mut serde_json::Value| v["no_rope_layers"] = serde_json::json!([])),),
        ("no_rope_layers[2]", Box::new(|v: &mut serde_json::Value| v["no_rope_layers"] = serde_json::json!([1, 1, 2, 0]))),
        ("no_rope_layers[0]", Box::new(|v: &mut serde_json::Value| v["no_rope_layers"] = serde_json::json!(["yes", 1, 1, 0]))),
        ("no_rope_layers", Box::new(|v: &mut serde_json::Value| v["no_rope_layers"] = serde_json::json!(1))),
        ("no_rope_layer_interval", Box::new(|v: &mut serde_json::Value| {
            v.as_object_mut().unwrap().remove("no_rope_layers");
            v["no_rope_layer_interval"] = 0.into();
        })),
        ("layer_types[1]", Box::new(|v: &mut serde_json::Value| v["layer_types"] = serde_json::json!(["full_attention", "sliding_attention", "full_attention", "full_attention"]))),
        ("use_sliding_window", Box::new(|v: &mut serde_json::Value| {
            v["use_sliding_window"] = true.into();
            v["sliding_window"] = 4.into();
        })),
    ];
    for (key, edit) in cases {
        let mut v = smollm3_json();
        edit(&mut v);
        let e = LlamaConfig::from_json(&v, std::path::Path::new("config.json")).unwrap_err();
        assert_eq!(e.code(), "ERR_MODEL_CONFIG_INVALID", "{key}: {e}");
        assert!(e.to_string().contains(key), "{key}: the message should name the key: {e}");
        visible(&format!("ok smollm3 bad `{key}`: {e}"));
        let dir = smollm3_folder_with("smollm3-bad", edit);
        let e = load_causal_lm(&dir, DType::F32, &Device::Cpu).err().unwrap_or_else(|| panic!("{key}: loaded"));
        assert_eq!(e.code(), "ERR_MODEL_CONFIG_INVALID", "{key} (loader): {e}");
        remove_dir(&dir);
    }
    // A config built in code with flags for another number of layers.
    let t = candle_core::safetensors::load(fixtures_dir().join("models/smollm3/model.safetensors"), &Device::Cpu).unwrap();
    let mut c = hf_config("smollm3");
    c.rope_layers = Some(vec![true; 3]);
    let e = peft_core::model::llama::LlamaForCausalLM::from_tensors(c, t, DType::F32, &Device::Cpu).err().expect("refused");
    assert_eq!(e.code(), "ERR_MODEL_CONFIG_INVALID", "{e}");
    assert!(e.to_string().contains("no_rope_layers"), "{e}");
}

/// The NoPE layer matters: the same weights with every layer applying RoPE give other logits
/// (so the fixture tests below would notice RoPE applied to a NoPE layer).
#[test]
fn smollm3_nope_layer_changes_the_logits() {
    let exp = Expected::load("smollm3_lora");
    let dir = smollm3_folder_with("smollm3-all-rope", |v| v["no_rope_layers"] = serde_json::json!([1, 1, 1, 1]));
    for general in [false, true] {
        engine::force_general_path(general);
        let m = PeftModel::new(load_causal_lm(&dir, DType::F32, &Device::Cpu).unwrap().model);
        let got = forward_batch(&m, &exp);
        let diff = max_abs(&(got - exp.get("logits_base")).unwrap());
        assert!(diff > 1e-2, "all-RoPE logits should differ from the NoPE model's (general path {general}): {diff}");
        visible(&format!("ok smollm3: all-RoPE vs NoPE logits differ by {diff:.4} (general path {general})"));
    }
    engine::force_general_path(false);
    remove_dir(&dir);
}

#[test]
fn smollm3_lora_logits_generate_engine() {
    let exp = Expected::load("smollm3_lora");
    assert!(engine_runs(&adapter_peft("smollm3_lora", false), &exp), "the engine should run SmolLM3 (NoPE layers)");
    lora_logits_and_generate("smollm3_lora");
}

#[test]
fn smollm3_lora_logits_generate_general_path() {
    engine::force_general_path(true);
    let exp = Expected::load("smollm3_lora");
    assert!(!engine_runs(&adapter_peft("smollm3_lora", false), &exp));
    lora_logits_and_generate("smollm3_lora");
}

#[test]
fn smollm3_lora_loss_and_grads_engine() {
    // The engine takes this training step (it is not silently left to the general path).
    let exp = Expected::load("smollm3_lora");
    let m = adapter_peft("smollm3_lora", true);
    let (ids, b, s) = exp.ids("input_ids");
    let batch = Batch { input_ids: ids, attention_mask: exp.mask("attention_mask"), labels: exp.i64s("labels"), batch_size: b, seq_len: s, ..Default::default() };
    assert!(engine::try_loss_and_grads(&m, &batch, None, None).unwrap().is_some(), "the engine should train SmolLM3");
    lora_loss_and_grads("smollm3_lora");
}

#[test]
fn smollm3_lora_loss_and_grads_general_path() {
    engine::force_general_path(true);
    lora_loss_and_grads("smollm3_lora");
}

#[test]
fn smollm3_gguf_matches_hf() {
    gguf_matches_hf("smollm3_lora", "smollm3.gguf");
    // An HF adapter over the GGUF base.
    let exp = Expected::load("smollm3_lora");
    let mut a = PeftModel::new(load_causal_lm(&fixtures_dir().join("models/smollm3.gguf"), DType::F32, &Device::Cpu).unwrap().model);
    a.load_adapter(&case_dir("smollm3_lora"), "default", false, None).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    check_logits("GGUF smollm3.gguf + HF LoRA", &a, &exp, "logits_adapter");
}

#[test]
fn smollm3_prefix_tuning() {
    prefix_case("smollm3_prefix");
}

#[test]
fn smollm3_resave_is_byte_identical() {
    for case in ["smollm3_lora", "smollm3_prefix"] {
        resave_case(case);
    }
}

/// A merged SmolLM3 saved in HF format reloads with the same logits (config.json keeps
/// `no_rope_layers`); GGUF exports (merged model, LoRA adapter) are refused with
/// ERR_EXPORT_UNSUPPORTED, not written as a Llama file that would rotate the NoPE layer.
#[test]
fn smollm3_merged_save_and_export_refusals() {
    let exp = Expected::load("smollm3_lora");
    let mut m = adapter_peft("smollm3_lora", false);
    m.merge_and_unload(None, false).unwrap();
    let dir = temp_dir("smollm3-merged");
    peft_core::export::save_merged_pretrained(&m, &dir, None, &Default::default()).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!((&saved["model_type"], &saved["no_rope_layers"]), (&smollm3_json()["model_type"], &smollm3_json()["no_rope_layers"]));
    let re = PeftModel::new(load_causal_lm(&dir, DType::F32, &Device::Cpu).unwrap().model);
    check_logits("merged, saved and reloaded", &re, &exp, "logits_merged");
    let e = peft_core::export::export_merged_gguf(&m, &dir.join("m.gguf"), peft_core::export::GgmlType::F32).unwrap_err();
    assert_eq!(e.code(), "ERR_EXPORT_UNSUPPORTED", "{e}");
    assert!(e.to_string().contains("NoPE"), "the refusal should say why: {e}");
    for base in ["models/smollm3", "models/smollm3.gguf"] {
        let opts = peft_core::export::LoraExportOptions { base_model: Some(fixtures_dir().join(base)), ..Default::default() };
        let e = peft_core::export::export_gguf_lora(&case_dir("smollm3_lora"), &dir.join("a.gguf"), &opts).unwrap_err();
        assert_eq!(e.code(), "ERR_EXPORT_UNSUPPORTED", "{base}: {e}");
        assert!(e.to_string().contains("NoPE"), "{base}: the refusal should say why: {e}");
    }
    remove_dir(&dir);
}

/// A SmolLM3 folder quantized at load (Q8_0, every decoder layer linear) runs on the engine's
/// integer kernels with its NoPE layer: logits within 8-bit error of HF's, and the general path
/// (candle graph + quantized linear op) gives the engine's numbers.
#[test]
fn smollm3_quantized_at_load() {
    use peft_core::engine::quant::QuantType;
    use peft_core::model::loader::{load_model, LoadRequest};
    let exp = Expected::load("smollm3_lora");
    let req = LoadRequest { quantize: Some(QuantType::Q8_0), ..Default::default() };
    let m = PeftModel::new(load_model(&fixtures_dir().join("models/smollm3"), DType::F32, &Device::Cpu, &req).unwrap_or_else(|e| panic!("[{}] {e}", e.code())).model);
    assert_eq!(m.base.named_linears().iter().filter(|(_, l)| l.quant.is_some()).count(), 7 * 4);
    let want = exp.get("logits_base");
    let scale = max_abs(want);
    let fast = forward_batch(&m, &exp);
    let diff = max_abs(&(&fast - want).unwrap());
    // 8-bit weights and activations on a model this small (one Q8_0 block per 32-wide row):
    // about 5% of the logit scale here; the NoPE handling itself is checked by the engine
    // against the general path below (the general path's NoPE against HF above).
    assert!(diff > 0.0 && diff <= 0.08 * scale, "Q8_0 vs HF f32 logits: {diff} (scale {scale})");
    engine::force_general_path(true);
    let slow = forward_batch(&m, &exp);
    engine::force_general_path(false);
    let d = max_abs(&(&fast - &slow).unwrap());
    assert!(d <= 1e-4 * scale, "engine vs general path on the quantized SmolLM3: {d}");
    visible(&format!("ok smollm3 Q8_0 at load: {diff:.3e} from HF f32 (scale {scale:.3}), engine vs general {d:.1e}"));
}
