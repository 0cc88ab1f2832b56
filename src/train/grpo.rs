//! `align grpo`: Group Relative Policy Optimisation of a LoRA adapter (or every weight with
//! `--full`) with verifiable rewards, a reward model or an external verifier.
//!
//! # Algorithm (per generation batch)
//!
//! 1. Take `P = --prompts-per-step` prompts, sample `G = --group-size` completions of each with
//!    the current policy (KV-cache sampler, [`crate::generate`]), temperature `T`.
//! 2. Score them: `r_i` ([`crate::rewards`]). Advantages
//!    `A_i = (r_i − mean_group(r)) / (std + 1e-4)` with the unbiased std of the group
//!    (`--scale-rewards group`), of the whole batch (`batch`) or no scaling (`none`, Dr. GRPO)
//!    ([`align_algorithms::grpo::group_advantages`]).
//! 3. `--num-iterations μ` optimizer steps on the batch. Per completion token t:
//!    `ρ_t = exp(logp_t − logp_old_t)`, per-token loss
//!    `−min(ρ_t A, clip(ρ_t, 1−ε_low, 1+ε_high) A) + β·KL_t`,
//!    `KL_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1` (k3), aggregated by `--loss-type`
//!    (`grpo`: mean of per-sequence means; `bnpo`: token mean over the micro-batch; `dr_grpo`:
//!    sum / (B · max_new_tokens); `dapo`: sum / completion tokens of the whole generation batch)
//!    ([`align_algorithms::grpo::grpo_loss`]). Log-probs are of `softmax(logits / T)`, as in TRL.
//!    `logp_old` are the sampler's log-probs (equal to the policy's before the first update);
//!    the reference is the policy with adapters off (LoRA) or a frozen copy of the initial
//!    weights (`--full`), computed once per batch and only when β ≠ 0.
//!
//! # Defaults vs TRL 1.16 `GRPOConfig`
//!
//! Same: `loss_type=dapo`, `beta=0`, `epsilon=0.2` (`epsilon_high` = `epsilon`),
//! `scale_rewards=group`, `num_generations=8`, `num_iterations=1`, `temperature=1`, `top_p=1`,
//! `top_k=0`, lr 1e-6 for full fine-tuning, linear schedule, `max_grad_norm=1`.
//! Different: LoRA's default lr is 10× the full-FT one (1e-5); `max_new_tokens` defaults to 256
//! (TRL `max_completion_length` 256 in older releases, CPU-friendly); prompts per step 4.
//!
//! # Departures
//!
//! * One process, no vLLM: the policy generates with its own KV cache; the sampler's log-probs
//!   are the "old" log-probs (TRL recomputes them with a forward pass when μ > 1; the values
//!   agree to float rounding).
//! * `entropy` is the mean entropy of the sampling distribution at the generated tokens,
//!   measured during generation (TRL measures it in the training forward; same quantity at μ=1).
//! * Checkpoints are written only at generation-batch boundaries (`--save-every` must be a
//!   multiple of `--num-iterations`), so resume regenerates nothing and is exact: prompt cursor
//!   in the checkpoint, sampling RNG derived from (seed, step).
//! * Offline (`--rollouts FILE`): logged rollouts are grouped by (`step`, `group`), advantages
//!   recomputed from `reward`, completions re-tokenized (EOS appended when the stored `logp`
//!   has one more entry than the re-tokenized completion); a stored `logp` of matching length is
//!   used as `logp_old` (importance ratios against the logging policy), otherwise the batch is
//!   treated as on-policy.
//! * Not implemented: `mask_truncated_completions`, entropy masking, GSPO/sequence-level IS,
//!   reward weights.
//! * Data parallel (`mpirun -np W`): the rollout batch is sampled and scored in chunks of
//!   `--gen-batch-size` prompts shared out across the ranks (`generate::generate_chunked`), the
//!   reference log-probs of each rank's own micro-batches only, and the loss's micro-batches
//!   `i ≡ r (mod W)` with the gradients summed (see `dist`).

//!
//! # Evaluation
//!
//! `--eval-data PROMPTS` (with `--eval-every`, and always at the end): the first
//! `--eval-max-prompts` prompts of the file, in file order, one completion each, sampled with
//! the run's sampling settings from a fixed seed (the same at every evaluation, so the
//! `eval_reward` curve compares like with like), scored by the training reward.

use super::settings::{self, AlgoSettings, LoopSettings, LoraSettings, OptimSettings, RunSettings};
use super::{Algorithm, Setup};
use crate::bail;
use crate::error::{Context, Result};
use crate::generate::{
    chunk_len, encode_prompt, eos_ids, generate_chunked, Completion, SamplingConfig,
};
use crate::lora::Fwd;
use crate::policy::{Policy, TokenBatch, TrainMode};
use crate::rewards::{build_reward, score_checked, RewardFn, RewardInput, RewardOptions};
use crate::trainer::Metrics;
use align_algorithms::grpo::{
    group_advantages, grpo_loss, GrpoConfig, GrpoInputs, GrpoLossType, ScaleRewards,
};
use align_datasets::{
    read_rollouts, Cursor, PromptRecord, PromptStream, Rollout, Source, StreamOptions,
    TokenizerBundle,
};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Full fine-tuning default learning rate (TRL's GRPOConfig default); LoRA gets 10×.
pub const FULL_LR: f64 = 1e-6;
pub const LORA_LR_FACTOR: f64 = 10.0;

/// Every resolved setting of a GRPO run (saved in each checkpoint and in settings.json).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GrpoSettings {
    pub prompts: Option<Vec<PathBuf>>,
    pub rollouts: Option<PathBuf>,
    #[serde(flatten)]
    pub run: RunSettings,
    #[serde(flatten)]
    pub lora: LoraSettings,
    #[serde(flatten)]
    pub optim: OptimSettings,
    #[serde(flatten)]
    pub looping: LoopSettings,
    pub reward: String,
    pub ref_column: Option<String>,
    pub pattern: Option<String>,
    pub chars: Option<String>,
    pub reward_model: Option<PathBuf>,
    pub reward_command: Option<String>,
    /// Seconds the reward command may take per batch.
    #[serde(default = "default_reward_timeout")]
    pub reward_timeout: f64,
    pub prompts_per_step: usize,
    pub group_size: usize,
    pub max_new_tokens: usize,
    pub max_prompt_length: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub stop: Vec<String>,
    pub gen_batch_size: usize,
    pub train_batch_size: usize,
    pub num_iterations: usize,
    pub beta: f64,
    pub epsilon: f64,
    pub epsilon_high: Option<f64>,
    pub loss_type: GrpoLossType,
    pub scale_rewards: ScaleRewards,
    pub eval_max_prompts: usize,
}

fn default_reward_timeout() -> f64 {
    crate::rewards::DEFAULT_COMMAND_TIMEOUT_S
}

impl AlgoSettings for GrpoSettings {
    const COMMAND: &'static str = "grpo";
    fn defaults() -> Map<String, Value> {
        let mut d = settings::shared_defaults();
        d.extend(super::dpo::obj(serde_json::json!({
            "prompts": null, "rollouts": null, "out": "runs/grpo", "steps": 100,
            "reward": "gsm8k", "ref_column": null, "pattern": null, "chars": null,
            "reward_model": null, "reward_command": null,
            "reward_timeout": crate::rewards::DEFAULT_COMMAND_TIMEOUT_S,
            "prompts_per_step": 4, "group_size": 8, "max_new_tokens": 256, "max_prompt_length": 512,
            "temperature": 1.0, "top_p": 1.0, "top_k": 0, "stop": [], "gen_batch_size": 0,
            "train_batch_size": 0, "num_iterations": 1, "beta": 0.0, "epsilon": 0.2,
            "epsilon_high": null, "loss_type": "dapo", "scale_rewards": "group",
            "eval_max_prompts": 64,
        })));
        d
    }
    crate::shared_groups!();
    fn batch_size(&self) -> usize {
        self.prompts_per_step * self.group_size
    }
    fn grad_accum(&self) -> usize {
        1
    }
    fn check_own(&self, errs: &mut Vec<String>) {
        if self.prompts.as_ref().is_some_and(|p| p.is_empty()) {
            errs.push("`prompts` is empty".into());
        }
        if self.group_size < 2 {
            errs.push(
                "`group_size` must be at least 2 (advantages are relative to the group)".into(),
            );
        }
        settings::positive(errs, "reward_timeout", self.reward_timeout);
        settings::positive_int(errs, "prompts_per_step", self.prompts_per_step as u64);
        settings::positive_int(errs, "num_iterations", self.num_iterations as u64);
        settings::positive_int(errs, "max_new_tokens", self.max_new_tokens as u64);
        settings::positive_int(errs, "max_prompt_length", self.max_prompt_length as u64);
        settings::positive_int(errs, "eval_max_prompts", self.eval_max_prompts as u64);
        if self.num_iterations > 0
            && !self
                .looping
                .save_every
                .is_multiple_of(self.num_iterations as u64)
        {
            errs.push(format!(
                "`save_every` ({}) must be a multiple of `num_iterations` ({}): checkpoints fall between generation batches",
                self.looping.save_every, self.num_iterations
            ));
        }
        settings::non_negative(errs, "temperature", self.temperature);
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            errs.push(format!("`top_p` must be in (0, 1] (got {})", self.top_p));
        }
        settings::non_negative(errs, "beta", self.beta);
        settings::non_negative(errs, "epsilon", self.epsilon);
        if let Some(e) = self.epsilon_high {
            settings::non_negative(errs, "epsilon_high", e);
        }
    }
}

/// Checkpoint state of a GRPO run.
#[derive(Serialize, Deserialize)]
struct GrpoState {
    /// Prompt stream position (online mode).
    cursor: Option<Cursor>,
    /// Next group index (offline mode).
    offline_pos: usize,
}

/// The GRPO algorithm on the shared loop.
pub struct Grpo {
    s: GrpoSettings,
    cfg: GrpoConfig,
    scale: ScaleRewards,
    pad: u32,
    reference: Option<Policy>,
    online: Option<Online>,
    offline: Option<Offline>,
    eval: Option<Vec<(PromptRecord, Vec<u32>)>>,
    steps: u64,
    batch: Option<RolloutBatch>,
    chunks: Vec<Vec<usize>>,
    iter_in_batch: usize,
    gen_metrics: BTreeMap<String, f64>,
}

impl Algorithm for Grpo {
    type Settings = GrpoSettings;
    const FULL_LR: f64 = FULL_LR;
    const LORA_LR: f64 = FULL_LR * LORA_LR_FACTOR;
    const PLOT: &'static [&'static str] =
        &["reward", "eval_reward", "completion_length", "loss", "kl"];
    const HEADLINE: &'static [(&'static str, &'static str)] = &[
        ("reward", "reward"),
        ("len", "completion_length"),
        ("loss", "loss"),
        ("eval_reward", "eval_reward"),
    ];

    fn new(s: &GrpoSettings, policy: &Policy, ctx: &Setup) -> Result<Self> {
        let model = s
            .run
            .model
            .clone()
            .context("--model DIR is required (a Hugging Face model folder)")?;
        match (&s.prompts, &s.rollouts) {
            (None, None) => bail!("give --prompts FILE (online GRPO) or --rollouts FILE (offline)"),
            (Some(_), Some(_)) => {
                bail!("--prompts and --rollouts are exclusive (online or offline training)")
            }
            _ => {}
        }
        let cfg = GrpoConfig {
            loss_type: s.loss_type,
            beta: s.beta,
            epsilon_low: s.epsilon,
            epsilon_high: s.epsilon_high.unwrap_or(s.epsilon),
            delta: None,
            max_completion_length: s.max_new_tokens,
        };
        let reference: Option<Policy> = if s.lora.full && s.beta != 0.0 {
            Some(
                Policy::load(&model, TrainMode::Frozen, ctx.dtype, &ctx.device).with_context(
                    || format!("loading the reference copy of {}", model.display()),
                )?,
            )
        } else {
            None
        };
        let tok = TokenizerBundle::from_dir(&model)
            .with_context(|| format!("loading the tokenizer of {}", model.display()))?;
        let pad = tok.pad_id();
        let sampling = SamplingConfig {
            max_new_tokens: s.max_new_tokens,
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            eos_ids: eos_ids(&policy.model, Some(&model), Some(&tok)),
            stop_strings: s.stop.clone(),
            ignore_eos: false,
        };
        sampling.validate()?;
        let saved: Option<GrpoState> = ctx
            .resume
            .as_ref()
            .map(|(st, _)| serde_json::from_value(st.clone()))
            .transpose()
            .context("the checkpoint's GRPO state is unreadable")?;
        let resume_step = ctx.resume.as_ref().map(|(_, step)| *step);
        let mut online = None;
        let mut offline = None;
        let mut eval = None;
        if let Some(prompts) = &s.prompts {
            let src =
                Source::from_paths(prompts).with_context(|| format!("prompts {prompts:?}"))?;
            let opts = StreamOptions {
                shuffle: !s.looping.no_shuffle,
                seed: s.looping.seed,
                loop_epochs: true,
                ..Default::default()
            };
            let stream = match saved.as_ref().and_then(|st| st.cursor.as_ref()) {
                Some(c) => PromptStream::resume(&src, opts, tok.chat_template.as_ref(), c)?,
                None => PromptStream::open(&src, opts, tok.chat_template.as_ref())?,
            };
            let reward = build_reward(
                &s.reward,
                &RewardOptions {
                    ref_column: s.ref_column.clone(),
                    pattern: s.pattern.clone(),
                    chars: s.chars.clone(),
                    reward_model: s.reward_model.clone(),
                    command: s.reward_command.clone(),
                    command_timeout: Some(s.reward_timeout),
                    device: Some(ctx.device.clone()),
                    dtype: Some(ctx.dtype),
                },
            )?;
            if let Some(e) = &s.looping.eval_data {
                eval = Some(eval_prompts(
                    e,
                    &tok,
                    s.eval_max_prompts,
                    s.max_prompt_length,
                )?);
            }
            // rank 0 of a data-parallel job writes the log (every rank holds the whole batch:
            // each samples its chunks and the results are broadcast)
            let writer = crate::dist::is_main()
                .then(|| {
                    super::output::RolloutLog::open(
                        &ctx.out,
                        resume_step.unwrap_or(0),
                        resume_step.is_some(),
                    )
                })
                .transpose()?;
            online = Some(Online {
                stream,
                tok: TokenizerBundle::from_dir(&model)?,
                reward,
                sampling,
                writer,
            });
        } else if let Some(path) = &s.rollouts {
            if s.looping.eval_data.is_some() {
                bail!("--eval-data scores sampled completions: it needs online GRPO (--prompts), not --rollouts");
            }
            let rows = read_rollouts(path)
                .with_context(|| format!("reading --rollouts {}", path.display()))?;
            let mut groups: Vec<Vec<Rollout>> = Vec::new();
            for r in rows {
                match groups.last_mut() {
                    Some(last) if last[0].step == r.step && last[0].group == r.group => {
                        last.push(r)
                    }
                    _ => groups.push(vec![r]),
                }
            }
            groups.retain(|g| g.len() >= 2);
            if groups.is_empty() {
                bail!(
                    "{}: no group of 2 or more rollouts with the same (step, group)",
                    path.display()
                );
            }
            offline = Some(Offline {
                groups,
                pos: saved.as_ref().map(|st| st.offline_pos).unwrap_or(0),
                tok,
            });
        }
        Ok(Grpo {
            s: s.clone(),
            cfg,
            scale: s.scale_rewards,
            pad,
            reference,
            online,
            offline,
            eval,
            steps: s.looping.steps.unwrap_or(100),
            batch: None,
            chunks: Vec::new(),
            iter_in_batch: s.num_iterations,
            gen_metrics: BTreeMap::new(),
        })
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn banner(&self) -> String {
        let name = |v: Value| v.as_str().map(String::from).unwrap_or_default();
        format!(
            "{} steps, {}x{} completions per batch, mu {}, loss {}, beta {}",
            self.steps,
            self.s.prompts_per_step,
            self.s.group_size,
            self.s.num_iterations,
            name(serde_json::to_value(self.s.loss_type).unwrap_or_default()),
            self.s.beta
        )
    }

    fn prepare(&mut self, policy: &Policy, step: u64) -> Result<usize> {
        let s = &self.s;
        if self.iter_in_batch >= s.num_iterations {
            let t0 = Instant::now();
            let (mut b, m) = if let Some(on) = self.online.as_mut() {
                next_online_batch(on, policy, s, self.pad, self.scale, step)?
            } else {
                let off = self.offline.as_mut().context("online or offline")?;
                next_offline_batch(off, s, self.scale)?
            };
            if s.beta != 0.0 {
                let r = self.reference.as_ref().unwrap_or(policy);
                let chunk = if s.train_batch_size == 0 {
                    b.samples.len()
                } else {
                    s.train_batch_size
                };
                b.ref_logps = Some(reference_logps(
                    r,
                    Fwd::REFERENCE,
                    &b.samples,
                    self.pad,
                    s.temperature,
                    chunk,
                )?);
            }
            self.gen_metrics = m;
            self.gen_metrics
                .insert("generation_time_s".into(), t0.elapsed().as_secs_f64());
            let n = b.samples.len();
            let mb = if s.train_batch_size == 0 {
                n
            } else {
                s.train_batch_size.min(n)
            };
            self.chunks = (0..n)
                .collect::<Vec<_>>()
                .chunks(mb.max(1))
                .map(|c| c.to_vec())
                .collect();
            self.batch = Some(b);
            self.iter_in_batch = 0;
        }
        self.iter_in_batch += 1;
        Ok(self.chunks.len())
    }

    fn micro_loss(&self, policy: &Policy, i: usize) -> Result<(Tensor, Metrics)> {
        let b = self.batch.as_ref().context("no generation batch")?;
        grpo_micro_loss(
            policy,
            b,
            &self.chunks[i],
            self.pad,
            self.s.temperature,
            &self.cfg,
            self.chunks.len(),
            true,
        )
    }

    fn after_step(&mut self, m: &mut Metrics) -> Result<()> {
        if let Some(t) = m.remove("tokens_per_s") {
            m.insert("train_tokens_per_s".into(), t);
        }
        for (k, v) in &self.gen_metrics {
            m.insert(k.clone(), *v);
        }
        if self.cfg.beta == 0.0 {
            m.remove("kl");
        }
        Ok(())
    }

    fn evaluate(&mut self, policy: &Policy) -> Result<Option<Metrics>> {
        let (Some(prompts), Some(on)) = (&self.eval, self.online.as_mut()) else {
            return Ok(None);
        };
        let ids: Vec<Vec<u32>> = prompts.iter().map(|(_, p)| p.clone()).collect();
        let chunk = chunk_len(self.s.gen_batch_size, ids.len());
        let reward = &mut on.reward;
        // the same seed at every evaluation: the curve compares the policies, not the dice
        let (comps, rewards) = generate_chunked(
            &policy.model,
            Some(&on.tok),
            &ids,
            self.pad,
            &on.sampling,
            Fwd::POLICY,
            self.s.looping.seed ^ 0xE7A1_5EED,
            chunk,
            |k, cs| {
                let inputs = RewardInput::of(cs, k * chunk, |i| &prompts[i].0);
                score_checked(reward.as_mut(), &inputs)
                    .context("scoring the --eval-data completions")
            },
        )?;
        let rewards = rewards.concat();
        if let Some((i, r)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
            bail!(
                "eval reward {r} (not finite) for the prompt at {}",
                prompts[i].0.source_row
            );
        }
        let n = rewards.len().max(1) as f64;
        let mut m = Metrics::new();
        m.insert(
            "eval_reward".into(),
            rewards.iter().map(|&x| x as f64).sum::<f64>() / n,
        );
        m.insert(
            "eval_completion_length".into(),
            comps.iter().map(|c| c.ids.len()).sum::<usize>() as f64 / n,
        );
        Ok(Some(m))
    }

    fn at_boundary(&self) -> bool {
        self.iter_in_batch >= self.s.num_iterations
    }

    fn checkpoint_state(&mut self, step: u64) -> Result<Value> {
        if let Some(on) = self.online.as_mut() {
            if let Some(w) = on.writer.as_mut() {
                w.commit(step)?;
            }
        }
        Ok(serde_json::to_value(GrpoState {
            cursor: self.online.as_ref().map(|o| o.stream.cursor()),
            offline_pos: self.offline.as_ref().map(|o| o.pos).unwrap_or(0),
        })?)
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(w) = self.online.as_mut().and_then(|on| on.writer.as_mut()) {
            w.commit(u64::MAX)?;
        }
        Ok(())
    }

    fn summary(&self, final_eval: &Metrics) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(r) = final_eval.get("eval_reward") {
            v.push(format!(
                "held-out reward {r:.4} over {} prompts",
                self.eval.as_ref().map(|e| e.len()).unwrap_or(0)
            ));
        }
        if let Some(on) = &self.online {
            if on.stream.skips().total() > 0 {
                v.push(format!("skipped prompt rows: {}", on.stream.skips()));
            }
        }
        if self.online.is_some() {
            v.push(format!(
                "rollouts: {}",
                self.s.run.out.join("rollouts.parquet").display()
            ));
        }
        v
    }
}

/// Held-out scoring of a policy trained by GRPO (used by `align compare`): the first `max`
/// prompts of `data`, `samples` completions each with the run's own sampling settings and
/// reward, from an RNG seeded with `seed` (every policy draws from the same random stream);
/// per prompt, keyed `file#row`, the mean reward of its samples.
#[allow(clippy::too_many_arguments)]
pub fn score_prompts(
    policy: &Policy,
    start: &Path,
    s: &GrpoSettings,
    data: &[PathBuf],
    max: usize,
    samples: usize,
    seed: u64,
    gen_batch_size: usize,
) -> Result<Vec<(String, f64)>> {
    let tok = TokenizerBundle::from_dir(start)
        .with_context(|| format!("loading the tokenizer of {}", start.display()))?;
    let mut s = s.clone();
    s.eval_max_prompts = max;
    let prompts = eval_prompts(data, &tok, s.eval_max_prompts, s.max_prompt_length)?;
    let sampling = SamplingConfig {
        max_new_tokens: s.max_new_tokens,
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        eos_ids: eos_ids(&policy.model, Some(start), Some(&tok)),
        stop_strings: s.stop.clone(),
        ignore_eos: false,
    };
    sampling.validate()?;
    let mut reward = build_reward(
        &s.reward,
        &RewardOptions {
            ref_column: s.ref_column.clone(),
            pattern: s.pattern.clone(),
            chars: s.chars.clone(),
            reward_model: s.reward_model.clone(),
            command: s.reward_command.clone(),
            command_timeout: Some(s.reward_timeout),
            device: Some(policy.device().clone()),
            dtype: Some(policy.dtype()),
        },
    )?;
    score_held_out_by(
        policy,
        &tok,
        &prompts,
        &sampling,
        reward.as_mut(),
        samples,
        seed,
        gen_batch_size,
    )
}

/// [`score_held_out`] with a reward function of the completions' texts (GRPO's rewards, PPO's
/// verifiers).
#[allow(clippy::too_many_arguments)]
pub(crate) fn score_held_out_by(
    policy: &Policy,
    tok: &TokenizerBundle,
    prompts: &[(PromptRecord, Vec<u32>)],
    sampling: &SamplingConfig,
    reward: &mut dyn RewardFn,
    samples: usize,
    seed: u64,
    gen_batch_size: usize,
) -> Result<Vec<(String, f64)>> {
    let k = samples.max(1);
    score_held_out(
        policy,
        tok,
        prompts,
        sampling,
        |off, cs, _| {
            let inputs = RewardInput::of(cs, off, |i| &prompts[i / k].0);
            score_checked(reward, &inputs)
        },
        samples,
        seed,
        gen_batch_size,
    )
}

/// `samples` completions per prompt (`sampling`, from an RNG seeded with `seed`), scored by
/// `score(offset, completions, their prompts' ids)` chunk by chunk (completion `j` of a chunk is
/// number `offset + j` overall, of prompt `(offset + j) / samples`); per prompt, keyed
/// `file#row`, the mean reward (GRPO and PPO held-out scoring).
#[allow(clippy::too_many_arguments)]
pub(crate) fn score_held_out(
    policy: &Policy,
    tok: &TokenizerBundle,
    prompts: &[(PromptRecord, Vec<u32>)],
    sampling: &SamplingConfig,
    mut score: impl FnMut(usize, &[Completion], &[Vec<u32>]) -> Result<Vec<f32>>,
    samples: usize,
    seed: u64,
    gen_batch_size: usize,
) -> Result<Vec<(String, f64)>> {
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .flat_map(|(_, p)| std::iter::repeat_n(p.clone(), samples.max(1)))
        .collect();
    let k = samples.max(1);
    let chunk = gen_batch_size.max(1);
    let (_, rewards) = generate_chunked(
        &policy.model,
        Some(tok),
        &ids,
        tok.pad_id(),
        sampling,
        Fwd::POLICY,
        seed,
        chunk,
        |c, cs| {
            let off = c * chunk;
            let r = score(off, cs, &ids[off..off + cs.len()])
                .context("scoring the held-out completions")?;
            if r.len() != cs.len() {
                bail!("{} scores for {} held-out completions", r.len(), cs.len());
            }
            Ok(r)
        },
    )?;
    let rewards = rewards.concat();
    let mut out = Vec::with_capacity(prompts.len());
    for (j, (rec, _)) in prompts.iter().enumerate() {
        let r = &rewards[j * k..(j + 1) * k];
        if let Some(bad) = r.iter().find(|x| !x.is_finite()) {
            bail!(
                "reward {bad} (not finite) for the prompt at {}",
                rec.source_row
            );
        }
        let key = format!("{}#{}", rec.source_row.file.display(), rec.source_row.row);
        out.push((key, r.iter().map(|&x| x as f64).sum::<f64>() / k as f64));
    }
    Ok(out)
}

/// The held-out prompts of `--eval-data` (GRPO, PPO): the first `max_prompts` in file order,
/// encoded and cut to their last `max_prompt_length` tokens.
pub(crate) fn eval_prompts(
    paths: &[PathBuf],
    tok: &TokenizerBundle,
    max_prompts: usize,
    max_prompt_length: usize,
) -> Result<Vec<(PromptRecord, Vec<u32>)>> {
    let src = Source::from_paths(paths).with_context(|| format!("--eval-data {paths:?}"))?;
    let stream = PromptStream::open(&src, StreamOptions::default(), tok.chat_template.as_ref())
        .with_context(|| format!("--eval-data {paths:?}"))?;
    let mut out = Vec::new();
    for rec in stream.take(max_prompts) {
        let rec = rec?;
        let mut ids = encode_prompt(tok, &rec.prompt, rec.messages.is_some())
            .with_context(|| format!("prompt at {}", rec.source_row))?;
        if ids.len() > max_prompt_length {
            ids.drain(..ids.len() - max_prompt_length);
        }
        out.push((rec, ids));
    }
    if out.is_empty() {
        bail!("--eval-data {paths:?}: no usable prompt");
    }
    Ok(out)
}

/// One scored completion, ready for training.
#[derive(Clone, Debug)]
pub struct Sample {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    /// Log-probs at sampling time (`None`: on-policy, use the current values).
    pub old_logps: Option<Vec<f32>>,
    pub advantage: f32,
}

/// A generation batch: `P × G` samples in groups of `G`.
pub struct RolloutBatch {
    pub samples: Vec<Sample>,
    /// Reference log-probs per sample (β ≠ 0).
    pub ref_logps: Option<Vec<Vec<f32>>>,
    /// Completion tokens in the whole batch (the `dapo` normaliser).
    pub completion_tokens: usize,
}

/// Per-token completion log-probs `[B, C]` of `softmax(logits / T)` and the mask `[B, C]`.
pub fn completion_logps(
    policy: &Policy,
    samples: &[&Sample],
    pad: u32,
    temperature: f64,
    fwd: Fwd,
) -> Result<(Tensor, Tensor)> {
    let pairs: Vec<(&[u32], &[u32])> = samples
        .iter()
        .map(|s| (s.prompt_ids.as_slice(), s.completion_ids.as_slice()))
        .collect();
    let dev = policy.device();
    let tb = TokenBatch::from_pairs(&pairs, pad, policy.dtype(), dev)?;
    let temperature = if temperature > 0.0 { temperature } else { 1.0 };
    // only completion positions make logits, and a group's shared prompt runs once
    let lp = policy.target_token_logps(&tb, fwd, temperature)?; // [B, T-1]
    let t1 = lp.dim(1)?;
    let c = samples
        .iter()
        .map(|s| s.completion_ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let b = samples.len();
    let mut idx = vec![0u32; b * c];
    let mut mask = vec![0f32; b * c];
    for (i, s) in samples.iter().enumerate() {
        let p = s.prompt_ids.len();
        for j in 0..c {
            let at = (p + j.min(s.completion_ids.len().saturating_sub(1))).saturating_sub(1);
            idx[i * c + j] = at.min(t1 - 1) as u32;
            if j < s.completion_ids.len() {
                mask[i * c + j] = 1.0;
            }
        }
    }
    let idx = Tensor::from_vec(idx, (b, c), dev)?;
    let lp = lp.gather(&idx, 1)?;
    let mask = Tensor::from_vec(mask, (b, c), dev)?.to_dtype(lp.dtype())?;
    Ok((lp, mask))
}

pub(crate) fn pad_rows(rows: &[&[f32]], c: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; rows.len() * c];
    for (i, r) in rows.iter().enumerate() {
        for (j, x) in r.iter().take(c).enumerate() {
            v[i * c + j] = *x;
        }
    }
    Ok(Tensor::from_vec(v, (rows.len(), c), dev)?.to_dtype(dtype)?)
}

/// The GRPO loss of the micro-batch `idx` of `batch` and its metrics.
#[allow(clippy::too_many_arguments)]
pub fn grpo_micro_loss(
    policy: &Policy,
    batch: &RolloutBatch,
    idx: &[usize],
    pad: u32,
    temperature: f64,
    cfg: &GrpoConfig,
    micro_batches: usize,
    train: bool,
) -> Result<(Tensor, BTreeMap<String, f64>)> {
    let samples: Vec<&Sample> = idx.iter().map(|&i| &batch.samples[i]).collect();
    let fwd = Fwd {
        adapters: true,
        train,
        no_grad: false,
    };
    let (lp, mask) = completion_logps(policy, &samples, pad, temperature, fwd)?;
    let (b, c) = lp.dims2()?;
    let dev = policy.device();
    let old = if samples.iter().all(|s| s.old_logps.is_some()) {
        let rows: Vec<&[f32]> = samples
            .iter()
            .map(|s| s.old_logps.as_deref().unwrap_or(&[]))
            .collect();
        Some(pad_rows(&rows, c, lp.dtype(), dev)?)
    } else {
        None
    };
    let ref_lp = match &batch.ref_logps {
        Some(r) => {
            let rows: Vec<&[f32]> = idx.iter().map(|&i| r[i].as_slice()).collect();
            Some(pad_rows(&rows, c, lp.dtype(), dev)?)
        }
        None => None,
    };
    let adv = Tensor::from_vec(
        samples.iter().map(|s| s.advantage).collect::<Vec<f32>>(),
        b,
        dev,
    )?
    .to_dtype(lp.dtype())?;
    let inputs = GrpoInputs {
        logp_B_T: &lp,
        old_logp_B_T: old.as_ref(),
        ref_logp_B_T: ref_lp.as_ref(),
        adv_B: &adv,
        mask_B_T: &mask,
        dapo_normalizer: Some(batch.completion_tokens as f64 / micro_batches.max(1) as f64),
    };
    let (loss, m) = grpo_loss(&inputs, cfg)?;
    let mut metrics: BTreeMap<String, f64> =
        m.to_map().into_iter().map(|(k, v)| (k, v as f64)).collect();
    metrics.insert("loss".into(), align_algorithms::ops::scalar_f64(&loss)?);
    metrics.insert(
        "tokens".into(),
        samples
            .iter()
            .map(|s| s.prompt_ids.len() + s.completion_ids.len())
            .sum::<usize>() as f64,
    );
    Ok((loss, metrics))
}

/// Reference log-probs of each sample (no graph), in order, in chunks of `chunk` samples = the
/// micro-batches. In a data-parallel job rank `r` computes only the chunks `k ≡ r (mod W)`,
/// the micro-batches the trainer gives it, and leaves the others' rows empty.
fn reference_logps(
    reference: &Policy,
    fwd: Fwd,
    samples: &[Sample],
    pad: u32,
    temperature: f64,
    chunk: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(samples.len());
    let refs: Vec<&Sample> = samples.iter().collect();
    let (rank, world) = (crate::dist::rank(), crate::dist::world());
    for (k, ch) in refs.chunks(chunk.max(1)).enumerate() {
        if k % world != rank {
            out.extend(ch.iter().map(|_| Vec::new()));
            continue;
        }
        let (lp, _) = completion_logps(reference, ch, pad, temperature, fwd)?;
        let rows: Vec<Vec<f32>> = lp.detach().to_dtype(DType::F32)?.to_vec2()?;
        for (s, r) in ch.iter().zip(rows) {
            out.push(r[..s.completion_ids.len()].to_vec());
        }
    }
    Ok(out)
}

/// Mean of per-group standard deviations (unbiased), TRL's `reward_std`.
fn group_std(rewards: &[f32], g: usize) -> (f64, f64) {
    let mut stds = Vec::new();
    let mut zero = 0usize;
    for grp in rewards.chunks(g) {
        let n = grp.len() as f64;
        let m = grp.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = if grp.len() > 1 {
            grp.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        if var.sqrt() < 1e-8 {
            zero += 1;
        }
        stds.push(var.sqrt());
    }
    let k = stds.len().max(1) as f64;
    (stds.iter().sum::<f64>() / k, zero as f64 / k)
}

fn advantages(rewards: &[f32], g: usize, scale: ScaleRewards) -> Result<Vec<f32>> {
    let r = Tensor::new(rewards, &Device::Cpu)?;
    Ok(group_advantages(&r, g, scale)?.to_vec1::<f32>()?)
}

struct Online {
    stream: PromptStream,
    tok: TokenizerBundle,
    reward: Box<dyn RewardFn>,
    sampling: SamplingConfig,
    writer: Option<super::output::RolloutLog<Rollout>>,
}

struct Offline {
    /// Groups of rollouts (same step and group id), in file order.
    groups: Vec<Vec<Rollout>>,
    pos: usize,
    tok: TokenizerBundle,
}

fn next_online_batch(
    on: &mut Online,
    policy: &Policy,
    s: &GrpoSettings,
    pad: u32,
    scale: ScaleRewards,
    step: u64,
) -> Result<(RolloutBatch, BTreeMap<String, f64>)> {
    let g = s.group_size;
    let mut records = Vec::with_capacity(s.prompts_per_step);
    let mut prompt_ids = Vec::with_capacity(s.prompts_per_step);
    while records.len() < s.prompts_per_step {
        let rec = match on.stream.next() {
            Some(r) => r?,
            None => bail!(
                "the prompt set has no usable rows (skips: {})",
                on.stream.skips()
            ),
        };
        let mut ids = encode_prompt(&on.tok, &rec.prompt, rec.messages.is_some())
            .with_context(|| format!("prompt at {}", rec.source_row))?;
        if ids.len() > s.max_prompt_length {
            ids.drain(..ids.len() - s.max_prompt_length);
        }
        prompt_ids.push(ids);
        records.push(rec);
    }
    let all: Vec<Vec<u32>> = prompt_ids
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), g))
        .collect();
    let seed = s.looping.seed ^ (step.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let chunk = chunk_len(s.gen_batch_size, all.len());
    let t0 = Instant::now();
    let mut score_s = 0.0;
    let reward = &mut on.reward;
    // each chunk is scored where it was generated (one rank's share in a data-parallel job)
    let (comps, rewards) = generate_chunked(
        &policy.model,
        Some(&on.tok),
        &all,
        pad,
        &on.sampling,
        Fwd::POLICY,
        seed,
        chunk,
        |k, cs| {
            let t = Instant::now();
            let inputs = RewardInput::of(cs, k * chunk, |i| &records[i / g]);
            let r = score_checked(reward.as_mut(), &inputs).with_context(|| {
                let mut rows: Vec<String> = (0..cs.len())
                    .map(|j| records[(k * chunk + j) / g].source_row.to_string())
                    .collect();
                rows.dedup();
                format!("scoring completions of the prompts at {}", rows.join(", "))
            });
            score_s += t.elapsed().as_secs_f64();
            r
        },
    )?;
    let rewards = rewards.concat();
    let gen_s = (t0.elapsed().as_secs_f64() - score_s).max(1e-9);
    if let Some((i, r)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
        bail!(
            "reward {r} (not finite) for completion {i} of the prompt at {}",
            records[i / g].source_row
        );
    }
    let adv = advantages(&rewards, g, scale)?;
    let new_tokens: usize = comps.iter().map(|c| c.ids.len()).sum();
    let mut m = BTreeMap::new();
    let n = comps.len() as f64;
    m.insert(
        "reward".into(),
        rewards.iter().map(|&x| x as f64).sum::<f64>() / n,
    );
    let (std, zero) = group_std(&rewards, g);
    m.insert("reward_std".into(), std);
    m.insert("frac_reward_zero_std".into(), zero);
    m.insert("completion_length".into(), new_tokens as f64 / n);
    m.insert(
        "completions/clipped_ratio".into(),
        comps
            .iter()
            .filter(|c| c.finish == crate::generate::FinishReason::Length)
            .count() as f64
            / n,
    );
    let ent: Vec<f32> = comps
        .iter()
        .flat_map(|c| c.entropies.iter().copied())
        .collect();
    m.insert(
        "entropy".into(),
        ent.iter().map(|&x| x as f64).sum::<f64>() / ent.len().max(1) as f64,
    );
    m.insert(
        "gen_tokens_per_s".into(),
        new_tokens as f64 / gen_s.max(1e-9),
    );
    let rows: Vec<Rollout> = comps
        .iter()
        .enumerate()
        .map(|(i, c)| Rollout {
            prompt: records[i / g].prompt.clone(),
            completion: c.text.clone(),
            reward: rewards[i],
            group: (step as i64) * s.prompts_per_step as i64 + (i / g) as i64,
            step: step as i64,
            logp: Some(c.logps.clone()),
            ref_logp: None,
            advantage: Some(adv[i]),
        })
        .collect();
    if let Some(w) = on.writer.as_mut() {
        w.append(rows);
    }
    let samples: Vec<Sample> = comps
        .into_iter()
        .enumerate()
        .map(|(i, c)| Sample {
            prompt_ids: prompt_ids[i / g].clone(),
            completion_ids: c.ids,
            old_logps: if s.num_iterations > 1 {
                Some(c.logps)
            } else {
                None
            },
            advantage: adv[i],
        })
        .collect();
    Ok((
        RolloutBatch {
            samples,
            ref_logps: None,
            completion_tokens: new_tokens,
        },
        m,
    ))
}

fn next_offline_batch(
    off: &mut Offline,
    s: &GrpoSettings,
    scale: ScaleRewards,
) -> Result<(RolloutBatch, BTreeMap<String, f64>)> {
    let mut samples = Vec::new();
    let mut rewards_all = Vec::new();
    let mut total = 0usize;
    for _ in 0..s.prompts_per_step {
        let grp = &off.groups[off.pos % off.groups.len()];
        off.pos += 1;
        let rewards: Vec<f32> = grp.iter().map(|r| r.reward).collect();
        if let Some(r) = grp.iter().find(|r| !r.reward.is_finite()) {
            bail!(
                "--rollouts: group {} of step {} has a non-finite reward ({}); score the rollouts first",
                r.group,
                r.step,
                r.reward
            );
        }
        let adv = advantages(&rewards, grp.len(), scale)?;
        for (r, a) in grp.iter().zip(adv) {
            let bos = off
                .tok
                .bos_token
                .as_deref()
                .map(|b| r.prompt.starts_with(b))
                .unwrap_or(false);
            let prompt_ids = encode_prompt(&off.tok, &r.prompt, bos)?;
            let mut completion_ids = off.tok.encode(&r.completion, false)?;
            let mut old = None;
            if let Some(lp) = &r.logp {
                if lp.len() == completion_ids.len() + 1 {
                    completion_ids.push(off.tok.eos_id);
                }
                if lp.len() == completion_ids.len() {
                    old = Some(lp.clone());
                }
            }
            if completion_ids.is_empty() {
                completion_ids.push(off.tok.eos_id);
                old = None;
            }
            total += completion_ids.len();
            samples.push(Sample {
                prompt_ids,
                completion_ids,
                old_logps: old,
                advantage: a,
            });
        }
        rewards_all.extend(rewards);
    }
    let n = rewards_all.len() as f64;
    let mut m = BTreeMap::new();
    m.insert(
        "reward".into(),
        rewards_all.iter().map(|&x| x as f64).sum::<f64>() / n,
    );
    m.insert("completion_length".into(), total as f64 / n);
    Ok((
        RolloutBatch {
            samples,
            ref_logps: None,
            completion_tokens: total,
        },
        m,
    ))
}
