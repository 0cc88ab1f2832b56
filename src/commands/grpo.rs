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
//!   reward weights, multiple processes.

use super::common::{load_policy, PolicySpec, TrainFlags};
use super::DeviceArgs;
use crate::generate::{encode_prompt, eos_ids, generate_chunked, SamplingConfig};
use crate::lora::Fwd;
use crate::models::transformer::next_token_logps;
use crate::policy::{Policy, TokenBatch, TrainMode};
use crate::rewards::{build_reward, RewardFn, RewardInput, RewardOptions};
use crate::trainer::{
    list_checkpoints, read_state, resolve_settings, StepOutcome, TrainSettings, Trainer,
};
use align_algorithms::grpo::{
    group_advantages, grpo_loss, GrpoConfig, GrpoInputs, GrpoLossType, ScaleRewards,
};
use align_algorithms::optim::LrScheduleKind;
use align_datasets::{
    read_rollouts, Cursor, PromptStream, Rollout, RolloutWriter, Source, StreamOptions,
    TokenizerBundle,
};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Full fine-tuning default learning rate (TRL's GRPOConfig default); LoRA gets 10×.
pub const FULL_LR: f64 = 1e-6;
pub const LORA_LR_FACTOR: f64 = 10.0;

#[derive(clap::Args, Debug, Serialize)]
#[command(
    after_help = "Example:\n  align grpo --model DIR --prompts gsm8k.parquet --reward gsm8k --rank 4 --out runs/grpo\n\
Settings are layered: built-in defaults < --config FILE (TOML, keys as the flags with `_`) < flags.\n\
Outputs in --out: adapter/ (PEFT) or model/ (--full), checkpoint-<step>/, metrics.jsonl, rollouts.parquet \
(prompt, completion, reward, advantage, group, step, logp).\n\
Rewards: gsm8k, exact (reference column, default `answer`), regex / format (--pattern), char_fraction (--chars), \
model (--reward-model DIR), command (--reward-command CMD: JSON lines in {prompt, completion, refs}, out {reward}); \
comma-separated specs are summed."
)]
pub struct Args {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json); required, here or in --config.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompt parquet files, folders or globs (`prompt` string or messages, or `question`; other columns are references for rewards).
    #[arg(long, num_args = 1..)]
    pub prompts: Option<Vec<PathBuf>>,
    /// Offline mode: train on logged rollouts (a parquet written by align grpo/generate) instead of generating.
    #[arg(long)]
    pub rollouts: Option<PathBuf>,
    /// Output folder [default: runs/grpo].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// TOML file of settings (flags override it), e.g. configs/grpo-gsm8k.toml.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Reward(s): gsm8k, exact, regex, format, char_fraction, model, command; comma-separated are summed [default: gsm8k].
    #[arg(long)]
    pub reward: Option<String>,
    /// Reference column for gsm8k / exact [default: answer].
    #[arg(long)]
    pub ref_column: Option<String>,
    /// Pattern for the regex / format rewards (Oniguruma/Perl syntax).
    #[arg(long)]
    pub pattern: Option<String>,
    /// Characters counted by the char_fraction reward.
    #[arg(long)]
    pub chars: Option<String>,
    /// Reward model folder (*ForSequenceClassification) for the `model` reward.
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// External verifier for the `command` reward, run with `sh -c`.
    #[arg(long)]
    pub reward_command: Option<String>,

    /// Prompts sampled per generation batch [default: 4].
    #[arg(long)]
    pub prompts_per_step: Option<usize>,
    /// Completions per prompt, G [default: 8].
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Most new tokens per completion [default: 256].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Longest prompt in tokens; longer prompts keep their last tokens [default: 512].
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// Sampling temperature (log-probs use logits / T, like TRL) [default: 1].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass (1 = off) [default: 1].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Top-k sampling (0 = off) [default: 0].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Stop strings ending a completion [default: none].
    #[arg(long, num_args = 1..)]
    pub stop: Option<Vec<String>>,
    /// Sequences sampled together (0 = the whole batch at once) [default: 0].
    #[arg(long)]
    pub gen_batch_size: Option<usize>,
    /// Sequences per training micro-batch (0 = the whole batch) [default: 0].
    #[arg(long)]
    pub train_batch_size: Option<usize>,

    /// Optimizer steps per generation batch, mu [default: 1].
    #[arg(long)]
    pub num_iterations: Option<usize>,
    /// KL coefficient against the reference (0 = no reference pass) [default: 0].
    #[arg(long)]
    pub beta: Option<f64>,
    /// Lower clip epsilon [default: 0.2].
    #[arg(long)]
    pub epsilon: Option<f64>,
    /// Upper clip epsilon (DAPO clip-higher) [default: = --epsilon].
    #[arg(long)]
    pub epsilon_high: Option<f64>,
    /// Loss aggregation: grpo, bnpo, dr_grpo, dapo [default: dapo].
    #[arg(long)]
    pub loss_type: Option<String>,
    /// Advantage scaling: group, batch, none [default: group].
    #[arg(long)]
    pub scale_rewards: Option<String>,

    /// LoRA rank r [default: 8].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha/r [default: 32].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Dropout on the LoRA input [default: 0].
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// rsLoRA scaling alpha/sqrt(r).
    #[arg(long)]
    pub rslora: bool,
    /// Layers to adapt: all-linear or names like q_proj v_proj [default: all-linear].
    #[arg(long, num_args = 1..)]
    pub target_modules: Option<Vec<String>>,
    /// Full fine-tuning baseline: train every weight (reference: a frozen copy, loaded only when --beta > 0).
    #[arg(long)]
    pub full: bool,
    /// Start from an existing PEFT adapter.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,

    /// Learning rate [default: 1e-6 with --full; 1e-5 (10x) with LoRA].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning-rate schedule: constant, linear, cosine [default: linear].
    #[arg(long)]
    pub schedule: Option<String>,
    /// Optimizer steps [default: 100].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Seed for prompt order, sampling and adapter initialisation [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Read prompts in file order instead of shuffling.
    #[arg(long)]
    pub no_shuffle: bool,
    /// Write a checkpoint every N steps (a multiple of --num-iterations); 0 = only at the end [default: 0].
    #[arg(long)]
    pub save_every: Option<u64>,

    #[command(flatten)]
    #[serde(flatten)]
    pub train: TrainFlags,

    #[command(flatten)]
    #[serde(flatten)]
    pub dev: DeviceArgs,
}

/// Every resolved setting of a GRPO run (saved in each checkpoint).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GrpoSettings {
    pub model: Option<PathBuf>,
    pub prompts: Option<Vec<PathBuf>>,
    pub rollouts: Option<PathBuf>,
    pub out: PathBuf,
    pub reward: String,
    pub ref_column: Option<String>,
    pub pattern: Option<String>,
    pub chars: Option<String>,
    pub reward_model: Option<PathBuf>,
    pub reward_command: Option<String>,
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
    pub loss_type: String,
    pub scale_rewards: String,
    pub rank: usize,
    pub alpha: f64,
    pub lora_dropout: f64,
    pub rslora: bool,
    pub target_modules: Vec<String>,
    pub full: bool,
    pub init_adapter: Option<PathBuf>,
    pub lr: Option<f64>,
    pub schedule: String,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub steps: u64,
    pub seed: u64,
    pub no_shuffle: bool,
    pub save_every: u64,
    pub save_total_limit: usize,
    pub skip_nonfinite: bool,
    pub device: String,
    pub dtype: String,
}

fn defaults() -> serde_json::Value {
    let mut a = serde_json::json!({
        "model": null, "prompts": null, "rollouts": null, "out": "runs/grpo",
        "reward": "gsm8k", "ref_column": null, "pattern": null, "chars": null,
        "reward_model": null, "reward_command": null,
        "prompts_per_step": 4, "group_size": 8, "max_new_tokens": 256, "max_prompt_length": 512,
        "temperature": 1.0, "top_p": 1.0, "top_k": 0, "stop": [], "gen_batch_size": 0,
        "train_batch_size": 0, "num_iterations": 1, "beta": 0.0, "epsilon": 0.2,
        "epsilon_high": null, "loss_type": "dapo", "scale_rewards": "group",
    });
    let b = serde_json::json!({
        "rank": 8, "alpha": 32.0, "lora_dropout": 0.0, "rslora": false,
        "target_modules": ["all-linear"], "full": false, "init_adapter": null,
        "lr": null, "schedule": "linear", "warmup_steps": 0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "steps": 100, "seed": 42, "no_shuffle": false,
        "save_every": 0, "save_total_limit": 2, "skip_nonfinite": false,
        "device": "cpu", "dtype": "f32",
    });
    if let (Some(a), serde_json::Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// Checkpoint `extra` of a GRPO run.
#[derive(Serialize, Deserialize)]
struct GrpoState {
    settings: GrpoSettings,
    /// Prompt stream position (online mode).
    cursor: Option<Cursor>,
    /// Next group index (offline mode).
    offline_pos: usize,
}

pub fn parse_loss_type(s: &str) -> Result<GrpoLossType> {
    Ok(match s {
        "grpo" => GrpoLossType::Grpo,
        "bnpo" => GrpoLossType::Bnpo,
        "dr_grpo" => GrpoLossType::DrGrpo,
        "dapo" => GrpoLossType::Dapo,
        other => bail!("unknown --loss-type `{other}` (grpo, bnpo, dr_grpo, dapo)"),
    })
}

pub fn parse_scale_rewards(s: &str) -> Result<ScaleRewards> {
    Ok(match s {
        "group" => ScaleRewards::Group,
        "batch" => ScaleRewards::Batch,
        "none" => ScaleRewards::None,
        other => bail!("unknown --scale-rewards `{other}` (group, batch, none)"),
    })
}

fn parse_schedule(s: &str) -> Result<LrScheduleKind> {
    Ok(match s {
        "constant" => LrScheduleKind::Constant,
        "linear" => LrScheduleKind::Linear,
        "cosine" => LrScheduleKind::Cosine,
        other => bail!("unknown --schedule `{other}` (constant, linear, cosine)"),
    })
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
    let mut logits = policy.logits(&tb.ids, fwd)?;
    if temperature > 0.0 && temperature != 1.0 {
        logits = (logits / temperature)?;
    }
    let lp = next_token_logps(&logits, &tb.ids)?; // [B, T-1]
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

fn pad_rows(rows: &[&[f32]], c: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
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

/// Reference log-probs of each sample (no graph), in order.
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
    for ch in refs.chunks(chunk.max(1)) {
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
    writer: RolloutWriter,
}

struct Offline {
    /// Groups of rollouts (same step and group id), in file order.
    groups: Vec<Vec<Rollout>>,
    pos: usize,
    tok: TokenizerBundle,
}

fn resolve(args: &Args) -> Result<GrpoSettings> {
    resolve_settings(defaults(), args.config.as_deref(), args)
}

pub fn run(args: Args) -> Result<()> {
    let (s, resume_dir) = match &args.train.resume {
        Some(p) => {
            let dir = if p.join("trainer_state.json").exists() {
                p.clone()
            } else {
                list_checkpoints(p).pop().map(|(_, d)| d).with_context(|| {
                    format!("{}: no checkpoint-N folder to resume from", p.display())
                })?
            };
            let st: GrpoState = serde_json::from_value(read_state(&dir)?.extra)
                .context("checkpoint written by another command")?;
            (st.settings, Some(dir))
        }
        None => (resolve(&args)?, None),
    };
    train(s, resume_dir)
}

/// Run GRPO with resolved settings (optionally resuming from a checkpoint folder).
pub fn train(s: GrpoSettings, resume_dir: Option<PathBuf>) -> Result<()> {
    let model = s
        .model
        .clone()
        .context("--model DIR is required (a Hugging Face model folder)")?;
    if s.prompts.is_none() && s.rollouts.is_none() {
        bail!("give --prompts FILE (online GRPO) or --rollouts FILE (offline)");
    }
    if s.prompts.is_some() && s.rollouts.is_some() {
        bail!("--prompts and --rollouts are exclusive (online or offline training)");
    }
    let g = s.group_size;
    if g < 2 {
        bail!("--group-size must be at least 2 (advantages are relative to the group)");
    }
    if s.prompts_per_step == 0 || s.num_iterations == 0 || s.steps == 0 {
        bail!("--prompts-per-step, --num-iterations and --steps must be at least 1");
    }
    if !s.save_every.is_multiple_of(s.num_iterations as u64) {
        bail!(
            "--save-every ({}) must be a multiple of --num-iterations ({}): checkpoints fall between generation batches",
            s.save_every,
            s.num_iterations
        );
    }
    let device = super::parse_device(&s.device)?;
    let dtype = super::parse_dtype(&s.dtype)?;
    let grpo_cfg = GrpoConfig {
        loss_type: parse_loss_type(&s.loss_type)?,
        beta: s.beta,
        epsilon_low: s.epsilon,
        epsilon_high: s.epsilon_high.unwrap_or(s.epsilon),
        delta: None,
        max_completion_length: s.max_new_tokens,
    };
    let scale = parse_scale_rewards(&s.scale_rewards)?;
    let schedule = parse_schedule(&s.schedule)?;
    let lr = s.lr.unwrap_or(if s.full {
        FULL_LR
    } else {
        FULL_LR * LORA_LR_FACTOR
    });
    let spec = PolicySpec {
        model: model.clone(),
        full: s.full,
        rank: s.rank,
        alpha: s.alpha,
        lora_dropout: s.lora_dropout,
        rslora: s.rslora,
        target_modules: s.target_modules.clone(),
        init_adapter: s.init_adapter.clone(),
        seed: s.seed,
    };
    let policy = load_policy(&spec, dtype, &device)?;
    let reference: Option<Policy> = if s.full && s.beta != 0.0 {
        Some(
            Policy::load(&model, TrainMode::Frozen, dtype, &device)
                .with_context(|| format!("loading the reference copy of {}", model.display()))?,
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
    let (trainable, total) = policy.param_counts();
    eprintln!(
        "grpo: {} {} model, {} ({trainable} of {total} parameters trainable), {} steps, {}x{} completions per batch, mu {}, lr {lr:.2e}, loss {}, beta {}",
        policy.cfg().family.name(),
        model.display(),
        if s.full { "full fine-tuning".to_string() } else { format!("LoRA r={} alpha={}", s.rank, s.alpha) },
        s.steps,
        s.prompts_per_step,
        g,
        s.num_iterations,
        s.loss_type,
        s.beta
    );
    let settings = TrainSettings {
        lr,
        schedule,
        warmup_steps: s.warmup_steps,
        weight_decay: s.weight_decay,
        max_grad_norm: s.max_grad_norm,
        batch_size: s.prompts_per_step * g,
        grad_accum: 1,
        steps: s.steps,
        seed: s.seed,
        save_every: s.save_every,
        save_total_limit: s.save_total_limit,
        eval_every: 0,
        skip_nonfinite: s.skip_nonfinite,
        out: s.out.clone(),
    };
    let mut trainer = Trainer::new(policy, settings)?;
    std::fs::write(s.out.join("settings.json"), serde_json::to_vec_pretty(&s)?)?;
    let mut saved: Option<GrpoState> = None;
    if let Some(dir) = &resume_dir {
        let extra = trainer.resume(dir)?;
        saved = Some(serde_json::from_value(extra)?);
        trainer.note(&format!(
            "resumed from {} at step {}",
            dir.display(),
            trainer.step
        ));
    }

    let mut online: Option<Online> = None;
    let mut offline: Option<Offline> = None;
    if let Some(prompts) = &s.prompts {
        let src = Source::from_paths(prompts).with_context(|| format!("prompts {prompts:?}"))?;
        let opts = StreamOptions {
            shuffle: !s.no_shuffle,
            seed: s.seed,
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
                device: Some(device.clone()),
                dtype: Some(dtype),
            },
        )?;
        let writer = open_rollout_log(&s.out, trainer.step, resume_dir.is_some())?;
        online = Some(Online {
            stream,
            tok: TokenizerBundle::from_dir(&model)?,
            reward,
            sampling,
            writer,
        });
    } else if let Some(path) = &s.rollouts {
        let rows = read_rollouts(path)
            .with_context(|| format!("reading --rollouts {}", path.display()))?;
        let mut groups: Vec<Vec<Rollout>> = Vec::new();
        for r in rows {
            match groups.last_mut() {
                Some(last) if last[0].step == r.step && last[0].group == r.group => last.push(r),
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
            tok: TokenizerBundle::from_dir(&model)?,
        });
    }

    let mut batch: Option<RolloutBatch> = None;
    let mut iter_in_batch = s.num_iterations;
    let mut gen_metrics = BTreeMap::new();
    while trainer.step < s.steps {
        if iter_in_batch >= s.num_iterations {
            let t0 = Instant::now();
            let (b, m) = if let Some(on) = online.as_mut() {
                let step = trainer.step;
                next_online_batch(on, &trainer.policy, &s, pad, scale, step)?
            } else {
                let off = offline.as_mut().expect("online or offline");
                next_offline_batch(off, &s, scale)?
            };
            let mut b = b;
            if s.beta != 0.0 {
                let (r, fwd) = match &reference {
                    Some(r) => (r, Fwd::REFERENCE),
                    None => (&trainer.policy, Fwd::REFERENCE),
                };
                let chunk = if s.train_batch_size == 0 {
                    b.samples.len()
                } else {
                    s.train_batch_size
                };
                b.ref_logps = Some(reference_logps(
                    r,
                    fwd,
                    &b.samples,
                    pad,
                    s.temperature,
                    chunk,
                )?);
            }
            gen_metrics = m;
            gen_metrics.insert("generation_time_s".into(), t0.elapsed().as_secs_f64());
            batch = Some(b);
            iter_in_batch = 0;
        }
        let b = batch.as_ref().expect("batch generated above");
        let n = b.samples.len();
        let mb = if s.train_batch_size == 0 {
            n
        } else {
            s.train_batch_size.min(n)
        };
        let chunks: Vec<Vec<usize>> = (0..n)
            .collect::<Vec<_>>()
            .chunks(mb)
            .map(|c| c.to_vec())
            .collect();
        let nm = chunks.len();
        let outcome = trainer.train_step(nm, |p, i| {
            let (loss, m) =
                grpo_micro_loss(p, b, &chunks[i], pad, s.temperature, &grpo_cfg, nm, true)?;
            Ok((loss, m))
        })?;
        iter_in_batch += 1;
        let StepOutcome::Stepped(mut m) = outcome else {
            continue;
        };
        if let Some(t) = m.remove("tokens_per_s") {
            m.insert("train_tokens_per_s".into(), t);
        }
        for (k, v) in &gen_metrics {
            m.insert(k.clone(), *v);
        }
        if grpo_cfg.beta == 0.0 {
            m.remove("kl");
        }
        trainer.log(&m)?;
        trainer.report(&[
            ("reward", m.get("reward").copied().unwrap_or(f64::NAN)),
            (
                "len",
                m.get("completion_length").copied().unwrap_or(f64::NAN),
            ),
            ("loss", m.get("loss").copied().unwrap_or(f64::NAN)),
        ]);
        if trainer.should_save() && iter_in_batch >= s.num_iterations {
            if let Some(on) = online.as_mut() {
                on.writer.finish()?;
                on.writer = open_rollout_log(&s.out, trainer.step, true)?;
            }
            let extra = serde_json::to_value(GrpoState {
                settings: s.clone(),
                cursor: online.as_ref().map(|o| o.stream.cursor()),
                offline_pos: offline.as_ref().map(|o| o.pos).unwrap_or(0),
            })?;
            trainer.save_checkpoint(extra)?;
        }
    }
    if let Some(on) = online.as_mut() {
        on.writer.finish()?;
    }
    let dest = trainer.finish()?;
    eprintln!(
        "done: {} steps; {} in {}; metrics {}",
        trainer.step,
        if s.full { "model" } else { "adapter" },
        dest.display(),
        trainer.metrics_path().display()
    );
    Ok(())
}

/// `OUT/rollouts.parquet`. A parquet file cannot be appended to, so the log is rewritten: rows
/// of earlier steps (up to `keep_until`, when resuming or at a checkpoint) are copied into a
/// fresh file, which stays open for the new rows.
fn open_rollout_log(out: &Path, keep_until: u64, keep: bool) -> Result<RolloutWriter> {
    let path = out.join("rollouts.parquet");
    let mut old = Vec::new();
    if keep && path.exists() {
        match read_rollouts(&path) {
            Ok(rows) => {
                old = rows
                    .into_iter()
                    .filter(|r| r.step < keep_until as i64)
                    .collect()
            }
            Err(e) => eprintln!(
                "warning: {} is unreadable ({e}); starting a new rollout log",
                path.display()
            ),
        }
    }
    let tmp = out.join(".rollouts.parquet.tmp");
    {
        let mut w =
            RolloutWriter::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        if !old.is_empty() {
            w.write(&old)?;
        }
        w.finish()?;
    }
    std::fs::rename(&tmp, &path)?;
    let mut w =
        RolloutWriter::create(&path).with_context(|| format!("creating {}", path.display()))?;
    if !old.is_empty() {
        w.write(&old)?;
    }
    Ok(w)
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
    let mut rng =
        StdRng::seed_from_u64(s.seed ^ (step.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let t0 = Instant::now();
    let comps = generate_chunked(
        &policy.model,
        Some(&on.tok),
        &all,
        pad,
        &on.sampling,
        Fwd::POLICY,
        &mut rng,
        s.gen_batch_size,
        |_| {},
    )?;
    let gen_s = t0.elapsed().as_secs_f64();
    let inputs: Vec<RewardInput> = comps
        .iter()
        .enumerate()
        .map(|(i, c)| RewardInput {
            prompt: &records[i / g].prompt,
            completion: &c.text,
            refs: &records[i / g].refs,
        })
        .collect();
    let rewards = on.reward.score(&inputs).with_context(|| {
        format!(
            "scoring completions of the prompts at {}",
            records
                .iter()
                .map(|r| r.source_row.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    if rewards.len() != comps.len() {
        bail!(
            "the reward returned {} scores for {} completions",
            rewards.len(),
            comps.len()
        );
    }
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
    on.writer.write(&rows)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::common::parse_flags;

    fn settings(argv: &[&str]) -> GrpoSettings {
        resolve(&parse_flags::<Args>("grpo", argv)).expect("settings resolve")
    }

    /// The shipped configs must keep resolving, and a flag must still beat the file.
    #[test]
    fn shipped_configs_resolve_and_flags_override_them() {
        let demo = settings(&["--config", "configs/grpo-demo.toml"]);
        assert_eq!((demo.rank, demo.steps, demo.lr), (4, 200, Some(3e-3)));
        let short = settings(&["--config", "configs/grpo-demo.toml", "--steps", "16"]);
        assert_eq!(short.steps, 16);
        settings(&["--config", "configs/grpo-gsm8k.toml"]);
    }
}
