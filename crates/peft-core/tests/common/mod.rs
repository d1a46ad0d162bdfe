//! Shared helpers for the golden-fixture tests: where the fixtures live, loading the base model and
//! adapters, reading `expected.safetensors`, and tolerance checks that fail with the max abs diff.
//!
//! Fixtures live in `<repo>/__test__/fixtures/` (a copy of the HF PEFT 0.21 reference set, see
//! its README.md): `models/<model>/` and `cases/<case>/`. Tests read nothing outside that folder.

#![allow(dead_code)]

pub mod random;

use candle_core::{DType, Device, Tensor};
use peft_core::model::loader::load_causal_lm;
use peft_core::model::ForwardOptions;
use peft_core::peft_model::PeftModel;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Print a line that `cargo test` shows even for passing tests (libtest captures `println!` and
/// `eprintln!`, not direct writes to the stderr handle).
pub fn visible(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// `<repo>/__test__/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../__test__/fixtures")
}

/// `<fixtures>/cases/<case>`.
pub fn case_dir(case: &str) -> PathBuf {
    fixtures_dir().join("cases").join(case)
}

/// The case's `case.json`.
pub fn case_json(case: &str) -> serde_json::Value {
    let p = case_dir(case).join("case.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", p.display()))
}

/// `tolerances.<key>` of the case, or `default`.
pub fn tolerance(case: &str, key: &str, default: f64) -> f64 {
    case_json(case)["tolerances"][key].as_f64().unwrap_or(default)
}

/// The base model of a case: `base_model_name_or_path` of its adapter_config.json, resolved
/// against the fixtures folder (the README says every path in the set is relative to it).
pub fn base_model_path(case: &str) -> PathBuf {
    let p = case_dir(case).join("adapter_config.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rel = v["base_model_name_or_path"].as_str().expect("base_model_name_or_path is a string");
    fixtures_dir().join(rel)
}

/// A fresh `PeftModel` around the case's base model (f32, CPU), no adapter.
pub fn base_peft(case: &str) -> PeftModel {
    let path = base_model_path(case);
    let loaded = load_causal_lm(&path, DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("load_causal_lm({}): [{}] {e}", path.display(), e.code()));
    PeftModel::new(loaded.model)
}

/// The base model with the case's adapter loaded as `default`.
pub fn adapter_peft(case: &str, is_trainable: bool) -> PeftModel {
    let mut m = base_peft(case);
    let dir = case_dir(case);
    let res = m
        .load_adapter(&dir, "default", is_trainable, None)
        .unwrap_or_else(|e| panic!("load_adapter({}): [{}] {e}", dir.display(), e.code()));
    assert!(res.missing_keys.is_empty(), "{case}: missing keys {:?}", res.missing_keys);
    assert!(res.unexpected_keys.is_empty(), "{case}: unexpected keys {:?}", res.unexpected_keys);
    m
}

/// The tensors of a case's `expected.safetensors`.
pub struct Expected {
    pub case: String,
    pub t: HashMap<String, Tensor>,
}

impl Expected {
    pub fn load(case: &str) -> Self {
        let p = case_dir(case).join("expected.safetensors");
        let t = peft_core::io::read_safetensors(&p, &Device::Cpu)
            .unwrap_or_else(|e| panic!("read_safetensors({}): [{}] {e}", p.display(), e.code()))
            .into_iter()
            .collect();
        Expected { case: case.into(), t }
    }

    pub fn has(&self, key: &str) -> bool {
        self.t.contains_key(key)
    }

    pub fn get(&self, key: &str) -> &Tensor {
        self.t.get(key).unwrap_or_else(|| panic!("{}: expected.safetensors has no `{key}`", self.case))
    }

    /// An I64 id tensor `[b, s]` as `(u32 ids row-major, b, s)`.
    pub fn ids(&self, key: &str) -> (Vec<u32>, usize, usize) {
        let t = self.get(key);
        let (b, s) = t.dims2().unwrap_or_else(|e| panic!("{}: `{key}` is not 2-D: {e}", self.case));
        let v: Vec<i64> = t.to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let v = v
            .into_iter()
            .map(|x| u32::try_from(x).unwrap_or_else(|_| panic!("{}: `{key}` holds {x}", self.case)))
            .collect();
        (v, b, s)
    }

    /// An I64 0/1 mask tensor as u8.
    pub fn mask(&self, key: &str) -> Vec<u8> {
        let v: Vec<i64> = self.get(key).to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().map(|x| x as u8).collect()
    }

    /// An I64 tensor as a flat Vec<i64>.
    pub fn i64s(&self, key: &str) -> Vec<i64> {
        self.get(key).to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// `[b, s]` rows of an I64 tensor as u32 (generate outputs).
    pub fn rows_u32(&self, key: &str) -> Vec<Vec<u32>> {
        let (v, b, s) = self.ids(key);
        (0..b).map(|r| v[r * s..(r + 1) * s].to_vec()).collect()
    }
}

/// Max |a - b| and whether every element satisfies `|a - b| <= atol + rtol * |b|` (b = expected).
pub fn diff_stats(got: &Tensor, exp: &Tensor) -> (f64, Vec<f32>, Vec<f32>) {
    let g: Vec<f32> = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let e: Vec<f32> = exp.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let max = g.iter().zip(&e).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0f64, |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) });
    (max, g, e)
}

/// Assert `got` ≈ `exp` (same shape; `|got - exp| <= atol + rtol |exp|` everywhere). Returns the
/// max abs diff and prints it as a visible line `diff <what>: max_abs=...`.
pub fn assert_close(what: &str, got: &Tensor, exp: &Tensor, atol: f64, rtol: f64) -> f64 {
    assert_eq!(got.dims(), exp.dims(), "{what}: shape {:?} != expected {:?}", got.dims(), exp.dims());
    let (max, g, e) = diff_stats(got, exp);
    let mut worst: Option<(usize, f64)> = None;
    let mut n_bad = 0usize;
    for (i, (a, b)) in g.iter().zip(&e).enumerate() {
        let d = (*a as f64 - *b as f64).abs();
        let lim = atol + rtol * (*b as f64).abs();
        if d.is_nan() || d > lim {
            n_bad += 1;
            if worst.map(|(_, w)| d > w || w.is_nan()).unwrap_or(true) {
                worst = Some((i, d));
            }
        }
    }
    visible(&format!("diff {what}: max_abs={max:.3e} (atol {atol:e}, rtol {rtol:e})"));
    if let Some((i, d)) = worst {
        panic!(
            "{what}: {n_bad} of {} elements outside atol {atol:e} + rtol {rtol:e}; max abs diff {max:.6e}; worst at flat index {i} (shape {:?}): got {} expected {} (diff {d:.6e})",
            g.len(),
            exp.dims(),
            g[i],
            e[i]
        );
    }
    max
}

/// Logits tolerance of a case (`tolerances.logits_atol/rtol`, README default 1e-4 / 1e-4).
pub fn logits_tol(case: &str) -> (f64, f64) {
    (tolerance(case, "logits_atol", 1e-4), tolerance(case, "logits_rtol", 1e-4))
}

/// Forward `[b, s]` ids with an attention mask and optional per-row adapters → `[b, s, vocab]`.
pub fn forward(m: &PeftModel, ids: &[u32], b: usize, s: usize, mask: &[u8], rows: Option<Vec<Option<String>>>) -> Tensor {
    let opts = ForwardOptions {
        attention_mask: Some(mask.to_vec()),
        adapter_rows: rows.map(Arc::new),
        ..Default::default()
    };
    m.forward(ids, b, s, &opts, None).unwrap_or_else(|e| panic!("forward: [{}] {e}", e.code()))
}

/// Forward the case's standard batch (`input_ids`, `attention_mask`, and `decoder_input_ids`
/// when the case has them: encoder-decoder models).
pub fn forward_batch(m: &PeftModel, exp: &Expected) -> Tensor {
    let (ids, b, s) = exp.ids("input_ids");
    let mask = exp.mask("attention_mask");
    if exp.t.contains_key("decoder_input_ids") {
        let opts = ForwardOptions { attention_mask: Some(mask), decoder_input_ids: Some(exp.ids("decoder_input_ids").0), ..Default::default() };
        return m.forward(&ids, b, s, &opts, None).unwrap_or_else(|e| panic!("forward: [{}] {e}", e.code()));
    }
    forward(m, &ids, b, s, &mask, None)
}

/// Check the standard batch's logits against `key`.
pub fn check_logits(what: &str, m: &PeftModel, exp: &Expected, key: &str) -> f64 {
    let got = forward_batch(m, exp);
    let (atol, rtol) = logits_tol(&exp.case);
    assert_close(&format!("{} {what} ({key})", exp.case), &got, exp.get(key), atol, rtol)
}

/// A unique, empty temporary folder (removed by the caller with [`remove_dir`]).
pub fn temp_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let d = std::env::temp_dir().join(format!(
        "peft-core-fixtures-{tag}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
    d
}

pub fn remove_dir(d: &Path) {
    let _ = std::fs::remove_dir_all(d);
}

/// Copy the plain files of `src` (not sub-folders) into `dst`.
pub fn copy_files(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
            let mut perm = std::fs::metadata(dst.join(e.file_name())).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            std::fs::set_permissions(dst.join(e.file_name()), perm).unwrap();
        }
    }
}

/// The largest |x| of a tensor, as f64.
pub fn max_abs(t: &Tensor) -> f64 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// The base model's linear weights by module name (to check that unmerging restores them).
pub fn base_weights(m: &PeftModel) -> Vec<(String, Tensor)> {
    m.base.named_linears().into_iter().map(|(n, l)| (n, l.weight.clone())).collect()
}

/// The case's training batch: `input_ids`, `attention_mask` and `labels` of expected.safetensors.
pub fn expected_batch(exp: &Expected) -> peft_core::train::Batch {
    let (ids, b, s) = exp.ids("input_ids");
    peft_core::train::Batch { input_ids: ids, attention_mask: exp.mask("attention_mask"), labels: exp.i64s("labels"), batch_size: b, seq_len: s, task_ids: None, ..Default::default() }
}

/// Merges the active adapter (`merge_adapter`, safe merge), checks the merged logits
/// (`logits_merged`) and `after_merge`, unmerges, checks `logits_unmerged`, and that every base
/// weight is back within 1e-6 (f32 rounding of + ΔW − ΔW).
pub fn check_merge_unmerge(m: &mut PeftModel, exp: &Expected, after_merge: impl Fn(&PeftModel)) {
    check_merge_unmerge_within(m, exp, 1e-6, after_merge)
}

/// [`check_merge_unmerge`] with the base weights back within `tol` (multiplicative tuners such as
/// OFT unmerge through an inverse, whose f32 rounding grows with the block size).
pub fn check_merge_unmerge_within(m: &mut PeftModel, exp: &Expected, tol: f64, after_merge: impl Fn(&PeftModel)) {
    let before = base_weights(m);
    m.merge_adapter(None, true).unwrap();
    check_logits("merged", m, exp, "logits_merged");
    after_merge(m);
    m.unmerge_adapter().unwrap();
    check_logits("unmerged", m, exp, "logits_unmerged");
    for ((n, a), (_, b)) in before.iter().zip(base_weights(m)) {
        let d = max_abs(&(a - &b).unwrap());
        assert!(d <= tol, "{} {n}: unmerged weight differs from the base by {d:e}", exp.case);
    }
}

/// The adapter's logits (`logits_adapter`), then with the adapter disabled HF's
/// `logits_disabled` and the base's `logits_base`; the adapter is enabled again after.
pub fn check_adapter_then_disabled(m: &mut PeftModel, exp: &Expected) {
    check_logits("adapter", m, exp, "logits_adapter");
    m.set_disabled(true).unwrap();
    check_logits("disabled", m, exp, "logits_disabled");
    check_logits("disabled = base", m, exp, "logits_base");
    m.set_disabled(false).unwrap();
}

/// A fresh load of `case`'s HF adapter, merged into the base and unloaded (safe merge), gives
/// HF's `logits_merged`.
pub fn check_merge_and_unload(case: &str, exp: &Expected) {
    let mut m = adapter_peft(case, false);
    m.merge_and_unload(None, true).unwrap();
    check_logits("merge_and_unload", &m, exp, "logits_merged");
}

/// HF's `options_to_dict` of `case` (its config as HF wrote it) parses with no unknown fields
/// and is written back as HF's dict, `peft_version` "0.21.0" added.
pub fn check_hf_options_roundtrip(case: &str) {
    let hf = case_json(case)["options_to_dict"].clone();
    let c = peft_core::tuners::config::AdapterConfig::from_json(&hf, None).unwrap();
    assert!(c.unknown_fields().is_empty(), "{:?}", c.unknown_fields());
    let mut want = hf.clone();
    want["peft_version"] = serde_json::json!("0.21.0");
    assert_eq!(c.to_json(), want);
}

/// `base` with the fields of `extra` set over it.
pub fn json_with(mut base: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    for (k, v) in extra.as_object().expect("extra fields: a JSON object") {
        base[k] = v.clone();
    }
    base
}

/// Each config is refused by `AdapterConfig::from_json` with `ERR_ADAPTER_CONFIG_INVALID` and a
/// message containing its text.
pub fn check_config_refusals(cases: &[(serde_json::Value, &str)]) {
    for (bad, what) in cases {
        let e = peft_core::tuners::config::AdapterConfig::from_json(bad, None).unwrap_err();
        assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID", "{bad}");
        assert!(e.to_string().contains(what), "{bad}: {e}");
    }
}

/// A forward of `case`'s batch through `m` as a mixed batch (row 0 on adapter `default`, row 1
/// on the base) is refused with `ERR_INVALID_ARGUMENT`, naming `adapterNames` and every text
/// of `names` (the tuner's).
pub fn check_mixed_batch_refused(case: &str, m: &PeftModel, names: &[&str]) {
    let exp = Expected::load(case);
    let (ids, b, s) = exp.ids("input_ids");
    let opts = ForwardOptions { attention_mask: Some(exp.mask("attention_mask")), adapter_rows: Some(Arc::new(vec![Some("default".to_string()), None])), ..Default::default() };
    let e = m.forward(&ids, b, s, &opts, None).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains("adapterNames") && names.iter().all(|n| e.to_string().contains(n)), "{e}");
}

/// Loads the HF adapter of `case`, saves it again, and asserts that `adapter_model.safetensors`
/// and `adapter_config.json` are byte-identical to HF's files.
pub fn resave_case(case: &str) {
    let m = adapter_peft(case, false);
    let out = temp_dir("resave");
    m.save_pretrained(&out, None).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        let fx = std::fs::read(case_dir(case).join(f)).unwrap();
        let ours = std::fs::read(out.join(f)).unwrap();
        assert!(fx == ours, "{case}: re-saved {f} differs from HF's ({} vs {} bytes):\n{}", ours.len(), fx.len(), String::from_utf8_lossy(&ours[..ours.len().min(1500)]));
        visible(&format!("ok {case}: re-saved {f} byte-identical ({} bytes)", ours.len()));
    }
    remove_dir(&out);
}

/// An adapter config: `base` (HF's adapter_config.json fields of the test's tuner) with the
/// fields of `extra` set over it. Panics, naming the error code, when it does not parse.
pub fn config_with(base: serde_json::Value, extra: serde_json::Value) -> peft_core::tuners::config::AdapterConfig {
    peft_core::tuners::config::AdapterConfig::from_json(&json_with(base, extra), None).unwrap_or_else(|e| panic!("[{}] {e}", e.code()))
}

/// Greedy generation of 6 tokens from the case's first five `input_ids`, with and without the
/// KV cache, equals HF's `greedy` ids.
pub fn check_greedy(what: &str, m: &PeftModel, exp: &Expected) {
    use peft_core::generate::{generate, GenerateOptions};
    let (ids, _, s) = exp.ids("input_ids");
    let prompt: Vec<u32> = ids[..5.min(s)].to_vec();
    for use_cache in [true, false] {
        let opts = GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![], pad_token_id: 0, use_cache, ..Default::default() };
        let got = generate(m, &prompt, 1, 5, None, None, &opts, &|| false).unwrap();
        assert_eq!(got, exp.rows_u32("greedy"), "{what} greedy ids (use_cache={use_cache})");
    }
}

/// The loss and every trainable gradient of `m` on the case's batch (`input_ids`,
/// `attention_mask`, `labels` of `expected.safetensors`, through `train::loss_and_grads`)
/// against HF's: the loss within 1e-5 of `loss`; the trainable parameters exactly HF's
/// `grad.<key>` keys; each gradient of HF's shape, HF's not all zero, and within
/// `1e-4 · max |HF's|` absolute plus 1e-4 relative. HF's empty gradients (AdaLoRA's rank-0
/// layers) are only shape-checked. Returns the number of gradients compared and the largest
/// `max |diff| / max |HF's|`.
pub fn check_hf_loss_and_grads(case: &str, m: &PeftModel) -> (usize, f64) {
    let exp = Expected::load(case);
    let (loss, _, grads) = peft_core::train::loss_and_grads(m, &expected_batch(&exp), None, None).unwrap_or_else(|e| panic!("loss_and_grads: [{}] {e}", e.code()));
    let want = exp.get("loss").flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    visible(&format!("diff {case} loss: got {loss:.8} expected {want:.8}"));
    assert!((loss - want).abs() <= 1e-5, "{case}: loss {loss} vs {want}");
    let params = m.trainable_parameters();
    let keys: std::collections::BTreeSet<String> = params.iter().map(|(k, _)| k.clone()).collect();
    let want_keys: std::collections::BTreeSet<String> = exp.t.keys().filter_map(|k| k.strip_prefix("grad.")).map(String::from).collect();
    assert_eq!(keys, want_keys, "{case}: trainable parameters vs HF's grad.* keys");
    let (mut checked, mut worst) = (0, 0f64);
    for (k, v) in &params {
        let e = exp.get(&format!("grad.{k}"));
        assert_eq!(v.dims(), e.dims(), "{case}: shape of {k}");
        if e.elem_count() == 0 {
            continue;
        }
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{case}: no gradient for {k}"));
        let scale = max_abs(e);
        assert!(scale > 0.0, "{case}: HF's gradient of {k} is zero");
        let d = assert_close(&format!("{case} grad.{k}"), g, e, 1e-4 * scale, 1e-4);
        worst = worst.max(d / scale);
        checked += 1;
    }
    (checked, worst)
}

/// HF's parameter counts of `m`: `trainable_params` and `all_params` of the case's `case.json`.
pub fn check_hf_counts(case: &str, m: &PeftModel) {
    let cj = case_json(case);
    let (trainable, total) = m.nb_trainable_parameters();
    assert_eq!((trainable as u64, total as u64), (cj["trainable_params"].as_u64().unwrap(), cj["all_params"].as_u64().unwrap()), "{case}: HF's parameter counts");
}

/// HF's parameter counts of `m` (`trainable_params` / `all_params` of the case's `case.json`),
/// its layer status (`layers` layers, each of HF's `module_type`) and HF's tuner model class
/// (`get_model_status().adapter_model_type`).
pub fn check_counts_and_status(case: &str, m: &PeftModel, layers: usize, module_type: &str, model_class: &str) {
    let cj = case_json(case);
    let (trainable, total) = m.nb_trainable_parameters();
    assert_eq!(trainable as u64, cj["trainable_params"].as_u64().unwrap(), "{case}: trainable parameters");
    assert_eq!(total as u64, cj["all_params"].as_u64().unwrap(), "{case}: all parameters");
    let status = m.layer_status().unwrap();
    assert_eq!(status.len(), layers, "{case}: {status:?}");
    assert!(status.iter().all(|s| s["module_type"] == module_type), "{case}: {status:?}");
    assert_eq!(m.model_status().unwrap()["adapter_model_type"], model_class, "{case}: model class");
}

/// HF's `bias` handling on the tiny BERT (feature extraction, `nn.Linear` layers with biases):
/// for each `bias` value, the adapter `config(bias)` gives HF's trainable count and saves HF's
/// keys (the biases it trains included), `bert_bias.<bias>` of the case's `case.json`.
pub fn check_bert_bias(case: &str, biases: &[&str], config: impl Fn(&str) -> serde_json::Value) {
    use peft_core::model::loader::{load_model, LoadRequest};
    let cj = case_json(case);
    for bias in biases {
        let want = &cj["bert_bias"][*bias];
        let req = LoadRequest { task: Some(peft_core::model::Task::FeatureExtraction), seed: 42, ..Default::default() };
        let l = load_model(&fixtures_dir().join("models").join("bert"), DType::F32, &Device::Cpu, &req).unwrap();
        let mut m = PeftModel::new(l.model);
        let cfg = peft_core::tuners::config::AdapterConfig::from_json(&config(bias), None).unwrap();
        m.add_adapter("default", cfg, 1).unwrap();
        assert_eq!(m.nb_trainable_parameters().0 as u64, want["trainable_params"].as_u64().unwrap(), "{case} {bias}: trainable count");
        let out = temp_dir("bert-bias");
        m.save_pretrained(&out, None).unwrap();
        let saved: std::collections::BTreeSet<String> = peft_core::io::read_safetensors(&out.join("adapter_model.safetensors"), &Device::Cpu).unwrap().into_iter().map(|(k, _)| k).collect();
        let want_keys: std::collections::BTreeSet<String> = want["adapter_keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()).collect();
        assert_eq!(saved, want_keys, "{case} {bias}: saved keys");
        remove_dir(&out);
    }
}

/// One SGD step (lr 0.5) on the case's batch from the current adapter of `m`: every trainable
/// parameter's key ends with `suffix` and has a non-zero gradient, the step moves the logits off
/// `logits_base` by more than 1e-4, and no base weight changes.
pub fn check_one_step_trains_only(m: &PeftModel, exp: &Expected, suffix: &str) {
    let before = base_weights(m);
    let (_, _, grads) = peft_core::train::loss_and_grads(m, &expected_batch(exp), None, None).unwrap();
    let params = m.trainable_parameters();
    assert!(params.iter().all(|(k, _)| k.ends_with(suffix)), "{:?}", params.iter().map(|(k, _)| k).collect::<Vec<_>>());
    for (k, v) in &params {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {k}"));
        assert!(max_abs(g) > 0.0, "{k}: zero gradient at the identity");
        v.set(&(v.as_tensor() - (g * 0.5).unwrap()).unwrap()).unwrap();
    }
    let moved = forward_batch(m, exp);
    assert!(max_abs(&(moved - exp.get("logits_base")).unwrap()) > 1e-4, "the step changes the logits");
    for ((n, a), (_, b)) in before.iter().zip(base_weights(m)) {
        assert_eq!(max_abs(&(a - &b).unwrap()), 0.0, "{n}: base weight changed");
    }
}
