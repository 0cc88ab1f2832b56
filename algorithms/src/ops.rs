//! Differentiable building blocks written only with candle ops that have a backward pass.

use crate::error::{bail_shape, Result};
use candle_core::{DType, Tensor};

/// Numerically stable `softplus(x) = max(x, 0) + log(1 + exp(-|x|))`.
///
/// The gradient through candle's autograd is `sigmoid(x)` everywhere, including at `x = 0`
/// (candle's `relu'(0) = 1` and `abs'(0) = 1`, so `1 - 1/2 = sigmoid(0)`; a `maximum(x, 0)`
/// would split its tie 0.5/0.5 and give the wrong 0 there). Checked in `tests/ops.rs`.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let pos = x.relu()?;
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((pos + tail)?)
}

/// Numerically stable `log σ(x) = -softplus(-x)`; gradient `σ(-x)` = `1 - σ(x)`.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(softplus(&x.neg()?)?.neg()?)
}

/// `σ(x) = exp(log σ(x))`, differentiable.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(log_sigmoid(x)?.exp()?)
}

/// `torch.clamp(x, lo, hi)` with PyTorch's gradient convention: the gradient passes
/// where `lo <= x <= hi` (inclusive) and is zero outside. (candle's own `clamp` splits the
/// gradient 0.5/0.5 when `x` equals a bound exactly.)
pub fn clamp_like_torch(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let lo_t = x.ones_like()?.affine(0.0, lo)?;
    let hi_t = x.ones_like()?.affine(0.0, hi)?;
    let below = x.lt(lo)?;
    let above = x.gt(hi)?;
    let y = above.where_cond(&hi_t, x)?;
    Ok(below.where_cond(&lo_t, &y)?)
}

/// `torch.relu` with PyTorch's gradient convention (zero gradient at exactly 0).
pub fn relu_like_torch(x: &Tensor) -> Result<Tensor> {
    let zeros = x.zeros_like()?;
    Ok(x.gt(0.0)?.where_cond(x, &zeros)?)
}

/// `(x * mask).sum() / mask.sum()` over all elements (TRL `masked_mean`, no `dim`).
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(x.dtype())?;
    Ok(x.broadcast_mul(&m)?.sum_all()?.div(&m.sum_all()?)?)
}

thread_local! {
    static HOST_READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn count_host_read() {
    HOST_READS.with(|c| c.set(c.get() + 1));
}

/// How many device-to-host reads [`scalar_f64`] and [`read_f64s`] have made on this thread.
/// On CUDA each one waits for the device to finish its queued work, so the training step
/// keeps them to a few per step; the trainer logs the count per step as `host_reads`.
pub fn host_reads() -> u64 {
    HOST_READS.with(|c| c.get())
}

/// Read a scalar tensor (any float dtype) as `f64` (one counted host read).
pub fn scalar_f64(x: &Tensor) -> Result<f64> {
    count_host_read();
    Ok(x.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Read several scalar tensors (any float dtypes, one device) as `f64`s in one counted host read.
pub fn read_f64s(xs: &[Tensor]) -> Result<Vec<f64>> {
    if xs.is_empty() {
        return Ok(Vec::new());
    }
    let flat = xs
        .iter()
        .map(|x| x.to_dtype(DType::F64)?.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    count_host_read();
    Ok(Tensor::cat(&flat, 0)?.to_vec1::<f64>()?)
}

/// Mean of all elements as `f32` (for metrics).
pub fn mean_f32(x: &Tensor) -> Result<f32> {
    Ok(scalar_f64(&x.mean_all()?)? as f32)
}

/// Check that all tensors have the same shape as the first; `names` label them in the error.
pub(crate) fn same_shapes(op: &'static str, ts: &[(&str, &Tensor)]) -> Result<()> {
    let first = ts[0].1.dims();
    if ts.iter().any(|(_, t)| t.dims() != first) {
        let d = ts
            .iter()
            .map(|(n, t)| format!("{n}={:?}", t.dims()))
            .collect::<Vec<_>>()
            .join(", ");
        bail_shape!(op, "expected equal shapes, got {d}");
    }
    Ok(())
}

/// Check that a tensor has rank `rank`.
pub(crate) fn expect_rank(op: &'static str, name: &str, t: &Tensor, rank: usize) -> Result<()> {
    if t.rank() != rank {
        bail_shape!(op, "{name} must have rank {rank}, got shape {:?}", t.dims());
    }
    Ok(())
}
