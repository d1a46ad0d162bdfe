//! OFT (issue 15) against HF PEFT 0.21: `__test__/fixtures/cases/llama_oft` (OFTConfig
//! oft_block_size=8 on q_proj/v_proj/down_proj of the tiny Llama, Cayley-Neumann with 5 terms,
//! init_weights=False), `llama_oft_variants` (r=3 adjusted per layer, block_share, the exact
//! Cayley transform, COFT with eps=0.5) and `llama_oft_neumann3` (3 Neumann terms); OFT on
//! embeddings (HF `oft.Embedding`): `llama_oft_embedding` (embed_tokens + q_proj/down_proj of the
//! tiny Llama, untied) and `gpt2_oft_wte` (GPT-2's wte, tied to lm_head); made by
//! `__test__/scripts/make_oft_fixtures.py`.
//!
//! Run: `cargo test -p peft-core --release --test oft`.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use peft_core::model::loader::load_causal_lm;
use peft_core::peft_model::PeftModel;
use peft_core::train::loss_and_grads;
use peft_core::tuners::config::AdapterConfig;
use serde_json::json;
use std::collections::BTreeSet;

const CASE: &str = "llama_oft";
const VARIANTS: &str = "llama_oft_variants";

fn oft(extra: serde_json::Value) -> AdapterConfig {
    config_with(json!({"peft_type": "OFT", "task_type": "CAUSAL_LM", "r": 0, "oft_block_size": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}), extra)
}

/// Checks the loss and every `oft_R` gradient of `m` against the case's `loss` / `grad.<key>`
/// (1e-4 relative to each gradient's scale).
fn check_grads(case: &str, m: &PeftModel) {
    check_hf_loss_and_grads(case, m);
}

#[test]
fn oft_logits_adapted_disabled_merged_and_greedy_match_hf() {
    let exp = Expected::load(CASE);
    let mut m = adapter_peft(CASE, false);
    assert_eq!(m.peft_type(), Some("OFT"));
    check_adapter_then_disabled(&mut m, &exp);
    check_greedy("", &m, &exp);
    // Merge (W Rᵀ) and unmerge (W R⁻ᵀ): the base weights come back within 1e-6.
    check_merge_unmerge(&mut m, &exp, |_| {});
    check_merge_and_unload(CASE, &exp);
    // Three Neumann terms (R = I + 2Q + 2Q² + Q³).
    let exp3 = Expected::load("llama_oft_neumann3");
    check_logits("3 Neumann terms", &adapter_peft("llama_oft_neumann3", false), &exp3, "logits_adapter");
}

#[test]
fn oft_round_trip_is_byte_identical() {
    for case in [CASE, VARIANTS, "llama_oft_neumann3"] {
        resave_case(case);
    }
}

#[test]
fn oft_counts_status_and_gradients_match_hf() {
    let m = adapter_peft(CASE, true);
    check_counts_and_status(CASE, &m, 6, "oft.Linear", "OFTModel");
    check_grads(CASE, &m);
}

#[test]
fn oft_variants_block_share_exact_cayley_and_coft_match_hf() {
    let exp = Expected::load(VARIANTS);
    let mut m = adapter_peft(VARIANTS, true);
    check_hf_counts(VARIANTS, &m);
    // The file holds unprojected weights: COFT projects them during the forward and writes them back.
    check_logits("adapter (COFT projects)", &m, &exp, "logits_adapter");
    for (k, v) in m.trainable_parameters() {
        let want = exp.get(&format!("after.{k}"));
        assert_close(&format!("{k} after COFT's projection"), v.as_tensor(), want, 1e-6, 1e-5);
    }
    check_grads(VARIANTS, &m);
    m.set_disabled(true).unwrap();
    check_logits("disabled", &m, &exp, "logits_disabled");
    m.set_disabled(false).unwrap();
    m.merge_adapter(None, true).unwrap();
    check_logits("merged", &m, &exp, "logits_merged");
    m.unmerge_adapter().unwrap();
    check_logits("unmerged", &m, &exp, "logits_adapter");
}

#[test]
fn oft_fresh_adapter_is_a_no_op_and_trains_only_oft_params() {
    let exp = Expected::load(CASE);
    let mut m = base_peft(CASE);
    let targeted = m.add_adapter("default", oft(json!({})), 7).unwrap();
    assert_eq!(targeted.len(), 6);
    // init_weights=True: oft_R = 0, R = I.
    check_logits("fresh OFT (init_weights=True)", &m, &exp, "logits_base");
    assert_eq!(m.nb_trainable_parameters().0 as u64, case_json(CASE)["trainable_params"].as_u64().unwrap(), "HF's trainable count");
    // One SGD step on the gradients: only the oft_R weights have gradients, and they move the logits.
    check_one_step_trains_only(&m, &exp, ".oft_R.weight");
    // A loaded config of PEFT < 0.18 with the Neumann series: HF's warning.
    let mut m2 = base_peft(CASE);
    m2.add_adapter("old", oft(json!({"peft_version": "0.17.0"})), 1).unwrap();
    assert!(m2.take_warnings().iter().any(|w| w.contains("changed to be more numerically stable in PEFT 0.18.0")));
}

#[test]
fn oft_adjusts_r_and_block_size_as_hf() {
    // r=3 on 64 inputs → 2 blocks of 32 (HF's warning); oft_block_size=7 on 64 → 8 (nearest divisor).
    let mut m = base_peft(CASE);
    m.add_adapter("a", oft(json!({"r": 3, "oft_block_size": 0, "target_modules": ["q_proj"]})), 1).unwrap();
    assert!(m.take_warnings().iter().any(|w| w == "Invalid `r` (3)! Adjusted `r` to (2)."));
    let shapes: Vec<Vec<usize>> = m.trainable_parameters().iter().map(|(_, v)| v.dims().to_vec()).collect();
    assert_eq!(shapes, vec![vec![2, 496]; 2]);
    let mut m = base_peft(CASE);
    m.add_adapter("b", oft(json!({"oft_block_size": 7, "target_modules": ["q_proj"], "block_share": true})), 1).unwrap();
    assert!(m.take_warnings().iter().any(|w| w == "Invalid `oft_block_size` (7)! Adjusted `oft_block_size` to (8)."));
    let shapes: Vec<Vec<usize>> = m.trainable_parameters().iter().map(|(_, v)| v.dims().to_vec()).collect();
    assert_eq!(shapes, vec![vec![1, 28]; 2]);
}

#[test]
fn oft_config_parses_hf_options_and_refuses_bad_ones() {
    check_hf_options_roundtrip(CASE);
    let base = |extra: serde_json::Value| json_with(json!({"peft_type": "OFT", "oft_block_size": 8, "target_modules": ["q_proj"]}), extra);
    check_config_refusals(&[
        (base(json!({"r": 2})), "You can only specify either r (2) or oft_block_size (8)"),
        (base(json!({"oft_block_size": 0})), "Either `r` or `oft_block_size` must be non-zero"),
        (base(json!({"r": -1})), "`r`"),
        (base(json!({"oft_block_size": "8"})), "`oft_block_size`"),
        (base(json!({"module_dropout": 1.5})), "module_dropout"),
        (base(json!({"eps": -1})), "`eps`"),
        (base(json!({"num_cayley_neumann_terms": -2})), "num_cayley_neumann_terms"),
        (base(json!({"bias": "lora_only"})), "bias"),
        (base(json!({"coft": "yes"})), "coft"),
        (base(json!({"block_share": 1})), "block_share"),
        (base(json!({"use_cayley_neumann": null})), "use_cayley_neumann"),
        (base(json!({"layers_pattern": "layers"})), "layers_to_transform"),
        (json!({"peft_type": "OFT", "r": 8, "target_modules": ["q_proj"]}), "OFT has been updated since PEFT 0.14.0"),
        (json!({"peft_type": "OFT", "oft_block_size": 8}), "target_modules"),
    ]);
    // HF's refusal of GPT-2's Conv1D (case.json records HF's TypeError text); embeddings are not built here.
    let gpt2 = load_causal_lm(&fixtures_dir().join("models").join("gpt2"), DType::F32, &Device::Cpu).unwrap();
    let mut g = PeftModel::new(gpt2.model);
    let e = g.add_adapter("x", AdapterConfig::from_json(&base(json!({"target_modules": ["c_attn"]})), None).unwrap(), 1).unwrap_err();
    assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
    let hf_msg = case_json(CASE)["gpt2_refusal"].as_str().unwrap().to_string();
    assert!(e.to_string().contains(&hf_msg), "{e}\nvs HF: {hf_msg}");
    // (Embeddings, refused here before, are adapted now: see the `oft_embedding_*` tests.)
    let mut m = base_peft(CASE);
    let e = m.add_adapter("x", oft(json!({"target_modules": ["nope"]})), 1).unwrap_err();
    assert_eq!(e.code(), "ERR_NO_TARGET_MODULES", "{e}");
    assert!(m.adapter_names().is_empty());
}

/// `m` (the case's adapter loaded) on the case's batch as a mixed batch (`default` on row 0, the
/// base on row 1): refused, naming `adapterNames` and OFT (HF 0.21's OFT layers ignore
/// `adapter_names`).
fn check_mixed_refused(case: &str, m: &PeftModel) {
    check_mixed_batch_refused(case, m, &["OFT"]);
}

#[test]
fn oft_refuses_mixed_batches_and_old_checkpoints() {
    check_mixed_refused(CASE, &adapter_peft(CASE, false));
    // A PEFT <= 0.15 file (`oft_r` keys): HF's error.
    let dir = temp_dir("oft-old");
    std::fs::copy(case_dir(CASE).join("adapter_config.json"), dir.join("adapter_config.json")).unwrap();
    let t = Tensor::zeros((8, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let bytes = peft_core::io::safetensors_bytes(&[("base_model.model.model.layers.0.self_attn.q_proj.oft_r.weight".into(), t)], None).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), bytes).unwrap();
    let mut fresh = base_peft(CASE);
    let e = fresh.load_adapter(&dir, "default", false, None).unwrap_err();
    assert!(e.to_string().contains("Trying to load old OFT checkpoint"), "{e}");
    assert!(fresh.adapter_names().is_empty());
    remove_dir(&dir);
}

#[test]
fn oft_bias_oft_only_and_all_train_and_save_hfs_biases() {
    // OFT on the tiny BERT's query/value: HF's trainable counts and saved keys.
    check_bert_bias(CASE, &["oft_only", "all"], |bias| json!({"peft_type": "OFT", "oft_block_size": 8, "target_modules": ["query", "value"], "bias": bias}));
}

const EMB: &str = "llama_oft_embedding";
const WTE: &str = "gpt2_oft_wte";

/// Greedy ids of `m` from the case's first five `input_ids` (KV cache on and off) against `key`.
fn check_greedy_key(what: &str, m: &PeftModel, exp: &Expected, key: &str) {
    use peft_core::generate::{generate, GenerateOptions};
    let (ids, _, _) = exp.ids("input_ids");
    for use_cache in [true, false] {
        let opts = GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![], pad_token_id: 0, use_cache, ..Default::default() };
        let got = generate(m, &ids[..5], 1, 5, None, None, &opts, &|| false).unwrap();
        assert_eq!(got, exp.rows_u32(key), "{what} greedy ids (use_cache={use_cache})");
    }
}

/// The checks both embedding cases share: adapter / disabled / base logits, greedy ids, merge
/// (safe) and unmerge with the base weights restored, merged greedy ids, merge_and_unload,
/// HF's counts, layer status, gradients, and the byte-identical re-save.
fn check_embedding_case(case: &str, emb_module: &str, linears: usize) {
    let exp = Expected::load(case);
    let mut m = adapter_peft(case, false);
    check_adapter_then_disabled(&mut m, &exp);
    check_greedy("adapter", &m, &exp);
    // Merge (safe) and unmerge: the base weights come back within f32 rounding of `W R R⁻¹`
    // (HF inverts in f32 too; the 5-term series of the scaled test weights is not orthogonal, so
    // the inverse amplifies the rounding: 1e-4 of each weight's largest entry; merging moves
    // them by O(1) of it).
    let before = base_weights(&m);
    m.merge_adapter(None, true).unwrap();
    check_logits("merged", &m, &exp, "logits_merged");
    check_greedy_key("merged", &m, &exp, "greedy_merged");
    m.unmerge_adapter().unwrap();
    check_logits("unmerged", &m, &exp, "logits_unmerged");
    for ((n, a), (_, b)) in before.iter().zip(base_weights(&m)) {
        let d = max_abs(&(a - &b).unwrap());
        assert!(d <= 1e-4 * max_abs(a), "{case} {n}: unmerged weight differs from the base by {d:e}");
    }
    let mut u = adapter_peft(case, false);
    u.merge_and_unload(None, false).unwrap();
    check_logits("merge_and_unload", &u, &exp, "logits_merge_and_unload");

    let m = adapter_peft(case, true);
    check_hf_counts(case, &m);
    let status = m.layer_status().unwrap();
    assert_eq!(status.len(), linears + 1, "{status:?}");
    let emb: Vec<_> = status.iter().filter(|s| s["module_type"] == "oft.Embedding").collect();
    assert_eq!(emb.len(), 1, "{status:?}");
    assert!(emb[0]["name"].as_str().unwrap().ends_with(emb_module), "{:?}", emb[0]);
    check_grads(case, &m);
    resave_case(case);
}

#[test]
fn oft_embedding_on_llama_embed_tokens_matches_hf() {
    check_embedding_case(EMB, "model.embed_tokens", 4);
}

#[test]
fn oft_embedding_on_gpt2_tied_wte_matches_hf() {
    // lm_head is tied to wte: unmerged, only the looked-up rows rotate (HF's merged logits differ
    // from the adapter's by `merged_vs_adapter_max_abs`); merged, the shared table `W R` is also
    // the head's, as HF's in-place merge leaves it.
    assert!(case_json(WTE)["merged_vs_adapter_max_abs"].as_f64().unwrap() > 0.1);
    check_embedding_case(WTE, "transformer.wte", 0);
    // The head holds the merged table while merged and the base table again after unmerging.
    let mut m = adapter_peft(WTE, false);
    let table = |m: &PeftModel, name: &str| m.base.named_linears().into_iter().find(|(n, _)| n == name).unwrap().1.weight.clone();
    let base = table(&m, "lm_head");
    m.merge_adapter(None, false).unwrap();
    assert_eq!(max_abs(&(table(&m, "lm_head") - table(&m, "transformer.wte")).unwrap()), 0.0);
    assert!(max_abs(&(table(&m, "lm_head") - &base).unwrap()) > 1e-3);
    m.unmerge_adapter().unwrap();
    assert!(max_abs(&(table(&m, "lm_head") - &base).unwrap()) <= 1e-5 * max_abs(&base));
}

#[test]
fn oft_embedding_fresh_adapter_is_a_no_op_trains_saves_and_reloads() {
    let exp = Expected::load(EMB);
    let cj = case_json(EMB);
    let mut m = base_peft(EMB);
    let cfg = oft(json!({"target_modules": ["embed_tokens", "q_proj", "down_proj"]}));
    assert_eq!(m.add_adapter("default", cfg, 3).unwrap().len(), 5);
    check_logits("fresh OFT on embed_tokens (init_weights=True)", &m, &exp, "logits_base");
    assert_eq!(m.nb_trainable_parameters().0 as u64, cj["trainable_params"].as_u64().unwrap(), "HF's trainable count");
    let emb_key = "model.embed_tokens.oft_embedding_R.weight";
    let (_, _, grads) = loss_and_grads(&m, &expected_batch(&exp), None, None).unwrap();
    for (k, v) in m.trainable_parameters() {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {k}"));
        assert!(max_abs(g) > 0.0, "{k}: zero gradient at the identity");
        v.set(&(v.as_tensor() - (g * 0.5).unwrap()).unwrap()).unwrap();
    }
    assert!(m.trainable_parameters().iter().any(|(k, _)| k.ends_with(emb_key)), "{:?}", m.trainable_parameters().iter().map(|(k, _)| k).collect::<Vec<_>>());
    let moved = forward_batch(&m, &exp);
    assert!(max_abs(&(&moved - exp.get("logits_base")).unwrap()) > 1e-4, "the step changes the logits");
    // Saved as HF saves it: the OFT weights plus the base table (`save_embedding_layers="auto"`).
    let out = temp_dir("oft-emb");
    m.save_pretrained(&out, None).unwrap();
    let saved: BTreeSet<String> = peft_core::io::read_safetensors(&out.join("adapter_model.safetensors"), &Device::Cpu).unwrap().into_iter().map(|(k, _)| k).collect();
    let want: BTreeSet<String> = cj["adapter_keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()).collect();
    assert_eq!(saved, want, "saved keys");
    let mut again = base_peft(EMB);
    let res = again.load_adapter(&out, "default", false, None).unwrap();
    assert!(res.missing_keys.is_empty() && res.unexpected_keys.is_empty(), "{:?} {:?}", res.missing_keys, res.unexpected_keys);
    let d = max_abs(&(forward_batch(&again, &exp) - &moved).unwrap());
    assert!(d <= 1e-6, "reloaded logits differ by {d}");
    remove_dir(&out);
    // A shape that does not fit the table's dim is refused naming the key.
    let bad = temp_dir("oft-emb-bad");
    std::fs::copy(case_dir(EMB).join("adapter_config.json"), bad.join("adapter_config.json")).unwrap();
    let t = Tensor::zeros((4, 120), DType::F32, &Device::Cpu).unwrap();
    let bytes = peft_core::io::safetensors_bytes(&[(format!("base_model.model.{emb_key}"), t)], None).unwrap();
    std::fs::write(bad.join("adapter_model.safetensors"), bytes).unwrap();
    let mut fresh = base_peft(EMB);
    let e = fresh.load_adapter(&bad, "default", false, None).unwrap_err();
    assert_eq!(e.code(), "ERR_SHAPE_MISMATCH", "{e}");
    assert!(e.to_string().contains("oft_embedding_R"), "{e}");
    assert!(fresh.adapter_names().is_empty());
    remove_dir(&bad);
}

#[test]
fn oft_embedding_variants_block_share_exact_cayley_and_coft_round_trip() {
    // Options HF computes with the same rotation module (no fixture of their own): block sharing,
    // the exact transform and COFT on the table; merging then unmerging restores it, and the
    // merged logits equal the unmerged ones (untied Llama).
    let exp = Expected::load(EMB);
    let mut m = base_peft(EMB);
    let cfg = oft(json!({"target_modules": ["embed_tokens"], "oft_block_size": 16, "block_share": true, "use_cayley_neumann": false, "coft": true, "eps": 0.5, "init_weights": false}));
    m.add_adapter("default", cfg, 5).unwrap();
    let params = m.trainable_parameters();
    assert_eq!(params.len(), 1);
    assert_eq!(params[0].1.dims(), [1, 120]);
    let adapted = forward_batch(&m, &exp);
    assert!(max_abs(&(&adapted - exp.get("logits_base")).unwrap()) > 1e-3, "the rotation changes the logits");
    let before = base_weights(&m);
    m.merge_adapter(None, true).unwrap();
    let merged = forward_batch(&m, &exp);
    assert!(max_abs(&(&merged - &adapted).unwrap()) <= 1e-4, "merged vs adapter");
    m.unmerge_adapter().unwrap();
    for ((n, a), (_, b)) in before.iter().zip(base_weights(&m)) {
        assert!(max_abs(&(a - &b).unwrap()) <= 1e-5 * max_abs(a), "{n}: not restored");
    }
}

#[test]
fn oft_embedding_refuses_mixed_batches_and_leaves_the_layer_as_hf_names_it() {
    // HF 0.21's oft.Embedding.forward ignores `adapter_names`: mixed batches are refused.
    let m = adapter_peft(EMB, false);
    check_mixed_refused(EMB, &m);
    let emb = m.base.named_linears().into_iter().find(|(n, _)| n == "model.embed_tokens").unwrap().1;
    assert_eq!(emb.tuner_module_type(), "oft.Embedding");
    assert_eq!(emb.adapter_kind("default"), Some("oft.Embedding"));
}

#[test]
fn a_reloaded_embedding_adapter_keeps_the_tied_head() {
    // The tiny Qwen3 ties `lm_head` to `embed_tokens`. An adapter on the embedding saves the base
    // table with it (HF `save_embedding_layers="auto"`); loading it must keep the head on the same
    // table (HF copies into the one tied `Parameter`), so that a merge moves the head as it does
    // before saving.
    let dir = fixtures_dir().join("models").join("qwen3");
    let load = || PeftModel::new(load_causal_lm(&dir, DType::F32, &Device::Cpu).unwrap().model);
    let (ids, b, s, mask) = (vec![5u32, 17, 33, 9, 120, 44, 12, 200, 64, 3, 99, 150], 2, 6, vec![1u8; 12]);
    let mut m = load();
    m.add_adapter("default", oft(json!({"target_modules": ["embed_tokens"], "init_weights": false})), 3).unwrap();
    let unmerged = forward(&m, &ids, b, s, &mask, None);
    let out = temp_dir("oft-tied-reload");
    m.save_pretrained(&out, None).unwrap();
    let saved: Vec<String> = peft_core::io::read_safetensors(&out.join("adapter_model.safetensors"), &Device::Cpu).unwrap().into_iter().map(|(k, _)| k).collect();
    assert!(saved.iter().any(|k| k.ends_with("embed_tokens.base_layer.weight")), "{saved:?}");
    m.merge_adapter(None, true).unwrap();
    let merged = forward(&m, &ids, b, s, &mask, None);
    assert!(max_abs(&(&merged - &unmerged).unwrap()) > 1e-2, "the merge moves the tied head");
    let mut r = load();
    r.load_adapter(&out, "default", false, None).unwrap();
    assert_close("reloaded", &forward(&r, &ids, b, s, &mask, None), &unmerged, 1e-5, 1e-5);
    r.merge_adapter(None, true).unwrap();
    assert_close("reloaded, then merged", &forward(&r, &ids, b, s, &mask, None), &merged, 1e-5, 1e-5);
    remove_dir(&out);
}
