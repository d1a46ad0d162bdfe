//! HF `PeftModel.set_requires_grad` against HF PEFT 0.21 (`cases/requires_grad.json`, made by
//! `__test__/scripts/make_requires_grad_fixtures.py`): the same sequence of calls on the tiny
//! Llama, and after each the model status' `requires_grad` per adapter and
//! `get_nb_trainable_parameters()`; training updates exactly the active adapters that require
//! gradients.

mod common;

use common::*;
use peft_core::peft_model::PeftModel;
use peft_core::train::{Batch, Trainer, TrainingArgs};
use peft_core::tuners::AdapterConfig;
use serde_json::{json, Value};

fn lora(v: Value) -> AdapterConfig {
    AdapterConfig::from_json(&json!({"peft_type": "LORA", "r": v["r"], "target_modules": v["t"], "modules_to_save": v.get("s")}), None).unwrap()
}

fn names(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
        _ => panic!("{v}"),
    }
}

#[test]
fn set_requires_grad_follows_hf_through_add_load_set_and_delete() {
    let want: Value = serde_json::from_str(&std::fs::read_to_string(case_dir("requires_grad").with_extension("json")).unwrap()).unwrap();
    // `m`: LoRA on q with a modules_to_save copy of lm_head, saved, then loaded frozen
    let mdir = temp_dir("requires-grad-m");
    {
        let mut src = base_peft("llama_lora_qv");
        src.add_adapter("default", lora(json!({"r": 2, "t": ["q_proj"], "s": ["lm_head"]})), 3).unwrap();
        src.save_pretrained(&mdir, None).unwrap();
    }
    let mut pm = base_peft("llama_lora_qv");
    for step in want["steps"].as_array().unwrap() {
        let call = step["call"].as_array().unwrap();
        match call[0].as_str().unwrap() {
            "init" => {
                pm.add_adapter("a", lora(json!({"r": 2, "t": ["q_proj", "v_proj"]})), 1).unwrap();
            }
            "addAdapter" => {
                let c = match call[1].as_str().unwrap() {
                    "b" => json!({"r": 4, "t": ["q_proj"]}),
                    _ => json!({"r": 2, "t": ["v_proj"]}),
                };
                pm.add_adapter(call[1].as_str().unwrap(), lora(c), 2).unwrap();
            }
            "setRequiresGrad" => pm.set_requires_grad(&names(&call[1]), call[2].as_bool().unwrap()).unwrap(),
            "loadAdapter" => {
                pm.load_adapter(&mdir, call[1].as_str().unwrap(), false, None).unwrap();
            }
            "setAdapter" => {
                let frozen = call.get(2).is_some_and(|o| o["inferenceMode"] == json!(true));
                pm.set_adapter_with(&names(&call[1]), frozen).unwrap()
            }
            "deleteAdapter" => pm.delete_adapter(call[1].as_str().unwrap()).unwrap(),
            other => panic!("{other}"),
        }
        let status = pm.model_status().unwrap();
        assert_eq!(status["requires_grad"], step["requires_grad"], "requires_grad after {call:?}");
        let (t, all) = pm.nb_trainable_parameters();
        assert_eq!(json!([t, all]), step["nb_trainable"], "get_nb_trainable_parameters after {call:?}");
    }
    // loaded frozen (HF `PeftModel.from_pretrained`), then `set_adapter` makes it trainable
    let mut fz = base_peft("llama_lora_qv");
    fz.load_adapter(&mdir, "default", false, None).unwrap();
    let counts = |m: &PeftModel| json!([m.nb_trainable_parameters().0, m.nb_trainable_parameters().1]);
    let ft = &want["frozen_then_set"];
    assert_eq!(fz.model_status().unwrap()["requires_grad"], ft[0]);
    assert_eq!(counts(&fz), ft[1]);
    assert!(fz.trainable_parameters().is_empty());
    fz.set_adapter(&["default".to_string()]).unwrap();
    assert_eq!(fz.model_status().unwrap()["requires_grad"], ft[2]);
    assert_eq!(counts(&fz), ft[3]);
    assert_eq!(fz.trainable_parameters().len(), 2 * 2 + 1, "q_proj A/B of 2 layers and the lm_head copy");
    // several adapters with a modules_to_save copy of one module cannot be active together (HF)
    fz.load_adapter(&mdir, "other", false, None).unwrap();
    let e = fz.set_adapter(&["default".to_string(), "other".to_string()]).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains("modules_to_save copy of `lm_head`"), "{e}");
    remove_dir(&mdir);

    // refusals: an unknown name (HF ignores it; a typo deserves an error), prompt learning
    let e = pm.set_requires_grad(&["nope".to_string()], true).unwrap_err();
    assert_eq!(e.code(), "ERR_ADAPTER_NOT_FOUND");
    let mut pt = base_peft("llama_lora_qv");
    pt.add_adapter("default", AdapterConfig::from_json(&json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3}), None).unwrap(), 1).unwrap();
    let e = pt.set_requires_grad(&["default".to_string()], false).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_STATE");
    assert!(e.to_string().contains(want["prompt_error"].as_str().unwrap()), "{e}");
}

/// Two active adapters, one frozen with `set_requires_grad(false)`: a training run updates the
/// other only, and the frozen one's weights stay bit-identical.
#[test]
fn training_leaves_an_active_adapter_without_gradients_unchanged() {
    let mut pm: PeftModel = base_peft("llama_lora_qv");
    pm.add_adapter("a", lora(json!({"r": 2, "t": ["q_proj", "v_proj"]})), 1).unwrap();
    pm.add_adapter("b", lora(json!({"r": 2, "t": ["k_proj"]})), 2).unwrap();
    pm.set_adapter(&["a".to_string(), "b".to_string()]).unwrap();
    pm.set_requires_grad(&["b".to_string()], false).unwrap();
    let snapshot = |m: &PeftModel, n: &str| -> Vec<Vec<f32>> {
        m.adapter_param_parts(n).iter().map(|(_, _, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    };
    let (a0, b0) = (snapshot(&pm, "a"), snapshot(&pm, "b"));
    assert_eq!(pm.trainable_parameters_by_adapter().iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["a"]);
    let ids: Vec<u32> = vec![5, 17, 33, 9, 120, 44, 7, 81];
    let batch = Batch { input_ids: ids.clone(), attention_mask: vec![1; 8], labels: ids.iter().map(|&t| t as i64).collect(), batch_size: 1, seq_len: 8, ..Default::default() };
    let mut tr = Trainer::new(&pm, TrainingArgs { learning_rate: 1e-2, ..Default::default() }).unwrap();
    for _ in 0..3 {
        tr.step(&pm, std::slice::from_ref(&batch)).unwrap();
    }
    assert_ne!(snapshot(&pm, "a"), a0, "the adapter that requires gradients trained");
    assert_eq!(snapshot(&pm, "b"), b0, "the frozen active adapter did not move");
}
