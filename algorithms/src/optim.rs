//! AdamW with saveable state, transformers-style learning-rate schedules, and global-norm
//! gradient clipping.
//!
//! References:
//! * AdamW: PyTorch 2.x `torch/optim/adamw.py` → `adam.py::_single_tensor_adam` with
//!   `decoupled_weight_decay=True`, `amsgrad=False`, `maximize=False` (Loshchilov & Hutter 2019,
//!   Alg. 2): `p ← p·(1 − lr·wd)`; `m ← lerp(m, g, 1−β1)`; `v ← β2·v + (1−β2)·g²`;
//!   `p ← p − (lr/(1−β1^t)) · m / (sqrt(v)/sqrt(1−β2^t) + eps)`. The step count `t` is per
//!   parameter (a parameter without a gradient is skipped, as in PyTorch).
//!   Defaults as `torch.optim.AdamW`: β = (0.9, 0.999), eps = 1e-8, weight_decay = 0.01.
//! * Schedules: transformers `optimization.py` `get_constant_schedule_with_warmup`,
//!   `get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup` (num_cycles = 0.5): the lr
//!   for optimizer step `k` (0-based, i.e. the `LambdaLR` value before the k-th `scheduler.step()`)
//!   is `base_lr · λ(k)`; so with warmup the very first update uses lr 0, as in HF Trainer.
//! * Clipping: `torch.nn.utils.clip_grad_norm_` (norm_type 2): total = ‖(‖g_i‖₂)_i‖₂,
//!   `coef = min(max_norm/(total + 1e-6), 1)`, `g_i ← g_i·coef`; returns the pre-clip total.
//!
//! Departures: no amsgrad/maximize/foreach/fused variants; `max_norm <= 0` disables clipping
//! (the norm is still returned); state is stored as safetensors (moments) + JSON (steps, hyper-params).
//!
//! Devices and dtypes: the moments are f32 whatever the parameter dtype (bf16/f16 parameters
//! are updated in f32 and rounded once). f32 parameters on the CPU take one pass over plain
//! slices; everything else (CUDA, half types) runs the same formula as tensor ops on the
//! parameter's device, so no parameter, gradient or moment leaves the device. Clipping computes
//! the norm and the coefficient on the device too ([`clip_grad_norm_tensor`]).

use crate::error::{bail_config, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// AdamW hyper-parameters (PyTorch defaults except `lr`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Serializable optimizer state: moment tensors keyed `"{name}.exp_avg"` / `"{name}.exp_avg_sq"`,
/// and the JSON-able [`AdamWMeta`].
#[derive(Clone, Debug)]
pub struct AdamWState {
    pub tensors: HashMap<String, Tensor>,
    pub meta: AdamWMeta,
}

/// Non-tensor state (goes to JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWMeta {
    /// Number of `step()` calls.
    pub step: u64,
    /// Per-parameter step counts (PyTorch's `state[p]["step"]`).
    pub param_steps: BTreeMap<String, u64>,
    pub config: AdamWConfig,
}

impl AdamWState {
    /// Write `<prefix>.safetensors` and `<prefix>.json`.
    pub fn save(&self, prefix: impl AsRef<Path>) -> Result<()> {
        let p = prefix.as_ref();
        candle_core::safetensors::save(&self.tensors, p.with_extension("safetensors"))?;
        std::fs::write(
            p.with_extension("json"),
            serde_json::to_vec_pretty(&self.meta)?,
        )?;
        Ok(())
    }
    /// Read what [`AdamWState::save`] wrote.
    pub fn load(prefix: impl AsRef<Path>, device: &candle_core::Device) -> Result<Self> {
        let p = prefix.as_ref();
        let tensors = candle_core::safetensors::load(p.with_extension("safetensors"), device)?;
        let meta = serde_json::from_slice(&std::fs::read(p.with_extension("json"))?)?;
        Ok(Self { tensors, meta })
    }
}

struct Slot {
    name: String,
    var: Var,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

/// AdamW over named [`Var`]s with inspectable / restorable state.
pub struct AdamW {
    slots: Vec<Slot>,
    cfg: AdamWConfig,
    step: u64,
    tensor_ops: bool,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        let mut slots = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            if !seen.insert(name.clone()) {
                bail_config!("AdamW: duplicate parameter name {name:?}");
            }
            let z = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            slots.push(Slot {
                name,
                var,
                exp_avg: z.clone(),
                exp_avg_sq: z,
                step: 0,
            });
        }
        Ok(Self {
            slots,
            cfg,
            step: 0,
            tensor_ops: false,
        })
    }
    /// Update f32 CPU parameters with the tensor-op path too (the one CUDA and half-precision
    /// parameters always take) instead of the slice loop; the two agree to float rounding.
    pub fn set_tensor_ops(&mut self, on: bool) {
        self.tensor_ops = on;
    }
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }
    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }
    /// Set the learning rate for the next step (e.g. from [`LrScheduler::lr_at`]).
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
    /// Number of `step()` calls so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }
    /// The parameters, in construction order.
    pub fn vars(&self) -> Vec<(&str, &Var)> {
        self.slots
            .iter()
            .map(|s| (s.name.as_str(), &s.var))
            .collect()
    }

    /// One AdamW update using the gradients in `grads` (parameters without one are skipped).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let AdamWConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg.clone();
        for s in self.slots.iter_mut() {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            s.step += 1;
            let t = s.step as i32;
            let decay = 1.0 - lr * weight_decay;
            let bc1 = 1.0 - beta1.powi(t);
            let inv_bc2_sqrt = 1.0 / (1.0 - beta2.powi(t)).sqrt();
            let step_size = lr / bc1;
            if !self.tensor_ops && s.var.dtype() == DType::F32 && s.var.device().is_cpu() {
                // One pass over plain slices instead of a dozen allocating tensor ops: the
                // full fine-tuning step spent most of its optimizer time in allocations.
                let shape = s.var.shape().clone();
                let dev = s.var.device().clone();
                let mut p: Vec<f32> = s.var.as_tensor().flatten_all()?.to_vec1()?;
                let gv: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let mut m: Vec<f32> = s.exp_avg.flatten_all()?.to_vec1()?;
                let mut v: Vec<f32> = s.exp_avg_sq.flatten_all()?.to_vec1()?;
                // Every coefficient rounded from f64 once, as the tensor ops below do.
                let (c1, b2, c2) = ((1.0 - beta1) as f32, beta2 as f32, (1.0 - beta2) as f32);
                let (decay, inv_bc2_sqrt) = (decay as f32, inv_bc2_sqrt as f32);
                let (step_size, eps) = (step_size as f32, eps as f32);
                for i in 0..p.len() {
                    let gi = gv[i];
                    m[i] += (gi - m[i]) * c1;
                    v[i] = v[i] * b2 + gi * gi * c2;
                    let denom = v[i].sqrt() * inv_bc2_sqrt + eps;
                    p[i] = p[i] * decay - (m[i] / denom) * step_size;
                }
                s.exp_avg = Tensor::from_vec(m, shape.clone(), &dev)?;
                s.exp_avg_sq = Tensor::from_vec(v, shape.clone(), &dev)?;
                s.var.set(&Tensor::from_vec(p, shape, &dev)?)?;
                continue;
            }
            // The same formula as tensor ops in f32 on the parameter's device.
            let g = g.to_dtype(DType::F32)?;
            let p = s.var.as_tensor().to_dtype(DType::F32)?.affine(decay, 0.0)?;
            // lerp(m, g, 1-β1) = m + (1-β1)(g - m)
            s.exp_avg = (&s.exp_avg + (&g - &s.exp_avg)?.affine(1.0 - beta1, 0.0)?)?;
            s.exp_avg_sq =
                (s.exp_avg_sq.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?;
            let denom = s.exp_avg_sq.sqrt()?.affine(inv_bc2_sqrt, eps)?;
            let p = (p - s.exp_avg.div(&denom)?.affine(step_size, 0.0)?)?;
            s.var.set(&p.to_dtype(s.var.dtype())?)?;
        }
        self.step += 1;
        Ok(())
    }

    /// Snapshot of the optimizer state (tensors are copied).
    pub fn state(&self) -> Result<AdamWState> {
        let mut tensors = HashMap::new();
        let mut param_steps = BTreeMap::new();
        for s in &self.slots {
            tensors.insert(format!("{}.exp_avg", s.name), s.exp_avg.copy()?);
            tensors.insert(format!("{}.exp_avg_sq", s.name), s.exp_avg_sq.copy()?);
            param_steps.insert(s.name.clone(), s.step);
        }
        Ok(AdamWState {
            tensors,
            meta: AdamWMeta {
                step: self.step,
                param_steps,
                config: self.cfg.clone(),
            },
        })
    }

    /// Restore a snapshot; every parameter must be present with matching shapes.
    pub fn load_state(&mut self, st: &AdamWState) -> Result<()> {
        for s in self.slots.iter_mut() {
            let get = |suffix: &str| -> Result<Tensor> {
                let key = format!("{}.{suffix}", s.name);
                let Some(t) = st.tensors.get(&key) else {
                    bail_config!("AdamW::load_state: missing {key:?}")
                };
                if t.dims() != s.var.dims() {
                    return Err(crate::error::Error::Shape {
                        op: "AdamW::load_state",
                        detail: format!(
                            "{key}: state {:?} vs parameter {:?}",
                            t.dims(),
                            s.var.dims()
                        ),
                    });
                }
                Ok(t.to_dtype(DType::F32)?.to_device(s.var.device())?)
            };
            let (m, v) = (get("exp_avg")?, get("exp_avg_sq")?);
            let Some(&ps) = st.meta.param_steps.get(&s.name) else {
                bail_config!("AdamW::load_state: missing step for {:?}", s.name)
            };
            s.exp_avg = m;
            s.exp_avg_sq = v;
            s.step = ps;
        }
        self.step = st.meta.step;
        self.cfg = st.meta.config.clone();
        Ok(())
    }
}

/// Schedule shapes (transformers `SchedulerType` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduleKind {
    #[default]
    Constant,
    Linear,
    Cosine,
}

/// Learning rate as a function of the optimizer step, with linear warmup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrScheduler {
    pub kind: LrScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    /// Needed by `linear` and `cosine`.
    pub total_steps: u64,
}

impl LrScheduler {
    /// The multiplier λ(step).
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, n) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            LrScheduleKind::Constant => 1.0,
            LrScheduleKind::Linear => ((n - s) / (n - w).max(1.0)).max(0.0),
            LrScheduleKind::Cosine => {
                let progress = (s - w) / (n - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }
    /// `base_lr · λ(step)`: the lr to use for the `step`-th (0-based) optimizer update.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }
}

/// Global L2-norm clipping of the gradients of `vars` in `grads`, like
/// `torch.nn.utils.clip_grad_norm_`. Returns the pre-clip total norm; `max_norm <= 0` only measures.
/// Reads one scalar from the device; [`clip_grad_norm_tensor`] reads none.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[&Var], max_norm: f64) -> Result<f64> {
    crate::ops::scalar_f64(&clip_grad_norm_tensor(grads, vars, max_norm)?)
}

/// [`clip_grad_norm`] without leaving the device: the per-tensor sums of squares (in f64), the
/// total and the clip coefficient are device tensors; the pre-clip norm comes back as a 0-d
/// f64 tensor for the caller to read with its other per-step scalars.
pub fn clip_grad_norm_tensor(
    grads: &mut GradStore,
    vars: &[&Var],
    max_norm: f64,
) -> Result<Tensor> {
    let mut sums = Vec::with_capacity(vars.len());
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sums.push(g.to_dtype(DType::F64)?.sqr()?.sum_all()?);
        }
    }
    let total = if sums.is_empty() {
        let dev = vars.first().map(|v| v.device().clone());
        Tensor::zeros((), DType::F64, &dev.unwrap_or(candle_core::Device::Cpu))?
    } else {
        Tensor::stack(&sums, 0)?.sum_all()?.sqrt()?
    };
    if max_norm > 0.0 {
        // coef = min(max_norm / (total + 1e-6), 1)
        let coef = (total.affine(1.0, 1e-6)?.recip()? * max_norm)?.minimum(1.0)?;
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = g.broadcast_mul(&coef.to_dtype(g.dtype())?)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(total)
}
