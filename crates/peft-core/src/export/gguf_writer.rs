//! A GGUF version 3 writer (llama.cpp's file format, spec:
//! <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>).
//!
//! Layout written: magic `GGUF`, version `3` (u32), tensor count (u64), metadata count (u64);
//! the metadata key/value pairs (key as u64 length + UTF-8 bytes, u32 value type, value); one
//! info per tensor (name, u32 dimension count, the dimensions innermost first as u64 — so
//! ggml's `ne[0]` is the *last* dimension of the row-major shape —, u32 ggml type, u64 offset
//! into the data section); zero padding to `general.alignment` (32 unless the metadata sets
//! it); then each tensor's data, each starting at a multiple of the alignment.
//!
//! Tensor encodings ([`GgmlType`]): F32, F16 (IEEE half, round to nearest even), and Q8_0
//! (blocks of 32 values along the row: an f16 scale `d = max|x| / 127` followed by 32 `i8`
//! values `round(x / d)`, ggml's `quantize_row_q8_0_ref`; 34 bytes per block). Q8_0 needs rows
//! whose length (`ne[0]`) is a multiple of 32.
//!
//! The file is written through [`crate::io::write_atomic_with`] (temp file, fsync, rename), and
//! tensors are encoded one at a time while writing, so memory stays at one tensor's copy.

use crate::error::{PeftError, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Tensor};
use std::io::Write;
use std::path::Path;

/// A ggml tensor type this writer encodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q8_0,
}

impl GgmlType {
    /// ggml's `enum ggml_type` id (F32 = 0, F16 = 1, Q8_0 = 8).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
        }
    }

    /// Bytes taken by `n` values (`n` a multiple of 32 for Q8_0).
    pub fn bytes_for(self, n: usize) -> usize {
        match self {
            GgmlType::F32 => 4 * n,
            GgmlType::F16 => 2 * n,
            GgmlType::Q8_0 => n / 32 * 34,
        }
    }

    /// Parse an `outtype` option: `"f32"`, `"f16"` or `"q8_0"`.
    ///
    /// Errors: `InvalidArgument` naming `outtype` for anything else.
    pub fn parse(s: &str) -> Result<GgmlType> {
        match s {
            "f32" => Ok(GgmlType::F32),
            "f16" => Ok(GgmlType::F16),
            "q8_0" => Ok(GgmlType::Q8_0),
            o => Err(PeftError::invalid_arg("outtype", format!("must be 'f32', 'f16' or 'q8_0', found {o:?}"))),
        }
    }

    /// The llama.cpp `general.file_type` (`enum llama_ftype`) of a file whose big tensors are
    /// of this type: ALL_F32 = 0, MOSTLY_F16 = 1, MOSTLY_Q8_0 = 7.
    pub fn file_type(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 7,
        }
    }
}

/// Encode `xs` (one or more whole rows) as ggml `ty`, little-endian. For Q8_0, `xs.len()` must
/// be a multiple of 32 (blocks never straddle rows when the row length is).
///
/// Errors: `InvalidArgument` for a Q8_0 input whose length is not a multiple of 32.
pub fn encode(xs: &[f32], ty: GgmlType) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(ty.bytes_for(xs.len()));
    match ty {
        GgmlType::F32 => xs.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        GgmlType::F16 => xs.iter().for_each(|x| out.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes())),
        GgmlType::Q8_0 => {
            if !xs.len().is_multiple_of(32) {
                return Err(PeftError::invalid_arg("outtype", format!("q8_0 needs a multiple of 32 values, found {}", xs.len())));
            }
            for block in xs.chunks_exact(32) {
                let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
                out.extend(block.iter().map(|x| ((x * id).round() as i8) as u8));
            }
        }
    }
    Ok(out)
}

/// One tensor to write: its name, its row-major shape and data (any float dtype; converted to
/// f32 before encoding) and the type to store it as.
pub struct PendingTensor {
    pub name: String,
    pub tensor: Tensor,
    pub ty: GgmlType,
}

/// A GGUF file under construction: metadata in insertion order, then tensors in insertion
/// order. See the module docs for the layout.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or replace, keeping its position) the metadata value of `key`.
    pub fn set(&mut self, key: &str, value: Value) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// Remove the metadata value of `key`, if present.
    pub fn remove(&mut self, key: &str) {
        self.metadata.retain(|(k, _)| k != key);
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Queue a tensor. A Q8_0 request for a tensor whose rows (last dimension) are not a
    /// multiple of 32 is stored as F16 instead, as llama.cpp's converters do; the type actually
    /// used is returned.
    ///
    /// Errors: `InvalidArgument` for a duplicate name, a scalar or a non-float dtype.
    pub fn add_tensor(&mut self, name: &str, tensor: Tensor, ty: GgmlType) -> Result<GgmlType> {
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(PeftError::invalid_arg("tensor", format!("`{name}` is written twice")));
        }
        if tensor.rank() == 0 {
            return Err(PeftError::invalid_arg("tensor", format!("`{name}` is a scalar; GGUF tensors have 1 to 4 dimensions")));
        }
        if !matches!(tensor.dtype(), DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            return Err(PeftError::invalid_arg("tensor", format!("`{name}` has dtype {:?}, not a float dtype", tensor.dtype())));
        }
        let row = *tensor.dims().last().unwrap_or(&0);
        let ty = if ty == GgmlType::Q8_0 && !row.is_multiple_of(32) { GgmlType::F16 } else { ty };
        self.tensors.push(PendingTensor { name: name.to_string(), tensor, ty });
        Ok(ty)
    }

    /// The queued tensors' names and types, in order.
    pub fn tensor_types(&self) -> Vec<(String, GgmlType)> {
        self.tensors.iter().map(|t| (t.name.clone(), t.ty)).collect()
    }

    fn alignment(&self) -> Result<usize> {
        match self.get("general.alignment") {
            None => Ok(32),
            Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => Ok(*a as usize),
            Some(v) => Err(PeftError::invalid_arg("general.alignment", format!("must be a power of two (u32), found {v:?}"))),
        }
    }

    /// Write the file atomically to `path` (see the module docs).
    ///
    /// Errors: `Io` / `NotFound` naming `path` (e.g. a missing parent folder);
    /// `InvalidArgument` for a bad `general.alignment`; candle errors while converting tensors.
    pub fn write(&self, path: &Path) -> Result<()> {
        let align = self.alignment()?;
        let io = |e: std::io::Error| PeftError::io(path, e);
        crate::io::write_atomic_with(path, |w| {
            let mut pos = 0usize;
            let put = |w: &mut dyn Write, b: &[u8], pos: &mut usize| -> Result<()> {
                *pos += b.len();
                w.write_all(b).map_err(io)
            };
            put(w, b"GGUF", &mut pos)?;
            put(w, &3u32.to_le_bytes(), &mut pos)?;
            put(w, &(self.tensors.len() as u64).to_le_bytes(), &mut pos)?;
            put(w, &(self.metadata.len() as u64).to_le_bytes(), &mut pos)?;
            for (k, v) in &self.metadata {
                let mut b = Vec::new();
                put_string(&mut b, k);
                b.extend_from_slice(&value_type(v).to_le_bytes());
                put_value(&mut b, v);
                put(w, &b, &mut pos)?;
            }
            let mut offset = 0usize;
            let mut sizes = Vec::with_capacity(self.tensors.len());
            for t in &self.tensors {
                let mut b = Vec::new();
                put_string(&mut b, &t.name);
                let dims = t.tensor.dims();
                b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
                for d in dims.iter().rev() {
                    b.extend_from_slice(&(*d as u64).to_le_bytes());
                }
                b.extend_from_slice(&t.ty.id().to_le_bytes());
                b.extend_from_slice(&(offset as u64).to_le_bytes());
                put(w, &b, &mut pos)?;
                let size = t.ty.bytes_for(t.tensor.elem_count());
                sizes.push(size);
                offset += size.next_multiple_of(align);
            }
            let pad = pos.next_multiple_of(align) - pos;
            put(w, &vec![0u8; pad], &mut pos)?;
            for (t, size) in self.tensors.iter().zip(sizes) {
                let xs = t.tensor.flatten_all()?.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?.to_vec1::<f32>()?;
                let bytes = encode(&xs, t.ty)?;
                if bytes.len() != size {
                    return Err(PeftError::Internal(format!("tensor `{}`: encoded {} bytes, expected {size}", t.name, bytes.len())));
                }
                let pad = size.next_multiple_of(align) - size;
                put(w, &bytes, &mut pos)?;
                put(w, &vec![0u8; pad], &mut pos)?;
            }
            Ok(())
        })
    }
}

fn put_string(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// GGUF's `gguf_metadata_value_type` id of a value.
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(b: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => b.push(*x),
        Value::I8(x) => b.push(*x as u8),
        Value::U16(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => b.push(*x as u8),
        Value::String(s) => put_string(b, s),
        Value::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::Array(items) => {
            // An empty array keeps no element type in candle's reader; write it as strings
            // (what llama.cpp's array metadata mostly holds).
            let ty = items.first().map(value_type).unwrap_or(8);
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(b, it);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_matches_the_reference_rounding() {
        let xs: Vec<f32> = (0..32).map(|i| (i as f32 - 10.0) * 0.37).collect();
        let b = encode(&xs, GgmlType::Q8_0).unwrap();
        assert_eq!(b.len(), 34);
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        assert!((d - 21.0 * 0.37 / 127.0).abs() < 1e-4);
        assert_eq!(b[2 + 31] as i8, 127);
        assert_eq!(b[2] as i8, (-10.0f32 * 0.37 * 127.0 / (21.0 * 0.37)).round() as i8);
        assert!(encode(&xs[..31], GgmlType::Q8_0).is_err());
    }
}
