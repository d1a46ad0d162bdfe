//! Gradient checkpointing (transformers' `gradient_checkpointing_enable` + PEFT's
//! `prepare_model_for_gradient_checkpointing`): a training step with it gives the loss and
//! every trainable gradient of the step without it — bit for bit on the fused engine and on
//! the BERT family, within float rounding elsewhere on the general path (its layer-wise driver
//! may sum the gradients in another order) — on random tiny Llama models with grouped-query
//! attention and padded rows (LoRA with dropout, LoRA on the embedding, prompt tuning, DoRA,
//! (IA)³) and on Gemma 3; trainer runs with it follow the same loss trajectory; Phi-3 on the
//! engine and on the general path; GPT-2, a Llama sequence classifier, BERT / DistilBERT / RoBERTa on every head and T5 (the encoder
//! output feeding every decoder layer) on the general path; prefix tuning is refused with a
//! coded error naming `gradientCheckpointing` (HF's text).

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device};
use common::random::*;
use common::*;
use peft_core::engine;
use peft_core::model::loader::{load_causal_lm, load_model, LoadRequest};
use peft_core::model::Task;
use peft_core::peft_model::PeftModel;
use peft_core::train::{loss_and_grads_with, Batch, Trainer, TrainingArgs};
use peft_core::tuners::AdapterConfig;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::{Arc, Mutex};

const PREFIX_TEXT: &str = "PREFIX_TUNING does not work with gradient checkpointing.";

/// A random Llama with grouped-query attention (6 query heads over 2 key/value heads,
/// head_dim 8 ≠ hidden / heads), 3 layers.
fn llama(seed: u64) -> PeftModel {
    let sh = Shape { hidden: 40, heads: 6, kv: 2, head_dim: 8, inter: 56, layers: 3, vocab: 97, model_type: "llama", tie: false };
    random_llama(&sh, seed)
}

/// A random Gemma 3 text decoder (sliding, full, sliding layers; window 6, shorter than the rows).
fn gemma3(seed: u64) -> PeftModel {
    random_gemma3(seed, &[true, false, true], None)
}

fn adapter(v: serde_json::Value) -> AdapterConfig {
    AdapterConfig::from_json(&v, None).unwrap()
}

/// One step's loss, scored tokens and gradients, on the engine (`general` false) or the
/// general path, with checkpointing on or off, dropout drawn from a generator seeded 99 (also
/// returned, to compare where the step leaves it).
fn step(m: &PeftModel, b: &Batch, general: bool, ckpt: bool) -> (f64, usize, GradStore, u64) {
    let rng = Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(99)));
    engine::force_general_path(general);
    let out = loss_and_grads_with(m, b, Some(77), Some(rng.clone()), ckpt);
    engine::force_general_path(false);
    let (l, n, g) = out.unwrap_or_else(|e| panic!("[{}] {e}", e.code()));
    let after = rng.lock().unwrap().random::<u64>();
    (l, n, g, after)
}

fn flat(g: &GradStore, var: &candle_core::Var, what: &str, name: &str) -> Vec<f32> {
    g.get(var.as_tensor())
        .unwrap_or_else(|| panic!("{what}: no gradient for {name}"))
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Checkpointing on and off give the same loss, the same scored tokens, the same dropout draws
/// and every trainable gradient equal: bit for bit (`rel` = 0) or within `rel` of the
/// gradient's largest entry. Returns the checkpointed step.
fn same(what: &str, m: &PeftModel, b: &Batch, general: bool, rel: f32) -> (f64, GradStore) {
    same_with(what, m, b, general, rel, |_| false)
}

/// [`same`], where the parameters that `zero_ok` names may have a zero gradient (QA's
/// `qa_outputs.bias`: it shifts every position's logit alike, so the loss does not depend on it).
fn same_with(what: &str, m: &PeftModel, b: &Batch, general: bool, rel: f32, zero_ok: impl Fn(&str) -> bool) -> (f64, GradStore) {
    let (l0, n0, g0, r0) = step(m, b, general, false);
    let (l1, n1, g1, r1) = step(m, b, general, true);
    assert_eq!(n0, n1, "{what}: scored tokens");
    assert_eq!(r0, r1, "{what}: the step left the dropout generator elsewhere");
    if rel == 0.0 {
        assert_eq!(l0.to_bits(), l1.to_bits(), "{what}: loss {l0} vs {l1}");
    } else {
        assert!((l0 - l1).abs() <= 1e-6 * l0.abs(), "{what}: loss {l0} vs {l1}");
    }
    let params = m.trainable_parameters();
    assert!(!params.is_empty());
    for (name, var) in &params {
        let a = flat(&g0, var, what, name);
        let c = flat(&g1, var, what, name);
        let scale = a.iter().fold(0f32, |s, x| s.max(x.abs()));
        assert!(scale > 1e-7 || zero_ok(name), "{what}: gradient of {name} is zero");
        if rel == 0.0 {
            assert!(a.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: gradient of {name} is not bit-equal");
        } else {
            let diff = a.iter().zip(&c).fold(0f32, |d, (x, y)| d.max((x - y).abs()));
            assert!(diff <= rel * scale, "{what}: gradient of {name} differs by {diff} (largest entry {scale})");
        }
    }
    visible(&format!("ok {what}: {} gradients, loss {l1}", params.len()));
    (l1, g1)
}

/// The checkpointed engine step against the checkpointed general step (1e-4 relative, the
/// engine suite's bar).
fn engine_matches_general(what: &str, m: &PeftModel, b: &Batch) {
    let (le, _, ge, _) = step(m, b, false, true);
    let (lg, _, gg, _) = step(m, b, true, true);
    assert!((le - lg).abs() <= 1e-5 * lg.abs().max(1.0), "{what}: loss {le} vs {lg}");
    for (name, var) in m.trainable_parameters() {
        let a = flat(&ge, &var, what, &name);
        let c = flat(&gg, &var, what, &name);
        let scale = c.iter().fold(0f32, |s, x| s.max(x.abs())).max(1e-6);
        let diff = a.iter().zip(&c).fold(0f32, |d, (x, y)| d.max((x - y).abs()));
        assert!(diff <= 1e-4 * scale, "{what}: gradient of {name} differs by {diff} (largest entry {scale})");
    }
}

fn llama_batch(seed: u64) -> Batch {
    ragged_batch(3, 13, 97, &[(0, false), (4, true), (3, false)], seed)
}

#[test]
fn engine_lora_is_bit_equal_with_and_without() {
    let mut m = llama(1);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "init_lora_weights": false})), 2).unwrap();
    let b = llama_batch(3);
    assert!(engine::try_loss_and_grads_with(&m, &b, None, None, true).unwrap().is_some(), "the engine runs LoRA q,k,v,o with checkpointing");
    same("engine LoRA q,k,v,o + dropout", &m, &b, false, 0.0);
    engine_matches_general("LoRA q,k,v,o + dropout", &m, &b);
    // All linears, adapters only in the top layer (the backward stops below it), rsLoRA.
    let mut a = llama(4);
    a.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 3, "lora_alpha": 6, "use_rslora": true, "target_modules": "all-linear", "layers_to_transform": [2], "init_lora_weights": false})), 5).unwrap();
    same("engine LoRA all-linear, top layer only", &a, &llama_batch(6), false, 0.0);
}

#[test]
fn engine_prompt_tuning_is_bit_equal_with_and_without() {
    let mut m = llama(7);
    m.add_adapter("default", adapter(json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 5})), 8).unwrap();
    let b = ragged_batch(2, 11, 97, &[(3, true), (2, false)], 9);
    same("engine prompt tuning", &m, &b, false, 0.0);
    same("general prompt tuning", &m, &b, true, 1e-6);
    engine_matches_general("prompt tuning", &m, &b);
    let mut p = llama(10);
    p.add_adapter("default", adapter(json!({"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "encoder_hidden_size": 16})), 11).unwrap();
    same("engine P-tuning", &p, &b, false, 0.0);
    same("general P-tuning", &p, &b, true, 1e-6);
}

#[test]
fn gemma3_with_and_without() {
    let mut m = gemma3(21);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "all-linear", "init_lora_weights": false})), 22).unwrap();
    let b = ragged_batch(3, 17, 89, &[(0, false), (5, true), (3, false)], 23);
    same("gemma3 engine LoRA all-linear + dropout", &m, &b, false, 0.0);
    same("gemma3 general LoRA all-linear + dropout", &m, &b, true, 1e-6);
    engine_matches_general("gemma3 LoRA", &m, &b);
}

/// Phi-3 on the engine (fused qkv_proj / gate_up_proj, partial RoPE, longrope past the original
/// length; the HF fixture model): bit for bit with and without, and against the general path.
#[test]
fn phi3_engine_with_and_without() {
    let mut p = PeftModel::new(load_causal_lm(&fixtures_dir().join("models/phi3"), DType::F32, &Device::Cpu).unwrap().model);
    p.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "init_lora_weights": false})), 75).unwrap();
    let vocab = p.base.info().vocab_size;
    let b = ragged_batch(3, 12, vocab, &[(0, false), (3, true), (2, false)], 76);
    assert!(engine::try_loss_and_grads_with(&p, &b, None, None, true).unwrap().is_some(), "the engine runs Phi-3 LoRA with checkpointing");
    same("phi3 engine LoRA + dropout", &p, &b, false, 0.0);
    engine_matches_general("phi3 LoRA + dropout", &p, &b);
}

#[test]
fn general_path_with_and_without() {
    let b = llama_batch(31);
    // LoRA with dropout on the general path: the recomputed layers draw the same masks.
    let mut m = llama(30);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.2, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_lora_weights": false})), 32).unwrap();
    same("general LoRA + dropout", &m, &b, true, 1e-6);
    // DoRA and (IA)³ only run on the general path.
    let mut d = llama(33);
    d.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "init_lora_weights": false})), 34).unwrap();
    assert!(engine::try_loss_and_grads_with(&d, &b, None, None, true).unwrap().is_none());
    same("general DoRA", &d, &b, true, 1e-6);
    let mut i = llama(35);
    i.add_adapter("default", adapter(json!({"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"], "init_ia3_weights": false})), 36).unwrap();
    same("general IA3", &i, &b, true, 1e-6);
    // LoRA on the embedding: the input embeddings have a graph of their own.
    let mut e = llama(37);
    e.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "o_proj"], "init_lora_weights": false})), 38).unwrap();
    same("general LoRA on embed_tokens", &e, &b, true, 1e-6);
}

/// The model setting and the trainer option both turn it on; three optimizer steps (two
/// micro-batches each, dropout) follow the same loss trajectory as without it.
#[test]
fn trainer_runs_match_without_checkpointing() {
    let make = || {
        let mut m = llama(41);
        m.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "init_lora_weights": false})), 42).unwrap();
        m
    };
    let batches = [llama_batch(43), llama_batch(44)];
    let run = |m: &PeftModel, ckpt_arg: bool, general: bool| -> Vec<(u64, u64)> {
        let args = TrainingArgs { learning_rate: 1e-2, max_steps: 3, seed: 5, gradient_checkpointing: ckpt_arg, ..Default::default() };
        let mut tr = Trainer::new(m, args).unwrap();
        engine::force_general_path(general);
        let out: Vec<(u64, u64)> = (0..3).map(|_| tr.step(m, &batches).map(|o| (o.loss.to_bits(), o.grad_norm.to_bits()))).collect::<Result<_, _>>().unwrap();
        engine::force_general_path(false);
        out
    };
    let plain = run(&make(), false, false);
    assert_eq!(run(&make(), true, false), plain, "trainer option, engine: bit-equal losses and gradient norms");
    let mut on = make();
    on.set_gradient_checkpointing(true).unwrap();
    assert!(on.gradient_checkpointing());
    assert_eq!(run(&on, false, false), plain, "model setting, engine");
    let general = run(&make(), false, true);
    let general_ckpt = run(&make(), true, true);
    for (k, ((l0, _), (l1, _))) in general.iter().zip(&general_ckpt).enumerate() {
        let (l0, l1) = (f64::from_bits(*l0), f64::from_bits(*l1));
        assert!((l0 - l1).abs() <= 1e-6 * l0.abs(), "general path step {k}: loss {l0} vs {l1}");
    }
}

#[test]
fn prefix_tuning_is_refused_with_hf_text() {
    let prefix = || adapter(json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4}));
    // Adding a prefix adapter to a model with checkpointing on (HF `_setup_prompt_encoder`).
    let mut m = llama(51);
    m.set_gradient_checkpointing(true).unwrap();
    let e = m.add_adapter("default", prefix(), 52).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains("gradientCheckpointing") && e.to_string().contains(PREFIX_TEXT), "{e}");
    assert!(m.adapter_names().is_empty(), "the model is left unchanged");
    // Turning it on with a prefix adapter, a trainer asking for it, a checkpointed step.
    let mut p = llama(53);
    p.add_adapter("default", prefix(), 54).unwrap();
    let e = p.set_gradient_checkpointing(true).unwrap_err();
    assert!(e.to_string().contains(PREFIX_TEXT), "{e}");
    assert!(!p.gradient_checkpointing());
    let args = TrainingArgs { gradient_checkpointing: true, ..Default::default() };
    let e = Trainer::new(&p, args).err().expect("refused");
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains(PREFIX_TEXT), "{e}");
    for general in [false, true] {
        engine::force_general_path(general);
        let e = loss_and_grads_with(&p, &llama_batch(55), None, None, true).unwrap_err();
        engine::force_general_path(false);
        assert!(e.to_string().contains("`gradientCheckpointing`") && e.to_string().contains(PREFIX_TEXT), "{e}");
    }
    // Without it prefix tuning trains as before.
    assert!(loss_and_grads_with(&p, &llama_batch(55), None, None, false).is_ok());
}

/// Phi-3 and GPT-2 (general path only): LoRA with dropout (and GPT-2's fused `c_attn`).
#[test]
fn phi3_and_gpt2_with_and_without() {
    let load = |name: &str| PeftModel::new(load_causal_lm(&fixtures_dir().join("models").join(name), DType::F32, &Device::Cpu).unwrap().model);
    let mut p = load("phi3");
    p.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["qkv_proj", "o_proj", "gate_up_proj"], "init_lora_weights": false})), 71).unwrap();
    let vocab = p.base.info().vocab_size;
    same("phi3 general LoRA + dropout", &p, &ragged_batch(2, 12, vocab, &[(3, true)], 72), true, 1e-6);
    let mut g = load("gpt2");
    g.add_adapter("default", adapter(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["c_attn", "c_proj"], "init_lora_weights": false})), 73).unwrap();
    let vocab = g.base.info().vocab_size;
    same("gpt2 general LoRA + dropout", &g, &ragged_batch(2, 12, vocab, &[(0, false), (4, false)], 74), true, 1e-6);
}

/// A fixture model (`__test__/fixtures/models/<name>`) with the head of `task` (new heads
/// initialised from seed 42).
fn fixture(name: &str, task: Option<Task>) -> PeftModel {
    let req = LoadRequest { task, seed: 42, ..Default::default() };
    PeftModel::new(load_model(&fixtures_dir().join("models").join(name), DType::F32, &Device::Cpu, &req).unwrap_or_else(|e| panic!("{name}: [{}] {e}", e.code())).model)
}

/// A BERT-family batch of 3 rows of 9 tokens, the second padded by 4, the third by 2, with
/// segment ids (when `types`) and labels for `task`.
fn bert_batch(task: Task, vocab: usize, types: bool, seed: u64) -> Batch {
    let mut b = ragged_batch(3, 9, vocab, &[(0, false), (4, false), (2, false)], seed);
    let mut r = rand::rngs::StdRng::seed_from_u64(seed + 1);
    b.token_type_ids = types.then(|| (0..27).map(|i| u32::from(i % 9 >= 5)).collect());
    match task {
        Task::SeqCls => b.labels = vec![2, 0, 1],
        Task::TokenCls => b.labels = b.attention_mask.iter().map(|&m| if m == 0 { -100 } else { r.random_range(0..3) }).collect(),
        Task::QuestionAns => {
            b.labels = vec![];
            b.start_positions = Some(vec![1, 3, 9]); // 9 = seq_len: ignored, as HF clamps it
            b.end_positions = Some(vec![4, 4, 6]);
        }
        _ => {}
    }
    b
}

/// The BERT family on every head: LoRA with dropout (the head in `modules_to_save`, LoRA on
/// `word_embeddings` so the stack's input has a graph of its own), (IA)³ and LoHa, prompt
/// tuning; DistilBERT and RoBERTa (positions from the ids); padded rows, segment ids.
#[test]
fn bert_family_with_and_without() {
    let lora = |extra: serde_json::Value| {
        let mut v = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["word_embeddings", "query", "value", "dense"], "init_lora_weights": false});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        adapter(v)
    };
    for (task, tag) in [(Task::SeqCls, "SEQ_CLS"), (Task::TokenCls, "TOKEN_CLS"), (Task::QuestionAns, "QUESTION_ANS")] {
        let mut m = fixture("bert", Some(task));
        let head = if task == Task::QuestionAns { "qa_outputs" } else { "classifier" };
        m.add_adapter("default", lora(json!({"task_type": tag, "modules_to_save": [head]})), 81).unwrap();
        let names: Vec<String> = m.trainable_parameters().into_iter().map(|(n, _)| n).collect();
        assert!(names.iter().any(|n| n.ends_with(&format!("{head}.weight"))), "{tag}: the head copy trains: {names:?}");
        let zero_ok = |n: &str| n.ends_with("qa_outputs.bias");
        same_with(&format!("bert {tag} LoRA + dropout + modules_to_save"), &m, &bert_batch(task, 160, true, 82), true, 0.0, zero_ok);
    }
    let b = bert_batch(Task::SeqCls, 160, true, 83);
    let mut i = fixture("bert", Some(Task::SeqCls));
    i.add_adapter("default", adapter(json!({"peft_type": "IA3", "task_type": "SEQ_CLS", "target_modules": ["value", "output.dense"], "feedforward_modules": ["output.dense"], "init_ia3_weights": false})), 84).unwrap();
    same("bert IA3", &i, &b, true, 0.0);
    let mut h = fixture("bert", Some(Task::SeqCls));
    h.add_adapter("default", adapter(json!({"peft_type": "LOHA", "task_type": "SEQ_CLS", "r": 4, "alpha": 8, "target_modules": ["value", "intermediate.dense"], "init_weights": false})), 85).unwrap();
    same("bert LoHa", &h, &b, true, 0.0);
    let mut p = fixture("bert", Some(Task::SeqCls));
    p.add_adapter("default", adapter(json!({"peft_type": "PROMPT_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": 3})), 86).unwrap();
    same("bert prompt tuning", &p, &b, true, 0.0);
    for name in ["distilbert", "roberta"] {
        let mut m = fixture(name, Some(Task::SeqCls));
        let vocab = m.base.info().vocab_size;
        let targets = if name == "distilbert" { json!(["q_lin", "v_lin", "lin1"]) } else { json!(["query", "value", "dense"]) };
        m.add_adapter("default", adapter(json!({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": targets, "init_lora_weights": false})), 87).unwrap();
        let mut b = bert_batch(Task::SeqCls, vocab, false, 88);
        if name == "roberta" {
            // RoBERTa's positions come from the ids: padding must be its pad id.
            let pad = m.base.info().pad_token_id.unwrap();
            for (id, &mask) in b.input_ids.iter_mut().zip(&b.attention_mask) {
                if mask == 0 {
                    *id = pad;
                } else if *id == pad {
                    *id = pad + 2;
                }
            }
        }
        same(&format!("{name} LoRA + dropout"), &m, &b, true, 0.0);
    }
}

/// A T5 batch: 2 encoder rows of 9 tokens (the second padded by 3), labels of 6 (the first
/// row's last 2 ignored with -100), decoder inputs shifted from them.
fn t5_batch(seed: u64) -> Batch {
    let mut b = ragged_batch(2, 9, 128, &[(0, false), (3, false)], seed);
    let mut r = rand::rngs::StdRng::seed_from_u64(seed + 1);
    b.labels = (0..12).map(|i| if i == 4 || i == 5 { -100 } else { r.random_range(2..128) }).collect();
    b
}

/// T5: the decoder's cross-attention reads the encoder output in every layer; its gradient
/// sums over the recomputed decoder layers and flows back through the encoder's stack. LoRA
/// with dropout on both stacks (self- and cross-attention, feed-forward) with `lm_head` in
/// `modules_to_save`, (IA)³, LoHa, prompt tuning (virtual tokens before the encoder input).
#[test]
fn t5_with_and_without() {
    let b = t5_batch(91);
    let mut m = fixture("t5", None);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q", "k", "v", "o", "wi"], "modules_to_save": ["lm_head"], "init_lora_weights": false})), 92).unwrap();
    let names: Vec<String> = m.trainable_parameters().into_iter().map(|(n, _)| n).collect();
    for part in ["encoder.block.0.layer.0", "decoder.block.1.layer.1.EncDecAttention.k", "lm_head"] {
        assert!(names.iter().any(|n| n.contains(part)), "{part} trains: {names:?}");
    }
    same("t5 LoRA + dropout + modules_to_save lm_head", &m, &b, true, 1e-6);
    let mut i = fixture("t5", None);
    i.add_adapter("default", adapter(json!({"peft_type": "IA3", "task_type": "SEQ_2_SEQ_LM", "target_modules": ["k", "v", "wo"], "feedforward_modules": ["wo"], "init_ia3_weights": false})), 93).unwrap();
    same("t5 IA3", &i, &b, true, 1e-6);
    let mut h = fixture("t5", None);
    h.add_adapter("default", adapter(json!({"peft_type": "LOHA", "task_type": "SEQ_2_SEQ_LM", "r": 4, "alpha": 8, "target_modules": ["q", "v"], "init_weights": false})), 94).unwrap();
    same("t5 LoHa", &h, &b, true, 1e-6);
    let mut p = fixture("t5", None);
    p.add_adapter("default", adapter(json!({"peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 3})), 95).unwrap();
    same("t5 prompt tuning", &p, &b, true, 1e-6);
}

/// Sequence classification on a decoder (last non-pad token pooled) through the general driver.
#[test]
fn llama_seq_cls_with_and_without() {
    let mut m = fixture("llama_seqcls", None);
    assert_eq!(m.base.task(), Task::SeqCls);
    m.add_adapter("default", adapter(json!({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": false})), 96).unwrap();
    let vocab = m.base.info().vocab_size;
    let mut b = ragged_batch(3, 8, vocab, &[(0, false), (3, false), (2, false)], 97);
    let pad = m.base.info().pad_token_id.unwrap();
    for (id, &mask) in b.input_ids.iter_mut().zip(&b.attention_mask) {
        if mask == 0 {
            *id = pad;
        } else if *id == pad {
            *id = pad + 1;
        }
    }
    b.labels = vec![1, 0, 1];
    same("llama SEQ_CLS LoRA", &m, &b, true, 1e-6);
}

/// Prefix tuning stays refused with HF's text on BERT and T5; the trainer refuses at its step,
/// before any update.
#[test]
fn prefix_tuning_on_bert_and_t5_is_refused() {
    for (name, task, b) in [("bert", Some(Task::SeqCls), bert_batch(Task::SeqCls, 160, false, 98)), ("t5", None, t5_batch(99))] {
        let mut m = fixture(name, task);
        let tt = if name == "t5" { "SEQ_2_SEQ_LM" } else { "SEQ_CLS" };
        m.add_adapter("default", adapter(json!({"peft_type": "PREFIX_TUNING", "task_type": tt, "num_virtual_tokens": 3})), 100).unwrap();
        let e = loss_and_grads_with(&m, &b, None, None, true).unwrap_err();
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
        assert!(e.to_string().contains("`gradientCheckpointing`") && e.to_string().contains(PREFIX_TEXT), "{name}: {e}");
        let mut tr = Trainer::new(&m, TrainingArgs::default()).unwrap();
        assert!(m.set_gradient_checkpointing(true).is_err());
        let args = TrainingArgs { gradient_checkpointing: true, ..Default::default() };
        assert!(Trainer::new(&m, args).is_err());
        assert!(tr.step(&m, std::slice::from_ref(&b)).is_ok(), "{name}: without it prefix tuning trains");
    }
}
