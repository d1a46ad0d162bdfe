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

/// Largest accepted safetensors header (the limit of the `safetensors` crate and of HF's reader).
pub const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// One tensor entry of a validated safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderEntry {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    /// Byte range within the data section (after the 8-byte length and the header).
    pub start: usize,
    pub end: usize,
}

/// The header's top-level entries in file order, duplicates kept (serde_json's `Map` would keep
/// only the last of two equal keys, hiding a duplicated tensor name).
struct RawEntries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for RawEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> std::result::Result<RawEntries, A::Error> {
                let mut out = Vec::new();
                while let Some(kv) = m.next_entry::<String, serde_json::Value>()? {
                    out.push(kv);
                }
                Ok(RawEntries(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn parse_st_dtype(s: &str) -> Option<StDtype> {
    Some(match s {
        "F64" => StDtype::F64,
        "F32" => StDtype::F32,
        "F16" => StDtype::F16,
        "BF16" => StDtype::BF16,
        "I64" => StDtype::I64,
        "I32" => StDtype::I32,
        "U32" => StDtype::U32,
        "U8" => StDtype::U8,
        _ => return None,
    })
}

/// dtype names of the safetensors format that this reader does not load (candle has no type
/// for them); named in errors so that they are not reported as unknown.
const ST_UNSUPPORTED: &[&str] =
    &["BOOL", "I8", "I16", "U16", "U64", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4", "F6_E2M3", "F6_E3M2", "C64"];

/// Validate a safetensors header (the JSON text after the 8-byte length) against a data
/// section of `data_len` bytes, before any tensor memory is allocated.
///
/// Checks: UTF-8 JSON object; `__metadata__` (optional) maps strings to strings; every other key
/// names a tensor exactly once with `dtype` (one this reader loads: F64, F32, F16, BF16, I64,
/// I32, U32, U8), `shape` (non-negative integers) and `data_offsets` `[start, end]`;
/// `end - start` equals the element count × dtype size (overflow-checked); the ranges lie within
/// the data, do not overlap and leave no gap, and the last one ends at the end of the file.
/// Returns the entries sorted by offset.
///
/// Errors: `SafetensorsInvalid` naming `path` and, where one is at fault, the tensor.
pub fn validate_safetensors_header(header: &[u8], data_len: u64, path: &Path) -> Result<Vec<HeaderEntry>> {
    let bad = |msg: String| PeftError::SafetensorsInvalid { path: path.to_path_buf(), msg };
    let text = std::str::from_utf8(header).map_err(|e| bad(format!("the header is not UTF-8: {e}")))?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(format!("the header is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(bad(format!("the header must be a JSON object, found {}", json_kind(&value))));
    }
    let RawEntries(raw) = serde_json::from_str(text).map_err(|e| bad(format!("the header is not a JSON object: {e}")))?;
    let mut seen = std::collections::HashSet::new();
    let mut entries = Vec::with_capacity(raw.len());
    for (name, v) in raw {
        if !seen.insert(name.clone()) {
            return Err(bad(format!("tensor `{name}` appears twice in the header")));
        }
        if name == "__metadata__" {
            let ok = v.as_object().map(|m| m.values().all(|x| x.is_string())).unwrap_or(false);
            if !ok {
                return Err(bad("`__metadata__` must be an object of strings".into()));
            }
            continue;
        }
        let tbad = |m: String| bad(format!("tensor `{name}`: {m}"));
        let obj = v.as_object().ok_or_else(|| tbad(format!("the entry must be an object, found {}", json_kind(&v))))?;
        let dtype_s = obj.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| tbad("`dtype` must be a string".into()))?;
        let dtype = match parse_st_dtype(dtype_s) {
            Some(d) => d,
            None if ST_UNSUPPORTED.contains(&dtype_s) => return Err(tbad(format!("dtype {dtype_s} is not supported by this reader"))),
            None => return Err(tbad(format!("unknown dtype {dtype_s:?}"))),
        };
        let shape_v = obj.get("shape").and_then(|s| s.as_array()).ok_or_else(|| tbad("`shape` must be an array".into()))?;
        let mut shape = Vec::with_capacity(shape_v.len().min(16));
        for d in shape_v {
            let d = d.as_u64().and_then(|d| usize::try_from(d).ok()).ok_or_else(|| tbad(format!("shape entry {d} is not a non-negative integer")))?;
            shape.push(d);
        }
        let offs = obj.get("data_offsets").and_then(|o| o.as_array()).filter(|o| o.len() == 2).ok_or_else(|| tbad("`data_offsets` must be [start, end]".into()))?;
        let (start, end) = match (offs[0].as_u64(), offs[1].as_u64()) {
            (Some(s), Some(e)) => (s, e),
            _ => return Err(tbad(format!("`data_offsets` must be two non-negative integers, found {}", obj["data_offsets"]))),
        };
        if start > end {
            return Err(tbad(format!("data_offsets [{start}, {end}] end before they start")));
        }
        if end > data_len {
            return Err(tbad(format!("data_offsets [{start}, {end}] run past the data section ({data_len} bytes); truncated file?")));
        }
        let elems = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        let nbytes = elems.and_then(|n| n.checked_mul(dtype.bitsize() as u64 / 8));
        match nbytes {
            Some(n) if n == end - start => {}
            Some(n) => return Err(tbad(format!("data_offsets [{start}, {end}] hold {} bytes but {dtype_s} × {shape:?} needs {n}", end - start))),
            None => return Err(tbad(format!("shape {shape:?} of {dtype_s} overflows"))),
        }
        entries.push(HeaderEntry { name, dtype, shape, start: start as usize, end: end as usize });
    }
    entries.sort_by(|a, b| (a.start, a.end).cmp(&(b.start, b.end)));
    let mut pos = 0usize;
    let mut prev: Option<&str> = None;
    for e in &entries {
        if e.start < pos {
            return Err(bad(format!("tensor `{}` (bytes {}..{}) overlaps tensor `{}`", e.name, e.start, e.end, prev.unwrap_or("?"))));
        }
        if e.start > pos {
            return Err(bad(format!("tensor `{}` starts at byte {} but the previous tensor ends at {pos} (gap in the data)", e.name, e.start)));
        }
        pos = e.end;
        prev = Some(&e.name);
    }
    if pos as u64 != data_len {
        return Err(bad(format!("the tensors cover {pos} bytes but the data section has {data_len} (trailing bytes)")));
    }
    Ok(entries)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Read every tensor of a safetensors file, in file order.
///
/// Hostile files are refused before memory is allocated for them: the 8-byte header length is
/// checked against the file size and [`MAX_SAFETENSORS_HEADER`], the header is validated by
/// [`validate_safetensors_header`] (offsets, dtype × shape, duplicates, overlaps), and only then
/// is the data section (whose size is the file's real size) read. I32 tensors are widened to
/// I64; dtypes candle cannot hold are refused.
///
/// Errors: `NotFound`, `Io`, `SafetensorsInvalid` naming the file (and the tensor at fault).
pub fn read_safetensors(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    read_safetensors_with(path, device, &mut || Ok(()))
}

/// [`read_safetensors`] calling `tick` after each tensor is built (in file order): a tick that
/// returns an error (e.g. `Aborted`) stops the read, and the tensors read so far are dropped.
pub fn read_safetensors_with(path: &Path, device: &Device, tick: &mut dyn FnMut() -> Result<()>) -> Result<Vec<(String, Tensor)>> {
    use std::io::Read;
    let bad = |msg: String| PeftError::SafetensorsInvalid { path: path.to_path_buf(), msg };
    let (mut f, mut bytes, size) = open_safetensors(path)?;
    let data_len = size - bytes.len() as u64;
    validate_safetensors_header(&bytes[8..], data_len, path)?;
    // The header is sound: the rest of the file is the data section (its true size).
    bytes.try_reserve_exact(data_len as usize).map_err(|_| bad(format!("cannot allocate {data_len} bytes for the tensor data")))?;
    (&mut f).take(data_len + 1).read_to_end(&mut bytes).map_err(|e| PeftError::io(path, e))?;
    if bytes.len() as u64 != size {
        return Err(bad("the file changed while it was read".into()));
    }
    parse_safetensors_with(&bytes, path, device, tick)
}

/// Open a safetensors file and read its 8-byte header length and header (checked against the
/// limit and the file's size, not yet parsed): `(file positioned at the data section, the
/// length prefix + header bytes, file size)`.
fn open_safetensors(path: &Path) -> Result<(std::fs::File, Vec<u8>, u64)> {
    use std::io::Read;
    let bad = |msg: String| PeftError::SafetensorsInvalid { path: path.to_path_buf(), msg };
    let mut f = std::fs::File::open(path).map_err(|e| PeftError::io(path, e))?;
    let size = f.metadata().map_err(|e| PeftError::io(path, e))?.len();
    if size < 8 {
        return Err(bad(format!("the file is {size} bytes long, too short for the 8-byte header length; truncated?")));
    }
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| PeftError::io(path, e))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_SAFETENSORS_HEADER {
        return Err(bad(format!("header length {n} exceeds the limit of {MAX_SAFETENSORS_HEADER} bytes")));
    }
    if n > size - 8 {
        return Err(bad(format!("header length {n} runs past the end of the file ({size} bytes); truncated?")));
    }
    let mut bytes = Vec::with_capacity(8 + n as usize);
    bytes.extend_from_slice(&len);
    (&mut f).take(n).read_to_end(&mut bytes).map_err(|e| PeftError::io(path, e))?;
    if bytes.len() as u64 != 8 + n {
        return Err(bad("the file changed while it was read".into()));
    }
    Ok((f, bytes, size))
}

/// The number of tensors of a safetensors file, from its header alone (validated as
/// [`read_safetensors`] does; the data section is not read). Used to announce a progress total.
///
/// Errors: as [`read_safetensors`].
pub fn safetensors_tensor_count(path: &Path) -> Result<usize> {
    let (_, bytes, size) = open_safetensors(path)?;
    Ok(validate_safetensors_header(&bytes[8..], size - bytes.len() as u64, path)?.len())
}

/// [`read_safetensors`] over bytes already in memory; `path` is used in error messages.
/// Validates the header with [`validate_safetensors_header`] first.
pub fn parse_safetensors(bytes: &[u8], path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    parse_safetensors_with(bytes, path, device, &mut || Ok(()))
}

/// [`parse_safetensors`] calling `tick` after each tensor (see [`read_safetensors_with`]).
pub fn parse_safetensors_with(bytes: &[u8], path: &Path, device: &Device, tick: &mut dyn FnMut() -> Result<()>) -> Result<Vec<(String, Tensor)>> {
    let bad = |msg: String| PeftError::SafetensorsInvalid { path: path.to_path_buf(), msg };
    if bytes.len() < 8 {
        return Err(bad(format!("{} bytes, too short for the 8-byte header length; truncated?", bytes.len())));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > MAX_SAFETENSORS_HEADER || n > bytes.len() as u64 - 8 {
        return Err(bad(format!("header length {n} runs past the end of the data ({} bytes) or exceeds the limit", bytes.len())));
    }
    let entries = validate_safetensors_header(&bytes[8..8 + n as usize], bytes.len() as u64 - 8 - n, path)?;
    // Second opinion from the reference implementation.
    SafeTensors::deserialize(bytes).map_err(|e| bad(format!("{e}")))?;
    let data = &bytes[8 + n as usize..];
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let raw = &data[e.start..e.end];
        let name = e.name;
        let t = if e.dtype == StDtype::I32 {
            let v: Vec<i64> = raw.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect();
            Tensor::from_vec(v, e.shape, device)?
        } else {
            let dt = st_to_candle(e.dtype).ok_or_else(|| bad(format!("tensor `{name}` has unsupported dtype {:?}", e.dtype)))?;
            Tensor::from_raw_buffer(raw, dt, &e.shape, device).map_err(|err| bad(format!("tensor `{name}`: {err}")))?
        };
        out.push((name, t));
        tick()?;
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
    safetensors_bytes_with(tensors, metadata, &mut || Ok(()))
}

/// [`safetensors_bytes`] calling `tick` after each tensor's bytes are made; an error from `tick`
/// (e.g. `Aborted`) stops and drops what was made.
pub fn safetensors_bytes_with(tensors: &[(String, Tensor)], metadata: Option<&[(&str, &str)]>, tick: &mut dyn FnMut() -> Result<()>) -> Result<Vec<u8>> {
    let mut raws: Vec<(String, RawTensor)> = Vec::with_capacity(tensors.len());
    for (n, t) in tensors {
        raws.push((n.clone(), RawTensor { dtype: candle_to_st(t.dtype())?, shape: t.dims().to_vec(), data: tensor_bytes(t)? }));
        tick()?;
    }
    let meta = metadata.map(|m| m.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::HashMap<_, _>>());
    safetensors::serialize(raws.iter().map(|(n, r)| (n.as_str(), r)), meta)
        .map_err(|e| PeftError::Internal(format!("safetensors serialization failed: {e}")))
}

/// Write `bytes` to `path` atomically: a temp file in the same folder, fsync, rename over
/// `path`, fsync the folder. A crash leaves either the old file or the new one (and possibly a
/// stray `.<name>.tmp-*` file). The temp file is created with `O_EXCL` (never through an
/// existing file or symlink), and the rename replaces a symlink at `path` by a regular file
/// instead of writing through it.
///
/// Errors: `Io` / `NotFound` naming `path`; `InvalidArgument` when `path` has no file name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes).map_err(|e| PeftError::io(path, e)))
}

/// [`write_atomic`] for contents produced by `fill`, which writes them into a buffered writer
/// on the temp file (so large files, such as a merged model, are streamed rather than held in
/// memory). When `fill` fails the temp file is removed and `path` is left as it was.
///
/// Errors: what `fill` returns; `Io` / `NotFound` naming `path`; `InvalidArgument` when `path`
/// has no file name.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    let fname = path.file_name().ok_or_else(|| PeftError::invalid_arg("path", format!("{} has no file name", path.display())))?;
    remove_stale_temps(&dir, &fname.to_string_lossy());
    let tmp = dir.join(format!(".{}.tmp-{}-{}", fname.to_string_lossy(), std::process::id(), unique()));
    let f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| PeftError::io(path, e))?;
    let mut bw = std::io::BufWriter::with_capacity(1 << 20, f);
    let filled = fill(&mut bw);
    let res = filled.and_then(|()| {
        (|| -> std::io::Result<()> {
            let f = bw.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, path)?;
            if let Ok(d) = std::fs::File::open(&dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })()
        .map_err(|e| PeftError::io(path, e))
    });
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Name of the journal a group write leaves in its folder between its renames.
pub const SAVE_JOURNAL: &str = ".peft-node-save.journal";

/// Write several files of one folder so that readers see all old or all new contents (an
/// adapter's weights and config must never mix): each file goes to a fsynced temp file, then a
/// journal listing the pending renames is written atomically, the temp files are renamed over
/// their targets, and the journal is removed. A process killed after the journal was written
/// leaves a journal that [`recover_group_write`] (run by every save and load of the folder)
/// completes, so the folder then holds the new files; killed before, the old files are intact.
///
/// Errors: `Io` naming the file.
pub fn write_atomic_group(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    write_atomic_group_with(dir, files, &|| Ok(()))
}

/// [`write_atomic_group`] that polls `check` before each temp file and before the journal (the
/// commit point): when it fails (e.g. `Aborted`), the temp files written so far are removed and
/// the folder's files are untouched. After the journal is written the group always completes.
pub fn write_atomic_group_with(dir: &Path, files: &[(&str, &[u8])], check: &dyn Fn() -> Result<()>) -> Result<()> {
    recover_group_write(dir)?;
    let mut pending: Vec<(PathBuf, PathBuf)> = Vec::new();
    let cleanup = |p: &[(PathBuf, PathBuf)]| {
        for (t, _) in p {
            let _ = std::fs::remove_file(t);
        }
    };
    for (name, bytes) in files {
        if let Err(e) = check() {
            cleanup(&pending);
            return Err(e);
        }
        let path = dir.join(name);
        remove_stale_temps(dir, name);
        let tmp = dir.join(format!(".{name}.tmp-{}-{}", std::process::id(), unique()));
        let res = (|| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            cleanup(&pending);
            return Err(PeftError::io(&path, e));
        }
        pending.push((tmp, path));
    }
    let journal = serde_json::json!(pending
        .iter()
        .map(|(t, p)| [t.file_name().unwrap_or_default().to_string_lossy(), p.file_name().unwrap_or_default().to_string_lossy()])
        .collect::<Vec<_>>());
    if let Err(e) = check().and_then(|_| write_atomic(&dir.join(SAVE_JOURNAL), journal.to_string().as_bytes())) {
        cleanup(&pending);
        return Err(e);
    }
    for (tmp, path) in &pending {
        std::fs::rename(tmp, path).map_err(|e| PeftError::io(path, e))?;
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    let jpath = dir.join(SAVE_JOURNAL);
    std::fs::remove_file(&jpath).map_err(|e| PeftError::io(&jpath, e))?;
    Ok(())
}

/// Complete a [`write_atomic_group`] that was interrupted after its journal was written: rename
/// the temp files still present over their targets and remove the journal. Does nothing
/// without a journal. A journal naming anything but plain file names in `dir` is refused.
///
/// Errors: `Io`, `InvalidState` for a malformed journal.
pub fn recover_group_write(dir: &Path) -> Result<()> {
    let jpath = dir.join(SAVE_JOURNAL);
    let text = match std::fs::read_to_string(&jpath) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(PeftError::io(&jpath, e)),
    };
    let bad = || PeftError::InvalidState(format!("{} is not a valid save journal", jpath.display()));
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|_| bad())?;
    let plain = |s: &str| !s.is_empty() && !s.contains('/') && !s.contains('\\') && s != "." && s != "..";
    for pair in v.as_array().ok_or_else(bad)? {
        let (Some(t), Some(p)) = (pair.get(0).and_then(|x| x.as_str()), pair.get(1).and_then(|x| x.as_str())) else { return Err(bad()) };
        if !plain(t) || !plain(p) {
            return Err(bad());
        }
        let tmp = dir.join(t);
        if tmp.exists() {
            let path = dir.join(p);
            std::fs::rename(&tmp, &path).map_err(|e| PeftError::io(&path, e))?;
        }
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    std::fs::remove_file(&jpath).map_err(|e| PeftError::io(&jpath, e))?;
    Ok(())
}

/// Remove temp files `.<fname>.tmp-<pid>-<n>` left in `dir` by a process that no longer runs
/// (killed during a [`write_atomic`]). Linux only (liveness is read from `/proc`); temp files of
/// live processes, including this one, are never touched. Failures are ignored.
fn remove_stale_temps(dir: &Path, fname: &str) {
    if !cfg!(target_os = "linux") || !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{fname}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            if let Ok(md) = std::fs::symlink_metadata(e.path()) {
                if md.is_file() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// serde_json's pretty printer with floats written as Python's `repr(float)` (`6e-05`,
/// `1e+16`, `1000000000000000.0`), where serde_json would write `6e-5`, `1e16`, `1e15`.
struct PyFloatFormatter<'a>(serde_json::ser::PrettyFormatter<'a>);

impl serde_json::ser::Formatter for PyFloatFormatter<'_> {
    fn write_f64<W: ?Sized + std::io::Write>(&mut self, w: &mut W, v: f64) -> std::io::Result<()> {
        w.write_all(crate::chat_template::py_float(v).as_bytes())
    }
    fn write_f32<W: ?Sized + std::io::Write>(&mut self, w: &mut W, v: f32) -> std::io::Result<()> {
        self.write_f64(w, v as f64)
    }
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.0.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.0.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object_value(w)
    }
}

/// JSON text as Python's `json.dumps(value, indent=2, sort_keys=True)` writes it
/// (`ensure_ascii`: non-ASCII characters escaped as `\uXXXX`; floats as Python's `repr`).
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
    let mut buf = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, PyFloatFormatter(serde_json::ser::PrettyFormatter::new()));
    serde::Serialize::serialize(&sort(v), &mut ser).expect("JSON values serialize");
    let text = String::from_utf8(buf).expect("serde_json writes UTF-8");
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
        // Python's float repr (OFT's `eps` default 6e-05).
        let f = serde_json::json!({"a": 6e-5, "b": 1e16, "c": 1e15, "d": 0.0001, "e": 0.5, "f": -2.5e-7});
        assert_eq!(python_json_dumps(&f), "{\n  \"a\": 6e-05,\n  \"b\": 1e+16,\n  \"c\": 1000000000000000.0,\n  \"d\": 0.0001,\n  \"e\": 0.5,\n  \"f\": -2.5e-07\n}");
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
