//! BERT (`BertForSequenceClassification` and the other heads) against HF PEFT 0.21's golden
//! fixture `bert_lora_seqcls` (LoRA on query/value, task_type SEQ_CLS, perturbed `classifier`
//! copy in modules_to_save) and against reference numbers made with torch + transformers by
//! `scripts/make_bert_reference.py` (`__test__/fixtures/bert_reference/`: token
//! classification, QA, BertModel hidden states, token types, prefix / prompt tuning).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use peft_core::model::bert::{BertConfig, BertModel};
use peft_core::model::loader::{load_model, LoadRequest};
use candle_nn::Optimizer;
use peft_core::model::{mean_pool, ForwardOptions, Task};
use peft_core::peft_model::PeftModel;
use peft_core::train::{loss_and_grads, task_loss, Batch, Trainer, TrainingArgs};
use peft_core::tuners::AdapterConfig;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;

const CASE: &str = "bert_lora_seqcls";

fn bert_dir() -> PathBuf {
    fixtures_dir().join("models/bert")
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    let p = fixtures_dir().join("bert_reference").join(name);
    peft_core::io::read_safetensors(&p, &Device::Cpu).unwrap_or_else(|e| panic!("{}: [{}] {e}", p.display(), e.code())).into_iter().collect()
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect()
}

fn mask_of(t: &Tensor) -> Vec<u8> {
    ids_of(t).into_iter().map(|x| x as u8).collect()
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn lora(v: serde_json::Value) -> AdapterConfig {
    AdapterConfig::from_json(&v, None).unwrap_or_else(|e| panic!("config: [{}] {e}", e.code()))
}

/// The tiny BERT with the head of `task` (new heads initialised as transformers does).
fn load_task(task: Task, num_labels: Option<usize>) -> (PeftModel, Vec<String>) {
    let req = LoadRequest { task: Some(task), num_labels, seed: 42, ..Default::default() };
    let l = load_model(&bert_dir(), DType::F32, &Device::Cpu, &req).unwrap_or_else(|e| panic!("load_model({task:?}): [{}] {e}", e.code()));
    (PeftModel::new(l.model), l.newly_initialized)
}

/// The tiny BERT built from its tensors plus head tensors `head` (renamed), for the reference
/// heads drawn by the Python script.
fn with_head(task: Task, num_labels: Option<usize>, head: &[(&str, &str)]) -> PeftModel {
    let dir = bert_dir();
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = BertConfig::from_json(&v, &dir.join("config.json")).unwrap();
    let mut t = peft_core::model::loader::load_folder_weights(&dir, &Device::Cpu).unwrap();
    t.retain(|k, _| !k.starts_with("classifier."));
    let r = reference("heads.safetensors");
    for (to, from) in head {
        t.insert(to.to_string(), r[*from].clone());
    }
    PeftModel::new(Box::new(BertModel::from_tensors_for(cfg, t, DType::F32, &Device::Cpu, task, num_labels).unwrap()))
}

fn run(m: &PeftModel, ids: &[u32], b: usize, s: usize, mask: &[u8], tt: Option<Vec<u32>>) -> Tensor {
    let opts = ForwardOptions { attention_mask: Some(mask.to_vec()), token_type_ids: tt, ..Default::default() };
    m.forward(ids, b, s, &opts, None).unwrap_or_else(|e| panic!("forward: [{}] {e}", e.code()))
}

/// Every trainable parameter has a finite, non-zero gradient.
fn assert_all_grads(m: &PeftModel, grads: &candle_core::backprop::GradStore, what: &str) {
    let params = m.trainable_parameters();
    assert!(!params.is_empty(), "{what}: nothing is trainable");
    for (k, v) in params {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{what}: no gradient for {k}"));
        let s = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(s.is_finite() && s > 0.0, "{what}: gradient of {k} is {s}");
    }
}

#[test]
fn bert_loads_with_transformers_module_names() {
    let m = base_peft(CASE);
    let info = m.base.info();
    assert_eq!(
        (info.architecture.as_str(), info.task, info.num_labels, info.hidden_size, info.num_hidden_layers, info.num_attention_heads, info.num_key_value_heads, info.decoder_start_token_id),
        ("BertForSequenceClassification", Task::SeqCls, Some(3), 64, 2, 4, None, None)
    );
    let names: Vec<String> = m.base.named_linears().into_iter().map(|(n, l)| format!("{n}:{}x{}", l.in_features(), l.out_features())).collect();
    assert_eq!(names[0], "bert.embeddings.word_embeddings:160x64"); // HF lora.Embedding: in = num_embeddings
    assert_eq!(&names[1..7], &[
        "bert.encoder.layer.0.attention.self.query:64x64", "bert.encoder.layer.0.attention.self.key:64x64",
        "bert.encoder.layer.0.attention.self.value:64x64", "bert.encoder.layer.0.attention.output.dense:64x64",
        "bert.encoder.layer.0.intermediate.dense:64x128", "bert.encoder.layer.0.output.dense:128x64",
    ]);
    assert_eq!(&names[13..], &["bert.pooler.dense:64x64", "classifier:64x3"]);
    // torch: sum(p.numel() for p in BertForSequenceClassification.parameters()) = 85891
    assert_eq!(m.base.base_param_count(), 85891);
    let biases: Vec<String> = m.base.named_norm_biases().into_iter().map(|(n, _)| n).collect();
    assert_eq!(biases[..2], ["bert.embeddings.LayerNorm".to_string(), "bert.encoder.layer.0.attention.output.LayerNorm".into()]);
    assert_eq!(biases.len(), 5);
    let mods = m.base.module_names();
    for n in ["bert.embeddings.token_type_embeddings", "bert.encoder.layer.1.output.LayerNorm", "bert.pooler.activation", "classifier"] {
        assert!(mods.contains(&n.to_string()), "missing module {n}");
    }
    // Plain BertModel: transformers' paths have no `bert.` prefix.
    let (fe, new) = load_task(Task::FeatureExtraction, None);
    assert!(new.is_empty(), "{new:?}");
    let names: Vec<String> = fe.base.named_linears().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names[..2], ["embeddings.word_embeddings".to_string(), "encoder.layer.0.attention.self.query".into()]);
    assert_eq!(names.last().unwrap(), "pooler.dense");
    assert_eq!(fe.base.info().architecture, "BertModel");
}

#[test]
fn base_adapter_disabled_and_merged_logits() {
    let exp = Expected::load(CASE);
    check_logits("base model", &base_peft(CASE), &exp, "logits_base");
    let mut m = adapter_peft(CASE, false);
    check_logits("adapter", &m, &exp, "logits_adapter");
    m.set_disabled(true).unwrap();
    check_logits("disabled adapter", &m, &exp, "logits_base");
    m.set_disabled(false).unwrap();
    let before: Vec<Tensor> = m.base.named_linears().into_iter().map(|(_, l)| l.weight.copy().unwrap()).collect();
    m.merge_adapter(None, true).unwrap();
    check_logits("merged (merge_adapter)", &m, &exp, "logits_merged");
    m.unmerge_adapter().unwrap();
    let worst = m.base.named_linears().into_iter().zip(&before).map(|((_, l), w)| max_diff(&l.weight, w)).fold(0.0, f64::max);
    assert!(worst < 1e-6, "unmerge left the weights off by {worst}");
    check_logits("unmerged", &m, &exp, "logits_adapter");
    m.merge_and_unload(None, false).unwrap();
    check_logits("merge_and_unload", &m, &exp, "logits_merged");
}

/// The classifier in modules_to_save: the loaded copy holds the fixture's perturbed values, the
/// original stays the base model's, and the copy is what the adapter's forward uses.
#[test]
fn classifier_copy_from_modules_to_save() {
    let m = adapter_peft(CASE, false);
    let fx: HashMap<String, Tensor> = peft_core::io::read_safetensors(&case_dir(CASE).join("adapter_model.safetensors"), &Device::Cpu).unwrap().into_iter().collect();
    let (_, cls) = m.base.named_linears().into_iter().find(|(n, _)| n == "classifier").unwrap();
    let (w, b) = cls.saved_copies.get("default").expect("classifier has a modules_to_save copy `default`");
    assert_eq!(max_diff(w.as_tensor(), &fx["base_model.model.classifier.weight"]), 0.0);
    assert_eq!(max_diff(b.as_ref().unwrap().as_tensor(), &fx["base_model.model.classifier.bias"]), 0.0);
    let base = base_peft(CASE);
    let (_, orig) = base.base.named_linears().into_iter().find(|(n, _)| n == "classifier").unwrap();
    assert_eq!(max_diff(&cls.weight, &orig.weight), 0.0, "the original classifier is untouched");
    let d = max_diff(w.as_tensor(), &orig.weight);
    assert!(d > 1e-3, "the fixture's copy was perturbed (max diff {d})");
    let cfg = m.peft_config("default").unwrap().to_json();
    assert_eq!(cfg["modules_to_save"], json!(["classifier", "score"]));
}

#[test]
fn resave_is_byte_identical() {
    let m = adapter_peft(CASE, false);
    let out = temp_dir("bert-resave");
    m.save_pretrained(&out, None).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        let fx = std::fs::read(case_dir(CASE).join(f)).unwrap();
        let ours = std::fs::read(out.join(f)).unwrap();
        assert!(fx == ours, "re-saved {f} differs from HF's ({} vs {} bytes):\n{}", ours.len(), fx.len(), String::from_utf8_lossy(&ours[..ours.len().min(2000)]));
        visible(&format!("ok {CASE}: re-saved {f} byte-identical ({} bytes)", ours.len()));
    }
    remove_dir(&out);
}

/// A fresh LoRA adapter with task_type SEQ_CLS: `classifier` joins modules_to_save (HF), the
/// loss falls, every trainable parameter (LoRA A/B and the classifier copy) gets a gradient,
/// and a save + reload reproduces the trained logits.
#[test]
fn seqcls_lora_trains_saves_and_reloads() {
    let mut m = base_peft(CASE);
    m.add_adapter("default", lora(json!({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]})), 5).unwrap();
    let keys: Vec<String> = m.trainable_parameters().into_iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&"base_model.model.classifier.weight".to_string()) && keys.contains(&"base_model.model.classifier.bias".to_string()), "{keys:?}");
    assert_eq!(keys.len(), 8 + 2, "{keys:?}");
    assert_eq!(m.peft_config("default").unwrap().to_json()["modules_to_save"], json!(["classifier", "score"]), "saved as HF writes it");
    let r = reference("heads.safetensors");
    let (ids, mask, tt) = (ids_of(&r["input_ids"]), mask_of(&r["attention_mask"]), ids_of(&r["token_type_ids"]));
    let batch = Batch { input_ids: ids.clone(), attention_mask: mask.clone(), labels: vec![2, 0], batch_size: 2, seq_len: 7, token_type_ids: Some(tt.clone()), ..Default::default() };
    let (_, _, grads) = loss_and_grads(&m, &batch, None, None).unwrap();
    // lora_B starts at zero, so lora_A's first gradient is zero (as in HF); take one step first.
    let args = TrainingArgs { learning_rate: 5e-2, max_steps: 15, seed: 1, ..Default::default() };
    let mut tr = Trainer::new(&m, args).unwrap();
    let losses: Vec<f64> = (0..15).map(|_| tr.step(&m, std::slice::from_ref(&batch)).unwrap().loss).collect();
    let (_, _, grads2) = loss_and_grads(&m, &batch, None, None).unwrap();
    assert_all_grads(&m, &grads2, "seqcls lora");
    drop(grads);
    assert!(losses[14] < losses[0] * 0.5, "loss {:.4} -> {:.4}", losses[0], losses[14]);
    let out = temp_dir("bert-seqcls-train");
    m.save_pretrained(&out, None).unwrap();
    let mut back = base_peft(CASE);
    back.load_adapter(&out, "default", false, None).unwrap();
    let d = max_diff(&run(&m, &ids, 2, 7, &mask, Some(tt.clone())), &run(&back, &ids, 2, 7, &mask, Some(tt)));
    assert!(d < 1e-6, "reloaded adapter differs by {d}");
    remove_dir(&out);
    visible(&format!("ok bert seqcls lora: loss {:.4} -> {:.4} in 15 steps; reload max diff {d:.1e}", losses[0], losses[14]));
}

/// Token type ids reach the embeddings: HF's logits with the reference `token_type_ids` are
/// reproduced, and they differ from the all-zero default.
#[test]
fn token_type_ids_match_transformers() {
    let r = reference("heads.safetensors");
    let (ids, mask, tt) = (ids_of(&r["input_ids"]), mask_of(&r["attention_mask"]), ids_of(&r["token_type_ids"]));
    let m = base_peft(CASE);
    let with = run(&m, &ids, 2, 7, &mask, Some(tt.clone()));
    assert_close("bert seqcls logits with token_type_ids", &with, &r["seqcls.logits_tt"], 1e-5, 1e-4);
    let without = run(&m, &ids, 2, 7, &mask, None);
    // The tiny model's logits move little; the hidden states below move by up to ~1.9.
    assert!(max_diff(&with, &without) > 1e-6, "token types must change the logits");
    let (fe, _) = load_task(Task::FeatureExtraction, None);
    let h = run(&fe, &ids, 2, 7, &mask, Some(tt));
    assert_close("BertModel last_hidden_state (token types)", &h, &r["base.last_hidden_state"], 1e-5, 1e-4);
    let h0 = run(&fe, &ids, 2, 7, &mask, None);
    assert_close("BertModel last_hidden_state (no token types)", &h0, &r["base.last_hidden_state_no_tt"], 1e-5, 1e-4);
    assert!(max_diff(&h, &h0) > 0.5, "token types must change the hidden states");
    let bad = fe.forward(&ids, 2, 7, &ForwardOptions { token_type_ids: Some(vec![2; 14]), ..Default::default() }, None).unwrap_err();
    assert!(bad.to_string().contains("type_vocab_size"), "{bad}");
}

#[test]
fn token_classification_matches_transformers() {
    let r = reference("heads.safetensors");
    let m = with_head(Task::TokenCls, Some(5), &[("classifier.weight", "tok.classifier.weight"), ("classifier.bias", "tok.classifier.bias")]);
    assert_eq!(m.base.info().architecture, "BertForTokenClassification");
    assert!(!m.base.named_linears().iter().any(|(n, _)| n.contains("pooler")), "BertForTokenClassification has no pooler");
    let (ids, mask, tt) = (ids_of(&r["input_ids"]), mask_of(&r["attention_mask"]), ids_of(&r["token_type_ids"]));
    let logits = run(&m, &ids, 2, 7, &mask, Some(tt.clone()));
    assert_close("token classification logits", &logits, &r["tok.logits"], 1e-5, 1e-4);
    let batch = Batch { input_ids: ids, attention_mask: mask, labels: i64s(&r["tok.labels"]), batch_size: 2, seq_len: 7, token_type_ids: Some(tt), ..Default::default() };
    let (loss, _) = task_loss(&m, &logits, &batch).unwrap();
    let want = r["tok.loss"].to_vec1::<f32>().unwrap()[0];
    let got = loss.to_scalar::<f32>().unwrap();
    visible(&format!("diff token classification loss: got {got:.7} expected {want:.7}"));
    assert!((got - want).abs() < 1e-5, "loss {got} vs {want}");
}

#[test]
fn question_answering_matches_transformers() {
    let r = reference("heads.safetensors");
    let m = with_head(Task::QuestionAns, None, &[("qa_outputs.weight", "qa.qa_outputs.weight"), ("qa_outputs.bias", "qa.qa_outputs.bias")]);
    let (ids, mask, tt) = (ids_of(&r["input_ids"]), mask_of(&r["attention_mask"]), ids_of(&r["token_type_ids"]));
    let logits = run(&m, &ids, 2, 7, &mask, Some(tt.clone()));
    assert_eq!(logits.dims(), [2, 7, 2]);
    assert_close("qa start logits", &logits.narrow(2, 0, 1).unwrap().squeeze(2).unwrap(), &r["qa.start_logits"], 1e-5, 1e-4);
    assert_close("qa end logits", &logits.narrow(2, 1, 1).unwrap().squeeze(2).unwrap(), &r["qa.end_logits"], 1e-5, 1e-4);
    // start position 9 > seq len 7 is clamped to 7 and ignored (transformers).
    let batch = Batch {
        input_ids: ids,
        attention_mask: mask,
        batch_size: 2,
        seq_len: 7,
        token_type_ids: Some(tt),
        start_positions: Some(i64s(&r["qa.start_positions"])),
        end_positions: Some(i64s(&r["qa.end_positions"])),
        ..Default::default()
    };
    let (loss, _) = task_loss(&m, &logits, &batch).unwrap();
    let (want, got) = (r["qa.loss"].to_vec1::<f32>().unwrap()[0], loss.to_scalar::<f32>().unwrap());
    visible(&format!("diff qa loss (clamped positions): got {got:.7} expected {want:.7}"));
    assert!((got - want).abs() < 1e-5, "loss {got} vs {want}");
}

/// New heads are initialised as transformers does (normal(0, 0.02) weights, zero biases) and
/// listed; a classifier of the wrong size is refused.
#[test]
fn new_heads_are_initialised_and_listed() {
    let (qa, new) = load_task(Task::QuestionAns, None);
    assert_eq!(new, vec!["qa_outputs.weight".to_string(), "qa_outputs.bias".into()]);
    let (_, head) = qa.base.named_linears().pop().unwrap();
    let w: Vec<f32> = head.weight.flatten_all().unwrap().to_vec1().unwrap();
    let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
    assert!(std > 0.01 && std < 0.03, "std {std}");
    assert_eq!(head.bias.as_ref().unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    // The checkpoint's classifier (3 labels) is reused for token classification with 3 labels.
    let (_, new) = load_task(Task::TokenCls, None);
    assert!(new.is_empty(), "{new:?}");
    let Err(e) = load_model(&bert_dir(), DType::F32, &Device::Cpu, &LoadRequest { task: Some(Task::TokenCls), num_labels: Some(5), seed: 0, ..Default::default() }) else { panic!("size mismatch must fail") };
    assert!(e.to_string().contains("classifier.weight"), "{e}");
    let Err(e) = load_model(&bert_dir(), DType::F32, &Device::Cpu, &LoadRequest { task: Some(Task::CausalLm), num_labels: None, seed: 0, ..Default::default() }) else { panic!("causal LM must fail") };
    assert!(e.to_string().contains("CAUSAL_LM"), "{e}");
}

/// LoRA on every linear layer of each head: the loss falls and every trainable parameter gets a
/// non-zero gradient (after one step, when lora_B is no longer zero).
#[test]
fn token_cls_and_qa_train() {
    let r = reference("heads.safetensors");
    let (ids, mask, tt) = (ids_of(&r["input_ids"]), mask_of(&r["attention_mask"]), ids_of(&r["token_type_ids"]));
    for (task, tag) in [(Task::TokenCls, "TOKEN_CLS"), (Task::QuestionAns, "QUESTION_ANS")] {
        let (mut m, _) = load_task(task, None);
        m.add_adapter("default", lora(json!({"peft_type": "LORA", "task_type": tag, "r": 4, "lora_alpha": 8, "target_modules": ["query", "key", "value", "dense"]})), 9).unwrap();
        let head = if task == Task::QuestionAns { "qa_outputs" } else { "classifier" };
        assert!(m.trainable_parameters().iter().any(|(k, _)| k == &format!("base_model.model.{head}.weight")), "{tag}: head not in modules_to_save");
        let mut batch = Batch { input_ids: ids.clone(), attention_mask: mask.clone(), batch_size: 2, seq_len: 7, token_type_ids: Some(tt.clone()), ..Default::default() };
        if task == Task::QuestionAns {
            batch.start_positions = Some(vec![1, 2]);
            batch.end_positions = Some(vec![3, 4]);
        } else {
            batch.labels = i64s(&r["tok.labels"]).into_iter().map(|l| if l < 0 { l } else { l % 3 }).collect();
        }
        let args = TrainingArgs { learning_rate: 3e-2, max_steps: 12, seed: 1, ..Default::default() };
        let mut tr = Trainer::new(&m, args).unwrap();
        let losses: Vec<f64> = (0..12).map(|_| tr.step(&m, std::slice::from_ref(&batch)).unwrap().loss).collect();
        let (_, _, grads) = loss_and_grads(&m, &batch, None, None).unwrap();
        assert_all_grads(&m, &grads, tag);
        assert!(losses[11] < losses[0] * 0.7, "{tag}: loss {:.4} -> {:.4}", losses[0], losses[11]);
        visible(&format!("ok bert {tag} lora: loss {:.4} -> {:.4} in 12 steps, {} trainable tensors with gradients", losses[0], losses[11], m.trainable_parameters().len()));
    }
}

/// Feature extraction: LoRA trained through `mean_pool` towards a target embedding; every
/// LoRA tensor gets a gradient and the distance falls.
#[test]
fn feature_extraction_trains_through_mean_pool() {
    let r = reference("heads.safetensors");
    let (ids, mask) = (ids_of(&r["input_ids"]), mask_of(&r["attention_mask"]));
    let (mut m, _) = load_task(Task::FeatureExtraction, None);
    m.add_adapter("default", lora(json!({"peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "intermediate.dense"], "init_lora_weights": false})), 3).unwrap();
    let target = Tensor::ones((2, 64), DType::F32, &Device::Cpu).unwrap();
    let vars: Vec<candle_core::Var> = m.trainable_parameters().into_iter().map(|(_, v)| v).collect();
    let mut opt = candle_nn::AdamW::new(vars, candle_nn::ParamsAdamW { lr: 2e-2, ..Default::default() }).unwrap();
    let opts = ForwardOptions { attention_mask: Some(mask.clone()), train: true, ..Default::default() };
    let mut dists = vec![];
    for step in 0..10 {
        let h = m.forward(&ids, 2, 7, &opts, None).unwrap();
        let e = mean_pool(&h, &mask).unwrap();
        let loss = (e - &target).unwrap().sqr().unwrap().mean_all().unwrap();
        dists.push(loss.to_scalar::<f32>().unwrap());
        let grads = loss.backward().unwrap();
        if step == 0 {
            assert_all_grads(&m, &grads, "feature extraction");
        }
        opt.step(&grads).unwrap();
    }
    assert!(dists[9] < dists[0] * 0.9, "distance {} -> {}", dists[0], dists[9]);
    visible(&format!("ok bert FEATURE_EXTRACTION lora via mean_pool: mse {:.4} -> {:.4}", dists[0], dists[9]));
}

#[test]
fn mean_pool_is_the_masked_mean() {
    let h = Tensor::new(&[[[1f32, 2.], [3., 4.], [100., 100.]], [[5., 6.], [7., 8.], [9., 10.]]], &Device::Cpu).unwrap();
    let p = mean_pool(&h, &[1, 1, 0, 1, 1, 1]).unwrap();
    assert_eq!(p.to_vec2::<f32>().unwrap(), vec![vec![2.0, 3.0], vec![7.0, 8.0]]);
    let z = mean_pool(&h, &[0, 0, 0, 1, 0, 0]).unwrap();
    assert_eq!(z.to_vec2::<f32>().unwrap(), vec![vec![0.0, 0.0], vec![5.0, 6.0]]);
    assert!(mean_pool(&h, &[1, 1]).unwrap_err().to_string().contains("attentionMask"));
}

/// Each row of a right-padded batch gives what the row gives alone, for every head.
#[test]
fn padded_rows_equal_rows_alone() {
    let r = reference("heads.safetensors");
    let (ids, mask, tt) = (ids_of(&r["input_ids"]), mask_of(&r["attention_mask"]), ids_of(&r["token_type_ids"]));
    let n = mask[7..].iter().filter(|&&x| x == 1).count();
    assert!(n < 7);
    let mut models = vec![("SEQ_CLS", adapter_peft(CASE, false))];
    for (task, tag) in [(Task::TokenCls, "TOKEN_CLS"), (Task::QuestionAns, "QUESTION_ANS"), (Task::FeatureExtraction, "FEATURE_EXTRACTION")] {
        models.push((tag, load_task(task, None).0));
    }
    for (tag, m) in &models {
        let all = run(m, &ids, 2, 7, &mask, Some(tt.clone()));
        for row in 0..2 {
            let len = if row == 0 { 7 } else { n };
            let alone = run(m, &ids[row * 7..row * 7 + len], 1, len, &vec![1; len], Some(tt[row * 7..row * 7 + len].to_vec()));
            let got = all.narrow(0, row, 1).unwrap();
            let got = if got.rank() == 3 { got.narrow(1, 0, len).unwrap() } else { got };
            let d = max_diff(&got, &alone);
            assert!(d < 2e-5, "{tag} row {row}: batch vs alone differ by {d}");
        }
    }
}

/// Prefix tuning and prompt tuning (SEQ_CLS) adapters saved by HF PEFT, loaded as they are
/// (prompt table + the trained `classifier` from modules_to_save under `base_model.classifier.*`):
/// prefix keys/values go into every layer's attention and positions start after the prefix
/// (transformers' `past_key_values_length`); prompt tuning prepends virtual tokens of segment 0
/// and the pooler reads the first virtual token. A re-save is byte-identical.
#[test]
fn prefix_and_prompt_tuning_match_peft() {
    for name in ["prefix_seqcls", "prompt_seqcls"] {
        let src = fixtures_dir().join("bert_reference").join(name);
        let mut m = base_peft(CASE);
        let res = m.load_adapter(&src, "default", false, None).unwrap_or_else(|e| panic!("{name}: [{}] {e}", e.code()));
        assert!(res.missing_keys.is_empty() && res.unexpected_keys.is_empty(), "{name}: {res:?}");
        let exp = reference(&format!("{name}/expected.safetensors"));
        let (ids, mask, tt) = (ids_of(&exp["input_ids"]), mask_of(&exp["attention_mask"]), ids_of(&exp["token_type_ids"]));
        assert_close(&format!("{name} logits (token types)"), &run(&m, &ids, 2, 7, &mask, Some(tt)), &exp["logits"], 1e-5, 1e-4);
        assert_close(&format!("{name} logits"), &run(&m, &ids, 2, 7, &mask, None), &exp["logits_no_tt"], 1e-5, 1e-4);
        let out = temp_dir(&format!("bert-{name}"));
        m.save_pretrained(&out, None).unwrap();
        let (fx, ours) = (std::fs::read(src.join("adapter_model.safetensors")).unwrap(), std::fs::read(out.join("adapter_model.safetensors")).unwrap());
        assert!(fx == ours, "{name}: re-saved adapter_model.safetensors differs from HF's");
        remove_dir(&out);
    }
}

/// Prefix tuning trains on BERT: the prefix table and the classifier copy get gradients and the
/// loss falls.
#[test]
fn prefix_tuning_trains() {
    use peft_core::tuners::prompt::PromptLearningConfig;
    let r = reference("heads.safetensors");
    let (ids, mask, tt) = (ids_of(&r["input_ids"]), mask_of(&r["attention_mask"]), ids_of(&r["token_type_ids"]));
    let mut m = base_peft(CASE);
    let c = PromptLearningConfig::from_json(&json!({"peft_type": "PREFIX_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": 4}), None).unwrap();
    m.add_adapter("default", c, 3).unwrap();
    let batch = Batch { input_ids: ids, attention_mask: mask, labels: vec![1, 2], batch_size: 2, seq_len: 7, token_type_ids: Some(tt), ..Default::default() };
    let (_, _, grads) = loss_and_grads(&m, &batch, None, None).unwrap();
    assert_all_grads(&m, &grads, "prefix tuning");
    let args = TrainingArgs { learning_rate: 5e-2, max_steps: 10, seed: 1, ..Default::default() };
    let mut tr = Trainer::new(&m, args).unwrap();
    let losses: Vec<f64> = (0..10).map(|_| tr.step(&m, std::slice::from_ref(&batch)).unwrap().loss).collect();
    assert!(losses[9] < losses[0] * 0.7, "loss {:.4} -> {:.4}", losses[0], losses[9]);
    visible(&format!("ok bert prefix tuning SEQ_CLS: loss {:.4} -> {:.4} in 10 steps, {} trainable tensors with gradients", losses[0], losses[9], m.trainable_parameters().len()));
}

#[test]
fn unsupported_architecture_lists_supported_ones() {
    let dir = temp_dir("bert-unsupported");
    std::fs::write(dir.join("config.json"), r#"{"architectures": ["BertForMultipleChoice"], "model_type": "bert"}"#).unwrap();
    let e = load_model(&dir, DType::F32, &Device::Cpu, &LoadRequest::default()).err().expect("must fail");
    let msg = e.to_string();
    assert_eq!(e.code(), "ERR_MODEL_CONFIG_INVALID");
    for want in ["BertForMultipleChoice", "BertForSequenceClassification", "BertModel", "BertForQuestionAnswering", "GPT2LMHeadModel", "LlamaForCausalLM"] {
        assert!(msg.contains(want), "`{want}` missing from: {msg}");
    }
    remove_dir(&dir);
}


// ---------------------------------------------------------------------------------------------
// DistilBERT: a tiny random DistilBertForSequenceClassification and a HF PEFT LoRA SEQ_CLS
// adapter (q_lin / v_lin; `classifier` in modules_to_save also selects `pre_classifier`, as HF's
// plain `endswith` match does), made by scripts/make_bert_reference.py.
// ---------------------------------------------------------------------------------------------

fn distil_dir() -> PathBuf {
    fixtures_dir().join("models/distilbert")
}

fn distil(task: Option<Task>) -> PeftModel {
    let req = LoadRequest { task, num_labels: None, seed: 0, ..Default::default() };
    let l = load_model(&distil_dir(), DType::F32, &Device::Cpu, &req).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    PeftModel::new(l.model)
}

#[test]
fn distilbert_lora_seqcls_matches_peft() {
    let dir = fixtures_dir().join("bert_reference/distilbert_lora_seqcls");
    let exp = reference("distilbert_lora_seqcls/expected.safetensors");
    let (ids, mask) = (ids_of(&exp["input_ids"]), mask_of(&exp["attention_mask"]));
    let mut m = distil(None);
    assert_eq!(m.base.info().architecture, "DistilBertForSequenceClassification");
    let names: Vec<String> = m.base.named_linears().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names[..3], ["distilbert.embeddings.word_embeddings".to_string(), "distilbert.transformer.layer.0.attention.q_lin".into(), "distilbert.transformer.layer.0.attention.k_lin".into()]);
    assert_eq!(names[names.len() - 2..], ["pre_classifier".to_string(), "classifier".into()]);
    assert!(m.base.module_names().contains(&"distilbert.transformer.layer.1.output_layer_norm".to_string()));
    assert_close("distilbert base logits", &run(&m, &ids, 2, 7, &mask, None), &exp["logits_base"], 1e-5, 1e-4);
    let res = m.load_adapter(&dir, "default", false, None).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    assert!(res.missing_keys.is_empty() && res.unexpected_keys.is_empty(), "{res:?}");
    assert_close("distilbert adapter logits", &run(&m, &ids, 2, 7, &mask, None), &exp["logits_adapter"], 1e-5, 1e-4);
    let out = temp_dir("distilbert-resave");
    m.save_pretrained(&out, None).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        let (fx, ours) = (std::fs::read(dir.join(f)).unwrap(), std::fs::read(out.join(f)).unwrap());
        assert!(fx == ours, "distilbert: re-saved {f} differs from HF's");
    }
    remove_dir(&out);
    m.set_disabled(true).unwrap();
    assert_close("distilbert disabled logits", &run(&m, &ids, 2, 7, &mask, None), &exp["logits_base"], 1e-5, 1e-4);
    m.set_disabled(false).unwrap();
    m.merge_and_unload(None, true).unwrap();
    assert_close("distilbert merged logits", &run(&m, &ids, 2, 7, &mask, None), &exp["logits_adapter"], 1e-5, 1e-4);
    // DistilBERT has no token types and no past_key_values.
    let e = m.forward(&ids, 2, 7, &ForwardOptions { token_type_ids: Some(vec![0; 14]), ..Default::default() }, None).unwrap_err();
    assert!(e.to_string().contains("no token type embeddings"), "{e}");
}

#[test]
fn distilbert_encoder_and_qa_match_transformers() {
    let exp = reference("distilbert_lora_seqcls/expected.safetensors");
    let (ids, mask) = (ids_of(&exp["input_ids"]), mask_of(&exp["attention_mask"]));
    let enc = distil(Some(Task::FeatureExtraction));
    assert_eq!(enc.base.info().architecture, "DistilBertModel");
    assert_eq!(enc.base.named_linears()[1].0, "transformer.layer.0.attention.q_lin");
    assert_close("DistilBertModel last_hidden_state", &run(&enc, &ids, 2, 7, &mask, None), &exp["last_hidden_state"], 1e-5, 1e-4);
    let dir = distil_dir();
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = BertConfig::from_json(&v, &dir.join("config.json")).unwrap();
    let mut t = peft_core::model::loader::load_folder_weights(&dir, &Device::Cpu).unwrap();
    t.insert("qa_outputs.weight".into(), exp["qa.qa_outputs.weight"].clone());
    t.insert("qa_outputs.bias".into(), exp["qa.qa_outputs.bias"].clone());
    let qa = PeftModel::new(Box::new(BertModel::from_tensors_for(cfg, t, DType::F32, &Device::Cpu, Task::QuestionAns, None).unwrap()));
    let logits = run(&qa, &ids, 2, 7, &mask, None);
    assert_close("distilbert qa start logits", &logits.narrow(2, 0, 1).unwrap().squeeze(2).unwrap(), &exp["qa.start_logits"], 1e-5, 1e-4);
    assert_close("distilbert qa end logits", &logits.narrow(2, 1, 1).unwrap().squeeze(2).unwrap(), &exp["qa.end_logits"], 1e-5, 1e-4);
    // Prefix tuning is refused clearly (HF's DistilBERT takes no past_key_values).
    use peft_core::tuners::prompt::PromptLearningConfig;
    let mut m = distil(None);
    m.add_adapter("default", PromptLearningConfig::from_json(&json!({"peft_type": "PREFIX_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": 2}), None).unwrap(), 1).unwrap();
    let e = m.forward(&ids, 2, 7, &ForwardOptions { attention_mask: Some(mask.clone()), ..Default::default() }, None).unwrap_err();
    assert!(e.to_string().contains("prefix tuning"), "{e}");
}

/// RoBERTa: positions from the ids (pad id 1 in the padded row), the RobertaClassificationHead
/// (`classifier.dense` + `classifier.out_proj`, both saved through modules_to_save `classifier`
/// as HF does), a HF LoRA SEQ_CLS adapter with byte-identical re-save, and RobertaModel.
#[test]
fn roberta_lora_seqcls_matches_peft() {
    let dir = fixtures_dir().join("bert_reference/roberta_lora_seqcls");
    let exp = reference("roberta_lora_seqcls/expected.safetensors");
    let (ids, mask) = (ids_of(&exp["input_ids"]), mask_of(&exp["attention_mask"]));
    assert_eq!(ids[12..], [1, 1], "the padded row uses RoBERTa's pad id");
    let load = |task: Option<Task>| {
        let l = load_model(&fixtures_dir().join("models/roberta"), DType::F32, &Device::Cpu, &LoadRequest { task, num_labels: None, seed: 0, ..Default::default() }).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
        PeftModel::new(l.model)
    };
    let mut m = load(None);
    assert_eq!(m.base.info().architecture, "RobertaForSequenceClassification");
    let names: Vec<String> = m.base.named_linears().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names[1], "roberta.encoder.layer.0.attention.self.query");
    assert_eq!(names[names.len() - 2..], ["classifier.dense".to_string(), "classifier.out_proj".into()]);
    assert_close("roberta base logits", &run(&m, &ids, 2, 7, &mask, None), &exp["logits_base"], 1e-5, 1e-4);
    let res = m.load_adapter(&dir, "default", false, None).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    assert!(res.missing_keys.is_empty() && res.unexpected_keys.is_empty(), "{res:?}");
    assert_close("roberta adapter logits", &run(&m, &ids, 2, 7, &mask, None), &exp["logits_adapter"], 1e-5, 1e-4);
    let out = temp_dir("roberta-resave");
    m.save_pretrained(&out, None).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        let (fx, ours) = (std::fs::read(dir.join(f)).unwrap(), std::fs::read(out.join(f)).unwrap());
        assert!(fx == ours, "roberta: re-saved {f} differs from HF's");
    }
    remove_dir(&out);
    m.merge_and_unload(None, true).unwrap();
    assert_close("roberta merged logits", &run(&m, &ids, 2, 7, &mask, None), &exp["logits_adapter"], 1e-5, 1e-4);
    let enc = load(Some(Task::FeatureExtraction));
    assert_eq!(enc.base.info().architecture, "RobertaModel");
    assert_close("RobertaModel last_hidden_state", &run(&enc, &ids, 2, 7, &mask, None), &exp["last_hidden_state"], 1e-5, 1e-4);
    // A fresh SEQ_CLS LoRA adapter trains both head linears (modules_to_save `classifier`).
    let mut fresh = load(None);
    fresh.add_adapter("default", lora(json!({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4, "target_modules": ["query", "value"]})), 1).unwrap();
    let keys: Vec<String> = fresh.trainable_parameters().into_iter().map(|(k, _)| k).collect();
    for k in ["base_model.model.classifier.dense.weight", "base_model.model.classifier.out_proj.bias"] {
        assert!(keys.contains(&k.to_string()), "{k} not trainable: {keys:?}");
    }
}

/// LoRA on the word embeddings (HF `lora.Embedding`, target `word_embeddings`) trains with
/// gradients on `lora_embedding_A/B`, saves under HF's keys and reloads identically.
#[test]
fn lora_on_word_embeddings_trains_and_reloads() {
    let r = reference("heads.safetensors");
    let (ids, mask, tt) = (ids_of(&r["input_ids"]), mask_of(&r["attention_mask"]), ids_of(&r["token_type_ids"]));
    let mut m = base_peft(CASE);
    m.add_adapter("default", lora(json!({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4, "target_modules": ["word_embeddings", "query"]})), 2).unwrap();
    let keys: Vec<String> = m.trainable_parameters().into_iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&"base_model.model.bert.embeddings.word_embeddings.lora_embedding_A".to_string()), "{keys:?}");
    let batch = Batch { input_ids: ids.clone(), attention_mask: mask.clone(), labels: vec![0, 2], batch_size: 2, seq_len: 7, token_type_ids: Some(tt.clone()), ..Default::default() };
    let args = TrainingArgs { learning_rate: 5e-2, max_steps: 8, seed: 1, ..Default::default() };
    let mut tr = Trainer::new(&m, args).unwrap();
    let losses: Vec<f64> = (0..8).map(|_| tr.step(&m, std::slice::from_ref(&batch)).unwrap().loss).collect();
    let (_, _, grads) = loss_and_grads(&m, &batch, None, None).unwrap();
    assert_all_grads(&m, &grads, "embedding lora");
    assert!(losses[7] < losses[0], "loss {:?}", losses);
    let out = temp_dir("bert-emb-lora");
    m.save_pretrained(&out, None).unwrap();
    let mut back = base_peft(CASE);
    let res = back.load_adapter(&out, "default", false, None).unwrap();
    assert!(res.missing_keys.is_empty() && res.unexpected_keys.is_empty(), "{res:?}");
    let d = max_diff(&run(&m, &ids, 2, 7, &mask, Some(tt.clone())), &run(&back, &ids, 2, 7, &mask, Some(tt)));
    assert!(d < 1e-6, "reload differs by {d}");
    remove_dir(&out);
}

/// A config.json without `model_type` is read by the family its `architectures` entry names.
#[test]
fn family_from_architectures_without_model_type() {
    let dir = temp_dir("roberta-no-model-type");
    let src = fixtures_dir().join("models/roberta");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("model_type");
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let l = load_model(&dir, DType::F32, &Device::Cpu, &LoadRequest::default()).unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    assert_eq!(l.model.info().model_type, "roberta");
    remove_dir(&dir);
}
