//! A GGUF file opened for reading: memory-mapped, header parsed once, tensors read on demand.
//!
//! The header is read by [`header`], which checks every field (counts, strings, alignment,
//! shapes, tensor extents) so a corrupt or hostile file is a [`HeaderError`], never a panic or an
//! allocation of the size it claims.

pub mod header;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use memmap2::Mmap;

pub use header::HeaderError;

use super::ModelError;

/// An open GGUF file. Tensor reads copy from the page cache into candle storage once.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    content: Content,
}

impl GgufFile {
    /// Open and parse the header of `path`.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file truncated under us is a user error that ends in
        // SIGBUS, the same contract as llama.cpp's mmap loading.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let content = header::read_header(&mmap[..]).map_err(|error| ModelError::BadHeader {
            path: path.to_path_buf(),
            error,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            content,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Parsed header: metadata and tensor infos.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// Size of the file in bytes.
    pub fn len(&self) -> usize {
        self.mmap.len()
    }

    /// True for an empty file (never the case for a parsed GGUF).
    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }

    /// The raw bytes of the whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// True when the file has a tensor of this name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Read one tensor onto `device`.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<QTensor, ModelError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        info.read(
            &mut Cursor::new(&self.mmap[..]),
            self.content.tensor_data_offset,
            device,
        )
        .map_err(|e| ModelError::InvalidGguf {
            path: self.path.clone(),
            reason: format!("tensor `{name}`: {e}"),
        })
    }

    /// One tensor's bytes as stored, borrowed from the map: no copy, so a converter can read
    /// them a chunk at a time (candle's own read copies the whole tensor twice).
    pub fn raw_tensor(&self, name: &str) -> Result<RawTensor<'_>, ModelError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let bad = |reason: String| ModelError::InvalidGguf {
            path: self.path.clone(),
            reason: format!("tensor `{name}`: {reason}"),
        };
        let dtype = info.ggml_dtype;
        let dims = info.shape.dims().to_vec();
        let elems = info.shape.elem_count();
        if !elems.is_multiple_of(dtype.block_size()) {
            return Err(bad(format!(
                "{elems} values are not whole {dtype:?} blocks of {}",
                dtype.block_size()
            )));
        }
        let len = (elems / dtype.block_size())
            .checked_mul(dtype.type_size())
            .ok_or_else(|| bad("size overflows".into()))?;
        let start = self
            .content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| bad("offset overflows".into()))?;
        let bytes = start
            .checked_add(len)
            .and_then(|end| self.mmap.get(start..end))
            .ok_or_else(|| {
                bad(format!(
                    "needs {len} bytes at offset {start}, the file has {}",
                    self.mmap.len()
                ))
            })?;
        Ok(RawTensor { dtype, dims, bytes })
    }

    /// Typed metadata access.
    pub fn meta(&self) -> Meta<'_> {
        Meta(&self.content)
    }
}

/// A tensor as stored in the file: its type, shape (`[rows, .., k]`, candle's order) and bytes.
pub struct RawTensor<'a> {
    /// Storage type of the bytes.
    pub dtype: GgmlDType,
    /// Shape, outermost first (the last dimension is the row length).
    pub dims: Vec<usize>,
    /// `elem_count / block_size × type_size` bytes, borrowed from the map.
    pub bytes: &'a [u8],
}

/// Typed, error-reporting access to GGUF metadata.
#[derive(Clone, Copy)]
pub struct Meta<'a>(pub &'a Content);

impl<'a> Meta<'a> {
    /// The raw value, if present.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.metadata.get(key)
    }

    fn required(&self, key: &str) -> Result<&'a Value, ModelError> {
        self.get(key)
            .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))
    }

    fn bad(key: &str, e: impl std::fmt::Display) -> ModelError {
        ModelError::BadMetadata {
            key: key.to_string(),
            reason: e.to_string(),
        }
    }

    /// A required unsigned integer (any integer width, non-negative).
    pub fn usize(&self, key: &str) -> Result<usize, ModelError> {
        value_to_u64(self.required(key)?)
            .map(|v| v as usize)
            .ok_or_else(|| Self::bad(key, "expected a non-negative integer"))
    }

    /// An optional unsigned integer.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        self.get(key).map(|_| self.usize(key)).transpose()
    }

    /// A required float (f32, f64 or an integer).
    pub fn f64(&self, key: &str) -> Result<f64, ModelError> {
        match self.required(key)? {
            Value::F32(v) => Ok(*v as f64),
            Value::F64(v) => Ok(*v),
            other => value_to_u64(other)
                .map(|v| v as f64)
                .ok_or_else(|| Self::bad(key, "expected a number")),
        }
    }

    /// An optional float.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        self.get(key).map(|_| self.f64(key)).transpose()
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&'a str, ModelError> {
        match self.required(key)? {
            Value::String(s) => Ok(s),
            _ => Err(Self::bad(key, "expected a string")),
        }
    }

    /// An optional string.
    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>, ModelError> {
        self.get(key).map(|_| self.str(key)).transpose()
    }

    /// An optional `u32` (a token id, say).
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>, ModelError> {
        match self.opt_usize(key)? {
            None => Ok(None),
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| Self::bad(key, format!("{n} does not fit in 32 bits"))),
        }
    }

    fn array(&self, key: &str) -> Result<&'a Vec<Value>, ModelError> {
        match self.required(key)? {
            Value::Array(a) => Ok(a),
            v => Err(Self::bad(
                key,
                format!("expected an array, found {:?}", v.value_type()),
            )),
        }
    }

    /// A required array of strings.
    pub fn string_array(&self, key: &str) -> Result<Vec<&'a str>, ModelError> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(Self::bad(
                    key,
                    format!("entry {i} is {:?}, not a string", v.value_type()),
                )),
            })
            .collect()
    }

    /// An optional array of integers.
    pub fn int_array(&self, key: &str) -> Result<Option<Vec<i64>>, ModelError> {
        if self.get(key).is_none() {
            return Ok(None);
        }
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                value_to_i64(v).ok_or_else(|| {
                    Self::bad(
                        key,
                        format!("entry {i} is {:?}, not an integer", v.value_type()),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// A required array of floats.
    pub fn f32_array(&self, key: &str) -> Result<Vec<f32>, ModelError> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                v => Err(Self::bad(
                    key,
                    format!("entry {i} is {:?}, not a float", v.value_type()),
                )),
            })
            .collect()
    }

    /// An optional boolean.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(Self::bad(key, "expected a boolean")),
        }
    }
}

fn value_to_i64(v: &Value) -> Option<i64> {
    match *v {
        Value::U64(x) => i64::try_from(x).ok(),
        Value::I64(x) => Some(x),
        ref other => value_to_u64(other).map(|x| x as i64).or(match *other {
            Value::I8(x) => Some(x.into()),
            Value::I16(x) => Some(x.into()),
            Value::I32(x) => Some(x.into()),
            _ => None,
        }),
    }
}

fn value_to_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}
