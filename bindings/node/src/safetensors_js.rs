//! `loadSafetensors` / `saveSafetensors` for JS tensors.

use crate::task::{arg_err, Job};
use napi::bindgen_prelude::{AsyncTask, Buffer};
use peft_core::io::{read_safetensors, safetensors_bytes, tensor_bytes, write_atomic};

#[napi(object)]
pub struct NamedTensor {
    pub name: String,
    /// 'float32' | 'float16' | 'bfloat16' | 'float64' | 'int64' | 'uint8' | 'uint32'
    pub dtype: String,
    pub shape: Vec<u32>,
    /// Little-endian element bytes, row-major.
    pub data: Buffer,
}

type Raw = Vec<(String, String, Vec<u32>, Vec<u8>)>;

fn dtype_name(d: candle_core::DType) -> &'static str {
    use candle_core::DType::*;
    match d {
        F32 => "float32",
        F16 => "float16",
        BF16 => "bfloat16",
        F64 => "float64",
        I64 => "int64",
        U8 => "uint8",
        U32 => "uint32",
        _ => "unknown",
    }
}

fn parse_dtype(s: &str) -> Option<candle_core::DType> {
    use candle_core::DType::*;
    Some(match s {
        "float32" => F32,
        "float16" => F16,
        "bfloat16" => BF16,
        "float64" => F64,
        "int64" => I64,
        "uint8" => U8,
        "uint32" => U32,
        _ => return None,
    })
}

/// Read every tensor of a safetensors file.
#[napi(ts_return_type = "Promise<Array<NamedTensor>>")]
pub fn load_safetensors(path: String) -> AsyncTask<Job<Raw, Vec<NamedTensor>>> {
    AsyncTask::new(Job::new(
        move || {
            let ts = read_safetensors(std::path::Path::new(&path), &candle_core::Device::Cpu)?;
            let mut out = Vec::with_capacity(ts.len());
            for (name, t) in ts {
                let bytes = tensor_bytes(&t)?;
                out.push((name, dtype_name(t.dtype()).to_string(), t.dims().iter().map(|&d| d as u32).collect(), bytes));
            }
            Ok(out)
        },
        |_, raw| Ok(raw.into_iter().map(|(name, dtype, shape, data)| NamedTensor { name, dtype, shape, data: data.into() }).collect()),
    ))
}

/// Write tensors to a safetensors file atomically, with `{"format": "pt"}` metadata.
#[napi(ts_return_type = "Promise<void>")]
pub fn save_safetensors(path: String, tensors: Vec<NamedTensor>) -> napi::Result<AsyncTask<Job<(), ()>>> {
    let mut ts = Vec::with_capacity(tensors.len());
    for t in tensors {
        let dt = parse_dtype(&t.dtype).ok_or_else(|| arg_err("tensors", format!("tensor `{}` has unsupported dtype {:?}", t.name, t.dtype)))?;
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let n: usize = shape.iter().product();
        if n * dt.size_in_bytes() != t.data.len() {
            return Err(arg_err("tensors", format!("tensor `{}`: {} bytes do not fit shape {:?} of {}", t.name, t.data.len(), shape, t.dtype)));
        }
        let tensor = candle_core::Tensor::from_raw_buffer(&t.data, dt, &shape, &candle_core::Device::Cpu)
            .map_err(|e| arg_err("tensors", format!("tensor `{}`: {e}", t.name)))?;
        ts.push((t.name, tensor));
    }
    Ok(AsyncTask::new(Job::plain(move || {
        let bytes = safetensors_bytes(&ts, Some(&[("format", "pt")]))?;
        write_atomic(std::path::Path::new(&path), &bytes)
    })))
}
