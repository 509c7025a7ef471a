//! A quantized linear layer: `y = x · Wᵀ` with `W` kept quantized.
//!
//! On CPU, Q8_0 weights run on our own int8 kernels ([`super::kernels`]): repacked once at load,
//! activations quantized once per call, tiled over tokens and columns, and computed on the calling
//! instance's own rayon pool (candle's quantized matmul runs on one process-global, spin-waiting
//! pool that serializes instances). Other types and devices use candle's `QMatMul`.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use super::kernels::Q8Matrix;

#[derive(Clone)]
enum Kind {
    Q8(Q8Matrix),
    Candle(QMatMul),
}

/// Weights of one linear layer, shared by every instance of the model (cloning is an `Arc` bump).
#[derive(Clone)]
pub struct Linear {
    inner: Kind,
    out_features: usize,
}

fn runs_on_kernels(w: &QTensor) -> bool {
    w.dtype() == GgmlDType::Q8_0 && w.device().is_cpu()
}

impl Linear {
    /// Wrap quantized weights of shape `[out, in]`.
    pub fn new(weight: Arc<QTensor>) -> candle_core::Result<Self> {
        let (out_features, _) = weight.shape().dims2()?;
        let inner = if runs_on_kernels(&weight) {
            Kind::Q8(Q8Matrix::from_qtensor(&weight)?)
        } else {
            Kind::Candle(QMatMul::from_arc(weight)?)
        };
        Ok(Self {
            inner,
            out_features,
        })
    }

    /// Rows `ids` of the weight, dequantized (`[ids.len() * in]`), when the weight is in our
    /// packed Q8_0 form; `None` otherwise. Used for tied embeddings.
    pub fn rows_f32(&self, ids: &[u32]) -> Option<candle_core::Result<Vec<f32>>> {
        let Kind::Q8(w) = &self.inner else {
            return None;
        };
        let k = w.k();
        let mut out = vec![0f32; ids.len() * k];
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(k)) {
            if let Err(e) = w.dequantize_row(id as usize, row) {
                return Some(Err(candle_core::Error::Msg(e.to_string())));
            }
        }
        Some(Ok(out))
    }

    /// Number of outputs.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Apply to `x` of shape `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.inner {
            Kind::Q8(m) => m.forward(x),
            Kind::Candle(m) => m.forward(x),
        }
    }

    /// Apply to `m` host rows `x` (`[m, in]` row-major); returns `[m, out]`. The CPU forward
    /// pass's entry: Q8_0 weights go straight to the kernels with no tensor in between.
    pub fn forward_f32(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        let mut out = Vec::new();
        self.forward_f32_into(x, m, &mut out)?;
        Ok(out)
    }

    /// [`Self::forward_f32`] into `out`, resized to `[m, out]`: a forward pass reuses one buffer
    /// per role across its layers instead of allocating and zeroing each layer's output (a
    /// prefill spent 4 % of its time in `memset` and page faults on them).
    pub fn forward_f32_into(
        &self,
        x: &[f32],
        m: usize,
        out: &mut Vec<f32>,
    ) -> candle_core::Result<()> {
        match &self.inner {
            Kind::Q8(w) => q8_forward_f32_into(w, x, m, out),
            Kind::Candle(w) => {
                if m == 0 || !x.len().is_multiple_of(m) {
                    candle_core::bail!("linear input of {} values is not {m} rows", x.len());
                }
                let xt = Tensor::from_slice(x, (m, x.len() / m), &Device::Cpu)?;
                *out = w.forward(&xt)?.flatten_all()?.to_vec1()?;
                Ok(())
            }
        }
    }

    /// [`Self::forward_f32_into`] with input row `i` (`k` values) written by `row(i, dst)`; on
    /// the int8 kernels the row goes straight to the activation quantizer
    /// ([`Q8Matrix::matmul_rows_f32`]), elsewhere the rows are gathered first.
    pub fn forward_rows_into(
        &self,
        m: usize,
        k: usize,
        row: &(dyn Fn(usize, &mut [f32]) + Sync),
        out: &mut Vec<f32>,
    ) -> candle_core::Result<()> {
        match &self.inner {
            Kind::Q8(w) => q8_forward_rows_into(w, m, k, row, out),
            Kind::Candle(_) => self.forward_f32_into(&gather_rows(m, k, row), m, out),
        }
    }
}

/// The rows `row` writes, side by side: `[m, k]`.
fn gather_rows(m: usize, k: usize, row: &(dyn Fn(usize, &mut [f32]) + Sync)) -> Vec<f32> {
    let mut x = vec![0f32; m * k];
    for (i, r) in x.chunks_exact_mut(k.max(1)).enumerate() {
        row(i, r);
    }
    x
}

/// [`Q8Matrix::matmul_rows_f32`] after checking `k`.
fn q8_forward_rows_into(
    w: &Q8Matrix,
    m: usize,
    k: usize,
    row: &(dyn Fn(usize, &mut [f32]) + Sync),
    out: &mut Vec<f32>,
) -> candle_core::Result<()> {
    if k != w.k() {
        candle_core::bail!("linear input rows hold {k} values, expected {}", w.k());
    }
    out.resize(m * w.n_out(), 0.0);
    w.matmul_rows_f32(m, row, out);
    Ok(())
}

/// The kernel writes every element, so `out` keeps whatever it held where its length fits.
fn q8_forward_f32_into(
    w: &Q8Matrix,
    x: &[f32],
    m: usize,
    out: &mut Vec<f32>,
) -> candle_core::Result<()> {
    if x.len() != m * w.k() {
        candle_core::bail!(
            "linear input holds {} values, expected {m} × {}",
            x.len(),
            w.k()
        );
    }
    out.resize(m * w.n_out(), 0.0);
    w.matmul_f32(x, m, out);
    Ok(())
}

/// Several linear layers applied to the same input (Q/K/V, or gate/up), with outputs side by
/// side: `[m, Σ out]`. Q8_0 weights on CPU are stacked at load into one matrix, so the step runs
/// one kernel call (one activation quantization, one split over threads) for all of them.
#[derive(Clone)]
pub struct MultiLinear {
    inner: MultiKind,
    sizes: Vec<usize>,
}

#[derive(Clone)]
enum MultiKind {
    Stacked(Q8Matrix),
    Each(Vec<Linear>),
}

impl MultiLinear {
    /// Wrap weights `[out_i, in]` sharing `in`.
    pub fn new(weights: &[Arc<QTensor>]) -> candle_core::Result<Self> {
        let sizes = weights
            .iter()
            .map(|w| Ok(w.shape().dims2()?.0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let inner = if !weights.is_empty() && weights.iter().all(|w| runs_on_kernels(w)) {
            let parts: Vec<&QTensor> = weights.iter().map(|w| &**w).collect();
            MultiKind::Stacked(Q8Matrix::from_qtensors(&parts).map_err(candle_core::Error::wrap)?)
        } else {
            MultiKind::Each(
                weights
                    .iter()
                    .map(|w| Linear::new(w.clone()))
                    .collect::<candle_core::Result<_>>()?,
            )
        };
        Ok(Self { inner, sizes })
    }

    /// Outputs of each layer, in order.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// Sum of the outputs: the width of a row of [`Self::forward_f32`]'s result.
    pub fn width(&self) -> usize {
        self.sizes.iter().sum()
    }

    /// Each layer applied to `x` (`[.., in]`), as separate tensors.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        match &self.inner {
            MultiKind::Stacked(w) => {
                let y = w.forward(x)?;
                let last = y.rank() - 1;
                let mut off = 0;
                let mut outs = Vec::with_capacity(self.sizes.len());
                for &n in &self.sizes {
                    outs.push(y.narrow(last, off, n)?);
                    off += n;
                }
                Ok(outs)
            }
            MultiKind::Each(ls) => ls.iter().map(|l| l.forward(x)).collect(),
        }
    }

    /// Every layer applied to `m` host rows `x` (`[m, in]`); returns `[m, width]` with the layers'
    /// outputs side by side in each row.
    pub fn forward_f32(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        let mut out = Vec::new();
        self.forward_f32_into(x, m, &mut out)?;
        Ok(out)
    }

    /// [`Linear::forward_rows_into`] for every layer: `[m, width]` into `out`.
    pub fn forward_rows_into(
        &self,
        m: usize,
        k: usize,
        row: &(dyn Fn(usize, &mut [f32]) + Sync),
        out: &mut Vec<f32>,
    ) -> candle_core::Result<()> {
        match &self.inner {
            MultiKind::Stacked(w) => q8_forward_rows_into(w, m, k, row, out),
            MultiKind::Each(_) => self.forward_f32_into(&gather_rows(m, k, row), m, out),
        }
    }

    /// [`Self::forward_f32`] into `out`, resized to `[m, width]` (see [`Linear::forward_f32_into`]).
    pub fn forward_f32_into(
        &self,
        x: &[f32],
        m: usize,
        out: &mut Vec<f32>,
    ) -> candle_core::Result<()> {
        match &self.inner {
            MultiKind::Stacked(w) => q8_forward_f32_into(w, x, m, out),
            MultiKind::Each(ls) => {
                let width = self.width();
                out.resize(m * width, 0.0);
                let mut col = 0;
                for (l, &n) in ls.iter().zip(&self.sizes) {
                    let y = l.forward_f32(x, m)?;
                    for (r, yr) in y.chunks_exact(n).enumerate() {
                        out[r * width + col..r * width + col + n].copy_from_slice(yr);
                    }
                    col += n;
                }
                Ok(())
            }
        }
    }
}
