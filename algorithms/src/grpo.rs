//! Group Relative Policy Optimization: group-relative advantages and the clipped per-token loss.
//!
//! References (TRL 1.16.0, `trl/trainer/grpo_trainer.py`):
//! * Advantages: `GRPOTrainer._generate_and_score_completions`, `multi_objective_aggregation=
//!   "sum_then_normalize"`: `A = r − mean_group(r)`, divided by `std + 1e-4` unless
//!   `scale_rewards="none"` (Dr. GRPO, Liu et al. 2025 §3.1). `std` is `trl.trainer.utils.nanstd`:
//!   the *unbiased* (Bessel-corrected) std, per group (`"group"`) or over the whole batch
//!   (`"batch"`, the mean stays per-group). With one generation per group std is 0.
//! * Loss: `GRPOTrainer._compute_loss` (token-level importance sampling):
//!   `ratio = exp(logp − old_logp)`, `coef_2 = clamp(ratio, 1−ε_low, 1+ε_high)` (DAPO clip-higher,
//!   Yu et al. 2025 §3.1), optional two-sided `delta` cap on `ratio`,
//!   `per_token = −min(ratio·A, coef_2·A) + β·KL`, with the k3 estimator
//!   `KL = exp(ref − logp) − (ref − logp) − 1` (Shao et al. 2024, Eq. 4).
//!   Aggregation: `grpo` = mean over sequences of the per-sequence token mean (`mask.sum(-1)`
//!   clamped ≥ 1); `bnpo` = Σ(loss·mask)/max(Σmask, 1); `dr_grpo` = Σ(loss·mask)/(B·max_completion_length);
//!   `dapo` = Σ(loss·mask)/normaliser, where TRL's normaliser is `num_items_in_batch / num_processes`
//!   (× `grad_accum / steps_per_generation` in training), i.e. the number of completion tokens in
//!   the generation batch; here it is [`GrpoInputs::dapo_normalizer`], defaulting to Σmask.
//! * Metrics: `kl` = masked mean of per-token KL; `clip_ratio/{low_mean,high_mean,region_mean}`
//!   = masked means of `(ratio < 1−ε_low) & (A < 0)`, `(ratio > 1+ε_high) & (A > 0)` and their union;
//!   `clip_ratio/low_min`, `clip_ratio/high_max` over per-sequence masked means.
//!
//! Departures: TRL divides `grpo`/`bnpo`/`dr_grpo` by `gradient_accumulation_steps` in training; this
//! function returns the undivided value (TRL's eval-mode value) — scale it in the training loop.
//! Not implemented: sequence-level importance sampling (GSPO), `cispo`/`sapo`/`vespo`/`luspo`,
//! entropy masking/bonus, off-policy masks, vLLM importance-sampling correction, KL bias correction,
//! NaN (unscorable) rewards, multi-reward `normalize_then_sum`.

use crate::error::{bail_config, bail_shape, Result};
use crate::ops::{clamp_like_torch, expect_rank, same_shapes, scalar_f64};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How rewards are scaled after subtracting the group mean (TRL `scale_rewards`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    #[default]
    Group,
    Batch,
    /// Dr. GRPO: mean-centering only.
    None,
}

/// Group-relative advantages for `rewards_N` laid out as consecutive groups of
/// `num_generations` completions of the same prompt (TRL's layout). Not differentiable.
pub fn group_advantages(
    rewards_N: &Tensor,
    num_generations: usize,
    scale: ScaleRewards,
) -> Result<Tensor> {
    const OP: &str = "group_advantages";
    expect_rank(OP, "rewards_N", rewards_N, 1)?;
    let n = rewards_N.dim(0)?;
    if num_generations == 0 || n % num_generations != 0 {
        bail_shape!(
            OP,
            "rewards_N shape {:?} is not a multiple of num_generations={num_generations}",
            rewards_N.dims()
        );
    }
    let r = rewards_N.detach();
    let r_PG = r.reshape((n / num_generations, num_generations))?;
    let mean_PG = r_PG.mean_keepdim(1)?.broadcast_as(r_PG.shape())?;
    let adv_PG = (&r_PG - &mean_PG)?;
    let adv = adv_PG.flatten_all()?;
    let unbiased_std = |x: &Tensor, dim_len: usize, per_group: bool| -> Result<Tensor> {
        if dim_len <= 1 {
            return Ok(x.flatten_all()?.zeros_like()?);
        }
        if per_group {
            let m = x.mean_keepdim(1)?;
            let ss = x.broadcast_sub(&m)?.sqr()?.sum_keepdim(1)?;
            Ok((ss / (dim_len as f64 - 1.0))?
                .sqrt()?
                .broadcast_as(x.shape())?
                .flatten_all()?)
        } else {
            let m = x.mean_all()?;
            let ss = x.broadcast_sub(&m)?.sqr()?.sum_all()?;
            Ok((ss / (dim_len as f64 - 1.0))?
                .sqrt()?
                .broadcast_as(x.shape())?
                .contiguous()?)
        }
    };
    match scale {
        ScaleRewards::None => Ok(adv),
        ScaleRewards::Group => {
            let std = unbiased_std(&r_PG, num_generations, true)?;
            Ok(adv.div(&(std + 1e-4)?)?)
        }
        ScaleRewards::Batch => {
            let std = unbiased_std(&r, n, false)?;
            Ok(adv.div(&(std + 1e-4)?)?)
        }
    }
}

/// Loss aggregation (TRL `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLossType {
    Grpo,
    Bnpo,
    DrGrpo,
    #[default]
    Dapo,
}

/// Hyper-parameters; defaults follow TRL 1.16 `GRPOConfig` (`loss_type="dapo"`, β = 0, ε = 0.2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GrpoConfig {
    pub loss_type: GrpoLossType,
    /// KL coefficient; 0 disables the KL term (and the need for reference log-probs).
    pub beta: f64,
    pub epsilon_low: f64,
    /// DAPO clip-higher; TRL defaults it to `epsilon`.
    pub epsilon_high: f64,
    /// Two-sided clipping upper bound on the ratio (TRL `delta`), `None` = off.
    pub delta: Option<f64>,
    /// Used by `dr_grpo` only.
    pub max_completion_length: usize,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            loss_type: GrpoLossType::Dapo,
            beta: 0.0,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            delta: None,
            max_completion_length: 512,
        }
    }
}

/// Inputs: per-token log-probs of the completion tokens, shape (B, T).
#[derive(Clone, Copy, Debug)]
pub struct GrpoInputs<'a> {
    pub logp_B_T: &'a Tensor,
    /// Log-probs at sampling time; `None` = `logp_B_T.detach()` (single-iteration GRPO).
    pub old_logp_B_T: Option<&'a Tensor>,
    /// Required when `beta != 0`.
    pub ref_logp_B_T: Option<&'a Tensor>,
    pub adv_B: &'a Tensor,
    /// 1 for completion tokens, 0 for padding (same float dtype as `logp_B_T`).
    pub mask_B_T: &'a Tensor,
    /// `dapo` normaliser (number of completion tokens in the generation batch); `None` = Σmask.
    pub dapo_normalizer: Option<f64>,
}

/// TRL-named metrics (`kl` only when `beta != 0`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GrpoMetrics {
    pub kl: Option<f32>,
    pub clip_ratio_low_mean: f32,
    pub clip_ratio_high_mean: f32,
    pub clip_ratio_region_mean: f32,
    pub clip_ratio_low_min: f32,
    pub clip_ratio_high_max: f32,
}

impl GrpoMetrics {
    pub fn to_map(&self) -> BTreeMap<String, f32> {
        let mut m: BTreeMap<String, f32> = [
            ("clip_ratio/low_mean", self.clip_ratio_low_mean),
            ("clip_ratio/high_mean", self.clip_ratio_high_mean),
            ("clip_ratio/region_mean", self.clip_ratio_region_mean),
            ("clip_ratio/low_min", self.clip_ratio_low_min),
            ("clip_ratio/high_max", self.clip_ratio_high_max),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if let Some(kl) = self.kl {
            m.insert("kl".into(), kl);
        }
        m
    }
}

/// The GRPO loss (scalar) and metrics; differentiable w.r.t. `logp_B_T`.
pub fn grpo_loss(x: &GrpoInputs, cfg: &GrpoConfig) -> Result<(Tensor, GrpoMetrics)> {
    const OP: &str = "grpo_loss";
    let logp = x.logp_B_T;
    expect_rank(OP, "logp_B_T", logp, 2)?;
    let mut named = vec![("logp_B_T", logp), ("mask_B_T", x.mask_B_T)];
    if let Some(t) = x.old_logp_B_T {
        named.push(("old_logp_B_T", t));
    }
    if let Some(t) = x.ref_logp_B_T {
        named.push(("ref_logp_B_T", t));
    }
    same_shapes(OP, &named)?;
    let (b, _t) = logp.dims2()?;
    if x.adv_B.dims() != [b] {
        bail_shape!(
            OP,
            "adv_B must be ({b},) to match logp_B_T {:?}, got {:?}",
            logp.dims(),
            x.adv_B.dims()
        );
    }
    let dtype = logp.dtype();
    let mask = x.mask_B_T.to_dtype(dtype)?;
    let adv = x
        .adv_B
        .to_dtype(dtype)?
        .detach()
        .unsqueeze(1)?
        .broadcast_as(logp.shape())?
        .contiguous()?;
    let old = match x.old_logp_B_T {
        Some(o) => o.detach(),
        None => logp.detach(),
    };
    let coef_1 = (logp - &old)?.exp()?;
    let coef_2 = clamp_like_torch(&coef_1, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)?;
    let coef_1c = match cfg.delta {
        Some(d) => clamp_like_torch(&coef_1, f64::NEG_INFINITY, d)?,
        None => coef_1.clone(),
    };
    let l1 = (&coef_1c * &adv)?;
    let l2 = (&coef_2 * &adv)?;
    let mut per_token = l1.minimum(&l2)?.neg()?;

    let masked_mean = |v: &Tensor| -> Result<f32> {
        let tot = scalar_f64(&(v * &mask)?.sum_all()?)?;
        let cnt = scalar_f64(&mask.sum_all()?)?.max(1.0);
        Ok((tot / cnt) as f32)
    };
    let mut kl_metric = None;
    if cfg.beta != 0.0 {
        let Some(r) = x.ref_logp_B_T else {
            bail_config!("grpo_loss: beta={} needs ref_logp_B_T", cfg.beta);
        };
        let d = (r.detach() - logp)?;
        let kl = ((d.exp()? - &d)? - 1.0)?;
        kl_metric = Some(masked_mean(&kl.detach())?);
        per_token = (per_token + (kl * cfg.beta)?)?;
    }

    let masked = (&per_token * &mask)?;
    let loss = match cfg.loss_type {
        GrpoLossType::Grpo => {
            let per_seq = masked
                .sum(D::Minus1)?
                .div(&mask.sum(D::Minus1)?.clamp(1.0, f64::INFINITY)?)?;
            per_seq.mean_all()?
        }
        GrpoLossType::Bnpo => {
            let n = scalar_f64(&mask.sum_all()?)?.max(1.0);
            (masked.sum_all()? / n)?
        }
        GrpoLossType::DrGrpo => {
            if cfg.max_completion_length == 0 {
                bail_config!("grpo_loss: dr_grpo needs max_completion_length > 0");
            }
            (masked.sum_all()? / (b * cfg.max_completion_length) as f64)?
        }
        GrpoLossType::Dapo => {
            let n = match x.dapo_normalizer {
                Some(n) => n,
                None => scalar_f64(&mask.sum_all()?)?,
            }
            .max(1.0);
            (masked.sum_all()? / n)?
        }
    };

    // Clip metrics (TRL computes them after the optional `delta` cap).
    let c = coef_1c.detach();
    let neg = adv.lt(0.0)?.to_dtype(dtype)?;
    let pos = adv.gt(0.0)?.to_dtype(dtype)?;
    let low = (c.lt(1.0 - cfg.epsilon_low)?.to_dtype(dtype)? * neg)?;
    let high = (c.gt(1.0 + cfg.epsilon_high)?.to_dtype(dtype)? * pos)?;
    let region = low.maximum(&high)?;
    let seq_mean = |v: &Tensor| -> Result<Vec<f64>> {
        let s = (v * &mask)?.sum(D::Minus1)?.div(&mask.sum(D::Minus1)?)?;
        Ok(s.to_dtype(DType::F64)?.to_vec1::<f64>()?)
    };
    let nanmin = |v: Vec<f64>| {
        v.into_iter()
            .filter(|x| !x.is_nan())
            .fold(f64::NAN, f64::min)
    };
    let nanmax = |v: Vec<f64>| {
        v.into_iter()
            .filter(|x| !x.is_nan())
            .fold(f64::NAN, f64::max)
    };
    let metrics = GrpoMetrics {
        kl: kl_metric,
        clip_ratio_low_mean: masked_mean(&low)?,
        clip_ratio_high_mean: masked_mean(&high)?,
        clip_ratio_region_mean: masked_mean(&region)?,
        clip_ratio_low_min: nanmin(seq_mean(&low)?) as f32,
        clip_ratio_high_max: nanmax(seq_mean(&high)?) as f32,
    };
    Ok((loss, metrics))
}
