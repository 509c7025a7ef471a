//! A quantized linear layer: `y = x · Wᵀ` with `W` kept quantized.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Tensor};

/// Weights of one linear layer, shared by every instance of the model (cloning is an `Arc` bump).
#[derive(Clone)]
pub struct Linear {
    inner: QMatMul,
    out_features: usize,
}

impl Linear {
    /// Wrap quantized weights of shape `[out, in]`.
    pub fn new(weight: Arc<QTensor>) -> candle_core::Result<Self> {
        let (out_features, _) = weight.shape().dims2()?;
        Ok(Self {
            inner: QMatMul::from_arc(weight)?,
            out_features,
        })
    }

    /// Number of outputs.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Apply to `x` of shape `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.inner.forward(x)
    }
}
