//! Direct Preference Optimization losses over per-sequence log-probabilities.
//!
//! References (TRL 1.16.0, `trl/trainer/dpo_trainer.py`, `DPOTrainer._compute_loss`, with
//! `f_divergence_type="reverse_kl"`, `ld_alpha=None`, `use_weighting=False`):
//! * `sigmoid`: `-logsigmoid(β·Δ)`, Δ = (πc − refc) − (πr − refr) (Rafailov et al. 2023, Eq. 7).
//! * `robust`: `(-(1−ε)·logsigmoid(βΔ) + ε·logsigmoid(−βΔ)) / (1−2ε)` (Chowdhury et al. 2024, Eq. 21),
//!   ε = `label_smoothing` ∈ [0, 0.5).
//! * `hinge`: `relu(1 − βΔ)` (SLiC, Zhao et al. 2023).
//! * `ipo`: `(Δ_avg − 1/(2β))²` (Azar et al. 2023, Eq. 17) where TRL length-normalises each log-ratio
//!   by its completion-token count, `Δ_avg = (πc−refc)/max(len_c,1) − (πr−refr)/max(len_r,1)`.
//! * `simpo` (TRL 1.16 has it in `trl/experimental/cpo/cpo_trainer.py`, `CPOTrainer.cpo_loss` with
//!   `loss_type="simpo"`, `alpha=0`): reference-free, on length-averaged log-probs
//!   `logits = πc/len_c − πr/len_r − γ/β`, loss `-(1−ε)·logsigmoid(β·logits) − ε·logsigmoid(−β·logits)`
//!   (Meng et al. 2024, Eq. 6).
//!
//! The loss is the batch mean of the per-pair loss (TRL's `per_sequence_loss.mean()`).
//! Metrics use TRL's names and definitions: `rewards/chosen = mean(β·(πc − refc))`, etc.; for
//! `simpo` (like CPOTrainer) rewards are `β·avg_logp` and `logps/*` are the length-averaged log-probs.
//!
//! Departures from TRL 1.16:
//! * `sigmoid` with `label_smoothing > 0` applies the conservative-DPO (cDPO) form
//!   `-(1−ε)·logsigmoid(βΔ) − ε·logsigmoid(−βΔ)` (as TRL's `CPOTrainer.cpo_loss` "sigmoid" and TRL
//!   < 1.0's `DPOTrainer.dpo_loss`). TRL 1.16's DPOTrainer ignores `label_smoothing` for `sigmoid`;
//!   with ε = 0 (the default) both coincide.
//! * SimPO's optional behaviour-cloning term (`cpo_alpha · NLL`, 0 for SimPO) is not included; add
//!   [`crate::sft::sft_loss`] if wanted. SimPO lengths are clamped to ≥ 1 (TRL divides unclamped).
//! * Only one loss type at a time (TRL allows weighted lists); no f-divergences, LD-DPO or WPO.
//! * `rewards/accuracies` etc. are means over this batch only (no cross-process gather).

use crate::error::{bail_config, bail_shape, Result};
use crate::ops::{log_sigmoid, read_f64s, relu_like_torch, same_shapes};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which DPO-family loss to use (TRL's `loss_type` strings via serde).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    #[default]
    Sigmoid,
    Robust,
    Ipo,
    Hinge,
    Simpo,
}

/// Hyper-parameters; defaults follow `DPOConfig` (β = 0.1) and `CPOConfig` (`simpo_gamma = 0.5`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DpoConfig {
    pub loss_type: DpoLossType,
    /// β (τ for IPO).
    pub beta: f64,
    /// ε: cDPO / robust flip probability / SimPO smoothing.
    pub label_smoothing: f64,
    /// SimPO target reward margin γ (the margin in the logit is γ/β).
    pub simpo_gamma: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            loss_type: DpoLossType::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
        }
    }
}

/// Inputs, all rank-1 of length B. Log-probs are token *sums* over the completion.
#[derive(Clone, Copy, Debug)]
pub struct DpoInputs<'a> {
    pub policy_chosen_logp_B: &'a Tensor,
    pub policy_rejected_logp_B: &'a Tensor,
    /// Required for all loss types but `simpo`.
    pub ref_chosen_logp_B: Option<&'a Tensor>,
    pub ref_rejected_logp_B: Option<&'a Tensor>,
    /// Completion-token counts (float dtype of the log-probs); required for `ipo` and `simpo`.
    pub chosen_len_B: Option<&'a Tensor>,
    pub rejected_len_B: Option<&'a Tensor>,
}

/// Batch means, f32, as TRL logs them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DpoMetrics {
    pub rewards_chosen: f32,
    pub rewards_rejected: f32,
    pub rewards_accuracies: f32,
    pub rewards_margins: f32,
    pub logps_chosen: f32,
    pub logps_rejected: f32,
}

impl DpoMetrics {
    /// Metrics keyed by TRL's names (`rewards/chosen`, ...).
    pub fn to_map(&self) -> BTreeMap<String, f32> {
        [
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/accuracies", self.rewards_accuracies),
            ("rewards/margins", self.rewards_margins),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

const OP: &str = "dpo_loss";

fn lens<'a>(x: &DpoInputs<'a>) -> Result<(&'a Tensor, &'a Tensor)> {
    match (x.chosen_len_B, x.rejected_len_B) {
        (Some(c), Some(r)) => Ok((c, r)),
        _ => bail_config!("dpo_loss: chosen_len_B and rejected_len_B are required for ipo/simpo"),
    }
}

/// The DPO-family loss (batch mean) and TRL-named metrics. Differentiable w.r.t. the policy log-probs.
pub fn dpo_loss(x: &DpoInputs, cfg: &DpoConfig) -> Result<(Tensor, DpoMetrics)> {
    let (pc, pr) = (x.policy_chosen_logp_B, x.policy_rejected_logp_B);
    if pc.rank() != 1 {
        bail_shape!(
            OP,
            "policy_chosen_logp_B must be rank 1 (B), got {:?}",
            pc.dims()
        );
    }
    let mut named = vec![("policy_chosen_logp_B", pc), ("policy_rejected_logp_B", pr)];
    if let Some(t) = x.ref_chosen_logp_B {
        named.push(("ref_chosen_logp_B", t));
    }
    if let Some(t) = x.ref_rejected_logp_B {
        named.push(("ref_rejected_logp_B", t));
    }
    if let Some(t) = x.chosen_len_B {
        named.push(("chosen_len_B", t));
    }
    if let Some(t) = x.rejected_len_B {
        named.push(("rejected_len_B", t));
    }
    same_shapes(OP, &named)?;
    if cfg.beta.is_nan() || cfg.beta <= 0.0 {
        bail_config!("dpo_loss: beta must be > 0, got {}", cfg.beta);
    }
    let beta = cfg.beta;
    let eps = cfg.label_smoothing;
    let smoothed = |logits: &Tensor| -> Result<Tensor> {
        // -(1-ε)·logσ(z) − ε·logσ(−z), z = β·logits
        let z = (logits * beta)?;
        let a = (log_sigmoid(&z)? * (-(1.0 - eps)))?;
        if eps == 0.0 {
            return Ok(a);
        }
        Ok((a - (log_sigmoid(&z.neg()?)? * eps)?)?)
    };

    if cfg.loss_type == DpoLossType::Simpo {
        let (lc, lr) = lens(x)?;
        let avg_c = pc.div(&lc.clamp(1.0, f64::INFINITY)?)?;
        let avg_r = pr.div(&lr.clamp(1.0, f64::INFINITY)?)?;
        let logits = ((&avg_c - &avg_r)? - cfg.simpo_gamma / beta)?;
        let loss = smoothed(&logits)?.mean_all()?;
        let metrics = metrics(
            &(avg_c.detach() * beta)?,
            &(avg_r.detach() * beta)?,
            &avg_c,
            &avg_r,
        )?;
        return Ok((loss, metrics));
    }

    let (rc, rr) = match (x.ref_chosen_logp_B, x.ref_rejected_logp_B) {
        (Some(c), Some(r)) => (c, r),
        _ => bail_config!(
            "dpo_loss: reference log-probs are required for {:?}",
            cfg.loss_type
        ),
    };
    let chosen_lr = (pc - rc)?;
    let rejected_lr = (pr - rr)?;
    let delta = (&chosen_lr - &rejected_lr)?;
    let per_pair = match cfg.loss_type {
        DpoLossType::Sigmoid => smoothed(&delta)?,
        DpoLossType::Robust => {
            if !(0.0..0.5).contains(&eps) {
                bail_config!("dpo_loss: robust needs label_smoothing in [0, 0.5), got {eps}");
            }
            let z = (&delta * beta)?;
            let clean = (log_sigmoid(&z)? * (-(1.0 - eps)))?;
            let flipped = (log_sigmoid(&z.neg()?)? * (-eps))?;
            ((clean - flipped)? / (1.0 - 2.0 * eps))?
        }
        DpoLossType::Hinge => relu_like_torch(&(1.0 - (&delta * beta)?)?)?,
        DpoLossType::Ipo => {
            let (lc, lr) = lens(x)?;
            let c = chosen_lr.div(&lc.clamp(1.0, f64::INFINITY)?)?;
            let r = rejected_lr.div(&lr.clamp(1.0, f64::INFINITY)?)?;
            ((c - r)? - 1.0 / (2.0 * beta))?.sqr()?
        }
        DpoLossType::Simpo => unreachable!(),
    };
    let loss = per_pair.mean_all()?;
    let m = metrics(
        &(chosen_lr.detach() * beta)?,
        &(rejected_lr.detach() * beta)?,
        pc,
        pr,
    )?;
    Ok((loss, m))
}

fn metrics(rc: &Tensor, rr: &Tensor, lc: &Tensor, lr: &Tensor) -> Result<DpoMetrics> {
    // One host read for all six means.
    let v = read_f64s(&[
        rc.mean_all()?,
        rr.mean_all()?,
        rc.gt(rr)?.to_dtype(DType::F32)?.mean_all()?,
        (rc - rr)?.mean_all()?,
        lc.detach().mean_all()?,
        lr.detach().mean_all()?,
    ])?;
    Ok(DpoMetrics {
        rewards_chosen: v[0] as f32,
        rewards_rejected: v[1] as f32,
        rewards_accuracies: v[2] as f32,
        rewards_margins: v[3] as f32,
        logps_chosen: v[4] as f32,
        logps_rejected: v[5] as f32,
    })
}
