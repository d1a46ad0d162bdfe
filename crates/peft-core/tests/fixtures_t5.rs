//! T5 (`T5ForConditionalGeneration`) and the seq2seq PEFT path against HF PEFT 0.21's golden
//! fixture `t5_prefix` (PREFIX_TUNING / SEQ_2_SEQ_LM, 5 virtual tokens): base and adapter
//! logits, the per-decoder-layer prefixes, greedy generation, byte-identical re-saved files.
//! Plus the rules that have no fixture: padded batches (encoder and decoder padding) equal rows
//! run alone, generation with the cache equals generation without it, LoRA (`q`, `v`) training,
//! merge/unmerge and save/reload, prompt tuning and prefix tuning training.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use peft_core::generate::{generate, GenerateOptions};
use peft_core::model::ForwardOptions;
use peft_core::peft_model::PeftModel;
use peft_core::train::{loss_and_grads, Batch, Trainer, TrainingArgs};
use peft_core::tuners::AdapterConfig;
use serde_json::json;

const CASE: &str = "t5_prefix";

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn config(v: serde_json::Value) -> AdapterConfig {
    AdapterConfig::from_json(&v, None).unwrap_or_else(|e| panic!("config: [{}] {e}", e.code()))
}

/// Forward `[b, s]` encoder ids (mask) and `[b, t]` decoder ids (optional decoder mask).
fn fwd(m: &PeftModel, ids: &[u32], b: usize, mask: Option<Vec<u8>>, dec: &[u32], dec_mask: Option<Vec<u8>>) -> Tensor {
    let s = ids.len() / b;
    let opts = ForwardOptions { attention_mask: mask, decoder_input_ids: Some(dec.to_vec()), decoder_attention_mask: dec_mask, ..Default::default() };
    m.forward(ids, b, s, &opts, None).unwrap_or_else(|e| panic!("forward: [{}] {e}", e.code()))
}

/// The fixture batch: `input_ids` / `attention_mask` `[2, 7]` (row 1 right-padded by 2) and
/// `decoder_input_ids` `[2, 5]`.
fn fixture_logits(m: &PeftModel, exp: &Expected) -> Tensor {
    let (ids, b, _) = exp.ids("input_ids");
    let (dec, _, _) = exp.ids("decoder_input_ids");
    fwd(m, &ids, b, Some(exp.mask("attention_mask")), &dec, None)
}

fn check(what: &str, m: &PeftModel, exp: &Expected, key: &str) -> f64 {
    let (atol, rtol) = logits_tol(CASE);
    assert_close(&format!("{CASE} {what} ({key})"), &fixture_logits(m, exp), exp.get(key), atol, rtol)
}

fn gen_opts(use_cache: bool) -> GenerateOptions {
    GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![], pad_token_id: 0, use_cache, ..Default::default() }
}

fn gen(m: &PeftModel, ids: &[u32], b: usize, mask: Option<Vec<u8>>, o: &GenerateOptions) -> Vec<Vec<u32>> {
    generate(m, ids, b, ids.len() / b, mask, None, o, &|| false).unwrap_or_else(|e| panic!("generate: [{}] {e}", e.code()))
}

#[test]
fn t5_loads_with_transformers_module_names() {
    let m = base_peft(CASE);
    let info = m.base.info();
    assert_eq!(
        (info.architecture.as_str(), info.hidden_size, info.num_hidden_layers, info.num_attention_heads, info.head_dim, info.decoder_start_token_id),
        ("T5ForConditionalGeneration", 64, 2, 4, 16, Some(0))
    );
    assert_eq!(info.eos_token_id, vec![1]);
    let names: Vec<String> = m.base.named_linears().into_iter().map(|(n, l)| format!("{n}:{}x{}", l.in_features(), l.out_features())).collect();
    assert_eq!(&names[..6], &[
        "encoder.block.0.layer.0.SelfAttention.q:64x64", "encoder.block.0.layer.0.SelfAttention.k:64x64",
        "encoder.block.0.layer.0.SelfAttention.v:64x64", "encoder.block.0.layer.0.SelfAttention.o:64x64",
        "encoder.block.0.layer.1.DenseReluDense.wi:64x128", "encoder.block.0.layer.1.DenseReluDense.wo:128x64",
    ]);
    let dec0: Vec<&String> = names.iter().filter(|n| n.starts_with("decoder.block.0.")).collect();
    assert_eq!(dec0.len(), 10);
    assert_eq!(dec0[4], "decoder.block.0.layer.1.EncDecAttention.q:64x64");
    assert_eq!(dec0[9], "decoder.block.0.layer.2.DenseReluDense.wo:128x64");
    assert_eq!(names.last().unwrap(), "lm_head:64x128");
    assert_eq!(names.len(), 2 * 6 + 2 * 10 + 1);
    // named_parameters with tied shared/lm_head: shared, per encoder block 4 attn + 2 ff + 2
    // norms, per decoder block 8 attn + 2 ff + 3 norms, 2 bias tables, 2 final norms.
    let enc = 4 * 64 * 64 + 2 * 64 * 128 + 2 * 64;
    let dec = 8 * 64 * 64 + 2 * 64 * 128 + 3 * 64;
    assert_eq!(m.base.base_param_count(), 128 * 64 + 2 * enc + 2 * dec + 2 * 8 * 4 + 2 * 64);
    let modules = m.base.module_names();
    for want in ["shared", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias", "decoder.block.1.layer.1.EncDecAttention.k", "decoder.final_layer_norm"] {
        assert!(modules.iter().any(|n| n == want), "module_names lacks {want}");
    }
}

#[test]
fn base_logits_match_hf() {
    let exp = Expected::load(CASE);
    let d = check("base model", &base_peft(CASE), &exp, "logits_base");
    visible(&format!("ok {CASE}: base logits max abs diff {d:.3e}"));
}

#[test]
fn prefix_adapter_logits_and_prefixes_match_hf() {
    let exp = Expected::load(CASE);
    let mut m = adapter_peft(CASE, false);
    let d = check("prefix adapter", &m, &exp, "logits_adapter");
    let cfg = m.peft_config("default").unwrap().as_prompt().unwrap().clone();
    assert_eq!((cfg.num_transformer_submodules, cfg.num_layers, cfg.token_dim), (Some(2), Some(2), Some(64)));
    let kv = m.prefix_key_values(&cfg, m.prompt_encoder("default").unwrap(), 1, false, None).unwrap();
    assert_eq!(kv.len(), 2, "one prefix per decoder layer");
    for (l, (k, v)) in kv.iter().enumerate() {
        assert_eq!(k.dims(), &[1, 4, 5, 16]);
        assert_close(&format!("{CASE} prefix_kv.{l}.key"), k, exp.get(&format!("prefix_kv.{l}.key")), 0.0, 0.0);
        assert_close(&format!("{CASE} prefix_kv.{l}.value"), v, exp.get(&format!("prefix_kv.{l}.value")), 0.0, 0.0);
    }
    m.set_disabled(true).unwrap();
    check("disabled adapter", &m, &exp, "logits_base");
    m.set_disabled(false).unwrap();
    check("re-enabled adapter", &m, &exp, "logits_adapter");
    visible(&format!("ok {CASE}: adapter logits max abs diff {d:.3e}; prefix_kv identical (layer l uses chunks (4l mod 2L, +1))"));
}

#[test]
fn generate_matches_hf_with_and_without_cache() {
    let exp = Expected::load(CASE);
    let (ids, b, _) = exp.ids("generate_input_ids");
    let mut m = adapter_peft(CASE, false);
    for use_cache in [true, false] {
        assert_eq!(gen(&m, &ids, b, None, &gen_opts(use_cache)), exp.rows_u32("generate_adapter"), "prefix adapter, use_cache {use_cache}");
    }
    m.set_disabled(true).unwrap();
    for use_cache in [true, false] {
        assert_eq!(gen(&m, &ids, b, None, &gen_opts(use_cache)), exp.rows_u32("generate_base"), "disabled adapter, use_cache {use_cache}");
    }
    let base = base_peft(CASE);
    assert_eq!(gen(&base, &ids, b, None, &gen_opts(true)), exp.rows_u32("generate_base"), "base model");
    visible(&format!("ok {CASE}: greedy decoder ids == HF's generate_adapter / generate_base (cache on and off)"));
}

#[test]
fn resaved_prefix_adapter_is_byte_identical() {
    let exp = Expected::load(CASE);
    let m = adapter_peft(CASE, false);
    let out = temp_dir("t5-prefix-rt");
    m.save_pretrained(&out, None).unwrap_or_else(|e| panic!("save_pretrained: [{}] {e}", e.code()));
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        let ours = std::fs::read(out.join(f)).unwrap();
        let theirs = std::fs::read(case_dir(CASE).join(f)).unwrap();
        assert!(ours == theirs, "written {f} is not byte-identical to HF's\n{}", String::from_utf8_lossy(&ours[..ours.len().min(800)]));
    }
    for trainable in [false, true] {
        let mut back = base_peft(CASE);
        back.load_adapter(&out, "default", trainable, None).unwrap();
        check(&format!("reloaded (is_trainable {trainable})"), &back, &exp, "logits_adapter");
    }
    remove_dir(&out);
    visible(&format!("ok {CASE}: adapter_model.safetensors and adapter_config.json byte-identical; reload reproduces logits"));
}

fn lora_qv() -> AdapterConfig {
    config(json!({"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], "init_lora_weights": false}))
}

fn prompt_tuning() -> AdapterConfig {
    config(json!({"peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 3}))
}

/// The base model, LoRA on q/v, the fixture's prefix adapter, prompt tuning: one model each.
fn variants() -> Vec<(&'static str, PeftModel)> {
    let mut lora = base_peft(CASE);
    lora.add_adapter("default", lora_qv(), 7).unwrap();
    let mut pt = base_peft(CASE);
    pt.add_adapter("default", prompt_tuning(), 7).unwrap();
    vec![("base", base_peft(CASE)), ("lora", lora), ("prefix", adapter_peft(CASE, false)), ("prompt", pt)]
}

/// Encoder padding (row 1 of the fixture batch has 2 pads) and decoder padding (a shorter,
/// right-padded target with `decoder_attention_mask`) leave each row's logits as when it runs
/// alone, for the base model and every adapter kind.
#[test]
fn padded_batch_rows_equal_rows_alone() {
    let exp = Expected::load(CASE);
    let (ids, b, s) = exp.ids("input_ids");
    let mask = exp.mask("attention_mask");
    let (dec, _, t) = exp.ids("decoder_input_ids");
    // Row 1's decoder input is cut to 3 tokens and right-padded with 2 pads.
    let mut dec_p = dec.clone();
    dec_p[t + 3] = 0;
    dec_p[t + 4] = 0;
    let dec_mask: Vec<u8> = vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0];
    let mut worst = 0f64;
    for (tag, m) in variants() {
        let both = fwd(&m, &ids, b, Some(mask.clone()), &dec_p, Some(dec_mask.clone()));
        let n1 = mask[s..].iter().filter(|&&x| x == 1).count();
        let r0 = fwd(&m, &ids[..s], 1, None, &dec[..t], None);
        let r1 = fwd(&m, &ids[s..s + n1], 1, None, &dec[t..t + 3], None);
        let d0 = max_diff(&both.narrow(0, 0, 1).unwrap(), &r0);
        let d1 = max_diff(&both.narrow(0, 1, 1).unwrap().narrow(1, 0, 3).unwrap(), &r1);
        assert!(d0 < 1e-5 && d1 < 1e-5, "{tag}: padded batch rows differ from rows alone: {d0:e}, {d1:e}");
        worst = worst.max(d0).max(d1);
        // The decoder mask matters: without it the padded row's real positions still match
        // (causal), and with an unmasked pad inside the sequence they would not.
        let mut dec_mid = dec_p.clone();
        dec_mid.swap(t + 1, t + 4); // a pad in the middle of row 1
        let mut mid_mask = dec_mask.clone();
        mid_mask.swap(t + 1, t + 4);
        let masked = fwd(&m, &ids, b, Some(mask.clone()), &dec_mid, Some(mid_mask));
        let unmasked = fwd(&m, &ids, b, Some(mask.clone()), &dec_mid, None);
        let last = |x: &Tensor| x.narrow(0, 1, 1).unwrap().narrow(1, 4, 1).unwrap();
        assert!(max_diff(&last(&masked), &last(&unmasked)) > 1e-4, "{tag}: decoder_attention_mask has no effect");
    }
    visible(&format!("ok padded batches (encoder + decoder padding) == rows alone for base, LoRA, prefix, prompt tuning: max diff {worst:.2e}"));
}

/// Generation with the cache equals generation without it: greedy and sampled, a padded batch
/// of 2 prompts, base / LoRA / prefix / prompt tuning; EOS stops rows and pads finished ones.
#[test]
fn generation_with_cache_equals_without() {
    let exp = Expected::load(CASE);
    let (ids, b, _) = exp.ids("input_ids");
    let mask = exp.mask("attention_mask");
    for (tag, m) in variants() {
        for sample in [false, true] {
            let mut o = gen_opts(true);
            o.max_new_tokens = 8;
            o.do_sample = sample;
            o.temperature = 0.8;
            o.top_k = 20;
            o.seed = 11;
            let cached = gen(&m, &ids, b, Some(mask.clone()), &o);
            o.use_cache = false;
            let full = gen(&m, &ids, b, Some(mask.clone()), &o);
            assert_eq!(cached, full, "{tag} (sample {sample}): cache changes the result");
            assert!(cached.iter().all(|r| r.len() == 9 && r[0] == 0), "{tag}: rows are [decoder_start, 8 tokens]: {cached:?}");
        }
        // EOS: take the token greedy decoding produces second for row 0 as "EOS"; the row stops
        // at its first occurrence and is padded after it.
        let greedy = gen(&m, &ids, b, Some(mask.clone()), &gen_opts(true));
        let eos = greedy[0][2];
        let stop = 1 + greedy[0][1..].iter().position(|&x| x == eos).unwrap();
        let mut o = gen_opts(true);
        o.eos_token_ids = vec![eos];
        o.pad_token_id = 0;
        for use_cache in [true, false] {
            o.use_cache = use_cache;
            let stopped = gen(&m, &ids, b, Some(mask.clone()), &o);
            assert_eq!(&stopped[0][..=stop], &greedy[0][..=stop], "{tag}");
            assert!(stopped[0][stop + 1..].iter().all(|&x| x == 0), "{tag}: finished row not padded: {:?}", stopped[0]);
        }
    }
    visible("ok generate: cache == no cache (greedy and sampled) for base, LoRA, prefix, prompt tuning; EOS stops and pads rows");
}

fn train_batch() -> Batch {
    // Encoder: two rows, the second right-padded; targets [b, 4] with -100 on row 1's padding.
    let ids: Vec<u32> = vec![5, 17, 33, 9, 120, 44, 7, 81, 12, 100, 64, 3, 0, 0];
    let mask: Vec<u8> = vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0];
    let labels: Vec<i64> = vec![44, 9, 33, 1, 64, 12, 1, -100];
    Batch { input_ids: ids, attention_mask: mask, labels, batch_size: 2, seq_len: 7, ..Default::default() }
}

fn assert_all_grads(tag: &str, m: &PeftModel, batch: &Batch) {
    let (_, _, grads) = loss_and_grads(m, batch, None, None).unwrap();
    let params = m.trainable_parameters();
    assert!(!params.is_empty(), "{tag}: no trainable parameters");
    for (name, var) in params {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{tag}: no gradient for {name}"));
        let s = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(s > 0.0, "{tag}: zero gradient for {name}");
    }
}

fn train(tag: &str, m: &PeftModel, batch: &Batch, lr: f64) -> (f64, f64) {
    let args = TrainingArgs { learning_rate: lr, max_steps: 30, max_grad_norm: 1.0, seed: 1, ..Default::default() };
    let mut tr = Trainer::new(m, args).unwrap();
    let losses: Vec<f64> = (0..30).map(|_| tr.step(m, std::slice::from_ref(batch)).unwrap().loss).collect();
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < first * 0.8, "{tag}: loss did not fall enough: {first:.4} -> {last:.4} ({losses:?})");
    (first, last)
}

fn batch_logits(m: &PeftModel, batch: &Batch) -> Tensor {
    let dec = peft_core::train::shift_right(&batch.labels, batch.batch_size, 0, 0);
    fwd(m, &batch.input_ids, batch.batch_size, Some(batch.attention_mask.clone()), &dec, None)
}

/// LoRA on `q`/`v` with SEQ_2_SEQ_LM: every LoRA matrix (encoder self-attention, decoder
/// self- and cross-attention) gets a gradient, the Trainer's loss falls over 30 AdamW steps,
/// merge/unmerge are exact and save + reload gives the trained logits.
#[test]
fn lora_seq2seq_trains_merges_and_reloads() {
    let batch = train_batch();
    let mut m = base_peft(CASE);
    let targeted = m.add_adapter("default", lora_qv(), 3).unwrap();
    assert_eq!(targeted.len(), 2 * 2 + 2 * 4, "q and v of every SelfAttention and EncDecAttention: {targeted:?}");
    assert_all_grads("lora", &m, &batch);
    let (first, last) = train("lora", &m, &batch, 1e-2);
    let before = batch_logits(&m, &batch);
    let weights: Vec<Tensor> = m.base.named_linears().into_iter().map(|(_, l)| l.weight.copy().unwrap()).collect();
    m.merge_adapter(None, true).unwrap();
    let merged = batch_logits(&m, &batch);
    let dm = max_diff(&before, &merged);
    assert!(dm < 1e-4, "merged logits differ by {dm}");
    m.unmerge_adapter().unwrap();
    let dw = m.base.named_linears().into_iter().zip(&weights).map(|((_, l), w)| max_diff(&l.weight, w)).fold(0.0, f64::max);
    assert!(dw < 1e-6, "unmerge left the weights off by {dw}");
    let du = max_diff(&batch_logits(&m, &batch), &before);
    assert!(du < 1e-5, "unmerged logits differ by {du}");
    let out = temp_dir("t5-lora");
    m.save_pretrained(&out, None).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "SEQ_2_SEQ_LM");
    let mut back = base_peft(CASE);
    back.load_adapter(&out, "default", false, None).unwrap();
    let dr = max_diff(&batch_logits(&back, &batch), &before);
    assert!(dr <= 1e-6, "reloaded logits differ by {dr}");
    remove_dir(&out);
    visible(&format!("ok LoRA q,v SEQ_2_SEQ_LM: loss {first:.4} -> {last:.4} in 30 steps; merged logits diff {dm:.1e}; unmerge weight diff {dw:.1e}, logits diff {du:.1e}; reload diff {dr:.1e}"));
}

/// Prompt tuning (virtual tokens before the encoder input) and prefix tuning (decoder
/// self-attention prefixes) train: gradients reach the prompt table, the loss falls, reload
/// reproduces the logits.
#[test]
fn prompt_and_prefix_tuning_train() {
    let batch = train_batch();
    let methods = [
        ("prompt_tuning", prompt_tuning()),
        ("prefix_tuning", config(json!({"peft_type": "PREFIX_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 4}))),
        ("p_tuning", config(json!({"peft_type": "P_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 3, "encoder_hidden_size": 32}))),
    ];
    for (tag, c) in methods {
        let mut m = base_peft(CASE);
        m.add_adapter("default", c, 5).unwrap();
        assert_eq!(m.label_prefix_len(), 0, "{tag}: seq2seq logits have no virtual positions");
        assert_all_grads(tag, &m, &batch);
        let (first, last) = train(tag, &m, &batch, 1e-1);
        let out = temp_dir(&format!("t5-{tag}"));
        m.save_pretrained(&out, None).unwrap();
        let mut back = base_peft(CASE);
        back.load_adapter(&out, "default", false, None).unwrap();
        let d = max_diff(&batch_logits(&back, &batch), &batch_logits(&m, &batch));
        assert!(d <= 1e-5, "{tag}: reloaded logits differ by {d}");
        remove_dir(&out);
        visible(&format!("ok {tag} SEQ_2_SEQ_LM: loss {first:.4} -> {last:.4} in 30 steps; reload diff {d:.1e}"));
    }
}

/// Seq2seq rules: decoder ids are required; a CAUSAL_LM prompt config and multitask prompt
/// tuning are refused on T5 with their reasons; a SEQ_2_SEQ_LM config on a decoder-only model
/// is still refused.
#[test]
fn seq2seq_rules_and_errors() {
    let m = base_peft(CASE);
    let opts = ForwardOptions::default();
    let e = m.forward(&[5, 6, 7], 1, 3, &opts, None).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains("decoderInputIds"), "{e}");
    let e = fwd_err(&m, &[5, 6, 7], &[0, 200]);
    assert!(e.contains("decoderInputIds") && e.contains("200"), "{e}");
    let mut m2 = base_peft(CASE);
    let e = m2.add_adapter("default", config(json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4})), 1).unwrap_err();
    assert!(e.to_string().contains("CAUSAL_LM"), "{e}");
    let e = m2.add_adapter("default", config(json!({"peft_type": "MULTITASK_PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 4, "num_tasks": 2})), 1).unwrap_err();
    assert!(e.to_string().contains("MULTITASK_PROMPT_TUNING"), "{e}");
    let mut llama = base_peft("llama_prefix");
    let e = llama.add_adapter("default", config(json!({"peft_type": "PREFIX_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 4})), 1).unwrap_err();
    assert!(e.to_string().contains("decoder-only"), "{e}");
    let mut mask_err = ForwardOptions { decoder_input_ids: Some(vec![0, 5]), decoder_attention_mask: Some(vec![1, 1, 1]), ..Default::default() };
    let e = m.forward(&[5, 6, 7], 1, 3, &mask_err, None).unwrap_err();
    assert!(e.to_string().contains("decoderAttentionMask"), "{e}");
    mask_err.decoder_attention_mask = None;
    mask_err.attention_mask = Some(vec![1, 1]);
    let e = m.forward(&[5, 6, 7], 1, 3, &mask_err, None).unwrap_err();
    assert!(e.to_string().contains("attentionMask"), "{e}");
}

fn fwd_err(m: &PeftModel, ids: &[u32], dec: &[u32]) -> String {
    let opts = ForwardOptions { decoder_input_ids: Some(dec.to_vec()), ..Default::default() };
    m.forward(ids, 1, ids.len(), &opts, None).unwrap_err().to_string()
}

/// `scale_decoder_outputs: true` (original T5 configs) multiplies the decoder output by
/// `d_model^-0.5` before the (linear, bias-free) `lm_head`: the logits are HF's unscaled ones / 8.
#[test]
fn scale_decoder_outputs_is_honoured() {
    use peft_core::model::{BaseModel, T5Config, T5ForConditionalGeneration};
    let exp = Expected::load(CASE);
    let dir = fixtures_dir().join("models/t5");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    v["scale_decoder_outputs"] = true.into();
    let cfg = T5Config::from_json(&v, &dir.join("config.json")).unwrap();
    let t = peft_core::model::loader::load_folder_weights(&dir, &candle_core::Device::Cpu).unwrap();
    let model = T5ForConditionalGeneration::from_tensors(cfg, t, DType::F32, &candle_core::Device::Cpu).unwrap();
    assert!(model.config.scale_decoder_outputs);
    let m = PeftModel::new(Box::new(model) as Box<dyn BaseModel>);
    let want = (exp.get("logits_base") * (1.0 / 8.0)).unwrap();
    let d = assert_close("scale_decoder_outputs: logits_base / 8", &fixture_logits(&m, &exp), &want, 1e-5, 1e-4);
    visible(&format!("ok scale_decoder_outputs=true: logits == HF's / sqrt(d_model) (max diff {d:.1e})"));
}

/// Mixed batches (one adapter per row, `__base__` = none) give each row its single adapter's
/// logits; (IA)³ on `k`, `v`, `wo` (feed-forward) trains every vector and merges exactly.
#[test]
fn mixed_batch_rows_and_ia3() {
    let exp = Expected::load(CASE);
    let (ids, _, s) = exp.ids("input_ids");
    let (dec, _, t) = exp.ids("decoder_input_ids");
    let mut m = base_peft(CASE);
    m.add_adapter("a", lora_qv(), 1).unwrap();
    m.add_adapter("b", config(json!({"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "r": 2, "target_modules": ["k", "o", "wo"], "init_lora_weights": false})), 2).unwrap();
    let ids3: Vec<u32> = [&ids[..s], &ids[..s], &ids[..s]].concat();
    let dec3: Vec<u32> = [&dec[..t], &dec[..t], &dec[..t]].concat();
    let rows = vec![Some("a".to_string()), Some("b".to_string()), None];
    let opts = ForwardOptions { decoder_input_ids: Some(dec3), adapter_rows: Some(std::sync::Arc::new(rows)), ..Default::default() };
    let mixed = m.forward(&ids3, 3, s, &opts, None).unwrap();
    let mut worst = 0f64;
    for (r, name) in [(0, Some("a")), (1, Some("b")), (2, None)] {
        match name {
            Some(n) => {
                m.set_disabled(false).unwrap();
                m.set_adapter(&[n.to_string()]).unwrap();
            }
            None => m.set_disabled(true).unwrap(),
        }
        let single = fwd(&m, &ids[..s], 1, None, &dec[..t], None);
        let d = max_diff(&mixed.narrow(0, r, 1).unwrap(), &single);
        assert!(d < 1e-5, "row {r} ({name:?}) differs from its adapter alone by {d}");
        worst = worst.max(d);
    }
    let mut ia3 = base_peft(CASE);
    let cfg = config(json!({"peft_type": "IA3", "task_type": "SEQ_2_SEQ_LM", "target_modules": ["k", "v", "wo"], "feedforward_modules": ["wo"], "init_ia3_weights": false}));
    let targeted = ia3.add_adapter("default", cfg, 4).unwrap();
    assert_eq!(targeted.len(), 2 * 3 + 2 * 5, "{targeted:?}");
    assert_all_grads("ia3", &ia3, &train_batch());
    let before = batch_logits(&ia3, &train_batch());
    ia3.merge_adapter(None, true).unwrap();
    let dm = max_diff(&batch_logits(&ia3, &train_batch()), &before);
    assert!(dm < 1e-4, "IA3 merged logits differ by {dm}");
    ia3.unmerge_adapter().unwrap();
    let du = max_diff(&batch_logits(&ia3, &train_batch()), &before);
    assert!(du < 1e-5, "IA3 unmerged logits differ by {du}");
    visible(&format!("ok mixed batch rows == single adapters (max diff {worst:.1e}); IA3 k/v/wo: grads everywhere, merged diff {dm:.1e}, unmerged {du:.1e}"));
}

/// The model runs in bfloat16 (weights, activations; scores, position bias and masks in f32):
/// its logits stay within bf16 rounding of HF's fp32 ones.
#[test]
fn bf16_forward_stays_close_to_f32() {
    let exp = Expected::load(CASE);
    let loaded = peft_core::model::loader::load_causal_lm(&fixtures_dir().join("models/t5"), DType::BF16, &candle_core::Device::Cpu).unwrap();
    let m = PeftModel::new(loaded.model);
    let got = fixture_logits(&m, &exp).to_dtype(DType::F32).unwrap();
    let want = exp.get("logits_base");
    let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() as f64;
    let d = max_diff(&got, want);
    assert!(d < 0.05 * scale, "bf16 logits differ by {d} (max |logit| {scale})");
    visible(&format!("ok bf16 forward: max diff {d:.3e} vs fp32 reference (max |logit| {scale:.3})"));
}

/// transformers 5 ties T5's `encoder.embed_tokens`, `decoder.embed_tokens` and `lm_head` to
/// `shared` whatever config.json's `tie_word_embeddings` says, unless the checkpoint holds the
/// module's own table with other values (`make_t5_tie_fixtures.py`: a v1.1-style config with its
/// own `lm_head` and a duplicate encoder table equal to `shared`; a default config with an
/// encoder table of its own). Base logits, HF's `num_parameters()`, which modules are tied, and a
/// LoRA on `embed_tokens`: adapter, merged (a merge into a tied table reaches every module tied to
/// it, and only those) and unmerged logits, and the byte-identical re-save.
#[test]
fn t5_ties_embedding_modules_as_transformers_5_does() {
    for case in ["t5_v11_lora_emb", "t5_own_encoder_table_lora_emb"] {
        let exp = Expected::load(case);
        let cj = case_json(case);
        let base = base_peft(case);
        check(&format!("{case} base"), &base, &exp, "logits_base");
        assert_eq!(base.base.base_param_count() as u64, cj["base_num_parameters"].as_u64().unwrap(), "{case}: HF's num_parameters()");
        let mut tied = base.base.tied_to_input_embedding();
        tied.sort();
        let mut want: Vec<String> = cj["tied_to_shared"].as_object().unwrap().iter().filter(|(_, v)| v.as_bool() == Some(true)).map(|(k, _)| k.clone()).collect();
        want.sort();
        assert_eq!(tied, want, "{case}: the modules tied to `shared`");
        let mut m = adapter_peft(case, false);
        check(&format!("{case} adapter"), &m, &exp, "logits_adapter");
        m.merge_adapter(None, true).unwrap();
        check(&format!("{case} merged"), &m, &exp, "logits_merged");
        m.unmerge_adapter().unwrap();
        check(&format!("{case} unmerged"), &m, &exp, "logits_unmerged");
        resave_case(case);
    }
}
