//! The GGUF header reader: every field checked, every malformed one a [`HeaderError`] naming it.
//!
//! candle's own reader trusts `general.alignment` (0 divides by zero), multiplies tensor
//! dimensions unchecked and never checks that tensor data lies inside the file. This reader
//! follows the same format (v1 to v3, <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>)
//! and enforces llama.cpp's limits, so a hostile header ends in an error, never a panic or an
//! allocation of the size it claims. It builds candle's [`Content`], so the rest of the crate
//! and candle's tensor reads work unchanged on a header known to be consistent.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

/// The longest string a header may hold (llama.cpp's `GGUF_MAX_STRING_LENGTH`).
pub const MAX_STRING_BYTES: u64 = 1 << 30;
/// The most entries of an array, metadata keys or tensors (llama.cpp's cap).
pub const MAX_COUNT: u64 = 1 << 30;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;
/// Alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most entries reserved ahead of parsing: a count is only trusted as far as the entries read.
const PREALLOCATE: u64 = 4096;

/// What is wrong with a GGUF header. Each variant names the field and the value found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The first four bytes are not `GGUF`.
    #[error("bad magic {0:#010x} (expected \"GGUF\")")]
    BadMagic(u32),
    /// A version this reader does not know.
    #[error("unsupported GGUF version {0} (supported: 1, 2, 3)")]
    UnsupportedVersion(u32),
    /// The file ends inside a field.
    #[error("file ends at byte {file_len} while reading {what} at byte {offset}")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Where it starts.
        offset: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// A count (tensors, metadata entries, array length) above the cap or beyond the file.
    #[error("{what} count {count} is too large (at most {limit} fit)")]
    CountTooLarge {
        /// What is counted.
        what: &'static str,
        /// The count in the file.
        count: u64,
        /// The most allowed here.
        limit: u64,
    },
    /// A string longer than the cap or than the rest of the file.
    #[error("string of {len} bytes at byte {offset} does not fit (at most {limit})")]
    StringTooLong {
        /// Declared length.
        len: u64,
        /// Where it starts.
        offset: u64,
        /// The most allowed here.
        limit: u64,
    },
    /// A metadata key appears twice.
    #[error("metadata key `{0}` appears twice")]
    DuplicateKey(String),
    /// A value type code outside the format.
    #[error("metadata key `{key}`: unknown value type {code}")]
    UnknownValueType {
        /// Metadata key.
        key: String,
        /// The type code found.
        code: u32,
    },
    /// An array whose elements are arrays (llama.cpp refuses them too).
    #[error("metadata key `{0}`: nested arrays are not supported")]
    NestedArray(String),
    /// A boolean byte other than 0 or 1.
    #[error("metadata key `{key}`: boolean byte is {byte}, not 0 or 1")]
    BadBool {
        /// Metadata key.
        key: String,
        /// The byte found.
        byte: u8,
    },
    /// `general.alignment` that is not a power of two of at most 1 MiB, or not an integer.
    #[error("general.alignment must be a power of two between 1 and 1048576, found {0}")]
    BadAlignment(String),
    /// A tensor name appears twice.
    #[error("tensor `{0}` appears twice")]
    DuplicateTensor(String),
    /// More dimensions than ggml supports.
    #[error("tensor `{tensor}` has {dims} dimensions (at most {MAX_DIMS})")]
    TooManyDimensions {
        /// Tensor name.
        tensor: String,
        /// Declared number of dimensions.
        dims: u32,
    },
    /// The element count does not fit in 64 bits, or a dimension in `usize`.
    #[error("tensor `{tensor}`: dimensions {dims:?} overflow")]
    ShapeOverflow {
        /// Tensor name.
        tensor: String,
        /// Declared dimensions (innermost first, as stored).
        dims: Vec<u64>,
    },
    /// A ggml type code this reader does not know.
    #[error("tensor `{tensor}`: unknown ggml type {code}")]
    UnknownTensorType {
        /// Tensor name.
        tensor: String,
        /// The type code found.
        code: u32,
    },
    /// The row length is not a whole number of the type's blocks.
    #[error("tensor `{tensor}`: row of {row} values is not whole {dtype} blocks of {block}")]
    NotWholeBlocks {
        /// Tensor name.
        tensor: String,
        /// Its innermost dimension.
        row: u64,
        /// Its type.
        dtype: String,
        /// That type's block size.
        block: u64,
    },
    /// A tensor offset that is not a multiple of the alignment.
    #[error("tensor `{tensor}`: offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        /// Tensor name.
        tensor: String,
        /// Declared offset (from the start of the data section).
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// Tensor data that reaches past the end of the file.
    #[error("tensor `{tensor}`: {len} bytes at byte {start} run past the end of the file ({file_len} bytes)")]
    TensorOutOfFile {
        /// Tensor name.
        tensor: String,
        /// Absolute start of its data (saturated on overflow).
        start: u64,
        /// Its size in bytes (saturated on overflow).
        len: u64,
        /// Length of the file.
        file_len: u64,
    },
}

/// Value type codes of the format.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// Smallest encoding of one value of type `code` (for bounding array lengths by the file).
fn min_size(code: u32, prefix: u64) -> u64 {
    match code {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 => 8,
        _ => prefix, // strings: the length prefix alone
    }
}

/// ggml type codes candle can hold, with their numbers in the file.
fn ggml_type(code: u32) -> Option<GgmlDType> {
    Some(match code {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// A cursor over the file's bytes that reports what it was reading when they run out.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    magic: VersionedMagic,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], HeaderError> {
        let truncated = HeaderError::Truncated {
            what,
            offset: self.pos as u64,
            file_len: self.bytes.len() as u64,
        };
        let n = usize::try_from(n).map_err(|_| truncated.clone())?;
        let end = self.pos.checked_add(n).ok_or(truncated.clone())?;
        let out = self.bytes.get(self.pos..end).ok_or(truncated)?;
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], HeaderError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, HeaderError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, HeaderError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn prefix_size(&self) -> u64 {
        match self.magic {
            VersionedMagic::GgufV1 => 4,
            VersionedMagic::GgufV2 | VersionedMagic::GgufV3 => 8,
        }
    }

    /// A length or count: 32 bits in v1, 64 in v2 and v3.
    fn length(&mut self, what: &'static str) -> Result<u64, HeaderError> {
        match self.magic {
            VersionedMagic::GgufV1 => self.u32(what).map(u64::from),
            VersionedMagic::GgufV2 | VersionedMagic::GgufV3 => self.u64(what),
        }
    }

    /// A count of items of at least `min_each` bytes each, bounded by the cap and the file.
    fn count(&mut self, what: &'static str, min_each: u64) -> Result<u64, HeaderError> {
        let count = self.length(what)?;
        let limit = MAX_COUNT.min(self.remaining() / min_each.max(1));
        if count > limit {
            return Err(HeaderError::CountTooLarge { what, count, limit });
        }
        Ok(count)
    }

    /// A length-prefixed string; trailing NULs (written by some converters) are dropped and
    /// invalid UTF-8 is replaced, as candle and llama.cpp tolerate both.
    fn string(&mut self, what: &'static str) -> Result<String, HeaderError> {
        let offset = self.pos as u64;
        let len = self.length(what)?;
        let limit = MAX_STRING_BYTES.min(self.remaining());
        if len > limit {
            return Err(HeaderError::StringTooLong { len, offset, limit });
        }
        let mut bytes = self.take(len, what)?;
        while let [rest @ .., 0] = bytes {
            bytes = rest;
        }
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// One value of type `code` for metadata key `key`; arrays may not nest.
    fn value(&mut self, key: &str, code: u32, in_array: bool) -> Result<Value, HeaderError> {
        const V: &str = "a metadata value";
        Ok(match code {
            T_U8 => Value::U8(self.array::<1>(V)?[0]),
            T_I8 => Value::I8(self.array::<1>(V)?[0] as i8),
            T_U16 => Value::U16(u16::from_le_bytes(self.array(V)?)),
            T_I16 => Value::I16(i16::from_le_bytes(self.array(V)?)),
            T_U32 => Value::U32(self.u32(V)?),
            T_I32 => Value::I32(i32::from_le_bytes(self.array(V)?)),
            T_U64 => Value::U64(self.u64(V)?),
            T_I64 => Value::I64(i64::from_le_bytes(self.array(V)?)),
            T_F32 => Value::F32(f32::from_le_bytes(self.array(V)?)),
            T_F64 => Value::F64(f64::from_le_bytes(self.array(V)?)),
            T_BOOL => match self.array::<1>(V)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                byte => {
                    return Err(HeaderError::BadBool {
                        key: key.to_string(),
                        byte,
                    })
                }
            },
            T_STRING => Value::String(self.string("a string value")?),
            T_ARRAY if in_array => return Err(HeaderError::NestedArray(key.to_string())),
            T_ARRAY => {
                let item = self.u32("an array's element type")?;
                if item > T_F64 {
                    return Err(HeaderError::UnknownValueType {
                        key: key.to_string(),
                        code: item,
                    });
                }
                let len = self.count("array element", min_size(item, self.prefix_size()))?;
                let mut items = Vec::with_capacity(len.min(PREALLOCATE) as usize);
                for _ in 0..len {
                    items.push(self.value(key, item, true)?);
                }
                Value::Array(items)
            }
            code => {
                return Err(HeaderError::UnknownValueType {
                    key: key.to_string(),
                    code,
                })
            }
        })
    }
}

/// The alignment a file declares, checked as llama.cpp checks it (a power of two); the upper
/// bound keeps the data offset arithmetic far from overflow.
fn alignment(metadata: &HashMap<String, Value>) -> Result<u64, HeaderError> {
    let value = match metadata.get("general.alignment") {
        None => return Ok(DEFAULT_ALIGNMENT),
        Some(v) => v,
    };
    let n = match *value {
        Value::U8(v) => Some(u64::from(v)),
        Value::U16(v) => Some(u64::from(v)),
        Value::U32(v) => Some(u64::from(v)),
        Value::U64(v) => Some(v),
        Value::I8(v) => u64::try_from(v).ok(),
        Value::I16(v) => u64::try_from(v).ok(),
        Value::I32(v) => u64::try_from(v).ok(),
        Value::I64(v) => u64::try_from(v).ok(),
        _ => None,
    };
    match n {
        Some(n) if n.is_power_of_two() && n <= 1 << 20 => Ok(n),
        Some(n) => Err(HeaderError::BadAlignment(n.to_string())),
        None => Err(HeaderError::BadAlignment(format!("{value:?}"))),
    }
}

/// Parses and checks the header of a whole GGUF file held in `bytes`: metadata, tensor infos,
/// the data offset, and that every tensor's data lies inside the file at an aligned offset.
pub fn read_header(bytes: &[u8]) -> Result<Content, HeaderError> {
    let mut r = Reader {
        bytes,
        pos: 0,
        magic: VersionedMagic::GgufV3,
    };
    let magic = r.u32("the magic")?;
    // "GGUF" read little-endian; big-endian files (0x47475546) are not supported by candle's
    // tensor reads either.
    if magic != 0x4655_4747 {
        return Err(HeaderError::BadMagic(magic));
    }
    r.magic = match r.u32("the version")? {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => return Err(HeaderError::UnsupportedVersion(v)),
    };
    let prefix = r.prefix_size();
    let tensor_count = r.length("the tensor count")?;
    let metadata_count = r.length("the metadata count")?;
    // Each metadata entry takes at least a key length, a type and one byte; each tensor info at
    // least a name length, n_dims, a type and an offset.
    let min_kv = prefix + 4 + 1;
    let min_tensor = prefix + 4 + 4 + 8;
    for (what, count, each) in [
        ("metadata entry", metadata_count, min_kv),
        ("tensor", tensor_count, min_tensor),
    ] {
        let limit = MAX_COUNT.min(r.remaining() / each);
        if count > limit {
            return Err(HeaderError::CountTooLarge { what, count, limit });
        }
    }
    if metadata_count
        .saturating_mul(min_kv)
        .saturating_add(tensor_count.saturating_mul(min_tensor))
        > r.remaining()
    {
        return Err(HeaderError::CountTooLarge {
            what: "metadata entry and tensor",
            count: metadata_count.saturating_add(tensor_count),
            limit: r.remaining() / min_kv.min(min_tensor),
        });
    }

    let mut metadata = HashMap::with_capacity(metadata_count.min(PREALLOCATE) as usize);
    for _ in 0..metadata_count {
        let key = r.string("a metadata key")?;
        let code = r.u32("a metadata value type")?;
        let value = r.value(&key, code, false)?;
        if metadata.contains_key(&key) {
            return Err(HeaderError::DuplicateKey(key));
        }
        metadata.insert(key, value);
    }
    let alignment = alignment(&metadata)?;

    let mut infos = Vec::with_capacity(tensor_count.min(PREALLOCATE) as usize);
    for _ in 0..tensor_count {
        let name = r.string("a tensor name")?;
        let n_dims = r.u32("a tensor's dimension count")?;
        if n_dims > MAX_DIMS {
            return Err(HeaderError::TooManyDimensions {
                tensor: name,
                dims: n_dims,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.length("a tensor dimension")?);
        }
        let code = r.u32("a tensor type")?;
        let offset = r.u64("a tensor offset")?;
        infos.push((name, dims, code, offset));
    }
    let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;

    let file_len = bytes.len() as u64;
    let mut tensor_infos = HashMap::with_capacity(infos.len());
    for (name, dims, code, offset) in infos {
        let overflow = || HeaderError::ShapeOverflow {
            tensor: name.clone(),
            dims: dims.clone(),
        };
        let elems = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(overflow)?;
        let shape = dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).map_err(|_| overflow()))
            .collect::<Result<Vec<_>, _>>()?;
        usize::try_from(elems).map_err(|_| overflow())?;
        let Some(dtype) = ggml_type(code) else {
            return Err(HeaderError::UnknownTensorType { tensor: name, code });
        };
        let block = dtype.block_size() as u64;
        let row = dims.first().copied().unwrap_or(1);
        if row % block != 0 {
            return Err(HeaderError::NotWholeBlocks {
                tensor: name,
                row,
                dtype: format!("{dtype:?}"),
                block,
            });
        }
        if offset % alignment != 0 {
            return Err(HeaderError::MisalignedTensor {
                tensor: name,
                offset,
                alignment,
            });
        }
        let len = (elems / block).saturating_mul(dtype.type_size() as u64);
        let start = data_offset.saturating_add(offset);
        if start.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(HeaderError::TensorOutOfFile {
                tensor: name,
                start,
                len,
                file_len,
            });
        }
        let info = TensorInfo {
            ggml_dtype: dtype,
            shape: shape.into(),
            offset,
        };
        if tensor_infos.insert(name.clone(), info).is_some() {
            return Err(HeaderError::DuplicateTensor(name));
        }
    }
    Ok(Content {
        magic: r.magic,
        metadata,
        tensor_infos,
        tensor_data_offset: data_offset,
    })
}
