//! Differentiable building blocks.
//!
//! candle-nn's fused `softmax_last_dim`, `rms_norm`, `rope*` and the CPU flash-attention have no
//! backward pass: gradients through them are silently dropped. Everything here is written with
//! ops that candle differentiates, plus one custom op, [`frozen_linear`], whose backward returns
//! only the input gradient so that a frozen weight costs no weight-gradient matmul.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// `y = x W^T (+ b)` for a frozen `W` of shape `[out, in]`.
///
/// candle's matmul backward computes the gradient of both operands, so a plain matmul with a
/// frozen weight costs a full `[out, in]` weight-gradient product per layer — as much as full
/// fine-tuning. Here the product is computed without recording a graph, and a custom op that
/// passes the values through carries only `dL/dx = dL/dy · W` backwards.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    let dims = x.dims().to_vec();
    let last = *dims.last().unwrap_or(&0);
    if last != in_dim {
        candle_core::bail!(
            "frozen_linear: input {:?} does not match weight [{out_dim}, {in_dim}]",
            dims
        )
    }
    let n: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((n, in_dim))?;
    let y2 = if x2.track_op() {
        let y = x2.detach().matmul(&w.t()?)?;
        x2.apply_op2(&y, FrozenLinearBwd { w: w.clone() })?
    } else {
        x2.matmul(&w.t()?)?
    };
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = out_dim;
    let y = y2.reshape(out_dims)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// The custom op's forward hands back the precomputed product unchanged.
fn pass_through_cpu(s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    if !l2.is_contiguous() || l2.start_offset() != 0 {
        candle_core::bail!("frozen_linear: precomputed product must be contiguous")
    }
    Ok((s2.try_clone(l2)?, l2.shape().clone()))
}

struct FrozenLinearBwd {
    w: Tensor,
}

impl CustomOp2 for FrozenLinearBwd {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }
    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        pass_through_cpu(s2, l2)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // dL/dx = dL/dy · W; no gradient for the precomputed product nor for W.
        Ok((Some(grad_res.matmul(&self.w)?), None))
    }
}

/// The dtype reductions run in: f32 for half types, the input's own dtype otherwise (f32/f64).
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

/// RMSNorm as in transformers: normalise in f32 (or f64), scale by the weight, cast back.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(compute_dtype(dtype))?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    normed.broadcast_mul(weight)
}

/// Softmax over the last dimension built from differentiable ops.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension built from differentiable ops.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Rotary embedding with transformers' `rotate_half` layout.
/// `x`: `[B, H, T, D]`; `cos`, `sin`: `[B or 1, T, D/2]` (per-sequence positions allowed).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let half = d / 2;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?
        .unsqueeze(1)?
        .to_dtype(x.dtype())?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?
        .unsqueeze(1)?
        .to_dtype(x.dtype())?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// SiLU via `x * sigmoid(x)` with an explicit formula (differentiable in every dtype).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_linear_matches_matmul_and_gives_only_input_grad() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1., (2, 3, 5), &dev)?)?;
        let w = Tensor::randn(0f64, 1., (4, 5), &dev)?;
        let b = Tensor::randn(0f64, 1., 4, &dev)?;
        let y = frozen_linear(x.as_tensor(), &w, Some(&b))?;
        let y_ref = x.as_tensor().broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let diff = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        let loss = y.sqr()?.sum_all()?;
        let grads = loss.backward()?;
        let gx = grads.get(&x).expect("x gradient");
        let loss_ref = y_ref.sqr()?.sum_all()?;
        let grads_ref = loss_ref.backward()?;
        let gx_ref = grads_ref.get(&x).unwrap();
        let diff = (gx - gx_ref)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-10, "{diff}");
        assert!(
            grads.get(&w).is_none(),
            "a frozen weight must get no gradient"
        );
        Ok(())
    }

    #[test]
    fn softmax_and_log_softmax_have_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1., (3, 7), &dev)?)?;
        let p = softmax_last_dim(x.as_tensor())?;
        let lp = log_softmax_last_dim(x.as_tensor())?;
        let diff = (p.log()? - &lp)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12);
        let wts = Tensor::randn(0f64, 1., (3, 7), &dev)?;
        let g = (lp * &wts)?.sum_all()?.backward()?;
        let gx = g.get(&x).expect("log-softmax must pass a gradient");
        // d/dx sum(w * logsoftmax(x)) = w - softmax(x) * sum(w)
        let expect = (&wts - p.broadcast_mul(&wts.sum_keepdim(1)?)?)?;
        let diff = (gx - expect)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-10, "{diff}");
        Ok(())
    }
}
