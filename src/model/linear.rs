//! A quantized linear layer: `y = x · Wᵀ` with `W` kept quantized.
//!
//! On CPU, Q8_0 weights run on our own int8 kernels ([`super::kernels`]): repacked once at load,
//! activations quantized once per call, tiled over tokens and columns, and computed on the calling
//! instance's own rayon pool (candle's quantized matmul runs on one process-global, spin-waiting
//! pool that serializes instances). Other types and devices use candle's `QMatMul`.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Tensor};

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

impl Linear {
    /// Wrap quantized weights of shape `[out, in]`.
    pub fn new(weight: Arc<QTensor>) -> candle_core::Result<Self> {
        let (out_features, _) = weight.shape().dims2()?;
        let inner = if weight.dtype() == GgmlDType::Q8_0 && weight.device().is_cpu() {
            Kind::Q8(Q8Matrix::from_qtensor(&weight)?)
        } else {
            Kind::Candle(QMatMul::from_arc(weight)?)
        };
        Ok(Self {
            inner,
            out_features,
        })
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
}
