//! `align grpo`: flags → [`GrpoSettings`] → the shared loop ([`crate::train`]) running
//! [`crate::train::grpo::Grpo`] (algorithm, TRL defaults and departures: that module's
//! documentation and docs/grpo.md).

use super::flags::{finite, start_flags, LoopFlags, LoraFlags, OptimFlags, RunFlags};
use super::DeviceArgs;
use crate::train::grpo::Grpo;
pub use crate::train::grpo::{
    completion_logps, grpo_micro_loss, GrpoSettings, RolloutBatch, Sample, FULL_LR, LORA_LR_FACTOR,
};
use crate::train::{execute, start, Start};
use anyhow::Result;
use serde::Serialize;
use std::path::{Path, PathBuf};

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
    /// Prompt parquet files, folders or globs (`prompt` string or messages, or `question`; other columns are references for rewards).
    #[arg(long, num_args = 1..)]
    pub prompts: Option<Vec<PathBuf>>,
    /// Offline mode: train on logged rollouts (a parquet written by align grpo/generate) instead of generating.
    #[arg(long)]
    pub rollouts: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraFlags,

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
    /// External verifier for the `command` reward, run with `sh -c` once per batch: JSON lines in, then EOF; exactly one answer line per item, then exit 0.
    #[arg(long)]
    pub reward_command: Option<String>,
    /// Seconds the reward command may take per batch; past that its process group is killed and the run stops [default: 600].
    #[arg(long, value_parser = finite)]
    pub reward_timeout: Option<f64>,

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
    #[arg(long, value_parser = finite)]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass (1 = off) [default: 1].
    #[arg(long, value_parser = finite)]
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
    #[arg(long, value_parser = finite)]
    pub beta: Option<f64>,
    /// Lower clip epsilon [default: 0.2].
    #[arg(long, value_parser = finite)]
    pub epsilon: Option<f64>,
    /// Upper clip epsilon (DAPO clip-higher) [default: = --epsilon].
    #[arg(long, value_parser = finite)]
    pub epsilon_high: Option<f64>,
    /// Loss aggregation: grpo, bnpo, dr_grpo, dapo [default: dapo].
    #[arg(long)]
    pub loss_type: Option<String>,
    /// Advantage scaling: group, batch, none [default: group].
    #[arg(long)]
    pub scale_rewards: Option<String>,

    /// At most N held-out prompts of --eval-data per evaluation (one completion each, fixed seed) [default: 64].
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

/// GRPO has no embedded default: --model and --prompts (or --rollouts) are required.
fn no_default(_: &mut GrpoSettings, _: Option<&Path>) -> crate::Result<()> {
    Ok(())
}

/// Flags → resolved settings (no output folder touched).
pub fn resolve(args: &Args) -> crate::Result<Start<GrpoSettings>> {
    crate::train::resolve(&start_flags(args, &args.run), no_default)
}

pub fn run(args: Args) -> Result<()> {
    Ok(execute::<Grpo>(start(
        start_flags(&args, &args.run),
        no_default,
    )?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::common::parse_flags;

    fn settings(argv: &[&str]) -> GrpoSettings {
        resolve(&parse_flags::<Args>("grpo", argv))
            .expect("settings resolve")
            .settings
    }

    /// The shipped configs must keep resolving, and a flag must still beat the file.
    #[test]
    fn shipped_configs_resolve_and_flags_override_them() {
        let demo = settings(&["--config", "configs/grpo-demo.toml"]);
        assert_eq!(
            (demo.lora.rank, demo.looping.steps, demo.optim.lr),
            (4, Some(200), Some(3e-3))
        );
        let short = settings(&["--config", "configs/grpo-demo.toml", "--steps", "16"]);
        assert_eq!(short.looping.steps, Some(16));
        settings(&["--config", "configs/grpo-gsm8k.toml"]);
    }
}
