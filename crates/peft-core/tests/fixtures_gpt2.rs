//! GPT-2 (`GPT2LMHeadModel`) against HF PEFT 0.21's golden fixtures `gpt2_lora_c_attn` (LoRA on
//! the fused Conv1D `c_attn`, `fan_in_fan_out`, loss + gradients) and `gpt2_lora_bias` (LoRA on
//! c_attn / c_fc with `bias="lora_only"`: saved biases replace the base biases, also when the
//! adapter is disabled), plus GPT-2 rules that have no fixture: the `fan_in_fan_out` warning,
//! the one-bias-adapter rule, `bias="all"` training and saving, prompt and prefix tuning.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use peft_core::generate::{generate, GenerateOptions};
use peft_core::model::ForwardOptions;
use peft_core::peft_model::PeftModel;
use peft_core::train::{loss_and_grads, Batch, Trainer, TrainingArgs};
use peft_core::tuners::AdapterConfig;
use serde_json::json;
use std::collections::BTreeSet;

const CASES: [&str; 2] = ["gpt2_lora_c_attn", "gpt2_lora_bias"];

fn gen(m: &PeftModel, exp: &Expected, use_cache: bool) -> Vec<Vec<u32>> {
    let (ids, b, s) = exp.ids("generate_input_ids");
    let opts = GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![], pad_token_id: 0, use_cache, ..Default::default() };
    generate(m, &ids, b, s, None, None, &opts, &|| false).unwrap_or_else(|e| panic!("generate: [{}] {e}", e.code()))
}

fn check_generate(what: &str, m: &PeftModel, exp: &Expected, key: &str) {
    let want = exp.rows_u32(key);
    for use_cache in [true, false] {
        assert_eq!(gen(m, exp, use_cache), want, "{} {what}: generate(use_cache={use_cache}) != `{key}`", exp.case);
    }
    visible(&format!("ok {} {what}: generate == {key} (use_cache true and false)", exp.case));
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn lora(v: serde_json::Value) -> AdapterConfig {
    AdapterConfig::from_json(&v, None).unwrap_or_else(|e| panic!("config: [{}] {e}", e.code()))
}

fn train_batch() -> Batch {
    let ids: Vec<u32> = vec![5, 17, 33, 9, 120, 44, 7, 81, 12, 150, 64, 3, 0, 0];
    let mask: Vec<u8> = vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0];
    let labels = ids.iter().zip(&mask).map(|(&i, &m)| if m == 0 { -100 } else { i as i64 }).collect();
    Batch { input_ids: ids, attention_mask: mask, labels, batch_size: 2, seq_len: 7, task_ids: None, ..Default::default() }
}

fn logits_of(m: &PeftModel, batch: &Batch) -> Tensor {
    let opts = ForwardOptions { attention_mask: Some(batch.attention_mask.clone()), ..Default::default() };
    m.forward(&batch.input_ids, batch.batch_size, batch.seq_len, &opts, None).unwrap()
}

#[test]
fn gpt2_loads_with_transformers_module_names() {
    let m = base_peft("gpt2_lora_c_attn");
    let info = m.base.info();
    assert_eq!((info.architecture.as_str(), info.hidden_size, info.num_hidden_layers, info.num_attention_heads, info.num_key_value_heads), ("GPT2LMHeadModel", 64, 2, 4, None));
    let names: Vec<String> = m.base.named_linears().into_iter().map(|(n, l)| format!("{n}:{}:{}x{}", l.transposed, l.in_features(), l.out_features())).collect();
    // The token embedding comes first: an embedding table [vocab, n_embd] held like a Conv1D
    // (in = vocab, out = n_embd), so LoRA can target it (HF `lora.Embedding`).
    assert_eq!(names[0], "transformer.wte:true:192x64");
    assert_eq!(&names[1..5], &[
        "transformer.h.0.attn.c_attn:true:64x192", "transformer.h.0.attn.c_proj:true:64x64",
        "transformer.h.0.mlp.c_fc:true:64x256", "transformer.h.0.mlp.c_proj:true:256x64"
    ]);
    assert_eq!(names.last().unwrap(), "lm_head:false:64x192");
    // GPT2LMHeadModel parameter count, lm_head tied: wte 192·64 + wpe 64·64 + 2 blocks + ln_f.
    let block = 2 * 128 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64);
    assert_eq!(m.base.base_param_count(), 192 * 64 + 64 * 64 + 2 * block + 128);
    assert!(m.base.module_names().contains(&"transformer.h.1.ln_2".to_string()));
}

#[test]
fn base_logits() {
    for case in CASES {
        let exp = Expected::load(case);
        check_logits("base model", &base_peft(case), &exp, "logits_base");
    }
}

#[test]
fn adapter_and_disabled_logits() {
    for case in CASES {
        let exp = Expected::load(case);
        let mut m = adapter_peft(case, false);
        check_logits("adapter", &m, &exp, "logits_adapter");
        let disabled_key = if exp.has("logits_disabled") { "logits_disabled" } else { "logits_base" };
        m.set_disabled(true).unwrap();
        check_logits("disabled adapter", &m, &exp, disabled_key);
        m.set_disabled(false).unwrap();
        check_logits("re-enabled adapter", &m, &exp, "logits_adapter");
    }
}

#[test]
fn merge_unmerge_and_merge_and_unload() {
    for case in CASES {
        let exp = Expected::load(case);
        let mut m = adapter_peft(case, false);
        let before: Vec<Tensor> = m.base.named_linears().into_iter().map(|(_, l)| l.weight.copy().unwrap()).collect();
        m.merge_adapter(None, true).unwrap();
        // Non-square Conv1D weights stay [in, out] after the transposed merge.
        for ((n, l), w) in m.base.named_linears().into_iter().zip(&before) {
            assert_eq!(l.weight.dims(), w.dims(), "{case} {n}: merged weight shape");
        }
        check_logits("merged (merge_adapter)", &m, &exp, "logits_merged");
        m.merge_adapter(None, false).unwrap(); // merging twice adds nothing
        check_logits("merged twice", &m, &exp, "logits_merged");
        m.unmerge_adapter().unwrap();
        let worst = m.base.named_linears().into_iter().zip(&before).map(|((_, l), w)| max_diff(&l.weight, w)).fold(0.0, f64::max);
        assert!(worst < 1e-6, "{case}: unmerge left the weights off by {worst}");
        check_logits("unmerged", &m, &exp, "logits_adapter");
        m.merge_and_unload(None, false).unwrap();
        assert!(m.adapter_names().is_empty());
        check_logits("merge_and_unload", &m, &exp, "logits_merged");
    }
}

#[test]
fn generate_with_and_without_cache() {
    for case in CASES {
        let exp = Expected::load(case);
        check_generate("base", &base_peft(case), &exp, "generate_base");
        let mut m = adapter_peft(case, false);
        check_generate("adapter", &m, &exp, "generate_adapter");
        m.merge_and_unload(None, false).unwrap();
        check_generate("merged", &m, &exp, "generate_merged");
    }
}

#[test]
fn padded_row_equals_row_alone() {
    let exp = Expected::load("gpt2_lora_c_attn");
    let m = adapter_peft("gpt2_lora_c_attn", false);
    let (ids, b, s) = exp.ids("input_ids");
    let mask = exp.mask("attention_mask");
    let all = forward(&m, &ids, b, s, &mask, None);
    let n = mask[s..].iter().filter(|&&x| x == 1).count();
    let alone = forward(&m, &ids[s..s + n], 1, n, &vec![1u8; n], None);
    let d = max_diff(&all.narrow(0, 1, 1).unwrap().narrow(1, 0, n).unwrap(), &alone);
    assert!(d < 1e-5, "padded row vs alone: {d}");
}

#[test]
fn gpt2_lora_c_attn_loss_and_grads() {
    let case = "gpt2_lora_c_attn";
    let exp = Expected::load(case);
    let m = adapter_peft(case, true);
    let (ids, b, s) = exp.ids("input_ids");
    let batch = Batch { input_ids: ids, attention_mask: exp.mask("attention_mask"), labels: exp.i64s("labels"), batch_size: b, seq_len: s, task_ids: None, ..Default::default() };
    let (loss, _, grads) = loss_and_grads(&m, &batch, None, None).unwrap();
    let want = exp.get("loss").flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    let latol = tolerance(case, "loss_atol", 1e-5);
    visible(&format!("diff {case} loss: got {loss:.8} expected {want:.8} abs {:.3e}", (loss - want).abs()));
    assert!((loss - want).abs() <= latol, "{case}: loss {loss} vs {want}");
    let (gatol, grtol) = (tolerance(case, "grad_atol", 8e-6), tolerance(case, "grad_rtol", 1e-3));
    let params = m.trainable_parameters();
    let want_keys: BTreeSet<String> = exp.t.keys().filter_map(|k| k.strip_prefix("grad.")).map(String::from).collect();
    assert_eq!(params.iter().map(|(k, _)| k.clone()).collect::<BTreeSet<_>>(), want_keys);
    for (key, var) in &params {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {key}"));
        assert_close(&format!("{case} grad.{key}"), g, exp.get(&format!("grad.{key}")), gatol, grtol);
    }
}

#[test]
fn resave_is_byte_identical() {
    for case in CASES {
        let m = adapter_peft(case, false);
        let out = temp_dir(&format!("gpt2-resave-{case}"));
        m.save_pretrained(&out, None).unwrap();
        let fx = std::fs::read(case_dir(case).join("adapter_model.safetensors")).unwrap();
        let ours = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        assert!(fx == ours, "{case}: re-saved adapter_model.safetensors differs from the fixture ({} vs {} bytes)", ours.len(), fx.len());
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        let fx_cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(case_dir(case).join("adapter_config.json")).unwrap()).unwrap();
        for k in ["bias", "fan_in_fan_out", "r", "lora_alpha", "base_model_name_or_path"] {
            assert_eq!(cfg[k], fx_cfg[k], "{case}: adapter_config.json `{k}`");
        }
        remove_dir(&out);
        visible(&format!("ok {case}: re-saved adapter_model.safetensors byte-identical ({} bytes)", ours.len()));
    }
}

#[test]
fn conv1d_target_without_fan_in_fan_out_warns_and_sets_it() {
    let mut m = base_peft("gpt2_lora_c_attn");
    m.add_adapter("default", lora(json!({"peft_type": "LORA", "r": 4, "target_modules": ["c_attn"]})), 1).unwrap();
    let w = m.take_warnings();
    assert!(w.iter().any(|x| x == "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True."), "{w:?}");
    assert_eq!(m.peft_config("default").unwrap().to_json()["fan_in_fan_out"], json!(true));
}

#[test]
fn only_one_adapter_with_bias() {
    let mut m = adapter_peft("gpt2_lora_bias", false);
    let before = forward_batch(&m, &Expected::load("gpt2_lora_bias"));
    let e = m
        .add_adapter("other", lora(json!({"peft_type": "LORA", "r": 2, "target_modules": ["c_proj"], "fan_in_fan_out": true, "bias": "all"})), 1)
        .expect_err("a second adapter with bias must be refused");
    assert!(e.to_string().contains("LoraModel supports only 1 adapter with bias. When using multiple adapters, set bias to 'none' for all adapters."), "{e}");
    assert_eq!(m.adapter_names(), vec!["default".to_string()]);
    assert!(m.base.named_linears().iter().all(|(_, l)| l.lora("other").is_none()));
    assert_eq!(max_diff(&forward_batch(&m, &Expected::load("gpt2_lora_bias")), &before), 0.0);
    // bias "none" next to it is fine
    m.add_adapter("other", lora(json!({"peft_type": "LORA", "r": 2, "target_modules": ["c_proj"], "fan_in_fan_out": true})), 1).unwrap();
}

/// `bias="all"`: every bias of the model trains (Conv1D and LayerNorm), the saved keys follow
/// HF (`<targeted>.base_layer.bias`, other biases at their plain path), a reload reproduces the
/// trained model, and the loaded biases stay when the adapter is disabled.
#[test]
fn bias_all_trains_saves_and_reloads() {
    let mut m = base_peft("gpt2_lora_c_attn");
    m.add_adapter("default", lora(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": true, "bias": "all", "init_lora_weights": false})), 3).unwrap();
    let keys: BTreeSet<String> = m.trainable_parameters().into_iter().map(|(k, _)| k).collect();
    for k in [
        "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias",
        "base_model.model.transformer.h.0.attn.c_proj.bias",
        "base_model.model.transformer.h.1.mlp.c_fc.bias",
        "base_model.model.transformer.h.1.ln_2.bias",
        "base_model.model.transformer.ln_f.bias",
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
    ] {
        assert!(keys.contains(k), "missing trainable {k}: {keys:?}");
    }
    assert_eq!(keys.len(), 4 + 2 * 6 + 1, "{keys:?}");
    let batch = train_batch();
    let (_, _, grads) = loss_and_grads(&m, &batch, None, None).unwrap();
    for (k, v) in m.trainable_parameters() {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {k}"));
        assert!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "zero gradient for {k}");
    }
    let base_bias = m.base.named_linears()[1].1.bias.as_ref().unwrap().copy().unwrap();
    let args = TrainingArgs { learning_rate: 5e-2, max_steps: 10, seed: 1, ..Default::default() };
    let mut tr = Trainer::new(&m, args).unwrap();
    for _ in 0..10 {
        tr.step(&m, std::slice::from_ref(&batch)).unwrap();
    }
    assert!(max_diff(m.base.named_linears()[1].1.bias.as_ref().unwrap(), &base_bias) > 1e-3, "c_proj bias did not train");
    let out = temp_dir("gpt2-bias-all");
    m.save_pretrained(&out, None).unwrap();
    let mut back = base_peft("gpt2_lora_c_attn");
    let res = back.load_adapter(&out, "default", false, None).unwrap();
    assert!(res.missing_keys.is_empty() && res.unexpected_keys.is_empty(), "{res:?}");
    let d = max_diff(&logits_of(&m, &batch), &logits_of(&back, &batch));
    assert!(d < 1e-5, "reloaded bias=all adapter differs by {d}");
    m.set_disabled(true).unwrap();
    back.set_disabled(true).unwrap();
    let d = max_diff(&logits_of(&m, &batch), &logits_of(&back, &batch));
    assert!(d < 1e-5, "disabled: trained biases stay (HF), reloaded differs by {d}");
    let pristine = logits_of(&base_peft("gpt2_lora_c_attn"), &batch);
    assert!(max_diff(&logits_of(&back, &batch), &pristine) > 1e-4, "loaded biases must replace the base biases");
    remove_dir(&out);
}

/// Prompt tuning and prefix tuning on GPT-2 (no `num_key_value_heads`: prefix token_dim =
/// n_embd, heads = n_head): 20 AdamW steps make the loss fall, save + reload is identical.
#[test]
fn prompt_and_prefix_tuning_train_and_reload() {
    use peft_core::tuners::prompt::PromptLearningConfig;
    for (tag, v) in [
        ("prompt", json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4})),
        ("prefix", json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4})),
    ] {
        let mut m = base_peft("gpt2_lora_c_attn");
        let c = PromptLearningConfig::from_json(&v, None).unwrap();
        m.add_adapter("default", c, 5).unwrap();
        let j = m.peft_config("default").unwrap().to_json();
        assert_eq!((j["token_dim"].clone(), j["num_attention_heads"].clone(), j["num_layers"].clone()), (json!(64), json!(4), json!(2)), "{tag}");
        let batch = train_batch();
        let args = TrainingArgs { learning_rate: 1e-1, max_steps: 20, seed: 1, ..Default::default() };
        let mut tr = Trainer::new(&m, args).unwrap();
        let losses: Vec<f64> = (0..20).map(|_| tr.step(&m, std::slice::from_ref(&batch)).unwrap().loss).collect();
        assert!(losses[19] < losses[0] * 0.98, "{tag}: loss {:.4} -> {:.4}", losses[0], losses[19]);
        let out = temp_dir(&format!("gpt2-{tag}"));
        m.save_pretrained(&out, None).unwrap();
        let mut back = base_peft("gpt2_lora_c_attn");
        back.load_adapter(&out, "default", false, None).unwrap();
        let d = max_diff(&logits_of(&m, &batch), &logits_of(&back, &batch));
        assert!(d <= 1e-6, "{tag}: reload differs by {d}");
        // generation with the cache equals generation without it
        let opts = GenerateOptions { max_new_tokens: 4, eos_token_ids: vec![], pad_token_id: 0, use_cache: true, ..Default::default() };
        let a = generate(&back, &batch.input_ids[..7], 1, 7, None, None, &opts, &|| false).unwrap();
        let b = generate(&back, &batch.input_ids[..7], 1, 7, None, None, &GenerateOptions { use_cache: false, ..opts.clone() }, &|| false).unwrap();
        assert_eq!(a, b, "{tag}: generate with and without cache");
        remove_dir(&out);
        visible(&format!("ok gpt2 {tag}: loss {:.4} -> {:.4} in 20 steps; reload max diff {d:.1e}", losses[0], losses[19]));
    }
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = temp_dir("gpt2-unsupported");
    std::fs::write(dir.join("config.json"), r#"{"architectures": ["ElectraForMaskedLM"], "model_type": "electra"}"#).unwrap();
    let e = peft_core::model::loader::load_causal_lm(&dir, DType::F32, &candle_core::Device::Cpu).err().expect("must fail");
    let msg = e.to_string();
    assert!(msg.contains("ElectraForMaskedLM") && msg.contains("GPT2LMHeadModel") && msg.contains("LlamaForCausalLM"), "{msg}");
    remove_dir(&dir);
}
