//! The GGUF container (llama.cpp's file format, spec:
//! <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>): opening a file with its header
//! checked (magic, version, alignment), candle's parser run under `catch_unwind`, tensor byte
//! ranges checked against the file size, and typed metadata readers ([`meta`]) whose errors
//! name the file and key (`PeftError::GgufInvalid`). Knows neither models nor tokenizers: the
//! model loader ([`crate::model::gguf`]) and the tokenizer ([`crate::tokenizer`]) both read files
//! through it.

use crate::error::{PeftError, Result};
use candle_core::quantized::gguf_file;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

pub(crate) fn invalid(path: &Path, msg: impl Into<String>) -> PeftError {
    PeftError::GgufInvalid { path: path.to_path_buf(), msg: msg.into() }
}

/// Typed access to GGUF metadata values with `GgufInvalid` errors naming the key.
pub(crate) mod meta {
    use super::invalid;
    use crate::error::Result;
    use candle_core::quantized::gguf_file::Value;
    use std::collections::HashMap;
    use std::path::Path;

    fn type_name(v: &Value) -> String {
        match v {
            Value::Array(a) => format!("an array of {} values", a.len()),
            other => format!("{:?}", other.value_type()),
        }
    }

    fn as_i128(v: &Value) -> Option<i128> {
        Some(match v {
            Value::U8(x) => *x as i128,
            Value::I8(x) => *x as i128,
            Value::U16(x) => *x as i128,
            Value::I16(x) => *x as i128,
            Value::U32(x) => *x as i128,
            Value::I32(x) => *x as i128,
            Value::U64(x) => *x as i128,
            Value::I64(x) => *x as i128,
            _ => return None,
        })
    }

    /// A non-negative integer of any integer type; `None` when the key is absent.
    pub fn uint(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<Option<u64>> {
        match md.get(key) {
            None => Ok(None),
            Some(v) => match as_i128(v) {
                Some(x) if x >= 0 && x <= u64::MAX as i128 => Ok(Some(x as u64)),
                Some(x) => Err(invalid(path, format!("metadata `{key}` must be non-negative, found {x}"))),
                None => Err(invalid(
                    path,
                    format!("metadata `{key}` must be a single unsigned integer, found {}", type_name(v)),
                )),
            },
        }
    }

    /// A number (float or integer) as f64; `None` when absent.
    pub fn float(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<Option<f64>> {
        match md.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => match as_i128(v) {
                Some(x) => Ok(Some(x as f64)),
                None => Err(invalid(path, format!("metadata `{key}` must be a number, found {}", type_name(v)))),
            },
        }
    }

    /// A boolean (also accepts the integers 0 and 1); `None` when absent.
    pub fn boolean(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<Option<bool>> {
        match md.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => match as_i128(v) {
                Some(0) => Ok(Some(false)),
                Some(1) => Ok(Some(true)),
                _ => Err(invalid(path, format!("metadata `{key}` must be a boolean, found {}", type_name(v)))),
            },
        }
    }

    /// A string; `None` when absent.
    pub fn string(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<Option<String>> {
        match md.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(invalid(path, format!("metadata `{key}` must be a string, found {}", type_name(v)))),
        }
    }

    /// An array whose elements `elem` converts (`None` for a wrong element, reported as
    /// "metadata `key`[i] must be <what>"); `None` when the key is absent.
    fn array<'a, T>(
        md: &'a HashMap<String, Value>,
        key: &str,
        path: &Path,
        what: &str,
        elem: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        match md.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| elem(v).ok_or_else(|| invalid(path, format!("metadata `{key}`[{i}] must be {what}, found {}", type_name(v)))))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(invalid(path, format!("metadata `{key}` must be an array, found {}", type_name(v)))),
        }
    }

    /// An array of strings, borrowed; `None` when absent.
    pub fn string_array<'a>(md: &'a HashMap<String, Value>, key: &str, path: &Path) -> Result<Option<Vec<&'a str>>> {
        array(md, key, path, "a string", |v| match v {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// An array of integers (any integer type) as i64; `None` when absent.
    pub fn int_array(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<Option<Vec<i64>>> {
        array(md, key, path, "an integer", |v| as_i128(v).and_then(|x| i64::try_from(x).ok()))
    }

    /// An array of numbers (floats or integers) as f64; `None` when absent.
    pub fn float_array(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<Option<Vec<f64>>> {
        array(md, key, path, "a number", |v| match v {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            other => as_i128(other).map(|x| x as f64),
        })
    }
}

/// The smallest possible GGUF v2/v3 file: magic (4) + version (4) + tensor count (8) +
/// metadata count (8).
const MIN_GGUF_LEN: u64 = 24;

/// Open `path`, check the GGUF magic and version, and parse header, metadata and tensor
/// infos with candle's reader. Returns the parsed content, the open reader and the file size.
pub(crate) fn open_gguf(path: &Path) -> Result<(gguf_file::Content, BufReader<File>, u64)> {
    let file = File::open(path).map_err(|e| PeftError::io(path, e))?;
    let file_size = file.metadata().map_err(|e| PeftError::io(path, e))?.len();
    let mut reader = BufReader::new(file);
    if file_size < MIN_GGUF_LEN {
        return Err(invalid(
            path,
            format!("file is {file_size} bytes long, too short for a GGUF header ({MIN_GGUF_LEN} bytes); truncated?"),
        ));
    }
    let mut head = [0u8; 8];
    reader.read_exact(&mut head).map_err(|e| PeftError::io(path, e))?;
    if &head[0..4] != b"GGUF" {
        return Err(invalid(
            path,
            format!(
                "bad magic: expected \"GGUF\" (47 47 55 46), found {:02x} {:02x} {:02x} {:02x} ({:?}); not a GGUF file",
                head[0],
                head[1],
                head[2],
                head[3],
                String::from_utf8_lossy(&head[0..4])
            ),
        ));
    }
    let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    match version {
        2 | 3 => {}
        1 => return Err(invalid(path, "GGUF version 1 is obsolete and not supported (need version 2 or 3)")),
        v if (1..=3).contains(&v.swap_bytes()) => {
            return Err(invalid(path, "big-endian GGUF files are not supported"));
        }
        v => return Err(invalid(path, format!("unsupported GGUF version {v} (supported: 2, 3)"))),
    }
    reader.seek(SeekFrom::Start(0)).map_err(|e| PeftError::io(path, e))?;

    // candle's parser bounds every length against the file size, but guard against any
    // remaining panic path (e.g. `general.alignment = 0` divides by zero).
    let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gguf_file::Content::read(&mut reader)));
    let content = match parsed {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let msg = e.to_string();
            let hint = if msg.contains("unknown dtype") {
                "unknown tensor type (ggml type id not supported by this reader): "
            } else if msg.contains("fill whole buffer") || msg.contains("remaining") {
                "file is truncated or corrupt: "
            } else {
                ""
            };
            return Err(invalid(path, format!("cannot parse the header/metadata: {hint}{msg}")));
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown failure".into());
            return Err(invalid(path, format!("cannot parse the header/metadata (malformed file): {what}")));
        }
    };
    if let Some(a) = meta::uint(&content.metadata, "general.alignment", path)? {
        if a == 0 || !a.is_power_of_two() {
            return Err(invalid(path, format!("`general.alignment` = {a} is not a power of two")));
        }
    }
    Ok((content, reader, file_size))
}

/// Check that every tensor's data lies inside the file, with overflow-checked arithmetic:
/// element count divisible by the ggml block size, byte range
/// `[tensor_data_offset + offset, + size)` within `file_size`, and offset aligned as the GGUF
/// spec requires (`general.alignment`, default 32).
pub(crate) fn validate_tensor_infos(content: &gguf_file::Content, file_size: u64, path: &Path) -> Result<()> {
    let alignment = meta::uint(&content.metadata, "general.alignment", path)?.unwrap_or(gguf_file::DEFAULT_ALIGNMENT);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let info = &content.tensor_infos[name];
        let dims = info.shape.dims();
        let elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| invalid(path, format!("tensor `{name}` has an impossible shape {dims:?}")))?;
        let block = info.ggml_dtype.block_size() as u64;
        if !elems.is_multiple_of(block) {
            return Err(invalid(
                path,
                format!(
                    "tensor `{name}` ({:?}, shape {dims:?}) has {elems} elements, not a multiple of the block size {block}",
                    info.ggml_dtype
                ),
            ));
        }
        let bytes = (elems / block).checked_mul(info.ggml_dtype.type_size() as u64);
        let start = content.tensor_data_offset.checked_add(info.offset);
        let end = match (start, bytes) {
            (Some(s), Some(b)) => s.checked_add(b),
            _ => None,
        };
        match end {
            Some(end) if end <= file_size => {}
            _ => {
                return Err(invalid(
                    path,
                    format!(
                        "tensor `{name}` needs {} bytes at offset {} but the file has only {file_size} bytes; truncated?",
                        bytes.map(|b| b.to_string()).unwrap_or_else(|| "too many".into()),
                        start.map(|s| s.to_string()).unwrap_or_else(|| "beyond 2^64".into()),
                    ),
                ))
            }
        }
        if !info.offset.is_multiple_of(alignment) {
            return Err(invalid(
                path,
                format!("tensor `{name}` data offset {} is not a multiple of the alignment {alignment}", info.offset),
            ));
        }
    }
    Ok(())
}
