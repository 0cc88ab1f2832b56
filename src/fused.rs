//! Fused CPU kernels with analytic backward passes.
//!
//! Each op here replaces a chain of 5–10 candle graph nodes (each a serial pass over the data
//! plus, in backward, a zero-filled gradient buffer and an add) by one node whose forward and
//! backward are single passes, parallel over rows (rayon). They run for f32 and f64 tensors on
//! the CPU; [`fusable`] says when, and the callers fall back to the composite ops of
//! [`crate::ops`] otherwise (half types, CUDA), which compute the same functions.
//!
//! * [`lm_head_logps`]: `log_softmax(h W^T)[target]` for selected rows only, in chunks of rows,
//!   so that the `(B, T, V)` logits are never materialised; backward recomputes each chunk's
//!   logits and gives `dh` (and `dW` only when `W` is trainable).
//! * [`rms_norm`], [`rope`], [`masked_softmax`] (attention: `softmax(scale · x + mask)`) and
//!   [`silu_mul`] (`silu(g) · u`, the SwiGLU product).
//!
//! Pinned by f64 finite differences and by PyTorch gradients (`tests/fused.rs`,
//! `tests/fixtures/fused/gen_fused.py`).

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Turn the fused kernels off (process-wide) so that the composite path runs instead: used by
/// tests that compare both, and by `ALIGN_NO_FUSED=1` for A/B measurements.
pub fn set_enabled(on: bool) {
    DISABLED.store(!on, Ordering::Relaxed);
}

/// Whether the fused kernels are on (default; off with [`set_enabled`] or `ALIGN_NO_FUSED=1`).
pub fn enabled() -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let env_off = *ENV
        .get_or_init(|| std::env::var("ALIGN_NO_FUSED").is_ok_and(|v| !v.is_empty() && v != "0"));
    !env_off && !DISABLED.load(Ordering::Relaxed)
}

/// Whether the fused kernels serve `t`: f32/f64 on the CPU, and not switched off.
pub fn fusable(t: &Tensor) -> bool {
    enabled() && t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// The float arithmetic the kernels need, for f32 and f64.
pub trait Real:
    WithDType
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + PartialOrd
{
    const ZERO: Self;
    const ONE: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn of(x: f64) -> Self;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn of(x: f64) -> Self {
                x as $t
            }
        }
    };
}
real!(f32);
real!(f64);

/// Runs `$body` with `$T` bound to the Rust type of `$dtype` (f32 or f64).
macro_rules! dispatch {
    ($dtype:expr, $name:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            d => candle_core::bail!("{}: fused kernel needs f32 or f64, got {d:?}", $name),
        }
    };
}

/// The contiguous CPU data of `s` under layout `l`.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("{name}: input must be contiguous"),
    }
}

/// A copy of a CPU tensor's elements in its own dtype.
fn to_vec<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// Runs `f` on the contiguous CPU data of `t`.
fn with_data<T: WithDType, R>(t: &Tensor, name: &str, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(s) = &*s else {
        candle_core::bail!("{name}: tensor is not on the CPU")
    };
    Ok(f(slice::<T>(s, l, name)?))
}

fn from_vec<T: WithDType>(v: Vec<T>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &candle_core::Device::Cpu)
}

// ---------------------------------------------------------------------------------------------
// LM head + log-softmax + gather of the target

/// Rows of logits computed at once: ~4M elements (16 MB in f32) per chunk.
fn chunk_rows(vocab: usize) -> usize {
    ((1usize << 22) / vocab.max(1)).clamp(1, 1024)
}

/// `out[i] = log_softmax(h[i] W^T)[targets[i]]` for `h [N, H]` and `W [V, H]`, without keeping
/// the `[N, V]` logits. Backward: `dh = G W`, and `dW = G^T h` only when `W` is trainable,
/// with `G = g ⊙ (onehot(target) − softmax)`, recomputed chunk by chunk.
pub fn lm_head_logps(h: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, hd) = h.dims2()?;
    let (v, wh) = w.dims2()?;
    if hd != wh || targets.len() != n {
        candle_core::bail!(
            "lm_head_logps: hidden {:?}, weight {:?} and {} targets do not match",
            h.dims(),
            w.dims(),
            targets.len()
        )
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("lm_head_logps: target token {t} outside the vocabulary of {v}")
    }
    h.contiguous()?.apply_op2(
        &w.contiguous()?,
        LmHeadLogps {
            targets: targets.to_vec(),
            lse: Mutex::new(Vec::new()),
        },
    )
}

struct LmHeadLogps {
    targets: Vec<u32>,
    /// Log-sum-exp of each row's logits, kept from the forward pass for the backward pass.
    lse: Mutex<Vec<f64>>,
}

impl LmHeadLogps {
    fn fwd<T: Real>(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<Vec<T>> {
        let (n, hd) = hl.shape().dims2()?;
        let v = wl.dims()[0];
        let wt = wl.transpose(0, 1)?;
        let mut out = vec![T::ZERO; n];
        let mut lse = vec![0f64; n];
        let c = chunk_rows(v);
        for r0 in (0..n).step_by(c) {
            let rows = c.min(n - r0);
            let lay = Layout::contiguous_with_offset((rows, hd), hl.start_offset() + r0 * hd);
            let logits = hs.matmul(ws, (1, rows, v, hd), &lay, &wt)?;
            let logits = logits.as_slice::<T>()?;
            out[r0..r0 + rows]
                .par_iter_mut()
                .zip(lse[r0..r0 + rows].par_iter_mut())
                .zip(logits.par_chunks(v))
                .zip(self.targets[r0..r0 + rows].par_iter())
                .for_each(|(((o, z), l), &t)| {
                    let s = log_sum_exp(l);
                    *o = l[t as usize] - s;
                    *z = s.to_f64();
                });
        }
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))? = lse;
        Ok(out)
    }

    fn bwd_t<T: Real>(
        &self,
        h: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, _) = h.dims2()?;
        let v = w.dims()[0];
        let g: Vec<T> = to_vec(g)?;
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?
            .clone();
        if lse.len() != n {
            candle_core::bail!("lm_head_logps: backward without a CPU forward pass")
        }
        let want_dw = w.track_op();
        let wt = w.t()?;
        let mut dh = Vec::new();
        let mut dw: Option<Tensor> = None;
        let c = chunk_rows(v);
        for r0 in (0..n).step_by(c) {
            let rows = c.min(n - r0);
            let hc = h.narrow(0, r0, rows)?;
            let logits = hc.matmul(&wt)?;
            let mut gl: Vec<T> = to_vec(&logits)?;
            drop(logits);
            gl.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
                let r = r0 + i;
                let (gi, s) = (g[r], T::of(lse[r]));
                for x in row.iter_mut() {
                    *x = -(gi * (*x - s).exp());
                }
                row[self.targets[r] as usize] += gi;
            });
            let gl = Tensor::from_vec(gl, (rows, v), h.device())?;
            dh.push(gl.matmul(w)?);
            if want_dw {
                let d = gl.t()?.matmul(&hc)?;
                dw = Some(match dw {
                    Some(acc) => (acc + d)?,
                    None => d,
                });
            }
        }
        let dh = Tensor::cat(&dh, 0)?;
        Ok((Some(dh.detach()), dw.map(|d| d.detach())))
    }
}

/// `log Σ exp(l)`, shifted by the maximum. The sum runs in f64: over a 49k-token vocabulary an
/// f32 running sum loses ~1e-5 per token, which adds up to 1e-2 over a sequence's log-prob.
fn log_sum_exp<T: Real>(l: &[T]) -> T {
    let m = l
        .iter()
        .copied()
        .fold(l[0], |m, x| if x > m { x } else { m });
    let mut s = 0f64;
    for &x in l {
        s += (x - m).exp().to_f64();
    }
    T::of(m.to_f64() + s.ln())
}

impl CustomOp2 for LmHeadLogps {
    fn name(&self) -> &'static str {
        "lm-head-logps"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = hl.dims()[0];
        let out = dispatch!(hs.dtype(), "lm_head_logps", T => {
            T::to_cpu_storage_owned(self.fwd::<T>(hs, hl, ws, wl)?)
        });
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        dispatch!(h.dtype(), "lm_head_logps", T => self.bwd_t::<T>(h, w, g))
    }
}

// ---------------------------------------------------------------------------------------------
// Row-wise kernels

/// Rows per rayon task: enough work per task that scheduling costs nothing.
fn min_rows(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

/// Sums of `f(row index, row)` over fixed blocks of rows, added in block order, so that the
/// result does not depend on how rayon schedules the blocks (bit-exact resume needs this).
fn row_sums<T: Real>(rows: usize, d: usize, f: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    const BLOCKS: usize = 64;
    let per = rows.div_ceil(BLOCKS).max(1);
    let parts: Vec<Vec<T>> = (0..rows.div_ceil(per))
        .into_par_iter()
        .map(|blk| {
            let mut acc = vec![T::ZERO; d];
            for r in blk * per..((blk + 1) * per).min(rows) {
                f(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut out = vec![T::ZERO; d];
    for p in parts {
        for (o, x) in out.iter_mut().zip(p) {
            *o += x;
        }
    }
    out
}

/// RMSNorm over the last dimension, `y = x / sqrt(mean(x²) + eps) · w`, as transformers
/// computes it for f32/f64 weights. Backward gives `dx`, and `dw` only when `w` is trainable.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if w.dims() != [d] {
        candle_core::bail!("rms_norm: weight {:?} for rows of {d}", w.dims())
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f64,
}

fn inv_rms<T: Real>(x: &[T], eps: f64) -> T {
    let mut ss = T::ZERO;
    for &v in x {
        ss += v * v;
    }
    T::ONE / (ss / T::of(x.len() as f64) + T::of(eps)).sqrt()
}

impl RmsNorm {
    fn bwd_t<T: Real>(
        &self,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.dims()[0];
        let xv: Vec<T> = to_vec(x)?;
        let gv: Vec<T> = to_vec(g)?;
        let wv: Vec<T> = to_vec(w)?;
        let mut dx = vec![T::ZERO; xv.len()];
        let dn = T::of(d as f64);
        dx.par_chunks_mut(d)
            .zip(xv.par_chunks(d))
            .zip(gv.par_chunks(d))
            .with_min_len(min_rows(d))
            .for_each(|((o, x), g)| {
                let r = inv_rms(x, self.eps);
                let mut dot = T::ZERO;
                for i in 0..d {
                    dot += g[i] * wv[i] * x[i] * r;
                }
                let dot = dot / dn;
                for i in 0..d {
                    o[i] = r * (g[i] * wv[i] - x[i] * r * dot);
                }
            });
        let dx = from_vec(dx, x.shape())?;
        let dw = if w.track_op() {
            let rows = xv.len() / d;
            let s = row_sums::<T>(rows, d, |row, acc| {
                let x = &xv[row * d..(row + 1) * d];
                let g = &gv[row * d..(row + 1) * d];
                let r = inv_rms(x, self.eps);
                for i in 0..d {
                    acc[i] += g[i] * x[i] * r;
                }
            });
            Some(from_vec(s, w.shape())?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = wl.dims()[0];
        let out = dispatch!(xs.dtype(), "rms_norm", T => {
            let x = slice::<T>(xs, xl, "rms_norm")?;
            let w = slice::<T>(ws, wl, "rms_norm")?;
            let mut y = vec![T::ZERO; x.len()];
            y.par_chunks_mut(d)
                .zip(x.par_chunks(d))
                .with_min_len(min_rows(d))
                .for_each(|(y, x)| {
                    let r = inv_rms(x, self.eps);
                    for i in 0..d {
                        y[i] = x[i] * r * w[i];
                    }
                });
            T::to_cpu_storage_owned(y)
        });
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        dispatch!(x.dtype(), "rms_norm", T => self.bwd_t::<T>(x, w, g))
    }
}

/// Rotary embedding (transformers' `rotate_half` layout) of `x [B, H, T, D]` with
/// `cos`, `sin [B or 1, T, D/2]`: `[x1 c − x2 s, x2 c + x1 s]`. Backward rotates back.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _h, t, d) = x.dims4()?;
    let (cb, ct, half) = cos.dims3()?;
    if d % 2 != 0 || half * 2 != d || ct != t || (cb != 1 && cb != b) || sin.dims() != cos.dims() {
        candle_core::bail!(
            "rope: x {:?} with cos {:?} / sin {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        )
    }
    x.contiguous()?.apply_op1(Rope {
        cos: cos.to_dtype(x.dtype())?.contiguous()?,
        sin: sin.to_dtype(x.dtype())?.contiguous()?,
    })
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// `sign` = 1: forward rotation; −1: its transpose (the backward pass).
    fn apply<T: Real>(&self, x: &[T], dims: &[usize], sign: f64) -> Result<Vec<T>> {
        let (heads, t, d) = (dims[1], dims[2], dims[3]);
        let half = d / 2;
        let cb = self.cos.dims()[0];
        let sg = T::of(sign);
        let mut y = vec![T::ZERO; x.len()];
        with_data::<T, _>(&self.cos, "rope", |cos| {
            with_data::<T, _>(&self.sin, "rope", |sin| {
                y.par_chunks_mut(d)
                    .zip(x.par_chunks(d))
                    .enumerate()
                    .with_min_len(min_rows(d))
                    .for_each(|(row, (y, x))| {
                        let (bi, ti) = (row / (heads * t), row % t);
                        let o = ((if cb == 1 { 0 } else { bi }) * t + ti) * half;
                        let (c, s) = (&cos[o..o + half], &sin[o..o + half]);
                        for i in 0..half {
                            let (x1, x2, si) = (x[i], x[i + half], sg * s[i]);
                            y[i] = x1 * c[i] - x2 * si;
                            y[i + half] = x2 * c[i] + x1 * si;
                        }
                    })
            })
        })??;
        Ok(y)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch!(s.dtype(), "rope", T => {
            T::to_cpu_storage_owned(self.apply::<T>(slice(s, l, "rope")?, l.dims(), 1.0)?)
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.contiguous()?;
        let dx = dispatch!(g.dtype(), "rope", T => {
            let gv: Vec<T> = to_vec(&g)?;
            from_vec(self.apply::<T>(&gv, g.dims(), -1.0)?, g.shape())?
        });
        Ok(Some(dx))
    }
}

/// Attention probabilities `softmax(scale · x + mask)` over the last dimension, for scores
/// `x [B, H, T, S]` and an additive mask `[B or 1, 1, T, S]` (no gradient). Backward:
/// `dx = scale · y ⊙ (g − Σ g ⊙ y)`, from the kept output alone.
pub fn masked_softmax(x: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, _h, t, s) = x.dims4()?;
    let (mb, one, mt, ms) = mask.dims4()?;
    if (mb != 1 && mb != b) || one != 1 || mt != t || ms != s {
        candle_core::bail!(
            "masked_softmax: scores {:?}, mask {:?}",
            x.dims(),
            mask.dims()
        )
    }
    x.contiguous()?.apply_op1(MaskedSoftmax {
        mask: mask.to_dtype(x.dtype())?.contiguous()?,
        scale,
    })
}

struct MaskedSoftmax {
    mask: Tensor,
    scale: f64,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (heads, t, s) = (l.dims()[1], l.dims()[2], l.dims()[3]);
        let mb = self.mask.dims()[0];
        let out = dispatch!(st.dtype(), "masked_softmax", T => {
            let x = slice::<T>(st, l, "masked_softmax")?;
            let sc = T::of(self.scale);
            let mut y = vec![T::ZERO; x.len()];
            with_data::<T, _>(&self.mask, "masked_softmax", |mask| {
                y.par_chunks_mut(s)
                    .zip(x.par_chunks(s))
                    .enumerate()
                    .with_min_len(min_rows(s))
                    .for_each(|(row, (y, x))| {
                        let (bi, ti) = (row / (heads * t), row % t);
                        let o = ((if mb == 1 { 0 } else { bi }) * t + ti) * s;
                        let m = &mask[o..o + s];
                        let mut mx = x[0] * sc + m[0];
                        for j in 0..s {
                            y[j] = x[j] * sc + m[j];
                            if y[j] > mx {
                                mx = y[j];
                            }
                        }
                        let mut sum = T::ZERO;
                        for v in y.iter_mut() {
                            *v = (*v - mx).exp();
                            sum += *v;
                        }
                        for v in y.iter_mut() {
                            *v = *v / sum;
                        }
                    })
            })?;
            T::to_cpu_storage_owned(y)
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let s = res.dim(candle_core::D::Minus1)?;
        let dx = dispatch!(res.dtype(), "masked_softmax", T => {
            let y: Vec<T> = to_vec(res)?;
            let mut gv: Vec<T> = to_vec(g)?;
            let sc = T::of(self.scale);
            gv.par_chunks_mut(s)
                .zip(y.par_chunks(s))
                .with_min_len(min_rows(s))
                .for_each(|(g, y)| {
                    let mut dot = T::ZERO;
                    for j in 0..s {
                        dot += g[j] * y[j];
                    }
                    for j in 0..s {
                        g[j] = sc * y[j] * (g[j] - dot);
                    }
                });
            from_vec(gv, res.shape())?
        });
        Ok(Some(dx))
    }
}

/// The SwiGLU product `silu(g) · u = g σ(g) · u`. Backward: `dg = ∂ · u · σ(g)(1 + g(1 − σ(g)))`,
/// `du = ∂ · g σ(g)`.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dims() != u.dims() {
        candle_core::bail!("silu_mul: gate {:?} and up {:?} differ", g.dims(), u.dims())
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, SiluMul)
}

struct SiluMul;

fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = dispatch!(gs.dtype(), "silu_mul", T => {
            let g = slice::<T>(gs, gl, "silu_mul")?;
            let u = slice::<T>(us, ul, "silu_mul")?;
            let mut y = vec![T::ZERO; g.len()];
            y.par_chunks_mut(4096)
                .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
                .for_each(|(y, (g, u))| {
                    for i in 0..y.len() {
                        y[i] = g[i] * sigmoid(g[i]) * u[i];
                    }
                });
            T::to_cpu_storage_owned(y)
        });
        Ok((out, gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        d: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        dispatch!(g.dtype(), "silu_mul", T => {
            let gv: Vec<T> = to_vec(g)?;
            let uv: Vec<T> = to_vec(u)?;
            let mut dg: Vec<T> = to_vec(d)?;
            let mut du = dg.clone();
            dg.par_chunks_mut(4096)
                .zip(du.par_chunks_mut(4096))
                .zip(gv.par_chunks(4096).zip(uv.par_chunks(4096)))
                .for_each(|((dg, du), (g, u))| {
                    for i in 0..dg.len() {
                        let s = sigmoid(g[i]);
                        let d = dg[i];
                        dg[i] = d * u[i] * s * (T::ONE + g[i] * (T::ONE - s));
                        du[i] = d * g[i] * s;
                    }
                });
            Ok((Some(from_vec(dg, g.shape())?), Some(from_vec(du, u.shape())?)))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Attention over a KV cache written in place (decoding)

/// `softmax(scale · q kᵀ + mask) v` for queries `q [B, H, T, d]` over the first `s` positions of
/// key and value buffers `k_buf, v_buf [B, KVH, C, d]` (a [`crate::models::transformer::KvCache`]
/// written in place), with the additive mask `[B or 1, 1, T, s]`; returned as `[B, T, H·d]`, the
/// layout the output projection takes. Grouped-query: head `h` reads kv head `h / (H / KVH)`, as
/// transformers' `repeat_kv`. One pass per (row, head), parallel over rows: it replaces two
/// batched products, the softmax and three layout copies per layer and decoded token. Forward
/// only: a cache written in place carries no gradient. The same function as the composite path
/// up to the order of float sums (`tests/generate.rs`).
pub fn cached_attention(
    q: &Tensor,
    k_buf: &Tensor,
    v_buf: &Tensor,
    s: usize,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (kb, kvh, cap, kd) = k_buf.dims4()?;
    let (mb, one, mt, ms) = mask.dims4()?;
    if kb != b
        || kd != d
        || v_buf.dims() != k_buf.dims()
        || s > cap
        || kvh == 0
        || h % kvh != 0
        || (mb != 1 && mb != b)
        || one != 1
        || mt != t
        || ms != s
    {
        candle_core::bail!(
            "cached_attention: q {:?}, k/v buffers {:?}/{:?} ({s} valid), mask {:?}",
            q.dims(),
            k_buf.dims(),
            v_buf.dims(),
            mask.dims()
        )
    }
    let rep = h / kvh;
    let out = dispatch!(q.dtype(), "cached_attention", T => {
        let sc = T::of(scale);
        let mask = mask.to_dtype(q.dtype())?;
        let mut out = vec![T::ZERO; b * t * h * d];
        with_data::<T, _>(q, "cached_attention", |q| {
            with_data::<T, _>(k_buf, "cached_attention", |kk| {
                with_data::<T, _>(v_buf, "cached_attention", |vv| {
                    with_data::<T, _>(&mask, "cached_attention", |m| {
                        let a = Attend { h, t, d, s, rep, kvh, cap, mb, q, k: kk, v: vv, m, sc };
                        out.par_chunks_mut(h * d).enumerate().for_each(|(row, o)| {
                            a.row(row, o)
                        })
                    })
                })
            })
        })????;
        from_vec(out, &Shape::from((b, t, h * d)))?
    });
    Ok(out)
}

/// The operands of a [`cached_attention`] call and their shapes.
struct Attend<'a, T> {
    h: usize,
    t: usize,
    d: usize,
    s: usize,
    rep: usize,
    kvh: usize,
    cap: usize,
    mb: usize,
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    m: &'a [T],
    sc: T,
}

impl<T: Real> Attend<'_, T> {
    /// One output row `(b, t)`, all heads, under AVX-512 when the CPU has it (the dot products
    /// and the weighted sums then run 16 lanes wide).
    fn row(&self, row: usize, o: &mut [T]) {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::enabled() {
            // SAFETY: `kernels::enabled` checked that the CPU has AVX-512F.
            unsafe { self.row_avx512(row, o) };
            return;
        }
        self.row_any(row, o)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn row_avx512(&self, row: usize, o: &mut [T]) {
        self.row_any(row, o)
    }

    /// The `rep` query heads that share a kv head go together: each key and value row is read
    /// once for all of them.
    #[inline(always)]
    fn row_any(&self, row: usize, o: &mut [T]) {
        let &Attend {
            h,
            t,
            d,
            s,
            rep,
            kvh,
            cap,
            mb,
            sc,
            ..
        } = self;
        let (bi, ti) = (row / t, row % t);
        let mrow = ((if mb == 1 { 0 } else { bi }) * t + ti) * s;
        let m = &self.m[mrow..mrow + s];
        // scores of the group's heads, [rep, s]
        let mut p = vec![T::ZERO; rep * s];
        for g in 0..kvh {
            let kvo = (bi * kvh + g) * cap * d;
            for j in 0..s {
                let kr = &self.k[kvo + j * d..kvo + (j + 1) * d];
                for r in 0..rep {
                    let qo = ((bi * h + g * rep + r) * t + ti) * d;
                    p[r * s + j] = dot16(&self.q[qo..qo + d], kr) * sc + m[j];
                }
            }
            for r in 0..rep {
                let pr = &mut p[r * s..(r + 1) * s];
                let mut mx = pr[0];
                for &x in pr.iter() {
                    if x > mx {
                        mx = x;
                    }
                }
                let mut sum = T::ZERO;
                for x in pr.iter_mut() {
                    *x = (*x - mx).exp();
                    sum += *x;
                }
                for x in pr.iter_mut() {
                    *x = *x / sum;
                }
            }
            for j in 0..s {
                let vr = &self.v[kvo + j * d..kvo + (j + 1) * d];
                for r in 0..rep {
                    let w = p[r * s + j];
                    let hi = g * rep + r;
                    for (x, &y) in o[hi * d..(hi + 1) * d].iter_mut().zip(vr) {
                        *x += w * y;
                    }
                }
            }
        }
    }
}

/// `Σ aᵢ bᵢ` in 16 partial sums (so that the loop vectorises), then the remainder.
#[inline(always)]
fn dot16<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut dot = T::ZERO;
    for x in acc {
        dot += x;
    }
    for (x, y) in ar.iter().zip(br) {
        dot += *x * *y;
    }
    dot
}
