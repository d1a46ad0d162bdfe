//! File I/O: safetensors reading with validation, atomic writing (temp file in the same folder,
//! fsync, rename), and JSON text in the exact form Python's `json.dumps(indent=2,
//! sort_keys=True)` produces (how HF PEFT writes adapter_config.json).

use crate::error::{PeftError, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors};
use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};

fn st_to_candle(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        StDtype::I64 => DType::I64,
        StDtype::U8 => DType::U8,
        StDtype::U32 => DType::U32,
        _ => return None,
    })
}

fn candle_to_st(d: DType) -> Result<StDtype> {
    Ok(match d {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::F64 => StDtype::F64,
        DType::I64 => StDtype::I64,
        DType::U8 => StDtype::U8,
        DType::U32 => StDtype::U32,
        other => return Err(PeftError::invalid_arg("dtype", format!("{other:?} cannot be written to safetensors here"))),
    })
}

/// Read every tensor of a safetensors file, in file order.
///
/// The header is validated by the `safetensors` crate (length, JSON, offsets within the data,
/// offsets consistent with dtype × shape) before any tensor is built. I32 tensors are widened to
/// I64; other dtypes candle cannot hold are refused.
///
/// Errors: `NotFound`, `SafetensorsInvalid` naming the file (and tensor, where one is at fault).
pub fn read_safetensors(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|e| PeftError::io(path, e))?;
    parse_safetensors(&bytes, path, device)
}

/// [`read_safetensors`] over bytes already in memory; `path` is used in error messages.
pub fn parse_safetensors(bytes: &[u8], path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let bad = |msg: String| PeftError::SafetensorsInvalid { path: path.to_path_buf(), msg };
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("{e}")))?;
    let mut names: Vec<(usize, String)> = Vec::new();
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("{e}")))?;
    for (name, info) in meta.tensors() {
        names.push((info.data_offsets.0, name));
    }
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for (_, name) in names {
        let view = st.tensor(&name).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let shape = view.shape().to_vec();
        let t = if view.dtype() == StDtype::I32 {
            let v: Vec<i64> = view.data().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect();
            Tensor::from_vec(v, shape, device)?
        } else {
            let dt = st_to_candle(view.dtype()).ok_or_else(|| bad(format!("tensor `{name}` has unsupported dtype {:?}", view.dtype())))?;
            Tensor::from_raw_buffer(view.data(), dt, &shape, device)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?
        };
        out.push((name, t));
    }
    Ok(out)
}

struct RawTensor {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Little-endian bytes of a tensor's elements, row-major (copied to the CPU first).
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(match t.dtype() {
        DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F64 => t.to_vec1::<f64>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::I64 => t.to_vec1::<i64>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::U32 => t.to_vec1::<u32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        other => return Err(PeftError::invalid_arg("dtype", format!("{other:?} cannot be written to safetensors here"))),
    })
}

/// Serialize tensors to safetensors bytes with `metadata` (HF PEFT writes `{"format": "pt"}`).
/// Tensors are written in the order given (safetensors sorts them by dtype alignment, then name).
pub fn safetensors_bytes(tensors: &[(String, Tensor)], metadata: Option<&[(&str, &str)]>) -> Result<Vec<u8>> {
    let raws: Vec<(String, RawTensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), RawTensor { dtype: candle_to_st(t.dtype())?, shape: t.dims().to_vec(), data: tensor_bytes(t)? })))
        .collect::<Result<_>>()?;
    let meta = metadata.map(|m| m.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::HashMap<_, _>>());
    safetensors::serialize(raws.iter().map(|(n, r)| (n.as_str(), r)), meta)
        .map_err(|e| PeftError::Internal(format!("safetensors serialization failed: {e}")))
}

/// Write `bytes` to `path` atomically: a temp file in the same folder, fsync, rename over
/// `path`, fsync the folder. A crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    let fname = path.file_name().ok_or_else(|| PeftError::invalid_arg("path", format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp-{}-{}", fname.to_string_lossy(), std::process::id(), unique()));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(PeftError::io(path, e));
    }
    Ok(())
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// JSON text as Python's `json.dumps(value, indent=2, sort_keys=True)` writes it
/// (`ensure_ascii`: non-ASCII characters escaped as `\uXXXX`).
pub fn python_json_dumps(v: &serde_json::Value) -> String {
    fn sort(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                let mut out = serde_json::Map::new();
                for k in keys {
                    out.insert(k.clone(), sort(&m[k]));
                }
                serde_json::Value::Object(out)
            }
            serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    let text = serde_json::to_string_pretty(&sort(v)).expect("JSON values serialize");
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        if ch.is_ascii() {
            out.push(ch);
        } else {
            let mut buf = [0u16; 2];
            for u in ch.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{:04x}", u));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_format() {
        let v = serde_json::json!({"b": [1, 2], "a": {}, "c": 0.0, "d": "é", "e": []});
        assert_eq!(python_json_dumps(&v), "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2\n  ],\n  \"c\": 0.0,\n  \"d\": \"\\u00e9\",\n  \"e\": []\n}");
    }

    #[test]
    fn safetensors_round_trip_and_truncation() {
        let dir = std::env::temp_dir().join(format!("peft-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.safetensors");
        let t = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], (2, 3), &Device::Cpu).unwrap();
        let bytes = safetensors_bytes(&[("w".into(), t.clone())], Some(&[("format", "pt")])).unwrap();
        write_atomic(&p, &bytes).unwrap();
        let back = read_safetensors(&p, &Device::Cpu).unwrap();
        assert_eq!(back[0].0, "w");
        assert_eq!(back[0].1.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        for cut in [0, 4, 8, 20, bytes.len() - 1] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e = read_safetensors(&p, &Device::Cpu).unwrap_err();
            assert_eq!(e.code(), "ERR_SAFETENSORS_INVALID", "cut at {cut}: {e}");
            assert!(e.to_string().contains("x.safetensors"));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
