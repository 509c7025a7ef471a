//! Q8_0 weights × f32 activations on the CPU: the matmul every linear layer of the forward pass
//! runs, and where the node's speed is won.
//!
//! candle's own CPU path computes one dot product per (row, column) for most shapes; here the
//! weights are repacked once at load into 16-row panels ([`pack`]), each activation row is
//! quantized once per call to int8 blocks ([`quantize`]), and register-tiled micro-kernels apply
//! each loaded weight line to several activation rows with int8 dot-product instructions
//! (AVX-512 VNNI, AVX-VNNI, AVX2, or a scalar fallback, chosen once at run time: the crate is
//! built for x86-64-v3 so the wider paths must be detected, not compiled in). Work is split over
//! output panels on the *current* rayon pool, so each model instance keeps to its own pool.
//!
//! Numerics: activations are quantized as ggml's `quantize_row_q8_0` does (f16 block scales), so
//! results equal llama.cpp's and candle's Q8_0 vec-dot results up to f32 summation order.

mod avx256;
mod avx512;
mod pack;
mod quantize;
mod reference;
mod scalar;
#[cfg(test)]
mod tests;

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use pack::{Packed, BLOCK_BYTES, QK};
pub(crate) use quantize::quantize_row;
pub use reference::matmul_reference;

/// Values per Q8_0 block (one scale): what [`quantize_row`] quantizes at a time.
pub const Q8_0_BLOCK: usize = QK;

/// Why a Q8_0 matmul could not be built or run. Carries the limit and the value given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// The quantized tensor is not Q8_0.
    #[error("expected a Q8_0 tensor, got {0}")]
    DType(String),
    /// The weight tensor is not 2-D `[n_out, k]`.
    #[error("expected a 2-D weight [n_out, k], got shape {0:?}")]
    WeightRank(Vec<usize>),
    /// `k` must be a positive multiple of the Q8_0 block size.
    #[error("weight inner dimension k = {k} is not a positive multiple of {block}")]
    BlockMultiple {
        /// The block size, 32.
        block: usize,
        /// The `k` given.
        k: usize,
    },
    /// The raw data does not hold `n_out × k / 32` blocks.
    #[error("Q8_0 data holds {got} bytes, expected {expected}")]
    DataSize {
        /// Bytes the shape requires.
        expected: usize,
        /// Bytes found.
        got: usize,
    },
    /// The activation's last dimension is not `k`.
    #[error("activation last dimension {got} does not match the weight's k = {expected}")]
    InnerDim {
        /// The weight's `k`.
        expected: usize,
        /// The activation's last dimension.
        got: usize,
    },
    /// A row index past the weight's `n_out` (e.g. a token id past the embedding).
    #[error("row {row} is out of range for a weight of {n_out} rows")]
    Row {
        /// Row asked for.
        row: usize,
        /// Rows of the weight.
        n_out: usize,
    },
    /// The weight's bytes could not be read from its storage.
    #[error("weight data unreadable: {0}")]
    WeightData(String),
    /// Activations must be a CPU f32 tensor of rank ≥ 1.
    #[error("unsupported activation: {0}")]
    Activation(String),
}

/// Q8_0 weights of one linear layer `[n_out, k]`, repacked once at load for the micro-kernels.
///
/// Cloning is cheap (the packed data sits behind an [`Arc`]), so model instances share one copy.
#[derive(Clone)]
pub struct Q8Matrix {
    packed: Arc<Packed>,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q8Matrix")
            .field("n_out", &self.n_out())
            .field("k", &self.k())
            .finish()
    }
}

impl TryFrom<&QTensor> for Q8Matrix {
    type Error = KernelError;

    fn try_from(t: &QTensor) -> Result<Self, KernelError> {
        let (n, k) = check_weight(t.dtype(), t.shape().dims(), None)?;
        let data = t
            .data()
            .map_err(|e| KernelError::WeightData(e.to_string()))?;
        check_weight(t.dtype(), t.shape().dims(), data.len())?;
        isa_path();
        Ok(Self {
            packed: Arc::new(Packed::from_q8_0_bytes(&data, n, k)),
        })
    }
}

/// Checks a weight's dtype, shape and (when known) byte length; returns `(n_out, k)`.
fn check_weight(
    dtype: GgmlDType,
    dims: &[usize],
    data_len: impl Into<Option<usize>>,
) -> Result<(usize, usize), KernelError> {
    if dtype != GgmlDType::Q8_0 {
        return Err(KernelError::DType(format!("{dtype:?}")));
    }
    let &[n, k] = dims else {
        return Err(KernelError::WeightRank(dims.to_vec()));
    };
    if k == 0 || k % QK != 0 {
        return Err(KernelError::BlockMultiple { block: QK, k });
    }
    let expected = n * (k / QK) * BLOCK_BYTES;
    match data_len.into() {
        Some(got) if got != expected => Err(KernelError::DataSize { expected, got }),
        _ => Ok((n, k)),
    }
}

impl Q8Matrix {
    /// Repacks a candle Q8_0 `QTensor` of shape `[n_out, k]` (`k` a multiple of 32).
    pub fn from_qtensor(t: &QTensor) -> candle_core::Result<Self> {
        Self::try_from(t).map_err(candle_core::Error::wrap)
    }

    /// Stacks the rows of several Q8_0 weights sharing `k` into one matrix (`[Σ n_out, k]`), so
    /// layers reading the same activation (Q/K/V, gate/up) run as one call: one activation
    /// quantization, one parallel split and one pass of the thread pool instead of several.
    pub fn from_qtensors(parts: &[&QTensor]) -> Result<Self, KernelError> {
        let mut data = Vec::new();
        let (mut n, mut k) = (0, None);
        for t in parts {
            let (pn, pk) = check_weight(t.dtype(), t.shape().dims(), None)?;
            if let Some(k) = k {
                if k != pk {
                    return Err(KernelError::InnerDim {
                        expected: k,
                        got: pk,
                    });
                }
            }
            k = Some(pk);
            let bytes = t
                .data()
                .map_err(|e| KernelError::WeightData(e.to_string()))?;
            check_weight(t.dtype(), t.shape().dims(), bytes.len())?;
            data.extend_from_slice(&bytes);
            n += pn;
        }
        let Some(k) = k else {
            return Err(KernelError::WeightRank(vec![]));
        };
        isa_path();
        Ok(Self {
            packed: Arc::new(Packed::from_q8_0_bytes(&data, n, k)),
        })
    }

    /// Output features (rows of the weight).
    pub fn n_out(&self) -> usize {
        self.packed.n
    }

    /// Input features (columns of the weight).
    pub fn k(&self) -> usize {
        self.packed.k
    }

    /// Bytes of packed weights held (shared by every clone).
    pub fn size_in_bytes(&self) -> usize {
        self.packed.size_in_bytes()
    }

    /// Row `row` dequantized into `out` (length `k`): lets a tied embedding look tokens up in the
    /// output head's packed weights instead of keeping a second copy of the matrix.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), KernelError> {
        let p = &self.packed;
        if row >= p.n {
            return Err(KernelError::Row { row, n_out: p.n });
        }
        if out.len() != p.k {
            return Err(KernelError::InnerDim {
                expected: p.k,
                got: out.len(),
            });
        }
        for (b, chunk) in out.chunks_exact_mut(pack::QK).enumerate() {
            let d = p.scale(row, b);
            for (j, v) in chunk.iter_mut().enumerate() {
                *v = f32::from(p.quant(row, b * pack::QK + j)) * d;
            }
        }
        Ok(())
    }

    /// `y = x · Wᵀ` for a CPU f32 `x` of shape `[.., k]` (any leading dims, any strides); returns
    /// `[.., n_out]`. Errors, never panics, on a wrong dtype, device or last dimension.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        x.apply_op1_no_bwd(self)
    }

    /// The raw kernel: `x` is `[m, k]` row-major, `out` is `[m, n_out]`.
    ///
    /// # Panics
    /// If `x.len() != m * k` or `out.len() != m * n_out` (a caller bug, not bad input:
    /// [`Self::forward`] checks shapes and returns errors).
    pub fn matmul_f32(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(isa_path(), x, m, out)
    }

    /// [`Self::matmul_f32`] on an explicit path (tests and benches compare paths with it).
    ///
    /// # Panics
    /// As `matmul_f32`, and if `path` is not [`Path::available`] on this CPU.
    pub fn matmul_with(&self, path: Path, x: &[f32], m: usize, out: &mut [f32]) {
        let w = &*self.packed;
        assert_eq!(
            x.len(),
            m * w.k,
            "x holds {} values, expected m × k",
            x.len()
        );
        self.run(path, m, out, |buf, parallel| {
            buf.quantize(x, m, w.k, parallel)
        });
    }

    /// `y = x · Wᵀ` where row `i` of `x` (`k` values) is written by `row(i, dst)` just before it
    /// is quantized: an activation fused with the matmul's own pass over its input, so its
    /// `[m, k]` result never goes to memory (the SiLU product and the norms were memory-bound
    /// passes of their own). `out` is `[m, n_out]`.
    ///
    /// # Panics
    /// If `out.len() != m * n_out`.
    pub fn matmul_rows_f32(
        &self,
        m: usize,
        row: &(dyn Fn(usize, &mut [f32]) + Sync),
        out: &mut [f32],
    ) {
        let k = self.packed.k;
        self.run(isa_path(), m, out, |buf, parallel| {
            buf.quantize_rows(m, k, parallel, row)
        });
    }

    /// Quantizes the activations with `quantize` (told whether to split over threads), then
    /// runs the micro-kernels over the panels on the current rayon pool.
    fn run(
        &self,
        path: Path,
        m: usize,
        out: &mut [f32],
        quantize: impl for<'b> FnOnce(&'b mut quantize::ActBuf, bool) -> quantize::ActQ<'b>,
    ) {
        let w = &*self.packed;
        assert_eq!(
            out.len(),
            m * w.n,
            "out holds {} values, expected m × n_out",
            out.len()
        );
        assert!(
            path.available(),
            "kernel path {path:?} is not supported by this CPU"
        );
        if m == 0 || w.n == 0 {
            return;
        }
        let tasks = task_count(m, w);
        quantize::with_scratch(|buf| {
            let act = quantize(buf, tasks > 1);
            let ptr = OutPtr {
                ptr: out.as_mut_ptr(),
                n: w.n,
            };
            let run = |p0: usize, p1: usize| {
                // SAFETY: `ptr` covers `out` ([m, n]); each call owns the columns of panels
                // p0..p1 and the ranges below are disjoint; `path` is available (asserted).
                unsafe { run_panels(path, w, &act, p0, p1, ptr) }
            };
            if tasks <= 1 {
                run(0, w.n_panels);
            } else {
                (0..tasks).into_par_iter().for_each(|t| {
                    run(t * w.n_panels / tasks, (t + 1) * w.n_panels / tasks);
                });
            }
        });
    }
}

/// Multiply-accumulates per task below which splitting over threads costs more than it saves
/// (a rayon wake-up is a few µs; one task at ~40 GMAC/s does this much in ~10 µs).
const MIN_MACS_PER_TASK: usize = 400_000;

/// How many contiguous panel ranges to run in parallel on the current rayon pool.
fn task_count(m: usize, w: &Packed) -> usize {
    let macs = m * w.n * w.k;
    rayon::current_num_threads()
        .min(w.n_panels)
        .min((macs / MIN_MACS_PER_TASK).max(1))
}

/// Raw `[m, n]` row-major output shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr {
    ptr: *mut f32,
    n: usize,
}

// SAFETY: tasks write disjoint (row, column) cells of one live `&mut [f32]` that outlives them.
unsafe impl Send for OutPtr {}
// SAFETY: as above; no cell is read or written by two tasks.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Pointer to cell (`row`, `col`).
    ///
    /// # Safety
    /// `row < m` and `col <= n` for the buffer this was made from.
    #[inline(always)]
    pub(crate) unsafe fn at(self, row: usize, col: usize) -> *mut f32 {
        // SAFETY: in bounds per the contract.
        unsafe { self.ptr.add(row * self.n + col) }
    }

    /// Writes cell (`row`, `col`).
    ///
    /// # Safety
    /// As [`Self::at`] with `col < n`, and no other thread touches this cell.
    #[inline(always)]
    pub(crate) unsafe fn write(self, row: usize, col: usize, v: f32) {
        // SAFETY: per the contract.
        unsafe { *self.at(row, col) = v }
    }
}

/// An instruction-set path of the micro-kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// 512-bit `vpdpbusd` (AVX-512 F/BW/VL/VNNI).
    Avx512Vnni,
    /// 256-bit `vpdpbusd` (AVX-VNNI).
    AvxVnni,
    /// `vpmaddubsw` + `vpmaddwd` (AVX2).
    Avx2,
    /// Portable integer code.
    Scalar,
}

impl Path {
    /// Every path, fastest first.
    pub const ALL: [Path; 4] = [Path::Avx512Vnni, Path::AvxVnni, Path::Avx2, Path::Scalar];

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Path::Avx512Vnni => {
                    is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vl")
                        && is_x86_feature_detected!("avx512vnni")
                }
                Path::AvxVnni => {
                    is_x86_feature_detected!("avx2")
                        && is_x86_feature_detected!("fma")
                        && is_x86_feature_detected!("f16c")
                        && is_x86_feature_detected!("avxvnni")
                }
                Path::Avx2 => {
                    is_x86_feature_detected!("avx2")
                        && is_x86_feature_detected!("fma")
                        && is_x86_feature_detected!("f16c")
                }
                Path::Scalar => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Path::Scalar
        }
    }

    /// The name [`isa`] reports.
    pub fn name(self) -> &'static str {
        match self {
            Path::Avx512Vnni => "avx512vnni",
            Path::AvxVnni => "avxvnni",
            Path::Avx2 => "avx2",
            Path::Scalar => "scalar",
        }
    }
}

/// The fastest path on this CPU, detected once; the first detection logs the choice (see
/// [`isa_report`]), so a node says at load which kernels decide its speed.
fn isa_path() -> Path {
    static PATH: OnceLock<Path> = OnceLock::new();
    *PATH.get_or_init(|| {
        let path = Path::ALL
            .into_iter()
            .find(|p| p.available())
            .unwrap_or(Path::Scalar);
        tracing::info!(
            kernel = path.name(),
            "Q8_0 int8 kernel path: {}",
            report_for(path)
        );
        path
    })
}

/// Which instruction set the kernel dispatches to on this CPU ("avx512vnni", "avxvnni", "avx2",
/// "scalar"); worth logging at start-up since it decides the node's speed.
pub fn isa() -> &'static str {
    isa_path().name()
}

/// One line on the dispatch: the path picked, the lower paths this CPU could also run, the paths
/// it cannot, and AMX (detected, but no AMX kernel is built: see [`amx`]).
pub fn isa_report() -> String {
    report_for(isa_path())
}

fn report_for(picked: Path) -> String {
    let (ok, missing): (Vec<Path>, Vec<Path>) = Path::ALL.into_iter().partition(|p| p.available());
    let names = |v: &[Path]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
        }
    };
    format!(
        "picked {}; runnable here: {}; not on this CPU: {}; AMX: {}",
        picked.name(),
        names(&ok),
        names(&missing),
        amx::status()
    )
}

pub mod amx {
    //! AMX detection. Intel's AMX tiles do 8× the int8 work per cycle of AVX-512 VNNI, but no AMX
    //! kernel is built yet (the machines it was developed on have none to test it), so the
    //! dispatcher detects AMX, says so, and runs the best VNNI path instead.

    use std::sync::OnceLock;

    /// What this CPU and OS offer for AMX int8.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum AmxStatus {
        /// CPUID reports no AMX-TILE / AMX-INT8.
        Absent,
        /// The CPU has AMX but the kernel refused the tile-data permission
        /// (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), so tiles cannot be used.
        Denied,
        /// Usable, but this build has no AMX kernel: the VNNI path runs.
        NoKernel,
    }

    impl std::fmt::Display for AmxStatus {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(match self {
                AmxStatus::Absent => "absent (CPUID has no amx_tile/amx_int8), skipped",
                AmxStatus::Denied => "present but the OS denied tile permission, skipped",
                AmxStatus::NoKernel => "present, but no AMX kernel is built: using the VNNI path",
            })
        }
    }

    /// AMX on this machine, detected once.
    pub fn status() -> AmxStatus {
        static S: OnceLock<AmxStatus> = OnceLock::new();
        *S.get_or_init(detect)
    }

    #[cfg(target_arch = "x86_64")]
    fn detect() -> AmxStatus {
        use core::arch::x86_64::__cpuid_count;
        // CPUID exists on every x86-64 CPU; leaf 7 is valid when leaf 0 reports it.
        if __cpuid_count(0, 0).eax < 7 {
            return AmxStatus::Absent;
        }
        let leaf7 = __cpuid_count(7, 0);
        let tile = leaf7.edx & (1 << 24) != 0;
        let int8 = leaf7.edx & (1 << 25) != 0;
        if !(tile && int8) {
            return AmxStatus::Absent;
        }
        if request_tile_permission() {
            AmxStatus::NoKernel
        } else {
            AmxStatus::Denied
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn detect() -> AmxStatus {
        AmxStatus::Absent
    }

    /// Linux gives a process AMX tile state only on request.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn request_tile_permission() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes this process's permitted
        // XSAVE features; it reads and writes no memory of ours.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    #[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
    fn request_tile_permission() -> bool {
        false
    }
}

/// Runs `path` over panels `p0..p1`.
///
/// # Safety
/// `path.available()`; `out` covers `[act.m, w.n]`; no other thread writes these panels' columns.
unsafe fn run_panels(
    path: Path,
    w: &Packed,
    act: &quantize::ActQ<'_>,
    p0: usize,
    p1: usize,
    out: OutPtr,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match path {
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Vnni => avx512::panels(w, act, p0, p1, out),
            #[cfg(target_arch = "x86_64")]
            Path::AvxVnni => avx256::panels_avxvnni(w, act, p0, p1, out),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => avx256::panels_avx2(w, act, p0, p1, out),
            _ => scalar::panels(w, act, p0, p1, out),
        }
    }
}

impl Q8Matrix {
    /// Checks an activation shape and returns `(m, output dims)`.
    fn check_dims(&self, dims: &[usize]) -> Result<(usize, Vec<usize>), KernelError> {
        let Some((&last, lead)) = dims.split_last() else {
            return Err(KernelError::Activation("rank-0 activation".into()));
        };
        if last != self.k() {
            return Err(KernelError::InnerDim {
                expected: self.k(),
                got: last,
            });
        }
        let mut out = lead.to_vec();
        out.push(self.n_out());
        Ok((lead.iter().product(), out))
    }
}

impl CustomOp1 for Q8Matrix {
    fn name(&self) -> &'static str {
        "q8_0-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, out_dims) = self
            .check_dims(layout.dims())
            .map_err(candle_core::Error::wrap)?;
        let CpuStorage::F32(data) = storage else {
            return Err(candle_core::Error::wrap(KernelError::Activation(format!(
                "dtype {:?}, expected f32",
                storage.dtype()
            ))));
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::wrap(KernelError::Activation(
                "non-contiguous layout".into(),
            )));
        };
        let mut out = vec![0f32; m * self.n_out()];
        self.matmul_f32(&data[start..end], m, &mut out);
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}
