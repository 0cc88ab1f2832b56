//! PPO for language models: per-token KL-penalised rewards, GAE, whitening, clipped policy and
//! value losses, and the Ziegler et al. KL controllers.
//!
//! TRL 1.16 no longer ships a PPO trainer; the formulas follow TRL's last `PPOTrainer`
//! (`trl/trainer/ppo_trainer.py`, TRL 0.12–0.2x, the "PPOv2" rewrite) and `trl/trainer/utils.py`:
//! * rewards: `r_t = −kl_coef · (logp_t − ref_logp_t)` (k1 estimator, `kl_estimator="k1"`), plus the
//!   sequence score at the last completion token (`rewards[[arange, actual_end]] += scores`).
//! * GAE (Schulman et al. 2016, Eq. 16): backwards over t, `δ_t = r_t + γ·V_{t+1} − V_t`,
//!   `A_t = δ_t + γλ·A_{t+1}`, `V_T = 0`; `returns = A + V`; then `A = masked_whiten(A, mask)` and
//!   `A` is zeroed on padding. Rewards and values are multiplied by the mask first (TRL fills
//!   padding with 0).
//! * `masked_whiten`: `(x − mean)·rsqrt(var + 1e-8)` with the masked mean and the *unbiased*
//!   masked variance (`mask_sum/(mask_sum−1)` Bessel factor); `shift_mean=false` adds the mean back.
//! * policy loss: `masked_mean(max(−A·ratio, −A·clamp(ratio, 1−ε, 1+ε)))`, `ratio = exp(logp − old)`;
//!   `pg_clipfrac = masked_mean(pg_losses2 > pg_losses)`, `approxkl = 0.5·masked_mean((logp − old)²)`.
//! * value loss: `0.5·masked_mean(max((V − R)², (clamp(V, V_old−ε_v, V_old+ε_v) − R)²))`,
//!   `vf_clipfrac = masked_mean(vf_losses2 > vf_losses1)`.
//! * KL controllers (Ziegler et al. 2019, §2.2; TRL `AdaptiveKLController`):
//!   `e = clip(KL/target − 1, −0.2, 0.2)`, `β ← β·(1 + e·n_steps/horizon)`.
//!
//! Departures: TRL masks values with a mask one position longer than the response mask
//! (`padding_mask_p1`); here one `mask_B_T` is used for everything (pass a longer mask to
//! [`ppo_value_loss`] to mimic it). No `whiten_rewards`, EOS-missing penalty or k3 reward estimator.

use crate::error::{bail_config, Result};
use crate::ops::{clamp_like_torch, expect_rank, masked_mean, same_shapes, scalar_f64};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

/// Per-token rewards `−kl_coef·(logp − ref)` plus `score_B` at each row's last masked token.
/// Masked positions are 0. Not differentiable (inputs are detached).
pub fn kl_penalized_rewards(
    score_B: &Tensor,
    logp_B_T: &Tensor,
    ref_logp_B_T: &Tensor,
    mask_B_T: &Tensor,
    kl_coef: f64,
) -> Result<Tensor> {
    const OP: &str = "kl_penalized_rewards";
    expect_rank(OP, "logp_B_T", logp_B_T, 2)?;
    same_shapes(
        OP,
        &[
            ("logp_B_T", logp_B_T),
            ("ref_logp_B_T", ref_logp_B_T),
            ("mask_B_T", mask_B_T),
        ],
    )?;
    let (b, t) = logp_B_T.dims2()?;
    if score_B.dims() != [b] {
        crate::error::bail_shape!(OP, "score_B must be ({b},), got {:?}", score_B.dims());
    }
    let dtype = logp_B_T.dtype();
    let mask = mask_B_T.to_dtype(dtype)?.detach();
    let non_score = ((logp_B_T.detach() - ref_logp_B_T.detach())? * (-kl_coef))?;
    // one-hot of the last masked position per row
    let m = mask.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let mut last = vec![0f64; b * t];
    for (i, row) in m.iter().enumerate() {
        if let Some(j) = row.iter().rposition(|&v| v != 0.0) {
            last[i * t + j] = 1.0;
        }
    }
    let last = Tensor::from_vec(last, (b, t), logp_B_T.device())?.to_dtype(dtype)?;
    let score = score_B
        .detach()
        .to_dtype(dtype)?
        .unsqueeze(1)?
        .broadcast_as((b, t))?;
    Ok(((non_score + (last * score)?)? * mask)?)
}

/// TRL `masked_whiten` (unbiased masked variance, eps 1e-8).
pub fn masked_whiten(x: &Tensor, mask: &Tensor, shift_mean: bool) -> Result<Tensor> {
    let m = mask.to_dtype(x.dtype())?;
    let mean = masked_mean(x, &m)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = masked_mean(&centered.sqr()?, &m)?;
    let n = scalar_f64(&m.sum_all()?)?;
    if n < 2.0 {
        bail_config!("masked_whiten: needs at least 2 unmasked elements, got {n}");
    }
    let var = (var * (n / (n - 1.0)))?;
    let w = centered.broadcast_mul(&(var + 1e-8)?.sqrt()?.recip()?)?;
    if shift_mean {
        Ok(w)
    } else {
        Ok(w.broadcast_add(&mean)?)
    }
}

/// GAE over (B, T): returns `(whitened advantages, returns)`; both detached.
pub fn gae(
    rewards_B_T: &Tensor,
    values_B_T: &Tensor,
    mask_B_T: &Tensor,
    gamma: f64,
    lam: f64,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "gae";
    expect_rank(OP, "rewards_B_T", rewards_B_T, 2)?;
    same_shapes(
        OP,
        &[
            ("rewards_B_T", rewards_B_T),
            ("values_B_T", values_B_T),
            ("mask_B_T", mask_B_T),
        ],
    )?;
    let dtype = rewards_B_T.dtype();
    let dev = rewards_B_T.device();
    let (b, t) = rewards_B_T.dims2()?;
    let m = mask_B_T.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let r = rewards_B_T.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let v = values_B_T.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let mut adv = vec![0f64; b * t];
    let mut ret = vec![0f64; b * t];
    for i in 0..b {
        let mut lastgaelam = 0.0;
        for j in (0..t).rev() {
            let vj = v[i][j] * m[i][j];
            let next = if j + 1 < t {
                v[i][j + 1] * m[i][j + 1]
            } else {
                0.0
            };
            let delta = r[i][j] * m[i][j] + gamma * next - vj;
            lastgaelam = delta + gamma * lam * lastgaelam;
            adv[i * t + j] = lastgaelam;
            ret[i * t + j] = lastgaelam + vj;
        }
    }
    let adv = Tensor::from_vec(adv, (b, t), dev)?;
    let ret = Tensor::from_vec(ret, (b, t), dev)?.to_dtype(dtype)?;
    let m64 = mask_B_T.to_dtype(DType::F64)?;
    let adv = (masked_whiten(&adv, &m64, true)? * &m64)?.to_dtype(dtype)?;
    Ok((adv, ret))
}

/// Policy-loss diagnostics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PpoPolicyMetrics {
    pub pg_clipfrac: f32,
    pub approxkl: f32,
}

/// Clipped surrogate policy loss; differentiable w.r.t. `logp_B_T`.
pub fn ppo_policy_loss(
    logp_B_T: &Tensor,
    old_logp_B_T: &Tensor,
    adv_B_T: &Tensor,
    mask_B_T: &Tensor,
    cliprange: f64,
) -> Result<(Tensor, PpoPolicyMetrics)> {
    const OP: &str = "ppo_policy_loss";
    expect_rank(OP, "logp_B_T", logp_B_T, 2)?;
    same_shapes(
        OP,
        &[
            ("logp_B_T", logp_B_T),
            ("old_logp_B_T", old_logp_B_T),
            ("adv_B_T", adv_B_T),
            ("mask_B_T", mask_B_T),
        ],
    )?;
    let dtype = logp_B_T.dtype();
    let mask = mask_B_T.to_dtype(dtype)?;
    let adv = adv_B_T.detach().to_dtype(dtype)?;
    let diff = (logp_B_T - old_logp_B_T.detach())?;
    let ratio = diff.exp()?;
    let l1 = (adv.neg()? * &ratio)?;
    let l2 = (adv.neg()? * clamp_like_torch(&ratio, 1.0 - cliprange, 1.0 + cliprange)?)?;
    let loss = masked_mean(&l1.maximum(&l2)?, &mask)?;
    let metrics = PpoPolicyMetrics {
        pg_clipfrac: scalar_f64(&masked_mean(&l2.gt(&l1)?.to_dtype(dtype)?, &mask)?)? as f32,
        approxkl: (0.5 * scalar_f64(&masked_mean(&diff.detach().sqr()?, &mask)?)?) as f32,
    };
    Ok((loss, metrics))
}

/// Clipped value loss and `vf_clipfrac`; differentiable w.r.t. `vpred_B_T`.
pub fn ppo_value_loss(
    vpred_B_T: &Tensor,
    old_values_B_T: &Tensor,
    returns_B_T: &Tensor,
    mask_B_T: &Tensor,
    cliprange_value: f64,
) -> Result<(Tensor, f32)> {
    const OP: &str = "ppo_value_loss";
    expect_rank(OP, "vpred_B_T", vpred_B_T, 2)?;
    same_shapes(
        OP,
        &[
            ("vpred_B_T", vpred_B_T),
            ("old_values_B_T", old_values_B_T),
            ("returns_B_T", returns_B_T),
            ("mask_B_T", mask_B_T),
        ],
    )?;
    let dtype = vpred_B_T.dtype();
    let mask = mask_B_T.to_dtype(dtype)?;
    let old = old_values_B_T.detach();
    let ret = returns_B_T.detach();
    // clamp(V, old - eps, old + eps) with torch's inclusive gradient: pass-through where inside.
    let lo = (&old - cliprange_value)?;
    let hi = (&old + cliprange_value)?;
    let clipped = vpred_B_T
        .lt(&lo)?
        .where_cond(&lo, &vpred_B_T.gt(&hi)?.where_cond(&hi, vpred_B_T)?)?;
    let l1 = (vpred_B_T - &ret)?.sqr()?;
    let l2 = (clipped - &ret)?.sqr()?;
    let loss = (masked_mean(&l1.maximum(&l2)?, &mask)? * 0.5)?;
    let clipfrac = scalar_f64(&masked_mean(&l2.gt(&l1)?.to_dtype(dtype)?, &mask)?)? as f32;
    Ok((loss, clipfrac))
}

/// Entropy-free total PPO loss helper: `pg + vf_coef·vf`.
pub fn ppo_total_loss(pg_loss: &Tensor, vf_loss: &Tensor, vf_coef: f64) -> Result<Tensor> {
    Ok((pg_loss + (vf_loss * vf_coef)?)?)
}

/// KL coefficient controller (Ziegler et al. 2019).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KlController {
    Fixed {
        value: f64,
    },
    Adaptive {
        value: f64,
        target: f64,
        horizon: f64,
    },
}

impl KlController {
    pub fn value(&self) -> f64 {
        match self {
            KlController::Fixed { value } | KlController::Adaptive { value, .. } => *value,
        }
    }
    /// Update with the observed KL over `n_steps` samples (no-op for `Fixed`).
    pub fn update(&mut self, current_kl: f64, n_steps: usize) {
        if let KlController::Adaptive {
            value,
            target,
            horizon,
        } = self
        {
            let e = (current_kl / *target - 1.0).clamp(-0.2, 0.2);
            *value *= 1.0 + e * n_steps as f64 / *horizon;
        }
    }
}

/// Sum of `x` over the last dim (convenience for sequence log-probs).
pub fn seq_sum(x_B_T: &Tensor, mask_B_T: &Tensor) -> Result<Tensor> {
    Ok((x_B_T * mask_B_T.to_dtype(x_B_T.dtype())?)?.sum(D::Minus1)?)
}
