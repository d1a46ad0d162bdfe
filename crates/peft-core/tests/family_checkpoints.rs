//! Issue 18's HF-folder variants of the newer families (Llama 3.x, Qwen3, Gemma 3, SmolLM3,
//! Phi-3) as transformers 5.18 saves a user's checkpoint: bf16 weights in several shards with
//! `model.safetensors.index.json`, and f16 weights in one file
//! (`__test__/fixtures/models/dtypes/<family>_{bf16_sharded,f16}`, made by
//! `__test__/scripts/make_family_dtype_fixtures.py`). Each loads in f32 and gives transformers'
//! logits of the same folder loaded in float32.
//!
//! Run: `cargo test -p peft-core --profile test-release --test family_checkpoints`.

mod common;

use candle_core::{DType, Device};
use common::*;
use peft_core::model::loader::load_causal_lm;
use peft_core::model::ForwardOptions;

#[test]
fn sharded_bf16_and_f16_checkpoints_load_with_transformers_logits() {
    let root = fixtures_dir().join("models").join("dtypes");
    for fam in ["llama3", "qwen3", "gemma3", "smollm3", "phi3"] {
        for kind in ["bf16_sharded", "f16"] {
            let dir = root.join(format!("{fam}_{kind}"));
            if kind == "bf16_sharded" {
                assert!(dir.join("model.safetensors.index.json").exists() && !dir.join("model.safetensors").exists(), "{fam}: a sharded folder");
            }
            let exp: std::collections::HashMap<String, candle_core::Tensor> = peft_core::io::read_safetensors(&dir.join("expected.safetensors"), &Device::Cpu).unwrap().into_iter().collect();
            let loaded = load_causal_lm(&dir, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("{fam} {kind}: [{}] {e}", e.code()));
            let m = peft_core::peft_model::PeftModel::new(loaded.model);
            let ids_t = &exp["input_ids"];
            let (b, s) = ids_t.dims2().unwrap();
            let ids: Vec<u32> = ids_t.to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect();
            let got = m.forward(&ids, b, s, &ForwardOptions::default(), None).unwrap();
            assert_close(&format!("{fam} {kind} logits"), &got, &exp["logits"], 1e-4, 1e-4);
        }
    }
}
