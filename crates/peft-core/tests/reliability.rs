//! No data lost: the exportable AdamW equals candle's, checkpoints resume to the same loss curve,
//! and saves never write outside the target folder.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use common::{base_peft, visible};
use peft_core::train::{AdamW, Batch, Trainer, TrainingArgs};
use peft_core::tuners::LoraConfig;
use serde_json::json;
use std::path::{Path, PathBuf};

fn tmp_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("reliability-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn exportable_adamw_is_bit_identical_to_candle_adamw() {
    let dev = Device::Cpu;
    let params = ParamsAdamW { lr: 3e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let init_a = Tensor::randn(0f32, 1., (4, 5), &dev).unwrap();
    let init_b = Tensor::randn(0f32, 1., (5,), &dev).unwrap();
    let x = Tensor::randn(0f32, 1., (3, 5), &dev).unwrap();
    let (a1, b1) = (Var::from_tensor(&init_a).unwrap(), Var::from_tensor(&init_b).unwrap());
    let (a2, b2) = (Var::from_tensor(&init_a).unwrap(), Var::from_tensor(&init_b).unwrap());
    let mut theirs = candle_nn::AdamW::new(vec![a1.clone(), b1.clone()], params.clone()).unwrap();
    let mut ours = AdamW::new(vec![("a".into(), a2.clone()), ("b".into(), b2.clone())], params).unwrap();
    let loss = |a: &Var, b: &Var| x.broadcast_add(b.as_tensor()).unwrap().matmul(&a.as_tensor().t().unwrap()).unwrap().sqr().unwrap().sum_all().unwrap();
    for step in 0..6 {
        let lr = 3e-2 * (1.0 - step as f64 / 10.0);
        theirs.set_learning_rate(lr);
        ours.set_learning_rate(lr);
        theirs.step(&loss(&a1, &b1).backward().unwrap()).unwrap();
        ours.step(&loss(&a2, &b2).backward().unwrap()).unwrap();
        for (p, q) in [(&a1, &a2), (&b1, &b2)] {
            let d = (p.as_tensor() - q.as_tensor()).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(d, 0.0, "step {step}: parameters differ by {d}");
        }
    }
    // export → import into a fresh optimizer continues identically
    let state: std::collections::HashMap<String, Tensor> = ours.state_tensors().into_iter().collect();
    assert_eq!(state.len(), 4);
    assert_eq!(state["a.exp_avg"].dims(), &[4, 5]);
    let a3 = Var::from_tensor(&a2.as_tensor().copy().unwrap()).unwrap();
    let b3 = Var::from_tensor(&b2.as_tensor().copy().unwrap()).unwrap();
    let mut resumed = AdamW::new(vec![("a".into(), a3.clone()), ("b".into(), b3.clone())], ParamsAdamW { lr: 1e-2, weight_decay: 0.01, ..Default::default() }).unwrap();
    resumed.load_state(&state, ours.step_t(), Path::new("mem")).unwrap();
    theirs.set_learning_rate(1e-2);
    theirs.step(&loss(&a1, &b1).backward().unwrap()).unwrap();
    resumed.step(&loss(&a3, &b3).backward().unwrap()).unwrap();
    let d = (a1.as_tensor() - a3.as_tensor()).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(d, 0.0);
    // a state without one of the moments is refused, naming it
    let mut partial = state.clone();
    partial.remove("b.exp_avg_sq");
    let e = resumed.load_state(&partial, 1, Path::new("ckpt/optimizer.safetensors")).unwrap_err();
    assert!(e.to_string().contains("b.exp_avg_sq"), "{e}");
}

fn batches() -> Vec<Vec<Batch>> {
    // 6 steps × 2 micro-batches of [2, 6] ids with some padding and ignored labels.
    (0..6)
        .map(|s| {
            (0..2)
                .map(|m| {
                    let ids: Vec<u32> = (0..12).map(|i| ((s * 37 + m * 11 + i * 7) % 250 + 3) as u32).collect();
                    let mut mask = vec![1u8; 12];
                    mask[11] = 0;
                    let mut labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
                    labels[11] = -100;
                    labels[0] = -100;
                    Batch { input_ids: ids, attention_mask: mask, labels, batch_size: 2, seq_len: 6, task_ids: None, ..Default::default() }
                })
                .collect()
        })
        .collect()
}

fn fresh_model() -> peft_core::peft_model::PeftModel {
    let mut m = base_peft("llama_lora_qv");
    let cfg = LoraConfig::from_json(
        &json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.2, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
        None,
    )
    .unwrap();
    m.add_adapter("default", cfg, 7).unwrap();
    m
}

fn args() -> TrainingArgs {
    TrainingArgs { learning_rate: 5e-3, max_steps: 6, warmup_steps: 2, weight_decay: 0.01, seed: 11, ..Default::default() }
}

#[test]
fn resume_from_checkpoint_gives_the_same_loss_curve() {
    let data = batches();
    // uninterrupted
    let full_model = fresh_model();
    let mut full = Trainer::new(&full_model, args()).unwrap();
    let want: Vec<f64> = data.iter().map(|b| full.step(&full_model, b).unwrap().loss).collect();

    // 3 steps, checkpoint, then a new process-like start: fresh model, fresh trainer, resume
    let dir = tmp_dir("resume");
    let ckpt = dir.join("checkpoint-3");
    let first_model = fresh_model();
    let mut first = Trainer::new(&first_model, args()).unwrap();
    let mut got: Vec<f64> = data[..3].iter().map(|b| first.step(&first_model, b).unwrap().loss).collect();
    first.save_checkpoint(&first_model, &ckpt, json!({"note": "x"})).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "trainer_state.json"] {
        assert!(ckpt.join(f).is_file(), "checkpoint lacks {f}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "only the checkpoint folder, no temp folder: {leftovers:?}");

    let second_model = fresh_model();
    let mut second = Trainer::new(&second_model, args()).unwrap();
    let extra = second.load_checkpoint(&second_model, &ckpt).unwrap();
    assert_eq!(extra, json!({"note": "x"}));
    assert_eq!(second.global_step(), 3);
    got.extend(data[3..].iter().map(|b| second.step(&second_model, b).unwrap().loss));
    visible(&format!("resume: uninterrupted {want:?}\nresume: resumed       {got:?}"));
    for (i, (a, b)) in want.iter().zip(&got).enumerate() {
        assert!((a - b).abs() <= 1e-6, "step {}: loss {b} after resume vs {a} uninterrupted", i + 1);
    }
    // the resumed model's weights equal the uninterrupted model's
    let sd = |m: &peft_core::peft_model::PeftModel| m.adapter_state_dict("default").unwrap();
    for ((k, a), (_, b)) in sd(&full_model).iter().zip(sd(&second_model).iter()) {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-6, "{k}: differs by {d}");
    }
    // without the restore, the curve differs (the test can fail)
    let naive_model = fresh_model();
    let mut naive = Trainer::new(&naive_model, args()).unwrap();
    let naive_loss = naive.step(&naive_model, &data[3]).unwrap().loss;
    assert!((naive_loss - want[3]).abs() > 1e-6);

    // a missing checkpoint, a damaged optimizer file
    let e = fresh_trainer_err(&dir.join("checkpoint-9"));
    assert_eq!(e.code(), "ERR_NOT_FOUND");
    std::fs::write(ckpt.join("optimizer.safetensors"), b"garbage").unwrap();
    let e = fresh_trainer_err(&ckpt);
    assert_eq!(e.code(), "ERR_SAFETENSORS_INVALID");
    assert!(e.to_string().contains("optimizer.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Prompt learning with a reparameterisation (P-tuning MLP): the HF-format adapter file holds
/// only the computed prompt table, so the checkpoint's trainable_parameters.safetensors carries
/// the MLP; resuming gives the uninterrupted loss curve.
#[test]
fn resume_restores_a_p_tuning_encoder() {
    let fresh = || {
        let mut m = base_peft("llama_lora_qv");
        let cfg = peft_core::tuners::PromptLearningConfig::from_json(
            &json!({"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "encoder_hidden_size": 16}),
            None,
        )
        .unwrap();
        m.add_adapter("default", cfg, 5).unwrap();
        m
    };
    let data = batches();
    let a = || TrainingArgs { learning_rate: 2e-2, max_steps: 6, seed: 3, ..Default::default() };
    let full_model = fresh();
    let mut full = Trainer::new(&full_model, a()).unwrap();
    let want: Vec<f64> = data.iter().map(|b| full.step(&full_model, b).unwrap().loss).collect();
    let dir = tmp_dir("resume-ptuning");
    let ckpt = dir.join("checkpoint-2");
    let m1 = fresh();
    let mut t1 = Trainer::new(&m1, a()).unwrap();
    let mut got: Vec<f64> = data[..2].iter().map(|b| t1.step(&m1, b).unwrap().loss).collect();
    t1.save_checkpoint(&m1, &ckpt, json!(null)).unwrap();
    assert!(ckpt.join("trainable_parameters.safetensors").is_file());
    let m2 = fresh();
    let mut t2 = Trainer::new(&m2, a()).unwrap();
    t2.load_checkpoint(&m2, &ckpt).unwrap();
    got.extend(data[2..].iter().map(|b| t2.step(&m2, b).unwrap().loss));
    for (i, (x, y)) in want.iter().zip(&got).enumerate() {
        assert!((x - y).abs() <= 1e-6, "step {}: {y} after resume vs {x}", i + 1);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn fresh_trainer_err(dir: &Path) -> peft_core::PeftError {
    let m = fresh_model();
    let mut t = Trainer::new(&m, args()).unwrap();
    t.load_checkpoint(&m, dir).unwrap_err()
}

#[cfg(unix)]
#[test]
fn saves_never_write_outside_the_target_folder() {
    let dir = tmp_dir("paths");
    let outside = dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let target = dir.join("target");
    std::fs::create_dir_all(&target).unwrap();
    let mut m = fresh_model();
    m.add_adapter("other", LoraConfig::from_json(&json!({"peft_type": "LORA", "target_modules": ["q_proj"]}), None).unwrap(), 1).unwrap();

    // dir/<name> planted as a symlink to another folder: refused, nothing written there
    std::os::unix::fs::symlink(&outside, target.join("other")).unwrap();
    let e = m.save_pretrained(&target, None).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains("symlink"), "{e}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "nothing written through the link");
    std::fs::remove_file(target.join("other")).unwrap();

    // a file in the folder that is a symlink to a file outside: replaced, the outside file intact
    let victim = outside.join("victim.txt");
    std::fs::write(&victim, b"keep me").unwrap();
    for f in ["adapter_model.safetensors", "README.md"] {
        let _ = std::fs::remove_file(target.join(f)); // written by the refused save's `default`
    }
    std::os::unix::fs::symlink(&victim, target.join("adapter_model.safetensors")).unwrap();
    std::os::unix::fs::symlink(&victim, target.join("README.md")).unwrap();
    let files = m.save_pretrained(&target, None).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    assert!(!std::fs::symlink_metadata(target.join("adapter_model.safetensors")).unwrap().file_type().is_symlink());
    for f in &files {
        let canon = f.canonicalize().unwrap();
        assert!(canon.starts_with(target.canonicalize().unwrap()), "{} is outside the target", canon.display());
    }

    // the target folder itself may be a symlink (followed deliberately: the caller named it)
    let real = dir.join("real");
    std::fs::create_dir_all(&real).unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    m.save_pretrained(&link, Some(&["default".to_string()])).unwrap();
    assert!(real.join("adapter_model.safetensors").is_file());

    // a file where the subfolder should be
    let t2 = dir.join("t2");
    std::fs::create_dir_all(&t2).unwrap();
    std::fs::write(t2.join("other"), b"x").unwrap();
    assert_eq!(m.save_pretrained(&t2, None).unwrap_err().code(), "ERR_INVALID_ARGUMENT");
    // bad adapter names never reach the file system
    for bad in ["../x", "a/b", ".."] {
        assert_eq!(m.save_pretrained(&t2, Some(&[bad.to_string()])).unwrap_err().code(), "ERR_INVALID_ARGUMENT");
    }
    let _ = DType::F32;
    std::fs::remove_dir_all(&dir).unwrap();
}
