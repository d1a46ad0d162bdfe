//! Issue 17 in the core: progress and cancellation of model loading, adapter loading and saving
//! (`progress::Control`), and streaming generation with stop strings (`generate_with`).

mod common;

use candle_core::{DType, Device};
use common::{adapter_peft, base_peft, case_dir, fixtures_dir};
use peft_core::generate::{generate, generate_with, GenerateHooks, GenerateOptions, StopStrings};
use peft_core::model::loader::{load_model_ctl, LoadRequest};
use peft_core::peft_model::{LoadOptions, SaveOptions};
use peft_core::progress::Control;
use peft_core::tokenizer::Tokenizer;
use peft_core::PeftError;
use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};

const CASE: &str = "llama_lora_multi";

fn llama() -> PathBuf {
    fixtures_dir().join("models/llama")
}

/// A control that records every report and asks to stop once `stop_after` reports were made.
struct Recorder {
    seen: RefCell<Vec<(u64, u64)>>,
    stop_after: Option<usize>,
    polls: Cell<usize>,
}

impl Recorder {
    fn new(stop_after: Option<usize>) -> Self {
        Recorder { seen: RefCell::new(Vec::new()), stop_after, polls: Cell::new(0) }
    }
    fn run<T>(&self, f: impl FnOnce(&Control) -> peft_core::Result<T>) -> peft_core::Result<T> {
        let progress = |d: u64, t: u64| self.seen.borrow_mut().push((d, t));
        let stop = || {
            self.polls.set(self.polls.get() + 1);
            self.stop_after.is_some_and(|n| self.seen.borrow().len() >= n)
        };
        f(&Control { progress: Some(&progress), should_stop: Some(&stop) })
    }
    fn assert_complete(&self, what: &str) {
        let seen = self.seen.borrow();
        let total = seen[0].1;
        assert!(total > 0, "{what}: a total");
        let want: Vec<(u64, u64)> = (1..=total).map(|d| (d, total)).collect();
        assert_eq!(*seen, want, "{what}: one report per tensor, in order, ending at total");
    }
}

/// A folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        let p = std::env::temp_dir().join(format!("peft-core-progress-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tensors_in(file: &Path) -> u64 {
    peft_core::io::safetensors_tensor_count(file).unwrap() as u64
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(format!("{}={}", p.display(), std::fs::read(&p).map(|b| b.len()).unwrap_or(0)));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn load_model_reports_each_tensor_and_aborts_between_tensors() {
    let total = tensors_in(&llama().join("model.safetensors"));
    let rec = Recorder::new(None);
    let m = rec.run(|ctl| load_model_ctl(&llama(), DType::F32, &Device::Cpu, &LoadRequest::default(), ctl)).unwrap();
    rec.assert_complete("load_model");
    assert_eq!(rec.seen.borrow()[0].1, total);
    drop(m);
    for k in [1usize, 3, total as usize - 1] {
        let rec = Recorder::new(Some(k));
        let r = rec.run(|ctl| load_model_ctl(&llama(), DType::F32, &Device::Cpu, &LoadRequest::default(), ctl));
        assert!(matches!(r, Err(PeftError::Aborted)), "abort after {k} tensors");
        assert_eq!(rec.seen.borrow().len(), k, "stopped right after tensor {k}");
    }
    // aborted once every tensor was read: the last poll, before the model is built
    let rec = Recorder::new(Some(total as usize));
    assert!(matches!(rec.run(|ctl| load_model_ctl(&llama(), DType::F32, &Device::Cpu, &LoadRequest::default(), ctl)), Err(PeftError::Aborted)));
}

#[test]
fn load_adapter_aborted_leaves_the_model_unchanged() {
    let dir = case_dir(CASE);
    let mut m = base_peft(CASE);
    let (ids, b, s) = (vec![1u32, 5, 9, 13], 1, 4);
    let before = m.forward(&ids, b, s, &Default::default(), None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let total = tensors_in(&dir.join("adapter_model.safetensors"));
    for k in [1usize, total as usize] {
        let rec = Recorder::new(Some(k));
        let r = rec.run(|ctl| m.load_adapter_ctl(&dir, "default", &LoadOptions::default(), ctl));
        assert!(matches!(r, Err(PeftError::Aborted)), "abort after {k} of {total}");
        assert!(m.adapter_names().is_empty(), "no adapter after an abort at {k}");
        let after = m.forward(&ids, b, s, &Default::default(), None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(after, before, "the model computes as before");
    }
    let rec = Recorder::new(None);
    rec.run(|ctl| m.load_adapter_ctl(&dir, "default", &LoadOptions::default(), ctl)).unwrap();
    rec.assert_complete("load_adapter");
    assert_eq!(m.adapter_names(), vec!["default".to_string()]);
}

#[test]
fn save_aborted_writes_nothing_and_keeps_an_existing_folder() {
    let mut m = adapter_peft(CASE, false);
    m.load_adapter(&case_dir(CASE).join("other"), "other", false, None).unwrap();
    let root = TempDir::new("save");
    let fresh = root.path().join("a/b");
    let total: u64 = {
        let rec = Recorder::new(None);
        let probe = root.path().join("probe");
        rec.run(|ctl| m.save_pretrained_ctl(&probe, None, &SaveOptions::default(), ctl)).unwrap();
        rec.assert_complete("save");
        std::fs::remove_dir_all(&probe).unwrap();
        let total = rec.seen.borrow()[0].1;
        total
    };
    // every abort point: after each tensor, and at the checks before and between the files
    for k in 1..=total as usize {
        let rec = Recorder::new(Some(k));
        let r = rec.run(|ctl| m.save_pretrained_ctl(&fresh, None, &SaveOptions::default(), ctl));
        assert!(matches!(r, Err(PeftError::Aborted)), "abort after {k} of {total}");
        assert!(!root.path().join("a").exists(), "the folders the save created are removed (abort after {k})");
    }
    let kept = root.path().join("kept");
    m.save_pretrained(&kept, None).unwrap();
    let before = files_under(&kept);
    let bytes_before = std::fs::read(kept.join("adapter_model.safetensors")).unwrap();
    // abort at the last poll before the journal: after the temp files of the first group
    let polls_to_commit = {
        let rec = Recorder::new(None);
        rec.run(|ctl| m.save_pretrained_ctl(&kept, None, &SaveOptions::default(), ctl)).unwrap();
        rec.polls.get()
    };
    for stop_at_poll in total as usize + 1..=polls_to_commit {
        let polls = Cell::new(0usize);
        let stop = || {
            polls.set(polls.get() + 1);
            polls.get() >= stop_at_poll
        };
        let r = m.save_pretrained_ctl(&kept, None, &SaveOptions::default(), &Control { progress: None, should_stop: Some(&stop) });
        if polls.get() < stop_at_poll {
            assert!(r.is_ok(), "fewer polls without progress reports");
            continue;
        }
        assert!(matches!(r, Err(PeftError::Aborted)), "abort at poll {stop_at_poll}");
        assert_eq!(files_under(&kept), before, "no temp file left, nothing changed (abort at poll {stop_at_poll})");
    }
    assert_eq!(std::fs::read(kept.join("adapter_model.safetensors")).unwrap(), bytes_before);
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_pretrained(&llama()).unwrap()
}

#[test]
fn streamed_steps_equal_the_generated_tokens() {
    let m = adapter_peft(CASE, false);
    let (b, s) = (3usize, 5usize);
    let ids: Vec<u32> = (0..b * s).map(|i| (i as u32 * 7 + 3) % 250 + 3).collect();
    for o in [
        GenerateOptions { max_new_tokens: 9, ..Default::default() },
        GenerateOptions { max_new_tokens: 9, do_sample: true, seed: 5, top_k: 10, top_p: 0.9, ..Default::default() },
    ] {
        let want = generate(&m, &ids, b, s, None, None, &o, &|| false).unwrap();
        let mut steps: Vec<(usize, Vec<u32>)> = Vec::new();
        let mut on = |st: &peft_core::generate::Step| steps.push((st.index, st.tokens.to_vec()));
        let got = generate_with(&m, &ids, b, s, None, None, &o, GenerateHooks { should_stop: &|| false, on_step: Some(&mut on), stop_strings: None }).unwrap();
        assert_eq!(got, want);
        assert_eq!(steps.iter().map(|x| x.0).collect::<Vec<_>>(), (0..9).collect::<Vec<_>>());
        for r in 0..b {
            assert_eq!(steps.iter().map(|x| x.1[r]).collect::<Vec<_>>(), want[r][s..].to_vec(), "row {r}");
        }
        // abort before step 4: Aborted, after exactly 4 steps
        let n = Cell::new(0);
        let mut count = |_: &peft_core::generate::Step| n.set(n.get() + 1);
        let stop = || n.get() >= 4;
        let r = generate_with(&m, &ids, b, s, None, None, &o, GenerateHooks { should_stop: &stop, on_step: Some(&mut count), stop_strings: None });
        assert!(matches!(r, Err(PeftError::Aborted)));
        assert_eq!(n.get(), 4);
    }
}

#[test]
fn stop_strings_match_like_hf_stop_string_criteria() {
    let tok = tokenizer();
    let id = |w: &str| tok.token_to_id(w).unwrap_or_else(|| panic!("no token {w}"));
    let strings = vec!["k2 tok3".to_string()];
    let st = StopStrings { strings: &strings, tokenizer: &tok };
    let seq = |ws: &[&str]| ws.iter().map(|w| id(w)).collect::<Vec<u32>>();
    // WordLevel decoding joins tokens with spaces: "tok1 tok2 tok3 ..."
    assert!(st.completed_by_last(&seq(&["tok1", "tok2", "tok3"])).unwrap(), "overhang at both ends, completed by the last token");
    assert!(!st.completed_by_last(&seq(&["tok1", "tok2", "tok3", "tok4"])).unwrap(), "completed one token earlier");
    assert!(!st.completed_by_last(&seq(&["tok1", "tok2"])).unwrap(), "not yet complete");
    assert!(!st.completed_by_last(&seq(&["tok2"])).unwrap());
    let one = vec!["ok1".to_string()];
    let st1 = StopStrings { strings: &one, tokenizer: &tok };
    assert!(st1.completed_by_last(&seq(&["tok5", "tok1"])).unwrap(), "inside the last token");
    assert!(st1.completed_by_last(&seq(&["tok13"])).unwrap(), "ends before the end of the last token");
    assert!(!st1.completed_by_last(&seq(&["tok13", "tok5"])).unwrap());
    // in generation: the row ends with the completing token, then pads
    let m = adapter_peft(CASE, false);
    let s = 5;
    let ids: Vec<u32> = (0..s).map(|i| (i as u32 * 11 + 7) % 250 + 3).collect();
    let o = GenerateOptions { max_new_tokens: 12, ..Default::default() };
    let free = generate(&m, &ids, 1, s, None, None, &o, &|| false).unwrap().remove(0);
    let words: Vec<String> = free[s..].iter().map(|&t| tok.decode(&[t], false).unwrap()).collect();
    let stop = vec![format!("{} {}", &words[3][words[3].len().saturating_sub(2)..], &words[4][..2.min(words[4].len())])];
    let first = (0..12).find(|&j| tok.decode(&free[..s + j + 1], false).unwrap().contains(&stop[0])).unwrap();
    let stops = StopStrings { strings: &stop, tokenizer: &tok };
    let got = generate_with(&m, &ids, 1, s, None, None, &o, GenerateHooks { should_stop: &|| false, on_step: None, stop_strings: Some(stops) }).unwrap();
    assert_eq!(got[0], free[..s + first + 1].to_vec(), "stop {:?} ends the row at new token {first}", stop[0]);
}
