//! Differentiable building blocks.
//!
//! candle-nn's fused `softmax_last_dim`, `rms_norm`, `rope*` and the CPU flash-attention have no
//! backward pass: gradients through them are silently dropped. Everything here is written with
//! ops that candle differentiates, plus one custom op, [`frozen_linear`], whose backward returns
//! only the input gradient so that a frozen weight costs no weight-gradient matmul.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};

/// `y = x W^T (+ b)` for a frozen `W` of shape `[out, in]`.
///
/// candle's matmul backward computes the gradient of both operands, so a plain matmul with a
/// frozen weight costs a full `[out, in]` weight-gradient product per layer — as much as full
/// fine-tuning. Here the product runs inside a custom op (the backend's own matmul, no copy)
/// whose backward returns only `dL/dx = dL/dy · W`.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    frozen_linear_t(x, w, None, None, b)
}

/// A frozen weight's `W^T` packed for the few-rows kernel ([`crate::kernels::Panels`]).
pub type Panels = std::sync::Arc<crate::kernels::Panels>;

/// `x [m, k] · panels` with the panel kernel when it applies (f32, CPU, contiguous); `None`
/// otherwise.
fn panel_product(x: &Tensor, panels: &Panels) -> Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    let (pk, n) = panels.dims();
    if k != pk || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (xs, xl) = x.storage_and_layout();
    let Storage::Cpu(xs) = &*xs else {
        return Ok(None);
    };
    let Some(xv) = contiguous::<f32>(xs, xl) else {
        return Ok(None);
    };
    let mut y = vec![0f32; m * n];
    if !panels.matmul(&mut y, false, xv, k, m, 1.0) {
        return Ok(None);
    }
    Ok(Some(Tensor::from_vec(y, (m, n), x.device())?))
}

/// [`frozen_linear`] with `wt`, a contiguous copy of `W^T [in, out]`, used for the forward
/// product when given (the layout the CPU matmul packs fastest), and `panels`, `W^T` packed
/// for align's kernel, used instead when given; backward reads `w`.
pub fn frozen_linear_t(
    x: &Tensor,
    w: &Tensor,
    wt: Option<&Tensor>,
    panels: Option<&Panels>,
    b: Option<&Tensor>,
) -> Result<Tensor> {
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
        x2.apply_op1(FrozenLinear {
            w: w.clone(),
            wt: wt.cloned(),
            panels: panels.cloned(),
        })?
    } else {
        let few = match panels {
            Some(p) => panel_product(&x2, p)?,
            None => None,
        };
        match (few, wt) {
            (Some(y), _) => y,
            (None, Some(wt)) => x2.matmul(wt)?,
            (None, None) => x2.matmul(&w.t()?)?,
        }
    };
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = out_dim;
    let y = y2.reshape(out_dims)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `x [n, in] -> x W^T [n, out]` with an input-only backward.
struct FrozenLinear {
    w: Tensor,
    /// `W^T` contiguous, for the forward product (see [`frozen_linear_t`]).
    wt: Option<Tensor>,
    /// `W^T` packed for the few-rows kernel (see [`frozen_linear_t`]).
    panels: Option<Panels>,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = l.shape().dims2()?;
        if let (Some(p), Some(x)) = (&self.panels, contiguous::<f32>(s, l)) {
            let out = p.dims().1;
            let mut y = vec![0f32; n * out];
            if p.dims().0 == k && p.matmul(&mut y, false, x, k, n, 1.0) {
                return Ok((CpuStorage::F32(y), Shape::from((n, out))));
            }
        }
        let wt = match &self.wt {
            Some(wt) => wt.clone(),
            None => self.w.t()?,
        };
        let (ws, wl) = wt.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("frozen_linear: weight is not on the CPU")
        };
        let out = wl.dims()[1];
        Ok((s.matmul(ws, (1, n, out, k), l, wl)?, Shape::from((n, out))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, k) = l.shape().dims2()?;
        let wt = self.w.t()?;
        let (ws, wl) = wt.storage_and_layout();
        let Storage::Cuda(ws) = &*ws else {
            candle_core::bail!("frozen_linear: weight is not on the CUDA device")
        };
        let out = wl.dims()[1];
        Ok((s.matmul(ws, (1, n, out, k), l, wl)?, Shape::from((n, out))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // dL/dx = dL/dy · W; W is frozen and gets nothing.
        Ok(Some(grad_res.matmul(&self.w)?.detach()))
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
/// f32/f64 on the CPU run the fused kernel [`crate::fused::rms_norm`] (same function).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::fused::fusable(x) && weight.dtype() == x.dtype() {
        return crate::fused::rms_norm(x, weight, eps);
    }
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
/// f32/f64 on the CPU run the fused kernel [`crate::fused::rope`].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if crate::fused::fusable(x) {
        return crate::fused::rope(x, cos, sin);
    }
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

/// The SwiGLU product `silu(gate) · up`; one fused op for f32/f64 on the CPU.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if crate::fused::fusable(gate) && up.dtype() == gate.dtype() {
        return crate::fused::silu_mul(gate, up);
    }
    gate.silu()? * up
}

/// Attention probabilities `softmax(scale · scores + mask)` in the compute dtype, cast back to
/// the scores' dtype; `scores [B, H, T, S]`, `mask [B or 1, 1, T, S]`. One fused op for f32/f64
/// on the CPU.
pub fn attention_probs(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if crate::fused::fusable(scores) && mask.dtype() == scores.dtype() {
        return crate::fused::masked_softmax(scores, mask, scale);
    }
    let dtype = scores.dtype();
    let scores = (scores * scale)?
        .to_dtype(compute_dtype(dtype))?
        .broadcast_add(mask)?;
    softmax_last_dim(&scores)?.to_dtype(dtype)
}

/// `y = x W^T + s · (x A^T) B^T` for a frozen `W [out, in]` and trainable `A [r, in]`,
/// `B [out, r]`, as one op: the LoRA branch is added into the base product's buffer, so no
/// output-sized intermediate is kept for backward (a composite of candle ops keeps three).
/// Backward: `dx = g W + s (g B) A`, `dA = s (g B)^T x`, `dB = s g^T (x A^T)`; nothing for W.
/// CPU and CUDA (on CUDA the scaled branch is one cuBLAS product plus an add kernel, not added
/// in place); callers use the composite path on other devices.
pub fn lora_linear(x2: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    lora_linear_t(x2, w, None, None, a, b, scale)
}

/// [`lora_linear`] with `wt`, a contiguous copy of `W^T [in, out]`, for the CPU forward product
/// (the layout the matmul packs fastest), and `panels` for it at few rows (see
/// [`frozen_linear_t`]); backward reads `w`.
pub fn lora_linear_t(
    x2: &Tensor,
    w: &Tensor,
    wt: Option<&Tensor>,
    panels: Option<&Panels>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    x2.apply_op3(
        a,
        b,
        LoraLinear {
            w: w.clone(),
            wt: wt.cloned(),
            panels: panels.cloned(),
            scale,
            h: std::sync::Mutex::new(None),
        },
    )
}

struct LoraLinear {
    w: Tensor,
    /// `W^T` contiguous, for the CPU forward product (see [`frozen_linear_t`]).
    wt: Option<Tensor>,
    /// `W^T` packed for the few-rows kernel (see [`frozen_linear_t`]).
    panels: Option<Panels>,
    scale: f64,
    /// `x A^T [n, r]` from the CPU forward, which backward needs for `dB` (saves a product).
    h: std::sync::Mutex<Option<CpuStorage>>,
}

/// A row-major view of a matrix in a slice: element `(i, j)` at `rs·i + cs·j`.
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    p: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    fn new(p: &'a [T], rows: usize, cols: usize) -> Result<Self> {
        if p.len() < rows * cols {
            candle_core::bail!(
                "lora_linear: a [{rows}, {cols}] operand has {} elements",
                p.len()
            )
        }
        Ok(Mat {
            p,
            rows,
            cols,
            rs: cols,
            cs: 1,
        })
    }

    fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// `dst [m, n] := (dst if accumulate) + beta · lhs · rhs` with the gemm crate (candle's own CPU
/// matmul library), on the current rayon pool; `dst` is contiguous row-major.
fn gemm_into<T: candle_core::WithDType>(
    dst: &mut [T],
    accumulate: bool,
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    beta: T,
) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k || dst.len() != m * n {
        candle_core::bail!(
            "lora_linear: product of [{m}, {k}] and [{}, {n}] shapes",
            rhs.rows
        )
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(T::zero());
        }
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `Mat::new` checked that each operand's slice holds its rows × cols elements at
    // the strides used (a transpose swaps them), and `dst` holds m × n; gemm supports f32/f64/
    // f16, the dtypes of the callers (bf16 is refused there).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.p.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.p.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::one(),
            beta,
            false,
            false,
            false,
            par,
        )
    };
    Ok(())
}

fn contiguous<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Option<&'a [T]> {
    let (a, b) = l.contiguous_offsets()?;
    s.as_slice::<T>().ok().map(|v| &v[a..b])
}

/// The elements of a contiguous CPU tensor (`t` from `storage_and_layout`).
fn cpu_elems<'a, T: candle_core::WithDType>(
    t: &'a (impl std::ops::Deref<Target = Storage>, &Layout),
) -> Result<&'a [T]> {
    let Storage::Cpu(s) = &*t.0 else {
        candle_core::bail!("lora_linear: not a CPU tensor")
    };
    contiguous::<T>(s, t.1)
        .ok_or_else(|| candle_core::Error::Msg("lora_linear: strided operand".into()))
}

impl LoraLinear {
    /// The CPU forward with every product written into its final buffer:
    /// `y = x W^T`, `h = x A^T`, then `y += s · h B^T` accumulated in place.
    /// `None` when an operand is strided (the caller falls back to candle's matmuls).
    #[allow(clippy::too_many_arguments)]
    fn cpu_fwd_gemm<T: candle_core::WithDType>(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<Option<(CpuStorage, Shape)>> {
        let (n, k) = xl.shape().dims2()?;
        let (r, _) = al.shape().dims2()?;
        let (out, _) = bl.shape().dims2()?;
        // W^T [k, out] from the cached transpose when there is one, else a view of W
        let (ws, wl) = match &self.wt {
            Some(wt) => wt.storage_and_layout(),
            None => self.w.storage_and_layout(),
        };
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("lora_linear: weight is not on the CPU")
        };
        let (Some(x), Some(a), Some(b), Some(w)) = (
            contiguous::<T>(xs, xl),
            contiguous::<T>(as_, al),
            contiguous::<T>(bs, bl),
            contiguous::<T>(ws, wl),
        ) else {
            return Ok(None);
        };
        let wt = match &self.wt {
            Some(_) => Mat::new(w, k, out)?,
            None => Mat::new(w, out, k)?.t(),
        };
        let mut y = vec![T::zero(); n * out];
        let few = match &self.panels {
            Some(p) if T::DTYPE == DType::F32 && p.dims() == (k, out) => {
                // SAFETY: T is f32 (its DTYPE): the same slices, reinterpreted.
                let (yf, xf) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(y.as_mut_ptr() as *mut f32, y.len()),
                        std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()),
                    )
                };
                p.matmul(yf, false, xf, k, n, 1.0)
            }
            _ => false,
        };
        let mut h = vec![T::zero(); n * r];
        // with the base product on the panels, the thin LoRA products too (f32)
        let branch = few && {
            // SAFETY: `few` implies T is f32 (its DTYPE): the same slices, reinterpreted.
            let f =
                |v: &[T]| unsafe { std::slice::from_raw_parts(v.as_ptr() as *const f32, v.len()) };
            let (yf, hf) = unsafe {
                (
                    std::slice::from_raw_parts_mut(y.as_mut_ptr() as *mut f32, y.len()),
                    std::slice::from_raw_parts_mut(h.as_mut_ptr() as *mut f32, h.len()),
                )
            };
            crate::kernels::lora_branch(yf, hf, f(x), f(a), f(b), (n, k, r, out), self.scale as f32)
        };
        let x = Mat::new(x, n, k)?;
        if !few {
            gemm_into(&mut y, false, x, wt, T::one())?;
        }
        if !branch {
            gemm_into(&mut h, false, x, Mat::new(a, r, k)?.t(), T::one())?;
            let s = T::from_f64(self.scale);
            gemm_into(
                &mut y,
                true,
                Mat::new(&h, n, r)?,
                Mat::new(b, out, r)?.t(),
                s,
            )?;
        }
        *self.h.lock().unwrap_or_else(|e| e.into_inner()) = Some(T::to_cpu_storage_owned(h));
        Ok(Some((T::to_cpu_storage_owned(y), Shape::from((n, out)))))
    }

    /// The CPU backward in five products, each into its final buffer:
    /// `gb = s · g B`, `dx = g W + gb A`, `dA = gb^T x`, `dB = s · g^T h`.
    fn cpu_bwd_gemm<T: candle_core::WithDType>(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, k) = x.dims2()?;
        let (r, _) = a.dims2()?;
        let (out, _) = b.dims2()?;
        let s = T::from_f64(self.scale);
        let dev = x.device().clone();
        let (g, x, a, b, w) = (
            g.contiguous()?,
            x.contiguous()?,
            a.contiguous()?,
            b.contiguous()?,
            self.w.contiguous()?,
        );
        let (gs, xs, as_, bs, ws) = (
            g.storage_and_layout(),
            x.storage_and_layout(),
            a.storage_and_layout(),
            b.storage_and_layout(),
            w.storage_and_layout(),
        );
        let g = Mat::new(cpu_elems::<T>(&gs)?, n, out)?;
        let x = Mat::new(cpu_elems::<T>(&xs)?, n, k)?;
        let (av, bv) = (cpu_elems::<T>(&as_)?, cpu_elems::<T>(&bs)?);
        // x A^T from the forward, or again if this graph is walked a second time
        let saved = self.h.lock().unwrap_or_else(|e| e.into_inner()).take();
        let h = match saved {
            Some(h) => h,
            None => {
                let mut h = vec![T::zero(); n * r];
                gemm_into(&mut h, false, x, Mat::new(av, r, k)?.t(), T::one())?;
                T::to_cpu_storage_owned(h)
            }
        };
        let mut gb = vec![T::zero(); n * r];
        gemm_into(&mut gb, false, g, Mat::new(bv, out, r)?, s)?;
        let gbm = Mat::new(&gb, n, r)?;
        let mut dx = vec![T::zero(); n * k];
        gemm_into(
            &mut dx,
            false,
            g,
            Mat::new(cpu_elems::<T>(&ws)?, out, k)?,
            T::one(),
        )?;
        gemm_into(&mut dx, true, gbm, Mat::new(av, r, k)?, T::one())?;
        let mut da = vec![T::zero(); r * k];
        gemm_into(&mut da, false, gbm.t(), x, T::one())?;
        let mut db = vec![T::zero(); out * r];
        gemm_into(
            &mut db,
            false,
            g.t(),
            Mat::new(h.as_slice::<T>()?, n, r)?,
            s,
        )?;
        Ok((
            Tensor::from_vec(dx, (n, k), &dev)?,
            Tensor::from_vec(da, (r, k), &dev)?,
            Tensor::from_vec(db, (out, r), &dev)?,
        ))
    }
}

fn add_scaled(y: CpuStorage, d: &CpuStorage, s: f64) -> Result<CpuStorage> {
    use half::{bf16, f16};
    Ok(match (y, d) {
        (CpuStorage::F32(mut y), CpuStorage::F32(d)) => {
            let s = s as f32;
            y.iter_mut().zip(d).for_each(|(y, d)| *y += s * d);
            CpuStorage::F32(y)
        }
        (CpuStorage::F64(mut y), CpuStorage::F64(d)) => {
            y.iter_mut().zip(d).for_each(|(y, d)| *y += s * d);
            CpuStorage::F64(y)
        }
        (CpuStorage::BF16(mut y), CpuStorage::BF16(d)) => {
            let s = s as f32;
            y.iter_mut()
                .zip(d)
                .for_each(|(y, d)| *y = bf16::from_f32(y.to_f32() + s * d.to_f32()));
            CpuStorage::BF16(y)
        }
        (CpuStorage::F16(mut y), CpuStorage::F16(d)) => {
            let s = s as f32;
            y.iter_mut()
                .zip(d)
                .for_each(|(y, d)| *y = f16::from_f32(y.to_f32() + s * d.to_f32()));
            CpuStorage::F16(y)
        }
        _ => candle_core::bail!("lora_linear: mixed dtypes"),
    })
}

impl candle_core::CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if crate::fused::enabled() {
            let fast = match xs {
                CpuStorage::F32(_) => self.cpu_fwd_gemm::<f32>(xs, xl, as_, al, bs, bl)?,
                CpuStorage::F64(_) => self.cpu_fwd_gemm::<f64>(xs, xl, as_, al, bs, bl)?,
                _ => None,
            };
            if let Some(res) = fast {
                return Ok(res);
            }
        }
        let (n, k) = xl.shape().dims2()?;
        let (r, _) = al.shape().dims2()?;
        let (out, _) = bl.shape().dims2()?;
        let wt = self.w.t()?;
        let (ws, wl) = wt.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("lora_linear: weight is not on the CPU")
        };
        let y = xs.matmul(ws, (1, n, out, k), xl, wl)?;
        // h = x A^T  [n, r]; d = h B^T  [n, out]
        let at = al.transpose(0, 1)?;
        let h = xs.matmul(as_, (1, n, r, k), xl, &at)?;
        let hl = Layout::contiguous((n, r));
        let bt = bl.transpose(0, 1)?;
        let d = h.matmul(bs, (1, n, out, r), &hl, &bt)?;
        Ok((add_scaled(y, &d, self.scale)?, Shape::from((n, out))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        as_: &candle_core::CudaStorage,
        al: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, k) = xl.shape().dims2()?;
        let (r, _) = al.shape().dims2()?;
        let (out, _) = bl.shape().dims2()?;
        let wt = self.w.t()?;
        let (ws, wl) = wt.storage_and_layout();
        let Storage::Cuda(ws) = &*ws else {
            candle_core::bail!("lora_linear: weight is not on the CUDA device")
        };
        let y = xs.matmul(ws, (1, n, out, k), xl, wl)?;
        let h = xs.matmul(as_, (1, n, r, k), xl, &al.transpose(0, 1)?)?;
        let d = h.matmul(
            bs,
            (1, n, out, r),
            &Layout::contiguous((n, r)),
            &bl.transpose(0, 1)?,
        )?;
        let ol = Layout::contiguous((n, out));
        let y =
            y.binary_impl::<candle_core::op::Add>(&d.affine(&ol, self.scale, 0.0)?, &ol, &ol)?;
        Ok((y, Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let cpu_gemm = x.device().is_cpu() && crate::fused::enabled();
        match x.dtype() {
            DType::F32 if cpu_gemm => {
                let (dx, da, db) = self.cpu_bwd_gemm::<f32>(x, a, b, g)?;
                return Ok((Some(dx), Some(da), Some(db)));
            }
            DType::F64 if cpu_gemm => {
                let (dx, da, db) = self.cpu_bwd_gemm::<f64>(x, a, b, g)?;
                return Ok((Some(dx), Some(da), Some(db)));
            }
            _ => {}
        }
        let s = self.scale;
        let gb = (g.matmul(b)? * s)?; // [n, r]
        let dx = (g.matmul(&self.w)? + gb.matmul(a)?)?;
        let da = gb.t()?.matmul(x)?;
        let h = x.matmul(&a.t()?)?;
        let db = (g.t()?.matmul(&h)? * s)?;
        // Detached: gradients of leaves stay in the GradStore, and a graph hanging off them would
        // keep every layer's upstream gradient alive until the store is dropped.
        Ok((Some(dx.detach()), Some(da.detach()), Some(db.detach())))
    }
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
    fn fused_lora_linear_matches_the_composite_in_value_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1., (6, 5), &dev)?)?;
        let w = Tensor::randn(0f64, 1., (4, 5), &dev)?;
        let a = Var::from_tensor(&Tensor::randn(0f64, 1., (3, 5), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f64, 1., (4, 3), &dev)?)?;
        let s = 0.7;
        let fused = lora_linear(x.as_tensor(), &w, a.as_tensor(), b.as_tensor(), s)?;
        let comp = (x.matmul(&w.t()?)? + (x.matmul(&a.t()?)?.matmul(&b.t()?)? * s)?)?;
        let diff = (&fused - &comp)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        let wts = Tensor::randn(0f64, 1., (6, 4), &dev)?;
        let g1 = (fused * &wts)?.sum_all()?.backward()?;
        let g2 = (comp * &wts)?.sum_all()?.backward()?;
        for v in [&x, &a, &b] {
            let d = (g1.get(v).expect("fused grad") - g2.get(v).expect("grad"))?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            assert!(d < 1e-10, "{d}");
        }
        assert!(g1.get(&w).is_none());
        Ok(())
    }

    /// The CPU gemm path (f32 here, f64 above) with a strided upstream gradient, uneven shapes,
    /// a second backward through the same graph (the saved `x A^T` is then recomputed), and
    /// with and without the cached contiguous `W^T`.
    #[test]
    fn fused_lora_linear_cpu_gemm_path_with_strided_gradient_and_repeated_backward() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k, out, r) = (37, 29, 23, 5);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, k), &dev)?)?;
        let w = Tensor::randn(0f32, 1., (out, k), &dev)?;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1., (r, k), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., (out, r), &dev)?)?;
        let s = 1.3;
        let wt = w.t()?.contiguous()?;
        // 37 rows: the few-rows kernel takes the base product when given panels (AVX-512 CPUs)
        let panels: Panels = std::sync::Arc::new(crate::kernels::Panels::pack_transposed(
            &w.flatten_all()?.to_vec1::<f32>()?,
            out,
            k,
        ));
        for (wt, panels) in [(None, None), (Some(&wt), None), (None, Some(&panels))] {
            let fused = lora_linear_t(
                x.as_tensor(),
                &w,
                wt,
                panels,
                a.as_tensor(),
                b.as_tensor(),
                s,
            )?;
            // and the frozen linear alone, tracked (custom op) and not
            for xin in [x.as_tensor().clone(), x.as_tensor().detach()] {
                let y = frozen_linear_t(&xin, &w, wt, panels, None)?;
                let d = (y - x.matmul(&w.t()?)?)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert!(d < 1e-4, "frozen linear: {d}");
            }
            let comp = (x.matmul(&w.t()?)? + (x.matmul(&a.t()?)?.matmul(&b.t()?)? * s)?)?;
            let diff = (&fused - &comp)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "{diff}");
            // the loss reads y through a transpose, so dL/dy arrives strided
            let wts = Tensor::randn(0f32, 1., (out, n), &dev)?;
            let loss = (fused.t()? * &wts)?.sum_all()?;
            let g1 = loss.backward()?;
            let g1b = loss.backward()?;
            let g2 = (comp.t()? * &wts)?.sum_all()?.backward()?;
            for v in [&x, &a, &b] {
                let want = g2.get(v).expect("grad");
                let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
                for got in [g1.get(v), g1b.get(v)] {
                    let d = (got.expect("fused grad") - want)?
                        .abs()?
                        .max_all()?
                        .to_scalar::<f32>()?;
                    assert!(d < 1e-5 * scale.max(1.0), "{d} vs scale {scale}");
                }
            }
            assert!(g1.get(&w).is_none());
        }
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
