//! Pure losses and algorithm logic for align: DPO-family, GRPO, PPO, reward modelling, SFT,
//! plus a state-saveable AdamW, lr schedules and gradient clipping.
//!
//! Every loss is a pure function over candle tensors returning `(loss, metrics)`; the loss is
//! differentiable with candle's autograd w.r.t. the policy log-probs. Tensor names carry their
//! shape as a suffix (`logp_B_T`: batch × completion tokens). Reference formulas and departures
//! are listed in each module's header. Nothing here depends on model code: the functions take
//! log-prob tensors, so the root crate calls them with its own policy's outputs.
#![allow(non_snake_case)]

pub mod dpo;
pub mod error;
pub mod grpo;
pub mod ops;
pub mod optim;
pub mod ppo;
pub mod reward_model;
pub mod sft;
pub mod stats;

pub use dpo::{dpo_loss, DpoConfig, DpoInputs, DpoLossType, DpoMetrics};
pub use error::{Error, Result};
pub use grpo::{
    group_advantages, grpo_loss, GrpoConfig, GrpoInputs, GrpoLossType, GrpoMetrics, ScaleRewards,
};
pub use optim::{
    clip_grad_norm, clip_grad_norm_tensor, AdamW, AdamWConfig, AdamWMeta, AdamWState,
    LrScheduleKind, LrScheduler,
};
pub use ppo::{
    gae, kl_penalized_rewards, masked_whiten, missing_eos_penalty, ppo_policy_loss, ppo_rewards,
    ppo_total_loss, ppo_value_loss, token_entropy, KlController, KlEstimator, PpoPolicyMetrics,
    PpoRewards,
};
pub use reward_model::{reward_model_loss, RewardMetrics};
pub use sft::sft_loss;
