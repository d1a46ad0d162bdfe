//! Prompt learning against Hugging Face PEFT 0.21 reference outputs (the tiny Llama with
//! grouped-query attention in `__test__/fixtures/`): prefix tuning with and without projection,
//! prompt tuning (RANDOM and TEXT init) and P-tuning (MLP). Per case: adapter logits, logits with
//! the adapter disabled, greedy generation with and without the KV cache, the save round trip
//! (byte-identical files) and, for prefix tuning, the per-layer key/value prefixes. Plus training
//! of every method on the tiny model, padded batches, GQA shapes, multitask prompt tuning and the
//! rules (no mixing with LoRA, no merging).
//!
//! Run: `cargo test --release -p peft-core --test fixtures_prompt`.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use peft_core::generate::{generate, GenerateOptions};
use peft_core::model::ForwardOptions;
use peft_core::peft_model::PeftModel;
use peft_core::train::{loss_and_grads, Batch, Trainer, TrainingArgs};
use peft_core::tuners::{AdapterConfig, LoraConfig, PromptLearningConfig};
use serde_json::json;

fn gen(m: &PeftModel, exp: &Expected, use_cache: bool) -> Vec<Vec<u32>> {
    let (ids, b, s) = exp.ids("generate_input_ids");
    let opts = GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![], pad_token_id: 0, use_cache, ..Default::default() };
    generate(m, &ids, b, s, None, None, &opts, &|| false).unwrap_or_else(|e| panic!("generate: [{}] {e}", e.code()))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn case_adapter_logits(case: &str) {
    let m = adapter_peft(case, false);
    let exp = Expected::load(case);
    let d = check_logits("adapter", &m, &exp, "logits_adapter");
    visible(&format!("ok {case}: logits_adapter {:?} max abs diff {d:.2e}", exp.get("logits_adapter").dims()));
}

fn case_disabled_logits(case: &str) {
    let mut m = adapter_peft(case, false);
    let exp = Expected::load(case);
    m.set_disabled(true).unwrap();
    check_logits("disabled", &m, &exp, "logits_base");
    m.set_disabled(false).unwrap();
    check_logits("re-enabled", &m, &exp, "logits_adapter");
}

fn case_generate(case: &str) {
    let mut m = adapter_peft(case, false);
    let exp = Expected::load(case);
    let want = exp.rows_u32("generate_adapter");
    for use_cache in [true, false] {
        assert_eq!(gen(&m, &exp, use_cache), want, "{case}: generate(use_cache={use_cache}) != generate_adapter");
    }
    m.set_disabled(true).unwrap();
    assert_eq!(gen(&m, &exp, true), exp.rows_u32("generate_base"), "{case}: disabled generate != generate_base");
    visible(&format!("ok {case}: greedy generate ids identical (cache on and off), disabled == base"));
}

/// Saving the loaded adapter writes files byte-identical to HF's; loading them again (also as
/// trainable) gives the same logits.
fn case_round_trip(case: &str) {
    let m = adapter_peft(case, false);
    let out = temp_dir(&format!("prompt-rt-{case}"));
    m.save_pretrained(&out, None).unwrap_or_else(|e| panic!("save_pretrained: [{}] {e}", e.code()));
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        let ours = std::fs::read(out.join(f)).unwrap();
        let theirs = std::fs::read(case_dir(case).join(f)).unwrap();
        assert!(ours == theirs, "{case}: written {f} is not byte-identical to HF's ({} vs {} bytes)\n{}", ours.len(), theirs.len(), String::from_utf8_lossy(&ours[..ours.len().min(800)]));
    }
    let exp = Expected::load(case);
    for trainable in [false, true] {
        let mut back = base_peft(case);
        let r = back.load_adapter(&out, "default", trainable, None).unwrap();
        assert!(r.missing_keys.is_empty() && r.unexpected_keys.is_empty(), "{r:?}");
        check_logits(&format!("reloaded (is_trainable {trainable})"), &back, &exp, "logits_adapter");
    }
    remove_dir(&out);
    visible(&format!("ok {case}: save_pretrained files byte-identical to HF's; reload reproduces logits"));
}

macro_rules! prompt_case {
    ($modname:ident, $case:expr) => {
        mod $modname {
            #[test]
            fn adapter_logits() {
                super::case_adapter_logits($case);
            }
            #[test]
            fn disabled_logits() {
                super::case_disabled_logits($case);
            }
            #[test]
            fn generate_with_and_without_cache() {
                super::case_generate($case);
            }
            #[test]
            fn save_round_trip() {
                super::case_round_trip($case);
            }
        }
    };
}

prompt_case!(llama_prefix, "llama_prefix");
prompt_case!(llama_prefix_proj, "llama_prefix_proj");
prompt_case!(llama_prompt_random, "llama_prompt_random");
prompt_case!(llama_prompt_text, "llama_prompt_text");
prompt_case!(llama_ptuning, "llama_ptuning");

/// The per-layer key/value prefixes equal HF's (`prefix_kv.<layer>.key/value`, batch 1), with
/// the model's 2 key/value heads (GQA: 4 query heads) of size 16.
#[test]
fn prefix_key_values_match_hf_and_use_kv_heads() {
    for case in ["llama_prefix", "llama_prefix_proj"] {
        let m = adapter_peft(case, false);
        let exp = Expected::load(case);
        let cfg = m.peft_config("default").unwrap().as_prompt().unwrap().clone();
        assert_eq!((cfg.token_dim, cfg.num_attention_heads), (Some(32), Some(2)), "GQA-aware config");
        let enc = m.prompt_encoder("default").unwrap();
        let kv = m.prefix_key_values(&cfg, enc, 1, false, None).unwrap();
        assert_eq!(kv.len(), 2);
        for (l, (k, v)) in kv.iter().enumerate() {
            assert_eq!(k.dims(), &[1, 2, 5, 16], "layer {l} key shape [b, kv_heads, n_virtual, head_dim]");
            assert_close(&format!("{case} prefix_kv.{l}.key"), k, exp.get(&format!("prefix_kv.{l}.key")), 0.0, 0.0);
            assert_close(&format!("{case} prefix_kv.{l}.value"), v, exp.get(&format!("prefix_kv.{l}.value")), 0.0, 0.0);
        }
        let kv3 = m.prefix_key_values(&cfg, enc, 3, false, None).unwrap();
        assert_eq!(kv3[1].1.dims(), &[3, 2, 5, 16]);
    }
    visible("ok prefix_kv: identical to HF's for both prefix cases; shapes [b, 2 kv heads, 5, 16]");
}

/// TEXT init takes the embedding rows of the init text's tokens (HF `PromptEmbedding`): a fresh
/// adapter built from the fixture's config equals the table HF saved.
#[test]
fn prompt_text_init_equals_hf() {
    let case = "llama_prompt_text";
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(case_dir(case).join("adapter_config.json")).unwrap()).unwrap();
    v["tokenizer_name_or_path"] = json!(fixtures_dir().join("models/llama").to_string_lossy());
    v["inference_mode"] = json!(false);
    let cfg = PromptLearningConfig::from_json(&v, None).unwrap();
    let mut m = base_peft(case);
    m.add_adapter("default", cfg, 7).unwrap();
    let ours = m.adapter_state_dict("default").unwrap();
    let theirs = peft_core::io::read_safetensors(&case_dir(case).join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(ours[0].0, "prompt_embeddings");
    assert_close("TEXT init prompt_embeddings", &ours[0].1, &theirs[0].1, 0.0, 0.0);
    let emb = m.base.word_embeddings().narrow(0, 4, 6).unwrap();
    assert_close("TEXT init = embed_tokens rows 4..9", &ours[0].1, &emb, 0.0, 0.0);
}

/// A padded row gives the same logits (over its real positions) as the row run alone.
#[test]
fn padded_batch_rows_equal_rows_alone() {
    for case in ["llama_prefix", "llama_prompt_random", "llama_ptuning"] {
        let m = adapter_peft(case, false);
        let exp = Expected::load(case);
        let (ids, b, s) = exp.ids("input_ids");
        let mask = exp.mask("attention_mask");
        let batch = forward(&m, &ids, b, s, &mask, None);
        let n = batch.dim(1).unwrap() - s; // virtual positions in the logits (0 for prefix tuning)
        for r in 0..b {
            let len = mask[r * s..(r + 1) * s].iter().filter(|&&x| x != 0).count();
            let alone = forward(&m, &ids[r * s..r * s + len], 1, len, &vec![1; len], None);
            let part = batch.narrow(0, r, 1).unwrap().narrow(1, 0, n + len).unwrap();
            let d = max_diff(&part, &alone);
            assert!(d < 1e-5, "{case} row {r}: padded batch vs alone max diff {d}");
        }
    }
}

fn cfg(v: serde_json::Value) -> PromptLearningConfig {
    PromptLearningConfig::from_json(&v, None).unwrap_or_else(|e| panic!("config: [{}] {e}", e.code()))
}

fn train_batch() -> Batch {
    // Two rows, the second right-padded; labels = ids with -100 on padding.
    let ids: Vec<u32> = vec![5, 17, 33, 9, 120, 44, 7, 81, 12, 200, 64, 3, 0, 0];
    let mask: Vec<u8> = vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0];
    let labels = ids.iter().zip(&mask).map(|(&i, &m)| if m == 0 { -100 } else { i as i64 }).collect();
    Batch { input_ids: ids, attention_mask: mask, labels, batch_size: 2, seq_len: 7, task_ids: None, ..Default::default() }
}

/// 30 AdamW steps of every method on the tiny model make the loss fall; every trainable
/// parameter gets a gradient; save + reload gives the trained model's logits.
#[test]
fn every_method_trains_and_reloads() {
    let text_tok = fixtures_dir().join("models/llama").to_string_lossy().into_owned();
    let methods = vec![
        ("prefix", json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4})),
        ("prefix_proj", json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "prefix_projection": true, "encoder_hidden_size": 24})),
        ("prompt_random", json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4})),
        ("prompt_text", json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "classify the sentiment", "tokenizer_name_or_path": text_tok})),
        ("prompt_vocab", json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "prompt_tuning_init": "SAMPLE_VOCAB"})),
        ("ptuning_mlp", json!({"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "encoder_hidden_size": 32})),
        ("ptuning_lstm", json!({"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "encoder_hidden_size": 16, "encoder_reparameterization_type": "LSTM", "encoder_dropout": 0.1})),
        ("multitask", json!({"peft_type": "MULTITASK_PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "num_tasks": 2, "num_ranks": 2})),
    ];
    for (tag, v) in methods {
        let mut m = base_peft("llama_prefix");
        m.add_adapter("default", cfg(v), 3).unwrap();
        let mut batch = train_batch();
        if tag == "multitask" {
            batch.task_ids = Some(vec![0, 1]);
        }
        // Gradients reach every trainable parameter.
        let (_, _, grads) = loss_and_grads(&m, &batch, None, None).unwrap();
        for (name, var) in m.trainable_parameters() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{tag}: no gradient for {name}"));
            let s = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(s > 0.0, "{tag}: zero gradient for {name}");
        }
        let args = TrainingArgs { learning_rate: 1e-1, max_steps: 30, max_grad_norm: 1.0, seed: 1, ..Default::default() };
        let mut tr = Trainer::new(&m, args).unwrap();
        let mut losses = vec![];
        for _ in 0..30 {
            losses.push(tr.step(&m, std::slice::from_ref(&batch)).unwrap().loss);
        }
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(last < first * 0.96, "{tag}: loss did not fall enough: {first:.4} -> {last:.4}");
        // Save, reload (inference mode), same logits.
        let out = temp_dir(&format!("prompt-train-{tag}"));
        m.save_pretrained(&out, None).unwrap();
        let mut back = base_peft("llama_prefix");
        back.load_adapter(&out, "default", false, None).unwrap();
        let opts = ForwardOptions { attention_mask: Some(batch.attention_mask.clone()), task_ids: batch.task_ids.clone(), ..Default::default() };
        let a = m.forward(&batch.input_ids, 2, 7, &opts, None).unwrap();
        let b = back.forward(&batch.input_ids, 2, 7, &opts, None).unwrap();
        let d = max_diff(&a, &b);
        assert!(d <= 1e-6, "{tag}: reloaded logits differ by {d}");
        remove_dir(&out);
        visible(&format!("ok {tag}: loss {first:.4} -> {last:.4} in 30 steps; reload max diff {d:.1e}"));
    }
}

/// Prefix tuning on a GQA model builds `[b, num_key_value_heads, n, head_dim]` prefixes and a
/// config whose token_dim / num_attention_heads describe the key/value width (HF's rule).
#[test]
fn prefix_tuning_on_gqa_builds_kv_head_shapes() {
    let mut m = base_peft("llama_prefix");
    assert!(m.base.info().num_key_value_heads.unwrap() < m.base.info().num_attention_heads);
    m.add_adapter("default", cfg(json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3})), 1).unwrap();
    let c = m.peft_config("default").unwrap().as_prompt().unwrap().clone();
    assert_eq!((c.token_dim, c.num_attention_heads, c.num_layers, c.encoder_hidden_size), (Some(32), Some(2), Some(2), Some(32)));
    let enc = m.prompt_encoder("default").unwrap();
    assert_eq!(enc.embedding.dims(), &[3, 128]);
    let kv = m.prefix_key_values(&c, enc, 2, false, None).unwrap();
    assert!(kv.iter().all(|(k, v)| k.dims() == [2, 2, 3, 16] && v.dims() == [2, 2, 3, 16]));
    // HF counts: 3 × 128 trainable.
    let (trainable, all) = m.nb_trainable_parameters();
    assert_eq!(trainable, 384);
    assert_eq!(all, m.base.base_param_count() + 384);
}

/// HF's parameter counts for prompt encoders (all their parameters are trainable).
#[test]
fn trainable_parameter_counts_follow_hf() {
    let mut m = base_peft("llama_prefix");
    m.add_adapter("default", cfg(json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 5, "prefix_projection": true, "encoder_hidden_size": 32})), 1).unwrap();
    // embedding 5×32 + Linear(32, 32) + Linear(32, 2·2·32).
    assert_eq!(m.nb_trainable_parameters().0, 5 * 32 + 32 * 32 + 32 + 32 * 128 + 128);
    let mut p = base_peft("llama_prefix");
    p.add_adapter("default", cfg(json!({"peft_type": "P_TUNING", "num_virtual_tokens": 4, "encoder_hidden_size": 32})), 1).unwrap();
    // embedding 4×64 + Linear(64,32) + Linear(32,32) + Linear(32,64).
    assert_eq!(p.nb_trainable_parameters().0, 4 * 64 + (64 * 32 + 32) + (32 * 32 + 32) + (32 * 64 + 64));
    // Loaded for inference: nothing trainable, the table is counted in all params.
    let l = adapter_peft("llama_ptuning", false);
    assert_eq!(l.nb_trainable_parameters(), (0, l.base.base_param_count() + 4 * 64));
}

#[test]
fn mixing_prompt_learning_and_lora_is_refused() {
    let mut m = adapter_peft("llama_prefix", false);
    let lora = LoraConfig::from_json(&json!({"peft_type": "LORA", "target_modules": ["q_proj"]}), None).unwrap();
    let e = m.add_adapter("lora", lora, 0).unwrap_err();
    assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
    assert!(e.to_string().contains("Cannot combine adapters with different peft types. Found PREFIX_TUNING and LORA."), "{e}");
    assert_eq!(m.adapter_names(), vec!["default"]);
    let mut l = adapter_peft("llama_lora_qv", false);
    let e = l.load_adapter(&case_dir("llama_prompt_random"), "p", false, None).unwrap_err();
    assert!(e.to_string().contains("Cannot combine adapters"), "{e}");
    // Different prompt-learning methods do not mix either (HF compares peft_type).
    let e = m.load_adapter(&case_dir("llama_prompt_random"), "p", false, None).unwrap_err();
    assert!(e.to_string().contains("Found PREFIX_TUNING and PROMPT_TUNING"), "{e}");
}

#[test]
fn prompt_learning_rules() {
    let mut m = adapter_peft("llama_prompt_random", false);
    let e = m.merge_adapter(None, false).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_STATE");
    assert!(m.merge_and_unload(None, false).is_err());
    m.load_adapter(&case_dir("llama_prompt_text"), "text", false, None).unwrap();
    let e = m.set_adapter(&["default".into(), "text".into()]).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    // Switching adapters switches the prompt.
    let exp = Expected::load("llama_prompt_text");
    m.set_adapter(&["text".into()]).unwrap();
    check_logits("after set_adapter(text)", &m, &exp, "logits_adapter");
    // Mixed batches are refused with prompt learning.
    let (ids, b, s) = exp.ids("input_ids");
    let opts = ForwardOptions { adapter_rows: Some(std::sync::Arc::new(vec![None; b])), ..Default::default() };
    let e = m.forward(&ids, b, s, &opts, None).unwrap_err();
    assert!(e.to_string().contains("adapterNames"), "{e}");
    // A seq2seq task type needs an encoder-decoder model.
    let mut f = base_peft("llama_prefix");
    let e = f.add_adapter("x", cfg(json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2, "task_type": "SEQ_2_SEQ_LM"})), 0).unwrap_err();
    assert!(e.to_string().contains("encoder-decoder"), "{e}");
    assert!(f.adapter_names().is_empty(), "model unchanged after a failed add");
    // Deleting the active one activates the other.
    m.delete_adapter("text").unwrap();
    assert_eq!(m.active_adapters(), &["default".to_string()]);
    let exp0 = Expected::load("llama_prompt_random");
    check_logits("after delete", &m, &exp0, "logits_adapter");
}

/// Multitask prompt tuning: rows with different task ids get different prompts; the file holds
/// `prompt_embeddings`, `prefix_task_cols`, `prefix_task_rows`; EXACT_SOURCE_TASK and
/// AVERAGE_SOURCE_TASKS initialise a one-task adapter from it.
#[test]
fn multitask_prompt_tuning_tasks_save_and_source_init() {
    let mut m = base_peft("llama_prefix");
    m.add_adapter("default", cfg(json!({"peft_type": "MULTITASK_PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "num_tasks": 3, "num_ranks": 2})), 5).unwrap();
    let ids = vec![10u32, 11, 12, 10, 11, 12];
    let fwd = |m: &PeftModel, tasks: Vec<u32>| {
        let opts = ForwardOptions { task_ids: Some(tasks), ..Default::default() };
        m.forward(&ids, 2, 3, &opts, None).unwrap()
    };
    let same = fwd(&m, vec![1, 1]);
    assert_eq!(max_diff(&same.narrow(0, 0, 1).unwrap(), &same.narrow(0, 1, 1).unwrap()), 0.0);
    let diff = fwd(&m, vec![0, 2]);
    assert!(max_diff(&diff.narrow(0, 0, 1).unwrap(), &diff.narrow(0, 1, 1).unwrap()) > 1e-6);
    let e = m.forward(&ids, 2, 3, &ForwardOptions::default(), None).unwrap_err();
    assert!(e.to_string().contains("taskIds"), "{e}");
    let e = m.forward(&ids, 2, 3, &ForwardOptions { task_ids: Some(vec![0, 3]), ..Default::default() }, None).unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");

    let out = temp_dir("mpt");
    m.save_pretrained(&out, None).unwrap();
    let saved: std::collections::HashMap<String, Tensor> =
        peft_core::io::read_safetensors(&out.join("adapter_model.safetensors"), &Device::Cpu).unwrap().into_iter().collect();
    let mut keys: Vec<&String> = saved.keys().collect();
    keys.sort();
    assert_eq!(keys, vec!["prefix_task_cols", "prefix_task_rows", "prompt_embeddings"]);
    assert_eq!(saved["prefix_task_cols"].dims(), &[3, 3, 2]);
    assert_eq!(saved["prefix_task_rows"].dims(), &[3, 2, 64]);
    let mut back = base_peft("llama_prefix");
    back.load_adapter(&out, "default", false, None).unwrap();
    assert_eq!(max_diff(&fwd(&back, vec![0, 2]), &diff), 0.0);

    let src = out.join("adapter_model.safetensors").to_string_lossy().into_owned();
    for (mode, task) in [("EXACT_SOURCE_TASK", 2usize), ("AVERAGE_SOURCE_TASKS", 0)] {
        let mut t = base_peft("llama_prefix");
        t.add_adapter(
            "default",
            cfg(json!({"peft_type": "MULTITASK_PROMPT_TUNING", "num_virtual_tokens": 3, "num_ranks": 2, "prompt_tuning_init": mode, "prompt_tuning_init_state_dict_path": src, "prompt_tuning_init_task": task})),
            9,
        )
        .unwrap();
        let enc = t.prompt_encoder("default").unwrap();
        let (cols, _) = enc.task.as_ref().unwrap();
        let want = if mode == "EXACT_SOURCE_TASK" { saved["prefix_task_cols"].narrow(0, 2, 1).unwrap() } else { saved["prefix_task_cols"].mean_keepdim(0).unwrap() };
        assert!(max_diff(cols.as_tensor(), &want) < 1e-7, "{mode}");
        assert_eq!(max_diff(enc.embedding.as_tensor(), &saved["prompt_embeddings"]), 0.0, "{mode}: shared embedding loaded");
    }
    // num_tasks 3 cannot take a one-task init (HF's strict load).
    let mut t = base_peft("llama_prefix");
    let e = t
        .add_adapter("default", cfg(json!({"peft_type": "MULTITASK_PROMPT_TUNING", "num_virtual_tokens": 3, "num_ranks": 2, "num_tasks": 3, "prompt_tuning_init": "AVERAGE_SOURCE_TASKS", "prompt_tuning_init_state_dict_path": src})), 9)
        .unwrap_err();
    assert_eq!(e.code(), "ERR_SHAPE_MISMATCH");
    assert!(t.adapter_names().is_empty());
    remove_dir(&out);
}

/// An HF-saved prompt adapter file missing `prompt_embeddings`, or with the wrong shape, is a
/// clear error naming the file and key.
#[test]
fn prompt_adapter_file_errors() {
    let dir = temp_dir("prompt-bad");
    copy_files(&case_dir("llama_prefix"), &dir);
    let t = Tensor::zeros((5, 64), DType::F32, &Device::Cpu).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), peft_core::io::safetensors_bytes(&[("prompt_embeddings".into(), t)], None).unwrap()).unwrap();
    let mut m = base_peft("llama_prefix");
    let e = m.load_adapter(&dir, "default", false, None).unwrap_err();
    assert_eq!(e.code(), "ERR_SHAPE_MISMATCH");
    assert!(e.to_string().contains("prompt_embeddings") && e.to_string().contains("adapter_model.safetensors"), "{e}");
    let t = Tensor::zeros((5, 128), DType::F32, &Device::Cpu).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), peft_core::io::safetensors_bytes(&[("other".into(), t)], None).unwrap()).unwrap();
    let e = m.load_adapter(&dir, "default", false, None).unwrap_err();
    assert_eq!(e.code(), "ERR_SAFETENSORS_INVALID");
    assert!(e.to_string().contains("prompt_embeddings"), "{e}");
    assert!(m.adapter_names().is_empty());
    let _ = AdapterConfig::from_file(&case_dir("llama_ptuning").join("adapter_config.json")).unwrap();
    remove_dir(&dir);
}

/// HF `get_prompt_embedding_to_save`: for HF's folders, the table HF saved (HF computed it with
/// that function); the state dict's `prompt_embeddings` is the same tensor; a LoRA adapter has
/// none.
#[test]
fn prompt_embedding_to_save_is_the_saved_table() {
    for case in ["llama_prefix", "llama_prefix_proj", "llama_prompt_random", "llama_ptuning"] {
        let m = adapter_peft(case, false);
        let t = m.prompt_embedding_to_save("default").unwrap();
        let hf = peft_core::io::read_safetensors(&case_dir(case).join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        let want = &hf.iter().find(|(k, _)| k == "prompt_embeddings").unwrap().1;
        assert_eq!(t.dims(), want.dims(), "{case}");
        assert_eq!(max_diff(&t, want), 0.0, "{case}");
        let sd = m.adapter_state_dict("default").unwrap();
        assert_eq!(max_diff(&t, &sd.iter().find(|(k, _)| k == "prompt_embeddings").unwrap().1), 0.0, "{case}");
    }
    let mut l = base_peft("llama_lora_qv");
    l.add_adapter("default", AdapterConfig::from_json(&json!({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}), None).unwrap(), 1).unwrap();
    assert_eq!(l.prompt_embedding_to_save("default").unwrap_err().code(), "ERR_INVALID_ARGUMENT");
    assert_eq!(l.prompt_embedding_to_save("nope").unwrap_err().code(), "ERR_ADAPTER_NOT_FOUND");
}
