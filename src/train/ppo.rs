//! `align ppo`: PPO with a value model (RLHF, Ouyang et al. 2022; Ziegler et al. 2019) of a LoRA
//! adapter (or every weight with `--full`), rewards from a reward model `rm/` or any reward
//! `align grpo` accepts.
//!
//! # Networks: one copy of each
//!
//! * policy = base ⊕ LoRA; the reference is the same weights with the adapters off (`--full`:
//!   a frozen copy of the initial weights, as `align grpo`).
//! * value model = the reward model's backbone (`--reward-model rm/`, a merged
//!   `*ForSequenceClassification` folder) ⊕ its own LoRA adapter, with a value head initialised
//!   from the score head; with the value adapter off and the score head the same weights are the
//!   frozen reward model, so the RM costs no third copy. Without `rm/` the value backbone is the
//!   policy's base (a LoRA policy lends its frozen weights, [`ValueModel::sharing_base`]; a
//!   full-FT policy's base is loaded again) with a fresh head `N(0, 1/(hidden+1))` (OpenRLHF's critic
//!   from a pretrained model: initial values ≈ 0, so the first advantages carry the score and
//!   not the noise of a random head; `1/sqrt(hidden+1)` made values of ±1–2 on SmolLM2, whose
//!   whitened advantages pushed the policy to stop early while the score stayed flat). Two bases in
//!   memory at most (one for LoRA PPO from a verifier), not four (TRL and OpenRLHF hold policy, reference, reward and value models).
//! * one AdamW over the policy's trainable weights, the value adapter and the value head
//!   (TRL's `PolicyAndValueWrapper`), via [`super::Algorithm::extra_vars`].
//!
//! # One rollout batch (TRL 0.12–0.2x `ppo_trainer.py`; formulas in `align_algorithms::ppo`)
//!
//! 1. `--prompts-per-step` prompts; one completion each with the batched KV-cache sampler at
//!    `--temperature` (0.7), at most `--response-length` tokens, stopping at EOS.
//! 2. Score: the RM at the last real token of prompt+completion, or the verifier reward;
//!    `--normalize-reward` uses rm/'s `mean`/`std` (OpenRLHF); `--missing-eos-penalty` is
//!    subtracted from completions without EOS (TRL); clipped to ±`--score-clip` (10, OpenRLHF's
//!    `reward_clip_range`).
//! 3. No-grad forwards: policy and reference log-probs of `softmax(logits / T)` (TRL), values.
//! 4. Per-token rewards `−β·KL_t` (k1, or k3 with `--kl-estimator k3`), the score on the last
//!    token; `--whiten-rewards`; GAE (γ, λ), returns = A + V, whitened advantages.
//! 5. `--ppo-epochs` passes, each a fresh permutation cut into `--num-mini-batches` mini-batches;
//!    each mini-batch is one optimizer step (micro-batches of `--train-batch-size` accumulated):
//!    loss = clipped policy loss + `vf_coef`·clipped value loss − `entropy_coef`·entropy. During
//!    the first `--critic-warmup-steps` optimizer steps only the value loss is trained
//!    (OpenRLHF's `freezing_actor_steps`). Gradients are clipped to `--max-grad-norm`.
//! 6. The adaptive KL controller (`--kl-target`, `--kl-horizon`) is updated with the batch's
//!    KL (`objective/kl`), n = batch size (Ziegler et al.; TRL's old `AdaptiveKLController`).
//!
//! # Defaults vs TRL `PPOConfig`
//!
//! Same: `temperature 0.7`, `kl_coef 0.05`, `kl_estimator k1`, `gamma 1`, `lam 0.95`,
//! `whiten_rewards false`, `cliprange 0.2`, `cliprange_value 0.2`, `vf_coef 0.1`,
//! `num_ppo_epochs 4`, `num_mini_batches 1`, `response_length 53`, lr 3e-6 for full
//! fine-tuning, linear schedule. Different: LoRA lr 10× (3e-5); `--prompts-per-step 8`
//! (TRL's `per_device_train_batch_size` 64 is too many for a CPU); micro-batches of
//! `--train-batch-size 8` (OpenRLHF's `micro_train_batch_size`; at 8 prompts per step one
//! micro-batch is the whole mini-batch, as in TRL), so that memory stays bounded when the rollout
//! batch grows (each micro-batch's loss is its own token mean, accumulated as TRL and OpenRLHF
//! do, so a different micro-batch size changes the update slightly); gradient clipping at 1
//! (TRL's PPO never clips); `missing_eos_penalty` off like TRL.
//!
//! # Departures
//!
//! * The score lands on the last real completion token and one mask serves rewards, values and
//!   losses; TRL adds the score one position later and trains values on one extra position
//!   (`padding_mask_p1`).
//! * Old log-probs are recomputed by a forward pass after sampling (as TRL), not taken from the
//!   sampler.
//! * The value model is always LoRA (rank and alpha of the policy's settings), also with
//!   `--full`, so the frozen reward model stays inside it.
//! * A stop string ends a completion like EOS (no missing-EOS penalty).
//! * Checkpoints only at rollout-batch boundaries (`--save-every` a multiple of
//!   `ppo_epochs × num_mini_batches`): resume regenerates nothing and is exact (prompt cursor,
//!   KL controller and episode counter in the checkpoint; sampling and mini-batch RNG from
//!   (seed, step)).
//! * No early stopping on KL.
//!
//! # Evaluation
//!
//! `--eval-data PROMPTS` (with `--eval-every`, and always at the end): the first
//! `--eval-max-prompts` prompts of the file in file order, one completion each at the run's
//! temperature from a fixed seed (the same at every evaluation, so the curve compares policies),
//! scored by the training reward before normalisation and clipping (`eval_reward`), with
//! `eval_kl`, the mean over completions of `Σ_t log π(y_t) − log π_ref(y_t)` (the KL the reward
//! was bought with), and `eval_completion_length`.

#![allow(non_snake_case)]

use super::settings::{self, AlgoSettings, LoopSettings, LoraSettings, OptimSettings, RunSettings};
use super::{Algorithm, Setup};
use crate::bail;
use crate::error::{Context, Error, Result};
use crate::generate::{
    chunk_len, encode_prompt, eos_ids, generate_chunked, FinishReason, SamplingConfig,
};
use crate::lora::{Fwd, LoraConfig};
use crate::models::CausalLm;
use crate::policy::{Policy, TrainMode};
use crate::rewards::{
    build_reward, score_checked, RewardFn, RewardInput, RewardModel, RewardOptions,
};
use crate::trainer::Metrics;
use align_algorithms::ops::{masked_mean, scalar_f64};
use align_algorithms::ppo::{
    gae, missing_eos_penalty, ppo_policy_loss, ppo_rewards, ppo_total_loss, ppo_value_loss,
    token_entropy, KlController, KlEstimator,
};
use align_datasets::{Cursor, PpoRollout, PromptStream, Source, StreamOptions, TokenizerBundle};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// TRL `PPOConfig.learning_rate` (full fine-tuning); LoRA gets 10×.
pub const FULL_LR: f64 = 3e-6;
pub const LORA_LR_FACTOR: f64 = 10.0;

/// Every resolved setting of a PPO run (saved in each checkpoint and in settings.json).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PpoSettings {
    pub prompts: Option<Vec<PathBuf>>,
    #[serde(flatten)]
    pub run: RunSettings,
    #[serde(flatten)]
    pub lora: LoraSettings,
    #[serde(flatten)]
    pub optim: OptimSettings,
    #[serde(flatten)]
    pub looping: LoopSettings,
    pub reward_model: Option<PathBuf>,
    pub reward: Option<String>,
    pub ref_column: Option<String>,
    pub pattern: Option<String>,
    pub chars: Option<String>,
    pub reward_command: Option<String>,
    pub reward_timeout: f64,
    pub prompts_per_step: usize,
    pub response_length: usize,
    pub max_prompt_length: usize,
    pub temperature: f64,
    pub gen_batch_size: usize,
    pub train_batch_size: usize,
    pub missing_eos_penalty: Option<f64>,
    pub score_clip: f64,
    pub normalize_reward: bool,
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    pub kl_target: Option<f64>,
    pub kl_horizon: f64,
    pub gamma: f64,
    pub lam: f64,
    pub whiten_rewards: bool,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    pub ppo_epochs: usize,
    pub num_mini_batches: usize,
    pub critic_warmup_steps: u64,
    pub entropy_coef: f64,
    pub eval_max_prompts: usize,
}

impl AlgoSettings for PpoSettings {
    const COMMAND: &'static str = "ppo";
    fn defaults() -> Map<String, Value> {
        let mut d = settings::shared_defaults();
        d.extend(super::dpo::obj(serde_json::json!({
            "prompts": null, "out": "runs/ppo", "reward_model": null, "reward": null,
            "ref_column": null, "pattern": null, "chars": null, "reward_command": null,
            "reward_timeout": crate::rewards::DEFAULT_COMMAND_TIMEOUT_S,
            "prompts_per_step": 8, "response_length": 53, "max_prompt_length": 512,
            "temperature": 0.7, "gen_batch_size": 0, "train_batch_size": 8,
            "missing_eos_penalty": null, "score_clip": 10.0, "normalize_reward": false,
            "kl_coef": 0.05, "kl_estimator": "k1", "kl_target": null, "kl_horizon": 10000.0,
            "gamma": 1.0, "lam": 0.95, "whiten_rewards": false, "cliprange": 0.2,
            "cliprange_value": 0.2, "vf_coef": 0.1, "ppo_epochs": 4, "num_mini_batches": 1,
            "critic_warmup_steps": 0, "entropy_coef": 0.0, "eval_max_prompts": 64,
        })));
        d
    }
    crate::shared_groups!();
    fn batch_size(&self) -> usize {
        self.prompts_per_step / self.num_mini_batches.max(1)
    }
    fn grad_accum(&self) -> usize {
        1
    }
    fn check_own(&self, errs: &mut Vec<String>) {
        if self.prompts.as_ref().is_some_and(|p| p.is_empty()) {
            errs.push("`prompts` is empty".into());
        }
        settings::positive_int(errs, "prompts_per_step", self.prompts_per_step as u64);
        settings::positive_int(errs, "response_length", self.response_length as u64);
        settings::positive_int(errs, "max_prompt_length", self.max_prompt_length as u64);
        settings::positive_int(errs, "ppo_epochs", self.ppo_epochs as u64);
        settings::positive_int(errs, "num_mini_batches", self.num_mini_batches as u64);
        settings::positive(errs, "reward_timeout", self.reward_timeout);
        if self.num_mini_batches > 0 && !self.prompts_per_step.is_multiple_of(self.num_mini_batches)
        {
            errs.push(format!(
                "`prompts_per_step` ({}) must be a multiple of `num_mini_batches` ({})",
                self.prompts_per_step, self.num_mini_batches
            ));
        }
        if self.num_mini_batches > 0 && self.prompts_per_step / self.num_mini_batches < 2 {
            errs.push("each mini-batch needs at least 2 rollouts (`prompts_per_step` / `num_mini_batches` >= 2): advantages are whitened".into());
        }
        let per_batch = (self.ppo_epochs * self.num_mini_batches) as u64;
        if per_batch > 0 && !self.looping.save_every.is_multiple_of(per_batch) {
            errs.push(format!(
                "`save_every` ({}) must be a multiple of `ppo_epochs` × `num_mini_batches` ({per_batch}): checkpoints fall between rollout batches",
                self.looping.save_every
            ));
        }
        if !(self.temperature > 0.0) {
            errs.push(format!(
                "`temperature` must be > 0 (log-probs use logits / T), got {}",
                self.temperature
            ));
        }
        for (k, v) in [
            ("kl_coef", self.kl_coef),
            ("score_clip", self.score_clip),
            ("cliprange", self.cliprange),
            ("cliprange_value", self.cliprange_value),
            ("vf_coef", self.vf_coef),
            ("entropy_coef", self.entropy_coef),
        ] {
            settings::non_negative(errs, k, v);
        }
        if let Some(p) = self.missing_eos_penalty {
            settings::non_negative(errs, "missing_eos_penalty", p);
        }
        if let Some(t) = self.kl_target {
            settings::positive(errs, "kl_target", t);
        }
        settings::positive(errs, "kl_horizon", self.kl_horizon);
        if !(0.0..=1.0).contains(&self.gamma) {
            errs.push(format!("`gamma` must be in [0, 1], got {}", self.gamma));
        }
        if !(0.0..=1.0).contains(&self.lam) {
            errs.push(format!("`lam` must be in [0, 1], got {}", self.lam));
        }
        settings::positive_int(errs, "eval_max_prompts", self.eval_max_prompts as u64);
    }
}

impl PpoSettings {
    /// The rollout sampler: `response_length` tokens at `temperature`, no top-k/top-p, stop at
    /// EOS (training rollouts, evaluation and `align compare`).
    fn sampling(&self, eos_ids: Vec<u32>) -> Result<SamplingConfig> {
        let sampling = SamplingConfig {
            max_new_tokens: self.response_length,
            temperature: self.temperature,
            top_p: 1.0,
            top_k: 0,
            eos_ids,
            stop_strings: Vec::new(),
            ignore_eos: false,
        };
        sampling.validate()?;
        Ok(sampling)
    }

    /// The reward function named by `--reward`/`--reward-command` (`None` with only
    /// `--reward-model`, which training scores with the RM inside the value model).
    fn reward_fn(&self, device: &Device, dtype: DType) -> Result<Option<Box<dyn RewardFn>>> {
        let spec = match (&self.reward, &self.reward_command) {
            (Some(r), _) => r.clone(),
            (None, Some(_)) => "command".to_string(),
            (None, None) => return Ok(None),
        };
        Ok(Some(build_reward(
            &spec,
            &RewardOptions {
                ref_column: self.ref_column.clone(),
                pattern: self.pattern.clone(),
                chars: self.chars.clone(),
                reward_model: self.reward_model.clone(),
                command: self.reward_command.clone(),
                command_timeout: Some(self.reward_timeout),
                device: Some(device.clone()),
                dtype: Some(dtype),
            },
        )?))
    }
}

/// Rollouts from sampled completions (an empty completion becomes a lone EOS).
fn samples_of(comps: &[crate::generate::Completion], ids: &[Vec<u32>], eos: u32) -> Vec<PpoSample> {
    comps
        .iter()
        .zip(ids)
        .map(|(c, p)| PpoSample {
            prompt_ids: p.clone(),
            completion_ids: if c.ids.is_empty() {
                vec![eos]
            } else {
                c.ids.clone()
            },
        })
        .collect()
}

/// The hyper-parameters of the PPO losses and advantages.
#[derive(Clone, Debug, PartialEq)]
pub struct PpoConfig {
    pub temperature: f64,
    pub kl_estimator: KlEstimator,
    pub whiten_rewards: bool,
    pub gamma: f64,
    pub lam: f64,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    pub entropy_coef: f64,
}

impl PpoConfig {
    pub fn from_settings(s: &PpoSettings) -> Self {
        PpoConfig {
            temperature: s.temperature,
            kl_estimator: s.kl_estimator,
            whiten_rewards: s.whiten_rewards,
            gamma: s.gamma,
            lam: s.lam,
            cliprange: s.cliprange,
            cliprange_value: s.cliprange_value,
            vf_coef: s.vf_coef,
            entropy_coef: s.entropy_coef,
        }
    }
}

/// A fresh value head `[1, h]` drawn `N(0, 1/(h+1))` from `seed` (OpenRLHF's `init_value_head`),
/// in the compute dtype of `dtype`.
fn value_head(h: usize, seed: u64, dtype: DType, dev: &Device) -> Result<Tensor> {
    let std = 1.0 / (h + 1) as f64;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7a1e_5eed);
    let normal = rand_distr::Normal::new(0.0, std)
        .map_err(|e| Error::Msg(format!("value head init: {e}")))?;
    let w: Vec<f32> = (0..h).map(|_| rng.sample(normal) as f32).collect();
    Ok(Tensor::from_vec(w, (1, h), dev)?.to_dtype(crate::ops::compute_dtype(dtype))?)
}

/// The value model: a decoder backbone with its own LoRA adapter and a value head `[1, H]`;
/// with a reward model also the frozen score head (adapter off + score head = the RM).
pub struct ValueModel {
    pub backbone: Policy,
    pub head: Var,
    /// The reward model's score head (rm/ only).
    pub score: Option<Tensor>,
    /// rm/'s reward `mean` and `std` (config.json keys, OpenRLHF's convention), when present.
    pub stats: Option<(f64, f64)>,
}

impl ValueModel {
    /// From a merged `*ForSequenceClassification` folder: backbone and score head of the RM;
    /// the value head starts as a copy of the score head.
    pub fn from_reward_model(
        dir: &Path,
        lora: &LoraConfig,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let rm = RewardModel::load(dir, dtype, dev)
            .with_context(|| format!("loading the reward model {}", dir.display()))?;
        let score = rm.score.narrow(0, 0, 1)?.contiguous()?;
        let mut model = rm.model;
        if model.add_lora(lora)? == 0 {
            bail!(
                "{}: LoRA target_modules {:?} match no linear layer of the reward model",
                dir.display(),
                lora.target_modules
            );
        }
        let stats = reward_stats(dir)?;
        let head = Var::from_tensor(&score.to_dtype(crate::ops::compute_dtype(dtype))?)?;
        Ok(ValueModel {
            backbone: Policy {
                model,
                dir: dir.to_path_buf(),
                mode: TrainMode::Lora(lora.clone()),
            },
            head,
            score: Some(score),
            stats,
        })
    }

    /// From a causal LM folder (the policy's base): a fresh head `N(0, 1/(H+1))`, seeded
    /// (OpenRLHF's `init_value_head`).
    pub fn from_base(
        dir: &Path,
        lora: &LoraConfig,
        dtype: DType,
        dev: &Device,
        seed: u64,
    ) -> Result<Self> {
        let backbone = Policy::load(dir, TrainMode::Lora(lora.clone()), dtype, dev)
            .with_context(|| format!("loading the value model's base {}", dir.display()))?;
        let head = value_head(backbone.cfg().hidden_size, seed, dtype, dev)?;
        Ok(ValueModel {
            backbone,
            head: Var::from_tensor(&head)?,
            score: None,
            stats: None,
        })
    }

    /// [`Self::from_base`] on the frozen base weights of `policy` itself (LoRA policies): the same
    /// value model, without a second copy of the base in memory. `None` for a full fine-tuning
    /// policy, whose weights change.
    pub fn sharing_base(policy: &Policy, lora: &LoraConfig, seed: u64) -> Result<Option<Self>> {
        let Some(mut model) = policy.model.frozen_base() else {
            return Ok(None);
        };
        if model.add_lora(lora)? == 0 {
            bail!(
                "LoRA target_modules {:?} match no linear layer of the value model",
                lora.target_modules
            );
        }
        let backbone = Policy {
            model,
            dir: policy.dir.clone(),
            mode: TrainMode::Lora(lora.clone()),
        };
        let head = value_head(
            backbone.cfg().hidden_size,
            seed,
            backbone.dtype(),
            backbone.device(),
        )?;
        Ok(Some(ValueModel {
            backbone,
            head: Var::from_tensor(&head)?,
            score: None,
            stats: None,
        }))
    }

    /// The trainable variables (value adapter, then the head), named `value.<PEFT name>` and
    /// `value.score.weight`.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = self
            .backbone
            .trainable_vars()
            .into_iter()
            .map(|(n, v)| (format!("value.{n}"), v))
            .collect();
        v.push(("value.score.weight".into(), self.head.clone()));
        v
    }

    /// Final hidden states `[B, T, H]` of a right-padded batch.
    fn hidden(&self, ids_B_T: &Tensor, fwd: Fwd) -> Result<Tensor> {
        hidden_states(&self.backbone.model, ids_B_T, fwd)
    }

    /// Scores of the frozen reward model (adapter off, score head) at each row's last token
    /// (`last[i]` = index of the last real token of row `i`).
    pub fn rm_scores(&self, ids_B_T: &Tensor, last: &[usize]) -> Result<Vec<f32>> {
        let score = self
            .score
            .as_ref()
            .context("the value model was not built from a reward model")?;
        rm_scores_at(
            &self.hidden(ids_B_T, SCORE_REFERENCE)?.detach(),
            last,
            score,
        )
    }
}

/// A reward model's scores from its final hidden states `[B, T, H]` at `last[i]` of each row,
/// the head product in f32 (rollout scoring, evaluation and `align compare` alike).
fn rm_scores_at(h_B_T_H: &Tensor, last: &[usize], score: &Tensor) -> Result<Vec<f32>> {
    let s = crate::score::hidden_at(h_B_T_H, last)?
        .to_dtype(DType::F32)?
        .matmul(&score.to_dtype(DType::F32)?.t()?)?;
    Ok(s.squeeze(1)?.to_vec1::<f32>()?)
}

/// rm/'s `mean`/`std` in config.json, if both are there.
fn reward_stats(dir: &Path) -> Result<Option<(f64, f64)>> {
    let p = dir.join("config.json");
    let v: Value = crate::error::read_json(&p)?;
    let num = |k: &str| v.get(k).and_then(Value::as_f64);
    Ok(match (num("mean"), num("std")) {
        (Some(m), Some(s)) => Some((m, s)),
        _ => None,
    })
}

/// Final hidden states `[B, T, H]` of a right-padded batch (positions 0..T, causal mask).
fn hidden_states(model: &CausalLm, ids_B_T: &Tensor, fwd: Fwd) -> Result<Tensor> {
    let (b, t) = ids_B_T.dims2()?;
    let pos = Tensor::arange(0u32, t as u32, ids_B_T.device())?
        .unsqueeze(0)?
        .broadcast_as((b, t))?
        .contiguous()?;
    let mask = model.attention_mask(b, t, 0, None)?;
    Ok(model.forward_hidden(ids_B_T, &pos, &mask, None, fwd)?)
}

/// One rollout: prompt and completion token ids.
#[derive(Clone, Debug)]
pub struct PpoSample {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
}

/// A right-padded batch of samples with the flat positions that predict each completion token.
struct ResponseBatch {
    ids_B_T: Tensor,
    /// `[B·C]` flat indices into `B·T` (padding slots repeat the row's last position).
    rows: Tensor,
    /// `rows`, and the `[B·C]` targets (0 on padding), flat, as the LM head's fused log-prob
    /// op takes them.
    rows_v: Vec<u32>,
    targets_v: Vec<u32>,
    /// `[B, C]` 1 on completion tokens.
    mask_B_C: Tensor,
    b: usize,
    c: usize,
}

fn response_batch(
    samples: &[&PpoSample],
    pad: u32,
    dtype: DType,
    dev: &Device,
) -> Result<ResponseBatch> {
    let b = samples.len();
    let t = samples
        .iter()
        .map(|s| s.prompt_ids.len() + s.completion_ids.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let c = samples
        .iter()
        .map(|s| s.completion_ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut ids = vec![pad; b * t];
    let mut rows = vec![0u32; b * c];
    let mut targets = vec![0u32; b * c];
    let mut mask = vec![0f32; b * c];
    for (i, s) in samples.iter().enumerate() {
        if s.prompt_ids.is_empty() {
            bail!("rollout {i}: empty prompt (no token to predict the completion from)");
        }
        if s.completion_ids.is_empty() {
            bail!("rollout {i}: empty completion");
        }
        let p = s.prompt_ids.len();
        for (j, &x) in s.prompt_ids.iter().chain(&s.completion_ids).enumerate() {
            ids[i * t + j] = x;
        }
        let n = s.completion_ids.len();
        for j in 0..c {
            rows[i * c + j] = (i * t + p + j.min(n - 1) - 1) as u32;
            if j < n {
                targets[i * c + j] = s.completion_ids[j];
                mask[i * c + j] = 1.0;
            }
        }
    }
    Ok(ResponseBatch {
        ids_B_T: Tensor::from_vec(ids, (b, t), dev)?,
        rows: Tensor::new(rows.as_slice(), dev)?,
        rows_v: rows,
        targets_v: targets,
        mask_B_C: Tensor::from_vec(mask, (b, c), dev)?.to_dtype(dtype)?,
        b,
        c,
    })
}

/// Whether [`response_logps`] also gives the per-token entropies of the sampling distribution.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Entropy {
    Off,
    /// A metric: computed from detached hidden states, a chunk of rows at a time.
    Metric,
    /// Part of the loss (`entropy_coef` ≠ 0): differentiable, so the completion rows' logits
    /// `[B·C, V]` are kept for the backward pass.
    Grad,
}

/// The no-grad forwards of rollout scoring and evaluation: nothing of them is differentiated,
/// so they record no autograd graph (each layer's activations are freed as the next runs).
const SCORE_POLICY: Fwd = Fwd {
    no_grad: true,
    ..Fwd::POLICY
};
const SCORE_REFERENCE: Fwd = Fwd {
    no_grad: true,
    ..Fwd::REFERENCE
};

/// Rows of logits made at once for the entropy metric (`ENTROPY_ROWS × V` floats).
const ENTROPY_ROWS: usize = 256;

/// Completion log-probs `[B, C]` of `softmax(logits / T)` and, if asked, the entropies `[B, C]`
/// of that distribution. Only the `B·C` completion positions go through the LM head: on the CPU
/// in f32 the head, log-softmax and gather are one fused op that never holds their logits
/// ([`CausalLm::head_logps`]), and the `[B, T, V]` logits of the whole batch (V = 49,152 on
/// SmolLM2) are never made, in rollout scoring as in the loss. Padding slots score token 0 at
/// the row's last position; the mask removes them.
fn response_logps(
    policy: &Policy,
    rb: &ResponseBatch,
    temperature: f64,
    fwd: Fwd,
    entropy: Entropy,
) -> Result<(Tensor, Option<Tensor>)> {
    let model = &policy.model;
    let (b, t) = rb.ids_B_T.dims2()?;
    let h = model
        .forward_batch(&rb.ids_B_T, fwd)?
        .reshape((b * t, model.cfg.hidden_size))?;
    let lp = model
        .head_logps(&h, &rb.rows_v, &rb.targets_v, fwd, temperature)?
        .reshape((rb.b, rb.c))?;
    let ent = match entropy {
        Entropy::Off => None,
        e => Some(
            head_entropy(
                model,
                &h.index_select(&rb.rows, 0)?,
                temperature,
                fwd,
                e == Entropy::Grad,
            )?
            .reshape((rb.b, rb.c))?,
        ),
    };
    Ok((lp, ent))
}

/// Entropies `[N]` of `softmax(h W^T / T)` for hidden-state rows `hs` (`[N, hidden]`). Without
/// `grad`, detached and in chunks of [`ENTROPY_ROWS`] rows, so the `[N, V]` logits never exist
/// at once.
fn head_entropy(
    model: &CausalLm,
    hs: &Tensor,
    temperature: f64,
    fwd: Fwd,
    grad: bool,
) -> Result<Tensor> {
    let n = hs.dim(0)?;
    let (hs, fwd, step) = if grad {
        (hs.clone(), fwd, n.max(1))
    } else {
        let fwd = Fwd {
            no_grad: true,
            ..fwd
        };
        (hs.detach(), fwd, ENTROPY_ROWS)
    };
    let mut parts = Vec::new();
    for s in (0..n).step_by(step) {
        let z = model
            .lm_head
            .forward(&hs.narrow(0, s, step.min(n - s))?, fwd)?;
        let z = z.to_dtype(crate::ops::compute_dtype(z.dtype()))?;
        let z = if temperature != 1.0 {
            (z / temperature)?
        } else {
            z
        };
        let e = token_entropy(&z.unsqueeze(0)?)?.squeeze(0)?;
        parts.push(if grad { e } else { e.detach() });
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// The no-grad completion log-probs `[B, C]` of the policy and of the reference (the separate
/// frozen copy of full fine-tuning, else the policy with its adapters off), detached.
fn policy_and_reference_logps(
    policy: &Policy,
    reference: Option<&Policy>,
    rb: &ResponseBatch,
    temperature: f64,
) -> Result<(Tensor, Tensor)> {
    let (lp, _) = response_logps(policy, rb, temperature, SCORE_POLICY, Entropy::Off)?;
    let (rp, _) = response_logps(
        reference.unwrap_or(policy),
        rb,
        temperature,
        SCORE_REFERENCE,
        Entropy::Off,
    )?;
    Ok((lp.detach(), rp.detach()))
}

/// Values `[B, C]` at the positions that predict each completion token.
fn response_values(value: &ValueModel, rb: &ResponseBatch, fwd: Fwd) -> Result<Tensor> {
    let h = value.hidden(&rb.ids_B_T, fwd)?;
    let (b, t, hs) = h.dims3()?;
    let sel = h.reshape((b * t, hs))?.index_select(&rb.rows, 0)?;
    let head = value.head.as_tensor();
    let v = sel.to_dtype(head.dtype())?.matmul(&head.t()?)?;
    Ok(v.reshape((rb.b, rb.c))?)
}

/// A processed rollout batch: per-sample per-token quantities (completion length each).
pub struct PpoBatch {
    pub samples: Vec<PpoSample>,
    pub scores: Vec<f32>,
    pub logp: Vec<Vec<f32>>,
    pub ref_logp: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
    pub rewards: Vec<Vec<f32>>,
    pub advantages: Vec<Vec<f32>>,
    pub returns: Vec<Vec<f32>>,
    /// TRL's rollout metrics: `objective/kl`, `objective/entropy`, `objective/non_score_reward`,
    /// `objective/rlhf_reward`, `objective/scores`.
    pub metrics: Metrics,
}

fn rows_of(x: &Tensor, lens: &[usize]) -> Result<Vec<Vec<f32>>> {
    let v: Vec<Vec<f32>> = x.to_dtype(DType::F32)?.to_vec2()?;
    Ok(v.into_iter()
        .zip(lens)
        .map(|(r, &n)| r[..n].to_vec())
        .collect())
}

/// Steps 3–4 of a rollout batch: no-grad log-probs (policy, reference), values, per-token
/// rewards, GAE and whitened advantages. `reference`: a frozen copy (`--full`), else the policy
/// with adapters off. Forwards run `chunk` samples at a time (0 = all).
#[allow(clippy::too_many_arguments)]
pub fn process_rollouts(
    policy: &Policy,
    reference: Option<&Policy>,
    value: &ValueModel,
    samples: Vec<PpoSample>,
    scores: Vec<f32>,
    pad: u32,
    cfg: &PpoConfig,
    kl_coef: f64,
    chunk: usize,
) -> Result<PpoBatch> {
    if samples.len() != scores.len() {
        bail!("{} scores for {} rollouts", scores.len(), samples.len());
    }
    if samples.len() < 2 {
        bail!("a rollout batch needs at least 2 completions (advantages are whitened)");
    }
    let dev = policy.device().clone();
    let cd = crate::ops::compute_dtype(policy.dtype());
    let lens: Vec<usize> = samples.iter().map(|s| s.completion_ids.len()).collect();
    let (mut logp, mut ref_logp, mut values) = (Vec::new(), Vec::new(), Vec::new());
    let refs: Vec<&PpoSample> = samples.iter().collect();
    let chunk = if chunk == 0 { samples.len() } else { chunk };
    // chunks shared out over the ranks of a data-parallel job, every rank gets all rows
    let parts = crate::dist::shard_chunks(&refs, chunk, |k, ch| {
        let rb = response_batch(ch, pad, cd, &dev)?;
        let l = &lens[k * chunk..k * chunk + ch.len()];
        let (lp, rp) = policy_and_reference_logps(policy, reference, &rb, cfg.temperature)?;
        let v = response_values(value, &rb, SCORE_POLICY)?;
        Ok((rows_of(&lp, l)?, rows_of(&rp, l)?, rows_of(&v.detach(), l)?))
    })?;
    for (lp, rp, v) in parts {
        logp.extend(lp);
        ref_logp.extend(rp);
        values.extend(v);
    }
    let c = lens.iter().copied().max().unwrap_or(1);
    let b = samples.len();
    let t = |rows: &[Vec<f32>]| -> Result<Tensor> {
        let r: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        super::grpo::pad_rows(&r, c, DType::F32, &dev)
    };
    let mask: Vec<Vec<f32>> = lens.iter().map(|&n| vec![1.0; n]).collect();
    let mask_B_C = t(&mask)?;
    let (lp, rp, v) = (t(&logp)?, t(&ref_logp)?, t(&values)?);
    let score_B = Tensor::new(scores.as_slice(), &dev)?;
    let r = ppo_rewards(
        &score_B,
        &lp,
        &rp,
        &mask_B_C,
        kl_coef,
        cfg.kl_estimator,
        cfg.whiten_rewards,
    )?;
    let (adv, ret) = gae(
        &r.rewards_B_T,
        &(&v * &mask_B_C)?,
        &mask_B_C,
        cfg.gamma,
        cfg.lam,
    )?;
    let mean_rows = |x: &Tensor| -> Result<f64> { Ok(scalar_f64(&x.sum(1)?.mean_all()?)?) };
    let mut m = Metrics::new();
    let kl = mean_rows(&r.kl_B_T)?;
    let non_score = mean_rows(&r.non_score_B_T)?;
    let mean_score = scores.iter().map(|&x| x as f64).sum::<f64>() / b as f64;
    m.insert("objective/kl".into(), kl);
    m.insert(
        "objective/entropy".into(),
        mean_rows(&(lp.neg()? * &mask_B_C)?)?,
    );
    m.insert("objective/non_score_reward".into(), non_score);
    m.insert("objective/rlhf_reward".into(), non_score + mean_score);
    m.insert("objective/scores".into(), mean_score);
    Ok(PpoBatch {
        rewards: rows_of(&r.rewards_B_T, &lens)?,
        advantages: rows_of(&adv, &lens)?,
        returns: rows_of(&ret, &lens)?,
        samples,
        scores,
        logp,
        ref_logp,
        values,
        metrics: m,
    })
}

/// The PPO loss of the micro-batch `idx` of `batch` (a mean over its tokens, as TRL's
/// `masked_mean`) and its metrics. `train_policy = false` (critic warm-up) keeps only
/// `vf_coef`·value loss.
pub fn ppo_micro_loss(
    policy: &Policy,
    value: &ValueModel,
    batch: &PpoBatch,
    idx: &[usize],
    pad: u32,
    cfg: &PpoConfig,
    train_policy: bool,
) -> Result<(Tensor, Metrics)> {
    let samples: Vec<&PpoSample> = idx.iter().map(|&i| &batch.samples[i]).collect();
    let dev = policy.device().clone();
    let cd = crate::ops::compute_dtype(policy.dtype());
    let rb = response_batch(&samples, pad, cd, &dev)?;
    let fwd = Fwd {
        adapters: true,
        train: true,
        no_grad: false,
    };
    let entropy = if train_policy && cfg.entropy_coef != 0.0 {
        Entropy::Grad
    } else {
        Entropy::Metric
    };
    let (lp, ent) = response_logps(policy, &rb, cfg.temperature, fwd, entropy)?;
    let vpred = response_values(value, &rb, fwd)?;
    let dtype = lp.dtype();
    let pick = |rows: &[Vec<f32>]| -> Result<Tensor> {
        let r: Vec<&[f32]> = idx.iter().map(|&i| rows[i].as_slice()).collect();
        super::grpo::pad_rows(&r, rb.c, dtype, &dev)
    };
    let (old, adv, ret, vold) = (
        pick(&batch.logp)?,
        pick(&batch.advantages)?,
        pick(&batch.returns)?,
        pick(&batch.values)?,
    );
    let mask = &rb.mask_B_C;
    let (pg, pm) = ppo_policy_loss(&lp, &old, &adv, mask, cfg.cliprange)?;
    let (vf, vf_clipfrac) =
        ppo_value_loss(&vpred.to_dtype(dtype)?, &vold, &ret, mask, cfg.value_clip())?;
    let ent = ent.context("entropy")?;
    let ent_mean = masked_mean(&ent, mask)?;
    let loss = if train_policy {
        ppo_total_loss(&pg, &vf, cfg.vf_coef, Some((&ent_mean, cfg.entropy_coef)))?
    } else {
        (&vf * cfg.vf_coef)?
    };
    let ratio = masked_mean(&(lp.detach() - &old)?.exp()?, mask)?;
    let mut m = Metrics::new();
    m.insert("loss".into(), scalar_f64(&loss)?);
    m.insert("loss/policy_avg".into(), scalar_f64(&pg)?);
    m.insert("loss/value_avg".into(), scalar_f64(&vf)?);
    m.insert("policy/approxkl_avg".into(), pm.approxkl as f64);
    m.insert("policy/clipfrac_avg".into(), pm.pg_clipfrac as f64);
    m.insert("policy/entropy_avg".into(), scalar_f64(&ent_mean)?);
    m.insert("val/clipfrac_avg".into(), vf_clipfrac as f64);
    m.insert("val/ratio".into(), scalar_f64(&ratio)?);
    m.insert(
        "tokens".into(),
        samples
            .iter()
            .map(|s| s.prompt_ids.len() + s.completion_ids.len())
            .sum::<usize>() as f64,
    );
    Ok((loss, m))
}

impl PpoConfig {
    fn value_clip(&self) -> f64 {
        self.cliprange_value
    }
}

/// The optimizer steps of one rollout batch: per step, its micro-batches (sample indices).
/// `ppo_epochs` passes; each a permutation drawn from `rng`, cut into `num_mini_batches`
/// mini-batches, each cut into micro-batches of `micro` (0 = the whole mini-batch).
pub fn minibatch_schedule(
    n: usize,
    ppo_epochs: usize,
    num_mini_batches: usize,
    micro: usize,
    rng: &mut StdRng,
) -> Vec<Vec<Vec<usize>>> {
    let mb = (n / num_mini_batches.max(1)).max(1);
    let micro = if micro == 0 { mb } else { micro.min(mb) };
    let mut out = Vec::new();
    for _ in 0..ppo_epochs {
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(rng);
        for mini in perm.chunks(mb).take(num_mini_batches.max(1)) {
            out.push(mini.chunks(micro).map(|c| c.to_vec()).collect());
        }
    }
    out
}

/// Checkpoint state of a PPO run.
#[derive(Serialize, Deserialize)]
struct PpoState {
    cursor: Cursor,
    kl: KlController,
    episode: u64,
}

/// Raw scores of one chunk of completions: the reward function, or the reward model inside the
/// value model at each sample's last token (one forward of the chunk).
fn raw_scores(
    reward: Option<&mut Box<dyn RewardFn>>,
    value: &ValueModel,
    pad: u32,
    inputs: &[RewardInput],
    samples: &[PpoSample],
    dev: &Device,
) -> Result<Vec<f32>> {
    if let Some(r) = reward {
        return score_checked(r.as_mut(), inputs);
    }
    let (ids_B_T, last) = scored_ids(samples, pad, dev)?;
    value.rm_scores(&ids_B_T, &last)
}

/// Prompt + completion ids of `samples`, right-padded with `pad` into `[B, T]`, and each row's
/// last real position: where the reward model reads the score (training and held-out alike).
fn scored_ids(samples: &[PpoSample], pad: u32, dev: &Device) -> Result<(Tensor, Vec<usize>)> {
    let b = samples.len();
    let t = samples
        .iter()
        .map(|x| x.prompt_ids.len() + x.completion_ids.len())
        .max()
        .unwrap_or(1);
    let mut v = vec![pad; b * t];
    let mut last = Vec::with_capacity(b);
    for (i, x) in samples.iter().enumerate() {
        for (j, &id) in x.prompt_ids.iter().chain(&x.completion_ids).enumerate() {
            v[i * t + j] = id;
        }
        last.push(x.prompt_ids.len() + x.completion_ids.len() - 1);
    }
    Ok((Tensor::from_vec(v, (b, t), dev)?, last))
}

/// The PPO algorithm on the shared loop.
pub struct Ppo {
    s: PpoSettings,
    cfg: PpoConfig,
    pad: u32,
    reference: Option<Policy>,
    value: ValueModel,
    stream: PromptStream,
    tok: TokenizerBundle,
    /// `None`: score with the reward model inside the value model.
    reward: Option<Box<dyn RewardFn>>,
    sampling: SamplingConfig,
    /// rollouts.parquet; `None` on ranks > 0 of a data-parallel job (every rank ends with the
    /// whole rollout batch, sampled and scored chunk by chunk across the ranks; rank 0 writes it).
    log: Option<super::output::RolloutLog<PpoRollout>>,
    kl: KlController,
    episode: u64,
    steps: u64,
    batch: Option<PpoBatch>,
    schedule: Vec<Vec<Vec<usize>>>,
    /// Index into `schedule` of the step being taken.
    pos: usize,
    step: u64,
    gen_metrics: Metrics,
    /// `--eval-data`: held-out prompts and their token ids.
    eval: Option<Vec<(align_datasets::PromptRecord, Vec<u32>)>>,
}

impl Ppo {
    /// Steps 1–2: sample, score, normalise/penalise/clip.
    fn rollouts(
        &mut self,
        policy: &Policy,
        step: u64,
    ) -> Result<(Vec<PpoSample>, Vec<f32>, Vec<f32>, Vec<String>, Vec<String>)> {
        let s = &self.s;
        let mut prompts = Vec::with_capacity(s.prompts_per_step);
        let mut ids = Vec::with_capacity(s.prompts_per_step);
        let mut recs = Vec::with_capacity(s.prompts_per_step);
        while ids.len() < s.prompts_per_step {
            let rec = match self.stream.next() {
                Some(r) => r?,
                None => bail!(
                    "the prompt set has no usable rows (skips: {})",
                    self.stream.skips()
                ),
            };
            let mut p = encode_prompt(&self.tok, &rec.prompt, rec.messages.is_some())
                .with_context(|| format!("prompt at {}", rec.source_row))?;
            if p.len() > s.max_prompt_length {
                p.drain(..p.len() - s.max_prompt_length);
            }
            ids.push(p);
            prompts.push(rec.prompt.clone());
            recs.push(rec);
        }
        let seed = s.looping.seed ^ (step.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let chunk = chunk_len(s.gen_batch_size, ids.len());
        let (pad, eos, dev) = (self.pad, self.tok.eos_id, policy.device());
        let (reward, value) = (&mut self.reward, &self.value);
        let t0 = Instant::now();
        let mut score_s = 0.0;
        // each chunk is scored where it was generated (one rank's share in a data-parallel job)
        let (comps, raw) = generate_chunked(
            &policy.model,
            Some(&self.tok),
            &ids,
            pad,
            &self.sampling,
            Fwd::POLICY,
            seed,
            chunk,
            |k, cs| {
                let t = Instant::now();
                let off = k * chunk;
                let samples = samples_of(cs, &ids[off..off + cs.len()], eos);
                let inputs = RewardInput::of(cs, off, |i| &recs[i]);
                let r = raw_scores(reward.as_mut(), value, pad, &inputs, &samples, dev)
                    .context("scoring the completions");
                score_s += t.elapsed().as_secs_f64();
                r
            },
        )?;
        let raw = raw.concat();
        let gen_s = (t0.elapsed().as_secs_f64() - score_s).max(1e-9);
        let samples = samples_of(&comps, &ids, eos);
        let s = &self.s;
        if let Some((i, r)) = raw.iter().enumerate().find(|(_, r)| !r.is_finite()) {
            bail!(
                "score {r} (not finite) for the completion of the prompt at {}",
                recs[i].source_row
            );
        }
        let mut score: Vec<f64> = raw.iter().map(|&x| x as f64).collect();
        if s.normalize_reward {
            let (mean, std) = self
                .value
                .stats
                .context("--normalize-reward needs rm/ with `mean` and `std` in its config.json")?;
            for x in &mut score {
                *x = (*x - mean) / std.max(1e-8);
            }
        }
        let dev = Device::Cpu;
        if let Some(p) = s.missing_eos_penalty {
            let has: Vec<f64> = comps
                .iter()
                .map(|c| {
                    if c.finish == FinishReason::Length {
                        0.0
                    } else {
                        1.0
                    }
                })
                .collect();
            let t = missing_eos_penalty(
                &Tensor::new(score.as_slice(), &dev)?,
                &Tensor::new(has.as_slice(), &dev)?,
                p,
            )?;
            score = t.to_vec1::<f64>()?;
        }
        if s.score_clip > 0.0 {
            for x in &mut score {
                *x = x.clamp(-s.score_clip, s.score_clip);
            }
        }
        let new_tokens: usize = comps.iter().map(|c| c.ids.len()).sum();
        let n = comps.len() as f64;
        let mut m = Metrics::new();
        m.insert(
            "val/num_eos_tokens".into(),
            comps
                .iter()
                .filter(|c| c.finish == FinishReason::Eos)
                .count() as f64,
        );
        m.insert("completion_length".into(), new_tokens as f64 / n);
        m.insert(
            "gen_tokens_per_s".into(),
            new_tokens as f64 / gen_s.max(1e-9),
        );
        m.insert("generation_time_s".into(), gen_s);
        m.insert(
            "objective/raw_scores".into(),
            raw.iter().map(|&x| x as f64).sum::<f64>() / n,
        );
        self.gen_metrics = m;
        let texts = comps.into_iter().map(|c| c.text).collect();
        Ok((
            samples,
            score.into_iter().map(|x| x as f32).collect(),
            raw,
            prompts,
            texts,
        ))
    }
}

/// Held-out scoring of a policy trained by PPO (used by `align compare`): the first `max`
/// prompts of `data`, `samples` completions each at the run's temperature and response length,
/// scored by the run's reward (its rm/ or verifier, before normalisation), from an RNG seeded
/// with `seed`; per prompt, keyed `file#row`, the mean reward.
#[allow(clippy::too_many_arguments)]
pub fn score_prompts(
    policy: &Policy,
    start: &Path,
    s: &PpoSettings,
    data: &[PathBuf],
    max: usize,
    samples: usize,
    seed: u64,
    gen_batch_size: usize,
) -> Result<Vec<(String, f64)>> {
    let tok = TokenizerBundle::from_dir(start)
        .with_context(|| format!("loading the tokenizer of {}", start.display()))?;
    let prompts = super::grpo::eval_prompts(data, &tok, max, s.max_prompt_length)?;
    let sampling = s.sampling(eos_ids(&policy.model, Some(start), Some(&tok)))?;
    if let Some(mut reward) = s.reward_fn(policy.device(), policy.dtype())? {
        return super::grpo::score_held_out_by(
            policy,
            &tok,
            &prompts,
            &sampling,
            reward.as_mut(),
            samples,
            seed,
            gen_batch_size,
        );
    }
    // The reward model scores token ids as in training and in the run's own evaluation: the
    // prompt as the policy saw it (cut to max_prompt_length) and the completion's ids, read
    // at the last one; re-encoding the texts would score other sequences (whole prompts,
    // other token boundaries) than the ones the policy was trained and evaluated on.
    let Some(rm_dir) = &s.reward_model else {
        bail!("the PPO run's settings name no reward and no reward model")
    };
    let rm = crate::score::ScoreModel::load(
        rm_dir,
        crate::policy::TrainMode::Frozen,
        policy.dtype(),
        policy.device(),
    )
    .with_context(|| format!("loading the run's reward model {}", rm_dir.display()))?;
    let (pad, eos, dev) = (tok.pad_id(), tok.eos_id, policy.device());
    super::grpo::score_held_out(
        policy,
        &tok,
        &prompts,
        &sampling,
        |_, cs, ids| {
            let (ids_B_T, last) = scored_ids(&samples_of(cs, ids, eos), pad, dev)?;
            let h = rm.hidden(&ids_B_T, SCORE_REFERENCE)?.detach();
            rm_scores_at(&h, &last, rm.head.as_tensor())
        },
        samples,
        seed,
        gen_batch_size,
    )
}

impl Ppo {
    fn evaluate_on(
        &mut self,
        policy: &Policy,
        prompts: &[(align_datasets::PromptRecord, Vec<u32>)],
    ) -> Result<Metrics> {
        let ids: Vec<Vec<u32>> = prompts.iter().map(|(_, p)| p.clone()).collect();
        let chunk = chunk_len(self.s.gen_batch_size, ids.len());
        let (pad, eos, dev) = (self.pad, self.tok.eos_id, policy.device());
        let cd = crate::ops::compute_dtype(policy.dtype());
        let (reward, value, reference) = (&mut self.reward, &self.value, self.reference.as_ref());
        let t = self.cfg.temperature;
        // the same seed at every evaluation: the curve compares the policies, not the dice;
        // each chunk scored, and its KL to the reference (k1, summed over tokens) measured,
        // where it was generated
        let (comps, parts) = generate_chunked(
            &policy.model,
            Some(&self.tok),
            &ids,
            pad,
            &self.sampling,
            Fwd::POLICY,
            self.s.looping.seed ^ 0xE7A1_5EED,
            chunk,
            |k, cs| {
                let off = k * chunk;
                let samples = samples_of(cs, &ids[off..off + cs.len()], eos);
                let inputs = RewardInput::of(cs, off, |i| &prompts[i].0);
                let raw = raw_scores(reward.as_mut(), value, pad, &inputs, &samples, dev)
                    .context("scoring the --eval-data completions")?;
                let refs: Vec<&PpoSample> = samples.iter().collect();
                let rb = response_batch(&refs, pad, cd, dev)?;
                let (lp, rp) = policy_and_reference_logps(policy, reference, &rb, t)?;
                let d = ((lp - rp)? * &rb.mask_B_C)?;
                let kl = d.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
                Ok((raw, kl))
            },
        )?;
        let mut raw = Vec::with_capacity(comps.len());
        let mut kl_sum = 0f64;
        for (r, kl) in parts {
            raw.extend(r);
            kl_sum += kl;
        }
        if let Some((i, r)) = raw.iter().enumerate().find(|(_, r)| !r.is_finite()) {
            bail!(
                "eval reward {r} (not finite) for the prompt at {}",
                prompts[i].0.source_row
            );
        }
        let n = comps.len().max(1) as f64;
        let mut m = Metrics::new();
        m.insert(
            "eval_reward".into(),
            raw.iter().map(|&x| x as f64).sum::<f64>() / n,
        );
        m.insert("eval_kl".into(), kl_sum / n);
        m.insert(
            "eval_completion_length".into(),
            comps.iter().map(|c| c.ids.len()).sum::<usize>() as f64 / n,
        );
        Ok(m)
    }
}

impl Algorithm for Ppo {
    type Settings = PpoSettings;
    const FULL_LR: f64 = FULL_LR;
    const LORA_LR: f64 = FULL_LR * LORA_LR_FACTOR;
    const PLOT: &'static [&'static str] = &[
        "objective/scores",
        "objective/kl",
        "objective/rlhf_reward",
        "loss/policy_avg",
        "loss/value_avg",
        "eval_reward",
        "eval_kl",
    ];
    const HEADLINE: &'static [(&'static str, &'static str)] = &[
        ("score", "objective/scores"),
        ("kl", "objective/kl"),
        ("vf", "loss/value_avg"),
        ("len", "completion_length"),
    ];

    fn new(s: &PpoSettings, policy: &Policy, ctx: &Setup) -> Result<Self> {
        let model = s
            .run
            .model
            .clone()
            .context("--model DIR is required (a Hugging Face model folder)")?;
        let prompts = s.prompts.clone().context(
            "--prompts FILE is required (prompt parquet: `prompt`, messages or `question`)",
        )?;
        if s.reward.is_none() && s.reward_command.is_none() && s.reward_model.is_none() {
            bail!(
                "give --reward-model rm/ (a reward model from `align rm`) or a reward: --reward SPEC or --reward-command CMD"
            );
        }
        let value_lora = LoraConfig {
            r: s.lora.rank,
            alpha: s.lora.alpha,
            dropout: s.lora.lora_dropout,
            use_rslora: s.lora.rslora,
            target_modules: s.lora.target_modules.clone(),
            seed: s.looping.seed ^ 0x5eed_0f_c817,
        };
        let value = match &s.reward_model {
            Some(dir) => {
                let v = ValueModel::from_reward_model(dir, &value_lora, ctx.dtype, &ctx.device)?;
                let (pv, rv) = (policy.cfg().vocab_size, v.backbone.cfg().vocab_size);
                if pv != rv {
                    bail!(
                        "{}: the reward model's vocabulary ({rv}) differs from the policy's ({pv}); the value model reads the policy's tokens, so both need the same tokenizer",
                        dir.display()
                    );
                }
                v
            }
            // a LoRA policy lends its frozen base (one copy of the weights for both networks)
            None => match ValueModel::sharing_base(policy, &value_lora, s.looping.seed)? {
                Some(v) => v,
                None => ValueModel::from_base(
                    &model,
                    &value_lora,
                    ctx.dtype,
                    &ctx.device,
                    s.looping.seed,
                )?,
            },
        };
        if s.normalize_reward && value.stats.is_none() {
            bail!("--normalize-reward needs --reward-model rm/ with `mean` and `std` in its config.json");
        }
        let reference = if s.lora.full {
            Some(
                Policy::load(&model, TrainMode::Frozen, ctx.dtype, &ctx.device).with_context(
                    || format!("loading the reference copy of {}", model.display()),
                )?,
            )
        } else {
            None
        };
        let reward = s.reward_fn(&ctx.device, ctx.dtype)?;
        let tok = TokenizerBundle::from_dir(&model)
            .with_context(|| format!("loading the tokenizer of {}", model.display()))?;
        let sampling = s.sampling(eos_ids(&policy.model, Some(&model), Some(&tok)))?;
        let saved: Option<PpoState> = ctx
            .resume
            .as_ref()
            .map(|(st, _)| serde_json::from_value(st.clone()))
            .transpose()
            .context("the checkpoint's PPO state is unreadable")?;
        let src = Source::from_paths(&prompts).with_context(|| format!("prompts {prompts:?}"))?;
        let opts = StreamOptions {
            shuffle: !s.looping.no_shuffle,
            seed: s.looping.seed,
            loop_epochs: true,
            ..Default::default()
        };
        let stream = match &saved {
            Some(st) => PromptStream::resume(&src, opts, tok.chat_template.as_ref(), &st.cursor)?,
            None => PromptStream::open(&src, opts, tok.chat_template.as_ref())?,
        };
        let resume_step = ctx.resume.as_ref().map(|(_, st)| *st).unwrap_or(0);
        let log = crate::dist::is_main()
            .then(|| super::output::RolloutLog::open(&ctx.out, resume_step, ctx.resume.is_some()))
            .transpose()?;
        let kl = match &saved {
            Some(st) => st.kl.clone(),
            None => match s.kl_target {
                Some(target) => KlController::Adaptive {
                    value: s.kl_coef,
                    target,
                    horizon: s.kl_horizon,
                },
                None => KlController::Fixed { value: s.kl_coef },
            },
        };
        let per_batch = (s.ppo_epochs * s.num_mini_batches) as u64;
        let steps = s.looping.steps.unwrap_or(100 * per_batch);
        let eval = match &s.looping.eval_data {
            Some(e) => Some(super::grpo::eval_prompts(
                e,
                &tok,
                s.eval_max_prompts,
                s.max_prompt_length,
            )?),
            None => None,
        };
        Ok(Ppo {
            s: s.clone(),
            cfg: PpoConfig::from_settings(s),
            pad: tok.pad_id(),
            reference,
            value,
            stream,
            tok,
            reward,
            sampling,
            log,
            kl,
            episode: saved.as_ref().map(|st| st.episode).unwrap_or(0),
            steps,
            batch: None,
            schedule: Vec::new(),
            pos: 0,
            step: resume_step,
            gen_metrics: Metrics::new(),
            eval,
        })
    }

    fn extra_vars(&self) -> Vec<(String, Var)> {
        self.value.vars()
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn banner(&self) -> String {
        format!(
            "{} steps, {} rollouts per batch × {} epochs × {} mini-batches, value model from {}, scores from {}, kl_coef {}{}",
            self.steps,
            self.s.prompts_per_step,
            self.s.ppo_epochs,
            self.s.num_mini_batches,
            self.s
                .reward_model
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "the policy's base".into()),
            match (&self.reward, &self.s.reward_model) {
                (Some(r), _) => format!("reward `{}`", r.name()),
                (None, Some(p)) => format!("the reward model {}", p.display()),
                (None, None) => "?".into(),
            },
            self.s.kl_coef,
            match self.s.kl_target {
                Some(t) => format!(" (adaptive, target {t})"),
                None => String::new(),
            }
        )
    }

    fn prepare(&mut self, policy: &Policy, step: u64) -> Result<usize> {
        self.step = step;
        if self.batch.is_none() || self.pos + 1 >= self.schedule.len() {
            let t0 = Instant::now();
            let (samples, scores, raw, prompts, texts) = self.rollouts(policy, step)?;
            let chunk = self.s.train_batch_size;
            let b = process_rollouts(
                policy,
                self.reference.as_ref(),
                &self.value,
                samples,
                scores,
                self.pad,
                &self.cfg,
                self.kl.value(),
                chunk,
            )?;
            // rank 0 alone logs the rollouts: the other ranks do not build the rows
            if let Some(log) = self.log.as_mut() {
                let rows: Vec<PpoRollout> = (0..b.samples.len())
                    .map(|i| PpoRollout {
                        step: step as i64,
                        prompt: prompts[i].clone(),
                        completion: texts[i].clone(),
                        score: b.scores[i],
                        raw_score: raw[i],
                        values: b.values[i].clone(),
                        advantages: b.advantages[i].clone(),
                        returns: b.returns[i].clone(),
                        logp: b.logp[i].clone(),
                        ref_logp: b.ref_logp[i].clone(),
                    })
                    .collect();
                log.append(rows);
            }
            for (k, v) in &b.metrics {
                self.gen_metrics.insert(k.clone(), *v);
            }
            self.gen_metrics
                .insert("objective/kl_coef".into(), self.kl.value());
            self.episode += b.samples.len() as u64;
            self.gen_metrics
                .insert("episode".into(), self.episode as f64);
            self.gen_metrics
                .insert("rollout_time_s".into(), t0.elapsed().as_secs_f64());
            let kl = b.metrics.get("objective/kl").copied().unwrap_or(0.0);
            self.kl.update(kl, b.samples.len());
            let mut rng = StdRng::seed_from_u64(
                self.s.looping.seed ^ 0x3b1d_u64.wrapping_mul(step.wrapping_add(7)),
            );
            self.schedule = minibatch_schedule(
                b.samples.len(),
                self.s.ppo_epochs,
                self.s.num_mini_batches,
                self.s.train_batch_size,
                &mut rng,
            );
            self.batch = Some(b);
            self.pos = 0;
        } else {
            self.pos += 1;
        }
        Ok(self.schedule[self.pos].len())
    }

    fn micro_loss(&self, policy: &Policy, i: usize) -> Result<(Tensor, Metrics)> {
        let b = self.batch.as_ref().context("no rollout batch")?;
        ppo_micro_loss(
            policy,
            &self.value,
            b,
            &self.schedule[self.pos][i],
            self.pad,
            &self.cfg,
            self.step >= self.s.critic_warmup_steps,
        )
    }

    fn after_step(&mut self, m: &mut Metrics) -> Result<()> {
        if let Some(t) = m.remove("tokens_per_s") {
            m.insert("train_tokens_per_s".into(), t);
        }
        for (k, v) in &self.gen_metrics {
            m.insert(k.clone(), *v);
        }
        Ok(())
    }

    fn evaluate(&mut self, policy: &Policy) -> Result<Option<Metrics>> {
        let Some(prompts) = self.eval.take() else {
            return Ok(None);
        };
        let res = self.evaluate_on(policy, &prompts);
        self.eval = Some(prompts);
        res.map(Some)
    }

    fn at_boundary(&self) -> bool {
        self.pos + 1 >= self.schedule.len()
    }

    fn checkpoint_state(&mut self, step: u64) -> Result<Value> {
        if let Some(log) = self.log.as_mut() {
            log.commit(step)?;
        }
        Ok(serde_json::to_value(PpoState {
            cursor: self.stream.cursor(),
            kl: self.kl.clone(),
            episode: self.episode,
        })?)
    }

    fn finish(&mut self) -> Result<()> {
        let Some(log) = self.log.as_mut() else {
            return Ok(()); // rank 0 writes the outputs
        };
        log.commit(u64::MAX)?;
        let dir = self.s.run.out.join("value_adapter");
        crate::peft::save_adapter(&self.value.backbone, &dir)
            .with_context(|| format!("saving the value adapter to {}", dir.display()))?;
        let mut head = std::collections::HashMap::new();
        head.insert(
            "score.weight".to_string(),
            self.value.head.as_tensor().clone(),
        );
        crate::peft::write_safetensors(&head, &dir.join("value_head.safetensors"))?;
        Ok(())
    }

    fn summary(&self, final_eval: &Metrics) -> Vec<String> {
        let mut v = Vec::new();
        if let (Some(r), Some(k)) = (final_eval.get("eval_reward"), final_eval.get("eval_kl")) {
            v.push(format!(
                "held-out reward {r:.4} at KL {k:.4} over {} prompts",
                self.eval.as_ref().map(|e| e.len()).unwrap_or(0)
            ));
        }
        if self.stream.skips().total() > 0 {
            v.push(format!("skipped prompt rows: {}", self.stream.skips()));
        }
        v.push(format!("episodes (rollouts): {}", self.episode));
        v.push(format!("KL coefficient at the end: {:.4}", self.kl.value()));
        v.push(format!(
            "value model: {} (adapter + value_head.safetensors)",
            self.s.run.out.join("value_adapter").display()
        ));
        v.push(format!(
            "rollouts: {}",
            self.s.run.out.join("rollouts.parquet").display()
        ));
        v
    }
}
