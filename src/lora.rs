//! Linear layers with an optional LoRA delta: `y = x W^T + b + (alpha/r) · dropout(x) A^T B^T`.
//!
//! Frozen by type: a base weight is a plain [`Tensor`] (never trained, never saved with the
//! adapter) unless the policy runs full fine-tuning, where it is a [`Var`]. LoRA's `A` and `B`
//! are always `Var`s. A is initialised like PEFT (Kaiming-uniform with a = sqrt(5), i.e.
//! U(-1/sqrt(in), 1/sqrt(in))), B is zero, so a fresh adapter leaves the model unchanged.

use crate::ops::frozen_linear_t;
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// A base parameter: frozen tensor, or trainable variable for full fine-tuning.
#[derive(Clone, Debug)]
pub enum Param {
    Frozen(Tensor),
    Trainable(Var),
}

impl Param {
    pub fn tensor(&self) -> &Tensor {
        match self {
            Param::Frozen(t) => t,
            Param::Trainable(v) => v.as_tensor(),
        }
    }
    pub fn new(t: Tensor, trainable: bool) -> Result<Self> {
        Ok(if trainable {
            Param::Trainable(Var::from_tensor(&t)?)
        } else {
            Param::Frozen(t)
        })
    }
}

/// LoRA hyper-parameters, as PEFT's `LoraConfig` names them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    /// Module name suffixes to adapt (`q_proj`, `down_proj`, ...); see [`LoraConfig::targets`].
    pub target_modules: Vec<String>,
    pub seed: u64,
}

pub const ALL_LINEAR: [&str; 10] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "w1",
    "w2",
    "w3",
];

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 32.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: vec!["all-linear".into()],
            seed: 0,
        }
    }
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Whether the linear layer at `path` is adapted. `all-linear` means every linear layer but
    /// `lm_head` and MoE routers; otherwise a module matches when its last name component is
    /// listed or its full path ends with `.<entry>` (PEFT's rule for a list of names).
    pub fn targets(&self, path: &str) -> bool {
        let last = path.rsplit('.').next().unwrap_or(path);
        self.target_modules.iter().any(|t| {
            if t == "all-linear" {
                ALL_LINEAR.contains(&last)
            } else {
                last == t || path == t || path.ends_with(&format!(".{t}"))
            }
        })
    }
}

#[derive(Debug, Clone)]
pub struct LoraDelta {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
    rng: Option<Arc<Mutex<StdRng>>>,
}

/// `Clone` shares every tensor, variable and cache (all reference-counted): a clone is the same
/// layer, not a copy of its weights.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Module path in the Hugging Face checkpoint, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    pub weight: Param,
    pub bias: Option<Param>,
    pub lora: Option<LoraDelta>,
    /// A frozen weight's transpose `W^T [in, out]`, contiguous, made at the first CPU forward
    /// (f32/f64): the forward products read it as their right-hand side in the layout the
    /// matmul kernels pack without a strided gather (1.2–1.8× faster at 64–256 rows, measured
    /// in docs/benchmarks.md); backward keeps reading `W`, which is already in that layout for
    /// `dx = g W`. Costs one more copy of each frozen matrix.
    /// Shared by clones (a frozen weight never changes).
    wt: Arc<std::sync::OnceLock<Tensor>>,
    /// A frozen f32 weight's `W^T` packed for align's kernel ([`crate::kernels::Panels`]), made
    /// at the first CPU forward of at most [`crate::kernels::MAX_ROWS`] rows (decoding) or by
    /// [`Linear::pack_panels`] (generation packs every layer first): products of few rows read
    /// it instead of `wt` (1.2–2.2× gemm's speed on cold weights at 1–48 rows), and so do
    /// larger ones while no `wt` exists (0.8–1.05× gemm at 256–1024 rows; docs/benchmarks.md).
    panels: Arc<std::sync::OnceLock<crate::ops::Panels>>,
}

/// Per-forward switches.
#[derive(Clone, Copy, Debug)]
pub struct Fwd {
    /// Apply LoRA deltas. Off, the policy is exactly the reference model.
    pub adapters: bool,
    /// Training mode: LoRA dropout active.
    pub train: bool,
    /// Inference (generation): adapters and trainable weights are read detached, so the
    /// forward builds no autograd graph — otherwise every op of a decode step would record its
    /// inputs and keep them alive until the step's output is dropped.
    pub no_grad: bool,
}

impl Fwd {
    pub const POLICY: Fwd = Fwd {
        adapters: true,
        train: false,
        no_grad: false,
    };
    pub const REFERENCE: Fwd = Fwd {
        adapters: false,
        train: false,
        no_grad: false,
    };
}

impl Linear {
    pub fn new(path: impl Into<String>, weight: Param, bias: Option<Param>) -> Self {
        Linear {
            path: path.into(),
            weight,
            bias,
            lora: None,
            wt: Arc::new(std::sync::OnceLock::new()),
            panels: Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// The cached contiguous `W^T` of a frozen CPU f32/f64 weight (see the `wt` field); `None`
    /// elsewhere, or with the fused kernels off (`ALIGN_NO_FUSED=1`).
    fn frozen_t(&self) -> Result<Option<Tensor>> {
        let Param::Frozen(w) = &self.weight else {
            return Ok(None);
        };
        if !crate::fused::enabled()
            || !w.device().is_cpu()
            || !matches!(w.dtype(), DType::F32 | DType::F64)
        {
            return Ok(None);
        }
        if let Some(t) = self.wt.get() {
            return Ok(Some(t.clone()));
        }
        let t = w.t()?.contiguous()?;
        Ok(Some(self.wt.get_or_init(|| t).clone()))
    }

    /// The frozen weight's caches for a product of `rows` rows: the packed panels at few rows
    /// (AVX-512 CPUs, f32); at more rows the contiguous `W^T` ([`Linear::frozen_t`]) when it
    /// exists or no panels do (training), else the panels (a generation's prompt pass, and the
    /// training that follows generation: one copy of the weight instead of two). bf16 panels
    /// ([`Linear::pack_panels_bf16`]) serve `no_grad` forwards (generation) only: every other
    /// forward reads the f32 weight.
    fn frozen_caches(
        &self,
        rows: usize,
        no_grad: bool,
    ) -> Result<(Option<Tensor>, Option<crate::ops::Panels>)> {
        let usable = |p: &crate::ops::Panels| no_grad || !p.is_bf16();
        if rows <= crate::kernels::MAX_ROWS {
            if let Some(p) = self.pack_panels()?.filter(usable) {
                return Ok((None, Some(p)));
            }
        }
        if self.wt.get().is_none() {
            if let Some(p) = self.panels.get().filter(|p| usable(p)) {
                return Ok((None, Some(p.clone())));
            }
        }
        Ok((self.frozen_t()?, None))
    }

    /// Pack a frozen CPU f32 weight for align's kernel (once; see the `panels` field); `None`
    /// where the kernel does not run (no AVX-512, trainable or other weights,
    /// `ALIGN_NO_FUSED=1`).
    pub fn pack_panels(&self) -> Result<Option<crate::ops::Panels>> {
        self.cached_panels(false)
    }

    /// [`Linear::pack_panels`] with the elements rounded to bf16 (half the bytes a decode step
    /// reads; products still in f32), for generation only (see [`Linear::frozen_caches`]).
    /// Panels packed earlier stay as they are.
    pub fn pack_panels_bf16(&self) -> Result<Option<crate::ops::Panels>> {
        self.cached_panels(true)
    }

    fn cached_panels(&self, bf16: bool) -> Result<Option<crate::ops::Panels>> {
        if let Some(p) = self.panels.get() {
            return Ok(Some(p.clone()));
        }
        let Some(mut packed) = self.pack_panels_uncached()? else {
            return Ok(None);
        };
        if bf16 {
            packed = packed.to_bf16();
        }
        let p = std::sync::Arc::new(packed);
        Ok(Some(self.panels.get_or_init(|| p).clone()))
    }

    /// The f32 panels of a frozen CPU f32 weight, not cached; `None` where the kernel does not
    /// run.
    fn pack_panels_uncached(&self) -> Result<Option<crate::kernels::Panels>> {
        let Param::Frozen(w) = &self.weight else {
            return Ok(None);
        };
        if !crate::kernels::enabled() || !w.device().is_cpu() || w.dtype() != DType::F32 {
            return Ok(None);
        }
        let (n, k) = w.dims2()?;
        let (ws, wl) = w.storage_and_layout();
        Ok(Some(match (&*ws, wl.contiguous_offsets()) {
            (candle_core::Storage::Cpu(s), Some((a, b))) => {
                crate::kernels::Panels::pack_transposed(&s.as_slice::<f32>()?[a..b], n, k)
            }
            _ => {
                drop(ws);
                crate::kernels::Panels::pack_transposed(&w.flatten_all()?.to_vec1::<f32>()?, n, k)
            }
        }))
    }

    pub fn in_dim(&self) -> usize {
        self.weight.tensor().dims()[1]
    }
    pub fn out_dim(&self) -> usize {
        self.weight.tensor().dims()[0]
    }

    /// Attach a fresh adapter (A Kaiming-uniform, B zero). `seed` makes it reproducible.
    pub fn add_lora(
        &mut self,
        cfg: &LoraConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<()> {
        let (out_dim, in_dim) = (self.out_dim(), self.in_dim());
        let bound = 1.0 / (in_dim as f64).sqrt();
        let mut rng = StdRng::seed_from_u64(seed);
        let a: Vec<f32> = (0..cfg.r * in_dim)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let a = Tensor::from_vec(a, (cfg.r, in_dim), device)?.to_dtype(dtype)?;
        let b = Tensor::zeros((out_dim, cfg.r), dtype, device)?;
        self.set_lora(a, b, cfg.scaling(), cfg.dropout, seed)
    }

    pub fn set_lora(
        &mut self,
        a: Tensor,
        b: Tensor,
        scale: f64,
        dropout: f64,
        seed: u64,
    ) -> Result<()> {
        let rng = (dropout > 0.0)
            .then(|| Arc::new(Mutex::new(StdRng::seed_from_u64(seed ^ 0x9e37_79b9))));
        self.lora = Some(LoraDelta {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale,
            dropout,
            rng,
        });
        Ok(())
    }

    pub fn forward(&self, x: &Tensor, fwd: Fwd) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(|b| b.tensor());
        // Fused path: frozen base + adapter, no dropout, on the CPU or CUDA.
        if let (true, Some(l), Param::Frozen(w)) = (fwd.adapters, &self.lora, &self.weight) {
            let fused_device = x.device().is_cpu() || x.device().is_cuda();
            if fused_device && (l.rng.is_none() || !fwd.train) {
                let in_dim = x.dim(candle_core::D::Minus1)?;
                let mut dims = x.dims().to_vec();
                *dims.last_mut().unwrap_or(&mut 0) = self.out_dim();
                let x2 = x.reshape(((), in_dim))?.contiguous()?;
                let (wt, panels) = self.frozen_caches(x2.dim(0)?, fwd.no_grad)?;
                let (a, b) = if fwd.no_grad {
                    (l.a.as_tensor().detach(), l.b.as_tensor().detach())
                } else {
                    (l.a.as_tensor().clone(), l.b.as_tensor().clone())
                };
                let y = crate::ops::lora_linear_t(
                    &x2,
                    w,
                    wt.as_ref(),
                    panels.as_ref(),
                    &a,
                    &b,
                    l.scale,
                )?
                .reshape(dims)?;
                return match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                };
            }
        }
        let mut y = match &self.weight {
            Param::Frozen(w) => {
                let rows = x.elem_count() / self.in_dim().max(1);
                let (wt, panels) = self.frozen_caches(rows, fwd.no_grad)?;
                frozen_linear_t(x, w, wt.as_ref(), panels.as_ref(), bias)?
            }
            Param::Trainable(w) => {
                let in_dim = x.dim(candle_core::D::Minus1)?;
                let mut dims = x.dims().to_vec();
                *dims.last_mut().unwrap_or(&mut 0) = self.out_dim();
                let w = if fwd.no_grad {
                    w.as_tensor().detach()
                } else {
                    w.as_tensor().clone()
                };
                let y = x.reshape(((), in_dim))?.matmul(&w.t()?)?.reshape(dims)?;
                match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
        };
        if let (true, Some(l)) = (fwd.adapters, &self.lora) {
            let xin = match (&l.rng, fwd.train) {
                (Some(rng), true) => dropout(x, l.dropout, rng)?,
                _ => x.clone(),
            };
            // 2-D products: a broadcast matmul would materialise A and B per batch element
            let in_dim = xin.dim(candle_core::D::Minus1)?;
            let x2 = xin.reshape(((), in_dim))?;
            let h = x2.matmul(&l.a.as_tensor().t()?)?;
            let d = h.matmul(&(l.b.as_tensor().t()? * l.scale)?)?;
            let d = d.reshape(y.shape())?;
            y = (y + d)?;
        }
        Ok(y)
    }

    /// `W + scale · B A`, the merged weight.
    pub fn merged_weight(&self) -> Result<Tensor> {
        let w = self.weight.tensor();
        match &self.lora {
            Some(l) => {
                let ba = l.b.as_tensor().matmul(l.a.as_tensor())?;
                w + (ba * l.scale)?
            }
            None => Ok(w.clone()),
        }
    }
}

fn dropout(x: &Tensor, p: f64, rng: &Mutex<StdRng>) -> Result<Tensor> {
    let n = x.elem_count();
    let keep = 1.0 - p;
    let mask: Vec<f32> = {
        let mut rng = rng
            .lock()
            .map_err(|_| candle_core::Error::Msg("dropout rng poisoned".into()))?;
        (0..n)
            .map(|_| {
                if rng.random::<f64>() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect()
    };
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}
