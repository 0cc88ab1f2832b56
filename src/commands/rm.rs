//! `align rm`: flags → [`RmSettings`] → the shared loop ([`crate::train`]) running
//! [`crate::train::rm::Rm`] (reward-model training: backbone + score head, Bradley–Terry loss).

use super::flags::{finite, start_flags, BatchFlags, LoopFlags, LoraFlags, OptimFlags, RunFlags};
use super::DeviceArgs;
use crate::train::dpo::use_embedded;
use crate::train::rm::Rm;
pub use crate::train::rm::{RmSettings, FULL_LR, LORA_LR};
use crate::train::{execute, start, Start};
use anyhow::Result;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Serialize)]
#[command(
    after_help = "Trains a reward model: the decoder (LoRA adapters, or every weight with --full) plus a fresh score head (Linear(hidden, 1), no bias, always trained in full), read at the last non-pad token of prompt + response. \
Loss (TRL's RewardTrainer): -mean(logsigmoid(r_chosen - r_rejected - margin)) + center_rewards_coef * mean((r_chosen + r_rejected)^2); `margin` is the data's optional numeric `margin` column (0 without one). \
Metrics: loss, accuracy, margin, min_reward, mean_reward, max_reward (eval_* on --eval-data).\n\
Settings are layered: built-in defaults < --config FILE (TOML, keys as the flags with `_`) < flags.\n\
With no --model and --data, the embedded default (assets/default: a small chat model and a preference sample) is used.\n\
Outputs in --out: rm/ (a merged Hugging Face *ForSequenceClassification folder, num_labels 1, with the reward mean/std over the eval set, else the first training pairs, as `mean`/`std` in config.json; for `align grpo --reward model --reward-model OUT/rm`), adapter/ with LoRA (PEFT, task SEQ_CLS, the head in modules_to_save), checkpoint-<step>/, metrics.jsonl, metrics.png, settings.json."
)]
pub struct Args {
    /// Training data: parquet files, folders or globs (prompt/chosen/rejected, HH-RLHF transcripts, or chat messages; an optional numeric `margin` column) [default: the embedded preference sample, assets/default/prefs-train.parquet].
    #[arg(long, num_args = 1..)]
    pub data: Option<Vec<PathBuf>>,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraFlags,

    /// TRL's center_rewards_coefficient: adds coef * mean((r_chosen + r_rejected)^2) to the loss, keeping rewards centred at 0; 0 = off [default: 0].
    #[arg(long, value_parser = finite)]
    pub center_rewards_coef: Option<f64>,
    /// Longest prompt+response in tokens; responses are cut from the right [default: 512].
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Longest prompt in tokens; prompts are cut from the left [default: 256].
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// At most N held-out pairs per evaluation (and for rm/'s reward mean/std) [default: 256].
    #[arg(long)]
    pub eval_max_pairs: Option<usize>,

    #[command(flatten)]
    #[serde(flatten)]
    pub optim: OptimFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub batch: BatchFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub looping: LoopFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub dev: DeviceArgs,
}

fn embedded(s: &mut RmSettings, assets: Option<&Path>) -> crate::Result<()> {
    use_embedded(
        &mut s.run.model,
        &mut s.data,
        &mut s.looping.eval_data,
        assets,
    )
}

/// Flags → resolved settings (no output folder touched).
pub fn resolve(args: &Args) -> crate::Result<Start<RmSettings>> {
    crate::train::resolve(&start_flags(args, &args.run), embedded)
}

pub fn run(args: Args) -> Result<()> {
    Ok(execute::<Rm>(start(
        start_flags(&args, &args.run),
        embedded,
    )?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::common::parse_flags;

    fn settings(argv: &[&str]) -> RmSettings {
        resolve(&parse_flags::<Args>("rm", argv))
            .expect("settings resolve")
            .settings
    }

    #[test]
    fn defaults_are_trl_reward_config() {
        let s = settings(&[]);
        assert_eq!(s.run.out, PathBuf::from("runs/rm"));
        assert_eq!(
            (s.lora.rank, s.lora.lora_dropout, s.center_rewards_coef),
            (8, 0.0, 0.0)
        );
        assert_eq!(s.optim.lr, None);
        assert_eq!((LORA_LR, FULL_LR), (1e-4, 1e-5));
        // the embedded default fills model and data
        assert!(s.run.model.is_some() && s.data.is_some());
        let c = settings(&["--center-rewards-coef", "0.01", "--full"]);
        assert_eq!((c.center_rewards_coef, c.lora.full), (0.01, true));
        let e = resolve(&parse_flags::<Args>("rm", &["--center-rewards-coef=-1"]))
            .err()
            .expect("negative coefficient")
            .to_string();
        assert!(e.contains("center_rewards_coef"), "{e}");
    }
}
