//! Golden tests against Hugging Face PEFT 0.21 (torch 2.13, transformers 5.18) reference outputs
//! for the tiny Llama model in `__test__/fixtures/` (see `__test__/fixtures/README.md` for the
//! formats, inputs and tolerances).
//!
//! Per LoRA case: base logits, adapter logits, disabled logits (= base), merged logits
//! (merge / unmerge / merge_and_unload), greedy generation with and without KV cache, and the
//! per-module r / alpha / scaling. Plus: multi-adapter and mixed-batch logits, loss and
//! gradients, `save_pretrained` round trip, `modules_to_save` handling, and load errors.
//!
//! Run: `cargo test --release -p peft-core --test fixtures_llama`.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use peft_core::generate::{generate, GenerateOptions};
use peft_core::peft_model::PeftModel;
use peft_core::train::{loss_and_grads, Batch};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Load the case's adapter as `default`, and every sub-folder holding an adapter
/// (`cases/<case>/<name>/adapter_config.json`) under its folder name.
fn all_adapters_peft(case: &str) -> PeftModel {
    let mut m = adapter_peft(case, false);
    for name in extra_adapter_names(case) {
        let dir = case_dir(case).join(&name);
        let res = m
            .load_adapter(&dir, &name, false, None)
            .unwrap_or_else(|e| panic!("load_adapter({}, {name}): [{}] {e}", dir.display(), e.code()));
        assert!(res.missing_keys.is_empty() && res.unexpected_keys.is_empty(), "{case}/{name}: {res:?}");
    }
    m
}

fn extra_adapter_names(case: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(case_dir(case))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("adapter_config.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// Greedy generation of 6 tokens from `generate_input_ids` (mask all ones, no EOS stop).
fn gen(m: &PeftModel, exp: &Expected, use_cache: bool) -> Vec<Vec<u32>> {
    let (ids, b, s) = exp.ids("generate_input_ids");
    let opts = GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![], pad_token_id: 0, use_cache, ..Default::default() };
    generate(m, &ids, b, s, None, None, &opts, &|| false).unwrap_or_else(|e| panic!("generate: [{}] {e}", e.code()))
}

fn check_generate(what: &str, m: &PeftModel, exp: &Expected, key: &str) {
    let want = exp.rows_u32(key);
    for use_cache in [true, false] {
        let got = gen(m, exp, use_cache);
        assert_eq!(got, want, "{} {what}: generate(use_cache={use_cache}) != `{key}`", exp.case);
    }
    visible(&format!("ok {} {what}: generate == {key} (use_cache true and false)", exp.case));
}

/// Every injected module of `name` with (r, alpha, scaling) matches `case.json` ->
/// `adapter_layers.<name>` (this is what rank_pattern / alpha_pattern / layers_to_transform /
/// rsLoRA decide).
fn check_adapter_layers(case: &str, m: &PeftModel) {
    let cj = case_json(case);
    let layers = cj["adapter_layers"].as_object().expect("adapter_layers");
    for (name, mods) in layers {
        let want: BTreeMap<String, (usize, f64, f64)> = mods
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (k.clone(), (v["r"].as_u64().unwrap() as usize, v["lora_alpha"].as_f64().unwrap(), v["scaling"].as_f64().unwrap()))
            })
            .collect();
        let got: BTreeMap<String, (usize, f64, f64)> = m
            .base
            .named_linears()
            .into_iter()
            .filter_map(|(k, l)| l.lora(name).map(|a| (k, (a.r, a.alpha, a.scaling))))
            .collect();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{case}/{name}: injected modules differ from case.json adapter_layers"
        );
        for (k, (r, alpha, scaling)) in &want {
            let (gr, ga, gs) = got[k];
            assert_eq!(gr, *r, "{case}/{name} {k}: r");
            assert!((ga - alpha).abs() < 1e-12, "{case}/{name} {k}: lora_alpha {ga} != {alpha}");
            assert!((gs - scaling).abs() < 1e-9, "{case}/{name} {k}: scaling {gs} != {scaling}");
        }
        visible(&format!("ok {case}/{name}: {} modules with the expected r / alpha / scaling", want.len()));
    }
}

// ---------------------------------------------------------------------------------------------
// Per-case checks shared by the LoRA cases
// ---------------------------------------------------------------------------------------------

fn case_base_logits(case: &str) {
    let exp = Expected::load(case);
    let m = base_peft(case);
    check_logits("base model", &m, &exp, "logits_base");
}

fn case_adapter_and_disabled_logits(case: &str) {
    let exp = Expected::load(case);
    let mut m = adapter_peft(case, false);
    check_logits("adapter", &m, &exp, "logits_adapter");
    m.set_disabled(true).unwrap();
    check_logits("disabled adapter", &m, &exp, "logits_base");
    m.set_disabled(false).unwrap();
    check_logits("re-enabled adapter", &m, &exp, "logits_adapter");
}

fn case_merge(case: &str) {
    let exp = Expected::load(case);
    let mut m = adapter_peft(case, false);
    m.merge_adapter(None, false).unwrap();
    assert_eq!(m.merged_adapters(), vec!["default".to_string()], "{case}: merged adapters after merge_adapter");
    check_logits("merged (merge_adapter)", &m, &exp, "logits_merged");
    m.unmerge_adapter().unwrap();
    assert!(m.merged_adapters().is_empty(), "{case}: merged adapters after unmerge");
    check_logits("unmerged (unmerge_adapter)", &m, &exp, "logits_adapter");
    m.merge_and_unload(None, false).unwrap();
    assert!(m.adapter_names().is_empty(), "{case}: adapters left after merge_and_unload");
    check_logits("merge_and_unload", &m, &exp, "logits_merged");
}

fn case_generate(case: &str) {
    let exp = Expected::load(case);
    let m = base_peft(case);
    check_generate("base", &m, &exp, "generate_base");
    let mut m = adapter_peft(case, false);
    check_generate("adapter", &m, &exp, "generate_adapter");
    m.merge_and_unload(None, false).unwrap();
    check_generate("merged", &m, &exp, "generate_merged");
}

fn case_adapter_layers(case: &str) {
    let m = all_adapters_peft(case);
    check_adapter_layers(case, &m);
}

macro_rules! lora_case {
    ($module:ident, $case:literal) => {
        mod $module {
            #[test]
            fn base_logits() {
                super::case_base_logits($case);
            }
            #[test]
            fn adapter_and_disabled_logits() {
                super::case_adapter_and_disabled_logits($case);
            }
            #[test]
            fn merge_unmerge_merge_and_unload_logits() {
                super::case_merge($case);
            }
            #[test]
            fn generate_with_and_without_cache() {
                super::case_generate($case);
            }
            #[test]
            fn adapter_layers_r_alpha_scaling() {
                super::case_adapter_layers($case);
            }
        }
    };
}

lora_case!(llama_lora_qv, "llama_lora_qv");
lora_case!(llama_lora_qv_rslora, "llama_lora_qv_rslora");
lora_case!(llama_lora_multi, "llama_lora_multi");
lora_case!(llama_lora_patterns, "llama_lora_patterns");
lora_case!(llama_lora_dora, "llama_lora_dora");

// ---------------------------------------------------------------------------------------------
// llama_ia3: (IA)³ (output vectors on k/v, an input vector on down_proj)
// ---------------------------------------------------------------------------------------------

mod llama_ia3 {
    use super::*;

    #[test]
    fn base_logits() {
        case_base_logits("llama_ia3");
    }
    #[test]
    fn adapter_and_disabled_logits() {
        case_adapter_and_disabled_logits("llama_ia3");
    }
    #[test]
    fn merge_unmerge_merge_and_unload_logits() {
        case_merge("llama_ia3");
    }
    #[test]
    fn generate_with_and_without_cache() {
        case_generate("llama_ia3");
    }
    #[test]
    fn ia3_vectors_shapes_and_feedforward() {
        let m = adapter_peft("llama_ia3", false);
        let cj = case_json("llama_ia3");
        let want = cj["adapter_layers"]["default"].as_object().unwrap();
        let got: BTreeMap<String, (bool, Vec<usize>)> =
            m.base.named_linears().into_iter().filter_map(|(k, l)| l.ia3("default").map(|a| (k, (a.feedforward, a.l.dims().to_vec())))).collect();
        assert_eq!(got.len(), want.len());
        for (k, v) in want {
            let shape: Vec<usize> = v["ia3_l_shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            assert_eq!(got[k], (v["is_feedforward"].as_bool().unwrap(), shape), "{k}");
        }
    }
}

/// DoRA and IA3 adapters saved again are byte-identical to HF's files; every trainable
/// parameter (lora_A/B, magnitude; ia3_l) receives a gradient.
#[test]
fn dora_and_ia3_round_trip_and_gradients() {
    for case in ["llama_lora_dora", "llama_ia3"] {
        let m = adapter_peft(case, true);
        let out = temp_dir(&format!("rt-{case}"));
        m.save_pretrained(&out, None).unwrap();
        let ours = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        let theirs = std::fs::read(case_dir(case).join("adapter_model.safetensors")).unwrap();
        assert!(ours == theirs, "{case}: adapter_model.safetensors differs from HF's");
        let exp = Expected::load(case);
        let (ids, b, s) = exp.ids("input_ids");
        let mask = exp.mask("attention_mask");
        let labels: Vec<i64> = ids.iter().zip(&mask).map(|(&i, &m)| if m == 0 { -100 } else { i as i64 }).collect();
        let batch = Batch { input_ids: ids, attention_mask: mask, labels, batch_size: b, seq_len: s, task_ids: None, ..Default::default() };
        let (_, _, grads) = loss_and_grads(&m, &batch, None, None).unwrap();
        let params = m.trainable_parameters();
        assert!(params.iter().any(|(k, _)| k.ends_with("lora_magnitude_vector") || k.ends_with("ia3_l")), "{case}: {:?}", params.iter().map(|p| &p.0).collect::<Vec<_>>());
        for (k, v) in params {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{case}: no gradient for {k}"));
            assert!(max_abs(g) > 0.0, "{case}: zero gradient for {k}");
        }
        remove_dir(&out);
    }
}

// ---------------------------------------------------------------------------------------------
// llama_lora_multi: second adapter and mixed batches
// ---------------------------------------------------------------------------------------------

#[test]
fn llama_lora_multi_other_adapter_logits() {
    let case = "llama_lora_multi";
    let exp = Expected::load(case);
    let mut m = all_adapters_peft(case);
    assert_eq!(m.adapter_names(), vec!["default".to_string(), "other".to_string()]);
    // Loading a second adapter does not change the active one.
    check_logits("active default after loading other", &m, &exp, "logits_adapter");
    m.set_adapter(&["other".to_string()]).unwrap();
    check_logits("set_adapter(other)", &m, &exp, "logits_adapter_other");
    m.set_adapter(&["default".to_string()]).unwrap();
    check_logits("set_adapter(default) again", &m, &exp, "logits_adapter");
}

#[test]
fn llama_lora_multi_mixed_batch_logits() {
    let case = "llama_lora_multi";
    let exp = Expected::load(case);
    let m = all_adapters_peft(case);
    let (ids, b, s) = exp.ids("input_ids_mixed");
    assert_eq!(b, 3);
    let mask = exp.mask("attention_mask_mixed");
    let rows = vec![Some("default".to_string()), Some("other".to_string()), None];
    let got = forward(&m, &ids, b, s, &mask, Some(rows));
    let (atol, rtol) = logits_tol(case);
    assert_close(&format!("{case} mixed batch [default, other, __base__] (logits_mixed)"), &got, exp.get("logits_mixed"), atol, rtol);
    // Each row equals that adapter alone (README: mixed_rows_vs_single_adapter_max_abs = 0).
    let row = |t: &Tensor, i: usize| t.narrow(0, i, 1).unwrap();
    let (ids2, b2, s2) = exp.ids("input_ids");
    let mask2 = exp.mask("attention_mask");
    let mut single = all_adapters_peft(case);
    let d = forward(&single, &ids2, b2, s2, &mask2, None);
    single.set_adapter(&["other".to_string()]).unwrap();
    let o = forward(&single, &ids2, b2, s2, &mask2, None);
    single.set_disabled(true).unwrap();
    let base = forward(&single, &ids2, b2, s2, &mask2, None);
    let (d0, _, _) = diff_stats(&row(&got, 0), &row(&d, 0));
    let (d1, _, _) = diff_stats(&row(&got, 1), &row(&o, 1));
    let (d2, _, _) = diff_stats(&row(&got, 2), &row(&base, 0));
    visible(&format!("diff {case} mixed rows vs single adapter (ours): {d0:.3e} {d1:.3e} {d2:.3e}"));
    assert!(d0 <= 1e-5 && d1 <= 1e-5 && d2 <= 1e-5, "{case}: mixed rows differ from single-adapter runs: {d0} {d1} {d2}");
}

// ---------------------------------------------------------------------------------------------
// llama_lora_qv: loss and gradients
// ---------------------------------------------------------------------------------------------

#[test]
fn llama_lora_qv_loss_and_grads() {
    let case = "llama_lora_qv";
    let exp = Expected::load(case);
    let m = adapter_peft(case, true);
    let (ids, b, s) = exp.ids("input_ids");
    let batch = Batch { input_ids: ids, attention_mask: exp.mask("attention_mask"), labels: exp.i64s("labels"), batch_size: b, seq_len: s, task_ids: None, ..Default::default() };
    let (loss, n, grads) = loss_and_grads(&m, &batch, None, None).unwrap_or_else(|e| panic!("loss_and_grads: [{}] {e}", e.code()));
    let want_loss = exp.get("loss").flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    let loss_atol = tolerance(case, "loss_atol", 1e-5);
    visible(&format!("diff {case} loss: got {loss:.8} expected {want_loss:.8} abs {:.3e} (atol {loss_atol:e}); {n} label tokens", (loss - want_loss).abs()));
    assert!((loss - want_loss).abs() <= loss_atol, "{case}: loss {loss} vs expected {want_loss}: abs diff {:e} > {loss_atol:e}", (loss - want_loss).abs());
    let labels = exp.i64s("labels");
    let want_n = (0..b).map(|r| (1..s).filter(|&i| labels[r * s + i] >= 0).count()).sum::<usize>();
    assert_eq!(n, want_n, "{case}: label tokens counted");

    let gatol = tolerance(case, "grad_atol", 2e-5);
    let grtol = tolerance(case, "grad_rtol", 1e-3);
    let params = m.trainable_parameters();
    let expected_keys: BTreeSet<String> = exp.t.keys().filter_map(|k| k.strip_prefix("grad.")).map(String::from).collect();
    let param_keys: BTreeSet<String> = params.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(param_keys, expected_keys, "{case}: trainable parameters vs expected grad.* keys");
    let mut worst = 0f64;
    for (key, var) in &params {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{case}: no gradient for trainable parameter {key}"));
        let gmax = max_abs(g);
        assert!(gmax > 0.0, "{case}: gradient of {key} is all zeros");
        let d = assert_close(&format!("{case} grad.{key}"), g, exp.get(&format!("grad.{key}")), gatol, grtol);
        worst = worst.max(d);
    }
    visible(&format!("diff {case} grads: worst max_abs over {} params = {worst:.3e}", params.len()));
}

// ---------------------------------------------------------------------------------------------
// llama_lora_patterns: rank / alpha patterns and layers_to_transform
// ---------------------------------------------------------------------------------------------

#[test]
fn llama_lora_patterns_rank_alpha_layers() {
    let case = "llama_lora_patterns";
    let m = adapter_peft(case, false);
    // layers_to_transform = [1]: nothing in layer 0.
    let mods = m.adapter_modules("default");
    assert!(!mods.is_empty());
    assert!(mods.iter().all(|n| n.starts_with("model.layers.1.")), "{case}: layers_to_transform=[1] but adapters on {mods:?}");
    let by_name: BTreeMap<String, (usize, f64)> = m
        .base
        .named_linears()
        .into_iter()
        .filter_map(|(k, l)| l.lora("default").map(|a| (k, (a.r, a.scaling))))
        .collect();
    // README: q_proj r=2 (scaling 4), v_proj alpha 32 (scaling 8), layer-1 down_proj r=6 alpha=3
    // (scaling 0.5), others r=4 alpha=8 (scaling 2).
    assert_eq!(by_name["model.layers.1.self_attn.q_proj"], (2, 4.0));
    assert_eq!(by_name["model.layers.1.self_attn.v_proj"], (4, 8.0));
    assert_eq!(by_name["model.layers.1.mlp.down_proj"], (6, 0.5));
    assert_eq!(by_name["model.layers.1.self_attn.k_proj"], (4, 2.0));
    let exp = Expected::load(case);
    check_logits("rank/alpha patterns + layers_to_transform", &m, &exp, "logits_adapter");
}

// ---------------------------------------------------------------------------------------------
// llama_lora_all_linear_mts: all-linear targets + modules_to_save (lm_head copy)
// ---------------------------------------------------------------------------------------------

lora_case!(llama_lora_all_linear_mts, "llama_lora_all_linear_mts");

#[test]
fn llama_lora_all_linear_mts_modules_to_save() {
    let case = "llama_lora_all_linear_mts";
    let exp = Expected::load(case);
    let mut m = base_peft(case);
    let res = m.load_adapter(&case_dir(case), "default", true, None).unwrap();
    assert!(res.missing_keys.is_empty() && res.unexpected_keys.is_empty(), "{case}: {res:?}");
    // The lm_head copy is trainable and saved under HF's key; the original is not counted as trainable.
    let keys: Vec<String> = m.trainable_parameters().into_iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&"base_model.model.lm_head.weight".to_string()), "{case}: lm_head copy not trainable: {keys:?}");
    let sd: Vec<String> = m.adapter_state_dict("default").unwrap().into_iter().map(|(k, _)| k).collect();
    let file: Vec<String> = peft_core::io::read_safetensors(&case_dir(case).join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut file_sorted = file.clone();
    file_sorted.sort();
    assert_eq!(sd, file_sorted, "{case}: state dict keys differ from the HF file");
    // Disabled: the original lm_head is used.
    m.set_disabled(true).unwrap();
    check_logits("disabled (original lm_head)", &m, &exp, "logits_base");
    m.set_disabled(false).unwrap();
    check_logits("adapter with the lm_head copy", &m, &exp, "logits_adapter");
}

// ---------------------------------------------------------------------------------------------
// save_pretrained round trip
// ---------------------------------------------------------------------------------------------

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("parsing {}: {e}", p.display()))
}

#[test]
fn llama_lora_qv_save_pretrained_round_trip() {
    use safetensors::SafeTensors;
    let case = "llama_lora_qv";
    let m = adapter_peft(case, false);
    let out = temp_dir("roundtrip");
    m.save_pretrained(&out, None).unwrap_or_else(|e| panic!("save_pretrained: [{}] {e}", e.code()));

    // adapter_model.safetensors: same keys, shapes, dtypes, bit-identical data, {"format":"pt"}.
    let fx_bytes = std::fs::read(case_dir(case).join("adapter_model.safetensors")).unwrap();
    let our_bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let fx = SafeTensors::deserialize(&fx_bytes).unwrap();
    let ours = SafeTensors::deserialize(&our_bytes).expect("written adapter_model.safetensors parses");
    let (_, our_meta) = SafeTensors::read_metadata(&our_bytes).unwrap();
    let meta: BTreeMap<String, String> = our_meta.metadata().clone().unwrap_or_default().into_iter().collect();
    assert_eq!(meta, BTreeMap::from([("format".to_string(), "pt".to_string())]), "metadata of the written file");
    let fx_names: BTreeSet<String> = fx.names().into_iter().map(String::from).collect();
    let our_names: BTreeSet<String> = ours.names().into_iter().map(String::from).collect();
    assert_eq!(our_names, fx_names, "tensor keys of the written file");
    for k in &fx_names {
        let a = fx.tensor(k).unwrap();
        let b = ours.tensor(k).unwrap();
        assert_eq!(b.dtype(), a.dtype(), "{k}: dtype");
        assert_eq!(b.shape(), a.shape(), "{k}: shape");
        assert!(b.data() == a.data(), "{k}: values are not bit-identical");
    }
    visible(&format!(
        "note: {case} round trip: adapter_model.safetensors keys/shapes/values identical; whole file byte-identical to the fixture: {} ({} vs {} bytes)",
        fx_bytes == our_bytes,
        our_bytes.len(),
        fx_bytes.len()
    ));

    // adapter_config.json: same keys, equal values (target_modules compared as a set) except
    // base_model_name_or_path.
    let fx_cfg_path = case_dir(case).join("adapter_config.json");
    let fx_cfg = read_json(&fx_cfg_path);
    let our_cfg = read_json(&out.join("adapter_config.json"));
    let fk: BTreeSet<&String> = fx_cfg.as_object().unwrap().keys().collect();
    let ok: BTreeSet<&String> = our_cfg.as_object().unwrap().keys().collect();
    assert_eq!(ok, fk, "adapter_config.json key set (ours vs fixture)");
    for k in fk {
        if k == "base_model_name_or_path" {
            continue;
        }
        let (a, b) = (&fx_cfg[k], &our_cfg[k]);
        if k == "target_modules" {
            let set = |v: &serde_json::Value| -> BTreeSet<String> {
                v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
            };
            assert_eq!(set(b), set(a), "adapter_config.json target_modules (as a set)");
        } else {
            assert_eq!(b, a, "adapter_config.json `{k}`: ours {b} vs fixture {a}");
        }
    }
    let fx_text = std::fs::read_to_string(&fx_cfg_path).unwrap();
    let our_text = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
    if fx_text == our_text {
        visible(&format!("note: {case} round trip: adapter_config.json text is byte-identical to the fixture"));
    } else {
        let first = fx_text.lines().zip(our_text.lines()).enumerate().find(|(_, (a, b))| a != b);
        visible(&format!(
            "note: {case} round trip: adapter_config.json text differs from the fixture (len {} vs {}); first differing line: {:?}",
            our_text.len(),
            fx_text.len(),
            first
        ));
    }
    assert!(out.join("README.md").is_file(), "README.md model card written");

    // The saved adapter loads back and gives the same logits.
    let mut back = base_peft(case);
    let res = back.load_adapter(&out, "default", false, None).unwrap();
    assert!(res.missing_keys.is_empty() && res.unexpected_keys.is_empty(), "{res:?}");
    let exp = Expected::load(case);
    check_logits("reloaded after save_pretrained", &back, &exp, "logits_adapter");
    remove_dir(&out);
}

// ---------------------------------------------------------------------------------------------
// Load errors
// ---------------------------------------------------------------------------------------------

/// A copy of `llama_lora_qv`'s adapter files in a temp folder.
fn qv_copy(tag: &str) -> std::path::PathBuf {
    let d = temp_dir(tag);
    copy_files(&case_dir("llama_lora_qv"), &d);
    d
}

fn expect_err(r: peft_core::Result<peft_core::peft_model::LoadResult>, code: &str, what: &str) -> peft_core::PeftError {
    match r {
        Ok(res) => panic!("{what}: expected {code}, but loading succeeded ({res:?})"),
        Err(e) => {
            visible(&format!("ok {what}: [{}] {e}", e.code()));
            assert_eq!(e.code(), code, "{what}: wrong error code for `{e}`");
            e
        }
    }
}

#[test]
fn error_missing_adapter_folder() {
    let mut m = base_peft("llama_lora_qv");
    let dir = case_dir("no_such_case_folder");
    let e = expect_err(m.load_adapter(&dir, "default", false, None), "ERR_NOT_FOUND", "missing adapter folder");
    assert!(e.to_string().contains("no_such_case_folder"), "the error should name the folder: {e}");
}

#[test]
fn error_malformed_adapter_config() {
    let d = qv_copy("badcfg");
    std::fs::write(d.join("adapter_config.json"), "{\"r\": 8, \"peft_type\": \"LORA\",").unwrap();
    let mut m = base_peft("llama_lora_qv");
    let e = expect_err(m.load_adapter(&d, "default", false, None), "ERR_ADAPTER_CONFIG_INVALID", "malformed adapter_config.json");
    assert!(e.to_string().contains(&d.join("adapter_config.json").display().to_string()), "the error should name the file: {e}");
    assert!(m.adapter_names().is_empty());
    remove_dir(&d);
}

#[test]
fn error_truncated_safetensors() {
    let d = qv_copy("trunc");
    let p = d.join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let mut m = base_peft("llama_lora_qv");
    let e = expect_err(m.load_adapter(&d, "default", false, None), "ERR_SAFETENSORS_INVALID", "truncated adapter_model.safetensors");
    assert!(e.to_string().contains(&p.display().to_string()), "the error should name the file: {e}");
    assert!(m.adapter_names().is_empty());
    remove_dir(&d);
}

#[test]
fn error_lora_a_shape_mismatch() {
    let d = qv_copy("shape");
    let p = d.join("adapter_model.safetensors");
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let mut tensors = peft_core::io::read_safetensors(&p, &Device::Cpu).unwrap();
    for (k, t) in tensors.iter_mut() {
        if k == key {
            // [8, 64] -> [8, 48]: an adapter made for a model with another hidden size.
            *t = t.narrow(1, 0, 48).unwrap().contiguous().unwrap();
        }
    }
    let bytes = peft_core::io::safetensors_bytes(&tensors, Some(&[("format", "pt")])).unwrap();
    std::fs::write(&p, bytes).unwrap();
    let mut m = base_peft("llama_lora_qv");
    let e = expect_err(m.load_adapter(&d, "default", false, None), "ERR_SHAPE_MISMATCH", "lora_A of the wrong shape");
    assert!(e.to_string().contains(key), "the error should name the key: {e}");
    assert!(m.adapter_names().is_empty());
    remove_dir(&d);
}

#[test]
fn error_target_modules_match_nothing() {
    let d = qv_copy("notarget");
    let cp = d.join("adapter_config.json");
    let mut cfg = read_json(&cp);
    cfg["target_modules"] = serde_json::json!(["no_such_proj", "wq"]);
    std::fs::write(&cp, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let mut m = base_peft("llama_lora_qv");
    let e = expect_err(m.load_adapter(&d, "default", false, None), "ERR_NO_TARGET_MODULES", "target_modules matching nothing");
    assert!(e.to_string().contains("no_such_proj"), "the error should name the targets: {e}");
    assert!(m.adapter_names().is_empty());
    remove_dir(&d);
}

#[test]
fn error_adapter_name_in_use() {
    let case = "llama_lora_qv";
    let mut m = adapter_peft(case, false);
    let e = expect_err(m.load_adapter(&case_dir(case), "default", false, None), "ERR_ADAPTER_EXISTS", "second adapter named default");
    assert!(e.to_string().contains("default"), "the error should name the adapter: {e}");
    // The model is unchanged.
    assert_eq!(m.adapter_names(), vec!["default".to_string()]);
    let exp = Expected::load(case);
    check_logits("adapter after refused second load", &m, &exp, "logits_adapter");
}
