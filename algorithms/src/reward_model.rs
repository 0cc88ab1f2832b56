//! Bradley–Terry reward-model loss.
//!
//! Reference: TRL 1.16.0 `trl/trainer/reward_trainer.py`, `RewardTrainer.compute_loss`:
//! `loss = −mean(logsigmoid(r_c − r_r − margin))` (+ `center_rewards_coefficient·mean((r_c + r_r)²)`,
//! Eisenstein et al. 2023); metric `accuracy = mean(r_c > r_r)`, `margin = mean(r_c − r_r)`,
//! `min_reward/mean_reward/max_reward` over all 2B rewards. Bradley & Terry 1952; Ouyang et al. 2022 Eq. 1.
//! Departures: none in the formula; metrics are over this batch only.

use crate::error::Result;
use crate::ops::{log_sigmoid, mean_f32, same_shapes, scalar_f64};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

/// Reward-model metrics with TRL's names via [`RewardMetrics::to_map`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RewardMetrics {
    pub accuracy: f32,
    pub margin: f32,
    pub mean_reward: f32,
    pub min_reward: f32,
    pub max_reward: f32,
}

impl RewardMetrics {
    pub fn to_map(&self) -> BTreeMap<String, f32> {
        [
            ("accuracy", self.accuracy),
            ("margin", self.margin),
            ("mean_reward", self.mean_reward),
            ("min_reward", self.min_reward),
            ("max_reward", self.max_reward),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// `−mean(log σ(r_c − r_r − margin)) + c·mean((r_c + r_r)²)`; rank-1 inputs of length B.
pub fn reward_model_loss(
    chosen_reward_B: &Tensor,
    rejected_reward_B: &Tensor,
    margin_B: Option<&Tensor>,
    center_rewards_coefficient: Option<f64>,
) -> Result<(Tensor, RewardMetrics)> {
    const OP: &str = "reward_model_loss";
    crate::ops::expect_rank(OP, "chosen_reward_B", chosen_reward_B, 1)?;
    let mut named = vec![
        ("chosen_reward_B", chosen_reward_B),
        ("rejected_reward_B", rejected_reward_B),
    ];
    if let Some(m) = margin_B {
        named.push(("margin_B", m));
    }
    same_shapes(OP, &named)?;
    let mut diff = (chosen_reward_B - rejected_reward_B)?;
    let raw_diff = diff.detach();
    if let Some(m) = margin_B {
        diff = (diff - m.detach().to_dtype(chosen_reward_B.dtype())?)?;
    }
    let mut loss = log_sigmoid(&diff)?.mean_all()?.neg()?;
    if let Some(c) = center_rewards_coefficient {
        let center = (chosen_reward_B + rejected_reward_B)?.sqr()?.mean_all()?;
        loss = (loss + (center * c)?)?;
    }
    let all = Tensor::cat(&[chosen_reward_B.detach(), rejected_reward_B.detach()], 0)?;
    let metrics = RewardMetrics {
        accuracy: mean_f32(
            &chosen_reward_B
                .gt(rejected_reward_B)?
                .to_dtype(DType::F32)?,
        )?,
        margin: mean_f32(&raw_diff)?,
        mean_reward: mean_f32(&all)?,
        min_reward: scalar_f64(&all.min(0)?)? as f32,
        max_reward: scalar_f64(&all.max(0)?)? as f32,
    };
    Ok((loss, metrics))
}
