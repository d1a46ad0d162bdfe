//! Task heads on decoder models against references made with transformers 5.18 + HF PEFT 0.21
//! (`scripts/make_task_fixtures.py`): `LlamaForSequenceClassification` and
//! `GPT2ForSequenceClassification` (last non-pad token pooling) with a SEQ_CLS LoRA adapter
//! (the `score` head in modules_to_save), a SEQ_CLS prompt-tuning adapter (its `score` copy
//! saved as `base_model.score.weight`), losses with labels, merged logits, byte-identical
//! re-saves; plus loading a causal-LM checkpoint with a new classification head, task-type
//! checks, and training the head with the adapter.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use peft_core::model::loader::{load_model, LoadRequest};
use peft_core::model::{last_non_pad_indices, Task};
use peft_core::peft_model::{PeftModel, SaveEmbeddingLayers, SaveOptions};
use peft_core::train::{task_loss, Batch, Trainer, TrainingArgs};
use peft_core::tuners::AdapterConfig;
use serde_json::json;

const CASES: [&str; 3] = ["llama_lora_seqcls", "llama_prompt_seqcls", "gpt2_lora_seqcls"];

fn batch_of(exp: &Expected) -> Batch {
    let (ids, b, s) = exp.ids("input_ids");
    Batch { input_ids: ids, attention_mask: exp.mask("attention_mask"), labels: exp.i64s("labels"), batch_size: b, seq_len: s, ..Default::default() }
}

fn scalar(t: &Tensor) -> f64 {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()[0]
}

#[test]
fn seqcls_models_load_with_their_heads() {
    for (case, arch, labels) in [("llama_lora_seqcls", "LlamaForSequenceClassification", 3), ("gpt2_lora_seqcls", "GPT2ForSequenceClassification", 2)] {
        let m = base_peft(case);
        let info = m.base.info();
        assert_eq!((info.architecture.as_str(), info.task, info.num_labels), (arch, Task::SeqCls, Some(labels)));
        let (last, lin) = m.base.named_linears().pop().unwrap();
        assert_eq!((last.as_str(), lin.out_features()), ("score", labels));
        assert!(m.base.module_names().contains(&"score".to_string()));
        assert!(!m.base.module_names().contains(&"lm_head".to_string()));
    }
}

#[test]
fn seqcls_fixtures_match_hf() {
    for case in CASES {
        let exp = Expected::load(case);
        let base = base_peft(case);
        let d = check_logits("base", &base, &exp, "logits_base");
        visible(&format!("ok {case}: base logits max |diff| {d:.2e}"));
        let m = adapter_peft(case, false);
        let d = check_logits("adapter", &m, &exp, "logits_adapter");
        visible(&format!("ok {case}: adapter logits max |diff| {d:.2e}"));
        // The loss transformers computes with labels [b].
        let batch = batch_of(&exp);
        let logits = forward_batch(&m, &exp);
        let (loss, n) = task_loss(&m, &logits, &batch).unwrap();
        let want = scalar(exp.get("loss"));
        assert!((scalar(&loss) - want).abs() < 1e-5, "{case}: loss {} vs HF {want}", scalar(&loss));
        assert_eq!(n, 2);
        // Each row alone (unpadded) equals its row of the padded batch. Not with prompt tuning:
        // HF passes `inputs_embeds`, so transformers pools the last position, which is padding
        // in a right-padded row (it warns); we match HF's numbers there (checked above) and
        // check that the unpadded row still equals HF's row alone.
        let alone = exp.get("logits_rows_alone");
        if case.contains("prompt") {
            assert_close(&format!("{case} unpadded row 0"), &logits.narrow(0, 0, 1).unwrap(), &alone.narrow(0, 0, 1).unwrap(), 1e-5, 1e-5);
            let (ids, _, s) = exp.ids("input_ids");
            let row1 = forward(&m, &ids[s..s + 5], 1, 5, &[1; 5], None);
            assert_close(&format!("{case} row 1 alone"), &row1, &alone.narrow(0, 1, 1).unwrap(), 1e-5, 1e-5);
        } else {
            assert_close(&format!("{case} padded batch vs rows alone"), &logits, alone, 1e-5, 1e-5);
        }
        if exp.has("logits_merged") {
            let mut m = adapter_peft(case, false);
            m.merge_and_unload(None, true).unwrap();
            let d = check_logits("merged", &m, &exp, "logits_merged");
            visible(&format!("ok {case}: merged logits max |diff| {d:.2e}"));
        }
    }
}

#[test]
fn seqcls_resave_is_byte_identical() {
    for case in CASES {
        let m = adapter_peft(case, false);
        let dir = temp_dir(case);
        m.save_pretrained(&dir, None).unwrap();
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            let a = std::fs::read(dir.join(f)).unwrap();
            let b = std::fs::read(case_dir(case).join(f)).unwrap();
            assert!(a == b, "{case}: re-saved {f} differs from HF's");
        }
        remove_dir(&dir);
        visible(&format!("ok {case}: re-saved files byte-identical"));
    }
}

#[test]
fn new_seqcls_adapter_gets_the_head_in_modules_to_save() {
    // LoRA: HF writes ["classifier", "score"]; the copy is trainable and saved as base_model.model.score.weight.
    let mut m = base_peft("llama_lora_seqcls");
    let cfg = AdapterConfig::from_json(&json!({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 2, "target_modules": ["q_proj"]}), None).unwrap();
    m.add_adapter("default", cfg, 1).unwrap();
    let saved = m.peft_config("default").unwrap().to_json();
    assert_eq!(saved["modules_to_save"], json!(["classifier", "score"]));
    let keys: Vec<String> = m.trainable_parameters().into_iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&"base_model.model.score.weight".to_string()), "{keys:?}");
    assert!(m.take_warnings().iter().all(|w| !w.contains("modules_to_save")), "auto-added names must not warn");
    // Prompt tuning: the copy is keyed base_model.score.weight, as HF saves it.
    let mut p = base_peft("llama_lora_seqcls");
    let cfg = AdapterConfig::from_json(&json!({"peft_type": "PROMPT_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": 3}), None).unwrap();
    p.add_adapter("default", cfg, 1).unwrap();
    let sd: Vec<String> = p.adapter_state_dict("default").unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(sd, vec!["base_model.score.weight".to_string(), "prompt_embeddings".to_string()]);
    let (trainable, _) = p.nb_trainable_parameters();
    assert_eq!(trainable, 3 * 64 + 3 * 64, "prompt table + score copy");
}

#[test]
fn task_type_must_match_the_head() {
    let mut m = base_peft("llama_lora_seqcls");
    let cfg = AdapterConfig::from_json(&json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "target_modules": ["q_proj"]}), None).unwrap();
    let e = m.add_adapter("default", cfg, 1).unwrap_err();
    assert_eq!(e.code(), "ERR_ADAPTER_CONFIG_INVALID");
    assert!(e.to_string().contains("LlamaForSequenceClassification has a SEQ_CLS head"), "{e}");
    assert!(m.adapter_names().is_empty(), "nothing added");
    let mut c = base_peft("llama_lora_qv");
    let cfg = AdapterConfig::from_json(&json!({"peft_type": "LORA", "task_type": "TOKEN_CLS", "r": 2, "target_modules": ["q_proj"]}), None).unwrap();
    let e = c.add_adapter("default", cfg, 1).unwrap_err();
    assert!(e.to_string().contains("TOKEN_CLS"), "{e}");
}

#[test]
fn causal_checkpoint_loads_as_classifier_with_a_new_head() {
    let path = fixtures_dir().join("models/llama");
    let req = LoadRequest { task: Some(Task::SeqCls), num_labels: Some(4), seed: 3, ..Default::default() };
    let a = load_model(&path, DType::F32, &Device::Cpu, &req).unwrap();
    assert_eq!(a.newly_initialized, vec!["score.weight".to_string()]);
    assert_eq!(a.model.info().num_labels, Some(4));
    // Seeded: the same seed gives the same head; normal(0, 0.02) as transformers initialises it.
    let b = load_model(&path, DType::F32, &Device::Cpu, &req).unwrap();
    let w = |m: &dyn peft_core::model::BaseModel| m.named_linears().pop().unwrap().1.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (wa, wb) = (w(a.model.as_ref()), w(b.model.as_ref()));
    assert_eq!(wa, wb);
    let sd = (wa.iter().map(|x| (x * x) as f64).sum::<f64>() / wa.len() as f64).sqrt();
    assert!((0.01..0.03).contains(&sd), "std {sd}");
    // A head the family does not have is refused with the supported ones named.
    let req = LoadRequest { task: Some(Task::QuestionAns), ..Default::default() };
    let e = load_model(&path, DType::F32, &Device::Cpu, &req).err().unwrap();
    assert!(e.to_string().contains("QUESTION_ANS") && e.to_string().contains("SEQ_CLS"), "{e}");
    // And an unknown architecture names itself and the supported list.
    let dir = temp_dir("unsupported-arch");
    std::fs::write(dir.join("config.json"), r#"{"architectures": ["FalconForCausalLM"], "model_type": "falcon"}"#).unwrap();
    let e = load_model(&dir, DType::F32, &Device::Cpu, &LoadRequest::default()).err().unwrap();
    assert_eq!(e.code(), "ERR_MODEL_CONFIG_INVALID");
    assert!(e.to_string().contains("FalconForCausalLM") && e.to_string().contains("GPT2ForSequenceClassification"), "{e}");
    remove_dir(&dir);
}

#[test]
fn pooling_follows_transformers() {
    assert_eq!(last_non_pad_indices(&[5, 6, 0, 0, 7, 8, 9, 1], 2, 4, Some(0)).unwrap(), vec![1, 3]);
    // Left padding: the last position.
    assert_eq!(last_non_pad_indices(&[0, 0, 5, 6], 1, 4, Some(0)).unwrap(), vec![3]);
    // All padding: 0 (argmax of zeros).
    assert_eq!(last_non_pad_indices(&[0, 0], 1, 2, Some(0)).unwrap(), vec![0]);
    assert_eq!(last_non_pad_indices(&[4, 5], 1, 2, None).unwrap(), vec![1]);
    let e = last_non_pad_indices(&[4, 5, 6, 7], 2, 2, None).unwrap_err();
    assert!(e.to_string().contains("Cannot handle batch sizes > 1 if no padding token is defined"));
}

#[test]
fn seqcls_training_learns_the_labels() {
    // A causal LM with a new 2-class head; LoRA + the head copy learn a token-presence rule.
    let path = fixtures_dir().join("models/llama");
    let loaded = load_model(&path, DType::F32, &Device::Cpu, &LoadRequest { task: Some(Task::SeqCls), num_labels: Some(2), seed: 1, ..Default::default() }).unwrap();
    let mut m = PeftModel::new(loaded.model);
    let cfg = AdapterConfig::from_json(&json!({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}), None).unwrap();
    m.add_adapter("default", cfg, 5).unwrap();
    let rows: Vec<(Vec<u32>, i64)> = (0..8u32).map(|i| (vec![10 + i, 50 + i, if i % 2 == 0 { 200 } else { 100 }, 30 + i], (i % 2 == 0) as i64)).collect();
    let batch = Batch {
        input_ids: rows.iter().flat_map(|r| r.0.clone()).collect(),
        attention_mask: vec![1; 32],
        labels: rows.iter().map(|r| r.1).collect(),
        batch_size: 8,
        seq_len: 4,
        ..Default::default()
    };
    let args = TrainingArgs { learning_rate: 5e-3, max_steps: 30, ..Default::default() };
    let mut t = Trainer::new(&m, args).unwrap();
    let first = t.step(&m, std::slice::from_ref(&batch)).unwrap().loss;
    let mut last = first;
    for _ in 1..30 {
        last = t.step(&m, std::slice::from_ref(&batch)).unwrap().loss;
    }
    visible(&format!("ok SEQ_CLS training on the tiny llama: loss {first:.4} -> {last:.4}"));
    assert!(last < first * 0.5, "loss {first} -> {last}");
    // The head copy changed, the original head did not.
    let lin = m.base.named_linears().pop().unwrap().1;
    let (copy, _) = lin.saved_copies.get("default").unwrap();
    let diff = (copy.as_tensor() - &lin.weight).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff > 0.0);
    // Save + reload gives the same logits.
    let dir = temp_dir("seqcls-train");
    m.save_pretrained(&dir, None).unwrap();
    let loaded = load_model(&path, DType::F32, &Device::Cpu, &LoadRequest { task: Some(Task::SeqCls), num_labels: Some(2), seed: 99, ..Default::default() }).unwrap();
    let mut r = PeftModel::new(loaded.model);
    let res = r.load_adapter(&dir, "default", false, None).unwrap();
    assert!(res.missing_keys.is_empty() && res.unexpected_keys.is_empty(), "{res:?}");
    let a = forward(&m, &batch.input_ids, 8, 4, &batch.attention_mask, None);
    let b = forward(&r, &batch.input_ids, 8, 4, &batch.attention_mask, None);
    assert_close("reloaded SEQ_CLS adapter", &b, &a, 0.0, 0.0);
    remove_dir(&dir);
}

/// LoRA on `embed_tokens` (HF `lora.Embedding`, keys `lora_embedding_A` / `lora_embedding_B`)
/// plus q_proj: logits, loss and the embedding LoRA gradients equal HF's; merging folds
/// `(s·B A)ᵀ` into the table; the re-save (with `save_embedding_layers="auto"`, which writes the
/// targeted table as `embed_tokens.base_layer.weight`) is byte-identical.
#[test]
fn lora_on_embeddings_matches_hf() {
    let case = "llama_lora_embedding";
    let exp = Expected::load(case);
    let m = adapter_peft(case, true);
    let (ka, kb) = ("base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens.lora_embedding_B");
    let status = m.layer_status().unwrap();
    assert!(status.iter().any(|l| l["name"] == "model.model.embed_tokens" && l["module_type"] == "lora.Embedding"), "{status:?}");
    let d = check_logits("adapter", &m, &exp, "logits_adapter");
    visible(&format!("ok {case}: adapter logits max |diff| {d:.2e}"));
    let (ids, b, s) = exp.ids("input_ids");
    let batch = Batch { input_ids: ids.clone(), attention_mask: exp.mask("attention_mask"), labels: exp.i64s("labels"), batch_size: b, seq_len: s, ..Default::default() };
    let (loss, _, grads) = peft_core::train::loss_and_grads(&m, &batch, None, None).unwrap();
    assert!((loss - scalar(exp.get("loss"))).abs() < 1e-5, "loss {loss}");
    for (k, v) in m.trainable_parameters() {
        if k == ka || k == kb {
            let g = grads.get(v.as_tensor()).expect("gradient reaches the embedding LoRA");
            let dg = assert_close(&format!("{case} grad {k}"), g, exp.get(&format!("grad.{k}")), 1e-5, 1e-4);
            visible(&format!("ok {case}: grad {k} max |diff| {dg:.2e}"));
        }
    }
    // Mixed batch: row 0 with the adapter, row 1 base = each row alone.
    let rows = vec![Some("default".to_string()), None];
    let mixed = forward(&m, &ids, b, s, &exp.mask("attention_mask"), Some(rows));
    assert_close("mixed row 0", &mixed.narrow(0, 0, 1).unwrap(), &exp.get("logits_adapter").narrow(0, 0, 1).unwrap(), 1e-4, 1e-4);
    assert_close("mixed row 1", &mixed.narrow(0, 1, 1).unwrap(), &exp.get("logits_base").narrow(0, 1, 1).unwrap(), 1e-4, 1e-4);
    // Re-save byte-identical (embedding base layer included by "auto").
    let dir = temp_dir(case);
    m.save_pretrained(&dir, None).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert!(std::fs::read(dir.join(f)).unwrap() == std::fs::read(case_dir(case).join(f)).unwrap(), "{case}: re-saved {f} differs");
    }
    // Explicit "no" leaves the table out.
    m.save_pretrained_with(&dir, None, &SaveOptions { save_embedding_layers: SaveEmbeddingLayers::No, ..Default::default() }).unwrap();
    let keys: Vec<String> = peft_core::io::read_safetensors(&dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap().into_iter().map(|(k, _)| k).collect();
    assert!(!keys.iter().any(|k| k.contains("base_layer")), "{keys:?}");
    remove_dir(&dir);
    // Merge / unmerge.
    let mut m = adapter_peft(case, false);
    m.merge_adapter(None, true).unwrap();
    let d = check_logits("merged", &m, &exp, "logits_merged");
    visible(&format!("ok {case}: merged logits max |diff| {d:.2e}"));
    m.unmerge_adapter().unwrap();
    check_logits("unmerged", &m, &exp, "logits_adapter");
    m.set_disabled(true).unwrap();
    check_logits("disabled", &m, &exp, "logits_base");
}

#[test]
fn save_embedding_layers_true_saves_the_tables_and_loading_restores_them() {
    // Not targeted + Yes: `model.embed_tokens.weight` and `lm_head.weight` are saved (HF), and
    // loading them replaces the base tables.
    let mut m = base_peft("llama_lora_qv");
    let cfg = AdapterConfig::from_json(&json!({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}), None).unwrap();
    m.add_adapter("default", cfg, 1).unwrap();
    for (name, lin) in m.base.named_linears_mut() {
        if name == "model.embed_tokens" || name == "lm_head" {
            lin.weight = (&lin.weight + 0.25).unwrap(); // a "resized / fine-tuned" table
        }
    }
    let dir = temp_dir("emb-true");
    m.save_pretrained_with(&dir, None, &SaveOptions { save_embedding_layers: SaveEmbeddingLayers::Yes, ..Default::default() }).unwrap();
    let keys: Vec<String> = peft_core::io::read_safetensors(&dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap().into_iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&"base_model.model.model.embed_tokens.weight".to_string()) && keys.contains(&"base_model.model.lm_head.weight".to_string()), "{keys:?}");
    let mut r = base_peft("llama_lora_qv");
    let res = r.load_adapter(&dir, "default", false, None).unwrap();
    assert!(res.unexpected_keys.is_empty(), "{res:?}");
    let ids = [5u32, 9, 33, 2];
    let a = forward(&m, &ids, 1, 4, &[1; 4], None);
    let b = forward(&r, &ids, 1, 4, &[1; 4], None);
    assert_close("saved tables restored on load", &b, &a, 0.0, 0.0);
    remove_dir(&dir);
}

/// PiSSA / OLoRA (`init_lora_weights: "pissa" | "olora"`) against HF PEFT 0.21: the adapter's
/// delta `s·B A` and the residual base weight of every targeted module equal HF's (A and B alone
/// are unique only up to signs), outputs at initialisation equal the base model's, and loading
/// HF's saved PiSSA adapter onto the original base (which re-derives the residual, as HF does)
/// reproduces HF's logits.
#[test]
fn pissa_and_olora_match_hf() {
    for case in ["llama_lora_pissa", "llama_lora_olora"] {
        let exp = Expected::load(case);
        let init = if case.ends_with("pissa") { "pissa" } else { "olora" };
        let mut m = base_peft(case);
        let cfg = AdapterConfig::from_json(&json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": init}), None).unwrap();
        m.add_adapter("default", cfg, 1).unwrap();
        let mut worst = (0f64, 0f64);
        for (name, lin) in m.base.named_linears() {
            if lin.loras().next().is_none() {
                continue;
            }
            let delta = lin.delta_weight("default").unwrap();
            let d1 = assert_close(&format!("{case} delta {name}"), &delta, exp.get(&format!("delta.{name}")), 1e-4, 1e-4);
            let d2 = assert_close(&format!("{case} residual {name}"), &lin.weight, exp.get(&format!("residual.{name}")), 1e-4, 1e-4);
            worst = (worst.0.max(d1), worst.1.max(d2));
        }
        let d = check_logits("adapter at init", &m, &exp, "logits_adapter");
        check_logits("adapter at init vs base", &m, &exp, "logits_base");
        visible(&format!("ok {case}: s·BA max |diff| {:.2e}, residual {:.2e}, logits {d:.2e}", worst.0, worst.1));
        let loaded = adapter_peft(case, false);
        let d = check_logits("HF adapter loaded on the original base", &loaded, &exp, "logits_adapter");
        visible(&format!("ok {case}: HF's saved adapter reproduces its logits ({d:.2e})"));
    }
}

/// `path_initial_model_for_weight_conversion`: a trained PiSSA adapter saved as a plain LoRA
/// adapter (rank 2r, alpha 2·alpha, init true) gives the trained model's outputs on the
/// original base model.
#[test]
fn pissa_converts_to_lora_for_the_original_base() {
    let mut m = base_peft("llama_lora_pissa");
    let cfg = AdapterConfig::from_json(&json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": "pissa"}), None).unwrap();
    m.add_adapter("default", cfg, 1).unwrap();
    let root = temp_dir("pissa-convert");
    let initial = root.join("initial");
    m.save_pretrained(&initial, None).unwrap();
    // "Train": move A and B.
    for (_, lin) in m.base.named_linears_mut() {
        if let Some(ad) = lin.lora_mut("default") {
            ad.a = candle_core::Var::from_tensor(&(ad.a.as_tensor() * 1.3).unwrap()).unwrap();
            ad.b = candle_core::Var::from_tensor(&(ad.b.as_tensor() + 0.01).unwrap()).unwrap();
        }
    }
    let trained_ids = [7u32, 19, 3, 44, 101, 5];
    let want = forward(&m, &trained_ids, 1, 6, &[1; 6], None);
    let out = root.join("converted");
    m.save_pretrained_with(&out, None, &SaveOptions { path_initial_model_for_weight_conversion: Some(initial.clone()), ..Default::default() }).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((saved["r"].clone(), saved["lora_alpha"].clone(), saved["init_lora_weights"].clone()), (json!(8), json!(16), json!(true)));
    // The original base (no residual) with the converted adapter = the trained PiSSA model.
    let mut orig = base_peft("llama_lora_pissa");
    let res = orig.load_adapter(&out, "default", false, None).unwrap();
    assert!(res.missing_keys.is_empty() && res.unexpected_keys.is_empty(), "{res:?}");
    let got = forward(&orig, &trained_ids, 1, 6, &[1; 6], None);
    let d = assert_close("converted LoRA on the original base", &got, &want, 1e-4, 1e-4);
    visible(&format!("ok PiSSA → LoRA conversion: logits max |diff| {d:.2e}"));
    // The initial folder is only read, never rewritten.
    let init_cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(initial.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(init_cfg["init_lora_weights"], json!("pissa"));
    // A missing initial adapter is a clear error.
    let e = m.save_pretrained_with(&root.join("x"), None, &SaveOptions { path_initial_model_for_weight_conversion: Some(root.join("nope")), ..Default::default() }).unwrap_err();
    assert_eq!(e.code(), "ERR_NOT_FOUND");
    remove_dir(&root);
}

/// Found by the fresh-user check: generation on a head without a vocabulary, a conversion of an
/// adapter that was not PiSSA/OLoRA-initialised, and a huge `num_labels` are refused up front.
#[test]
fn misuse_is_refused_before_any_work() {
    let m = base_peft("llama_lora_seqcls");
    let e = peft_core::generate::generate(&m, &[5, 6], 1, 2, None, None, &Default::default(), &|| false).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_STATE");
    assert!(e.to_string().contains("SEQ_CLS"), "{e}");
    let path = fixtures_dir().join("models/llama");
    let e = load_model(&path, DType::F32, &Device::Cpu, &LoadRequest { task: Some(Task::SeqCls), num_labels: Some(1_000_000_000), seed: 0, ..Default::default() }).err().unwrap();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains("numLabels"), "{e}");
    let mut p = base_peft("llama_lora_qv");
    let cfg = AdapterConfig::from_json(&json!({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}), None).unwrap();
    p.add_adapter("default", cfg, 1).unwrap();
    let dir = temp_dir("convert-plain");
    let e = p.save_pretrained_with(&dir.join("out"), None, &SaveOptions { path_initial_model_for_weight_conversion: Some(case_dir("llama_lora_pissa")), ..Default::default() }).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains("pissa"), "{e}");
    remove_dir(&dir);
}
