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
//! * KL estimators (Schulman, "Approximating KL divergence", 2020; TRL `kl_estimator`): with
//!   `logr = ref_logp − logp`, k1 `= −logr`, k3 `= (exp(logr) − 1) − logr` ([`KlEstimator`]).
//! * `whiten_rewards` (TRL): `rewards = masked_whiten(rewards, mask, shift_mean=False)`, then 0 on
//!   padding, before GAE ([`ppo_rewards`]).
//! * missing-EOS penalty (TRL `missing_eos_penalty`): `scores[~contains_eos] −= penalty`
//!   ([`missing_eos_penalty`]).
//! * entropy of the sampling distribution (TRL's `policy/entropy_avg`):
//!   `H_t = logsumexp(z_t) − Σ_v softmax(z_t)_v · z_{t,v}` over logits `z` already divided by
//!   the temperature ([`token_entropy`], differentiable, for an `−entropy_coef·H` bonus as
//!   OpenRLHF's `entropy_loss_coef`; TRL's PPO has no entropy term).
//!
//! Departures from TRL:
//! * TRL masks values with a mask one position longer than the response mask
//!   (`padding_mask_p1`) and adds the score one position *after* the last response token
//!   (`actual_end = sequence_lengths + 1` when that fits). Here one `mask_B_T` is used for
//!   everything and the score lands on the last real completion token (pass a longer mask to
//!   [`ppo_value_loss`] to mimic TRL's value mask).
//! * `ppo_total_loss` optionally subtracts an entropy bonus (TRL has none; OpenRLHF does).

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
    Ok(ppo_rewards(
        score_B,
        logp_B_T,
        ref_logp_B_T,
        mask_B_T,
        kl_coef,
        KlEstimator::K1,
        false,
    )?
    .rewards_B_T)
}

/// Per-token KL estimator of `KL(π ‖ π_ref)` from sampled-token log-probs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `logp − ref_logp` (unbiased, can be negative per token; TRL's default).
    #[default]
    K1,
    /// `(exp(ref − logp) − 1) − (ref − logp)` (unbiased, always ≥ 0, lower variance).
    K3,
}

impl KlEstimator {
    /// The per-token estimate `[B, T]` (detached inputs give a detached result).
    pub fn per_token(self, logp_B_T: &Tensor, ref_logp_B_T: &Tensor) -> Result<Tensor> {
        let logr = (ref_logp_B_T - logp_B_T)?;
        Ok(match self {
            KlEstimator::K1 => logr.neg()?,
            KlEstimator::K3 => ((logr.exp()? - 1.0)? - &logr)?,
        })
    }
}

/// What [`ppo_rewards`] computes: per-token rewards for GAE and the pieces TRL logs.
#[derive(Clone, Debug)]
pub struct PpoRewards {
    /// `−β·KL_t` plus the score at each row's last masked token (whitened with
    /// `whiten_rewards`); 0 on padding.
    pub rewards_B_T: Tensor,
    /// The per-token KL estimate, 0 on padding (`objective/kl` = mean over rows of its row sums).
    pub kl_B_T: Tensor,
    /// `−β·KL_t`, 0 on padding (`objective/non_score_reward`).
    pub non_score_B_T: Tensor,
}

/// TRL's step 4–5 of a PPO batch: `r_t = −kl_coef·KL_t` with the chosen estimator, the score
/// added at the last masked token, then optionally `masked_whiten(r, mask, shift_mean=False)`.
/// All outputs are detached.
pub fn ppo_rewards(
    score_B: &Tensor,
    logp_B_T: &Tensor,
    ref_logp_B_T: &Tensor,
    mask_B_T: &Tensor,
    kl_coef: f64,
    estimator: KlEstimator,
    whiten_rewards: bool,
) -> Result<PpoRewards> {
    const OP: &str = "ppo_rewards";
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
    let kl = (estimator.per_token(&logp_B_T.detach(), &ref_logp_B_T.detach())? * &mask)?;
    let non_score = (&kl * (-kl_coef))?;
    let last = last_token_one_hot(&mask)?;
    let score = score_B
        .detach()
        .to_dtype(dtype)?
        .unsqueeze(1)?
        .broadcast_as((b, t))?;
    let mut rewards = ((&non_score + (last * score)?)? * &mask)?;
    if whiten_rewards {
        rewards = (masked_whiten(&rewards, &mask, false)? * &mask)?;
    }
    Ok(PpoRewards {
        rewards_B_T: rewards,
        kl_B_T: kl,
        non_score_B_T: non_score,
    })
}

/// One-hot `[B, T]` of each row's last nonzero mask position (a row with none stays 0).
fn last_token_one_hot(mask_B_T: &Tensor) -> Result<Tensor> {
    let (b, t) = mask_B_T.dims2()?;
    let m = mask_B_T.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let mut last = vec![0f64; b * t];
    for (i, row) in m.iter().enumerate() {
        if let Some(j) = row.iter().rposition(|&v| v != 0.0) {
            last[i * t + j] = 1.0;
        }
    }
    Ok(Tensor::from_vec(last, (b, t), mask_B_T.device())?.to_dtype(mask_B_T.dtype())?)
}

/// TRL's EOS trick: `penalty` is subtracted from the score of each completion that has no EOS
/// (it was cut at the length limit). `has_eos_B` holds 1 for a completion that ended with EOS.
pub fn missing_eos_penalty(score_B: &Tensor, has_eos_B: &Tensor, penalty: f64) -> Result<Tensor> {
    const OP: &str = "missing_eos_penalty";
    expect_rank(OP, "score_B", score_B, 1)?;
    same_shapes(OP, &[("score_B", score_B), ("has_eos_B", has_eos_B)])?;
    let missing = (1.0 - has_eos_B.to_dtype(score_B.dtype())?)?;
    Ok((score_B - (missing * penalty)?)?)
}

/// Entropy `[B, T]` of `softmax(logits)` at each position, `logsumexp(z) − Σ softmax(z)·z`
/// (TRL's `entropy_from_logits`); differentiable. Pass logits already divided by the sampling
/// temperature.
pub fn token_entropy(logits_B_T_V: &Tensor) -> Result<Tensor> {
    expect_rank("token_entropy", "logits_B_T_V", logits_B_T_V, 3)?;
    let z = logits_B_T_V;
    let max = z.max_keepdim(D::Minus1)?.detach();
    let shifted = z.broadcast_sub(&max)?;
    let sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?;
    let lse = (sum_exp.log()? + &max)?;
    let p = shifted.exp()?.broadcast_div(&sum_exp)?;
    let pz = (p * z)?.sum_keepdim(D::Minus1)?;
    Ok((lse - pz)?.squeeze(D::Minus1)?)
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

/// Total PPO loss `pg + vf_coef·vf` (TRL), minus `entropy_coef · entropy` when an entropy
/// (a scalar: the masked mean of [`token_entropy`]) is given (OpenRLHF's entropy bonus).
pub fn ppo_total_loss(
    pg_loss: &Tensor,
    vf_loss: &Tensor,
    vf_coef: f64,
    entropy: Option<(&Tensor, f64)>,
) -> Result<Tensor> {
    let loss = (pg_loss + (vf_loss * vf_coef)?)?;
    Ok(match entropy {
        Some((h, coef)) if coef != 0.0 => (loss - (h * coef)?)?,
        _ => loss,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t2(v: &[f64], b: usize, t: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (b, t), &Device::Cpu).unwrap()
    }
    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{a:?} vs {b:?}");
        }
    }
    fn flat(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    #[test]
    fn k1_and_k3_follow_schulman() {
        // logr = ref − logp = −0.5: k1 = 0.5, k3 = e^−0.5 − 1 + 0.5
        let lp = t2(&[-1.0, -2.0], 1, 2);
        let rf = t2(&[-1.5, -2.0], 1, 2);
        close(
            &flat(&KlEstimator::K1.per_token(&lp, &rf).unwrap()),
            &[0.5, 0.0],
            1e-12,
        );
        let k3 = (-0.5f64).exp() - 1.0 + 0.5;
        close(
            &flat(&KlEstimator::K3.per_token(&lp, &rf).unwrap()),
            &[k3, 0.0],
            1e-12,
        );
        // k3 is never negative, k1 can be
        let k1n = KlEstimator::K1.per_token(&rf, &lp).unwrap();
        assert!(flat(&k1n)[0] < 0.0);
        assert!(flat(&KlEstimator::K3.per_token(&rf, &lp).unwrap())[0] > 0.0);
    }

    #[test]
    fn rewards_put_the_score_on_the_last_real_token_and_zero_padding() {
        let lp = t2(&[-1.0, -2.0, -3.0, -1.0, -1.0, -1.0], 2, 3);
        let rf = t2(&[-1.5, -2.0, -9.0, -1.0, -0.5, -1.0], 2, 3);
        let mask = t2(&[1.0, 1.0, 0.0, 1.0, 1.0, 1.0], 2, 3);
        let score = Tensor::new(&[2.0f64, -1.0], &Device::Cpu).unwrap();
        let r = ppo_rewards(&score, &lp, &rf, &mask, 0.1, KlEstimator::K1, false).unwrap();
        close(
            &flat(&r.rewards_B_T),
            &[-0.05, 2.0, 0.0, 0.0, 0.05, -1.0],
            1e-12,
        );
        close(&flat(&r.kl_B_T), &[0.5, 0.0, 0.0, 0.0, -0.5, 0.0], 1e-12);
        close(
            &flat(&r.non_score_B_T),
            &[-0.05, 0.0, 0.0, 0.0, 0.05, 0.0],
            1e-12,
        );
        // the k1 wrapper is the same function
        let old = kl_penalized_rewards(&score, &lp, &rf, &mask, 0.1).unwrap();
        close(&flat(&old), &flat(&r.rewards_B_T), 0.0);
    }

    #[test]
    fn whiten_rewards_keeps_the_mean_and_zeroes_padding() {
        // r = [0, 0, 3 | pad]: mean 1, unbiased var 3 → (r − 1)/√3 + 1
        let lp = t2(&[-1.0; 4], 1, 4);
        let mask = t2(&[1.0, 1.0, 1.0, 0.0], 1, 4);
        let score = Tensor::new(&[3.0f64], &Device::Cpu).unwrap();
        let r = ppo_rewards(&score, &lp, &lp, &mask, 0.05, KlEstimator::K3, true).unwrap();
        let s = (3.0f64 + 1e-8).sqrt();
        close(
            &flat(&r.rewards_B_T),
            &[1.0 - 1.0 / s, 1.0 - 1.0 / s, 1.0 + 2.0 / s, 0.0],
            1e-12,
        );
    }

    #[test]
    fn missing_eos_penalty_hits_only_truncated_completions() {
        let score = Tensor::new(&[1.0f64, 2.0, -3.0], &Device::Cpu).unwrap();
        let eos = Tensor::new(&[1.0f64, 0.0, 0.0], &Device::Cpu).unwrap();
        let s = missing_eos_penalty(&score, &eos, 1.5).unwrap();
        close(&s.to_vec1::<f64>().unwrap(), &[1.0, 0.5, -4.5], 1e-12);
        let bad = Tensor::new(&[1.0f64, 0.0], &Device::Cpu).unwrap();
        assert!(missing_eos_penalty(&score, &bad, 1.0).is_err());
    }

    #[test]
    fn entropy_is_exact_and_its_gradient_matches_finite_differences() {
        // row 0: logits (0, ln 3, 0, 0), p = (1, 3, 1, 1)/6; row 1 uniform over 4: ln 4
        let z = Tensor::from_vec(
            vec![0.0f64, 3f64.ln(), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            (1, 2, 4),
            &Device::Cpu,
        )
        .unwrap();
        let p: Vec<f64> = {
            let e = [1.0, 3.0, 1.0, 1.0];
            let s: f64 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        };
        let h0 = -p.iter().map(|q| q * q.ln()).sum::<f64>();
        close(&flat(&token_entropy(&z).unwrap()), &[h0, 4f64.ln()], 1e-12);

        let v = Var::from_tensor(&Tensor::new(&[[[0.3f64, -1.2, 2.0]]], &Device::Cpu).unwrap())
            .unwrap();
        let h = token_entropy(v.as_tensor()).unwrap().sum_all().unwrap();
        let g = flat(h.backward().unwrap().get(v.as_tensor()).unwrap());
        let base = [0.3f64, -1.2, 2.0];
        for k in 0..3 {
            let eval = |d: f64| {
                let mut x = base;
                x[k] += d;
                let t = Tensor::new(&[[x]], &Device::Cpu).unwrap();
                flat(&token_entropy(&t).unwrap())[0]
            };
            let fd = (eval(1e-6) - eval(-1e-6)) / 2e-6;
            assert!((fd - g[k]).abs() < 1e-6, "d/dz{k}: {} vs {fd}", g[k]);
        }
    }

    #[test]
    fn total_loss_subtracts_the_entropy_bonus() {
        let pg = Tensor::new(0.5f64, &Device::Cpu).unwrap();
        let vf = Tensor::new(2.0f64, &Device::Cpu).unwrap();
        let h = Tensor::new(3.0f64, &Device::Cpu).unwrap();
        let l = |e| scalar_f64(&ppo_total_loss(&pg, &vf, 0.1, e).unwrap()).unwrap();
        assert!((l(None) - 0.7).abs() < 1e-12);
        assert!((l(Some((&h, 0.0))) - 0.7).abs() < 1e-12);
        assert!((l(Some((&h, 0.01))) - 0.67).abs() < 1e-12);
    }
}
