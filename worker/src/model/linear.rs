//! A projection weight in the form its fastest kernel wants.
//!
//! On a CPU with AVX2 + FMA, Q4_1 and Q8_0 weights are repacked for Orchard's own kernels
//! (`crate::kernels`), which candle lacks for x86 Q4_1; every other dtype, CPU and device
//! goes through candle's `QMatMul` (which also wraps dense f32 weights). Projections that read
//! the same input (q/k/v, gate/up) are stacked row-wise at load time into one matrix, so the
//! activations are quantized once and one parallel pass streams all their weights.

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};

use crate::kernels::q4_1::{Q4_1Matrix, Q8_1Activations};
use crate::kernels::q8_0::Q8_0Matrix;
use crate::kernels::Isa;

thread_local! {
    /// The Q8_1 activations of this thread's last Q4_1 product, kept so that the next one
    /// reuses their buffers (see [`Q8_1Activations::quantize_into`]).
    static ACTIVATIONS: RefCell<Q8_1Activations> = RefCell::default();
}

/// One (possibly stacked) weight matrix `[n_out, k]`.
#[derive(Debug)]
pub enum Linear {
    /// Q4_1 weights for the AVX2 kernel (CPU only).
    Q4_1(Q4_1Matrix),
    /// Q8_0 weights for the AVX2 kernel (CPU only); shared with the token embedding when the
    /// model ties them.
    Q8_0(Arc<Q8_0Matrix>),
    /// Anything else: candle's quantized or dense matmul, on any device.
    Candle(QMatMul),
}

impl Linear {
    /// Stacks CPU-resident quantized matrices that share `k` and picks the kernel for `device`.
    pub fn from_qtensors(parts: Vec<QTensor>, device: &Device) -> Result<Self> {
        let qt = stack_qtensors(parts)?;
        let own_kernels = device.is_cpu() && Isa::detect() != Isa::Scalar;
        match qt.dtype() {
            GgmlDType::Q4_1 if own_kernels => Ok(Linear::Q4_1(Q4_1Matrix::from_qtensor(&qt)?)),
            GgmlDType::Q8_0 if own_kernels => {
                Ok(Linear::Q8_0(Arc::new(Q8_0Matrix::from_qtensor(&qt)?)))
            }
            _ if device.is_cpu() => Ok(Linear::Candle(QMatMul::from_qtensor(qt)?)),
            dtype => {
                let dims = qt.shape().clone();
                let storage = QStorage::from_data(qt.data()?, device, dtype)?;
                Ok(Linear::Candle(QMatMul::from_qtensor(QTensor::new(
                    storage, dims,
                )?)?))
            }
        }
    }

    /// Stacks dense `[n_i, k]` weights (safetensors) into one f32 matrix on their device.
    pub fn from_dense(parts: &[Tensor]) -> Result<Self> {
        let w = Tensor::cat(parts, 0)?.to_dtype(DType::F32)?;
        Ok(Linear::Candle(QMatMul::Tensor(w)))
    }

    /// `x @ W^T` for `x: [t, k]` on the CPU; returns `[t, n_out]`.
    pub fn forward_cpu(&self, x: &[f32], t: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; t * self.n_out()];
        self.forward_cpu_into(x, t, &mut out)?;
        Ok(out)
    }

    /// Output features (rows of W).
    pub fn n_out(&self) -> usize {
        match self {
            Linear::Q4_1(w) => w.n_out(),
            Linear::Q8_0(w) => w.n_out(),
            Linear::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.dim(0).unwrap_or(0),
            Linear::Candle(QMatMul::QTensor(w)) => w.shape().dims().first().copied().unwrap_or(0),
        }
    }

    /// `x @ W^T` for `x: [t, k]` on the CPU into `out: [t, n_out]`, every element of which is
    /// written (so a reused buffer needs no zeroing).
    pub fn forward_cpu_into(&self, x: &[f32], t: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Linear::Q4_1(w) => ACTIVATIONS.with_borrow_mut(|act| {
                act.quantize_into(x, t, w.k());
                w.matmul_q8(act, out);
            }),
            Linear::Q8_0(w) => w.matmul(x, t, out),
            Linear::Candle(m) => {
                let k = x.len() / t.max(1);
                let xs = Tensor::from_slice(x, (t, k), &Device::Cpu)?;
                let y = m.forward(&xs)?.flatten_all()?.to_vec1::<f32>()?;
                if y.len() != out.len() {
                    candle_core::bail!("Linear: {} outputs for a buffer of {}", y.len(), out.len());
                }
                out.copy_from_slice(&y);
            }
        }
        Ok(())
    }

    /// `x @ W^T` for a `[t, k]` tensor on the weight's device.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Q4_1(w) => w.forward(x),
            Linear::Q8_0(w) => {
                let (t, _) = x.dims2()?;
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let mut out = vec![0f32; t * w.n_out()];
                w.matmul(&xs, t, &mut out);
                Tensor::from_vec(out, (t, w.n_out()), x.device())
            }
            Linear::Candle(m) => m.forward(x),
        }
    }
}

/// One `QTensor` whose rows are the rows of `parts` in order (ggml blocks run along rows, so
/// row-major block data concatenates).
fn stack_qtensors(mut parts: Vec<QTensor>) -> Result<QTensor> {
    if parts.len() == 1 {
        if let Some(one) = parts.pop() {
            return Ok(one);
        }
    }
    let Some(first) = parts.first() else {
        candle_core::bail!("stack_qtensors: no matrices");
    };
    let (dtype, (_, k)) = (first.dtype(), first.shape().dims2()?);
    let mut rows = 0;
    let mut data = Vec::new();
    for p in &parts {
        let (n, pk) = p.shape().dims2()?;
        if p.dtype() != dtype || pk != k {
            candle_core::bail!(
                "stack_qtensors: cannot stack {:?} [{n}, {pk}] onto {dtype:?} [_, {k}]",
                p.dtype()
            );
        }
        rows += n;
        data.extend_from_slice(&p.data()?);
    }
    let storage = QStorage::from_data(Cow::Owned(data), &Device::Cpu, dtype)?;
    QTensor::new(storage, (rows, k))
}
