//! `align ppo`: flags → [`PpoSettings`] → the shared loop ([`crate::train`]) running
//! [`crate::train::ppo::Ppo`] (algorithm, TRL defaults and departures: that module's
//! documentation and docs/ppo.md).

use super::flags::{finite, start_flags, LoopFlags, LoraFlags, OptimFlags, RunFlags};
use super::DeviceArgs;
use crate::train::ppo::Ppo;
pub use crate::train::ppo::{PpoSettings, FULL_LR, LORA_LR_FACTOR};
use crate::train::{execute, start, Start};
use anyhow::Result;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Serialize)]
#[command(
    after_help = "Examples:\n  align ppo --model DIR --reward-model rm/ --prompts prompts.parquet --rank 4 --out runs/ppo\n  \
align ppo --model DIR --prompts gsm8k.parquet --reward gsm8k\n\
With no --model and --prompts, the embedded default is used: the demo model, the prompts of its preference sample \
(assets/default/prefs-train.parquet) and, since no reward model ships, the verifier reward char_fraction of the letters \
`etaoin` (a stand-in that shows the loop working, not a meaningful objective).\n\
Settings are layered: built-in defaults < --config FILE (TOML, keys as the flags with `_`) < flags.\n\
Outputs in --out: adapter/ (PEFT) or model/ (--full), value_adapter/ (PEFT adapter of the value backbone + \
value_head.safetensors), checkpoint-<step>/, metrics.jsonl, metrics.png, settings.json, rollouts.parquet \
(step, prompt, completion, score, raw_score, per-token values, advantages, returns, logp, ref_logp)."
)]
pub struct Args {
    /// Prompt parquet files, folders or globs (`prompt` string or messages, or `question`; other columns are references for rewards) [default: the embedded sample's prompts].
    #[arg(long, num_args = 1..)]
    pub prompts: Option<Vec<PathBuf>>,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraFlags,

    /// Reward model folder (a merged *ForSequenceClassification, e.g. `align rm`'s rm/): scores completions (unless --reward is given) and is the value model's backbone, with its own LoRA adapter and a value head initialised from the score head [default: none; the value model then starts from the policy's base].
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// Score with a reward of `align grpo` instead of the reward model: gsm8k, exact, regex, format, char_fraction, model, command; comma-separated are summed [default: the reward model].
    #[arg(long)]
    pub reward: Option<String>,
    /// Reference column for gsm8k / exact [default: answer].
    #[arg(long)]
    pub ref_column: Option<String>,
    /// Pattern for the regex / format rewards.
    #[arg(long)]
    pub pattern: Option<String>,
    /// Characters counted by the char_fraction reward.
    #[arg(long)]
    pub chars: Option<String>,
    /// External verifier (implies --reward command when --reward is not given), run with `sh -c` once per batch: JSON lines in, one answer line per item out.
    #[arg(long)]
    pub reward_command: Option<String>,
    /// Seconds the reward command may take per batch [default: 600].
    #[arg(long, value_parser = finite)]
    pub reward_timeout: Option<f64>,

    /// Prompts per rollout batch, one completion each (TRL's batch size) [default: 8].
    #[arg(long)]
    pub prompts_per_step: Option<usize>,
    /// Most new tokens per completion (TRL response_length) [default: 53].
    #[arg(long)]
    pub response_length: Option<usize>,
    /// Longest prompt in tokens; longer prompts keep their last tokens [default: 512].
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// Sampling temperature, > 0; log-probs of the policy and reference use logits / T (TRL) [default: 0.7].
    #[arg(long, value_parser = finite)]
    pub temperature: Option<f64>,
    /// Sequences sampled together (0 = the whole batch) [default: 0].
    #[arg(long)]
    pub gen_batch_size: Option<usize>,
    /// Sequences per training micro-batch (and per no-grad scoring forward); a mini-batch's micro-batches are accumulated into one step, each its own token mean (TRL, OpenRLHF); bounds the activations' memory (0 = the whole mini-batch) [default: 8].
    #[arg(long)]
    pub train_batch_size: Option<usize>,

    /// Subtract this from the score of completions that end without EOS (TRL's EOS trick) [default: off].
    #[arg(long, value_parser = finite)]
    pub missing_eos_penalty: Option<f64>,
    /// Clip scores to ±this after normalisation and the EOS penalty; 0 = off [default: 10].
    #[arg(long, value_parser = finite)]
    pub score_clip: Option<f64>,
    /// Normalise scores with the reward model's `mean` / `std` (rm/config.json) [default: off].
    #[arg(long, overrides_with = "no_normalize_reward")]
    pub normalize_reward: bool,
    /// Undo --normalize-reward.
    #[arg(long, overrides_with = "normalize_reward")]
    pub no_normalize_reward: bool,

    /// KL penalty coefficient beta of the per-token rewards (the start value with --kl-target) [default: 0.05].
    #[arg(long, value_parser = finite)]
    pub kl_coef: Option<f64>,
    /// Per-token KL estimator: k1 (logp − ref) or k3 ((r − 1) − log r, r = p_ref/p) [default: k1].
    #[arg(long)]
    pub kl_estimator: Option<String>,
    /// Adaptive KL controller target (Ziegler et al.); unset = fixed --kl-coef [default: unset].
    #[arg(long, value_parser = finite)]
    pub kl_target: Option<f64>,
    /// Adaptive KL controller horizon, in rollouts [default: 10000].
    #[arg(long, value_parser = finite)]
    pub kl_horizon: Option<f64>,
    /// GAE discount gamma, in [0, 1] [default: 1].
    #[arg(long, value_parser = finite)]
    pub gamma: Option<f64>,
    /// GAE lambda, in [0, 1] [default: 0.95].
    #[arg(long, value_parser = finite)]
    pub lam: Option<f64>,
    /// Whiten the per-token rewards before GAE (TRL whiten_rewards).
    #[arg(long, overrides_with = "no_whiten_rewards")]
    pub whiten_rewards: bool,
    /// Undo --whiten-rewards.
    #[arg(long, overrides_with = "whiten_rewards")]
    pub no_whiten_rewards: bool,
    /// Policy ratio clip epsilon [default: 0.2].
    #[arg(long, value_parser = finite)]
    pub cliprange: Option<f64>,
    /// Value clip around the rollout's values [default: 0.2].
    #[arg(long, value_parser = finite)]
    pub cliprange_value: Option<f64>,
    /// Value-loss coefficient [default: 0.1].
    #[arg(long, value_parser = finite)]
    pub vf_coef: Option<f64>,
    /// Passes over each rollout batch [default: 4].
    #[arg(long)]
    pub ppo_epochs: Option<usize>,
    /// Mini-batches per pass; each is one optimizer step [default: 1].
    #[arg(long)]
    pub num_mini_batches: Option<usize>,
    /// Optimizer steps at the start that train only the value model (policy loss off) [default: 0].
    #[arg(long)]
    pub critic_warmup_steps: Option<u64>,
    /// Entropy bonus coefficient: loss −= coef · mean token entropy (OpenRLHF; TRL has none) [default: 0].
    #[arg(long, value_parser = finite)]
    pub entropy_coef: Option<f64>,
    /// At most N held-out prompts of --eval-data per evaluation (one completion each, fixed seed; reports eval_reward, eval_kl, eval_completion_length) [default: 64].
    #[arg(long)]
    pub eval_max_prompts: Option<usize>,

    #[command(flatten)]
    #[serde(flatten)]
    pub optim: OptimFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub looping: LoopFlags,

    #[command(flatten)]
    #[serde(flatten)]
    pub dev: DeviceArgs,
}

/// Optimizer steps of the embedded default run when --steps is not given (16 rollout batches).
const EMBEDDED_STEPS: u64 = 64;
/// Learning rate of the embedded default run when --lr is not given.
const EMBEDDED_LR: f64 = 3e-4;

/// With no --model and no --prompts: the embedded demo model, the prompts of its preference
/// sample and (no reward model ships) the char_fraction verifier.
fn embedded(s: &mut PpoSettings, assets: Option<&Path>) -> crate::Result<()> {
    if s.run.model.is_some() || s.prompts.is_some() {
        return Ok(());
    }
    let a = assets.ok_or_else(|| {
        crate::Error::Msg(
            "no --model/--prompts given and the embedded default (assets/default) is not found; pass --model DIR --prompts FILE.parquet".into(),
        )
    })?;
    s.run.model = Some(a.join("model"));
    s.prompts = Some(vec![a.join("prefs-train.parquet")]);
    if s.reward.is_none() && s.reward_model.is_none() && s.reward_command.is_none() {
        s.reward = Some("char_fraction".into());
        s.chars.get_or_insert_with(|| "etaoin".into());
    }
    if s.looping.steps.is_none() {
        s.looping.steps = Some(EMBEDDED_STEPS);
    }
    if s.optim.lr.is_none() {
        // the demo should move in a minute; TRL's 3e-6 (×10 for LoRA) barely does
        s.optim.lr = Some(EMBEDDED_LR);
    }
    if s.response_length == 53 {
        s.response_length = 24;
    }
    eprintln!(
        "using the embedded default: model {}, prompts {}, reward char_fraction of `{}`",
        a.join("model").display(),
        a.join("prefs-train.parquet").display(),
        s.chars.as_deref().unwrap_or("")
    );
    Ok(())
}

/// Flags → resolved settings (no output folder touched).
pub fn resolve(args: &Args) -> crate::Result<Start<PpoSettings>> {
    crate::train::resolve(&start_flags(args, &args.run), embedded)
}

pub fn run(args: Args) -> Result<()> {
    Ok(execute::<Ppo>(start(
        start_flags(&args, &args.run),
        embedded,
    )?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::common::parse_flags;

    fn settings(argv: &[&str]) -> PpoSettings {
        resolve(&parse_flags::<Args>("ppo", argv))
            .expect("settings resolve")
            .settings
    }

    fn error(argv: &[&str]) -> String {
        match resolve(&parse_flags::<Args>("ppo", argv)) {
            Ok(_) => panic!("{argv:?} should not resolve"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_are_trls() {
        let s = settings(&[
            "--model",
            "m",
            "--prompts",
            "p.parquet",
            "--reward-model",
            "rm",
        ]);
        assert_eq!(
            (
                s.temperature,
                s.kl_coef,
                s.gamma,
                s.lam,
                s.cliprange,
                s.cliprange_value,
                s.vf_coef
            ),
            (0.7, 0.05, 1.0, 0.95, 0.2, 0.2, 0.1)
        );
        assert_eq!(
            (s.ppo_epochs, s.num_mini_batches, s.response_length),
            (4, 1, 53)
        );
        assert_eq!(s.kl_estimator, align_algorithms::ppo::KlEstimator::K1);
        assert!(!s.whiten_rewards && s.missing_eos_penalty.is_none());
        let k3 = settings(&[
            "--model",
            "m",
            "--prompts",
            "p",
            "--kl-estimator",
            "k3",
            "--whiten-rewards",
        ]);
        assert_eq!(k3.kl_estimator, align_algorithms::ppo::KlEstimator::K3);
        assert!(k3.whiten_rewards);
    }

    #[test]
    fn bad_settings_name_the_key() {
        let base = ["--model", "m", "--prompts", "p"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            error(&v)
        };
        assert!(with(&["--temperature", "0"]).contains("temperature"));
        assert!(
            with(&["--prompts-per-step", "6", "--num-mini-batches", "4"])
                .contains("num_mini_batches")
        );
        assert!(with(&["--save-every", "3"]).contains("save_every"));
        assert!(with(&["--kl-estimator", "k2"]).contains("--kl-estimator"));
        assert!(with(&["--lam", "1.5"]).contains("lam"));
    }
}
